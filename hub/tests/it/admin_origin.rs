//! The admin API's browser rule: a state-changing `POST` carrying a
//! foreign `Origin` is refused before the token is even looked at, and
//! changes nothing.

use crate::dashboard::{bearer, http};
use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_posts_with_a_foreign_origin_are_refused() {
    let hub = TestHub::start().await;
    let admin = hub.admin().add_admin("ops").unwrap();
    let dev = hub.add_device("dev-o");
    let auth = bearer(&admin);
    for origin in ["https://evil.example", "null"] {
        for (path, body) in [
            ("/api/admin/devices", r#"{"device_id":"evil_1"}"#),
            ("/api/admin/devices/dev-o/revoke", "{}"),
            ("/api/admin/devices/dev-o/rotate", "{}"),
            (
                "/api/admin/viewers",
                r#"{"name":"evil","all_devices":true}"#,
            ),
        ] {
            let r = http(
                hub.addr,
                "POST",
                path,
                &[("Authorization", &auth), ("Origin", origin)],
                Some(body),
            )
            .await;
            assert_eq!(r.status, 403, "{origin} {path}: {}", r.body);
            assert!(!r.body.contains("emsd_") && !r.body.contains("emsv_"));
        }
    }
    // Nothing changed: no new device or viewer, the device still connects
    // with its old token.
    let list = http(
        hub.addr,
        "GET",
        "/api/admin/devices",
        &[("Authorization", &auth)],
        None,
    )
    .await
    .json();
    assert_eq!(list["devices"].as_array().unwrap().len(), 1, "{list}");
    let viewers = http(
        hub.addr,
        "GET",
        "/api/admin/viewers",
        &[("Authorization", &auth)],
        None,
    )
    .await
    .json();
    assert!(viewers["viewers"].as_array().unwrap().is_empty());
    let mut ws = hub.device("dev-o", &dev).await;
    send_text(&mut ws, reading(1, 0)).await;
    wait_ack(&mut ws, 1, 0).await;
    // The hub's own origin is allowed.
    let own = format!("http://{}", hub.addr);
    let r = http(
        hub.addr,
        "POST",
        "/api/admin/devices",
        &[("Authorization", &auth), ("Origin", &own)],
        Some(r#"{"device_id":"ok_1"}"#),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
}
