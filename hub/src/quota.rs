//! Quotas that keep one client from taking what all share: connection
//! slots per client address, live dashboards per viewer token, and one
//! heavy store query at a time per viewer token (a few more may wait; the
//! rest are told to retry). A streamed download (the CSV export) holds the
//! token's turn for as long as it streams, which may be minutes: while it
//! does, the token's other API queries are told to retry at once instead
//! of waiting behind it (another download still queues).
//!
//! Slots are RAII guards: a connection (and the WebSocket session it
//! becomes) holds its slot until it ends. The maps only hold keys with a
//! slot in use, so they stay as small as the live connections.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::store::TokenHash;

/// Heavy queries of one viewer token that may wait while one runs; more
/// are refused (429).
pub(crate) const HEAVY_WAITING: usize = 4;

/// The quotas of one hub.
pub(crate) struct Quotas {
    /// Connections by client address.
    pub per_ip: Counter<IpAddr>,
    /// Live dashboards by viewer token.
    pub dashboards: Counter<TokenHash>,
    /// Heavy queries by viewer token.
    heavy: Mutex<HashMap<TokenHash, Arc<HeavyGate>>>,
}

impl Quotas {
    /// At most `per_ip` connections per address and `dashboards` per
    /// viewer token.
    pub(crate) fn new(per_ip: usize, dashboards: usize) -> Quotas {
        Quotas {
            per_ip: Counter::new(per_ip),
            dashboards: Counter::new(dashboards),
            heavy: Mutex::new(HashMap::new()),
        }
    }

    /// The heavy-query turn of `viewer`: at once when none runs, after the
    /// running one when `wait` (dashboards; or an API request while fewer
    /// than [`HEAVY_WAITING`] wait), else `None` (busy: retry later).
    pub(crate) async fn heavy(&self, viewer: &TokenHash, wait: bool) -> Option<HeavyTurn> {
        self.turn(viewer, wait, false).await
    }

    /// The turn of a streamed download: as [`Quotas::heavy`] without
    /// `wait`; until the turn is dropped, API requests of `viewer` are
    /// refused rather than queued (dashboards and downloads still wait).
    pub(crate) async fn heavy_stream(&self, viewer: &TokenHash) -> Option<HeavyTurn> {
        self.turn(viewer, false, true).await
    }

    async fn turn(&self, viewer: &TokenHash, wait: bool, stream: bool) -> Option<HeavyTurn> {
        let gate = {
            let mut map = lock(&self.heavy);
            // Forget idle gates now and then; only valid viewer tokens get
            // here, so the map is small anyway.
            if map.len() > 1024 {
                map.retain(|_, g| Arc::strong_count(g) > 1);
            }
            map.entry(*viewer)
                .or_insert_with(|| {
                    Arc::new(HeavyGate {
                        running: Arc::new(Semaphore::new(1)),
                        waiting: AtomicUsize::new(0),
                        streaming: AtomicBool::new(false),
                    })
                })
                .clone()
        };
        let permit = match gate.running.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !wait
                    && ((!stream && gate.streaming.load(Ordering::Relaxed))
                        || gate.waiting.load(Ordering::Relaxed) >= HEAVY_WAITING)
                {
                    return None;
                }
                gate.waiting.fetch_add(1, Ordering::Relaxed);
                let p = gate.running.clone().acquire_owned().await.ok();
                gate.waiting.fetch_sub(1, Ordering::Relaxed);
                p?
            }
        };
        if stream {
            gate.streaming.store(true, Ordering::Relaxed);
        }
        Some(HeavyTurn {
            stream: stream.then_some(gate),
            _permit: permit,
        })
    }
}

/// One viewer token's heavy queries: one runs, some wait.
struct HeavyGate {
    running: Arc<Semaphore>,
    waiting: AtomicUsize,
    /// The one running is a streamed download.
    streaming: AtomicBool,
}

