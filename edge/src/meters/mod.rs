//! Meters: the [`Meter`] abstraction and one module per kind.
//!
//! A meter yields [`Measurement`]s in the wire protocol's units (V, A, W, Wh,
//! Hz, var); [`measurement`] converts them to and from wire readings. The
//! sampler stamps them with epoch/seq/time and puts them in the outbox.
//! Drivers for real chips are generic over embedded-hal 1.0 and never name
//! rppal; [`crate::platform`] opens the Pi's buses and builds the meter a
//! config table describes.
//!
//! The [`Meter`] trait is the contract between the sampler and every driver:
//! a change to it touches all of them.
//!
//! - [`simulated`]: a household supply for demos and tests.
//! - [`ina219`], [`ina226`]: DC power monitors on I2C, made meters by [`dc`].
//! - [`atm90e32`]: three-phase metering IC on SPI.
//! - [`pulse`]: S0 pulse outputs on a GPIO.
//! - [`modbus`]: Modbus RTU meters on a serial line.
//! - [`persist`]: counters that survive a restart; [`plausible`]: the
//!   sanity check every driver applies.

use serde::Deserialize;
use thiserror::Error;

pub use measurement::Measurement;

pub mod simulated;

pub mod atm90e32;
pub mod dc;
pub mod ina219;
pub mod ina226;
pub mod measurement;
pub mod modbus;
pub mod persist;
pub mod plausible;
pub mod pulse;

/// Why a meter could not be opened or read. `hint` tells an installer what
/// to check.
#[derive(Debug, Error)]
#[error("meter {meter}: {message}")]
pub struct MeterError {
    /// The configured meter id.
    pub meter: String,
    /// What went wrong.
    pub message: String,
    /// What to check, e.g. "add the user to the i2c group".
    pub hint: Option<String>,
}

impl MeterError {
    /// An error without a hint.
    pub fn new(meter: &str, message: impl Into<String>) -> Self {
        MeterError {
            meter: meter.to_string(),
            message: message.into(),
            hint: None,
        }
    }

    /// Adds a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// A source of measurements. `read` is called once per sample interval from
/// the sampler thread; it must not block for long (drivers use timeouts).
pub trait Meter: Send {
    /// The configured id.
    fn id(&self) -> &str;
    /// Reads the meter now.
    fn read(&mut self) -> Result<Vec<Measurement>, MeterError>;
    /// Called once the meter is open, before its first read: continue every
    /// energy counter the edge keeps for it from at least its value in
    /// `floor` (its saved energy ceiling, the newest readings in the
    /// spool), so a counter never restarts below a reading that already
    /// left (see [`persist`]). A meter whose counter lives in the meter
    /// itself (Modbus) has nothing to do.
    fn resume_energy(&mut self, floor: &persist::EnergyFloor);
    /// The energy counter lives in the meter itself (a Modbus meter's
    /// import register), not in the edge: a crash of the edge cannot make
    /// it go backwards, so its readings need no energy ceiling
    /// ([`crate::ceiling`]).
    fn counts_energy_itself(&self) -> bool {
        false
    }
}

/// One `[[meter]]` table of the edge config, tagged by `kind`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MeterConfig {
    /// `kind = "simulated"`.
    Simulated(simulated::SimulatedConfig),
    /// `kind = "ina219"`: TI INA219 DC power monitor on I2C.
    Ina219(dc::InaConfig),
    /// `kind = "ina226"`: TI INA226 DC power monitor on I2C.
    Ina226(dc::InaConfig),
    /// `kind = "atm90e32"`: three-phase metering IC on SPI (ids `<id>-a` …).
    Atm90e32(atm90e32::Atm90e32Config),
    /// `kind = "pulse"`: S0 pulse output on a GPIO.
    Pulse(pulse::PulseConfig),
    /// `kind = "modbus"`: Modbus RTU meter (SDM120, SDM630, PZEM-004T).
    Modbus(modbus::ModbusConfig),
}

impl MeterConfig {
    /// The configured meter id.
    pub fn id(&self) -> &str {
        match self {
            MeterConfig::Simulated(c) => &c.id,
            MeterConfig::Ina219(c) | MeterConfig::Ina226(c) => &c.id,
            MeterConfig::Atm90e32(c) => &c.id,
            MeterConfig::Pulse(c) => &c.id,
            MeterConfig::Modbus(c) => &c.id,
        }
    }
}
