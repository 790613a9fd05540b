//! The wiring of a running hub: [`run`] opens the stores, starts the MQTT
//! bridge (when configured), the store writer and the revocation poll,
//! builds the shared state, runs the accept loop and, once the shutdown
//! future completes, shuts everything down in order (sockets first, then
//! the writer, so every received reading is committed before `run`
//! returns; the MQTT bridge marks everything offline meanwhile).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::auth::revocation;
use crate::config::Config;
use crate::http::{self, ConnGuard};
use crate::ingest::writer::{Writer, WriterConfig};
use crate::metrics::{FlagCounts, Metrics};
use crate::mqtt::{MqttBridge, MqttError};
use crate::state::Shared;
use crate::store::{self, StoreError};

/// Why the hub could not run.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An OS-level failure (thread spawn, …).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The TLS certificate or key could not be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The MQTT bridge could not start (its configuration or TLS set-up).
    #[error(transparent)]
    Mqtt(#[from] MqttError),
}

/// How long `run` waits for the MQTT bridge to publish `offline` and
/// disconnect at shutdown (the bridge gives itself about 3 s; a broker
/// that does not answer leaves it to the last will).
const MQTT_SHUTDOWN: Duration = Duration::from_secs(4);

/// Opens one store handle and sets its energy limits (schema checks,
/// migration and a slot rebuild block: off the async workers). The first
/// handle a hub opens rebuilds the energy slots when they were built with
/// other limits (or never); `flag_counts` is given to the writer's handle.
async fn open_store(
    config: &Config,
    flag_counts: Option<Arc<FlagCounts>>,
) -> Result<Box<dyn store::Store>, HubError> {
    let url = config.database.clone();
    let pg = config.pg.clone();
    let limits = config.energy_limits;
    tokio::task::spawn_blocking(move || {
        let mut s = store::open_with(&url, &pg)?;
        s.prepare_energy(limits, flag_counts)?;
        Ok::<_, StoreError>(s)
    })
    .await
    .map_err(|e| HubError::Io(std::io::Error::other(e)))?
    .map_err(HubError::from)
}

/// Runs the hub on `listener` until `shutdown` completes, then shuts down
/// gracefully: stops accepting, closes sockets with 1001 (after sending the
/// acks of what each device already sent), flushes every queued reading to
/// the store and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HubError> {
    let tls = config
        .tls
        .as_ref()
        .map(http::tls_acceptor)
        .transpose()
        .map_err(HubError::Tls)?;
    let metrics = Arc::new(Metrics::new());
    let writer_store = open_store(&config, Some(metrics.reading_flags.clone())).await?;
    let auth_store = open_store(&config, None).await?;
    // Never waits on the broker: it connects in the background.
    let mqtt = config.mqtt_bridge().map(MqttBridge::spawn).transpose()?;

    let (queue_tx, queue_rx) = mpsc::channel(config.queue_capacity.max(1));
    metrics.queue_capacity.store(
        config.queue_capacity.max(1) as i64,
        std::sync::atomic::Ordering::Relaxed,
    );
    let (stop_writer, writer_stop) = watch::channel(false);
    let writer = Writer::spawn_with_metrics(
        writer_store,
        queue_rx,
        WriterConfig {
            batch_max_rows: config.batch_max_rows,
            batch_linger: config.batch_linger,
        },
        writer_stop,
        tokio::runtime::Handle::current(),
        metrics.clone(),
    )?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown_timeout = config.shutdown_timeout;
    let mqtt_handle = mqtt.as_ref().map(|(h, _)| h.clone());
    let shared = Shared::new(
        config,
        auth_store,
        queue_tx,
        shutdown_rx,
        tls,
        metrics,
        mqtt_handle,
    );
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    if let Ok(addr) = listener.local_addr() {
        log::info!("ems-hub listening on {addr}");
    }
    tokio::spawn(revocation::run(shared.clone()));
    http::accept_loop(listener, shared.clone(), ConnGuard::new(done_tx), shutdown).await;

    log::info!("shutting down: closing connections");
    let _ = shutdown_tx.send(true);
    drop(shared);
    if tokio::time::timeout(shutdown_timeout, done_rx.recv())
        .await
        .is_err()
    {
        log::warn!("some connections did not close within {shutdown_timeout:?}");
    }
    // Every device connection is closed: the bridge publishes the devices
    // and the hub offline while the writer flushes.
    if let Some((h, _)) = &mqtt {
        h.shutdown();
    }
    let _ = stop_writer.send(true);
    tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(|e| HubError::Io(std::io::Error::other(e)))?;
    if let Some((_, task)) = mqtt {
        if tokio::time::timeout(MQTT_SHUTDOWN, task).await.is_err() {
            log::warn!("the MQTT bridge did not stop within {MQTT_SHUTDOWN:?}");
        }
    }
    log::info!("store flushed; bye");
    Ok(())
}
