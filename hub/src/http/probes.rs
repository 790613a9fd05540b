//! The probes: `GET /healthz` (the process answers), `GET /readyz` (the
//! store is reachable and the writer queue has room) and `GET /metrics`
//! (Prometheus text format; only closed label sets, no device id, address
//! or token; the MQTT bridge's counters when it runs). `/readyz` does not
//! depend on the MQTT broker.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};

use super::{text, Resp};
use crate::metrics::EdgeSummary;
use crate::state::Shared;

/// `/healthz`: 200 for `GET`/`HEAD`.
pub(super) fn healthz(method: &Method) -> Resp {
    if method == Method::GET || method == Method::HEAD {
        text(StatusCode::OK, "ok\n")
    } else {
        text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
    }
}

/// Refreshes the gauges that are read at scrape time.
fn refresh_gauges(shared: &Shared) {
    let depth = shared
        .queue
        .max_capacity()
        .saturating_sub(shared.queue.capacity());
    shared
        .metrics
        .queue_depth
        .store(depth as i64, Ordering::Relaxed);
}

/// `GET /metrics`: the Prometheus text format.
pub(super) fn metrics(shared: &Shared) -> Resp {
    refresh_gauges(shared);
    let mut edge = EdgeSummary::default();
    for (_, e) in shared.registry.edge_statuses() {
        edge.add(&e.status, e.behind_ms);
    }
    let mut body = shared.metrics.render(&edge);
    if let Some(m) = &shared.mqtt {
        m.stats().render_prometheus(&mut body);
    }
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// `GET /readyz`: 200 when the store is reachable and the writer queue has
/// room, else 503 with the reason.
pub(super) fn readyz(shared: &Shared) -> Resp {
    refresh_gauges(shared);
    match shared.metrics.ready() {
        Ok(()) => text(StatusCode::OK, "ready\n"),
        Err("writer queue full") => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: writer queue full\n",
        ),
        Err("store unreachable") => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: store unreachable\n",
        ),
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: store writer failing\n",
        ),
    }
}
