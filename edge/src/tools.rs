//! Bench-testing tools for installers: `ems-edge probe` and
//! `ems-edge scan i2c`.
//!
//! `probe` opens every configured meter, reads it N times (one second apart,
//! so integrating meters show energy moving) and prints a table:
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
//!
//! `scan i2c [--bus N]` lists responding addresses with the chips they may
//! be, like `i2cdetect -y N` with a legend.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::meters::{self, Measurement, MeterConfig, MeterError};

/// Reads and validates the edge config at `path` (the same validation as
/// `ems-edge run`: unknown keys, meter ids, …) and returns its meters.
pub fn load_meter_configs(path: &Path) -> anyhow::Result<Vec<MeterConfig>> {
    let cfg = crate::config::Config::load(path)?;
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

fn print_failure(e: &MeterError) {
    println!("FAIL {}: {}", e.meter, e.message);
    if let Some(h) = &e.hint {
        println!("     hint: {h}");
    }
}

/// Runs `probe` against already parsed meter configs, writing state into
/// `state_dir`. Returns whether every meter opened and read `count` times.
pub fn probe_meters(configs: &[MeterConfig], count: u32, state_dir: &Path) -> bool {
    let mut ok = true;
    let mut open: Vec<Box<dyn meters::Meter>> = Vec::new();
    for cfg in configs {
        match meters::open(cfg, state_dir) {
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

/// Names TI parts from their manufacturer (0xFE) and die (0xFF) ID registers.
pub fn identify_ti(manufacturer: u16, die: u16) -> Option<&'static str> {
    if manufacturer != 0x5449 {
        return None;
    }
    match die {
        0x2260 => Some("INA226"),
        0x2270 => Some("INA260"),
        0x2280 => Some("INA228"),
        0x2290 => Some("INA229"),
        _ => Some("TI device"),
    }
}

/// Chips commonly found at a 7-bit I2C address.
pub fn i2c_candidates(address: u8) -> &'static str {
    match address {
        0x40 => "INA219/INA226 (A1=GND,A0=GND), HTU21D/SHT21, PCA9685, Si7021",
        0x41..=0x43 | 0x46 | 0x47 | 0x4C..=0x4F => "INA219/INA226 (address straps)",
        0x44 | 0x45 => "INA219/INA226 (address straps), SHT3x",
        0x48..=0x4B => "INA219/INA226 (address straps), ADS1115/ADS1015, TMP102/LM75",
        0x20..=0x27 => "PCF8574 / MCP23017 I/O expander",
        0x29 => "VL53L0X, TSL2591",
        0x38..=0x3F => "PCF8574A I/O expander, SSD1306 OLED (0x3C/0x3D), AHT20 (0x38)",
        0x50..=0x57 => "AT24C EEPROM (e.g. HAT ID EEPROM at 0x50 on bus 0)",
        0x68 => "DS3231/DS1307 RTC, MPU-6050",
        0x76 | 0x77 => "BME280/BMP280",
        _ => "unknown",
    }
}

/// `ems-edge scan i2c`: lists responding I2C addresses on `bus`.
pub fn scan_i2c(bus: u8) -> anyhow::Result<ExitCode> {
    let found = match crate::hw::scan_i2c(bus) {
        Ok(f) => f,
        Err(e) => {
            print_failure(&e);
            return Ok(ExitCode::FAILURE);
        }
    };
    if found.is_empty() {
        println!("no device answered on /dev/i2c-{bus}");
        println!("     hint: check 3.3 V/GND, SDA (pin 3) and SCL (pin 5), and the pull-ups");
        return Ok(ExitCode::FAILURE);
    }
    println!("address  chip");
    for d in found {
        let what = if d.busy {
            "claimed by a kernel driver (UU)".to_string()
        } else if let Some(id) = d.identified {
            format!("{id} (ID registers)")
        } else {
            i2c_candidates(d.address).to_string()
        };
        println!("{:#04x}     {what}", d.address);
    }
    Ok(ExitCode::SUCCESS)
}
