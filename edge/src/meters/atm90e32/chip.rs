//! The ATM90E32AS driver proper, generic over an embedded-hal `SpiDevice`:
//! registers, initialisation, measurement. It knows nothing of the edge
//! (no config table, no persistence); [`Atm90e32Meter`](super::Atm90e32Meter)
//! wraps it.
//!
//! # SPI protocol (datasheet §6.6)
//! Mode 3 (CPOL = 1, CPHA = 1), MSB first, up to 200 kHz used here. A frame
//! is a 16-bit address word (bit 15 = 1 for read, bits 9:0 the register)
//! followed by a 16-bit data word; the driver leaves 4 µs between address and
//! data, as the reference implementation does, so the chip can fetch the
//! register.
//!
//! # Initialisation
//! 1. `SoftReset` (0x70) ← 0x789A
//! 2. `CfgRegAccEn` (0x7F) ← 0x55AA (unlock configuration registers)
//! 3. `MeterEn` (0x00) ← 0x0001
//! 4. `SagPeakDetCfg` (0x05) ← 0x143F, `SagTh` (0x08) from `ugain`,
//!    `FreqHiTh`/`FreqLoTh` (0x0D/0x0C) = line frequency ± 1 Hz
//! 5. `PLconstH`/`PLconstL` (0x31/0x32) ← 0x0861/0xC468 (PL constant
//!    140 625 000: 3200 imp/kWh, energy LSB 0.003125 Wh)
//! 6. `MMode0` (0x33) ← 0x0087 (three-phase four-wire), bit 12 set for 60 Hz;
//!    `MMode1` (0x34) ← PGA gain code per current channel (1×: 00, 2×: 01,
//!    4×: 10; IA bits 1:0, IB 3:2, IC 5:4)
//! 7. start-up thresholds `PStartTh`/`QStartTh`/`SStartTh` (0x35–0x37) ←
//!    0x1D4C, `PPhaseTh`/`QPhaseTh`/`SPhaseTh` (0x38–0x3A) ← 0x02EE
//! 8. `UgainX`/`IgainX` (0x61/0x62, 0x65/0x66, 0x69/0x6A) ← the configured
//!    calibration gains; `UoffsetX`/`IoffsetX` ← 0
//! 9. `CfgRegAccEn` ← 0x0000 (lock); then `MMode0` and `UgainA` are read
//!    back: a mismatch means no chip, a wrong chip select or broken MISO.
//!
//! # Resets and glitches
//! Every sample starts by reading `MMode0` and `PStartTh` back. A chip that
//! lost power briefly (brown-out) comes back with its power-on values and
//! measures with the wrong calibration. `MMode0`'s power-on value (0087H)
//! *is* the 50 Hz three-phase four-wire setting, so it cannot tell; the
//! start-up threshold `PStartTh` powers on as 0000H (datasheet register
//! table; unit 0.00032 W) and init always writes 1D4CH (2.4 W), so any
//! reset shows there. On a reset the driver runs the initialisation again,
//! counts it ([`Atm90e32::resets`]) and reports
//! [`Error::Reinitialised`]; the energy the chip had accumulated since the
//! last read is gone with it.
//!
//! A register that reads `0xFFFF` is a floating MISO (no chip driving the
//! line), not a value: when the reset-check registers, or every
//! measurement register of a phase, or an energy register read all ones,
//! the sample fails with [`Error::AllOnes`].
//!
//! # Energy
//! The energy registers clear on read, so they are read last, after every
//! other register of the sample proved the bus sane, and what they held is
//! kept in the driver ([`Atm90e32::take_drained`]) until the caller takes
//! it with a good sample: energy drained in a sample that fails afterwards
//! (a later read fails, the values are implausible) is carried into the
//! next one, never thrown away.
//!
//! # Measurements
//! | quantity     | register(s)                         | scale                         |
//! |--------------|-------------------------------------|-------------------------------|
//! | voltage      | `UrmsX` 0xD9–0xDB                   | 0.01 V                        |
//! | current      | `IrmsX` 0xDD–0xDF                   | 0.001 A                       |
//! | active power | `PmeanX` 0xB1–0xB3 + `PmeanXLSB` 0xC1–0xC3 | (hi·2¹⁶ + lo) · 0.00032 W, signed |
//! | power factor | `PFmeanX` 0xBD–0xBF                 | signed, 0.001                 |
//! | frequency    | `Freq` 0xF8                         | 0.01 Hz                       |
//! | energy       | `APenergyX` 0x81–0x83 (forward active, cleared on read) | 0.003125 Wh |

