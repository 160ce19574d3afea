#!/usr/bin/env bash
# Cross-node fan-out: the publisher posts to node A, 1000 subscribers are split round-robin
# over nodes A and B, 20 publishes/s for 15 s — through Redis, through NATS, and on one node
# (local adapter) for comparison, in the same run. Writes benches/results-cluster.md and
# benches/results-cluster.json.
#
# Needs redis-server on 127.0.0.1:6379 and nats-server on 127.0.0.1:4222 (each cluster uses a
# fresh random prefix, so it does not meet other users of the broker).
# Each broker runs twice: unsigned, and with signed envelopes (`ADAPTER_CLUSTER_SECRET`), so the
# cost of signing is read off the same run.
# Environment: CLUSTER_SUBS (1000), CLUSTER_RATE (20), CLUSTER_T (15), BENCH_QUIET_WAIT (60),
# BENCH_CLUSTER_SECRET (the signed runs' key; a fixed 32-byte default), BENCH_NO_BUILD=1 to skip
# the build.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
OUT="$ROOT/benches/results-cluster.md"
JSON="${OUT%.md}.json"
SUBS="${CLUSTER_SUBS:-1000}" RATE="${CLUSTER_RATE:-20}" T="${CLUSTER_T:-15}"
REDIS_URL_="${BENCH_REDIS_URL:-redis://127.0.0.1:6379}"
NATS_URL_="${BENCH_NATS_URL:-nats://127.0.0.1:4222}"
SECRET_="${BENCH_CLUSTER_SECRET:-bench-cluster-secret-0123456789ab}"

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    log "building sockudo and sockudo-bench"
    cargo build --release -p sockudo -p sockudo-bench
fi

FANOUT=(fanout --subscribers "$SUBS" --channels 1 --rate "$RATE" --duration "$T")
ROWS=()
PROBLEMS=()
: >"$JSON"

# wait_nodes MPORT_A MPORT_B: until both report sockudo_horizontal_adapter_nodes = 2 (30 s at most).
wait_nodes() {
    local a b
    for _ in $(seq 1 60); do
        a="$(metric "$1" sockudo_horizontal_adapter_nodes)"
        b="$(metric "$2" sockudo_horizontal_adapter_nodes)"
        if [[ "$a" == 2 && "$b" == 2 ]]; then
            log "both nodes report sockudo_horizontal_adapter_nodes = 2"
            return 0
        fi
        sleep 0.5
    done
    echo "nodes did not see each other (A: '${a:-}', B: '${b:-}')" >&2
    return 1
}

# measure LABEL FILE BENCH-ARGS...: runs fanout, appends its JSON and keeps the command shown.
measure() {
    local label="$1" file="$2"
    shift 2
    log "$label: sockudo-bench $*"
    if ! "$BENCH" --quiet-below 10 --quiet-wait "$QUIET_WAIT" --json "$@" >"$file"; then
        echo "scenario failed: $label" >&2
        PROBLEMS+=("$label: the scenario failed")
        echo '{}' >"$file"
    fi
    jq -c --arg setup "$label" '. + {setup: $setup}' "$file" >>"$JSON" || true
}

# --- single node, local adapter ---------------------------------------------------------------
start_node single
measure "single node (local adapter)" "$WORK/single.json" \
    --port "$NODE_PORT" --server-pid "$NODE_PID" "${FANOUT[@]}"
CMD_single="ADAPTER_DRIVER=local (default) sockudo; \`sockudo-bench --port A --server-pid A ${FANOUT[*]}\`"
SINGLE_LOG="$NODE_LOG"
stop_all

# --- two nodes on a broker --------------------------------------------------------------------
# cluster DRIVER URL_VAR URL [SECRET]: two nodes; with SECRET their envelopes are signed.
cluster() {
    local driver="$1" url_var="$2" url="$3" secret="${4:-}"
    local prefix="bench-$(date +%s)-$RANDOM"
    local tag="$driver" label="two nodes, $driver" extra=()
    if [[ -n "$secret" ]]; then
        tag="${driver}_signed" label="two nodes, $driver, signed" extra=("ADAPTER_CLUSTER_SECRET=$secret")
    fi
    local cfg="$WORK/$tag.json"
    printf '{"adapter":{"driver":"%s","%s":{"prefix":"%s"}}}\n' "$driver" "$driver" "$prefix" >"$cfg"
    start_node "$tag-A" ADAPTER_DRIVER="$driver" "$url_var=$url" "${extra[@]}" -- --config "$cfg"
    local pa="$NODE_PID" porta="$NODE_PORT" ma="$NODE_METRICS_PORT"
    eval "LOGA_$tag=\$NODE_LOG"
    start_node "$tag-B" ADAPTER_DRIVER="$driver" "$url_var=$url" "${extra[@]}" -- --config "$cfg"
    local pb="$NODE_PID" portb="$NODE_PORT" mb="$NODE_METRICS_PORT"
    eval "LOGB_$tag=\$NODE_LOG"
    wait_nodes "$ma" "$mb"
    measure "$label" "$WORK/$tag-run.json" \
        --port "$porta" --server-pid "$pa" --also-server-pid "$pb" "${FANOUT[@]}" --subscribe-ports "$porta,$portb"
    # Cross-node health after the run.
    for m in "$ma" "$mb"; do
        log "node metrics :$m: nodes=$(metric "$m" sockudo_horizontal_adapter_nodes) connected=$(metric "$m" sockudo_horizontal_adapter_connected) uncomplete_promises=$(metric "$m" sockudo_horizontal_adapter_uncomplete_promises) dropped=$(metric "$m" sockudo_horizontal_adapter_dropped_total)"
    done
    stop_all
}
cluster redis REDIS_URL "$REDIS_URL_"
CMD_redis="2 × \`ADAPTER_DRIVER=redis REDIS_URL=$REDIS_URL_ sockudo --config cfg.json\`, cfg.json = \`{\"adapter\":{\"driver\":\"redis\",\"redis\":{\"prefix\":\"bench-<rand>\"}}}\`; \`sockudo-bench --port A --server-pid A --also-server-pid B ${FANOUT[*]} --subscribe-ports A,B\`"
cluster nats NATS_SERVERS "$NATS_URL_"
CMD_nats="2 × \`ADAPTER_DRIVER=nats NATS_SERVERS=$NATS_URL_ sockudo --config cfg.json\`, cfg.json = \`{\"adapter\":{\"driver\":\"nats\",\"nats\":{\"prefix\":\"bench-<rand>\"}}}\`; \`sockudo-bench --port A --server-pid A --also-server-pid B ${FANOUT[*]} --subscribe-ports A,B\`"
cluster redis REDIS_URL "$REDIS_URL_" "$SECRET_"
cluster nats NATS_SERVERS "$NATS_URL_" "$SECRET_"
CMD_signed="as the row above, with \`ADAPTER_CLUSTER_SECRET=<${#SECRET_} bytes>\` on both nodes"

