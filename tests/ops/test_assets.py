#!/usr/bin/env python3
"""Static tests of the operations assets (no server, no Docker engine).

  python3 tests/ops/test_assets.py        # or: python3 -m unittest discover -s tests/ops -p 'test_*.py'

Needs PyYAML; uses promtool (Debian package `prometheus`) for PromQL parsing when present.
Prints `N passed, M failed[, K skipped]` as its last line.
"""
import fnmatch
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import yaml  # noqa: E402

import contract  # noqa: E402
import promql  # noqa: E402

REPO = os.path.abspath(os.path.join(HERE, "..", ".."))


def rp(*parts):
    return os.path.join(REPO, *parts)


def load_yaml(*parts):
    with open(rp(*parts)) as f:
        return yaml.safe_load(f)


COMPOSE = load_yaml("compose", "docker-compose.yml")
COMPOSE_DIR = rp("compose")
ALERT_RULES = load_yaml("compose", "prometheus", "rules", "sockudo.yml")
RECORDING_RULES = load_yaml("compose", "prometheus", "rules", "sockudo-recording.yml")
DASHBOARD_PATH = rp("grafana", "dashboards", "sockudo-overview.json")

SEED_ALERTS = [
    "SockudoHighConnectionCount", "SockudoConnectionDrops", "SockudoInstanceDown",
    "SockudoRateLimitTriggered", "SockudoHighAdapterLatency", "SockudoHighBroadcastLatency",
    "SockudoVeryHighBroadcastLatency",
]


def all_alert_rules():
    docs = [load_yaml(p) for p in sorted(glob.glob(rp("compose", "prometheus", "rules", "*.yml")))]
    return [r for d in docs for g in d["groups"] for r in g["rules"] if "alert" in r]


def all_record_names():
    docs = [load_yaml(p) for p in sorted(glob.glob(rp("compose", "prometheus", "rules", "*.yml")))]
    return {r["record"] for d in docs for g in d["groups"] for r in g["rules"] if "record" in r}


def dashboard_panels(dash):
    return list(promql._dashboard_panels(dash.get("panels")))


# ============================================================================ compose
class TestCompose(unittest.TestCase):
    def services(self):
        return COMPOSE["services"]

    def test_no_version_key(self):
        self.assertNotIn("version", COMPOSE)

    def test_required_services(self):
        names = set(self.services())
        for s in ["sockudo", "redis", "prometheus", "alertmanager", "grafana", "otel-collector", "node-exporter"]:
            self.assertIn(s, names)
        self.assertTrue({"jaeger", "tempo"} & names, "a Jaeger or Tempo service")
        self.assertIn("opentelemetry-collector-contrib", self.services()["otel-collector"]["image"])

    def test_sockudo_service(self):
        s = self.services()["sockudo"]
        self.assertEqual(os.path.normpath(os.path.join(COMPOSE_DIR, s["build"]["context"])), REPO)
        self.assertEqual(s["build"].get("dockerfile", "Dockerfile"), "Dockerfile")
        env = s["environment"]
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        want = {
            "METRICS_ENABLED": "true", "LOG_FORMAT": "json",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector:4317",
            "ADAPTER_DRIVER": "redis", "REDIS_URL": "redis://redis:6379",
        }
        for k, v in want.items():
            self.assertEqual(str(env.get(k)), v, k)
        self.assertIn("127.0.0.1:6001/up", " ".join(s["healthcheck"]["test"]))

    def test_healthchecks(self):
        # The collector image has no shell/curl/wget (documented in the compose file).
        for name, s in self.services().items():
            if name == "otel-collector":
                continue
            self.assertIn("healthcheck", s, name)
            self.assertFalse(s["healthcheck"].get("disable"), name)

    def test_named_volumes_declared(self):
        declared = set((COMPOSE.get("volumes") or {}).keys())
        self.assertTrue(declared)
        for name, s in self.services().items():
            for v in s.get("volumes", []):
                src = v.split(":")[0] if isinstance(v, str) else v.get("source")
                if src and not src.startswith((".", "/", "~")):
                    self.assertIn(src, declared, f"{name}: volume {src}")

    def test_every_referenced_path_exists(self):
        refs = []
        for name, s in self.services().items():
            b = s.get("build")
            if b:
                ctx = b if isinstance(b, str) else b.get("context", ".")
                refs.append((name, ctx))
                if isinstance(b, dict) and b.get("dockerfile"):
                    refs.append((name, os.path.join(ctx, b["dockerfile"])))
            for v in s.get("volumes", []):
                src = v.split(":")[0] if isinstance(v, str) else v.get("source")
                if src and src.startswith("."):
                    refs.append((name, src))
            for ef in s.get("env_file", []) if isinstance(s.get("env_file"), list) else ([s["env_file"]] if s.get("env_file") else []):
                refs.append((name, ef))
        for name, sec in (COMPOSE.get("secrets") or {}).items():
            if "file" in sec:
                refs.append((f"secret {name}", sec["file"]))
        self.assertGreater(len(refs), 10)
        for who, path in refs:
            full = os.path.normpath(os.path.join(COMPOSE_DIR, path))
            self.assertTrue(full.startswith(REPO), f"{who}: {path} leaves the repo")
            self.assertTrue(os.path.exists(full), f"{who}: {path} does not exist")

    def test_grafana_mounts(self):
        vols = self.services()["grafana"]["volumes"]
        self.assertIn("../grafana/dashboards:/var/lib/grafana/dashboards:ro", vols)
        self.assertIn("../grafana/provisioning:/etc/grafana/provisioning:ro", vols)

    def test_service_secrets_declared(self):
        declared = set((COMPOSE.get("secrets") or {}).keys())
        for name, s in self.services().items():
            for sec in s.get("secrets", []):
                self.assertIn(sec if isinstance(sec, str) else sec["source"], declared)


