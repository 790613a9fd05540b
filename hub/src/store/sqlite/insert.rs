//! The write path: a batch as one `IMMEDIATE` transaction of prepared
//! `INSERT … ON CONFLICT DO NOTHING` statements, readings and quarantine
//! rows together.

use std::sync::LazyLock;

use ems_shared::{Measured, Measurement};
use rusqlite::{params, TransactionBehavior};

use super::{db, to_i64, write_error, SqliteStore};
use crate::store::columns::{insert_columns, KEY_COLUMNS, ROW_COLUMNS};
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
            let mut stmt = tx.prepare_cached(&INSERT_READING).map_err(db)?;
            for row in rows {
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
                stmt.raw_execute().map_err(write_error)?;
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
