//! `kind = "simulated"`: a single-phase household supply for demos and tests.
//!
//! - Voltage around 230 V: a slow drift, noise, and a sag with the load
//!   (0.25 Ω source impedance). Frequency 50 Hz with a bounded random walk.
//! - Active power follows a household day (night base load, a morning peak
//!   around 07:30, a midday plateau, an evening peak around 19:00) at the
//!   configured UTC offset, plus seeded random appliance events (kettle,
//!   oven, washing machine) and noise.
//! - Power factor from ~0.85 at base load (electronics, fridge motor) to
//!   ~0.97 at high resistive load; current and reactive power follow.
//! - The energy counter integrates power over the monotonic time between
//!   reads, so it only ever increases, across restarts too: like the
//!   hardware drivers' counters it is persisted in
//!   `<state_dir>/<id>.energy_wh` (at most every 15 minutes and at stop)
//!   and continues from its energy ceiling when the state file is behind
//!   (see [`super::persist`]). Without a state file it starts at
//!   `start_energy_wh`, or by default at a value derived from the wall
//!   clock (≈ 400 W average since 2020).
//! - `seed` makes the sequence reproducible; [`Simulated::sample`] is the
//!   pure core, driven with explicit time of day and elapsed time.
//! - Testing aids, off by default: `sample_log` appends every sample to a
//!   file before it is handed on (an account of what was produced that is
//!   independent of the outbox), and `invalid_every` makes every Nth
//!   sample carry a voltage outside the wire range, which the hub refuses
//!   and quarantines.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use super::persist::{log_resumed, EnergyFloor, StateFile};
use super::{Measurement, Meter, MeterError};

/// Config of a simulated meter.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimulatedConfig {
    /// Meter id.
    pub id: String,
    /// Seed for reproducible output (default: random).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Nominal voltage (default 230).
    #[serde(default = "default_nominal_v")]
    pub nominal_voltage_v: f64,
    /// Nominal frequency (default 50).
    #[serde(default = "default_nominal_hz")]
    pub nominal_frequency_hz: f64,
    /// Local time = UTC + this, for the daily profile (default 0).
    #[serde(default)]
    pub utc_offset_hours: f64,
    /// Initial energy counter when there is no state file yet (default:
    /// derived from the wall clock).
    #[serde(default)]
    pub start_energy_wh: Option<f64>,
    /// Testing aid: append one line per sample to this file before the
    /// sample is handed on (see [`sample_log_line`]).
    #[serde(default)]
    pub sample_log: Option<PathBuf>,
    /// Testing aid: every Nth sample (counted from the meter's start)
    /// carries a voltage outside the wire range.
    #[serde(default)]
    pub invalid_every: Option<u64>,
}

fn default_nominal_v() -> f64 {
    230.0
}
fn default_nominal_hz() -> f64 {
    50.0
}

/// Average household draw used for the default starting counter.
const AVERAGE_W: f64 = 400.0;
/// 2020-01-01T00:00:00Z.
const ORIGIN_UNIX_S: u64 = 1_577_836_800;
/// Source impedance for the voltage sag.
const SOURCE_OHMS: f64 = 0.25;
/// The voltage an `invalid_every` sample carries: above the wire range.
pub const INVALID_VOLTAGE_V: f64 = 99_999.0;

/// One line of the sample log: the process id, the meter id, then every
/// value of the measurement in the protocol's order (`-` when absent), each
/// printed so that it parses back to the same `f64`.
pub fn sample_log_line(m: &Measurement) -> String {
    use ems_shared::Measured;
    let mut line = format!("{} {}", std::process::id(), m.meter);
    for q in ems_shared::Measurement::ALL {
        match m.get(q) {
            Some(v) => line.push_str(&format!(" {v:?}")),
            None => line.push_str(" -"),
        }
    }
    line.push('\n');
    line
}

/// An appliance switched on for a while.
#[derive(Debug, Clone, Copy)]
struct Event {
    /// Extra watts.
    watts: f64,
    /// Seconds left.
    left_s: f64,
    /// Power factor of the appliance.
    pf: f64,
}

/// A simulated meter.
#[derive(Debug)]
pub struct Simulated {
    /// The config.
    cfg: SimulatedConfig,
    /// Seeded randomness.
    rng: fastrand::Rng,
    /// Energy counter, Wh.
    energy_wh: f64,
    /// Frequency random walk state, Hz offset.
    freq_offset: f64,
    /// Slow voltage drift state, V.
    volt_drift: f64,
    /// Running appliance events.
    events: Vec<Event>,
    /// Last read (monotonic), for energy integration.
    last_read: Option<Instant>,
    /// Where the counter survives restarts (`None`: not persisted).
    state: Option<StateFile>,
    /// The open sample log, if configured.
    sample_log: Option<File>,
    /// Samples read so far (for `invalid_every`).
    reads: u64,
}

