//! The outbox: every reading until the hub's ack covers it.
//!
//! Two layers, as in rumqttc's `state.rs`/`eventloop.rs` split:
//! - [`OutboxState`] ([`state`]) is pure bookkeeping over record numbers:
//!   what is done, what is in flight, what to send next.
//! - [`Outbox`] pairs it with the on-disk [`Spool`] that holds the readings'
//!   JSON; [`SharedOutbox`] is the handle the sampler (append), the link
//!   (send/ack) and the supervisor (sync) share. Nothing in it touches the
//!   network, so the sampler never waits for the hub.
//!
//! Sending order on a connection: readings sampled while connected ("live")
//! go first, so dashboards stay current; the backlog (everything not done,
//! oldest first) fills the rest of the in-flight window. Since live readings
//! arrive at the sample rate and the window is much larger, the backlog
//! drains at link speed and neither starves the other.
//!
//! When a reading may leave: at once, unless its `energy_wh` is above the
//! saved [energy ceiling](crate::ceiling) of its meter; then it waits for
//! the raise it asks for (the supervisor saves the ceiling file alone,
//! [`Outbox::begin_ceiling_sync`], unless a spool sync is due anyway) and
//! leaves once the raise is durable. What the hub acknowledges before its
//! sync is due is never written to the card, and leaves the spool's
//! memory at the ack (see [`crate::spool`]); a ceiling raise writes no
//! reading. The
//! sampler and the supervisor learn from [`Outbox::take_wake_link`] and
//! [`Outbox::take_sync_wanted`] whom to wake (see [`SharedOutbox`]).
//!
//! Acks are cumulative per connection: `ack(E, S)` covers `(E, S)` and every
//! reading of epoch `E` sent before it on this connection (the hub handles a
//! connection's frames in order). They are matched by position in the send
//! order, not by seq, because the backlog and live readings interleave (see
//! `docs/decisions/edge-ack-by-send-position.md`). On disconnect every
//! in-flight reading becomes unsent again and is resent after the reconnect
//! (the hub dedups).
//!
//! This file holds the [`Outbox`] with its appends and counters; sending
//! is in `send`, acks in `ack`, the `status` frame in `status`, syncs and
//! stops in `sync`, the shared handle in `shared`.

mod ack;
pub mod due;
mod send;
mod shared;
pub mod state;
mod status;
mod sync;

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ems_shared::Reading;

use crate::ceiling::file::Found;
use crate::ceiling::{CeilingFile, Ceilings, DEFAULT_HEADROOM};
use crate::spool::{Dropped, Spool};
use crate::state_dir::DirLock;

pub use shared::{SharedOutbox, SyncBell};
pub use state::{AckOutcome, DropCause, Flight, OutboxState};
pub use sync::{sync_files, SyncDone, SyncError, SyncJob};

/// A spool read that failed with an I/O error is tried again after this
/// long (the backlog waits; live readings do not).
const READ_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Repeated warnings (drops, damaged records, read errors) are logged at
/// most this often, with the count since.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// Default lead of the energy ceiling: raised when less than this much
/// time at the recent rate is left (two default sync intervals and a
/// margin).
const DEFAULT_LEAD: Duration = Duration::from_secs(3);
/// Sync interval and sampler tick until [`Outbox::set_sync_timing`] (the
/// configuration's defaults).
const DEFAULT_SYNC_EVERY: Duration = Duration::from_secs(1);

/// A reading ready to go on the wire.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Spool record number.
    pub rec: u64,
    /// The wire JSON.
    pub json: Arc<str>,
}

/// Counters for logs, the systemd status line and the `status` frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Readings not yet acknowledged.
    pub depth: u64,
    /// Readings in flight.
    pub in_flight: usize,
    /// Readings dropped because the spool reached `spool_max_bytes`, since
    /// start.
    pub dropped_full: u64,
    /// Readings dropped because the spool could not be written and its
    /// memory queue was full, since start.
    pub dropped_disk_full: u64,
    /// Readings skipped because their spool record was damaged, missing or
    /// unreadable, since start.
    pub dropped_damaged: u64,
    /// Readings rejected by the hub, since start.
    pub rejected: u64,
    /// Readings held in memory because the spool cannot be written (0
    /// while it can).
    pub unwritten: u64,
    /// Bytes in the spool (files and memory queue).
    pub spool_bytes: u64,
}

/// A warning that may repeat, logged at most every [`WARN_EVERY`] with
/// the count of occurrences since the last line.
#[derive(Debug, Default)]
struct Throttle {
    /// When it was last logged.
    last: Option<Instant>,
    /// Occurrences not logged since.
    suppressed: u64,
}

impl Throttle {
    /// Whether to log now; if so, also the occurrences suppressed before.
    fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < WARN_EVERY)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Outbox = [`OutboxState`] + [`Spool`] + [`Ceilings`]. Shared behind a
