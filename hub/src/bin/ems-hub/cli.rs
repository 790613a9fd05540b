//! The command line as clap sees it (every command, flag, environment
//! variable and default), and its validation into what `serve` runs
//! ([`Serve::from_args`]), done once before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ems_hub::config::{RateLimit, TakeoverPolicy, TlsFiles};
use ems_hub::energy::buckets::Zone;
use ems_hub::energy::rule::Limits;
use ems_hub::mqtt::{BrokerUrl, MqttConfig, MqttConfigError, Secret};
use ems_hub::store::postgres::TimescaleMode;
use ems_hub::Config;

/// EMS hub: authenticated WebSocket ingest of meter readings, live fan-out
/// to dashboards, durable storage.
#[derive(Parser)]
#[command(name = "ems-hub", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// Database URL: sqlite:PATH (embedded, default) or postgres://…
    // The value may hold a password: `--help` never shows it.
    #[arg(
        long,
        env = "EMS_DATABASE_URL",
        default_value = "sqlite:ems-hub.db",
        global = true,
        hide_env_values = true
    )]
    pub database: String,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "EMS_LOG_LEVEL", global = true)]
    pub log_level: Option<log::LevelFilter>,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

// Parsed once at start: the size of the `serve` flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Command {
    /// Run the hub (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Manage devices and their tokens.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Manage viewer tokens for dashboards.
    #[command(subcommand)]
    Viewer(ViewerCmd),
    /// Manage admin tokens for the admin panel and /api/admin/.
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Show what the hub refused and kept in quarantine.
    #[command(subcommand)]
    Quarantine(QuarantineCmd),
    /// Write a device's stored readings to stdout as CSV or JSON Lines
    /// (with each reading's plausibility flags).
    Export(ExportArgs),
    /// Print a device's live readings (a terminal dashboard). The viewer
    /// token comes from EMS_VIEWER_TOKEN, never from the command line.
    Watch {
        /// Device to watch.
        device_id: String,
        /// Hub to connect to.
        #[arg(long, env = "EMS_HUB_URL", default_value = "ws://127.0.0.1:8080")]
        hub: String,
    },
}

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "EMS_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Interval between heartbeat pings, in milliseconds.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(10..))]
    ping_interval_ms: u64,
    /// Unanswered pings after which a connection is declared dead.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    max_missed_pongs: u32,
    /// Terminate TLS in the hub: certificate chain (PEM). Needs --tls-key.
    #[arg(long, env = "EMS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Terminate TLS in the hub: private key (PEM). Needs --tls-cert.
    #[arg(long, env = "EMS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A browser origin, besides the hub's own, allowed to open dashboards
    /// and call the API (exact match, e.g. https://grafana.example.com;
    /// repeatable).
    #[arg(
        long = "allowed-origin",
        env = "EMS_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    allowed_origins: Vec<String>,
    /// The hub's public URL as browsers see it (e.g.
    /// https://ems.example.com); pins the hub's own origin instead of
    /// deriving it from the Host header.
    #[arg(long, env = "EMS_PUBLIC_URL")]
    public_url: Option<String>,
    /// Readings older than this many seconds on arrival are backlog:
    /// dashboards get a "backfill" summary instead of each reading.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    backfill_after_s: u64,
    /// Per-device rate limit: sustained frames per second (token bucket).
    #[arg(long, env = "EMS_RATE_LIMIT", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    rate_limit: u32,
    /// Per-device rate limit: bucket size (frames at once after a pause).
    #[arg(long, env = "EMS_RATE_BURST", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    rate_burst: u32,
    /// Seconds of continuous rate-limit excess that close a device with 1008.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    rate_abuse_after_s: u64,
    /// Takeover loop: more than this many replacements of one device id …
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    takeover_max: u32,
    /// … within this many seconds …
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    takeover_window_s: u64,
    /// … refuse the id (close 4002) for this many seconds.
    #[arg(long, default_value_t = 300)]
    takeover_cooldown_s: u64,
    /// How often to poll the store for revoked/rotated tokens of live
    /// device connections (they close with 4001), in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    revocation_poll_ms: u64,
    /// PostgreSQL only: use TimescaleDB (auto: when available; off: plain
    /// table; require: fail unless `readings` can be a hypertable).
    #[arg(long, env = "EMS_TIMESCALE", default_value = "auto", value_enum)]
    timescale: Timescale,
    /// TimescaleDB only: drop readings older than this many days.
    #[arg(long, env = "EMS_RETENTION_DAYS", value_parser = clap::value_parser!(u32).range(1..))]
    retention_days: Option<u32>,
    /// TimescaleDB only: compress chunks older than this many days.
    #[arg(long, env = "EMS_COMPRESS_AFTER_DAYS", value_parser = clap::value_parser!(u32).range(1..))]
    compress_after_days: Option<u32>,
    /// Most readings committed in one transaction (a backlog drains in few
    /// commits, each acking every device once).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    batch_max_rows: u64,
    /// Longest a reading is held before its commit, in milliseconds: the
    /// bound on ack latency. A device that announced an ack window is held
    /// for half of it, at most this long; any other until it has
    /// `--batch-run` readings waiting, or this long.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    batch_linger_ms: u64,
    /// Readings of one device committed together (1 … 16): more cost the
    /// store less per reading and delay acks longer (at 1 Hz, by about
    /// one second each; see docs/hub/configuration.md before raising it
    /// for ems-edge devices).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    batch_run: u64,

    // The MQTT bridge to Home Assistant. The password has no flag: it comes
    // from EMS_MQTT_PASSWORD (read in `Serve::from_args`, so `--help` can
    // never show it) or from --mqtt-password-file.
    /// MQTT broker to publish to with Home Assistant discovery:
    /// mqtt://HOST[:PORT] or mqtts://HOST[:PORT]; off when absent. Never
    /// put credentials in it: --mqtt-username, and EMS_MQTT_PASSWORD or
    /// --mqtt-password-file.
    #[arg(long, env = "EMS_MQTT_URL", hide_env_values = true)]
    mqtt_url: Option<String>,
    /// PEM file with the CA certificate(s) of an mqtts:// broker (default:
    /// the public web PKI roots).
    #[arg(long, env = "EMS_MQTT_CA_FILE", requires = "mqtt_url")]
    mqtt_ca_file: Option<PathBuf>,
    /// MQTT user name.
    #[arg(long, env = "EMS_MQTT_USERNAME", requires = "mqtt_url")]
    mqtt_username: Option<String>,
    /// File holding the MQTT password (one trailing newline is ignored);
    /// or set EMS_MQTT_PASSWORD instead, not both.
    #[arg(long, env = "EMS_MQTT_PASSWORD_FILE", requires = "mqtt_url")]
    mqtt_password_file: Option<PathBuf>,
    /// Home Assistant's MQTT discovery prefix.
    #[arg(
        long,
        env = "EMS_MQTT_DISCOVERY_PREFIX",
        default_value = "homeassistant"
    )]
    mqtt_discovery_prefix: String,
    /// Prefix of the MQTT state and availability topics (give each hub on
    /// a shared broker its own).
    #[arg(long, env = "EMS_MQTT_TOPIC_PREFIX", default_value = "ems")]
    mqtt_topic_prefix: String,
    /// At most one MQTT state message per meter per this many
    /// milliseconds (the latest reading wins).
    #[arg(long, env = "EMS_MQTT_INTERVAL_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..))]
    mqtt_interval_ms: u64,
    // Connection limits, authentication from memory, metrics listener.
    /// Most connections at once (HTTP and WebSocket, upgraded sockets
    /// included); more are answered 503 with Retry-After.
    #[arg(long, env = "EMS_MAX_CONNECTIONS", default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: u64,
    /// Most connections from one client address; more are answered 429.
    /// Behind a proxy, list it with --trusted-proxy.
    #[arg(long, env = "EMS_MAX_CONNECTIONS_PER_IP", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections_per_ip: u64,
    /// Most dashboards one viewer token may hold open; more are answered 429.
    #[arg(long, env = "EMS_MAX_DASHBOARDS_PER_TOKEN", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_dashboards_per_token: u64,
    /// A proxy (IP address) whose X-Forwarded-For names the client
    /// (repeatable; e.g. 127.0.0.1 for nginx on the same host). Its own
    /// connections are not limited per address; its clients are.
    #[arg(
        long = "trusted-proxy",
        env = "EMS_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    trusted_proxies: Vec<String>,
    /// Seconds the tokens in memory stay usable while the store cannot
    /// confirm them; then dashboards close (4001) and handshakes get 503.
    #[arg(long, env = "EMS_AUTH_GRACE_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    auth_grace_s: u64,
    /// Serve /metrics on this address only (e.g. 127.0.0.1:9090); the
    /// main listener then answers 404 for it. Default: on the main listener.
    #[arg(long, env = "EMS_METRICS_LISTEN")]
    metrics_listen: Option<String>,

    // Energy rollups and plausibility flags.
    /// Energy rule: an energy jump implying more than this average power,
    /// in W, is a glitch (flagged, not counted).
    #[arg(long, env = "EMS_MAX_POWER_W", default_value_t = 1_000_000.0)]
    max_power_w: f64,
    /// Energy rule: an interval between readings longer than this, in ms,
    /// still counts its energy but not as coverage.
    #[arg(long, env = "EMS_MAX_GAP_MS", default_value_t = 900_000, value_parser = clap::value_parser!(i64).range(1..))]
    max_gap_ms: i64,
    /// Time zone of energy rollups that name none (IANA name such as
    /// Europe/Berlin).
    #[arg(long, env = "EMS_TIMEZONE", default_value = "UTC")]
    timezone: String,

    // Shared device state (several hubs on one database).
    /// This hub's id in the shared device state (letters, digits and
    /// `.:_-`, at most 128). Default: HOSTNAME:PORT of --listen.
    #[arg(long, env = "EMS_HUB_ID")]
    hub_id: Option<String>,
    /// How long, in ms, a device stays online for every hub after its hub
    /// last renewed the lease (renewed every third of it, at most every
    /// 10 s).
    #[arg(long, env = "EMS_PRESENCE_LEASE_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(3_000..=3_600_000))]
    presence_lease_ms: u64,
    /// Least time, in ms, between two writes of a connected device's state
    /// (last seen, edge status, last readings) for the other hubs' device
    /// lists; each lease renewal writes it too.
    #[arg(long, env = "EMS_PRESENCE_FLUSH_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    presence_flush_ms: u64,

    // The process.
    /// Threads that run the connections (1 … 1024). Default: one fewer
    /// than the CPUs the hub may use, at least 1 (the store writer has a
    /// thread of its own).
    #[arg(long, env = "EMS_WORKERS", value_parser = clap::value_parser!(u64).range(1..=1024))]
    workers: Option<u64>,
}