# ============================================================================ Dockerfile
class TestDockerfile(unittest.TestCase):
    text = open(rp("Dockerfile")).read()

    def test_stages(self):
        froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", self.text, re.M | re.I)
        self.assertEqual(froms[0][0], "rust:1-bookworm")
        self.assertTrue(froms[0][1], "builder stage is named")
        self.assertEqual(froms[-1][0], "debian:bookworm-slim")
        self.assertIn("cargo build --release --locked", self.text)
        self.assertRegex(self.text, r"COPY --from=%s " % re.escape(froms[0][1]))

    def test_runtime(self):
        runtime = self.text.split("FROM debian:bookworm-slim", 1)[1]
        user = re.findall(r"^USER\s+(\S+)", runtime, re.M)
        self.assertTrue(user)
        self.assertNotIn(user[-1].split(":")[0], ("root", "0"))
        self.assertRegex(runtime, re.compile(r"^EXPOSE\s+6001\s+9601\s*$", re.M))
        hc = re.search(r"^HEALTHCHECK.*?CMD\s+(.*)$", runtime, re.M | re.S)
        self.assertTrue(hc)
        self.assertIn("http://127.0.0.1:6001/up", hc.group(1))
        tool = "curl" if "curl" in hc.group(1) else "wget"
        self.assertRegex(runtime, r"apt-get install[^\n]*\b%s\b" % tool, "health check tool is installed")

    def test_dockerignore_keeps_build_inputs(self):
        pats = [l.strip() for l in open(rp(".dockerignore")) if l.strip() and not l.startswith("#")]

        def ignored(path):
            for p in pats:
                p = p.rstrip("/")
                if fnmatch.fnmatch(path, p) or path.startswith(p + "/") or fnmatch.fnmatch(path, p + "/*"):
                    return True
                if p.startswith("**/") and (fnmatch.fnmatch(path, p[3:]) or fnmatch.fnmatch(os.path.basename(path), p[3:])
                                            or ("/" + p[3:] + "/") in ("/" + path + "/")):
                    return True
            return False
        for must in ["Cargo.toml", "Cargo.lock", "src/main.rs", "src/lib.rs", "config/sockudo.json"]:
            self.assertFalse(ignored(must), must)
        for gone in ["target", ".git", "target/debug/sockudo"]:
            self.assertTrue(ignored(gone), gone)


# ============================================================================ Prometheus config
def prom_relabel(rule, labels):
    """Prometheus `replace`/`keep` relabel semantics for one rule (enough for this config)."""
    action = rule.get("action", "replace")
    sep = rule.get("separator", ";")
    val = sep.join(labels.get(s, "") for s in rule.get("source_labels", []))
    regex = re.compile("^(?:%s)$" % str(rule.get("regex", "(.*)")))
    m = regex.match(val)
    if action == "keep":
        return labels if m else None
    if action == "replace":
        if m:
            repl = str(rule.get("replacement", "$1"))
            out = re.sub(r"\$(\d+)", lambda g: m.group(int(g.group(1))) or "", repl)
            labels = dict(labels)
            labels[rule["target_label"]] = out
        return labels
    raise NotImplementedError(action)


