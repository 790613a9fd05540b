//! The store contract: one suite, run against every backend.
//!
//! Each case in [`contract`] takes a [`Fixture`] (a fresh, empty database
//! of one backend) and checks one promise of `ems_hub::store::Store`. The
//! `backend_suite!` macro turns every case into a `#[test]` per backend, so
//! a backend cannot silently skip one.

use std::sync::Arc;

use ems_hub::store::{self, Row, Store};
use ems_shared::Reading;

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
        received_at_ms: ts_ms + 5,
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
    use ems_hub::admin::Admin;
    use ems_hub::store::{StoreError, ViewerScope};
    use ems_hub::token;

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
        // batch must roll back.
        let bad = row("d1", 1 << 63, 3, 1002);
        let r = f
            .store
            .insert_batch(&[row("d1", 1, 1, 1000), row("d1", 1, 2, 1001), bad]);
        assert!(matches!(r, Err(StoreError::Db(_))), "{r:?}");
        assert!(all(&mut *f.store, "d1").is_empty());
        // The handle is still usable afterwards.
        f.store.insert_batch(&[row("d1", 1, 1, 1000)]).unwrap();
        assert_eq!(all(&mut *f.store, "d1").len(), 1);
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
                eprintln!("raw database files not reachable; plaintext scan skipped");
                return;
            };
            assert!(raw.len() > 1000, "scanned too little ({when})");
            for t in &tokens {
                // The whole token and its random body alone.
                for needle in [t.as_bytes(), &t.as_bytes()[5..48]] {
                    assert!(
                        !raw.windows(needle.len()).any(|w| w == needle),
                        "a plaintext token is in the database files ({when})"
                    );
                }
            }
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
                history_by_time_range,
                device_admin,
                viewer_scopes_and_revocation,
                admin_tokens,
                data_survives_reopen,
                database_never_holds_a_plaintext_token,
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
