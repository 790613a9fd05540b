//! The HTTP API, JSON over `GET`/`POST`, authenticated with
//! `Authorization: Bearer <token>` only (never a query parameter or a
//! cookie, so no CSRF: a cross-site page cannot set that header without a
//! CORS preflight, which the hub never grants).
//!
//! Viewer token (`emsv_…`), scope enforced exactly as on the socket:
//! - `GET /api/devices`: the devices the viewer may watch, with presence.
//! - `GET /api/devices/{id}/readings?from_ms=&to_ms=&limit=`: history,
//!   oldest first (defaults: the last hour, 1000 readings; at most 10000),
//!   with each reading's plausibility `flags`.
//! - `GET /api/devices/{id}/energy?from_ms=&to_ms=&bucket=&tz=`: energy
//!   per local hour, day or month ([`energy`]).
//! - `GET /api/fleet/energy?from_ms=&to_ms=&tz=`: every device's energy
//!   over local days, one store query for the whole fleet ([`fleet`]).
//! - `GET /api/devices/{id}/readings.csv?from_ms=&to_ms=`: the stored
//!   readings as streamed CSV ([`export`]; routed before the JSON API
//!   because its body is a stream).
//!
//! Admin token (`emsa_…`, `ems-hub admin add NAME`):
//! - `GET /api/admin/devices`: every device with live state.
//! - `POST /api/admin/devices` `{"device_id":"…"}` → 201 with the token
//!   (shown once) and the env-file line.
//! - `POST /api/admin/devices/{id}/rotate` → the new token; the device's
//!   live socket closes with 4001.
//! - `POST /api/admin/devices/{id}/revoke` → 204; the live socket closes
//!   with 4001.
//! - `GET /api/admin/viewers`, `POST /api/admin/viewers`
//!   `{"name":"…","devices":["…"]}` or `{"name":"…","all_devices":true}`
//!   → 201 with the token, `POST /api/admin/viewers/{name}/revoke` → 200
//!   (its dashboards close with 4001 within `viewer_recheck`).
//! - `GET /api/admin/quarantine?device_id=&limit=`: quarantined frames,
//!   newest first (default 100, at most 1000).
//! - `GET /api/admin/admins`: names and times, never tokens;
//!   `POST /api/admin/admins/{name}/revoke` → 200, or 409 for the last
//!   active admin. A revoked admin token is refused at once by this hub and
//!   within a revocation poll (1 s) by any other hub on the database.
//!
//! Tokens are checked against the tokens in memory
//! ([`crate::auth::cache`]), never with a store query per request. The
//! viewer endpoints that read many rows (the device list, a history) run
//! one at a time per viewer token; a few more wait, the rest get 429 with
//! `Retry-After`.
//!
//! Each kind of token works only where it belongs: a device or viewer
//! token on `/api/admin/` is 403, an admin token on `/api/devices` or on a
//! socket is 403. A browser `Origin` must pass the same rule as dashboard
//! sockets. Errors are `{"error":"…"}` and never contain a token. Store
//! calls run on the blocking pool.
//!
//! This module authenticates and dispatches; [`viewer`], [`energy`], [`fleet`],
//! [`export`], [`admin`] and [`quarantine`] hold the endpoints, [`states`]
//! the device state both device lists answer with.

mod admin;
mod background;
mod energy;
pub(crate) mod export;
mod fleet;
mod quarantine;
mod states;
mod viewer;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::Resp;
use crate::auth::cache::Answer as Known;
use crate::auth::handshake::{self, Credentials};
use crate::auth::token::{self, TokenKind};
use crate::metrics::Limit;
use crate::quota::HeavyTurn;
use crate::state::{CallError, Shared};
use crate::store::{Store, StoreError, TokenHash, ViewerScope};

/// What an endpoint answers: a status and a JSON body.
type Answer = Result<(StatusCode, serde_json::Value), ApiError>;

/// What an endpoint that serializes its own body answers: a status and
/// the JSON text (the device lists, written straight from their rows
/// without a [`serde_json::Value`] per device).
type RawAnswer = Result<(StatusCode, Vec<u8>), ApiError>;

/// Largest JSON request body.
const MAX_BODY: usize = 4096;

