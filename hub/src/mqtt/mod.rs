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
//!   loop driver), [`MqttBridge`], [`MqttHandle`].
//! - `connect`: the rumqttc options (client id, credentials, last will)
//!   and TLS; [`MqttError`].
//! - `stats`: the shared counters and [`MqttStats`] for `/metrics`.

mod bridge;
pub mod config;
mod connect;
pub mod discovery;
mod state;
mod stats;

pub use bridge::{MqttBridge, MqttHandle};
pub use config::{BrokerUrl, MqttConfig, MqttConfigError, Secret};
pub use connect::MqttError;
pub use stats::MqttStats;
