//! The write path: a batch as one `IMMEDIATE` transaction of prepared
//! `INSERT … ON CONFLICT DO NOTHING` statements — readings and quarantine
//! rows together, with each reading's flags and the energy slots kept in the
//! same transaction ([`crate::store::energy::write_batch`]).

use std::sync::LazyLock;

use ems_shared::{Measured, Measurement};
use rusqlite::{params, Transaction, TransactionBehavior};

use super::energy::{decode_row, SLOT_BEFORE, SLOT_READINGS, TAIL};
use super::{db, to_i64, write_error, SqliteStore};
use crate::energy::rule::MeterReading;
use crate::energy::slots::Slot;
use crate::store::columns::{insert_columns, FLAGS_PARAM, KEY_COLUMNS, ROW_COLUMNS};
use crate::store::energy::{write_batch, MeterKey, MeterState, SlotIo, SlotWrites, StateCache};
use crate::store::{QuarantineRow, ReadingSink, Row, StoreError};

/// `INSERT INTO readings (…) VALUES (?1, …) ON CONFLICT … DO NOTHING`,
/// built once from the column list.
static INSERT_READING: LazyLock<String> = LazyLock::new(|| {
    let params: Vec<String> = (1..=ROW_COLUMNS).map(|i| format!("?{i}")).collect();
    format!(
        "INSERT INTO readings ({}) VALUES ({}) ON CONFLICT (device_id, epoch, seq) DO NOTHING",
        insert_columns(),
        params.join(", ")
    )
});

const INSERT_QUARANTINE: &str =
    "INSERT INTO quarantine (device_id, received_at, epoch, seq, reason, detail, raw) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING";

const UPSERT_SLOT: &str = "INSERT INTO energy_slots (device_id, meter, slot_ms, has_energy, data) \
     VALUES (?1, ?2, ?3, ?4, ?5) \
     ON CONFLICT (device_id, meter, slot_ms) DO UPDATE \
     SET has_energy = excluded.has_energy, data = excluded.data";

const DELETE_SLOT: &str =
    "DELETE FROM energy_slots WHERE device_id = ?1 AND meter = ?2 AND slot_ms = ?3";

const ADD_METER: &str =
    "INSERT INTO energy_meters (device_id, meter) VALUES (?1, ?2) ON CONFLICT DO NOTHING";

impl ReadingSink for SqliteStore {
    fn write_batch(
        &mut self,
        rows: &[Row],
        quarantine: &[QuarantineRow],
    ) -> Result<(), StoreError> {
        if rows.is_empty() && quarantine.is_empty() {
            return Ok(());
        }
        if !rows.is_empty() {
            self.ensure_energy()?;
        }
        let limits = self.energy.limits;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        // Another connection committed since this one last looked: what
        // the cache holds may be stale.
        let version: i64 = tx
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(db)?;
        if self.data_version != Some(version) {
            self.energy.cache.clear();
        }
        // Readings, their flags and slots; nothing of it is remembered
        // (cache, counters) unless the transaction commits, so a batch the
        // database refuses leaves no slot accounting behind.
        let committed = if rows.is_empty() {
            None
        } else {
            let mut io = Io {
                tx: &tx,
                cache: &self.energy.cache,
            };
            Some(write_batch(&mut io, rows, &limits)?)
        };
        if !quarantine.is_empty() {
            let mut stmt = tx.prepare_cached(INSERT_QUARANTINE).map_err(db)?;
            for q in quarantine {
                stmt.execute(params![
                    &*q.device_id,
                    q.received_at_ms,
                    q.epoch.map(to_i64).transpose()?,
                    q.seq.map(to_i64).transpose()?,
                    q.reason.code(),
                    q.detail,
                    q.raw,
                ])
                .map_err(write_error)?;
            }
        }
        tx.commit().map_err(db)?;
        self.data_version = Some(version);
        if let Some(committed) = committed {
            self.energy.count(&committed);
            self.energy.cache.apply(committed.states);
        }
        Ok(())
    }
}

/// [`SlotIo`] on an open SQLite transaction.
struct Io<'a> {
    tx: &'a Transaction<'a>,
    cache: &'a StateCache,
}

fn slot_from(start_ms: i64, data: &[u8]) -> Result<Slot, StoreError> {
    Slot::decode(start_ms, data).map_err(|e| StoreError::Db(format!("energy slot: {e}")))
}

