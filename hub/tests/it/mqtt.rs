//! The MQTT bridge (`ems_hub::mqtt`) against a real Mosquitto, through the
//! module's public interface only.
//!
//! Each test starts its own broker (`crate::mosquitto`: `/usr/sbin/mosquitto`,
//! or `EMS_MOSQUITTO`) and watches it with its own MQTT client.
//!
//! The Home Assistant field table is written out again here, independently
//! of `src/`, so a wrong constant there is caught.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use ems_hub::mqtt::{BrokerUrl, MqttBridge, MqttConfig, MqttHandle, Secret};
use ems_shared::Reading;
use ems_testkit::fixtures::{free_port, now_ms};
use sha2::{Digest, Sha256};

use crate::mosquitto::{retained, Broker, BrokerOptions, Msg, Watcher};

// ---------------------------------------------------------------------------
// The table (Home Assistant sensor device classes, units, state classes).

/// (measurement key, device_class, unit, state_class)
const TABLE: [(&str, &str, Option<&str>, &str); 7] = [
    ("energy_wh", "energy", Some("Wh"), "total_increasing"),
    ("power_w", "power", Some("W"), "measurement"),
    ("voltage_v", "voltage", Some("V"), "measurement"),
    ("current_a", "current", Some("A"), "measurement"),
    ("frequency_hz", "frequency", Some("Hz"), "measurement"),
    ("power_factor", "power_factor", None, "measurement"),
    (
        "reactive_power_var",
        "reactive_power",
        Some("var"),
        "measurement",
    ),
];

// ---------------------------------------------------------------------------
// Log capture: every line the bridge (or rumqttc) logs, through the test
// process's one logger.

fn capture_logs() {
    ems_testkit::logs::capture(&["ems_hub", "rumqttc"]);
}

fn log_lines() -> Vec<String> {
    ems_testkit::logs::lines()
}

/// A private broker, with this file's log capture on.
fn start_broker(opts: BrokerOptions) -> Option<Broker> {
    capture_logs();
    Broker::start(opts)
}

// ---------------------------------------------------------------------------
// Helpers.

fn config(broker: &Broker) -> MqttConfig {
    let mut c = MqttConfig::new(BrokerUrl::parse(&broker.url()).expect("url"));
    c.interval = Duration::from_millis(300);
    c.keep_alive = Duration::from_secs(1);
    c.sw_version = "9.8.7".into();
    c.public_url = Some("https://ems.example.com".into());
    c
}

/// A reading of `meter` at `ts_ms` with every measurement, derived from `x`.
fn full_reading(meter: &str, ts_ms: i64, x: f64) -> Reading {
    serde_json::from_value(serde_json::json!({
        "type": "reading", "epoch": 1, "seq": 0, "ts_ms": ts_ms, "meter": meter,
        "energy_wh": 1000.0 + x, "power_w": 250.5 + x, "voltage_v": 230.1,
        "current_a": 1.25, "frequency_hz": 50.02, "power_factor": 0.97,
        "reactive_power_var": -12.5,
    }))
    .expect("reading")
}

fn energy_reading(meter: &str, ts_ms: i64, energy: f64) -> Reading {
    serde_json::from_value(serde_json::json!({
        "type": "reading", "epoch": 1, "seq": 0, "ts_ms": ts_ms, "meter": meter,
        "energy_wh": energy,
    }))
    .expect("reading")
}

/// The object id the bridge must use, computed independently.
fn object_id(device: &str, meter: &str, key: &str) -> String {
    let h = Sha256::digest(format!("{device}/{meter}").as_bytes());
    let dev: String = device
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{dev}_{meter}_{key}_{}", hex(&h[..4]))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn config_topic(device: &str, meter: &str, key: &str) -> String {
    format!(
        "homeassistant/sensor/ems/{}/config",
        object_id(device, meter, key)
    )
}

fn states<'m>(msgs: &'m [Msg], topic: &str) -> Vec<&'m Msg> {
    msgs.iter().filter(|m| m.topic == topic).collect()
}

