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
//! [`Buckets`] keeps each device's bucket between its connections.
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

/// The rate-limit buckets of devices, kept between connections so that
/// reconnecting does not refill them. A session takes its device's bucket
/// when it starts and puts it back when it ends.
#[derive(Default)]
pub struct Buckets {
    /// Buckets of devices without a live session, by device id.
    parked: Mutex<HashMap<Arc<str>, TokenBucket>>,
}

impl Buckets {
    /// The bucket of `device_id` (a fresh one from `make` if it has none);
    /// give it back with [`Buckets::put`].
    pub fn take(&self, device_id: &str, make: impl FnOnce() -> TokenBucket) -> TokenBucket {
        self.lock().remove(device_id).unwrap_or_else(make)
    }

    /// Returns a bucket taken with [`Buckets::take`].
    pub fn put(&self, device_id: &Arc<str>, bucket: TokenBucket) {
        self.lock().insert(device_id.clone(), bucket);
    }

    /// Takes `n` tokens from the bucket of `device_id` (a fresh one from
    /// `make` if it has none) without taking the bucket out: for a budget
    /// asked rarely (refused frames), so that no session holds it.
    pub fn spend(
        &self,
        device_id: &Arc<str>,
        n: f64,
        now: Instant,
        make: impl FnOnce() -> TokenBucket,
    ) -> bool {
        let mut parked = self.lock();
        match parked.get_mut(device_id) {
            Some(b) => b.try_take_n(n, now),
            None => {
                let mut b = make();
                let ok = b.try_take_n(n, now);
                parked.insert(device_id.clone(), b);
                ok
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, TokenBucket>> {
        // A single insert or remove cannot leave the map inconsistent, so
        // poisoning is ignored.
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }
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
        let mut b = buckets.take(&id, || TokenBucket::new(&lim, t0));
        assert!(b.try_take(t0) && b.try_take(t0) && !b.try_take(t0));
        buckets.put(&id, b);
        // The next connection gets the drained bucket, not a fresh one.
        let mut again = buckets.take(&id, || TokenBucket::new(&lim, t0));
        assert!(!again.try_take(t0));
        // Another device starts full.
        let mut other = buckets.take("other", || TokenBucket::new(&lim, t0));
        assert!(other.try_take(t0));
    }
}
