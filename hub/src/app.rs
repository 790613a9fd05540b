//! The wiring of a running hub: [`run`] opens the stores, starts the MQTT
//! bridge (when configured), the store writer and the revocation poll,
//! builds the shared state, runs the accept loop (and the metrics
//! listener, when it has its own address) and, once the shutdown future
//! completes, shuts everything down in order (sockets first, then the
//! writer, so every received reading is committed before `run` returns;
//! the MQTT bridge marks everything offline meanwhile).
//!
//! A database that cannot be reached when the hub starts is not an error:
//! the hub listens at once, answers `/readyz` with 503 and device
//! handshakes with 503 + `Retry-After`, and keeps trying; the first store
//! connection that opens brings it up (tokens loaded, writer started,
//! `READY=1` to systemd). An unusable URL, an unreadable file or a schema
//! newer than this hub are errors.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::auth::cache::AuthCache;
use crate::auth::revocation;
use crate::config::Config;
use crate::http::{self, ConnGuard};
use crate::ingest::writer::{Item, Writer, WriterConfig, WriterControl};
use crate::metrics::{FlagCounts, Metrics};
use crate::mqtt::{MqttBridge, MqttError};
use crate::state::{Opener, Shared, StoreHandle};
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

/// How long the start waits for the first store connection before it goes
/// on without one (it keeps trying in the background).
const FIRST_OPEN_WAIT: Duration = Duration::from_secs(2);

/// How often a writer without a store connection tries to open one.
const WRITER_OPEN_RETRY: Duration = Duration::from_secs(1);

/// Opens the store of `config` (migrating it) and sets its energy limits.
/// The writer's connection (`flag_counts` given) makes the slots agree
/// with them — rebuilding them when they were built with other limits, or
/// never; every other connection only checks them and answers
/// [`StoreError::Rebuilding`] until then, so nothing waits for a rebuild
/// but the writer. Blocking: run off the async workers.
fn opener(config: &Config, flag_counts: Option<Arc<FlagCounts>>) -> Opener {
    let (url, pg, limits) = (
        config.database.clone(),
        config.pg.clone(),
        config.energy_limits,
    );
    Box::new(move || {
        let mut s = store::open_with(&url, &pg)?;
        match &flag_counts {
            Some(counts) => {
                s.prepare_energy(limits, Some(counts.clone()))?;
            }
            None => s.defer_energy(limits, None),
        }
        Ok(s)
    })
}

/// Opens the store of `config` (migrating it) without the energy
/// preparation: the part of [`opener`] that tells whether the database
/// answers.
fn connector(config: &Config) -> Opener {
    let (url, pg) = (config.database.clone(), config.pg.clone());
    Box::new(move || store::open_with(&url, &pg))
}

/// Runs `open` on the blocking pool.
async fn open_blocking(open: Arc<Mutex<Opener>>) -> Result<Box<dyn store::Store>, StoreError> {
    tokio::task::spawn_blocking(move || {
        let open = open.lock().unwrap_or_else(|p| p.into_inner());
        open()
    })
    .await
    .map_err(|e| StoreError::Db(format!("opening the store: {e}")))?
}

/// The first store connection (the writer's): `Some` when open, `None`
/// when the database cannot be reached yet (it is tried again later), an
/// error when it never will be. Only reaching the database is bounded by
/// [`FIRST_OPEN_WAIT`]. The energy slots are made to agree with the limits
/// here when that is quick (they already do, or there are no readings);
/// a real rebuild is left to the writer's task ([`start_writer`]), while
/// the hub already serves. The flag says whether the slots are ready.
async fn first_open(
    config: &Config,
    flag_counts: Arc<FlagCounts>,
) -> Result<Option<(Box<dyn store::Store>, bool)>, HubError> {
    let open = Arc::new(Mutex::new(connector(config)));
    match tokio::time::timeout(FIRST_OPEN_WAIT, open_blocking(open)).await {
        Ok(Ok(mut store)) => {
            let limits = config.energy_limits;
            let store = tokio::task::spawn_blocking(move || {
                let quick = store.energy_prepare_is_quick(&limits)?;
                if quick {
                    store.prepare_energy(limits, Some(flag_counts))?;
                }
                Ok::<_, StoreError>((store, quick))
            })
            .await
            .map_err(|e| HubError::Io(std::io::Error::other(e)))??;
            Ok(Some(store))
        }
        Ok(Err(e @ StoreError::Unreachable { .. })) => {
            log::error!("{e}; starting without it, not ready until it answers");
            Ok(None)
        }
        Ok(Err(e)) => Err(e.into()),
        Err(_) => {
            log::error!(
                "the database did not answer within {FIRST_OPEN_WAIT:?}; starting without it, \
                 not ready until it answers"
            );
            Ok(None)
        }
    }
}

