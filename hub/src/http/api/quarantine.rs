//! `GET /api/admin/quarantine?device_id=&limit=` (admin token): the
//! quarantined frames — refused by the gatekeeper, or valid readings the
//! database refused — newest first, of one device or of all.

use std::sync::Arc;

use hyper::{Request, StatusCode};
use serde_json::json;

use super::{check_admin, device_id, store, Answer, ApiError};
use crate::auth::handshake;
use crate::state::Shared;

/// Default and largest `limit`.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// `GET /api/admin/quarantine`.
pub(super) async fn list<B>(req: &Request<B>, shared: &Arc<Shared>) -> Answer {
    check_admin(req, shared).await?;
    let (device, limit) = parse_query(req.uri().query().unwrap_or(""))?;
    let rows = store(shared, move |s| s.quarantined(device.as_deref(), limit)).await?;
    Ok((StatusCode::OK, json!({ "quarantine": rows })))
}

/// `device_id` (optional) and `limit` (1 ..= 1000, default 100).
fn parse_query(query: &str) -> Result<(Option<String>, usize), ApiError> {
    let (mut device, mut limit) = (None, DEFAULT_LIMIT);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = handshake::percent_decode(v);
        match handshake::percent_decode(k).as_str() {
            "device_id" => device = Some(device_id(&v)?),
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|l| (1..=MAX_LIMIT).contains(l))
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!("limit must be 1..={MAX_LIMIT}"))
                    })?;
            }
            _ => {
                return Err(ApiError::BadRequest(
                    "unknown query parameter (device_id, limit)".into(),
                ))
            }
        }
    }
    Ok((device, limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        assert_eq!(parse_query("").unwrap(), (None, DEFAULT_LIMIT));
        assert_eq!(
            parse_query("device_id=ems_001&limit=5").unwrap(),
            (Some("ems_001".into()), 5)
        );
        assert_eq!(parse_query("limit=1000").unwrap().1, 1000);
        for bad in ["limit=0", "limit=1001", "limit=x", "device_id=a%20b", "x=1"] {
            assert!(
                matches!(parse_query(bad), Err(ApiError::BadRequest(_))),
                "{bad}"
            );
        }
    }
}
