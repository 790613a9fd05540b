//! Modbus RTU meters over a UART or a USB-RS485 adapter, with a hand-written
//! RTU master.
//!
//! # Wiring
//! **RS-485 meters (Eastron SDM120 / SDM630).** Use a USB-RS485 adapter
//! (appears as `/dev/ttyUSB0`) or a Pi RS-485 HAT on the PL011 UART
//! (`/dev/ttyAMA0`, GPIO14 TX pin 8, GPIO15 RX pin 10, with the HAT's
//! direction control). Connect A→A, B→B (some vendors swap the labels: if
//! nothing answers, swap them), share the signal ground if the adapter has
//! one, and terminate both ends of runs longer than a few metres with
//! 120 Ω. Several meters may share one bus with distinct `unit_id`s.
//!
//! **PZEM-004T v3 (TTL UART).** TX/RX/5V/GND to a USB-TTL adapter or to the
//! Pi's UART (TX pin 8, RX pin 10). The module's optocouplers are driven
//! from its 5 V pin; with a 3.3 V Pi UART the common fix is the documented
//! resistor mod or a level shifter. The PZEM is powered from the mains
//! side: it answers only while AC voltage is connected.
//!
//! For the Pi's own UART: `enable_uart=1` and (to get the PL011 on GPIO14/15
//! instead of the mini-UART) `dtoverlay=disable-bt` in
//! `/boot/firmware/config.txt`, and remove `console=serial0,…` from
//! `cmdline.txt`. The service user needs the `dialout` group.
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
//!
//! # Profiles
//! | profile    | registers (function 0x04)                                  | encoding |
//! |------------|------------------------------------------------------------|----------|
//! | `sdm120`   | 0x0000 V, 0x0006 A, 0x000C W, 0x0018 var, 0x001E PF, 0x0046 Hz, 0x0048 import kWh | IEEE-754 float32, big-endian word order |
//! | `sdm630`   | 0x0000–0x0023 per-phase V/A/W/VA/var/PF, 0x0046 Hz, 0x015A–0x015F per-phase import kWh | float32 big-endian |
//! | `pzem004t` | 0x0000 V ×0.1, 0x0001–02 A ×0.001, 0x0003–04 W ×0.1, 0x0005–06 Wh, 0x0007 Hz ×0.1, 0x0008 PF ×0.01 | u16 / u32 low word first |
//!
//! The `sdm630` yields one measurement per phase with ids `<id>-a`, `<id>-b`,
//! `<id>-c` (L1, L2, L3), the same scheme as the ATM90E32; no total is sent
//! so that dashboards summing meters do not count twice.

use std::io;
use std::time::{Duration, Instant};

use serde::Deserialize;
use thiserror::Error;

use super::{plausible, Measurement, Meter, MeterError};

/// Function code: read input registers.
pub const FN_READ_INPUT_REGISTERS: u8 = 0x04;

/// A byte-oriented serial port, as the RTU master needs it. The Pi
/// implementation (rppal `Uart`) lives in `crate::hw`; tests use a script.
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

/// IEEE-754 float from two registers, high word first (Eastron order):
/// registers `[0x4366, 0x0000]` (bytes `43 66 00 00`) → 230.0.
pub fn f32_be(hi: u16, lo: u16) -> f32 {
    f32::from_bits((u32::from(hi) << 16) | u32::from(lo))
}

/// 32-bit unsigned from two registers, low word first (PZEM-004T order).
pub fn u32_low_first(lo: u16, hi: u16) -> u32 {
    (u32::from(hi) << 16) | u32::from(lo)
}

/// Which meter is on the line.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Eastron SDM120 single-phase meter.
    Sdm120,
    /// Eastron SDM630 three-phase meter.
    Sdm630,
    /// Peacefair PZEM-004T v3.
    Pzem004t,
}

impl Profile {
    /// Factory-default baud rate.
    pub fn default_baud(self) -> u32 {
        match self {
            Profile::Sdm120 => 2400,
            Profile::Sdm630 => 9600,
            Profile::Pzem004t => 9600,
        }
    }
}

/// Serial parity.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    /// No parity bit (Eastron and PZEM default).
    #[default]
    None,
    /// Even parity (the Modbus specification's default).
    Even,
    /// Odd parity.
    Odd,
}

