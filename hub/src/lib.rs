//! # ems-hub
//!
//! The hub of the EMS: devices stream readings over authenticated
//! WebSockets, the hub validates every frame, fans valid readings out to
//! dashboard subscribers (hot path) and writes every reading to the store in
//! batches (cold path), acknowledging each only once it is committed.
//!
//! ## Layout
//! In the order a reading passes through them:
//! - [`app`]: the wiring — [`run`] opens the stores, starts the writer and
//!   the revocation poll, runs the accept loop, shuts down in order.
//! - `http`: the accept loop, the routing of every request, the WebSocket
//!   handshake and upgrade, the JSON API, the embedded dashboard page and
//!   the probes (`/healthz`, `/readyz`, `/metrics`).
//! - [`auth`]: the handshake rules as pure functions, the token format and
//!   hash, and the revocation poll.
//! - [`ingest`]: the device session (gatekeeper, rate limit, hot and cold
//!   path, acks, heartbeat) and the store writer.
//! - [`fanout`]: the connection registry and the per-device topics, and the
//!   dashboard session (live feed, backfill summaries, resume replay).
//! - `presence`: this hub's part in the device state every hub shares
//!   (presence under a lease, last status and readings) and the
//!   cross-hub takeover.
//! - [`store`]: narrow store interfaces by concern and the SQLite and
//!   PostgreSQL backends.
//! - [`energy`]: counter-aware energy rollups in local time (pure code the
//!   store and the API call into), plausibility flags, export encoders.
//! - [`mqtt`]: the bridge that publishes devices and readings to an MQTT
//!   broker with Home Assistant discovery.
//!
//! Shared by the stages:
//! - `state`: the state every connection shares, and the one handle through
//!   which async code runs blocking store calls.
//! - [`mailbox`]: what the rest of the hub tells one device connection
//!   (the writer's answers, kicks, the shutdown, heartbeat ticks).
//! - [`limits`]: the per-device token bucket, the abuse rule and the
//!   rate limit of warnings (kept per device by the registry).
//! - `ws`: the dashboards' WebSocket (socket settings, close, heartbeat,
//!   timed sends) and how any session ends; device connections frame
//!   their own (`ingest::socket`, [`ingest::wire`]).
//! - `shutdown`: the shutdown flag every task waits on.
//! - `quota`: connection slots per client address, dashboards and heavy
//!   queries per viewer token.
//! - `log_text`: device-controlled text made safe for a log line.
//! - `notify`: readiness, watchdog and shutdown notifications to systemd.
//! - [`config`]: the validated configuration of a running hub.
//! - [`metrics`]: Prometheus counters, gauges and histograms.
//!
//! Beside the server:
//! - [`admin`]: the admin operations behind `ems-hub device …`/`viewer …`.
//! - [`watcher`]: `ems-hub watch`, a terminal dashboard subscriber.
//!
//! [`run`] is the whole server: the binary (`src/bin/ems-hub/`) passes a
//! listener and a shutdown future (SIGTERM/SIGINT); tests pass a listener
//! on port 0 and their own.

pub mod admin;
pub mod app;
pub mod auth;
pub mod config;
pub mod energy;
pub mod fanout;
mod http;
pub mod ingest;
pub mod limits;
mod log_text;
pub mod mailbox;
pub mod metrics;
pub mod mqtt;
mod notify;
mod presence;
mod quota;
mod shutdown;
mod state;
pub mod store;
pub mod watcher;
mod ws;

pub use app::{run, HubError};
pub use config::Config;
