//! Fleet-wide aggregates of the edges' last `status` frames.

use std::fmt::Write as _;

/// Fleet-wide summary of the edges' last `status` frames (connected
/// devices only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EdgeSummary {
    /// Devices that reported.
    pub reporting: u64,
    /// Devices more than 60 s behind.
    pub behind: u64,
    /// Largest outbox depth.
    pub max_depth: u64,
    /// Sum of outbox depths.
    pub sum_depth: u64,
    /// Largest lag, ms.
    pub max_behind_ms: i64,
    /// Sum of the readings connected edges hold in memory because their
    /// spool cannot be written (`unwritten`).
    pub unwritten_sum: u64,
    /// Sums of the readings connected edges dropped since they started:
    /// spool full (`dropped`), disk full (`dropped_disk_full`), damaged
    /// spool records (`dropped_damaged`).
    pub dropped_sum: u64,
    /// See `dropped_sum`.
    pub dropped_disk_full_sum: u64,
    /// See `dropped_sum`.
    pub dropped_damaged_sum: u64,
}

impl EdgeSummary {
    /// Adds one connected edge's last status.
    pub fn add(&mut self, status: &ems_shared::EdgeStatus, behind_ms: i64) {
        self.reporting += 1;
        self.sum_depth = self.sum_depth.saturating_add(status.outbox_depth);
        self.max_depth = self.max_depth.max(status.outbox_depth);
        self.max_behind_ms = self.max_behind_ms.max(behind_ms);
        if behind_ms > 60_000 {
            self.behind += 1;
        }
        self.unwritten_sum = self.unwritten_sum.saturating_add(status.unwritten);
        self.dropped_sum = self.dropped_sum.saturating_add(status.dropped);
        self.dropped_disk_full_sum = self
            .dropped_disk_full_sum
            .saturating_add(status.dropped_disk_full);
        self.dropped_damaged_sum = self
            .dropped_damaged_sum
            .saturating_add(status.dropped_damaged);
    }

    /// The edges' loss counters: fleet sums over connected devices (each
    /// edge counts since it started, so a sum can fall when an edge
    /// restarts or disconnects: gauges, not counters).
    pub(super) fn render_losses(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "# HELP ems_edge_unwritten_readings_sum Readings connected edges hold in memory because their spool cannot be written.\n\
             # TYPE ems_edge_unwritten_readings_sum gauge\n\
             ems_edge_unwritten_readings_sum {}",
            self.unwritten_sum
        );
        let _ = writeln!(
            o,
            "# HELP ems_edge_dropped_readings_sum Readings connected edges dropped since they started, by cause.\n\
             # TYPE ems_edge_dropped_readings_sum gauge"
        );
        for (cause, n) in [
            ("spool_full", self.dropped_sum),
            ("disk_full", self.dropped_disk_full_sum),
            ("damaged", self.dropped_damaged_sum),
        ] {
            let _ = writeln!(o, "ems_edge_dropped_readings_sum{{cause=\"{cause}\"}} {n}");
        }
    }
}
