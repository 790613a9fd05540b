//! End-to-end tests of the edge stream client against the real hub crate,
//! started in-process on a loopback port, with the real `ems-edge` binary as
//! a child process (so SIGTERM and SIGKILL are real).
//!
//! Deadlines are generous and everything is polled: these tests must pass
//! on a loaded 2-core machine. Every test checks at the end that the device
//! token never appears in the edge's stderr (captured at trace level).

use std::collections::BTreeSet;
use std::fs;
use std::io::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bound for anything that should happen "soon".
const SOON: Duration = Duration::from_secs(30);

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A hub running on its own tokio runtime in a background thread.
struct Hub {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Hub {
    fn start(db_url: &str, port: u16, tweak: impl FnOnce(&mut ems_hub::Config)) -> Hub {
        let mut config = ems_hub::Config::new(db_url.to_string());
        tweak(&mut config);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                // The port was just used by a previous hub: retry briefly.
                let deadline = Instant::now() + SOON;
                let listener = loop {
                    match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                        Ok(l) => break l,
                        Err(e) if Instant::now() < deadline => {
                            let _ = e;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("bind 127.0.0.1:{port}: {e}"),
                    }
                };
                ready_tx.send(()).unwrap();
                ems_hub::run(listener, config, async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        ready_rx.recv_timeout(SOON).expect("hub did not start");
        Hub {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("hub thread panicked");
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// One test's world: a temp dir with the hub database, a provisioned
/// device, a port, and the edge config.
struct World {
    dir: tempfile::TempDir,
    db_url: String,
    port: u16,
    token: String,
}

const DEVICE: &str = "dev-1";

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let db_url = format!("sqlite:{}", dir.path().join("hub.db").display());
        let token = ems_hub::admin::Admin::open(&db_url)
            .unwrap()
            .add_device(DEVICE)
            .unwrap();
        World {
            dir,
            db_url,
            port: free_port(),
            token,
        }
    }

    fn hub(&self) -> Hub {
        Hub::start(&self.db_url, self.port, |_| {})
    }

    fn spool_dir(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    /// Writes an edge config; `extra` is appended to the top level,
    /// `link` to the `[link]` table.
    fn config(&self, name: &str, extra: &str, link: &str) -> PathBuf {
        let text = format!(
            r#"device_id = "{DEVICE}"
hub_url = "ws://127.0.0.1:{port}"
allow_insecure = true
trust_clock = true
sample_interval_ms = 50
spool_dir = "{spool}"
spool_sync_interval_ms = 100
{extra}

[link]
backoff_base_ms = 50
backoff_cap_ms = 500
stable_after_ms = 1000
connect_timeout_ms = 3000
poll_ms = 20
{link}

[[meter]]
id = "main"
kind = "simulated"
seed = 1
"#,
            port = self.port,
            spool = self.spool_dir().display(),
        );
        let path = self.dir.path().join(name);
        fs::write(&path, text).unwrap();
        path
    }

    fn edge(&self, config: &Path) -> Edge {
        Edge::spawn(config, &self.token, self.dir.path())
    }

    /// (epoch, seq) of every stored reading of the device.
    fn stored(&self) -> Vec<(u64, u64)> {
        let path = self.db_url.trim_start_matches("sqlite:");
        let Ok(conn) =
            rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        else {
            return vec![];
        };
        let _ = conn.busy_timeout(Duration::from_secs(5));
        let Ok(mut stmt) = conn
            .prepare("SELECT epoch, seq FROM readings WHERE device_id = ?1 ORDER BY epoch, seq")
        else {
            return vec![];
        };
        let rows = stmt
            .query_map([DEVICE], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
            .unwrap();
        rows.map(|r| r.unwrap()).collect()
    }

    fn seqs_of(&self, epoch: u64) -> Vec<u64> {
        self.stored()
            .into_iter()
            .filter(|(e, _)| *e == epoch)
            .map(|(_, s)| s)
            .collect()
    }

    fn count(&self) -> usize {
        self.stored().len()
    }
}

/// Asserts `seqs` (sorted) is exactly 0..=max.
fn assert_contiguous(seqs: &[u64], what: &str) {
    let max = *seqs.last().expect("no readings");
    assert_eq!(
        seqs.len() as u64,
        max + 1,
        "{what}: gaps or duplicates in 0..={max}"
    );
    let set: BTreeSet<_> = seqs.iter().collect();
    assert_eq!(set.len(), seqs.len(), "{what}: duplicates");
}

/// The `ems-edge` binary as a child process, stderr captured to a file.
struct Edge {
    child: Child,
    log: PathBuf,
    token: String,
}

static LOG_COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Edge {
    fn spawn(config: &Path, token: &str, dir: &Path) -> Edge {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ems-edge"));
        cmd.env_remove("NOTIFY_SOCKET");
        Self::spawn_cmd(cmd, config, token, dir)
    }

    fn spawn_cmd(mut cmd: Command, config: &Path, token: &str, dir: &Path) -> Edge {
        let n = LOG_COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = dir.join(format!("edge-{n}.log"));
        let stderr = fs::File::create(&log).unwrap();
        let child = cmd
            .args(["--log-level", "trace", "run", "--config"])
            .arg(config)
            .env("EMS_DEVICE_TOKEN", token)
            .env_remove("CREDENTIALS_DIRECTORY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Edge {
            child,
            log,
            token: token.to_string(),
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn count_in_log(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// The epoch this process logged at start.
    fn epoch(&self) -> u64 {
        let mut epoch = None;
        wait_for("the epoch log line", SOON, || {
            epoch = self.log().split(" epoch ").nth(1).and_then(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            });
            epoch.is_some()
        });
        epoch.unwrap()
    }

    /// The highest seq the sampler logged so far.
    fn last_sampled(&self) -> Option<u64> {
        self.log()
            .lines()
            .filter_map(|l| l.split(" seq ").nth(1)?.trim().parse::<u64>().ok())
            .max()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// SIGTERM and wait; returns the status and how long the exit took.
    fn terminate(&mut self) -> (ExitStatus, Duration) {
        let t = Instant::now();
        self.signal(libc::SIGTERM);
        let deadline = t + SOON;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, t.elapsed());
            }
            assert!(Instant::now() < deadline, "edge ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// The token must never appear in the logs.
    fn assert_token_not_logged(&self) {
        let log = self.log();
        assert!(!log.is_empty(), "no log captured");
        assert!(
            !log.contains(&self.token),
            "the device token appears in the edge's stderr"
        );
        // Not even a recognisable part of it.
        let tail = &self.token[self.token.len() - 16..];
        assert!(!log.contains(tail), "part of the token appears in stderr");
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn streams_readings_and_stops_cleanly_on_sigterm() {
    let w = World::new();
    let _hub = w.hub();
    let mut edge = w.edge(&w.config("edge.toml", "", ""));
    let epoch = edge.epoch();
    wait_for("40 stored readings", SOON, || w.count() >= 40);
    assert!(edge.log().contains("CONNECTED to ws://127.0.0.1:"));
    assert!(edge.log().contains("travel unencrypted"), "ws:// must warn");
    let (status, took) = edge.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(5), "SIGTERM exit took {took:?}");
    eprintln!("SIGTERM while connected: exit 0 after {took:?}");
    let log = edge.log();
    assert!(log.contains("link closed (1001 going away)"), "{log}");
    // Everything sampled before SIGTERM reaches the store (acks in flight
    // at the close are resent later, so check the store, not the spool).
    let last = edge.last_sampled().unwrap();
    wait_for("all readings stored", SOON, || {
        w.seqs_of(epoch).last().is_some_and(|m| *m >= last)
    });
    assert_contiguous(&w.seqs_of(epoch), "epoch");
    edge.assert_token_not_logged();
}

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
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!((now_ms - ts).abs() < 120_000, "ts {ts} vs now {now_ms}");
    assert!(
        (200.0..260.0).contains(&v) && (49.0..51.0).contains(&hz),
        "{v} {hz}"
    );
    assert!(e > 0.0 && (0.0..=1.0).contains(&pf));
    edge.terminate();
    edge.assert_token_not_logged();
}

#[test]
fn hub_restart_readings_are_resent_and_stored_once() {
    let w = World::new();
    let mut hub = w.hub();
    let mut edge = w.edge(&w.config("edge.toml", "", ""));
    let epoch = edge.epoch();
    wait_for("first readings", SOON, || w.count() >= 20);
    hub.stop();
    let before_outage = w.count();
    // Readings pile up in the outbox while the hub is down.
    let sampled_at_stop = edge.last_sampled().unwrap();
    wait_for("readings sampled during the outage", SOON, || {
        edge.last_sampled().unwrap() >= sampled_at_stop + 30
    });
    let during = edge.last_sampled().unwrap();
    assert_eq!(w.count(), before_outage, "hub is down: nothing stored");
    assert!(edge.alive());
    let _hub = w.hub();
    wait_for("the outage backlog stored", SOON, || {
        w.seqs_of(epoch).last().is_some_and(|m| *m >= during + 10)
    });
    assert_contiguous(&w.seqs_of(epoch), "after hub restart");
    assert!(edge.count_in_log("CONNECTED to") >= 2);
    edge.terminate();
    edge.assert_token_not_logged();
}

#[test]
fn sigkill_during_outage_then_restart_loses_nothing() {
    let w = World::new();
    let config = w.config("edge.toml", "", "");
    // Hub down: the first edge only spools.
    let mut first = w.edge(&config);
    let epoch1 = first.epoch();
    wait_for("60 readings sampled", SOON, || {
        first.last_sampled().is_some_and(|s| s >= 60)
    });
    first.sigkill();
    let killed_at = first.last_sampled().unwrap();
    // The second edge starts while the hub is still down, then the hub comes.
    let mut second = w.edge(&config);
    let epoch2 = second.epoch();
    assert_ne!(epoch1, epoch2);
    wait_for("second edge sampling", SOON, || {
        second.last_sampled().is_some_and(|s| s >= 20)
    });
    let _hub = w.hub();
    wait_for("both epochs stored", SOON, || {
        let s1 = w.seqs_of(epoch1);
        let s2 = w.seqs_of(epoch2);
        // The documented loss bound on a crash: the readings of the last
        // sync interval (100 ms here = 2 samples) plus the one in progress.
        // (3 intervals of slack for a starved scheduler on a loaded machine.)
        s1.last().is_some_and(|m| *m + 6 >= killed_at) && s2.len() > 40
    });
    let s1 = w.seqs_of(epoch1);
    assert_contiguous(&s1, "epoch before SIGKILL");
    let s2 = w.seqs_of(epoch2);
    assert_contiguous(&s2, "epoch after restart");
    eprintln!(
        "killed after seq {killed_at}; stored 0..={} of that epoch",
        s1.last().unwrap()
    );
    let (status, _) = second.terminate();
    assert!(status.success());
    first.assert_token_not_logged();
    second.assert_token_not_logged();
}

#[test]
fn sigterm_persists_the_outbox_while_the_hub_is_down() {
    let w = World::new();
    let config = w.config("edge.toml", "", "");
    let mut edge = w.edge(&config);
    let epoch = edge.epoch();
    wait_for("readings sampled", SOON, || {
        edge.last_sampled().is_some_and(|s| s >= 20)
    });
    let (status, took) = edge.terminate();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    eprintln!("SIGTERM while the hub is down: exit 0 after {took:?}");
    let last = edge.last_sampled().unwrap();
    // Every sampled reading is in the spool: bring the hub up with a new
    // edge process and find them all stored.
    let _hub = w.hub();
    let mut again = w.edge(&config);
    wait_for("the persisted outbox stored", SOON, || {
        w.seqs_of(epoch).len() as u64 == last + 1
    });
    assert_contiguous(&w.seqs_of(epoch), "persisted epoch");
    again.terminate();
    edge.assert_token_not_logged();
    again.assert_token_not_logged();
}

#[test]
fn forbidden_token_keeps_retrying_without_crashing() {
    let w = World::new();
    let _hub = w.hub();
    let config = w.config("edge.toml", "", "");
    let wrong = format!("{}x", &w.token[..w.token.len() - 1]);
    let mut edge = Edge::spawn(&config, &wrong, w.dir.path());
    wait_for("three refused attempts", SOON, || {
        edge.count_in_log("hub refused the device token (403)") >= 3
    });
    assert!(edge.alive(), "the edge must keep retrying");
    assert_eq!(w.count(), 0);
    let (status, _) = edge.terminate();
    assert!(status.success());
    edge.assert_token_not_logged();
}

#[test]
fn takeover_close_4000_is_reported_and_retried() {
    let w = World::new();
    let _hub = w.hub();
    // Slow backoff at the cap so the test client keeps the slot a moment.
    let mut edge = w.edge(&w.config("edge.toml", "", ""));
    wait_for("edge connected", SOON, || w.count() >= 5);
    // A "cloned SD card": same device id and token.
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://127.0.0.1:{}/ws/device/{DEVICE}",
        w.port
    ))
    .unwrap();
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", w.token).parse().unwrap(),
    );
    let tcp = TcpStream::connect(("127.0.0.1", w.port)).unwrap();
    let (mut clone, _) = tungstenite::client(req, tcp).unwrap();
    wait_for("the 4000 log line", SOON, || {
        edge.log()
            .contains("replaced by another connection with the same device id (cloned SD card?)")
    });
    assert!(edge.alive());
    // The edge comes back (and in turn replaces the clone).
    let n = w.count();
    wait_for("streaming again", SOON, || w.count() > n + 10);
    let _ = clone.close(None);
    edge.terminate();
    edge.assert_token_not_logged();
}

#[test]
fn answers_hub_pings_while_idle() {
    let w = World::new();
    let _hub = Hub::start(&w.db_url, w.port, |c| {
        c.ping_interval = Duration::from_millis(100);
        c.max_missed_pongs = 2;
    });
    // One reading at start, then nothing for an hour; the edge itself
    // does not ping, so only its pongs keep the link alive.
    let config = w.config(
        "edge.toml",
        "",
        "ping_after_ms = 600000\ndead_after_ms = 700000",
    );
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("sample_interval_ms = 50", "sample_interval_ms = 3600000");
    fs::write(&config, text).unwrap();
    let mut edge = w.edge(&config);
    wait_for("the first reading", SOON, || w.count() == 1);
    // 3 s idle = 30 hub pings; 2 missed would kill the link.
    std::thread::sleep(Duration::from_secs(3));
    let log = edge.log();
    assert_eq!(edge.count_in_log("CONNECTED to"), 1, "{log}");
    assert!(!log.contains("link lost"), "{log}");
    edge.terminate();
    edge.assert_token_not_logged();
}

#[test]
fn check_reports_the_handshake_outcome() {
    let w = World::new();
    let _hub = w.hub();
    let config = w.config("edge.toml", "", "");
    let check = |token: &str| {
        Command::new(env!("CARGO_BIN_EXE_ems-edge"))
            .args(["check", "--config"])
            .arg(&config)
            .env("EMS_DEVICE_TOKEN", token)
            .output()
            .unwrap()
    };
    let ok = check(&w.token);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{out}");
    assert!(out.contains("accepted (101)"), "{out}");
    assert!(!out.contains(&w.token));
    let bad = check("emsd_wrong");
    let out = String::from_utf8_lossy(&bad.stdout);
    assert!(!bad.status.success());
    assert!(out.contains("403"), "{out}");
}

#[test]
fn startup_errors_are_one_line_and_non_zero() {
    let w = World::new();
    let run = |config: &Path, token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ems-edge"));
        cmd.args(["run", "--config"]).arg(config);
        cmd.env_remove("EMS_DEVICE_TOKEN")
            .env_remove("CREDENTIALS_DIRECTORY");
        if let Some(t) = token {
            cmd.env("EMS_DEVICE_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    // Unknown key: named, with its line.
    let config = w.config("typo.toml", "sample_intervall_ms = 5", "");
    let out = run(&config, Some(&w.token));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("sample_intervall_ms") && err.contains("line 8"),
        "{err}"
    );
    // Missing token.
    let config = w.config("edge.toml", "", "");
    let out = run(&config, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("EMS_DEVICE_TOKEN"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // An unusable spool directory.
    let text = fs::read_to_string(&config).unwrap();
    let bad = w.dir.path().join("bad.toml");
    let spool_line = format!("spool_dir = \"{}\"", w.spool_dir().display());
    fs::write(
        &bad,
        text.replace(&spool_line, "spool_dir = \"/proc/ems-no-such-dir\""),
    )
    .unwrap();
    let out = run(&bad, Some(&w.token));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("spool /proc/ems-no-such-dir"), "{err}");
    assert!(!err.contains(&w.token));
    // Token from the credentials directory works (systemd LoadCredential).
    let creds = w.dir.path().join("creds");
    fs::create_dir_all(&creds).unwrap();
    let mut f = fs::File::create(creds.join("ems-device-token")).unwrap();
    writeln!(f, "{}", w.token).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ems-edge"))
        .args(["check", "--config"])
        .arg(&config)
        .env_remove("EMS_DEVICE_TOKEN")
        .env("CREDENTIALS_DIRECTORY", &creds)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("device token present"), "{text}");
}

/// A TLS terminator in front of the hub: rustls server with the fixture
/// certificate (`localhost`, signed by `fixtures/ca.pem`), bytes pumped
/// to the hub's plain port. Serves connections until the test ends.
fn tls_proxy(backend_port: u16) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::io::{ErrorKind, Read, Write};

    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(fixtures.join("hub.pem"))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
    let key = PrivateKeyDer::from_pem_file(fixtures.join("hub.key")).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(front) = conn else { continue };
            let config = config.clone();
            std::thread::spawn(move || {
                let Ok(back) = TcpStream::connect(("127.0.0.1", backend_port)) else {
                    return;
                };
                let t = Some(Duration::from_millis(5));
                front.set_read_timeout(t).unwrap();
                back.set_read_timeout(t).unwrap();
                let mut back = back;
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, front);
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match tls.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            if back.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => return,
                    }
                    match back.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            if tls.write_all(&buf[..n]).and_then(|()| tls.flush()).is_err() {
                                return;
                            }
                        }
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => return,
                    }
                }
            });
        }
    });
    port
}

