//! Where a request goes, in order: the probes `/metrics` (404 when it has
//! a listener of its own, `--metrics-listen`) and `/readyz`, the
//! query-string rule, the embedded page, the API, `/healthz`, and the two
//! WebSocket routes. Counts the outcome of every request on a `/ws/`
//! route by its status.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::{BodyExt, Either};
use hyper::body::{Body, Incoming};
use hyper::{Method, Request, Response, StatusCode};

use super::api::export::{Body2, ChunkBody, PACED_FROM};
use super::upgrade::{self, Side};
use super::{api, probes, text, web, ConnGuard, Resp};
use crate::auth::handshake::{self, Route};
use crate::metrics::Handshake;
use crate::state::Shared;

/// Answers one request: the streamed CSV export here (its body is a
/// stream), everything else through [`dispatch_whole`].
pub(super) async fn dispatch(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    guard: ConnGuard,
) -> Response<Body2> {
    if api::export::is_route(&req) {
        if let Some(refused) = query_rule(&req, peer) {
            return refused.map(Either::Left);
        }
        return api::export::readings_csv(req, peer, shared).await;
    }
    let resp = dispatch_whole(req, peer, shared, guard).await;
    let large = resp
        .body()
        .size_hint()
        .exact()
        .is_some_and(|n| n >= PACED_FROM as u64);
    if !large {
        return resp.map(Either::Left);
    }
    let (parts, body) = resp.into_parts();
    // A whole body is ready at once: collecting it moves the bytes.
    match body.collect().await {
        Ok(whole) => Response::from_parts(parts, Either::Right(ChunkBody::paced(whole.to_bytes()))),
        Err(never) => match never {},
    }
}

/// Answers one request whose answer is a whole body.
async fn dispatch_whole(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    guard: ConnGuard,
) -> Resp {
    if req.uri().query().is_none() && (req.method() == Method::GET || req.method() == Method::HEAD)
    {
        match req.uri().path() {
            // With a metrics listener of its own, not here.
            "/metrics" if shared.config.metrics_listen.is_some() => {
                return text(StatusCode::NOT_FOUND, "not found\n")
            }
            "/metrics" => return probes::metrics(&shared),
            "/readyz" => return probes::readyz(&shared),
            _ => {}
        }
    }
    let ws_route = req.uri().path().starts_with("/ws/");
    let resp = route(req, peer, shared.clone(), guard).await;
    if ws_route {
        shared.metrics.handshake(outcome(resp.status()));
    }
    resp
}

/// How a handshake on a `/ws/` route ended, by the answer's status.
fn outcome(status: StatusCode) -> Handshake {
    match status {
        StatusCode::SWITCHING_PROTOCOLS => Handshake::Upgraded,
        StatusCode::UNAUTHORIZED => Handshake::Unauthorized,
        StatusCode::FORBIDDEN => Handshake::Forbidden,
        StatusCode::UPGRADE_REQUIRED | StatusCode::METHOD_NOT_ALLOWED => Handshake::NotUpgrade,
        s if s.is_server_error() => Handshake::Unavailable,
        _ => Handshake::BadRequest,
    }
}

async fn route(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    guard: ConnGuard,
) -> Resp {
    if let Some(refused) = query_rule(&req, peer) {
        return refused;
    }
    if let Some(resp) = web::serve(&req) {
        return resp;
    }
    if req.uri().path().starts_with("/api/") {
        return api::handle(req, peer, shared).await;
    }
    let (device_id, side) = match handshake::route(req.uri().path()) {
        Route::Health => return probes::healthz(req.method()),
        Route::NotFound => return text(StatusCode::NOT_FOUND, "not found\n"),
        Route::BadDeviceId => {
            return text(
                StatusCode::BAD_REQUEST,
                "device id must be 1-64 characters of [A-Za-z0-9_.-]\n",
            )
        }
        Route::Device(id) => (Arc::<str>::from(id), Side::Device),
        Route::Dashboard(id) => (Arc::<str>::from(id), Side::Dashboard),
    };
    upgrade::handshake(req, side, device_id, peer, shared, guard).await
}

/// Only the HTTP API takes query parameters, and never one named like a
/// credential (credentials in a URL end up in proxy logs and browser
/// history); the WebSocket endpoints and every other route take no query
/// at all. `Some` is the refusal.
fn query_rule<B>(req: &Request<B>, peer: SocketAddr) -> Option<Resp> {
    let q = req.uri().query()?;
    if req.uri().path().starts_with("/api/") && !handshake::query_has_credential(q) {
        return None;
    }
    log::info!(
        "refused {} from {peer}: query string present",
        crate::log_text::escape(req.uri().path())
    );
    Some(text(
        StatusCode::BAD_REQUEST,
        "query strings are refused: credentials belong in the Authorization header\n",
    ))
}