/// mutex; no method blocks on the network, and the slow part of a sync
/// (fsync) happens outside the lock (see [`Outbox::begin_sync`]).
#[derive(Debug)]
pub struct Outbox {
    /// What is done and what to send.
    state: OutboxState,
    /// The readings' bytes.
    spool: Spool,
    /// Counters.
    stats: OutboxStats,
    /// `(low, ts_ms)` of the last lookup of the oldest reading's time.
    oldest: Option<(u64, Option<i64>)>,
    /// After a spool read error, the backlog waits until then.
    retry_backlog_at: Option<Instant>,
    /// Spool read errors (log rate limit).
    read_errors: Throttle,
    /// Damaged or missing records (log rate limit).
    damaged_log: Throttle,
    /// Readings dropped by a bound (log rate limit).
    dropped_log: Throttle,
    /// The energy ceilings (what `energy_wh` may leave).
    ceilings: Ceilings,
    /// Where they are saved.
    ceiling_file: CeilingFile,
    /// What was in that file at open.
    ceiling_found: Found,
    /// Ceiling save failures (log rate limit).
    ceiling_errors: Throttle,
    /// Ack watermark save failures (log rate limit).
    watermark_errors: Throttle,
    /// Records appended and not yet released to the link, oldest first,
    /// with their meter's energy: they wait for a ceiling raise (usually
    /// empty).
    held_back: VecDeque<(u64, Option<(String, f64)>)>,
    /// Something became sendable while connected: wake the link.
    wake_link: bool,
    /// A reading waits for a ceiling raise: sync now.
    sync_wanted: bool,
    /// Due times of the readings neither acked nor written.
    due: due::SyncDue,
    /// When a proactive ceiling raise was last asked for.
    raise_asked: Option<Instant>,
}

impl Outbox {
    /// Opens the spool in `dir` (taking its [`DirLock`]) and recovers its state.
    pub fn open(dir: &std::path::Path, max_bytes: u64, window: usize) -> io::Result<Outbox> {
        Outbox::open_locked(DirLock::acquire(dir)?, max_bytes, window)
    }

    /// Like [`Outbox::open`], with the spool directory already locked.
    /// The energy ceilings have the default headroom
    /// ([`Outbox::set_energy_headroom`] changes it).
    pub fn open_locked(lock: DirLock, max_bytes: u64, window: usize) -> io::Result<Outbox> {
        let (ceiling_file, saved, ceiling_found) = CeilingFile::open(lock.dir())?;
        let spool = Spool::open_locked(lock, max_bytes)?;
        let state = OutboxState::new(spool.acked_below(), spool.next_rec(), window);
        let mut ob = Outbox {
            state,
            spool,
            stats: OutboxStats::default(),
            oldest: None,
            retry_backlog_at: None,
            read_errors: Throttle::default(),
            damaged_log: Throttle::default(),
            dropped_log: Throttle::default(),
            ceilings: Ceilings::new(saved, DEFAULT_HEADROOM, DEFAULT_LEAD),
            ceiling_file,
            ceiling_found,
            ceiling_errors: Throttle::default(),
            watermark_errors: Throttle::default(),
            held_back: VecDeque::new(),
            wake_link: false,
            sync_wanted: false,
            due: due::SyncDue::new(DEFAULT_SYNC_EVERY, DEFAULT_SYNC_EVERY, DEFAULT_SYNC_EVERY),
            raise_asked: None,
        };
        ob.refresh_stats();
        Ok(ob)
    }

    /// Sets the energy ceilings' headroom and lead (see [`crate::ceiling`]).
    /// Call before the first append.
    pub fn set_energy_headroom(&mut self, headroom: Duration, lead: Duration) {
        self.ceilings = Ceilings::new(self.ceilings.saved().clone(), headroom, lead);
    }

    /// Sets the spool sync interval, the ack window (how long a reading
    /// may wait for its ack while every reading is on the wire) and the
    /// sampler's tick, which decide when a sync is due ([`due`]). Call
    /// before the first append.
    pub fn set_sync_timing(
        &mut self,
        sync_every: Duration,
        ack_window: Duration,
        sample_every: Duration,
    ) {
        self.due.set_intervals(sync_every, ack_window, sample_every);
    }

    /// When the oldest reading that is neither acked nor written must be on
    /// disk, as planned at `now` (`None`: nothing waits, or only a reading
    /// the sampler's next tick looks after: [`due::SyncDue::due_at`]).
    ///
    /// While the spool's last write failed, a sync is due at once (the
    /// supervisor keeps syncs an interval apart): the write is retried at
    /// the sync interval until one succeeds, whether or not a reading is
    /// due. Readings that waited in memory and were acked meanwhile are
    /// let go without a write ([`crate::spool::Spool::settle`]); with
    /// nothing left to write the retry succeeds and the episode ends, so
    /// the edge does not stay "not writable" while the hub acks every
    /// reading in time.
    pub fn sync_due_at(&mut self, now: Instant) -> Option<Instant> {
        // A reading younger than a tick may be between its append and its
        // send: it is the sampler's to look after (its next append asks
        // again), and must not take the window from the older ones.
        let end = self.due.young_from(now).unwrap_or(self.state.next_rec());
        let on_the_wire = self.on_the_wire_below(end);
        let (spool, state) = (&self.spool, &self.state);
        let due = self.due.due_at(now, on_the_wire, |rec| {
            rec < spool.written_end() || state.is_done(rec)
        });
        if self.spool.write_failing() {
            return Some(now);
        }
        due
    }

    /// The number the next appended record gets.
    pub fn next_rec(&self) -> u64 {
        self.state.next_rec()
    }

    /// The supervisor sleeps until `wake` (`None`: it is awake).
    pub fn plan_wake(&mut self, wake: Option<Instant>) {
        self.due.plan(wake);
    }

    /// Acks moved past readings on disk: segments to delete or the
    /// watermark to save (a sync does both).
    pub fn housekeeping_due(&self) -> bool {
        self.spool.housekeeping_due(self.state.low())
    }

