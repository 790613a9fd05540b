//! The main thread: [`run`] starts the edge, supervises it, and stops it.
//!
//! - **Start**: lock and claim the state directory, recover the outbox from
//!   the spool, pick the epoch, open the meters, restore readings held for
//!   clock sync, start the sampler and the link threads, tell systemd
//!   READY.
//! - **Supervise**, until the shutdown signal: sync the spool when it is
//!   due — write the readings the hub has not acknowledged
//!   `spool_sync_interval_ms` after they were taken and fsync them (and
//!   retry at that interval while the card refuses writes) — and raise
//!   the energy ceilings at once when the sampler rings (the outbox's
//!   [`SyncBell`](crate::outbox::SyncBell)): a raise saves the ceiling
//!   file alone (one page, one fsync) unless the spool is due anyway, so
//!   the readings in flight keep their own due time. Between syncs it
//!   sleeps: no fixed tick, a reading acked in time never wakes it
//!   ([`due`](crate::outbox::due)). The power-loss window for readings
//!   the hub has not acknowledged stays at most `spool_sync_interval_ms`
//!   plus one sample interval (about 2 s at the defaults; see
//!   `docs/decisions/edge-fsync-cadence.md`). A sync also saves the ack
//!   watermark and deletes segments when acks moved over readings on
//!   disk. Feed the systemd watchdog while both threads beat, and keep the
//!   `STATUS=` line current. The threads report through one shared
//!   [`Health`].
//! - **Stop**, within 5 s of SIGTERM, well inside the unit's
//!   `TimeoutStopSec=15s` after which systemd would SIGKILL and lose the
//!   unwritten buffer: stop sampling, save what the clock gate still holds,
//!   flush, let the link send what it can and wait for the last acks, flush
//!   again, save the watermark and lower the energy ceilings to the exact
//!   last values (so the next start adds nothing to any counter).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::ceiling::file::Found;
use crate::clock::{self, ClockGate, SystemSync};
use crate::config::{Config, ConfigError, DeviceToken};
use crate::health::{Health, HoldCounts, LinkState};
use crate::link::{self, Conduit, Link, Target};
use crate::notify;
use crate::outbox::{Outbox, OutboxStats, SharedOutbox};
use crate::sampler::{MeterSlot, Sampler};
use crate::shutdown::Shutdown;
use crate::state_dir::{DirLock, StateDir};

/// Readings held in memory while the clock is unsynchronized: a day at 1 Hz.
const MAX_HELD: usize = 86_400;
/// Budget for the whole shutdown, half a second under the 5 s promised.
const SHUTDOWN_BUDGET: Duration = Duration::from_millis(4500);
/// Part of the budget the sampler gets to finish its tick.
const SAMPLER_STOP: Duration = Duration::from_millis(1500);
/// Part of the budget kept for the final flush after the link stopped.
const FINAL_FLUSH: Duration = Duration::from_millis(500);
/// The supervisor wakes at least this often with nothing due (watchdog,
/// status line).
const IDLE_WAKE: Duration = Duration::from_secs(10);
/// Spool write errors are logged at most this often.
const SPOOL_ERROR_LOG_EVERY: Duration = Duration::from_secs(60);

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
    /// The link's wake-up descriptor (an eventfd) could not be created.
    #[error("cannot create the link's wake-up eventfd: {0}")]
    Wake(io::Error),
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

/// Runs the edge until `shutdown` is triggered: opens the spool and the
/// meters, starts the sampler and the link, then syncs the spool when
/// readings fall due. Returns `Ok` after an orderly shutdown.
pub fn run(config: Config, token: DeviceToken, shutdown: Shutdown) -> Result<(), EdgeError> {
    let (mut edge, threads) = Running::start(config, token, &shutdown)?;
    edge.supervise(&shutdown);
    edge.stop(threads);
    Ok(())
}

/// The running edge, as the main thread holds it.
struct Running {
    /// The configuration it runs with.
    config: Config,
    /// The state directory (locked by the outbox's spool).
    state: StateDir,
    /// Where the sampler puts readings and the link takes them.
    outbox: SharedOutbox,
    /// What the threads report.
    health: Arc<Health>,
    /// Last time a spool write error was logged.
    last_spool_error: Option<Instant>,
    /// The last spool sync failed, and its error was logged (to log the
    /// recovery once; a failure inside the minute after a logged one is
    /// not logged, nor is its recovery).
    spool_failing: bool,
}