/// `--timescale`. The variants carry no doc comments on purpose: clap
/// would print them as a second, longer list of possible values in
/// `--help`; the flag's own help says what each means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Timescale {
    // TimescaleDB when installed or installable.
    Auto,
    // A plain table even if the extension is there.
    Off,
    // Refuse to start unless `readings` can be a hypertable.
    Require,
}

impl From<Timescale> for TimescaleMode {
    fn from(t: Timescale) -> Self {
        match t {
            Timescale::Auto => TimescaleMode::Auto,
            Timescale::Off => TimescaleMode::Off,
            Timescale::Require => TimescaleMode::Require,
        }
    }
}

/// `ems-hub export`.
#[derive(Args)]
pub struct ExportArgs {
    /// The device whose readings to write.
    #[arg(long)]
    pub device: String,
    /// First sample time to include: RFC 3339 (2026-03-29T00:00:00Z) or
    /// Unix milliseconds. Default: the oldest reading.
    #[arg(long, value_parser = parse_time)]
    pub from: Option<i64>,
    /// Sample time to stop before (exclusive), same forms. Default: after
    /// the newest reading.
    #[arg(long, value_parser = parse_time)]
    pub to: Option<i64>,
    /// csv (header row, empty cells for absent measurements) or jsonl (one
    /// JSON object per line).
    #[arg(long, value_enum, default_value = "csv")]
    pub format: ExportFormat,
}

