# shellcheck shell=bash
# nginx in front of hubs, for the CI scripts that run the production shape
# (.ci/nginx-e2e.sh, .ci/fleet-e2e.sh): a temp dir cleaned up on exit, a
# throwaway CA and server certificate, the shipped deploy/nginx/ems-hub.conf
# rendered for loopback ports and a list of hubs, release builds of the hub
# and the edge, starting hubs, and which hub nginx routes a device to.
# Source it after common.sh; do not execute it.

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

# --- hubs, provisioning ------------------------------------------------------
HUB=""; EDGE=""
build_native() {
    cd "$EMS_ROOT" || die "no repository at $EMS_ROOT"
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

# start_nginx HTTPS_PORT: nginx (daemon off) on the rendered config; waits
# until it answers. Sets NGINX_PID and NGINX_HTTPS.
start_nginx() {
    NGINX_HTTPS="https://localhost:$1"
    nginx -p "$T/nginx" -e "$T/nginx/error.log" -c "$T/nginx/nginx.conf" -g 'daemon off;' &
    NGINX_PID=$!
    wait_for 20 "nginx" test -s "$T/nginx/nginx.pid" || die "nginx did not start"
    # /metrics is answered by nginx itself (404): probing a proxied path while
    # the hubs are down would count as upstream failures (max_fails).
    wait_for 20 "nginx port" curl -s -o /dev/null --cacert "$CA" "$NGINX_HTTPS/metrics" || die "nginx not answering"
}
