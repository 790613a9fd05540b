//! Admin commands (`ems-hub device …`, `viewer …`, `admin …`) as a library.
//!
//! Owns the provisioning rules: ids are validated before the store is
//! touched, tokens are generated here from the OS CSPRNG, only their
//! SHA-256 reaches the store, and the plaintext is returned exactly once to
//! the caller (the CLI prints it as the only line on stdout). Nothing here
//! logs a token.

use thiserror::Error;

use crate::auth::token::{self, TokenError, TokenKind};
use crate::store::{self, DeviceInfo, Store, StoreError, ViewerScope};

/// Admin command failures.
#[derive(Debug, Error)]
pub enum AdminError {
    /// The store failed or refused (duplicate id, unknown id, …).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A device id, viewer name or admin name with bad syntax.
    #[error("invalid {what}: {source}")]
    BadId {
        /// "device id", "viewer name", …
        what: &'static str,
        /// What is wrong with it (never echoes the input).
        source: ems_shared::IdError,
    },
    /// A viewer scope with no devices in it.
    #[error("a viewer needs at least one --device ID, or --all-devices")]
    EmptyScope,
    /// No token could be generated.
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// The admin commands over one store.
pub struct Admin {
    /// The database the commands act on.
    store: Box<dyn Store>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

impl Admin {
    /// Opens the store at `url` (see [`store::open`]).
    pub fn open(url: &str) -> Result<Self, AdminError> {
        Ok(Admin {
            store: store::open(url)?,
        })
    }

    /// Admin commands over an already open store.
    pub fn with_store(store: Box<dyn Store>) -> Self {
        Admin { store }
    }

    /// Gives the store back.
    pub fn into_store(self) -> Box<dyn Store> {
        self.store
    }

    /// Provisions a device; returns its token (shown once, never stored).
    pub fn add_device(&mut self, device_id: &str) -> Result<String, AdminError> {
        check_id("device id", device_id)?;
        let t = token::try_generate(TokenKind::Device)?;
        self.store
            .add_device(device_id, &token::hash(&t), store::now_ms())?;
        Ok(t)
    }

    /// All devices, ordered by id.
    pub fn list_devices(&mut self) -> Result<Vec<DeviceInfo>, AdminError> {
        Ok(self.store.list_devices()?)
    }

    /// Revokes a device: its token stops working.
    pub fn revoke_device(&mut self, device_id: &str) -> Result<(), AdminError> {
        check_id("device id", device_id)?;
        Ok(self.store.revoke_device(device_id, store::now_ms())?)
    }

    /// Gives a device a new token (also un-revokes it); the old token
    /// stops working. Returns the new token.
    pub fn rotate_device(&mut self, device_id: &str) -> Result<String, AdminError> {
        check_id("device id", device_id)?;
        let t = token::try_generate(TokenKind::Device)?;
        self.store.rotate_device(device_id, &token::hash(&t))?;
        Ok(t)
    }

    /// Creates a viewer token for dashboards. Device ids in the scope are
    /// checked for syntax only, so a viewer may be created before the
    /// devices it will watch.
    pub fn add_viewer(&mut self, name: &str, scope: ViewerScope) -> Result<String, AdminError> {
        check_id("viewer name", name)?;
        if let ViewerScope::Devices(ids) = &scope {
            if ids.is_empty() {
                return Err(AdminError::EmptyScope);
            }
            for id in ids {
                check_id("device id", id)?;
            }
        }
        let t = token::try_generate(TokenKind::Viewer)?;
        self.store
            .add_viewer(name, &token::hash(&t), &scope, store::now_ms())?;
        Ok(t)
    }

    /// Revokes a viewer token by name.
    pub fn revoke_viewer(&mut self, name: &str) -> Result<(), AdminError> {
        check_id("viewer name", name)?;
        Ok(self.store.revoke_viewer(name, store::now_ms())?)
    }

    /// All viewers (names, scopes, times; never tokens).
    pub fn list_viewers(&mut self) -> Result<Vec<store::ViewerInfo>, AdminError> {
        Ok(self.store.list_viewers()?)
    }

    /// Creates an admin token for the admin API. Returns the token.
    pub fn add_admin(&mut self, name: &str) -> Result<String, AdminError> {
        check_id("admin name", name)?;
        let t = token::try_generate(TokenKind::Admin)?;
        self.store
            .add_admin(name, &token::hash(&t), store::now_ms())?;
        Ok(t)
    }

    /// All admins (names and times; never tokens).
    pub fn list_admins(&mut self) -> Result<Vec<store::AdminInfo>, AdminError> {
        Ok(self.store.list_admins()?)
    }

