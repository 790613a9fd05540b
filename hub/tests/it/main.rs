//! Integration tests: the real hub in-process on port 0 with a temporary
//! SQLite store, driven by real WebSocket clients; the MQTT bridge against
//! a private Mosquitto. One test binary, one module per area; [`harness`]
//! names what they share (from the `ems-testkit` crate). The store
//! contract (`tests/store_contract.rs`) is a binary of its own: one suite
//! run per backend.

mod admin_api;
mod admin_origin;
mod admin_tokens;
mod browser;
mod browser_fleet;
mod cli;
mod conn_limits;
mod dashboard;
mod edge_losses;
mod energy;
mod energy_rebuild;
mod fleet;
mod fleet_energy;
mod frames;
mod gate;
mod handshake;
mod hardening;
mod harness;
mod lifecycle;
mod mosquitto;
mod mqtt;
mod mqtt_hub;
mod notify;
mod pg_store;
mod probe;
mod quarantine;
mod secrets;
mod slow_peers;
mod tls;
mod wire;
