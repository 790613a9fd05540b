//! The write path: a batch as one transaction, by binary `COPY` straight
//! into `readings`, through the staging table after a conflict, or as
//! multi-row `INSERT`s (see [`WriteMethod`]) — with each row's flags and
//! the energy slots kept in the same transaction
//! ([`crate::store::energy::write_batch`]), and the batch's quarantine rows
//! (rare) inserted one by one in it too.
//!
//! Several hubs may write into one database. Each batch therefore reads the
//! meters' slot state inside its transaction, after taking a transaction
//! advisory lock per device of the batch (in device id order, so two
//! batches never wait on each other crosswise), and holds a share lock on
//! the `energy_limits` row, which a slot rebuild locks for update: a batch
//! never mixes slots of two limits, and never works from a state another
//! hub changed after it was read.
//!
//! Failures are sorted here: [`StoreError::Refused`] for the SQLSTATE
//! classes that mean "this data cannot be stored" (see [`write_error`]),
//! [`StoreError::Db`] for the rest.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use ems_shared::{Measured, Measurement};
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use postgres::Transaction;

use super::energy::{slot_from, ADD_METERS, ENERGY_SLOT_BEFORE, SLOT_READINGS, UPSERT_SLOTS};
use super::time::{PgTime, PG_END_MS, PG_MIN_MS};
use super::{db, is_unique_violation, pg_message, Conn, PgStore, WriteMethod};
use crate::energy::buckets::SLOT_MS;
use crate::energy::rule::{Limits, MeterReading};
use crate::energy::slots::Slot;
use crate::store::columns::{insert_columns, FLAGS_PARAM, KEY_COLUMNS, ROW_COLUMNS};
use crate::store::energy::{
    same_limits, write_batch, Committed, MeterKey, MeterState, SlotIo, SlotWrites,
};
use crate::store::{QuarantineRow, ReadingSink, Row, StoreError};

/// `COPY readings_stage (…) FROM STDIN (FORMAT binary)`.
static COPY_STAGE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "COPY readings_stage ({}) FROM STDIN (FORMAT binary)",
        insert_columns()
    )
});

/// `COPY readings (…) FROM STDIN (FORMAT binary)`.
static COPY_READINGS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "COPY readings ({}) FROM STDIN (FORMAT binary)",
        insert_columns()
    )
});

const INSERT_QUARANTINE: &str =
    "INSERT INTO quarantine (device_id, received_at, epoch, seq, reason, detail, raw) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING";

/// Batches merged through the staging table after a conflict, before the
/// direct path is tried again.
const STAGED_AFTER_CONFLICT: u32 = 16;

/// Moves the staged rows into `readings`, skipping stored ones, and names
/// the rows it stored.
static MERGE_STAGE: LazyLock<String> = LazyLock::new(|| {
    let columns = insert_columns();
    format!(
        "INSERT INTO readings ({columns}) SELECT {columns} FROM readings_stage \
         ON CONFLICT DO NOTHING RETURNING device_id, epoch, seq"
    )
});

/// Column types of one row, in `insert_columns` order: the key columns,
/// a `double precision` per measurement, the flags.
static ROW_TYPES: LazyLock<Vec<Type>> = LazyLock::new(|| {
    let mut types = vec![
        Type::TEXT,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::INT8,
        Type::INT8,
    ];
    types.resize(FLAGS_PARAM, Type::FLOAT8);
    types.push(Type::INT4);
    debug_assert_eq!(types.len(), ROW_COLUMNS);
    types
});

/// Parameters per row of the multi-row INSERT.
const PARAMS_PER_ROW: usize = ROW_COLUMNS;

/// Rows per multi-row `INSERT` statement (one parameter per column,
/// ≤ 65535 per statement).
const INSERT_CHUNK: usize = 2000;
const _: () = assert!(INSERT_CHUNK * PARAMS_PER_ROW <= 65535);

/// Stands in for a parameter until it is set (every slot is set before a
/// row is written).
const UNSET: &(dyn ToSql + Sync) = &None::<f64>;

