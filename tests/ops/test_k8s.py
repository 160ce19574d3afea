#!/usr/bin/env python3
"""Static tests of deploy/kubernetes (no cluster): each overlay is rendered (`kubectl kustomize`
when kubectl is on PATH, else the small renderer below; both are compared when both exist), every
object is validated with kubernetes-validate in strict mode, the seed's `sockudo-k8s` scrape job
is applied to the pod template, and the Dockerfile, probes, grace period and the generated
PrometheusRule are checked.

  python3 tests/ops/test_k8s.py        # or: python3 -m unittest tests/ops/test_k8s.py -v

Needs PyYAML and kubernetes-validate (pip). Prints `N passed, M failed[, K skipped]` last.
"""
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import unittest

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
K8S = os.path.join(REPO, "deploy", "kubernetes")
OVERLAYS = ["redis", "nats"]
K8S_VERSION = "1.30.0"
# Kinds from CRDs: kubernetes-validate ships only the built-in schemas.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus-operator CRD, no schema in kubernetes-validate",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "prometheus-operator CRD, no schema in kubernetes-validate",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheus-operator CRD, no schema in kubernetes-validate",
}
SHUTDOWN_GRACE_DEFAULT = 10  # src/config/mod.rs: shutdown_grace_period

sys.path.insert(0, K8S)
import gen_prometheusrule  # noqa: E402


# ============================================================================ kustomize renderer
def _load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _key(obj):
    return (obj["kind"], obj["metadata"]["name"])


def strategic_merge(base, patch):
    """Strategic merge for what our patches use: maps merge, lists of maps with `name` merge by
    name (containers, env, ports, volumes), other lists replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = strategic_merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(patch, list)
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out = [copy.deepcopy(x) for x in base]
        new = []
        for item in patch:
            for i, b in enumerate(out):
                if b["name"] == item["name"]:
                    out[i] = strategic_merge(b, item)
                    break
            else:
                new.append(copy.deepcopy(item))
        return new + out  # kustomize puts items only the patch has first
    return copy.deepcopy(patch)


SUPPORTED = {"apiVersion", "kind", "namespace", "resources", "patches"}


def render_py(directory):
    """resources (files and directories), patches (path, strategic merge), namespace."""
    with open(os.path.join(directory, "kustomization.yaml")) as f:
        kust = yaml.safe_load(f)
    unsupported = set(kust) - SUPPORTED
    if unsupported:
        raise ValueError(f"{directory}: renderer does not support {sorted(unsupported)}")
    objs = []
    for res in kust.get("resources", []):
        p = os.path.join(directory, res)
        objs.extend(render_py(p) if os.path.isdir(p) else _load_docs(p))
    for patch in kust.get("patches", []):
        if set(patch) != {"path"}:
            raise ValueError(f"{directory}: only `patches: - path:` is supported")
        for pd in _load_docs(os.path.join(directory, patch["path"])):
            matches = [i for i, o in enumerate(objs) if _key(o) == _key(pd)]
            if len(matches) != 1:
                raise ValueError(f"patch target {_key(pd)} found {len(matches)} times")
            objs[matches[0]] = strategic_merge(objs[matches[0]], pd)
    ns = kust.get("namespace")
    if ns:
        for o in objs:
            if o["kind"] == "Namespace":
                o["metadata"]["name"] = ns
            else:
                o["metadata"]["namespace"] = ns
    return objs


def render_kubectl(directory):
    out = subprocess.run(["kubectl", "kustomize", directory], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def render(overlay):
    d = os.path.join(K8S, "overlays", overlay)
    return render_kubectl(d) if shutil.which("kubectl") else render_py(d)


def by_kind(objs, kind, name=None):
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return found


def sockudo_deploy(objs):
    [d] = by_kind(objs, "Deployment", "sockudo")
    return d


def sockudo_container(objs):
    [c] = [c for c in sockudo_deploy(objs)["spec"]["template"]["spec"]["containers"] if c["name"] == "sockudo"]
    return c


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


# ============================================================================ Prometheus relabel
def relabel(labels, configs):
    """Prometheus relabel_configs for the actions the seed uses (keep, drop, replace); returns
    None when the target is dropped. Regexes are fully anchored, as in Prometheus."""
    labels = dict(labels)
    for c in configs:
        action = c.get("action", "replace")
        sep = c.get("separator", ";")
        value = sep.join(labels.get(s, "") for s in c.get("source_labels", []))
        regex = re.compile("^(?:" + c.get("regex", "(.*)") + ")$")
        m = regex.match(value)
        if action == "keep":
            if not m:
                return None
        elif action == "drop":
            if m:
                return None
        elif action == "replace":
            if m:
                repl = c.get("replacement", "$1")
                res = re.sub(r"\$\{?(\d+)\}?", lambda g: m.group(int(g.group(1))) or "", repl)
                if res:
                    labels[c["target_label"]] = res
                else:
                    labels.pop(c["target_label"], None)
        else:
            raise ValueError(f"relabel action {action} not simulated")
    return labels


def _sanitize(name):
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_sd_targets(pod_meta, pod_spec, namespace, pod_name, pod_ip):
    """What kubernetes_sd_configs role=pod discovers: one target per declared container port
    (__address__ podIP:port) with the pod's labels and annotations as __meta_* labels."""
    meta = {"__meta_kubernetes_namespace": namespace, "__meta_kubernetes_pod_name": pod_name,
            "__meta_kubernetes_pod_ip": pod_ip}
    for k, v in pod_meta.get("labels", {}).items():
        meta["__meta_kubernetes_pod_label_" + _sanitize(k)] = v
    for k, v in pod_meta.get("annotations", {}).items():
        meta["__meta_kubernetes_pod_annotation_" + _sanitize(k)] = v
    targets = []
    for c in pod_spec["containers"]:
        for p in c.get("ports", []):
            t = dict(meta, __address__=f"{pod_ip}:{p['containerPort']}",
                     __meta_kubernetes_pod_container_port_number=str(p["containerPort"]),
                     __meta_kubernetes_pod_container_port_name=p.get("name", ""))
            targets.append(t)
    return targets


