//! Per-device rate limiting: a token bucket and the rule that turns
//! sustained excess into "abuse" (close 1008).
//!
//! Every text or binary frame from a device takes one token. The bucket
//! holds at most `burst` tokens and refills at `rate` per second. A frame
//! that finds the bucket empty is refused with reason `rate_limited`
//! (answered with a `rejected` frame when it has an epoch/seq, never
//! stored, never acked). The ems-edge treats a `rate_limited` rejection as
//! "not delivered": it keeps the reading in its outbox, halves its send
//! rate, pauses briefly and resends it on the same connection — nothing is
//! lost, and a backlog drains at about `rate` readings per second.
//!
//! A client that keeps sending into an empty bucket for `abuse_after`
//! (refusals with gaps shorter than [`EXCESS_GAP`]) is not an ems-edge
//! honouring the protocol: the hub closes it with 1008 (policy violation).
//!
//! Both are pure state machines on `Instant`s, unit-tested without time.
//! Each device's bucket — and the rate limit of the warnings about its bad
//! frames — is one [`DeviceLimits`] that every connection of the device
//! shares, kept in the device's registry entry
//! ([`crate::fanout::registry::Registry::limits`]): a reconnect, or a
//! takeover while the old connection is still live, neither refills the
//! bucket nor restarts the warning limit.
//!
//! The same bucket, counted in bytes, is each device's quarantine budget
//! ([`crate::config::QuarantineLimit`]): [`Buckets::spend`] asks it only
//! for a frame the gatekeeper refused, so valid readings never touch it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::RateLimit;

/// Refusals further apart than this end an excess episode.
pub const EXCESS_GAP: Duration = Duration::from_secs(2);

