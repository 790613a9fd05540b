//! Property tests: the slot path equals the brute-force rule, the append
//! path equals recomputation (and survives the stored encoding), and
//! late/duplicate delivery plus the commit plan equals building from
//! scratch.
//!
//! Tolerance: counts, samples, coverage, power min/max and slots are
//! compared exactly (integers, or the same float operations in the same
//! order). `energy_wh` may differ by summation order only, so
//! `|slots − brute| ≤ 1e-9 · (1 + Σ|Δ| of the meter's counted pairs)`;
//! `power_w.avg` within `1e-9 · (1 + max |power|)`.
//!
//! `PROPTEST_CASES` overrides the number of cases (default 256, a few
//! seconds in a debug build).

use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;

use super::buckets::{buckets, slot_of, Bucket, Span, Zone, SLOT_MS};
use super::rule::{classify, rollup_brute, BucketResult, Limits, MeterReading, Pair, ReadingKey};
use super::slots::{build_slots, combine, plan_commit, Slot};

const MIN: i64 = 60_000;
const DAY: i64 = 24 * 60 * MIN;

const ZONES: [&str; 6] = [
    "UTC",
    "Europe/Berlin",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "America/St_Johns",
    "Australia/Lord_Howe",
];

/// Starting instants near interesting local boundaries (Unix ms).
const BASES: [i64; 8] = [
    1_774_735_200_000, // 2026-03-28T22:00Z, Berlin spring forward next night
    1_792_875_600_000, // 2026-10-24T21:00Z, Berlin fall back
    1_775_304_000_000, // 2026-04-04T12:00Z, Lord Howe fall back (30 min)
    1_791_028_800_000, // 2026-10-03T12:00Z, Lord Howe spring forward
    1_289_088_000_000, // 2010-11-07T00:00Z, St. John's 00:01 fall back
    1_268_524_800_000, // 2010-03-14T00:00Z, St. John's 00:01 spring forward
    1_781_049_600_000, // 2026-06-10T00:00Z, nothing special
    0,                 // 1970-01-01: ranges reach before the epoch
];

/// How the time advances to the next reading.
#[derive(Debug, Clone, Copy)]
enum Gap {
    Same,
    Ms(i64),
    ToNextSlot,
    ToNextUtcHour,
}

/// What happens to the meter's counter.
#[derive(Debug, Clone, Copy)]
enum Counter {
    Add(f64),
    Reset(f64),
    Glitch,
}

#[derive(Debug, Clone, Copy)]
struct Step {
    gap: Gap,
    counter: Counter,
    has_energy: bool,
    power: Option<f64>,
    new_epoch: bool,
}

fn gap() -> impl Strategy<Value = Gap> {
    prop_oneof![
        1 => Just(Gap::Same),
        6 => (1i64..5_000).prop_map(Gap::Ms),
        6 => (5_000i64..20 * MIN).prop_map(Gap::Ms),
        3 => prop_oneof![
            Just(1),
            Just(MIN),
            Just(MIN + 1),
            Just(15 * MIN),
            Just(15 * MIN + 1),
            Just(60 * MIN)
        ].prop_map(Gap::Ms),
        2 => (20 * MIN..3 * DAY).prop_map(Gap::Ms),
        2 => Just(Gap::ToNextSlot),
        1 => Just(Gap::ToNextUtcHour),
    ]
}

