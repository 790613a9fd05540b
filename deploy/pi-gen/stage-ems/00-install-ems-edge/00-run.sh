#!/bin/bash -e
# Install the ems-edge Debian package (built by .ci/packages.sh or
# `cargo deb -p ems-edge --target …`) and the first-boot provisioning unit.
#
# The package for the image's architecture must be in files/ (pi-gen's ARCH:
# armhf on the master branch, arm64 on the arm64 branch), or in the directory
# named by EMS_DEB_DIR in pi-gen's config.
STEP_DIR="$(dirname "$0")"
DEB_DIR="${EMS_DEB_DIR:-${STEP_DIR}/files}"
# shellcheck disable=SC2012 # plain file names from cargo-deb
DEB="$(ls -1 "${DEB_DIR}"/ems-edge_*_"${ARCH}".deb 2>/dev/null | sort -V | tail -n 1)"
if [ -z "${DEB}" ]; then
	echo "stage-ems: no ems-edge_*_${ARCH}.deb in ${DEB_DIR}" >&2
	exit 1
fi
echo "stage-ems: installing $(basename "${DEB}")"
install -m 644 "${DEB}" "${ROOTFS_DIR}/tmp/ems-edge.deb"

# apt resolves the package's dependencies (libc6, adduser) from the image's
# repositories; the postinst creates the ems-edge user and enables the unit
# (nothing starts inside the chroot).
on_chroot <<'CHROOT'
apt-get install -y --no-install-recommends /tmp/ems-edge.deb
rm -f /tmp/ems-edge.deb
CHROOT

# First boot: take edge.toml / device-token / edge.env from the boot partition.
install -D -m 755 "${STEP_DIR}/files/ems-edge-firstboot" \
	"${ROOTFS_DIR}/usr/lib/ems-edge/ems-edge-firstboot"
install -D -m 644 "${STEP_DIR}/files/ems-edge-firstboot.service" \
	"${ROOTFS_DIR}/etc/systemd/system/ems-edge-firstboot.service"
install -d -m 755 "${ROOTFS_DIR}/boot/firmware/ems"
install -m 644 "${STEP_DIR}/files/README-ems.txt" "${ROOTFS_DIR}/boot/firmware/ems/README.txt"

on_chroot <<'CHROOT'
systemctl enable ems-edge-firstboot.service
systemctl enable ems-edge.service
# The edge holds readings until the clock is synchronized; make sure the
# Pi's NTP client runs.
systemctl enable systemd-timesyncd.service || true
CHROOT
