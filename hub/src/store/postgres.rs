//! The PostgreSQL / TimescaleDB backend (`postgres://…`).
//!
//! Owns the PostgreSQL schema and its migrations, the choice between
//! TimescaleDB mode and plain mode, TLS to the database, the batched write
//! path and reconnection.
//!
//! - **Calls block.** The `postgres` crate is synchronous: the hub calls a
//!   [`PgStore`] only from its writer thread or `spawn_blocking`, never on
//!   an async worker.
//! - **Schema.** Created and migrated at [`PgStore::open`] inside one
//!   transaction holding an advisory lock, so two hubs starting at once
//!   against one database serialize and the second finds nothing to do.
//!   `ts` and `received_at` are `timestamptz`; token hashes are `bytea`.
//! - **Modes.** If the `timescaledb` extension is installed, or available
//!   and creatable, `readings` becomes a hypertable on `ts` whose unique
//!   index is `(device_id, epoch, seq, ts)` (TimescaleDB requires the
//!   partitioning column in every unique index), with optional retention
//!   and compression policies from [`PgOptions`]. Otherwise `readings` is a
//!   plain table, unique on `(device_id, epoch, seq)`. The mode is logged.
//! - **Writes.** A batch is one transaction. Normally it is a binary
//!   `COPY` straight into `readings` (duplicates inside the batch are
//!   dropped first). If a row is already stored — an edge resending after
//!   a lost ack, or a retry after a commit whose outcome was lost — the
//!   unique index refuses the COPY, the transaction rolls back, and the
//!   batch goes again as binary `COPY` into a session-local staging table
//!   (`ON COMMIT DELETE ROWS`) followed by `INSERT … SELECT … ON CONFLICT
//!   DO NOTHING`; so do the next few batches. Either way nothing is stored
//!   twice and a resend is not an error. See [`WriteMethod`] and
//!   BENCHMARKS.md for why.
//! - **Reconnect.** Any database failure drops the connection; the call
//!   returns [`StoreError::Db`] and the next call connects afresh. The
//!   caller (the writer) retries the same batch with backoff.
//! - **TLS** (rustls, ring, no OpenSSL) when the URL says
//!   `sslmode=prefer|require|verify-ca|verify-full`. The server certificate
//!   is always verified: against the Mozilla roots (`webpki-roots`) plus the
//!   PEM certificates of `sslrootcert=PATH`, host name included.
//! - **Secrets.** The URL is only ever shown through [`redact`].

use std::collections::{HashMap, HashSet};
use std::error::Error as StdError;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use ems_shared::Reading;
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::config::SslMode;
use postgres::error::SqlState;
use postgres::types::{FromSql, IsNull, ToSql, Type};
use postgres::{Client, NoTls, Statement};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{
    ct_eq, AdminStore, AuthStore, DeviceInfo, HistoryStore, ReadingSink, Row, StoreError,
    StoredReading, TokenHash, ViewerInfo, ViewerScope,
};

/// Schema version this code writes and expects.
pub const SCHEMA_VERSION: i32 = 1;

/// Key of the advisory lock held while migrating ("ems_hub" in ASCII).
pub const MIGRATION_LOCK_KEY: i64 = 0x0065_6d73_5f68_7562;

/// Whether to use TimescaleDB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TimescaleMode {
    /// Use it when installed or installable (`CREATE EXTENSION` allowed).
    #[default]
    Auto,
    /// Never: a plain table even if the extension is there.
    Off,
    /// Fail to open unless `readings` can be a hypertable.
    Require,
}

/// How batches are written. Every method keeps the dedup on
/// `(device_id, epoch, seq)` and writes a batch in one transaction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WriteMethod {
    /// The default and fastest. Binary `COPY` straight into `readings`;
    /// if that hits an already-stored row (unique violation: an edge is
    /// resending), the transaction is rolled back and the batch, and the
    /// next few, go the [`WriteMethod::StagedCopy`] way. Plain inserts skip
    /// the speculative-insertion cost of `ON CONFLICT`, which dominates
    /// otherwise.
    #[default]
    Copy,
    /// Binary `COPY` into a session-local staging table, then `INSERT …
    /// SELECT … ON CONFLICT DO NOTHING`.
    StagedCopy,
    /// Prepared multi-row `INSERT … VALUES (…),(…) ON CONFLICT DO NOTHING`
    /// (for comparison in the benchmark).
    MultiRowInsert,
}

/// Options for the PostgreSQL backend that do not belong in the URL. All
/// optional; `PgOptions::default()` is what `--database postgres://…`
/// gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgOptions {
    /// TimescaleDB use.
    pub timescale: TimescaleMode,
    /// TimescaleDB only: drop chunks whose readings are older than this
    /// many days (`add_retention_policy`). `None` leaves policies as they
    /// are.
    pub retention_days: Option<u32>,
    /// TimescaleDB only: compress chunks older than this many days
    /// (`add_compression_policy`). `None` leaves policies as they are.
    pub compress_after_days: Option<u32>,
    /// Write path for `insert_batch`.
    pub write_method: WriteMethod,
    /// Connection timeout, unless the URL sets `connect_timeout`.
    pub connect_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            timescale: TimescaleMode::Auto,
            retention_days: None,
            compress_after_days: None,
            write_method: WriteMethod::Copy,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Which kind of `readings` table the database has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgMode {
    /// A plain PostgreSQL table.
    Plain,
    /// A TimescaleDB hypertable on `ts`.
    Timescale,
}

/// Version 1 of the schema (plain mode; TimescaleDB mode converts
/// `readings` afterwards, see [`timescale_sql`]).
const SCHEMA_V1: &str = "
CREATE TABLE devices (
    device_id  text PRIMARY KEY,
    token_hash bytea NOT NULL,
    created_ms bigint NOT NULL,
    revoked_ms bigint
);
CREATE TABLE viewers (
    viewer_id   bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    token_hash  bytea NOT NULL UNIQUE,
    all_devices boolean NOT NULL,
    created_ms  bigint NOT NULL,
    revoked_ms  bigint
);
CREATE TABLE viewer_devices (
    viewer_id bigint NOT NULL REFERENCES viewers (viewer_id) ON DELETE CASCADE,
    device_id text NOT NULL,
    PRIMARY KEY (viewer_id, device_id)
);
CREATE TABLE admins (
    name       text PRIMARY KEY,
    token_hash bytea NOT NULL UNIQUE,
    created_ms bigint NOT NULL,
    revoked_ms bigint
);
CREATE TABLE readings (
    device_id          text NOT NULL,
    meter              text NOT NULL,
    ts                 timestamptz NOT NULL,
    received_at        timestamptz NOT NULL,
    epoch              bigint NOT NULL,
    seq                bigint NOT NULL,
    voltage_v          double precision,
    current_a          double precision,
    power_w            double precision,
    energy_wh          double precision,
    frequency_hz       double precision,
    power_factor       double precision,
    reactive_power_var double precision
);
CREATE UNIQUE INDEX readings_dedup ON readings (device_id, epoch, seq);
CREATE INDEX readings_device_ts ON readings (device_id, ts DESC);
";

