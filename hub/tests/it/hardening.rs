//! Adversarial cases: one test per row of the table in
//! docs/operations/limits-and-hardening.md. Each test asserts the outcome
//! the table states.
//!
//! Timing: bounds are generous (SOON = 15 s) so the tests pass on a loaded
//! 2-core machine; the real figures are printed (`--nocapture`) and
//! recorded in docs/operations/limits-and-hardening.md.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

/// Sends a raw HTTP request and returns the whole response (until the
/// server closes or 2 s of silence).
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") && !request.starts_with(b"GET /metrics")
                {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn upgrade_request(path: &str, extra_headers: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra_headers}\r\n"
    )
}

fn status_line(resp: &str) -> &str {
    resp.lines().next().unwrap_or("")
}

/// Body of `GET /metrics`.
async fn metrics(addr: SocketAddr) -> String {
    let resp = raw(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status_line(&resp).starts_with("HTTP/1.1 200"), "{resp}");
    resp
}

/// Value of one sample line (`name{labels}` exactly as rendered).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Polls `/metrics` until `series` reaches at least `min`.
async fn wait_metric(addr: SocketAddr, series: &str, min: f64) -> f64 {
    let deadline = Instant::now() + SOON;
    loop {
        let v = sample(&metrics(addr).await, series);
        if v >= min {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed at {v}, wanted >= {min}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the socket ends; returns the close code if there was one.
async fn closed_with(ws: &mut Client) -> Option<u16> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_before_any_store_work() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev-a");
    let path = "/ws/device/dev-a";
    // Missing: 401 with WWW-Authenticate.
    let r = raw(hub.addr, upgrade_request(path, "").as_bytes()).await;
    assert!(status_line(&r).starts_with("HTTP/1.1 401"), "{r}");
    assert!(
        r.to_ascii_lowercase().contains("www-authenticate: bearer"),
        "{r}"
    );
    // Malformed: not a bearer credential (401), not our token format (403),
    // a non-visible-ASCII value (400).
    let r = raw(
        hub.addr,
        upgrade_request(path, "Authorization: Basic Zm9vOmJhcg==\r\n").as_bytes(),
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 401"), "{r}");
    let r = raw(
        hub.addr,
        upgrade_request(path, "Authorization: Bearer emsd_not-a-token\r\n").as_bytes(),
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 403"), "{r}");
    let mut bin = upgrade_request(path, "").into_bytes();
    bin.truncate(bin.len() - 2);
    bin.extend_from_slice(b"Authorization: Bearer \xff\xfe\r\n\r\n");
    let r = raw(hub.addr, &bin).await;
    assert!(status_line(&r).starts_with("HTTP/1.1 400"), "{r}");
    // 10 KB long: 400 without hashing.
    let long = format!("Authorization: Bearer emsd_{}\r\n", "A".repeat(10 * 1024));
    let r = raw(hub.addr, upgrade_request(path, &long).as_bytes()).await;
    assert!(status_line(&r).starts_with("HTTP/1.1 400"), "{r}");
    // Two Authorization headers (even both valid): 400.
    let two = format!("Authorization: Bearer {token}\r\nAuthorization: Bearer {token}\r\n");
    let r = raw(hub.addr, upgrade_request(path, &two).as_bytes()).await;
    assert!(status_line(&r).starts_with("HTTP/1.1 400"), "{r}");
    // Token in the query: 400, with or without a header. The query carries a
    // marker, never a real credential (a valid token there would be refused
    // the same way: the query rule comes before the token check).
    let q = format!("{path}?token=QUERYMARKER");
    let r = raw(hub.addr, upgrade_request(&q, "").as_bytes()).await;
    assert!(status_line(&r).starts_with("HTTP/1.1 400"), "{r}");
    let r = raw(
        hub.addr,
        upgrade_request(&q, &format!("Authorization: Bearer {token}\r\n")).as_bytes(),
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 400"), "{r}");
    // Every outcome was counted; nothing secret is in /metrics.
    let m = metrics(hub.addr).await;
    assert!(sample(&m, "ems_handshakes_total{outcome=\"bad_request\"}") >= 5.0);
    assert!(sample(&m, "ems_handshakes_total{outcome=\"unauthorized\"}") >= 2.0);
    assert!(sample(&m, "ems_handshakes_total{outcome=\"forbidden\"}") >= 1.0);
    assert!(
        !m.contains(&token) && !m.contains("dev-a") && !m.contains("emsd_"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_devices_token_is_forbidden() {
    let hub = TestHub::start().await;
    hub.add_device("dev-a");
    let b = hub.add_device("dev-b");
    assert_eq!(
        refused_status(hub.addr, "/ws/device/dev-a", Some(&b)).await,
        403
    );
    assert_eq!(
        refused_status(hub.addr, "/ws/dashboard/dev-a", Some(&b)).await,
        403
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_rotation_close_live_sockets_with_4001() {
    let hub = TestHub::start().await;
    let a = hub.add_device("dev-a");
    let b = hub.add_device("dev-b");
    let c = hub.add_device("dev-c");

    // Revoked through another store handle (as another process would).
    let mut ws = hub.device("dev-a", &a).await;
    send_text(&mut ws, reading(1, 0)).await;
    wait_ack(&mut ws, 1, 0).await;
    let t = Instant::now();
    hub.admin().revoke_device("dev-a").unwrap();
    assert_eq!(closed_with(&mut ws).await, Some(4001));
    println!("revoke -> close 4001 after {:?}", t.elapsed());

    // Rotated: the old token's socket closes, the new token connects.
    let mut ws = hub.device("dev-b", &b).await;
    let t = Instant::now();
    let b2 = hub.admin().rotate_device("dev-b").unwrap();
    assert_eq!(closed_with(&mut ws).await, Some(4001));
    println!("rotate -> close 4001 after {:?}", t.elapsed());
    let mut ws = hub.device("dev-b", &b2).await;
    send_text(&mut ws, reading(2, 0)).await;
    wait_ack(&mut ws, 2, 0).await;

    // The real admin CLI in another process.
    let mut ws = hub.device("dev-c", &c).await;
    let t = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ems-hub"))
        .args(["device", "revoke", "dev-c"])
        .env("EMS_DATABASE_URL", &hub.db_url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(closed_with(&mut ws).await, Some(4001));
    println!(
        "CLI revoke (other process) -> close 4001 after {:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < SOON);
    assert_eq!(
        sample(&metrics(hub.addr).await, "ems_revoked_closes_total"),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_deeply_nested_json() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev-a");
    let mut ws = hub.device("dev-a", &token).await;
    // 10 000 levels of nesting in under 16 KiB: refused as invalid JSON
    // (serde_json's recursion limit), the socket stays open.
    let nested = format!("{}{}", "[".repeat(8000), "]".repeat(8000));
    send_text(&mut ws, nested).await;
    let nested_obj = format!("{}1{}", "{\"a\":".repeat(2000), "}".repeat(2000));
    send_text(&mut ws, nested_obj).await;
    send_text(&mut ws, reading(1, 0)).await;
    wait_ack(&mut ws, 1, 0).await;
    let m = metrics(hub.addr).await;
    assert!(
        sample(&m, "ems_readings_rejected_total{reason=\"invalid_json\"}") >= 1.0,
        "{m}"
    );
    // Oversized: 1009.
    send_text(
        &mut ws,
        format!("{{\"pad\":\"{}\"}}", "x".repeat(17 * 1024)),
    )
    .await;
    assert_eq!(closed_with(&mut ws).await, Some(1009));
}

/// Writes one masked client frame with the given opcode and payload.
async fn raw_frame(ws: &mut Client, opcode: u8, payload: &[u8]) {
    let mut f = vec![0x80 | opcode];
    assert!(payload.len() < 126);
    f.push(0x80 | payload.len() as u8);
    let mask = [1u8, 2, 3, 4];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let tcp = match ws.get_mut() {
        tokio_tungstenite::MaybeTlsStream::Plain(s) => s,
        _ => unreachable!(),
    };
    tcp.write_all(&f).await.unwrap();
    tcp.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_text_frame_ends_only_that_connection() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev-a");
    let mut ws = hub.device("dev-a", &token).await;
    raw_frame(&mut ws, 0x1, b"{\"type\":\"reading\xff\xfe\"}").await;
    // RFC 6455 §8.1: invalid UTF-8 in a text frame fails the connection;
    // the hub says so with 1007.
    assert_eq!(closed_with(&mut ws).await, Some(1007));
    // The hub is fine: the device reconnects and streams.
    let mut ws = hub.device("dev-a", &token).await;
    send_text(&mut ws, reading(1, 0)).await;
    wait_ack(&mut ws, 1, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frames_are_discarded_and_counted() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev-a");
    let mut ws = hub.device("dev-a", &token).await;
    for _ in 0..3 {
        ws.send(Message::Binary(reading(1, 0).into_bytes().into()))
            .await
            .unwrap();
    }
    send_text(&mut ws, reading(1, 1)).await;
    wait_ack(&mut ws, 1, 1).await;
    assert_eq!(hub.stored("dev-a"), vec![(1, 1)]);
    let m = metrics(hub.addr).await;
    assert_eq!(
        sample(&m, "ems_readings_rejected_total{reason=\"binary_frame\"}"),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_frame_flood_is_cheap_and_the_socket_survives() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev-a");
    let mut ws = hub.device("dev-a", &token).await;
    let n = 5000;
    let t = Instant::now();
    for i in 0..n {
        // Without epoch/seq: no `rejected` answer, one counter, at most one
        // warning per 10 s (RateLimitedWarn).
        ws.feed(Message::Text(format!("{{\"junk\":{i}").into()))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();
    send_text(&mut ws, reading(1, 0)).await;
    wait_ack(&mut ws, 1, 0).await;
    println!("{n} invalid frames + 1 valid handled in {:?}", t.elapsed());
    let m = metrics(hub.addr).await;
    // serde reports the unknown key before the truncation.
    assert_eq!(
        sample(&m, "ems_readings_rejected_total{reason=\"unknown_field\"}"),
        n as f64
    );
    assert_eq!(hub.stored("dev-a"), vec![(1, 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_rejects_excess_and_persistent_abuse_closes_with_1008() {
    // One token back per 100 s: however slowly a loaded machine delivers
    // the 20 frames below, exactly the burst passes.
    let hub = TestHub::start_with(|c| {
        c.rate_limit.rate = 0.01;
        c.rate_limit.burst = 10.0;
        c.rate_limit.abuse_after = Duration::from_secs(2);
    })
    .await;
    let token = hub.add_device("dev-a");
    let mut ws = hub.device("dev-a", &token).await;
    for seq in 0..20 {
        send_text(&mut ws, reading(1, seq)).await;
    }
    // The burst passes; the excess is rejected with rate_limited.
    let mut limited = 0;
    let mut acked_to = None;
    while acked_to.map_or(true, |s: u64| s < 9) || limited < 10 {
        let v = next_json(&mut ws).await;
        match v["type"].as_str() {
            Some("rejected") => {
                assert!(
                    v["reason"].as_str().unwrap().starts_with("rate_limited"),
                    "{v}"
                );
                limited += 1;
            }
            Some("ack") => acked_to = v["seq"].as_u64(),
            _ => panic!("{v}"),
        }
    }
    assert_eq!(hub.stored("dev-a").len(), 10);
    // Keep hammering: after `abuse_after` of continuous excess, 1008.
    let t = Instant::now();
    let code = loop {
        if ws
            .send(Message::Text(reading(1, 100).into()))
            .await
            .is_err()
        {
            break None;
        }
        match tokio::time::timeout(Duration::from_millis(20), ws.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => break f.map(|f| u16::from(f.code)),
            Ok(None) | Ok(Some(Err(_))) => break None,
            _ => {}
        }
        assert!(t.elapsed() < SOON, "never closed");
    };
    assert_eq!(code, Some(1008));
    println!("abuse closed with 1008 after {:?}", t.elapsed());
    assert_eq!(
        sample(&metrics(hub.addr).await, "ems_abuse_closes_total"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_is_dropped_without_slowing_the_device() {
    let hub = TestHub::start_with(|c| {
        c.subscriber_buffer = 8;
        c.write_timeout = Duration::from_millis(500);
    })
    .await;
    let token = hub.add_device("dev-a");
    let viewer = hub.add_viewer("v", &["dev-a"]);
    // A subscriber with a tiny receive buffer that never reads.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(hub.addr).await.unwrap();
    let mut req = format!("ws://{}/ws/dashboard/dev-a", hub.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {viewer}")).unwrap(),
    );
    let (_slow, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    let mut ws = hub.device("dev-a", &token).await;
    let t = Instant::now();
    for seq in 0..3000u64 {
        ws.feed(Message::Text(reading(1, seq).into()))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();
    wait_ack(&mut ws, 1, 2999).await;
    println!(
        "3000 readings acked in {:?} with a stuck subscriber",
        t.elapsed()
    );
    wait_metric(hub.addr, "ems_subscribers_dropped_slow_total", 1.0).await;
    assert_eq!(hub.stored("dev-a").len(), 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_device_is_declared_dead_and_counted() {
    let hub = TestHub::start_with(|c| {
        c.ping_interval = Duration::from_millis(200);
        c.max_missed_pongs = 2;
    })
    .await;
    let token = hub.add_device("dev-a");
    // Connected, then silent: never polled, so it never answers pings
    // (what a peer behind a dead NAT looks like from the hub).
    let _silent = hub.device("dev-a", &token).await;
    wait_metric(hub.addr, "ems_heartbeat_deaths_total{role=\"device\"}", 1.0).await;
    let m = metrics(hub.addr).await;
    assert_eq!(sample(&m, "ems_connections{role=\"device\"}"), 0.0);
    // Its successor is not a takeover.
    let mut ws = hub.device("dev-a", &token).await;
    send_text(&mut ws, reading(1, 0)).await;
    wait_ack(&mut ws, 1, 0).await;
    assert_eq!(sample(&metrics(hub.addr).await, "ems_takeovers_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_race_becomes_a_conflict_with_cooldown() {
    // Long enough that the race and the check below fit into it on a
    // loaded machine.
    const COOLDOWN: Duration = Duration::from_secs(5);
    let hub = TestHub::start_with(|c| {
        c.takeover.max_replacements = 3;
        c.takeover.window = Duration::from_secs(60);
        c.takeover.cooldown = COOLDOWN;
    })
    .await;
    let token = hub.add_device("dev-a");
    // Two "devices" with one identity, connecting 1 ms apart, repeatedly.
    let raced_at = Instant::now();
    let mut socks = Vec::new();
    let mut codes = Vec::new();
    for _ in 0..4 {
        let a = hub.device("dev-a", &token).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        let b = hub.device("dev-a", &token).await;
        socks.push(a);
        socks.push(b);
    }
    for mut s in socks {
        codes.push(closed_with(&mut s).await);
    }
    println!("close codes of 8 racing connections: {codes:?}");
    assert!(
        codes.iter().filter(|c| **c == Some(4000)).count() >= 3,
        "{codes:?}"
    );
    assert!(codes.contains(&Some(4002)), "{codes:?}");
    // During the cool-down: accepted at HTTP level, then closed with 4002.
    let mut again = hub.device("dev-a", &token).await;
    assert_eq!(closed_with(&mut again).await, Some(4002));
    let m = metrics(hub.addr).await;
    assert!(sample(&m, "ems_takeover_conflicts_total") >= 2.0, "{m}");
    // After the cool-down the id works again. Instead of sleeping out the
    // cool-down, retry until served: an attempt is refused (4002, or a
    // reset when the hub's close crossed our reading) until the first one
    // served is acked, no earlier than the cool-down after the race began.
    let deadline = Instant::now() + SOON;
    let mut refused = 0;
    let mut ws = loop {
        let mut ws = hub.device("dev-a", &token).await;
        let served = match ws.send(Message::Text(reading(1, 0).into())).await {
            Err(_) => false,
            Ok(()) => loop {
                match tokio::time::timeout(SOON, ws.next())
                    .await
                    .expect("no answer")
                {
                    Some(Ok(Message::Text(t))) => {
                        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                        assert_eq!(v["type"], "ack", "{v}");
                        assert_eq!(v["seq"], 0, "{v}");
                        break true;
                    }
                    Some(Ok(Message::Close(f))) => {
                        assert_eq!(f.map(|f| u16::from(f.code)), Some(4002));
                        break false;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => break false,
                }
            },
        };
        if served {
            break ws;
        }
        refused += 1;
        assert!(Instant::now() < deadline, "still refused after {SOON:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        raced_at.elapsed() >= COOLDOWN,
        "served {:?} after the race, within the {COOLDOWN:?} cool-down",
        raced_at.elapsed()
    );
    println!("after the cool-down: served after {refused} more refusals");
    send_text(&mut ws, reading(1, 1)).await;
    wait_ack(&mut ws, 1, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_leaves_one_connection_per_device() {
    let hub = TestHub::start_with(|c| c.takeover.max_replacements = 1000).await;
    let devices: Vec<(String, String)> = (0..20)
        .map(|i| {
            let id = format!("storm-{i}");
            let t = hub.add_device(&id);
            (id, t)
        })
        .collect();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for round in 0..5 {
        for (id, token) in &devices {
            let (addr, id, token) = (hub.addr, id.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                let mut ws = connect(addr, &format!("/ws/device/{id}"), Some(&token))
                    .await
                    .ok()?;
                send_text(&mut ws, reading(round, 0)).await;
                Some(ws)
            }));
        }
    }
    let mut live = Vec::new();
    for t in tasks {
        if let Some(ws) = t.await.unwrap() {
            live.push(ws);
        }
    }
    println!(
        "{} of 100 storm connections upgraded in {:?}",
        live.len(),
        t.elapsed()
    );
    assert_eq!(live.len(), 100);
    // Eventually exactly one connection per device is registered.
    let deadline = Instant::now() + SOON;
    loop {
        let m = metrics(hub.addr).await;
        if sample(&m, "ems_connections{role=\"device\"}") == 20.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let h = raw(hub.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(status_line(&h).starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_oversized_headers_are_cut_off() {
    let hub = TestHub::start_with(|c| c.handshake_timeout = Duration::from_millis(500)).await;
    // Slowloris: a header line every 200 ms never completes the head.
    let mut s = TcpStream::connect(hub.addr).await.unwrap();
    s.write_all(b"GET /ws/device/dev-a HTTP/1.1\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    let mut cut = false;
    for i in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if s.write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
            .await
            .is_err()
        {
            cut = true;
            break;
        }
        let mut buf = [0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            // A 408 or EOF: either way the hub hung up.
            let _ = n;
            cut = true;
            break;
        }
    }
    assert!(cut, "slow header stream was never cut off");
    println!(
        "slowloris cut off after {:?} (handshake_timeout 500 ms)",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    // Oversized head (> 16 KiB): refused with 431 or the connection closed.
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let mut s = TcpStream::connect(hub.addr).await.unwrap();
    let _ = s.write_all(big.as_bytes()).await;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(SOON, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || head.starts_with("HTTP/1.1 431"), "{head}");
    // Still serving.
    let h = raw(hub.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(status_line(&h).starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_readyz_and_edge_status() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev-a");
    let r = raw(hub.addr, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(status_line(&r).starts_with("HTTP/1.1 200"), "{r}");
    let mut ws = hub.device("dev-a", &token).await;
    let oldest = now_ms() - 3 * 3_600_000;
    send_text(
        &mut ws,
        format!(r#"{{"type":"status","outbox_depth":10800,"oldest_ts_ms":{oldest},"dropped":0}}"#),
    )
    .await;
    send_text(&mut ws, reading(1, 0)).await;
    wait_ack(&mut ws, 1, 0).await;
    let m = wait_metric(hub.addr, "ems_edge_devices_reporting", 1.0).await;
    assert_eq!(m, 1.0);
    // The hub counts an ack after writing it, so the device can see the
    // ack before the counter moves: wait for the counters, then read.
    wait_metric(hub.addr, "ems_acks_sent_total", 1.0).await;
    wait_metric(hub.addr, "ems_store_batch_rows_count", 1.0).await;
    let text = metrics(hub.addr).await;
    assert_eq!(sample(&text, "ems_edge_outbox_readings_max"), 10800.0);
    assert_eq!(sample(&text, "ems_edge_devices_behind"), 1.0);
    let behind = sample(&text, "ems_edge_behind_seconds_max");
    assert!((10_790.0..10_900.0).contains(&behind), "{behind}");
    assert_eq!(sample(&text, "ems_readings_valid_total"), 1.0);
    assert_eq!(sample(&text, "ems_status_frames_total"), 1.0);
    assert!(sample(&text, "ems_acks_sent_total") >= 1.0);
    assert!(sample(&text, "ems_store_batch_rows_count") >= 1.0);
    assert_eq!(sample(&text, "ems_connections{role=\"device\"}"), 1.0);
    assert_eq!(sample(&text, "ems_store_up"), 1.0);
    assert!(!text.contains(&token) && !text.contains("dev-a") && !text.contains("sqlite:"));
    // A status frame is never acked nor stored.
    assert_eq!(hub.stored("dev-a"), vec![(1, 0)]);
    // /metrics with a query string is refused like every other route.
    let r = raw(
        hub.addr,
        b"GET /metrics?token=x HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 400"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_origin_dashboard_is_forbidden() {
    let hub = TestHub::start().await;
    hub.add_device("dev-a");
    let viewer = hub.add_viewer("v", &["dev-a"]);
    let auth = format!("Authorization: Bearer {viewer}\r\n");
    // A page on another site holding a valid viewer token: 403.
    let evil = format!("{auth}Origin: https://evil.example\r\n");
    let r = raw(
        hub.addr,
        upgrade_request("/ws/dashboard/dev-a", &evil).as_bytes(),
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 403"), "{r}");
    // `null` (sandboxed iframe, file://) and two Origin headers: 403.
    let null = format!("{auth}Origin: null\r\n");
    let r = raw(
        hub.addr,
        upgrade_request("/ws/dashboard/dev-a", &null).as_bytes(),
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 403"), "{r}");
    let two = format!("{auth}Origin: http://x\r\nOrigin: http://x\r\n");
    let r = raw(
        hub.addr,
        upgrade_request("/ws/dashboard/dev-a", &two).as_bytes(),
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 403"), "{r}");
    // The hub's own origin (Host: x) and no Origin at all (not a browser): 101.
    let same = format!("{auth}Origin: http://x\r\n");
    let r = raw(
        hub.addr,
        upgrade_request("/ws/dashboard/dev-a", &same).as_bytes(),
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 101"), "{r}");
    let r = raw(
        hub.addr,
        upgrade_request("/ws/dashboard/dev-a", &auth).as_bytes(),
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 101"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_the_store_blocks_and_recovers_losing_nothing() {
    let hub = TestHub::start_with(|c| {
        c.queue_capacity = 4;
        c.batch_max_rows = 1;
    })
    .await;
    let token = hub.add_device("dev-a");
    let ready = |addr| async move {
        let r = raw(addr, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        status_line(&r).to_string()
    };
    assert!(ready(hub.addr).await.starts_with("HTTP/1.1 200"));
    // Another process holds the SQLite write lock: commits stall.
    let blocker = rusqlite::Connection::open(&hub.db_path).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let mut ws = hub.device("dev-a", &token).await;
    for seq in 0..10 {
        send_text(&mut ws, reading(1, seq)).await;
    }
    let deadline = Instant::now() + SOON;
    let status = loop {
        let s = ready(hub.addr).await;
        if s.starts_with("HTTP/1.1 503") || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.starts_with("HTTP/1.1 503"), "{status}");
    let m = metrics(hub.addr).await;
    assert_eq!(sample(&m, "ems_store_queue_depth"), 4.0, "{m}");
    // Lock released: the backlog drains, everything is stored and acked.
    blocker.execute_batch("COMMIT").unwrap();
    drop(blocker);
    wait_ack(&mut ws, 1, 9).await;
    assert_eq!(hub.stored("dev-a").len(), 10);
    let deadline = Instant::now() + SOON;
    while !ready(hub.addr).await.starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
