//! The look-ups and admin statements: token checks, provisioning and
//! history, each one statement or one short transaction.

use std::sync::LazyLock;

use ems_shared::{Measured, Measurement, Reading};

use super::time::{clamp_ms, PgTime};
use super::{db, is_unique_violation, PgStore};
use crate::store::columns::{select_columns, AFTER_MEASUREMENTS, FIRST_MEASUREMENT};
use crate::store::{
    ct_eq, AdminStore, AuthStore, DeviceInfo, HistoryStore, QuarantineStore, Quarantined,
    StoreError, StoredReading, TokenHash, ViewerInfo, ViewerScope,
};

impl AuthStore for PgStore {
    fn device_token_valid(
        &mut self,
        device_id: &str,
        hash: &TokenHash,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let row = c
                .client
                .query_opt(
                    "SELECT token_hash FROM devices WHERE device_id = $1 AND revoked_ms IS NULL",
                    &[&device_id],
                )
                .map_err(db)?;
            match row {
                None => Ok(false),
                Some(r) => {
                    let stored: Vec<u8> = r.try_get(0).map_err(db)?;
                    Ok(ct_eq(&stored, hash))
                }
            }
        })
    }

    fn viewer_scope(&mut self, hash: &TokenHash) -> Result<Option<ViewerScope>, StoreError> {
        self.with(|c| {
            let row = c
                .client
                .query_opt(
                    "SELECT viewer_id, all_devices FROM viewers \
                     WHERE token_hash = $1 AND revoked_ms IS NULL",
                    &[&&hash[..]],
                )
                .map_err(db)?;
            let Some(row) = row else {
                return Ok(None);
            };
            let viewer_id: i64 = row.try_get(0).map_err(db)?;
            let all: bool = row.try_get(1).map_err(db)?;
            if all {
                return Ok(Some(ViewerScope::AllDevices));
            }
            let ids = c
                .client
                .query(
                    "SELECT device_id FROM viewer_devices WHERE viewer_id = $1 \
                     ORDER BY device_id",
                    &[&viewer_id],
                )
                .map_err(db)?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<Vec<String>, _>>()
                .map_err(db)?;
            Ok(Some(ViewerScope::Devices(ids)))
        })
    }

    fn admin_name(&mut self, hash: &TokenHash) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            c.client
                .query_opt(
                    "SELECT name FROM admins WHERE token_hash = $1 AND revoked_ms IS NULL",
                    &[&&hash[..]],
                )
                .map_err(db)?
                .map(|r| r.try_get(0).map_err(db))
                .transpose()
        })
    }

    fn active_device_tokens(&mut self) -> Result<Vec<(String, TokenHash)>, StoreError> {
        self.with(|c| {
            let rows = c
                .client
                .query(
                    "SELECT device_id, token_hash FROM devices WHERE revoked_ms IS NULL",
                    &[],
                )
                .map_err(db)?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let id: String = r.try_get(0).map_err(db)?;
                let hash: Vec<u8> = r.try_get(1).map_err(db)?;
                // A malformed stored hash matches no token (see sqlite.rs).
                if let Ok(h) = TokenHash::try_from(hash.as_slice()) {
                    out.push((id, h));
                }
            }
            Ok(out)
        })
    }

    fn device_exists(&mut self, device_id: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            let row = c
                .client
                .query_opt("SELECT 1 FROM devices WHERE device_id = $1", &[&device_id])
                .map_err(db)?;
            Ok(row.is_some())
        })
    }
}

