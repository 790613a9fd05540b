//! `ems-hub`: the command line. Parses flags, sets up logging and hands
//! over to the library (`ems_hub::run` or `ems_hub::admin`).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use ems_hub::admin::Admin;
use ems_hub::store::ViewerScope;
use ems_hub::Config;

/// EMS hub: authenticated WebSocket ingest of meter readings, live fan-out
/// to dashboards, durable storage.
#[derive(Parser)]
#[command(name = "ems-hub", version, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Database URL: sqlite:PATH (embedded, default) or postgres://…
    #[arg(
        long,
        env = "EMS_DATABASE_URL",
        default_value = "sqlite:ems-hub.db",
        global = true
    )]
    database: String,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "EMS_LOG_LEVEL", global = true)]
    log_level: Option<log::LevelFilter>,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
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
struct ServeArgs {
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
    tls_cert: Option<std::path::PathBuf>,
    /// Terminate TLS in the hub: private key (PEM). Needs --tls-cert.
    #[arg(long, env = "EMS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
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
    #[arg(long, env = "EMS_TIMESCALE", default_value = "auto", value_parser = ["auto", "off", "require"])]
    timescale: String,
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
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Add an admin; prints its token (shown once).
    Add { name: String },
}

#[derive(Subcommand)]
enum DeviceCmd {
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
enum ViewerCmd {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        None | Some(Command::Serve(_)) => log::LevelFilter::Info,
        _ => log::LevelFilter::Warn,
    };
    let level = cli.log_level.unwrap_or(default_level);
    // tungstenite logs whole handshake requests (Authorization included) at
    // trace level: never let it go below debug, so no token reaches a log.
    let quiet = level.min(log::LevelFilter::Debug);
    let _ = simple_logger::SimpleLogger::new()
        .with_level(level)
        .with_module_level("tungstenite", quiet)
        .with_module_level("tokio_tungstenite", quiet)
        .with_module_level("rustls", quiet)
        .with_utc_timestamps()
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ems-hub: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let db = cli.database;
    match cli.command {
        None => serve(cli.serve, db),
        Some(Command::Serve(args)) => serve(args, db),
        Some(Command::Device(cmd)) => {
            let mut admin = Admin::open(&db)?;
            match cmd {
                DeviceCmd::Add { id } => println!("{}", admin.add_device(&id)?),
                DeviceCmd::List => {
                    for d in admin.list_devices()? {
                        let state = match d.revoked_ms {
                            Some(_) => "revoked",
                            None => "active",
                        };
                        println!("{}\t{state}", d.device_id);
                    }
                }
                DeviceCmd::Revoke { id } => admin.revoke_device(&id)?,
                DeviceCmd::Rotate { id } => println!("{}", admin.rotate_device(&id)?),
            }
            Ok(())
        }
        Some(Command::Watch { device_id, hub }) => {
            let token = std::env::var("EMS_VIEWER_TOKEN").context(
                "set EMS_VIEWER_TOKEN to a viewer token (ems-hub viewer add NAME --device ID)",
            )?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(async {
                tokio::select! {
                    r = ems_hub::watcher::watch(&hub, &device_id, token.trim()) => r.map_err(anyhow::Error::from),
                    _ = tokio::signal::ctrl_c() => Ok(()),
                }
            })
        }
        Some(Command::Admin(AdminCmd::Add { name })) => {
            println!("{}", Admin::open(&db)?.add_admin(&name)?);
            Ok(())
        }
        Some(Command::Viewer(ViewerCmd::Revoke { name })) => {
            Ok(Admin::open(&db)?.revoke_viewer(&name)?)
        }
        Some(Command::Viewer(ViewerCmd::List)) => {
            for v in Admin::open(&db)?.list_viewers()? {
                let scope = match v.scope {
                    ViewerScope::AllDevices => "*".to_string(),
                    ViewerScope::Devices(ids) => ids.join(","),
                };
                let state = if v.revoked_ms.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                println!("{}\t{state}\t{scope}", v.name);
            }
            Ok(())
        }
        Some(Command::Viewer(ViewerCmd::Add {
            name,
            devices,
            all_devices,
        })) => {
            let mut admin = Admin::open(&db)?;
            let scope = if all_devices {
                ViewerScope::AllDevices
            } else {
                for d in &devices {
                    ems_shared::validate_device_id(d).with_context(|| format!("--device {d:?}"))?;
                }
                ViewerScope::Devices(devices)
            };
            println!("{}", admin.add_viewer(&name, scope)?);
            Ok(())
        }
    }
}

