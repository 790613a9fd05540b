//! The connection manager: which device is connected where, and the live
//! topic of every device.
//!
//! - One device, one connection: [`Registry::connect_device`] registers a
//!   new connection and tells the previous one (if any) to close with 4000.
//! - Topics: one bounded `broadcast` channel per device. A reading is
//!   serialized once and the bytes are shared by every subscriber; a
//!   subscriber that falls more than the channel's capacity behind sees
//!   `Lagged` and is dropped, without slowing the device or the others.
//!
//! Locks are std mutexes held for a map operation only, never across an
//! `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{broadcast, oneshot};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Why the hub asks a device connection to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// A newer connection of the same device took over (close code 4000).
    Replaced,
}

struct DeviceSlot {
    /// Identifies the connection, so a late disconnect of a replaced
    /// connection does not remove its successor.
    conn_id: u64,
    /// Tells the connection to close.
    kick: oneshot::Sender<Kick>,
    /// Peer address, for the takeover log line.
    peer: String,
}

/// A registered device connection.
pub struct DeviceLease {
    /// This connection's id.
    pub conn_id: u64,
    /// Fires when the connection must close.
    pub kick: oneshot::Receiver<Kick>,
    /// The device's live topic.
    pub topic: broadcast::Sender<Utf8Bytes>,
}

/// Shared connection state of the hub.
pub struct Registry {
    /// Live device connections by device id.
    devices: Mutex<HashMap<Arc<str>, DeviceSlot>>,
    /// Live topics by device id. Created on first use by a device or a
    /// subscriber; devices are provisioned, so this stays bounded.
    topics: Mutex<HashMap<Arc<str>, broadcast::Sender<Utf8Bytes>>>,
    /// Source of connection ids.
    next_conn: AtomicU64,
    /// Capacity of each topic.
    topic_capacity: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the maps inconsistent
    // (single insert/remove), so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    /// An empty registry whose topics buffer `topic_capacity` frames.
    pub fn new(topic_capacity: usize) -> Self {
        Registry {
            devices: Mutex::new(HashMap::new()),
            topics: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            topic_capacity: topic_capacity.max(1),
        }
    }

    /// The live topic of `device_id`.
    pub fn topic(&self, device_id: &Arc<str>) -> broadcast::Sender<Utf8Bytes> {
        let mut topics = lock(&self.topics);
        topics
            .entry(device_id.clone())
            .or_insert_with(|| broadcast::channel(self.topic_capacity).0)
            .clone()
    }

    /// Registers a new connection of `device_id`, kicking the previous one.
    /// Returns the lease and the previous connection's peer address.
    pub fn connect_device(&self, device_id: &Arc<str>, peer: String) -> (DeviceLease, Option<String>) {
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let old = lock(&self.devices).insert(
            device_id.clone(),
            DeviceSlot {
                conn_id,
                kick: tx,
                peer,
            },
        );
        let old_peer = old.map(|slot| {
            // The old connection may already be gone; nothing to do then.
            let _ = slot.kick.send(Kick::Replaced);
            slot.peer
        });
        let lease = DeviceLease {
            conn_id,
            kick: rx,
            topic: self.topic(device_id),
        };
        (lease, old_peer)
    }

    /// Removes the connection `conn_id` of `device_id` if it is still the
    /// registered one.
    pub fn disconnect_device(&self, device_id: &str, conn_id: u64) {
        let mut devices = lock(&self.devices);
        if devices.get(device_id).is_some_and(|s| s.conn_id == conn_id) {
            devices.remove(device_id);
        }
    }

    /// Whether `device_id` has a live connection.
    pub fn is_online(&self, device_id: &str) -> bool {
        lock(&self.devices).contains_key(device_id)
    }

    /// Number of live device connections.
    pub fn online_count(&self) -> usize {
        lock(&self.devices).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_connection_kicks_the_first() {
        let r = Registry::new(4);
        let id: Arc<str> = Arc::from("dev");
        let (mut a, prev) = r.connect_device(&id, "1.1.1.1:1".into());
        assert!(prev.is_none());
        assert!(a.kick.try_recv().is_err());
        let (b, prev) = r.connect_device(&id, "2.2.2.2:2".into());
        assert_eq!(prev.as_deref(), Some("1.1.1.1:1"));
        assert_eq!(a.kick.try_recv().ok(), Some(Kick::Replaced));
        // The old connection's late disconnect leaves the new one alone.
        r.disconnect_device(&id, a.conn_id);
        assert!(r.is_online("dev"));
        r.disconnect_device(&id, b.conn_id);
        assert!(!r.is_online("dev"));
    }

    #[test]
    fn topics_are_shared_and_bounded() {
        let r = Registry::new(2);
        let id: Arc<str> = Arc::from("dev");
        let mut sub = r.topic(&id).subscribe();
        let (lease, _) = r.connect_device(&id, "p".into());
        for i in 0..3 {
            lease.topic.send(Utf8Bytes::from(format!("{i}"))).unwrap();
        }
        assert!(matches!(
            sub.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(1))
        ));
    }
}