#[test]
fn streams_over_tls_with_a_private_ca() {
    let w = World::new();
    let _hub = w.hub();
    let proxy = tls_proxy(w.port);
    let ca = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ca.pem");
    let config = w.config("edge.toml", "", "");
    let text = fs::read_to_string(&config).unwrap().replace(
        &format!(
            "hub_url = \"ws://127.0.0.1:{}\"\nallow_insecure = true",
            w.port
        ),
        &format!(
            "hub_url = \"wss://localhost:{proxy}\"\nca_file = \"{}\"",
            ca.display()
        ),
    );
    fs::write(&config, text).unwrap();
    let mut edge = w.edge(&config);
    wait_for("readings over wss", SOON, || w.count() >= 10);
    let log = edge.log();
    assert!(
        log.contains(&format!(
            "CONNECTED to wss://localhost:{proxy}/ws/device/{DEVICE}"
        )),
        "{log}"
    );
    assert!(!log.contains("unencrypted"));
    let (status, _) = edge.terminate();
    assert!(status.success());
    edge.assert_token_not_logged();

    // Without the private CA the hub's certificate is refused, and the
    // edge keeps retrying.
    let text = fs::read_to_string(&config).unwrap();
    let no_ca: String = text
        .lines()
        .filter(|l| !l.starts_with("ca_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(&config, no_ca).unwrap();
    let mut edge = w.edge(&config);
    wait_for("certificate refusals", SOON, || {
        edge.count_in_log("handshake failed") >= 2
    });
    assert!(edge.log().contains("UnknownIssuer"), "{}", edge.log());
    assert!(edge.alive());
    edge.terminate();
    edge.assert_token_not_logged();
}

#[test]
fn live_readings_flow_while_a_large_backlog_drains() {
    use ems_edge::outbox::{sync_files, Outbox};
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
        ob.append(&r).unwrap();
    }
    sync_files(ob.flush().unwrap()).unwrap();
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

/// Measurement, not a check: `cargo test --release -p ems-edge --test stream
/// -- --ignored --nocapture measure_spool`.
#[test]
#[ignore]
fn measure_spool() {
    use ems_edge::outbox::{sync_files, Outbox};
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
        ob.append(&reading(seq)).unwrap();
    }
    let append = t.elapsed();
    let t = Instant::now();
    let files = ob.flush().unwrap();
    let write = t.elapsed();
    let t = Instant::now();
    sync_files(files).unwrap();
    let sync = t.elapsed();
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
        ob.append(&reading(seq)).unwrap();
        let t = Instant::now();
        sync_files(ob.flush().unwrap()).unwrap();
        worst = worst.max(t.elapsed());
        total += t.elapsed();
    }
    println!(
        "steady flush+fsync of one reading: mean {:.2} ms, worst {:.2} ms",
        total.as_secs_f64() * 1e3 / 50.0,
        worst.as_secs_f64() * 1e3
    );
}

