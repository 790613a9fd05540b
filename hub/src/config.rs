//! Hub configuration: every knob of a running hub, already validated.
//! The binary validates its flags into a [`Config`] once, before anything
//! starts (`src/bin/ems-hub/cli.rs`); tests build one with [`Config::new`]
//! and shorten the intervals they care about.

use std::time::Duration;

/// Devices a whole-fleet pass (the device lists, the presence flush)
/// handles per hold of a map lock that every reading also takes. Between
/// holds the lock is free for ingest: at 10,000 devices one hold for the
/// whole fleet kept every device session waiting for milliseconds. Fixed,
/// not a setting.
pub(crate) const LOCK_CHUNK: usize = 128;

/// Configuration of [`crate::run`]. Its `Debug` output redacts the
/// database password.
#[derive(Clone)]
pub struct Config {
    /// Database URL: `sqlite:PATH` or `postgres://…`.
    pub database: String,
    /// Interval between heartbeat pings on every socket.
    pub ping_interval: Duration,
    /// Consecutive unanswered pings after which a connection is dead.
    pub max_missed_pongs: u32,
    /// Largest number of readings committed in one transaction.
    pub batch_max_rows: usize,
    /// With `batch_run` above 1, the longest the writer holds a device's
    /// reading before committing it (bounds the ack latency); below the
    /// writer's 100 ms commit cadence it also shortens the cadence.
    pub batch_linger: Duration,
    /// Readings of one device the writer commits together (a run, 1 to
    /// 64); more cost the store less per reading and delay acks longer.
    pub batch_run: usize,
    /// Readings queued for the writer; when full, device sockets are not
    /// read until it drains (backpressure instead of loss).
    pub queue_capacity: usize,
    /// Frames buffered per dashboard subscriber before it counts as slow
    /// and is dropped.
    pub subscriber_buffer: usize,
    /// A send to one socket that takes longer than this drops the socket.
    pub write_timeout: Duration,
    /// How long a graceful shutdown may take before the hub gives up on
    /// stragglers (sockets); the store is always flushed.
    pub shutdown_timeout: Duration,
    /// Limit on concurrent connections (HTTP and WebSocket).
    pub max_connections: usize,
    /// Timeout for a client to send its complete HTTP request head (and
    /// to finish the TLS handshake).
    pub handshake_timeout: Duration,
    /// Terminate TLS in the hub itself (instead of nginx).
    pub tls: Option<TlsFiles>,
    /// Per-device token bucket: rate, burst, and how long
    /// sustained excess may last before the hub closes with 1008.
    pub rate_limit: RateLimit,
    /// Takeover-loop rule: more than K replacements within T
    /// refuse the device id for a cool-down (close 4002).
    pub takeover: TakeoverPolicy,
    /// How often the hub polls the store for revoked or rotated device
    /// tokens of live connections; they close with 4001.
    pub revocation_poll: Duration,
    /// Browser origins, besides the hub's own, that may open dashboards
    /// and call the API (`--allowed-origin`, exact match).
    pub allowed_origins: Vec<String>,
    /// The hub's public URL (`--public-url`, e.g. `https://ems.example.com`):
    /// when set, its origin is the hub's own origin instead of the one
    /// derived from the `Host` header.
    pub public_url: Option<String>,
    /// A reading older than this when it arrives is backlog: dashboards get
    /// a `backfill` summary instead of the reading itself.
    pub backfill_after: Duration,
    /// At most one `backfill` summary per device per this interval (the
    /// device's session counts the backlog and publishes the summaries).
    pub backfill_interval: Duration,
    /// How often a dashboard socket re-checks its viewer token (revoked:
    /// closed with 4001).
    pub viewer_recheck: Duration,
    /// Resume seam: how long the writer queue must have been seen empty
    /// before a silent device's history is queried (more than one commit).
    pub resume_settle: Duration,
    /// Most readings one resume replays (the newest are kept).
    pub replay_limit: usize,
    /// PostgreSQL/TimescaleDB options (ignored for SQLite).
    pub pg: crate::store::postgres::PgOptions,
    /// The MQTT bridge to Home Assistant (`--mqtt-url` …); `None`: off.
    /// Its `public_url` and `backfill_after` are replaced by the hub's own
    /// ([`Config::public_url`], [`Config::backfill_after`]); see
    /// [`Config::mqtt_bridge`].
    pub mqtt: Option<crate::mqtt::MqttConfig>,
    // Quarantine.
    /// Per-device budget for storing refused frames in the quarantine.
    pub quarantine: QuarantineLimit,
    // Limits that cover every socket, authentication from memory, the
    // metrics listener and systemd notifications.
    /// Most live dashboards one viewer token may hold open; one more is
    /// refused with 429.
    pub max_dashboards_per_token: usize,
    /// Most connections from one client address (HTTP and WebSocket); one
    /// more is refused with 429. Behind a proxy the client address is the
    /// one a trusted proxy puts in `X-Forwarded-For`.
    pub max_connections_per_ip: usize,
    /// Proxies whose `X-Forwarded-For` names the client (`--trusted-proxy`);
    /// from any other peer the header is ignored.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// How long the tokens the hub holds in memory stay usable while the
    /// store cannot confirm them; after that, dashboards close with 4001
    /// and handshakes are refused with 503.
    pub auth_grace: Duration,
    /// Serve `/metrics` on this address instead of on the public listener
    /// (which then answers 404 for it).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Tell systemd about readiness, liveness and shutdown (`sd_notify`:
    /// READY=1, WATCHDOG=1, STOPPING=1); the binary turns it on.
    pub sd_notify: bool,
    /// The energy rule's limits (`--max-power-w`, `--max-gap-ms`): above
    /// the power limit an energy jump is a glitch, beyond the gap limit an
    /// interval does not count as coverage. The stored energy slots depend
    /// on them: the hub rebuilds them at start when they change.
    pub energy_limits: crate::energy::rule::Limits,
    /// Time zone of energy rollups that do not name one (`--timezone`).
    pub timezone: crate::energy::buckets::Zone,
    /// This hub's id in the shared device state (`device_state.hub`);
    /// `None`: `<hostname>:<listen port>`, chosen when the hub starts.
    pub hub_id: Option<String>,
    /// How long a device stays online for every hub after its hub last
    /// renewed its lease (a hub that dies stops renewing).
    pub presence_lease: Duration,
    /// How often a hub renews the leases of its devices.
    pub presence_renew: Duration,
    /// Least time between two writes of a connected device's state (last
    /// seen, status, last readings); a lease renewal writes the changed
    /// states too, so the default (the longest renewal interval) writes
    /// them with each renewal. Connects and disconnects are written at the
    /// next tick.
    pub presence_flush: Duration,
    /// How often the presence task runs: writes what is due and reads
    /// which devices connected elsewhere (cross-hub takeover).
    pub presence_tick: Duration,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("database", &crate::store::postgres::redact(&self.database))
            .field("ping_interval", &self.ping_interval)
            .field("max_missed_pongs", &self.max_missed_pongs)
            .field("batch_max_rows", &self.batch_max_rows)
            .field("batch_linger", &self.batch_linger)
            .field("batch_run", &self.batch_run)
            .field("queue_capacity", &self.queue_capacity)
            .field("tls", &self.tls)
            .field("pg", &self.pg)
            // Shows no password (`Secret`) and no URL credentials (refused).
            .field("mqtt", &self.mqtt)
            .field("energy_limits", &self.energy_limits)
            .field("timezone", &self.timezone.name())
            .finish_non_exhaustive()
    }
}

