//! The one handle through which async code reaches the blocking store:
//! [`StoreHandle::call`] runs store work on the blocking pool, and a
//! handle may start before its database answers.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinError;

use super::{Store, StoreError};

/// A store handle for async code: one connection behind a mutex, used
/// from the blocking pool so no async worker ever waits on the database.
///
/// A handle may start without its store ([`StoreHandle::opening`]): the
/// database was not reachable when the hub started. Then a call first
/// tries to open it — at most once per [`OPEN_RETRY`]; in between, calls
/// fail at once with the last reason — so the hub runs, not ready, until
/// the database answers.
#[derive(Clone)]
pub(crate) struct StoreHandle(Arc<Mutex<Slot>>);

/// Opens a store (the database URL and options are inside).
pub(crate) type Opener = Box<dyn Fn() -> Result<Box<dyn Store>, StoreError> + Send>;

/// What a [`StoreHandle`] holds.
struct Slot {
    /// The open store, once there is one.
    store: Option<Box<dyn Store>>,
    /// How to open it, when it is not open yet.
    opener: Option<Opener>,
    /// The last attempt to open it and why it failed.
    failed: Option<(Instant, String)>,
}

/// Least time between two attempts to open a store that was unreachable.
const OPEN_RETRY: Duration = Duration::from_secs(1);

/// Why a [`StoreHandle::call`] failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// The store answered with an error.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The blocking task failed (it panicked, or the runtime is shutting
    /// down).
    #[error(transparent)]
    Task(#[from] JoinError),
}

impl StoreHandle {
    /// Wraps an open store.
    pub fn new(store: Box<dyn Store>) -> Self {
        StoreHandle(Arc::new(Mutex::new(Slot {
            store: Some(store),
            opener: None,
            failed: None,
        })))
    }

    /// A handle whose store is opened by `opener` on first use (see the
    /// type's docs); `why` is why it could not be opened yet.
    pub fn opening(opener: Opener, why: String) -> Self {
        StoreHandle(Arc::new(Mutex::new(Slot {
            store: None,
            opener: Some(opener),
            failed: Some((Instant::now(), why)),
        })))
    }

    /// A handle whose store its first call opens (on the blocking pool),
    /// so nothing waits for it at start.
    pub fn lazy(opener: Opener) -> Self {
        StoreHandle(Arc::new(Mutex::new(Slot {
            store: None,
            opener: Some(opener),
            failed: None,
        })))
    }

    /// Runs `f` on the store on the blocking pool, holding the store's lock
    /// for exactly as long as `f` runs. The call starts at once; the
    /// returned future only waits for its answer (dropping it does not
    /// cancel the call) and does not borrow the handle.
    pub fn call<T, F>(&self, f: F) -> impl Future<Output = Result<T, CallError>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        let slot = self.0.clone();
        let task = tokio::task::spawn_blocking(move || {
            // A panic inside a store call cannot leave the handle half
            // changed in a way a later call could observe (each call is a
            // transaction or a read), so a poisoned lock is taken over.
            let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            f(slot.store()?)
        });
        async move { Ok(task.await??) }
    }
}

impl Slot {
    /// The open store, opening it first when it is time to try again.
    fn store(&mut self) -> Result<&mut dyn Store, StoreError> {
        if self.store.is_none() {
            let due = self
                .failed
                .as_ref()
                .map_or(true, |(at, _)| at.elapsed() >= OPEN_RETRY);
            if let (Some(open), true) = (&self.opener, due) {
                match open() {
                    Ok(s) => {
                        log::info!("store reachable: opened");
                        self.store = Some(s);
                        self.opener = None;
                        self.failed = None;
                    }
                    Err(e) => self.failed = Some((Instant::now(), e.to_string())),
                }
            }
        }
        match &mut self.store {
            Some(s) => Ok(s.as_mut()),
            None => Err(StoreError::Db(match &self.failed {
                Some((_, why)) => why.clone(),
                None => "no store".into(),
            })),
        }
    }
}
