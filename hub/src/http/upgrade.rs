//! The WebSocket handshake of `/ws/device/{id}` and `/ws/dashboard/{id}`,
//! one step per rule: the method, the browser `Origin` (dashboards), the
//! upgrade headers, the offered subprotocols (dashboards), the bearer
//! token (header or `ems.bearer.` subprotocol), its kind, and the tokens in
//! memory ([`crate::auth::cache`]: no store query, so forged tokens cost
//! no lock); then the quotas: per client address behind a trusted proxy,
//! dashboards per viewer token (429). A device is told to come back later
//! (503 + `Retry-After`) while the store is unreachable. Then the socket is
//! handed to its session: a device session ([`crate::ingest`]) or a
//! dashboard feed ([`crate::fanout`]), one task each, holding the
//! connection's slots until it ends.
//!
//! The rules themselves are pure functions in [`crate::auth::handshake`];
//! this module turns their verdicts into answers and log lines.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderValue, CONNECTION, RETRY_AFTER, SEC_WEBSOCKET_ACCEPT, UPGRADE,
};
use hyper::{Method, Request, Response, StatusCode};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::guard::{trusted_proxy, RETRY_AFTER_S};
use super::{forbidden, text, unauthorized, ConnGuard, Resp};
use crate::auth::cache::Answer;
use crate::auth::handshake::{self, Credentials, Offer, Subprotocols};
use crate::auth::token::{self, TokenKind};
use crate::config::Config;
use crate::fanout::FeedOptions;
use crate::metrics::{Limit, Role as MetricsRole};
use crate::quota::Slot;
use crate::state::Shared;
use crate::store::{TokenHash, ViewerScope};
use crate::{fanout, ingest, ws};

/// Which session a socket route opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    /// `/ws/device/{id}`: a device streaming readings.
    Device,
    /// `/ws/dashboard/{id}`: a subscriber of one device's live feed.
    Dashboard,
}

impl Side {
    /// The word for log lines.
    fn name(self) -> &'static str {
        match self {
            Side::Device => "device",
            Side::Dashboard => "dashboard",
        }
    }

    /// The only kind of token this side accepts.
    fn token_kind(self) -> TokenKind {
        match self {
            Side::Device => TokenKind::Device,
            Side::Dashboard => TokenKind::Viewer,
        }
    }
}

/// Why a handshake is refused: each refusal is one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// 405: not a `GET`.
    Method,
    /// 403: a foreign `Origin`, a token of the wrong kind, or one the
    /// store does not accept for this device (the same answer for all).
    Forbidden,
    /// 426: not a WebSocket upgrade.
    NotUpgrade,
    /// 400: a malformed `Sec-WebSocket-Protocol`.
    Subprotocols,
    /// 401: no token at all.
    NoToken,
    /// 400: a malformed `Authorization` header.
    Authorization,
    /// 400: a token both in `Authorization` and in the subprotocols.
    TwoTokens,
    /// 400: a device's malformed `Ems-Ack-Window-Ms`.
    AckWindow,
    /// 503 + `Retry-After`: the store is unreachable, or the tokens in
    /// memory are not confirmed by it.
    StoreUnavailable,
    /// 429 + `Retry-After`: a quota (dashboards per token, connections per
    /// client address) is used up.
    TooMany,
}

impl Refusal {
    /// The answer to the client.
    fn answer(self) -> Resp {
        match self {
            Refusal::Method => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
            Refusal::Forbidden => forbidden(),
            Refusal::NotUpgrade => {
                let mut r = text(
                    StatusCode::UPGRADE_REQUIRED,
                    "a WebSocket upgrade is required\n",
                );
                r.headers_mut()
                    .insert(UPGRADE, HeaderValue::from_static("websocket"));
                r.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("Upgrade"));
                r
            }
            Refusal::Subprotocols => text(
                StatusCode::BAD_REQUEST,
                "malformed Sec-WebSocket-Protocol: offer ems.v1 together with ems.bearer.<token>\n",
            ),
            Refusal::NoToken => unauthorized(),
            Refusal::Authorization => {
                text(StatusCode::BAD_REQUEST, "malformed Authorization header\n")
            }
            Refusal::TwoTokens => text(
                StatusCode::BAD_REQUEST,
                "send the token either in Authorization or in Sec-WebSocket-Protocol, not both\n",
            ),
            Refusal::AckWindow => text(
                StatusCode::BAD_REQUEST,
                "malformed Ems-Ack-Window-Ms: whole milliseconds, 1 to 600000\n",
            ),
            Refusal::StoreUnavailable => retry_later(text(
                StatusCode::SERVICE_UNAVAILABLE,
                "store unavailable; try again later\n",
            )),
            Refusal::TooMany => retry_later(text(
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections for this token or address\n",
            )),
        }
    }
}

