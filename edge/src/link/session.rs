//! One CONNECTED period: the stream loop over one socket, event-driven.
//!
//! - The socket is non-blocking and lives in the [`Conduit`] for the
//!   session, which the sampler shares: a reading appended while this loop
//!   sleeps is written by the sampler itself ([`Conduit::try_send`]), so
//!   the loop is not woken to send it. Each turn of the loop holds the
//!   conduit's lock: it reads every frame that has arrived (until a read
//!   would block: that empties tungstenite's and rustls's buffers too,
//!   which `poll` cannot see), ends the session if the sampler's write
//!   failed, sends what the outbox has, flushes; then it releases the lock
//!   and sleeps in `poll(2)` on the socket and the outbox's
//!   [`Wake`](crate::wake::Wake) descriptor until a frame arrives (an ack,
//!   mostly), the sampler asks it to act (it could not send a reading
//!   itself, or left something to plan: bytes waiting for the socket, a
//!   batch cut short, a status frame sent), a sync released readings, the
//!   socket takes bytes again (only while a write is pending) or the next
//!   timer is due ([`Deadlines`]): the status frame, a ping after
//!   `ping_after` of silence, the dead-link check after `dead_after`, the
//!   pacer's next token, a spool read retry, the watchdog heartbeat. A
//!   reading goes out the moment it is appended; per reading the link
//!   thread wakes once, for its ack; an idle link sleeps for seconds.
//! - What it sends is paced by the [`Pacer`](crate::backoff::Pacer), which
//!   the conduit keeps across connections; what the hub answers goes to
//!   the outbox: an ack marks readings done, a `rate_limited` rejection
//!   puts the reading back, any other rejection removes it for good. The
//!   pongs tungstenite queues for the hub's pings go out with the next
//!   flush, at once.
//! - On shutdown (the sampler has stopped) only this thread writes: it
//!   closes the conduit to the sampler and keeps its lock to the end. It
//!   sends what the in-flight window allows, then waits (at
//!   most [`ACK_WAIT`]) until every reading in flight is acknowledged —
//!   with a ping first, which asks the hub to commit now rather than at
//!   its next commit (every 100 ms, or after a linger of seconds when it
//!   commits readings in runs; docs/protocol.md, ack timing) — and
//!   only then sends close 1001: the hub treats a close as the end of the
//!   stream and sends no more acks after it, so closing first would leave
//!   the last readings in the spool, resent (as duplicates the hub ignores)
//!   on the next start. It then waits briefly for the close reply.

use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use ems_shared::{HubFrame, RejectReason, CLOSE_CONFLICT, CLOSE_REPLACED, CLOSE_REVOKED};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;

use super::conduit::{would_block, Conduit, LinkIo, Sender, SEND_BATCH};
use super::connect::Socket;
use super::end::SessionEnd;
use crate::config::LinkConfig;
use crate::health::Health;
use crate::outbox::SharedOutbox;
use crate::shutdown::Shutdown;
use crate::wake::{self, Wake};

/// How long to wait on shutdown for the acks of readings in flight, before
/// the close (part of the 5 s SIGTERM budget).
pub const ACK_WAIT: Duration = Duration::from_millis(1000);
/// How long to wait for the hub's close reply on shutdown.
const CLOSE_WAIT: Duration = Duration::from_millis(1000);
/// The loop beats the watchdog at least this often while it sleeps.
pub const BEAT_EVERY: Duration = Duration::from_secs(5);

/// The timers of the stream loop, pure: when it must wake up even if
/// nothing arrives.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// The next `status` frame is due.
    pub status: Instant,
    /// Last frame from the hub.
    pub last_rx: Instant,
    /// A ping was sent since `last_rx`.
    pub pinged: bool,
    /// Ping after this much silence.
    pub ping_after: Duration,
    /// Give up after this much silence.
    pub dead_after: Duration,
    /// More readings may be sent then (the pacer's next token, a spool
    /// read retry, or now when a batch was cut short).
    pub more: Option<Instant>,
}

