//! Plausibility flags: the bits of the `flags` column of `readings`.
//!
//! Flags describe a reading; they never cause one to be dropped. The writer
//! computes them when it inserts the reading, against the meter's previous
//! energy reading it knows of at that time (see [`reading_flags`]).
//!
//! | bit | value | constant | set when |
//! |-----|-------|----------|----------|
//! | 0 | 1 | [`POWER_MISMATCH`] | `voltage_v`, `current_a`, `power_w` and `power_factor` are all present and `\|P − V·I·PF\| > 5 % · \|V·I·PF\| + 5 W` |
//! | 1 | 2 | [`FREQUENCY_RANGE`] | `frequency_hz` is present and outside 45–65 Hz |
//! | 2 | 4 | [`ENERGY_GLITCH`] | the pair from the previous energy reading is a glitch (average power above `--max-power-w`, or a jump at the same instant) |
//! | 3 | 8 | [`COUNTER_RESET`] | the energy counter is below the previous energy reading's |
//!
//! Higher bits are reserved; readers must ignore bits they do not know.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use ems_shared::Reading;

use super::rule::{classify, Limits, Pair};
use super::slots::Point;

/// `P` disagrees with `V·I·PF` by more than 5 % + 5 W.
pub const POWER_MISMATCH: u32 = 1 << 0;
/// Line frequency outside 45–65 Hz.
pub const FREQUENCY_RANGE: u32 = 1 << 1;
/// Energy jump implying more than the power limit.
pub const ENERGY_GLITCH: u32 = 1 << 2;
/// Energy counter went backwards.
pub const COUNTER_RESET: u32 = 1 << 3;

/// Every defined bit with its stable name (metric labels, documentation).
pub const ALL: [(u32, &str); 4] = [
    (POWER_MISMATCH, "power_mismatch"),
    (FREQUENCY_RANGE, "frequency_range"),
    (ENERGY_GLITCH, "energy_glitch"),
    (COUNTER_RESET, "counter_reset"),
];

/// Relative tolerance of the power check.
const POWER_REL_TOL: f64 = 0.05;
/// Absolute tolerance of the power check, W.
const POWER_ABS_TOL_W: f64 = 5.0;
/// Plausible line frequency, Hz (inclusive).
const FREQUENCY_HZ: (f64, f64) = (45.0, 65.0);

/// The flags of `r`. `prev_energy` is the meter's previous reading that has
/// an energy counter (in `(ts, epoch, seq)` order), if any: it decides
/// [`ENERGY_GLITCH`] and [`COUNTER_RESET`] exactly as the energy rule does.
pub fn reading_flags(r: &Reading, prev_energy: Option<Point>, limits: &Limits) -> u32 {
    let mut flags = 0;
    if let (Some(v), Some(i), Some(p), Some(pf)) =
        (r.voltage_v, r.current_a, r.power_w, r.power_factor)
    {
        let expected = v * i * pf;
        if (p - expected).abs() > POWER_REL_TOL * expected.abs() + POWER_ABS_TOL_W {
            flags |= POWER_MISMATCH;
        }
    }
    if let Some(f) = r.frequency_hz {
        if !(FREQUENCY_HZ.0..=FREQUENCY_HZ.1).contains(&f) {
            flags |= FREQUENCY_RANGE;
        }
    }
    if let (Some(prev), Some(wh)) = (prev_energy, r.energy_wh.filter(|v| v.is_finite())) {
        match classify(prev.value, wh, r.ts_ms - prev.ts_ms, limits) {
            Pair::Glitch => flags |= ENERGY_GLITCH,
            Pair::Reset => flags |= COUNTER_RESET,
            Pair::Counted(_) => {}
        }
    }
    flags
}

/// Names of the bits set in `flags`, in bit order (unknown bits skipped).
pub fn names(flags: u32) -> impl Iterator<Item = &'static str> {
    ALL.into_iter()
        .filter(move |(bit, _)| flags & bit != 0)
        .map(|(_, name)| name)
}

/// Stored readings by plausibility flag (`ems_reading_flags_total`): one
/// counter per bit of [`crate::energy::flags::ALL`], bumped once per
/// stored reading that has the bit (a resent duplicate is not stored and
/// not counted). A reading with two flags counts under both.
#[derive(Debug, Default)]
pub struct FlagCounts([AtomicU64; 4]);

impl FlagCounts {
    /// Adds the counts of one commit (in [`crate::energy::flags::ALL`]
    /// order).
    pub fn add(&self, counts: &[u64; 4]) {
        for (c, n) in self.0.iter().zip(counts) {
            if *n > 0 {
                c.fetch_add(*n, Ordering::Relaxed);
            }
        }
    }

