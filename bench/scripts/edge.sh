#!/usr/bin/env bash
# Edge scenario: the real ems-edge (simulated meter, trust_clock = true, a
# spool on a disk filesystem) against the real ems-hub (SQLite in a temp
# dir) on loopback; release builds. Measures, per run, in key=value lines:
#   - sample -> hub latency: the sample instant (perf: the sampler thread
#     returning from its wait for the tick, ns) -> the edge's frame on loopback (tcpdump,
#     ns) and -> a dashboard subscriber (`ems-bench watch`, us); plus the
#     hub's ms-resolution `readings.received_at - readings.ts`;
#   - wake-ups (context switches per thread), /proc/PID/io, fdatasync/fsync
#     counts (perf stat on syscall tracepoints: no ptrace, no slowdown),
#     spool segments, CPU and RSS of the edge.
# Runs: lat1 (1 Hz), lat10 (10 Hz) — each REPEAT times —, outage (1 Hz, hub
# stopped: the edge spools; then the drain after the hub returns), qemu (the
# aarch64 edge under qemu-user at 1 Hz against the native hub), sizes.
#
# Usage: bench/scripts/edge.sh OUTDIR [lat1 lat10 outage qemu sizes]   (default: all)
# Build first:
#   cargo build --release -p ems-hub -p ems-edge -p ems-bench
#   cargo build --release -p ems-edge --target aarch64-unknown-linux-gnu    # qemu, sizes
#   cargo build --release -p ems-edge --target armv7-unknown-linux-gnueabihf  # sizes
# Environment (defaults = the full scenario, ~45 min):
#   BIN=target/release  CROSS_DIR=target (where <triple>/release/ems-edge is)
#   LAT1_S=600 LAT10_S=300 REPEAT=2 OUTAGE_S=300 QEMU_S=300 WARMUP_S=10
#   HPORT=18090  WORK_BASE=/tmp (must be a disk filesystem: tmpfs has no write_bytes)
#   HUB_CPU= EDGE_CPU= (empty: not pinned; e.g. HUB_CPU=0 EDGE_CPU=1)
#   KEEP_WORK=1 keeps the work directory (logs, perf text, databases) for inspection
#   SAMPLER_THREAD=sampler (name of the edge thread that waits for the sample ticks)
# Smoke (~2.5 min): LAT1_S=20 LAT10_S=10 REPEAT=1 OUTAGE_S=15 QEMU_S=20 bench/scripts/edge.sh /tmp/edge-smoke
# Needs: perf (linux-perf), tcpdump, sqlite3, python3, qemu-user for qemu; root
# (perf tracepoints, packet capture on lo). Loopback only; every process it
# starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: edge.sh OUTDIR [lat1 lat10 outage qemu sizes]}
shift
WANT=${*:-lat1 lat10 outage qemu sizes}
BIN=${BIN:-target/release}
CROSS_DIR=${CROSS_DIR:-target}
LAT1_S=${LAT1_S:-600}
LAT10_S=${LAT10_S:-300}
REPEAT=${REPEAT:-2}
OUTAGE_S=${OUTAGE_S:-300}
QEMU_S=${QEMU_S:-300}
WARMUP_S=${WARMUP_S:-10}
HPORT=${HPORT:-18090}
WORK_BASE=${WORK_BASE:-/tmp}
HUB_CPU=${HUB_CPU:-}
EDGE_CPU=${EDGE_CPU:-}
REPORT="python3 bench/scripts/edge-report.py"
DEVICE=edge-bench
SAMPLER_THREAD=${SAMPLER_THREAD:-sampler}

for t in perf tcpdump sqlite3 python3; do
  command -v "$t" >/dev/null || { echo "edge.sh: $t is missing (apt-get install linux-perf tcpdump sqlite3)" >&2; exit 1; }
done
for b in ems-hub ems-edge ems-bench; do
  [ -x "$BIN/$b" ] || { echo "edge.sh: $BIN/$b missing: cargo build --release -p ems-hub -p ems-edge -p ems-bench" >&2; exit 1; }
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "$WORK_BASE/ems-edge-bench.XXXXXX")
pids=()
hub_pid=""
cleanup() {
  local p
  for p in "${pids[@]}" $hub_pid; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP_WORK:-}" ]; then echo "edge.sh: work files kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

