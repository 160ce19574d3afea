#!/usr/bin/env bash
# What TLS costs: handshakes per second and server CPU per delivery, TLS against plain in the
# same run. Makes a throw-away CA and a server certificate (EC P-256, SAN localhost and
# 127.0.0.1) with openssl, then, per round, starts a fresh target/release/sockudo for each of
#   handshakes plain, handshakes TLS   (sockudo-bench handshakes: N connections to the welcome)
#   fan-out plain,    fan-out TLS      (sockudo-bench fanout: S subscribers, R publishes/s)
# in that order (plain and TLS alternate), and writes benches/results-tls.md and
# benches/results-tls.json (one object per run, then a summary with the TLS/plain ratios).
#
# Environment: TLS_CONNECTIONS (5000), TLS_CONCURRENCY (200), TLS_SUBS (1000), TLS_RATE (20),
# TLS_T (10 s of publishing), TLS_ROUNDS (1), BENCH_QUIET_WAIT (60), BENCH_NO_BUILD=1 to skip
# the build.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
OUT="$ROOT/benches/results-tls.md"
JSON="${OUT%.md}.json"
N="${TLS_CONNECTIONS:-5000}" CONC="${TLS_CONCURRENCY:-200}"
SUBS="${TLS_SUBS:-1000}" RATE="${TLS_RATE:-20}" T="${TLS_T:-10}" ROUNDS="${TLS_ROUNDS:-1}"

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    log "building sockudo and sockudo-bench"
    cargo build --release -p sockudo -p sockudo-bench
fi

# --- certificates -----------------------------------------------------------------------------
CERTS="$WORK/certs"
mkdir -p "$CERTS"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days 2 \
    -subj "/CN=sockudo-bench test CA" -keyout "$CERTS/ca.key" -out "$CERTS/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
    -subj "/CN=localhost" -keyout "$CERTS/server.key" -out "$CERTS/server.csr" 2>/dev/null
printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >"$CERTS/ext.cnf"
openssl x509 -req -in "$CERTS/server.csr" -CA "$CERTS/ca.pem" -CAkey "$CERTS/ca.key" -CAcreateserial \
    -days 2 -sha256 -extfile "$CERTS/ext.cnf" -out "$CERTS/server.pem" 2>/dev/null
log "certificates in $CERTS: $(openssl x509 -in "$CERTS/server.pem" -noout -subject -ext subjectAltName | tr '\n' ' ')"
TLS_ENV=(SSL_ENABLED=true "SSL_CERT_PATH=$CERTS/server.pem" "SSL_KEY_PATH=$CERTS/server.key")
TLS_FLAGS=(--tls --ca "$CERTS/ca.pem")

HANDSHAKES=(handshakes --connections "$N" --concurrency "$CONC")
FANOUT=(fanout --subscribers "$SUBS" --channels 1 --rate "$RATE" --duration "$T")
PROBLEMS=()
LOGS=()
RUNS="$WORK/runs"
mkdir -p "$RUNS"

# start MODE NAME: a fresh server, with TLS on for MODE=tls (checked over https with the CA).
start() {
    local mode="$1" name="$2"
    if [[ "$mode" == tls ]]; then
        start_node "$name" "${TLS_ENV[@]}"
        local code
        code="$(curl -s --max-time 5 --cacert "$CERTS/ca.pem" -o /dev/null -w '%{http_code}' "https://127.0.0.1:$NODE_PORT/" || true)"
        log "$name: https://127.0.0.1:$NODE_PORT/ answers HTTP $code"
        if [[ -z "$code" || "$code" == 000 ]]; then
            echo "the TLS server does not answer https; log:" >&2
            cat "$NODE_LOG" >&2
            exit 1
        fi
    else
        start_node "$name"
    fi
    LOGS+=("$NODE_LOG")
}

