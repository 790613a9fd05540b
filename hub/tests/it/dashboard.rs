//! Dashboards: subprotocol auth, the Origin rule, scope,
//! presence, resume without gap or duplicate, backfill summaries, live
//! viewer revocation and the history API — with real WebSocket clients
//! and raw HTTP requests.

use std::collections::HashSet;
use std::time::Duration;

use tokio_tungstenite::tungstenite::Error as WsError;

use crate::harness::*;

// The HTTP and dashboard clients live in the test kit; other modules
// import them from here as well.
pub use crate::harness::{bearer, browser_dashboard, connect_with, http, HttpResp};

fn status_of(r: Result<(Client, Option<String>, Vec<String>), WsError>) -> u16 {
    match r {
        Ok(_) => 101,
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error {e}"),
    }
}

fn reading_at(epoch: u64, seq: u64, ts_ms: i64, power: f64) -> String {
    format!(
        r#"{{"type":"reading","epoch":{epoch},"seq":{seq},"ts_ms":{ts_ms},"meter":"main","voltage_v":230.0,"current_a":1.5,"power_w":{power},"energy_wh":1000.0}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subprotocol_auth_answers_ems_v1_and_never_echoes_the_token() {
    let hub = TestHub::start().await;
    let dev = hub.add_device("dev");
    let viewer = hub.add_viewer("v", &["dev"]);
    let admin = hub.admin().add_admin("ops").unwrap();
    let path = "/ws/dashboard/dev";
    let proto = |s: String| vec![("sec-websocket-protocol", s)];

    // Browser path: 101, the answer is exactly ems.v1, no header carries the token.
    let (mut ws, answer, headers) = connect_with(
        hub.addr,
        path,
        &proto(format!("ems.v1, ems.bearer.{viewer}")),
    )
    .await
    .unwrap();
    assert_eq!(answer.as_deref(), Some("ems.v1"));
    for h in &headers {
        assert!(
            !h.contains(&viewer) && !h.contains("ems.bearer"),
            "echoed: {h}"
        );
    }
    assert_eq!(next_json(&mut ws).await["type"], "status");
    // Order does not matter; unknown protocols are ignored.
    let (_, answer, _) = connect_with(
        hub.addr,
        path,
        &proto(format!("chat, ems.bearer.{viewer}, ems.v1")),
    )
    .await
    .unwrap();
    assert_eq!(answer.as_deref(), Some("ems.v1"));
    // Authorization header plus ems.v1: also answered with ems.v1.
    let (_, answer, _) = connect_with(
        hub.addr,
        path,
        &[
            ("authorization", bearer(&viewer)),
            ("sec-websocket-protocol", "ems.v1".into()),
        ],
    )
    .await
    .unwrap();
    assert_eq!(answer.as_deref(), Some("ems.v1"));
    // Only the token entry: 400.
    assert_eq!(
        status_of(connect_with(hub.addr, path, &proto(format!("ems.bearer.{viewer}"))).await),
        400
    );
    // Token in both places: 400.
    assert_eq!(
        status_of(
            connect_with(
                hub.addr,
                path,
                &[
                    ("authorization", bearer(&viewer)),
                    (
                        "sec-websocket-protocol",
                        format!("ems.v1, ems.bearer.{viewer}")
                    ),
                ],
            )
            .await
        ),
        400
    );
    // Wrong kinds of token in the subprotocol: 403.
    for t in [&dev, &admin, &"emsv_nonsense".to_string()] {
        assert_eq!(
            status_of(
                connect_with(hub.addr, path, &proto(format!("ems.v1, ems.bearer.{t}"))).await
            ),
            403
        );
    }
    // Only ems.v1, no credential: 401.
    assert_eq!(
        status_of(connect_with(hub.addr, path, &proto("ems.v1".into())).await),
        401
    );
    // Devices authenticate with the header only: the subprotocol is not a
    // credential there.
    assert_eq!(
        status_of(
            connect_with(
                hub.addr,
                "/ws/device/dev",
                &proto(format!("ems.v1, ems.bearer.{dev}"))
            )
            .await
        ),
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_is_checked_for_dashboards_and_the_api_only() {
    let hub =
        TestHub::start_with(|c| c.allowed_origins = vec!["https://grafana.example".into()]).await;
    let dev = hub.add_device("dev");
    let viewer = hub.add_viewer("v", &["dev"]);
    let own = format!("http://{}", hub.addr);
    let dash = |origin: &str| {
        vec![
            ("authorization", bearer(&viewer)),
            ("origin", origin.to_string()),
        ]
    };
    let path = "/ws/dashboard/dev";
    assert_eq!(
        status_of(connect_with(hub.addr, path, &dash(&own)).await),
        101
    );
    assert_eq!(
        status_of(connect_with(hub.addr, path, &dash("https://grafana.example")).await),
        101
    );
    for bad in [
        "https://evil.example",
        "null",
        "https://grafana.example.evil",
        "http://127.0.0.1:1",
    ] {
        assert_eq!(
            status_of(connect_with(hub.addr, path, &dash(bad)).await),
            403,
            "{bad}"
        );
    }
    // Devices are not browsers: Origin is ignored.
    let d = vec![
        ("authorization", bearer(&dev)),
        ("origin", "https://evil.example".to_string()),
    ];
    assert_eq!(
        status_of(connect_with(hub.addr, "/ws/device/dev", &d).await),
        101
    );
    // The API follows the same rule.
    let auth = bearer(&viewer);
    let ok = http(
        hub.addr,
        "GET",
        "/api/devices",
        &[("Authorization", &auth), ("Origin", &own)],
        None,
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let bad = http(
        hub.addr,
        "GET",
        "/api/devices",
        &[("Authorization", &auth), ("Origin", "https://evil.example")],
        None,
    )
    .await;
    assert_eq!(bad.status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_is_enforced_on_sockets_and_api() {
    let hub = TestHub::start().await;
    hub.add_device("dev-a");
    hub.add_device("dev-b");
    let viewer = hub.add_viewer("v", &["dev-a"]);
    let offer = |d: &str| {
        (
            format!("/ws/dashboard/{d}"),
            vec![(
                "sec-websocket-protocol",
                format!("ems.v1, ems.bearer.{viewer}"),
            )],
        )
    };
    let (p, h) = offer("dev-a");
    assert_eq!(status_of(connect_with(hub.addr, &p, &h).await), 101);
    let (p, h) = offer("dev-b");
    assert_eq!(status_of(connect_with(hub.addr, &p, &h).await), 403);
    let auth = bearer(&viewer);
    let list = http(
        hub.addr,
        "GET",
        "/api/devices",
        &[("Authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(list.status, 200);
    let ids: Vec<String> = list.json()["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["dev-a"]);
    let other = http(
        hub.addr,
        "GET",
        "/api/devices/dev-b/readings",
        &[("Authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(other.status, 403);
    let mine = http(
        hub.addr,
        "GET",
        "/api/devices/dev-a/readings",
        &[("Authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(mine.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_on_subscribe_and_on_connect_and_disconnect() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev");
    let viewer = hub.add_viewer("v", &["dev"]);
    let mut dash = browser_dashboard(hub.addr, "dev", &viewer, None).await;
    let s = next_json(&mut dash).await;
    assert_eq!(s["type"], "status");
    assert_eq!(s["device_id"], "dev");
    assert_eq!(s["online"], false);
    assert!(s["last_seen_ms"].is_null(), "{s}");

    let before = now_ms();
    let mut ws = hub.device("dev", &token).await;
    let s = next_json(&mut dash).await;
    assert_eq!(
        (s["type"].as_str(), s["online"].as_bool()),
        (Some("status"), Some(true)),
        "{s}"
    );
    assert!(s["last_seen_ms"].as_i64().unwrap() >= before);
    send_text(&mut ws, reading(1, 0)).await;
    assert_eq!(next_json(&mut dash).await["type"], "reading");
    wait_ack(&mut ws, 1, 0).await;
    // The edge's outbox report reaches dashboards as a status update.
    let oldest = now_ms() - 3 * 3_600_000;
    send_text(
        &mut ws,
        format!(r#"{{"type":"status","outbox_depth":10800,"oldest_ts_ms":{oldest},"dropped":0}}"#),
    )
    .await;
    let s = next_json(&mut dash).await;
    assert_eq!(
        (s["type"].as_str(), s["online"].as_bool()),
        (Some("status"), Some(true)),
        "{s}"
    );
    assert_eq!(s["outbox_depth"], 10800);
    assert!(s["behind_ms"].as_i64().unwrap() >= 3 * 3_600_000);
    ws.close(None).await.unwrap();
    let s = next_json(&mut dash).await;
    assert_eq!(
        (s["type"].as_str(), s["online"].as_bool()),
        (Some("status"), Some(false)),
        "{s}"
    );
    let gone = s["last_seen_ms"].as_i64().unwrap();
    assert!(gone >= before);

    // A new subscriber sees the device offline, last seen then.
    let mut late = browser_dashboard(hub.addr, "dev", &viewer, None).await;
    let s = next_json(&mut late).await;
    assert_eq!(s["online"], false);
    assert!(s["last_seen_ms"].as_i64().unwrap() >= gone);
    // And the API agrees.
    let list = http(
        hub.addr,
        "GET",
        "/api/devices",
        &[("Authorization", &bearer(&viewer))],
        None,
    )
    .await;
    let d = &list.json()["devices"][0];
    assert_eq!(d["online"], false);
    assert!(d["last_seen_ms"].as_i64().unwrap() >= gone);
}

/// Reads a resumed feed until `last` has been seen; returns the seqs of the
/// replay and of the live part separately.
async fn collect_resumed(dash: &mut Client, last: u64) -> (Vec<u64>, Vec<u64>) {
    let (mut replay, mut live) = (Vec::new(), Vec::new());
    let mut in_replay = true;
    loop {
        let v = next_json(dash).await;
        match v["type"].as_str() {
            Some("reading") => {
                let seq = v["seq"].as_u64().unwrap();
                if in_replay {
                    replay.push(seq);
                } else {
                    live.push(seq);
                }
                if seq == last {
                    assert!(!in_replay, "replay_end missing");
                    return (replay, live);
                }
            }
            Some("replay_end") => {
                assert!(in_replay, "two replay_end frames");
                assert_eq!(v["count"].as_u64().unwrap() as usize, replay.len());
                assert_eq!(v["truncated"], false);
                in_replay = false;
            }
            Some("status") => {}
            other => panic!("unexpected frame {other:?}: {v}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_replays_history_then_live_without_gap_or_duplicate() {
    // A writer that lags behind the broadcast (long linger) makes the seam
    // hard: readings are on the topic well before they are in the store.
    let hub = TestHub::start_with(|c| c.batch_linger = Duration::from_millis(150)).await;
    let token = hub.add_device("dev");
    let viewer = hub.add_viewer("v", &["dev"]);
    let since = now_ms() - 1000;
    const N: u64 = 400;
    let mut ws = hub.device("dev", &token).await;
    // Stream N readings at ~2 ms intervals while subscribers resume at
    // different moments.
    let sender = tokio::spawn(async move {
        for seq in 0..N {
            send_text(&mut ws, reading(7, seq)).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        wait_ack(&mut ws, 7, N - 1).await;
        ws
    });
    let mut subs = Vec::new();
    for delay in [5u64, 150, 400] {
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let addr = hub.addr;
        let viewer = viewer.clone();
        subs.push(tokio::spawn(async move {
            let mut d = browser_dashboard(addr, "dev", &viewer, Some(since)).await;
            collect_resumed(&mut d, N - 1).await
        }));
    }
    let _ws = sender.await.unwrap();
    for (i, s) in subs.into_iter().enumerate() {
        let (replay, live) = s.await.unwrap();
        let all: Vec<u64> = replay.iter().chain(live.iter()).copied().collect();
        assert_eq!(
            all,
            (0..N).collect::<Vec<_>>(),
            "subscriber {i}: replay {} + live {}",
            replay.len(),
            live.len()
        );
        println!(
            "subscriber {i}: {} replayed, {} live",
            replay.len(),
            live.len()
        );
    }
    // A resume after the fact replays everything, then nothing more.
    let mut d = browser_dashboard(hub.addr, "dev", &viewer, Some(since)).await;
    assert_eq!(next_json(&mut d).await["type"], "status");
    let mut seen = HashSet::new();
    loop {
        let v = next_json(&mut d).await;
        if v["type"] == "replay_end" {
            assert_eq!(v["count"], N);
            break;
        }
        assert!(seen.insert(v["seq"].as_u64().unwrap()));
    }
    assert_eq!(seen.len() as u64, N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_is_summarized_as_backfill() {
    // The burst below is larger than the default ring of 256 frames, and on
    // a loaded machine the dashboard task may not run until the device has
    // sent all of it: the backlog must be summarized before it reaches the
    // ring, so the default ring is enough.
    let hub = TestHub::start().await;
    let token = hub.add_device("dev");
    let viewer = hub.add_viewer("v", &["dev"]);
    let mut dash = browser_dashboard(hub.addr, "dev", &viewer, None).await;
    assert_eq!(next_json(&mut dash).await["type"], "status");
    let mut ws = hub.device("dev", &token).await;
    // Two hours old: a drained offline backlog.
    let old = now_ms() - 2 * 3_600_000;
    const N: u64 = 300;
    for seq in 0..N {
        send_text(&mut ws, reading_at(1, seq, old + seq as i64 * 1000, 100.0)).await;
    }
    send_text(&mut ws, reading_at(1, N, now_ms(), 4321.0)).await;
    wait_ack(&mut ws, 1, N).await;
    let (mut count, mut from, mut to) = (0u64, i64::MAX, i64::MIN);
    loop {
        let v = next_json(&mut dash).await;
        match v["type"].as_str() {
            Some("status") => {}
            Some("backfill") => {
                count += v["count"].as_u64().unwrap();
                from = from.min(v["from_ts_ms"].as_i64().unwrap());
                to = to.max(v["to_ts_ms"].as_i64().unwrap());
            }
            Some("reading") => {
                assert_eq!(v["seq"], N, "a backlog reading was forwarded one by one");
                assert_eq!(v["power_w"], 4321.0);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Summaries precede the next fresh reading, so all are counted here.
    assert_eq!(count, N);
    assert_eq!((from, to), (old, old + (N as i64 - 1) * 1000));
    // The readings are stored as usual and the API serves the range.
    assert_eq!(hub.stored("dev").len() as u64, N + 1);
    let q = format!(
        "/api/devices/dev/readings?from_ms={from}&to_ms={}&limit=1000",
        to + 1
    );
    let r = http(
        hub.addr,
        "GET",
        &q,
        &[("Authorization", &bearer(&viewer))],
        None,
    )
    .await;
    assert_eq!(r.json()["readings"].as_array().unwrap().len() as u64, N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_viewer_is_closed_with_4001() {
    let hub = TestHub::start_with(|c| c.viewer_recheck = Duration::from_millis(200)).await;
    hub.add_device("dev");
    let viewer = hub.add_viewer("v", &["dev"]);
    let mut dash = browser_dashboard(hub.addr, "dev", &viewer, None).await;
    assert_eq!(next_json(&mut dash).await["type"], "status");
    hub.admin().revoke_viewer("v").unwrap();
    assert_eq!(expect_close(&mut dash, 4001).await, "revoked");
    let (p, h) = (
        "/ws/dashboard/dev",
        vec![(
            "sec-websocket-protocol",
            format!("ems.v1, ems.bearer.{viewer}"),
        )],
    );
    assert_eq!(status_of(connect_with(hub.addr, p, &h).await), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_api() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev");
    let viewer = hub.add_viewer("v", &["dev"]);
    let mut ws = hub.device("dev", &token).await;
    let t0 = now_ms() - 10_000;
    for seq in 0..10u64 {
        // Sent newest first: the API still answers oldest first.
        send_text(
            &mut ws,
            reading_at(3, seq, t0 + (9 - seq as i64) * 100, seq as f64),
        )
        .await;
    }
    wait_ack(&mut ws, 3, 9).await;
    let auth = bearer(&viewer);
    let get = |q: String| {
        let auth = auth.clone();
        async move { http(hub.addr, "GET", &q, &[("Authorization", &auth)], None).await }
    };
    let r = get("/api/devices/dev/readings".into()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let v = r.json();
    let ts: Vec<i64> = v["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ts_ms"].as_i64().unwrap())
        .collect();
    assert_eq!(ts, (0..10).map(|i| t0 + i * 100).collect::<Vec<_>>());
    assert_eq!(v["truncated"], false);
    let first = &v["readings"][0];
    assert_eq!(
        (first["device_id"].as_str(), first["type"].as_str()),
        (Some("dev"), Some("reading"))
    );
    assert!(first["rx_ms"].as_i64().unwrap() >= t0);
    let r = get(format!(
        "/api/devices/dev/readings?from_ms={}&to_ms={}&limit=3",
        t0 + 100,
        t0 + 900
    ))
    .await;
    let v = r.json();
    let ts: Vec<i64> = v["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ts_ms"].as_i64().unwrap())
        .collect();
    assert_eq!(ts, [t0 + 100, t0 + 200, t0 + 300]);
    assert_eq!(v["truncated"], true);
    for bad in [
        "?from_ms=x",
        "?limit=0",
        "?limit=100000",
        "?from_ms=5&to_ms=1",
        "?what=1",
    ] {
        assert_eq!(
            get(format!("/api/devices/dev/readings{bad}")).await.status,
            400,
            "{bad}"
        );
    }
    // Credentials in a query are refused anywhere, even with a valid header.
    for q in ["?token=x", "?access_token=x", "?auth=1", "?api_key=1"] {
        assert_eq!(get(format!("/api/devices{q}")).await.status, 400, "{q}");
    }
    // Query strings on sockets stay refused.
    assert_eq!(
        refused_status(hub.addr, "/ws/dashboard/dev?from_ms=1", Some(&viewer)).await,
        400
    );
    // Missing token 401 with WWW-Authenticate, wrong kind 403.
    let r = http(hub.addr, "GET", "/api/devices", &[], None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
    let r = http(
        hub.addr,
        "GET",
        "/api/devices",
        &[("Authorization", &bearer(&token))],
        None,
    )
    .await;
    assert_eq!(r.status, 403);
    assert!(!r.body.contains(&token));
    let r = http(
        hub.addr,
        "POST",
        "/api/devices",
        &[("Authorization", &auth)],
        Some("{}"),
    )
    .await;
    assert_eq!(r.status, 405);
    assert_eq!(get("/api/nope".into()).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_is_served_with_a_strict_csp() {
    let hub = TestHub::start().await;
    let r = http(hub.addr, "GET", "/", &[], None).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("<title>EMS dashboard</title>"));
    let csp = r.header("content-security-policy").unwrap();
    assert!(
        csp.contains("default-src 'none'")
            && csp.contains("script-src 'self'")
            && !csp.contains("unsafe"),
        "{csp}"
    );
    for (path, ty) in [
        ("/assets/app.js", "text/javascript"),
        ("/assets/app.css", "text/css"),
        ("/assets/icon.svg", "image/svg+xml"),
    ] {
        let r = http(hub.addr, "GET", path, &[], None).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(r.header("content-type").unwrap().starts_with(ty), "{path}");
        assert_eq!(
            r.header("x-content-type-options").as_deref(),
            Some("nosniff")
        );
    }
    // The page never puts a token in a URL: no query on the socket.
    let js = http(hub.addr, "GET", "/assets/app.js", &[], None)
        .await
        .body;
    assert!(js.contains("'ems.bearer.' + live.token"));
    assert!(!js.contains("?token"));
    // Unknown pages are still 404.
    assert_eq!(http(hub.addr, "GET", "/nope", &[], None).await.status, 404);
}
