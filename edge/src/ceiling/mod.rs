//! The energy ceiling: a saved upper bound on every `energy_wh` that may
//! leave the edge, per reading meter id, so readings go to the hub the
//! moment they are taken and energy counters still never go backwards.
//!
//! The edge keeps some energy counters itself (INA219/INA226 integration,
//! S0 pulses, ATM90E32 totals, the simulated meter) and saves them only now
//! and then. A reading that reached the hub carries a newer value; after a
//! crash the counter must not restart below it. The rule:
//!
//! - **A reading with `energy_wh` leaves only if its value is at most the
//!   meter's saved ceiling** ([`Ceilings::admits`]). Nearly always it is,
//!   so it is sent at once; one that is not waits for the next sync.
//! - A ceiling is raised before it is reached ([`Ceilings::plan`]): when a
//!   meter's highest value plus `lead` seconds at its recent rate would
//!   pass it, the sampler asks the supervisor for a raise at once, and it
//!   becomes that value plus `headroom` seconds at the recent rate (other
//!   meters past half their headroom are raised with it, so several
//!   meters cost one write). The new ceilings are written and fsynced
//!   ([`file`]) before any reading above the old ones leaves. A raise
//!   saves the ceiling file alone — one page, one fsync — unless a spool
//!   sync is due anyway (then it rides along); the readings in flight
//!   keep their own due time.
//! - After any crash each meter continues from at least its ceiling, so
//!   its first reading is ≥ everything that left. The price: a crash can
//!   add up to `headroom` seconds of energy at the recent rate to a
//!   counter (never take any away). At an orderly stop the ceilings are
//!   lowered to the exact last values, so a restart adds nothing.
//! - The recent rate is the larger of the energy increase per second and
//!   the reading's `power_w`, held at its peak and halving every
//!   `headroom` seconds, so a load that switches on raises it at once.
//!
//! All of it is pure bookkeeping (no I/O); [`file`] stores the values.

pub mod file;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

pub use file::CeilingFile;

/// Default headroom: how far ahead of the counter, in seconds at the recent
/// rate, a raised ceiling goes (see the module docs).
pub const DEFAULT_HEADROOM: Duration = Duration::from_secs(30);

/// Energy values per reading meter id, Wh.
pub type Values = BTreeMap<String, f64>;

/// What the edge knows of one meter since it started.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Track {
    /// Highest `energy_wh` appended.
    highest: f64,
    /// Recent rate, Wh per second (peak-held, decaying).
    rate: f64,
    /// `(ts_ms, energy_wh)` of the last reading.
    last: (i64, f64),
}

/// The ceilings and what they are raised from (see the module docs).
#[derive(Debug, Clone)]
pub struct Ceilings {
    /// How far ahead a raised ceiling goes, in seconds at the recent rate.
    headroom: f64,
    /// Raise when less than this many seconds at the recent rate are left.
    lead: f64,
    /// The values saved durably (a reading at or below may leave).
    saved: Values,
    /// Meters with readings since start.
    seen: BTreeMap<String, Track>,
    /// Meters whose counter is the meter's own: no ceiling.
    exempt: BTreeSet<String>,
}

impl Ceilings {
    /// Ceilings starting from the `saved` values (from [`CeilingFile`]).
    /// `lead` is the time the next sync may take to come (a couple of sync
    /// intervals); it is kept below half the headroom.
    pub fn new(saved: Values, headroom: Duration, lead: Duration) -> Self {
        let headroom = headroom.as_secs_f64().max(1.0);
        Ceilings {
            headroom,
            lead: lead.as_secs_f64().min(headroom / 2.0),
            saved,
            seen: BTreeMap::new(),
            exempt: BTreeSet::new(),
        }
    }

    /// `meter`'s energy counter lives in the meter itself (a crash of the
    /// edge cannot make it go backwards): its readings always leave at
    /// once and it gets no ceiling.
    pub fn exempt(&mut self, meter: &str) {
        self.exempt.insert(meter.to_string());
        self.seen.remove(meter);
    }

    /// Is `meter` exempt (see [`Ceilings::exempt`])?
    pub fn is_exempt(&self, meter: &str) -> bool {
        self.exempt.contains(meter)
    }

    /// The saved values.
    pub fn saved(&self) -> &Values {
        &self.saved
    }

