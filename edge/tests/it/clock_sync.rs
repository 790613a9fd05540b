//! An unsynchronized clock: readings are held, then stamped from the
//! monotonic clock, and survive a restart in the same boot.

use std::fs;
use std::time::Duration;

use crate::harness::*;

#[test]
fn readings_wait_for_clock_sync_and_get_monotonic_stamps() {
    let w = World::new();
    let _hub = w.hub();
    let flag = w.dir.path().join("clock-synchronized");
    let config = w.config(
        "edge.toml",
        &format!("clock_sync_file = \"{}\"", flag.display()),
        "",
    );
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("trust_clock = true", "trust_clock = false");
    fs::write(&config, text).unwrap();
    let mut edge = w.edge(&config);
    let epoch = edge.epoch();
    wait_for("the holding warning", SOON, || {
        edge.log().contains("system clock not synchronized yet")
    });
    // Hold for a while: the edge is connected but sends nothing.
    wait_for("connected", SOON, || edge.log().contains("CONNECTED to"));
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(w.count(), 0, "a reading with an unknown time was sent");
    let synced_at = now_ms();
    fs::write(&flag, "").unwrap();
    wait_for("held readings released", SOON, || w.count() >= 30);
    assert!(edge.log().contains("system clock synchronized: releasing"));
    let path = w.db_url.trim_start_matches("sqlite:").to_string();
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT seq, ts FROM readings WHERE epoch = ?1 ORDER BY seq")
        .unwrap();
    let rows: Vec<(i64, i64)> = stmt
        .query_map([epoch as i64], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(rows[0].0, 0);
    // The first held reading was sampled > 1 s before the sync.
    assert!(rows[0].1 < synced_at - 900, "{} vs {synced_at}", rows[0].1);
    for pair in rows.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "seq gap");
        let dt = pair[1].1 - pair[0].1;
        assert!((0..=2_000).contains(&dt), "stamps not 50 ms apart: {dt}");
    }
    edge.terminate();
    edge.assert_token_not_logged();
}

#[test]
fn readings_held_for_clock_sync_survive_a_restart_in_the_same_boot() {
    let w = World::new();
    let _hub = w.hub();
    let flag = w.dir.path().join("clock-synchronized");
    let config = w.config(
        "edge.toml",
        &format!("clock_sync_file = \"{}\"", flag.display()),
        "",
    );
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("trust_clock = true", "trust_clock = false");
    fs::write(&config, text).unwrap();
    let mut edge = w.edge(&config);
    wait_for("the holding warning", SOON, || {
        edge.log().contains("system clock not synchronized yet")
    });
    std::thread::sleep(Duration::from_millis(300));
    let (status, _) = edge.terminate();
    assert!(status.success());
    let log = edge.log();
    let line = log
        .lines()
        .find(|l| l.contains("readings held for clock sync to"))
        .unwrap_or_else(|| panic!("held readings not saved: {log}"));
    let held: usize = line
        .split("saved ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(held >= 2, "{line}");
    assert!(
        log.contains(&format!("; {held} readings held for clock sync saved")),
        "{log}"
    );
    assert!(w.spool_dir().join("held").exists());
    assert_eq!(w.count(), 0, "a reading with an unknown time was sent");
    edge.assert_token_not_logged();

    // Restart in the same boot, clock now synchronized: the held readings
    // come back, stamped before this process even started.
    fs::write(&flag, "").unwrap();
    let restarted_at = now_ms();
    let mut again = w.edge(&config);
    let epoch = again.epoch();
    wait_for("the restored readings stored", SOON, || {
        w.seqs_of(epoch).len() > held
    });
    let log = again.log();
    assert!(
        log.contains(&format!("restored {held} readings held for clock sync")),
        "{log}"
    );
    assert!(!w.spool_dir().join("held").exists());
    let path = w.db_url.trim_start_matches("sqlite:").to_string();
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT seq, ts FROM readings WHERE epoch = ?1 ORDER BY seq")
        .unwrap();
    let rows: Vec<(i64, i64)> = stmt
        .query_map([epoch as i64], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    let early = rows.iter().filter(|(_, ts)| *ts < restarted_at).count();
    assert_eq!(early, held, "{rows:?} (restarted at {restarted_at})");
    for (i, pair) in rows.windows(2).enumerate().take(held - 1) {
        let dt = pair[1].1 - pair[0].1;
        assert!((0..=2_000).contains(&dt), "row {i}: stamps {dt} ms apart");
    }
    again.terminate();
    again.assert_token_not_logged();
}
