//! The dashboard feed (issue 6): one subscriber of one device's live topic.
//!
//! What a subscriber receives, in order (see the README's Dashboards section):
//! 1. `{"type":"status",…}`: the device's presence, right after the
//!    upgrade; again whenever the device connects or disconnects (the
//!    registry publishes those through the same topic as the readings, so
//!    presence and readings stay in order).
//! 2. With `ems.resume.<since_ms>` offered at the handshake: the stored
//!    readings with `ts_ms >= since_ms`, oldest first, then
//!    `{"type":"replay_end",…}`.
//! 3. The live feed: every reading as the device sent it (plus `device_id`
//!    and `rx_ms`), except backlog readings (see below).
//!
//! ## The resume seam (no gap, no duplicate)
//! The topic is subscribed *before* anything else; live frames that arrive
//! during the replay are buffered. A reading is broadcast before it is
//! committed, so the store may lag the topic: before querying, the session
//! waits until every reading the hub received before the subscription is
//! committed. The writer commits a device's readings in arrival order, so
//! it is enough that the first buffered live reading is in the store; when
//! the device is silent, the writer queue must have been seen empty and
//! then `resume_settle` must pass (longer than one commit). Then the store
//! is queried, the history sent, and the buffered frames follow minus every
//! `(epoch, seq)` the history already contained.
//!
//! ## Backfill
//! A device draining an offline backlog sends old readings as fast as the
//! hub acks them. A reading whose `rx_ms − ts_ms` exceeds
//! `backfill_after` is not forwarded one by one: the session counts them
//! and sends at most one `{"type":"backfill","count":…,"from_ts_ms":…,
//! "to_ts_ms":…}` per `backfill_interval` (and before the next fresh
//! reading), so dashboards are never flooded and never dropped as slow
//! because of a backlog. They fetch the range from the history API if they
//! want the points.
//!
//! ## Revocation
//! Every `viewer_recheck` the session re-checks its viewer token; a revoked
//! token (or one whose scope no longer includes the device) closes the
//! socket with 4001.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::sync::broadcast;
use tokio::time::{interval, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use ems_shared::{dashboard_frame, DashboardFrame};

use crate::state::{CallError, Shared};
use crate::store::{StoredReading, TokenHash};

type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// How a dashboard connection was opened.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FeedOptions {
    /// `ems.resume.<since_ms>`: replay stored readings from then.
    pub resume_since: Option<i64>,
    /// Hash of the viewer token, re-checked periodically.
    pub viewer: TokenHash,
}

/// Longest the resume seam waits for the store to catch up with the topic
/// before it queries anyway.
const RESUME_MAX_WAIT: Duration = Duration::from_secs(10);

/// Most topic frames written with one flush.
const COALESCE: usize = 64;

/// Most frames buffered during a replay before the subscriber is dropped.
const MAX_SEAM_BUFFER: usize = 100_000;

/// The fields of a topic frame the session looks at. Lenient: any frame
/// that is not a reading has no `epoch`/`seq`.
#[derive(Deserialize)]
struct Meta {
    #[serde(rename = "type")]
    kind: Option<String>,
    epoch: Option<u64>,
    seq: Option<u64>,
    ts_ms: Option<i64>,
    rx_ms: Option<i64>,
}

/// A topic frame, classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// A reading: its key, sample time and whether it is backlog.
    Reading {
        /// `(epoch, seq)`.
        key: (u64, u64),
        /// Sample time.
        ts_ms: i64,
        /// Older than `backfill_after` when the hub received it.
        backfill: bool,
    },
    /// Anything else (status, …): forwarded as is.
    Other,
}

/// Allocation-free fast path of [`classify`] (issue 8: it runs once per
/// frame per subscriber, so a serde parse with a `String` per delivery was
/// the fan-out's largest cost). Topic frames are built by the hub: a reading
/// that passed the strict decoder (known keys only, each once, no string
/// value that can contain a quote) plus `device_id`/`rx_ms`, or a serialized
/// control frame. The keys are found by a scan; `None` (the serde path
/// decides) for anything unusual, such as escaped keys.
fn classify_fast(frame: &str, backfill_after_ms: i64) -> Option<Class> {
    let b = frame.as_bytes();
    if scan_str(b, b"\"type\"")? != b"reading" {
        return Some(Class::Other);
    }
    let epoch = u64::try_from(scan_int(b, b"\"epoch\"")?).ok()?;
    let seq = u64::try_from(scan_int(b, b"\"seq\"")?).ok()?;
    let ts_ms = scan_int(b, b"\"ts_ms\"")?;
    let rx_ms = scan_int(b, b"\"rx_ms\"")?;
    Some(Class::Reading {
        key: (epoch, seq),
        ts_ms,
        backfill: rx_ms.saturating_sub(ts_ms) > backfill_after_ms,
    })
}

