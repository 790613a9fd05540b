//! The token change counter, the snapshot of every valid token, and admin
//! token management.

use std::collections::HashMap;

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::{db, SqliteStore};
use crate::store::{
    AdminInfo, AuthSnapshot, StoreError, TokenHash, TokenStore, ViewerScope, LAST_ADMIN,
};

/// A stored hash; a malformed one (not 32 bytes) matches no token.
fn hash_of(bytes: Vec<u8>) -> Option<TokenHash> {
    TokenHash::try_from(bytes.as_slice()).ok()
}

impl TokenStore for SqliteStore {
    fn token_changes(&mut self) -> Result<i64, StoreError> {
        self.conn
            .prepare_cached("SELECT n FROM token_changes WHERE id = 1")
            .map_err(db)?
            .query_row([], |r| r.get(0))
            .map_err(db)
    }

    fn auth_snapshot(&mut self) -> Result<AuthSnapshot, StoreError> {
        // One read transaction: the counter and the rows belong together.
        let tx = self.conn.transaction().map_err(db)?;
        let changes: i64 = tx
            .query_row("SELECT n FROM token_changes WHERE id = 1", [], |r| r.get(0))
            .map_err(db)?;
        let mut devices = Vec::new();
        {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT device_id, CASE WHEN revoked_ms IS NULL THEN token_hash END \
                     FROM devices",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, Option<Vec<u8>>>(1)?))
                })
                .map_err(db)?;
            for row in rows {
                let (id, hash) = row.map_err(db)?;
                devices.push((id, hash.and_then(hash_of)));
            }
        }
        let mut scopes: HashMap<i64, Vec<String>> = HashMap::new();
        {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT d.viewer_id, d.device_id FROM viewer_devices d \
                     JOIN viewers v ON v.viewer_id = d.viewer_id \
                     WHERE v.revoked_ms IS NULL AND NOT v.all_devices \
                     ORDER BY d.viewer_id, d.device_id",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
                .map_err(db)?;
            for row in rows {
                let (viewer, device) = row.map_err(db)?;
                scopes.entry(viewer).or_default().push(device);
            }
        }
        let mut viewers = Vec::new();
        {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT viewer_id, token_hash, name, all_devices FROM viewers \
                     WHERE revoked_ms IS NULL",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, bool>(3)?,
                    ))
                })
                .map_err(db)?;
            for row in rows {
                let (id, hash, name, all) = row.map_err(db)?;
                let scope = if all {
                    ViewerScope::AllDevices
                } else {
                    ViewerScope::Devices(scopes.remove(&id).unwrap_or_default())
                };
                if let Some(h) = hash_of(hash) {
                    viewers.push((h, name, scope));
                }
            }
        }
        let mut admins = Vec::new();
        {
            let mut stmt = tx
                .prepare_cached("SELECT token_hash, name FROM admins WHERE revoked_ms IS NULL")
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(db)?;
            for row in rows {
                let (hash, name) = row.map_err(db)?;
                if let Some(h) = hash_of(hash) {
                    admins.push((h, name));
                }
            }
        }
        tx.commit().map_err(db)?;
        Ok(AuthSnapshot {
            changes,
            devices,
            viewers,
            admins,
        })
    }

    fn list_admins(&mut self) -> Result<Vec<AdminInfo>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, created_ms, revoked_ms FROM admins ORDER BY name")
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(AdminInfo {
                    name: r.get(0)?,
                    created_ms: r.get(1)?,
                    revoked_ms: r.get(2)?,
                })
            })
            .map_err(db)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
    }

    fn revoke_admin(&mut self, name: &str, now_ms: i64) -> Result<(), StoreError> {
        // A write transaction from the start: two revocations at once
        // cannot both see the other admin as still active.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let state: Option<Option<i64>> = tx
            .query_row(
                "SELECT revoked_ms FROM admins WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        match state {
            None => return Err(StoreError::NotFound(format!("admin {name}"))),
            Some(Some(_)) => return Ok(()),
            Some(None) => {}
        }
        let others: i64 = tx
            .query_row(
                "SELECT count(*) FROM admins WHERE revoked_ms IS NULL AND name <> ?1",
                [name],
                |r| r.get(0),
            )
            .map_err(db)?;
        if others == 0 {
            return Err(StoreError::Conflict(LAST_ADMIN.into()));
        }
        tx.execute(
            "UPDATE admins SET revoked_ms = ?2 WHERE name = ?1",
            params![name, now_ms],
        )
        .map_err(db)?;
        tx.commit().map_err(db)
    }

    fn rotate_admin(&mut self, name: &str, hash: &TokenHash) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE admins SET token_hash = ?2, revoked_ms = NULL WHERE name = ?1",
                params![name, &hash[..]],
            )
            .map_err(db)?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("admin {name}")));
        }
        Ok(())
    }
}
