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

mod energy;
mod insert;
mod lookups;
mod presence;
mod queries;
mod tokens;

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};

use super::StoreError;

/// The schema's history, oldest first: each entry upgrades a database of
/// the previous version to its own. Append only — a released step is never
/// edited, so every database reaches the same schema whatever version it
/// started from.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, SCHEMA_V1),
    (2, SCHEMA_QUARANTINE),
    (3, SCHEMA_TOKEN_CHANGES),
    (4, SCHEMA_ENERGY),
    (5, SCHEMA_DEVICE_STATE),
];

/// Schema version this code writes and expects: the last migration's.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// How long a statement waits for another process's lock (e.g. the admin
/// CLI while the hub commits) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Version 1 of the schema. `readings` is the public contract (see
/// docs/storage/schema.md); the other tables are the hub's own.
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

/// The `quarantine` table (see docs/storage/schema.md): refused frames and
/// readings the database refused, kept with the reason. `epoch`/`seq` are
/// NULL for a frame without readable ids; `raw` is NULL for a binary frame.
/// A resent frame is quarantined once (NULLs never collide).
const SCHEMA_QUARANTINE: &str = "
CREATE TABLE quarantine (
    device_id   TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    epoch       INTEGER,
    seq         INTEGER,
    reason      TEXT NOT NULL,
    detail      TEXT NOT NULL,
    raw         TEXT,
    UNIQUE (device_id, epoch, seq)
);
CREATE INDEX quarantine_received ON quarantine (received_at);
CREATE INDEX quarantine_device_received ON quarantine (device_id, received_at);
";

/// The token change counter: one row that triggers bump, inside the
/// changing transaction, on every change to a device's id, token or
/// revocation, to a viewer, a viewer's scope, or an admin. The hub reads
/// this one integer per revocation poll and reloads its tokens only when
/// it moved (`TokenStore`).
const SCHEMA_TOKEN_CHANGES: &str = "
CREATE TABLE token_changes (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n  INTEGER NOT NULL
);
INSERT INTO token_changes (id, n) VALUES (1, 0);
CREATE TRIGGER devices_insert_changes AFTER INSERT ON devices
BEGIN UPDATE token_changes SET n = n + 1 WHERE id = 1; END;
CREATE TRIGGER devices_update_changes AFTER UPDATE OF device_id, token_hash, revoked_ms ON devices
BEGIN UPDATE token_changes SET n = n + 1 WHERE id = 1; END;
CREATE TRIGGER devices_delete_changes AFTER DELETE ON devices
BEGIN UPDATE token_changes SET n = n + 1 WHERE id = 1; END;
CREATE TRIGGER viewers_insert_changes AFTER INSERT ON viewers
BEGIN UPDATE token_changes SET n = n + 1 WHERE id = 1; END;
CREATE TRIGGER viewers_update_changes
AFTER UPDATE OF viewer_id, name, token_hash, all_devices, revoked_ms ON viewers
BEGIN UPDATE token_changes SET n = n + 1 WHERE id = 1; END;
CREATE TRIGGER viewers_delete_changes AFTER DELETE ON viewers
BEGIN UPDATE token_changes SET n = n + 1 WHERE id = 1; END;
CREATE TRIGGER viewer_devices_insert_changes AFTER INSERT ON viewer_devices
BEGIN UPDATE token_changes SET n = n + 1 WHERE id = 1; END;
CREATE TRIGGER viewer_devices_update_changes AFTER UPDATE ON viewer_devices
BEGIN UPDATE token_changes SET n = n + 1 WHERE id = 1; END;
CREATE TRIGGER viewer_devices_delete_changes AFTER DELETE ON viewer_devices
BEGIN UPDATE token_changes SET n = n + 1 WHERE id = 1; END;
CREATE TRIGGER admins_insert_changes AFTER INSERT ON admins
BEGIN UPDATE token_changes SET n = n + 1 WHERE id = 1; END;
CREATE TRIGGER admins_update_changes AFTER UPDATE OF name, token_hash, revoked_ms ON admins
BEGIN UPDATE token_changes SET n = n + 1 WHERE id = 1; END;
CREATE TRIGGER admins_delete_changes AFTER DELETE ON admins
BEGIN UPDATE token_changes SET n = n + 1 WHERE id = 1; END;
";

