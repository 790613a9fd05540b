#!/usr/bin/env bash
# The benchmark scenarios (BENCHMARKS.md): hub pinned to CPU 0, generator to CPU 1,
# Mosquitto (same patterns) pinned to CPU 0 too. Loopback only, every run
# bounded. Usage: bench/scripts/scenarios.sh OUTDIR [SCENARIO...]
#   scenarios: s1 s2 s3 s4 s6 s7 edge (default: all but s7); s5 is the connect
#   phase of s4. s7 (a small fleet as it runs: 5 minutes, nothing pinned) runs
#   only when named.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: scenarios.sh OUTDIR [s1 s2 s3 s4 s6 s7 edge]}
shift
WANT=${*:-s1 s2 s3 s4 s6 edge}
BIN=${BIN:-target-bench/release}
HUB_CPU=${HUB_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
HPORT=${HPORT:-18080}
MPORT=${MPORT:-18830}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/ems-bench.XXXXXX)
hub_pid="" mq_pid="" edge_pid=""
cleanup() {
  for p in $hub_pid $mq_pid $edge_pid; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

log() { echo "[$(date -u +%H:%M:%S)] load: $(cut -d' ' -f1-3 /proc/loadavg) :: $*" | tee -a "$OUT/summary.txt"; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

DB="$WORK/hub.db"
"$BIN/ems-bench" provision --database "sqlite:$DB" --count 15000 --out "$WORK/tokens.txt" | tee -a "$OUT/summary.txt"

# The generator is one client (4 source addresses, one viewer token): the
# per-address and per-token limits would refuse most of S1-S4's sockets.
LIMITS=${LIMITS:---max-connections-per-ip 1000000 --max-dashboards-per-token 100000}
start_hub() {
  # shellcheck disable=SC2086
  (ulimit -n 20000; exec taskset -c "${PIN_HUB:-$HUB_CPU}" "${HUB_BIN:-$BIN/ems-hub}" serve --listen "127.0.0.1:$HPORT" --database "sqlite:$DB" --log-level error $LIMITS "$@") \
    >>"$OUT/hub.log" 2>&1 &
  hub_pid=$!
  wait_port "$HPORT"
}
stop_hub() { kill -TERM "$hub_pid"; wait "$hub_pid" || true; hub_pid=""; }
start_mq() {
  cat >"$WORK/mosquitto.conf" <<CONF
listener $MPORT 127.0.0.1
allow_anonymous true
max_queued_messages 100000
max_inflight_messages 1000
persistence false
log_dest stderr
log_type error
CONF
  (ulimit -n 20000; exec taskset -c "$HUB_CPU" mosquitto -c "$WORK/mosquitto.conf") >>"$OUT/mosquitto.log" 2>&1 &
  mq_pid=$!
  wait_port "$MPORT"
}
stop_mq() { kill -TERM "$mq_pid"; wait "$mq_pid" || true; mq_pid=""; }

# Per-thread CPU of a process (a poor man's profile: perf counters are not
# available in this VM), grouped by thread name.
threads() { # PID
  python3 - "$1" <<'PY'
import os, sys, collections
pid = sys.argv[1]
tck = os.sysconf("SC_CLK_TCK")
agg = collections.Counter(); n = collections.Counter()
for t in os.listdir(f"/proc/{pid}/task"):
    try:
        st = open(f"/proc/{pid}/task/{t}/stat").read()
    except OSError:
        continue
    name = st[st.index('(') + 1:st.rindex(')')]
    f = st[st.rindex(')') + 2:].split()
    agg[name] += (int(f[11]) + int(f[12])) / tck; n[name] += 1
print("    server threads: " + ", ".join(f"{k} x{n[k]} {v:.2f}s" for k, v in agg.most_common(6)))
PY
}

gen() { # NAME ARGS... (hub mode)
  local name=$1; shift
  log "$name: ems-bench run $*"
  taskset -c "${PIN_GEN:-$GEN_CPU}" "$BIN/ems-bench" run --label "$name" --target "ws://127.0.0.1:$HPORT" --tokens "$WORK/tokens.txt" \
    --server-pid "$hub_pid" --source-ips 4 "$@" >"$OUT/$name.txt" 2>&1 || true
  grep -E '^(connect|server|sent|sustained|deliveries|errors|latency|verdict)' "$OUT/$name.txt" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
  threads "$hub_pid" | tee -a "$OUT/summary.txt"
}
genmq() { # NAME ARGS... (MQTT mode)
  local name=$1; shift
  log "$name: ems-bench run --mode mqtt $*"
  taskset -c "$GEN_CPU" "$BIN/ems-bench" run --label "$name" --mode mqtt --target "mqtt://127.0.0.1:$MPORT" \
    --server-pid "$mq_pid" "$@" >"$OUT/$name.txt" 2>&1 || true
  grep -E '^(connect|server|sent|sustained|deliveries|errors|latency|verdict)' "$OUT/$name.txt" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
}

for s in $WANT; do
  case $s in
  s1)
    start_hub; gen s1-ingest-hub --devices 10000 --rate 1 --duration 30 --drain 20 --connect-concurrency 256; stop_hub
    start_mq; genmq s1-ingest-mqtt --devices 10000 --rate 1 --duration 30 --drain 20 --connect-concurrency 256; stop_mq
    ;;
  s2)
    # 960 dashboards x 10 devices = 9,600 subscription sockets + 10,000 devices:
    # the hard RLIMIT_NOFILE here is 20,000 for each process.
    start_hub; gen s2-live-hub --devices 10000 --rate 1 --dashboards 960 --follow 10 --duration 30 --drain 20; stop_hub
    start_mq; genmq s2-live-mqtt --devices 10000 --rate 1 --dashboards 960 --follow 10 --duration 30 --drain 20; stop_mq
    ;;
  s3)
    # Offered: 560,000 frames/s at 100 subscribers, 400,000/s at 1,000 and
    # 5,000 — past Mosquitto's capacity here, so compare the sustained rates.
    # 5,600 readings/s from one device is above the hub's default per-device
    # rate limit (1,000/s, burst 20,000), raised for this scenario only.
    for spec in 100:5600 1000:400 5000:80; do
      subs=${spec%%:*} rate=${spec##*:}
      start_hub --rate-limit 10000; gen "s3-fanout-$subs-hub" --devices 1 --fanout --dashboards "$subs" --rate "$rate" --duration 8 --drain 10; stop_hub
      start_mq; genmq "s3-fanout-$subs-mqtt" --devices 1 --fanout --dashboards "$subs" --rate "$rate" --duration 8 --drain 10; stop_mq
    done
    ;;
  s4)
    # Idle connections; the connect phase is scenario 5 (connection storm).
    start_hub; gen s4-idle-hub --devices 15000 --rate 0 --duration 10 --connect-concurrency 256; stop_hub
    start_mq; genmq s4-idle-mqtt --devices 15000 --rate 0 --duration 10 --connect-concurrency 256; stop_mq
    ;;
  s6)
    # 10% of the dashboards stop reading after 2 s; the database write lock
    # is held for 30 s from t=5 s.
    n0=$(sqlite3 "$DB" "select count(*) from readings" 2>/dev/null || echo 0)
    start_hub; gen s6-trouble-hub --devices 2000 --rate 1 --dashboards 200 --follow 10 --duration 45 --drain 60 \
      --stall-fraction 0.1 --stall-after 2 --pause-db "$DB" --pause-at 5 --pause-for 30
    n=$(sqlite3 "$DB" "select count(*) from readings" 2>/dev/null || echo 0); log "s6: rows in readings: $n0 before, $n after (+$((n - n0)))"
    stop_hub
    ;;
  s7)
    # A small fleet as it runs: 3,000 devices x 1 Hz and 200 dashboards
    # following 10 devices each for 5 minutes, hub and generator free to use
    # both cores. The hub's RSS is sampled every 30 s (flat or growing).
    PIN_HUB=0-1 PIN_GEN=0-1 start_hub
    ( for _ in $(seq 12); do sleep 30; awk '/VmRSS/ {printf "%d ", $2 / 1024}' /proc/"$hub_pid"/status 2>/dev/null; done; echo ) \
      >"$WORK/s7-rss.txt" &
    rss=$!
    PIN_GEN=0-1 gen s7-fleet-hub --devices 3000 --rate 1 --dashboards 200 --follow 10 --duration 300 --drain 20
    kill "$rss" 2>/dev/null || true; wait "$rss" 2>/dev/null || true
    log "s7: hub RSS every 30 s (MB): $(cat "$WORK/s7-rss.txt")"
    stop_hub
    ;;
  edge)
    start_hub
    tok=$("$BIN/ems-hub" device add edge-bench --database "sqlite:$DB")
    mkdir -p "$WORK/spool"
    cat >"$WORK/edge.toml" <<CONF
