#!/usr/bin/env bash
# The documented scale-out, end to end: several hubs behind the shipped nginx
# config on one PostgreSQL, real edges and dashboards, and one hub SIGKILLed
# in the middle of the run.
#
#   .ci/fleet-e2e.sh
#     1. a private PostgreSQL cluster (the PostgreSQL 15 binaries, run as the
#        postgres user), a throwaway CA, nginx with deploy/nginx/ems-hub.conf
#        rendered for loopback ports with the hubs in `upstream ems_hubs`
#     2. provisions the devices and one all-devices viewer (tokens in 0600
#        files, never on a command line or in a URL); asks nginx which hub each
#        device hashes to, and picks the hub with the most devices to kill
#     3. starts the hubs, one native edge per device through nginx (simulated
#        meter, trace log naming every sample) and a resuming dashboard
#        (.ci/ws_follow.py) for every device of the doomed hub plus two others
#     4. after WARM_S, SIGKILLs that hub: its devices reconnect through nginx
#        to the next upstream, their dashboards reconnect and resume
#     5. /api/devices asked on every remaining hub directly agrees within one
#        presence lease: every device online, on a living hub, same answer
#     6. stops the dashboards and the edges, drains each edge's outbox with a
#        drainer (same spool, no new samples), then checks: every sampled
#        reading is stored exactly once (and nothing else is), and every
#        dashboard holds every stored reading between its first and its last
#        one: no gap across the failover.
#
# Environment: HUBS (3), EDGES (30), SAMPLE_MS (500), WARM_S (20), AFTER_S
#   (30: run time after the kill), LEASE_MS (6000), EMS_E2E_TIMEOUT (120 s per
#   wait), CARGO_TARGET_DIR (default <repo>/target-cross), EMS_E2E_NO_BUILD=1
#   to use the binaries already in $CARGO_TARGET_DIR/release, EMS_KEEP_TMP=1.
set -euo pipefail
# shellcheck source=.ci/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=.ci/nginx-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/nginx-lib.sh"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$EMS_ROOT/target-cross}"
HUBS=${HUBS:-3}
EDGES=${EDGES:-30}
SAMPLE_MS=${SAMPLE_MS:-500}
WARM_S=${WARM_S:-20}
AFTER_S=${AFTER_S:-30}
LEASE_MS=${LEASE_MS:-6000}
TIMEOUT_S=${EMS_E2E_TIMEOUT:-120}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}

PG_DATA=""
stop_postgres() {
    [[ -n "$PG_DATA" && -d "$PG_DATA" ]] || return 0
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PG_DATA" -m immediate stop >/dev/null 2>&1 || true
}
# nginx-lib's cleanup removes the temp dir; stop the cluster first.
trap 'stop_postgres; cleanup' EXIT

start_postgres() {
    [[ -x "$PGBIN/initdb" ]] || die "no PostgreSQL binaries in $PGBIN"
    PG_DATA="$T/pg"
    local sock="$T/pgsock" port
    port="$(free_port)"
    mkdir -p "$PG_DATA" "$sock" "$T/pglog"
    chown postgres "$PG_DATA" "$sock" "$T/pglog"
    runuser -u postgres -- "$PGBIN/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 >"$T/initdb.log" 2>&1 ||
        { cat "$T/initdb.log" >&2; die "initdb failed"; }
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PG_DATA" -l "$T/pglog/postgres.log" -w \
        -o "-p $port -k $sock -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off" start >/dev/null ||
        { tail -n 30 "$T/pglog/postgres.log" >&2; die "PostgreSQL did not start"; }
    DB="postgres://postgres@127.0.0.1:$port/postgres"
    log "PostgreSQL 15 on 127.0.0.1:$port"
}

sql() { psql -X -q -At -v ON_ERROR_STOP=1 "$DB" -c "$1"; }

