//! The HTTP API (issue 6), JSON over `GET`/`POST`, authenticated with
//! `Authorization: Bearer <token>` only (never a query parameter or a
//! cookie, so no CSRF: a cross-site page cannot set that header without a
//! CORS preflight, which the hub never grants).
//!
//! Viewer token (`emsv_…`), scope enforced exactly as on the socket:
//! - `GET /api/devices`: the devices the viewer may watch, with presence.
//! - `GET /api/devices/{id}/readings?from_ms=&to_ms=&limit=`: history,
//!   oldest first (defaults: the last hour, 1000 readings; at most 10000).
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
//!   → 201 with the token, `POST /api/admin/viewers/{name}/revoke` → 204
//!   (its dashboards close with 4001 within `viewer_recheck`).
//!
//! Each kind of token works only where it belongs: a device or viewer
//! token on `/api/admin/` is 403, an admin token on `/api/devices` or on a
//! socket is 403. A browser `Origin` must pass the same rule as dashboard
//! sockets. Errors are `{"error":"…"}` and never contain a token. Store
//! calls run on the blocking pool.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;

use ems_shared::DashboardReading;

use crate::handshake::{self, Credentials};
use crate::registry::Kick;
use crate::state::{CallError, Shared};
use crate::store::{Store, StoreError, StoredReading, TokenHash, ViewerScope};
use crate::token::{self, TokenKind};

type Resp = Response<Full<Bytes>>;

/// Largest JSON request body.
const MAX_BODY: usize = 4096;
/// Default and largest `limit` of the history endpoint.
const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 10_000;

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
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists(what) => ApiError::Conflict(format!("{what} already exists")),
            StoreError::NotFound(what) => ApiError::NotFound(format!("{what} not found")),
            other => {
                log::error!("api: store failed: {other}");
                ApiError::Unavailable
            }
        }
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
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
    r
}

/// Serves one `/api/…` request.
pub(crate) async fn handle(req: Request<Incoming>, peer: SocketAddr, shared: Arc<Shared>) -> Resp {
    let path = req.uri().path().to_owned();
    match route(req, &shared).await {
        Ok((status, body)) => json_response(status, &body),
        Err(e) => {
            if !matches!(e, ApiError::NotFound(_)) {
                log::info!("api {path} from {peer}: {} ({})", e.status().as_u16(), e);
            }
            error_response(&e)
        }
    }
}

