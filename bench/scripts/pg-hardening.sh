#!/usr/bin/env bash
# The hub on PostgreSQL under load: S1 (10,000 devices x 1 Hz) with the hub's
# CPU per reading, ack latency and PostgreSQL's own CPU; the all-devices
# viewer listing 10,000 devices during S1; 2,000 forged-token handshakes/s
# for 30 s while 2,000 real devices reconnect. A private PostgreSQL 15
# cluster (fsync on, default settings) is created and removed.
# Usage: bench/scripts/pg-hardening.sh OUTDIR   (as root; BIN=target/release;
# LISTING_ONLY=1 for the listing measurements alone; ACK_AB=1 for S1's acks
# with and without the listing in alternating windows of one run; S1_S4=1
# for the scenarios' S1 and S4 alone, as scenarios.sh runs them on SQLite)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: pg-hardening.sh OUTDIR}
BIN=${BIN:-target/release}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
HUB_CPU=${HUB_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
HPORT=${HPORT:-18080}
PGPORT=${PGPORT:-15432}
# S4 idles 15,000 devices; everything else uses 10,000.
if [[ "${S1_S4:-0}" == 1 ]]; then DEVICES=${DEVICES:-15000}; else DEVICES=${DEVICES:-10000}; fi
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/ems-pgbench.XXXXXX)
chown postgres: "$WORK"
hub_pid=""
cleanup() {
  if [[ -n "$hub_pid" ]]; then kill "$hub_pid" 2>/dev/null || true; fi
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

log() { echo "[$(date -u +%H:%M:%S)] load: $(cut -d' ' -f1-3 /proc/loadavg) :: $*" | tee -a "$OUT/summary.txt"; }
wait_port() { for _ in $(seq 400); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

# CPU seconds (utime+stime) of every process of the PostgreSQL cluster.
pg_cpu() {
  python3 - "$WORK/data/postmaster.pid" <<'PY'
import os, sys
tck = os.sysconf("SC_CLK_TCK")
root = open(sys.argv[1]).readline().strip()
total = 0
for p in os.listdir("/proc"):
    if not p.isdigit():
        continue
    try:
        st = open(f"/proc/{p}/stat").read()
    except OSError:
        continue
    f = st[st.rindex(')') + 2:].split()
    if p == root or f[1] == root:
        total += int(f[11]) + int(f[12])
print(f"{total / tck:.2f}")
PY
}

runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/data" -U postgres --auth=trust -E UTF8 >/dev/null
cat >>"$WORK/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
port = $PGPORT
fsync = on
max_connections = 100
CONF
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w start >/dev/null
DB="postgres://postgres@127.0.0.1:$PGPORT/postgres"
log "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') on port $PGPORT (fsync on)"
t0=$(date +%s.%N)
"$BIN/ems-bench" provision --database "$DB" --count "$DEVICES" --out "$WORK/tokens.txt" | tee -a "$OUT/summary.txt"
log "provisioned $DEVICES devices in $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s"
VIEWER=$(awk '$1 == "@viewer" {print $2}' "$WORK/tokens.txt")

start_hub() {
  (ulimit -n 20000; exec taskset -c "$HUB_CPU" "$BIN/ems-hub" serve --listen "127.0.0.1:$HPORT" --database "$DB" \
     --log-level error --max-connections-per-ip 1000000 --max-dashboards-per-token 100000) >>"$OUT/hub.log" 2>&1 &
  hub_pid=$!
  wait_port "$HPORT"
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$HPORT/readyz" >/dev/null && return 0; sleep 0.1; done
  return 1
}
stop_hub() { kill -TERM "$hub_pid"; wait "$hub_pid" || true; hub_pid=""; }

gen() { # NAME ARGS...
  local name=$1; shift
  log "$name: ems-bench run $*"
  taskset -c "$GEN_CPU" "$BIN/ems-bench" run --label "$name" --target "ws://127.0.0.1:$HPORT" --tokens "$WORK/tokens.txt" \
    --server-pid "$hub_pid" --source-ips 4 "$@" >"$OUT/$name.txt" 2>&1 || true
  grep -E '^(connect|server|sent|errors|latency|verdict)' "$OUT/$name.txt" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
}

# CPU seconds of the hub so far (every thread, from schedstat: ns).
hub_cpu() {
  cat /proc/"$hub_pid"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {printf "%.4f\n", s / 1e9}'
}

# /api/devices as the all-devices viewer, N times; prints each time in ms,
# and the CPU per listing of the hub and of PostgreSQL (everything either
# did meanwhile: meaningful when nothing else runs).
listing() { # N PAUSE_S
  local c0 p0
  c0=$(hub_cpu); p0=$(pg_cpu)
  for _ in $(seq "$1"); do
    curl -s -o "$WORK/list.json" -w '%{time_total}\n' -H "Authorization: Bearer $VIEWER" \
      "http://127.0.0.1:$HPORT/api/devices"
    sleep "$2"
  done | python3 -c '
import sys
t = sorted(float(x) * 1000 for x in sys.stdin)
n = len(t)
print(f"    listing {n} times: min {t[0]:.1f} ms, p50 {t[n // 2]:.1f} ms, p90 {t[int(n * 0.9)]:.1f} ms, max {t[-1]:.1f} ms")
' | tee -a "$OUT/summary.txt"
  echo "    CPU per listing: hub $(python3 -c "print(f'{($(hub_cpu) - $c0) / $1 * 1e3:.1f}')") ms, PostgreSQL $(python3 -c "print(f'{($(pg_cpu) - $p0) / $1 * 1e3:.1f}')") ms (everything each did meanwhile)" \
    | tee -a "$OUT/summary.txt"
  python3 -c 'import json,sys; print("    devices in the last answer:", len(json.load(open(sys.argv[1]))["devices"]))' "$WORK/list.json" \
    | tee -a "$OUT/summary.txt"
}

# S1_S4=1: the scenarios' S1 (10,000 devices x 1 Hz, the hub's and
# PostgreSQL's CPU apart) and S4 (15,000 idle device connections), each on
# a freshly started hub.
if [[ "${S1_S4:-0}" == 1 ]]; then
  start_hub
  pg0=$(pg_cpu)
  gen s1-pg --devices 10000 --rate 1 --duration 30 --drain 20 --connect-concurrency 256
  pg1=$(pg_cpu)
  log "s1-pg: PostgreSQL CPU $(python3 -c "print(f'{$pg1 - $pg0:.2f}')") s over the run (incl. connect phase), $(python3 -c "print(f'{($pg1 - $pg0) / (10000 * 30) * 1e6:.1f}')") us per reading sent"
  stop_hub
  start_hub
  gen s4-idle-pg --devices 15000 --rate 0 --duration 10 --connect-concurrency 256
  stop_hub
  log "done"
  exit 0
fi

start_hub
log "idle hub: all-devices listing"
listing 20 0.2

# LISTING_ONLY=1: only the listing measurements — idle (no device state
# yet), during S1, and idle again once every device has its state row.
if [[ "${LISTING_ONLY:-0}" == 1 ]]; then
  log "s1-pg with the all-devices listing every 0.5 s from the 10th second"
  ( sleep 12; listing 30 0.5 ) &
  lister=$!
  gen s1-pg-listing --devices "$DEVICES" --rate 1 --duration 30 --drain 20
  wait "$lister" || true
  log "idle hub after S1 (every device in device_state): all-devices listing"
  listing 20 0.2
  stop_hub
  exit 0
fi

# ACK_AB=1: one S1 run of 110 s; from its 12th second the listing runs for
# 6 s (every 0.5 s), pauses 6 s, and so on, seven times. Every ack is logged
# with its reading's send time, and the acks of readings sent during the
# windows are compared with those sent in the quiet gaps on both sides: the
# same run, the same hub and database, minutes apart at most. AB_PATH
# (default /api/devices) names the request: /healthz gives the control
# run, the same windows with a request that costs nothing.
if [[ "${ACK_AB:-0}" == 1 ]]; then
  log "s1-pg with the listing in alternating 6 s windows"
  (
    sleep 12
    for _ in 1 2 3 4 5 6 7; do
      s=$EPOCHREALTIME
      while (( ${EPOCHREALTIME/./} - ${s/./} < 6000000 )); do
        taskset -c "$GEN_CPU" curl -s -o /dev/null -H "Authorization: Bearer $VIEWER" "http://127.0.0.1:$HPORT${AB_PATH:-/api/devices}"
        sleep 0.5
      done
      echo "$s $EPOCHREALTIME" >>"$WORK/windows.txt"
      sleep 6
    done
  ) &
  lister=$!
  gen s1-pg-ab --devices "$DEVICES" --rate 1 --duration 110 --drain 20 --ack-log "$WORK/acks.txt"
  wait "$lister" || true
  mv "$WORK/acks.txt" "$WORK/windows.txt" "$OUT/"
  python3 bench/scripts/ack-windows.py "$OUT/acks.txt" "$OUT/windows.txt" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
  stop_hub
  exit 0
fi

pg0=$(pg_cpu)
gen s1-pg --devices "$DEVICES" --rate 1 --duration 30 --drain 20
pg1=$(pg_cpu)
log "s1-pg: PostgreSQL CPU $(python3 -c "print(f'{$pg1 - $pg0:.2f}')") s over the run (incl. connect phase), $(python3 -c "print(f'{($pg1 - $pg0) / ($DEVICES * 30) * 1e6:.1f}')") us per reading sent"

log "s1-pg again with the all-devices listing every 0.5 s from the 10th second"
( sleep 12; listing 30 0.5 ) &
lister=$!
gen s1-pg-listing --devices "$DEVICES" --rate 1 --duration 30 --drain 20
wait "$lister" || true
stop_hub

start_hub
log "forged: 2,000 forged-token handshakes/s for 30 s; real devices reconnect meanwhile"
taskset -c "$GEN_CPU" "$BIN/ems-bench" forge --target "ws://127.0.0.1:$HPORT" --rate 2000 --duration 30 --ids 2000 \
  >"$OUT/forged.txt" 2>&1 &
forger=$!
sleep 3
# 32 handshakes in flight: with the generator's default of 256 its own
# queue (256 in flight at 3,000-5,000 handshakes/s on one core) is 50-85 ms
# of every handshake's time, flood or not, and the p99 measured the
# generator instead of the hub.
RC=${RECONNECT_CONCURRENCY:-32}
for round in 1 2 3 4 5; do
  gen "reconnect-$round" --devices 2000 --rate 0 --duration 2 --drain 1 --connect-concurrency "$RC"
  sleep 1
done
wait "$forger" || true
sed 's/^/    /' "$OUT/forged.txt" | tee -a "$OUT/summary.txt"
log "without the flood"
gen reconnect-quiet --devices 2000 --rate 0 --duration 2 --drain 1 --connect-concurrency "$RC"
stop_hub
log "done"
