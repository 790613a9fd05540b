//! The energy rule, stated once as plain code: the brute-force reference
//! that every faster path must agree with.
//!
//! For one meter, readings are ordered by [`ReadingKey`] `(ts_ms, epoch,
//! seq)`: the store's unique key is `(device, epoch, seq)`, so two readings
//! may share a timestamp, and the order among them is still total.
//!
//! Two chains run over the ordered readings, each over the readings that
//! carry its measurement (a reading without `energy_wh` is invisible to the
//! energy chain, one without `power_w` to the power chain; both count in
//! `samples`):
//!
//! - **Energy chain** — each pair of consecutive energy readings `a → b`,
//!   `dt = b.ts − a.ts`, `Δ = b.energy − a.energy` (see [`classify`]):
//!   - `Δ < 0`: counter reset; contributes nothing; `resets += 1` in the
//!     bucket holding `b`.
//!   - `Δ > 0` and `Δ · 3.6e6 > max_power_w · dt` (the average power over
//!     the pair exceeds the limit; always when `dt = 0`), or `Δ` not finite:
//!     glitch; contributes nothing; `flagged += 1` in the bucket holding `b`.
//!   - otherwise `Δ` is spread over the buckets that `[a.ts, b.ts]` overlaps,
//!     each getting `Δ · overlap / dt`.
//!   - whatever the class, if `dt ≤ max_gap_ms` the overlap of `[a.ts, b.ts]`
//!     with a bucket counts as covered time; `coverage = covered / length`.
//!     A longer pair still contributes its energy (the counter kept
//!     counting) but no coverage.
//! - **Power chain** — each power reading `p` in a bucket counts in `min`
//!   and `max`; for `avg` it is held from `p.ts` until the next power reading
//!   of the meter, for at most `max_gap_ms`, and never past the end of `p`'s
//!   bucket; the last power reading of the meter is held for `max_gap_ms`
//!   (cut at its bucket's end). `avg = Σ p·held / Σ held` over the power
//!   readings in the bucket, so `min ≤ avg ≤ max`. Every bucket with a power
//!   reading has `Σ held > 0` (its last power reading is held until the
//!   bucket end, the next reading, or `max_gap_ms ≥ 1` later). Buckets
//!   without power readings have no power statistics (`null`).

use ems_shared::Reading;
use serde::Serialize;
use thiserror::Error;

use super::buckets::Span;

/// Default limit on a pair's average power: 1 MW.
pub const DEFAULT_MAX_POWER_W: f64 = 1e6;

/// Default gap limit: 15 minutes.
pub const DEFAULT_MAX_GAP_MS: i64 = 15 * 60 * 1000;

/// Milliseconds per hour: 1 Wh is 3.6e6 W·ms.
const WMS_PER_WH: f64 = 3.6e6;

/// The total order of one meter's readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ReadingKey {
    /// Sample time, Unix ms.
    pub ts_ms: i64,
    /// The edge's process epoch.
    pub epoch: u64,
    /// Sequence within the epoch.
    pub seq: u64,
}

/// The part of a reading the energy rule looks at.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MeterReading {
    /// Position in the meter's order.
    pub key: ReadingKey,
    /// Energy counter, Wh (a non-finite value counts as absent).
    pub energy_wh: Option<f64>,
    /// Active power, W (a non-finite value counts as absent).
    pub power_w: Option<f64>,
}

impl MeterReading {
    /// The rule's view of a stored reading.
    pub fn from_reading(r: &Reading) -> MeterReading {
        MeterReading {
            key: ReadingKey {
                ts_ms: r.ts_ms,
                epoch: r.epoch,
                seq: r.seq,
            },
            energy_wh: r.energy_wh,
            power_w: r.power_w,
        }
    }

    /// Sample time, Unix ms.
    pub fn ts_ms(&self) -> i64 {
        self.key.ts_ms
    }

    /// The energy counter, if present and finite.
    pub fn energy(&self) -> Option<f64> {
        self.energy_wh.filter(|v| v.is_finite())
    }

