//! The connection manager: which device is connected where, its presence,
//! and the live topic of every device.
//!
//! - One device, one connection: [`Registry::connect_device`] registers a
//!   new connection and tells the previous one (if any) to close with 4000.
//! - Takeover loops: two live devices sharing one identity (a cloned SD
//!   card) would replace each other forever. When a device id is replaced
//!   more than `max_replacements` times within `window`, the registry
//!   refuses it for `cooldown` ([`Conflict`]): the session closes both the
//!   current and the new connection with 4002 ("conflict").
//! - Kicks: [`Registry::kick`] closes a device's live connection from
//!   anywhere in the process (revocation poll, admin API);
//!   [`Registry::kick_conn`] closes one given connection (the presence
//!   task, when the device connected to another hub). A kick reaches the
//!   session through the connection's [`Mailbox`], as do the shutdown
//!   ([`Registry::shut_down`]) and the heartbeat's ticks
//!   ([`Registry::heartbeat`]): an idle device connection waits on its
//!   mailbox and its socket, and nothing else.
//! - Topics: one [`Topic`] per device, created on first use by the device
//!   or a subscriber. Presence changes and the edge's outbox status are
//!   published through it, so they reach subscribers in order with the
//!   readings.
//! - Edge status: the last `status` frame of every connected device
//!   ([`Registry::edge_status`], [`Registry::edge_statuses`]) for metrics,
//!   dashboards and the admin API.
//! - MQTT presence: with a bridge ([`Registry::with_mqtt`]), every change
//!   of the device map is told to it while the map's lock is held, so the
//!   bridge sees connects and disconnects in the map's order (its calls
//!   never wait).
//!
//! - Rate limits: each device's [`DeviceLimits`], shared by its
//!   connections and kept between them ([`Registry::limits`]).
//!
//! One map holds all of it, an entry per device (its connection, topic,
//! presence time, edge status and rate limits), rather than a map per kind
//! of state each paying its own slots for every device.
//!
//! Locks are std mutexes held for a map operation only, never across an
//! `.await`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ems_shared::EdgeStatus;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::topic::Topic;
use crate::config::{TakeoverPolicy, LOCK_CHUNK};
use crate::limits::DeviceLimits;
use crate::mailbox::{Kick, Mailbox};
use crate::mqtt::MqttHandle;
use crate::store::TokenHash;

/// Everything this hub keeps of one device, in one entry of one map: a
/// map per kind of state would pay its empty slots (a map holds up to
/// twice as many slots as entries) and a copy of the key once per kind.
#[derive(Default)]
struct DeviceEntry {
    /// Its live connection, if any.
    conn: Option<DeviceSlot>,
    /// Its live topic, created on first use by the device or a
    /// subscriber, and kept.
    topic: Option<Topic>,
    /// When it last connected or disconnected, Unix ms (the
    /// `last_seen_ms` of dashboard `status` frames); [`NEVER`] before its
    /// first connect.
    presence_ms: i64,
    /// Its edge's last status while connected (boxed: most of the time a
    /// device has none, or a connection that does not report).
    status: Option<Box<StatusEntry>>,
    /// Its rate limits, shared by its connections and kept between them.
    limits: Option<Arc<DeviceLimits>>,
}

impl DeviceEntry {
    /// The device's live topic, created with room for `capacity` frames if
    /// it has none.
    fn topic(&mut self, capacity: usize) -> Topic {
        self.topic
            .get_or_insert_with(|| Topic::new(capacity))
            .clone()
    }
}

/// [`DeviceEntry::presence_ms`] of a device that never connected.
const NEVER: i64 = i64::MIN;

/// The device map and how many of its entries have a live connection.
#[derive(Default)]
struct Devices {
    /// Boxed: the map is sized for up to twice its entries, and an empty
    /// slot then costs a pointer rather than a whole entry.
    map: HashMap<Arc<str>, Box<DeviceEntry>>,
    online: usize,
}

