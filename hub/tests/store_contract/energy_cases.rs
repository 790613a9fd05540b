//! Contract cases for the energy side of a store ([`EnergyStore`]): flags,
//! slots kept by the writer equal to the brute-force rule over the raw
//! rows (randomized, with late and resent readings), local days across DST
//! and in half- and quarter-hour zones, the slot rebuild, export paging.
//! Run per backend by `backend_suite!` in `store_contract.rs`.

use std::sync::Arc;

use ems_hub::energy::buckets::{buckets, Bucket, Span, Zone};
use ems_hub::energy::flags::{COUNTER_RESET, ENERGY_GLITCH, FREQUENCY_RANGE, POWER_MISMATCH};
use ems_hub::energy::rule::{rollup_brute, BucketResult, Limits, MeterReading, ReadingKey};
use ems_hub::metrics::FlagCounts;
use ems_hub::store::energy::{rollup, Prepared};
use ems_hub::store::{QuarantineRow, Row, Store, StoreError};
use ems_shared::Reading;

use super::Fixture;

const MIN: i64 = 60_000;
const H: i64 = 60 * MIN;

fn at(s: &str) -> i64 {
    s.parse::<jiff::Timestamp>().unwrap().as_millisecond()
}

/// A reading of `device`/`meter` (epoch 1).
fn rrow(
    device: &str,
    meter: &str,
    seq: u64,
    ts_ms: i64,
    energy: Option<f64>,
    power: Option<f64>,
) -> Row {
    Row {
        device_id: Arc::from(device),
        received_at_ms: ts_ms,
        reading: Reading {
            epoch: 1,
            seq,
            ts_ms,
            meter: meter.into(),
            energy_wh: energy,
            power_w: power,
            ..Default::default()
        },
    }
}

/// The answer of the store's rollup for one meter.
fn meter_answer(
    s: &mut dyn Store,
    device: &str,
    zone: &str,
    b: Bucket,
    from: i64,
    to: i64,
    meter: &str,
) -> Vec<BucketResult> {
    let z = Zone::parse(zone).unwrap();
    let spans = buckets(&z, b, from, to).unwrap();
    let a = rollup(s, device, z.name(), b, &spans).unwrap();
    assert_eq!(a.device_id, device);
    assert_eq!(a.tz, z.name());
    a.meters
        .into_iter()
        .find(|m| m.meter == meter)
        .map(|m| m.buckets)
        .unwrap_or_else(|| panic!("meter {meter} missing"))
}

/// Compares two rollups: counts and coverage exactly, energy and mean
/// power up to summation order.
fn assert_close(
    got: &[BucketResult],
    want: &[BucketResult],
    energy_scale: f64,
    power_scale: f64,
    what: &str,
) {
    assert_eq!(got.len(), want.len(), "{what}: bucket count");
    for (g, w) in got.iter().zip(want) {
        let ctx = format!("{what}: bucket {}..{}", w.start_ms, w.end_ms);
        assert_eq!((g.start_ms, g.end_ms), (w.start_ms, w.end_ms), "{ctx}");
        assert_eq!(
            (g.samples, g.resets, g.flagged, g.coverage),
            (w.samples, w.resets, w.flagged, w.coverage),
            "{ctx}"
        );
        assert!(
            (g.energy_wh - w.energy_wh).abs() <= 1e-9 * (1.0 + energy_scale),
            "{ctx}: energy {} vs {}",
            g.energy_wh,
            w.energy_wh
        );
        match (g.power_w, w.power_w) {
            (None, None) => {}
            (Some(a), Some(b)) => {
                assert_eq!((a.min, a.max), (b.min, b.max), "{ctx}");
                assert!(
                    (a.avg - b.avg).abs() <= 1e-9 * (1.0 + power_scale),
                    "{ctx}: avg {} vs {}",
                    a.avg,
                    b.avg
                );
            }
            other => panic!("{ctx}: power {other:?}"),
        }
    }
}

pub fn flags_are_stored_counted_and_listed(mut f: Fixture) {
    let counts = Arc::new(FlagCounts::default());
    f.store
        .prepare_energy(Limits::default(), Some(counts.clone()))
        .unwrap();
    let t0 = at("2026-05-01T10:00:00Z");
    let mut r0 = rrow("d1", "main", 0, t0, Some(1000.0), Some(230.0));
    r0.reading.voltage_v = Some(230.0);
    r0.reading.current_a = Some(1.0);
    r0.reading.power_factor = Some(1.0);
    r0.reading.frequency_hz = Some(50.0);
    let mut r1 = rrow("d1", "main", 1, t0 + MIN, Some(1001.0), Some(500.0));
    r1.reading.voltage_v = Some(230.0);
    r1.reading.current_a = Some(1.0);
    r1.reading.power_factor = Some(1.0);
    r1.reading.frequency_hz = Some(70.0);
    let r2 = rrow("d1", "main", 2, t0 + 2 * MIN, Some(10.0), None);
    let r3 = rrow("d1", "main", 3, t0 + 2 * MIN + 1000, Some(1e9), None);
    f.store.insert_batch(&[r0.clone(), r1.clone()]).unwrap();
    f.store.insert_batch(&[r2.clone(), r3.clone()]).unwrap();
    // Late (between r0 and r1, plausible against r0) and a resend of r2.
    let late = rrow("d1", "main", 4, t0 + 30_000, Some(1000.5), None);
    f.store.insert_batch(&[late, r2]).unwrap();
    assert_eq!(counts.get(), [1, 1, 1, 1], "the resend is not counted");

    let h = f.store.history("d1", 0, i64::MAX, 100, false).unwrap();
    let got: Vec<(u64, u32)> = h.iter().map(|r| (r.reading.seq, r.flags)).collect();
    assert_eq!(
        got,
        vec![
            (0, 0),
            (4, 0),
            (1, POWER_MISMATCH | FREQUENCY_RANGE),
            (2, COUNTER_RESET),
            (3, ENERGY_GLITCH)
        ]
    );
    let page = f.store.export_page("d1", 0, i64::MAX, None, 100).unwrap();
    let got: Vec<(u64, u32)> = page.iter().map(|r| (r.reading.seq, r.flags)).collect();
    assert_eq!(got[2], (1, POWER_MISMATCH | FREQUENCY_RANGE));
    assert_eq!(page[2].reading, r1.reading);
}

