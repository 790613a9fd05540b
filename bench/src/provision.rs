//! Bulk provisioning of bench devices and the token file.
//!
//! Schema, id rules and token format come from `ems_hub::admin::Admin` and
//! `ems_hub::token`. On SQLite the devices are inserted in one transaction
//! (Admin's one-commit-per-device with `synchronous=FULL` costs an fsync
//! each); on PostgreSQL `Admin::add_device` is used per device.

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ems_hub::admin::Admin;
use ems_hub::auth::token::{self, TokenKind};
use ems_hub::store::ViewerScope;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Database URL of the hub: sqlite:PATH or postgres://…
    #[arg(long)]
    database: String,
    /// Devices to provision.
    #[arg(long)]
    count: usize,
    /// Device id prefix; ids are PREFIX00000, PREFIX00001, …
    #[arg(long, default_value = "dev-")]
    prefix: String,
    /// First index.
    #[arg(long, default_value_t = 0)]
    start: usize,
    /// Token file to write (`ID TOKEN` per line, `@viewer TOKEN`).
    #[arg(long)]
    out: PathBuf,
    /// Name of the all-devices viewer to create for the dashboards.
    #[arg(long, default_value = "bench-viewer")]
    viewer: String,
}

/// A token file.
pub struct Tokens {
    pub devices: Vec<(String, String)>,
    pub viewer: Option<String>,
}

pub fn load(path: &Path) -> anyhow::Result<Tokens> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Tokens {
        devices: Vec::new(),
        viewer: None,
    };
    for line in std::io::BufReader::new(f).lines() {
        let line = line?;
        let Some((id, tok)) = line.split_once(' ') else {
            continue;
        };
        if id == "@viewer" {
            out.viewer = Some(tok.trim().to_owned());
        } else {
            out.devices.push((id.to_owned(), tok.trim().to_owned()));
        }
    }
    Ok(out)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.count > 100_000 {
        bail!("--count is capped at 100000");
    }
    let t0 = std::time::Instant::now();
    // Creates the schema (migrations) if needed.
    let mut admin =
        Admin::open(&a.database).with_context(|| format!("cannot open {}", a.database))?;
    let ids: Vec<String> = (a.start..a.start + a.count)
        .map(|i| format!("{}{i:05}", a.prefix))
        .collect();
    let mut pairs = Vec::with_capacity(ids.len());
    if let Some(path) = a.database.strip_prefix("sqlite:") {
        drop(admin);
        let mut conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare(
                "INSERT INTO devices (device_id, token_hash, created_ms) VALUES (?1, ?2, ?3)",
            )?;
            let now = crate::payload::now_ms();
            for id in ids {
                ems_shared::validate_device_id(&id).with_context(|| format!("device id {id:?}"))?;
                let t = token::try_generate(TokenKind::Device)?;
                let h = token::hash(&t);
                stmt.execute(rusqlite::params![id, &h[..], now])
                    .with_context(|| {
                        format!("insert {id} (already provisioned? use a new --prefix or --start)")
                    })?;
                pairs.push((id, t));
            }
        }
        tx.commit()?;
        admin = Admin::open(&a.database)?;
    } else {
        for id in ids {
            let t = admin.add_device(&id)?;
            pairs.push((id, t));
        }
    }
    let viewer = admin.add_viewer(&a.viewer, ViewerScope::AllDevices)?;
    let f = std::fs::File::create(&a.out)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    let mut w = BufWriter::new(f);
    writeln!(w, "@viewer {viewer}")?;
    for (id, t) in &pairs {
        writeln!(w, "{id} {t}")?;
    }
    w.flush()?;
    println!(
        "provisioned {} devices and viewer {:?} in {:.2}s -> {}",
        pairs.len(),
        a.viewer,
        t0.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}
