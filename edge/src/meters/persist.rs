//! Small per-meter state files in the edge's state directory.
//!
//! Some meters keep a counter that must survive a restart: the pulse count of
//! an S0 meter, the energy integrated for an INA219/INA226, the energy drained
//! from the ATM90E32's read-to-clear energy registers. Each such counter lives
//! in one small text file `<state_dir>/<meter id>.<name>` (named by
//! [`StateDir::meter_file`]).
//!
//! SD cards wear out and tear writes on power loss, so:
//! - a write is atomic: the new content goes to `<file>.tmp`, is fsynced, and
//!   is renamed over the old file (readers see the old or the new value,
//!   never half of one); the directory is fsynced best-effort;
//! - writes are rate-limited to one per `min_interval` (15 minutes by
//!   default), plus one when a meter starts failing (the last value before
//!   the failure) and one final write when the meter is dropped (SIGTERM).
//!
//! A state file alone can therefore be well behind the readings already
//! sent. What keeps a counter from ever going backwards is the
//! [`EnergyFloor`]: at start every meter continues from the largest of its
//! state file, its saved [energy ceiling](crate::ceiling) (at least every
//! value that left the edge; the exact last value after an orderly stop)
//! and the newest `energy_wh` in the spool
//! ([`Meter::resume_energy`](super::Meter::resume_energy)). So the state
//! file is the exact value at a stop, and a backup in case the ceiling
//! files are lost; writing it more often would only wear the card. No
//! write per reading is needed.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::state_dir::{tmp_path, StateDir};

/// Default bound on how often a state file is rewritten.
pub const DEFAULT_MIN_INTERVAL: Duration = Duration::from_secs(15 * 60);

/// One persisted text value with atomic, rate-limited writes.
#[derive(Debug)]
pub struct StateFile {
    /// Final path, `<state_dir>/<meter>.<name>`.
    path: PathBuf,
    /// Minimum time between two writes (bounds SD-card wear).
    min_interval: Duration,
    /// When the file was last written by this process.
    last_write: Option<Instant>,
    /// The last content written, so unchanged values are not rewritten.
    last_content: Option<String>,
    /// A newer content held back by the rate limit.
    pending: Option<String>,
}

impl StateFile {
    /// A state file for `meter` named `name` in `state_dir`.
    pub fn new(state_dir: &Path, meter: &str, name: &str) -> Self {
        StateFile {
            path: StateDir::new(state_dir).meter_file(meter, name),
            min_interval: DEFAULT_MIN_INTERVAL,
            last_write: None,
            last_content: None,
            pending: None,
        }
    }

    /// Changes the write-rate bound.
    pub fn with_min_interval(mut self, d: Duration) -> Self {
        self.min_interval = d;
        self
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads and parses the stored value; `Ok(None)` when the file does not
    /// exist yet. A file that does not parse is an error (never silently 0).
    pub fn load<T: FromStr>(&mut self) -> io::Result<Option<T>> {
        match fs::read_to_string(&self.path) {
            Ok(s) => {
                let v = s.trim().parse::<T>().map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: cannot parse {:?}", self.path.display(), s.trim()),
                    )
                })?;
                self.last_content = Some(s.trim().to_string());
                Ok(Some(v))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stores `content` if at least `min_interval` passed since the last
    /// write (or there was none). Returns whether it wrote.
    pub fn store(&mut self, content: &str, now: Instant) -> io::Result<bool> {
        if let Some(t) = self.last_write {
            if now.saturating_duration_since(t) < self.min_interval {
                self.pending = Some(content.to_string());
                return Ok(false);
            }
        }
        self.write_now(content, now)?;
        Ok(true)
    }

    /// Writes the content the rate limit held back, if any (when a meter
    /// starts failing, so its last value is on disk).
    pub fn flush_pending(&mut self) -> io::Result<()> {
        match self.pending.take() {
            Some(content) => self.write_now(&content, Instant::now()),
            None => Ok(()),
        }
    }

    /// Stores `content` now, regardless of the rate limit (used on drop).
    pub fn flush(&mut self, content: &str) -> io::Result<()> {
        self.write_now(content, Instant::now())
    }

    fn write_now(&mut self, content: &str, now: Instant) -> io::Result<()> {
        self.pending = None;
        if self.last_content.as_deref() == Some(content) {
            self.last_write = Some(now);
            return Ok(());
        }
        write_atomic(&self.path, content)?;
        self.last_write = Some(now);
        self.last_content = Some(content.to_string());
        Ok(())
    }
}

/// The highest energy value per reading meter id (`main`, `mains-a`, …)
/// among the saved ceilings and the spool's newest readings: where energy
/// counters continue after a restart (see the module docs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EnergyFloor(HashMap<String, f64>);

impl EnergyFloor {
    /// Takes `energy_wh` of meter `meter` into account.
    pub fn raise(&mut self, meter: &str, energy_wh: f64) {
        if !(energy_wh.is_finite() && energy_wh >= 0.0) {
            return;
        }
        let e = self.0.entry(meter.to_string()).or_insert(energy_wh);
        *e = e.max(energy_wh);
    }

