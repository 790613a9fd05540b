#!/bin/bash -e
# Meter interfaces: I2C and SPI on, i2c-dev loaded (defaults: EMS_ENABLE_I2C=1,
# EMS_ENABLE_SPI=1). EMS_SERIAL_METER=1 frees the UART for RS-485/Modbus:
# enable_uart=1 and no serial console (set these in pi-gen's config).
CONFIG_TXT="${ROOTFS_DIR}/boot/firmware/config.txt"
CMDLINE_TXT="${ROOTFS_DIR}/boot/firmware/cmdline.txt"
[ -f "${CONFIG_TXT}" ] || CONFIG_TXT="${ROOTFS_DIR}/boot/config.txt"
[ -f "${CMDLINE_TXT}" ] || CMDLINE_TXT="${ROOTFS_DIR}/boot/cmdline.txt"

add_line() { grep -qxF "$2" "$1" || printf '%s\n' "$2" >>"$1"; }

if [ "${EMS_ENABLE_I2C:-1}" = "1" ]; then
	add_line "${CONFIG_TXT}" "dtparam=i2c_arm=on"
	add_line "${ROOTFS_DIR}/etc/modules" "i2c-dev"
fi
if [ "${EMS_ENABLE_SPI:-1}" = "1" ]; then
	add_line "${CONFIG_TXT}" "dtparam=spi=on"
fi
if [ "${EMS_SERIAL_METER:-0}" = "1" ]; then
	add_line "${CONFIG_TXT}" "enable_uart=1"
	sed -i -e 's/console=serial0,[0-9]\+ //' -e 's/console=ttyAMA0,[0-9]\+ //' "${CMDLINE_TXT}"
	on_chroot <<'CHROOT'
systemctl disable serial-getty@ttyS0.service serial-getty@ttyAMA0.service 2>/dev/null || true
CHROOT
fi