/// A batch the database refuses leaves no trace in the energy slots, the
/// flags or the flag counters, and neither do its refused rows when the
/// writer splits it: the slots and flags are those of the rows that
/// committed (quarantine rows go in the same transactions). The refused
/// row (an epoch no database column holds) carries a 1e9 Wh glitch: had it
/// reached the slots or the writer's cache, the next row would be a
/// counter reset and the rollup would differ from the brute force.
pub fn a_refused_batch_split_counts_only_committed_rows(mut f: Fixture) {
    let counts = Arc::new(FlagCounts::default());
    let limits = Limits::default();
    f.store
        .prepare_energy(limits, Some(counts.clone()))
        .unwrap();
    let t0 = at("2026-05-01T10:07:00Z");
    let rows: Vec<Row> = (0..30u64)
        .map(|i| {
            let ts = t0 + i as i64 * MIN;
            let wh = if i < 20 {
                1000.0 + 10.0 * i as f64
            } else {
                10.0 * (i - 20) as f64
            };
            let mut r = rrow("split", "main", i, ts, Some(wh), Some(600.0));
            if i == 12 {
                r.reading.epoch = u64::MAX;
                r.reading.energy_wh = Some(1e9);
            }
            r
        })
        .collect();
    let mut frame = QuarantineRow::store_error(&rows[3], "stand-in for a refused frame");
    frame.epoch = Some(99);

    // The whole batch is refused: nothing of it stays.
    let whole = f.store.write_batch(&rows, std::slice::from_ref(&frame));
    assert!(matches!(whole, Err(StoreError::Refused(_))), "{whole:?}");
    assert!(f
        .store
        .meter_readings("split", "main", i64::MIN, i64::MAX)
        .unwrap()
        .is_empty());
    assert!(f.store.quarantined(Some("split"), 10).unwrap().is_empty());
    assert_eq!(counts.get(), [0; 4]);

    // What the writer does: halve until each refused row is alone.
    fn split(s: &mut dyn Store, part: &[Row], q: &[QuarantineRow], refused: &mut Vec<u64>) {
        match s.write_batch(part, q) {
            Ok(()) => {}
            Err(StoreError::Refused(_)) if part.len() == 1 => refused.push(part[0].reading.seq),
            Err(StoreError::Refused(_)) => {
                let mid = part.len() / 2;
                split(s, &part[..mid], q, refused);
                split(s, &part[mid..], &[], refused);
            }
            Err(e) => panic!("{e}"),
        }
    }
    let mut refused = Vec::new();
    split(
        &mut *f.store,
        &rows,
        std::slice::from_ref(&frame),
        &mut refused,
    );
    assert_eq!(refused, [12]);
    assert_eq!(f.store.quarantined(Some("split"), 10).unwrap().len(), 1);

    let raw = f
        .store
        .meter_readings("split", "main", i64::MIN, i64::MAX)
        .unwrap();
    assert_eq!(raw.len(), 29);
    let full: Vec<Reading> = rows.iter().map(|r| r.reading.clone()).collect();
    let want = in_order_flags(&raw, &full, &limits);
    let stored: Vec<u32> = f
        .store
        .export_page("split", i64::MIN, i64::MAX, None, 100)
        .unwrap()
        .into_iter()
        .map(|r| r.flags)
        .collect();
    assert_eq!(stored, want);
    // Only the reset at row 20 is flagged; the refused glitch never counted.
    assert_eq!(stored.iter().filter(|f| **f != 0).count(), 1);
    assert_eq!(stored[19], COUNTER_RESET, "{stored:?}");
    assert_eq!(counts.get(), [0, 0, 0, 1]);
    let (from, to) = (at("2026-05-01T09:00:00Z"), at("2026-05-01T12:00:00Z"));
    let spans = buckets(&Zone::parse("UTC").unwrap(), Bucket::Hour, from, to).unwrap();
    let got = meter_answer(
        &mut *f.store,
        "split",
        "UTC",
        Bucket::Hour,
        from,
        to,
        "main",
    );
    assert_close(
        &got,
        &rollup_brute(&raw, &spans, &limits),
        1e4,
        1e3,
        "split",
    );
}