    /// After appending the records from `first_new` on: must the sleeping
    /// supervisor plan again ([`due::SyncDue::must_wake`])?
    pub fn take_plan_again(&mut self, first_new: u64) -> bool {
        // The readings just appended go on the wire right after this (the
        // sampler sends them, or wakes the link): counting them as waiting
        // would wake the supervisor at every append while the hub holds
        // acks, only to find them sent.
        let on_the_wire = self.on_the_wire_below(first_new);
        let (spool, state) = (&self.spool, &self.state);
        self.due.must_wake(first_new, on_the_wire, |rec| {
            rec < spool.written_end() || state.is_done(rec)
        })
    }

    /// Whether every reading below `end` not yet acked is in flight on a
    /// live connection, none held back for a ceiling raise: then the
    /// oldest may wait the ack window before it is written ([`due`]).
    fn on_the_wire_below(&mut self, end: u64) -> bool {
        let held = self.held_back.front().is_some_and(|(rec, _)| *rec < end);
        !held && self.state.all_on_the_wire_below(end)
    }

    /// What the ceiling file held at open (for the start's log lines).
    pub fn ceiling_found(&self) -> Found {
        self.ceiling_found
    }

    /// Readings of `meter` need no ceiling: its counter is the meter's own.
    pub fn exempt_from_ceiling(&mut self, meter: &str) {
        self.ceilings.exempt(meter);
    }

    /// The energy ceilings (tests, logs).
    pub fn ceilings(&self) -> &Ceilings {
        &self.ceilings
    }

    /// Appends one reading. Never fails and never waits on the card beyond
    /// a buffered `write` (when the memory queue overflows); a reading that
    /// cannot be written stays in memory. It may be sent at once unless its
    /// energy is above its meter's saved ceiling (then it waits for the
    /// next sync: [`Outbox::take_sync_wanted`]). Returns the readings the
    /// bounds dropped to make room (counted and logged).
    pub fn append(&mut self, reading: &Reading) -> u64 {
        let json = reading.to_json();
        let (rec, drops) = self.spool.append(&json);
        self.state.appended(rec);
        self.due.appended(rec, Instant::now());
        let energy = reading
            .energy_wh
            .filter(|e| e.is_finite() && *e >= 0.0)
            .filter(|_| !self.ceilings.is_exempt(&reading.meter))
            .map(|e| {
                self.ceilings
                    .observe(&reading.meter, reading.ts_ms, e, reading.power_w);
                (reading.meter.clone(), e)
            });
        self.held_back.push_back((rec, energy));
        let lost = drops.into_iter().map(|d| self.dropped(d)).sum();
        self.release_held_back();
        self.ask_for_raise();
        self.refresh_stats();
        lost
    }

    /// Releases to the link the held-back readings (in order) that the
    /// saved ceilings admit.
    fn release_held_back(&mut self) {
        while let Some((rec, energy)) = self.held_back.front() {
            let rec = *rec;
            if !self.state.is_done(rec) {
                if let Some((meter, e)) = energy {
                    if !self.ceilings.admits(meter, *e) {
                        self.sync_wanted = true;
                        return;
                    }
                }
                self.state.sendable_below(rec + 1);
                self.wake_link |= self.state.is_connected();
            }
            self.held_back.pop_front();
        }
    }

    /// Asks for a sync when a ceiling needs raising before a reading gets
    /// near it (the raise is planned `lead` ahead), at most once per sync
    /// interval: the supervisor no longer syncs on a fixed tick.
    fn ask_for_raise(&mut self) {
        let now = Instant::now();
        let recent = self
            .raise_asked
            .is_some_and(|t| now.duration_since(t) < self.due.sync_every());
        if !recent && self.ceilings.needs_raise() {
            self.raise_asked = Some(now);
            self.sync_wanted = true;
        }
    }

    /// Releases every held-back reading, admitted or not (the ceilings
    /// cannot be saved: better sent than held).
    fn release_all(&mut self) {
        if self.held_back.pop_back().is_some() {
            self.held_back.clear();
            self.state.sendable_below(self.state.next_rec());
            self.wake_link |= self.state.is_connected();
        }
    }

    /// Whether something became sendable while connected since the last
    /// call (the caller sends it itself or wakes the link).
    pub fn take_wake_link(&mut self) -> bool {
        std::mem::take(&mut self.wake_link)
    }

    /// Whether a reading waits for a ceiling raise since the last call
    /// (the caller asks the supervisor for a sync now).
    pub fn take_sync_wanted(&mut self) -> bool {
        std::mem::take(&mut self.sync_wanted)
    }

    /// Counts and logs the readings a spool bound dropped.
    fn dropped(&mut self, d: Dropped) -> u64 {
        let lost = self.state.dropped_below(d.below, d.cause);
        self.count_lost(d.cause, lost);
        lost
    }

    fn count_lost(&mut self, cause: DropCause, lost: u64) {
        if lost == 0 {
            return;
        }
        match cause {
            DropCause::Bound => self.stats.dropped_full += lost,
            DropCause::DiskFull => self.stats.dropped_disk_full += lost,
        }
        if let Some(more) = self.dropped_log.due() {
            let more = if more > 0 {
                format!("; {more} more drops since the last message")
            } else {
                String::new()
            };
            match cause {
                DropCause::Bound => log::warn!(
                    "spool full ({} bytes): dropped the {lost} oldest unsent readings ({} dropped since start{more})",
                    self.spool.max_bytes(),
                    self.stats.dropped_full
                ),
                DropCause::DiskFull => log::warn!(
                    "spool cannot be written and its memory queue is full ({} bytes): dropped the {lost} oldest unsent readings ({} dropped since start{more})",
                    self.spool.unwritten_max(),
                    self.stats.dropped_disk_full
                ),
            }
        }
    }

