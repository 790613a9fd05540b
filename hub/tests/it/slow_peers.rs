//! Peers that stop reading: every write the hub makes has a deadline, so
//! such a peer is cut (and its connection slot freed) instead of holding
//! memory and a permit forever — plain HTTP responses, WebSocket frames and
//! the dashboard's pings alike.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;
use crate::probe::{exchange, get, metrics_at, sample, wait_metric};

/// A socket with a tiny receive buffer that will never be read.
async fn stuck_socket(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(addr).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_clients_that_never_read_are_cut_and_free_their_slots() {
    let hub = TestHub::start_with(|c| {
        c.max_connections = 4;
        c.write_timeout = Duration::from_secs(1);
        // Long enough that only the write deadline can end them.
        c.handshake_timeout = Duration::from_secs(120);
    })
    .await;
    // Four connections (the whole limit) pipeline 2,000 requests for the
    // metrics page (~8 KB each, far more than any socket buffer) and never
    // read a byte.
    let mut stuck = Vec::new();
    for _ in 0..4 {
        let s = stuck_socket(hub.addr).await;
        let (r, mut w) = s.into_split();
        let requests = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2000);
        // Written by a task: the hub stops reading once its writes block.
        let writer = tokio::spawn(async move {
            let _ = w.write_all(requests.as_bytes()).await;
            w
        });
        stuck.push((r, writer));
    }
    // A new client is served once the stuck ones are cut.
    let t = Instant::now();
    loop {
        if let Some(r) = exchange(hub.addr, &get("/healthz", ""), Duration::from_secs(2)).await {
            if r.status == 200 {
                break;
            }
        }
        assert!(
            t.elapsed() < SOON,
            "no connection slot came free within {SOON:?}: clients that never read hold them"
        );
    }
    println!(
        "served a new client {:?} after the stuck ones filled the limit",
        t.elapsed()
    );
    let cut = wait_metric(hub.addr, "ems_write_timeouts_total", |v| v >= 4.0).await;
    assert!(cut >= 4.0);
}

/// A hub on a listener whose accepted sockets have a small, fixed send
/// buffer (Linux copies the listener's `SO_SNDBUF` to them and turns off
/// send-buffer autotuning): pings of two bytes each fill it in seconds,
/// where an autotuned buffer grows for minutes. Stops when dropped.
struct SmallBufferHub {
    addr: std::net::SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

impl SmallBufferHub {
    async fn start(tweak: impl FnOnce(&mut ems_hub::Config)) -> (SmallBufferHub, String) {
        let dir = tempfile::tempdir().unwrap();
        let db = format!("sqlite:{}", dir.path().join("hub.db").display());
        let mut admin = ems_hub::admin::Admin::open(&db).unwrap();
        admin.add_device("dev-a").unwrap();
        let viewer = admin
            .add_viewer(
                "v",
                ems_hub::store::ViewerScope::Devices(vec!["dev-a".into()]),
            )
            .unwrap();
        let mut config = ems_hub::Config::new(db);
        tweak(&mut config);
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_send_buffer_size(4096).unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = sock.listen(128).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(ems_hub::run(listener, config, async move {
            let _ = stopped.await;
        }));
        let hub = SmallBufferHub {
            addr,
            _stop: stop,
            _dir: dir,
        };
        (hub, viewer)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_that_stops_reading_is_cut_even_when_only_pings_are_written() {
    let (hub, viewer) = SmallBufferHub::start(|c| {
        // Only pings are written, as fast as the heartbeat allows, and
        // unanswered pings never end the session: only a write deadline can.
        c.ping_interval = Duration::from_millis(1);
        c.max_missed_pongs = u32::MAX;
        c.write_timeout = Duration::from_secs(1);
        c.viewer_recheck = Duration::from_secs(3600);
    })
    .await;
    let stream = stuck_socket(hub.addr).await;
    let mut req = format!("ws://{}/ws/dashboard/dev-a", hub.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {viewer}")).unwrap(),
    );
    let (_never_read, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    // Counted once the upgraded session starts (after the client's 101).
    wait_metric(hub.addr, "ems_connections{role=\"dashboard\"}", |v| {
        v == 1.0
    })
    .await;
    // The buffers fill with pings; then a ping write blocks and must time out.
    let (_, took) = wait_until_cut(hub.addr, "dashboard").await;
    println!("dashboard that never reads (pings only) cut after {took:?}");
}

/// Waits (up to 60 s) until the hub holds no connection of `role`; the
/// metrics at that moment and how long it took.
async fn wait_until_cut(addr: std::net::SocketAddr, role: &str) -> (String, Duration) {
    let gauge = format!("ems_connections{{role=\"{role}\"}}");
    let t = Instant::now();
    let deadline = t + Duration::from_secs(60);
    loop {
        let m = metrics_at(addr).await;
        if sample(&m, &gauge) == Some(0.0) {
            return (m, t.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "the {role} whose peer never reads is still open after {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stops_reading_is_cut_and_counted() {
    let (hub, _) = SmallBufferHub::start(|c| {
        c.write_timeout = Duration::from_secs(1);
    })
    .await;
    let token = {
        let db = format!("sqlite:{}", hub._dir.path().join("hub.db").display());
        ems_hub::admin::Admin::open(&db)
            .unwrap()
            .rotate_device("dev-a")
            .unwrap()
    };
    let stream = stuck_socket(hub.addr).await;
    let mut req = format!("ws://{}/ws/device/dev-a", hub.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    let (mut never_reads, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    wait_metric(hub.addr, "ems_connections{role=\"device\"}", |v| v == 1.0).await;
    let before = sample(&metrics_at(hub.addr).await, "ems_write_timeouts_total").unwrap_or(0.0);
    // Pings the hub must answer: its pongs fill both buffers, then a pong
    // write blocks and must time out. The device's own writes block or
    // fail once the hub stops reading or cuts it.
    let pinger = tokio::spawn(async move {
        use futures_util::SinkExt;
        let ping = Message::Ping(vec![7u8; 125].into());
        while never_reads.send(ping.clone()).await.is_ok() {}
    });
    let (m, took) = wait_until_cut(hub.addr, "device").await;
    assert!(sample(&m, "ems_write_timeouts_total").unwrap_or(0.0) > before);
    println!("device that never reads cut after {took:?}");
    pinger.abort();
}
