//! The shared device state on PostgreSQL: one transaction per flush, each
//! kind of change one statement whatever the number of devices (the rows
//! travel as arrays), connects under an advisory lock held until the
//! commit so generations commit in order; one statement per listing. A
//! renewal writes the lease of the updated rows with their update and only
//! the rest by itself (every row version costs PostgreSQL a tuple and,
//! when the page is full, an entry in each index).

use postgres::Transaction;

use super::{db, PgStore, MIGRATION_LOCK_KEY};
use crate::store::presence::{
    count_i64, count_u64, encode_last, DeviceStateRow, PresenceStore, PresenceSync, StatusSummary,
    StoredLast, SyncAnswer,
};
use crate::store::StoreError;

/// Key of the advisory lock that orders connects (next to the migration's).
const PRESENCE_LOCK_KEY: i64 = MIGRATION_LOCK_KEY + 1;

fn max_generation(tx: &mut Transaction<'_>) -> Result<i64, StoreError> {
    tx.query_one("SELECT COALESCE(max(generation), 0) FROM device_state", &[])
        .and_then(|r| r.try_get(0))
        .map_err(db)
}

/// Every device's row for a device list (`$1`: now, Unix ms).
macro_rules! device_state_select {
    () => {
        "SELECT device_id, online AND lease_until_ms > $1, hub, online_since_ms, \
           last_seen_ms, status_rx_ms, outbox_depth, behind_ms, dropped, unwritten, \
           dropped_disk_full, dropped_damaged, last_readings \
         FROM device_state"
    };
}

/// From this many ids on, [`PresenceStore::device_states`] reads every row.
const WHOLE_TABLE_FROM: usize = 1_000;

