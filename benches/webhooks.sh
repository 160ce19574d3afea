#!/usr/bin/env bash
# Webhook delivery through the three queue drivers: WEBHOOK_QUEUE_DRIVER=memory, redis (a Redis
# Stream on 127.0.0.1:6379) and nats (JetStream on 127.0.0.1:4222), the adapter local in all
# three. Per round and load, for each driver in turn, a fresh target/release/sockudo whose one
# app sends `client_event` webhooks to benches/webhook_load.py's sink (answers 200 at once),
# and the same script's producer: WH_SOCKETS sockets, each on its own private channel, sending
# client events whose data carries the send time. Three loads:
#   light   WH_LIGHT_RATE events/s for WH_LIGHT_T s: batches close on the 50 ms window;
#   heavy   WH_RATE events/s for WH_T s: batches close at 100 events;
#   hiccup  WH_RATE events/s for WH_HICCUP_T s, the sink holding its answer to its 100th
#           request for WH_HICCUP_MS ms (a receiver's pause): what each queue does with the
#           backlog, waiting up to WH_HICCUP_DRAIN s for events put back for later.
# The delay is from the producer's write of an event's frame to the sink having the request
# that carries it (same CLOCK_MONOTONIC), so it includes batching and the broker's journal.
# Events/s counts the events received on time (at most 1 s after the last write) per second of
# sending; later ones are "late", those never received (within the drain) "lost".
# Writes benches/results-webhooks.md and benches/results-webhooks.json (one object per run,
# then a summary with the redis/memory and nats/memory ratios).
#
# Needs redis-server on 127.0.0.1:6379 and nats-server with JetStream on 127.0.0.1:4222; every
# run uses a fresh prefix (adapter.redis.prefix / adapter.nats.prefix) and removes its keys /
# streams afterwards.
# Environment: WH_RATE (10000), WH_T (15), WH_LIGHT_RATE (200), WH_LIGHT_T (8), WH_SOCKETS (4),
# WH_DRAIN (15 s to wait for the last events), WH_HICCUP_T (4), WH_HICCUP_MS (400),
# WH_HICCUP_DRAIN (50), WH_LOADS ("light heavy hiccup"), ROUNDS (1), BENCH_QUIET_WAIT (60),
# BENCH_REDIS_URL, BENCH_NATS_URL, BENCH_NO_BUILD=1 to skip the build. About 4 minutes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
OUT="$ROOT/benches/results-webhooks.md"
JSON="${OUT%.md}.json"
RATE="${WH_RATE:-10000}" T="${WH_T:-15}" LRATE="${WH_LIGHT_RATE:-200}" LT="${WH_LIGHT_T:-8}"
SOCKETS="${WH_SOCKETS:-4}" DRAIN="${WH_DRAIN:-15}" ROUNDS="${ROUNDS:-1}" LOADS="${WH_LOADS:-light heavy hiccup}"
HT="${WH_HICCUP_T:-4}" HMS="${WH_HICCUP_MS:-400}" HDRAIN="${WH_HICCUP_DRAIN:-50}" HAT=100
REDIS_URL_="${BENCH_REDIS_URL:-redis://127.0.0.1:6379}"
NATS_URL_="${BENCH_NATS_URL:-nats://127.0.0.1:4222}"
LOAD="$ROOT/benches/webhook_load.py"
BATCH_MS=50

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    log "building sockudo"
    cargo build --release -p sockudo -p sockudo-bench
fi
redis-cli -u "$REDIS_URL_" ping >/dev/null || { echo "no Redis at $REDIS_URL_" >&2; exit 1; }

RUNS="$WORK/runs"
mkdir -p "$RUNS"
PROBLEMS=()
LOGS=()

