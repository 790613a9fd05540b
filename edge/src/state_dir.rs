//! The state directory (`spool_dir`, `/var/lib/ems-edge` by default): the
//! one place that knows the name of every file in it.
//!
//! | name                          | owner                 | written                                   |
//! |-------------------------------|-----------------------|-------------------------------------------|
//! | `lock`                        | [`DirLock`]           | at start (pid of the holder)              |
//! | `device_id`                   | [`StateDir::claim`]   | at start, durably                         |
//! | `epoch`                       | `clock::epoch`        | at start, durably                         |
//! | `NNNNNNNNNNNNNNNNNNNN.seg`    | `spool`               | when due (`spool_sync_interval_ms`)       |
//! | `NNNNNNNNNNNNNNNNNNNN.seg.unreadable` | `spool`       | at open, a segment file it cannot read    |
//! | `acked`                       | `spool`               | when acks of records on disk change it (at every sync), before segments are deleted, at stop (in place, no fsync) |
//! | `energy-ceiling.0`, `.1`      | `ceiling::file`       | when a ceiling is raised (every ~30 s while energy flows), at stop (in place, fdatasync) |
//! | `held`                        | `clock::held`         | at an orderly stop before clock sync      |
//! | `<meter id>.<counter>`        | `meters::persist`     | at most every 15 minutes and at stop      |
//! | `orphaned-<old id>-<unix s>/` | [`StateDir::claim`]   | when `device_id` changed                  |
//!
//! Every file is replaced through `<name>.tmp` and a rename, so a reader
//! sees the old or the new content, never half of one — except the
//! segments (appended to), `acked` and the ceiling slots, which are
//! overwritten in place so that saving them needs no free space (and no
//! metadata write); they carry checksums instead, and the ceiling has two
//! slots written in turn.
//!
//! Other modules ask [`StateDir`] for paths instead of spelling names, so
//! the layout can be read (and changed) here alone.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The lock file (see [`DirLock`]).
const LOCK_FILE: &str = "lock";
/// The device whose readings the directory holds.
const DEVICE_FILE: &str = "device_id";
/// The last epoch used.
const EPOCH_FILE: &str = "epoch";
/// Readings held for clock sync at the last orderly stop.
const HELD_FILE: &str = "held";
/// The spool's ack watermark.
const WATERMARK_FILE: &str = "acked";
/// The energy ceiling's slot files, `<this>.0` and `<this>.1`.
const CEILING_FILE: &str = "energy-ceiling";
/// Suffix of spool segment files.
const SEGMENT_SUFFIX: &str = ".seg";
/// Added to the name of a segment file that cannot be read.
const UNREADABLE_SUFFIX: &str = ".unreadable";
/// Suffix of the temporary file a replacement is written to.
const TMP_SUFFIX: &str = ".tmp";

/// A state directory: typed paths to the files in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    /// The directory.
    path: PathBuf,
}

impl StateDir {
    /// The state directory at `path` (nothing is touched).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StateDir { path: path.into() }
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `lock`: held by the process that uses the directory.
    pub fn lock_file(&self) -> PathBuf {
        self.path.join(LOCK_FILE)
    }

    /// `device_id`: the device whose readings the directory holds.
    pub fn device_file(&self) -> PathBuf {
        self.path.join(DEVICE_FILE)
    }

    /// `epoch`: the last epoch a process of this directory used.
    pub fn epoch_file(&self) -> PathBuf {
        self.path.join(EPOCH_FILE)
    }

    /// `held`: readings held for clock sync, saved at an orderly stop.
    pub fn held_file(&self) -> PathBuf {
        self.path.join(HELD_FILE)
    }

    /// `acked`: the spool's ack watermark.
    pub fn watermark_file(&self) -> PathBuf {
        self.path.join(WATERMARK_FILE)
    }

    /// `energy-ceiling.<slot>`: slot 0 or 1 of the saved energy ceilings.
    pub fn ceiling_file(&self, slot: usize) -> PathBuf {
        self.path.join(format!("{CEILING_FILE}.{slot}"))
    }

    /// The spool segment whose first record is `base`.
    pub fn segment_file(&self, base: u64) -> PathBuf {
        self.path.join(format!("{base:020}{SEGMENT_SUFFIX}"))
    }

    /// Where a segment file that cannot be read is moved aside at open
    /// (`NNNNNNNNNNNNNNNNNNNN.seg.unreadable`), kept for an operator.
    pub fn unreadable_segment_file(&self, base: u64) -> PathBuf {
        self.path
            .join(format!("{base:020}{SEGMENT_SUFFIX}{UNREADABLE_SUFFIX}"))
    }

    /// The bases of the segment files present, unsorted.
    pub fn segment_bases(&self) -> io::Result<Vec<u64>> {
        let mut bases = vec![];
        for entry in fs::read_dir(&self.path)? {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(base) = name
                .strip_suffix(SEGMENT_SUFFIX)
                .and_then(|n| n.parse::<u64>().ok())
            {
                bases.push(base);
            }
        }
        Ok(bases)
    }

    /// A meter's persisted counter, `<meter>.<counter>` (e.g.
    /// `heatpump.pulses`).
    pub fn meter_file(&self, meter: &str, counter: &str) -> PathBuf {
        self.path.join(format!("{meter}.{counter}"))
    }

    /// fsyncs the directory, making renames, creations and deletions in it
    /// durable.
    pub fn sync(&self) -> io::Result<()> {
        sync_dir(&self.path)
    }

