//! TI INA226: 36 V bidirectional current/power monitor with alert, I2C.
//!
//! # Wiring (Raspberry Pi)
//! Same as the INA219: VS → pin 1 (3.3 V), GND → pin 6, SDA → pin 3
//! (GPIO2), SCL → pin 5 (GPIO3), IN+ / IN− across the shunt, VBUS to the
//! load-side supply rail (on most breakouts VBUS is tied to IN−). A0/A1
//! select 0x40–0x4F. `dtparam=i2c_arm=on` in `/boot/firmware/config.txt`.
//!
//! # Registers (datasheet SBOS547, §7.6)
//! | addr | name            | LSB / content                            |
//! |------|-----------------|------------------------------------------|
//! | 0x00 | Configuration   | RST bit 15, AVG 11:9, VBUSCT 8:6, VSHCT 5:3, MODE 2:0 |
//! | 0x01 | Shunt voltage   | 2.5 µV, two's complement                 |
//! | 0x02 | Bus voltage     | 1.25 mV, bits 14:0                       |
//! | 0x03 | Power           | 25 × current LSB                         |
//! | 0x04 | Current         | current LSB, two's complement            |
//! | 0x05 | Calibration     | `trunc(0.00512 / (current_LSB · R_shunt))`, bits 14:0 |
//! | 0x06 | Mask/Enable     | bit 2 OVF (math overflow), bit 3 CVRF    |
//! | 0xFE | Manufacturer ID | 0x5449 ("TI")                            |
//! | 0xFF | Die ID          | 0x2260                                   |
//!
//! The driver checks both ID registers at init (so a wrong `kind` or address
//! is reported as such), then configures 16-sample averaging with 1.1 ms
//! conversions (≈ 35 ms per result) in continuous shunt + bus mode. The shunt
//! range is fixed at ±81.92 mV, so `shunt_ohms × max_current_a` must stay
//! below that.
//!
//! Register reads are `write([reg])` + `read(2)`, never a repeated-start
//! transaction (rppal emulates those). The calibration register is verified
//! on each sample as in the INA219 driver; OVF → [`Error::Overflow`].

use embedded_hal::i2c::I2c;
use thiserror::Error;

use super::dc::{self, current_lsb_and_cal, DcReading, DcSensor};
use super::MeterError;

/// Register addresses.
pub mod reg {
    /// Configuration.
    pub const CONFIG: u8 = 0x00;
    /// Shunt voltage.
    pub const SHUNT_VOLTAGE: u8 = 0x01;
    /// Bus voltage.
    pub const BUS_VOLTAGE: u8 = 0x02;
    /// Power.
    pub const POWER: u8 = 0x03;
    /// Current.
    pub const CURRENT: u8 = 0x04;
    /// Calibration.
    pub const CALIBRATION: u8 = 0x05;
    /// Mask/Enable (flags).
    pub const MASK_ENABLE: u8 = 0x06;
    /// Manufacturer ID.
    pub const MANUFACTURER_ID: u8 = 0xFE;
    /// Die ID.
    pub const DIE_ID: u8 = 0xFF;
}

/// Expected manufacturer ID ("TI").
pub const MANUFACTURER_TI: u16 = 0x5449;
/// Expected die ID.
pub const DIE_INA226: u16 = 0x2260;
/// Names TI parts from their manufacturer (0xFE) and die (0xFF) ID
/// registers, which the INA226 and its newer siblings share (`ems-edge scan
/// i2c` asks every address in 0x40–0x4F).
pub fn identify_ti(manufacturer: u16, die: u16) -> Option<&'static str> {
    if manufacturer != MANUFACTURER_TI {
        return None;
    }
    match die {
        DIE_INA226 => Some("INA226"),
        0x2270 => Some("INA260"),
        0x2280 => Some("INA228"),
        0x2290 => Some("INA229"),
        _ => Some("TI device"),
    }
}

/// Mask/Enable: math overflow flag (bit 2).
pub const OVF: u16 = 1 << 2;

/// Configuration: bit 14 reads as 1 (reserved) | AVG=16 (010) | VBUSCT=1.1 ms
/// (100) | VSHCT=1.1 ms (100) | MODE=shunt+bus continuous (111).
pub const CONFIG_VALUE: u16 = (1 << 14) | (0b010 << 9) | (0b100 << 6) | (0b100 << 3) | 0b111;

/// Driver errors, generic over the I2C bus error.
#[derive(Debug, Error)]
pub enum Error<E> {
    /// The bus reported an error.
    #[error("I2C error: {0:?}")]
    I2c(E),
    /// Shunt and maximum current admit no calibration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The ID registers do not identify an INA226.
    #[error("not an INA226: manufacturer id {manufacturer:#06x}, die id {die:#06x}")]
    WrongChip {
        /// Register 0xFE.
        manufacturer: u16,
        /// Register 0xFF.
        die: u16,
    },
    /// OVF flag set.
    #[error("math overflow (OVF): current exceeds the configured range")]
    Overflow,
    /// Every data register read 0xFFFF.
    #[error("registers read all ones (bus glitch)")]
    AllOnes,
    /// Calibration lost (chip reset); re-initialised.
    #[error("calibration register reads {found:#06x} instead of {expected:#06x}: chip was reset, re-initialised")]
    CalibrationLost {
        /// Value written at init.
        expected: u16,
        /// Value read back.
        found: u16,
    },
}

/// Current LSB and calibration value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Current register LSB in A.
    pub current_lsb_a: f64,
    /// Calibration register value.
    pub cal: u16,
}

