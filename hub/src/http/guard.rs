//! What a connection holds while it lives: its share of the connection
//! limits ([`Ticket`]) and of the "all connections finished" channel
//! ([`ConnGuard`]), which travel with the socket into a WebSocket session;
//! and the rules the limits share (which peers are trusted proxies, how
//! long a refused client should wait).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::metrics::Metrics;
use crate::quota::Slot;
use crate::state::Shared;

/// Seconds a client should wait before trying again after a refusal.
pub(crate) const RETRY_AFTER_S: u64 = 5;

/// Keeps the "all connections finished" channel open while alive
/// (mini-redis's shutdown-complete pattern), and the connection's share of
/// the limits while it (or the WebSocket session it became) lives.
#[derive(Clone)]
pub(crate) struct ConnGuard {
    _done: mpsc::Sender<()>,
    _ticket: Option<Arc<Ticket>>,
}

impl ConnGuard {
    pub(crate) fn new(tx: mpsc::Sender<()>) -> Self {
        ConnGuard {
            _done: tx,
            _ticket: None,
        }
    }

    pub(super) fn with(&self, ticket: Ticket) -> Self {
        ConnGuard {
            _done: self._done.clone(),
            _ticket: Some(Arc::new(ticket)),
        }
    }
}

/// A connection's slot of `max_connections` and of its address's
/// `max_connections_per_ip`.
pub(crate) struct Ticket {
    _permit: OwnedSemaphorePermit,
    _address: Option<Slot<IpAddr>>,
    metrics: Arc<Metrics>,
}

impl Ticket {
    pub(super) fn new(
        permit: OwnedSemaphorePermit,
        address: Option<Slot<IpAddr>>,
        m: &Arc<Metrics>,
    ) -> Self {
        m.hardening.connections.fetch_add(1, Ordering::Relaxed);
        Ticket {
            _permit: permit,
            _address: address,
            metrics: m.clone(),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.metrics
            .hardening
            .connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether `peer` is a proxy whose `X-Forwarded-For` names the client.
pub(crate) fn trusted_proxy(shared: &Shared, peer: &SocketAddr) -> bool {
    shared.config.trusted_proxies.contains(&peer.ip())
}
