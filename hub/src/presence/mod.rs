//! This hub's part in the shared device state (`device_state`, see
//! [`crate::store::presence`]): what its device connections did, kept in
//! memory and written by one background task in batches, and the
//! cross-hub takeover.
//!
//! - Device sessions tell [`Presence`] about connects, disconnects,
//!   readings and `status` frames: map updates under a mutex, never a
//!   store call on the ingest path.
//! - The task ([`task::run`]) wakes every `presence_tick` (and at once after a
//!   connect or disconnect) and writes, in one transaction: the pending
//!   connects and disconnects, the state of every device that changed —
//!   at most once per `presence_flush`, and with each renewal —, and every
//!   `presence_renew` the lease of every device online here
//!   (`presence_lease` ahead). A hub
//!   that dies stops renewing; its devices are offline for every hub once
//!   their lease ends.
//! - Cross-hub takeover: a connect takes the next connection generation.
//!   The same transaction reads the generations written since the last
//!   tick; a device connected here whose generation is older than a newer
//!   one (a connect on another hub) has its socket closed with 4000.
//! - At a clean shutdown, [`task::shutdown`] writes what is pending and marks
//!   every device of this hub offline; at start, [`task::start`] does the same
//!   for what a previous run under the same hub id left online.
//!
//! This file holds the map and what the task takes from it; [`task`] the
//! task and the start and shutdown writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ems_shared::{EdgeStatus, Reading};
use tokio::sync::Notify;

use crate::config::LOCK_CHUNK;
use crate::store::presence::{
    Connect, Disconnect, LastReading, PresenceSync, StateUpdate, StatusSummary, SyncAnswer,
};

pub(crate) mod task;

/// What this hub knows about its device connections, waiting to be
/// written.
pub(crate) struct Presence {
    /// This hub's id (`device_state.hub`).
    hub_id: String,
    /// The pending changes.
    inner: Mutex<Pending>,
    /// Wakes the task after a connect or disconnect.
    wake: Notify,
}

/// One live device connection of this hub.
struct Local {
    /// The registry's connection id.
    conn_id: u64,
    /// Connect time, Unix ms.
    since_ms: i64,
    /// The generation its connect got; `None` until it is written.
    generation: Option<i64>,
    /// Changed since the last write.
    dirty: bool,
    /// When a frame last came, Unix ms.
    last_seen_ms: i64,
    /// Its last `status` frame (boxed: an idle connection, or an edge
    /// that does not report, has none, and the entry is then 56 bytes
    /// smaller).
    status: Option<Box<StatusSummary>>,
    /// The last reading of each meter.
    last: BTreeMap<Arc<str>, LastReading>,
}

#[derive(Default)]
struct Pending {
    /// The live connections by device. Boxed: the map is sized for up to
    /// twice its entries, and an empty slot then costs a pointer rather
    /// than a whole entry (~130 bytes per device connection saved).
    conns: HashMap<Arc<str>, Box<Local>>,
    /// Connects not written yet: connection id and time, the latest per
    /// device.
    connects: HashMap<Arc<str>, (u64, i64)>,
    /// Disconnects not written yet, the latest per device.
    disconnects: HashMap<Arc<str>, Disconnect>,
    /// Devices whose entry in `conns` became dirty since the last flush
    /// (an id once per change from clean to dirty): a flush visits these,
    /// not the whole map.
    dirty: Vec<Arc<str>>,
}

impl Pending {
    /// Marks the connection of `device_id` changed.
    fn touch(&mut self, device_id: &str) -> Option<&mut Local> {
        let local = self.conns.get_mut(device_id)?;
        if !local.dirty {
            local.dirty = true;
            // Once per flush period: the key is looked up again for its
            // shared name.
            if let Some((key, _)) = self.conns.get_key_value(device_id) {
                self.dirty.push(key.clone());
            }
        }
        self.conns.get_mut(device_id).map(|l| &mut **l)
    }
}

/// A device connection of this hub as the device lists see it.
pub(crate) struct LocalState {
    /// Connect time, Unix ms.
    pub since_ms: i64,
    /// When a frame last came, Unix ms.
    pub last_seen_ms: i64,
    /// The last reading of each meter (in meter order).
    pub last: Vec<LastReading>,
}

