//! One dashboard subscriber's socket and topic: how a topic frame reaches
//! the socket. Frames are queued and written together
//! ([`Feed::forward_ready`]), and a subscriber that cannot keep up is dropped
//! (by the write timeout or by falling a whole topic ring behind) without
//! slowing the device or the other subscribers.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::SinkExt;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use super::classify::{classify, Class};
use super::topic::Receiver;
use crate::state::Shared;
use crate::ws::{End, Ws};

/// Most topic frames written with one flush.
const COALESCE: usize = 64;

/// One subscriber's state.
pub(super) struct Feed {
    /// The subscriber's socket.
    pub(super) ws: Ws,
    /// The device it watches.
    pub(super) device_id: Arc<str>,
    /// Its address, for log lines.
    pub(super) peer: SocketAddr,
    /// The hub's shared state.
    pub(super) shared: Arc<Shared>,
    /// The device's live topic, subscribed before anything else was sent.
    pub(super) topic: Receiver,
    /// Pings sent since the last pong.
    pub(super) missed_pongs: u32,
}

impl Feed {
    /// A feed of `topic` to `ws`.
    pub(super) fn new(
        ws: Ws,
        device_id: Arc<str>,
        peer: SocketAddr,
        shared: Arc<Shared>,
        topic: Receiver,
    ) -> Self {
        Feed {
            ws,
            device_id,
            peer,
            shared,
            topic,
            missed_pongs: 0,
        }
    }

    /// Sends one frame, bounded by the write timeout.
    pub(super) async fn send(&mut self, text: Utf8Bytes) -> Result<(), End> {
        self.feed(text).await?;
        self.flush().await
    }

    /// Handles a message from the client while not in the live loop.
    pub(super) fn client_message(
        &mut self,
        msg: Option<Result<Message, WsError>>,
    ) -> Result<(), End> {
        match msg {
            Some(Ok(Message::Pong(_))) => {
                self.missed_pongs = 0;
                Ok(())
            }
            Some(Ok(Message::Close(_))) | None => Err(End::Gone),
            Some(Ok(_)) => Ok(()),
            Some(Err(WsError::Capacity(_))) => Err(End::Close(CloseCode::Size, "message too big")),
            Some(Err(_)) => Err(End::Gone),
        }
    }

    /// Live handling of one topic frame: queued for the next flush.
    pub(super) async fn forward(&mut self, frame: Utf8Bytes) -> Result<(), End> {
        let reading = matches!(classify(&frame), Class::Reading { .. });
        self.feed(frame).await?;
        if reading {
            self.shared
                .metrics
                .broadcast_deliveries
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Queues one frame for the next flush (written at once only when the
    /// socket's write buffer is full), bounded by the write timeout.
    pub(super) async fn feed(&mut self, text: Utf8Bytes) -> Result<(), End> {
        let limit = self.shared.config.write_timeout;
        let r = tokio::time::timeout(limit, self.ws.feed(Message::Text(text))).await;
        self.written(r)
    }

    /// Writes out what [`Feed::feed`] queued.
    pub(super) async fn flush(&mut self) -> Result<(), End> {
        let limit = self.shared.config.write_timeout;
        let r = tokio::time::timeout(limit, self.ws.flush()).await;
        self.written(r)
    }

    fn written(
        &self,
        r: Result<Result<(), WsError>, tokio::time::error::Elapsed>,
    ) -> Result<(), End> {
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => {
                self.shared
                    .metrics
                    .subscribers_dropped_slow
                    .fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "dashboard for {} from {}: write timed out, dropping slow subscriber",
                    self.device_id,
                    self.peer
                );
                Err(End::Gone)
            }
        }
    }

    /// One topic frame and whatever else is already waiting in the topic
    /// (at most [`COALESCE`]), written with one flush: under load a
    /// subscriber takes several frames per wake-up and per `write` instead
    /// of one each.
    pub(super) async fn forward_ready(&mut self, first: Utf8Bytes) -> Result<(), End> {
        self.forward(first).await?;
        let mut taken = 1;
        let mut yielded = false;
        while taken < COALESCE {
            match self.topic.try_recv() {
                Ok(frame) => {
                    taken += 1;
                    self.forward(frame).await?;
                }
                Err(broadcast::error::TryRecvError::Lagged(n)) => return Err(self.lagged(n)),
                Err(broadcast::error::TryRecvError::Closed) => {
                    self.flush().await?;
                    return Err(End::Close(CloseCode::Away, "feed closed"));
                }
                // More than one frame to write was waiting: the topic is
                // busier than this subscriber. Let the other subscribers run
                // once and take what arrived meanwhile into the same write.
                // A topic that is not behind (one frame per wake-up, every
                // 1 Hz device) never waits here.
                Err(broadcast::error::TryRecvError::Empty) if taken > 1 && !yielded => {
                    yielded = true;
                    tokio::task::yield_now().await;
                }
                Err(broadcast::error::TryRecvError::Empty) => break,
            }
        }
        self.flush().await
    }

    pub(super) fn lagged(&self, n: u64) -> End {
        self.shared
            .metrics
            .subscribers_dropped_slow
            .fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "dashboard for {} from {}: {n} frames behind, dropping slow subscriber",
            self.device_id,
            self.peer
        );
        End::Close(CloseCode::Again, "too slow")
    }
}
