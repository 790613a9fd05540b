//! The bridge's state machine, without I/O: what the broker should hold
//! (devices, meters, their measurements, presence, removals) and what
//! still has to be published to get it there.
//!
//! The outbox is a set of dirty keys, not a queue of messages: a message is
//! built from the current state when it is taken ([`State::next`]), so a
//! broker that is slow or gone costs memory per entity, never per reading,
//! and the latest value always wins. After every (re)connect everything
//! retained is marked dirty again, because a broker restarted without
//! persistence has forgotten it.
//!
//! Losses it counts (in [`Counters`]): a state that was due (its interval
//! had ended) but was superseded by a newer reading before it could be
//! handed to the client, or had become backlog by the time it could; a
//! state handed to the client but discarded on a connection loss.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;

use super::discovery::{self, Layout, MEASUREMENTS, OFFLINE, ONLINE, RESERVED_DEVICE_ID};
use super::stats::Counters;

/// One reading's values and times.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    /// Sample time (the reading's `ts_ms`).
    pub ts_ms: i64,
    /// When the hub received it, Unix ms.
    pub rx_ms: i64,
    /// Values in [`MEASUREMENTS`] order.
    pub values: [Option<f64>; 7],
}

/// What the hub tells the bridge.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Input {
    /// A valid reading of `meter` on `device`.
    Reading {
        device: String,
        meter: String,
        sample: Sample,
    },
    /// The device connected (`true`) or its last connection closed.
    Presence { device: String, online: bool },
    /// The device was revoked or deleted.
    Removed { device: String },
    /// The complete set of devices that may connect.
    Active { devices: HashSet<String> },
}

/// MQTT delivery guarantee of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Qos {
    /// Fire and forget (states).
    AtMostOnce,
    /// Acknowledged (everything retained).
    AtLeastOnce,
}

/// What a message is, for bookkeeping when it cannot be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The hub's availability.
    Hub,
    /// An empty retained payload removing a retained message.
    Clear,
    /// A discovery config.
    Config,
    /// A device's availability.
    Availability,
    /// A meter's state.
    State,
}

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub qos: Qos,
    pub kind: Kind,
}

#[derive(Debug, Default)]
struct Meter {
    /// Measurements whose discovery configs were queued (bit set over
    /// [`MEASUREMENTS`]).
    mask: u8,
    /// The newest reading not yet published.
    pending: Option<Sample>,
    /// Timestamp of the newest reading taken as a state (pending or
    /// published); anything not newer is backlog.
    newest_ts: Option<i64>,
    /// Queued in `states` (its interval ended with `pending` set).
    due: bool,
}

#[derive(Debug, Default)]
struct Device {
    online: bool,
    meters: BTreeMap<String, Meter>,
}

/// A FIFO of keys without duplicates.
#[derive(Debug)]
struct KeyQueue<K> {
    order: VecDeque<K>,
    set: HashSet<K>,
}

