#!/usr/bin/env bash
# Verify systemd/ems-edge.service, systemd/ems-hub.service and the image's
# first-boot unit (deploy/pi-gen) with `systemd-analyze verify`, and print the
# `systemd-analyze security` exposure scores of the two services.
#
# verify needs the ExecStart binaries to exist. Rather than touching the
# machine's /usr/bin, the units are checked inside a scratch root (--root=)
# that holds a copy of the host's system units (targets the units refer to),
# the units under test, and the binaries at /usr/bin: the real ones when
# EMS_EDGE_BIN / EMS_HUB_BIN point at built binaries, else executable stubs.
# Any message from verify (unknown key, bad value, missing unit) fails the run.
set -euo pipefail
# shellcheck source=.ci/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

command -v systemd-analyze >/dev/null || ensure_apt systemd

units=(ems-edge.service ems-hub.service ems-edge-firstboot.service)
FIRSTBOOT_DIR="$EMS_ROOT/deploy/pi-gen/stage-ems/00-install-ems-edge/files"
root="$(mktemp -d /tmp/ems-systemd-verify.XXXXXX)"
trap 'rm -rf "$root"' EXIT

mkdir -p "$root/usr/bin" "$root/usr/lib/systemd" "$root/etc/systemd/system"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
ln -s usr/lib "$root/lib"
ln -s usr/bin "$root/bin"

install_bin() { # install_bin NAME [PATH]
    if [[ -n "${2:-}" ]]; then
        [[ -x "$2" ]] || die "$2 is not an executable"
        install -m 0755 "$2" "$root/usr/bin/$1"
    else
        printf '#!/bin/sh\nexit 0\n' >"$root/usr/bin/$1"
        chmod 0755 "$root/usr/bin/$1"
    fi
}
install_bin ems-edge "${EMS_EDGE_BIN:-}"
install_bin ems-hub "${EMS_HUB_BIN:-}"

install -m 0644 "$EMS_ROOT/systemd/ems-edge.service" "$EMS_ROOT/systemd/ems-hub.service" "$root/etc/systemd/system/"
# The image's first-boot provisioning unit and its script (deploy/pi-gen).
install -m 0644 "$FIRSTBOOT_DIR/ems-edge-firstboot.service" "$root/etc/systemd/system/"
install -D -m 0755 "$FIRSTBOOT_DIR/ems-edge-firstboot" "$root/usr/lib/ems-edge/ems-edge-firstboot"

log "systemd-analyze verify ${units[*]} ($(systemd-analyze --version | head -n1))"
out="$(cd "$root" && timeout 120 systemd-analyze --root="$root" verify "${units[@]}" 2>&1)" || {
    printf '%s\n' "$out" >&2
    die "systemd-analyze verify failed"
}
if [[ -n "$out" ]]; then
    printf '%s\n' "$out" >&2
    die "systemd-analyze verify printed warnings"
fi
log "verify: OK, no warnings"

for u in ems-edge.service ems-hub.service; do
    (cd "$root" && timeout 120 systemd-analyze security --offline=yes --root="$root" "$u" 2>&1 | tail -n 1) || true
done
