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
//! oldest held readings are dropped and counted (in `STATUS=` and at exit).
//!
//! Held readings survive a restart within the same boot (a SIGTERM from
//! `systemctl restart`, an upgrade): at an orderly stop they are saved to
//! `spool_dir/held` ([`save_held`]) with the kernel's boot id and their
//! sample time on `CLOCK_BOOTTIME` (monotonic, shared by every process of a
//! boot, counting suspend). The next start in the same boot
//! ([`load_held`]) turns them back into held readings of known age; a file
//! from another boot is discarded (and counted in a warning), because after
//! a reboot their time cannot be reconstructed. A SIGKILL or power cut
//! before the first sync still loses them.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::meters::Measurement;
use crate::state_dir::StateDir;

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

    /// The held readings with their sample instants, oldest first.
    pub fn held_readings(&self) -> impl Iterator<Item = &(Instant, Measurement)> {
        self.held.iter()
    }

    /// Puts readings held by a previous process (oldest first) before the
    /// ones held now, within the bound (the oldest are dropped and counted).
    pub fn restore(&mut self, readings: Vec<(Instant, Measurement)>) {
        for r in readings.into_iter().rev() {
            if self.held.len() >= self.max_held {
                self.dropped += 1;
                continue;
            }
            self.held.push_front(r);
        }
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

/// First word of the held-readings file.
const HELD_MAGIC: &str = "ems-edge-held-v1";

/// The kernel's id of this boot, if known.
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// `CLOCK_BOOTTIME` now: time since boot, counting suspend.
pub fn boottime() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

/// A (monotonic, boot-time) pair read together, with the boot's id.
#[derive(Debug, Clone)]
pub struct BootClock {
    /// The kernel's boot id.
    pub boot_id: String,
    /// `Instant::now()`.
    pub mono: Instant,
    /// [`boottime`] at the same moment.
    pub boottime: Duration,
}

impl BootClock {
    /// Now, or `None` where the boot id or `CLOCK_BOOTTIME` is unavailable.
    pub fn now() -> Option<BootClock> {
        Some(BootClock {
            boot_id: boot_id()?,
            mono: Instant::now(),
            boottime: boottime()?,
        })
    }
}

/// Saves `held` (oldest first) to the directory's held-readings file,
/// durably.
pub fn save_held<'a>(
    dir: &StateDir,
    now: &BootClock,
    held: impl Iterator<Item = &'a (Instant, Measurement)>,
) -> io::Result<usize> {
    let mut text = format!("{HELD_MAGIC} {}\n", now.boot_id);
    let mut n = 0;
    for (at, m) in held {
        let age = now.mono.saturating_duration_since(*at);
        let sampled = now.boottime.saturating_sub(age).as_nanos();
        let json = crate::sampler::to_reading(0, 0, 0, m.clone()).to_json();
        text.push_str(&format!("{sampled} {json}\n"));
        n += 1;
    }
    crate::state_dir::write_durably(&dir.held_file(), text.as_bytes())?;
    Ok(n)
}

/// What [`load_held`] found.
#[derive(Debug, Default)]
pub struct LoadedHeld {
    /// Readings of this boot, oldest first, with their sample instants.
    pub restored: Vec<(Instant, Measurement)>,
    /// Readings that could not be restored (another boot, unreadable).
    pub discarded: usize,
}

/// Loads and removes the directory's held-readings file (absent: nothing).
/// Readings saved in another boot are discarded and counted.
pub fn load_held(dir: &StateDir, now: &BootClock) -> io::Result<LoadedHeld> {
    let path = dir.held_file();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(LoadedHeld::default()),
        Err(e) => return Err(e),
    };
    let mut out = LoadedHeld::default();
    let mut lines = text.lines();
    let same_boot = lines
        .next()
        .and_then(|h| h.strip_prefix(HELD_MAGIC))
        .is_some_and(|id| id.trim() == now.boot_id);
    for line in lines {
        let restored = same_boot
            .then(|| {
                let (ns, json) = line.split_once(' ')?;
                let sampled = Duration::from_nanos(ns.parse().ok()?);
                let r: ems_shared::Reading = serde_json::from_str(json).ok()?;
                let age = now.boottime.checked_sub(sampled)?;
                let at = now.mono.checked_sub(age)?;
                Some((at, measurement_of(r)))
            })
            .flatten();
        match restored {
            Some(r) => out.restored.push(r),
            None => out.discarded += 1,
        }
    }
    std::fs::remove_file(&path)?;
    dir.sync()?;
    Ok(out)
}

