//! TI INA219: 26 V (32 V range) bidirectional current/power monitor, I2C.
//!
//! # Wiring (Raspberry Pi)
//! | INA219 | Pi header                  |
//! |--------|----------------------------|
//! | VCC    | pin 1 (3.3 V)              |
//! | GND    | pin 6 (GND)                |
//! | SDA    | pin 3 (GPIO2, SDA1)        |
//! | SCL    | pin 5 (GPIO3, SCL1)        |
//! | VIN+   | supply side of the shunt   |
//! | VIN−   | load side of the shunt     |
//!
//! The load's ground must be common with the INA219's GND, otherwise the bus
//! voltage reads nonsense. Address straps A0/A1 select 0x40–0x4F (breakout
//! boards default to 0x40). Enable the bus with `dtparam=i2c_arm=on` in
//! `/boot/firmware/config.txt`.
//!
//! # Registers (datasheet SBOS448, §8.6)
//! | addr | name          | LSB                                   |
//! |------|---------------|---------------------------------------|
//! | 0x00 | Configuration | BRNG bit 13, PG 12:11, BADC 10:7, SADC 6:3, MODE 2:0 |
//! | 0x01 | Shunt voltage | 10 µV, two's complement               |
//! | 0x02 | Bus voltage   | bits 15:3 × 4 mV; bit 1 CNVR, bit 0 OVF |
//! | 0x03 | Power         | 20 × current LSB                      |
//! | 0x04 | Current       | current LSB, two's complement         |
//! | 0x05 | Calibration   | `trunc(0.04096 / (current_LSB · R_shunt))`, bit 0 void |
//!
//! The driver configures 32 V bus range, the smallest PGA range that holds
//! `shunt_ohms × max_current_a` (40/80/160/320 mV), 12-bit conversions averaged
//! over 32 samples (17 ms each) and continuous shunt + bus mode.
//!
//! # Bus access
//! Every register read is a plain I2C `write([reg])` followed by a separate
//! `read(2)`: no repeated-start transaction, which rppal only emulates (the
//! INA219 keeps its register pointer between transfers, so this is exactly
//! what the datasheet describes for reading a register with a STOP in between).
//!
//! # Robustness
//! - The calibration register is read back on every sample: if it does not
//!   match (the chip lost power and reset), the driver rewrites configuration
//!   and calibration and reports [`Error::CalibrationLost`] for that sample.
//! - OVF (math overflow) in the bus register → [`Error::Overflow`].
//! - All data registers reading `0xFFFF` → [`Error::AllOnes`].

use embedded_hal::i2c::I2c;
use thiserror::Error;

use super::dc::{self, current_lsb_and_cal, DcReading, DcSensor};
use super::MeterError;

/// Register addresses.
pub mod reg {
    /// Configuration register.
    pub const CONFIG: u8 = 0x00;
    /// Shunt voltage register.
    pub const SHUNT_VOLTAGE: u8 = 0x01;
    /// Bus voltage register.
    pub const BUS_VOLTAGE: u8 = 0x02;
    /// Power register.
    pub const POWER: u8 = 0x03;
    /// Current register.
    pub const CURRENT: u8 = 0x04;
    /// Calibration register.
    pub const CALIBRATION: u8 = 0x05;
}

/// Configuration register bit fields.
pub mod config {
    /// Bus voltage range 32 V (bit 13).
    pub const BRNG_32V: u16 = 1 << 13;
    /// Shift of the PGA field (bits 12:11).
    pub const PG_SHIFT: u16 = 11;
    /// Shift of the bus ADC field (bits 10:7).
    pub const BADC_SHIFT: u16 = 7;
    /// Shift of the shunt ADC field (bits 6:3).
    pub const SADC_SHIFT: u16 = 3;
    /// 12-bit, 32 samples averaged (17.02 ms).
    pub const ADC_12BIT_32S: u16 = 0b1101;
    /// Shunt and bus, continuous.
    pub const MODE_SHUNT_BUS_CONT: u16 = 0b111;
}

/// Driver errors, generic over the I2C bus error.
#[derive(Debug, Error)]
pub enum Error<E> {
    /// The bus reported an error (NACK, arbitration loss …).
    #[error("I2C error: {0:?}")]
    I2c(E),
    /// Shunt and maximum current admit no calibration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// OVF flag: the shunt voltage exceeded the PGA range, current and power are invalid.
    #[error("math overflow (OVF): current exceeds the configured range")]
    Overflow,
    /// Every data register read 0xFFFF.
    #[error("registers read all ones (bus glitch)")]
    AllOnes,
    /// The calibration register lost its value; the chip was re-initialised.
    #[error("calibration register reads {found:#06x} instead of {expected:#06x}: chip was reset, re-initialised")]
    CalibrationLost {
        /// Value written at init.
        expected: u16,
        /// Value read back.
        found: u16,
    },
}

/// Values derived from the shunt and maximum current.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Current register LSB in A.
    pub current_lsb_a: f64,
    /// Calibration register value.
    pub cal: u16,
    /// Configuration register value.
    pub config: u16,
}

/// PGA code for the smallest shunt range holding `vshunt_max_v`.
pub fn pga_bits(vshunt_max_v: f64) -> Option<u16> {
    [(0.04, 0b00), (0.08, 0b01), (0.16, 0b10), (0.32, 0b11)]
        .into_iter()
        .find(|(range, _)| vshunt_max_v <= *range * (1.0 + 1e-9))
        .map(|(_, bits)| bits)
}

