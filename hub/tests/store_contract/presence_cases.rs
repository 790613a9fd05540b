//! Contract cases for the shared device state ([`PresenceStore`]):
//! generations, the lease evaluated in the query, updates and disconnects
//! bound to their generation, the clean-shutdown marking, the change
//! read. Run per backend by `backend_suite!` in `store_contract.rs`.

use ems_hub::store::presence::{
    Connect, DeviceStateRow, Disconnect, LastReading, PresenceSync, StateUpdate, StatusSummary,
};
use ems_hub::store::Store;

use super::Fixture;

fn sync(hub: &str, now_ms: i64, lease_until_ms: i64) -> PresenceSync {
    PresenceSync {
        hub: hub.into(),
        now_ms,
        lease_until_ms,
        ..Default::default()
    }
}

fn connect(s: &mut dyn Store, hub: &str, device: &str, at_ms: i64, lease_until_ms: i64) -> i64 {
    let mut x = sync(hub, at_ms, lease_until_ms);
    x.connects.push(Connect {
        device_id: device.into(),
        at_ms,
    });
    let a = s.presence_sync(&x).unwrap();
    assert_eq!(a.generations.len(), 1);
    a.generations[0]
}

fn state(s: &mut dyn Store, device: &str, now_ms: i64) -> DeviceStateRow {
    let rows = s.device_states(&[device.to_owned()], now_ms).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    rows.into_iter().next().unwrap()
}

fn last(meter: &str, ts: i64, power_w: f64) -> LastReading {
    LastReading {
        meter: meter.into(),
        ts,
        power_w: Some(power_w),
        energy_wh: Some(12.5),
    }
}

pub fn presence_is_online_until_the_lease_ends_and_renewal_extends_it(mut f: Fixture) {
    let s = f.store.as_mut();
    assert!(s.device_states(&[], 0).unwrap().is_empty());
    assert!(s.device_states(&["nobody".into()], 0).unwrap().is_empty());
    let g1 = connect(s, "a", "d1", 100, 1_000);
    let g2 = connect(s, "a", "d2", 110, 1_000);
    assert!(g2 > g1 && g1 > 0, "{g1} {g2}");
    let d = state(s, "d1", 500);
    assert!(d.online);
    assert_eq!(d.hub.as_deref(), Some("a"));
    assert_eq!((d.online_since_ms, d.last_seen_ms), (Some(100), Some(100)));
    assert!(d.status.is_none() && d.last.decode().is_empty());
    // The lease ends: offline for every reader, without any write.
    assert!(!state(s, "d1", 1_000).online);
    // A renewal extends every lease of the hub.
    let mut r = sync("a", 900, 2_000);
    r.renew = true;
    s.presence_sync(&r).unwrap();
    assert!(state(s, "d1", 1_500).online);
    assert!(state(s, "d2", 1_500).online);
    // A renewal by another hub does not.
    let mut r = sync("b", 1_900, 5_000);
    r.renew = true;
    s.presence_sync(&r).unwrap();
    assert!(!state(s, "d1", 2_500).online);
    let both = s
        .device_states(&["d1".into(), "d2".into(), "nobody".into()], 0)
        .unwrap();
    assert_eq!(both.len(), 2);
}

pub fn presence_writes_bind_to_their_generation(mut f: Fixture) {
    let s = f.store.as_mut();
    let ga = connect(s, "a", "d", 100, 10_000);
    let mut x = sync("a", 150, 10_000);
    x.changes_since = Some(ga);
    assert!(s.presence_sync(&x).unwrap().changes.is_empty());
    // The device moves to hub b: a newer generation, a's changes read sees it.
    let gb = connect(s, "b", "d", 200, 10_000);
    assert!(gb > ga);
    let mut x = sync("a", 250, 10_000);
    x.changes_since = Some(ga);
    let a = s.presence_sync(&x).unwrap();
    assert_eq!(a.changes, vec![("d".to_owned(), gb)]);
    assert_eq!(a.max_generation, gb);
    // a's late update and disconnect do not touch b's connection (last
    // seen only moves forward).
    let status = StatusSummary {
        rx_ms: 300,
        outbox_depth: 9,
        behind_ms: 40,
        dropped: 1,
        unwritten: 2,
        dropped_disk_full: 3,
        dropped_damaged: 4,
    };
    let mut x = sync("a", 300, 10_000);
    x.updates.push(StateUpdate {
        device_id: "d".into(),
        generation: ga,
        last_seen_ms: 300,
        status: Some(status),
        last: vec![last("main", 290, 1.0)],
    });
    x.disconnects.push(Disconnect {
        device_id: "d".into(),
        generation: Some(ga),
        at_ms: 310,
        last: vec![last("main", 295, 2.0)],
    });
    s.presence_sync(&x).unwrap();
    let d = state(s, "d", 400);
    assert!(d.online);
    assert_eq!(d.hub.as_deref(), Some("b"));
    assert_eq!(d.online_since_ms, Some(200));
    assert!(d.status.is_none() && d.last.decode().is_empty(), "{d:?}");
    // A disconnect of hub a whose connect was never written leaves b's
    // row online too.
    let mut x = sync("a", 320, 10_000);
    x.disconnects.push(Disconnect {
        device_id: "d".into(),
        generation: None,
        at_ms: 320,
        last: Vec::new(),
    });
    s.presence_sync(&x).unwrap();
    assert!(state(s, "d", 400).online);
    // b's update lands; a status-less one keeps the status.
    let mut x = sync("b", 500, 10_000);
    x.updates.push(StateUpdate {
        device_id: "d".into(),
        generation: gb,
        last_seen_ms: 500,
        status: Some(status),
        last: vec![last("main", 490, 3.0), last("pv", 480, -4.0)],
    });
    s.presence_sync(&x).unwrap();
    let mut x = sync("b", 600, 10_000);
    x.updates.push(StateUpdate {
        device_id: "d".into(),
        generation: gb,
        last_seen_ms: 600,
        status: None,
        last: vec![last("main", 590, 5.0), last("pv", 480, -4.0)],
    });
    s.presence_sync(&x).unwrap();
    let d = state(s, "d", 700);
    assert_eq!(d.status, Some(status));
    assert_eq!(d.last_seen_ms, Some(600));
    assert_eq!(
        d.last.decode(),
        vec![last("main", 590, 5.0), last("pv", 480, -4.0)]
    );
    // b's disconnect: offline, the last readings and last seen kept.
    let mut x = sync("b", 800, 10_000);
    x.disconnects.push(Disconnect {
        device_id: "d".into(),
        generation: Some(gb),
        at_ms: 800,
        last: vec![last("main", 790, 6.0)],
    });
    s.presence_sync(&x).unwrap();
    let d = state(s, "d", 900);
    assert!(!d.online);
    assert_eq!(d.last_seen_ms, Some(800));
    assert_eq!(d.last.decode(), vec![last("main", 790, 6.0)]);
    // A reconnect clears the old connection's status.
    connect(s, "a", "d", 1_000, 10_000);
    let d = state(s, "d", 1_100);
    assert!(d.online && d.status.is_none());
    assert_eq!(
        d.last.decode().len(),
        1,
        "the last readings stay until new ones"
    );
}

