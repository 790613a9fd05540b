//! The look-ups and admin statements: token checks, provisioning and
//! history.

use std::sync::LazyLock;

use ems_shared::{Measured, Measurement, Reading};
use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::{db, is_unique_violation, SqliteStore};
use crate::store::columns::{select_columns, AFTER_MEASUREMENTS, FIRST_MEASUREMENT};
use crate::store::{
    ct_eq, AdminStore, AuthStore, DeviceInfo, HistoryStore, QuarantineStore, Quarantined,
    StoreError, StoredReading, TokenHash, ViewerInfo, ViewerScope,
};

impl AuthStore for SqliteStore {
    fn device_token_valid(
        &mut self,
        device_id: &str,
        hash: &TokenHash,
    ) -> Result<bool, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT token_hash FROM devices WHERE device_id = ?1 AND revoked_ms IS NULL",
            )
            .map_err(db)?;
        let stored: Option<Vec<u8>> = stmt
            .query_row([device_id], |r| r.get(0))
            .optional()
            .map_err(db)?;
        Ok(stored.is_some_and(|s| ct_eq(&s, hash)))
    }

    fn viewer_scope(&mut self, hash: &TokenHash) -> Result<Option<ViewerScope>, StoreError> {
        let found: Option<(i64, bool)> = self
            .conn
            .prepare_cached(
                "SELECT viewer_id, all_devices FROM viewers \
                 WHERE token_hash = ?1 AND revoked_ms IS NULL",
            )
            .map_err(db)?
            .query_row([&hash[..]], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(db)?;
        let Some((viewer_id, all)) = found else {
            return Ok(None);
        };
        if all {
            return Ok(Some(ViewerScope::AllDevices));
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT device_id FROM viewer_devices WHERE viewer_id = ?1 ORDER BY device_id",
            )
            .map_err(db)?;
        let ids = stmt
            .query_map([viewer_id], |r| r.get(0))
            .map_err(db)?
            .collect::<rusqlite::Result<Vec<String>>>()
            .map_err(db)?;
        Ok(Some(ViewerScope::Devices(ids)))
    }

    fn admin_name(&mut self, hash: &TokenHash) -> Result<Option<String>, StoreError> {
        self.conn
            .prepare_cached("SELECT name FROM admins WHERE token_hash = ?1 AND revoked_ms IS NULL")
            .map_err(db)?
            .query_row([&hash[..]], |r| r.get(0))
            .optional()
            .map_err(db)
    }

    fn active_device_tokens(&mut self) -> Result<Vec<(String, TokenHash)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT device_id, token_hash FROM devices WHERE revoked_ms IS NULL")
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(db)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, hash) = row.map_err(db)?;
            // A malformed stored hash matches no token: leave it out, so a
            // connection of that device is closed rather than trusted.
            if let Ok(h) = TokenHash::try_from(hash.as_slice()) {
                out.push((id, h));
            }
        }
        Ok(out)
    }

    fn device_exists(&mut self, device_id: &str) -> Result<bool, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT 1 FROM devices WHERE device_id = ?1")
            .map_err(db)?;
        stmt.exists([device_id]).map_err(db)
    }
}

impl AdminStore for SqliteStore {
    fn add_device(
        &mut self,
        device_id: &str,
        hash: &TokenHash,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        match self.conn.execute(
            "INSERT INTO devices (device_id, token_hash, created_ms) VALUES (?1, ?2, ?3)",
            params![device_id, &hash[..], now_ms],
        ) {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => {
                Err(StoreError::AlreadyExists(format!("device {device_id}")))
            }
            Err(e) => Err(db(e)),
        }
    }

