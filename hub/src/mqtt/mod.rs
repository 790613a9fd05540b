//! # MQTT bridge to Home Assistant
//!
//! Publishes every device and meter the hub hears from to an MQTT broker
//! the user already runs, in Home Assistant's MQTT discovery format, so
//! each meter appears in Home Assistant (and its Energy dashboard) by
//! itself. Off unless the hub is started with a broker URL.
//!
//! The hub talks to the bridge only through an [`MqttHandle`]: cheap,
//! cloneable, and never waiting — every call is a `try_send` into a bounded
//! queue; a full queue drops the call and counts it ([`MqttStats`]). The
//! bridge task coalesces (at most one state message per meter per
//! interval, the latest reading wins), never publishes backlog as the
//! current state, republishes everything retained after each reconnect,
//! removes a revoked device's discovery configs (also those an earlier hub
//! process left), and reconnects with back-off.
//!
//! ## Layout
//! - [`config`]: [`MqttConfig`], [`BrokerUrl`], [`Secret`] and their
//!   validation.
//! - [`discovery`]: pure builders of topics, discovery configs and state
//!   payloads (the Home Assistant field table lives here).
//! - `state`: the bridge's state machine, without I/O: what the broker
//!   should hold and what is still to publish.
//! - `bridge`: the tasks (the state machine's loop and the rumqttc event
//!   loop driver), [`MqttBridge`], [`MqttHandle`], [`MqttStats`].

mod bridge;
pub mod config;
pub mod discovery;
mod state;

use std::sync::atomic::{AtomicBool, AtomicU64};

pub use bridge::{MqttBridge, MqttError, MqttHandle, MqttStats};
pub use config::{BrokerUrl, MqttConfig, MqttConfigError, Secret};

/// The counters behind [`MqttStats`], shared by the handle and the tasks.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// The client is connected to the broker.
    connected: AtomicBool,
    /// PUBLISH packets written to the broker connection.
    published: AtomicU64,
    /// Hub calls refused: the bridge queue was full (or the bridge had
    /// stopped).
    dropped_queue_full: AtomicU64,
    /// State messages that were due but never reached the broker (it was
    /// slow, unreachable, or the connection dropped them).
    dropped_backlog: AtomicU64,
    /// Readings not taken as a state: not newer than the meter's newest,
    /// or backlog on arrival.
    backfill_ignored: AtomicU64,
    /// Readings of removed devices or of the reserved device id `hub`.
    ignored: AtomicU64,
    /// Successful connects after the first.
    reconnects: AtomicU64,
    /// Connection errors (failed connects and lost connections).
    errors: AtomicU64,
}
