//! A hand-written Modbus RTU master on one serial line, generic over a
//! [`SerialPort`]: framing, CRC, timing and retries. It knows nothing of
//! meters; the profiles in [`super`] read their registers through it.
//!
//! # Protocol (Modbus over serial line V1.02)
//! - Request `unit, 0x04, start_hi, start_lo, count_hi, count_lo, crc_lo,
//!   crc_hi` (function 0x04, read input registers); the CRC is
//!   CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF), sent low byte first.
//! - Normal response `unit, 0x04, byte_count, data…, crc_lo, crc_hi`;
//!   exception response `unit, 0x84, code, crc_lo, crc_hi`.
//! - Frames are separated by at least t3.5 (3.5 character times of 11 bits;
//!   1.75 ms fixed above 19200 Bd): the master waits that long after the last
//!   frame before it sends. The end of a response is found from its length
//!   (byte count), not from t1.5 silence, which Linux userspace cannot time
//!   reliably (termios `VTIME` has 100 ms resolution).
//! - Leading 0x00/0xFF bytes before the unit id (line turn-around noise of
//!   many RS-485 adapters) are dropped.
//! - A response that does not arrive within `timeout_ms`, fails its CRC, or
//!   is malformed is retried up to `retries` times (stale input is discarded
//!   before each attempt). An exception response is the device's answer and
//!   is not retried.

use std::io;
use std::time::{Duration, Instant};

use thiserror::Error;

/// Function code: read input registers.
pub const FN_READ_INPUT_REGISTERS: u8 = 0x04;

/// A byte-oriented serial port, as the RTU master needs it. The Pi
/// implementation (rppal `Uart`) lives in `crate::platform::uart`; tests use a script.
pub trait SerialPort: Send {
    /// Writes the whole frame and waits until it has been transmitted.
    fn write_all(&mut self, data: &[u8]) -> io::Result<()>;
    /// Reads what is available into `buf`, waiting at most about `timeout`
    /// for the first byte. `Ok(0)` means nothing arrived.
    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize>;
    /// Discards unread input (e.g. a late answer to a timed-out request).
    fn clear_input(&mut self) -> io::Result<()>;
}

/// CRC-16/MODBUS of `data` (append it low byte first).
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// The 8-byte "read input registers" request frame.
pub fn read_input_registers_request(unit: u8, start: u16, count: u16) -> [u8; 8] {
    let [sh, sl] = start.to_be_bytes();
    let [ch, cl] = count.to_be_bytes();
    let body = [unit, FN_READ_INPUT_REGISTERS, sh, sl, ch, cl];
    let [crc_lo, crc_hi] = crc16(&body).to_le_bytes();
    [
        body[0], body[1], body[2], body[3], body[4], body[5], crc_lo, crc_hi,
    ]
}

/// Silent interval t3.5 between frames at `baud` (11-bit characters;
/// fixed 1.75 ms above 19200 Bd as the spec recommends).
pub fn t35(baud: u32) -> Duration {
    if baud == 0 || baud > 19_200 {
        Duration::from_micros(1750)
    } else {
        // 3.5 characters × 11 bits = 38.5 bit times, rounded up to whole µs.
        Duration::from_micros(38_500_000u64.div_ceil(u64::from(baud)))
    }
}

/// The name of a Modbus exception code.
pub fn exception_name(code: u8) -> &'static str {
    match code {
        0x01 => "illegal function",
        0x02 => "illegal data address",
        0x03 => "illegal data value",
        0x04 => "server device failure",
        0x05 => "acknowledge",
        0x06 => "server device busy",
        0x08 => "memory parity error",
        0x0A => "gateway path unavailable",
        0x0B => "gateway target device failed to respond",
        _ => "unknown exception",
    }
}

/// Modbus RTU errors.
#[derive(Debug, Error)]
pub enum ModbusError {
    /// The serial port failed.
    #[error("serial I/O error: {0}")]
    Io(#[from] io::Error),
    /// No (complete) response in time.
    #[error("no response from unit {unit} within {timeout_ms} ms ({received} bytes received)")]
    Timeout {
        /// Addressed unit.
        unit: u8,
        /// Configured timeout.
        timeout_ms: u64,
        /// Bytes of a partial frame, if any.
        received: usize,
    },
    /// The frame's CRC does not match its content.
    #[error("CRC mismatch: frame carries {received:#06x}, computed {computed:#06x}")]
    Crc {
        /// CRC in the frame.
        received: u16,
        /// CRC computed over the frame.
        computed: u16,
    },
    /// The device answered with an exception.
    #[error("exception {code:#04x} ({name}) from unit {unit} for function {function:#04x}")]
    Exception {
        /// Answering unit.
        unit: u8,
        /// Requested function.
        function: u8,
        /// Exception code.
        code: u8,
        /// Its name.
        name: &'static str,
    },
    /// A response that is not an answer to the request.
    #[error("malformed response: {0}")]
    Malformed(String),
}

impl ModbusError {
    /// Whether another attempt may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ModbusError::Timeout { .. } | ModbusError::Crc { .. } | ModbusError::Malformed(_)
        )
    }
}

