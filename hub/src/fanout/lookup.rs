//! The store look-ups of a dashboard session. A failed look-up is logged
//! and answered with `None`: the session decides what that means (keep the
//! subscriber, replay anyway, show no "last seen").

use crate::state::{CallError, Shared};
use crate::store::{Store, StoreError};

/// Runs a store query on the blocking pool.
pub(super) async fn query<T: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce(&mut dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Option<T> {
    match shared.store.call(f).await {
        Ok(v) => Some(v),
        Err(CallError::Store(e)) => {
            log::warn!("dashboard store query failed: {e}");
            None
        }
        Err(CallError::Task(e)) => {
            log::warn!("dashboard store query task failed: {e}");
            None
        }
    }
}
