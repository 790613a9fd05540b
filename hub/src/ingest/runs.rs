//! What the store writer holds between taking items from its queue and
//! committing them: each device's items in a *run*, in arrival order, so a
//! device's readings go into one commit together.
//!
//! Why runs: SQLite writes a whole page of each B-tree a row touches. At
//! 1 Hz, a commit of readings from many devices rewrites one leaf of the
//! unique index, one of the time index and one energy slot per reading;
//! two readings of one device in the same commit share those pages, and
//! one cumulative ack answers both.
//!
//! When a run is due depends on what its device announced:
//! - a device that announced an ack window may have its readings held
//!   for a share of it (its [`Held::hold`], at most the linger): its run
//!   is due once its first item has waited that long;
//! - any other device's run is due once it holds `run_len` items (default
//!   1: at once) or its first item has waited the linger.
//!
//! The writer gathers due runs and commits them at its own cadence (a
//! tenth of a second), or at once when a run grows [`URGENT`] (a draining
//! backlog).
//!
//! Pure bookkeeping, no I/O, over any item that names its device
//! ([`Held`]): the writer thread feeds it its queue's items and asks it
//! which runs to commit.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A run this long is a device sending faster than it is answered (an
/// edge draining its backlog): the writer commits at once rather than at
/// its commit cadence.
pub const URGENT: usize = 64;

/// An item held in a run: it belongs to one device.
pub trait Held {
    /// The device whose run the item joins.
    fn device(&self) -> &Arc<str>;
    /// How long the device lets its readings be held before they are
    /// answered, when it said so (from its announced ack window); `None`:
    /// the run length and the linger decide.
    fn hold(&self) -> Option<Duration>;
}

/// One device's items, oldest first, and when the first of them was taken.
#[derive(Debug)]
struct Run<T> {
    device: Arc<str>,
    since: Instant,
    /// Items that make the run due.
    full_at: usize,
    items: Vec<T>,
}

/// The runs the writer holds.
#[derive(Debug)]
pub struct Runs<T> {
    by_device: HashMap<Arc<str>, Run<T>>,
    /// `(due, since, device)`, earliest due first. An entry whose run was
    /// taken early (full, or a flush) no longer matches its run's `since`
    /// and is skipped.
    order: BinaryHeap<Reverse<(Instant, Instant, Arc<str>)>>,
    /// Devices whose run became full since the last pick.
    full: Vec<Arc<str>>,
    items: usize,
    /// A run reached [`URGENT`] items since [`Runs::urgent`] was asked.
    urgent: bool,
    /// Items that make a run due, for devices without a hold of their own.
    run_len: usize,
    /// Longest an item is held.
    linger: Duration,
}

/// Which runs a pick takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// The due runs (full, or waited long enough); and the earliest due
    /// others while more than `hold_max` items are held.
    Due { hold_max: usize },
    /// Every run (a flush, the shutdown).
    All,
}

impl<T: Held> Runs<T> {
    /// No runs. A run is due once it holds `run_len` items (1 to
    /// [`URGENT`]) or its first item has waited `linger`, or its device's
    /// own hold when that is shorter.
    pub fn new(run_len: usize, linger: Duration) -> Self {
        Runs {
            by_device: HashMap::new(),
            order: BinaryHeap::new(),
            full: Vec::new(),
            items: 0,
            urgent: false,
            run_len: run_len.clamp(1, URGENT),
            linger,
        }
    }

