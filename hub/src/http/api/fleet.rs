//! `GET /api/fleet/energy?from_ms=&to_ms=&tz=AREA/CITY`: the energy of
//! every device in the viewer's scope over the local days covering the
//! range (viewer token, scope enforced as on the socket), for the fleet
//! overview page.
//!
//! `from_ms` and `to_ms` are required, at most [`MAX_RANGE_MS`] apart;
//! `tz` defaults to the hub's `--timezone`. The range is snapped outward
//! to local midnights of `tz`, and the answer names the snapped range. One
//! entry per device in scope, in id order: `energy_wh` summed over its
//! meters, `coverage` the least-covered meter's share of the range (0 for
//! a device without readings in it). Computed by
//! [`crate::store::energy::fleet_energy`] from the 15-minute slots in one
//! store query whatever the number of devices; it is a heavy query (one at
//! a time per viewer token). A bad parameter is a 400 whose message starts
//! with the parameter's name.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use hyper::{Request, StatusCode};
use serde_json::json;

use super::energy::{bad, param, parse_params};
use super::{heavy_turn, store, viewer_scope, Answer, ApiError};
use crate::energy::buckets::{buckets, Bucket, Zone};
use crate::state::Shared;
use crate::store::energy::fleet_energy;

/// The widest range asked for (a week; the page asks for one day).
pub(crate) const MAX_RANGE_MS: i64 = 7 * 24 * 3_600_000;

/// The parsed query of the fleet energy endpoint.
#[derive(Debug)]
pub(crate) struct FleetQuery {
    pub from_ms: i64,
    pub to_ms: i64,
    pub zone: Zone,
}

/// Parses the query; `default_zone` when `tz` is absent.
pub(crate) fn parse_query(query: &str, default_zone: &Zone) -> Result<FleetQuery, ApiError> {
    let p = parse_params(query, false)?;
    let (from, to, zone) = (p.from_ms, p.to_ms, p.zone);
    let from_ms = from.ok_or_else(|| param("from_ms", "is required"))?;
    let to_ms = to.ok_or_else(|| param("to_ms", "is required"))?;
    if from_ms > to_ms {
        return Err(param("from_ms", "must not be after to_ms"));
    }
    if to_ms.saturating_sub(from_ms) > MAX_RANGE_MS {
        return Err(param("to_ms", "must be at most 7 days after from_ms"));
    }
    Ok(FleetQuery {
        from_ms,
        to_ms,
        zone: zone.unwrap_or_else(|| default_zone.clone()),
    })
}

/// `GET /api/fleet/energy`.
pub(super) async fn energy<B>(req: &Request<B>, shared: &Arc<Shared>) -> Answer {
    let (viewer, scope) = viewer_scope(req, shared).await?;
    let q = parse_query(req.uri().query().unwrap_or(""), &shared.config.timezone)?;
    let spans = buckets(&q.zone, Bucket::Day, q.from_ms, q.to_ms).map_err(bad)?;
    if spans.iter().any(|s| !s.is_slot_aligned()) {
        return Err(param(
            "tz",
            "local days of this zone are off the 15-minute grid in this range; \
             ask /api/devices/{id}/energy per device",
        ));
    }
    let (from_ms, to_ms) = match (spans.first(), spans.last()) {
        (Some(a), Some(b)) => (a.start_ms, b.end_ms),
        _ => (q.from_ms, q.to_ms),
    };
    // The unrevoked devices are in memory with the tokens.
    let ids: Vec<String> = shared
        .auth
        .active_devices()
        .ok_or(ApiError::Unavailable)?
        .into_iter()
        .filter(|d| scope.allows(d))
        .collect();
    let _turn = heavy_turn(shared, &viewer).await?;
    let wanted: HashSet<String> = ids.iter().cloned().collect();
    let found = store(shared, move |s| {
        fleet_energy(s, &spans, &|d: &str| wanted.contains(d))
    })
    .await?;
    let mut found: HashMap<String, (f64, f64)> = found
        .into_iter()
        .map(|d| (d.device_id, (d.energy_wh, d.coverage)))
        .collect();
    let devices: Vec<serde_json::Value> = ids
        .into_iter()
        .map(|id| {
            let (wh, cov) = found.remove(&id).unwrap_or((0.0, 0.0));
            json!({ "device_id": id, "energy_wh": wh, "coverage": cov })
        })
        .collect();
    Ok((
        StatusCode::OK,
        json!({
            "tz": q.zone.name(),
            "from_ms": from_ms,
            "to_ms": to_ms,
            "devices": devices,
        }),
    ))
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
        let q = parse_query("from_ms=5&to_ms=9&tz=Asia%2FKolkata", &utc).unwrap();
        assert_eq!((q.from_ms, q.to_ms), (5, 9));
        assert_eq!(q.zone.name(), "Asia/Kolkata");
        let berlin = Zone::parse("Europe/Berlin").unwrap();
        assert_eq!(
            parse_query("from_ms=0&to_ms=1", &berlin)
                .unwrap()
                .zone
                .name(),
            "Europe/Berlin"
        );
        for (query, name) in [
            ("from_ms=1&to_ms=2&tz=Mars/Base", "tz"),
            ("from_ms=x&to_ms=2", "from_ms"),
            ("to_ms=2", "from_ms"),
            ("from_ms=1", "to_ms"),
            ("from_ms=3&to_ms=2", "from_ms"),
            ("from_ms=0&to_ms=604800001", "to_ms"),
        ] {
            let m = msg(parse_query(query, &utc).unwrap_err());
            assert!(m.starts_with(&format!("{name}: ")), "{query}: {m}");
        }
        assert!(parse_query("from_ms=0&to_ms=604800000", &utc).is_ok());
        assert!(
            msg(parse_query("from_ms=1&to_ms=2&bucket=day", &utc).unwrap_err())
                .contains("unknown query parameter")
        );
    }
}
