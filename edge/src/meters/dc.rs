//! What the INA219 and INA226 drivers share: their config table, edge-side
//! energy integration, I2C error hints and the [`DcMeter`] adapter that turns
//! a DC power monitor into a [`Meter`].
//!
//! # Energy on the edge
//! The INA219/INA226 measure power but do not accumulate energy. The edge
//! integrates it between samples with the trapezoid rule on a monotonic clock
//! ([`std::time::Instant`], immune to wall-clock steps):
//!
//! `E += (P₀ + P₁) / 2 · Δt`
//!
//! Only imported energy is counted (negative power, e.g. a battery charging
//! back through the shunt, adds 0), so `energy_wh` only ever increases, as the
//! wire protocol requires. A gap longer than [`MAX_GAP`] (meter unplugged,
//! edge suspended) is not bridged: the integrator restarts from the next
//! sample instead of inventing energy. The running total is persisted in
//! `<state_dir>/<id>.energy_wh` (see [`super::persist`]), so a restart
//! continues the counter.

use std::path::Path;
use std::time::{Duration, Instant};

use embedded_hal::i2c::{ErrorKind, NoAcknowledgeSource};
use serde::Deserialize;

use super::persist::{log_resumed, EnergyFloor, StateFile};
use super::{plausible, Measurement, Meter, MeterError};

/// Samples further apart than this are not integrated across.
pub const MAX_GAP: Duration = Duration::from_secs(60);

/// `kind = "ina219"` / `kind = "ina226"` config table.
///
/// ```toml
/// [[meter]]
/// id = "battery"
/// kind = "ina226"
/// bus = 1              # /dev/i2c-1 (GPIO2 = SDA, GPIO3 = SCL)
/// address = 0x40       # A0/A1 strapping
/// shunt_ohms = 0.002
/// max_current_a = 10.0
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InaConfig {
    /// Meter id.
    pub id: String,
    /// Linux I2C bus number (`/dev/i2c-<bus>`), default 1.
    #[serde(default = "default_bus")]
    pub bus: u8,
    /// 7-bit I2C address, default 0x40.
    #[serde(default = "default_address")]
    pub address: u8,
    /// Shunt resistance in ohms (e.g. 0.1 on the common breakout boards).
    pub shunt_ohms: f64,
    /// Largest current expected through the shunt, in amperes.
    pub max_current_a: f64,
}

fn default_bus() -> u8 {
    1
}
fn default_address() -> u8 {
    0x40
}

impl InaConfig {
    /// Rejects values no calibration can be computed from.
    pub fn validate(&self) -> Result<(), MeterError> {
        if !(self.shunt_ohms.is_finite() && self.shunt_ohms > 0.0) {
            return Err(MeterError::new(&self.id, "shunt_ohms must be > 0"));
        }
        if !(self.max_current_a.is_finite() && self.max_current_a > 0.0) {
            return Err(MeterError::new(&self.id, "max_current_a must be > 0"));
        }
        if !(0x03..=0x77).contains(&self.address) {
            return Err(MeterError::new(
                &self.id,
                format!("address {:#04x} is not a 7-bit I2C address", self.address),
            ));
        }
        Ok(())
    }
}

/// Energy in watt-hours of a trapezoid between two power samples.
pub fn trapezoid_wh(p0_w: f64, p1_w: f64, dt: Duration) -> f64 {
    (p0_w + p1_w) / 2.0 * dt.as_secs_f64() / 3600.0
}

/// Integrates power samples into an ever-increasing import energy counter.
#[derive(Debug, Clone)]
pub struct EnergyIntegrator {
    /// Previous sample (time, power clamped to ≥ 0).
    last: Option<(Instant, f64)>,
    /// Running total in Wh.
    total_wh: f64,
    /// Gaps longer than this are not integrated.
    max_gap: Duration,
}

impl EnergyIntegrator {
    /// Starts at `start_wh` (e.g. the persisted total).
    pub fn new(start_wh: f64, max_gap: Duration) -> Self {
        EnergyIntegrator {
            last: None,
            total_wh: start_wh,
            max_gap,
        }
    }

    /// Adds a power sample taken at `now` and returns the new total.
    pub fn add(&mut self, now: Instant, power_w: f64) -> f64 {
        let p = if power_w.is_finite() {
            power_w.max(0.0)
        } else {
            0.0
        };
        if let Some((t0, p0)) = self.last {
            let dt = now.saturating_duration_since(t0);
            if dt <= self.max_gap {
                self.total_wh += trapezoid_wh(p0, p, dt);
            }
        }
        self.last = Some((now, p));
        self.total_wh
    }

    /// The running total in Wh.
    pub fn total_wh(&self) -> f64 {
        self.total_wh
    }