/// The bytes after `key` (a quoted JSON key), whitespace and the colon.
fn scan_value<'a>(b: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    // Compare only at quotes (a `windows` scan calls memcmp per byte: the
    // callgrind profile showed it).
    let mut at = 0;
    loop {
        at += b.get(at..)?.iter().position(|&c| c == b'"')?;
        if b[at..].starts_with(key) {
            break;
        }
        at += 1;
    }
    let rest = b[at + key.len()..].trim_ascii_start();
    rest.strip_prefix(b":").map(|r| r.trim_ascii_start())
}

/// A string value without escapes.
fn scan_str<'a>(b: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let v = scan_value(b, key)?.strip_prefix(b"\"")?;
    let end = v.iter().position(|&c| c == b'"' || c == b'\\')?;
    (v[end] == b'"').then(|| &v[..end])
}

/// An integer value (digits with an optional minus, ended by `,`, `}` or
/// whitespace).
fn scan_int(b: &[u8], key: &[u8]) -> Option<i64> {
    let v = scan_value(b, key)?;
    let end = v
        .iter()
        .position(|&c| !(c.is_ascii_digit() || c == b'-'))
        .unwrap_or(v.len());
    if !matches!(v.get(end), Some(b',' | b'}' | b' ' | b'\t' | b'\r' | b'\n')) {
        return None;
    }
    std::str::from_utf8(&v[..end]).ok()?.parse().ok()
}

/// Classifies a topic frame; `backfill_after_ms` is the age at receive
/// time above which a reading counts as backlog.
pub(crate) fn classify(frame: &str, backfill_after_ms: i64) -> Class {
    if let Some(c) = classify_fast(frame, backfill_after_ms) {
        return c;
    }
    let Ok(m) = serde_json::from_str::<Meta>(frame) else {
        return Class::Other;
    };
    match (m.kind.as_deref(), m.epoch, m.seq, m.ts_ms) {
        (Some("reading"), Some(epoch), Some(seq), Some(ts_ms)) => Class::Reading {
            key: (epoch, seq),
            ts_ms,
            backfill: m
                .rx_ms
                .is_some_and(|rx| rx.saturating_sub(ts_ms) > backfill_after_ms),
        },
        _ => Class::Other,
    }
}

/// Backlog readings seen since the last `backfill` frame.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Summary {
    count: u64,
    from_ts_ms: i64,
    to_ts_ms: i64,
}

impl Summary {
    /// Whether backlog readings wait for a `backfill` frame.
    pub(crate) fn pending(&self) -> bool {
        self.count > 0
    }

    /// Counts one backlog reading.
    pub(crate) fn add(&mut self, ts_ms: i64) {
        if self.count == 0 {
            self.from_ts_ms = ts_ms;
            self.to_ts_ms = ts_ms;
        } else {
            self.from_ts_ms = self.from_ts_ms.min(ts_ms);
            self.to_ts_ms = self.to_ts_ms.max(ts_ms);
        }
        self.count += 1;
    }

    /// The `backfill` frame for what was counted (and a reset), if any.
    pub(crate) fn take(&mut self, device_id: &str) -> Option<DashboardFrame> {
        if self.count == 0 {
            return None;
        }
        let s = std::mem::take(self);
        Some(DashboardFrame::Backfill {
            device_id: device_id.to_owned(),
            count: s.count,
            from_ts_ms: s.from_ts_ms,
            to_ts_ms: s.to_ts_ms,
        })
    }
}