/// The two threads the supervisor starts and stops.
struct Threads {
    /// The sampler; it returns the clock gate with what it still holds.
    sampler: JoinHandle<ClockGate>,
    /// The link.
    link: JoinHandle<()>,
    /// Stops the link: triggered only after the sampler has stopped, so
    /// the last readings go out before the close.
    link_stop: Shutdown,
}

impl Running {
    /// Opens the state directory and the meters and starts both threads.
    fn start(
        config: Config,
        token: DeviceToken,
        shutdown: &Shutdown,
    ) -> Result<(Self, Threads), EdgeError> {
        let health = Arc::new(Health::new());
        let tls = link::tls_config(config.ca_file.as_deref())?;
        let (state, outbox, epoch) = open_state(&config)?;
        // The link's socket side, shared with the sampler's fast path.
        let conduit = Arc::new(Conduit::new(&config.link));
        let (sampler, opened) =
            start_sampler(&config, &state, epoch, &outbox, &conduit, shutdown, &health)?;
        let link_stop = Shutdown::new();
        // The link sleeps in poll(2), the supervisor on its sync bell:
        // both are woken by their stop signals.
        let wake = outbox.wake().clone();
        link_stop.on_trigger(move || wake.notify());
        let bell = outbox.bell().clone();
        shutdown.on_trigger(move || bell.ring());
        let link = Link {
            target: Target {
                hub: config.hub.clone(),
                token,
                tls,
                connect_timeout: config.link.connect_timeout,
                ack_window: config.ack_window,
            },
            cfg: config.link.clone(),
            outbox: outbox.clone(),
            conduit,
            shutdown: link_stop.clone(),
            health: health.clone(),
        };
        let link = spawn("link", move || link.run())?;
        notify::ready(&format!(
            "started: {opened}/{} meters open; connecting to {}",
            config.meters.len(),
            config.hub.url
        ));
        let running = Running {
            config,
            state,
            outbox,
            health,
            last_spool_error: None,
            spool_failing: false,
        };
        let threads = Threads {
            sampler,
            link,
            link_stop,
        };
        Ok((running, threads))
    }

    /// The main loop, until `shutdown`: spool sync when due, watermark,
    /// watchdog, status line. It sleeps until the oldest reading that is
    /// neither acked nor written is due (`spool_sync_interval` after it was
    /// taken), until acks leave spool housekeeping (done without a sync),
    /// or at the latest
    /// [`IDLE_WAKE`] (half the watchdog period if shorter); the sampler
    /// nudges it when a reading falls due earlier, and rings it for a
    /// ceiling raise, which saves the ceilings alone unless the spool is
    /// due too ([`sync_kind`]). Spool syncs follow each other at least
    /// `spool_sync_interval` apart (a failing card is retried at that
    /// pace).
    fn supervise(&mut self, shutdown: &Shutdown) {
        let sync_every = self.config.spool_sync_interval;
        let watchdog = notify::watchdog_interval();
        let idle = IDLE_WAKE.min(watchdog.map_or(Duration::MAX, |w| w / 2));
        let mut last_sync = Instant::now();
        let mut last_housekeeping = last_sync;
        let mut last_status = String::new();
        // The threads count as alive if they beat within these windows.
        let sampler_window = (self.config.sample_interval * 3).max(Duration::from_secs(10));
        let link_window = self.config.link.connect_timeout + Duration::from_secs(15);

        loop {
            let wake = {
                let mut ob = self.outbox.lock();
                let housekeeping = ob
                    .housekeeping_due()
                    .then(|| last_sync.max(last_housekeeping) + sync_every);
                let now = Instant::now();
                let wake = next_wake(
                    now,
                    idle,
                    last_sync + sync_every,
                    ob.sync_due_at(now),
                    housekeeping,
                );
                ob.plan_wake(Some(wake));
                wake
            };
            // Rung: a ceiling raise is wanted now (or the stop).
            let rung = self.outbox.bell().wait_until(wake);
            let due = {
                let mut ob = self.outbox.lock();
                ob.plan_wake(None);
                let now = Instant::now();
                let due =
                    now >= last_sync + sync_every && ob.sync_due_at(now).is_some_and(|d| now >= d);
                if !due && ob.housekeeping_due() {
                    // Not a sync: it would write the reading in flight now.
                    ob.housekeep();
                    last_housekeeping = now;
                }
                due
            };
            if shutdown.is_triggered() {
                break;
            }
            match sync_kind(due, rung) {
                Some(SyncKind::Spool) => {
                    self.sync_spool();
                    last_sync = Instant::now();
                }
                Some(SyncKind::CeilingsOnly) => self.raise_ceilings(),
                None => {}
            }
            if self.health.alive(sampler_window, link_window) {
                notify::watchdog();
            }
            let stats = self.outbox.lock().stats();
            let line = status_line(&self.health.link_state(), stats, self.health.hold());
            if line != last_status {
                notify::status(&line);
                last_status = line;
            }
        }
    }