use embedded_hal::spi::{Operation, SpiDevice};
use serde::Deserialize;
use thiserror::Error;

use crate::meters::plausible;

/// Register addresses.
pub mod reg {
    /// Metering enable.
    pub const METER_EN: u16 = 0x00;
    /// Sag and peak detector period.
    pub const SAG_PEAK_DET_CFG: u16 = 0x05;
    /// Voltage sag threshold.
    pub const SAG_TH: u16 = 0x08;
    /// Low frequency threshold.
    pub const FREQ_LO_TH: u16 = 0x0C;
    /// High frequency threshold.
    pub const FREQ_HI_TH: u16 = 0x0D;
    /// PL constant, high word.
    pub const PL_CONST_H: u16 = 0x31;
    /// PL constant, low word.
    pub const PL_CONST_L: u16 = 0x32;
    /// Metering mode.
    pub const MMODE0: u16 = 0x33;
    /// PGA gains.
    pub const MMODE1: u16 = 0x34;
    /// Active start-up power threshold (0x35); Q and S follow.
    pub const P_START_TH: u16 = 0x35;
    /// Active phase threshold (0x38); Q and S follow.
    pub const P_PHASE_TH: u16 = 0x38;
    /// Phase A voltage gain; phase B/C at +4/+8.
    pub const UGAIN_A: u16 = 0x61;
    /// Phase A current gain; phase B/C at +4/+8.
    pub const IGAIN_A: u16 = 0x62;
    /// Phase A voltage offset; phase B/C at +4/+8.
    pub const UOFFSET_A: u16 = 0x63;
    /// Phase A current offset; phase B/C at +4/+8.
    pub const IOFFSET_A: u16 = 0x64;
    /// Software reset.
    pub const SOFT_RESET: u16 = 0x70;
    /// Configuration register access enable.
    pub const CFG_REG_ACC_EN: u16 = 0x7F;
    /// Phase A forward active energy; B/C follow.
    pub const AP_ENERGY_A: u16 = 0x81;
    /// Phase A mean active power (high word); B/C follow.
    pub const PMEAN_A: u16 = 0xB1;
    /// Phase A power factor; B/C follow.
    pub const PF_MEAN_A: u16 = 0xBD;
    /// Phase A mean active power (low word); B/C follow.
    pub const PMEAN_A_LSB: u16 = 0xC1;
    /// Phase A RMS voltage; B/C follow.
    pub const URMS_A: u16 = 0xD9;
    /// Phase A RMS current; B/C follow.
    pub const IRMS_A: u16 = 0xDD;
    /// Line frequency.
    pub const FREQ: u16 = 0xF8;
}

/// `SoftReset` magic value.
pub const SOFT_RESET_VALUE: u16 = 0x789A;
/// `CfgRegAccEn` unlock value.
pub const CFG_UNLOCK: u16 = 0x55AA;
/// `MMode0` for three-phase four-wire at 50 Hz.
pub const MMODE0_3P4W: u16 = 0x0087;
/// `MMode0` bit selecting 60 Hz.
pub const MMODE0_60HZ: u16 = 1 << 12;
/// Start-up power thresholds written by init (`PStartTh`, `QStartTh`,
/// `SStartTh`; 0.00032 W units: 2.4 W). Never the power-on value 0000H.
pub const START_TH: u16 = 0x1D4C;
/// Per-phase start-up thresholds written by init (`PPhaseTh` …: 0.24 W).
pub const PHASE_TH: u16 = 0x02EE;

