//! # ems-edge — the EMS edge client
//!
//! Reads energy meters on a Raspberry Pi and streams the readings to the hub
//! over an authenticated WebSocket, losing none across network outages,
//! hub restarts, SIGTERM and SIGKILL.
//!
//! ## Layout
//! - [`config`]: the TOML file, validated once; the device token (redacted).
//! - [`sampler`]: the sampling thread (drift-free schedule, never waits on
//!   the network).
//! - [`clock`]: whether the wall clock can be trusted; holds readings until it
//!   can; the epoch.
//! - [`outbox`]: pure outbox state (what is done, what to send next, ack
//!   handling) and the [`outbox::Outbox`] the threads share.
//! - [`spool`]: the on-disk spool (segment files, batched appends, bounded
//!   fsync interval, size bound).
//! - [`link`]: the blocking tungstenite/rustls client and its
//!   CONNECTED/RETRYING loop.
//! - [`backoff`]: full-jitter exponential backoff, pure.
//! - [`notify`]: systemd READY/WATCHDOG/STATUS.
//! - [`shutdown`]: the stop signal shared by the threads.
//! - [`check`]: `ems-edge check` (config, resolve, one authenticated handshake).
//! - [`meters`]: the `Meter` trait and one module per kind; [`hw`]: the
//!   Raspberry Pi buses; [`tools`]: `probe` and `scan`.
//!
//! [`run`] wires them: the sampler thread appends to the outbox, the link
//! thread sends from it, and the calling thread writes and fsyncs the spool
//! every `spool_sync_interval_ms`, feeds the watchdog and the status line,
//! and shuts everything down within 5 s of the signal.

pub mod backoff;
pub mod clock;
pub mod config;
pub mod link;
pub mod meters;
pub mod notify;
pub mod outbox;
pub mod platform;
pub mod sampler;
pub mod shutdown;
pub mod spool;
pub mod state_dir;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

pub use config::{Config, ConfigError, DeviceToken};
pub use shutdown::Shutdown;

use clock::{ClockGate, SystemSync};
use link::{Link, LinkState, Target};
use outbox::{sync_files, Outbox};
use sampler::{MeterSlot, Sampler};
use state_dir::StateDir;

/// Readings held in memory while the clock is unsynchronized: a day at 1 Hz.
const MAX_HELD: usize = 86_400;
/// How often the ack watermark is saved.
const WATERMARK_EVERY: Duration = Duration::from_secs(10);
/// Budget for the whole shutdown (the issue asks for 5 s).
const SHUTDOWN_BUDGET: Duration = Duration::from_millis(4500);

