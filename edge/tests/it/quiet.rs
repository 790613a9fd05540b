//! A streaming edge is quiet: while the hub acknowledges promptly, the
//! supervisor (the main thread) does not wake on a fixed tick and the
//! spool is not written. Counted, not timed: wake-ups are the thread's
//! voluntary context switches, the run is ended by a count of readings.

use std::fs;
use std::path::Path;

use crate::harness::*;

/// Voluntary context switches of the process's main thread (its sleeps).
fn main_thread_wakeups(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/task/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("voluntary_ctxt_switches in /proc status")
}

/// Record lines in the spool's segment files (done ranges not counted).
fn spooled_records(spool: &Path) -> usize {
    let mut n = 0;
    for entry in fs::read_dir(spool).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "seg") {
            let text = fs::read_to_string(&path).unwrap_or_default();
            n += text.lines().filter(|l| !l.starts_with('D')).count();
        }
    }
    n
}

#[test]
fn a_streaming_edge_neither_ticks_nor_writes_its_spool() {
    let w = World::new();
    let _hub = w.hub();
    let path = w.config("edge.toml", "", "");
    // A 1 s sync interval (the default): the supervisor used to wake once
    // per interval whatever there was to write.
    let text = fs::read_to_string(&path).unwrap().replace(
        "spool_sync_interval_ms = 100",
        "spool_sync_interval_ms = 1000",
    );
    fs::write(&path, text).unwrap();
    let mut edge = w.edge(&path);
    let epoch = edge.epoch();
    wait_for("streaming", SOON, || w.seqs_of(epoch).len() >= 40);
    let pid = edge.child.id();
    let woke_before = main_thread_wakeups(pid);
    let stored = w.seqs_of(epoch).len();
    // 200 readings at 20 Hz: about 10 s, 10 ticks of the old cadence.
    wait_for("200 more readings stored", SOON, || {
        w.seqs_of(epoch).len() >= stored + 200
    });
    let woke = main_thread_wakeups(pid) - woke_before;
    let spooled = spooled_records(&w.spool_dir());
    eprintln!("main thread: {woke} wake-ups; {spooled} readings in the spool");
    // What may wake it: energy-ceiling raises (one per ~27 s of steady
    // power, more when the simulated load switches on), a sync for a
    // reading whose ack took over a second on a loaded machine, the
    // outbox lock taken while another thread holds it. The fixed tick of
    // before woke it 32 times here.
    assert!(
        woke <= 10,
        "the main thread woke {woke} times while 200 readings streamed"
    );
    assert!(
        spooled * 20 < stored + 200,
        "{spooled} of {} readings were written to the spool while the hub acknowledged them",
        stored + 200
    );
    let (status, _) = edge.terminate();
    assert!(status.success());
    assert_contiguous(&w.seqs_of(epoch), "streamed");
}
