//! The `Authorization` header parser (`ems_hub::auth::handshake::bearer`) and
//! the token format check (`ems_hub::auth::token::kind_of`): arbitrary header
//! values, one or two of them. Never a panic; a bearer token is never
//! longer than the header limit and is trimmed visible ASCII.
#![no_main]

use ems_hub::auth::handshake::{bearer, Credentials, MAX_AUTHORIZATION_LEN};
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte: how many copies of the header (1 or 2); the rest splits
    // at the first 0x00 into two values.
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest.splitn(2, |b| *b == 0);
    let a = parts.next().unwrap_or_default();
    let b = parts.next().unwrap_or(a);
    let mut h = HeaderMap::new();
    let Ok(va) = HeaderValue::from_bytes(a) else {
        return;
    };
    h.append(AUTHORIZATION, va);
    if n % 2 == 1 {
        if let Ok(vb) = HeaderValue::from_bytes(b) {
            h.append(AUTHORIZATION, vb);
        }
    }
    match bearer(&h) {
        Credentials::Bearer(t) => {
            assert!(!t.is_empty() && t.len() <= MAX_AUTHORIZATION_LEN);
            assert_eq!(t, t.trim());
            assert_eq!(h.get_all(AUTHORIZATION).iter().count(), 1);
            let _ = ems_hub::auth::token::kind_of(t);
            let _ = ems_hub::auth::token::hash(t);
        }
        Credentials::Missing | Credentials::Malformed => {}
    }
    if let Ok(s) = std::str::from_utf8(rest) {
        let _ = ems_hub::auth::token::kind_of(s);
    }
});
