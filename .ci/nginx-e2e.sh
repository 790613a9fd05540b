#!/usr/bin/env bash
# nginx + TLS end-to-end (the production shape: hubs behind nginx), with
# Debian's nginx and a CA made here.
#
#   .ci/nginx-e2e.sh config-test   # render deploy/nginx/ems-hub.conf for a test
#                                  # and run `nginx -t` on it (no Rust build)
#   .ci/nginx-e2e.sh e2e           # full run (default):
#     1. CA + server certificate (localhost, 127.0.0.1) with openssl
#     2. nginx (daemon off, in the background, pid file in the temp dir) on a
#        free 127.0.0.1 port in front of TWO hubs (upstream hash $device_id)
#     3. finds which hub nginx routes the test device to (an unauthenticated
#        probe, then the upstream in the access log) and provisions the device
#        and a viewer ONLY in that hub's database - so a misrouted device or
#        dashboard cannot authenticate
#     4. starts both hubs; runs the native edge over wss:// through nginx with
#        ca_file and a dashboard subscriber (.ci/ws_subscribe.py) through
#        nginx; waits for readings in that hub's store and on the dashboard;
#        checks the other hub got none and the access log shows one upstream
#     5. the hub's own TLS (--tls-cert/--tls-key) without nginx: edge -> hub
#     6. if EMS_E2E_TEST_CMD is set, runs it (e.g. a Rust test binary) with:
#          EMS_E2E_NGINX_URL    wss://localhost:PORT (hub_url through nginx)
#          EMS_E2E_CA_FILE      PEM of the test CA
#          EMS_E2E_HUB_ADDRS    "127.0.0.1:P1 127.0.0.1:P2" (plain, direct)
#          EMS_E2E_HUB_DBS      "sqlite:/…/hub0.db sqlite:/…/hub1.db" (same order)
#          EMS_E2E_HUB_TLS_URL  wss://localhost:P3 (hub's own TLS; empty if skipped)
#          EMS_E2E_HUB_TLS_DB   its database
#          EMS_E2E_DEVICE_ID / EMS_E2E_DEVICE_TOKEN / EMS_E2E_VIEWER_TOKEN /
#          EMS_E2E_DEVICE_HUB (index into the lists) / EMS_E2E_DEVICE_DB:
#                               a second device, provisioned on its routed hub
#          EMS_E2E_NGINX_ACCESS_LOG, EMS_E2E_TMP
#     Everything is stopped and removed by an EXIT trap.
#
# Environment: CARGO_TARGET_DIR (default <repo>/target-cross),
#   EMS_E2E_TIMEOUT (default 60 s per wait), EMS_E2E_READINGS (default 10),
#   EMS_E2E_REQUIRE_HUB_TLS=1 to fail (not skip) when the hub lacks --tls-cert,
#   EMS_E2E_SKIP_BUILTIN=1 to only run EMS_E2E_TEST_CMD, EMS_KEEP_TMP=1,
#   EMS_E2E_NO_BUILD=1 to use already built binaries in $CARGO_TARGET_DIR/release.
set -euo pipefail
# shellcheck source=.ci/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=.ci/nginx-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/nginx-lib.sh"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$EMS_ROOT/target-cross}"
TIMEOUT_S="${EMS_E2E_TIMEOUT:-60}"
WANT="${EMS_E2E_READINGS:-10}"


cmd_config_test() {
    ensure_apt nginx openssl python3
    setup_tmp
    make_certs
    local ports
    read -r -a ports <<<"$(free_ports 2)"
    render_nginx "${ports[0]}" "${ports[1]}" 127.0.0.1:18080 127.0.0.1:18081
    nginx_test
    # The file as shipped, only the certificate paths changed, as a drop-in in
    # a copy of Debian's stock /etc/nginx (nginx.conf, sites-enabled/default).
    cp -a /etc/nginx "$T/etc-nginx"
    sed -i "s#/etc/nginx/#$T/etc-nginx/#g" "$T/etc-nginx/nginx.conf"
    sed -e "s#/etc/letsencrypt/live/hub.example.org/fullchain.pem#$CERT#" \
        -e "s#/etc/letsencrypt/live/hub.example.org/privkey.pem#$KEY#" \
        "$EMS_ROOT/deploy/nginx/ems-hub.conf" >"$T/etc-nginx/conf.d/ems-hub.conf"
    log "nginx -t with the shipped file in a copy of Debian's /etc/nginx"
    nginx -t -q -e "$T/nginx/error.log" -c "$T/etc-nginx/nginx.conf" ||
        die "deploy/nginx/ems-hub.conf does not load as a conf.d drop-in"
    log "config-test: OK"
}


