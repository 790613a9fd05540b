//! Stored readings counted by plausibility flag.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Stored readings by plausibility flag (`ems_reading_flags_total`): one
/// counter per bit of [`crate::energy::flags::ALL`], bumped once per
/// stored reading that has the bit (a resent duplicate is not stored and
/// not counted). A reading with two flags counts under both.
#[derive(Debug, Default)]
pub struct FlagCounts([AtomicU64; 4]);

impl FlagCounts {
    /// Adds the counts of one commit (in [`crate::energy::flags::ALL`]
    /// order).
    pub fn add(&self, counts: &[u64; 4]) {
        for (c, n) in self.0.iter().zip(counts) {
            if *n > 0 {
                c.fetch_add(*n, Ordering::Relaxed);
            }
        }
    }

    /// The count of each flag, in [`crate::energy::flags::ALL`] order.
    pub fn get(&self) -> [u64; 4] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }

    pub(super) fn render(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "# HELP ems_reading_flags_total Stored readings by plausibility flag.\n\
             # TYPE ems_reading_flags_total counter"
        );
        for ((_, name), n) in crate::energy::flags::ALL.iter().zip(self.get()) {
            let _ = writeln!(o, "ems_reading_flags_total{{flag=\"{name}\"}} {n}");
        }
    }
}
