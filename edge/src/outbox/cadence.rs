//! When the supervisor must sync, pure: no clock of its own, no I/O.
//!
//! A streaming edge has nothing to write: the hub acknowledges a reading
//! within milliseconds and an acknowledged reading is never written. So
//! the supervisor does not sync on a fixed tick; it sleeps until one of
//! these is due ([`Cadence::plan`] over what the outbox [`Needs`]):
//!
//! - **a reading not acknowledged `interval` after it was appended**
//!   (`spool_sync_interval_ms`), and never sooner than `interval` after
//!   the previous sync (at most one sync per interval). The sync writes
//!   every reading older than the *grace* (a quarter of the interval, at
//!   most 250 ms); younger ones are left for the next sync, since their
//!   ack is normally on the way. So a reading that is not acknowledged is
//!   on the card at most `interval` + grace after it was appended: the
//!   power-loss window (1.25 s at the defaults, plus the reading being
//!   taken);
//! - a reading waiting for an energy-ceiling raise: at once;
//! - a ceiling about to be reached, spool segments that acks emptied, or a
//!   spool write that failed (a full card: retried until it succeeds, so
//!   the memory queue is written as soon as there is room): at most one
//!   sync per interval;
//! - the ack watermark changed by acks of records on disk: saved at most
//!   every `watermark_every`.
//!
//! Nobody ticks to find out: whoever changes the outbox (the sampler's
//! append, the link's ack) asks [`must_ring`] whether the supervisor has
//! to be woken for it, which is only when neither the supervisor's own
//! timer nor the sampler's next tick comes before the plan's time. At
//! 1 Hz the sampler's tick is what notices a reading left unacknowledged
//! for a second; the supervisor wakes only to write.

use std::time::{Duration, Instant};

/// Longest grace: a sync leaves readings younger than this unwritten.
pub const MAX_GRACE: Duration = Duration::from_millis(250);

/// What the outbox holds that may need the supervisor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// When the oldest reading neither acknowledged nor written was
    /// appended.
    pub oldest_pending: Option<Instant>,
    /// A reading waits for a ceiling raise (sync at once).
    pub held: bool,
    /// A ceiling needs raising soon.
    pub ceiling: bool,
    /// Spool segments can be deleted (every record in them is done).
    pub release: bool,
    /// The last spool write failed (disk full, card errors): retried every
    /// interval until one succeeds, readings or not.
    pub retry: bool,
    /// The ack watermark would tell the next start something new.
    pub watermark: bool,
}

/// What the supervisor does and when (from [`Cadence::plan`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Plan {
    /// When to sync (`None`: nothing to write).
    pub sync_at: Option<Instant>,
    /// When to save the ack watermark (`None`: unchanged).
    pub watermark_at: Option<Instant>,
}

