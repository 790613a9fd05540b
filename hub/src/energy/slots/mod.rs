//! Pre-aggregation in 15-minute UTC slots, and the combination of slots into
//! local buckets that answers what [`rollup_brute`] answers (counts, samples,
//! coverage, power min/max identical; energy and mean power up to
//! floating-point summation order).
//!
//! A [`Slot`] summarises the readings of one meter whose `ts` falls into
//! `[start_ms, start_ms + SLOT_MS)`, and **only** those: the pairs inside it
//! (both readings in the slot) are aggregated; the pairs that straddle slot
//! edges are not stored but recomputed by [`combine`] from neighbouring
//! slots' first/last readings. Therefore:
//!
//! - a slot is a function of its own readings (and the [`Limits`]): a
//!   backfilled reading changes only the slot it falls into — never a
//!   neighbour — so a commit recomputes exactly [`slots_touched`] by its
//!   late readings, from the raw rows of those slots alone;
//! - a resent duplicate (not inserted by the store) changes nothing, and
//!   recomputing a slot twice gives the same slot;
//! - appending a reading after the meter's last one updates only the slot
//!   holding it ([`Slot::append`]: O(1), no allocation).
//!
//! Every local bucket boundary of a zone whose offset is a multiple of
//! 15 minutes lies on a slot edge (see [`super::buckets`]), so a bucket is a
//! whole number of slots.
//!
//! [`rollup_brute`]: super::rule::rollup_brute

use thiserror::Error;

mod encoding;

pub use encoding::SLOT_BYTES;

use super::buckets::{slot_of, Span, SLOT_MS};
use super::rule::{classify, Acc, BucketResult, Limits, MeterReading, Pair, ReadingKey};

/// One reading's time and value in a chain.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Point {
    /// Sample time, Unix ms.
    pub ts_ms: i64,
    /// Energy (Wh) or power (W).
    pub value: f64,
}

/// The energy chain inside one slot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EnergyAgg {
    /// First energy reading in the slot (ends the pair coming in).
    pub first: Point,
    /// Last energy reading in the slot (starts the pair going out).
    pub last: Point,
    /// Σ Δ of the counted pairs inside the slot, Wh.
    pub delta_wh: f64,
    /// Σ dt of the pairs inside the slot within the gap limit, ms.
    pub covered_ms: i64,
    /// Resets among the pairs inside the slot.
    pub resets: u32,
    /// Glitches among the pairs inside the slot.
    pub flagged: u32,
}

/// The power chain inside one slot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PowerAgg {
    /// First power reading in the slot (ends the hold of the previous one).
    pub first: Point,
    /// Last power reading in the slot (its hold is settled by [`combine`]).
    pub last: Point,
    /// Smallest power, W.
    pub min_w: f64,
    /// Largest power, W.
    pub max_w: f64,
    /// Σ power × held time of every power reading but the last, W·ms.
    pub held_wms: f64,
    /// Σ held time of every power reading but the last, ms.
    pub held_ms: i64,
}

/// What one meter's readings in one 15-minute UTC slot contribute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slot {
    /// Slot start, Unix ms, a multiple of [`SLOT_MS`].
    pub start_ms: i64,
    /// Readings in the slot.
    pub samples: u32,
    /// Key of the last reading in the slot: tells an in-order append from a
    /// late reading.
    pub last: ReadingKey,
    /// Present when the slot has an energy reading.
    pub energy: Option<EnergyAgg>,
    /// Present when the slot has a power reading.
    pub power: Option<PowerAgg>,
}

/// Why [`Slot::append`] did not take a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum AppendRefused {
    /// The reading is not after the slot's last reading (late, or a
    /// duplicate key): recompute its slot from the stored rows.
    #[error("reading is not after the last one")]
    NotAfterLast,
    /// The reading belongs to a later slot: start that one with
    /// [`Slot::start`].
    #[error("reading belongs to a later slot")]
    LaterSlot,
}

