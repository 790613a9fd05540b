//! Ingest: a device's readings from its socket to the store.
//!
//! - [`session`]: one device connection — reads frames, runs them through
//!   the gatekeeper and the rate limit, forwards valid readings to the
//!   device's topic (hot path) and queues them for the store (cold path),
//!   writes the acks back.
//! - [`limits`]: the per-device token bucket and the abuse rule.
//! - [`writer`]: the background thread that commits queued readings in
//!   batches and only then acknowledges them, through each connection's
//!   [`acks`] mailbox.

pub mod acks;
pub mod limits;
pub(crate) mod session;
pub mod writer;
