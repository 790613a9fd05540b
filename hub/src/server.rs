//! The accept loop and the HTTP side of every connection: routing, the
//! handshake checks (query string, path, upgrade headers, bearer token)
//! and the hand-over of upgraded sockets to a device or dashboard session.
//!
//! Nothing here logs a query string, an `Authorization` value or a token:
//! log lines name the path's device id and the peer address only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, UPGRADE, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use crate::handshake::{self, Credentials, Route};
use crate::session;
use crate::state::{CallError, Shared};
use crate::token::{self, TokenKind};

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
        async move { Ok::<_, Infallible>(observe(req, peer, shared, guard).await) }
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

type Resp = Response<Full<Bytes>>;

fn text(status: StatusCode, body: &'static str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn unauthorized() -> Resp {
    let mut r = text(StatusCode::UNAUTHORIZED, "missing bearer token\n");
    r.headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

fn forbidden() -> Resp {
    text(StatusCode::FORBIDDEN, "forbidden\n")
}

/// Waits for hyper to hand over the upgraded connection.
async fn upgrade(
    on_upgrade: hyper::upgrade::OnUpgrade,
    role: &str,
    device_id: &str,
    peer: SocketAddr,
) -> Option<WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>> {
    match on_upgrade.await {
        Ok(u) => Some(
            WebSocketStream::from_raw_socket(TokioIo::new(u), Role::Server, Some(ws_config()))
                .await,
        ),
        Err(e) => {
            log::debug!("upgrade of {role} {device_id} from {peer} failed: {e}");
            None
        }
    }
}

/// Bytes queued by `feed` before they are written without a flush.
const WRITE_BUFFER: usize = 16 * 1024;

/// WebSocket settings for every socket: messages and frames up to 16 KiB
/// (larger ones close with 1009), small buffers.
pub(crate) fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(ems_shared::MAX_MESSAGE_BYTES))
        .max_frame_size(Some(ems_shared::MAX_MESSAGE_BYTES))
        // Readings are ~220 bytes: a 512-byte read buffer holds one with
        // room to spare and keeps idle connections small (issue 8: 4 KiB ->
        // 1 KiB saved ~3 KB each, 1 KiB -> 512 B another ~0.5 KB). Larger
        // messages (up to the 16 KiB limit) grow it as they arrive.
        .read_buffer_size(512)
        // Frames are queued with `feed` and written together at `flush`
        // (acks committed together, a subscriber's waiting frames; issue 8).
        // The buffer grows only as far as it is used.
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(256 * 1024)
}

/// `/metrics` and `/readyz` (issue 9), then [`handle`]; counts the outcome
/// of every request on a `/ws/` route by its status.
async fn observe(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    guard: ConnGuard,
) -> Resp {
    use crate::metrics::Handshake;
    if req.uri().query().is_none() && (req.method() == Method::GET || req.method() == Method::HEAD)
    {
        match req.uri().path() {
            "/metrics" => return metrics_response(&shared),
            "/readyz" => return readyz_response(&shared),
            _ => {}
        }
    }
    let ws_route = req.uri().path().starts_with("/ws/");
    let resp = handle(req, peer, shared.clone(), guard).await;
    if ws_route {
        let outcome = match resp.status() {
            StatusCode::SWITCHING_PROTOCOLS => Handshake::Upgraded,
            StatusCode::UNAUTHORIZED => Handshake::Unauthorized,
            StatusCode::FORBIDDEN => Handshake::Forbidden,
            StatusCode::UPGRADE_REQUIRED | StatusCode::METHOD_NOT_ALLOWED => Handshake::NotUpgrade,
            s if s.is_server_error() => Handshake::Unavailable,
            _ => Handshake::BadRequest,
        };
        shared.metrics.handshake(outcome);
    }
    resp
}