/// The advisory lock class of the per-device write locks ("enrg"; the
/// two-key lock space does not overlap the one-key migration lock).
const DEVICE_LOCK_CLASS: i32 = 0x656e_7267;

/// The batch's device locks, taken in device id order.
const LOCK_DEVICES: &str = "SELECT count(pg_advisory_xact_lock($1, hashtext(d))) \
     FROM (SELECT DISTINCT d FROM unnest($2::text[]) AS d ORDER BY d) AS s";

/// Every meter's latest slot and latest slot with energy, in input order.
/// The second is looked up only when the latest slot has no energy
/// reading (else it is that slot): one index probe per meter instead of
/// two in the common case (the `NOT t.has_energy` filter depends on the
/// outer row only, so PostgreSQL skips the probe).
const STATES: &str = "SELECT t.slot_ms, t.data, \
       CASE WHEN t.has_energy THEN t.slot_ms ELSE e.slot_ms END, \
       CASE WHEN t.has_energy THEN t.data ELSE e.data END \
     FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS m(device_id, meter, i) \
     LEFT JOIN LATERAL (SELECT slot_ms, data, has_energy FROM energy_slots s \
       WHERE s.device_id = m.device_id AND s.meter = m.meter \
       ORDER BY slot_ms DESC LIMIT 1) t ON true \
     LEFT JOIN LATERAL (SELECT slot_ms, data FROM energy_slots s \
       WHERE NOT t.has_energy AND s.device_id = m.device_id AND s.meter = m.meter \
         AND s.has_energy \
       ORDER BY slot_ms DESC LIMIT 1) e ON true \
     ORDER BY m.i";

const DELETE_SLOTS: &str = "DELETE FROM energy_slots s \
     USING unnest($1::text[], $2::text[], $3::int8[]) AS d(device_id, meter, slot_ms) \
     WHERE s.device_id = d.device_id AND s.meter = d.meter AND s.slot_ms = d.slot_ms";

/// How a batch goes into `readings`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    /// Binary COPY into `readings` (fails on an already stored row).
    Direct,
    /// Binary COPY into the staging table, then `INSERT … SELECT … ON
    /// CONFLICT DO NOTHING`.
    Staged,
    /// Multi-row `INSERT … ON CONFLICT DO NOTHING`.
    Values,
}

/// One row's parameters in owned form, for the multi-row INSERT.
struct OwnedRow<'a> {
    row: &'a Row,
    device_id: &'a str,
    ts: PgTime,
    received_at: PgTime,
    epoch: i64,
    seq: i64,
    /// The measurements, in [`Measurement::ALL`] order.
    values: [Option<f64>; Measurement::COUNT],
    flags: i32,
}

/// Whether each row is the first of its `(device_id, epoch, seq)` in the
/// batch (later ones are left out, as with a resend).
fn first_of_key(rows: &[Row]) -> Vec<bool> {
    let mut seen = HashSet::with_capacity(rows.len());
    rows.iter()
        .map(|r| seen.insert((&*r.device_id, r.reading.epoch, r.reading.seq)))
        .collect()
}

/// Streams `rows` with binary COPY into `readings` directly (`direct`) or
/// into the staging table, inside `tx`, leaving out repeated keys.
fn copy_rows(
    tx: &mut Transaction<'_>,
    rows: &[Row],
    flags: &[u32],
    first: &[bool],
    direct: bool,
) -> Result<(), postgres::Error> {
    let sink = tx.copy_in(if direct {
        &*COPY_READINGS
    } else {
        &*COPY_STAGE
    })?;
    let mut w = BinaryCopyInWriter::new(sink, &ROW_TYPES);
    for ((row, f), keep) in rows.iter().zip(flags).zip(first) {
        if !keep {
            continue;
        }
        let r = &row.reading;
        // Checked by `checked_keys` before.
        let (epoch, seq) = (r.epoch as i64, r.seq as i64);
        let (device_id, ts, rx) = (&*row.device_id, PgTime(r.ts_ms), PgTime(row.received_at_ms));
        let values = Measurement::ALL.map(|m| r.get(m));
        let flags = *f as i32;
        let mut params = [UNSET; ROW_COLUMNS];
        let keys: [&(dyn ToSql + Sync); KEY_COLUMNS.len()] =
            [&device_id, &r.meter, &ts, &rx, &epoch, &seq];
        params[..KEY_COLUMNS.len()].copy_from_slice(&keys);
        for (p, v) in params[KEY_COLUMNS.len()..FLAGS_PARAM]
            .iter_mut()
            .zip(&values)
        {
            *p = v;
        }
        params[FLAGS_PARAM] = &flags;
        w.write(&params)?;
    }
    w.finish().map(|_| ())
}

