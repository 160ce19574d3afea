#!/usr/bin/env bash
# Runs every cargo-fuzz target (or the ones named) for a bounded time, one after another on one
# core, and appends what happened to fuzz/results.md.
#
#   fuzz/run.sh [seconds-per-target] [target...]      (default: 60 seconds, every target)
#
# Needs the nightly toolchain; installs cargo-fuzz if it is missing. The growing corpus is kept
# in fuzz/corpus/<target>/ and crashes in fuzz/artifacts/<target>/ (both git-ignored); the
# hand-written seeds in fuzz/seeds/<target>/ are read but never written. A crash is minimised
# with `cargo +nightly fuzz tmin <target> <file>`, copied to fuzz/regressions/<target>/ and then
# replayed by `cargo test --test it fuzz_regressions`. Exits 1 if any target crashed or failed.
set -euo pipefail

seconds="${1:-60}"
shift || true
cd "$(dirname "$0")/.."

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for f in fuzz/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi

cargo +nightly fuzz build

mkdir -p fuzz/logs
rows=()
crashed=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    before=$(find "fuzz/artifacts/$t" -type f | wc -l)
    log="fuzz/logs/$t.log"
    echo "== $t: ${seconds}s"
    # One process, one core (no -jobs/-workers). -timeout turns a pathologically slow input
    # into a reported `timeout-*` artifact instead of a stalled run.
    status=0
    started=$(date +%s)
    cargo +nightly fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
        -dict=fuzz/dict/pusher.dict -print_final_stats=1 >"$log" 2>&1 || status=$?
    elapsed=$(($(date +%s) - started))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    crashes=$(($(find "fuzz/artifacts/$t" -type f | wc -l) - before))
    if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        # libFuzzer stopped by a signal ("run interrupted") or failed to build/start: no artifact.
        if grep -q 'run interrupted' "$log"; then crashes="0 (interrupted)"; else crashes="failed (exit $status, see $log)"; fi
    fi
    if [ "$status" -ne 0 ]; then crashed=1; fi
    echo "   ${elapsed}s, executions ${execs:-?}, corpus $corpus, crashes $crashes"
    rows+=("| $t | $elapsed | ${execs:-?} | $corpus | $crashes |")
done

{
    echo
    echo "## $(date -u +%Y-%m-%dT%H:%MZ), -max_total_time=${seconds} per target, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    echo "| target | seconds (wall) | executions | corpus entries | crashes |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
} >>fuzz/results.md
echo "results appended to fuzz/results.md"
exit "$crashed"
