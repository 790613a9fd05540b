//! The store: narrow interfaces by concern, one module per backend.
//!
//! A store is a synchronous handle to the database. Its calls are grouped
//! by who needs them: [`ReadingSink`] (the writer's batched inserts),
//! [`AuthStore`] (token look-ups), [`AdminStore`] (provisioning),
//! [`HistoryStore`] (reading back), [`QuarantineStore`] (what was
//! refused, see [`quarantine`]), [`TokenStore`] (the change counter, the
//! snapshot of every valid token, admin token management),
//! [`LookupStore`] (bounded look-ups for viewers), [`PresenceStore`]
//! (the device state every hub shares, see [`presence`]) and
//! [`energy::EnergyStore`] (the energy slots the writer keeps, the
//! rollup's and the export's reads). Every backend implements all of
//! them, which makes it a [`Store`]. The hub opens four: one for the
//! background writer thread, one for the token snapshot and its change
//! counter, one for the presence task, one for everything else (used
//! from the blocking pool); the
//! admin CLI opens one. Backends: `sqlite:PATH` (embedded, default) and
//! `postgres://…`.
//!
//! Contract kept by every backend:
//! - `write_batch` commits all readings and quarantine rows in one
//!   transaction or none; a reading whose `(device_id, epoch, seq)` is
//!   already stored is skipped (dedup), not an error, and so is a
//!   quarantine row whose `(device_id, epoch, seq)` is already quarantined.
//!   When it returns `Ok`, the rows are durable. Each stored reading's
//!   plausibility `flags` and its meter's energy slots are written in the
//!   same transaction ([`energy`]): a batch that fails leaves no slot
//!   change behind, so a split batch counts only the rows that commit.
//! - A failure is [`StoreError::Refused`] when the database refused the
//!   data itself (the same rows fail the same way on every retry: the
//!   writer isolates and quarantines them), [`StoreError::Db`] for
//!   everything else (connection lost, disk full, locked, …: the writer
//!   retries).
//! - Only SHA-256 hashes of tokens are stored.
//!
//! [`open`] picks the backend from the URL: `sqlite:PATH` ([`sqlite`]) or
//! `postgres://…` / `postgresql://…` ([`postgres`]).

mod columns;
pub mod energy;
pub(crate) mod handle;
mod lookups;
pub mod postgres;
pub mod presence;
pub mod quarantine;
pub mod sqlite;
mod tokens;

pub use lookups::LookupStore;
pub(crate) use tokens::LAST_ADMIN;
pub use tokens::{AdminInfo, AuthSnapshot, TokenStore};

use std::sync::Arc;

use ems_shared::Reading;
use thiserror::Error;

pub use presence::PresenceStore;
pub use quarantine::{QuarantineReason, QuarantineRow, QuarantineStore, Quarantined};

/// A token hash: SHA-256 of the token's UTF-8 bytes.
pub type TokenHash = [u8; 32];

/// One reading to store.
#[derive(Debug, Clone)]
pub struct Row {
    /// Device that sent it (shared between all rows of one connection).
    pub device_id: Arc<str>,
    /// Hub receive time, Unix ms (`received_at`).
    pub received_at_ms: i64,
    /// The validated reading.
    pub reading: Reading,
}

/// Which devices a viewer may watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewerScope {
    /// Every device, including ones added later.
    AllDevices,
    /// Just these.
    Devices(Vec<String>),
}

impl ViewerScope {
    /// Whether the scope includes `device_id`.
    pub fn allows(&self, device_id: &str) -> bool {
        match self {
            ViewerScope::AllDevices => true,
            ViewerScope::Devices(ids) => ids.iter().any(|d| d == device_id),
        }
    }
}

/// A device as `device list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device id.
    pub device_id: String,
    /// Creation time, Unix ms.
    pub created_ms: i64,
    /// Revocation time, Unix ms, if revoked.
    pub revoked_ms: Option<i64>,
}

/// A stored reading with the hub's receive time (history and
/// resume replays).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReading {
    /// The reading as stored.
    pub reading: Reading,
    /// Hub receive time, Unix ms (`received_at`).
    pub received_at_ms: i64,
    /// Plausibility flags ([`crate::energy::flags`]).
    pub flags: u32,
}

/// A viewer token as the admin panel lists it (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewerInfo {
    /// Viewer name.
    pub name: String,
    /// What it may watch.
    pub scope: ViewerScope,
    /// Creation time, Unix ms.
    pub created_ms: i64,
    /// Revocation time, Unix ms, if revoked.
    pub revoked_ms: Option<i64>,
}