/// The session-local staging table for binary COPY. Emptied at every
/// commit (and discarded with a rolled-back transaction).
const CREATE_STAGE: &str = "
CREATE TEMP TABLE IF NOT EXISTS readings_stage (
    device_id          text NOT NULL,
    meter              text NOT NULL,
    ts                 timestamptz NOT NULL,
    received_at        timestamptz NOT NULL,
    epoch              bigint NOT NULL,
    seq                bigint NOT NULL,
    voltage_v          double precision,
    current_a          double precision,
    power_w            double precision,
    energy_wh          double precision,
    frequency_hz       double precision,
    power_factor       double precision,
    reactive_power_var double precision
) ON COMMIT DELETE ROWS";

const COLUMNS: &str = "device_id, meter, ts, received_at, epoch, seq, voltage_v, current_a, \
     power_w, energy_wh, frequency_hz, power_factor, reactive_power_var";

const COPY_STAGE: &str = "COPY readings_stage (device_id, meter, ts, received_at, epoch, seq, \
     voltage_v, current_a, power_w, energy_wh, frequency_hz, power_factor, reactive_power_var) \
     FROM STDIN (FORMAT binary)";

const COPY_READINGS: &str = "COPY readings (device_id, meter, ts, received_at, epoch, seq, \
     voltage_v, current_a, power_w, energy_wh, frequency_hz, power_factor, reactive_power_var) \
     FROM STDIN (FORMAT binary)";

/// Batches merged through the staging table after a conflict, before the
/// direct path is tried again.
const STAGED_AFTER_CONFLICT: u32 = 16;

const MERGE_STAGE: &str = "INSERT INTO readings (device_id, meter, ts, received_at, epoch, seq, \
     voltage_v, current_a, power_w, energy_wh, frequency_hz, power_factor, reactive_power_var) \
     SELECT device_id, meter, ts, received_at, epoch, seq, voltage_v, current_a, power_w, \
     energy_wh, frequency_hz, power_factor, reactive_power_var FROM readings_stage \
     ON CONFLICT DO NOTHING";

/// Column types of one row, in [`COLUMNS`] order.
const ROW_TYPES: [Type; 13] = [
    Type::TEXT,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
    Type::INT8,
    Type::INT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
];

/// Rows per multi-row `INSERT` statement (13 parameters each, ≤ 65535).
const INSERT_CHUNK: usize = 2000;
const _: () = assert!(INSERT_CHUNK * 13 <= 65535);

/// Makes the `timescaledb` extension available in this database.
pub const CREATE_TIMESCALE_EXTENSION: &str = "CREATE EXTENSION IF NOT EXISTS timescaledb";

/// What the database already has, for [`timescale_sql`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimescaleState {
    /// `readings` is already a hypertable.
    pub is_hypertable: bool,
    /// Compression is already enabled on it (its settings cannot be
    /// changed once chunks are compressed, so they are set only once).
    pub compression_enabled: bool,
}

/// The statements that make `readings` a TimescaleDB 2.x hypertable on
/// `ts` (keeping existing rows) and apply the policies configured in
/// `opts`, given what the database already has. Running them again is
/// harmless.
///
/// The unique index gains `ts` because TimescaleDB requires the
/// partitioning column in every unique index; a resent reading carries the
/// same `ts` as the original, so the dedup still holds.
pub fn timescale_sql(opts: &PgOptions, state: TimescaleState) -> Vec<String> {
    let mut sql = Vec::new();
    if !state.is_hypertable {
        sql.push(
            "CREATE UNIQUE INDEX IF NOT EXISTS readings_dedup_ts \
             ON readings (device_id, epoch, seq, ts)"
                .to_string(),
        );
        sql.push("DROP INDEX IF EXISTS readings_dedup".to_string());
        sql.push(
            "SELECT create_hypertable('readings', 'ts', if_not_exists => TRUE, \
             migrate_data => TRUE)"
                .to_string(),
        );
    }
    if let Some(days) = opts.retention_days {
        sql.push("SELECT remove_retention_policy('readings', if_exists => TRUE)".to_string());
        sql.push(format!(
            "SELECT add_retention_policy('readings', INTERVAL '{days} days', \
             if_not_exists => TRUE)"
        ));
    }
    if let Some(days) = opts.compress_after_days {
        if !state.compression_enabled {
            // segmentby + orderby cover every column of the unique index.
            sql.push(
                "ALTER TABLE readings SET (timescaledb.compress, \
                 timescaledb.compress_segmentby = 'device_id', \
                 timescaledb.compress_orderby = 'ts DESC, epoch, seq')"
                    .to_string(),
            );
        }
        sql.push("SELECT remove_compression_policy('readings', if_exists => TRUE)".to_string());
        sql.push(format!(
            "SELECT add_compression_policy('readings', INTERVAL '{days} days', \
             if_not_exists => TRUE)"
        ));
    }
    sql
}

/// How to reach the database: everything needed to (re)connect.
struct Target {
    /// Parsed connection parameters (holds the password; never shown).
    config: postgres::Config,
    /// The TLS connector, when the URL asks for TLS.
    tls: Option<MakeRustlsConnect>,
    /// The URL without its password, for messages.
    redacted: String,
}

