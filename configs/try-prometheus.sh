#!/usr/bin/env bash
# Scrape a running Tessera with a real Prometheus (Debian: apt-get install prometheus), send a
# few requests, and ask Prometheus for the TTFT p50. Usage: configs/try-prometheus.sh [HOST:PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:-127.0.0.1:8000}
PROM_PORT=${PROM_PORT:-9090}
dir=$(mktemp -d)
sed "s/127.0.0.1:8000/$TARGET/" configs/prometheus.yml > "$dir/prometheus.yml"
prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
    --web.listen-address="127.0.0.1:$PROM_PORT" > "$dir/prometheus.log" 2>&1 &
pid=$!
trap 'kill $pid; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
sleep 6  # first scrape: counters start from here
for i in 1 2 3 4; do
  curl -s "http://$TARGET/v1/chat/completions" -H "Content-Type: application/json" \
    -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi!"}],
         "max_tokens": 8}' > /dev/null
done
sleep 16  # a few more scrapes
for query in \
  'histogram_quantile(0.5, sum by (le) (rate(tessera:time_to_first_token_seconds_bucket[1m])))' \
  'histogram_quantile(0.5, sum by (le) (tessera:time_to_first_token_seconds_bucket))'; do
  echo "PromQL: $query"
  curl -s --get "http://127.0.0.1:$PROM_PORT/api/v1/query" --data-urlencode "query=$query"
  echo
done