/// Shared device state (docs/storage/schema.md, `PresenceStore`): one row
/// per device that ever connected — presence with its hub and lease, the
/// connection generation, last seen, the edge's last status and the last
/// reading per meter (JSON). Times are Unix ms.
const SCHEMA_DEVICE_STATE: &str = "
CREATE TABLE device_state (
    device_id         TEXT PRIMARY KEY NOT NULL,
    online            INTEGER NOT NULL DEFAULT 0,
    hub               TEXT,
    online_since_ms   INTEGER,
    lease_until_ms    INTEGER NOT NULL DEFAULT 0,
    generation        INTEGER NOT NULL DEFAULT 0,
    last_seen_ms      INTEGER,
    status_rx_ms      INTEGER,
    outbox_depth      INTEGER,
    behind_ms         INTEGER,
    dropped           INTEGER,
    unwritten         INTEGER,
    dropped_disk_full INTEGER,
    dropped_damaged   INTEGER,
    last_readings     TEXT
);
CREATE INDEX device_state_generation ON device_state (generation);
CREATE INDEX device_state_hub ON device_state (hub) WHERE online;
";

/// Plausibility flags on every reading and the energy slots (see
/// docs/storage/schema.md). `flags` of the rows already stored start as 0
/// and are computed by the slot rebuild that the first hub start after the
/// upgrade runs (`energy_limits` is empty until then).
const SCHEMA_ENERGY: &str = "
ALTER TABLE readings ADD COLUMN flags INTEGER NOT NULL DEFAULT 0;
CREATE TABLE energy_slots (
    device_id  TEXT    NOT NULL,
    meter      TEXT    NOT NULL,
    slot_ms    INTEGER NOT NULL,
    has_energy INTEGER NOT NULL,
    data       BLOB    NOT NULL,
    PRIMARY KEY (device_id, meter, slot_ms)
) WITHOUT ROWID;
CREATE INDEX energy_slots_with_energy ON energy_slots (device_id, meter, slot_ms)
    WHERE has_energy;
CREATE TABLE energy_meters (
    device_id TEXT NOT NULL,
    meter     TEXT NOT NULL,
    PRIMARY KEY (device_id, meter)
) WITHOUT ROWID;
CREATE TABLE energy_limits (
    max_power_w REAL    NOT NULL,
    max_gap_ms  INTEGER NOT NULL
);
";

/// A SQLite database handle.
pub struct SqliteStore {
    /// The connection; one per handle (SQLite serializes writers itself).
    conn: Connection,
    /// Energy limits, the writer's per-meter cache, flag counters.
    energy: super::energy::EnergyState,
    /// `PRAGMA data_version` when the cache was last known good: another
    /// connection's commit changes it, and the cache is dropped.
    data_version: Option<i64>,
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
        let mut store = SqliteStore {
            conn,
            energy: Default::default(),
            data_version: None,
        };
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
        for (version, sql) in MIGRATIONS {
            if *version > current {
                tx.execute_batch(sql).map_err(|e| {
                    StoreError::Db(format!("migrating the schema to version {version}: {e}"))
                })?;
            }
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

/// A failure while writing rows: [`StoreError::Refused`] when SQLite
/// refused the data itself — a constraint (CHECK, NOT NULL, a trigger's
/// `RAISE(ABORT, …)`), a type mismatch, a value too big — so the same row
/// fails on every retry; [`StoreError::Db`] for everything else (busy,
/// locked, disk full, I/O, read-only, corrupt), which a retry may cure.
fn write_error(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation | ErrorCode::TypeMismatch | ErrorCode::TooBig) => {
            StoreError::Refused(explain(&e))
        }
        _ => db(e),
    }
}

