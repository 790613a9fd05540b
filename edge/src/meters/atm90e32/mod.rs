//! Microchip (Atmel) ATM90E32AS poly-phase energy metering IC over SPI.
//!
//! One `[[meter]]` table describes one chip; it yields one measurement per
//! configured phase with the ids `<id>-a`, `<id>-b`, `<id>-c` (so the meter
//! id may be at most 30 characters). A split-phase board that uses only the
//! A and C channels (e.g. CircuitSetup's split-phase meter) sets
//! `phases = ["a", "c"]`.
//!
//! # Wiring (Raspberry Pi, SPI0)
//! | ATM90E32 board | Pi header                      |
//! |----------------|--------------------------------|
//! | MOSI (SDI)     | pin 19 (GPIO10, SPI0 MOSI)     |
//! | MISO (SDO)     | pin 21 (GPIO9, SPI0 MISO)      |
//! | SCLK           | pin 23 (GPIO11, SPI0 SCLK)     |
//! | CS             | pin 24 (GPIO8, CE0) → `chip_select = 0`; pin 26 (GPIO7, CE1) → `1` |
//! | GND            | pin 25                         |
//! | 3.3 V          | pin 17 (only if the board is not self-powered) |
//!
//! Enable SPI with `dtparam=spi=on` in `/boot/firmware/config.txt`; the
//! service user needs the `spi` group (`/dev/spidev0.0`). The mains side of
//! a metering board is at line potential: connect the Pi only to the
//! isolated low-voltage header, never probe it while powered from the mains.
//!
//! The chip itself is driven by [`chip`]; this module is the edge's side:
//! the `[[meter]]` table and the [`Meter`] that turns the per-phase
//! readings into measurements.
//!
//! Because the energy registers clear on read, the meter accumulates them
//! into per-phase totals persisted in `<state_dir>/<id>.energy_wh`; energy
//! drained in a sample that is then skipped is added with the next good
//! one. A chip reset (brown-out) is detected, re-initialised, counted and
//! logged (see [`chip`]).
//! Voltage and current scales depend on the gains: calibrate `ugain`/`igain`
//! for your transformers and CTs against a reference meter (the values of the
//! board vendor's examples are a starting point).

pub mod chip;

use std::path::Path;
use std::time::Instant;

use embedded_hal::spi::SpiDevice;
use serde::Deserialize;

use super::persist::{log_resumed, EnergyFloor, StateFile};
use super::{plausible, Measurement, Meter, MeterError};

pub use chip::{
    active_power_w, current_a, energy_wh, frequency_hz, power_factor, reg, settings, voltage_v,
    Atm90e32, Error, Phase, PhaseReading, Settings, CFG_UNLOCK, MMODE0_3P4W, MMODE0_60HZ, PHASE_TH,
    SOFT_RESET_VALUE, START_TH,
};

/// `kind = "atm90e32"` config table.
///
/// ```toml
/// [[meter]]
/// id = "mains"
/// kind = "atm90e32"
/// bus = 0                 # SPI0
/// chip_select = 0         # CE0, pin 24
/// line_freq_hz = 50
/// pga_gain = 1
/// phases = ["a", "b", "c"]
/// ugain = [7305, 7305, 7305]
/// igain = [27961, 27961, 27961]
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Atm90e32Config {
    /// Meter id (≤ 30 characters; phases append `-a` …).
    pub id: String,
    /// SPI bus (`/dev/spidev<bus>.<cs>`), default 0.
    #[serde(default)]
    pub bus: u8,
    /// Chip select, default 0 (CE0).
    #[serde(default)]
    pub chip_select: u8,
    /// SPI clock in Hz, default 200 000.
    #[serde(default = "default_clock_hz")]
    pub clock_hz: u32,
    /// Phases to report, default all three.
    #[serde(default = "default_phases")]
    pub phases: Vec<Phase>,
    /// Mains frequency, 50 or 60 (default 50).
    #[serde(default = "default_line_freq")]
    pub line_freq_hz: u32,
    /// Current channel PGA gain, 1, 2 or 4 (default 1).
    #[serde(default = "default_pga_gain")]
    pub pga_gain: u8,
    /// Voltage RMS gains `UgainA/B/C`.
    pub ugain: [u16; 3],
    /// Current RMS gains `IgainA/B/C`.
    pub igain: [u16; 3],
}

fn default_clock_hz() -> u32 {
    200_000
}
fn default_phases() -> Vec<Phase> {
    vec![Phase::A, Phase::B, Phase::C]
}
fn default_line_freq() -> u32 {
    50
}
fn default_pga_gain() -> u8 {
    1
}

/// Explains a driver error to an installer.
pub fn meter_error<E: core::fmt::Debug>(meter: &str, e: Error<E>) -> MeterError {
    let hint = match &e {
        Error::Spi(_) => "check the SPI wiring and that SPI is enabled (dtparam=spi=on)",
        Error::Config(_) => "check line_freq_hz, pga_gain, ugain and igain",
        Error::Verify { found: 0, .. } => {
            "reads return 0: no chip answers on this chip select (check CS, MISO, power)"
        }
        Error::Verify { .. } => "a different chip or a wrong chip_select answered",
        Error::AllOnes => "MISO reads high: check MISO wiring and the board's power",
        Error::Reinitialised { .. } => "the board lost power briefly (brown-out?)",
    };
    MeterError::new(meter, e.to_string()).with_hint(hint)
}

