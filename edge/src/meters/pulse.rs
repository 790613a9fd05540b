//! S0 pulse output of a DIN-rail meter (IEC 62053-31), counted on a GPIO.
//!
//! # Wiring
//! An S0 output is an opto-isolated open collector: terminal **S0+** (20+)
//! and **S0−** (20−). The meter closes the switch for ≥ 30 ms per pulse.
//! Connect S0+ to **3.3 V** (pin 1) and S0− to the GPIO (e.g. **GPIO17, pin
//! 11**) with a 10 kΩ pull-down to GND, *or* — the driver's default —
//! S0+ to the GPIO with the Pi's internal pull-up enabled and S0− to GND
//! (pin 9). With the default (pull-up) wiring a pulse pulls the pin low and
//! the driver counts **falling edges**. Never feed the S0 circuit from 5 V or
//! from the meter's own supply: GPIOs are 3.3 V only. The service user needs
//! the `gpio` group (`/dev/gpiochip*`).
//!
//! # Counting
//! - Energy = pulses / `pulses_per_kwh` kWh, from a counter persisted in
//!   `<state_dir>/<id>.pulses` (atomic write, at most every 15 minutes and on
//!   shutdown; after a power cut the count continues from the meter's energy
//!   ceiling, never below what was sent; see [`super::persist`]). A restart
//!   continues the count.
//! - Power = 3 600 000 / (`pulses_per_kwh` · interval in s) W from the last
//!   interval between two pulses (1000 imp/kWh, 1.8 s → 2000 W). When no pulse
//!   has come for longer than that interval, the power reported decays as if
//!   a pulse were arriving now (an upper bound on the real power), so a load
//!   switching off shows up without waiting for a pulse that never comes.
//! - Debounce: edges within `debounce_ms` of the last counted pulse are
//!   contact bounce and ignored (rppal also passes the debounce period to the
//!   kernel's GPIO line configuration).
//!
//! # Missed and spurious events
//! - An interval shorter than the one implied by `max_power_w` (at 1000
//!   imp/kWh and 20 kW: 0.18 s) but longer than the debounce is physically
//!   impossible for the installation: it is counted as *rejected* (noise on
//!   the S0 line) and not as energy.
//! - The kernel numbers GPIO events (`seqno`); a gap in the numbering means
//!   the event queue overflowed and edges were lost: those are counted as
//!   *missed* and added to the count (the lost edges were real pulses as far
//!   as anyone can tell), with a warning in the log.
//!
//! Both counters are logged when they change; the pure counting logic
//! ([`PulseCounter`]) is independent of rppal and tested with scripted
//! timestamps and embedded-hal-mock pins ([`PinPoller`]).

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use embedded_hal::digital::InputPin;
use serde::Deserialize;

use super::persist::{log_resumed, EnergyFloor, StateFile};
use super::{plausible, Measurement, Meter, MeterError};

/// Input bias.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pull {
    /// Internal pull-up, S0 switches the pin to GND (default).
    #[default]
    Up,
    /// Internal pull-down, S0 switches the pin to 3.3 V (rising edges).
    Down,
    /// External resistor; falling edges are counted.
    None,
}

/// `kind = "pulse"` config table.
///
/// ```toml
/// [[meter]]
/// id = "heatpump"
/// kind = "pulse"
/// pin = 17               # BCM number (header pin 11)
/// pulses_per_kwh = 1000
/// debounce_ms = 20
/// max_power_w = 20000
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PulseConfig {
    /// Meter id.
    pub id: String,
    /// BCM GPIO number.
    pub pin: u8,
    /// Meter constant printed on the meter (imp/kWh).
    pub pulses_per_kwh: f64,
    /// Debounce window in ms, default 20.
    #[serde(default = "default_debounce_ms")]
    pub debounce_ms: u64,
    /// Largest plausible power in W (rejects noise pulses), default 20 000.
    #[serde(default = "default_max_power_w")]
    pub max_power_w: f64,
    /// Input bias, default `up`.
    #[serde(default)]
    pub pull: Pull,
}

fn default_debounce_ms() -> u64 {
    20
}
fn default_max_power_w() -> f64 {
    20_000.0
}

