//! The write path: a batch as one `IMMEDIATE` transaction of prepared
//! `INSERT … ON CONFLICT DO NOTHING` statements, readings and quarantine
//! rows together.

use rusqlite::{params, TransactionBehavior};

use super::{db, to_i64, write_error, SqliteStore};
use crate::store::{QuarantineRow, ReadingSink, Row, StoreError};

const INSERT_READING: &str =
    "INSERT INTO readings (device_id, meter, ts, received_at, epoch, seq, \
     voltage_v, current_a, power_w, energy_wh, frequency_hz, power_factor, reactive_power_var) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
     ON CONFLICT (device_id, epoch, seq) DO NOTHING";

const INSERT_QUARANTINE: &str =
    "INSERT INTO quarantine (device_id, received_at, epoch, seq, reason, detail, raw) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING";

impl ReadingSink for SqliteStore {
    fn write_batch(
        &mut self,
        rows: &[Row],
        quarantine: &[QuarantineRow],
    ) -> Result<(), StoreError> {
        if rows.is_empty() && quarantine.is_empty() {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        {
            let mut stmt = tx.prepare_cached(INSERT_READING).map_err(db)?;
            for row in rows {
                let r = &row.reading;
                stmt.execute(params![
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
                ])
                .map_err(write_error)?;
            }
        }
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
        tx.commit().map_err(db)
    }
}