# measure KIND MODE ROUND BENCH-ARGS...: one run against a fresh server; its JSON report goes
# to $RUNS/KIND-MODE-ROUND.json with kind, mode and round added.
measure() {
    local kind="$1" mode="$2" round="$3"
    shift 3
    local file="$RUNS/$kind-$mode-$round.json" flags=()
    [[ "$mode" == tls ]] && flags=("${TLS_FLAGS[@]}")
    start "$mode" "$kind-$mode-$round"
    log "$kind $mode (round $round): sockudo-bench ${flags[*]} $*"
    if ! "$BENCH" --quiet-below 10 --quiet-wait "$QUIET_WAIT" --json --port "$NODE_PORT" --server-pid "$NODE_PID" \
        "${flags[@]}" "$@" >"$file.raw"; then
        echo "scenario failed: $kind $mode round $round" >&2
        PROBLEMS+=("$kind $mode round $round: the scenario failed (see the server log excerpt below)")
        echo '{}' >"$file.raw"
    fi
    if ! kill -0 "$NODE_PID" 2>/dev/null; then
        PROBLEMS+=("$kind $mode round $round: the server process had exited by the end of the run")
    fi
    jq -c --arg kind "$kind" --arg mode "$mode" --argjson round "$round" \
        '{kind: $kind, mode: $mode, round: $round, report: .}' "$file.raw" >"$file"
    stop_all
}

for round in $(seq 1 "$ROUNDS"); do
    measure handshakes plain "$round" "${HANDSHAKES[@]}"
    measure handshakes tls "$round" "${HANDSHAKES[@]}"
    measure fanout plain "$round" "${FANOUT[@]}"
    measure fanout tls "$round" "${FANOUT[@]}"
done

# --- summary ----------------------------------------------------------------------------------
SUMMARY="$(jq -s '
  def mean(f): map(f | select(. != null)) | if length == 0 then null else add / length end;
  def pick(k; m): map(select(.kind == k and .mode == m and (.report | length) > 0));
  def ratio(a; b): if a == null or b == null or b == 0 then null else a / b end;
  (pick("handshakes"; "plain")) as $hp | (pick("handshakes"; "tls")) as $ht |
  (pick("fanout"; "plain")) as $fp | (pick("fanout"; "tls")) as $ft |
  {
    handshakes: {
      plain: {per_second: ($hp | mean(.report.handshakes_per_second)), server_cpu_ms: ($hp | mean(.report.server_cpu_ms_per_handshake)),
              bench_cpu_ms: ($hp | mean(.report.bench_cpu_ms_per_handshake)), p50_ms: ($hp | mean(.report.latency.p50_ms)), p99_ms: ($hp | mean(.report.latency.p99_ms))},
      tls: {per_second: ($ht | mean(.report.handshakes_per_second)), server_cpu_ms: ($ht | mean(.report.server_cpu_ms_per_handshake)),
            bench_cpu_ms: ($ht | mean(.report.bench_cpu_ms_per_handshake)), p50_ms: ($ht | mean(.report.latency.p50_ms)), p99_ms: ($ht | mean(.report.latency.p99_ms)),
            tls_p50_ms: ($ht | mean(.report.tls_latency.p50_ms)), tls_p99_ms: ($ht | mean(.report.tls_latency.p99_ms)), session: ($ht | map(.report.tls_session) | first)}
    },
    fanout: {
      plain: {deliveries_per_second: ($fp | mean(.report.result.deliveries_per_second)), server_cpu_s_per_m: ($fp | mean(.report.result.server_cpu_seconds_per_million_deliveries)),
              client_cpu_us: ($fp | mean(.report.result.client_cpu_us_per_delivery)), p50_ms: ($fp | mean(.report.result.latency.p50_ms)), p99_ms: ($fp | mean(.report.result.latency.p99_ms))},
      tls: {deliveries_per_second: ($ft | mean(.report.result.deliveries_per_second)), server_cpu_s_per_m: ($ft | mean(.report.result.server_cpu_seconds_per_million_deliveries)),
            client_cpu_us: ($ft | mean(.report.result.client_cpu_us_per_delivery)), p50_ms: ($ft | mean(.report.result.latency.p50_ms)), p99_ms: ($ft | mean(.report.result.latency.p99_ms))}
    }
  } | .ratios = {
    handshakes_per_second: ratio(.handshakes.tls.per_second; .handshakes.plain.per_second),
    server_cpu_per_handshake: ratio(.handshakes.tls.server_cpu_ms; .handshakes.plain.server_cpu_ms),
    bench_cpu_per_handshake: ratio(.handshakes.tls.bench_cpu_ms; .handshakes.plain.bench_cpu_ms),
    handshake_p50: ratio(.handshakes.tls.p50_ms; .handshakes.plain.p50_ms),
    handshake_p99: ratio(.handshakes.tls.p99_ms; .handshakes.plain.p99_ms),
    server_cpu_per_delivery: ratio(.fanout.tls.server_cpu_s_per_m; .fanout.plain.server_cpu_s_per_m),
    client_cpu_per_delivery: ratio(.fanout.tls.client_cpu_us; .fanout.plain.client_cpu_us),
    delivery_p50: ratio(.fanout.tls.p50_ms; .fanout.plain.p50_ms),
    delivery_p99: ratio(.fanout.tls.p99_ms; .fanout.plain.p99_ms)
  } | .extra_server_cpu_ms_per_tls_handshake =
      (if .handshakes.tls.server_cpu_ms == null or .handshakes.plain.server_cpu_ms == null then null
       else .handshakes.tls.server_cpu_ms - .handshakes.plain.server_cpu_ms end)
