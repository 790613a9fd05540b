//! The periodic re-check of a dashboard's viewer token: every
//! `viewer_recheck`, a token that was revoked (or whose scope no longer
//! holds the device) closes its dashboards with 4001. The answer comes
//! from the tokens in memory ([`crate::auth::cache`]), which the
//! revocation poll keeps current: no store query per subscription.
//!
//! It fails closed: when the store has not confirmed the tokens for
//! longer than `auth_grace` (default 30 s), the token counts as revoked
//! (docs/decisions/hub-viewer-recheck.md).

use crate::auth::cache::Answer;
use crate::state::Shared;
use crate::store::{TokenHash, ViewerScope};

/// Whether the viewer token still opens `device_id`.
pub(super) fn viewer_still_allowed(shared: &Shared, device_id: &str, viewer: &TokenHash) -> bool {
    match shared.auth.viewer_now(viewer) {
        Answer::Yes(ViewerScope::AllDevices) => shared.auth.device_known(device_id),
        Answer::Yes(scope) => scope.allows(device_id),
        Answer::No | Answer::Unavailable => false,
    }
}
