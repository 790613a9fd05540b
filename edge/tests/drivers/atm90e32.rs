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

/// From the M90E32AS datasheet (register map, "power-on value" column) and
/// application note, written here independently of the driver. The
/// configuration block 31H–3AH has the same power-on values in the M90E36A
/// datasheet's table (Table-5).
mod datasheet {
    pub const MMODE0: u16 = 0x33;
    pub const P_START_TH: u16 = 0x35;
    pub const AP_ENERGY_A: u16 = 0x81;
    pub const AP_ENERGY_B: u16 = 0x82;
    pub const URMS_B: u16 = 0xDA;
    /// MMode0 after power-on: 3P4W, 50 Hz — the same as the driver's
    /// 50 Hz setting, so MMode0 cannot reveal a reset at 50 Hz.
    pub const MMODE0_POWER_ON: u16 = 0x0087;
    /// PStartTh after power-on (no start-up threshold).
    pub const P_START_TH_POWER_ON: u16 = 0x0000;
    /// PLconstH/PLconstL after power-on.
    pub const PL_CONST_POWER_ON: u32 = 0x0861_C468;
    /// PL_constant = 4.5·10¹¹ / meter constant (imp/kWh).
    pub fn pl_constant(imp_per_kwh: u64) -> u32 {
        (450_000_000_000 / imp_per_kwh) as u32
    }
    /// Energy registers count 0.01 CF pulses; one CF pulse is 1/MC kWh.
    pub fn energy_lsb_wh(imp_per_kwh: f64) -> f64 {
        1000.0 / imp_per_kwh / 100.0
    }
    /// PStartTh unit, and the LSB of the 32-bit mean power (Pmean·2¹⁶ +
    /// PmeanLSB).
    pub const POWER_LSB_W: f64 = 0.00032;
}

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

/// The reset check every sample starts with: MMode0 and PStartTh read
/// back as configured.
fn configured() -> Vec<T<u8>> {
    let mut v = rd(0x33, 0x0087); // MMode0
    v.extend(rd(0x35, 0x1D4C)); // PStartTh as written by init
    v
}

/// Phase A's measurement registers (energy last: it clears on read).
fn phase_a_values(pf: u16) -> Vec<T<u8>> {
    let mut v = rd(0xD9, 23000); // UrmsA 230.00 V
    v.extend(rd(0xDD, 5000)); // IrmsA 5.000 A
    v.extend(rd(0xB1, 0x0034)); // PmeanA
    v.extend(rd(0xC1, 0x73BC)); // PmeanALSB → 1100 W
    v.extend(rd(0xBD, pf)); // PFmeanA
    v
}

fn phase_a(energy: u16) -> Vec<T<u8>> {
    let mut v = configured();
    v.extend(rd(0xF8, 5000)); // Freq 50.00 Hz
    v.extend(phase_a_values(950)); // PF 0.95
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
    assert!(close(chip.take_drained(Phase::A), 1.0, 1e-9));
    assert_eq!(chip.take_drained(Phase::A), 0.0, "taken once");
    chip.destroy();
    spi.done();
}

#[test]
fn floating_miso_is_a_glitch_not_a_reading() {
    let mut exp = rd(0x33, 0xFFFF);
    exp.extend(rd(0x35, 0xFFFF));
    let mut spi = Mock::new(&exp);
    let mut chip = Atm90e32::new(spi.clone(), settings());
    assert!(matches!(chip.measure(&[Phase::A]), Err(Error::AllOnes)));
    chip.destroy();
    spi.done();
}

#[test]
fn chip_reset_triggers_reinit() {
    let mut exp = rd(0x33, 0x0000);
    exp.extend(rd(0x35, 0x0000));
    exp.extend(init_script());
    let mut spi = Mock::new(&exp);
    let mut chip = Atm90e32::new(spi.clone(), settings());
    assert!(matches!(
        chip.measure(&[Phase::A]),
        Err(Error::Reinitialised {
            register: 0x33,
            found: 0,
            resets: 1,
            ..
        })
    ));
    chip.destroy();
    spi.done();
}

#[test]
fn the_datasheet_power_on_values_and_what_init_writes() {
    use datasheet::*;
    // At 50 Hz the driver configures MMode0 to its power-on value: a reset
    // cannot be seen there. PStartTh is written with a value its power-on
    // value never has, so a reset shows there.
    assert_eq!(settings().mmode0, MMODE0_POWER_ON);
    // The PL constant init writes (init_script: 0861H, C468H) is the
    // power-on one, 3200 imp/kWh.
    assert_eq!(pl_constant(3200), PL_CONST_POWER_ON);
    assert_eq!((0x0861u32 << 16) | 0xC468, PL_CONST_POWER_ON);
    assert!(close(atm90e32::energy_wh(1), energy_lsb_wh(3200.0), 1e-15));
    assert!(close(atm90e32::energy_wh(320), 1.0, 1e-12));
    // 32-bit mean power: 1100 W = 3 437 500 LSB = 0x0034_73BC.
    assert_eq!((1100.0 / POWER_LSB_W).round() as u32, 0x0034_73BC);
    assert!(close(
        atm90e32::active_power_w(0x0034, 0x73BC),
        1100.0,
        1e-6
    ));
    assert_ne!(0x1D4C, P_START_TH_POWER_ON);
    assert_eq!(P_START_TH, 0x35);
    assert_eq!(MMODE0, 0x33);
}

#[test]
fn a_reset_is_detected_although_mmode0_reads_as_configured() {
    use datasheet::*;
    // After a brown-out at 50 Hz: MMode0 is back at its power-on value,
    // which equals the configured one; PStartTh is back at 0000H.
    let mut exp = rd(MMODE0, MMODE0_POWER_ON);
    exp.extend(rd(P_START_TH, P_START_TH_POWER_ON));
    exp.extend(init_script());
    // The next sample finds the chip configured again.
    exp.extend(phase_a(0));
    exp.extend(rd(MMODE0, MMODE0_POWER_ON));
    exp.extend(rd(P_START_TH, P_START_TH_POWER_ON));
    exp.extend(init_script());
    let mut spi = Mock::new(&exp);
    let mut chip = Atm90e32::new(spi.clone(), settings());
    let e = chip.measure(&[Phase::A]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Reinitialised {
                register: 0x35,
                found: 0,
                resets: 1,
                ..
            }
        ),
        "{e:?}"
    );
    chip.measure(&[Phase::A]).unwrap();
    let e = chip.measure(&[Phase::A]).unwrap_err();
    assert_eq!(chip.resets(), 2);
    assert!(e.to_string().contains("2 since start"), "{e}");
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

fn meter_cfg(phases: &str) -> Atm90e32Config {
    let cfg: MeterConfig = toml::from_str(&format!(
        r#"
        id = "mains"
        kind = "atm90e32"
        phases = {phases}
        ugain = [7305, 7305, 7305]
        igain = [27961, 27961, 27961]
        "#
    ))
    .unwrap();
    let MeterConfig::Atm90e32(cfg) = cfg else {
        panic!("wrong kind")
    };
    cfg
}

#[test]
fn energy_drained_in_an_implausible_sample_is_carried_into_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let mut exp = init_script();
    // A sample with an impossible power factor (2.000): no reading, but
    // the 1 Wh read (and cleared) from APenergyA is kept.
    exp.extend(configured());
    exp.extend(rd(0xF8, 5000));
    exp.extend(phase_a_values(2000));
    exp.extend(rd(0x81, 320));
    exp.extend(phase_a(320));
    let mut spi = Mock::new(&exp);
    let mut m = Atm90e32Meter::new(&meter_cfg(r#"["a"]"#), spi.clone(), dir.path()).unwrap();
    let t0 = Instant::now();
    assert!(m.read_at(t0).is_err());
    let b = m.read_at(t0 + Duration::from_secs(1)).unwrap();
    assert_eq!(b[0].energy_wh, Some(2.0));
    drop(m);
    spi.done();
}

/// The scripted bus, except that the first read of one register fails
/// (embedded-hal-mock cannot script a failing transfer).
#[derive(Clone)]
struct FailFirstRead {
    inner: Mock<u8>,
    register: u16,
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl embedded_hal::spi::ErrorType for FailFirstRead {
    type Error = embedded_hal::spi::ErrorKind;
}

impl embedded_hal::spi::SpiDevice for FailFirstRead {
    fn transaction(
        &mut self,
        operations: &mut [embedded_hal::spi::Operation<'_, u8>],
    ) -> Result<(), Self::Error> {
        let addr = [0x80 | (self.register >> 8) as u8, self.register as u8];
        let hits = matches!(operations.first(), Some(embedded_hal::spi::Operation::Write(w)) if *w == addr);
        if hits && !self.failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(embedded_hal::spi::ErrorKind::Other);
        }
        self.inner.transaction(operations)
    }
}

#[test]
fn energy_drained_before_a_failed_read_is_carried_into_the_next_sample() {
    let dir = tempfile::tempdir().unwrap();
    let phase_b_values = || {
        let mut v = rd(datasheet::URMS_B, 23000);
        v.extend(rd(0xDE, 5000));
        v.extend(rd(0xB2, 0x0034));
        v.extend(rd(0xC2, 0x73BC));
        v.extend(rd(0xBE, 950));
        v
    };
    let mut exp = init_script();
    // Sample 1: A's energy register is read (and cleared), then the bus
    // fails reading B's.
    exp.extend(configured());
    exp.extend(rd(0xF8, 5000));
    exp.extend(phase_a_values(950));
    exp.extend(phase_b_values());
    exp.extend(rd(datasheet::AP_ENERGY_A, 320));
    // (here the read of APenergyB fails)
    // Sample 2: fine.
    exp.extend(configured());
    exp.extend(rd(0xF8, 5000));
    exp.extend(phase_a_values(950));
    exp.extend(phase_b_values());
    exp.extend(rd(datasheet::AP_ENERGY_A, 320));
    exp.extend(rd(datasheet::AP_ENERGY_B, 640));
    let mut spi = Mock::new(&exp);
    let bus = FailFirstRead {
        inner: spi.clone(),
        register: datasheet::AP_ENERGY_B,
        failed: Default::default(),
    };
    let mut m = Atm90e32Meter::new(&meter_cfg(r#"["a", "b"]"#), bus, dir.path()).unwrap();
    let t0 = Instant::now();
    assert!(m.read_at(t0).is_err());
    let b = m.read_at(t0 + Duration::from_secs(1)).unwrap();
    assert_eq!(b[0].meter, "mains-a");
    assert_eq!(b[0].energy_wh, Some(2.0), "A's first drain is not lost");
    assert_eq!(b[1].energy_wh, Some(2.0));
    drop(m);
    spi.done();
}

#[test]
fn an_energy_register_reading_all_ones_is_a_glitch_not_energy() {
    let dir = tempfile::tempdir().unwrap();
    let mut exp = init_script();
    exp.extend(phase_a(0xFFFF)); // 204.8 Wh in one second: a floating MISO
    exp.extend(phase_a(320));
    let mut spi = Mock::new(&exp);
    let mut m = Atm90e32Meter::new(&meter_cfg(r#"["a"]"#), spi.clone(), dir.path()).unwrap();
    let t0 = Instant::now();
    let e = m.read_at(t0).unwrap_err();
    assert!(e.to_string().contains("all ones"), "{e}");
    let b = m.read_at(t0 + Duration::from_secs(1)).unwrap();
    assert_eq!(b[0].energy_wh, Some(1.0));
    drop(m);
    spi.done();
}
