//! The embedded SQLite backend (`sqlite:PATH`), the default for one machine.
//!
//! Owns the SQLite schema and its migrations, and the connection settings
//! that make acknowledged readings durable: WAL journal with
//! `synchronous=FULL` (a commit is on disk before `insert_batch` returns,
//! even across power loss), and a busy timeout so the admin CLI and a
//! running hub can share the file.
//!
//! Times are Unix milliseconds in `INTEGER` columns; token hashes are
//! 32-byte `BLOB`s.

use std::path::Path;
use std::time::Duration;

use ems_shared::Reading;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};

use super::{
    ct_eq, AdminStore, AuthStore, DeviceInfo, HistoryStore, ReadingSink, Row, StoreError,
    StoredReading, TokenHash, ViewerInfo, ViewerScope,
};

/// Schema version this code writes and expects.
pub const SCHEMA_VERSION: i64 = 1;

/// How long a statement waits for another process's lock (e.g. the admin
/// CLI while the hub commits) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Version 1 of the schema. `readings` is the public contract (see
/// README.md (Storage)); the other tables are the hub's own.
const SCHEMA_V1: &str = "
CREATE TABLE devices (
    device_id  TEXT PRIMARY KEY NOT NULL,
    token_hash BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
CREATE TABLE viewers (
    viewer_id   INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    token_hash  BLOB NOT NULL UNIQUE,
    all_devices INTEGER NOT NULL,
    created_ms  INTEGER NOT NULL,
    revoked_ms  INTEGER
);
CREATE TABLE viewer_devices (
    viewer_id INTEGER NOT NULL REFERENCES viewers(viewer_id) ON DELETE CASCADE,
    device_id TEXT NOT NULL,
    PRIMARY KEY (viewer_id, device_id)
);
CREATE TABLE admins (
    name       TEXT PRIMARY KEY NOT NULL,
    token_hash BLOB NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
CREATE TABLE readings (
    device_id          TEXT NOT NULL,
    meter              TEXT NOT NULL,
    ts                 INTEGER NOT NULL,
    received_at        INTEGER NOT NULL,
    epoch              INTEGER NOT NULL,
    seq                INTEGER NOT NULL,
    voltage_v          REAL,
    current_a          REAL,
    power_w            REAL,
    energy_wh          REAL,
    frequency_hz       REAL,
    power_factor       REAL,
    reactive_power_var REAL,
    UNIQUE (device_id, epoch, seq)
);
CREATE INDEX readings_device_ts ON readings (device_id, ts);
";

const INSERT_READING: &str =
    "INSERT INTO readings (device_id, meter, ts, received_at, epoch, seq, \
     voltage_v, current_a, power_w, energy_wh, frequency_hz, power_factor, reactive_power_var) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
     ON CONFLICT (device_id, epoch, seq) DO NOTHING";

/// A SQLite database handle.
pub struct SqliteStore {
    /// The connection; one per handle (SQLite serializes writers itself).
    conn: Connection,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.conn.path())
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its
    /// schema up to date. `path` may be `:memory:` for a private in-memory
    /// database, and `//PATH` (from `sqlite://PATH`) is accepted too.
    pub fn open(path: &str) -> Result<Self, StoreError> {
        let path = path.strip_prefix("//").unwrap_or(path);
        let fail = |reason: String| StoreError::Open {
            url: format!("sqlite:{path}"),
            reason,
        };
        if path.is_empty() {
            return Err(fail(
                "no file name; use sqlite:PATH, e.g. sqlite:ems-hub.db".into(),
            ));
        }
        let p = Path::new(path);
        if path != ":memory:" {
            if p.is_dir() {
                return Err(fail(
                    "is a directory; give a file path such as sqlite:/var/lib/ems/hub.db".into(),
                ));
            }
            if let Some(parent) = p.parent() {
                if !parent.as_os_str().is_empty() && !parent.is_dir() {
                    return Err(fail(format!(
                        "directory {} does not exist; create it first",
                        parent.display()
                    )));
                }
            }
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(p, flags).map_err(|e| fail(explain(&e)))?;
        let mut store = SqliteStore { conn };
        // Switching a new file to WAL needs an exclusive lock, and SQLite
        // answers BUSY at once (no busy handler) when another process is
        // doing the same — e.g. the admin CLI and a hub opening a fresh file
        // together. Retry within the usual busy timeout.
        let started = std::time::Instant::now();
        loop {
            match store.configure() {
                Ok(()) => break,
                Err(e)
                    if matches!(
                        e.sqlite_error_code(),
                        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked)
                    ) && started.elapsed() < BUSY_TIMEOUT =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(fail(explain(&e))),
            }
        }
        store.migrate().map_err(|e| match e {
            StoreError::Db(reason) => fail(reason),
            other => other,
        })?;
        Ok(store)
    }

    fn configure(&mut self) -> rusqlite::Result<()> {
        self.conn.busy_timeout(BUSY_TIMEOUT)?;
        // Reading the journal mode also proves the file is a database.
        let _mode: String = self
            .conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        self.conn.pragma_update(None, "foreign_keys", "ON")?;
        self.conn.set_prepared_statement_cache_capacity(32);
        Ok(())
    }

    /// Creates or upgrades the schema in one write transaction, so two
    /// processes opening a new file at once cannot both create it.
    fn migrate(&mut self) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            .map_err(db)?;
        let current: Option<i64> = tx
            .query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))
            .map_err(db)?;
        let current = current.unwrap_or(0);
        if current > SCHEMA_VERSION {
            return Err(StoreError::Db(format!(
                "database schema version {current} is newer than this ems-hub \
                 understands ({SCHEMA_VERSION}); upgrade ems-hub"
            )));
        }
        if current < 1 {
            tx.execute_batch(SCHEMA_V1).map_err(db)?;
        }
        if current < SCHEMA_VERSION {
            tx.execute("DELETE FROM schema_version", []).map_err(db)?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                [SCHEMA_VERSION],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)
    }

    /// The schema version stored in the database.
    pub fn schema_version(&mut self) -> Result<i64, StoreError> {
        self.conn
            .query_row("SELECT max(version) FROM schema_version", [], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .map(|v| v.unwrap_or(0))
            .map_err(db)
    }
}