# ============================================================================ tests
class TestRender(unittest.TestCase):
    def test_overlays_render(self):
        for o in OVERLAYS:
            with self.subTest(overlay=o):
                objs = render(o)
                kinds = {x["kind"] for x in objs}
                for k in ["Namespace", "ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget",
                          "HorizontalPodAutoscaler", "NetworkPolicy", "PodMonitor", "PrometheusRule",
                          "StatefulSet"]:
                    self.assertIn(k, kinds)
                for x in objs:
                    if x["kind"] != "Namespace":
                        self.assertEqual(x["metadata"].get("namespace"), "sockudo-namespace", _key(x))

    def test_python_renderer_matches_kubectl(self):
        if not shutil.which("kubectl"):
            self.skipTest("kubectl not installed; the Python renderer is the only one")
        for o in OVERLAYS:
            with self.subTest(overlay=o):
                d = os.path.join(K8S, "overlays", o)
                norm = lambda objs: sorted(json.dumps(x, sort_keys=True) for x in objs)  # noqa: E731
                self.assertEqual(norm(render_py(d)), norm(render_kubectl(d)))


class TestSchemas(unittest.TestCase):
    def test_strict_validation(self):
        import kubernetes_validate
        skipped = set()
        for o in OVERLAYS:
            for obj in render(o):
                kind = (obj["apiVersion"], obj["kind"])
                if kind in CRD_KINDS:
                    skipped.add(f"{kind[1]}: {CRD_KINDS[kind]}")
                    continue
                with self.subTest(overlay=o, obj=_key(obj)):
                    try:
                        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
                    except kubernetes_validate.ValidationError as e:
                        self.fail(f"{_key(obj)}: {e.message} at {list(e.path)}")
        for s in sorted(skipped):
            print(f"  schema validation skipped: {s}", file=sys.stderr)

    def test_crd_kinds_have_required_shape(self):
        # No schema for them here: check the fields prometheus-operator requires.
        objs = render("redis")
        [pm] = by_kind(objs, "PodMonitor")
        self.assertEqual(pm["spec"]["selector"]["matchLabels"], {"app": "sockudo"})
        ports = {p["name"] for c in sockudo_deploy(objs)["spec"]["template"]["spec"]["containers"]
                 for p in c["ports"]}
        for ep in pm["spec"]["podMetricsEndpoints"]:
            self.assertIn(ep["port"], ports)
        [pr] = by_kind(objs, "PrometheusRule")
        self.assertTrue(pr["spec"]["groups"])


