//! Chaos test, Jepsen total-queue style: several real `ems-edge`
//! processes stream sequence-numbered readings through a fault-injecting
//! TCP proxy to a hub that is SIGKILLed and restarted, while the edges are
//! SIGKILLed and restarted too and their spool file system fills up during
//! an outage; afterwards, for every edge, the accounting identity holds:
//!
//! `sampled = stored + quarantined + (counted as dropped − counted but
//! delivered) + kept + lost to SIGKILL`
//!
//! - `sampled` is the meter's own record: the simulated meter appends every
//!   sample to its `sample_log` before the sample leaves the meter, so a
//!   reading lost anywhere after that (sampler, outbox, spool, link, hub)
//!   shows. Every 97th sample carries an out-of-range voltage
//!   (`invalid_every`); the hub must quarantine it.
//! - The k-th sample a process logged is `seq` k of that process's epoch
//!   (one meter): each is matched to the row stored, or quarantined, under
//!   that (epoch, seq), and its values must be the stored ones. A sample
//!   with neither is a hole in the epoch's `seq` range.
//! - `counted as dropped`: the edge's own counters (spool bound, disk full,
//!   damaged records) from the final log line of every process that was
//!   stopped cleanly. Holes outside SIGKILL tails must never exceed it. It
//!   may exceed them: a reading dropped while in flight counts as lost
//!   when its connection ends unacknowledged, yet the hub may have stored
//!   it ([`Account::counted_but_delivered`], bounded by the stored
//!   readings in or right after the dropped range). `kept` is what the
//!   last process left in its spool (0 after the drain).
//! - `lost to SIGKILL`: a SIGKILLed edge loses the readings the hub had not
//!   acknowledged and it had not yet written (the spool's sync interval,
//!   by design) and cannot count them. Such holes must lie among the last
//!   [`KILL_WINDOW`] samples of a killed process; they are reported as
//!   their own term of the identity, never folded into another.
//! - No duplicates by content (meter, `ts_ms`, every value), and every
//!   meter's `energy_wh` never decreases in (epoch, seq) order.
//!
//! - The hub is a real process: this test binary re-executed with
//!   `EMS_CHAOS_HUB_*` set runs `ems_hub::run` in [`hub_child_process`]
//!   (the `ems-hub` binary is not built for the edge's tests), so SIGKILL
//!   is real: no flush, no graceful close, acks in flight lost.
//! - The proxy cuts connections after a random number of bytes, in the
//!   middle of WebSocket frames, and forwards in random small slices
//!   (partial writes).
//! - Each edge is SIGKILLed and restarted three times (hub up, hub down,
//!   just after the hub's restart); the spools live on a small tmpfs that
//!   is filled during the second hub outage and freed after it (root only:
//!   without it the disk-full fault is skipped loudly, a failure with
//!   `EMS_REQUIRE_TMPFS=1`). At the end the edges get SIGTERM and are
//!   restarted once to drain what they had not delivered.
//!
//! Two runs: SQLite, and PostgreSQL on a private throwaway cluster (the
//! test kit's, `ems_testkit::pg`) that is also restarted
//! (`pg_ctl restart -m fast`) twice during the chaos. Without the
//! PostgreSQL binaries the second run SKIPs loudly, unless
//! `EMS_REQUIRE_POSTGRES=1` (CI).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ems_edge::meters::simulated::INVALID_VOLTAGE_V;
use ems_testkit::hub::bind_retrying;
use ems_testkit::pg;

use crate::harness::{free_port, FinalCounts, Tmpfs};

const DEVICES: usize = 3;
/// Chaos phase length.
const CHAOS: Duration = Duration::from_secs(30);
/// Bound for the drain after the chaos.
const DRAIN: Duration = Duration::from_secs(90);
/// Sample interval of the edges during the chaos, ms.
const SAMPLE_MS: u64 = 20;
/// The edges' spool sync interval, ms: a SIGKILL loses at most the
/// readings of about one interval that the hub had not acknowledged.
const SYNC_MS: u64 = 100;
/// How many of a SIGKILLed process's last samples may be lost: five sync
/// intervals' worth (the supervisor's sync can be late on a loaded
/// machine; what was observed is printed).
const KILL_WINDOW: usize = (5 * SYNC_MS / SAMPLE_MS) as usize;
/// The edges' spool bound: its quarter (64 KiB, about 250 readings, 5 s at
/// 50 Hz) bounds the readings held in memory while the spool cannot be
/// written, so the 8 s disk-full outage drops some (counted).
const SPOOL_BOUND: &str = "spool_max_bytes = 262144\n";
/// The edge's default in-flight window.
const MAX_IN_FLIGHT: u64 = 512;
/// Every this many samples, the test meter emits an out-of-range voltage.
const INVALID_EVERY: u64 = 97;

