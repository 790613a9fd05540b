//! The link: a blocking tungstenite client over rustls that streams the
//! outbox to the hub and never gives up.
//!
//! Two states, as in the guide: RETRYING (connect, or wait a jittered
//! [`Backoff`]) and CONNECTED (the stream loop of [`Link::session`]).
//!
//! - [`connect`] does TCP (with a timeout), TLS (rustls, ring provider,
//!   webpki-roots plus `ca_file`) and the WebSocket handshake with
//!   `Authorization: Bearer …` — the only place the token is used. 401/403
//!   come back as [`ConnectError::Unauthorized`].
//! - The stream loop reads with a short socket timeout (`link.poll_ms`), so
//!   it wakes up often to send new readings from the outbox and to flush the
//!   pongs tungstenite queues when the hub pings (a known pitfall: a pong is
//!   only written on the next read/write/flush). It pings the hub itself
//!   after `ping_after` of silence and gives up on a link silent for
//!   `dead_after` (a half-open TCP connection).
//! - Close code 4000 (another connection with this device id replaced us: a
//!   cloned SD card) and 401/403 back off near the cap; other failures back
//!   off exponentially; a connection that stayed up `stable_after` resets it.
//! - On shutdown the loop sends what the in-flight window allows, then waits
//!   (at most [`ACK_WAIT`]) until every reading in flight is acknowledged,
//!   and only then sends close 1001: the hub treats a close as the end of
//!   the stream and sends no more acks after it, so closing first would
//!   leave the last readings in the spool, resent (as duplicates the hub
//!   ignores) on the next start. It then waits briefly for the close reply.

use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ems_shared::{
    HubFrame, RejectReason, CLOSE_CONFLICT, CLOSE_REPLACED, CLOSE_REVOKED, MAX_MESSAGE_BYTES,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use thiserror::Error;
use tungstenite::client::IntoClientRequest;
use tungstenite::http::{header, HeaderValue, StatusCode};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Connector, HandshakeError, Message, WebSocket};

use crate::backoff::{Backoff, Pacer};
use crate::config::{DeviceToken, HubEndpoint, LinkConfig};
use crate::health::{Health, LinkState};
use crate::outbox::{Outbox, SharedOutbox};
use crate::shutdown::Shutdown;

/// The socket type of a connected link.
pub type Socket = WebSocket<MaybeTlsStream<TcpStream>>;

