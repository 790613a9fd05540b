//! Serial lines (`/dev/ttyUSB0`, `/dev/ttyAMA0`; group `dialout`): Modbus
//! RTU meters through rppal's `Uart::with_path`, which also opens USB
//! adapters. The header UART is `/dev/ttyAMA0` once `enable_uart=1` (and
//! `dtoverlay=disable-bt`) is set.

use std::io;
use std::time::Duration;

use rppal::uart::{Parity as UartParity, Queue, Uart};

use super::hints::open_error;
use crate::meters::modbus::{ModbusConfig, ModbusMeter, Parity, SerialPort};
use crate::meters::{Meter, MeterError};

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
