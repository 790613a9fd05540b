//! Quarantine: every frame the gatekeeper refuses, and every row the
//! database refuses, is stored in the `quarantine` table before it is
//! answered; the CLI and the admin API list it, `/metrics` counts it by
//! reason and the device lists count it per device. A reading the hub can
//! neither store nor quarantine is never acked: its connection is closed
//! (1011) so the edge sends it again.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::dashboard::{bearer, http, HttpResp};
use crate::harness::*;

/// One row of `quarantine` as stored.
#[derive(Debug)]
struct QRow {
    epoch: Option<i64>,
    seq: Option<i64>,
    reason: String,
    detail: String,
    raw: Option<String>,
    received_at: i64,
}

/// The quarantine rows of `device`, oldest first.
fn quarantined(hub: &TestHub, device: &str) -> Vec<QRow> {
    let conn = rusqlite::Connection::open(&hub.db_path).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT epoch, seq, reason, detail, raw, received_at FROM quarantine \
             WHERE device_id = ?1 ORDER BY received_at, rowid",
        )
        .unwrap();
    let rows = stmt
        .query_map([device], |r| {
            Ok(QRow {
                epoch: r.get(0)?,
                seq: r.get(1)?,
                reason: r.get(2)?,
                detail: r.get(3)?,
                raw: r.get(4)?,
                received_at: r.get(5)?,
            })
        })
        .unwrap();
    rows.map(|r| r.unwrap()).collect()
}

fn frame(epoch: u64, seq: u64, ts_ms: i64, fields: &str) -> String {
    format!(
        r#"{{"type":"reading","epoch":{epoch},"seq":{seq},"ts_ms":{ts_ms},"meter":"main",{fields}}}"#
    )
}

