//! Handshake rules as pure functions: routing of the request path, the
//! `Authorization` header, and the WebSocket upgrade headers. No I/O here,
//! so every rule is unit-tested without sockets (and fuzzable).

use std::net::IpAddr;

use hyper::header::{
    HeaderMap, AUTHORIZATION, CONNECTION, HOST, ORIGIN, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};

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

/// Outcome of reading the `Authorization` header. `Debug` never shows the
/// token.
#[derive(PartialEq, Eq)]
pub enum Credentials<'a> {
    /// No `Authorization` header, or not a Bearer credential: 401.
    Missing,
    /// More than one `Authorization` header, or not visible ASCII: 400.
    Malformed,
    /// `Bearer <token>`; the token still has to be checked.
    Bearer(&'a str),
}

impl std::fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Missing => f.write_str("Missing"),
            Credentials::Malformed => f.write_str("Malformed"),
            Credentials::Bearer(_) => f.write_str("Bearer([redacted])"),
        }
    }
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

/// What a dashboard offered in `Sec-WebSocket-Protocol`.
/// `Debug` never shows the token.
#[derive(Default, PartialEq, Eq)]
pub struct Offer<'a> {
    /// `ems.v1` was offered: the hub answers with it.
    pub v1: bool,
    /// `ems.bearer.<token>`: the viewer token (browsers cannot set an
    /// `Authorization` header on a WebSocket).
    pub bearer: Option<&'a str>,
    /// `ems.resume.<since_ms>`: replay stored readings from then.
    pub resume_since: Option<i64>,
}

impl std::fmt::Debug for Offer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offer")
            .field("v1", &self.v1)
            .field("bearer", &self.bearer.map(|_| "[redacted]"))
            .field("resume_since", &self.resume_since)
            .finish()
    }
}

/// Outcome of reading `Sec-WebSocket-Protocol`.
#[derive(Debug, PartialEq, Eq)]
pub enum Subprotocols<'a> {
    /// What was offered (all fields empty when the header is absent or
    /// only names protocols the hub does not know).
    Offered(Offer<'a>),
    /// 400: not visible ASCII, longer than [`MAX_PROTOCOL_LEN`], an
    /// `ems.bearer.`/`ems.resume.` entry without `ems.v1`, one of them
    /// twice, an empty token or a `since_ms` that is not an integer.
    Malformed,
}

/// Longest `Sec-WebSocket-Protocol` value(s) considered, all headers
/// together.
pub const MAX_PROTOCOL_LEN: usize = 1024;

/// Parses every `Sec-WebSocket-Protocol` header (comma-separated lists).
pub fn subprotocols(headers: &HeaderMap) -> Subprotocols<'_> {
    use ems_shared::dashboard::{BEARER_PROTOCOL_PREFIX, RESUME_PROTOCOL_PREFIX, SUBPROTOCOL};
    let mut offer = Offer::default();
    let mut total = 0usize;
    for value in headers.get_all(SEC_WEBSOCKET_PROTOCOL) {
        total += value.len();
        if total > MAX_PROTOCOL_LEN {
            return Subprotocols::Malformed;
        }
        let Ok(value) = value.to_str() else {
            return Subprotocols::Malformed;
        };
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry == SUBPROTOCOL {
                offer.v1 = true;
            } else if let Some(token) = entry.strip_prefix(BEARER_PROTOCOL_PREFIX) {
                if token.is_empty() || offer.bearer.is_some() {
                    return Subprotocols::Malformed;
                }
                offer.bearer = Some(token);
            } else if let Some(since) = entry.strip_prefix(RESUME_PROTOCOL_PREFIX) {
                let parsed = since
                    .parse::<i64>()
                    .ok()
                    .filter(|_| since.bytes().all(|b| b.is_ascii_digit() || b == b'-'));
                match parsed {
                    Some(ms) if offer.resume_since.is_none() => offer.resume_since = Some(ms),
                    _ => return Subprotocols::Malformed,
                }
            }
        }
    }
    if (offer.bearer.is_some() || offer.resume_since.is_some()) && !offer.v1 {
        return Subprotocols::Malformed;
    }
    Subprotocols::Offered(offer)
}

