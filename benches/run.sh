#!/usr/bin/env bash
# Runs the standard benchmark set with sockudo-bench and writes benches/results.md (a markdown
# table with the exact commands) and benches/results.json (one JSON object per scenario).
#
# By default it builds and starts target/release/sockudo on free loopback ports (restarting it
# before the connections scenario so that the memory figure starts from a fresh process) and
# stops it at the end. To measure another Pusher-compatible server instead, point at it:
#
#   BENCH_SERVER=127.0.0.1:6001 BENCH_APP_ID=app-id BENCH_KEY=app-key BENCH_SECRET=app-secret \
#   BENCH_SERVER_PID=1234 benches/run.sh
#
# BENCH_SERVER_PID is optional (without it, CPU and memory figures are n/a).
# BENCH_QUICK=1 runs a much smaller set (a smoke test of the script, not a benchmark).
# BENCH_OUT=path changes where the markdown goes (results.json is written beside it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${BENCH_OUT:-$ROOT/benches/results.md}"
JSON="${OUT%.md}.json"
BENCH="$ROOT/target/release/sockudo-bench"
ROWS="$(mktemp)"
SERVER_LOG="$(mktemp)"
SERVER_PID=""

log() { printf '\n== %s\n' "$*" >&2; }

stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
cleanup() {
    stop_server
    rm -f "$ROWS"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A TCP port on 127.0.0.1 that nothing listens on (bash's /dev/tcp probe, bounded tries).
free_port() {
    local p
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 20000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    echo "no free port found" >&2
    return 1
}

wait_up() {
    local host="$1" port="$2"
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "server at $host:$port did not come up; log:" >&2
    cat "$SERVER_LOG" >&2 || true
    return 1
}

start_server() {
    PORT="$(free_port)"
    local metrics_port
    metrics_port="$(free_port)"
    HOST=127.0.0.1 PORT="$PORT" METRICS_HOST=127.0.0.1 METRICS_PORT="$metrics_port" SOCKUDO_MAX_CONNECTIONS=0 \
        "$ROOT/target/release/sockudo" >>"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    wait_up 127.0.0.1 "$PORT"
    log "sockudo pid $SERVER_PID on 127.0.0.1:$PORT (metrics $metrics_port)"
}

# The open-file limit: raise the soft limit to the hard one (the server inherits it).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
log "open-file limit $(ulimit -n)"

if [[ -n "${BENCH_SERVER:-}" ]]; then
    MANAGED=0
    HOST="${BENCH_SERVER%:*}"
    PORT="${BENCH_SERVER##*:}"
    APP_ID="${BENCH_APP_ID:-app-id}"
    KEY="${BENCH_KEY:-app-key}"
    SECRET="${BENCH_SECRET:-app-secret}"
    SERVER_PID_FLAG=()
    [[ -n "${BENCH_SERVER_PID:-}" ]] && SERVER_PID_FLAG=(--server-pid "$BENCH_SERVER_PID")
    SERVER_NAME="external server at $BENCH_SERVER"
    log "building sockudo-bench"
    cargo build --release -p sockudo-bench
else
    MANAGED=1
    HOST=127.0.0.1
    APP_ID=app-id KEY=app-key SECRET=app-secret
    log "building sockudo and sockudo-bench"
    cargo build --release -p sockudo -p sockudo-bench
    SERVER_NAME="sockudo $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?') (target/release/sockudo, local adapter, embedded default config)"
    start_server
fi

target_flags() {
    TARGET=(--host "$HOST" --port "$PORT" --app-id "$APP_ID" --key "$KEY" --secret "$SECRET")
    if [[ "$MANAGED" == 1 ]]; then
        TARGET+=(--server-pid "$SERVER_PID")
    else
        TARGET+=("${SERVER_PID_FLAG[@]}")
    fi
}

: >"$JSON"
# Runs one scenario: its JSON goes to results.json, its summary row to the table.
run() {
    target_flags
    log "sockudo-bench $*"
    # On a shared machine, wait for other work to calm down first (and between saturation steps).
    "$BENCH" "${TARGET[@]}" --quiet-below 10 --quiet-wait "${BENCH_QUIET_WAIT:-300}" --json --markdown "$ROWS" "$@" >>"$JSON" ||
        echo "scenario failed: $*" >&2
}

if [[ "${BENCH_QUICK:-0}" == 1 ]]; then
    SUBS=100 T=3 CONNS=500 CHURN_T=3 STEPS=3 STEP_T=3 BIG_SUBS=1000 STALLED=2 PUB_RATE=2000
else
    SUBS=1000 T=20 CONNS=10000 CHURN_T=10 STEPS=12 STEP_T=10 BIG_SUBS=10000 STALLED=10 PUB_RATE=25000
fi

run fanout --subscribers "$SUBS" --channels 1 --rate 20 --duration "$T"
run fanout --subscribers "$SUBS" --channels 1 --rate 100 --duration "$T"
# One broadcast to 10,000 subscribers every half second: "broadcast reached all" is its p99.
run fanout --subscribers "$BIG_SUBS" --channels 1 --rate 2 --duration "$T"
if [[ "$MANAGED" == 1 ]]; then
    log "restarting sockudo so that the slow-consumer step's RSS starts from a fresh process"
    stop_server
    start_server
fi
# Slow consumers: the same run without and with $STALLED subscribers that never read (8 KiB
# payloads fill their queues in seconds); the readers' p99 ratio shows the isolation.
run fanout --subscribers "$SUBS" --channels 1 --rate 20 --duration "$T" --stalled "$STALLED" --payload-bytes 8192 --stalled-compare
# The publish path over HTTP keep-alive: signed publishes to one channel with one subscriber.
run fanout --subscribers 1 --channels 1 --rate "$PUB_RATE" --duration 10 --max-inflight 128
run saturation --subscribers "$SUBS" --channels 1 --start-rate 50 --factor 1.5 --max-steps "$STEPS" --step-duration "$STEP_T"
if [[ "$MANAGED" == 1 ]]; then
    log "restarting sockudo for a fresh memory baseline"
    stop_server
    start_server
fi
run connections --connections "$CONNS" --channels 100 --concurrency 200 --hold 5
run churn --workers 50 --duration "$CHURN_T" --resubscribes 1

{
    echo "# sockudo-bench results"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- server: $SERVER_NAME"
    echo "- machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || echo '?')), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r)"
    echo "- the load generator runs on the same cores as the server (its own CPU is in results.json as bench_cpu_seconds); all traffic is on loopback"
    echo "- open-file limit: $(ulimit -n)"
    echo "- every command below also took: \`--host $HOST --port <port> --app-id $APP_ID --key $KEY --secret <secret> --server-pid <pid> --quiet-below 10 --json\`"
    echo "- \"other load\": CPU seconds that other processes on the machine used during the measurement (near 0 on a quiet machine)"
    echo
    echo "| scenario | command and parameters | result |"
    echo "|---|---|---|"
    cat "$ROWS"
    echo
    echo "Full figures (per step, HTTP round trips, publish lag, CPU of both processes): \`$(basename "$JSON")\`."
} >"$OUT"

log "wrote $OUT and $JSON"
cat "$OUT"