/// A token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens available now (fractional between refills).
    tokens: f64,
    /// Last refill.
    at: Instant,
    /// Refill rate per second.
    rate: f64,
    /// Capacity.
    burst: f64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limit: &RateLimit, now: Instant) -> Self {
        let burst = limit.burst.max(1.0);
        TokenBucket {
            tokens: burst,
            at: now,
            rate: limit.rate.max(0.0),
            burst,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.try_take_n(1.0, now)
    }

    /// Takes `n` tokens if there are that many (a cost above the burst
    /// never fits).
    pub fn try_take_n(&mut self, n: f64, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now.max(self.at);
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// Tracks excess episodes of one connection.
#[derive(Debug, Clone, Default)]
pub struct Excess {
    /// Start of the current episode.
    since: Option<Instant>,
    /// Last refusal.
    last: Option<Instant>,
}

impl Excess {
    /// Records a refusal at `now`; returns `true` when the episode has
    /// lasted `abuse_after` (close with 1008).
    pub fn refused(&mut self, now: Instant, abuse_after: Duration) -> bool {
        let fresh = self
            .last
            .map_or(true, |l| now.saturating_duration_since(l) > EXCESS_GAP);
        if fresh {
            self.since = Some(now);
        }
        self.last = Some(now);
        self.since
            .is_some_and(|s| now.saturating_duration_since(s) >= abuse_after)
    }
}

/// What every connection of one device shares: its token bucket and the
/// rate limit of warnings about its bad frames.
#[derive(Debug)]
pub struct DeviceLimits {
    /// Both under one lock: a warning is rare, and one lock is smaller.
    inner: Mutex<(TokenBucket, RateLimitedWarn)>,
}

impl DeviceLimits {
    /// Limits starting with `bucket`, at most one warning per `warn_every`.
    pub fn new(bucket: TokenBucket, warn_every: Duration) -> Self {
        DeviceLimits {
            inner: Mutex::new((bucket, RateLimitedWarn::new(warn_every))),
        }
    }

    /// Takes one token from the device's bucket if there is one.
    pub fn try_take(&self, now: Instant) -> bool {
        lock(&self.inner).0.try_take(now)
    }

    /// Takes `n` tokens from the device's bucket if there are that many.
    pub fn try_take_n(&self, n: f64, now: Instant) -> bool {
        lock(&self.inner).0.try_take_n(n, now)
    }

    /// Whether to log a warning about the device now; `Some(n)`: yes, `n`
    /// were suppressed since the last one.
    pub fn warn(&self, now: Instant) -> Option<u64> {
        lock(&self.inner).1.allow(now)
    }
}

/// Per-device limits by device id, kept for as long as the hub runs
/// (devices are provisioned, so this stays bounded): the quarantine
/// budgets. The rate limits live in the registry's device entries.
#[derive(Default)]
pub struct Buckets {
    devices: Mutex<HashMap<Arc<str>, Arc<DeviceLimits>>>,
}

impl Buckets {
    /// The limits of `device_id`, shared with its other connections; new
    /// ones (with the bucket from `make`) for a device seen the first time.
    pub fn of(
        &self,
        device_id: &Arc<str>,
        make: impl FnOnce() -> TokenBucket,
    ) -> Arc<DeviceLimits> {
        lock(&self.devices)
            .entry(device_id.clone())
            .or_insert_with(|| Arc::new(DeviceLimits::new(make(), WARN_EVERY)))
            .clone()
    }

    /// Takes `n` tokens from the bucket of `device_id` (a fresh one from
    /// `make` if it has none): for a budget asked rarely (refused frames).
    pub fn spend(
        &self,
        device_id: &Arc<str>,
        n: f64,
        now: Instant,
        make: impl FnOnce() -> TokenBucket,
    ) -> bool {
        self.of(device_id, make).try_take_n(n, now)
    }
}

/// How often at most a warning about a device's bad frames is logged.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// At most one warning per `every`, with a count of the suppressed ones, so
/// a flood of bad frames costs bounded log volume.
#[derive(Debug)]
pub(crate) struct RateLimitedWarn {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedWarn {
    pub(crate) fn new(every: Duration) -> Self {
        RateLimitedWarn {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// Whether to log now; returns the number suppressed since the last one.
    pub(crate) fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A token taken, a warning counted or an insert cannot leave the state
    // inconsistent, so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let lim = RateLimit {
            rate: 10.0,
            burst: 5.0,
            abuse_after: Duration::from_secs(1),
        };
        let mut b = TokenBucket::new(&lim, t0);
        for _ in 0..5 {
            assert!(b.try_take(t0));
        }
        assert!(!b.try_take(t0));
        // 10/s: one token after 100 ms, never more than the burst.
        assert!(b.try_take(t0 + Duration::from_millis(100)));
        assert!(!b.try_take(t0 + Duration::from_millis(100)));
        let later = t0 + Duration::from_secs(60);
        let n = (0..100).filter(|_| b.try_take(later)).count();
        assert_eq!(n, 5);
    }

    #[test]
    fn sustained_excess_is_abuse_but_episodes_reset() {
        let t0 = Instant::now();
        let mut e = Excess::default();
        let ten = Duration::from_secs(10);
        assert!(!e.refused(t0, ten));
        assert!(!e.refused(t0 + Duration::from_secs(1), ten));
        // A gap longer than EXCESS_GAP starts a new episode.
        assert!(!e.refused(t0 + Duration::from_secs(9), ten));
        let mut t = t0 + Duration::from_secs(9);
        let mut abused = false;
        for _ in 0..12 {
            t += Duration::from_secs(1);
            abused |= e.refused(t, ten);
        }
        assert!(abused);
    }

    #[test]
    fn a_budget_in_bytes_is_spent_and_refilled_per_device() {
        let t0 = Instant::now();
        let lim = RateLimit {
            rate: 1000.0,
            burst: 3000.0,
            abuse_after: Duration::from_secs(1),
        };
        let budgets = Buckets::default();
        let id: Arc<str> = Arc::from("dev");
        let make = || TokenBucket::new(&lim, t0);
        assert!(budgets.spend(&id, 2000.0, t0, make));
        assert!(!budgets.spend(&id, 2000.0, t0, make));
        assert!(budgets.spend(&id, 1000.0, t0, make));
        // 1000 bytes/s: 2000 more after two seconds.
        assert!(budgets.spend(&id, 2000.0, t0 + Duration::from_secs(2), make));
        // More than the burst never fits; other devices have their own.
        assert!(!budgets.spend(&id, 5000.0, t0 + Duration::from_secs(60), make));
        assert!(budgets.spend(&Arc::from("other"), 3000.0, t0, make));
    }

    #[test]
    fn buckets_outlive_a_connection() {
        let t0 = Instant::now();
        let lim = RateLimit {
            rate: 0.0,
            burst: 2.0,
            abuse_after: Duration::from_secs(1),
        };
        let buckets = Buckets::default();
        let id: Arc<str> = Arc::from("dev");
        let b = buckets.of(&id, || TokenBucket::new(&lim, t0));
        assert!(b.try_take(t0) && b.try_take(t0) && !b.try_take(t0));
        drop(b);
        // The next connection gets the drained bucket, not a fresh one.
        let again = buckets.of(&id, || TokenBucket::new(&lim, t0));
        assert!(!again.try_take(t0));
        // Another device starts full.
        let other = buckets.of(&Arc::from("other"), || TokenBucket::new(&lim, t0));
        assert!(other.try_take(t0));
    }

    #[test]
    fn a_takeover_shares_the_live_connections_limits() {
        let t0 = Instant::now();
        let lim = RateLimit {
            rate: 0.0,
            burst: 2.0,
            abuse_after: Duration::from_secs(1),
        };
        let buckets = Buckets::default();
        let id: Arc<str> = Arc::from("dev");
        // Both connections live at once (the old one not yet closed).
        let old = buckets.of(&id, || TokenBucket::new(&lim, t0));
        let new = buckets.of(&id, || TokenBucket::new(&lim, t0));
        assert!(old.try_take(t0) && old.try_take(t0));
        assert!(!new.try_take(t0), "the new connection got a fresh bucket");
        // And one warning limit.
        assert_eq!(old.warn(t0), Some(0));
        assert_eq!(new.warn(t0 + Duration::from_secs(1)), None);
    }

    #[test]
    fn warnings_are_rate_limited() {
        let mut w = RateLimitedWarn::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(w.allow(t0), Some(0));
        assert_eq!(w.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(w.allow(t0 + Duration::from_secs(2)), None);
        assert_eq!(w.allow(t0 + Duration::from_secs(11)), Some(2));
    }
}
