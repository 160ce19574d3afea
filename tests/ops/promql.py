#!/usr/bin/env python3
"""Extract every PromQL expression shipped in the ops assets.

Sources:
  * grafana/dashboards/*.json  - panel targets (`expr`) and template variables (`label_values(...)`)
  * compose/prometheus/rules/*.yml - alerting and recording rules (`expr`)
  * compose/prometheus/tests/*.yml - `promql_expr_test` expressions
  * compose/README.md          - fenced ```promql blocks, one expression per non-comment line
  * grafana/provisioning/datasources/*.yml - `tracesToMetrics` queries

Usage:
  python3 tests/ops/promql.py            # JSON lines: {"source", "kind", "expr", "concrete", "metrics"}
  python3 tests/ops/promql.py --concrete # same; `concrete` has Grafana variables substituted

Reusable from other tests:
  from promql import extract, concrete, metric_names
"""
import glob
import json
import os
import re
import sys

try:
    import yaml  # PyYAML
except ImportError:  # pragma: no cover - check.sh installs it
    yaml = None

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# Values substituted for Grafana's variables so that the expression is plain PromQL.
GRAFANA_BUILTINS = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "__interval_ms": "60000",
    "__range_s": "3600",
    "__range_ms": "3600000",
}

KEYWORDS = {
    "and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left",
    "group_right", "offset", "inf", "nan", "atan2",
}


# ---------------------------------------------------------------- extraction
def _dashboard_panels(panels):
    for p in panels or []:
        yield p
        # rows (collapsed) carry their own panels
        yield from _dashboard_panels(p.get("panels"))


LABEL_VALUES_RE = re.compile(r"^\s*label_values\(\s*(.*?)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$", re.S)


def _from_dashboards(root):
    out = []
    for path in sorted(glob.glob(os.path.join(root, "grafana", "dashboards", "*.json"))):
        rel = os.path.relpath(path, root)
        with open(path) as f:
            dash = json.load(f)
        for p in _dashboard_panels(dash.get("panels")):
            for t in p.get("targets", []) or []:
                expr = t.get("expr")
                if expr:
                    out.append({
                        "source": f"{rel}#panel[{p.get('id')}] {p.get('title')!r} ref {t.get('refId')}",
                        "kind": "dashboard",
                        "expr": expr,
                    })
        for v in (dash.get("templating") or {}).get("list", []):
            if v.get("type") != "query":
                continue
            q = v.get("query")
            if isinstance(q, dict):
                q = q.get("query")
            m = LABEL_VALUES_RE.match(q or "")
            if m:
                out.append({
                    "source": f"{rel}#templating {v.get('name')}",
                    "kind": "dashboard-variable",
                    "expr": m.group(1),
                })
            elif q:
                out.append({"source": f"{rel}#templating {v.get('name')}", "kind": "dashboard-variable", "expr": q})
    return out


def _from_rules(root):
    out = []
    for path in sorted(glob.glob(os.path.join(root, "compose", "prometheus", "rules", "*.yml"))):
        rel = os.path.relpath(path, root)
        with open(path) as f:
            doc = yaml.safe_load(f)
        for g in doc.get("groups", []):
            for r in g.get("rules", []):
                if "alert" in r:
                    out.append({"source": f"{rel}#{g['name']}/alert {r['alert']}", "kind": "alert", "expr": str(r["expr"])})
                else:
                    out.append({"source": f"{rel}#{g['name']}/record {r['record']}", "kind": "record", "expr": str(r["expr"])})
    for path in sorted(glob.glob(os.path.join(root, "compose", "prometheus", "tests", "*.yml"))):
        rel = os.path.relpath(path, root)
        with open(path) as f:
            doc = yaml.safe_load(f)
        for i, t in enumerate(doc.get("tests", [])):
            for j, e in enumerate(t.get("promql_expr_test", []) or []):
                out.append({"source": f"{rel}#tests[{i}].promql_expr_test[{j}]", "kind": "rule-test", "expr": str(e["expr"])})
    return out


def _from_datasources(root):
    out = []
    for path in sorted(glob.glob(os.path.join(root, "grafana", "provisioning", "datasources", "*.yml"))):
        rel = os.path.relpath(path, root)
        with open(path) as f:
            doc = yaml.safe_load(f)
        for ds in doc.get("datasources", []):
            t2m = (ds.get("jsonData") or {}).get("tracesToMetrics") or {}
            for q in t2m.get("queries", []):
                out.append({"source": f"{rel}#{ds.get('uid')} tracesToMetrics {q.get('name')!r}",
                            "kind": "datasource", "expr": q["query"]})
    return out


FENCE_RE = re.compile(r"^```promql\s*$(.*?)^```\s*$", re.M | re.S)


def _from_markdown(root, rel="compose/README.md"):
    path = os.path.join(root, rel)
    if not os.path.exists(path):
        return []
    text = open(path).read()
    out = []
    for m in FENCE_RE.finditer(text):
        start_line = text.count("\n", 0, m.start(1)) + 1
        for k, line in enumerate(m.group(1).splitlines()):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            out.append({"source": f"{rel}:{start_line + k}", "kind": "readme", "expr": s})
    return out


def extract(root=REPO):
    """All PromQL expressions in the assets, each with `concrete` and `metrics` filled in."""
    items = _from_dashboards(root) + _from_rules(root) + _from_datasources(root) + _from_markdown(root)
    for it in items:
        it["concrete"] = concrete(it["expr"])
        it["metrics"] = sorted(metric_names(it["concrete"]))
    return items


# ---------------------------------------------------------------- helpers
VAR_RE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)")


def concrete(expr):
    """Replace Grafana variables: interval built-ins by durations, template variables by `.*`."""
    def sub(m):
        name = m.group(1) or m.group(2)
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        return ".*"
    return VAR_RE.sub(sub, expr)


TOKEN_RE = re.compile(
    r"""(?P<num>0x[0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?(?:\d+(?:ms|[smhdwy]))*)"""
    r"""|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)"""
    r"""|(?P<other>\S)""")


def _strip(expr):
    names = set(re.findall(r"""__name__\s*=\s*["']([^"']+)["']""", expr))
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)  # strings
    s = re.sub(r"\{[^{}]*\}", "{}", s)                                          # label matchers
    s = re.sub(r"\[[^\[\]]*\]", "[]", s)                                        # ranges/subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", s)
    s = re.sub(r"@\s*(start\(\)|end\(\)|[0-9.]+)", " ", s)
    return s, names


def metric_names(expr):
    """Metric names referenced by a (concrete) PromQL expression."""
    s, names = _strip(expr)
    toks = [(m.lastgroup, m.group()) for m in TOKEN_RE.finditer(s)]
    for i, (kind, val) in enumerate(toks):
        if kind != "ident" or val.lower() in KEYWORDS:
            continue
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if nxt == "(":
            continue  # function or aggregation
        names.add(val)
    return names


def main(argv):
    for it in extract():
        if "--concrete" not in argv:
            it.pop("concrete", None)
        print(json.dumps(it))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
