//! Connection lifecycle: takeover, heartbeat, graceful shutdown.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::dashboard::http;
use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_replaces_the_first_with_4000() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev");
    let mut old = hub.device("dev", &token).await;
    let mut new = hub.device("dev", &token).await;
    assert_eq!(expect_close(&mut old, 4000).await, "replaced");
    send_text(&mut new, reading(1, 0)).await;
    wait_ack(&mut new, 1, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_pings_is_dropped() {
    // Pings every 100 ms; a peer is dead after 5 unanswered ones. A reader
    // that a loaded machine leaves unscheduled for a few hundred ms still
    // answers in time; one that never reads is dropped within ~0.6 s.
    let hub = TestHub::start_with(|c| {
        c.ping_interval = Duration::from_millis(100);
        c.max_missed_pongs = 5;
    })
    .await;
    let token = hub.add_device("dev");
    let viewer = hub.add_viewer("v", &["dev"]);
    // `silent` is never polled, so it never answers pings.
    let mut silent = hub.device("dev", &token).await;
    let mut silent_dash = hub.dashboard("dev", &viewer).await;
    // `lively` keeps reading (tungstenite answers pings while reading)
    // until told to stop: at least 2 s (20 pings) and until the hub has
    // declared both silent peers dead.
    let mut lively = hub.dashboard("dev", &viewer).await;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let lively_task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stopped => return true,
                msg = lively.next() => match msg {
                    Some(Ok(_)) => continue,
                    _ => return false,
                },
            }
        }
    });
    let at_least = tokio::time::Instant::now() + Duration::from_secs(2);
    // The positive signal: the hub counts one heartbeat death per role.
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let m = http(hub.addr, "GET", "/metrics", &[], None).await.body;
        let dead = |role: &str| {
            let series = format!("ems_heartbeat_deaths_total{{role=\"{role}\"}} ");
            m.lines()
                .find_map(|l| l.strip_prefix(series.as_str()))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        if dead("device") >= 1.0 && dead("dashboard") >= 1.0 {
            // Only the two silent peers died, never the lively one.
            assert_eq!((dead("device"), dead("dashboard")), (1.0, 1.0), "{m}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "silent peers not declared dead:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep_until(at_least).await;
    let _ = stop.send(());
    assert!(
        lively_task.await.unwrap(),
        "a pong-answering subscriber was dropped"
    );
    // The hub has closed the silent ones; draining shows the end of the
    // stream.
    for ws in [&mut silent, &mut silent_dash] {
        let ended = tokio::time::timeout(SOON, async {
            loop {
                match ws.next().await {
                    Some(Ok(_)) => continue,
                    _ => return,
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "dead connection not dropped");
    }
    // The registry slot was freed: a new connection is not a takeover, so
    // it is served normally.
    let mut again = hub.device("dev", &token).await;
    send_text(&mut again, reading(1, 0)).await;
    wait_ack(&mut again, 1, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_loses_nothing() {
    // Runs that never fill and a linger longer than the test: the readings
    // are received and held by the writer, not yet committed, when the
    // shutdown starts. (Fewer than 64, so none is committed as a backlog.)
    let mut hub = TestHub::start_with(|c| {
        c.batch_run = 10_000;
        c.batch_linger = Duration::from_secs(600);
    })
    .await;
    let token = hub.add_device("dev");
    let mut ws = hub.device("dev", &token).await;
    let n = 60u64;
    for seq in 0..n {
        send_text(&mut ws, reading(2, seq)).await;
    }
    // Every frame read (a ping would ask for the acks at once).
    let until = std::time::Instant::now() + SOON;
    loop {
        let body = http(hub.addr, "GET", "/metrics", &[], None).await.body;
        let got = body
            .lines()
            .find_map(|l| l.strip_prefix("ems_frames_received_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if got >= n as f64 {
            break;
        }
        assert!(std::time::Instant::now() < until, "frames read: {got}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        hub.stored("dev").is_empty(),
        "committed before the shutdown"
    );
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(async move {
        let r = hub.stop().await;
        (r, hub)
    });
    // The device gets its acks, then a 1001 close.
    let mut acked = None;
    loop {
        match next_msg(&mut ws).await {
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                assert_eq!(v["type"], "ack", "{v}");
                acked = v["seq"].as_u64();
            }
            Message::Close(Some(f)) => {
                assert_eq!(u16::from(f.code), 1001);
                break;
            }
            m => panic!("unexpected {m:?}"),
        }
    }
    let (r, hub) = stopping.await.unwrap();
    r.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        started.elapsed()
    );
    let stored = hub.stored("dev");
    assert_eq!(stored.len() as u64, n, "readings lost in shutdown");
    assert_eq!(acked, Some(n - 1), "not every stored reading was acked");
}
