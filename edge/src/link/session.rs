//! One CONNECTED period: the stream loop over one socket.
//!
//! - The loop reads with a short socket timeout (`link.poll_ms`), so it
//!   wakes up often to send new readings from the outbox and to flush the
//!   pongs tungstenite queues when the hub pings (a pong is only written on
//!   the next read, write or flush). It pings the hub itself after
//!   `ping_after` of silence and gives up on a link silent for `dead_after`
//!   (a half-open TCP connection).
//! - What it sends is paced by the [`Pacer`]; what the hub answers goes to
//!   the outbox: an ack marks readings done, a `rate_limited` rejection
//!   puts the reading back, any other rejection removes it for good.
//! - On shutdown it sends what the in-flight window allows, then waits (at
//!   most [`ACK_WAIT`]) until every reading in flight is acknowledged, and
//!   only then sends close 1001: the hub treats a close as the end of the
//!   stream and sends no more acks after it, so closing first would leave
//!   the last readings in the spool, resent (as duplicates the hub ignores)
//!   on the next start. It then waits briefly for the close reply.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use ems_shared::{HubFrame, RejectReason, CLOSE_CONFLICT, CLOSE_REPLACED, CLOSE_REVOKED};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;

use super::connect::{is_timeout, Socket};
use crate::backoff::Pacer;
use crate::config::LinkConfig;
use crate::health::Health;
use crate::outbox::SharedOutbox;
use crate::shutdown::Shutdown;

/// Readings taken from the outbox per loop iteration.
const SEND_BATCH: usize = 64;
/// How long to wait on shutdown for the acks of readings in flight, before
/// the close (part of the 5 s SIGTERM budget).
pub const ACK_WAIT: Duration = Duration::from_millis(1000);
/// How long to wait for the hub's close reply on shutdown.
const CLOSE_WAIT: Duration = Duration::from_millis(1000);
/// A blocked socket write gives up after this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a CONNECTED period ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// We closed with 1001 because of shutdown.
    Shutdown,
    /// Close code 4000: another connection with our device id took over.
    Replaced,
    /// Close code 4001: the token was revoked or rotated.
    Revoked,
    /// Close code 4002: the hub refuses this device id for a cool-down
    /// (it kept replacing its own connections).
    Conflict,
    /// The hub closed (code, if any) or the socket failed.
    Lost(String),
}

/// The stream loop's state for one connection.
pub struct Session<'a> {
    /// Link tuning.
    cfg: &'a LinkConfig,
    /// Where readings come from and acks go.
    outbox: &'a SharedOutbox,
    /// Stop signal.
    shutdown: &'a Shutdown,
    /// Heartbeat for the watchdog.
    health: &'a Health,
    /// Send pacing; it outlives the connection (a rate limit stays learnt).
    pacer: &'a mut Pacer,
    /// Last frame from the hub.
    last_rx: Instant,
    /// A ping was sent since `last_rx`.
    pinged: bool,
    /// The close code the hub sent, if it is closing.
    close_code: Option<u16>,
    /// When the next `status` frame is due.
    next_status: Instant,
}

impl<'a> Session<'a> {
    /// A session over the link's shared parts.
    pub fn new(
        cfg: &'a LinkConfig,
        outbox: &'a SharedOutbox,
        shutdown: &'a Shutdown,
        health: &'a Health,
        pacer: &'a mut Pacer,
    ) -> Self {
        let now = Instant::now();
        Session {
            cfg,
            outbox,
            shutdown,
            health,
            pacer,
            last_rx: now,
            pinged: false,
            close_code: None,
            next_status: now,
        }
    }

    /// Streams until shutdown or until the connection ends. `control` is a
    /// clone of the TCP stream, to set its timeouts.
    pub fn run(mut self, ws: &mut Socket, control: &TcpStream) -> SessionEnd {
        if let Err(e) = control
            .set_read_timeout(Some(self.cfg.poll))
            .and_then(|()| control.set_write_timeout(Some(WRITE_TIMEOUT)))
        {
            return SessionEnd::Lost(format!("socket setup: {e}"));
        }
        self.outbox.lock().connected();
        self.last_rx = Instant::now();
        // A status frame right away, then every `status_every`.
        self.next_status = Instant::now();
        loop {
            self.health.link_beat();
            if self.shutdown.is_triggered() {
                // The sampler has stopped: send what the window allows, then close.
                self.send_remaining(ws);
                if self.await_acks(ws) {
                    self.close_gracefully(ws);
                }
                return SessionEnd::Shutdown;
            }
            let step = self
                .send(ws)
                .and_then(|()| self.receive(ws))
                .and_then(|()| self.watch_silence(ws));
            if let Err(end) = step {
                return self.after_close(end);
            }
        }
    }

    /// Sends the status frame when due, then what the window and the pacer
    /// allow.
    fn send(&mut self, ws: &mut Socket) -> Result<(), SessionEnd> {
        if Instant::now() >= self.next_status {
            let status = self.outbox.lock().status();
            tolerate_timeout(ws.write(Message::text(status.to_json())), "send")?;
            self.next_status = Instant::now() + self.cfg.status_every;
        }
        let allowed = self.pacer.take(SEND_BATCH, Instant::now());
        let batch = self.outbox.lock().next_batch(allowed);
        self.pacer.refund(allowed - batch.len());
        if !batch.is_empty() {
            for o in &batch {
                tolerate_timeout(ws.write(Message::text(o.json.to_string())), "send")?;
            }
            tolerate_timeout(ws.flush(), "send")?;
        }
        Ok(())
    }