/// Input that [`Slot::from_readings`] or [`combine`] cannot use.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SlotError {
    /// Readings not strictly increasing by `(ts, epoch, seq)`.
    #[error("readings are not in (ts, epoch, seq) order")]
    Unordered,
    /// A reading outside the slot of the first one.
    #[error("readings span more than one slot")]
    MixedSlots,
    /// Slots not strictly increasing, or not on the slot grid.
    #[error("slots are not in order on the 15-minute grid")]
    BadSlots,
    /// Buckets not contiguous and increasing.
    #[error("buckets are not contiguous")]
    BadBuckets,
    /// A stored slot that [`Slot::decode`] cannot read.
    #[error("stored slot is malformed: {0}")]
    BadEncoding(&'static str),
    /// A bucket edge off the slot grid (an offset that is not a multiple of
    /// 15 minutes): answer from raw rows with `rollup_brute`.
    #[error("bucket {start_ms}..{end_ms} is not on the 15-minute slot grid")]
    Unaligned {
        /// Bucket start.
        start_ms: i64,
        /// Bucket end.
        end_ms: i64,
    },
}

impl Slot {
    /// A slot holding just `r`.
    pub fn start(r: &MeterReading) -> Slot {
        let point = |value| Point {
            ts_ms: r.ts_ms(),
            value,
        };
        Slot {
            start_ms: slot_of(r.ts_ms()),
            samples: 1,
            last: r.key,
            energy: r.energy().map(|wh| EnergyAgg {
                first: point(wh),
                last: point(wh),
                delta_wh: 0.0,
                covered_ms: 0,
                resets: 0,
                flagged: 0,
            }),
            power: r.power().map(|w| PowerAgg {
                first: point(w),
                last: point(w),
                min_w: w,
                max_w: w,
                held_wms: 0.0,
                held_ms: 0,
            }),
        }
    }

    /// Adds `r`, which must come after every reading already in the slot and
    /// fall into it: the writer's hot path (O(1), no allocation).
    pub fn append(&mut self, r: &MeterReading, limits: &Limits) -> Result<(), AppendRefused> {
        if r.key <= self.last {
            return Err(AppendRefused::NotAfterLast);
        }
        if slot_of(r.ts_ms()) != self.start_ms {
            return Err(AppendRefused::LaterSlot);
        }
        let ts = r.ts_ms();
        self.samples = self.samples.saturating_add(1);
        self.last = r.key;
        if let Some(wh) = r.energy() {
            match &mut self.energy {
                Some(e) => {
                    let dt = ts - e.last.ts_ms;
                    match classify(e.last.value, wh, dt, limits) {
                        Pair::Counted(delta) => e.delta_wh += delta,
                        Pair::Reset => e.resets = e.resets.saturating_add(1),
                        Pair::Glitch => e.flagged = e.flagged.saturating_add(1),
                    }
                    if dt <= limits.max_gap_ms {
                        e.covered_ms += dt;
                    }
                    e.last = Point {
                        ts_ms: ts,
                        value: wh,
                    };
                }
                None => {
                    let p = Point {
                        ts_ms: ts,
                        value: wh,
                    };
                    self.energy = Some(EnergyAgg {
                        first: p,
                        last: p,
                        delta_wh: 0.0,
                        covered_ms: 0,
                        resets: 0,
                        flagged: 0,
                    });
                }
            }
        }
        if let Some(w) = r.power() {
            match &mut self.power {
                Some(p) => {
                    let held = (ts - p.last.ts_ms).min(limits.max_gap_ms);
                    p.held_wms += p.last.value * held as f64;
                    p.held_ms += held;
                    p.min_w = p.min_w.min(w);
                    p.max_w = p.max_w.max(w);
                    p.last = Point {
                        ts_ms: ts,
                        value: w,
                    };
                }
                None => {
                    let pt = Point {
                        ts_ms: ts,
                        value: w,
                    };
                    self.power = Some(PowerAgg {
                        first: pt,
                        last: pt,
                        min_w: w,
                        max_w: w,
                        held_wms: 0.0,
                        held_ms: 0,
                    });
                }
            }
        }
        Ok(())
    }

