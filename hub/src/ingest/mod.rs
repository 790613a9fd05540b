//! Ingest: a device's readings from its socket to the store.
//!
//! - `session`: one device connection — reads frames, forwards valid
//!   readings to the device's topic (hot path) and queues them for the
//!   store (cold path), writes the acks back.
//! - `socket`: the device's upgraded connection — reads messages through
//!   the [`wire`] decoder with no buffer while idle, writes the hub's
//!   frames within a deadline, closes.
//! - [`wire`]: WebSocket framing for device connections as pure code (the
//!   decoder and the server's frames).
//! - `state`: the session's decisions without I/O — the rate limit and
//!   the gatekeeper per frame, the abuse rule, the heartbeat, the acks
//!   owed at shutdown.
//! - [`writer`]: the background thread that commits queued readings in
//!   batches and only then acknowledges them, through each connection's
//!   [`crate::mailbox`].
//! - `heartbeat`: the one task that ticks every device connection's
//!   mailbox once per `ping_interval`, in rounds.
//! - `runs`: what the writer holds until a commit, per device, and which
//!   of it is due.
//!
//! A device that announces its ack window in the handshake
//! ([`ems_shared::ACK_WINDOW_HEADER`]) has its readings held for at most
//! [`hold_for`] of it (and never longer than the writer's linger), so a
//! 1 Hz device's readings share commits and acks.

use std::time::Duration;

pub(crate) mod heartbeat;
mod runs;
pub(crate) mod session;
pub(crate) mod socket;
pub(crate) mod state;
pub mod wire;
pub mod writer;

/// How long the writer may hold the readings of a device whose ack window
/// is `window`: half of it. The other half is the margin for what follows
/// the hold — the writer's commit cadence (0.1 s), the commit itself (a
/// slow card or a busy database) and the ack's way back — so the device's
/// ack arrives before it would write the reading to its own storage.
pub fn hold_for(window: Duration) -> Duration {
    window / 2
}
