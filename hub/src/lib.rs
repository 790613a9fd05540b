//! # ems-hub
//!
//! The hub of the EMS: devices stream readings over authenticated
//! WebSockets, the hub validates every frame, fans valid readings out to
//! dashboard subscribers (hot path) and writes every reading to the store in
//! batches (cold path), acknowledging each only once it is committed.
//!
//! ## Layout
//! - [`config`]: the validated configuration of a running hub.
//! - `server`: accept loop, HTTP routing, handshake checks, upgrade.
//! - [`handshake`]: pure handshake rules (path, bearer token, upgrade headers).
//! - [`metrics`]: Prometheus counters, gauges and histograms (`/metrics`,
//!   `/readyz`).
//! - [`limits`]: per-device token bucket and abuse rule.
//! - `revocation`: polls the store and closes connections whose token was
//!   revoked or rotated (4001).
//! - [`registry`]: the connection manager (one device, one connection) and
//!   the per-device live topics.
//! - `session`: one upgraded connection (device ingest or dashboard feed),
//!   heartbeat included.
//! - [`writer`]: the background store writer (batches, commit, then acks).
//! - [`store`]: the storage interface and its backends.
//! - [`token`]: token generation, format and hashing.
//! - `api`: the HTTP API (`/api/devices…` for viewers, `/api/admin/…`
//!   for admins; issue 6).
//! - `dashboard`: one dashboard subscriber: presence, resume replay,
//!   backfill summaries, live feed (issue 6).
//! - `web`: the embedded dashboard page and its assets, with a strict CSP.
//! - [`admin`]: the admin operations behind `ems-hub device …`/`viewer …`.
//! - [`watcher`]: `ems-hub watch`, a terminal dashboard subscriber.
//!
//! [`run`] is the whole server: the binary passes a listener and a shutdown
//! future (SIGTERM/SIGINT); tests pass a listener on port 0 and their own.

pub mod admin;
mod api;
pub mod config;
mod dashboard;
pub mod handshake;
pub mod limits;
pub mod metrics;
pub mod registry;
mod revocation;
mod server;
mod session;
mod shutdown;
mod state;
pub mod store;
pub mod token;
pub mod watcher;
mod web;
pub mod writer;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

pub use config::Config;
use server::ConnGuard;
use state::Shared;
use store::StoreError;
use writer::{Writer, WriterConfig};

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
}

/// Builds the TLS acceptor from PEM files (ring provider, TLS 1.2 and 1.3).
fn tls_acceptor(files: &config::TlsFiles) -> Result<tokio_rustls::TlsAcceptor, HubError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            HubError::Tls(format!(
                "cannot read certificate {}: {e}",
                files.cert.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(HubError::Tls(format!(
            "no certificate in {}",
            files.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        HubError::Tls(format!(
            "cannot read private key {}: {e}",
            files.key.display()
        ))
    })?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HubError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| HubError::Tls(format!("certificate/key rejected: {e}")))?;
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}

async fn open_store(config: &Config) -> Result<Box<dyn store::Store>, HubError> {
    let url = config.database.clone();
    let pg = config.pg.clone();
    tokio::task::spawn_blocking(move || store::open_with(&url, &pg))
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
    let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
    let writer_store = open_store(&config).await?;
    let auth_store = open_store(&config).await?;

    let (queue_tx, queue_rx) = mpsc::channel(config.queue_capacity.max(1));
    let metrics = Arc::new(metrics::Metrics::new());
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
    let shared = Shared::new(config, auth_store, queue_tx, shutdown_rx, tls, metrics);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    if let Ok(addr) = listener.local_addr() {
        log::info!("ems-hub listening on {addr}");
    }
    tokio::spawn(revocation::run(shared.clone()));
    server::accept_loop(listener, shared.clone(), ConnGuard::new(done_tx), shutdown).await;

    log::info!("shutting down: closing connections");
    let _ = shutdown_tx.send(true);
    drop(shared);
    if tokio::time::timeout(shutdown_timeout, done_rx.recv())
        .await
        .is_err()
    {
        log::warn!("some connections did not close within {shutdown_timeout:?}");
    }
    let _ = stop_writer.send(true);
    tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(|e| HubError::Io(std::io::Error::other(e)))?;
    log::info!("store flushed; bye");
    Ok(())
}
