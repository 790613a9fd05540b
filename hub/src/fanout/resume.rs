//! The resume seam: a dashboard that offers `ems.resume.<since_ms>` gets
//! the stored readings from then, oldest first, a `replay_end` frame, and
//! then the live feed — with no gap and no duplicate between the two.
//!
//! The topic is subscribed *before* anything else; live frames that arrive
//! during the replay are buffered. A reading is broadcast before it is
//! committed, so the store may lag the topic: before querying, the session
//! waits until every reading the hub received before the subscription is
//! committed. The writer commits a device's readings in arrival order, so
//! it is enough that the first buffered live reading is in the store; when
//! the device is silent, the writer queue must have been seen empty, with
//! nothing held by the writer, and still so `resume_settle` later. Each
//! check asks the writer to commit what it holds at once rather than when
//! due (up to its linger of seconds), so a resume waits for one commit.
//! Then the store
//! is queried, the history sent, and the buffered frames follow minus every
//! `(epoch, seq)` the history already contained.
//!
//! What it costs the store: while waiting, one point look-up of the first
//! buffered reading per check, the checks [`FIRST_CHECK`] apart at first
//! and twice as far apart each time up to [`LAST_CHECK`] (a stalled writer
//! costs about 15 look-ups in the [`RESUME_MAX_WAIT`] of 10 s, not 400);
//! then one history query of at most `replay_limit` + 1 rows, taken in
//! turn with the viewer token's other heavy queries.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use ems_shared::{dashboard_frame, DashboardFrame};
use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::classify::{classify, Class};
use super::feed::Feed;
use super::lookup::query;
use crate::shutdown::shutting_down;
use crate::state::{CallError, Shared};
use crate::store::{StoredReading, TokenHash};
use crate::ws::End;

/// Longest the resume seam waits for the store to catch up with the topic
/// before it queries anyway.
const RESUME_MAX_WAIT: Duration = Duration::from_secs(10);

/// Most frames buffered during a replay before the subscriber is dropped.
const MAX_SEAM_BUFFER: usize = 100_000;

/// First interval between two checks of the store while waiting.
const FIRST_CHECK: Duration = Duration::from_millis(25);

/// Longest interval between two checks of the store while waiting.
const LAST_CHECK: Duration = Duration::from_secs(1);

/// A reading from the store as a dashboard frame.
pub(crate) fn stored_frame(device_id: &str, r: &StoredReading) -> String {
    dashboard_frame(&r.reading.to_json(), device_id, r.received_at_ms)
}

impl Feed {
    /// Replays the stored readings from `since_ms`, then the live frames
    /// that arrived meanwhile (see the module docs).
    pub(super) async fn replay(&mut self, since_ms: i64, viewer: TokenHash) -> Result<(), End> {
        let mut buf: Vec<Utf8Bytes> = Vec::new();
        self.wait_for_store(&mut buf).await?;
        let history = self.fetch_history(since_ms, viewer, &mut buf).await?;
        self.send_history(since_ms, history, buf).await
    }

