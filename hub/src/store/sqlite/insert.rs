//! The write path: a batch as one `IMMEDIATE` transaction of prepared
//! `INSERT … ON CONFLICT DO NOTHING` statements, with each row's flags and
//! the energy slots kept in the same transaction
//! ([`crate::store::energy::write_batch`]).

use rusqlite::{params, Transaction, TransactionBehavior};

use super::energy::{decode_row, SLOT_BEFORE, SLOT_READINGS, TAIL};
use super::{db, to_i64, SqliteStore};
use crate::energy::rule::MeterReading;
use crate::energy::slots::Slot;
use crate::store::energy::{write_batch, MeterKey, MeterState, SlotIo, SlotWrites, StateCache};
use crate::store::{ReadingSink, Row, StoreError};

const INSERT_READING: &str =
    "INSERT INTO readings (device_id, meter, ts, received_at, epoch, seq, \
     voltage_v, current_a, power_w, energy_wh, frequency_hz, power_factor, reactive_power_var, \
     flags) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) \
     ON CONFLICT (device_id, epoch, seq) DO NOTHING";

const UPSERT_SLOT: &str = "INSERT INTO energy_slots (device_id, meter, slot_ms, has_energy, data) \
     VALUES (?1, ?2, ?3, ?4, ?5) \
     ON CONFLICT (device_id, meter, slot_ms) DO UPDATE \
     SET has_energy = excluded.has_energy, data = excluded.data";

const DELETE_SLOT: &str =
    "DELETE FROM energy_slots WHERE device_id = ?1 AND meter = ?2 AND slot_ms = ?3";

const ADD_METER: &str =
    "INSERT INTO energy_meters (device_id, meter) VALUES (?1, ?2) ON CONFLICT DO NOTHING";

impl ReadingSink for SqliteStore {
    fn insert_batch(&mut self, rows: &[Row]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.ensure_energy()?;
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
        let committed = {
            let mut io = Io {
                tx: &tx,
                cache: &self.energy.cache,
            };
            write_batch(&mut io, rows, &limits)?
        };
        tx.commit().map_err(db)?;
        self.data_version = Some(version);
        self.energy.count(&committed);
        self.energy.cache.apply(committed.states);
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
        let mut stmt = self.tx.prepare_cached(INSERT_READING).map_err(db)?;
        let mut stored = Vec::with_capacity(rows.len());
        for (row, f) in rows.iter().zip(flags) {
            let r = &row.reading;
            let n = stmt
                .execute(params![
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
                    f,
                ])
                .map_err(db)?;
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
