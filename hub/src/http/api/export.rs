//! `GET /api/devices/{id}/readings.csv?from_ms=&to_ms=`: a device's stored
//! readings as CSV (viewer token, scope enforced as on the socket), streamed
//! in constant memory.
//!
//! A task pages through the store (keyset pages of [`PAGE`] readings in
//! `(ts, epoch, seq)` order, each one short query holding the shared store
//! handle only for that query), encodes each page on the API's
//! low-priority thread ([`super::background`]: an export does not slow
//! ingest) and hands it to the response body through a channel of [`CHUNKS`] pages: a
//! slow client holds at most that much, and no thread waits on it. A store
//! failure in the middle aborts the response (the chunked body is never
//! terminated, so the client sees an incomplete download, never a short
//! file that looks whole). Defaults: everything stored (`from_ms` and
//! `to_ms` absent).
//!
//! The download holds its viewer token's heavy-query turn
//! ([`crate::quota`]) from before the first page until the task ends — the
//! range is done, the store failed or the client went away (the next send
//! into the channel fails) — and gives it back before the body's end is
//! sent. Meanwhile the token's other heavy API queries are answered 429
//! with `Retry-After`; another download of the token waits its turn (as
//! queued queries do, a few at most).
//!
//! Columns: [`crate::energy::csv::CSV_HEADER`].

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::mpsc;

use super::{device_id, error_response, viewer_scope, ApiError};
use crate::auth::handshake;
use crate::energy::csv::{write_csv_header, write_csv_row, ExportRow};
use crate::energy::rule::ReadingKey;
use crate::metrics::Limit;
use crate::quota::HeavyTurn;
use crate::state::Shared;
use crate::store::energy::FlaggedReading;

/// Readings per store query.
pub(crate) const PAGE: usize = 8192;

/// Encoded pages buffered between the store task and the socket.
const CHUNKS: usize = 2;

/// The body of every plain-HTTP answer: a whole one, or a stream.
pub(crate) type Body2 = Either<Full<Bytes>, ChunkBody>;

/// Bytes of a large answer written per turn of the connection's task.
const PACE: usize = 64 * 1024;

/// Answers from this size on are written [`PACE`] bytes per turn.
pub(crate) const PACED_FROM: usize = 4 * PACE;

/// A response body written in pieces: fed by a channel of chunks (an
/// `Err` aborts the response), or one large answer ([`ChunkBody::paced`]).
pub(crate) struct ChunkBody {
    source: Source,
    /// A paced answer gave way to the other tasks before its next slice.
    yielded: bool,
}

enum Source {
    Channel(mpsc::Receiver<Result<Bytes, std::io::Error>>),
    Paced(Bytes),
}

impl ChunkBody {
    /// A large answer written [`PACE`] bytes at a time, the connection's
    /// task giving way to the others between slices. hyper writes a whole
    /// body for as long as the socket takes it: the 3.5 MB device list of
    /// 10,000 devices, written in one go to a reader on loopback, kept the
    /// worker that also runs the device sessions busy for milliseconds.
    pub(crate) fn paced(bytes: Bytes) -> Self {
        ChunkBody {
            source: Source::Paced(bytes),
            yielded: false,
        }
    }
}