    /// Continues from at least `wh`.
    pub fn raise_to(&mut self, wh: f64) {
        if wh.is_finite() {
            self.total_wh = self.total_wh.max(wh);
        }
    }
}

/// One DC sample in SI units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DcReading {
    /// Bus (load-side) voltage, V.
    pub voltage_v: f64,
    /// Shunt current, A (negative when flowing backwards).
    pub current_a: f64,
    /// Power, W (sign follows the current).
    pub power_w: f64,
}

/// A DC power monitor as the [`DcMeter`] adapter sees it.
pub trait DcSensor: Send {
    /// Reads one sample; `meter` is the id for error messages.
    fn sample(&mut self, meter: &str) -> Result<DcReading, MeterError>;
}

/// Explains an I2C error to an installer.
pub fn i2c_error(meter: &str, address: u8, what: &str, kind: ErrorKind) -> MeterError {
    match kind {
        ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address)
        | ErrorKind::NoAcknowledge(NoAcknowledgeSource::Unknown) => MeterError::new(
            meter,
            format!("{what}: no device acknowledged address {address:#04x}"),
        )
        .with_hint(
            "check wiring (SDA GPIO2 pin 3, SCL GPIO3 pin 5, 3.3 V, GND) and the address \
             straps; run `ems-edge scan i2c` to list responding addresses",
        ),
        ErrorKind::NoAcknowledge(NoAcknowledgeSource::Data) => MeterError::new(
            meter,
            format!("{what}: device at {address:#04x} rejected a data byte"),
        )
        .with_hint("the chip at this address may not be the configured kind"),
        ErrorKind::ArbitrationLoss | ErrorKind::Bus => {
            MeterError::new(meter, format!("{what}: I2C bus error ({kind:?})"))
                .with_hint("check pull-ups and cable length; another master may be driving the bus")
        }
        other => MeterError::new(meter, format!("{what}: I2C error ({other:?})")).with_hint(
            "a missing device on the Pi often reports as an I/O error: check wiring and address",
        ),
    }
}

/// Maps any embedded-hal I2C error through [`i2c_error`].
pub fn i2c_hal_error<E: embedded_hal::i2c::Error>(
    meter: &str,
    address: u8,
    what: &str,
    e: &E,
) -> MeterError {
    i2c_error(meter, address, what, e.kind())
}

/// Turns a [`DcSensor`] into a [`Meter`]: plausibility check, energy
/// integration and energy persistence.
pub struct DcMeter<S: DcSensor> {
    /// Configured id.
    id: String,
    /// The driver.
    sensor: S,
    /// Edge-side energy counter.
    energy: EnergyIntegrator,
    /// Where the energy total survives restarts.
    state: StateFile,
}

impl<S: DcSensor> DcMeter<S> {
    /// Wraps `sensor`, continuing the energy total stored in `state_dir`.
    pub fn new(id: &str, sensor: S, state_dir: &Path) -> Result<Self, MeterError> {
        let mut state = StateFile::new(state_dir, id, "energy_wh");
        let start = state
            .load::<f64>()
            .map_err(|e| {
                MeterError::new(id, format!("cannot read energy state: {e}"))
                    .with_hint("check that the state directory is writable by the service user")
            })?
            .filter(|v| v.is_finite() && *v >= 0.0)
            .unwrap_or(0.0);
        Ok(DcMeter {
            id: id.to_string(),
            sensor,
            energy: EnergyIntegrator::new(start, MAX_GAP),
            state,
        })
    }

    /// Reads at an explicit instant (tests drive the clock).
    pub fn read_at(&mut self, now: Instant) -> Result<Vec<Measurement>, MeterError> {
        let result = self.read_checked(now);
        if result.is_err() {
            // The last total before a failure goes to disk now, not within
            // the minute.
            if let Err(e) = self.state.flush_pending() {
                log::warn!("meter {}: cannot persist energy: {e}", self.id);
            }
        }
        result
    }

    fn read_checked(&mut self, now: Instant) -> Result<Vec<Measurement>, MeterError> {
        let r = self.sensor.sample(&self.id)?;
        let mut m = Measurement {
            meter: self.id.clone(),
            voltage_v: Some(r.voltage_v),
            current_a: Some(r.current_a),
            power_w: Some(r.power_w),
            ..Default::default()
        };
        plausible::check(&m)?;
        let total = self.energy.add(now, r.power_w);
        m.energy_wh = Some(total);
        if let Err(e) = self.state.store(&format!("{total}"), now) {
            log::warn!("meter {}: cannot persist energy: {e}", self.id);
        }
        Ok(vec![m])
    }

    fn persist(&mut self) {
        let total = self.energy.total_wh();
        if let Err(e) = self.state.flush(&format!("{total}")) {
            log::warn!("meter {}: cannot persist energy: {e}", self.id);
        }
    }
}

