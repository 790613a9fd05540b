//! The built-in dashboard page (`GET /`): hand-written HTML, CSS
//! and JavaScript embedded in the binary with `include_str!` — no node
//! toolchain, no CDN, works offline — and its documentation
//! (`GET /docs/dashboard.md`, plain text) for the page's help links.
//!
//! Every response carries a strict Content-Security-Policy: scripts,
//! styles and connections only from the hub itself, no inline script or
//! style (the page has none), no framing, no plugins, no forms posting
//! elsewhere. The page sends tokens only in `Authorization` headers and
//! the WebSocket subprotocol, never in a URL.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

/// The page's Content-Security-Policy. `connect-src 'self'` covers the
/// same-origin `ws:`/`wss:` feed (CSP level 3).
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; manifest-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

const INDEX_HTML: &str = include_str!("../../assets/index.html");
const APP_JS: &str = include_str!("../../assets/app.js");
const APP_CSS: &str = include_str!("../../assets/app.css");
const ICON_SVG: &str = include_str!("../../assets/icon.svg");
/// The dashboard's own documentation (how to get a token, what each view
/// shows), served as plain text so that the page can link to it offline.
const DASHBOARD_DOC: &str = include_str!("../../../docs/dashboard.md");

/// The embedded asset at `path`: (content type, body).
pub(crate) fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    Some(match path {
        "/" | "/index.html" => ("text/html; charset=utf-8", INDEX_HTML),
        "/assets/app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "/assets/app.css" => ("text/css; charset=utf-8", APP_CSS),
        "/assets/icon.svg" | "/favicon.ico" => ("image/svg+xml", ICON_SVG),
        "/docs/dashboard.md" => ("text/plain; charset=utf-8", DASHBOARD_DOC),
        _ => return None,
    })
}

/// Adds the security headers every page response carries.
pub(crate) fn secure_headers(r: &mut Response<Full<Bytes>>) {
    let h = r.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
}

/// The response for a page or asset request, or `None` when `req` is not
/// one (then the caller routes it further).
pub(crate) fn serve<B>(req: &Request<B>) -> Option<Response<Full<Bytes>>> {
    let (content_type, body) = asset(req.uri().path())?;
    let mut r = if req.method() == Method::GET || req.method() == Method::HEAD {
        let body = if req.method() == Method::HEAD {
            ""
        } else {
            body
        };
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        r.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    } else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"method not allowed\n")));
        *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        r
    };
    secure_headers(&mut r);
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_has_no_inline_code_and_a_strict_policy() {
        assert!(!INDEX_HTML.contains("<script>"), "inline script");
        assert!(!INDEX_HTML.contains("<style"), "inline style");
        assert!(!INDEX_HTML.contains(" style="), "inline style attribute");
        assert!(!INDEX_HTML.contains(" onclick="), "inline handler");
        assert!(
            !INDEX_HTML.contains("http://") && !INDEX_HTML.contains("https://"),
            "external URL"
        );
        assert!(
            !APP_JS.contains("http://") && !APP_JS.contains("https://"),
            "external URL in JS"
        );
        assert!(!APP_JS.contains("eval("), "eval");
        assert!(!CSP.contains("unsafe"));
        let r = serve(&Request::get("/").body(()).unwrap()).unwrap();
        assert_eq!(r.headers()["content-security-policy"], CSP);
        assert!(serve(&Request::get("/api/devices").body(()).unwrap()).is_none());
        // The forms' help links to the dashboard's documentation, served here.
        assert!(INDEX_HTML.contains("href=\"/docs/dashboard.md\""));
        let (ty, doc) = asset("/docs/dashboard.md").unwrap();
        assert!(ty.starts_with("text/plain") && doc.contains("ems-hub viewer add"));
        assert_eq!(
            serve(&Request::post("/").body(()).unwrap())
                .unwrap()
                .status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
