#!/usr/bin/env python3
"""Helpers for live.sh.

  live.py config --url http://127.0.0.1:19601 --out DIR
      writes DIR/prometheus.yml (+ DIR/rules/): the shipped compose/prometheus/prometheus.yml with
      every static sockudo target replaced by the URL's address, the Kubernetes job turned into a
      static target carrying the pod meta labels (so the shipped relabel rules run for real),
      the other jobs and alerting dropped, and short scrape/evaluation intervals.
  live.py wait --prom http://127.0.0.1:PORT [--timeout 60]
      waits until the sockudo target has been scraped a few times and the rules have run.
  live.py eval --prom http://127.0.0.1:PORT [--strict]
      evaluates every extracted PromQL expression via /api/v1/query and reports which parse
      and which return data. Alert expressions are also evaluated without their threshold.
"""
import argparse
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import yaml  # noqa: E402

import promql  # noqa: E402

REPO = promql.REPO
SCRAPE = "1s"


# ---------------------------------------------------------------- config
def make_config(url, out):
    u = urllib.parse.urlparse(url)
    if not u.hostname or not u.port:
        sys.exit(f"SOCKUDO_METRICS_URL needs host and port: {url}")
    address = f"{u.hostname}:{u.port}"
    path = u.path if u.path not in ("", "/") else "/metrics"
    with open(os.path.join(REPO, "compose", "prometheus", "prometheus.yml")) as f:
        cfg = yaml.safe_load(f)
    jobs = []
    for j in cfg["scrape_configs"]:
        name = j["job_name"]
        if name == "sockudo":
            j["static_configs"] = [{"targets": [address], "labels": j["static_configs"][0].get("labels", {})}]
        elif name == "sockudo-k8s":
            j.pop("kubernetes_sd_configs")
            # a pod as Kubernetes SD would describe it: the pod IP with some container port, the
            # annotations saying which port to scrape. Only the shipped relabel rules can turn
            # this into the real address.
            j["static_configs"] = [{"targets": [f"{u.hostname}:1"], "labels": {
                "__meta_kubernetes_pod_label_app": "sockudo",
                "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
                "__meta_kubernetes_pod_annotation_prometheus_io_port": str(u.port),
                "__meta_kubernetes_pod_annotation_prometheus_io_path": path,
                "__meta_kubernetes_pod_name": "sockudo-0",
                "__meta_kubernetes_namespace": "sockudo-namespace",
            }}]
        else:
            continue  # sockudo-cluster, node, prometheus, alertmanager, otel-collector: not here
        j["metrics_path"] = path
        j["scrape_interval"] = SCRAPE
        j["scrape_timeout"] = SCRAPE
        jobs.append(j)
    cfg["scrape_configs"] = jobs
    cfg["global"]["scrape_interval"] = SCRAPE
    cfg["global"]["evaluation_interval"] = SCRAPE
    cfg.pop("alerting", None)
    os.makedirs(out, exist_ok=True)
    shutil.copytree(os.path.join(REPO, "compose", "prometheus", "rules"), os.path.join(out, "rules"), dirs_exist_ok=True)
    with open(os.path.join(out, "prometheus.yml"), "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    print(os.path.join(out, "prometheus.yml"))


# ---------------------------------------------------------------- HTTP API
def query(prom, expr):
    data = urllib.parse.urlencode({"query": expr}).encode()
    try:
        with urllib.request.urlopen(prom + "/api/v1/query", data=data, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        try:
            return json.load(e)
        except Exception:
            return {"status": "error", "error": f"HTTP {e.code}"}


def result_len(resp):
    if resp.get("status") != "success":
        return None
    d = resp["data"]
    if d["resultType"] in ("vector", "matrix"):
        return len(d["result"])
    return 1  # scalar / string


def wait(prom, timeout):
    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        r = query(prom, 'count_over_time(up{job="sockudo"}[1m])')
        n = result_len(r)
        if n:
            samples = float(r["data"]["result"][0]["value"][1])
            up = query(prom, 'up{job="sockudo"}')["data"]["result"]
            rec = result_len(query(prom, '{__name__=~"instance_app_id:.+"}'))
            last = f"{samples:.0f} scrapes, up={up[0]['value'][1] if up else '?'}, recorded series={rec}"
            if samples >= 5:
                time.sleep(2)  # one more rule evaluation
                print(f"scraped: {last}")
                return 0
        time.sleep(0.5)
    print(f"timed out waiting for scrapes ({last or 'no up{job=sockudo} yet'})", file=sys.stderr)
    return 1


# ---------------------------------------------------------------- evaluation
def split_top(expr, ops):
    """Split expr at the last top-level occurrence of one of ops (outside (), {}, [] and quotes)."""
    depth, quote, last = 0, None, None
    i = 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            for op in ops:
                if expr.startswith(op, i):
                    last = (i, op)
                    i += len(op) - 1
                    break
        i += 1
    if last is None:
        return None
    return expr[:last[0]].strip(), expr[last[0] + len(last[1]):].strip()


def signal_expr(expr):
    """An alert expression without its threshold: what must have data for the alert to be able to fire."""
    e = expr.strip()
    if e.startswith("absent(") and e.endswith(")"):
        return e[len("absent("):-1]
    parts = split_top(e, [" unless "])
    if parts:
        e = parts[0]
    parts = split_top(e, [">=", "<=", "==", "!=", ">", "<"])
    if parts:
        e = parts[0]
    return e


def evaluate(prom, strict):
    items = promql.extract(REPO)
    rows, parse_err, empty = [], [], []
    for it in items:
        expr = it["concrete"]
        node_only = it["metrics"] and all(m.startswith("node_") for m in it["metrics"])
        r = query(prom, expr)
        n = result_len(r)
        status = "parse-error" if n is None else ("data" if n else "empty")
        sig_status = ""
        if it["kind"] == "alert" and n is not None:
            sig = signal_expr(expr)
            sn = result_len(query(prom, sig))
            sig_status = "signal:" + ("data" if sn else ("parse-error" if sn is None else "empty"))
            if sn is None:
                status = "parse-error"
        if status == "parse-error":
            parse_err.append((it, r.get("error", "")))
        expected_data = not node_only
        has_data = (status == "data") if it["kind"] != "alert" else sig_status == "signal:data"
        if it["kind"] == "alert" and expr.strip().startswith("absent("):
            pass  # absent(x) is empty exactly when x has data; the signal shows x
        if expected_data and not has_data and status != "parse-error":
            empty.append(it)
        rows.append((status, sig_status, "no node target" if node_only else "", it["source"]))
    width = max(len(r[0]) for r in rows)
    for status, sig, note, source in rows:
        print(f"{status:<{width}}  {sig:<17} {note:<14} {source}")
    print()
    print(f"expressions: {len(items)}; parse OK: {len(items) - len(parse_err)}; "
          f"parse errors: {len(parse_err)}; without data (excluding node_exporter): {len(empty)}")
    for it, err in parse_err:
        print(f"  PARSE ERROR {it['source']}: {err}\n    {it['concrete']}")
    for it in empty:
        print(f"  NO DATA     {it['source']}\n    {it['concrete']}")
    k8s = query(prom, 'up{job="sockudo-k8s"}')
    k8s_rows = k8s.get("data", {}).get("result", [])
    k8s_ok = bool(k8s_rows) and k8s_rows[0]["value"][1] == "1"
    print(f"kubernetes relabel (annotated port -> __address__): {'OK' if k8s_ok else 'FAILED'} "
          f"{[r['metric'] for r in k8s_rows]}")
    if parse_err or not k8s_ok:
        return 1
    if strict and empty:
        return 1
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("config")
    c.add_argument("--url", required=True)
    c.add_argument("--out", required=True)
    w = sub.add_parser("wait")
    w.add_argument("--prom", required=True)
    w.add_argument("--timeout", type=float, default=60)
    e = sub.add_parser("eval")
    e.add_argument("--prom", required=True)
    e.add_argument("--strict", action="store_true")
    a = ap.parse_args()
    if a.cmd == "config":
        make_config(a.url, a.out)
        return 0
    if a.cmd == "wait":
        return wait(a.prom, a.timeout)
    return evaluate(a.prom, a.strict)


if __name__ == "__main__":
    sys.exit(main())
