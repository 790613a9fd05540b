//! Test harness: start/stop a hub, provision devices, connect clients.

use std::net::SocketAddr;
use std::time::Duration;

use ems_hub::admin::Admin;
use ems_hub::store::ViewerScope;
use ems_hub::{Config, HubError};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Generous bound for anything that should happen "soon" on a loaded
/// 2-core machine.
pub const SOON: Duration = Duration::from_secs(15);

pub struct TestHub {
    pub addr: SocketAddr,
    pub db_url: String,
    pub db_path: std::path::PathBuf,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), HubError>>>,
}

impl TestHub {
    pub async fn start() -> TestHub {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestHub {
        let level = std::env::var("EMS_TEST_LOG")
            .ok()
            .and_then(|l| l.parse().ok());
        let _ = simple_logger::SimpleLogger::new()
            .with_level(level.unwrap_or(log::LevelFilter::Warn))
            .init();
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("hub.db");
        let db_url = format!("sqlite:{}", db_path.display());
        let mut config = Config::new(db_url.clone());
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(ems_hub::run(listener, config, async move {
            let _ = stopped.await;
        }));
        TestHub {
            addr,
            db_url,
            db_path,
            dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Triggers a graceful shutdown and waits for `run` to return.
    pub async fn stop(&mut self) -> Result<(), HubError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let task = self.task.take().expect("hub already stopped");
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("hub did not stop")
            .expect("hub task panicked")
    }

    pub fn admin(&self) -> Admin {
        Admin::open(&self.db_url).unwrap()
    }

    pub fn add_device(&self, id: &str) -> String {
        self.admin().add_device(id).unwrap()
    }

    pub fn add_viewer(&self, name: &str, devices: &[&str]) -> String {
        let scope = ViewerScope::Devices(devices.iter().map(|d| d.to_string()).collect());
        self.admin().add_viewer(name, scope).unwrap()
    }

    /// Stored (epoch, seq) of a device, in order.
    pub fn stored(&self, device: &str) -> Vec<(u64, u64)> {
        let conn = rusqlite::Connection::open(&self.db_path).unwrap();
        let mut stmt = conn
            .prepare("SELECT epoch, seq FROM readings WHERE device_id = ?1 ORDER BY epoch, seq")
            .unwrap();
        let rows = stmt
            .query_map([device], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
            .unwrap();
        rows.map(|r| r.unwrap()).collect()
    }

    pub async fn connect(&self, path: &str, token: Option<&str>) -> Result<Client, WsError> {
        connect(self.addr, path, token).await
    }

    pub async fn device(&self, id: &str, token: &str) -> Client {
        self.connect(&format!("/ws/device/{id}"), Some(token))
            .await
            .unwrap_or_else(|e| panic!("device {id} could not connect: {e}"))
    }

    pub async fn dashboard(&self, id: &str, token: &str) -> Client {
        self.connect(&format!("/ws/dashboard/{id}"), Some(token))
            .await
            .unwrap_or_else(|e| panic!("dashboard {id} could not connect: {e}"))
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub async fn connect(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<Client, WsError> {
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    if let Some(t) = token {
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

/// HTTP status of a refused handshake (panics if it was accepted).
pub async fn refused_status(addr: SocketAddr, path: &str, token: Option<&str>) -> u16 {
    match connect(addr, path, token).await {
        Ok(_) => panic!("{path}: handshake unexpectedly accepted"),
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("{path}: unexpected error {e}"),
    }
}

pub fn reading(epoch: u64, seq: u64) -> String {
    format!(
        r#"{{"type":"reading","epoch":{epoch},"seq":{seq},"ts_ms":{},"meter":"main","voltage_v":230.1,"current_a":4.2,"power_w":960.5,"energy_wh":1523400.0}}"#,
        now_ms()
    )
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

pub async fn send_text(ws: &mut Client, text: impl Into<String>) {
    ws.send(Message::Text(text.into().into())).await.unwrap();
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
        Message::Text(t) => serde_json::from_str(&t).unwrap(),
        m => panic!("expected a text frame, got {m:?}"),
    }
}

/// Reads frames until an ack covering (epoch, seq) arrives; returns the
/// other frames seen.
pub async fn wait_ack(ws: &mut Client, epoch: u64, seq: u64) -> Vec<serde_json::Value> {
    let mut others = Vec::new();
    loop {
        let v = next_json(ws).await;
        if v["type"] == "ack" && v["epoch"] == epoch && v["seq"].as_u64().unwrap() >= seq {
            return others;
        }
        others.push(v);
    }
}

/// Expects a close frame with `code`; returns its reason.
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
