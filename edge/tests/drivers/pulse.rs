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
fn pulses_1_8_s_apart_at_1000_imp_per_kwh_are_2000_w() {
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
