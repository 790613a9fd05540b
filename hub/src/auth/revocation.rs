//! Live revocation and rotation: a background task that polls the store
//! every `revocation_poll` (default 1 s) for the current token of every
//! device and closes, with 4001, each live connection whose token was
//! revoked, rotated or whose device was deleted — also when the admin
//! command ran in another process (`ems-hub device revoke` against the same
//! database), which the hub has no other way to learn about.
//!
//! Worst case from the admin command's commit to the close frame: one poll
//! interval plus one store query plus a scheduler tick (≈ 1.1 s with the
//! defaults). In-process changes (the admin API) call
//! [`crate::fanout::registry::Registry::kick`] and close at once.
//!
//! The poll doubles as the store health check behind `/readyz`: its outcome
//! sets `Metrics::store_poll_ok`, so an idle hub notices a lost database.
//!
//! With an MQTT bridge, the poll also tells it the set of devices that may
//! connect, after the first successful query and whenever the set changed
//! (never after a failed one), so a device revoked from another process
//! disappears from Home Assistant too.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::time::MissedTickBehavior;

use crate::fanout::registry::Kick;
use crate::mqtt::MqttHandle;
use crate::state::{CallError, Shared};
use crate::store::TokenHash;

/// Polls until the hub shuts down.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut tick = tokio::time::interval(
        shared
            .config
            .revocation_poll
            .max(std::time::Duration::from_millis(10)),
    );
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    // The device ids last told to the MQTT bridge.
    let mut mqtt_known: Option<HashSet<String>> = None;
    loop {
        tokio::select! {
            _ = crate::shutdown::shutting_down(&mut shutdown) => return,
            _ = tick.tick() => {}
        }
        // The query, the map of 10,000+ tokens and the comparison all run
        // on the blocking pool: on a worker they would stall every live
        // frame behind them once per poll. The comparison runs after the
        // store's lock is released, so handshakes waiting for a token
        // look-up wait for the query only (docs/decisions/hub-revocation-poll.md).
        let list = match shared.store.call(|s| s.active_device_tokens()).await {
            Ok(list) => {
                if failing {
                    log::info!("revocation poll: store reachable again");
                    failing = false;
                }
                shared.metrics.store_poll_ok.store(1, Ordering::Relaxed);
                list
            }
            Err(CallError::Store(e)) => {
                if !failing {
                    log::error!("revocation poll: store unreachable: {e}");
                    failing = true;
                }
                shared.metrics.store_poll_ok.store(0, Ordering::Relaxed);
                continue;
            }
            Err(CallError::Task(e)) => {
                log::error!("revocation poll task failed: {e}");
                continue;
            }
        };
        let list = match &shared.mqtt {
            Some(m) => match mqtt_active_devices(m, list, &mut mqtt_known).await {
                Some(list) => list,
                None => continue,
            },
            None => list,
        };
        let sh = shared.clone();
        let stale = match tokio::task::spawn_blocking(move || stale_connections(&sh, list)).await {
            Ok(stale) => stale,
            Err(e) => {
                log::error!("revocation poll task failed: {e}");
                continue;
            }
        };
        for device_id in stale {
            if shared.registry.kick(&device_id, Kick::Revoked) {
                log::info!("device {device_id}: token no longer valid in the store; closing its connection (4001)");
            }
        }
    }
}

/// Tells the MQTT bridge the devices that may connect (those in `list`)
/// unless they are the ones it was last told (`known`). Compares on the
/// blocking pool and hands `list` back (`None`: that task failed).
async fn mqtt_active_devices(
    mqtt: &MqttHandle,
    list: Vec<(String, TokenHash)>,
    known: &mut Option<HashSet<String>>,
) -> Option<Vec<(String, TokenHash)>> {
    let (mqtt, prev) = (mqtt.clone(), known.take());
    let task = tokio::task::spawn_blocking(move || {
        let unchanged = prev
            .as_ref()
            .is_some_and(|p| p.len() == list.len() && list.iter().all(|(d, _)| p.contains(d)));
        if unchanged {
            return (list, prev);
        }
        let ids: HashSet<String> = list.iter().map(|(d, _)| d.clone()).collect();
        mqtt.active_devices(ids.iter().cloned());
        (list, Some(ids))
    });
    match task.await {
        Ok((list, ids)) => {
            *known = ids;
            Some(list)
        }
        Err(e) => {
            log::error!("revocation poll task failed: {e}");
            None
        }
    }
}

/// The live device connections whose token is not `current` in the store:
/// revoked, rotated, or the device deleted.
fn stale_connections(shared: &Shared, current: Vec<(String, TokenHash)>) -> Vec<Arc<str>> {
    let current: HashMap<String, TokenHash> = current.into_iter().collect();
    shared
        .registry
        .device_tokens()
        .into_iter()
        .filter_map(|(device_id, token)| {
            let token = token?;
            let valid = current
                .get(&*device_id)
                .is_some_and(|h| crate::store::ct_eq(h, &token));
            (!valid).then_some(device_id)
        })
        .collect()
}