/// Readings taken from the outbox per loop iteration.
const SEND_BATCH: usize = 64;
/// How long to wait on shutdown for the acks of readings in flight, before
/// the close (part of the 5 s SIGTERM budget).
pub const ACK_WAIT: Duration = Duration::from_millis(1000);
/// How long to wait for the hub's close reply on shutdown.
const CLOSE_WAIT: Duration = Duration::from_millis(1000);
/// A blocked socket write gives up after this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a TLS setup failed (at startup: a configuration problem).
#[derive(Debug, Error)]
pub enum TlsError {
    /// `ca_file` could not be read or holds no certificate.
    #[error("ca_file {path}: {message}")]
    CaFile {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the setup.
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Why a connection attempt failed. Messages never contain the token.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// DNS resolution failed.
    #[error("cannot resolve {host}: {error}")]
    Resolve {
        /// Host name.
        host: String,
        /// Error.
        error: io::Error,
    },
    /// TCP connect failed on every address.
    #[error("cannot connect to {addr}: {error}")]
    Connect {
        /// Last address tried.
        addr: String,
        /// Error.
        error: io::Error,
    },
    /// The hub answered 401 or 403: the token is missing, wrong or revoked.
    #[error("hub refused the device token ({0}); check EMS_DEVICE_TOKEN and that the device is provisioned on the hub")]
    Unauthorized(u16),
    /// Another HTTP answer instead of 101.
    #[error("hub answered HTTP {0} instead of switching to WebSocket")]
    HttpStatus(u16),
    /// TLS or WebSocket handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The handshake took longer than the connect timeout.
    #[error("handshake timed out")]
    Timeout,
}

impl ConnectError {
    /// Retrying soon will not help (operator action needed).
    pub fn is_auth(&self) -> bool {
        matches!(self, ConnectError::Unauthorized(_))
    }
}

/// Builds the rustls client config: ring, webpki-roots, plus `ca_file`.
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        let err = |message: String| TlsError::CaFile {
            path: path.display().to_string(),
            message,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| err(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no PEM certificate found".into()));
        }
        for c in certs {
            roots.add(c).map_err(|e| err(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What the link needs to connect.
#[derive(Clone)]
pub struct Target {
    /// The hub.
    pub hub: HubEndpoint,
    /// The secret.
    pub token: DeviceToken,
    /// TLS config for `wss`.
    pub tls: Arc<rustls::ClientConfig>,
    /// Handshake timeout.
    pub connect_timeout: Duration,
}

/// Resolves the hub's addresses.
pub fn resolve(hub: &HubEndpoint) -> Result<Vec<SocketAddr>, ConnectError> {
    let addrs: Vec<SocketAddr> = (hub.host.as_str(), hub.port)
        .to_socket_addrs()
        .map_err(|error| ConnectError::Resolve {
            host: hub.host.clone(),
            error,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(ConnectError::Resolve {
            host: hub.host.clone(),
            error: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
        });
    }
    Ok(addrs)
}

/// One connection attempt: TCP, TLS, WebSocket handshake. Returns the
/// socket and a clone of the TCP stream (to change timeouts).
pub fn connect(target: &Target) -> Result<(Socket, TcpStream), ConnectError> {
    let addrs = resolve(&target.hub)?;
    let mut last = None;
    let mut tcp = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, target.connect_timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some((addr, e)),
        }
    }
    let tcp = match (tcp, last) {
        (Some(t), _) => t,
        (None, Some((addr, error))) => {
            return Err(ConnectError::Connect {
                addr: addr.to_string(),
                error,
            })
        }
        (None, None) => {
            return Err(ConnectError::Connect {
                addr: target.hub.host.clone(),
                error: io::Error::new(io::ErrorKind::NotFound, "no address"),
            })
        }
    };
    let io_err = |error: io::Error| ConnectError::Connect {
        addr: target.hub.host.clone(),
        error,
    };
    tcp.set_nodelay(true).map_err(io_err)?;
    tcp.set_read_timeout(Some(target.connect_timeout))
        .map_err(io_err)?;
    tcp.set_write_timeout(Some(target.connect_timeout))
        .map_err(io_err)?;
    let control = tcp.try_clone().map_err(io_err)?;

    let mut request = target
        .hub
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    let mut auth = HeaderValue::from_str(&format!("Bearer {}", target.token.expose()))
        .map_err(|_| ConnectError::Handshake("token is not a valid header value".into()))?;
    auth.set_sensitive(true);
    request.headers_mut().insert(header::AUTHORIZATION, auth);

    let ws_config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    let connector = if target.hub.tls {
        Connector::Rustls(target.tls.clone())
    } else {
        Connector::Plain
    };
    match tungstenite::client_tls_with_config(request, tcp, Some(ws_config), Some(connector)) {
        Ok((ws, _response)) => Ok((ws, control)),
        Err(HandshakeError::Interrupted(_)) => Err(ConnectError::Timeout),
        Err(HandshakeError::Failure(e)) => Err(classify_handshake(e)),
    }
}

fn classify_handshake(e: tungstenite::Error) -> ConnectError {
    match e {
        tungstenite::Error::Http(resp) => {
            let s = resp.status();
            if s == StatusCode::UNAUTHORIZED || s == StatusCode::FORBIDDEN {
                ConnectError::Unauthorized(s.as_u16())
            } else {
                ConnectError::HttpStatus(s.as_u16())
            }
        }
        tungstenite::Error::Io(io) if is_timeout(&io) => ConnectError::Timeout,
        other => ConnectError::Handshake(other.to_string()),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

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

/// The RETRYING/CONNECTED loop.
pub struct Link {
    /// Where to connect.
    pub target: Target,
    /// Tuning.
    pub cfg: LinkConfig,
    /// Shared outbox.
    pub outbox: SharedOutbox,
    /// Stop signal: triggered after the sampler has stopped, so the last
    /// readings go out before the close.
    pub shutdown: Shutdown,
    /// Heartbeat (watchdog) and link state (status line).
    pub health: Arc<Health>,
}

impl Link {
    fn beat(&self) {
        self.health.link_beat();
    }

    fn set_state(&self, s: LinkState) {
        self.health.set_link_state(s);
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock()
    }

    /// Runs until shutdown. Never returns early on a network error.
    pub fn run(self) {
        let mut backoff = Backoff::new(self.cfg.backoff_base, self.cfg.backoff_cap);
        let mut rng = fastrand::Rng::new();
        let mut attempts: u64 = 0;
        let mut pacer = Pacer::new(self.cfg.max_send_rate, Instant::now());
        while !self.shutdown.is_triggered() {
            self.beat();
            attempts += 1;
            let delay = match connect(&self.target) {
                Ok((mut ws, control)) => {
                    log::info!(
                        "CONNECTED to {} (after {attempts} attempt(s)); outbox holds {} readings",
                        self.target.hub.url,
                        self.outbox().stats().depth
                    );
                    attempts = 0;
                    self.set_state(LinkState::Connected);
                    let since = Instant::now();
                    let end = self.session(&mut ws, &control, &mut pacer);
                    self.outbox().disconnected();
                    let up = since.elapsed();
                    if up >= self.cfg.stable_after {
                        backoff.reset();
                    }
                    match end {
                        SessionEnd::Shutdown => break,
                        SessionEnd::Replaced => {
                            log::error!(
                                "replaced by another connection with the same device id (cloned SD card?): the hub closed this link with code 4000; backing off"
                            );
                            let d = backoff.penalize(&mut rng);
                            self.set_state(LinkState::Retrying(
                                "replaced by another connection with the same device id".into(),
                            ));
                            d
                        }
                        SessionEnd::Revoked => {
                            log::error!(
                                "the hub closed this link with code 4001: the device token was revoked or rotated; install the new token (EMS_DEVICE_TOKEN); backing off"
                            );
                            self.set_state(LinkState::Retrying("token revoked (4001)".into()));
                            backoff.penalize(&mut rng)
                        }
                        SessionEnd::Conflict => {
                            log::error!(
                                "the hub refuses this device id for a while (code 4002): two devices share it and keep replacing each other (cloned SD card?); give each board its own device_id; backing off"
                            );
                            self.set_state(LinkState::Retrying(
                                "device id in conflict (4002)".into(),
                            ));
                            backoff.penalize(&mut rng)
                        }
                        SessionEnd::Lost(why) => {
                            let d = backoff.next_delay(&mut rng);
                            log::warn!(
                                "link lost after {:.1} s: {why}; RETRYING in {:.1} s",
                                up.as_secs_f64(),
                                d.as_secs_f64()
                            );
                            self.set_state(LinkState::Retrying(why));
                            d
                        }
                    }
                }
                Err(e) => {
                    let d = if e.is_auth() {
                        backoff.penalize(&mut rng)
                    } else {
                        backoff.next_delay(&mut rng)
                    };
                    let msg = format!("{e}; RETRYING in {:.1} s", d.as_secs_f64());
                    if e.is_auth() {
                        log::error!("{msg}");
                    } else if attempts <= 3 || attempts % 20 == 0 {
                        log::warn!("{msg} (attempt {attempts})");
                    } else {
                        log::debug!("{msg} (attempt {attempts})");
                    }
                    self.set_state(LinkState::Retrying(e.to_string()));
                    d
                }
            };
            // Interruptible wait, beating the watchdog meanwhile.
            let until = Instant::now() + delay;
            while Instant::now() < until {
                self.beat();
                let step = until
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_secs(1));
                if self.shutdown.wait(step) {
                    break;
                }
            }
        }
        self.set_state(LinkState::Retrying("shutting down".into()));
        log::debug!("link stopped");
    }

    /// The CONNECTED stream loop.
    pub fn session(&self, ws: &mut Socket, control: &TcpStream, pacer: &mut Pacer) -> SessionEnd {
        if let Err(e) = control
            .set_read_timeout(Some(self.cfg.poll))
            .and_then(|()| control.set_write_timeout(Some(WRITE_TIMEOUT)))
        {
            return SessionEnd::Lost(format!("socket setup: {e}"));
        }
        self.outbox().connected();
        let mut last_rx = Instant::now();
        let mut pinged = false;
        let mut close_code: Option<u16> = None;
        // A status frame right away, then every `status_every`.
        let mut next_status = Instant::now();
        loop {
            self.beat();
            if self.shutdown.is_triggered() {
                // The sampler has stopped: send what the window allows, then close.
                self.send_remaining(ws);
                if self.await_acks(ws, pacer) {
                    self.close_gracefully(ws, pacer);
                }
                return SessionEnd::Shutdown;
            }
            if Instant::now() >= next_status {
                let status = self.outbox().status();
                if let Err(e) = ws.write(Message::text(status.to_json())) {
                    if !matches!(&e, tungstenite::Error::Io(io) if is_timeout(io)) {
                        return SessionEnd::Lost(format!("send failed: {e}"));
                    }
                }
                next_status = Instant::now() + self.cfg.status_every;
            }
            // Send what the window and the pacer allow.
            let allowed = pacer.take(SEND_BATCH, Instant::now());
            let batch = self.outbox().next_batch(allowed);
            pacer.refund(allowed - batch.len());
            if !batch.is_empty() {
                for o in &batch {
                    if let Err(e) = ws.write(Message::text(o.json.to_string())) {
                        if !matches!(&e, tungstenite::Error::Io(io) if is_timeout(io)) {
                            return SessionEnd::Lost(format!("send failed: {e}"));
                        }
                    }
                }
                if let Err(e) = ws.flush() {
                    if !matches!(&e, tungstenite::Error::Io(io) if is_timeout(io)) {
                        return SessionEnd::Lost(format!("send failed: {e}"));
                    }
                }
            }
            // Read one message, or time out after `poll`.
            match ws.read() {
                Ok(msg) => {
                    last_rx = Instant::now();
                    pinged = false;
                    match msg {
                        Message::Text(t) => self.handle_text(t.as_str(), pacer),
                        Message::Ping(_) => {
                            // tungstenite queued the pong; write it now.
                            let _ = ws.flush();
                        }
                        Message::Close(frame) => {
                            close_code = frame.as_ref().map(|f| u16::from(f.code));
                            if close_code == Some(CLOSE_REPLACED) {
                                // Finish the closing handshake, then report.
                                let _ = ws.flush();
                                return SessionEnd::Replaced;
                            }
                            if close_code == Some(u16::from(CloseCode::Policy)) {
                                // 1008: the hub saw sustained excess.
                                pacer.rate_limited(Instant::now());
                            }
                        }
                        Message::Pong(_) | Message::Binary(_) | Message::Frame(_) => {}
                    }
                }
                Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {
                    // Idle: flush queued pongs / partial writes.
                    if let Err(e) = ws.flush() {
                        if !matches!(&e, tungstenite::Error::Io(io) if is_timeout(io)) {
                            return SessionEnd::Lost(format!("flush failed: {e}"));
                        }
                    }
                }
                Err(tungstenite::Error::ConnectionClosed)
                | Err(tungstenite::Error::AlreadyClosed) => {
                    return match close_code {
                        Some(CLOSE_REPLACED) => SessionEnd::Replaced,
                        Some(CLOSE_REVOKED) => SessionEnd::Revoked,
                        Some(CLOSE_CONFLICT) => SessionEnd::Conflict,
                        Some(c) => {
                            SessionEnd::Lost(format!("hub closed the connection (code {c})"))
                        }
                        None => SessionEnd::Lost("hub closed the connection".into()),
                    };
                }
                Err(e) => return SessionEnd::Lost(e.to_string()),
            }
            let silent = last_rx.elapsed();
            if silent >= self.cfg.dead_after {
                return SessionEnd::Lost(format!(
                    "no frame from the hub for {:.0} s (dead link)",
                    silent.as_secs_f64()
                ));
            }
            if silent >= self.cfg.ping_after && !pinged {
                pinged = true;
                if let Err(e) = ws.send(Message::Ping(Default::default())) {
                    if !matches!(&e, tungstenite::Error::Io(io) if is_timeout(io)) {
                        return SessionEnd::Lost(format!("ping failed: {e}"));
                    }
                }
            }
        }
    }

    /// Handles a hub frame.
    ///
    /// A `rate_limited` rejection means "not taken, send again later": the
    /// reading leaves the in-flight list but stays in the outbox, and the
    /// pacer halves the send rate and pauses. A later cumulative ack cannot
    /// cover it by mistake, since acks match by position in the in-flight
    /// list and the refused reading is no longer in it (when it is resent,
    /// it goes to the end, after every ack already on its way).
    fn handle_text(&self, text: &str, pacer: &mut Pacer) {
        match serde_json::from_str::<HubFrame>(text) {
            Ok(HubFrame::Ack { epoch, seq }) => {
                let out = self.outbox().ack(epoch, seq);
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
                let first = !pacer.is_paused(Instant::now());
                pacer.rate_limited(Instant::now());
                self.outbox().requeue(epoch, seq);
                if first {
                    log::warn!(
                        "hub rate limit reached: readings kept for resending; pacing at {:.0} readings/s",
                        pacer.rate()
                    );
                }
            }
            Ok(HubFrame::Rejected { epoch, seq, reason }) => {
                let (out, total) = {
                    let mut ob = self.outbox();
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

    fn send_remaining(&self, ws: &mut Socket) {
        loop {
            let batch = self.outbox().next_batch(SEND_BATCH);
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
    fn await_acks(&self, ws: &mut Socket, pacer: &mut Pacer) -> bool {
        let started = Instant::now();
        let deadline = started + ACK_WAIT;
        let at_stop = self.outbox().stats().in_flight;
        loop {
            let in_flight = self.outbox().stats().in_flight;
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
            self.beat();
            match ws.read() {
                Ok(Message::Text(t)) => self.handle_text(t.as_str(), pacer),
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

    fn close_gracefully(&self, ws: &mut Socket, pacer: &mut Pacer) {
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
                Ok(Message::Text(t)) => self.handle_text(t.as_str(), pacer),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_file_problems_are_explained() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        assert!(tls_config(Some(&fixtures.join("ca.pem"))).is_ok());
        assert!(tls_config(None).is_ok());
        let e = tls_config(Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = tls_config(Some(&empty)).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn auth_errors_are_told_apart() {
        assert!(ConnectError::Unauthorized(403).is_auth());
        assert!(!ConnectError::HttpStatus(502).is_auth());
        assert!(!ConnectError::Timeout.is_auth());
    }
}
