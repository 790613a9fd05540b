//! The sampling thread: reads every meter on a drift-free schedule, stamps
//! the readings (through the [`ClockGate`]) and appends them to the outbox.
//!
//! - Tick `k` is due at `start + k·interval`, computed from the start, so
//!   errors never accumulate; ticks missed because a read overran are skipped
//!   (and counted in a log line), never bunched.
//! - The thread never waits for the network. After an append it writes the
//!   new reading to the hub's socket itself when it can do so at once
//!   ([`Conduit::try_send`](crate::link::Conduit::try_send): a `try_lock`
//!   on the link's socket side, a non-blocking socket, nothing else
//!   waiting): the link thread then sleeps on until the ack, one thread
//!   wake-up per reading fewer. Otherwise it signals the link's wake-up
//!   descriptor (an eventfd write) and the link sends. It never handles a
//!   failure of the link: a write error is left for the link thread, which
//!   ends the connection. Besides, it takes the outbox mutex, which nobody
//!   holds across socket I/O or a wait for the card.
//! - A meter that fails to open or read is retried on the next tick; other
//!   meters keep going; log lines about a failing meter are rate-limited.
//!   A panicking driver is caught and treated like a read error.
//! - A measurement the hub would refuse (a value outside the wire range) is
//!   still sent: the hub quarantines it where an operator sees it, and the
//!   edge deletes it once the refusal arrives. Dropping it here would lose
//!   it without a trace. The warning about it is rate-limited like the
//!   failure messages.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::clock::{ClockGate, Stamped, SyncProbe};
use crate::health::{Health, HoldCounts};
use crate::link::Conduit;
use crate::meters::persist::EnergyFloor;
use crate::meters::{Measurement, Meter, MeterConfig, MeterError};
use crate::outbox::SharedOutbox;
use crate::platform;
use crate::shutdown::Shutdown;

/// Minimum time between two log lines about the same failing meter.
const METER_LOG_EVERY: Duration = Duration::from_secs(60);

/// One configured meter, opened lazily and reopened after failures.
pub struct MeterSlot {
    /// Its config.
    cfg: MeterConfig,
    /// The open meter, if any.
    meter: Option<Box<dyn Meter>>,
    /// Directory where a meter may keep state.
    state_dir: PathBuf,
    /// Last time a failure was logged.
    last_log: Option<Instant>,
    /// Failures not logged since then.
    suppressed: u64,
    /// Currently failing (to log the recovery).
    failing: bool,
    /// Where energy counters continue from (the spool's newest readings).
    floor: Arc<EnergyFloor>,
    /// Last time an out-of-range measurement was logged.
    last_invalid_log: Option<Instant>,
    /// Out-of-range measurements not logged since then.
    invalid_suppressed: u64,
}

impl MeterSlot {
    /// A slot for `cfg`; opens it now if possible (failures are retried).
    /// Every time it opens, the meter's energy counters continue from at
    /// least `floor`.
    pub fn new(cfg: MeterConfig, state_dir: PathBuf, floor: Arc<EnergyFloor>) -> Self {
        let mut slot = MeterSlot {
            cfg,
            meter: None,
            state_dir,
            last_log: None,
            suppressed: 0,
            failing: false,
            floor,
            last_invalid_log: None,
            invalid_suppressed: 0,
        };
        if let Err(e) = slot.ensure_open() {
            slot.failed(&e);
        }
        slot
    }

    /// The meter id.
    pub fn id(&self) -> &str {
        self.cfg.id()
    }

    /// Is the meter open?
    pub fn is_open(&self) -> bool {
        self.meter.is_some()
    }

    /// The meter keeps its energy counter itself (see
    /// [`Meter::counts_energy_itself`]).
    pub fn counts_energy_itself(&self) -> bool {
        self.meter
            .as_ref()
            .is_some_and(|m| m.counts_energy_itself())
    }

