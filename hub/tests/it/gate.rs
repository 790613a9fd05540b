//! A switchable TCP proxy between a hub and its PostgreSQL, and a hub
//! started in-process on any database URL.
//!
//! The gate forwards (optionally adding a delay to everything the hub
//! sends, like a database across a slow link), refuses (accepts and closes
//! at once: the database is down), or black-holes (accepts and never
//! answers: a host that stopped responding). Leaving `Forward` cuts every
//! forwarded link, as a crashed database would.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ems_hub::{Config, HubError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// What the gate does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Forward,
    Refuse,
    Blackhole,
}

#[derive(Debug)]
struct State {
    mode: Mode,
    upstream: Option<u16>,
    delay: Duration,
    /// Black-holed sockets, held open until the mode changes.
    held: Vec<TcpStream>,
}

pub struct Gate {
    pub port: u16,
    state: Arc<Mutex<State>>,
    /// Bumped on every mode change: forwarded links end.
    generation: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Gate {
    /// A gate on a free loopback port, forwarding to `upstream` (none yet:
    /// every connection is closed at once).
    pub async fn start(upstream: Option<u16>, mode: Mode) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State {
            mode,
            upstream,
            delay: Duration::ZERO,
            held: Vec::new(),
        }));
        let (generation, _) = watch::channel(0u64);
        let st = state.clone();
        let gen = generation.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let (mode, upstream, delay) = {
                    let s = st.lock().unwrap();
                    (s.mode, s.upstream, s.delay)
                };
                match (mode, upstream) {
                    (Mode::Forward, Some(up)) => {
                        tokio::spawn(forward(sock, up, delay, gen.subscribe()));
                    }
                    (Mode::Blackhole, _) => st.lock().unwrap().held.push(sock),
                    _ => drop(sock),
                }
            }
        });
        Gate {
            port,
            state,
            generation,
            task,
        }
    }

    /// `postgres://postgres@127.0.0.1:PORT/db` through the gate.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn set_upstream(&self, port: u16) {
        self.state.lock().unwrap().upstream = Some(port);
    }

    /// Delay added before forwarding each chunk the hub sends (one per
    /// round trip of a simple query).
    pub fn set_delay(&self, d: Duration) {
        self.state.lock().unwrap().delay = d;
    }

    /// Switches the mode; every forwarded link and every held socket ends.
    pub fn set_mode(&self, mode: Mode) {
        let held = {
            let mut s = self.state.lock().unwrap();
            s.mode = mode;
            std::mem::take(&mut s.held)
        };
        drop(held);
        self.generation.send_modify(|g| *g += 1);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}

async fn forward(client: TcpStream, upstream: u16, delay: Duration, mut gen: watch::Receiver<u64>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = gen.changed() => {}
    }
}

/// A hub running in-process on `config` (any database URL).
pub struct RunningHub {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<Result<(), HubError>>>,
}

impl RunningHub {
    pub async fn start(config: Config) -> RunningHub {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(ems_hub::run(listener, config, async move {
            let _ = stopped.await;
        }));
        RunningHub {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Graceful shutdown; the result of `run`.
    pub async fn stop(&mut self) -> Result<(), HubError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let task = self.task.take().expect("stopped twice");
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("hub did not stop")
            .expect("hub task panicked")
    }
}

impl Drop for RunningHub {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}
