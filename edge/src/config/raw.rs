//! The config file as written: [`RawConfig`] mirrors it table by table.
//! Every table is `deny_unknown_fields`, so a typo is an error that names
//! the key and its line; defaults live here. Nothing outside
//! [`config`](super) sees these types' values unvalidated.

use std::path::PathBuf;

use serde::Deserialize;

use crate::meters::MeterConfig;

/// Default spool directory.
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/ems-edge";
/// Default spool bound: 256 MiB, about 11 days of one meter at 1 Hz
/// (a spooled reading is ~240 bytes), comfortably over a week of outage.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Device id, the source of truth for identity.
    pub device_id: String,
    /// `wss://host[:port]` (or `ws://` with `allow_insecure`).
    pub hub_url: String,
    /// Permit `ws://`.
    #[serde(default)]
    pub allow_insecure: bool,
    /// Sample period.
    #[serde(default = "default_sample_interval_ms")]
    pub sample_interval_ms: u64,
    /// Extra PEM trust roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Spool directory.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: PathBuf,
    /// Spool bound in bytes.
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: u64,
    /// How often buffered readings are written and fsynced.
    #[serde(default = "default_spool_sync_ms")]
    pub spool_sync_interval_ms: u64,
    /// How long a reading on the wire of a live connection may wait for
    /// its ack before it is written (announced to the hub).
    #[serde(default = "default_ack_window_ms")]
    pub ack_window_ms: u64,
    /// How far ahead of an energy counter its saved ceiling runs, in
    /// seconds at the recent power (energy a crash may add; SD writes).
    #[serde(default = "default_energy_headroom_s")]
    pub energy_headroom_s: u64,
    /// The system clock is right from boot (RTC): do not wait for time sync.
    #[serde(default)]
    pub trust_clock: bool,
    /// Only this file's existence means "synchronized" (instead of the
    /// timesyncd flag file or the kernel NTP status); for tests and exotic
    /// time daemons.
    #[serde(default)]
    pub clock_sync_file: Option<PathBuf>,
    /// Link tuning (rarely needed; tests shorten it).
    #[serde(default)]
    pub link: RawLink,
    /// The meters.
    #[serde(default, rename = "meter")]
    pub meters: Vec<MeterConfig>,
}

/// `[link]`: tuning of the stream client. Defaults suit production.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLink {
    /// First backoff ceiling.
    pub backoff_base_ms: u64,
    /// Backoff cap (also the delay class after 401/403/4000).
    pub backoff_cap_ms: u64,
    /// A connection that stayed up this long resets the backoff.
    pub stable_after_ms: u64,
    /// TCP connect + TLS + WebSocket handshake timeout.
    pub connect_timeout_ms: u64,
    /// No longer used (the stream loop waits in `poll(2)`, no timeout);
    /// accepted so that older config files still load.
    pub poll_ms: Option<u64>,
    /// The edge pings the hub after this much silence.
    pub ping_after_ms: u64,
    /// The link is declared dead after this much silence from the hub.
    pub dead_after_ms: u64,
    /// Most readings sent and not yet acknowledged.
    pub max_in_flight: usize,
    /// Ceiling of the send rate, readings per second (stays under the
    /// hub's per-device rate limit while a backlog drains).
    pub max_send_rate: f64,
    /// How often a `status` frame (outbox depth and age) is sent.
    pub status_every_ms: u64,
}

impl Default for RawLink {
    fn default() -> Self {
        RawLink {
            backoff_base_ms: 1_000,
            backoff_cap_ms: 60_000,
            stable_after_ms: 30_000,
            connect_timeout_ms: 10_000,
            poll_ms: None,
            ping_after_ms: 30_000,
            dead_after_ms: 75_000,
            max_in_flight: 512,
            max_send_rate: 800.0,
            status_every_ms: 10_000,
        }
    }
}

fn default_sample_interval_ms() -> u64 {
    1000
}
fn default_spool_dir() -> PathBuf {
    PathBuf::from(DEFAULT_SPOOL_DIR)
}
fn default_spool_max_bytes() -> u64 {
    DEFAULT_SPOOL_MAX_BYTES
}
fn default_spool_sync_ms() -> u64 {
    1000
}
fn default_ack_window_ms() -> u64 {
    4000
}
fn default_energy_headroom_s() -> u64 {
    crate::ceiling::DEFAULT_HEADROOM.as_secs()
}