    fn ensure_open(&mut self) -> Result<(), MeterError> {
        if self.meter.is_none() {
            let cfg = &self.cfg;
            let dir = &self.state_dir;
            let floor = &self.floor;
            let opened = catch_unwind(AssertUnwindSafe(|| {
                let mut meter = platform::open(cfg, dir)?;
                meter.resume_energy(floor);
                Ok(meter)
            }))
            .unwrap_or_else(|_| Err(MeterError::new(cfg.id(), "driver panicked while opening")));
            self.meter = Some(opened?);
        }
        Ok(())
    }

    fn failed(&mut self, e: &MeterError) {
        let now = Instant::now();
        let due = self
            .last_log
            .map_or(true, |t| now.duration_since(t) >= METER_LOG_EVERY);
        if due {
            let hint = e
                .hint
                .as_deref()
                .map(|h| format!(" (hint: {h})"))
                .unwrap_or_default();
            let more = if self.suppressed > 0 {
                format!(
                    " [{} more failures since the last message]",
                    self.suppressed
                )
            } else {
                String::new()
            };
            log::warn!("{e}{hint}; retrying every sample{more}");
            self.last_log = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        self.failing = true;
    }

    /// Reads the meter; errors are logged (rate-limited) and yield nothing.
    pub fn read(&mut self) -> Vec<Measurement> {
        let result = self.ensure_open().and_then(|()| match self.meter.as_mut() {
            Some(m) => catch_unwind(AssertUnwindSafe(|| m.read())).unwrap_or_else(|_| {
                Err(MeterError::new(
                    self.cfg.id(),
                    "driver panicked while reading",
                ))
            }),
            None => Err(MeterError::new(self.cfg.id(), "not open")),
        });
        match result {
            Ok(ms) => {
                if self.failing {
                    log::info!("meter {}: reading again", self.cfg.id());
                    self.failing = false;
                    self.last_log = None;
                    self.suppressed = 0;
                }
                for m in &ms {
                    if let Err(e) = in_wire_range(m) {
                        self.out_of_range(&m.meter, &e);
                    }
                }
                ms
            }
            Err(e) => {
                // Drop the handle so the next tick reopens it (device replugged).
                if e.message.contains("panicked") {
                    self.meter = None;
                }
                self.failed(&e);
                Vec::new()
            }
        }
    }
}

impl MeterSlot {
    /// Logs (rate-limited) a measurement the hub will refuse.
    fn out_of_range(&mut self, meter: &str, e: &ems_shared::FrameError) {
        let now = Instant::now();
        let due = self
            .last_invalid_log
            .map_or(true, |t| now.duration_since(t) >= METER_LOG_EVERY);
        if due {
            let more = if self.invalid_suppressed > 0 {
                format!(" [{} more since the last message]", self.invalid_suppressed)
            } else {
                String::new()
            };
            log::warn!("meter {meter}: values the hub will refuse and quarantine ({e}){more}");
            self.last_invalid_log = Some(now);
            self.invalid_suppressed = 0;
        } else {
            self.invalid_suppressed += 1;
        }
    }
}

/// Whether the hub would accept the measurement's values (its time stamp
/// is not checked here).
fn in_wire_range(m: &Measurement) -> Result<(), ems_shared::FrameError> {
    let r = m.clone().into_reading(0, 0, 0);
    r.validate(i64::MAX - ems_shared::MAX_FUTURE_SKEW_MS)
}

/// Everything the sampling thread needs.
pub struct Sampler {
    /// The meters.
    pub meters: Vec<MeterSlot>,
    /// Sample period.
    pub interval: Duration,
    /// Holds readings until the clock is right.
    pub gate: ClockGate,
    /// Tells whether the clock is right.
    pub probe: Box<dyn SyncProbe>,
    /// This process's epoch.
    pub epoch: u64,
    /// Next seq.
    pub next_seq: u64,
    /// Where readings go.
    pub outbox: SharedOutbox,
    /// The link's socket side: the sampler sends a new reading itself when
    /// the link is idle.
    pub conduit: Arc<Conduit>,
    /// Stop signal.
    pub shutdown: Shutdown,
    /// Heartbeat (watchdog) and hold counts (status line).
    pub health: Arc<Health>,
    /// Reading meter ids whose energy counter is the meter's own (told to
    /// the outbox once each).
    pub own_counters: std::collections::HashSet<String>,
}

impl Sampler {
    /// Runs until shutdown; returns the clock gate with the readings still
    /// held for clock sync (the caller saves them).
    pub fn run(mut self) -> ClockGate {
        let start = Instant::now();
        let mut tick: u64 = 0;
        let mut last_hold_log: Option<Instant> = None;
        loop {
            let offset = self.interval.as_nanos().saturating_mul(u128::from(tick));
            let due = start + Duration::from_nanos(u64::try_from(offset).unwrap_or(u64::MAX));
            if self.shutdown.wait_until(due) {
                break;
            }
            let sampled_at = Instant::now();
            let mut ms = Vec::new();
            for slot in &mut self.meters {
                // A slow meter must not hold the others' readings past the
                // stop (they still go to the outbox below).
                if self.shutdown.is_triggered() {
                    break;
                }
                let read = slot.read();
                if slot.counts_energy_itself() {
                    for m in &read {
                        if self.own_counters.insert(m.meter.clone()) {
                            self.outbox.lock().exempt_from_ceiling(&m.meter);
                        }
                    }
                }
                ms.extend(read);
            }
            let synced = self.probe.is_synchronized();
            let was_synced = self.gate.is_synced();
            let stamped =
                self.gate
                    .offer(sampled_at, ms, synced, (Instant::now(), SystemTime::now()));
            if !self.gate.is_synced() {
                let now = Instant::now();
                if last_hold_log.map_or(true, |t| now.duration_since(t) >= Duration::from_secs(60))
                {
                    log::warn!(
                        "system clock not synchronized yet: holding {} readings until it is ({} dropped: hold full; set trust_clock = true on a system with an RTC)",
                        self.gate.held(),
                        self.gate.dropped()
                    );
                    last_hold_log = Some(now);
                }
            } else if !was_synced && stamped.len() > 1 {
                log::info!(
                    "system clock synchronized: releasing {} held readings",
                    stamped.len()
                );
            }
            self.append(stamped);
            self.publish_hold();
            self.health.sampler_beat();
            // Next tick strictly in the future; skip (not bunch) missed ones.
            let elapsed = start.elapsed().as_nanos();
            let next = (elapsed / self.interval.as_nanos().max(1)) as u64 + 1;
            if next > tick + 1 {
                log::warn!("sampling overran: skipped {} ticks", next - tick - 1);
            }
            tick = next;
        }
        self.publish_hold();
        log::debug!("sampler stopped");
        self.gate
    }

    fn publish_hold(&self) {
        self.health.set_hold(HoldCounts {
            held: self.gate.held() as u64,
            dropped: self.gate.dropped(),
        });
    }

    fn append(&mut self, stamped: Vec<Stamped>) {
        if stamped.is_empty() {
            return;
        }
        let readings: Vec<_> = stamped
            .into_iter()
            .map(|s| {
                let r = s
                    .measurement
                    .into_reading(self.epoch, self.next_seq, s.ts_ms);
                self.next_seq += 1;
                r
            })
            .collect();
        // Never fails: a reading the spool cannot write waits in memory
        // (bounded, counted when dropped). Sends it from this thread when
        // the link is idle; otherwise wakes the link, which sends it at
        // once.
        let conduit = &self.conduit;
        self.outbox
            .append_all(&readings, |outbox| conduit.try_send(outbox));
        for r in &readings {
            log::trace!("sampled epoch {} seq {}", r.epoch, r.seq);
        }
    }
}
