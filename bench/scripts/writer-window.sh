#!/usr/bin/env bash
# The SQLite writer's CPU per reading at a small fleet's rate, measured in
# a late window (the last 60 s of the run), when the database has grown
# past what the first minute shows. 3,000 devices x 1 Hz against a fresh
# database, nothing pinned, no dashboards; loopback only, bounded.
# Usage: BIN=target/release [DUR=180] bench/scripts/writer-window.sh LABEL [hub serve args]
# Prints: LABEL, the writer thread's and the whole hub's CPU per reading in
# the window, and the generator's verdict lines.
set -euo pipefail
cd "$(dirname "$0")/../.."
LABEL=${1:?usage: writer-window.sh LABEL [hub serve args]}
shift
BIN=${BIN:-target/release}
DUR=${DUR:-180}
PORT=${PORT:-18611}
if [ "$DUR" -lt 70 ]; then echo "DUR must be at least 70 s" >&2; exit 2; fi
W=$(mktemp -d /tmp/ems-writer.XXXXXX)
hub=""
cleanup() { [ -n "$hub" ] && kill "$hub" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
"$BIN/ems-bench" provision --database "sqlite:$W/hub.db" --count 3000 --out "$W/tokens.txt" >/dev/null
(ulimit -n 20000; exec "$BIN/ems-hub" serve --listen "127.0.0.1:$PORT" --database "sqlite:$W/hub.db" \
  --log-level error --max-connections-per-ip 1000000 "$@") >"$W/hub.log" 2>&1 &
hub=$!
for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
# CPU nanoseconds so far of the writer thread and of the whole hub (schedstat,
# as pg-hardening.sh's hub_cpu): "WRITER_NS HUB_NS".
cpu() {
  local w=0 t=0 task ns
  for task in /proc/"$hub"/task/*; do
    read -r ns _ <"$task/schedstat" 2>/dev/null || continue
    t=$((t + ns))
    if [ "$(cat "$task/comm" 2>/dev/null)" = ems-writer ]; then w=$((w + ns)); fi
  done
  echo "$w $t"
}
"$BIN/ems-bench" run --label "$LABEL" --target "ws://127.0.0.1:$PORT" --tokens "$W/tokens.txt" \
  --server-pid "$hub" --source-ips 4 --devices 3000 --rate 1 --duration "$DUR" --drain 10 >"$W/gen.txt" 2>&1 &
gen=$!
sleep $((DUR - 65)); a=$(cpu); sleep 60; b=$(cpu)
wait "$gen" || true
echo "$a $b" | awk -v label="$LABEL" '{ n = 3000 * 60; w = ($3 - $1) / 1e3; t = ($4 - $2) / 1e3
  printf "%s: writer %.1f us/reading, hub %.1f us/reading (%.1f %% of a core), last 60 s\n", label, w / n, t / n, t / 60e6 * 100 }'
grep -E '^(sent|latency send->ack|verdict)' "$W/gen.txt"
