#!/usr/bin/env bash
# Build variants: the same server built with each allocator (system, mimalloc, jemalloc) and
# with a heavier release profile (fat LTO, one codegen unit), measured with the same two runs:
#   - fan-out 1000 subscribers x 1 channel at 100 publishes/s (100k deliveries/s): server CPU
#     seconds per million deliveries and latency;
#   - 10,000 idle subscribed connections: server memory per connection.
# Each variant but the default (mimalloc) is built into its own target directory (target/variants/<name>), runs on a
# fresh process, and the variants are interleaved ROUNDS times. Writes benches/results-variants.md
# and benches/results-variants.json.
#
# Environment: VARIANTS ("system mimalloc jemalloc fat-lto"), ROUNDS (2), VARIANT_T (15),
# VARIANT_CONNS (10000), BENCH_QUIET_WAIT (60), BENCH_NO_BUILD=1 to reuse earlier builds.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
OUT="$ROOT/benches/results-variants.md"
JSON="${OUT%.md}.json"
VARIANTS="${VARIANTS:-system mimalloc jemalloc fat-lto}"
ROUNDS="${ROUNDS:-2}" T="${VARIANT_T:-15}" CONNS="${VARIANT_CONNS:-10000}"

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# build_variant NAME: prints the binary's path.
build_variant() {
    local name="$1" dir="$ROOT/target/variants/$1" feats=() envs=()
    case "$name" in
        system) feats=(--no-default-features) ;;
        mimalloc) dir="$ROOT/target" ;;
        jemalloc) feats=(--no-default-features --features alloc-jemalloc) ;;
        fat-lto) envs=(CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1) ;;
        *) echo "unknown variant $name" >&2; return 1 ;;
    esac
    if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
        log "building variant $name"
        env CARGO_TARGET_DIR="$dir" "${envs[@]}" cargo build --locked --release -p sockudo "${feats[@]}" >&2
    fi
    echo "$dir/release/sockudo"
}

if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    log "building sockudo-bench"
    cargo build --locked --release -p sockudo-bench
fi
declare -A BIN
for v in $VARIANTS; do BIN[$v]="$(build_variant "$v")"; done

FANOUT=(fanout --subscribers 1000 --channels 1 --rate 100 --duration "$T")
CONNECT=(connections --connections "$CONNS" --channels 100 --concurrency 200 --hold 5)
: >"$JSON"

run_one() {
    local v="$1" round="$2" kind="$3"
    shift 3
    SOCKUDO="${BIN[$v]}"
    start_node "$v-$kind-$round"
    local file="$WORK/$v-$kind-$round.json"
    log "variant $v, $kind, round $round"
    if ! "$BENCH" --port "$NODE_PORT" --server-pid "$NODE_PID" --quiet-below 10 --quiet-wait "$QUIET_WAIT" --json "$@" >"$file"; then
        echo '{}' >"$file"
    fi
    jq -c --arg v "$v" --arg kind "$kind" --arg round "$round" '. + {variant: $v, kind: $kind, round: ($round | tonumber)}' "$file" >>"$JSON" || true
    stop_all
}

for round in $(seq 1 "$ROUNDS"); do
    for v in $VARIANTS; do
        run_one "$v" "$round" fanout "${FANOUT[@]}"
        run_one "$v" "$round" connections "${CONNECT[@]}"
    done
done

# Mean of a figure over the rounds of one variant and kind.
mean() {
    cat "$WORK/$1-$2"-*.json | jq -s "[.[] | $3 | select(. != null)] | if length == 0 then null else add / length end"
}
r2() { jq -nr --argjson x "$1" 'if $x == null then "n/a" else ($x * 100 | round / 100 | tostring) end'; }
size_mb() { jq -nr --argjson b "$(stat -c %s "$1")" '($b / 1048576 * 10 | round / 10 | tostring) + " MB"'; }

{
    echo "# Build variants: allocator and release profile"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- server: sockudo $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?'), the default build (mimalloc) in target/release, the others built into target/variants/<name>, a fresh process for every run; loopback only, the generator shares the $(nproc) cores"
    echo "- variants: mimalloc = the default build (\`lto = \"thin\"\`, 4 codegen units); system = \`--no-default-features\` (glibc malloc); jemalloc = \`--no-default-features --features alloc-jemalloc\`; fat-lto = the default plus \`CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1\`"
    echo "- runs: \`sockudo-bench --port <port> --server-pid <pid> --quiet-below 10 --json ${FANOUT[*]}\` and \`... ${CONNECT[*]}\`, interleaved over the variants, $ROUNDS rounds; means below"
    echo
    echo "| variant | binary | server CPU s per M deliveries at 100k/s | p50 / p99 ms | KB per idle connection | connects/s |"
    echo "|---|---|---|---|---|---|"
    for v in $VARIANTS; do
        echo "| $v | $(size_mb "${BIN[$v]}") | $(r2 "$(mean "$v" fanout .result.server_cpu_seconds_per_million_deliveries)") | $(r2 "$(mean "$v" fanout .result.latency.p50_ms)") / $(r2 "$(mean "$v" fanout .result.latency.p99_ms)") | $(r2 "$(mean "$v" connections .rss_per_connection_kb)") | $(r2 "$(mean "$v" connections .connects_per_second)") |"
    done
    echo
    echo "Full figures: \`$(basename "$JSON")\`."
} >"$OUT"
log "wrote $OUT"
cat "$OUT"
