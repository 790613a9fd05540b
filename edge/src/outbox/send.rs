//! What goes on the wire next: batches of readings, live first, then the
//! oldest backlog (read from the spool, with a pause after a read error),
//! damaged records skipped and counted, and the in-flight window reset on
//! connect and disconnect.

use std::time::Instant;

use ems_shared::Reading;

use super::{Outbox, Outgoing, READ_RETRY_AFTER};
use crate::spool::Slot;

impl Outbox {
    /// A connection is up.
    pub fn connected(&mut self) {
        for cause in self.state.connected() {
            self.count_lost(cause, 1);
        }
        self.refresh_stats();
    }

    /// The connection is gone.
    pub fn disconnected(&mut self) {
        for cause in self.state.disconnected() {
            self.count_lost(cause, 1);
        }
        self.refresh_stats();
    }

    /// Up to `max` readings to send now (live first, then oldest backlog),
    /// marked in flight.
    pub fn next_batch(&mut self, max: usize) -> Vec<Outgoing> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(rec) = self.state.peek_next() else {
                break;
            };
            let waiting = self
                .retry_backlog_at
                .is_some_and(|t| Instant::now() < t && !self.spool.in_memory(rec));
            if waiting {
                break;
            }
            match self.spool.read(rec) {
                Ok(Slot::Record(json)) => match serde_json::from_str::<Reading>(&json) {
                    Ok(r) => {
                        self.state.sent(rec, r.epoch, r.seq);
                        out.push(Outgoing { rec, json });
                    }
                    Err(_) => self.damaged(rec, "not a valid reading"),
                },
                Ok(Slot::Lost(why)) => self.damaged(rec, why),
                // Acknowledged before it was written (a previous run).
                Ok(Slot::Done) => self.state.discard(rec),
                Err(e) => {
                    if self.read_errors.due().is_some() {
                        log::warn!(
                            "spool: cannot read record {rec}: {e}; trying again (a spot that keeps failing is skipped and counted)"
                        );
                    }
                    self.retry_backlog_at = Some(Instant::now() + READ_RETRY_AFTER);
                    break;
                }
            }
        }
        self.refresh_stats();
        out
    }

    /// When the backlog may be read again after a spool read error (the
    /// link's timer), if that is still to come.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_backlog_at.filter(|t| *t > Instant::now())
    }

    /// A record that cannot be read back: skipped, counted, logged.
    fn damaged(&mut self, rec: u64, why: &str) {
        self.stats.dropped_damaged += 1;
        if let Some(more) = self.damaged_log.due() {
            log::warn!(
                "spool: record {rec} is lost ({why}); skipping it ({} skipped since start{})",
                self.stats.dropped_damaged,
                if more > 0 {
                    format!(", {more} more since the last message")
                } else {
                    String::new()
                }
            );
        }
        self.state.discard(rec);
    }
}
