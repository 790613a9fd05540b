//! SPI (`/dev/spidev<bus>.<cs>`, group `spi`, `dtparam=spi=on`): the
//! ATM90E32 through rppal's `SimpleHalSpiDevice`, mode 3. On a Pi 5 SPI0 is
//! `/dev/spidev0.*`.

use std::path::Path;

use rppal::spi::{Bus, Mode, SimpleHalSpiDevice, SlaveSelect, Spi};

use super::hints::open_error;
use crate::meters::atm90e32::{Atm90e32Config, Atm90e32Meter};
use crate::meters::{Meter, MeterError};

/// Opens `/dev/spidev<bus>.<cs>` as an embedded-hal `SpiDevice`.
pub fn open_spi(
    meter: &str,
    bus: u8,
    cs: u8,
    clock_hz: u32,
    mode: Mode,
) -> Result<SimpleHalSpiDevice, MeterError> {
    let node = format!("/dev/spidev{bus}.{cs}");
    let b = match bus {
        0 => Bus::Spi0,
        1 => Bus::Spi1,
        2 => Bus::Spi2,
        3 => Bus::Spi3,
        4 => Bus::Spi4,
        5 => Bus::Spi5,
        6 => Bus::Spi6,
        _ => {
            return Err(MeterError::new(
                meter,
                format!("SPI bus {bus} does not exist (0–6)"),
            ))
        }
    };
    let s = match cs {
        0 => SlaveSelect::Ss0,
        1 => SlaveSelect::Ss1,
        2 => SlaveSelect::Ss2,
        _ => {
            return Err(MeterError::new(
                meter,
                format!("chip_select {cs} not supported (0–2)"),
            ))
        }
    };
    let spi = Spi::new(b, s, clock_hz, mode).map_err(|e| match e {
        rppal::spi::Error::Io(io) => open_error(
            meter,
            &node,
            &io,
            "spi",
            "add `dtparam=spi=on` to /boot/firmware/config.txt (SPI1: `dtoverlay=spi1-1cs`) and reboot",
            true,
        ),
        other => MeterError::new(meter, format!("cannot configure {node}: {other}")),
    })?;
    Ok(SimpleHalSpiDevice::new(spi))
}

/// Opens and initialises an ATM90E32.
pub fn open_atm90e32(cfg: &Atm90e32Config, state_dir: &Path) -> Result<Box<dyn Meter>, MeterError> {
    let dev = open_spi(&cfg.id, cfg.bus, cfg.chip_select, cfg.clock_hz, Mode::Mode3)?;
    Ok(Box::new(Atm90e32Meter::new(cfg, dev, state_dir)?))
}
