//! The gatekeeper, fan-out and acks, seen from real clients.

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_class_of_invalid_frame_is_discarded_and_the_socket_stays_open() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev");
    let mut ws = hub.device("dev", &token).await;
    let now = now_ms();
    let future = now + 6 * 60 * 1000;
    let invalid: Vec<(String, Option<u64>)> = vec![
        ("not json".into(), None),
        (r#"{"type":"reading","epoch":1,"seq":1,"ts_ms":0,"meter":"main","power_w":1,"extra":1}"#.into(), Some(1)),
        (r#"{"type":"reading","epoch":1,"ts_ms":0,"meter":"main","power_w":1}"#.into(), None),
        (r#"{"type":"reading","epoch":1,"seq":3,"ts_ms":0,"meter":"main","voltage_v":"230"}"#.into(), Some(3)),
        (r#"{"type":"reading","epoch":1,"seq":4,"ts_ms":0,"meter":"main","voltage_v":2001}"#.into(), Some(4)),
        (format!(r#"{{"type":"reading","epoch":1,"seq":5,"ts_ms":{future},"meter":"main","power_w":1}}"#), Some(5)),
        (r#"{"type":"reading","epoch":1,"seq":6,"ts_ms":0,"meter":"main"}"#.into(), Some(6)),
        (r#"{"type":"reading","epoch":1.5,"seq":7,"ts_ms":0,"meter":"main","power_w":1}"#.into(), None),
    ];
    for (frame, _) in &invalid {
        send_text(&mut ws, frame.clone()).await;
    }
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    send_text(&mut ws, reading(1, 8)).await;
    let others = wait_ack(&mut ws, 1, 8).await;
    let rejected: Vec<u64> = others
        .iter()
        .map(|v| {
            assert_eq!(v["type"], "rejected", "{v}");
            assert!(v["reason"].as_str().unwrap().contains(':'), "{v}");
            v["seq"].as_u64().unwrap()
        })
        .collect();
    let expected: Vec<u64> = invalid.iter().filter_map(|(_, s)| *s).collect();
    assert_eq!(rejected, expected);
    assert_eq!(hub.stored("dev"), vec![(1, 8)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_fan_out_to_every_subscriber() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev");
    let viewer = hub.add_viewer("v", &["dev"]);
    let mut s1 = hub.dashboard("dev", &viewer).await;
    let mut s2 = hub.dashboard("dev", &viewer).await;
    let mut ws = hub.device("dev", &token).await;
    let sent = reading(3, 0);
    send_text(&mut ws, sent.clone()).await;
    let sent: serde_json::Value = serde_json::from_str(&sent).unwrap();
    for s in [&mut s1, &mut s2] {
        // A subscriber gets the device's presence (status) first.
        let got = next_reading(s).await;
        assert_eq!(got["device_id"], "dev");
        assert!(got["rx_ms"].as_i64().unwrap() > 0);
        for (k, v) in sent.as_object().unwrap() {
            assert_eq!(&got[k], v, "field {k}");
        }
        let parsed: ems_shared::DashboardReading = serde_json::from_value(got).unwrap();
        assert_eq!(parsed.seq, 0);
    }
    wait_ack(&mut ws, 3, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_are_stored_when_nobody_watches() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev");
    let mut ws = hub.device("dev", &token).await;
    for seq in 0..50 {
        send_text(&mut ws, reading(9, seq)).await;
    }
    wait_ack(&mut ws, 9, 49).await;
    assert_eq!(hub.stored("dev").len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_come_only_after_commit() {
    // A long linger widens the window in which an early ack would be caught.
    let hub = TestHub::start_with(|c| c.batch_linger = std::time::Duration::from_millis(300)).await;
    let token = hub.add_device("dev");
    let mut ws = hub.device("dev", &token).await;
    for seq in 0..5 {
        send_text(&mut ws, reading(1, seq)).await;
        wait_ack(&mut ws, 1, seq).await;
        // The acked reading is in the database at the moment the ack arrives.
        assert!(
            hub.stored("dev").contains(&(1, seq)),
            "ack for {seq} before commit"
        );
    }
}

/// The ack timing of the protocol: with a linger far longer than the test,
/// a device's single reading waits for it — unless the device pings while
/// it does (what `ems-edge` does when it stops) — and a second reading
/// makes both due at once, answered by one cumulative ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_or_a_second_reading_asks_a_lingering_hub_for_the_ack() {
    let hub = TestHub::start_with(|c| {
        c.batch_run = 2;
        c.batch_linger = std::time::Duration::from_secs(600);
    })
    .await;
    let token = hub.add_device("dev");
    let mut ws = hub.device("dev", &token).await;
    send_text(&mut ws, reading(1, 0)).await;
    // Held for the linger: no answer yet.
    let early =
        tokio::time::timeout(std::time::Duration::from_millis(300), next_json(&mut ws)).await;
    assert!(early.is_err(), "answered before the linger: {early:?}");
    assert!(hub.stored("dev").is_empty());
    ws.send(Message::Ping(Vec::new().into())).await.unwrap();
    let ack = next_json(&mut ws).await;
    assert_eq!(
        (ack["type"].as_str(), ack["seq"].as_u64()),
        (Some("ack"), Some(0)),
        "{ack}"
    );
    assert_eq!(hub.stored("dev"), [(1, 0)]);
    // Two readings: one commit, one ack, no ping needed.
    send_text(&mut ws, reading(1, 1)).await;
    send_text(&mut ws, reading(1, 2)).await;
    let ack = next_json(&mut ws).await;
    assert_eq!(
        (ack["type"].as_str(), ack["seq"].as_u64()),
        (Some("ack"), Some(2)),
        "{ack}"
    );
    assert_eq!(hub.stored("dev").len(), 3);
}

/// A device that announces its ack window has its readings held for half
/// of it and answered together, by one cumulative ack; a device that
/// announces none is answered at the commit cadence; a malformed window
/// is refused before the upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announced_ack_window_lets_the_hub_answer_readings_together() {
    use std::time::Duration;
    let hub = TestHub::start_with(|c| c.batch_linger = Duration::from_secs(600)).await;
    let token = hub.add_device("dev");
    let path = "/ws/device/dev";
    let bearer = format!("Bearer {token}");
    let (mut ws, _, _) = connect_with(
        hub.addr,
        path,
        &[
            ("authorization", bearer.clone()),
            (ems_shared::ACK_WINDOW_HEADER, "2000".into()),
        ],
    )
    .await
    .unwrap();
    send_text(&mut ws, reading(1, 0)).await;
    send_text(&mut ws, reading(1, 1)).await;
    // Held for half the window (1 s): nothing within 0.5 s, where the
    // commit cadence alone answers within about 0.1 s.
    let early = tokio::time::timeout(Duration::from_millis(500), next_json(&mut ws)).await;
    assert!(early.is_err(), "answered before the hold: {early:?}");
    let ack = next_json(&mut ws).await;
    assert_eq!(
        (ack["type"].as_str(), ack["seq"].as_u64()),
        (Some("ack"), Some(1)),
        "{ack}"
    );
    assert_eq!(hub.stored("dev"), [(1, 0), (1, 1)]);
    drop(ws);

    // No window: answered at once, whatever the linger.
    let mut ws = hub.device("dev", &token).await;
    send_text(&mut ws, reading(1, 2)).await;
    wait_ack(&mut ws, 1, 2).await;

    for bad in ["0", "600001", "2s", ""] {
        let refused = connect_with(
            hub.addr,
            path,
            &[
                ("authorization", bearer.clone()),
                (ems_shared::ACK_WINDOW_HEADER, bad.into()),
            ],
        )
        .await;
        match refused {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 400, "window {bad:?}")
            }
            other => panic!("window {bad:?}: {:?}", other.map(|_| ())),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_reading_is_stored_once() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev");
    let mut ws = hub.device("dev", &token).await;
    send_text(&mut ws, reading(5, 1)).await;
    wait_ack(&mut ws, 5, 1).await;
    send_text(&mut ws, reading(5, 1)).await;
    wait_ack(&mut ws, 5, 1).await;
    drop(ws);
    let mut ws = hub.device("dev", &token).await;
    send_text(&mut ws, reading(5, 1)).await;
    send_text(&mut ws, reading(5, 2)).await;
    wait_ack(&mut ws, 5, 2).await;
    assert_eq!(hub.stored("dev"), vec![(5, 1), (5, 2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_closes_with_1009() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev");
    let mut ws = hub.device("dev", &token).await;
    let big = format!(r#"{{"type":"reading","pad":"{}"}}"#, "x".repeat(17 * 1024));
    send_text(&mut ws, big).await;
    expect_close(&mut ws, 1009).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_never_holds_a_plaintext_token() {
    let mut hub = TestHub::start().await;
    let token = hub.add_device("dev");
    let viewer = hub.add_viewer("v", &["dev"]);
    let rotated = hub.admin().rotate_device("dev").unwrap();
    let mut ws = hub.device("dev", &rotated).await;
    send_text(&mut ws, reading(1, 0)).await;
    wait_ack(&mut ws, 1, 0).await;
    hub.stop().await.unwrap();
    for entry in std::fs::read_dir(hub.dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        for t in [&token, &viewer, &rotated] {
            let needle = t.as_bytes();
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "plaintext token in the database"
            );
        }
    }
}