/// What one tick takes from [`Pending`] to write.
#[derive(Default)]
pub(crate) struct Batch {
    connects: Vec<(Arc<str>, u64, Connect)>,
    /// The connections whose state is in `states` (to mark them changed
    /// again if the write fails).
    updates: Vec<(Arc<str>, u64)>,
    /// Their states, in the same order, until [`Presence::sync`] moves
    /// them into the write.
    states: Vec<StateUpdate>,
    disconnects: Vec<(Arc<str>, Disconnect)>,
}

fn lock(m: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    // Every change is a single map operation: a panic cannot leave the
    // maps half changed.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Presence {
    /// Presence of the hub `hub_id`.
    pub fn new(hub_id: String) -> Self {
        Presence {
            hub_id,
            inner: Mutex::new(Pending::default()),
            wake: Notify::new(),
        }
    }

    /// This hub's id.
    pub fn hub_id(&self) -> &str {
        &self.hub_id
    }

    /// A device connection `conn_id` started at `now_ms`.
    pub fn connected(&self, device_id: &Arc<str>, conn_id: u64, now_ms: i64) {
        let mut p = lock(&self.inner);
        p.conns.insert(
            device_id.clone(),
            Box::new(Local {
                conn_id,
                since_ms: now_ms,
                generation: None,
                dirty: false,
                last_seen_ms: now_ms,
                status: None,
                last: BTreeMap::new(),
            }),
        );
        // The connect overwrites the row: an older disconnect need not be
        // written first.
        p.disconnects.remove(device_id);
        p.connects.insert(device_id.clone(), (conn_id, now_ms));
        drop(p);
        self.wake.notify_one();
    }

    /// The device connection `conn_id` ended at `now_ms` (nothing happens
    /// when it is no longer the device's current one).
    pub fn disconnected(&self, device_id: &Arc<str>, conn_id: u64, now_ms: i64) {
        let mut p = lock(&self.inner);
        if p.conns.get(device_id).map(|l| l.conn_id) != Some(conn_id) {
            return;
        }
        let Some(local) = p.conns.remove(device_id) else {
            return;
        };
        // A connect never written is dropped with its disconnect.
        if p.connects.get(device_id).map(|c| c.0) == Some(conn_id) {
            p.connects.remove(device_id);
        }
        p.disconnects.insert(
            device_id.clone(),
            Disconnect {
                device_id: device_id.to_string(),
                generation: local.generation,
                at_ms: now_ms,
                last: local.last.into_values().collect(),
            },
        );
        drop(p);
        self.wake.notify_one();
    }

    /// A valid reading of a connected device, received at `rx_ms`.
    pub fn reading(&self, device_id: &str, reading: &Reading, rx_ms: i64) {
        let mut p = lock(&self.inner);
        let Some(local) = p.touch(device_id) else {
            return;
        };
        local.last_seen_ms = local.last_seen_ms.max(rx_ms);
        // Updated in place: a meter's entry is allocated once, at its
        // first reading, not for every reading.
        match local.last.get_mut(reading.meter.as_str()) {
            // A backlog reading older than the one kept does not replace it.
            Some(kept) if kept.ts > reading.ts_ms => {}
            Some(kept) => {
                kept.ts = reading.ts_ms;
                kept.power_w = reading.power_w;
                kept.energy_wh = reading.energy_wh;
            }
            None => {
                let meter: Arc<str> = Arc::from(reading.meter.as_str());
                let entry = LastReading {
                    meter: meter.clone(),
                    ts: reading.ts_ms,
                    power_w: reading.power_w,
                    energy_wh: reading.energy_wh,
                };
                local.last.insert(meter, entry);
            }
        }
    }

    /// A `status` frame of a connected device, received at `rx_ms`.
    pub fn status(&self, device_id: &str, status: &EdgeStatus, rx_ms: i64) {
        let mut p = lock(&self.inner);
        let Some(local) = p.touch(device_id) else {
            return;
        };
        local.last_seen_ms = local.last_seen_ms.max(rx_ms);
        let summary = StatusSummary {
            rx_ms,
            outbox_depth: status.outbox_depth,
            behind_ms: status.behind_ms(rx_ms),
            dropped: status.dropped,
            unwritten: status.unwritten,
            dropped_disk_full: status.dropped_disk_full,
            dropped_damaged: status.dropped_damaged,
        };
        // Allocated at the first status frame, overwritten after.
        match &mut local.status {
            Some(kept) => **kept = summary,
            None => local.status = Some(Box::new(summary)),
        }
    }

    /// What this hub knows first-hand of each of `ids` that is `online`
    /// and connected here (the others are `None`), in their order. The
    /// lock every reading also takes is held for [`LOCK_CHUNK`] devices at
    /// a time: each device's entry is as it was at one instant, the list
    /// as a whole spans the pass.
    pub fn locals(
        &self,
        ids: &[String],
        online: impl Fn(usize) -> bool,
    ) -> Vec<Option<LocalState>> {
        let mut out = Vec::with_capacity(ids.len());
        for (c, chunk) in ids.chunks(LOCK_CHUNK).enumerate() {
            let p = lock(&self.inner);
            for (j, id) in chunk.iter().enumerate() {
                let local = online(c * LOCK_CHUNK + j)
                    .then(|| p.conns.get(id.as_str()))
                    .flatten()
                    .map(|l| LocalState {
                        since_ms: l.since_ms,
                        last_seen_ms: l.last_seen_ms,
                        last: l.last.values().cloned().collect(),
                    });
                out.push(local);
            }
        }
        out
    }

    /// Takes what is due: every pending connect and disconnect, and — when
    /// `flush` — the state of every changed device whose connect is
    /// written. The changed devices are visited [`LOCK_CHUNK`] at a time,
    /// each visit a short hold of the lock every reading takes; call it
    /// off the async workers (at 10,000 devices it is milliseconds).
    fn take(&self, flush: bool) -> Batch {
        let mut batch = Batch::default();
        let changed = {
            let mut p = lock(&self.inner);
            for (id, (conn_id, at_ms)) in p.connects.drain() {
                let connect = Connect {
                    device_id: id.to_string(),
                    at_ms,
                };
                batch.connects.push((id, conn_id, connect));
            }
            batch.disconnects = p.disconnects.drain().collect();
            if !flush {
                return batch;
            }
            std::mem::take(&mut p.dirty)
        };
        // A device whose connect is not written yet stays changed, for a
        // later flush.
        let mut unwritten = Vec::new();
        for chunk in changed.chunks(LOCK_CHUNK) {
            let mut p = lock(&self.inner);
            for id in chunk {
                let Some(local) = p.conns.get_mut(id).filter(|l| l.dirty) else {
                    continue;
                };
                let Some(generation) = local.generation else {
                    unwritten.push(id.clone());
                    continue;
                };
                local.dirty = false;
                let update = StateUpdate {
                    device_id: id.to_string(),
                    generation,
                    last_seen_ms: local.last_seen_ms,
                    status: local.status.as_deref().copied(),
                    last: local.last.values().cloned().collect(),
                };
                batch.updates.push((id.clone(), local.conn_id));
                batch.states.push(update);
            }
        }
        if !unwritten.is_empty() {
            lock(&self.inner).dirty.extend(unwritten);
        }
        batch
    }

    /// After a written batch: notes the generations of its connects and
    /// returns the connections taken over by a newer connect elsewhere.
    fn settle(&self, batch: Batch, answer: &SyncAnswer) -> Vec<(Arc<str>, u64)> {
        let mut p = lock(&self.inner);
        for ((id, conn_id, _), generation) in batch.connects.into_iter().zip(&answer.generations) {
            if let Some(local) = p.conns.get_mut(&id).filter(|l| l.conn_id == conn_id) {
                local.generation = Some(*generation);
            }
        }
        taken_over(&p.conns, &answer.changes)
    }

    /// After a failed batch: puts it back (what a newer change replaced is
    /// not).
    fn restore(&self, batch: Batch) {
        let mut p = lock(&self.inner);
        for (id, conn_id, c) in batch.connects {
            if p.conns.get(&id).map(|l| l.conn_id) == Some(conn_id) {
                p.connects.entry(id).or_insert((conn_id, c.at_ms));
            }
        }
        for (id, d) in batch.disconnects {
            if !p.conns.contains_key(&id) {
                p.disconnects.entry(id).or_insert(d);
            }
        }
        for (id, conn_id) in batch.updates {
            if p.conns.get(&id).is_some_and(|l| l.conn_id == conn_id) {
                p.touch(&id);
            }
        }
    }

    /// The sync of `batch` at `now_ms`; the device states move into it
    /// (10,000 of them need not be copied, nor freed by whoever keeps the
    /// batch).
    fn sync(&self, batch: &mut Batch, now_ms: i64, lease: Duration) -> PresenceSync {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        PresenceSync {
            hub: self.hub_id.clone(),
            now_ms,
            lease_until_ms: now_ms.saturating_add(lease_ms),
            connects: batch.connects.iter().map(|c| c.2.clone()).collect(),
            updates: std::mem::take(&mut batch.states),
            disconnects: batch.disconnects.iter().map(|d| d.1.clone()).collect(),
            ..Default::default()
        }
    }
}

