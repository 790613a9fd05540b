//! When the next spool sync is due, so that the supervisor sleeps until
//! then instead of waking on a fixed tick.
//!
//! A reading needs writing and fsyncing only if the hub has not
//! acknowledged it `spool_sync_interval` after it was taken: that bounds
//! what a power cut can lose, and a reading acked before its due time
//! never touches the card. [`SyncDue`] keeps the push instant of every
//! reading that is neither acked nor written yet (oldest first), and the
//! instant the supervisor plans to wake up at. The sampler asks
//! [`SyncDue::must_wake`] after each append, under the outbox lock: the
//! supervisor is woken only when a reading would otherwise become due
//! before its planned wake-up and before the sampler's next tick could
//! notice. With acks arriving within milliseconds nothing is ever pending
//! at the next tick, and the supervisor sleeps.
//!
//! While every reading the edge holds is on the wire of a live connection
//! (`on_the_wire`), the oldest may wait the longer *ack window* instead:
//! a reading the hub received is stored there even if this edge loses
//! power, and the hub, told the window in the handshake, may hold its
//! readings for half of it to answer several with one ack. As soon as a
//! reading waits unsent (no connection, a full in-flight window, a
//! reading held for a ceiling raise), the sync interval applies again,
//! counted from when the reading was taken.
//!
//! Pure bookkeeping (no clock reads, no threads): tested here.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Due times of the readings not yet acked or written (see the module
/// docs).
#[derive(Debug)]
pub struct SyncDue {
    /// `(record, pushed at)`, oldest first; settled ones are pruned from
    /// the front lazily.
    pending: VecDeque<(u64, Instant)>,
    /// When the sleeping supervisor will wake up; `None` while it is awake
    /// (it plans again before it sleeps).
    planned_wake: Option<Instant>,
    /// `spool_sync_interval`.
    sync_every: Duration,
    /// How long a reading on the wire may wait for its ack (at least
    /// `sync_every`).
    ack_window: Duration,
    /// The sampler's tick.
    sample_every: Duration,
}

impl SyncDue {
    /// Bookkeeping for a spool synced `sync_every` after a reading at the
    /// latest (`ack_window` while every reading is on the wire), with
    /// readings arriving every `sample_every`.
    pub fn new(sync_every: Duration, ack_window: Duration, sample_every: Duration) -> SyncDue {
        SyncDue {
            pending: VecDeque::new(),
            planned_wake: None,
            sync_every,
            ack_window: ack_window.max(sync_every),
            sample_every,
        }
    }

    /// Changes the intervals (configuration).
    pub fn set_intervals(
        &mut self,
        sync_every: Duration,
        ack_window: Duration,
        sample_every: Duration,
    ) {
        self.sync_every = sync_every;
        self.ack_window = ack_window.max(sync_every);
        self.sample_every = sample_every;
    }

    /// How long the oldest pending reading may wait.
    fn wait(&self, on_the_wire: bool) -> Duration {
        if on_the_wire {
            self.ack_window
        } else {
            self.sync_every
        }
    }

    /// The sync interval.
    pub fn sync_every(&self) -> Duration {
        self.sync_every
    }

    /// Record `rec` was appended at `at`.
    pub fn appended(&mut self, rec: u64, at: Instant) {
        self.pending.push_back((rec, at));
    }

    /// When the oldest reading that is not `settled` (acked or written)
    /// must be on disk, as the supervisor plans it at `now` (`on_the_wire`:
    /// every pending reading is in flight on a live connection). A reading
    /// younger than a tick is left to the sampler while ticks are not
    /// longer than the interval: its next append nudges the supervisor if
    /// the reading is still pending then ([`SyncDue::must_wake`]).
    /// Planning for it would wake the supervisor once per reading, to find
    /// it acked.
    pub fn due_at(
        &mut self,
        now: Instant,
        on_the_wire: bool,
        settled: impl Fn(u64) -> bool,
    ) -> Option<Instant> {
        self.prune(&settled);
        let wait = self.wait(on_the_wire);
        let (_, at) = self.pending.front()?;
        let young = now
            .checked_duration_since(*at)
            .map_or(true, |age| age < self.sample_every);
        if young && self.sample_every <= wait {
            return None;
        }
        Some(*at + wait)
    }

    /// The first of the readings younger than a tick at `now`, which are
    /// the sampler's to look after (see [`SyncDue::due_at`]); `None` when
    /// there are none, or when ticks are longer than the interval.
    pub fn young_from(&self, now: Instant) -> Option<u64> {
        if self.sample_every > self.sync_every {
            return None;
        }
        self.pending
            .iter()
            .rev()
            .take_while(|(_, at)| {
                now.checked_duration_since(*at)
                    .map_or(true, |age| age < self.sample_every)
            })
            .last()
            .map(|(rec, _)| *rec)
    }

    /// The supervisor sleeps until `wake` (`None`: it is awake).
    pub fn plan(&mut self, wake: Option<Instant>) {
        self.planned_wake = wake;
    }

    /// After the sampler appended the records from `first_new` on: must the
    /// sleeping supervisor plan again? Yes when a pending reading falls due
    /// before the planned wake-up and the sampler's next append would come
    /// too late to tell — for readings appended before this call (the
    /// next tick looks at the new ones, at most one tick after they were
    /// taken), or for the new ones too when a tick is longer than the sync
    /// interval.
    pub fn must_wake(
        &mut self,
        first_new: u64,
        on_the_wire: bool,
        settled: impl Fn(u64) -> bool,
    ) -> bool {
        let Some(wake) = self.planned_wake else {
            return false;
        };
        self.prune(&settled);
        let wait = self.wait(on_the_wire);
        let watch_new = self.sample_every > wait;
        match self.pending.front() {
            Some((rec, at)) if watch_new || *rec < first_new => *at + wait < wake,
            _ => false,
        }
    }

