//! The on-disk spool behind the outbox, designed for SD cards.
//!
//! - Readings are records: one line of wire JSON each, appended to segment
//!   files `NNNNNNNNNNNNNNNNNNNN.seg` in `spool_dir` (named by
//!   [`StateDir::segment_file`]), where the number is the record number of
//!   the segment's first line. Record numbers are dense and
//!   keep increasing across restarts, so a record's number is its identity.
//! - Appends go to a memory buffer; [`Spool::flush`] (every
//!   `spool_sync_interval_ms`, 1 s by default) writes the buffer in one
//!   `write` and hands the file to be `fdatasync`ed. On a power cut the
//!   readings of at most the last sync interval (plus the one being sampled)
//!   are lost; a SIGKILL loses only the unwritten buffer (same bound).
//! - A segment is deleted once every record in it is done (acked, rejected
//!   or dropped). The ack watermark is saved in `acked` now and then, so a
//!   restart resends at most what was acked since the last save (harmless:
//!   the hub stores each (epoch, seq) once).
//! - `spool_max_bytes` bounds the files: when over, the oldest segment is
//!   deleted and the caller counts and logs the readings lost. Segments are
//!   at most 1/8 of the bound, so one drop loses at most 1/8 of the spool.
//! - Recovery on open: a torn last line (no newline) is cut off; an
//!   unparseable line is skipped when read (and logged by the caller).
//! - Recent records are also kept in memory, so sending live readings never
//!   reads the card.
//! - One process per spool: the spool holds the directory's [`DirLock`]
//!   for as long as it is open.
//! - Directory entries are made durable where it matters: a new segment's
//!   directory is fsynced with its first data, and after segments are
//!   deleted the directory is fsynced on the next flush (a deletion lost to
//!   a power cut would only bring back acked readings, resent harmlessly,
//!   but it is cheap: segments rotate every 1 MiB).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::Arc;

use crate::state_dir::{write_replacing, DirLock, StateDir};

/// Largest segment file.
const MAX_SEGMENT_BYTES: u64 = 1024 * 1024;
/// Records kept in memory beyond the unwritten ones.
const RECENT_RECORDS: usize = 4096;

/// One segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    /// Record number of its first line.
    base: u64,
    /// Records in it (written or buffered).
    count: u64,
    /// Bytes in it (written or buffered).
    bytes: u64,
}

impl Segment {
    fn end(&self) -> u64 {
        self.base + self.count
    }
}

/// Sequential reader over one segment.
#[derive(Debug)]
struct Cursor {
    /// Segment base.
    base: u64,
    /// Record number of the next line.
    rec: u64,
    /// The open file.
    reader: BufReader<File>,
}

/// The spool (see the module docs).
#[derive(Debug)]
pub struct Spool {
    /// Directory of segment files.
    dir: StateDir,
    /// Bound on all segment bytes.
    max_bytes: u64,
    /// Rotation size.
    segment_bytes: u64,
    /// Segments, oldest first; the last one takes appends.
    segments: VecDeque<Segment>,
    /// Append handle of the last segment, opened on first write.
    tail: Option<File>,
    /// Records appended and not yet written to the tail file.
    buffer: Vec<u8>,
    /// Records below this are in files (written, maybe not yet fsynced).
    written_end: u64,
    /// Next record number.
    next_rec: u64,
    /// Recent records: all unwritten ones and up to `RECENT_RECORDS` more.
    recent: VecDeque<(u64, Arc<str>)>,
    /// Reader for the backlog.
    cursor: Option<Cursor>,
    /// Files written since the last flush, to be fsynced.
    to_sync: Vec<File>,
    /// Records below this were acked per the saved watermark.
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

