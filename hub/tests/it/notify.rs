//! systemd notifications of `ems-hub serve`: `READY=1` once it listens and
//! the store answers, `WATCHDOG=1` while the accept loop and the writer
//! make progress, `STOPPING=1` at shutdown — read from a notify socket the
//! test binds, as systemd would.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::SOON;
use crate::probe::free_port;

/// The next notification (one datagram may hold several lines).
fn next(sock: &UnixDatagram, within: Duration) -> Option<String> {
    sock.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn serve_tells_systemd_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let db = format!("sqlite:{}", dir.path().join("hub.db").display());
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_ems-hub"))
        .args(["serve", "--listen", &addr])
        .env("EMS_DATABASE_URL", &db)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut seen = Vec::new();
    let ready = loop {
        let m = next(&sock, SOON).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("no READY=1 within {SOON:?}; got {seen:?}")
        });
        seen.push(m.clone());
        if m.lines().any(|l| l == "READY=1") {
            break m;
        }
    };
    // Ready means listening.
    assert!(
        std::net::TcpStream::connect(&addr).is_ok(),
        "READY=1 before the listener answers ({ready:?})"
    );
    println!("READY=1 after {:?}", started.elapsed());
    // Watchdog pings at least twice a second (WATCHDOG_USEC = 1 s).
    let t = Instant::now();
    let mut pings = 0;
    while pings < 4 {
        let m = next(&sock, Duration::from_secs(5)).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("watchdog pings stopped after {pings}")
        });
        pings += m.lines().filter(|l| *l == "WATCHDOG=1").count();
    }
    println!("4 watchdog pings in {:?}", t.elapsed());
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + SOON;
    let mut stopping = false;
    while Instant::now() < deadline && !stopping {
        match next(&sock, Duration::from_secs(1)) {
            Some(m) => stopping = m.lines().any(|l| l == "STOPPING=1"),
            None => {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
            }
        }
    }
    let status = child.wait().unwrap();
    assert!(stopping, "no STOPPING=1 at shutdown");
    assert!(status.success(), "{status}");
}
