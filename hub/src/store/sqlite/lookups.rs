//! Bounded look-ups: "last seen" of many devices in one statement, and
//! one reading by its key.

use rusqlite::params;

use super::{db, to_i64, SqliteStore};
use crate::store::{LookupStore, StoreError};

impl LookupStore for SqliteStore {
    fn last_seen_many(&mut self, device_ids: &[String]) -> Result<Vec<Option<i64>>, StoreError> {
        if device_ids.is_empty() {
            return Ok(Vec::new());
        }
        // The ids travel as one JSON array; each costs one index probe.
        let ids = serde_json::to_string(device_ids)
            .map_err(|e| StoreError::Db(format!("encoding device ids: {e}")))?;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT (SELECT received_at FROM readings r WHERE r.device_id = j.value \
                 ORDER BY r.ts DESC LIMIT 1) FROM json_each(?1) j ORDER BY j.key",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([ids], |r| r.get::<_, Option<i64>>(0))
            .map_err(db)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
    }

    fn reading_stored(
        &mut self,
        device_id: &str,
        epoch: u64,
        seq: u64,
    ) -> Result<bool, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT 1 FROM readings WHERE device_id = ?1 AND epoch = ?2 AND seq = ?3",
            )
            .map_err(db)?;
        stmt.exists(params![device_id, to_i64(epoch)?, to_i64(seq)?])
            .map_err(db)
    }
}