    /// The power, if present and finite.
    pub fn power(&self) -> Option<f64> {
        self.power_w.filter(|v| v.is_finite())
    }
}

/// The hub's limits for the rule (`--max-power-w`, `--max-gap-ms`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Largest plausible average power over a pair, W.
    pub max_power_w: f64,
    /// Longest pair that still counts as coverage, ms.
    pub max_gap_ms: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_power_w: DEFAULT_MAX_POWER_W,
            max_gap_ms: DEFAULT_MAX_GAP_MS,
        }
    }
}

/// A limit that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LimitsError {
    /// `max_power_w` must be finite and positive.
    #[error("max power must be a positive number of watts")]
    MaxPower,
    /// `max_gap_ms` must be at least 1.
    #[error("max gap must be at least 1 ms")]
    MaxGap,
}

impl Limits {
    /// Validated limits.
    pub fn new(max_power_w: f64, max_gap_ms: i64) -> Result<Limits, LimitsError> {
        if !(max_power_w.is_finite() && max_power_w > 0.0) {
            return Err(LimitsError::MaxPower);
        }
        if max_gap_ms < 1 {
            return Err(LimitsError::MaxGap);
        }
        Ok(Limits {
            max_power_w,
            max_gap_ms,
        })
    }
}

/// What one pair of consecutive energy readings contributes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pair {
    /// Plausible: this many Wh, spread over the pair's interval.
    Counted(f64),
    /// The counter went backwards.
    Reset,
    /// An implausible jump (average power above the limit).
    Glitch,
}

/// Classifies the pair `earlier_wh → later_wh` that spans `dt_ms`.
pub fn classify(earlier_wh: f64, later_wh: f64, dt_ms: i64, limits: &Limits) -> Pair {
    let delta = later_wh - earlier_wh;
    if !delta.is_finite() {
        Pair::Glitch
    } else if delta < 0.0 {
        Pair::Reset
    } else if delta > 0.0 && (dt_ms <= 0 || delta * WMS_PER_WH > limits.max_power_w * dt_ms as f64)
    {
        Pair::Glitch
    } else {
        Pair::Counted(delta)
    }
}

/// Power statistics of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PowerStats {
    /// Smallest power reading, W.
    pub min: f64,
    /// Time-weighted mean (see the module docs), W.
    pub avg: f64,
    /// Largest power reading, W.
    pub max: f64,
}

/// One bucket of one meter, as the energy endpoint answers it (field order
/// is the JSON order).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BucketResult {
    /// Bucket start, Unix ms.
    pub start_ms: i64,
    /// Bucket end (exclusive), Unix ms.
    pub end_ms: i64,
    /// Energy attributed to the bucket, Wh.
    pub energy_wh: f64,
    /// Readings with `ts` in the bucket.
    pub samples: u64,
    /// Fraction of the bucket covered by pairs within the gap limit.
    pub coverage: f64,
    /// Counter resets whose later reading is in the bucket.
    pub resets: u64,
    /// Glitches whose later reading is in the bucket.
    pub flagged: u64,
    /// Power statistics; `null` when the bucket has no power reading.
    pub power_w: Option<PowerStats>,
}

/// Running sums for one bucket, shared by every way of computing it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Acc {
    pub span: Span,
    pub energy_wh: f64,
    pub samples: u64,
    pub covered_ms: i64,
    pub resets: u64,
    pub flagged: u64,
    /// `(min, max)` of the power readings, once there is one.
    pub power_range: Option<(f64, f64)>,
    /// Σ power × held time, W·ms.
    pub power_wms: f64,
    /// Σ held time, ms.
    pub held_ms: i64,
}

impl Acc {
    pub fn new(span: Span) -> Acc {
        Acc {
            span,
            energy_wh: 0.0,
            samples: 0,
            covered_ms: 0,
            resets: 0,
            flagged: 0,
            power_range: None,
            power_wms: 0.0,
            held_ms: 0,
        }
    }