/// The live connections whose written generation is older than a newer
/// connect of the same device in `changes`. A connection whose connect is
/// not written yet is left alone: its own connect will be the newest.
fn taken_over(
    conns: &HashMap<Arc<str>, Box<Local>>,
    changes: &[(String, i64)],
) -> Vec<(Arc<str>, u64)> {
    changes
        .iter()
        .filter_map(|(id, generation)| {
            let (key, local) = conns.get_key_value(id.as_str())?;
            (local.generation? < *generation).then(|| (key.clone(), local.conn_id))
        })
        .collect()
}

/// The default hub id: `<hostname>:<port>` (the host name from the
/// kernel, else `$HOSTNAME`, else `hub`).
pub(crate) fn default_hub_id(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "hub".into());
    format!("{host}:{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(meter: &str, ts_ms: i64, power: f64) -> Reading {
        Reading {
            ts_ms,
            meter: meter.into(),
            power_w: Some(power),
            ..Default::default()
        }
    }

    #[test]
    fn a_connect_and_its_disconnect_in_one_batch_write_only_the_disconnect() {
        let p = Presence::new("h".into());
        let id: Arc<str> = Arc::from("dev");
        p.connected(&id, 1, 100);
        p.reading("dev", &reading("main", 90, 5.0), 101);
        p.disconnected(&id, 1, 102);
        let b = p.take(true);
        assert!(b.connects.is_empty());
        assert!(b.updates.is_empty());
        assert_eq!(b.disconnects.len(), 1);
        let d = &b.disconnects[0].1;
        assert_eq!((d.generation, d.at_ms), (None, 102));
        assert_eq!(d.last[0].power_w, Some(5.0));
    }

    #[test]
    fn the_latest_status_frame_is_written_and_an_idle_entry_stays_small() {
        // An idle connection's entry holds no status: one allocation of at
        // most 80 bytes per device connection.
        assert!(std::mem::size_of::<Local>() <= 80);
        let p = Presence::new("h".into());
        let id: Arc<str> = Arc::from("dev");
        p.connected(&id, 1, 100);
        let answer = SyncAnswer {
            generations: vec![3],
            changes: vec![("dev".into(), 3)],
            max_generation: 3,
        };
        let b = p.take(true);
        assert!(p.settle(b, &answer).is_empty());
        for depth in [5, 9] {
            let status = EdgeStatus {
                outbox_depth: depth,
                ..Default::default()
            };
            p.status("dev", &status, 200 + depth as i64);
        }
        let b = p.take(true);
        let s = b.states[0].status.expect("a status");
        assert_eq!((s.outbox_depth, s.rx_ms), (9, 209));
        assert_eq!(b.states[0].last_seen_ms, 209);
    }

    #[test]
    fn updates_wait_for_the_connect_and_keep_the_newest_reading_per_meter() {
        let p = Presence::new("h".into());
        let id: Arc<str> = Arc::from("dev");
        p.connected(&id, 1, 100);
        p.reading("dev", &reading("main", 200, 5.0), 201);
        p.reading("dev", &reading("main", 150, 1.0), 202);
        p.reading("dev", &reading("pv", 199, -3.0), 203);
        let b = p.take(true);
        assert_eq!(b.connects.len(), 1);
        assert!(b.updates.is_empty(), "no generation yet");
        let answer = SyncAnswer {
            generations: vec![7],
            changes: vec![("dev".into(), 7)],
            max_generation: 7,
        };
        assert!(p.settle(b, &answer).is_empty(), "its own connect");
        assert!(p.take(false).updates.is_empty(), "not due");
        let b = p.take(true);
        assert_eq!(b.updates.len(), 1);
        let u = &b.states[0];
        assert_eq!((u.generation, u.last_seen_ms), (7, 203));
        let last: Vec<(&str, i64)> = u.last.iter().map(|l| (&*l.meter, l.ts)).collect();
        assert_eq!(last, [("main", 200), ("pv", 199)]);
        assert!(p.take(true).updates.is_empty(), "written once");
    }

    #[test]
    fn a_newer_generation_elsewhere_takes_over_a_written_connection_only() {
        let p = Presence::new("h".into());
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        p.connected(&a, 1, 100);
        let batch = p.take(true);
        let answer = SyncAnswer {
            generations: vec![3],
            ..Default::default()
        };
        assert!(p.settle(batch, &answer).is_empty());
        p.connected(&b, 2, 100);
        let changes = vec![
            ("a".to_owned(), 4),
            ("b".to_owned(), 5),
            ("c".to_owned(), 6),
        ];
        let answer = SyncAnswer {
            changes,
            ..Default::default()
        };
        let kicked = p.settle(Batch::default(), &answer);
        assert_eq!(kicked, vec![(a, 1)], "b's connect is not written yet");
    }

    #[test]
    fn a_failed_batch_is_put_back() {
        let p = Presence::new("h".into());
        let id: Arc<str> = Arc::from("dev");
        p.connected(&id, 1, 100);
        let b = p.take(true);
        p.restore(b);
        assert_eq!(p.take(true).connects.len(), 1);
        let gone: Arc<str> = Arc::from("gone");
        p.connected(&gone, 2, 100);
        let _ = p.take(true);
        p.disconnected(&gone, 2, 101);
        let b = p.take(true);
        p.restore(b);
        assert_eq!(p.take(true).disconnects.len(), 1);
    }

    /// Connects `n` devices and writes their connects (generation 1..).
    fn written(p: &Presence, n: usize) -> Vec<Arc<str>> {
        let ids: Vec<Arc<str>> = (0..n).map(|i| Arc::from(format!("dev-{i}"))).collect();
        for (i, id) in ids.iter().enumerate() {
            p.connected(id, i as u64, 100);
        }
        let batch = p.take(true);
        let answer = SyncAnswer {
            generations: (1..=n as i64).collect(),
            ..Default::default()
        };
        let order: Vec<Arc<str>> = batch.connects.iter().map(|c| c.0.clone()).collect();
        assert!(p.settle(batch, &answer).is_empty());
        order
    }

    #[test]
    fn a_flush_writes_every_changed_device_once_across_lock_chunks() {
        let p = Presence::new("h".into());
        let n = LOCK_CHUNK * 2 + 5;
        let ids = written(&p, n);
        for (i, id) in ids.iter().enumerate() {
            p.reading(id, &reading("main", 200 + i as i64, 1.0), 300);
            // A second reading does not list the device twice.
            p.reading(id, &reading("main", 201 + i as i64, 2.0), 301);
        }
        let b = p.take(true);
        let mut got: Vec<&str> = b.updates.iter().map(|u| &*u.0).collect();
        got.sort_unstable();
        let mut want: Vec<&str> = ids.iter().map(|id| &**id).collect();
        want.sort_unstable();
        assert_eq!(got, want);
        assert!(b.states.iter().all(|u| u.last[0].power_w == Some(2.0)));
        assert!(p.take(true).updates.is_empty(), "nothing changed since");
    }

    #[test]
    fn a_failed_flush_is_written_by_the_next_and_a_reconnect_once() {
        let p = Presence::new("h".into());
        let ids = written(&p, 2);
        p.reading(&ids[0], &reading("main", 200, 1.0), 300);
        p.reading(&ids[1], &reading("main", 200, 1.0), 300);
        let b = p.take(true);
        assert_eq!(b.updates.len(), 2);
        p.restore(b);
        assert_eq!(p.take(true).updates.len(), 2, "put back");
        // Changed, then reconnected before the flush: the new connection
        // has no written connect yet, so it waits; the old one is gone.
        p.reading(&ids[0], &reading("main", 300, 1.0), 400);
        p.connected(&ids[0], 99, 401);
        p.reading(&ids[0], &reading("main", 301, 1.0), 402);
        let b = p.take(true);
        assert_eq!(b.connects.len(), 1);
        assert!(
            b.updates.is_empty(),
            "the new connection's connect is not written"
        );
        let answer = SyncAnswer {
            generations: vec![9],
            ..Default::default()
        };
        assert!(p.settle(b, &answer).is_empty());
        let b = p.take(true);
        assert_eq!(b.updates.len(), 1, "once, though listed twice");
        assert_eq!((b.updates[0].1, b.states[0].generation), (99, 9));
    }

    #[test]
    fn default_hub_id_names_the_port() {
        assert!(default_hub_id(8080).ends_with(":8080"));
    }
}
