//! Chaos test, Jepsen total-queue style: several real `ems-edge`
//! processes stream sequence-numbered readings through a fault-injecting
//! TCP proxy to a hub that is SIGKILLed and restarted; afterwards every
//! reading the edges sampled must be in the store exactly once — nothing
//! lost, nothing duplicated, nothing unexpected.
//!
//! - The hub is a real process: this test binary re-executed with
//!   `EMS_CHAOS_HUB_*` set runs `ems_hub::run` in [`hub_child_process`]
//!   (the `ems-hub` binary is not built for the edge's tests), so SIGKILL
//!   is real: no flush, no graceful close, acks in flight lost.
//! - The proxy cuts connections after a random number of bytes, in the
//!   middle of WebSocket frames, and forwards in random small slices
//!   (partial writes).
//! - The edges' own record is the reference: each edge logs
//!   `sampled epoch E seq S` (trace level) once a reading is in its outbox;
//!   the checker parses those logs. Edges are never SIGKILLed here (their
//!   documented fsync window would make "lost" ambiguous); they get SIGTERM
//!   at the end and are restarted once to drain what they had not delivered.
//! - The checker compares sets and counts per (device, epoch, seq); any
//!   difference fails the test with the first offending ids.
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

use ems_testkit::hub::bind_retrying;
use ems_testkit::pg;

use crate::harness::free_port;

