//! The store contract: one suite, run against every backend.
//!
//! Each case in [`contract`] takes a [`Fixture`] (a fresh, empty database
//! of one backend) and checks one promise of `ems_hub::store::Store`. The
//! `backend_suite!` macro turns every case into a `#[test]` per backend, so
//! a backend cannot silently skip one.

#[path = "store_contract/energy_cases.rs"]
mod energy_cases;
#[path = "store_contract/presence_cases.rs"]
mod presence_cases;

use std::sync::Arc;

use ems_hub::store::{self, Row, Store};
use ems_shared::Reading;
use ems_testkit::pg;
use ems_testkit::{now_ms, TestHub};

/// A fresh database of one backend.
pub struct Fixture {
    /// URL that opens this database again (for `Admin::open`, reopening).
    pub url: String,
    /// An open handle.
    pub store: Box<dyn Store>,
    /// Every byte the backend has on disk for this database (or `None`
    /// when the files are not reachable, e.g. an external PostgreSQL).
    pub raw_bytes: Box<dyn Fn() -> Option<Vec<u8>>>,
    /// Keeps temp dirs / databases alive for the test's duration.
    pub _guard: Box<dyn std::any::Any>,
}

/// A reading row for tests.
pub fn row(device: &str, epoch: u64, seq: u64, ts_ms: i64) -> Row {
    Row {
        device_id: Arc::from(device),
        received_at_ms: ts_ms.saturating_add(5),
        reading: Reading {
            epoch,
            seq,
            ts_ms,
            meter: "main".into(),
            power_w: Some(seq as f64 + 0.5),
            ..Default::default()
        },
    }
}

pub mod contract {
    use super::*;
    pub use crate::energy_cases::*;
    pub use crate::presence_cases::*;
    use ems_hub::admin::Admin;
    use ems_hub::auth::token;
    use ems_hub::store::{QuarantineRow, StoreError, ViewerScope};

    fn all(s: &mut dyn Store, device: &str) -> Vec<Reading> {
        s.readings(device, i64::MIN, i64::MAX, usize::MAX).unwrap()
    }

    pub fn insert_roundtrips_every_column(mut f: Fixture) {
        let full = Row {
            device_id: Arc::from("ems_001"),
            received_at_ms: 1_700_000_000_123,
            reading: Reading {
                epoch: (1 << 53) - 1,
                seq: (1 << 53) - 2,
                ts_ms: 1_700_000_000_000,
                meter: "phase_a-1".into(),
                voltage_v: Some(230.125),
                current_a: Some(-4.25),
                power_w: Some(-960.5),
                energy_wh: Some(1e13),
                frequency_hz: Some(49.98),
                power_factor: Some(-0.5),
                reactive_power_var: Some(12.75),
                ..Default::default()
            },
        };
        let minimal = row("ems_001", 7, 0, 1_700_000_000_500);
        f.store
            .insert_batch(&[full.clone(), minimal.clone()])
            .unwrap();
        f.store.insert_batch(&[]).unwrap();
        let got = all(&mut *f.store, "ems_001");
        assert_eq!(got, vec![full.reading, minimal.reading]);
        assert!(all(&mut *f.store, "other").is_empty());
    }

    pub fn resent_reading_is_stored_once(mut f: Fixture) {
        let a = row("d1", 1, 1, 1000);
        f.store
            .insert_batch(&[a.clone(), row("d1", 1, 2, 1001)])
            .unwrap();
        // Resend with different content, also duplicated inside one batch:
        // the first stored version wins, no error.
        let mut changed = a.clone();
        changed.reading.power_w = Some(-1.0);
        changed.reading.ts_ms = 5000;
        f.store
            .insert_batch(&[changed.clone(), changed, row("d1", 1, 3, 1002)])
            .unwrap();
        // Same (epoch, seq) on another device or another epoch is distinct.
        f.store
            .insert_batch(&[row("d2", 1, 1, 1000), row("d1", 2, 1, 1003)])
            .unwrap();
        let got = all(&mut *f.store, "d1");
        let keys: Vec<(u64, u64)> = got.iter().map(|r| (r.epoch, r.seq)).collect();
        assert_eq!(keys, vec![(1, 1), (1, 2), (1, 3), (2, 1)]);
        assert_eq!(got[0], a.reading);
        assert_eq!(all(&mut *f.store, "d2").len(), 1);
    }

    pub fn failed_batch_stores_nothing(mut f: Fixture) {
        // epoch 2^63 cannot be a BIGINT: the third row fails, so the whole
        // batch must roll back. It can never be stored: refused, not a
        // store failure worth retrying.
        let bad = row("d1", 1 << 63, 3, 1002);
        let r = f
            .store
            .insert_batch(&[row("d1", 1, 1, 1000), row("d1", 1, 2, 1001), bad]);
        assert!(matches!(r, Err(StoreError::Refused(_))), "{r:?}");
        assert!(all(&mut *f.store, "d1").is_empty());
        // The handle is still usable afterwards.
        f.store.insert_batch(&[row("d1", 1, 1, 1000)]).unwrap();
        assert_eq!(all(&mut *f.store, "d1").len(), 1);
    }