    /// Orderly shutdown: stop sampling, persist, close the link.
    fn stop(mut self, threads: Threads) {
        let started = Instant::now();
        notify::stopping();
        log::info!("shutting down: stopping sampling, persisting the outbox, closing the link");
        let gate = join_until(threads.sampler, started + SAMPLER_STOP, "sampler");
        let hold_report = gate
            .map(|g| clock::held::stash(&self.state, &g))
            .unwrap_or_default();
        self.sync_spool();
        threads.link_stop.trigger();
        join_until(
            threads.link,
            started + SHUTDOWN_BUDGET - FINAL_FLUSH,
            "link",
        );
        self.sync_spool();
        self.save_watermark();
        if let Err(e) = self.outbox.save_exact_ceilings() {
            log::warn!(
                "energy ceiling: cannot save the exact counters at stop: {e}; after this stop a counter may continue from its last ceiling (at most {} s of energy ahead)",
                self.config.energy_headroom.as_secs()
            );
        }
        let st = self.outbox.lock().stats();
        let depth = st.depth;
        notify::status(&format!(
            "stopped; outbox {depth} readings kept{hold_report}"
        ));
        log::info!(
            "stopped after {:.0} ms; {depth} readings kept in the spool for the next start{hold_report}; {}",
            started.elapsed().as_secs_f64() * 1e3,
            loss_report(st),
        );
    }

    /// Writes buffered readings and fsyncs them. Failures (disk full, card
    /// errors) are retried on the next call and logged at most once a
    /// minute, also when a nearly full card fails, recovers and fails
    /// again (acked segments deleted make room for a while); the recovery
    /// after a logged failure is logged once.
    fn sync_spool(&mut self) {
        let started = Instant::now();
        let done = self.outbox.sync();
        match done.spool {
            Err(e) => {
                let due = self
                    .last_spool_error
                    .map_or(true, |t| t.elapsed() >= SPOOL_ERROR_LOG_EVERY);
                if due {
                    let st = self.outbox.lock().stats();
                    log::error!(
                        "spool: {e}; {} readings wait in memory (the oldest are dropped beyond {} bytes, counted) and are written when space frees",
                        st.unwritten,
                        self.outbox.lock().unwritten_max()
                    );
                    self.last_spool_error = Some(Instant::now());
                    self.spool_failing = true;
                }
            }
            Ok(()) => {
                if std::mem::take(&mut self.spool_failing) {
                    if done.wrote {
                        log::warn!(
                            "spool: writable again; the readings held in memory are on disk"
                        );
                    } else {
                        // The retry found every reading acknowledged:
                        // the episode ends untested; the next reading
                        // that needs writing tries the card.
                        log::warn!("spool: writable again (nothing was left to write: the hub acknowledged the readings held in memory)");
                    }
                }
                if done.syncs > 0 {
                    log::trace!(
                        "spool: {} files synced in {:.1} ms",
                        done.syncs,
                        started.elapsed().as_secs_f64() * 1e3
                    );
                }
            }
        }
    }

    /// Raises the energy ceilings alone (rung, no spool sync due): one
    /// page and one fsync; the spool and the watermark are left for their
    /// own due times. A failed save is logged by the outbox, which then
    /// releases the held-back readings anyway.
    fn raise_ceilings(&mut self) {
        let started = Instant::now();
        let done = self.outbox.sync_ceilings();
        if done.syncs > 0 {
            log::trace!(
                "energy ceiling raised alone in {:.1} ms",
                started.elapsed().as_secs_f64() * 1e3
            );
        }
    }