    /// Counters.
    pub fn stats(&self) -> OutboxStats {
        self.stats
    }

    /// Bound of the memory queue while the spool cannot be written.
    pub fn unwritten_max(&self) -> u64 {
        self.spool.unwritten_max()
    }

    /// The pure state (tests, status).
    pub fn state(&self) -> &OutboxState {
        &self.state
    }

    fn refresh_stats(&mut self) {
        self.stats.depth = self.state.depth();
        self.stats.in_flight = self.state.in_flight();
        self.stats.spool_bytes = self.spool.total_bytes();
        self.stats.unwritten = if self.spool.write_failing() {
            self.spool.unwritten()
        } else {
            0
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn reading(seq: u64) -> Reading {
        Reading {
            epoch: 7,
            seq,
            ts_ms: 1_764_000_000_000 + seq as i64,
            meter: "main".into(),
            power_w: Some(seq as f64),
            ..Default::default()
        }
    }

    /// One sync (the supervisor's cadence): writes what is not acked,
    /// fsyncs, saves raised ceilings; returns what it did.
    fn try_sync(ob: &mut Outbox) -> SyncDone {
        ob.sync_now()
    }

    pub(super) fn sync(ob: &mut Outbox) {
        try_sync(ob).spool.unwrap();
    }

    /// The sync fails to write the spool.
    fn sync_fails(ob: &mut Outbox) -> bool {
        try_sync(ob).spool.is_err()
    }

    pub(super) fn drain(ob: &mut Outbox) -> Vec<u64> {
        let mut seqs = vec![];
        loop {
            let batch = ob.next_batch(1000);
            if batch.is_empty() {
                return seqs;
            }
            for o in batch {
                seqs.push(serde_json::from_str::<Reading>(&o.json).unwrap().seq);
            }
        }
    }

    #[test]
    fn outbox_reopens_with_only_unacked_readings() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), 1 << 20, 1000).unwrap();
        for seq in 0..100 {
            ob.append(&reading(seq));
        }
        ob.connected();
        // Readings without energy leave at once, written or not.
        assert_eq!(drain(&mut ob), (0..100).collect::<Vec<_>>());
        sync(&mut ob);
        assert_eq!(ob.ack(7, 49).done, 50);
        assert_eq!(ob.rejected(7, 60).done, 1);
        sync(&mut ob);
        ob.persist_watermark().unwrap();
        drop(ob);
        let mut ob = Outbox::open(dir.path(), 1 << 20, 1000).unwrap();
        // The rejection was not persisted (only the contiguous watermark
        // is): resending it is harmless, the hub refuses it again.
        assert_eq!(ob.stats().depth, 50);
        ob.connected();
        assert_eq!(drain(&mut ob), (50..100).collect::<Vec<_>>());
        assert_eq!(ob.ack(7, 99).done, 50);
        assert_eq!(ob.stats().depth, 0);
    }

    #[test]
    fn a_reading_between_its_append_and_its_send_leaves_the_older_ones_their_window() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), 1 << 20, 1000).unwrap();
        let ms = Duration::from_millis;
        // Ticks of 100 ms, sync after 200 ms, a window of 1 s.
        ob.set_sync_timing(ms(200), ms(1000), ms(100));
        ob.connected();
        let t0 = Instant::now();
        ob.append(&reading(0));
        let t1 = Instant::now();
        assert_eq!(drain(&mut ob), [0]);
        std::thread::sleep(ms(150));
        // Reading 1 is appended and not sent yet (the sampler sends it
        // next): reading 0, in flight and unacked, keeps its window.
        ob.append(&reading(1));
        let due = ob.sync_due_at(Instant::now()).expect("reading 0 is due");
        assert!(due >= t0 + ms(1000), "due {:?} after t0", due - t0);
        // Without a connection the sync interval applies.
        ob.disconnected();
        let due = ob.sync_due_at(Instant::now()).expect("reading 0 is due");
        assert!(due <= t1 + ms(200), "due {:?} after t1", due - t1);
    }

    #[test]
    fn a_streaming_edge_is_not_woken_at_each_append_while_the_hub_holds_acks() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), 1 << 20, 1000).unwrap();
        let s = Duration::from_secs(1);
        ob.set_sync_timing(s, 4 * s, s);
        ob.connected();
        ob.append(&reading(0));
        assert_eq!(drain(&mut ob), [0]);
        // A second later reading 0 is still unacked (the hub holds it): the
        // supervisor plans for its window and sleeps.
        let due = ob.sync_due_at(Instant::now() + s);
        assert!(due.is_some());
        ob.plan_wake(due);
        // The sampler's next reading is not on the wire yet, but goes right
        // after the append: reading 0 keeps its window, nobody is woken.
        let first_new = ob.next_rec();
        ob.append(&reading(1));
        assert!(!ob.take_plan_again(first_new));
        assert_eq!(drain(&mut ob), [1]);
        // The connection drops: reading 0 is due at the sync interval.
        ob.disconnected();
        let first_new = ob.next_rec();
        ob.append(&reading(2));
        assert!(ob.take_plan_again(first_new));
    }

    /// A reading of a meter with an energy counter at 3.6 kW (1 Wh/s).
    fn metered(seq: u64, energy_wh: f64) -> Reading {
        Reading {
            energy_wh: Some(energy_wh),
            power_w: Some(3600.0),
            ts_ms: 1_764_000_000_000 + seq as i64 * 1000,
            ..reading(seq)
        }
    }

    #[test]
    fn readings_leave_at_once_unless_above_their_saved_ceiling() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), 1 << 20, 1000).unwrap();
        ob.connected();
        // The first reading of a meter: no ceiling saved yet, it waits,
        // and a sync is wanted now.
        ob.append(&metered(0, 100.0));
        assert!(drain(&mut ob).is_empty());
        assert!(ob.take_sync_wanted());
        assert!(!ob.take_wake_link());
        sync(&mut ob);
        assert!(ob.take_wake_link());
        assert_eq!(drain(&mut ob), [0]);
        assert_eq!(ob.ceilings().saved()["main"], 130.0);
        // Within the headroom (30 s at 1 Wh/s): at once, no sync wanted.
        for seq in 1..10 {
            ob.append(&metered(seq, 100.0 + seq as f64));
            assert!(ob.take_wake_link());
        }
        assert!(!ob.take_sync_wanted());
        assert_eq!(drain(&mut ob), (1..10).collect::<Vec<_>>());
        assert_eq!(ob.ack(7, 9).done, 10);
        // Everything acked, no raise due yet: the sync costs nothing.
        assert_eq!(try_sync(&mut ob).syncs, 0);
        // A jump past the ceiling waits for the next sync.
        ob.append(&metered(10, 200.0));
        assert!(drain(&mut ob).is_empty());
        assert!(ob.take_sync_wanted());
        sync(&mut ob);
        assert_eq!(drain(&mut ob), [10]);
        let ceiling = ob.ceilings().saved()["main"];
        assert!(ceiling >= 200.0, "{ceiling}");
        // A crash: the counter continues from at least the ceiling, which
        // is at least every value that left.
        drop(ob);
        let mut ob = Outbox::open(dir.path(), 1 << 20, 1000).unwrap();
        assert_eq!(ob.energy_floor().get("main"), Some(ceiling));
        // An orderly stop saves the exact last value instead. (Record 10,
        // written and sent but not acked before the crash, is sent again;
        // record 0, written before its ack, is not: the syncs after that
        // ack saved the watermark.)
        ob.connected();
        ob.append(&metered(11, 210.0));
        assert_eq!(drain(&mut ob), [11, 10]);
        assert_eq!(ob.ack(7, 10).done, 2);
        sync(&mut ob);
        let w = ob.begin_stop().unwrap();
        w.run().unwrap();
        ob.end_stop(&w);
        drop(ob);
        let mut ob = Outbox::open(dir.path(), 1 << 20, 1000).unwrap();
        assert_eq!(ob.energy_floor().get("main"), Some(210.0));
    }

    #[test]
    fn a_streaming_edge_writes_nothing_to_the_card() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), 1 << 20, 1000).unwrap();
        ob.connected();
        // The first reading waits for the first ceiling, so it is written.
        ob.append(&metered(0, 1000.0));
        sync(&mut ob);
        assert_eq!(drain(&mut ob), [0]);
        ob.ack(7, 0);
        let seg = segments(dir.path());
        let size = std::fs::metadata(&seg[0]).unwrap().len();
        let mut syncs = 0;
        for seq in 1..600 {
            ob.append(&metered(seq, 1000.0 + seq as f64));
            drain(&mut ob);
            ob.ack(7, seq);
            // One sync per reading: only ceiling raises cost a write.
            syncs += try_sync(&mut ob).syncs;
            ob.persist_watermark().unwrap();
        }
        assert_eq!(segments(dir.path()), seg);
        assert_eq!(std::fs::metadata(&seg[0]).unwrap().len(), size);
        // One raise per 28 s of the 30 s headroom (raised when less than
        // 3 s are left), 600 syncs: 21 fdatasyncs.
        assert_eq!(syncs, 599 / 28, "{syncs}");
        assert_eq!(ob.stats().depth, 0);
        // A reading in flight at the sync is written; acked later, it is
        // sent again after a crash only if the watermark was not saved.
        ob.append(&metered(600, 1600.0));
        drain(&mut ob);
        sync(&mut ob);
        assert_eq!(segments(dir.path()).len(), 1);
        ob.ack(7, 600);
        ob.persist_watermark().unwrap();
        drop(ob);
        let ob = Outbox::open(dir.path(), 1 << 20, 1000).unwrap();
        assert_eq!(ob.stats().depth, 0);
    }

    #[test]
    fn acked_readings_leave_memory_without_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), 1 << 20, 1000).unwrap();
        ob.connected();
        // Readings without energy: no ceiling, so no sync is ever asked
        // for, and none is due while the hub acks in time.
        for seq in 0..20_000 {
            ob.append(&reading(seq));
            drain(&mut ob);
            ob.ack(7, seq);
        }
        let st = ob.stats();
        assert_eq!((st.depth, st.unwritten, st.spool_bytes), (0, 0, 0));
        assert_eq!(ob.sync_due_at(Instant::now()), None);
        assert!(segments(dir.path()).is_empty());
    }

    #[test]
    fn a_failed_write_is_retried_until_nothing_waits_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), 256 * 1024, 10_000).unwrap();
        for seq in 0..10 {
            ob.append(&reading(seq));
        }
        sync(&mut ob);
        drop(ob);
        let mut ob = Outbox::open(dir.path(), 256 * 1024, 10_000).unwrap();
        // The card is full: the new process's segment files are /dev/full.
        for base in 10..30 {
            let p = dir.path().join(format!("{base:020}.seg"));
            std::os::unix::fs::symlink("/dev/full", &p).unwrap();
        }
        for seq in 10..15 {
            ob.append(&reading(seq));
        }
        assert!(sync_fails(&mut ob));
        assert_eq!(ob.stats().unwritten, 5);
        // The retry is due at once (the supervisor keeps it an interval
        // after the last sync), due reading or not.
        assert!(ob.sync_due_at(Instant::now()).is_some());
        // The hub comes back and acks everything: what waited in memory
        // is let go without a write, and no reading is due any more.
        ob.connected();
        assert_eq!(drain(&mut ob), (0..15).collect::<Vec<_>>());
        assert_eq!(ob.ack(7, 14).done, 15);
        assert_eq!(ob.stats().unwritten, 0);
        // The failure is not forgotten: the retry still comes, finds
        // nothing to write (the card is still full), and ends the episode.
        assert!(ob.sync_due_at(Instant::now()).is_some());
        let done = try_sync(&mut ob);
        assert!(done.spool.is_ok() && !done.wrote, "{done:?}");
        assert_eq!(ob.sync_due_at(Instant::now()), None);
        assert_eq!(ob.stats().depth, 0);
        // The next reading that needs writing tries the card again.
        ob.disconnected();
        ob.append(&reading(15));
        assert!(sync_fails(&mut ob));
        assert!(ob.sync_due_at(Instant::now()).is_some());
        for base in 10..30 {
            let _ = std::fs::remove_file(dir.path().join(format!("{base:020}.seg")));
        }
        let done = try_sync(&mut ob);
        assert!(done.spool.is_ok() && done.wrote, "{done:?}");
        assert_eq!(ob.stats().unwritten, 0);
        assert_eq!(ob.sync_due_at(Instant::now()), None);
    }

    #[test]
    fn a_ceiling_raise_alone_writes_no_reading() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), 1 << 20, 1000).unwrap();
        ob.connected();
        let (mut raises, mut syncs) = (0, 0);
        for seq in 0..600 {
            ob.append(&metered(seq, 1000.0 + seq as f64));
            // The supervisor is rung and no reading is due: the ceilings
            // alone, while the reading that asked is still in flight (or
            // waits for the raise, as the very first one does).
            if ob.take_sync_wanted() {
                raises += 1;
                let done = ob.sync_ceilings_now();
                assert!(done.spool.is_ok());
                syncs += done.syncs;
            }
            drain(&mut ob);
            ob.ack(7, seq);
        }
        // One page and one fdatasync per raise: the first ceiling, then
        // one per 28 s of the 30 s headroom (raised when less than 3 s are
        // left), or per 31 s when the proactive ask comes within a sync
        // interval (of wall time: this loop is fast) of the last one and a
        // reading above the ceiling asks instead.
        assert!((1 + 599 / 31..=1 + 599 / 28).contains(&raises), "{raises}");
        assert_eq!(syncs, raises);
        assert!(segments(dir.path()).is_empty());
        assert_eq!(ob.stats().depth, 0);
        // A reading above the saved ceiling leaves only after the raise is
        // durable.
        ob.append(&metered(600, 5000.0));
        assert!(drain(&mut ob).is_empty());
        assert!(ob.take_sync_wanted());
        ob.sync_ceilings_now();
        assert_eq!(drain(&mut ob), [600]);
        assert!(segments(dir.path()).is_empty());
        // Not acked and not written: still due for its own spool sync.
        assert!(ob
            .sync_due_at(Instant::now() + Duration::from_secs(5))
            .is_some());
        // A crash now: the counter continues from at least what left.
        drop(ob);
        let mut ob = Outbox::open(dir.path(), 1 << 20, 1000).unwrap();
        let floor = ob.energy_floor().get("main").unwrap();
        assert!(floor >= 5000.0, "{floor}");
    }

    #[test]
    fn a_full_spool_drops_the_oldest_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), 64 * 1024, 100).unwrap();
        let mut lost = 0;
        for seq in 0..3000 {
            lost += ob.append(&reading(seq));
            if seq % 50 == 0 {
                sync(&mut ob);
            }
        }
        let st = ob.stats();
        assert!(lost > 1000, "{lost}");
        assert_eq!(st.dropped_full, lost);
        assert_eq!(st.depth + lost, 3000);
        assert!(st.spool_bytes <= 64 * 1024);
        ob.connected();
        let seqs = drain(&mut ob);
        // What is left is the newest readings, in order, none missing.
        assert_eq!(seqs.len() as u64, st.depth.min(100));
        assert_eq!(seqs[0], lost);
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    }

    #[test]
    fn a_damaged_record_is_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), 1 << 20, 1000).unwrap();
        for seq in 0..5 {
            ob.append(&reading(seq));
        }
        sync(&mut ob);
        drop(ob);
        // Zero the middle record in place (a damaged block).
        let seg = dir.path().join(format!("{:020}.seg", 0));
        let text = std::fs::read_to_string(&seg).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let zeros = "\0".repeat(lines[2].len());
        let damaged = [lines[0], lines[1], zeros.as_str(), lines[3], lines[4]].join("\n") + "\n";
        std::fs::write(&seg, damaged).unwrap();
        let mut ob = Outbox::open(dir.path(), 1 << 20, 1000).unwrap();
        ob.connected();
        assert_eq!(drain(&mut ob), [0, 1, 3, 4]);
        assert_eq!(ob.stats().dropped_damaged, 1);
        ob.ack(7, 4);
        assert_eq!(ob.stats().depth, 0);
    }

    #[test]
    fn acked_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let count = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(".seg")
                })
                .count()
        };
        let mut ob = Outbox::open(dir.path(), 64 * 1024, 10_000).unwrap();
        for seq in 0..500 {
            ob.append(&reading(seq));
        }
        sync(&mut ob);
        assert!(count() > 2, "{}", count());
        ob.connected();
        drain(&mut ob);
        ob.ack(7, 499);
        sync(&mut ob);
        // Every acked segment is deleted but the one appended to.
        assert_eq!(segments(dir.path()).len(), 1);
        assert_eq!(count(), 1);
    }

    /// Segment files of `dir`, oldest first.
    fn segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        v.sort();
        v
    }

    /// `n` readings in a spool of 8 KiB segments, written and synced;
    /// returns the outbox (connected, nothing sent yet).
    fn spooled(dir: &std::path::Path, n: u64) -> Outbox {
        let mut ob = Outbox::open(dir, 64 * 1024, 10_000).unwrap();
        for seq in 0..n {
            ob.append(&reading(seq));
        }
        sync(&mut ob);
        ob
    }

    /// Sends until every reading not done is in flight (a backlog read may
    /// be retried after a pause); never acks.
    fn drain_patiently(ob: &mut Outbox) -> Vec<u64> {
        let mut seqs = vec![];
        let deadline = Instant::now() + Duration::from_secs(60);
        while ob.stats().depth > ob.stats().in_flight as u64 {
            assert!(Instant::now() < deadline, "the backlog is stuck");
            let batch = ob.next_batch(1000);
            if batch.is_empty() {
                std::thread::sleep(Duration::from_millis(20));
            }
            for o in batch {
                seqs.push(serde_json::from_str::<Reading>(&o.json).unwrap().seq);
            }
        }
        seqs
    }

    #[test]
    fn a_corrupted_watermark_never_marks_unsent_readings_acked() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = spooled(dir.path(), 100);
        ob.connected();
        drain(&mut ob);
        assert_eq!(ob.ack(7, 49).done, 50);
        sync(&mut ob);
        ob.persist_watermark().unwrap();
        drop(ob);
        // One digit of the saved watermark changes on the card: 50 → 90.
        let path = dir.path().join("acked");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("50"), "{text:?}");
        std::fs::write(&path, text.replacen("50", "90", 1)).unwrap();
        let mut ob = Outbox::open(dir.path(), 64 * 1024, 10_000).unwrap();
        ob.connected();
        let sent = drain(&mut ob);
        // Resending acked readings is harmless; skipping unsent ones is not.
        for seq in 50..100 {
            assert!(sent.contains(&seq), "unsent reading {seq} treated as acked");
        }
    }

    #[test]
    fn a_missing_middle_segment_never_marks_later_readings_acked() {
        let dir = tempfile::tempdir().unwrap();
        let ob = spooled(dir.path(), 400);
        drop(ob);
        let segs = segments(dir.path());
        assert!(segs.len() >= 3, "{segs:?}");
        let lost = std::fs::read_to_string(&segs[1]).unwrap().lines().count() as u64;
        std::fs::remove_file(&segs[1]).unwrap();
        let mut ob = Outbox::open(dir.path(), 64 * 1024, 10_000).unwrap();
        ob.connected();
        let sent = drain(&mut ob);
        assert_eq!(sent.len() as u64 + lost, 400);
        assert_eq!(sent[sent.len() - 1], 399);
        assert_eq!(ob.stats().dropped_damaged, lost);
        assert_eq!(ob.stats().depth, 400 - lost);
    }

    #[test]
    fn a_missing_first_segment_is_counted_not_silently_acked() {
        let dir = tempfile::tempdir().unwrap();
        let ob = spooled(dir.path(), 400);
        drop(ob);
        let segs = segments(dir.path());
        let lost = std::fs::read_to_string(&segs[0]).unwrap().lines().count() as u64;
        std::fs::remove_file(&segs[0]).unwrap();
        let mut ob = Outbox::open(dir.path(), 64 * 1024, 10_000).unwrap();
        ob.connected();
        let sent = drain(&mut ob);
        assert_eq!(sent.len() as u64 + lost, 400);
        // Nothing was acked: the readings of the lost file are lost, and
        // counted as such.
        assert_eq!(ob.stats().dropped_damaged, lost);
    }

    #[test]
    fn a_record_with_a_changed_value_is_never_sent() {
        let dir = tempfile::tempdir().unwrap();
        let ob = spooled(dir.path(), 5);
        drop(ob);
        let seg = &segments(dir.path())[0];
        let text = std::fs::read_to_string(seg).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // A flipped bit in a digit: still valid JSON, a different power.
        assert!(lines[2].contains("\"power_w\":2.0"), "{}", lines[2]);
        let changed = lines[2].replace("\"power_w\":2.0", "\"power_w\":3.0");
        let damaged = [lines[0], lines[1], &changed, lines[3], lines[4]].join("\n") + "\n";
        std::fs::write(seg, damaged).unwrap();
        let mut ob = Outbox::open(dir.path(), 64 * 1024, 10_000).unwrap();
        ob.connected();
        let mut sent = vec![];
        loop {
            let batch = ob.next_batch(1000);
            if batch.is_empty() {
                break;
            }
            for o in batch {
                let r: Reading = serde_json::from_str(&o.json).unwrap();
                assert_eq!(r.power_w, Some(r.seq as f64), "sent with a wrong value");
                sent.push(r.seq);
            }
        }
        assert_eq!(sent, [0, 1, 3, 4]);
        assert_eq!(ob.stats().dropped_damaged, 1);
    }

    #[test]
    fn a_record_that_keeps_failing_to_read_is_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let ob = spooled(dir.path(), 400);
        drop(ob);
        // (An unreadable file found at open is moved aside and counted the
        // same way: spool::tests::unreadable_and_empty_segment_files_are_handled_at_open.)
        let segs = segments(dir.path());
        let lost = std::fs::read_to_string(&segs[1]).unwrap().lines().count() as u64;
        let mut ob = Outbox::open(dir.path(), 64 * 1024, 10_000).unwrap();
        // While the edge runs, every read of that file starts failing
        // (EISDIR): an unreadable card area.
        std::fs::remove_file(&segs[1]).unwrap();
        std::fs::create_dir(&segs[1]).unwrap();
        ob.connected();
        let started = Instant::now();
        let sent = drain_patiently(&mut ob);
        // Tried a few times, spaced out, before it was given up.
        assert!(
            started.elapsed() >= READ_RETRY_AFTER,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            sent.len() as u64 + lost,
            400,
            "the backlog behind it is sent"
        );
        assert_eq!(ob.stats().dropped_damaged, lost);
    }

    #[test]
    fn an_old_spool_without_checksums_is_still_read() {
        let dir = tempfile::tempdir().unwrap();
        // Format 1: one line of wire JSON per reading, nothing else.
        let lines: String = (0..3).map(|s| reading(s).to_json() + "\n").collect();
        std::fs::write(dir.path().join(format!("{:020}.seg", 0)), lines).unwrap();
        std::fs::write(dir.path().join("acked"), "1\n").unwrap();
        let mut ob = Outbox::open(dir.path(), 64 * 1024, 10_000).unwrap();
        assert_eq!(ob.stats().depth, 2);
        ob.connected();
        assert_eq!(drain(&mut ob), [1, 2]);
        for seq in 3..5 {
            ob.append(&reading(seq));
        }
        sync(&mut ob);
        drop(ob);
        let mut ob = Outbox::open(dir.path(), 64 * 1024, 10_000).unwrap();
        ob.connected();
        assert_eq!(drain(&mut ob), [1, 2, 3, 4]);
    }

    #[test]
    fn a_full_disk_loses_nothing_within_the_memory_bound_and_counts_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        // 256 KiB bound: a 64 KiB memory queue (~500 of these readings).
        let mut ob = Outbox::open(dir.path(), 256 * 1024, 10_000).unwrap();
        for seq in 0..100 {
            ob.append(&reading(seq));
        }
        sync(&mut ob);
        drop(ob);
        let mut ob = Outbox::open(dir.path(), 256 * 1024, 10_000).unwrap();
        // The card is full: every new segment file is /dev/full.
        let full: Vec<_> = (100..2100)
            .map(|base| {
                let p = dir.path().join(format!("{base:020}.seg"));
                std::os::unix::fs::symlink("/dev/full", &p).unwrap();
                p
            })
            .collect();
        for seq in 100..200 {
            assert_eq!(ob.append(&reading(seq)), 0);
        }
        assert!(sync_fails(&mut ob));
        assert_eq!(ob.stats().unwritten, 100);
        assert_eq!(ob.status().unwritten, 100);
        // The hub is there: everything is sent (from the card and from
        // memory), acked, and the acked segments deleted though nothing can
        // be written.
        ob.connected();
        assert_eq!(drain(&mut ob), (0..200).collect::<Vec<_>>());
        assert_eq!(ob.ack(7, 199).done, 200);
        // Nothing left to write (all acked): the sync succeeds, and the
        // acked segments were deleted though nothing can be written.
        sync(&mut ob);
        assert_eq!(ob.stats().unwritten, 0);
        // The hub goes away; readings pile up past the memory bound.
        ob.disconnected();
        let mut lost = 0;
        for seq in 200..2000 {
            lost += ob.append(&reading(seq));
            if seq % 10 == 0 {
                assert!(sync_fails(&mut ob));
            }
        }
        let st = ob.stats();
        assert!(lost > 0);
        assert_eq!(st.dropped_disk_full, lost);
        assert_eq!(st.dropped_full, 0);
        assert_eq!(ob.status().dropped_disk_full, lost);
        // Every reading is acked, queued, or counted as dropped.
        assert_eq!(200 + st.depth + lost, 2000);
        assert!(st.unwritten > 0 && st.unwritten == st.depth);
        // Space frees: the queue is written, nothing more is lost.
        for p in &full {
            // (The spool deleted those of the segments it gave up.)
            let _ = std::fs::remove_file(p);
        }
        sync(&mut ob);
        assert_eq!(ob.stats().unwritten, 0);
        ob.persist_watermark().unwrap();
        drop(ob);
        let mut ob = Outbox::open(dir.path(), 256 * 1024, 10_000).unwrap();
        assert_eq!(ob.stats().depth, st.depth);
        ob.connected();
        let sent = drain(&mut ob);
        assert_eq!(sent.len() as u64, st.depth);
        assert_eq!(*sent.last().unwrap(), 1999);
        assert!(sent.windows(2).all(|w| w[1] == w[0] + 1));
    }
}
