//! The on-disk spool behind the outbox, designed for SD cards.
//!
//! - Readings are records: one line each in segment files
//!   `NNNNNNNNNNNNNNNNNNNN.seg` in `spool_dir` (named by
//!   [`StateDir::segment_file`]), where the number is the record number of
//!   the segment's first line. Record numbers are dense and keep
//!   increasing across restarts, so a record's number is its identity. The
//!   line formats (a CRC-32 and the record number on every line; plain
//!   lines of older edges are still read) are in [`record`].
//! - Appends go to memory; [`Spool::flush`] (when a reading is still
//!   unacknowledged `spool_sync_interval_ms` after it was taken, 1 s by
//!   default) writes what is new in one
//!   `write` per segment and hands the files to be `fdatasync`ed — only the
//!   files it wrote to: a flush with nothing to write costs nothing. On a
//!   power cut the readings of at most the last sync interval (plus the one
//!   being sampled) are lost, unless the hub acknowledged them; a SIGKILL
//!   loses only the unwritten ones (same bound). Each process starts a new
//!   segment file, and a segment is closed at 1 MiB (1/8 of
//!   `spool_max_bytes` at most).
//! - **Readings the hub acknowledged before the flush are not written**
//!   (the caller says which records are done): while the link streams, a
//!   reading is acked within milliseconds and the card sees nothing. When
//!   later records are written after skipped ones, a *done range* line
//!   ([`record`]) in front of them keeps the numbering dense, so a reader
//!   tells "acknowledged before it was written" ([`Slot::Done`]) from
//!   "lost". They leave the memory queue at the ack ([`Spool::settle`]),
//!   not at the next flush, which may not come while the hub acks in time.
//! - **When a write fails** (disk full, card errors) the readings stay in
//!   memory and every flush tries again (the outbox retries at the sync
//!   interval while [`Spool::write_failing`]); nothing else waits for it.
//!   Those the hub acknowledges meanwhile leave memory unwritten, and a
//!   flush with nothing left to write succeeds and ends the episode. Acked
//!   segments are still deleted, which frees space. The memory queue is
//!   bounded ([`Spool::unwritten_max`]: a quarter of `spool_max_bytes`,
//!   between 64 KiB and 8 MiB); beyond it the *oldest* readings go, exactly
//!   as for the size bound: the oldest segment file first (which frees space
//!   on the card, so the queue is written out at once), and only when no
//!   file is left the oldest readings in memory. Either way the caller is
//!   told ([`Dropped`]) and counts them.
//! - A segment is deleted once every record in it is done (acked, rejected
//!   or dropped); the one being appended to stays. The ack watermark
//!   (`acked`) is saved before any segment is deleted and, when it would
//!   change what the files say (acks of records that are on disk), at the
//!   outbox's every sync; so a restart resends at most what was acked since
//!   the last save (harmless: the hub stores each (epoch, seq) once) and a
//!   bound never counts a reading acked before the restart as lost, records
//!   missing below the first segment are known to be lost, not acked, and
//!   a streaming edge never rewrites it.
//! - `spool_max_bytes` bounds the files plus the memory queue: when over,
//!   the oldest segment is deleted and the caller counts and logs the
//!   readings lost.
//! - Recovery on open: a torn last line (no newline) is cut off; an empty
//!   segment file is removed, a file overlapping an earlier one is removed,
//!   an unreadable one is renamed to `….seg.unreadable`, each with a log
//!   line giving the count; a damaged line, a line in an unreadable block
//!   and a record whose file is missing are reported [`Slot::Lost`] when
//!   read (see [`cursor`]), and the caller counts them.
//! - Recent records are also kept in memory, so sending live readings never
//!   reads the card.
//! - One process per spool: the spool holds the directory's [`DirLock`]
//!   for as long as it is open.
//! - Directory entries are made durable where it matters: a new segment's
//!   directory is fsynced with its first data, and after segments are
//!   deleted the directory is fsynced on the next flush.
//!
//! This file holds the types and appends; recovery at open is in `open`,
//! the write path in `write`, reads in `read`, releases and the bounds in
//! `release`, the ack watermark in `watermark`.

pub mod cursor;
mod open;
mod read;
pub mod record;
mod release;
mod watermark;
mod write;

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::state_dir::{DirLock, StateDir};
use cursor::Cursor;

/// Largest segment file.
const MAX_SEGMENT_BYTES: u64 = 1024 * 1024;
/// Records kept in memory beyond the unwritten ones.
const RECENT_RECORDS: usize = 4096;
/// The newest records read at start for the energy floor (at least this
/// many, in whole segments).
pub const FLOOR_RECORDS: u64 = 256;
/// Bounds of the memory queue while the spool cannot be written.
const UNWRITTEN_MIN_BYTES: u64 = 64 * 1024;
const UNWRITTEN_MAX_BYTES: u64 = 8 * 1024 * 1024;

