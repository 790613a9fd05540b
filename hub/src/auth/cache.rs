//! Authentication from memory: every valid device, viewer and admin token
//! hash, loaded from the store and kept current by the revocation poll
//! ([`super::revocation`]), so that a handshake or an API request costs a
//! hash-map look-up and never waits for the database — a flood of forged
//! tokens (anyone can compute the checksum) takes no lock that real
//! handshakes, ingestion or viewer queries need
//! (docs/decisions/hub-tokens-in-memory.md).
//!
//! - **Current.** The poll reads the store's change counter (one integer)
//!   every `revocation_poll` and reloads the whole snapshot only when it
//!   moved. Its own store connection serves nothing else.
//! - **Misses.** A token that is not in memory may have been added a
//!   moment ago (by the admin CLI, another hub): a miss asks for one
//!   counter read that starts after the miss and waits for it (at most
//!   [`MISS_WAIT`]). Misses arriving together share that read, and the poll
//!   reads at most once per [`MIN_READ_GAP`], so unknown tokens cost the
//!   database at most that many small reads whatever their rate.
//! - **Fails closed.** The snapshot counts only while the store confirmed
//!   it within `auth_grace`; after that every look-up answers
//!   [`Answer::Unavailable`] (handshakes 503, dashboards close with 4001).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use crate::store::handle::{CallError, StoreHandle};
use crate::store::{ct_eq, AuthSnapshot, TokenHash, ViewerScope};

/// Longest a look-up that missed waits for a fresh read of the store.
pub(crate) const MISS_WAIT: Duration = Duration::from_secs(1);

/// Least time between two reads of the change counter.
pub(crate) const MIN_READ_GAP: Duration = Duration::from_millis(50);

/// What the tokens in memory say about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer<T> {
    /// Valid, with what it opens.
    Yes(T),
    /// Not valid (unknown, revoked, another device's).
    No,
    /// Cannot tell: the store has not confirmed the tokens within the
    /// grace period (or was never reached).
    Unavailable,
}

/// The tokens as last read from the store.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    /// The store's change counter when read.
    changes: i64,
    /// Every device ever added, with its token hash unless revoked.
    devices: HashMap<Box<str>, Option<TokenHash>>,
    /// Unrevoked viewers by token hash: name and scope.
    viewers: HashMap<TokenHash, (Box<str>, ViewerScope)>,
    /// Unrevoked admins by token hash: name.
    admins: HashMap<TokenHash, Box<str>>,
    /// The unrevoked devices' ids, sorted: sorted once per snapshot, not
    /// once per device list.
    active_sorted: Vec<Box<str>>,
}

impl Snapshot {
    /// The maps of a snapshot read from the store.
    pub(crate) fn from_store(s: AuthSnapshot) -> Snapshot {
        let devices: HashMap<Box<str>, Option<TokenHash>> = s
            .devices
            .into_iter()
            .map(|(id, h)| (id.into_boxed_str(), h))
            .collect();
        let mut active_sorted: Vec<Box<str>> = devices
            .iter()
            .filter(|(_, h)| h.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        active_sorted.sort_unstable();
        Snapshot {
            changes: s.changes,
            devices,
            active_sorted,
            viewers: s
                .viewers
                .into_iter()
                .map(|(h, name, scope)| (h, (name.into_boxed_str(), scope)))
                .collect(),
            admins: s
                .admins
                .into_iter()
                .map(|(h, name)| (h, name.into_boxed_str()))
                .collect(),
        }
    }

    /// Whether `hash` is the current token of `device_id`.
    pub(crate) fn device_valid(&self, device_id: &str, hash: &TokenHash) -> bool {
        matches!(self.devices.get(device_id), Some(Some(h)) if ct_eq(h, hash))
    }

    /// The ids of every unrevoked device, in no order.
    pub(crate) fn active_ids(&self) -> impl Iterator<Item = &str> {
        self.devices
            .iter()
            .filter(|(_, h)| h.is_some())
            .map(|(id, _)| &**id)
    }

    /// Number of tokens held (devices with a token, viewers, admins).
    fn len(&self) -> usize {
        self.devices.values().filter(|h| h.is_some()).count()
            + self.viewers.len()
            + self.admins.len()
    }
}

/// The tokens in memory and the machinery that keeps them current.
pub(crate) struct AuthCache {
    /// The store connection the refreshes use (nothing else does).
    store: StoreHandle,
    /// The last snapshot read, if any.
    snapshot: RwLock<Option<Arc<Snapshot>>>,
    /// When the last successful read of the counter started.
    confirmed: Mutex<Option<Instant>>,
    /// How long a snapshot counts without a confirmation.
    grace: Duration,
    /// Reads of the counter started so far.
    started: AtomicU64,
    /// The number of the last read that succeeded.
    done: watch::Sender<u64>,
    /// Asks the poll for a read now.
    wake: Notify,
}

impl AuthCache {
    /// Tokens read through `store`, valid for `grace` after each
    /// confirmation. Empty (everything `Unavailable`) until the first read.
    pub(crate) fn new(store: StoreHandle, grace: Duration) -> AuthCache {
        AuthCache {
            store,
            snapshot: RwLock::new(None),
            confirmed: Mutex::new(None),
            grace,
            started: AtomicU64::new(0),
            done: watch::channel(0).0,
            wake: Notify::new(),
        }
    }