/// Rate-limit configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained frames per second per device.
    pub rate: f64,
    /// Bucket size: frames a device may send at once after a quiet period.
    pub burst: f64,
    /// Continuous excess for this long closes the connection with 1008.
    pub abuse_after: Duration,
}

impl Default for RateLimit {
    /// 1000 frames/s with a burst of 20 000: a 1 Hz edge with a 7-day
    /// backlog (~605 000 readings) drains in about 10 minutes; the ems-edge
    /// window (512 in flight) never comes near the burst in one go.
    fn default() -> Self {
        RateLimit {
            rate: 1000.0,
            burst: 20_000.0,
            abuse_after: Duration::from_secs(10),
        }
    }
}

/// When a device id counts as being in a takeover loop.
#[derive(Debug, Clone, Copy)]
pub struct TakeoverPolicy {
    /// Replacements allowed within `window` (K); one more is a loop.
    pub max_replacements: usize,
    /// The sliding window (T).
    pub window: Duration,
    /// How long a looping device id is refused.
    pub cooldown: Duration,
}

impl Default for TakeoverPolicy {
    fn default() -> Self {
        TakeoverPolicy {
            max_replacements: 5,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(300),
        }
    }
}

/// PEM files for the hub's own TLS termination.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: std::path::PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: std::path::PathBuf,
}