const DEVICES: usize = 3;
/// Chaos phase length.
const CHAOS: Duration = Duration::from_secs(30);
/// Bound for the drain after the chaos.
const DRAIN: Duration = Duration::from_secs(90);

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
    faults: Arc<AtomicBool>,
    cuts: Arc<AtomicU64>,
    conns: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(listen: u16, upstream: u16) -> Proxy {
        let p = Proxy {
            faults: Arc::new(AtomicBool::new(true)),
            cuts: Arc::new(AtomicU64::new(0)),
            conns: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let listener = TcpListener::bind(("127.0.0.1", listen)).unwrap();
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
    let spool = dir.join(format!("spool-{device}"));
    let text = format!(
        r#"device_id = "{device}"
hub_url = "ws://127.0.0.1:{port}"
allow_insecure = true
trust_clock = true
sample_interval_ms = {sample_ms}
spool_dir = "{spool}"
spool_sync_interval_ms = 100

[link]
backoff_base_ms = 50
backoff_cap_ms = 500
stable_after_ms = 1000
connect_timeout_ms = 3000

[[meter]]
id = "main"
kind = "simulated"
seed = 7
"#,
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

/// (device, epoch, seq) -> number of rows, from PostgreSQL (empty while
/// the server restarts).
fn stored_pg(url: &str) -> BTreeMap<(String, u64, u64), u64> {
    let Ok(mut c) = postgres::Client::connect(url, postgres::NoTls) else {
        return BTreeMap::new();
    };
    let Ok(rows) = c.query(
        "SELECT device_id, epoch, seq, count(*) FROM readings GROUP BY device_id, epoch, seq",
        &[],
    ) else {
        return BTreeMap::new();
    };
    rows.iter()
        .map(|r| {
            let (d, e, s, n): (String, i64, i64, i64) = (r.get(0), r.get(1), r.get(2), r.get(3));
            ((d, e as u64, s as u64), n as u64)
        })
        .collect()
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

#[test]
fn chaos_sqlite_nothing_lost_nothing_duplicated() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("hub.db");
    let db = format!("sqlite:{}", db_path.display());
    chaos(dir, &db, &|| stored(&db_path), None);
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
    chaos(dir, &url, &|| stored_pg(&url), Some(&restart));
}

type Stored = BTreeMap<(String, u64, u64), u64>;

/// One chaos run against the database at `db`; `db_restart` (if any) is
/// called twice during the chaos.
fn chaos(
    dir: tempfile::TempDir,
    db: &str,
    stored: &dyn Fn() -> Stored,
    db_restart: Option<&dyn Fn()>,
) {
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

    let hub_port = free_port();
    let proxy_port = free_port();
    let mut hub = HubProc {
        child: None,
        db: db.clone(),
        port: hub_port,
        log_dir: dir.path().to_path_buf(),
        starts: 0,
        rate: None,
    };
    hub.start();
    let proxy = Proxy::start(proxy_port, hub_port);

    let mut logs: Vec<Vec<PathBuf>> = vec![Vec::new(); DEVICES];
    let mut edges: Vec<EdgeProc> = devices
        .iter()
        .enumerate()
        .map(|(i, (id, token))| {
            let cfg = edge_config(dir.path(), id, proxy_port, 20);
            let log = dir.path().join(format!("{id}-run1.log"));
            logs[i].push(log.clone());
            EdgeProc::spawn(&cfg, token, &log)
        })
        .collect();

    // Chaos: random cuts all along (proxy), hub SIGKILLed twice, the
    // database restarted twice (PostgreSQL run).
    let mut kills = 0;
    let mut db_restarts = 0;
    let t0 = Instant::now();
    let schedule = [(8u64, 10u64, 14u64), (18, 21, 25)];
    for (kill_at, restart_at, db_at) in schedule {
        while t0.elapsed() < Duration::from_secs(kill_at) {
            std::thread::sleep(Duration::from_millis(50));
        }
        hub.sigkill();
        kills += 1;
        while t0.elapsed() < Duration::from_secs(restart_at) {
            std::thread::sleep(Duration::from_millis(50));
        }
        hub.start();
        if let Some(restart) = db_restart {
            while t0.elapsed() < Duration::from_secs(db_at) {
                std::thread::sleep(Duration::from_millis(50));
            }
            restart();
            db_restarts += 1;
        }
    }
    while t0.elapsed() < CHAOS {
        std::thread::sleep(Duration::from_millis(50));
    }

    // Stop the faults and the sampling; restart each edge once with a slow
    // sample rate so it drains its outbox.
    proxy.faults.store(false, Ordering::SeqCst);
    for e in &mut edges {
        e.terminate();
    }
    drop(edges);
    let mut drainers: Vec<EdgeProc> = devices
        .iter()
        .enumerate()
        .map(|(i, (id, token))| {
            let cfg = edge_config(dir.path(), id, proxy_port, 3_600_000);
            let log = dir.path().join(format!("{id}-drain.log"));
            logs[i].push(log.clone());
            EdgeProc::spawn(&cfg, token, &log)
        })
        .collect();

    // Wait until every sampled reading is stored (or give up and report).
    let drain_start = Instant::now();
    loop {
        let store = stored();
        let missing: usize = devices
            .iter()
            .enumerate()
            .map(|(i, (id, _))| {
                sampled(&logs[i])
                    .iter()
                    .filter(|(e, s)| !store.contains_key(&(id.clone(), *e, *s)))
                    .count()
            })
            .sum();
        if missing == 0 || drain_start.elapsed() > DRAIN {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for e in &mut drainers {
        e.terminate();
    }
    drop(drainers);
    hub.sigkill();

    // The checker.
    let store = stored();
    let mut total_sampled = 0;
    let mut lost = Vec::new();
    let mut unexpected = Vec::new();
    let mut duplicated = Vec::new();
    for (i, (id, _)) in devices.iter().enumerate() {
        let want = sampled(&logs[i]);
        total_sampled += want.len();
        assert!(
            want.len() > 100,
            "{id}: only {} readings sampled; edge log broken?",
            want.len()
        );
        for (e, s) in &want {
            if !store.contains_key(&(id.clone(), *e, *s)) {
                lost.push((id.clone(), *e, *s));
            }
        }
        for ((d, e, s), n) in &store {
            if d == id && !want.contains(&(*e, *s)) {
                unexpected.push((d.clone(), *e, *s));
            }
            if d == id && *n != 1 {
                duplicated.push((d.clone(), *e, *s, *n));
            }
        }
    }
    for (d, ..) in store.keys() {
        if !devices.iter().any(|(id, _)| id == d) {
            unexpected.push((d.clone(), 0, 0));
        }
    }
    let total_rows: u64 = store.values().sum();
    eprintln!(
        "chaos: {DEVICES} edges, {total_sampled} readings sampled, {total_rows} rows stored, \
         {} proxy connections, {} mid-stream cuts, {kills} hub SIGKILLs + restarts, {db_restarts} database restarts, \
         chaos {:?}, drain {:?}, total {:?}",
        proxy.conns.load(Ordering::SeqCst),
        proxy.cuts.load(Ordering::SeqCst),
        CHAOS,
        drain_start.elapsed(),
        started.elapsed()
    );
    assert!(
        lost.is_empty(),
        "{} lost, first: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        unexpected.is_empty(),
        "{} unexpected, first: {:?}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(10)]
    );
    assert!(duplicated.is_empty(), "duplicated: {duplicated:?}");
    assert_eq!(total_rows as usize, total_sampled);
    assert!(
        proxy.cuts.load(Ordering::SeqCst) >= 5,
        "too few faults injected to mean anything"
    );
    proxy.stop.store(true, Ordering::SeqCst);
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
        rate: Some(20),
    };
    // 10 readings/s against 20 frames/s (burst 30); the edge starts with
    // the hub down, so ~50 readings pile up first.
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