impl Devices {
    /// The entry of `device_id`, created if it has none.
    fn entry(&mut self, device_id: &Arc<str>) -> &mut DeviceEntry {
        self.map.entry(device_id.clone()).or_insert_with(|| {
            Box::new(DeviceEntry {
                presence_ms: NEVER,
                ..DeviceEntry::default()
            })
        })
    }

    /// The live connection of `device_id`, if any.
    fn conn(&self, device_id: &str) -> Option<&DeviceSlot> {
        self.map.get(device_id)?.conn.as_ref()
    }

    /// Every live connection.
    fn conns(&self) -> impl Iterator<Item = (&Arc<str>, &DeviceSlot)> {
        self.map
            .iter()
            .filter_map(|(id, e)| Some((id, e.conn.as_ref()?)))
    }

    /// Removes the live connection of `device_id` (its other state stays).
    fn take_conn(&mut self, device_id: &str) -> Option<DeviceSlot> {
        let conn = self.map.get_mut(device_id)?.conn.take()?;
        self.online -= 1;
        Some(conn)
    }
}

/// A device's live connection.
struct DeviceSlot {
    /// Identifies the connection, so a late disconnect of a replaced
    /// connection does not remove its successor.
    conn_id: u64,
    /// The connection's mailbox: kicks, the shutdown, heartbeat ticks.
    mailbox: Arc<Mailbox>,
    /// Its heartbeat phase (see [`Registry::heartbeat`]).
    phase: u8,
    /// Peer address, for the takeover log line.
    peer: SocketAddr,
    /// Hash of the token the connection authenticated with, so the
    /// revocation poller can tell a rotated token from the current one.
    token: Option<TokenHash>,
}

/// A registered device connection.
pub struct DeviceLease {
    /// This connection's id.
    pub conn_id: u64,
    /// The connection's mailbox: answers from the writer, kicks, the
    /// shutdown and heartbeat ticks.
    pub mailbox: Arc<Mailbox>,
    /// The device's live topic.
    pub topic: Topic,
}

/// A refused connection: the device id is in a takeover loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The peer whose connection was live when the loop was detected (also
    /// closed with 4002), if any.
    pub other_peer: Option<SocketAddr>,
    /// Remaining cool-down.
    pub remaining: Duration,
}

/// Takeover history of one device id.
#[derive(Default)]
struct TakeoverHistory {
    /// Times of recent replacements, oldest first, within the window.
    recent: VecDeque<Instant>,
    /// Refused until then.
    cooldown_until: Option<Instant>,
}

/// The last outbox status an edge reported, with the hub's receive time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusEntry {
    /// The frame as received.
    pub status: EdgeStatus,
    /// Hub receive time, Unix ms.
    pub rx_ms: i64,
    /// `rx_ms − oldest_ts_ms` (0 when the outbox is empty): how far behind
    /// the edge was when it reported.
    pub behind_ms: i64,
}

/// What this hub knows of one device for the device lists
/// ([`Registry::local_views`]).
#[derive(Debug, Clone)]
pub struct LocalView {
    /// It has a live connection here.
    pub online: bool,
    /// Its edge's last status, while connected.
    pub edge: Option<StatusEntry>,
    /// When it last connected or disconnected here, Unix ms.
    pub presence_ms: Option<i64>,
}

/// Shared connection state of the hub.
pub struct Registry {
    /// Every device seen by this process: its live connection, topic,
    /// presence time, edge status and rate limits. Devices are
    /// provisioned, so this stays bounded.
    devices: Mutex<Devices>,
    /// Takeover histories by device id (entries expire with the window).
    takeovers: Mutex<HashMap<Arc<str>, TakeoverHistory>>,
    /// Takeover-loop rule.
    policy: TakeoverPolicy,
    /// Source of connection ids.
    next_conn: AtomicU64,
    /// The heartbeat's last round.
    round: AtomicU64,
    /// Set at shutdown: later connections are told at once.
    shutting_down: AtomicBool,
    /// Capacity of each topic.
    topic_capacity: usize,
    /// The MQTT bridge, told about every connect and disconnect.
    mqtt: Option<MqttHandle>,
}

