#!/usr/bin/env bash
# Live proof of the operations assets against the real server:
#
#   bash tests/ops/live_server.sh          (from anywhere; needs target/debug/sockudo or $SOCKUDO_BIN
#                                            and the Redis at 127.0.0.1:6379)
#
# 1. starts two sockudo nodes (JSON logs at debug, Redis adapter with a unique prefix), Debian's
#    prometheus-node-exporter (installed if missing; optional) and Debian's prometheus with the
#    shipped compose/prometheus/prometheus.yml adapted only in its targets (node 1 = job sockudo,
#    node 2 + one dead target = job sockudo-cluster, node 2 as the pod of job sockudo-k8s), the
#    shipped rules, plus a copy of the alert rules with `for: 0s` and some thresholds lowered;
# 2. drives ~25 s of traffic with real clients (tests/ops/traffic.py: Python `pusher` SDK,
#    `websockets`), including a crowd of 1050 sockets, a 2 s stall of node 2, rate-limited client
#    events, refused connections, slow consumers, cross-node queries, a traceparent publish;
# 3. evaluates every PromQL expression of the dashboards, rules, rule tests, datasources and
#    compose/README.md through /api/v1/query (tests/ops/live_server.py eval) and checks which
#    alerts fired (connection count and broadcast latency among them);
# 4. checks that every field used by compose/elk/* and the Kibana queries is in the nodes' real
#    JSON log lines (tests/ops/live_server.py logs).
# Last line: `N passed, M failed`; exit 1 on any failure. OPS_KEEP=1 keeps the work directory.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE/../.."
PY="${PYTHON:-python3}"
BIN="${SOCKUDO_BIN:-$PWD/target/debug/sockudo}"
REDIS_URL="${OPS_REDIS_URL:-redis://127.0.0.1:6379}"
DURATION="${OPS_TRAFFIC_SECONDS:-24}"
START=$(date +%s)

PASS=0
FAIL=0
ok() { PASS=$((PASS + 1)); echo "ok: $*"; }
bad() { FAIL=$((FAIL + 1)); echo "FAIL: $*"; }
finish() {
  echo
  echo "live_server.sh took $(( $(date +%s) - START ))s"
  echo "$PASS passed, $FAIL failed"
  [ "$FAIL" = 0 ]
}

if [ ! -x "$BIN" ]; then
  echo "no sockudo binary at $BIN (build it with: cargo build -p sockudo)" >&2
  exit 2
fi
case "$REDIS_URL" in
  redis://127.*|redis://localhost:*|redis://localhost) ;;
  *) echo "refusing non-loopback OPS_REDIS_URL: $REDIS_URL" >&2; exit 2 ;;
esac

# ------------------------------------------------------------------ tools
# shellcheck source=tests/ops/lib.sh
. "$HERE/lib.sh"
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "installing Debian's prometheus ..."
  apt_install prometheus
fi
if ! command -v prometheus-node-exporter >/dev/null 2>&1; then
  echo "installing Debian's prometheus-node-exporter (optional) ..."
  apt_install prometheus-node-exporter || echo "  could not install it: node_* expressions are only parsed"
fi
"$PY" -c 'import yaml' 2>/dev/null || "$PY" -m pip install -q pyyaml
"$PY" -c 'import pusher, websockets' 2>/dev/null || "$PY" -m pip install -q -r tests/clients/requirements.txt

# Redis must answer (a RESP PING over a plain socket; redis-cli may not be installed)
if ! "$PY" - "$REDIS_URL" <<'EOF'
import socket, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
s = socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=3)
s.sendall(b"PING\r\n")
sys.exit(0 if s.recv(64).startswith(b"+PONG") else 1)
EOF
then
  echo "Redis at $REDIS_URL does not answer PING" >&2
  exit 2
fi