class TestPrometheusConfig(unittest.TestCase):
    cfg = load_yaml("compose", "prometheus", "prometheus.yml")

    def jobs(self):
        return {j["job_name"]: j for j in self.cfg["scrape_configs"]}

    def test_jobs(self):
        jobs = self.jobs()
        self.assertEqual(jobs["sockudo"]["static_configs"][0]["targets"], ["sockudo:9601"])
        self.assertEqual(jobs["sockudo"]["static_configs"][0]["labels"]["instance"], "sockudo-1")
        self.assertEqual(len(jobs["sockudo-cluster"]["static_configs"][0]["targets"]), 2)
        self.assertIn("kubernetes_sd_configs", jobs["sockudo-k8s"])

    def test_targets_are_compose_services(self):
        services = set(COMPOSE["services"])
        for j in self.cfg["scrape_configs"]:
            for sc in j.get("static_configs", []):
                for t in sc["targets"]:
                    host = t.rsplit(":", 1)[0]
                    if host != "localhost":
                        self.assertIn(host, services, f"{j['job_name']}: {t}")
        for am in self.cfg["alerting"]["alertmanagers"]:
            for sc in am["static_configs"]:
                for t in sc["targets"]:
                    self.assertIn(t.rsplit(":", 1)[0], services)

    def test_rule_files_resolve(self):
        found = []
        for pat in self.cfg["rule_files"]:
            found += glob.glob(os.path.join(rp("compose", "prometheus"), pat))
        self.assertEqual(sorted(map(os.path.basename, found)), ["sockudo-recording.yml", "sockudo.yml"])
        mounts = COMPOSE["services"]["prometheus"]["volumes"]
        self.assertIn("./prometheus/rules:/etc/prometheus/rules:ro", mounts)

    def test_k8s_relabel_fixed(self):
        relabel = self.jobs()["sockudo-k8s"]["relabel_configs"]
        addr_rules = [r for r in relabel if r.get("target_label") == "__address__"]
        self.assertEqual(addr_rules[0]["source_labels"],
                         ["__address__", "__meta_kubernetes_pod_annotation_prometheus_io_port"])
        pod = {
            "__address__": "10.1.2.3:8080",
            "__meta_kubernetes_pod_label_app": "sockudo",
            "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
            "__meta_kubernetes_pod_annotation_prometheus_io_port": "9601",
            "__meta_kubernetes_pod_name": "sockudo-0",
            "__meta_kubernetes_namespace": "sockudo-namespace",
        }
        labels = dict(pod)
        for r in relabel:
            labels = prom_relabel(r, labels)
            self.assertIsNotNone(labels)
        self.assertEqual(labels["__address__"], "10.1.2.3:9601")
        self.assertEqual(labels["instance"], "sockudo-0")
        # a pod without the annotation or label is dropped
        other = dict(pod, __meta_kubernetes_pod_label_app="redis")
        self.assertIsNone(prom_relabel(relabel[0], other))
        # the seed's rule (one source label, two-value regex) leaves the address unchanged
        seed = dict(addr_rules[0], source_labels=["__meta_kubernetes_pod_annotation_prometheus_io_port"])
        self.assertEqual(prom_relabel(seed, dict(pod))["__address__"], "10.1.2.3:8080")


# ============================================================================ rules
def result_labels(expr):
    """Labels an alert expression's result can carry (heuristic, see the promtool tests for truth)."""
    labels = set()
    for grp in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        labels |= {x.strip() for x in grp.split(",") if x.strip()}
    labels.discard("le")
    m = re.match(r"\s*absent\((\w+)\{([^}]*)\}\)", expr)
    if m:
        labels |= set(re.findall(r'(\w+)\s*="', m.group(2)))
    if not re.search(r"\b(sum|max|min|avg|count)\b\s*(by|without)?\s*\(", expr) and not m:
        labels |= {"job", "instance"}
        for name in promql.metric_names(expr):
            labels |= set(contract.series_names().get(name, []))
    return labels


class TestRules(unittest.TestCase):
    def test_seed_alerts_present(self):
        names = [r["alert"] for r in all_alert_rules()]
        for a in SEED_ALERTS:
            self.assertIn(a, names)
        self.assertEqual(len(names), len(set(names)), "alert names are unique")

    def test_extra_alerts_present(self):
        exprs = [str(r["expr"]) for r in all_alert_rules()]
        def has(pattern):
            return any(re.search(pattern, e) for e in exprs)
        self.assertTrue(has(r"sockudo_horizontal_adapter_connected\).*==\s*0"))
        self.assertTrue(has(r"sockudo_horizontal_adapter_uncomplete_promises"))
        self.assertTrue(has(r'error_type="slow_consumer"'))
        self.assertTrue(has(r'sockudo_webhooks_total\{outcome=~"failed\|dropped"\}'))
        self.assertTrue(has(r'absent\(up\{job="sockudo"\}\)') or has(r"absent\(sockudo_build_info"))

    def test_alert_shape(self):
        for r in all_alert_rules():
            self.assertIn(r["labels"]["severity"], ("warning", "critical"), r["alert"])
            self.assertIn("summary", r["annotations"])
            self.assertIn("description", r["annotations"])

    def test_annotation_labels_exist_in_result(self):
        for r in all_alert_rules():
            used = set()
            for text in r["annotations"].values():
                used |= set(re.findall(r"\$labels\.(\w+)", text))
            have = result_labels(str(r["expr"]))
            self.assertTrue(used <= have, f"{r['alert']}: annotations use {used - have} not in the result {have}")

    def test_alert_and_record_groups_are_separate(self):
        self.assertTrue(all("alert" in r for g in ALERT_RULES["groups"] for r in g["rules"]))
        self.assertTrue(all("record" in r for g in RECORDING_RULES["groups"] for r in g["rules"]))

    def test_recording_rule_names(self):
        names = all_record_names()
        self.assertIn("sockudo:broadcast_latency_ms:p95", names)
        for n in names:
            self.assertRegex(n, r"^[a-z_]+:[a-z0-9_]+:[a-z0-9_]+$", "level:metric:operations")

    def test_every_alert_has_firing_and_silent_unit_test(self):
        fire, silent = set(), set()
        for path in glob.glob(rp("compose", "prometheus", "tests", "*.yml")):
            doc = load_yaml(path)
            for t in doc.get("tests", []):
                for a in t.get("alert_rule_test", []) or []:
                    (fire if a.get("exp_alerts") else silent).add(a["alertname"])
        for r in all_alert_rules():
            self.assertIn(r["alert"], fire, f"{r['alert']}: no test where it fires")
            self.assertIn(r["alert"], silent, f"{r['alert']}: no test where it must not fire")

    def test_firing_tests_check_annotations(self):
        for path in glob.glob(rp("compose", "prometheus", "tests", "*.yml")):
            for t in load_yaml(path).get("tests", []):
                for a in t.get("alert_rule_test", []) or []:
                    for e in a.get("exp_alerts") or []:
                        self.assertTrue(e.get("exp_labels"), a["alertname"])
                        self.assertTrue(e.get("exp_annotations"), a["alertname"])