pub fn presence_clean_shutdown_marks_only_its_own_devices_offline(mut f: Fixture) {
    let s = f.store.as_mut();
    connect(s, "a", "d1", 100, 10_000);
    connect(s, "b", "d2", 100, 10_000);
    // A disconnect without a known generation clears a row of its hub.
    connect(s, "a", "d3", 100, 10_000);
    let mut x = sync("a", 200, 10_000);
    x.disconnects.push(Disconnect {
        device_id: "d3".into(),
        generation: None,
        at_ms: 200,
        last: Vec::new(),
    });
    s.presence_sync(&x).unwrap();
    assert!(!state(s, "d3", 300).online);
    let mut x = sync("a", 300, 10_000);
    x.all_offline = true;
    s.presence_sync(&x).unwrap();
    let d1 = state(s, "d1", 400);
    assert!(!d1.online);
    assert_eq!(d1.last_seen_ms, Some(300));
    assert!(state(s, "d2", 400).online);
    // Generations stay unique across hubs and connects.
    let mut x = sync("c", 500, 10_000);
    x.connects = ["d4", "d5"]
        .iter()
        .map(|d| Connect {
            device_id: (*d).into(),
            at_ms: 500,
        })
        .collect();
    let a = s.presence_sync(&x).unwrap();
    assert_eq!(a.generations.len(), 2);
    assert!(a.generations[1] > a.generations[0]);
    assert_eq!(a.max_generation, a.generations[1]);
}

pub fn presence_connects_take_generations_in_their_order_whatever_their_ids(mut f: Fixture) {
    let s = f.store.as_mut();
    // A connection that writes presence only keeps working the same.
    s.presence_only().unwrap();
    let mut x = sync("a", 100, 1_000);
    for d in ["m", "c", "x", "a"] {
        x.connects.push(Connect {
            device_id: d.into(),
            at_ms: 100,
        });
    }
    let g = s.presence_sync(&x).unwrap().generations;
    assert_eq!(g.len(), 4);
    assert!(g.windows(2).all(|w| w[1] == w[0] + 1), "{g:?}");
    let mut y = sync("a", 200, 1_000);
    y.changes_since = Some(g[0] - 1);
    // Updates and disconnects of several devices in one flush, out of key
    // order, each bound to its own generation.
    for (d, gen) in [("x", g[2]), ("c", g[1]), ("m", g[0])] {
        y.updates.push(StateUpdate {
            device_id: d.into(),
            generation: gen,
            last_seen_ms: 150,
            status: None,
            last: vec![last("main", 150, 1.0)],
        });
    }
    y.disconnects.push(Disconnect {
        device_id: "a".into(),
        generation: Some(g[3]),
        at_ms: 200,
        last: Vec::new(),
    });
    let changes = s.presence_sync(&y).unwrap().changes;
    let ids: Vec<&str> = changes.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(ids, ["m", "c", "x", "a"], "in generation order");
    assert_eq!(changes.iter().map(|c| c.1).collect::<Vec<_>>(), g);
    for d in ["m", "c", "x"] {
        let row = state(s, d, 300);
        assert!(row.online, "{d}");
        assert_eq!(row.last_seen_ms, Some(150), "{d}");
        assert_eq!(row.last.decode().len(), 1, "{d}");
    }
    assert!(!state(s, "a", 300).online);
}
