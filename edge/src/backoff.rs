//! Reconnect backoff: exponential ceiling with full jitter, no I/O.
//!
//! The n-th consecutive failure waits a uniformly random time in
//! `[0, min(cap, base·2ⁿ)]` ("full jitter", so a fleet that lost its hub
//! does not reconnect in lock-step). [`Backoff::penalize`] is used after an
//! answer that will not change soon (401/403, close code 4000): the wait is
//! drawn from `[cap/2, cap]`. [`Backoff::reset`] is called after a connection
//! that stayed up. The random source is passed in so tests are deterministic.

use std::time::Duration;

/// Backoff state.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// First ceiling.
    base: Duration,
    /// Largest ceiling.
    cap: Duration,
    /// Consecutive failures since the last reset.
    failures: u32,
}

impl Backoff {
    /// New backoff with `base <= cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap: cap.max(base),
            failures: 0,
        }
    }

    /// The ceiling for the next wait.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The wait after an ordinary failure (network error, closed socket).
    pub fn next_delay(&mut self, rng: &mut fastrand::Rng) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        jitter(Duration::ZERO, ceiling, rng)
    }

    /// The wait after an answer that retrying soon will not change
    /// (401/403, replaced by another connection): between cap/2 and cap.
    pub fn penalize(&mut self, rng: &mut fastrand::Rng) -> Duration {
        self.failures = self.failures.max(31);
        jitter(self.cap / 2, self.cap, rng)
    }

    /// After a connection that stayed up: start again from `base`.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures counted.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

fn jitter(lo: Duration, hi: Duration, rng: &mut fastrand::Rng) -> Duration {
    let lo_ms = lo.as_millis() as u64;
    let hi_ms = (hi.as_millis() as u64).max(lo_ms);
    Duration::from_millis(rng.u64(lo_ms..=hi_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn ceiling_doubles_up_to_cap() {
        let mut b = Backoff::new(secs(1), secs(60));
        let mut rng = fastrand::Rng::with_seed(1);
        let mut ceilings = vec![];
        for _ in 0..10 {
            ceilings.push(b.ceiling().as_secs());
            b.next_delay(&mut rng);
        }
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
    }

    #[test]
    fn delays_stay_within_full_jitter_bounds() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..200 {
            let mut b = Backoff::new(secs(1), secs(60));
            for n in 0..40u32 {
                let ceiling = secs(1u64 << n.min(6)).min(secs(60));
                let d = b.next_delay(&mut rng);
                assert!(d <= ceiling, "{d:?} > {ceiling:?} at {n}");
            }
        }
    }

    #[test]
    fn jitter_actually_spreads() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut b = Backoff::new(secs(1), secs(60));
        for _ in 0..8 {
            b.next_delay(&mut rng);
        }
        let ds: Vec<_> = (0..100)
            .map(|_| b.next_delay(&mut rng).as_millis())
            .collect();
        let (min, max) = (ds.iter().min().unwrap(), ds.iter().max().unwrap());
        assert!(*min < 20_000 && *max > 40_000, "{min} {max}");
    }

    #[test]
    fn reset_starts_over() {
        let mut rng = fastrand::Rng::with_seed(1);
        let mut b = Backoff::new(secs(1), secs(60));
        for _ in 0..5 {
            b.next_delay(&mut rng);
        }
        b.reset();
        assert_eq!(b.ceiling(), secs(1));
        assert!(b.next_delay(&mut rng) <= secs(1));
    }

    #[test]
    fn penalty_waits_near_the_cap_and_stays_there() {
        let mut rng = fastrand::Rng::with_seed(9);
        let mut b = Backoff::new(secs(1), secs(60));
        for _ in 0..50 {
            let d = b.penalize(&mut rng);
            assert!(d >= secs(30) && d <= secs(60), "{d:?}");
        }
        assert_eq!(b.ceiling(), secs(60));
        b.reset();
        assert_eq!(b.ceiling(), secs(1));
    }

    #[test]
    fn tiny_and_degenerate_settings() {
        let mut rng = fastrand::Rng::with_seed(1);
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_millis(10));
        assert_eq!(b.ceiling(), Duration::from_millis(50));
        for _ in 0..100 {
            assert!(b.next_delay(&mut rng) <= Duration::from_millis(50));
        }
    }
}