async fn route(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
) -> Result<(StatusCode, serde_json::Value), ApiError> {
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
    match segs.as_slice() {
        ["devices"] if get => {
            let scope = viewer(&req, shared).await?;
            list_for_viewer(shared, scope).await
        }
        ["devices", id, "readings"] if get => {
            let id = device_id(id)?;
            let scope = viewer(&req, shared).await?;
            if !scope.allows(&id) {
                return Err(ApiError::Forbidden);
            }
            readings(shared, id, req.uri().query().unwrap_or("")).await
        }
        ["admin", "devices"] if get => {
            admin(&req, shared).await?;
            admin_devices(shared).await
        }
        ["admin", "devices"] if post => {
            admin(&req, shared).await?;
            let body: NewDevice = body(req).await?;
            let id = device_id(&body.device_id)?;
            let t = new_token(TokenKind::Device)?;
            let hash = token::hash(&t);
            let (id2, now) = (id.clone(), crate::store::now_ms());
            store(shared, move |s| s.add_device(&id2, &hash, now)).await?;
            log::info!("api: device {id} created");
            Ok((StatusCode::CREATED, device_token_body(&id, &t)))
        }
        ["admin", "devices", id, "rotate"] if post => {
            admin(&req, shared).await?;
            let id = device_id(id)?;
            let t = new_token(TokenKind::Device)?;
            let hash = token::hash(&t);
            let id2 = id.clone();
            store(shared, move |s| s.rotate_device(&id2, &hash)).await?;
            shared.registry.kick(&id, Kick::Revoked);
            log::info!("api: device {id} rotated");
            Ok((StatusCode::OK, device_token_body(&id, &t)))
        }
        ["admin", "devices", id, "revoke"] if post => {
            admin(&req, shared).await?;
            let id = device_id(id)?;
            let (id2, now) = (id.clone(), crate::store::now_ms());
            store(shared, move |s| s.revoke_device(&id2, now)).await?;
            shared.registry.kick(&id, Kick::Revoked);
            log::info!("api: device {id} revoked");
            Ok((StatusCode::OK, json!({ "device_id": id, "revoked": true })))
        }
        ["admin", "viewers"] if get => {
            admin(&req, shared).await?;
            let viewers = store(shared, |s| s.list_viewers()).await?;
            let list: Vec<serde_json::Value> = viewers
                .into_iter()
                .map(|v| {
                    let (all, devices) = match v.scope {
                        ViewerScope::AllDevices => (true, Vec::new()),
                        ViewerScope::Devices(d) => (false, d),
                    };
                    json!({
                        "name": v.name,
                        "all_devices": all,
                        "devices": devices,
                        "created_ms": v.created_ms,
                        "revoked_ms": v.revoked_ms,
                    })
                })
                .collect();
            Ok((StatusCode::OK, json!({ "viewers": list })))
        }
        ["admin", "viewers"] if post => {
            admin(&req, shared).await?;
            let body: NewViewer = body(req).await?;
            let name = name(&body.name)?;
            let scope = if body.all_devices {
                if !body.devices.is_empty() {
                    return Err(ApiError::BadRequest(
                        "give devices or all_devices, not both".into(),
                    ));
                }
                ViewerScope::AllDevices
            } else {
                if body.devices.is_empty() {
                    return Err(ApiError::BadRequest(
                        "a viewer needs at least one device, or all_devices".into(),
                    ));
                }
                let mut ids = Vec::with_capacity(body.devices.len());
                for d in &body.devices {
                    ids.push(device_id(d)?);
                }
                ViewerScope::Devices(ids)
            };
            let t = new_token(TokenKind::Viewer)?;
            let hash = token::hash(&t);
            let (name2, now) = (name.clone(), crate::store::now_ms());
            store(shared, move |s| s.add_viewer(&name2, &hash, &scope, now)).await?;
            log::info!("api: viewer {name} created");
            Ok((StatusCode::CREATED, json!({ "name": name, "token": t })))
        }
        ["admin", "viewers", n, "revoke"] if post => {
            admin(&req, shared).await?;
            let name = name(n)?;
            let (name2, now) = (name.clone(), crate::store::now_ms());
            store(shared, move |s| s.revoke_viewer(&name2, now)).await?;
            log::info!("api: viewer {name} revoked");
            Ok((StatusCode::OK, json!({ "name": name, "revoked": true })))
        }
        ["devices"]
        | ["devices", _, "readings"]
        | ["admin", "devices"]
        | ["admin", "viewers"]
        | ["admin", "devices", _, "rotate" | "revoke"]
        | ["admin", "viewers", _, "revoke"] => Err(ApiError::MethodNotAllowed),
        _ => Err(ApiError::NotFound("not found".into())),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewDevice {
    device_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewViewer {
    name: String,
    #[serde(default)]
    devices: Vec<String>,
    #[serde(default)]
    all_devices: bool,
}

/// One device as the API lists it.
#[derive(Serialize)]
struct DeviceState {
    device_id: String,
    online: bool,
    last_seen_ms: Option<i64>,
    /// Readings waiting in the device's outbox, when it reports them.
    outbox_depth: Option<u64>,
    /// How far behind the device's outbox is, when it reports it.
    behind_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    revoked_ms: Option<Option<i64>>,
}

fn device_token_body(id: &str, t: &str) -> serde_json::Value {
    json!({
        "device_id": id,
        "token": t,
        "env": format!("EMS_DEVICE_TOKEN={t}"),
    })
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

/// The scope of the request's viewer token.
async fn viewer<B>(req: &Request<B>, shared: &Arc<Shared>) -> Result<ViewerScope, ApiError> {
    let hash = token_of(req, TokenKind::Viewer)?;
    store(shared, move |s| s.viewer_scope(&hash))
        .await?
        .ok_or(ApiError::Forbidden)
}

/// Checks the request's admin token.
async fn admin<B>(req: &Request<B>, shared: &Arc<Shared>) -> Result<(), ApiError> {
    let hash = token_of(req, TokenKind::Admin)?;
    match store(shared, move |s| s.admin_name(&hash)).await? {
        Some(_) => Ok(()),
        None => Err(ApiError::Forbidden),
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

/// Live state of the given devices (presence from the registry, last seen
/// from the registry and the store, outbox from the edge's status).
async fn states(shared: &Arc<Shared>, ids: Vec<String>) -> Result<Vec<DeviceState>, ApiError> {
    let ids2 = ids.clone();
    let stored = store(shared, move |s| {
        ids2.iter()
            .map(|id| s.last_seen(id))
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    let now = crate::store::now_ms();
    Ok(ids
        .into_iter()
        .zip(stored)
        .map(|(id, seen)| {
            let presence = shared.registry.presence_ms(&id);
            let last_seen_ms = match (seen, presence) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            let edge = shared.registry.edge_status(&id);
            DeviceState {
                online: shared.registry.is_online(&id),
                last_seen_ms,
                outbox_depth: edge.as_ref().map(|e| e.status.outbox_depth),
                behind_ms: edge.map(|e| {
                    e.behind_ms
                        .saturating_add(now.saturating_sub(e.rx_ms).max(0))
                }),
                device_id: id,
                created_ms: None,
                revoked_ms: None,
            }
        })
        .collect())
}

async fn list_for_viewer(
    shared: &Arc<Shared>,
    scope: ViewerScope,
) -> Result<(StatusCode, serde_json::Value), ApiError> {
    let devices = store(shared, |s| s.list_devices()).await?;
    let ids: Vec<String> = devices
        .into_iter()
        .filter(|d| d.revoked_ms.is_none() && scope.allows(&d.device_id))
        .map(|d| d.device_id)
        .collect();
    let list = states(shared, ids).await?;
    Ok((StatusCode::OK, json!({ "devices": list })))
}

async fn admin_devices(shared: &Arc<Shared>) -> Result<(StatusCode, serde_json::Value), ApiError> {
    let devices = store(shared, |s| s.list_devices()).await?;
    let ids = devices.iter().map(|d| d.device_id.clone()).collect();
    let mut list = states(shared, ids).await?;
    for (state, info) in list.iter_mut().zip(devices) {
        state.created_ms = Some(info.created_ms);
        state.revoked_ms = Some(info.revoked_ms);
    }
    Ok((StatusCode::OK, json!({ "devices": list })))
}

/// Parsed `from_ms`, `to_ms`, `limit` of the history endpoint.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RangeQuery {
    pub from_ms: i64,
    pub to_ms: i64,
    pub limit: usize,
}

/// Parses the history query (`now_ms` for the defaults: the last hour).
pub(crate) fn parse_range(query: &str, now_ms: i64) -> Result<RangeQuery, ApiError> {
    let mut q = RangeQuery {
        from_ms: now_ms.saturating_sub(3_600_000),
        to_ms: now_ms.saturating_add(ems_shared::MAX_FUTURE_SKEW_MS + 1),
        limit: DEFAULT_LIMIT,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = handshake::percent_decode(v);
        let bad = |what: &str| ApiError::BadRequest(format!("{what} must be an integer"));
        match handshake::percent_decode(k).as_str() {
            "from_ms" => q.from_ms = v.parse().map_err(|_| bad("from_ms"))?,
            "to_ms" => q.to_ms = v.parse().map_err(|_| bad("to_ms"))?,
            "limit" => {
                let l: usize = v.parse().map_err(|_| bad("limit"))?;
                if l == 0 || l > MAX_LIMIT {
                    return Err(ApiError::BadRequest(format!(
                        "limit must be 1..={MAX_LIMIT}"
                    )));
                }
                q.limit = l;
            }
            _ => {
                return Err(ApiError::BadRequest(
                    "unknown query parameter (from_ms, to_ms, limit)".into(),
                ))
            }
        }
    }
    if q.from_ms > q.to_ms {
        return Err(ApiError::BadRequest(
            "from_ms must not be after to_ms".into(),
        ));
    }
    Ok(q)
}

fn dashboard_reading(device_id: &str, r: StoredReading) -> DashboardReading {
    let x = r.reading;
    DashboardReading {
        frame_type: "reading".into(),
        device_id: device_id.to_owned(),
        rx_ms: r.received_at_ms,
        epoch: x.epoch,
        seq: x.seq,
        ts_ms: x.ts_ms,
        meter: x.meter,
        voltage_v: x.voltage_v,
        current_a: x.current_a,
        power_w: x.power_w,
        energy_wh: x.energy_wh,
        frequency_hz: x.frequency_hz,
        power_factor: x.power_factor,
        reactive_power_var: x.reactive_power_var,
    }
}

async fn readings(
    shared: &Arc<Shared>,
    id: String,
    query: &str,
) -> Result<(StatusCode, serde_json::Value), ApiError> {
    let q = parse_range(query, crate::store::now_ms())?;
    let id2 = id.clone();
    let mut rows = store(shared, move |s| {
        s.history(&id2, q.from_ms, q.to_ms, q.limit.saturating_add(1), false)
    })
    .await?;
    let truncated = rows.len() > q.limit;
    rows.truncate(q.limit);
    let list: Vec<DashboardReading> = rows
        .into_iter()
        .map(|r| dashboard_reading(&id, r))
        .collect();
    Ok((
        StatusCode::OK,
        json!({ "device_id": id, "readings": list, "truncated": truncated }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_query_parsing() {
        let now = 10_000_000;
        let d = parse_range("", now).unwrap();
        assert_eq!((d.from_ms, d.limit), (now - 3_600_000, DEFAULT_LIMIT));
        assert!(d.to_ms > now);
        let q = parse_range("from_ms=5&to_ms=9&limit=2", now).unwrap();
        assert_eq!(
            q,
            RangeQuery {
                from_ms: 5,
                to_ms: 9,
                limit: 2
            }
        );
        assert_eq!(parse_range("from_ms=-5&to_ms=0", now).unwrap().from_ms, -5);
        for bad in [
            "from_ms=x",
            "limit=0",
            "limit=10001",
            "from_ms=9&to_ms=5",
            "other=1",
            "limit=-1",
        ] {
            assert!(
                matches!(parse_range(bad, now), Err(ApiError::BadRequest(_))),
                "{bad}"
            );
        }
    }
}
