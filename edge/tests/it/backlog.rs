//! Draining a backlog: live readings are not starved, the hub's rate limit
//! slows the drain without a loss, and the stored values are plausible.

use std::fs;
use std::time::{Duration, Instant};

use crate::harness::*;

#[test]
fn stored_values_are_a_plausible_household_supply() {
    let w = World::new();
    let _hub = w.hub();
    let mut edge = w.edge(&w.config("edge.toml", "", ""));
    wait_for("readings", SOON, || w.count() >= 10);
    let path = w.db_url.trim_start_matches("sqlite:").to_string();
    let conn = rusqlite::Connection::open(path).unwrap();
    let (ts, v, hz, e, pf): (i64, f64, f64, f64, f64) = conn
        .query_row(
            "SELECT ts, voltage_v, frequency_hz, energy_wh, power_factor FROM readings ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap();
    let now = now_ms();
    assert!((now - ts).abs() < 120_000, "ts {ts} vs now {now}");
    assert!(
        (200.0..260.0).contains(&v) && (49.0..51.0).contains(&hz),
        "{v} {hz}"
    );
    assert!(e > 0.0 && (0.0..=1.0).contains(&pf));
    edge.terminate();
    edge.assert_token_not_logged();
}

#[test]
fn live_readings_flow_while_a_large_backlog_drains() {
    use ems_edge::outbox::Outbox;
    const BACKLOG: u64 = 20_000;
    const OLD_EPOCH: u64 = 42;
    let w = World::new();
    // A backlog left by an earlier process (hub down for ~5.5 h at 1 Hz).
    let mut ob = Outbox::open(&w.spool_dir(), 256 << 20, 512).unwrap();
    for seq in 0..BACKLOG {
        let r = ems_shared::Reading {
            epoch: OLD_EPOCH,
            seq,
            ts_ms: 1_764_000_000_000 + seq as i64 * 1000,
            meter: "main".into(),
            power_w: Some(500.0 + (seq % 100) as f64),
            energy_wh: Some(1000.0 + seq as f64),
            ..Default::default()
        };
        ob.append(&r);
    }
    ob.sync_now().spool.unwrap();
    drop(ob);

    let _hub = w.hub();
    let started = Instant::now();
    // Pacing ceiling above the backlog: the hub's default burst (20 000)
    // takes it at link speed.
    let mut edge = w.edge(&w.config("edge.toml", "", "max_send_rate = 50000"));
    let epoch = edge.epoch();
    let mut live_during_drain = false;
    let mut drained_after = None;
    wait_for("the backlog stored", Duration::from_secs(120), || {
        let stored = w.stored();
        let old = stored.iter().filter(|(e, _)| *e == OLD_EPOCH).count() as u64;
        let live = stored.iter().filter(|(e, _)| *e == epoch).count();
        if live > 0 && old < BACKLOG {
            live_during_drain = true;
        }
        if old == BACKLOG && drained_after.is_none() {
            drained_after = Some(started.elapsed());
        }
        old == BACKLOG
    });
    let took = drained_after.unwrap();
    eprintln!(
        "backlog of {BACKLOG} drained in {:.2} s ({:.0} readings/s, debug build, incl. process start)",
        took.as_secs_f64(),
        BACKLOG as f64 / took.as_secs_f64()
    );
    assert!(
        live_during_drain,
        "live readings waited for the whole backlog"
    );
    assert_contiguous(&w.seqs_of(OLD_EPOCH), "backlog");
    // Fully acked: the spool shrinks to its open tail segment.
    let spool_bytes = || -> u64 {
        fs::read_dir(w.spool_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
            .map(|e| e.metadata().unwrap().len())
            .sum()
    };
    wait_for("acked segments deleted", SOON, || {
        spool_bytes() < 1024 * 1024
    });
    edge.terminate();
    edge.assert_token_not_logged();
}

#[test]
fn hub_rate_limit_slows_the_drain_and_loses_nothing() {
    use ems_edge::outbox::Outbox;
    const BACKLOG: u64 = 5_000;
    const OLD_EPOCH: u64 = 43;
    let w = World::new();
    let mut ob = Outbox::open(&w.spool_dir(), 256 << 20, 512).unwrap();
    for seq in 0..BACKLOG {
        let r = ems_shared::Reading {
            epoch: OLD_EPOCH,
            seq,
            ts_ms: 1_764_000_000_000 + seq as i64 * 1000,
            meter: "main".into(),
            power_w: Some(500.0),
            ..Default::default()
        };
        ob.append(&r);
    }
    ob.sync_now().spool.unwrap();
    drop(ob);
    // A hub that takes 1000 frames/s with a burst of 1000; an edge that
    // would send 4000/s.
    let _hub = Hub::start(&w.db_url, w.port, |c| {
        c.rate_limit.rate = 1000.0;
        c.rate_limit.burst = 1000.0;
    });
    let mut edge = w.edge(&w.config("edge.toml", "", "max_send_rate = 4000"));
    let epoch = edge.epoch();
    wait_for("the backlog stored", Duration::from_secs(120), || {
        w.seqs_of(OLD_EPOCH).len() as u64 == BACKLOG
    });
    let log = edge.log();
    assert!(
        log.contains("hub rate limit reached"),
        "the limit was never hit"
    );
    assert!(!log.contains("code 1008"), "the hub saw sustained abuse");
    assert_eq!(edge.count_in_log("CONNECTED to"), 1, "no reconnect needed");
    assert_contiguous(&w.seqs_of(OLD_EPOCH), "backlog");
    let last = edge.last_sampled().unwrap();
    wait_for("live readings stored too", SOON, || {
        w.seqs_of(epoch).last().is_some_and(|m| *m >= last)
    });
    assert_contiguous(&w.seqs_of(epoch), "live");
    edge.terminate();
    edge.assert_token_not_logged();
}

/// Measurement, not a check: `cargo test --release -p ems-edge --test it
/// -- --ignored --nocapture measure_spool`.
#[test]
#[ignore]
fn measure_spool() {
    use ems_edge::outbox::Outbox;
    let dir = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(dir.path(), 256 << 20, 512).unwrap();
    let reading = |seq: u64| ems_shared::Reading {
        epoch: 3_700_000_000_000_000,
        seq,
        ts_ms: 1_764_000_000_000 + seq as i64 * 1000,
        meter: "main".into(),
        voltage_v: Some(229.87),
        current_a: Some(4.123),
        power_w: Some(912.3),
        energy_wh: Some(12_345_678.123),
        frequency_hz: Some(50.012),
        power_factor: Some(0.912),
        reactive_power_var: Some(412.3),
        ..Default::default()
    };
    println!(
        "record size: {} bytes",
        reading(123_456).to_json().len() + 1
    );
    let n = 200_000u64;
    let t = Instant::now();
    for seq in 0..n {
        ob.append(&reading(seq));
    }
    let append = t.elapsed();
    let t = Instant::now();
    let job = ob.begin_sync();
    let write = t.elapsed();
    let t = Instant::now();
    let done = job.run();
    let sync = t.elapsed();
    ob.end_sync(&job, &done);
    done.spool.unwrap();
    println!(
        "append: {:.0} readings/s; write: {:.1} ms; fsync: {:.1} ms",
        n as f64 / append.as_secs_f64(),
        write.as_secs_f64() * 1e3,
        sync.as_secs_f64() * 1e3
    );
    // Steady state: one reading, then a flush + fsync, as every second.
    let mut worst = Duration::ZERO;
    let mut total = Duration::ZERO;
    for seq in n..n + 50 {
        ob.append(&reading(seq));
        let t = Instant::now();
        ob.sync_now().spool.unwrap();
        worst = worst.max(t.elapsed());
        total += t.elapsed();
    }
    println!(
        "steady flush+fsync of one reading: mean {:.2} ms, worst {:.2} ms",
        total.as_secs_f64() * 1e3 / 50.0,
        worst.as_secs_f64() * 1e3
    );
}