# --- table ------------------------------------------------------------------------------------
SINGLE_P99="$(jq -r '.result.latency.p99_ms // empty' "$WORK/single.json")"
row() {
    local name="$1" file="$2" cmd="$3"
    jq -r --arg name "$name" --arg cmd "$cmd" --arg sp99 "${SINGLE_P99:-}" '
      def f(x): if x == null then "n/a" else (x * 100 | round / 100 | tostring) end;
      if .result == null then "| \($name) | \($cmd) | failed | | | | | | | |" else
      .result as $r |
      "| \($name) | \($cmd) | \($r.deliveries_per_second | round) | \(f($r.latency.p50_ms)) / \(f($r.latency.p90_ms)) / \(f($r.latency.p99_ms)) / \(f($r.latency.max_ms)) | "
      + "\($r.missing) / \($r.duplicates) / \($r.unexpected) | \($r.http_errors) | \($r.subscribers_lost) | "
      + "\(f($r.server_cpu_seconds_per_million_deliveries)) | \(f($r.cpu.other_cpu_seconds)) | "
      + (if $sp99 == "" then "n/a" else ((($r.latency.p99_ms - ($sp99 | tonumber)) * 100 | round / 100) as $d | (if $d >= 0 then "+" else "" end) + ($d | tostring) + " ms") end)
      + (if .repeated_for_other_load then " (repeated: other load)" else "" end) + " |"
      end' "$file"
}
{
    echo "# Cross-node fan-out: Redis and NATS against one node, unsigned and signed"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- server: sockudo $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?') (target/release/sockudo), brokers: redis-server $(redis-server --version 2>/dev/null | awk '{print $3}' | sed 's/v=//'), nats-server $(nats-server --version 2>/dev/null | awk '{print $NF}')"
    echo "- machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || echo '?')), Linux $(uname -r); the nodes, the broker and the load generator share these cores; all traffic on loopback"
    echo "- every node: \`HOST=127.0.0.1 PORT=<free> METRICS_HOST=127.0.0.1 METRICS_PORT=<free> SOCKUDO_MAX_CONNECTIONS=0\`, embedded default app; the two nodes of a cluster are measured only once both report \`sockudo_horizontal_adapter_nodes\` = 2"
    echo "- every sockudo-bench command also took \`--host 127.0.0.1 --quiet-below 10 --quiet-wait $QUIET_WAIT --json\`; A and B are the nodes' ports / pids. Publishes go to A only; subscriber i connects to A if i is even, to B if odd ($((SUBS - SUBS / 2)) on A, $((SUBS / 2)) on B)"
    echo "- latency: client-observed, from just before the publish's HTTP request to the subscriber parsing the frame (same process clock); server CPU is both nodes' together (\`--also-server-pid\`), per million deliveries; the broker's CPU counts as \"other load\""
    echo "- target (issue): cross-node p99 within 2 ms of the single-node figure"
    echo
    echo "| setup | commands | deliveries/s | latency p50 / p90 / p99 / max ms | lost / dup / unexpected | HTTP errors | subs disconnected | server CPU s per M deliveries | other load CPU s | p99 − single node |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    row "one node, local adapter" "$WORK/single.json" "$CMD_single"
    row "two nodes, Redis" "$WORK/redis-run.json" "$CMD_redis"
    row "two nodes, Redis, signed" "$WORK/redis_signed-run.json" "$CMD_signed"
    row "two nodes, NATS" "$WORK/nats-run.json" "$CMD_nats"
    row "two nodes, NATS, signed" "$WORK/nats_signed-run.json" "$CMD_signed"
    echo
    for l in "$SINGLE_LOG" "${LOGA_redis:-}" "${LOGB_redis:-}" "${LOGA_redis_signed:-}" "${LOGB_redis_signed:-}" \
        "${LOGA_nats:-}" "${LOGB_nats:-}" "${LOGA_nats_signed:-}" "${LOGB_nats_signed:-}"; do
        [[ -n "$l" && -f "$l" ]] || continue
        p="$(log_problems "$l")"
        [[ -n "$p" ]] && printf -- '- warnings/errors in %s:\n\n```\n%s\n```\n' "$(basename "$l" .log)" "$p"
    done
    for p in "${PROBLEMS[@]}"; do echo "- $p"; done
    echo
    echo "Full figures (publish round trips, per-port split, CPU of both sides): \`$(basename "$JSON")\`."
} >"$OUT"
log "wrote $OUT"
cat "$OUT"