class TestDeployment(unittest.TestCase):
    def test_shape(self):
        for o in OVERLAYS:
            with self.subTest(overlay=o):
                objs = render(o)
                d = sockudo_deploy(objs)
                spec = d["spec"]["template"]["spec"]
                c = sockudo_container(objs)
                self.assertEqual(d["spec"]["replicas"], 3)
                self.assertTrue(spec["securityContext"]["runAsNonRoot"])
                self.assertNotEqual(spec["securityContext"]["runAsUser"], 0)
                self.assertTrue(c["securityContext"]["readOnlyRootFilesystem"])
                self.assertFalse(c["securityContext"]["allowPrivilegeEscalation"])
                for k in ["requests", "limits"]:
                    self.assertIn("cpu", c["resources"][k])
                    self.assertIn("memory", c["resources"][k])

    def test_probes(self):
        c = sockudo_container(render("redis"))
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        self.assertEqual(ports, {"ws": 6001, "metrics": 9601})
        for probe, path in [("readinessProbe", "/up"), ("livenessProbe", "/live")]:
            get = c[probe]["httpGet"]
            self.assertEqual(get["path"], path)
            self.assertEqual(ports.get(get["port"], get["port"]), 6001)

    def test_grace_period(self):
        objs = render("redis")
        spec = sockudo_deploy(objs)["spec"]["template"]["spec"]
        c = sockudo_container(objs)
        [cm] = by_kind(objs, "ConfigMap", "sockudo-config")
        file_grace = tomllib.loads(cm["data"]["sockudo.toml"]).get("shutdown_grace_period", SHUTDOWN_GRACE_DEFAULT)
        env = env_of(c)
        grace = int(env["SHUTDOWN_GRACE_PERIOD"]["value"]) if "SHUTDOWN_GRACE_PERIOD" in env else file_grace
        self.assertEqual(grace, file_grace, "SHUTDOWN_GRACE_PERIOD env and the config file agree")
        cmd = c["lifecycle"]["preStop"]["exec"]["command"]
        self.assertEqual(cmd[0], "sleep")
        pre_stop = int(cmd[1])
        self.assertGreater(spec["terminationGracePeriodSeconds"], pre_stop + grace)

    def test_config_and_secrets_wired(self):
        for o, driver, url_env in [("redis", "redis", "REDIS_URL"), ("nats", "nats", "NATS_SERVERS")]:
            with self.subTest(overlay=o):
                objs = render(o)
                c = sockudo_container(objs)
                env = env_of(c)
                self.assertEqual(env["ADAPTER_DRIVER"]["value"], driver)
                self.assertEqual(env["WEBHOOK_QUEUE_DRIVER"]["value"], driver)
                self.assertIn(url_env, env)
                [sec] = by_kind(objs, "Secret", "sockudo-secrets")
                for k in ["SOCKUDO_APP_SECRET", "ADAPTER_CLUSTER_SECRET"]:
                    self.assertEqual(env[k]["valueFrom"]["secretKeyRef"], {"name": "sockudo-secrets", "key": k})
                    self.assertIn("CHANGE-ME", sec["stringData"][k], "placeholder clearly marked")
                self.assertGreaterEqual(len(sec["stringData"]["ADAPTER_CLUSTER_SECRET"]), 16)
                [cm] = by_kind(objs, "ConfigMap", "sockudo-config")
                cfg = tomllib.loads(cm["data"]["sockudo.toml"])
                self.assertEqual(cfg["app_manager"]["array"]["apps"][0]["secret"], "${SOCKUDO_APP_SECRET}")
                self.assertEqual(c["args"], ["--config", "/etc/sockudo/sockudo.toml"])
                # The broker's service answers on the URL's host and port.
                host, port = re.match(r"^\w+://([^:/]+):(\d+)", env[url_env]["value"]).groups()
                [svc] = by_kind(objs, "Service", host)
                self.assertIn(int(port), [p["port"] for p in svc["spec"]["ports"]])

    def test_broker_persistence(self):
        [r] = by_kind(render("redis"), "StatefulSet")
        args = r["spec"]["template"]["spec"]["containers"][0]["args"]
        self.assertIn("--appendonly", args)
        self.assertEqual(args[args.index("--appendonly") + 1], "yes")
        [n] = by_kind(render("nats"), "StatefulSet")
        args = n["spec"]["template"]["spec"]["containers"][0]["args"]
        self.assertIn("--jetstream", args)
        self.assertIn("--store_dir", args)
        for s in (r, n):
            self.assertTrue(s["spec"]["volumeClaimTemplates"])

    def test_services_pdb_hpa(self):
        objs = render("redis")
        [svc] = by_kind(objs, "Service", "sockudo")
        self.assertEqual(svc["spec"]["sessionAffinity"], "None")
        [m] = by_kind(objs, "Service", "sockudo-metrics")
        self.assertEqual(m["spec"]["clusterIP"], "None")
        self.assertEqual([p["port"] for p in m["spec"]["ports"]], [9601])
        [pdb] = by_kind(objs, "PodDisruptionBudget")
        self.assertEqual(pdb["spec"]["selector"]["matchLabels"], {"app": "sockudo"})
        [hpa] = by_kind(objs, "HorizontalPodAutoscaler")
        self.assertEqual(hpa["apiVersion"], "autoscaling/v2")
        self.assertEqual(hpa["spec"]["metrics"][0]["resource"]["name"], "cpu")
        self.assertGreaterEqual(hpa["spec"]["minReplicas"], 3)

    def test_network_policies(self):
        for o, port in [("redis", 6379), ("nats", 4222)]:
            with self.subTest(overlay=o):
                objs = render(o)
                [np] = by_kind(objs, "NetworkPolicy", "sockudo")
                rules = {r["ports"][0]["port"]: r for r in np["spec"]["ingress"]}
                self.assertEqual(set(rules), {6001, 9601})
                self.assertIn("from", rules[9601], "metrics only from the scrapers")
                [bp] = [x for x in by_kind(objs, "NetworkPolicy") if x["metadata"]["name"] != "sockudo"]
                [rule] = bp["spec"]["ingress"]
                self.assertEqual(rule["from"], [{"podSelector": {"matchLabels": {"app": "sockudo"}}}])
                self.assertEqual(rule["ports"][0]["port"], port)