/// A presence time as the device lists see it.
fn presence(ms: i64) -> Option<i64> {
    (ms != NEVER).then_some(ms)
}

/// Heartbeat rounds per `ping_interval`: each device connection is ticked
/// in one of them.
pub const HEARTBEAT_PHASES: u8 = 16;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the maps inconsistent
    // (single insert/remove), so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    /// An empty registry whose topics buffer `topic_capacity` frames, with
    /// the default [`TakeoverPolicy`].
    pub fn new(topic_capacity: usize) -> Self {
        Self::with_policy(topic_capacity, TakeoverPolicy::default())
    }

    /// An empty registry with an explicit takeover-loop rule.
    pub fn with_policy(topic_capacity: usize, policy: TakeoverPolicy) -> Self {
        Registry {
            devices: Mutex::new(Devices::default()),
            takeovers: Mutex::new(HashMap::new()),
            policy,
            next_conn: AtomicU64::new(1),
            round: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            topic_capacity: topic_capacity.max(1),
            mqtt: None,
        }
    }

    /// Tells `mqtt` about every device that connects or disconnects.
    pub fn with_mqtt(mut self, mqtt: Option<MqttHandle>) -> Self {
        self.mqtt = mqtt;
        self
    }

    /// Tells the MQTT bridge, if any. Called with the `devices` lock held.
    fn mqtt_presence(&self, device_id: &str, online: bool) {
        if let Some(m) = &self.mqtt {
            m.presence(device_id, online);
        }
    }

    /// The live topic of `device_id`.
    pub fn topic(&self, device_id: &Arc<str>) -> Topic {
        lock(&self.devices)
            .entry(device_id)
            .topic(self.topic_capacity)
    }

    /// The rate limits of `device_id`, shared by its connections; made by
    /// `make` the first time.
    pub fn limits(
        &self,
        device_id: &Arc<str>,
        make: impl FnOnce() -> DeviceLimits,
    ) -> Arc<DeviceLimits> {
        lock(&self.devices)
            .entry(device_id)
            .limits
            .get_or_insert_with(|| Arc::new(make()))
            .clone()
    }

    /// Registers a new connection of `device_id`, kicking the previous one
    /// (4000); the writer may hold its readings for `hold` before it
    /// answers them ([`Mailbox::with_hold`]). Returns the lease and the previous connection's peer
    /// address — or [`Conflict`] when the device id is in a takeover loop
    /// or cooling down; then the previous connection (if any) is kicked with
    /// [`Kick::Conflict`] too.
    pub fn connect_device(
        &self,
        device_id: &Arc<str>,
        peer: SocketAddr,
        token: Option<TokenHash>,
        hold: Option<Duration>,
    ) -> Result<(DeviceLease, Option<SocketAddr>), Conflict> {
        let now = Instant::now();
        // Lock order: devices, then takeovers (the only place both are held).
        let mut devices = lock(&self.devices);
        let mut takeovers = lock(&self.takeovers);
        let hist = takeovers.entry(device_id.clone()).or_default();
        while hist
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.policy.window)
        {
            hist.recent.pop_front();
        }
        if let Some(until) = hist.cooldown_until {
            if now < until {
                return Err(Conflict {
                    other_peer: None,
                    remaining: until - now,
                });
            }
            hist.cooldown_until = None;
        }
        if devices.conn(device_id).is_some() {
            hist.recent.push_back(now);
            if hist.recent.len() > self.policy.max_replacements {
                hist.recent.clear();
                hist.cooldown_until = Some(now + self.policy.cooldown);
                let other = devices.take_conn(device_id).map(|slot| {
                    slot.mailbox.kick(Kick::Conflict);
                    slot.peer
                });
                // The kicked connection's own disconnect no longer finds its
                // slot, so its departure is told here.
                if other.is_some() {
                    self.mqtt_presence(device_id, false);
                }
                return Err(Conflict {
                    other_peer: other,
                    remaining: self.policy.cooldown,
                });
            }
        } else if hist.recent.is_empty() {
            takeovers.remove(device_id);
        }
        drop(takeovers);
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let mailbox = Arc::new(Mailbox::with_hold(conn_id, hold));
        if self.shutting_down.load(Ordering::Acquire) {
            mailbox.shut_down();
        }
        let phase = self.phase(conn_id);
        let now = crate::store::now_ms();
        let entry = devices.entry(device_id);
        let old = entry.conn.replace(DeviceSlot {
            conn_id,
            mailbox: mailbox.clone(),
            phase,
            peer,
            token,
        });
        // A new connection starts without its predecessor's edge status.
        entry.status = None;
        entry.presence_ms = now;
        let topic = entry.topic(self.topic_capacity);
        if old.is_none() {
            devices.online += 1;
        }
        self.mqtt_presence(device_id, true);
        drop(devices);
        self.publish_status(&topic, device_id, true, now, None);
        let old_peer = old.map(|slot| {
            // The old connection may already be gone; nothing to do then.
            slot.mailbox.kick(Kick::Replaced);
            slot.peer
        });
        let lease = DeviceLease {
            conn_id,
            mailbox,
            topic,
        };
        Ok((lease, old_peer))
    }

    /// Removes the connection `conn_id` of `device_id` if it is still the
    /// registered one (and forgets its edge status).
    pub fn disconnect_device(&self, device_id: &str, conn_id: u64) {
        let mut devices = lock(&self.devices);
        let Some(entry) = devices.map.get_mut(device_id) else {
            return;
        };
        if !entry.conn.as_ref().is_some_and(|s| s.conn_id == conn_id) {
            return;
        }
        let now = crate::store::now_ms();
        entry.conn = None;
        entry.status = None;
        entry.presence_ms = now;
        let topic = entry.topic.clone();
        devices.online -= 1;
        self.mqtt_presence(device_id, false);
        drop(devices);
        if let Some(topic) = topic {
            self.publish_status(&topic, device_id, false, now, None);
        }
    }

    /// Closes the live connection of `device_id`, if any, for `reason`
    /// (close code from [`Kick::close`]). Returns whether a connection was
    /// told to close. Safe to call from any thread; the socket closes
    /// within a scheduler tick.
    ///
    /// For the admin API: after revoking or rotating a device's
    /// token through the API, call `registry.kick(id, Kick::Revoked)` so the
    /// socket closes at once instead of at the next revocation poll (~1 s).
    pub fn kick(&self, device_id: &str, reason: Kick) -> bool {
        let devices = lock(&self.devices);
        devices
            .conn(device_id)
            .is_some_and(|s| s.mailbox.kick(reason))
    }

    /// Like [`Registry::kick`], but only while `conn_id` is the device's
    /// registered connection (a newer local one is left alone).
    pub fn kick_conn(&self, device_id: &str, conn_id: u64, reason: Kick) -> bool {
        let devices = lock(&self.devices);
        devices
            .conn(device_id)
            .filter(|s| s.conn_id == conn_id)
            .is_some_and(|s| s.mailbox.kick(reason))
    }

    /// Tells every device connection, now and from now on, that the hub
    /// is shutting down.
    pub fn shut_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
        let mailboxes: Vec<Arc<Mailbox>> = lock(&self.devices)
            .conns()
            .map(|(_, s)| s.mailbox.clone())
            .collect();
        for m in mailboxes {
            m.shut_down();
        }
    }

    /// The heartbeat phase of a new connection: its first tick comes
    /// after half to one whole period of [`HEARTBEAT_PHASES`] rounds,
    /// spread by connection id, so connections opened in the same second
    /// (a restart, a storm) are not all pinged in the same round ever
    /// after.
    fn phase(&self, conn_id: u64) -> u8 {
        let (n, half) = (u64::from(HEARTBEAT_PHASES), u64::from(HEARTBEAT_PHASES / 2));
        let next = self.round.load(Ordering::Relaxed) + 1;
        ((next + half + conn_id % half) % n) as u8
    }

    /// One heartbeat round: ticks the mailbox of every connection whose
    /// phase is `round` (modulo [`HEARTBEAT_PHASES`]), so each connection
    /// is ticked once every [`HEARTBEAT_PHASES`] rounds. The heartbeat task
    /// calls it every `ping_interval / HEARTBEAT_PHASES`.
    pub fn heartbeat(&self, round: u64) {
        self.round.store(round, Ordering::Relaxed);
        let phase = (round % u64::from(HEARTBEAT_PHASES)) as u8;
        let devices = lock(&self.devices);
        for (_, slot) in devices.conns().filter(|(_, s)| s.phase == phase) {
            slot.mailbox.tick();
        }
    }

    /// The connected devices and the token hash each authenticated with
    /// (for the revocation poller).
    pub fn device_tokens(&self) -> Vec<(Arc<str>, Option<TokenHash>)> {
        lock(&self.devices)
            .conns()
            .map(|(id, s)| (id.clone(), s.token))
            .collect()
    }

    /// Whether `device_id` has a live connection.
    pub fn is_online(&self, device_id: &str) -> bool {
        lock(&self.devices).conn(device_id).is_some()
    }

    /// Number of live device connections.
    pub fn online_count(&self) -> usize {
        lock(&self.devices).online
    }

    /// Records the `status` frame a connected device sent at `rx_ms`.
    pub fn set_edge_status(&self, device_id: &Arc<str>, status: EdgeStatus, rx_ms: i64) {
        let behind_ms = status.behind_ms(rx_ms);
        // Dashboards see the outbox too ("catching up, 3 h behind"), and
        // what the edge lost.
        let losses = ems_shared::EdgeLosses::from(&status);
        let outbox = Some((status.outbox_depth, behind_ms, losses));
        let mut devices = lock(&self.devices);
        let Some(entry) = devices.map.get_mut(&**device_id) else {
            return;
        };
        // Kept while the device is connected only; the box of the last one
        // is reused.
        if entry.conn.is_some() {
            let new = StatusEntry {
                status,
                rx_ms,
                behind_ms,
            };
            match &mut entry.status {
                Some(kept) => **kept = new,
                none => *none = Some(Box::new(new)),
            }
        }
        let topic = entry.topic.clone();
        drop(devices);
        if let Some(topic) = topic {
            self.publish_status(&topic, device_id, true, rx_ms, outbox);
        }
    }

    /// The last outbox status of a connected device: how many readings it
    /// still has to deliver and how far behind it is.
    ///
    /// For dashboards and the admin API: show e.g. "catching up,
    /// 3 h behind" when `behind_ms` is large, using
    /// `entry.behind_ms + (now_ms − entry.rx_ms)` for a live figure (the
    /// edge reports every ~10 s). `None`: not connected, or an edge that
    /// does not send `status` frames.
    pub fn edge_status(&self, device_id: &str) -> Option<StatusEntry> {
        lock(&self.devices)
            .map
            .get(device_id)
            .and_then(|e| e.status.as_deref().cloned())
    }

    /// Every connected device's last outbox status.
    pub fn edge_statuses(&self) -> Vec<(Arc<str>, StatusEntry)> {
        lock(&self.devices)
            .map
            .iter()
            .filter_map(|(k, e)| Some((k.clone(), e.status.as_deref()?.clone())))
            .collect()
    }

    /// [`is_online`](Self::is_online), [`edge_status`](Self::edge_status)
    /// and [`presence_ms`](Self::presence_ms) of each of `ids`, in their
    /// order. The device lists ask for thousands at a time and ingest takes
    /// this lock too: it is held for [`LOCK_CHUNK`] devices at a time.
    pub fn local_views(&self, ids: &[String]) -> Vec<LocalView> {
        let mut views = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(LOCK_CHUNK) {
            let devices = lock(&self.devices);
            views.extend(chunk.iter().map(|id| {
                let entry = devices.map.get(id.as_str());
                LocalView {
                    online: entry.is_some_and(|e| e.conn.is_some()),
                    edge: entry.and_then(|e| e.status.as_deref().cloned()),
                    presence_ms: entry.and_then(|e| presence(e.presence_ms)),
                }
            }));
        }
        views
    }

    /// When `device_id` last connected or disconnected (this process),
    /// Unix ms.
    pub fn presence_ms(&self, device_id: &str) -> Option<i64> {
        let devices = lock(&self.devices);
        presence(devices.map.get(device_id)?.presence_ms)
    }

    /// Sends a `status` frame to the device's subscribers, if any.
    ///
    /// Presence changes go through the topic, so presence and readings
    /// reach the subscribers in order.
    fn publish_status(
        &self,
        topic: &Topic,
        device_id: &str,
        online: bool,
        seen_ms: i64,
        outbox: Option<(u64, i64, ems_shared::EdgeLosses)>,
    ) {
        if topic.receiver_count() > 0 {
            let frame = ems_shared::DashboardFrame::Status {
                device_id: device_id.to_owned(),
                online,
                last_seen_ms: Some(seen_ms),
                outbox_depth: outbox.map(|o| o.0),
                behind_ms: outbox.map(|o| o.1),
                losses: outbox.map(|o| o.2),
            };
            let _ = topic.send(Utf8Bytes::from(frame.to_json()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::Mail;

    fn addr(a: &str) -> SocketAddr {
        a.parse().unwrap()
    }

    #[test]
    fn second_connection_kicks_the_first() {
        let r = Registry::new(4);
        let id: Arc<str> = Arc::from("dev");
        let (a, prev) = r
            .connect_device(&id, addr("1.1.1.1:1"), None, None)
            .unwrap();
        assert!(prev.is_none());
        assert_eq!(a.mailbox.try_next(), None);
        let (b, prev) = r
            .connect_device(&id, addr("2.2.2.2:2"), None, None)
            .unwrap();
        assert_eq!(prev, Some(addr("1.1.1.1:1")));
        assert_eq!(a.mailbox.try_next(), Some(Mail::Kick(Kick::Replaced)));
        // The old connection's late disconnect leaves the new one alone.
        r.disconnect_device(&id, a.conn_id);
        assert!(r.is_online("dev"));
        r.disconnect_device(&id, b.conn_id);
        assert!(!r.is_online("dev"));
    }

    #[test]
    fn presence_is_published_to_subscribers() {
        let r = Registry::new(8);
        let id: Arc<str> = Arc::from("dev");
        assert_eq!(r.presence_ms("dev"), None);
        let mut sub = r.topic(&id).subscribe();
        let (lease, _) = r
            .connect_device(&id, addr("10.0.0.9:1"), None, None)
            .unwrap();
        r.disconnect_device(&id, lease.conn_id);
        let frame = |t: Utf8Bytes| serde_json::from_str::<ems_shared::DashboardFrame>(&t).unwrap();
        for online in [true, false] {
            match frame(sub.try_recv().unwrap()) {
                ems_shared::DashboardFrame::Status {
                    online: o,
                    last_seen_ms: Some(_),
                    ..
                } => assert_eq!(o, online),
                other => panic!("{other:?}"),
            }
        }
        assert!(r.presence_ms("dev").is_some());
    }

    #[test]
    fn topics_are_shared_and_bounded() {
        let r = Registry::new(2);
        let id: Arc<str> = Arc::from("dev");
        let (lease, _) = r
            .connect_device(&id, addr("10.0.0.9:1"), None, None)
            .unwrap();
        // Subscribed after the connect, so its presence frame is not counted.
        let mut sub = r.topic(&id).subscribe();
        for i in 0..3 {
            lease.topic.send(Utf8Bytes::from(format!("{i}"))).unwrap();
        }
        assert!(matches!(
            sub.try_recv(),
            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(1))
        ));
    }

    #[test]
    fn takeover_loops_are_refused_for_a_cooldown() {
        let policy = TakeoverPolicy {
            max_replacements: 2,
            window: Duration::from_secs(60),
            cooldown: Duration::from_millis(300),
        };
        let r = Registry::with_policy(4, policy);
        let id: Arc<str> = Arc::from("dev");
        let (_a, _) = r
            .connect_device(&id, addr("10.0.0.1:1"), None, None)
            .unwrap();
        let (_b, _) = r
            .connect_device(&id, addr("10.0.0.2:1"), None, None)
            .unwrap();
        let (c, _) = r
            .connect_device(&id, addr("10.0.0.3:1"), None, None)
            .unwrap();
        // The third replacement within the window is a loop.
        let e = r
            .connect_device(&id, addr("10.0.0.4:1"), None, None)
            .err()
            .unwrap();
        assert_eq!(e.other_peer, Some(addr("10.0.0.3:1")));
        assert_eq!(c.mailbox.try_next(), Some(Mail::Kick(Kick::Conflict)));
        assert!(!r.is_online("dev"));
        // Refused during the cool-down, accepted after it.
        assert!(r
            .connect_device(&id, addr("10.0.1.11:1"), None, None)
            .is_err());
        std::thread::sleep(Duration::from_millis(350));
        assert!(r
            .connect_device(&id, addr("10.0.1.12:1"), None, None)
            .is_ok());
    }

    #[test]
    fn kick_and_status() {
        let r = Registry::new(4);
        let id: Arc<str> = Arc::from("dev");
        assert!(!r.kick("dev", Kick::Revoked));
        let (a, _) = r
            .connect_device(&id, addr("10.0.1.13:1"), Some([1; 32]), None)
            .unwrap();
        assert_eq!(r.device_tokens(), vec![(id.clone(), Some([1; 32]))]);
        assert!(r.kick("dev", Kick::Revoked));
        assert!(!r.kick("dev", Kick::Revoked), "a connection is kicked once");
        assert_eq!(a.mailbox.try_next(), Some(Mail::Kick(Kick::Revoked)));
        let st = EdgeStatus {
            outbox_depth: 5,
            oldest_ts_ms: Some(1_000),
            ..Default::default()
        };
        r.set_edge_status(&id, st, 11_000);
        assert_eq!(r.edge_status("dev").map(|e| e.behind_ms), Some(10_000));
        r.disconnect_device(&id, a.conn_id);
        assert!(r.edge_status("dev").is_none());
    }

    #[test]
    fn every_connection_is_ticked_once_per_period_and_not_in_its_first_half() {
        let r = Registry::new(4);
        r.heartbeat(3);
        let leases: Vec<DeviceLease> = (0..40)
            .map(|i| {
                let id: Arc<str> = Arc::from(format!("dev{i}"));
                r.connect_device(&id, addr("10.0.0.9:1"), None, None)
                    .unwrap()
                    .0
            })
            .collect();
        let n = u64::from(HEARTBEAT_PHASES);
        let mut first = vec![None; leases.len()];
        for round in 4..4 + 2 * n {
            r.heartbeat(round);
            for (i, l) in leases.iter().enumerate() {
                if l.mailbox.try_next() == Some(Mail::Tick) {
                    let f = *first[i].get_or_insert(round);
                    assert_eq!((round - f) % n, 0, "one tick per {n} rounds");
                }
            }
        }
        for f in first {
            let since = f.expect("ticked") - 3;
            assert!(
                (n / 2..=n).contains(&since),
                "first tick {since} rounds after the connect"
            );
        }
    }

    #[test]
    fn one_entry_per_device_outlives_its_connections() {
        let r = Registry::new(4);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        // A subscriber first: the device's connection gets the same topic.
        let mut sub = r.topic(&a).subscribe();
        assert_eq!((r.online_count(), r.presence_ms("a")), (0, None));
        assert!(!r.is_online("a"), "a topic is not a connection");
        let (la, _) = r
            .connect_device(&a, addr("10.0.3.1:1"), None, None)
            .unwrap();
        let (lb, _) = r
            .connect_device(&b, addr("10.0.3.2:1"), None, None)
            .unwrap();
        let (la2, _) = r
            .connect_device(&a, addr("10.0.3.3:1"), None, None)
            .unwrap();
        assert_eq!(r.online_count(), 2, "a takeover is one device online");
        la.topic.send(Utf8Bytes::from("r")).unwrap();
        assert!(sub.try_recv().is_ok(), "presence of the first connect");
        assert!(sub.try_recv().is_ok(), "presence of the second connect");
        assert_eq!(sub.try_recv().unwrap(), "r");
        r.set_edge_status(&b, EdgeStatus::default(), 5);
        r.disconnect_device(&b, lb.conn_id);
        r.disconnect_device(&a, la.conn_id);
        assert_eq!(
            r.online_count(),
            1,
            "a replaced connection's late disconnect"
        );
        assert_eq!(r.edge_status("b"), None, "forgotten with its connection");
        r.set_edge_status(&b, EdgeStatus::default(), 6);
        assert_eq!(r.edge_statuses(), vec![], "not kept while offline");
        assert!(r.presence_ms("b").is_some(), "kept after the disconnect");
        r.disconnect_device(&a, la2.conn_id);
        assert_eq!(r.online_count(), 0);
        let views = r.local_views(&["a".into(), "c".into()]);
        assert!(!views[0].online && views[0].presence_ms.is_some());
        assert!(!views[1].online && views[1].presence_ms.is_none());
    }

    #[test]
    fn a_devices_rate_limits_outlive_its_connections() {
        use crate::config::RateLimit;
        use crate::limits::TokenBucket;
        let r = Registry::new(4);
        let id: Arc<str> = Arc::from("dev");
        let t0 = Instant::now();
        let one = RateLimit {
            rate: 0.0,
            burst: 1.0,
            abuse_after: Duration::from_secs(1),
        };
        let make = || DeviceLimits::new(TokenBucket::new(&one, t0), Duration::from_secs(10));
        let (a, _) = r
            .connect_device(&id, addr("10.0.4.1:1"), None, None)
            .unwrap();
        assert!(r.limits(&id, make).try_take(t0));
        r.disconnect_device(&id, a.conn_id);
        r.connect_device(&id, addr("10.0.4.1:2"), None, None)
            .unwrap();
        assert!(
            !r.limits(&id, make).try_take(t0),
            "a reconnect does not refill the bucket"
        );
        assert!(r.limits(&Arc::from("other"), make).try_take(t0));
    }

    #[test]
    fn the_shutdown_reaches_live_and_later_connections() {
        let r = Registry::new(4);
        let (a, _) = r
            .connect_device(&Arc::from("a"), addr("10.0.2.1:1"), None, None)
            .unwrap();
        r.shut_down();
        let (b, _) = r
            .connect_device(&Arc::from("b"), addr("10.0.2.1:1"), None, None)
            .unwrap();
        assert_eq!(a.mailbox.try_next(), Some(Mail::ShuttingDown));
        assert_eq!(b.mailbox.try_next(), Some(Mail::ShuttingDown));
    }
}
