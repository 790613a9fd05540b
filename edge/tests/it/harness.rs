//! What every edge integration test uses: a hub on its own tokio runtime
//! (in-process, a loopback port), a temporary world with a provisioned
//! device and an edge config, and the real `ems-edge` binary as a child
//! process (so SIGTERM and SIGKILL are real).
//!
//! Deadlines are generous and everything is polled: these tests must pass
//! on a loaded 2-core machine. Every test checks at the end that the device
//! token never appears in the edge's stderr (captured at trace level).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use ems_testkit::fixtures::{free_port, now_ms, wait_for};
pub use ems_testkit::hub::BackgroundHub as Hub;
use ems_testkit::require::{require_or_skip, Feature};

/// Bound for anything that should happen "soon" (longer than the hub
/// tests' bound: these tests start processes and wait for disk syncs).
pub const SOON: Duration = Duration::from_secs(30);

/// One test's world: a temp dir with the hub database, a provisioned
/// device, a port, and the edge config.
pub struct World {
    pub dir: tempfile::TempDir,
    pub db_url: String,
    pub port: u16,
    pub token: String,
}

pub const DEVICE: &str = "dev-1";

impl World {
    pub fn new() -> World {
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

    pub fn hub(&self) -> Hub {
        Hub::start(&self.db_url, self.port, |_| {})
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    /// Writes an edge config; `extra` is appended to the top level,
    /// `link` to the `[link]` table.
    pub fn config(&self, name: &str, extra: &str, link: &str) -> PathBuf {
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

    /// An edge config whose spool sync is due `sync_ms` after a reading,
    /// with an hour of energy headroom: no ceiling raise during a test
    /// after the first (the link's timing alone decides what is written).
    pub fn config_sync_due(&self, name: &str, sync_ms: u64) -> PathBuf {
        self.config_sync_headroom(name, sync_ms, 3600)
    }

    /// An edge config whose spool sync is due `sync_ms` after a reading,
    /// with `headroom_s` of energy headroom (a ceiling raise every
    /// headroom minus lead seconds at a steady rate; the lead is two sync
    /// intervals and a second, at most half the headroom).
    pub fn config_sync_headroom(&self, name: &str, sync_ms: u64, headroom_s: u64) -> PathBuf {
        self.config_sync_extra(name, sync_ms, &format!("energy_headroom_s = {headroom_s}"))
    }

    /// An edge config whose spool sync is due `sync_ms` after a reading,
    /// with `extra` top-level keys.
    pub fn config_sync_extra(&self, name: &str, sync_ms: u64, extra: &str) -> PathBuf {
        let config = self.config(name, extra, "");
        let text = fs::read_to_string(&config).unwrap().replace(
            "spool_sync_interval_ms = 100",
            &format!("spool_sync_interval_ms = {sync_ms}"),
        );
        fs::write(&config, text).unwrap();
        config
    }

    pub fn edge(&self, config: &Path) -> Edge {
        Edge::spawn(config, &self.token, self.dir.path())
    }

    /// (epoch, seq) of every stored reading of the device (none while
    /// the hub has not created its database yet).
    pub fn stored(&self) -> Vec<(u64, u64)> {
        let path = Path::new(self.db_url.trim_start_matches("sqlite:"));
        ems_testkit::fixtures::sqlite_keys(path, DEVICE).unwrap_or_default()
    }

    /// `(seq, ts_ms, meter, energy_wh)` of every stored reading of `epoch`,
    /// by seq.
    pub fn rows_of(&self, epoch: u64) -> Vec<(u64, i64, String, Option<f64>)> {
        let path = self.db_url.trim_start_matches("sqlite:");
        let conn =
            rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        let mut stmt = conn
            .prepare(
                "SELECT seq, ts, meter, energy_wh FROM readings \
                 WHERE device_id = ?1 AND epoch = ?2 ORDER BY seq",
            )
            .unwrap();
        let rows = stmt
            .query_map(rusqlite::params![DEVICE, epoch as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<f64>>(3)?,
                ))
            })
            .unwrap();
        rows.map(|r| r.unwrap()).collect()
    }

    pub fn seqs_of(&self, epoch: u64) -> Vec<u64> {
        self.stored()
            .into_iter()
            .filter(|(e, _)| *e == epoch)
            .map(|(_, s)| s)
            .collect()
    }

    pub fn count(&self) -> usize {
        self.stored().len()
    }
}

/// Asserts `seqs` (sorted) is exactly 0..=max.
pub fn assert_contiguous(seqs: &[u64], what: &str) {
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
pub struct Edge {
    pub child: Child,
    pub log: PathBuf,
    pub token: String,
}

pub static LOG_COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Edge {
    pub fn spawn(config: &Path, token: &str, dir: &Path) -> Edge {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ems-edge"));
        cmd.env_remove("NOTIFY_SOCKET");
        Self::spawn_cmd(cmd, config, token, dir)
    }

    pub fn spawn_cmd(mut cmd: Command, config: &Path, token: &str, dir: &Path) -> Edge {
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

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn count_in_log(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// The epoch this process logged at start.
    pub fn epoch(&self) -> u64 {
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
    pub fn last_sampled(&self) -> Option<u64> {
        self.log()
            .lines()
            .filter_map(|l| l.split(" seq ").nth(1)?.trim().parse::<u64>().ok())
            .max()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// SIGTERM and wait; returns the status and how long the exit took.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
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

    pub fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// The token must never appear in the logs.
    pub fn assert_token_not_logged(&self) {
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
        // A failed test shows what the edge said, the last lines first
        // to matter.
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("--- the edge's log (last {} lines) ---", tail.len());
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

/// Counters from the edge's last log line ("stopped after …; N readings
/// kept …; since start: A dropped (spool full), B dropped (disk full), C
/// lost (damaged spool records), D rejected by the hub").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FinalCounts {
    pub kept: u64,
    pub dropped_full: u64,
    pub dropped_disk_full: u64,
    pub damaged: u64,
    pub rejected: u64,
}

impl FinalCounts {
    pub fn from_log(log: &str) -> Option<FinalCounts> {
        let line = log.lines().rev().find(|l| l.contains("stopped after"))?;
        let number_before = |needle: &str| -> Option<u64> {
            let head = &line[..line.find(needle)?];
            head.trim_end().rsplit(' ').next()?.parse().ok()
        };
        Some(FinalCounts {
            kept: number_before(" readings kept")?,
            dropped_full: number_before(" dropped (spool full)")?,
            dropped_disk_full: number_before(" dropped (disk full)")?,
            damaged: number_before(" lost (damaged spool records)")?,
            rejected: number_before(" rejected by the hub")?,
        })
    }

    /// Readings that left the outbox without being stored.
    pub fn lost(&self) -> u64 {
        self.dropped_full + self.dropped_disk_full + self.damaged + self.rejected
    }
}

/// A size-limited tmpfs mounted for one test (needs root); unmounted when
/// dropped.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"160k"`) on `path`. When that is not
    /// possible (not root, no mount permission) the test is skipped with a
    /// loud message, or fails when `EMS_REQUIRE_TMPFS=1` (CI)
    /// (`ems_testkit::require`).
    pub fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        fs::create_dir_all(path).unwrap();
        // SAFETY: getuid has no preconditions.
        let root = unsafe { libc::getuid() } == 0;
        let out = root.then(|| {
            Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0700"),
                    "tmpfs",
                ])
                .arg(path)
                .output()
        });
        match out {
            Some(Ok(o)) if o.status.success() => Some(Tmpfs {
                path: path.to_path_buf(),
            }),
            other => {
                let why = match other {
                    None => "not running as root".to_string(),
                    Some(Ok(o)) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                    Some(Err(e)) => e.to_string(),
                };
                require_or_skip(Feature::Tmpfs, &format!("a tmpfs cannot be mounted: {why}"));
                None
            }
        }
    }

    /// Fills the file system with `name` until a write fails; returns the
    /// file's path.
    pub fn fill(&self, name: &str) -> PathBuf {
        use std::io::Write;
        let path = self.path.join(name);
        let mut f = fs::File::create(&path).unwrap();
        let block = [0u8; 4096];
        while f.write_all(&block).is_ok() {}
        // Smaller writes take the last partial page too.
        while f.write_all(&block[..64]).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// The highest seq of `epoch` in the spool's segment files.
pub fn newest_on_disk(w: &World, epoch: u64) -> Option<u64> {
    let prefix = format!("\"epoch\":{epoch},\"seq\":");
    fs::read_dir(w.spool_dir())
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .flat_map(|text| {
            text.split(prefix.as_str())
                .skip(1)
                .filter_map(|rest| {
                    rest.split(|c: char| !c.is_ascii_digit())
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
                .collect::<Vec<_>>()
        })
        .max()
}