# ============================================================================ PromQL
EXPRS = promql.extract(REPO)
KNOWN = set(contract.series_names())
STANDARD_EXACT = {"up", "ALERTS", "ALERTS_FOR_STATE"}


def known_metric(name, records):
    return (name in KNOWN or name in STANDARD_EXACT or name in records
            or name.startswith("node_") or name.startswith("process_"))


def counter_like(name, records):
    if name in records:
        return False
    typ = contract.METRICS.get(name, (None,))[0]
    if typ == "counter":
        return True
    if name.endswith(("_bucket", "_sum", "_count")) and contract.METRICS.get(name.rsplit("_", 1)[0], (None,))[0] == "histogram":
        return True
    return name.startswith(("node_", "process_")) and name.endswith("_total")


class TestPromQL(unittest.TestCase):
    def test_extractor_finds_every_source(self):
        kinds = {e["kind"] for e in EXPRS}
        for k in ("dashboard", "dashboard-variable", "alert", "record", "readme", "rule-test"):
            self.assertIn(k, kinds)
        self.assertGreater(len(EXPRS), 80)
        out = subprocess.run([sys.executable, os.path.join(HERE, "promql.py")], capture_output=True, text=True, check=True)
        lines = [json.loads(l) for l in out.stdout.splitlines()]
        self.assertEqual(len(lines), len(EXPRS))
        self.assertTrue(all({"source", "kind", "expr", "metrics"} <= set(l) for l in lines))

    def test_metric_names_known(self):
        records = all_record_names()
        for e in EXPRS:
            self.assertTrue(e["metrics"], f"{e['source']}: no metric in {e['expr']!r}")
            for m in e["metrics"]:
                self.assertTrue(known_metric(m, records), f"{e['source']}: unknown metric {m} in {e['expr']!r}")

    def test_rate_only_over_counters(self):
        records = all_record_names()
        for e in EXPRS:
            for fn, name in re.findall(r"\b(rate|irate|increase)\(\s*([A-Za-z_:][\w:]*)", e["concrete"]):
                self.assertTrue(counter_like(name, records), f"{e['source']}: {fn}() over non-counter {name}")

    def test_histogram_quantile_aggregates_by_le(self):
        for e in EXPRS:
            for m in re.finditer(r"histogram_quantile\(\s*[0-9.]+\s*,\s*(\w+)", e["concrete"]):
                self.assertIn(m.group(1), ("sum",), f"{e['source']}: histogram_quantile over an unaggregated rate")
                rest = e["concrete"][m.end():]
                self.assertRegex(rest, r"^\s*by\s*\(\s*le\b", f"{e['source']}: sum by (le, ...) first")

    def test_no_by_without_aggregation(self):
        for e in EXPRS:
            for m in re.finditer(r"(\S+)\s+by\s*\(", e["concrete"]):
                self.assertRegex(m.group(1), r"(sum|min|max|avg|count|group|stddev|stdvar|topk|bottomk|quantile|count_values)$",
                                 f"{e['source']}: `by` after {m.group(1)!r}")

    def test_promtool_parses_every_expression(self):
        if not shutil.which("promtool"):
            self.skipTest("promtool not installed")
        rules = [{"record": f"ops_check:expr_{i}:parse", "expr": e["concrete"]} for i, e in enumerate(EXPRS)]
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "exprs.yml")
            with open(path, "w") as f:
                yaml.safe_dump({"groups": [{"name": "ops_check", "rules": rules}]}, f)
            r = subprocess.run(["promtool", "check", "rules", path], capture_output=True, text=True)
            if r.returncode != 0:
                bad = []
                for i, e in enumerate(EXPRS):
                    with open(path, "w") as f:
                        yaml.safe_dump({"groups": [{"name": "one", "rules": [rules[i]]}]}, f)
                    if subprocess.run(["promtool", "check", "rules", path], capture_output=True).returncode:
                        bad.append(f"{e['source']}: {e['concrete']}")
                self.fail("promtool rejects:\n  " + "\n  ".join(bad) + "\n" + r.stdout + r.stderr)

    def test_promtool_check_is_discriminating(self):
        # The seed's invalid forms are rejected by the same check.
        if not shutil.which("promtool"):
            self.skipTest("promtool not installed")
        with tempfile.TemporaryDirectory() as d:
            for bad in ["sockudo_connected by (app_id)",
                        "histogram_quantile(0.95, rate(sockudo_broadcast_latency_ms_bucket[5m])) by (recipient_count_bucket)"]:
                path = os.path.join(d, "bad.yml")
                with open(path, "w") as f:
                    yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "a:b:c", "expr": bad}]}]}, f)
                self.assertNotEqual(subprocess.run(["promtool", "check", "rules", path], capture_output=True).returncode, 0, bad)

    def test_readme_has_corrected_seed_forms(self):
        readme = [e["expr"] for e in EXPRS if e["kind"] == "readme"]
        self.assertIn("sum by (app_id) (sockudo_connected)", readme)
        self.assertIn("histogram_quantile(0.95, sum by (le, recipient_count_bucket) "
                      "(rate(sockudo_broadcast_latency_ms_bucket[5m])))", readme)


