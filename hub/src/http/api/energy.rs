//! `GET /api/devices/{id}/energy?from_ms=&to_ms=&bucket=hour|day|month&tz=AREA/CITY`:
//! a device's energy per local hour, day or month, per meter (viewer
//! token, scope enforced as on the socket).
//!
//! `from_ms`, `to_ms` and `bucket` are required; `tz` defaults to the hub's
//! `--timezone`. The range is snapped outward to bucket boundaries; every
//! bucket is in the answer, empty ones with `samples` 0. A bad parameter is
//! a 400 whose message starts with the parameter's name. The answer is
//! [`crate::energy::answer::EnergyAnswer`], computed by
//! [`crate::store::energy::rollup`] (one query per meter).

use std::sync::Arc;

use hyper::{Request, StatusCode};

use super::{device_id, heavy_turn, store, viewer_scope, Answer, ApiError};
use crate::auth::handshake;
use crate::energy::buckets::{buckets, Bucket, ParamError, Zone};
use crate::state::Shared;
use crate::store::energy::rollup;

/// The parsed query of the energy endpoint.
#[derive(Debug)]
pub(crate) struct EnergyQuery {
    pub from_ms: i64,
    pub to_ms: i64,
    pub bucket: Bucket,
    pub zone: Zone,
}

pub(super) fn bad(e: ParamError) -> ApiError {
    ApiError::BadRequest(e.to_string())
}

pub(super) fn param(param: &'static str, detail: &str) -> ApiError {
    bad(ParamError {
        param,
        detail: detail.into(),
    })
}

/// The parameters both energy endpoints take, as given.
#[derive(Debug, Default)]
pub(super) struct RangeParams {
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub bucket: Option<Bucket>,
    pub zone: Option<Zone>,
}

/// Reads `from_ms`, `to_ms`, `tz` and, when `with_bucket`, `bucket`; any
/// other parameter is a 400 that lists the known ones.
pub(super) fn parse_params(query: &str, with_bucket: bool) -> Result<RangeParams, ApiError> {
    let mut p = RangeParams::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = handshake::percent_decode(v);
        let int = |name: &'static str| {
            v.parse::<i64>()
                .map_err(|_| param(name, "must be an integer (Unix milliseconds)"))
        };
        match handshake::percent_decode(k).as_str() {
            "from_ms" => p.from_ms = Some(int("from_ms")?),
            "to_ms" => p.to_ms = Some(int("to_ms")?),
            "bucket" if with_bucket => p.bucket = Some(Bucket::parse(&v).map_err(bad)?),
            "tz" => p.zone = Some(Zone::parse(&v).map_err(bad)?),
            _ => {
                return Err(ApiError::BadRequest(if with_bucket {
                    "unknown query parameter (from_ms, to_ms, bucket, tz)".into()
                } else {
                    "unknown query parameter (from_ms, to_ms, tz)".into()
                }))
            }
        }
    }
    Ok(p)
}

/// Parses the query; `default_zone` when `tz` is absent.
pub(crate) fn parse_query(query: &str, default_zone: &Zone) -> Result<EnergyQuery, ApiError> {
    let p = parse_params(query, true)?;
    Ok(EnergyQuery {
        from_ms: p.from_ms.ok_or_else(|| param("from_ms", "is required"))?,
        to_ms: p.to_ms.ok_or_else(|| param("to_ms", "is required"))?,
        bucket: p.bucket.ok_or_else(|| param("bucket", "is required"))?,
        zone: p.zone.unwrap_or_else(|| default_zone.clone()),
    })
}

/// `GET /api/devices/{id}/energy`.
pub(super) async fn energy<B>(req: &Request<B>, shared: &Arc<Shared>, id: &str) -> Answer {
    let id = device_id(id)?;
    let (viewer, scope) = viewer_scope(req, shared).await?;
    if !scope.allows(&id) {
        return Err(ApiError::Forbidden);
    }
    let q = parse_query(req.uri().query().unwrap_or(""), &shared.config.timezone)?;
    let _turn = heavy_turn(shared, &viewer).await?;
    let spans = buckets(&q.zone, q.bucket, q.from_ms, q.to_ms).map_err(bad)?;
    let tz = q.zone.name().to_owned();
    let bucket = q.bucket;
    let answer = store(shared, move |s| rollup(s, &id, &tz, bucket, &spans)).await?;
    let body = serde_json::to_value(&answer).map_err(|e| {
        log::error!("api: energy answer: {e}");
        ApiError::Unavailable
    })?;
    Ok((StatusCode::OK, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(e: ApiError) -> String {
        match e {
            ApiError::BadRequest(m) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn query_parsing_names_the_parameter() {
        let utc = Zone::utc();
        let q = parse_query("from_ms=5&to_ms=9&bucket=hour&tz=Asia%2FKolkata", &utc).unwrap();
        assert_eq!((q.from_ms, q.to_ms, q.bucket), (5, 9, Bucket::Hour));
        assert_eq!(q.zone.name(), "Asia/Kolkata");
        let berlin = Zone::parse("Europe/Berlin").unwrap();
        let q = parse_query("from_ms=-5&to_ms=0&bucket=month", &berlin).unwrap();
        assert_eq!(q.zone.name(), "Europe/Berlin");
        for (query, param) in [
            ("from_ms=1&to_ms=2&bucket=week", "bucket"),
            ("from_ms=1&to_ms=2&bucket=day&tz=Mars/Base", "tz"),
            ("from_ms=1&to_ms=2&bucket=day&tz=", "tz"),
            ("from_ms=x&to_ms=2&bucket=day", "from_ms"),
            ("to_ms=2&bucket=day", "from_ms"),
            ("from_ms=1&bucket=day", "to_ms"),
            ("from_ms=1&to_ms=2", "bucket"),
        ] {
            let m = msg(parse_query(query, &utc).unwrap_err());
            assert!(m.starts_with(&format!("{param}: ")), "{query}: {m}");
        }
        assert!(
            msg(parse_query("from_ms=1&to_ms=2&bucket=day&x=1", &utc).unwrap_err())
                .contains("unknown query parameter")
        );
    }
}