/// `kind = "modbus"` config table.
///
/// ```toml
/// [[meter]]
/// id = "house"
/// kind = "modbus"
/// profile = "sdm630"
/// port = "/dev/ttyUSB0"
/// baud = 9600
/// parity = "none"
/// unit_id = 1
/// timeout_ms = 500
/// retries = 2
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModbusConfig {
    /// Meter id (at most 30 characters for `sdm630`, which appends `-a` …).
    pub id: String,
    /// Register map.
    pub profile: Profile,
    /// Serial device, default `/dev/ttyUSB0`.
    #[serde(default = "default_port")]
    pub port: String,
    /// Baud rate; default per profile (SDM120 2400, SDM630 9600, PZEM 9600).
    #[serde(default)]
    pub baud: Option<u32>,
    /// Parity, default none.
    #[serde(default)]
    pub parity: Parity,
    /// Stop bits (1 or 2), default 1.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Modbus unit id (1–247; 0xF8 is the PZEM's "any" address), default 1.
    #[serde(default = "default_unit", alias = "address")]
    pub unit_id: u8,
    /// Response timeout in ms, default 500.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Extra attempts after a timeout/CRC error, default 2.
    #[serde(default = "default_retries")]
    pub retries: u32,
}

fn default_port() -> String {
    "/dev/ttyUSB0".to_string()
}
fn default_stop_bits() -> u8 {
    1
}
fn default_unit() -> u8 {
    1
}
fn default_timeout_ms() -> u64 {
    500
}
fn default_retries() -> u32 {
    2
}

impl ModbusConfig {
    /// The effective baud rate.
    pub fn baud(&self) -> u32 {
        self.baud.unwrap_or_else(|| self.profile.default_baud())
    }

    /// Rejects values the line cannot use.
    pub fn validate(&self) -> Result<(), MeterError> {
        if self.unit_id == 0 || (self.unit_id > 247 && self.unit_id != 0xF8) {
            return Err(MeterError::new(
                &self.id,
                format!(
                    "unit_id {} is not a Modbus server address (1–247)",
                    self.unit_id
                ),
            ));
        }
        if !(1..=2).contains(&self.stop_bits) {
            return Err(MeterError::new(&self.id, "stop_bits must be 1 or 2"));
        }
        if self.timeout_ms == 0 || self.timeout_ms > 10_000 {
            return Err(MeterError::new(&self.id, "timeout_ms must be 1 … 10000"));
        }
        if self.profile == Profile::Sdm630 && self.id.len() > 30 {
            return Err(MeterError::new(
                &self.id,
                "id longer than 30 characters cannot take the phase suffix",
            ));
        }
        Ok(())
    }
}

/// Reads an Eastron SDM120.
pub fn read_sdm120<P: SerialPort>(
    m: &mut RtuMaster<P>,
    unit: u8,
    id: &str,
) -> Result<Vec<Measurement>, ModbusError> {
    let mut f = |start: u16| -> Result<f64, ModbusError> {
        let r = m.read_input_registers(unit, start, 2)?;
        Ok(f64::from(f32_be(r[0], r[1])))
    };
    let voltage = f(0x0000)?;
    let current = f(0x0006)?;
    let power = f(0x000C)?;
    let reactive = f(0x0018)?;
    let pf = f(0x001E)?;
    let r = m.read_input_registers(unit, 0x0046, 4)?;
    let freq = f64::from(f32_be(r[0], r[1]));
    let import_kwh = f64::from(f32_be(r[2], r[3]));
    Ok(vec![Measurement {
        meter: id.to_string(),
        voltage_v: Some(voltage),
        current_a: Some(current),
        power_w: Some(power),
        reactive_power_var: Some(reactive),
        power_factor: Some(pf),
        frequency_hz: Some(freq),
        energy_wh: Some(import_kwh * 1000.0),
    }])
}

/// Reads an Eastron SDM630 (one measurement per phase).
pub fn read_sdm630<P: SerialPort>(
    m: &mut RtuMaster<P>,
    unit: u8,
    id: &str,
) -> Result<Vec<Measurement>, ModbusError> {
    let block = m.read_input_registers(unit, 0x0000, 0x24)?;
    let fl = |regs: &[u16], reg: usize| f64::from(f32_be(regs[reg], regs[reg + 1]));
    let f = m.read_input_registers(unit, 0x0046, 2)?;
    let freq = f64::from(f32_be(f[0], f[1]));
    let e = m.read_input_registers(unit, 0x015A, 6)?;
    Ok(["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, suffix)| Measurement {
            meter: format!("{id}-{suffix}"),
            voltage_v: Some(fl(&block, 2 * i)),
            current_a: Some(fl(&block, 0x06 + 2 * i)),
            power_w: Some(fl(&block, 0x0C + 2 * i)),
            reactive_power_var: Some(fl(&block, 0x18 + 2 * i)),
            power_factor: Some(fl(&block, 0x1E + 2 * i)),
            frequency_hz: Some(freq),
            energy_wh: Some(fl(&e, 2 * i) * 1000.0),
        })
        .collect())
}

