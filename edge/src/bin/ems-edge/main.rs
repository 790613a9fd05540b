//! `ems-edge`: the command line. Parses it, sets up logging and signals,
//! and hands `run` over to the library (`main → run → anyhow`); the bench
//! tools for installers live here: [`check`], [`probe`], [`scan`].

mod check;
#[cfg(test)]
mod doc_drift;
mod probe;
mod scan;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ems_edge::config::{Config, DeviceToken, DEFAULT_CONFIG_PATH};
use ems_edge::Shutdown;
use log::LevelFilter;

/// EMS edge: reads energy meters and streams readings to the hub.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, global = true, env = "EMS_LOG_LEVEL", default_value = "info")]
    log_level: LevelFilter,
    /// Config file [default: /etc/ems-edge/edge.toml].
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Stream readings to the hub (the default).
    Run,
    /// Validate the config, resolve the hub and try the authenticated handshake once.
    Check,
    /// Read each configured meter N times and print a table.
    Probe {
        /// Reads per meter.
        #[arg(long, default_value_t = 3)]
        count: u32,
    },
    /// Scan a bus for devices.
    Scan {
        #[command(subcommand)]
        bus: ScanBus,
    },
}

#[derive(Debug, Subcommand)]
enum ScanBus {
    /// List responding I2C addresses.
    I2c {
        /// I2C bus number (/dev/i2c-N).
        #[arg(long, default_value_t = 1)]
        bus: u8,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its causes.
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: LevelFilter) {
    // tungstenite logs the handshake request, Authorization header
    // included, at trace level: never let it log below debug.
    let quiet = level.min(LevelFilter::Debug);
    let _ = simple_logger::SimpleLogger::new()
        .with_level(level)
        .with_module_level("tungstenite", quiet)
        .with_module_level("rustls", quiet)
        .with_utc_timestamps()
        .init();
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = cli
        .config
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let config = Config::load(&config)?;
            let token = DeviceToken::from_env()?;
            let shutdown = Shutdown::new();
            install_signals(&shutdown)?;
            ems_edge::run(config, token, shutdown)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let ok = check::check(&config, &mut std::io::stdout().lock())
                .context("writing the report")?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Probe { count } => probe::probe(&config, count),
        Command::Scan {
            bus: ScanBus::I2c { bus },
        } => scan::scan_i2c(bus),
    }
}

/// SIGTERM and SIGINT trigger the shutdown.
fn install_signals(shutdown: &Shutdown) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing signal handlers")?;
    let shutdown = shutdown.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                log::info!("received signal {sig}");
                shutdown.trigger();
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}