impl AdminStore for PgStore {
    fn add_device(
        &mut self,
        device_id: &str,
        hash: &TokenHash,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            match c.client.execute(
                "INSERT INTO devices (device_id, token_hash, created_ms) VALUES ($1, $2, $3)",
                &[&device_id, &&hash[..], &now_ms],
            ) {
                Ok(_) => Ok(()),
                Err(e) if is_unique_violation(&e) => {
                    Err(StoreError::AlreadyExists(format!("device {device_id}")))
                }
                Err(e) => Err(db(e)),
            }
        })
    }

    fn list_devices(&mut self) -> Result<Vec<DeviceInfo>, StoreError> {
        self.with(|c| {
            c.client
                .query(
                    "SELECT device_id, created_ms, revoked_ms FROM devices ORDER BY device_id",
                    &[],
                )
                .map_err(db)?
                .iter()
                .map(|r| {
                    Ok(DeviceInfo {
                        device_id: r.try_get(0).map_err(db)?,
                        created_ms: r.try_get(1).map_err(db)?,
                        revoked_ms: r.try_get(2).map_err(db)?,
                    })
                })
                .collect()
        })
    }

    fn revoke_device(&mut self, device_id: &str, now_ms: i64) -> Result<(), StoreError> {
        self.with(|c| {
            let n = c
                .client
                .execute(
                    "UPDATE devices SET revoked_ms = COALESCE(revoked_ms, $2) \
                     WHERE device_id = $1",
                    &[&device_id, &now_ms],
                )
                .map_err(db)?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("device {device_id}")));
            }
            Ok(())
        })
    }

    fn rotate_device(&mut self, device_id: &str, hash: &TokenHash) -> Result<(), StoreError> {
        self.with(|c| {
            let n = c
                .client
                .execute(
                    "UPDATE devices SET token_hash = $2, revoked_ms = NULL WHERE device_id = $1",
                    &[&device_id, &&hash[..]],
                )
                .map_err(db)?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("device {device_id}")));
            }
            Ok(())
        })
    }

    fn add_viewer(
        &mut self,
        name: &str,
        hash: &TokenHash,
        scope: &ViewerScope,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            let mut tx = c.client.transaction().map_err(db)?;
            let all = matches!(scope, ViewerScope::AllDevices);
            let row = match tx.query_one(
                "INSERT INTO viewers (name, token_hash, all_devices, created_ms) \
                 VALUES ($1, $2, $3, $4) RETURNING viewer_id",
                &[&name, &&hash[..], &all, &now_ms],
            ) {
                Ok(r) => r,
                Err(e) if is_unique_violation(&e) => {
                    return Err(StoreError::AlreadyExists(format!("viewer {name}")))
                }
                Err(e) => return Err(db(e)),
            };
            let viewer_id: i64 = row.try_get(0).map_err(db)?;
            if let ViewerScope::Devices(ids) = scope {
                tx.execute(
                    "INSERT INTO viewer_devices (viewer_id, device_id) \
                     SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
                    &[&viewer_id, ids],
                )
                .map_err(db)?;
            }
            tx.commit().map_err(db)
        })
    }

    fn list_viewers(&mut self) -> Result<Vec<ViewerInfo>, StoreError> {
        self.with(|c| {
            let rows = c
                .client
                .query(
                    "SELECT v.name, v.all_devices, v.created_ms, v.revoked_ms, \
                     COALESCE(array_agg(d.device_id ORDER BY d.device_id) \
                       FILTER (WHERE d.device_id IS NOT NULL), '{}') \
                     FROM viewers v LEFT JOIN viewer_devices d ON d.viewer_id = v.viewer_id \
                     GROUP BY v.viewer_id ORDER BY v.name",
                    &[],
                )
                .map_err(db)?;
            rows.iter()
                .map(|r| {
                    let all: bool = r.try_get(1).map_err(db)?;
                    let ids: Vec<String> = r.try_get(4).map_err(db)?;
                    Ok(ViewerInfo {
                        name: r.try_get(0).map_err(db)?,
                        scope: if all {
                            ViewerScope::AllDevices
                        } else {
                            ViewerScope::Devices(ids)
                        },
                        created_ms: r.try_get(2).map_err(db)?,
                        revoked_ms: r.try_get(3).map_err(db)?,
                    })
                })
                .collect()
        })
    }

    fn revoke_viewer(&mut self, name: &str, now_ms: i64) -> Result<(), StoreError> {
        self.with(|c| {
            let n = c
                .client
                .execute(
                    "UPDATE viewers SET revoked_ms = COALESCE(revoked_ms, $2) WHERE name = $1",
                    &[&name, &now_ms],
                )
                .map_err(db)?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("viewer {name}")));
            }
            Ok(())
        })
    }

    fn add_admin(&mut self, name: &str, hash: &TokenHash, now_ms: i64) -> Result<(), StoreError> {
        self.with(|c| {
            match c.client.execute(
                "INSERT INTO admins (name, token_hash, created_ms) VALUES ($1, $2, $3)",
                &[&name, &&hash[..], &now_ms],
            ) {
                Ok(_) => Ok(()),
                Err(e) if is_unique_violation(&e) => {
                    Err(StoreError::AlreadyExists(format!("admin {name}")))
                }
                Err(e) => Err(db(e)),
            }
        })
    }
}

impl HistoryStore for PgStore {
    fn readings(
        &mut self,
        device_id: &str,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<Reading>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (from, to) = (clamp_ms(from_ms), clamp_ms(to_ms));
        self.with(|c| {
            let rows = c
                .client
                .query(&*SELECT_READINGS, &[&device_id, &from, &to, &limit])
                .map_err(db)?;
            rows.iter().map(reading_of).collect()
        })
    }

