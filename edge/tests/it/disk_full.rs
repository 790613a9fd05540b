//! The spool's file system fills up while the hub is down: readings wait
//! in memory (bounded), the log is not flooded, the status says so, and
//! the edge recovers by itself when the hub is back and space frees (a
//! later outage's readings are written again). Every sampled reading ends
//! up stored or counted as dropped.
//!
//! Runs on a real size-limited file system: a tmpfs mounted by the test
//! (root only; skipped loudly otherwise, a failure with
//! `EMS_REQUIRE_TMPFS=1`).

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::*;

/// `STATUS=` lines the edge sends to a NOTIFY_SOCKET, collected by a thread.
fn status_collector(path: &std::path::Path) -> Arc<Mutex<Vec<String>>> {
    let sock = UnixDatagram::bind(path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    std::thread::spawn(move || loop {
        let mut buf = [0u8; 4096];
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            out.lock().unwrap().push(msg);
        }
        if Arc::strong_count(&out) == 1 {
            return;
        }
    });
    seen
}

#[test]
fn a_full_disk_during_an_outage_loses_only_what_it_counts() {
    let w = World::new();
    let Some(fs) = Tmpfs::mount(&w.spool_dir(), "160k") else {
        return;
    };
    let status = status_collector(&w.dir.path().join("notify.sock"));
    // 256 KiB bound → 32 KiB segments and a 64 KiB memory queue (~250
    // readings, 12 s at 20 Hz); the 160 KiB file system fills first.
    let config = w.config("edge.toml", "spool_max_bytes = 262144", "");
    let mut hub = w.hub();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ems-edge"));
    cmd.env("NOTIFY_SOCKET", w.dir.path().join("notify.sock"));
    let mut edge = Edge::spawn_cmd(cmd, &config, &w.token, w.dir.path());
    let epoch = edge.epoch();
    wait_for("first readings stored", SOON, || w.count() >= 20);

    // Outage, and the card fills up.
    hub.stop();
    let ballast = fs.fill("ballast");
    let full_at = edge.last_sampled().unwrap();
    wait_for("the spool write error", SOON, || {
        edge.log().contains("spool: write failed")
    });
    // Past the memory bound: the oldest readings go, counted.
    wait_for(
        "readings dropped for the full disk",
        Duration::from_secs(90),
        || edge.log().contains("memory queue is full"),
    );
    let sampled_while_full = edge.last_sampled().unwrap() - full_at;
    assert!(sampled_while_full >= 200, "{sampled_while_full}");
    assert!(edge.alive());

    // The hub comes back before space frees: acked segments are deleted
    // although nothing can be written, which makes room.
    let mut hub = w.hub();
    wait_for("reconnected", SOON, || {
        edge.count_in_log("CONNECTED to") >= 2
    });
    let n = w.count();
    wait_for("the backlog stored", SOON, || w.count() > n + 100);
    std::fs::remove_file(&ballast).unwrap();
    // The failed write is retried at the sync interval; once the hub has
    // acknowledged what waited in memory the retry has nothing left to
    // write, which ends the episode (possibly before the space freed).
    wait_for("the spool writable again", SOON, || {
        edge.log().contains("spool: writable again")
    });
    let n = w.count();
    wait_for("streaming on", SOON, || w.count() > n + 20);
    // The card really takes readings again: a short outage, and what is
    // sampled during it reaches the spool without a write error.
    let failures = edge.count_in_log("spool: write failed");
    hub.stop();
    let sampled = edge.last_sampled().unwrap();
    wait_for("a reading written after the space freed", SOON, || {
        newest_on_disk(&w, epoch).is_some_and(|s| s >= sampled)
    });
    assert_eq!(edge.count_in_log("spool: write failed"), failures);
    let _hub = w.hub();
    wait_for("reconnected again", SOON, || {
        edge.count_in_log("CONNECTED to") >= 3
    });
    let n = w.count();
    wait_for("streaming on again", SOON, || w.count() > n + 20);
    let (exit, _) = edge.terminate();
    assert!(exit.success());
    let log = edge.log();

    // No flood: a few lines about the spool, not one per reading.
    let spool_lines = log
        .lines()
        .filter(|l| (l.contains("WARN") || l.contains("ERROR")) && l.contains("spool"))
        .count();
    assert!(spool_lines <= 10, "{spool_lines} spool warnings:\n{log}");

    // The status line said so.
    let seen = status.lock().unwrap().clone();
    let said = |needle: &str| seen.iter().any(|m| m.contains(needle));
    assert!(said("in memory (spool not writable)"), "{seen:?}");
    assert!(said("dropped (disk full)"), "{seen:?}");

    // The identity: every sampled reading is stored, kept for the next
    // start, or counted as lost; none is stored twice.
    let counts = FinalCounts::from_log(&log).expect("the final counters");
    assert!(counts.dropped_disk_full > 0, "{counts:?}");
    let sampled = edge.last_sampled().unwrap() + 1;
    let rows = w.rows_of(epoch);
    let seqs: BTreeSet<u64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(seqs.len(), rows.len(), "duplicates");
    assert!(seqs.iter().all(|s| *s < sampled));
    assert_eq!(
        sampled,
        rows.len() as u64 + counts.kept + counts.lost(),
        "sampled = stored + kept + counted as lost: {counts:?}"
    );
    // Independently of the seq numbering: a reading lost before it got a
    // seq would leave a hole in time between two consecutive seqs.
    for pair in rows.windows(2) {
        if pair[1].0 == pair[0].0 + 1 {
            let gap = pair[1].1 - pair[0].1;
            assert!(
                gap < 2_000,
                "{gap} ms between seq {} and {}",
                pair[0].0,
                pair[1].0
            );
        }
    }
    eprintln!(
        "disk full: sampled {sampled}, stored {}, {counts:?}, {spool_lines} spool warnings",
        rows.len()
    );
    edge.assert_token_not_logged();
    drop(status);
    drop(fs);
}