/// `r` with `Retry-After`.
fn retry_later(mut r: Resp) -> Resp {
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
    r
}

/// The quota slots a session holds until it ends (boxed, and only when
/// there are any: an idle device session's task stays small).
#[derive(Default)]
struct Slots {
    /// The client's address behind a trusted proxy.
    _address: Option<Slot<std::net::IpAddr>>,
    /// The viewer token's dashboard.
    _dashboard: Option<Slot<TokenHash>>,
}

/// A request that passed every rule that needs no store.
struct Checked {
    /// `Sec-WebSocket-Accept` of the answer.
    accept: String,
    /// Whether the dashboard offered `ems.v1` (then the answer names it).
    answer_v1: bool,
    /// `ems.resume.<since_ms>`: the dashboard asks for a replay.
    resume_since: Option<i64>,
    /// Hash of the presented token.
    token: TokenHash,
    /// The device's announced ack window.
    ack_window: Option<Duration>,
}

/// Runs the handshake of `device_id` on `side` and, when every rule
/// passes, starts the session and answers 101.
pub(super) async fn handshake(
    mut req: Request<Incoming>,
    side: Side,
    device_id: Arc<str>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    guard: ConnGuard,
) -> Resp {
    let checked = match check(&req, side, &device_id, peer, &shared.config) {
        Ok(c) => c,
        Err(refused) => return refused.answer(),
    };
    if let Err(refused) = authorize(&shared, side, &device_id, peer, checked.token).await {
        return refused.answer();
    }
    let slots = match take_slots(&req, side, &device_id, peer, &shared, &checked.token) {
        Ok(s) => s,
        Err(refused) => return refused.answer(),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    start_session(
        on_upgrade,
        side,
        device_id,
        peer,
        shared,
        (guard, slots),
        &checked,
    );
    switching_protocols(&checked)
}

/// The quota slots of the session: the client's address when the peer is
/// a trusted proxy (a direct peer's address holds a slot already), and
/// the viewer token's dashboard.
fn take_slots<B>(
    req: &Request<B>,
    side: Side,
    device_id: &str,
    peer: SocketAddr,
    shared: &Shared,
    token: &TokenHash,
) -> Result<Option<Box<Slots>>, Refusal> {
    let role = side.name();
    let mut slots = Slots::default();
    if trusted_proxy(shared, &peer) {
        let trusted = &shared.config.trusted_proxies;
        if let Some(client) = handshake::forwarded_client(req.headers(), trusted) {
            match shared.quotas.per_ip.take(client) {
                Some(s) => slots._address = Some(s),
                None => {
                    shared.metrics.hardening.refused(Limit::PerAddress);
                    log::info!("refused {role} {device_id} for {client} via {peer}: too many connections from that address (429)");
                    return Err(Refusal::TooMany);
                }
            }
        }
    }
    if side == Side::Dashboard {
        match shared.quotas.dashboards.take(*token) {
            Some(s) => slots._dashboard = Some(s),
            None => {
                shared.metrics.hardening.refused(Limit::DashboardsPerToken);
                log::info!("refused dashboard {device_id} from {peer}: the viewer token has {} dashboards open (429)", shared.config.max_dashboards_per_token);
                return Err(Refusal::TooMany);
            }
        }
    }
    let any = slots._address.is_some() || slots._dashboard.is_some();
    Ok(any.then(|| Box::new(slots)))
}

/// The rules that need no store, in the order they answer: the method,
/// the `Origin`, the upgrade headers, the subprotocols, the credentials
/// and the token's kind.
fn check<B>(
    req: &Request<B>,
    side: Side,
    device_id: &str,
    peer: SocketAddr,
    config: &Config,
) -> Result<Checked, Refusal> {
    if req.method() != Method::GET {
        return Err(Refusal::Method);
    }
    let headers = req.headers();
    // Cross-site WebSocket hijacking: a browser's Origin must be ours or an
    // allowed one. Devices are not browsers.
    if side == Side::Dashboard
        && !handshake::origin_allowed(
            headers,
            config.public_url.as_deref(),
            &config.allowed_origins,
        )
    {
        log::info!("refused dashboard {device_id} from {peer}: Origin not allowed (403)");
        return Err(Refusal::Forbidden);
    }
    let accept = accept_key(headers)?;
    let offer = offer(headers, side, device_id, peer)?;
    let token = credential(headers, &offer, side, device_id, peer)?;
    if token::kind_of(token) != Some(side.token_kind()) {
        let role = side.name();
        log::info!("refused {role} {device_id} from {peer}: not a {role} token (403)");
        return Err(Refusal::Forbidden);
    }
    let ack_window = match (side, headers.get(ems_shared::ACK_WINDOW_HEADER)) {
        (Side::Device, Some(value)) => match ems_shared::parse_ack_window(value.as_bytes()) {
            Some(window) => Some(window),
            None => {
                log::info!(
                    "refused device {device_id} from {peer}: malformed Ems-Ack-Window-Ms (400)"
                );
                return Err(Refusal::AckWindow);
            }
        },
        _ => None,
    };
    Ok(Checked {
        accept,
        answer_v1: offer.v1,
        resume_since: offer.resume_since,
        token: token::hash(token),
        ack_window,
    })
}

/// The `Sec-WebSocket-Accept` value, or 426 for a request that is not a
/// WebSocket upgrade.
fn accept_key(headers: &HeaderMap) -> Result<String, Refusal> {
    handshake::websocket_key(headers)
        .map(derive_accept_key)
        .ok_or(Refusal::NotUpgrade)
}

/// What a dashboard offered in `Sec-WebSocket-Protocol` (`ems.v1,
/// ems.bearer.<token>`, `ems.resume.<ms>`): browsers cannot set an
/// `Authorization` header on a WebSocket. Devices use the header only, so
/// their offer is empty.
fn offer<'a>(
    headers: &'a HeaderMap,
    side: Side,
    device_id: &str,
    peer: SocketAddr,
) -> Result<Offer<'a>, Refusal> {
    if side == Side::Device {
        return Ok(Offer::default());
    }
    match handshake::subprotocols(headers) {
        Subprotocols::Offered(o) => Ok(o),
        Subprotocols::Malformed => {
            log::info!(
                "refused dashboard {device_id} from {peer}: malformed Sec-WebSocket-Protocol (400)"
            );
            Err(Refusal::Subprotocols)
        }
    }
}

