//! The hub's shutdown flag: a `watch` channel that [`crate::run`] flips to
//! `true` once, and that every dashboard connection, the revocation poll,
//! the heartbeat and the store writer wait on. Device connections hear it
//! through their mailboxes (`Registry::shut_down`).

use tokio::sync::watch;

/// Completes once `flag` is `true` (or its sender is gone).
pub(crate) async fn shutting_down(flag: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it right here.
    let _ = flag.wait_for(|s| *s).await.map(|_| ());
}