/// xorshift64*: a small deterministic generator for the randomized case.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Readings of two meters over about two days: gaps from 0 to 40 min,
/// resets, glitches, readings without energy or power.
fn random_readings(rng: &mut Rng, device: &str, start: i64) -> Vec<Row> {
    let mut out = Vec::new();
    let mut seq = 0;
    for meter in ["main", "pv"] {
        let mut ts = start + rng.below(20 * MIN as u64) as i64;
        let mut wh = rng.below(100_000) as f64;
        for _ in 0..120 {
            let gap = match rng.below(10) {
                0 => 0,
                1..=5 => 1000 + rng.below(5 * MIN as u64) as i64,
                6 | 7 => rng.below(20 * MIN as u64) as i64,
                8 => 15 * MIN,
                _ => rng.below(40 * MIN as u64) as i64,
            };
            ts += gap;
            wh += match rng.below(20) {
                0 => -wh / 2.0 - 1.0, // reset
                1 => 1e9,             // glitch
                _ => rng.below(50_000) as f64 / 100.0,
            };
            let energy = (!rng.chance(10)).then_some(wh);
            let power = (!rng.chance(15)).then(|| rng.below(300_000) as f64 / 100.0 - 500.0);
            out.push(rrow(device, meter, seq, ts, energy, power));
            seq += 1;
        }
    }
    out
}

/// The flags the writer gives each row when every row comes once, in
/// order (what a rebuild sets).
fn in_order_flags(rows: &[MeterReading], full: &[Reading], limits: &Limits) -> Vec<u32> {
    let mut prev = None;
    rows.iter()
        .map(|m| {
            let r = full
                .iter()
                .find(|r| r.epoch == m.key.epoch && r.seq == m.key.seq)
                .unwrap();
            let f = ems_hub::energy::flags::reading_flags(r, prev, limits);
            if let Some(e) = m.energy() {
                prev = Some(ems_hub::energy::slots::Point {
                    ts_ms: m.key.ts_ms,
                    value: e,
                });
            }
            f
        })
        .collect()
}

pub fn energy_equals_brute_force_with_late_and_resent_readings(mut f: Fixture) {
    let limits = Limits::default();
    let base = at("2026-03-28T20:00:00Z"); // Berlin springs forward that night
    let cases: u64 = std::env::var("EMS_ENERGY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    for seed in 1..=cases {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed);
        let device = format!("rand{seed}");
        let rows = random_readings(&mut rng, &device, base);
        // Delivery: mostly in order; a fifth held back and sent after the
        // rest (late), a tenth sent twice.
        let mut order: Vec<Row> = Vec::new();
        let mut held: Vec<Row> = Vec::new();
        for r in &rows {
            if rng.chance(20) {
                held.push(r.clone());
            } else {
                order.push(r.clone());
            }
            if rng.chance(10) {
                let i = rng.below(order.len().max(1) as u64) as usize;
                if let Some(again) = order.get(i).cloned() {
                    order.push(again);
                }
            }
        }
        // Rows of the two meters interleave in time.
        order.sort_by_key(|r| (r.reading.ts_ms, r.reading.seq));
        order.extend(held);
        let mut at_row = 0;
        while at_row < order.len() {
            let n = 1 + rng.below(25) as usize;
            let end = (at_row + n).min(order.len());
            f.store.insert_batch(&order[at_row..end]).unwrap();
            at_row = end;
        }

        let full: Vec<Reading> = rows.iter().map(|r| r.reading.clone()).collect();
        let (from, to) = (base + 3 * H, base + 40 * H);
        for meter in ["main", "pv"] {
            // SELECT * of the meter: the brute force's input.
            let raw = f
                .store
                .meter_readings(&device, meter, i64::MIN, i64::MAX)
                .unwrap();
            assert_eq!(raw.len(), 120, "seed {seed}: every reading stored once");
            let energy_scale: f64 = raw
                .windows(2)
                .filter_map(|w| Some((w[1].energy()? - w[0].energy()?).abs()))
                .filter(|d| *d < 1e8)
                .sum();
            let power_scale = raw
                .iter()
                .filter_map(|r| r.power())
                .fold(0.0, |a: f64, p| a.max(p.abs()));
            for zone in ["UTC", "Europe/Berlin", "Asia/Kolkata", "Asia/Kathmandu"] {
                for b in [Bucket::Hour, Bucket::Day] {
                    let z = Zone::parse(zone).unwrap();
                    let spans: Vec<Span> = buckets(&z, b, from, to).unwrap();
                    let want = rollup_brute(&raw, &spans, &limits);
                    let got = meter_answer(&mut *f.store, &device, zone, b, from, to, meter);
                    assert_close(
                        &got,
                        &want,
                        energy_scale,
                        power_scale,
                        &format!("seed {seed} {meter} {zone} {b}"),
                    );
                }
            }
        }

        // A rebuild (other limits, then back) gives the very same slots,
        // and the flags of in-order delivery.
        let slots_before: Vec<_> = ["main", "pv"]
            .iter()
            .map(|m| {
                f.store
                    .energy_slots(&device, m, i64::MIN / 2, i64::MAX / 2)
                    .unwrap()
            })
            .collect();
        let other = Limits::new(500.0, MIN).unwrap();
        assert!(matches!(
            f.store.prepare_energy(other, None).unwrap(),
            Prepared::Rebuilt { .. }
        ));
        assert!(matches!(
            f.store.prepare_energy(limits, None).unwrap(),
            Prepared::Rebuilt { .. }
        ));
        assert_eq!(
            f.store.prepare_energy(limits, None).unwrap(),
            Prepared::UpToDate
        );
        for (i, m) in ["main", "pv"].iter().enumerate() {
            let after = f
                .store
                .energy_slots(&device, m, i64::MIN / 2, i64::MAX / 2)
                .unwrap();
            assert_eq!(
                after, slots_before[i],
                "seed {seed} {m}: slots after a rebuild"
            );
            let raw = f
                .store
                .meter_readings(&device, m, i64::MIN, i64::MAX)
                .unwrap();
            let want = in_order_flags(&raw, &full, &limits);
            let stored: Vec<u32> = f
                .store
                .export_page(&device, i64::MIN, i64::MAX, None, 1000)
                .unwrap()
                .into_iter()
                .filter(|r| r.reading.meter == *m)
                .map(|r| r.flags)
                .collect();
            assert_eq!(stored, want, "seed {seed} {m}: flags after a rebuild");
        }
    }
}

