//! The viewer endpoints (`emsv_` token, scope enforced exactly as on the
//! socket): the devices a viewer may watch, with presence, and a device's
//! stored readings. Both are heavy (their cost grows with the fleet or the
//! range): one at a time per viewer token, and the device list costs a
//! constant number of store queries whatever the number of devices
//! ([`super::states`]).

use std::sync::Arc;

use ems_shared::DashboardReading;
use hyper::{Request, StatusCode};
use serde::Serialize;
use serde_json::json;

use super::states::{listing, states};
use super::{device_id, heavy_turn, store, viewer_scope, Answer, ApiError, RawAnswer};
use crate::auth::handshake;
use crate::state::Shared;
use crate::store::{StoredReading, ViewerScope};

/// Default and largest `limit` of the history endpoint.
const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 10_000;

/// `GET /api/devices`: the devices the viewer may watch, with presence.
pub(super) async fn devices<B>(req: &Request<B>, shared: &Arc<Shared>) -> RawAnswer {
    let (viewer, scope) = viewer_scope(req, shared).await?;
    let _turn = heavy_turn(shared, &viewer).await?;
    list_for_viewer(shared, scope).await
}

/// `GET /api/devices/{id}/readings?from_ms=&to_ms=&limit=`.
pub(super) async fn readings<B>(req: &Request<B>, shared: &Arc<Shared>, id: &str) -> Answer {
    let id = device_id(id)?;
    let (viewer, scope) = viewer_scope(req, shared).await?;
    if !scope.allows(&id) {
        return Err(ApiError::Forbidden);
    }
    let query = parse_range(req.uri().query().unwrap_or(""), crate::store::now_ms())?;
    let _turn = heavy_turn(shared, &viewer).await?;
    history(shared, id, query).await
}

async fn list_for_viewer(shared: &Arc<Shared>, scope: ViewerScope) -> RawAnswer {
    // The unrevoked devices are in memory with the tokens.
    let devices = shared.auth.active_devices().ok_or(ApiError::Unavailable)?;
    let ids: Vec<String> = devices.into_iter().filter(|d| scope.allows(d)).collect();
    let list = states(shared, ids).await?;
    Ok((StatusCode::OK, listing(list).await?))
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

/// One reading of the history answer: the dashboard frame plus its
/// plausibility flags.
#[derive(Serialize)]
struct HistoryReading {
    #[serde(flatten)]
    reading: DashboardReading,
    /// [`crate::energy::flags`] bits.
    flags: u32,
}

fn dashboard_reading(device_id: &str, r: StoredReading) -> HistoryReading {
    HistoryReading {
        reading: DashboardReading::new(device_id, r.received_at_ms, r.reading),
        flags: r.flags,
    }
}

async fn history(shared: &Arc<Shared>, id: String, q: RangeQuery) -> Answer {
    let id2 = id.clone();
    let mut rows = store(shared, move |s| {
        s.history(&id2, q.from_ms, q.to_ms, q.limit.saturating_add(1), false)
    })
    .await?;
    let truncated = rows.len() > q.limit;
    rows.truncate(q.limit);
    let list: Vec<HistoryReading> = rows
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
