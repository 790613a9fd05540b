//! Shared device state (`device_state`): what every hub on one database
//! knows about every device — presence (online, which hub, since when)
//! under a lease, the connection generation, last seen, the edge's last
//! status and the last reading per meter.
//!
//! A hub writes it in batches ([`PresenceStore::presence_sync`], one
//! transaction per flush for every changed device) and reads it for the
//! device lists ([`PresenceStore::device_states`], one statement whatever
//! the fleet size).
//!
//! Rules kept by every backend:
//! - A connect takes the next generation: one more than the largest in
//!   the table, allocated under a lock held until the commit (PostgreSQL:
//!   an advisory lock; SQLite: the write lock), so generations commit in
//!   order and a reader that sees generation `n` sees every smaller one.
//! - Updates and disconnects only touch the row while it still carries
//!   the writer's generation; a disconnect without a known generation
//!   (its connect was never written) only clears a row of the same hub.
//! - A device is online when its row says so and its lease has not ended
//!   (`lease_until_ms > now`, evaluated in the query).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::StoreError;

/// The edge's last `status` frame, as kept in `device_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatusSummary {
    /// Hub receive time of the frame, Unix ms.
    pub rx_ms: i64,
    /// Readings waiting in the edge's outbox.
    pub outbox_depth: u64,
    /// How far behind the outbox was when it reported, ms.
    pub behind_ms: i64,
    /// Readings dropped for a full spool.
    pub dropped: u64,
    /// Readings held in memory because the spool cannot be written.
    pub unwritten: u64,
    /// Readings dropped for a full disk.
    pub dropped_disk_full: u64,
    /// Records skipped as damaged.
    pub dropped_damaged: u64,
}

/// The last reading of one meter (the listing's `last` entries).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastReading {
    /// Meter id (shared: the device lists copy the last readings of every
    /// connected device while ingest waits for the same lock).
    pub meter: Arc<str>,
    /// Sample time, Unix ms.
    pub ts: i64,
    /// Active power, W, when the reading had it.
    pub power_w: Option<f64>,
    /// Energy counter, Wh, when the reading had it.
    pub energy_wh: Option<f64>,
}

/// A device that connected to this hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Device id.
    pub device_id: String,
    /// Connect time, Unix ms.
    pub at_ms: i64,
}

/// What a connected device did since the last flush.
#[derive(Debug, Clone, PartialEq)]
pub struct StateUpdate {
    /// Device id.
    pub device_id: String,
    /// The generation of the connection that saw it.
    pub generation: i64,
    /// When the hub last heard from it, Unix ms.
    pub last_seen_ms: i64,
    /// Its last `status` frame, if one came since the connect.
    pub status: Option<StatusSummary>,
    /// The last reading of every meter it sent since the connect.
    pub last: Vec<LastReading>,
}

/// A device connection of this hub that ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Disconnect {
    /// Device id.
    pub device_id: String,
    /// The connection's generation; `None` when its connect was never
    /// written (then only a row of this hub is marked offline).
    pub generation: Option<i64>,
    /// Disconnect time, Unix ms.
    pub at_ms: i64,
    /// The last reading of every meter of the connection (kept when empty).
    pub last: Vec<LastReading>,
}

/// One flush of a hub's presence changes, written in one transaction.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PresenceSync {
    /// This hub's id.
    pub hub: String,
    /// Now, Unix ms.
    pub now_ms: i64,
    /// The lease end written with connects and renewals, Unix ms.
    pub lease_until_ms: i64,
    /// New connections (each takes the next generation).
    pub connects: Vec<Connect>,
    /// Status and readings of connected devices.
    pub updates: Vec<StateUpdate>,
    /// Ended connections.
    pub disconnects: Vec<Disconnect>,
    /// Extend the lease of every device online on this hub.
    pub renew: bool,
    /// Mark every device online on this hub offline (clean shutdown),
    /// after everything else.
    pub all_offline: bool,
    /// Report the connects with a generation above this one
    /// ([`SyncAnswer::changes`]); `None`: only the largest generation.
    pub changes_since: Option<i64>,
}

/// What a [`PresenceStore::presence_sync`] learned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncAnswer {
    /// The generation of each of [`PresenceSync::connects`], in order.
    pub generations: Vec<i64>,
    /// Devices whose generation is above `changes_since` (connects of any
    /// hub, this one's included): `(device_id, generation)`.
    pub changes: Vec<(String, i64)>,
    /// The largest generation in the table.
    pub max_generation: i64,
}

/// A `device_state` row as the device lists read it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceStateRow {
    /// Device id.
    pub device_id: String,
    /// Online flag and lease still running.
    pub online: bool,
    /// The hub that holds (or last held) its connection.
    pub hub: Option<String>,
    /// When its current (or last) connection started, Unix ms.
    pub online_since_ms: Option<i64>,
    /// When a hub last heard from it, Unix ms.
    pub last_seen_ms: Option<i64>,
    /// The edge's last status of the current connection.
    pub status: Option<StatusSummary>,
    /// The last reading per meter, as stored.
    pub last: StoredLast,
}

/// The last readings of a [`DeviceStateRow`] as the store holds them
/// (JSON text), decoded only where they are used: a device list mostly
/// lists devices connected to the listing hub, whose live readings
/// replace the stored ones, and at 10,000 devices parsing text nobody
/// reads was a sizeable share of a listing's CPU.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoredLast(Option<String>);

impl StoredLast {
    /// The stored text (`None`: no readings stored).
    pub fn new(text: Option<String>) -> StoredLast {
        StoredLast(text)
    }

    /// The readings (empty when none are stored or the text is damaged).
    pub fn decode(&self) -> Vec<LastReading> {
        decode_last(self.0.as_deref())
    }
}

/// The shared device state.
pub trait PresenceStore: Send {
    /// Writes one flush in one transaction: connects (taking generations),
    /// updates, disconnects, the lease renewal and the clean-shutdown
    /// offline marking, then reads the generations changed since
    /// `changes_since`.
    fn presence_sync(&mut self, sync: &PresenceSync) -> Result<SyncAnswer, StoreError>;

    /// The rows of `device_ids` (in no particular order; devices without a
    /// row are left out; rows of other devices may come too), online
    /// evaluated against the lease at `now_ms`. One statement.
    fn device_states(
        &mut self,
        device_ids: &[String],
        now_ms: i64,
    ) -> Result<Vec<DeviceStateRow>, StoreError>;

    /// Tells a connection that it serves presence writes only, so it can
    /// keep less in memory (SQLite: a small page cache).
    fn presence_only(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// `last` as stored (JSON text; `None` when empty).
pub(crate) fn encode_last(last: &[LastReading]) -> Option<String> {
    if last.is_empty() {
        return None;
    }
    serde_json::to_string(last).ok()
}

/// `last` from its stored JSON (empty when absent or unreadable).
pub(crate) fn decode_last(text: Option<&str>) -> Vec<LastReading> {
    text.and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default()
}

/// A counter for a `bigint` column (saturating).
pub(crate) fn count_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A counter from a `bigint` column (negative reads as 0).
pub(crate) fn count_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_readings_round_trip_and_tolerate_damage() {
        let last = vec![LastReading {
            meter: "main".into(),
            ts: 5,
            power_w: Some(1.5),
            energy_wh: None,
        }];
        assert_eq!(decode_last(encode_last(&last).as_deref()), last);
        assert_eq!(encode_last(&[]), None);
        assert!(decode_last(Some("not json")).is_empty());
        assert!(decode_last(None).is_empty());
        assert_eq!(count_i64(u64::MAX), i64::MAX);
        assert_eq!(count_u64(-1), 0);
    }
}
