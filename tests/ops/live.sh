#!/usr/bin/env bash
# Evaluate every shipped PromQL expression against a running sockudo.
#
#   SOCKUDO_METRICS_URL=http://127.0.0.1:19601 bash tests/ops/live.sh
#   LIVE_STRICT=1 ...   also fail when an expression returns no data (node_exporter ones excepted)
#
# Starts Debian's `prometheus` on a free 127.0.0.1 port with a copy of
# compose/prometheus/prometheus.yml whose sockudo targets point at SOCKUDO_METRICS_URL (rules kept,
# the Kubernetes job replayed as a static pod so its relabel rules are exercised), waits for a few
# scrapes, then queries /api/v1/query for every expression from tests/ops/promql.py and reports
# which parse and which return data. Stops its Prometheus on exit.
set -euo pipefail

: "${SOCKUDO_METRICS_URL:?set SOCKUDO_METRICS_URL, e.g. http://127.0.0.1:19601}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE/../.."

if ! command -v prometheus >/dev/null 2>&1; then
  echo "installing Debian's prometheus ..."
  if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -print -quit 2>/dev/null)" ]; then
    apt-get update -qq
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install -q pyyaml

case "$SOCKUDO_METRICS_URL" in
  http://127.*|http://localhost:*|http://\[::1\]:*) ;;
  *) echo "refusing non-loopback SOCKUDO_METRICS_URL: $SOCKUDO_METRICS_URL" >&2; exit 2 ;;
esac

if ! curl -fsS -o /dev/null --max-time 5 "$SOCKUDO_METRICS_URL/metrics" 2>/dev/null \
   && ! curl -fsS -o /dev/null --max-time 5 "$SOCKUDO_METRICS_URL" 2>/dev/null; then
  echo "warning: $SOCKUDO_METRICS_URL does not answer yet; Prometheus will keep trying" >&2
fi

WORK="$(mktemp -d)"
PROM_PID=""
cleanup() {
  if [ -n "$PROM_PID" ] && kill -0 "$PROM_PID" 2>/dev/null; then
    kill "$PROM_PID" 2>/dev/null || true
    wait "$PROM_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')"
PROM="http://127.0.0.1:$PORT"

python3 tests/ops/live.py config --url "$SOCKUDO_METRICS_URL" --out "$WORK" >/dev/null
promtool check config "$WORK/prometheus.yml" >/dev/null

prometheus \
  --config.file="$WORK/prometheus.yml" \
  --storage.tsdb.path="$WORK/data" \
  --web.listen-address="127.0.0.1:$PORT" \
  --log.level=warn >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!

for _ in $(seq 1 60); do
  curl -fsS -o /dev/null "$PROM/-/ready" 2>/dev/null && break
  kill -0 "$PROM_PID" 2>/dev/null || { cat "$WORK/prometheus.log" >&2; exit 1; }
  sleep 0.5
done
echo "prometheus on $PROM scraping $SOCKUDO_METRICS_URL"

if ! python3 tests/ops/live.py wait --prom "$PROM" --timeout "${LIVE_TIMEOUT:-60}"; then
  curl -fsS "$PROM/api/v1/targets" | python3 -c 'import json,sys; [print(t["labels"].get("job"), t["scrapeUrl"], t["health"], t["lastError"]) for t in json.load(sys.stdin)["data"]["activeTargets"]]' >&2 || true
  exit 1
fi

STRICT=()
[ "${LIVE_STRICT:-0}" = "1" ] && STRICT=(--strict)
python3 tests/ops/live.py eval --prom "$PROM" "${STRICT[@]}"
