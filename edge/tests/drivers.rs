//! Meter drivers against scripted buses (embedded-hal-mock, a scripted
//! serial port) and datasheet vectors.
//!
//! Register addresses, bit fields and frames are written out literally here,
//! not imported from the drivers, so a wrong constant in `src/` fails a test.

use std::time::{Duration, Instant};

use ems_edge::meters::{Measurement, Meter, MeterConfig};

fn close(a: f64, b: f64, eps: f64) -> bool {
    (a - b).abs() <= eps
}

mod ina219 {
    use super::*;
    use embedded_hal::i2c::{ErrorKind, NoAcknowledgeSource};
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction as T};
    use ems_edge::meters::dc::DcMeter;
    use ems_edge::meters::ina219::{self, Error, Ina219};

    const ADDR: u8 = 0x40;

    fn read(reg: u8, value: u16) -> [T; 2] {
        [
            T::write(ADDR, vec![reg]),
            T::read(ADDR, value.to_be_bytes().to_vec()),
        ]
    }

    /// Datasheet worked example: 2 mΩ shunt, 10 A → current LSB 1 mA,
    /// calibration 0x5000.
    #[test]
    fn calibration_matches_datasheet_example() {
        let c = ina219::calibration(0.002, 10.0).unwrap();
        assert_eq!(c.cal, 0x5000);
        assert!(close(c.current_lsb_a, 0.001, 1e-12));
        // BRNG=1 (bit 13), PG=/1 (bits 12:11 = 00, 20 mV fits 40 mV),
        // BADC=SADC=0b1101 (12 bit, 32 samples), MODE=0b111.
        assert_eq!(c.config, 0b0010_0110_1110_1111);
        assert_eq!(c.config, 0x26EF);
    }

    #[test]
    fn calibration_common_breakout() {
        // 0.1 Ω, 3.2 A: LSB 100 µA, cal 4096, PG /8 (320 mV).
        let c = ina219::calibration(0.1, 3.2).unwrap();
        assert_eq!(c.cal, 0x1000);
        assert!(close(c.current_lsb_a, 0.0001, 1e-12));
        assert_eq!(c.config & (0b11 << 11), 0b11 << 11);
        // 0.1 Ω × 4 A = 400 mV: beyond the 320 mV range.
        assert!(ina219::calibration(0.1, 4.0).is_err());
    }

    #[test]
    fn conversions_datasheet_vectors() {
        assert!(close(ina219::shunt_voltage_v(0x07D0), 0.020, 1e-12));
        assert!(close(ina219::bus_voltage_v(0x5D98), 11.98, 1e-9));
        assert!(close(ina219::current_a(0x2710, 0.001), 10.0, 1e-9));
        assert!(close(ina219::power_w(0x1766, 0.001), 119.8, 1e-9));
        // Negative shunt voltage (two's complement).
        assert!(close(ina219::shunt_voltage_v(0xF830), -0.020, 1e-12));
    }

    #[test]
    fn init_writes_config_then_calibration() {
        let mut bus = Mock::new(&[
            T::write(ADDR, vec![0x00, 0x26, 0xEF]),
            T::write(ADDR, vec![0x05, 0x50, 0x00]),
        ]);
        let mut chip = Ina219::new(bus.clone(), ADDR, 0.002, 10.0).unwrap();
        chip.init().unwrap();
        chip.destroy();
        bus.done();
    }

    #[test]
    fn measure_datasheet_example_without_repeated_start() {
        let mut exp = Vec::new();
        exp.extend(read(0x05, 0x5000));
        exp.extend(read(0x02, 0x5D98));
        exp.extend(read(0x01, 0x07D0));
        exp.extend(read(0x04, 0x2710));
        exp.extend(read(0x03, 0x1766));
        let mut bus = Mock::new(&exp);
        let mut chip = Ina219::new(bus.clone(), ADDR, 0.002, 10.0).unwrap();
        let r = chip.measure().unwrap();
        assert!(close(r.voltage_v, 11.98, 1e-9));
        assert!(close(r.current_a, 10.0, 1e-9));
        assert!(close(r.power_w, 119.8, 1e-9));
        chip.destroy();
        bus.done();
    }

    #[test]
    fn nack_is_an_i2c_error_with_a_hint() {
        let mut bus = Mock::new(&[T::write(ADDR, vec![0x05])
            .with_error(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address))]);
        let mut chip = Ina219::new(bus.clone(), ADDR, 0.002, 10.0).unwrap();
        let e = chip.measure().unwrap_err();
        assert!(matches!(e, Error::I2c(ErrorKind::NoAcknowledge(_))));
        let me = ina219::meter_error("bat", ADDR, e);
        assert!(me.message.contains("0x40"), "{me}");
        assert!(me.hint.unwrap().contains("scan i2c"));
        chip.destroy();
        bus.done();
    }

    #[test]
    fn all_ones_glitch_is_rejected() {
        let mut bus = Mock::new(&read(0x05, 0xFFFF));
        let mut chip = Ina219::new(bus.clone(), ADDR, 0.002, 10.0).unwrap();
        assert!(matches!(chip.measure(), Err(Error::AllOnes)));
        chip.destroy();
        bus.done();
    }

    #[test]
    fn lost_calibration_is_rewritten() {
        let mut exp = read(0x05, 0x0000).to_vec();
        exp.push(T::write(ADDR, vec![0x00, 0x26, 0xEF]));
        exp.push(T::write(ADDR, vec![0x05, 0x50, 0x00]));
        let mut bus = Mock::new(&exp);
        let mut chip = Ina219::new(bus.clone(), ADDR, 0.002, 10.0).unwrap();
        assert!(matches!(
            chip.measure(),
            Err(Error::CalibrationLost {
                expected: 0x5000,
                found: 0
            })
        ));
        chip.destroy();
        bus.done();
    }

    #[test]
    fn overflow_flag_is_an_error() {
        let mut exp = Vec::new();
        exp.extend(read(0x05, 0x5000));
        exp.extend(read(0x02, 0x5D99)); // OVF = bit 0
        exp.extend(read(0x01, 0x7D00));
        exp.extend(read(0x04, 0x7FFF));
        exp.extend(read(0x03, 0xFFFF));
        let mut bus = Mock::new(&exp);
        let mut chip = Ina219::new(bus.clone(), ADDR, 0.002, 10.0).unwrap();
        assert!(matches!(chip.measure(), Err(Error::Overflow)));
        chip.destroy();
        bus.done();
    }

    #[test]
    fn dc_meter_integrates_and_persists_energy() {
        let dir = tempfile::tempdir().unwrap();
        let mut exp = Vec::new();
        for _ in 0..2 {
            exp.extend(read(0x05, 0x5000));
            exp.extend(read(0x02, 0x5D98));
            exp.extend(read(0x01, 0x07D0));
            exp.extend(read(0x04, 0x2710));
            exp.extend(read(0x03, 0x1766));
        }
        let mut bus = Mock::new(&exp);
        let chip = Ina219::new(bus.clone(), ADDR, 0.002, 10.0).unwrap();
        let mut m = DcMeter::new("bat", chip, dir.path()).unwrap();
        let t0 = Instant::now();
        let a = m.read_at(t0).unwrap();
        assert_eq!(a[0].energy_wh, Some(0.0));
        let b = m.read_at(t0 + Duration::from_secs(36)).unwrap();
        // 119.8 W for 36 s = 1.198 Wh.
        assert!(close(b[0].energy_wh.unwrap(), 1.198, 1e-9));
        assert_eq!(b[0].meter, "bat");
        drop(m);
        bus.done();
        let stored = std::fs::read_to_string(dir.path().join("bat.energy_wh")).unwrap();
        assert!(close(stored.trim().parse::<f64>().unwrap(), 1.198, 1e-9));
        // A new meter continues from the stored total.
        let mut bus2 = Mock::new(&[]);
        let chip2 = Ina219::new(bus2.clone(), ADDR, 0.002, 10.0).unwrap();
        let m2 = DcMeter::new("bat", chip2, dir.path()).unwrap();
        drop(m2);
        bus2.done();
        let stored = std::fs::read_to_string(dir.path().join("bat.energy_wh")).unwrap();
        assert!(close(stored.trim().parse::<f64>().unwrap(), 1.198, 1e-9));
    }
}