/// A rusqlite error as a one-line, actionable reason.
fn explain(e: &rusqlite::Error) -> String {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => {
            "the file is not an SQLite database; point --database at an ems-hub \
             database or a new file"
                .into()
        }
        Some(ErrorCode::CannotOpen) => {
            "cannot open the file; check that the path and its directory exist and are writable"
                .into()
        }
        Some(ErrorCode::PermissionDenied) | Some(ErrorCode::ReadOnly) => {
            "permission denied; the file and its directory must be writable by ems-hub".into()
        }
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => {
            "the database is locked by another process for too long".into()
        }
        Some(ErrorCode::DatabaseCorrupt) => "the database file is corrupt".into(),
        _ => e.to_string(),
    }
}

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Db(explain(&e))
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation)
}

/// `u64` epoch/seq (≤ 2^53 − 1 by protocol) as SQLite's signed integer.
fn to_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Db(format!("epoch/seq {v} does not fit a BIGINT")))
}

impl ReadingSink for SqliteStore {
    fn insert_batch(&mut self, rows: &[Row]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        {
            let mut stmt = tx.prepare_cached(INSERT_READING).map_err(db)?;
            for row in rows {
                let r = &row.reading;
                stmt.execute(params![
                    &*row.device_id,
                    r.meter,
                    r.ts_ms,
                    row.received_at_ms,
                    to_i64(r.epoch)?,
                    to_i64(r.seq)?,
                    r.voltage_v,
                    r.current_a,
                    r.power_w,
                    r.energy_wh,
                    r.frequency_hz,
                    r.power_factor,
                    r.reactive_power_var,
                ])
                .map_err(db)?;
            }
        }
        tx.commit().map_err(db)
    }
}

impl AuthStore for SqliteStore {
    fn device_token_valid(
        &mut self,
        device_id: &str,
        hash: &TokenHash,
    ) -> Result<bool, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT token_hash FROM devices WHERE device_id = ?1 AND revoked_ms IS NULL",
            )
            .map_err(db)?;
        let stored: Option<Vec<u8>> = stmt
            .query_row([device_id], |r| r.get(0))
            .optional()
            .map_err(db)?;
        Ok(stored.is_some_and(|s| ct_eq(&s, hash)))
    }

    fn viewer_scope(&mut self, hash: &TokenHash) -> Result<Option<ViewerScope>, StoreError> {
        let found: Option<(i64, bool)> = self
            .conn
            .prepare_cached(
                "SELECT viewer_id, all_devices FROM viewers \
                 WHERE token_hash = ?1 AND revoked_ms IS NULL",
            )
            .map_err(db)?
            .query_row([&hash[..]], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(db)?;
        let Some((viewer_id, all)) = found else {
            return Ok(None);
        };
        if all {
            return Ok(Some(ViewerScope::AllDevices));
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT device_id FROM viewer_devices WHERE viewer_id = ?1 ORDER BY device_id",
            )
            .map_err(db)?;
        let ids = stmt
            .query_map([viewer_id], |r| r.get(0))
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<String>>>()
            .map_err(db)?;
        Ok(Some(ViewerScope::Devices(ids)))
    }

    fn admin_name(&mut self, hash: &TokenHash) -> Result<Option<String>, StoreError> {
        self.conn
            .prepare_cached("SELECT name FROM admins WHERE token_hash = ?1 AND revoked_ms IS NULL")
            .map_err(db)?
            .query_row([&hash[..]], |r| r.get(0))
            .optional()
            .map_err(db)
    }

    fn active_device_tokens(&mut self) -> Result<Vec<(String, TokenHash)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT device_id, token_hash FROM devices WHERE revoked_ms IS NULL")
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(db)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, hash) = row.map_err(db)?;
            // A malformed stored hash matches no token: leave it out, so a
            // connection of that device is closed rather than trusted.
            if let Ok(h) = TokenHash::try_from(hash.as_slice()) {
                out.push((id, h));
            }
        }
        Ok(out)
    }

    fn device_exists(&mut self, device_id: &str) -> Result<bool, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT 1 FROM devices WHERE device_id = ?1")
            .map_err(db)?;
        stmt.exists([device_id]).map_err(db)
    }
}

