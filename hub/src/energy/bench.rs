//! Measurement (printed, never asserted): combining one meter-year of slots
//! into 365 local days, the cost of the append path per reading, and the
//! CSV row encoder's rate.
//!
//! `cargo test --release -p ems-hub --lib energy::bench -- --nocapture`
//! prints the numbers; the default run appends one reading every 5 minutes
//! (105,120 readings, the same 35,040 slots as 1 Hz would give), and
//! `EMS_ENERGY_BENCH_HZ=1` appends the full 31.5 million readings of a 1 Hz
//! year. The assertions check the results, not the time.

use std::time::Instant;

use super::buckets::{buckets, Bucket, Zone, SLOT_MS};
use super::rule::{rollup_brute, Limits, MeterReading, ReadingKey};
use super::slots::{combine, Slot};

#[test]
fn meter_year_combine_and_append_cost() {
    let limits = Limits::default();
    let step_ms: i64 = match std::env::var("EMS_ENERGY_BENCH_HZ").as_deref() {
        Ok("1") => 1000,
        _ => 300_000,
    };
    let zone = Zone::parse("Europe/Berlin").unwrap();
    // Local year 2026 in Berlin: 365 days, 23 h and 25 h ones included.
    let year_start = 1_767_222_000_000; // 2026-01-01T00:00+01:00
    let year_end = 1_798_758_000_000; // 2027-01-01T00:00+01:00
    let days = buckets(&zone, Bucket::Day, year_start, year_end).unwrap();
    assert_eq!(days.len(), 365);

    // 1 kW constant: 1000 Wh per hour, counter from 0.
    let wh_per_ms = 1000.0 / 3_600_000.0;
    let reading = |ts: i64, seq: u64| MeterReading {
        key: ReadingKey {
            ts_ms: ts,
            epoch: 1,
            seq,
        },
        energy_wh: Some((ts - year_start) as f64 * wh_per_ms),
        power_w: Some(1000.0),
    };
    let mut slots: Vec<Slot> = Vec::with_capacity(35_100);
    let mut appended = 0u64;
    let started = Instant::now();
    let mut ts = year_start;
    let mut current = Slot::start(&reading(ts, 0));
    while ts + step_ms < year_end {
        ts += step_ms;
        appended += 1;
        let r = reading(ts, appended);
        if current.append(&r, &limits).is_err() {
            slots.push(current);
            current = Slot::start(&r);
        }
    }
    slots.push(current);
    let append_elapsed = started.elapsed();
    assert_eq!(slots.len() as i64, (year_end - year_start) / SLOT_MS);

    // Few repetitions in a debug build (the default `cargo test`), where the
    // numbers mean little anyway.
    let runs = if cfg!(debug_assertions) { 2 } else { 20 };
    let started = Instant::now();
    let mut out = Vec::new();
    for _ in 0..runs {
        out = combine(&slots, &days, &limits).unwrap();
    }
    let combine_elapsed = started.elapsed() / runs;

    // As the endpoint does it: decode the stored rows, then combine.
    let stored: Vec<(i64, [u8; super::slots::SLOT_BYTES])> =
        slots.iter().map(|s| (s.start_ms, s.encode())).collect();
    let started = Instant::now();
    for _ in 0..runs {
        let decoded: Vec<Slot> = stored
            .iter()
            .map(|(start, bytes)| Slot::decode(*start, bytes).unwrap())
            .collect();
        assert_eq!(combine(&decoded, &days, &limits).unwrap(), out);
    }
    let decode_combine_elapsed = started.elapsed() / runs;

    eprintln!(
        "energy bench: {} slots, {} readings appended at {:.1} ns/reading; \
         combine into {} days: {:.3} ms; decode + combine: {:.3} ms",
        slots.len(),
        appended,
        append_elapsed.as_nanos() as f64 / appended as f64,
        days.len(),
        combine_elapsed.as_secs_f64() * 1e3,
        decode_combine_elapsed.as_secs_f64() * 1e3,
    );

    // 1 kW for every hour of the day: 23 kWh on the spring day, 25 on the
    // autumn one, full coverage everywhere but the last reading's tail.
    let hours = |b: &super::rule::BucketResult| (b.end_ms - b.start_ms) as f64 / 3_600_000.0;
    for b in &out[..364] {
        assert!((b.energy_wh - 1000.0 * hours(b)).abs() < 1e-3, "{b:?}");
        assert_eq!(b.coverage, 1.0);
        let p = b.power_w.unwrap();
        assert_eq!((p.min, p.avg, p.max), (1000.0, 1000.0, 1000.0));
    }
    assert!(out.iter().any(|b| hours(b) == 23.0) && out.iter().any(|b| hours(b) == 25.0));

    // CSV export encoding into a reused chunk buffer.
    let mut sample = ems_shared::Reading {
        epoch: 1,
        meter: "main".into(),
        voltage_v: Some(230.1),
        current_a: Some(4.35),
        power_w: Some(960.5),
        energy_wh: Some(1_523_400.25),
        frequency_hz: Some(50.02),
        power_factor: Some(0.96),
        ..Default::default()
    };
    let rows: u64 = if cfg!(debug_assertions) {
        20_000
    } else {
        200_000
    };
    let mut chunk = Vec::with_capacity(80 * 1024);
    let mut bytes = 0usize;
    let started = Instant::now();
    for i in 0..rows {
        sample.seq = i;
        sample.ts_ms = year_start + i as i64 * 1000;
        let row = super::csv::ExportRow {
            device_id: "d1",
            reading: &sample,
            flags: 0,
        };
        super::csv::write_csv_row(&mut chunk, &row).unwrap();
        if chunk.len() >= 64 * 1024 {
            bytes += chunk.len();
            chunk.clear();
        }
    }
    bytes += chunk.len();
    let csv_elapsed = started.elapsed();
    eprintln!(
        "energy bench: CSV encoding {:.0} rows/s ({} bytes/row)",
        rows as f64 / csv_elapsed.as_secs_f64(),
        bytes as u64 / rows
    );

    // The brute-force rule over the same readings agrees (default density
    // only: 31.5 M readings would need 1 GB here).
    if step_ms == 300_000 {
        let all: Vec<MeterReading> = (0..=appended)
            .map(|i| reading(year_start + i as i64 * step_ms, i))
            .collect();
        let started = Instant::now();
        let brute = rollup_brute(&all, &days, &limits);
        eprintln!(
            "energy bench: brute force over {} readings: {:.1} ms",
            all.len(),
            started.elapsed().as_secs_f64() * 1e3
        );
        for (a, b) in out.iter().zip(&brute) {
            assert!((a.energy_wh - b.energy_wh).abs() < 1e-6);
            assert_eq!((a.samples, a.coverage), (b.samples, b.coverage));
        }
    }
}