/// A reading the gatekeeper refuses as `out_of_range`.
fn out_of_range(epoch: u64, seq: u64) -> String {
    frame(epoch, seq, now_ms(), r#""power_factor":2.0"#)
}

/// A valid reading with this power.
fn with_power(epoch: u64, seq: u64, power_w: f64) -> String {
    frame(epoch, seq, now_ms(), &format!(r#""power_w":{power_w:?}"#))
}

async fn get(hub: &TestHub, token: &str, path: &str) -> HttpResp {
    http(
        hub.addr,
        "GET",
        path,
        &[("Authorization", &bearer(token))],
        None,
    )
    .await
}

async fn metrics_text(hub: &TestHub) -> String {
    let r = http(hub.addr, "GET", "/metrics", &[], None).await;
    assert_eq!(r.status, 200);
    r.body
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

fn ems_hub_cmd(args: &[&str], db: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ems-hub"))
        .args(args)
        .env("EMS_DATABASE_URL", db)
        .env_remove("EMS_LOG_LEVEL")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_readings_are_quarantined_before_they_are_answered() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev-q");
    let mut ws = hub.device("dev-q", &token).await;
    let t0 = now_ms();
    let bad_range = out_of_range(7, 2);
    let bad_future = frame(7, 3, now_ms() + 3_600_000, r#""power_w":1.0"#);
    send_text(&mut ws, reading(7, 1)).await;
    send_text(&mut ws, bad_range.clone()).await;
    send_text(&mut ws, bad_future.clone()).await;
    send_text(&mut ws, reading(7, 4)).await;
    // Every `rejected` frame comes after its row is committed, and before
    // any cumulative ack that covers it.
    let mut rejected = Vec::new();
    loop {
        let v = next_json(&mut ws).await;
        match v["type"].as_str() {
            Some("rejected") => {
                let seq = v["seq"].as_i64().unwrap();
                let stored = quarantined(&hub, "dev-q");
                assert!(
                    stored.iter().any(|q| q.seq == Some(seq)),
                    "rejected {v} answered before its quarantine row was committed: {stored:?}"
                );
                rejected.push((seq, v["reason"].as_str().unwrap().to_string()));
            }
            Some("ack") => {
                let seq = v["seq"].as_u64().unwrap();
                if seq >= 2 {
                    assert!(
                        rejected.iter().any(|(s, _)| *s == 2),
                        "ack {seq} sent before the rejection of 2"
                    );
                }
                if seq >= 3 {
                    assert!(
                        rejected.iter().any(|(s, _)| *s == 3),
                        "ack {seq} sent before the rejection of 3"
                    );
                }
                if seq >= 4 {
                    break;
                }
            }
            _ => panic!("unexpected {v}"),
        }
    }
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert!(rejected[0].1.starts_with("out_of_range: "), "{rejected:?}");
    assert!(
        rejected[1].1.starts_with("future_timestamp: "),
        "{rejected:?}"
    );
    assert_eq!(hub.stored("dev-q"), vec![(7, 1), (7, 4)]);
    let q = quarantined(&hub, "dev-q");
    assert_eq!(q.len(), 2, "{q:?}");
    assert_eq!((q[0].epoch, q[0].seq), (Some(7), Some(2)));
    assert_eq!(q[0].reason, "out_of_range");
    assert!(q[0].detail.contains("power_factor"), "{q:?}");
    assert_eq!(q[0].raw.as_deref(), Some(bad_range.as_str()));
    assert_eq!((q[1].epoch, q[1].seq), (Some(7), Some(3)));
    assert_eq!(q[1].reason, "future_timestamp");
    assert_eq!(q[1].raw.as_deref(), Some(bad_future.as_str()));
    for r in &q {
        assert!(
            (t0..=now_ms()).contains(&r.received_at),
            "{} not within the test",
            r.received_at
        );
        assert!(!r.detail.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_without_ids_are_quarantined_but_never_answered() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev-q");
    let mut ws = hub.device("dev-q", &token).await;
    send_text(&mut ws, "not json").await;
    ws.send(Message::Binary(vec![1u8, 2, 3].into()))
        .await
        .unwrap();
    send_text(&mut ws, reading(1, 0)).await;
    let others = wait_ack(&mut ws, 1, 0).await;
    assert!(others.is_empty(), "answered: {others:?}");
    // The ack went out after the batch holding the quarantine rows.
    let q = quarantined(&hub, "dev-q");
    assert_eq!(q.len(), 2, "{q:?}");
    assert_eq!((q[0].epoch, q[0].seq), (None, None));
    assert_eq!(q[0].reason, "invalid_json");
    assert_eq!(q[0].raw.as_deref(), Some("not json"));
    assert_eq!(q[1].reason, "binary_frame");
    assert_eq!(q[1].raw, None, "a binary frame has no text");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_is_listed_counted_and_shown_per_device() {
    let hub = TestHub::start().await;
    let admin = hub.admin().add_admin("ops").unwrap();
    let ta = hub.add_device("dev-a");
    let tb = hub.add_device("dev-b");
    hub.add_device("dev-c");
    let viewer = hub.add_viewer("v", &["dev-a", "dev-b", "dev-c"]);
    let mut a = hub.device("dev-a", &ta).await;
    let mut b = hub.device("dev-b", &tb).await;
    for seq in 0..3 {
        send_text(&mut a, out_of_range(1, seq)).await;
    }
    send_text(&mut a, reading(1, 3)).await;
    wait_ack(&mut a, 1, 3).await;
    send_text(
        &mut b,
        frame(2, 0, now_ms() + 3_600_000, r#""power_w":1.0"#),
    )
    .await;
    send_text(&mut b, reading(2, 1)).await;
    wait_ack(&mut b, 2, 1).await;

    // The admin API: newest first, filtered, limited.
    let r = get(&hub, &admin, "/api/admin/quarantine").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let list = v["quarantine"].as_array().unwrap();
    assert_eq!(list.len(), 4, "{v}");
    assert_eq!(list[0]["device_id"], "dev-b", "newest first: {v}");
    assert_eq!(list[0]["reason"], "future_timestamp");
    assert_eq!(list[0]["epoch"], 2);
    assert_eq!(list[0]["seq"], 0);
    assert!(list[0]["received_at_ms"].as_i64().unwrap() > 0);
    assert!(list[0]["detail"].as_str().unwrap().contains("ts_ms"), "{v}");
    assert!(list[0]["raw"].as_str().unwrap().contains(r#""epoch":2"#));
    let r = get(
        &hub,
        &admin,
        "/api/admin/quarantine?device_id=dev-a&limit=2",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let list = v["quarantine"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{v}");
    assert!(list.iter().all(|q| q["device_id"] == "dev-a"), "{v}");
    assert_eq!(list[0]["seq"], 2, "newest first: {v}");
    assert_eq!(list[1]["seq"], 1);
    for bad in [
        "/api/admin/quarantine?limit=0",
        "/api/admin/quarantine?limit=1001",
        "/api/admin/quarantine?limit=x",
        "/api/admin/quarantine?device_id=a%20b",
        "/api/admin/quarantine?other=1",
    ] {
        assert_eq!(get(&hub, &admin, bad).await.status, 400, "{bad}");
    }
    // Admin only, and the Origin rule of every API call.
    assert_eq!(
        get(&hub, &viewer, "/api/admin/quarantine").await.status,
        403
    );
    assert_eq!(
        http(hub.addr, "GET", "/api/admin/quarantine", &[], None)
            .await
            .status,
        401
    );
    let auth = bearer(&admin);
    let foreign = http(
        hub.addr,
        "GET",
        "/api/admin/quarantine",
        &[("Authorization", &auth), ("Origin", "https://evil.example")],
        None,
    )
    .await;
    assert_eq!(foreign.status, 403);
    let r = http(
        hub.addr,
        "POST",
        "/api/admin/quarantine",
        &[("Authorization", &auth)],
        Some("{}"),
    )
    .await;
    assert_eq!(r.status, 405);

    // Counted per device, for admins and viewers alike (0 when none).
    for (token, path) in [(&admin, "/api/admin/devices"), (&viewer, "/api/devices")] {
        let v = get(&hub, token, path).await.json();
        let count = |id: &str| {
            v["devices"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["device_id"] == id)
                .unwrap_or_else(|| panic!("{id} missing in {v}"))["quarantined"]
                .as_u64()
        };
        assert_eq!(count("dev-a"), Some(3), "{path}: {v}");
        assert_eq!(count("dev-b"), Some(1), "{path}: {v}");
        assert_eq!(count("dev-c"), Some(0), "{path}: {v}");
    }

    // /metrics by reason, closed label set.
    let m = metrics_text(&hub).await;
    assert_eq!(
        sample(&m, "ems_quarantined_total{reason=\"out_of_range\"}"),
        3.0
    );
    assert_eq!(
        sample(&m, "ems_quarantined_total{reason=\"future_timestamp\"}"),
        1.0
    );
    assert_eq!(
        sample(&m, "ems_quarantined_total{reason=\"store_error\"}"),
        0.0
    );
    assert!(!m.contains("dev-a"));

    // The CLI: tab-separated, newest first, filtered and limited.
    let out = ems_hub_cmd(
        &["quarantine", "list", "--device", "dev-a", "--limit", "2"],
        &hub.db_url,
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let cols: Vec<&str> = lines[0].split('\t').collect();
    assert_eq!(cols[0], "dev-a", "{stdout}");
    assert_eq!(&cols[2..5], ["1", "2", "out_of_range"], "{stdout}");
    assert!(lines[1].contains("\t1\t1\tout_of_range\t"), "{stdout}");
    let all = ems_hub_cmd(&["quarantine", "list"], &hub.db_url);
    assert_eq!(String::from_utf8_lossy(&all.stdout).lines().count(), 4);
    let bad = ems_hub_cmd(&["quarantine", "list", "--limit", "0"], &hub.db_url);
    assert!(!bad.status.success());
}

/// The database refuses one row (a trigger raises on `power_w = 1234.5`):
/// that row alone goes to quarantine with the database's message, the rest
/// of its batch commits and acks flow on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_database_refuses_is_quarantined_and_the_rest_commit() {
    let hub = TestHub::start_with(|c| c.batch_linger = Duration::from_millis(50)).await;
    let token = hub.add_device("dev-t");
    rusqlite::Connection::open(&hub.db_path)
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER refuse_1234 BEFORE INSERT ON readings \
             WHEN NEW.power_w = 1234.5 \
             BEGIN SELECT RAISE(ABORT, 'power_w 1234.5 refused by test trigger'); END;",
        )
        .unwrap();
    let mut ws = hub.device("dev-t", &token).await;
    for seq in 0..10 {
        let power = if seq == 4 { 1234.5 } else { seq as f64 };
        send_text(&mut ws, with_power(3, seq, power)).await;
    }
    let mut rejected = None;
    loop {
        let v = next_json(&mut ws).await;
        match v["type"].as_str() {
            Some("rejected") => {
                assert_eq!(v["seq"], 4, "{v}");
                rejected = Some(v["reason"].as_str().unwrap().to_string());
            }
            Some("ack") => {
                let seq = v["seq"].as_u64().unwrap();
                if seq >= 4 {
                    assert!(rejected.is_some(), "ack {seq} before the rejection of 4");
                }
                if seq == 9 {
                    break;
                }
            }
            _ => panic!("unexpected {v}"),
        }
    }
    let reason = rejected.unwrap();
    assert!(reason.starts_with("store_error: "), "{reason}");
    assert!(reason.contains("refused by test trigger"), "{reason}");
    let stored: Vec<u64> = hub.stored("dev-t").iter().map(|k| k.1).collect();
    assert_eq!(stored, [0, 1, 2, 3, 5, 6, 7, 8, 9]);
    let q = quarantined(&hub, "dev-t");
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!((q[0].epoch, q[0].seq), (Some(3), Some(4)));
    assert_eq!(q[0].reason, "store_error");
    assert!(q[0].detail.contains("refused by test trigger"), "{q:?}");
    assert!(q[0].raw.as_deref().unwrap().contains("1234.5"), "{q:?}");
    let m = metrics_text(&hub).await;
    assert_eq!(
        sample(&m, "ems_quarantined_total{reason=\"store_error\"}"),
        1.0
    );
}

/// A reading the database refuses and whose quarantine row it refuses too
/// is neither stored nor quarantined: it is never acked — not by a later
/// cumulative ack either — and its connection is closed with 1011 so the
/// edge keeps it and sends it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_neither_stored_nor_quarantined_is_never_acked() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev-t");
    let mut ws = hub.device("dev-t", &token).await;
    for seq in 0..3 {
        send_text(&mut ws, with_power(5, seq, 1.0)).await;
    }
    wait_ack(&mut ws, 5, 2).await;
    rusqlite::Connection::open(&hub.db_path)
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER refuse_1234 BEFORE INSERT ON readings \
             WHEN NEW.power_w = 1234.5 \
             BEGIN SELECT RAISE(ABORT, 'power_w 1234.5 refused by test trigger'); END; \
             CREATE TRIGGER refuse_quarantine BEFORE INSERT ON quarantine \
             BEGIN SELECT RAISE(ABORT, 'quarantine refused by test trigger'); END;",
        )
        .unwrap();
    send_text(&mut ws, with_power(5, 3, 1234.5)).await;
    send_text(&mut ws, with_power(5, 4, 4.0)).await;
    let deadline = Instant::now() + SOON;
    let code = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Err(_) => panic!("connection still open after {SOON:?}"),
            Ok(None) | Ok(Some(Err(_))) => break None,
            Ok(Some(Ok(Message::Close(f)))) => break f.map(|f| u16::from(f.code)),
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                assert!(
                    !(v["type"] == "ack" && v["seq"].as_u64().unwrap() >= 3),
                    "acked past the reading that was not committed: {v}"
                );
                assert_ne!(v["type"], "rejected", "{v}");
            }
            Ok(Some(Ok(_))) => {}
        }
    };
    assert_eq!(code, Some(1011));
    assert!(quarantined(&hub, "dev-t").is_empty());
    let m = metrics_text(&hub).await;
    assert!(
        sample(&m, "ems_store_readings_abandoned_total") >= 1.0,
        "{m}"
    );
}
