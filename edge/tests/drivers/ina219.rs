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