/// Computes the calibration from the shunt and maximum current.
pub fn calibration(shunt_ohms: f64, max_current_a: f64) -> Result<Calibration, String> {
    let vmax = shunt_ohms * max_current_a;
    if vmax > 0.08192 * (1.0 + 1e-9) {
        return Err(format!(
            "shunt_ohms × max_current_a = {:.1} mV exceeds the INA226's 81.92 mV range",
            vmax * 1000.0
        ));
    }
    let (lsb, cal) = current_lsb_and_cal(max_current_a, shunt_ohms, 0.00512, 0x7FFF)
        .ok_or_else(|| "no calibration fits shunt_ohms and max_current_a".to_string())?;
    Ok(Calibration {
        current_lsb_a: lsb,
        cal,
    })
}

/// Shunt voltage register → volts (2.5 µV LSB, signed).
pub fn shunt_voltage_v(raw: u16) -> f64 {
    f64::from(raw as i16) * 2.5e-6
}

/// Bus voltage register → volts (1.25 mV LSB, bits 14:0).
pub fn bus_voltage_v(raw: u16) -> f64 {
    f64::from(raw & 0x7FFF) * 1.25e-3
}

/// Current register → amperes.
pub fn current_a(raw: u16, current_lsb_a: f64) -> f64 {
    f64::from(raw as i16) * current_lsb_a
}

/// Power register → watts (25 × current LSB).
pub fn power_w(raw: u16, current_lsb_a: f64) -> f64 {
    f64::from(raw) * 25.0 * current_lsb_a
}

/// INA226 driver owning its I2C bus.
#[derive(Debug)]
pub struct Ina226<I2C> {
    /// The bus.
    i2c: I2C,
    /// 7-bit address.
    address: u8,
    /// Derived calibration.
    cal: Calibration,
}

impl<I2C: I2c> Ina226<I2C> {
    /// Takes the bus and computes the calibration (no bus traffic).
    pub fn new(
        i2c: I2C,
        address: u8,
        shunt_ohms: f64,
        max_current_a: f64,
    ) -> Result<Self, (I2C, Error<I2C::Error>)> {
        match calibration(shunt_ohms, max_current_a) {
            Ok(cal) => Ok(Ina226 { i2c, address, cal }),
            Err(e) => Err((i2c, Error::Config(e))),
        }
    }

    /// Verifies the chip IDs, then writes configuration and calibration.
    pub fn init(&mut self) -> Result<(), Error<I2C::Error>> {
        let manufacturer = self.read_register(reg::MANUFACTURER_ID)?;
        let die = self.read_register(reg::DIE_ID)?;
        if manufacturer != MANUFACTURER_TI || die != DIE_INA226 {
            return Err(Error::WrongChip { manufacturer, die });
        }
        self.configure()
    }

    fn configure(&mut self) -> Result<(), Error<I2C::Error>> {
        self.write_register(reg::CONFIG, CONFIG_VALUE)?;
        self.write_register(reg::CALIBRATION, self.cal.cal)
    }

    /// The derived calibration.
    pub fn calibration(&self) -> Calibration {
        self.cal
    }

    /// Reads a 16-bit register: `write([reg])`, then `read(2)`.
    pub fn read_register(&mut self, register: u8) -> Result<u16, Error<I2C::Error>> {
        dc::read_register(&mut self.i2c, self.address, register).map_err(Error::I2c)
    }

    /// Writes a 16-bit register.
    pub fn write_register(&mut self, register: u8, value: u16) -> Result<(), Error<I2C::Error>> {
        dc::write_register(&mut self.i2c, self.address, register, value).map_err(Error::I2c)
    }

    /// Reads calibration (check), mask/enable (OVF), bus, shunt, current, power.
    pub fn measure(&mut self) -> Result<DcReading, Error<I2C::Error>> {
        let found = self.read_register(reg::CALIBRATION)?;
        if found != self.cal.cal {
            if found == 0xFFFF {
                return Err(Error::AllOnes);
            }
            self.configure()?;
            return Err(Error::CalibrationLost {
                expected: self.cal.cal,
                found,
            });
        }
        let flags = self.read_register(reg::MASK_ENABLE)?;
        let bus = self.read_register(reg::BUS_VOLTAGE)?;
        let shunt = self.read_register(reg::SHUNT_VOLTAGE)?;
        let current = self.read_register(reg::CURRENT)?;
        let power = self.read_register(reg::POWER)?;
        if super::plausible::all_ones(&[flags, bus, shunt, current, power]) || bus == 0xFFFF {
            return Err(Error::AllOnes);
        }
        if flags & OVF != 0 {
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
        Error::I2c(bus) => dc::i2c_hal_error(meter, address, "INA226", &bus),
        Error::Config(msg) => MeterError::new(meter, msg)
            .with_hint("check shunt_ohms and max_current_a (the INA226 shunt range is 81.92 mV)"),
        Error::WrongChip { .. } => MeterError::new(meter, e.to_string()).with_hint(
            "the device at this address is not an INA226 (an INA219 has no ID registers: use kind = \"ina219\")",
        ),
        Error::Overflow => MeterError::new(meter, e.to_string())
            .with_hint("the current exceeds max_current_a or shunt_ohms is wrong"),
        other => MeterError::new(meter, other.to_string()),
    }
}

impl<I2C> DcSensor for Ina226<I2C>
where
    I2C: I2c + Send,
{
    fn sample(&mut self, meter: &str) -> Result<DcReading, MeterError> {
        let address = self.address;
        self.measure().map_err(|e| meter_error(meter, address, e))
    }
}