impl Target {
    fn parse(url: &str, opts: &PgOptions) -> Result<Target, StoreError> {
        let redacted = redact(url);
        let fail = |reason: String| StoreError::Open {
            url: redacted.clone(),
            reason,
        };
        let (base, params) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let mut sslmode = None;
        let mut rootcert = None;
        let mut rest = Vec::new();
        for kv in params.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "sslmode" => sslmode = Some(percent_decode(v)),
                "sslrootcert" => rootcert = Some(percent_decode(v)),
                "sslcert" | "sslkey" | "sslpassword" | "sslcrl" => {
                    return Err(fail(format!("{k} (client certificates) is not supported")))
                }
                _ => rest.push(kv),
            }
        }
        let cleaned = if rest.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        let mut config = postgres::Config::from_str(&cleaned)
            .map_err(|e| fail(format!("invalid connection URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(opts.connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("ems-hub");
        }
        // A dead link without a reset (NAT timeout, pulled cable) must fail
        // a write within about a minute, not after the kernel's ~15 min of
        // retransmissions, so that the writer reconnects.
        let has = |key: &str| rest.iter().any(|kv| kv.split('=').next() == Some(key));
        if !has("keepalives_idle") {
            config.keepalives_idle(Duration::from_secs(30));
        }
        if !has("keepalives_interval") {
            config.keepalives_interval(Duration::from_secs(10));
        }
        if !has("keepalives_retries") {
            config.keepalives_retries(3);
        }
        if !has("tcp_user_timeout") {
            config.tcp_user_timeout(Duration::from_secs(60));
        }
        let ssl = match sslmode.as_deref() {
            None | Some("disable") | Some("allow") => None,
            Some("prefer") => Some(SslMode::Prefer),
            Some("require") | Some("verify-ca") | Some("verify-full") => Some(SslMode::Require),
            Some(other) => {
                return Err(fail(format!(
                    "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                )))
            }
        };
        let tls = match ssl {
            None => {
                config.ssl_mode(SslMode::Disable);
                None
            }
            Some(mode) => {
                config.ssl_mode(mode);
                Some(tls_connector(rootcert.as_deref()).map_err(fail)?)
            }
        };
        Ok(Target {
            config,
            tls,
            redacted,
        })
    }

    fn connect(&self) -> Result<Client, StoreError> {
        let client = match &self.tls {
            None => self.config.connect(NoTls),
            Some(tls) => self.config.connect(tls.clone()),
        };
        client.map_err(|e| StoreError::Db(format!("cannot connect: {}", error_chain(&e))))
    }
}

/// A rustls client verifying the server against the Mozilla roots plus
/// the certificates in `rootcert` (a PEM file), with the ring provider.
fn tls_connector(rootcert: Option<&str>) -> Result<MakeRustlsConnect, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = rootcert {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read sslrootcert {path}: {e}"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cannot parse sslrootcert {path}: {e}"))?;
        if certs.is_empty() {
            return Err(format!("sslrootcert {path} holds no certificate"));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("bad certificate in sslrootcert {path}: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Decodes `%XX` escapes (invalid escapes are kept as they are).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A live connection plus what is tied to it.
struct Conn {
    /// The client.
    client: Client,
    /// Prepared multi-row INSERTs by row count (valid for this connection
    /// only).
    inserts: HashMap<usize, Statement>,
}

/// A PostgreSQL database handle. Reconnects on the next call after a
/// failure.
pub struct PgStore {
    /// How to reach the database.
    target: Target,
    /// The connection; `None` after a failure until the next call.
    conn: Option<Conn>,
    /// Options given at open.
    opts: PgOptions,
    /// Plain or TimescaleDB, as found at open.
    mode: PgMode,
    /// Connections made so far (1 after open), for tests and metrics.
    connects: u64,
    /// Batches still to write through the staging table after a batch hit
    /// already-stored rows (see [`WriteMethod::Copy`]).
    staged_batches_left: u32,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &self.target.redacted)
            .field("mode", &self.mode)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl Drop for PgStore {
    /// The sync client owns a small tokio runtime, which must not be
    /// dropped on an async worker thread (tokio panics). When dropped
    /// inside a runtime — e.g. the hub's last `Arc` going away in a task —
    /// the connection is closed on a short-lived thread instead.
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                let _ = std::thread::Builder::new()
                    .name("ems-pg-close".into())
                    .spawn(move || drop(conn));
            }
        }
    }
}

impl PgStore {
    /// Connects to `url`, creates or migrates the schema and picks the
    /// mode (logged).
    pub fn open(url: &str, opts: &PgOptions) -> Result<Self, StoreError> {
        let target = Target::parse(url, opts)?;
        let redacted = target.redacted.clone();
        let fail = |reason: String| StoreError::Open {
            url: redacted.clone(),
            reason,
        };
        let mut client = target.connect().map_err(|e| match e {
            StoreError::Db(m) => fail(m),
            other => other,
        })?;
        let mode = migrate(&mut client, opts).map_err(fail)?;
        match mode {
            PgMode::Timescale => log::info!(
                "store {}: TimescaleDB mode (readings is a hypertable on ts)",
                target.redacted
            ),
            PgMode::Plain => log::info!(
                "store {}: plain PostgreSQL mode (timescaledb extension not in use)",
                target.redacted
            ),
        }
        let mut store = PgStore {
            conn: None,
            target,
            opts: opts.clone(),
            mode,
            connects: 1,
            staged_batches_left: 0,
        };
        store.conn = Some(
            store
                .prepare_session(client)
                .map_err(|e| fail(e.to_string()))?,
        );
        Ok(store)
    }

    /// Plain or TimescaleDB.
    pub fn mode(&self) -> PgMode {
        self.mode
    }

    /// How many connections this handle has made (1 after open; more after
    /// reconnects).
    pub fn connects(&self) -> u64 {
        self.connects
    }

    /// Process id of the server backend serving this handle (connecting
    /// first if needed), for diagnostics and the benchmark's CPU
    /// accounting.
    pub fn backend_pid(&mut self) -> Result<i32, StoreError> {
        self.with(|c| {
            c.client
                .query_one("SELECT pg_backend_pid()", &[])
                .and_then(|r| r.try_get(0))
                .map_err(db)
        })
    }

    /// The URL without its password.
    pub fn redacted_url(&self) -> &str {
        &self.target.redacted
    }

    fn prepare_session(&self, mut client: Client) -> Result<Conn, postgres::Error> {
        // Acks mean "durable": a server or role tuned with
        // `synchronous_commit = off` must not make COMMIT return before the
        // WAL is flushed.
        client.batch_execute("SET synchronous_commit = on")?;
        client.batch_execute(CREATE_STAGE)?;
        Ok(Conn {
            client,
            inserts: HashMap::new(),
        })
    }

    /// The live connection, connecting first if there is none.
    fn conn(&mut self) -> Result<&mut Conn, StoreError> {
        if self.conn.as_ref().is_some_and(|c| c.client.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            let client = self.target.connect()?;
            self.connects += 1;
            let conn = self
                .prepare_session(client)
                .map_err(|e| StoreError::Db(e.to_string()))?;
            log::info!("store {}: reconnected", self.target.redacted);
            self.conn = Some(conn);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| StoreError::Db("no database connection".into()))
    }

    /// Runs `f` on the connection. A database failure (anything but the
    /// `AlreadyExists`/`NotFound` answers) drops the connection so that the
    /// next call reconnects.
    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let r = f(self.conn()?);
        if let Err(StoreError::Db(msg)) = &r {
            log::warn!(
                "store {}: {msg}; will reconnect on next use",
                self.target.redacted
            );
            self.conn = None;
        }
        r
    }

    /// Streams `rows` with binary COPY into `readings` directly
    /// (`direct`) or into the staging table, inside `tx`. Rows repeating an
    /// earlier row's `(device_id, epoch, seq)` in the same batch are left
    /// out (the first one wins, as with a resend).
    fn copy_rows(
        tx: &mut postgres::Transaction<'_>,
        rows: &[Row],
        direct: bool,
    ) -> Result<(), postgres::Error> {
        let sink = tx.copy_in(if direct { COPY_READINGS } else { COPY_STAGE })?;
        let mut w = BinaryCopyInWriter::new(sink, &ROW_TYPES);
        let mut seen = HashSet::with_capacity(rows.len());
        for row in rows {
            let r = &row.reading;
            // Checked by `checked_keys` before.
            let (epoch, seq) = (r.epoch as i64, r.seq as i64);
            if !seen.insert((&*row.device_id, epoch, seq)) {
                continue;
            }
            w.write(&[
                &&*row.device_id,
                &r.meter,
                &PgTime(r.ts_ms),
                &PgTime(row.received_at_ms),
                &epoch,
                &seq,
                &r.voltage_v,
                &r.current_a,
                &r.power_w,
                &r.energy_wh,
                &r.frequency_hz,
                &r.power_factor,
                &r.reactive_power_var,
            ])?;
        }
        w.finish().map(|_| ())
    }

    /// The optimistic path: binary COPY straight into `readings` in one
    /// transaction. `Ok(false)` when a row was already stored (unique
    /// violation): the transaction was rolled back, nothing was written,
    /// and the batch must go through [`PgStore::insert_staged`].
    fn insert_direct(conn: &mut Conn, rows: &[Row]) -> Result<bool, StoreError> {
        checked_keys(rows)?;
        let mut tx = conn.client.transaction().map_err(db)?;
        match PgStore::copy_rows(&mut tx, rows, true) {
            Ok(()) => {}
            Err(e) if is_unique_violation(&e) => return Ok(false),
            Err(e) => return Err(db(e)),
        }
        tx.commit().map_err(db)?;
        Ok(true)
    }

    /// The merging path: binary COPY into the staging table, then
    /// `INSERT … SELECT … ON CONFLICT DO NOTHING`, one transaction.
    fn insert_staged(conn: &mut Conn, rows: &[Row]) -> Result<(), StoreError> {
        checked_keys(rows)?;
        let mut tx = conn.client.transaction().map_err(db)?;
        PgStore::copy_rows(&mut tx, rows, false).map_err(db)?;
        tx.execute(MERGE_STAGE, &[]).map_err(db)?;
        tx.commit().map_err(db)
    }

    fn insert_values(conn: &mut Conn, rows: &[Row]) -> Result<(), StoreError> {
        let mut prepared = Vec::new();
        for chunk in rows.chunks(INSERT_CHUNK) {
            let n = chunk.len();
            if !conn.inserts.contains_key(&n) {
                let stmt = conn
                    .client
                    .prepare_typed(
                        &multi_insert_sql(n),
                        &ROW_TYPES
                            .iter()
                            .cycle()
                            .take(13 * n)
                            .cloned()
                            .collect::<Vec<_>>(),
                    )
                    .map_err(db)?;
                conn.inserts.insert(n, stmt);
            }
            if let Some(s) = conn.inserts.get(&n) {
                prepared.push(s.clone());
            }
        }
        let mut tx = conn.client.transaction().map_err(db)?;
        for (chunk, stmt) in rows.chunks(INSERT_CHUNK).zip(prepared) {
            let owned: Vec<OwnedRow> = chunk
                .iter()
                .map(OwnedRow::from_row)
                .collect::<Result<_, _>>()?;
            let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(owned.len() * 13);
            for o in &owned {
                o.push_params(&mut params);
            }
            tx.execute(&stmt, &params).map_err(db)?;
        }
        tx.commit().map_err(db)
    }
}

