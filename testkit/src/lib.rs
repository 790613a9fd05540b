//! # ems-testkit — what the workspace's tests share
//!
//! A dev-dependency only (never published, never in a release build).
//!
//! ## Layout
//! - [`require`]: the one place that turns a missing PostgreSQL, browser,
//!   Mosquitto or tmpfs into a loud SKIP, or a failure under
//!   `EMS_REQUIRE_*=1` (CI).
//! - [`pg`]: a private throwaway PostgreSQL cluster (or
//!   `EMS_TEST_DATABASE_URL`), a fresh database per test.
//! - [`hub`]: the hub in-process — [`hub::TestHub`] on the test's runtime
//!   on port 0, [`hub::BackgroundHub`] on its own runtime on a chosen port.
//! - [`ws`]: WebSocket clients (bearer or subprotocol auth), next frame
//!   with a deadline, wait for an ack, expect a close code.
//! - [`http`]: hand-written HTTP/1.1 requests and their responses.
//! - [`logs`]: the one logger of a test process; prints `EMS_TEST_LOG`
//!   levels and keeps lines a test wants to inspect.
//! - [`fixtures`]: the "soon" bound, `now_ms`, free ports, polling, a
//!   valid reading frame, what a SQLite hub stored.
//! - [`certs`]: a throwaway CA and server certificate (`openssl`) for
//!   the tests that run a TLS server.
//! - [`docs`], [`cli_docs`], [`serde_fields`]: reading the reference
//!   tables in `docs/`, comparing a clap command line with them, and the
//!   keys a config struct accepts — for the doc drift tests.

pub mod certs;
pub mod cli_docs;
pub mod docs;
pub mod fixtures;
pub mod http;
pub mod hub;
pub mod logs;
pub mod pg;
pub mod require;
pub mod serde_fields;
pub mod ws;

pub use fixtures::{free_port, now_ms, reading, wait_for, SOON};
pub use hub::{BackgroundHub, TestHub};
pub use require::{require_or_skip, Feature};