impl Body for ChunkBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match &mut this.source {
            Source::Channel(rx) => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|r| r.map(Frame::data))),
            Source::Paced(rest) if rest.is_empty() => Poll::Ready(None),
            Source::Paced(rest) => {
                // Give way once before every slice: woken at once, the task
                // goes behind the tasks already waiting to run.
                if !this.yielded {
                    this.yielded = true;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                this.yielded = false;
                let n = rest.len().min(PACE);
                Poll::Ready(Some(Ok(Frame::data(rest.split_to(n)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(&self.source, Source::Paced(rest) if rest.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Paced(rest) => SizeHint::with_exact(rest.len() as u64),
            Source::Channel(_) => SizeHint::default(),
        }
    }
}

/// Whether `req` is for this endpoint (`/api/devices/{id}/readings.csv`).
pub(crate) fn is_route<B>(req: &Request<B>) -> bool {
    let path = req.uri().path();
    path.strip_prefix("/api/devices/")
        .and_then(|rest| rest.strip_suffix("/readings.csv"))
        .is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

/// Parses `from_ms`/`to_ms` (both optional).
pub(crate) fn parse_range(query: &str) -> Result<(i64, i64), ApiError> {
    let (mut from, mut to) = (i64::MIN, i64::MAX);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = handshake::percent_decode(v);
        let int = |p: &str| {
            v.parse::<i64>().map_err(|_| {
                ApiError::BadRequest(format!("{p}: must be an integer (Unix milliseconds)"))
            })
        };
        match handshake::percent_decode(k).as_str() {
            "from_ms" => from = int("from_ms")?,
            "to_ms" => to = int("to_ms")?,
            _ => {
                return Err(ApiError::BadRequest(
                    "unknown query parameter (from_ms, to_ms)".into(),
                ))
            }
        }
    }
    if from > to {
        return Err(ApiError::BadRequest(
            "from_ms: must not be after to_ms".into(),
        ));
    }
    Ok((from, to))
}

async fn authorize(
    req: &Request<hyper::body::Incoming>,
    shared: &Arc<Shared>,
) -> Result<(String, i64, i64, HeavyTurn), ApiError> {
    if !handshake::origin_allowed(
        req.headers(),
        shared.config.public_url.as_deref(),
        &shared.config.allowed_origins,
    ) {
        return Err(ApiError::Forbidden);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(ApiError::MethodNotAllowed);
    }
    let id = req
        .uri()
        .path()
        .strip_prefix("/api/devices/")
        .and_then(|rest| rest.strip_suffix("/readings.csv"))
        .unwrap_or("");
    let id = device_id(id)?;
    let (viewer, scope) = viewer_scope(req, shared).await?;
    if !scope.allows(&id) {
        return Err(ApiError::Forbidden);
    }
    let (from, to) = parse_range(req.uri().query().unwrap_or(""))?;
    let Some(turn) = shared.quotas.heavy_stream(&viewer).await else {
        shared.metrics.hardening.refused(Limit::HeavyQueries);
        return Err(ApiError::TooMany);
    };
    Ok((id, from, to, turn))
}

/// Serves `GET /api/devices/{id}/readings.csv`.
pub(crate) async fn readings_csv(
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> Response<Body2> {
    let (id, from, to, turn) = match authorize(&req, &shared).await {
        Ok(ok) => ok,
        Err(e) => {
            log::info!(
                "api {} from {peer}: {} ({e})",
                req.uri().path(),
                error_status(&e)
            );
            return error_response(&e).map(Either::Left);
        }
    };
    let (tx, rx) = mpsc::channel(CHUNKS);
    let filename = format!("attachment; filename=\"{id}.csv\"");
    tokio::spawn(async move {
        produce(shared, id, from, to, &tx).await;
        // The turn first: a client that saw the end may query at once.
        drop(turn);
        drop(tx);
    });
    let mut r = Response::new(Either::Right(ChunkBody {
        source: Source::Channel(rx),
        yielded: false,
    }));
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(v) = HeaderValue::from_str(&filename) {
        h.insert("content-disposition", v);
    }
    *r.status_mut() = StatusCode::OK;
    r
}

fn error_status(e: &ApiError) -> u16 {
    error_response(e).status().as_u16()
}

/// Encodes one page (the header first when `header`).
fn encode(device_id: &str, page: &[FlaggedReading], header: bool) -> Vec<u8> {
    let mut buf = Vec::with_capacity(page.len() * 110 + 160);
    if header {
        let _ = write_csv_header(&mut buf);
    }
    for r in page {
        let _ = write_csv_row(
            &mut buf,
            &ExportRow {
                device_id,
                reading: &r.reading,
                flags: r.flags,
            },
        );
    }
    buf
}

/// Pages through the store into the channel until the range is done, the
/// client is gone or the store fails. The next page is asked for before
/// the current one is encoded, so the store's query (on its thread, or in
/// PostgreSQL) and the encoding (on the background thread) overlap; at most two
/// pages and [`CHUNKS`] encoded chunks are held at a time.
async fn produce(
    shared: Arc<Shared>,
    id: String,
    from: i64,
    to: i64,
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let id: Arc<str> = Arc::from(id);
    let fetch = |after: Option<ReadingKey>| {
        let device = id.clone();
        shared
            .store
            .call(move |s| s.export_page(&device, from, to, after, PAGE))
    };
    let mut pending = Some(fetch(None));
    let mut first = true;
    let mut rows = 0u64;
    while let Some(call) = pending.take() {
        let page = match call.await {
            Ok(p) => p,
            Err(e) => {
                log::error!("export of {id}: stopped after {rows} readings: {e}");
                let _ = tx.send(Err(std::io::Error::other("store failed"))).await;
                return;
            }
        };
        let done = page.len() < PAGE;
        rows += page.len() as u64;
        if !done {
            pending = Some(fetch(page.last().map(FlaggedReading::key)));
        }
        let device = id.clone();
        let header = first;
        first = false;
        let encoded = super::background::run(move || encode(&device, &page, header)).await;
        let buf = match encoded {
            Ok(buf) => buf,
            Err(e) => {
                log::error!("export of {id}: encoding failed: {e}");
                let _ = tx.send(Err(std::io::Error::other("encoding failed"))).await;
                return;
            }
        };
        if !buf.is_empty() && tx.send(Ok(Bytes::from(buf))).await.is_err() {
            log::debug!("export of {id}: client went away after {rows} readings");
            return;
        }
    }
    log::debug!("export of {id}: {rows} readings");
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_paced_answer_is_whole_in_slices_and_gives_way_before_each() {
        let data: Vec<u8> = (0..PACE * 3 + 17).map(|i| (i % 251) as u8).collect();
        let mut body = ChunkBody::paced(Bytes::from(data.clone()));
        assert_eq!(body.size_hint().exact(), Some(data.len() as u64));
        // The first poll gives way (and wakes itself), the second has a slice.
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
        let mut got = Vec::new();
        let mut slices = 0;
        while let Some(frame) = body.frame().await {
            let chunk = frame.unwrap().into_data().unwrap();
            assert!(chunk.len() <= PACE);
            got.extend_from_slice(&chunk);
            slices += 1;
        }
        assert_eq!(got, data);
        assert_eq!(slices, 4);
        assert!(body.is_end_stream());
    }

    #[test]
    fn route_and_range() {
        let req = |p: &str| Request::builder().uri(p).body(()).unwrap();
        assert!(is_route(&req("/api/devices/d1/readings.csv")));
        assert!(is_route(&req("/api/devices/d1/readings.csv?from_ms=1")));
        assert!(!is_route(&req("/api/devices/d1/readings")));
        assert!(!is_route(&req("/api/devices//readings.csv")));
        assert!(!is_route(&req("/api/devices/a/b/readings.csv")));
        assert_eq!(parse_range("").unwrap(), (i64::MIN, i64::MAX));
        assert_eq!(parse_range("from_ms=5&to_ms=9").unwrap(), (5, 9));
        for bad in ["from_ms=x", "to_ms=1.5", "from_ms=9&to_ms=5", "limit=3"] {
            assert!(
                matches!(parse_range(bad), Err(ApiError::BadRequest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn pages_encode_with_one_header() {
        let r = FlaggedReading {
            reading: ems_shared::Reading {
                epoch: 1,
                seq: 2,
                ts_ms: 0,
                meter: "main".into(),
                power_w: Some(5.0),
                ..Default::default()
            },
            flags: 2,
        };
        let a = encode("d1", std::slice::from_ref(&r), true);
        let b = encode("d1", std::slice::from_ref(&r), false);
        let last = Some(r.key());
        let a = String::from_utf8(a).unwrap();
        assert!(a.starts_with("device_id,meter,ts_ms,"));
        assert_eq!(a.lines().count(), 2);
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "d1,main,0,1970-01-01T00:00:00.000Z,1,2,,,5,,,,,2\n"
        );
        assert_eq!(
            last,
            Some(ReadingKey {
                ts_ms: 0,
                epoch: 1,
                seq: 2
            })
        );
    }
}
