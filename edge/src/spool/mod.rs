//! The on-disk spool behind the outbox, designed for SD cards.
//!
//! - Readings are records: one line each in segment files
//!   `NNNNNNNNNNNNNNNNNNNN.seg` in `spool_dir` (named by
//!   [`StateDir::segment_file`]), where the number is the record number of
//!   the segment's first line. Record numbers are dense and keep
//!   increasing across restarts, so a record's number is its identity. The
//!   line formats (a CRC-32 and the record number on every line; plain
//!   lines of older edges are still read) are in [`record`].
//! - Appends go to memory; [`Spool::flush`] (every
//!   `spool_sync_interval_ms`, 1 s by default) writes what is new in one
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
//!   "lost".
//! - **When a write fails** (disk full, card errors) the readings stay in
//!   memory and every flush tries again; nothing else waits for it. Acked
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
//!   change what the files say (acks of records that are on disk), at most
//!   every 10 s; so a restart resends at most what was acked since the last
//!   save (harmless: the hub stores each (epoch, seq) once), records
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

pub mod cursor;
pub mod record;

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::state_dir::{DirLock, StateDir};
use cursor::{Cursor, READ_TRIES};

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

/// What [`scan`] found in a segment file.
struct Scan {
    /// One past its last record, `None` if it holds none.
    end: Option<u64>,
    /// Bytes of complete lines.
    bytes: u64,
    /// Lines in it.
    lines: u64,
    /// Blocks that could not be read.
    unreadable_blocks: u64,
    /// Its done ranges, in file order.
    done: Vec<(u64, u64)>,
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
        let mut segments: VecDeque<Segment> = VecDeque::new();
        let mut done_ranges = Vec::new();
        for base in bases {
            let path = dir.segment_file(base);
            let scanned = scan(&path, base);
            let prev_end = segments.back().map_or(0, |s| s.end);
            match scanned {
                Ok(Scan { end: Some(end), .. }) if base < prev_end => {
                    log::warn!(
                        "spool: removing segment {} at open: it overlaps the previous one ({} records)",
                        path.display(),
                        end - base
                    );
                    let _ = fs::remove_file(&path);
                }
                Ok(Scan {
                    end: Some(end),
                    bytes,
                    lines,
                    unreadable_blocks,
                    done,
                }) => {
                    done_ranges.extend(done);
                    if unreadable_blocks > 0 {
                        log::error!(
                            "spool: {} has {unreadable_blocks} unreadable blocks; the readings in them are counted as lost when reached",
                            path.display()
                        );
                    }
                    log::debug!("spool: segment {base}: {lines} records up to {end}");
                    segments.push_back(Segment { base, end, bytes });
                }
                Ok(Scan {
                    end: None,
                    unreadable_blocks: 0,
                    ..
                }) => {
                    log::info!(
                        "spool: removing the empty segment file {} at open",
                        path.display()
                    );
                    let _ = fs::remove_file(&path);
                }
                Ok(Scan { end: None, .. }) | Err(_) => {
                    let why = scanned
                        .err()
                        .map_or("no readable record".into(), |e| e.to_string());
                    let aside = dir.unreadable_segment_file(base);
                    log::error!(
                        "spool: segment file {} cannot be read ({why}): moved to {}; its readings are counted as lost",
                        path.display(),
                        aside.display()
                    );
                    let _ = fs::rename(&path, &aside);
                }
            }
        }
        for pair in segments.iter().zip(segments.iter().skip(1)) {
            if pair.0.end < pair.1.base {
                log::warn!(
                    "spool: records {}..{} are missing (a segment file is lost): {} readings will be counted as lost",
                    pair.0.end,
                    pair.1.base,
                    pair.1.base - pair.0.end
                );
            }
        }
        let files_end = segments.back().map_or(0, |s| s.end);
        let first = segments.front().map_or(files_end, |s| s.base);
        let watermark_or_first = match watermark {
            Watermark::Valid(w) => {
                if w < first {
                    log::warn!(
                        "spool: records {w}..{first} are missing (the oldest segment file is lost): {} readings will be counted as lost",
                        first - w
                    );
                }
                w
            }
            Watermark::Absent => first,
            Watermark::Damaged => {
                log::warn!(
                    "spool: the ack watermark {} is damaged: ignored; readings acked before the last stop may be sent again (the hub stores them once)",
                    dir.watermark_file().display()
                );
                first
            }
        };
        // Done ranges that continue the watermark move it: their records
        // were acked before they were written.
        let acked_below = done_ranges
            .iter()
            .fold(watermark_or_first, |low, &(from, to)| {
                if from <= low {
                    low.max(to)
                } else {
                    low
                }
            });
        let next_rec = files_end.max(acked_below);
        // With no file left, the next one starts where the numbering is.
        let disk_end = if segments.is_empty() {
            next_rec
        } else {
            files_end
        };
        let segment_bytes = (max_bytes / 8).clamp(4096, MAX_SEGMENT_BYTES);
        let saved_watermark = match watermark {
            Watermark::Valid(w) => w,
            _ => 0,
        };
        let mut spool = Spool {
            dir,
            max_bytes,
            segment_bytes,
            unwritten_max: (max_bytes / 4).clamp(UNWRITTEN_MIN_BYTES, UNWRITTEN_MAX_BYTES),
            segments,
            tail: None,
            tail_base: None,
            written_end: next_rec,
            disk_end,
            tail_dirty: false,
            next_rec,
            recent: VecDeque::new(),
            unwritten_bytes: 0,
            write_failing: false,
            cursor: None,
            open_failure: None,
            to_sync: Vec::new(),
            acked_below,
            saved_watermark,
            dir_dirty: false,
            _lock: Some(lock),
        };
        if !matches!(watermark, Watermark::Valid(_)) {
            // From now on a segment file lost below the first one is told
            // apart from one deleted after its acks.
            if let Err(e) = spool.write_watermark(acked_below) {
                log::warn!("spool: cannot save the ack watermark: {e}");
            }
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

    /// The last write failed (disk full, card errors); the unwritten
    /// readings wait in memory.
    pub fn write_failing(&self) -> bool {
        self.write_failing
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

    /// The memory queue is over its bound while writes fail: drop the
    /// oldest readings (see the module docs).
    fn overflow(&mut self, dropped: &mut Vec<Dropped>) {
        while self.unwritten_bytes > self.unwritten_max {
            if let Some(below) = self.drop_segment() {
                dropped.push(Dropped {
                    below,
                    cause: DropCause::DiskFull,
                });
                if self.write_unwritten(&|_| false).is_ok() {
                    return;
                }
            } else {
                let keep = self.unwritten_max.saturating_sub(self.segment_bytes);
                if let Some(below) = self.drop_unwritten(keep) {
                    dropped.push(Dropped {
                        below,
                        cause: DropCause::DiskFull,
                    });
                }
                return;
            }
        }
    }

    /// Deletes the oldest segment file; returns the end of what it held.
    fn drop_segment(&mut self) -> Option<u64> {
        // Only a segment with records frees anything (an empty one can only
        // be the last, left by a failed write).
        let seg = self.segments.front().filter(|s| s.end > s.base)?.clone();
        // The watermark first: a restart must not take the lost records for
        // missing ones. Best effort (it needs no new space).
        let _ = self.persist_watermark(seg.end);
        self.segments.pop_front();
        self.delete_segment(&seg);
        self.acked_below = self.acked_below.max(seg.end);
        while self.recent.front().is_some_and(|(r, _)| *r < seg.end) {
            self.recent.pop_front();
        }
        Some(seg.end)
    }

    /// Drops the oldest unwritten records until at most `keep` bytes of
    /// them are left. Only when no segment file is left (so the spool stays
    /// a contiguous range of records). Returns the new first record.
    fn drop_unwritten(&mut self, keep: u64) -> Option<u64> {
        if self.segments.iter().any(|s| s.end > s.base) || self.written_end == self.next_rec {
            return None;
        }
        // An empty segment left by a failed write starts where the dropped
        // records were: it goes too.
        while let Some(empty) = self.segments.pop_front() {
            self.delete_segment(&empty);
        }
        let mut below = self.written_end;
        while self.unwritten_bytes > keep && below < self.next_rec {
            if let Some(json) = self.recent_json(below) {
                self.unwritten_bytes -= record::encoded_len(below, &json);
            }
            below += 1;
        }
        while self.recent.front().is_some_and(|(r, _)| *r < below) {
            self.recent.pop_front();
        }
        let _ = self.persist_watermark(below);
        self.written_end = below;
        self.acked_below = self.acked_below.max(below);
        Some(below)
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

    fn delete_segment(&mut self, seg: &Segment) {
        if self.cursor.as_ref().is_some_and(|c| c.base == seg.base) {
            self.cursor = None;
        }
        if self.tail_base == Some(seg.base) {
            self.tail = None;
            self.tail_base = None;
        }
        match fs::remove_file(self.dir.segment_file(seg.base)) {
            Ok(()) => self.dir_dirty = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("spool: cannot delete segment {}: {e}", seg.base),
        }
    }

    /// Opens a new segment file: it continues the numbering of the last
    /// one at `disk_end`, or with no file left starts at the first record
    /// to write.
    fn start_segment(&mut self) -> io::Result<()> {
        if let Some(f) = self.tail.take() {
            if std::mem::take(&mut self.tail_dirty) {
                self.to_sync.push(f);
            }
        }
        self.tail_base = None;
        if self
            .segments
            .back()
            .is_some_and(|s| s.base == self.disk_end && s.end == self.disk_end)
        {
            // An empty segment left by a failed write: start it again.
            self.segments.pop_back();
        }
        if self.segments.is_empty() {
            // No file left: the new one starts at the saved watermark, so
            // that what was skipped since is told done, not lost.
            self.disk_end = self.saved_watermark.min(self.written_end);
        }
        let base = self.disk_end;
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(self.dir.segment_file(base))?;
        // Make the new directory entry durable with the data.
        if let Ok(d) = File::open(self.dir.path()) {
            self.to_sync.push(d);
        }
        self.segments.push_back(Segment {
            base,
            end: base,
            bytes: 0,
        });
        self.tail = Some(f);
        self.tail_base = Some(base);
        Ok(())
    }

    /// Writes every unwritten record that is not done (one `write` per
    /// segment); done ones are skipped (see the module docs). On failure
    /// the file is cut back to its last complete line and the records stay
    /// in memory.
    fn write_unwritten(&mut self, is_done: &dyn Fn(u64) -> bool) -> io::Result<()> {
        let result = self.try_write_unwritten(is_done);
        self.write_failing = result.is_err();
        self.trim_recent();
        result
    }

    /// Moves `written_end` past the done records at its place (they need
    /// no bytes on the card).
    fn skip_done(&mut self, is_done: &dyn Fn(u64) -> bool) {
        while self.written_end < self.next_rec && is_done(self.written_end) {
            if let Some(json) = self.recent_json(self.written_end) {
                self.unwritten_bytes = self
                    .unwritten_bytes
                    .saturating_sub(record::encoded_len(self.written_end, &json));
            }
            self.written_end += 1;
        }
    }

    fn try_write_unwritten(&mut self, is_done: &dyn Fn(u64) -> bool) -> io::Result<()> {
        loop {
            self.skip_done(is_done);
            if self.written_end >= self.next_rec {
                return Ok(());
            }
            // After a failed write the tail handle is closed: the next
            // write starts a new segment (an empty one is started again).
            let appendable = match (self.tail_base, self.segments.back(), &self.tail) {
                (Some(b), Some(s), Some(_)) => {
                    s.base == b && s.end == self.disk_end && s.bytes < self.segment_bytes
                }
                _ => false,
            };
            if !appendable {
                self.start_segment()?;
            }
            let seg_bytes = self.segments.back().map_or(0, |s| s.bytes);
            let mut buf = Vec::new();
            // What the file describes after `buf`, and the unwritten bytes
            // `buf` settles (written or skipped).
            let mut described = self.disk_end;
            let mut settled = 0u64;
            let mut lines = 0u64;
            let mut rec = self.written_end;
            while rec < self.next_rec {
                let Some(json) = self.recent_json(rec) else {
                    break;
                };
                let len = record::encoded_len(rec, &json);
                if is_done(rec) {
                    settled += len;
                    rec += 1;
                    continue;
                }
                let mut line = Vec::with_capacity(len as usize + 48);
                if rec > described {
                    record::encode_done(described, rec, &mut line);
                }
                record::encode(rec, &json, &mut line);
                if lines > 0 && seg_bytes + (buf.len() + line.len()) as u64 > self.segment_bytes {
                    break;
                }
                buf.extend_from_slice(&line);
                settled += len;
                lines += 1;
                rec += 1;
                described = rec;
            }
            if lines == 0 {
                return Err(io::Error::other(
                    "spool: unwritten records missing from memory",
                ));
            }
            if let Some(f) = self.tail.as_mut() {
                if let Err(e) = f.write_all(&buf) {
                    // Undo a partial write so that every line stays whole;
                    // the next try opens the file again.
                    let _ = f.set_len(seg_bytes);
                    self.tail = None;
                    self.tail_base = None;
                    return Err(e);
                }
                self.tail_dirty = true;
            }
            if let Some(s) = self.segments.back_mut() {
                s.end = described;
                s.bytes += buf.len() as u64;
            }
            self.disk_end = described;
            self.written_end = rec;
            self.unwritten_bytes = self.unwritten_bytes.saturating_sub(settled);
        }
    }

    /// Writes the unwritten records that are not done (`is_done` tells) and
    /// returns the files to fsync (outside the caller's lock): only those
    /// written to (and the directory after creations or deletions), so a
    /// flush with nothing new costs no sync. When the write fails the
    /// records stay in memory, and what was written before waits for the
    /// next successful flush.
    pub fn flush(&mut self, is_done: &dyn Fn(u64) -> bool) -> io::Result<Vec<File>> {
        self.write_unwritten(is_done)?;
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
        if self.tail_dirty {
            if let Some(f) = self.tail.as_ref() {
                files.push(f.try_clone()?);
            }
            self.tail_dirty = false;
        }
        Ok(files)
    }

    /// Record `rec` is served from memory (reading it never touches the
    /// card).
    pub fn in_memory(&self, rec: u64) -> bool {
        self.recent.front().is_some_and(|(first, _)| rec >= *first)
    }

    /// Deletes segments whose every record is below `low` (done), but not
    /// the last one (appended to). Needs no free space: it works while the
    /// card is full.
    pub fn release_below(&mut self, low: u64) {
        let deletable =
            |s: &VecDeque<Segment>| s.len() > 1 && s.front().is_some_and(|f| f.end <= low);
        if deletable(&self.segments) {
            // The watermark first (see `drop_segment`).
            let _ = self.persist_watermark(low);
        }
        while deletable(&self.segments) {
            if let Some(old) = self.segments.pop_front() {
                self.delete_segment(&old);
            }
        }
        self.acked_below = self.acked_below.max(low);
    }

    /// Saves the ack watermark `low` (every record below it is done) if
    /// that tells the next start something the files do not: records on
    /// disk that were acked since the last save. Records acked before they
    /// were written are not on disk, so a streaming edge never rewrites
    /// the file.
    pub fn save_watermark(&mut self, low: u64) -> io::Result<()> {
        self.persist_watermark(low.min(self.disk_end))
    }

    /// Saves the ack watermark if it moved forward. Overwritten in place
    /// (32 bytes, checksummed, see [`record::encode_watermark`]), without
    /// fsync: losing it only causes harmless resends, and it needs no new
    /// space on a full card.
    pub fn persist_watermark(&mut self, low: u64) -> io::Result<()> {
        if low <= self.saved_watermark {
            return Ok(());
        }
        self.write_watermark(low)
    }

    fn write_watermark(&mut self, low: u64) -> io::Result<()> {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.dir.watermark_file())?;
        let content = record::encode_watermark(low);
        f.write_all_at(&content, 0)?;
        if f.metadata()?.len() > content.len() as u64 {
            // Whatever followed (garbage) would make it unreadable.
            f.set_len(content.len() as u64)?;
        }
        self.saved_watermark = low;
        Ok(())
    }

    /// The JSON of record `rec`, or why it cannot be had. An I/O error is
    /// returned [`READ_TRIES`] − 1 times for the same spot; then the spot is
    /// given up and reported [`Slot::Lost`].
    pub fn read(&mut self, rec: u64) -> io::Result<Slot> {
        if rec >= self.next_rec {
            return Ok(Slot::Lost("not in the spool"));
        }
        if self.in_memory(rec) {
            let floor = self.segments.front().map_or(self.written_end, |s| s.base);
            if rec < floor {
                // Kept in memory after its segment was dropped or released.
                return Ok(Slot::Lost("dropped from the spool"));
            }
            return Ok(self
                .recent_json(rec)
                .map_or(Slot::Lost("not in the spool"), Slot::Record));
        }
        let Some(seg) = self
            .segments
            .iter()
            .find(|s| s.base <= rec && rec < s.end)
            .cloned()
        else {
            return Ok(Slot::Lost("its segment file is missing"));
        };
        let reusable = self
            .cursor
            .as_ref()
            .is_some_and(|c| c.base == seg.base && c.can_reach(rec));
        if !reusable {
            if self
                .open_failure
                .is_some_and(|(b, n)| b == seg.base && n >= READ_TRIES)
            {
                return Ok(Slot::Lost("its segment file cannot be opened"));
            }
            match File::open(self.dir.segment_file(seg.base)) {
                Ok(f) => {
                    self.open_failure = None;
                    self.cursor = Some(Cursor::new(seg.base, f));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Ok(Slot::Lost("its segment file is missing"));
                }
                Err(e) => {
                    let tries = match self.open_failure {
                        Some((b, n)) if b == seg.base => n + 1,
                        _ => 1,
                    };
                    self.open_failure = Some((seg.base, tries));
                    return Err(e);
                }
            }
        }
        match self.cursor.as_mut() {
            Some(c) => c.find(rec),
            None => Ok(Slot::Lost("not in the spool")),
        }
    }

    /// The JSON of at least `min` of the newest records on disk (whole
    /// segments, newest first), fewer if the spool holds fewer. Damaged
    /// lines are left out. Read once at start.
    pub fn newest_records(&self, min: u64) -> Vec<Arc<str>> {
        let mut out = Vec::new();
        for seg in self.segments.iter().rev() {
            let Ok(f) = File::open(self.dir.segment_file(seg.base)) else {
                continue;
            };
            let mut cursor = Cursor::new(seg.base, f);
            loop {
                match cursor.next_line() {
                    Ok(Some(line)) => match record::decode(&line) {
                        record::Line::Checked { json, .. } | record::Line::Plain(json) => {
                            out.push(Arc::from(json));
                        }
                        record::Line::Done { .. } | record::Line::Damaged(_) => {}
                    },
                    Ok(None) => break,
                    // Tried again at once; the cursor gives the block up.
                    Err(_) => continue,
                }
            }
            if out.len() as u64 >= min {
                break;
            }
        }
        out
    }

    /// Like [`Spool::read`] but without moving the sequential backlog
    /// reader (used for the occasional status lookup).
    pub fn peek(&mut self, rec: u64) -> io::Result<Slot> {
        let saved = self.cursor.take();
        let out = self.read(rec);
        self.cursor = saved;
        out
    }
}

/// What the `acked` file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watermark {
    /// No file (a new spool).
    Absent,
    /// A checksum mismatch or garbage.
    Damaged,
    /// Every record below this is done.
    Valid(u64),
}

fn read_watermark(dir: &StateDir) -> Watermark {
    match fs::read(dir.watermark_file()) {
        Ok(bytes) => record::decode_watermark(&bytes).map_or(Watermark::Damaged, Watermark::Valid),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Watermark::Absent,
        Err(_) => Watermark::Damaged,
    }
}

/// Reads a segment file through: its last record, its complete lines;
/// cuts a torn last line.
fn scan(path: &Path, base: u64) -> io::Result<Scan> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let mut cursor = Cursor::new(base, file.try_clone()?);
    let mut end = None;
    let mut lines = 0;
    let mut done = Vec::new();
    loop {
        let line = match cursor.next_line() {
            Ok(Some(line)) => line,
            Ok(None) => break,
            // Retried at once; the cursor gives the block up after a few.
            Err(_) => continue,
        };
        lines += 1;
        let decoded = record::decode(&line);
        if let record::Line::Done { from, to } = decoded {
            done.push((from, to));
        }
        if let Some(rec) = cursor.place(&decoded) {
            end = Some(rec + 1);
        }
    }
    let complete = cursor.consumed_offset();
    let torn = cursor.torn_bytes();
    if torn > 0 {
        log::warn!(
            "spool: cutting a torn record of {torn} bytes at the end of {}",
            path.display()
        );
        file.set_len(complete)?;
        file.sync_all()?;
    }
    Ok(Scan {
        end,
        bytes: complete,
        lines,
        unreadable_blocks: cursor.skipped_blocks(),
        done,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u64) -> String {
        format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(40))
    }

