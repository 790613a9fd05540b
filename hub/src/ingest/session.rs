//! One device connection, from the upgrade to the close: the I/O around
//! the session's decisions ([`SessionState`]).
//!
//! Per frame: the rate limit and the gatekeeper (`ems_shared`'s strict
//! decoder) decide; a valid reading goes to the hot path (serialized once,
//! only if somebody watches the device's topic; a backlog reading is
//! counted into a `backfill` summary instead), to the MQTT bridge when
//! there is one (a `try_send`, never waiting) and to the cold path (the
//! writer queue — awaiting a free slot is the backpressure). A refused
//! frame is counted and logged at a bounded rate; a `rate_limited` one is
//! answered at once (nothing stored), any other goes through the same
//! writer queue to the quarantine, within the device's quarantine budget.
//! Answers — acks, and `rejected` for quarantined frames — come back from
//! the writer after the commit, through the connection's [`Mailbox`], and
//! are written here; when the writer abandoned a reading of this
//! connection, the session closes it with 1011 instead (the edge sends
//! everything unacked again). The heartbeat's tick pings a silent device
//! every `ping_interval`; after `max_missed_pongs` unanswered pings it is
//! dead and dropped. Answers, kicks, the shutdown and the ticks all arrive
//! in the connection's [`Mailbox`]: an idle session waits on its mailbox
//! and its socket, and nothing else.
//!
//! Everything awaited inside the loop that writes to the socket is boxed:
//! awaited inline, each of those futures would be part of every session's
//! task, idle or not, and idle device connections are the hub's memory
//! budget. An allocation per write is small beside its syscall.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use ems_shared::{dashboard_frame, FrameError, HubFrame, RejectReason};

use super::socket::{DeviceSocket, ReadError};
use super::state::{
    deferred, rejected_frame, suppressed, Ending, Refusal, SessionState, Step, Tick, Verdict,
};
use super::wire::Incoming;
use super::writer::{Entry, Item};
use crate::auth::cache::Answer as AuthAnswer;
use crate::fanout::backfill::{is_backlog, Backlog};
use crate::fanout::registry::DeviceLease;
use crate::fanout::topic::Topic;
use crate::limits::{DeviceLimits, TokenBucket, WARN_EVERY};
use crate::mailbox::{Answer, Kick, Mail, Mailbox};
use crate::metrics::Role;
use crate::state::Shared;
use crate::store::{QuarantineRow, Row, TokenHash};
use crate::ws::End;

/// Most answers written with one flush.
const ACKS_PER_WRITE: u64 = 64;

/// The close that tells an edge to send everything unacked again: the
/// writer gave up on one of its readings (1011, internal error).
const ABANDONED: (CloseCode, &str) = (
    CloseCode::Error,
    "store failed; send unacked readings again",
);

/// A device connection hyper is about to hand over, and what it holds
/// until it ends (its slots in the connection quotas).
pub(crate) struct Upgrade<G> {
    /// Resolves to the upgraded connection.
    pub on_upgrade: hyper::upgrade::OnUpgrade,
    /// Dropped when the session ends.
    pub guard: G,
}

/// What a device connection's registration needs, and nothing after it.
pub(crate) struct Admission {
    /// The hash of the token the connection authenticated with; the
    /// revocation poll compares it with the store's current one.
    pub token: Option<TokenHash>,
    /// How long the writer may hold the device's readings before it
    /// answers them ([`super::hold_for`] of its announced ack window).
    pub hold: Option<Duration>,
}

