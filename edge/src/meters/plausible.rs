//! Plausibility checks applied to every measurement before it leaves a driver.
//!
//! A meter on a real bus sometimes answers with garbage: a register that reads
//! all ones after an I2C glitch or a floating SPI MISO line, a NaN float from a
//! half-received Modbus frame, a negative RMS voltage. Such values must never
//! reach the hub as readings: the drivers call [`check`] and turn a failed
//! check into a [`MeterError`], so the sampler skips that sample and retries on
//! the next tick.
//!
//! The limits are deliberately wide (they catch nonsense, not a bad grid):
//!
//! | quantity      | accepted range                      |
//! |---------------|-------------------------------------|
//! | voltage       | 0 … 1000 V                          |
//! | current       | −10 000 … 10 000 A                  |
//! | power         | −10 MW … 10 MW                      |
//! | energy        | 0 … 10¹² Wh                         |
//! | frequency     | 0 (no signal) or 40 … 70 Hz         |
//! | power factor  | −1 … 1 (±0.01 rounding tolerance)   |
//! | reactive power| −10 MW … 10 MW (var)                |
//! | (any other)   | its range on the wire               |
//!
//! Every value must also be finite (no NaN, no infinity).

use ems_shared::{Measured, Measurement as Quantity};

use super::{Measurement, MeterError};

/// Raw 16-bit register value a bus returns when nobody drives the data line.
pub const ALL_ONES_16: u16 = 0xFFFF;

/// Returns `true` when every register in `regs` reads `0xFFFF`, the signature
/// of an I2C/SPI/UART glitch rather than a measurement. An empty slice is not
/// a glitch.
pub fn all_ones(regs: &[u16]) -> bool {
    !regs.is_empty() && regs.iter().all(|&r| r == ALL_ONES_16)
}

fn in_range(name: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<(), String> {
    match v {
        None => Ok(()),
        Some(x) if !x.is_finite() => Err(format!("{name} is not a finite number ({x})")),
        Some(x) if x < lo || x > hi => Err(format!("{name} {x} outside {lo} … {hi}")),
        Some(_) => Ok(()),
    }
}

/// The name and the accepted range of a measurement (see the module docs).
/// A measurement without a limit of its own is held to the wire range.
fn limits(q: Quantity) -> (&'static str, f64, f64) {
    match q {
        Quantity::VoltageV => ("voltage", 0.0, 1000.0),
        Quantity::CurrentA => ("current", -10_000.0, 10_000.0),
        Quantity::PowerW => ("power", -1.0e7, 1.0e7),
        Quantity::EnergyWh => ("energy", 0.0, 1.0e12),
        Quantity::FrequencyHz => ("frequency", 40.0, 70.0),
        Quantity::PowerFactor => ("power factor", -1.01, 1.01),
        Quantity::ReactivePowerVar => ("reactive power", -1.0e7, 1.0e7),
        other => {
            let (lo, hi) = other.range();
            (other.name(), lo, hi)
        }
    }
}

fn check_value(m: &Measurement, q: Quantity) -> Result<(), String> {
    let (name, lo, hi) = limits(q);
    match m.get(q) {
        // 0 Hz: no signal on the voltage input, not a glitch.
        Some(0.0) if q == Quantity::FrequencyHz => Ok(()),
        v => in_range(name, v, lo, hi),
    }
}

/// Checks one measurement against the limits in the module docs.
pub fn check(m: &Measurement) -> Result<(), MeterError> {
    // The first value out of range is the one the message names: the order
    // is the table's above, frequency last.
    let order = Quantity::ALL
        .into_iter()
        .filter(|q| *q != Quantity::FrequencyHz)
        .chain([Quantity::FrequencyHz]);
    for q in order {
        if let Err(why) = check_value(m, q) {
            return Err(
                MeterError::new(&m.meter, format!("implausible value: {why}"))
                    .with_hint("a bus glitch or a wrong register map; the sample is skipped"),
            );
        }
    }
    Ok(())
}

/// Checks every measurement of one read.
pub fn check_all(ms: &[Measurement]) -> Result<(), MeterError> {
    ms.iter().try_for_each(check)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m() -> Measurement {
        Measurement {
            meter: "m".into(),
            ..Default::default()
        }
    }

    #[test]
    fn accepts_ordinary_values() {
        let x = Measurement {
            voltage_v: Some(230.0),
            current_a: Some(-3.0),
            power_w: Some(-690.0),
            energy_wh: Some(12.5),
            frequency_hz: Some(50.0),
            power_factor: Some(-0.95),
            ..m()
        };
        assert!(check(&x).is_ok());
        assert!(check(&Measurement {
            frequency_hz: Some(0.0),
            ..m()
        })
        .is_ok());
    }

    #[test]
    fn rejects_nan_negative_voltage_and_out_of_range() {
        assert!(check(&Measurement {
            voltage_v: Some(f64::NAN),
            ..m()
        })
        .is_err());
        assert!(check(&Measurement {
            voltage_v: Some(-1.0),
            ..m()
        })
        .is_err());
        assert!(check(&Measurement {
            power_factor: Some(1.5),
            ..m()
        })
        .is_err());
        assert!(check(&Measurement {
            frequency_hz: Some(655.35),
            ..m()
        })
        .is_err());
        assert!(check(&Measurement {
            energy_wh: Some(-0.1),
            ..m()
        })
        .is_err());
    }

    #[test]
    fn all_ones_detects_glitch() {
        assert!(all_ones(&[0xFFFF, 0xFFFF]));
        assert!(!all_ones(&[0xFFFF, 0x0000]));
        assert!(!all_ones(&[]));
    }
}