/// Why an API request failed; each maps to one status and a message that
/// never contains a token.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// No bearer token: 401 with `WWW-Authenticate: Bearer`.
    #[error("missing bearer token")]
    Unauthorized,
    /// Wrong, revoked, out-of-scope or wrong-kind token, or a foreign
    /// Origin: 403 (same body for all token failures).
    #[error("forbidden")]
    Forbidden,
    /// Bad input: 400.
    #[error("{0}")]
    BadRequest(String),
    /// Unknown route or id: 404.
    #[error("{0}")]
    NotFound(String),
    /// The route exists with other methods: 405.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// An id that must be new exists: 409.
    #[error("{0}")]
    Conflict(String),
    /// The store failed: 503.
    #[error("store unavailable")]
    Unavailable,
    /// This viewer token has heavy queries running and waiting: 429.
    #[error("another query of this token is running; try again shortly")]
    TooMany,
    /// The energy slots are being rebuilt: 503 (an answer would be
    /// incomplete).
    #[error("the energy slots are being rebuilt; try again later")]
    Rebuilding,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable | ApiError::Rebuilding => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooMany => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists(what) => ApiError::Conflict(format!("{what} already exists")),
            StoreError::NotFound(what) => ApiError::NotFound(format!("{what} not found")),
            StoreError::Conflict(why) => ApiError::Conflict(why),
            StoreError::Rebuilding => ApiError::Rebuilding,
            other => {
                log::error!("api: store failed: {other}");
                ApiError::Unavailable
            }
        }
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Resp {
    raw_json_response(status, body.to_string().into_bytes())
}

