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
//! Acks are cumulative per connection: `ack(E, S)` covers `(E, S)` and every
//! reading of epoch `E` sent before it on this connection (the hub handles a
//! connection's frames in order). They are matched by position in the send
//! order, not by seq, because the backlog and live readings interleave (see
//! `docs/decisions/edge-ack-by-send-position.md`). On disconnect every
//! in-flight reading becomes unsent again and is resent after the reconnect
//! (the hub dedups).

pub mod state;

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ems_shared::{EdgeStatus, Reading};
use thiserror::Error;

use crate::meters::persist::EnergyFloor;
use crate::spool::{Dropped, Slot, Spool};
use crate::state_dir::DirLock;

pub use state::{AckOutcome, DropCause, Flight, OutboxState};

/// A spool read that failed with an I/O error is tried again after this
/// long (the backlog waits; live readings do not).
const READ_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Repeated warnings (drops, damaged records, read errors) are logged at
/// most this often, with the count since.
const WARN_EVERY: Duration = Duration::from_secs(60);

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

/// Outbox = [`OutboxState`] + [`Spool`]. Shared behind a mutex; no method
/// blocks on the network, and the slow part of a sync (fsync) happens outside
/// the lock (see [`Outbox::flush`]).
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
    /// Records below this were in the spool at the last flush: sendable
    /// once that flush's fsync is done ([`Outbox::synced`]).
    flushed_upto: u64,
}

impl Outbox {
    /// Opens the spool in `dir` (taking its [`DirLock`]) and recovers its state.
    pub fn open(dir: &std::path::Path, max_bytes: u64, window: usize) -> io::Result<Outbox> {
        Outbox::open_locked(DirLock::acquire(dir)?, max_bytes, window)
    }