fn serve(args: ServeArgs, database: String) -> anyhow::Result<()> {
    let addr: SocketAddr = match args.listen.parse() {
        Ok(a) => a,
        Err(_) => bail!(
            "--listen {:?} is not an address like 127.0.0.1:8080",
            args.listen
        ),
    };
    let mut config = Config::new(database);
    config.ping_interval = Duration::from_millis(args.ping_interval_ms);
    config.max_missed_pongs = args.max_missed_pongs;
    for o in &args.allowed_origins {
        if o.ends_with('/') || !(o.starts_with("http://") || o.starts_with("https://")) {
            bail!("--allowed-origin {o:?} must be an origin like https://example.com (scheme, host, optional port; no path)");
        }
    }
    config.allowed_origins = args.allowed_origins;
    if let Some(u) = &args.public_url {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            bail!("--public-url {u:?} must start with http:// or https://");
        }
    }
    config.public_url = args.public_url;
    config.backfill_after = Duration::from_secs(args.backfill_after_s);
    config.rate_limit = ems_hub::limits::RateLimit {
        rate: f64::from(args.rate_limit),
        burst: f64::from(args.rate_burst),
        abuse_after: Duration::from_secs(args.rate_abuse_after_s),
    };
    config.takeover = ems_hub::registry::TakeoverPolicy {
        max_replacements: args.takeover_max as usize,
        window: Duration::from_secs(args.takeover_window_s),
        cooldown: Duration::from_secs(args.takeover_cooldown_s),
    };
    config.revocation_poll = Duration::from_millis(args.revocation_poll_ms);
    config.batch_max_rows = args.batch_max_rows as usize;
    {
        use ems_hub::store::postgres::TimescaleMode;
        config.pg.timescale = match args.timescale.as_str() {
            "off" => TimescaleMode::Off,
            "require" => TimescaleMode::Require,
            _ => TimescaleMode::Auto,
        };
        config.pg.retention_days = args.retention_days;
        config.pg.compress_after_days = args.compress_after_days;
    }
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.tls = Some(ems_hub::config::TlsFiles { cert, key });
    }

    limit_malloc_arenas();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Blocking work is store look-ups, serialized on one store handle:
        // more threads only wait on its lock. Tokio's default (512) let a
        // storm of 10,000 handshakes start ~250 threads, each with its own
        // stack and malloc arena (issue 8: RSS).
        .max_blocking_threads(8)
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let listener = listen(addr).with_context(|| {
            format!("cannot listen on {addr} (in use? choose another with --listen)")
        })?;
        ems_hub::run(listener, config, shutdown_signal()).await?;
        Ok(())
    })
}

/// glibc gives every thread that allocates its own malloc arena (up to 8 per
/// core), and each arena keeps its high-water mark: the store look-ups on
/// the blocking pool (the revocation poll's 10,000-row answer every second)
/// left several arenas of a few MB each. Two arenas are plenty for a hub
/// whose hot path is one or two workers (issue 8: S1 peak RSS 82 -> 58 MB,
/// same CPU per reading). `MALLOC_ARENA_MAX` in the environment still wins
/// when set.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter (glibc takes its
        // own lock); called before the runtime starts its threads.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Binds the listening socket with a deep accept queue. `TcpListener::bind`
/// asks for 128 pending connections; when every device reconnects at once
/// (a hub restart, 10,000 devices) the overflow is dropped and those clients
/// retry their SYN only after a second (issue 8, connection storm). The
/// kernel caps the value at `net.core.somaxconn`.
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => log::info!("SIGINT received"),
    }
}
