#!/usr/bin/env bash
# Cross builds of the edge for the Raspberry Pi with Debian's cross toolchains
# (no Docker/cross needed; see .cargo/config.toml), and an end-to-end run of
# the aarch64 edge under qemu-user against a native hub on loopback.
#
#   .ci/cross.sh build      # toolchains + targets, release builds, sizes, qemu --help smoke
#   .ci/cross.sh qemu-e2e   # build (both targets), then the aarch64 edge under qemu ->
#                           # native hub on loopback -> readings stored
#   .ci/cross.sh all        # both (same as qemu-e2e, which builds first)
#
# Environment:
#   CARGO_TARGET_DIR   default <repo>/target-cross (kept apart from the native target/)
#   EMS_CROSS_TARGETS  default "aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf"
#   EMS_E2E_READINGS   readings that must be stored in qemu-e2e (default 20)
#   EMS_E2E_TIMEOUT    seconds to wait for them (default 120; qemu is slow)
set -euo pipefail
# shellcheck source=.ci/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$EMS_ROOT/target-cross}"
read -r -a TARGETS <<<"${EMS_CROSS_TARGETS:-aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf}"

# Debian cross binutils prefix for a Rust target triple.
gnu_prefix() {
    case "$1" in
        aarch64-unknown-linux-gnu) echo aarch64-linux-gnu ;;
        armv7-unknown-linux-gnueabihf) echo arm-linux-gnueabihf ;;
        *) die "no Debian cross toolchain for $1 (use cross, see Cross.toml)" ;;
    esac
}
qemu_for() {
    case "$1" in
        aarch64-unknown-linux-gnu) echo "qemu-aarch64 -L /usr/aarch64-linux-gnu" ;;
        armv7-unknown-linux-gnueabihf) echo "qemu-arm -L /usr/arm-linux-gnueabihf" ;;
        *) die "no qemu runner for $1" ;;
    esac
}

install_toolchains() {
    ensure_apt gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
        gcc-arm-linux-gnueabihf libc6-dev-armhf-cross \
        qemu-user binutils-aarch64-linux-gnu binutils-arm-linux-gnueabihf file
    local t installed
    installed="$(rustup target list --installed)"
    for t in "${TARGETS[@]}"; do
        grep -qx "$t" <<<"$installed" || timeout 600 rustup target add "$t"
    done
}

# Build the edge for every target, report stripped sizes, smoke-run under qemu.
cmd_build() {
    install_toolchains
    cd "$EMS_ROOT"
    local t bin prefix size stripped sizes_file="$CARGO_TARGET_DIR/ems-edge-sizes.txt"
    mkdir -p "$CARGO_TARGET_DIR"
    touch "$sizes_file"
    for t in "${TARGETS[@]}"; do
        log "cargo build --release -p ems-edge --target $t"
        timeout 3600 cargo build --locked --release -p ems-edge --target "$t"
        bin="$CARGO_TARGET_DIR/$t/release/ems-edge"
        prefix="$(gnu_prefix "$t")"
        "$prefix-strip" -o "$bin.stripped" "$bin"
        size="$(stat -c %s "$bin")"
        stripped="$(stat -c %s "$bin.stripped")"
        file -b "$bin" >&2
        { grep -v "^$t " "$sizes_file" || true; } >"$sizes_file.new"
        printf '%s ems-edge %s bytes (stripped: %s bytes)\n' "$t" "$size" "$stripped" | tee -a "$sizes_file.new"
        mv "$sizes_file.new" "$sizes_file"
        log "smoke: $(qemu_for "$t") ems-edge --help"
        # shellcheck disable=SC2046 # the runner is a command plus its arguments
        timeout 60 $(qemu_for "$t") "$bin" --help >/dev/null || die "ems-edge --help failed under qemu for $t"
    done
    log "sizes written to $sizes_file"
}

# ---------------------------------------------------------------------------
# qemu end-to-end: aarch64 edge (under qemu-aarch64) -> native hub on loopback,
# simulated meter, until readings are in the hub's SQLite store.
# Uses the hub CLI (device add, serve) and the edge config file.
# ---------------------------------------------------------------------------
E2E_PIDS=()
E2E_DIR=""
e2e_cleanup() {
    local pid
    for pid in "${E2E_PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    done
    if [[ -n "$E2E_DIR" && -d "$E2E_DIR" ]]; then
        if [[ "${EMS_KEEP_TMP:-0}" == 1 ]]; then log "kept $E2E_DIR"; else rm -rf "$E2E_DIR"; fi
    fi
}