/// Store failures.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The database URL is not understood.
    #[error("unsupported database URL (expected sqlite:PATH or postgres://…): {0}")]
    BadUrl(String),
    /// Opening or migrating the database failed.
    #[error("cannot open database {url}: {reason}")]
    Open {
        /// The URL, with any password removed.
        url: String,
        /// Why.
        reason: String,
    },
    /// An id that must be new already exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// An id that must exist does not.
    #[error("{0} not found")]
    NotFound(String),
    /// The database failed (connection lost, disk full, …).
    #[error("database error: {0}")]
    Db(String),
    /// The database refused the data itself (a check or trigger raised, a
    /// value it cannot hold): retrying the same rows fails the same way.
    #[error("refused by the database: {0}")]
    Refused(String),
    /// The database could not be reached at all (not started, down,
    /// unreachable): worth retrying, unlike [`StoreError::Open`].
    #[error("cannot reach database {url}: {reason}")]
    Unreachable {
        /// The URL, with any password removed.
        url: String,
        /// Why.
        reason: String,
    },
    /// The store refuses a change that would break a rule (e.g. revoking
    /// the last active admin).
    #[error("{0}")]
    Conflict(String),
    /// The energy slots are not built for this handle's limits yet (a
    /// rebuild is running on another connection): an answer from them
    /// would be incomplete, so none is given. Worth retrying.
    #[error("the energy slots are being rebuilt; try again later")]
    Rebuilding,
}

/// Where the writer commits readings: the one call on the ingest path.
pub trait ReadingSink: Send {
    /// Stores `rows` and the `quarantine` rows in one transaction,
    /// skipping duplicates. [`StoreError::Refused`] when the database
    /// refused some row's data (retrying the same rows cannot succeed),
    /// [`StoreError::Db`] for any other failure.
    fn write_batch(&mut self, rows: &[Row], quarantine: &[QuarantineRow])
        -> Result<(), StoreError>;

    /// Stores `rows` in one transaction, skipping duplicates.
    fn insert_batch(&mut self, rows: &[Row]) -> Result<(), StoreError> {
        self.write_batch(rows, &[])
    }
}

/// A store handle owned by its user (the writer's `Box<dyn Store>`, a
/// test's sink) is a sink too.
impl<S: ReadingSink + ?Sized> ReadingSink for Box<S> {
    fn write_batch(
        &mut self,
        rows: &[Row],
        quarantine: &[QuarantineRow],
    ) -> Result<(), StoreError> {
        (**self).write_batch(rows, quarantine)
    }
}

/// The look-ups behind authentication: handshakes, the HTTP API and the
/// revocation poll.
pub trait AuthStore: Send {
    /// Whether `hash` is the current, unrevoked token of `device_id`.
    fn device_token_valid(&mut self, device_id: &str, hash: &TokenHash)
        -> Result<bool, StoreError>;

    /// The scope of the unrevoked viewer token with this hash, if any.
    fn viewer_scope(&mut self, hash: &TokenHash) -> Result<Option<ViewerScope>, StoreError>;

    /// The name of the unrevoked admin whose token has this hash, if any.
    fn admin_name(&mut self, hash: &TokenHash) -> Result<Option<String>, StoreError>;

    /// Every unrevoked device with its current token hash. The hub polls
    /// this about once a second and closes, with 4001, every live
    /// connection whose device is missing here (revoked or deleted) or
    /// whose token hash differs (rotated). One indexed scan of `devices`;
    /// fine for fleets of tens of thousands of devices.
    fn active_device_tokens(&mut self) -> Result<Vec<(String, TokenHash)>, StoreError>;

    /// Whether a device with this id was ever added (revoked or not).
    fn device_exists(&mut self, device_id: &str) -> Result<bool, StoreError>;
}