/// Serves one device connection, from its upgrade until it ends.
///
/// `admission` is boxed: it is needed only until the connection is
/// registered, and the task keeps its arguments for its whole life.
// Not an `async fn` on purpose (see the comment in the body).
#[allow(clippy::manual_async_fn)]
pub(crate) fn run<G: Send + 'static>(
    upgrade: Upgrade<G>,
    device_id: Arc<str>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    admission: Box<Admission>,
) -> impl std::future::Future<Output = ()> + Send {
    // An `async move` block rather than an `async fn`: the latter keeps a
    // second copy of its arguments in every session's task.
    async move {
        // Boxed: the upgrade's future is larger than the session loop's
        // and would size every task for it. `upgrade`'s fields are used in
        // place: destructured, the guard would be kept twice in the task.
        let Some(mut ws) =
            Box::pin(DeviceSocket::upgrade(upgrade.on_upgrade, &device_id, peer)).await
        else {
            return;
        };
        // The admission's box is freed here, and its copy lives only in
        // this block: not across an `.await`, so not in the task. The token was
        // checked before this connection was registered; a revocation seen
        // in between closes it here, one after closes it through the
        // registry.
        let Some((
            DeviceLease {
                conn_id,
                mailbox,
                topic,
            },
            revoked,
        )) = ({
            // Moved into this block first: a box emptied in place would
            // be freed only with the task's upvars, at its end.
            let Admission { token, hold } = {
                let boxed = admission;
                *boxed
            };
            register(&shared, &device_id, peer, token, hold).map(|lease| {
                let now = |h: TokenHash| shared.auth.device_now(&device_id, &h);
                (lease, token.is_some_and(|h| now(h) == AuthAnswer::No))
            })
        })
        else {
            Box::pin(ws.close(ems_shared::CLOSE_CONFLICT, "conflict")).await;
            return;
        };
        if revoked {
            shared.registry.disconnect_device(&device_id, conn_id);
            Box::pin(ws.close(ems_shared::CLOSE_REVOKED, "token revoked")).await;
            return;
        }
        shared
            .presence
            .connected(&device_id, conn_id, crate::store::now_ms());
        shared.metrics.connection(Role::Device, 1);
        let cfg = &shared.config;
        let limits = shared.registry.limits(&device_id, || {
            let bucket = TokenBucket::new(&cfg.rate_limit, Instant::now());
            DeviceLimits::new(bucket, WARN_EVERY)
        });
        let state = SessionState::new(limits, cfg.rate_limit.abuse_after, cfg.max_missed_pongs);
        // The session borrows the socket and the ids rather than taking
        // them: moved into it, they would be stored twice in the task.
        let mut session = Session {
            ws: &mut ws,
            mailbox,
            topic,
            device_id: &device_id,
            peer: &peer,
            shared: &shared,
            state,
            backlog: Backlog::default(),
        };
        let end = session.serve().await;
        // Counted backlog readings reach the dashboards before the
        // device's disconnect does.
        session.publish_backlog();
        // Read back from the mailbox: a copy kept across the session's
        // wait would be part of every idle connection's task.
        let conn_id = session.mailbox.conn_id;
        drop(session);
        shared.registry.disconnect_device(&device_id, conn_id);
        shared
            .presence
            .disconnected(&device_id, conn_id, crate::store::now_ms());
        shared.metrics.connection(Role::Device, -1);
        match end {
            End::Close(code, reason) => Box::pin(ws.close(code.into(), reason)).await,
            // The echo of the peer's close, when it started the close.
            End::Gone if ws.pending() => {
                let _ = Box::pin(ws.flush(Duration::from_secs(1))).await;
            }
            End::Gone => {}
        }
        log::info!("device {device_id} from {peer} disconnected");
        drop(upgrade.guard);
    }
}

/// Registers the connection (one device, one connection: a previous one is
/// told to close with 4000). `None`: the device id is in a takeover loop
/// and refused (4002).
fn register(
    shared: &Shared,
    device_id: &Arc<str>,
    peer: SocketAddr,
    token: Option<TokenHash>,
    hold: Option<Duration>,
) -> Option<DeviceLease> {
    let metrics = &shared.metrics;
    match shared.registry.connect_device(device_id, peer, token, hold) {
        Ok((lease, Some(old))) => {
            metrics.takeovers.fetch_add(1, Ordering::Relaxed);
            log::warn!("device {device_id} connected from {peer}; closing its previous connection from {old} (4000 replaced)");
            Some(lease)
        }
        Ok((lease, None)) => {
            log::info!("device {device_id} connected from {peer}");
            Some(lease)
        }
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
            None
        }
    }
}

/// What woke the session loop.
enum Event {
    /// Something arrived in the connection's mailbox.
    Mail(Mail),
    /// The backlog summary is due.
    BacklogDue,
    /// A message from the socket (`None`: the socket ended).
    Message(Option<Result<Incoming, ReadError>>),
}

/// How an event is handled: at once, or by I/O the loop awaits.
enum Handling<'a> {
    Done(Result<(), End>),
    Io(std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), End>> + Send + 'a>>),
}

