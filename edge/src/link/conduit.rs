//! The socket side of the link that the link thread and the sampler share:
//! the connected socket, its write state, the status timer and the send
//! [`Pacer`], behind one mutex ([`Conduit`]).
//!
//! - The link thread locks it for each turn of its loop (read, send, ping,
//!   flush) and releases it before it sleeps in `poll(2)`; during the stop
//!   (send the rest, await the last acks, close) it keeps it, since the
//!   sampler has stopped by then.
//! - The sampler, right after it appended a reading that may go out, calls
//!   [`Conduit::try_send`]: if the lock is free (`try_lock`, never a wait),
//!   a session is streaming and nothing waits for the socket, it runs the
//!   link's own send routine (`LinkIo::send`) on the non-blocking socket
//!   itself. The link thread is then not woken to send: per reading only
//!   the sampler's tick and the hub's ack wake a thread, and the reading
//!   skips a thread hop on its way to the wire. Whenever the link has to
//!   act or plan again (the lock was busy, no session, bytes left waiting
//!   for the socket, a batch cut short, the status timer moved, an error)
//!   `try_send` says so and the caller wakes the link as before.
//! - The sampler never handles a failure: it records it here
//!   (`LinkIo::failed`) and the link's next turn ends the session with
//!   it. It never sends while the link stops (`LinkIo::direct`).
//! - Lock order: the conduit, then the outbox; neither is held across a
//!   wait (the socket is non-blocking).

use std::io;
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use tungstenite::Message;

use super::connect::Socket;
use super::end::SessionEnd;
use crate::backoff::Pacer;
use crate::config::LinkConfig;
use crate::outbox::SharedOutbox;

/// Readings taken from the outbox per send.
pub(super) const SEND_BATCH: usize = 64;

/// The socket would block (nothing to read now, or no room to write).
pub(super) fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// The link's socket side, shared by the link thread and the sampler (see
/// the module docs).
#[derive(Debug)]
pub struct Conduit {
    /// The state; see [`LinkIo`].
    io: Mutex<LinkIo>,
}

/// What sending needs, per connection and across connections.
pub struct LinkIo {
    /// The connected socket (non-blocking); `None` while RETRYING.
    ws: Option<Socket>,
    /// The sampler may send on `ws`: a session is streaming and not
    /// stopping.
    pub(super) direct: bool,
    /// Bytes wait in tungstenite's or rustls's buffers because the socket
    /// would block (or a pong is queued): flush when it takes bytes again.
    pub(super) write_pending: bool,
    /// When more readings may be sent without a wake-up (set when the last
    /// batch was cut short).
    pub(super) more: Option<Instant>,
    /// When the next `status` frame is due.
    pub(super) next_status: Instant,
    /// Send pacing; it outlives the connection (a rate limit stays learnt).
    pub(super) pacer: Pacer,
    /// How often a `status` frame goes out.
    status_every: Duration,
    /// A failure the sampler met while sending: the link's next turn ends
    /// the session with it.
    pub(super) failed: Option<SessionEnd>,
    /// Readings the sampler put on the wire itself.
    sent_by_sampler: u64,
    /// Readings the link thread put on the wire.
    sent_by_link: u64,
}

impl std::fmt::Debug for LinkIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkIo")
            .field("connected", &self.ws.is_some())
            .field("direct", &self.direct)
            .field("write_pending", &self.write_pending)
            .field("more", &self.more)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// Who is sending (for the counts in [`Conduit::sent_by`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sender {
    /// The link thread.
    Link,
    /// The sampler, through [`Conduit::try_send`].
    Sampler,
}

impl Conduit {
    /// No connection yet; the pacer at full speed.
    pub fn new(cfg: &LinkConfig) -> Conduit {
        let now = Instant::now();
        Conduit {
            io: Mutex::new(LinkIo {
                ws: None,
                direct: false,
                write_pending: false,
                more: None,
                next_status: now,
                pacer: Pacer::new(cfg.max_send_rate, now),
                status_every: cfg.status_every,
                failed: None,
                sent_by_sampler: 0,
                sent_by_link: 0,
            }),
        }
    }

    /// Locks it (the link thread). A panic while it was held (a bug) must
    /// not stop the link: the state is taken over as it is, and a session
    /// in doubt ends at its next failed write.
    pub(super) fn lock(&self) -> MutexGuard<'_, LinkIo> {
        self.io.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Nobody holds the lock right now: the link thread is between turns
    /// (asleep in `poll`, or about to be).
    #[cfg(test)]
    pub(super) fn is_free(&self) -> bool {
        self.io.try_lock().is_ok()
    }

    /// Readings put on the wire since start: `(by the sampler, by the link
    /// thread)`.
    pub fn sent_by(&self) -> (u64, u64) {
        let io = self.lock();
        (io.sent_by_sampler, io.sent_by_link)
    }