impl AdminStore for SqliteStore {
    fn add_device(
        &mut self,
        device_id: &str,
        hash: &TokenHash,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        match self.conn.execute(
            "INSERT INTO devices (device_id, token_hash, created_ms) VALUES (?1, ?2, ?3)",
            params![device_id, &hash[..], now_ms],
        ) {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => {
                Err(StoreError::AlreadyExists(format!("device {device_id}")))
            }
            Err(e) => Err(db(e)),
        }
    }

    fn list_devices(&mut self) -> Result<Vec<DeviceInfo>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT device_id, created_ms, revoked_ms FROM devices ORDER BY device_id",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(DeviceInfo {
                    device_id: r.get(0)?,
                    created_ms: r.get(1)?,
                    revoked_ms: r.get(2)?,
                })
            })
            .map_err(db)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
    }

    fn revoke_device(&mut self, device_id: &str, now_ms: i64) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE devices SET revoked_ms = COALESCE(revoked_ms, ?2) WHERE device_id = ?1",
                params![device_id, now_ms],
            )
            .map_err(db)?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("device {device_id}")));
        }
        Ok(())
    }

    fn rotate_device(&mut self, device_id: &str, hash: &TokenHash) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE devices SET token_hash = ?2, revoked_ms = NULL WHERE device_id = ?1",
                params![device_id, &hash[..]],
            )
            .map_err(db)?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("device {device_id}")));
        }
        Ok(())
    }

    fn add_viewer(
        &mut self,
        name: &str,
        hash: &TokenHash,
        scope: &ViewerScope,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let all = matches!(scope, ViewerScope::AllDevices);
        match tx.execute(
            "INSERT INTO viewers (name, token_hash, all_devices, created_ms) \
             VALUES (?1, ?2, ?3, ?4)",
            params![name, &hash[..], all, now_ms],
        ) {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::AlreadyExists(format!("viewer {name}")))
            }
            Err(e) => return Err(db(e)),
        }
        if let ViewerScope::Devices(ids) = scope {
            let viewer_id = tx.last_insert_rowid();
            let mut stmt = tx
                .prepare(
                    "INSERT INTO viewer_devices (viewer_id, device_id) VALUES (?1, ?2) \
                     ON CONFLICT DO NOTHING",
                )
                .map_err(db)?;
            for id in ids {
                stmt.execute(params![viewer_id, id]).map_err(db)?;
            }
        }
        tx.commit().map_err(db)
    }

    fn list_viewers(&mut self) -> Result<Vec<ViewerInfo>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT v.name, v.all_devices, v.created_ms, v.revoked_ms, d.device_id \
                 FROM viewers v LEFT JOIN viewer_devices d ON d.viewer_id = v.viewer_id \
                 ORDER BY v.name, d.device_id",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })
            .map_err(db)?;
        let mut out: Vec<ViewerInfo> = Vec::new();
        for row in rows {
            let (name, all, created_ms, revoked_ms, device) = row.map_err(db)?;
            if out.last().map(|v| v.name != name).unwrap_or(true) {
                out.push(ViewerInfo {
                    name,
                    scope: if all {
                        ViewerScope::AllDevices
                    } else {
                        ViewerScope::Devices(Vec::new())
                    },
                    created_ms,
                    revoked_ms,
                });
            }
            if let (Some(v), Some(d)) = (out.last_mut(), device) {
                if let ViewerScope::Devices(ids) = &mut v.scope {
                    ids.push(d);
                }
            }
        }
        Ok(out)
    }

    fn revoke_viewer(&mut self, name: &str, now_ms: i64) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE viewers SET revoked_ms = COALESCE(revoked_ms, ?2) WHERE name = ?1",
                params![name, now_ms],
            )
            .map_err(db)?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("viewer {name}")));
        }
        Ok(())
    }

    fn add_admin(&mut self, name: &str, hash: &TokenHash, now_ms: i64) -> Result<(), StoreError> {
        match self.conn.execute(
            "INSERT INTO admins (name, token_hash, created_ms) VALUES (?1, ?2, ?3)",
            params![name, &hash[..], now_ms],
        ) {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => {
                Err(StoreError::AlreadyExists(format!("admin {name}")))
            }
            Err(e) => Err(db(e)),
        }
    }
}

