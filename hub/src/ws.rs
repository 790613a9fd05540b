//! The dashboards' WebSocket (tokio-tungstenite): the socket type and its
//! settings, the close, the heartbeat timer and sends bounded by a
//! deadline; and how a session ends ([`End`]), which device sessions share.
//! Device connections frame their own WebSocket ([`crate::ingest`]'s
//! `socket` and `wire`); the dashboard session lives in [`crate::fanout`].

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::time::{interval_at, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

/// An upgraded connection (TCP or TLS underneath, behind hyper's upgrade).
pub(crate) type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// Bytes queued by `feed` before they are written without a flush.
const WRITE_BUFFER: usize = 16 * 1024;

/// WebSocket settings for every socket: messages and frames up to 16 KiB
/// (larger ones close with 1009), small buffers.
pub(crate) fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(ems_shared::MAX_MESSAGE_BYTES))
        .max_frame_size(Some(ems_shared::MAX_MESSAGE_BYTES))
        // Readings are ~220 bytes: a 256-byte read buffer holds one with
        // its frame header and keeps idle connections small (4 KiB -> 1 KiB
        // saved ~3 KB each, 1 KiB -> 512 B -> 256 B another ~0.7 and
        // ~0.3 KB; docs/decisions/hub-idle-connection-memory.md). Larger
        // messages (up to the 16 KiB limit) grow it as they arrive.
        .read_buffer_size(256)
        // Frames are queued with `feed` and written together at `flush`
        // (acks committed together, a subscriber's waiting frames).
        // The buffer grows only as far as it is used.
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(256 * 1024)
}

/// Waits for hyper to hand over the upgraded connection of `role`'s
/// `device_id` and wraps it in a WebSocket (`None`: the upgrade failed,
/// logged).
pub(crate) async fn upgrade(
    on_upgrade: hyper::upgrade::OnUpgrade,
    role: &str,
    device_id: &str,
    peer: std::net::SocketAddr,
) -> Option<Ws> {
    match on_upgrade.await {
        Ok(u) => Some(
            WebSocketStream::from_raw_socket(TokioIo::new(u), Role::Server, Some(config())).await,
        ),
        Err(e) => {
            log::debug!("upgrade of {role} {device_id} from {peer} failed: {e}");
            None
        }
    }
}

/// Why a session ends.
pub(crate) enum End {
    /// Peer closed or the socket failed.
    Gone,
    /// Close with this code and reason.
    Close(CloseCode, &'static str),
}

/// Sends a close frame and waits briefly for the peer's reply.
pub(crate) async fn close(ws: &mut Ws, code: CloseCode, reason: &'static str) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }));
        if ws.send(frame).await.is_err() {
            return;
        }
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// The heartbeat timer of one dashboard connection (device connections
/// share one task, `crate::ingest::heartbeat`): the first tick comes after half
/// to one whole `every`, spread over the connections, so connections
/// opened in the same second (a restart, a storm) are not all pinged in the
/// same second ever after.
pub(crate) fn heartbeat(every: Duration) -> tokio::time::Interval {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // Fibonacci hashing spreads consecutive numbers evenly over [0, 1).
    let frac = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
    let first = every / 2 + every.mul_f64(frac / 2.0);
    let mut ping = interval_at(tokio::time::Instant::now() + first, every);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ping
}

/// Sends one message, giving up after `limit`: a peer that stops reading
/// must not freeze its session (no heartbeat, no kick, no shutdown).
pub(crate) async fn send_within(ws: &mut Ws, msg: Message, limit: Duration) -> Result<(), WsError> {
    within(limit, ws.send(msg)).await
}

/// `f`, or a `TimedOut` error after `limit`.
pub(crate) async fn within(
    limit: Duration,
    f: impl std::future::Future<Output = Result<(), WsError>>,
) -> Result<(), WsError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => Err(WsError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "peer stopped reading",
        ))),
    }
}