impl Simulated {
    /// Opens one whose energy counter persists in `state_dir`, like a
    /// hardware meter's.
    pub fn open(cfg: SimulatedConfig, state_dir: &Path) -> Result<Self, MeterError> {
        let mut state = StateFile::new(state_dir, &cfg.id, "energy_wh");
        let stored = state
            .load::<f64>()
            .map_err(|e| {
                MeterError::new(&cfg.id, format!("cannot read energy state: {e}"))
                    .with_hint("fix or delete the state file (deleting restarts the counter)")
            })?
            .filter(|v| v.is_finite() && *v >= 0.0);
        let sample_log = match &cfg.sample_log {
            Some(path) => Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        MeterError::new(
                            &cfg.id,
                            format!("cannot open the sample log {}: {e}", path.display()),
                        )
                    })?,
            ),
            None => None,
        };
        let mut meter = Simulated::new(cfg);
        if let Some(e) = stored {
            meter.energy_wh = e;
        }
        meter.state = Some(state);
        meter.sample_log = sample_log;
        Ok(meter)
    }

    /// Creates one without persistence (tests, demos of the model).
    pub fn new(cfg: SimulatedConfig) -> Self {
        let rng = match cfg.seed {
            Some(s) => fastrand::Rng::with_seed(s),
            None => fastrand::Rng::new(),
        };
        let energy_wh = cfg.start_energy_wh.unwrap_or_else(|| {
            let secs = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(ORIGIN_UNIX_S)
                .saturating_sub(ORIGIN_UNIX_S);
            (secs as f64 / 3600.0 * AVERAGE_W).round()
        });
        Simulated {
            cfg,
            rng,
            energy_wh: energy_wh.max(0.0),
            freq_offset: 0.0,
            volt_drift: 0.0,
            events: Vec::new(),
            last_read: None,
            state: None,
            sample_log: None,
            reads: 0,
        }
    }

    /// Mean household load at a local hour of the day (0–24), watts.
    pub fn profile_w(hour: f64) -> f64 {
        let bump = |center: f64, width: f64, height: f64| {
            // Circular distance so the profile wraps at midnight.
            let mut d = (hour - center).abs() % 24.0;
            if d > 12.0 {
                d = 24.0 - d;
            }
            height * (-(d * d) / (2.0 * width * width)).exp()
        };
        150.0 + bump(7.5, 1.0, 600.0) + bump(12.5, 2.0, 250.0) + bump(19.0, 1.7, 1100.0)
            - bump(3.5, 2.0, 40.0)
    }

    fn gauss(&mut self) -> f64 {
        // Sum of uniforms: cheap, bounded, near-normal (σ = 1).
        (0..4).map(|_| self.rng.f64()).sum::<f64>() * 1.732 - 3.464
    }

    /// One sample at local `hour` (0–24) after `dt` since the previous one.
    pub fn sample(&mut self, hour: f64, dt: Duration) -> Measurement {
        let dt_s = dt.as_secs_f64().min(3600.0);
        // Appliance events: about one every two hours in the day, rare at
        // night, at most two at once.
        let rate_per_s = if (6.0..23.0).contains(&hour) {
            0.5 / 3600.0
        } else {
            0.05 / 3600.0
        };
        if self.events.len() < 2 && self.rng.f64() < rate_per_s * dt_s.max(1e-3) {
            let (watts, secs, pf) = match self.rng.u8(0..3) {
                0 => (2000.0, 180.0, 1.0),   // kettle
                1 => (2400.0, 1800.0, 0.99), // oven
                _ => (500.0, 3600.0, 0.75),  // washing machine motor
            };
            self.events.push(Event {
                watts,
                left_s: secs * (0.5 + self.rng.f64()),
                pf,
            });
        }
        let mut event_w = 0.0;
        let mut event_var = 0.0;
        for e in &mut self.events {
            e.left_s -= dt_s;
            event_w += e.watts;
            event_var += e.watts * (1.0 / (e.pf * e.pf) - 1.0).max(0.0).sqrt();
        }
        self.events.retain(|e| e.left_s > 0.0);

        let base_w = Self::profile_w(hour) * (1.0 + 0.03 * self.gauss());
        let base_w = base_w.max(30.0);
        // Base load: PF from 0.85 (light) towards 0.95 (heavy).
        let base_pf = (0.85 + 0.1 * (base_w / 2000.0).min(1.0)).min(0.99);
        let base_var = base_w * (1.0 / (base_pf * base_pf) - 1.0).sqrt();
        let power_w = base_w + event_w;
        let reactive = base_var + event_var;
        let apparent = (power_w * power_w + reactive * reactive).sqrt();
        let pf = (power_w / apparent).clamp(-1.0, 1.0);

        self.volt_drift = (self.volt_drift + 0.05 * self.gauss()).clamp(-4.0, 4.0);
        let open_circuit = self.cfg.nominal_voltage_v + self.volt_drift + 0.3 * self.gauss();
        let current = apparent / open_circuit.max(1.0);
        let voltage = open_circuit - SOURCE_OHMS * current;
        let current = apparent / voltage.max(1.0);
        self.freq_offset = (self.freq_offset * 0.98 + 0.004 * self.gauss()).clamp(-0.2, 0.2);

        self.energy_wh += power_w.max(0.0) * dt_s / 3600.0;
        let round = |v: f64, digits: i32| {
            let f = 10f64.powi(digits);
            (v * f).round() / f
        };
        Measurement {
            meter: self.cfg.id.clone(),
            voltage_v: Some(round(voltage, 2)),
            current_a: Some(round(current, 3)),
            power_w: Some(round(power_w, 1)),
            energy_wh: Some(round(self.energy_wh, 3)),
            frequency_hz: Some(round(self.cfg.nominal_frequency_hz + self.freq_offset, 3)),
            power_factor: Some(round(pf, 3)),
            reactive_power_var: Some(round(reactive, 1)),
        }
    }
}

