//! The Raspberry Pi's buses, opened with rppal: the only module that names
//! rppal.
//!
//! Drivers in [`crate::meters`] are generic over embedded-hal 1.0 (and the
//! Modbus master over [`SerialPort`]); this module opens the concrete
//! peripherals and turns every failure into a [`MeterError`] with a hint an
//! installer can act on. rppal is in maintenance mode since 2025: moving to
//! `linux-embedded-hal` means rewriting this one file.
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

use std::io;
use std::path::Path;
use std::time::Duration;

use rppal::gpio::{Gpio, Trigger};
use rppal::i2c::I2c;
use rppal::spi::{Bus, Mode, SimpleHalSpiDevice, SlaveSelect, Spi};
use rppal::uart::{Parity as UartParity, Queue, Uart};

use crate::meters::atm90e32::{Atm90e32Config, Atm90e32Meter};
use crate::meters::dc::{DcMeter, InaConfig};
use crate::meters::ina219::{self, Ina219};
use crate::meters::ina226::{self, Ina226};
use crate::meters::modbus::{ModbusConfig, ModbusMeter, Parity, SerialPort};
use crate::meters::pulse::{self, Pull, PulseConfig, PulseMeter};
use crate::meters::{Meter, MeterError};

/// Whether this machine identifies itself as a Raspberry Pi (device tree
/// model string).
pub fn is_raspberry_pi() -> bool {
    std::fs::read_to_string("/proc/device-tree/model")
        .map(|m| m.contains("Raspberry Pi"))
        .unwrap_or(false)
}

/// Hint for an `io::Error` while opening `node`.
///
/// `pi_only`: the node only exists on a Pi (I2C/SPI), so on another host the
/// hint says so; a USB serial adapter works on any Linux host.
fn open_error(
    meter: &str,
    node: &str,
    e: &io::Error,
    group: &str,
    enable: &str,
    pi_only: bool,
) -> MeterError {
    let msg = format!("cannot open {node}: {e}");
    match e.kind() {
        io::ErrorKind::NotFound => {
            let host = if !pi_only || is_raspberry_pi() {
                String::new()
            } else {
                " (this host is not a Raspberry Pi: real meters need the Pi's buses; \
                 use kind = \"simulated\" here)"
                    .to_string()
            };
            MeterError::new(meter, msg).with_hint(format!("{node} missing: {enable}{host}"))
        }
        io::ErrorKind::PermissionDenied => MeterError::new(meter, msg).with_hint(format!(
            "permission denied: add the service user to the {group} group \
             (`sudo usermod -aG {group} <user>`, then log in again / restart the service)"
        )),
        _ => MeterError::new(meter, msg),
    }
}

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

fn gpio_error(meter: &str, e: rppal::gpio::Error) -> MeterError {
    use rppal::gpio::Error as G;
    match e {
        G::UnknownModel => MeterError::new(meter, "GPIO: not a Raspberry Pi (or an unknown model)")
            .with_hint("pulse meters need a Raspberry Pi; use kind = \"simulated\" elsewhere"),
        G::PermissionDenied(node) => {
            MeterError::new(meter, format!("GPIO: permission denied on {node}")).with_hint(
                "add the service user to the gpio group (`sudo usermod -aG gpio <user>`)",
            )
        }
        G::PinUsed(p) => MeterError::new(meter, format!("GPIO{p} is already in use"))
            .with_hint("two meters (or another program) use the same pin"),
        G::PinNotAvailable(p) => {
            MeterError::new(meter, format!("GPIO{p} does not exist on this Pi"))
                .with_hint("`pin` is a BCM GPIO number, not a header pin number")
        }
        other => MeterError::new(meter, format!("GPIO: {other}")),
    }
}

/// Opens a pulse meter: the pin with its bias and an async interrupt that
/// feeds the shared counter with the kernel's event timestamps.
pub fn open_pulse(cfg: &PulseConfig, state_dir: &Path) -> Result<Box<dyn Meter>, MeterError> {
    let mut meter: PulseMeter<rppal::gpio::InputPin> = PulseMeter::new(cfg, state_dir)?;
    let gpio = Gpio::new().map_err(|e| gpio_error(&cfg.id, e))?;
    let pin = gpio.get(cfg.pin).map_err(|e| gpio_error(&cfg.id, e))?;
    let (mut input, trigger) = match cfg.pull {
        Pull::Up => (pin.into_input_pullup(), Trigger::FallingEdge),
        Pull::Down => (pin.into_input_pulldown(), Trigger::RisingEdge),
        Pull::None => (pin.into_input(), Trigger::FallingEdge),
    };
    let shared = meter.shared();
    let debounce = Some(Duration::from_millis(cfg.debounce_ms));
    input
        .set_async_interrupt(trigger, debounce, move |event| {
            pulse::record_event(&shared, event.timestamp, Some(event.seqno));
        })
        .map_err(|e| gpio_error(&cfg.id, e))?;
    meter.attach(input);
    Ok(Box::new(meter))
}

/// A serial port on rppal's `Uart` (also USB adapters via `with_path`).
pub struct UartPort {
    /// The port.
    uart: Uart,
}

fn uart_io(e: rppal::uart::Error) -> io::Error {
    match e {
        rppal::uart::Error::Io(io) => io,
        other => io::Error::other(other.to_string()),
    }
}

impl SerialPort for UartPort {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        let mut rest = data;
        while !rest.is_empty() {
            let n = self.uart.write(rest).map_err(uart_io)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "UART accepted no bytes",
                ));
            }
            rest = &rest[n..];
        }
        // Wait until the frame is on the wire before timing the response.
        self.uart.drain().map_err(uart_io)
    }

    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        // termios VTIME: 0.1 s resolution, 25.5 s maximum.
        let t = timeout.clamp(Duration::from_millis(100), Duration::from_millis(25_500));
        self.uart.set_read_mode(0, t).map_err(uart_io)?;
        self.uart.read(buf).map_err(uart_io)
    }

    fn clear_input(&mut self) -> io::Result<()> {
        self.uart.flush(Queue::Input).map_err(uart_io)
    }
}

/// Opens a Modbus meter's serial port.
pub fn open_modbus(cfg: &ModbusConfig) -> Result<Box<dyn Meter>, MeterError> {
    cfg.validate()?;
    let parity = match cfg.parity {
        Parity::None => UartParity::None,
        Parity::Even => UartParity::Even,
        Parity::Odd => UartParity::Odd,
    };
    let mut uart =
        Uart::with_path(&cfg.port, cfg.baud(), parity, 8, cfg.stop_bits).map_err(|e| match e {
            rppal::uart::Error::Io(io) => open_error(
                &cfg.id,
                &cfg.port,
                &io,
                "dialout",
                "plug in the USB-RS485 adapter (check `dmesg`), or for the header UART add \
                 `enable_uart=1` and `dtoverlay=disable-bt` to /boot/firmware/config.txt and reboot",
                false,
            ),
            other => MeterError::new(&cfg.id, format!("cannot configure {}: {other}", cfg.port))
                .with_hint("check baud, parity and stop_bits"),
        })?;
    uart.set_write_mode(true)
        .map_err(|e| MeterError::new(&cfg.id, format!("cannot configure {}: {e}", cfg.port)))?;
    Ok(Box::new(ModbusMeter::new(cfg, UartPort { uart })))
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
                (Some(m), Some(d)) => crate::tools::identify_ti(m, d),
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
