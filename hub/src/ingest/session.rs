//! One upgraded connection: a device session (ingest) or a dashboard
//! session (live feed).
//!
//! Device session, per frame: the gatekeeper (`ems_shared::decode_reading`);
//! a valid reading goes to the hot path (serialized once, only if somebody
//! watches) and to the cold path (the writer queue — awaiting a free slot is
//! the backpressure); an invalid one is dropped with a rate-limited warning
//! and, when it had a readable epoch/seq, a `rejected` frame. Acks come back
//! from the writer after commit and are written here.
//!
//! Both sessions run the heartbeat: a ping every `ping_interval`; after
//! `max_missed_pongs` unanswered pings the peer is dead and dropped.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message, Utf8Bytes};

use ems_shared::{
    dashboard_frame, decode_edge_frame, EdgeFrame, FrameError, HubFrame, RejectReason,
};

use super::acks::AckSink;
use super::limits::{Excess, TokenBucket};
use super::writer::Item;
use crate::fanout::registry::Kick;
use crate::fanout::topic::Topic;
use crate::metrics::Role;
use crate::shutdown::shutting_down;
use crate::state::Shared;
use crate::store::{Row, TokenHash};
use crate::ws::{self, End, Ws};

/// At most one warning per `every`, with a count of the suppressed ones, so
/// a flood of bad frames costs bounded log volume.
struct RateLimitedWarn {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedWarn {
    fn new(every: Duration) -> Self {
        RateLimitedWarn {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// Whether to log now; returns the number suppressed since the last one.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Serves one device connection until it ends.
///
/// `token` is the hash of the token the connection authenticated with; the
/// revocation poller compares it with the store's current one.
// Not an `async fn` on purpose (see the comment in the body).
#[allow(clippy::manual_async_fn)]
pub(crate) fn run(
    mut ws: Ws,
    device_id: Arc<str>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    token: Option<TokenHash>,
) -> impl std::future::Future<Output = ()> + Send {
    // An `async move` block rather than an `async fn`: the latter keeps a
    // second copy of its arguments (the 328-byte socket among them) in
    // every session's task (issue 8, `-Zprint-type-sizes`).
    async move {
        let cfg = &shared.config;
        let metrics = &shared.metrics;
        let (lease, replaced) = match shared.registry.connect_device(
            &device_id,
            peer.to_string(),
            token,
        ) {
            Ok(l) => l,
            Err(conflict) => {
                metrics.takeover_conflicts.fetch_add(1, Ordering::Relaxed);
                match &conflict.other_peer {
                Some(other) => log::error!(
                    "device {device_id}: takeover loop between {other} and {peer} (two devices share this id?); \
                     closing both with 4002 and refusing the id for {:?}",
                    conflict.remaining
                ),
                None => log::warn!(
                    "device {device_id} from {peer} refused (4002 conflict): takeover cool-down, {:?} left",
                    conflict.remaining
                ),
            }
                Box::pin(ws::close(
                    &mut ws,
                    CloseCode::from(ems_shared::CLOSE_CONFLICT),
                    "conflict",
                ))
                .await;
                return;
            }
        };
        match replaced {
            Some(old) => {
                metrics.takeovers.fetch_add(1, Ordering::Relaxed);
                log::warn!("device {device_id} connected from {peer}; closing its previous connection from {old} (4000 replaced)")
            }
            None => log::info!("device {device_id} connected from {peer}"),
        }
        metrics.connection(Role::Device, 1);
        let mut kick = lease.kick;
        // False once the kick channel is gone without a kick (registry dropped).
        let mut kick_live = true;
        let topic = lease.topic;
        let sink = Arc::new(AckSink::new(lease.conn_id));
        let mut shutdown = shared.shutdown.clone();
        // Created once: a fresh `watch::changed` future per loop turn registers
        // and removes a waiter on the one watch every session shares (issue 8).
        let stopping = shutting_down(&mut shutdown);
        tokio::pin!(stopping);
        let mut ping = ws::heartbeat(cfg.ping_interval);
        let mut missed = 0u32;
        // Whether a frame arrived since the last heartbeat tick: a device that
        // talks needs no ping (issue 8: 10,000 devices connected within a second
        // were all pinged in the same second, every 20 s).
        let mut heard = false;
        let mut warn = RateLimitedWarn::new(Duration::from_secs(10));
        let mut bucket = shared.buckets.take(&device_id, || {
            TokenBucket::new(&cfg.rate_limit, Instant::now())
        });
        let mut excess = Excess::default();
        // The last reading queued for the store, to wait for its ack on shutdown.
        let mut last_queued: Option<(u64, u64)> = None;
        // The last ack sent, so a shutdown does not wait for one already sent.
        let mut last_acked: Option<(u64, u64)> = None;
        let limit = cfg.write_timeout;

        let end = loop {
            tokio::select! {
                biased;
                k = &mut kick, if kick_live => {
                    match k {
                        Ok(Kick::Replaced) => break End::Close(CloseCode::from(ems_shared::CLOSE_REPLACED), "replaced"),
                        Ok(Kick::Revoked) => {
                            metrics.revoked_closes.fetch_add(1, Ordering::Relaxed);
                            log::warn!("device {device_id} from {peer}: token revoked or rotated, closing (4001)");
                            break End::Close(CloseCode::from(ems_shared::CLOSE_REVOKED), "token revoked");
                        }
                        Ok(Kick::Conflict) => {
                            metrics.takeover_conflicts.fetch_add(1, Ordering::Relaxed);
                            break End::Close(CloseCode::from(ems_shared::CLOSE_CONFLICT), "conflict");
                        }
                        // The slot was dropped without a kick: keep serving.
                        Err(_) => kick_live = false,
                    }
                }
                _ = &mut stopping => {
                    // Boxed: the shutdown path is taken once, and inline it
                    // would grow every idle session's future (issue 8).
                    Box::pin(flush_acks_at_shutdown(&mut ws, &sink, last_queued.filter(|l| last_acked != Some(*l)), limit, metrics)).await;
                    break End::Close(CloseCode::Away, "hub shutting down");
                }
                ack = sink.pop() => {
                    // Acks queued together (several epochs, or a session that
                    // was busy) go out in one write. The writes are boxed, here
                    // and below: awaited inline, each would add its future to
                    // every session's task (issue 8: idle memory); an
                    // allocation per write is small beside its syscall.
                    let mut last = ack;
                    let mut n = 1;
                    let mut r = Box::pin(feed_ack(&mut ws, ack, limit)).await;
                    while r.is_ok() && n < 64 {
                        match sink.try_pop() {
                            Some(a) => {
                                last = a;
                                n += 1;
                                r = Box::pin(feed_ack(&mut ws, a, limit)).await;
                            }
                            None => break,
                        }
                    }
                    if r.is_err() || Box::pin(ws::flush_within(&mut ws, limit)).await.is_err() {
                        break End::Gone;
                    }
                    last_acked = Some(last);
                    metrics.acks_sent.fetch_add(n, Ordering::Relaxed);
                }
                _ = ping.tick() => {
                    if std::mem::take(&mut heard) {
                        missed = 0;
                        continue;
                    }
                    if missed >= cfg.max_missed_pongs {
                        metrics.heartbeat_death(Role::Device);
                        log::warn!("device {device_id} from {peer}: {missed} pings unanswered, dropping dead connection");
                        break End::Gone;
                    }
                    missed += 1;
                    if Box::pin(ws::send_within(&mut ws, Message::Ping(Bytes::new()), limit)).await.is_err() {
                        break End::Gone;
                    }
                }
                msg = ws.next() => {
                    // Any frame proves the peer alive: under backpressure its
                    // pong may sit behind readings the hub has not read yet.
                    if matches!(msg, Some(Ok(_))) {
                        missed = 0;
                        heard = true;
                    }
                    let frame_text = match msg {
                        Some(Ok(Message::Text(text))) => Some(text),
                        Some(Ok(Message::Binary(_))) => None,
                        Some(Ok(Message::Pong(_))) => {
                            missed = 0;
                            continue;
                        }
                        Some(Ok(Message::Ping(_))) | Some(Ok(Message::Frame(_))) => continue,
                        Some(Ok(Message::Close(_))) | None => break End::Gone,
                        Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                            log::warn!("device {device_id}: message of {size} bytes exceeds {max_size}, closing (1009)");
                            break End::Close(CloseCode::Size, "message too big");
                        }
                        Some(Err(WsError::Utf8(_))) => {
                            if let Some(n) = warn.allow(Instant::now()) {
                                log::warn!("device {device_id} from {peer}: text frame is not UTF-8, closing (1007){}", suppressed(n));
                            }
                            break End::Close(CloseCode::Invalid, "invalid UTF-8");
                        }
                        Some(Err(e)) => {
                            log::info!("device {device_id} from {peer}: connection error: {e}");
                            break End::Gone;
                        }
                    };
                    metrics.frames_received.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    let outcome = if !bucket.try_take(now) {
                        Err(rate_limited(frame_text.as_deref()))
                    } else if let Some(text) = &frame_text {
                        Box::pin(handle_text(text, &device_id, &topic, &sink, &shared)).await
                    } else {
                        Err(FrameError {
                            reason: RejectReason::BinaryFrame,
                            detail: "readings are text frames".into(),
                            epoch: None,
                            seq: None,
                        })
                    };
                    match outcome {
                        Ok(Handled::Queued(id)) => last_queued = Some(id),
                        Ok(Handled::Status) => {}
                        Ok(Handled::WriterGone) => break End::Close(CloseCode::Away, "hub shutting down"),
                        Err(e) => {
                            metrics.rejected(e.reason);
                            if e.reason == RejectReason::RateLimited && excess.refused(now, cfg.rate_limit.abuse_after) {
                                metrics.abuse_closes.fetch_add(1, Ordering::Relaxed);
                                log::warn!("device {device_id} from {peer}: rate limit exceeded for {:?}, closing (1008)", cfg.rate_limit.abuse_after);
                                break End::Close(CloseCode::Policy, "rate limit exceeded");
                            }
                            if let Some(n) = warn.allow(now) {
                                log::warn!("device {device_id}: discarded frame ({e}){}", suppressed(n));
                            }
                            if let (Some(epoch), Some(seq)) = (e.epoch, e.seq) {
                                let reason = format!("{}: {}", e.reason.code(), e.detail);
                                let frame = HubFrame::Rejected { epoch, seq, reason }.to_json();
                                if Box::pin(ws::send_within(&mut ws, Message::Text(frame.into()), limit)).await.is_err() {
                                    break End::Gone;
                                }
                            }
                        }
                    }
                }
            }
        };
        shared.registry.disconnect_device(&device_id, lease.conn_id);
        shared.buckets.put(&device_id, bucket);
        metrics.connection(Role::Device, -1);
        if let End::Close(code, reason) = end {
            Box::pin(ws::close(&mut ws, code, reason)).await;
        }
        log::info!("device {device_id} from {peer} disconnected");
    }
}

/// The refusal of a frame that found the bucket empty; keeps the frame's
/// epoch/seq (when readable, without full validation) so the edge learns
/// which reading was not taken.
fn rate_limited(text: Option<&str>) -> FrameError {
    #[derive(serde::Deserialize)]
    struct Ids {
        epoch: Option<u64>,
        seq: Option<u64>,
    }
    let (epoch, seq) = text
        .and_then(|t| serde_json::from_str::<Ids>(t).ok())
        .map(|i| (i.epoch, i.seq))
        .unwrap_or((None, None));
    FrameError {
        reason: RejectReason::RateLimited,
        detail: "per-device rate limit exceeded; resend later".into(),
        epoch,
        seq,
    }
}

fn suppressed(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!("; {n} similar warnings suppressed")
    }
}

async fn send_ack(ws: &mut Ws, ack: (u64, u64), limit: Duration) -> Result<(), WsError> {
    feed_ack(ws, ack, limit).await?;
    ws::flush_within(ws, limit).await
}

/// Queues one ack frame (written at the next flush, or at once when the
/// socket's write buffer is full).
async fn feed_ack(ws: &mut Ws, (epoch, seq): (u64, u64), limit: Duration) -> Result<(), WsError> {
    let frame = HubFrame::Ack { epoch, seq }.to_json();
    ws::within(limit, ws.feed(Message::Text(frame.into()))).await
}

/// At shutdown: sends the acks of what this session queued (waiting up to
/// 2 s for the last one), then those of other epochs committed with it.
async fn flush_acks_at_shutdown(
    ws: &mut Ws,
    sink: &AckSink,
    wait_for: Option<(u64, u64)>,
    limit: Duration,
    metrics: &crate::metrics::Metrics,
) {
    if let Some(last) = wait_for {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                let ack = sink.pop().await;
                if send_ack(ws, ack, limit).await.is_err() {
                    break;
                }
                metrics.acks_sent.fetch_add(1, Ordering::Relaxed);
                if ack == last {
                    break;
                }
            }
        })
        .await;
    }
    while let Some(ack) = sink.try_pop() {
        if send_ack(ws, ack, limit).await.is_err() {
            break;
        }
        metrics.acks_sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// What became of a valid frame.
enum Handled {
    /// A reading, queued for the store as `(epoch, seq)`.
    Queued((u64, u64)),
    /// A status frame, recorded in the registry.
    Status,
    /// The writer is gone (shutdown).
    WriterGone,
}

/// Validates one text frame; a reading is fanned out and queued for the
/// store, a status frame is recorded in the registry.
async fn handle_text(
    text: &str,
    device_id: &Arc<str>,
    topic: &Topic,
    sink: &Arc<AckSink>,
    shared: &Shared,
) -> Result<Handled, FrameError> {
    let rx_ms = crate::store::now_ms();
    let reading = match decode_edge_frame(text, rx_ms)? {
        EdgeFrame::Reading(r) => r,
        EdgeFrame::Status(status) => {
            shared.metrics.status_frames.fetch_add(1, Ordering::Relaxed);
            shared.registry.set_edge_status(device_id, status, rx_ms);
            return Ok(Handled::Status);
        }
    };
    shared
        .metrics
        .readings_valid
        .fetch_add(1, Ordering::Relaxed);
    // Hot path: serialize only when somebody watches; one buffer shared by
    // every subscriber.
    if topic.receiver_count() > 0 {
        let _ = topic.send(Utf8Bytes::from(dashboard_frame(text, device_id, rx_ms)));
    }
    let id = (reading.epoch, reading.seq);
    let item = Item {
        row: Row {
            device_id: device_id.clone(),
            received_at_ms: rx_ms,
            reading,
        },
        ack: sink.clone(),
    };
    // Cold path: waits only when the queue is full (backpressure). The
    // wait is boxed: it is rare, and inline its future (with the reading)
    // would be part of every idle session's task (issue 8).
    Ok(match shared.queue.try_send(item) {
        Ok(()) => Handled::Queued(id),
        Err(mpsc::error::TrySendError::Full(item)) => {
            match Box::pin(shared.queue.send(item)).await {
                Ok(()) => Handled::Queued(id),
                Err(_) => Handled::WriterGone,
            }
        }
        Err(mpsc::error::TrySendError::Closed(_)) => Handled::WriterGone,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_rate_limited() {
        let mut w = RateLimitedWarn::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(w.allow(t0), Some(0));
        assert_eq!(w.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(w.allow(t0 + Duration::from_secs(2)), None);
        assert_eq!(w.allow(t0 + Duration::from_secs(11)), Some(2));
    }
}