impl Meter for Simulated {
    fn id(&self) -> &str {
        &self.cfg.id
    }

    fn read(&mut self) -> Result<Vec<Measurement>, MeterError> {
        let now = Instant::now();
        let dt = self
            .last_read
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.last_read = Some(now);
        let secs_of_day = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64() % 86_400.0)
            .unwrap_or(0.0);
        let hour = (secs_of_day / 3600.0 + self.cfg.utc_offset_hours).rem_euclid(24.0);
        let mut m = self.sample(hour, dt);
        self.reads += 1;
        if self
            .cfg
            .invalid_every
            .is_some_and(|n| n > 0 && self.reads % n == 0)
        {
            m.voltage_v = Some(INVALID_VOLTAGE_V);
        }
        if let Some(log) = self.sample_log.as_mut() {
            // Written before the sample leaves the meter: a sample the edge
            // loses later is still in this record.
            if let Err(e) = log.write_all(sample_log_line(&m).as_bytes()) {
                return Err(MeterError::new(
                    &self.cfg.id,
                    format!("cannot append to the sample log: {e}"),
                ));
            }
        }
        if let Some(state) = self.state.as_mut() {
            if let Err(e) = state.store(&format!("{}", self.energy_wh), now) {
                log::warn!("meter {}: cannot persist energy: {e}", self.cfg.id);
            }
        }
        Ok(vec![m])
    }

    fn resume_energy(&mut self, floor: &EnergyFloor) {
        if let Some(f) = floor.get(&self.cfg.id).filter(|f| *f > self.energy_wh) {
            log_resumed(&self.cfg.id, self.energy_wh, f);
            self.energy_wh = f;
        }
    }
}