/// A store handle: opened now (off the async workers) when the database
/// answered at start, else opened on first use once it does.
async fn handle(config: &Config, up: bool) -> Result<StoreHandle, HubError> {
    if up {
        let open = Arc::new(Mutex::new(opener(config, None)));
        Ok(StoreHandle::new(open_blocking(open).await?))
    } else {
        Ok(StoreHandle::opening(
            opener(config, None),
            "the database has not answered yet".into(),
        ))
    }
}

/// The store writer, once it has a store connection.
type WriterSlot = Arc<Mutex<Option<Writer>>>;

/// Starts the writer on `store` when its energy slots are ready (the
/// flag); else a task that, on `store` (or — without one — on a connection
/// it opens, retrying), makes the slots agree with the limits on the
/// blocking pool and then starts the writer. A rebuild may take minutes:
/// readings wait in the queue meanwhile (acknowledged once written), and
/// nothing else waits. Without a store connection the writer counts as
/// failing.
fn start_writer(
    config: &Config,
    store: Option<(Box<dyn store::Store>, bool)>,
    queue: mpsc::Receiver<Item>,
    stop: watch::Receiver<bool>,
    (metrics, control): (Arc<Metrics>, Arc<WriterControl>),
) -> Result<WriterSlot, HubError> {
    let slot: WriterSlot = Arc::new(Mutex::new(None));
    let cfg = WriterConfig {
        batch_max_rows: config.batch_max_rows,
        batch_linger: config.batch_linger,
        batch_run: config.batch_run,
    };
    let spawn = move |store: Box<dyn store::Store>,
                      queue,
                      stop,
                      metrics: Arc<Metrics>|
          -> std::io::Result<Writer> {
        metrics.store_writer_ok.store(1, Ordering::Relaxed);
        Writer::spawn_with_metrics(
            store,
            queue,
            cfg,
            stop,
            tokio::runtime::Handle::current(),
            (metrics, control.clone()),
        )
    };
    let store = match store {
        Some((store, true)) => {
            let w = spawn(store, queue, stop, metrics)?;
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
            return Ok(slot);
        }
        Some((store, false)) => Some(store),
        None => {
            metrics.store_writer_ok.store(0, Ordering::Relaxed);
            None
        }
    };
    let (limits, flags) = (config.energy_limits, metrics.reading_flags.clone());
    let open = Arc::new(Mutex::new(opener(config, Some(flags.clone()))));
    let slot2 = slot.clone();
    tokio::spawn(async move {
        let mut stopping = stop.clone();
        let mut first = store;
        loop {
            let ready = match first.take() {
                Some(mut store) => {
                    let flags = flags.clone();
                    let prepared = tokio::task::spawn_blocking(move || {
                        store.prepare_energy(limits, Some(flags))?;
                        Ok(store)
                    })
                    .await
                    .unwrap_or_else(|e| Err(StoreError::Db(format!("preparing the store: {e}"))));
                    if let Err(e) = &prepared {
                        log::error!("energy slots: {e}; trying again");
                    }
                    prepared
                }
                None => open_blocking(open.clone()).await,
            };
            match ready {
                Ok(store) => {
                    match spawn(store, queue, stop, metrics) {
                        Ok(w) => *slot2.lock().unwrap_or_else(|p| p.into_inner()) = Some(w),
                        Err(e) => log::error!("cannot start the store writer: {e}"),
                    }
                    return;
                }
                Err(e) => {
                    log::debug!("store writer: {e}");
                    metrics.store_writer_ok.store(0, Ordering::Relaxed);
                }
            }
            tokio::select! {
                _ = crate::shutdown::shutting_down(&mut stopping) => return,
                _ = tokio::time::sleep(WRITER_OPEN_RETRY) => {}
            }
        }
    });
    Ok(slot)
}

