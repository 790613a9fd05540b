//! The hub's shutdown flag: a `watch` channel that [`crate::run`] flips to
//! `true` once, and that every connection, the revocation poll and the
//! store writer wait on.

use tokio::sync::watch;

/// Completes once `flag` is `true` (or its sender is gone).
pub(crate) async fn shutting_down(flag: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it right here.
    let _ = flag.wait_for(|s| *s).await.map(|_| ());
}
