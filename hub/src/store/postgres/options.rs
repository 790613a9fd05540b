//! Options of the PostgreSQL backend that do not belong in the URL, and the
//! mode it found the database in.

use std::time::Duration;

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