#[test]
fn tells_systemd_ready_status_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let w = World::new();
    let _hub = w.hub();
    let sock_path = w.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // systemd sets WATCHDOG_PID to the service's pid: `exec` keeps the
    // shell's pid for the edge.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_ems-edge"))
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "2000000");
    let mut edge = Edge::spawn_cmd(cmd, &w.config("edge.toml", "", ""), &w.token, w.dir.path());
    let mut messages = Vec::<String>::new();
    let recv = |messages: &mut Vec<String>| {
        let mut buf = [0u8; 4096];
        if let Ok(n) = sock.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    let has = |messages: &[String], needle: &str| messages.iter().any(|m| m.contains(needle));
    let deadline = Instant::now() + SOON;
    while !(has(&messages, "READY=1")
        && has(&messages, "WATCHDOG=1")
        && has(&messages, "STATUS=CONNECTED; outbox"))
    {
        assert!(
            Instant::now() < deadline,
            "notifications so far: {messages:?}"
        );
        recv(&mut messages);
    }
    edge.signal(libc::SIGTERM);
    let deadline = Instant::now() + SOON;
    while !has(&messages, "STOPPING=1") {
        assert!(Instant::now() < deadline, "no STOPPING: {messages:?}");
        recv(&mut messages);
    }
    let ready = messages.iter().position(|m| m.contains("READY=1")).unwrap();
    let first_watchdog = messages
        .iter()
        .position(|m| m.contains("WATCHDOG=1"))
        .unwrap();
    assert!(ready <= first_watchdog, "{messages:?}");
    let (status, _) = edge.terminate();
    assert!(status.success());
    edge.assert_token_not_logged();
}

