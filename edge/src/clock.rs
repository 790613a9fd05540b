//! Time: knowing when the wall clock can be trusted, and stamping readings.
//!
//! A Raspberry Pi has no real-time clock: until NTP has synchronized it, the
//! wall clock may be hours off (fake-hwclock restores the last shutdown time).
//! The edge never sends a time it knows is wrong. Until the clock is
//! synchronized, readings are *held* in memory with their monotonic sample
//! instant ([`ClockGate`]); once it is, each held reading is stamped
//! `wall_now − (mono_now − mono_sampled)` and released in sample order. The
//! monotonic clock is unaffected by the NTP step, so the stamps are right.
//!
//! "Synchronized" ([`SystemSync`]) means: `trust_clock = true` in the config
//! (a system with an RTC), or systemd-timesyncd's flag file
//! `/run/systemd/timesync/synchronized` exists, or the kernel's NTP status
//! (`adjtimex`) has `STA_UNSYNC` cleared (chrony, ntpd, timesyncd). With
//! `clock_sync_file` set, only that file's existence counts. Once seen
//! synchronized, the edge stays so for the rest of the process.
//!
//! Holding is bounded (`max_held`, a day at 1 Hz by default); beyond it the
//! oldest held readings are dropped and counted.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::meters::Measurement;

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

/// Unix milliseconds of a wall-clock time.
pub fn unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// A measurement stamped with its sample time.
#[derive(Debug, Clone, PartialEq)]
pub struct Stamped {
    /// Sample time, Unix ms.
    pub ts_ms: i64,
    /// The values.
    pub measurement: Measurement,
}

/// Holds readings until the clock is known (pure; see the module docs).
#[derive(Debug)]
pub struct ClockGate {
    /// The clock has been seen synchronized (latched).
    synced: bool,
    /// Readings sampled before that, oldest first, with their sample instant.
    held: VecDeque<(Instant, Measurement)>,
    /// Bound of `held`.
    max_held: usize,
    /// Held readings dropped because of the bound.
    dropped: u64,
}

impl ClockGate {
    /// A gate holding at most `max_held` readings.
    pub fn new(max_held: usize) -> Self {
        ClockGate {
            synced: false,
            held: VecDeque::new(),
            max_held: max_held.max(1),
            dropped: 0,
        }
    }

    /// Has the clock been synchronized?
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Readings waiting for the clock.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Held readings dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Offers measurements sampled at `sampled_at`. `synced` is the probe's
    /// answer now; `now` is a (monotonic, wall) pair read together. Returns
    /// the readings that can be stamped, oldest first.
    pub fn offer(
        &mut self,
        sampled_at: Instant,
        measurements: Vec<Measurement>,
        synced: bool,
        now: (Instant, SystemTime),
    ) -> Vec<Stamped> {
        if synced {
            self.synced = true;
        }
        for m in measurements {
            if self.held.len() >= self.max_held {
                self.held.pop_front();
                self.dropped += 1;
            }
            self.held.push_back((sampled_at, m));
        }
        if !self.synced {
            return Vec::new();
        }
        let (mono_now, wall_now) = now;
        let wall_ms = unix_ms(wall_now);
        self.held
            .drain(..)
            .map(|(at, measurement)| {
                let age = mono_now.saturating_duration_since(at);
                Stamped {
                    ts_ms: wall_ms - i64::try_from(age.as_millis()).unwrap_or(0),
                    measurement,
                }
            })
            .collect()
    }
}

/// The epoch of this process: Unix seconds (32 bits) over 21 random bits,
/// so it fits 2^53−1, sorts by start time, and two starts in the same
/// second collide with probability 2^−21. It is also made larger than
/// `previous` (the last epoch this spool used) when one is known.
pub fn draw_epoch(now: SystemTime, random: u64, previous: Option<u64>) -> u64 {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
        & 0xFFFF_FFFF;
    let mut epoch = (secs << 21) | (random & 0x1F_FFFF);
    if let Some(prev) = previous {
        if epoch <= prev && prev < ems_shared::MAX_SAFE_INTEGER {
            epoch = prev + 1 + (random & 0xFFF);
        }
    }
    epoch.min(ems_shared::MAX_SAFE_INTEGER)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: f64) -> Measurement {
        Measurement {
            meter: "main".into(),
            power_w: Some(p),
            ..Default::default()
        }
    }

    #[test]
    fn holds_until_synced_then_stamps_from_the_monotonic_clock() {
        let mut g = ClockGate::new(100);
        let t0 = Instant::now();
        let wrong_wall = UNIX_EPOCH + Duration::from_secs(1_000);
        assert!(g
            .offer(t0, vec![m(1.0)], false, (t0, wrong_wall))
            .is_empty());
        let t1 = t0 + Duration::from_secs(1);
        assert!(g
            .offer(t1, vec![m(2.0)], false, (t1, wrong_wall))
            .is_empty());
        assert_eq!(g.held(), 2);
        // Clock stepped to the truth at t2.
        let t2 = t0 + Duration::from_secs(2);
        let right = UNIX_EPOCH + Duration::from_secs(1_764_000_000);
        let out = g.offer(t2, vec![m(3.0)], true, (t2, right));
        let ts: Vec<i64> = out.iter().map(|s| s.ts_ms).collect();
        let r = 1_764_000_000_000i64;
        assert_eq!(ts, [r - 2000, r - 1000, r]);
        assert_eq!(out[0].measurement.power_w, Some(1.0));
        assert_eq!(g.held(), 0);
        // Latched: a later "unsynced" answer does not hold again.
        let t3 = t2 + Duration::from_secs(1);
        let out = g.offer(
            t3,
            vec![m(4.0)],
            false,
            (t3, right + Duration::from_secs(1)),
        );
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn hold_is_bounded() {
        let mut g = ClockGate::new(3);
        let t = Instant::now();
        for i in 0..5 {
            g.offer(t, vec![m(i as f64)], false, (t, SystemTime::now()));
        }
        assert_eq!((g.held(), g.dropped()), (3, 2));
        let out = g.offer(t, vec![], true, (t, SystemTime::now()));
        assert_eq!(out[0].measurement.power_w, Some(2.0));
    }

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

    #[test]
    fn epochs_fit_and_grow() {
        let now = UNIX_EPOCH + Duration::from_secs(1_764_000_000);
        let e = draw_epoch(now, u64::MAX, None);
        assert!(e <= ems_shared::MAX_SAFE_INTEGER);
        assert_eq!(e >> 21, 1_764_000_000);
        let later = draw_epoch(now + Duration::from_secs(1), 0, None);
        assert!(later > e);
        // A clock that went backwards still yields a larger epoch.
        let back = draw_epoch(UNIX_EPOCH, 5, Some(e));
        assert!(back > e);
        let far = UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX) + 5);
        assert!(draw_epoch(far, u64::MAX, None) <= ems_shared::MAX_SAFE_INTEGER);
    }

    #[test]
    fn unix_ms_before_epoch_is_negative() {
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_millis(5)), -5);
        assert_eq!(unix_ms(UNIX_EPOCH + Duration::from_millis(5)), 5);
    }
}