    /// Items held.
    pub fn len(&self) -> usize {
        self.items
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    /// Whether a run reached [`URGENT`] items since the last call.
    pub fn urgent(&mut self) -> bool {
        std::mem::take(&mut self.urgent)
    }

    /// Adds `item`, taken from the queue at `now`, to its device's run.
    pub fn take(&mut self, item: T, now: Instant) {
        self.items += 1;
        let device = item.device();
        if let Some(run) = self.by_device.get_mut(&**device) {
            run.items.push(item);
            if run.items.len() == run.full_at {
                self.full.push(run.device.clone());
            }
            self.urgent |= run.items.len() == URGENT;
            return;
        }
        let device = device.clone();
        // A device's own hold counts in time only: its run fills at URGENT.
        let (wait, full_at) = match item.hold() {
            Some(hold) => (hold.min(self.linger), URGENT),
            None => (self.linger, self.run_len),
        };
        // A run due at its first item is handed from `full`, never from
        // `order`: it needs no place there.
        if full_at == 1 {
            self.full.push(device.clone());
        } else {
            self.order.push(Reverse((now + wait, now, device.clone())));
        }
        let mut items = Vec::with_capacity(full_at.min(4));
        items.push(item);
        let run = Run {
            device: device.clone(),
            since: now,
            full_at,
            items,
        };
        self.by_device.insert(device, run);
    }

    /// Hands the runs that `pick` selects at `now` to `out`, each in
    /// arrival order, `max` items at most: a run longer than what is left
    /// is split, its rest stays first in line.
    pub fn pick(&mut self, pick: Pick, now: Instant, max: usize, mut out: impl FnMut(T)) {
        let mut left = max;
        let full = std::mem::take(&mut self.full);
        for device in full {
            if left > 0 && self.hand(&device, None, &mut left, &mut out) {
                continue;
            }
            // Not handed, or handed in part: still full at the next pick.
            if self.by_device.contains_key(&*device) {
                self.full.push(device);
            }
        }
        while left > 0 {
            let Some(Reverse((due_at, _, _))) = self.order.peek() else {
                break;
            };
            let due = match pick {
                Pick::All => true,
                Pick::Due { hold_max } => now >= *due_at || self.items > hold_max,
            };
            if !due {
                break;
            }
            let Some(Reverse((due_at, since, device))) = self.order.pop() else {
                break;
            };
            if !self.hand(&device, Some(since), &mut left, &mut out) {
                self.order.push(Reverse((due_at, since, device)));
            }
        }
    }

    /// Hands up to `left` items of `device`'s run to `out` (only if the
    /// run began at `since`, when given), counting them off `left`.
    /// Returns false when part of the run stays held.
    fn hand(
        &mut self,
        device: &str,
        since: Option<Instant>,
        left: &mut usize,
        out: &mut impl FnMut(T),
    ) -> bool {
        let Some(run) = self.by_device.get_mut(device) else {
            return true;
        };
        if since.is_some_and(|s| run.since != s) {
            return true;
        }
        if run.items.len() > *left {
            let n = *left;
            run.items.drain(..n).for_each(&mut *out);
            self.items -= n;
            *left = 0;
            return false;
        }
        let Some(run) = self.by_device.remove(device) else {
            return true;
        };
        let n = run.items.len();
        self.items -= n;
        *left -= n;
        run.items.into_iter().for_each(out);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device's reading by its seq, and the device's own hold.
    struct Item(Arc<str>, u64, Option<Duration>);

    impl Held for Item {
        fn device(&self) -> &Arc<str> {
            &self.0
        }
        fn hold(&self) -> Option<Duration> {
            self.2
        }
    }

    fn item(device: &str, seq: u64) -> Item {
        Item(Arc::from(device), seq, None)
    }

    fn held(device: &str, seq: u64, hold_ms: u64) -> Item {
        Item(Arc::from(device), seq, Some(Duration::from_millis(hold_ms)))
    }

    fn picked(runs: &mut Runs<Item>, pick: Pick, now: Instant, max: usize) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        runs.pick(pick, now, max, |i| out.push((i.0.to_string(), i.1)));
        out
    }

    const LINGER: Duration = Duration::from_secs(2);
    const DUE: Pick = Pick::Due { hold_max: 100 };

    #[test]
    fn a_run_is_due_when_full_or_when_its_first_item_has_waited_the_linger() {
        let t0 = Instant::now();
        let mut runs = Runs::new(2, LINGER);
        runs.take(item("a", 0), t0);
        runs.take(item("b", 0), t0 + Duration::from_millis(500));
        assert!(picked(&mut runs, DUE, t0 + Duration::from_millis(900), 100).is_empty());
        // b's second reading: b is due at once, a is not.
        runs.take(item("b", 1), t0 + Duration::from_secs(1));
        let got = picked(&mut runs, DUE, t0 + Duration::from_secs(1), 100);
        assert_eq!(got, [("b".into(), 0), ("b".into(), 1)]);
        assert_eq!(runs.len(), 1);
        // a's linger has passed; b's new run has not.
        runs.take(item("b", 2), t0 + Duration::from_millis(1500));
        let got = picked(&mut runs, DUE, t0 + LINGER, 100);
        assert_eq!(got, [("a".into(), 0)]);
        let got = picked(&mut runs, DUE, t0 + Duration::from_millis(3500), 100);
        assert_eq!(got, [("b".into(), 2)]);
        assert!(runs.is_empty());
    }

    #[test]
    fn all_takes_every_run_and_max_splits_the_last_one_in_order() {
        let t0 = Instant::now();
        let mut runs = Runs::new(2, LINGER);
        for seq in 0..5 {
            runs.take(item("a", seq), t0);
        }
        runs.take(item("b", 0), t0);
        // a is full: three of its five now, the rest first at the next pick.
        let got = picked(&mut runs, DUE, t0, 3);
        assert_eq!(got, [("a".into(), 0), ("a".into(), 1), ("a".into(), 2)]);
        let got = picked(&mut runs, DUE, t0, 3);
        assert_eq!(got, [("a".into(), 3), ("a".into(), 4)]);
        let got = picked(&mut runs, Pick::All, t0, 3);
        assert_eq!(got, [("b".into(), 0)]);
        assert!(runs.is_empty());
    }

    #[test]
    fn past_hold_max_the_oldest_runs_go_before_they_are_due() {
        let t0 = Instant::now();
        let mut runs = Runs::new(2, LINGER);
        for (i, d) in ["a", "b", "c", "d"].iter().enumerate() {
            runs.take(item(d, 0), t0 + Duration::from_millis(i as u64));
        }
        let tight = Pick::Due { hold_max: 2 };
        let got = picked(&mut runs, tight, t0, 100);
        assert_eq!(got, [("a".into(), 0), ("b".into(), 0)]);
        assert_eq!(runs.len(), 2);
    }

    #[test]
    fn a_device_with_a_hold_of_its_own_is_due_by_time_alone() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Runs of 2 for the others; "w" may be held 1.5 s, "long" asks
        // for more than the linger and gets the linger.
        let mut runs = Runs::new(2, LINGER);
        runs.take(held("w", 0, 1500), t0);
        runs.take(held("long", 0, 60_000), t0);
        runs.take(held("w", 1, 1500), t0 + ms(1000));
        runs.take(item("d", 0), t0 + ms(1000));
        // Two readings of "w" do not make its run due; "d" waits for its pair.
        assert!(picked(&mut runs, DUE, t0 + ms(1400), 100).is_empty());
        let got = picked(&mut runs, DUE, t0 + ms(1500), 100);
        assert_eq!(got, [("w".into(), 0), ("w".into(), 1)]);
        runs.take(held("w", 2, 1500), t0 + ms(2000));
        let got = picked(&mut runs, DUE, t0 + LINGER, 100);
        assert_eq!(got, [("long".into(), 0)]);
        let got = picked(&mut runs, DUE, t0 + ms(3000), 100);
        assert_eq!(got, [("d".into(), 0)]);
        let got = picked(&mut runs, DUE, t0 + ms(3500), 100);
        assert_eq!(got, [("w".into(), 2)]);
        assert!(runs.is_empty());
    }

    #[test]
    fn a_held_run_still_goes_at_once_when_it_grows_urgent_or_a_hold_is_zero() {
        let t0 = Instant::now();
        let mut runs = Runs::new(1, LINGER);
        for seq in 0..URGENT as u64 {
            runs.take(held("fast", seq, 1500), t0);
        }
        assert!(runs.urgent());
        runs.take(held("now", 0, 0), t0);
        let got = picked(&mut runs, DUE, t0, 1000);
        assert_eq!(got.len(), URGENT + 1);
        assert_eq!(got[URGENT], ("now".into(), 0));
        assert!(runs.is_empty());
    }
}