impl Deadlines {
    /// When the loop must wake up next, at most [`BEAT_EVERY`] after `now`.
    pub fn next(&self, now: Instant) -> Instant {
        let silence = if self.pinged {
            self.last_rx + self.dead_after
        } else {
            self.last_rx + self.ping_after
        };
        let mut at = (now + BEAT_EVERY).min(self.status).min(silence);
        if let Some(more) = self.more {
            at = at.min(more);
        }
        at
    }
}

/// The stream loop's state for one connection.
pub struct Session<'a> {
    /// Link tuning.
    cfg: &'a LinkConfig,
    /// Where readings come from and acks go.
    outbox: &'a SharedOutbox,
    /// Stop signal (it also signals `wake`).
    shutdown: &'a Shutdown,
    /// Heartbeat for the watchdog.
    health: &'a Health,
    /// The socket, its write state, the status timer and the pacer, shared
    /// with the sampler's fast path.
    conduit: &'a Conduit,
    /// Signalled when the link must act: a reading the sampler could not
    /// send itself, a sync that released readings, the stop.
    wake: &'a Wake,
    /// Last frame from the hub.
    last_rx: Instant,
    /// A ping was sent since `last_rx`.
    pinged: bool,
    /// The close code the hub sent, if it is closing.
    close_code: Option<u16>,
}

impl<'a> Session<'a> {
    /// A session over the link's shared parts.
    pub fn new(
        cfg: &'a LinkConfig,
        outbox: &'a SharedOutbox,
        shutdown: &'a Shutdown,
        health: &'a Health,
        conduit: &'a Conduit,
    ) -> Self {
        Session {
            cfg,
            wake: outbox.wake(),
            outbox,
            shutdown,
            health,
            conduit,
            last_rx: Instant::now(),
            pinged: false,
            close_code: None,
        }
    }

    /// Streams over `ws` until shutdown or until the connection ends.
    /// `control` is a clone of its TCP stream (to make it non-blocking and
    /// to poll it). The socket is the conduit's for the session (the
    /// sampler may write to it) and is dropped at its end.
    pub fn run(mut self, ws: Socket, control: &TcpStream) -> SessionEnd {
        if let Err(e) = control.set_nonblocking(true) {
            return SessionEnd::Lost(format!("socket setup: {e}"));
        }
        let fd = control.as_raw_fd();
        {
            let mut io = self.conduit.lock();
            // A status frame right away, then every `status_every`.
            io.attach(ws);
            self.outbox.lock().connected();
            // Whatever was signalled while disconnected is in the outbox now.
            self.wake.clear();
        }
        self.last_rx = Instant::now();
        let end = self.stream(fd);
        self.conduit.lock().detach();
        end
    }

    /// The loop of [`Session::run`].
    fn stream(&mut self, fd: RawFd) -> SessionEnd {
        loop {
            self.health.link_beat();
            if self.shutdown.is_triggered() {
                // The sampler has stopped: send what the window allows,
                // then close. The conduit stays locked to the end, and
                // closed to the sampler.
                let mut io = self.conduit.lock();
                io.direct = false;
                self.send_remaining(&mut io);
                if self.await_acks(&mut io, fd) {
                    self.close_gracefully(&mut io, fd);
                }
                return SessionEnd::Shutdown;
            }
            if let Err(end) = self.step(fd) {
                return self.after_close(end);
            }
        }
    }