fn measurement_of(r: ems_shared::Reading) -> Measurement {
    Measurement {
        meter: r.meter,
        voltage_v: r.voltage_v,
        current_a: r.current_a,
        power_w: r.power_w,
        energy_wh: r.energy_wh,
        frequency_hz: r.frequency_hz,
        power_factor: r.power_factor,
        reactive_power_var: r.reactive_power_var,
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
    fn held_readings_survive_a_restart_in_the_same_boot_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        let t0 = Instant::now();
        let mut g = ClockGate::new(100);
        let wrong = UNIX_EPOCH + Duration::from_secs(1_000);
        g.offer(t0, vec![m(1.0)], false, (t0, wrong));
        let t1 = t0 + Duration::from_secs(1);
        g.offer(t1, vec![m(2.0)], false, (t1, wrong));
        let saved_at = BootClock {
            boot_id: "boot-a".into(),
            mono: t1 + Duration::from_secs(1),
            boottime: Duration::from_secs(100),
        };
        assert_eq!(
            save_held(&dir, &saved_at, g.held_readings()).unwrap(),
            2
        );
        assert_eq!(load_held(&dir, &saved_at).unwrap().restored.len(), 2);
        // Consumed: a second load finds nothing.
        let again = load_held(&dir, &saved_at).unwrap();
        assert_eq!((again.restored.len(), again.discarded), (0, 0));

        // Saved, then restored 10 s later by a new process (its own instants).
        save_held(&dir, &saved_at, g.held_readings()).unwrap();
        let later = BootClock {
            boot_id: "boot-a".into(),
            mono: Instant::now() + Duration::from_secs(3600),
            boottime: Duration::from_secs(110),
        };
        let loaded = load_held(&dir, &later).unwrap();
        assert_eq!(loaded.discarded, 0);
        assert_eq!(loaded.restored.len(), 2);
        let mut g2 = ClockGate::new(100);
        g2.restore(loaded.restored);
        // Synced at `later`: the readings were sampled 12 s and 11 s before.
        let right = UNIX_EPOCH + Duration::from_secs(1_764_000_000);
        let out = g2.offer(later.mono, vec![m(3.0)], true, (later.mono, right));
        let r = 1_764_000_000_000i64;
        let ts: Vec<i64> = out.iter().map(|s| s.ts_ms).collect();
        assert_eq!(ts, [r - 12_000, r - 11_000, r]);
        assert_eq!(out[0].measurement, m(1.0));

        // Another boot: discarded and counted.
        save_held(&dir, &saved_at, g.held_readings()).unwrap();
        let rebooted = BootClock {
            boot_id: "boot-b".into(),
            ..later
        };
        let loaded = load_held(&dir, &rebooted).unwrap();
        assert_eq!((loaded.restored.len(), loaded.discarded), (0, 2));
        assert!(!tmp.path().join("held").exists());
    }

    #[test]
    fn restore_respects_the_bound() {
        let t = Instant::now();
        let mut g = ClockGate::new(3);
        g.offer(t, vec![m(10.0), m(11.0)], false, (t, SystemTime::now()));
        g.restore(vec![(t, m(1.0)), (t, m(2.0)), (t, m(3.0))]);
        assert_eq!((g.held(), g.dropped()), (3, 2));
        let out = g.offer(t, vec![], true, (t, SystemTime::now()));
        let p: Vec<_> = out.iter().map(|s| s.measurement.power_w.unwrap()).collect();
        assert_eq!(p, [3.0, 10.0, 11.0]);
    }

    #[test]
    fn boot_clock_is_available_on_linux() {
        let now = BootClock::now().expect("boot id and CLOCK_BOOTTIME");
        assert!(!now.boot_id.is_empty());
        assert!(now.boottime > Duration::ZERO);
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