    /// The sampler's fast path, called after an append made a reading
    /// sendable: sends what the outbox has now, on the caller's thread, if
    /// that can be done without waiting and without the link having to
    /// plan again. Returns `true` if the link need not be woken; `false`
    /// if it must (the lock was busy, no session streams, bytes wait for
    /// the socket, the batch was cut short, the status timer moved, or the
    /// send failed: the failure is left for the link).
    pub fn try_send(&self, outbox: &SharedOutbox) -> bool {
        let mut io = match self.io.try_lock() {
            Ok(io) => io,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        // `more` already set: a backlog drains on the link's timer (and
        // from the card); leave it to the link.
        if !io.direct
            || io.ws.is_none()
            || io.write_pending
            || io.more.is_some()
            || io.failed.is_some()
        {
            return false;
        }
        let status_due = io.next_status;
        match io.send(outbox, Sender::Sampler) {
            Ok(()) => !io.write_pending && io.more.is_none() && io.next_status == status_due,
            Err(end) => {
                io.failed = Some(end);
                false
            }
        }
    }
}

impl LinkIo {
    /// A connection is up: the socket (already non-blocking) is the
    /// session's, the sampler may send on it, a status frame goes out at
    /// once.
    pub(super) fn attach(&mut self, ws: Socket) {
        self.ws = Some(ws);
        self.direct = true;
        self.write_pending = false;
        self.more = None;
        self.failed = None;
        self.next_status = Instant::now();
    }

    /// The connection is over: the socket is dropped, the sampler no
    /// longer sends.
    pub(super) fn detach(&mut self) {
        self.ws = None;
        self.direct = false;
        self.write_pending = false;
        self.more = None;
        self.failed = None;
    }

    /// The socket, while connected.
    pub(super) fn ws(&mut self) -> Result<&mut Socket, SessionEnd> {
        self.ws
            .as_mut()
            .ok_or_else(|| SessionEnd::Lost("no socket".into()))
    }

    /// Sends the status frame when due, then what the window and the pacer
    /// allow (nothing more while earlier bytes wait for the socket); sets
    /// `more` when the batch was cut short. The one send routine of the
    /// link thread and the sampler.
    pub(super) fn send(&mut self, outbox: &SharedOutbox, who: Sender) -> Result<(), SessionEnd> {
        self.more = None;
        // Bytes already queued (the pong to a ping that just arrived) go
        // first; they hold the readings back only if the socket takes no
        // more: then its POLLOUT wakes the loop. Skipping the pacer's turn
        // for a mere queued pong would lose its timer, and a hub that pings
        // more often than the loop's other timers would stall the backlog.
        self.flush()?;
        if self.write_pending {
            return Ok(());
        }
        let now = Instant::now();
        if now >= self.next_status {
            let status = outbox.lock().status();
            self.write(Message::text(status.to_json()))?;
            self.next_status = now + self.status_every;
        }
        let allowed = self.pacer.take(SEND_BATCH, now);
        let (batch, retry_at) = {
            let mut ob = outbox.lock();
            (ob.next_batch(allowed), ob.retry_at())
        };
        self.pacer.refund(allowed - batch.len());
        let n = batch.len() as u64;
        match who {
            Sender::Link => self.sent_by_link += n,
            Sender::Sampler => self.sent_by_sampler += n,
        }
        for o in &batch {
            self.write(Message::text(o.json.to_string()))?;
        }
        self.flush()?;
        // Cut short by the batch size or the pacer: there may be more.
        if batch.len() == allowed {
            self.more = Some(if allowed == SEND_BATCH {
                now
            } else {
                now + self.pacer.next_token_in(now)
            });
        }
        if let Some(t) = retry_at {
            self.more = Some(self.more.map_or(t, |m| m.min(t)));
        }
        Ok(())
    }

    /// Queues one message; a socket that would block keeps it buffered.
    pub(super) fn write(&mut self, msg: Message) -> Result<(), SessionEnd> {
        match self.ws()?.write(msg) {
            Ok(()) => {
                self.write_pending = true;
                Ok(())
            }
            Err(e) => self.blocked_or_lost(e, "send"),
        }
    }

    /// Writes out what is buffered; notes whether some of it must wait.
    pub(super) fn flush(&mut self) -> Result<(), SessionEnd> {
        if !self.write_pending {
            return Ok(());
        }
        match self.ws()?.flush() {
            Ok(()) => {
                self.write_pending = false;
                Ok(())
            }
            Err(e) => self.blocked_or_lost(e, "flush"),
        }
    }

    /// A write or flush that would block leaves the bytes buffered (sent
    /// when the socket takes them); any other error ends the connection.
    fn blocked_or_lost(&mut self, e: tungstenite::Error, what: &str) -> Result<(), SessionEnd> {
        match e {
            tungstenite::Error::Io(io) if would_block(&io) => {
                self.write_pending = true;
                Ok(())
            }
            e => Err(SessionEnd::Lost(format!("{what} failed: {e}"))),
        }
    }
}
