//! `ems-edge scan i2c [--bus N]`: lists responding addresses with the chips
//! they may be, like `i2cdetect -y N` with a legend.

use std::process::ExitCode;

use ems_edge::platform;

use crate::probe::print_failure;

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
    let found = match platform::scan_i2c(bus) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use ems_edge::meters::ina226::identify_ti;

    #[test]
    fn i2c_identification() {
        assert_eq!(identify_ti(0x5449, 0x2260), Some("INA226"));
        assert_eq!(identify_ti(0x0000, 0x2260), None);
        assert!(i2c_candidates(0x40).contains("INA219"));
        assert!(i2c_candidates(0x4F).contains("INA226"));
        assert!(i2c_candidates(0x76).contains("BME280"));
    }
}