/// The ATM90E32 as a [`Meter`]: per-phase measurements and energy totals.
pub struct Atm90e32Meter<SPI> {
    /// Configured id.
    id: String,
    /// The driver.
    chip: Atm90e32<SPI>,
    /// Reported phases.
    phases: Vec<Phase>,
    /// Per-phase energy totals (A, B, C), Wh.
    totals: [f64; 3],
    /// Where the totals survive restarts.
    state: StateFile,
}

impl<SPI: SpiDevice + Send> Atm90e32Meter<SPI> {
    /// Initialises the chip and loads the persisted energy totals.
    pub fn new(cfg: &Atm90e32Config, spi: SPI, state_dir: &Path) -> Result<Self, MeterError> {
        if cfg.id.len() > 30 {
            return Err(MeterError::new(&cfg.id, "id longer than 30 characters"));
        }
        if cfg.phases.is_empty() {
            return Err(MeterError::new(&cfg.id, "phases is empty"));
        }
        let s = settings(cfg.line_freq_hz, cfg.pga_gain, cfg.ugain, cfg.igain)
            .map_err(|e| meter_error::<SPI::Error>(&cfg.id, Error::Config(e)))?;
        let mut state = StateFile::new(state_dir, &cfg.id, "energy_wh");
        let totals = state
            .load::<String>()
            .map_err(|e| MeterError::new(&cfg.id, format!("cannot read energy state: {e}")))?
            .map(|s| parse_totals(&s))
            .transpose()
            .map_err(|e| MeterError::new(&cfg.id, e))?
            .unwrap_or([0.0; 3]);
        let mut chip = Atm90e32::new(spi, s);
        chip.init().map_err(|e| meter_error(&cfg.id, e))?;
        Ok(Atm90e32Meter {
            id: cfg.id.clone(),
            chip,
            phases: cfg.phases.clone(),
            totals,
            state,
        })
    }

    /// Reads at an explicit instant (for the persistence rate limit).
    pub fn read_at(&mut self, now: Instant) -> Result<Vec<Measurement>, MeterError> {
        let result = self.read_checked(now);
        if result.is_err() {
            // The last totals before a failure go to disk now.
            if let Err(e) = self.state.flush_pending() {
                log::warn!("meter {}: cannot persist energy: {e}", self.id);
            }
        }
        result
    }

    fn read_checked(&mut self, now: Instant) -> Result<Vec<Measurement>, MeterError> {
        let (freq, readings) = match self.chip.measure(&self.phases) {
            Ok(m) => m,
            Err(e) => {
                if let Error::Reinitialised { resets, .. } = e {
                    log::warn!(
                        "meter {}: the ATM90E32 was reset (brown-out?) and is initialised again ({resets} resets since start); the energy it counted since the last read is lost",
                        self.id
                    );
                }
                return Err(meter_error(&self.id, e));
            }
        };
        let mut out = Vec::with_capacity(readings.len());
        for (ph, r) in self.phases.iter().zip(readings.iter()) {
            out.push(Measurement {
                meter: format!("{}-{}", self.id, ph.suffix()),
                voltage_v: Some(r.voltage_v),
                current_a: Some(r.current_a),
                power_w: Some(r.power_w),
                power_factor: Some(r.power_factor),
                frequency_hz: Some(freq),
                energy_wh: None,
                reactive_power_var: None,
            });
        }
        // An implausible sample is skipped; the energy drained in it stays
        // in the driver for the next one.
        plausible::check_all(&out)?;
        for (ph, m) in self.phases.iter().zip(out.iter_mut()) {
            let t = &mut self.totals[usize::from(ph.index())];
            *t += self.chip.take_drained(*ph);
            m.energy_wh = Some(*t);
        }
        if let Err(e) = self.state.store(&format_totals(&self.totals), now) {
            log::warn!("meter {}: cannot persist energy: {e}", self.id);
        }
        Ok(out)
    }

    /// Chip resets detected since start.
    pub fn resets(&self) -> u64 {
        self.chip.resets()
    }
}

/// `"a b c"` → totals.
pub fn parse_totals(s: &str) -> Result<[f64; 3], String> {
    let v: Vec<f64> = s
        .split_whitespace()
        .map(|x| x.parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("energy state {s:?}: {e}"))?;
    match v.as_slice() {
        [a, b, c] if v.iter().all(|x| x.is_finite() && *x >= 0.0) => Ok([*a, *b, *c]),
        _ => Err(format!(
            "energy state {s:?}: expected three non-negative numbers"
        )),
    }
}

/// Totals → `"a b c"`.
pub fn format_totals(t: &[f64; 3]) -> String {
    format!("{} {} {}", t[0], t[1], t[2])
}

impl<SPI: SpiDevice + Send> Meter for Atm90e32Meter<SPI> {
    fn id(&self) -> &str {
        &self.id
    }
    fn read(&mut self) -> Result<Vec<Measurement>, MeterError> {
        self.read_at(Instant::now())
    }
    fn resume_energy(&mut self, floor: &EnergyFloor) {
        for ph in &self.phases {
            let id = format!("{}-{}", self.id, ph.suffix());
            let total = &mut self.totals[usize::from(ph.index())];
            if let Some(f) = floor.get(&id).filter(|f| *f > *total) {
                log_resumed(&id, *total, f);
                *total = f;
            }
        }
    }
}

impl<SPI> Drop for Atm90e32Meter<SPI> {
    fn drop(&mut self) {
        if let Err(e) = self.state.flush(&format_totals(&self.totals)) {
            log::warn!("meter {}: cannot persist energy: {e}", self.id);
        }
    }
}