    /// Recomputes a slot from its stored rows, ordered by `(ts, epoch, seq)`
    /// (`SELECT … WHERE ts >= slot AND ts < slot + 15 min ORDER BY ts,
    /// epoch, seq`). No neighbouring reading is needed: pairs that straddle
    /// the slot's edges are not part of it. `Ok(None)`: no readings, so no
    /// slot (delete its row).
    pub fn from_readings(
        rows: &[MeterReading],
        limits: &Limits,
    ) -> Result<Option<Slot>, SlotError> {
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let start_ms = slot_of(first.ts_ms());
        if rows.windows(2).any(|w| w[0].key >= w[1].key) {
            return Err(SlotError::Unordered);
        }
        if rows.iter().any(|r| slot_of(r.ts_ms()) != start_ms) {
            return Err(SlotError::MixedSlots);
        }
        let chain = |value: fn(&MeterReading) -> Option<f64>| -> Vec<Point> {
            rows.iter()
                .filter_map(|r| {
                    value(r).map(|v| Point {
                        ts_ms: r.ts_ms(),
                        value: v,
                    })
                })
                .collect()
        };
        let energy_points = chain(MeterReading::energy);
        let energy = match (energy_points.first(), energy_points.last()) {
            (Some(&first), Some(&last)) => {
                let mut e = EnergyAgg {
                    first,
                    last,
                    delta_wh: 0.0,
                    covered_ms: 0,
                    resets: 0,
                    flagged: 0,
                };
                for w in energy_points.windows(2) {
                    let dt = w[1].ts_ms - w[0].ts_ms;
                    match classify(w[0].value, w[1].value, dt, limits) {
                        Pair::Counted(delta) => e.delta_wh += delta,
                        Pair::Reset => e.resets += 1,
                        Pair::Glitch => e.flagged += 1,
                    }
                    if dt <= limits.max_gap_ms {
                        e.covered_ms += dt;
                    }
                }
                Some(e)
            }
            _ => None,
        };
        let power_points = chain(MeterReading::power);
        let power = match (power_points.first(), power_points.last()) {
            (Some(&first), Some(&last)) => {
                let values = power_points.iter().map(|p| p.value);
                let mut p = PowerAgg {
                    first,
                    last,
                    min_w: values.clone().fold(f64::INFINITY, f64::min),
                    max_w: values.fold(f64::NEG_INFINITY, f64::max),
                    held_wms: 0.0,
                    held_ms: 0,
                };
                for w in power_points.windows(2) {
                    let held = (w[1].ts_ms - w[0].ts_ms).min(limits.max_gap_ms);
                    p.held_wms += w[0].value * held as f64;
                    p.held_ms += held;
                }
                Some(p)
            }
            _ => None,
        };
        Ok(Some(Slot {
            start_ms,
            samples: u32::try_from(rows.len()).unwrap_or(u32::MAX),
            last: rows[rows.len() - 1].key,
            energy,
            power,
        }))
    }
}

/// Builds the slots of one meter from all its readings in order (a rebuild,
/// or a meter's first commit), through the append path.
pub fn build_slots(readings: &[MeterReading], limits: &Limits) -> Result<Vec<Slot>, SlotError> {
    let mut out: Vec<Slot> = Vec::new();
    for r in readings {
        match out.last_mut().map(|s| s.append(r, limits)) {
            Some(Ok(())) => {}
            None | Some(Err(AppendRefused::LaterSlot)) => out.push(Slot::start(r)),
            Some(Err(AppendRefused::NotAfterLast)) => return Err(SlotError::Unordered),
        }
    }
    Ok(out)
}

