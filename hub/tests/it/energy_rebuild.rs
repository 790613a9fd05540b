//! The energy-slot rebuild at hub start on PostgreSQL: it runs on the
//! writer's connection while the hub already serves — the device list and
//! device handshakes answer at once, the energy endpoint says the slots
//! are being rebuilt rather than answer from incomplete ones — and once it
//! is done readings are acknowledged and the energy answers are exact.
//!
//! Skips (loudly) without PostgreSQL, unless `EMS_REQUIRE_POSTGRES=1`.

use std::time::{Duration, Instant};

use ems_hub::store::ViewerScope;
use ems_hub::Config;

use crate::dashboard::{bearer, http};
use crate::gate::{Gate, Mode, RunningHub};
use crate::harness::*;
use crate::pg_store::{execute, fresh_db, hold_in_transaction, hub_device, port_of, with_admin};

/// Devices with stored readings that need slots.
const DEVICES: usize = 1000;

/// Far more than any answer below should take over the 5 ms link, far
/// less than the rebuild waits for the lock held by the test.
const PROMPT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_rebuild_blocks_neither_the_listing_nor_handshakes() {
    let Some(db) = fresh_db() else { return };
    let Some(cluster_port) = port_of(&db.url) else {
        return;
    };
    let (viewer, live) = with_admin(&db.url, |admin| {
        (
            admin.add_viewer("all", ViewerScope::AllDevices).unwrap(),
            admin.add_device("live").unwrap(),
        )
    });
    // 1,000 devices with four energy readings each, one minute apart
    // (100 Wh apart): 300 Wh per device. Stored without slots, with slots
    // marked as built for other limits: the hub must rebuild them.
    let t0 = 1_700_000_040_000_i64 - 1_700_000_040_000_i64 % 86_400_000;
    execute(
        &db.url,
        &format!(
            "INSERT INTO devices (device_id, token_hash, created_ms) \
             SELECT 'dev-' || i, sha256(('t' || i)::bytea), 0 FROM generate_series(1, {DEVICES}) i; \
             INSERT INTO readings (device_id, meter, ts, received_at, epoch, seq, energy_wh) \
             SELECT 'dev-' || i, 'main', to_timestamp(({t0} + k * 60000) / 1000.0), now(), 1, k, \
               100.0 * k \
             FROM generate_series(1, {DEVICES}) i, generate_series(0, 3) k; \
             INSERT INTO energy_limits (max_power_w, max_gap_ms) VALUES (1000000.0, 1);"
        ),
    );
    // The rebuild waits for this lock until the test lets go.
    let hold = hold_in_transaction(&db.url, "SELECT * FROM energy_limits FOR UPDATE");
    let gate = Gate::start(Some(cluster_port), Mode::Forward).await;
    gate.set_delay(Duration::from_millis(5));
    let hub = RunningHub::start(Config::new(gate.url(&db.name))).await;
    let get = |path: String| {
        let viewer = viewer.clone();
        let addr = hub.addr;
        async move {
            let t = Instant::now();
            let r = tokio::time::timeout(
                PROMPT,
                http(
                    addr,
                    "GET",
                    &path,
                    &[("Authorization", &bearer(&viewer))],
                    None,
                ),
            )
            .await;
            (r, t.elapsed())
        }
    };
    let (r, took) = get("/api/devices".into()).await;
    let r = r.unwrap_or_else(|_| panic!("/api/devices did not answer within {PROMPT:?}"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["devices"].as_array().unwrap().len(), DEVICES + 1);
    println!("devices listed in {took:?} while the rebuild waits");
    let mut dev = tokio::time::timeout(PROMPT, hub_device(hub.addr, "live", &live))
        .await
        .expect("the device handshake waited for the rebuild");
    send_text(&mut dev, reading(1, 0)).await;
    let energy = format!(
        "/api/devices/dev-7/energy?from_ms={t0}&to_ms={}&bucket=day&tz=UTC",
        t0 + 86_400_000
    );
    let (r, _) = get(energy.clone()).await;
    let r = r.expect("the energy endpoint waited for the rebuild");
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("being rebuilt"), "{}", r.body);
    assert!(r.header("retry-after").is_some());

    // Let the rebuild run: the reading is acknowledged once it is done,
    // and the energy answers come from complete slots.
    drop(hold);
    tokio::time::timeout(Duration::from_secs(120), wait_ack(&mut dev, 1, 0))
        .await
        .expect("no ack after the rebuild");
    let deadline = Instant::now() + Duration::from_secs(60);
    let v = loop {
        let (r, _) = get(energy.clone()).await;
        let r = r.expect("energy endpoint");
        if r.status == 200 {
            break r.json();
        }
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(Instant::now() < deadline, "still rebuilding: {}", r.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let day = &v["meters"][0]["buckets"][0];
    assert!(
        (day["energy_wh"].as_f64().unwrap() - 300.0).abs() < 1e-9,
        "{v}"
    );
    let slots = crate::pg_store::query_i64(&db.url, "SELECT count(*) FROM energy_slots");
    assert_eq!(slots as usize, DEVICES + 1, "one slot per device");
}