class TestSeedScrapeConfig(unittest.TestCase):
    def test_relabel_yields_pod_ip_and_metrics_port(self):
        with open(os.path.join(REPO, "compose", "prometheus", "prometheus.yml")) as f:
            prom = yaml.safe_load(f)
        [job] = [j for j in prom["scrape_configs"] if "kubernetes_sd_configs" in j]
        [sd] = job["kubernetes_sd_configs"]
        self.assertEqual(sd["role"], "pod")
        for o in OVERLAYS:
            with self.subTest(overlay=o):
                objs = render(o)
                d = sockudo_deploy(objs)
                ns = d["metadata"]["namespace"]
                self.assertIn(ns, sd.get("namespaces", {}).get("names", [ns]))
                tpl = d["spec"]["template"]
                kept = [relabel(t, job["relabel_configs"])
                        for t in pod_sd_targets(tpl["metadata"], tpl["spec"], ns, "sockudo-abc", "10.1.2.3")]
                kept = [t for t in kept if t is not None]
                self.assertTrue(kept, "the job keeps the pod")
                # Every declared port is a target, all rewritten to the annotated metrics port.
                self.assertEqual({t["__address__"] for t in kept}, {"10.1.2.3:9601"})
                for t in kept:
                    self.assertEqual(t.get("__metrics_path__", job.get("metrics_path", "/metrics")), "/metrics")
                    self.assertEqual(t["namespace"], ns)
                    self.assertEqual(t["instance"], "sockudo-abc")
                # The broker pods are not scraped as sockudo.
                for s in by_kind(objs, "StatefulSet"):
                    st = s["spec"]["template"]
                    ts = pod_sd_targets(st["metadata"], st["spec"], ns, "broker-0", "10.1.2.4")
                    self.assertEqual([t for t in (relabel(t, job["relabel_configs"]) for t in ts) if t], [])

    def test_relabel_simulator(self):
        # Guards the simulator itself: without the annotation, or another app label, dropped.
        with open(os.path.join(REPO, "compose", "prometheus", "prometheus.yml")) as f:
            cfg = yaml.safe_load(f)
        [job] = [j for j in cfg["scrape_configs"] if "kubernetes_sd_configs" in j]
        base = {"__address__": "10.0.0.1:6001", "__meta_kubernetes_pod_label_app": "sockudo",
                "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
                "__meta_kubernetes_pod_annotation_prometheus_io_port": "9601"}
        self.assertEqual(relabel(base, job["relabel_configs"])["__address__"], "10.0.0.1:9601")
        self.assertIsNone(relabel(dict(base, __meta_kubernetes_pod_label_app="other"), job["relabel_configs"]))
        no_ann = {k: v for k, v in base.items() if "scrape" not in k}
        self.assertIsNone(relabel(no_ann, job["relabel_configs"]))


