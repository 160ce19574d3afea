#!/usr/bin/env python3
"""Helpers for live_server.sh (real sockudo nodes, real Prometheus, real clients).

  live_server.py config --node1 H:P --node2 H:P --dead H:P --prom-port N [--node-exporter H:P] --out DIR
      DIR/prometheus.yml: the shipped compose/prometheus/prometheus.yml with only its targets
      adapted (see make_config), scrape/evaluation every 1s; DIR/rules/ the shipped rules;
      DIR/rules-live/sockudo-lowered.yml a copy of the alert rules with `for: 0s`, some
      thresholds lowered (LOWERED) and the label ops_live="lowered".
  live_server.py watch --prom URL --out FILE
      polls /api/v1/alerts every 0.5 s until SIGTERM and keeps, per alert and rule copy, every
      state seen (FILE is rewritten after each poll).
  live_server.py wait --prom URL [--timeout 40]
      waits until every sockudo target has been scraped and the recording rules have output.
  live_server.py eval --prom URL --alerts FILE [--node-exporter] [--timeout 30]
      evaluates every expression from promql.py through /api/v1/query (see EXCLUDED / MUST_BE_EMPTY)
      and checks the alerts seen by `watch`.
  live_server.py logs --trace-id HEX LOG...
      checks that every field the ELK assets use appears in the nodes' real JSON log lines.

Each check prints `ok: ...` or `FAIL: ...`; the last line is a JSON summary {"passed", "failed"}.
"""
import argparse
import datetime
import glob
import json
import math
import os
import re
import signal
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import yaml  # noqa: E402

import contract  # noqa: E402
import live  # noqa: E402  (query, result_len, split_top, signal_expr)
import promql  # noqa: E402

REPO = promql.REPO
RULES_DIR = os.path.join(REPO, "compose", "prometheus", "rules")

# ------------------------------------------------------------------ alert expectations
# Thresholds of the lowered copy (`for: 0s` everywhere). Alerts not listed keep the shipped
# expression: the driven condition meets it (InstanceDown: a dead target) or it must stay false.
LOWERED = {
    "SockudoHighConnectionCount": "100",          # shipped 1000; the crowd is 1050 sockets anyway
    "SockudoConnectionDrops": "1",                # shipped 10/s over 5m
    "SockudoRateLimitTriggered": "1",             # shipped 5/s over 5m (also crossed: 100 client events/s)
    "SockudoHighAdapterLatency": "50",            # shipped 100 ms; stalled node 2 -> 500 ms timeouts
    "SockudoCrossNodeQueriesTimingOut": "0.01",   # shipped 0.05
    "SockudoHighBroadcastLatency": "50",          # shipped 100 ms; stalled node 2 -> ~1-2 s
    "SockudoVeryHighBroadcastLatency": "250",     # shipped 500 ms
    "SockudoSlowConsumerDisconnects": "0.01",     # shipped 0.1/s
}
# Must fire (lowered copy) under the driven traffic. The first two are the issue's requirement.
MUST_FIRE = [
    "SockudoHighConnectionCount", "SockudoHighBroadcastLatency", "SockudoVeryHighBroadcastLatency",
    "SockudoConnectionDrops", "SockudoRateLimitTriggered", "SockudoHighAdapterLatency",
    "SockudoCrossNodeQueriesTimingOut", "SockudoSlowConsumerDisconnects", "SockudoInstanceDown",
]
# Shipped rules (shipped thresholds, shipped `for:`) whose condition the traffic really meets:
# they must at least reach `pending`.
SHIPPED_MUST_PEND = [
    "SockudoHighConnectionCount",       # 1050 sockets on node 2 > 1000
    "SockudoHighBroadcastLatency",      # node 2's `sm` broadcasts delayed ~1-2 s by the stall
    "SockudoVeryHighBroadcastLatency",
    "SockudoInstanceDown",              # the dead sockudo-cluster target
    "SockudoRateLimitTriggered",        # ~2300 refused client events in the 5m window: > 5/s
]
# Conditions that are false in this setup, so the alert must never fire (in either copy) and
# the shipped expression must return nothing.
MUST_BE_EMPTY = {
    "SockudoAdapterDisconnected": "both nodes stay connected to Redis",
    "SockudoUnauthenticatedClusterEnvelopes": "nothing but the two nodes publishes on their topic",
    "SockudoWebhookFailures": "no app of the test config has webhooks: no delivery can fail or be dropped",
    "SockudoWebhookQueueStuck": "no app of the test config has webhooks: no event waits",
    "SockudoTargetMissing": "absent(up{job=\"sockudo\"}): the sockudo job has its target",
    "SockudoMetricsMissing": "every scraped sockudo target exposes sockudo_build_info",
    "SockudoTelemetryExportFailing": "the live nodes export no OTLP: no export can fail",
}

