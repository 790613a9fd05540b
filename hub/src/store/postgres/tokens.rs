//! The token change counter, the snapshot of every valid token, and admin
//! token management.

use std::collections::HashMap;

use postgres::IsolationLevel;

use super::{db, PgStore};
use crate::store::{
    AdminInfo, AuthSnapshot, StoreError, TokenHash, TokenStore, ViewerScope, LAST_ADMIN,
};

/// A stored hash; a malformed one (not 32 bytes) matches no token.
fn hash_of(bytes: Vec<u8>) -> Option<TokenHash> {
    TokenHash::try_from(bytes.as_slice()).ok()
}

impl TokenStore for PgStore {
    fn token_changes(&mut self) -> Result<i64, StoreError> {
        self.with(|c| {
            c.client
                .query_one("SELECT n FROM token_changes WHERE id = 1", &[])
                .and_then(|r| r.try_get(0))
                .map_err(db)
        })
    }

    fn auth_snapshot(&mut self) -> Result<AuthSnapshot, StoreError> {
        self.with(|c| {
            // One snapshot for the counter and the rows.
            let mut tx = c
                .client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(db)?;
            let changes: i64 = tx
                .query_one("SELECT n FROM token_changes WHERE id = 1", &[])
                .and_then(|r| r.try_get(0))
                .map_err(db)?;
            let mut devices = Vec::new();
            for r in tx
                .query(
                    "SELECT device_id, CASE WHEN revoked_ms IS NULL THEN token_hash END \
                     FROM devices",
                    &[],
                )
                .map_err(db)?
            {
                let id: String = r.try_get(0).map_err(db)?;
                let hash: Option<Vec<u8>> = r.try_get(1).map_err(db)?;
                devices.push((id, hash.and_then(hash_of)));
            }
            let mut scopes: HashMap<i64, Vec<String>> = HashMap::new();
            for r in tx
                .query(
                    "SELECT d.viewer_id, d.device_id FROM viewer_devices d \
                     JOIN viewers v ON v.viewer_id = d.viewer_id \
                     WHERE v.revoked_ms IS NULL AND NOT v.all_devices \
                     ORDER BY d.viewer_id, d.device_id",
                    &[],
                )
                .map_err(db)?
            {
                let viewer: i64 = r.try_get(0).map_err(db)?;
                scopes
                    .entry(viewer)
                    .or_default()
                    .push(r.try_get(1).map_err(db)?);
            }
            let mut viewers = Vec::new();
            for r in tx
                .query(
                    "SELECT viewer_id, token_hash, name, all_devices FROM viewers \
                     WHERE revoked_ms IS NULL",
                    &[],
                )
                .map_err(db)?
            {
                let id: i64 = r.try_get(0).map_err(db)?;
                let hash: Vec<u8> = r.try_get(1).map_err(db)?;
                let all: bool = r.try_get(3).map_err(db)?;
                let scope = if all {
                    ViewerScope::AllDevices
                } else {
                    ViewerScope::Devices(scopes.remove(&id).unwrap_or_default())
                };
                if let Some(h) = hash_of(hash) {
                    viewers.push((h, r.try_get(2).map_err(db)?, scope));
                }
            }
            let mut admins = Vec::new();
            for r in tx
                .query(
                    "SELECT token_hash, name FROM admins WHERE revoked_ms IS NULL",
                    &[],
                )
                .map_err(db)?
            {
                let hash: Vec<u8> = r.try_get(0).map_err(db)?;
                if let Some(h) = hash_of(hash) {
                    admins.push((h, r.try_get(1).map_err(db)?));
                }
            }
            tx.commit().map_err(db)?;
            Ok(AuthSnapshot {
                changes,
                devices,
                viewers,
                admins,
            })
        })
    }

    fn list_admins(&mut self) -> Result<Vec<AdminInfo>, StoreError> {
        self.with(|c| {
            c.client
                .query(
                    "SELECT name, created_ms, revoked_ms FROM admins ORDER BY name",
                    &[],
                )
                .map_err(db)?
                .iter()
                .map(|r| {
                    Ok(AdminInfo {
                        name: r.try_get(0).map_err(db)?,
                        created_ms: r.try_get(1).map_err(db)?,
                        revoked_ms: r.try_get(2).map_err(db)?,
                    })
                })
                .collect()
        })
    }

    fn revoke_admin(&mut self, name: &str, now_ms: i64) -> Result<(), StoreError> {
        self.with(|c| {
            let mut tx = c.client.transaction().map_err(db)?;
            // Lock every active admin (and this one): a concurrent
            // revocation waits here and then sees this one's outcome.
            let rows = tx
                .query(
                    "SELECT name, revoked_ms FROM admins \
                     WHERE revoked_ms IS NULL OR name = $1 FOR UPDATE",
                    &[&name],
                )
                .map_err(db)?;
            let mut found = None;
            let mut others = 0;
            for r in &rows {
                let n: String = r.try_get(0).map_err(db)?;
                let revoked: Option<i64> = r.try_get(1).map_err(db)?;
                if n == name {
                    found = Some(revoked);
                } else if revoked.is_none() {
                    others += 1;
                }
            }
            match found {
                None => return Err(StoreError::NotFound(format!("admin {name}"))),
                Some(Some(_)) => return Ok(()),
                Some(None) if others == 0 => return Err(StoreError::Conflict(LAST_ADMIN.into())),
                Some(None) => {}
            }
            tx.execute(
                "UPDATE admins SET revoked_ms = $2 WHERE name = $1",
                &[&name, &now_ms],
            )
            .map_err(db)?;
            tx.commit().map_err(db)
        })
    }

    fn rotate_admin(&mut self, name: &str, hash: &TokenHash) -> Result<(), StoreError> {
        self.with(|c| {
            let n = c
                .client
                .execute(
                    "UPDATE admins SET token_hash = $2, revoked_ms = NULL WHERE name = $1",
                    &[&name, &&hash[..]],
                )
                .map_err(db)?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("admin {name}")));
            }
            Ok(())
        })
    }
}