/// Not a test when run normally: with `EMS_CHAOS_HUB_DB` set (the chaos
/// test re-executes this binary) it runs a hub until killed.
#[test]
fn hub_child_process() {
    let (Ok(db), Ok(port)) = (
        std::env::var("EMS_CHAOS_HUB_DB"),
        std::env::var("EMS_CHAOS_HUB_PORT"),
    ) else {
        return;
    };
    let port: u16 = port.parse().unwrap();
    let mut config = ems_hub::Config::new(db);
    config.batch_linger = Duration::ZERO;
    config.ping_interval = Duration::from_secs(2);
    if let Ok(rate) = std::env::var("EMS_CHAOS_HUB_RATE") {
        let rate: f64 = rate.parse().unwrap();
        config.rate_limit.rate = rate;
        config.rate_limit.burst = rate * 1.5;
        config.rate_limit.abuse_after = Duration::from_secs(3600);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = bind_retrying(port, Instant::now() + Duration::from_secs(30)).await;
        eprintln!("chaos hub listening on {port}");
        ems_hub::run(listener, config, std::future::pending())
            .await
            .unwrap();
    });
}

struct HubProc {
    child: Option<Child>,
    db: String,
    port: u16,
    log_dir: PathBuf,
    starts: u32,
    /// Per-device rate limit (frames/s) for the hub, if not the default.
    rate: Option<u32>,
}