/// Runs the hub on `listener` until `shutdown` completes, then shuts down
/// gracefully: stops accepting, closes sockets with 1001 (after sending the
/// acks of what each device already sent), flushes every queued reading to
/// the store and returns.
pub async fn run(
    listener: TcpListener,
    mut config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HubError> {
    let tls = config
        .tls
        .as_ref()
        .map(http::tls_acceptor)
        .transpose()
        .map_err(HubError::Tls)?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
            HubError::Io(std::io::Error::new(
                e.kind(),
                format!("cannot listen on {addr} for metrics: {e}"),
            ))
        })?),
        None => None,
    };
    if config.hub_id.is_none() {
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        config.hub_id = Some(crate::presence::default_hub_id(port));
    }
    // Four connections: the writer's, the tokens' (the revocation poll
    // alone uses it, so authentication never waits behind other store
    // work), the one everything else shares, and the presence task's.
    let metrics = Arc::new(Metrics::new());
    let writer_store = first_open(&config, metrics.reading_flags.clone()).await?;
    let up = writer_store.is_some();
    let auth_store = handle(&config, up).await?;
    let shared_store = handle(&config, up).await?;
    // The presence task's own connection (a flush of many devices does not
    // hold up the API), opened by its first write.
    let presence_store = StoreHandle::lazy({
        let open = connector(&config);
        Box::new(move || {
            let mut s = open()?;
            s.presence_only()?;
            Ok(s)
        })
    });
    // Never waits on the broker: it connects in the background.
    let mqtt = config.mqtt_bridge().map(MqttBridge::spawn).transpose()?;

    let (queue_tx, queue_rx) = mpsc::channel(config.queue_capacity.max(1));
    metrics
        .queue_capacity
        .store(config.queue_capacity.max(1) as i64, Ordering::Relaxed);
    let (stop_writer, writer_stop) = watch::channel(false);
    let writer_control = Arc::new(WriterControl::default());
    let writer = start_writer(
        &config,
        writer_store,
        queue_rx,
        writer_stop,
        (metrics.clone(), writer_control.clone()),
    )?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown_timeout = config.shutdown_timeout;
    let mqtt_handle = mqtt.as_ref().map(|(h, _)| h.clone());
    let auth = AuthCache::new(auth_store, config.auth_grace);
    let shared = Shared::new(
        config,
        shared_store,
        (queue_tx, writer_control.clone()),
        shutdown_rx,
        tls,
        metrics.clone(),
        mqtt_handle,
        auth,
    );
    // The tokens before the first request (the poll keeps them current).
    if up {
        if let Err(e) = shared.auth.read().await {
            log::error!("cannot load the tokens: {e}");
            metrics.store_poll_ok.store(0, Ordering::Relaxed);
        }
    } else {
        metrics.store_poll_ok.store(0, Ordering::Relaxed);
    }
    let presence = shared.presence.clone();
    let lease = shared.config.presence_lease;
    if let Some(id) = &shared.config.hub_id {
        log::info!("hub id {id} (shared device state)");
    }
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    if let Ok(addr) = listener.local_addr() {
        log::info!("ems-hub listening on {addr}");
    }
    if let Some(l) = metrics_listener {
        if let Ok(addr) = l.local_addr() {
            log::info!("metrics on http://{addr}/metrics");
        }
        tokio::spawn(http::serve_metrics(l, shared.clone()));
    }
    tokio::spawn(revocation::run(shared.clone()));
    tokio::spawn(crate::presence::task::run(
        shared.clone(),
        presence_store.clone(),
    ));
    tokio::spawn(crate::notify::run(shared.clone()));
    tokio::spawn(crate::ingest::heartbeat::run(shared.clone()));
    http::accept_loop(listener, shared.clone(), ConnGuard::new(done_tx), shutdown).await;

    crate::notify::stopping(&shared);
    log::info!("shutting down: closing connections");
    // The sessions wait for the acks of their last readings: no lingering.
    writer_control.hurry();
    let _ = shutdown_tx.send(true);
    // Device sessions hear it through their mailboxes.
    shared.registry.shut_down();
    drop(shared);
    if tokio::time::timeout(shutdown_timeout, done_rx.recv())
        .await
        .is_err()
    {
        log::warn!("some connections did not close within {shutdown_timeout:?}");
    }
    // Every device connection is closed: every other hub sees its devices
    // offline at once rather than when their leases end.
    crate::presence::task::shutdown(&presence, &presence_store, lease).await;
    // The bridge publishes the devices and the hub offline while the
    // writer flushes.
    if let Some((h, _)) = &mqtt {
        h.shutdown();
    }
    let _ = stop_writer.send(true);
    let writer = writer.lock().unwrap_or_else(|p| p.into_inner()).take();
    let flushed = match writer {
        Some(writer) => {
            tokio::task::spawn_blocking(move || writer.join())
                .await
                .map_err(|e| HubError::Io(std::io::Error::other(e)))?;
            true
        }
        None => false,
    };
    if let Some((_, task)) = mqtt {
        if tokio::time::timeout(MQTT_SHUTDOWN, task).await.is_err() {
            log::warn!("the MQTT bridge did not stop within {MQTT_SHUTDOWN:?}");
        }
    }
    if flushed {
        log::info!("store flushed; bye");
    } else {
        log::warn!(
            "the store writer never started (the store did not answer, or the energy slots \
             were still being rebuilt); nothing was acknowledged, so nothing is lost"
        );
    }
    Ok(())
}
