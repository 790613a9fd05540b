#!/usr/bin/env bash
# One meter-year of 1 Hz readings (31,536,000 rows, all seven measurements)
# in SQLite and in PostgreSQL, then against a release ems-hub on each:
#   - the start-up build of the energy slots from the stored rows,
#   - GET /api/devices/ID/energy for 365 local days (Europe/Berlin), 12
#     months and 8,760 hours: curl's time_total, 15 runs each,
#   - GET /api/devices/ID/readings.csv for the whole year: rows/s and the
#     hub's RSS (sampled every 100 ms) before and at its peak,
#   - `ems-hub export` for the whole year: rows/s and its peak RSS.
#
#   cargo build --release -p ems-hub
#   bench/scripts/energy-year.sh [sqlite|postgres|both]        (postgres: as root)
#
# ROWS=N shortens the year (a smoke run); STEP_S=N samples every N seconds
# instead of every second (STEP_S=60: a year in 525,600 rows, the same
# 35,040 energy slots per meter); WORK=DIR holds the databases (SQLite 4 GB,
# PostgreSQL 14 GB for a 1 Hz year; removed at the end unless KEEP=1).
#
# Duration at 1 Hz on 2 vCPUs: SQLite about 20 minutes (6 of them loading),
# PostgreSQL about 30 (10 loading); STEP_S=60 about a minute each. For
# PostgreSQL the start-up build also reports the temporary-file bytes the
# cluster wrote meanwhile (pg_stat_database.temp_bytes; 0 expected).
set -euo pipefail
cd "$(dirname "$0")/../.."
HUB=${HUB:-$PWD/target/release/ems-hub}
STEP_S=${STEP_S:-1}
ROWS=${ROWS:-$((31536000 / STEP_S))}
SPAN_MS=$((ROWS * STEP_S * 1000))
WORK=${WORK:-/var/tmp/ems-energy-year}
WHICH=${1:-both}
DEV=bench-1
# 2025-01-01T00:00+01:00 (Berlin): 31,536,000 s later is 2026-01-01T00:00+01:00.
T0=1735686000000
PGBIN=/usr/lib/postgresql/15/bin