/// The distinct slots holding the given reading times, ascending: the slots
/// a commit must recompute for its late readings. Neighbours never need
/// recomputing (slots hold no straddling pair).
pub fn slots_touched(ts_ms: impl IntoIterator<Item = i64>) -> Vec<i64> {
    let mut v: Vec<i64> = ts_ms.into_iter().map(slot_of).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// What one commit does to one meter's slot table.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CommitPlan {
    /// Slots to upsert as they are (in-order appends; the first may be the
    /// updated tail).
    pub upsert: Vec<Slot>,
    /// Slot starts to recompute from the stored rows with
    /// [`Slot::from_readings`] after the insert, ascending (upsert the
    /// result, or delete the row when there is none).
    pub recompute: Vec<i64>,
}

/// Plans one commit for one meter: `tail` is the meter's latest stored
/// slot (its last reading is the meter's last), `inserted` the readings the
/// store actually inserted in this commit (duplicates the store ignored must
/// not be passed; passing them costs a recompute but changes nothing),
/// sorted here. Readings after the tail's last one are appended in memory;
/// the others mark their slot for recomputation, which then supersedes any
/// append into the same slot.
pub fn plan_commit(
    tail: Option<Slot>,
    inserted: &mut [MeterReading],
    limits: &Limits,
) -> CommitPlan {
    inserted.sort_unstable_by_key(|r| r.key);
    let mut plan = CommitPlan::default();
    let mut late = Vec::new();
    let mut current = tail;
    let mut current_changed = false;
    for r in inserted.iter() {
        let Some(slot) = current.as_mut() else {
            current = Some(Slot::start(r));
            current_changed = true;
            continue;
        };
        match slot.append(r, limits) {
            Ok(()) => current_changed = true,
            Err(AppendRefused::NotAfterLast) => late.push(r.ts_ms()),
            Err(AppendRefused::LaterSlot) => {
                if current_changed {
                    plan.upsert.push(*slot);
                }
                *slot = Slot::start(r);
                current_changed = true;
            }
        }
    }
    if let (Some(slot), true) = (current, current_changed) {
        plan.upsert.push(slot);
    }
    plan.recompute = slots_touched(late);
    plan.upsert
        .retain(|s| plan.recompute.binary_search(&s.start_ms).is_err());
    plan
}

/// Combines one meter's slots into `buckets`.
///
/// `buckets` must be contiguous and slot-aligned ([`SlotError::Unaligned`]
/// otherwise: answer those from raw rows with `rollup_brute`). `slots` must
/// be in order and hold every slot of the meter inside the buckets, plus —
/// when they exist — the nearest slot before the first bucket that has an
/// energy reading and the nearest slot at or after the last bucket's end
/// that has one (they close the pairs straddling the range's edges). More
/// slots outside the range do no harm.
pub fn combine(
    slots: &[Slot],
    buckets: &[Span],
    limits: &Limits,
) -> Result<Vec<BucketResult>, SlotError> {
    for b in buckets {
        if b.start_ms >= b.end_ms {
            return Err(SlotError::BadBuckets);
        }
        if !b.is_slot_aligned() {
            return Err(SlotError::Unaligned {
                start_ms: b.start_ms,
                end_ms: b.end_ms,
            });
        }
    }
    if buckets.windows(2).any(|w| w[0].end_ms != w[1].start_ms) {
        return Err(SlotError::BadBuckets);
    }
    if slots.iter().any(|s| s.start_ms.rem_euclid(SLOT_MS) != 0)
        || slots.windows(2).any(|w| w[0].start_ms >= w[1].start_ms)
    {
        return Err(SlotError::BadSlots);
    }

    let mut acc: Vec<Acc> = buckets.iter().map(|&s| Acc::new(s)).collect();
    // The last energy reading so far with the first bucket that can hold
    // it, and the last power reading whose hold is not settled yet with its
    // bucket (a slot lies inside one bucket, so a slot's bucket is its
    // readings' bucket).
    let mut prev_energy: Option<(Point, usize)> = None;
    let mut open_power: Option<(Point, Option<usize>)> = None;
    // Slots are sorted, so their bucket index only grows.
    let mut cursor = 0usize;
    for s in slots {
        while cursor < buckets.len() && buckets[cursor].end_ms <= s.start_ms {
            cursor += 1;
        }
        let here = buckets
            .get(cursor)
            .filter(|b| b.contains(s.start_ms))
            .map(|_| cursor);
        if let Some(i) = here {
            acc[i].samples += u64::from(s.samples);
        }
        if let Some(e) = &s.energy {
            if let Some((a, from)) = prev_energy {
                let pair = straddle(&mut acc[from..], &buckets[from..], a, e.first, limits);
                if let Some(i) = here {
                    match pair {
                        Pair::Reset => acc[i].resets += 1,
                        Pair::Glitch => acc[i].flagged += 1,
                        Pair::Counted(_) => {}
                    }
                }
            }
            if let Some(i) = here {
                let a = &mut acc[i];
                a.energy_wh += e.delta_wh;
                a.covered_ms += e.covered_ms;
                a.resets += u64::from(e.resets);
                a.flagged += u64::from(e.flagged);
            }
            prev_energy = Some((e.last, cursor));
        }
        if let Some(p) = &s.power {
            if let Some((open, i)) = open_power {
                settle(&mut acc, i, open, Some(p.first.ts_ms), limits);
            }
            if let Some(i) = here {
                let a = &mut acc[i];
                a.power_extremes(p.min_w, p.max_w);
                a.power_wms += p.held_wms;
                a.held_ms += p.held_ms;
            }
            open_power = Some((p.last, here));
        }
    }
    if let Some((open, i)) = open_power {
        settle(&mut acc, i, open, None, limits);
    }
    Ok(acc.iter().map(Acc::finish).collect())
}

