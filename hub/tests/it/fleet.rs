//! Several hubs on one PostgreSQL database: the device lists agree on
//! every hub (shared device state), a hub that stops renewing its leases
//! loses its devices for everyone once the lease ends, a clean shutdown
//! marks its devices offline at once, and a device that connects to
//! another hub has its old socket closed with 4000 (cross-hub takeover).
//!
//! Two in-process hubs on the test's runtime. Every test skips (loudly)
//! without PostgreSQL, unless `EMS_REQUIRE_POSTGRES=1`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ems_hub::store::ViewerScope;
use ems_hub::Config;
use serde_json::Value;

use crate::harness::*;
use crate::pg_store::{fresh_db, with_admin};

/// Short presence intervals; `id` names the hub.
fn fast(id: &'static str) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.hub_id = Some(id.into());
        c.presence_tick = Duration::from_millis(100);
        c.presence_flush = Duration::from_millis(200);
        c.presence_renew = Duration::from_millis(500);
        c.revocation_poll = Duration::from_millis(200);
    }
}

/// `device`'s entry in `/api/devices` of the hub at `addr`.
async fn entry(addr: SocketAddr, viewer: &str, device: &str) -> Value {
    let r = http(
        addr,
        "GET",
        "/api/devices",
        &[("Authorization", &bearer(viewer))],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    v["devices"]
        .as_array()
        .and_then(|l| l.iter().find(|d| d["device_id"] == device).cloned())
        .unwrap_or_else(|| panic!("{device} not listed: {v}"))
}

/// Polls `device`'s entry on `addr` until `ok` holds (up to 20 s).
async fn wait_entry(
    addr: SocketAddr,
    viewer: &str,
    device: &str,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let e = entry(addr, viewer, device).await;
        if ok(&e) {
            return e;
        }
        assert!(Instant::now() < deadline, "{what}: still {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The fields every hub must answer alike (`behind_ms` grows with the
/// reader's clock and is left out).
fn shared_view(e: &Value) -> Value {
    let mut e = e.clone();
    if let Some(o) = e.as_object_mut() {
        o.remove("behind_ms");
    }
    e
}

/// A database with device `dev` and an all-devices viewer.
fn provision(url: &str) -> (String, String) {
    with_admin(url, |a| {
        (
            a.add_device("dev").unwrap(),
            a.add_viewer("all", ViewerScope::AllDevices).unwrap(),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_hubs_list_a_device_connected_to_one_of_them_alike() {
    let Some(db) = fresh_db() else { return };
    let (token, viewer) = provision(&db.url);
    let a = TestHub::start_on(&db.url, fast("hub-a")).await;
    let b = TestHub::start_on(&db.url, fast("hub-b")).await;
    let before = now_ms();
    let mut dev = a.device("dev", &token).await;
    send_text(&mut dev, reading(1, 0)).await;
    wait_ack(&mut dev, 1, 0).await;
    let oldest = now_ms() - 3_600_000;
    send_text(
        &mut dev,
        format!(
            r#"{{"type":"status","outbox_depth":5,"oldest_ts_ms":{oldest},"dropped":2,"unwritten":0,"dropped_disk_full":1,"dropped_damaged":0}}"#
        ),
    )
    .await;
    // Hub b learns everything from the shared state.
    let on_b = wait_entry(b.addr, &viewer, "dev", "dev on hub b", |e| {
        e["online"] == true && e["outbox_depth"] == 5 && !e["last"].as_array().unwrap().is_empty()
    })
    .await;
    assert_eq!(on_b["hub"], "hub-a", "{on_b}");
    assert!(
        on_b["online_since_ms"].as_i64().unwrap() >= before,
        "{on_b}"
    );
    assert_eq!(
        (on_b["dropped"].as_u64(), on_b["dropped_disk_full"].as_u64()),
        (Some(2), Some(1))
    );
    assert!(on_b["behind_ms"].as_i64().unwrap() >= 3_600_000, "{on_b}");
    let last = &on_b["last"][0];
    assert_eq!(last["meter"], "main");
    assert_eq!(last["power_w"], 960.5);
    assert_eq!(last["energy_wh"], 1523400.0);
    assert!(last["ts"].as_i64().unwrap() >= before);
    // And both hubs answer alike.
    let on_a = entry(a.addr, &viewer, "dev").await;
    assert_eq!(shared_view(&on_a), shared_view(&on_b));
    // A disconnect reaches hub b too.
    dev.close(None).await.unwrap();
    let gone = wait_entry(b.addr, &viewer, "dev", "dev offline on hub b", |e| {
        e["online"] == false
    })
    .await;
    assert!(
        gone["hub"].is_null() && gone["online_since_ms"].is_null(),
        "{gone}"
    );
    assert!(gone["outbox_depth"].is_null(), "{gone}");
    assert_eq!(gone["last"][0]["meter"], "main", "the last readings stay");
    let on_a = wait_entry(a.addr, &viewer, "dev", "dev offline on hub a", |e| {
        e["online"] == false
    })
    .await;
    assert_eq!(shared_view(&on_a), shared_view(&gone));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_that_stops_renewing_loses_its_devices_when_the_lease_ends() {
    let Some(db) = fresh_db() else { return };
    let (token, viewer) = provision(&db.url);
    // Hub a writes the connect with a 2 s lease and never renews it: as a
    // hub that died (its socket stays open, nobody hears of it).
    let a = TestHub::start_on(&db.url, |c| {
        fast("hub-a")(c);
        c.presence_lease = Duration::from_secs(2);
        c.presence_renew = Duration::from_secs(3600);
    })
    .await;
    let b = TestHub::start_on(&db.url, fast("hub-b")).await;
    let mut dev = a.device("dev", &token).await;
    send_text(&mut dev, reading(1, 0)).await;
    wait_ack(&mut dev, 1, 0).await;
    let seen_online = wait_entry(b.addr, &viewer, "dev", "dev online on hub b", |e| {
        e["online"] == true
    })
    .await;
    let since = seen_online["online_since_ms"].as_i64().unwrap();
    let off = wait_entry(
        b.addr,
        &viewer,
        "dev",
        "dev offline once the lease ended",
        |e| e["online"] == false,
    )
    .await;
    assert!(
        now_ms() >= since + 2_000,
        "offline before the lease ended: {off}"
    );
    assert!(off["last_seen_ms"].as_i64().unwrap() >= since, "{off}");
    // Hub b's own renewals keep its devices online past the same lease.
    let b2 = TestHub::start_on(&db.url, |c| {
        fast("hub-b2")(c);
        c.presence_lease = Duration::from_secs(2);
    })
    .await;
    drop(dev);
    let mut dev = b2.device("dev", &token).await;
    send_text(&mut dev, reading(2, 0)).await;
    wait_ack(&mut dev, 2, 0).await;
    wait_entry(b.addr, &viewer, "dev", "dev online via hub b2", |e| {
        e["online"] == true && e["hub"] == "hub-b2"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let e = entry(b.addr, &viewer, "dev").await;
    assert_eq!(e["online"], true, "renewed leases keep it online: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_marks_its_devices_offline_for_every_hub() {
    let Some(db) = fresh_db() else { return };
    let (token, viewer) = provision(&db.url);
    // A lease far longer than the test: only the shutdown can explain
    // "offline".
    let mut a = TestHub::start_on(&db.url, |c| {
        fast("hub-a")(c);
        c.presence_lease = Duration::from_secs(3600);
    })
    .await;
    let b = TestHub::start_on(&db.url, fast("hub-b")).await;
    let mut dev = a.device("dev", &token).await;
    send_text(&mut dev, reading(1, 0)).await;
    wait_ack(&mut dev, 1, 0).await;
    wait_entry(b.addr, &viewer, "dev", "dev online on hub b", |e| {
        e["online"] == true
    })
    .await;
    let stop = tokio::spawn(async move { a.stop().await });
    expect_close(&mut dev, 1001).await;
    stop.await.unwrap().unwrap();
    let e = entry(b.addr, &viewer, "dev").await;
    assert_eq!(
        e["online"], false,
        "marked offline before the hub stopped: {e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_connecting_to_another_hub_closes_its_old_socket_with_4000() {
    let Some(db) = fresh_db() else { return };
    let (token, viewer) = provision(&db.url);
    // Half the default tick: the bound below keeps a margin on a loaded
    // machine (with the default 1 s tick the close comes within ~1.1 s).
    let tweak = |id: &'static str| {
        move |c: &mut Config| {
            fast(id)(c);
            c.presence_tick = Duration::from_millis(500);
        }
    };
    let a = TestHub::start_on(&db.url, tweak("hub-a")).await;
    let b = TestHub::start_on(&db.url, tweak("hub-b")).await;
    let mut old = a.device("dev", &token).await;
    send_text(&mut old, reading(1, 0)).await;
    wait_ack(&mut old, 1, 0).await;
    // Hub a's connect is written (hub b lists it) before the device moves.
    wait_entry(b.addr, &viewer, "dev", "dev on hub a", |e| {
        e["hub"] == "hub-a"
    })
    .await;
    let t = Instant::now();
    let mut new = b.device("dev", &token).await;
    let reason = expect_close(&mut old, 4000).await;
    let took = t.elapsed();
    println!("cross-hub takeover closed the old socket after {took:?}");
    assert_eq!(reason, "replaced");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // The new connection is untouched and both hubs list it on hub b.
    send_text(&mut new, reading(2, 0)).await;
    wait_ack(&mut new, 2, 0).await;
    for hub in [a.addr, b.addr] {
        wait_entry(hub, &viewer, "dev", "dev on hub b", |e| {
            e["online"] == true && e["hub"] == "hub-b"
        })
        .await;
    }
}
