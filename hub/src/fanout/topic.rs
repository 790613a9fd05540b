//! One device's live topic: the bounded ring that carries its readings
//! and presence frames to every dashboard subscriber. A frame is
//! serialized once and its bytes are shared by every subscriber; one that
//! falls more than the ring's capacity behind sees `Lagged` and is
//! dropped, without slowing the device or the others.
//!
//! The ring holds only the frames some subscriber has not read yet, so it
//! is as large as the slowest subscriber is behind, never more than its
//! capacity: while every subscriber keeps up (a 1 Hz device) it holds a
//! frame or none. A fixed ring (tokio's `broadcast`, `capacity` slots
//! allocated up front) cost ~16 KB per watched device at 256 slots, most of
//! the hub's memory with thousands of dashboards
//! (docs/decisions/hub-idle-connection-memory.md). The receive side keeps
//! `broadcast`'s errors and their meaning.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::{RecvError, SendError, TryRecvError};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Spare capacity a ring keeps when it is emptied: a burst that grew it is
/// given back, at most once per [`SHRINK_EVERY`].
const KEEP_SLOTS: usize = 8;
const SHRINK_EVERY: Duration = Duration::from_secs(1);

/// A device's live topic (the sending side). The ring is created when the
/// first subscriber arrives, so a device nobody watches costs none.
#[derive(Clone)]
pub struct Topic {
    inner: Arc<Sender>,
}

/// The sending side shared by the clones of a [`Topic`]; when the last one
/// is dropped, the subscribers see `Closed` after the frames they have not
/// read yet.
struct Sender {
    ring: OnceLock<Arc<Ring>>,
    capacity: usize,
}

impl Drop for Sender {
    fn drop(&mut self) {
        if let Some(ring) = self.ring.get() {
            ring.lock().closed = true;
            ring.ready.notify_waiters();
        }
    }
}

/// The frames not yet read by every subscriber.
struct Ring {
    state: Mutex<State>,
    /// Woken at every frame and at close.
    ready: Notify,
    /// Most frames held: a subscriber further behind has lagged.
    capacity: usize,
}

struct State {
    /// Frames from position `first` on, each with the number of
    /// subscribers that have still to read it.
    frames: VecDeque<(Utf8Bytes, usize)>,
    /// Position of `frames[0]` (positions count every frame sent).
    first: u64,
    /// Live subscribers.
    receivers: usize,
    /// No sender is left.
    closed: bool,
    /// When the ring last gave back spare capacity.
    shrunk: Option<Instant>,
}

impl State {
    /// Position of the next frame to be sent.
    fn tail(&self) -> u64 {
        self.first + self.frames.len() as u64
    }

    /// Drops the frames every subscriber has read.
    fn trim(&mut self) {
        while self.frames.front().is_some_and(|(_, rem)| *rem == 0) {
            self.frames.pop_front();
            self.first += 1;
        }
    }
}

impl Ring {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent before it can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Topic {
    pub(super) fn new(capacity: usize) -> Self {
        Topic {
            inner: Arc::new(Sender {
                ring: OnceLock::new(),
                capacity: capacity.max(1),
            }),
        }
    }

    /// Subscribes to the topic (creating its ring on first use): the
    /// receiver gets every frame sent from now on.
    pub fn subscribe(&self) -> Receiver {
        let ring = self.inner.ring.get_or_init(|| {
            Arc::new(Ring {
                state: Mutex::new(State {
                    frames: VecDeque::new(),
                    first: 0,
                    receivers: 0,
                    closed: false,
                    shrunk: None,
                }),
                ready: Notify::new(),
                capacity: self.inner.capacity,
            })
        });
        let mut state = ring.lock();
        state.receivers += 1;
        let next = state.tail();
        drop(state);
        Receiver {
            ring: ring.clone(),
            next,
        }
    }

    /// Number of live subscribers.
    pub fn receiver_count(&self) -> usize {
        self.inner.ring.get().map_or(0, |r| r.lock().receivers)
    }

    /// Sends a frame to every subscriber, as `broadcast::Sender::send`:
    /// the number of subscribers, or an error when there is none. The
    /// oldest frame is dropped when the ring is full (its laggard sees
    /// `Lagged`).
    pub fn send(&self, frame: Utf8Bytes) -> Result<usize, SendError<Utf8Bytes>> {
        let Some(ring) = self.inner.ring.get() else {
            return Err(SendError(frame));
        };
        let mut state = ring.lock();
        let n = state.receivers;
        if n == 0 {
            return Err(SendError(frame));
        }
        if state.frames.is_empty() && state.frames.capacity() > KEEP_SLOTS {
            let now = Instant::now();
            let recently = matches!(state.shrunk, Some(t) if now.duration_since(t) < SHRINK_EVERY);
            if !recently {
                state.frames.shrink_to(KEEP_SLOTS);
                state.shrunk = Some(now);
            }
        }
        state.frames.push_back((frame, n));
        if state.frames.len() > ring.capacity {
            state.frames.pop_front();
            state.first += 1;
        }
        drop(state);
        ring.ready.notify_waiters();
        Ok(n)
    }
}

/// One subscriber of a [`Topic`].
pub struct Receiver {
    ring: Arc<Ring>,
    /// Position of the next frame to read.
    next: u64,
}

impl Receiver {
    /// The next frame, if one is waiting. `Lagged(n)`: `n` frames were
    /// dropped before this subscriber read them (the next call goes on from
    /// the oldest frame kept); `Closed`: no sender is left and every frame
    /// was read.
    pub fn try_recv(&mut self) -> Result<Utf8Bytes, TryRecvError> {
        take(&self.ring, &mut self.next)
    }