/// Spreads the pair `a → b`, whose readings lie in different slots, over
/// `buckets` (which start no later than the bucket holding `a`); returns
/// the pair's class.
fn straddle(acc: &mut [Acc], buckets: &[Span], a: Point, b: Point, limits: &Limits) -> Pair {
    let dt = b.ts_ms - a.ts_ms;
    let pair = classify(a.value, b.value, dt, limits);
    let covered = dt <= limits.max_gap_ms;
    if !covered && !matches!(pair, Pair::Counted(_)) {
        return pair;
    }
    for (span, acc) in buckets.iter().zip(acc.iter_mut()) {
        if span.start_ms >= b.ts_ms {
            break;
        }
        let overlap = b.ts_ms.min(span.end_ms) - a.ts_ms.max(span.start_ms);
        if overlap <= 0 {
            continue;
        }
        if let Pair::Counted(delta) = pair {
            acc.energy_wh += delta * (overlap as f64 / dt as f64);
        }
        if covered {
            acc.covered_ms += overlap;
        }
    }
    pair
}

/// Settles the hold of a slot's last power reading once the next power
/// reading (if any) is known.
fn settle(acc: &mut [Acc], bucket: Option<usize>, p: Point, next_ts: Option<i64>, limits: &Limits) {
    let Some(i) = bucket else { return };
    let end = next_ts
        .unwrap_or(i64::MAX)
        .min(p.ts_ms.saturating_add(limits.max_gap_ms))
        .min(acc[i].span.end_ms);
    let held = end - p.ts_ms;
    acc[i].power_wms += p.value * held as f64;
    acc[i].held_ms += held;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::energy::rule::rollup_brute;

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

    fn hours(n: i64) -> Vec<Span> {
        (0..n)
            .map(|i| Span {
                start_ms: i * 60 * MIN,
                end_ms: (i + 1) * 60 * MIN,
            })
            .collect()
    }

    #[test]
    fn append_matches_from_readings_on_a_worked_example() {
        let l = Limits::default();
        let rs = [
            r(0, 0, Some(10.0), Some(100.0)),
            r(MIN, 1, Some(11.0), None),
            r(2 * MIN, 2, None, Some(300.0)),
            r(3 * MIN, 3, Some(2.0), Some(200.0)), // reset
        ];
        let mut s = Slot::start(&rs[0]);
        for x in &rs[1..] {
            s.append(x, &l).unwrap();
        }
        assert_eq!(Some(s), Slot::from_readings(&rs, &l).unwrap());
        assert_eq!(s.samples, 4);
        assert_eq!(s.last, rs[3].key);
        let e = s.energy.unwrap();
        assert_eq!(
            (e.delta_wh, e.covered_ms, e.resets, e.flagged),
            (1.0, 3 * MIN, 1, 0)
        );
        assert_eq!(
            e.first,
            Point {
                ts_ms: 0,
                value: 10.0
            }
        );
        assert_eq!(
            e.last,
            Point {
                ts_ms: 3 * MIN,
                value: 2.0
            }
        );
        let p = s.power.unwrap();
        assert_eq!((p.min_w, p.max_w), (100.0, 300.0));
        // 100 W held 2 min, 300 W held 1 min; 200 W is settled by combine.
        assert_eq!(p.held_ms, 3 * MIN);
        assert_eq!(p.held_wms, 100.0 * 2.0 * MIN as f64 + 300.0 * MIN as f64);
    }

    #[test]
    fn append_refuses_late_readings_and_other_slots() {
        let l = Limits::default();
        let mut s = Slot::start(&r(MIN, 5, Some(1.0), None));
        let before = s;
        assert_eq!(
            s.append(&r(MIN, 5, Some(1.0), None), &l),
            Err(AppendRefused::NotAfterLast)
        );
        assert_eq!(
            s.append(&r(0, 9, Some(1.0), None), &l),
            Err(AppendRefused::NotAfterLast)
        );
        assert_eq!(
            s.append(&r(SLOT_MS, 6, Some(2.0), None), &l),
            Err(AppendRefused::LaterSlot)
        );
        assert_eq!(s, before);
        assert_eq!(Slot::from_readings(&[], &l), Ok(None));
        let two = [r(MIN, 2, None, Some(1.0)), r(MIN, 1, None, Some(1.0))];
        assert_eq!(Slot::from_readings(&two, &l), Err(SlotError::Unordered));
        let two = [r(MIN, 1, None, Some(1.0)), r(SLOT_MS, 2, None, Some(1.0))];
        assert_eq!(Slot::from_readings(&two, &l), Err(SlotError::MixedSlots));
    }

    #[test]
    fn combine_spreads_a_long_gap_like_the_rule() {
        let l = Limits::default();
        // Offline from 00:50 to 02:20: 900 Wh over 90 minutes, 10 Wh/min.
        let rs = [
            r(40 * MIN, 0, Some(0.0), Some(10.0)),
            r(50 * MIN, 1, Some(100.0), Some(20.0)),
            r(140 * MIN, 2, Some(1000.0), Some(30.0)),
            r(150 * MIN, 3, Some(1100.0), None),
        ];
        let slots = build_slots(&rs, &l).unwrap();
        let got = combine(&slots, &hours(3), &l).unwrap();
        assert_eq!(got, rollup_brute(&rs, &hours(3), &l));
        assert!((got[0].energy_wh - 200.0).abs() < 1e-9);
        assert!((got[1].energy_wh - 600.0).abs() < 1e-9);
        assert!((got[2].energy_wh - 300.0).abs() < 1e-9);
        assert_eq!(got[1].coverage, 0.0);
        assert_eq!(got[1].samples, 0);
    }

    #[test]
    fn combine_refuses_bad_input() {
        let l = Limits::default();
        let off_grid = [Span {
            start_ms: 60_000,
            end_ms: 60 * MIN,
        }];
        assert_eq!(
            combine(&[], &off_grid, &l),
            Err(SlotError::Unaligned {
                start_ms: 60_000,
                end_ms: 60 * MIN
            })
        );
        let mut gap = hours(3);
        gap.remove(1);
        assert_eq!(combine(&[], &gap, &l), Err(SlotError::BadBuckets));
        let s = Slot::start(&r(0, 0, Some(1.0), None));
        assert_eq!(combine(&[s, s], &hours(1), &l), Err(SlotError::BadSlots));
        assert_eq!(combine(&[], &[], &l), Ok(vec![]));
    }

    #[test]
    fn commit_plan_appends_in_order_and_recomputes_late_slots() {
        let l = Limits::default();
        let tail = Slot::start(&r(SLOT_MS + MIN, 10, Some(5.0), None));
        // One late reading into an older slot, two in order (tail, next slot).
        let mut batch = [
            r(SLOT_MS + 14 * MIN, 12, Some(6.0), None),
            r(MIN, 1, Some(1.0), None),
            r(2 * SLOT_MS, 13, Some(7.0), None),
        ];
        let plan = plan_commit(Some(tail), &mut batch, &l);
        assert_eq!(plan.recompute, vec![0]);
        assert_eq!(
            plan.upsert.iter().map(|s| s.start_ms).collect::<Vec<_>>(),
            vec![SLOT_MS, 2 * SLOT_MS]
        );
        assert_eq!(plan.upsert[0].samples, 2);
        // A late reading into the tail's own slot recomputes the tail instead.
        let mut batch = [
            r(SLOT_MS, 3, Some(4.0), None),
            r(SLOT_MS + 2 * MIN, 11, Some(6.0), None),
        ];
        let plan = plan_commit(Some(tail), &mut batch, &l);
        assert_eq!(plan.recompute, vec![SLOT_MS]);
        assert!(plan.upsert.is_empty());
        // Nothing inserted: nothing to do.
        assert_eq!(plan_commit(Some(tail), &mut [], &l), CommitPlan::default());
        // First readings of a meter.
        let mut batch = [r(MIN, 1, None, Some(1.0)), r(0, 0, None, Some(2.0))];
        let plan = plan_commit(None, &mut batch, &l);
        assert_eq!(plan.upsert.len(), 1);
        assert_eq!(plan.upsert[0].samples, 2);
        assert!(plan.recompute.is_empty());
    }

    #[test]
    fn encoding_round_trips_and_refuses_garbage() {
        let l = Limits::default();
        let rs = [
            r(SLOT_MS + 1, 0, Some(10.0), Some(-100.5)),
            r(SLOT_MS + MIN, 1, Some(11.0), None),
            r(SLOT_MS + 2 * MIN, 2, None, Some(300.0)),
            r(SLOT_MS + 3 * MIN, 3, Some(2.0), Some(200.0)),
        ];
        for n in 1..=rs.len() {
            let s = Slot::from_readings(&rs[..n], &l).unwrap().unwrap();
            let bytes = s.encode();
            assert_eq!(Slot::decode(SLOT_MS, &bytes), Ok(s));
        }
        let only_power = Slot::start(&r(5, 0, None, Some(1.0)));
        assert_eq!(Slot::decode(0, &only_power.encode()), Ok(only_power));
        let bytes = Slot::start(&rs[0]).encode();
        assert_eq!(bytes[0], 1, "format byte");
        assert_eq!(bytes[1], 3, "energy and power present");
        assert!(Slot::decode(SLOT_MS, &bytes[..149]).is_err());
        assert!(Slot::decode(0, &bytes).is_err(), "wrong slot");
        assert!(Slot::decode(SLOT_MS + 1, &bytes).is_err(), "off the grid");
        let mut other = bytes;
        other[0] = 2;
        assert!(Slot::decode(SLOT_MS, &other).is_err());
        assert!(Slot::decode(SLOT_MS, &[0u8; SLOT_BYTES]).is_err());
    }

    #[test]
    fn slots_touched_is_sorted_and_distinct() {
        assert_eq!(
            slots_touched([SLOT_MS + 5, 3, -1, SLOT_MS, 0]),
            vec![-SLOT_MS, 0, SLOT_MS]
        );
    }
}
