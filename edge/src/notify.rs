//! systemd notifications (`Type=notify`): READY, WATCHDOG, STATUS, STOPPING.
//!
//! Thin wrappers over the sd-notify crate. Outside systemd (no
//! `NOTIFY_SOCKET`) every call is a no-op; failures are logged at debug
//! level only, since notification is never worth stopping for.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        log::debug!("sd_notify failed: {e}");
    }
}

/// Config loaded, meters opened: the service is up.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The status line shown by `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// The main loops made progress.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// Shutting down.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// The watchdog interval systemd expects (`WatchdogSec=`, passed to the
/// service as `WATCHDOG_USEC`), if enabled.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(Duration::from_micros(usec))
    } else {
        None
    }
}