    /// Takes a reading of `meter` into account (sample time `ts_ms`).
    /// Values that are not finite or negative are ignored.
    pub fn observe(&mut self, meter: &str, ts_ms: i64, energy_wh: f64, power_w: Option<f64>) {
        if !(energy_wh.is_finite() && energy_wh >= 0.0) || self.exempt.contains(meter) {
            return;
        }
        let power_rate = power_w
            .filter(|p| p.is_finite() && *p > 0.0)
            .map_or(0.0, |p| p / 3600.0);
        match self.seen.get_mut(meter) {
            None => {
                self.seen.insert(
                    meter.to_string(),
                    Track {
                        highest: energy_wh,
                        rate: power_rate,
                        last: (ts_ms, energy_wh),
                    },
                );
            }
            Some(t) => {
                let (t0, e0) = t.last;
                let dt = (ts_ms - t0) as f64 / 1000.0;
                let mut rate = power_rate;
                if dt > 0.0 {
                    rate = rate.max((energy_wh - e0).max(0.0) / dt);
                    t.rate *= 0.5f64.powf(dt / self.headroom);
                }
                t.rate = t.rate.max(rate);
                t.highest = t.highest.max(energy_wh);
                t.last = (ts_ms, energy_wh);
            }
        }
    }

    /// May a reading of `meter` with `energy_wh` leave now?
    pub fn admits(&self, meter: &str, energy_wh: f64) -> bool {
        self.exempt.contains(meter) || self.saved.get(meter).is_some_and(|c| energy_wh <= *c)
    }

    /// The values to save now, if any ceiling needs raising (see the
    /// module docs); `None` if none does.
    pub fn plan(&self) -> Option<Values> {
        if !self.needs_raise() {
            return None;
        }
        let mut out = self.saved.clone();
        for (m, t) in &self.seen {
            let half_left = t.highest + t.rate * self.headroom / 2.0;
            let c = out.entry(m.clone()).or_insert(f64::NEG_INFINITY);
            if *c < half_left.max(t.highest) {
                *c = c.max(t.highest + t.rate * self.headroom);
            }
        }
        Some(out)
    }

    /// Whether a ceiling needs raising: a meter without one, or one whose
    /// readings would reach it within `lead` at their recent rate.
    pub fn needs_raise(&self) -> bool {
        self.seen.iter().any(|(m, t)| {
            self.saved
                .get(m)
                .map_or(true, |c| t.highest + t.rate * self.lead > *c)
        })
    }

    /// `values` (from [`Ceilings::plan`]) are saved durably.
    pub fn mark_saved(&mut self, values: Values) {
        self.saved = values;
    }

    /// The values to save at an orderly stop, after the last reading was
    /// taken: each meter's exact highest value (a restart then adds
    /// nothing), the saved value of meters without readings since start.
    pub fn at_stop(&self) -> Values {
        let mut out = self.saved.clone();
        for (m, t) in &self.seen {
            out.insert(m.clone(), t.highest);
        }
        out
    }