    fn refused(device: &str, epoch: Option<u64>, seq: Option<u64>, at: i64) -> QuarantineRow {
        let error = ems_shared::FrameError {
            reason: ems_shared::RejectReason::OutOfRange,
            detail: format!("power_factor out of range ({at})"),
            epoch,
            seq,
        };
        let raw = format!(r#"{{"type":"reading","epoch":{epoch:?},"power_factor":2}}"#);
        QuarantineRow::refused_frame(Arc::from(device), at, &error, Some(&raw))
    }

    pub fn quarantine_rows_are_stored_listed_and_counted(mut f: Fixture) {
        let a1 = refused("d1", Some(7), Some(1), 1_700_000_000_001);
        let a2 = refused("d1", Some(7), Some(2), 1_700_000_000_002);
        // A frame without ids, and a binary frame (no text).
        let mut junk = refused("d1", None, None, 1_700_000_000_003);
        junk.raw = Some("not json".into());
        let mut binary = refused("d2", None, None, 1_700_000_000_004);
        binary.raw = None;
        f.store
            .write_batch(&[row("d1", 7, 3, 1000)], &[a1.clone(), a2.clone()])
            .unwrap();
        f.store
            .write_batch(&[], &[junk.clone(), binary.clone()])
            .unwrap();
        // A resend of a quarantined frame is kept once; NULL ids never
        // collide.
        f.store
            .write_batch(&[], &[a1.clone(), junk.clone()])
            .unwrap();
        assert_eq!(all(&mut *f.store, "d1").len(), 1, "the reading");
        let list = f.store.quarantined(None, 100).unwrap();
        let keys: Vec<(&str, i64, Option<u64>)> = list
            .iter()
            .map(|q| (q.device_id.as_str(), q.received_at_ms, q.seq))
            .collect();
        assert_eq!(
            keys,
            [
                ("d2", 1_700_000_000_004, None),
                ("d1", 1_700_000_000_003, None),
                ("d1", 1_700_000_000_003, None),
                ("d1", 1_700_000_000_002, Some(2)),
                ("d1", 1_700_000_000_001, Some(1)),
            ],
            "newest first"
        );
        let q = &list[3];
        assert_eq!((q.epoch, q.reason.as_str()), (Some(7), "out_of_range"));
        assert_eq!(q.detail, a2.detail);
        assert_eq!(q.raw, a2.raw);
        assert_eq!(list[0].raw, None);
        assert_eq!(list[1].raw.as_deref(), Some("not json"));
        let d1 = f.store.quarantined(Some("d1"), 2).unwrap();
        assert_eq!(d1.len(), 2);
        assert!(d1.iter().all(|q| q.device_id == "d1" && q.seq.is_none()));
        assert!(f.store.quarantined(Some("d3"), 10).unwrap().is_empty());
        let mut counts = f.store.quarantine_counts().unwrap();
        counts.sort();
        assert_eq!(counts, [("d1".to_string(), 4), ("d2".to_string(), 1)]);
    }

    pub fn quarantine_commits_with_the_readings_or_not_at_all(mut f: Fixture) {
        // The last quarantine row cannot be stored (epoch 2^63): the
        // readings and quarantine rows before it roll back with it.
        let bad = refused("d1", Some(1 << 63), Some(1), 5);
        let ok = refused("d1", Some(1), Some(2), 5);
        let r = f.store.write_batch(
            &[row("d1", 1, 1, 1000), row("d1", 1, 3, 1001)],
            &[ok.clone(), bad],
        );
        assert!(matches!(r, Err(StoreError::Refused(_))), "{r:?}");
        assert!(all(&mut *f.store, "d1").is_empty());
        assert!(f.store.quarantined(None, 10).unwrap().is_empty());
        f.store
            .write_batch(&[row("d1", 1, 1, 1000), row("d1", 1, 3, 1001)], &[ok])
            .unwrap();
        assert_eq!(all(&mut *f.store, "d1").len(), 2);
        assert_eq!(f.store.quarantined(None, 10).unwrap().len(), 1);
    }

    pub fn history_by_time_range(mut f: Fixture) {
        // Inserted out of order, across batches and epochs.
        let rows: Vec<Row> = [(3, 30), (1, 10), (5, 50), (2, 20), (4, 40)]
            .iter()
            .map(|&(seq, ts)| row("d1", 9, seq, ts))
            .collect();
        f.store.insert_batch(&rows[..2]).unwrap();
        f.store.insert_batch(&rows[2..]).unwrap();
        f.store.insert_batch(&[row("d2", 9, 1, 25)]).unwrap();
        let ts = |v: Vec<Reading>| v.iter().map(|r| r.ts_ms).collect::<Vec<_>>();
        assert_eq!(
            ts(f.store.readings("d1", 0, 100, 100).unwrap()),
            [10, 20, 30, 40, 50]
        );
        // from inclusive, to exclusive.
        assert_eq!(ts(f.store.readings("d1", 20, 40, 100).unwrap()), [20, 30]);
        // limit keeps the oldest.
        assert_eq!(ts(f.store.readings("d1", 0, 100, 2).unwrap()), [10, 20]);
        assert!(f.store.readings("d1", 0, 100, 0).unwrap().is_empty());
        assert!(f.store.readings("d1", 51, 100, 10).unwrap().is_empty());
        assert_eq!(ts(f.store.readings("d2", 0, 100, 10).unwrap()), [25]);
    }

    pub fn device_exists_for_added_devices_only(mut f: Fixture) {
        let s = &mut *f.store;
        assert!(!s.device_exists("dev").unwrap());
        s.add_device("dev", &token::hash("t"), 1).unwrap();
        assert!(s.device_exists("dev").unwrap());
        s.revoke_device("dev", 2).unwrap();
        assert!(
            s.device_exists("dev").unwrap(),
            "revoked devices still exist"
        );
        assert!(!s.device_exists("other").unwrap());
    }

    pub fn device_admin(mut f: Fixture) {
        let s = &mut *f.store;
        let (h1, h2, h3) = (token::hash("one"), token::hash("two"), token::hash("three"));
        s.add_device("b-dev", &h1, 100).unwrap();
        s.add_device("a.dev", &h2, 200).unwrap();
        assert!(matches!(
            s.add_device("b-dev", &h3, 300),
            Err(StoreError::AlreadyExists(_))
        ));
        // The duplicate did not replace the token.
        assert!(s.device_token_valid("b-dev", &h1).unwrap());
        assert!(!s.device_token_valid("b-dev", &h3).unwrap());
        // Another device's token does not open this one.
        assert!(!s.device_token_valid("b-dev", &h2).unwrap());
        assert!(!s.device_token_valid("unknown", &h1).unwrap());

        let list = s.list_devices().unwrap();
        let ids: Vec<&str> = list.iter().map(|d| d.device_id.as_str()).collect();
        assert_eq!(ids, ["a.dev", "b-dev"]);
        assert_eq!(list[1].created_ms, 100);
        assert_eq!(list[1].revoked_ms, None);

        s.revoke_device("b-dev", 400).unwrap();
        assert!(!s.device_token_valid("b-dev", &h1).unwrap());
        assert_eq!(s.list_devices().unwrap()[1].revoked_ms, Some(400));
        // A revoked id stays taken.
        assert!(matches!(
            s.add_device("b-dev", &h3, 500),
            Err(StoreError::AlreadyExists(_))
        ));
        assert!(matches!(
            s.revoke_device("nope", 1),
            Err(StoreError::NotFound(_))
        ));

        // Rotation replaces the hash and un-revokes.
        s.rotate_device("b-dev", &h3).unwrap();
        assert!(s.device_token_valid("b-dev", &h3).unwrap());
        assert!(!s.device_token_valid("b-dev", &h1).unwrap());
        assert_eq!(s.list_devices().unwrap()[1].revoked_ms, None);
        s.rotate_device("a.dev", &h1).unwrap();
        assert!(!s.device_token_valid("a.dev", &h2).unwrap());
        assert!(matches!(
            s.rotate_device("nope", &h1),
            Err(StoreError::NotFound(_))
        ));
    }

    /// The revocation poller's view — every unrevoked device with
    /// its current hash; revoked devices vanish, rotation changes the hash,
    /// un-revocation by rotation brings the device back.
    pub fn active_device_tokens_follow_revocation_and_rotation(mut f: Fixture) {
        let s = &mut *f.store;
        let sorted = |s: &mut dyn Store| {
            let mut v = s.active_device_tokens().unwrap();
            v.sort();
            v
        };
        assert!(sorted(s).is_empty());
        let (h1, h2, h3) = (token::hash("t1"), token::hash("t2"), token::hash("t3"));
        s.add_device("d1", &h1, 1).unwrap();
        s.add_device("d2", &h2, 1).unwrap();
        assert_eq!(
            sorted(s),
            vec![("d1".to_string(), h1), ("d2".to_string(), h2)]
        );
        s.revoke_device("d1", 2).unwrap();
        assert_eq!(sorted(s), vec![("d2".to_string(), h2)]);
        s.rotate_device("d2", &h3).unwrap();
        assert_eq!(sorted(s), vec![("d2".to_string(), h3)]);
        s.rotate_device("d1", &h1).unwrap();
        assert_eq!(
            sorted(s),
            vec![("d1".to_string(), h1), ("d2".to_string(), h3)]
        );
    }

    pub fn viewer_scopes_and_revocation(mut f: Fixture) {
        let s = &mut *f.store;
        let (ha, hb, hc) = (token::hash("va"), token::hash("vb"), token::hash("vc"));
        s.add_viewer("all", &ha, &ViewerScope::AllDevices, 1)
            .unwrap();
        let some = ViewerScope::Devices(vec!["d2".into(), "d1".into(), "d1".into()]);
        s.add_viewer("some", &hb, &some, 1).unwrap();
        assert!(matches!(
            s.add_viewer("some", &hc, &ViewerScope::AllDevices, 2),
            Err(StoreError::AlreadyExists(_))
        ));
        assert_eq!(s.viewer_scope(&ha).unwrap(), Some(ViewerScope::AllDevices));
        let got = s.viewer_scope(&hb).unwrap().unwrap();
        assert_eq!(got, ViewerScope::Devices(vec!["d1".into(), "d2".into()]));
        assert!(got.allows("d1") && got.allows("d2") && !got.allows("d3"));
        assert_eq!(s.viewer_scope(&hc).unwrap(), None);
        // A device token is not a viewer token.
        s.add_device("d1", &hc, 1).unwrap();
        assert_eq!(s.viewer_scope(&hc).unwrap(), None);

        s.revoke_viewer("some", 5).unwrap();
        assert_eq!(s.viewer_scope(&hb).unwrap(), None);
        assert_eq!(s.viewer_scope(&ha).unwrap(), Some(ViewerScope::AllDevices));
        assert!(matches!(
            s.revoke_viewer("nobody", 5),
            Err(StoreError::NotFound(_))
        ));
    }

    pub fn admin_tokens(mut f: Fixture) {
        let s = &mut *f.store;
        let h = token::hash("adm");
        s.add_admin("ops", &h, 1).unwrap();
        assert!(matches!(
            s.add_admin("ops", &token::hash("x"), 2),
            Err(StoreError::AlreadyExists(_))
        ));
        assert_eq!(s.admin_name(&h).unwrap().as_deref(), Some("ops"));
        assert_eq!(s.admin_name(&token::hash("x")).unwrap(), None);
    }

    pub fn history_with_receive_times(mut f: Fixture) {
        let rows: Vec<Row> = [(3, 30), (1, 10), (5, 50), (2, 20), (4, 40)]
            .iter()
            .map(|&(seq, ts)| row("d1", 9, seq, ts))
            .collect();
        f.store.insert_batch(&rows).unwrap();
        f.store.insert_batch(&[row("d2", 9, 1, 25)]).unwrap();
        let ts = |v: &[store::StoredReading]| v.iter().map(|r| r.reading.ts_ms).collect::<Vec<_>>();
        let all = f.store.history("d1", 0, 100, 100, false).unwrap();
        assert_eq!(ts(&all), [10, 20, 30, 40, 50]);
        // received_at comes back (row() sets it to ts + 5).
        assert!(all.iter().all(|r| r.received_at_ms == r.reading.ts_ms + 5));
        assert_eq!(all[0].reading, rows[1].reading);
        // Oldest `limit`, or newest `limit` — both oldest first.
        assert_eq!(
            ts(&f.store.history("d1", 0, 100, 2, false).unwrap()),
            [10, 20]
        );
        assert_eq!(
            ts(&f.store.history("d1", 0, 100, 2, true).unwrap()),
            [40, 50]
        );
        assert_eq!(
            ts(&f.store.history("d1", 20, 40, 10, true).unwrap()),
            [20, 30]
        );
        assert!(f.store.history("d1", 0, 100, 0, true).unwrap().is_empty());
        assert!(f
            .store
            .history("nobody", 0, 100, 5, false)
            .unwrap()
            .is_empty());
        // Last seen: receive time of the newest reading by sample time.
        assert_eq!(f.store.last_seen("d1").unwrap(), Some(55));
        assert_eq!(f.store.last_seen("d2").unwrap(), Some(30));
        assert_eq!(f.store.last_seen("nobody").unwrap(), None);
    }

    pub fn viewers_are_listed(mut f: Fixture) {
        let s = &mut *f.store;
        assert!(s.list_viewers().unwrap().is_empty());
        s.add_viewer(
            "wall",
            &token::hash("a"),
            &ViewerScope::Devices(vec!["d2".into(), "d1".into()]),
            10,
        )
        .unwrap();
        s.add_viewer("all", &token::hash("b"), &ViewerScope::AllDevices, 20)
            .unwrap();
        s.add_viewer(
            "one",
            &token::hash("c"),
            &ViewerScope::Devices(vec!["d3".into()]),
            30,
        )
        .unwrap();
        s.revoke_viewer("one", 40).unwrap();
        let got = s.list_viewers().unwrap();
        let want = vec![
            store::ViewerInfo {
                name: "all".into(),
                scope: ViewerScope::AllDevices,
                created_ms: 20,
                revoked_ms: None,
            },
            store::ViewerInfo {
                name: "one".into(),
                scope: ViewerScope::Devices(vec!["d3".into()]),
                created_ms: 30,
                revoked_ms: Some(40),
            },
            store::ViewerInfo {
                name: "wall".into(),
                scope: ViewerScope::Devices(vec!["d1".into(), "d2".into()]),
                created_ms: 10,
                revoked_ms: None,
            },
        ];
        assert_eq!(got, want);
    }

    pub fn data_survives_reopen(mut f: Fixture) {
        f.store.insert_batch(&[row("d1", 1, 1, 10)]).unwrap();
        f.store.add_device("d1", &token::hash("t"), 1).unwrap();
        drop(std::mem::replace(
            &mut f.store,
            store::open(&f.url).unwrap(),
        ));
        assert_eq!(all(&mut *f.store, "d1").len(), 1);
        assert!(f.store.device_token_valid("d1", &token::hash("t")).unwrap());
        // Opening twice more at once (two hubs starting) does no harm.
        let url = f.url.clone();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let url = url.clone();
                std::thread::spawn(move || store::open(&url).map(|_| ()))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        assert_eq!(all(&mut *f.store, "d1").len(), 1);
    }

    pub fn the_token_change_counter_moves_with_every_token_change(f: Fixture) {
        // A second handle stands for another process: the counter must
        // move whoever makes the change.
        let mut admin = Admin::open(&f.url).unwrap();
        let mut s = f.store;
        let mut last = s.token_changes().unwrap();
        let mut moved = |s: &mut Box<dyn Store>, what: &str| {
            let n = s.token_changes().unwrap();
            assert!(n > last, "{what} did not move the counter ({last} -> {n})");
            last = n;
        };
        admin.add_device("ems_001").unwrap();
        moved(&mut s, "adding a device");
        admin.rotate_device("ems_001").unwrap();
        moved(&mut s, "rotating a device");
        admin.revoke_device("ems_001").unwrap();
        moved(&mut s, "revoking a device");
        admin
            .add_viewer("wall", ViewerScope::Devices(vec!["ems_001".into()]))
            .unwrap();
        moved(&mut s, "adding a viewer with a scope");
        admin.revoke_viewer("wall").unwrap();
        moved(&mut s, "revoking a viewer");
        admin.add_admin("ops").unwrap();
        moved(&mut s, "adding an admin");
        admin.add_admin("night").unwrap();
        moved(&mut s, "adding a second admin");
        admin.rotate_admin("ops").unwrap();
        moved(&mut s, "rotating an admin");
        admin.revoke_admin("night").unwrap();
        moved(&mut s, "revoking an admin");
        // Readings are not token changes; the snapshot carries the counter.
        let before = s.token_changes().unwrap();
        s.insert_batch(&[row("ems_001", 1, 0, 1_700_000_000_000)])
            .unwrap();
        assert_eq!(s.token_changes().unwrap(), before);
        let snap = s.auth_snapshot().unwrap();
        assert_eq!(snap.changes, before);
        assert_eq!(snap.devices, vec![("ems_001".to_string(), None)]);
        assert!(snap.viewers.is_empty());
        assert_eq!(snap.admins.len(), 1);
        assert_eq!(snap.admins[0].1, "ops");
    }

    pub fn database_never_holds_a_plaintext_token(f: Fixture) {
        let mut admin = Admin::open(&f.url).unwrap();
        let mut tokens = vec![
            admin.add_device("ems_001").unwrap(),
            admin.add_device("ems_002").unwrap(),
        ];
        tokens.push(admin.rotate_device("ems_002").unwrap());
        tokens.push(
            admin
                .add_viewer("wall", ViewerScope::Devices(vec!["ems_001".into()]))
                .unwrap(),
        );
        tokens.push(admin.add_viewer("all", ViewerScope::AllDevices).unwrap());
        tokens.push(admin.add_admin("ops").unwrap());
        let check = |when: &str| {
            let Some(raw) = (f.raw_bytes)() else {
                // An external server (EMS_TEST_DATABASE_URL): PostgreSQL
                // is there, only its files are not.
                eprintln!("raw database files not reachable; plaintext scan skipped");
                return;
            };
            assert!(raw.len() > 1000, "scanned too little ({when})");
            // Each whole token, and its random body alone.
            let mut needles: Vec<&[u8]> = tokens.iter().map(|t| t.as_bytes()).collect();
            needles.extend(tokens.iter().map(|t| &t.as_bytes()[5..48]));
            assert!(
                !contains_any(&raw, &needles),
                "a plaintext token is in the database files ({when})"
            );
        };
        check("while open");
        let mut s = admin.into_store();
        assert!(s
            .device_token_valid("ems_001", &token::hash(&tokens[0]))
            .unwrap());
        drop(s);
        check("after close");
    }
}

/// Whether any needle occurs in `hay`: one pass with a first-byte table,
/// fast enough for the WAL of a PostgreSQL cluster in a debug build.
pub fn contains_any(hay: &[u8], needles: &[&[u8]]) -> bool {
    let mut first = [false; 256];
    for n in needles {
        if let Some(&b) = n.first() {
            first[usize::from(b)] = true;
        }
    }
    let mut i = 0;
    while i < hay.len() {
        if first[usize::from(hay[i])] {
            for n in needles {
                if hay[i..].starts_with(n) {
                    return true;
                }
            }
        }
        i += 1;
    }
    false
}

#[test]
fn contains_any_finds_needles() {
    assert!(contains_any(b"xxabcxx", &[b"zz", b"abc"]));
    assert!(!contains_any(b"xxabxx", &[b"abc"]));
    assert!(contains_any(b"abc", &[b"abc"]));
}

/// One `#[test]` per contract case for a backend whose fixture comes from
/// `$fixture` (an expression returning `Option<Fixture>`; `None` = skip).
macro_rules! backend_suite {
    ($backend:ident, $fixture:expr) => {
        mod $backend {
            use super::*;
            backend_suite!(@cases $fixture;
                insert_roundtrips_every_column,
                resent_reading_is_stored_once,
                failed_batch_stores_nothing,
                quarantine_rows_are_stored_listed_and_counted,
                quarantine_commits_with_the_readings_or_not_at_all,
                history_by_time_range,
                device_admin,
                device_exists_for_added_devices_only,
                active_device_tokens_follow_revocation_and_rotation,
                viewer_scopes_and_revocation,
                admin_tokens,
                history_with_receive_times,
                viewers_are_listed,
                data_survives_reopen,
                database_never_holds_a_plaintext_token,
                the_token_change_counter_moves_with_every_token_change,
                flags_are_stored_counted_and_listed,
                energy_equals_brute_force_with_late_and_resent_readings,
                energy_local_days_dst_and_odd_offsets,
                energy_before_1972_is_answered_from_raw_rows,
                fleet_energy_equals_the_per_device_rollup,
                export_pages_in_key_order,
                a_refused_batch_split_counts_only_committed_rows,
                energy_rebuild_in_small_pages_equals_incremental_slots,
                a_deferring_handle_reads_no_slots_until_they_match,
                presence_is_online_until_the_lease_ends_and_renewal_extends_it,
                presence_writes_bind_to_their_generation,
                presence_clean_shutdown_marks_only_its_own_devices_offline,
                presence_connects_take_generations_in_their_order_whatever_their_ids,
            );
        }
    };
    (@cases $fixture:expr; $($case:ident,)*) => {
        $(
            #[test]
            fn $case() {
                if let Some(f) = $fixture {
                    contract::$case(f);
                }
            }
        )*
    };
}

/// A fresh SQLite database in a temp dir.
fn sqlite_fixture() -> Option<Fixture> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("contract.db");
    let url = format!("sqlite:{}", path.display());
    let store = store::open(&url).unwrap();
    let dir_path = dir.path().to_path_buf();
    Some(Fixture {
        url,
        store,
        raw_bytes: Box::new(move || {
            let mut all = Vec::new();
            for entry in std::fs::read_dir(&dir_path).unwrap() {
                all.extend(std::fs::read(entry.unwrap().path()).unwrap());
            }
            Some(all)
        }),
        _guard: Box::new(dir),
    })
}