impl Drop for Simulated {
    fn drop(&mut self) {
        let total = self.energy_wh;
        if let Some(state) = self.state.as_mut() {
            if let Err(e) = state.flush(&format!("{total}")) {
                log::warn!("meter {}: cannot persist energy: {e}", self.cfg.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(seed: u64) -> SimulatedConfig {
        SimulatedConfig {
            id: "main".into(),
            seed: Some(seed),
            nominal_voltage_v: 230.0,
            nominal_frequency_hz: 50.0,
            utc_offset_hours: 0.0,
            start_energy_wh: Some(1000.0),
            sample_log: None,
            invalid_every: None,
        }
    }

    fn day(seed: u64) -> Vec<Measurement> {
        let mut s = Simulated::new(cfg(seed));
        (0..86_400 / 10)
            .map(|i| s.sample(i as f64 * 10.0 / 3600.0, Duration::from_secs(10)))
            .collect()
    }

    #[test]
    fn seeded_runs_are_reproducible() {
        assert_eq!(day(42), day(42));
        assert_ne!(day(42), day(43));
    }

    #[test]
    fn values_are_plausible_and_valid_on_the_wire() {
        for m in day(1) {
            let v = m.voltage_v.unwrap();
            assert!((215.0..245.0).contains(&v), "{v}");
            let f = m.frequency_hz.unwrap();
            assert!((49.7..50.3).contains(&f), "{f}");
            let pf = m.power_factor.unwrap();
            assert!((0.6..=1.0).contains(&pf), "{pf}");
            let p = m.power_w.unwrap();
            assert!((30.0..10_000.0).contains(&p), "{p}");
            let i = m.current_a.unwrap();
            let s = v * i;
            assert!(
                (s * pf - p).abs() < p * 0.02 + 1.0,
                "S·PF {} vs P {p}",
                s * pf
            );
            m.clone().into_reading(1, 1, 0).validate(0).unwrap();
        }
    }

    #[test]
    fn energy_only_increases_and_matches_power() {
        let d = day(7);
        let mut prev = 1000.0;
        for m in &d {
            let e = m.energy_wh.unwrap();
            assert!(e >= prev, "{e} < {prev}");
            prev = e;
        }
        let integrated: f64 = d.iter().map(|m| m.power_w.unwrap() * 10.0 / 3600.0).sum();
        assert!(
            (prev - 1000.0 - integrated).abs() < 1.0,
            "{prev} {integrated}"
        );
        // A household: a few kWh to a few tens of kWh a day.
        assert!((3_000.0..40_000.0).contains(&integrated), "{integrated}");
    }

    #[test]
    fn evening_is_busier_than_night() {
        assert!(Simulated::profile_w(19.0) > 3.0 * Simulated::profile_w(3.0));
        assert!(Simulated::profile_w(7.5) > Simulated::profile_w(10.0));
        assert!((Simulated::profile_w(0.0) - Simulated::profile_w(24.0)).abs() < 1e-9);
        let mut s = Simulated::new(cfg(3));
        let avg = |s: &mut Simulated, h: f64| {
            (0..200)
                .map(|_| s.sample(h, Duration::from_secs(1)).power_w.unwrap())
                .sum::<f64>()
                / 200.0
        };
        let night = avg(&mut s, 3.0);
        let evening = avg(&mut s, 19.0);
        assert!(evening > night * 2.0, "{evening} vs {night}");
    }

    #[test]
    fn the_counter_survives_a_restart_and_resumes_from_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Simulated::open(cfg(9), dir.path()).unwrap();
        let a = s.read().unwrap()[0].energy_wh.unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let b = s.read().unwrap()[0].energy_wh.unwrap();
        assert!(b > a && a >= 1000.0);
        drop(s); // SIGTERM: the final write
        let mut s = Simulated::open(cfg(9), dir.path()).unwrap();
        let c = s.read().unwrap()[0].energy_wh.unwrap();
        assert!(c >= b, "{c} < {b}");
        // A state file behind the spool (SIGKILL): the floor wins.
        // Floors come from spooled readings, which carry three decimals.
        let f = ((c + 50.0) * 1000.0).round() / 1000.0;
        let mut floor = EnergyFloor::default();
        floor.raise("main", f);
        s.resume_energy(&floor);
        let d = s.read().unwrap()[0].energy_wh.unwrap();
        assert!(d >= f, "{d} < {f}");
        // A floor below the counter changes nothing.
        let mut low = EnergyFloor::default();
        low.raise("main", 1.0);
        s.resume_energy(&low);
        assert!(s.read().unwrap()[0].energy_wh.unwrap() >= d);
    }

    #[test]
    fn the_sample_log_records_every_sample_and_invalid_every_injects() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("samples.log");
        let mut s = Simulated::open(
            SimulatedConfig {
                sample_log: Some(log.clone()),
                invalid_every: Some(3),
                ..cfg(11)
            },
            dir.path(),
        )
        .unwrap();
        let read: Vec<Measurement> = (0..6).flat_map(|_| s.read().unwrap()).collect();
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6);
        for (m, line) in read.iter().zip(&lines) {
            assert_eq!(*line, sample_log_line(m).trim_end());
            let fields: Vec<&str> = line.split(' ').collect();
            assert_eq!(fields[0], std::process::id().to_string());
            assert_eq!(fields[1], "main");
            // Every value parses back to exactly what was produced.
            assert_eq!(fields[2].parse::<f64>().ok(), m.voltage_v);
            assert_eq!(fields[5].parse::<f64>().ok(), m.energy_wh);
        }
        let invalid: Vec<usize> = read
            .iter()
            .enumerate()
            .filter(|(_, m)| {
                Measurement::clone(m)
                    .into_reading(1, 1, 0)
                    .validate(0)
                    .is_err()
            })
            .map(|(i, _)| i)
            .collect();
        assert_eq!(invalid, [2, 5]);
        assert_eq!(read[2].voltage_v, Some(INVALID_VOLTAGE_V));
    }

    #[test]
    fn read_uses_real_time() {
        let mut s = Simulated::new(SimulatedConfig {
            start_energy_wh: None,
            ..cfg(5)
        });
        let a = s.read().unwrap();
        let b = s.read().unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].meter, "main");
        assert!(b[0].energy_wh >= a[0].energy_wh);
        assert!(a[0].energy_wh.unwrap() > 100_000.0);
    }
}
