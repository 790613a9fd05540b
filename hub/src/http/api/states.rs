//! The state of many devices as both device lists (`/api/devices`,
//! `/api/admin/devices`) answer it: from the shared device state
//! (`device_state`, identical on every hub), refined by what this hub
//! knows first-hand about the devices connected to it (their registry
//! entry, live status and the readings not written yet).
//!
//! Cost: two store statements (the device states, the quarantine
//! counts), and a third only for devices that have no state yet (never
//! connected since the upgrade): their last seen from the readings. The
//! device states are read only for the devices this hub does not know
//! first-hand (see [`states`]): a hub listing the devices it serves
//! reads almost no rows.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use super::{store, ApiError};
use crate::fanout::registry::StatusEntry;
use crate::presence::LocalState;
use crate::state::Shared;
use crate::store::presence::{DeviceStateRow, LastReading, StatusSummary};

/// One device as the API lists it. The fields are declared in name order:
/// the answer is serialized straight from this struct (see
/// [`listing_body`]) and has always listed each object's keys sorted, as a
/// `serde_json::Value` map does.
#[derive(Debug, Serialize)]
pub(super) struct DeviceState {
    /// How far behind the device's outbox is, when it reports it.
    behind_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) created_ms: Option<i64>,
    device_id: String,
    /// The edge's loss counters from its last `status` frame, while it is
    /// connected and reports them: readings dropped for a full spool,
    /// skipped as damaged, dropped for a full disk, held in memory because
    /// the spool cannot be written.
    dropped: Option<u64>,
    dropped_damaged: Option<u64>,
    dropped_disk_full: Option<u64>,
    /// The hub holding its connection (`null` when offline).
    hub: Option<String>,
    /// The last reading per meter (empty when unknown).
    #[serde(serialize_with = "last_sorted")]
    last: Vec<LastReading>,
    last_seen_ms: Option<i64>,
    online: bool,
    /// When its current connection started (`null` when offline).
    online_since_ms: Option<i64>,
    /// Readings waiting in the device's outbox, when it reports them.
    outbox_depth: Option<u64>,
    /// Rows in the quarantine for this device.
    quarantined: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) revoked_ms: Option<Option<i64>>,
    unwritten: Option<u64>,
}

/// A `last` entry with its keys in name order.
#[derive(Serialize)]
struct LastSorted<'a> {
    energy_wh: Option<f64>,
    meter: &'a str,
    power_w: Option<f64>,
    ts: i64,
}

fn last_sorted<S: serde::Serializer>(last: &[LastReading], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(last.iter().map(|l| LastSorted {
        energy_wh: l.energy_wh,
        meter: &l.meter,
        power_w: l.power_w,
        ts: l.ts,
    }))
}

/// The device lists' answer, `{"devices":[…]}`, as JSON text: the same
/// text as serializing [`DeviceState`] with serde (a test holds them
/// equal), with the keys written as literal bytes — at 10,000 devices,
/// escaping some 200,000 constant keys was a tenth of the answer's cost.
pub(super) fn listing_body(list: &[DeviceState]) -> Result<Vec<u8>, ApiError> {
    // About 350 bytes per device with one meter.
    let mut out = Vec::with_capacity(64 + list.len() * 400);
    out.extend_from_slice(b"{\"devices\":[");
    for (i, d) in list.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        d.write_json(&mut out).map_err(|e| {
            log::error!("api: cannot serialize the device list: {e}");
            ApiError::Unavailable
        })?;
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}

impl DeviceState {
    /// This device as one JSON object, keys in name order (the order of
    /// the struct's fields).
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        fn key(out: &mut Vec<u8>, first: bool, name: &str) {
            if !first {
                out.push(b',');
            }
            out.push(b'"');
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
        }
        fn value(out: &mut Vec<u8>, v: &impl Serialize) -> serde_json::Result<()> {
            serde_json::to_writer(&mut *out, v)
        }
        out.push(b'{');
        key(out, true, "behind_ms");
        value(out, &self.behind_ms)?;
        if let Some(created) = self.created_ms {
            key(out, false, "created_ms");
            value(out, &created)?;
        }
        key(out, false, "device_id");
        value(out, &self.device_id)?;
        key(out, false, "dropped");
        value(out, &self.dropped)?;
        key(out, false, "dropped_damaged");
        value(out, &self.dropped_damaged)?;
        key(out, false, "dropped_disk_full");
        value(out, &self.dropped_disk_full)?;
        key(out, false, "hub");
        value(out, &self.hub)?;
        key(out, false, "last");
        out.push(b'[');
        for (i, l) in self.last.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'{');
            key(out, true, "energy_wh");
            value(out, &l.energy_wh)?;
            key(out, false, "meter");
            value(out, &l.meter)?;
            key(out, false, "power_w");
            value(out, &l.power_w)?;
            key(out, false, "ts");
            value(out, &l.ts)?;
            out.push(b'}');
        }
        out.push(b']');
        key(out, false, "last_seen_ms");
        value(out, &self.last_seen_ms)?;
        key(out, false, "online");
        value(out, &self.online)?;
        key(out, false, "online_since_ms");
        value(out, &self.online_since_ms)?;
        key(out, false, "outbox_depth");
        value(out, &self.outbox_depth)?;
        key(out, false, "quarantined");
        value(out, &self.quarantined)?;
        if let Some(revoked) = self.revoked_ms {
            key(out, false, "revoked_ms");
            value(out, &revoked)?;
        }
        key(out, false, "unwritten");
        value(out, &self.unwritten)?;
        out.push(b'}');
        Ok(())
    }
}

