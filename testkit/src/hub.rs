//! The hub in-process, two ways:
//! - [`TestHub`]: on the test's own tokio runtime, on port 0, with a
//!   temporary SQLite store (the hub's integration tests);
//! - [`BackgroundHub`]: on a runtime of its own in a background thread, on
//!   a chosen port with a chosen database, so a synchronous test can stop
//!   it and start another on the same port (the edge's tests).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::thread::JoinHandle as ThreadHandle;
use std::time::{Duration, Instant};

use ems_hub::admin::Admin;
use ems_hub::store::ViewerScope;
use ems_hub::{Config, HubError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Error as WsError;

use crate::fixtures::sqlite_keys;
use crate::ws::{connect, Client};

/// A hub on the current tokio runtime, listening on a loopback port 0,
/// with a fresh SQLite database in a temp dir.
pub struct TestHub {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `sqlite:PATH` of its database.
    pub db_url: String,
    /// Its database file.
    pub db_path: PathBuf,
    /// The temp dir holding the database (removed when dropped).
    pub dir: tempfile::TempDir,
    /// Triggers the graceful shutdown.
    stop: Option<oneshot::Sender<()>>,
    /// `ems_hub::run`.
    task: Option<JoinHandle<Result<(), HubError>>>,
}

impl TestHub {
    /// A hub with the default configuration.
    pub async fn start() -> TestHub {
        Self::start_with(|_| {}).await
    }

    /// A hub whose configuration `tweak` changes first.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestHub {
        let dir = tempfile::tempdir().expect("temp dir");
        let db_path = dir.path().join("hub.db");
        let db_url = format!("sqlite:{}", db_path.display());
        Self::launch(dir, db_path, db_url, tweak).await
    }

    /// A hub on an existing database (e.g. a PostgreSQL test database);
    /// [`TestHub::stored`] reads SQLite only and does not apply.
    pub async fn start_on(db_url: &str, tweak: impl FnOnce(&mut Config)) -> TestHub {
        let dir = tempfile::tempdir().expect("temp dir");
        let db_path = dir.path().join("not-used.db");
        Self::launch(dir, db_path, db_url.to_string(), tweak).await
    }

    async fn launch(
        dir: tempfile::TempDir,
        db_path: PathBuf,
        db_url: String,
        tweak: impl FnOnce(&mut Config),
    ) -> TestHub {
        crate::logs::init();
        let mut config = Config::new(db_url.clone());
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
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

    /// The admin interface on the hub's database (as the CLI uses it).
    pub fn admin(&self) -> Admin {
        Admin::open(&self.db_url).expect("open the hub's database")
    }

    /// Provisions a device; returns its token.
    pub fn add_device(&self, id: &str) -> String {
        self.admin().add_device(id).expect("add device")
    }

    /// Provisions a viewer of `devices`; returns its token.
    pub fn add_viewer(&self, name: &str, devices: &[&str]) -> String {
        let scope = ViewerScope::Devices(devices.iter().map(|d| d.to_string()).collect());
        self.admin().add_viewer(name, scope).expect("add viewer")
    }

    /// Stored (epoch, seq) of a device, in order.
    pub fn stored(&self, device: &str) -> Vec<(u64, u64)> {
        sqlite_keys(&self.db_path, device).expect("read the hub's database")
    }

    /// A WebSocket handshake to `path`, with `token` as a bearer token.
    pub async fn connect(&self, path: &str, token: Option<&str>) -> Result<Client, WsError> {
        connect(self.addr, path, token).await
    }

    /// A connected device `id`.
    pub async fn device(&self, id: &str, token: &str) -> Client {
        self.connect(&format!("/ws/device/{id}"), Some(token))
            .await
            .unwrap_or_else(|e| panic!("device {id} could not connect: {e}"))
    }

    /// A dashboard of device `id`, with a viewer token in the header.
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

/// Binds `127.0.0.1:port`, retrying until `deadline` (a previous hub on
/// the same port may still be closing).
pub async fn bind_retrying(port: u16, deadline: Instant) -> tokio::net::TcpListener {
    loop {
        match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("bind 127.0.0.1:{port}: {e}"),
        }
    }
}

/// A hub on a tokio runtime of its own (two workers) in a background
/// thread, on `127.0.0.1:port`.
pub struct BackgroundHub {
    /// Triggers the graceful shutdown.
    stop: Option<oneshot::Sender<()>>,
    /// The runtime's thread; ends when `run` returns.
    thread: Option<ThreadHandle<()>>,
}

impl BackgroundHub {
    /// Starts a hub on `db_url` with the configuration `tweak` changes;
    /// returns once it listens (binding is retried for up to 30 s).
    pub fn start(db_url: &str, port: u16, tweak: impl FnOnce(&mut Config)) -> BackgroundHub {
        let bind_for = Duration::from_secs(30);
        let mut config = Config::new(db_url.to_string());
        tweak(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let listener = bind_retrying(port, Instant::now() + bind_for).await;
                let _ = ready_tx.send(());
                ems_hub::run(listener, config, async move {
                    let _ = stopped.await;
                })
                .await
                .expect("hub failed");
            });
        });
        ready_rx.recv_timeout(bind_for).expect("hub did not start");
        BackgroundHub {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Graceful shutdown; waits for the hub's thread.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("hub thread panicked");
        }
    }
}

impl Drop for BackgroundHub {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}