#[test]
fn hub_rate_limit_slows_the_drain_and_loses_nothing() {
    use ems_edge::outbox::{sync_files, Outbox};
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
        ob.append(&r).unwrap();
    }
    sync_files(ob.flush().unwrap()).unwrap();
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
    let synced_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
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

/// A TCP proxy that can turn its current connections into a black hole
/// (open sockets that no longer carry data: a half-open link, as after a
/// NAT timeout or a pulled cable upstream). New connections pass.
struct BlackHoleProxy {
    port: u16,
    /// Connections with an id below this are black-holed.
    cut_below: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Next connection id.
    next_id: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl BlackHoleProxy {
    fn start(backend_port: u16) -> BlackHoleProxy {
        use std::io::{ErrorKind, Read, Write};
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut_below = Arc::new(AtomicU64::new(0));
        let next_id = Arc::new(AtomicU64::new(0));
        let (cut, next) = (cut_below.clone(), next_id.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(front) = conn else { continue };
                let Ok(back) = TcpStream::connect(("127.0.0.1", backend_port)) else {
                    continue;
                };
                let id = next.fetch_add(1, Ordering::SeqCst);
                for (mut from, mut to) in [
                    (front.try_clone().unwrap(), back.try_clone().unwrap()),
                    (back, front),
                ] {
                    let cut = cut.clone();
                    std::thread::spawn(move || {
                        from.set_read_timeout(Some(Duration::from_millis(50)))
                            .unwrap();
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) => return,
                                Ok(n) => {
                                    if id >= cut.load(Ordering::SeqCst)
                                        && to.write_all(&buf[..n]).is_err()
                                    {
                                        return;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        ErrorKind::WouldBlock | ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
            }
        });
        BlackHoleProxy {
            port,
            cut_below,
            next_id,
        }
    }

    fn black_hole_current(&self) {
        use std::sync::atomic::Ordering;
        self.cut_below
            .store(self.next_id.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

#[test]
fn a_half_open_link_is_detected_and_replaced() {
    let w = World::new();
    let _hub = Hub::start(&w.db_url, w.port, |c| {
        // The hub must not notice first (its own heartbeat would close it).
        c.ping_interval = Duration::from_secs(600);
    });
    let proxy = BlackHoleProxy::start(w.port);
    let config = w.config("edge.toml", "", "ping_after_ms = 300\ndead_after_ms = 1500");
    let text = fs::read_to_string(&config).unwrap().replace(
        &format!("ws://127.0.0.1:{}", w.port),
        &format!("ws://127.0.0.1:{}", proxy.port),
    );
    fs::write(&config, text).unwrap();
    let mut edge = w.edge(&config);
    let epoch = edge.epoch();
    wait_for("streaming", SOON, || w.count() >= 20);
    proxy.black_hole_current();
    let before = w.count();
    wait_for("the dead link noticed", SOON, || {
        edge.log().contains("(dead link)")
    });
    wait_for("streaming again", SOON, || w.count() > before + 20);
    assert!(edge.count_in_log("CONNECTED to") >= 2);
    let last = edge.last_sampled().unwrap();
    wait_for("everything stored", SOON, || {
        w.seqs_of(epoch).last().is_some_and(|m| *m >= last)
    });
    assert_contiguous(&w.seqs_of(epoch), "across the half-open link");
    edge.terminate();
    edge.assert_token_not_logged();
}

#[test]
fn a_rejected_reading_leaves_the_outbox_without_blocking_it() {
    use ems_edge::outbox::{sync_files, Outbox};
    const OLD_EPOCH: u64 = 44;
    let w = World::new();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut ob = Outbox::open(&w.spool_dir(), 256 << 20, 512).unwrap();
    for (seq, ts) in [
        (0, now_ms - 2000),
        (1, now_ms + 3_600_000),
        (2, now_ms - 1000),
    ] {
        let r = ems_shared::Reading {
            epoch: OLD_EPOCH,
            seq,
            ts_ms: ts,
            meter: "main".into(),
            power_w: Some(100.0),
            ..Default::default()
        };
        ob.append(&r).unwrap();
    }
    sync_files(ob.flush().unwrap()).unwrap();
    drop(ob);
    let _hub = w.hub();
    let config = w.config("edge.toml", "", "");
    let mut edge = w.edge(&config);
    wait_for("the valid readings stored", SOON, || {
        w.seqs_of(OLD_EPOCH) == [0, 2]
    });
    wait_for("the rejection logged", SOON, || {
        edge.log()
            .contains("hub rejected reading epoch 44 seq 1: future_timestamp")
    });
    edge.terminate();
    // The next start does not send it again.
    let mut again = w.edge(&config);
    wait_for("connected", SOON, || again.log().contains("CONNECTED to"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!again.log().contains("hub rejected"), "{}", again.log());
    again.terminate();
    edge.assert_token_not_logged();
    again.assert_token_not_logged();
}

#[test]
fn sigterm_while_connected_waits_for_the_last_acks_before_closing() {
    let w = World::new();
    // A hub that commits (and acks) every 250 ms while readings come every
    // 20 ms: at almost any moment some readings are in flight, as on a busy
    // hub. Closing without waiting for their acks would leave them in the
    // spool, to be resent on the next start.
    let _hub = Hub::start(&w.db_url, w.port, |c| {
        c.batch_linger = Duration::from_millis(250)
    });
    let config = w.config("edge.toml", "", "");
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("sample_interval_ms = 50", "sample_interval_ms = 20");
    fs::write(&config, text).unwrap();
    // The edge waits up to 1 s for those acks before closing with 1001. A
    // run is conclusive when readings were in flight at the stop and all
    // were acknowledged; a heavily loaded machine can exceed the 1 s (the
    // edge then says so) and the stop can fall between two commits (nothing
    // in flight), so allow a few runs, but one must be conclusive.
    let mut clean = false;
    for attempt in 0..5 {
        let mut edge = w.edge(&config);
        let epoch = edge.epoch();
        wait_for("stored readings of this run", SOON, || {
            w.seqs_of(epoch).len() >= 20
        });
        let (status, took) = edge.terminate();
        assert!(status.success(), "exit status {status:?}");
        assert!(took < Duration::from_secs(5), "SIGTERM exit took {took:?}");
        let log = edge.log();
        assert!(log.contains("link closed (1001 going away)"), "{log}");
        edge.assert_token_not_logged();
        let waited = log.contains("readings in flight at the stop: all acknowledged after");
        if waited {
            assert!(log.contains("ms; 0 readings kept in the spool"), "{log}");
            eprintln!("attempt {attempt}: every ack arrived before the close ({took:?})");
            clean = true;
            break;
        }
        eprintln!(
            "attempt {attempt}: inconclusive ({}), retrying",
            if log.contains("still unacknowledged") {
                "acks later than 1 s: loaded machine?"
            } else {
                "nothing in flight at the stop"
            }
        );
    }
    assert!(
        clean,
        "no run saw its in-flight readings acknowledged before the close"
    );
    // The next start finds nothing to resend.
    let mut again = w.edge(&config);
    again.epoch();
    let log = again.log();
    assert!(
        log.contains("(0 unacknowledged readings recovered)"),
        "{log}"
    );
    again.terminate();
    again.assert_token_not_logged();
}

#[test]
fn a_second_process_on_the_same_spool_dir_is_refused() {
    let w = World::new();
    let config = w.config("edge.toml", "", "");
    // No hub needed: the first edge holds the spool while retrying.
    let mut first = w.edge(&config);
    let epoch = first.epoch();
    let epoch_file = w.spool_dir().join("epoch");
    let before = fs::read_to_string(&epoch_file).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ems-edge"))
        .args(["run", "--config"])
        .arg(&config)
        .env("EMS_DEVICE_TOKEN", &w.token)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let expected = format!(
        "spool_dir {} is in use by another ems-edge process (pid {})",
        w.spool_dir().display(),
        first.child.id()
    );
    assert!(err.contains(&expected), "{err}");
    assert!(!err.contains(&w.token));
    // It touched nothing: the first process's epoch is still the last one.
    assert_eq!(fs::read_to_string(&epoch_file).unwrap(), before);
    assert_eq!(before.trim(), epoch.to_string());
    // `probe` reads the meters with a throwaway state dir: no lock.
    let out = Command::new(env!("CARGO_BIN_EXE_ems-edge"))
        .args(["probe", "--count", "1", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(first.alive(), "the first edge must keep running");
    // Once the first one is gone, the directory is free again.
    let (status, _) = first.terminate();
    assert!(status.success());
    let mut second = w.edge(&config);
    assert!(second.epoch() > epoch);
    let (status, _) = second.terminate();
    assert!(status.success(), "{}", second.log());
    first.assert_token_not_logged();
    second.assert_token_not_logged();
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
    let restarted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
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