SUMMARY="$OUT/summary.txt"
say() { echo "$*" | tee -a "$SUMMARY"; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }
# Runs a command pinned to CPU $1 (or not, if empty) in place of the
# current shell: use only as `pin CPU cmd… &`, so that $! is the command.
pin() { local cpu=$1; shift; if [ -n "$cpu" ]; then exec taskset -c "$cpu" "$@"; else exec "$@"; fi; }
forget() { local p=$1 q; local keep=(); for q in "${pids[@]}"; do [ "$q" = "$p" ] || keep+=("$q"); done; pids=("${keep[@]}"); }
alive() { [ -e "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
# Signals a child (TERM unless told), waits up to 10 s, then kills it.
stop() {
  [ -n "${1:-}" ] || return 0
  kill -"${2:-TERM}" "$1" 2>/dev/null || true
  for _ in $(seq 100); do alive "$1" || break; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  forget "$1"
}

fs=$(df -T "$WORK" | awk 'NR==2 {print $2}')
say "# bench/scripts/edge.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo ?)$(git diff --quiet 2>/dev/null || echo '+dirty')"
say "# reproduce: BIN=$BIN CROSS_DIR=$CROSS_DIR LAT1_S=$LAT1_S LAT10_S=$LAT10_S REPEAT=$REPEAT OUTAGE_S=$OUTAGE_S QEMU_S=$QEMU_S WARMUP_S=$WARMUP_S HPORT=$HPORT HUB_CPU=$HUB_CPU EDGE_CPU=$EDGE_CPU bench/scripts/edge.sh OUTDIR $WANT"
say "# machine: $(nproc) CPUs, $(uname -r), spool+db on $fs ($WORK_BASE); loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
[ "$fs" = tmpfs ] && say "# WARNING: $WORK_BASE is tmpfs: write_bytes will read 0"

# A fresh hub database with the device and a viewer; sets TOKEN / VIEWER.
new_db() { # RUNDIR
  DB="$1/hub.db"
  TOKEN=$("$BIN/ems-hub" device add "$DEVICE" --database "sqlite:$DB" 2>>"$1/hub.log")
  VIEWER=$("$BIN/ems-hub" viewer add bench-watch --device "$DEVICE" --database "sqlite:$DB" 2>>"$1/hub.log")
}
start_hub() { # RUNDIR
  pin "$HUB_CPU" "$BIN/ems-hub" serve --listen "127.0.0.1:$HPORT" --database "sqlite:$1/hub.db" --log-level warn >>"$1/hub.log" 2>&1 &
  hub_pid=$!
  wait_port "$HPORT" || { echo "edge.sh: hub did not start" >&2; cat "$1/hub.log" >&2; exit 1; }
}
stop_hub() { stop "$hub_pid"; hub_pid=""; }

edge_conf() { # RUNDIR INTERVAL_MS
  mkdir -p "$1/spool"
  cat >"$1/edge.toml" <<CONF
device_id = "$DEVICE"
hub_url = "ws://127.0.0.1:$HPORT"
allow_insecure = true
sample_interval_ms = $2
spool_dir = "$1/spool"
trust_clock = true

[[meter]]
id = "main"
kind = "simulated"
CONF
}
# Starts the edge (EDGE_CMD, default the native binary); sets edge_pid.
start_edge() { # RUNDIR
  EMS_DEVICE_TOKEN="$TOKEN" pin "$EDGE_CPU" "${EDGE_CMD[@]}" --config "$1/edge.toml" --log-level info run >"$1/edge.log" 2>&1 &
  edge_pid=$!
  pids+=("$edge_pid")
}
thread_tid() { # PID NAME -> TID (waits up to 20 s)
  local t
  for _ in $(seq 400); do
    for t in /proc/"$1"/task/*; do
      [ "$(cat "$t/comm" 2>/dev/null)" = "$2" ] && { basename "$t"; return 0; }
    done
    sleep 0.05
  done
  return 1
}
PERF_EVENTS=syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync,syscalls:sys_enter_write,syscalls:sys_enter_openat,syscalls:sys_enter_rename,syscalls:sys_enter_renameat2,syscalls:sys_enter_unlink,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_futex,raw_syscalls:sys_enter
# The measured window: perf stat counts the edge's syscalls for SECS; the
# 1-minute load average is noted every 60 s meanwhile.
window() { # RUNDIR SECS
  $REPORT snap "$edge_pid" "$1/spool" >"$1/snap0.json"
  perf stat --per-thread -x, -o "$1/perfstat.csv" -e "$PERF_EVENTS" -p "$edge_pid" -- sleep "$2" 2>>"$1/perf.log" &
  local pstat=$! left=$2 step
  pids+=("$pstat")
  : >"$1/loads"
  while [ "$left" -gt 0 ]; do
    step=$((left < 60 ? left : 60))
    sleep "$step"
    left=$((left - step))
    echo -n "$(cut -d' ' -f1 /proc/loadavg)," >>"$1/loads"
  done
  wait "$pstat" || echo "# perf stat failed: $(tail -1 "$1/perf.log")" >>"$SUMMARY"
  forget "$pstat"
  $REPORT snap "$edge_pid" "$1/spool" >"$1/snap1.json"
}
q() { sqlite3 -cmd ".timeout 2000" "$DB" "$1" 2>/dev/null || echo "?"; }

# A latency run: hub, capture, dashboard watcher, edge, perf on the sampler.
latency_run() { # NAME INTERVAL_MS SECS WHAT
  local name=$1 ms=$2 secs=$3 what=$4 R="$WORK/$1"
  mkdir -p "$R"
  new_db "$R"
  start_hub "$R"
  # The edge's frames towards the hub; handshakes (which carry tokens) are
  # not captured: segments starting with "GET " are filtered out.
  tcpdump -i lo -n -s 0 -U --time-stamp-precision=nano -w "$R/lo.pcap" \
    "tcp dst port $HPORT and (((ip[2:2] - ((ip[0]&0xf)<<2)) - ((tcp[12]&0xf0)>>2)) != 0) and not (tcp[((tcp[12:1] & 0xf0) >> 2):4] = 0x47455420)" \
    >"$R/tcpdump.log" 2>&1 &
  local tcpd=$!
  pids+=("$tcpd")
  for _ in $(seq 100); do grep -q "listening on" "$R/tcpdump.log" && break; sleep 0.05; done
  EMS_VIEWER_TOKEN="$VIEWER" pin "$HUB_CPU" "$BIN/ems-bench" watch --target "ws://127.0.0.1:$HPORT" --device "$DEVICE" \
    --duration $((WARMUP_S + secs + 600)) --out "$R/dash.csv" >"$R/watch.log" 2>&1 &
  local watch=$!
  pids+=("$watch")
  sleep 0.5
  edge_conf "$R" "$ms"
  start_edge "$R"
  local stid
  stid=$(thread_tid "$edge_pid" "$SAMPLER_THREAD") || { echo "edge.sh: no sampler thread in $name" >&2; cat "$R/edge.log" >&2; exit 1; }
  # The sample instant: the sampler thread returning from its wait for the
  # tick (any syscall that slept at least half an interval).
  perf record -q -k mono -e raw_syscalls:sys_enter,raw_syscalls:sys_exit -t "$stid" -o "$R/sampler.data" >>"$R/perf.log" 2>&1 &
  local prec=$!
  pids+=("$prec")
  $REPORT clock >"$R/offsets"
  sleep "$WARMUP_S"
  window "$R" "$secs"
  $REPORT clock >>"$R/offsets"
  stop "$prec" INT
  stop "$edge_pid"
  stop "$watch"
  stop "$tcpd"
  stop_hub
  perf script -i "$R/sampler.data" --ns >"$R/sampler.txt" 2>>"$R/perf.log" || true
  $REPORT report name="$name" what="$what" latency=1 interval_ms="$ms" device="$DEVICE" port="$HPORT" \
    snap0="$R/snap0.json" snap1="$R/snap1.json" perfstat="$R/perfstat.csv" offsets="$R/offsets" \
    perf="$R/sampler.txt" pcap="$R/lo.pcap" dash="$R/dash.csv" db="$R/hub.db" rows="$OUT/$name.rows.csv" \
    loads="$(cat "$R/loads")" | tee -a "$SUMMARY"
  grep -hiE "warn|error" "$R/edge.log" "$R/hub.log" | grep -v "hub_url uses ws://" | head -5 | sed 's/^/# log: /' | tee -a "$SUMMARY" || true
  say ""
  rm -f "$R/lo.pcap" "$R/sampler.data"
}

outage_run() { # SECS
  local secs=$1 R="$WORK/outage-1hz"
  mkdir -p "$R"
  new_db "$R"
  start_hub "$R"
  edge_conf "$R" 1000
  start_edge "$R"
  sleep "$WARMUP_S"
  stop_hub
  sleep 3
  window "$R" "$secs"
  local before t0 n=0 gaps="?" fresh drained="" extra
  before=$(q "select count(*) from readings where device_id='$DEVICE'")
  start_hub "$R"
  t0=$(date +%s.%N)
  local t0ms=$(( ${t0%.*} * 1000 + 10#${t0#*.} / 1000000 )) reconnect
  for _ in $(seq 600); do
    # Drained: no gap in the stored seqs and the newest reading is fresh.
    n=$(q "select count(*) from readings where device_id='$DEVICE'")
    gaps=$(q "select max(seq) - min(seq) + 1 - count(*) from readings where device_id='$DEVICE'")
    fresh=$(q "select (cast(strftime('%s','now') as integer) * 1000 - max(ts)) < 3000 from readings where device_id='$DEVICE'")
    if [ "$gaps" = 0 ] && [ "$fresh" = 1 ] && [ "$n" -gt "$before" ]; then
      drained=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
      break
    fi
    sleep 0.5
  done
  reconnect=$(q "select printf('%.1f', (min(received_at) - $t0ms) / 1000.0) from readings where device_id='$DEVICE' and received_at >= $t0ms")
  extra="outage stored_before_outage_window=$before stored_after_drain=$n seq_gaps=$gaps reconnect_s=$reconnect drain_s=${drained:-timeout}  # after the window the hub is restarted; reconnect = first reading received after the restart (the edge's backoff), drained = no seq gap and the newest reading < 3 s old"
  stop "$edge_pid"
  stop_hub
  $REPORT report name=outage-1hz what="hub stopped during the whole window: the edge spools; then restarted" interval_ms=1000 \
    snap0="$R/snap0.json" snap1="$R/snap1.json" perfstat="$R/perfstat.csv" loads="$(cat "$R/loads")" extra="$extra" | tee -a "$SUMMARY"
  grep -hiE "error" "$R/edge.log" | head -5 | sed 's/^/# log: /' | tee -a "$SUMMARY" || true
  say ""
}

EDGE_CMD=("$BIN/ems-edge")
for s in $WANT; do
  case $s in
  lat1)
    for i in $(seq "$REPEAT"); do
      latency_run "lat-1hz-$i" 1000 "$LAT1_S" "native edge, 1 Hz, streaming"
    done
    ;;
  lat10)
    for i in $(seq "$REPEAT"); do
      latency_run "lat-10hz-$i" 100 "$LAT10_S" "native edge, 10 Hz, streaming"
    done
    ;;
  outage)
    outage_run "$OUTAGE_S"
    ;;
  qemu)
    bin="$CROSS_DIR/aarch64-unknown-linux-gnu/release/ems-edge"
    if [ -x "$bin" ] && command -v qemu-aarch64 >/dev/null; then
      EDGE_CMD=(qemu-aarch64 -L /usr/aarch64-linux-gnu "$bin")
      latency_run "qemu-aarch64-1hz" 1000 "$QEMU_S" "aarch64 edge under qemu-user (CPU and RSS include the emulator), 1 Hz"
      EDGE_CMD=("$BIN/ems-edge")
    else
      say "# qemu: skipped ($bin missing: cargo build --release -p ems-edge --target aarch64-unknown-linux-gnu)"
    fi
    ;;
  sizes)
    line="sizes native=$(stat -c %s "$BIN/ems-edge")"
    for t in aarch64-unknown-linux-gnu:aarch64-linux-gnu armv7-unknown-linux-gnueabihf:arm-linux-gnueabihf; do
      triple=${t%%:*} prefix=${t##*:} bin="$CROSS_DIR/${t%%:*}/release/ems-edge"
      if [ -f "$bin" ]; then
        "$prefix-strip" -o "$WORK/ems-edge.$triple" "$bin"
        line+=" $triple=$(stat -c %s "$bin") ${triple}_stripped=$(stat -c %s "$WORK/ems-edge.$triple")"
      else
        line+=" $triple=missing"
      fi
    done
    say "== run=sizes"
    say "$line  # bytes; the release profile already strips symbols; _stripped = <gnu prefix>-strip --strip-all on top"
    say ""
    ;;
  *) echo "edge.sh: unknown run $s" >&2; exit 2 ;;
  esac
done
say "# done $(date -u +%H:%M:%SZ) loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