mod ina226 {
    use super::*;
    use embedded_hal::i2c::{ErrorKind, NoAcknowledgeSource};
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction as T};
    use ems_edge::meters::ina226::{self, Error, Ina226};

    const ADDR: u8 = 0x41;

    fn read(reg: u8, value: u16) -> [T; 2] {
        [
            T::write(ADDR, vec![reg]),
            T::read(ADDR, value.to_be_bytes().to_vec()),
        ]
    }

    #[test]
    fn calibration_from_datasheet_equation() {
        // CAL = 0.00512 / (Current_LSB · R_SHUNT): 1 mA, 2 mΩ → 2560.
        let c = ina226::calibration(0.002, 10.0).unwrap();
        assert_eq!(c.cal, 2560);
        assert!(close(c.current_lsb_a, 0.001, 1e-12));
        // 0.1 Ω, 0.8 A: 100 µA → 512.
        assert_eq!(ina226::calibration(0.1, 0.8).unwrap().cal, 0x0200);
        // 0.1 Ω × 1 A = 100 mV > 81.92 mV.
        assert!(ina226::calibration(0.1, 1.0).is_err());
    }

    #[test]
    fn conversions() {
        assert!(close(ina226::bus_voltage_v(0x2580), 12.0, 1e-9));
        assert!(close(ina226::shunt_voltage_v(0x0FA0), 0.010, 1e-12));
        assert!(close(ina226::power_w(0x0960, 0.001), 60.0, 1e-9));
        assert!(close(ina226::current_a(0xEC78, 0.001), -5.0, 1e-9));
    }

    fn init_script() -> Vec<T> {
        let mut v = Vec::new();
        v.extend(read(0xFE, 0x5449));
        v.extend(read(0xFF, 0x2260));
        // AVG=16 (010), VBUSCT=VSHCT=1.1 ms (100), MODE=111, bit 14 reserved=1.
        v.push(T::write(ADDR, vec![0x00, 0x45, 0x27]));
        v.push(T::write(ADDR, vec![0x05, 0x0A, 0x00]));
        v
    }

    #[test]
    fn init_checks_ids_and_configures() {
        let mut bus = Mock::new(&init_script());
        let mut chip = Ina226::new(bus.clone(), ADDR, 0.002, 10.0).unwrap();
        chip.init().unwrap();
        chip.destroy();
        bus.done();
    }

    #[test]
    fn wrong_chip_is_reported() {
        let mut exp = read(0xFE, 0x5449).to_vec();
        exp.extend(read(0xFF, 0x1234));
        let mut bus = Mock::new(&exp);
        let mut chip = Ina226::new(bus.clone(), ADDR, 0.002, 10.0).unwrap();
        let e = chip.init().unwrap_err();
        assert!(matches!(e, Error::WrongChip { die: 0x1234, .. }));
        assert!(ina226::meter_error("x", ADDR, e)
            .hint
            .unwrap()
            .contains("ina219"));
        chip.destroy();
        bus.done();
    }

    #[test]
    fn measure() {
        let mut exp = Vec::new();
        exp.extend(read(0x05, 0x0A00));
        exp.extend(read(0x06, 0x0008)); // CVRF only
        exp.extend(read(0x02, 0x2580));
        exp.extend(read(0x01, 0x0FA0));
        exp.extend(read(0x04, 0x1388));
        exp.extend(read(0x03, 0x0960));
        let mut bus = Mock::new(&exp);
        let mut chip = Ina226::new(bus.clone(), ADDR, 0.002, 10.0).unwrap();
        let r = chip.measure().unwrap();
        assert!(close(r.voltage_v, 12.0, 1e-9));
        assert!(close(r.current_a, 5.0, 1e-9));
        assert!(close(r.power_w, 60.0, 1e-9));
        chip.destroy();
        bus.done();
    }

    #[test]
    fn overflow_flag() {
        let mut exp = Vec::new();
        exp.extend(read(0x05, 0x0A00));
        exp.extend(read(0x06, 0x0004)); // OVF = bit 2
        exp.extend(read(0x02, 0x2580));
        exp.extend(read(0x01, 0x7FFF));
        exp.extend(read(0x04, 0x7FFF));
        exp.extend(read(0x03, 0xFFFF));
        let mut bus = Mock::new(&exp);
        let mut chip = Ina226::new(bus.clone(), ADDR, 0.002, 10.0).unwrap();
        assert!(matches!(chip.measure(), Err(Error::Overflow)));
        chip.destroy();
        bus.done();
    }

    #[test]
    fn data_nack() {
        let mut bus = Mock::new(&[T::write(ADDR, vec![0x05])
            .with_error(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Data))]);
        let mut chip = Ina226::new(bus.clone(), ADDR, 0.002, 10.0).unwrap();
        let e = chip.measure().unwrap_err();
        let me = ina226::meter_error("x", ADDR, e);
        assert!(me.message.contains("rejected"), "{me}");
        chip.destroy();
        bus.done();
    }
}

