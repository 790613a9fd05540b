//! Errors opening a device node, explained: what is missing, which group
//! the service user needs, which `config.txt` line enables the bus.

use std::io;

use crate::meters::MeterError;

/// Whether this machine identifies itself as a Raspberry Pi (device tree
/// model string).
pub fn is_raspberry_pi() -> bool {
    std::fs::read_to_string("/proc/device-tree/model")
        .map(|m| m.contains("Raspberry Pi"))
        .unwrap_or(false)
}

/// Hint for an `io::Error` while opening `node`.
///
/// `pi_only`: the node only exists on a Pi (I2C/SPI), so on another host the
/// hint says so; a USB serial adapter works on any Linux host.
pub fn open_error(
    meter: &str,
    node: &str,
    e: &io::Error,
    group: &str,
    enable: &str,
    pi_only: bool,
) -> MeterError {
    let msg = format!("cannot open {node}: {e}");
    match e.kind() {
        io::ErrorKind::NotFound => {
            let host = if !pi_only || is_raspberry_pi() {
                String::new()
            } else {
                " (this host is not a Raspberry Pi: real meters need the Pi's buses; \
                 use kind = \"simulated\" here)"
                    .to_string()
            };
            MeterError::new(meter, msg).with_hint(format!("{node} missing: {enable}{host}"))
        }
        io::ErrorKind::PermissionDenied => MeterError::new(meter, msg).with_hint(format!(
            "permission denied: add the service user to the {group} group \
             (`sudo usermod -aG {group} <user>`, then log in again / restart the service)"
        )),
        _ => MeterError::new(meter, msg),
    }
}
