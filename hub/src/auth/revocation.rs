//! Live revocation and rotation: a background task that keeps the tokens
//! in memory ([`super::cache`]) current and closes, with 4001, each live
//! device connection whose token was revoked, rotated or whose device was
//! deleted — also when the change was made by another process (`ems-hub
//! device revoke` against the same database, another hub), which the hub
//! has no other way to learn about.
//!
//! Every `revocation_poll` (default 1 s), or sooner when a look-up missed,
//! it reads the store's change counter: one integer. Only when the counter
//! moved does it read every token again and compare the live connections
//! with them. Worst case from the admin command's commit to the close
//! frame: one poll interval plus two small queries and a scheduler tick
//! (≈ 1.1 s with the defaults). In-process changes (the admin API) call
//! [`crate::fanout::registry::Registry::kick`] and close at once
//! (docs/decisions/hub-revocation-poll.md, hub-tokens-in-memory.md).
//!
//! The poll doubles as the store health check behind `/readyz`: its outcome
//! sets `Metrics::store_poll_ok`, so an idle hub notices a lost database.
//! A read that does not return within two intervals (at least 2 s) counts
//! as a failure while it goes on.
//!
//! With an MQTT bridge, the poll also tells it the set of devices that may
//! connect, after the first successful read and whenever the set changed
//! (never after a failed one), so a device revoked from another process
//! disappears from Home Assistant too.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cache::Snapshot;
use crate::mailbox::Kick;
use crate::mqtt::MqttHandle;
use crate::shutdown::shutting_down;
use crate::state::{CallError, Shared};

/// Polls until the hub shuts down.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let every = shared.config.revocation_poll.max(Duration::from_millis(10));
    let slow = (every * 2).max(Duration::from_secs(2));
    let metrics = shared.metrics.clone();
    let mut failing = false;
    // The device ids last told to the MQTT bridge.
    let mut mqtt_known: Option<HashSet<String>> = None;
    let mut last = Instant::now()
        .checked_sub(every)
        .unwrap_or_else(Instant::now);
    loop {
        tokio::select! {
            _ = shutting_down(&mut shutdown) => return,
            _ = shared.auth.due(every, last) => {}
        }
        last = Instant::now();
        let read = shared.auth.read();
        tokio::pin!(read);
        let mut overdue = false;
        let result = loop {
            tokio::select! {
                r = &mut read => break r,
                _ = shutting_down(&mut shutdown) => return,
                _ = tokio::time::sleep(slow), if !overdue => {
                    overdue = true;
                    metrics.store_poll_ok.store(0, Ordering::Relaxed);
                    if !failing {
                        log::error!("revocation poll: the store has not answered for {slow:?}");
                        failing = true;
                    }
                }
            }
        };
        metrics
            .hardening
            .token_reads
            .fetch_add(1, Ordering::Relaxed);
        let reloaded = match result {
            Ok(reloaded) => {
                if failing {
                    log::info!("revocation poll: store reachable again");
                    failing = false;
                }
                metrics.store_poll_ok.store(1, Ordering::Relaxed);
                reloaded
            }
            Err(CallError::Store(e)) => {
                if !failing {
                    log::error!("revocation poll: store unreachable: {e}");
                    failing = true;
                }
                metrics.store_poll_ok.store(0, Ordering::Relaxed);
                continue;
            }
            Err(CallError::Task(e)) => {
                log::error!("revocation poll task failed: {e}");
                continue;
            }
        };
        let Some(snapshot) = reloaded else { continue };
        metrics
            .hardening
            .token_reloads
            .fetch_add(1, Ordering::Relaxed);
        let held = i64::try_from(shared.auth.held()).unwrap_or(i64::MAX);
        metrics.hardening.tokens_held.store(held, Ordering::Relaxed);
        // The comparison with every live connection (and, with an MQTT
        // bridge, with the devices it was last told) runs on the blocking
        // pool: on a worker it would stall the live frames behind it.
        let (sh, prev) = (shared.clone(), mqtt_known.take());
        let task = tokio::task::spawn_blocking(move || {
            let stale = stale_connections(&sh, &snapshot);
            let known = match &sh.mqtt {
                Some(m) => mqtt_active_devices(m, &snapshot, prev),
                None => None,
            };
            (stale, known)
        });
        let stale = match task.await {
            Ok((stale, known)) => {
                mqtt_known = known;
                stale
            }
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

/// Tells the MQTT bridge the devices that may connect (the unrevoked ones
/// in `snapshot`) unless they are the ones it was last told (`known`).
/// Returns what it knows now. Runs on the blocking pool.
fn mqtt_active_devices(
    mqtt: &MqttHandle,
    snapshot: &Snapshot,
    known: Option<HashSet<String>>,
) -> Option<HashSet<String>> {
    let ids: HashSet<String> = snapshot.active_ids().map(str::to_owned).collect();
    if known.as_ref() == Some(&ids) {
        return known;
    }
    mqtt.active_devices(ids.iter().cloned());
    Some(ids)
}

/// The live device connections whose token is not current in `snapshot`:
/// revoked, rotated, or the device deleted. (A connection registered after
/// this scan checks the snapshot itself: see the device session's start.)
fn stale_connections(shared: &Shared, snapshot: &Snapshot) -> Vec<Arc<str>> {
    shared
        .registry
        .device_tokens()
        .into_iter()
        .filter_map(|(device_id, token)| {
            let token = token?;
            (!snapshot.device_valid(&device_id, &token)).then_some(device_id)
        })
        .collect()
}
