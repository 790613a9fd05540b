#!/usr/bin/env bash
# Debian packages with cargo-deb ([package.metadata.deb] in edge/ and hub/Cargo.toml):
#   ems-edge for arm64 and armhf (after the cross builds of .ci/cross.sh build),
#   ems-hub for the host architecture (amd64 in CI).
# Then inspects them (dpkg-deb -I / -c) and checks what must be inside.
#
#   .ci/packages.sh                # build + inspect
#   .ci/packages.sh install-test   # also dpkg -i the host ems-hub package here,
#                                  # check user/dirs/unit, then purge it (changes
#                                  # this machine: meant for a throwaway CI box)
#
# Output: $CARGO_TARGET_DIR/debian/*.deb (CARGO_TARGET_DIR default <repo>/target-cross)
# EMS_PKG_NO_BUILD=1: package already built binaries (no cargo build).
set -euo pipefail
# shellcheck source=.ci/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$EMS_ROOT/target-cross}"
CARGO_DEB_VERSION="${CARGO_DEB_VERSION:-3.8.0}"
OUT="$CARGO_TARGET_DIR/debian"
EDGE_TARGETS=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)

ensure_apt dpkg-dev file
if ! cargo deb --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
    log "cargo install cargo-deb@$CARGO_DEB_VERSION"
    timeout 1800 cargo install --locked cargo-deb --version "$CARGO_DEB_VERSION"
fi

# Edge: cross build first (toolchains, targets), then package without rebuilding.
# EMS_PKG_NO_BUILD=1 packages the binaries already in $CARGO_TARGET_DIR.
# Host packages are built from one native build of both crates (the set
# cross.sh qemu-e2e and nginx-e2e.sh build too, so it is reused), then
# packaged with --no-build.
hub_build=(--no-build)
if [[ "${EMS_PKG_NO_BUILD:-0}" != 1 ]]; then
    "$EMS_ROOT/.ci/cross.sh" build
    (cd "$EMS_ROOT" && timeout 3600 cargo build --locked --release -p ems-hub -p ems-edge)
fi
cd "$EMS_ROOT"
mkdir -p "$OUT"
rm -f "$OUT"/ems-edge_*.deb "$OUT"/ems-hub_*.deb
for t in "${EDGE_TARGETS[@]}"; do
    log "cargo deb -p ems-edge --target $t --no-build"
    timeout 600 cargo deb -p ems-edge --target "$t" --no-build --output "$OUT/"
done
log "cargo deb -p ems-hub (host)"
timeout 3600 cargo deb -p ems-hub --output "$OUT/" "${hub_build[@]}"

fail=0
check() { # check DEB DESCRIPTION GREP_PATTERN < listing
    if ! grep -qE -- "$3"; then
        printf 'FAIL %s: %s\n' "$(basename "$1")" "$2" >&2
        fail=1
    fi
}
inspect() { # inspect DEB NAME ARCH
    local deb=$1 name=$2 arch=$3 info list ctl
    info="$(dpkg-deb -I "$deb")"
    list="$(dpkg-deb -c "$deb")"
    ctl="$(mktemp -d)"
    dpkg-deb -e "$deb" "$ctl"
    printf '\n### %s\n%s\n%s\n' "$(basename "$deb")" "$info" "$list"
    check "$deb" "Architecture: $arch" "^ *Architecture: $arch\$" <<<"$info"
    check "$deb" "depends on adduser" "^ *Depends:.*adduser" <<<"$info"
    check "$deb" "/usr/bin/$name 0755" "^-rwxr-xr-x (root/root|0/0) .* \./usr/bin/$name\$" <<<"$list"
    check "$deb" "systemd unit" "\./(usr/)?lib/systemd/system/$name\.service\$" <<<"$list"
    check "$deb" "postinst creates the user" "adduser .*--system" <"$ctl/postinst"
    check "$deb" "postinst enables the unit" "deb-systemd-helper enable $name\.service" <"$ctl/postinst"
    if [[ $name == ems-edge ]]; then
        check "$deb" "edge.env is 0600" "^-rw------- (root/root|0/0) .* \./etc/ems-edge/edge\.env\$" <<<"$list"
        check "$deb" "edge.toml conffile" "^/etc/ems-edge/edge\.toml\$" <"$ctl/conffiles"
        check "$deb" "edge.env conffile" "^/etc/ems-edge/edge\.env\$" <"$ctl/conffiles"
        local bin
        bin="$(mktemp -d)"
        dpkg-deb -x "$deb" "$bin"
        file -b "$bin/usr/bin/ems-edge" | check "$deb" "binary is for $arch" \
            "$([[ $arch == arm64 ]] && echo 'ARM aarch64' || echo 'ARM, EABI5')"
        rm -rf "$bin"
    else
        check "$deb" "hub.env is 0600" "^-rw------- (root/root|0/0) .* \./etc/ems-hub/hub\.env\$" <<<"$list"
        check "$deb" "hub.env conffile" "^/etc/ems-hub/hub\.env\$" <"$ctl/conffiles"
    fi
    rm -rf "$ctl"
}

