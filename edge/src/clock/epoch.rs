//! The epoch: chosen once per process, the first half of every reading's
//! identity `(epoch, seq)` (seq restarts at 0 with each epoch).

use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::state_dir::{self, StateDir};

/// Picks this process's epoch and records it in the spool directory.
pub fn next_epoch(dir: &StateDir) -> io::Result<u64> {
    let path = dir.epoch_file();
    let previous = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let mut random = [0u8; 8];
    if getrandom::fill(&mut random).is_err() {
        random = fastrand::u64(..).to_le_bytes();
    }
    let epoch = draw_epoch(SystemTime::now(), u64::from_le_bytes(random), previous);
    state_dir::write_durably(&path, format!("{epoch}\n").as_bytes())?;
    Ok(epoch)
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
}