    /// The floor of meter `meter`, if the spool had a reading of it.
    pub fn get(&self, meter: &str) -> Option<f64> {
        self.0.get(meter).copied()
    }

    /// Meters with a floor.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No meter has a floor.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Logs that a counter continues from its floor rather than from its
/// state file (which was behind: the edge stopped without its final
/// write, e.g. a crash).
pub fn log_resumed(meter: &str, from_state: f64, floor: f64) {
    log::info!(
        "meter {meter}: energy counter continues from {floor} Wh, its saved ceiling or the last value in the spool (its state file had {from_state} Wh)"
    );
}

/// Writes `content` to `path` atomically (tmp file + fsync + rename).
pub fn write_atomic(path: &Path, content: &str) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = tmp_path(path);
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(content.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    // Best effort: make the rename itself durable.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rate_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = StateFile::new(dir.path(), "s0", "pulses");
        assert_eq!(f.load::<u64>().unwrap(), None);
        let t0 = Instant::now();
        assert!(f.store("41", t0).unwrap());
        // Within the interval: not written.
        assert!(!f.store("42", t0 + Duration::from_secs(1)).unwrap());
        let mut g = StateFile::new(dir.path(), "s0", "pulses");
        assert_eq!(g.load::<u64>().unwrap(), Some(41));
        assert!(f
            .store("43", t0 + DEFAULT_MIN_INTERVAL + Duration::from_secs(1))
            .unwrap());
        assert_eq!(g.load::<u64>().unwrap(), Some(43));
        f.flush("44").unwrap();
        assert_eq!(g.load::<u64>().unwrap(), Some(44));
        assert!(!dir.path().join("s0.pulses.tmp").exists());
    }

    #[test]
    fn a_value_held_back_by_the_rate_limit_is_written_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = StateFile::new(dir.path(), "m", "energy_wh");
        let t0 = Instant::now();
        assert!(f.store("1", t0).unwrap());
        assert!(!f.store("2", t0 + Duration::from_secs(1)).unwrap());
        f.flush_pending().unwrap();
        let mut g = StateFile::new(dir.path(), "m", "energy_wh");
        assert_eq!(g.load::<u64>().unwrap(), Some(2));
    }

    #[test]
    fn the_floor_keeps_the_highest_value_per_meter() {
        let mut floor = EnergyFloor::default();
        floor.raise("a", 5.0);
        floor.raise("a", 3.0);
        floor.raise("b", 1.0);
        floor.raise("b", f64::NAN);
        assert_eq!(floor.get("a"), Some(5.0));
        assert_eq!(floor.get("b"), Some(1.0));
        assert_eq!(floor.get("c"), None);
        assert_eq!(floor.len(), 2);
    }

    #[test]
    fn garbage_is_an_error_not_zero() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("m.pulses"), "not a number").unwrap();
        let mut f = StateFile::new(dir.path(), "m", "pulses");
        assert!(f.load::<u64>().is_err());
    }
}
