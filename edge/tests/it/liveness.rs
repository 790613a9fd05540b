//! Keeping a link alive and noticing when it is not: answering the hub's
//! pings while idle, and replacing a half-open connection.

use std::fs;
use std::net::TcpStream;
use std::time::Duration;

use crate::harness::*;

#[test]
fn answers_hub_pings_while_idle() {
    let w = World::new();
    let _hub = Hub::start(&w.db_url, w.port, |c| {
        c.ping_interval = Duration::from_millis(250);
        c.max_missed_pongs = 4;
    });
    // One reading at start, then nothing for an hour; the edge itself
    // does not ping, so only its pongs keep the link alive.
    let config = w.config(
        "edge.toml",
        "",
        "ping_after_ms = 600000\ndead_after_ms = 700000",
    );
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("sample_interval_ms = 50", "sample_interval_ms = 3600000");
    fs::write(&config, text).unwrap();
    let mut edge = w.edge(&config);
    wait_for("the first reading", SOON, || w.count() == 1);
    // 4 s idle = 16 hub pings; 4 missed in a row (a second without an
    // answer: room for a loaded machine) would kill the link.
    std::thread::sleep(Duration::from_secs(4));
    let log = edge.log();
    assert_eq!(edge.count_in_log("CONNECTED to"), 1, "{log}");
    assert!(!log.contains("link lost"), "{log}");
    edge.terminate();
    edge.assert_token_not_logged();
}

/// A TCP proxy that can turn its current connections into a black hole
/// (open sockets that no longer carry data: a half-open link, as after a
/// NAT timeout or a pulled cable upstream). New connections pass.
struct BlackHoleProxy {
    port: u16,
    /// Connections with an id below this are black-holed.
    cut_below: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Next connection id.
    next_id: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl BlackHoleProxy {
    fn start(backend_port: u16) -> BlackHoleProxy {
        use std::io::{ErrorKind, Read, Write};
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut_below = Arc::new(AtomicU64::new(0));
        let next_id = Arc::new(AtomicU64::new(0));
        let (cut, next) = (cut_below.clone(), next_id.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(front) = conn else { continue };
                let Ok(back) = TcpStream::connect(("127.0.0.1", backend_port)) else {
                    continue;
                };
                let id = next.fetch_add(1, Ordering::SeqCst);
                for (mut from, mut to) in [
                    (front.try_clone().unwrap(), back.try_clone().unwrap()),
                    (back, front),
                ] {
                    let cut = cut.clone();
                    std::thread::spawn(move || {
                        from.set_read_timeout(Some(Duration::from_millis(50)))
                            .unwrap();
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) => return,
                                Ok(n) => {
                                    if id >= cut.load(Ordering::SeqCst)
                                        && to.write_all(&buf[..n]).is_err()
                                    {
                                        return;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        ErrorKind::WouldBlock | ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
            }
        });
        BlackHoleProxy {
            port,
            cut_below,
            next_id,
        }
    }

    fn black_hole_current(&self) {
        use std::sync::atomic::Ordering;
        self.cut_below
            .store(self.next_id.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

#[test]
fn a_half_open_link_is_detected_and_replaced() {
    let w = World::new();
    let _hub = Hub::start(&w.db_url, w.port, |c| {
        // The hub must not notice first (its own heartbeat would close it).
        c.ping_interval = Duration::from_secs(600);
    });
    let proxy = BlackHoleProxy::start(w.port);
    let config = w.config("edge.toml", "", "ping_after_ms = 300\ndead_after_ms = 1500");
    let text = fs::read_to_string(&config).unwrap().replace(
        &format!("ws://127.0.0.1:{}", w.port),
        &format!("ws://127.0.0.1:{}", proxy.port),
    );
    fs::write(&config, text).unwrap();
    let mut edge = w.edge(&config);
    let epoch = edge.epoch();
    wait_for("streaming", SOON, || w.count() >= 20);
    proxy.black_hole_current();
    let before = w.count();
    wait_for("the dead link noticed", SOON, || {
        edge.log().contains("(dead link)")
    });
    wait_for("streaming again", SOON, || w.count() > before + 20);
    assert!(edge.count_in_log("CONNECTED to") >= 2);
    let last = edge.last_sampled().unwrap();
    wait_for("everything stored", SOON, || {
        w.seqs_of(epoch).last().is_some_and(|m| *m >= last)
    });
    assert_contiguous(&w.seqs_of(epoch), "across the half-open link");
    edge.terminate();
    edge.assert_token_not_logged();
}
