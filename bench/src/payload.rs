//! Realistic reading frames (~220 bytes, every measurement present), the
//! same bytes for the hub and for Mosquitto.

use std::fmt::Write as _;

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Writes reading `seq` of a device into `out` (cleared first).
pub fn reading(out: &mut String, epoch: u64, seq: u64, dev: usize) {
    out.clear();
    let t = seq as f64;
    let phase = (dev % 97) as f64;
    let power = 900.0 + ((t + phase) * 0.37).sin() * 400.0;
    let _ = write!(
        out,
        "{{\"type\":\"reading\",\"epoch\":{epoch},\"seq\":{seq},\"ts_ms\":{},\"meter\":\"main\",\
         \"voltage_v\":{:.2},\"current_a\":{:.3},\"power_w\":{:.2},\"energy_wh\":{:.2},\
         \"frequency_hz\":{:.3},\"power_factor\":{:.3},\"reactive_power_var\":{:.2}}}",
        now_ms(),
        230.0 + ((t + phase) * 0.11).sin() * 3.0,
        power / 230.0,
        power,
        1_523_400.0 + t * 0.25,
        50.0 + ((t + phase) * 0.05).sin() * 0.02,
        0.95 + ((t + phase) * 0.07).sin() * 0.04,
        120.0 + ((t + phase) * 0.13).sin() * 30.0,
    );
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