/// [`SlotIo`] on an open PostgreSQL transaction.
struct Io<'t, 'c> {
    tx: &'t mut Transaction<'c>,
    how: How,
    /// Prepared multi-row INSERTs by row count (`How::Values`).
    inserts: &'t HashMap<usize, postgres::Statement>,
    /// Set when a direct COPY hit an already stored row.
    conflict: bool,
}

impl SlotIo for Io<'_, '_> {
    fn states(&mut self, meters: &[MeterKey<'_>]) -> Result<Vec<MeterState>, StoreError> {
        let devices: Vec<&str> = meters.iter().map(|m| m.device_id).collect();
        let names: Vec<&str> = meters.iter().map(|m| m.meter).collect();
        let rows = self.tx.query(STATES, &[&devices, &names]).map_err(db)?;
        rows.iter()
            .map(|r| {
                let slot = |at: usize| -> Result<Option<Slot>, StoreError> {
                    let start: Option<i64> = r.try_get(at).map_err(db)?;
                    let data: Option<&[u8]> = r.try_get(at + 1).map_err(db)?;
                    match (start, data) {
                        (Some(s), Some(d)) => slot_from(s, d).map(Some),
                        _ => Ok(None),
                    }
                };
                Ok(MeterState::from_slots(slot(0)?, slot(2)?))
            })
            .collect()
    }

    fn slot_rows(
        &mut self,
        m: MeterKey<'_>,
        slot_ms: i64,
    ) -> Result<Vec<MeterReading>, StoreError> {
        let rows = self
            .tx
            .query(
                SLOT_READINGS,
                &[
                    &m.device_id,
                    &m.meter,
                    &PgTime(slot_ms),
                    &PgTime(slot_ms + SLOT_MS),
                ],
            )
            .map_err(db)?;
        rows.iter().map(super::energy::meter_reading).collect()
    }

    fn energy_slot_before(
        &mut self,
        m: MeterKey<'_>,
        slot_ms: i64,
    ) -> Result<Option<Slot>, StoreError> {
        let row = self
            .tx
            .query_opt(ENERGY_SLOT_BEFORE, &[&m.device_id, &m.meter, &slot_ms])
            .map_err(db)?;
        row.map(|r| {
            let start: i64 = r.try_get(0).map_err(db)?;
            let data: &[u8] = r.try_get(1).map_err(db)?;
            slot_from(start, data)
        })
        .transpose()
    }

    fn insert(&mut self, rows: &[Row], flags: &[u32]) -> Result<Vec<bool>, StoreError> {
        let first = first_of_key(rows);
        let returned: HashSet<(String, i64, i64)> = match self.how {
            How::Direct => {
                return match copy_rows(self.tx, rows, flags, &first, true) {
                    Ok(()) => Ok(first),
                    Err(e) if is_unique_violation(&e) => {
                        self.conflict = true;
                        Err(StoreError::Db(
                            "a row of the batch is already stored".into(),
                        ))
                    }
                    Err(e) => Err(write_error(e)),
                };
            }
            How::Staged => {
                copy_rows(self.tx, rows, flags, &first, false).map_err(write_error)?;
                let back = self.tx.query(&*MERGE_STAGE, &[]).map_err(write_error)?;
                back.iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                    .collect::<Result<_, postgres::Error>>()
                    .map_err(db)?
            }
            How::Values => {
                let mut back = HashSet::new();
                for (chunk, (flag_chunk, first_chunk)) in rows
                    .chunks(INSERT_CHUNK)
                    .zip(flags.chunks(INSERT_CHUNK).zip(first.chunks(INSERT_CHUNK)))
                {
                    let owned: Vec<OwnedRow> = chunk
                        .iter()
                        .zip(flag_chunk)
                        .zip(first_chunk)
                        .filter(|(_, keep)| **keep)
                        .map(|((r, f), _)| OwnedRow::from_row(r, *f))
                        .collect::<Result<_, _>>()?;
                    let Some(stmt) = self.inserts.get(&owned.len()) else {
                        return Err(StoreError::Db("multi-row INSERT not prepared".into()));
                    };
                    let mut params: Vec<&(dyn ToSql + Sync)> =
                        Vec::with_capacity(owned.len() * PARAMS_PER_ROW);
                    for o in &owned {
                        o.push_params(&mut params);
                    }
                    for r in self.tx.query(stmt, &params).map_err(write_error)? {
                        back.insert((
                            r.try_get(0).map_err(db)?,
                            r.try_get(1).map_err(db)?,
                            r.try_get(2).map_err(db)?,
                        ));
                    }
                }
                back
            }
        };
        Ok(rows
            .iter()
            .zip(first)
            .map(|(r, keep)| {
                keep && returned.contains(&(
                    r.device_id.to_string(),
                    r.reading.epoch as i64,
                    r.reading.seq as i64,
                ))
            })
            .collect())
    }

    fn write_slots(&mut self, w: &SlotWrites<'_>) -> Result<(), StoreError> {
        if !w.upserts.is_empty() {
            let data: Vec<[u8; crate::energy::slots::SLOT_BYTES]> =
                w.upserts.iter().map(|(_, s)| s.encode()).collect();
            let devices: Vec<&str> = w.upserts.iter().map(|(m, _)| m.device_id).collect();
            let meters: Vec<&str> = w.upserts.iter().map(|(m, _)| m.meter).collect();
            let starts: Vec<i64> = w.upserts.iter().map(|(_, s)| s.start_ms).collect();
            let energy: Vec<bool> = w.upserts.iter().map(|(_, s)| s.energy.is_some()).collect();
            let blobs: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
            self.tx
                .execute(UPSERT_SLOTS, &[&devices, &meters, &starts, &energy, &blobs])
                .map_err(db)?;
        }
        if !w.deletes.is_empty() {
            let devices: Vec<&str> = w.deletes.iter().map(|(m, _)| m.device_id).collect();
            let meters: Vec<&str> = w.deletes.iter().map(|(m, _)| m.meter).collect();
            let starts: Vec<i64> = w.deletes.iter().map(|(_, s)| *s).collect();
            self.tx
                .execute(DELETE_SLOTS, &[&devices, &meters, &starts])
                .map_err(db)?;
        }
        if !w.new_meters.is_empty() {
            let devices: Vec<&str> = w.new_meters.iter().map(|m| m.device_id).collect();
            let meters: Vec<&str> = w.new_meters.iter().map(|m| m.meter).collect();
            self.tx
                .execute(ADD_METERS, &[&devices, &meters])
                .map_err(db)?;
        }
        Ok(())
    }
}

impl PgStore {
    /// One batch in one transaction: the limits and device locks, then
    /// flags, insert and slots, then the quarantine rows. `Ok(None)`: a
    /// direct COPY hit an already stored row; nothing was written. Without
    /// readings, only the quarantine rows are written (no energy work).
    fn write_tx(
        conn: &mut Conn,
        rows: &[Row],
        quarantine: &[QuarantineRow],
        limits: &Limits,
        how: How,
    ) -> Result<Option<Committed>, StoreError> {
        if rows.is_empty() {
            let mut tx = conn.client.transaction().map_err(db)?;
            insert_quarantine(&mut tx, quarantine)?;
            tx.commit().map_err(write_error)?;
            return Ok(Some(Committed::default()));
        }
        checked_keys(rows)?;
        if how == How::Values {
            let first = first_of_key(rows);
            for chunk in first.chunks(INSERT_CHUNK) {
                let n = chunk.iter().filter(|k| **k).count();
                if n > 0 && !conn.inserts.contains_key(&n) {
                    let types: Vec<Type> = ROW_TYPES
                        .iter()
                        .cycle()
                        .take(PARAMS_PER_ROW * n)
                        .cloned()
                        .collect();
                    let stmt = conn
                        .client
                        .prepare_typed(&multi_insert_sql(n), &types)
                        .map_err(db)?;
                    conn.inserts.insert(n, stmt);
                }
            }
        }
        let mut tx = conn.client.transaction().map_err(db)?;
        let stored = tx
            .query_opt(
                "SELECT max_power_w, max_gap_ms FROM energy_limits FOR SHARE",
                &[],
            )
            .map_err(db)?
            .map(|r| Ok::<_, postgres::Error>((r.try_get(0)?, r.try_get(1)?)))
            .transpose()
            .map_err(db)?;
        if !same_limits(stored, limits) {
            return Err(StoreError::Db(format!(
                "the energy slots in the database were built with other limits \
                 ({}) than this hub's (--max-power-w {} --max-gap-ms {}); every hub on one \
                 database needs the same limits",
                stored.map_or("none".to_string(), |(p, g)| format!(
                    "--max-power-w {p} --max-gap-ms {g}"
                )),
                limits.max_power_w,
                limits.max_gap_ms
            )));
        }
        let devices: Vec<&str> = rows.iter().map(|r| &*r.device_id).collect();
        tx.execute(LOCK_DEVICES, &[&DEVICE_LOCK_CLASS, &devices])
            .map_err(db)?;
        let committed = {
            let mut io = Io {
                tx: &mut tx,
                how,
                inserts: &conn.inserts,
                conflict: false,
            };
            match write_batch(&mut io, rows, limits) {
                Ok(c) => c,
                Err(_) if io.conflict => return Ok(None),
                Err(e) => return Err(e),
            }
        };
        insert_quarantine(&mut tx, quarantine)?;
        tx.commit().map_err(write_error)?;
        Ok(Some(committed))
    }
}

/// Inserts the quarantine rows inside `tx` (rare: one statement each).
fn insert_quarantine(
    tx: &mut postgres::Transaction<'_>,
    quarantine: &[QuarantineRow],
) -> Result<(), StoreError> {
    for q in quarantine {
        let epoch = q.epoch.map(to_i64).transpose()?;
        let seq = q.seq.map(to_i64).transpose()?;
        tx.execute(
            INSERT_QUARANTINE,
            &[
                &&*q.device_id,
                &PgTime(q.received_at_ms),
                &epoch,
                &seq,
                &q.reason.code(),
                &q.detail,
                &q.raw,
            ],
        )
        .map_err(write_error)?;
    }
    Ok(())
}

/// A failure while writing rows: [`StoreError::Refused`] when PostgreSQL
/// refused the data itself, so the same rows fail on every retry —
/// SQLSTATE class 22 (data exception: a value out of range, a NUL byte in
/// text), 23 (integrity constraint: a CHECK, NOT NULL or foreign key),
/// P0 (raised by PL/pgSQL, e.g. a trigger's `RAISE EXCEPTION`), 0A
/// (feature not supported: TimescaleDB before 2.11 refusing an insert into
/// a compressed chunk) and 54 (program limit: e.g. an index row too big).
/// Everything else — no SQLSTATE at all (the connection is gone), 08
/// (connection), 53 (insufficient resources: disk full, out of memory),
/// 57 (operator intervention: shutdown), 40 (serialization, deadlock), 42
/// (a missing table or privilege), XX (internal) — is [`StoreError::Db`]:
/// the store is unwell, not the row, and a retry may succeed.
pub(super) fn write_error(e: postgres::Error) -> StoreError {
    let refused = e.code().map(|c| c.code()).is_some_and(|c| {
        ["22", "23", "P0", "0A", "54"]
            .iter()
            .any(|k| c.starts_with(k))
    });
    if refused {
        StoreError::Refused(pg_message(&e))
    } else {
        db(e)
    }
}

impl<'a> OwnedRow<'a> {
    fn from_row(row: &'a Row, flags: u32) -> Result<Self, StoreError> {
        Ok(OwnedRow {
            row,
            device_id: &row.device_id,
            ts: PgTime(row.reading.ts_ms),
            received_at: PgTime(row.received_at_ms),
            epoch: to_i64(row.reading.epoch)?,
            seq: to_i64(row.reading.seq)?,
            values: Measurement::ALL.map(|m| row.reading.get(m)),
            flags: flags as i32,
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
        for v in &self.values {
            p.push(v);
        }
        p.push(&self.flags);
    }
}

fn multi_insert_sql(n: usize) -> String {
    let mut sql = format!("INSERT INTO readings ({}) VALUES ", insert_columns());
    for i in 0..n {
        if i > 0 {
            sql.push(',');
        }
        sql.push('(');
        for c in 0..PARAMS_PER_ROW {
            if c > 0 {
                sql.push(',');
            }
            sql.push('$');
            sql.push_str(&(i * PARAMS_PER_ROW + c + 1).to_string());
        }
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT DO NOTHING RETURNING device_id, epoch, seq");
    sql
}

/// Checks that every epoch/seq fits a BIGINT (so `as i64` is exact).
fn checked_keys(rows: &[Row]) -> Result<(), StoreError> {
    for r in rows {
        to_i64(r.reading.epoch)?;
        to_i64(r.reading.seq)?;
    }
    Ok(())
}

/// `u64` epoch/seq (≤ 2^53 − 1 by protocol) as a BIGINT; a larger one is
/// refused (it can never be stored).
fn to_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v)
        .map_err(|_| StoreError::Refused(format!("epoch/seq {v} does not fit a BIGINT")))
}

impl ReadingSink for PgStore {
    fn write_batch(
        &mut self,
        rows: &[Row],
        quarantine: &[QuarantineRow],
    ) -> Result<(), StoreError> {
        // A timestamp PostgreSQL cannot hold fails the batch on every
        // retry: refused, so the writer isolates that row and quarantines
        // it (it used to be left out, silently for the edge).
        let in_range = |ms: i64| (PG_MIN_MS..PG_END_MS).contains(&ms);
        if let Some(bad) = rows
            .iter()
            .find(|r| !in_range(r.reading.ts_ms) || !in_range(r.received_at_ms))
        {
            return Err(StoreError::Refused(format!(
                "timestamp {} ms is outside PostgreSQL's range",
                if in_range(bad.reading.ts_ms) {
                    bad.received_at_ms
                } else {
                    bad.reading.ts_ms
                }
            )));
        }
        if rows.is_empty() {
            if quarantine.is_empty() {
                return Ok(());
            }
            let limits = self.energy.limits;
            return self
                .with(|c| PgStore::write_tx(c, rows, quarantine, &limits, How::Staged))
                .map(|_| ());
        }
        self.ensure_energy()?;
        let limits = self.energy.limits;
        let run = |s: &mut PgStore, how: How| {
            s.with(|c| PgStore::write_tx(c, rows, quarantine, &limits, how))
        };
        let committed = match self.opts.write_method {
            WriteMethod::Copy if self.staged_batches_left == 0 => match run(self, How::Direct)? {
                Some(c) => c,
                None => {
                    // Some rows were stored before: an edge is replaying.
                    // Merge this batch and the next few, then try the fast
                    // path again.
                    self.staged_batches_left = STAGED_AFTER_CONFLICT;
                    staged(run(self, How::Staged)?)?
                }
            },
            WriteMethod::Copy => {
                self.staged_batches_left -= 1;
                staged(run(self, How::Staged)?)?
            }
            WriteMethod::StagedCopy => staged(run(self, How::Staged)?)?,
            WriteMethod::MultiRowInsert => staged(run(self, How::Values)?)?,
        };
        self.energy.count(&committed);
        Ok(())
    }
}

/// The outcome of a path that cannot conflict.
fn staged(c: Option<Committed>) -> Result<Committed, StoreError> {
    c.ok_or_else(|| StoreError::Db("unexpected conflict on a merging insert".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_insert_sql_numbers_parameters() {
        let s = multi_insert_sql(2);
        assert!(s.contains("($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14),($15,"));
        assert!(s.ends_with("$28) ON CONFLICT DO NOTHING RETURNING device_id, epoch, seq"));
    }
}
