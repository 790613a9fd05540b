//! Integration tests: the real hub in-process on port 0 with a temporary
//! SQLite store, driven by real WebSocket clients. One test binary, one
//! module per area.

mod admin_api;
mod browser;
mod cli;
mod dashboard;
mod energy;
mod frames;
mod handshake;
mod hardening;
mod harness;
mod lifecycle;
mod tls;