impl HubProc {
    fn start(&mut self) {
        self.starts += 1;
        let log = fs::File::create(self.log_dir.join(format!("hub-{}.log", self.starts))).unwrap();
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "chaos::hub_child_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("EMS_CHAOS_HUB_DB", &self.db)
            .env("EMS_CHAOS_HUB_PORT", self.port.to_string())
            .envs(self.rate.map(|r| ("EMS_CHAOS_HUB_RATE", r.to_string())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// Fault-injecting TCP proxy: each connection is cut after a random byte
/// budget (either direction, mid-frame), and bytes are forwarded in random
/// slices.
struct Proxy {
    /// The port it listens on.
    port: u16,
    faults: Arc<AtomicBool>,
    cuts: Arc<AtomicU64>,
    conns: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// A proxy on a free port (never `upstream`'s: it would connect to
    /// itself) forwarding to `upstream`.
    fn start(upstream: u16) -> Proxy {
        let listener = loop {
            let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
            if l.local_addr().unwrap().port() != upstream {
                break l;
            }
        };
        let p = Proxy {
            port: listener.local_addr().unwrap().port(),
            faults: Arc::new(AtomicBool::new(true)),
            cuts: Arc::new(AtomicU64::new(0)),
            conns: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (faults, cuts, conns, stop) = (
            p.faults.clone(),
            p.cuts.clone(),
            p.conns.clone(),
            p.stop.clone(),
        );
        std::thread::spawn(move || {
            let mut seed = 1u64;
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    // Hub down: the edge sees a refused/closed connection.
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                seed += 1;
                let mut rng = fastrand::Rng::with_seed(seed);
                // Budget of bytes before the cut: 500 B .. 60 kB.
                let budget = if faults.load(Ordering::SeqCst) {
                    rng.u64(500..60_000)
                } else {
                    u64::MAX
                };
                let spent = Arc::new(AtomicU64::new(0));
                for (from, to, s) in [
                    (client.try_clone(), server.try_clone(), 1),
                    (server.try_clone(), client.try_clone(), 2),
                ] {
                    let (Ok(from), Ok(to)) = (from, to) else {
                        continue;
                    };
                    let (spent, cuts, faults) = (spent.clone(), cuts.clone(), faults.clone());
                    let mut rng = fastrand::Rng::with_seed(seed * 7 + s);
                    std::thread::spawn(move || {
                        pump(from, to, budget, &spent, &cuts, &faults, &mut rng)
                    });
                }
            }
        });
        p
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    budget: u64,
    spent: &AtomicU64,
    cuts: &AtomicU64,
    faults: &AtomicBool,
    rng: &mut fastrand::Rng,
) {
    let mut buf = [0u8; 8192];
    let cut = |from: &TcpStream, to: &TcpStream| {
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    };
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        let mut off = 0;
        while off < n {
            let slice = rng.usize(1..=(n - off));
            let before = spent.fetch_add(slice as u64, Ordering::SeqCst);
            if faults.load(Ordering::SeqCst) && before + slice as u64 > budget {
                // Forward part of this slice, then cut mid-frame.
                let part = (budget.saturating_sub(before) as usize).min(slice);
                let _ = to.write_all(&buf[off..off + part]);
                cuts.fetch_add(1, Ordering::SeqCst);
                cut(&from, &to);
                return;
            }
            if to.write_all(&buf[off..off + slice]).is_err() {
                cut(&from, &to);
                return;
            }
            off += slice;
            if rng.u8(..) < 8 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

struct EdgeProc {
    child: Child,
}

impl EdgeProc {
    fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn spawn(config: &Path, token: &str, log: &Path) -> EdgeProc {
        let stderr = fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ems-edge"))
            .env_remove("NOTIFY_SOCKET")
            .env_remove("CREDENTIALS_DIRECTORY")
            .args(["--log-level", "trace", "run", "--config"])
            .arg(config)
            .env("EMS_DEVICE_TOKEN", token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        EdgeProc { child }
    }

    fn terminate(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("edge ignored SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EdgeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn edge_config(dir: &Path, device: &str, port: u16, sample_ms: u64) -> PathBuf {
    edge_config_in(dir, dir, device, port, sample_ms, "", "")
}

/// The edge config with its spool under `spool_root`, `top_extra` added to
/// the top-level keys and `meter_extra` to the meter's table.
fn edge_config_in(
    dir: &Path,
    spool_root: &Path,
    device: &str,
    port: u16,
    sample_ms: u64,
    top_extra: &str,
    meter_extra: &str,
) -> PathBuf {
    let spool = spool_root.join(format!("spool-{device}"));
    let text = format!(
        r#"device_id = "{device}"
hub_url = "ws://127.0.0.1:{port}"
allow_insecure = true
trust_clock = true
sample_interval_ms = {sample_ms}
spool_dir = "{spool}"
spool_sync_interval_ms = {SYNC_MS}
{top_extra}
[link]
backoff_base_ms = 50
backoff_cap_ms = 500
stable_after_ms = 1000
connect_timeout_ms = 3000

[[meter]]
id = "main"
kind = "simulated"
seed = 7
{meter_extra}"#,
        spool = spool.display()
    );
    let path = dir.join(format!("{device}-{sample_ms}.toml"));
    fs::write(&path, text).unwrap();
    path
}

/// (epoch, seq) the edge logged as sampled, from all of its logs.
fn sampled(logs: &[PathBuf]) -> BTreeSet<(u64, u64)> {
    let mut out = BTreeSet::new();
    for log in logs {
        let text = fs::read_to_string(log).unwrap_or_default();
        for line in text.lines() {
            let Some(rest) = line.split("sampled epoch ").nth(1) else {
                continue;
            };
            let mut it = rest.split_whitespace();
            let epoch = it.next().and_then(|e| e.parse().ok());
            let seq = (it.next() == Some("seq"))
                .then(|| it.next())
                .flatten()
                .and_then(|s| s.parse().ok());
            if let (Some(e), Some(s)) = (epoch, seq) {
                out.insert((e, s));
            }
        }
    }
    out
}

/// (device, epoch, seq) -> number of rows.
fn stored(db_path: &Path) -> BTreeMap<(String, u64, u64), u64> {
    let Ok(conn) =
        rusqlite::Connection::open_with_flags(db_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return BTreeMap::new();
    };
    let _ = conn.busy_timeout(Duration::from_secs(10));
    let Ok(mut stmt) = conn.prepare(
        "SELECT device_id, epoch, seq, count(*) FROM readings GROUP BY device_id, epoch, seq",
    ) else {
        return BTreeMap::new();
    };
    let rows = stmt
        .query_map([], |r| {
            Ok((
                (
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                ),
                r.get::<_, i64>(3)? as u64,
            ))
        })
        .unwrap();
    rows.map(|r| r.unwrap()).collect()
}

/// One row of `readings`.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    device: String,
    epoch: u64,
    seq: u64,
    ts_ms: i64,
    meter: String,
    /// Every measurement, in the protocol's order.
    values: Vec<Option<f64>>,
}

/// One row of `quarantine`.
#[derive(Debug, Clone)]
struct Quarantined {
    device: String,
    epoch: Option<u64>,
    seq: Option<u64>,
    reason: String,
    raw: Option<String>,
}

/// Both tables, or `None` while the database cannot be read.
type Tables = Option<(Vec<Row>, Vec<Quarantined>)>;

fn readings_sql(ts_ms: &str) -> String {
    format!(
        "SELECT device_id, epoch, seq, {ts_ms}, meter, {} FROM readings",
        ems_shared::Measurement::COLUMNS
    )
}

const QUARANTINE_SQL: &str = "SELECT device_id, epoch, seq, reason, raw FROM quarantine";

fn tables_sqlite(db_path: &Path) -> Tables {
    let conn =
        rusqlite::Connection::open_with_flags(db_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.busy_timeout(Duration::from_secs(10)).ok()?;
    let mut stmt = conn.prepare(&readings_sql("ts")).ok()?;
    let rows = stmt
        .query_map([], |r| {
            Ok(Row {
                device: r.get(0)?,
                epoch: r.get::<_, i64>(1)? as u64,
                seq: r.get::<_, i64>(2)? as u64,
                ts_ms: r.get(3)?,
                meter: r.get(4)?,
                values: (0..ems_shared::Measurement::COUNT)
                    .map(|i| r.get(5 + i))
                    .collect::<Result<_, _>>()?,
            })
        })
        .ok()?
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let mut stmt = conn.prepare(QUARANTINE_SQL).ok()?;
    let quarantined = stmt
        .query_map([], |r| {
            Ok(Quarantined {
                device: r.get(0)?,
                epoch: r.get::<_, Option<i64>>(1)?.map(|v| v as u64),
                seq: r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
                reason: r.get(3)?,
                raw: r.get(4)?,
            })
        })
        .ok()?
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    Some((rows, quarantined))
}

fn tables_pg(url: &str) -> Tables {
    let mut c = postgres::Client::connect(url, postgres::NoTls).ok()?;
    let rows = c
        .query(
            &readings_sql("(extract(epoch FROM ts) * 1000)::bigint"),
            &[],
        )
        .ok()?
        .iter()
        .map(|r| Row {
            device: r.get(0),
            epoch: r.get::<_, i64>(1) as u64,
            seq: r.get::<_, i64>(2) as u64,
            ts_ms: r.get(3),
            meter: r.get(4),
            values: (0..ems_shared::Measurement::COUNT)
                .map(|i| r.get(5 + i))
                .collect(),
        })
        .collect();
    let quarantined = c
        .query(QUARANTINE_SQL, &[])
        .ok()?
        .iter()
        .map(|r| Quarantined {
            device: r.get(0),
            epoch: r.get::<_, Option<i64>>(1).map(|v| v as u64),
            seq: r.get::<_, Option<i64>>(2).map(|v| v as u64),
            reason: r.get(3),
            raw: r.get(4),
        })
        .collect();
    Some((rows, quarantined))
}

#[test]
fn chaos_sqlite_nothing_lost_nothing_duplicated() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("hub.db");
    let db = format!("sqlite:{}", db_path.display());
    chaos(dir, &db, &|| tables_sqlite(&db_path), None);
}

#[test]
fn chaos_postgres_with_database_restarts() {
    let opts = pg::ClusterOptions {
        fsync: true,
        tls: false,
    };
    let Some(cluster) = pg::own_cluster(opts, "the chaos test with database restarts") else {
        return;
    };
    let testdb = pg::create_db(&cluster.admin_url);
    let dir = tempfile::tempdir().unwrap();
    let url = testdb.url.clone();
    let restart = || {
        let t = Instant::now();
        cluster.restart().expect("pg_ctl restart");
        eprintln!("chaos: PostgreSQL restarted in {:?}", t.elapsed());
    };
    chaos(dir, &url, &|| tables_pg(&url), Some(&restart));
}

/// One line of a meter's sample log.
#[derive(Debug, Clone)]
struct Sample {
    pid: u32,
    meter: String,
    values: Vec<Option<f64>>,
}

impl Sample {
    fn invalid(&self) -> bool {
        self.values[0] == Some(INVALID_VOLTAGE_V)
    }
}

fn parse_value(v: &str) -> Option<f64> {
    (v != "-").then(|| v.parse().expect("a sample log value"))
}

fn sample_log(path: &Path) -> Vec<Sample> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        // A line cut by a SIGKILL in the middle of its write is not a
        // sample that reached the sampler.
        .filter(|l| l.split(' ').count() == 2 + ems_shared::Measurement::COUNT)
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Sample {
                pid: f[0].parse().unwrap(),
                meter: f[1].to_string(),
                values: f[2..].iter().map(|v| parse_value(v)).collect(),
            }
        })
        .collect()
}

/// The values a quarantined frame carried.
fn raw_values(raw: &str) -> Option<(String, Vec<Option<f64>>)> {
    use ems_shared::Measured;
    let r: ems_shared::Reading = serde_json::from_str(raw).ok()?;
    let values = ems_shared::Measurement::ALL
        .iter()
        .map(|m| r.get(*m))
        .collect();
    Some((r.meter, values))
}

/// One `ems-edge` process of the run.
struct Run {
    device: usize,
    pid: u32,
    log: PathBuf,
    killed: bool,
}

/// The epoch a process announced in its log.
fn epoch_of(log: &Path) -> Option<u64> {
    let text = fs::read_to_string(log).ok()?;
    let rest = text.split(" epoch ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The accounting of one device.
#[derive(Debug, Default)]
struct Account {
    sampled: usize,
    invalid_sampled: usize,
    stored: usize,
    quarantined: usize,
    counted: u64,
    kept: u64,
    lost_to_sigkill: usize,
    /// Missing samples outside any killed process's tail, (epoch, seq).
    unexplained: Vec<(u64, u64)>,
    /// Samples whose stored or quarantined values differ from the sample.
    wrong: Vec<String>,
    /// Rows of this device that match no sample.
    unexpected: Vec<String>,
    /// Rows with the same (meter, ts_ms, values), and how many.
    duplicates: Vec<String>,
    /// Energy going backwards in (epoch, seq) order.
    backwards: Vec<String>,
    /// Per killed process, how many of its last samples were lost.
    kill_losses: Vec<usize>,
    /// Holes per epoch (seqs neither stored nor quarantined).
    holes: BTreeMap<u64, usize>,
    /// Per process stopped cleanly: its epoch and what it counted as
    /// dropped.
    per_process: Vec<(u64, u64)>,
    /// Stored readings among or just after the unexplained holes of their
    /// epoch: the only readings the edge can have counted as dropped and
    /// yet delivered (see [`Account::counted_but_delivered`]).
    delivered_candidates: usize,
}

impl Account {
    /// Readings counted as dropped that the hub has anyway. The spool can
    /// drop a reading that is in flight; the edge counts it as lost when
    /// the connection ends before its ack, but the hub may have stored it
    /// and lost only the ack (a cut, a hub SIGKILL after the commit). The
    /// edge cannot tell, so its count is an upper bound; here the excess
    /// must be stored readings in or right after the dropped range.
    fn counted_but_delivered(&self) -> i64 {
        self.counted as i64 - self.unexplained.len() as i64
    }
}

/// Matches every sample of `device` to what the hub kept, process by
/// process (`runs` in start order).
fn account(
    id: &str,
    device: usize,
    runs: &[Run],
    samples: &[Sample],
    rows: &[Row],
    quarantined: &[Quarantined],
) -> Account {
    let mut a = Account::default();
    let by_key: BTreeMap<(u64, u64), &Row> = rows
        .iter()
        .filter(|r| r.device == id)
        .map(|r| ((r.epoch, r.seq), r))
        .collect();
    let q_by_key: BTreeMap<(u64, u64), &Quarantined> = quarantined
        .iter()
        .filter(|q| q.device == id)
        .filter_map(|q| Some(((q.epoch?, q.seq?), q)))
        .collect();
    let mut matched = BTreeSet::new();
    let mut last_epoch = None;
    for run in runs.iter().filter(|r| r.device == device) {
        let mine: Vec<&Sample> = samples.iter().filter(|s| s.pid == run.pid).collect();
        a.sampled += mine.len();
        a.invalid_sampled += mine.iter().filter(|s| s.invalid()).count();
        if mine.is_empty() {
            continue;
        }
        let epoch = epoch_of(&run.log).unwrap_or_else(|| panic!("no epoch in {:?}", run.log));
        assert!(
            last_epoch.map_or(true, |e| epoch > e),
            "{id}: epochs do not increase with the process order"
        );
        last_epoch = Some(epoch);
        if !run.killed {
            let log = fs::read_to_string(&run.log).unwrap_or_default();
            let c = FinalCounts::from_log(&log)
                .unwrap_or_else(|| panic!("no final counters in {:?}", run.log));
            let counted = c.dropped_full + c.dropped_disk_full + c.damaged;
            a.counted += counted;
            a.per_process.push((epoch, counted));
            a.kept = c.kept;
        }
        let mut lost_here = 0;
        for (k, s) in mine.iter().enumerate() {
            let key = (epoch, k as u64);
            let row = by_key.get(&key);
            let q = q_by_key.get(&key);
            match (row, q) {
                (Some(r), None) => {
                    a.stored += 1;
                    matched.insert(key);
                    if r.meter != s.meter || r.values != s.values || s.invalid() {
                        a.wrong
                            .push(format!("stored {key:?}: {r:?} vs sampled {s:?}"));
                    }
                }
                (None, Some(q)) => {
                    a.quarantined += 1;
                    matched.insert(key);
                    let same = q
                        .raw
                        .as_deref()
                        .and_then(raw_values)
                        .is_some_and(|(m, v)| m == s.meter && v == s.values);
                    if !same || !s.invalid() || q.reason != "out_of_range" {
                        a.wrong
                            .push(format!("quarantined {key:?}: {q:?} vs sampled {s:?}"));
                    }
                }
                (Some(_), Some(_)) => {
                    a.wrong.push(format!("{key:?} both stored and quarantined"));
                }
                (None, None) => {
                    *a.holes.entry(epoch).or_default() += 1;
                    if run.killed && k + KILL_WINDOW >= mine.len() {
                        lost_here += 1;
                    } else {
                        a.unexplained.push(key);
                    }
                }
            }
        }
        if run.killed {
            a.kill_losses.push(lost_here);
            a.lost_to_sigkill += lost_here;
        }
    }
    let mut hole_ranges: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for (e, seq) in &a.unexplained {
        let r = hole_ranges.entry(*e).or_insert((*seq, *seq));
        r.0 = r.0.min(*seq);
        r.1 = r.1.max(*seq);
    }
    a.delivered_candidates = by_key
        .keys()
        .filter(|(e, seq)| {
            hole_ranges
                .get(e)
                .is_some_and(|(lo, hi)| *seq > *lo && *seq <= *hi + MAX_IN_FLIGHT)
        })
        .count();
    for key in by_key.keys().chain(q_by_key.keys()) {
        if !matched.contains(key) {
            a.unexpected.push(format!("{key:?}"));
        }
    }
    for q in quarantined.iter().filter(|q| q.device == id) {
        if q.epoch.is_none() || q.seq.is_none() {
            a.unexpected.push(format!("{q:?}"));
        }
    }
    // Duplicates by content, whatever their key.
    let mut content: BTreeMap<(String, i64, Vec<Option<u64>>), usize> = BTreeMap::new();
    for r in by_key.values() {
        let bits = r.values.iter().map(|v| v.map(f64::to_bits)).collect();
        *content.entry((r.meter.clone(), r.ts_ms, bits)).or_default() += 1;
    }
    for (k, n) in content {
        if n > 1 {
            a.duplicates.push(format!("{n}× {k:?}"));
        }
    }
    // Energy never goes backwards, in (epoch, seq) order.
    let energy = ems_shared::Measurement::ALL
        .iter()
        .position(|m| m.name() == "energy_wh")
        .unwrap();
    let mut last: BTreeMap<&str, ((u64, u64), f64)> = BTreeMap::new();
    for (key, r) in &by_key {
        let Some(e) = r.values[energy] else { continue };
        if let Some((at, prev)) = last.get(r.meter.as_str()) {
            if e < *prev {
                a.backwards
                    .push(format!("{} {prev} at {at:?} -> {e} at {key:?}", r.meter));
            }
        }
        last.insert(&r.meter, (*key, e));
    }
    a
}

type TablesFn<'a> = &'a dyn Fn() -> Tables;

/// One chaos run against the database at `db`; `db_restart` (if any) is
/// called twice during the chaos.
fn chaos(dir: tempfile::TempDir, db: &str, tables: TablesFn, db_restart: Option<&dyn Fn()>) {
    let started = Instant::now();
    let db = db.to_string();
    let mut admin = ems_hub::admin::Admin::open(&db).unwrap();
    let devices: Vec<(String, String)> = (0..DEVICES)
        .map(|i| {
            let id = format!("chaos-{i}");
            let token = admin.add_device(&id).unwrap();
            (id, token)
        })
        .collect();
    drop(admin);

    // The spools share a small file system that the chaos fills up.
    let spool_root = dir.path().join("spools");
    let tmpfs = Tmpfs::mount(&spool_root, "8m");
    if tmpfs.is_none() {
        eprintln!("chaos: SKIPPING the disk-full fault (no tmpfs); the other faults run");
    }
    let sample_logs: Vec<PathBuf> = devices
        .iter()
        .map(|(id, _)| dir.path().join(format!("{id}-samples.log")))
        .collect();
    let meter_extra = |i: usize| {
        format!(
            "sample_log = \"{}\"\ninvalid_every = {INVALID_EVERY}\n",
            sample_logs[i].display()
        )
    };

    let hub_port = free_port();
    let mut hub = HubProc {
        child: None,
        db: db.clone(),
        port: hub_port,
        log_dir: dir.path().to_path_buf(),
        starts: 0,
        rate: None,
    };
    hub.start();
    let proxy = Proxy::start(hub_port);
    let proxy_port = proxy.port;

    let mut runs: Vec<Run> = Vec::new();
    let spawn = |i: usize, sample_ms: u64, runs: &mut Vec<Run>| {
        let (id, token) = &devices[i];
        let cfg = edge_config_in(
            dir.path(),
            &spool_root,
            id,
            proxy_port,
            sample_ms,
            SPOOL_BOUND,
            &meter_extra(i),
        );
        let log = dir.path().join(format!("{id}-run{}.log", runs.len()));
        let e = EdgeProc::spawn(&cfg, token, &log);
        runs.push(Run {
            device: i,
            pid: e.child.id(),
            log,
            killed: false,
        });
        (e, runs.len() - 1)
    };
    let mut edges: Vec<(EdgeProc, usize)> = (0..DEVICES)
        .map(|i| spawn(i, SAMPLE_MS, &mut runs))
        .collect();

    // Chaos: random cuts all along (proxy); each edge SIGKILLed and
    // restarted three times; the hub SIGKILLed twice; the spools' file
    // system full during the second hub outage; the database restarted
    // twice (PostgreSQL run).
    #[derive(Clone, Copy, Debug)]
    enum Ev {
        KillEdges,
        KillHub,
        StartHub,
        RestartDb,
        FillDisk,
        FreeDisk,
    }
    let schedule = [
        (3_000, Ev::KillEdges),
        (8_000, Ev::KillHub),
        (9_000, Ev::KillEdges),
        (10_000, Ev::StartHub),
        (12_000, Ev::KillEdges),
        (14_000, Ev::RestartDb),
        (17_000, Ev::KillHub),
        (17_000, Ev::FillDisk),
        (25_000, Ev::StartHub),
        (26_000, Ev::FreeDisk),
        (27_000, Ev::RestartDb),
    ];
    let mut hub_kills = 0;
    let mut edge_kills = 0;
    let mut db_restarts = 0;
    let mut ballast = None;
    let t0 = Instant::now();
    for (at_ms, ev) in schedule {
        while t0.elapsed() < Duration::from_millis(at_ms) {
            std::thread::sleep(Duration::from_millis(20));
        }
        match ev {
            Ev::KillEdges => {
                for i in 0..DEVICES {
                    // Staggered, so the kills land at different moments of
                    // each edge's sync cycle.
                    std::thread::sleep(Duration::from_millis(37 * i as u64));
                    edges[i].0.sigkill();
                    runs[edges[i].1].killed = true;
                    edge_kills += 1;
                    edges[i] = spawn(i, SAMPLE_MS, &mut runs);
                }
            }
            Ev::KillHub => {
                hub.sigkill();
                hub_kills += 1;
            }
            Ev::StartHub => hub.start(),
            Ev::RestartDb => {
                if let Some(restart) = db_restart {
                    restart();
                    db_restarts += 1;
                }
            }
            Ev::FillDisk => ballast = tmpfs.as_ref().map(|fs| fs.fill("ballast")),
            Ev::FreeDisk => {
                if let Some(b) = ballast.take() {
                    fs::remove_file(b).unwrap();
                }
            }
        }
    }
    while t0.elapsed() < CHAOS {
        std::thread::sleep(Duration::from_millis(50));
    }

    // Stop the faults and the sampling; restart each edge once with a slow
    // sample rate so it drains its outbox.
    proxy.faults.store(false, Ordering::SeqCst);
    for (e, _) in &mut edges {
        e.terminate();
    }
    drop(edges);
    let run_phase = runs.len();
    let mut drainers: Vec<EdgeProc> = (0..DEVICES)
        .map(|i| spawn(i, 3_600_000, &mut runs).0)
        .collect();

    // Wait until every sample is stored or quarantined, apart from what a
    // SIGKILL may have lost and what the stopped processes counted.
    let drain_start = Instant::now();
    loop {
        let settled = tables().is_some_and(|(rows, q)| {
            devices.iter().enumerate().all(|(i, (id, _))| {
                // The drainers are still running: their counters come
                // at their stop.
                let samples = sample_log(&sample_logs[i]);
                let a = account(id, i, &runs[..run_phase], &samples, &rows, &q);
                a.unexplained.len() as u64 <= a.counted
            })
        });
        if settled || drain_start.elapsed() > DRAIN {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    for e in &mut drainers {
        e.terminate();
    }
    drop(drainers);
    hub.sigkill();
    let drain = drain_start.elapsed();

    // The checker.
    let (rows, quarantined) = tables().expect("the database readable at the end");
    let mut failures = Vec::new();
    for (i, (id, _)) in devices.iter().enumerate() {
        let samples = sample_log(&sample_logs[i]);
        let a = account(id, i, &runs, &samples, &rows, &quarantined);
        let processes = runs.iter().filter(|r| r.device == i).count();
        eprintln!(
            "chaos {id}: sampled {} = stored {} + quarantined {} + (counted as dropped {} - of them delivered {}) + kept {} + lost to SIGKILL {} \
             (per kill {:?}, bound {KILL_WINDOW}); {} invalid sampled; {processes} processes; holes per epoch {:?}, counted per epoch {:?}",
            a.sampled,
            a.stored,
            a.quarantined,
            a.counted,
            a.counted_but_delivered(),
            a.kept,
            a.lost_to_sigkill,
            a.kill_losses,
            a.invalid_sampled,
            a.holes,
            a.per_process,
        );
        let mut fail = |what: String| failures.push(format!("{id}: {what}"));
        if a.sampled < 500 {
            fail(format!("only {} samples; sample log broken?", a.sampled));
        }
        if a.invalid_sampled == 0 || a.quarantined == 0 {
            fail("no invalid reading injected and quarantined".into());
        }
        let delivered = a.counted_but_delivered();
        let right = a.stored as i64
            + a.quarantined as i64
            + (a.counted as i64 - delivered)
            + a.kept as i64
            + a.lost_to_sigkill as i64;
        if a.sampled as i64 != right {
            fail(format!("identity broken: sampled {} != {right}", a.sampled));
        }
        if delivered < 0 {
            fail(format!(
                "{} holes outside SIGKILL tails but only {} counted as dropped: {:?}",
                a.unexplained.len(),
                a.counted,
                &a.unexplained[..a.unexplained.len().min(10)]
            ));
        }
        if delivered > a.delivered_candidates as i64 {
            fail(format!(
                "{delivered} counted as dropped but delivered, more than the {} stored readings in or after the dropped ranges",
                a.delivered_candidates
            ));
        }
        for (what, list) in [
            ("wrong values", &a.wrong),
            ("unexpected rows", &a.unexpected),
            ("duplicates by content", &a.duplicates),
            ("energy_wh going backwards", &a.backwards),
        ] {
            if !list.is_empty() {
                fail(format!(
                    "{} {what}, first: {:?}",
                    list.len(),
                    &list[..list.len().min(5)]
                ));
            }
        }
    }
    for r in &rows {
        if !devices.iter().any(|(id, _)| *id == r.device) {
            failures.push(format!("row of an unknown device: {r:?}"));
        }
    }
    let wrote_failed = runs.iter().any(|r| {
        fs::read_to_string(&r.log)
            .unwrap_or_default()
            .contains("spool: write failed")
    });
    eprintln!(
        "chaos: {DEVICES} edges, {} rows stored, {} quarantined, {} proxy connections, {} mid-stream cuts, \
         {hub_kills} hub SIGKILLs + restarts, {edge_kills} edge SIGKILLs + restarts, {db_restarts} database restarts, \
         disk full: {}, chaos {:?}, drain {drain:?}, total {:?}",
        rows.len(),
        quarantined.len(),
        proxy.conns.load(Ordering::SeqCst),
        proxy.cuts.load(Ordering::SeqCst),
        if tmpfs.is_some() { if wrote_failed { "yes" } else { "NOT REACHED" } } else { "skipped" },
        CHAOS,
        started.elapsed()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    if tmpfs.is_some() {
        assert!(wrote_failed, "the spool file system never filled up");
    }
    assert!(
        proxy.cuts.load(Ordering::SeqCst) >= 5,
        "too few faults injected to mean anything"
    );
    proxy.stop.store(true, Ordering::SeqCst);
    drop(tmpfs);
}

/// `GET /metrics` from a hub on `port` (empty on failure).
fn scrape(port: u16) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The rate limit lets a backlog drain without loss: an edge whose backlog
/// (hub down for 5 s) and live rate push it over a tight per-device limit
/// gets `rate_limited` refusals, keeps those readings, reconnects and
/// resends them; at the end every sampled reading is stored exactly once.
#[test]
fn rate_limited_backlog_drains_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("hub.db");
    let db = format!("sqlite:{}", db_path.display());
    let token = ems_hub::admin::Admin::open(&db)
        .unwrap()
        .add_device("limited")
        .unwrap();
    let hub_port = free_port();
    let mut hub = HubProc {
        child: None,
        db: db.clone(),
        port: hub_port,
        log_dir: dir.path().to_path_buf(),
        starts: 0,
        rate: Some(6),
    };
    // 10 readings/s against 6 frames/s (burst 9): the edge sends faster
    // than the limit allows however slowly it starts on a loaded machine,
    // and it starts with the hub down, so ~50 readings pile up first.
    let cfg = edge_config(dir.path(), "limited", hub_port, 100);
    let mut logs = vec![dir.path().join("limited-run1.log")];
    let mut edge = EdgeProc::spawn(&cfg, &token, &logs[0]);
    std::thread::sleep(Duration::from_secs(5));
    hub.start();
    let deadline = Instant::now() + Duration::from_secs(60);
    let limited = loop {
        let m = scrape(hub_port);
        let n = m
            .lines()
            .find_map(|l| l.strip_prefix("ems_readings_rejected_total{reason=\"rate_limited\"} "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if n > 0 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        limited > 0,
        "the edge never hit the rate limit; the test proves nothing"
    );
    std::thread::sleep(Duration::from_secs(5));
    edge.terminate();
    drop(edge);
    let cfg = edge_config(dir.path(), "limited", hub_port, 3_600_000);
    logs.push(dir.path().join("limited-drain.log"));
    let mut drainer = EdgeProc::spawn(&cfg, &token, &logs[1]);
    let deadline = Instant::now() + DRAIN;
    loop {
        let want = sampled(&logs);
        let have = stored(&db_path);
        if want
            .iter()
            .all(|(e, s)| have.contains_key(&("limited".to_string(), *e, *s)))
            || Instant::now() > deadline
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    drainer.terminate();
    drop(drainer);
    hub.sigkill();
    let want = sampled(&logs);
    let have = stored(&db_path);
    let got: BTreeSet<(u64, u64)> = have.keys().map(|(_, e, s)| (*e, *s)).collect();
    eprintln!(
        "rate limit: {} sampled, {} stored, {limited}+ refusals (rate_limited) seen",
        want.len(),
        have.values().sum::<u64>()
    );
    let lost: Vec<_> = want.difference(&got).take(10).collect();
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert_eq!(got, want, "unexpected rows");
    assert!(have.values().all(|n| *n == 1));
}