' "$RUNS"/*-*-*.json)"
{
    cat "$RUNS"/*-*-*.json
    jq -c '{summary: .}' <<<"$SUMMARY"
} >"$JSON"

s() { jq -r "def f(d): if . == null then \"n/a\" else (. * pow(10; d) | round / pow(10; d) | tostring) end; $1" <<<"$SUMMARY"; }
hs_row() {
    jq -r 'def f(d): if . == null then "n/a" else (. * pow(10; d) | round / pow(10; d) | tostring) end;
      .report as $r | if ($r | length) == 0 then "| \(.mode) | \(.round) | failed | | | | | | |" else
      "| \(.mode) | \(.round) | \($r.opened) / \($r.failed) | \($r.handshakes_per_second | f(0)) | \($r.latency.p50_ms | f(2)) / \($r.latency.p99_ms | f(2)) | "
      + "\(if $r.tls_latency == null then "-" else "\($r.tls_latency.p50_ms | f(2)) / \($r.tls_latency.p99_ms | f(2))" end) | "
      + "\($r.server_cpu_ms_per_handshake | f(3)) | \($r.bench_cpu_ms_per_handshake | f(3)) | \($r.cpu.other_cpu_seconds | f(1)) in \($r.cpu.wall_seconds | f(1)) s |" end' "$1"
}
fan_row() {
    jq -r 'def f(d): if . == null then "n/a" else (. * pow(10; d) | round / pow(10; d) | tostring) end;
      .report.result as $r | if $r == null then "| \(.mode) | \(.round) | failed | | | | | | |" else
      "| \(.mode) | \(.round) | \($r.deliveries_per_second | f(0)) | \($r.latency.p50_ms | f(2)) / \($r.latency.p90_ms | f(2)) / \($r.latency.p99_ms | f(2)) / \($r.latency.max_ms | f(2)) | "
      + "\($r.missing) / \($r.duplicates) / \($r.http_errors) / \($r.subscribers_lost) | \($r.server_cpu_seconds_per_million_deliveries | f(2)) | \($r.client_cpu_us_per_delivery | f(2)) | "
      + "\($r.cpu.other_cpu_seconds | f(1)) in \($r.cpu.wall_seconds | f(1)) s\(if .report.repeated_for_other_load then " (repeated: other load)" else "" end) |" end' "$1"
}
{
    echo "# TLS against plain: handshakes and CPU per delivery"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); command: \`benches/tls.sh\` (TLS_CONNECTIONS=$N TLS_CONCURRENCY=$CONC TLS_SUBS=$SUBS TLS_RATE=$RATE TLS_T=$T TLS_ROUNDS=$ROUNDS)"
    echo "- server: sockudo $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?') (server source: $(git -C "$ROOT" log -1 --format=%h -- src Cargo.toml 2>/dev/null || echo '?')) (target/release/sockudo), a fresh process per run: \`HOST=127.0.0.1 PORT=<free> METRICS_HOST=127.0.0.1 METRICS_PORT=<free> SOCKUDO_MAX_CONNECTIONS=0\`, embedded default app; TLS runs add \`SSL_ENABLED=true SSL_CERT_PATH=server.pem SSL_KEY_PATH=server.key\`"
    echo "- certificates: a throw-away CA and a server certificate signed by it, both EC P-256 (ECDSA-SHA256), SAN \`DNS:localhost,IP:127.0.0.1\`, made by openssl $(openssl version | awk '{print $2}'); the server presents the leaf alone"
    echo "- client: sockudo-bench with rustls (ring), \`--tls --ca ca.pem\`, verifying 127.0.0.1 against the SAN; ALPN http/1.1; **no session resumption** (every connection is a full handshake); agreed: $(s '.handshakes.tls.session // "n/a"'); publishes over HTTPS on keep-alive connections"
    echo "- machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || echo '?')), Linux $(uname -r); the server and the load generator share these cores (the generator does the client half of every handshake and decrypts every delivery); all traffic on loopback; \"other load\" is CPU used by other processes during the run"
    echo "- every sockudo-bench command also took \`--host 127.0.0.1 --port <server> --server-pid <server> --quiet-below 10 --quiet-wait $QUIET_WAIT --json\`, and \`--tls --ca ca.pem\` in TLS mode"
    echo
    echo "## Handshakes: \`sockudo-bench ${HANDSHAKES[*]}\`"
    echo
    echo "TCP connect, TLS handshake (TLS mode), WebSocket upgrade and \`pusher:connection_established\` for $N connections, $CONC in flight, held until the last is in. CPU per handshake is the server's (or the generator's) CPU while opening, divided by the connections opened."
    echo
    echo "| mode | round | opened / failed | handshakes/s | connect-to-welcome p50 / p99 ms | TLS handshake p50 / p99 ms | server CPU-ms per handshake | generator CPU-ms per handshake | other load CPU s |"
    echo "|---|---|---|---|---|---|---|---|---|"
    for f in "$RUNS"/handshakes-*-*.json; do hs_row "$f"; done
    echo
    echo "TLS / plain: handshakes/s **$(s '.ratios.handshakes_per_second | f(2)')**, server CPU per handshake **$(s '.ratios.server_cpu_per_handshake | f(2)')** ($(s '.handshakes.tls.server_cpu_ms | f(3)') vs $(s '.handshakes.plain.server_cpu_ms | f(3)') ms: TLS adds $(s '.extra_server_cpu_ms_per_tls_handshake | f(3)') server CPU-ms per connection), generator CPU per handshake $(s '.ratios.bench_cpu_per_handshake | f(2)'), connect-to-welcome p50 $(s '.ratios.handshake_p50 | f(2)') / p99 $(s '.ratios.handshake_p99 | f(2)')."
    echo
    echo "## Fan-out: \`sockudo-bench ${FANOUT[*]}\`"
    echo
    echo "$SUBS subscribers on one channel, $RATE publishes/s for $T s. Server CPU is CPU-seconds of the server process (\`/proc/PID/stat\`) per million deliveries; latency is client-observed, from just before the publish's HTTP request to the subscriber's \`read()\` of the bytes that carried it (before decryption in TLS mode)."
    echo
    echo "| mode | round | deliveries/s | latency p50 / p90 / p99 / max ms | lost / dup / HTTP errors / subs lost | server CPU s per M deliveries | client CPU-µs per delivery | other load CPU s |"
    echo "|---|---|---|---|---|---|---|---|"
    for f in "$RUNS"/fanout-*-*.json; do fan_row "$f"; done
    echo
    echo "TLS / plain: server CPU per delivery **$(s '.ratios.server_cpu_per_delivery | f(2)')** ($(s '.fanout.tls.server_cpu_s_per_m | f(2)') vs $(s '.fanout.plain.server_cpu_s_per_m | f(2)') s per million), latency p50 **$(s '.ratios.delivery_p50 | f(2)')** / p99 **$(s '.ratios.delivery_p99 | f(2)')**, client CPU per delivery $(s '.ratios.client_cpu_per_delivery | f(2)')."
    echo
    report_problems "${LOGS[@]}"
    echo
    echo "Full figures (per-step latencies, CPU of both sides, failures): \`$(basename "$JSON")\` (one object per run, then the summary)."
} >"$OUT"
log "wrote $OUT"
cat "$OUT"