    /// The snapshot, while the store confirmed it within the grace period.
    pub(crate) fn current(&self) -> Option<Arc<Snapshot>> {
        let confirmed = *self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
        if !confirmed.is_some_and(|at| at.elapsed() <= self.grace) {
            return None;
        }
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the tokens are loaded and confirmed within the grace period.
    pub(crate) fn fresh(&self) -> bool {
        self.current().is_some()
    }

    /// Whether `hash` opens `device_id`'s socket.
    pub(crate) async fn device(&self, device_id: &str, hash: &TokenHash) -> Answer<()> {
        self.look_up(|s| s.device_valid(device_id, hash).then_some(()))
            .await
    }

    /// The scope of the viewer token `hash`.
    pub(crate) async fn viewer(&self, hash: &TokenHash) -> Answer<ViewerScope> {
        self.look_up(|s| s.viewers.get(hash).map(|(_, scope)| scope.clone()))
            .await
    }

    /// The name of the admin whose token is `hash`.
    pub(crate) async fn admin(&self, hash: &TokenHash) -> Answer<String> {
        self.look_up(|s| s.admins.get(hash).map(|n| n.to_string()))
            .await
    }

    /// The scope of the viewer token `hash` as held now, without waiting
    /// (a token in use is in memory unless it was revoked).
    pub(crate) fn viewer_now(&self, hash: &TokenHash) -> Answer<ViewerScope> {
        match self.current() {
            None => Answer::Unavailable,
            Some(s) => s
                .viewers
                .get(hash)
                .map_or(Answer::No, |(_, scope)| Answer::Yes(scope.clone())),
        }
    }

    /// Whether `hash` is `device_id`'s current token as held now, without
    /// waiting.
    pub(crate) fn device_now(&self, device_id: &str, hash: &TokenHash) -> Answer<()> {
        match self.current() {
            None => Answer::Unavailable,
            Some(s) if s.device_valid(device_id, hash) => Answer::Yes(()),
            Some(_) => Answer::No,
        }
    }

    /// Whether a device with this id was ever added (revoked or not).
    pub(crate) fn device_known(&self, device_id: &str) -> bool {
        self.current()
            .is_some_and(|s| s.devices.contains_key(device_id))
    }

    /// The ids of every unrevoked device, sorted.
    pub(crate) fn active_devices(&self) -> Option<Vec<String>> {
        let s = self.current()?;
        Some(s.active_sorted.iter().map(|id| id.to_string()).collect())
    }

    /// Waits for a read of the store that starts after this call (at most
    /// [`MISS_WAIT`]): after a change made in this process, so that the
    /// next look-up sees it. `false` when no read succeeded in time.
    pub(crate) async fn refresh_now(&self) -> bool {
        let target = self.started.load(Ordering::SeqCst) + 1;
        let mut done = self.done.subscribe();
        self.wake.notify_one();
        let read = tokio::time::timeout(MISS_WAIT, async {
            done.wait_for(|d| *d >= target).await.is_ok()
        })
        .await;
        matches!(read, Ok(true))
    }

    /// `find` on the snapshot; on a miss, once more after a fresh read.
    async fn look_up<T>(&self, find: impl Fn(&Snapshot) -> Option<T>) -> Answer<T> {
        let Some(s) = self.current() else {
            return Answer::Unavailable;
        };
        if let Some(v) = find(&s) {
            return Answer::Yes(v);
        }
        drop(s);
        if !self.refresh_now().await {
            return Answer::Unavailable;
        }
        match self.current() {
            None => Answer::Unavailable,
            Some(s) => find(&s).map_or(Answer::No, Answer::Yes),
        }
    }

    /// Waits until a read is due: the poll interval has passed or a
    /// look-up asked for one (but not sooner than [`MIN_READ_GAP`] after
    /// the previous read).
    pub(crate) async fn due(&self, every: Duration, last: Instant) {
        tokio::select! {
            _ = tokio::time::sleep_until((last + every).into()) => {}
            _ = self.wake.notified() => {
                tokio::time::sleep_until((last + MIN_READ_GAP).into()).await;
            }
        }
    }

    /// One read: the change counter, and the whole snapshot when it moved.
    /// `Some(snapshot)` when a new one was loaded.
    pub(crate) async fn read(&self) -> Result<Option<Arc<Snapshot>>, CallError> {
        let n = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let at = Instant::now();
        let held = self
            .snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|s| s.changes);
        let changes = self.store.call(|s| s.token_changes()).await?;
        let loaded = if held == Some(changes) {
            None
        } else {
            // Built into maps on the blocking pool too.
            let snap = self
                .store
                .call(|s| s.auth_snapshot().map(Snapshot::from_store))
                .await?;
            let snap = Arc::new(snap);
            *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Some(snap.clone());
            Some(snap)
        };
        *self.confirmed.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
        self.done.send_modify(|d| *d = (*d).max(n));
        Ok(loaded)
    }

