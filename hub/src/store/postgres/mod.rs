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

mod connect;
mod energy;
mod insert;
mod lookups;
mod options;
mod presence;
mod queries;
mod schema;
mod time;
mod tokens;

use std::collections::HashMap;
use std::error::Error as StdError;

use postgres::error::SqlState;
use postgres::{Client, Statement};

use super::StoreError;
use connect::Target;
use schema::{migrate, CREATE_STAGE};

pub use connect::redact;
pub use options::{PgMode, PgOptions, TimescaleMode, WriteMethod};
pub use schema::{
    timescale_sql, TimescaleState, CREATE_TIMESCALE_EXTENSION, MIGRATION_LOCK_KEY, SCHEMA_VERSION,
};

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
    /// Energy limits and flag counters (no cache: every batch reads the
    /// slot state inside its transaction, see `insert.rs`).
    energy: super::energy::EnergyState,
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
        // Not reaching the server is worth retrying (it may be starting);
        // anything after that (the schema, the extension) is not.
        let mut client = target.connect().map_err(|e| match e {
            StoreError::Db(reason) => StoreError::Unreachable {
                url: redacted.clone(),
                reason,
            },
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
            energy: Default::default(),
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
