//! The clock gate: holds measurements until the wall clock is known, then
//! stamps them from the monotonic clock (see the [module docs](super)).
//!
//! Holding is bounded (`max_held`, a day at 1 Hz by default); beyond it the
//! oldest held readings are dropped and counted (in `STATUS=` and at exit).

use std::collections::VecDeque;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::meters::Measurement;

/// Unix milliseconds of a wall-clock time.
pub fn unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// A measurement stamped with its sample time.
#[derive(Debug, Clone, PartialEq)]
pub struct Stamped {
    /// Sample time, Unix ms.
    pub ts_ms: i64,
    /// The values.
    pub measurement: Measurement,
}

/// Holds readings until the clock is known (pure; see the module docs).
#[derive(Debug)]
pub struct ClockGate {
    /// The clock has been seen synchronized (latched).
    synced: bool,
    /// Readings sampled before that, oldest first, with their sample instant.
    held: VecDeque<(Instant, Measurement)>,
    /// Bound of `held`.
    max_held: usize,
    /// Held readings dropped because of the bound.
    dropped: u64,
}

impl ClockGate {
    /// A gate holding at most `max_held` readings.
    pub fn new(max_held: usize) -> Self {
        ClockGate {
            synced: false,
            held: VecDeque::new(),
            max_held: max_held.max(1),
            dropped: 0,
        }
    }

    /// Has the clock been synchronized?
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Readings waiting for the clock.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Held readings dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The held readings with their sample instants, oldest first.
    pub fn held_readings(&self) -> impl Iterator<Item = &(Instant, Measurement)> {
        self.held.iter()
    }

    /// Puts readings held by a previous process (oldest first) before the
    /// ones held now, within the bound (the oldest are dropped and counted).
    pub fn restore(&mut self, readings: Vec<(Instant, Measurement)>) {
        for r in readings.into_iter().rev() {
            if self.held.len() >= self.max_held {
                self.dropped += 1;
                continue;
            }
            self.held.push_front(r);
        }
    }

    /// Offers measurements sampled at `sampled_at`. `synced` is the probe's
    /// answer now; `now` is a (monotonic, wall) pair read together. Returns
    /// the readings that can be stamped, oldest first.
    pub fn offer(
        &mut self,
        sampled_at: Instant,
        measurements: Vec<Measurement>,
        synced: bool,
        now: (Instant, SystemTime),
    ) -> Vec<Stamped> {
        if synced {
            self.synced = true;
        }
        for m in measurements {
            if self.held.len() >= self.max_held {
                self.held.pop_front();
                self.dropped += 1;
            }
            self.held.push_back((sampled_at, m));
        }
        if !self.synced {
            return Vec::new();
        }
        let (mono_now, wall_now) = now;
        let wall_ms = unix_ms(wall_now);
        self.held
            .drain(..)
            .map(|(at, measurement)| {
                let age = mono_now.saturating_duration_since(at);
                Stamped {
                    ts_ms: wall_ms - i64::try_from(age.as_millis()).unwrap_or(0),
                    measurement,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn m(p: f64) -> Measurement {
        Measurement {
            meter: "main".into(),
            power_w: Some(p),
            ..Default::default()
        }
    }

    #[test]
    fn holds_until_synced_then_stamps_from_the_monotonic_clock() {
        let mut g = ClockGate::new(100);
        let t0 = Instant::now();
        let wrong_wall = UNIX_EPOCH + Duration::from_secs(1_000);
        assert!(g
            .offer(t0, vec![m(1.0)], false, (t0, wrong_wall))
            .is_empty());
        let t1 = t0 + Duration::from_secs(1);
        assert!(g
            .offer(t1, vec![m(2.0)], false, (t1, wrong_wall))
            .is_empty());
        assert_eq!(g.held(), 2);
        // Clock stepped to the truth at t2.
        let t2 = t0 + Duration::from_secs(2);
        let right = UNIX_EPOCH + Duration::from_secs(1_764_000_000);
        let out = g.offer(t2, vec![m(3.0)], true, (t2, right));
        let ts: Vec<i64> = out.iter().map(|s| s.ts_ms).collect();
        let r = 1_764_000_000_000i64;
        assert_eq!(ts, [r - 2000, r - 1000, r]);
        assert_eq!(out[0].measurement.power_w, Some(1.0));
        assert_eq!(g.held(), 0);
        // Latched: a later "unsynced" answer does not hold again.
        let t3 = t2 + Duration::from_secs(1);
        let out = g.offer(
            t3,
            vec![m(4.0)],
            false,
            (t3, right + Duration::from_secs(1)),
        );
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn hold_is_bounded() {
        let mut g = ClockGate::new(3);
        let t = Instant::now();
        for i in 0..5 {
            g.offer(t, vec![m(i as f64)], false, (t, SystemTime::now()));
        }
        assert_eq!((g.held(), g.dropped()), (3, 2));
        let out = g.offer(t, vec![], true, (t, SystemTime::now()));
        assert_eq!(out[0].measurement.power_w, Some(2.0));
    }

    #[test]
    fn restore_respects_the_bound() {
        let t = Instant::now();
        let mut g = ClockGate::new(3);
        g.offer(t, vec![m(10.0), m(11.0)], false, (t, SystemTime::now()));
        g.restore(vec![(t, m(1.0)), (t, m(2.0)), (t, m(3.0))]);
        assert_eq!((g.held(), g.dropped()), (3, 2));
        let out = g.offer(t, vec![], true, (t, SystemTime::now()));
        let p: Vec<_> = out.iter().map(|s| s.measurement.power_w.unwrap()).collect();
        assert_eq!(p, [3.0, 10.0, 11.0]);
    }

    #[test]
    fn unix_ms_before_epoch_is_negative() {
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_millis(5)), -5);
        assert_eq!(unix_ms(UNIX_EPOCH + Duration::from_millis(5)), 5);
    }
}
