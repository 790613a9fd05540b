//! WebSocket clients for tests: connect with a bearer token, read the
//! next frame with a deadline, wait for acks, expect a close code.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::fixtures::SOON;

/// A test's WebSocket client.
pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket handshake to `ws://addr{path}`, with `token` as a bearer
/// token in the `Authorization` header.
pub async fn connect(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<Client, WsError> {
    let mut req = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("a valid request");
    if let Some(t) = token {
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {t}")).expect("a header value"),
        );
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

/// Connects to `path` with extra handshake headers; returns the socket and
/// the response's `Sec-WebSocket-Protocol` plus every response header
/// (`name: value`, to check that no token is echoed).
pub async fn connect_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&'static str, String)],
) -> Result<(Client, Option<String>, Vec<String>), WsError> {
    let mut req = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("a valid request");
    for (k, v) in headers {
        req.headers_mut()
            .append(*k, HeaderValue::from_str(v).expect("a header value"));
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
    let proto = resp
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().expect("a text header").to_string());
    let all = resp
        .headers()
        .iter()
        .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("")))
        .collect();
    Ok((ws, proto, all))
}

/// A dashboard through the browser path: the viewer token in the
/// subprotocol list (`ems.v1, ems.bearer.TOKEN[, ems.resume.SINCE]`).
pub async fn browser_dashboard(
    addr: SocketAddr,
    device: &str,
    viewer: &str,
    resume: Option<i64>,
) -> Client {
    let mut offer = format!("ems.v1, ems.bearer.{viewer}");
    if let Some(since) = resume {
        offer.push_str(&format!(", ems.resume.{since}"));
    }
    let (ws, proto, _) = connect_with(
        addr,
        &format!("/ws/dashboard/{device}"),
        &[("sec-websocket-protocol", offer)],
    )
    .await
    .unwrap_or_else(|e| panic!("dashboard {device}: {e}"));
    assert_eq!(proto.as_deref(), Some("ems.v1"));
    ws
}

/// HTTP status of a refused handshake (panics if it was accepted).
pub async fn refused_status(addr: SocketAddr, path: &str, token: Option<&str>) -> u16 {
    match connect(addr, path, token).await {
        Ok(_) => panic!("{path}: handshake unexpectedly accepted"),
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("{path}: unexpected error {e}"),
    }
}

/// Sends one text frame.
pub async fn send_text(ws: &mut Client, text: impl Into<String>) {
    ws.send(Message::Text(text.into().into()))
        .await
        .expect("send a text frame");
}

/// Next text or close frame (pings and pongs are skipped).
pub async fn next_msg(ws: &mut Client) -> Message {
    loop {
        let m = tokio::time::timeout(SOON, ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("stream ended")
            .expect("socket error");
        match m {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

/// Next text frame as JSON.
pub async fn next_json(ws: &mut Client) -> serde_json::Value {
    match next_msg(ws).await {
        Message::Text(t) => serde_json::from_str(&t)
            .unwrap_or_else(|e| panic!("a text frame that is not JSON ({e}): {t}")),
        m => panic!("expected a text frame, got {m:?}"),
    }
}

/// Reads frames until an ack covering (epoch, seq) arrives; returns the
/// other frames seen.
pub async fn wait_ack(ws: &mut Client, epoch: u64, seq: u64) -> Vec<serde_json::Value> {
    let mut others = Vec::new();
    loop {
        let v = next_json(ws).await;
        if v["type"] == "ack"
            && v["epoch"] == epoch
            && v["seq"].as_u64().expect("an ack's seq") >= seq
        {
            return others;
        }
        others.push(v);
    }
}

/// Expects a close frame with `code` (text frames before it are
/// skipped); returns its reason.
pub async fn expect_close(ws: &mut Client, code: u16) -> String {
    loop {
        match next_msg(ws).await {
            Message::Close(Some(f)) => {
                assert_eq!(u16::from(f.code), code, "close reason {:?}", f.reason);
                return f.reason.to_string();
            }
            Message::Close(None) => panic!("close without code, expected {code}"),
            Message::Text(_) => continue,
            m => panic!("expected close {code}, got {m:?}"),
        }
    }
}

/// Next dashboard `reading` frame as JSON, skipping control frames
/// (`status`, `replay_end`, `backfill`).
pub async fn next_reading(ws: &mut Client) -> serde_json::Value {
    loop {
        let v = next_json(ws).await;
        if v["type"] == "reading" {
            return v;
        }
    }
}
