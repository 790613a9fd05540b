#!/usr/bin/env bash
# Checks of deploy/pi-gen without building an image (pi-gen needs a full
# Raspberry Pi OS bootstrap): shellcheck of the stage and first-boot scripts,
# the stage layout pi-gen expects, and the first-boot script run against
# scratch directories (moves files, modes, owners, CRLF, deletes the sources,
# never prints the token, ignores a malformed token).
set -euo pipefail
# shellcheck source=.ci/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ensure_apt shellcheck
STAGE="$EMS_ROOT/deploy/pi-gen/stage-ems"
FB="$STAGE/00-install-ems-edge/files/ems-edge-firstboot"

log "shellcheck"
shellcheck -s bash "$STAGE/prerun.sh" "$STAGE"/*/00-run.sh
shellcheck "$FB" "$EMS_ROOT"/deploy/debian/*/postinst
# Every CI script (and the library files they source).
shellcheck -x "$EMS_ROOT"/.ci/*.sh "$EMS_ROOT"/.ci/run

log "stage layout"
for f in prerun.sh 00-install-ems-edge/00-run.sh 01-hardware/00-run.sh; do
    [[ -x "$STAGE/$f" ]] || die "$f missing or not executable"
done
[[ -f "$STAGE/EXPORT_IMAGE" ]] || die "EXPORT_IMAGE missing"
for f in ems-edge-firstboot.service README-ems.txt; do
    [[ -f "$STAGE/00-install-ems-edge/files/$f" ]] || die "files/$f missing"
done

log "first-boot script against scratch directories"
T="$(mktemp -d /tmp/ems-firstboot.XXXXXX)"
trap 'rm -rf "$T"' EXIT
mkdir -p "$T/boot/ems" "$T/etc"
token="emsd_$(head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')"
printf 'device_id = "pi-1"\r\nhub_url = "wss://hub.example.org"\r\n' >"$T/boot/ems/edge.toml"
printf '%s\r\n' "$token" >"$T/boot/ems/device-token"
printf 'EMS_LOG_LEVEL=debug\r\nEMS_DEVICE_TOKEN=old\r\n' >"$T/boot/ems/edge.env"
run_fb() {
    EMS_FIRSTBOOT_SRC="$T/boot/ems" EMS_FIRSTBOOT_DST="$T/etc/ems-edge" \
        EMS_FIRSTBOOT_USER=nobody EMS_FIRSTBOOT_GROUP=nogroup sh "$FB"
}
out="$(run_fb 2>&1)"
printf '%s\n' "$out" | sed 's/^/    /' >&2
grep -qF -- "$token" <<<"$out" && die "first-boot printed the token"
[[ -z "$(ls -A "$T/boot/ems")" ]] || die "sources not deleted: $(ls -A "$T/boot/ems")"
[[ "$(stat -c '%a %U:%G' "$T/etc/ems-edge/edge.toml")" == "600 nobody:nogroup" ]] || die "edge.toml mode/owner"
[[ "$(stat -c '%a %U' "$T/etc/ems-edge/edge.env")" == "600 root" ]] || die "edge.env mode/owner"
[[ "$(stat -c '%a %U' "$T/etc/ems-edge/device-token")" == "600 root" ]] || die "device-token mode/owner"
grep -q $'\r' "$T/etc/ems-edge/edge.toml" "$T/etc/ems-edge/edge.env" && die "CR left in a file"
[[ "$(grep -c '^EMS_DEVICE_TOKEN=' "$T/etc/ems-edge/edge.env")" == 1 ]] || die "edge.env must hold one token line"
grep -qx "EMS_DEVICE_TOKEN=$token" "$T/etc/ems-edge/edge.env" || die "token not in edge.env"
grep -qx "EMS_LOG_LEVEL=debug" "$T/etc/ems-edge/edge.env" || die "edge.env settings lost"
[[ "$(cat "$T/etc/ems-edge/device-token")" == "$token" ]] || die "device-token content"
# Nothing to do: exits 0 quietly. Malformed token: ignored, left in place.
run_fb >/dev/null
printf 'not a token!\n' >"$T/boot/ems/device-token"
run_fb >/dev/null
[[ -f "$T/boot/ems/device-token" ]] || die "malformed token should stay for the operator"
grep -qx "EMS_DEVICE_TOKEN=$token" "$T/etc/ems-edge/edge.env" || die "malformed token replaced the good one"

log "stage scripts against a scratch rootfs (on_chroot recorded, not run)"
R="$T/rootfs"
mkdir -p "$R/tmp" "$R/boot/firmware" "$R/etc" "$T/debs"
printf 'dtparam=audio=on\n' >"$R/boot/firmware/config.txt"
printf 'console=serial0,115200 console=tty1 root=PARTUUID=x rootwait\n' >"$R/boot/firmware/cmdline.txt"
: >"$R/etc/modules"
: >"$T/debs/ems-edge_0.1.0-1_arm64.deb"
: >"$T/debs/ems-edge_0.1.0-1_armhf.deb"
export EMS_TEST_CHROOT_LOG="$T/chroot.log"
on_chroot() { cat >>"$EMS_TEST_CHROOT_LOG"; }
export -f on_chroot
export ROOTFS_DIR="$R" ARCH=arm64 EMS_DEB_DIR="$T/debs" EMS_SERIAL_METER=1
(cd "$STAGE/00-install-ems-edge" && bash -e ./00-run.sh) >"$T/stage.log" 2>&1 || { cat "$T/stage.log" >&2; die "00-run.sh failed"; }
(cd "$STAGE/01-hardware" && bash -e ./00-run.sh && bash -e ./00-run.sh) >>"$T/stage.log" 2>&1 || { cat "$T/stage.log" >&2; die "01-hardware failed"; }
grep -q 'ems-edge_0.1.0-1_arm64.deb' "$T/stage.log" || die "stage did not pick the arm64 package"
[[ -f "$R/tmp/ems-edge.deb" ]] || die "package not copied into the rootfs"
[[ -x "$R/usr/lib/ems-edge/ems-edge-firstboot" ]] || die "first-boot script not installed"
[[ -f "$R/etc/systemd/system/ems-edge-firstboot.service" ]] || die "first-boot unit not installed"
[[ -f "$R/boot/firmware/ems/README.txt" ]] || die "boot partition README missing"
grep -q 'apt-get install -y --no-install-recommends /tmp/ems-edge.deb' "$T/chroot.log" || die "no apt-get install in chroot"
grep -q 'systemctl enable ems-edge-firstboot.service' "$T/chroot.log" || die "first-boot unit not enabled"
[[ "$(grep -c '^dtparam=i2c_arm=on$' "$R/boot/firmware/config.txt")" == 1 ]] || die "i2c not enabled exactly once"
grep -qx 'dtparam=spi=on' "$R/boot/firmware/config.txt" || die "spi not enabled"
grep -qx 'enable_uart=1' "$R/boot/firmware/config.txt" || die "uart not enabled"
grep -qx 'i2c-dev' "$R/etc/modules" || die "i2c-dev not loaded"
grep -q 'console=serial0' "$R/boot/firmware/cmdline.txt" && die "serial console still on"
ARCH=armhf EMS_DEB_DIR="$T/nodebs" bash -c 'cd "$1" && bash -e ./00-run.sh' _ "$STAGE/00-install-ems-edge" >/dev/null 2>&1 &&
    die "stage must fail without a package for the architecture"
log "pi-gen-check: OK"