host_arch="$(dpkg --print-architecture)"
inspect "$(ls "$OUT"/ems-edge_*_arm64.deb)" ems-edge arm64
inspect "$(ls "$OUT"/ems-edge_*_armhf.deb)" ems-edge armhf
inspect "$(ls "$OUT"/ems-hub_*_"$host_arch".deb)" ems-hub "$host_arch"
((fail == 0)) || die "package checks failed"

if [[ "${1:-}" == install-test ]]; then
    hub_deb="$(ls "$OUT"/ems-hub_*_"$host_arch".deb)"
    log "dpkg -i $(basename "$hub_deb")"
    DEBIAN_FRONTEND=noninteractive timeout 300 dpkg -i "$hub_deb"
    getent passwd ems-hub | grep -q ':/var/lib/ems-hub:' || die "user ems-hub missing"
    [[ "$(stat -c '%U %a' /var/lib/ems-hub)" == "ems-hub 750" ]] || die "/var/lib/ems-hub owner/mode"
    [[ "$(stat -c '%U %a' /etc/ems-hub/hub.env)" == "root 600" ]] || die "/etc/ems-hub/hub.env owner/mode"
    [[ -L /etc/systemd/system/multi-user.target.wants/ems-hub.service ]] || die "ems-hub.service not enabled"
    tok="$(runuser -u ems-hub -- ems-hub device add pkg-test --database sqlite:/var/lib/ems-hub/ems-hub.db)"
    [[ -n "$tok" ]] || die "ems-hub device add as ems-hub printed no token"
    DEBIAN_FRONTEND=noninteractive timeout 300 dpkg --purge ems-hub
    rm -f /var/lib/ems-hub/ems-hub.db*
    rmdir /var/lib/ems-hub 2>/dev/null || true
    # The edge package's maintainer scripts, in a host-architecture build of
    # the same package (kept apart from the release artifacts).
    log "cargo deb -p ems-edge (host architecture, for the install test)"
    timeout 3600 cargo deb -p ems-edge --output "$OUT/host-test/" "${hub_build[@]}"
    edge_deb="$(ls "$OUT"/host-test/ems-edge_*_"$host_arch".deb)"
    log "dpkg -i $(basename "$edge_deb")"
    DEBIAN_FRONTEND=noninteractive timeout 300 dpkg -i "$edge_deb"
    getent passwd ems-edge | grep -q ':/var/lib/ems-edge:' || die "user ems-edge missing"
    for g in gpio i2c spi dialout; do
        id -nG ems-edge | tr ' ' '\n' | grep -qx "$g" || die "ems-edge not in group $g"
    done
    [[ "$(stat -c '%U %a' /var/lib/ems-edge)" == "ems-edge 700" ]] || die "/var/lib/ems-edge owner/mode"
    [[ "$(stat -c '%U %a' /etc/ems-edge/edge.env)" == "root 600" ]] || die "/etc/ems-edge/edge.env owner/mode"
    [[ -L /etc/systemd/system/multi-user.target.wants/ems-edge.service ]] || die "ems-edge.service not enabled"
    DEBIAN_FRONTEND=noninteractive timeout 300 dpkg --purge ems-edge
    rmdir /var/lib/ems-edge 2>/dev/null || true
    rm -rf "$OUT/host-test"
    log "install-test: OK (both packages installed, user/groups/dirs/unit checked, purged)"
fi
log "packages in $OUT:"
ls -l "$OUT"/*.deb >&2
