//! The link: a blocking tungstenite client over rustls that streams the
//! outbox to the hub and never gives up.
//!
//! Two states: RETRYING (connect, or wait a jittered [`Backoff`]) and
//! CONNECTED (the stream loop of a [`Session`]). A blocking client on its
//! own thread keeps the edge free of an async runtime. It shares two locks
//! with the sampler: the outbox's, never held across socket I/O, and the
//! [`Conduit`]'s (the socket side: socket, write state, status timer,
//! pacer), always taken first. The sampler writes a new reading to the
//! non-blocking socket itself when the link thread is asleep and nothing
//! waits, so the link thread is not woken to send it; everything else
//! (reading acks, pings, timers, failures, reconnects, the stop) is the
//! link thread's.
//!
//! - [`connect`](mod@connect): TCP, TLS and the authenticated WebSocket
//!   handshake.
//! - [`session`]: the CONNECTED loop (send, read acks, ping, close),
//!   sleeping in `poll(2)` until a frame arrives or the link must act (see
//!   [`crate::wake`]).
//! - [`conduit`]: the socket side shared with the sampler, and the one
//!   send routine both threads run.
//! - `end`: how a CONNECTED period ends ([`SessionEnd`]).
//! - This module: the RETRYING/CONNECTED loop and how long to back off
//!   after each way a connection can end. Close code 4000 (another
//!   connection with this device id replaced us: a cloned SD card), 4001
//!   (token revoked), 4002 (device id in conflict) and 401/403 back off
//!   near the cap, since retrying soon will not help; other failures back
//!   off exponentially with full jitter (see
//!   `docs/decisions/edge-full-jitter-backoff.md`); a connection that stayed
//!   up `stable_after` resets it.

pub mod conduit;
pub mod connect;
mod end;
pub mod session;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::config::LinkConfig;
use crate::health::{Health, LinkState};
use crate::outbox::SharedOutbox;
use crate::shutdown::Shutdown;

pub use conduit::Conduit;
pub use connect::{connect, resolve, tls_config, ConnectError, Socket, Target, TlsError};
pub use end::SessionEnd;
pub use session::{Session, ACK_WAIT, BEAT_EVERY};

/// The RETRYING/CONNECTED loop.
pub struct Link {
    /// Where to connect.
    pub target: Target,
    /// Tuning.
    pub cfg: LinkConfig,
    /// Shared outbox.
    pub outbox: SharedOutbox,
    /// The socket side shared with the sampler's fast path.
    pub conduit: Arc<Conduit>,
    /// Stop signal: triggered after the sampler has stopped, so the last
    /// readings go out before the close.
    pub shutdown: Shutdown,
    /// Heartbeat (watchdog) and link state (status line).
    pub health: Arc<Health>,
}

/// Reconnect state kept across connections.
struct Retry {
    /// The backoff ceiling grows with consecutive failures.
    backoff: Backoff,
    /// Jitter source.
    rng: fastrand::Rng,
    /// Connection attempts since the last success (for rate-limited logs).
    attempts: u64,
}

impl Link {
    fn set_state(&self, s: LinkState) {
        self.health.set_link_state(s);
    }

    /// Runs until shutdown. Never returns early on a network error.
    pub fn run(self) {
        let mut retry = Retry {
            backoff: Backoff::new(self.cfg.backoff_base, self.cfg.backoff_cap),
            rng: fastrand::Rng::new(),
            attempts: 0,
        };
        while !self.shutdown.is_triggered() {
            self.health.link_beat();
            retry.attempts += 1;
            let delay = match connect(&self.target) {
                Ok((ws, control)) => {
                    log::info!(
                        "CONNECTED to {} (after {} attempt(s)); outbox holds {} readings",
                        self.target.hub.url,
                        retry.attempts,
                        self.outbox.lock().stats().depth
                    );
                    retry.attempts = 0;
                    self.set_state(LinkState::Connected);
                    let since = Instant::now();
                    let session = Session::new(
                        &self.cfg,
                        &self.outbox,
                        &self.shutdown,
                        &self.health,
                        &self.conduit,
                    );
                    let end = session.run(ws, &control);
                    self.outbox.lock().disconnected();
                    // Readings that were on the wire are due at the sync
                    // interval again: the supervisor plans anew.
                    self.outbox.bell().nudge();
                    let up = since.elapsed();
                    if up >= self.cfg.stable_after {
                        retry.backoff.reset();
                    }
                    match self.after_session(end, up, &mut retry) {
                        Some(d) => d,
                        None => break,
                    }
                }
                Err(e) => self.after_failed_connect(&e, &mut retry),
            };
            self.wait(delay);
        }
        self.set_state(LinkState::Retrying("shutting down".into()));
        let (by_sampler, by_link) = self.conduit.sent_by();
        log::debug!(
            "link stopped: {by_sampler} readings sent by the sampler thread, {by_link} by the link thread"
        );
    }

    /// How long to wait after a connection ended (`None`: shutdown).
    fn after_session(&self, end: SessionEnd, up: Duration, retry: &mut Retry) -> Option<Duration> {
        let rng = &mut retry.rng;
        let (delay, state) = match end {
            SessionEnd::Shutdown => return None,
            SessionEnd::Replaced => {
                log::error!(
                    "replaced by another connection with the same device id (cloned SD card?): the hub closed this link with code 4000; backing off"
                );
                (
                    retry.backoff.penalize(rng),
                    "replaced by another connection with the same device id".into(),
                )
            }
            SessionEnd::Revoked => {
                log::error!(
                    "the hub closed this link with code 4001: the device token was revoked or rotated; install the new token (EMS_DEVICE_TOKEN); backing off"
                );
                (retry.backoff.penalize(rng), "token revoked (4001)".into())
            }
            SessionEnd::Conflict => {
                log::error!(
                    "the hub refuses this device id for a while (code 4002): two devices share it and keep replacing each other (cloned SD card?); give each board its own device_id; backing off"
                );
                (
                    retry.backoff.penalize(rng),
                    "device id in conflict (4002)".into(),
                )
            }
            SessionEnd::Lost(why) => {
                let d = retry.backoff.next_delay(rng);
                log::warn!(
                    "link lost after {:.1} s: {why}; RETRYING in {:.1} s",
                    up.as_secs_f64(),
                    d.as_secs_f64()
                );
                (d, why)
            }
        };
        self.set_state(LinkState::Retrying(state));
        Some(delay)
    }

    /// How long to wait after a failed connection attempt; an auth refusal
    /// is logged as an error every time, a network failure only now and
    /// then.
    fn after_failed_connect(&self, e: &ConnectError, retry: &mut Retry) -> Duration {
        let d = if e.is_auth() {
            retry.backoff.penalize(&mut retry.rng)
        } else {
            retry.backoff.next_delay(&mut retry.rng)
        };
        let attempts = retry.attempts;
        let msg = format!("{e}; RETRYING in {:.1} s", d.as_secs_f64());
        if e.needs_attention() {
            log::error!("{msg}");
        } else if attempts <= 3 || attempts % 20 == 0 {
            log::warn!("{msg} (attempt {attempts})");
        } else {
            log::debug!("{msg} (attempt {attempts})");
        }
        self.set_state(LinkState::Retrying(e.to_string()));
        d
    }

    /// Waits `delay` or until shutdown, beating the watchdog meanwhile.
    fn wait(&self, delay: Duration) {
        let until = Instant::now() + delay;
        while Instant::now() < until {
            self.health.link_beat();
            let step = until
                .saturating_duration_since(Instant::now())
                .min(BEAT_EVERY);
            if self.shutdown.wait(step) {
                break;
            }
        }
    }
}