/// One segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    /// Record number of its first line.
    base: u64,
    /// One past the number of its last record.
    end: u64,
    /// Bytes in it.
    bytes: u64,
}

/// What the spool holds for a record number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// The reading's wire JSON.
    Record(Arc<str>),
    /// It was acknowledged before it was written (a done range): nothing
    /// to send, nothing lost.
    Done,
    /// It cannot be read back: damaged (checksum, syntax), in an
    /// unreadable block or a lost segment file, or not in the spool. The
    /// reason is for the log.
    Lost(&'static str),
}

/// Why the spool dropped records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropCause {
    /// `spool_max_bytes` was reached.
    Bound,
    /// The spool could not be written and its memory queue was full.
    DiskFull,
}

/// Records the spool dropped: everything below `below` that was not done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// Every record below this is gone.
    pub below: u64,
    /// Why.
    pub cause: DropCause,
}

/// The spool (see the module docs).
#[derive(Debug)]
pub struct Spool {
    /// Directory of segment files.
    dir: StateDir,
    /// Bound on segment bytes plus the memory queue.
    max_bytes: u64,
    /// Rotation size.
    segment_bytes: u64,
    /// Bound of the memory queue while writes fail.
    unwritten_max: u64,
    /// Segments on disk, oldest first.
    segments: VecDeque<Segment>,
    /// Append handle of the segment this process writes to.
    tail: Option<File>,
    /// Base of that segment.
    tail_base: Option<u64>,
    /// Records below this are in files, skipped because they were done, or
    /// gone: none of them waits in memory to be written.
    written_end: u64,
    /// The files describe every record below this (as a line or in a done
    /// range); the next line written continues here.
    disk_end: u64,
    /// The tail file was written to since the last flush.
    tail_dirty: bool,
    /// Next record number.
    next_rec: u64,
    /// Recent records, contiguous: all unwritten ones and up to
    /// `RECENT_RECORDS` more.
    recent: VecDeque<(u64, Arc<str>)>,
    /// Encoded bytes of the unwritten records.
    unwritten_bytes: u64,
    /// The last write failed.
    write_failing: bool,
    /// Record lines written since open.
    lines_written: u64,
    /// Reader for the backlog.
    cursor: Option<Cursor>,
    /// Segment whose file could not be opened, and the tries so far.
    open_failure: Option<(u64, u32)>,
    /// Files written since the last flush, to be fsynced.
    to_sync: Vec<File>,
    /// Records below this need not be sent.
    acked_below: u64,
    /// Last watermark written to disk.
    saved_watermark: u64,
    /// Segments were deleted since the directory was last fsynced.
    dir_dirty: bool,
    /// Exclusive use of `dir` (`None` only in tests simulating a crash).
    _lock: Option<DirLock>,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, recovering segments.
    /// Takes the directory's [`DirLock`] first.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Spool> {
        Spool::open_locked(DirLock::acquire(dir)?, max_bytes)
    }

    /// Next record number.
    pub fn next_rec(&self) -> u64 {
        self.next_rec
    }

    /// Records below this need not be sent (saved watermark or deleted).
    pub fn acked_below(&self) -> u64 {
        self.acked_below
    }

    /// The bound.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Bound of the memory queue while the spool cannot be written.
    pub fn unwritten_max(&self) -> u64 {
        self.unwritten_max
    }

    /// Bytes in the spool: files plus readings not written yet.
    pub fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum::<u64>() + self.unwritten_bytes
    }

    /// Readings appended and not written to a file yet.
    pub fn unwritten(&self) -> u64 {
        self.next_rec - self.written_end
    }

    /// Records below this are in files, skipped because done, or gone.
    pub fn written_end(&self) -> u64 {
        self.written_end
    }

    /// Whether acks up to `low` leave work for a flush: segments to
    /// delete, or a watermark to save for records on disk.
    pub fn housekeeping_due(&self, low: u64) -> bool {
        let deletable =
            self.segments.len() > 1 && self.segments.front().is_some_and(|f| f.end <= low);
        deletable || low.min(self.disk_end) > self.saved_watermark
    }

    /// The last write failed (disk full, card errors); the unwritten
    /// readings wait in memory.
    pub fn write_failing(&self) -> bool {
        self.write_failing
    }

    /// Record lines written to the files since open (a flush compares
    /// it to tell a write from a flush that had nothing to write).
    pub fn lines_written(&self) -> u64 {
        self.lines_written
    }

    /// Segment count (tests).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Appends one record (`json` must not contain a newline) and returns
    /// its number, with the drops the bounds forced (oldest first). Never
    /// fails: a record that cannot be written stays in memory.
    pub fn append(&mut self, json: &str) -> (u64, Vec<Dropped>) {
        let rec = self.next_rec;
        self.next_rec += 1;
        self.unwritten_bytes += record::encoded_len(rec, json);
        self.recent.push_back((rec, Arc::from(json)));
        let mut dropped = Vec::new();
        while self.total_bytes() > self.max_bytes {
            match self.drop_segment() {
                Some(below) => dropped.push(Dropped {
                    below,
                    cause: DropCause::Bound,
                }),
                None => break,
            }
        }
        if self.write_failing && self.unwritten_bytes > self.unwritten_max {
            self.overflow(&mut dropped);
        }
        (rec, dropped)
    }

    /// Record `rec` is served from memory (reading it never touches the
    /// card).
    pub fn in_memory(&self, rec: u64) -> bool {
        self.recent.front().is_some_and(|(first, _)| rec >= *first)
    }

    fn recent_json(&self, rec: u64) -> Option<Arc<str>> {
        let first = self.recent.front()?.0;
        let idx = usize::try_from(rec.checked_sub(first)?).ok()?;
        self.recent.get(idx).map(|(_, j)| j.clone())
    }

    fn trim_recent(&mut self) {
        while self.recent.len() > RECENT_RECORDS {
            match self.recent.front() {
                Some((r, _)) if *r < self.written_end => {
                    self.recent.pop_front();
                }
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::Path;

    pub(super) fn rec(i: u64) -> String {
        format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(40))
    }

    pub(super) fn fill(s: &mut Spool, from: u64, to: u64) {
        for i in from..to {
            let (r, _) = s.append(&rec(i));
            assert_eq!(r, i);
        }
    }

    /// The record's JSON, `None` if the spool cannot give it.
    pub(super) fn get(s: &mut Spool, i: u64) -> Option<String> {
        match s.read(i).unwrap() {
            Slot::Record(j) => Some(j.to_string()),
            Slot::Done | Slot::Lost(_) => None,
        }
    }

    pub(super) fn seg_files(dir: &Path) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().ends_with(".seg")
            })
            .count()
    }

    #[test]
    fn append_flush_reopen_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        fill(&mut s, 0, 100);
        assert_eq!(get(&mut s, 42), Some(rec(42)));
        s.flush(&|_| false).unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.next_rec(), 100);
        assert_eq!(s.acked_below(), 0);
        for i in [0, 1, 57, 99, 3] {
            assert_eq!(get(&mut s, i), Some(rec(i)), "{i}");
        }
        assert_eq!(get(&mut s, 100), None);
    }

    #[test]
    fn unflushed_records_are_lost_on_crash_but_numbering_continues() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        fill(&mut s, 0, 10);
        s.flush(&|_| false).unwrap();
        fill(&mut s, 10, 15);
        s._lock = None; // the kernel drops a killed process's flock
        std::mem::forget(s); // "SIGKILL": the buffer is never written
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.next_rec(), 10);
    }

    #[test]
    fn segments_rotate_and_are_released_by_acks() {
        let dir = tempfile::tempdir().unwrap();
        // 64 KiB bound → 8 KiB segments → ~120 records each.
        let mut s = Spool::open(dir.path(), 64 * 1024).unwrap();
        fill(&mut s, 0, 1000);
        s.flush(&|_| false).unwrap();
        assert!(s.segment_count() >= 8, "{}", s.segment_count());
        let files = seg_files(dir.path());
        assert_eq!(files, s.segment_count());
        // Besides the segments: only the lock file and the watermark
        // (saved at open, so that a lost first segment is known as lost).
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), files + 2);
        assert!(dir.path().join("lock").exists());
        assert!(dir.path().join("acked").exists());
        s.release_below(999);
        // Deleted: every acked segment but the one appended to (which
        // holds record 999, not acked).
        assert_eq!(s.segment_count(), 1);
        assert_eq!(seg_files(dir.path()), 1);
        // The watermark was saved before the deletions.
        drop(s);
        let mut s = Spool::open(dir.path(), 64 * 1024).unwrap();
        assert_eq!(s.acked_below(), 999);
        assert_eq!(get(&mut s, 999), Some(rec(999)));
        fill(&mut s, 1000, 1001);
    }

    #[test]
    fn all_acked_and_deleted_keeps_numbering() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        fill(&mut s, 0, 5);
        s.flush(&|_| false).unwrap();
        s.persist_watermark(5).unwrap();
        drop(s);
        fs::remove_file(StateDir::new(dir.path()).segment_file(0)).unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((s.next_rec(), s.acked_below()), (5, 5));
        fill(&mut s, 5, 6);
    }

    #[test]
    fn a_spool_dir_is_used_by_one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        // flock conflicts between open file descriptions, even in one process.
        let e = Spool::open(dir.path(), 1 << 20).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        let pid = std::process::id();
        assert!(
            e.to_string()
                .contains(&format!("in use by another ems-edge process (pid {pid})")),
            "{e}"
        );
        assert!(DirLock::acquire(dir.path()).is_err());
        drop(s);
        let lock = DirLock::acquire(dir.path()).unwrap();
        let s = Spool::open_locked(lock, 1 << 20).unwrap();
        assert_eq!(s.next_rec(), 0);
    }
}