/// One row's parameters in owned form, for the multi-row INSERT.
struct OwnedRow<'a> {
    row: &'a Row,
    device_id: &'a str,
    ts: PgTime,
    received_at: PgTime,
    epoch: i64,
    seq: i64,
}

impl<'a> OwnedRow<'a> {
    fn from_row(row: &'a Row) -> Result<Self, StoreError> {
        Ok(OwnedRow {
            row,
            device_id: &row.device_id,
            ts: PgTime(row.reading.ts_ms),
            received_at: PgTime(row.received_at_ms),
            epoch: to_i64(row.reading.epoch)?,
            seq: to_i64(row.reading.seq)?,
        })
    }

    fn push_params<'b>(&'b self, p: &mut Vec<&'b (dyn ToSql + Sync)>) {
        let r = &self.row.reading;
        p.push(&self.device_id);
        p.push(&r.meter);
        p.push(&self.ts);
        p.push(&self.received_at);
        p.push(&self.epoch);
        p.push(&self.seq);
        p.push(&r.voltage_v);
        p.push(&r.current_a);
        p.push(&r.power_w);
        p.push(&r.energy_wh);
        p.push(&r.frequency_hz);
        p.push(&r.power_factor);
        p.push(&r.reactive_power_var);
    }
}

fn multi_insert_sql(n: usize) -> String {
    let mut sql = format!("INSERT INTO readings ({COLUMNS}) VALUES ");
    for i in 0..n {
        if i > 0 {
            sql.push(',');
        }
        sql.push('(');
        for c in 0..13 {
            if c > 0 {
                sql.push(',');
            }
            sql.push('$');
            sql.push_str(&(i * 13 + c + 1).to_string());
        }
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT DO NOTHING");
    sql
}

/// Creates/migrates the schema and sets up the mode, in one transaction
/// under an advisory lock. Returns the mode.
fn migrate(client: &mut Client, opts: &PgOptions) -> Result<PgMode, String> {
    let mut tx = client.transaction().map_err(|e| e.to_string())?;
    let step = |what: &str, e: postgres::Error| format!("{what}: {}", pg_message(&e));
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .map_err(|e| step("taking the migration lock", e))?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        .map_err(|e| step("creating schema_version", e))?;
    let current: Option<i32> = tx
        .query_one("SELECT max(version) FROM schema_version", &[])
        .and_then(|r| r.try_get(0))
        .map_err(|e| step("reading schema_version", e))?;
    let current = current.unwrap_or(0);
    if current > SCHEMA_VERSION {
        return Err(format!(
            "database schema version {current} is newer than this ems-hub understands \
             ({SCHEMA_VERSION}); upgrade ems-hub"
        ));
    }
    if current < 1 {
        tx.batch_execute(SCHEMA_V1)
            .map_err(|e| step("creating the schema", e))?;
    }
    if current < SCHEMA_VERSION {
        tx.execute("DELETE FROM schema_version", &[])
            .and_then(|_| {
                tx.execute(
                    "INSERT INTO schema_version (version) VALUES ($1)",
                    &[&SCHEMA_VERSION],
                )
            })
            .map_err(|e| step("writing schema_version", e))?;
    }

    let mode = if opts.timescale == TimescaleMode::Off {
        PgMode::Plain
    } else {
        let installed = extension_installed(&mut tx).map_err(|e| step("checking extensions", e))?
            || try_create_extension(&mut tx)?;
        if installed {
            let state = tx
                .query_opt(
                    "SELECT compression_enabled FROM timescaledb_information.hypertables \
                     WHERE hypertable_name = 'readings' \
                     AND hypertable_schema = current_schema()",
                    &[],
                )
                .and_then(|r| {
                    Ok(match r {
                        None => TimescaleState::default(),
                        Some(r) => TimescaleState {
                            is_hypertable: true,
                            compression_enabled: r.try_get(0)?,
                        },
                    })
                })
                .map_err(|e| step("checking the hypertable", e))?;
            let sql = timescale_sql(opts, state);
            for s in sql {
                tx.batch_execute(&s)
                    .map_err(|e| step("setting up TimescaleDB", e))?;
            }
            PgMode::Timescale
        } else {
            PgMode::Plain
        }
    };
    if opts.timescale == TimescaleMode::Require && mode != PgMode::Timescale {
        return Err(
            "TimescaleDB is required but the timescaledb extension is not available \
                    (install it and add it to shared_preload_libraries)"
                .into(),
        );
    }
    if mode == PgMode::Plain
        && (opts.retention_days.is_some() || opts.compress_after_days.is_some())
    {
        log::warn!("retention/compression policies need TimescaleDB; ignored in plain mode");
    }
    tx.commit().map_err(|e| step("committing the schema", e))?;
    Ok(mode)
}

fn extension_installed(tx: &mut postgres::Transaction<'_>) -> Result<bool, postgres::Error> {
    tx.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')",
        &[],
    )?
    .try_get(0)
}

