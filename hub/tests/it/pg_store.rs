//! The hub on PostgreSQL when the database is slow, locked, unreachable or
//! not there yet: authentication never waits behind other store work and
//! fails fast, dashboards close when their token cannot be confirmed, the
//! hub starts before its database, viewer queries are bounded, and the
//! revocation poll reads one integer while nothing changes.
//!
//! Every test skips (loudly) without PostgreSQL, unless
//! `EMS_REQUIRE_POSTGRES=1`.

use std::time::{Duration, Instant};

use ems_hub::admin::Admin;
use ems_hub::auth::token::{self, TokenKind};
use ems_hub::store::ViewerScope;
use ems_hub::Config;

use crate::dashboard::{bearer, http};
use crate::gate::{Gate, Mode, RunningHub};
use crate::harness::*;
use crate::probe::{closed_with, exchange, get, upgrade};
use ems_testkit::pg;

fn auth(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

/// A configuration on `url` with short polls.
fn config(url: &str) -> Config {
    let mut c = Config::new(url);
    c.revocation_poll = Duration::from_millis(200);
    c.viewer_recheck = Duration::from_millis(200);
    c
}

/// Runs blocking SQL on `url` in a thread of its own, holding the
/// transaction (and its locks) until the returned sender is dropped.
pub(crate) fn hold_in_transaction(url: &str, sql: &'static str) -> std::sync::mpsc::Sender<()> {
    let url = url.to_string();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let mut t = c.transaction().unwrap();
        t.batch_execute(sql).unwrap();
        let _ = ready_tx.send(());
        let _ = rx.recv();
        let _ = t.rollback();
    });
    ready_rx.recv().unwrap();
    tx
}

/// Runs blocking database work (the sync clients own a runtime of their
/// own, which must not start or end on an async worker).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A fresh database, dropped off the async workers.
pub(crate) struct Db(Option<pg::TestDb>);

impl std::ops::Deref for Db {
    type Target = pg::TestDb;
    fn deref(&self) -> &pg::TestDb {
        self.0.as_ref().expect("dropped")
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            blocking(move || drop(d));
        }
    }
}

pub(crate) fn fresh_db() -> Option<Db> {
    blocking(pg::fresh_db).map(|d| Db(Some(d)))
}

/// One statement's first column of its one row, on a connection of its own.
pub(crate) fn query_i64(url: &str, sql: &str) -> i64 {
    blocking(|| {
        let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
        c.query_one(sql, &[]).unwrap().get(0)
    })
}

/// Runs `sql` on a connection of its own.
pub(crate) fn execute(url: &str, sql: &str) {
    blocking(|| {
        let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
        c.batch_execute(sql).unwrap();
    })
}

/// The admin commands on `url`, off the async workers.
pub(crate) fn with_admin<T>(url: &str, f: impl FnOnce(&mut Admin) -> T) -> T {
    blocking(|| {
        let mut a = Admin::open(url).unwrap();
        f(&mut a)
    })
}

