//! `ems-bench` end to end against a real hub in-process (the test kit's
//! `BackgroundHub`): provision devices into the hub's SQLite database,
//! drive a small load with dashboards, and expect the report to say
//! nothing was lost. A small version of `.ci/bench-smoke.sh` that runs
//! with `cargo test`.

use std::path::Path;
use std::process::{Command, Output};

use ems_testkit::{free_port, BackgroundHub};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ems-bench"))
        .args(args)
        .output()
        .expect("run ems-bench")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn provision(db_url: &str, tokens: &Path, count: usize) {
    let out = bench(&[
        "provision",
        "--database",
        db_url,
        "--count",
        &count.to_string(),
        "--out",
        tokens.to_str().expect("a UTF-8 path"),
    ]);
    assert!(out.status.success(), "provision failed: {}", text(&out));
}

#[test]
fn a_small_run_against_the_hub_loses_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_url = format!("sqlite:{}", dir.path().join("hub.db").display());
    let tokens = dir.path().join("tokens.txt");
    provision(&db_url, &tokens, 6);
    let port = free_port();
    let mut hub = BackgroundHub::start(&db_url, port, |_| {});

    let target = format!("ws://127.0.0.1:{port}");
    let out = bench(&[
        "run",
        "--label",
        "it",
        "--target",
        &target,
        "--tokens",
        tokens.to_str().expect("a UTF-8 path"),
        "--devices",
        "6",
        "--rate",
        "2",
        "--dashboards",
        "3",
        "--follow",
        "2",
        "--duration",
        "2",
        "--drain",
        "20",
    ]);
    hub.stop();
    let report = text(&out);
    assert!(
        out.status.success(),
        "ems-bench reported a failure:\n{report}"
    );
    for line in [
        "verdict: OK",
        " ack_lost=0 ",
        " live_lost=0 ",
        "latency send->dashboard ",
        "latency send->ack ",
    ] {
        assert!(
            report.contains(line),
            "no {line:?} in the report:\n{report}"
        );
    }
}