    fn save_watermark(&self) {
        if let Err(e) = self.outbox.lock().persist_watermark() {
            log::warn!("spool: cannot save the ack watermark: {e}");
        }
    }
}

/// Locks and claims the state directory, recovers the outbox from the
/// spool and picks this process's epoch.
fn open_state(config: &Config) -> Result<(StateDir, SharedOutbox, u64), EdgeError> {
    let dir = &config.spool_dir;
    // One process per spool: locked before anything in it is touched.
    let lock = DirLock::acquire(dir).map_err(spool_err(dir))?;
    let state = lock.dir().clone();
    state.claim(&config.device_id).map_err(spool_err(dir))?;
    if !config.hub.tls {
        log::warn!(
            "hub_url uses ws:// (allow_insecure = true): readings and the device token travel unencrypted"
        );
    }
    let mut outbox = Outbox::open_locked(lock, config.spool_max_bytes, config.link.max_in_flight)
        .map_err(spool_err(dir))?;
    outbox.set_energy_headroom(config.energy_headroom, ceiling_lead(config));
    outbox.set_sync_timing(
        config.spool_sync_interval,
        config.ack_window,
        config.sample_interval,
    );
    if outbox.ceiling_found() == Found::Damaged {
        log::warn!(
            "energy ceiling files in {} are damaged: ignored; energy counters continue from their state files and the spool",
            dir.display()
        );
    }
    if let Some(key) = config.ignored_keys.first() {
        log::warn!(
            "{key} in {} is no longer used: ignored",
            config.path.display()
        );
    }
    let recovered = outbox.stats().depth;
    let epoch = clock::epoch::next_epoch(&state).map_err(spool_err(dir))?;
    log::info!(
        "ems-edge {} device {} epoch {epoch}; spool {} ({recovered} unacknowledged readings recovered)",
        env!("CARGO_PKG_VERSION"),
        config.device_id,
        dir.display()
    );
    let outbox = SharedOutbox::new(outbox).map_err(EdgeError::Wake)?;
    Ok((state, outbox, epoch))
}

/// How long before a ceiling runs out it is raised: the next sync may be
/// up to two sync intervals away (a slow card), plus a second.
fn ceiling_lead(config: &Config) -> Duration {
    config.spool_sync_interval * 2 + Duration::from_secs(1)
}

/// Opens the meters, restores the readings a previous process held for
/// clock sync and starts the sampler. Returns it and how many meters
/// opened.
fn start_sampler(
    config: &Config,
    state: &StateDir,
    epoch: u64,
    outbox: &SharedOutbox,
    conduit: &Arc<Conduit>,
    shutdown: &Shutdown,
    health: &Arc<Health>,
) -> Result<(JoinHandle<ClockGate>, usize), EdgeError> {
    let floor = Arc::new(outbox.lock().energy_floor());
    if !floor.is_empty() {
        log::debug!(
            "energy counters of {} meters continue from at least their saved ceilings and the spool's newest readings",
            floor.len()
        );
    }
    let meters: Vec<MeterSlot> = config
        .meters
        .iter()
        .map(|m| MeterSlot::new(m.clone(), config.spool_dir.clone(), floor.clone()))
        .collect();
    let opened = meters.iter().filter(|m| m.is_open()).count();
    let mut gate = ClockGate::new(MAX_HELD);
    clock::held::restore(state, &mut gate);
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
        conduit: conduit.clone(),
        shutdown: shutdown.clone(),
        health: health.clone(),
        own_counters: Default::default(),
    };
    Ok((spawn("sampler", move || sampler.run())?, opened))
}

/// Starts a named thread.
fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, EdgeError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(EdgeError::Thread)
}

/// The `STATUS=` line `systemctl status` shows.
fn status_line(state: &LinkState, st: OutboxStats, hold: HoldCounts) -> String {
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
    if st.unwritten > 0 {
        s.push_str(&format!(
            ", {} in memory (spool not writable)",
            st.unwritten
        ));
    }
    if st.dropped_full > 0 {
        s.push_str(&format!(", {} dropped (spool full)", st.dropped_full));
    }
    if st.dropped_disk_full > 0 {
        s.push_str(&format!(", {} dropped (disk full)", st.dropped_disk_full));
    }
    if st.dropped_damaged > 0 {
        s.push_str(&format!(
            ", {} lost (damaged spool records)",
            st.dropped_damaged
        ));
    }
    s
}

