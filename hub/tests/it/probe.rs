//! Small probes for the round-two hardening tests: raw HTTP exchanges,
//! metric samples read from `/metrics`, and waits for a socket's end.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Client, SOON};

/// A raw HTTP response: status, head (lower-cased header names kept as
/// sent) and body.
#[derive(Debug)]
pub struct Raw {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Raw {
    /// A header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// Sends `request` on a new connection from `addr`'s loopback and reads
/// until the server closes or the head (and a `Content-Length` body) is
/// complete. `None`: no answer within `wait`.
pub async fn exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> Option<Raw> {
    exchange_from(None, addr, request, wait).await
}

/// Like [`exchange`], from the local address `from` (e.g. 127.0.0.2).
pub async fn exchange_from(
    from: Option<std::net::IpAddr>,
    addr: SocketAddr,
    request: &[u8],
    wait: Duration,
) -> Option<Raw> {
    let attempt = async {
        let mut s = connect_from(from, addr).await?;
        s.write_all(request).await.ok()?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if let Some(r) = complete(&out) {
                return Some(r);
            }
        }
        complete(&out).or_else(|| parse(&out))
    };
    tokio::time::timeout(wait, attempt).await.ok().flatten()
}

/// A TCP connection to `addr` from `from` (any loopback address).
pub async fn connect_from(from: Option<std::net::IpAddr>, addr: SocketAddr) -> Option<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4().ok()?;
    if let Some(ip) = from {
        sock.bind(SocketAddr::new(ip, 0)).ok()?;
    }
    sock.connect(addr).await.ok()
}

fn parse(bytes: &[u8]) -> Option<Raw> {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some(Raw {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

/// The response once its head and `Content-Length` body are in (a 101
/// has no body).
fn complete(bytes: &[u8]) -> Option<Raw> {
    let r = parse(bytes)?;
    if r.status == 101 {
        return Some(r);
    }
    let len: usize = r.header("content-length")?.parse().ok()?;
    (r.body.len() >= len).then_some(r)
}

/// `GET path` with `Connection: close`.
pub fn get(path: &str, headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n").into_bytes()
}

/// A WebSocket upgrade request for `path` with extra header lines.
pub fn upgrade(path: &str, headers: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{headers}\r\n"
    )
    .into_bytes()
}

/// Body of `GET /metrics` at `addr`.
pub async fn metrics_at(addr: SocketAddr) -> String {
    let r = exchange(addr, &get("/metrics", ""), SOON)
        .await
        .expect("no answer to GET /metrics");
    assert_eq!(r.status, 200, "{r:?}");
    r.body
}

/// Value of one sample line (`name{labels}` exactly as rendered), if any.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// Polls `/metrics` at `addr` until `series` satisfies `ok`; returns it.
pub async fn wait_metric(addr: SocketAddr, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + SOON;
    loop {
        let text = metrics_at(addr).await;
        let v = sample(&text, series);
        if let Some(v) = v.filter(|v| ok(*v)) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {v:?} after {SOON:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the socket ends; returns the close code if there was one.
pub async fn closed_with(ws: &mut Client) -> Option<u16> {
    let deadline = Instant::now() + SOON;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Err(_) => panic!("socket still open after {SOON:?}"),
            Ok(None) | Ok(Some(Err(_))) => return None,
            Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// A free loopback port (bound and released; fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