impl<K: std::hash::Hash + Eq + Clone> KeyQueue<K> {
    fn new() -> Self {
        KeyQueue {
            order: VecDeque::new(),
            set: HashSet::new(),
        }
    }
    fn push(&mut self, k: K) {
        if self.set.insert(k.clone()) {
            self.order.push_back(k);
        }
    }
    fn push_front(&mut self, k: K) {
        if self.set.insert(k.clone()) {
            self.order.push_front(k);
        }
    }
    fn pop(&mut self) -> Option<K> {
        let k = self.order.pop_front()?;
        self.set.remove(&k);
        Some(k)
    }
    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// The state machine. See the module docs.
pub(crate) struct State {
    layout: Layout,
    backfill_after_ms: i64,
    counters: std::sync::Arc<Counters>,
    connected: bool,
    shutting_down: bool,
    devices: HashMap<String, Device>,
    /// Config topics on the broker per device: queued by us, or found in
    /// the retained snapshot after connecting (an earlier hub process).
    configs: HashMap<String, BTreeSet<String>>,
    /// Revoked or deleted devices: readings are ignored until the device
    /// connects again (which proves it was re-added).
    removed: HashSet<String>,
    /// The devices that may connect, once the hub said.
    active: Option<HashSet<String>>,
    /// Devices that were connected when the latest active set left them
    /// out (revoked while connected, typically from another process): the
    /// hub is closing their connection; they are removed once it is gone.
    leaving: HashSet<String>,
    /// The hub's availability still to publish.
    hub: Option<&'static str>,
    /// Retained topics to remove.
    clears: KeyQueue<String>,
    /// (device, meter, measurement index) whose config is to publish.
    configs_due: KeyQueue<(String, String, usize)>,
    /// Devices whose availability is to publish.
    availability_due: KeyQueue<String>,
    /// (device, meter) whose state is to publish.
    states_due: VecDeque<(String, String)>,
    /// A message the client had no room for; sent first.
    stalled: Option<Outgoing>,
}

impl State {
    pub fn new(
        layout: Layout,
        backfill_after: std::time::Duration,
        counters: std::sync::Arc<Counters>,
    ) -> Self {
        State {
            layout,
            backfill_after_ms: i64::try_from(backfill_after.as_millis()).unwrap_or(i64::MAX),
            counters,
            connected: false,
            shutting_down: false,
            devices: HashMap::new(),
            configs: HashMap::new(),
            removed: HashSet::new(),
            active: None,
            leaving: HashSet::new(),
            hub: None,
            clears: KeyQueue::new(),
            configs_due: KeyQueue::new(),
            availability_due: KeyQueue::new(),
            states_due: VecDeque::new(),
            stalled: None,
        }
    }

    /// Applies one input from the hub.
    pub fn input(&mut self, input: Input) {
        match input {
            Input::Reading {
                device,
                meter,
                sample,
            } => self.reading(device, meter, sample),
            Input::Presence { device, online } => self.presence(device, online),
            Input::Removed { device } => self.remove_device(&device),
            Input::Active { devices } => {
                let gone: Vec<String> = self
                    .devices
                    .iter()
                    .filter(|(d, dev)| !dev.online && !devices.contains(*d))
                    .map(|(d, _)| d.clone())
                    .chain(
                        self.configs
                            .keys()
                            .filter(|d| {
                                !devices.contains(*d)
                                    && !self.devices.get(*d).is_some_and(|x| x.online)
                            })
                            .cloned(),
                    )
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                self.leaving = self
                    .devices
                    .iter()
                    .filter(|(d, dev)| dev.online && !devices.contains(*d))
                    .map(|(d, _)| d.clone())
                    .collect();
                self.active = Some(devices);
                for d in gone {
                    self.remove_device(&d);
                }
            }
        }
    }

