//! # ems-edge — the EMS edge client
//!
//! Reads energy meters on a Raspberry Pi and streams the readings to the hub
//! over an authenticated WebSocket, losing none across network outages,
//! hub restarts, SIGTERM and SIGKILL.
//!
//! ## Layout
//!
//! In the order a reading travels, from the meter to the hub:
//!
//! - [`meters`]: the [`Meter`](meters::Meter) trait, the
//!   [`Measurement`](meters::Measurement) it yields (and its conversion to
//!   and from a wire reading), one driver per chip, generic over
//!   embedded-hal.
//! - [`platform`]: the Raspberry Pi's buses (rppal, the only user of it) and
//!   [`platform::open`], which builds the meter a config table describes.
//! - [`sampler`]: the sampling thread; drift-free schedule, never waits on
//!   the network.
//! - [`clock`]: whether the wall clock can be trusted; the gate that holds
//!   readings until it can and then stamps them; the epoch.
//! - [`outbox`]: what is done and what to send next (pure state, ack
//!   handling) and the [`SharedOutbox`](outbox::SharedOutbox) the sampler
//!   appends to and the link sends from.
//! - [`ceiling`]: the saved upper bound on each meter's `energy_wh` that
//!   lets a reading leave the moment it is taken while energy counters
//!   never go backwards across a crash; its slot files.
//! - [`spool`]: the outbox's on-disk segment files (batched appends, bounded
//!   fsync interval, only what the hub has not acknowledged, size bound, a
//!   bounded memory queue while the card is full); its record formats
//!   ([`spool::record`], checksummed) and its reader that gets past damage
//!   ([`spool::cursor`]).
//! - [`link`]: the blocking tungstenite/rustls client and its
//!   RETRYING/CONNECTED loop, event-driven: it sleeps in `poll(2)` on the
//!   socket and the [`wake`] descriptor the outbox's users signal.
//! - [`backoff`]: full-jitter reconnect backoff and send pacing, pure.
//!
//! Around the path:
//!
//! - [`supervisor`]: [`run`]: starts the threads, then syncs the spool and
//!   the ceilings on a fixed cadence (or at once when a reading waits for
//!   a ceiling), feeds the systemd watchdog and status line, and stops
//!   everything within 5 s of the signal.
//! - [`health`]: what the threads report to the supervisor.
//! - [`state_dir`]: every file name in the state directory, its lock and
//!   the claim by one device id.
//! - [`config`]: the TOML file, validated once; the device token (never
//!   printed).
//! - [`notify`]: systemd READY/WATCHDOG/STATUS/STOPPING.
//! - [`shutdown`]: the stop signal shared by the threads.
//!
//! The `ems-edge` binary (`src/bin/ems-edge/`) holds the command line and
//! the installer's bench tools (`check`, `probe`, `scan`).

#![warn(missing_docs)]

pub mod backoff;
pub mod ceiling;
pub mod clock;
pub mod config;
pub mod health;
pub mod link;
pub mod meters;
pub mod notify;
pub mod outbox;
pub mod platform;
pub mod sampler;
pub mod shutdown;
pub mod spool;
pub mod state_dir;
pub mod supervisor;
pub mod wake;

pub use config::{Config, ConfigError, DeviceToken};
pub use shutdown::Shutdown;
pub use supervisor::{run, EdgeError};
