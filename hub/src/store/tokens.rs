//! Every valid token at once, and whether any changed: what the hub's
//! in-memory authentication ([`crate::auth::cache`]) is loaded from, plus
//! the management of admin tokens (list, revoke, rotate).
//!
//! The change counter (`token_changes`) is one integer that triggers in
//! the database bump, in the same transaction, on every insert, update or
//! delete of a device's token or state, a viewer, a viewer's scope or an
//! admin — whoever makes the change (this hub, another hub, the admin CLI,
//! hand-written SQL). Reading it is one indexed row; the hub reads the
//! whole [`AuthSnapshot`] only when it moved.

use super::{StoreError, TokenHash, ViewerScope};

/// Every token that opens something, read in one transaction together with
/// the change counter it belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthSnapshot {
    /// The change counter this snapshot was read at.
    pub changes: i64,
    /// Every device id ever added, with its current token hash when it is
    /// not revoked.
    pub devices: Vec<(String, Option<TokenHash>)>,
    /// Unrevoked viewers: token hash, name, scope.
    pub viewers: Vec<(TokenHash, String, ViewerScope)>,
    /// Unrevoked admins: token hash, name.
    pub admins: Vec<(TokenHash, String)>,
}

/// An admin token as `admin list` and the admin API show it (never the
/// token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminInfo {
    /// Admin name.
    pub name: String,
    /// Creation time, Unix ms.
    pub created_ms: i64,
    /// Revocation time, Unix ms, if revoked.
    pub revoked_ms: Option<i64>,
}

/// The change counter, the snapshot behind it, and admin token management.
pub trait TokenStore: Send {
    /// The change counter: it moves (in the committing transaction) with
    /// every change to devices, viewers, viewer scopes or admins.
    fn token_changes(&mut self) -> Result<i64, StoreError>;

    /// Every device, unrevoked viewer and unrevoked admin with the counter
    /// value they were read at, in one consistent read.
    fn auth_snapshot(&mut self) -> Result<AuthSnapshot, StoreError>;

    /// All admins (names and times), ordered by name.
    fn list_admins(&mut self) -> Result<Vec<AdminInfo>, StoreError>;

    /// Revokes an admin token by name. `NotFound` if unknown; `Conflict` when
    /// it is the last unrevoked admin (someone must be able to administer).
    fn revoke_admin(&mut self, name: &str, now_ms: i64) -> Result<(), StoreError>;

    /// Replaces an admin's token hash (and un-revokes it). `NotFound` if
    /// unknown.
    fn rotate_admin(&mut self, name: &str, hash: &TokenHash) -> Result<(), StoreError>;
}

/// The message of the `Conflict` answer to revoking the last active admin.
pub(crate) const LAST_ADMIN: &str =
    "cannot revoke the last active admin: add another admin first, or rotate this one";
