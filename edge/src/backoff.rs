//! Reconnect backoff and send pacing, both pure (no I/O, time passed in).
//!
//! ## Backoff
//!
//! The n-th consecutive failure waits a uniformly random time in
//! `[0, min(cap, base·2ⁿ)]` ("full jitter", so a fleet that lost its hub
//! does not reconnect in lock-step). [`Backoff::penalize`] is used after an
//! answer that will not change soon (401/403, close code 4000): the wait is
//! drawn from `[cap/2, cap]`. [`Backoff::reset`] is called after a connection
//! that stayed up. The random source is passed in so tests are deterministic.
//! (Why full jitter: `docs/decisions/edge-full-jitter-backoff.md`.)
//!
//! ## Pacing
//! [`Pacer`] is a token bucket that keeps the edge under the hub's
//! per-device rate limit while a backlog drains (live readings at 1 Hz never
//! come near it). When the hub still answers `rate_limited`, the pacer
//! halves its rate and pauses for longer than the hub's excess gap, then
//! grows the rate again additively (AIMD) up to the configured maximum.

use std::time::{Duration, Instant};

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

/// Token-bucket send pacing with AIMD adaptation (see the module docs).
#[derive(Debug, Clone)]
pub struct Pacer {
    /// Configured ceiling, readings per second.
    max_rate: f64,
    /// Current rate, readings per second.
    rate: f64,
    /// Tokens available.
    tokens: f64,
    /// Last refill.
    at: Instant,
    /// No sending before this (after a `rate_limited` answer).
    paused_until: Option<Instant>,
    /// Last rate increase.
    grown_at: Instant,
}

/// Slowest the pacer goes.
const MIN_RATE: f64 = 5.0;
/// Pause after a `rate_limited` answer: longer than the hub's 2 s excess gap.
pub const RATE_LIMIT_PAUSE: Duration = Duration::from_secs(3);

impl Pacer {
    /// A full-speed pacer at `max_rate` readings per second.
    pub fn new(max_rate: f64, now: Instant) -> Self {
        let max_rate = max_rate.max(MIN_RATE);
        Pacer {
            max_rate,
            rate: max_rate,
            tokens: Self::capacity(max_rate),
            at: now,
            paused_until: None,
            grown_at: now,
        }
    }

    fn capacity(rate: f64) -> f64 {
        (rate / 4.0).max(16.0)
    }

    /// Paused after a `rate_limited` answer?
    pub fn is_paused(&self, now: Instant) -> bool {
        self.paused_until.is_some_and(|u| now < u)
    }

    /// Current rate.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// How many readings may be sent now (at most `want`); takes them.
    pub fn take(&mut self, want: usize, now: Instant) -> usize {
        if let Some(until) = self.paused_until {
            if now < until {
                return 0;
            }
            self.paused_until = None;
            self.at = now;
        }
        // Additive increase: +5 % of the ceiling per second without trouble.
        let since = now.saturating_duration_since(self.grown_at).as_secs_f64();
        if since >= 1.0 {
            self.rate = (self.rate + self.max_rate * 0.05 * since.floor()).min(self.max_rate);
            self.grown_at = now;
        }
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + dt * self.rate).min(Self::capacity(self.rate));
        let n = (self.tokens.floor().max(0.0) as usize).min(want);
        self.tokens -= n as f64;
        n
    }

    /// How long until [`Pacer::take`] gives at least one reading (zero if
    /// it would now).
    pub fn next_token_in(&self, now: Instant) -> Duration {
        if let Some(until) = self.paused_until.filter(|u| now < *u) {
            return until - now;
        }
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        let tokens = (self.tokens + dt * self.rate).min(Self::capacity(self.rate));
        if tokens >= 1.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((1.0 - tokens) / self.rate)
    }

    /// Returns `n` tokens taken by [`Pacer::take`] but not used.
    pub fn refund(&mut self, n: usize) {
        self.tokens = (self.tokens + n as f64).min(Self::capacity(self.rate));
    }

    /// The hub refused a reading with `rate_limited`: halve, pause.
    pub fn rate_limited(&mut self, now: Instant) {
        if self.paused_until.is_some_and(|u| now < u) {
            // One episode (a whole window refused) halves once.
            return;
        }
        self.rate = (self.rate / 2.0).max(MIN_RATE);
        self.tokens = 0.0;
        self.paused_until = Some(now + RATE_LIMIT_PAUSE);
        self.grown_at = now + RATE_LIMIT_PAUSE;
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
    fn pacer_holds_its_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(100.0, t0);
        let mut sent = p.take(usize::MAX, t0);
        assert_eq!(sent, 25, "initial bucket: a quarter second");
        for ms in (10..=10_000).step_by(10) {
            sent += p.take(usize::MAX, t0 + Duration::from_millis(ms));
        }
        assert!((1000..=1030).contains(&sent), "{sent} in 10 s at 100/s");
        assert_eq!(p.take(0, t0 + Duration::from_secs(11)), 0);
    }

    #[test]
    fn pacer_backs_off_on_rate_limited_and_recovers() {
        let t0 = Instant::now();
        let mut p = Pacer::new(800.0, t0);
        p.take(usize::MAX, t0);
        p.rate_limited(t0);
        p.rate_limited(t0 + Duration::from_millis(5)); // same episode
        assert_eq!(p.rate(), 400.0);
        assert_eq!(p.take(10, t0 + Duration::from_secs(2)), 0, "paused");
        let after = t0 + RATE_LIMIT_PAUSE + Duration::from_millis(100);
        assert!(p.take(10, after) <= 10);
        let mut t = after;
        for _ in 0..30 {
            t += Duration::from_secs(1);
            p.take(usize::MAX, t);
        }
        assert_eq!(p.rate(), 800.0, "recovers to the ceiling");
        for i in 0..20 {
            p.rate_limited(t + RATE_LIMIT_PAUSE * (i + 1));
        }
        assert_eq!(p.rate(), 5.0, "never below the floor");
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