async fn wait_stats(
    h: &MqttHandle,
    what: &str,
    limit: Duration,
    f: impl Fn(&ems_hub::mqtt::MqttStats) -> bool,
) {
    let deadline = Instant::now() + limit;
    loop {
        let s = h.stats();
        if f(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const LONG: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_configs_match_the_table_and_are_retained() {
    let Some(broker) = start_broker(BrokerOptions::default()) else {
        return;
    };
    let live = Watcher::start(&broker, &["homeassistant/#", "ems/#"]);
    live.wait_synced().await;
    let (h, task) = MqttBridge::spawn(config(&broker)).expect("spawn");
    h.presence("pi.kitchen", true);
    let ts = now_ms();
    let r = full_reading("main", ts, 0.0);
    h.reading("pi.kitchen", &r);

    let state_topic = "ems/pi.kitchen/main/state";
    let state = live
        .wait_for("the state", LONG, |m| {
            states(m, state_topic).first().map(|x| x.json())
        })
        .await;
    // Values equal the reading's, exactly; `ts` is RFC 3339 UTC.
    let want = serde_json::to_value(&r).unwrap();
    for (key, ..) in TABLE {
        assert_eq!(state[key], want[key], "{key}");
    }
    let date = Command::new("date")
        .args(["-u", "-d", &format!("@{}", ts / 1000), "+%Y-%m-%dT%H:%M:%S"])
        .output()
        .expect("date");
    let want_ts = format!(
        "{}.{:03}Z",
        String::from_utf8_lossy(&date.stdout).trim(),
        ts % 1000
    );
    assert_eq!(state["ts"], want_ts.as_str());
    assert_eq!(state.as_object().unwrap().len(), 8);

    // A late subscriber gets the retained configs, availabilities and no
    // state (states are not retained).
    let held = retained(&broker, &["homeassistant/#", "ems/#"]).await;
    assert_eq!(held["ems/hub/availability"].text(), "online");
    assert_eq!(held["ems/pi.kitchen/availability"].text(), "online");
    assert!(!held.contains_key(state_topic));
    let configs: Vec<&Msg> = held
        .values()
        .filter(|m| m.topic.starts_with("homeassistant/"))
        .collect();
    assert_eq!(configs.len(), 7, "{:?}", held.keys());

    for (key, class, unit, state_class) in TABLE {
        let topic = config_topic("pi.kitchen", "main", key);
        let msg = held
            .get(&topic)
            .unwrap_or_else(|| panic!("no config at {topic}: {:?}", held.keys()));
        assert!(msg.retain);
        let c = msg.json();
        let object = topic.split('/').nth(3).unwrap();
        assert!(object
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
        // Keys Home Assistant requires or we promise.
        assert_eq!(c["unique_id"], format!("ems_{object}").as_str(), "{key}");
        assert_eq!(c["state_topic"], state_topic);
        assert_eq!(
            c["value_template"],
            format!("{{{{ value_json.{key} }}}}").as_str()
        );
        let name = c["name"].as_str().unwrap();
        assert!(name.starts_with("main "), "{name}");
        assert_eq!(c["device_class"], class, "{key}");
        assert_eq!(c["state_class"], state_class, "{key}");
        match unit {
            Some(u) => assert_eq!(c["unit_of_measurement"], u, "{key}"),
            None => assert!(c.get("unit_of_measurement").is_none(), "{key}"),
        }
        assert_eq!(c["availability_mode"], "all");
        let av = c["availability"].as_array().unwrap();
        let topics: BTreeSet<&str> = av.iter().map(|a| a["topic"].as_str().unwrap()).collect();
        assert_eq!(
            topics,
            BTreeSet::from(["ems/hub/availability", "ems/pi.kitchen/availability"])
        );
        for a in av {
            assert_eq!(a["payload_available"], "online");
            assert_eq!(a["payload_not_available"], "offline");
        }
        let d = &c["device"];
        assert_eq!(d["identifiers"], serde_json::json!(["pi.kitchen"]));
        assert_eq!(d["name"], "pi.kitchen");
        assert_eq!(d["manufacturer"], "EMS");
        assert_eq!(d["sw_version"], "9.8.7");
        assert_eq!(d["configuration_url"], "https://ems.example.com/");
        // Deprecated in Home Assistant 2025.10; not sent.
        assert!(c.get("object_id").is_none());
    }
    // The ids are distinct per measurement.
    let ids: BTreeSet<String> = configs
        .iter()
        .map(|m| m.json()["unique_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 7);

    h.shutdown();
    tokio::time::timeout(LONG, task)
        .await
        .expect("stops")
        .expect("task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_readings_in_an_interval_make_one_state_and_backfill_is_not_current() {
    let Some(broker) = start_broker(BrokerOptions::default()) else {
        return;
    };
    let live = Watcher::start(&broker, &["ems/+/+/state"]);
    live.wait_synced().await;
    let mut c = config(&broker);
    c.interval = Duration::from_secs(2);
    let (h, task) = MqttBridge::spawn(c).expect("spawn");
    let topic = "ems/d1/main/state";
    let t0 = now_ms();
    for i in 0..200 {
        h.reading("d1", &energy_reading("main", t0 + i, 100.0 + i as f64));
    }
    let last = live
        .wait_for("the latest reading as state", LONG, |m| {
            states(m, topic)
                .iter()
                .any(|s| s.json()["energy_wh"] == 299.0)
                .then_some(())
        })
        .await;
    let _: () = last;
    let got = states(&live.all(), topic).len();
    // One burst: one state, two if the burst straddled an interval's end.
    assert!(got <= 2, "{got} states for one burst of 200 readings");

    // Older than the newest published, and backlog on arrival: neither
    // becomes the current state. Then a fresh reading, as the marker.
    h.reading("d1", &energy_reading("main", t0 + 50, 1.0));
    h.reading("d1", &energy_reading("main", now_ms() - 10 * 60_000, 2.0));
    wait_stats(&h, "2 backfill readings", LONG, |s| s.backfill_ignored >= 2).await;
    h.reading("d1", &energy_reading("main", now_ms(), 500.0));
    live.wait_for("the fresh state", LONG, |m| {
        states(m, topic)
            .iter()
            .any(|s| s.json()["energy_wh"] == 500.0)
            .then_some(())
    })
    .await;
    let values: Vec<f64> = states(&live.all(), topic)
        .iter()
        .map(|s| s.json()["energy_wh"].as_f64().unwrap())
        .collect();
    assert!(
        !values.contains(&1.0) && !values.contains(&2.0),
        "backfill published as state: {values:?}"
    );
    assert!(states(&live.all(), topic).iter().all(|m| !m.retain));
    let s = h.stats();
    assert_eq!(s.dropped_queue_full, 0);
    assert!(s.published >= 4, "{s:?}");
    h.shutdown();
    tokio::time::timeout(LONG, task)
        .await
        .expect("stops")
        .expect("task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn availability_follows_presence_and_a_clean_shutdown() {
    let Some(broker) = start_broker(BrokerOptions::default()) else {
        return;
    };
    let live = Watcher::start(&broker, &["ems/+/availability"]);
    live.wait_synced().await;
    let (h, task) = MqttBridge::spawn(config(&broker)).expect("spawn");
    let last_of = |m: &[Msg], t: &str| {
        m.iter()
            .rev()
            .find(|x| x.topic == t)
            .map(|x| x.text().to_string())
    };
    live.wait_for("hub online", LONG, |m| {
        (last_of(m, "ems/hub/availability").as_deref() == Some("online")).then_some(())
    })
    .await;
    h.presence("d1", true);
    h.presence("d2", true);
    live.wait_for("d1 online", LONG, |m| {
        (last_of(m, "ems/d1/availability").as_deref() == Some("online")).then_some(())
    })
    .await;
    h.presence("d1", false);
    live.wait_for("d1 offline", LONG, |m| {
        (last_of(m, "ems/d1/availability").as_deref() == Some("offline")).then_some(())
    })
    .await;
    let held = retained(&broker, &["ems/+/availability"]).await;
    assert_eq!(held["ems/d1/availability"].text(), "offline");
    assert_eq!(held["ems/d2/availability"].text(), "online");
    assert_eq!(held["ems/hub/availability"].text(), "online");

    // A clean shutdown takes the devices and then the hub offline.
    h.shutdown();
    tokio::time::timeout(LONG, task)
        .await
        .expect("stops")
        .expect("task");
    let held = retained(&broker, &["ems/+/availability"]).await;
    assert_eq!(held["ems/d2/availability"].text(), "offline");
    assert_eq!(held["ems/hub/availability"].text(), "offline");
    // Calls after the shutdown never block; they are counted.
    h.reading("d1", &energy_reading("main", now_ms(), 1.0));
    assert_eq!(h.stats().dropped_queue_full, 1);
}

#[test]
fn a_dying_hub_goes_offline_through_the_last_will() {
    let Some(broker) = start_broker(BrokerOptions::default()) else {
        return;
    };
    // The bridge on its own runtime, dropped without a shutdown: its
    // socket closes without DISCONNECT, as when the process is killed.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cfg = config(&broker);
    let h = rt.block_on(async move {
        let (h, _task) = MqttBridge::spawn(cfg).expect("spawn");
        wait_stats(&h, "connected", LONG, |s| s.connected && s.published >= 1).await;
        h
    });
    let test_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    test_rt.block_on(async {
        let held = retained(&broker, &["ems/hub/availability"]).await;
        assert_eq!(held["ems/hub/availability"].text(), "online");
    });
    rt.shutdown_background();
    drop(h);
    test_rt.block_on(async {
        let w = Watcher::start(&broker, &["ems/hub/availability"]);
        w.wait_for("the last will", LONG, |m| {
            m.iter()
                .rev()
                .find(|x| x.topic == "ems/hub/availability")
                .filter(|x| x.text() == "offline")
                .map(|_| ())
        })
        .await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_clears_configs_also_those_of_an_earlier_process() {
    let Some(broker) = start_broker(BrokerOptions::default()) else {
        return;
    };
    // An earlier hub process publishes d1 (two meters) and d2, then stops.
    let (a, task) = MqttBridge::spawn(config(&broker)).expect("spawn");
    let t = now_ms();
    a.reading("d1", &energy_reading("main", t, 1.0));
    a.reading("d1", &full_reading("aux", t, 1.0));
    a.reading("d2", &energy_reading("main", t, 1.0));
    a.reading("d3", &energy_reading("main", t, 1.0));
    a.reading("d4", &energy_reading("main", t, 1.0));
    let d1_topics: BTreeSet<String> = std::iter::once(config_topic("d1", "main", "energy_wh"))
        .chain(TABLE.iter().map(|(k, ..)| config_topic("d1", "aux", k)))
        .collect();
    let live = Watcher::start(&broker, &["homeassistant/#", "ems/+/availability"]);
    live.wait_for("all configs", LONG, |m| {
        let held: BTreeSet<&str> = m.iter().map(|x| x.topic.as_str()).collect();
        (d1_topics.iter().all(|t| held.contains(t.as_str()))
            && held.contains(config_topic("d4", "main", "energy_wh").as_str()))
        .then_some(())
    })
    .await;
    a.shutdown();
    tokio::time::timeout(LONG, task)
        .await
        .expect("stops")
        .expect("task");

    // A new process knows nothing of d1 yet; it is revoked.
    let (b, task) = MqttBridge::spawn(config(&broker)).expect("spawn");
    b.device_removed("d1");
    live.wait_for("empty payloads on d1's configs", LONG, |m| {
        let cleared: BTreeSet<&str> = m
            .iter()
            .filter(|x| x.payload.is_empty())
            .map(|x| x.topic.as_str())
            .collect();
        (d1_topics.iter().all(|t| cleared.contains(t.as_str()))
            && cleared.contains("ems/d1/availability"))
        .then_some(())
    })
    .await;
    // The active set (d2, d4 may connect): d3 goes too, d2 and d4 stay.
    b.active_devices(["d2", "d4"]);
    let d3 = config_topic("d3", "main", "energy_wh");
    live.wait_for("d3 cleared", LONG, |m| {
        m.iter()
            .any(|x| x.topic == d3 && x.payload.is_empty())
            .then_some(())
    })
    .await;
    let held = retained(&broker, &["homeassistant/#", "ems/+/availability"]).await;
    let left: BTreeSet<&str> = held
        .keys()
        .map(String::as_str)
        .filter(|t| t.starts_with("homeassistant/"))
        .collect();
    assert_eq!(
        left,
        BTreeSet::from([
            config_topic("d2", "main", "energy_wh").as_str(),
            config_topic("d4", "main", "energy_wh").as_str()
        ])
    );
    assert!(!held.contains_key("ems/d1/availability"));
    assert!(!held.contains_key("ems/d3/availability"));
    assert_eq!(held["ems/d2/availability"].text(), "offline");
    // A revoked device's late reading brings nothing back.
    b.reading("d1", &energy_reading("main", now_ms(), 5.0));
    wait_stats(&b, "the ignored reading", LONG, |s| s.ignored >= 1).await;
    b.shutdown();
    tokio::time::timeout(LONG, task)
        .await
        .expect("stops")
        .expect("task");
    let held = retained(&broker, &["homeassistant/#"]).await;
    assert!(
        held.keys().all(|t| !t.contains("/d1_")),
        "{:?}",
        held.keys()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_gets_discovery_again_and_states_keep_coming() {
    let Some(mut broker) = start_broker(BrokerOptions::default()) else {
        return;
    };
    let (h, task) = MqttBridge::spawn(config(&broker)).expect("spawn");
    h.presence("d1", true);
    h.reading("d1", &full_reading("main", now_ms(), 1.0));
    wait_stats(&h, "first publishes", LONG, |s| s.published >= 9).await;

    // Persistence is off: the restarted broker has lost every retained
    // message.
    broker.stop();
    wait_stats(&h, "the loss noticed", LONG, |s| {
        !s.connected && s.errors >= 1
    })
    .await;
    broker.launch();
    wait_stats(&h, "a reconnect", Duration::from_secs(60), |s| {
        s.connected && s.reconnects >= 1
    })
    .await;
    let live = Watcher::start(&broker, &["homeassistant/#", "ems/#"]);
    live.wait_for("all retained again", LONG, |m| {
        let n = m
            .iter()
            .filter(|x| x.topic.starts_with("homeassistant/") && !x.payload.is_empty())
            .count();
        let hub = m
            .iter()
            .any(|x| x.topic == "ems/hub/availability" && x.text() == "online");
        let dev = m
            .iter()
            .any(|x| x.topic == "ems/d1/availability" && x.text() == "online");
        (n >= 7 && hub && dev).then_some(())
    })
    .await;
    h.reading("d1", &full_reading("main", now_ms(), 42.0));
    live.wait_for("a state after the restart", LONG, |m| {
        m.iter()
            .any(|x| x.topic == "ems/d1/main/state" && x.json()["energy_wh"] == 1042.0)
            .then_some(())
    })
    .await;
    h.shutdown();
    tokio::time::timeout(LONG, task)
        .await
        .expect("stops")
        .expect("task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_reading_never_blocks_the_hub_and_losses_are_counted() {
    let Some(broker) = start_broker(BrokerOptions::default()) else {
        return;
    };
    let mut c = config(&broker);
    c.queue_capacity = 1000;
    let (h, task) = MqttBridge::spawn(c).expect("spawn");
    h.reading("d1", &energy_reading("m0", now_ms(), 1.0));
    wait_stats(&h, "connected and publishing", LONG, |s| {
        s.connected && s.published >= 3
    })
    .await;

    broker.signal(libc::SIGSTOP);
    // Readings keep coming for many intervals; no call may wait.
    let start = Instant::now();
    let mut calls = 0u64;
    let mut slowest = Duration::ZERO;
    let mut value = 2.0;
    while start.elapsed() < Duration::from_secs(60) {
        for m in 0..20 {
            let t = Instant::now();
            h.reading("d1", &energy_reading(&format!("m{m}"), now_ms(), value));
            h.presence("d1", true);
            slowest = slowest.max(t.elapsed());
            calls += 2;
        }
        value += 1.0;
        let s = h.stats();
        if !s.connected
            && s.errors >= 1
            && s.dropped_backlog >= 1
            && start.elapsed() > Duration::from_secs(3)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = h.stats();
    assert!(
        !s.connected && s.errors >= 1 && s.dropped_backlog >= 1,
        "a stopped broker must be noticed and its losses counted: {s:?}"
    );
    // Generous: a call is a try_send, microseconds; only a wait on the
    // network could take this long.
    assert!(
        slowest < Duration::from_millis(500),
        "a call took {slowest:?}"
    );
    assert!(calls > 100);

    broker.signal(libc::SIGCONT);
    wait_stats(&h, "a reconnect", Duration::from_secs(90), |s| {
        s.connected && s.reconnects >= 1
    })
    .await;
    let live = Watcher::start(&broker, &["ems/d1/m0/state"]);
    live.wait_synced().await;
    h.reading("d1", &energy_reading("m0", now_ms(), 9999.0));
    live.wait_for("a state after the broker resumed", LONG, |m| {
        m.iter()
            .any(|x| x.json()["energy_wh"] == 9999.0)
            .then_some(())
    })
    .await;
    h.shutdown();
    tokio::time::timeout(LONG, task)
        .await
        .expect("stops")
        .expect("task");
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_queue_drops_and_counts_without_waiting() {
    capture_logs();
    // No broker needed: nothing here waits for one.
    let mut c =
        MqttConfig::new(BrokerUrl::parse(&format!("mqtt://127.0.0.1:{}", free_port())).unwrap());
    c.queue_capacity = 8;
    let (h, task) = MqttBridge::spawn(c).expect("spawn");
    // On this single-threaded runtime the bridge cannot run until the test
    // yields: exactly the capacity is taken, the rest dropped and counted.
    for i in 0..1000 {
        h.reading("d1", &energy_reading("main", now_ms(), i as f64));
    }
    assert_eq!(h.stats().dropped_queue_full, 992);
    h.shutdown();
    tokio::time::timeout(LONG, task)
        .await
        .expect("stops")
        .expect("task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_stays_out_of_debug_output_and_logs() {
    const PW: &str = "pw-Zeta-7781-secret";
    const WRONG: &str = "wrong-Zeta-9900-secret";
    let Some(broker) = start_broker(BrokerOptions {
        user: Some(("ems".into(), PW.into())),
        ..Default::default()
    }) else {
        return;
    };
    // The right password connects and publishes.
    let mut c = config(&broker);
    c.username = Some("ems".into());
    c.password = Some(Secret::new(PW));
    let dbg = format!("{c:?} {c:#?}");
    assert!(!dbg.contains(PW), "{dbg}");
    let (h, task) = MqttBridge::spawn(c).expect("spawn");
    assert!(!format!("{h:?}").contains(PW));
    h.reading("d1", &energy_reading("main", now_ms(), 1.0));
    wait_stats(&h, "authenticated publishing", LONG, |s| {
        s.connected && s.published >= 3
    })
    .await;

    // A wrong password is refused by the broker, retried, logged.
    let mut bad = config(&broker);
    bad.username = Some("ems".into());
    bad.password = Some(Secret::new(WRONG));
    bad.client_id = Some("ems-hub-wrong".into());
    let (hb, task_b) = MqttBridge::spawn(bad).expect("spawn");
    wait_stats(&hb, "a refusal", LONG, |s| s.errors >= 2 && !s.connected).await;
    assert!(
        log_lines().iter().any(|l| l.contains("cannot connect")),
        "the refusal is logged"
    );

    // Credentials in the URL are refused without echo.
    let e = BrokerUrl::parse(&format!("mqtt://ems:{PW}@127.0.0.1:{}", broker.port)).unwrap_err();
    assert!(!format!("{e} {e:?}").contains(PW));

    hb.shutdown();
    h.shutdown();
    tokio::time::timeout(LONG, task_b)
        .await
        .expect("stops")
        .expect("task");
    tokio::time::timeout(LONG, task)
        .await
        .expect("stops")
        .expect("task");
    let lines = log_lines();
    assert!(lines.len() > 5, "logs were captured: {lines:?}");
    for l in &lines {
        assert!(
            !l.contains(PW) && !l.contains(WRONG),
            "password in a log line: {l}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_the_ca_file_connects_and_without_it_is_refused() {
    let Some(broker) = start_broker(BrokerOptions {
        tls: true,
        ..Default::default()
    }) else {
        return;
    };
    let mut c = config(&broker);
    c.ca_file = broker.ca.clone();
    let (h, task) = MqttBridge::spawn(c).expect("spawn");
    h.reading("d1", &energy_reading("main", now_ms(), 1.0));
    wait_stats(&h, "a TLS connection", LONG, |s| {
        s.connected && s.published >= 3
    })
    .await;

    // Without the CA file only the public web PKI is trusted: refused.
    let mut c = config(&broker);
    c.client_id = Some("ems-hub-untrusted".into());
    let (hu, task_u) = MqttBridge::spawn(c).expect("spawn");
    wait_stats(&hu, "a refused handshake", LONG, |s| s.errors >= 1).await;
    assert!(!hu.stats().connected && hu.stats().published == 0);

    hu.shutdown();
    h.shutdown();
    tokio::time::timeout(LONG, task_u)
        .await
        .expect("stops")
        .expect("task");
    tokio::time::timeout(LONG, task)
        .await
        .expect("stops")
        .expect("task");
}
