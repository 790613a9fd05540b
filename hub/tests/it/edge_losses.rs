//! The edge's loss counters (`dropped`, `unwritten`, `dropped_disk_full`,
//! `dropped_damaged` from its `status` frame) reach every place the hub
//! shows a device: `/api/devices`, `/api/admin/devices`, the dashboard
//! `status` frame and `/metrics` (fleet sums, no device ids).

use crate::dashboard::{bearer, browser_dashboard, http};
use crate::harness::*;

const STATUS: &str = r#"{"type":"status","outbox_depth":12,"oldest_ts_ms":null,"dropped":2,"unwritten":3,"dropped_disk_full":4,"dropped_damaged":5}"#;

fn check(v: &serde_json::Value, what: &str) {
    for (field, want) in [
        ("dropped", 2),
        ("unwritten", 3),
        ("dropped_disk_full", 4),
        ("dropped_damaged", 5),
    ] {
        assert_eq!(v[field].as_u64(), Some(want), "{what}: {field} in {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_loss_counters_are_shown_everywhere() {
    let hub = TestHub::start().await;
    let admin = hub.admin().add_admin("ops").unwrap();
    let token = hub.add_device("dev-l");
    let viewer = hub.add_viewer("v", &["dev-l"]);
    let mut dash = browser_dashboard(hub.addr, "dev-l", &viewer, None).await;
    // The first status frame: the device is not connected yet.
    let first = next_json(&mut dash).await;
    assert_eq!(first["type"], "status");
    assert!(first.get("unwritten").is_none(), "{first}");
    let mut ws = hub.device("dev-l", &token).await;
    send_text(&mut ws, STATUS).await;
    send_text(&mut ws, reading(1, 0)).await;
    wait_ack(&mut ws, 1, 0).await;

    // Live: the status frame published when the edge reports.
    loop {
        let v = next_json(&mut dash).await;
        if v["type"] == "status" && v.get("outbox_depth").is_some() {
            assert_eq!(v["outbox_depth"], 12);
            check(&v, "live status frame");
            break;
        }
    }
    // A dashboard opened now starts with them.
    let mut dash2 = browser_dashboard(hub.addr, "dev-l", &viewer, None).await;
    let v = next_json(&mut dash2).await;
    assert_eq!(v["type"], "status");
    check(&v, "initial status frame");

    for (t, path) in [(&viewer, "/api/devices"), (&admin, "/api/admin/devices")] {
        let r = get_list(&hub, t, path).await;
        let v = r.json();
        check(&v["devices"][0], path);
    }

    let m = http(hub.addr, "GET", "/metrics", &[], None).await.body;
    for (series, want) in [
        ("ems_edge_unwritten_readings_sum", "3"),
        ("ems_edge_dropped_readings_sum{cause=\"spool_full\"}", "2"),
        ("ems_edge_dropped_readings_sum{cause=\"disk_full\"}", "4"),
        ("ems_edge_dropped_readings_sum{cause=\"damaged\"}", "5"),
    ] {
        let line = format!("{series} {want}");
        assert!(m.lines().any(|l| l == line), "no {line:?} in\n{m}");
    }
    assert!(!m.contains("dev-l"));

    // Disconnected: the edge's counters are gone with its connection.
    drop(ws);
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let r = http(
            hub.addr,
            "GET",
            "/api/devices",
            &[("Authorization", &bearer(&viewer))],
            None,
        )
        .await
        .json();
        if r["devices"][0]["online"] == false {
            assert!(r["devices"][0]["unwritten"].is_null(), "{r}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still online: {r}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Where each of `keys` first appears in `text` as an object key, in order
/// (panics when one is missing).
fn key_positions(text: &str, keys: &[&str]) -> Vec<usize> {
    keys.iter()
        .map(|k| {
            text.find(&format!("\"{k}\":"))
                .unwrap_or_else(|| panic!("no key {k} in {text}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_lists_keep_their_shape() {
    let hub = TestHub::start().await;
    let admin = hub.admin().add_admin("ops").unwrap();
    let token = hub.add_device("dev-s");
    let viewer = hub.add_viewer("v", &["dev-s"]);
    let mut ws = hub.device("dev-s", &token).await;
    send_text(&mut ws, STATUS).await;
    send_text(&mut ws, reading(1, 0)).await;
    wait_ack(&mut ws, 1, 0).await;
    // Every key of an entry, sorted, as the lists have always answered.
    let keys = [
        "behind_ms",
        "device_id",
        "dropped",
        "dropped_damaged",
        "dropped_disk_full",
        "hub",
        "last",
        "last_seen_ms",
        "online",
        "online_since_ms",
        "outbox_depth",
        "quarantined",
        "unwritten",
    ];
    let last_keys = ["energy_wh", "meter", "power_w", "ts"];
    for (t, path) in [(&viewer, "/api/devices"), (&admin, "/api/admin/devices")] {
        let r = get_list(&hub, t, path).await;
        assert!(
            r.body.starts_with("{\"devices\":[{\"behind_ms\":"),
            "{}",
            r.body
        );
        let mut want: Vec<&str> = keys.to_vec();
        if path.contains("admin") {
            want.insert(1, "created_ms");
            want.insert(13, "revoked_ms");
        }
        let at = key_positions(&r.body, &want);
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{path}: {}", r.body);
        let last = &r.body[r.body.find("\"last\":[").unwrap()..];
        let at = key_positions(last, &last_keys);
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{path}: {last}");
        let v = r.json();
        let e = &v["devices"][0];
        assert_eq!(e.as_object().unwrap().len(), want.len(), "{path}: {e}");
        assert_eq!(e["device_id"], "dev-s");
        assert_eq!(e["online"], true);
        assert!(e["hub"].is_string() && e["online_since_ms"].is_i64(), "{e}");
        assert!(e["last_seen_ms"].is_i64() && e["behind_ms"].is_i64(), "{e}");
        assert_eq!(e["outbox_depth"], 12);
        assert_eq!(e["quarantined"], 0);
        check(e, path);
        let l = &e["last"][0];
        assert_eq!(l["meter"], "main");
        assert_eq!(l["power_w"], 960.5);
        assert_eq!(l["energy_wh"], 1523400.0);
        assert!(l["ts"].is_i64(), "{l}");
    }
}

/// `GET path` (a device list) with `token`; asserts a 200.
async fn get_list(hub: &TestHub, token: &str, path: &str) -> HttpResp {
    let r = http(
        hub.addr,
        "GET",
        path,
        &[("Authorization", &bearer(token))],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r
}
