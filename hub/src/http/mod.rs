//! The HTTP side of the hub: the accept loop and its connection limits
//! ([`server`]; what a connection holds while it lives: [`guard`]), the write deadline on every socket ([`timed_io`]), the
//! routing of every request ([`router`]), the WebSocket handshake that
//! hands a socket to a device or dashboard session ([`upgrade`]), the JSON
//! API ([`api`]), the embedded dashboard page ([`web`]), the probes
//! `/healthz`, `/readyz` and `/metrics` ([`probes`]), the separate metrics
//! listener ([`metrics_listener`]) and the hub's own TLS ([`tls`]).
//!
//! Nothing here logs a query string, an `Authorization` value or a token:
//! log lines name the path's device id and the peer address only.

mod api;
mod guard;
mod metrics_listener;
mod probes;
mod router;
mod server;
pub(crate) mod timed_io;
mod tls;
mod upgrade;
mod web;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};

pub(crate) use guard::ConnGuard;
pub(crate) use metrics_listener::serve_metrics;
pub(crate) use server::accept_loop;
pub(crate) use tls::tls_acceptor;

/// Every answer the hub gives over plain HTTP.
type Resp = Response<Full<Bytes>>;

/// A plain-text answer.
fn text(status: StatusCode, body: &'static str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// 401 with `WWW-Authenticate: Bearer`.
fn unauthorized() -> Resp {
    let mut r = text(StatusCode::UNAUTHORIZED, "missing bearer token\n");
    r.headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// 403, the same for every token failure.
fn forbidden() -> Resp {
    text(StatusCode::FORBIDDEN, "forbidden\n")
}