# The pid of the process listening on the port of URL (for its CPU time), or empty.
listener_pid() {
    local port="${1##*:}"
    port="${port%%/*}"
    ss -ltnpH "sport = :$port" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 || true
}
# The sum of each outcome of sockudo_webhooks_total and the queue gauge, as JSON.
webhook_metrics() {
    curl -s --max-time 2 "http://127.0.0.1:$1/metrics" | awk '
        /^sockudo_webhooks_total\{/ { match($0, /outcome="[a-z]+"/); o = substr($0, RSTART + 9, RLENGTH - 10); s[o] += $NF }
        /^sockudo_webhook_queue_events[{ ]/ { q += $NF }
        END { printf "{"; for (o in s) printf "\"%s\":%d,", o, s[o]; printf "\"queue_events\":%d}\n", q }'
}

# run LOAD DRIVER ROUND: one measurement on a fresh server and sink.
run() {
    local load="$1" driver="$2" round="$3" rate="$RATE" secs="$T" drain="$DRAIN" sink_args=()
    case "$load" in
        light) rate="$LRATE" secs="$LT" ;;
        hiccup) secs="$HT" drain="$HDRAIN" sink_args=(--stall-at "$HAT" --stall-ms "$HMS") ;;
    esac
    local name="$load-$driver-$round" prefix
    prefix="whbench-$(date +%s)-$RANDOM"
    local sink_port cfg="$WORK/$name.toml" broker_pid="" envs=(WEBHOOK_QUEUE_DRIVER="$driver")
    sink_port="$(free_port)"
    python3 "$LOAD" sink --port "$sink_port" "${sink_args[@]}" >"$WORK/sink-$name.log" 2>&1 &
    local sink_pid=$!
    STARTED_PIDS+=("$sink_pid")
    wait_port "$sink_port" "$WORK/sink-$name.log"
    cat >"$cfg" <<EOF
[webhooks]
batch_ms = $BATCH_MS

[adapter]
driver = "local"

[adapter.redis]
prefix = "$prefix"

[adapter.nats]
prefix = "$prefix"

[[app_manager.array.apps]]
id = "app-id"
key = "app-key"
secret = "app-secret"
enable_client_messages = true
max_client_events_per_second = 0

[[app_manager.array.apps.webhooks]]
url = "http://127.0.0.1:$sink_port/webhooks"
event_types = ["client_event"]
EOF
    case "$driver" in
        redis) envs+=("REDIS_URL=$REDIS_URL_"); broker_pid="$(listener_pid "$REDIS_URL_")" ;;
        nats) envs+=("NATS_SERVERS=$NATS_URL_"); broker_pid="$(listener_pid "$NATS_URL_")" ;;
    esac
    start_node "$name" "${envs[@]}" -- --config "$cfg"
    LOGS+=("$NODE_LOG")
    log "$name: $rate events/s for $secs s over $SOCKETS sockets; sink :$sink_port; broker pid ${broker_pid:-none}"
    local file="$RUNS/$name.json" flags=()
    [[ -n "$broker_pid" ]] && flags=(--broker-pid "$broker_pid")
    if ! python3 "$LOAD" produce --port "$NODE_PORT" --sink-port "$sink_port" --sockets "$SOCKETS" \
        --rate "$rate" --duration "$secs" --drain "$drain" --server-pid "$NODE_PID" --sink-pid "$sink_pid" \
        --metrics-port "$NODE_METRICS_PORT" \
        "${flags[@]}" --quiet-below 10 --quiet-wait "$QUIET_WAIT" >"$file.raw" 2>"$WORK/produce-$name.log"; then
        PROBLEMS+=("$name: the producer failed: $(tail -3 "$WORK/produce-$name.log" | tr '\n' ' ')")
        echo '{}' >"$file.raw"
    fi
    sed 's/^/    /' "$WORK/produce-$name.log" >&2 || true
    # The server's own count, a moment after the sink had everything (the last request's
    # outcome is counted once its answer is read).
    sleep 0.5
    local metrics
    metrics="$(webhook_metrics "$NODE_METRICS_PORT")"
    log "$name: sockudo_webhooks_total by outcome (requests; dropped counts events) and queue depth: $metrics"
    if ! kill -0 "$NODE_PID" 2>/dev/null; then
        PROBLEMS+=("$name: the server process had exited by the end of the run")
    fi
    jq -c --arg load "$load" --arg driver "$driver" --argjson round "$round" --argjson metrics "$metrics" \
        --arg prefix "$prefix" '{load: $load, driver: $driver, round: $round, prefix: $prefix, metrics: $metrics, report: .}' \
        "$file.raw" >"$file"
    jq -r '"    sent \(.report.sent // "?") delivered \(.report.sink.unique_events // "?") (late \(.report.late // "?")), on time \(.report.on_time_per_second // 0 | round)/s, delay p50 \(.report.sink.delay_ms.p50 // "?") p99 \(.report.sink.delay_ms.p99 // "?") ms, server \(.report.server_cpu_us_per_event // "?") us/event"' "$file" >&2
    stop_all
    case "$driver" in
        redis) redis-cli -u "$REDIS_URL_" DEL "{$prefix:webhooks}:queue" "{$prefix:webhooks}:depth" "{$prefix:webhooks}:bytes" \
            "{$prefix:webhooks}:total" "{$prefix:webhooks}:dead" >/dev/null || true ;;
        nats)
            local s
            s="$(tr -c 'A-Za-z0-9\n' '_' <<<"$prefix" | tr '[:lower:]' '[:upper:]')"
            python3 "$LOAD" nats-delete --port "${NATS_URL_##*:}" "${s}_WEBHOOKS" "${s}_WEBHOOKS_DEAD" >/dev/null || true ;;
    esac
}

