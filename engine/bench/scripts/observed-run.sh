#!/usr/bin/env bash
# One fresh-run.sh benchmark with the observability on: /metrics served (and scraped every
# second, as Prometheus would), and every span exported over OTLP/HTTP to a local receiver
# (`otlp-sink`, started here on a free loopback port and stopped afterwards). Prints the
# benchmark's line, then how many spans the receiver took.
#
#   engine/bench/scripts/observed-run.sh LABEL path/to/sagaflow-bench path/to/otlp-sink [bench options...]
#   e.g. for i in 1 2 3; do fresh-run.sh off target/release/sagaflow-bench --sagas 10000
#          observed-run.sh on target/release/sagaflow-bench target/release/otlp-sink --sagas 10000; done
#
# Build both first: cargo build --release -p sagaflow-bench -p sagaflow-tests --bins
set -euo pipefail
label=$1
bench=$2
sink=$3
shift 3
here=$(cd "$(dirname "$0")" && pwd)
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
sink_port=$(free_port)
metrics_port=$(free_port)
sink_out=$(mktemp)
"$sink" "127.0.0.1:$sink_port" >"$sink_out" 2>/dev/null &
sink_pid=$!
(while sleep 1; do curl -s "http://127.0.0.1:$metrics_port/metrics" >/dev/null || true; done) &
scraper_pid=$!
cleanup() {
  kill "$scraper_pid" 2>/dev/null || true
  kill "$sink_pid" 2>/dev/null || true
  wait "$sink_pid" 2>/dev/null || true
  cat "$sink_out"
  rm -f "$sink_out"
}
trap cleanup EXIT
OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$sink_port" \
  "$here/fresh-run.sh" "$label" "$bench" --metrics-addr "127.0.0.1:$metrics_port" "$@"
