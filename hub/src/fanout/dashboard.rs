//! The dashboard session: one subscriber of one device's live topic, from
//! the upgrade to the close.
//!
//! What a subscriber receives, in order:
//! 1. `{"type":"status",…}`: the device's presence, right after the
//!    upgrade; again whenever the device connects or disconnects (the
//!    registry publishes those through the same topic as the readings, so
//!    presence and readings stay in order).
//! 2. With `ems.resume.<since_ms>` offered at the handshake: the stored
//!    readings with `ts_ms >= since_ms`, oldest first, then
//!    `{"type":"replay_end",…}` ([`super::resume`]).
//! 3. The live feed: every reading as the device sent it (plus `device_id`
//!    and `rx_ms`), except backlog readings: the device's session counts a
//!    reading whose `rx_ms − ts_ms` exceeds `backfill_after` instead of
//!    publishing it, and publishes at most one
//!    `{"type":"backfill","count":…,"from_ts_ms":…,"to_ts_ms":…}` per
//!    `backfill_interval` (and before its next fresh reading;
//!    [`super::backfill`]).
//!
//! Every `viewer_recheck` the session re-checks its viewer token; a revoked
//! token (or one whose scope no longer includes the device, or one the
//! store has not confirmed within `auth_grace`) closes the socket with 4001
//! ([`super::recheck`]). The heartbeat pings every `ping_interval`, each
//! ping bounded by the write timeout like every other write; after
//! `max_missed_pongs` unanswered pings the subscriber is dead and dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ems_shared::DashboardFrame;
use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use super::feed::Feed;
use super::lookup::query;
use super::recheck::viewer_still_allowed;
use crate::metrics::Role;
use crate::shutdown::shutting_down;
use crate::state::Shared;
use crate::store::TokenHash;
use crate::ws::{self, End, Ws};

/// How a dashboard connection was opened.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FeedOptions {
    /// `ems.resume.<since_ms>`: replay stored readings from then.
    pub resume_since: Option<i64>,
    /// Hash of the viewer token, re-checked periodically.
    pub viewer: TokenHash,
}

/// Serves one dashboard subscriber until it ends.
pub(crate) async fn run(
    ws: Ws,
    device_id: Arc<str>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    opts: FeedOptions,
) {
    // Subscribe first: no presence change or reading after this point can
    // be missed.
    let topic = shared.registry.topic(&device_id).subscribe();
    log::info!("dashboard for {device_id} connected from {peer}");
    let mut feed = Feed::new(ws, device_id, peer, shared, topic);
    let end = match start(&mut feed, opts).await {
        Ok(()) => live(&mut feed, opts).await,
        Err(e) => e,
    };
    if let End::Close(code, reason) = end {
        ws::close(&mut feed.ws, code, reason).await;
    }
    log::info!(
        "dashboard for {} from {} disconnected",
        feed.device_id,
        feed.peer
    );
}

/// Initial status, then the replay when asked for.
async fn start(feed: &mut Feed, opts: FeedOptions) -> Result<(), End> {
    let status = status_of(&feed.shared, &feed.device_id).await;
    feed.send(status.to_json().into()).await?;
    if let Some(since) = opts.resume_since {
        feed.replay(since, opts.viewer).await?;
    }
    Ok(())
}

/// The presence of `device_id` now, as a `status` frame.
async fn status_of(shared: &Arc<Shared>, device_id: &Arc<str>) -> DashboardFrame {
    let id = device_id.clone();
    let stored = query(shared, move |s| s.last_seen(&id)).await.flatten();
    let online = shared.registry.is_online(device_id);
    let last_seen_ms = match (stored, shared.registry.presence_ms(device_id)) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let edge = shared.registry.edge_status(device_id);
    let now = crate::store::now_ms();
    DashboardFrame::Status {
        device_id: device_id.to_string(),
        online,
        last_seen_ms,
        outbox_depth: edge.as_ref().map(|e| e.status.outbox_depth),
        losses: edge.as_ref().map(|e| (&e.status).into()),
        behind_ms: edge.map(|e| {
            e.behind_ms
                .saturating_add(now.saturating_sub(e.rx_ms).max(0))
        }),
    }
}

/// The live loop: topic frames, the viewer re-check,
/// the heartbeat and the client's own frames, until one of them ends the
/// session.
async fn live(feed: &mut Feed, opts: FeedOptions) -> End {
    let cfg = &feed.shared.config;
    let max_missed_pongs = cfg.max_missed_pongs;
    let mut ping = ws::heartbeat(cfg.ping_interval);
    let mut recheck = ws::heartbeat(cfg.viewer_recheck.max(Duration::from_millis(50)));
    let mut shutdown = feed.shared.shutdown.clone();
    // Created once: a fresh `watch::changed` future per loop turn would
    // register and remove a waiter on the one watch every session shares.
    let stopping = shutting_down(&mut shutdown);
    tokio::pin!(stopping);
    loop {
        let step: Result<(), End> = tokio::select! {
            biased;
            _ = &mut stopping => Err(End::Close(CloseCode::Away, "hub shutting down")),
            frame = feed.topic.recv() => match frame {
                Ok(bytes) => feed.forward_ready(bytes).await,
                Err(broadcast::error::RecvError::Lagged(n)) => Err(feed.lagged(n)),
                Err(broadcast::error::RecvError::Closed) => Err(End::Close(CloseCode::Away, "feed closed")),
            },
            _ = recheck.tick() => {
                if viewer_still_allowed(&feed.shared, &feed.device_id, &opts.viewer) {
                    Ok(())
                } else {
                    log::info!("dashboard for {} from {}: viewer token revoked (or not confirmed by the store), closing (4001)", feed.device_id, feed.peer);
                    Err(End::Close(CloseCode::from(ems_shared::CLOSE_REVOKED), "revoked"))
                }
            }
            _ = ping.tick() => {
                if feed.missed_pongs >= max_missed_pongs {
                    feed.shared.metrics.heartbeat_death(Role::Dashboard);
                    log::warn!("dashboard for {} from {}: {} pings unanswered, dropping dead connection", feed.device_id, feed.peer, feed.missed_pongs);
                    Err(End::Gone)
                } else {
                    feed.missed_pongs += 1;
                    let limit = feed.shared.config.write_timeout;
                    ws::send_within(&mut feed.ws, Message::Ping(Bytes::new()), limit).await.map_err(|_| End::Gone)
                }
            }
            msg = feed.ws.next() => feed.client_message(msg),
        };
        if let Err(end) = step {
            return end;
        }
    }
}