/// The one token of the request: from `Authorization` or from the offer,
/// never both.
fn credential<'a>(
    headers: &'a HeaderMap,
    offer: &Offer<'a>,
    side: Side,
    device_id: &str,
    peer: SocketAddr,
) -> Result<&'a str, Refusal> {
    let role = side.name();
    match (handshake::bearer(headers), offer.bearer) {
        (Credentials::Missing, None) => {
            log::info!("refused {role} {device_id} from {peer}: no bearer token (401)");
            Err(Refusal::NoToken)
        }
        (Credentials::Malformed, _) => {
            log::info!("refused {role} {device_id} from {peer}: malformed Authorization (400)");
            Err(Refusal::Authorization)
        }
        (Credentials::Bearer(_), Some(_)) => {
            log::info!("refused {role} {device_id} from {peer}: two credentials (400)");
            Err(Refusal::TwoTokens)
        }
        (Credentials::Bearer(t), None) | (Credentials::Missing, Some(t)) => Ok(t),
    }
}

/// Whether `token` opens `device_id` on `side`, by the tokens in memory:
/// the device's current token, or a viewer whose scope holds the device.
/// A device must also find the store reachable (its readings must be
/// committed to be acked).
async fn authorize(
    shared: &Shared,
    side: Side,
    device_id: &Arc<str>,
    peer: SocketAddr,
    token: TokenHash,
) -> Result<(), Refusal> {
    let role = side.name();
    let answer = match side {
        Side::Device => {
            if !shared.metrics.ready_store() {
                log::info!("refused device {device_id} from {peer}: store unreachable (503)");
                return Err(Refusal::StoreUnavailable);
            }
            shared.auth.device(device_id, &token).await
        }
        // An all-devices viewer may only open topics of real devices:
        // made-up ids would each cost a topic buffer.
        Side::Dashboard => match shared.auth.viewer(&token).await {
            Answer::Yes(scope) => {
                let allowed = match scope {
                    ViewerScope::AllDevices => shared.auth.device_known(device_id),
                    scope => scope.allows(device_id),
                };
                if allowed {
                    Answer::Yes(())
                } else {
                    Answer::No
                }
            }
            Answer::No => Answer::No,
            Answer::Unavailable => Answer::Unavailable,
        },
    };
    match answer {
        Answer::Yes(()) => Ok(()),
        Answer::No => {
            log::info!(
                "refused {role} {device_id} from {peer}: token not valid for this device (403)"
            );
            Err(Refusal::Forbidden)
        }
        Answer::Unavailable => {
            log::warn!(
                "refused {role} {device_id} from {peer}: the store has not confirmed the tokens (503)"
            );
            Err(Refusal::StoreUnavailable)
        }
    }
}