HUB_PID=""
PG_UP=""
cleanup() {
  if [ -n "$HUB_PID" ]; then kill "$HUB_PID" 2>/dev/null; wait "$HUB_PID" 2>/dev/null || true; fi
  if [ -n "$PG_UP" ]; then
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  [ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT

[ -x "$HUB" ] || { echo "no $HUB: cargo build --release -p ems-hub" >&2; exit 1; }
mkdir -p "$WORK"
log() { printf '%s  %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# The year's rows as one INSERT … SELECT over i = 0 … ROWS-1 (1 kW ± 10 %,
# the counter counting up), written in key order.
columns="device_id, meter, ts, received_at, epoch, seq, voltage_v, current_a, power_w, energy_wh, frequency_hz, power_factor, reactive_power_var, flags"
values() { # $1: the SQL for the timestamp of row i
  cat <<SQL
'$DEV', 'main', $1, $1, 1, i,
  230.0 + (i % 17) * 0.1, (1000.0 + (i % 21) * 10 - 100) / 230.0,
  1000.0 + (i % 21) * 10 - 100, i * $STEP_S * 1000.0 / 3600.0,
  50.0 + (i % 5) * 0.01 - 0.02, 1.0, 0.0, 0
SQL
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # utime + stime, 1/100 s

start_hub() { # $1: database URL
  local port; port=$(free_port)
  local t0; t0=$(date +%s.%N)
  "$HUB" serve --database "$1" --log-level warn --listen "127.0.0.1:$port" >"$WORK/hub.log" 2>&1 &
  HUB_PID=$!
  until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do
    kill -0 "$HUB_PID" 2>/dev/null || { cat "$WORK/hub.log"; exit 1; }
    sleep 0.2
  done
  BASE="http://127.0.0.1:$port"
  log "hub ready after $(echo "$(date +%s.%N) - $t0" | bc) s"
  # The slot build runs while the hub serves; the energy endpoint answers
  # 503 until it is done.
  local probe="$BASE/api/devices/$DEV/energy?from_ms=$T0&to_ms=$((T0 + 1))&bucket=hour"
  until [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $VIEWER" "$probe")" = 200 ]; do
    kill -0 "$HUB_PID" 2>/dev/null || { cat "$WORK/hub.log"; exit 1; }
    sleep 0.2
  done
  log "energy slots ready after $(echo "$(date +%s.%N) - $t0" | bc) s (built from the $ROWS stored rows and their flags)"
}

temp_bytes() { # $1: PostgreSQL URL; temporary-file bytes of the whole cluster so far
  psql -tAq "$1" -c "SELECT sum(temp_bytes) FROM pg_stat_database"
}

stop_hub() { kill "$HUB_PID"; wait "$HUB_PID" || true; HUB_PID=""; }

time_query() { # $1: label, $2: query string, $3: buckets expected
  local url="$BASE/api/devices/$DEV/energy?$2"
  curl -sf -H "Authorization: Bearer $VIEWER" "$url" | python3 -c '
import json, sys
want, rows = int(sys.argv[1]), int(sys.argv[2])
b = json.load(sys.stdin)["meters"][0]["buckets"]
assert want < 0 or len(b) == want, (len(b), want)
assert sum(x["samples"] for x in b) == rows, (sum(x["samples"] for x in b), rows)
' "${3/#-/-1}" "$ROWS"
  local times=()
  local cpu0; cpu0=$(cpu_ticks "$HUB_PID")
  for _ in $(seq 15); do
    times+=("$(curl -sf -o /dev/null -w '%{time_total}' -H "Authorization: Bearer $VIEWER" "$url")")
  done
  local cpu=$(( $(cpu_ticks "$HUB_PID") - cpu0 ))
  printf '%s\n' "${times[@]}" | sort -n | awk -v l="$1" -v cpu="$cpu" '
    { t[NR] = $1 * 1000 }
    END { printf "  %-28s min %6.1f ms  median %6.1f ms  max %6.1f ms  (15 runs; hub CPU %.1f ms per answer)\n", l, t[1], t[int((NR+1)/2)], t[NR], cpu * 10 / NR }'
}

measure() { # $1: database URL, $2: name
  log "$2: viewer token, hub start"
  VIEWER=$("$HUB" viewer add "bench-$RANDOM" --all-devices --database "$1")
  local temp0=""
  case "$1" in postgres*) temp0=$(temp_bytes "$1") ;; esac
  start_hub "$1"
  if [ -n "$temp0" ]; then
    log "$2: temporary files written during the build: $(( $(temp_bytes "$1") - temp0 )) bytes; hub CPU $(echo "$(cpu_ticks "$HUB_PID") / 100" | bc -l | xargs printf '%.1f') s"
  else
    log "$2: hub CPU after the build $(echo "$(cpu_ticks "$HUB_PID") / 100" | bc -l | xargs printf '%.1f') s"
  fi
  echo "$2: energy endpoint, one meter-year, Europe/Berlin"
  time_query "365 days (bucket=day)" "from_ms=$T0&to_ms=$((T0 + SPAN_MS))&bucket=day&tz=Europe/Berlin" \
    "$(( (SPAN_MS + 86399999) / 86400000 ))"
  time_query "12 months (bucket=month)" "from_ms=$T0&to_ms=$((T0 + SPAN_MS))&bucket=month&tz=Europe/Berlin" -
  time_query "8,760 hours (bucket=hour)" "from_ms=$T0&to_ms=$((T0 + SPAN_MS))&bucket=hour&tz=Europe/Berlin" \
    "$(( (SPAN_MS + 3599999) / 3600000 ))"

  echo "$2: CSV export endpoint, whole year"
  local before; before=$(rss_kb "$HUB_PID")
  local peak=$before
  ( while kill -0 "$HUB_PID" 2>/dev/null; do rss_kb "$HUB_PID"; sleep 0.1; done ) >"$WORK/rss.txt" &
  local sampler=$!
  local t0; t0=$(date +%s.%N)
  local cpu0; cpu0=$(cpu_ticks "$HUB_PID")
  local lines
  lines=$(curl -sf -H "Authorization: Bearer $VIEWER" "$BASE/api/devices/$DEV/readings.csv" | wc -l)
  local secs; secs=$(echo "$(date +%s.%N) - $t0" | bc)
  local cpu; cpu=$(( $(cpu_ticks "$HUB_PID") - cpu0 ))
  kill "$sampler"; wait "$sampler" 2>/dev/null || true
  peak=$(sort -n "$WORK/rss.txt" | tail -1)
  [ "$lines" -eq $((ROWS + 1)) ] || { echo "CSV has $lines lines, want $((ROWS + 1))" >&2; exit 1; }
  printf '  %d rows in %.1f s = %.0f rows/s; hub CPU %.1f s = %.0f rows per hub CPU-second; hub RSS %d MB before, %d MB at peak (+%d MB)\n' \
    "$ROWS" "$secs" "$(echo "$ROWS / $secs" | bc -l)" "$(echo "$cpu / 100" | bc -l)" "$(echo "$ROWS * 100 / ($cpu + 1)" | bc -l)" \
    $((before / 1024)) $((peak / 1024)) $(((peak - before) / 1024))
  stop_hub

  echo "$2: ems-hub export --format csv, whole year"
  t0=$(date +%s.%N)
  lines=$(/usr/bin/time -f '%M %U %S' -o "$WORK/time.txt" "$HUB" export --device "$DEV" --database "$1" | wc -l)
  secs=$(echo "$(date +%s.%N) - $t0" | bc)
  [ "$lines" -eq $((ROWS + 1)) ] || { echo "export has $lines lines" >&2; exit 1; }
  read -r maxrss user sys <"$WORK/time.txt"
  printf '  %d rows in %.1f s = %.0f rows/s; CPU %.1f s = %.0f rows per CPU-second; peak RSS %d MB\n' \
    "$ROWS" "$secs" "$(echo "$ROWS / $secs" | bc -l)" "$(echo "$user + $sys" | bc -l)" \
    "$(echo "$ROWS / ($user + $sys + 0.01)" | bc -l)" $((maxrss / 1024))
}

sqlite_run() {
  local db="$WORK/year.db"
  rm -f "$db"*
  "$HUB" device add "$DEV" --database "sqlite:$db" >/dev/null
  log "sqlite: inserting $ROWS rows"
  sqlite3 "$db" <<SQL
PRAGMA synchronous = OFF;
PRAGMA cache_size = -500000;
BEGIN;
WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < $ROWS - 1)
INSERT INTO readings ($columns) SELECT $(values "$T0 + i * $STEP_S * 1000") FROM s;
DELETE FROM energy_limits;
COMMIT;
SQL
  log "sqlite: $(du -h "$db" | cut -f1) on disk"
  measure "sqlite:$db" sqlite
  rm -f "$db"*
}

postgres_run() {
  [ "$(id -u)" = 0 ] || { echo "postgres: run as root (the cluster runs as the postgres user)" >&2; exit 1; }
  rm -rf "$WORK/pg"; mkdir -p "$WORK/pg"; chown postgres: "$WORK/pg"
  runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/pg/data" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
  local port; port=$(free_port)
  cat >>"$WORK/pg/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$WORK/pg'
shared_buffers = 512MB
max_wal_size = 8GB
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/server.log" -w start >/dev/null
  PG_UP=1
  local url="postgres://postgres@127.0.0.1:$port/postgres"
  "$HUB" device add "$DEV" --database "$url" >/dev/null
  log "postgres: inserting $ROWS rows"
  psql -q -v ON_ERROR_STOP=1 "$url" <<SQL
DROP INDEX readings_dedup; DROP INDEX readings_device_ts;
INSERT INTO readings ($columns)
  SELECT $(values "to_timestamp(($T0 + i * $STEP_S * 1000) / 1000.0)") FROM generate_series(0::bigint, $ROWS - 1) i;
CREATE UNIQUE INDEX readings_dedup ON readings (device_id, epoch, seq);
CREATE INDEX readings_device_ts ON readings (device_id, ts DESC);
DELETE FROM energy_limits;
VACUUM ANALYZE readings;
SQL
  log "postgres: $(du -sh "$WORK/pg/data" | cut -f1) on disk"
  measure "$url" postgres
}

echo "energy-year: $ROWS rows, one every $STEP_S s, $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"
case "$WHICH" in
  sqlite) sqlite_run ;;
  postgres) postgres_run ;;
  both) sqlite_run; postgres_run ;;
  *) echo "usage: $0 [sqlite|postgres|both]" >&2; exit 2 ;;
esac
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