impl Plan {
    /// The earlier of the two.
    pub fn wake_at(&self) -> Option<Instant> {
        match (self.sync_at, self.watermark_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The sync cadence (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadence {
    /// `spool_sync_interval_ms`.
    pub interval: Duration,
    /// Readings younger than this are not written by a sync.
    pub grace: Duration,
    /// The ack watermark is saved at most this often.
    pub watermark_every: Duration,
}

impl Cadence {
    /// The cadence for a sync interval; the grace is a quarter of it, at
    /// most [`MAX_GRACE`] (so the reading a sync is due for is always old
    /// enough to be written).
    pub fn new(interval: Duration, watermark_every: Duration) -> Self {
        Cadence {
            interval,
            grace: (interval / 4).min(MAX_GRACE),
            watermark_every,
        }
    }

    /// When to sync and to save the watermark, given the needs, the last
    /// sync and the last watermark save.
    pub fn plan(
        &self,
        needs: Needs,
        now: Instant,
        last_sync: Option<Instant>,
        last_watermark: Option<Instant>,
    ) -> Plan {
        let paced =
            |last: Option<Instant>, every: Duration| last.map_or(now, |t| now.max(t + every));
        let mut sync_at: Option<Instant> = None;
        let mut at = |t: Instant| sync_at = Some(sync_at.map_or(t, |s| s.min(t)));
        if needs.held {
            at(now);
        }
        if needs.ceiling || needs.release || needs.retry {
            at(paced(last_sync, self.interval));
        }
        if let Some(oldest) = needs.oldest_pending {
            let since = last_sync.map_or(oldest, |s| s.max(oldest));
            at(since + self.interval);
        }
        Plan {
            sync_at,
            watermark_at: needs
                .watermark
                .then(|| paced(last_watermark, self.watermark_every)),
        }
    }

    /// Readings appended after this are too young to be written by a sync
    /// at `now` (their ack is normally on the way).
    pub fn young_after(&self, now: Instant) -> Instant {
        now.checked_sub(self.grace).unwrap_or(now)
    }
}

/// Whether whoever just changed the outbox must wake the supervisor for
/// `wake_at`: only if neither the supervisor's own timer (`armed`) nor the
/// sampler's next tick (`next_tick`, which asks again) comes by then.
pub fn must_ring(
    wake_at: Option<Instant>,
    now: Instant,
    armed: Option<Instant>,
    next_tick: Option<Instant>,
) -> bool {
    let Some(w) = wake_at else {
        return false;
    };
    let supervisor_looks = armed.is_some_and(|a| a <= w);
    !(supervisor_looks || sampler_looks(w, now, next_tick))
}

/// Whether the sampler's next tick comes after `now` and no later than
/// `w` (then it will ask [`must_ring`] again in time).
pub fn sampler_looks(w: Instant, now: Instant, next_tick: Option<Instant>) -> bool {
    next_tick.is_some_and(|t| t > now && t <= w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn cadence() -> Cadence {
        Cadence::new(ms(1000), ms(10_000))
    }

    #[test]
    fn nothing_pending_nothing_to_do() {
        let now = Instant::now();
        let p = cadence().plan(Needs::default(), now, Some(now - ms(5000)), None);
        assert_eq!(p, Plan::default());
        assert_eq!(p.wake_at(), None);
        assert!(!must_ring(None, now, None, None));
    }

    #[test]
    fn an_unacknowledged_reading_is_due_one_interval_after_it_was_appended() {
        let c = cadence();
        let t0 = Instant::now();
        let needs = Needs {
            oldest_pending: Some(t0),
            ..Needs::default()
        };
        // No sync for a while: due one interval after the append.
        let p = c.plan(needs, t0 + ms(1), Some(t0 - ms(30_000)), None);
        assert_eq!(p.sync_at, Some(t0 + ms(1000)));
        // A sync just left it unwritten (too young): one interval after
        // that sync, never more than one sync per interval.
        let p = c.plan(needs, t0 + ms(200), Some(t0 + ms(100)), None);
        assert_eq!(p.sync_at, Some(t0 + ms(1100)));
        // The power-loss window: appended just inside the grace before a
        // sync at s, written at s + interval.
        let s = t0 + c.grace - ms(1);
        assert!(c.young_after(s) < t0);
        let p = c.plan(needs, s, Some(s), None);
        assert!(p.sync_at.unwrap() - t0 <= c.interval + c.grace);
    }

    #[test]
    fn the_grace_is_a_quarter_of_the_interval_at_most_250_ms() {
        assert_eq!(Cadence::new(ms(1000), ms(1)).grace, ms(250));
        assert_eq!(Cadence::new(ms(60_000), ms(1)).grace, ms(250));
        assert_eq!(Cadence::new(ms(100), ms(1)).grace, ms(25));
        assert_eq!(
            Cadence::new(ms(10), ms(1)).grace,
            Duration::from_micros(2500)
        );
        let now = Instant::now();
        assert_eq!(cadence().young_after(now), now - ms(250));
    }

    #[test]
    fn a_held_reading_syncs_at_once_other_needs_are_paced() {
        let c = cadence();
        let now = Instant::now();
        let last = Some(now - ms(400));
        let held = Needs {
            held: true,
            ceiling: true,
            ..Needs::default()
        };
        assert_eq!(c.plan(held, now, last, None).sync_at, Some(now));
        for needs in [
            Needs {
                ceiling: true,
                ..Needs::default()
            },
            Needs {
                release: true,
                ..Needs::default()
            },
            Needs {
                retry: true,
                ..Needs::default()
            },
        ] {
            assert_eq!(c.plan(needs, now, last, None).sync_at, Some(now + ms(600)));
            assert_eq!(c.plan(needs, now, None, None).sync_at, Some(now));
        }
    }

    #[test]
    fn the_watermark_is_saved_at_most_every_watermark_every() {
        let c = cadence();
        let now = Instant::now();
        let needs = Needs {
            watermark: true,
            ..Needs::default()
        };
        let p = c.plan(needs, now, None, Some(now - ms(4000)));
        assert_eq!(p.watermark_at, Some(now + ms(6000)));
        assert_eq!(p.sync_at, None);
        assert_eq!(p.wake_at(), Some(now + ms(6000)));
        assert_eq!(c.plan(needs, now, None, None).watermark_at, Some(now));
    }

    #[test]
    fn at_1_hz_the_sampler_tick_notices_a_missing_ack_and_nobody_else_wakes() {
        let c = cadence();
        let t0 = Instant::now();
        let s = ms(1000);
        // Tick k appends reading k (its ack is on the way): due at t0 + 1 s,
        // when the sampler's next tick asks again. No wake-up.
        let needs = Needs {
            oldest_pending: Some(t0 + ms(1)),
            ..Needs::default()
        };
        let p = c.plan(needs, t0 + ms(1), None, None);
        assert!(!must_ring(p.wake_at(), t0 + ms(1), None, Some(t0 + s)));
        // Tick k + 1: reading k is still not acknowledged: due now.
        let now = t0 + s + ms(1);
        let p = c.plan(needs, now, None, None);
        assert!(p.sync_at.unwrap() <= now);
        assert!(must_ring(p.wake_at(), now, None, Some(t0 + 2 * s)));
        // Unless the supervisor's own timer comes first.
        assert!(!must_ring(p.wake_at(), now, Some(t0 + s), Some(t0 + 2 * s)));
    }

    #[test]
    fn slow_sampling_or_no_sampler_leaves_it_to_the_supervisor() {
        let c = cadence();
        let t0 = Instant::now();
        let needs = Needs {
            oldest_pending: Some(t0),
            ..Needs::default()
        };
        let w = c.plan(needs, t0, None, None).wake_at();
        // A tick every 5 s comes too late: ring, the supervisor arms a timer.
        assert!(must_ring(w, t0, None, Some(t0 + ms(5000))));
        assert!(!must_ring(w, t0, Some(t0 + ms(1000)), Some(t0 + ms(5000))));
        // The link's ack (no tick of its own), a sampler that overran.
        assert!(must_ring(w, t0, None, None));
        assert!(must_ring(w, t0, None, Some(t0 - ms(1))));
        assert!(sampler_looks(t0 + ms(1000), t0, Some(t0 + ms(1000))));
        assert!(!sampler_looks(t0 + ms(1000), t0, Some(t0 + ms(1001))));
    }
}
