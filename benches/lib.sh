# Shared helpers for benches/cluster.sh and benches/telemetry.sh (sourced, not run).
# Servers are started on free loopback ports; every wait is bounded; stop_all stops only the
# processes these scripts started (by pid).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$ROOT/target/release/sockudo-bench"
SOCKUDO="$ROOT/target/release/sockudo"
QUIET_WAIT="${BENCH_QUIET_WAIT:-60}"
STARTED_PIDS=()
WORK="$(mktemp -d)"

log() { printf '\n== %s\n' "$*" >&2; }

stop_pid() {
    local pid="$1"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
}
stop_all() {
    local p
    for p in "${STARTED_PIDS[@]}"; do stop_pid "$p"; done
    STARTED_PIDS=()
}
cleanup() {
    stop_all
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

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

wait_port() {
    local port="$1" logf="$2"
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$port; log:" >&2
    cat "$logf" >&2 || true
    return 1
}

# start_node NAME [VAR=value ...] [-- sockudo args]: starts target/release/sockudo on free
# ports with the given environment; sets NODE_PID, NODE_PORT, NODE_METRICS_PORT, NODE_LOG.
start_node() {
    local name="$1"
    shift
    local envs=() args=()
    while [[ $# -gt 0 ]]; do
        if [[ "$1" == "--" ]]; then
            shift
            args=("$@")
            break
        fi
        envs+=("$1")
        shift
    done
    NODE_PORT="$(free_port)"
    NODE_METRICS_PORT="$(free_port)"
    NODE_LOG="$WORK/$name.log"
    env HOST=127.0.0.1 PORT="$NODE_PORT" METRICS_HOST=127.0.0.1 METRICS_PORT="$NODE_METRICS_PORT" \
        SOCKUDO_MAX_CONNECTIONS=0 "${envs[@]}" "$SOCKUDO" "${args[@]}" >>"$NODE_LOG" 2>&1 &
    NODE_PID=$!
    STARTED_PIDS+=("$NODE_PID")
    wait_port "$NODE_PORT" "$NODE_LOG"
    # Secrets (ADAPTER_CLUSTER_SECRET) are not echoed into the bench's output.
    local shown=() e
    for e in "${envs[@]}"; do
        [[ "$e" == *SECRET=* ]] && e="${e%%=*}=****"
        shown+=("$e")
    done
    log "$name: sockudo pid $NODE_PID on 127.0.0.1:$NODE_PORT (metrics $NODE_METRICS_PORT) ${shown[*]} ${args[*]}"
}

# A metric's largest value on a node's /metrics (empty if absent).
metric() {
    local mport="$1" name="$2"
    curl -s --max-time 2 "http://127.0.0.1:$mport/metrics" | awk -v n="$name" '$1 == n || index($1, n "{") == 1 { print $NF }' | sort -g | tail -1 || true
}

# Log lines at WARN or ERROR in a node's log (for the report).
log_problems() {
    grep -Ei 'warn|error|panic' "$1" | head -20 || true
}

# The results' closing bullets: each log's warnings and errors (names that are empty or not a
# file are skipped), then the script's PROBLEMS.
report_problems() {
    local l p
    for l in "$@"; do
        [[ -n "$l" && -f "$l" ]] || continue
        p="$(log_problems "$l")"
        # shellcheck disable=SC2016 # the backticks are markdown
        if [[ -n "$p" ]]; then printf -- '- warnings/errors in the log of %s:\n\n```\n%s\n```\n' "$(basename "$l" .log)" "$p"; fi
    done
    for p in "${PROBLEMS[@]}"; do echo "- $p"; done
}

# Reads figures from a fanout --json report: jf FILE FILTER
jf() { jq -r "$2" "$1"; }