/// `u64` epoch/seq (≤ 2^53 − 1 by protocol) as SQLite's signed integer;
/// a larger one is refused (it can never be stored).
fn to_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v)
        .map_err(|_| StoreError::Refused(format!("epoch/seq {v} does not fit a BIGINT")))
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

    /// A database made by the first release (schema version 1) is
    /// upgraded in place: its readings stay, the quarantine table appears.
    #[test]
    fn a_version_1_database_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        let p = path.to_str().unwrap();
        {
            let conn = Connection::open(p).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_version (version INTEGER NOT NULL); \
                 INSERT INTO schema_version (version) VALUES (1); \
                 INSERT INTO readings (device_id, meter, ts, received_at, epoch, seq, power_w) \
                 VALUES ('d', 'main', 1, 2, 1, 1, 5.0);",
            )
            .unwrap();
        }
        let mut s = SqliteStore::open(p).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        const { assert!(SCHEMA_VERSION >= 2) };
        let n: i64 = s
            .conn
            .query_row("SELECT count(*) FROM readings", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        let cols: Vec<String> = s
            .conn
            .prepare("SELECT name FROM pragma_table_info('quarantine') ORDER BY cid")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(
            cols,
            [
                "device_id",
                "received_at",
                "epoch",
                "seq",
                "reason",
                "detail",
                "raw"
            ]
        );
        use crate::store::QuarantineStore;
        assert!(s.quarantined(None, 10).unwrap().is_empty());
        // The energy step ran too: the old row has flags 0 until the slot
        // rebuild computes them.
        let flags: i64 = s
            .conn
            .query_row("SELECT flags FROM readings", [], |r| r.get(0))
            .unwrap();
        assert_eq!(flags, 0);
        // And the device state step: its table, empty.
        let n: i64 = s
            .conn
            .query_row("SELECT count(*) FROM device_state", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
    }

    /// A database of version 4 (before the device state) gains the
    /// `device_state` table in place and the hub's presence calls work on
    /// it.
    #[test]
    fn a_version_4_database_gains_the_device_state() {
        use crate::store::presence::{Connect, PresenceStore, PresenceSync};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v4.db");
        let c = Connection::open(&path).unwrap();
        for (_, sql) in MIGRATIONS.iter().filter(|(v, _)| *v <= 4) {
            c.execute_batch(sql).unwrap();
        }
        c.execute_batch(
            "CREATE TABLE schema_version (version INTEGER NOT NULL);
             INSERT INTO schema_version VALUES (4);",
        )
        .unwrap();
        drop(c);
        let mut s = SqliteStore::open(path.to_str().unwrap()).unwrap();
        assert_eq!(s.schema_version().unwrap(), 5);
        let sync = PresenceSync {
            hub: "h".into(),
            now_ms: 10,
            lease_until_ms: 1_000,
            connects: vec![Connect {
                device_id: "d".into(),
                at_ms: 10,
            }],
            ..Default::default()
        };
        assert_eq!(s.presence_sync(&sync).unwrap().generations, [1]);
        let rows = s.device_states(&["d".into()], 20).unwrap();
        assert!(rows[0].online);
    }

    /// The same upgrade gains the token change counter (migration 3): the
    /// old devices are in the snapshot and a new one moves the counter.
    #[test]
    fn a_version_1_database_is_upgraded_in_place() {
        use crate::store::{AdminStore, TokenStore};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        // A database exactly as version 1 of this code left it.
        let c = Connection::open(&path).unwrap();
        c.execute_batch(SCHEMA_V1).unwrap();
        c.execute_batch(
            "CREATE TABLE schema_version (version INTEGER NOT NULL);
             INSERT INTO schema_version VALUES (1);
             INSERT INTO devices (device_id, token_hash, created_ms) VALUES ('old', x'00', 1);",
        )
        .unwrap();
        drop(c);
        let mut s = SqliteStore::open(path.to_str().unwrap()).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        let n0 = s.token_changes().unwrap();
        let snap = s.auth_snapshot().unwrap();
        assert_eq!(snap.changes, n0);
        assert!(snap.devices.iter().any(|(id, _)| id == "old"));
        s.add_device("new", &[1; 32], 2).unwrap();
        assert!(s.token_changes().unwrap() > n0);
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
