//! The accept loop and one HTTP/1.1 connection: the connection limit, the
//! TLS handshake when the hub terminates TLS, hyper's connection with its
//! header timeout, and a graceful end at shutdown. Every request goes to
//! [`super::router`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use super::router;
use crate::state::Shared;

/// Keeps the "all connections finished" channel open while alive
/// (mini-redis's shutdown-complete pattern).
#[derive(Clone)]
pub(crate) struct ConnGuard(#[allow(dead_code)] mpsc::Sender<()>);

impl ConnGuard {
    pub(crate) fn new(tx: mpsc::Sender<()>) -> Self {
        ConnGuard(tx)
    }
}

/// Accepts connections until `shutdown` completes.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    guard: ConnGuard,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let limit = Arc::new(Semaphore::new(shared.config.max_connections.max(1)));
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let shared = shared.clone();
                let guard = guard.clone();
                tokio::spawn(async move {
                    serve_connection(stream, peer, shared, guard).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    guard: ConnGuard,
) {
    let _ = stream.set_nodelay(true);
    match shared.tls.clone() {
        None => serve_io(TokioIo::new(stream), peer, shared, guard).await,
        Some(acceptor) => {
            match tokio::time::timeout(shared.config.handshake_timeout, acceptor.accept(stream))
                .await
            {
                Ok(Ok(tls)) => serve_io(TokioIo::new(tls), peer, shared, guard).await,
                Ok(Err(e)) => log::debug!("TLS handshake with {peer} failed: {e}"),
                Err(_) => log::debug!("TLS handshake with {peer} timed out"),
            }
        }
    }
}

async fn serve_io<I>(io: TokioIo<I>, peer: SocketAddr, shared: Arc<Shared>, guard: ConnGuard)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut shutdown = shared.shutdown.clone();
    let svc_shared = shared.clone();
    let svc_guard = guard.clone();
    let service = hyper::service::service_fn(move |req| {
        let shared = svc_shared.clone();
        let guard = svc_guard.clone();
        async move { Ok::<_, Infallible>(router::dispatch(req, peer, shared, guard).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.config.handshake_timeout)
        .max_buf_size(16 * 1024)
        .keep_alive(true);
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