backend_suite!(sqlite, sqlite_fixture());

/// A fresh PostgreSQL database (see `ems_testkit::pg`), or `None` to skip.
fn pg_fixture() -> Option<Fixture> {
    let db = pg::fresh_db()?;
    let store = store::open(&db.url).unwrap();
    // The files on disk are reachable only for the private cluster.
    let cluster = pg::external_url()
        .is_none()
        .then(pg::shared_cluster)
        .flatten();
    let name = db.name.clone();
    Some(Fixture {
        url: db.url.clone(),
        store,
        raw_bytes: Box::new(move || cluster.and_then(|c| c.raw_bytes_of(&name))),
        _guard: Box::new(db),
    })
}

backend_suite!(postgres, pg_fixture());

mod postgres_only {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::{now_ms, pg, row, TestHub};
    use ems_hub::store::postgres::{PgMode, PgOptions, PgStore, TimescaleMode};
    use ems_hub::store::{self, HistoryStore, ReadingSink, StoreError};

    /// The example Grafana query of docs/storage/schema.md, with `$__timeFilter`
    /// expanded as Grafana does.
    const GRAFANA_QUERY: &str = "SELECT date_trunc('minute', ts) AS time, \
         device_id AS metric, \
         avg(power_w) AS value \
         FROM readings \
         WHERE ts BETWEEN '2023-11-14T22:00:00Z' AND '2023-11-14T23:00:00Z' \
           AND device_id IN ('d1') \
         GROUP BY 1, 2 \
         ORDER BY 1";