    /// Revokes an admin token by name; refused for the last active admin
    /// (add another first, or rotate this one).
    pub fn revoke_admin(&mut self, name: &str) -> Result<(), AdminError> {
        check_id("admin name", name)?;
        Ok(self.store.revoke_admin(name, store::now_ms())?)
    }

    /// Gives an admin a new token (also un-revokes it); the old token
    /// stops working. Returns the new token.
    pub fn rotate_admin(&mut self, name: &str) -> Result<String, AdminError> {
        check_id("admin name", name)?;
        let t = token::try_generate(TokenKind::Admin)?;
        self.store.rotate_admin(name, &token::hash(&t))?;
        Ok(t)
    }
}

/// Names of viewers and admins follow the device id syntax.
fn check_id(what: &'static str, id: &str) -> Result<(), AdminError> {
    ems_shared::validate_device_id(id).map_err(|source| AdminError::BadId { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin() -> (tempfile::TempDir, Admin) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("a.db").display());
        let a = Admin::open(&url).unwrap();
        (dir, a)
    }

    #[test]
    fn device_lifecycle() {
        let (_d, mut a) = admin();
        let t = a.add_device("ems_001").unwrap();
        assert_eq!(token::kind_of(&t), Some(TokenKind::Device));
        assert!(matches!(
            a.add_device("ems_001"),
            Err(AdminError::Store(StoreError::AlreadyExists(_)))
        ));
        let t2 = a.rotate_device("ems_001").unwrap();
        assert_ne!(t, t2);
        let mut s = a.into_store();
        assert!(!s.device_token_valid("ems_001", &token::hash(&t)).unwrap());
        assert!(s.device_token_valid("ems_001", &token::hash(&t2)).unwrap());
    }

    #[test]
    fn bad_ids_are_refused_before_the_store() {
        let (_d, mut a) = admin();
        for bad in ["", "a b", "../x", "ä"] {
            assert!(matches!(a.add_device(bad), Err(AdminError::BadId { .. })));
        }
        assert!(matches!(
            a.add_viewer("v", ViewerScope::Devices(vec![])),
            Err(AdminError::EmptyScope)
        ));
        assert!(matches!(
            a.add_viewer("v", ViewerScope::Devices(vec!["a/b".into()])),
            Err(AdminError::BadId { .. })
        ));
        assert!(matches!(
            a.revoke_device("nope"),
            Err(AdminError::Store(StoreError::NotFound(_)))
        ));
    }

    #[test]
    fn viewer_and_admin_tokens() {
        let (_d, mut a) = admin();
        let v = a
            .add_viewer("wall", ViewerScope::Devices(vec!["ems_001".into()]))
            .unwrap();
        assert_eq!(token::kind_of(&v), Some(TokenKind::Viewer));
        let ad = a.add_admin("ops").unwrap();
        assert_eq!(token::kind_of(&ad), Some(TokenKind::Admin));
        a.revoke_viewer("wall").unwrap();
        let mut s = a.into_store();
        assert_eq!(s.viewer_scope(&token::hash(&v)).unwrap(), None);
        assert_eq!(
            s.admin_name(&token::hash(&ad)).unwrap().as_deref(),
            Some("ops")
        );
    }

    #[test]
    fn admin_tokens_are_listed_rotated_and_revoked_but_one_stays() {
        let (_d, mut a) = admin();
        let ops = a.add_admin("ops").unwrap();
        assert!(matches!(
            a.revoke_admin("ops"),
            Err(AdminError::Store(StoreError::Conflict(_)))
        ));
        a.add_admin("night").unwrap();
        let ops2 = a.rotate_admin("ops").unwrap();
        a.revoke_admin("night").unwrap();
        // Revoking twice is fine; the last active one stays.
        a.revoke_admin("night").unwrap();
        assert!(a.revoke_admin("ops").is_err());
        let names: Vec<(String, bool)> = a
            .list_admins()
            .unwrap()
            .into_iter()
            .map(|i| (i.name, i.revoked_ms.is_some()))
            .collect();
        assert_eq!(names, vec![("night".into(), true), ("ops".into(), false)]);
        let mut s = a.into_store();
        assert_eq!(s.admin_name(&token::hash(&ops)).unwrap(), None);
        assert_eq!(
            s.admin_name(&token::hash(&ops2)).unwrap().as_deref(),
            Some("ops")
        );
    }

    #[test]
    fn debug_shows_no_secrets() {
        let (_d, a) = admin();
        assert_eq!(format!("{a:?}"), "Admin { .. }");
    }
}