/// The Origin rule against cross-site WebSocket hijacking and
/// cross-site API calls: a request without `Origin` (not a browser) passes;
/// one with an `Origin` passes only when it is exactly one of `allowed`
/// (`--allowed-origin`), or the hub's own origin: the origin of
/// `public_url` (`--public-url`) when configured, else `http://` or
/// `https://` followed by the request's `Host` (a default port may be
/// spelled or not). Two `Origin` headers, `null` or non-ASCII never pass.
pub fn origin_allowed(headers: &HeaderMap, public_url: Option<&str>, allowed: &[String]) -> bool {
    let mut origins = headers.get_all(ORIGIN).iter();
    let Some(origin) = origins.next() else {
        return true;
    };
    if origins.next().is_some() {
        return false;
    }
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if allowed.iter().any(|a| a == origin) {
        return true;
    }
    let Some((scheme, authority)) = split_origin(origin) else {
        return false;
    };
    if let Some(url) = public_url {
        return split_origin(url)
            .is_some_and(|(s, a)| s == scheme && same_authority(&scheme, &a, &authority));
    }
    let mut hosts = headers.get_all(HOST).iter();
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        return false;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    (scheme == "http" || scheme == "https")
        && same_authority(&scheme, &host.to_ascii_lowercase(), &authority)
}

/// `scheme://authority` of an origin or URL, lower-cased; the path of a
/// URL is ignored, an origin with a path, user info or no host is refused.
fn split_origin(url: &str) -> Option<(String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') || scheme.is_empty() {
        return None;
    }
    Some((scheme.to_ascii_lowercase(), authority.to_ascii_lowercase()))
}

/// Whether two authorities name the same host and port, with the scheme's
/// default port optional.
fn same_authority(scheme: &str, a: &str, b: &str) -> bool {
    let default = match scheme {
        "http" | "ws" => ":80",
        "https" | "wss" => ":443",
        _ => "",
    };
    let norm = |x: &str| -> String {
        match x.strip_suffix(default) {
            Some(h) if !default.is_empty() => h.to_owned(),
            _ => x.to_owned(),
        }
    };
    norm(a) == norm(b)
}

/// Whether a query string has a parameter named like a credential
/// (`token`, `access_token`, `auth`, `key`, `password`, `secret`, … —
/// any name containing one of those, case-insensitive, percent-decoded).
/// Such requests are refused everywhere: credentials never travel in URLs.
pub fn query_has_credential(query: &str) -> bool {
    const WORDS: [&str; 6] = ["token", "auth", "key", "password", "secret", "bearer"];
    query.split('&').any(|pair| {
        let name = pair.split('=').next().unwrap_or("");
        let name = percent_decode(name).to_ascii_lowercase();
        WORDS.iter().any(|w| name.contains(w))
    })
}