    fn admin(url: &str) -> postgres::Client {
        postgres::Client::connect(url, postgres::NoTls).unwrap()
    }

    #[test]
    fn schema_contract_and_plain_mode() {
        let Some(db) = pg::fresh_db() else { return };
        let mut s = PgStore::open(&db.url, &PgOptions::default()).unwrap();
        assert_eq!(s.mode(), PgMode::Plain);
        s.insert_batch(&[row("d1", 1, 1, 1_700_000_000_123)])
            .unwrap();
        let mut c = admin(&db.url);
        let types: Vec<(String, String)> = c
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns \
                 WHERE table_name = 'readings' ORDER BY ordinal_position",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let want = [
            ("device_id", "text"),
            ("meter", "text"),
            ("ts", "timestamp with time zone"),
            ("received_at", "timestamp with time zone"),
            ("epoch", "bigint"),
            ("seq", "bigint"),
            ("voltage_v", "double precision"),
            ("current_a", "double precision"),
            ("power_w", "double precision"),
            ("energy_wh", "double precision"),
            ("frequency_hz", "double precision"),
            ("power_factor", "double precision"),
            ("reactive_power_var", "double precision"),
            ("flags", "integer"),
        ];
        let got: Vec<(&str, &str)> = types
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(got, want);
        // ts is the sample time, exact to the millisecond.
        let exact: bool = c
            .query_one(
                "SELECT ts = to_timestamp(1700000000.123) AND \
                 received_at = to_timestamp(1700000000.128) FROM readings",
                &[],
            )
            .unwrap()
            .get(0);
        assert!(exact);
        let v: i32 = c
            .query_one("SELECT max(version) FROM schema_version", &[])
            .unwrap()
            .get(0);
        assert_eq!(v, ems_hub::store::postgres::SCHEMA_VERSION);
        assert_eq!(v, 5, "the schema's newest migration");
        // The docs' Grafana query runs on the contract table.
        let rows = c.query(GRAFANA_QUERY, &[]).unwrap();
        assert_eq!(rows.len(), 1);
        // Requiring TimescaleDB where it is missing is a clear open error.
        let e = PgStore::open(
            &db.url,
            &PgOptions {
                timescale: TimescaleMode::Require,
                ..PgOptions::default()
            },
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("TimescaleDB is required"), "{e}");
    }

    /// TimescaleDB cannot be installed here, so its statements run against
    /// stand-ins with TimescaleDB 2.x's names and named parameters: this
    /// checks their syntax and argument names on a real server, and that
    /// the index swap works on the real `readings` table.
    #[test]
    fn timescale_statements_run_against_a_stubbed_api() {
        use ems_hub::store::postgres::{timescale_sql, TimescaleState};
        let Some(db) = pg::fresh_db() else { return };
        let mut s = PgStore::open(&db.url, &PgOptions::default()).unwrap();
        s.insert_batch(&[row("d1", 1, 1, 10)]).unwrap();
        let mut c = admin(&db.url);
        c.batch_execute(
            "CREATE FUNCTION create_hypertable(relation regclass, time_column_name name, \
               if_not_exists boolean DEFAULT false, migrate_data boolean DEFAULT false) \
               RETURNS void LANGUAGE plpgsql AS $$ BEGIN END $$; \
             CREATE FUNCTION add_retention_policy(relation regclass, drop_after interval, \
               if_not_exists boolean DEFAULT false) RETURNS integer LANGUAGE sql AS 'SELECT 1'; \
             CREATE FUNCTION remove_retention_policy(relation regclass, \
               if_exists boolean DEFAULT false) RETURNS void LANGUAGE plpgsql AS $$ BEGIN END $$; \
             CREATE FUNCTION add_compression_policy(hypertable regclass, \
               compress_after interval, if_not_exists boolean DEFAULT false) \
               RETURNS integer LANGUAGE sql AS 'SELECT 1'; \
             CREATE FUNCTION remove_compression_policy(hypertable regclass, \
               if_exists boolean DEFAULT false) RETURNS boolean LANGUAGE sql AS 'SELECT true';",
        )
        .unwrap();
        let opts = PgOptions {
            retention_days: Some(30),
            compress_after_days: Some(7),
            ..PgOptions::default()
        };
        let sql = timescale_sql(&opts, TimescaleState::default());
        assert_eq!(sql.len(), 8);
        for stmt in &sql {
            if stmt.starts_with("ALTER TABLE readings SET (timescaledb.") {
                continue; // storage parameters only TimescaleDB knows
            }
            c.batch_execute(stmt)
                .unwrap_or_else(|e| panic!("{stmt}: {e}"));
        }
        let unique: Vec<String> = c
            .query(
                "SELECT indexdef FROM pg_indexes WHERE tablename = 'readings' \
                 AND indexdef LIKE 'CREATE UNIQUE%'",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(unique.len(), 1, "{unique:?}");
        assert!(
            unique[0].contains("(device_id, epoch, seq, ts)"),
            "{unique:?}"
        );
        // The store keeps working (and deduplicating) on the new index.
        s.insert_batch(&[row("d1", 1, 1, 10), row("d1", 1, 2, 20)])
            .unwrap();
        assert_eq!(s.readings("d1", 0, 100, 10).unwrap().len(), 2);
    }

    /// The URL's password appears in no log line and no error, through
    /// open, mode logging, a lost connection and the reconnect.
    #[test]
    fn the_password_never_reaches_logs_or_errors() {
        let Some(cluster) = pg::local_cluster("the password check (it cuts connections)") else {
            return;
        };
        // Every line of every target, through the process's one logger.
        ems_testkit::logs::capture(&[""]);
        let db = pg::create_db(&cluster.admin_url);
        // Trust authentication accepts any password, so this one is only
        // carried around, which is what we check.
        let secret = "pw-Zq8xK3vN";
        let url = db.url.replace(
            "postgres://postgres@",
            &format!("postgres://postgres:{secret}@"),
        );
        assert!(url.contains(secret));
        let mut s = PgStore::open(&url, &PgOptions::default()).unwrap();
        assert!(!format!("{s:?}").contains(secret));
        assert!(!s.redacted_url().contains(secret));
        s.insert_batch(&[row("d1", 1, 1, 1)]).unwrap();
        admin(&cluster.admin_url)
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                &[&db.name],
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let mut errors = Vec::new();
        for seq in 2..5 {
            if let Err(e) = s.insert_batch(&[row("d1", 1, seq, seq as i64)]) {
                errors.push(e.to_string());
                s.insert_batch(&[row("d1", 1, seq, seq as i64)]).unwrap();
            }
        }
        assert!(s.connects() >= 2);
        // A refused connection's error names the URL, without the secret.
        let bad = url.replace(&format!(":{}/", cluster.port), ":1/");
        errors.push(
            PgStore::open(&bad, &PgOptions::default())
                .err()
                .unwrap()
                .to_string(),
        );
        let logs = ems_testkit::logs::lines();
        assert!(
            logs.iter().any(|l| l.contains("postgres:***@")),
            "the store logs its (redacted) URL: {logs:?}"
        );
        for line in logs.iter().chain(&errors) {
            assert!(!line.contains(secret), "password leaked: {line}");
        }
    }

    /// A timestamp PostgreSQL cannot store must not make a batch fail on
    /// every retry (the writer would stall): the store refuses the batch
    /// (not an outage: the connection stays), and the writer isolates that
    /// row, quarantines it and commits the rest.
    #[test]
    fn unrepresentable_timestamps_do_not_stall_the_writer() {
        use ems_hub::ingest::writer::{Entry, Item, Writer, WriterConfig};
        use ems_hub::mailbox::{Answer, Mailbox};
        use ems_hub::store::QuarantineStore;

        let Some(db) = pg::fresh_db() else { return };
        let mut s = PgStore::open(&db.url, &PgOptions::default()).unwrap();
        let mut bad = row("d1", 1, 2, i64::MIN);
        bad.received_at_ms = 5;
        let batch = [row("d1", 1, 1, 10), bad, row("d1", 1, 3, 30)];
        let r = s.insert_batch(&batch);
        assert!(matches!(r, Err(StoreError::Refused(_))), "{r:?}");
        assert!(s.readings("d1", i64::MIN, i64::MAX, 10).unwrap().is_empty());
        assert_eq!(s.connects(), 1);

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let sink = Arc::new(Mailbox::new(1));
        for r in batch {
            tx.try_send(Item {
                entry: Entry::Reading(r),
                ack: sink.clone(),
            })
            .unwrap();
        }
        drop(tx);
        let cfg = WriterConfig {
            batch_max_rows: 10,
            batch_linger: Duration::from_millis(1),
            batch_run: 2,
        };
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        Writer::spawn(
            PgStore::open(&db.url, &PgOptions::default()).unwrap(),
            rx,
            cfg,
            stop_rx,
            rt.handle().clone(),
        )
        .unwrap()
        .join();
        let got = s.readings("d1", i64::MIN, i64::MAX, 10).unwrap();
        let seqs: Vec<u64> = got.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 3]);
        let q = s.quarantined(Some("d1"), 10).unwrap();
        assert_eq!(q.len(), 1, "{q:?}");
        assert_eq!((q[0].seq, q[0].reason.as_str()), (Some(2), "store_error"));
        assert!(q[0].detail.contains("outside PostgreSQL's range"), "{q:?}");
        let answers: Vec<Answer> = std::iter::from_fn(|| sink.try_pop()).collect();
        assert!(matches!(&answers[0], Answer::Rejected(1, 2, r) if r.starts_with("store_error: ")));
        assert_eq!(answers[1], Answer::Ack(1, 3));
        let late = s.insert_batch(&[row("d1", 1, 4, i64::MAX)]);
        assert!(matches!(late, Err(StoreError::Refused(_))), "{late:?}");
        assert_eq!(s.connects(), 1);
    }

    /// A database created by the first release (schema version 1, no
    /// quarantine) is upgraded in place: its readings stay, the quarantine
    /// table appears with the contract's columns.
    #[test]
    fn a_version_1_database_gains_the_quarantine_table() {
        use ems_hub::store::QuarantineStore;
        let Some(db) = pg::fresh_db() else { return };
        let mut s = PgStore::open(&db.url, &PgOptions::default()).unwrap();
        s.insert_batch(&[row("d1", 1, 1, 10)]).unwrap();
        drop(s);
        // Version 1 is today's schema without the later steps: 2 (the
        // quarantine table), 3 (the token change counter: its table,
        // function and triggers), 4 (the energy step's column and
        // tables) and 5 (the device state).
        let mut c = admin(&db.url);
        c.batch_execute(
            "DROP TABLE quarantine; \
             DROP FUNCTION ems_token_changed() CASCADE; DROP TABLE token_changes; \
             ALTER TABLE readings DROP COLUMN flags; \
             DROP TABLE energy_slots, energy_meters, energy_limits; \
             DROP TABLE device_state; \
             DELETE FROM schema_version; \
             INSERT INTO schema_version (version) VALUES (1);",
        )
        .unwrap();
        let mut s = PgStore::open(&db.url, &PgOptions::default()).unwrap();
        let v: i32 = c
            .query_one("SELECT max(version) FROM schema_version", &[])
            .unwrap()
            .get(0);
        assert_eq!(v, ems_hub::store::postgres::SCHEMA_VERSION);
        assert!(v >= 3);
        assert_eq!(s.readings("d1", 0, 100, 10).unwrap().len(), 1);
        // Migration 3 ran too: the counter row is there.
        let n: i64 = c
            .query_one("SELECT count(*) FROM token_changes", &[])
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
        // And migration 5: the device state, empty.
        let n: i64 = c
            .query_one("SELECT count(*) FROM device_state", &[])
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
        let cols: Vec<(String, String, String)> = c
            .query(
                "SELECT column_name::text, data_type::text, is_nullable::text \
                 FROM information_schema.columns \
                 WHERE table_name = 'quarantine' ORDER BY ordinal_position",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let want = [
            ("device_id", "text", "NO"),
            ("received_at", "timestamp with time zone", "NO"),
            ("epoch", "bigint", "YES"),
            ("seq", "bigint", "YES"),
            ("reason", "text", "NO"),
            ("detail", "text", "NO"),
            ("raw", "text", "YES"),
        ];
        let got: Vec<(&str, &str, &str)> = cols
            .iter()
            .map(|(a, b, n)| (a.as_str(), b.as_str(), n.as_str()))
            .collect();
        assert_eq!(got, want);
        assert!(s.quarantined(None, 10).unwrap().is_empty());
    }

    /// TimescaleDB mode's unique index is `(device_id, epoch, seq, ts)`
    /// (TimescaleDB requires the time column in every unique index), so a
    /// resend of `(epoch, seq)` with a *different* `ts` is not a conflict:
    /// it is stored as a second row. The ems-edge never does that (a
    /// resend is the spooled reading, `ts` included); the behaviour is
    /// pinned here and documented (docs/storage/schema.md). TimescaleDB is
    /// not installable here: the index swap `timescale_sql` makes stands in
    /// for the hypertable.
    #[test]
    fn timescale_mode_stores_a_resend_with_another_ts_as_a_second_row() {
        use ems_hub::store::postgres::{timescale_sql, TimescaleState};
        let Some(db) = pg::fresh_db() else { return };
        let mut s = PgStore::open(&db.url, &PgOptions::default()).unwrap();
        let mut c = admin(&db.url);
        for stmt in timescale_sql(&PgOptions::default(), TimescaleState::default()) {
            if !stmt.starts_with("SELECT create_hypertable") {
                c.batch_execute(&stmt).unwrap();
            }
        }
        let first = row("d1", 1, 1, 1_700_000_000_000);
        let mut same_ts = first.clone();
        same_ts.reading.power_w = Some(-1.0);
        let mut other_ts = first.clone();
        other_ts.reading.ts_ms += 1000;
        s.insert_batch(std::slice::from_ref(&first)).unwrap();
        // Same ts: deduplicated as in plain mode.
        s.insert_batch(&[same_ts]).unwrap();
        assert_eq!(
            s.readings("d1", 0, i64::MAX, 10).unwrap(),
            std::slice::from_ref(&first.reading)
        );
        // Another ts: a second row with the same (device_id, epoch, seq).
        s.insert_batch(&[other_ts.clone()]).unwrap();
        let got = s.readings("d1", 0, i64::MAX, 10).unwrap();
        assert_eq!(got, [first.reading, other_ts.reading]);
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM readings WHERE device_id = 'd1' AND epoch = 1 AND seq = 1",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(n, 2);
    }

    #[test]
    fn hubs_starting_together_on_an_empty_database() {
        let Some(db) = pg::fresh_db() else { return };
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let url = db.url.clone();
                std::thread::spawn(move || store::open(&url).map(|_| ()))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        let n: i64 = admin(&db.url)
            .query_one("SELECT count(*) FROM schema_version", &[])
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
    }

    #[test]
    fn multi_row_insert_keeps_the_contract() {
        let Some(db) = pg::fresh_db() else { return };
        let opts = PgOptions {
            write_method: ems_hub::store::postgres::WriteMethod::MultiRowInsert,
            ..PgOptions::default()
        };
        let mut s = PgStore::open(&db.url, &opts).unwrap();
        let rows: Vec<_> = (0..4500).map(|i| row("d1", 1, i, i as i64)).collect();
        s.insert_batch(&rows).unwrap();
        s.insert_batch(&rows[4000..]).unwrap();
        let got = s.readings("d1", 0, i64::MAX, usize::MAX).unwrap();
        assert_eq!(got.len(), 4500);
        assert_eq!(got[4499], rows[4499].reading);
    }

    #[test]
    fn every_write_method_dedups_inside_and_across_batches() {
        use ems_hub::store::postgres::WriteMethod;
        for method in [
            WriteMethod::Copy,
            WriteMethod::StagedCopy,
            WriteMethod::MultiRowInsert,
        ] {
            let Some(db) = pg::fresh_db() else { return };
            let opts = PgOptions {
                write_method: method,
                ..PgOptions::default()
            };
            let mut s = PgStore::open(&db.url, &opts).unwrap();
            let a = row("d1", 1, 1, 10);
            let mut a2 = a.clone();
            a2.reading.power_w = Some(-7.0);
            // In-batch duplicate, nothing stored yet: the first one wins.
            s.insert_batch(&[a.clone(), a2.clone(), row("d1", 1, 2, 20)])
                .unwrap();
            // Stored rows resent with new ones, several times in a row
            // (the fast path falls back, then comes back).
            for k in 0..20u64 {
                s.insert_batch(&[a2.clone(), row("d1", 1, 3 + k, 30 + k as i64)])
                    .unwrap();
            }
            s.insert_batch(&[row("d1", 2, 1, 100)]).unwrap();
            let got = s.readings("d1", 0, 1000, 1000).unwrap();
            assert_eq!(got.len(), 2 + 20 + 1, "{method:?}");
            assert_eq!(got[0], a.reading, "{method:?}");
            assert_eq!(s.connects(), 1, "a conflict must not cost a reconnect");
        }
    }

    #[test]
    fn a_dropped_connection_is_replaced_on_the_next_call() {
        let Some(db) = pg::fresh_db() else { return };
        let mut s = PgStore::open(&db.url, &PgOptions::default()).unwrap();
        s.insert_batch(&[row("d1", 1, 0, 0)]).unwrap();
        let mut c = admin(&db.url);
        c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&db.name],
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let others: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = $1 AND pid <> pg_backend_pid()",
                    &[&db.name],
                )
                .unwrap()
                .get(0);
            if others == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "backend did not terminate");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The first call may fail (StoreError::Db) or notice the closed
        // connection first; the one after a failure must work.
        let batch = [row("d1", 1, 1, 1)];
        match s.insert_batch(&batch) {
            Ok(()) => {}
            Err(StoreError::Db(msg)) => {
                assert!(!msg.contains('\n'));
                s.insert_batch(&batch).unwrap();
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
        assert_eq!(s.connects(), 2);
        // Resending after an uncertain commit stores nothing twice.
        s.insert_batch(&batch).unwrap();
        assert_eq!(s.readings("d1", 0, 10, 10).unwrap().len(), 2);
    }

    #[test]
    fn tls_is_verified() {
        let Some((cluster, ca)) = pg::tls_cluster("tls_is_verified") else {
            return;
        };
        let db = pg::create_db(&cluster.admin_url);
        let tls_url = format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            db.url,
            ca.display()
        );
        let mut s = store::open(&tls_url).unwrap();
        s.insert_batch(&[row("d1", 1, 0, 0)]).unwrap();
        let ssl_sessions: i64 = admin(&cluster.admin_url)
            .query_one(
                "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
                 WHERE ssl AND datname = $1",
                &[&db.name],
            )
            .unwrap()
            .get(0);
        assert!(ssl_sessions >= 1);
        // Without the CA the self-made certificate is refused.
        let e = store::open(&format!("{}?sslmode=require", db.url))
            .err()
            .unwrap()
            .to_string();
        assert!(e.to_lowercase().contains("certificate"), "{e}");
        drop(s);
    }

    /// The whole hub on PostgreSQL: admin command, authenticated device
    /// stream, acks after commit, graceful shutdown, rows in `readings`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hub_streams_into_postgres_end_to_end() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;

        let Some(db) = tokio::task::spawn_blocking(pg::fresh_db).await.unwrap() else {
            return;
        };
        let url = db.url.clone();
        let token = tokio::task::spawn_blocking(move || {
            ems_hub::admin::Admin::open(&url)
                .unwrap()
                .add_device("ems_pg")
                .unwrap()
        })
        .await
        .unwrap();
        let mut hub = TestHub::start_on(&db.url, |_| {}).await;
        let mut ws = hub.device("ems_pg", &token).await;
        const N: u64 = 500;
        let now = now_ms();
        for seq in 0..N {
            let frame = format!(
                "{{\"type\":\"reading\",\"epoch\":7,\"seq\":{seq},\"ts_ms\":{},\
                 \"meter\":\"main\",\"power_w\":{seq}.5}}",
                now - 60_000 + seq as i64
            );
            ws.send(Message::text(frame)).await.unwrap();
        }
        let acked = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(m) = ws.next().await {
                if let Ok(Message::Text(t)) = m {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "ack" && v["seq"] == N - 1 {
                        return true;
                    }
                }
            }
            false
        })
        .await
        .unwrap();
        assert!(acked, "no ack for the last reading");
        // Acked means committed: visible before the hub even stops.
        let url = db.url.clone();
        let n: i64 = tokio::task::spawn_blocking(move || {
            admin(&url)
                .query_one(
                    "SELECT count(*) FROM readings WHERE device_id = 'ems_pg' AND epoch = 7",
                    &[],
                )
                .unwrap()
                .get(0)
        })
        .await
        .unwrap();
        assert_eq!(n, N as i64);
        hub.stop().await.unwrap();
        drop(ws);
        tokio::task::spawn_blocking(move || drop(db)).await.unwrap();
    }

    /// The hub keeps a device streaming through a PostgreSQL restart: its
    /// writer retries, the backlog drains, the last reading is acked and
    /// every reading is stored exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hub_rides_out_a_postgres_restart() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;

        let opts = pg::ClusterOptions {
            fsync: false,
            tls: false,
        };
        let Some(cluster) =
            tokio::task::spawn_blocking(move || pg::own_cluster(opts, "the hub restart test"))
                .await
                .unwrap()
        else {
            return;
        };
        let cluster = Arc::new(cluster);
        let c2 = cluster.clone();
        let (db, token) = tokio::task::spawn_blocking(move || {
            let db = pg::create_db(&c2.admin_url);
            let t = ems_hub::admin::Admin::open(&db.url)
                .unwrap()
                .add_device("ems_r")
                .unwrap();
            (db, t)
        })
        .await
        .unwrap();
        let mut hub = TestHub::start_on(&db.url, |_| {}).await;
        let ws = hub.device("ems_r", &token).await;
        let (mut tx, mut rx) = ws.split();
        const N: u64 = 3000;
        let now = now_ms();
        let last_ack = Arc::new(AtomicU64::new(0));
        let acks = tokio::spawn({
            let last_ack = last_ack.clone();
            async move {
                while let Some(Ok(m)) = rx.next().await {
                    if let Message::Text(t) = m {
                        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                        if v["type"] == "ack" {
                            let seq = v["seq"].as_u64().unwrap();
                            last_ack.store(seq + 1, Ordering::SeqCst);
                            if seq == N - 1 {
                                return true;
                            }
                        }
                    }
                }
                false
            }
        });
        let (restarted_tx, restarted) = tokio::sync::oneshot::channel::<()>();
        let sender = tokio::spawn(async move {
            let mut restarted = Some(restarted);
            for seq in 0..N {
                if seq == N / 2 {
                    // The second half goes out only after the restart, so
                    // the writer must reconnect to store it.
                    if let Some(r) = restarted.take() {
                        let _ = r.await;
                    }
                }
                let frame = format!(
                    "{{\"type\":\"reading\",\"epoch\":3,\"seq\":{seq},\"ts_ms\":{},\
                     \"meter\":\"main\",\"energy_wh\":{seq}.0}}",
                    now - 120_000 + seq as i64
                );
                tx.send(Message::text(frame)).await.unwrap();
                if seq % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            tx
        });
        // Restart once some readings are acked, while the rest stream in.
        let deadline = Instant::now() + Duration::from_secs(120);
        while last_ack.load(Ordering::SeqCst) < 200 {
            assert!(Instant::now() < deadline, "no acks before the restart");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let c3 = cluster.clone();
        tokio::task::spawn_blocking(move || c3.restart().unwrap())
            .await
            .unwrap();
        let _ = restarted_tx.send(());
        let _tx = sender.await.unwrap();
        let all_acked = tokio::time::timeout(Duration::from_secs(180), acks)
            .await
            .expect("the last reading was never acked")
            .unwrap();
        assert!(all_acked);
        let url = db.url.clone();
        let (n, distinct): (i64, i64) = tokio::task::spawn_blocking(move || {
            let r = admin(&url)
                .query_one(
                    "SELECT count(*), count(DISTINCT seq) FROM readings \
                     WHERE device_id = 'ems_r' AND epoch = 3",
                    &[],
                )
                .unwrap();
            (r.get(0), r.get(1))
        })
        .await
        .unwrap();
        assert_eq!((n, distinct), (N as i64, N as i64));
        hub.stop().await.unwrap();
        tokio::task::spawn_blocking(move || {
            drop(db);
            drop(cluster);
        })
        .await
        .unwrap();
    }

    /// Stops and restarts PostgreSQL (twice) while a writer commits
    /// batches the way the hub's writer does: retry the same batch with
    /// backoff until it commits, sometimes resending one that already
    /// committed. Afterwards every row is there exactly once.
    #[test]
    fn restart_under_load_loses_and_duplicates_nothing() {
        let opts = pg::ClusterOptions {
            fsync: true,
            tls: false,
        };
        let Some(cluster) = pg::own_cluster(opts, "the restart test") else {
            return;
        };
        let db = pg::create_db(&cluster.admin_url);
        let mut s = PgStore::open(&db.url, &PgOptions::default()).unwrap();
        const ROWS: u64 = 200;
        let committed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writer =
            std::thread::spawn({
                let (committed, stop) = (committed.clone(), stop.clone());
                move || {
                    let deadline = Instant::now() + Duration::from_secs(300);
                    let mut failures = 0u64;
                    let mut b = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let mut rows: Vec<_> = (0..ROWS)
                            .map(|i| row("dev-r", 1 + b % 3, b * ROWS + i, (b * ROWS + i) as i64))
                            .collect();
                        if b % 7 == 6 {
                            // A resend of the previous batch rides along.
                            let p = b - 1;
                            rows.extend((0..ROWS).map(|i| {
                                row("dev-r", 1 + p % 3, p * ROWS + i, (p * ROWS + i) as i64)
                            }));
                        }
                        let mut backoff = Duration::from_millis(10);
                        while let Err(e) = s.insert_batch(&rows) {
                            assert!(Instant::now() < deadline, "no commit for too long: {e}");
                            failures += 1;
                            std::thread::sleep(backoff);
                            backoff = (backoff * 2).min(Duration::from_millis(500));
                        }
                        b += 1;
                        committed.store(b, Ordering::SeqCst);
                    }
                    (s, b, failures)
                }
            });
        let wait_for = |n: u64| {
            let deadline = Instant::now() + Duration::from_secs(240);
            while committed.load(Ordering::SeqCst) < n {
                assert!(Instant::now() < deadline, "writer stuck below {n} batches");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        wait_for(15);
        cluster.restart().unwrap();
        let after_first = committed.load(Ordering::SeqCst);
        wait_for(after_first + 15);
        cluster.restart().unwrap();
        let after_second = committed.load(Ordering::SeqCst);
        wait_for(after_second + 15);
        stop.store(true, Ordering::SeqCst);
        let (mut s, batches, failures) = writer.join().unwrap();
        eprintln!(
            "restart test: {batches} batches, {failures} failed attempts, {} connections",
            s.connects()
        );
        assert!(
            s.connects() >= 3,
            "both restarts must have forced a reconnect"
        );
        let mut c = admin(&db.url);
        let r = c
            .query_one(
                "SELECT count(*), count(DISTINCT (epoch, seq)), min(seq), max(seq) \
                 FROM readings WHERE device_id = 'dev-r'",
                &[],
            )
            .unwrap();
        let (n, distinct, min, max): (i64, i64, i64, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let want = (batches * ROWS) as i64;
        assert_eq!((n, distinct, min, max), (want, want, 0, want - 1));
        assert_eq!(
            s.readings("dev-r", 0, i64::MAX, usize::MAX).unwrap().len() as i64,
            want
        );
    }
}

mod sqlite_only {
    use ems_hub::store::{self, StoreError};

    #[test]
    fn unreadable_databases_give_one_line_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = store::open(&format!("sqlite:{}", dir.path().display()))
            .err()
            .unwrap();
        assert!(matches!(e, StoreError::Open { .. }));
        assert!(e.to_string().contains("is a directory"), "{e}");

        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, vec![b'x'; 8192]).unwrap();
        let e = store::open(&format!("sqlite:{}", junk.display()))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not an SQLite database"), "{e}");

        let missing = dir.path().join("no/such/dir/x.db");
        let e = store::open(&format!("sqlite:{}", missing.display()))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");

        for e in [
            store::open("mysql://u:pw@h/db").err().unwrap(),
            store::open("sqlite:").err().unwrap(),
        ] {
            let s = e.to_string();
            assert!(!s.contains('\n') && !s.contains("pw@"), "{s}");
        }
    }

    #[test]
    fn admin_cli_and_hub_share_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("shared.db").display());
        let mut hub = store::open(&url).unwrap();
        let writer = std::thread::spawn({
            let url = url.clone();
            move || {
                let mut s = store::open(&url).unwrap();
                for i in 0..200u64 {
                    s.insert_batch(&[super::row("d1", 1, i, i as i64)]).unwrap();
                }
            }
        });
        let mut admin = ems_hub::admin::Admin::open(&url).unwrap();
        for i in 0..20 {
            admin.add_device(&format!("dev{i}")).unwrap();
        }
        writer.join().unwrap();
        assert_eq!(hub.list_devices().unwrap().len(), 20);
        assert_eq!(hub.readings("d1", 0, 1000, 1000).unwrap().len(), 200);
    }
}

