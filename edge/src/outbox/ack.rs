//! The hub's answers to sent readings: cumulative acks, rejections
//! (counted) and `rate_limited` requeues.

use super::{AckOutcome, Outbox};

impl Outbox {
    /// Handles `ack(epoch, seq)`; returns readings newly done.
    pub fn ack(&mut self, epoch: u64, seq: u64) -> AckOutcome {
        let out = self.state.ack(epoch, seq);
        self.settle();
        self.refresh_stats();
        out
    }

    /// Handles `rejected(epoch, seq)`.
    pub fn rejected(&mut self, epoch: u64, seq: u64) -> AckOutcome {
        let out = self.state.rejected(epoch, seq);
        self.stats.rejected += out.done as u64;
        self.settle();
        self.refresh_stats();
        out
    }

    /// Handles a `rate_limited` rejection: the reading stays and is resent
    /// (unless the spool dropped it meanwhile: then it is lost, counted).
    pub fn requeue(&mut self, epoch: u64, seq: u64) -> AckOutcome {
        let out = self.state.requeue(epoch, seq);
        if let Some(cause) = out.lost {
            self.count_lost(cause, 1);
        }
        self.refresh_stats();
        out
    }

    /// Lets the spool forget the readings in memory that are done now:
    /// they never need writing ([`crate::spool::Spool::settle`]).
    fn settle(&mut self) {
        let state = &self.state;
        self.spool.settle(&|rec| state.is_done(rec));
    }
}
