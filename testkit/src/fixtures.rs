//! Small things every test tree needs: the "soon" bound, clocks, ports,
//! polling, readings, and what a hub stored.

use std::path::Path;
use std::time::{Duration, Instant};

/// Generous bound for anything that should happen "soon" on a loaded
/// 2-core machine.
pub const SOON: Duration = Duration::from_secs(15);

/// Wall-clock Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A free loopback TCP port (free when asked; bind it soon).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Polls `cond` every 50 ms until it holds; panics naming `what` after
/// `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A valid `reading` frame of meter `main`, stamped now.
pub fn reading(epoch: u64, seq: u64) -> String {
    format!(
        r#"{{"type":"reading","epoch":{epoch},"seq":{seq},"ts_ms":{},"meter":"main","voltage_v":230.1,"current_a":4.2,"power_w":960.5,"energy_wh":1523400.0}}"#,
        now_ms()
    )
}

/// The (epoch, seq) of every reading of `device` in the SQLite database at
/// `path`, in order (opened read-only, waiting for the hub's locks).
pub fn sqlite_keys(path: &Path, device: &str) -> rusqlite::Result<Vec<(u64, u64)>> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mut stmt =
        conn.prepare("SELECT epoch, seq FROM readings WHERE device_id = ?1 ORDER BY epoch, seq")?;
    let rows = stmt.query_map([device], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
    })?;
    rows.collect()
}