impl PulseConfig {
    /// Rejects unusable values.
    pub fn validate(&self) -> Result<(), MeterError> {
        if !(self.pulses_per_kwh.is_finite() && self.pulses_per_kwh > 0.0) {
            return Err(MeterError::new(&self.id, "pulses_per_kwh must be > 0"));
        }
        if !(self.max_power_w.is_finite() && self.max_power_w > 0.0) {
            return Err(MeterError::new(&self.id, "max_power_w must be > 0"));
        }
        let min = min_interval(self.pulses_per_kwh, self.max_power_w);
        if Duration::from_millis(self.debounce_ms) >= min {
            return Err(MeterError::new(
                &self.id,
                format!(
                    "debounce_ms {} is not shorter than the pulse interval at max_power_w ({} ms)",
                    self.debounce_ms,
                    min.as_millis()
                ),
            ));
        }
        if self.pin > 53 {
            return Err(MeterError::new(
                &self.id,
                format!("GPIO{} does not exist", self.pin),
            ));
        }
        Ok(())
    }
}

/// Power in W from the interval between two pulses.
pub fn power_from_interval_w(pulses_per_kwh: f64, interval: Duration) -> f64 {
    3_600_000.0 / (pulses_per_kwh * interval.as_secs_f64())
}

/// Energy in Wh of `count` pulses.
pub fn energy_wh(count: u64, pulses_per_kwh: f64) -> f64 {
    count as f64 * 1000.0 / pulses_per_kwh
}

/// Shortest plausible interval between pulses at `max_power_w`.
pub fn min_interval(pulses_per_kwh: f64, max_power_w: f64) -> Duration {
    Duration::from_secs_f64(3_600_000.0 / (pulses_per_kwh * max_power_w))
}

/// What happened to one edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeOutcome {
    /// A pulse, counted.
    Counted,
    /// Within the debounce window of the last pulse: ignored.
    Bounce,
    /// Longer than the debounce but shorter than physically possible: rejected.
    Rejected,
}

/// The pure pulse-counting state machine. Timestamps are on any monotonic
/// timeline (the kernel's event timestamps on the Pi).
#[derive(Debug, Clone)]
pub struct PulseCounter {
    /// Meter constant.
    pulses_per_kwh: f64,
    /// Debounce window.
    debounce: Duration,
    /// Shortest plausible interval.
    min_interval: Duration,
    /// Pulses counted (including the persisted start value).
    count: u64,
    /// Time of the last counted pulse.
    last_pulse: Option<Duration>,
    /// Interval between the last two counted pulses.
    last_interval: Option<Duration>,
    /// Last kernel sequence number seen.
    last_seqno: Option<u32>,
    /// Events lost by the kernel queue (seqno gaps).
    missed: u64,
    /// Pulses rejected as implausibly short.
    rejected: u64,
}

impl PulseCounter {
    /// A counter starting at `start_count` pulses.
    pub fn new(
        pulses_per_kwh: f64,
        debounce: Duration,
        max_power_w: f64,
        start_count: u64,
    ) -> Self {
        PulseCounter {
            pulses_per_kwh,
            debounce,
            min_interval: min_interval(pulses_per_kwh, max_power_w),
            count: start_count,
            last_pulse: None,
            last_interval: None,
            last_seqno: None,
            missed: 0,
            rejected: 0,
        }
    }

    /// Feeds one edge at time `t`.
    pub fn on_edge(&mut self, t: Duration) -> EdgeOutcome {
        if let Some(last) = self.last_pulse {
            let dt = t.saturating_sub(last);
            if dt < self.debounce {
                return EdgeOutcome::Bounce;
            }
            if dt < self.min_interval {
                self.rejected += 1;
                return EdgeOutcome::Rejected;
            }
            self.last_interval = Some(dt);
        }
        self.last_pulse = Some(t);
        self.count += 1;
        EdgeOutcome::Counted
    }

    /// Feeds one kernel event with its sequence number; a gap in the
    /// numbering is counted as missed pulses (and added to the count).
    pub fn on_event(&mut self, t: Duration, seqno: u32) -> EdgeOutcome {
        if let Some(prev) = self.last_seqno {
            let gap = seqno.wrapping_sub(prev).saturating_sub(1);
            if gap > 0 && gap < 1_000_000 {
                self.missed += u64::from(gap);
                self.count += u64::from(gap);
            }
        }
        self.last_seqno = Some(seqno);
        self.on_edge(t)
    }

    /// Pulses counted.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Continues from at least the count whose energy is `wh`.
    pub fn raise_to_energy(&mut self, wh: f64) {
        if !(wh.is_finite() && wh >= 0.0) {
            return;
        }
        // The count that reported `wh` (the small margin absorbs the
        // rounding of count → Wh → count).
        let count = (wh * self.pulses_per_kwh / 1000.0 - 1e-6).ceil();
        if count > 0.0 && count < u64::MAX as f64 {
            self.count = self.count.max(count as u64);
        }
    }