    /// One turn of the loop: everything that can be done now (under the
    /// conduit's lock), then sleep until something happens (without it).
    fn step(&mut self, fd: RawFd) -> Result<(), SessionEnd> {
        let (deadlines, write_pending) = {
            let mut io = self.conduit.lock();
            // A failure the sampler met while sending ends the session.
            if let Some(end) = io.failed.take() {
                return Err(end);
            }
            self.receive(&mut io)?;
            io.send(self.outbox, Sender::Link)?;
            self.watch_silence(&mut io)?;
            io.flush()?;
            let deadlines = Deadlines {
                status: io.next_status,
                last_rx: self.last_rx,
                pinged: self.pinged,
                ping_after: self.cfg.ping_after,
                dead_after: self.cfg.dead_after,
                more: io.more,
            };
            (deadlines, io.write_pending)
        };
        // From here the sampler may send: a send that leaves bytes waiting,
        // is cut short or moves the status timer signals `wake`, so these
        // deadlines stay good otherwise (the silence timers depend on
        // `last_rx`, which only this thread's reads move).
        let now = Instant::now();
        let timeout = deadlines.next(now).saturating_duration_since(now);
        let ready = wake::wait(fd, write_pending, self.wake, Some(timeout))
            .map_err(|e| SessionEnd::Lost(format!("poll failed: {e}")))?;
        if ready.woken {
            self.wake.clear();
        }
        Ok(())
    }

    /// Handles every frame that has arrived, until a read would block.
    fn receive(&mut self, io: &mut LinkIo) -> Result<(), SessionEnd> {
        loop {
            match io.ws()?.read() {
                Ok(msg) => {
                    self.last_rx = Instant::now();
                    self.pinged = false;
                    self.on_message(io, msg)?;
                }
                Err(tungstenite::Error::Io(e)) if would_block(&e) => return Ok(()),
                Err(tungstenite::Error::ConnectionClosed)
                | Err(tungstenite::Error::AlreadyClosed) => {
                    return Err(SessionEnd::Lost("hub closed the connection".into()))
                }
                Err(e) => return Err(SessionEnd::Lost(e.to_string())),
            }
        }
    }

    /// How the session ended, given the close code the hub sent before
    /// (if any): once the hub has said 4000/4001/4002, whatever fails
    /// afterwards (a write refused after the close, a reset socket) ends
    /// the session *for that reason*, with its back-off, not as a lost
    /// link.
    fn after_close(&self, end: SessionEnd) -> SessionEnd {
        let SessionEnd::Lost(why) = end else {
            return end;
        };
        match self.close_code {
            Some(CLOSE_REPLACED) => SessionEnd::Replaced,
            Some(CLOSE_REVOKED) => SessionEnd::Revoked,
            Some(CLOSE_CONFLICT) => SessionEnd::Conflict,
            Some(c) => SessionEnd::Lost(format!("hub closed the connection (code {c}): {why}")),
            None => SessionEnd::Lost(why),
        }
    }

    fn on_message(&mut self, io: &mut LinkIo, msg: Message) -> Result<(), SessionEnd> {
        match msg {
            Message::Text(t) => self.handle_text(io, t.as_str()),
            Message::Ping(_) => {
                // tungstenite queued the pong; written by the next flush.
                io.write_pending = true;
            }
            Message::Close(frame) => {
                self.close_code = frame.as_ref().map(|f| u16::from(f.code));
                if let Some(CLOSE_REPLACED | CLOSE_REVOKED | CLOSE_CONFLICT) = self.close_code {
                    // Nothing more to send on this link: finish the closing
                    // handshake (best effort), then report the reason.
                    let _ = io.ws()?.flush();
                    return Err(self.after_close(SessionEnd::Lost("closed".into())));
                }
                if self.close_code == Some(u16::from(CloseCode::Policy)) {
                    // 1008: the hub saw sustained excess.
                    io.pacer.rate_limited(Instant::now());
                }
            }
            Message::Pong(_) | Message::Binary(_) | Message::Frame(_) => {}
        }
        Ok(())
    }

    /// Pings a silent hub once; gives up on a link silent for `dead_after`.
    fn watch_silence(&mut self, io: &mut LinkIo) -> Result<(), SessionEnd> {
        let silent = self.last_rx.elapsed();
        if silent >= self.cfg.dead_after {
            return Err(SessionEnd::Lost(format!(
                "no frame from the hub for {:.0} s (dead link)",
                silent.as_secs_f64()
            )));
        }
        if silent >= self.cfg.ping_after && !self.pinged {
            self.pinged = true;
            io.write(Message::Ping(Default::default()))?;
        }
        Ok(())
    }