pub fn energy_local_days_dst_and_odd_offsets(mut f: Fixture) {
    // 1 kW for four days around each Berlin change, one reading a minute.
    let mut seq = 0;
    for (start, days) in [("2026-03-27T12:00:00Z", 4), ("2026-10-23T12:00:00Z", 4)] {
        let t0 = at(start);
        let rows: Vec<Row> = (0..days * 24 * 60)
            .map(|i| {
                let ts = t0 + i * MIN;
                seq += 1;
                rrow(
                    "dst",
                    "main",
                    seq,
                    ts,
                    Some(ts as f64 / H as f64 * 1000.0),
                    Some(1000.0),
                )
            })
            .collect();
        for chunk in rows.chunks(700) {
            f.store.insert_batch(chunk).unwrap();
        }
    }
    fn day(s: &mut dyn Store, zone: &str, from: &str, to: &str) -> Vec<BucketResult> {
        meter_answer(s, "dst", zone, Bucket::Day, at(from), at(to), "main")
    }
    let spring = day(
        &mut *f.store,
        "Europe/Berlin",
        "2026-03-29T00:00:00+01:00",
        "2026-03-29T12:00:00+02:00",
    );
    assert_eq!(spring.len(), 1);
    assert_eq!(spring[0].end_ms - spring[0].start_ms, 23 * H);
    assert!(
        (spring[0].energy_wh - 23_000.0).abs() < 1e-6,
        "{}",
        spring[0].energy_wh
    );
    assert_eq!((spring[0].samples, spring[0].coverage), (23 * 60, 1.0));
    let p = spring[0].power_w.unwrap();
    assert_eq!((p.min, p.avg, p.max), (1000.0, 1000.0, 1000.0));
    let autumn = day(
        &mut *f.store,
        "Europe/Berlin",
        "2026-10-25T00:00:00+02:00",
        "2026-10-25T12:00:00+01:00",
    );
    assert_eq!(autumn[0].end_ms - autumn[0].start_ms, 25 * H);
    assert!((autumn[0].energy_wh - 25_000.0).abs() < 1e-6);
    assert_eq!(autumn[0].samples, 25 * 60);
    // Hours of the autumn night: 02:00–03:00 twice, the second at +01:00.
    let hours = meter_answer(
        &mut *f.store,
        "dst",
        "Europe/Berlin",
        Bucket::Hour,
        at("2026-10-25T02:00:00+02:00"),
        at("2026-10-25T03:00:00+01:00"),
        "main",
    );
    assert_eq!(hours.len(), 2);
    assert_eq!(hours[0].start_ms, at("2026-10-25T00:00:00Z"));
    assert_eq!(hours[1].start_ms, at("2026-10-25T01:00:00Z"));
    for h in &hours {
        assert!((h.energy_wh - 1000.0).abs() < 1e-6);
    }
    // Kolkata (+05:30) and Kathmandu (+05:45): days start at 18:30Z and
    // 18:15Z and hold 24 kWh each.
    for (zone, start) in [
        ("Asia/Kolkata", "2026-03-27T18:30:00Z"),
        ("Asia/Kathmandu", "2026-03-27T18:15:00Z"),
    ] {
        let days = day(&mut *f.store, zone, start, "2026-03-30T12:00:00Z");
        assert_eq!(days.len(), 3, "{zone}");
        assert_eq!(days[0].start_ms, at(start), "{zone}");
        for d in &days {
            assert_eq!(d.end_ms - d.start_ms, 24 * H, "{zone}");
            assert!(
                (d.energy_wh - 24_000.0).abs() < 1e-6,
                "{zone}: {}",
                d.energy_wh
            );
            assert_eq!(d.coverage, 1.0, "{zone}");
        }
    }
    // A day with no readings is present and empty.
    let gap = day(
        &mut *f.store,
        "UTC",
        "2026-06-01T00:00:00Z",
        "2026-06-02T00:00:00Z",
    );
    assert_eq!(
        (gap.len(), gap[0].samples, gap[0].coverage, gap[0].power_w),
        (1, 0, 0.0, None)
    );
    // The long pause between the two runs counts as energy (the counter
    // kept counting) spread over the days, without coverage.
    assert!(gap[0].energy_wh > 0.0);
}