/// `--format` of `ems-hub export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    // RFC 4180 CSV with the header row.
    Csv,
    // JSON Lines.
    Jsonl,
}

/// A `--from`/`--to` value: Unix milliseconds or an RFC 3339 instant.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    s.parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .map_err(|_| {
            format!(
                "{s:?} is neither Unix milliseconds nor an RFC 3339 time like 2026-03-29T00:00:00Z"
            )
        })
}

#[derive(Subcommand)]
pub enum AdminCmd {
    /// Add an admin; prints its token (shown once).
    Add { name: String },
    /// List admins (names and state; never tokens).
    List,
    /// Revoke an admin token (not the last active one); hubs refuse it
    /// within seconds.
    Revoke { name: String },
    /// Give an admin a new token (printed); the old one stops working.
    Rotate { name: String },
}

#[derive(Subcommand)]
pub enum QuarantineCmd {
    /// List quarantined frames, newest first (tab-separated).
    List {
        /// Only this device's.
        #[arg(long = "device")]
        device: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        limit: u32,
    },
}

#[derive(Subcommand)]
pub enum DeviceCmd {
    /// Add a device; prints its token (shown once).
    Add { id: String },
    /// List devices.
    List,
    /// Revoke a device's token.
    Revoke { id: String },
    /// Give a device a new token (printed); the old one stops working.
    Rotate { id: String },
}

#[derive(Subcommand)]
pub enum ViewerCmd {
    /// Add a viewer; prints its token (shown once).
    Add {
        name: String,
        /// A device the viewer may watch (repeatable).
        #[arg(long = "device", required_unless_present = "all_devices")]
        devices: Vec<String>,
        /// The viewer may watch every device.
        #[arg(long, conflicts_with = "devices")]
        all_devices: bool,
    },
    /// List viewers (names, state, scope; never tokens).
    List,
    /// Revoke a viewer token; its open dashboards close within seconds.
    Revoke { name: String },
}

/// A flag value that clap accepts but the hub cannot run with.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    /// `--listen` is not a socket address.
    #[error("--listen {0:?} is not an address like 127.0.0.1:8080")]
    Listen(String),
    /// An `--allowed-origin` is not `scheme://host[:port]`.
    #[error(
        "--allowed-origin {0:?} must be an origin like https://example.com \
         (scheme, host, optional port; no path)"
    )]
    AllowedOrigin(String),
    /// `--public-url` is not an http(s) URL.
    #[error("--public-url {0:?} must start with http:// or https://")]
    PublicUrl(String),
    /// `--mqtt-url` is not a broker URL (never echoed: it may hold a
    /// password).
    #[error("--mqtt-url: {0}")]
    MqttUrl(MqttConfigError),
    /// Another MQTT setting is invalid.
    #[error("{0}")]
    Mqtt(MqttConfigError),
    /// `EMS_MQTT_PASSWORD` and `--mqtt-password-file` together.
    #[error(
        "give the MQTT password either in EMS_MQTT_PASSWORD or with --mqtt-password-file, not both"
    )]
    MqttPasswordTwice,
    /// `EMS_MQTT_PASSWORD` is not UTF-8.
    #[error("EMS_MQTT_PASSWORD is not valid UTF-8")]
    MqttPasswordEncoding,
    /// A `--trusted-proxy` is not an IP address.
    #[error("--trusted-proxy {0:?} must be an IP address like 127.0.0.1 or ::1")]
    TrustedProxy(String),
    /// `--hub-id` has characters outside `[A-Za-z0-9.:_-]` or is empty or
    /// too long.
    #[error("--hub-id {0:?} must be 1 to 128 letters, digits or .:_-")]
    HubId(String),
    /// `--metrics-listen` is not a socket address.
    #[error("--metrics-listen {0:?} is not an address like 127.0.0.1:9090")]
    MetricsListen(String),
    /// `--max-power-w` is not a positive number.
    #[error("--max-power-w {0} must be a positive number of watts")]
    MaxPowerW(String),
    /// `--timezone` is not an IANA time zone name.
    #[error("--timezone {0:?} is not an IANA time zone name such as Europe/Berlin or UTC")]
    Timezone(String),
}

