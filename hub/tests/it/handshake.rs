//! Every handshake outcome of the contract.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_handshake_outcomes() {
    let hub = TestHub::start().await;
    let a = hub.add_device("dev-a");
    let b = hub.add_device("dev-b");
    let viewer = hub.add_viewer("v", &["dev-a"]);

    // Right token: 101.
    hub.device("dev-a", &a).await;
    // Missing header: 401 with WWW-Authenticate: Bearer.
    match connect(hub.addr, "/ws/device/dev-a", None).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401);
            assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        }
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
    // Wrong, other-device, unknown-format and viewer tokens: 403, same body.
    assert_eq!(
        refused_status(hub.addr, "/ws/device/dev-a", Some(&b)).await,
        403
    );
    assert_eq!(
        refused_status(hub.addr, "/ws/device/dev-a", Some("nonsense")).await,
        403
    );
    assert_eq!(
        refused_status(hub.addr, "/ws/device/dev-a", Some(&viewer)).await,
        403
    );
    let mut forged = a.clone();
    forged.pop();
    forged.push(if a.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(
        refused_status(hub.addr, "/ws/device/dev-a", Some(&forged)).await,
        403
    );
    // Unknown device with a syntactically fine token: 403.
    assert_eq!(
        refused_status(hub.addr, "/ws/device/nobody", Some(&a)).await,
        403
    );
    // Query strings: 400, even with a valid token.
    assert_eq!(
        refused_status(hub.addr, "/ws/device/dev-a?x=1", Some(&a)).await,
        400
    );
    // Bad device ids: 400.
    let long = "x".repeat(65);
    for bad in [
        "/ws/device/a%20b",
        "/ws/device/a:b",
        &format!("/ws/device/{long}"),
    ] {
        assert_eq!(refused_status(hub.addr, bad, Some(&a)).await, 400, "{bad}");
    }
    // Revoked (by another store handle, as the admin CLI would): 403 once
    // the hub's revocation poll has seen the change (the tokens are held in
    // memory; at most one poll interval).
    hub.admin().revoke_device("dev-b").unwrap();
    assert_eq!(
        refused_after_poll(hub.addr, "/ws/device/dev-b", &b).await,
        403
    );
    // Rotated: old token 403 after the poll, new token 101 at once.
    let a2 = hub.admin().rotate_device("dev-a").unwrap();
    hub.device("dev-a", &a2).await;
    assert_eq!(
        refused_after_poll(hub.addr, "/ws/device/dev-a", &a).await,
        403
    );
}

/// The status of a handshake with `token` once the hub refuses it: a
/// change made by another process reaches the tokens in memory with the
/// revocation poll (1 s by default).
async fn refused_after_poll(addr: std::net::SocketAddr, path: &str, token: &str) -> u16 {
    let deadline = std::time::Instant::now() + SOON;
    loop {
        match connect(addr, path, Some(token)).await {
            Ok(_) => assert!(
                std::time::Instant::now() < deadline,
                "{path}: still accepted after {SOON:?}"
            ),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                return resp.status().as_u16()
            }
            Err(e) => panic!("{path}: unexpected error {e}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_handshake_outcomes() {
    let hub = TestHub::start().await;
    let dev = hub.add_device("dev-a");
    hub.add_device("dev-b");
    let viewer = hub.add_viewer("v", &["dev-a"]);
    let all = hub
        .admin()
        .add_viewer("all", ems_hub::store::ViewerScope::AllDevices)
        .unwrap();
    hub.dashboard("dev-a", &viewer).await;
    hub.dashboard("dev-b", &all).await;
    assert_eq!(
        refused_status(hub.addr, "/ws/dashboard/dev-b", Some(&viewer)).await,
        403
    );
    assert_eq!(
        refused_status(hub.addr, "/ws/dashboard/dev-a", Some(&dev)).await,
        403
    );
    assert_eq!(
        refused_status(hub.addr, "/ws/dashboard/dev-a", None).await,
        401
    );
    // An all-devices viewer cannot open topics of devices that do not exist.
    assert_eq!(
        refused_status(hub.addr, "/ws/dashboard/made-up", Some(&all)).await,
        403
    );
}

async fn raw_status(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(SOON, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_requests() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev-a");
    let health = raw_status(hub.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let plain = format!(
        "GET /ws/device/dev-a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    let status = raw_status(hub.addr, &plain).await;
    assert!(status.starts_with("HTTP/1.1 426"), "{status}");
    let nf = raw_status(hub.addr, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
    let two = format!(
        "GET /ws/device/dev-a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {token}\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    let status = raw_status(hub.addr, &two).await;
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    let status = raw_status(hub.addr, &big).await;
    assert!(status.starts_with("HTTP/1.1 431"), "{status}");
}