pub fn energy_before_1972_is_answered_from_raw_rows(mut f: Fixture) {
    // Monrovia was at −00:44:30 until 1972: local days are off the slot
    // grid, so the answer comes from the raw rows.
    let t0 = at("1971-06-01T00:00:00Z");
    let rows: Vec<Row> = (0..3 * 24 * 4)
        .map(|i| {
            let ts = t0 + i * 15 * MIN + 7 * MIN;
            rrow(
                "old",
                "main",
                i as u64,
                ts,
                Some(i as f64 * 250.0),
                Some(1000.0),
            )
        })
        .collect();
    f.store.insert_batch(&rows).unwrap();
    let z = Zone::parse("Africa/Monrovia").unwrap();
    let (from, to) = (at("1971-06-01T12:00:00Z"), at("1971-06-03T00:00:00Z"));
    let spans = buckets(&z, Bucket::Day, from, to).unwrap();
    assert!(spans.iter().any(|s| s.start_ms % (15 * MIN) != 0));
    let got = meter_answer(
        &mut *f.store,
        "old",
        "Africa/Monrovia",
        Bucket::Day,
        from,
        to,
        "main",
    );
    let raw = f
        .store
        .meter_readings("old", "main", i64::MIN, i64::MAX)
        .unwrap();
    assert_close(
        &got,
        &rollup_brute(&raw, &spans, &Limits::default()),
        1e5,
        1e3,
        "Monrovia 1971",
    );
    assert!((got[1].energy_wh - 24_000.0).abs() < 1e-6);
}

pub fn export_pages_in_key_order(mut f: Fixture) {
    // Equal timestamps across epochs and meters: pages of two must still
    // walk every row once, in (ts, epoch, seq) order.
    let mut rows = Vec::new();
    for (epoch, seq, ts, meter) in [
        (2, 0, 10, "a"),
        (1, 5, 10, "b"),
        (1, 4, 10, "a"),
        (1, 1, 5, "a"),
        (3, 0, 20, "a"),
        (1, 9, 30, "b"),
    ] {
        let mut r = rrow("exp", meter, seq, ts, Some(1.0), None);
        r.reading.epoch = epoch;
        rows.push(r);
    }
    f.store.insert_batch(&rows).unwrap();
    let mut after: Option<ReadingKey> = None;
    let mut seen = Vec::new();
    loop {
        let page = f.store.export_page("exp", 5, 30, after, 2).unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        let last = &page[page.len() - 1].reading;
        after = Some(ReadingKey {
            ts_ms: last.ts_ms,
            epoch: last.epoch,
            seq: last.seq,
        });
        seen.extend(
            page.into_iter()
                .map(|r| (r.reading.ts_ms, r.reading.epoch, r.reading.seq)),
        );
    }
    assert_eq!(
        seen,
        vec![(5, 1, 1), (10, 1, 4), (10, 1, 5), (10, 2, 0), (20, 3, 0)]
    );
    assert!(f
        .store
        .export_page("other", 0, 100, None, 10)
        .unwrap()
        .is_empty());
}