/// What `ems-hub serve` runs: where to listen and the hub's configuration,
/// both validated.
#[derive(Debug)]
pub struct Serve {
    /// The address to bind.
    pub listen: SocketAddr,
    /// The hub's configuration.
    pub config: Config,
    /// The async runtime's worker threads.
    pub workers: usize,
}

impl Serve {
    /// Validates the `serve` flags together with the global `--database`
    /// (the one flag every command shares) and `EMS_MQTT_PASSWORD`. The
    /// first bad flag, in the order the flags are listed in `--help`, is
    /// the error.
    pub fn from_args(database: String, args: ServeArgs) -> Result<Serve, ArgError> {
        let mqtt_password = match std::env::var("EMS_MQTT_PASSWORD") {
            Ok(p) => Some(p),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => return Err(ArgError::MqttPasswordEncoding),
        };
        Self::with_mqtt_password(database, args, mqtt_password)
    }

    /// [`Serve::from_args`] with the value of `EMS_MQTT_PASSWORD` given.
    fn with_mqtt_password(
        database: String,
        args: ServeArgs,
        mqtt_password: Option<String>,
    ) -> Result<Serve, ArgError> {
        let listen: SocketAddr = args
            .listen
            .parse()
            .map_err(|_| ArgError::Listen(args.listen.clone()))?;
        if let Some(o) = args.allowed_origins.iter().find(|o| !is_origin(o)) {
            return Err(ArgError::AllowedOrigin(o.clone()));
        }
        if let Some(u) = args.public_url.as_ref().filter(|u| !is_http_url(u)) {
            return Err(ArgError::PublicUrl(u.clone()));
        }
        let energy_limits = Limits::new(args.max_power_w, args.max_gap_ms)
            .map_err(|_| ArgError::MaxPowerW(args.max_power_w.to_string()))?;
        let timezone =
            Zone::parse(&args.timezone).map_err(|_| ArgError::Timezone(args.timezone.clone()))?;
        let mut config = Config::new(database);
        config.ping_interval = Duration::from_millis(args.ping_interval_ms);
        config.max_missed_pongs = args.max_missed_pongs;
        config.allowed_origins = args.allowed_origins;
        config.public_url = args.public_url;
        config.backfill_after = Duration::from_secs(args.backfill_after_s);
        config.rate_limit = RateLimit {
            rate: f64::from(args.rate_limit),
            burst: f64::from(args.rate_burst),
            abuse_after: Duration::from_secs(args.rate_abuse_after_s),
        };
        config.takeover = TakeoverPolicy {
            max_replacements: args.takeover_max as usize,
            window: Duration::from_secs(args.takeover_window_s),
            cooldown: Duration::from_secs(args.takeover_cooldown_s),
        };
        config.revocation_poll = Duration::from_millis(args.revocation_poll_ms);
        config.batch_max_rows = args.batch_max_rows as usize;
        config.batch_linger = Duration::from_millis(args.batch_linger_ms);
        config.batch_run = args.batch_run as usize;
        config.pg.timescale = args.timescale.into();
        config.pg.retention_days = args.retention_days;
        config.pg.compress_after_days = args.compress_after_days;
        config.energy_limits = energy_limits;
        config.timezone = timezone;
        if let Some(id) = args.hub_id {
            let ok = (1..=128).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".:_-".contains(&b));
            if !ok {
                return Err(ArgError::HubId(id));
            }
            config.hub_id = Some(id);
        }
        config.presence_lease = Duration::from_millis(args.presence_lease_ms);
        config.presence_renew = Duration::from_millis((args.presence_lease_ms / 3).min(10_000));
        config.presence_flush = Duration::from_millis(args.presence_flush_ms);
        if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
            config.tls = Some(TlsFiles { cert, key });
        }
        if let Some(url) = &args.mqtt_url {
            let broker = BrokerUrl::parse(url).map_err(ArgError::MqttUrl)?;
            let mut m = MqttConfig::new(broker);
            m.ca_file = args.mqtt_ca_file;
            m.username = args.mqtt_username;
            // An empty EMS_MQTT_PASSWORD is the same as none (an env file
            // line with nothing after `=`); MQTT sends an empty password
            // either way.
            m.password = match (
                mqtt_password.filter(|p| !p.is_empty()),
                args.mqtt_password_file,
            ) {
                (Some(_), Some(_)) => return Err(ArgError::MqttPasswordTwice),
                (Some(p), None) => Some(Secret::new(p)),
                (None, Some(file)) => Some(Secret::from_file(&file).map_err(ArgError::Mqtt)?),
                (None, None) => None,
            };
            m.discovery_prefix = args.mqtt_discovery_prefix;
            m.topic_prefix = args.mqtt_topic_prefix;
            m.interval = Duration::from_millis(args.mqtt_interval_ms);
            config.mqtt = Some(m);
            // As the hub will run it (with its public URL and backfill
            // threshold).
            if let Some(m) = config.mqtt_bridge() {
                m.validate().map_err(ArgError::Mqtt)?;
            }
        }
        config.max_connections = usize::try_from(args.max_connections).unwrap_or(usize::MAX);
        config.max_connections_per_ip =
            usize::try_from(args.max_connections_per_ip).unwrap_or(usize::MAX);
        config.max_dashboards_per_token =
            usize::try_from(args.max_dashboards_per_token).unwrap_or(usize::MAX);
        // An empty entry (`EMS_TRUSTED_PROXIES=` in an environment file)
        // trusts nobody.
        config.trusted_proxies = args
            .trusted_proxies
            .iter()
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                p.trim()
                    .parse()
                    .map_err(|_| ArgError::TrustedProxy(p.clone()))
            })
            .collect::<Result<_, _>>()?;
        config.auth_grace = Duration::from_secs(args.auth_grace_s);
        config.metrics_listen = args
            .metrics_listen
            .map(|a| a.parse().map_err(|_| ArgError::MetricsListen(a.clone())))
            .transpose()?;
        // A hub run from the command line tells systemd how it is doing
        // (nothing is sent without a NOTIFY_SOCKET).
        config.sd_notify = true;
        let workers = match args.workers {
            Some(n) => usize::try_from(n).unwrap_or(1),
            None => default_workers(std::thread::available_parallelism().map_or(1, |n| n.get())),
        };
        Ok(Serve {
            listen,
            config,
            workers,
        })
    }
}