# start_edge NAME HUB_URL DEVICE TOKEN: native edge with ca_file, simulated meter
start_edge() {
    local name=$1 url=$2 device=$3 token=$4
    mkdir -p "$T/$name-spool"
    cat >"$T/$name.toml" <<TOML
device_id = "$device"
hub_url = "$url"
ca_file = "$CA"
sample_interval_ms = 200
spool_dir = "$T/$name-spool"
trust_clock = true

[[meter]]
id = "main"
kind = "simulated"
TOML
    EMS_DEVICE_TOKEN="$token" "$EDGE" run --config "$T/$name.toml" >"$T/$name.log" 2>&1 &
    PIDS+=("$!")
}

count_readings() { # count_readings DBFILE DEVICE: prints the count; fails when the query fails
    local n
    n="$(sqlite3 -cmd '.timeout 5000' "$1" "SELECT count(*) FROM readings WHERE device_id='$2'")" || return 1
    [[ "$n" =~ ^[0-9]+$ ]] || { log "count query on $1 printed '$n'"; return 1; }
    printf '%s\n' "$n"
}

wait_readings() { # wait_readings DBFILE DEVICE WANT
    local n=0 deadline=$((SECONDS + TIMEOUT_S))
    while ((SECONDS < deadline)); do
        # A failed query is retried (the hub may hold the write lock for a
        # moment) but never read as a count.
        if n="$(count_readings "$1" "$2")"; then
            ((n >= $3)) && { log "$2: $n readings stored in $(basename "$1")"; return 0; }
        fi
        sleep 0.5
    done
    log "$2: only $n readings in $(basename "$1") after ${TIMEOUT_S}s"
    return 1
}


