//! `GET /api/fleet/energy` over HTTP: the scope, the auth and Origin
//! rules of the other viewer endpoints, parameter errors naming the
//! parameter, and the answer agreeing with the per-device energy endpoint.

use crate::harness::*;

const H: i64 = 3_600_000;

#[tokio::test]
async fn fleet_energy_answers_the_scope_and_agrees_with_the_device_endpoint() {
    let hub = TestHub::start().await;
    let t1 = hub.add_device("d1");
    hub.add_device("d2");
    hub.add_device("d3");
    let viewer = hub.add_viewer("wall", &["d1", "d2"]);
    let admin = hub.admin().add_admin("ops").unwrap();
    // 1 kW for two hours, three UTC days back, a reading every 5 minutes.
    let day = (now_ms() / (24 * H) - 3) * 24 * H;
    let mut dev = hub.device("d1", &t1).await;
    for i in 0..=24i64 {
        send_text(
            &mut dev,
            format!(
                r#"{{"type":"reading","epoch":1,"seq":{i},"ts_ms":{},"meter":"main","power_w":1000.0,"energy_wh":{}}}"#,
                day + H + i * 300_000,
                10_000.0 + i as f64 * 1000.0 / 12.0
            ),
        )
        .await;
    }
    wait_ack(&mut dev, 1, 24).await;

    let auth = bearer(&viewer);
    let get = |q: String, headers: Vec<(&'static str, String)>| {
        let addr = hub.addr;
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            http(addr, "GET", &q, &h, None).await
        }
    };
    // Any instant of the day stands for the whole local day.
    let q = format!(
        "/api/fleet/energy?from_ms={}&to_ms={}&tz=UTC",
        day + 5 * H,
        day + 6 * H
    );
    let r = get(q.clone(), vec![("Authorization", auth.clone())]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["tz"], "UTC");
    assert_eq!(
        (v["from_ms"].as_i64(), v["to_ms"].as_i64()),
        (Some(day), Some(day + 24 * H))
    );
    let devices = v["devices"].as_array().unwrap();
    let ids: Vec<&str> = devices
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["d1", "d2"]);
    let wh = devices[0]["energy_wh"].as_f64().unwrap();
    assert!((wh - 2000.0).abs() < 1e-6, "{wh}");
    let cov = devices[0]["coverage"].as_f64().unwrap();
    assert!((cov - 2.0 / 24.0).abs() < 1e-9, "{cov}");
    assert_eq!(
        (
            devices[1]["energy_wh"].as_f64(),
            devices[1]["coverage"].as_f64()
        ),
        (Some(0.0), Some(0.0))
    );
    // The same as the device's own endpoint.
    let one = get(
        format!(
            "/api/devices/d1/energy?from_ms={day}&to_ms={}&bucket=day&tz=UTC",
            day + 1
        ),
        vec![("Authorization", auth.clone())],
    )
    .await;
    let one: serde_json::Value = serde_json::from_str(&one.body).unwrap();
    assert_eq!(
        one["meters"][0]["buckets"][0]["energy_wh"].as_f64(),
        Some(wh)
    );

    // The rules of the other viewer endpoints.
    assert_eq!(get(q.clone(), vec![]).await.status, 401);
    assert_eq!(
        get(q.clone(), vec![("Authorization", bearer(&admin))])
            .await
            .status,
        403
    );
    assert_eq!(
        get(
            q.clone(),
            vec![
                ("Authorization", auth.clone()),
                ("Origin", "https://evil.example".into())
            ]
        )
        .await
        .status,
        403
    );
    for (query, name) in [
        ("from_ms=0&to_ms=1&tz=Mars%2FBase", "tz"),
        ("to_ms=1", "from_ms"),
        ("from_ms=0&to_ms=604800001", "to_ms"),
        ("from_ms=0&to_ms=1&bucket=day", "unknown query parameter"),
    ] {
        let r = get(
            format!("/api/fleet/energy?{query}"),
            vec![("Authorization", auth.clone())],
        )
        .await;
        assert_eq!(r.status, 400, "{query}");
        let e: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert!(
            e["error"].as_str().unwrap().starts_with(name),
            "{query}: {}",
            r.body
        );
    }
    let post = http(
        hub.addr,
        "POST",
        "/api/fleet/energy",
        &[("Authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(post.status, 405);
}
