//! Realistic reading frames (~220 bytes, every measurement present), the
//! same bytes for the hub and for Mosquitto.

use std::fmt::Write as _;

use ems_shared::Measurement;

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Writes reading `seq` of a device into `out` (cleared first): every
/// measurement of the protocol's list, with plausible values that vary
/// with `seq` and the device.
pub fn reading(out: &mut String, epoch: u64, seq: u64, dev: usize) {
    out.clear();
    let t = seq as f64;
    let phase = (dev % 97) as f64;
    let wave = |speed: f64| ((t + phase) * speed).sin();
    let power = 900.0 + wave(0.37) * 400.0;
    let _ = write!(
        out,
        "{{\"type\":\"reading\",\"epoch\":{epoch},\"seq\":{seq},\"ts_ms\":{},\"meter\":\"main\"",
        now_ms()
    );
    for m in Measurement::ALL {
        let (value, decimals) = match m {
            Measurement::VoltageV => (230.0 + wave(0.11) * 3.0, 2),
            Measurement::CurrentA => (power / 230.0, 3),
            Measurement::PowerW => (power, 2),
            Measurement::EnergyWh => (1_523_400.0 + t * 0.25, 2),
            Measurement::FrequencyHz => (50.0 + wave(0.05) * 0.02, 3),
            Measurement::PowerFactor => (0.95 + wave(0.07) * 0.04, 3),
            Measurement::ReactivePowerVar => (120.0 + wave(0.13) * 30.0, 2),
            // A measurement added to the protocol later: the middle of its
            // valid range.
            _ => {
                let (lo, hi) = m.range();
                (lo / 2.0 + hi / 2.0, 2)
            }
        };
        let _ = write!(out, ",\"{}\":{value:.decimals$}", m.name());
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_valid_and_about_200_bytes() {
        let mut s = String::new();
        for seq in [0u64, 1, 99_999, 1 << 40] {
            reading(&mut s, 1_764_000_000_123, seq, 17);
            assert!((180..=260).contains(&s.len()), "{} bytes: {s}", s.len());
            let r = ems_shared::decode_reading(&s, now_ms()).unwrap();
            assert_eq!(r.seq, seq);
        }
    }
}
