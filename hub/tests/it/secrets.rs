//! No secret in `--help`, errors or logs, and no log line a device can
//! forge: the real `ems-hub` binary, its stdout and stderr read back.

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;
use crate::probe::free_port;

/// A password with every character that URL parsing trips over; each
/// piece is unique so a leak of any part of it is found.
const PASSWORD: &str = "pA1?pB2@pC3#pD4%25pE5/pF6";
const PIECES: [&str; 6] = ["pA1", "pB2", "pC3", "pD4", "pE5", "pF6"];

fn hub_cmd(db: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ems-hub"));
    c.env("EMS_DATABASE_URL", db).env_remove("EMS_LOG_LEVEL");
    c
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn assert_no_password(what: &str, out: &str) {
    for p in PIECES {
        assert!(
            !out.contains(p),
            "{what} shows {p:?} of the password:\n{out}"
        );
    }
}

#[test]
fn help_never_shows_the_database_url() {
    let url = format!("postgres://ems:{PASSWORD}@db.example:5432/ems");
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["device", "--help"],
        &["device", "add", "--help"],
        &["viewer", "add", "--help"],
        &["admin", "--help"],
        &["watch", "--help"],
    ] {
        let o = hub_cmd(&url).args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        let out = text(&o);
        assert!(out.contains("EMS_DATABASE_URL"), "{args:?}: {out}");
        assert!(
            !out.contains("db.example"),
            "{args:?} shows the URL:\n{out}"
        );
        assert_no_password(&format!("{args:?}"), &out);
    }
}

#[test]
fn errors_never_show_the_password_whatever_it_contains() {
    // Nothing listens on port 1: the connection is refused at once.
    let urls = [
        format!("postgres://ems:{PASSWORD}@127.0.0.1:1/ems?connect_timeout=2"),
        format!("postgresql://ems:{PASSWORD}@127.0.0.1:1/ems"),
        format!("postgres://127.0.0.1:1/ems?user=ems&password={PASSWORD}"),
        format!("host=127.0.0.1 port=1 user=ems password='{PASSWORD}' dbname=ems"),
        format!("mysql://ems:{PASSWORD}@127.0.0.1:1/ems"),
    ];
    for url in &urls {
        let o = hub_cmd(url).args(["device", "list"]).output().unwrap();
        assert!(!o.status.success(), "{url}");
        assert_no_password(&format!("device list on {url}"), &text(&o));
    }
    // The library's own view of it.
    for url in &urls {
        let shown = ems_hub::store::postgres::redact(url);
        assert_no_password(&format!("redact({url})"), &shown);
        let e = ems_hub::store::open(url)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_no_password(&format!("open({url})"), &e);
        let cfg = ems_hub::Config::new(url.clone());
        assert_no_password(&format!("{url} in Config's Debug"), &format!("{cfg:?}"));
    }
}

/// A hub process on a fresh SQLite database with one device; its
/// stderr is collected until it exits.
struct HubProcess {
    child: Child,
    addr: std::net::SocketAddr,
    token: String,
    _dir: tempfile::TempDir,
}

impl HubProcess {
    fn start() -> HubProcess {
        let dir = tempfile::tempdir().unwrap();
        let db = format!("sqlite:{}", dir.path().join("hub.db").display());
        let out = hub_cmd(&db)
            .args(["device", "add", "dev-a"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = hub_cmd(&db)
            .args([
                "serve",
                "--listen",
                &addr.to_string(),
                "--log-level",
                "info",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + SOON;
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "the hub did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
        HubProcess {
            child,
            addr,
            token,
            _dir: dir,
        }
    }

    /// SIGTERM, wait, and everything it logged.
    fn stop(mut self) -> String {
        unsafe_free_kill(self.child.id());
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let _ = self.child.wait();
        err
    }
}

fn unsafe_free_kill(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_text_cannot_forge_log_lines_and_warnings_are_limited_per_device() {
    let hub = HubProcess::start();
    // A field name and a frame type a device controls (serde quotes both
    // verbatim in its message), with a line break, a carriage return and
    // a terminal escape in them.
    let evil = [
        r#"{"type":"reading","epoch":1,"seq":0,"ts_ms":1700000000000,"meter":"main","x\n2099-01-01T00:00:00Z ERROR [ems_hub] FORGED-LINE":1}"#,
        r#"{"type":"x\r\u001b[2KFORGED-ESC","epoch":1,"seq":1}"#,
    ];
    let mut first = connect(hub.addr, "/ws/device/dev-a", Some(&hub.token))
        .await
        .unwrap();
    first.send(Message::Text(evil[0].into())).await.unwrap();
    let v = next_json(&mut first).await;
    assert_eq!(v["type"], "rejected", "{v}");
    drop(first);
    // The same device again, at once: its warnings stay limited.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = connect(hub.addr, "/ws/device/dev-a", Some(&hub.token))
        .await
        .unwrap();
    second.send(Message::Text(evil[1].into())).await.unwrap();
    let v = next_json(&mut second).await;
    assert_eq!(v["type"], "rejected", "{v}");
    drop(second);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = hub.stop();
    for line in log.lines() {
        assert!(
            !line.starts_with("2099") && !line.contains('\r') && !line.contains('\u{1b}'),
            "a device wrote this log line: {line:?}\n{log}"
        );
    }
    // A refused frame is quarantined (or, past the budget, deferred or
    // discarded): one warning line either way, whatever its wording.
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("device dev-a: "))
        .count();
    assert_eq!(
        warnings, 1,
        "the warning limit started over with the new connection:\n{log}"
    );
    assert!(
        log.contains("FORGED-LINE"),
        "the refusal was not logged at all:\n{log}"
    );
}
