//! The quarantine and what the store writer could neither store nor
//! quarantine.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::QuarantineReason;

/// The quarantine (refused frames and readings the database refused, see
/// [`crate::store::quarantine`]) and what the store writer could neither
/// store nor quarantine.
#[derive(Debug)]
pub struct QuarantineMetrics {
    /// Rows committed to quarantine, indexed like `QuarantineReason::ALL`.
    quarantined: Vec<AtomicU64>,
    /// Refused readings answered `rate_limited` instead of being
    /// quarantined, because their device's quarantine budget was spent
    /// (the edge keeps them and sends them again).
    pub deferred: AtomicU64,
    /// Refused frames without an epoch/seq that were not quarantined
    /// because their device's quarantine budget was spent (nothing an edge
    /// holds: counted only).
    pub skipped: AtomicU64,
    /// Batches split to isolate the rows the database refused.
    pub batches_split: AtomicU64,
    /// Readings and refused frames neither stored nor quarantined (given
    /// up at shutdown, or their quarantine row was refused too): never
    /// acked, their connections closed so the edges send them again.
    pub abandoned: AtomicU64,
}

impl Default for QuarantineMetrics {
    fn default() -> Self {
        QuarantineMetrics {
            quarantined: QuarantineReason::ALL
                .iter()
                .map(|_| AtomicU64::new(0))
                .collect(),
            deferred: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            batches_split: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
        }
    }
}

impl QuarantineMetrics {
    pub(super) fn add(&self, reason: QuarantineReason) {
        if let Some(i) = QuarantineReason::ALL.iter().position(|r| *r == reason) {
            if let Some(c) = self.quarantined.get(i) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(super) fn render(&self, o: &mut String) {
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            o,
            "# HELP ems_quarantined_total Rows committed to quarantine by reason (refused frames; store_error: readings the database refused).\n\
             # TYPE ems_quarantined_total counter"
        );
        for (i, r) in QuarantineReason::ALL.iter().enumerate() {
            let n = self.quarantined.get(i).map(ld).unwrap_or(0);
            let _ = writeln!(o, "ems_quarantined_total{{reason=\"{}\"}} {n}", r.code());
        }
        for (name, help, v) in [
            (
                "ems_quarantine_deferred_total",
                "Refused readings answered rate_limited because their device's quarantine budget was spent.",
                &self.deferred,
            ),
            (
                "ems_quarantine_skipped_total",
                "Refused frames without epoch/seq not quarantined because their device's quarantine budget was spent.",
                &self.skipped,
            ),
            (
                "ems_store_batches_split_total",
                "Batches split to isolate rows the database refused.",
                &self.batches_split,
            ),
            (
                "ems_store_readings_abandoned_total",
                "Readings and refused frames neither stored nor quarantined (never acked; their connections closed).",
                &self.abandoned,
            ),
        ] {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                ld(v)
            );
        }
    }
}
