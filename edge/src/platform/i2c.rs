//! I2C (`/dev/i2c-<bus>`, group `i2c`, `dtparam=i2c_arm=on`): the INA219
//! and INA226, and the bus scan behind `ems-edge scan i2c`.
//!
//! rppal's embedded-hal `I2c::transaction` is emulated as separate write and
//! read transfers (a STOP in between); the drivers never rely on a repeated
//! start. On a Pi 5 the header's I2C is still `/dev/i2c-1`.

use std::path::Path;

use rppal::i2c::I2c;

use super::hints::open_error;
use crate::meters::dc::{DcMeter, InaConfig};
use crate::meters::ina219::{self, Ina219};
use crate::meters::ina226::{self, Ina226};
use crate::meters::{Meter, MeterError};

/// Opens `/dev/i2c-<bus>`.
pub fn open_i2c(meter: &str, bus: u8) -> Result<I2c, MeterError> {
    let node = format!("/dev/i2c-{bus}");
    I2c::with_bus(bus).map_err(|e| match e {
        rppal::i2c::Error::Io(io) => open_error(
            meter,
            &node,
            &io,
            "i2c",
            "add `dtparam=i2c_arm=on` to /boot/firmware/config.txt (or `raspi-config nonint do_i2c 0`) and reboot",
            true,
        ),
        other => MeterError::new(meter, format!("cannot open {node}: {other}")),
    })
}

/// Opens an INA219 and wraps it as a meter.
pub fn open_ina219(cfg: &InaConfig, state_dir: &Path) -> Result<Box<dyn Meter>, MeterError> {
    cfg.validate()?;
    let bus = open_i2c(&cfg.id, cfg.bus)?;
    let mut chip = Ina219::new(bus, cfg.address, cfg.shunt_ohms, cfg.max_current_a)
        .map_err(|(_, e)| ina219::meter_error(&cfg.id, cfg.address, e))?;
    chip.init()
        .map_err(|e| ina219::meter_error(&cfg.id, cfg.address, e))?;
    Ok(Box::new(DcMeter::new(&cfg.id, chip, state_dir)?))
}

/// Opens an INA226 and wraps it as a meter.
pub fn open_ina226(cfg: &InaConfig, state_dir: &Path) -> Result<Box<dyn Meter>, MeterError> {
    cfg.validate()?;
    let bus = open_i2c(&cfg.id, cfg.bus)?;
    let mut chip = Ina226::new(bus, cfg.address, cfg.shunt_ohms, cfg.max_current_a)
        .map_err(|(_, e)| ina226::meter_error(&cfg.id, cfg.address, e))?;
    chip.init()
        .map_err(|e| ina226::meter_error(&cfg.id, cfg.address, e))?;
    Ok(Box::new(DcMeter::new(&cfg.id, chip, state_dir)?))
}

/// One responding I2C address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct I2cDevice {
    /// 7-bit address.
    pub address: u8,
    /// A kernel driver has claimed it (i2cdetect's `UU`).
    pub busy: bool,
    /// Confirmed identity from ID registers, if any.
    pub identified: Option<&'static str>,
}

/// Probes addresses 0x03–0x77 like `i2cdetect -y`: SMBus quick write,
/// except a read-byte for 0x30–0x37 and 0x50–0x5F (EEPROMs that a quick
/// write could corrupt). Addresses 0x40–0x4F are additionally asked for TI's
/// manufacturer/die ID registers (0xFE/0xFF) to tell an INA226 from an
/// INA219.
pub fn scan_i2c(bus: u8) -> Result<Vec<I2cDevice>, MeterError> {
    let label = format!("i2c-{bus}");
    let mut i2c = open_i2c(&label, bus)?;
    let caps = i2c.capabilities();
    let mut found = Vec::new();
    for address in 0x03u8..=0x77 {
        if let Err(e) = i2c.set_slave_address(u16::from(address)) {
            if let rppal::i2c::Error::Io(io) = &e {
                if io.raw_os_error() == Some(16) {
                    // EBUSY: a kernel driver owns this address.
                    found.push(I2cDevice {
                        address,
                        busy: true,
                        identified: None,
                    });
                }
            }
            continue;
        }
        let use_read = (0x30..=0x37).contains(&address)
            || (0x50..=0x5F).contains(&address)
            || !caps.smbus_quick_command();
        let ok = if use_read {
            i2c.smbus_receive_byte().is_ok()
        } else {
            i2c.smbus_quick_command(false).is_ok()
        };
        if !ok {
            continue;
        }
        let identified = if (0x40..=0x4F).contains(&address) {
            let m = i2c.smbus_read_word_swapped(0xFE).ok();
            let d = i2c.smbus_read_word_swapped(0xFF).ok();
            match (m, d) {
                (Some(m), Some(d)) => ina226::identify_ti(m, d),
                _ => None,
            }
        } else {
            None
        };
        found.push(I2cDevice {
            address,
            busy: false,
            identified,
        });
    }
    Ok(found)
}