/// Why the edge could not start. Once running, it never stops on a network
/// or meter error.
#[derive(Debug, Error)]
pub enum EdgeError {
    /// Bad configuration or token.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Bad TLS setup (`ca_file`).
    #[error(transparent)]
    Tls(#[from] link::TlsError),
    /// The spool directory is unusable.
    #[error("spool {dir}: {error} (check spool_dir and its permissions)")]
    Spool {
        /// The directory.
        dir: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// Another process (the service, or a manual `ems-edge run`) uses the
    /// same spool directory.
    #[error("spool_dir {dir} is {detail}: two processes must not share a spool (stop the other one, e.g. `systemctl stop ems-edge`, or give this one its own spool_dir)")]
    SpoolBusy {
        /// The directory.
        dir: PathBuf,
        /// Who holds it.
        detail: String,
    },
    /// A thread could not be started.
    #[error("cannot start thread: {0}")]
    Thread(io::Error),
}

fn spool_err(dir: &Path) -> impl FnOnce(io::Error) -> EdgeError + '_ {
    move |error| {
        if error.kind() == io::ErrorKind::WouldBlock {
            EdgeError::SpoolBusy {
                dir: dir.to_path_buf(),
                detail: error.to_string(),
            }
        } else {
            EdgeError::Spool {
                dir: dir.to_path_buf(),
                error,
            }
        }
    }
}

fn lock(outbox: &Mutex<Outbox>) -> std::sync::MutexGuard<'_, Outbox> {
    outbox.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes buffered readings and fsyncs them outside the lock. Failures
/// (disk full, card errors) are retried on the next call and logged at
/// most once a minute (`last_error`).
fn flush_outbox(outbox: &Mutex<Outbox>, last_error: &mut Option<Instant>) {
    let started = Instant::now();
    let mut report = |what: &str, e: io::Error| {
        if last_error.map_or(true, |t| t.elapsed() >= Duration::from_secs(60)) {
            log::error!("spool: {what} failed: {e} (readings stay in memory and are retried)");
            *last_error = Some(Instant::now());
        }
    };
    let files = match lock(outbox).flush() {
        Ok(f) => f,
        Err(e) => return report("write", e),
    };
    if let Err(e) = sync_files(files) {
        report("fsync", e);
    }
    log::trace!(
        "spool: synced in {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
}

fn status_line(state: &LinkState, outbox: &Mutex<Outbox>, hold: HoldCounts) -> String {
    let st = lock(outbox).stats();
    let link = match state {
        LinkState::Starting => "STARTING".to_string(),
        LinkState::Connected => "CONNECTED".to_string(),
        LinkState::Retrying(why) => format!("RETRYING ({why})"),
    };
    let mut s = format!("{link}; outbox {} readings", st.depth);
    if hold.held > 0 {
        s.push_str(&format!(", {} held for clock sync", hold.held));
    }
    if hold.dropped > 0 {
        s.push_str(&format!(
            ", {} dropped (clock-sync hold full)",
            hold.dropped
        ));
    }
    if st.dropped_full > 0 {
        s.push_str(&format!(", {} dropped (spool full)", st.dropped_full));
    }
    s
}

/// Readings held by the sampler's [`ClockGate`] (for the status line).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct HoldCounts {
    /// Held now, waiting for clock sync.
    held: u64,
    /// Dropped because the hold was full.
    dropped: u64,
}

impl HoldCounts {
    fn load(held: &AtomicU64, dropped: &AtomicU64) -> HoldCounts {
        HoldCounts {
            held: held.load(Ordering::Relaxed),
            dropped: dropped.load(Ordering::Relaxed),
        }
    }
}

/// Runs the edge until `shutdown` is triggered: opens the spool and the
/// meters, starts the sampler and the link, then flushes the spool on a
/// fixed cadence. Returns `Ok` after an orderly shutdown.
pub fn run(config: Config, token: DeviceToken, shutdown: Shutdown) -> Result<(), EdgeError> {
    let origin = Instant::now();
    let tls = link::tls_config(config.ca_file.as_deref())?;
    let dir = config.spool_dir.clone();
    // One process per spool: locked before anything in it is touched.
    let dir_lock = state_dir::DirLock::acquire(&dir).map_err(spool_err(&dir))?;
    let state = StateDir::new(&dir);
    state.claim(&config.device_id).map_err(spool_err(&dir))?;
    if !config.hub.tls {
        log::warn!(
            "hub_url uses ws:// (allow_insecure = true): readings and the device token travel unencrypted"
        );
    }
    let outbox = Outbox::open_locked(dir_lock, config.spool_max_bytes, config.link.max_in_flight)
        .map_err(spool_err(&dir))?;
    let recovered = outbox.stats().depth;
    let outbox = Arc::new(Mutex::new(outbox));
    let epoch = clock::epoch::next_epoch(&state).map_err(spool_err(&dir))?;
    log::info!(
        "ems-edge {} device {} epoch {epoch}; spool {} ({recovered} unacknowledged readings recovered)",
        env!("CARGO_PKG_VERSION"),
        config.device_id,
        dir.display()
    );

    let meters: Vec<MeterSlot> = config
        .meters
        .iter()
        .map(|m| MeterSlot::new(m.clone(), dir.clone()))
        .collect();
    let opened = meters.iter().filter(|m| m.is_open()).count();

    let sampler_beat = Arc::new(AtomicU64::new(0));
    let link_beat = Arc::new(AtomicU64::new(0));
    let link_state = Arc::new(Mutex::new(LinkState::Starting));
    let mut gate = ClockGate::new(MAX_HELD);
    clock::held::restore(&state, &mut gate);
    let held = Arc::new(AtomicU64::new(0));
    let held_dropped = Arc::new(AtomicU64::new(0));

    let sampler = Sampler {
        meters,
        interval: config.sample_interval,
        gate,
        probe: Box::new(SystemSync::new(
            config.trust_clock,
            config.clock_sync_file.clone(),
        )),
        epoch,
        next_seq: 0,
        outbox: outbox.clone(),
        shutdown: shutdown.clone(),
        heartbeat: sampler_beat.clone(),
        origin,
        held: held.clone(),
        held_dropped: held_dropped.clone(),
    };
    let sampler = std::thread::Builder::new()
        .name("sampler".into())
        .spawn(move || sampler.run())
        .map_err(EdgeError::Thread)?;

    let link_stop = Shutdown::new();
    let link = Link {
        target: Target {
            hub: config.hub.clone(),
            token,
            tls,
            connect_timeout: config.link.connect_timeout,
        },
        cfg: config.link.clone(),
        outbox: outbox.clone(),
        shutdown: link_stop.clone(),
        state: link_state.clone(),
        heartbeat: link_beat.clone(),
        origin,
    };
    let link = std::thread::Builder::new()
        .name("link".into())
        .spawn(move || link.run())
        .map_err(EdgeError::Thread)?;

    notify::ready(&format!(
        "started: {opened}/{} meters open; connecting to {}",
        config.meters.len(),
        config.hub.url
    ));
    let watchdog = notify::watchdog_interval();
    let tick = config
        .spool_sync_interval
        .min(Duration::from_secs(1))
        .min(watchdog.map_or(Duration::MAX, |w| w / 2));
    let mut next_sync = Instant::now() + config.spool_sync_interval;
    let mut next_watermark = Instant::now() + WATERMARK_EVERY;
    let mut last_status = String::new();
    let mut last_spool_error = None;
    // Loops count as alive if they beat within these windows.
    let sampler_window = (config.sample_interval * 3).max(Duration::from_secs(10));
    let link_window = config.link.connect_timeout + Duration::from_secs(15);

    while !shutdown.wait(tick) {
        let now = Instant::now();
        if now >= next_sync {
            flush_outbox(&outbox, &mut last_spool_error);
            next_sync = now + config.spool_sync_interval;
        }
        if now >= next_watermark {
            if let Err(e) = lock(&outbox).persist_watermark() {
                log::warn!("spool: cannot save the ack watermark: {e}");
            }
            next_watermark = now + WATERMARK_EVERY;
        }
        let since = |beat: &AtomicU64| {
            let at = Duration::from_millis(beat.load(Ordering::Relaxed));
            origin.elapsed().saturating_sub(at)
        };
        if since(&sampler_beat) < sampler_window && since(&link_beat) < link_window {
            notify::watchdog();
        }
        let state = link_state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let line = status_line(&state, &outbox, HoldCounts::load(&held, &held_dropped));
        if line != last_status {
            notify::status(&line);
            last_status = line;
        }
    }

    // Orderly shutdown: stop sampling, persist, close the link.
    let stop_started = Instant::now();
    notify::stopping();
    log::info!("shutting down: stopping sampling, persisting the outbox, closing the link");
    let gate = join_until(
        sampler,
        stop_started + Duration::from_millis(1500),
        "sampler",
    );
    let hold_report = gate
        .map(|g| clock::held::stash(&state, &g))
        .unwrap_or_default();
    flush_outbox(&outbox, &mut last_spool_error);
    link_stop.trigger();
    join_until(
        link,
        stop_started + SHUTDOWN_BUDGET - Duration::from_millis(500),
        "link",
    );
    flush_outbox(&outbox, &mut last_spool_error);
    let mut ob = lock(&outbox);
    if let Err(e) = ob.persist_watermark() {
        log::warn!("spool: cannot save the ack watermark: {e}");
    }
    let depth = ob.stats().depth;
    drop(ob);
    notify::status(&format!(
        "stopped; outbox {depth} readings kept{hold_report}"
    ));
    log::info!(
        "stopped after {:.0} ms; {depth} readings kept in the spool for the next start{hold_report}",
        stop_started.elapsed().as_secs_f64() * 1e3,
    );
    Ok(())
}

/// Joins `handle` if it finishes before `deadline`; otherwise leaves it
/// (the process is exiting anyway).
fn join_until<T>(handle: JoinHandle<T>, deadline: Instant, name: &str) -> Option<T> {
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            log::warn!("{name} thread did not stop in time; exiting without it");
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    match handle.join() {
        Ok(v) => Some(v),
        Err(_) => {
            log::error!("{name} thread panicked");
            None
        }
    }
}
