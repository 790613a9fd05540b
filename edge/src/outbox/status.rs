//! The `status` frame for the hub: depth, the sample time of the oldest
//! unacknowledged reading (looked up once per oldest record), and the
//! loss counters.

use ems_shared::{EdgeStatus, Reading};

use super::Outbox;
use crate::spool::Slot;

impl Outbox {
    /// The `status` frame for the hub: depth, sample time of the oldest
    /// unacknowledged reading, readings dropped since start, readings held
    /// in memory.
    pub fn status(&mut self) -> EdgeStatus {
        let low = self.state.low();
        let oldest_ts_ms = if self.state.depth() == 0 {
            None
        } else {
            match self.oldest {
                Some((rec, ts)) if rec == low => ts,
                _ => {
                    let ts = match self.spool.peek(low) {
                        Ok(Slot::Record(json)) => serde_json::from_str::<Reading>(&json)
                            .ok()
                            .map(|r| r.ts_ms)
                            .filter(|t| *t >= 0),
                        _ => None,
                    };
                    self.oldest = Some((low, ts));
                    ts
                }
            }
        };
        EdgeStatus {
            outbox_depth: self.state.depth(),
            oldest_ts_ms,
            dropped: self.stats.dropped_full,
            unwritten: self.stats.unwritten,
            dropped_disk_full: self.stats.dropped_disk_full,
            dropped_damaged: self.stats.dropped_damaged,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{drain, reading, sync};
    use super::super::*;

    #[test]
    fn status_reports_depth_and_the_oldest_sample_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), 1 << 20, 1000).unwrap();
        let st = ob.status();
        assert_eq!((st.outbox_depth, st.oldest_ts_ms), (0, None));
        for seq in 0..10 {
            ob.append(&reading(seq));
        }
        sync(&mut ob);
        assert_eq!(ob.status().oldest_ts_ms, Some(1_764_000_000_000));
        ob.connected();
        drain(&mut ob);
        ob.ack(7, 3);
        let st = ob.status();
        assert_eq!(st.outbox_depth, 6);
        assert_eq!(st.oldest_ts_ms, Some(1_764_000_000_004));
        st.validate(1_764_000_000_000).unwrap();
        drop(ob);
        // From the files after a restart (not from the memory cache).
        let mut ob = Outbox::open(dir.path(), 1 << 20, 1000).unwrap();
        assert_eq!(ob.status().oldest_ts_ms, Some(1_764_000_000_000));
    }
}
