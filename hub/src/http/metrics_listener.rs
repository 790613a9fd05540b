//! `--metrics-listen ADDR`: `/metrics` on an address of its own (e.g.
//! loopback for a Prometheus on the same host), so the public listener
//! need not serve it (it answers 404 then). Serves `GET`/`HEAD /metrics`
//! and 404 for everything else; at most [`CONNECTIONS`] connections at
//! once, each with the hub's write deadline and request-head timeout.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::timed_io::TimedIo;
use super::{probes, text};
use crate::shutdown::shutting_down;
use crate::state::Shared;

/// Scrapers served at once; more wait in the accept queue.
const CONNECTIONS: usize = 16;

/// Serves `/metrics` on `listener` until the hub shuts down.
pub(crate) async fn serve_metrics(listener: TcpListener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let limit = Arc::new(Semaphore::new(CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutting_down(&mut shutdown) => return,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = shutting_down(&mut shutdown) => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                log::warn!("metrics listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let io = TimedIo::new(stream, shared.config.write_timeout, shared.metrics.clone());
            let svc_shared = shared.clone();
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let shared = svc_shared.clone();
                async move {
                    let get = req.method() == Method::GET || req.method() == Method::HEAD;
                    let resp =
                        if get && req.uri().path() == "/metrics" && req.uri().query().is_none() {
                            probes::metrics(&shared)
                        } else {
                            text(StatusCode::NOT_FOUND, "not found\n")
                        };
                    Ok::<_, Infallible>(resp)
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(shared.config.handshake_timeout)
                .max_buf_size(16 * 1024);
            let conn = builder.serve_connection(TokioIo::new(io), service);
            let mut shutdown = shared.shutdown.clone();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        log::debug!("metrics connection from {peer} ended: {e}");
                    }
                }
                _ = shutting_down(&mut shutdown) => conn.as_mut().graceful_shutdown(),
            }
            drop(permit);
        });
    }
}
