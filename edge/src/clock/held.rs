//! Readings held for clock sync, kept across a restart in the same boot.
//!
//! A SIGTERM from `systemctl restart` or an upgrade must not lose them: at
//! an orderly stop they are saved to the state directory's held-readings
//! file ([`save_held`]) with the kernel's boot id and their sample time on
//! `CLOCK_BOOTTIME` (monotonic, shared by every process of a boot, counting
//! suspend). The next start in the same boot ([`load_held`]) turns them back
//! into held readings of known age; a file from another boot is discarded
//! (and counted in a warning), because after a reboot their time cannot be
//! reconstructed. A SIGKILL or power cut before the first sync still loses
//! them.
//!
//! [`restore`] and [`stash`] are what the supervisor calls at start and at
//! stop.

use std::io;
use std::time::{Duration, Instant};

use super::gate::ClockGate;
use crate::meters::Measurement;
use crate::state_dir::StateDir;

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
        let json = m.clone().into_reading(0, 0, 0).to_json();
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
                Some((at, Measurement::from_reading(r)))
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

/// At start: takes back the readings a previous process of this boot held
/// for clock sync (see the module docs).
pub fn restore(dir: &StateDir, gate: &mut ClockGate) {
    let file = dir.held_file();
    if !file.exists() {
        return;
    }
    let Some(now) = BootClock::now() else {
        log::warn!(
            "{}: cannot read the boot id or CLOCK_BOOTTIME; the readings held for clock sync by the previous run are not restored",
            file.display()
        );
        return;
    };
    match load_held(dir, &now) {
        Ok(loaded) => {
            if loaded.discarded > 0 {
                log::warn!(
                    "discarded {} readings held for clock sync by a previous run: saved in another boot (or unreadable), their time cannot be reconstructed",
                    loaded.discarded
                );
            }
            if !loaded.restored.is_empty() {
                log::info!(
                    "restored {} readings held for clock sync by the previous run (same boot); they are stamped once the clock is synchronized",
                    loaded.restored.len()
                );
                gate.restore(loaded.restored);
            }
        }
        Err(e) => log::warn!("{}: cannot restore held readings: {e}", file.display()),
    }
}

/// At an orderly stop: saves the readings still held for clock sync for a
/// restart in this boot. Returns the words for the final log and status line.
pub fn stash(dir: &StateDir, gate: &ClockGate) -> String {
    let (held, dropped) = (gate.held(), gate.dropped());
    let dropped_note = if dropped > 0 {
        format!(", {dropped} dropped earlier (hold full)")
    } else {
        String::new()
    };
    if held == 0 {
        return if dropped > 0 {
            format!("; readings held for clock sync: {dropped} dropped (hold full)")
        } else {
            String::new()
        };
    }
    let saved = BootClock::now()
        .ok_or_else(|| io::Error::other("boot id or CLOCK_BOOTTIME unavailable"))
        .and_then(|now| save_held(dir, &now, gate.held_readings()));
    match saved {
        Ok(n) => {
            log::warn!(
                "stopping before the system clock was synchronized: saved {n} readings held for clock sync to {} (restored if ems-edge starts again in this boot; lost on a reboot)",
                dir.held_file().display()
            );
            format!("; {n} readings held for clock sync saved{dropped_note}")
        }
        Err(e) => {
            log::warn!(
                "stopping before the system clock was synchronized: discarding {held} readings held for clock sync (cannot save them: {e}){dropped_note}"
            );
            format!("; {held} readings held for clock sync discarded{dropped_note}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn m(p: f64) -> Measurement {
        Measurement {
            meter: "main".into(),
            power_w: Some(p),
            ..Default::default()
        }
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
        assert_eq!(save_held(&dir, &saved_at, g.held_readings()).unwrap(), 2);
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
    fn boot_clock_is_available_on_linux() {
        let now = BootClock::now().expect("boot id and CLOCK_BOOTTIME");
        assert!(!now.boot_id.is_empty());
        assert!(now.boottime > Duration::ZERO);
    }
}
