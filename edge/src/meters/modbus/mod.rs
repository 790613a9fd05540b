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
//! The line protocol is in [`rtu`]; this module holds the `[[meter]]`
//! table, the register maps of the supported meters and the [`Meter`].
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

pub mod rtu;

use std::time::Duration;

use serde::Deserialize;

use super::{plausible, Measurement, Meter, MeterError};

pub use rtu::{
    crc16, exception_name, parse_read_response, read_input_registers_request, t35, ModbusError,
    RtuMaster, SerialPort, FN_READ_INPUT_REGISTERS,
};

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
    fn resume_energy(&mut self, _floor: &super::persist::EnergyFloor) {
        // The import counter is the meter's own register: nothing to carry.
    }

    fn counts_energy_itself(&self) -> bool {
        true
    }
}
