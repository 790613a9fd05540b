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

/// A master whose answers all come: a response timeout no loaded machine
/// reaches between two chunks of an answer.
fn master(steps: Vec<Step>, retries: u32) -> RtuMaster<ScriptedPort> {
    master_timing_out_after(steps, retries, Duration::from_secs(2))
}

/// A master for scripts that end in silence, timing out after `timeout`.
fn master_timing_out_after(
    steps: Vec<Step>,
    retries: u32,
    timeout: Duration,
) -> RtuMaster<ScriptedPort> {
    RtuMaster::new(ScriptedPort::new(steps), 9600, timeout, retries)
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
    let mut m = master_timing_out_after(
        vec![
            Step::Expect(req.clone()),
            Step::Silence,
            Step::Expect(req.clone()),
            Step::Silence,
            Step::Expect(req),
            Step::Silence,
        ],
        2,
        Duration::from_millis(30),
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
    let mut m = master_timing_out_after(
        vec![
            Step::Expect(request(1, 0, 2)),
            Step::Answer(vec![0x01, 0x04, 0x04, 0x43]),
        ],
        0,
        Duration::from_millis(30),
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
    assert!(
        toml::from_str::<MeterConfig>("id = \"x\"\nkind = \"modbus\"\nprofile = \"sdm999\"\n")
            .is_err()
    );
}