/// The schema of the release before the energy migration, as it created
/// databases (`readings` without `flags`, no energy tables).
const SQLITE_V1: &str = "
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version (version) VALUES (1);
CREATE TABLE devices (
    device_id  TEXT PRIMARY KEY NOT NULL,
    token_hash BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
CREATE TABLE viewers (
    viewer_id   INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    token_hash  BLOB NOT NULL UNIQUE,
    all_devices INTEGER NOT NULL,
    created_ms  INTEGER NOT NULL,
    revoked_ms  INTEGER
);
CREATE TABLE viewer_devices (
    viewer_id INTEGER NOT NULL REFERENCES viewers(viewer_id) ON DELETE CASCADE,
    device_id TEXT NOT NULL,
    PRIMARY KEY (viewer_id, device_id)
);
CREATE TABLE admins (
    name       TEXT PRIMARY KEY NOT NULL,
    token_hash BLOB NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
CREATE TABLE readings (
    device_id          TEXT NOT NULL,
    meter              TEXT NOT NULL,
    ts                 INTEGER NOT NULL,
    received_at        INTEGER NOT NULL,
    epoch              INTEGER NOT NULL,
    seq                INTEGER NOT NULL,
    voltage_v          REAL,
    current_a          REAL,
    power_w            REAL,
    energy_wh          REAL,
    frequency_hz       REAL,
    power_factor       REAL,
    reactive_power_var REAL,
    UNIQUE (device_id, epoch, seq)
);
CREATE INDEX readings_device_ts ON readings (device_id, ts);
";

/// The same for PostgreSQL (plain mode).
const PG_V1: &str = "
CREATE TABLE schema_version (version integer NOT NULL);
INSERT INTO schema_version (version) VALUES (1);
CREATE TABLE devices (
    device_id  text PRIMARY KEY,
    token_hash bytea NOT NULL,
    created_ms bigint NOT NULL,
    revoked_ms bigint
);
CREATE TABLE viewers (
    viewer_id   bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    token_hash  bytea NOT NULL UNIQUE,
    all_devices boolean NOT NULL,
    created_ms  bigint NOT NULL,
    revoked_ms  bigint
);
CREATE TABLE viewer_devices (
    viewer_id bigint NOT NULL REFERENCES viewers (viewer_id) ON DELETE CASCADE,
    device_id text NOT NULL,
    PRIMARY KEY (viewer_id, device_id)
);
CREATE TABLE admins (
    name       text PRIMARY KEY,
    token_hash bytea NOT NULL UNIQUE,
    created_ms bigint NOT NULL,
    revoked_ms bigint
);
CREATE TABLE readings (
    device_id          text NOT NULL,
    meter              text NOT NULL,
    ts                 timestamptz NOT NULL,
    received_at        timestamptz NOT NULL,
    epoch              bigint NOT NULL,
    seq                bigint NOT NULL,
    voltage_v          double precision,
    current_a          double precision,
    power_w            double precision,
    energy_wh          double precision,
    frequency_hz       double precision,
    power_factor       double precision,
    reactive_power_var double precision
);
CREATE UNIQUE INDEX readings_dedup ON readings (device_id, epoch, seq);
CREATE INDEX readings_device_ts ON readings (device_id, ts DESC);
";

/// Readings a version-1 hub stored: two devices, resets and glitches.
fn old_rows() -> Vec<Row> {
    let mut rng = Rng(0x5EED);
    let base = at("2026-03-28T20:00:00Z");
    let mut rows = random_readings(&mut rng, "old1", base);
    rows.extend(random_readings(&mut rng, "old2", base + 7 * H));
    rows
}

/// After the upgrade: the schema is current, the first use built the
/// slots and flags, and answers equal the rule over the raw rows.
fn check_upgraded(s: &mut dyn Store, rows: &[Row]) {
    assert!(matches!(
        s.prepare_energy(Limits::default(), None).unwrap(),
        Prepared::Rebuilt { readings: 480, .. }
    ));
    let limits = Limits::default();
    for device in ["old1", "old2"] {
        let full: Vec<Reading> = rows
            .iter()
            .filter(|r| &*r.device_id == device)
            .map(|r| r.reading.clone())
            .collect();
        for meter in ["main", "pv"] {
            let raw = s.meter_readings(device, meter, i64::MIN, i64::MAX).unwrap();
            assert_eq!(raw.len(), 120);
            let z = Zone::parse("Europe/Berlin").unwrap();
            let (from, to) = (at("2026-03-28T00:00:00Z"), at("2026-04-01T00:00:00Z"));
            for b in [Bucket::Hour, Bucket::Day] {
                let spans = buckets(&z, b, from, to).unwrap();
                let got = meter_answer(s, device, "Europe/Berlin", b, from, to, meter);
                assert_close(&got, &rollup_brute(&raw, &spans, &limits), 1e7, 1e4, device);
            }
            let want = in_order_flags(&raw, &full, &limits);
            let stored: Vec<u32> = s
                .export_page(device, i64::MIN, i64::MAX, None, 1000)
                .unwrap()
                .into_iter()
                .filter(|r| r.reading.meter == meter)
                .map(|r| r.flags)
                .collect();
            assert_eq!(stored, want, "{device} {meter}: flags of old rows");
            assert!(want.iter().any(|f| f & COUNTER_RESET != 0));
        }
    }
    // New readings go on from the rebuilt state.
    let last = rows
        .iter()
        .filter(|r| &*r.device_id == "old1")
        .map(|r| r.reading.ts_ms)
        .max()
        .unwrap();
    s.insert_batch(&[rrow("old1", "main", 10_000, last + 1000, Some(0.5), None)])
        .unwrap();
    let h = s.history("old1", last + 1, i64::MAX, 10, false).unwrap();
    assert_eq!(h[0].flags, COUNTER_RESET);
    // The quarantine step ran on the way too.
    assert!(s.quarantined(None, 10).unwrap().is_empty());
}

#[test]
fn sqlite_v1_database_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    let rows = old_rows();
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(SQLITE_V1).unwrap();
        let mut stmt = c
            .prepare(
                "INSERT INTO readings (device_id, meter, ts, received_at, epoch, seq, \
                 power_w, energy_wh) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .unwrap();
        for r in &rows {
            let x = &r.reading;
            stmt.execute(rusqlite::params![
                &*r.device_id,
                x.meter,
                x.ts_ms,
                r.received_at_ms,
                x.epoch as i64,
                x.seq as i64,
                x.power_w,
                x.energy_wh
            ])
            .unwrap();
        }
    }
    let url = format!("sqlite:{}", path.display());
    let mut s = ems_hub::store::open(&url).unwrap();
    let c = rusqlite::Connection::open(&path).unwrap();
    let v: i64 = c
        .query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, ems_hub::store::sqlite::SCHEMA_VERSION);
    let limits: i64 = c
        .query_row("SELECT count(*) FROM energy_limits", [], |r| r.get(0))
        .unwrap();
    assert_eq!(limits, 0, "slots are built at first use, not by every open");
    check_upgraded(&mut *s, &rows);
}