# ------------------------------------------------------------------ excluded expressions
# (predicate on an extracted item, reason). Excluded expressions must still parse.
NODE_REASON = "node_exporter metric and no prometheus-node-exporter running"
EXCLUDED = [
    (lambda it: 'recipient_count_bucket="xl"' in it["concrete"],
     "recipient_count_bucket=\"xl\" needs >10000 recipients on one node; the test drives xs, sm and md"),
]


def summary(passed, failed):
    print(json.dumps({"passed": passed, "failed": failed}))


class Checks:
    def __init__(self):
        self.passed = self.failed = 0

    def check(self, ok, name, detail=""):
        if ok:
            self.passed += 1
            print(f"ok: {name}" + (f" ({detail})" if detail else ""))
        else:
            self.failed += 1
            print(f"FAIL: {name}" + (f"\n    {detail}" if detail else ""))
        return ok


# ------------------------------------------------------------------ config
def replace_threshold(expr, new):
    e = expr.strip()
    parts = live.split_top(e, [">=", "<=", "==", "!=", ">", "<"])
    if not parts:
        raise SystemExit(f"no comparison in {expr!r}")
    lhs, rhs = parts
    op = e[len(lhs):].strip()[:2]
    op = op if op in (">=", "<=", "==", "!=") else op[0]
    float(rhs)  # the shipped threshold is a number
    return f"{lhs} {op} {new}"