    /// Handles a hub frame.
    ///
    /// A `rate_limited` rejection means "not taken, send again later": the
    /// reading leaves the in-flight list but stays in the outbox, and the
    /// pacer halves the send rate and pauses. A later cumulative ack cannot
    /// cover it by mistake, since acks match by position in the in-flight
    /// list and the refused reading is no longer in it (when it is resent,
    /// it goes to the end, after every ack already on its way).
    fn handle_text(&mut self, io: &mut LinkIo, text: &str) {
        match serde_json::from_str::<HubFrame>(text) {
            Ok(HubFrame::Ack { epoch, seq }) => {
                let out = self.outbox.lock().ack(epoch, seq);
                if out.unknown {
                    log::debug!("ack for {epoch}/{seq} matches nothing in flight");
                } else {
                    log::trace!("ack {epoch}/{seq}: {} readings done", out.done);
                }
            }
            Ok(HubFrame::Rejected { epoch, seq, reason })
                if reason.starts_with(RejectReason::RateLimited.code()) =>
            {
                // Not delivered, not refused: keep it, slow down, resend.
                let first = !io.pacer.is_paused(Instant::now());
                io.pacer.rate_limited(Instant::now());
                self.outbox.lock().requeue(epoch, seq);
                if first {
                    log::warn!(
                        "hub rate limit reached: readings kept for resending; pacing at {:.0} readings/s",
                        io.pacer.rate()
                    );
                }
            }
            Ok(HubFrame::Rejected { epoch, seq, reason }) => {
                let (out, total) = {
                    let mut ob = self.outbox.lock();
                    let out = ob.rejected(epoch, seq);
                    (out, ob.stats().rejected)
                };
                // Every rejection is a reading lost for good, so it is
                // logged, but a systematic cause (e.g. a clock far ahead)
                // must not flood the journal: log the 1st, 2nd, 4th, 8th…
                if total.is_power_of_two() || total % 1000 == 0 || out.unknown {
                    log::warn!(
                        "hub rejected reading epoch {epoch} seq {seq}: {reason}; removed from the outbox{} ({total} rejected since start)",
                        if out.unknown { " (was not in flight)" } else { "" }
                    );
                }
            }
            Err(e) => log::warn!("unexpected frame from the hub ignored: {e}"),
        }
    }

    fn send_remaining(&mut self, io: &mut LinkIo) {
        loop {
            let batch = self.outbox.lock().next_batch(SEND_BATCH);
            if batch.is_empty() {
                break;
            }
            for o in &batch {
                if io.write(Message::text(o.json.to_string())).is_err() {
                    return;
                }
            }
        }
        let _ = io.flush();
    }