/// A phase channel.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Channel A (L1).
    A,
    /// Channel B (L2).
    B,
    /// Channel C (L3).
    C,
}

impl Phase {
    /// 0, 1, 2.
    pub fn index(self) -> u16 {
        match self {
            Phase::A => 0,
            Phase::B => 1,
            Phase::C => 2,
        }
    }
    /// `a`, `b`, `c`.
    pub fn suffix(self) -> &'static str {
        match self {
            Phase::A => "a",
            Phase::B => "b",
            Phase::C => "c",
        }
    }
}

/// Register values derived from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// `MMode0`.
    pub mmode0: u16,
    /// `MMode1`.
    pub mmode1: u16,
    /// `SagTh`.
    pub sag_th: u16,
    /// `FreqHiTh` (0.01 Hz).
    pub freq_hi: u16,
    /// `FreqLoTh` (0.01 Hz).
    pub freq_lo: u16,
    /// `UgainA/B/C`.
    pub ugain: [u16; 3],
    /// `IgainA/B/C`.
    pub igain: [u16; 3],
}

/// Derives the register values; errors name the offending setting.
pub fn settings(
    line_freq_hz: u32,
    pga_gain: u8,
    ugain: [u16; 3],
    igain: [u16; 3],
) -> Result<Settings, String> {
    let (mmode0, sag_v, freq_hi, freq_lo) = match line_freq_hz {
        50 => (MMODE0_3P4W, 190.0, 5100, 4900),
        60 => (MMODE0_3P4W | MMODE0_60HZ, 90.0, 6100, 5900),
        f => return Err(format!("line_freq_hz {f} is not 50 or 60")),
    };
    let code = match pga_gain {
        1 => 0b00,
        2 => 0b01,
        4 => 0b10,
        g => return Err(format!("pga_gain {g} is not 1, 2 or 4")),
    };
    if ugain.contains(&0) || igain.contains(&0) {
        return Err("ugain and igain must be non-zero".into());
    }
    // SagTh = Vsag · 100 · √2 / (2 · Ugain / 32768), as in the application note.
    let sag = sag_v * 100.0 * std::f64::consts::SQRT_2 / (2.0 * f64::from(ugain[0]) / 32768.0);
    Ok(Settings {
        mmode0,
        mmode1: code | (code << 2) | (code << 4),
        sag_th: sag.clamp(0.0, f64::from(u16::MAX)) as u16,
        freq_hi,
        freq_lo,
        ugain,
        igain,
    })
}

/// RMS voltage register → V.
pub fn voltage_v(raw: u16) -> f64 {
    f64::from(raw) * 0.01
}
/// RMS current register → A.
pub fn current_a(raw: u16) -> f64 {
    f64::from(raw) * 0.001
}
/// `PmeanX` (high, signed) and `PmeanXLSB` (low) → W.
pub fn active_power_w(hi: u16, lo: u16) -> f64 {
    let v = ((u32::from(hi) << 16) | u32::from(lo)) as i32;
    f64::from(v) * 0.00032
}
/// `PFmeanX` → power factor.
pub fn power_factor(raw: u16) -> f64 {
    f64::from(raw as i16) / 1000.0
}
/// `Freq` → Hz.
pub fn frequency_hz(raw: u16) -> f64 {
    f64::from(raw) / 100.0
}
/// `APenergyX` → Wh.
pub fn energy_wh(raw: u16) -> f64 {
    f64::from(raw) * 0.003125
}