    /// Waits for the next frame, as `broadcast::Receiver::recv`.
    /// Cancel-safe: a frame is only taken in the poll that returns it.
    pub async fn recv(&mut self) -> Result<Utf8Bytes, RecvError> {
        let ring = &*self.ring;
        loop {
            let notified = ring.ready.notified();
            tokio::pin!(notified);
            // Registered before looking, so a frame sent in between wakes it.
            notified.as_mut().enable();
            match take(ring, &mut self.next) {
                Ok(frame) => return Ok(frame),
                Err(TryRecvError::Lagged(n)) => return Err(RecvError::Lagged(n)),
                Err(TryRecvError::Closed) => return Err(RecvError::Closed),
                Err(TryRecvError::Empty) => notified.await,
            }
        }
    }
}

/// Takes the frame at position `next` of `ring` (see [`Receiver::try_recv`]).
fn take(ring: &Ring, next: &mut u64) -> Result<Utf8Bytes, TryRecvError> {
    let mut state = ring.lock();
    if *next < state.first {
        let missed = state.first - *next;
        *next = state.first;
        return Err(TryRecvError::Lagged(missed));
    }
    let i = (*next - state.first) as usize;
    let closed = state.closed;
    match state.frames.get_mut(i) {
        Some((frame, rem)) => {
            let frame = frame.clone();
            *rem -= 1;
            *next += 1;
            if i == 0 {
                state.trim();
            }
            Ok(frame)
        }
        None if closed => Err(TryRecvError::Closed),
        None => Err(TryRecvError::Empty),
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut state = self.ring.lock();
        state.receivers -= 1;
        let from = self.next.saturating_sub(state.first) as usize;
        for (_, rem) in state.frames.iter_mut().skip(from) {
            *rem -= 1;
        }
        state.trim();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(i: u64) -> Utf8Bytes {
        Utf8Bytes::from(i.to_string())
    }

    #[test]
    fn every_subscriber_gets_every_frame_and_the_ring_keeps_only_unread_ones() {
        let topic = Topic::new(4);
        assert!(topic.send(frame(0)).is_err());
        let mut a = topic.subscribe();
        let mut b = topic.subscribe();
        assert_eq!(topic.receiver_count(), 2);
        for i in 1..=3 {
            assert_eq!(topic.send(frame(i)).unwrap(), 2);
        }
        for i in 1..=3 {
            assert_eq!(a.try_recv().unwrap(), frame(i));
        }
        assert_eq!(a.try_recv(), Err(TryRecvError::Empty));
        let held = || topic.inner.ring.get().unwrap().lock().frames.len();
        assert_eq!(held(), 3, "b has read none yet");
        assert_eq!(b.try_recv().unwrap(), frame(1));
        assert_eq!(held(), 2);
        drop(b);
        assert_eq!(held(), 0, "a dropped subscriber holds nothing back");
        assert_eq!(topic.receiver_count(), 1);
        // A late subscriber starts at the tail.
        topic.send(frame(4)).unwrap();
        let mut c = topic.subscribe();
        topic.send(frame(5)).unwrap();
        assert_eq!(c.try_recv().unwrap(), frame(5));
        assert_eq!(a.try_recv().unwrap(), frame(4));
        assert_eq!(a.try_recv().unwrap(), frame(5));
        assert_eq!(held(), 0);
    }

    #[test]
    fn a_subscriber_a_whole_ring_behind_lags_and_goes_on_from_the_oldest() {
        let topic = Topic::new(3);
        let mut slow = topic.subscribe();
        let mut fast = topic.subscribe();
        for i in 0..5 {
            topic.send(frame(i)).unwrap();
            assert_eq!(fast.try_recv().unwrap(), frame(i));
        }
        assert_eq!(slow.try_recv(), Err(TryRecvError::Lagged(2)));
        for i in 2..5 {
            assert_eq!(slow.try_recv().unwrap(), frame(i));
        }
        assert_eq!(slow.try_recv(), Err(TryRecvError::Empty));
        assert!(topic.inner.ring.get().unwrap().lock().frames.is_empty());
    }

    #[test]
    fn a_burst_is_given_back_once_read() {
        let topic = Topic::new(1024);
        let mut sub = topic.subscribe();
        for i in 0..1000 {
            topic.send(frame(i)).unwrap();
        }
        for i in 0..1000 {
            assert_eq!(sub.try_recv().unwrap(), frame(i));
        }
        topic.send(frame(1000)).unwrap();
        let cap = topic.inner.ring.get().unwrap().lock().frames.capacity();
        assert!(cap <= 2 * KEEP_SLOTS, "{cap}");
        assert_eq!(sub.try_recv().unwrap(), frame(1000));
    }

    #[tokio::test]
    async fn recv_waits_for_a_frame_and_sees_the_close_after_the_last() {
        let topic = Topic::new(8);
        let mut sub = topic.subscribe();
        let waiter = tokio::spawn(async move {
            let first = sub.recv().await;
            let second = sub.recv().await;
            let end = sub.recv().await;
            (first, second, end)
        });
        tokio::task::yield_now().await;
        topic.send(frame(1)).unwrap();
        topic.send(frame(2)).unwrap();
        drop(topic);
        let (first, second, end) = waiter.await.unwrap();
        assert_eq!(first.unwrap(), frame(1));
        assert_eq!(second.unwrap(), frame(2));
        assert_eq!(end, Err(RecvError::Closed));
    }
}