    fn list_devices(&mut self) -> Result<Vec<DeviceInfo>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT device_id, created_ms, revoked_ms FROM devices ORDER BY device_id",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(DeviceInfo {
                    device_id: r.get(0)?,
                    created_ms: r.get(1)?,
                    revoked_ms: r.get(2)?,
                })
            })
            .map_err(db)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
    }

    fn revoke_device(&mut self, device_id: &str, now_ms: i64) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE devices SET revoked_ms = COALESCE(revoked_ms, ?2) WHERE device_id = ?1",
                params![device_id, now_ms],
            )
            .map_err(db)?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("device {device_id}")));
        }
        Ok(())
    }

    fn rotate_device(&mut self, device_id: &str, hash: &TokenHash) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE devices SET token_hash = ?2, revoked_ms = NULL WHERE device_id = ?1",
                params![device_id, &hash[..]],
            )
            .map_err(db)?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("device {device_id}")));
        }
        Ok(())
    }

    fn add_viewer(
        &mut self,
        name: &str,
        hash: &TokenHash,
        scope: &ViewerScope,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let all = matches!(scope, ViewerScope::AllDevices);
        match tx.execute(
            "INSERT INTO viewers (name, token_hash, all_devices, created_ms) \
             VALUES (?1, ?2, ?3, ?4)",
            params![name, &hash[..], all, now_ms],
        ) {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::AlreadyExists(format!("viewer {name}")))
            }
            Err(e) => return Err(db(e)),
        }
        if let ViewerScope::Devices(ids) = scope {
            let viewer_id = tx.last_insert_rowid();
            let mut stmt = tx
                .prepare(
                    "INSERT INTO viewer_devices (viewer_id, device_id) VALUES (?1, ?2) \
                     ON CONFLICT DO NOTHING",
                )
                .map_err(db)?;
            for id in ids {
                stmt.execute(params![viewer_id, id]).map_err(db)?;
            }
        }
        tx.commit().map_err(db)
    }

    fn list_viewers(&mut self) -> Result<Vec<ViewerInfo>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT v.name, v.all_devices, v.created_ms, v.revoked_ms, d.device_id \
                 FROM viewers v LEFT JOIN viewer_devices d ON d.viewer_id = v.viewer_id \
                 ORDER BY v.name, d.device_id",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })
            .map_err(db)?;
        let mut out: Vec<ViewerInfo> = Vec::new();
        for row in rows {
            let (name, all, created_ms, revoked_ms, device) = row.map_err(db)?;
            if out.last().map(|v| v.name != name).unwrap_or(true) {
                out.push(ViewerInfo {
                    name,
                    scope: if all {
                        ViewerScope::AllDevices
                    } else {
                        ViewerScope::Devices(Vec::new())
                    },
                    created_ms,
                    revoked_ms,
                });
            }
            if let (Some(v), Some(d)) = (out.last_mut(), device) {
                if let ViewerScope::Devices(ids) = &mut v.scope {
                    ids.push(d);
                }
            }
        }
        Ok(out)
    }

    fn revoke_viewer(&mut self, name: &str, now_ms: i64) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE viewers SET revoked_ms = COALESCE(revoked_ms, ?2) WHERE name = ?1",
                params![name, now_ms],
            )
            .map_err(db)?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("viewer {name}")));
        }
        Ok(())
    }

    fn add_admin(&mut self, name: &str, hash: &TokenHash, now_ms: i64) -> Result<(), StoreError> {
        match self.conn.execute(
            "INSERT INTO admins (name, token_hash, created_ms) VALUES (?1, ?2, ?3)",
            params![name, &hash[..], now_ms],
        ) {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => {
                Err(StoreError::AlreadyExists(format!("admin {name}")))
            }
            Err(e) => Err(db(e)),
        }
    }
}