/// Expected total length of the response frame in `buf` so far, once known.
fn expected_len(buf: &[u8], function: u8) -> Result<Option<usize>, ModbusError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    if buf[1] == function | 0x80 {
        return Ok(Some(5));
    }
    if buf[1] != function {
        return Err(ModbusError::Malformed(format!(
            "function {:#04x} in answer to {function:#04x}",
            buf[1]
        )));
    }
    if buf.len() < 3 {
        return Ok(None);
    }
    Ok(Some(3 + usize::from(buf[2]) + 2))
}

/// Checks a complete response frame and extracts its registers.
pub fn parse_read_response(
    frame: &[u8],
    unit: u8,
    function: u8,
    count: u16,
) -> Result<Vec<u16>, ModbusError> {
    if frame.len() < 5 {
        return Err(ModbusError::Malformed(format!("{} bytes", frame.len())));
    }
    let (body, crc_bytes) = frame.split_at(frame.len() - 2);
    let received = u16::from_le_bytes([crc_bytes[0], crc_bytes[1]]);
    let computed = crc16(body);
    if received != computed {
        return Err(ModbusError::Crc { received, computed });
    }
    if body[0] != unit {
        return Err(ModbusError::Malformed(format!(
            "answer from unit {} instead of {unit}",
            body[0]
        )));
    }
    if body[1] == function | 0x80 {
        return Err(ModbusError::Exception {
            unit,
            function,
            code: body[2],
            name: exception_name(body[2]),
        });
    }
    if body[1] != function {
        return Err(ModbusError::Malformed(format!("function {:#04x}", body[1])));
    }
    let n = usize::from(body[2]);
    if n != usize::from(count) * 2 || body.len() != 3 + n {
        return Err(ModbusError::Malformed(format!(
            "byte count {n} for {count} registers"
        )));
    }
    Ok(body[3..]
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect())
}

/// A Modbus RTU master on one serial line.
#[derive(Debug)]
pub struct RtuMaster<P> {
    /// The line.
    port: P,
    /// Inter-frame silence for the line's baud rate.
    t35: Duration,
    /// How long to wait for a response.
    timeout: Duration,
    /// Extra attempts after a retryable failure.
    retries: u32,
    /// End of the last frame on the line, to honour t3.5 before the next.
    last_activity: Option<Instant>,
}

impl<P: SerialPort> RtuMaster<P> {
    /// A master on `port` running at `baud`.
    pub fn new(port: P, baud: u32, timeout: Duration, retries: u32) -> Self {
        RtuMaster {
            port,
            t35: t35(baud),
            timeout,
            retries,
            last_activity: None,
        }
    }

    /// Reads `count` input registers from `start` (function 0x04), retrying
    /// timeouts, CRC errors and malformed frames.
    pub fn read_input_registers(
        &mut self,
        unit: u8,
        start: u16,
        count: u16,
    ) -> Result<Vec<u16>, ModbusError> {
        let mut attempt = 0;
        loop {
            match self.transact(unit, start, count) {
                Ok(regs) => return Ok(regs),
                Err(e) if e.retryable() && attempt < self.retries => {
                    log::debug!("modbus unit {unit}: {e}; retrying");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn transact(&mut self, unit: u8, start: u16, count: u16) -> Result<Vec<u16>, ModbusError> {
        if let Some(t) = self.last_activity {
            let quiet = t + self.t35;
            let now = Instant::now();
            if quiet > now {
                std::thread::sleep(quiet - now);
            }
        }
        self.port.clear_input()?;
        let request = read_input_registers_request(unit, start, count);
        self.port.write_all(&request)?;
        let sent = Instant::now();
        self.last_activity = Some(sent);
        let deadline = sent + self.timeout;
        let mut frame: Vec<u8> = Vec::with_capacity(5 + 2 * usize::from(count));
        let mut chunk = [0u8; 256];
        loop {
            if let Some(n) = expected_len(&frame, FN_READ_INPUT_REGISTERS)? {
                if frame.len() >= n {
                    frame.truncate(n);
                    break;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                self.last_activity = Some(now);
                return Err(ModbusError::Timeout {
                    unit,
                    timeout_ms: self.timeout.as_millis() as u64,
                    received: frame.len(),
                });
            }
            let got = self.port.read(&mut chunk, deadline - now)?;
            frame.extend_from_slice(&chunk[..got]);
            // RS-485 adapters often emit a 0x00 or 0xFF while the line turns
            // around; such bytes before the unit id are noise, not a frame.
            let noise = frame
                .iter()
                .take_while(|&&b| (b == 0x00 || b == 0xFF) && b != unit)
                .count();
            frame.drain(..noise);
        }
        self.last_activity = Some(Instant::now());
        parse_read_response(&frame, unit, FN_READ_INPUT_REGISTERS, count)
    }

    /// Gives the port back.
    pub fn destroy(self) -> P {
        self.port
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_of_spec_example() {
        // Modbus over serial line V1.02, §6.2.2 style: 01 04 00 00 00 02 → CRC 0xCB71 (71 CB on the wire).
        assert_eq!(crc16(&[0x01, 0x04, 0x00, 0x00, 0x00, 0x02]), 0xCB71);
    }

    #[test]
    fn t35_values() {
        assert_eq!(t35(38_400), Duration::from_micros(1750));
        // 9600 Bd: 3.5 × 11 / 9600 s ≈ 4.01 ms.
        let t = t35(9600);
        assert!(
            t >= Duration::from_micros(4000) && t <= Duration::from_micros(4200),
            "{t:?}"
        );
    }
}