/// Creates the extension if the server offers it; a failure (no
/// privilege, not preloaded) is logged and means plain mode.
fn try_create_extension(tx: &mut postgres::Transaction<'_>) -> Result<bool, String> {
    let available: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')",
            &[],
        )
        .and_then(|r| r.try_get(0))
        .map_err(|e| format!("checking available extensions: {}", pg_message(&e)))?;
    if !available {
        return Ok(false);
    }
    let mut sp = tx
        .transaction()
        .map_err(|e| format!("savepoint: {}", pg_message(&e)))?;
    match sp.batch_execute(CREATE_TIMESCALE_EXTENSION) {
        Ok(()) => {
            sp.commit()
                .map_err(|e| format!("creating timescaledb: {}", pg_message(&e)))?;
            Ok(true)
        }
        Err(e) => {
            log::warn!(
                "timescaledb is available but CREATE EXTENSION failed ({}); using plain mode",
                pg_message(&e)
            );
            sp.rollback()
                .map_err(|e| format!("rolling back savepoint: {}", pg_message(&e)))?;
            Ok(false)
        }
    }
}

/// An error and its sources on one line (e.g. the TLS handshake error
/// and the certificate problem under it).
fn error_chain(e: &dyn StdError) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        src = s.source();
    }
    out.replace('\n', " ")
}

/// The server's message (and detail) or the client error, one line.
fn pg_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => match d.detail() {
            Some(detail) => format!("{} ({detail})", d.message()),
            None => d.message().to_string(),
        },
        None => error_chain(e),
    }
    .replace('\n', " ")
}

fn db(e: postgres::Error) -> StoreError {
    StoreError::Db(pg_message(&e))
}

fn is_unique_violation(e: &postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// Checks that every epoch/seq fits a BIGINT (so `as i64` is exact).
fn checked_keys(rows: &[Row]) -> Result<(), StoreError> {
    for r in rows {
        to_i64(r.reading.epoch)?;
        to_i64(r.reading.seq)?;
    }
    Ok(())
}

/// `u64` epoch/seq (≤ 2^53 − 1 by protocol) as a BIGINT.
fn to_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Db(format!("epoch/seq {v} does not fit a BIGINT")))
}

/// Unix ms of 2000-01-01T00:00:00Z, PostgreSQL's timestamp epoch.
const PG_EPOCH_MS: i64 = 946_684_800_000;
/// Earliest timestamptz PostgreSQL stores (4713-11-24 BC), Unix ms.
const PG_MIN_MS: i64 = -210_866_803_200_000;
/// Just past the latest timestamptz PostgreSQL stores (294277 AD), Unix ms.
const PG_END_MS: i64 = 9_224_318_016_000_000;

/// A `timestamptz` as Unix milliseconds, encoded directly in PostgreSQL's
/// binary format (µs since 2000-01-01) without overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PgTime(i64);

impl ToSql for PgTime {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        if !(PG_MIN_MS..PG_END_MS).contains(&self.0) {
            return Err(format!("timestamp {} ms is out of PostgreSQL's range", self.0).into());
        }
        out.put_i64((self.0 - PG_EPOCH_MS) * 1000);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }

    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        if !<Self as ToSql>::accepts(ty) {
            return Err(format!("PgTime cannot encode {ty}").into());
        }
        self.to_sql(ty, out)
    }
}

impl<'a> FromSql<'a> for PgTime {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        let b: [u8; 8] = raw.try_into()?;
        let micros = i64::from_be_bytes(b);
        if micros == i64::MAX || micros == i64::MIN {
            return Err("infinite timestamp".into());
        }
        Ok(PgTime(micros.div_euclid(1000) + PG_EPOCH_MS))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }
}

/// Clamps a query bound into the representable range.
fn clamp_ms(ms: i64) -> PgTime {
    PgTime(ms.clamp(PG_MIN_MS, PG_END_MS - 1))
}

impl ReadingSink for PgStore {
    fn insert_batch(&mut self, rows: &[Row]) -> Result<(), StoreError> {
        // A timestamp PostgreSQL cannot hold would fail this batch on every
        // retry and stall the writer for good: such rows are left out.
        let in_range = |r: &Row| {
            (PG_MIN_MS..PG_END_MS).contains(&r.reading.ts_ms)
                && (PG_MIN_MS..PG_END_MS).contains(&r.received_at_ms)
        };
        let kept: Vec<Row>;
        let rows = if rows.iter().all(in_range) {
            rows
        } else {
            kept = rows.iter().filter(|r| in_range(r)).cloned().collect();
            log::warn!(
                "store {}: {} reading(s) with a timestamp outside PostgreSQL's range \
                 not stored",
                self.target.redacted,
                rows.len() - kept.len()
            );
            &kept
        };
        if rows.is_empty() {
            return Ok(());
        }
        match self.opts.write_method {
            WriteMethod::Copy if self.staged_batches_left == 0 => {
                if self.with(|c| PgStore::insert_direct(c, rows))? {
                    return Ok(());
                }
                // Some rows were stored before: an edge is replaying. Merge
                // this batch and the next few, then try the fast path again.
                self.staged_batches_left = STAGED_AFTER_CONFLICT;
                self.with(|c| PgStore::insert_staged(c, rows))
            }
            WriteMethod::Copy => {
                self.staged_batches_left -= 1;
                self.with(|c| PgStore::insert_staged(c, rows))
            }
            WriteMethod::StagedCopy => self.with(|c| PgStore::insert_staged(c, rows)),
            WriteMethod::MultiRowInsert => self.with(|c| PgStore::insert_values(c, rows)),
        }
    }
}