# edge_config NAME DEVICE SAMPLE_MS: a native edge through nginx.
edge_config() {
    local name=$1 device=$2 sample=$3
    cat >"$T/$name.toml" <<TOML
device_id = "$device"
hub_url = "$NGINX_WSS"
ca_file = "$CA"
sample_interval_ms = $sample
spool_dir = "$T/spool-$device"
trust_clock = true

[link]
backoff_base_ms = 200
backoff_cap_ms = 2000

[[meter]]
id = "main"
kind = "simulated"
TOML
}

# run_edge NAME DEVICE SAMPLE_MS: starts an edge (a child of this shell, so
# its exit status can be waited for); its pid is appended to PIDS.
run_edge() {
    local name=$1 device=$2
    edge_config "$name" "$device" "$3"
    EMS_DEVICE_TOKEN="$(cat "$T/tokens/$device")" \
        "$EDGE" --log-level trace run --config "$T/$name.toml" >"$T/$name.log" 2>&1 &
    PIDS+=("$!")
}

# sampled DEVICE: "epoch seq" of every sample its edges' logs name.
sampled() {
    cat "$T"/edge-"$1".log "$T"/drain-"$1".log 2>/dev/null |
        sed -nE 's/.*sampled epoch ([0-9]+) seq ([0-9]+).*/\1 \2/p' | sort -u
}

stored() {
    sql "SELECT epoch || ' ' || seq FROM readings WHERE device_id = '$1'" | sort
}

# devices_json HUB_ADDR: /api/devices asked of that hub directly.
devices_json() {
    EMS_E2E_BEARER="$(cat "$T/tokens/viewer")" bash -c \
        'curl -fsS -H "Authorization: Bearer $EMS_E2E_BEARER" "http://$1/api/devices"' _ "$1"
}

# presence_agrees DEAD_HUB_ID ADDR...: every device online on a living hub,
# the same answer from every address.
presence_agrees() {
    local dead=$1 a first=""
    shift
    for a in "$@"; do
        devices_json "$a" >"$T/devices-$a.json" || return 1
        python3 - "$T/devices-$a.json" "$dead" "$EDGES" >"$T/presence-$a.txt" <<'PY' || return 1
import json, sys
doc = json.load(open(sys.argv[1]))
dead, want = sys.argv[2], int(sys.argv[3])
rows = sorted((d["device_id"], d["online"], d.get("hub")) for d in doc["devices"])
fleet = [r for r in rows if r[0].startswith("fleet-")]
if len(fleet) != want or not all(on and hub and hub != dead for _, on, hub in fleet):
    sys.exit(1)
print("\n".join(f"{d} {hub}" for d, _, hub in fleet))
PY
        if [[ -z "$first" ]]; then first="$T/presence-$a.txt"; else cmp -s "$first" "$T/presence-$a.txt" || return 1; fi
    done
}