    fn fill(s: &mut Spool, from: u64, to: u64) {
        for i in from..to {
            let (r, _) = s.append(&rec(i));
            assert_eq!(r, i);
        }
    }

    /// The record's JSON, `None` if the spool cannot give it.
    fn get(s: &mut Spool, i: u64) -> Option<String> {
        match s.read(i).unwrap() {
            Slot::Record(j) => Some(j.to_string()),
            Slot::Done | Slot::Lost(_) => None,
        }
    }

    fn seg_files(dir: &Path) -> usize {
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
    fn torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        fill(&mut s, 0, 3);
        s.flush(&|_| false).unwrap();
        drop(s);
        let path = StateDir::new(dir.path()).segment_file(0);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"2 1234abcd 3 {\"n\":3,\"pa").unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.next_rec(), 3);
        fill(&mut s, 3, 5);
        s.flush(&|_| false).unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(get(&mut s, 4), Some(rec(4)));
        assert_eq!(get(&mut s, 2), Some(rec(2)));
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
    fn bound_drops_oldest_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 64 * 1024).unwrap();
        let mut dropped_below = 0;
        for i in 0..3000 {
            let (_, d) = s.append(&rec(i));
            for d in d {
                assert_eq!(d.cause, DropCause::Bound);
                dropped_below = d.below;
            }
            if i % 100 == 0 {
                s.flush(&|_| false).unwrap();
            }
        }
        s.flush(&|_| false).unwrap();
        assert!(s.total_bytes() <= 64 * 1024);
        assert!(dropped_below > 1500, "{dropped_below}");
        assert_eq!(get(&mut s, dropped_below - 1), None);
        assert!(get(&mut s, 2999).is_some());
        let on_disk: u64 = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        // Segments, plus the lock and the 32-byte watermark.
        assert!(on_disk <= 64 * 1024 + 64, "{on_disk}");
    }

    #[test]
    fn backlog_reads_sequentially_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        fill(&mut s, 0, 6000 + RECENT_RECORDS as u64);
        s.flush(&|_| false).unwrap();
        assert!(s.segment_count() > 2);
        let mut s = {
            drop(s);
            Spool::open(dir.path(), 1 << 20).unwrap()
        };
        for i in 0..6000 {
            assert_eq!(get(&mut s, i), Some(rec(i)));
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
        s.flush(&|_| false).unwrap();
        assert!(s.segment_count() > 2);
        let before = s.segment_count();
        s.release_below(s.next_rec());
        assert!(s.segment_count() < before);
        // The directory, not the tail: nothing was written to it since.
        let files = s.flush(&|_| false).unwrap();
        assert_eq!(files.len(), 1);
        assert!(files[0].metadata().unwrap().is_dir());
        crate::outbox::sync_files(&files).unwrap();
        // Nothing deleted or written since: nothing to sync.
        assert!(s.flush(&|_| false).unwrap().is_empty());
        // A new record: only the tail.
        fill(&mut s, 400, 401);
        let files = s.flush(&|_| false).unwrap();
        assert_eq!(files.len(), 1);
        assert!(files[0].metadata().unwrap().is_file());
    }

    #[test]
    fn records_done_before_the_flush_are_not_written_and_told_done() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        // Streaming: every record is acked before the flush. Nothing is
        // written, nothing is synced, no file is created.
        fill(&mut s, 0, 10);
        assert!(s.flush(&|_| true).unwrap().is_empty());
        assert_eq!(seg_files(dir.path()), 0);
        assert_eq!(s.unwritten(), 0);
        assert_eq!(s.total_bytes(), 0);
        // One record still in flight at a flush: it is written, and the
        // done ones before it are a done range in front of it.
        fill(&mut s, 10, 13);
        let files = s.flush(&|r| r != 11).unwrap();
        assert_eq!(files.len(), 2, "the new file and its directory");
        // More acked ones, then two in flight, one done between them.
        fill(&mut s, 13, 20);
        assert_eq!(s.flush(&|r| !(r == 17 || r == 19)).unwrap().len(), 1);
        let text = fs::read_to_string(StateDir::new(dir.path()).segment_file(0)).unwrap();
        let kinds: Vec<&str> = text.lines().map(|l| &l[..1]).collect();
        assert_eq!(kinds, ["D", "2", "D", "2", "D", "2"], "{text}");
        drop(s);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        // The done range from the watermark on moves it.
        assert_eq!(s.acked_below(), 11);
        assert_eq!(s.next_rec(), 20);
        assert_eq!(get(&mut s, 11), Some(rec(11)));
        for done in [12, 13, 16, 18] {
            assert_eq!(s.read(done).unwrap(), Slot::Done, "{done}");
        }
        assert_eq!(get(&mut s, 17), Some(rec(17)));
        assert_eq!(get(&mut s, 19), Some(rec(19)));
    }

    #[test]
    fn a_streaming_spool_never_rewrites_its_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let path = StateDir::new(dir.path()).watermark_file();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        let before = fs::read(&path).unwrap();
        for i in 0..100 {
            fill(&mut s, i, i + 1);
            s.flush(&|_| true).unwrap();
            s.save_watermark(i + 1).unwrap();
        }
        assert_eq!(fs::read(&path).unwrap(), before);
        // Acks of records on disk do change it.
        fill(&mut s, 100, 105);
        s.flush(&|_| false).unwrap();
        s.save_watermark(103).unwrap();
        assert_eq!(
            read_watermark(&StateDir::new(dir.path())),
            Watermark::Valid(103)
        );
        drop(s);
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((s.acked_below(), s.next_rec()), (103, 105));
    }

    /// Makes the segment files with the bases in `bases` links to
    /// `/dev/full`: every write to them fails with ENOSPC, like a full card
    /// (a new segment file's name is the number of its first record).
    fn full_disk_at(dir: &Path, bases: std::ops::Range<u64>) -> Vec<std::path::PathBuf> {
        bases
            .map(|base| {
                let path = StateDir::new(dir).segment_file(base);
                std::os::unix::fs::symlink("/dev/full", &path).unwrap();
                path
            })
            .collect()
    }

    #[test]
    fn a_full_disk_keeps_records_in_memory_until_space_frees() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        fill(&mut s, 0, 10);
        s.flush(&|_| false).unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        // The new process's segment starts at 10: "the card is full".
        let full = full_disk_at(dir.path(), 10..11);
        fill(&mut s, 10, 20);
        assert!(s.flush(&|_| false).is_err());
        assert!(s.write_failing());
        assert_eq!(s.unwritten(), 10);
        for i in 0..20 {
            assert_eq!(get(&mut s, i), Some(rec(i)), "{i}");
        }
        // Still failing, nothing lost, nothing duplicated.
        fill(&mut s, 20, 25);
        assert!(s.flush(&|_| false).is_err());
        assert_eq!(s.unwritten(), 15);
        // Space again.
        fs::remove_file(&full[0]).unwrap();
        s.flush(&|_| false).unwrap();
        assert!(!s.write_failing());
        assert_eq!(s.unwritten(), 0);
        drop(s);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.next_rec(), 25);
        for i in 0..25 {
            assert_eq!(get(&mut s, i), Some(rec(i)), "{i}");
        }
    }

    #[test]
    fn acked_segments_are_released_while_the_disk_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 64 * 1024).unwrap();
        fill(&mut s, 0, 1000);
        s.flush(&|_| false).unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), 64 * 1024).unwrap();
        let before = s.segment_count();
        full_disk_at(dir.path(), 1000..1001);
        fill(&mut s, 1000, 1010);
        assert!(s.flush(&|_| false).is_err());
        s.release_below(1000);
        assert!(s.segment_count() < before);
        assert!(seg_files(dir.path()) < before + 1);
    }

    #[test]
    fn the_memory_queue_is_bounded_and_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        // 256 KiB bound: 64 KiB memory queue, 32 KiB segments.
        let mut s = Spool::open(dir.path(), 256 * 1024).unwrap();
        assert_eq!(s.unwritten_max(), 64 * 1024);
        full_disk_at(dir.path(), 0..3000);
        let mut dropped_below = 0;
        for i in 0..3000 {
            let (_, d) = s.append(&rec(i));
            for d in d {
                assert_eq!(d.cause, DropCause::DiskFull);
                dropped_below = d.below;
            }
            if i % 10 == 0 {
                assert!(s.flush(&|_| false).is_err());
            }
        }
        assert!(dropped_below > 2000, "{dropped_below}");
        assert!(s.total_bytes() <= 64 * 1024, "{}", s.total_bytes());
        // The newest are kept, contiguous.
        assert_eq!(get(&mut s, dropped_below - 1), None);
        for i in dropped_below..3000 {
            assert_eq!(get(&mut s, i), Some(rec(i)), "{i}");
        }
    }

    #[test]
    fn unreadable_and_empty_segment_files_are_handled_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 64 * 1024).unwrap();
        fill(&mut s, 0, 400);
        s.flush(&|_| false).unwrap();
        drop(s);
        let state = StateDir::new(dir.path());
        let mut bases = state.segment_bases().unwrap();
        bases.sort();
        // The second file cannot be read at all; an empty one lies around.
        fs::remove_file(state.segment_file(bases[1])).unwrap();
        fs::create_dir(state.segment_file(bases[1])).unwrap();
        fs::write(state.segment_file(5000), "").unwrap();
        let mut s = Spool::open(dir.path(), 64 * 1024).unwrap();
        assert!(state.unreadable_segment_file(bases[1]).exists());
        assert!(!state.segment_file(5000).exists());
        assert_eq!(s.next_rec(), 400);
        assert_eq!(get(&mut s, bases[1]), None);
        assert_eq!(get(&mut s, bases[1] - 1), Some(rec(bases[1] - 1)));
        assert_eq!(get(&mut s, bases[2]), Some(rec(bases[2])));
    }
}