    fn history(
        &mut self,
        device_id: &str,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
        newest: bool,
    ) -> Result<Vec<StoredReading>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (from, to) = (clamp_ms(from_ms), clamp_ms(to_ms));
        let sql: &str = if newest {
            &SELECT_HISTORY_NEWEST
        } else {
            &SELECT_HISTORY_OLDEST
        };
        let mut out: Vec<StoredReading> = self.with(|c| {
            let rows = c
                .client
                .query(sql, &[&device_id, &from, &to, &limit])
                .map_err(db)?;
            rows.iter()
                .map(|r| {
                    let rx: PgTime = r.try_get(AFTER_MEASUREMENTS).map_err(db)?;
                    let flags: i32 = r.try_get(AFTER_MEASUREMENTS + 1).map_err(db)?;
                    Ok(StoredReading {
                        reading: reading_of(r)?,
                        received_at_ms: rx.0,
                        flags: flags as u32,
                    })
                })
                .collect()
        })?;
        if newest {
            out.reverse();
        }
        Ok(out)
    }

    fn last_seen(&mut self, device_id: &str) -> Result<Option<i64>, StoreError> {
        self.with(|c| {
            c.client
                .query_opt(
                    "SELECT received_at FROM readings WHERE device_id = $1 \
                     ORDER BY ts DESC LIMIT 1",
                    &[&device_id],
                )
                .map_err(db)?
                .map(|r| r.try_get::<_, PgTime>(0).map(|t| t.0).map_err(db))
                .transpose()
        })
    }
}

/// A device's readings in a time range, oldest first.
static SELECT_READINGS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM readings WHERE device_id = $1 AND ts >= $2 AND ts < $3 \
         ORDER BY ts, epoch, seq LIMIT $4",
        select_columns()
    )
});

/// [`SELECT_READINGS`] plus `received_at` and `flags`, in `order`.
fn select_history(order: &str) -> String {
    format!(
        "SELECT {}, received_at, flags FROM readings \
         WHERE device_id = $1 AND ts >= $2 AND ts < $3 \
         ORDER BY ts {order}, epoch {order}, seq {order} LIMIT $4",
        select_columns()
    )
}

static SELECT_HISTORY_OLDEST: LazyLock<String> = LazyLock::new(|| select_history("ASC"));
static SELECT_HISTORY_NEWEST: LazyLock<String> = LazyLock::new(|| select_history("DESC"));

/// The reading in a row of [`crate::store::columns::select_columns`].
pub(super) fn reading_of(r: &postgres::Row) -> Result<Reading, StoreError> {
    let epoch: i64 = r.try_get(0).map_err(db)?;
    let seq: i64 = r.try_get(1).map_err(db)?;
    let ts: PgTime = r.try_get(2).map_err(db)?;
    let mut reading = Reading {
        epoch: u64::try_from(epoch).unwrap_or_default(),
        seq: u64::try_from(seq).unwrap_or_default(),
        ts_ms: ts.0,
        meter: r.try_get(3).map_err(db)?,
        ..Default::default()
    };
    for m in Measurement::ALL {
        reading.set(m, r.try_get(FIRST_MEASUREMENT + m.index()).map_err(db)?);
    }
    Ok(reading)
}

impl QuarantineStore for PgStore {
    fn quarantined(
        &mut self,
        device_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Quarantined>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(|c| {
            let rows = c
                .client
                .query(
                    "SELECT device_id, received_at, epoch, seq, reason, detail, raw \
                     FROM quarantine WHERE $1::text IS NULL OR device_id = $1 \
                     ORDER BY received_at DESC, epoch DESC NULLS LAST, seq DESC NULLS LAST \
                     LIMIT $2",
                    &[&device_id, &limit],
                )
                .map_err(db)?;
            rows.iter()
                .map(|r| {
                    let id = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok());
                    let rx: PgTime = r.try_get(1).map_err(db)?;
                    Ok(Quarantined {
                        device_id: r.try_get(0).map_err(db)?,
                        received_at_ms: rx.0,
                        epoch: id(r.try_get(2).map_err(db)?),
                        seq: id(r.try_get(3).map_err(db)?),
                        reason: r.try_get(4).map_err(db)?,
                        detail: r.try_get(5).map_err(db)?,
                        raw: r.try_get(6).map_err(db)?,
                    })
                })
                .collect()
        })
    }

    fn quarantine_counts(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        self.with(|c| {
            let rows = c
                .client
                .query(
                    "SELECT device_id, count(*) FROM quarantine GROUP BY device_id",
                    &[],
                )
                .map_err(db)?;
            rows.iter()
                .map(|r| {
                    let n: i64 = r.try_get(1).map_err(db)?;
                    Ok((r.try_get(0).map_err(db)?, u64::try_from(n).unwrap_or(0)))
                })
                .collect()
        })
    }
}