class TestDockerfile(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with open(os.path.join(REPO, "Dockerfile")) as f:
            text = f.read()
        cls.lines = []
        for line in re.sub(r"\\\n", " ", text).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                cls.lines.append(line)

    def final_stage(self):
        starts = [i for i, line in enumerate(self.lines) if line.upper().startswith("FROM ")]
        return self.lines[starts[-1]:]

    def test_builds_release_binary(self):
        runs = [line for line in self.lines if line.upper().startswith("RUN ")]
        builds = [re.search(r"cargo build([^&;]*)", r) for r in runs]
        builds = [b.group(1).split() for b in builds if b]
        self.assertEqual(len(builds), 1, "one cargo build")
        flags = builds[0]
        self.assertIn("--release", flags)
        for f in flags:
            # Anything that would change which binary or features are built.
            self.assertNotRegex(f, r"^--(features|no-default-features|all-features|profile|target|bin|example)")
        self.assertTrue(any("target/release/sockudo" in r for r in runs), "copies target/release/sockudo")

    def test_ports_and_image_entrypoint(self):
        final = self.final_stage()
        exposed = {int(p) for line in final if line.upper().startswith("EXPOSE ") for p in line.split()[1:]}
        self.assertEqual(exposed, {6001, 9601})
        c = sockudo_container(render("redis"))
        self.assertEqual({p["containerPort"] for p in c["ports"]}, exposed)
        self.assertTrue(any(line.startswith("ENTRYPOINT") and "/usr/local/bin/sockudo" in line for line in final))

    def test_non_root_user_matches_pod(self):
        users = [line.split()[1] for line in self.final_stage() if line.upper().startswith("USER ")]
        self.assertTrue(users, "a USER in the runtime stage")
        uid, _, gid = users[-1].partition(":")
        self.assertTrue(uid.isdigit() and int(uid) != 0, "numeric non-root uid (runAsNonRoot needs it)")
        sc = sockudo_deploy(render("redis"))["spec"]["template"]["spec"]["securityContext"]
        self.assertEqual(sc["runAsUser"], int(uid))
        if gid:
            self.assertEqual(sc["runAsGroup"], int(gid))


class TestPrometheusRule(unittest.TestCase):
    def test_generated_file_is_current(self):
        with open(gen_prometheusrule.OUT) as f:
            self.assertEqual(f.read(), gen_prometheusrule.render(),
                             "run python3 deploy/kubernetes/gen_prometheusrule.py")

    def test_rendered_rule_has_every_compose_rule(self):
        import glob
        want = []
        for p in sorted(glob.glob(gen_prometheusrule.RULES)):
            with open(p) as f:
                want.extend(yaml.safe_load(f)["groups"])
        [pr] = by_kind(render("nats"), "PrometheusRule")
        self.assertEqual(pr["spec"]["groups"], want)


def main():
    import unitrun  # beside this file (the script's directory is on sys.path)

    return unitrun.run(__name__)


if __name__ == "__main__":
    sys.exit(main())
