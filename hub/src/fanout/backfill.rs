//! Backfill summaries. A device draining an offline backlog sends old
//! readings as fast as the hub acks them; a dashboard gets a count and a
//! time range of those instead of each one (see [`super::dashboard`] for
//! when a summary is sent), so it is never flooded and never dropped as
//! slow because of a backlog. It fetches the range from the history API if
//! it wants the points.

use ems_shared::DashboardFrame;

/// Backlog readings seen since the last `backfill` frame.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Summary {
    count: u64,
    from_ts_ms: i64,
    to_ts_ms: i64,
}

impl Summary {
    /// Whether backlog readings wait for a `backfill` frame.
    pub(crate) fn pending(&self) -> bool {
        self.count > 0
    }

    /// Counts one backlog reading.
    pub(crate) fn add(&mut self, ts_ms: i64) {
        if self.count == 0 {
            self.from_ts_ms = ts_ms;
            self.to_ts_ms = ts_ms;
        } else {
            self.from_ts_ms = self.from_ts_ms.min(ts_ms);
            self.to_ts_ms = self.to_ts_ms.max(ts_ms);
        }
        self.count += 1;
    }

    /// The `backfill` frame for what was counted (and a reset), if any.
    pub(crate) fn take(&mut self, device_id: &str) -> Option<DashboardFrame> {
        if self.count == 0 {
            return None;
        }
        let s = std::mem::take(self);
        Some(DashboardFrame::Backfill {
            device_id: device_id.to_owned(),
            count: s.count,
            from_ts_ms: s.from_ts_ms,
            to_ts_ms: s.to_ts_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_and_resets() {
        let mut s = Summary::default();
        assert_eq!(s.take("d"), None);
        for ts in [50, 10, 30] {
            s.add(ts);
        }
        assert_eq!(
            s.take("d"),
            Some(DashboardFrame::Backfill {
                device_id: "d".into(),
                count: 3,
                from_ts_ms: 10,
                to_ts_ms: 50
            })
        );
        assert_eq!(s.take("d"), None);
    }
}
