//! Integration tests: the real hub in-process on port 0 with a temporary
//! SQLite store, driven by real WebSocket clients. One test binary, one
//! module per area.

mod admin_api;
mod admin_tokens;
mod browser;
mod cli;
mod conn_limits;
mod dashboard;
mod frames;
mod gate;
mod handshake;
mod hardening;
mod harness;
mod lifecycle;
mod notify;
#[path = "../common/pg.rs"]
mod pg;
mod pg_store;
mod probe;
mod secrets;
mod slow_peers;
mod tls;
