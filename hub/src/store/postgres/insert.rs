//! The write path: a batch as one transaction, by binary `COPY` straight
//! into `readings`, through the staging table after a conflict, or as
//! multi-row `INSERT`s (see [`WriteMethod`]), with the batch's quarantine
//! rows (rare) inserted one by one in the same transaction.
//!
//! Failures are sorted here: [`StoreError::Refused`] for the SQLSTATE
//! classes that mean "this data cannot be stored" (see [`write_error`]),
//! [`StoreError::Db`] for the rest.

use std::collections::HashSet;
use std::sync::LazyLock;

use ems_shared::{Measured, Measurement};
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};

use super::time::{PgTime, PG_END_MS, PG_MIN_MS};
use super::{db, is_unique_violation, pg_message, Conn, PgStore, WriteMethod};
use crate::store::columns::{insert_columns, KEY_COLUMNS, ROW_COLUMNS};
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

/// Moves the staged rows into `readings`, skipping stored ones.
static MERGE_STAGE: LazyLock<String> = LazyLock::new(|| {
    let columns = insert_columns();
    format!(
        "INSERT INTO readings ({columns}) SELECT {columns} FROM readings_stage \
         ON CONFLICT DO NOTHING"
    )
});

/// Column types of one row, in `insert_columns` order: the key columns,
/// then a `double precision` per measurement.
static ROW_TYPES: LazyLock<Vec<Type>> = LazyLock::new(|| {
    let mut types = vec![
        Type::TEXT,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::INT8,
        Type::INT8,
    ];
    types.resize(ROW_COLUMNS, Type::FLOAT8);
    types
});

/// Rows per multi-row `INSERT` statement (one parameter per column,
/// ≤ 65535 per statement).
const INSERT_CHUNK: usize = 2000;
const _: () = assert!(INSERT_CHUNK * ROW_COLUMNS <= 65535);

/// Stands in for a parameter until it is set (every slot is set before a
/// row is written).
const UNSET: &(dyn ToSql + Sync) = &None::<f64>;

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
}

impl PgStore {
    /// Streams `rows` with binary COPY into `readings` directly
    /// (`direct`) or into the staging table, inside `tx`. Rows repeating an
    /// earlier row's `(device_id, epoch, seq)` in the same batch are left
    /// out (the first one wins, as with a resend).
    fn copy_rows(
        tx: &mut postgres::Transaction<'_>,
        rows: &[Row],
        direct: bool,
    ) -> Result<(), postgres::Error> {
        let sink = tx.copy_in(if direct {
            &*COPY_READINGS
        } else {
            &*COPY_STAGE
        })?;
        let mut w = BinaryCopyInWriter::new(sink, &ROW_TYPES);
        let mut seen = HashSet::with_capacity(rows.len());
        for row in rows {
            let r = &row.reading;
            // Checked by `checked_keys` before.
            let (epoch, seq) = (r.epoch as i64, r.seq as i64);
            if !seen.insert((&*row.device_id, epoch, seq)) {
                continue;
            }
            let (device_id, ts, rx) =
                (&*row.device_id, PgTime(r.ts_ms), PgTime(row.received_at_ms));
            let values = Measurement::ALL.map(|m| r.get(m));
            let mut params = [UNSET; ROW_COLUMNS];
            let keys: [&(dyn ToSql + Sync); KEY_COLUMNS.len()] =
                [&device_id, &r.meter, &ts, &rx, &epoch, &seq];
            params[..KEY_COLUMNS.len()].copy_from_slice(&keys);
            for (p, v) in params[KEY_COLUMNS.len()..].iter_mut().zip(&values) {
                *p = v;
            }
            w.write(&params)?;
        }
        w.finish().map(|_| ())
    }