impl HistoryStore for SqliteStore {
    fn readings(
        &mut self,
        device_id: &str,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<Reading>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT epoch, seq, ts, meter, voltage_v, current_a, power_w, energy_wh, \
                 frequency_hz, power_factor, reactive_power_var FROM readings \
                 WHERE device_id = ?1 AND ts >= ?2 AND ts < ?3 \
                 ORDER BY ts, epoch, seq LIMIT ?4",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(params![device_id, from_ms, to_ms, limit], |r| {
                Ok(Reading {
                    epoch: r.get::<_, i64>(0)? as u64,
                    seq: r.get::<_, i64>(1)? as u64,
                    ts_ms: r.get(2)?,
                    meter: r.get(3)?,
                    voltage_v: r.get(4)?,
                    current_a: r.get(5)?,
                    power_w: r.get(6)?,
                    energy_wh: r.get(7)?,
                    frequency_hz: r.get(8)?,
                    power_factor: r.get(9)?,
                    reactive_power_var: r.get(10)?,
                    ..Default::default()
                })
            })
            .map_err(db)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
    }

    fn history(
        &mut self,
        device_id: &str,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
        newest: bool,
    ) -> Result<Vec<StoredReading>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = if newest {
            "SELECT epoch, seq, ts, meter, voltage_v, current_a, power_w, energy_wh, \
             frequency_hz, power_factor, reactive_power_var, received_at FROM readings \
             WHERE device_id = ?1 AND ts >= ?2 AND ts < ?3 \
             ORDER BY ts DESC, epoch DESC, seq DESC LIMIT ?4"
        } else {
            "SELECT epoch, seq, ts, meter, voltage_v, current_a, power_w, energy_wh, \
             frequency_hz, power_factor, reactive_power_var, received_at FROM readings \
             WHERE device_id = ?1 AND ts >= ?2 AND ts < ?3 \
             ORDER BY ts, epoch, seq LIMIT ?4"
        };
        let mut stmt = self.conn.prepare_cached(sql).map_err(db)?;
        let rows = stmt
            .query_map(params![device_id, from_ms, to_ms, limit], |r| {
                Ok(StoredReading {
                    reading: Reading {
                        epoch: r.get::<_, i64>(0)? as u64,
                        seq: r.get::<_, i64>(1)? as u64,
                        ts_ms: r.get(2)?,
                        meter: r.get(3)?,
                        voltage_v: r.get(4)?,
                        current_a: r.get(5)?,
                        power_w: r.get(6)?,
                        energy_wh: r.get(7)?,
                        frequency_hz: r.get(8)?,
                        power_factor: r.get(9)?,
                        reactive_power_var: r.get(10)?,
                        ..Default::default()
                    },
                    received_at_ms: r.get(11)?,
                })
            })
            .map_err(db)?;
        let mut out = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)?;
        if newest {
            out.reverse();
        }
        Ok(out)
    }

    fn last_seen(&mut self, device_id: &str) -> Result<Option<i64>, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT received_at FROM readings WHERE device_id = ?1 ORDER BY ts DESC LIMIT 1",
            )
            .map_err(db)?
            .query_row([device_id], |r| r.get(0))
            .optional()
            .map_err(db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_is_created_once_and_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let p = path.to_str().unwrap();
        let mut s = SqliteStore::open(p).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        drop(s);
        let mut s = SqliteStore::open(p).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        let n: i64 = s
            .conn
            .query_row("SELECT count(*) FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn durability_settings_are_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path().join("d.db").to_str().unwrap()).unwrap();
        let mode: String = s
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = s
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.db");
        let p = path.to_str().unwrap();
        let s = SqliteStore::open(p).unwrap();
        s.conn
            .execute("UPDATE schema_version SET version = 99", [])
            .unwrap();
        drop(s);
        let e = SqliteStore::open(p).unwrap_err().to_string();
        assert!(e.contains("upgrade ems-hub"), "{e}");
    }
}