impl PresenceStore for PgStore {
    fn presence_sync(&mut self, sync: &PresenceSync) -> Result<SyncAnswer, StoreError> {
        self.with(|c| {
            let mut tx = c.client.transaction().map_err(db)?;
            let mut answer = SyncAnswer::default();
            if !sync.disconnects.is_empty() {
                let ids: Vec<&str> = sync.disconnects.iter().map(|d| &*d.device_id).collect();
                let gens: Vec<Option<i64>> =
                    sync.disconnects.iter().map(|d| d.generation).collect();
                let at: Vec<i64> = sync.disconnects.iter().map(|d| d.at_ms).collect();
                let last: Vec<Option<String>> = sync
                    .disconnects
                    .iter()
                    .map(|d| encode_last(&d.last))
                    .collect();
                tx.execute(
                    // The connection's generation travels in the inserted
                    // row's `generation` (-1: unknown), which only a row
                    // that did not exist yet keeps.
                    "INSERT INTO device_state AS s (device_id, last_seen_ms, last_readings, \
                       generation) \
                     SELECT u.id, u.at, u.last, COALESCE(u.gen, -1) FROM unnest($1::text[], \
                       $2::bigint[], $3::bigint[], $4::text[]) AS u(id, gen, at, last) \
                     ON CONFLICT (device_id) DO UPDATE SET \
                       last_seen_ms = GREATEST(s.last_seen_ms, EXCLUDED.last_seen_ms), \
                       last_readings = CASE WHEN s.generation = EXCLUDED.generation \
                           OR (EXCLUDED.generation < 0 AND s.hub = $5) \
                         THEN COALESCE(EXCLUDED.last_readings, s.last_readings) \
                         ELSE s.last_readings END, \
                       online = CASE WHEN s.generation = EXCLUDED.generation \
                           OR (EXCLUDED.generation < 0 AND s.hub = $5) \
                         THEN false ELSE s.online END",
                    &[&ids, &gens, &at, &last, &sync.hub],
                )
                .map_err(db)?;
            }
            if !sync.connects.is_empty() {
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PRESENCE_LOCK_KEY])
                    .map_err(db)?;
                let base = max_generation(&mut tx)?;
                let ids: Vec<&str> = sync.connects.iter().map(|c| &*c.device_id).collect();
                let at: Vec<i64> = sync.connects.iter().map(|c| c.at_ms).collect();
                tx.execute(
                    "INSERT INTO device_state AS s (device_id, online, hub, online_since_ms, \
                       lease_until_ms, generation, last_seen_ms) \
                     SELECT u.id, true, $3, u.at, $4, $5 + u.n, u.at \
                       FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS u(id, at, n) \
                     ON CONFLICT (device_id) DO UPDATE SET online = true, hub = EXCLUDED.hub, \
                       online_since_ms = EXCLUDED.online_since_ms, \
                       lease_until_ms = EXCLUDED.lease_until_ms, \
                       generation = EXCLUDED.generation, \
                       last_seen_ms = GREATEST(s.last_seen_ms, EXCLUDED.last_seen_ms), \
                       status_rx_ms = NULL, outbox_depth = NULL, behind_ms = NULL, \
                       dropped = NULL, unwritten = NULL, dropped_disk_full = NULL, \
                       dropped_damaged = NULL",
                    &[&ids, &at, &sync.hub, &sync.lease_until_ms, &base],
                )
                .map_err(db)?;
                answer.generations = (1..=sync.connects.len())
                    .map(|n| base.saturating_add(i64::try_from(n).unwrap_or(i64::MAX)))
                    .collect();
            }
            if !sync.updates.is_empty() {
                let u = &sync.updates;
                let ids: Vec<&str> = u.iter().map(|u| &*u.device_id).collect();
                let gens: Vec<i64> = u.iter().map(|u| u.generation).collect();
                let seen: Vec<i64> = u.iter().map(|u| u.last_seen_ms).collect();
                let st = |f: fn(&StatusSummary) -> i64| -> Vec<Option<i64>> {
                    u.iter().map(|u| u.status.as_ref().map(f)).collect()
                };
                let rx = st(|s| s.rx_ms);
                let depth = st(|s| count_i64(s.outbox_depth));
                let behind = st(|s| s.behind_ms);
                let dropped = st(|s| count_i64(s.dropped));
                let unwritten = st(|s| count_i64(s.unwritten));
                let disk = st(|s| count_i64(s.dropped_disk_full));
                let damaged = st(|s| count_i64(s.dropped_damaged));
                let last: Vec<Option<String>> = u.iter().map(|u| encode_last(&u.last)).collect();
                tx.execute(
                    "UPDATE device_state s SET \
                       last_seen_ms = GREATEST(s.last_seen_ms, u.seen), \
                       status_rx_ms = COALESCE(u.rx, s.status_rx_ms), \
                       outbox_depth = CASE WHEN u.rx IS NULL THEN s.outbox_depth ELSE u.depth END, \
                       behind_ms = CASE WHEN u.rx IS NULL THEN s.behind_ms ELSE u.behind END, \
                       dropped = CASE WHEN u.rx IS NULL THEN s.dropped ELSE u.dropped END, \
                       unwritten = CASE WHEN u.rx IS NULL THEN s.unwritten ELSE u.unwritten END, \
                       dropped_disk_full = CASE WHEN u.rx IS NULL THEN s.dropped_disk_full \
                         ELSE u.disk END, \
                       dropped_damaged = CASE WHEN u.rx IS NULL THEN s.dropped_damaged \
                         ELSE u.damaged END, \
                       last_readings = COALESCE(u.last, s.last_readings), \
                       lease_until_ms = CASE WHEN $12 AND s.online THEN $13 \
                         ELSE s.lease_until_ms END \
                     FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], \
                       $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], \
                       $10::bigint[], $11::text[]) \
                       AS u(id, gen, seen, rx, depth, behind, dropped, unwritten, disk, \
                         damaged, last) \
                     WHERE s.device_id = u.id AND s.generation = u.gen",
                    &[
                        &ids,
                        &gens,
                        &seen,
                        &rx,
                        &depth,
                        &behind,
                        &dropped,
                        &unwritten,
                        &disk,
                        &damaged,
                        &last,
                        &sync.renew,
                        &sync.lease_until_ms,
                    ],
                )
                .map_err(db)?;
            }
            if sync.renew {
                // The rows the updates above just wrote carry the new
                // lease already: each row is written once per renewal.
                tx.execute(
                    "UPDATE device_state SET lease_until_ms = $1 \
                     WHERE hub = $2 AND online AND lease_until_ms <> $1",
                    &[&sync.lease_until_ms, &sync.hub],
                )
                .map_err(db)?;
            }
            if sync.all_offline {
                tx.execute(
                    "UPDATE device_state SET online = false, \
                       last_seen_ms = GREATEST(last_seen_ms, $1) \
                     WHERE hub = $2 AND online",
                    &[&sync.now_ms, &sync.hub],
                )
                .map_err(db)?;
            }
            if let Some(since) = sync.changes_since {
                let rows = tx
                    .query(
                        "SELECT device_id, generation FROM device_state WHERE generation > $1 \
                         ORDER BY generation",
                        &[&since],
                    )
                    .map_err(db)?;
                answer.changes = rows
                    .iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                    .collect::<Result<_, postgres::Error>>()
                    .map_err(db)?;
            }
            answer.max_generation = max_generation(&mut tx)?;
            tx.commit().map_err(db)?;
            Ok(answer)
        })
    }

    fn device_states(
        &mut self,
        device_ids: &[String],
        now_ms: i64,
    ) -> Result<Vec<DeviceStateRow>, StoreError> {
        if device_ids.is_empty() {
            return Ok(Vec::new());
        }
        self.with(|c| {
            // A long list (an all-devices viewer) costs the server one
            // index probe per id; reading the whole table is cheaper, and
            // the caller looks the rows up by id anyway.
            let rows = if device_ids.len() > WHOLE_TABLE_FROM {
                c.client.query(device_state_select!(), &[&now_ms])
            } else {
                c.client.query(
                    concat!(device_state_select!(), " WHERE device_id = ANY($2)"),
                    &[&now_ms, &device_ids],
                )
            }
            .map_err(db)?;
            rows.iter()
                .map(|r| {
                    let count = |i| -> Result<u64, postgres::Error> {
                        Ok(count_u64(r.try_get::<_, Option<i64>>(i)?.unwrap_or(0)))
                    };
                    let status = match r.try_get::<_, Option<i64>>(5)? {
                        Some(rx_ms) => Some(StatusSummary {
                            rx_ms,
                            outbox_depth: count(6)?,
                            behind_ms: r.try_get::<_, Option<i64>>(7)?.unwrap_or(0),
                            dropped: count(8)?,
                            unwritten: count(9)?,
                            dropped_disk_full: count(10)?,
                            dropped_damaged: count(11)?,
                        }),
                        None => None,
                    };
                    Ok(DeviceStateRow {
                        device_id: r.try_get(0)?,
                        online: r.try_get(1)?,
                        hub: r.try_get(2)?,
                        online_since_ms: r.try_get(3)?,
                        last_seen_ms: r.try_get(4)?,
                        status,
                        last: StoredLast::new(r.try_get(12)?),
                    })
                })
                .collect::<Result<Vec<_>, postgres::Error>>()
                .map_err(db)
        })
    }
}