    /// Waits (in poll) until `deadline` for the socket; false if it failed.
    fn wait_socket(&mut self, io: &LinkIo, fd: RawFd, deadline: Instant) -> bool {
        let timeout = deadline.saturating_duration_since(Instant::now());
        match wake::wait(fd, io.write_pending, self.wake, Some(timeout)) {
            Ok(ready) => {
                // The stop signal stays set; only the socket matters now.
                if ready.woken {
                    self.wake.clear();
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Reads what has arrived during the stop: acks (and the close);
    /// returns false if the link ended or the hub is closing.
    fn receive_at_stop(&mut self, io: &mut LinkIo) -> bool {
        loop {
            let Ok(ws) = io.ws() else {
                return false;
            };
            match ws.read() {
                Ok(Message::Text(t)) => self.handle_text(io, t.as_str()),
                Ok(Message::Ping(_)) => io.write_pending = true,
                Ok(Message::Close(_)) => {
                    // The hub is closing: tungstenite queued the reply.
                    let _ = ws.flush();
                    return false;
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if would_block(&e) => return true,
                Err(_) => return false,
            }
        }
    }

    /// On shutdown, before the close: reads until nothing is in flight (or
    /// [`ACK_WAIT`] passed). Returns false if the link ended meanwhile.
    fn await_acks(&mut self, io: &mut LinkIo, fd: RawFd) -> bool {
        let started = Instant::now();
        let deadline = started + ACK_WAIT;
        let at_stop = self.outbox.lock().stats().in_flight;
        if at_stop > 0 && io.write(Message::Ping(Default::default())).is_err() {
            return false;
        }
        loop {
            if io.flush().is_err() || !self.receive_at_stop(io) {
                return false;
            }
            let in_flight = self.outbox.lock().stats().in_flight;
            if in_flight == 0 {
                if at_stop > 0 {
                    log::info!(
                        "{at_stop} readings in flight at the stop: all acknowledged after {:.0} ms",
                        started.elapsed().as_secs_f64() * 1e3
                    );
                }
                return true;
            }
            if Instant::now() >= deadline {
                log::warn!(
                    "{in_flight} readings still unacknowledged {:.1} s after the stop: they stay in the spool and are resent on the next start",
                    ACK_WAIT.as_secs_f64()
                );
                return true;
            }
            self.health.link_beat();
            if !self.wait_socket(io, fd, deadline) {
                return false;
            }
        }
    }

    fn close_gracefully(&mut self, io: &mut LinkIo, fd: RawFd) {
        let frame = CloseFrame {
            code: CloseCode::Away,
            reason: "edge shutting down".into(),
        };
        let Ok(ws) = io.ws() else {
            return;
        };
        match ws.close(Some(frame)) {
            Ok(()) => {}
            Err(tungstenite::Error::Io(e)) if would_block(&e) => io.write_pending = true,
            Err(_) => return,
        }
        let deadline = Instant::now() + CLOSE_WAIT;
        while Instant::now() < deadline {
            let _ = io.flush();
            let Ok(ws) = io.ws() else {
                break;
            };
            match ws.read() {
                Ok(Message::Text(t)) => self.handle_text(io, t.as_str()),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if would_block(&e) => {
                    if !self.wait_socket(io, fd, deadline) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        log::info!("link closed (1001 going away)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Outbox;
    use ems_shared::Reading;
    use std::net::TcpListener;
    use std::sync::mpsc;
    use tungstenite::stream::MaybeTlsStream;

    fn link_config() -> LinkConfig {
        let s = Duration::from_secs;
        LinkConfig {
            backoff_base: s(1),
            backoff_cap: s(1),
            stable_after: s(1),
            connect_timeout: s(10),
            ping_after: s(3600),
            dead_after: s(7200),
            max_in_flight: 512,
            max_send_rate: 5.0,
            // No status frame to wake the loop by chance.
            status_every: s(3600),
        }
    }

    /// A hub stand-in that pings every `ping_every` and reports each
    /// reading's seq (it never acknowledges, never closes).
    fn pinging_hub(ping_every: Duration) -> (u16, mpsc::Receiver<u64>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let mut ws = tungstenite::accept(tcp).unwrap();
            ws.get_ref().set_read_timeout(Some(ping_every)).unwrap();
            loop {
                match ws.read() {
                    Ok(Message::Text(t)) => {
                        let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                        if let Some(seq) = v.get("seq").and_then(|s| s.as_u64()) {
                            if tx.send(seq).is_err() {
                                return;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return,
                }
                if ws.send(Message::Ping(Default::default())).is_err() {
                    return;
                }
            }
        });
        (port, rx)
    }

    #[test]
    fn a_hub_that_pings_often_does_not_stall_a_paced_backlog() {
        // The pacer (5/s, a bucket of 16) lets 16 readings go at once and
        // the rest one per 200 ms; the hub pings every 20 ms, so nearly
        // every wake-up of the loop is a ping. Each reading must still go
        // out on the pacer's timer.
        let (port, seqs) = pinging_hub(Duration::from_millis(20));
        let dir = tempfile::tempdir().unwrap();
        let outbox = SharedOutbox::new(Outbox::open(dir.path(), 1 << 20, 512).unwrap()).unwrap();
        const N: u64 = 24;
        let readings: Vec<Reading> = (0..N)
            .map(|seq| Reading {
                epoch: 7,
                seq,
                ts_ms: 1_764_000_000_000 + seq as i64,
                meter: "main".into(),
                power_w: Some(1.0),
                ..Default::default()
            })
            .collect();
        outbox.append_all(&readings, |_| false);
        let cfg = link_config();
        let shutdown = Shutdown::new();
        let health = Health::new();
        let link = {
            let (outbox, shutdown) = (outbox.clone(), shutdown.clone());
            std::thread::spawn(move || {
                let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
                let control = tcp.try_clone().unwrap();
                let (ws, _) = tungstenite::client::client(
                    format!("ws://127.0.0.1:{port}/"),
                    MaybeTlsStream::Plain(tcp),
                )
                .unwrap();
                let conduit = Conduit::new(&cfg);
                Session::new(&cfg, &outbox, &shutdown, &health, &conduit).run(ws, &control)
            })
        };
        // 16 at once, 8 more in 1.6 s at the pacer's rate: 30 s is plenty
        // on a loaded machine. (A loop that skipped its turn whenever a
        // ping had queued a pong sent the first 16 and then nothing.)
        let mut got = Vec::new();
        while got.len() < N as usize {
            match seqs.recv_timeout(Duration::from_secs(30)) {
                Ok(seq) => got.push(seq),
                Err(_) => break,
            }
        }
        shutdown.trigger();
        let end = link.join().unwrap();
        assert_eq!(got, (0..N).collect::<Vec<_>>(), "the link ended: {end:?}");
    }

    /// A hub stand-in that acknowledges every reading at once and reports
    /// each text frame: `Some(seq)` for a reading, `None` for another
    /// frame (the status frame).
    fn acking_hub() -> (u16, mpsc::Receiver<Option<u64>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let mut ws = tungstenite::accept(tcp).unwrap();
            while let Ok(msg) = ws.read() {
                let Message::Text(t) = msg else { continue };
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                let seq = v.get("seq").and_then(|s| s.as_u64());
                if let (Some(seq), Some(epoch)) = (seq, v.get("epoch").and_then(|e| e.as_u64())) {
                    let ack = HubFrame::Ack { epoch, seq };
                    let json = serde_json::to_string(&ack).unwrap();
                    if ws.send(Message::text(json)).is_err() {
                        return;
                    }
                }
                if tx.send(seq).is_err() {
                    return;
                }
            }
        });
        (port, rx)
    }

    fn reading(seq: u64) -> Reading {
        Reading {
            epoch: 7,
            seq,
            ts_ms: 1_764_000_000_000 + seq as i64,
            meter: "main".into(),
            power_w: Some(1.0),
            ..Default::default()
        }
    }

    #[test]
    fn the_sampler_sends_to_an_idle_link_without_waking_it() {
        // The link thread sleeps in poll between the hub's acks; each
        // reading appended the way the sampler does it goes out from the
        // appending thread, and the link's eventfd stays quiet. (Woken once
        // per reading, the link thread would also be the one to send.)
        let (port, frames) = acking_hub();
        let dir = tempfile::tempdir().unwrap();
        let outbox = SharedOutbox::new(Outbox::open(dir.path(), 1 << 20, 512).unwrap()).unwrap();
        let cfg = LinkConfig {
            max_send_rate: 800.0,
            ..link_config()
        };
        let conduit = std::sync::Arc::new(Conduit::new(&cfg));
        let shutdown = Shutdown::new();
        let health = Health::new();
        let link = {
            let (outbox, shutdown, conduit) = (outbox.clone(), shutdown.clone(), conduit.clone());
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
                let control = tcp.try_clone().unwrap();
                let (ws, _) = tungstenite::client::client(
                    format!("ws://127.0.0.1:{port}/"),
                    MaybeTlsStream::Plain(tcp),
                )
                .unwrap();
                Session::new(&cfg, &outbox, &shutdown, &health, &conduit).run(ws, &control)
            })
        };
        let soon = Duration::from_secs(30);
        // The status frame: the session is streaming.
        assert_eq!(frames.recv_timeout(soon), Ok(None));
        let wake = outbox.wake().clone();
        const N: u64 = 20;
        let mut woken = 0;
        for seq in 0..N {
            let before = wake.notifications();
            outbox.append_all(&[reading(seq)], |ob| conduit.try_send(ob));
            if wake.notifications() > before {
                woken += 1;
            }
            assert_eq!(frames.recv_timeout(soon), Ok(Some(seq)));
            // Wait for the link to be idle again: the ack handled (under
            // the conduit's lock) and that turn over (the lock released).
            // On a loaded machine the link thread can be preempted between
            // the two; an append then would find the lock busy and wake it.
            let until = Instant::now() + soon;
            while (outbox.lock().stats().in_flight > 0 || !conduit.is_free())
                && Instant::now() < until
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let (by_sampler, by_link) = conduit.sent_by();
        {
            let w = wake.clone();
            shutdown.on_trigger(move || w.notify());
        }
        shutdown.trigger();
        assert_eq!(link.join().unwrap(), SessionEnd::Shutdown);
        // Only a reading appended while the link thread was busy (its lock
        // taken) wakes it; on an idle link that is rare, never most.
        assert!(
            woken <= N / 4,
            "the link was woken for {woken} of {N} readings"
        );
        assert_eq!(by_sampler + by_link, N);
        assert!(by_sampler >= N - woken, "sent by the sampler: {by_sampler}");
    }

    #[test]
    fn the_sampler_leaves_a_link_without_a_connection_to_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = SharedOutbox::new(Outbox::open(dir.path(), 1 << 20, 512).unwrap()).unwrap();
        let conduit = Conduit::new(&link_config());
        outbox.append_all(&[reading(0)], |ob| conduit.try_send(ob));
        assert!(!conduit.try_send(&outbox));
        assert_eq!(conduit.sent_by(), (0, 0));
    }

    fn deadlines(now: Instant) -> Deadlines {
        Deadlines {
            status: now + Duration::from_secs(10),
            last_rx: now,
            pinged: false,
            ping_after: Duration::from_secs(30),
            dead_after: Duration::from_secs(75),
            more: None,
        }
    }

    #[test]
    fn an_idle_link_sleeps_until_its_next_timer() {
        let now = Instant::now();
        let s = Duration::from_secs;
        // Idle, status just sent: the watchdog beat is the first timer.
        let d = deadlines(now);
        assert_eq!(d.next(now), now + BEAT_EVERY);
        // The status frame is due in 2 s.
        let d = Deadlines {
            status: now + s(2),
            ..deadlines(now)
        };
        assert_eq!(d.next(now), now + s(2));
        // Silent for 28 s: the ping is due in 2 s; after it, the dead-link
        // check (75 s after the last frame).
        let d = Deadlines {
            last_rx: now - s(28),
            ..deadlines(now)
        };
        assert_eq!(d.next(now), now + s(2));
        let d = Deadlines {
            last_rx: now - s(73),
            pinged: true,
            ..deadlines(now)
        };
        assert_eq!(d.next(now), now + s(2));
        // A long beat interval never hides them: at most BEAT_EVERY.
        let d = Deadlines {
            status: now + s(3600),
            last_rx: now,
            ping_after: s(3600),
            dead_after: s(7200),
            ..deadlines(now)
        };
        assert_eq!(d.next(now), now + BEAT_EVERY);
    }

    #[test]
    fn readings_held_by_the_pacer_set_the_timer() {
        let now = Instant::now();
        let d = Deadlines {
            more: Some(now + Duration::from_millis(40)),
            ..deadlines(now)
        };
        assert_eq!(d.next(now), now + Duration::from_millis(40));
        // A batch cut short by its size: go on at once.
        let d = Deadlines {
            more: Some(now),
            ..deadlines(now)
        };
        assert_eq!(d.next(now), now);
    }
}
