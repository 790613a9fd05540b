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

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$EMS_ROOT/target-cross}"
TIMEOUT_S="${EMS_E2E_TIMEOUT:-60}"
WANT="${EMS_E2E_READINGS:-10}"

T=""          # temp dir
PIDS=()       # background processes we started
NGINX_PID=""
cleanup() {
    local pid
    if [[ -n "$NGINX_PID" ]] && kill -0 "$NGINX_PID" 2>/dev/null; then
        kill -QUIT "$NGINX_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$NGINX_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$NGINX_PID" 2>/dev/null || true
    fi
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    done
    if [[ -n "$T" && -d "$T" ]]; then
        if [[ "${EMS_KEEP_TMP:-0}" == 1 ]]; then log "kept $T"; else rm -rf "$T"; fi
    fi
}
trap cleanup EXIT

setup_tmp() {
    T="$(mktemp -d /tmp/ems-nginx-e2e.XXXXXX)"
    chmod 0755 "$T"
    mkdir -p "$T/nginx" "$T/acme"
}

# --- certificates ------------------------------------------------------------
make_certs() {
    local d="$T/pki"
    mkdir -p "$d"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$d/ca.key" -out "$d/ca.pem" -days 2 -subj "/CN=EMS e2e test CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$d/server.key" -out "$d/server.csr" -subj "/CN=localhost" 2>/dev/null
    printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth" >"$d/server.ext"
    openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" \
        -set_serial "0x$(openssl rand -hex 8)" -days 2 -extfile "$d/server.ext" \
        -out "$d/server.pem" 2>/dev/null
    openssl verify -CAfile "$d/ca.pem" "$d/server.pem" >/dev/null
    # nginx workers (root here) and hubs read these.
    chmod 0644 "$d/ca.pem" "$d/server.pem"
    CA="$d/ca.pem" CERT="$d/server.pem" KEY="$d/server.key"
}

# --- nginx config ------------------------------------------------------------
# render_nginx HTTPS_PORT HTTP_PORT UPSTREAM...: a test copy of the shipped
# config plus a wrapper nginx.conf. Fails if the shipped file no longer has a
# line a replacement expects, so drift is caught here.
render_nginx() {
    local https_port=$1 http_port=$2
    shift 2
    python3 - "$EMS_ROOT/deploy/nginx/ems-hub.conf" "$T/nginx/ems-hub.conf" \
        "$https_port" "$http_port" "$T" "$CERT" "$KEY" "$@" <<'PY'
import re, sys
src, dst, https_port, http_port, tmp, cert, key, *ups = sys.argv[1:]
s = open(src).read()
# max_fails=0: the routing probes below hit hubs that are not started yet;
# they must not mark them down.
servers = "".join(f"    server {u} max_fails=0;\n" for u in ups)
subs = [
    (r"^\s*listen 80;\n", f"    listen 127.0.0.1:{http_port};\n"),
    (r"^\s*listen \[::\]:80;\n", ""),
    (r"^\s*listen 443 ssl;\n", f"    listen 127.0.0.1:{https_port} ssl;\n"),
    (r"^\s*listen \[::\]:443 ssl;\n", ""),
    (r"server_name hub\.example\.org;", "server_name localhost;"),
    (r"ssl_certificate\s+/etc/letsencrypt/\S+;", f"ssl_certificate {cert};"),
    (r"ssl_certificate_key\s+/etc/letsencrypt/\S+;", f"ssl_certificate_key {key};"),
    (r"/var/log/nginx/", f"{tmp}/nginx/"),
    (r"root /var/www/letsencrypt;", f"root {tmp}/acme;"),
    (r"(upstream ems_hubs \{\n\s*hash \$device_id consistent;\n)(?:\s*server [^\n]*\n)+", r"\g<1>" + servers.replace("\\", "\\\\")),
]
for pat, rep in subs:
    s, n = re.subn(pat, rep, s, flags=re.M)
    if n == 0:
        sys.exit(f"render_nginx: pattern not found in {src}: {pat}")
open(dst, "w").write(s)
PY
    local user_line=""
    [[ $(id -u) -eq 0 ]] && user_line="user root root;"
    cat >"$T/nginx/nginx.conf" <<CONF
$user_line
worker_processes 1;
pid $T/nginx/nginx.pid;
error_log $T/nginx/error.log info;
events { worker_connections 512; }
http {
    client_body_temp_path $T/nginx/client_body;
    proxy_temp_path $T/nginx/proxy;
    fastcgi_temp_path $T/nginx/fastcgi;
    uwsgi_temp_path $T/nginx/uwsgi;
    scgi_temp_path $T/nginx/scgi;
    include $T/nginx/ems-hub.conf;
    access_log $T/nginx/http-access.log ems_noquery;
}
CONF
}