/// Minimal `application/x-www-form-urlencoded` decoding of a name or value
/// (`+` is a space, `%XX` a byte; invalid escapes stay as they are).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The client behind a chain of trusted proxies, by `X-Forwarded-For`
/// (every such header, in order, each a comma-separated list): the
/// right-most address that is not one of `trusted`. Each proxy appends the
/// address it saw, so the entries left of it are whatever the client
/// wrote and count for nothing. `None` when there is no header, an entry
/// is not an address, or every entry is a trusted proxy.
pub fn forwarded_client(headers: &HeaderMap, trusted: &[IpAddr]) -> Option<IpAddr> {
    let mut entries = Vec::new();
    for v in headers.get_all("x-forwarded-for") {
        entries.extend(v.to_str().ok()?.split(',').map(str::trim));
    }
    for e in entries.into_iter().rev() {
        let ip: IpAddr = e.parse().ok()?;
        if !trusted.contains(&ip) {
            return Some(ip);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn debug_output_never_shows_a_token() {
        let c = Credentials::Bearer("emsd_secret");
        assert!(!format!("{c:?}").contains("secret"));
        let o = Offer {
            v1: true,
            bearer: Some("emsv_secret"),
            resume_since: None,
        };
        assert!(!format!("{o:?}").contains("secret"));
    }

    #[test]
    fn routes() {
        assert_eq!(route("/healthz"), Route::Health);
        assert_eq!(route("/ws/device/ems_001"), Route::Device("ems_001"));
        assert_eq!(route("/ws/dashboard/a.b-c"), Route::Dashboard("a.b-c"));
        assert_eq!(route("/ws/device/"), Route::BadDeviceId);
        assert_eq!(route("/ws/device/a/b"), Route::BadDeviceId);
        assert_eq!(route("/ws/device/a%20b"), Route::BadDeviceId);
        assert_eq!(
            route(&format!("/ws/device/{}", "x".repeat(65))),
            Route::BadDeviceId
        );
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
        assert_eq!(
            bearer(&headers(&[("authorization", "Bearer abc")])),
            Credentials::Bearer("abc")
        );
        assert_eq!(
            bearer(&headers(&[("authorization", "bearer  abc ")])),
            Credentials::Bearer("abc")
        );
        assert_eq!(
            bearer(&headers(&[("authorization", "Basic abc")])),
            Credentials::Missing
        );
        assert_eq!(
            bearer(&headers(&[("authorization", "Bearer")])),
            Credentials::Missing
        );
        assert_eq!(
            bearer(&headers(&[("authorization", "Bearer ")])),
            Credentials::Missing
        );
        assert_eq!(
            bearer(&headers(&[
                ("authorization", "Bearer a"),
                ("authorization", "Bearer b")
            ])),
            Credentials::Malformed
        );
        let long = format!("Bearer {}", "a".repeat(10_000));
        assert_eq!(
            bearer(&headers(&[("authorization", &long)])),
            Credentials::Malformed
        );
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer \xff").unwrap(),
        );
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
        assert_eq!(
            websocket_key(&headers(&ok)),
            Some(&b"dGhlIHNhbXBsZSBub25jZQ=="[..])
        );
        assert_eq!(websocket_key(&headers(&ok[1..])), None);
        assert_eq!(
            websocket_key(&headers(&[
                ok[0],
                ok[1],
                ("sec-websocket-version", "8"),
                ok[3]
            ])),
            None
        );
        assert_eq!(websocket_key(&headers(&ok[..3])), None);
    }
}

#[cfg(test)]
mod browser_tests {
    //! Subprotocol auth, the Origin rule, credentials in queries.
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn offered(pairs: &[(&'static str, &str)]) -> Offer<'static> {
        let h = Box::leak(Box::new(headers(pairs)));
        match subprotocols(h) {
            Subprotocols::Offered(o) => o,
            Subprotocols::Malformed => panic!("malformed: {pairs:?}"),
        }
    }

    fn malformed(pairs: &[(&'static str, &str)]) -> bool {
        subprotocols(&headers(pairs)) == Subprotocols::Malformed
    }

    #[test]
    fn subprotocol_offers() {
        assert_eq!(offered(&[]), Offer::default());
        assert_eq!(
            offered(&[("sec-websocket-protocol", "ems.v1, ems.bearer.emsv_abc")]),
            Offer {
                v1: true,
                bearer: Some("emsv_abc"),
                resume_since: None
            }
        );
        // Several headers, any order, unknown protocols ignored.
        assert_eq!(
            offered(&[
                ("sec-websocket-protocol", "ems.resume.1700000000000,chat"),
                ("sec-websocket-protocol", "ems.bearer.t, ems.v1"),
            ]),
            Offer {
                v1: true,
                bearer: Some("t"),
                resume_since: Some(1_700_000_000_000)
            }
        );
        assert!(offered(&[("sec-websocket-protocol", "ems.v1")]).v1);
        // Token without ems.v1: refused.
        assert!(malformed(&[("sec-websocket-protocol", "ems.bearer.t")]));
        assert!(malformed(&[("sec-websocket-protocol", "ems.resume.5")]));
        assert!(malformed(&[(
            "sec-websocket-protocol",
            "ems.v1, ems.bearer."
        )]));
        assert!(malformed(&[(
            "sec-websocket-protocol",
            "ems.v1, ems.bearer.a, ems.bearer.b"
        )]));
        assert!(malformed(&[(
            "sec-websocket-protocol",
            "ems.v1, ems.resume.12x"
        )]));
        assert!(malformed(&[(
            "sec-websocket-protocol",
            "ems.v1, ems.resume.+5"
        )]));
        assert!(malformed(&[(
            "sec-websocket-protocol",
            "ems.v1, ems.resume.99999999999999999999"
        )]));
        let long = format!("ems.v1, ems.bearer.{}", "a".repeat(2000));
        assert!(malformed(&[("sec-websocket-protocol", &long)]));
        let mut h = HeaderMap::new();
        h.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_bytes(b"ems.v1, ems.bearer.\xff").unwrap(),
        );
        assert_eq!(subprotocols(&h), Subprotocols::Malformed);
    }

    #[test]
    fn origin_rule() {
        let none: &[String] = &[];
        let h = |o: &str, host: &str| headers(&[("origin", o), ("host", host)]);
        // No Origin: not a browser, passes.
        assert!(origin_allowed(
            &headers(&[("host", "hub:8080")]),
            None,
            none
        ));
        // Same host, either scheme, default ports optional.
        assert!(origin_allowed(
            &h("http://hub:8080", "hub:8080"),
            None,
            none
        ));
        assert!(origin_allowed(
            &h("https://Hub.example", "hub.example"),
            None,
            none
        ));
        assert!(origin_allowed(
            &h("https://hub.example", "hub.example:443"),
            None,
            none
        ));
        assert!(origin_allowed(
            &h("http://hub.example:80", "hub.example"),
            None,
            none
        ));
        // Other host or port, null, odd schemes, paths: refused.
        assert!(!origin_allowed(
            &h("http://evil.example", "hub:8080"),
            None,
            none
        ));
        assert!(!origin_allowed(
            &h("http://hub:8081", "hub:8080"),
            None,
            none
        ));
        assert!(!origin_allowed(&h("null", "hub:8080"), None, none));
        assert!(!origin_allowed(
            &h("file://hub:8080", "hub:8080"),
            None,
            none
        ));
        assert!(!origin_allowed(
            &h("http://user@hub:8080", "hub:8080"),
            None,
            none
        ));
        assert!(!origin_allowed(
            &headers(&[("origin", "http://hub")]),
            None,
            none
        ));
        assert!(!origin_allowed(
            &headers(&[
                ("origin", "http://hub"),
                ("origin", "http://hub"),
                ("host", "hub")
            ]),
            None,
            none
        ));
        // --public-url pins the own origin; Host no longer counts.
        let public = Some("https://ems.example.com/");
        assert!(origin_allowed(
            &h("https://ems.example.com", "127.0.0.1:8080"),
            public,
            none
        ));
        assert!(!origin_allowed(
            &h("http://ems.example.com", "ems.example.com"),
            public,
            none
        ));
        assert!(!origin_allowed(
            &h("http://127.0.0.1:8080", "127.0.0.1:8080"),
            public,
            none
        ));
        // --allowed-origin: exact match only.
        let allowed = vec!["https://grafana.example.com".to_string()];
        assert!(origin_allowed(
            &h("https://grafana.example.com", "hub"),
            None,
            &allowed
        ));
        assert!(!origin_allowed(
            &h("https://grafana.example.com.evil", "hub"),
            None,
            &allowed
        ));
        assert!(!origin_allowed(
            &h("https://GRAFANA.example.com:444", "hub"),
            None,
            &allowed
        ));
    }

    #[test]
    fn credential_queries() {
        for q in [
            "token=x",
            "a=1&access_token=x",
            "AUTH=1",
            "api%5Fkey=1",
            "Password",
            "x=1&my+secret=2",
            "bearer=",
        ] {
            assert!(query_has_credential(q), "{q}");
        }
        for q in ["from_ms=1&to_ms=2&limit=5", "", "a=token"] {
            assert!(!query_has_credential(q), "{q}");
        }
        assert_eq!(percent_decode("a%41+b%zz%4"), "aA b%zz%4");
    }

    #[test]
    fn the_forwarded_client_is_the_right_most_untrusted_address() {
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        let inner: IpAddr = "10.0.0.9".parse().unwrap();
        let client = |pairs: &[(&'static str, &str)], trusted: &[IpAddr]| {
            forwarded_client(&headers(pairs), trusted).map(|ip| ip.to_string())
        };
        let xff = "x-forwarded-for";
        assert_eq!(
            client(&[(xff, "192.0.2.7")], &[proxy]).as_deref(),
            Some("192.0.2.7")
        );
        // What the client wrote itself is left of what the proxy appended.
        assert_eq!(
            client(&[(xff, "6.6.6.6, 192.0.2.7")], &[proxy]).as_deref(),
            Some("192.0.2.7")
        );
        // Through two trusted proxies; two headers count as one list.
        assert_eq!(
            client(
                &[(xff, "6.6.6.6, 192.0.2.7"), (xff, "10.0.0.9")],
                &[proxy, inner]
            )
            .as_deref(),
            Some("192.0.2.7")
        );
        assert_eq!(
            client(&[(xff, "2001:db8::1")], &[]).as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(client(&[], &[proxy]), None);
        assert_eq!(client(&[(xff, "not-an-ip")], &[proxy]), None);
        assert_eq!(client(&[(xff, "127.0.0.1")], &[proxy]), None);
    }
}