impl AuthStore for PgStore {
    fn device_token_valid(
        &mut self,
        device_id: &str,
        hash: &TokenHash,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let row = c
                .client
                .query_opt(
                    "SELECT token_hash FROM devices WHERE device_id = $1 AND revoked_ms IS NULL",
                    &[&device_id],
                )
                .map_err(db)?;
            match row {
                None => Ok(false),
                Some(r) => {
                    let stored: Vec<u8> = r.try_get(0).map_err(db)?;
                    Ok(ct_eq(&stored, hash))
                }
            }
        })
    }

    fn viewer_scope(&mut self, hash: &TokenHash) -> Result<Option<ViewerScope>, StoreError> {
        self.with(|c| {
            let row = c
                .client
                .query_opt(
                    "SELECT viewer_id, all_devices FROM viewers \
                     WHERE token_hash = $1 AND revoked_ms IS NULL",
                    &[&&hash[..]],
                )
                .map_err(db)?;
            let Some(row) = row else {
                return Ok(None);
            };
            let viewer_id: i64 = row.try_get(0).map_err(db)?;
            let all: bool = row.try_get(1).map_err(db)?;
            if all {
                return Ok(Some(ViewerScope::AllDevices));
            }
            let ids = c
                .client
                .query(
                    "SELECT device_id FROM viewer_devices WHERE viewer_id = $1 \
                     ORDER BY device_id",
                    &[&viewer_id],
                )
                .map_err(db)?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<Vec<String>, _>>()
                .map_err(db)?;
            Ok(Some(ViewerScope::Devices(ids)))
        })
    }

    fn admin_name(&mut self, hash: &TokenHash) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            c.client
                .query_opt(
                    "SELECT name FROM admins WHERE token_hash = $1 AND revoked_ms IS NULL",
                    &[&&hash[..]],
                )
                .map_err(db)?
                .map(|r| r.try_get(0).map_err(db))
                .transpose()
        })
    }

    fn active_device_tokens(&mut self) -> Result<Vec<(String, TokenHash)>, StoreError> {
        self.with(|c| {
            let rows = c
                .client
                .query(
                    "SELECT device_id, token_hash FROM devices WHERE revoked_ms IS NULL",
                    &[],
                )
                .map_err(db)?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let id: String = r.try_get(0).map_err(db)?;
                let hash: Vec<u8> = r.try_get(1).map_err(db)?;
                // A malformed stored hash matches no token (see sqlite.rs).
                if let Ok(h) = TokenHash::try_from(hash.as_slice()) {
                    out.push((id, h));
                }
            }
            Ok(out)
        })
    }

    fn device_exists(&mut self, device_id: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            let row = c
                .client
                .query_opt("SELECT 1 FROM devices WHERE device_id = $1", &[&device_id])
                .map_err(db)?;
            Ok(row.is_some())
        })
    }
}

impl AdminStore for PgStore {
    fn add_device(
        &mut self,
        device_id: &str,
        hash: &TokenHash,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            match c.client.execute(
                "INSERT INTO devices (device_id, token_hash, created_ms) VALUES ($1, $2, $3)",
                &[&device_id, &&hash[..], &now_ms],
            ) {
                Ok(_) => Ok(()),
                Err(e) if is_unique_violation(&e) => {
                    Err(StoreError::AlreadyExists(format!("device {device_id}")))
                }
                Err(e) => Err(db(e)),
            }
        })
    }

    fn list_devices(&mut self) -> Result<Vec<DeviceInfo>, StoreError> {
        self.with(|c| {
            c.client
                .query(
                    "SELECT device_id, created_ms, revoked_ms FROM devices ORDER BY device_id",
                    &[],
                )
                .map_err(db)?
                .iter()
                .map(|r| {
                    Ok(DeviceInfo {
                        device_id: r.try_get(0).map_err(db)?,
                        created_ms: r.try_get(1).map_err(db)?,
                        revoked_ms: r.try_get(2).map_err(db)?,
                    })
                })
                .collect()
        })
    }

    fn revoke_device(&mut self, device_id: &str, now_ms: i64) -> Result<(), StoreError> {
        self.with(|c| {
            let n = c
                .client
                .execute(
                    "UPDATE devices SET revoked_ms = COALESCE(revoked_ms, $2) \
                     WHERE device_id = $1",
                    &[&device_id, &now_ms],
                )
                .map_err(db)?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("device {device_id}")));
            }
            Ok(())
        })
    }

    fn rotate_device(&mut self, device_id: &str, hash: &TokenHash) -> Result<(), StoreError> {
        self.with(|c| {
            let n = c
                .client
                .execute(
                    "UPDATE devices SET token_hash = $2, revoked_ms = NULL WHERE device_id = $1",
                    &[&device_id, &&hash[..]],
                )
                .map_err(db)?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("device {device_id}")));
            }
            Ok(())
        })
    }

    fn add_viewer(
        &mut self,
        name: &str,
        hash: &TokenHash,
        scope: &ViewerScope,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            let mut tx = c.client.transaction().map_err(db)?;
            let all = matches!(scope, ViewerScope::AllDevices);
            let row = match tx.query_one(
                "INSERT INTO viewers (name, token_hash, all_devices, created_ms) \
                 VALUES ($1, $2, $3, $4) RETURNING viewer_id",
                &[&name, &&hash[..], &all, &now_ms],
            ) {
                Ok(r) => r,
                Err(e) if is_unique_violation(&e) => {
                    return Err(StoreError::AlreadyExists(format!("viewer {name}")))
                }
                Err(e) => return Err(db(e)),
            };
            let viewer_id: i64 = row.try_get(0).map_err(db)?;
            if let ViewerScope::Devices(ids) = scope {
                tx.execute(
                    "INSERT INTO viewer_devices (viewer_id, device_id) \
                     SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
                    &[&viewer_id, ids],
                )
                .map_err(db)?;
            }
            tx.commit().map_err(db)
        })
    }

    fn list_viewers(&mut self) -> Result<Vec<ViewerInfo>, StoreError> {
        self.with(|c| {
            let rows = c
                .client
                .query(
                    "SELECT v.name, v.all_devices, v.created_ms, v.revoked_ms, \
                     COALESCE(array_agg(d.device_id ORDER BY d.device_id) \
                       FILTER (WHERE d.device_id IS NOT NULL), '{}') \
                     FROM viewers v LEFT JOIN viewer_devices d ON d.viewer_id = v.viewer_id \
                     GROUP BY v.viewer_id ORDER BY v.name",
                    &[],
                )
                .map_err(db)?;
            rows.iter()
                .map(|r| {
                    let all: bool = r.try_get(1).map_err(db)?;
                    let ids: Vec<String> = r.try_get(4).map_err(db)?;
                    Ok(ViewerInfo {
                        name: r.try_get(0).map_err(db)?,
                        scope: if all {
                            ViewerScope::AllDevices
                        } else {
                            ViewerScope::Devices(ids)
                        },
                        created_ms: r.try_get(2).map_err(db)?,
                        revoked_ms: r.try_get(3).map_err(db)?,
                    })
                })
                .collect()
        })
    }

    fn revoke_viewer(&mut self, name: &str, now_ms: i64) -> Result<(), StoreError> {
        self.with(|c| {
            let n = c
                .client
                .execute(
                    "UPDATE viewers SET revoked_ms = COALESCE(revoked_ms, $2) WHERE name = $1",
                    &[&name, &now_ms],
                )
                .map_err(db)?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("viewer {name}")));
            }
            Ok(())
        })
    }

    fn add_admin(&mut self, name: &str, hash: &TokenHash, now_ms: i64) -> Result<(), StoreError> {
        self.with(|c| {
            match c.client.execute(
                "INSERT INTO admins (name, token_hash, created_ms) VALUES ($1, $2, $3)",
                &[&name, &&hash[..], &now_ms],
            ) {
                Ok(_) => Ok(()),
                Err(e) if is_unique_violation(&e) => {
                    Err(StoreError::AlreadyExists(format!("admin {name}")))
                }
                Err(e) => Err(db(e)),
            }
        })
    }
}