/// What this hub knows first-hand about a device connected to it.
struct Local {
    /// Connect time, Unix ms (when known).
    since_ms: Option<i64>,
    /// When a frame last came on this connection, Unix ms (when known).
    seen_ms: Option<i64>,
    /// The edge's last status.
    edge: Option<StatusEntry>,
    /// The last reading per meter of this connection.
    last: Vec<LastReading>,
}

/// Everything known about one device, for [`merge`].
struct Known<'a> {
    row: Option<DeviceStateRow>,
    local: Option<Local>,
    /// When this hub last saw it connect or disconnect, Unix ms.
    presence_ms: Option<i64>,
    /// Receive time of its newest stored reading (only looked up for
    /// devices without a state row).
    stored_seen: Option<i64>,
    quarantined: u64,
    /// This hub's id.
    me: &'a str,
    now_ms: i64,
}

/// The listed state of `device_id`. A device connected here is online
/// with this hub's live figures; a device whose row names this hub but
/// that is not connected here is offline (this hub knows it left before
/// the row does); any other device is as its row says.
fn merge(device_id: String, k: Known<'_>) -> DeviceState {
    let row = k.row;
    let seen = [
        row.as_ref().and_then(|r| r.last_seen_ms),
        k.local.as_ref().and_then(|l| l.seen_ms),
        k.presence_ms,
        k.stored_seen,
    ]
    .into_iter()
    .flatten()
    .max();
    let (online, hub, since, status, last) = match k.local {
        Some(local) => {
            let status = local.edge.map(|e| StatusSummary {
                rx_ms: e.rx_ms,
                outbox_depth: e.status.outbox_depth,
                behind_ms: e.behind_ms,
                dropped: e.status.dropped,
                unwritten: e.status.unwritten,
                dropped_disk_full: e.status.dropped_disk_full,
                dropped_damaged: e.status.dropped_damaged,
            });
            let since = local.since_ms.or(k.presence_ms);
            // The stored readings are decoded only when the connection
            // has none of its own yet.
            let last = if local.last.is_empty() {
                row.map(|r| r.last.decode()).unwrap_or_default()
            } else {
                local.last
            };
            (true, Some(k.me.to_owned()), since, status, last)
        }
        None => match row {
            Some(r) if r.online && r.hub.as_deref() != Some(k.me) => {
                (true, r.hub, r.online_since_ms, r.status, r.last.decode())
            }
            r => (
                false,
                None,
                None,
                None,
                r.map(|r| r.last.decode()).unwrap_or_default(),
            ),
        },
    };
    DeviceState {
        device_id,
        online,
        last_seen_ms: seen,
        outbox_depth: status.map(|s| s.outbox_depth),
        behind_ms: status.map(|s| {
            s.behind_ms
                .saturating_add(k.now_ms.saturating_sub(s.rx_ms).max(0))
        }),
        dropped: status.map(|s| s.dropped),
        unwritten: status.map(|s| s.unwritten),
        dropped_disk_full: status.map(|s| s.dropped_disk_full),
        dropped_damaged: status.map(|s| s.dropped_damaged),
        quarantined: k.quarantined,
        hub,
        online_since_ms: since,
        last,
        created_ms: None,
        revoked_ms: None,
    }
}

