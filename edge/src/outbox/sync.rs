//! Durability: a sync writes the unacknowledged readings to the spool
//! under the lock and fsyncs them (and raised energy ceilings) outside
//! it; the stop saves exact ceilings; the energy floor and the ack
//! watermark are what the next start continues from.

use std::fs::File;
use std::io;

use ems_shared::Reading;
use thiserror::Error;

use super::Outbox;
use crate::ceiling::file::CeilingWrite;
use crate::meters::persist::EnergyFloor;

impl Outbox {
    /// The first half of a sync, under the lock: deletes the spool
    /// segments the acks cover (needs no free space), writes the readings
    /// not yet acknowledged to the spool files (`write(2)`, fast; acked
    /// ones are skipped), and prepares raising the energy ceilings if they
    /// need it. [`SyncJob::run`] does the slow part (fsyncs) *after* the
    /// lock is released; then [`Outbox::end_sync`]. A failed write leaves
    /// the readings in memory for the next sync.
    pub fn begin_sync(&mut self) -> SyncJob {
        self.housekeep();
        let state = &self.state;
        let before = self.spool.lines_written();
        let files = self.spool.flush(&|rec| state.is_done(rec));
        let wrote = self.spool.lines_written() > before;
        let ceiling = self.ceilings.plan().map(|v| self.ceiling_file.prepare(v));
        self.refresh_stats();
        SyncJob {
            files,
            ceiling,
            wrote,
        }
    }

    /// A ceiling raise alone, when the sampler asked for one and no spool
    /// sync is due: prepares the raised ceilings and nothing else — no
    /// housekeeping, no spool write. The readings in flight keep their
    /// own due time ([`Outbox::sync_due_at`]): acked before it, they never
    /// reach the card, whereas a whole sync here would write them (and the
    /// watermark once they are acked). [`SyncJob::run`] writes and fsyncs
    /// the ceiling file (one page, one fsync) outside the lock; then
    /// [`Outbox::end_sync`] releases the readings that waited for the
    /// raise, exactly as after a whole sync.
    pub fn begin_ceiling_sync(&mut self) -> SyncJob {
        let ceiling = self.ceilings.plan().map(|v| self.ceiling_file.prepare(v));
        SyncJob {
            files: Ok(Vec::new()),
            ceiling,
            wrote: false,
        }
    }

    /// Housekeeping, alone or as the start of a sync: deletes the
    /// segments the acks cover and saves the ack watermark (in place, no
    /// fsync, into the page cache, so a SIGKILL keeps it; without it the
    /// next start would take acked readings for unacked, and a bound
    /// dropping them before their resend would count readings the hub has
    /// as lost). Writes no reading, so alone it never puts one on the card
    /// that an ack is about to settle; the deletions are made durable by
    /// the next sync.
    pub fn housekeep(&mut self) {
        self.spool.release_below(self.state.low());
        if let Err(e) = self.spool.save_watermark(self.state.low()) {
            if let Some(more) = self.watermark_errors.due() {
                log::warn!(
                    "spool: cannot save the ack watermark: {e} ({more} more failures since the last message)"
                );
            }
        }
        self.refresh_stats();
    }

    /// The second half of a sync, under the lock again: a saved ceiling
    /// releases the readings that waited for it. If the ceiling could not
    /// be saved, they are released anyway — held back they would not reach
    /// the hub at all — and an error says what a crash could then do.
    pub fn end_sync(&mut self, job: &SyncJob, done: &SyncDone) {
        match (&job.ceiling, &done.ceiling) {
            (Some(Ok(w)), Some(Ok(()))) => {
                self.ceiling_file.saved(w);
                self.ceilings.mark_saved(w.values.clone());
                self.release_held_back();
            }
            (Some(planned), outcome) => {
                let why = match (planned, outcome) {
                    (Err(e), _) | (_, Some(Err(e))) => e.to_string(),
                    _ => "not written".into(),
                };
                if let Some(more) = self.ceiling_errors.due() {
                    log::error!(
                        "energy ceiling {}: cannot save it: {why}; readings are sent anyway, so after a crash now an energy counter may restart below a value the hub has ({more} more failures since the last message)",
                        self.ceiling_file.describe()
                    );
                }
                self.release_all();
            }
            (None, _) => {}
        }
        self.refresh_stats();
    }

    /// A whole sync while holding the outbox (single-threaded tools and
    /// tests; the edge itself uses [`SharedOutbox::sync`]).
    pub fn sync_now(&mut self) -> SyncDone {
        let job = self.begin_sync();
        let done = job.run();
        self.end_sync(&job, &done);
        done
    }

    /// A ceiling raise alone while holding the outbox (tests; the edge
    /// uses [`super::SharedOutbox::sync_ceilings`]).
    pub fn sync_ceilings_now(&mut self) -> SyncDone {
        let job = self.begin_ceiling_sync();
        let done = job.run();
        self.end_sync(&job, &done);
        done
    }

    /// Saves the energy ceilings at an orderly stop, after the last
    /// reading was taken and the link stopped: each meter's exact last
    /// value, so the next start adds nothing to any counter. Returns the
    /// write to run outside the lock (then [`Outbox::end_stop`]).
    pub fn begin_stop(&mut self) -> io::Result<CeilingWrite> {
        self.ceiling_file.prepare(self.ceilings.at_stop())
    }

    /// The stop's ceiling write (from [`Outbox::begin_stop`]) succeeded.
    pub fn end_stop(&mut self, w: &CeilingWrite) {
        self.ceiling_file.saved(w);
        self.ceilings.mark_saved(w.values.clone());
    }

    /// Where the energy counters continue after a restart, per meter: the
    /// larger of the saved ceilings and the highest `energy_wh` among the
    /// newest readings in the spool (at least
    /// [`FLOOR_RECORDS`](crate::spool::FLOOR_RECORDS) of them; they matter
    /// after an upgrade from an edge without ceilings).
    pub fn energy_floor(&mut self) -> EnergyFloor {
        let mut floor = EnergyFloor::default();
        for (meter, v) in self.ceilings.saved() {
            floor.raise(meter, *v);
        }
        for json in self.spool.newest_records(crate::spool::FLOOR_RECORDS) {
            if let Ok(r) = serde_json::from_str::<Reading>(&json) {
                if let Some(e) = r.energy_wh {
                    floor.raise(&r.meter, e);
                }
            }
        }
        floor
    }

    /// Persists the ack watermark if acks of records on disk changed it
    /// (cheap; every sync does it too, see [`Outbox::begin_sync`]; and at
    /// exit).
    pub fn persist_watermark(&mut self) -> io::Result<()> {
        self.spool.save_watermark(self.state.low())
    }
}

/// fsyncs files (from a [`SyncJob`]).
pub fn sync_files(files: &[File]) -> io::Result<()> {
    for f in files {
        f.sync_data()?;
    }
    Ok(())
}

/// The slow half of a sync, run outside the outbox lock (see
/// [`Outbox::begin_sync`]).
#[derive(Debug)]
pub struct SyncJob {
    /// The spool files to fsync, or why they could not be written.
    files: io::Result<Vec<File>>,
    /// The ceiling save, if one is due.
    ceiling: Option<io::Result<CeilingWrite>>,
    /// Readings were written to the spool files (not only skipped).
    wrote: bool,
}

/// What [`SyncJob::run`] did.
#[derive(Debug)]
pub struct SyncDone {
    /// The spool: written and fsynced, or why not.
    pub spool: Result<(), SyncError>,
    /// The ceiling save, if one was due.
    pub ceiling: Option<io::Result<()>>,
    /// fdatasync calls made.
    pub syncs: usize,
    /// Readings were written to the spool (a sync that found every
    /// reading in memory acknowledged writes none).
    pub wrote: bool,
}

impl SyncJob {
    /// fsyncs the spool files, then writes and fsyncs the ceilings. Any
    /// order would do: a reading is released only after both.
    pub fn run(&self) -> SyncDone {
        let (spool, mut syncs) = match &self.files {
            Ok(files) => (sync_files(files).map_err(SyncError::Fsync), files.len()),
            Err(e) => (
                Err(SyncError::Write(io::Error::new(e.kind(), e.to_string()))),
                0,
            ),
        };
        let ceiling = self.ceiling.as_ref().map(|w| match w {
            Ok(w) => {
                syncs += 1;
                w.run()
            }
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        });
        SyncDone {
            spool,
            ceiling,
            syncs,
            wrote: self.wrote,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::super::tests::{drain, reading, sync};
    use super::*;

    /// Readings written during an outage and acked afterwards: a crash
    /// (SIGKILL) after the next sync must not make the next process take
    /// them for unacked. If it did, a bound that drops them before they
    /// are resent would count them as lost although the hub has them.
    #[test]
    fn acks_of_written_readings_survive_a_crash_after_the_next_sync() {
        let dir = tempfile::tempdir().unwrap();
        let bound = 64 * 1024;
        let mut ob = Outbox::open(dir.path(), bound, 1000).unwrap();
        // Fewer than one segment holds (a released segment would save the
        // watermark anyway).
        for seq in 0..30 {
            ob.append(&reading(seq));
        }
        // The outage: written to the card.
        sync(&mut ob);
        // The hub is back and acks them all; one sync later the process
        // is SIGKILLed (no stop, nothing saved at exit).
        ob.connected();
        assert_eq!(drain(&mut ob).len(), 30);
        assert_eq!(ob.ack(7, 29).done, 30);
        sync(&mut ob);
        drop(ob);

        let mut ob = Outbox::open(dir.path(), bound, 1000).unwrap();
        let recovered = ob.stats().depth;
        // A long outage: the size bound drops the oldest segments. Every
        // reading it counts must be one of this process's, never one the
        // hub acknowledged to the previous one.
        let appended = 2000;
        for seq in 0..appended {
            ob.append(&reading(seq));
            if seq % 10 == 0 {
                sync(&mut ob);
            }
        }
        let s = ob.stats();
        assert!(s.dropped_full > 0, "the bound was reached: {s:?}");
        assert_eq!(s.dropped_full + s.depth, appended, "{s:?}");
        assert_eq!(recovered, 0, "acked readings recovered as unacked");
    }
}