impl HistoryStore for PgStore {
    fn readings(
        &mut self,
        device_id: &str,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<Reading>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (from, to) = (clamp_ms(from_ms), clamp_ms(to_ms));
        self.with(|c| {
            let rows = c
                .client
                .query(
                    "SELECT epoch, seq, ts, meter, voltage_v, current_a, power_w, energy_wh, \
                     frequency_hz, power_factor, reactive_power_var FROM readings \
                     WHERE device_id = $1 AND ts >= $2 AND ts < $3 \
                     ORDER BY ts, epoch, seq LIMIT $4",
                    &[&device_id, &from, &to, &limit],
                )
                .map_err(db)?;
            rows.iter()
                .map(|r| {
                    let epoch: i64 = r.try_get(0).map_err(db)?;
                    let seq: i64 = r.try_get(1).map_err(db)?;
                    let ts: PgTime = r.try_get(2).map_err(db)?;
                    Ok(Reading {
                        epoch: u64::try_from(epoch).unwrap_or_default(),
                        seq: u64::try_from(seq).unwrap_or_default(),
                        ts_ms: ts.0,
                        meter: r.try_get(3).map_err(db)?,
                        voltage_v: r.try_get(4).map_err(db)?,
                        current_a: r.try_get(5).map_err(db)?,
                        power_w: r.try_get(6).map_err(db)?,
                        energy_wh: r.try_get(7).map_err(db)?,
                        frequency_hz: r.try_get(8).map_err(db)?,
                        power_factor: r.try_get(9).map_err(db)?,
                        reactive_power_var: r.try_get(10).map_err(db)?,
                        ..Default::default()
                    })
                })
                .collect()
        })
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
        let (from, to) = (clamp_ms(from_ms), clamp_ms(to_ms));
        let order = if newest { "DESC" } else { "ASC" };
        let sql = format!(
            "SELECT epoch, seq, ts, meter, voltage_v, current_a, power_w, energy_wh, \
             frequency_hz, power_factor, reactive_power_var, received_at FROM readings \
             WHERE device_id = $1 AND ts >= $2 AND ts < $3 \
             ORDER BY ts {order}, epoch {order}, seq {order} LIMIT $4"
        );
        let mut out: Vec<StoredReading> = self.with(|c| {
            let rows = c
                .client
                .query(sql.as_str(), &[&device_id, &from, &to, &limit])
                .map_err(db)?;
            rows.iter()
                .map(|r| {
                    let epoch: i64 = r.try_get(0).map_err(db)?;
                    let seq: i64 = r.try_get(1).map_err(db)?;
                    let ts: PgTime = r.try_get(2).map_err(db)?;
                    let rx: PgTime = r.try_get(11).map_err(db)?;
                    Ok(StoredReading {
                        reading: Reading {
                            epoch: u64::try_from(epoch).unwrap_or_default(),
                            seq: u64::try_from(seq).unwrap_or_default(),
                            ts_ms: ts.0,
                            meter: r.try_get(3).map_err(db)?,
                            voltage_v: r.try_get(4).map_err(db)?,
                            current_a: r.try_get(5).map_err(db)?,
                            power_w: r.try_get(6).map_err(db)?,
                            energy_wh: r.try_get(7).map_err(db)?,
                            frequency_hz: r.try_get(8).map_err(db)?,
                            power_factor: r.try_get(9).map_err(db)?,
                            reactive_power_var: r.try_get(10).map_err(db)?,
                            ..Default::default()
                        },
                        received_at_ms: rx.0,
                    })
                })
                .collect()
        })?;
        if newest {
            out.reverse();
        }
        Ok(out)
    }

    fn last_seen(&mut self, device_id: &str) -> Result<Option<i64>, StoreError> {
        self.with(|c| {
            c.client
                .query_opt(
                    "SELECT received_at FROM readings WHERE device_id = $1 \
                     ORDER BY ts DESC LIMIT 1",
                    &[&device_id],
                )
                .map_err(db)?
                .map(|r| r.try_get::<_, PgTime>(0).map(|t| t.0).map_err(db))
                .transpose()
        })
    }
}

/// `url` with any password replaced by `***`, safe to log. Handles
/// `postgres://user:PASSWORD@host/db`, a `password=` query parameter and
/// key/value connection strings (`host=h password=PASSWORD`).
pub fn redact(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let (scheme, rest) = url.split_at(scheme_end + 3);
        let (main, query) = match rest.find('?') {
            Some(q) => (&rest[..q], Some(&rest[q + 1..])),
            None => (rest, None),
        };
        let mut out = String::from(scheme);
        match main.rfind('@') {
            Some(at) => {
                let userinfo = &main[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&main[at..]);
            }
            None => out.push_str(main),
        }
        if let Some(query) = query {
            out.push('?');
            let parts: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            out.push_str(&parts.join("&"));
        }
        return out;
    }
    redact_conninfo(url)
}

/// Redacts `password=…` in a libpq key/value string, including quoted
/// values with spaces and escaped quotes.
fn redact_conninfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = find_ignore_case(rest, "password") {
        let (before, after) = rest.split_at(pos);
        out.push_str(before);
        let key_end = "password".len();
        let after_key = &after[key_end..];
        let trimmed = after_key.trim_start();
        // Only a key if it is a word on its own followed by `=`.
        let at_word_start = before.chars().last().map_or(true, char::is_whitespace);
        if !at_word_start || !trimmed.starts_with('=') {
            out.push_str(&after[..key_end]);
            rest = after_key;
            continue;
        }
        out.push_str("password=***");
        let value = trimmed[1..].trim_start();
        rest = skip_value(value);
    }
    out.push_str(rest);
    out
}

fn find_ignore_case(hay: &str, needle: &str) -> Option<usize> {
    hay.to_ascii_lowercase().find(needle)
}

