//! Handshake rules as pure functions: routing of the request path, the
//! `Authorization` header, and the WebSocket upgrade headers. No I/O here,
//! so every rule is unit-tested without sockets (and fuzzable).

use hyper::header::{HeaderMap, AUTHORIZATION, CONNECTION, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE};

/// What a request path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// `GET /healthz`
    Health,
    /// `/ws/device/{device_id}`
    Device(&'a str),
    /// `/ws/dashboard/{device_id}`
    Dashboard(&'a str),
    /// A `/ws/…` path whose device id is not `[A-Za-z0-9_.-]{1,64}`.
    BadDeviceId,
    /// Anything else.
    NotFound,
}

/// Routes a request path (without query).
pub fn route(path: &str) -> Route<'_> {
    if path == "/healthz" {
        return Route::Health;
    }
    let (kind, id) = if let Some(id) = path.strip_prefix("/ws/device/") {
        (true, id)
    } else if let Some(id) = path.strip_prefix("/ws/dashboard/") {
        (false, id)
    } else {
        return Route::NotFound;
    };
    if ems_shared::validate_device_id(id).is_err() {
        return Route::BadDeviceId;
    }
    if kind {
        Route::Device(id)
    } else {
        Route::Dashboard(id)
    }
}

/// Outcome of reading the `Authorization` header.
#[derive(Debug, PartialEq, Eq)]
pub enum Credentials<'a> {
    /// No `Authorization` header, or not a Bearer credential: 401.
    Missing,
    /// More than one `Authorization` header, or not visible ASCII: 400.
    Malformed,
    /// `Bearer <token>`; the token still has to be checked.
    Bearer(&'a str),
}

/// Longest `Authorization` value considered; longer ones are refused
/// without hashing.
pub const MAX_AUTHORIZATION_LEN: usize = 512;

/// Extracts a bearer token. The scheme is case-insensitive (RFC 7235).
pub fn bearer(headers: &HeaderMap) -> Credentials<'_> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Credentials::Missing;
    };
    if values.next().is_some() || value.len() > MAX_AUTHORIZATION_LEN {
        return Credentials::Malformed;
    }
    let Ok(value) = value.to_str() else {
        return Credentials::Malformed;
    };
    let Some((scheme, token)) = value.split_once(' ') else {
        return Credentials::Missing;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Credentials::Missing;
    }
    let token = token.trim();
    if token.is_empty() {
        return Credentials::Missing;
    }
    Credentials::Bearer(token)
}

/// Checks the headers of a WebSocket upgrade request (RFC 6455 §4.2.1) and
/// returns the `Sec-WebSocket-Key`.
pub fn websocket_key(headers: &HeaderMap) -> Option<&[u8]> {
    let has_token = |name, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    if !has_token(CONNECTION, "upgrade") || !has_token(UPGRADE, "websocket") {
        return None;
    }
    if headers.get(SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return None;
    }
    headers.get(SEC_WEBSOCKET_KEY).map(|k| k.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn routes() {
        assert_eq!(route("/healthz"), Route::Health);
        assert_eq!(route("/ws/device/ems_001"), Route::Device("ems_001"));
        assert_eq!(route("/ws/dashboard/a.b-c"), Route::Dashboard("a.b-c"));
        assert_eq!(route("/ws/device/"), Route::BadDeviceId);
        assert_eq!(route("/ws/device/a/b"), Route::BadDeviceId);
        assert_eq!(route("/ws/device/a%20b"), Route::BadDeviceId);
        assert_eq!(route(&format!("/ws/device/{}", "x".repeat(65))), Route::BadDeviceId);
        assert_eq!(route("/ws/devices/x"), Route::NotFound);
        assert_eq!(route("/"), Route::NotFound);
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer(&headers(&[])), Credentials::Missing);
        assert_eq!(bearer(&headers(&[("authorization", "Bearer abc")])), Credentials::Bearer("abc"));
        assert_eq!(bearer(&headers(&[("authorization", "bearer  abc ")])), Credentials::Bearer("abc"));
        assert_eq!(bearer(&headers(&[("authorization", "Basic abc")])), Credentials::Missing);
        assert_eq!(bearer(&headers(&[("authorization", "Bearer")])), Credentials::Missing);
        assert_eq!(bearer(&headers(&[("authorization", "Bearer ")])), Credentials::Missing);
        assert_eq!(
            bearer(&headers(&[("authorization", "Bearer a"), ("authorization", "Bearer b")])),
            Credentials::Malformed
        );
        let long = format!("Bearer {}", "a".repeat(10_000));
        assert_eq!(bearer(&headers(&[("authorization", &long)])), Credentials::Malformed);
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_bytes(b"Bearer \xff").unwrap());
        assert_eq!(bearer(&h), Credentials::Malformed);
    }

    #[test]
    fn upgrade_headers() {
        let ok = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        assert_eq!(websocket_key(&headers(&ok)), Some(&b"dGhlIHNhbXBsZSBub25jZQ=="[..]));
        assert_eq!(websocket_key(&headers(&ok[1..])), None);
        assert_eq!(websocket_key(&headers(&[ok[0], ok[1], ("sec-websocket-version", "8"), ok[3]])), None);
        assert_eq!(websocket_key(&headers(&ok[..3])), None);
    }
}