mod atm90e32 {
    use super::*;
    use embedded_hal_mock::eh1::spi::{Mock, Transaction as T};
    use ems_edge::meters::atm90e32::{self, Atm90e32, Atm90e32Config, Atm90e32Meter, Error, Phase};

    fn rd(reg: u16, value: u16) -> Vec<T<u8>> {
        vec![
            T::transaction_start(),
            T::write_vec(vec![0x80 | (reg >> 8) as u8, reg as u8]),
            T::delay(4000),
            T::read_vec(value.to_be_bytes().to_vec()),
            T::transaction_end(),
        ]
    }

    fn wr(reg: u16, value: u16) -> Vec<T<u8>> {
        vec![
            T::transaction_start(),
            T::write_vec(vec![(reg >> 8) as u8, reg as u8]),
            T::delay(4000),
            T::write_vec(value.to_be_bytes().to_vec()),
            T::transaction_end(),
        ]
    }

    const UGAIN: u16 = 7305;
    const IGAIN: u16 = 27961;

    fn init_script() -> Vec<T<u8>> {
        let writes: &[(u16, u16)] = &[
            (0x70, 0x789A), // SoftReset
            (0x7F, 0x55AA), // CfgRegAccEn unlock
            (0x00, 0x0001), // MeterEn
            (0x05, 0x143F), // SagPeakDetCfg
            (0x08, 60265),  // SagTh = 190·100·√2 / (2·7305/32768)
            (0x0D, 5100),   // FreqHiTh 51 Hz
            (0x0C, 4900),   // FreqLoTh 49 Hz
            (0x31, 0x0861), // PLconstH
            (0x32, 0xC468), // PLconstL
            (0x33, 0x0087), // MMode0 3P4W 50 Hz
            (0x34, 0x0000), // MMode1 PGA 1×
            (0x35, 0x1D4C),
            (0x36, 0x1D4C),
            (0x37, 0x1D4C),
            (0x38, 0x02EE),
            (0x39, 0x02EE),
            (0x3A, 0x02EE),
            (0x61, UGAIN),
            (0x62, IGAIN),
            (0x63, 0),
            (0x64, 0),
            (0x65, UGAIN),
            (0x66, IGAIN),
            (0x67, 0),
            (0x68, 0),
            (0x69, UGAIN),
            (0x6A, IGAIN),
            (0x6B, 0),
            (0x6C, 0),
            (0x7F, 0x0000), // lock
        ];
        let mut v: Vec<T<u8>> = writes.iter().flat_map(|&(r, x)| wr(r, x)).collect();
        v.extend(rd(0x33, 0x0087));
        v.extend(rd(0x61, UGAIN));
        v
    }

    fn settings() -> atm90e32::Settings {
        atm90e32::settings(50, 1, [UGAIN; 3], [IGAIN; 3]).unwrap()
    }

    #[test]
    fn settings_bit_fields() {
        let s = settings();
        assert_eq!(s.mmode0, 0x0087);
        assert_eq!(s.mmode1, 0x0000);
        assert_eq!(s.sag_th, 60265);
        assert_eq!(
            atm90e32::settings(60, 4, [1; 3], [1; 3]).unwrap().mmode0,
            0x1087
        );
        assert_eq!(
            atm90e32::settings(50, 4, [1; 3], [1; 3]).unwrap().mmode1,
            0x002A
        );
        assert_eq!(
            atm90e32::settings(50, 2, [1; 3], [1; 3]).unwrap().mmode1,
            0x0015
        );
        assert!(atm90e32::settings(55, 1, [1; 3], [1; 3]).is_err());
        assert!(atm90e32::settings(50, 3, [1; 3], [1; 3]).is_err());
    }

    #[test]
    fn conversions() {
        assert!(close(atm90e32::voltage_v(23000), 230.0, 1e-9));
        assert!(close(atm90e32::current_a(5000), 5.0, 1e-9));
        assert!(close(
            atm90e32::active_power_w(0x0034, 0x73BC),
            1100.0,
            1e-6
        ));
        assert!(close(
            atm90e32::active_power_w(0xFFCB, 0x8C44),
            -1100.0,
            1e-6
        ));
        assert!(close(atm90e32::power_factor(950), 0.95, 1e-12));
        assert!(close(atm90e32::power_factor(0xFC4A), -0.95, 1e-12));
        assert!(close(atm90e32::frequency_hz(5000), 50.0, 1e-12));
        // 3200 imp/kWh, register LSB 0.01 CF: 320 → 1 Wh.
        assert!(close(atm90e32::energy_wh(320), 1.0, 1e-12));
    }

