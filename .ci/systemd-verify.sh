#!/usr/bin/env bash
# Verify systemd/ems-edge.service and systemd/ems-hub.service with
# `systemd-analyze verify` (and print `systemd-analyze security` scores).
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

units=(ems-edge.service ems-hub.service)
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

for u in "${units[@]}"; do
    install -m 0644 "$EMS_ROOT/systemd/$u" "$root/etc/systemd/system/$u"
done

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

for u in "${units[@]}"; do
    (cd "$root" && timeout 120 systemd-analyze security --offline=yes --root="$root" "$u" 2>&1 | tail -n 1) || true
done