impl HistoryStore for SqliteStore {
    fn readings(
        &mut self,
        device_id: &str,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<Reading>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare_cached(&SELECT_READINGS).map_err(db)?;
        let rows = stmt
            .query_map(params![device_id, from_ms, to_ms, limit], reading_of)
            .map_err(db)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
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
        let sql = if newest {
            &SELECT_HISTORY_NEWEST
        } else {
            &SELECT_HISTORY_OLDEST
        };
        let mut stmt = self.conn.prepare_cached(sql).map_err(db)?;
        let rows = stmt
            .query_map(params![device_id, from_ms, to_ms, limit], |r| {
                Ok(StoredReading {
                    reading: reading_of(r)?,
                    received_at_ms: r.get(AFTER_MEASUREMENTS)?,
                    flags: r.get::<_, i64>(AFTER_MEASUREMENTS + 1)? as u32,
                })
            })
            .map_err(db)?;
        let mut out = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)?;
        if newest {
            out.reverse();
        }
        Ok(out)
    }

    fn last_seen(&mut self, device_id: &str) -> Result<Option<i64>, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT received_at FROM readings WHERE device_id = ?1 ORDER BY ts DESC LIMIT 1",
            )
            .map_err(db)?
            .query_row([device_id], |r| r.get(0))
            .optional()
            .map_err(db)
    }
}

/// A device's readings in a time range, oldest first.
static SELECT_READINGS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM readings WHERE device_id = ?1 AND ts >= ?2 AND ts < ?3 \
         ORDER BY ts, epoch, seq LIMIT ?4",
        select_columns()
    )
});

/// [`SELECT_READINGS`] plus `received_at` and `flags`, in `order`.
fn select_history(order: &str) -> String {
    format!(
        "SELECT {}, received_at, flags FROM readings \
         WHERE device_id = ?1 AND ts >= ?2 AND ts < ?3 \
         ORDER BY ts {order}, epoch {order}, seq {order} LIMIT ?4",
        select_columns()
    )
}

static SELECT_HISTORY_OLDEST: LazyLock<String> = LazyLock::new(|| select_history("ASC"));
static SELECT_HISTORY_NEWEST: LazyLock<String> = LazyLock::new(|| select_history("DESC"));

/// The reading in a row of [`crate::store::columns::select_columns`].
pub(super) fn reading_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Reading> {
    let mut reading = Reading {
        epoch: r.get::<_, i64>(0)? as u64,
        seq: r.get::<_, i64>(1)? as u64,
        ts_ms: r.get(2)?,
        meter: r.get(3)?,
        ..Default::default()
    };
    for m in Measurement::ALL {
        reading.set(m, r.get(FIRST_MEASUREMENT + m.index())?);
    }
    Ok(reading)
}

impl QuarantineStore for SqliteStore {
    fn quarantined(
        &mut self,
        device_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Quarantined>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // NULL epoch/seq sort last in descending order.
        let sql = match device_id {
            Some(_) => {
                "SELECT device_id, received_at, epoch, seq, reason, detail, raw FROM quarantine \
                 WHERE device_id = ?1 ORDER BY received_at DESC, epoch DESC, seq DESC LIMIT ?2"
            }
            None => {
                "SELECT device_id, received_at, epoch, seq, reason, detail, raw FROM quarantine \
                 WHERE ?1 IS NULL ORDER BY received_at DESC, epoch DESC, seq DESC LIMIT ?2"
            }
        };
        let mut stmt = self.conn.prepare_cached(sql).map_err(db)?;
        let rows = stmt
            .query_map(params![device_id, limit], |r| {
                let id = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok());
                Ok(Quarantined {
                    device_id: r.get(0)?,
                    received_at_ms: r.get(1)?,
                    epoch: id(r.get(2)?),
                    seq: id(r.get(3)?),
                    reason: r.get(4)?,
                    detail: r.get(5)?,
                    raw: r.get(6)?,
                })
            })
            .map_err(db)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
    }

    fn quarantine_counts(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT device_id, count(*) FROM quarantine GROUP BY device_id")
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(db)?;
        rows.map(|r| r.map(|(d, n)| (d, u64::try_from(n).unwrap_or(0))))
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db)
    }
}