/// Index and sequential scans of `table` so far (the statistics reach the
/// view up to about a second late).
fn scans(url: &str, table: &str) -> i64 {
    query_i64(
        url,
        &format!(
            "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables \
             WHERE relname = '{table}'"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_do_not_wait_behind_a_viewer_query() {
    let Some(db) = fresh_db() else { return };
    let (a, b, viewer) = with_admin(&db.url, |admin| {
        (
            admin.add_device("dev-a").unwrap(),
            admin.add_device("dev-b").unwrap(),
            admin
                .add_viewer("v", ViewerScope::Devices(vec!["dev-a".into()]))
                .unwrap(),
        )
    });
    let hub = RunningHub::start(config(&db.url)).await;
    let mut dev = hub_device(hub.addr, "dev-a", &a).await;
    send_text(&mut dev, reading(1, 0)).await;
    wait_ack(&mut dev, 1, 0).await;
    // A history query that cannot finish: its table is locked.
    let lock = hold_in_transaction(&db.url, "LOCK TABLE readings IN ACCESS EXCLUSIVE MODE");
    let addr = hub.addr;
    let stuck = tokio::spawn(async move {
        http(
            addr,
            "GET",
            "/api/devices/dev-a/readings",
            &[("Authorization", &bearer(&viewer))],
            None,
        )
        .await
        .status
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A real device and a forged (well-formed, unknown) token are answered
    // at once all the same.
    let t = Instant::now();
    let r = exchange(
        hub.addr,
        &upgrade("/ws/device/dev-b", &auth(&b)),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        r.map(|r| r.status),
        Some(101),
        "known device waited behind the store"
    );
    let forged = token::generate(TokenKind::Device);
    let r = exchange(
        hub.addr,
        &upgrade("/ws/device/dev-b", &auth(&forged)),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        r.map(|r| r.status),
        Some(403),
        "forged token waited behind the store"
    );
    println!(
        "both handshakes answered in {:?} while the store was busy",
        t.elapsed()
    );
    drop(lock);
    assert_eq!(
        tokio::time::timeout(SOON, stuck).await.unwrap().unwrap(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_fail_fast_while_the_database_does_not_answer() {
    let Some(db) = fresh_db() else { return };
    let Some(cluster_port) = port_of(&db.url) else {
        return;
    };
    let gate = Gate::start(Some(cluster_port), Mode::Forward).await;
    let url = gate.url(&db.name);
    let a = with_admin(&url, |admin| admin.add_device("dev-a").unwrap());
    let mut c = config(&url);
    // Far longer than the answers may take.
    c.pg.connect_timeout = Duration::from_secs(60);
    let hub = RunningHub::start(c).await;
    let mut dev = hub_device(hub.addr, "dev-a", &a).await;
    send_text(&mut dev, reading(1, 0)).await;
    wait_ack(&mut dev, 1, 0).await;
    // The database stops answering (connections are accepted and hang).
    gate.set_mode(Mode::Blackhole);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        let forged = token::generate(TokenKind::Device);
        let t = Instant::now();
        let r = exchange(
            hub.addr,
            &upgrade("/ws/device/dev-a", &auth(&forged)),
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|| panic!("forged handshake {i} got no answer within 5 s"));
        assert!(matches!(r.status, 403 | 503), "{r:?}");
        println!("forged handshake {i}: {} after {:?}", r.status, t.elapsed());
        let r = exchange(
            hub.addr,
            &upgrade("/ws/device/dev-a", &auth(&a)),
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|| panic!("device handshake {i} got no answer within 5 s"));
        assert!(matches!(r.status, 101 | 503), "{r:?}");
    }
    gate.set_mode(Mode::Forward);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_close_when_the_store_cannot_confirm_their_token() {
    let Some(db) = fresh_db() else { return };
    let Some(cluster_port) = port_of(&db.url) else {
        return;
    };
    let gate = Gate::start(Some(cluster_port), Mode::Forward).await;
    let url = gate.url(&db.name);
    let viewer = with_admin(&url, |admin| {
        admin.add_device("dev-a").unwrap();
        admin
            .add_viewer("v", ViewerScope::Devices(vec!["dev-a".into()]))
            .unwrap()
    });
    let mut c = config(&url);
    c.auth_grace = Duration::from_secs(2);
    let hub = RunningHub::start(c).await;
    let mut dash = crate::harness::connect(hub.addr, "/ws/dashboard/dev-a", Some(&viewer))
        .await
        .unwrap();
    assert_eq!(next_json(&mut dash).await["type"], "status");
    // The database goes away for good.
    gate.set_mode(Mode::Refuse);
    let t = Instant::now();
    assert_eq!(closed_with(&mut dash).await, Some(4001));
    println!(
        "dashboard closed with 4001 {:?} after the store went away",
        t.elapsed()
    );
    let r = exchange(
        hub.addr,
        &upgrade("/ws/dashboard/dev-a", &auth(&viewer)),
        SOON,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.header("retry-after").is_some(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_starts_before_its_database_and_rides_out_an_outage() {
    if pg::bin_dir().is_none() {
        let _: Option<()> = pg::unavailable("the PostgreSQL server binaries are missing");
        return;
    }
    let delay: u64 = std::env::var("EMS_TEST_PG_START_DELAY_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let gate = Gate::start(None, Mode::Refuse).await;
    let url = gate.url("postgres");
    let hub = RunningHub::start(config(&url)).await;
    let started = Instant::now();
    // Up without its database: not ready, device handshakes 503 + Retry-After.
    let r = exchange(hub.addr, &get("/readyz", ""), SOON)
        .await
        .expect("the hub does not answer without its database");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("store"), "{r:?}");
    let anyone = token::generate(TokenKind::Device);
    let r = exchange(hub.addr, &upgrade("/ws/device/dev-a", &auth(&anyone)), SOON)
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{r:?}");
    // The database starts `delay` seconds later.
    let cluster = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_secs(delay));
        pg::Cluster::start(pg::ClusterOptions {
            fsync: false,
            tls: false,
        })
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("late cluster did not start: {e}"));
    gate.set_upstream(cluster.port);
    gate.set_mode(Mode::Forward);
    println!("database up {:?} after the hub", started.elapsed());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = exchange(hub.addr, &get("/readyz", ""), SOON).await;
        if r.as_ref().is_some_and(|r| r.status == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (t1, t2) = with_admin(&url, |admin| {
        (
            admin.add_device("dev-a").unwrap(),
            admin.add_device("dev-b").unwrap(),
        )
    });
    let mut dev = hub_device(hub.addr, "dev-a", &t1).await;
    send_text(&mut dev, reading(1, 0)).await;
    wait_ack(&mut dev, 1, 0).await;
    // The database goes away: acks pause, new devices are told to come
    // back later, nothing is lost.
    gate.set_mode(Mode::Refuse);
    for seq in 1..=5 {
        send_text(&mut dev, reading(1, seq)).await;
    }
    let deadline = Instant::now() + SOON;
    loop {
        let r = exchange(hub.addr, &get("/readyz", ""), SOON).await.unwrap();
        if r.status == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "still ready without a database");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = exchange(hub.addr, &upgrade("/ws/device/dev-b", &auth(&t2)), SOON)
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.header("retry-after").is_some());
    gate.set_mode(Mode::Forward);
    wait_ack(&mut dev, 1, 5).await;
    let n = query_i64(
        &cluster.admin_url,
        "SELECT count(*) FROM readings WHERE device_id = 'dev-a'",
    );
    assert_eq!(n, 6);
    let deadline = Instant::now() + SOON;
    loop {
        if connect(hub.addr, "/ws/device/dev-b", Some(&t2))
            .await
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "dev-b never admitted again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_revocation_poll_reads_one_integer_while_nothing_changes() {
    let Some(db) = fresh_db() else { return };
    let tokens: Vec<String> = with_admin(&db.url, |admin| {
        (0..20)
            .map(|i| admin.add_device(&format!("dev-{i}")).unwrap())
            .collect()
    });
    let mut c = config(&db.url);
    c.revocation_poll = Duration::from_millis(50);
    let hub = RunningHub::start(c).await;
    let mut dev = hub_device(hub.addr, "dev-0", &tokens[0]).await;
    send_text(&mut dev, reading(1, 0)).await;
    wait_ack(&mut dev, 1, 0).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = scans(&db.url, "devices");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = scans(&db.url, "devices");
    println!(
        "devices scanned {} times in 3 s of 50 ms polls",
        after - before
    );
    assert!(
        after - before <= 2,
        "the poll read the devices table {} times",
        after - before
    );
    // A change is still seen.
    with_admin(&db.url, |admin| admin.revoke_device("dev-0").unwrap());
    assert_eq!(closed_with(&mut dev).await, Some(4001));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_devices_costs_a_constant_number_of_round_trips() {
    let Some(db) = fresh_db() else { return };
    let Some(cluster_port) = port_of(&db.url) else {
        return;
    };
    // More devices than the store's whole-table threshold: the list is
    // read in one statement without naming each id.
    let n = 1200;
    let viewer = with_admin(&db.url, |admin| {
        admin.add_viewer("all", ViewerScope::AllDevices).unwrap()
    });
    execute(
        &db.url,
        &format!(
            "INSERT INTO devices (device_id, token_hash, created_ms) \
             SELECT 'dev-' || i, sha256(('t' || i)::bytea), 0 FROM generate_series(1, {n}) i; \
             INSERT INTO readings (device_id, meter, ts, received_at, epoch, seq, power_w) \
             SELECT 'dev-' || i, 'main', now(), now(), 1, 0, 1.0 FROM generate_series(1, {n}) i"
        ),
    );
    // Every round trip to the database costs 5 ms more.
    let gate = Gate::start(Some(cluster_port), Mode::Forward).await;
    gate.set_delay(Duration::from_millis(5));
    let hub = RunningHub::start(config(&gate.url(&db.name))).await;
    let list = |hub_addr| {
        let viewer = viewer.clone();
        async move {
            let t = Instant::now();
            let r = http(
                hub_addr,
                "GET",
                "/api/devices",
                &[("Authorization", &bearer(&viewer))],
                None,
            )
            .await;
            (r, t.elapsed())
        }
    };
    let (r, _) = list(hub.addr).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (r, took) = list(hub.addr).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let devices = v["devices"].as_array().unwrap();
    assert_eq!(devices.len(), n);
    assert!(devices.iter().all(|d| d["last_seen_ms"].is_i64()), "{v}");
    println!("{n} devices listed in {took:?} with 5 ms per round trip");
    assert!(
        took < Duration::from_secs(2),
        "{n} devices took {took:?}: about one round trip per device"
    );
    // The same with every device in the shared device state, online on
    // another hub: still a constant number of round trips, and the state
    // comes from that table. One more row belongs to a device that is not
    // in the device table: it is not listed.
    let until = now_ms() + 3_600_000;
    execute(
        &db.url,
        &format!(
            "INSERT INTO device_state (device_id, online, hub, online_since_ms, lease_until_ms, \
               generation, last_seen_ms, status_rx_ms, outbox_depth, behind_ms, dropped, \
               unwritten, dropped_disk_full, dropped_damaged, last_readings) \
             SELECT 'dev-' || i, true, 'elsewhere', 1, {until}, i, 2, 2, 3, 0, 0, 0, 0, 0, \
               '[{{\"meter\":\"main\",\"ts\":1,\"power_w\":5.0,\"energy_wh\":null}}]' \
             FROM generate_series(1, {n} + 1) i"
        ),
    );
    let (r, took) = list(hub.addr).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let devices = v["devices"].as_array().unwrap();
    assert_eq!(devices.len(), n);
    assert!(
        devices.iter().all(|d| d["online"] == true
            && d["hub"] == "elsewhere"
            && d["outbox_depth"] == 3
            && d["last"][0]["power_w"] == 5.0),
        "{v}"
    );
    println!("{n} devices with state listed in {took:?} with 5 ms per round trip");
    assert!(
        took < Duration::from_secs(2),
        "{n} devices with state took {took:?}: about one round trip per device"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_queries_run_one_at_a_time_per_viewer_token() {
    let Some(db) = fresh_db() else { return };
    let Some(cluster_port) = port_of(&db.url) else {
        return;
    };
    let (greedy, other) = with_admin(&db.url, |admin| {
        admin.add_device("dev-a").unwrap();
        let scope = || ViewerScope::Devices(vec!["dev-a".into()]);
        (
            admin.add_viewer("greedy", scope()).unwrap(),
            admin.add_viewer("other", scope()).unwrap(),
        )
    });
    let gate = Gate::start(Some(cluster_port), Mode::Forward).await;
    gate.set_delay(Duration::from_millis(100));
    let hub = RunningHub::start(config(&gate.url(&db.name))).await;
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let (addr, t) = (hub.addr, greedy.clone());
        tasks.push(tokio::spawn(async move {
            let r = http(
                addr,
                "GET",
                "/api/devices/dev-a/readings",
                &[("Authorization", &bearer(&t))],
                None,
            )
            .await;
            (r.status, r.header("retry-after"))
        }));
    }
    let r = http(
        hub.addr,
        "GET",
        "/api/devices",
        &[("Authorization", &bearer(&other))],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut ok = 0;
    let mut busy = 0;
    for t in tasks {
        match t.await.unwrap() {
            (200, _) => ok += 1,
            (429, Some(_)) => busy += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    println!("greedy token: {ok} answered, {busy} told to retry");
    assert!(
        busy >= 1,
        "12 concurrent heavy queries of one token all ran"
    );
    assert!(ok >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resuming_dashboard_waits_for_the_store_without_hammering_it() {
    let Some(db) = fresh_db() else { return };
    let (t, viewer) = with_admin(&db.url, |admin| {
        (
            admin.add_device("dev-a").unwrap(),
            admin
                .add_viewer("v", ViewerScope::Devices(vec!["dev-a".into()]))
                .unwrap(),
        )
    });
    let hub = RunningHub::start(config(&db.url)).await;
    let mut dev = hub_device(hub.addr, "dev-a", &t).await;
    send_text(&mut dev, reading(1, 0)).await;
    wait_ack(&mut dev, 1, 0).await;
    // Commits stall (reads go on): the live readings are not in the store.
    let lock = hold_in_transaction(&db.url, "LOCK TABLE readings IN EXCLUSIVE MODE");
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sender = tokio::spawn(async move {
        let mut seq = 1;
        loop {
            send_text(&mut dev, reading(1, seq)).await;
            seq += 1;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = &mut stop_rx => return (dev, seq - 1),
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let since = now_ms() - 60_000;
    let mut dash =
        crate::dashboard::browser_dashboard(hub.addr, "dev-a", &viewer, Some(since)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = scans(&db.url, "readings");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = scans(&db.url, "readings");
    println!(
        "readings scanned {} times in 5 s of a resume wait",
        after - before
    );
    drop(lock);
    let _ = stop_tx.send(());
    let (mut dev, last) = sender.await.unwrap();
    wait_ack(&mut dev, 1, last).await;
    // The replay still ends and the live feed follows.
    loop {
        let v = next_json(&mut dash).await;
        if v["type"] == "replay_end" {
            break;
        }
    }
    assert!(
        after - before <= 30,
        "the resume wait read the readings table {} times in 5 s",
        after - before
    );
}

/// A device socket (the harness's `connect` without a `TestHub`).
pub(crate) async fn hub_device(addr: std::net::SocketAddr, id: &str, token: &str) -> Client {
    connect(addr, &format!("/ws/device/{id}"), Some(token))
        .await
        .unwrap_or_else(|e| panic!("device {id} could not connect: {e}"))
}

/// The port of a `postgres://…@127.0.0.1:PORT/…` URL (the private
/// cluster); `None` (skip) for an external server the gate cannot front.
pub(crate) fn port_of(url: &str) -> Option<u16> {
    let rest = url.split("@127.0.0.1:").nth(1)?;
    rest.split('/').next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_database_gets_the_change_counter_in_place() {
    let Some(db) = fresh_db() else { return };
    // A database as version 1 left it: today's schema without migrations
    // 2 (the quarantine table), 3 (the change counter's table, function
    // and triggers), 4 (the energy column and tables) and 5 (the device
    // state), with a device in it.
    with_admin(&db.url, |admin| admin.add_device("old").unwrap());
    execute(
        &db.url,
        "DROP TABLE quarantine;
         DROP FUNCTION ems_token_changed() CASCADE;
         DROP TABLE token_changes;
         ALTER TABLE readings DROP COLUMN flags;
         DROP TABLE energy_slots, energy_meters, energy_limits;
         DROP TABLE device_state;
         UPDATE schema_version SET version = 1;",
    );
    assert_eq!(
        query_i64(&db.url, "SELECT max(version)::bigint FROM schema_version"),
        1
    );
    // Opening it migrates it; the counter moves with every token change,
    // and the hub serves the old device.
    with_admin(&db.url, |admin| admin.add_device("new").unwrap());
    assert_eq!(
        query_i64(&db.url, "SELECT max(version)::bigint FROM schema_version"),
        i64::from(ems_hub::store::postgres::SCHEMA_VERSION)
    );
    assert_eq!(ems_hub::store::postgres::SCHEMA_VERSION, 5);
    assert_eq!(query_i64(&db.url, "SELECT count(*) FROM quarantine"), 0);
    assert_eq!(query_i64(&db.url, "SELECT count(*) FROM device_state"), 0);
    let n0 = query_i64(&db.url, "SELECT n FROM token_changes");
    let token = with_admin(&db.url, |admin| admin.rotate_device("old").unwrap());
    assert!(query_i64(&db.url, "SELECT n FROM token_changes") > n0);
    let mut hub = RunningHub::start(config(&db.url)).await;
    let mut dev = hub_device(hub.addr, "old", &token).await;
    send_text(&mut dev, reading(1, 0)).await;
    wait_ack(&mut dev, 1, 0).await;
    hub.stop().await.unwrap();
    // The hub kept the device's state in the new table.
    assert_eq!(
        query_i64(
            &db.url,
            "SELECT count(*) FROM device_state WHERE device_id = 'old' AND NOT online"
        ),
        1
    );
}