def make_config(a):
    with open(os.path.join(REPO, "compose", "prometheus", "prometheus.yml")) as f:
        cfg = yaml.safe_load(f)
    n2_host, n2_port = a.node2.rsplit(":", 1)
    jobs = []
    for j in cfg["scrape_configs"]:
        name = j["job_name"]
        if name == "sockudo":
            j["static_configs"][0]["targets"] = [a.node1]
        elif name == "sockudo-cluster":
            # node 2, plus a sockudo target that is down (SockudoInstanceDown)
            j["static_configs"][0]["targets"] = [a.node2, a.dead]
        elif name == "sockudo-k8s":
            # Debian's Prometheus has no Kubernetes SD: node 2 as the pod that SD would report,
            # annotated with its metrics port; the shipped relabel rules produce the address.
            j.pop("kubernetes_sd_configs")
            j["static_configs"] = [{"targets": [f"{n2_host}:1"], "labels": {
                "__meta_kubernetes_pod_label_app": "sockudo",
                "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
                "__meta_kubernetes_pod_annotation_prometheus_io_port": n2_port,
                "__meta_kubernetes_pod_annotation_prometheus_io_path": "/metrics",
                "__meta_kubernetes_pod_name": "sockudo-0",
                "__meta_kubernetes_namespace": "sockudo-namespace",
            }}]
        elif name == "node":
            if not a.node_exporter:
                continue
            j["static_configs"][0]["targets"] = [a.node_exporter]
        elif name == "prometheus":
            j["static_configs"][0]["targets"] = [f"127.0.0.1:{a.prom_port}"]
        else:
            continue  # alertmanager, otel-collector: not running in this test
        j.pop("scrape_interval", None)
        jobs.append(j)
    cfg["scrape_configs"] = jobs
    cfg["global"].update({"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"})
    cfg["rule_files"] = list(cfg.get("rule_files", [])) + ["rules-live/*.yml"]
    cfg.pop("alerting", None)  # no Alertmanager here; alerts are read from Prometheus' API

    out = a.out
    os.makedirs(os.path.join(out, "rules"), exist_ok=True)
    os.makedirs(os.path.join(out, "rules-live"), exist_ok=True)
    for p in glob.glob(os.path.join(RULES_DIR, "*.yml")):
        with open(p) as src, open(os.path.join(out, "rules", os.path.basename(p)), "w") as dst:
            dst.write(src.read())
    with open(os.path.join(RULES_DIR, "sockudo.yml")) as f:
        rules = yaml.safe_load(f)
    lowered = []
    for g in rules["groups"]:
        for r in g["rules"]:
            if "alert" not in r:
                continue
            r = dict(r)
            if r["alert"] in LOWERED:
                r["expr"] = replace_threshold(str(r["expr"]), LOWERED[r["alert"]])
            r["for"] = "0s"
            r["labels"] = dict(r.get("labels") or {}, ops_live="lowered")
            lowered.append(r)
    missing = set(LOWERED) - {r["alert"] for r in lowered}
    if missing:
        raise SystemExit(f"alerts named in LOWERED are not in the shipped rules: {sorted(missing)}")
    with open(os.path.join(out, "rules-live", "sockudo-lowered.yml"), "w") as f:
        yaml.safe_dump({"groups": [{"name": "sockudo_alerts_lowered", "rules": lowered}]}, f, sort_keys=False)
    with open(os.path.join(out, "prometheus.yml"), "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    print(os.path.join(out, "prometheus.yml"))


# ------------------------------------------------------------------ watch
def watch(prom, out):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    seen = {}
    deadline = time.time() + 600
    while not stop and time.time() < deadline:
        try:
            with urllib.request.urlopen(prom + "/api/v1/alerts", timeout=5) as resp:
                r = json.load(resp)
            for al in r.get("data", {}).get("alerts", []):
                lab = al["labels"]
                copy = "lowered" if lab.get("ops_live") == "lowered" else "shipped"
                k = f"{lab['alertname']}|{copy}"
                e = seen.setdefault(k, {"states": [], "instances": [], "seen": {}, "max_value": None})
                if al["state"] not in e["states"]:
                    e["states"].append(al["state"])
                now = time.time()
                first_last = e["seen"].setdefault(al["state"], [now, now])
                first_last[1] = now
                inst = lab.get("instance", "")
                if inst not in e["instances"]:
                    e["instances"].append(inst)
                try:
                    v = float(al.get("value", "nan"))
                    if not math.isnan(v) and (e["max_value"] is None or v > e["max_value"]):
                        e["max_value"] = v
                except ValueError:
                    pass
            tmp = out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(seen, f, indent=1, sort_keys=True)
            os.replace(tmp, out)
        except Exception as e:  # Prometheus not ready yet
            print(f"watch: {e!r}", file=sys.stderr)
        time.sleep(0.5)
    return 0


# ------------------------------------------------------------------ wait
def wait(prom, timeout):
    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        ups = live.query(prom, 'up{job=~"sockudo(-.+)?"} == 1').get("data", {}).get("result", [])
        rec = live.result_len(live.query(prom, "instance_app_id:sockudo_connected:sum")) or 0
        rate = live.result_len(live.query(prom, "instance_app_id:sockudo_new_connections:rate5m")) or 0
        last = f"{len(ups)} sockudo targets up, recorded series {rec}/{rate}"
        if len(ups) >= 3 and rec and rate:
            print(f"scraping: {last}")
            return 0
        time.sleep(0.5)
    print(f"timed out waiting for scrapes ({last})", file=sys.stderr)
    return 1


# ------------------------------------------------------------------ eval
def finite_values(resp):
    d = resp.get("data", {})
    if d.get("resultType") == "scalar":
        vals = [d["result"][1]]
    elif d.get("resultType") == "vector":
        vals = [r["value"][1] for r in d["result"]]
    else:
        return []
    out = []
    for v in vals:
        try:
            f = float(v)
        except ValueError:
            continue
        if not math.isnan(f):
            out.append(f)
    return out


def short(expr, n=150):
    e = " ".join(expr.split())
    return e if len(e) <= n else e[:n - 3] + "..."


def evaluate(a):
    c = Checks()
    prom = a.prom
    items = promql.extract(REPO)
    excluded = list(EXCLUDED)
    if not a.node_exporter:
        excluded.append((lambda it: bool(it["metrics"]) and all(m.startswith("node_") for m in it["metrics"]),
                         NODE_REASON))

    def exclusion(it):
        for pred, why in excluded:
            if pred(it):
                return why
        return None

    print("== not required to return data (still evaluated; must parse)")
    for it in items:
        why = exclusion(it)
        if why and it["kind"] != "alert":
            print(f"   {it['source']}: {why}")
    for alert, why in MUST_BE_EMPTY.items():
        print(f"   alert {alert}: must return nothing: {why}")
    print("   other alert expressions: the shipped condition is judged from the alert states seen "
          "during the run; the signal (threshold removed) must return data")

    # 1) everything that must return data: retry (bounded) while rates/recording rules fill in
    pending = {}
    for idx, it in enumerate(items):
        if it["kind"] == "alert" or exclusion(it):
            continue
        pending[idx] = it
    results = {}
    deadline = time.time() + a.timeout
    while True:
        for idx in list(pending):
            r = live.query(prom, pending[idx]["concrete"])
            results[idx] = r
            if r.get("status") == "success" and finite_values(r):
                pending.pop(idx)
        if not pending or time.time() > deadline:
            break
        time.sleep(1)
    print(f"== {len(items)} expressions from dashboards, rules, rule tests, datasources and compose/README.md")
    for idx, it in enumerate(items):
        name = f"[{it['kind']}] {it['source']}"
        why = exclusion(it)
        if it["kind"] == "alert":
            continue
        if why:
            r = live.query(prom, it["concrete"])
            c.check(r.get("status") == "success", f"{name} parses (data not required: {why})",
                    r.get("error", "") if r.get("status") != "success" else "")
            continue
        r = results[idx]
        if r.get("status") != "success":
            c.check(False, f"{name} parses and returns data", f"{r.get('error')}: {short(it['concrete'])}")
            continue
        vals = finite_values(r)
        n = live.result_len(r)
        c.check(bool(vals), f"{name} returns data",
                f"{n} series, {len(vals)} finite" if vals else
                f"{'no series' if not n else 'only NaN'}: {short(it['concrete'])}")

    # 2) alert expressions: parse; the signal (threshold removed) has data; must-be-empty ones are empty
    print("== alert expressions (shipped rules)")
    for it in items:
        if it["kind"] != "alert":
            continue
        alert = it["source"].rsplit("alert ", 1)[-1]
        expr = it["concrete"]
        r = live.query(prom, expr)
        if not c.check(r.get("status") == "success", f"{alert}: expression parses", r.get("error", "")):
            continue
        if expr.strip().startswith("absent("):
            inner = live.signal_expr(expr)
            ri = live.query(prom, inner)
            c.check(live.result_len(r) == 0 and bool(finite_values(ri)),
                    f"{alert}: absent() is empty because {short(inner, 60)} has data",
                    f"absent -> {live.result_len(r)} series, inner -> {live.result_len(ri)} series")
            continue
        sig = live.signal_expr(expr)
        rs = live.query(prom, sig)
        c.check(rs.get("status") == "success" and bool(finite_values(rs)),
                f"{alert}: its signal (threshold removed) returns data",
                f"{live.result_len(rs)} series" if finite_values(rs) else f"no data: {short(sig)}")
        if alert in MUST_BE_EMPTY:
            c.check(live.result_len(r) == 0, f"{alert}: condition false here ({MUST_BE_EMPTY[alert]})",
                    json.dumps(r.get("data", {}).get("result", []))[:300])
        if alert == "SockudoInstanceDown":
            down = {x["metric"].get("instance") for x in r["data"]["result"]}
            c.check(down == {a.dead}, "SockudoInstanceDown: exactly the dead target is down", f"down: {sorted(down)}")

    # 3) alerts seen by the watcher
    print("== alerts seen during the run (Prometheus /api/v1/alerts)")
    try:
        with open(a.alerts) as f:
            seen = json.load(f)
    except (OSError, ValueError):
        seen = {}
    shipped_alerts = [r["alert"] for p in glob.glob(os.path.join(RULES_DIR, "*.yml"))
                      for g in yaml.safe_load(open(p))["groups"] for r in g["rules"] if "alert" in r]
    early = []

    def since_start(entry, copy):
        """Only what was seen once the targets were scraped (a.since): before the first scrape
        absent(up{job="sockudo"}) is true for a moment, which is what its `for: 10m` is for."""
        out = {"states": [], "max_value": entry.get("max_value")}
        for state, (first, last) in entry.get("seen", {}).items():
            if last >= a.since:
                out["states"].append(state)
            else:
                early.append(f"{name} ({copy}) {state} before the first scrapes")
        return out if out["states"] else {}

    for name in shipped_alerts:
        lo = since_start(seen.get(f"{name}|lowered", {}), "lowered copy")
        sh = since_start(seen.get(f"{name}|shipped", {}), "shipped rule")
        desc = (f"lowered copy: {','.join(lo.get('states', [])) or 'inactive'}"
                f"{' max ' + format(lo['max_value'], '.4g') if lo.get('max_value') is not None else ''}; "
                f"shipped rule: {','.join(sh.get('states', [])) or 'inactive'}")
        if name in MUST_FIRE:
            c.check("firing" in lo.get("states", []), f"alert {name} fires under the driven condition", desc)
        if name in SHIPPED_MUST_PEND:
            c.check(bool({"pending", "firing"} & set(sh.get("states", []))),
                    f"alert {name}: the shipped threshold is crossed (shipped rule pending/firing)", desc)
        if name in MUST_BE_EMPTY:
            c.check(not lo and not sh, f"alert {name} never fires ({MUST_BE_EMPTY[name]})", desc)
        if name not in MUST_FIRE and name not in MUST_BE_EMPTY:
            print(f"   {name}: {desc} (no expectation)")
        elif name not in SHIPPED_MUST_PEND:
            print(f"   {name}: {desc}")
    # the alert values measure what was driven, not just something
    try:
        with open(a.traffic) as f:
            traffic = next(json.loads(l)["traffic"] for l in f if '"traffic"' in l)
    except (OSError, StopIteration, ValueError):
        traffic = {}
    crowd = traffic.get("crowd", 0)
    conn = seen.get("SockudoHighConnectionCount|lowered", {}).get("max_value") or 0
    c.check(crowd > 0 and conn >= crowd, "SockudoHighConnectionCount's value counts the crowd on node 2",
            f"max value {conn:g}, crowd {crowd} sockets")
    stall_ms = traffic.get("stall_seconds", 0) * 1000
    lat = seen.get("SockudoHighBroadcastLatency|lowered", {}).get("max_value") or 0
    c.check(stall_ms > 0 and lat >= stall_ms / 4, "SockudoHighBroadcastLatency's value reflects the stall of node 2",
            f"max p95 {lat:g} ms, stall {stall_ms:g} ms")
    for note in early:
        print(f"   note: {note} (ignored)")
    firing_now = live.query(prom, 'ALERTS{alertstate="firing", ops_live="lowered"}').get("data", {}).get("result", [])
    print(f"   ALERTS{{alertstate=\"firing\", ops_live=\"lowered\"}} now: "
          f"{sorted({x['metric']['alertname'] for x in firing_now})}")

    k8s = live.query(prom, 'up{job="sockudo-k8s"}').get("data", {}).get("result", [])
    c.check(bool(k8s) and k8s[0]["value"][1] == "1", "sockudo-k8s relabel rules turn the annotated pod port into the scrape address",
            str([x["metric"] for x in k8s]))
    summary(c.passed, c.failed)
    return 1 if c.failed else 0


# ------------------------------------------------------------------ logs (ELK)
def elk_fields():
    """Field names that compose/elk/* and the Kibana queries use, with where each comes from."""
    from test_assets import es_query_fields  # the same parser the static test uses
    used = {}

    def add(f, where):
        used.setdefault(f, set()).add(where)

    elk = os.path.join(REPO, "compose", "elk")
    fb_text = open(os.path.join(elk, "filebeat.yml")).read()
    for cond in re.findall(r"has_fields: \[([^\]]*)\]", fb_text):
        for f in re.findall(r"'([\w@.]+)'", cond):
            add(f, "filebeat.yml drop_event has_fields")
    fb = yaml.safe_load(fb_text)
    for inp in fb["filebeat.inputs"]:
        for f in (inp.get("fields") or {}):
            add(f, "filebeat.yml fields")
    code = re.sub(r"#.*", "", open(os.path.join(elk, "logstash.conf")).read())
    for f in set(re.findall(r"\[([\w@]+)\]", code)) - {"@metadata", "index"}:
        add(f, "logstash.conf")
    for f in re.findall(r'match\s*=>\s*\[\s*"([\w@.]+)"', code):
        add(f, "logstash.conf date match")
    for f in re.findall(r'target\s*=>\s*"([\w@.]+)"', code):
        add(f, "logstash.conf date target")
    tpl = json.load(open(os.path.join(elk, "sockudo-logs-template.json")))
    for f in tpl["template"]["mappings"]["properties"]:
        add(f, "sockudo-logs-template.json")
    md = open(os.path.join(elk, "kibana-queries.md")).read()
    for body in re.findall(r"```json\n(.*?)```", md, re.S):
        for f in es_query_fields(json.loads(body), set()):
            add(f, "kibana-queries.md query DSL")
    for q in re.findall(r"```kql\n(.*?)```", md, re.S):
        for f in re.findall(r"(?<![\w:])([@\w.]+)\s*:(?!:)", re.sub(r'"[^"]*"', '""', q)):
            add(f, "kibana-queries.md KQL")
    for row in re.findall(r"^\| `([^|]+)` \|", md, re.M):
        for f in re.findall(r"`?([@\w.]+)`?", row):
            add(f, "kibana-queries.md field table")
    return used


PIPELINE = {
    "service": "added by Filebeat (fields, fields_under_root)",
    "environment": "added by Filebeat (fields, fields_under_root)",
    "@timestamp": "set by Logstash's date filter from `timestamp`",
}


def logs(a):
    c = Checks()
    lines, bad = [], []
    for path in a.logs:
        with open(path) as f:
            for n, raw in enumerate(f, 1):
                raw = raw.strip()
                if not raw:
                    continue
                try:
                    d = json.loads(raw)
                    if not isinstance(d, dict):
                        raise ValueError("not an object")
                    lines.append((os.path.basename(path), d))
                except ValueError:
                    bad.append(f"{os.path.basename(path)}:{n}: {raw[:120]}")
    print(f"== {len(lines)} JSON log lines from {len(a.logs)} nodes")
    c.check(len(lines) > 100 and not bad, "every stdout line is one JSON object", "; ".join(bad[:3]))
    nested = [d for _, d in lines if any(isinstance(v, (dict, list)) for v in d.values())]
    c.check(not nested, "lines are flat (no nested objects: the ndjson parser puts every key at the root)",
            json.dumps(nested[:1]))

    used = elk_fields()
    print(f"   fields used by compose/elk/*: {', '.join(sorted(used))}")
    log_fields = sorted(f for f in used if f not in PIPELINE)
    for f in sorted(set(used) & set(PIPELINE)):
        print(f"   {f}: not in sockudo's lines, {PIPELINE[f]} ({', '.join(sorted(used[f]))})")
    c.check(set(log_fields) <= contract.LOG_FIELDS | {k for _, d in lines for k in d},
            "no ELK field outside the contract's log fields and the pipeline's", str(log_fields))
    for f in log_fields:
        n = sum(1 for _, d in lines if f in d)
        c.check(n > 0, f"field `{f}` appears in real log lines", f"{n} lines; used by {', '.join(sorted(used[f]))}")

    # per-field shape, as the mappings and queries expect
    req = ("level", "target", "timestamp")  # filebeat's drop_event keeps only lines with these
    miss = [d for _, d in lines if not all(k in d for k in req)]
    c.check(not miss, "every line has level, target and timestamp (else Filebeat's drop_event drops it)",
            json.dumps(miss[:1]))
    c.check(all(isinstance(d.get("message"), str) for _, d in lines), "every line has a top-level string `message`")
    badlvl = {d.get("level") for _, d in lines} - contract.LOG_LEVELS
    c.check(not badlvl, "`level` is one of ERROR/WARN/INFO/DEBUG/TRACE, upper case (keyword `term` queries)", str(badlvl))
    badts = []
    for _, d in lines:
        ts = str(d.get("timestamp", ""))
        try:
            if not re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$", ts):
                raise ValueError
            datetime.datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", ts.replace("Z", "+00:00")))
        except ValueError:
            badts.append(ts)
    c.check(not badts, "`timestamp` is ISO 8601 / RFC 3339 (Logstash date ISO8601, mapping type date)", str(badts[:3]))
    traced = [d for _, d in lines if "trace_id" in d]
    c.check(bool(traced) and all(re.fullmatch(r"[0-9a-f]{32}", d["trace_id"]) and
                                 re.fullmatch(r"[0-9a-f]{16}", str(d.get("span_id", ""))) for d in traced),
            "`trace_id` is 32 hex and `span_id` 16 hex on every line that has them", f"{len(traced)} lines")

    # the Kibana queries, run over the real lines
    print("== kibana-queries.md over the real lines")
    conn = [d for _, d in lines if "connection" in d["message"].lower() and d["level"] in ("INFO", "WARN")]
    c.check(bool(conn), 'Connection events (`message: *connection*`) match refused connections at INFO/WARN',
            f"{len(conn)} lines, e.g. {conn[0]['message']!r}" if conn else "none")
    auth = [d for _, d in lines if "authentication failed" in d["message"].lower()]
    c.check(bool(auth), 'Authentication failures (`match_phrase message "authentication failed"`) match',
            f"{len(auth)} lines, e.g. {auth[0]['message']!r} at {auth[0]['level']}" if auth else "none")
    by_trace = [(n, d) for n, d in lines if d.get("trace_id") == a.trace_id]
    c.check(bool(by_trace), f"Everything for one trace (`trace_id: {a.trace_id}`, sent as traceparent) matches",
            f"{len(by_trace)} lines on {sorted({n for n, _ in by_trace})}: "
            f"{sorted({d['message'] for _, d in by_trace})}" if by_trace else "none")
    adapter = [d for _, d in lines if str(d.get("target", "")).startswith("sockudo::adapter")]
    c.check(bool(adapter), "`target: sockudo::adapter*` (the module query) matches real targets",
            f"{len(adapter)} lines at {sorted({d['level'] for d in adapter})}")
    errors = [d for _, d in lines if d["level"] == "ERROR"]
    print(f"   Error logs (`level: ERROR`): {len(errors)} lines (none expected in a healthy run; not asserted)")
    summary(c.passed, c.failed)
    return 1 if c.failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("config")
    p.add_argument("--node1", required=True)
    p.add_argument("--node2", required=True)
    p.add_argument("--dead", required=True)
    p.add_argument("--prom-port", required=True)
    p.add_argument("--node-exporter", default="")
    p.add_argument("--out", required=True)
    p = sub.add_parser("watch")
    p.add_argument("--prom", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("wait")
    p.add_argument("--prom", required=True)
    p.add_argument("--timeout", type=float, default=40)
    p = sub.add_parser("eval")
    p.add_argument("--prom", required=True)
    p.add_argument("--alerts", required=True)
    p.add_argument("--dead", required=True)
    p.add_argument("--since", type=float, required=True, help="epoch seconds when the traffic started")
    p.add_argument("--traffic", default="", help="traffic.py's output (its JSON summary line)")
    p.add_argument("--node-exporter", action="store_true")
    p.add_argument("--timeout", type=float, default=30)
    p = sub.add_parser("logs")
    p.add_argument("--trace-id", required=True)
    p.add_argument("logs", nargs="+")
    a = ap.parse_args()
    if a.cmd == "config":
        make_config(a)
        return 0
    if a.cmd == "watch":
        return watch(a.prom, a.out)
    if a.cmd == "wait":
        return wait(a.prom, a.timeout)
    if a.cmd == "eval":
        return evaluate(a)
    return logs(a)


if __name__ == "__main__":
    sys.exit(main())