nginx_test() {
    log "nginx -t ($(nginx -v 2>&1))"
    nginx -t -q -p "$T/nginx" -e "$T/nginx/error.log" -c "$T/nginx/nginx.conf" ||
        die "nginx -t failed for the rendered deploy/nginx/ems-hub.conf"
    nginx -t -p "$T/nginx" -e "$T/nginx/error.log" -c "$T/nginx/nginx.conf" 2>&1 | sed 's/^/    /' >&2
}

cmd_config_test() {
    ensure_apt nginx openssl python3
    setup_tmp
    make_certs
    render_nginx "$(free_port)" "$(free_port)" 127.0.0.1:18080 127.0.0.1:18081
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

# --- hubs, provisioning ------------------------------------------------------
HUB=""; EDGE=""
build_native() {
    cd "$EMS_ROOT"
    HUB="$CARGO_TARGET_DIR/release/ems-hub"
    EDGE="$CARGO_TARGET_DIR/release/ems-edge"
    if [[ "${EMS_E2E_NO_BUILD:-0}" == 1 && -x "$HUB" && -x "$EDGE" ]]; then
        log "EMS_E2E_NO_BUILD=1: using the existing $HUB and $EDGE"
        return
    fi
    log "cargo build --release -p ems-hub -p ems-edge (native)"
    timeout 3600 cargo build --locked --release -p ems-hub -p ems-edge
}

# start_hub NAME LISTEN DB [extra serve args...] -> prints nothing, appends PIDS
start_hub() {
    local name=$1 listen=$2 db=$3
    shift 3
    "$HUB" serve --listen "$listen" --database "$db" "$@" >"$T/$name.log" 2>&1 &
    PIDS+=("$!")
}

# routed_hub DEVICE_ID: which upstream nginx picks for this device (hash order),
# from the access log line of an unauthenticated, non-upgrade probe request.
routed_hub() {
    local id=$1 line
    curl -s -o /dev/null --cacert "$CA" "$NGINX_HTTPS/ws/device/$id" || true
    sleep 0.2
    line="$(grep -F " device=$id upstream=" "$T/nginx/ems-hub.access.log" | tail -n 1)"
    [[ -n "$line" ]] || die "no access log line for the probe of $id"
    # upstream=ADDR or upstream=ADDR1, ADDR2 (next_upstream): the first is the hash choice
    line="$(sed -E 's/.* upstream=([^ ,]+).*/\1/' <<<"$line")"
    [[ "$line" == 127.0.0.1:* ]] || die "probe of $id was not proxied (upstream=$line; rate limited?)"
    printf '%s\n' "$line"
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

# forget_pid PID: drop a process that was already waited for from PIDS, so
# the shutdown check below does not ask for its status a second time.
forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do [[ "$p" == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

dump_logs() {
    local f
    for f in "$T"/*.log "$T"/nginx/*.log; do
        [[ -f "$f" ]] || continue
        echo "--- $f" >&2
        tail -n 30 "$f" >&2
    done
}

cmd_e2e() {
    ensure_apt nginx openssl python3 sqlite3 curl
    setup_tmp
    make_certs
    build_native

    local https_port http_port p0 p1 p2
    https_port="$(free_port)"; http_port="$(free_port)"
    p0="$(free_port)"; p1="$(free_port)"; p2="$(free_port)"
    local -a addrs=("127.0.0.1:$p0" "127.0.0.1:$p1")
    local -a dbfiles=("$T/hub0.db" "$T/hub1.db")
    NGINX_HTTPS="https://localhost:$https_port"
    render_nginx "$https_port" "$http_port" "${addrs[@]}"
    nginx_test

    log "nginx on 127.0.0.1:$https_port -> ${addrs[*]}"
    nginx -p "$T/nginx" -e "$T/nginx/error.log" -c "$T/nginx/nginx.conf" -g 'daemon off;' &
    NGINX_PID=$!
    wait_for 20 "nginx" test -s "$T/nginx/nginx.pid" || die "nginx did not start"
    # /metrics is answered by nginx itself (404): probing a proxied path while
    # the hubs are down would count as upstream failures (max_fails).
    wait_for 20 "nginx port" curl -s -o /dev/null --cacert "$CA" "$NGINX_HTTPS/metrics" || die "nginx not answering"

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