fn counter() -> impl Strategy<Value = Counter> {
    prop_oneof![
        1 => Just(Counter::Add(0.0)),
        12 => (0.0f64..60.0).prop_map(Counter::Add),
        1 => (0.0f64..10.0).prop_map(Counter::Reset),
        1 => Just(Counter::Glitch),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    (
        gap(),
        counter(),
        prop::bool::weighted(0.8),
        prop::option::weighted(0.8, -5_000.0f64..5_000.0),
        prop::bool::weighted(0.05),
    )
        .prop_map(|(gap, counter, has_energy, power, new_epoch)| Step {
            gap,
            counter,
            has_energy,
            power,
            new_epoch,
        })
}

fn limits() -> impl Strategy<Value = Limits> {
    (
        prop_oneof![Just(1e6), Just(1e5), Just(3e3)],
        prop_oneof![Just(15 * MIN), Just(MIN), Just(1), Just(2 * 60 * MIN)],
    )
        .prop_map(|(p, g)| Limits::new(p, g).unwrap())
}

/// One meter's readings in order, from a base instant and steps.
fn readings(base: i64, start_wh: f64, steps: &[Step]) -> Vec<MeterReading> {
    let (mut ts, mut wh, mut epoch, mut seq) = (base, start_wh, 1u64, 0u64);
    let mut out = Vec::with_capacity(steps.len());
    for (i, s) in steps.iter().enumerate() {
        if i > 0 {
            ts += match s.gap {
                Gap::Same => 0,
                Gap::Ms(ms) => ms,
                Gap::ToNextSlot => slot_of(ts) + SLOT_MS - ts,
                Gap::ToNextUtcHour => 60 * MIN - ts.rem_euclid(60 * MIN),
            };
            wh = match s.counter {
                Counter::Add(x) => wh + x,
                Counter::Reset(x) => x,
                Counter::Glitch => wh + 1e8,
            };
        }
        if s.new_epoch {
            epoch += 1;
            seq = 0;
        }
        out.push(MeterReading {
            key: ReadingKey {
                ts_ms: ts,
                epoch,
                seq,
            },
            energy_wh: s.has_energy.then_some(wh),
            power_w: s.power,
        });
        seq += 1;
    }
    out
}

/// The slots the endpoint's query returns for `range`: every slot inside,
/// plus the nearest slot with energy on either side.
fn queried(all: &[Slot], range: Span) -> Vec<Slot> {
    let before = all
        .iter()
        .rev()
        .find(|s| s.start_ms < range.start_ms && s.energy.is_some());
    let after = all
        .iter()
        .find(|s| s.start_ms >= range.end_ms && s.energy.is_some());
    before
        .into_iter()
        .chain(all.iter().filter(|s| range.contains(s.start_ms)))
        .chain(after)
        .copied()
        .collect()
}

fn energy_scale(rs: &[MeterReading], limits: &Limits) -> f64 {
    let mut sorted = rs.to_vec();
    sorted.sort_by_key(|r| r.key);
    let e: Vec<(i64, f64)> = sorted
        .iter()
        .filter_map(|r| r.energy().map(|v| (r.ts_ms(), v)))
        .collect();
    1.0 + e
        .windows(2)
        .map(
            |w| match classify(w[0].1, w[1].1, w[1].0 - w[0].0, limits) {
                Pair::Counted(d) => d.abs(),
                _ => 0.0,
            },
        )
        .sum::<f64>()
}

fn assert_same(
    got: &[BucketResult],
    want: &[BucketResult],
    energy_tol: f64,
    power_tol: f64,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        let ctx = format!("\n got {g:?}\nwant {w:?}");
        prop_assert_eq!((g.start_ms, g.end_ms), (w.start_ms, w.end_ms), "{}", ctx);
        prop_assert_eq!(g.samples, w.samples, "{}", ctx);
        prop_assert_eq!(g.resets, w.resets, "{}", ctx);
        prop_assert_eq!(g.flagged, w.flagged, "{}", ctx);
        prop_assert_eq!(g.coverage, w.coverage, "{}", ctx);
        prop_assert!((g.energy_wh - w.energy_wh).abs() <= energy_tol, "{}", ctx);
        match (g.power_w, w.power_w) {
            (None, None) => {}
            (Some(a), Some(b)) => {
                prop_assert_eq!((a.min, a.max), (b.min, b.max), "{}", ctx);
                prop_assert!((a.avg - b.avg).abs() <= power_tol, "{}", ctx);
                prop_assert!(a.min <= a.avg && a.avg <= a.max, "{}", ctx);
            }
            _ => prop_assert!(false, "power presence differs{}", ctx),
        }
    }
    Ok(())
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn slots_combine_equals_brute_force(
        base in prop::sample::select(&BASES[..]),
        start_wh in 0.0f64..1e6,
        steps in prop::collection::vec(step(), 0..120),
        limits in limits(),
        zone in prop::sample::select(&ZONES[..]),
        bucket in prop_oneof![Just(Bucket::Hour), Just(Bucket::Day), Just(Bucket::Month)],
        from_off in -2 * DAY..4 * DAY,
        len in 1i64..6 * DAY,
    ) {
        let rs = readings(base, start_wh, &steps);
        let zone = Zone::parse(zone).unwrap();
        let from = base + from_off;
        let spans = buckets(&zone, bucket, from, from + len).unwrap();
        prop_assert!(!spans.is_empty());
        prop_assert!(spans.iter().all(|s| s.is_slot_aligned()));
        let range = Span { start_ms: spans[0].start_ms, end_ms: spans[spans.len() - 1].end_ms };
        let slots = build_slots(&rs, &limits).unwrap();
        let want = rollup_brute(&rs, &spans, &limits);
        let max_p = rs.iter().filter_map(|r| r.power()).fold(0.0f64, |m, p| m.max(p.abs()));
        let (etol, ptol) = (1e-9 * energy_scale(&rs, &limits), 1e-9 * (1.0 + max_p));
        let got = combine(&queried(&slots, range), &spans, &limits).unwrap();
        assert_same(&got, &want, etol, ptol)?;
        // Extra slots outside the range change nothing.
        let got_all = combine(&slots, &spans, &limits).unwrap();
        assert_same(&got_all, &want, etol, ptol)?;
    }

    #[test]
    fn appending_equals_recomputing_each_slot(
        base in prop::sample::select(&BASES[..]),
        start_wh in 0.0f64..1e6,
        steps in prop::collection::vec(step(), 0..120),
        limits in limits(),
    ) {
        let rs = readings(base, start_wh, &steps);
        let built = build_slots(&rs, &limits).unwrap();
        let mut by_slot: BTreeMap<i64, Vec<MeterReading>> = BTreeMap::new();
        for r in &rs {
            by_slot.entry(slot_of(r.ts_ms())).or_default().push(*r);
        }
        let recomputed: Vec<Slot> = by_slot
            .values()
            .map(|rows| Slot::from_readings(rows, &limits).unwrap().unwrap())
            .collect();
        for s in &built {
            prop_assert_eq!(Slot::decode(s.start_ms, &s.encode()), Ok(*s));
        }
        prop_assert_eq!(built, recomputed);
    }

    #[test]
    fn late_and_duplicate_delivery_equals_building_from_scratch(
        base in prop::sample::select(&BASES[..]),
        start_wh in 0.0f64..1e6,
        steps in prop::collection::vec(step(), 0..120),
        limits in limits(),
        delivery in prop::collection::vec(
            (prop::option::weighted(0.3, 0usize..150), prop::bool::weighted(0.2),
             prop::bool::weighted(0.1)),
            120,
        ),
    ) {
        let rs = readings(base, start_wh, &steps);
        // Arrival order: most readings on time, some delayed (late).
        let mut order: Vec<(usize, usize)> = (0..rs.len())
            .map(|i| (i + delivery[i].0.unwrap_or(0), i))
            .collect();
        order.sort_unstable();
        // The store: unique (epoch, seq); the slot table keyed by start.
        let mut stored: BTreeMap<ReadingKey, MeterReading> = BTreeMap::new();
        let mut ids: HashSet<(u64, u64)> = HashSet::new();
        let mut table: BTreeMap<i64, Slot> = BTreeMap::new();
        let mut batch: Vec<MeterReading> = Vec::new();
        for (n, &(_, i)) in order.iter().enumerate() {
            let (_, end_batch, resend) = delivery[i];
            batch.push(rs[i]);
            if resend {
                // Delivered again (lost ack): the store ignores it.
                batch.push(rs[i]);
            }
            if !(end_batch || n + 1 == order.len()) {
                continue;
            }
            let mut inserted: Vec<MeterReading> = Vec::new();
            let mut duplicates: Vec<MeterReading> = Vec::new();
            for r in batch.drain(..) {
                if ids.insert((r.key.epoch, r.key.seq)) {
                    stored.insert(r.key, r);
                    inserted.push(r);
                } else {
                    duplicates.push(r);
                }
            }
            // Odd batches also hand the ignored duplicates to the plan:
            // they cost a recompute and change nothing.
            if n % 2 == 1 {
                inserted.extend(duplicates);
            }
            let tail = table.values().next_back().copied();
            let plan = plan_commit(tail, &mut inserted, &limits);
            for s in plan.upsert {
                table.insert(s.start_ms, s);
            }
            for start in plan.recompute {
                let rows: Vec<MeterReading> = stored
                    .range(ReadingKey { ts_ms: start, epoch: 0, seq: 0 }..)
                    .take_while(|(k, _)| k.ts_ms < start + SLOT_MS)
                    .map(|(_, r)| *r)
                    .collect();
                match Slot::from_readings(&rows, &limits).unwrap() {
                    Some(s) => { table.insert(start, s); }
                    None => { table.remove(&start); }
                }
            }
        }
        let want = build_slots(&rs, &limits).unwrap();
        let got: Vec<Slot> = table.into_values().collect();
        prop_assert_eq!(got, want);
    }
}