#[test]
fn postgres_v1_database_is_upgraded_in_place() {
    let Some(db) = super::pg::fresh_db() else {
        return;
    };
    let rows = old_rows();
    {
        let mut c = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
        c.batch_execute(PG_V1).unwrap();
        for r in &rows {
            let x = &r.reading;
            c.execute(
                "INSERT INTO readings (device_id, meter, ts, received_at, epoch, seq, \
                 power_w, energy_wh) VALUES ($1, $2, to_timestamp($3::float8 / 1000), \
                 to_timestamp($4::float8 / 1000), $5, $6, $7, $8)",
                &[
                    &&*r.device_id,
                    &x.meter,
                    &(x.ts_ms as f64),
                    &(r.received_at_ms as f64),
                    &(x.epoch as i64),
                    &(x.seq as i64),
                    &x.power_w,
                    &x.energy_wh,
                ],
            )
            .unwrap();
        }
    }
    let mut s = ems_hub::store::open(&db.url).unwrap();
    let mut c = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
    let v: i32 = c
        .query_one("SELECT max(version) FROM schema_version", &[])
        .unwrap()
        .get(0);
    assert_eq!(v, ems_hub::store::postgres::SCHEMA_VERSION);
    check_upgraded(&mut *s, &rows);
}

/// The fleet's energy over local days (one query for every device) is the
/// per-device rollup's, summed over meters and days: energy up to
/// summation order, coverage the least-covered meter's share of the range.
pub fn fleet_energy_equals_the_per_device_rollup(mut f: Fixture) {
    use ems_hub::store::energy::fleet_energy;
    let base = at("2026-03-28T20:00:00Z"); // Berlin springs forward that night
    let mut rng = Rng(0x5DEE_CE66_D1CE_4E5B);
    let devices = ["fleet-a", "fleet-b", "fleet-c", "fleet-d"];
    for (k, device) in devices.iter().enumerate() {
        // Staggered starts: some devices begin before the day, some in it.
        let rows = random_readings(&mut rng, device, base + k as i64 * 5 * H);
        for chunk in rows.chunks(97) {
            f.store.insert_batch(chunk).unwrap();
        }
    }
    // A device with no reading near the ranges (left out of the answer,
    // as the rollup has nothing for it), and one out of the caller's scope.
    f.store
        .insert_batch(&[rrow("fleet-e", "main", 0, base - 100 * H, None, Some(5.0))])
        .unwrap();
    let zone = Zone::parse("Europe/Berlin").unwrap();
    for (from, to) in [
        // The short spring day alone: slots before and after it exist.
        (base + 6 * H, base + 6 * H + 1),
        // Three local days around the data.
        (base - 24 * H, base + 30 * H),
        // A day after every reading: only the edge slot before it.
        (base + 5 * 24 * H, base + 5 * 24 * H + 1),
    ] {
        let spans = buckets(&zone, Bucket::Day, from, to).unwrap();
        let total_ms: i64 = spans.iter().map(|s| s.end_ms - s.start_ms).sum();
        let keep = |d: &str| d != "fleet-d";
        let fleet = fleet_energy(&mut *f.store, &spans, &keep).unwrap();
        let ids: Vec<&str> = fleet.iter().map(|d| d.device_id.as_str()).collect();
        assert_eq!(ids, ["fleet-a", "fleet-b", "fleet-c"], "{from}..{to}");
        let e = rollup(&mut *f.store, "fleet-e", zone.name(), Bucket::Day, &spans).unwrap();
        assert!(
            e.meters
                .iter()
                .flat_map(|m| m.buckets.iter())
                .all(|b| b.energy_wh == 0.0 && b.coverage == 0.0),
            "{e:?}"
        );
        for d in &fleet {
            let a = rollup(
                &mut *f.store,
                &d.device_id,
                zone.name(),
                Bucket::Day,
                &spans,
            )
            .unwrap();
            let wh: f64 = a
                .meters
                .iter()
                .flat_map(|m| m.buckets.iter())
                .map(|b| b.energy_wh)
                .sum();
            let coverage = a
                .meters
                .iter()
                .map(|m| {
                    let c: f64 = m
                        .buckets
                        .iter()
                        .map(|b| b.coverage * (b.end_ms - b.start_ms) as f64)
                        .sum();
                    c / total_ms as f64
                })
                .fold(f64::INFINITY, f64::min);
            let ctx = format!("{} over {from}..{to}", d.device_id);
            assert!(
                (d.energy_wh - wh).abs() <= 1e-9 * (1.0 + wh.abs()),
                "{ctx}: energy {} vs {wh}",
                d.energy_wh
            );
            assert!(
                (d.coverage - coverage).abs() <= 1e-12,
                "{ctx}: coverage {} vs {coverage}",
                d.coverage
            );
        }
        // The data really reaches the range (the comparison is not 0 = 0).
        if from == base - 24 * H {
            assert!(
                fleet.iter().filter(|d| d.energy_wh > 0.0).count() >= 3,
                "{fleet:?}"
            );
            assert!(fleet.iter().any(|d| d.coverage > 0.0), "{fleet:?}");
        }
    }
    assert!(fleet_energy(&mut *f.store, &[], &|_: &str| true)
        .unwrap()
        .is_empty());
}