    pub fn power_extremes(&mut self, min: f64, max: f64) {
        self.power_range = Some(match self.power_range {
            Some((lo, hi)) => (lo.min(min), hi.max(max)),
            None => (min, max),
        });
    }

    pub fn finish(&self) -> BucketResult {
        let len = self.span.len_ms();
        BucketResult {
            start_ms: self.span.start_ms,
            end_ms: self.span.end_ms,
            energy_wh: self.energy_wh,
            samples: self.samples,
            coverage: if len > 0 {
                self.covered_ms as f64 / len as f64
            } else {
                0.0
            },
            resets: self.resets,
            flagged: self.flagged,
            power_w: self.power_range.map(|(min, max)| PowerStats {
                min,
                // Rounding can push a weighted mean of equal values a hair
                // outside [min, max]; keep the documented invariant.
                avg: if self.held_ms > 0 {
                    (self.power_wms / self.held_ms as f64).clamp(min, max)
                } else {
                    min
                },
                max,
            }),
        }
    }
}

/// The rollup of one meter's readings (any order; they are sorted here)
/// over `buckets` (sorted, non-overlapping; need not be contiguous or
/// slot-aligned), straight from the rule. Readings outside the buckets
/// matter: they form the pairs that straddle the buckets' edges and end the
/// power hold of the readings inside.
pub fn rollup_brute(
    readings: &[MeterReading],
    buckets: &[Span],
    limits: &Limits,
) -> Vec<BucketResult> {
    let mut rs = readings.to_vec();
    rs.sort_by_key(|r| r.key);
    let mut acc: Vec<Acc> = buckets.iter().map(|&s| Acc::new(s)).collect();
    let holding = |ms: i64| -> Option<usize> {
        let i = buckets.partition_point(|b| b.end_ms <= ms);
        buckets.get(i).filter(|b| b.contains(ms)).map(|_| i)
    };

    for r in &rs {
        if let Some(i) = holding(r.ts_ms()) {
            acc[i].samples += 1;
        }
    }

    let energy: Vec<(i64, f64)> = rs
        .iter()
        .filter_map(|r| r.energy().map(|e| (r.ts_ms(), e)))
        .collect();
    for w in energy.windows(2) {
        let ((a_ts, a_wh), (b_ts, b_wh)) = (w[0], w[1]);
        let dt = b_ts - a_ts;
        let pair = classify(a_wh, b_wh, dt, limits);
        match pair {
            Pair::Reset => {
                if let Some(i) = holding(b_ts) {
                    acc[i].resets += 1;
                }
            }
            Pair::Glitch => {
                if let Some(i) = holding(b_ts) {
                    acc[i].flagged += 1;
                }
            }
            Pair::Counted(_) => {}
        }
        let first = buckets.partition_point(|b| b.end_ms <= a_ts);
        for a in acc[first..].iter_mut() {
            if a.span.start_ms >= b_ts {
                break;
            }
            let overlap = b_ts.min(a.span.end_ms) - a_ts.max(a.span.start_ms);
            if overlap <= 0 {
                continue;
            }
            if let Pair::Counted(delta) = pair {
                a.energy_wh += delta * (overlap as f64 / dt as f64);
            }
            if dt <= limits.max_gap_ms {
                a.covered_ms += overlap;
            }
        }
    }

    let power: Vec<(i64, f64)> = rs
        .iter()
        .filter_map(|r| r.power().map(|p| (r.ts_ms(), p)))
        .collect();
    for (n, &(ts, p)) in power.iter().enumerate() {
        let Some(i) = holding(ts) else { continue };
        let next = power.get(n + 1).map_or(i64::MAX, |&(t, _)| t);
        let end = next
            .min(ts.saturating_add(limits.max_gap_ms))
            .min(acc[i].span.end_ms);
        let held = end - ts;
        let a = &mut acc[i];
        a.power_extremes(p, p);
        a.power_wms += p * held as f64;
        a.held_ms += held;
    }

    acc.iter().map(Acc::finish).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn r(ts_ms: i64, seq: u64, energy: Option<f64>, power: Option<f64>) -> MeterReading {
        MeterReading {
            key: ReadingKey {
                ts_ms,
                epoch: 1,
                seq,
            },
            energy_wh: energy,
            power_w: power,
        }
    }

    fn span(start_ms: i64, end_ms: i64) -> Span {
        Span { start_ms, end_ms }
    }

    #[test]
    fn classify_worked_values() {
        let l = Limits::default();
        // 1 kWh over one hour is 1 kW.
        assert_eq!(
            classify(100.0, 1100.0, 3_600_000, &l),
            Pair::Counted(1000.0)
        );
        assert_eq!(classify(5.0, 5.0, 0, &l), Pair::Counted(0.0));
        assert_eq!(classify(5.0, 4.0, 1000, &l), Pair::Reset);
        assert_eq!(classify(5.0, 4.0, 0, &l), Pair::Reset);
        assert_eq!(classify(5.0, 6.0, 0, &l), Pair::Glitch);
        // Exactly 1 MW for one second is 277.77… Wh: allowed; a bit more is not.
        assert_eq!(
            classify(0.0, 1e6 / 3600.0, 1000, &l),
            Pair::Counted(1e6 / 3600.0)
        );
        assert_eq!(classify(0.0, 278.0, 1000, &l), Pair::Glitch);
        assert_eq!(classify(0.0, f64::INFINITY, 1000, &l), Pair::Glitch);
        assert_eq!(classify(0.0, f64::NAN, 1000, &l), Pair::Glitch);
        assert_eq!(Limits::new(0.0, 1), Err(LimitsError::MaxPower));
        assert_eq!(Limits::new(f64::NAN, 1), Err(LimitsError::MaxPower));
        assert_eq!(Limits::new(1.0, 0), Err(LimitsError::MaxGap));
        assert!(Limits::new(1.0, 1).is_ok());
    }

    #[test]
    fn energy_is_spread_in_proportion_to_time() {
        // 0 Wh at 00:50, 600 Wh at 01:20: 1/3 to the first hour, 2/3 to the
        // second; the 30-minute pair exceeds the 15-minute gap limit, so
        // no coverage.
        let h = 3_600_000;
        let rs = [
            r(50 * MIN, 0, Some(0.0), None),
            r(80 * MIN, 1, Some(600.0), None),
        ];
        let b = rollup_brute(&rs, &[span(0, h), span(h, 2 * h)], &Limits::default());
        assert!((b[0].energy_wh - 200.0).abs() < 1e-9);
        assert!((b[1].energy_wh - 400.0).abs() < 1e-9);
        assert_eq!((b[0].samples, b[1].samples), (1, 1));
        assert_eq!((b[0].coverage, b[1].coverage), (0.0, 0.0));
        assert_eq!(b[0].power_w, None);
        // With a 1-hour gap limit, 10 of 60 minutes and 20 of 60 are covered.
        let l = Limits::new(1e6, h).unwrap();
        let b = rollup_brute(&rs, &[span(0, h), span(h, 2 * h)], &l);
        assert!((b[0].coverage - 10.0 / 60.0).abs() < 1e-12);
        assert!((b[1].coverage - 20.0 / 60.0).abs() < 1e-12);
    }

    #[test]
    fn resets_glitches_and_missing_energy() {
        let h = 3_600_000;
        let rs = [
            r(0, 0, Some(1000.0), Some(10.0)),
            r(MIN, 1, None, Some(20.0)), // power only: no pair of its own
            r(2 * MIN, 2, Some(1010.0), None),
            r(3 * MIN, 3, Some(5.0), None),       // reset
            r(4 * MIN, 4, Some(1e9), None),       // glitch (way above 1 MW)
            r(5 * MIN, 5, Some(1e9 + 1.0), None), // plausible again
        ];
        let b = rollup_brute(&rs, &[span(0, h)], &Limits::default());
        let b = b[0];
        assert_eq!(b.samples, 6);
        assert_eq!(b.resets, 1);
        assert_eq!(b.flagged, 1);
        assert!((b.energy_wh - 11.0).abs() < 1e-6, "{}", b.energy_wh);
        // Pairs cover 0..5 min (all within the gap limit).
        assert!((b.coverage - 5.0 / 60.0).abs() < 1e-12);
        // Power: 10 W held 1 min, 20 W held 15 min (the last power reading).
        let p = b.power_w.unwrap();
        assert_eq!((p.min, p.max), (10.0, 20.0));
        assert!((p.avg - (10.0 + 20.0 * 15.0) / 16.0).abs() < 1e-12);
    }

    #[test]
    fn power_hold_is_cut_at_gap_and_bucket_end() {
        let h = 3_600_000;
        let rs = [
            r(0, 0, None, Some(100.0)),       // held 15 min (next is 40 min later)
            r(40 * MIN, 1, None, Some(0.0)),  // held 10 min (next at 50)
            r(50 * MIN, 2, None, Some(60.0)), // held 10 min: cut at the bucket end
            r(65 * MIN, 3, None, Some(7.0)),
        ];
        let b = rollup_brute(&rs, &[span(0, h), span(h, 2 * h)], &Limits::default());
        let p = b[0].power_w.unwrap();
        assert!((p.avg - (100.0 * 15.0 + 0.0 * 10.0 + 60.0 * 10.0) / 35.0).abs() < 1e-12);
        assert_eq!((p.min, p.max), (0.0, 100.0));
        assert_eq!(b[1].power_w.unwrap().avg, 7.0);
        // Readings at the same instant: the first is held 0 ms.
        let rs = [r(0, 0, None, Some(1.0)), r(0, 1, None, Some(3.0))];
        let p = rollup_brute(&rs, &[span(0, h)], &Limits::default())[0]
            .power_w
            .unwrap();
        assert_eq!((p.min, p.avg, p.max), (1.0, 3.0, 3.0));
    }

    #[test]
    fn order_among_equal_timestamps_is_epoch_then_seq() {
        let h = 3_600_000;
        let mut a = r(MIN, 9, Some(10.0), None);
        a.key.epoch = 1;
        let mut b = r(MIN, 0, Some(12.0), None);
        b.key.epoch = 2;
        let first = r(0, 0, Some(9.0), None);
        // Order: first(9) → a(10) → b(12): two plausible pairs… except the
        // equal-ts pair a → b is a jump at dt 0: a glitch.
        let out = rollup_brute(&[b, first, a], &[span(0, h)], &Limits::default());
        assert_eq!(out[0].flagged, 1);
        assert!((out[0].energy_wh - 1.0).abs() < 1e-12);
    }

    #[test]
    fn pairs_straddling_the_range_count_and_empty_buckets_show() {
        let h = 3_600_000;
        // Readings 30 min before and 30 min after a 2-hour range.
        let rs = [
            r(-30 * MIN, 0, Some(0.0), None),
            r(150 * MIN, 1, Some(3000.0), None),
        ];
        let b = rollup_brute(&rs, &[span(0, h), span(h, 2 * h)], &Limits::default());
        assert!((b[0].energy_wh - 1000.0).abs() < 1e-9);
        assert!((b[1].energy_wh - 1000.0).abs() < 1e-9);
        assert_eq!(b[0].samples, 0);
        assert_eq!(b[0].coverage, 0.0);
        let none = rollup_brute(&[], &[span(0, h)], &Limits::default());
        assert_eq!(
            none[0],
            BucketResult {
                start_ms: 0,
                end_ms: h,
                energy_wh: 0.0,
                samples: 0,
                coverage: 0.0,
                resets: 0,
                flagged: 0,
                power_w: None,
            }
        );
    }
}