    fn reading(&mut self, device: String, meter: String, sample: Sample) {
        if device == RESERVED_DEVICE_ID || self.removed.contains(&device) {
            self.counters.ignored.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mask = discovery::mask(&sample.values);
        if mask == 0 {
            return;
        }
        let dev = self.devices.entry(device.clone()).or_default();
        if !dev.online {
            // A reading proves a live connection (a `presence` may have been
            // dropped on a full queue).
            dev.online = true;
            self.availability_due.push(device.clone());
        }
        let m = dev.meters.entry(meter.clone()).or_default();
        let new = mask & !m.mask;
        if new != 0 {
            m.mask |= new;
            for i in bits(new) {
                let topic = self.layout.config_topic(&device, &meter, &MEASUREMENTS[i]);
                self.configs
                    .entry(device.clone())
                    .or_default()
                    .insert(topic);
                self.configs_due.push((device.clone(), meter.clone(), i));
            }
        }
        let backlog = sample.rx_ms.saturating_sub(sample.ts_ms) > self.backfill_after_ms
            || m.newest_ts.is_some_and(|t| sample.ts_ms <= t);
        if backlog {
            self.counters
                .backfill_ignored
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        m.newest_ts = Some(sample.ts_ms);
        if m.due && m.pending.is_some() {
            // Due since the last tick and still not handed to the client:
            // that state is lost, this one replaces it.
            self.counters
                .dropped_backlog
                .fetch_add(1, Ordering::Relaxed);
        }
        m.pending = Some(sample);
    }

    fn presence(&mut self, device: String, online: bool) {
        if device == RESERVED_DEVICE_ID {
            return;
        }
        if online {
            self.removed.remove(&device);
        } else if self.removed.contains(&device) {
            return;
        } else if self.leaving.remove(&device) {
            self.remove_device(&device);
            return;
        }
        let dev = self.devices.entry(device.clone()).or_default();
        dev.online = online;
        self.availability_due.push(device);
    }

    fn remove_device(&mut self, device: &str) {
        self.removed.insert(device.to_string());
        self.devices.remove(device);
        for topic in self.configs.remove(device).unwrap_or_default() {
            self.clears.push(topic);
        }
        self.clears.push(self.layout.availability_topic(device));
    }

    /// The end of an interval: every meter with a newer reading is due.
    pub fn tick(&mut self) {
        for (d, dev) in &mut self.devices {
            for (name, m) in &mut dev.meters {
                if m.pending.is_some() && !m.due {
                    m.due = true;
                    self.states_due.push_back((d.clone(), name.clone()));
                }
            }
        }
    }

    /// The connection is up: mark everything retained dirty and return
    /// the subscriptions that find what an earlier process left behind.
    pub fn connected(&mut self) -> [String; 2] {
        self.connected = true;
        self.hub = Some(if self.shutting_down { OFFLINE } else { ONLINE });
        let mut names: Vec<&String> = self.devices.keys().collect();
        names.sort();
        for d in names {
            let dev = &self.devices[d];
            self.availability_due.push(d.clone());
            for (meter, m) in &dev.meters {
                for i in bits(m.mask) {
                    self.configs_due.push((d.clone(), meter.clone(), i));
                }
            }
        }
        [
            self.layout.config_filter(),
            self.layout.availability_filter(),
        ]
    }

    /// The connection is gone (anything handed to the client but unsent is
    /// lost; `lost_states` of it were states).
    pub fn disconnected(&mut self, lost_states: u64) {
        self.connected = false;
        self.counters
            .dropped_backlog
            .fetch_add(lost_states, Ordering::Relaxed);
        if let Some(msg) = self.stalled.take() {
            self.unsent(msg);
        }
    }

    /// Books a message that will not be sent after all.
    fn unsent(&mut self, msg: Outgoing) {
        match msg.kind {
            Kind::Clear => self.clears.push_front(msg.topic),
            Kind::State => {
                self.counters
                    .dropped_backlog
                    .fetch_add(1, Ordering::Relaxed);
            }
            // Rebuilt from the state after the next connect.
            Kind::Hub | Kind::Config | Kind::Availability => {}
        }
    }

    /// A retained message the broker held when the bridge subscribed.
    pub fn retained(&mut self, topic: &str, payload: &[u8]) {
        if payload.is_empty() {
            return;
        }
        if self.layout.is_config_topic(topic) {
            let Some(device) = self.layout.device_of_config(payload) else {
                return;
            };
            if self.is_gone(&device) {
                self.clears.push(topic.to_string());
                self.removed.insert(device);
            } else {
                self.configs
                    .entry(device)
                    .or_default()
                    .insert(topic.to_string());
            }
        } else if let Some(device) = self.layout.device_of_availability_topic(topic) {
            if self.is_gone(device) {
                self.clears.push(topic.to_string());
                self.removed.insert(device.to_string());
                return;
            }
            let ours = self.devices.get(device).is_some_and(|d| d.online);
            let theirs = payload == ONLINE.as_bytes();
            if ours != theirs {
                // Left by an earlier process (typically `online` of a device
                // that has not reconnected since).
                self.devices.entry(device.to_string()).or_default();
                self.availability_due.push(device.to_string());
            }
        }
    }

    /// Removed, or absent from the active set while offline.
    fn is_gone(&self, device: &str) -> bool {
        self.removed.contains(device)
            || (self.active.as_ref().is_some_and(|a| !a.contains(device))
                && !self.devices.get(device).is_some_and(|d| d.online))
    }

    /// A clean shutdown: every device and the hub go offline.
    pub fn shutdown(&mut self) {
        self.shutting_down = true;
        for (d, dev) in &mut self.devices {
            if dev.online {
                dev.online = false;
                self.availability_due.push(d.clone());
            }
        }
        self.states_due.clear();
        for dev in self.devices.values_mut() {
            for m in dev.meters.values_mut() {
                m.due = false;
            }
        }
        self.hub = Some(OFFLINE);
    }

    /// Whether nothing is left to publish.
    pub fn is_idle(&self) -> bool {
        self.stalled.is_none()
            && self.hub.is_none()
            && self.clears.is_empty()
            && self.configs_due.is_empty()
            && self.availability_due.is_empty()
            && self.states_due.is_empty()
    }

    /// Puts back a message the client had no room for.
    pub fn stall(&mut self, msg: Outgoing) {
        if let Some(old) = self.stalled.replace(msg) {
            self.unsent(old);
        }
    }

    /// The next message to publish, built from the current state. `None`
    /// when disconnected or nothing is due. `now_ms` decides whether a
    /// pending state has become backlog.
    pub fn next(&mut self, now_ms: i64) -> Option<Outgoing> {
        if !self.connected {
            return None;
        }
        if let Some(m) = self.stalled.take() {
            return Some(m);
        }
        if self.hub == Some(ONLINE) {
            self.hub = None;
            return Some(self.retained_msg(
                self.layout.hub_availability_topic(),
                ONLINE,
                Kind::Hub,
            ));
        }
        if let Some(topic) = self.clears.pop() {
            return Some(Outgoing {
                topic,
                payload: Vec::new(),
                retain: true,
                qos: Qos::AtLeastOnce,
                kind: Kind::Clear,
            });
        }
        while let Some((d, meter, i)) = self.configs_due.pop() {
            if self
                .devices
                .get(&d)
                .and_then(|dev| dev.meters.get(&meter))
                .is_some_and(|m| m.mask & (1 << i) != 0)
            {
                let mm = &MEASUREMENTS[i];
                let payload = self.layout.discovery_config(&d, &meter, mm, None);
                return Some(Outgoing {
                    topic: self.layout.config_topic(&d, &meter, mm),
                    payload: payload.to_string().into_bytes(),
                    retain: true,
                    qos: Qos::AtLeastOnce,
                    kind: Kind::Config,
                });
            }
        }
        while let Some(d) = self.availability_due.pop() {
            if let Some(dev) = self.devices.get(&d) {
                let p = if dev.online { ONLINE } else { OFFLINE };
                return Some(self.retained_msg(
                    self.layout.availability_topic(&d),
                    p,
                    Kind::Availability,
                ));
            }
        }
        while let Some((d, meter)) = self.states_due.pop_front() {
            let Some(m) = self
                .devices
                .get_mut(&d)
                .and_then(|dev| dev.meters.get_mut(&meter))
            else {
                continue;
            };
            m.due = false;
            let Some(s) = m.pending.take() else {
                continue;
            };
            if now_ms.saturating_sub(s.rx_ms) > self.backfill_after_ms {
                self.counters
                    .dropped_backlog
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            return Some(Outgoing {
                topic: self.layout.state_topic(&d, &meter),
                payload: discovery::state_payload(s.ts_ms, &s.values).into_bytes(),
                retain: false,
                qos: Qos::AtMostOnce,
                kind: Kind::State,
            });
        }
        if self.hub == Some(OFFLINE) {
            self.hub = None;
            return Some(self.retained_msg(
                self.layout.hub_availability_topic(),
                OFFLINE,
                Kind::Hub,
            ));
        }
        None
    }

    fn retained_msg(&self, topic: String, payload: &str, kind: Kind) -> Outgoing {
        Outgoing {
            topic,
            payload: payload.as_bytes().to_vec(),
            retain: true,
            qos: Qos::AtLeastOnce,
            kind,
        }
    }
}

/// The indices of the set bits of `mask`.
fn bits(mask: u8) -> impl Iterator<Item = usize> {
    (0..MEASUREMENTS.len()).filter(move |i| mask & (1 << i) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::{BrokerUrl, MqttConfig};
    use std::sync::Arc;
    use std::time::Duration;

    const NOW: i64 = 1_714_564_800_000;

    fn state() -> (State, Arc<Counters>) {
        let c = MqttConfig::new(BrokerUrl::parse("mqtt://h").unwrap());
        let counters = Arc::new(Counters::default());
        (
            State::new(
                discovery::Layout::new(&c),
                Duration::from_secs(60),
                counters.clone(),
            ),
            counters,
        )
    }

    fn reading(device: &str, meter: &str, ts: i64, energy: f64, power: Option<f64>) -> Input {
        let mut values = [None; 7];
        values[0] = Some(energy);
        values[1] = power;
        Input::Reading {
            device: device.into(),
            meter: meter.into(),
            sample: Sample {
                ts_ms: ts,
                rx_ms: ts + 10,
                values,
            },
        }
    }

    fn drain(s: &mut State, now: i64) -> Vec<Outgoing> {
        std::iter::from_fn(|| s.next(now)).collect()
    }

    fn topics(msgs: &[Outgoing]) -> Vec<(&str, Kind)> {
        msgs.iter().map(|m| (m.topic.as_str(), m.kind)).collect()
    }

    fn text(m: &Outgoing) -> &str {
        std::str::from_utf8(&m.payload).unwrap()
    }

    #[test]
    fn nothing_is_sent_while_disconnected() {
        let (mut s, _) = state();
        s.input(reading("d1", "main", NOW, 1.0, None));
        s.tick();
        assert_eq!(s.next(NOW), None);
        assert!(!s.is_idle());
    }

    #[test]
    fn connect_then_reading_publishes_hub_config_availability_state() {
        let (mut s, _) = state();
        let subs = s.connected();
        assert_eq!(
            subs,
            [
                "homeassistant/sensor/ems/+/config".to_string(),
                "ems/+/availability".to_string()
            ]
        );
        let m = drain(&mut s, NOW);
        assert_eq!(topics(&m), [("ems/hub/availability", Kind::Hub)]);
        assert_eq!(text(&m[0]), "online");
        assert!(m[0].retain);
        assert_eq!(m[0].qos, Qos::AtLeastOnce);

        s.input(reading("d1", "main", NOW, 1.0, Some(5.0)));
        let m = drain(&mut s, NOW);
        // Two configs (energy, power) and the availability; no state
        // before the interval ends.
        assert_eq!(m.len(), 3, "{m:?}");
        assert!(m[..2].iter().all(|x| x.kind == Kind::Config && x.retain));
        assert!(m[0].topic.contains("_main_energy_wh_"));
        assert!(m[1].topic.contains("_main_power_w_"));
        assert_eq!(
            (m[2].topic.as_str(), text(&m[2])),
            ("ems/d1/availability", "online")
        );
        s.tick();
        let m = drain(&mut s, NOW + 50);
        assert_eq!(topics(&m), [("ems/d1/main/state", Kind::State)]);
        assert!(!m[0].retain);
        assert_eq!(m[0].qos, Qos::AtMostOnce);
        let v: serde_json::Value = serde_json::from_slice(&m[0].payload).unwrap();
        assert_eq!(v["energy_wh"], 1.0);
        assert_eq!(v["power_w"], 5.0);
        assert!(s.is_idle());
        // Nothing new: the next tick publishes nothing.
        s.tick();
        assert!(drain(&mut s, NOW).is_empty());
    }

    #[test]
    fn coalescing_latest_wins_one_state_per_tick() {
        let (mut s, _) = state();
        s.connected();
        for i in 0..100 {
            s.input(reading("d1", "main", NOW + i, i as f64, None));
        }
        drain(&mut s, NOW);
        s.tick();
        let m = drain(&mut s, NOW + 200);
        assert_eq!(m.len(), 1);
        let v: serde_json::Value = serde_json::from_slice(&m[0].payload).unwrap();
        assert_eq!(v["energy_wh"], 99.0);
        // Two meters: one state each.
        s.input(reading("d1", "main", NOW + 500, 1.0, None));
        s.input(reading("d1", "aux", NOW + 500, 2.0, None));
        s.input(reading("d1", "aux", NOW + 501, 3.0, None));
        drain(&mut s, NOW);
        s.tick();
        let m = drain(&mut s, NOW + 600);
        let mut t: Vec<_> = m.iter().map(|x| x.topic.as_str()).collect();
        t.sort();
        assert_eq!(t, ["ems/d1/aux/state", "ems/d1/main/state"]);
    }

    #[test]
    fn backfill_is_never_a_current_state() {
        let (mut s, c) = state();
        s.connected();
        s.input(reading("d1", "main", NOW, 10.0, None));
        s.tick();
        drain(&mut s, NOW);
        // Older than what was published: ignored.
        s.input(reading("d1", "main", NOW - 1000, 5.0, None));
        // Arrived long after it was taken (an edge catching up): ignored.
        let mut old = reading("d1", "main", NOW + 5, 6.0, None);
        if let Input::Reading { sample, .. } = &mut old {
            sample.rx_ms = sample.ts_ms + 61_000;
        }
        s.input(old);
        s.tick();
        assert!(drain(&mut s, NOW).is_empty());
        assert_eq!(c.backfill_ignored.load(Ordering::Relaxed), 2);
        // Backlog still registers a new meter for discovery (no state).
        let mut old = reading("d1", "late", NOW - 3_600_000, 6.0, None);
        if let Input::Reading { sample, .. } = &mut old {
            sample.rx_ms = NOW;
        }
        s.input(old);
        s.tick();
        let m = drain(&mut s, NOW);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].kind, Kind::Config);
    }

    #[test]
    fn presence_flips_availability() {
        let (mut s, _) = state();
        s.connected();
        drain(&mut s, NOW);
        s.input(Input::Presence {
            device: "d1".into(),
            online: true,
        });
        s.input(Input::Presence {
            device: "d1".into(),
            online: false,
        });
        let m = drain(&mut s, NOW);
        // Deduplicated: one message, the current value.
        assert_eq!(m.len(), 1);
        assert_eq!(
            (m[0].topic.as_str(), text(&m[0]), m[0].retain),
            ("ems/d1/availability", "offline", true)
        );
        // The reserved id is never published.
        s.input(Input::Presence {
            device: "hub".into(),
            online: true,
        });
        s.input(reading("hub", "main", NOW, 1.0, None));
        assert!(drain(&mut s, NOW).is_empty());
    }

    #[test]
    fn reconnect_republishes_everything_retained() {
        let (mut s, _) = state();
        s.connected();
        s.input(reading("d1", "main", NOW, 1.0, Some(2.0)));
        s.input(reading("d2", "main", NOW, 1.0, None));
        s.input(Input::Presence {
            device: "d2".into(),
            online: false,
        });
        drain(&mut s, NOW);
        s.disconnected(0);
        s.connected();
        let m = drain(&mut s, NOW);
        let kinds: Vec<Kind> = m.iter().map(|x| x.kind).collect();
        assert_eq!(
            kinds,
            [
                Kind::Hub,
                Kind::Config,
                Kind::Config,
                Kind::Config,
                Kind::Availability,
                Kind::Availability
            ]
        );
        assert_eq!(text(&m[4]), "online");
        assert_eq!(text(&m[5]), "offline");
    }

    #[test]
    fn superseded_due_states_are_counted() {
        let (mut s, c) = state();
        s.input(reading("d1", "main", NOW, 1.0, None));
        s.tick();
        // Disconnected: the due state cannot go; a newer reading replaces it.
        s.input(reading("d1", "main", NOW + 1000, 2.0, None));
        s.tick();
        assert_eq!(c.dropped_backlog.load(Ordering::Relaxed), 1);
        // Before the tick, a newer reading is plain coalescing.
        s.connected();
        drain(&mut s, NOW + 1000);
        s.input(reading("d1", "main", NOW + 2000, 3.0, None));
        s.input(reading("d1", "main", NOW + 2001, 4.0, None));
        assert_eq!(c.dropped_backlog.load(Ordering::Relaxed), 1);
        // A due state that became backlog while waiting is dropped, counted.
        s.tick();
        assert!(drain(&mut s, NOW + 2001 + 61_000).is_empty());
        assert_eq!(c.dropped_backlog.load(Ordering::Relaxed), 2);
        // Lost in the client on disconnect, and a stalled state.
        s.input(reading("d1", "main", NOW + 70_000, 5.0, None));
        s.tick();
        let st = s.next(NOW + 70_000).unwrap();
        assert_eq!(st.kind, Kind::State);
        s.stall(st);
        s.disconnected(3);
        assert_eq!(c.dropped_backlog.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn stalled_message_goes_first() {
        let (mut s, _) = state();
        s.connected();
        let hub = s.next(NOW).unwrap();
        s.stall(hub.clone());
        assert_eq!(s.next(NOW), Some(hub));
    }

    #[test]
    fn removal_clears_configs_and_availability_and_ignores_late_readings() {
        let (mut s, c) = state();
        s.connected();
        s.input(reading("d1", "main", NOW, 1.0, Some(2.0)));
        let published = drain(&mut s, NOW);
        let config_topics: BTreeSet<String> = published
            .iter()
            .filter(|m| m.kind == Kind::Config)
            .map(|m| m.topic.clone())
            .collect();
        s.input(Input::Removed {
            device: "d1".into(),
        });
        let m = drain(&mut s, NOW);
        assert!(m.iter().all(|x| x.kind == Kind::Clear
            && x.payload.is_empty()
            && x.retain
            && x.qos == Qos::AtLeastOnce));
        let cleared: BTreeSet<String> = m.iter().map(|x| x.topic.clone()).collect();
        let mut want = config_topics.clone();
        want.insert("ems/d1/availability".into());
        assert_eq!(cleared, want);
        // A reading still in flight after the revocation: ignored.
        s.input(reading("d1", "main", NOW + 1, 1.0, None));
        s.input(Input::Presence {
            device: "d1".into(),
            online: false,
        });
        s.tick();
        assert!(drain(&mut s, NOW).is_empty());
        assert_eq!(c.ignored.load(Ordering::Relaxed), 1);
        // Its configs found on the broker later (resubscribe): cleared again.
        let cfg = discovery::Layout::new(&MqttConfig::new(BrokerUrl::parse("mqtt://h").unwrap()))
            .discovery_config("d1", "main", &MEASUREMENTS[0], None)
            .to_string();
        let t = config_topics.iter().next().unwrap();
        s.retained(t, cfg.as_bytes());
        let m = drain(&mut s, NOW);
        assert_eq!(topics(&m), [(t.as_str(), Kind::Clear)]);
        // A new connection (the device was added again) brings it back.
        s.input(Input::Presence {
            device: "d1".into(),
            online: true,
        });
        s.input(reading("d1", "main", NOW + 2, 1.0, None));
        let m = drain(&mut s, NOW);
        assert_eq!(m.len(), 2, "{m:?}");
    }

    #[test]
    fn configs_of_an_earlier_process_are_removed_too() {
        let (mut s, _) = state();
        s.connected();
        drain(&mut s, NOW);
        let l = discovery::Layout::new(&MqttConfig::new(BrokerUrl::parse("mqtt://h").unwrap()));
        let t1 = l.config_topic("old", "main", &MEASUREMENTS[0]);
        let t2 = l.config_topic("old", "aux", &MEASUREMENTS[2]);
        s.retained(
            &t1,
            l.discovery_config("old", "main", &MEASUREMENTS[0], None)
                .to_string()
                .as_bytes(),
        );
        s.retained(
            &t2,
            l.discovery_config("old", "aux", &MEASUREMENTS[2], None)
                .to_string()
                .as_bytes(),
        );
        // Somebody else's config under another node is never touched.
        s.retained(
            "homeassistant/sensor/other/x/config",
            br#"{"state_topic":"ems/zzz/main/state"}"#,
        );
        assert!(drain(&mut s, NOW).is_empty());
        s.input(Input::Removed {
            device: "old".into(),
        });
        let m = drain(&mut s, NOW);
        let cleared: BTreeSet<&str> = m.iter().map(|x| x.topic.as_str()).collect();
        assert_eq!(
            cleared,
            BTreeSet::from([t1.as_str(), t2.as_str(), "ems/old/availability"])
        );
    }

    #[test]
    fn active_set_reconciles_devices_that_vanished() {
        let (mut s, _) = state();
        s.connected();
        let l = discovery::Layout::new(&MqttConfig::new(BrokerUrl::parse("mqtt://h").unwrap()));
        s.input(reading("live", "main", NOW, 1.0, None));
        s.input(reading("gone", "main", NOW, 1.0, None));
        s.input(Input::Presence {
            device: "gone".into(),
            online: false,
        });
        drain(&mut s, NOW);
        // Neither is in the set; the connected one is kept (a live
        // authenticated connection proves it may connect).
        s.input(Input::Active {
            devices: HashSet::from(["other".to_string()]),
        });
        let m = drain(&mut s, NOW);
        assert!(m.iter().all(|x| x.kind == Kind::Clear));
        assert!(m.iter().any(|x| x.topic == "ems/gone/availability"));
        assert!(!m.iter().any(|x| x.topic.contains("live")));
        // A retained config of a device outside the set: cleared at once.
        let t = l.config_topic("stale", "main", &MEASUREMENTS[0]);
        s.retained(
            &t,
            l.discovery_config("stale", "main", &MEASUREMENTS[0], None)
                .to_string()
                .as_bytes(),
        );
        s.retained("ems/stale/availability", b"offline");
        let m = drain(&mut s, NOW);
        assert_eq!(
            topics(&m),
            [
                (t.as_str(), Kind::Clear),
                ("ems/stale/availability", Kind::Clear)
            ]
        );
    }

    #[test]
    fn a_device_left_out_while_connected_is_removed_when_it_disconnects() {
        let (mut s, _) = state();
        s.connected();
        for d in ["revoked", "kept"] {
            s.input(Input::Presence {
                device: d.into(),
                online: true,
            });
            s.input(reading(d, "main", NOW, 1.0, None));
        }
        drain(&mut s, NOW);
        // Revoked while connected: the hub closes its connection next.
        s.input(Input::Active {
            devices: HashSet::from(["kept".to_string()]),
        });
        assert!(drain(&mut s, NOW).is_empty());
        s.input(Input::Presence {
            device: "revoked".into(),
            online: false,
        });
        let m = drain(&mut s, NOW);
        assert!(!m.is_empty());
        assert!(m.iter().all(|x| x.kind == Kind::Clear), "{m:?}");
        assert!(m.iter().any(|x| x.topic == "ems/revoked/availability"));
        assert!(m.iter().all(|x| !x.topic.contains("kept")));
        // Its late readings are ignored; a device in the set just goes
        // offline.
        s.input(reading("revoked", "main", NOW + 1, 2.0, None));
        s.input(Input::Presence {
            device: "kept".into(),
            online: false,
        });
        let m = drain(&mut s, NOW);
        assert_eq!(topics(&m), [("ems/kept/availability", Kind::Availability)]);
        assert_eq!(text(&m[0]), "offline");
        // Back in a later set before it disconnects (re-added): kept.
        s.input(Input::Presence {
            device: "kept".into(),
            online: true,
        });
        s.input(Input::Active {
            devices: HashSet::new(),
        });
        s.input(Input::Active {
            devices: HashSet::from(["kept".to_string()]),
        });
        s.input(Input::Presence {
            device: "kept".into(),
            online: false,
        });
        let m = drain(&mut s, NOW);
        assert!(m.iter().all(|x| x.kind == Kind::Availability), "{m:?}");
    }

    #[test]
    fn stale_retained_availability_is_corrected() {
        let (mut s, _) = state();
        s.connected();
        drain(&mut s, NOW);
        // An earlier process left `online`; the device has not reconnected.
        s.retained("ems/d9/availability", b"online");
        let m = drain(&mut s, NOW);
        assert_eq!(
            (m[0].topic.as_str(), text(&m[0])),
            ("ems/d9/availability", "offline")
        );
        // Matching ours, or the hub's own: nothing to do.
        s.retained("ems/d9/availability", b"offline");
        s.retained("ems/hub/availability", b"offline");
        assert!(drain(&mut s, NOW).is_empty());
    }

    #[test]
    fn shutdown_takes_devices_then_hub_offline() {
        let (mut s, _) = state();
        s.connected();
        s.input(reading("d1", "main", NOW, 1.0, None));
        drain(&mut s, NOW);
        s.tick();
        s.shutdown();
        let m = drain(&mut s, NOW);
        assert_eq!(
            topics(&m),
            [
                ("ems/d1/availability", Kind::Availability),
                ("ems/hub/availability", Kind::Hub)
            ]
        );
        assert_eq!(text(&m[0]), "offline");
        assert_eq!(text(&m[1]), "offline");
        assert!(s.is_idle());
    }
}