/// Every loss the outbox counted since start, for the final log line.
fn loss_report(st: OutboxStats) -> String {
    format!(
        "since start: {} dropped (spool full), {} dropped (disk full), {} lost (damaged spool records), {} rejected by the hub",
        st.dropped_full, st.dropped_disk_full, st.dropped_damaged, st.rejected
    )
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

/// What a wake-up syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncKind {
    /// The whole sync: the readings due (and those in flight with them),
    /// housekeeping, and a ceiling raise if one is wanted.
    Spool,
    /// The energy ceilings alone (one page, one fsync).
    CeilingsOnly,
}

/// What to sync after a wake-up: the spool when a reading is `due` (which
/// raises a ceiling too if one needs it), the ceilings alone when only
/// `rung` (a raise is wanted now), else nothing. A raise never writes the
/// readings in flight: they keep their own due time.
fn sync_kind(due: bool, rung: bool) -> Option<SyncKind> {
    match (due, rung) {
        (true, _) => Some(SyncKind::Spool),
        (false, true) => Some(SyncKind::CeilingsOnly),
        (false, false) => None,
    }
}

/// When the supervisor wakes next: at `now + idle` at the latest; at a
/// reading's due time but never before the rate limit `earliest_sync`
/// (the last sync plus the interval); when housekeeping is due, at the
/// time given (the last sync or housekeeping plus the interval).
fn next_wake(
    now: Instant,
    idle: Duration,
    earliest_sync: Instant,
    due: Option<Instant>,
    housekeeping: Option<Instant>,
) -> Instant {
    let mut wake = now + idle;
    if let Some(due) = due {
        wake = wake.min(due.max(earliest_sync));
    }
    if let Some(at) = housekeeping {
        wake = wake.min(at);
    }
    wake
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_supervisor_sleeps_until_a_reading_is_due_and_syncs_at_most_once_per_interval() {
        let now = Instant::now();
        let idle = Duration::from_secs(10);
        let s = Duration::from_secs(1);
        // Nothing pending: the idle wake-up.
        assert_eq!(next_wake(now, idle, now + s, None, None), now + idle);
        // A reading due in 0.7 s, the last sync long ago.
        let due = now + Duration::from_millis(700);
        assert_eq!(next_wake(now, idle, now - s, Some(due), None), due);
        // Due at once, but a sync ran 0.2 s ago: not before the interval.
        assert_eq!(
            next_wake(now, idle, now + Duration::from_millis(800), Some(now), None),
            now + Duration::from_millis(800)
        );
        // Housekeeping (acks over readings on disk) at the interval.
        assert_eq!(next_wake(now, idle, now + s, None, Some(now + s)), now + s);
    }

    #[test]
    fn a_ceiling_raise_syncs_the_ceilings_alone_unless_the_spool_is_due() {
        assert_eq!(sync_kind(false, true), Some(SyncKind::CeilingsOnly));
        assert_eq!(sync_kind(true, true), Some(SyncKind::Spool));
        assert_eq!(sync_kind(true, false), Some(SyncKind::Spool));
        assert_eq!(sync_kind(false, false), None);
    }

    #[test]
    fn status_line_names_the_link_state_and_every_loss() {
        let stats = OutboxStats {
            depth: 12,
            ..Default::default()
        };
        let none = HoldCounts::default();
        assert_eq!(
            status_line(&LinkState::Connected, stats, none),
            "CONNECTED; outbox 12 readings"
        );
        let lossy = OutboxStats {
            dropped_full: 4,
            ..stats
        };
        let hold = HoldCounts {
            held: 3,
            dropped: 2,
        };
        assert_eq!(
            status_line(&LinkState::Retrying("hub down".into()), lossy, hold),
            "RETRYING (hub down); outbox 12 readings, 3 held for clock sync, 2 dropped (clock-sync hold full), 4 dropped (spool full)"
        );
        let disk = OutboxStats {
            unwritten: 7,
            dropped_disk_full: 5,
            dropped_damaged: 1,
            ..stats
        };
        assert_eq!(
            status_line(&LinkState::Connected, disk, none),
            "CONNECTED; outbox 12 readings, 7 in memory (spool not writable), 5 dropped (disk full), 1 lost (damaged spool records)"
        );
    }
}