    /// Like [`Spool::open`], with the directory already locked by the caller.
    pub fn open_locked(lock: DirLock, max_bytes: u64) -> io::Result<Spool> {
        let dir = lock.dir().clone();
        let mut bases = dir.segment_bases()?;
        bases.sort_unstable();
        let watermark = read_watermark(&dir);
        let mut segments = VecDeque::new();
        let mut prev_end = 0u64;
        for base in bases {
            let path = dir.segment_file(base);
            let (count, bytes) = recover_segment(&path)?;
            if count == 0 || base < prev_end {
                // Empty, or overlapping an earlier one (should not happen).
                let _ = fs::remove_file(&path);
                continue;
            }
            prev_end = base + count;
            segments.push_back(Segment { base, count, bytes });
        }
        let files_end = segments.back().map_or(0, Segment::end);
        let next_rec = files_end.max(watermark);
        let first = segments.front().map_or(next_rec, |s| s.base);
        let segment_bytes = (max_bytes / 8).clamp(4096, MAX_SEGMENT_BYTES);
        let mut spool = Spool {
            dir,
            max_bytes,
            segment_bytes,
            segments,
            tail: None,
            buffer: Vec::new(),
            written_end: next_rec,
            next_rec,
            recent: VecDeque::new(),
            cursor: None,
            to_sync: Vec::new(),
            acked_below: watermark.max(first),
            saved_watermark: watermark,
            dir_dirty: false,
            _lock: Some(lock),
        };
        if spool.segments.back().is_some_and(|s| s.end() != next_rec) {
            // The watermark is past the files (their end was lost): start a
            // fresh segment so record numbers stay contiguous per file.
            spool.start_segment();
        }
        Ok(spool)
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

    /// Bytes in the spool, buffered included.
    pub fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Segment count (tests).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    fn start_segment(&mut self) {
        self.segments.push_back(Segment {
            base: self.next_rec,
            count: 0,
            bytes: 0,
        });
    }

    /// Appends one record (`json` must not contain a newline). Returns its
    /// record number and, when the bound forced dropping old segments, the
    /// record number below which everything was dropped.
    pub fn append(&mut self, json: &str) -> io::Result<(u64, Option<u64>)> {
        let len = json.len() as u64 + 1;
        let needs_new = match self.segments.back() {
            None => true,
            Some(s) => s.count > 0 && s.bytes + len > self.segment_bytes,
        };
        if needs_new {
            if !self.segments.is_empty() {
                // Rotate: the old tail's buffer goes to its file first.
                self.write_buffer()?;
                if let Some(f) = self.tail.take() {
                    self.to_sync.push(f);
                }
            }
            self.start_segment();
        }
        let rec = self.next_rec;
        self.next_rec += 1;
        self.buffer.extend_from_slice(json.as_bytes());
        self.buffer.push(b'\n');
        if let Some(s) = self.segments.back_mut() {
            s.count += 1;
            s.bytes += len;
        }
        self.recent.push_back((rec, Arc::from(json)));
        self.trim_recent();
        let mut dropped = None;
        while self.total_bytes() > self.max_bytes && self.segments.len() > 1 {
            if let Some(old) = self.segments.pop_front() {
                self.delete_segment(&old);
                dropped = Some(old.end());
                self.acked_below = self.acked_below.max(old.end());
            }
        }
        Ok((rec, dropped))
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

    fn delete_segment(&mut self, seg: &Segment) {
        if self.cursor.as_ref().is_some_and(|c| c.base == seg.base) {
            self.cursor = None;
        }
        match fs::remove_file(self.dir.segment_file(seg.base)) {
            Ok(()) => self.dir_dirty = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("spool: cannot delete segment {}: {e}", seg.base),
        }
    }

    fn write_buffer(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let Some(seg) = self.segments.back() else {
            return Ok(());
        };
        let written_len = seg.bytes - self.buffer.len() as u64;
        if self.tail.is_none() {
            let path = self.dir.segment_file(seg.base);
            let created = !path.exists();
            let f = OpenOptions::new().create(true).append(true).open(&path)?;
            if created {
                // Make the new directory entry durable with the data.
                if let Ok(d) = File::open(self.dir.path()) {
                    self.to_sync.push(d);
                }
            }
            self.tail = Some(f);
        }
        if let Some(f) = self.tail.as_mut() {
            if let Err(e) = f.write_all(&self.buffer) {
                // Undo a partial write (disk full…) so that lines and record
                // numbers stay aligned; the buffer is retried next time.
                let _ = f.set_len(written_len);
                return Err(e);
            }
        }
        self.buffer.clear();
        self.written_end = self.next_rec;
        self.trim_recent();
        Ok(())
    }

    /// Writes the buffer (one `write`) and returns the files to fsync.
    pub fn flush(&mut self) -> io::Result<Vec<File>> {
        self.write_buffer()?;
        let mut files = std::mem::take(&mut self.to_sync);
        if std::mem::take(&mut self.dir_dirty) {
            // Make the deletions durable (fsynced with the rest, outside the lock).
            match File::open(self.dir.path()) {
                Ok(d) => files.push(d),
                Err(e) => {
                    self.dir_dirty = true;
                    return Err(e);
                }
            }
        }
        if let Some(f) = self.tail.as_ref() {
            files.push(f.try_clone()?);
        }
        Ok(files)
    }

    /// Deletes segments whose every record is below `low` (done); the tail
    /// segment is kept open.
    pub fn release_below(&mut self, low: u64) -> io::Result<()> {
        while self.segments.len() > 1 && self.segments.front().is_some_and(|s| s.end() <= low) {
            if let Some(old) = self.segments.pop_front() {
                self.delete_segment(&old);
            }
        }
        self.acked_below = self.acked_below.max(low);
        Ok(())
    }

    /// Saves the ack watermark if it moved (write + rename; no fsync: losing
    /// it only causes harmless resends).
    pub fn persist_watermark(&mut self, low: u64) -> io::Result<()> {
        if low == self.saved_watermark {
            return Ok(());
        }
        write_replacing(&self.dir.watermark_file(), format!("{low}\n").as_bytes())?;
        self.saved_watermark = low;
        Ok(())
    }

    /// The JSON of record `rec`, or `None` if it does not exist (dropped,
    /// or lost to a torn write).
    pub fn read(&mut self, rec: u64) -> io::Result<Option<Arc<str>>> {
        if rec >= self.next_rec || self.segments.front().map_or(true, |s| rec < s.base) {
            // Not yet written, or dropped / released.
            return Ok(None);
        }
        if let Some(&(first, _)) = self.recent.front() {
            if rec >= first {
                let idx = (rec - first) as usize;
                return Ok(self.recent.get(idx).map(|(_, j)| j.clone()));
            }
        }
        if rec >= self.written_end {
            return Ok(None);
        }
        let Some(seg) = self
            .segments
            .iter()
            .find(|s| s.base <= rec && rec < s.end())
            .cloned()
        else {
            return Ok(None);
        };
        let reusable = self
            .cursor
            .as_ref()
            .is_some_and(|c| c.base == seg.base && c.rec <= rec);
        if !reusable {
            let f = File::open(self.dir.segment_file(seg.base))?;
            self.cursor = Some(Cursor {
                base: seg.base,
                rec: seg.base,
                reader: BufReader::with_capacity(64 * 1024, f),
            });
        }
        let Some(c) = self.cursor.as_mut() else {
            return Ok(None);
        };
        let mut line = Vec::new();
        while c.rec <= rec {
            line.clear();
            let n = c.reader.read_until(b'\n', &mut line)?;
            if n == 0 || line.last() != Some(&b'\n') {
                self.cursor = None;
                return Ok(None);
            }
            c.rec += 1;
        }
        line.pop();
        Ok(String::from_utf8(line).ok().map(Arc::from))
    }
}

impl Spool {
    /// Like [`Spool::read`] but without moving the sequential backlog
    /// reader (used for the occasional status lookup).
    pub fn peek(&mut self, rec: u64) -> io::Result<Option<Arc<str>>> {
        let saved = self.cursor.take();
        let out = self.read(rec);
        self.cursor = saved;
        out
    }
}

fn read_watermark(dir: &StateDir) -> u64 {
    fs::read_to_string(dir.watermark_file())
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Counts complete lines and cuts a torn tail.
fn recover_segment(path: &Path) -> io::Result<(u64, u64)> {
    let mut f = OpenOptions::new().read(true).write(true).open(path)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let complete = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if complete < buf.len() {
        log::warn!(
            "spool: cutting a torn record of {} bytes at the end of {}",
            buf.len() - complete,
            path.display()
        );
        f.set_len(complete as u64)?;
        f.sync_all()?;
    }
    let count = buf[..complete].iter().filter(|b| **b == b'\n').count() as u64;
    Ok((count, complete as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u64) -> String {
        format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(40))
    }

    fn fill(s: &mut Spool, from: u64, to: u64) {
        for i in from..to {
            let (r, _) = s.append(&rec(i)).unwrap();
            assert_eq!(r, i);
        }
    }

    #[test]
    fn append_flush_reopen_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        fill(&mut s, 0, 100);
        assert_eq!(s.read(42).unwrap().as_deref(), Some(rec(42).as_str()));
        s.flush().unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.next_rec(), 100);
        assert_eq!(s.acked_below(), 0);
        for i in [0, 1, 57, 99, 3] {
            assert_eq!(s.read(i).unwrap().as_deref(), Some(rec(i).as_str()), "{i}");
        }
        assert_eq!(s.read(100).unwrap(), None);
    }

    #[test]
    fn unflushed_records_are_lost_on_crash_but_numbering_continues() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        fill(&mut s, 0, 10);
        s.flush().unwrap();
        fill(&mut s, 10, 15);
        s._lock = None; // the kernel drops a killed process's flock
        std::mem::forget(s); // "SIGKILL": the buffer is never written
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.next_rec(), 10);
    }

    #[test]
    fn torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        fill(&mut s, 0, 3);
        s.flush().unwrap();
        drop(s);
        let path = StateDir::new(dir.path()).segment_file(0);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"n\":3,\"pa").unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.next_rec(), 3);
        fill(&mut s, 3, 5);
        s.flush().unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.read(4).unwrap().as_deref(), Some(rec(4).as_str()));
    }

    #[test]
    fn segments_rotate_and_are_released_by_acks() {
        let dir = tempfile::tempdir().unwrap();
        // 64 KiB bound → 8 KiB segments → ~150 records each.
        let mut s = Spool::open(dir.path(), 64 * 1024).unwrap();
        fill(&mut s, 0, 400);
        s.flush().unwrap();
        assert!(s.segment_count() >= 3, "{}", s.segment_count());
        let files = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().ends_with(".seg")
            })
            .count();
        assert_eq!(files, s.segment_count());
        // Besides the segments: only the lock file.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), files + 1);
        assert!(dir.path().join("lock").exists());
        s.release_below(399).unwrap();
        assert_eq!(s.segment_count(), 1);
        s.persist_watermark(399).unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), 64 * 1024).unwrap();
        assert_eq!(s.acked_below(), 399);
        assert_eq!(s.read(399).unwrap().as_deref(), Some(rec(399).as_str()));
        fill(&mut s, 400, 401);
    }

    #[test]
    fn all_acked_and_deleted_keeps_numbering() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        fill(&mut s, 0, 5);
        s.flush().unwrap();
        s.persist_watermark(5).unwrap();
        drop(s);
        fs::remove_file(StateDir::new(dir.path()).segment_file(0)).unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((s.next_rec(), s.acked_below()), (5, 5));
        fill(&mut s, 5, 6);
    }

    #[test]
    fn bound_drops_oldest_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 64 * 1024).unwrap();
        let mut dropped_below = 0;
        for i in 0..3000 {
            let (_, d) = s.append(&rec(i)).unwrap();
            if let Some(d) = d {
                dropped_below = d;
            }
            if i % 100 == 0 {
                s.flush().unwrap();
            }
        }
        s.flush().unwrap();
        assert!(s.total_bytes() <= 64 * 1024);
        assert!(dropped_below > 1500, "{dropped_below}");
        assert_eq!(s.read(dropped_below - 1).unwrap(), None);
        assert!(s.read(2999).unwrap().is_some());
        let on_disk: u64 = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(on_disk <= 64 * 1024, "{on_disk}");
    }

    #[test]
    fn backlog_reads_sequentially_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        fill(&mut s, 0, 6000 + RECENT_RECORDS as u64);
        s.flush().unwrap();
        assert!(s.segment_count() > 2);
        let mut s = {
            drop(s);
            Spool::open(dir.path(), 1 << 20).unwrap()
        };
        for i in 0..6000 {
            assert_eq!(s.read(i).unwrap().as_deref(), Some(rec(i).as_str()));
        }
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

    #[test]
    fn deleting_segments_fsyncs_the_directory_on_the_next_flush() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 64 * 1024).unwrap();
        fill(&mut s, 0, 400);
        s.flush().unwrap();
        assert!(s.segment_count() > 2);
        let before = s.segment_count();
        s.release_below(s.next_rec()).unwrap();
        assert!(s.segment_count() < before);
        // The tail's file plus the directory.
        let files = s.flush().unwrap();
        assert_eq!(files.len(), 2);
        assert!(files.iter().any(|f| f.metadata().unwrap().is_dir()));
        crate::outbox::sync_files(files).unwrap();
        // Nothing deleted since: only the tail.
        assert_eq!(s.flush().unwrap().len(), 1);
    }
}