/// Faults on PostgreSQL through the whole hub: rows the database refuses,
/// TimescaleDB's refusals (stand-ins), and what the edge is told.
mod postgres_faults {
    use std::time::Duration;

    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    use super::pg;

    /// Generous bound for a loaded 2-core machine.
    const SOON: Duration = Duration::from_secs(30);

    type Ws = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    /// A hub on a fresh PostgreSQL database with device `ems_pg`, after
    /// `setup` ran on the database (as its owner).
    struct PgHub {
        db: Option<pg::TestDb>,
        url: String,
        addr: std::net::SocketAddr,
        token: String,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: Option<tokio::task::JoinHandle<Result<(), ems_hub::HubError>>>,
    }

    impl PgHub {
        async fn start(setup: &'static str) -> Option<PgHub> {
            let db = tokio::task::spawn_blocking(pg::fresh_db).await.unwrap()?;
            let url = db.url.clone();
            let token = tokio::task::spawn_blocking(move || {
                let t = ems_hub::admin::Admin::open(&url)
                    .unwrap()
                    .add_device("ems_pg")
                    .unwrap();
                postgres::Client::connect(&url, postgres::NoTls)
                    .unwrap()
                    .batch_execute(setup)
                    .unwrap();
                t
            })
            .await
            .unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let mut config = ems_hub::Config::new(db.url.clone());
            config.batch_linger = Duration::from_millis(50);
            let task = tokio::spawn(ems_hub::run(listener, config, async move {
                let _ = stopped.await;
            }));
            Some(PgHub {
                url: db.url.clone(),
                db: Some(db),
                addr,
                token,
                stop: Some(stop),
                task: Some(task),
            })
        }

