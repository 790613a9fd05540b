//! The accept loop and one HTTP/1.1 connection: the connection limits, the
//! write deadline ([`super::timed_io`]), the TLS handshake when the hub
//! terminates TLS, hyper's connection with its header timeout, and a
//! graceful end at shutdown. Every request goes to [`super::router`].
//!
//! Limits, checked as a connection is accepted:
//! - `max_connections`: a connection holds a slot until it ends — and
//!   when it becomes a WebSocket, until the session ends ([`super::guard`]
//!   travels with the upgraded socket). Over the limit: `503` with
//!   `Retry-After`.
//! - `max_connections_per_ip`: the same per client address; `429`. A
//!   trusted proxy's connections are not counted by its address: its
//!   clients are, by `X-Forwarded-For`, at the WebSocket handshake
//!   ([`super::upgrade`]).
//!
//! A refused connection is answered (and then closed) by a small task of
//! its own, at most [`REFUSALS`] at once; beyond that it is closed without
//! an answer. Nothing else is disturbed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::{HeaderValue, CONNECTION, RETRY_AFTER};
use hyper::StatusCode;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::guard::{trusted_proxy, ConnGuard, Ticket, RETRY_AFTER_S};
use super::timed_io::TimedIo;
use super::{router, text, Resp};
use crate::metrics::Limit;
use crate::state::Shared;

/// Refused connections answered at once; more are closed unanswered.
const REFUSALS: usize = 256;

/// How long a refused connection may take to send its request and read
/// the answer.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Accepts connections until `shutdown` completes.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    guard: ConnGuard,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let limit = Arc::new(Semaphore::new(shared.config.max_connections.max(1)));
    let refusals = Arc::new(Semaphore::new(REFUSALS));
    let alive = crate::notify::Alive::accept_loop(&shared);
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(10);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {
                alive.beat();
                continue;
            }
            a = listener.accept() => a,
        };
        alive.beat();
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(10);
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            refuse(stream, peer, &shared, &refusals, Limit::Connections);
            continue;
        };
        let address = if trusted_proxy(&shared, &peer) {
            None
        } else {
            match shared.quotas.per_ip.take(peer.ip()) {
                Some(slot) => Some(slot),
                None => {
                    drop(permit);
                    refuse(stream, peer, &shared, &refusals, Limit::PerAddress);
                    continue;
                }
            }
        };
        let guard = guard.with(Ticket::new(permit, address, &shared.metrics));
        let shared = shared.clone();
        tokio::spawn(serve_connection(stream, peer, shared, guard));
    }
}

/// Answers a connection over a limit (503 with `Retry-After` for the
/// global one, 429 per address) and closes it, within the refusal budget.
fn refuse(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    refusals: &Arc<Semaphore>,
    limit: Limit,
) {
    shared.metrics.hardening.refused(limit);
    let Ok(turn) = refusals.clone().try_acquire_owned() else {
        return;
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        let _ = stream.set_nodelay(true);
        let io = TimedIo::new(stream, REFUSAL_TIMEOUT, shared.metrics.clone());
        let answer = match limit {
            Limit::Connections => too_busy(),
            _ => too_many_from_you(),
        };
        let mode = Mode::Refuse(answer);
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT * 2, async move {
            match shared.tls.clone() {
                None => serve_io(TokioIo::new(io), peer, shared, mode).await,
                Some(acceptor) => {
                    if let Ok(tls) = acceptor.accept(io).await {
                        serve_io(TokioIo::new(tls), peer, shared, mode).await;
                    }
                }
            }
        })
        .await;
        drop(turn);
    });
}

/// 503: the hub holds `max_connections` connections.
fn too_busy() -> fn() -> Resp {
    || {
        let mut r = text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections; try again later\n",
        );
        r.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
        r
    }
}

/// 429: this address holds `max_connections_per_ip` connections.
fn too_many_from_you() -> fn() -> Resp {
    || {
        let mut r = text(
            StatusCode::TOO_MANY_REQUESTS,
            "too many connections from this address\n",
        );
        r.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
        r
    }
}

/// What a connection's requests get.
#[derive(Clone)]
enum Mode {
    /// Routed ([`router::dispatch`]), holding the connection's guard.
    Serve(ConnGuard),
    /// This answer, then the connection closes.
    Refuse(fn() -> Resp),
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    guard: ConnGuard,
) {
    let _ = stream.set_nodelay(true);
    let io = TimedIo::new(stream, shared.config.write_timeout, shared.metrics.clone());
    match shared.tls.clone() {
        None => serve_io(TokioIo::new(io), peer, shared, Mode::Serve(guard)).await,
        Some(acceptor) => {
            match tokio::time::timeout(shared.config.handshake_timeout, acceptor.accept(io)).await {
                Ok(Ok(tls)) => serve_io(TokioIo::new(tls), peer, shared, Mode::Serve(guard)).await,
                Ok(Err(e)) => log::debug!("TLS handshake with {peer} failed: {e}"),
                Err(_) => log::debug!("TLS handshake with {peer} timed out"),
            }
        }
    }
}

async fn serve_io<I>(io: TokioIo<I>, peer: SocketAddr, shared: Arc<Shared>, mode: Mode)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut shutdown = shared.shutdown.clone();
    let refusing = matches!(mode, Mode::Refuse(_));
    let svc_shared = shared.clone();
    let service = hyper::service::service_fn(move |req| {
        let shared = svc_shared.clone();
        let mode = mode.clone();
        async move {
            let resp = match mode {
                Mode::Serve(guard) => router::dispatch(req, peer, shared, guard).await,
                Mode::Refuse(answer) => {
                    let mut r = answer();
                    r.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                    r.map(http_body_util::Either::Left)
                }
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(if refusing {
            REFUSAL_TIMEOUT
        } else {
            shared.config.handshake_timeout
        })
        .max_buf_size(16 * 1024)
        .keep_alive(!refusing);
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                log::debug!("http connection from {peer} ended: {e}");
            }
        }
        _ = crate::shutdown::shutting_down(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}