    #[test]
    fn register_frames() {
        let mut exp = rd(0xD9, 0x59D8);
        exp.extend(wr(0x70, 0x789A));
        let mut spi = Mock::new(&exp);
        let mut chip = Atm90e32::new(spi.clone(), settings());
        assert_eq!(chip.read_register(0xD9).unwrap(), 0x59D8);
        chip.write_register(0x70, 0x789A).unwrap();
        chip.destroy();
        spi.done();
    }

    #[test]
    fn init_sequence() {
        let mut spi = Mock::new(&init_script());
        let mut chip = Atm90e32::new(spi.clone(), settings());
        chip.init().unwrap();
        chip.destroy();
        spi.done();
    }

    #[test]
    fn init_without_chip_fails_verification() {
        let mut exp = init_script();
        let n = exp.len();
        // Replace the MMode0 read-back with zeros (nobody on the bus).
        exp.truncate(n - 10);
        exp.extend(rd(0x33, 0x0000));
        let mut spi = Mock::new(&exp);
        let mut chip = Atm90e32::new(spi.clone(), settings());
        let e = chip.init().unwrap_err();
        assert!(matches!(
            e,
            Error::Verify {
                register: 0x33,
                found: 0,
                ..
            }
        ));
        assert!(atm90e32::meter_error("m", e)
            .hint
            .unwrap()
            .contains("chip select"));
        chip.destroy();
        spi.done();
    }

    fn phase_a(energy: u16) -> Vec<T<u8>> {
        let mut v = rd(0x33, 0x0087); // MMode0 check
        v.extend(rd(0xF8, 5000)); // Freq 50.00 Hz
        v.extend(rd(0xD9, 23000)); // UrmsA 230.00 V
        v.extend(rd(0xDD, 5000)); // IrmsA 5.000 A
        v.extend(rd(0xB1, 0x0034)); // PmeanA
        v.extend(rd(0xC1, 0x73BC)); // PmeanALSB → 1100 W
        v.extend(rd(0xBD, 950)); // PFmeanA 0.95
        v.extend(rd(0x81, energy)); // APenergyA
        v
    }

    #[test]
    fn measure_phase_a() {
        let mut spi = Mock::new(&phase_a(320));
        let mut chip = Atm90e32::new(spi.clone(), settings());
        let (f, r) = chip.measure(&[Phase::A]).unwrap();
        assert!(close(f, 50.0, 1e-9));
        assert!(close(r[0].voltage_v, 230.0, 1e-9));
        assert!(close(r[0].current_a, 5.0, 1e-9));
        assert!(close(r[0].power_w, 1100.0, 1e-6));
        assert!(close(r[0].power_factor, 0.95, 1e-9));
        assert!(close(r[0].energy_delta_wh, 1.0, 1e-9));
        chip.destroy();
        spi.done();
    }

    #[test]
    fn floating_miso_is_a_glitch_not_a_reading() {
        let mut spi = Mock::new(&rd(0x33, 0xFFFF));
        let mut chip = Atm90e32::new(spi.clone(), settings());
        assert!(matches!(chip.measure(&[Phase::A]), Err(Error::AllOnes)));
        chip.destroy();
        spi.done();
    }

    #[test]
    fn chip_reset_triggers_reinit() {
        let mut exp = rd(0x33, 0x0000);
        exp.extend(init_script());
        let mut spi = Mock::new(&exp);
        let mut chip = Atm90e32::new(spi.clone(), settings());
        assert!(matches!(
            chip.measure(&[Phase::A]),
            Err(Error::Reinitialised { found: 0 })
        ));
        chip.destroy();
        spi.done();
    }

    #[test]
    fn meter_ids_per_phase_and_energy_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let cfg: MeterConfig = toml::from_str(
            r#"
            id = "mains"
            kind = "atm90e32"
            phases = ["a"]
            ugain = [7305, 7305, 7305]
            igain = [27961, 27961, 27961]
            "#,
        )
        .unwrap();
        let MeterConfig::Atm90e32(cfg) = cfg else {
            panic!("wrong kind")
        };
        let cfg: Atm90e32Config = cfg;
        let mut exp = init_script();
        exp.extend(phase_a(320));
        exp.extend(phase_a(640));
        let mut spi = Mock::new(&exp);
        let mut m = Atm90e32Meter::new(&cfg, spi.clone(), dir.path()).unwrap();
        let t0 = Instant::now();
        let a = m.read_at(t0).unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].meter, "mains-a");
        assert_eq!(a[0].energy_wh, Some(1.0));
        let b = m.read_at(t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(b[0].energy_wh, Some(3.0));
        drop(m);
        spi.done();
        let s = std::fs::read_to_string(dir.path().join("mains.energy_wh")).unwrap();
        assert_eq!(atm90e32::parse_totals(&s).unwrap(), [3.0, 0.0, 0.0]);
    }
}

mod modbus {
    use super::*;
    use ems_edge::meters::modbus::{
        self, ModbusConfig, ModbusError, ModbusMeter, RtuMaster, SerialPort,
    };
    use std::collections::VecDeque;
    use std::io;

    /// Independent CRC-16/MODBUS for building test frames.
    fn crc(data: &[u8]) -> [u8; 2] {
        let mut c: u16 = 0xFFFF;
        for &b in data {
            c ^= b as u16;
            for _ in 0..8 {
                let lsb = c & 1;
                c >>= 1;
                if lsb == 1 {
                    c ^= 0xA001;
                }
            }
        }
        [(c & 0xFF) as u8, (c >> 8) as u8]
    }