/// Refreshes the gauges that are read at scrape time.
fn refresh_gauges(shared: &Shared) {
    let depth = shared
        .queue
        .max_capacity()
        .saturating_sub(shared.queue.capacity());
    shared
        .metrics
        .queue_depth
        .store(depth as i64, std::sync::atomic::Ordering::Relaxed);
}

/// `GET /metrics`: the Prometheus text format. Only closed label sets; no
/// device id, address or token.
fn metrics_response(shared: &Shared) -> Resp {
    refresh_gauges(shared);
    let mut edge = crate::metrics::EdgeSummary::default();
    for (_, e) in shared.registry.edge_statuses() {
        edge.reporting += 1;
        edge.sum_depth = edge.sum_depth.saturating_add(e.status.outbox_depth);
        edge.max_depth = edge.max_depth.max(e.status.outbox_depth);
        edge.max_behind_ms = edge.max_behind_ms.max(e.behind_ms);
        if e.behind_ms > 60_000 {
            edge.behind += 1;
        }
    }
    let body = shared.metrics.render(&edge);
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// `GET /readyz`: 200 when the store is reachable and the writer queue has
/// room, else 503 with the reason.
fn readyz_response(shared: &Shared) -> Resp {
    refresh_gauges(shared);
    match shared.metrics.ready() {
        Ok(()) => text(StatusCode::OK, "ready\n"),
        Err("writer queue full") => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: writer queue full\n",
        ),
        Err("store unreachable") => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: store unreachable\n",
        ),
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: store writer failing\n",
        ),
    }
}