/// Provisioning: devices, viewers and admins with their token hashes
/// (`ems-hub device …`, the admin API).
pub trait AdminStore: Send {
    /// Adds a device with its token hash. `AlreadyExists` if the id exists
    /// (revoked or not).
    fn add_device(
        &mut self,
        device_id: &str,
        hash: &TokenHash,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// All devices, ordered by id.
    fn list_devices(&mut self) -> Result<Vec<DeviceInfo>, StoreError>;

    /// Revokes a device's token: it can no longer connect. `NotFound` if
    /// unknown.
    fn revoke_device(&mut self, device_id: &str, now_ms: i64) -> Result<(), StoreError>;

    /// Replaces a device's token hash (and un-revokes it). `NotFound` if
    /// unknown.
    fn rotate_device(&mut self, device_id: &str, hash: &TokenHash) -> Result<(), StoreError>;

    /// Adds a viewer token. `AlreadyExists` if the name exists.
    fn add_viewer(
        &mut self,
        name: &str,
        hash: &TokenHash,
        scope: &ViewerScope,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// All viewer tokens (names, scopes, times), ordered by name.
    fn list_viewers(&mut self) -> Result<Vec<ViewerInfo>, StoreError>;

    /// Revokes a viewer token by name. `NotFound` if unknown.
    fn revoke_viewer(&mut self, name: &str, now_ms: i64) -> Result<(), StoreError>;

    /// Adds an admin token. `AlreadyExists` if the name exists.
    fn add_admin(&mut self, name: &str, hash: &TokenHash, now_ms: i64) -> Result<(), StoreError>;
}

/// Reading back what was stored: the history API, dashboard resume
/// replays and "last seen".
pub trait HistoryStore: Send {
    /// Stored readings of a device with `from_ms <= ts < to_ms`, oldest
    /// first, at most `limit`.
    fn readings(
        &mut self,
        device_id: &str,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<Reading>, StoreError>;

    /// Stored readings of a device with `from_ms <= ts < to_ms` and their
    /// receive times, oldest first, at most `limit`: the oldest `limit`
    /// when `newest` is false, else the newest `limit`.
    fn history(
        &mut self,
        device_id: &str,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
        newest: bool,
    ) -> Result<Vec<StoredReading>, StoreError>;

    /// Receive time (`received_at`) of the device's newest reading by
    /// sample time, if it has any: a dashboard's "last seen".
    fn last_seen(&mut self, device_id: &str) -> Result<Option<i64>, StoreError>;
}

/// A full database handle: every backend is one. See the module docs for
/// the contract.
pub trait Store:
    ReadingSink
    + AuthStore
    + AdminStore
    + HistoryStore
    + QuarantineStore
    + TokenStore
    + LookupStore
    + PresenceStore
    + energy::EnergyStore
{
}

impl<
        T: ReadingSink
            + AuthStore
            + AdminStore
            + HistoryStore
            + QuarantineStore
            + TokenStore
            + LookupStore
            + PresenceStore
            + energy::EnergyStore
            + ?Sized,
    > Store for T
{
}

/// Opens the store named by `url`: `sqlite:PATH` (also `sqlite://PATH`) or
/// `postgres://…` / `postgresql://…` (PostgreSQL with default
/// [`postgres::PgOptions`]). Creates or migrates the schema.
pub fn open(url: &str) -> Result<Box<dyn Store>, StoreError> {
    open_with(url, &postgres::PgOptions::default())
}

/// Like [`open`], with options for the PostgreSQL backend (TimescaleDB
/// mode, retention and compression policies, …); ignored for SQLite.
pub fn open_with(url: &str, pg: &postgres::PgOptions) -> Result<Box<dyn Store>, StoreError> {
    if let Some(path) = url.strip_prefix("sqlite:") {
        return Ok(Box::new(sqlite::SqliteStore::open(path)?));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Box::new(postgres::PgStore::open(url, pg)?));
    }
    Err(StoreError::BadUrl(postgres::redact(url)))
}

/// Compares a stored hash with a candidate without an early exit.
pub(crate) fn ct_eq(stored: &[u8], hash: &TokenHash) -> bool {
    stored.len() == hash.len()
        && stored
            .iter()
            .zip(hash.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Current time, Unix milliseconds (0 if the clock is before 1970): the
/// hub's one clock for what it stores and sends (receive times, presence,
/// creation and revocation times).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare() {
        let h = [7u8; 32];
        assert!(ct_eq(&h, &h));
        let mut o = h;
        o[31] = 8;
        assert!(!ct_eq(&o, &h));
        assert!(!ct_eq(&h[..31], &h));
    }

    #[test]
    fn unknown_urls_are_refused_without_secrets() {
        let e = open("mysql://u:pw@h/db").err().map(|e| e.to_string());
        let e = e.unwrap_or_default();
        assert!(e.contains("unsupported database URL"), "{e}");
        assert!(!e.contains("pw@"), "{e}");
    }
}