/// Reads a PZEM-004T v3.
pub fn read_pzem004t<P: SerialPort>(
    m: &mut RtuMaster<P>,
    unit: u8,
    id: &str,
) -> Result<Vec<Measurement>, ModbusError> {
    let r = m.read_input_registers(unit, 0x0000, 10)?;
    if plausible::all_ones(&r[..9]) {
        return Err(ModbusError::Malformed("all registers read 0xFFFF".into()));
    }
    Ok(vec![pzem_measurement(id, &r)])
}

/// PZEM-004T v3 registers 0x0000–0x0009 → measurement.
pub fn pzem_measurement(id: &str, r: &[u16]) -> Measurement {
    Measurement {
        meter: id.to_string(),
        voltage_v: Some(f64::from(r[0]) * 0.1),
        current_a: Some(f64::from(u32_low_first(r[1], r[2])) * 0.001),
        power_w: Some(f64::from(u32_low_first(r[3], r[4])) * 0.1),
        energy_wh: Some(f64::from(u32_low_first(r[5], r[6]))),
        frequency_hz: Some(f64::from(r[7]) * 0.1),
        power_factor: Some(f64::from(r[8]) * 0.01),
        reactive_power_var: None,
    }
}

/// Explains a Modbus error to an installer.
pub fn meter_error(meter: &str, cfg_unit: u8, e: ModbusError) -> MeterError {
    let hint = match &e {
        ModbusError::Timeout { received: 0, .. } => format!(
            "nothing answered as unit {cfg_unit}: check A/B wiring (try swapping A and B), that baud/parity \
             match the meter's settings, the unit_id, and termination on long runs; a PZEM-004T answers \
             only with mains voltage connected"
        ),
        ModbusError::Timeout { .. } => {
            "an incomplete frame arrived: check baud rate, noise and termination".to_string()
        }
        ModbusError::Crc { .. } => {
            "corrupted frames: check baud/parity, grounding, termination and cable length".to_string()
        }
        ModbusError::Exception { code: 0x02, .. } => {
            "the meter does not have these registers: is `profile` right for this meter?".to_string()
        }
        ModbusError::Exception { .. } => "the meter refused the request".to_string(),
        ModbusError::Malformed(_) => {
            "another device may answer on this unit id, or the line is noisy".to_string()
        }
        ModbusError::Io(_) => "the serial port failed: is the USB adapter still plugged in?".to_string(),
    };
    MeterError::new(meter, e.to_string()).with_hint(hint)
}

/// A Modbus meter: a master plus a profile.
pub struct ModbusMeter<P> {
    /// Configured id.
    id: String,
    /// The line.
    master: RtuMaster<P>,
    /// Register map.
    profile: Profile,
    /// Server address.
    unit: u8,
}

impl<P: SerialPort> ModbusMeter<P> {
    /// A meter on `port` configured by `cfg`.
    pub fn new(cfg: &ModbusConfig, port: P) -> Self {
        ModbusMeter {
            id: cfg.id.clone(),
            master: RtuMaster::new(
                port,
                cfg.baud(),
                Duration::from_millis(cfg.timeout_ms),
                cfg.retries,
            ),
            profile: cfg.profile,
            unit: cfg.unit_id,
        }
    }

    /// Gives the port back.
    pub fn destroy(self) -> P {
        self.master.destroy()
    }
}

impl<P: SerialPort> Meter for ModbusMeter<P> {
    fn id(&self) -> &str {
        &self.id
    }

    fn read(&mut self) -> Result<Vec<Measurement>, MeterError> {
        let r = match self.profile {
            Profile::Sdm120 => read_sdm120(&mut self.master, self.unit, &self.id),
            Profile::Sdm630 => read_sdm630(&mut self.master, self.unit, &self.id),
            Profile::Pzem004t => read_pzem004t(&mut self.master, self.unit, &self.id),
        };
        let ms = r.map_err(|e| meter_error(&self.id, self.unit, e))?;
        plausible::check_all(&ms)?;
        Ok(ms)
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