for round in $(seq 1 "$ROUNDS"); do
    for load in $LOADS; do
        for driver in memory redis nats; do
            run "$load" "$driver" "$round"
        done
    done
done

# --- summary ----------------------------------------------------------------------------------
SUMMARY="$(jq -s '
  def mean(f): map(f | select(. != null)) | if length == 0 then null else add / length end;
  def ratio(a; b): if a == null or b == null or b == 0 then null else a / b end;
  def fig(l; d): map(select(.load == l and .driver == d and (.report | length) > 0)) |
    {runs: length, offered: mean(.report.offered_rate), sent: mean(.report.sent), delivered: mean(.report.sink.unique_events),
     events_per_second: mean(.report.on_time_per_second), late: mean(.report.late), lost: mean(.report.lost), duplicates: mean(.report.sink.duplicate_events),
     dropped: mean(.metrics.dropped // 0), p50_ms: mean(.report.sink.delay_ms.p50), p90_ms: mean(.report.sink.delay_ms.p90),
     p99_ms: mean(.report.sink.delay_ms.p99), max_ms: mean(.report.sink.delay_ms.max), events_per_request: mean(.report.sink.events_per_request.mean),
     server_cpu_us: mean(.report.server_cpu_us_per_event), broker_cpu_us: mean(.report.broker_cpu_us_per_event),
     other_cpu_s: mean(.report.cpu.other_cpu_seconds)};
  . as $all | [ "light", "heavy", "hiccup" ] | map(. as $l | {key: $l, value: (
    ["memory", "redis", "nats"] | map(. as $d | {key: $d, value: ($all | fig($l; $d))}) | from_entries |
    . as $f | .ratios = (["redis", "nats"] | map(. as $d | {key: $d, value: {
      events_per_second: ratio($f[$d].events_per_second; $f.memory.events_per_second),
      p50: ratio($f[$d].p50_ms; $f.memory.p50_ms), p99: ratio($f[$d].p99_ms; $f.memory.p99_ms),
      server_cpu_per_event: ratio($f[$d].server_cpu_us; $f.memory.server_cpu_us),
      server_and_broker_cpu_per_event: ratio(($f[$d].server_cpu_us // 0) + ($f[$d].broker_cpu_us // 0); $f.memory.server_cpu_us)}}) | from_entries)
  )}) | from_entries
' "$RUNS"/*-*-*.json)"
{
    cat "$RUNS"/*-*-*.json
    jq -c '{summary: .}' <<<"$SUMMARY"
} >"$JSON"

F='def f(d): if . == null then "n/a" else (. * pow(10; d) | round / pow(10; d) | tostring) end;'
run_row() {
    jq -r "$F"'.report as $r | if ($r | length) == 0 then "| \(.driver) | \(.load) | \(.round) | failed | | | | | | | |" else
      "| \(.driver) | \(.load) | \(.round) | \($r.offered_rate | f(0)) / \($r.sent) | \($r.on_time_per_second | f(0)) | "
      + "\($r.sink.delay_ms.p50 | f(1)) / \($r.sink.delay_ms.p90 | f(1)) / \($r.sink.delay_ms.p99 | f(1)) / \($r.sink.delay_ms.max | f(1)) | "
      + "\($r.late) / \($r.lost) / \(.metrics.dropped // 0) / \($r.sink.duplicate_events) / \(.metrics.queue_events // "n/a") | \($r.sink.requests) (\($r.sink.events_per_request.mean | f(1))) | "
      + "\($r.server_cpu_us_per_event | f(1)) | \($r.broker_cpu_us_per_event | f(1)) | \($r.cpu.other_cpu_seconds | f(1)) in \($r.cpu.wall_seconds | f(1)) s |" end' "$1"
}
s() { jq -r "$F $1" <<<"$SUMMARY"; }
sum_row() {
    local l="$1" d="$2"
    s "(.$l.$d) as \$x | (.$l.ratios.$d // null) as \$r |
      \"| $d | $l | \(\$x.offered | f(0)) | \(\$x.events_per_second | f(0)) | \(\$x.late | f(0)) / \(\$x.lost | f(0)) / \(\$x.dropped | f(0)) | \(\$x.p50_ms | f(1)) | \(\$x.p99_ms | f(1)) | \(\$x.server_cpu_us | f(1)) | \(\$x.broker_cpu_us | f(1)) | \"
      + (if \$r == null then \"1 (baseline) | 1 | 1 | 1 | 1 |\" else
      \"\(\$r.events_per_second | f(2)) | \(\$r.p50 | f(2)) | \(\$r.p99 | f(2)) | \(\$r.server_cpu_per_event | f(2)) | \(\$r.server_and_broker_cpu_per_event | f(2)) |\" end)"
}
# The loads that ran, in the order the tables show them.
SHOWN=()
for l in heavy light hiccup; do [[ " $LOADS " == *" $l "* ]] && SHOWN+=("$l"); done
{
    echo "# Webhooks: memory, Redis and NATS queue drivers"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); command: \`benches/webhooks.sh\` (WH_LOADS=\"$LOADS\" WH_RATE=$RATE WH_T=$T WH_LIGHT_RATE=$LRATE WH_LIGHT_T=$LT WH_HICCUP_T=$HT WH_HICCUP_MS=$HMS WH_HICCUP_DRAIN=$HDRAIN WH_SOCKETS=$SOCKETS WH_DRAIN=$DRAIN ROUNDS=$ROUNDS BENCH_QUIET_WAIT=$QUIET_WAIT)"
    echo "- server: sockudo $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?') (server source: $(git -C "$ROOT" log -1 --format=%h -- src Cargo.toml 2>/dev/null || echo '?')) (target/release/sockudo), a fresh process per run: \`HOST=127.0.0.1 PORT=<free> METRICS_HOST=127.0.0.1 METRICS_PORT=<free> SOCKUDO_MAX_CONNECTIONS=0 WEBHOOK_QUEUE_DRIVER=<driver> [REDIS_URL=$REDIS_URL_ | NATS_SERVERS=$NATS_URL_] sockudo --config run.toml\`"
    echo "- run.toml: \`webhooks.batch_ms = $BATCH_MS\` (the default; every other \`webhooks.*\` setting at its default: 4 workers, 2 requests of an app in flight, at most 100 events per request, 1000 events of an app queued on the node and, for Redis, in the stream (NATS: 1000 requests), \`claim_idle_ms\` 30000), \`adapter.driver = \"local\"\`, \`adapter.redis.prefix\` = \`adapter.nats.prefix\` = \`whbench-<time>-<rand>\` (fresh per run; the keys / streams are deleted after it), one app (\`app-id\`/\`app-key\`/\`app-secret\`) with \`enable_client_messages = true\`, \`max_client_events_per_second = 0\` and one webhook \`{url = \"http://127.0.0.1:<sink>/webhooks\", event_types = [\"client_event\"]}\`"
    echo "- brokers: redis-server $(redis-server --version 2>/dev/null | awk '{print $3}' | sed 's/v=//') (Redis Stream + consumer group), nats-server $(nats-server --version 2>/dev/null | awk '{print $NF}') (JetStream work-queue stream, file storage); the broker is shared with whatever else uses it on this machine"
    echo "- sink: \`python3 benches/webhook_load.py sink\` (ThreadingHTTPServer, HTTP/1.1 keep-alive): answers 200 with an empty body as soon as the body is read, then checks \`X-Pusher-Signature\` and reads the events; for hiccup with \`--stall-at $HAT --stall-ms $HMS\` (its ${HAT}th request is answered $HMS ms late)"
    echo "- producer: \`python3 benches/webhook_load.py produce --sockets $SOCKETS --rate R --duration T --drain D --metrics-port <server> --quiet-below 10 --quiet-wait $QUIET_WAIT\`: $SOCKETS WebSocket connections, each subscribed to its own \`private-wh-…\` channel (auth signed with the secret), sending \`{\"event\":\"client-wh\",\"channel\":…,\"data\":\"SEQ:NANOS\"}\` round-robin on a fixed schedule (every 2 ms whatever is due, one write per socket); nobody else is subscribed, so the server's only work per event is the webhook"
    echo "- loads: heavy $RATE events/s for $T s (batches close at 100 events); light $LRATE events/s for $LT s (batches close on the $BATCH_MS ms window); hiccup $RATE events/s for $HT s with the sink's pause, drained up to $HDRAIN s"
    echo "- delay: from CLOCK_MONOTONIC read just before the write of the event's frame (NANOS) to the sink having the whole request that carries it; it includes the ${BATCH_MS} ms batch window (or filling a batch of 100), the broker's journal for redis/nats, and the HTTP request. events/s: distinct events received on time (at most 1 s after the last write) per second of sending, so the offered rate when all are on time; late: received after that (within the drain: $DRAIN s, hiccup $HDRAIN s); lost: never received; dropped: the server's \`sockudo_webhooks_total{outcome=\"dropped\"}\` (events refused by a full queue; they are part of lost)"
    echo "- CPU: utime+stime from \`/proc\` over sending and drain, divided by events delivered (broker: the process listening on the broker's port, shared with anything else using it). At the light load the server's figure is mostly a per-wake cost, not per-event work: on this machine an isolated client event costs the server about 20-30 ms of CPU in ordinary code (session, tracing spans, webhook flush, reqwest; seen with perf), so compare CPU at the heavy load only"
    echo "- machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || echo '?')), Linux $(uname -r); server, broker, producer and sink share these cores (at the heavy load they use most of both); loopback only; \"other load\" is CPU used by other processes during the run"
    echo
    echo "## Summary (means over rounds; ratios against memory in the same run)"
    echo
    echo "| driver | load | offered events/s | events/s on time | late / lost / dropped | delay p50 ms | delay p99 ms | server CPU-µs per event | broker CPU-µs per event | events/s vs memory | p50 vs memory | p99 vs memory | server CPU vs memory | server+broker CPU vs memory |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    for l in "${SHOWN[@]}"; do
        for d in memory redis nats; do sum_row "$l" "$d"; done
    done
    echo
    echo "How the queues behave here (from the code, \`src/webhooks/\`; the figures above show it):"
    echo
    echo "- memory: an app's events wait on the node under \`max_queue_events_per_app\` (1000): a receiver pause longer than about 1000 events' worth (0.1 s at $RATE/s) drops the rest (\`app_share_full\`)"
    echo "- redis: the same 1000 events bound the app's events on the node until the journal has appended them, and again in the stream (the append script refuses a request over it: \"webhook queue full for this app\"); so a pause drops about as much as memory"
    echo "- nats: the stream bounds an app's *requests* (1000, each up to 100 events), so a pause is absorbed; the node-side bound still drops when the journal (one publish and its ack at a time) falls behind"
    echo "- both brokers: the consumer takes up to \`4 × workers\` (16) requests at once but works on at most \`4 × max_in_flight_per_app\` (8) of one app; the rest are put back for \`claim_idle_ms\` (30 s): NATS redelivers them after 30 s (NAK with that delay), Redis leaves them pending until an XAUTOCLAIM finds them idle (30 s, scanned every 15 s: 30-45 s). With a backlog of more than 8 requests of one app, some of its events arrive 30-45 s late (\"late\", or \"lost\" and \"left in queue\" when past the drain)"
    echo "- left in queue: \`sockudo_webhook_queue_events\` at the end (for NATS it counts requests, not events), read 0.5 s after the drain (the broker depth behind it is refreshed once a second, so it can lag)"
    echo
    echo "## Every run"
    echo
    echo "| driver | load | round | offered events/s / sent | events/s on time | delay p50 / p90 / p99 / max ms | late / lost / dropped / dup / left in queue | requests (events per request) | server CPU-µs per event | broker CPU-µs per event | other load CPU s |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
    for l in "${SHOWN[@]}"; do
        for d in memory redis nats; do
            for f in "$RUNS/$l-$d"-*.json; do [[ -f "$f" ]] && run_row "$f"; done
        done
    done
    echo
    report_problems "${LOGS[@]}"
    echo
    echo "Full figures (per-second receipts, CPU of every side, the server's webhook counters): \`$(basename "$JSON")\` (one object per run, then the summary)."
} >"$OUT"
log "wrote $OUT"
cat "$OUT"
