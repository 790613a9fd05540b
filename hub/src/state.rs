//! The state every connection of a running hub shares, built in one place
//! ([`Shared::new`], called by [`crate::run`]). The one handle through
//! which async code reaches the blocking store ([`StoreHandle`]) lives in
//! [`crate::store::handle`] and is named here too, since every stage uses
//! it beside `Shared`.
//!
//! Every stage may import this module; it holds no logic of its own beyond
//! running store calls off the async workers.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::auth::cache::AuthCache;
use crate::config::Config;
use crate::fanout::registry::Registry;
use crate::ingest::writer::{Item, WriterControl};
use crate::limits::Buckets;
use crate::metrics::Metrics;
use crate::mqtt::MqttHandle;
use crate::presence::Presence;
use crate::quota::Quotas;
pub(crate) use crate::store::handle::{CallError, Opener, StoreHandle};

/// State shared by every connection.
pub(crate) struct Shared {
    /// The validated configuration.
    pub config: Config,
    /// Device connections and live topics.
    pub registry: Registry,
    /// The store for everything but the batched writes: token look-ups,
    /// history, presence, the admin API.
    pub store: StoreHandle,
    /// Quarantine budgets of devices (bytes), asked only for refused
    /// frames.
    pub quarantine_budgets: Buckets,
    /// Queue to the store writer; a full queue is the backpressure that
    /// stops device sessions from reading their sockets.
    pub queue: mpsc::Sender<Item>,
    /// Requests to the store writer (commit now) and what it holds.
    pub writer: Arc<WriterControl>,
    /// Flips to `true` when the hub shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// TLS acceptor when the hub terminates TLS itself.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Counters behind `/metrics` and `/readyz`.
    pub metrics: Arc<Metrics>,
    /// The MQTT bridge, when configured (the registry holds a clone for
    /// presence).
    pub mqtt: Option<MqttHandle>,
    /// Every valid token, in memory: what handshakes and the API check
    /// against (kept current by the revocation poll).
    pub auth: AuthCache,
    /// Connection slots by client address, dashboards and heavy queries by
    /// viewer token.
    pub quotas: Quotas,
    /// This hub's part in the shared device state.
    pub presence: Arc<Presence>,
}

impl Shared {
    /// The shared state of a hub on `config`, with its look-up `store`,
    /// the writer's `queue` and control, the `shutdown` flag, the MQTT bridge and its
    /// tokens (`auth`).
    // One caller (`app::run`); every argument is a distinct part of the hub.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        store: StoreHandle,
        (queue, writer): (mpsc::Sender<Item>, Arc<WriterControl>),
        shutdown: watch::Receiver<bool>,
        tls: Option<tokio_rustls::TlsAcceptor>,
        metrics: Arc<Metrics>,
        mqtt: Option<MqttHandle>,
        auth: AuthCache,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            registry: Registry::with_policy(config.subscriber_buffer, config.takeover)
                .with_mqtt(mqtt.clone()),
            store,
            quarantine_budgets: Buckets::default(),
            quotas: Quotas::new(
                config.max_connections_per_ip,
                config.max_dashboards_per_token,
            ),
            presence: Arc::new(Presence::new(config.hub_id.clone().unwrap_or_default())),
            config,
            queue,
            writer,
            shutdown,
            tls,
            metrics,
            mqtt,
            auth,
        })
    }
}
