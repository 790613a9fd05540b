//! One device's live topic: the bounded `broadcast` ring that carries its
//! readings and presence frames to every dashboard subscriber. A frame is
//! serialized once and its bytes are shared by every subscriber; one that
//! falls more than the ring's capacity behind sees `Lagged` and is
//! dropped, without slowing the device or the others.

use std::sync::Arc;

use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// A device's live topic. The `broadcast` ring (`topic_capacity` slots of
/// ~64 bytes, allocated up front) is created when the first subscriber
/// arrives, so a device nobody watches costs no ring: measured with
/// ems-bench, ~65 KB less hub memory per idle device connection at the
/// default capacity of 1024 (BENCHMARKS.md).
#[derive(Clone)]
pub struct Topic {
    inner: Arc<std::sync::OnceLock<broadcast::Sender<Utf8Bytes>>>,
    capacity: usize,
}

impl Topic {
    pub(super) fn new(capacity: usize) -> Self {
        Topic {
            inner: Arc::new(std::sync::OnceLock::new()),
            capacity,
        }
    }

    /// Subscribes to the topic (creating its ring on first use).
    pub fn subscribe(&self) -> broadcast::Receiver<Utf8Bytes> {
        self.inner
            .get_or_init(|| broadcast::channel(self.capacity).0)
            .subscribe()
    }

    /// Number of live subscribers.
    pub fn receiver_count(&self) -> usize {
        self.inner.get().map_or(0, |s| s.receiver_count())
    }

    /// Sends a frame to every subscriber, as `broadcast::Sender::send`
    /// (an error when there is none).
    pub fn send(&self, frame: Utf8Bytes) -> Result<usize, broadcast::error::SendError<Utf8Bytes>> {
        match self.inner.get() {
            Some(s) => s.send(frame),
            None => Err(broadcast::error::SendError(frame)),
        }
    }
}
