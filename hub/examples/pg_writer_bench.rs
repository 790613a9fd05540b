//! Benchmark of the PostgreSQL writer alone: rows/s by batch size, binary
//! COPY (direct with fallback, and staged) vs multi-row INSERT, dedup always on (unique index + `ON CONFLICT
//! DO NOTHING`), `synchronous_commit` and `fsync` on.
//!
//! ```text
//! cargo run --release -p ems-hub --example pg_writer_bench [ROWS_PER_RUN] [SUSTAINED_ROWS]
//! ```
//!
//! Uses `EMS_BENCH_DATABASE_URL` (a role that may `CREATE DATABASE`) if
//! set, else starts a private PostgreSQL 15 cluster like the tests do
//! (`ems_testkit::pg`, here with `fsync=on`). Each run writes into a fresh
//! database. Prints a Markdown table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ems_hub::store::postgres::{PgOptions, PgStore, WriteMethod};
use ems_hub::store::{ReadingSink, Row};
use ems_shared::Reading;
use ems_testkit::pg;

/// Devices the rows are spread over.
const DEVICES: u64 = 20;

/// `n` distinct rows, round-robin over [`DEVICES`], 1 s apart per device.
fn rows(n: u64, first_seq: u64) -> Vec<Row> {
    let ids: Vec<Arc<str>> = (0..DEVICES)
        .map(|d| Arc::from(format!("bench-{d:03}")))
        .collect();
    (first_seq..first_seq + n)
        .map(|i| {
            let seq = i / DEVICES;
            let ts = 1_700_000_000_000 + seq as i64 * 1000;
            Row {
                device_id: ids[(i % DEVICES) as usize].clone(),
                received_at_ms: ts + 40,
                reading: Reading {
                    epoch: 1_700_000_000,
                    seq,
                    ts_ms: ts,
                    meter: "main".into(),
                    voltage_v: Some(230.0 + (i % 7) as f64 * 0.1),
                    current_a: Some(4.2),
                    power_w: Some(960.5 + (i % 100) as f64),
                    energy_wh: Some(1_523_400.0 + i as f64),
                    frequency_hz: Some(50.01),
                    power_factor: Some(0.98),
                    ..Default::default()
                },
            }
        })
        .collect()
}

/// CPU seconds (user + system) used so far by process `pid`, from
/// `/proc/PID/stat` (Linux; `None` elsewhere or without access).
fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are
    // fields 14 and 15 of the whole line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

/// Result of one run.
struct Rate {
    /// Wall-clock rows/s.
    rows_per_s: f64,
    /// Rows per CPU-second of the writing server backend (what one
    /// otherwise idle core could sustain for it), if measurable.
    rows_per_backend_cpu_s: Option<f64>,
}

/// Writes `data` in batches of `batch`.
fn run(store: &mut PgStore, data: &[Row], batch: usize) -> Result<Rate, String> {
    let pid = store.backend_pid().map_err(|e| e.to_string())?.to_string();
    let cpu0 = cpu_secs(&pid);
    let start = Instant::now();
    for chunk in data.chunks(batch) {
        store.insert_batch(chunk).map_err(|e| e.to_string())?;
    }
    let wall = start.elapsed().as_secs_f64();
    // A fallback reconnect would change the backend; then no CPU figure.
    let same = store.backend_pid().ok().map(|p| p.to_string()) == Some(pid.clone());
    let cpu = match (cpu0, cpu_secs(&pid)) {
        (Some(a), Some(b)) if same && b > a => Some(b - a),
        _ => None,
    };
    Ok(Rate {
        rows_per_s: data.len() as f64 / wall,
        rows_per_backend_cpu_s: cpu.map(|c| data.len() as f64 / c),
    })
}

