//! Bounded look-ups: "last seen" of many devices in one statement, and
//! one reading by its key.

use super::time::PgTime;
use super::{db, PgStore};
use crate::store::{LookupStore, StoreError};

impl LookupStore for PgStore {
    fn last_seen_many(&mut self, device_ids: &[String]) -> Result<Vec<Option<i64>>, StoreError> {
        if device_ids.is_empty() {
            return Ok(Vec::new());
        }
        self.with(|c| {
            // One statement: the ids travel as an array and each costs one
            // probe of the (device_id, ts) index.
            let rows = c
                .client
                .query(
                    "SELECT r.received_at FROM unnest($1::text[]) WITH ORDINALITY AS d(id, n) \
                     LEFT JOIN LATERAL (SELECT received_at FROM readings \
                       WHERE device_id = d.id ORDER BY ts DESC LIMIT 1) r ON true \
                     ORDER BY d.n",
                    &[&device_ids],
                )
                .map_err(db)?;
            rows.iter()
                .map(|r| {
                    r.try_get::<_, Option<PgTime>>(0)
                        .map(|t| t.map(|t| t.0))
                        .map_err(db)
                })
                .collect()
        })
    }

    fn reading_stored(
        &mut self,
        device_id: &str,
        epoch: u64,
        seq: u64,
    ) -> Result<bool, StoreError> {
        let (Ok(epoch), Ok(seq)) = (i64::try_from(epoch), i64::try_from(seq)) else {
            return Ok(false);
        };
        self.with(|c| {
            c.client
                .query_opt(
                    "SELECT 1 FROM readings WHERE device_id = $1 AND epoch = $2 AND seq = $3 \
                     LIMIT 1",
                    &[&device_id, &epoch, &seq],
                )
                .map(|r| r.is_some())
                .map_err(db)
        })
    }
}