/// A rebuild reads each device in pages (of 3 rows here) in `ts` order and
/// puts equal timestamps into key order itself: across page edges and
/// through a run of equal timestamps longer than a page it gives the slots
/// and flags that the writer kept as the rows came in.
pub fn energy_rebuild_in_small_pages_equals_incremental_slots(mut f: Fixture) {
    let limits = Limits::default();
    f.store.prepare_energy(limits, None).unwrap();
    let base = at("2026-06-01T10:07:00Z");
    let mut rows = Vec::new();
    for device in ["pg-b", "pg-a"] {
        let mut ts = base;
        let mut wh = [100.0, 5000.0];
        for i in 0..80u64 {
            ts += match i {
                31..=47 => 0, // 17 rows at one timestamp
                _ if i % 10 >= 3 && i % 10 <= 6 => 0,
                _ => 40_000,
            };
            let m = (i % 2) as usize;
            // 20 Wh in 80 s: 900 W, a glitch under a 500 W limit.
            wh[m] = if i == 61 { 1.0 } else { wh[m] + 20.0 };
            let meter = ["main", "pv"][m];
            rows.push(rrow(device, meter, i, ts, Some(wh[m]), Some(200.0)));
        }
    }
    for chunk in rows.chunks(7) {
        f.store.insert_batch(chunk).unwrap();
    }
    let keys = [
        ("pg-a", "main"),
        ("pg-a", "pv"),
        ("pg-b", "main"),
        ("pg-b", "pv"),
    ];
    let slots = |s: &mut dyn Store| -> Vec<Vec<ems_hub::energy::slots::Slot>> {
        keys.iter()
            .map(|(d, m)| s.energy_slots(d, m, i64::MIN / 2, i64::MAX / 2).unwrap())
            .collect()
    };
    let flags = |s: &mut dyn Store| -> Vec<Vec<u32>> {
        ["pg-a", "pg-b"]
            .iter()
            .map(|d| {
                s.export_page(d, i64::MIN, i64::MAX, None, 1000)
                    .unwrap()
                    .into_iter()
                    .map(|r| r.flags)
                    .collect()
            })
            .collect()
    };
    let (slots_before, flags_before) = (slots(&mut *f.store), flags(&mut *f.store));
    assert!(
        flags_before.iter().flatten().any(|f| *f != 0),
        "a reset is flagged"
    );
    assert!(slots_before.iter().all(|s| s.len() > 1));

    f.store.set_rebuild_page(3);
    let other = Limits::new(500.0, MIN).unwrap();
    assert!(matches!(
        f.store.prepare_energy(other, None).unwrap(),
        Prepared::Rebuilt { .. }
    ));
    let flags_other = flags(&mut *f.store);
    assert_ne!(flags_other, flags_before, "other limits, other flags");
    assert_eq!(
        f.store.prepare_energy(limits, None).unwrap(),
        Prepared::Rebuilt {
            readings: rows.len() as u64,
            slots: slots_before.iter().map(|s| s.len() as u64).sum(),
            flags_changed: flags_before
                .iter()
                .flatten()
                .zip(flags_other.iter().flatten())
                .filter(|(a, b)| a != b)
                .count() as u64,
        }
    );
    assert_eq!(
        slots(&mut *f.store),
        slots_before,
        "slots after a paged rebuild"
    );
    assert_eq!(
        flags(&mut *f.store),
        flags_before,
        "flags after a paged rebuild"
    );
}

/// A handle that defers to another connection's rebuild never rebuilds:
/// it reads no slots (`Rebuilding`) until they were built for its limits,
/// then answers what the rebuilding handle answers; the export's pages are
/// never held back. Whether a preparation is quick tells an empty
/// database and matching limits from a real rebuild.
pub fn a_deferring_handle_reads_no_slots_until_they_match(mut f: Fixture) {
    let limits = Limits::default();
    let other = Limits::new(500.0, MIN).unwrap();
    assert!(f.store.energy_prepare_is_quick(&other).unwrap(), "empty");
    f.store.prepare_energy(limits, None).unwrap();
    let base = at("2026-06-01T10:07:00Z");
    let rows: Vec<Row> = (0..40u64)
        .map(|i| {
            let d = ["da", "db", "dc"][(i % 3) as usize];
            rrow(
                d,
                "main",
                i,
                base + i as i64 * 40_000,
                Some(i as f64 * 20.0),
                None,
            )
        })
        .collect();
    f.store.insert_batch(&rows).unwrap();
    assert!(f.store.energy_prepare_is_quick(&limits).unwrap());
    assert!(!f.store.energy_prepare_is_quick(&other).unwrap());

    let mut reader = ems_hub::store::open(&f.url).unwrap();
    reader.defer_energy(other, None);
    let (lo, hi) = (base - H, base + 2 * H);
    assert!(matches!(
        reader.energy_slots("da", "main", lo, hi),
        Err(StoreError::Rebuilding)
    ));
    assert!(matches!(
        reader.energy_meters("da"),
        Err(StoreError::Rebuilding)
    ));
    assert!(matches!(
        reader.fleet_slots(lo, hi),
        Err(StoreError::Rebuilding)
    ));
    assert_eq!(
        reader.export_page("da", lo, hi, None, 100).unwrap().len(),
        14
    );
    assert!(matches!(
        f.store.prepare_energy(other, None).unwrap(),
        Prepared::Rebuilt { readings: 40, .. }
    ));
    for d in ["da", "db", "dc"] {
        assert_eq!(
            reader.energy_slots(d, "main", lo, hi).unwrap(),
            f.store.energy_slots(d, "main", lo, hi).unwrap(),
            "{d}"
        );
    }
    assert!(f.store.energy_prepare_is_quick(&other).unwrap());
}
