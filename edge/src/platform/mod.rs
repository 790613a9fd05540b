//! The Raspberry Pi's buses, opened with rppal: the only code that names
//! rppal.
//!
//! Drivers in [`crate::meters`] are generic over embedded-hal 1.0 (and the
//! Modbus master over [`SerialPort`](crate::meters::modbus::SerialPort));
//! this module opens the concrete peripherals, one file per peripheral, and
//! turns every failure into a [`MeterError`] with a hint an installer can act
//! on ([`hints`]). [`open`] builds the meter a `[[meter]]` table describes.
//! rppal is in maintenance mode since 2025: moving to `linux-embedded-hal`
//! means rewriting this folder only.
//!
//! | meter kind | peripheral                                   | device node            | group    | `/boot/firmware/config.txt` |
//! |------------|----------------------------------------------|------------------------|----------|-----------------------------|
//! | `ina219`, `ina226` | `rppal::i2c::I2c` (feature `hal`)    | `/dev/i2c-<bus>`       | `i2c`    | `dtparam=i2c_arm=on`        |
//! | `atm90e32` | `rppal::spi::Spi` + `SimpleHalSpiDevice`, mode 3 | `/dev/spidev<bus>.<cs>` | `spi` | `dtparam=spi=on`            |
//! | `pulse`    | `rppal::gpio::InputPin`, async interrupt     | `/dev/gpiochip*`       | `gpio`   | —                           |
//! | `modbus`   | `rppal::uart::Uart::with_path`               | `/dev/ttyUSB0`, `/dev/ttyAMA0` | `dialout` | `enable_uart=1` (+ `dtoverlay=disable-bt`) |
//!
//! # Notes
//! - rppal's embedded-hal `I2c::transaction` is emulated as separate write
//!   and read transfers (a STOP in between). The drivers never rely on a
//!   repeated start.
//! - rppal builds for x86_64 as well; on a host without the device node,
//!   opening fails with "… missing" and the `config.txt` line to add, and on
//!   a machine that is not a Pi GPIO reports "not a Raspberry Pi".
//! - On a Pi 5 the header's I2C is still `/dev/i2c-1`; SPI0 is
//!   `/dev/spidev0.*`; the header UART is `/dev/ttyAMA0` once enabled.

pub mod gpio;
pub mod hints;
pub mod i2c;
pub mod spi;
pub mod uart;

use std::path::Path;

use crate::meters::simulated::Simulated;
use crate::meters::{Meter, MeterConfig, MeterError};

pub use hints::is_raspberry_pi;
pub use i2c::{scan_i2c, I2cDevice};

/// Opens the meter a config table describes. `state_dir` is where a meter
/// may persist state (e.g. a pulse counter). On a host without the bus (not
/// a Pi, bus not enabled) this fails with a [`MeterError`] whose hint says
/// what to enable, never with a panic.
pub fn open(cfg: &MeterConfig, state_dir: &Path) -> Result<Box<dyn Meter>, MeterError> {
    match cfg {
        MeterConfig::Simulated(c) => Ok(Box::new(Simulated::open(c.clone(), state_dir)?)),
        MeterConfig::Ina219(c) => i2c::open_ina219(c, state_dir),
        MeterConfig::Ina226(c) => i2c::open_ina226(c, state_dir),
        MeterConfig::Atm90e32(c) => spi::open_atm90e32(c, state_dir),
        MeterConfig::Pulse(c) => gpio::open_pulse(c, state_dir),
        MeterConfig::Modbus(c) => uart::open_modbus(c),
    }
}