    /// Events lost by the kernel.
    pub fn missed(&self) -> u64 {
        self.missed
    }

    /// Pulses rejected as noise.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Energy in Wh.
    pub fn energy_wh(&self) -> f64 {
        energy_wh(self.count, self.pulses_per_kwh)
    }

    /// Time of the last counted pulse.
    pub fn last_pulse(&self) -> Option<Duration> {
        self.last_pulse
    }

    /// Power at `now` (same timeline as the edges), `None` before two
    /// pulses have been seen.
    pub fn power_w(&self, now: Duration) -> Option<f64> {
        let last = self.last_pulse?;
        let interval = self.last_interval?;
        let since = now.saturating_sub(last);
        Some(power_from_interval_w(
            self.pulses_per_kwh,
            interval.max(since),
        ))
    }
}

/// Polls an embedded-hal input pin and feeds pulse edges (falling edges, or
/// rising with `active_high`) into a [`PulseCounter`]. For HALs without
/// interrupts; on the Pi the driver uses rppal's GPIO interrupts instead.
#[derive(Debug)]
pub struct PinPoller<P> {
    /// The pin.
    pin: P,
    /// Count rising instead of falling edges.
    active_high: bool,
    /// Level at the previous poll.
    last_high: Option<bool>,
}

impl<P: InputPin> PinPoller<P> {
    /// Takes the pin.
    pub fn new(pin: P, active_high: bool) -> Self {
        PinPoller {
            pin,
            active_high,
            last_high: None,
        }
    }

    /// Samples the pin at `now`; an active edge is fed to `counter`.
    pub fn poll(
        &mut self,
        counter: &mut PulseCounter,
        now: Duration,
    ) -> Result<Option<EdgeOutcome>, P::Error> {
        let high = self.pin.is_high()?;
        let prev = self.last_high.replace(high);
        let edge = match prev {
            Some(p) if self.active_high => !p && high,
            Some(p) => p && !high,
            None => false,
        };
        Ok(edge.then(|| counter.on_edge(now)))
    }

    /// Gives the pin back.
    pub fn destroy(self) -> P {
        self.pin
    }
}

/// State shared between the interrupt callback and the meter.
#[derive(Debug)]
pub struct PulseShared {
    /// The counter.
    pub counter: PulseCounter,
    /// Kernel timestamp and local arrival time of the last event, to map
    /// "now" onto the kernel's timeline.
    pub last_event: Option<(Duration, Instant)>,
}

/// Locks the shared state; a poisoned lock (a panicking callback) still
/// holds a consistent counter, so it is used anyway.
pub fn lock(shared: &Mutex<PulseShared>) -> MutexGuard<'_, PulseShared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records one GPIO event (called from the interrupt thread).
pub fn record_event(shared: &Mutex<PulseShared>, t: Duration, seqno: Option<u32>) -> EdgeOutcome {
    let mut s = lock(shared);
    s.last_event = Some((t, Instant::now()));
    match seqno {
        Some(n) => s.counter.on_event(t, n),
        None => s.counter.on_edge(t),
    }
}

/// A pulse meter: shared counter, persistence, and whatever keeps the edge
/// source alive (`H`: the rppal pin with its interrupt thread, on the Pi).
pub struct PulseMeter<H: Send> {
    /// Configured id.
    id: String,
    /// Counter shared with the edge source.
    shared: Arc<Mutex<PulseShared>>,
    /// Persisted count.
    state: StateFile,
    /// Meter constant.
    pulses_per_kwh: f64,
    /// Missed/rejected values already logged.
    reported: (u64, u64),
    /// Keeps the edge source (and its interrupt) alive.
    _source: Option<H>,
}