    /// Tokens held now (0 before the first read), for the metrics.
    pub(crate) fn held(&self) -> usize {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |s| s.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use crate::store::AdminStore;

    fn cache(grace: Duration) -> (tempfile::TempDir, String, AuthCache) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db").display().to_string();
        let store = SqliteStore::open(&path).unwrap();
        let c = AuthCache::new(StoreHandle::new(Box::new(store)), grace);
        (dir, path, c)
    }

    #[tokio::test]
    async fn unknown_until_read_then_answers_from_memory() {
        let (_d, path, c) = cache(Duration::from_secs(30));
        let mut other = SqliteStore::open(&path).unwrap();
        other.add_device("d1", &[1; 32], 1).unwrap();
        other.add_admin("ops", &[3; 32], 1).unwrap();
        assert_eq!(c.device("d1", &[1; 32]).await, Answer::Unavailable);
        assert!(c.read().await.unwrap().is_some());
        assert_eq!(c.device("d1", &[1; 32]).await, Answer::Yes(()));
        assert_eq!(c.device_now("d1", &[2; 32]), Answer::No);
        assert_eq!(c.admin(&[3; 32]).await, Answer::Yes("ops".into()));
        assert!(c.device_known("d1") && !c.device_known("d2"));
        assert_eq!(c.active_devices(), Some(vec!["d1".to_string()]));
        // Nothing changed: the next read loads nothing.
        assert!(c.read().await.unwrap().is_none());
        other.revoke_device("d1", 2).unwrap();
        assert!(c.read().await.unwrap().is_some());
        assert_eq!(c.device_now("d1", &[1; 32]), Answer::No);
        assert!(c.device_known("d1"));
        assert_eq!(c.active_devices(), Some(vec![]));
        assert_eq!(c.held(), 1);
    }

    #[tokio::test]
    async fn a_snapshot_stops_counting_after_the_grace_period() {
        // Long enough that a read on a loaded machine still counts.
        let (_d, _path, c) = cache(Duration::from_secs(2));
        c.read().await.unwrap();
        assert!(c.fresh());
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!c.fresh());
        assert_eq!(c.viewer_now(&[9; 32]), Answer::Unavailable);
    }

    #[tokio::test]
    async fn a_miss_waits_for_one_fresh_read() {
        let (_d, path, c) = cache(Duration::from_secs(30));
        let c = Arc::new(c);
        c.read().await.unwrap();
        // A poll loop that reads whenever asked.
        let poll = {
            let c = c.clone();
            tokio::spawn(async move {
                let mut last = Instant::now();
                loop {
                    c.due(Duration::from_secs(3600), last).await;
                    last = Instant::now();
                    let _ = c.read().await;
                }
            })
        };
        // Added behind the hub's back, then used at once: found.
        SqliteStore::open(&path)
            .unwrap()
            .add_device("late", &[5; 32], 1)
            .unwrap();
        assert_eq!(c.device("late", &[5; 32]).await, Answer::Yes(()));
        // A forged token: one read, then no.
        let t = Instant::now();
        assert_eq!(c.device("late", &[6; 32]).await, Answer::No);
        assert!(t.elapsed() < MISS_WAIT);
        poll.abort();
        // Nobody reads any more: a miss gives up after MISS_WAIT.
        assert_eq!(c.device("late", &[7; 32]).await, Answer::Unavailable);
    }
}
