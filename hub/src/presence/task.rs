//! The presence task: writes what [`Presence`] holds, renews the leases,
//! closes connections taken over on another hub; and the writes at start
//! and at a clean shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Presence;
use crate::mailbox::Kick;
use crate::shutdown::shutting_down;
use crate::state::{Shared, StoreHandle};
use crate::store::presence::PresenceSync;

/// At start: marks offline what a previous run under this hub id left
/// online (it did not shut down cleanly). A failure is only logged: the
/// leases end anyway.
pub(crate) async fn start(presence: &Presence, store: &StoreHandle) {
    let sync = PresenceSync {
        hub: presence.hub_id.clone(),
        now_ms: crate::store::now_ms(),
        all_offline: true,
        ..Default::default()
    };
    if let Err(e) = store.call(move |s| s.presence_sync(&sync)).await {
        log::warn!("presence: cannot clear what a previous run left online: {e}");
    }
}

/// At a clean shutdown, once every device connection is closed: writes
/// what is pending and marks every device of this hub offline.
pub(crate) async fn shutdown(presence: &Presence, store: &StoreHandle, lease: Duration) {
    let mut batch = presence.take(true);
    let mut sync = presence.sync(&mut batch, crate::store::now_ms(), lease);
    sync.all_offline = true;
    match store.call(move |s| s.presence_sync(&sync)).await {
        Ok(_) => log::info!("presence: this hub's devices marked offline"),
        Err(e) => {
            log::warn!("presence: cannot mark this hub's devices offline ({e}); their leases end")
        }
    }
}

/// Writes the presence changes and watches for cross-hub takeovers until
/// the hub shuts down.
pub(crate) async fn run(shared: Arc<Shared>, store: StoreHandle) {
    let cfg = &shared.config;
    let tick = cfg.presence_tick.max(Duration::from_millis(10));
    let presence = &shared.presence;
    let mut shutdown = shared.shutdown.clone();
    let mut since: Option<i64> = None;
    let mut last_flush = Instant::now();
    let mut last_renew = Instant::now();
    // Before the first write: what an earlier run under this id left.
    tokio::select! {
        _ = shutting_down(&mut shutdown) => return,
        _ = start(presence, &store) => {}
    }
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutting_down(&mut shutdown) => return,
            _ = tokio::time::sleep(tick) => {}
            _ = presence.wake.notified() => {}
        }
        let now = Instant::now();
        let flush = now.duration_since(last_flush) >= cfg.presence_flush;
        let renew = now.duration_since(last_renew) >= cfg.presence_renew;
        // A renewal carries the due updates: the store writes their rows
        // once, with the new lease.
        // Gathering a flush visits every changed device (all of them, at
        // 10,000 devices sending): on a blocking thread, not on the
        // worker that runs the device sessions.
        let gather = Arc::clone(&shared);
        let lease = cfg.presence_lease;
        let taken = tokio::task::spawn_blocking(move || {
            let presence = &gather.presence;
            let mut batch = presence.take(flush || renew);
            let sync = presence.sync(&mut batch, crate::store::now_ms(), lease);
            (batch, sync)
        })
        .await;
        let (batch, mut sync) = match taken {
            Ok(taken) => taken,
            Err(e) => {
                // Only a panic gets here; what it took is written by no
                // one, the next flush takes what changed after.
                log::error!("presence: gathering the changes failed: {e}");
                continue;
            }
        };
        if flush || renew {
            last_flush = now;
        }
        sync.renew = renew;
        sync.changes_since = since;
        let result = tokio::select! {
            r = store.call(move |s| s.presence_sync(&sync)) => r,
            _ = shutting_down(&mut shutdown) => {
                presence.restore(batch);
                return;
            }
        };
        match result {
            Ok(answer) => {
                if failing {
                    log::info!("presence: store reachable again");
                    failing = false;
                }
                if renew {
                    last_renew = now;
                }
                since = Some(since.unwrap_or(0).max(answer.max_generation));
                for (id, conn_id) in presence.settle(batch, &answer) {
                    if shared.registry.kick_conn(&id, conn_id, Kick::Replaced) {
                        log::warn!(
                            "device {id} connected to another hub; closing its connection here (4000 replaced)"
                        );
                    }
                }
            }
            Err(e) => {
                presence.restore(batch);
                if !failing {
                    log::error!("presence: cannot write the device state: {e}");
                    failing = true;
                }
            }
        }
    }
}