    /// Reads one message, or times out after `poll`.
    fn receive(&mut self, ws: &mut Socket) -> Result<(), SessionEnd> {
        match ws.read() {
            Ok(msg) => {
                self.last_rx = Instant::now();
                self.pinged = false;
                self.on_message(ws, msg)
            }
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {
                // Idle: flush queued pongs / partial writes.
                tolerate_timeout(ws.flush(), "flush")
            }
            Err(tungstenite::Error::ConnectionClosed) | Err(tungstenite::Error::AlreadyClosed) => {
                Err(SessionEnd::Lost("hub closed the connection".into()))
            }
            Err(e) => Err(SessionEnd::Lost(e.to_string())),
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

    fn on_message(&mut self, ws: &mut Socket, msg: Message) -> Result<(), SessionEnd> {
        match msg {
            Message::Text(t) => self.handle_text(t.as_str()),
            Message::Ping(_) => {
                // tungstenite queued the pong; write it now.
                let _ = ws.flush();
            }
            Message::Close(frame) => {
                self.close_code = frame.as_ref().map(|f| u16::from(f.code));
                if let Some(CLOSE_REPLACED | CLOSE_REVOKED | CLOSE_CONFLICT) = self.close_code {
                    // Nothing more to send on this link: finish the closing
                    // handshake (best effort), then report the reason.
                    let _ = ws.flush();
                    return Err(self.after_close(SessionEnd::Lost("closed".into())));
                }
                if self.close_code == Some(u16::from(CloseCode::Policy)) {
                    // 1008: the hub saw sustained excess.
                    self.pacer.rate_limited(Instant::now());
                }
            }
            Message::Pong(_) | Message::Binary(_) | Message::Frame(_) => {}
        }
        Ok(())
    }

    /// Pings a silent hub once; gives up on a link silent for `dead_after`.
    fn watch_silence(&mut self, ws: &mut Socket) -> Result<(), SessionEnd> {
        let silent = self.last_rx.elapsed();
        if silent >= self.cfg.dead_after {
            return Err(SessionEnd::Lost(format!(
                "no frame from the hub for {:.0} s (dead link)",
                silent.as_secs_f64()
            )));
        }
        if silent >= self.cfg.ping_after && !self.pinged {
            self.pinged = true;
            tolerate_timeout(ws.send(Message::Ping(Default::default())), "ping")?;
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
    fn handle_text(&mut self, text: &str) {
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
                let first = !self.pacer.is_paused(Instant::now());
                self.pacer.rate_limited(Instant::now());
                self.outbox.lock().requeue(epoch, seq);
                if first {
                    log::warn!(
                        "hub rate limit reached: readings kept for resending; pacing at {:.0} readings/s",
                        self.pacer.rate()
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

    fn send_remaining(&mut self, ws: &mut Socket) {
        loop {
            let batch = self.outbox.lock().next_batch(SEND_BATCH);
            if batch.is_empty() {
                break;
            }
            for o in &batch {
                if ws.write(Message::text(o.json.to_string())).is_err() {
                    return;
                }
            }
        }
        let _ = ws.flush();
    }

    /// On shutdown, before the close: reads until nothing is in flight (or
    /// [`ACK_WAIT`] passed). Returns false if the link ended meanwhile.
    fn await_acks(&mut self, ws: &mut Socket) -> bool {
        let started = Instant::now();
        let deadline = started + ACK_WAIT;
        let at_stop = self.outbox.lock().stats().in_flight;
        loop {
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
            match ws.read() {
                Ok(Message::Text(t)) => self.handle_text(t.as_str()),
                Ok(Message::Ping(_)) => {
                    let _ = ws.flush();
                }
                Ok(Message::Close(_)) => {
                    // The hub is closing: tungstenite queued the reply.
                    let _ = ws.flush();
                    return false;
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {
                    let _ = ws.flush();
                }
                Err(_) => return false,
            }
        }
    }

    fn close_gracefully(&mut self, ws: &mut Socket) {
        let frame = CloseFrame {
            code: CloseCode::Away,
            reason: "edge shutting down".into(),
        };
        if ws.close(Some(frame)).is_err() {
            return;
        }
        let deadline = Instant::now() + CLOSE_WAIT;
        while Instant::now() < deadline {
            match ws.read() {
                Ok(Message::Text(t)) => self.handle_text(t.as_str()),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {
                    let _ = ws.flush();
                }
                Err(_) => break,
            }
        }
        log::info!("link closed (1001 going away)");
    }
}

/// A socket write that timed out is retried by the next flush; any other
/// failure ends the connection (`what` names the operation).
fn tolerate_timeout(r: tungstenite::Result<()>, what: &str) -> Result<(), SessionEnd> {
    match r {
        Err(tungstenite::Error::Io(io)) if is_timeout(&io) => Ok(()),
        Err(e) => Err(SessionEnd::Lost(format!("{what} failed: {e}"))),
        Ok(()) => Ok(()),
    }
}