fn count(url: &str) -> i64 {
    postgres::Client::connect(url, postgres::NoTls)
        .and_then(|mut c| c.query_one("SELECT count(*) FROM readings", &[]))
        .map(|r| r.get(0))
        .unwrap_or(-1)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let per_run: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let sustained: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000_000);

    let _cluster;
    let server = match std::env::var("EMS_BENCH_DATABASE_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => {
            let c = match pg::Cluster::start(pg::ClusterOptions {
                fsync: true,
                tls: false,
            }) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("cannot start a PostgreSQL cluster: {e}");
                    std::process::exit(1);
                }
            };
            let u = c.admin_url.clone();
            _cluster = c;
            u
        }
    };

    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "?".into())
    };
    println!(
        "load average at start: {} ({} CPUs)",
        loadavg(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "rows per run: {per_run}; {DEVICES} devices; dedup on; fsync + synchronous_commit on\n"
    );
    println!("rows/s wall clock (in brackets: rows per CPU-second of the PostgreSQL backend)\n");
    println!("| method | batch rows | new rows/s | 10% resent rows/s | all resent rows/s |");
    println!("|---|---:|---:|---:|---:|");
    let data = rows(per_run, 0);
    for method in [
        WriteMethod::Copy,
        WriteMethod::StagedCopy,
        WriteMethod::MultiRowInsert,
    ] {
        for batch in [100usize, 1_000, 5_000, 10_000] {
            let db = pg::create_db(&server);
            let opts = PgOptions {
                write_method: method,
                ..PgOptions::default()
            };
            let mut s = match PgStore::open(&db.url, &opts) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    std::process::exit(1);
                }
            };
            let fresh = run(&mut s, &data[..per_run as usize / 2], batch);
            // Batches where every tenth row was already stored (an edge
            // replaying its outbox after a lost ack).
            let half = per_run as usize / 2;
            let mut mixed = Vec::with_capacity(half);
            for (i, r) in data[half..].iter().enumerate() {
                if i % 10 == 0 {
                    mixed.push(data[i].clone());
                } else {
                    mixed.push(r.clone());
                }
            }
            let mixed_rate = run(&mut s, &mixed, batch);
            // Everything again: pure dedup.
            let again = run(&mut s, &data[..half], batch);
            let stored = count(&db.url);
            let expect = half as i64 + (half - half.div_ceil(10)) as i64;
            let fmt = |r: Result<Rate, String>| match r {
                Ok(Rate {
                    rows_per_s,
                    rows_per_backend_cpu_s: Some(c),
                }) => format!("{rows_per_s:.0} ({c:.0})"),
                Ok(r) => format!("{:.0}", r.rows_per_s),
                Err(e) => format!("error: {e}"),
            };
            println!(
                "| {} | {batch} | {} | {} | {} |{}",
                match method {
                    WriteMethod::Copy => "binary COPY direct (default)",
                    WriteMethod::StagedCopy => "binary COPY → stage → INSERT … ON CONFLICT",
                    WriteMethod::MultiRowInsert => "multi-row INSERT",
                },
                fmt(fresh),
                fmt(mixed_rate),
                fmt(again),
                if stored == expect {
                    String::new()
                } else {
                    format!(" (stored {stored}, expected {expect}!)")
                }
            );
        }
    }

    if sustained > 0 {
        let db = pg::create_db(&server);
        let mut s = PgStore::open(&db.url, &PgOptions::default()).unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(1)
        });
        let data = rows(sustained, 0);
        let batch = 5_000;
        let quarter = data.len() / 4;
        let start = Instant::now();
        let mut quarters = Vec::new();
        let mut cpu_rates = Vec::new();
        for q in data.chunks(quarter.max(1)) {
            match run(&mut s, q, batch) {
                Ok(r) => {
                    quarters.push(r.rows_per_s);
                    cpu_rates.extend(r.rows_per_backend_cpu_s);
                }
                Err(e) => {
                    eprintln!("{e}");
                    std::process::exit(1);
                }
            }
        }
        let total = start.elapsed();
        let list = |v: &[f64]| {
            v.iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "\nsustained: {sustained} rows in batches of {batch} (binary COPY): {:.0} rows/s overall \
             ({:.1} s); by quarter: {}; rows per backend CPU-second by quarter: {}; stored {}",
            sustained as f64 / total.as_secs_f64(),
            total.as_secs_f64(),
            list(&quarters),
            list(&cpu_rates),
            count(&db.url)
        );
    }
    println!("load average at end: {}", loadavg());
    // Let the watcher see nothing still connected.
    std::thread::sleep(Duration::from_millis(100));
}