    /// Makes sure the directory holds `device_id`'s readings only. If
    /// another (valid) id owned it (the board was re-provisioned), that
    /// identity's spool, watermark, epoch and held readings are moved aside
    /// to `orphaned-<old id>-<unix s>/` with a warning, instead of being sent
    /// under the new identity. Meter counters stay: they belong to the
    /// hardware, not to the identity.
    pub fn claim(&self, device_id: &str) -> io::Result<()> {
        let owner = fs::read_to_string(self.device_file()).ok();
        let owner = owner.as_deref().map(str::trim);
        if owner == Some(device_id) {
            return Ok(());
        }
        if let Some(old) = owner.filter(|o| ems_shared::validate_device_id(o).is_ok()) {
            let secs = SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let aside = self.path.join(format!("orphaned-{old}-{secs}"));
            let moved = self.move_identity_files(&aside)?;
            log::warn!(
                "spool {} belonged to device {old:?}, not {device_id:?}: moved its {moved} files to {} (they are not sent under the new identity)",
                self.path.display(),
                aside.display()
            );
        }
        write_durably(&self.device_file(), format!("{device_id}\n").as_bytes())
    }

    /// Moves the files bound to the device identity into `aside`.
    fn move_identity_files(&self, aside: &Path) -> io::Result<usize> {
        fs::create_dir_all(aside)?;
        let mut moved = 0;
        for entry in fs::read_dir(&self.path)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(SEGMENT_SUFFIX)
                || name == WATERMARK_FILE
                || name == EPOCH_FILE
                || name == HELD_FILE
            {
                fs::rename(entry.path(), aside.join(&*name))?;
                moved += 1;
            }
        }
        sync_dir(aside)?;
        Ok(moved)
    }
}

/// The temporary file a replacement of `path` is written to first.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(TMP_SUFFIX);
    PathBuf::from(name)
}

/// fsyncs a directory, making renames, creations and deletions in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` atomically and durably: writes [`tmp_path`], fsyncs it,
/// renames it over `path` and fsyncs the directory (without the last step a
/// power cut can undo the rename).
pub fn write_durably(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = tmp_path(path);
    fs::write(&tmp, contents)?;
    File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or_else(|| Path::new(".")))
}

/// Exclusive use of a state directory by this process: an `flock` on its
/// `lock` file, held until dropped (or the process exits: the kernel
/// releases it even after SIGKILL). The file holds the owner's pid, for the
/// error message of the next process. A second `ems-edge run` on the same
/// directory (the service plus a manual run) fails at start instead of the
/// two corrupting each other's segments.
#[derive(Debug)]
pub struct DirLock {
    /// The locked directory.
    dir: StateDir,
    /// The locked file (the lock lives as long as this descriptor).
    _file: File,
}

impl DirLock {
    /// Creates `dir` if needed and locks it. When another process (or
    /// another open spool of this process) holds the lock, fails at once
    /// with [`io::ErrorKind::WouldBlock`] and a message naming the holder.
    pub fn acquire(dir: &Path) -> io::Result<DirLock> {
        fs::create_dir_all(dir)?;
        let dir = StateDir::new(dir);
        let path = dir.lock_file();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        // SAFETY: flock on a descriptor we own and keep open.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(e);
            }
            let holder = fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .map(|pid| format!(" (pid {pid})"))
                .unwrap_or_default();
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("in use by another ems-edge process{holder}"),
            ));
        }
        // Best effort: the pid is only informational.
        if file.set_len(0).is_ok() {
            let _ = writeln!(file, "{}", std::process::id());
        }
        Ok(DirLock { dir, _file: file })
    }

    /// The locked directory.
    pub fn dir(&self) -> &StateDir {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spool_of_another_device_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        state.claim("dev-a").unwrap();
        std::fs::write(dir.path().join("00000000000000000000.seg"), "{}\n").unwrap();
        std::fs::write(dir.path().join(EPOCH_FILE), "5\n").unwrap();
        // Same device: untouched.
        state.claim("dev-a").unwrap();
        assert!(dir.path().join("00000000000000000000.seg").exists());
        // Re-provisioned as another device: moved aside, not sent.
        state.claim("dev-b").unwrap();
        assert!(!dir.path().join("00000000000000000000.seg").exists());
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("orphaned-dev-a-"))
            .collect();
        assert_eq!(aside.len(), 1);
        let moved = dir.path().join(&aside[0]);
        assert!(moved.join("00000000000000000000.seg").exists());
        assert!(moved.join(EPOCH_FILE).exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(DEVICE_FILE)).unwrap(),
            "dev-b\n"
        );
    }

    #[test]
    fn file_names_are_the_documented_ones() {
        let s = StateDir::new("/var/lib/ems-edge");
        let name = |p: PathBuf| p.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(name(s.lock_file()), "lock");
        assert_eq!(name(s.device_file()), "device_id");
        assert_eq!(name(s.epoch_file()), "epoch");
        assert_eq!(name(s.held_file()), "held");
        assert_eq!(name(s.watermark_file()), "acked");
        assert_eq!(name(s.segment_file(42)), "00000000000000000042.seg");
        assert_eq!(
            name(s.unreadable_segment_file(42)),
            "00000000000000000042.seg.unreadable"
        );
        assert_eq!(name(s.meter_file("hp", "pulses")), "hp.pulses");
        assert_eq!(name(tmp_path(&s.epoch_file())), "epoch.tmp");
    }
}
