//! The hub says no: a wrong token, a takeover by a clone (close 4000), a
//! reading rejected for good. The edge keeps running and loses nothing
//! else.

use std::net::TcpStream;
use std::time::Duration;

use crate::harness::*;

#[test]
fn forbidden_token_keeps_retrying_without_crashing() {
    let w = World::new();
    let _hub = w.hub();
    let config = w.config("edge.toml", "", "");
    let wrong = format!("{}x", &w.token[..w.token.len() - 1]);
    let mut edge = Edge::spawn(&config, &wrong, w.dir.path());
    wait_for("three refused attempts", SOON, || {
        edge.count_in_log("hub refused the device token (403)") >= 3
    });
    assert!(edge.alive(), "the edge must keep retrying");
    assert_eq!(w.count(), 0);
    let (status, _) = edge.terminate();
    assert!(status.success());
    edge.assert_token_not_logged();
}

#[test]
fn takeover_close_4000_is_reported_and_retried() {
    let w = World::new();
    let _hub = w.hub();
    // Slow backoff at the cap so the test client keeps the slot a moment.
    let mut edge = w.edge(&w.config("edge.toml", "", ""));
    wait_for("edge connected", SOON, || w.count() >= 5);
    // A "cloned SD card": same device id and token.
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://127.0.0.1:{}/ws/device/{DEVICE}",
        w.port
    ))
    .unwrap();
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", w.token).parse().unwrap(),
    );
    let tcp = TcpStream::connect(("127.0.0.1", w.port)).unwrap();
    let (mut clone, _) = tungstenite::client(req, tcp).unwrap();
    wait_for("the 4000 log line", SOON, || {
        edge.log()
            .contains("replaced by another connection with the same device id (cloned SD card?)")
    });
    assert!(edge.alive());
    // The edge comes back (and in turn replaces the clone).
    let n = w.count();
    wait_for("streaming again", SOON, || w.count() > n + 10);
    let _ = clone.close(None);
    edge.terminate();
    edge.assert_token_not_logged();
}

#[test]
fn a_rejected_reading_leaves_the_outbox_without_blocking_it() {
    use ems_edge::outbox::{sync_files, Outbox};
    const OLD_EPOCH: u64 = 44;
    let w = World::new();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut ob = Outbox::open(&w.spool_dir(), 256 << 20, 512).unwrap();
    for (seq, ts) in [
        (0, now_ms - 2000),
        (1, now_ms + 3_600_000),
        (2, now_ms - 1000),
    ] {
        let r = ems_shared::Reading {
            epoch: OLD_EPOCH,
            seq,
            ts_ms: ts,
            meter: "main".into(),
            power_w: Some(100.0),
            ..Default::default()
        };
        ob.append(&r);
    }
    sync_files(ob.flush().unwrap()).unwrap();
    drop(ob);
    let _hub = w.hub();
    let config = w.config("edge.toml", "", "");
    let mut edge = w.edge(&config);
    wait_for("the valid readings stored", SOON, || {
        w.seqs_of(OLD_EPOCH) == [0, 2]
    });
    wait_for("the rejection logged", SOON, || {
        edge.log()
            .contains("hub rejected reading epoch 44 seq 1: future_timestamp")
    });
    edge.terminate();
    // The next start does not send it again.
    let mut again = w.edge(&config);
    wait_for("connected", SOON, || again.log().contains("CONNECTED to"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!again.log().contains("hub rejected"), "{}", again.log());
    again.terminate();
    edge.assert_token_not_logged();
    again.assert_token_not_logged();
}