/// Driver errors, generic over the SPI error.
#[derive(Debug, Error)]
pub enum Error<E> {
    /// The SPI transfer failed.
    #[error("SPI error: {0:?}")]
    Spi(E),
    /// Invalid configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A register did not read back what was written.
    #[error("register {register:#04x} reads {found:#06x} instead of {expected:#06x}")]
    Verify {
        /// Register.
        register: u16,
        /// Written value.
        expected: u16,
        /// Read value.
        found: u16,
    },
    /// All ones: MISO floating.
    #[error("registers read all ones (MISO floating: bus glitch or no chip)")]
    AllOnes,
    /// The chip lost its configuration (a reset) and was initialised
    /// again; the sample is skipped.
    #[error("register {register:#04x} reads {found:#06x} instead of {expected:#06x}: the chip was reset, re-initialised ({resets} since start)")]
    Reinitialised {
        /// The register that revealed it.
        register: u16,
        /// What it should read.
        expected: u16,
        /// What it read.
        found: u16,
        /// Resets seen since the driver started.
        resets: u64,
    },
}

/// One phase's values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PhaseReading {
    /// V.
    pub voltage_v: f64,
    /// A.
    pub current_a: f64,
    /// W.
    pub power_w: f64,
    /// −1 … 1.
    pub power_factor: f64,
}

/// ATM90E32 driver owning its SPI device.
#[derive(Debug)]
pub struct Atm90e32<SPI> {
    /// The device.
    spi: SPI,
    /// Register values.
    settings: Settings,
    /// Energy read (and so cleared) from the chip, per phase, not yet taken
    /// by the caller, Wh.
    drained_wh: [f64; 3],
    /// Resets detected since start.
    resets: u64,
}

impl<SPI: SpiDevice> Atm90e32<SPI> {
    /// Takes the device (no traffic; call [`Atm90e32::init`]).
    pub fn new(spi: SPI, settings: Settings) -> Self {
        Atm90e32 {
            spi,
            settings,
            drained_wh: [0.0; 3],
            resets: 0,
        }
    }

    /// Resets of the chip detected (and re-initialised) since start.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Energy of `phase` read from the chip since the last call, Wh (see
    /// the module docs).
    pub fn take_drained(&mut self, phase: Phase) -> f64 {
        std::mem::take(&mut self.drained_wh[usize::from(phase.index())])
    }

    /// Reads a register: address word with bit 15 set, 4 µs, data word.
    pub fn read_register(&mut self, register: u16) -> Result<u16, Error<SPI::Error>> {
        let addr = (0x8000 | (register & 0x03FF)).to_be_bytes();
        let mut data = [0u8; 2];
        self.spi
            .transaction(&mut [
                Operation::Write(&addr),
                Operation::DelayNs(4_000),
                Operation::Read(&mut data),
            ])
            .map_err(Error::Spi)?;
        Ok(u16::from_be_bytes(data))
    }

    /// Writes a register: address word with bit 15 clear, 4 µs, data word.
    pub fn write_register(&mut self, register: u16, value: u16) -> Result<(), Error<SPI::Error>> {
        let addr = (register & 0x03FF).to_be_bytes();
        let data = value.to_be_bytes();
        self.spi
            .transaction(&mut [
                Operation::Write(&addr),
                Operation::DelayNs(4_000),
                Operation::Write(&data),
            ])
            .map_err(Error::Spi)
    }