    fn with_crc(mut v: Vec<u8>) -> Vec<u8> {
        let c = crc(&v);
        v.extend_from_slice(&c);
        v
    }

    fn request(unit: u8, start: u16, count: u16) -> Vec<u8> {
        with_crc(vec![
            unit,
            0x04,
            (start >> 8) as u8,
            start as u8,
            (count >> 8) as u8,
            count as u8,
        ])
    }

    fn response(unit: u8, regs: &[u16]) -> Vec<u8> {
        let mut v = vec![unit, 0x04, (regs.len() * 2) as u8];
        for r in regs {
            v.extend_from_slice(&r.to_be_bytes());
        }
        with_crc(v)
    }

    fn float_regs(x: f32) -> [u16; 2] {
        let b = x.to_bits();
        [(b >> 16) as u16, b as u16]
    }

    enum Step {
        Expect(Vec<u8>),
        Answer(Vec<u8>),
        Silence,
    }

    /// A serial port that checks each written frame against a script and
    /// answers (in 3-byte chunks, like a slow UART) or stays silent.
    struct ScriptedPort {
        steps: VecDeque<Step>,
        pending: VecDeque<u8>,
    }

    impl ScriptedPort {
        fn new(steps: Vec<Step>) -> Self {
            ScriptedPort {
                steps: steps.into(),
                pending: VecDeque::new(),
            }
        }
        fn done(&self) {
            assert!(
                self.steps.is_empty(),
                "{} script steps left",
                self.steps.len()
            );
        }
    }

