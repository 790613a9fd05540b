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
    #[arg(long, env = "EMS_DATABASE_URL", default_value = "sqlite:ems-hub.db", global = true)]
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        None | Some(Command::Serve(_)) => log::LevelFilter::Info,
        _ => log::LevelFilter::Warn,
    };
    let _ = simple_logger::SimpleLogger::new()
        .with_level(cli.log_level.unwrap_or(default_level))
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
        Err(_) => bail!("--listen {:?} is not an address like 127.0.0.1:8080", args.listen),
    };
    let mut config = Config::new(database);
    config.ping_interval = Duration::from_millis(args.ping_interval_ms);
    config.max_missed_pongs = args.max_missed_pongs;
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.tls = Some(ems_hub::config::TlsFiles { cert, key });
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (in use? choose another with --listen)"))?;
        ems_hub::run(listener, config, shutdown_signal()).await?;
        Ok(())
    })
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
