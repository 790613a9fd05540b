//! The state every connection of a running hub shares, built in one place
//! ([`Shared::new`], called by [`crate::run`]), and the one handle through
//! which async code reaches the blocking store ([`StoreHandle`]).
//!
//! Every stage may import this module; it holds no logic of its own beyond
//! running store calls off the async workers.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinError;

use crate::config::Config;
use crate::fanout::registry::Registry;
use crate::ingest::limits::Buckets;
use crate::ingest::writer::Item;
use crate::metrics::Metrics;
use crate::mqtt::MqttHandle;
use crate::store::{Store, StoreError};

/// State shared by every connection.
pub(crate) struct Shared {
    /// The validated configuration.
    pub config: Config,
    /// Device connections and live topics.
    pub registry: Registry,
    /// The store for everything but the batched writes: token look-ups,
    /// history, presence, the admin API.
    pub store: StoreHandle,
    /// Rate-limit buckets of devices, kept between their connections.
    pub buckets: Buckets,
    /// Quarantine budgets of devices (bytes), asked only for refused
    /// frames.
    pub quarantine_budgets: Buckets,
    /// Queue to the store writer; a full queue is the backpressure that
    /// stops device sessions from reading their sockets.
    pub queue: mpsc::Sender<Item>,
    /// Flips to `true` when the hub shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// TLS acceptor when the hub terminates TLS itself.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Counters behind `/metrics` and `/readyz`.
    pub metrics: Arc<Metrics>,
    /// The MQTT bridge, when configured (the registry holds a clone for
    /// presence).
    pub mqtt: Option<MqttHandle>,
}

impl Shared {
    /// The shared state of a hub on `config`, with its look-up `store`,
    /// the writer's `queue`, the `shutdown` flag and the MQTT bridge.
    pub fn new(
        config: Config,
        store: Box<dyn Store>,
        queue: mpsc::Sender<Item>,
        shutdown: watch::Receiver<bool>,
        tls: Option<tokio_rustls::TlsAcceptor>,
        metrics: Arc<Metrics>,
        mqtt: Option<MqttHandle>,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            registry: Registry::with_policy(config.subscriber_buffer, config.takeover)
                .with_mqtt(mqtt.clone()),
            store: StoreHandle::new(store),
            buckets: Buckets::default(),
            quarantine_budgets: Buckets::default(),
            config,
            queue,
            shutdown,
            tls,
            metrics,
            mqtt,
        })
    }
}

/// A store handle for async code: one connection behind a mutex, used
/// from the blocking pool so no async worker ever waits on the database.
#[derive(Clone)]
pub(crate) struct StoreHandle(Arc<Mutex<Box<dyn Store>>>);

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
        StoreHandle(Arc::new(Mutex::new(store)))
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
        let store = self.0.clone();
        let task = tokio::task::spawn_blocking(move || {
            // A panic inside a store call cannot leave the handle half
            // changed in a way a later call could observe (each call is a
            // transaction or a read), so a poisoned lock is taken over.
            let mut store = store.lock().unwrap_or_else(|p| p.into_inner());
            f(store.as_mut())
        });
        async move { Ok(task.await??) }
    }

    /// Identifies this handle (and so its hub) among others in one
    /// process, for caches shared by every hub of the process.
    pub fn id(&self) -> usize {
        Arc::as_ptr(&self.0) as *const () as usize
    }
}