    /// Like [`Outbox::open`], with the spool directory already locked.
    pub fn open_locked(lock: DirLock, max_bytes: u64, window: usize) -> io::Result<Outbox> {
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
            flushed_upto: 0,
        };
        ob.refresh_stats();
        Ok(ob)
    }

    /// Appends one reading. Never fails and never waits on the card beyond
    /// a buffered `write` (when the memory queue overflows); a reading that
    /// cannot be written stays in memory. Returns the readings the bounds
    /// dropped to make room (counted and logged).
    pub fn append(&mut self, reading: &Reading) -> u64 {
        let json = reading.to_json();
        let (rec, drops) = self.spool.append(&json);
        self.state.appended(rec);
        let lost = drops.into_iter().map(|d| self.dropped(d)).sum();
        self.refresh_stats();
        lost
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

    /// A connection is up.
    pub fn connected(&mut self) {
        for cause in self.state.connected() {
            self.count_lost(cause, 1);
        }
        self.refresh_stats();
    }

    /// The connection is gone.
    pub fn disconnected(&mut self) {
        for cause in self.state.disconnected() {
            self.count_lost(cause, 1);
        }
        self.refresh_stats();
    }

    /// Up to `max` readings to send now (live first, then oldest backlog),
    /// marked in flight.
    pub fn next_batch(&mut self, max: usize) -> Vec<Outgoing> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(rec) = self.state.peek_next() else {
                break;
            };
            let waiting = self
                .retry_backlog_at
                .is_some_and(|t| Instant::now() < t && !self.spool.in_memory(rec));
            if waiting {
                break;
            }
            match self.spool.read(rec) {
                Ok(Slot::Record(json)) => match serde_json::from_str::<Reading>(&json) {
                    Ok(r) => {
                        self.state.sent(rec, r.epoch, r.seq);
                        out.push(Outgoing { rec, json });
                    }
                    Err(_) => self.damaged(rec, "not a valid reading"),
                },
                Ok(Slot::Lost(why)) => self.damaged(rec, why),
                Err(e) => {
                    if self.read_errors.due().is_some() {
                        log::warn!(
                            "spool: cannot read record {rec}: {e}; trying again (a spot that keeps failing is skipped and counted)"
                        );
                    }
                    self.retry_backlog_at = Some(Instant::now() + READ_RETRY_AFTER);
                    break;
                }
            }
        }
        self.refresh_stats();
        out
    }

    /// A record that cannot be read back: skipped, counted, logged.
    fn damaged(&mut self, rec: u64, why: &str) {
        self.stats.dropped_damaged += 1;
        if let Some(more) = self.damaged_log.due() {
            log::warn!(
                "spool: record {rec} is lost ({why}); skipping it ({} skipped since start{})",
                self.stats.dropped_damaged,
                if more > 0 {
                    format!(", {more} more since the last message")
                } else {
                    String::new()
                }
            );
        }
        self.state.discard(rec);
    }

    /// Handles `ack(epoch, seq)`; returns readings newly done.
    pub fn ack(&mut self, epoch: u64, seq: u64) -> AckOutcome {
        let out = self.state.ack(epoch, seq);
        self.refresh_stats();
        out
    }

    /// Handles `rejected(epoch, seq)`.
    pub fn rejected(&mut self, epoch: u64, seq: u64) -> AckOutcome {
        let out = self.state.rejected(epoch, seq);
        self.stats.rejected += out.done as u64;
        self.refresh_stats();
        out
    }

    /// Handles a `rate_limited` rejection: the reading stays and is resent
    /// (unless the spool dropped it meanwhile: then it is lost, counted).
    pub fn requeue(&mut self, epoch: u64, seq: u64) -> AckOutcome {
        let out = self.state.requeue(epoch, seq);
        if let Some(cause) = out.lost {
            self.count_lost(cause, 1);
        }
        self.refresh_stats();
        out
    }

    /// The `status` frame for the hub: depth, sample time of the oldest
    /// unacknowledged reading, readings dropped since start, readings held
    /// in memory.
    pub fn status(&mut self) -> EdgeStatus {
        let low = self.state.low();
        let oldest_ts_ms = if self.state.depth() == 0 {
            None
        } else {
            match self.oldest {
                Some((rec, ts)) if rec == low => ts,
                _ => {
                    let ts = match self.spool.peek(low) {
                        Ok(Slot::Record(json)) => serde_json::from_str::<Reading>(&json)
                            .ok()
                            .map(|r| r.ts_ms)
                            .filter(|t| *t >= 0),
                        _ => None,
                    };
                    self.oldest = Some((low, ts));
                    ts
                }
            }
        };
        EdgeStatus {
            outbox_depth: self.state.depth(),
            oldest_ts_ms,
            dropped: self.stats.dropped_full,
            unwritten: self.stats.unwritten,
            dropped_disk_full: self.stats.dropped_disk_full,
            dropped_damaged: self.stats.dropped_damaged,
            ..Default::default()
        }
    }

    /// Deletes the spool segments the acks cover (needs no free space),
    /// then writes the buffered readings to the spool files (`write(2)`,
    /// fast). Returns the files to fsync; call [`sync_files`] on them
    /// *after* releasing the lock. A failed write leaves the readings in
    /// memory for the next flush.
    pub fn flush(&mut self) -> io::Result<Vec<File>> {
        self.spool.release_below(self.state.low());
        self.flushed_upto = self.state.next_rec();
        let out = self.spool.flush();
        self.refresh_stats();
        out
    }

    /// The files of the last [`Outbox::flush`] are fsynced (or the flush
    /// failed and will not succeed soon): the readings it covered may go
    /// to the hub. See [`OutboxState::sendable_below`].
    pub fn synced(&mut self) {
        self.state.sendable_below(self.flushed_upto);
    }

    /// The highest `energy_wh` of each meter among the newest readings in
    /// the spool (at least [`RETAIN_RECORDS`](crate::spool::RETAIN_RECORDS)
    /// of them, which stay on disk after their acks): where the energy
    /// counters continue after a restart, if their state files are behind.
    pub fn energy_floor(&mut self) -> EnergyFloor {
        let mut floor = EnergyFloor::default();
        for json in self.spool.newest_records(crate::spool::RETAIN_RECORDS) {
            if let Ok(r) = serde_json::from_str::<Reading>(&json) {
                if let Some(e) = r.energy_wh {
                    floor.raise(&r.meter, e);
                }
            }
        }
        floor
    }

    /// Persists the ack watermark (cheap; done periodically and at exit).
    pub fn persist_watermark(&mut self) -> io::Result<()> {
        self.spool.persist_watermark(self.state.low())
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

/// fsyncs files returned by [`Outbox::flush`].
pub fn sync_files(files: Vec<File>) -> io::Result<()> {
    for f in files {
        f.sync_data()?;
    }
    Ok(())
}

/// Why [`SharedOutbox::sync`] failed (disk full, card errors). The readings
/// stay in memory and the next call retries.
#[derive(Debug, Error)]
pub enum SyncError {
    /// Writing the buffered readings to the segment files failed.
    #[error("write failed: {0}")]
    Write(io::Error),
    /// fsync of the written files failed.
    #[error("fsync failed: {0}")]
    Fsync(io::Error),
}

/// The [`Outbox`] as the sampler, the link and the supervisor share it.
///
/// A panic while the lock is held (a bug) must not stop the other threads:
/// every method of [`Outbox`] leaves it consistent between calls, so a
/// poisoned lock is taken over as it is.
#[derive(Debug, Clone)]
pub struct SharedOutbox(Arc<Mutex<Outbox>>);

impl SharedOutbox {
    /// Shares `outbox`.
    pub fn new(outbox: Outbox) -> Self {
        SharedOutbox(Arc::new(Mutex::new(outbox)))
    }

    /// Locks the outbox. Nobody holds the lock across network or disk
    /// waits, so this never blocks for long.
    pub fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the buffered readings under the lock (a fast `write`), then
    /// fsyncs outside it, so the sampler and the link never wait for the
    /// card.
    pub fn sync(&self) -> Result<(), SyncError> {
        let flushed = self.lock().flush();
        let result = match flushed {
            Ok(files) => sync_files(files).map_err(SyncError::Fsync),
            Err(e) => Err(SyncError::Write(e)),
        };
        // Durable now — or the card refuses the write, and the readings go
        // to the hub from memory rather than not at all.
        self.lock().synced();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(seq: u64) -> Reading {
        Reading {
            epoch: 7,
            seq,
            ts_ms: 1_764_000_000_000 + seq as i64,
            meter: "main".into(),
            power_w: Some(seq as f64),
            ..Default::default()
        }
    }

    /// Writes, fsyncs and releases what was appended (the supervisor's
    /// cadence).
    fn sync(ob: &mut Outbox) {
        sync_files(ob.flush().unwrap()).unwrap();
        ob.synced();
    }

    fn drain(ob: &mut Outbox) -> Vec<u64> {
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
        // Nothing leaves before it is synced.
        assert!(drain(&mut ob).is_empty());
        sync(&mut ob);
        assert_eq!(drain(&mut ob), (0..100).collect::<Vec<_>>());
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
    fn status_reports_depth_and_the_oldest_sample_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), 1 << 20, 1000).unwrap();
        let st = ob.status();
        assert_eq!((st.outbox_depth, st.oldest_ts_ms), (0, None));
        for seq in 0..10 {
            ob.append(&reading(seq));
        }
        sync(&mut ob);
        assert_eq!(ob.status().oldest_ts_ms, Some(1_764_000_000_000));
        ob.connected();
        drain(&mut ob);
        ob.ack(7, 3);
        let st = ob.status();
        assert_eq!(st.outbox_depth, 6);
        assert_eq!(st.oldest_ts_ms, Some(1_764_000_000_004));
        st.validate(1_764_000_000_000).unwrap();
        drop(ob);
        // From the files after a restart (not from the memory cache).
        let mut ob = Outbox::open(dir.path(), 1 << 20, 1000).unwrap();
        assert_eq!(ob.status().oldest_ts_ms, Some(1_764_000_000_000));
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
        // Every acked segment is deleted, except those that hold the newest
        // RETAIN_RECORDS readings (kept for the next start's energy floor).
        let left = segments(dir.path());
        assert_eq!(left.len(), count());
        let lines = |p: &std::path::PathBuf| std::fs::read_to_string(p).unwrap().lines().count();
        let kept: usize = left.iter().map(lines).sum();
        let retain = crate::spool::RETAIN_RECORDS as usize;
        assert!(kept >= retain, "{kept}");
        assert!(kept - lines(&left[0]) < retain, "one file too many kept");
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
        assert!(ob.flush().is_err());
        // (The supervisor's sync lets them go from memory.)
        ob.synced();
        assert_eq!(ob.stats().unwritten, 100);
        assert_eq!(ob.status().unwritten, 100);
        // The hub is there: everything is sent (from the card and from
        // memory), acked, and the acked segments deleted though nothing can
        // be written.
        ob.connected();
        assert_eq!(drain(&mut ob), (0..200).collect::<Vec<_>>());
        assert_eq!(ob.ack(7, 199).done, 200);
        assert!(ob.flush().is_err());
        // The hub goes away; readings pile up past the memory bound.
        ob.disconnected();
        let mut lost = 0;
        for seq in 200..2000 {
            lost += ob.append(&reading(seq));
            if seq % 10 == 0 {
                assert!(ob.flush().is_err());
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
