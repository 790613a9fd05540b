//! The admin API: every `/api/admin/…` operation, wrong-kind tokens
//! refused everywhere, created devices connect at once, revoked or rotated
//! ones are cut off (live sockets close with 4001), and
//! `ems-hub admin add NAME`.

use crate::dashboard::{bearer, browser_dashboard, http, HttpResp};
use crate::harness::*;

async fn post(hub: &TestHub, token: &str, path: &str, body: &str) -> HttpResp {
    http(
        hub.addr,
        "POST",
        path,
        &[("Authorization", &bearer(token))],
        Some(body),
    )
    .await
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

fn device_row<'a>(list: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    list["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == id)
        .unwrap_or_else(|| panic!("{id} not listed: {list}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_every_operation() {
    let hub = TestHub::start().await;
    let admin = hub.admin().add_admin("ops").unwrap();

    // Create: 201, token shown once with the env-file line; connects at once.
    let r = post(
        &hub,
        &admin,
        "/api/admin/devices",
        r#"{"device_id":"ems_010"}"#,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    let t1 = v["token"].as_str().unwrap().to_string();
    assert!(t1.starts_with("emsd_"));
    assert_eq!(v["env"], format!("EMS_DEVICE_TOKEN={t1}"));
    let mut dev = hub.device("ems_010", &t1).await;
    send_text(&mut dev, reading(1, 0)).await;
    wait_ack(&mut dev, 1, 0).await;

    // Duplicate 409, bad id 400, bad body 400, unknown device 404.
    assert_eq!(
        post(
            &hub,
            &admin,
            "/api/admin/devices",
            r#"{"device_id":"ems_010"}"#
        )
        .await
        .status,
        409
    );
    assert_eq!(
        post(&hub, &admin, "/api/admin/devices", r#"{"device_id":"a b"}"#)
            .await
            .status,
        400
    );
    assert_eq!(
        post(&hub, &admin, "/api/admin/devices", r#"{"id":"x"}"#)
            .await
            .status,
        400
    );
    assert_eq!(
        post(&hub, &admin, "/api/admin/devices", "not json")
            .await
            .status,
        400
    );
    let big = format!(r#"{{"device_id":"{}"}}"#, "x".repeat(10_000));
    assert_eq!(
        post(&hub, &admin, "/api/admin/devices", &big).await.status,
        400
    );
    assert_eq!(
        post(&hub, &admin, "/api/admin/devices/nobody/rotate", "{}")
            .await
            .status,
        404
    );
    assert_eq!(
        post(&hub, &admin, "/api/admin/devices/nobody/revoke", "{}")
            .await
            .status,
        404
    );

    // List: live state.
    let list = get(&hub, &admin, "/api/admin/devices").await;
    assert_eq!(list.status, 200);
    let row = device_row(&list.json(), "ems_010").clone();
    assert_eq!(row["online"], true);
    assert!(row["last_seen_ms"].as_i64().is_some());
    assert!(row["revoked_ms"].is_null());
    assert!(row["created_ms"].as_i64().is_some());
    assert!(
        row.get("outbox_depth").is_some(),
        "outbox_depth is reported (null when unknown)"
    );
    assert!(!list.body.contains("emsd_"), "a list never shows tokens");

    // Rotate: new token; the live socket closes with 4001; old token 403.
    let r = post(&hub, &admin, "/api/admin/devices/ems_010/rotate", "{}").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let t2 = r.json()["token"].as_str().unwrap().to_string();
    assert_ne!(t1, t2);
    expect_close(&mut dev, 4001).await;
    assert_eq!(
        refused_status(hub.addr, "/ws/device/ems_010", Some(&t1)).await,
        403
    );
    let mut dev = hub.device("ems_010", &t2).await;

    // Revoke: the live socket closes with 4001, the token no longer works.
    let r = post(&hub, &admin, "/api/admin/devices/ems_010/revoke", "{}").await;
    assert_eq!(r.status, 200, "{}", r.body);
    expect_close(&mut dev, 4001).await;
    assert_eq!(
        refused_status(hub.addr, "/ws/device/ems_010", Some(&t2)).await,
        403
    );
    let list = get(&hub, &admin, "/api/admin/devices").await.json();
    assert!(device_row(&list, "ems_010")["revoked_ms"]
        .as_i64()
        .is_some());

    // Viewers: create (scoped and all), list, use, revoke.
    let r = post(
        &hub,
        &admin,
        "/api/admin/viewers",
        r#"{"name":"wall","devices":["ems_011"]}"#,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let wall = r.json()["token"].as_str().unwrap().to_string();
    assert!(wall.starts_with("emsv_"));
    let r = post(
        &hub,
        &admin,
        "/api/admin/viewers",
        r#"{"name":"all","all_devices":true}"#,
    )
    .await;
    assert_eq!(r.status, 201);
    assert_eq!(
        post(
            &hub,
            &admin,
            "/api/admin/viewers",
            r#"{"name":"wall","all_devices":true}"#
        )
        .await
        .status,
        409
    );
    assert_eq!(
        post(&hub, &admin, "/api/admin/viewers", r#"{"name":"x"}"#)
            .await
            .status,
        400
    );
    assert_eq!(
        post(
            &hub,
            &admin,
            "/api/admin/viewers",
            r#"{"name":"x","devices":["a"],"all_devices":true}"#
        )
        .await
        .status,
        400
    );
    let v = get(&hub, &admin, "/api/admin/viewers").await.json();
    let names: Vec<&str> = v["viewers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["all", "wall"]);
    assert_eq!(v["viewers"][1]["devices"][0], "ems_011");
    let t11 = post(
        &hub,
        &admin,
        "/api/admin/devices",
        r#"{"device_id":"ems_011"}"#,
    )
    .await
    .json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let _d11 = hub.device("ems_011", &t11).await;
    let mut dash = browser_dashboard(hub.addr, "ems_011", &wall, None).await;
    assert_eq!(next_json(&mut dash).await["online"], true);
    assert_eq!(get(&hub, &wall, "/api/devices").await.status, 200);
    let r = post(&hub, &admin, "/api/admin/viewers/wall/revoke", "{}").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(get(&hub, &wall, "/api/devices").await.status, 403);
    expect_close(&mut dash, 4001).await;
    assert_eq!(
        post(&hub, &admin, "/api/admin/viewers/nobody/revoke", "{}")
            .await
            .status,
        404
    );
    let v = get(&hub, &admin, "/api/admin/viewers").await.json();
    assert!(v["viewers"][1]["revoked_ms"].as_i64().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_kind_tokens_are_refused_everywhere() {
    let hub = TestHub::start().await;
    let admin = hub.admin().add_admin("ops").unwrap();
    let dev = hub.add_device("dev");
    let viewer = hub.add_viewer("v", &["dev"]);
    // Device and viewer tokens on the admin API: 403; none: 401.
    for t in [&dev, &viewer] {
        assert_eq!(get(&hub, t, "/api/admin/devices").await.status, 403);
        assert_eq!(
            post(&hub, t, "/api/admin/devices", r#"{"device_id":"x"}"#)
                .await
                .status,
            403
        );
        assert_eq!(
            post(&hub, t, "/api/admin/viewers/v/revoke", "{}")
                .await
                .status,
            403
        );
    }
    let r = http(hub.addr, "GET", "/api/admin/devices", &[], None).await;
    assert_eq!(r.status, 401);
    // A well-formed but unknown admin token: 403.
    let stranger = ems_hub::auth::token::generate(ems_hub::auth::token::TokenKind::Admin);
    assert_eq!(get(&hub, &stranger, "/api/admin/devices").await.status, 403);
    // The admin token on viewer endpoints and on both sockets: 403.
    assert_eq!(get(&hub, &admin, "/api/devices").await.status, 403);
    assert_eq!(
        refused_status(hub.addr, "/ws/device/dev", Some(&admin)).await,
        403
    );
    assert_eq!(
        refused_status(hub.addr, "/ws/dashboard/dev", Some(&admin)).await,
        403
    );
    // Nothing was created by the refused calls.
    let list = get(&hub, &admin, "/api/admin/devices").await.json();
    assert_eq!(list["devices"].as_array().unwrap().len(), 1);
}

#[test]
fn admin_add_prints_an_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("a.db").display());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ems-hub"))
        .args(["admin", "add", "ops"])
        .env("EMS_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(
        ems_hub::auth::token::kind_of(lines[0]),
        Some(ems_hub::auth::token::TokenKind::Admin)
    );
    let mut s = ems_hub::store::open(&url).unwrap();
    assert_eq!(
        s.admin_name(&ems_hub::auth::token::hash(lines[0]))
            .unwrap()
            .as_deref(),
        Some("ops")
    );
    // The same name twice is an error.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_ems-hub"))
        .args(["admin", "add", "ops"])
        .env("EMS_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(again.stdout.is_empty());
}