    /// The optimistic path: binary COPY straight into `readings` in one
    /// transaction. `Ok(false)` when a row was already stored (unique
    /// violation): the transaction was rolled back, nothing was written,
    /// and the batch must go through [`PgStore::insert_staged`].
    fn insert_direct(
        conn: &mut Conn,
        rows: &[Row],
        quarantine: &[QuarantineRow],
    ) -> Result<bool, StoreError> {
        checked_keys(rows)?;
        let mut tx = conn.client.transaction().map_err(db)?;
        match PgStore::copy_rows(&mut tx, rows, true) {
            Ok(()) => {}
            Err(e) if is_unique_violation(&e) => return Ok(false),
            Err(e) => return Err(write_error(e)),
        }
        insert_quarantine(&mut tx, quarantine)?;
        tx.commit().map_err(write_error)?;
        Ok(true)
    }

    /// The merging path: binary COPY into the staging table, then
    /// `INSERT … SELECT … ON CONFLICT DO NOTHING`, one transaction.
    fn insert_staged(
        conn: &mut Conn,
        rows: &[Row],
        quarantine: &[QuarantineRow],
    ) -> Result<(), StoreError> {
        checked_keys(rows)?;
        let mut tx = conn.client.transaction().map_err(db)?;
        if !rows.is_empty() {
            PgStore::copy_rows(&mut tx, rows, false).map_err(write_error)?;
            tx.execute(&*MERGE_STAGE, &[]).map_err(write_error)?;
        }
        insert_quarantine(&mut tx, quarantine)?;
        tx.commit().map_err(write_error)
    }

    fn insert_values(
        conn: &mut Conn,
        rows: &[Row],
        quarantine: &[QuarantineRow],
    ) -> Result<(), StoreError> {
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
                            .take(ROW_COLUMNS * n)
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
            let mut params: Vec<&(dyn ToSql + Sync)> =
                Vec::with_capacity(owned.len() * ROW_COLUMNS);
            for o in &owned {
                o.push_params(&mut params);
            }
            tx.execute(&stmt, &params).map_err(write_error)?;
        }
        insert_quarantine(&mut tx, quarantine)?;
        tx.commit().map_err(write_error)
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
    fn from_row(row: &'a Row) -> Result<Self, StoreError> {
        Ok(OwnedRow {
            row,
            device_id: &row.device_id,
            ts: PgTime(row.reading.ts_ms),
            received_at: PgTime(row.received_at_ms),
            epoch: to_i64(row.reading.epoch)?,
            seq: to_i64(row.reading.seq)?,
            values: Measurement::ALL.map(|m| row.reading.get(m)),
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
    }
}

fn multi_insert_sql(n: usize) -> String {
    let mut sql = format!("INSERT INTO readings ({}) VALUES ", insert_columns());
    for i in 0..n {
        if i > 0 {
            sql.push(',');
        }
        sql.push('(');
        for c in 0..ROW_COLUMNS {
            if c > 0 {
                sql.push(',');
            }
            sql.push('$');
            sql.push_str(&(i * ROW_COLUMNS + c + 1).to_string());
        }
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT DO NOTHING");
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
            return self.with(|c| PgStore::insert_staged(c, rows, quarantine));
        }
        match self.opts.write_method {
            WriteMethod::Copy if self.staged_batches_left == 0 => {
                if self.with(|c| PgStore::insert_direct(c, rows, quarantine))? {
                    return Ok(());
                }
                // Some rows were stored before: an edge is replaying. Merge
                // this batch and the next few, then try the fast path again.
                self.staged_batches_left = STAGED_AFTER_CONFLICT;
                self.with(|c| PgStore::insert_staged(c, rows, quarantine))
            }
            WriteMethod::Copy => {
                self.staged_batches_left -= 1;
                self.with(|c| PgStore::insert_staged(c, rows, quarantine))
            }
            WriteMethod::StagedCopy => self.with(|c| PgStore::insert_staged(c, rows, quarantine)),
            WriteMethod::MultiRowInsert => {
                self.with(|c| PgStore::insert_values(c, rows, quarantine))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_insert_sql_numbers_parameters() {
        let s = multi_insert_sql(2);
        assert!(s.contains("($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13),($14,"));
        assert!(s.ends_with("$26) ON CONFLICT DO NOTHING"));
    }
}
