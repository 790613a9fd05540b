//! Backfill summaries. A device draining an offline backlog sends old
//! readings as fast as the hub acks them; its dashboards get a count and a
//! time range of those instead of each one, so they are never flooded and
//! never dropped as slow because of a backlog. A dashboard fetches the
//! range from the history API if it wants the points.
//!
//! The device's session does the counting ([`Backlog`], used by
//! `crate::ingest::session`), before anything enters the device's topic:
//! a backlog never occupies the topic ring, whose capacity is the
//! slow-subscriber limit, so a subscriber with the default ring gets its
//! summary however fast the backlog drains. At most one `backfill` frame is
//! published per `backfill_interval`, and the pending one always before
//! the next frame the session publishes (a fresh reading, an outbox status)
//! and before the device's disconnect.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

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

/// Whether a reading is backlog: older than `after_ms` when the hub
/// received it.
pub(crate) fn is_backlog(ts_ms: i64, rx_ms: i64, after_ms: i64) -> bool {
    rx_ms.saturating_sub(ts_ms) > after_ms
}

/// One device connection's backlog readings not yet published as a
/// summary, and when that summary is due.
#[derive(Default)]
pub(crate) struct Backlog {
    /// What was counted since the last summary.
    summary: Summary,
    /// When the summary is due: set by the first reading counted after a
    /// summary, so a drain of any length costs one timer per interval.
    /// Boxed and absent while nothing is counted: most connections never
    /// drain a backlog, and every device task carries this field.
    due: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Backlog {
    /// Counts one backlog reading; the first since the last summary makes
    /// the next one due `interval` from now.
    pub(crate) fn add(&mut self, ts_ms: i64, interval: Duration) {
        if self.due.is_none() {
            self.due = Some(Box::pin(tokio::time::sleep(interval)));
        }
        self.summary.add(ts_ms);
    }

    /// Ready when the pending summary is due; never while nothing is
    /// counted.
    pub(crate) fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.due.as_mut() {
            Some(sleep) if self.summary.pending() => sleep.as_mut().poll(cx),
            _ => Poll::Pending,
        }
    }

    /// The `backfill` frame for what was counted (and a reset), if any.
    pub(crate) fn take(&mut self, device_id: &str) -> Option<DashboardFrame> {
        self.due = None;
        self.summary.take(device_id)
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

    #[test]
    fn backlog_is_older_than_the_threshold_on_arrival() {
        assert!(!is_backlog(1_000, 61_000, 60_000));
        assert!(is_backlog(1_000, 61_001, 60_000));
        // A sample time in the future is not backlog.
        assert!(!is_backlog(70_000, 61_000, 60_000));
        assert!(!is_backlog(i64::MIN, i64::MAX, i64::MAX));
    }

    #[tokio::test(start_paused = true)]
    async fn backlog_summary_is_due_one_interval_after_its_first_reading() {
        let interval = Duration::from_secs(1);
        let mut b = Backlog::default();
        assert!(!b.summary.pending());
        // Nothing counted: never due.
        assert!(tokio::time::timeout(
            Duration::from_secs(10),
            std::future::poll_fn(|cx| b.poll_due(cx))
        )
        .await
        .is_err());
        let t0 = tokio::time::Instant::now();
        b.add(5_000, interval);
        tokio::time::advance(Duration::from_millis(600)).await;
        // Later readings do not push the summary back.
        b.add(3_000, interval);
        b.add(4_000, interval);
        std::future::poll_fn(|cx| b.poll_due(cx)).await;
        assert_eq!(t0.elapsed(), interval);
        assert_eq!(
            b.take("d"),
            Some(DashboardFrame::Backfill {
                device_id: "d".into(),
                count: 3,
                from_ts_ms: 3_000,
                to_ts_ms: 5_000
            })
        );
        assert!(!b.summary.pending());
        assert_eq!(b.take("d"), None);
        // The next reading starts a new interval.
        let t1 = tokio::time::Instant::now();
        b.add(6_000, interval);
        std::future::poll_fn(|cx| b.poll_due(cx)).await;
        assert_eq!(t1.elapsed(), interval);
    }
}