    /// Runs the initialisation sequence in the module docs and verifies it.
    pub fn init(&mut self) -> Result<(), Error<SPI::Error>> {
        let s = self.settings;
        let mut seq: Vec<(u16, u16)> = vec![
            (reg::SOFT_RESET, SOFT_RESET_VALUE),
            (reg::CFG_REG_ACC_EN, CFG_UNLOCK),
            (reg::METER_EN, 0x0001),
            (reg::SAG_PEAK_DET_CFG, 0x143F),
            (reg::SAG_TH, s.sag_th),
            (reg::FREQ_HI_TH, s.freq_hi),
            (reg::FREQ_LO_TH, s.freq_lo),
            (reg::PL_CONST_H, 0x0861),
            (reg::PL_CONST_L, 0xC468),
            (reg::MMODE0, s.mmode0),
            (reg::MMODE1, s.mmode1),
        ];
        for i in 0..3 {
            seq.push((reg::P_START_TH + i, START_TH));
        }
        for i in 0..3 {
            seq.push((reg::P_PHASE_TH + i, PHASE_TH));
        }
        for p in 0..3u16 {
            seq.push((reg::UGAIN_A + 4 * p, s.ugain[usize::from(p)]));
            seq.push((reg::IGAIN_A + 4 * p, s.igain[usize::from(p)]));
            seq.push((reg::UOFFSET_A + 4 * p, 0));
            seq.push((reg::IOFFSET_A + 4 * p, 0));
        }
        seq.push((reg::CFG_REG_ACC_EN, 0x0000));
        for (r, v) in seq {
            self.write_register(r, v)?;
        }
        for (register, expected) in [(reg::MMODE0, s.mmode0), (reg::UGAIN_A, s.ugain[0])] {
            let found = self.read_register(register)?;
            if found == 0xFFFF {
                return Err(Error::AllOnes);
            }
            if found != expected {
                return Err(Error::Verify {
                    register,
                    expected,
                    found,
                });
            }
        }
        Ok(())
    }

    /// Checks that the chip is still configured (re-initialising it after a
    /// reset), then reads the frequency and each phase in `phases`; the
    /// energy registers last, into [`Atm90e32::take_drained`].
    pub fn measure(
        &mut self,
        phases: &[Phase],
    ) -> Result<(f64, Vec<PhaseReading>), Error<SPI::Error>> {
        self.check_configured()?;
        let freq = self.read_register(reg::FREQ)?;
        let mut out = Vec::with_capacity(phases.len());
        for ph in phases {
            let i = ph.index();
            let u = self.read_register(reg::URMS_A + i)?;
            let irms = self.read_register(reg::IRMS_A + i)?;
            let p_hi = self.read_register(reg::PMEAN_A + i)?;
            let p_lo = self.read_register(reg::PMEAN_A_LSB + i)?;
            let pf = self.read_register(reg::PF_MEAN_A + i)?;
            if plausible::all_ones(&[u, irms, p_hi, p_lo, pf]) {
                return Err(Error::AllOnes);
            }
            out.push(PhaseReading {
                voltage_v: voltage_v(u),
                current_a: current_a(irms),
                power_w: active_power_w(p_hi, p_lo),
                power_factor: power_factor(pf),
            });
        }
        for ph in phases {
            let e = self.read_register(reg::AP_ENERGY_A + ph.index())?;
            if plausible::all_ones(&[e]) {
                // 204.8 Wh since the last read: the line floated.
                return Err(Error::AllOnes);
            }
            self.drained_wh[usize::from(ph.index())] += energy_wh(e);
        }
        Ok((frequency_hz(freq), out))
    }

    /// Reads back two registers whose configured values differ from their
    /// power-on values (see the module docs).
    fn check_configured(&mut self) -> Result<(), Error<SPI::Error>> {
        let mmode0 = self.read_register(reg::MMODE0)?;
        let start_th = self.read_register(reg::P_START_TH)?;
        if plausible::all_ones(&[mmode0]) || plausible::all_ones(&[start_th]) {
            return Err(Error::AllOnes);
        }
        let checks = [
            (reg::MMODE0, self.settings.mmode0, mmode0),
            (reg::P_START_TH, START_TH, start_th),
        ];
        let Some(&(register, expected, found)) = checks.iter().find(|(_, e, f)| e != f) else {
            return Ok(());
        };
        self.resets += 1;
        self.init()?;
        Err(Error::Reinitialised {
            register,
            expected,
            found,
            resets: self.resets,
        })
    }

    /// Gives the device back.
    pub fn destroy(self) -> SPI {
        self.spi
    }
}