        async fn device(&self) -> Ws {
            let mut req = format!("ws://{}/ws/device/ems_pg", self.addr)
                .into_client_request()
                .unwrap();
            req.headers_mut().insert(
                "authorization",
                format!("Bearer {}", self.token).parse().unwrap(),
            );
            tokio_tungstenite::connect_async(req).await.unwrap().0
        }

        /// Runs a query on the database (blocking pool).
        async fn query<T: Send + 'static>(
            &self,
            f: impl FnOnce(&mut postgres::Client) -> T + Send + 'static,
        ) -> T {
            let url = self.url.clone();
            tokio::task::spawn_blocking(move || {
                f(&mut postgres::Client::connect(&url, postgres::NoTls).unwrap())
            })
            .await
            .unwrap()
        }

        async fn stop(mut self) {
            if let Some(s) = self.stop.take() {
                let _ = s.send(());
            }
            if let Some(t) = self.task.take() {
                tokio::time::timeout(SOON, t)
                    .await
                    .expect("hub did not stop")
                    .unwrap()
                    .unwrap();
            }
            let db = self.db.take();
            tokio::task::spawn_blocking(move || drop(db)).await.unwrap();
        }
    }

    impl Drop for PgHub {
        /// Also on a failed assertion: stop the hub, and drop the database
        /// off the async runtime (its sync client cannot run inside one).
        fn drop(&mut self) {
            if let Some(s) = self.stop.take() {
                let _ = s.send(());
            }
            if let Some(db) = self.db.take() {
                let _ = std::thread::spawn(move || drop(db)).join();
            }
        }
    }

    fn now_ms() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    }

    fn reading(epoch: u64, seq: u64, ts_ms: i64, power_w: f64) -> String {
        format!(
            r#"{{"type":"reading","epoch":{epoch},"seq":{seq},"ts_ms":{ts_ms},"meter":"main","power_w":{power_w:?}}}"#
        )
    }

    async fn next_json(ws: &mut Ws) -> serde_json::Value {
        loop {
            let m = tokio::time::timeout(SOON, ws.next())
                .await
                .expect("timed out waiting for a frame from the hub")
                .expect("stream ended")
                .expect("socket error");
            if let Message::Text(t) = m {
                return serde_json::from_str(&t).unwrap();
            }
        }
    }

    /// Reads answers until the ack for `last`; returns the `rejected`
    /// frames as (seq, reason), checking that each came before any ack
    /// covering it.
    async fn answers_until(ws: &mut Ws, epoch: u64, last: u64) -> Vec<(u64, String)> {
        let mut rejected = Vec::new();
        let mut acked: Option<u64> = None;
        loop {
            let v = next_json(ws).await;
            assert_eq!(v["epoch"], epoch, "{v}");
            let seq = v["seq"].as_u64().unwrap();
            match v["type"].as_str() {
                Some("rejected") => {
                    assert!(
                        acked.map_or(true, |a| a < seq),
                        "rejected {seq} after an ack covering it ({acked:?})"
                    );
                    rejected.push((seq, v["reason"].as_str().unwrap().to_string()));
                }
                Some("ack") => {
                    acked = Some(seq);
                    if seq == last {
                        return rejected;
                    }
                }
                _ => panic!("unexpected {v}"),
            }
        }
    }

    /// epoch, seq, reason, detail, raw of a quarantine row.
    type QRow = (Option<i64>, Option<i64>, String, String, Option<String>);

    const REFUSE_1234: &str = "
        CREATE FUNCTION refuse_1234() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.power_w = 1234.5 THEN
                RAISE EXCEPTION 'power_w 1234.5 refused by test trigger';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_1234 BEFORE INSERT ON readings
            FOR EACH ROW EXECUTE FUNCTION refuse_1234();";

    /// One reading PostgreSQL refuses must not stall ingestion: it alone
    /// goes to quarantine with the database's message, the rest of its
    /// batch commits, acks flow.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_postgres_refuses_is_quarantined_and_the_rest_commit() {
        let Some(hub) = PgHub::start(REFUSE_1234).await else {
            return;
        };
        let mut ws = hub.device().await;
        let now = now_ms();
        for seq in 0..10u64 {
            let power = if seq == 4 { 1234.5 } else { seq as f64 };
            ws.send(Message::text(reading(3, seq, now + seq as i64, power)))
                .await
                .unwrap();
        }
        let rejected = answers_until(&mut ws, 3, 9).await;
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(rejected[0].0, 4);
        assert!(
            rejected[0].1.starts_with("store_error: ")
                && rejected[0].1.contains("refused by test trigger"),
            "{rejected:?}"
        );
        let (seqs, q) = hub
            .query(|c| {
                let seqs: Vec<i64> = c
                    .query("SELECT seq FROM readings ORDER BY seq", &[])
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let q: Vec<QRow> = c
                    .query(
                        "SELECT epoch, seq, reason, detail, raw FROM quarantine \
                         WHERE device_id = 'ems_pg'",
                        &[],
                    )
                    .unwrap()
                    .iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
                    .collect();
                (seqs, q)
            })
            .await;
        assert_eq!(seqs, [0, 1, 2, 3, 5, 6, 7, 8, 9]);
        assert_eq!(q.len(), 1, "{q:?}");
        assert_eq!((q[0].0, q[0].1), (Some(3), Some(4)));
        assert_eq!(q[0].2, "store_error");
        assert!(q[0].3.contains("refused by test trigger"), "{q:?}");
        assert!(q[0].4.as_deref().unwrap().contains("1234.5"), "{q:?}");
        drop(ws);
        hub.stop().await;
    }

    /// TimescaleDB before 2.11 refuses an insert into a compressed chunk
    /// of a table with a unique index (SQLSTATE 0A000), ON CONFLICT DO
    /// NOTHING included, and the extension is not installable here: a
    /// trigger with TimescaleDB's error stands in for a chunk compressed
    /// after 7 days. An edge resending an old, already stored reading then
    /// must not poison the writer: the resend alone is quarantined, newer
    /// readings commit and are acked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_old_resend_into_a_compressed_chunk_does_not_stall_the_writer() {
        let Some(hub) = PgHub::start("").await else {
            return;
        };
        let mut ws = hub.device().await;
        let old = now_ms() - 8 * 86_400_000;
        ws.send(Message::text(reading(1, 0, old, 10.0)))
            .await
            .unwrap();
        assert!(answers_until(&mut ws, 1, 0).await.is_empty());
        // The chunk holding it is compressed now.
        hub.query(|c| {
            c.batch_execute(
                "CREATE FUNCTION compressed_chunk() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                     IF NEW.ts < now() - interval '7 days' THEN
                         RAISE EXCEPTION 'insert into a compressed chunk that has primary or unique constraint is not supported'
                             USING ERRCODE = 'feature_not_supported';
                     END IF;
                     RETURN NEW;
                 END $$;
                 CREATE TRIGGER compressed_chunk BEFORE INSERT ON readings
                     FOR EACH ROW EXECUTE FUNCTION compressed_chunk();",
            )
            .unwrap()
        })
        .await;
        drop(ws);
        // The edge lost the ack, reconnects and resends it with new ones.
        let mut ws = hub.device().await;
        let now = now_ms();
        ws.send(Message::text(reading(1, 0, old, 10.0)))
            .await
            .unwrap();
        for seq in 1..5u64 {
            ws.send(Message::text(reading(1, seq, now + seq as i64, 1.0)))
                .await
                .unwrap();
        }
        let rejected = answers_until(&mut ws, 1, 4).await;
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(rejected[0].0, 0);
        assert!(rejected[0].1.contains("compressed chunk"), "{rejected:?}");
        let (n, quarantined) = hub
            .query(|c| {
                let n: i64 = c
                    .query_one("SELECT count(*) FROM readings", &[])
                    .unwrap()
                    .get(0);
                let q: i64 = c
                    .query_one(
                        "SELECT count(*) FROM quarantine WHERE reason = 'store_error' AND seq = 0",
                        &[],
                    )
                    .unwrap()
                    .get(0);
                (n, q)
            })
            .await;
        assert_eq!((n, quarantined), (5, 1));
        drop(ws);
        hub.stop().await;
    }

    /// A reading PostgreSQL refuses, whose quarantine row it refuses too,
    /// is neither stored nor quarantined: no ack covers it — not even the
    /// cumulative ack of a later reading committed meanwhile — and the
    /// connection is closed with 1011 so the edge sends it again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reading_neither_stored_nor_quarantined_is_never_acked() {
        let Some(hub) = PgHub::start(REFUSE_1234).await else {
            return;
        };
        hub.query(|c| {
            c.batch_execute(
                "CREATE FUNCTION refuse_all() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN RAISE EXCEPTION 'quarantine refused by test trigger'; END $$;
                 CREATE TRIGGER refuse_all BEFORE INSERT ON quarantine
                     FOR EACH ROW EXECUTE FUNCTION refuse_all();",
            )
            .unwrap()
        })
        .await;
        let mut ws = hub.device().await;
        let now = now_ms();
        for seq in 0..3u64 {
            ws.send(Message::text(reading(5, seq, now + seq as i64, 1.0)))
                .await
                .unwrap();
        }
        assert!(answers_until(&mut ws, 5, 2).await.is_empty());
        ws.send(Message::text(reading(5, 3, now + 3, 1234.5)))
            .await
            .unwrap();
        ws.send(Message::text(reading(5, 4, now + 4, 4.0)))
            .await
            .unwrap();
        let code = loop {
            let m = tokio::time::timeout(SOON, ws.next())
                .await
                .expect("connection still open");
            match m {
                None | Some(Err(_)) => break None,
                Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    assert!(
                        !(v["type"] == "ack" && v["seq"].as_u64().unwrap() >= 3),
                        "acked past the reading that was not committed: {v}"
                    );
                    assert_ne!(v["type"], "rejected", "{v}");
                }
                Some(Ok(_)) => {}
            }
        };
        assert_eq!(code, Some(1011));
        let n: i64 = hub
            .query(|c| {
                c.query_one("SELECT count(*) FROM quarantine", &[])
                    .unwrap()
                    .get(0)
            })
            .await;
        assert_eq!(n, 0);
        drop(ws);
        hub.stop().await;
    }
}