/// The text after a conninfo value (quoted or bare).
fn skip_value(v: &str) -> &str {
    if let Some(q) = v.strip_prefix('\'') {
        let mut escaped = false;
        for (i, c) in q.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '\'' if !escaped => return &q[i + 1..],
                _ => escaped = false,
            }
        }
        ""
    } else {
        match v.find(char::is_whitespace) {
            Some(i) => &v[i..],
            None => "",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_everywhere() {
        let cases = [
            (
                "postgres://ems:s3cret@db.example:5432/ems?sslmode=require",
                "postgres://ems:***@db.example:5432/ems?sslmode=require",
            ),
            (
                "postgresql://ems@localhost/ems",
                "postgresql://ems@localhost/ems",
            ),
            ("postgres://localhost/ems", "postgres://localhost/ems"),
            ("postgres://u:p%40ss/w@h/db", "postgres://u:***@h/db"),
            (
                "postgres://h/db?user=u&password=s3cret&sslmode=verify-full",
                "postgres://h/db?user=u&password=***&sslmode=verify-full",
            ),
            (
                "host=h user=u password=s3cret dbname=ems",
                "host=h user=u password=*** dbname=ems",
            ),
            (
                "host=h password = 'a b\\' c' dbname=ems",
                "host=h password=*** dbname=ems",
            ),
            ("host=h PASSWORD=x", "host=h password=***"),
            ("host=h passwordless=1", "host=h passwordless=1"),
        ];
        for (input, want) in cases {
            let got = redact(input);
            assert_eq!(got, want, "{input}");
            assert!(!got.contains("s3cret"));
        }
    }

    #[test]
    fn open_errors_never_show_the_password() {
        let e = PgStore::open(
            "postgres://ems:s3cret@127.0.0.1:1/ems?connect_timeout=2",
            &PgOptions::default(),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("ems:***@127.0.0.1:1"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn url_options_are_checked() {
        let o = PgOptions::default();
        let bad = |u: &str| Target::parse(u, &o).err().map(|e| e.to_string());
        assert!(bad("postgres://u:pw@h/db?sslmode=bogus")
            .unwrap()
            .contains("sslmode=bogus"));
        assert!(bad("postgres://u:pw@h/db?sslcert=/x")
            .unwrap()
            .contains("sslcert"));
        assert!(
            bad("postgres://u:pw@h/db?sslmode=require&sslrootcert=/nonexistent")
                .unwrap()
                .contains("sslrootcert")
        );
        let t = Target::parse("postgres://u:pw@h/db?sslmode=verify-full", &o).unwrap();
        assert!(t.tls.is_some());
        assert_eq!(t.config.get_ssl_mode(), SslMode::Require);
        let t = Target::parse("postgres://u:pw@h/db?application_name=x", &o).unwrap();
        assert!(t.tls.is_none());
        assert_eq!(t.config.get_ssl_mode(), SslMode::Disable);
        assert_eq!(t.config.get_application_name(), Some("x"));
        assert_eq!(
            t.config.get_connect_timeout(),
            Some(&Duration::from_secs(10))
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("%2Fetc%2Fca.pem"), "/etc/ca.pem");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a%zz"), "a%zz");
        assert_eq!(percent_decode("%"), "%");
    }

    #[test]
    fn timestamps_encode_exactly() {
        let mut b = BytesMut::new();
        PgTime(PG_EPOCH_MS + 1)
            .to_sql(&Type::TIMESTAMPTZ, &mut b)
            .unwrap();
        assert_eq!(&b[..], &1000i64.to_be_bytes());
        for ms in [0, -1, 1_700_000_000_123, PG_MIN_MS, PG_END_MS - 1] {
            let mut b = BytesMut::new();
            PgTime(ms).to_sql(&Type::TIMESTAMPTZ, &mut b).unwrap();
            let back = PgTime::from_sql(&Type::TIMESTAMPTZ, &b).unwrap();
            assert_eq!(back, PgTime(ms));
        }
        for ms in [i64::MIN, i64::MAX, PG_END_MS, PG_MIN_MS - 1] {
            let mut b = BytesMut::new();
            assert!(PgTime(ms).to_sql(&Type::TIMESTAMPTZ, &mut b).is_err());
        }
        assert!(PgTime(0).to_sql_checked(&Type::INT8, &mut b).is_err());
    }

    #[test]
    fn multi_insert_sql_numbers_parameters() {
        let s = multi_insert_sql(2);
        assert!(s.contains("($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13),($14,"));
        assert!(s.ends_with("$26) ON CONFLICT DO NOTHING"));
    }

    #[test]
    fn timescale_sql_is_what_timescaledb_2_expects() {
        assert_eq!(
            CREATE_TIMESCALE_EXTENSION,
            "CREATE EXTENSION IF NOT EXISTS timescaledb"
        );
        let fresh = TimescaleState::default();
        let plain = timescale_sql(&PgOptions::default(), fresh);
        assert_eq!(
            plain,
            vec![
                "CREATE UNIQUE INDEX IF NOT EXISTS readings_dedup_ts \
                 ON readings (device_id, epoch, seq, ts)",
                "DROP INDEX IF EXISTS readings_dedup",
                "SELECT create_hypertable('readings', 'ts', if_not_exists => TRUE, \
                 migrate_data => TRUE)",
            ]
        );
        let opts = PgOptions {
            retention_days: Some(365),
            compress_after_days: Some(7),
            ..PgOptions::default()
        };
        let with_policies = timescale_sql(&opts, fresh);
        assert_eq!(with_policies.len(), 3 + 2 + 3);
        assert_eq!(
            &with_policies[3..],
            &[
                "SELECT remove_retention_policy('readings', if_exists => TRUE)",
                "SELECT add_retention_policy('readings', INTERVAL '365 days', \
                 if_not_exists => TRUE)",
                "ALTER TABLE readings SET (timescaledb.compress, \
                 timescaledb.compress_segmentby = 'device_id', \
                 timescaledb.compress_orderby = 'ts DESC, epoch, seq')",
                "SELECT remove_compression_policy('readings', if_exists => TRUE)",
                "SELECT add_compression_policy('readings', INTERVAL '7 days', \
                 if_not_exists => TRUE)",
            ]
        );
        // Already a hypertable: nothing to convert; policies only.
        let hyper = TimescaleState {
            is_hypertable: true,
            compression_enabled: false,
        };
        assert!(timescale_sql(&PgOptions::default(), hyper).is_empty());
        assert_eq!(timescale_sql(&opts, hyper), &with_policies[3..]);
        // Compression settings are never changed once enabled.
        let compressed = TimescaleState {
            is_hypertable: true,
            compression_enabled: true,
        };
        let again = timescale_sql(&opts, compressed);
        assert_eq!(again.len(), 4);
        assert!(again.iter().all(|s| !s.starts_with("ALTER TABLE")));
        // Every unique index on a hypertable must include the time column.
        for s in &with_policies {
            if s.contains("UNIQUE") {
                assert!(s.contains(", ts)"), "{s}");
            }
        }
    }
}
