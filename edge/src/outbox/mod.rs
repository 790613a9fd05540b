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

use ems_shared::{EdgeStatus, Reading};
use thiserror::Error;

use crate::spool::Spool;
use crate::state_dir::DirLock;

pub use state::{AckOutcome, Flight, OutboxState};

/// A reading ready to go on the wire.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Spool record number.
    pub rec: u64,
    /// The wire JSON.
    pub json: Arc<str>,
}

/// Counters for logs and the systemd status line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Readings not yet acknowledged.
    pub depth: u64,
    /// Readings in flight.
    pub in_flight: usize,
    /// Readings dropped because the spool was full, since start.
    pub dropped_full: u64,
    /// Readings dropped because their spool record was unreadable, since start.
    pub dropped_corrupt: u64,
    /// Readings rejected by the hub, since start.
    pub rejected: u64,
    /// Bytes in the spool.
    pub spool_bytes: u64,
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
    /// Last time a spool read error was logged (rate limit).
    last_read_error: Option<std::time::Instant>,
    /// Last time an unreadable record was logged (rate limit).
    last_corrupt_log: Option<std::time::Instant>,
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
            last_read_error: None,
            last_corrupt_log: None,
        };
        ob.refresh_stats();
        Ok(ob)
    }

    /// Appends one reading. Never blocks on I/O beyond a buffered `write`
    /// when a segment rotates. Returns readings lost to a full spool.
    pub fn append(&mut self, reading: &Reading) -> io::Result<u64> {
        let json = reading.to_json();
        let (rec, drop_below) = self.spool.append(&json)?;
        self.state.appended(rec);
        let mut lost = 0;
        if let Some(end) = drop_below {
            lost = self.state.dropped_below(end);
            if lost > 0 {
                self.stats.dropped_full += lost;
                log::warn!(
                    "spool full ({} bytes): dropped the {lost} oldest unsent readings ({} dropped since start)",
                    self.spool.max_bytes(),
                    self.stats.dropped_full
                );
            }
        }
        self.refresh_stats();
        Ok(lost)
    }

    /// A connection is up.
    pub fn connected(&mut self) {
        self.state.connected();
        self.refresh_stats();
    }

    /// The connection is gone.
    pub fn disconnected(&mut self) {
        self.state.disconnected();
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
            match self.spool.read(rec) {
                Ok(Some(json)) => match serde_json::from_str::<Reading>(&json) {
                    Ok(r) => {
                        self.state.sent(rec, r.epoch, r.seq);
                        out.push(Outgoing { rec, json });
                    }
                    Err(_) => self.corrupt(rec),
                },
                Ok(None) => self.corrupt(rec),
                // The segment file vanished (deleted by hand?): skip it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => self.corrupt(rec),
                Err(e) => {
                    let now = std::time::Instant::now();
                    if self
                        .last_read_error
                        .map_or(true, |t| now.duration_since(t).as_secs() >= 60)
                    {
                        log::warn!("spool: cannot read record {rec}: {e}; will retry");
                        self.last_read_error = Some(now);
                    }
                    break;
                }
            }
        }
        self.refresh_stats();
        out
    }

    fn corrupt(&mut self, rec: u64) {
        self.stats.dropped_corrupt += 1;
        let now = std::time::Instant::now();
        if self
            .last_corrupt_log
            .map_or(true, |t| now.duration_since(t).as_secs() >= 60)
        {
            log::warn!(
                "spool: record {rec} is unreadable (torn write or damaged file); skipping it ({} skipped since start)",
                self.stats.dropped_corrupt
            );
            self.last_corrupt_log = Some(now);
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

    /// Handles a `rate_limited` rejection: the reading stays and is resent.
    pub fn requeue(&mut self, epoch: u64, seq: u64) -> AckOutcome {
        let out = self.state.requeue(epoch, seq);
        self.refresh_stats();
        out
    }

    /// The `status` frame for the hub: depth, sample time of the oldest
    /// unacknowledged reading, readings dropped since start.
    pub fn status(&mut self) -> EdgeStatus {
        let low = self.state.low();
        let oldest_ts_ms = if self.state.depth() == 0 {
            None
        } else {
            match self.oldest {
                Some((rec, ts)) if rec == low => ts,
                _ => {
                    let ts = match self.spool.peek(low) {
                        Ok(Some(json)) => serde_json::from_str::<Reading>(&json)
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
            ..Default::default()
        }
    }

    /// Writes buffered readings to the spool files (`write(2)`, fast) and
    /// deletes segments the acks cover. Returns the files to fsync; call
    /// [`sync_files`] on them *after* releasing the lock.
    pub fn flush(&mut self) -> io::Result<Vec<File>> {
        let files = self.spool.flush()?;
        self.spool.release_below(self.state.low())?;
        self.refresh_stats();
        Ok(files)
    }

    /// Persists the ack watermark (cheap; done periodically and at exit).
    pub fn persist_watermark(&mut self) -> io::Result<()> {
        self.spool.persist_watermark(self.state.low())
    }

    /// Counters.
    pub fn stats(&self) -> OutboxStats {
        self.stats
    }

    /// The pure state (tests, status).
    pub fn state(&self) -> &OutboxState {
        &self.state
    }

    fn refresh_stats(&mut self) {
        self.stats.depth = self.state.depth();
        self.stats.in_flight = self.state.in_flight();
        self.stats.spool_bytes = self.spool.total_bytes();
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
        let files = self.lock().flush().map_err(SyncError::Write)?;
        sync_files(files).map_err(SyncError::Fsync)
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
            ob.append(&reading(seq)).unwrap();
        }
        ob.connected();
        assert_eq!(drain(&mut ob), (0..100).collect::<Vec<_>>());
        assert_eq!(ob.ack(7, 49).done, 50);
        assert_eq!(ob.rejected(7, 60).done, 1);
        sync_files(ob.flush().unwrap()).unwrap();
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
            ob.append(&reading(seq)).unwrap();
        }
        sync_files(ob.flush().unwrap()).unwrap();
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
            lost += ob.append(&reading(seq)).unwrap();
            if seq % 50 == 0 {
                sync_files(ob.flush().unwrap()).unwrap();
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
            ob.append(&reading(seq)).unwrap();
        }
        sync_files(ob.flush().unwrap()).unwrap();
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
        assert_eq!(ob.stats().dropped_corrupt, 1);
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
            ob.append(&reading(seq)).unwrap();
        }
        sync_files(ob.flush().unwrap()).unwrap();
        assert!(count() > 2, "{}", count());
        ob.connected();
        drain(&mut ob);
        ob.ack(7, 499);
        sync_files(ob.flush().unwrap()).unwrap();
        assert_eq!(count(), 1);
    }
}