/// The workers for a hub that may use `cpus` CPUs: one fewer, at least
/// one. The store writer is a thread of its own that is busy for a good
/// part of every second (SQLite's B-trees and `fsync`); a worker per CPU
/// beside it made the workers hand each other wake-ups and tasks across
/// CPUs, which cost more than the second worker ran: with 3,000 devices
/// at 1 Hz on two CPUs, one worker took 15 % less CPU per reading than
/// two (docs/development/benchmarks.md).
pub fn default_workers(cpus: usize) -> usize {
    cpus.saturating_sub(1).max(1)
}

/// An origin as browsers send it: `http(s)://host[:port]`, no path.
fn is_origin(o: &str) -> bool {
    is_http_url(o) && !o.ends_with('/')
}

fn is_http_url(u: &str) -> bool {
    u.starts_with("http://") || u.starts_with("https://")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ems-hub serve ARGS…` as parsed by clap, then validated.
    fn serve(args: &[&str]) -> Result<Serve, ArgError> {
        serve_with_password(args, None)
    }

    /// [`serve`] with `EMS_MQTT_PASSWORD` set to `password`.
    fn serve_with_password(args: &[&str], password: Option<&str>) -> Result<Serve, ArgError> {
        let argv = ["ems-hub", "serve"].iter().chain(args);
        let cli = Cli::try_parse_from(argv).expect("clap accepts the flags");
        match cli.command {
            Some(Command::Serve(a)) => {
                Serve::with_mqtt_password(cli.database, a, password.map(String::from))
            }
            _ => panic!("not a serve command"),
        }
    }

    #[test]
    fn hub_id_and_the_presence_settings() {
        let s = serve(&[]).unwrap();
        let want = Config::new("x");
        assert_eq!(s.config.hub_id, None, "chosen at start from the port");
        assert_eq!(s.config.presence_lease, want.presence_lease);
        assert_eq!(s.config.presence_renew, want.presence_renew);
        assert_eq!(s.config.presence_flush, want.presence_flush);
        let s = serve(&[
            "--hub-id",
            "hub-1.example:8080",
            "--presence-lease-ms",
            "6000",
            "--presence-flush-ms",
            "3000",
        ])
        .unwrap();
        assert_eq!(s.config.hub_id.as_deref(), Some("hub-1.example:8080"));
        assert_eq!(s.config.presence_lease, Duration::from_secs(6));
        assert_eq!(s.config.presence_renew, Duration::from_secs(2));
        assert_eq!(s.config.presence_flush, Duration::from_secs(3));
        for bad in ["", "a b", "hub/1", &"x".repeat(129)] {
            assert!(
                matches!(serve(&["--hub-id", bad]), Err(ArgError::HubId(_))),
                "{bad:?}"
            );
        }
        for bad in ["2999", "3600001"] {
            let argv = ["ems-hub", "serve", "--presence-lease-ms", bad];
            assert!(Cli::try_parse_from(argv).is_err(), "{bad}");
        }
        for bad in ["99", "3600001"] {
            let argv = ["ems-hub", "serve", "--presence-flush-ms", bad];
            assert!(Cli::try_parse_from(argv).is_err(), "{bad}");
        }
    }

    #[test]
    fn workers_default_to_one_fewer_than_the_cpus() {
        assert_eq!(default_workers(1), 1);
        assert_eq!(default_workers(2), 1);
        assert_eq!(default_workers(4), 3);
        assert_eq!(default_workers(0), 1);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(serve(&[]).unwrap().workers, default_workers(cpus));
        assert_eq!(serve(&["--workers", "3"]).unwrap().workers, 3);
        for bad in ["0", "1025", "two"] {
            let argv = ["ems-hub", "serve", "--workers", bad];
            assert!(Cli::try_parse_from(argv).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_are_the_library_defaults() {
        let s = serve(&[]).unwrap();
        assert_eq!(s.listen, "127.0.0.1:8080".parse().unwrap());
        let (got, want) = (s.config, Config::new("sqlite:ems-hub.db"));
        assert_eq!(got.database, want.database);
        assert_eq!(got.ping_interval, want.ping_interval);
        assert_eq!(got.max_missed_pongs, want.max_missed_pongs);
        assert_eq!(got.batch_max_rows, want.batch_max_rows);
        assert_eq!(got.batch_linger, want.batch_linger);
        assert_eq!(got.batch_run, want.batch_run);
        assert_eq!(got.backfill_after, want.backfill_after);
        assert_eq!(got.rate_limit, want.rate_limit);
        assert_eq!(got.revocation_poll, want.revocation_poll);
        assert_eq!(got.pg, want.pg);
        assert_eq!(got.energy_limits, want.energy_limits);
        assert_eq!(got.energy_limits, Limits::new(1e6, 15 * 60 * 1000).unwrap());
        assert_eq!(got.timezone.name(), "UTC");
        assert!(got.tls.is_none() && got.public_url.is_none());
        assert!(got.allowed_origins.is_empty());
        assert!(got.mqtt.is_none() && want.mqtt.is_none());
        let (t, d) = (got.takeover, want.takeover);
        assert_eq!(
            (t.max_replacements, t.window, t.cooldown),
            (d.max_replacements, d.window, d.cooldown)
        );
        assert_eq!(got.max_connections, want.max_connections);
        assert_eq!(got.max_connections_per_ip, want.max_connections_per_ip);
        assert_eq!(got.max_dashboards_per_token, want.max_dashboards_per_token);
        assert_eq!(got.auth_grace, want.auth_grace);
        assert!(got.trusted_proxies.is_empty() && got.metrics_listen.is_none());
        assert!(got.sd_notify, "the binary notifies systemd");
    }

    #[test]
    fn limits_proxies_and_the_metrics_listener_reach_the_config() {
        let s = serve(&[
            "--max-connections",
            "10",
            "--max-connections-per-ip",
            "3",
            "--max-dashboards-per-token",
            "2",
            "--trusted-proxy",
            "127.0.0.1,::1",
            "--trusted-proxy",
            "10.0.0.5",
            "--auth-grace-s",
            "5",
            "--metrics-listen",
            "127.0.0.1:9090",
        ])
        .unwrap();
        let c = s.config;
        assert_eq!(
            (
                c.max_connections,
                c.max_connections_per_ip,
                c.max_dashboards_per_token
            ),
            (10, 3, 2)
        );
        let proxies: Vec<String> = c.trusted_proxies.iter().map(|p| p.to_string()).collect();
        assert_eq!(proxies, ["127.0.0.1", "::1", "10.0.0.5"]);
        assert_eq!(c.auth_grace, Duration::from_secs(5));
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(
            serve(&["--trusted-proxy", "nginx"]).unwrap_err(),
            ArgError::TrustedProxy("nginx".into())
        );
        assert!(serve(&["--trusted-proxy", ""])
            .unwrap()
            .config
            .trusted_proxies
            .is_empty());
        assert_eq!(
            serve(&["--metrics-listen", "9090"]).unwrap_err(),
            ArgError::MetricsListen("9090".into())
        );
        for bad in [
            &["--max-connections", "0"][..],
            &["--max-connections-per-ip", "0"],
            &["--max-dashboards-per-token", "0"],
            &["--auth-grace-s", "0"],
        ] {
            let argv = ["ems-hub", "serve"].iter().chain(bad);
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn flags_reach_the_config() {
        let s = serve(&[
            "--listen",
            "[::1]:9000",
            "--ping-interval-ms",
            "500",
            "--allowed-origin",
            "https://a.example,http://b.example:8080",
            "--public-url",
            "https://ems.example.com/",
            "--rate-limit",
            "7",
            "--rate-burst",
            "9",
            "--takeover-max",
            "2",
            "--timescale",
            "require",
            "--retention-days",
            "30",
            "--batch-max-rows",
            "5",
            "--batch-linger-ms",
            "20",
            "--batch-run",
            "4",
        ])
        .unwrap();
        assert_eq!(s.listen, "[::1]:9000".parse().unwrap());
        let c = s.config;
        assert_eq!(c.ping_interval, Duration::from_millis(500));
        assert_eq!(
            c.allowed_origins,
            ["https://a.example", "http://b.example:8080"]
        );
        assert_eq!(c.public_url.as_deref(), Some("https://ems.example.com/"));
        assert_eq!((c.rate_limit.rate, c.rate_limit.burst), (7.0, 9.0));
        assert_eq!(c.takeover.max_replacements, 2);
        assert_eq!(c.pg.timescale, TimescaleMode::Require);
        assert_eq!(c.pg.retention_days, Some(30));
        assert_eq!(c.batch_max_rows, 5);
        assert_eq!(c.batch_linger, Duration::from_millis(20));
        assert_eq!(c.batch_run, 4);
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_named() {
        assert_eq!(
            serve(&["--listen", "nope"]).unwrap_err(),
            ArgError::Listen("nope".into())
        );
        for bad in ["https://x/", "x.example", "ftp://x"] {
            assert_eq!(
                serve(&["--allowed-origin", bad]).unwrap_err(),
                ArgError::AllowedOrigin(bad.into())
            );
        }
        assert_eq!(
            serve(&["--public-url", "ems.example.com"]).unwrap_err(),
            ArgError::PublicUrl("ems.example.com".into())
        );
        // The listen address is checked first, as it is listed first.
        assert!(matches!(
            serve(&["--listen", "x", "--public-url", "y"]),
            Err(ArgError::Listen(_))
        ));
        assert!(ArgError::Listen("x".into())
            .to_string()
            .contains("127.0.0.1:8080"));
    }

    #[test]
    fn mqtt_flags_reach_the_bridge_config() {
        let dir = tempfile::tempdir().unwrap();
        let pw_file = dir.path().join("pw");
        std::fs::write(&pw_file, "from-the-file\n").unwrap();
        let pw_file = pw_file.to_str().unwrap();
        let s = serve(&[
            "--public-url",
            "https://ems.example.com",
            "--backfill-after-s",
            "90",
            "--mqtt-url",
            "mqtts://ha.local:8884",
            "--mqtt-ca-file",
            "/etc/ems-hub/ca.pem",
            "--mqtt-username",
            "ems-hub",
            "--mqtt-password-file",
            pw_file,
            "--mqtt-discovery-prefix",
            "ha/discovery",
            "--mqtt-topic-prefix",
            "house",
            "--mqtt-interval-ms",
            "250",
        ])
        .unwrap();
        let m = s.config.mqtt_bridge().expect("the bridge is on");
        assert_eq!(m.broker.to_string(), "mqtts://ha.local:8884");
        assert_eq!(m.ca_file.as_deref(), Some("/etc/ems-hub/ca.pem".as_ref()));
        assert_eq!(m.username.as_deref(), Some("ems-hub"));
        assert_eq!(m.password, Some(Secret::new("from-the-file")));
        assert_eq!(
            (m.discovery_prefix.as_str(), m.topic_prefix.as_str()),
            ("ha/discovery", "house")
        );
        assert_eq!(m.interval, Duration::from_millis(250));
        // The hub's own settings flow into discovery.
        assert_eq!(m.public_url.as_deref(), Some("https://ems.example.com"));
        assert_eq!(m.backfill_after, Duration::from_secs(90));
        assert_eq!(m.sw_version, env!("CARGO_PKG_VERSION"));

        // The defaults, and the password from the environment.
        let s = serve_with_password(
            &["--mqtt-url", "mqtt://ha.local", "--mqtt-username", "u"],
            Some("from-the-env"),
        )
        .unwrap();
        let m = s.config.mqtt_bridge().unwrap();
        let want = MqttConfig::new(BrokerUrl::parse("mqtt://ha.local").unwrap());
        assert_eq!(m.broker.port, 1883);
        assert_eq!(m.password, Some(Secret::new("from-the-env")));
        assert_eq!(
            (m.discovery_prefix, m.topic_prefix, m.interval),
            (want.discovery_prefix, want.topic_prefix, want.interval)
        );
        assert_eq!(m.ca_file, None);
        assert_eq!(m.public_url, None);
        // An empty EMS_MQTT_PASSWORD counts as unset.
        let s = serve_with_password(&["--mqtt-url", "mqtt://h"], Some("")).unwrap();
        assert_eq!(s.config.mqtt.unwrap().password, None);
        // Without --mqtt-url the bridge is off, whatever the password says.
        assert!(serve_with_password(&[], Some("x"))
            .unwrap()
            .config
            .mqtt
            .is_none());
    }

    #[test]
    fn bad_mqtt_settings_are_refused_without_echoing_secrets() {
        use MqttConfigError as E;
        let e = serve(&["--mqtt-url", "mqtt://ems:hunter2-secret@ha.local:1883"]).unwrap_err();
        assert_eq!(e, ArgError::MqttUrl(E::CredentialsInUrl));
        let text = format!("{e} {e:?}");
        assert!(
            !text.contains("hunter2") && !text.contains("ems:"),
            "{text}"
        );
        assert!(text.contains("--mqtt-url"), "{text}");
        assert_eq!(
            serve(&["--mqtt-url", "http://ha.local"]).unwrap_err(),
            ArgError::MqttUrl(E::Scheme)
        );
        assert_eq!(
            serve_with_password(&["--mqtt-url", "mqtt://h"], Some("pw")).unwrap_err(),
            ArgError::Mqtt(E::PasswordWithoutUser)
        );
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let missing = missing.to_str().unwrap();
        assert_eq!(
            serve_with_password(
                &[
                    "--mqtt-url",
                    "mqtt://h",
                    "--mqtt-username",
                    "u",
                    "--mqtt-password-file",
                    missing
                ],
                Some("pw"),
            )
            .unwrap_err(),
            ArgError::MqttPasswordTwice
        );
        assert!(matches!(
            serve(&[
                "--mqtt-url",
                "mqtt://h",
                "--mqtt-username",
                "u",
                "--mqtt-password-file",
                missing
            ]),
            Err(ArgError::Mqtt(E::PasswordFile { .. }))
        ));
        assert_eq!(
            serve(&["--mqtt-url", "mqtt://h", "--mqtt-ca-file", "ca.pem"]).unwrap_err(),
            ArgError::Mqtt(E::CaWithoutTls)
        );
        assert_eq!(
            serve(&["--mqtt-url", "mqtt://h", "--mqtt-topic-prefix", "ems/#"]).unwrap_err(),
            ArgError::Mqtt(E::Prefix {
                flag: "--mqtt-topic-prefix"
            })
        );
        assert_eq!(
            serve(&["--mqtt-url", "mqtt://h", "--mqtt-username", ""]).unwrap_err(),
            ArgError::Mqtt(E::EmptyUser)
        );
        // Refused by clap: an interval under 100 ms, and the MQTT settings
        // without a broker.
        for argv in [
            &[
                "ems-hub",
                "serve",
                "--mqtt-url",
                "mqtt://h",
                "--mqtt-interval-ms",
                "99",
            ][..],
            &["ems-hub", "serve", "--mqtt-username", "u"],
            &["ems-hub", "serve", "--mqtt-password-file", "pw"],
            &["ems-hub", "serve", "--mqtt-ca-file", "ca.pem"],
        ] {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?} accepted");
        }
    }

    #[test]
    fn energy_flags_are_validated() {
        let c = serve(&[
            "--max-power-w",
            "2500.5",
            "--max-gap-ms",
            "60000",
            "--timezone",
            "europe/berlin",
        ])
        .unwrap()
        .config;
        assert_eq!(c.energy_limits, Limits::new(2500.5, 60_000).unwrap());
        assert_eq!(c.timezone.name(), "Europe/Berlin");
        for bad in ["0", "-1", "NaN", "inf"] {
            assert!(
                matches!(
                    serve(&[&format!("--max-power-w={bad}")]),
                    Err(ArgError::MaxPowerW(_))
                ),
                "{bad}"
            );
        }
        for bad in ["Mars/Olympus", "+01:00", ""] {
            assert_eq!(
                serve(&["--timezone", bad]).unwrap_err(),
                ArgError::Timezone(bad.into())
            );
        }
        // Range checked by clap (exit code 2).
        for bad in ["0", "-5", "x"] {
            let flag = format!("--max-gap-ms={bad}");
            let argv = ["ems-hub", "serve", &flag];
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn timescale_takes_exactly_three_values() {
        for (flag, mode) in [
            ("auto", TimescaleMode::Auto),
            ("off", TimescaleMode::Off),
            ("require", TimescaleMode::Require),
        ] {
            let s = serve(&["--timescale", flag]).unwrap();
            assert_eq!(s.config.pg.timescale, mode);
        }
        for bad in ["bogus", "Auto", ""] {
            let argv = ["ems-hub", "serve", "--timescale", bad];
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn export_times_are_rfc3339_or_epoch_ms() {
        assert_eq!(parse_time("0"), Ok(0));
        assert_eq!(parse_time("-5"), Ok(-5));
        assert_eq!(parse_time("1774746000123"), Ok(1_774_746_000_123));
        assert_eq!(
            parse_time("2026-03-29T01:00:00.123Z"),
            Ok(1_774_746_000_123)
        );
        assert_eq!(
            parse_time("2026-03-29T03:00:00.123+02:00"),
            Ok(1_774_746_000_123)
        );
        for bad in ["", "yesterday", "2026-03-29", "1.5"] {
            assert!(parse_time(bad).is_err(), "{bad:?}");
        }
        let cli = Cli::try_parse_from([
            "ems-hub",
            "export",
            "--device",
            "d1",
            "--from",
            "2026-03-29T00:00:00Z",
            "--format",
            "jsonl",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Export(a)) => {
                assert_eq!(a.device, "d1");
                assert_eq!(a.from, Some(1_774_742_400_000));
                assert_eq!(a.to, None);
                assert_eq!(a.format, ExportFormat::Jsonl);
            }
            _ => panic!("not export"),
        }
        assert!(
            Cli::try_parse_from(["ems-hub", "export"]).is_err(),
            "--device is required"
        );
        assert!(
            Cli::try_parse_from(["ems-hub", "export", "--device", "d", "--format", "xml"]).is_err()
        );
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