impl Config {
    /// Defaults for a hub on `database`.
    pub fn new(database: impl Into<String>) -> Self {
        Config {
            database: database.into(),
            ping_interval: Duration::from_secs(20),
            max_missed_pongs: 3,
            // Large enough that draining a backlog (a database pause, a
            // restart) takes few commits: acks are cumulative, so each commit
            // sends one ack per device, and 2,000-row batches made 30 rounds
            // of 2,000 acks out of a 60,000-reading backlog
            // (docs/decisions/hub-ack-after-commit.md).
            // Steady state is bound by `batch_linger`, not by this.
            batch_max_rows: 10_000,
            // The longest hold: half of `ems-edge`'s default ack window
            // (4 s), so a 1 Hz device's readings go to the store in runs of
            // two or three (one page write of each index and one ack for
            // all); an ack waits up to this long
            // (docs/decisions/ack-window.md).
            batch_linger: Duration::from_secs(2),
            // Prompt acks for clients that announce no ack window: they may
            // write or resend a reading unacked for a second
            // (docs/decisions/hub-ack-linger.md).
            batch_run: 1,
            queue_capacity: 100_000,
            // How far a subscriber may fall behind before it is dropped:
            // 4 min of a 1 Hz device, 1 s of a 250 Hz one. A topic holds only
            // the frames its slowest subscriber has not read (~40 bytes each),
            // not this many slots up front.
            subscriber_buffer: 256,
            write_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(9),
            max_connections: 50_000,
            handshake_timeout: Duration::from_secs(10),
            tls: None,
            rate_limit: RateLimit::default(),
            takeover: TakeoverPolicy::default(),
            revocation_poll: Duration::from_secs(1),
            allowed_origins: Vec::new(),
            public_url: None,
            backfill_after: Duration::from_secs(60),
            backfill_interval: Duration::from_secs(1),
            viewer_recheck: Duration::from_secs(2),
            resume_settle: Duration::from_millis(300),
            replay_limit: 20_000,
            pg: Default::default(),
            mqtt: None,
            quarantine: QuarantineLimit::default(),
            max_dashboards_per_token: 64,
            max_connections_per_ip: 256,
            trusted_proxies: Vec::new(),
            auth_grace: Duration::from_secs(30),
            metrics_listen: None,
            sd_notify: false,
            energy_limits: Default::default(),
            timezone: crate::energy::buckets::Zone::utc(),
            hub_id: None,
            presence_lease: Duration::from_secs(30),
            presence_renew: Duration::from_secs(10),
            presence_flush: Duration::from_secs(10),
            presence_tick: Duration::from_secs(1),
        }
    }

    /// The MQTT bridge's configuration as the hub runs it: [`Config::mqtt`]
    /// with the hub's public URL (the devices' link in Home Assistant) and
    /// backfill threshold (backlog is never a current state).
    pub fn mqtt_bridge(&self) -> Option<crate::mqtt::MqttConfig> {
        self.mqtt.clone().map(|mut m| {
            m.public_url = self.public_url.clone();
            m.backfill_after = self.backfill_after;
            m
        })
    }
}

/// How much of the quarantine one device may fill: a token bucket in
/// bytes, each refused frame costing its length plus 256 (the other
/// columns and the indexes). Within the budget a refused frame is stored
/// and then answered `rejected`; beyond it, a refused reading is answered
/// `rate_limited` (the edge keeps it and sends it again later, nothing is
/// lost) and a refused frame without epoch/seq is only counted
/// (`ems_quarantine_skipped_total`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuarantineLimit {
    /// Sustained bytes per second.
    pub bytes_per_s: f64,
    /// Bytes at once after a quiet period.
    pub burst_bytes: f64,
}

impl Default for QuarantineLimit {
    /// 4 KiB/s sustained, 1 MiB at once: a 1 Hz edge whose every reading
    /// is refused (~400 bytes each) is quarantined in full, ~2,500 refused
    /// readings of a backlog fit at once, and one device can add at most
    /// ~350 MB a day to the quarantine.
    fn default() -> Self {
        QuarantineLimit {
            bytes_per_s: 4096.0,
            burst_bytes: 1024.0 * 1024.0,
        }
    }
}

impl QuarantineLimit {
    /// The budget as a token bucket's limits (one token per byte).
    pub fn as_rate_limit(&self) -> RateLimit {
        RateLimit {
            rate: self.bytes_per_s,
            burst: self.burst_bytes,
            abuse_after: Duration::MAX,
        }
    }
}