/// A registered device connection.
struct Session<'a> {
    /// The device's socket.
    ws: &'a mut DeviceSocket,
    /// The connection's mailbox: the writer's answers, kicks, the
    /// shutdown, heartbeat ticks.
    mailbox: Arc<Mailbox>,
    /// The device's live topic.
    topic: Topic,
    /// The device.
    device_id: &'a Arc<str>,
    /// Its address, for log lines.
    peer: &'a SocketAddr,
    /// The hub's shared state.
    shared: &'a Shared,
    /// The session's decisions.
    state: SessionState,
    /// Backlog readings not yet published as a `backfill` summary.
    backlog: Backlog,
}

impl Session<'_> {
    /// The session loop: the mailbox (kicks, shutdown, answers, heartbeat
    /// ticks), backlog summaries and frames, until one of them ends the
    /// session.
    async fn serve(&mut self) -> End {
        loop {
            let event = std::future::poll_fn(|cx| self.poll_event(cx)).await;
            // The handling is taken apart before its I/O is awaited, so the
            // task keeps only the I/O's box across the wait.
            let io = match self.on_event(event) {
                Handling::Done(Ok(())) => continue,
                Handling::Done(Err(end)) => return end,
                Handling::Io(io) => io,
            };
            if let Err(end) = io.await {
                return end;
            }
        }
    }

    /// The next event, in this order: mail (a kick or the shutdown before
    /// anything the socket brings), a due backlog summary, the socket.
    ///
    /// A hand-written poll rather than a `select!`: its future is one
    /// pointer, and every idle device connection's task holds it.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if let Poll::Ready(mail) = self.mailbox.poll_next(cx) {
            return Poll::Ready(Event::Mail(mail));
        }
        if self.backlog.poll_due(cx).is_ready() {
            return Poll::Ready(Event::BacklogDue);
        }
        self.ws.poll_next(cx).map(Event::Message)
    }

    /// One event of the session loop: done at once, or the I/O it needs.
    ///
    /// Not an `async fn`: the event is moved into the returned future, and
    /// each kind of I/O gets a box of its own size, so neither the event
    /// nor the largest handling is part of every session's task while it
    /// waits, and an ack's box stays small enough for the allocator's
    /// per-thread cache.
    fn on_event(&mut self, event: Event) -> Handling<'_> {
        match event {
            Event::Mail(Mail::Kick(kick)) => Handling::Done(Err(self.kicked(kick))),
            Event::Mail(Mail::ShuttingDown) => Handling::Io(Box::pin(async {
                self.flush_acks_at_shutdown().await;
                Err(End::Close(CloseCode::Away, "hub shutting down"))
            })),
            Event::Mail(Mail::Answer(answer)) => Handling::Io(Box::pin(self.write_acks(answer))),
            Event::Mail(Mail::Tick) => Handling::Io(Box::pin(self.heartbeat())),
            Event::BacklogDue => {
                self.publish_backlog();
                Handling::Done(Ok(()))
            }
            Event::Message(msg) => Handling::Io(Box::pin(self.on_message(msg))),
        }
    }

    /// A heartbeat tick: a ping to a device silent since the last one, the
    /// end of one that left too many unanswered.
    async fn heartbeat(&mut self) -> Result<(), End> {
        match self.state.tick() {
            Tick::Quiet => Ok(()),
            Tick::Ping => {
                let r = self.ws.ping(self.limit()).await;
                r.map_err(|e| self.write_failed(&e))
            }
            Tick::Dead(missed) => {
                self.shared.metrics.heartbeat_death(Role::Device);
                log::warn!(
                    "device {} from {}: {missed} pings unanswered, dropping dead connection",
                    self.device_id,
                    self.peer
                );
                Err(End::Gone)
            }
        }
    }

    /// Longest a write to the socket may take (read from the configuration
    /// rather than kept in every idle task).
    fn limit(&self) -> Duration {
        self.shared.config.write_timeout
    }

    /// A write to the socket failed: the session ends. A device that
    /// stopped reading (the write timed out) is counted with the HTTP
    /// side's write timeouts.
    fn write_failed(&self, e: &std::io::Error) -> End {
        if e.kind() == std::io::ErrorKind::TimedOut {
            let hardening = &self.shared.metrics.hardening;
            hardening.write_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        End::Gone
    }

    /// The registry asks this connection to close.
    fn kicked(&self, kick: Kick) -> End {
        let metrics = &self.shared.metrics;
        match kick {
            Kick::Replaced => {}
            Kick::Revoked => {
                metrics.revoked_closes.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "device {} from {}: token revoked or rotated, closing (4001)",
                    self.device_id,
                    self.peer
                );
            }
            Kick::Conflict => {
                metrics.takeover_conflicts.fetch_add(1, Ordering::Relaxed);
            }
        }
        let (code, reason) = kick.close();
        End::Close(CloseCode::from(code), reason)
    }

    /// Writes `first` and the answers queued behind it (several epochs,
    /// or a session that was busy) with one flush. An abandoned mailbox
    /// ends the session with 1011 after what came before it is written.
    async fn write_acks(&mut self, first: Answer) -> Result<(), End> {
        let mut last = None;
        let (mut n, mut acks) = (0, 0);
        let mut abandoned = false;
        let mut next = Some(first);
        while let Some(answer) = next.take() {
            let Some((frame, id)) = answer_frame(&answer) else {
                abandoned = true;
                break;
            };
            self.ws.feed_text(&frame);
            last = Some(id);
            n += 1;
            acks += u64::from(matches!(answer, Answer::Ack(..)));
            if n >= ACKS_PER_WRITE {
                break;
            }
            next = self.mailbox.try_pop();
        }
        if n > 0 {
            if let Err(e) = self.ws.flush(self.limit()).await {
                return Err(self.write_failed(&e));
            }
        }
        if let Some(last) = last {
            self.state.acked(last);
        }
        self.shared
            .metrics
            .acks_sent
            .fetch_add(acks, Ordering::Relaxed);
        if abandoned {
            log::error!(
                "device {} from {}: the store writer gave up on a reading of this connection; \
                 closing (1011) without further acks so the device sends its unacked readings again",
                self.device_id,
                self.peer
            );
            return Err(End::Close(ABANDONED.0, ABANDONED.1));
        }
        Ok(())
    }

    /// One message from the socket.
    async fn on_message(&mut self, msg: Option<Result<Incoming, ReadError>>) -> Result<(), End> {
        let now = Instant::now();
        let step = self.state.message(msg, now);
        // A ping's pong, queued by the socket.
        if matches!(step, Step::Continue | Step::Flush) && self.ws.pending() {
            if let Err(e) = self.ws.flush(self.limit()).await {
                return Err(self.write_failed(&e));
            }
        }
        match step {
            Step::Continue => Ok(()),
            Step::Flush => {
                self.shared.writer.flush();
                Ok(())
            }
            Step::Frame(frame) => self.on_frame(frame, now).await,
            Step::End(ending) => Err(self.ended(ending)),
        }
    }

    /// The end a message from the socket asks for, logged.
    fn ended(&self, ending: Ending) -> End {
        let (device_id, peer) = (&self.device_id, self.peer);
        match ending {
            Ending::Closed => End::Gone,
            Ending::Failed(e) => {
                log::info!("device {device_id} from {peer}: connection error: {e}");
                End::Gone
            }
            Ending::Protocol(what) => {
                log::info!("device {device_id} from {peer}: {what}, closing (1002)");
                End::Close(CloseCode::Protocol, "protocol error")
            }
            Ending::TooBig { size, max_size } => {
                log::warn!("device {device_id}: message of {size} bytes exceeds {max_size}, closing (1009)");
                End::Close(CloseCode::Size, "message too big")
            }
            Ending::BadUtf8(warn) => {
                if let Some(n) = warn {
                    log::warn!(
                        "device {device_id} from {peer}: text frame is not UTF-8, closing (1007){}",
                        suppressed(n)
                    );
                }
                End::Close(CloseCode::Invalid, "invalid UTF-8")
            }
        }
    }

    /// One data frame (`None`: binary), judged by the session state and
    /// then done: fanned out and queued, recorded, quarantined or refused.
    async fn on_frame(&mut self, frame: Option<String>, now: Instant) -> Result<(), End> {
        let metrics = &self.shared.metrics;
        metrics.frames_received.fetch_add(1, Ordering::Relaxed);
        let rx_ms = crate::store::now_ms();
        match self.state.frame(frame.as_deref(), now, rx_ms) {
            Verdict::Reading(reading) => {
                metrics.readings_valid.fetch_add(1, Ordering::Relaxed);
                if let Some(text) = &frame {
                    self.fan_out(text, reading.ts_ms, rx_ms);
                }
                if let Some(m) = &self.shared.mqtt {
                    m.reading(self.device_id, &reading);
                }
                self.shared
                    .presence
                    .reading(self.device_id, &reading, rx_ms);
                let id = Some((reading.epoch, reading.seq));
                let row = Row {
                    device_id: self.device_id.clone(),
                    received_at_ms: rx_ms,
                    reading,
                };
                self.enqueue(Entry::Reading(row), id).await
            }
            Verdict::Status(status) => {
                metrics.status_frames.fetch_add(1, Ordering::Relaxed);
                // The registry publishes the status to the topic: the
                // summary of what came before goes first.
                self.publish_backlog();
                self.shared.presence.status(self.device_id, &status, rx_ms);
                let registry = &self.shared.registry;
                registry.set_edge_status(self.device_id, status, rx_ms);
                Ok(())
            }
            Verdict::Refused { error, warn } if error.reason == RejectReason::RateLimited => {
                metrics.rejected(error.reason);
                if let Some(n) = warn {
                    // The error may quote what the device sent.
                    log::warn!(
                        "device {}: discarded frame ({}){}",
                        self.device_id,
                        crate::log_text::escape(&error.to_string()),
                        suppressed(n)
                    );
                }
                self.reply_rejected(&error).await
            }
            Verdict::Refused { error, warn } => {
                metrics.rejected(error.reason);
                self.refused(error, warn, frame.as_deref(), now, rx_ms)
                    .await
            }
            Verdict::Abuse => Err(self.abuse()),
        }
    }

    /// A frame the gatekeeper refused: quarantined within the device's
    /// budget (answered after the commit), else deferred with
    /// `rate_limited` or, without epoch/seq, only counted.
    async fn refused(
        &mut self,
        error: FrameError,
        warn: Option<u64>,
        raw: Option<&str>,
        now: Instant,
        rx_ms: i64,
    ) -> Result<(), End> {
        let shared = self.shared;
        let cost = QuarantineRow::cost(raw.map_or(0, str::len)) as f64;
        let budget = shared
            .quarantine_budgets
            .spend(self.device_id, cost, now, || {
                TokenBucket::new(&shared.config.quarantine.as_rate_limit(), now)
            });
        let device_id = self.device_id;
        let log = |what: &str| {
            if let Some(n) = warn {
                // The error may quote what the device sent.
                log::warn!(
                    "device {device_id}: {what} ({}){}",
                    crate::log_text::escape(&error.to_string()),
                    suppressed(n)
                );
            }
        };
        match self.state.refusal(&error, budget, now) {
            Refusal::Quarantine => {
                log("refused frame quarantined");
                let id = error.epoch.zip(error.seq);
                let row = QuarantineRow::refused_frame(device_id.clone(), rx_ms, &error, raw);
                self.enqueue(Entry::Quarantine(Box::new(row)), id).await
            }
            Refusal::Defer => {
                log("refused frame answered rate_limited: quarantine budget spent");
                let q = &shared.metrics.quarantine;
                q.deferred.fetch_add(1, Ordering::Relaxed);
                self.reply_rejected(&deferred(&error)).await
            }
            Refusal::Skip => {
                log("refused frame discarded: quarantine budget spent");
                let q = &shared.metrics.quarantine;
                q.skipped.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Refusal::Abuse => Err(self.abuse()),
        }
    }

    /// Answers a refusal at once with `rejected`, when it has epoch/seq.
    async fn reply_rejected(&mut self, error: &FrameError) -> Result<(), End> {
        match rejected_frame(error) {
            Some(reply) => {
                let r = self.ws.send_text(&reply, self.limit()).await;
                r.map_err(|e| self.write_failed(&e))
            }
            None => Ok(()),
        }
    }

    /// Sustained rate-limit excess: counted, logged, closed with 1008.
    fn abuse(&self) -> End {
        let metrics = &self.shared.metrics;
        metrics.rejected(RejectReason::RateLimited);
        metrics.abuse_closes.fetch_add(1, Ordering::Relaxed);
        let abuse_after = self.shared.config.rate_limit.abuse_after;
        log::warn!(
            "device {} from {}: rate limit exceeded for {abuse_after:?}, closing (1008)",
            self.device_id,
            self.peer
        );
        End::Close(CloseCode::Policy, "rate limit exceeded")
    }

    /// The hot path: serialized only when somebody watches; one buffer
    /// shared by every subscriber. A backlog reading is only counted: a
    /// draining backlog reaches the topic as one `backfill` frame per
    /// `backfill_interval`, never as a flood that fills the topic ring.
    fn fan_out(&mut self, text: &str, ts_ms: i64, rx_ms: i64) {
        if self.topic.receiver_count() == 0 {
            return;
        }
        let cfg = &self.shared.config;
        let after_ms = i64::try_from(cfg.backfill_after.as_millis()).unwrap_or(i64::MAX);
        if is_backlog(ts_ms, rx_ms, after_ms) {
            let interval = cfg.backfill_interval.max(Duration::from_millis(10));
            self.backlog.add(ts_ms, interval);
            return;
        }
        self.publish_backlog();
        let frame = dashboard_frame(text, self.device_id, rx_ms);
        let _ = self.topic.send(Utf8Bytes::from(frame));
    }

    /// Publishes the pending `backfill` summary, if any.
    fn publish_backlog(&mut self) {
        if let Some(summary) = self.backlog.take(self.device_id) {
            let _ = self.topic.send(Utf8Bytes::from(summary.to_json()));
        }
    }

    /// The cold path: queues a reading (or a refused frame for the
    /// quarantine) for the store writer, waiting only when the queue is
    /// full (backpressure). `id`: the epoch/seq its answer will name. The
    /// writer gone means the hub is shutting down.
    async fn enqueue(&mut self, entry: Entry, id: Option<(u64, u64)>) -> Result<(), End> {
        let item = Item {
            entry,
            ack: self.mailbox.clone(),
        };
        let queued = match self.shared.queue.try_send(item) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(item)) => {
                self.shared.queue.send(item).await.is_ok()
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        };
        if !queued {
            return Err(End::Close(CloseCode::Away, "hub shutting down"));
        }
        if let Some(id) = id {
            self.state.queued(id);
        }
        Ok(())
    }

    /// At shutdown: sends the answers to what this session queued
    /// (waiting up to 2 s for the last one), then those of other epochs
    /// committed with it — up to an abandoned mark, after which nothing
    /// may be acked.
    async fn flush_acks_at_shutdown(&mut self) {
        let metrics = &self.shared.metrics;
        if let Some(last) = self.state.owed_at_shutdown() {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                loop {
                    let answer = self.mailbox.pop().await;
                    let Some((frame, id)) = answer_frame(&answer) else {
                        return;
                    };
                    if self.ws.send_text(&frame, self.limit()).await.is_err() {
                        return;
                    }
                    if matches!(answer, Answer::Ack(..)) {
                        metrics.acks_sent.fetch_add(1, Ordering::Relaxed);
                    }
                    if id == last {
                        break;
                    }
                }
            })
            .await;
        }
        while let Some(answer) = self.mailbox.try_pop() {
            let Some((frame, _)) = answer_frame(&answer) else {
                break;
            };
            if self.ws.send_text(&frame, self.limit()).await.is_err() {
                break;
            }
            if matches!(answer, Answer::Ack(..)) {
                metrics.acks_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The frame that carries `answer` and the `(epoch, seq)` it names;
/// `None` for [`Answer::Abandoned`], which is not sent but closes.
fn answer_frame(answer: &Answer) -> Option<(String, (u64, u64))> {
    match answer {
        Answer::Ack(epoch, seq) => {
            let (epoch, seq) = (*epoch, *seq);
            Some((HubFrame::Ack { epoch, seq }.to_json(), (epoch, seq)))
        }
        Answer::Rejected(epoch, seq, reason) => {
            let (epoch, seq) = (*epoch, *seq);
            let reason = reason.to_string();
            let frame = HubFrame::Rejected { epoch, seq, reason }.to_json();
            Some((frame, (epoch, seq)))
        }
        Answer::Abandoned => None,
    }
}