/// The state of the given devices, in their order.
///
/// What this hub knows first-hand comes first, gathered on the API's
/// low-priority thread with the registry and presence locks (ingest takes
/// them for every reading) held for a few devices at a time. A device
/// connected here that has sent a reading on this connection is then
/// fully known: the store is asked only about the others (devices on
/// other hubs, offline, or just connected), so a hub listing the devices
/// it serves reads few rows or none. The merge runs on the same thread.
pub(super) async fn states(
    shared: &Arc<Shared>,
    ids: Vec<String>,
) -> Result<Vec<DeviceState>, ApiError> {
    let now = crate::store::now_ms();
    let first_hand = Arc::clone(shared);
    let (ids, views, locals, me) = in_background(move || {
        let views = first_hand.registry.local_views(&ids);
        let locals = first_hand.presence.locals(&ids, |i| views[i].online);
        let me = first_hand.presence.hub_id().to_owned();
        (ids, views, locals, me)
    })
    .await?;
    let ask: Vec<String> = ids
        .iter()
        .zip(&locals)
        .filter(|(_, local)| needs_stored_state(local.as_ref()))
        .map(|(id, _)| id.clone())
        .collect();
    let (rows, quarantined, stored_seen) = store(shared, move |s| {
        let rows = s.device_states(&ask, now)?;
        let counts: HashMap<String, u64> = s.quarantine_counts()?.into_iter().collect();
        let known: HashSet<&str> = rows
            .iter()
            .filter(|r| r.last_seen_ms.is_some())
            .map(|r| r.device_id.as_str())
            .collect();
        let missing: Vec<String> = ask
            .iter()
            .filter(|id| !known.contains(id.as_str()))
            .cloned()
            .collect();
        let seen: HashMap<String, i64> = if missing.is_empty() {
            HashMap::new()
        } else {
            let seen = s.last_seen_many(&missing)?;
            missing
                .into_iter()
                .zip(seen)
                .filter_map(|(id, t)| Some((id, t?)))
                .collect()
        };
        Ok((rows, counts, seen))
    })
    .await?;
    in_background(move || {
        let mut rows: HashMap<String, DeviceStateRow> = rows
            .into_iter()
            .map(|mut r| (std::mem::take(&mut r.device_id), r))
            .collect();
        ids.into_iter()
            .zip(views)
            .zip(locals)
            .map(|((id, view), local)| {
                let local = view.online.then(|| match local {
                    Some(l) => Local {
                        since_ms: Some(l.since_ms),
                        seen_ms: Some(l.last_seen_ms),
                        edge: view.edge,
                        last: l.last,
                    },
                    None => Local {
                        since_ms: None,
                        seen_ms: None,
                        edge: view.edge,
                        last: Vec::new(),
                    },
                });
                let known = Known {
                    row: rows.remove(&id),
                    local,
                    presence_ms: view.presence_ms,
                    stored_seen: stored_seen.get(&id).copied(),
                    quarantined: quarantined.get(&id).copied().unwrap_or(0),
                    me: &me,
                    now_ms: now,
                };
                merge(id, known)
            })
            .collect()
    })
    .await
}

/// Whether a device's stored state adds to what this hub knows of it:
/// not for a device connected here that has sent a reading on this
/// connection (its connect time, last frame, status and last readings
/// are all here, and newer than the row this hub writes from them).
fn needs_stored_state(local: Option<&LocalState>) -> bool {
    local.map_or(true, |l| l.last.is_empty())
}

/// The device lists' answer ([`listing_body`]), written on the API's
/// low-priority thread (it takes no lock): at 10,000 devices it takes
/// milliseconds of CPU, which on a worker would hold back every device
/// session that worker serves (a hub pinned to one core has one worker),
/// and at normal priority would compete with ingest.
pub(super) async fn listing(list: Vec<DeviceState>) -> Result<Vec<u8>, ApiError> {
    in_background(move || listing_body(&list)).await?
}