# ------------------------------------------------------------------ processes and cleanup
WORK="$(mktemp -d)"
N1_PID="" N2_PID="" NE_PID="" PROM_PID="" WATCH_PID="" TRAFFIC_PID=""
PREFIX="ops-live-$(date +%s)-$$-$RANDOM"
stop_pid() {  # stop_pid PID: SIGTERM, bounded wait, then SIGKILL
  local pid="$1"
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -CONT "$pid" 2>/dev/null || true
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  stop_pid "$TRAFFIC_PID"; stop_pid "$WATCH_PID"; stop_pid "$PROM_PID"; stop_pid "$NE_PID"
  stop_pid "$N2_PID"; stop_pid "$N1_PID"
  if command -v redis-cli >/dev/null 2>&1; then  # drop whatever the nodes left under their prefix
    redis-cli -u "$REDIS_URL" --scan --pattern "$PREFIX*" 2>/dev/null | head -n 10000 |
      xargs -r redis-cli -u "$REDIS_URL" del >/dev/null 2>&1 || true
  fi
  if [ "${OPS_KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_http() {  # wait_http URL SECONDS PID
  local i
  for i in $(seq 1 $(( $2 * 10 ))); do
    curl -fsS --noproxy '*' -o /dev/null --max-time 1 "$1" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

P1=$(free_port); M1=$(free_port); P2=$(free_port); M2=$(free_port)
DEAD=$(free_port); NE=$(free_port); PROM_PORT=$(free_port)
PROM="http://127.0.0.1:$PROM_PORT"

# ------------------------------------------------------------------ sockudo x2
# Apps: 4242 (numeric: the Python SDK needs it) with a client-event budget of 1/s; 4243 with an
# API budget of 1 event/s. Node 1 also limits WebSocket connects to 10/s per IP and queues at
# most 128 KiB per socket (slow consumers); node 2 carries the crowd, so it has no per-IP limit.
"$PY" - "$WORK" "$PREFIX" <<'EOF'
import json, sys
work, prefix = sys.argv[1], sys.argv[2]
base = {
    "adapter": {"driver": "redis", "request_timeout_ms": 500, "redis": {"prefix": prefix}},
    "app_manager": {"driver": "config", "array": {"apps": [
        {"id": 4242, "key": "ops-key", "secret": "ops-secret", "enable_client_messages": True,
         "enable_user_authentication": True, "enable_subscription_count": True,
         "max_client_events_per_second": 1},
        {"id": 4243, "key": "ops-limited-key", "secret": "ops-limited-secret",
         "max_backend_events_per_second": 1, "max_read_requests_per_second": 1},
    ]}},
}
json.dump(base, open(f"{work}/node2.json", "w"), indent=1)
base["rate_limits"] = {"connections_per_ip_per_second": 10}
base["websocket"] = {"max_queue_kb": 128}
json.dump(base, open(f"{work}/node1.json", "w"), indent=1)
EOF

for n in 1 2; do
  if out="$("$BIN" --check-config --config "$WORK/node$n.json" 2>&1 >/dev/null)"; then
    ok "sockudo --check-config accepts node $n's config"
  else
    bad "sockudo --check-config node $n: $out"; finish; exit 1
  fi
done

start_node() {  # start_node N PORT METRICS_PORT
  env -i PATH="$PATH" HOST=127.0.0.1 PORT="$2" METRICS_HOST=127.0.0.1 METRICS_PORT="$3" \
    ADAPTER_DRIVER=redis REDIS_URL="$REDIS_URL" LOG_FORMAT=json LOG_LEVEL=debug SHUTDOWN_GRACE_PERIOD=2 \
    "$BIN" --config "$WORK/node$1.json" >"$WORK/node$1.log" 2>"$WORK/node$1.err" &
}
start_node 1 "$P1" "$M1"; N1_PID=$!
start_node 2 "$P2" "$M2"; N2_PID=$!
for n in 1 2; do
  if [ "$n" = 1 ]; then m=$M1; pid=$N1_PID; else m=$M2; pid=$N2_PID; fi
  if wait_http "http://127.0.0.1:$m/metrics" 20 "$pid"; then
    ok "sockudo node $n up (pid $pid, metrics 127.0.0.1:$m)"
  else
    bad "sockudo node $n did not start"; tail -n 20 "$WORK/node$n.log" "$WORK/node$n.err"; finish; exit 1
  fi
done
# both nodes see each other through Redis
for _ in $(seq 1 50); do
  [ "$(curl -fsS --noproxy '*' "http://127.0.0.1:$M1/metrics" | awk '/^sockudo_horizontal_adapter_nodes/ {print $2}')" = 2 ] && break
  sleep 0.2
done

# ------------------------------------------------------------------ node exporter, Prometheus
NE_ARG=()
if command -v prometheus-node-exporter >/dev/null 2>&1; then
  prometheus-node-exporter --web.listen-address="127.0.0.1:$NE" >"$WORK/node-exporter.log" 2>&1 &
  NE_PID=$!
  if wait_http "http://127.0.0.1:$NE/metrics" 10 "$NE_PID"; then
    NE_ARG=(--node-exporter "127.0.0.1:$NE")
  else
    echo "prometheus-node-exporter did not start; node_* expressions are only parsed"
    stop_pid "$NE_PID"; NE_PID=""
  fi
fi
"$PY" tests/ops/live_server.py config --node1 "127.0.0.1:$M1" --node2 "127.0.0.1:$M2" --dead "127.0.0.1:$DEAD" \
  --prom-port "$PROM_PORT" "${NE_ARG[@]}" --out "$WORK/prom" >/dev/null
if out="$(promtool check config "$WORK/prom/prometheus.yml" 2>&1)"; then
  ok "promtool accepts the adapted prometheus.yml, the shipped rules and the lowered copy"
else
  bad "promtool check config: $out"; finish; exit 1
fi
prometheus --config.file="$WORK/prom/prometheus.yml" --storage.tsdb.path="$WORK/prom/data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!
if ! wait_http "$PROM/-/ready" 30 "$PROM_PID"; then
  bad "prometheus did not start"; tail -n 20 "$WORK/prometheus.log"; finish; exit 1
fi
echo "prometheus $PROM; sockudo 127.0.0.1:$P1 (metrics :$M1), 127.0.0.1:$P2 (metrics :$M2); dead target :$DEAD${NE_PID:+; node-exporter :$NE}"
"$PY" tests/ops/live_server.py watch --prom "$PROM" --out "$WORK/alerts.json" 2>"$WORK/watch.err" &
WATCH_PID=$!
if "$PY" tests/ops/live_server.py wait --prom "$PROM" --timeout 40; then
  ok "prometheus scrapes both nodes and records"
else
  bad "prometheus does not scrape the nodes"
  curl -fsS --noproxy '*' "$PROM/api/v1/targets" | "$PY" -c 'import json,sys; [print(" ", t["labels"].get("job"), t["scrapeUrl"], t["health"], t["lastError"]) for t in json.load(sys.stdin)["data"]["activeTargets"]]' || true
  finish; exit 1
fi

# ------------------------------------------------------------------ traffic
SINCE=$(date +%s)
echo "driving ${DURATION}s of traffic with real clients ..."
"$PY" tests/ops/traffic.py --node1 "127.0.0.1:$P1" --node2 "127.0.0.1:$P2" --node2-pid "$N2_PID" \
  --duration "$DURATION" --hold 150 >"$WORK/traffic.out" 2>"$WORK/traffic.err" &
TRAFFIC_PID=$!
deadline=$(( $(date +%s) + ${DURATION%.*} + 90 ))
while ! grep -q '"traffic"' "$WORK/traffic.out" 2>/dev/null; do
  if ! kill -0 "$TRAFFIC_PID" 2>/dev/null || [ "$(date +%s)" -gt "$deadline" ]; then break; fi
  sleep 0.5
done
cat "$WORK/traffic.err"
TRACE_ID=""
if grep -q '"traffic"' "$WORK/traffic.out"; then
  summary_json="$(grep '"traffic"' "$WORK/traffic.out" | head -n 1)"
  echo "traffic: $summary_json"
  TRACE_ID="$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["traffic"].get("trace_id",""))' "$summary_json")"
  ok "real-client traffic driven on both nodes"
else
  bad "traffic driver failed"; tail -n 30 "$WORK/traffic.err"
fi

# ------------------------------------------------------------------ PromQL and alerts
add_counts() {  # add the {"passed","failed"} summary line of a live_server.py run
  local line p f
  line="$(tail -n 1 "$1")"
  if p="$("$PY" -c 'import json,sys; d=json.loads(sys.argv[1]); print(d["passed"], d["failed"])' "$line" 2>/dev/null)"; then
    read -r p f <<<"$p"
    PASS=$((PASS + p)); FAIL=$((FAIL + f))
  else
    bad "$2 did not finish"
  fi
}
echo
set +e
"$PY" tests/ops/live_server.py eval --prom "$PROM" --alerts "$WORK/alerts.json" --dead "127.0.0.1:$DEAD" \
  --since "$SINCE" --traffic "$WORK/traffic.out" ${NE_PID:+--node-exporter} --timeout 30 >"$WORK/eval.out" 2>&1
set -e
sed '$d' "$WORK/eval.out"
add_counts "$WORK/eval.out" "PromQL evaluation"

# ------------------------------------------------------------------ logs
stop_pid "$TRAFFIC_PID"; TRAFFIC_PID=""
for n in 1 2; do
  if [ "$n" = 1 ]; then pid=$N1_PID; else pid=$N2_PID; fi
  kill -TERM "$pid" 2>/dev/null || true
  rc=0
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    bad "sockudo node $n did not exit within 10s of SIGTERM"; stop_pid "$pid"
  else
    wait "$pid" || rc=$?
    if [ "$rc" = 0 ]; then ok "sockudo node $n exits 0 on SIGTERM"; else bad "sockudo node $n exited $rc"; fi
  fi
  if [ "$n" = 1 ]; then N1_PID=""; else N2_PID=""; fi
  if [ -s "$WORK/node$n.err" ]; then
    bad "sockudo node $n wrote to stderr (logs belong on stdout): $(head -c 300 "$WORK/node$n.err")"
  else
    ok "sockudo node $n wrote nothing to stderr (every log line on stdout)"
  fi
done
echo
set +e
"$PY" tests/ops/live_server.py logs --trace-id "${TRACE_ID:-none}" "$WORK/node1.log" "$WORK/node2.log" >"$WORK/logs.out" 2>&1
set -e
sed '$d' "$WORK/logs.out"
add_counts "$WORK/logs.out" "log field check"

finish
