//! `ems-hub`: the command line. Parses and validates the flags
//! ([`cli`]), sets up logging and hands over to the library: the server
//! ([`serve`]), the admin commands ([`admin_commands`]), the quarantine
//! listing ([`quarantine`]), the export of stored readings ([`export`]) or
//! the terminal dashboard (`watch`).

mod admin_commands;
mod cli;
#[cfg(test)]
mod doc_drift;
mod export;
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod heap;
mod quarantine;
mod serve;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use cli::{Cli, Command, Serve};

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
        None => serve::run(Serve::from_args(db, cli.serve)?),
        Some(Command::Serve(args)) => serve::run(Serve::from_args(db, args)?),
        Some(Command::Device(cmd)) => admin_commands::device(&db, cmd),
        Some(Command::Viewer(cmd)) => admin_commands::viewer(&db, cmd),
        Some(Command::Admin(cmd)) => admin_commands::admin(&db, cmd),
        Some(Command::Quarantine(cmd)) => quarantine::run(&db, cmd),
        Some(Command::Export(args)) => export::run(&db, args),
        Some(Command::Watch { device_id, hub }) => watch(&hub, &device_id),
    }
}

/// `ems-hub watch`: prints the device's live feed until Ctrl-C.
fn watch(hub: &str, device_id: &str) -> anyhow::Result<()> {
    let token = std::env::var("EMS_VIEWER_TOKEN")
        .context("set EMS_VIEWER_TOKEN to a viewer token (ems-hub viewer add NAME --device ID)")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        tokio::select! {
            r = ems_hub::watcher::watch(hub, device_id, token.trim()) => r.map_err(anyhow::Error::from),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}