    /// The most energy a crash now could add to `meter`'s counter: its
    /// ceiling minus its highest value (tests, logs).
    pub fn headroom_of(&self, meter: &str) -> Option<f64> {
        let t = self.seen.get(meter)?;
        Some(self.saved.get(meter)? - t.highest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// 3600 W: one Wh per second.
    const KW3_6: Option<f64> = Some(3600.0);

    /// Feeds one reading a second at 1 Wh/s from `e0` for `n` seconds,
    /// starting at `t0` s; returns the last energy.
    fn stream(c: &mut Ceilings, t0: i64, e0: f64, n: i64) -> f64 {
        let mut e = e0;
        for i in 0..n {
            e = e0 + i as f64;
            c.observe("m", (t0 + i) * 1000, e, KW3_6);
        }
        e
    }

    #[test]
    fn a_first_reading_above_the_saved_value_waits_for_a_raise() {
        let mut c = Ceilings::new(Values::new(), secs(30), secs(3));
        assert!(!c.admits("m", 0.0), "no saved ceiling: nothing leaves");
        c.observe("m", 0, 100.0, KW3_6);
        assert!(!c.admits("m", 100.0));
        let plan = c.plan().expect("a raise");
        // Highest + 30 s at 1 Wh/s.
        assert_eq!(plan["m"], 130.0);
        c.mark_saved(plan);
        assert!(c.admits("m", 100.0) && c.admits("m", 130.0) && !c.admits("m", 130.001));
        assert_eq!(c.headroom_of("m"), Some(30.0));
    }

    #[test]
    fn steady_power_raises_once_per_headroom_less_lead() {
        let mut c = Ceilings::new(Values::new(), secs(30), secs(3));
        let mut raises = vec![];
        let mut e = 0.0;
        for s in 0..300 {
            e = s as f64;
            c.observe("m", s * 1000, e, KW3_6);
            // The supervisor's sync, once a second.
            if let Some(plan) = c.plan() {
                raises.push(s);
                c.mark_saved(plan);
            }
            assert!(c.admits("m", e), "reading at {s} s held back");
        }
        // 30 s of headroom, raised when less than 3 s of it are left: one
        // raise per 28 s.
        assert_eq!(raises.len(), 11, "{raises:?}");
        assert!(raises.windows(2).all(|w| w[1] - w[0] == 28), "{raises:?}");
        // A crash now adds at most the headroom.
        let added = c.saved()["m"] - e;
        assert!((0.0..=30.0).contains(&added), "{added}");
    }

    #[test]
    fn no_power_no_writes() {
        let mut saved = Values::new();
        saved.insert("m".into(), 50.0);
        let mut c = Ceilings::new(saved, secs(30), secs(3));
        for s in 0..100 {
            c.observe("m", s * 1000, 50.0, Some(0.0));
            assert!(c.plan().is_none(), "at {s} s");
            assert!(c.admits("m", 50.0));
        }
    }

    #[test]
    fn a_load_switching_on_is_seen_at_once_and_its_rate_decays() {
        let mut c = Ceilings::new(Values::new(), secs(30), secs(3));
        // 360 W (0.1 Wh/s) for a minute.
        for s in 0..60 {
            c.observe("m", s * 1000, s as f64 * 0.1, Some(360.0));
            if let Some(p) = c.plan() {
                c.mark_saved(p);
            }
        }
        let quiet = c.saved()["m"];
        assert!(quiet - 5.9 <= 3.0 + 1e-9, "{quiet}");
        // A 3.6 kW kettle: its first reading already carries the power;
        // the next sync plans for 1 Wh/s.
        c.observe("m", 60_000, 6.0, KW3_6);
        let p = c.plan().expect("the rate jumped");
        assert!(p["m"] >= 6.0 + 30.0 - 1e-9, "{}", p["m"]);
        c.mark_saved(p);
        // Off again: the peak-held rate halves every 30 s.
        let mut e = 6.0;
        for s in 61..=120 {
            e += 0.1;
            c.observe("m", s * 1000, e, Some(360.0));
        }
        let t = c.seen["m"];
        assert!((0.2..0.3).contains(&t.rate), "{}", t.rate);
    }

    #[test]
    fn meters_are_raised_together() {
        let mut c = Ceilings::new(Values::new(), secs(30), secs(3));
        for s in 0..40 {
            c.observe("a", s * 1000, s as f64, KW3_6);
            // Half the rate, and a second later.
            if s > 0 {
                c.observe("b", s * 1000, s as f64 / 2.0, Some(1800.0));
            }
            if let Some(p) = c.plan() {
                c.mark_saved(p);
            }
        }
        let mut both = 0;
        for s in 40..400 {
            c.observe("a", s * 1000, s as f64, KW3_6);
            c.observe("b", s * 1000, s as f64 / 2.0, Some(1800.0));
            if let Some(p) = c.plan() {
                let raised: Vec<_> = p
                    .iter()
                    .filter(|(m, v)| c.saved().get(*m) != Some(v))
                    .collect();
                if raised.len() == 2 {
                    both += 1;
                }
                c.mark_saved(p);
            }
            assert!(c.admits("a", s as f64) && c.admits("b", s as f64 / 2.0));
        }
        assert!(both >= 10, "{both}");
    }

    #[test]
    fn the_stop_saves_exact_values_and_keeps_unseen_meters() {
        let mut saved = Values::new();
        saved.insert("gone".into(), 7.0);
        saved.insert("m".into(), 10.0);
        let mut c = Ceilings::new(saved, secs(30), secs(3));
        let last = stream(&mut c, 0, 10.0, 20);
        let plan = c.plan().unwrap();
        c.mark_saved(plan);
        assert!(c.saved()["m"] > last);
        let stop = c.at_stop();
        assert_eq!(stop["m"], last);
        assert_eq!(stop["gone"], 7.0);
    }

    #[test]
    fn a_meter_with_its_own_counter_needs_no_ceiling() {
        let mut c = Ceilings::new(Values::new(), secs(30), secs(3));
        c.exempt("sdm");
        c.observe("sdm", 0, 5000.0, KW3_6);
        assert!(c.admits("sdm", 5000.0));
        assert!(c.plan().is_none());
        assert!(!c.at_stop().contains_key("sdm"));
    }

    #[test]
    fn garbage_values_are_ignored() {
        let mut c = Ceilings::new(Values::new(), secs(30), secs(3));
        c.observe("m", 0, f64::NAN, KW3_6);
        c.observe("m", 0, -1.0, KW3_6);
        assert!(c.plan().is_none());
        c.observe("m", 0, 1.0, Some(f64::INFINITY));
        assert_eq!(c.plan().unwrap()["m"], 1.0);
    }
}