    /// The count of each flag, in [`crate::energy::flags::ALL`] order.
    pub fn get(&self) -> [u64; 4] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }

    pub(crate) fn render(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "# HELP ems_reading_flags_total Stored readings by plausibility flag.\n\
             # TYPE ems_reading_flags_total counter"
        );
        for ((_, name), n) in crate::energy::flags::ALL.iter().zip(self.get()) {
            let _ = writeln!(o, "ems_reading_flags_total{{flag=\"{name}\"}} {n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading() -> Reading {
        Reading {
            ts_ms: 1_000_000,
            meter: "main".into(),
            ..Default::default()
        }
    }

    fn prev(ts_ms: i64, value: f64) -> Option<Point> {
        Some(Point { ts_ms, value })
    }

    #[test]
    fn bits_are_the_documented_values() {
        // Written out again so a changed constant fails here.
        assert_eq!(POWER_MISMATCH, 1);
        assert_eq!(FREQUENCY_RANGE, 2);
        assert_eq!(ENERGY_GLITCH, 4);
        assert_eq!(COUNTER_RESET, 8);
        assert_eq!(
            names(15).collect::<Vec<_>>(),
            [
                "power_mismatch",
                "frequency_range",
                "energy_glitch",
                "counter_reset"
            ]
        );
        assert_eq!(names(16 | 2).collect::<Vec<_>>(), ["frequency_range"]);
    }

    #[test]
    fn power_check_worked_values() {
        let l = Limits::default();
        // 230 V · 4.35 A · 0.96 = 960.48 W; tolerance 5 % · 960.48 + 5 = 53.024 W.
        let mut r = Reading {
            voltage_v: Some(230.0),
            current_a: Some(4.35),
            power_factor: Some(0.96),
            power_w: Some(960.5),
            ..reading()
        };
        assert_eq!(reading_flags(&r, None, &l), 0);
        r.power_w = Some(960.48 + 53.0);
        assert_eq!(reading_flags(&r, None, &l), 0);
        r.power_w = Some(960.48 + 53.1);
        assert_eq!(reading_flags(&r, None, &l), POWER_MISMATCH);
        r.power_w = Some(960.48 - 53.1);
        assert_eq!(reading_flags(&r, None, &l), POWER_MISMATCH);
        // Export: negative current and power agree.
        r.current_a = Some(-4.35);
        r.power_w = Some(-960.0);
        assert_eq!(reading_flags(&r, None, &l), 0);
        // Near zero the 5 W floor applies: 230 · 0.01 · 1 = 2.3 W vs 7 W.
        let r0 = Reading {
            voltage_v: Some(230.0),
            current_a: Some(0.01),
            power_factor: Some(1.0),
            power_w: Some(7.0),
            ..reading()
        };
        assert_eq!(reading_flags(&r0, None, &l), 0);
        let r1 = Reading {
            power_w: Some(7.5),
            ..r0.clone()
        };
        assert_eq!(reading_flags(&r1, None, &l), POWER_MISMATCH);
        // One of the four missing: no check.
        let r2 = Reading {
            power_factor: None,
            power_w: Some(5000.0),
            ..r0
        };
        assert_eq!(reading_flags(&r2, None, &l), 0);
    }

    #[test]
    fn frequency_worked_values() {
        let l = Limits::default();
        for (f, want) in [
            (50.0, 0),
            (45.0, 0),
            (65.0, 0),
            (44.99, FREQUENCY_RANGE),
            (65.01, FREQUENCY_RANGE),
            (0.0, FREQUENCY_RANGE),
        ] {
            let r = Reading {
                frequency_hz: Some(f),
                ..reading()
            };
            assert_eq!(reading_flags(&r, None, &l), want, "{f} Hz");
        }
    }

    #[test]
    fn energy_flags_follow_the_rule() {
        let l = Limits::default();
        let r = Reading {
            energy_wh: Some(1000.0),
            ..reading()
        };
        // 10 s earlier at 990 Wh: 10 Wh in 10 s = 3.6 kW, fine.
        assert_eq!(reading_flags(&r, prev(990_000, 990.0), &l), 0);
        // 10 s earlier at 1001 Wh: counter went backwards.
        assert_eq!(reading_flags(&r, prev(990_000, 1001.0), &l), COUNTER_RESET);
        // 1 s earlier at 0 Wh: 1000 Wh in 1 s = 3.6 GW.
        assert_eq!(reading_flags(&r, prev(999_000, 0.0), &l), ENERGY_GLITCH);
        // Same instant, different value: a glitch.
        assert_eq!(reading_flags(&r, prev(1_000_000, 999.0), &l), ENERGY_GLITCH);
        // No previous energy reading, or no energy in this one: no flag.
        assert_eq!(reading_flags(&r, None, &l), 0);
        let p = Reading {
            power_w: Some(1.0),
            ..reading()
        };
        assert_eq!(reading_flags(&p, prev(0, 1e12), &l), 0);
        // All at once.
        let all = Reading {
            voltage_v: Some(230.0),
            current_a: Some(1.0),
            power_factor: Some(1.0),
            power_w: Some(500.0),
            frequency_hz: Some(70.0),
            ..r
        };
        assert_eq!(
            reading_flags(&all, prev(990_000, 2000.0), &l),
            POWER_MISMATCH | FREQUENCY_RANGE | COUNTER_RESET
        );
    }
}