/// Computes configuration and calibration from the shunt and maximum current.
pub fn calibration(shunt_ohms: f64, max_current_a: f64) -> Result<Calibration, String> {
    let vmax = shunt_ohms * max_current_a;
    let pg = pga_bits(vmax).ok_or_else(|| {
        format!(
            "shunt_ohms × max_current_a = {:.1} mV exceeds the INA219's 320 mV range",
            vmax * 1000.0
        )
    })?;
    let (lsb, cal) = current_lsb_and_cal(max_current_a, shunt_ohms, 0.04096, 0xFFFE)
        .ok_or_else(|| "no calibration fits shunt_ohms and max_current_a".to_string())?;
    let config_value = config::BRNG_32V
        | (pg << config::PG_SHIFT)
        | (config::ADC_12BIT_32S << config::BADC_SHIFT)
        | (config::ADC_12BIT_32S << config::SADC_SHIFT)
        | config::MODE_SHUNT_BUS_CONT;
    Ok(Calibration {
        current_lsb_a: lsb,
        cal: cal & 0xFFFE,
        config: config_value,
    })
}

/// Shunt voltage register → volts (10 µV LSB, signed).
pub fn shunt_voltage_v(raw: u16) -> f64 {
    f64::from(raw as i16) * 10e-6
}

/// Bus voltage register → volts (bits 15:3, 4 mV LSB).
pub fn bus_voltage_v(raw: u16) -> f64 {
    f64::from(raw >> 3) * 0.004
}

/// Current register → amperes.
pub fn current_a(raw: u16, current_lsb_a: f64) -> f64 {
    f64::from(raw as i16) * current_lsb_a
}

/// Power register → watts (20 × current LSB, unsigned).
pub fn power_w(raw: u16, current_lsb_a: f64) -> f64 {
    f64::from(raw) * 20.0 * current_lsb_a
}

/// INA219 driver owning its I2C bus.
#[derive(Debug)]
pub struct Ina219<I2C> {
    /// The bus.
    i2c: I2C,
    /// 7-bit address.
    address: u8,
    /// Derived configuration.
    cal: Calibration,
}

impl<I2C: I2c> Ina219<I2C> {
    /// Takes the bus; computes the calibration (no bus traffic yet, call
    /// [`Ina219::init`]).
    pub fn new(
        i2c: I2C,
        address: u8,
        shunt_ohms: f64,
        max_current_a: f64,
    ) -> Result<Self, (I2C, Error<I2C::Error>)> {
        match calibration(shunt_ohms, max_current_a) {
            Ok(cal) => Ok(Ina219 { i2c, address, cal }),
            Err(e) => Err((i2c, Error::Config(e))),
        }
    }

    /// Writes configuration and calibration.
    pub fn init(&mut self) -> Result<(), Error<I2C::Error>> {
        self.write_register(reg::CONFIG, self.cal.config)?;
        self.write_register(reg::CALIBRATION, self.cal.cal)
    }

    /// The derived configuration.
    pub fn calibration(&self) -> Calibration {
        self.cal
    }

    /// The 7-bit address.
    pub fn address(&self) -> u8 {
        self.address
    }

    /// Reads a 16-bit register: `write([reg])`, then `read(2)` (MSB first).
    pub fn read_register(&mut self, register: u8) -> Result<u16, Error<I2C::Error>> {
        dc::read_register(&mut self.i2c, self.address, register).map_err(Error::I2c)
    }

    /// Writes a 16-bit register (MSB first).
    pub fn write_register(&mut self, register: u8, value: u16) -> Result<(), Error<I2C::Error>> {
        dc::write_register(&mut self.i2c, self.address, register, value).map_err(Error::I2c)
    }

    /// Reads calibration (check), bus, shunt, current and power registers.
    pub fn measure(&mut self) -> Result<DcReading, Error<I2C::Error>> {
        let found = self.read_register(reg::CALIBRATION)?;
        if found != self.cal.cal {
            if found == 0xFFFF {
                return Err(Error::AllOnes);
            }
            self.init()?;
            return Err(Error::CalibrationLost {
                expected: self.cal.cal,
                found,
            });
        }
        let bus = self.read_register(reg::BUS_VOLTAGE)?;
        let shunt = self.read_register(reg::SHUNT_VOLTAGE)?;
        let current = self.read_register(reg::CURRENT)?;
        let power = self.read_register(reg::POWER)?;
        if super::plausible::all_ones(&[bus, shunt, current, power]) {
            return Err(Error::AllOnes);
        }
        if bus & 0x0001 != 0 {
            return Err(Error::Overflow);
        }
        let i = current_a(current, self.cal.current_lsb_a);
        let p = power_w(power, self.cal.current_lsb_a);
        Ok(DcReading {
            voltage_v: bus_voltage_v(bus),
            current_a: i,
            power_w: if i < 0.0 { -p } else { p },
        })
    }

    /// Gives the bus back.
    pub fn destroy(self) -> I2C {
        self.i2c
    }
}

/// Maps a driver error to an installer-facing [`MeterError`].
pub fn meter_error<E: embedded_hal::i2c::Error>(
    meter: &str,
    address: u8,
    e: Error<E>,
) -> MeterError {
    match e {
        Error::I2c(bus) => dc::i2c_hal_error(meter, address, "INA219", &bus),
        Error::Config(msg) => MeterError::new(meter, msg)
            .with_hint("check shunt_ohms (e.g. 0.1 on breakout boards) and max_current_a"),
        Error::Overflow => MeterError::new(meter, e.to_string())
            .with_hint("the current exceeds max_current_a or shunt_ohms is wrong"),
        other => MeterError::new(meter, other.to_string()),
    }
}

impl<I2C> DcSensor for Ina219<I2C>
where
    I2C: I2c + Send,
{
    fn sample(&mut self, meter: &str) -> Result<DcReading, MeterError> {
        let address = self.address;
        self.measure().map_err(|e| meter_error(meter, address, e))
    }
}
