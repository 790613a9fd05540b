# shellcheck shell=bash
# Helpers shared by the deployment CI scripts (.ci/cross.sh,
# .ci/systemd-verify.sh, .ci/nginx-e2e.sh, .ci/packages.sh). Source it; do not execute it.

# Repository root (this file lives in .ci/).
EMS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export EMS_ROOT

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ensure_apt CMD_OR_PKG... : install Debian packages that are not installed yet.
# Arguments are package names; apt-get update runs only when something is missing.
ensure_apt() {
    local missing=() pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed'; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]})); then
        log "apt-get install ${missing[*]}"
        [[ $(id -u) -eq 0 ]] || die "need root to install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        timeout 900 apt-get update -qq
        timeout 1800 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# free_port: print a TCP port on 127.0.0.1 that is free right now.
free_port() {
    free_ports 1
}

# free_ports N: print N distinct TCP ports on 127.0.0.1 that are free right
# now, space-separated. Every socket stays open until the last port is
# chosen, so two of them cannot be the same port (separate free_port calls
# can be: the kernel may hand a just-closed port out again).
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
held = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    held.append(s)
print(" ".join(str(s.getsockname()[1]) for s in held))
for s in held:
    s.close()
PY
}

# wait_for TIMEOUT_S DESCRIPTION CMD...: retry CMD every 0.2 s until it succeeds.
wait_for() {
    local timeout_s=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + timeout_s))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { log "timed out after ${timeout_s}s waiting for ${what}"; return 1; }
        sleep 0.2
    done
}

# stop_pid PID [TIMEOUT_S]: SIGTERM, wait, then SIGKILL. Returns the exit status
# of the process if it was our child, 0 otherwise.
stop_pid() {
    local pid=$1 timeout_s=${2:-10} deadline rc=0
    [[ -n "$pid" ]] || return 0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || rc=$?; return "$rc"; }
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + timeout_s))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "pid $pid did not exit within ${timeout_s}s after SIGTERM; killing"
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            return 124
        fi
        sleep 0.1
    done
    wait "$pid" 2>/dev/null || rc=$?
    return "$rc"
}

# Cargo on CI: the rustup toolchain lives in ~/.cargo/bin.
if [[ -d "${HOME:-/root}/.cargo/bin" && ":$PATH:" != *":${HOME:-/root}/.cargo/bin:"* ]]; then
    PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi
