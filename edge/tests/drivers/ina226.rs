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
    let mut bus =
        Mock::new(&[T::write(ADDR, vec![0x05])
            .with_error(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Data))]);
    let mut chip = Ina226::new(bus.clone(), ADDR, 0.002, 10.0).unwrap();
    let e = chip.measure().unwrap_err();
    let me = ina226::meter_error("x", ADDR, e);
    assert!(me.message.contains("rejected"), "{me}");
    chip.destroy();
    bus.done();
}

#[test]
fn datasheet_configure_measure_calculate_example() {
    // INA226 datasheet (SBOS547), "Configure/Measure/Calculate Example",
    // Table 1: 10 A load, 12 V common mode, 2 mΩ shunt, 15 A maximum
    // expected current → Current_LSB 457.7 µA/bit by Equation 2, rounded
    // to 1 mA/bit → CAL 2560 (A00h); power LSB 25 × 1 mA = 25 mW.
    let c = ina226::calibration(0.002, 15.0).unwrap();
    assert!(close(15.0 / 32768.0, 457.7e-6, 0.1e-6));
    assert!(close(c.current_lsb_a, 0.001, 1e-12));
    assert_eq!(c.cal, 0x0A00);
    let mut exp = Vec::new();
    exp.extend(read(0x05, 0x0A00)); // Calibration 2560
    exp.extend(read(0x06, 0x0008)); // conversion ready, no overflow
    exp.extend(read(0x02, 0x2570)); // Bus 9584 × 1.25 mV = 11.98 V
    exp.extend(read(0x01, 0x1F40)); // Shunt 8000 × 2.5 µV = 20 mV
    exp.extend(read(0x04, 0x2710)); // Current 10000 × 1 mA = 10 A
    exp.extend(read(0x03, 0x12B8)); // Power 4792 × 25 mW = 119.8 W
    let mut bus = Mock::new(&exp);
    let mut chip = Ina226::new(bus.clone(), ADDR, 0.002, 15.0).unwrap();
    let r = chip.measure().unwrap();
    assert!(close(r.voltage_v, 11.98, 1e-9));
    assert!(close(r.current_a, 10.0, 1e-9));
    assert!(close(r.power_w, 119.8, 1e-9));
    // Equation 3: Current = Shunt × CAL / 2048; Equation 4: Power =
    // Current × Bus / 20 000 — the register values are consistent. (The
    // table prints 119.82 W for the power; 4792 × 25 mW is 119.8 W, the
    // value its text gives for 11.98 V × 10 A.)
    assert_eq!(8000 * 2560 / 2048, 0x2710);
    assert_eq!(10000 * 9584 / 20000, 0x12B8);
    chip.destroy();
    bus.done();
}
