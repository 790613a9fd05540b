//! The periodic re-check of a dashboard's viewer token: every
//! `viewer_recheck`, a token that was revoked (or whose scope no longer
//! holds the device) closes its dashboards with 4001. One store query per
//! token and interval, shared by all of the token's subscriptions.

use std::sync::Arc;
use std::time::Duration;

use super::lookup::query;
use crate::state::Shared;
use crate::store::{TokenHash, ViewerScope};

/// Whether the viewer token still opens `device_id`. A store failure
/// counts as yes: revocation is re-checked at the next interval.
pub(super) async fn viewer_still_allowed(
    shared: Arc<Shared>,
    device_id: Arc<str>,
    viewer: TokenHash,
) -> bool {
    // One store query per viewer token per `viewer_recheck`, shared by all
    // its subscriptions (9,600 subscriptions each querying every 2 s made
    // the periodic re-check the hub's largest cost). The key includes the
    // hub's store handle, so hubs in one process never share.
    //
    // Single flight: when an entry expires, the first subscription to see
    // it refreshes it and the others keep using the previous answer until
    // then. Without that, every subscription whose tick fell between the
    // expiry and the end of the query queued its own query behind the one
    // store lock, which made the query slower still: stalls of 0.3-0.5 s
    // were measured (docs/decisions/hub-viewer-recheck.md).
    let key = (shared.store.id(), viewer);
    let ttl = shared.config.viewer_recheck;
    let known = {
        let mut c = VIEWER_CACHE.lock().unwrap_or_else(|p| p.into_inner());
        match c.get_mut(&key) {
            Some(e) if e.at.elapsed() < ttl => Some(e.scope.clone()),
            // Another subscription is fetching; a refresh that never ended
            // (its task was dropped) is taken over after a while.
            Some(e) if e.refreshing.is_some_and(|t| t.elapsed() < REFRESH_TAKEOVER) => {
                Some(e.scope.clone())
            }
            Some(e) => {
                e.refreshing = Some(std::time::Instant::now());
                None
            }
            None => None,
        }
    };
    let scope = match known {
        Some(scope) => scope,
        None => {
            let fetched = query(&shared, move |s| s.viewer_scope(&viewer)).await;
            let mut c = VIEWER_CACHE.lock().unwrap_or_else(|p| p.into_inner());
            match fetched {
                Some(scope) => {
                    if c.len() > 4096 {
                        c.retain(|_, e| e.at.elapsed() < ttl || e.refreshing.is_some());
                    }
                    c.insert(
                        key,
                        CachedViewer {
                            at: std::time::Instant::now(),
                            scope: scope.clone(),
                            refreshing: None,
                        },
                    );
                    scope
                }
                None => {
                    // Store trouble: keep the subscriber (as before) and let
                    // the next tick try again.
                    if let Some(e) = c.get_mut(&key) {
                        e.refreshing = None;
                    }
                    return true;
                }
            }
        }
    };
    scope.is_some_and(|sc| sc.allows(&device_id))
}

/// A viewer look-up shared by the subscriptions of one token.
struct CachedViewer {
    /// When it was fetched.
    at: std::time::Instant,
    /// What the store said.
    scope: Option<ViewerScope>,
    /// Since when a subscription is fetching a fresh answer.
    refreshing: Option<std::time::Instant>,
}

/// After this long, a viewer refresh still marked as running is presumed
/// lost and another subscription runs it.
const REFRESH_TAKEOVER: Duration = Duration::from_secs(10);

/// Recent viewer look-ups: (hub store handle, token hash) → look-up.
type ViewerCache = std::collections::HashMap<(usize, TokenHash), CachedViewer>;
static VIEWER_CACHE: std::sync::LazyLock<std::sync::Mutex<ViewerCache>> =
    std::sync::LazyLock::new(|| std::sync::Mutex::new(ViewerCache::new()));