    impl SerialPort for ScriptedPort {
        fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
            match self.steps.pop_front() {
                Some(Step::Expect(e)) => assert_eq!(data, &e[..], "unexpected request"),
                _ => panic!("unexpected write {data:02X?}"),
            }
            match self.steps.pop_front() {
                Some(Step::Answer(a)) => self.pending.extend(a),
                Some(Step::Silence) => {}
                _ => panic!("script: a request must be followed by Answer or Silence"),
            }
            Ok(())
        }
        fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
            if self.pending.is_empty() {
                std::thread::sleep(timeout.min(Duration::from_millis(2)));
                return Ok(0);
            }
            let n = buf.len().min(3).min(self.pending.len());
            for b in buf.iter_mut().take(n) {
                *b = self.pending.pop_front().unwrap_or(0);
            }
            Ok(n)
        }
        fn clear_input(&mut self) -> io::Result<()> {
            self.pending.clear();
            Ok(())
        }
    }

    fn master(steps: Vec<Step>, retries: u32) -> RtuMaster<ScriptedPort> {
        RtuMaster::new(
            ScriptedPort::new(steps),
            9600,
            Duration::from_millis(30),
            retries,
        )
    }

    #[test]
    fn request_frame_reads_sdm_voltage() {
        assert_eq!(
            modbus::read_input_registers_request(1, 0x0000, 2),
            [0x01, 0x04, 0x00, 0x00, 0x00, 0x02, 0x71, 0xCB]
        );
        // PZEM-004T v3 "read all" from its manual: F8 04 00 00 00 0A 64 64.
        assert_eq!(
            modbus::read_input_registers_request(0xF8, 0x0000, 10),
            [0xF8, 0x04, 0x00, 0x00, 0x00, 0x0A, 0x64, 0x64]
        );
        assert_eq!(modbus::crc16(&[0x01, 0x04, 0x00, 0x00, 0x00, 0x02]), 0xCB71);
    }

    #[test]
    fn float_decoding() {
        assert_eq!(modbus::f32_be(0x4366, 0x0000), 230.0);
        assert_eq!(modbus::u32_low_first(0x3039, 0x0001), 0x0001_3039);
    }

    #[test]
    fn t35_at_9600_and_fast_lines() {
        assert_eq!(modbus::t35(9600), Duration::from_micros(4011));
        assert_eq!(modbus::t35(115_200), Duration::from_micros(1750));
    }

    #[test]
    fn reads_sdm_voltage_literal_frames() {
        let mut m = master(
            vec![
                Step::Expect(vec![0x01, 0x04, 0x00, 0x00, 0x00, 0x02, 0x71, 0xCB]),
                Step::Answer(vec![0x01, 0x04, 0x04, 0x43, 0x66, 0x00, 0x00, 0x0E, 0x1F]),
            ],
            0,
        );
        let r = m.read_input_registers(1, 0, 2).unwrap();
        assert_eq!(modbus::f32_be(r[0], r[1]), 230.0);
        m.destroy().done();
    }

    #[test]
    fn crc_mismatch_is_retried_then_reported() {
        let bad = vec![0x01, 0x04, 0x04, 0x43, 0x66, 0x00, 0x00, 0x0E, 0x1E];
        let good = vec![0x01, 0x04, 0x04, 0x43, 0x66, 0x00, 0x00, 0x0E, 0x1F];
        let req = vec![0x01, 0x04, 0x00, 0x00, 0x00, 0x02, 0x71, 0xCB];
        // One retry: bad then good → OK.
        let mut m = master(
            vec![
                Step::Expect(req.clone()),
                Step::Answer(bad.clone()),
                Step::Expect(req.clone()),
                Step::Answer(good),
            ],
            1,
        );
        assert!(m.read_input_registers(1, 0, 2).is_ok());
        m.destroy().done();
        // No retry: CRC error.
        let mut m = master(vec![Step::Expect(req), Step::Answer(bad)], 0);
        let e = m.read_input_registers(1, 0, 2).unwrap_err();
        assert!(
            matches!(
                e,
                ModbusError::Crc {
                    received: 0x1E0E,
                    computed: 0x1F0E
                }
            ),
            "{e}"
        );
        m.destroy().done();
    }

    #[test]
    fn timeout_after_retries() {
        let req = request(7, 0, 2);
        let mut m = master(
            vec![
                Step::Expect(req.clone()),
                Step::Silence,
                Step::Expect(req.clone()),
                Step::Silence,
                Step::Expect(req),
                Step::Silence,
            ],
            2,
        );
        let t0 = Instant::now();
        let e = m.read_input_registers(7, 0, 2).unwrap_err();
        assert!(
            matches!(
                e,
                ModbusError::Timeout {
                    unit: 7,
                    received: 0,
                    ..
                }
            ),
            "{e}"
        );
        assert!(t0.elapsed() >= Duration::from_millis(90));
        m.destroy().done();
        let me = modbus::meter_error("house", 7, e);
        assert!(me.hint.unwrap().contains("A/B"));
    }

    #[test]
    fn partial_frame_times_out() {
        let mut m = master(
            vec![
                Step::Expect(request(1, 0, 2)),
                Step::Answer(vec![0x01, 0x04, 0x04, 0x43]),
            ],
            0,
        );
        let e = m.read_input_registers(1, 0, 2).unwrap_err();
        assert!(matches!(e, ModbusError::Timeout { received: 4, .. }), "{e}");
        m.destroy().done();
    }

    #[test]
    fn exception_response_is_not_retried() {
        let mut m = master(
            vec![
                Step::Expect(request(1, 0x0156, 2)),
                Step::Answer(vec![0x01, 0x84, 0x02, 0xC2, 0xC1]),
            ],
            3,
        );
        let e = m.read_input_registers(1, 0x0156, 2).unwrap_err();
        assert!(
            matches!(
                e,
                ModbusError::Exception {
                    unit: 1,
                    function: 0x04,
                    code: 0x02,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("illegal data address"));
        m.destroy().done();
    }

    #[test]
    fn line_turnaround_noise_before_the_frame_is_skipped() {
        let mut answer = vec![0x00, 0xFF];
        answer.extend([0x01, 0x04, 0x04, 0x43, 0x66, 0x00, 0x00, 0x0E, 0x1F]);
        let mut m = master(
            vec![
                Step::Expect(vec![0x01, 0x04, 0x00, 0x00, 0x00, 0x02, 0x71, 0xCB]),
                Step::Answer(answer),
            ],
            0,
        );
        let r = m.read_input_registers(1, 0, 2).unwrap();
        assert_eq!(r, vec![0x4366, 0x0000]);
        m.destroy().done();
    }

    #[test]
    fn answer_from_another_unit_is_retried() {
        let mut m = master(
            vec![
                Step::Expect(request(2, 0, 1)),
                Step::Answer(response(3, &[1])),
                Step::Expect(request(2, 0, 1)),
                Step::Answer(response(2, &[1])),
            ],
            1,
        );
        assert_eq!(m.read_input_registers(2, 0, 1).unwrap(), vec![1]);
        m.destroy().done();
    }

    fn cfg(toml_text: &str) -> ModbusConfig {
        match toml::from_str::<MeterConfig>(toml_text).unwrap() {
            MeterConfig::Modbus(c) => c,
            other => panic!("{other:?}"),
        }
    }

    fn sdm120_script(voltage: f32) -> Vec<Step> {
        let mut s = Vec::new();
        for (start, value) in [
            (0x0000u16, voltage),
            (0x0006, 4.8),
            (0x000C, 1050.5),
            (0x0018, -120.0),
            (0x001E, 0.95),
        ] {
            s.push(Step::Expect(request(1, start, 2)));
            s.push(Step::Answer(response(1, &float_regs(value))));
        }
        s.push(Step::Expect(request(1, 0x0046, 4)));
        let mut r = float_regs(50.02).to_vec();
        r.extend(float_regs(1234.5));
        s.push(Step::Answer(response(1, &r)));
        s
    }

    #[test]
    fn sdm120_profile() {
        let c = cfg("id = \"house\"\nkind = \"modbus\"\nprofile = \"sdm120\"\nbaud = 9600\n");
        assert_eq!(c.baud(), 9600);
        let mut m = ModbusMeter::new(&c, ScriptedPort::new(sdm120_script(230.0)));
        let ms = m.read().unwrap();
        let x = &ms[0];
        assert_eq!(x.meter, "house");
        assert_eq!(x.voltage_v, Some(230.0));
        assert!(close(x.current_a.unwrap(), 4.8, 1e-6));
        assert!(close(x.power_w.unwrap(), 1050.5, 1e-3));
        assert!(close(x.reactive_power_var.unwrap(), -120.0, 1e-3));
        assert!(close(x.power_factor.unwrap(), 0.95, 1e-6));
        assert!(close(x.frequency_hz.unwrap(), 50.02, 1e-4));
        assert!(close(x.energy_wh.unwrap(), 1_234_500.0, 0.1));
        m.destroy().done();
    }

    #[test]
    fn nan_float_is_not_a_reading() {
        let c = cfg("id = \"house\"\nkind = \"modbus\"\nprofile = \"sdm120\"\n");
        let mut m = ModbusMeter::new(&c, ScriptedPort::new(sdm120_script(f32::NAN)));
        let e = m.read().unwrap_err();
        assert!(e.message.contains("implausible"), "{e}");
        m.destroy().done();
    }

    #[test]
    fn sdm630_profile_per_phase() {
        let c = cfg("id = \"main\"\nkind = \"modbus\"\nprofile = \"sdm630\"\nunit_id = 2\n");
        let mut block = Vec::new();
        let vals: [[f32; 3]; 6] = [
            [230.0, 231.0, 232.0], // V 0x00
            [1.0, 2.0, 3.0],       // A 0x06
            [200.0, 400.0, 600.0], // W 0x0C
            [210.0, 420.0, 630.0], // VA 0x12
            [10.0, 20.0, 30.0],    // var 0x18
            [0.95, 0.96, 0.97],    // PF 0x1E
        ];
        for group in vals {
            for v in group {
                block.extend(float_regs(v));
            }
        }
        assert_eq!(block.len(), 0x24);
        let mut e = Vec::new();
        for v in [1000.0f32, 2000.0, 3000.0] {
            e.extend(float_regs(v));
        }
        let steps = vec![
            Step::Expect(request(2, 0x0000, 0x24)),
            Step::Answer(response(2, &block)),
            Step::Expect(request(2, 0x0046, 2)),
            Step::Answer(response(2, &float_regs(49.98))),
            Step::Expect(request(2, 0x015A, 6)),
            Step::Answer(response(2, &e)),
        ];
        let mut m = ModbusMeter::new(&c, ScriptedPort::new(steps));
        let ms: Vec<Measurement> = m.read().unwrap();
        let ids: Vec<&str> = ms.iter().map(|x| x.meter.as_str()).collect();
        assert_eq!(ids, ["main-a", "main-b", "main-c"]);
        assert_eq!(ms[1].voltage_v, Some(231.0));
        assert_eq!(ms[2].current_a, Some(3.0));
        assert_eq!(ms[0].power_w, Some(200.0));
        assert_eq!(ms[2].reactive_power_var, Some(30.0));
        assert!(close(ms[1].power_factor.unwrap(), 0.96, 1e-6));
        assert_eq!(ms[2].energy_wh, Some(3_000_000.0));
        m.destroy().done();
    }

    #[test]
    fn pzem004t_profile_scaling() {
        let c = cfg(
            "id = \"pzem\"\nkind = \"modbus\"\nprofile = \"pzem004t\"\naddress = 0xF8\nport = \"/dev/ttyUSB1\"\n",
        );
        assert_eq!(c.unit_id, 0xF8);
        let regs = [
            2301,   // V ×0.1 → 230.1
            0x1388, // A low  → 5.000 A
            0x0000, // A high
            0x2AF8, // W low ×0.1 → 1100.0 W
            0x0000, // W high
            0x3039, // Wh low
            0x0001, // Wh high → 77881 Wh
            500,    // Hz ×0.1 → 50.0
            95,     // PF ×0.01 → 0.95
            0,      // alarm
        ];
        let steps = vec![
            Step::Expect(vec![0xF8, 0x04, 0x00, 0x00, 0x00, 0x0A, 0x64, 0x64]),
            Step::Answer(response(0xF8, &regs)),
        ];
        let mut m = ModbusMeter::new(&c, ScriptedPort::new(steps));
        let x = &m.read().unwrap()[0];
        assert!(close(x.voltage_v.unwrap(), 230.1, 1e-9));
        assert!(close(x.current_a.unwrap(), 5.0, 1e-9));
        assert!(close(x.power_w.unwrap(), 1100.0, 1e-9));
        assert_eq!(x.energy_wh, Some(77_881.0));
        assert!(close(x.frequency_hz.unwrap(), 50.0, 1e-9));
        assert!(close(x.power_factor.unwrap(), 0.95, 1e-9));
        m.destroy().done();
    }

    #[test]
    fn pzem_all_ones_is_a_glitch() {
        let c = cfg("id = \"pzem\"\nkind = \"modbus\"\nprofile = \"pzem004t\"\nretries = 0\n");
        let steps = vec![
            Step::Expect(request(1, 0, 10)),
            Step::Answer(response(1, &[0xFFFF; 10])),
        ];
        let mut m = ModbusMeter::new(&c, ScriptedPort::new(steps));
        assert!(m.read().is_err());
        m.destroy().done();
    }

    #[test]
    fn config_validation() {
        let mut c = cfg("id = \"x\"\nkind = \"modbus\"\nprofile = \"sdm120\"\n");
        assert_eq!(c.baud(), 2400);
        assert_eq!(c.port, "/dev/ttyUSB0");
        assert!(c.validate().is_ok());
        c.unit_id = 0;
        assert!(c.validate().is_err());
        assert!(toml::from_str::<MeterConfig>(
            "id = \"x\"\nkind = \"modbus\"\nprofile = \"sdm120\"\nbaudrate = 9600\n"
        )
        .is_err());
        assert!(toml::from_str::<MeterConfig>(
            "id = \"x\"\nkind = \"modbus\"\nprofile = \"sdm999\"\n"
        )
        .is_err());
    }
}

mod pulse {
    use super::*;
    use embedded_hal_mock::eh1::digital::{Mock, State, Transaction as T};
    use ems_edge::meters::pulse::{
        self, EdgeOutcome, PinPoller, PulseConfig, PulseCounter, PulseMeter,
    };

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    fn counter() -> PulseCounter {
        PulseCounter::new(1000.0, ms(20), 20_000.0, 0)
    }

    #[test]
    fn issue_vector_2000_w() {
        let mut c = counter();
        assert_eq!(c.on_edge(ms(10_000)), EdgeOutcome::Counted);
        assert_eq!(c.power_w(ms(10_500)), None);
        assert_eq!(c.on_edge(ms(11_800)), EdgeOutcome::Counted);
        assert!(close(c.power_w(ms(11_800)).unwrap(), 2000.0, 1e-9));
        assert_eq!(c.count(), 2);
        assert!(close(c.energy_wh(), 2.0, 1e-12));
        // No pulse for 3.6 s after the last: at most 1000 W now.
        assert!(close(c.power_w(ms(15_400)).unwrap(), 1000.0, 1e-9));
    }

    #[test]
    fn debounce_and_implausible_intervals() {
        let mut c = counter();
        c.on_edge(ms(0));
        assert_eq!(c.on_edge(ms(5)), EdgeOutcome::Bounce);
        // 20 kW at 1000 imp/kWh → 180 ms minimum.
        assert_eq!(c.on_edge(ms(100)), EdgeOutcome::Rejected);
        assert_eq!(c.rejected(), 1);
        assert_eq!(c.on_edge(ms(1800)), EdgeOutcome::Counted);
        assert_eq!(c.count(), 2);
        assert!(close(c.power_w(ms(1800)).unwrap(), 2000.0, 1e-9));
    }

    #[test]
    fn kernel_seqno_gap_counts_missed_pulses() {
        let mut c = counter();
        c.on_event(ms(0), 1);
        c.on_event(ms(10_000), 4);
        assert_eq!(c.missed(), 2);
        assert_eq!(c.count(), 4);
    }

    #[test]
    fn poller_with_mock_pin_counts_falling_edges() {
        let mut pin = Mock::new(&[
            T::get(State::High),
            T::get(State::Low),
            T::get(State::Low),
            T::get(State::High),
            T::get(State::Low),
        ]);
        let mut c = counter();
        let mut p = PinPoller::new(pin.clone(), false);
        assert_eq!(p.poll(&mut c, ms(0)).unwrap(), None);
        assert_eq!(p.poll(&mut c, ms(100)).unwrap(), Some(EdgeOutcome::Counted));
        assert_eq!(p.poll(&mut c, ms(200)).unwrap(), None);
        assert_eq!(p.poll(&mut c, ms(1000)).unwrap(), None);
        assert_eq!(
            p.poll(&mut c, ms(1900)).unwrap(),
            Some(EdgeOutcome::Counted)
        );
        assert!(close(c.power_w(ms(1900)).unwrap(), 2000.0, 1e-9));
        p.destroy();
        pin.done();
    }

    fn cfg() -> PulseConfig {
        match toml::from_str::<MeterConfig>(
            "id = \"hp\"\nkind = \"pulse\"\npin = 17\npulses_per_kwh = 1000\n",
        )
        .unwrap()
        {
            MeterConfig::Pulse(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn config_defaults_and_validation() {
        let c = cfg();
        assert_eq!(c.debounce_ms, 20);
        assert_eq!(c.max_power_w, 20_000.0);
        assert!(c.validate().is_ok());
        let mut bad = c.clone();
        bad.debounce_ms = 500; // longer than the 180 ms minimum interval
        assert!(bad.validate().is_err());
    }

    #[test]
    fn count_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg();
        {
            let mut m: PulseMeter<()> = PulseMeter::new(&c, dir.path()).unwrap();
            let shared = m.shared();
            for (i, t) in [0u64, 1800, 3600].iter().enumerate() {
                pulse::record_event(&shared, ms(*t), Some(i as u32 + 1));
            }
            let r = m.read().unwrap();
            assert!(close(r[0].energy_wh.unwrap(), 3.0, 1e-12));
            assert!(r[0].power_w.is_some());
        }
        let stored = std::fs::read_to_string(dir.path().join("hp.pulses")).unwrap();
        assert_eq!(stored.trim(), "3");
        let mut m: PulseMeter<()> = PulseMeter::new(&c, dir.path()).unwrap();
        let r = m.read().unwrap();
        assert!(close(r[0].energy_wh.unwrap(), 3.0, 1e-12));
        assert_eq!(r[0].power_w, None);
        pulse::record_event(&m.shared(), ms(0), Some(1));
        let r = m.read().unwrap();
        assert!(close(r[0].energy_wh.unwrap(), 4.0, 1e-12));
    }

    #[test]
    fn corrupt_state_is_an_error_not_zero() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hp.pulses"), "garbage").unwrap();
        let e = PulseMeter::<()>::new(&cfg(), dir.path()).err().unwrap();
        assert!(e.hint.is_some());
    }
}

mod open_and_tools {
    use super::*;
    use ems_edge::platform;

    fn parse(text: &str) -> MeterConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn every_kind_parses_and_unknown_keys_fail() {
        for text in [
            "id = \"a\"\nkind = \"ina219\"\nshunt_ohms = 0.1\nmax_current_a = 3.2\n",
            "id = \"a\"\nkind = \"ina226\"\nbus = 3\naddress = 0x45\nshunt_ohms = 0.002\nmax_current_a = 10\n",
            "id = \"a\"\nkind = \"atm90e32\"\nugain = [1,2,3]\nigain = [4,5,6]\n",
            "id = \"a\"\nkind = \"pulse\"\npin = 17\npulses_per_kwh = 800\n",
            "id = \"a\"\nkind = \"modbus\"\nprofile = \"pzem004t\"\n",
        ] {
            let c = parse(text);
            assert_eq!(c.id(), "a");
        }
        assert!(toml::from_str::<MeterConfig>(
            "id = \"a\"\nkind = \"ina219\"\nshunt = 0.1\nmax_current_a = 3.2\n"
        )
        .is_err());
    }

    /// On a host without the buses, opening fails with a hint, never a panic.
    #[test]
    fn opening_missing_hardware_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "id = \"i\"\nkind = \"ina219\"\nbus = 250\nshunt_ohms = 0.1\nmax_current_a = 3.2\n",
                "dtparam=i2c_arm=on",
            ),
            (
                "id = \"s\"\nkind = \"atm90e32\"\nbus = 6\nchip_select = 2\nugain = [1,1,1]\nigain = [1,1,1]\n",
                "dtparam=spi=on",
            ),
            (
                "id = \"m\"\nkind = \"modbus\"\nprofile = \"sdm120\"\nport = \"/dev/ttyEMS-does-not-exist\"\n",
                "enable_uart=1",
            ),
        ];
        for (text, hint) in cases {
            match platform::open(&parse(text), dir.path()) {
                Ok(_) => panic!("opened {text}"),
                Err(e) => {
                    let h = e.hint.clone().unwrap_or_default();
                    assert!(h.contains(hint), "{e}: {h}");
                }
            }
        }
        // GPIO: not a Pi here (or a Pi: then it may open); never a panic.
        let r = platform::open(
            &parse("id = \"p\"\nkind = \"pulse\"\npin = 17\npulses_per_kwh = 1000\n"),
            dir.path(),
        );
        if let Err(e) = r {
            assert!(!e.message.is_empty());
        }
    }
}