fn raw_json_response(status: StatusCode, body: Vec<u8>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn error_response(e: &ApiError) -> Resp {
    let mut r = json_response(e.status(), &json!({ "error": e.to_string() }));
    if matches!(e, ApiError::Unauthorized) {
        r.headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if matches!(
        e,
        ApiError::TooMany | ApiError::Unavailable | ApiError::Rebuilding
    ) {
        r.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            HeaderValue::from(super::guard::RETRY_AFTER_S),
        );
    }
    r
}

/// Serves one `/api/…` request.
pub(crate) async fn handle(req: Request<Incoming>, peer: SocketAddr, shared: Arc<Shared>) -> Resp {
    let path = req.uri().path().to_owned();
    match route(req, &shared).await {
        Ok((status, body)) => raw_json_response(status, body),
        Err(e) => {
            if !matches!(e, ApiError::NotFound(_)) {
                let path = crate::log_text::escape(&path);
                log::info!("api {path} from {peer}: {} ({})", e.status().as_u16(), e);
            }
            error_response(&e)
        }
    }
}

async fn route(req: Request<Incoming>, shared: &Arc<Shared>) -> RawAnswer {
    if !handshake::origin_allowed(
        req.headers(),
        shared.config.public_url.as_deref(),
        &shared.config.allowed_origins,
    ) {
        return Err(ApiError::Forbidden);
    }
    let path = req.uri().path().to_owned();
    let segs: Vec<&str> = path.trim_start_matches("/api/").split('/').collect();
    let method = req.method().clone();
    let get = method == Method::GET || method == Method::HEAD;
    let post = method == Method::POST;
    let answer = match segs.as_slice() {
        ["devices"] if get => return viewer::devices(&req, shared).await,
        ["devices", id, "readings"] if get => viewer::readings(&req, shared, id).await,
        ["devices", id, "energy"] if get => energy::energy(&req, shared, id).await,
        ["fleet", "energy"] if get => fleet::energy(&req, shared).await,
        ["admin", "devices"] if get => return admin::devices(&req, shared).await,
        ["admin", "devices"] if post => admin::add_device(req, shared).await,
        ["admin", "devices", id, "rotate"] if post => admin::rotate_device(&req, shared, id).await,
        ["admin", "devices", id, "revoke"] if post => admin::revoke_device(&req, shared, id).await,
        ["admin", "viewers"] if get => admin::viewers(&req, shared).await,
        ["admin", "viewers"] if post => admin::add_viewer(req, shared).await,
        ["admin", "viewers", n, "revoke"] if post => admin::revoke_viewer(&req, shared, n).await,
        ["admin", "quarantine"] if get => quarantine::list(&req, shared).await,
        ["admin", "admins"] if get => admin::admins(&req, shared).await,
        ["admin", "admins", n, "revoke"] if post => admin::revoke_admin(&req, shared, n).await,
        ["devices"]
        | ["devices", _, "readings"]
        | ["devices", _, "energy"]
        | ["fleet", "energy"]
        | ["admin", "devices"]
        | ["admin", "viewers"]
        | ["admin", "admins"]
        | ["admin", "devices", _, "rotate" | "revoke"]
        | ["admin", "viewers", _, "revoke"]
        | ["admin", "admins", _, "revoke"]
        | ["admin", "quarantine"] => Err(ApiError::MethodNotAllowed),
        _ => Err(ApiError::NotFound("not found".into())),
    };
    answer.map(|(status, body)| (status, body.to_string().into_bytes()))
}

fn new_token(kind: TokenKind) -> Result<String, ApiError> {
    token::try_generate(kind).map_err(|e| {
        log::error!("api: {e}");
        ApiError::Unavailable
    })
}

fn device_id(id: &str) -> Result<String, ApiError> {
    ems_shared::validate_device_id(id)
        .map(|_| id.to_owned())
        .map_err(|_| {
            ApiError::BadRequest("device id must be 1-64 characters of [A-Za-z0-9_.-]".into())
        })
}

fn name(n: &str) -> Result<String, ApiError> {
    ems_shared::validate_device_id(n)
        .map(|_| n.to_owned())
        .map_err(|_| ApiError::BadRequest("name must be 1-64 characters of [A-Za-z0-9_.-]".into()))
}

/// Runs `f` on the shared store handle on the blocking pool.
async fn store<T: Send + 'static>(
    shared: &Arc<Shared>,
    f: impl FnOnce(&mut dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    shared.store.call(f).await.map_err(|e| match e {
        CallError::Store(e) => ApiError::from(e),
        CallError::Task(e) => {
            log::error!("api: store task failed: {e}");
            ApiError::Unavailable
        }
    })
}

/// The bearer token of `req` if it is of `kind` (syntax and checksum
/// only), as its hash.
fn token_of<B>(req: &Request<B>, kind: TokenKind) -> Result<TokenHash, ApiError> {
    match handshake::bearer(req.headers()) {
        Credentials::Missing => Err(ApiError::Unauthorized),
        Credentials::Malformed => Err(ApiError::BadRequest(
            "malformed Authorization header".into(),
        )),
        Credentials::Bearer(t) if token::kind_of(t) == Some(kind) => Ok(token::hash(t)),
        Credentials::Bearer(_) => Err(ApiError::Forbidden),
    }
}

/// The request's viewer token (hashed) and its scope.
async fn viewer_scope<B>(
    req: &Request<B>,
    shared: &Arc<Shared>,
) -> Result<(TokenHash, ViewerScope), ApiError> {
    let hash = token_of(req, TokenKind::Viewer)?;
    match shared.auth.viewer(&hash).await {
        Known::Yes(scope) => Ok((hash, scope)),
        Known::No => Err(ApiError::Forbidden),
        Known::Unavailable => Err(ApiError::Unavailable),
    }
}

/// Checks the request's admin token.
async fn check_admin<B>(req: &Request<B>, shared: &Arc<Shared>) -> Result<(), ApiError> {
    let hash = token_of(req, TokenKind::Admin)?;
    match shared.auth.admin(&hash).await {
        Known::Yes(_) => Ok(()),
        Known::No => Err(ApiError::Forbidden),
        Known::Unavailable => Err(ApiError::Unavailable),
    }
}

/// The viewer's turn for a heavy query, or 429 when it has one running
/// and enough waiting.
async fn heavy_turn(shared: &Arc<Shared>, viewer: &TokenHash) -> Result<HeavyTurn, ApiError> {
    match shared.quotas.heavy(viewer, false).await {
        Some(t) => Ok(t),
        None => {
            shared.metrics.hardening.refused(Limit::HeavyQueries);
            Err(ApiError::TooMany)
        }
    }
}

/// After a change made here: waits until the tokens in memory include it
/// (one read of the store), so the next request already sees it.
async fn changed(shared: &Arc<Shared>) {
    if !shared.auth.refresh_now().await {
        log::warn!("api: the change is saved; the tokens in memory follow at the next poll");
    }
}

/// Reads a small JSON body.
async fn body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| ApiError::BadRequest(format!("body missing or larger than {MAX_BODY} bytes")))?
        .to_bytes();
    // The message names the position only: serde's own text may quote
    // values from the body, which could be a pasted secret.
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::BadRequest(format!(
            "invalid JSON body (line {}, column {}); see README.md (Dashboards) for the fields",
            e.line(),
            e.column()
        ))
    })
}