impl<S: DcSensor> Meter for DcMeter<S> {
    fn id(&self) -> &str {
        &self.id
    }
    fn read(&mut self) -> Result<Vec<Measurement>, MeterError> {
        self.read_at(Instant::now())
    }
    fn resume_energy(&mut self, floor: &EnergyFloor) {
        let total = self.energy.total_wh();
        if let Some(f) = floor.get(&self.id).filter(|f| *f > total) {
            log_resumed(&self.id, total, f);
            self.energy.raise_to(f);
        }
    }
}

impl<S: DcSensor> Drop for DcMeter<S> {
    fn drop(&mut self) {
        self.persist();
    }
}

/// Chooses the current LSB and calibration value for a TI current monitor.
///
/// The datasheets (INA219 §8.5.1, INA226 §7.5) bound the current LSB between
/// `max_current_a / 2¹⁵` (full 15-bit resolution) and `max_current_a / 2¹²`,
/// and recommend a round number. We take, in this order of preference:
/// 1. the smallest power of ten in that window (the datasheet's worked
///    example: 10 A → 1 mA), so register values read as decimal numbers;
/// 2. otherwise the smallest 1-2-5 value ≥ the minimum.
///
/// `cal = trunc(cal_numerator / (current_lsb · shunt_ohms))` (0.04096 for the
/// INA219, 0.00512 for the INA226) must land in `1 ..= cal_max`. Returns
/// `(current_lsb_a, cal)` or `None` if no candidate fits.
pub fn current_lsb_and_cal(
    max_current_a: f64,
    shunt_ohms: f64,
    cal_numerator: f64,
    cal_max: u16,
) -> Option<(f64, u16)> {
    if !(max_current_a > 0.0 && shunt_ohms > 0.0) {
        return None;
    }
    let min_lsb = max_current_a / 32768.0;
    let max_lsb = max_current_a / 4096.0;
    let first_exp = min_lsb.log10().floor() as i32;
    // Preferred: powers of ten inside the datasheet window, smallest first.
    let mut candidates: Vec<f64> = (first_exp..=first_exp + 1)
        .map(|exp| 10f64.powi(exp))
        .filter(|&d| d >= min_lsb * (1.0 - 1e-12) && d <= max_lsb)
        .collect();
    // Fallback: 1-2-5 values at or above the minimum, ascending.
    let mut series: Vec<f64> = (first_exp..=first_exp + 2)
        .flat_map(|exp| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(exp)))
        .filter(|&c| c >= min_lsb * (1.0 - 1e-12))
        .collect();
    series.sort_by(|a, b| a.total_cmp(b));
    candidates.extend(series);
    for lsb in candidates {
        let cal = (cal_numerator / (lsb * shunt_ohms) + 1e-9).floor();
        if cal >= 1.0 && cal <= f64::from(cal_max) {
            return Some((lsb, cal as u16));
        }
    }
    None
}

/// Reads a 16-bit big-endian register of an INA2xx: `write([reg])`, then
/// `read(2)` — two plain transfers, never a repeated-start transaction
/// (rppal emulates those as separate calls anyway).
pub fn read_register<I: embedded_hal::i2c::I2c>(
    i2c: &mut I,
    address: u8,
    register: u8,
) -> Result<u16, I::Error> {
    let mut buf = [0u8; 2];
    i2c.write(address, &[register])?;
    i2c.read(address, &mut buf)?;
    Ok(u16::from_be_bytes(buf))
}

/// Writes a 16-bit big-endian register of an INA2xx.
pub fn write_register<I: embedded_hal::i2c::I2c>(
    i2c: &mut I,
    address: u8,
    register: u8,
    value: u16,
) -> Result<(), I::Error> {
    let [hi, lo] = value.to_be_bytes();
    i2c.write(address, &[register, hi, lo])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trapezoid() {
        // 1000 W → 2000 W over 36 s: 1500 W · 0.01 h = 15 Wh.
        assert!((trapezoid_wh(1000.0, 2000.0, Duration::from_secs(36)) - 15.0).abs() < 1e-9);
    }

    #[test]
    fn integrator_monotonic_and_gap() {
        let t0 = Instant::now();
        let mut e = EnergyIntegrator::new(10.0, MAX_GAP);
        assert_eq!(e.add(t0, 3600.0), 10.0);
        let v = e.add(t0 + Duration::from_secs(1), 3600.0);
        assert!((v - 11.0).abs() < 1e-9);
        // Negative power adds nothing and never decreases the total.
        let v2 = e.add(t0 + Duration::from_secs(2), -3600.0);
        assert!(v2 >= v);
        // A gap longer than MAX_GAP is not bridged.
        let v3 = e.add(t0 + Duration::from_secs(1000), 3600.0);
        assert_eq!(v3, v2);
    }
}