cmd_e2e() {
    ensure_apt nginx openssl python3 sqlite3 curl
    setup_tmp
    make_certs
    build_native

    local https_port http_port p0 p1 p2
    read -r https_port http_port p0 p1 p2 <<<"$(free_ports 5)"
    local -a addrs=("127.0.0.1:$p0" "127.0.0.1:$p1")
    local -a dbfiles=("$T/hub0.db" "$T/hub1.db")
    render_nginx "$https_port" "$http_port" "${addrs[@]}"
    nginx_test

    log "nginx on 127.0.0.1:$https_port -> ${addrs[*]}"
    start_nginx "$https_port"

    # Route, then provision only on the routed hub (hubs are not running yet:
    # nginx tries the hash choice first, the access log names it first).
    local dev=pi-nginx-e2e dev2="" k=-1 k2=-1 i n tok viewer tok2 viewer2 route route2=""
    route="$(routed_hub "$dev")"
    for i in 0 1; do [[ "${addrs[$i]}" == "$route" ]] && k=$i; done
    ((k >= 0)) || die "routed to unknown upstream ($route)"
    # The second device: one that nginx sends to the OTHER hub, so both hubs
    # carry traffic and EMS_E2E_TEST_CMD can check both.
    for n in $(seq 1 24); do
        route2="$(routed_hub "pi-nginx-e2e-test-$n")"
        if [[ "$route2" != "$route" ]]; then dev2="pi-nginx-e2e-test-$n"; break; fi
    done
    [[ -n "$dev2" ]] || die "24 device ids all hashed to $route: is 'hash \$device_id consistent' in effect?"
    k2=$((1 - k))
    log "nginx routes $dev -> hub$k ($route), $dev2 -> hub$k2 ($route2)"

    for i in 0 1; do
        # create both stores (schema) with a throwaway device, so the unrouted
        # hub's readings table exists for the negative check
        timeout 60 "$HUB" device add "schema-$i" --database "sqlite:${dbfiles[$i]}" >/dev/null
    done
    tok="$(timeout 60 "$HUB" device add "$dev" --database "sqlite:${dbfiles[$k]}")"
    viewer="$(timeout 60 "$HUB" viewer add e2e-dashboard --device "$dev" --database "sqlite:${dbfiles[$k]}")"
    tok2="$(timeout 60 "$HUB" device add "$dev2" --database "sqlite:${dbfiles[$k2]}")"
    viewer2="$(timeout 60 "$HUB" viewer add e2e-test-dashboard --device "$dev2" --database "sqlite:${dbfiles[$k2]}")"

    for i in 0 1; do start_hub "hub$i" "${addrs[$i]}" "sqlite:${dbfiles[$i]}"; done
    for i in 0 1; do
        wait_for 30 "hub$i /healthz" curl -fsS "http://${addrs[$i]}/healthz" || { dump_logs; die "hub$i did not start"; }
    done

    # Hub with its own TLS (rustls), no nginx.
    local tls_url="" tls_db="$T/hub-tls.db" tls_tok=""
    if "$HUB" serve --help 2>/dev/null | grep -q -- '--tls-cert'; then
        tls_tok="$(timeout 60 "$HUB" device add pi-hub-tls-e2e --database "sqlite:$tls_db")"
        start_hub hub-tls "127.0.0.1:$p2" "sqlite:$tls_db" --tls-cert "$CERT" --tls-key "$KEY"
        wait_for 30 "hub-tls /healthz" curl -fsS --cacert "$CA" "https://localhost:$p2/healthz" ||
            { dump_logs; die "hub with --tls-cert did not start"; }
        tls_url="wss://localhost:$p2"
    elif [[ "${EMS_E2E_REQUIRE_HUB_TLS:-0}" == 1 ]]; then
        die "ems-hub serve has no --tls-cert option"
    else
        log "SKIP: ems-hub serve has no --tls-cert yet (hub's own TLS not tested)"
    fi

    if [[ "${EMS_E2E_SKIP_BUILTIN:-0}" != 1 ]]; then
        # Dashboard through nginx, then the edge through nginx.
        EMS_E2E_BEARER="$viewer" timeout $((TIMEOUT_S + 10)) python3 "$EMS_ROOT/.ci/ws_subscribe.py" \
            "wss://localhost:$https_port/ws/dashboard/$dev" --device "$dev" --count 3 \
            --cafile "$CA" --timeout "$TIMEOUT_S" >"$T/dashboard.out" 2>"$T/dashboard.log" &
        local dash_pid=$!
        PIDS+=("$dash_pid")
        sleep 0.5
        start_edge edge-nginx "wss://localhost:$https_port" "$dev" "$tok"

        wait_readings "${dbfiles[$k]}" "$dev" "$WANT" || { dump_logs; die "no readings through nginx"; }
        wait "$dash_pid" || { dump_logs; die "dashboard through nginx did not receive readings"; }
        forget_pid "$dash_pid"
        log "dashboard through nginx received $(wc -l <"$T/dashboard.out") frames"
        local other=$((1 - k)) n_other
        n_other="$(count_readings "${dbfiles[$other]}" "$dev")" ||
            die "cannot count $dev's readings in hub$other's store"
        ((n_other == 0)) || die "hub$other also stored $n_other readings of $dev"

        # HTTP through nginx: the page, the API routed by device id, private
        # metrics, and URLs with credentials refused before anything logs them.
        local base="https://localhost:$https_port" marker="QUERYMARKER$RANDOM$RANDOM" code
        http_code() { curl -s -o /dev/null -w '%{http_code}' --cacert "$CA" "$@"; }
        code="$(http_code "$base/")"
        [[ "$code" == 200 ]] || die "GET / through nginx: $code (want 200, the hub's page)"
        code="$(http_code "$base/metrics")"
        [[ "$code" == 404 ]] || die "GET /metrics through nginx: $code (want 404: metrics stay private)"
        code="$(http_code "$base/ws/device/$dev?token=$marker")"
        [[ "$code" == 400 ]] || die "query on /ws/: $code (want 400)"
        code="$(http_code "$base/api/devices?access_token=$marker")"
        [[ "$code" == 400 ]] || die "credential query on /api/: $code (want 400)"
        code="$(http_code "$base/api/devices?%74oken=$marker")"
        [[ "$code" == 400 ]] || die "percent-encoded credential query on /api/: $code (want 400)"
        code="$(EMS_E2E_BEARER="$viewer" bash -c 'curl -s -o /dev/null -w "%{http_code}" --cacert "$1" \
            -H "Authorization: Bearer $EMS_E2E_BEARER" "$2"' _ "$CA" "$base/api/devices/$dev/readings?limit=5")"
        [[ "$code" == 200 ]] || die "GET /api/devices/$dev/readings through nginx: $code (want 200 from hub$k)"
        if grep -rqF -- "$marker" "$T"/nginx/*.log "$T"/hub*.log; then die "a query string reached a log"; fi
        log "nginx: page 200, API by device id 200, /metrics 404, credential queries 400 and not logged"

        if [[ -n "$tls_url" ]]; then
            start_edge edge-tls "$tls_url" pi-hub-tls-e2e "$tls_tok"
            wait_readings "$tls_db" pi-hub-tls-e2e "$WANT" || { dump_logs; die "no readings through the hub's own TLS"; }
        fi
    fi

    if [[ -n "${EMS_E2E_TEST_CMD:-}" ]]; then
        log "running EMS_E2E_TEST_CMD"
        EMS_E2E_NGINX_URL="wss://localhost:$https_port" \
        EMS_E2E_CA_FILE="$CA" \
        EMS_E2E_HUB_ADDRS="${addrs[*]}" \
        EMS_E2E_HUB_DBS="sqlite:${dbfiles[0]} sqlite:${dbfiles[1]}" \
        EMS_E2E_HUB_TLS_URL="$tls_url" \
        EMS_E2E_HUB_TLS_DB="sqlite:$tls_db" \
        EMS_E2E_DEVICE_ID="$dev2" \
        EMS_E2E_DEVICE_TOKEN="$tok2" \
        EMS_E2E_VIEWER_TOKEN="$viewer2" \
        EMS_E2E_DEVICE_HUB="$k2" \
        EMS_E2E_DEVICE_DB="sqlite:${dbfiles[$k2]}" \
        EMS_E2E_NGINX_ACCESS_LOG="$T/nginx/ems-hub.access.log" \
        EMS_E2E_TMP="$T" \
            timeout 1800 bash -c "$EMS_E2E_TEST_CMD" || { dump_logs; die "EMS_E2E_TEST_CMD failed"; }
    fi

    # Stop edges (graceful) and hubs, then nginx (flushes WebSocket access log
    # lines). Each must exit 0 on SIGTERM: a crash at shutdown is a failure.
    local pid rc
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid="${PIDS[$i]}"
        rc=0
        stop_pid "$pid" 15 || rc=$?
        ((rc == 0)) || { dump_logs; die "pid $pid ($(tr '\0' ' ' </proc/"$pid"/cmdline 2>/dev/null || echo gone)) exited with status $rc after SIGTERM"; }
    done
    PIDS=()
    kill -QUIT "$NGINX_PID" 2>/dev/null || die "nginx is not running at the end"
    rc=0
    wait "$NGINX_PID" || rc=$?
    ((rc == 0)) || die "nginx exited with status $rc after SIGQUIT"
    NGINX_PID=""

    # Every /ws/ line of a device went to one upstream (device and dashboards
    # together). A device that streamed must have such lines: no lines would
    # make the check pass without looking at anything.
    local d ups
    local -a streamed=()
    [[ "${EMS_E2E_SKIP_BUILTIN:-0}" != 1 ]] && streamed+=("$dev")
    [[ -n "${EMS_E2E_TEST_CMD:-}" ]] && streamed+=("$dev2")
    ((${#streamed[@]})) || die "nothing streamed: EMS_E2E_SKIP_BUILTIN=1 needs EMS_E2E_TEST_CMD"
    for d in "${streamed[@]}"; do
        ups="$(grep -F "\"GET /ws/" "$T/nginx/ems-hub.access.log" | grep -F " device=$d upstream=" |
            grep -v ' upstream_status=-' | sed -E 's/.* upstream=([^ ,]+).*/\1/' | sort -u)" || true
        [[ -n "$ups" ]] || die "no proxied /ws/ line for $d in the access log"
        [[ "$(wc -l <<<"$ups")" -eq 1 ]] || die "$d was proxied to several hubs: $ups"
        log "access log: $d always on $ups"
    done
    # No token and no query string in any log.
    local t
    for t in "$tok" "$viewer" "$tok2" "$viewer2" ${tls_tok:+"$tls_tok"}; do
        if grep -rqF -- "$t" "$T"/*.log "$T"/nginx/*.log; then die "a token appears in a log"; fi
    done
    log "nginx-e2e: OK"
}

case "${1:-e2e}" in
    config-test) cmd_config_test ;;
    e2e) cmd_e2e ;;
    -h | --help) sed -n '2,42p' "$0" ;;
    *) die "usage: $0 [config-test|e2e]" ;;
esac
