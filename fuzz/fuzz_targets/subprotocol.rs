//! The dashboard handshake's header parsers:
//! `Sec-WebSocket-Protocol` (`ems_hub::auth::handshake::subprotocols`), the
//! `Origin` rule (`origin_allowed`) and the credential-in-query check
//! (`query_has_credential`). Never a panic; an accepted offer keeps the
//! documented invariants.
#![no_main]

use ems_hub::auth::handshake::{origin_allowed, query_has_credential, subprotocols, Subprotocols, MAX_PROTOCOL_LEN};
use hyper::header::{HeaderMap, HeaderValue, HOST, ORIGIN, SEC_WEBSOCKET_PROTOCOL};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Up to three 0x00-separated fields: protocol header(s) split at 0x01,
    // Origin, Host.
    let mut fields = data.splitn(3, |b| *b == 0);
    let protos = fields.next().unwrap_or_default();
    let origin = fields.next();
    let host = fields.next();
    let mut h = HeaderMap::new();
    for p in protos.split(|b| *b == 1) {
        if let Ok(v) = HeaderValue::from_bytes(p) {
            h.append(SEC_WEBSOCKET_PROTOCOL, v);
        }
    }
    if let Some(Ok(v)) = origin.map(HeaderValue::from_bytes) {
        h.append(ORIGIN, v);
    }
    if let Some(Ok(v)) = host.map(HeaderValue::from_bytes) {
        h.append(HOST, v);
    }
    if let Subprotocols::Offered(o) = subprotocols(&h) {
        let total: usize = h.get_all(SEC_WEBSOCKET_PROTOCOL).iter().map(|v| v.len()).sum();
        assert!(total <= MAX_PROTOCOL_LEN);
        if o.bearer.is_some() || o.resume_since.is_some() {
            assert!(o.v1);
        }
        if let Some(t) = o.bearer {
            assert!(!t.is_empty());
            let _ = ems_hub::auth::token::kind_of(t);
        }
    }
    let _ = origin_allowed(&h, None, &[]);
    let _ = origin_allowed(&h, Some("https://ems.example"), &["http://localhost:3000".into()]);
    if let Ok(q) = std::str::from_utf8(protos) {
        let _ = query_has_credential(q);
        let _ = ems_hub::auth::handshake::percent_decode(q);
    }
});