main() {
    ensure_apt nginx openssl python3 curl postgresql-15 postgresql-client-15
    [[ $(id -u) -eq 0 ]] || die "run as root (the PostgreSQL cluster runs as the postgres user)"
    setup_tmp
    make_certs
    build_native
    start_postgres
    grep -q -- '--presence-lease-ms' <<<"$("$HUB" serve --help)" || die "ems-hub serve has no --presence-lease-ms"

    local https_port http_port i
    local -a ports addrs=() ids=()
    read -r -a ports <<<"$(free_ports $((HUBS + 2)))"
    https_port="${ports[0]}"; http_port="${ports[1]}"
    for ((i = 0; i < HUBS; i++)); do addrs+=("127.0.0.1:${ports[i + 2]}"); ids+=("hub$i"); done
    render_nginx "$https_port" "$http_port" "${addrs[@]}"
    nginx_test
    start_nginx "$https_port"
    NGINX_WSS="wss://localhost:$https_port"
    log "nginx on 127.0.0.1:$https_port -> ${addrs[*]}"

    # Devices, routes (asked before the hubs run: the access log names the
    # hash choice first), the hub to kill.
    mkdir -m 0700 "$T/tokens"
    local -a devs=() route=()
    local -A count=()
    for ((i = 0; i < EDGES; i++)); do
        devs+=("fleet-$i")
        (umask 077; timeout 60 "$HUB" device add "fleet-$i" --database "$DB" >"$T/tokens/fleet-$i")
        route+=("$(routed_hub "fleet-$i")")
        count[${route[$i]}]=$((${count[${route[$i]}]:-0} + 1))
        sleep 0.15 # stay under nginx's handshake rate per address
    done
    (umask 077; timeout 60 "$HUB" viewer add fleet-watch --all-devices --database "$DB" >"$T/tokens/viewer")
    local doomed=0
    for ((i = 0; i < HUBS; i++)); do
        log "hub$i (${addrs[$i]}): ${count[${addrs[$i]}]:-0} devices"
        ((${count[${addrs[$i]}]:-0} > ${count[${addrs[$doomed]}]:-0})) && doomed=$i
    done
    ((${count[${addrs[$doomed]}]:-0} > 0)) || die "no device hashes to any hub"

    local -a hub_pids=()
    for ((i = 0; i < HUBS; i++)); do
        start_hub "hub$i" "${addrs[$i]}" "$DB" --hub-id "${ids[$i]}" --presence-lease-ms "$LEASE_MS" \
            --trusted-proxy 127.0.0.1
        hub_pids+=("${PIDS[-1]}")
    done
    for ((i = 0; i < HUBS; i++)); do
        wait_for 60 "hub$i /readyz" curl -fsS "http://${addrs[$i]}/readyz" || { dump_logs; die "hub$i not ready"; }
    done

    # Dashboards first (they resume from their newest reading anyway), then
    # the edges, spread out for nginx's handshake rate limit.
    local -a followed=() dash_pids=() edge_pids=()
    for ((i = 0; i < EDGES; i++)); do
        if [[ "${route[$i]}" == "${addrs[$doomed]}" ]] || ((${#followed[@]} < 2)); then
            followed+=("${devs[$i]}")
        fi
    done
    local d
    for d in "${followed[@]}"; do
        EMS_E2E_BEARER="$(cat "$T/tokens/viewer")" python3 "$EMS_ROOT/.ci/ws_follow.py" \
            "$NGINX_WSS/ws/dashboard/$d" --device "$d" --cafile "$CA" \
            --out "$T/dash-$d.txt" --stop-file "$T/stop-dashboards" --timeout 900 2>"$T/dash-$d.log" &
        dash_pids+=("$!"); PIDS+=("$!")
        sleep 0.15
    done
    for d in "${devs[@]}"; do
        run_edge "edge-$d" "$d" "$SAMPLE_MS"
        edge_pids+=("${PIDS[-1]}")
        sleep 0.15
    done
    log "${#devs[@]} edges and ${#followed[@]} dashboards through nginx; warming up ${WARM_S}s"
    sleep "$WARM_S"
    local before
    before="$(sql "SELECT count(*) FROM readings")"
    ((before > 0)) || { dump_logs; die "no readings stored after ${WARM_S}s"; }

    log "SIGKILL hub$doomed (${addrs[$doomed]}, ${count[${addrs[$doomed]}]} devices); $before readings stored so far"
    kill -KILL "${hub_pids[$doomed]}"
    wait "${hub_pids[$doomed]}" 2>/dev/null || true
    forget_pid "${hub_pids[$doomed]}"
    local -a living=()
    for ((i = 0; i < HUBS; i++)); do ((i == doomed)) || living+=("${addrs[$i]}"); done

    local t0=$SECONDS lease_s=$(((LEASE_MS + 999) / 1000))
    wait_for $((lease_s + 60)) "/api/devices to agree on ${living[*]}" \
        presence_agrees "${ids[$doomed]}" "${living[@]}" ||
        { for i in "${living[@]}"; do head -c 2000 "$T/devices-$i.json" >&2 || true; echo >&2; done; dump_logs; die "the hubs disagree"; }
    log "/api/devices on ${living[*]} agree after $((SECONDS - t0)) s (lease ${lease_s} s): every device online on a living hub"
    sleep "$AFTER_S"

    # Stop: dashboards, then the edges; drain every outbox.
    touch "$T/stop-dashboards"
    local pid rc
    for pid in "${dash_pids[@]}"; do
        rc=0; wait "$pid" || rc=$?
        forget_pid "$pid"
        ((rc == 0)) || { dump_logs; die "a dashboard ended with status $rc"; }
    done
    for pid in "${edge_pids[@]}"; do
        rc=0; stop_pid "$pid" 20 || rc=$?
        forget_pid "$pid"
        ((rc == 0)) || { dump_logs; die "an edge exited with status $rc after SIGTERM"; }
    done
    local -a drain_pids=()
    for d in "${devs[@]}"; do
        run_edge "drain-$d" "$d" 3600000
        drain_pids+=("${PIDS[-1]}")
        sleep 0.15
    done
    local deadline=$((SECONDS + TIMEOUT_S)) missing
    while :; do
        missing=0
        for d in "${devs[@]}"; do
            [[ -z "$(comm -23 <(sampled "$d") <(stored "$d"))" ]] || missing=$((missing + 1))
        done
        ((missing == 0)) && break
        ((SECONDS < deadline)) || { dump_logs; die "$missing devices still miss readings after the drain"; }
        sleep 1
    done
    for pid in "${drain_pids[@]}"; do stop_pid "$pid" 20 || true; forget_pid "$pid"; done

    # Accounting: stored == sampled per device, each row once.
    local total=0 n extra
    for d in "${devs[@]}"; do
        n="$(sampled "$d" | wc -l)"
        ((n > 0)) || die "$d sampled nothing"
        extra="$(comm -13 <(sampled "$d") <(stored "$d") | head -n 3)"
        [[ -z "$extra" ]] || die "$d: stored readings no edge sampled: $extra"
        total=$((total + n))
    done
    local rows distinct
    rows="$(sql "SELECT count(*) FROM readings WHERE device_id LIKE 'fleet-%'")"
    distinct="$(sql "SELECT count(*) FROM (SELECT DISTINCT device_id, epoch, seq FROM readings WHERE device_id LIKE 'fleet-%') k")"
    ((rows == total && distinct == total)) || die "stored $rows rows ($distinct distinct) for $total sampled readings"
    log "every sampled reading stored exactly once: $total readings from ${#devs[@]} edges"

    # Dashboards: every stored reading between the first and the last one a
    # dashboard holds is in its file.
    local first last gap
    for d in "${followed[@]}"; do
        [[ -s "$T/dash-$d.txt" ]] || die "dashboard of $d received nothing"
        first="$(awk '{print $3}' "$T/dash-$d.txt" | sort -n | head -n 1)"
        last="$(awk '{print $3}' "$T/dash-$d.txt" | sort -n | tail -n 1)"
        gap="$(comm -23 \
            <(sql "SELECT epoch || ' ' || seq FROM readings WHERE device_id = '$d' AND ts BETWEEN to_timestamp($first / 1000.0) AND to_timestamp($last / 1000.0)" | sort) \
            <(awk '{print $1, $2}' "$T/dash-$d.txt" | sort -u) | head -n 3)"
        [[ -z "$gap" ]] || die "dashboard of $d misses stored readings: $gap"
        log "$(cat "$T/dash-$d.log")"
    done

    for pid in "${PIDS[@]}"; do stop_pid "$pid" 15 || { dump_logs; die "pid $pid exited with an error after SIGTERM"; }; done
    PIDS=()
    local t
    for t in "$T"/tokens/*; do
        if grep -rqF -- "$(cat "$t")" "$T"/*.log "$T"/nginx/*.log; then die "a token appears in a log"; fi
    done
    log "fleet-e2e: OK"
}

main "$@"