/// The right to run one heavy query; the next one runs once it is dropped.
pub(crate) struct HeavyTurn {
    /// The gate of a streamed download's turn (its flag is cleared on drop).
    stream: Option<Arc<HeavyGate>>,
    /// Dropped after the flag is cleared (fields drop after `drop`).
    _permit: OwnedSemaphorePermit,
}

impl Drop for HeavyTurn {
    fn drop(&mut self) {
        if let Some(gate) = &self.stream {
            gate.streaming.store(false, Ordering::Relaxed);
        }
    }
}

/// Live uses by key, each at most `max`.
pub(crate) struct Counter<K: Hash + Eq + Clone> {
    counts: Arc<Mutex<HashMap<K, usize>>>,
    max: usize,
}

impl<K: Hash + Eq + Clone> Counter<K> {
    fn new(max: usize) -> Self {
        Counter {
            counts: Arc::new(Mutex::new(HashMap::new())),
            max: max.max(1),
        }
    }

    /// A slot for `key`, or `None` when it already has `max`.
    pub(crate) fn take(&self, key: K) -> Option<Slot<K>> {
        let mut m = lock(&self.counts);
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            counts: self.counts.clone(),
            key,
        })
    }

    /// Slots of `key` in use.
    #[cfg(test)]
    fn used(&self, key: &K) -> usize {
        lock(&self.counts).get(key).copied().unwrap_or(0)
    }
}

/// One use of a [`Counter`]'s key, given back when dropped.
pub(crate) struct Slot<K: Hash + Eq + Clone> {
    counts: Arc<Mutex<HashMap<K, usize>>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut m = lock(&self.counts);
        if let Some(n) = m.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // One insert or decrement cannot leave a map inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_and_given_back() {
        let c: Counter<u8> = Counter::new(2);
        let a = c.take(1).unwrap();
        let b = c.take(1).unwrap();
        assert!(c.take(1).is_none());
        assert!(c.take(2).is_some());
        drop(a);
        assert_eq!(c.used(&1), 1);
        let _again = c.take(1).unwrap();
        drop(b);
        assert_eq!(c.used(&1), 1);
    }

    #[tokio::test]
    async fn heavy_queries_take_turns_per_token() {
        let q = Arc::new(Quotas::new(1, 1));
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let first = q.heavy(&a, false).await.unwrap();
        // Another token is not affected.
        assert!(q.heavy(&b, false).await.is_some());
        // Up to HEAVY_WAITING wait for their turn, more are refused.
        let mut waiting = Vec::new();
        for _ in 0..HEAVY_WAITING {
            let q = q.clone();
            waiting.push(tokio::spawn(
                async move { q.heavy(&a, false).await.is_some() },
            ));
        }
        while lock(&q.heavy)[&a].waiting.load(Ordering::Relaxed) < HEAVY_WAITING {
            tokio::task::yield_now().await;
        }
        assert!(q.heavy(&a, false).await.is_none());
        drop(first);
        for w in waiting {
            assert!(w.await.unwrap());
        }
    }

    #[tokio::test]
    async fn a_streamed_download_holds_the_turn_and_refuses_api_queries() {
        let q = Arc::new(Quotas::new(1, 1));
        let a = [1u8; 32];
        let stream = q.heavy_stream(&a).await.unwrap();
        // API queries: refused at once.
        assert!(q.heavy(&a, false).await.is_none());
        // A dashboard and another download wait for it.
        let dashboard = {
            let q = q.clone();
            tokio::spawn(async move { q.heavy(&a, true).await.is_some() })
        };
        let download = {
            let q = q.clone();
            tokio::spawn(async move { q.heavy_stream(&a).await.is_some() })
        };
        while lock(&q.heavy)[&a].waiting.load(Ordering::Relaxed) < 2 {
            tokio::task::yield_now().await;
        }
        assert!(q.heavy(&a, false).await.is_none());
        drop(stream);
        assert!(dashboard.await.unwrap());
        assert!(download.await.unwrap());
        // Once it ended, a query runs again.
        assert!(q.heavy(&a, false).await.is_some());
    }
}
