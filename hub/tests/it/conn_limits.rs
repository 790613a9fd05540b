//! Limits that cover every socket: the global connection limit holds for
//! upgraded WebSockets, dashboards per viewer token and connections per
//! client address are capped (429 on the handshake; `X-Forwarded-For` only
//! from a trusted proxy), a takeover keeps the device's rate-limit bucket,
//! and `/metrics` can move to a listener of its own.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ems_hub::config::RateLimit;

use crate::harness::*;
use crate::probe::{exchange, exchange_from, free_port, get, sample, upgrade};

fn auth(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_holds_for_upgraded_sockets() {
    let hub = TestHub::start_with(|c| c.max_connections = 3).await;
    let tokens: Vec<String> = (0..4)
        .map(|i| hub.add_device(&format!("dev-{i}")))
        .collect();
    let mut live = Vec::new();
    for (i, t) in tokens.iter().enumerate().take(3) {
        live.push(hub.device(&format!("dev-{i}"), t).await);
    }
    // A fourth socket of any kind: 503 with Retry-After, not a 101.
    let r = exchange(
        hub.addr,
        &upgrade("/ws/device/dev-3", &auth(&tokens[3])),
        SOON,
    )
    .await
    .expect("the handshake over the limit got no answer");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.header("retry-after").is_some(), "{r:?}");
    let r = exchange(hub.addr, &get("/healthz", ""), SOON)
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    // Nothing else disturbed: the three stream on.
    for (i, ws) in live.iter_mut().enumerate() {
        send_text(ws, reading(1, i as u64)).await;
        wait_ack(ws, 1, i as u64).await;
    }
    // One leaves; its slot is free again.
    drop(live.pop());
    let deadline = std::time::Instant::now() + SOON;
    loop {
        match connect(hub.addr, "/ws/device/dev-3", Some(&tokens[3])).await {
            Ok(_) => break,
            Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_per_viewer_token_are_capped() {
    let hub = TestHub::start_with(|c| c.max_dashboards_per_token = 2).await;
    hub.add_device("dev-a");
    let v1 = hub.add_viewer("v1", &["dev-a"]);
    let v2 = hub.add_viewer("v2", &["dev-a"]);
    let a = hub.dashboard("dev-a", &v1).await;
    let _b = hub.dashboard("dev-a", &v1).await;
    let r = exchange(hub.addr, &upgrade("/ws/dashboard/dev-a", &auth(&v1)), SOON)
        .await
        .unwrap();
    assert_eq!(r.status, 429, "{r:?}");
    // Another token is not affected.
    let _c = hub.dashboard("dev-a", &v2).await;
    // A closed dashboard frees its place.
    drop(a);
    let deadline = std::time::Instant::now() + SOON;
    loop {
        match connect(hub.addr, "/ws/dashboard/dev-a", Some(&v1)).await {
            Ok(_) => break,
            Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_capped_and_forwarded_for_needs_a_trusted_proxy() {
    let proxy = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let hub = TestHub::start_with(|c| {
        c.max_connections_per_ip = 3;
        c.trusted_proxies = vec![proxy];
    })
    .await;
    let tokens: Vec<String> = (0..8)
        .map(|i| hub.add_device(&format!("dev-{i}")))
        .collect();
    // Direct from 127.0.0.1: three sockets, then 429 — whatever
    // X-Forwarded-For a client makes up.
    let mut live = Vec::new();
    for (i, t) in tokens.iter().enumerate().take(3) {
        live.push(hub.device(&format!("dev-{i}"), t).await);
    }
    let r = exchange(
        hub.addr,
        &upgrade("/ws/device/dev-3", &auth(&tokens[3])),
        SOON,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 429, "{r:?}");
    let forged = format!("{}X-Forwarded-For: 10.9.9.9\r\n", auth(&tokens[3]));
    let r = exchange(hub.addr, &upgrade("/ws/device/dev-3", &forged), SOON)
        .await
        .unwrap();
    assert_eq!(r.status, 429, "{r:?}");
    let r = exchange(hub.addr, &get("/healthz", ""), SOON)
        .await
        .unwrap();
    assert_eq!(r.status, 429, "plain HTTP counts too: {r:?}");
    // Through the trusted proxy (127.0.0.2) the client is the forwarded
    // address: three per client, other clients unaffected.
    let mut proxied = Vec::new();
    for (i, token) in tokens.iter().enumerate().take(6).skip(3) {
        let h = format!("{}X-Forwarded-For: 10.0.0.1\r\n", auth(token));
        let mut s = crate::probe::connect_from(Some(proxy), hub.addr)
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, &upgrade(&format!("/ws/device/dev-{i}"), &h))
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(SOON, tokio::io::AsyncReadExt::read(&mut s, &mut buf))
            .await
            .unwrap()
            .unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        proxied.push(s);
    }
    let h = format!("{}X-Forwarded-For: 10.0.0.1\r\n", auth(&tokens[6]));
    let r = exchange_from(
        Some(proxy),
        hub.addr,
        &upgrade("/ws/device/dev-6", &h),
        SOON,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 429, "{r:?}");
    let h = format!(
        "{}X-Forwarded-For: 192.0.2.7, 10.0.0.2\r\n",
        auth(&tokens[6])
    );
    let r = exchange_from(
        Some(proxy),
        hub.addr,
        &upgrade("/ws/device/dev-6", &h),
        SOON,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 101, "{r:?}");
    // The direct sockets still stream.
    for (i, ws) in live.iter_mut().enumerate() {
        send_text(ws, reading(1, i as u64)).await;
        wait_ack(ws, 1, i as u64).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_keeps_the_drained_rate_limit_bucket() {
    let hub = TestHub::start_with(|c| {
        c.rate_limit = RateLimit {
            rate: 0.01,
            burst: 3.0,
            abuse_after: Duration::from_secs(600),
        };
    })
    .await;
    let token = hub.add_device("dev-a");
    let mut old = hub.device("dev-a", &token).await;
    for seq in 0..3 {
        send_text(&mut old, reading(1, seq)).await;
    }
    wait_ack(&mut old, 1, 2).await;
    // The same device connects again while the first connection is live:
    // the new one takes over, with the bucket the old one drained.
    let mut new = hub.device("dev-a", &token).await;
    assert_eq!(expect_close(&mut old, 4000).await, "replaced");
    send_text(&mut new, reading(1, 3)).await;
    let v = next_json(&mut new).await;
    assert_eq!(v["type"], "rejected", "a takeover refilled the bucket: {v}");
    assert!(
        v["reason"].as_str().unwrap().starts_with("rate_limited"),
        "{v}"
    );
    assert_eq!(hub.stored("dev-a").len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_move_to_their_own_listener() {
    let port = free_port();
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let hub = TestHub::start_with(|c| c.metrics_listen = Some(metrics_addr)).await;
    let r = exchange(hub.addr, &get("/metrics", ""), SOON)
        .await
        .unwrap();
    assert_eq!(
        r.status, 404,
        "the public listener still serves metrics: {r:?}"
    );
    let deadline = std::time::Instant::now() + SOON;
    let r = loop {
        if let Some(r) = exchange(metrics_addr, &get("/metrics", ""), Duration::from_secs(2)).await
        {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no metrics listener on {metrics_addr}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        sample(&r.body, "ems_connections{role=\"device\"}").is_some(),
        "{}",
        r.body
    );
    // The metrics listener serves nothing else.
    let r = exchange(metrics_addr, &get("/healthz", ""), SOON)
        .await
        .unwrap();
    assert_eq!(r.status, 404, "{r:?}");
    // The public listener's other probes are unchanged.
    let r = exchange(hub.addr, &get("/readyz", ""), SOON).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
}
