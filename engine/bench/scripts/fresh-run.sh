#!/usr/bin/env bash
# One distributed sagaflow-bench run on a fresh PostgreSQL database and a fresh private
# nats-server (free loopback port, empty store), both removed afterwards, so that runs of two
# builds alternated side by side start from the same state. Prints LABEL, the JSON line,
# xact_per_saga (the database's committed transactions per saga) and cpu_ms_per_saga: the CPU time the whole machine spent (user, system, interrupts; not idle, not
# I/O wait, not stolen by the host) while the benchmark ran, per saga. On a shared host whose
# throughput varies from run to run, the CPU a saga costs varies much less; on a CPU-bound
# machine throughput is the inverse of it. The JSON line has the benchmark's own
# cpu_ms_per_saga (and each process's share), over the load alone; the one appended here spans
# the whole run of the executable, its start and shutdown included. Give one value of --steps
# and --sagas: the appended figure would span every run of a sweep.
#
#   engine/bench/scripts/fresh-run.sh LABEL path/to/sagaflow-bench [bench options...]
#   e.g. for i in 1 2 3; do fresh-run.sh before /tmp/old/sagaflow-bench --sagas 10000
#                          fresh-run.sh after target/release/sagaflow-bench --sagas 10000; done
#
# Needs createdb/dropdb (PostgreSQL on 127.0.0.1:5432, user postgres) and nats-server on PATH.
set -euo pipefail
label=$1
bench=$2
shift 2
database="bench_$(date +%s)_$$"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
store=$(mktemp -d)
createdb -h 127.0.0.1 -U postgres "$database"
nats-server -a 127.0.0.1 -p "$port" -js -sd "$store" >/dev/null 2>&1 &
nats_pid=$!
cleanup() {
  kill "$nats_pid" 2>/dev/null || true
  wait "$nats_pid" 2>/dev/null || true
  dropdb -h 127.0.0.1 -U postgres --if-exists "$database"
  rm -rf "$store"
}
trap cleanup EXIT
for _ in $(seq 1 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
# user nice system irq softirq, in clock ticks.
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }
busy_before=$(busy_ticks)
result=$("$bench" --mode distributed --database-url "postgres://postgres@127.0.0.1:5432/$database" \
  --nats-url "nats://127.0.0.1:$port" --json "$@" | tail -n 1)
busy_after=$(busy_ticks)
cpu_ms_per_saga=$(python3 -c "
import json, os, sys
sagas = json.loads(sys.argv[3])['completed']
ticks = int(float(sys.argv[2]) - float(sys.argv[1]))
print(round(ticks * 1000 / os.sysconf('SC_CLK_TCK') / max(sagas, 1), 3))
" "$busy_before" "$busy_after" "$result")
# Database transactions per saga (statements outside a transaction count one each): the
# engine's commits and the worker's idempotency lookups and records. A backend reports its
# counts when it ends, so this waits for the benchmark's connections to close.
sleep 1.5
xacts=$(psql -h 127.0.0.1 -U postgres -d postgres -Atc \
  "SELECT xact_commit FROM pg_stat_database WHERE datname = '$database'")
xact_per_saga=$(python3 -c "
import json, sys
print(round(int(sys.argv[1]) / max(json.loads(sys.argv[2])['completed'], 1), 2))
" "$xacts" "$result")
echo "$label $result cpu_ms_per_saga=$cpu_ms_per_saga xact_per_saga=$xact_per_saga"