# ============================================================================ dashboard
class TestDashboard(unittest.TestCase):
    dash = json.load(open(DASHBOARD_PATH))
    ds = load_yaml("grafana", "provisioning", "datasources", "datasources.yml")

    def ds_uids(self):
        return {d["uid"]: d for d in self.ds["datasources"]}

    def test_datasources(self):
        uids = self.ds_uids()
        self.assertEqual(uids["prometheus"]["type"], "prometheus")
        self.assertIn(uids["traces"]["type"], ("jaeger", "tempo"))
        services = set(COMPOSE["services"])
        for d in uids.values():
            self.assertIn(re.match(r"https?://([^:/]+)", d["url"]).group(1), services)
        # No exemplars exist (README, "Exemplars"): the datasource must not promise them.
        self.assertNotIn("exemplarTraceIdDestinations", uids["prometheus"].get("jsonData", {}))

    def test_dashboard_provider(self):
        prov = load_yaml("grafana", "provisioning", "dashboards", "sockudo.yml")
        self.assertEqual(prov["providers"][0]["options"]["path"], "/var/lib/grafana/dashboards")

    def test_generated_file_is_current(self):
        r = subprocess.run([sys.executable, rp("grafana", "build_dashboard.py"), "--check"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_shape(self):
        self.assertGreaterEqual(self.dash["schemaVersion"], 36)
        self.assertTrue(self.dash["uid"])
        panels = dashboard_panels(self.dash)
        ids = [p["id"] for p in panels]
        self.assertEqual(len(ids), len(set(ids)), "unique panel ids")
        for p in panels:
            self.assertIn(p["type"], ("row", "timeseries", "stat", "heatmap", "table", "gauge", "bargauge", "text"))
            self.assertIn("gridPos", p)
            self.assertNotEqual(p["type"], "graph", "graph panels are deprecated")

    def test_datasource_uids_defined(self):
        uids = set(self.ds_uids()) | {"-- Grafana --"}
        for p in dashboard_panels(self.dash):
            if p["type"] == "row":
                continue
            self.assertIn(p["datasource"]["uid"], uids, p["title"])
            for t in p["targets"]:
                self.assertIn(t["datasource"]["uid"], uids, p["title"])
        for v in self.dash["templating"]["list"]:
            self.assertIn(v["datasource"]["uid"], uids)
        for a in self.dash["annotations"]["list"]:
            self.assertIn(a["datasource"]["uid"], uids)

    def test_variables(self):
        vars_ = {v["name"]: v for v in self.dash["templating"]["list"]}
        for name in ("instance", "app_id"):
            self.assertIn(name, vars_)
            self.assertTrue(vars_[name]["query"].startswith("label_values("))
            self.assertTrue(vars_[name]["includeAll"])

    def test_selectors_use_variables(self):
        # Every selector of a sockudo/process/recorded metric filters by $instance, and by $app_id
        # when the metric has app_id; node_* selectors filter by $node.
        records = all_record_names()
        for p in dashboard_panels(self.dash):
            for t in p.get("targets", []):
                expr = t["expr"]
                names = promql.metric_names(promql.concrete(expr))
                self.assertTrue(names)
                for name in names:
                    occurrences = list(re.finditer(r"(?<![\w:])%s(?![\w:])(\{[^}]*\})?" % re.escape(name), expr))
                    self.assertTrue(occurrences, name)
                    for m in occurrences:
                        sel = m.group(1) or ""
                        where = f"{p['title']!r}: {name}{sel}"
                        if name.startswith("node_"):
                            self.assertIn('instance=~"$node"', sel, where)
                            continue
                        self.assertIn('instance=~"$instance"', sel, where)
                        with_app = contract.has_app_id(name) or (name in records and "app_id" in name.split(":")[0])
                        if with_app:
                            self.assertIn('app_id=~"$app_id"', sel, where)

    def test_seed_panels_present(self):
        titles = {p["title"] for p in dashboard_panels(self.dash)}
        for t in ["Active Connections", "Connection rate", "Connections by app", "Message Rate",
                  "WebSocket bytes", "HTTP API calls", "HTTP API bytes", "Active channels by channel_type",
                  "Subscription rate", "Rate limit triggers", "Horizontal adapter resolve time",
                  "Horizontal adapter operations", "Broadcast latency by recipient count (p50 / p95 / p99)",
                  "Average broadcast latency by channel type", "Broadcast latency distribution",
                  "Broadcast p95 by size category"]:
            self.assertIn(t, titles)

    def test_corrected_seed_queries(self):
        exprs = [t["expr"] for p in dashboard_panels(self.dash) for t in p.get("targets", [])]
        joined = "\n".join(exprs)
        self.assertTrue('sum by (app_id) (sockudo_connected{' in joined, "connections by app: sum by (app_id) (...)")
        self.assertRegex(joined, r"histogram_quantile\(0\.95, sum by \(le, recipient_count_bucket\) \(rate\(sockudo_broadcast_latency_ms_bucket\{")
        self.assertRegex(joined, r"sum by \(channel_type\) \(rate\(sockudo_broadcast_latency_ms_sum\{[^}]*\}\[\$__rate_interval\]\)\) "
                                 r"/ sum by \(channel_type\) \(rate\(sockudo_broadcast_latency_ms_count\{")

    def test_every_contract_metric_is_charted(self):
        used = set()
        for p in dashboard_panels(self.dash):
            for t in p.get("targets", []):
                used |= promql.metric_names(promql.concrete(t["expr"]))
        for name, (typ, _) in contract.METRICS.items():
            series = {name + "_bucket", name + "_sum", name + "_count"} if typ == "histogram" else {name}
            self.assertTrue(series & used, f"{name} is on no panel")

    def test_broadcast_panel_links_to_traces(self):
        p = next(p for p in dashboard_panels(self.dash) if p["title"].startswith("Broadcast latency by recipient count"))
        links = p["fieldConfig"]["defaults"]["links"] + p.get("links", [])
        self.assertTrue(links)
        for l in links:
            url = l["url"]
            self.assertTrue(url.startswith("/explore?"))
            from urllib.parse import unquote
            self.assertIn('"datasource":"traces"', unquote(url))
            self.assertIn('"operation":"broadcast"', unquote(url))
        self.assertFalse(any(t.get("exemplar") for t in p["targets"]), "no exemplars to show")

    def test_no_shipped_asset_promises_exemplars(self):
        # opentelemetry_sdk 0.33 records no exemplars (every data point's list is empty;
        # open-telemetry/opentelemetry-rust#3369), so no dashboard, compose flag, datasource or
        # collector config may claim them; only the README says why.
        roots = ["compose", "grafana", "otel", "config", "deploy", "docs"]
        offenders = []
        for root in roots:
            for dirpath, _, files in os.walk(os.path.join(REPO, root)):
                for f in files:
                    path = os.path.join(dirpath, f)
                    try:
                        text = open(path, encoding="utf-8").read()
                    except (UnicodeDecodeError, OSError):
                        continue
                    for line in text.splitlines():
                        if "exemplar" in line.lower() and "no exemplars" not in line.lower():
                            offenders.append(f"{os.path.relpath(path, REPO)}: {line.strip()}")
        self.assertEqual(offenders, [])


# ============================================================================ Alertmanager
class TestAlertmanager(unittest.TestCase):
    cfg = load_yaml("compose", "alertmanager", "alertmanager.yml")
    raw = open(rp("compose", "alertmanager", "alertmanager.yml")).read()

    def test_grouping(self):
        self.assertEqual(set(self.cfg["route"]["group_by"]), {"alertname", "instance"})

    def test_instance_down_inhibits_all_other_sockudo_alerts(self):
        def matches(matchers, labels):
            for m in matchers:
                k, op, v = re.match(r'\s*(\w+)\s*(=~|!~|!=|=)\s*"(.*)"\s*$', m).groups()
                val = labels.get(k, "")
                ok = {"=": val == v, "!=": val != v,
                      "=~": re.fullmatch(v, val) is not None, "!~": re.fullmatch(v, val) is None}[op]
                if not ok:
                    return False
            return True
        rule = next(r for r in self.cfg["inhibit_rules"]
                    if matches(r["source_matchers"], {"alertname": "SockudoInstanceDown"}))
        self.assertEqual(rule["equal"], ["instance"])
        for a in all_alert_rules():
            target = matches(rule["target_matchers"], {"alertname": a["alert"]})
            self.assertEqual(target, a["alert"] != "SockudoInstanceDown", a["alert"])

    def test_receivers_email_and_slack_with_secret_files(self):
        recv = {r["name"]: r for r in self.cfg["receivers"]}
        self.assertIn("web.hook", recv)
        for r in recv.values():
            self.assertTrue(r.get("email_configs") and r.get("slack_configs"), r["name"])
            for s in r["slack_configs"]:
                self.assertIn("api_url_file", s)
                self.assertNotIn("api_url", s)
        self.assertIn("smtp_auth_password_file", self.cfg["global"])
        for literal in ("smtp_auth_password:", "api_url:", "auth_password:", "hooks.slack.com"):
            self.assertNotIn(literal, self.raw)

    def test_secret_files_are_mounted(self):
        am = COMPOSE["services"]["alertmanager"]
        mounted = {f"/run/secrets/{s}" for s in am["secrets"]}
        paths = [self.cfg["global"]["smtp_auth_password_file"]]
        paths += [s["api_url_file"] for r in self.cfg["receivers"] for s in r.get("slack_configs", [])]
        for p in paths:
            self.assertIn(p, mounted)


# ============================================================================ OpenTelemetry collector
KNOWN_COMPONENTS = {
    "receivers": {"otlp", "prometheus", "hostmetrics", "filelog"},
    "processors": {"batch", "memory_limiter", "resource", "attributes", "filter", "transform", "resourcedetection",
                   "tail_sampling"},
    "exporters": {"otlp", "otlphttp", "prometheusremotewrite", "prometheus", "debug", "elasticsearch", "loki"},
    "extensions": {"health_check", "pprof", "zpages", "basicauth", "bearertokenauth"},
}


class TestOtelCollector(unittest.TestCase):
    def check_structure(self, path):
        cfg = load_yaml(path)
        svc = cfg["service"]
        for kind in ("receivers", "processors", "exporters", "extensions"):
            for name in cfg.get(kind, {}) or {}:
                self.assertIn(name.split("/")[0], KNOWN_COMPONENTS[kind], f"{path}: {kind} {name}")
        for ext in svc.get("extensions", []):
            self.assertIn(ext, cfg.get("extensions", {}))
        self.assertEqual(set(svc["pipelines"]), {"traces", "metrics", "logs"})
        used = {"receivers": set(), "processors": set(), "exporters": set()}
        for pname, p in svc["pipelines"].items():
            for kind in used:
                for name in p.get(kind, []):
                    self.assertIn(name, cfg.get(kind, {}) or {}, f"{path}: pipeline {pname} uses undefined {kind[:-1]} {name}")
                    used[kind].add(name)
            self.assertTrue(p["receivers"] and p["exporters"], pname)
            self.assertEqual(p["processors"][0], "memory_limiter", f"{pname}: memory_limiter first")
            self.assertIn("batch", p["processors"])
        for kind, names in used.items():
            self.assertEqual(names, set(cfg.get(kind, {})), f"{path}: unused {kind}")
        proto = cfg["receivers"]["otlp"]["protocols"]
        self.assertTrue(proto["grpc"]["endpoint"].endswith(":4317"))
        self.assertTrue(proto["http"]["endpoint"].endswith(":4318"))
        return cfg

    def test_collector(self):
        cfg = self.check_structure(rp("otel", "collector.yaml"))
        pipes = cfg["service"]["pipelines"]
        services = set(COMPOSE["services"])
        (trace_exp,) = pipes["traces"]["exporters"]
        self.assertEqual(trace_exp.split("/")[0], "otlp")
        self.assertIn(cfg["exporters"][trace_exp]["endpoint"].split(":")[0], services)
        self.assertIn("prometheusremotewrite", pipes["metrics"]["exporters"])
        self.assertEqual(cfg["exporters"]["prometheusremotewrite"]["endpoint"], "http://prometheus:9090/api/v1/write")
        self.assertIn("--web.enable-remote-write-receiver", COMPOSE["services"]["prometheus"]["command"])
        self.assertIn("debug", pipes["logs"]["exporters"])
        mounts = COMPOSE["services"]["otel-collector"]["volumes"]
        self.assertIn("../otel/collector.yaml:/etc/otelcol-contrib/config.yaml:ro", mounts)

    def test_vendor_collector(self):
        cfg = self.check_structure(rp("otel", "collector-vendor.yaml"))
        for p in cfg["service"]["pipelines"].values():
            for e in p["exporters"]:
                self.assertEqual(e.split("/")[0], "otlphttp")
                exp = cfg["exporters"][e]
                self.assertEqual(exp["endpoint"], "${env:OTEL_VENDOR_ENDPOINT}")
                self.assertTrue(any("${env:OTEL_VENDOR_API_KEY}" in str(v) for v in exp["headers"].values()))

    def test_tail_sampling_collector(self):
        """Tail sampling on errors and latency, on attributes the server really sets on the
        spans it really makes (tests/it/telemetry.rs and cluster.rs assert those attributes)."""
        path = rp("otel", "collector-tail-sampling.yaml")
        cfg = self.check_structure(path)
        traces = cfg["service"]["pipelines"]["traces"]["processors"]
        self.assertEqual(traces, ["memory_limiter", "tail_sampling", "batch"], "sample before batching")
        policies = {p["name"]: p for p in cfg["processors"]["tail_sampling"]["policies"]}
        self.assertEqual(policies["errors"]["status_code"]["status_codes"], ["ERROR"])
        self.assertGreater(policies["slow"]["latency"]["threshold_ms"], 0)
        self.assertIn('attributes["sockudo.last_write_ms"]', policies["slow-fan-out"]["ottl_condition"]["span"][0])
        self.assertEqual(policies["big-fan-out"]["numeric_attribute"]["key"], "sockudo.recipients")
        self.assertEqual(policies["webhook-retry"]["numeric_attribute"]["key"], "sockudo.webhook.attempt")
        self.assertLess(policies["baseline"]["probabilistic"]["sampling_percentage"], 100)
        src = open(rp("src", "adapter", "mod.rs")).read() + open(rp("src", "channels", "socket.rs")).read()
        for attr in ("sockudo.last_write_ms", "sockudo.recipients"):
            self.assertIn(attr, src, f"{attr}: the server sets it")
        self.assertIn("sockudo.webhook.attempt", open(rp("src", "webhooks", "sender.rs")).read())
        known = {p["type"] for p in policies.values()}
        self.assertLessEqual(known, {"status_code", "latency", "ottl_condition", "numeric_attribute", "probabilistic"})

    def test_otelcol_validate(self):
        binary = shutil.which("otelcol-contrib") or shutil.which("otelcol")
        if not binary:
            self.skipTest("no otelcol-contrib/otelcol binary from a package registry here")
        env = dict(os.environ, OTEL_VENDOR_ENDPOINT="https://vendor.invalid", OTEL_VENDOR_API_KEY="x")
        for f in ("collector.yaml", "collector-vendor.yaml", "collector-tail-sampling.yaml"):
            r = subprocess.run([binary, "validate", "--config", rp("otel", f)], capture_output=True, text=True, env=env)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


# ============================================================================ ELK
ALLOWED_LOG_FIELDS = contract.LOG_FIELDS | contract.PIPELINE_FIELDS


def es_query_fields(node, out):
    """Field names used by an Elasticsearch query DSL body."""
    leaf_queries = {"term", "terms", "match", "match_phrase", "wildcard", "range", "prefix", "regexp", "exists"}
    if isinstance(node, dict):
        for k, v in node.items():
            if k in leaf_queries and isinstance(v, dict):
                if k == "exists":
                    out.add(v["field"])
                else:
                    out.update(v.keys())
            elif k == "sort":
                for s in v:
                    out.update(s.keys() if isinstance(s, dict) else [s])
            elif k == "_source":
                out.update(v)
            else:
                es_query_fields(v, out)
    elif isinstance(node, list):
        for v in node:
            es_query_fields(v, out)
    return out


class TestELK(unittest.TestCase):
    def test_filebeat(self):
        fb = load_yaml("compose", "elk", "filebeat.yml")
        ids = [i["id"] for i in fb["filebeat.inputs"]]
        self.assertEqual(len(ids), len(set(ids)))
        for inp in fb["filebeat.inputs"]:
            self.assertEqual(inp["type"], "filestream")
            self.assertTrue(any("ndjson" in p for p in inp["parsers"]))
            nd = next(p["ndjson"] for p in inp["parsers"] if "ndjson" in p)
            self.assertEqual(nd["target"], "")
            self.assertEqual(inp["fields"]["service"], "sockudo")
            self.assertIn("environment", inp["fields"])
            self.assertIs(inp["fields_under_root"], True)
            for cond in re.findall(r"has_fields: \[([^\]]*)\]", open(rp("compose", "elk", "filebeat.yml")).read()):
                for f in re.findall(r"'(\w+)'", cond):
                    self.assertIn(f, ALLOWED_LOG_FIELDS)
        self.assertEqual(fb["output.logstash"]["hosts"], ["logstash:5044"])

    def test_logstash(self):
        conf = open(rp("compose", "elk", "logstash.conf")).read()
        code = re.sub(r"#.*", "", conf)
        self.assertEqual(code.count("{"), code.count("}"))
        self.assertRegex(code, r"beats\s*\{\s*port\s*=>\s*5044")
        self.assertNotRegex(code, r"\bjson\s*\{", "Filebeat already decoded the JSON")
        self.assertRegex(code, r'date\s*\{\s*match\s*=>\s*\[\s*"timestamp"\s*,\s*"ISO8601"\s*\]')
        self.assertIn("sockudo-logs-%{+YYYY.MM.dd}", code)
        fields = set(re.findall(r"\[(\w+)\]", code)) - {"@metadata", "index"}
        self.assertTrue(fields <= ALLOWED_LOG_FIELDS, fields - ALLOWED_LOG_FIELDS)
        tpl = json.load(open(rp("compose", "elk", "sockudo-logs-template.json")))
        self.assertTrue(set(tpl["template"]["mappings"]["properties"]) <= ALLOWED_LOG_FIELDS)
        self.assertEqual(tpl["template"]["mappings"]["properties"]["level"]["type"], "keyword")

    def test_kibana_queries(self):
        md = open(rp("compose", "elk", "kibana-queries.md")).read()
        bodies = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", md, re.S)]
        self.assertGreaterEqual(len(bodies), 4)
        fields = set()
        for b in bodies:
            es_query_fields(b, fields)
        self.assertTrue(fields <= ALLOWED_LOG_FIELDS, fields - ALLOWED_LOG_FIELDS)
        self.assertIn("trace_id", fields)
        levels = re.findall(r'"level":\s*"(\w+)"', md) + re.findall(r'level:\s*\(?"(\w+)"', md)
        self.assertTrue(levels and all(l in contract.LOG_LEVELS for l in levels), levels)
        kql = re.findall(r"```kql\n(.*?)```", md, re.S)
        self.assertGreaterEqual(len(kql), 4)
        for q in kql:
            unquoted = re.sub(r'"[^"]*"', '""', q)
            for f in re.findall(r"(?<![\w:])([@\w.]+)\s*:(?!:)", unquoted):
                self.assertIn(f, ALLOWED_LOG_FIELDS, q)


# ============================================================================ contract
class TestContractList(unittest.TestCase):
    def test_matches_reference(self):
        candidates = [os.path.join(REPO, "..", "shared", "reference", "metrics.md"),
                      "/work/shared/reference/metrics.md"]
        path = next((p for p in candidates if os.path.exists(p)), None)
        if not path:
            self.skipTest("shared/reference/metrics.md not reachable")
        text = open(path).read()
        names = set()
        for line in text.splitlines():
            if line.startswith("| `"):
                names |= set(re.findall(r"`((?:sockudo|process)_[a-z_]+)`", line.split("|")[1]))
        self.assertEqual(names, set(contract.METRICS) | set(contract.NOT_YET_EMITTED))
        self.assertFalse(set(contract.METRICS) & set(contract.NOT_YET_EMITTED))
        for b in ("0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000",
                  "0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000"):
            self.assertIn(b, text)


# ============================================================================ runner
def main():
    import unitrun  # beside this file (the script's directory is on sys.path)

    return unitrun.run(__name__)


if __name__ == "__main__":
    sys.exit(main())