    /// Readings in the bookkeeping (tests, bounds).
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing is pending (without pruning).
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Drops the settled readings from the front. A settled one behind an
    /// unsettled one stays until the front settles (acks come in order, so
    /// that is rare and short).
    fn prune(&mut self, settled: &impl Fn(u64) -> bool) {
        while self.pending.front().is_some_and(|(rec, _)| settled(*rec)) {
            self.pending.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_due_time_is_the_oldest_unsettled_reading_plus_the_interval() {
        let t0 = Instant::now();
        let later = t0 + ms(10_000);
        let mut d = SyncDue::new(S, S, S);
        assert_eq!(d.due_at(later, false, |_| false), None);
        d.appended(0, t0);
        d.appended(1, t0 + ms(1000));
        assert_eq!(d.due_at(later, false, |_| false), Some(t0 + S));
        // Record 0 acked: record 1 decides, and record 0 is gone.
        assert_eq!(d.due_at(later, false, |r| r == 0), Some(t0 + ms(2000)));
        assert_eq!(d.len(), 1);
        assert_eq!(d.due_at(later, false, |_| true), None);
        assert!(d.is_empty());
    }

    #[test]
    fn a_reading_younger_than_a_tick_is_left_to_the_sampler() {
        let t0 = Instant::now();
        let mut d = SyncDue::new(S, S, S);
        d.appended(0, t0);
        // Just taken (its ack is on its way): no wake-up planned for it.
        assert_eq!(d.due_at(t0 + ms(5), false, |_| false), None);
        // Still pending a tick later: due.
        assert_eq!(d.due_at(t0 + S, false, |_| false), Some(t0 + S));
        // Ticks longer than the interval: the supervisor plans at once.
        let mut slow = SyncDue::new(S, S, ms(10_000));
        slow.appended(0, t0);
        assert_eq!(slow.due_at(t0 + ms(5), false, |_| false), Some(t0 + S));
    }

    #[test]
    fn acked_readings_never_wake_the_supervisor() {
        // 1 Hz, sync 1 s, the supervisor asleep for 10 s: every reading is
        // acked before the next one is taken.
        let t0 = Instant::now();
        let mut d = SyncDue::new(S, S, S);
        d.plan(Some(t0 + ms(10_000)));
        for rec in 0..10u64 {
            d.appended(rec, t0 + S * rec as u32);
            assert!(!d.must_wake(rec, false, |r| r < rec), "reading {rec}");
        }
    }

    #[test]
    fn an_unacked_reading_wakes_the_supervisor_at_the_next_tick() {
        let t0 = Instant::now();
        let mut d = SyncDue::new(S, S, S);
        d.plan(Some(t0 + ms(10_000)));
        d.appended(0, t0);
        // The new reading alone: the next tick will look at it.
        assert!(!d.must_wake(0, false, |_| false));
        d.appended(1, t0 + S);
        // Reading 0 is due now, before the planned wake-up.
        assert!(d.must_wake(1, false, |_| false));
        // Once the supervisor planned for it, further readings do not
        // wake it again.
        let due = d.due_at(t0 + S, false, |_| false);
        d.plan(due);
        d.appended(2, t0 + ms(2000));
        assert!(!d.must_wake(2, false, |_| false));
    }

    #[test]
    fn with_ticks_longer_than_the_interval_a_new_reading_wakes_it() {
        let t0 = Instant::now();
        let mut d = SyncDue::new(S, S, ms(10_000));
        d.plan(Some(t0 + ms(30_000)));
        d.appended(0, t0);
        assert!(d.must_wake(0, false, |_| false));
        // Acked already (a fast hub): nothing to wait for.
        assert!(!d.must_wake(0, false, |_| true));
    }

    #[test]
    fn an_awake_supervisor_is_never_rung() {
        let t0 = Instant::now();
        let mut d = SyncDue::new(S, S, ms(10_000));
        d.plan(None);
        d.appended(0, t0);
        assert!(!d.must_wake(0, false, |_| false));
    }

    #[test]
    fn on_the_wire_the_oldest_reading_may_wait_the_ack_window() {
        let t0 = Instant::now();
        let window = ms(4000);
        let mut d = SyncDue::new(S, window, S);
        d.appended(0, t0);
        d.appended(1, t0 + S);
        // Both in flight on a live connection: the window counts.
        assert_eq!(d.due_at(t0 + S, true, |_| false), Some(t0 + window));
        // The connection is gone: the sync interval, from when it was taken.
        assert_eq!(d.due_at(t0 + S, false, |_| false), Some(t0 + S));
        // A window shorter than the sync interval is the sync interval.
        let short = SyncDue::new(ms(2000), S, S);
        assert_eq!(short.wait(true), ms(2000));
    }

    #[test]
    fn a_lost_connection_wakes_a_supervisor_planned_for_the_window() {
        let t0 = Instant::now();
        let mut d = SyncDue::new(S, ms(4000), S);
        d.appended(0, t0);
        let due = d.due_at(t0 + S, true, |_| false);
        d.plan(due);
        d.appended(1, t0 + S);
        // Still on the wire: the plan holds.
        assert!(!d.must_wake(1, true, |_| false));
        d.appended(2, t0 + ms(2000));
        // The connection dropped: reading 0 was due a second ago.
        assert!(d.must_wake(2, false, |_| false));
    }
}