/// Runs a step of a device list on the API's low-priority thread.
async fn in_background<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    super::background::run(f).await.map_err(|e| {
        log::error!("api: device list task failed: {e}");
        ApiError::Unavailable
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::presence::{encode_last, StoredLast};

    fn row(online: bool, hub: &str) -> DeviceStateRow {
        DeviceStateRow {
            device_id: "dev".into(),
            online,
            hub: Some(hub.into()),
            online_since_ms: Some(100),
            last_seen_ms: Some(500),
            status: Some(StatusSummary {
                rx_ms: 400,
                outbox_depth: 7,
                behind_ms: 50,
                ..Default::default()
            }),
            last: StoredLast::new(encode_last(&[LastReading {
                meter: "main".into(),
                ts: 450,
                power_w: Some(1.0),
                energy_wh: None,
            }])),
        }
    }

    fn known(row: Option<DeviceStateRow>, local: Option<Local>) -> Known<'static> {
        Known {
            row,
            local,
            presence_ms: None,
            stored_seen: None,
            quarantined: 0,
            me: "here:1",
            now_ms: 1_000,
        }
    }

    #[test]
    fn a_device_online_on_another_hub_is_listed_from_its_row() {
        let s = merge("dev".into(), known(Some(row(true, "there:2")), None));
        assert!(s.online);
        assert_eq!(s.hub.as_deref(), Some("there:2"));
        assert_eq!(s.online_since_ms, Some(100));
        assert_eq!(s.outbox_depth, Some(7));
        assert_eq!(s.behind_ms, Some(50 + 600), "grows since the report");
        assert_eq!((s.last_seen_ms, s.last.len()), (Some(500), 1));
    }

    #[test]
    fn offline_rows_and_rows_of_this_hub_without_a_connection_are_offline() {
        for r in [row(false, "there:2"), row(true, "here:1")] {
            let s = merge("dev".into(), known(Some(r), None));
            assert!(!s.online);
            assert_eq!(
                (s.hub, s.online_since_ms, s.outbox_depth),
                (None, None, None)
            );
            assert_eq!(s.last.len(), 1, "the last readings stay");
            assert_eq!(s.last_seen_ms, Some(500));
        }
    }

    #[test]
    fn a_device_connected_here_is_listed_first_hand() {
        let local = Local {
            since_ms: Some(900),
            seen_ms: None,
            edge: None,
            last: Vec::new(),
        };
        let mut k = known(Some(row(false, "there:2")), Some(local));
        k.presence_ms = Some(900);
        let s = merge("dev".into(), k);
        assert!(s.online);
        assert_eq!(s.hub.as_deref(), Some("here:1"));
        assert_eq!((s.online_since_ms, s.last_seen_ms), (Some(900), Some(900)));
        assert_eq!(s.outbox_depth, None, "no status on this connection yet");
        assert_eq!(s.last.len(), 1, "the stored readings until new ones come");
    }

    #[test]
    fn the_answer_is_written_with_every_key_sorted_as_a_value_map_has_it() {
        let mut with_status = known(Some(row(true, "there:2")), None);
        with_status.quarantined = 3;
        let mut states = vec![
            merge("a".into(), with_status),
            merge("b".into(), known(None, None)),
            merge("c".into(), known(Some(row(false, "there:2")), None)),
        ];
        states[2].last.push(LastReading {
            meter: "pv".into(),
            ts: 460,
            power_w: None,
            energy_wh: Some(12.5),
        });
        let mut admin = merge("d".into(), known(Some(row(true, "there:2")), None));
        admin.created_ms = Some(7);
        admin.revoked_ms = Some(None);
        states.push(admin);
        let mut revoked = merge("e".into(), known(None, None));
        (revoked.created_ms, revoked.revoked_ms) = (Some(8), Some(Some(9)));
        states.push(revoked);
        let direct = String::from_utf8(listing_body(&states).unwrap()).unwrap();
        let values: Vec<serde_json::Value> = states
            .iter()
            .map(|s| serde_json::to_value(s).unwrap())
            .collect();
        assert_eq!(
            direct,
            serde_json::json!({ "devices": values }).to_string(),
            "the same text as through a Value"
        );
        assert!(direct
            .starts_with("{\"devices\":[{\"behind_ms\":650,\"device_id\":\"a\",\"dropped\":0,"));
        assert!(direct.contains(
            "\"last\":[{\"energy_wh\":null,\"meter\":\"main\",\"power_w\":1.0,\"ts\":450}]"
        ));
        assert!(direct.contains("\"quarantined\":0,\"revoked_ms\":null,\"unwritten\":0},"));
        assert!(direct.contains("\"revoked_ms\":9,\"unwritten\":null}]}"));
    }

    #[test]
    fn only_devices_not_fully_known_here_are_read_from_the_store() {
        let here = |last: Vec<LastReading>| LocalState {
            since_ms: 1,
            last_seen_ms: 2,
            last,
        };
        assert!(needs_stored_state(None), "offline or on another hub");
        assert!(
            needs_stored_state(Some(&here(Vec::new()))),
            "connected here, no reading yet: the stored last readings are shown"
        );
        let reading = LastReading {
            meter: "main".into(),
            ts: 2,
            power_w: None,
            energy_wh: None,
        };
        assert!(!needs_stored_state(Some(&here(vec![reading]))));
    }

    #[test]
    fn a_device_connected_here_was_last_seen_at_its_last_frame() {
        let local = Local {
            since_ms: Some(900),
            seen_ms: Some(1_500),
            edge: None,
            last: Vec::new(),
        };
        let s = merge("dev".into(), known(Some(row(true, "here:1")), Some(local)));
        assert_eq!(s.last_seen_ms, Some(1_500), "newer than the row's 500");
        let s = merge("dev".into(), known(None, None));
        assert_eq!(s.last_seen_ms, None);
    }

    #[test]
    fn a_device_without_state_uses_the_stored_readings() {
        let mut k = known(None, None);
        k.stored_seen = Some(42);
        let s = merge("dev".into(), k);
        assert_eq!((s.online, s.last_seen_ms), (false, Some(42)));
        assert!(s.last.is_empty() && s.hub.is_none());
        let v = serde_json::to_value(&s).unwrap();
        assert!(v["hub"].is_null() && v["online_since_ms"].is_null(), "{v}");
        assert_eq!(v["last"], serde_json::json!([]));
    }
}
