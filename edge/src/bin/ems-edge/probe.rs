//! `ems-edge probe`: opens every configured meter, reads it N times (one
//! second apart, so integrating meters show energy moving) and prints a
//! table:
//!
//! ```text
//! meter           voltage     current       power        energy  freq     pf   read
//! battery         12.034 V    1.250 A     15.04 W      0.004 Wh     -      -   41 ms
//! FAIL mains: meter mains: cannot open /dev/spidev0.0: No such file or directory (os error 2)
//!      hint: /dev/spidev0.0 missing: add `dtparam=spi=on` to /boot/firmware/config.txt, then reboot
//! ```
//!
//! and exits 1 if any meter failed to open or read. Stateful meters (pulse
//! counts, integrated energy) use a throw-away state directory, so a probe
//! never touches the service's counters — energy therefore starts at 0 in
//! the probe's output. Stop the service first when the meter sits on a
//! serial port or GPIO (only one process can own those).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use ems_edge::meters::{Measurement, Meter, MeterConfig, MeterError};
use ems_edge::platform;

/// Reads and validates the edge config at `path` (the same validation as
/// `ems-edge run`: unknown keys, meter ids, …) and returns its meters.
pub fn load_meter_configs(path: &Path) -> anyhow::Result<Vec<MeterConfig>> {
    let cfg = ems_edge::config::Config::load(path)?;
    Ok(cfg.meters)
}

fn fmt_opt(v: Option<f64>, prec: usize, unit: &str) -> String {
    match v {
        Some(x) => format!("{x:.prec$} {unit}"),
        None => "-".to_string(),
    }
}

/// One table row (without the trailing newline).
pub fn format_row(m: &Measurement, read_time: Duration) -> String {
    format!(
        "{:<16} {:>10} {:>11} {:>12} {:>14} {:>9} {:>6} {:>6} ms",
        m.meter,
        fmt_opt(m.voltage_v, 2, "V"),
        fmt_opt(m.current_a, 3, "A"),
        fmt_opt(m.power_w, 1, "W"),
        fmt_opt(m.energy_wh, 3, "Wh"),
        fmt_opt(m.frequency_hz, 2, "Hz"),
        m.power_factor
            .map(|p| format!("{p:.2}"))
            .unwrap_or_else(|| "-".into()),
        read_time.as_millis()
    )
}

/// The table header.
pub fn header() -> String {
    format!(
        "{:<16} {:>10} {:>11} {:>12} {:>14} {:>9} {:>6} {:>9}",
        "meter", "voltage", "current", "power", "energy", "freq", "pf", "read"
    )
}

/// Prints a meter failure and its hint.
pub fn print_failure(e: &MeterError) {
    println!("FAIL {}: {}", e.meter, e.message);
    if let Some(h) = &e.hint {
        println!("     hint: {h}");
    }
}

/// Runs `probe` against already parsed meter configs, writing state into
/// `state_dir`. Returns whether every meter opened and read `count` times.
pub fn probe_meters(configs: &[MeterConfig], count: u32, state_dir: &Path) -> bool {
    let mut ok = true;
    let mut open: Vec<Box<dyn Meter>> = Vec::new();
    for cfg in configs {
        match platform::open(cfg, state_dir) {
            Ok(m) => open.push(m),
            Err(e) => {
                ok = false;
                print_failure(&e);
            }
        }
    }
    if open.is_empty() {
        return false;
    }
    println!("{}", header());
    for round in 0..count.max(1) {
        if round > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        for m in open.iter_mut() {
            let t0 = Instant::now();
            match m.read() {
                Ok(ms) => {
                    let dt = t0.elapsed();
                    for x in &ms {
                        println!("{}", format_row(x, dt));
                    }
                }
                Err(e) => {
                    ok = false;
                    print_failure(&e);
                }
            }
        }
    }
    ok
}

/// `ems-edge probe`: reads each configured meter `count` times and prints a table.
pub fn probe(config: &Path, count: u32) -> anyhow::Result<ExitCode> {
    let configs = load_meter_configs(config)?;
    let state_dir: PathBuf =
        std::env::temp_dir().join(format!("ems-edge-probe-{}", std::process::id()));
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let ok = probe_meters(&configs, count, &state_dir);
    println!(
        "{}",
        if ok {
            "all meters read successfully"
        } else {
            "some meters FAILED (see the hints above)"
        }
    );
    let _ = std::fs::remove_dir_all(&state_dir);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> MeterConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn probe_table_and_failure() {
        let dir = tempfile::tempdir().unwrap();
        let ok = vec![parse("id = \"sim\"\nkind = \"simulated\"\nseed = 1\n")];
        assert!(probe_meters(&ok, 1, dir.path()));
        let bad = vec![parse(
            "id = \"i\"\nkind = \"ina219\"\nbus = 250\nshunt_ohms = 0.1\nmax_current_a = 3.2\n",
        )];
        assert!(!probe_meters(&bad, 1, dir.path()));
        let row = format_row(
            &Measurement {
                meter: "bat".into(),
                voltage_v: Some(12.0),
                power_w: Some(60.0),
                ..Default::default()
            },
            Duration::from_millis(41),
        );
        assert!(
            row.contains("12.00 V") && row.contains("60.0 W") && row.contains("41 ms"),
            "{row}"
        );
    }
}