impl<H: Send> PulseMeter<H> {
    /// Loads the persisted count and creates the shared counter. Attach the
    /// edge source with [`PulseMeter::attach`] and feed it [`PulseMeter::shared`].
    pub fn new(cfg: &PulseConfig, state_dir: &Path) -> Result<Self, MeterError> {
        cfg.validate()?;
        let mut state = StateFile::new(state_dir, &cfg.id, "pulses");
        let start = state
            .load::<u64>()
            .map_err(|e| {
                MeterError::new(&cfg.id, format!("cannot read pulse count: {e}")).with_hint(
                    "fix or delete the state file (deleting restarts the energy counter at 0)",
                )
            })?
            .unwrap_or(0);
        let counter = PulseCounter::new(
            cfg.pulses_per_kwh,
            Duration::from_millis(cfg.debounce_ms),
            cfg.max_power_w,
            start,
        );
        Ok(PulseMeter {
            id: cfg.id.clone(),
            shared: Arc::new(Mutex::new(PulseShared {
                counter,
                last_event: None,
            })),
            state,
            pulses_per_kwh: cfg.pulses_per_kwh,
            reported: (0, 0),
            _source: None,
        })
    }

    /// The shared counter, for the edge source.
    pub fn shared(&self) -> Arc<Mutex<PulseShared>> {
        Arc::clone(&self.shared)
    }

    /// Keeps `source` alive as long as the meter.
    pub fn attach(&mut self, source: H) {
        self._source = Some(source);
    }

    /// Reads at an explicit local instant (tests drive the clock).
    pub fn read_at(&mut self, now: Instant) -> Result<Vec<Measurement>, MeterError> {
        let result = self.read_checked(now);
        if result.is_err() {
            if let Err(e) = self.state.flush_pending() {
                log::warn!("meter {}: cannot persist pulse count: {e}", self.id);
            }
        }
        result
    }

    fn read_checked(&mut self, now: Instant) -> Result<Vec<Measurement>, MeterError> {
        let (count, missed, rejected, power) = {
            let s = lock(&self.shared);
            let power = s.last_event.and_then(|(t, arrived)| {
                s.counter
                    .power_w(t + now.saturating_duration_since(arrived))
            });
            (
                s.counter.count(),
                s.counter.missed(),
                s.counter.rejected(),
                power,
            )
        };
        if (missed, rejected) != self.reported {
            log::warn!(
                "meter {}: {missed} pulses lost by the GPIO event queue, {rejected} rejected as \
                 faster than max_power_w (noise on the S0 line?)",
                self.id
            );
            self.reported = (missed, rejected);
        }
        if let Err(e) = self.state.store(&count.to_string(), now) {
            log::warn!("meter {}: cannot persist pulse count: {e}", self.id);
        }
        let m = Measurement {
            meter: self.id.clone(),
            power_w: power,
            energy_wh: Some(energy_wh(count, self.pulses_per_kwh)),
            ..Default::default()
        };
        plausible::check(&m)?;
        Ok(vec![m])
    }
}

impl<H: Send> Meter for PulseMeter<H> {
    fn id(&self) -> &str {
        &self.id
    }
    fn read(&mut self) -> Result<Vec<Measurement>, MeterError> {
        self.read_at(Instant::now())
    }
    fn resume_energy(&mut self, floor: &EnergyFloor) {
        let Some(f) = floor.get(&self.id) else {
            return;
        };
        let mut s = lock(&self.shared);
        let before = s.counter.energy_wh();
        s.counter.raise_to_energy(f);
        if s.counter.energy_wh() > before {
            log_resumed(&self.id, before, s.counter.energy_wh());
        }
    }
}

impl<H: Send> Drop for PulseMeter<H> {
    fn drop(&mut self) {
        // Stop the edge source first so the final count is final.
        self._source = None;
        let count = lock(&self.shared).counter.count();
        if let Err(e) = self.state.flush(&count.to_string()) {
            log::warn!("meter {}: cannot persist pulse count: {e}", self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulses_1_8_s_apart_at_1000_imp_per_kwh_are_2000_w() {
        let p = power_from_interval_w(1000.0, Duration::from_millis(1800));
        assert!((p - 2000.0).abs() < 1e-9);
    }

    #[test]
    fn the_count_resumes_from_the_spooled_energy() {
        for ppk in [1000.0, 800.0, 3200.0, 0.5] {
            for count in [1u64, 7, 12_345, 987_654_321] {
                let mut c = PulseCounter::new(ppk, Duration::ZERO, 1.0, 0);
                c.raise_to_energy(energy_wh(count, ppk));
                assert_eq!(c.count(), count, "{ppk} imp/kWh");
                // Never lowered.
                c.raise_to_energy(0.0);
                assert_eq!(c.count(), count);
            }
        }
    }

    #[test]
    fn min_interval_at_20kw() {
        assert_eq!(min_interval(1000.0, 20_000.0), Duration::from_millis(180));
    }
}