device_id = "edge-bench"
hub_url = "ws://127.0.0.1:$HPORT"
allow_insecure = true
sample_interval_ms = 1000
spool_dir = "$WORK/spool"
trust_clock = true

[[meter]]
id = "main"
kind = "simulated"
CONF
    log "edge: ems-edge with a simulated meter at 1 Hz for 60 s"
    EMS_DEVICE_TOKEN="$tok" taskset -c "$GEN_CPU" "${EDGE_BIN:-$BIN/ems-edge}" --config "$WORK/edge.toml" run >"$OUT/edge.log" 2>&1 &
    edge_pid=$!
    sleep 60
    python3 - "$edge_pid" <<'PY' | tee -a "$OUT/summary.txt"
import os, sys
pid = sys.argv[1]
st = open(f"/proc/{pid}/stat").read()
f = st[st.rfind(')') + 2:].split()
tck = os.sysconf("SC_CLK_TCK")
cpu = (int(f[11]) + int(f[12])) / tck
status = dict(l.split(':', 1) for l in open(f"/proc/{pid}/status").read().splitlines() if ':' in l)
print(f"    edge: cpu={cpu:.3f}s over ~60s ({cpu / 60 * 100:.2f}% of a core) rss={status['VmRSS'].strip()} hwm={status['VmHWM'].strip()} threads={status['Threads'].strip()}")
PY
    kill -TERM "$edge_pid"; wait "$edge_pid" || true; edge_pid=""
    n=$(sqlite3 "$DB" "select count(*) from readings where device_id='edge-bench'" 2>/dev/null || echo '?'); log "edge: readings stored from edge-bench: $n"
    stop_hub
    ;;
  esac
done
log "done"
