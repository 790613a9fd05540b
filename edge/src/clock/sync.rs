//! Whether the wall clock can be trusted.
//!
//! "Synchronized" ([`SystemSync`]) means: `trust_clock = true` in the config
//! (a system with an RTC), or systemd-timesyncd's flag file
//! `/run/systemd/timesync/synchronized` exists, or the kernel's NTP status
//! (`adjtimex`) has `STA_UNSYNC` cleared (chrony, ntpd, timesyncd). With
//! `clock_sync_file` set, only that file's existence counts. The
//! [`ClockGate`](super::ClockGate) latches the first "synchronized": the edge
//! stays so for the rest of the process.

use std::path::PathBuf;

/// systemd-timesyncd's "clock is synchronized" flag file.
pub const TIMESYNC_FLAG: &str = "/run/systemd/timesync/synchronized";

/// Tells whether the wall clock is right.
pub trait SyncProbe: Send {
    /// Is the system clock synchronized now?
    fn is_synchronized(&mut self) -> bool;
}

/// The real probe (see the module docs).
#[derive(Debug, Clone)]
pub struct SystemSync {
    /// `trust_clock` from the config.
    trust: bool,
    /// The flag file.
    flag_file: PathBuf,
    /// Only the flag file counts (no kernel NTP status).
    only_file: bool,
}

impl SystemSync {
    /// A probe; `trust` short-circuits to "synchronized"; `only_file`
    /// replaces the default checks by that file's existence.
    pub fn new(trust: bool, only_file: Option<PathBuf>) -> Self {
        SystemSync {
            trust,
            only_file: only_file.is_some(),
            flag_file: only_file.unwrap_or_else(|| PathBuf::from(TIMESYNC_FLAG)),
        }
    }
}

impl SyncProbe for SystemSync {
    fn is_synchronized(&mut self) -> bool {
        self.trust || self.flag_file.exists() || (!self.only_file && kernel_ntp_synchronized())
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn kernel_ntp_synchronized() -> bool {
    // SAFETY: adjtimex with modes = 0 only reads the kernel's NTP state into
    // the zero-initialised struct we own.
    let (rc, status) = unsafe {
        let mut tx: libc::timex = std::mem::zeroed();
        let rc = libc::adjtimex(&mut tx);
        (rc, tx.status)
    };
    rc >= 0 && rc != libc::TIME_ERROR && status & libc::STA_UNSYNC == 0
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn kernel_ntp_synchronized() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_clock_is_synchronized() {
        assert!(SystemSync::new(true, None).is_synchronized());
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("synced");
        let mut probe = SystemSync::new(false, Some(flag.clone()));
        assert!(!probe.is_synchronized());
        std::fs::write(&flag, "").unwrap();
        assert!(probe.is_synchronized());
    }
}