cmd_qemu_e2e() {
    local target=aarch64-unknown-linux-gnu
    # Build every target (both by default: CI's one cross step), run aarch64.
    [[ " ${TARGETS[*]} " == *" $target "* ]] || TARGETS+=("$target")
    cmd_build
    ensure_apt sqlite3 curl python3
    cd "$EMS_ROOT"
    # The same package set as nginx-e2e.sh and packages.sh, so that the three
    # share one native build (features are unified per set).
    log "cargo build --release -p ems-hub -p ems-edge (native)"
    timeout 3600 cargo build --locked --release -p ems-hub -p ems-edge
    local hub="$CARGO_TARGET_DIR/release/ems-hub"
    local edge="$CARGO_TARGET_DIR/$target/release/ems-edge"
    local want="${EMS_E2E_READINGS:-20}" timeout_s="${EMS_E2E_TIMEOUT:-120}"
    local device=pi-qemu-e2e port db token hub_pid edge_pid count=0 deadline rc

    E2E_DIR="$(mktemp -d /tmp/ems-qemu-e2e.XXXXXX)"
    trap e2e_cleanup EXIT
    db="sqlite:$E2E_DIR/hub.db"
    port="$(free_port)"

    # Provision: the token is the only line on stdout. Never echo it.
    token="$(timeout 60 "$hub" device add "$device" --database "$db")"
    [[ -n "$token" && "$token" != *$'\n'* ]] || die "ems-hub device add did not print exactly one token line"

    log "hub: ems-hub serve --listen 127.0.0.1:$port --database $db"
    "$hub" serve --listen "127.0.0.1:$port" --database "$db" >"$E2E_DIR/hub.log" 2>&1 &
    hub_pid=$!
    E2E_PIDS+=("$hub_pid")
    wait_for 30 "hub /healthz" curl -fsS "http://127.0.0.1:$port/healthz" ||
        { cat "$E2E_DIR/hub.log" >&2; die "hub did not come up"; }

    mkdir -p "$E2E_DIR/spool"
    cat >"$E2E_DIR/edge.toml" <<TOML
device_id = "$device"
hub_url = "ws://127.0.0.1:$port"
allow_insecure = true
sample_interval_ms = 200
spool_dir = "$E2E_DIR/spool"
trust_clock = true

[[meter]]
id = "main"
kind = "simulated"
TOML

    log "edge: qemu-aarch64 ems-edge run --config edge.toml"
    # shellcheck disable=SC2046
    EMS_DEVICE_TOKEN="$token" $(qemu_for "$target") "$edge" run --config "$E2E_DIR/edge.toml" \
        >"$E2E_DIR/edge.log" 2>&1 &
    edge_pid=$!
    E2E_PIDS+=("$edge_pid")

    deadline=$((SECONDS + timeout_s))
    while ((SECONDS < deadline)); do
        kill -0 "$edge_pid" 2>/dev/null || { cat "$E2E_DIR/edge.log" >&2; die "edge exited early"; }
        kill -0 "$hub_pid" 2>/dev/null || { cat "$E2E_DIR/hub.log" >&2; die "hub exited early"; }
        # A failed query is retried, never read as a count.
        if count="$(sqlite3 -cmd '.timeout 5000' "$E2E_DIR/hub.db" \
            "SELECT count(*) FROM readings WHERE device_id='$device'")" && [[ "$count" =~ ^[0-9]+$ ]]; then
            ((count >= want)) && break
        else
            count=0
        fi
        sleep 1
    done
    log "stored readings for $device: $count (want >= $want)"

    # Graceful shutdown: edge exits 0 within 5 s of SIGTERM, hub within 10 s.
    rc=0; stop_pid "$edge_pid" 10 || rc=$?
    local hub_rc=0; stop_pid "$hub_pid" 15 || hub_rc=$?
    # The last word on the count: a query that fails here fails the check.
    count="$(sqlite3 -cmd '.timeout 5000' "$E2E_DIR/hub.db" \
        "SELECT count(*) FROM readings WHERE device_id='$device'")" ||
        die "cannot count the stored readings of $device"
    [[ "$count" =~ ^[0-9]+$ ]] || die "count query printed '$count'"

    if grep -qF -- "$token" "$E2E_DIR/hub.log" "$E2E_DIR/edge.log"; then
        die "the device token appears in a log"
    fi
    if ((count < want)); then
        echo "--- hub.log" >&2; tail -n 50 "$E2E_DIR/hub.log" >&2
        echo "--- edge.log" >&2; tail -n 50 "$E2E_DIR/edge.log" >&2
        die "only $count readings stored within ${timeout_s}s"
    fi
    ((rc == 0 && hub_rc == 0)) || die "unclean shutdown (edge $rc, hub $hub_rc)"
    log "qemu-e2e: OK ($count readings from the aarch64 edge stored by the native hub)"
}

case "${1:-build}" in
    build) cmd_build ;;
    qemu-e2e | all) cmd_qemu_e2e ;;
    -h | --help) sed -n '2,16p' "$0" ;;
    *) die "usage: $0 [build|qemu-e2e|all]" ;;
esac