    /// 1. Buffers live frames until the store holds everything received
    ///    before the subscription (or [`RESUME_MAX_WAIT`] has passed).
    async fn wait_for_store(&mut self, buf: &mut Vec<Utf8Bytes>) -> Result<(), End> {
        let mut shutdown = self.shared.shutdown.clone();
        let settle = self.shared.config.resume_settle;
        let started = Instant::now();
        let mut queue_empty_at: Option<Instant> = None;
        let mut every = FIRST_CHECK;
        let mut next = started;
        loop {
            tokio::select! {
                biased;
                _ = shutting_down(&mut shutdown) => return Err(End::Close(CloseCode::Away, "hub shutting down")),
                frame = self.topic.recv() => self.buffer(frame, buf)?,
                msg = self.ws.next() => self.client_message(msg)?,
                _ = sleep_until(next) => {
                    next = Instant::now() + every;
                    // Only checks that ask the store back off; watching the
                    // writer queue is free.
                    every = if first_reading(buf).is_some() { next_check(every) } else { FIRST_CHECK };
                    self.shared.writer.flush();
                    if started.elapsed() > RESUME_MAX_WAIT {
                        log::warn!("dashboard for {}: store did not catch up within {RESUME_MAX_WAIT:?}; replaying anyway", self.device_id);
                        return Ok(());
                    }
                    if store_caught_up(&self.shared, &self.device_id, buf, &mut queue_empty_at, settle).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// 2. Queries the newest `replay_limit` + 1 stored readings from
    ///    `since_ms`, still buffering live frames.
    async fn fetch_history(
        &mut self,
        since_ms: i64,
        viewer: TokenHash,
        buf: &mut Vec<Utf8Bytes>,
    ) -> Result<Vec<StoredReading>, End> {
        let limit = self.shared.config.replay_limit.max(1);
        let id = self.device_id.clone();
        let shared = self.shared.clone();
        let task = async move {
            // In turn with the viewer's other heavy queries.
            let _turn = shared.quotas.heavy(&viewer, true).await;
            shared
                .store
                .call(move |store| {
                    store.history(&id, since_ms, i64::MAX, limit.saturating_add(1), true)
                })
                .await
        };
        tokio::pin!(task);
        let history = loop {
            tokio::select! {
                biased;
                r = &mut task => break r,
                frame = self.topic.recv() => self.buffer(frame, buf)?,
                msg = self.ws.next() => self.client_message(msg)?,
            }
        };
        match history {
            Ok(h) => Ok(h),
            Err(CallError::Store(e)) => {
                log::warn!(
                    "dashboard for {}: history query failed: {e}",
                    self.device_id
                );
                Err(End::Close(CloseCode::Again, "store unavailable"))
            }
            Err(CallError::Task(e)) => {
                log::warn!("dashboard for {}: history task failed: {e}", self.device_id);
                Err(End::Close(CloseCode::Error, "internal error"))
            }
        }
    }

    /// 3. The history (at most `replay_limit`, the newest), oldest first,
    ///    then the end marker; 4. the buffered live frames, minus what the
    ///    history held.
    async fn send_history(
        &mut self,
        since_ms: i64,
        mut history: Vec<StoredReading>,
        buf: Vec<Utf8Bytes>,
    ) -> Result<(), End> {
        let limit = self.shared.config.replay_limit.max(1);
        let truncated = history.len() > limit;
        if truncated {
            let cut = history.len() - limit;
            history.drain(..cut);
        }
        let mut replayed: HashSet<(u64, u64)> = HashSet::with_capacity(history.len());
        for r in &history {
            replayed.insert((r.reading.epoch, r.reading.seq));
            self.feed(stored_frame(&self.device_id, r).into()).await?;
        }
        let end = DashboardFrame::ReplayEnd {
            device_id: self.device_id.to_string(),
            since_ms,
            count: history.len() as u64,
            truncated,
        };
        self.send(end.to_json().into()).await?;
        for frame in buf {
            if let Class::Reading { key, .. } = classify(&frame) {
                if replayed.contains(&key) {
                    continue;
                }
            }
            self.forward(frame).await?;
        }
        self.flush().await
    }

    /// Takes one frame from the topic into `buf`.
    fn buffer(
        &mut self,
        frame: Result<Utf8Bytes, broadcast::error::RecvError>,
        buf: &mut Vec<Utf8Bytes>,
    ) -> Result<(), End> {
        match frame {
            Ok(b) => {
                buf.push(b);
                if buf.len() > MAX_SEAM_BUFFER {
                    return Err(End::Close(CloseCode::Again, "too slow"));
                }
                Ok(())
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                Err(End::Close(CloseCode::Again, "too slow"))
            }
            Err(broadcast::error::RecvError::Closed) => {
                Err(End::Close(CloseCode::Away, "feed closed"))
            }
        }
    }
}

/// `(epoch, seq)` of the first live reading buffered, if any.
fn first_reading(buf: &[Utf8Bytes]) -> Option<(u64, u64)> {
    buf.iter().find_map(|b| match classify(b) {
        Class::Reading { key, .. } => Some(key),
        Class::Other => None,
    })
}

/// The interval after `every` between two checks of the store.
fn next_check(every: Duration) -> Duration {
    (every * 2).min(LAST_CHECK)
}

/// Whether the store has caught up with the topic: the first buffered
/// live reading is committed or, with nothing buffered, the writer
/// queue and the writer's batch have been empty for `settle`.
async fn store_caught_up(
    shared: &Shared,
    device_id: &Arc<str>,
    buf: &[Utf8Bytes],
    queue_empty_at: &mut Option<Instant>,
    settle: Duration,
) -> bool {
    if let Some((epoch, seq)) = first_reading(buf) {
        let id = device_id.clone();
        return query(shared, move |s| s.reading_stored(&id, epoch, seq))
            .await
            .unwrap_or(false);
    }
    let q = &shared.queue;
    let now = Instant::now();
    if q.capacity() == q.max_capacity() && shared.writer.holding() == 0 {
        let at = *queue_empty_at.get_or_insert(now);
        now.duration_since(at) >= settle
    } else {
        *queue_empty_at = None;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_back_off_to_one_a_second() {
        let mut every = FIRST_CHECK;
        let mut at = Duration::ZERO;
        let mut checks = 0;
        while at <= RESUME_MAX_WAIT {
            checks += 1;
            at += every;
            every = next_check(every);
        }
        assert_eq!(every, LAST_CHECK);
        assert!(checks <= 16, "{checks} checks in {RESUME_MAX_WAIT:?}");
    }
}