/// Why the session ends.
enum End {
    /// Peer closed or the socket failed.
    Gone,
    /// Close with this code and reason.
    Close(CloseCode, &'static str),
}

/// One subscriber's state.
struct Feed {
    ws: Ws,
    device_id: Arc<str>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    topic: broadcast::Receiver<Utf8Bytes>,
    summary: Summary,
    backfill_after_ms: i64,
    missed_pongs: u32,
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
    let backfill_after_ms =
        i64::try_from(shared.config.backfill_after.as_millis()).unwrap_or(i64::MAX);
    let mut feed = Feed {
        ws,
        device_id,
        peer,
        shared,
        topic,
        summary: Summary::default(),
        backfill_after_ms,
        missed_pongs: 0,
    };
    let end = match feed.start(opts).await {
        Ok(()) => feed.live(opts).await,
        Err(e) => e,
    };
    if let End::Close(code, reason) = end {
        close(&mut feed.ws, code, reason).await;
    }
    log::info!(
        "dashboard for {} from {} disconnected",
        feed.device_id,
        feed.peer
    );
}

/// Runs a store query on the blocking pool.
async fn query<T: Send + 'static>(
    shared: &Arc<Shared>,
    f: impl FnOnce(&mut dyn crate::store::Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Option<T> {
    match shared.store.call(f).await {
        Ok(v) => Some(v),
        Err(CallError::Store(e)) => {
            log::warn!("dashboard store query failed: {e}");
            None
        }
        Err(CallError::Task(e)) => {
            log::warn!("dashboard store query task failed: {e}");
            None
        }
    }
}

/// The presence of `device_id` now, as a `status` frame.
pub(crate) async fn status_of(shared: &Arc<Shared>, device_id: &Arc<str>) -> DashboardFrame {
    let id = device_id.clone();
    let stored = query(shared, move |s| s.last_seen(&id)).await.flatten();
    let online = shared.registry.is_online(device_id);
    let last_seen_ms = match (stored, shared.registry.presence_ms(device_id)) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let edge = shared.registry.edge_status(device_id);
    let now = crate::session::now_ms();
    DashboardFrame::Status {
        device_id: device_id.to_string(),
        online,
        last_seen_ms,
        outbox_depth: edge.as_ref().map(|e| e.status.outbox_depth),
        behind_ms: edge.map(|e| {
            e.behind_ms
                .saturating_add(now.saturating_sub(e.rx_ms).max(0))
        }),
    }
}

/// Whether the viewer token still opens `device_id`. A store failure
/// counts as yes: revocation is re-checked at the next interval.
async fn viewer_still_allowed(shared: Arc<Shared>, device_id: Arc<str>, viewer: TokenHash) -> bool {
    // One store query per viewer token per `viewer_recheck`, shared by all
    // its subscriptions (issue 8: 9,600 subscriptions each querying every
    // 2 s made the periodic re-check the hub's largest cost). The key
    // includes the hub's store handle, so hubs in one process never share.
    //
    // Single flight: when an entry expires, the first subscription to see
    // it refreshes it and the others keep using the previous answer until
    // then. Without that, every subscription whose tick fell between the
    // expiry and the end of the query queued its own query behind the one
    // store lock, which made the query slower still: S2 measured stalls of
    // 0.3-0.5 s (issue 8).
    let key = (shared.store.id(), viewer);
    let ttl = shared.config.viewer_recheck;
    let known = {
        let mut c = VIEWER_CACHE.lock().unwrap_or_else(|p| p.into_inner());
        match c.get_mut(&key) {
            Some(e) if e.at.elapsed() < ttl => Some(e.scope.clone()),
            // Another subscription is fetching; a refresh that never ended
            // (its task was dropped) is taken over after a while.
            Some(e) if e.refreshing.is_some_and(|t| t.elapsed() < REFRESH_TAKEOVER) => {
                Some(e.scope.clone())
            }
            Some(e) => {
                e.refreshing = Some(std::time::Instant::now());
                None
            }
            None => None,
        }
    };
    let scope = match known {
        Some(scope) => scope,
        None => {
            let fetched = query(&shared, move |s| s.viewer_scope(&viewer)).await;
            let mut c = VIEWER_CACHE.lock().unwrap_or_else(|p| p.into_inner());
            match fetched {
                Some(scope) => {
                    if c.len() > 4096 {
                        c.retain(|_, e| e.at.elapsed() < ttl || e.refreshing.is_some());
                    }
                    c.insert(
                        key,
                        CachedViewer {
                            at: std::time::Instant::now(),
                            scope: scope.clone(),
                            refreshing: None,
                        },
                    );
                    scope
                }
                None => {
                    // Store trouble: keep the subscriber (as before) and let
                    // the next tick try again.
                    if let Some(e) = c.get_mut(&key) {
                        e.refreshing = None;
                    }
                    return true;
                }
            }
        }
    };
    scope.is_some_and(|sc| sc.allows(&device_id))
}

/// A viewer look-up shared by the subscriptions of one token.
struct CachedViewer {
    /// When it was fetched.
    at: std::time::Instant,
    /// What the store said.
    scope: Option<crate::store::ViewerScope>,
    /// Since when a subscription is fetching a fresh answer.
    refreshing: Option<std::time::Instant>,
}

/// After this long, a viewer refresh still marked as running is presumed
/// lost and another subscription runs it.
const REFRESH_TAKEOVER: Duration = Duration::from_secs(10);

/// Recent viewer look-ups: (hub store handle, token hash) → look-up.
type ViewerCache = std::collections::HashMap<(usize, TokenHash), CachedViewer>;
static VIEWER_CACHE: std::sync::LazyLock<std::sync::Mutex<ViewerCache>> =
    std::sync::LazyLock::new(|| std::sync::Mutex::new(ViewerCache::new()));

/// A reading from the store as a dashboard frame.
pub(crate) fn stored_frame(device_id: &str, r: &StoredReading) -> String {
    dashboard_frame(&r.reading.to_json(), device_id, r.received_at_ms)
}

impl Feed {
    /// Sends one frame, bounded by the write timeout.
    async fn send(&mut self, text: Utf8Bytes) -> Result<(), End> {
        self.feed(text).await?;
        self.flush().await
    }

    /// Initial status, then the replay when asked for.
    async fn start(&mut self, opts: FeedOptions) -> Result<(), End> {
        let status = status_of(&self.shared, &self.device_id).await;
        self.send(status.to_json().into()).await?;
        if let Some(since) = opts.resume_since {
            self.replay(since).await?;
        }
        Ok(())
    }

    /// Handles a message from the client while not in the live loop.
    fn client_message(&mut self, msg: Option<Result<Message, WsError>>) -> Result<(), End> {
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

    /// The resume seam (see the module docs).
    async fn replay(&mut self, since_ms: i64) -> Result<(), End> {
        let mut buf: Vec<Utf8Bytes> = Vec::new();
        let mut shutdown = self.shared.shutdown.clone();
        let settle = self.shared.config.resume_settle;
        let started = Instant::now();
        let mut queue_empty_at: Option<Instant> = None;
        let mut poll = interval(Duration::from_millis(25));
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // 1. Wait until the store holds everything received before the
        //    subscription.
        loop {
            tokio::select! {
                biased;
                _ = crate::shutdown::shutting_down(&mut shutdown) => return Err(End::Close(CloseCode::Away, "hub shutting down")),
                frame = self.topic.recv() => self.buffer(frame, &mut buf)?,
                msg = self.ws.next() => self.client_message(msg)?,
                _ = poll.tick() => {
                    if started.elapsed() > RESUME_MAX_WAIT {
                        log::warn!("dashboard for {}: store did not catch up within {RESUME_MAX_WAIT:?}; replaying anyway", self.device_id);
                        break;
                    }
                    let first = buf.iter().find_map(|b| match classify(b, i64::MAX) {
                        Class::Reading { key, ts_ms, .. } => Some((key, ts_ms)),
                        Class::Other => None,
                    });
                    if let Some((key, ts_ms)) = first {
                        let id = self.device_id.clone();
                        let committed = query(&self.shared, move |s| {
                            Ok(s.readings(&id, ts_ms, ts_ms.saturating_add(1), 100_000)?
                                .iter()
                                .any(|r| (r.epoch, r.seq) == key))
                        })
                        .await
                        .unwrap_or(false);
                        if committed {
                            break;
                        }
                    } else {
                        let q = &self.shared.queue;
                        let now = Instant::now();
                        if q.capacity() == q.max_capacity() {
                            let at = *queue_empty_at.get_or_insert(now);
                            if now.duration_since(at) >= settle {
                                break;
                            }
                        } else {
                            queue_empty_at = None;
                        }
                    }
                }
            }
        }
        // 2. Query, still buffering live frames.
        let limit = self.shared.config.replay_limit.max(1);
        let id = self.device_id.clone();
        let task = self.shared.store.call(move |store| {
            store.history(&id, since_ms, i64::MAX, limit.saturating_add(1), true)
        });
        tokio::pin!(task);
        let history = loop {
            tokio::select! {
                biased;
                r = &mut task => break r,
                frame = self.topic.recv() => self.buffer(frame, &mut buf)?,
                msg = self.ws.next() => self.client_message(msg)?,
            }
        };
        let mut history = match history {
            Ok(h) => h,
            Err(CallError::Store(e)) => {
                log::warn!(
                    "dashboard for {}: history query failed: {e}",
                    self.device_id
                );
                return Err(End::Close(CloseCode::Again, "store unavailable"));
            }
            Err(CallError::Task(e)) => {
                log::warn!("dashboard for {}: history task failed: {e}", self.device_id);
                return Err(End::Close(CloseCode::Error, "internal error"));
            }
        };
        let truncated = history.len() > limit;
        if truncated {
            let cut = history.len() - limit;
            history.drain(..cut);
        }
        // 3. History, oldest first, then the end marker.
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
        // 4. The buffered live frames, minus what the history held.
        for frame in buf {
            if let Class::Reading { key, .. } = classify(&frame, i64::MAX) {
                if replayed.contains(&key) {
                    continue;
                }
            }
            self.forward(frame).await?;
        }
        self.flush().await
    }

    /// Live handling of one topic frame: fresh readings and other frames
    /// are queued for the next flush (after any pending backfill summary),
    /// backlog readings are counted. `true` when something was queued.
    async fn forward(&mut self, frame: Utf8Bytes) -> Result<bool, End> {
        match classify(&frame, self.backfill_after_ms) {
            Class::Reading {
                backfill: true,
                ts_ms,
                ..
            } => {
                self.summary.add(ts_ms);
                Ok(false)
            }
            class => {
                self.feed_summary().await?;
                self.feed(frame).await?;
                if matches!(class, Class::Reading { .. }) {
                    self.shared
                        .metrics
                        .broadcast_deliveries
                        .fetch_add(1, Ordering::Relaxed);
                }
                Ok(true)
            }
        }
    }

    /// Queues the pending `backfill` summary, if any.
    async fn feed_summary(&mut self) -> Result<(), End> {
        match self.summary.take(&self.device_id) {
            Some(f) => self.feed(f.to_json().into()).await,
            None => Ok(()),
        }
    }

    /// Sends the pending `backfill` summary, if any.
    async fn flush_summary(&mut self) -> Result<(), End> {
        self.feed_summary().await?;
        self.flush().await
    }

    /// Queues one frame for the next flush (written at once only when the
    /// socket's write buffer is full), bounded by the write timeout.
    async fn feed(&mut self, text: Utf8Bytes) -> Result<(), End> {
        let limit = self.shared.config.write_timeout;
        let r = tokio::time::timeout(limit, self.ws.feed(Message::Text(text))).await;
        self.written(r)
    }

    /// Writes out what [`Feed::feed`] queued.
    async fn flush(&mut self) -> Result<(), End> {
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
    /// of one each (issue 8, fan-out).
    async fn forward_ready(&mut self, first: Utf8Bytes) -> Result<(), End> {
        let mut written = usize::from(self.forward(first).await?);
        let mut taken = 1;
        let mut yielded = false;
        while taken < COALESCE {
            match self.topic.try_recv() {
                Ok(frame) => {
                    taken += 1;
                    written += usize::from(self.forward(frame).await?);
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
                // 1 Hz device) never waits here, nor does a backlog that is
                // only counted (nothing to coalesce, and waiting would only
                // bring it closer to the slow-subscriber limit).
                Err(broadcast::error::TryRecvError::Empty) if written > 1 && !yielded => {
                    yielded = true;
                    tokio::task::yield_now().await;
                }
                Err(broadcast::error::TryRecvError::Empty) => break,
            }
        }
        self.flush().await
    }

    fn lagged(&self, n: u64) -> End {
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

    /// The live loop.
    async fn live(&mut self, opts: FeedOptions) -> End {
        let cfg = self.shared.config.clone();
        let mut shutdown = self.shared.shutdown.clone();
        // Created once (see the device session).
        let stopping = crate::shutdown::shutting_down(&mut shutdown);
        tokio::pin!(stopping);
        let mut ping = crate::session::heartbeat(cfg.ping_interval);
        let mut summary_tick = interval(cfg.backfill_interval.max(Duration::from_millis(10)));
        summary_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let recheck_every = cfg.viewer_recheck.max(Duration::from_millis(50));
        let mut recheck = crate::session::heartbeat(recheck_every);
        loop {
            let had_pending = self.summary.pending();
            let step: Result<(), End> = tokio::select! {
                biased;
                _ = &mut stopping => Err(End::Close(CloseCode::Away, "hub shutting down")),
                frame = self.topic.recv() => match frame {
                    Ok(bytes) => self.forward_ready(bytes).await,
                    Err(broadcast::error::RecvError::Lagged(n)) => Err(self.lagged(n)),
                    Err(broadcast::error::RecvError::Closed) => Err(End::Close(CloseCode::Away, "feed closed")),
                },
                // Only while backlog readings are counted: an idle timer per
                // subscriber would wake every subscriber every second.
                _ = summary_tick.tick(), if self.summary.pending() => self.flush_summary().await,
                _ = recheck.tick() => {
                    if viewer_still_allowed(self.shared.clone(), self.device_id.clone(), opts.viewer).await {
                        Ok(())
                    } else {
                        log::info!("dashboard for {} from {}: viewer token revoked, closing (4001)", self.device_id, self.peer);
                        Err(End::Close(CloseCode::from(ems_shared::CLOSE_REVOKED), "revoked"))
                    }
                }
                _ = ping.tick() => {
                    if self.missed_pongs >= cfg.max_missed_pongs {
                        self.shared.metrics.heartbeat_death(crate::metrics::Role::Dashboard);
                        log::warn!("dashboard for {} from {}: {} pings unanswered, dropping dead connection", self.device_id, self.peer, self.missed_pongs);
                        Err(End::Gone)
                    } else {
                        self.missed_pongs += 1;
                        self.ws.send(Message::Ping(Bytes::new())).await.map_err(|_| End::Gone)
                    }
                }
                msg = self.ws.next() => self.client_message(msg),
            };
            if let Err(end) = step {
                return end;
            }
            if !had_pending && self.summary.pending() {
                // The first backlog reading since the last summary: its
                // summary goes out one interval from now.
                summary_tick.reset();
            }
        }
    }
}

/// Sends a close frame and waits briefly for the peer's reply.
async fn close(ws: &mut Ws, code: CloseCode, reason: &'static str) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_classified() {
        let live = r#"{"type":"reading","epoch":1,"seq":2,"ts_ms":1000,"meter":"m","power_w":1.0,"device_id":"d","rx_ms":1500}"#;
        assert_eq!(
            classify(live, 30_000),
            Class::Reading {
                key: (1, 2),
                ts_ms: 1000,
                backfill: false
            }
        );
        let old = r#"{"type":"reading","epoch":1,"seq":3,"ts_ms":1000,"meter":"m","power_w":1.0,"device_id":"d","rx_ms":100000}"#;
        assert!(matches!(
            classify(old, 30_000),
            Class::Reading { backfill: true, .. }
        ));
        assert!(matches!(
            classify(old, i64::MAX),
            Class::Reading {
                backfill: false,
                ..
            }
        ));
        assert_eq!(
            classify(
                r#"{"type":"status","device_id":"d","online":true,"last_seen_ms":1}"#,
                0
            ),
            Class::Other
        );
        assert_eq!(classify("not json", 0), Class::Other);
        // The fast path agrees with the serde path, spacing included, and
        // leaves what it cannot read to it.
        let spaced = "{ \"type\" : \"reading\", \"epoch\" : 1 , \"seq\":2,\"ts_ms\": -5,\"meter\":\"m\",\"power_w\":1.0,\"device_id\":\"d\",\"rx_ms\":100000}";
        assert_eq!(
            classify_fast(spaced, 30_000),
            Some(Class::Reading {
                key: (1, 2),
                ts_ms: -5,
                backfill: true
            })
        );
        assert_eq!(classify_fast(r#"{"\u0074ype":"reading"}"#, 0), None);
        assert_eq!(classify_fast(r#"{"type":"reading","epoch":1.5}"#, 0), None);
        assert_eq!(
            classify_fast(r#"{"type":"status","online":true}"#, 0),
            Some(Class::Other)
        );
        assert_eq!(
            classify(r#"{"type":"reading","epoch":"x"}"#, 0),
            Class::Other
        );
    }

    #[test]
    fn summary_counts_and_resets() {
        let mut s = Summary::default();
        assert_eq!(s.take("d"), None);
        for ts in [50, 10, 30] {
            s.add(ts);
        }
        assert_eq!(
            s.take("d"),
            Some(DashboardFrame::Backfill {
                device_id: "d".into(),
                count: 3,
                from_ts_ms: 10,
                to_ts_ms: 50
            })
        );
        assert_eq!(s.take("d"), None);
    }
}
