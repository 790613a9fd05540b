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