impl SlotIo for Io<'_> {
    fn states(&mut self, meters: &[MeterKey<'_>]) -> Result<Vec<MeterState>, StoreError> {
        let mut out = Vec::with_capacity(meters.len());
        for &m in meters {
            if let Some(s) = self.cache.get(m) {
                out.push(s);
                continue;
            }
            let tail: Option<(i64, Vec<u8>)> = {
                let mut stmt = self.tx.prepare_cached(TAIL).map_err(db)?;
                let mut rows = stmt.query(params![m.device_id, m.meter]).map_err(db)?;
                match rows.next().map_err(db)? {
                    Some(r) => Some((r.get(0).map_err(db)?, r.get(1).map_err(db)?)),
                    None => None,
                }
            };
            let tail = tail.map(|(s, d)| slot_from(s, &d)).transpose()?;
            let energy = match tail {
                Some(t) if t.energy.is_none() => self.energy_slot_before(m, t.start_ms)?,
                _ => None,
            };
            out.push(MeterState::from_slots(tail, energy));
        }
        Ok(out)
    }

    fn slot_rows(
        &mut self,
        m: MeterKey<'_>,
        slot_ms: i64,
    ) -> Result<Vec<MeterReading>, StoreError> {
        let mut stmt = self.tx.prepare_cached(SLOT_READINGS).map_err(db)?;
        let rows = stmt
            .query_map(
                params![
                    m.device_id,
                    m.meter,
                    slot_ms,
                    slot_ms + crate::energy::buckets::SLOT_MS
                ],
                decode_row,
            )
            .map_err(db)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
    }

    fn energy_slot_before(
        &mut self,
        m: MeterKey<'_>,
        slot_ms: i64,
    ) -> Result<Option<Slot>, StoreError> {
        let mut stmt = self.tx.prepare_cached(SLOT_BEFORE).map_err(db)?;
        let mut rows = stmt
            .query(params![m.device_id, m.meter, slot_ms])
            .map_err(db)?;
        match rows.next().map_err(db)? {
            Some(r) => {
                let start: i64 = r.get(0).map_err(db)?;
                let data: Vec<u8> = r.get(1).map_err(db)?;
                Ok(Some(slot_from(start, &data)?))
            }
            None => Ok(None),
        }
    }

    fn insert(&mut self, rows: &[Row], flags: &[u32]) -> Result<Vec<bool>, StoreError> {
        let mut stmt = self.tx.prepare_cached(&INSERT_READING).map_err(db)?;
        let mut stored = Vec::with_capacity(rows.len());
        for (row, f) in rows.iter().zip(flags) {
            let r = &row.reading;
            // Parameters are numbered from 1, in `insert_columns` order.
            stmt.raw_bind_parameter(1, &*row.device_id).map_err(db)?;
            stmt.raw_bind_parameter(2, &r.meter).map_err(db)?;
            stmt.raw_bind_parameter(3, r.ts_ms).map_err(db)?;
            stmt.raw_bind_parameter(4, row.received_at_ms).map_err(db)?;
            stmt.raw_bind_parameter(5, to_i64(r.epoch)?).map_err(db)?;
            stmt.raw_bind_parameter(6, to_i64(r.seq)?).map_err(db)?;
            for m in Measurement::ALL {
                stmt.raw_bind_parameter(KEY_COLUMNS.len() + 1 + m.index(), r.get(m))
                    .map_err(db)?;
            }
            stmt.raw_bind_parameter(FLAGS_PARAM + 1, f).map_err(db)?;
            let n = stmt.raw_execute().map_err(write_error)?;
            stored.push(n > 0);
        }
        Ok(stored)
    }

    fn write_slots(&mut self, w: &SlotWrites<'_>) -> Result<(), StoreError> {
        if !w.upserts.is_empty() {
            let mut stmt = self.tx.prepare_cached(UPSERT_SLOT).map_err(db)?;
            for (m, s) in &w.upserts {
                stmt.execute(params![
                    m.device_id,
                    m.meter,
                    s.start_ms,
                    s.energy.is_some(),
                    &s.encode()[..],
                ])
                .map_err(db)?;
            }
        }
        for (m, slot) in &w.deletes {
            self.tx
                .prepare_cached(DELETE_SLOT)
                .map_err(db)?
                .execute(params![m.device_id, m.meter, slot])
                .map_err(db)?;
        }
        if !w.new_meters.is_empty() {
            let mut stmt = self.tx.prepare_cached(ADD_METER).map_err(db)?;
            for m in &w.new_meters {
                stmt.execute(params![m.device_id, m.meter]).map_err(db)?;
            }
        }
        Ok(())
    }
}
