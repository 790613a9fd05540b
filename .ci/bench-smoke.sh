#!/usr/bin/env bash
# Smoke-sized ems-bench scenario: proves the load generator works
# end to end against a real hub and a real Mosquitto. Not a benchmark: the
# numbers are not checked, only that nothing was lost, nothing failed, and
# the report has its histogram lines. The runs are bounded (~20 s in all,
# hard timeouts); the release build comes first. Then the energy-year
# script on one day of readings (its checks: every bucket and row there).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

if ! command -v mosquitto >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends mosquitto >/dev/null
fi
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

cargo build --release --locked -p ems-hub -p ems-bench
BIN="${CARGO_TARGET_DIR:-target}/release"

work=$(mktemp -d)
hub_pid="" mq_pid=""
cleanup() {
  if [[ -n "$hub_pid" ]]; then kill "$hub_pid" 2>/dev/null || true; fi
  if [[ -n "$mq_pid" ]]; then kill "$mq_pid" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() {
  local p
  for _ in $(seq 50); do
    p=$((20000 + RANDOM % 20000))
    if port_free "$p"; then echo "$p"; return 0; fi
  done
  return 1
}
wait_port() {
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listening on 127.0.0.1:$1" >&2
  return 1
}

check_report() { # FILE
  local f=$1
  grep -q '^latency send->dashboard .* p50=.* p99=.* p99.9=.* max=' "$f"
  grep -q '^latency send->ack .* p50=.* p99=.* p99.9=.* max=' "$f"
  grep -q '^connect latency .* p99=' "$f"
  grep -q '^sustained deliveries=.* = [0-9]*/s' "$f"
  grep -q '^verdict: OK' "$f"
  grep -q ' ack_lost=0 ' "$f"
  grep -q ' live_lost=0 ' "$f"
  grep -q ' duplicates=0 ' "$f"
  grep -q ' unexpected=0 ' "$f"
}

db="$work/hub.db"
"$BIN/ems-bench" provision --database "sqlite:$db" --count 50 --out "$work/tokens.txt"

hub_port=$(pick_port)
(ulimit -n 4096 2>/dev/null || true; exec "$BIN/ems-hub" serve --listen "127.0.0.1:$hub_port" --database "sqlite:$db" --log-level warn) \
  >"$work/hub.log" 2>&1 &
hub_pid=$!
wait_port "$hub_port"

echo "--- ems-bench against the hub (50 devices x 2 Hz, 10 dashboards x 3 devices, 5 s)"
timeout 60 "$BIN/ems-bench" run --label smoke-hub --target "ws://127.0.0.1:$hub_port" --tokens "$work/tokens.txt" \
  --devices 50 --rate 2 --dashboards 10 --follow 3 --duration 5 --drain 10 --server-pid "$hub_pid" --source-ips 2 \
  | tee "$work/hub.out"
check_report "$work/hub.out"
grep -q '^server cpu=' "$work/hub.out"

echo "--- ems-bench fan-out against the hub (1 device x 50 Hz -> 20 subscribers, 3 s)"
timeout 60 "$BIN/ems-bench" run --label smoke-fanout --target "ws://127.0.0.1:$hub_port" --tokens "$work/tokens.txt" \
  --devices 1 --rate 50 --dashboards 20 --fanout --duration 3 --drain 10 --server-pid "$hub_pid" \
  | tee "$work/fanout.out"
check_report "$work/fanout.out"

mq_port=$(pick_port)
cat >"$work/mosquitto.conf" <<CONF
listener $mq_port 127.0.0.1
allow_anonymous true
max_queued_messages 100000
persistence false
log_dest stderr
log_type error
CONF
"$MOSQUITTO" -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
mq_pid=$!
wait_port "$mq_port"

echo "--- ems-bench MQTT mode against Mosquitto (same pattern)"
timeout 60 "$BIN/ems-bench" run --label smoke-mqtt --mode mqtt --target "mqtt://127.0.0.1:$mq_port" \
  --devices 50 --rate 2 --dashboards 10 --follow 3 --duration 5 --drain 10 --server-pid "$mq_pid" \
  | tee "$work/mqtt.out"
check_report "$work/mqtt.out"

echo "--- graceful hub shutdown (SIGTERM, exit 0)"
kill -TERM "$hub_pid"
wait "$hub_pid"
hub_pid=""
echo "--- energy-year script, smoke-sized (one day of 1 Hz readings, SQLite and PostgreSQL)"
ROWS=86400 WORK="/var/tmp/ems-energy-year-smoke-$$" HUB="$(cd "$BIN" && pwd)/ems-hub" timeout 300 bench/scripts/energy-year.sh both

echo "bench smoke: OK"