/// Hands the upgraded socket to its session, one task per side, so an
/// idle device connection's task is only as large as the device session
/// (a shared task would be sized for the dashboard's replay states too;
/// docs/decisions/hub-idle-connection-memory.md).
fn start_session(
    on_upgrade: hyper::upgrade::OnUpgrade,
    side: Side,
    device_id: Arc<str>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    guard: (ConnGuard, Option<Box<Slots>>),
    checked: &Checked,
) {
    let hash = checked.token;
    match side {
        // The device session waits for the upgrade itself: wrapped in a
        // block of its own, the task would keep a second copy of the
        // session's arguments.
        Side::Device => {
            let upgrade = ingest::session::Upgrade { on_upgrade, guard };
            let admission = ingest::session::Admission {
                token: Some(hash),
                hold: checked.ack_window.map(ingest::hold_for),
            };
            tokio::spawn(ingest::session::run(
                upgrade,
                device_id,
                peer,
                shared,
                Box::new(admission),
            ));
        }
        Side::Dashboard => {
            let opts = FeedOptions {
                resume_since: checked.resume_since,
                viewer: hash,
            };
            tokio::spawn(async move {
                if let Some(ws) = ws::upgrade(on_upgrade, side.name(), &device_id, peer).await {
                    shared.metrics.connection(MetricsRole::Dashboard, 1);
                    let m = shared.metrics.clone();
                    fanout::dashboard::run(ws, device_id, peer, shared, opts).await;
                    m.connection(MetricsRole::Dashboard, -1);
                }
                drop(guard);
            });
        }
    }
}

/// The 101 answer: `Sec-WebSocket-Accept`, and `ems.v1` when offered (only
/// the protocol name: the token entry is never echoed).
fn switching_protocols(checked: &Checked) -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&checked.accept) {
        h.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    if checked.answer_v1 {
        h.insert(
            hyper::header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(ems_shared::dashboard::SUBPROTOCOL),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::token::generate;

    /// A dashboard upgrade request with `headers`.
    fn request(method: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri("/ws/dashboard/dev");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    const UPGRADE_HEADERS: [(&str, &str); 4] = [
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    fn check_dashboard(method: &str, extra: &[(&str, &str)]) -> Result<Checked, Refusal> {
        let mut headers = UPGRADE_HEADERS.to_vec();
        headers.extend_from_slice(extra);
        let peer = "127.0.0.1:1".parse().unwrap();
        let config = Config::new("sqlite::memory:");
        check(
            &request(method, &headers),
            Side::Dashboard,
            "dev",
            peer,
            &config,
        )
    }

    #[test]
    fn rules_answer_in_order() {
        let viewer = generate(TokenKind::Viewer);
        let bearer = format!("Bearer {viewer}");
        let auth = ("authorization", bearer.as_str());
        let foreign = ("origin", "https://evil.example");
        // The method first, then the Origin, then the rest.
        assert_eq!(
            check_dashboard("POST", &[foreign]).err(),
            Some(Refusal::Method)
        );
        assert_eq!(
            check_dashboard("GET", &[foreign, auth]).err(),
            Some(Refusal::Forbidden)
        );
        assert_eq!(check_dashboard("GET", &[]).err(), Some(Refusal::NoToken));
        let bad = ("sec-websocket-protocol", "ems.bearer.x");
        assert_eq!(
            check_dashboard("GET", &[bad]).err(),
            Some(Refusal::Subprotocols)
        );
        let protocol = format!("ems.v1, ems.bearer.{viewer}");
        let offered = ("sec-websocket-protocol", protocol.as_str());
        assert_eq!(
            check_dashboard("GET", &[offered, auth]).err(),
            Some(Refusal::TwoTokens)
        );
        let device = format!("Bearer {}", generate(TokenKind::Device));
        let wrong_kind = ("authorization", device.as_str());
        assert_eq!(
            check_dashboard("GET", &[wrong_kind]).err(),
            Some(Refusal::Forbidden)
        );
        // Either credential passes; only the offer is answered with ems.v1.
        let c = check_dashboard("GET", &[auth]).unwrap();
        assert!(!c.answer_v1);
        assert_eq!(c.token, token::hash(&viewer));
        assert_eq!(c.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let c = check_dashboard("GET", &[offered]).unwrap();
        assert!(c.answer_v1);
    }

    #[test]
    fn refusals_have_their_status() {
        for (r, status) in [
            (Refusal::Method, 405),
            (Refusal::Forbidden, 403),
            (Refusal::NotUpgrade, 426),
            (Refusal::Subprotocols, 400),
            (Refusal::NoToken, 401),
            (Refusal::Authorization, 400),
            (Refusal::TwoTokens, 400),
            (Refusal::StoreUnavailable, 503),
            (Refusal::TooMany, 429),
        ] {
            assert_eq!(r.answer().status().as_u16(), status, "{r:?}");
        }
        let r = Refusal::NotUpgrade.answer();
        assert_eq!(r.headers()["upgrade"], "websocket");
        assert_eq!(
            Refusal::NoToken.answer().headers()["www-authenticate"],
            "Bearer"
        );
        for r in [Refusal::StoreUnavailable, Refusal::TooMany] {
            assert_eq!(r.answer().headers()["retry-after"], "5");
        }
    }
}