async fn handle(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    guard: ConnGuard,
) -> Resp {
    if let Some(q) = req.uri().query() {
        // Only the HTTP API takes query parameters, and never one named
        // like a credential (issue 6); the WebSocket endpoints and every
        // other route take no query at all.
        if !req.uri().path().starts_with("/api/") || handshake::query_has_credential(q) {
            log::info!(
                "refused {} from {peer}: query string present",
                req.uri().path()
            );
            return text(
                StatusCode::BAD_REQUEST,
                "query strings are refused: credentials belong in the Authorization header\n",
            );
        }
    }
    // Issue 6: the embedded page and the HTTP API.
    if let Some(resp) = crate::web::serve(&req) {
        return resp;
    }
    if req.uri().path().starts_with("/api/") {
        return crate::api::handle(req, peer, shared).await;
    }
    let path = req.uri().path().to_owned();
    let (device_id, is_device) = match handshake::route(&path) {
        Route::Health => {
            return if req.method() == Method::GET || req.method() == Method::HEAD {
                text(StatusCode::OK, "ok\n")
            } else {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            };
        }
        Route::NotFound => return text(StatusCode::NOT_FOUND, "not found\n"),
        Route::BadDeviceId => {
            return text(
                StatusCode::BAD_REQUEST,
                "device id must be 1-64 characters of [A-Za-z0-9_.-]\n",
            )
        }
        Route::Device(id) => (Arc::<str>::from(id), true),
        Route::Dashboard(id) => (Arc::<str>::from(id), false),
    };
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    // Cross-site WebSocket hijacking: a browser's Origin must be ours or
    // an allowed one (issue 6). Devices are not browsers.
    if !is_device
        && !handshake::origin_allowed(
            req.headers(),
            shared.config.public_url.as_deref(),
            &shared.config.allowed_origins,
        )
    {
        log::info!("refused dashboard {device_id} from {peer}: Origin not allowed (403)");
        return forbidden();
    }
    let Some(key) = handshake::websocket_key(req.headers()) else {
        let mut r = text(
            StatusCode::UPGRADE_REQUIRED,
            "a WebSocket upgrade is required\n",
        );
        r.headers_mut()
            .insert(UPGRADE, HeaderValue::from_static("websocket"));
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        return r;
    };
    let accept = derive_accept_key(key);
    let role = if is_device { "device" } else { "dashboard" };
    // Dashboards may carry the viewer token in Sec-WebSocket-Protocol
    // (`ems.v1, ems.bearer.<token>`; issue 6); devices use the header only.
    let offer = if is_device {
        handshake::Offer::default()
    } else {
        match handshake::subprotocols(req.headers()) {
            handshake::Subprotocols::Offered(o) => o,
            handshake::Subprotocols::Malformed => {
                log::info!("refused {role} {device_id} from {peer}: malformed Sec-WebSocket-Protocol (400)");
                return text(
                    StatusCode::BAD_REQUEST,
                    "malformed Sec-WebSocket-Protocol: offer ems.v1 together with ems.bearer.<token>\n",
                );
            }
        }
    };
    let (answer_v1, resume_since) = (offer.v1, offer.resume_since);
    let token = match (handshake::bearer(req.headers()), offer.bearer) {
        (Credentials::Missing, None) => {
            log::info!("refused {role} {device_id} from {peer}: no bearer token (401)");
            return unauthorized();
        }
        (Credentials::Malformed, _) => {
            log::info!("refused {role} {device_id} from {peer}: malformed Authorization (400)");
            return text(StatusCode::BAD_REQUEST, "malformed Authorization header\n");
        }
        (Credentials::Bearer(_), Some(_)) => {
            log::info!("refused {role} {device_id} from {peer}: two credentials (400)");
            return text(
                StatusCode::BAD_REQUEST,
                "send the token either in Authorization or in Sec-WebSocket-Protocol, not both\n",
            );
        }
        (Credentials::Bearer(t), None) | (Credentials::Missing, Some(t)) => t,
    };
    let wanted = if is_device {
        TokenKind::Device
    } else {
        TokenKind::Viewer
    };
    if token::kind_of(token) != Some(wanted) {
        log::info!("refused {role} {device_id} from {peer}: not a {role} token (403)");
        return forbidden();
    }
    let hash = token::hash(token);
    let id = device_id.clone();
    let allowed = shared
        .store
        .call(move |store| {
            if is_device {
                store.device_token_valid(&id, &hash)
            } else {
                // An all-devices viewer may only open topics of real devices:
                // made-up ids would each cost a topic buffer.
                match store.viewer_scope(&hash)? {
                    Some(crate::store::ViewerScope::AllDevices) => store.device_exists(&id),
                    Some(scope) => Ok(scope.allows(&id)),
                    None => Ok(false),
                }
            }
        })
        .await;
    match allowed {
        Ok(true) => {}
        Ok(false) => {
            log::info!(
                "refused {role} {device_id} from {peer}: token not valid for this device (403)"
            );
            return forbidden();
        }
        Err(CallError::Store(e)) => {
            log::error!("token look-up failed: {e}");
            return text(StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n");
        }
        Err(CallError::Task(e)) => {
            log::error!("token look-up task failed: {e}");
            return text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n");
        }
    }

    let on_upgrade = hyper::upgrade::on(&mut req);
    // One task per role, so an idle device connection's task is only as
    // large as the device session (issue 8: a shared task was sized for
    // the dashboard's replay states too).
    if is_device {
        tokio::spawn(async move {
            if let Some(ws) = upgrade(on_upgrade, role, &device_id, peer).await {
                session::device(ws, device_id, peer, shared, Some(hash)).await;
            }
            drop(guard);
        });
    } else {
        tokio::spawn(async move {
            if let Some(ws) = upgrade(on_upgrade, role, &device_id, peer).await {
                shared
                    .metrics
                    .connection(crate::metrics::Role::Dashboard, 1);
                let m = shared.metrics.clone();
                let opts = crate::dashboard::FeedOptions {
                    resume_since,
                    viewer: hash,
                };
                session::dashboard(ws, device_id, peer, shared, opts).await;
                m.connection(crate::metrics::Role::Dashboard, -1);
            }
            drop(guard);
        });
    }

    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    if answer_v1 {
        // Only the protocol name: the token entry is never echoed.
        h.insert(
            hyper::header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(ems_shared::dashboard::SUBPROTOCOL),
        );
    }
    r
}
