//! Readiness, liveness and shutdown for systemd (`Type=notify`, see
//! `systemd/ems-hub.service`):
//!
//! - `READY=1` once the hub listens and the store answered (the tokens are
//!   loaded and the writer has its connection). A hub that starts before
//!   its database says so in `STATUS=` until then.
//! - `WATCHDOG=1` every half `WatchdogSec=` while both the accept loop and
//!   the store writer make progress: the accept loop turned within the
//!   last interval, and the writer's queue is empty or it committed (or
//!   failed and retried) since the last ping. A stuck loop or a wedged
//!   writer stops the pings and systemd restarts the hub. A writer that
//!   keeps retrying through a database outage is progress: the hub rides
//!   the outage out instead of being restarted into it.
//! - `STOPPING=1` when a graceful shutdown begins.
//!
//! Nothing is sent unless [`crate::Config::sd_notify`] is on (the binary
//! turns it on) and systemd gave a `NOTIFY_SOCKET`. Failures to notify are
//! logged at debug level only.

use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::metrics::Metrics;
use crate::shutdown::shutting_down;
use crate::state::Shared;

/// The process's monotonic clock origin for the liveness stamps.
static START: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    u64::try_from(START.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Sends `state` when notifications are on.
fn send(on: bool, state: &[NotifyState]) {
    if !on {
        return;
    }
    if let Err(e) = sd_notify::notify(false, state) {
        log::debug!("sd_notify failed: {e}");
    }
}

/// The accept loop's liveness stamp.
pub(crate) struct Alive(Arc<Metrics>);

impl Alive {
    /// The stamp of `shared`'s accept loop.
    pub(crate) fn accept_loop(shared: &Shared) -> Alive {
        Alive(shared.metrics.clone())
    }

    /// The loop turned.
    pub(crate) fn beat(&self) {
        self.0
            .hardening
            .accept_alive_ms
            .store(now_ms(), Ordering::Relaxed);
    }
}

/// `STOPPING=1`.
pub(crate) fn stopping(shared: &Shared) {
    send(shared.config.sd_notify, &[NotifyState::Stopping]);
}

/// Sends `READY=1` once the store answered (see the module docs), then
/// the watchdog pings until the hub shuts down.
pub(crate) async fn run(shared: Arc<Shared>) {
    if !shared.config.sd_notify {
        return;
    }
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        log::debug!("not started by systemd with Type=notify: no readiness or watchdog messages");
        return;
    }
    let mut shutdown = shared.shutdown.clone();
    let mut said_waiting = false;
    loop {
        if shared.auth.fresh() && shared.metrics.ready_store() {
            break;
        }
        if !said_waiting {
            send(
                true,
                &[NotifyState::Status("listening; waiting for the store")],
            );
            said_waiting = true;
        }
        tokio::select! {
            _ = shutting_down(&mut shutdown) => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    send(true, &[NotifyState::Ready, NotifyState::Status("serving")]);
    log::info!("ready (told systemd)");
    let Some(interval) = watchdog_interval() else {
        return;
    };
    let every = interval / 2;
    let mut writer = WriterProgress::new(&shared);
    let mut complained = false;
    loop {
        tokio::select! {
            _ = shutting_down(&mut shutdown) => return,
            _ = tokio::time::sleep(every) => {}
        }
        let accept_age = now_ms().saturating_sub(
            shared
                .metrics
                .hardening
                .accept_alive_ms
                .load(Ordering::Relaxed),
        );
        let accepting = Duration::from_millis(accept_age) <= every.max(Duration::from_secs(2));
        let writing = writer.moved(&shared);
        if accepting && writing {
            send(true, &[NotifyState::Watchdog]);
            complained = false;
        } else if !complained {
            log::error!(
                "not telling systemd we are alive: {}",
                if accepting {
                    "the store writer made no progress"
                } else {
                    "the accept loop stalled"
                }
            );
            complained = true;
        }
    }
}

/// The watchdog interval systemd expects (`WATCHDOG_USEC`), unless it is
/// meant for another process (`WATCHDOG_PID`).
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Whether the store writer moved between two watchdog ticks.
struct WriterProgress {
    /// Commits plus failed attempts at the last tick.
    mark: u64,
}

impl WriterProgress {
    fn new(shared: &Shared) -> Self {
        WriterProgress {
            mark: Self::attempts(&shared.metrics),
        }
    }

    fn attempts(m: &Metrics) -> u64 {
        m.batch_size
            .count()
            .saturating_add(m.commit_failures.load(Ordering::Relaxed))
    }

    /// Idle (nothing queued) or committed/retried since the last call.
    fn moved(&mut self, shared: &Shared) -> bool {
        let now = Self::attempts(&shared.metrics);
        let idle = shared.queue.capacity() == shared.queue.max_capacity();
        let moved = idle || now != self.mark;
        self.mark = now;
        moved
    }
}
