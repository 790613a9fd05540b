//! The shared device state on SQLite: one write transaction per flush
//! (the write lock orders the generations), one statement per listing.

use rusqlite::{params, TransactionBehavior};

use super::{db, SqliteStore};
use crate::store::presence::{
    count_i64, count_u64, encode_last, DeviceStateRow, PresenceStore, PresenceSync, StatusSummary,
    StoredLast, SyncAnswer,
};
use crate::store::StoreError;

/// Page cache of a connection that writes presence only, KiB (SQLite's
/// default is 2,000): one flush of many devices walks the table once in
/// key order ([`key_order`]), so a small cache reads each page once.
const PRESENCE_CACHE_KIB: i64 = 256;

/// The positions of `items` in the order of their device ids: rows written
/// in key order touch each page of the table once, so a flush of
/// thousands of devices needs only a small page cache.
fn key_order<T>(items: &[T], key: impl Fn(&T) -> &str) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| key(&items[a]).cmp(key(&items[b])));
    order
}

impl PresenceStore for SqliteStore {
    fn presence_only(&mut self) -> Result<(), StoreError> {
        self.conn
            .pragma_update(None, "cache_size", -PRESENCE_CACHE_KIB)
            .map_err(db)
    }

    fn presence_sync(&mut self, sync: &PresenceSync) -> Result<SyncAnswer, StoreError> {
        // A tick with nothing to write only reads: it does not take the
        // write lock from the store writer.
        let writes = !sync.connects.is_empty()
            || !sync.updates.is_empty()
            || !sync.disconnects.is_empty()
            || sync.renew
            || sync.all_offline;
        let behavior = if writes {
            TransactionBehavior::Immediate
        } else {
            TransactionBehavior::Deferred
        };
        let tx = self.conn.transaction_with_behavior(behavior).map_err(db)?;
        let mut answer = SyncAnswer::default();
        let max = |tx: &rusqlite::Transaction<'_>| {
            tx.query_row(
                "SELECT COALESCE(max(generation), 0) FROM device_state",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(db)
        };
        if !sync.disconnects.is_empty() {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO device_state (device_id, last_seen_ms, last_readings) \
                     VALUES (?1, ?3, ?5) \
                     ON CONFLICT (device_id) DO UPDATE SET \
                       last_seen_ms = max(COALESCE(last_seen_ms, 0), ?3), \
                       last_readings = CASE WHEN (?2 IS NOT NULL AND generation = ?2) \
                           OR (?2 IS NULL AND hub = ?4) \
                         THEN COALESCE(?5, last_readings) ELSE last_readings END, \
                       online = CASE WHEN (?2 IS NOT NULL AND generation = ?2) \
                           OR (?2 IS NULL AND hub = ?4) THEN 0 ELSE online END",
                )
                .map_err(db)?;
            for i in key_order(&sync.disconnects, |d| &d.device_id) {
                let d = &sync.disconnects[i];
                stmt.execute(params![
                    d.device_id,
                    d.generation,
                    d.at_ms,
                    sync.hub,
                    encode_last(&d.last)
                ])
                .map_err(db)?;
            }
        }
        if !sync.connects.is_empty() {
            let first = max(&tx)? + 1;
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO device_state (device_id, online, hub, online_since_ms, \
                       lease_until_ms, generation, last_seen_ms) \
                     VALUES (?1, 1, ?2, ?3, ?4, ?5, ?3) \
                     ON CONFLICT (device_id) DO UPDATE SET online = 1, hub = ?2, \
                       online_since_ms = ?3, lease_until_ms = ?4, generation = ?5, \
                       last_seen_ms = max(COALESCE(last_seen_ms, 0), ?3), \
                       status_rx_ms = NULL, outbox_depth = NULL, behind_ms = NULL, \
                       dropped = NULL, unwritten = NULL, dropped_disk_full = NULL, \
                       dropped_damaged = NULL",
                )
                .map_err(db)?;
            // Generations in the order of the connects, rows written in
            // key order.
            answer.generations = (first..).take(sync.connects.len()).collect();
            for i in key_order(&sync.connects, |c| &c.device_id) {
                let c = &sync.connects[i];
                stmt.execute(params![
                    c.device_id,
                    sync.hub,
                    c.at_ms,
                    sync.lease_until_ms,
                    answer.generations[i]
                ])
                .map_err(db)?;
            }
        }
        if !sync.updates.is_empty() {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE device_state SET \
                       last_seen_ms = max(COALESCE(last_seen_ms, 0), ?3), \
                       status_rx_ms = CASE WHEN ?4 IS NULL THEN status_rx_ms ELSE ?4 END, \
                       outbox_depth = CASE WHEN ?4 IS NULL THEN outbox_depth ELSE ?5 END, \
                       behind_ms = CASE WHEN ?4 IS NULL THEN behind_ms ELSE ?6 END, \
                       dropped = CASE WHEN ?4 IS NULL THEN dropped ELSE ?7 END, \
                       unwritten = CASE WHEN ?4 IS NULL THEN unwritten ELSE ?8 END, \
                       dropped_disk_full = CASE WHEN ?4 IS NULL THEN dropped_disk_full ELSE ?9 END, \
                       dropped_damaged = CASE WHEN ?4 IS NULL THEN dropped_damaged ELSE ?10 END, \
                       last_readings = COALESCE(?11, last_readings) \
                     WHERE device_id = ?1 AND generation = ?2",
                )
                .map_err(db)?;
            for i in key_order(&sync.updates, |u| &u.device_id) {
                let u = &sync.updates[i];
                let s = u.status;
                stmt.execute(params![
                    u.device_id,
                    u.generation,
                    u.last_seen_ms,
                    s.map(|s| s.rx_ms),
                    s.map(|s| count_i64(s.outbox_depth)),
                    s.map(|s| s.behind_ms),
                    s.map(|s| count_i64(s.dropped)),
                    s.map(|s| count_i64(s.unwritten)),
                    s.map(|s| count_i64(s.dropped_disk_full)),
                    s.map(|s| count_i64(s.dropped_damaged)),
                    encode_last(&u.last),
                ])
                .map_err(db)?;
            }
        }
        if sync.renew {
            tx.execute(
                "UPDATE device_state SET lease_until_ms = ?1 WHERE hub = ?2 AND online",
                params![sync.lease_until_ms, sync.hub],
            )
            .map_err(db)?;
        }
        if sync.all_offline {
            tx.execute(
                "UPDATE device_state SET online = 0, \
                   last_seen_ms = max(COALESCE(last_seen_ms, 0), ?1) \
                 WHERE hub = ?2 AND online",
                params![sync.now_ms, sync.hub],
            )
            .map_err(db)?;
        }
        if let Some(since) = sync.changes_since {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT device_id, generation FROM device_state WHERE generation > ?1 \
                     ORDER BY generation",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map([since], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })
                .map_err(db)?;
            answer.changes = rows.collect::<rusqlite::Result<_>>().map_err(db)?;
        }
        answer.max_generation = max(&tx)?;
        tx.commit().map_err(db)?;
        Ok(answer)
    }

    fn device_states(
        &mut self,
        device_ids: &[String],
        now_ms: i64,
    ) -> Result<Vec<DeviceStateRow>, StoreError> {
        if device_ids.is_empty() {
            return Ok(Vec::new());
        }
        // The ids travel as one JSON array; each costs one primary-key probe.
        let ids = serde_json::to_string(device_ids)
            .map_err(|e| StoreError::Db(format!("encoding device ids: {e}")))?;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT s.device_id, s.online AND s.lease_until_ms > ?2, s.hub, \
                   s.online_since_ms, s.last_seen_ms, s.status_rx_ms, s.outbox_depth, \
                   s.behind_ms, s.dropped, s.unwritten, s.dropped_disk_full, \
                   s.dropped_damaged, s.last_readings \
                 FROM json_each(?1) j JOIN device_state s ON s.device_id = j.value",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(params![ids, now_ms], |r| {
                let rx: Option<i64> = r.get(5)?;
                let count = |i| -> rusqlite::Result<u64> {
                    Ok(count_u64(r.get::<_, Option<i64>>(i)?.unwrap_or(0)))
                };
                let status = match rx {
                    Some(rx_ms) => Some(StatusSummary {
                        rx_ms,
                        outbox_depth: count(6)?,
                        behind_ms: r.get::<_, Option<i64>>(7)?.unwrap_or(0),
                        dropped: count(8)?,
                        unwritten: count(9)?,
                        dropped_disk_full: count(10)?,
                        dropped_damaged: count(11)?,
                    }),
                    None => None,
                };
                Ok(DeviceStateRow {
                    device_id: r.get(0)?,
                    online: r.get(1)?,
                    hub: r.get(2)?,
                    online_since_ms: r.get(3)?,
                    last_seen_ms: r.get(4)?,
                    status,
                    last: StoredLast::new(r.get(12)?),
                })
            })
            .map_err(db)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
    }
}
