//! The write path: a flush writes the unwritten records that are not done
//! in one `write` per segment (done ranges in front of records after
//! skipped ones), opens and rotates segment files, and hands back the
//! files to fsync.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};

use super::{record, Segment, Spool};

/// Lines encoded for one `write` to the tail segment.
struct Batch {
    /// The bytes to write.
    buf: Vec<u8>,
    /// What the file describes after `buf`.
    described: u64,
    /// Unwritten bytes `buf` settles (written or skipped).
    settled: u64,
    /// Record lines in `buf`.
    lines: u64,
    /// First record after the batch.
    next: u64,
}

impl Spool {
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
    pub(super) fn write_unwritten(&mut self, is_done: &dyn Fn(u64) -> bool) -> io::Result<()> {
        let result = self.try_write_unwritten(is_done);
        self.write_failing = result.is_err();
        self.trim_recent();
        result
    }

    /// Forgets the unwritten records that became done (acked or rejected)
    /// at the front of the memory queue, without writing anything: they
    /// need no bytes on the card, and a flush may be far away (a sync is
    /// due only for readings not acked in time). The next flush starts
    /// with a done range for them. Without this, only a flush would let go
    /// of them: while the hub acks every reading in time the queue and its
    /// byte count (which the bounds see) would grow for good, and after a
    /// failed write the records would count as waiting in memory.
    pub fn settle(&mut self, is_done: &dyn Fn(u64) -> bool) {
        self.skip_done(is_done);
        self.trim_recent();
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
            self.ensure_tail()?;
            let seg_bytes = self.segments.back().map_or(0, |s| s.bytes);
            let batch = self.encode_batch(is_done, seg_bytes);
            if batch.lines == 0 {
                return Err(io::Error::other(
                    "spool: unwritten records missing from memory",
                ));
            }
            self.write_batch(batch, seg_bytes)?;
        }
    }

    /// Makes sure a tail segment can be appended to at `disk_end`. After a
    /// failed write the tail handle is closed: the next write starts a new
    /// segment (an empty one is started again).
    fn ensure_tail(&mut self) -> io::Result<()> {
        let appendable = match (self.tail_base, self.segments.back(), &self.tail) {
            (Some(b), Some(s), Some(_)) => {
                s.base == b && s.end == self.disk_end && s.bytes < self.segment_bytes
            }
            _ => false,
        };
        if appendable {
            Ok(())
        } else {
            self.start_segment()
        }
    }

    /// Encodes the unwritten records from `written_end` that fit in the
    /// tail segment (holding `seg_bytes`; at least one line), skipping done
    /// ones; stops at the first record missing from memory.
    fn encode_batch(&self, is_done: &dyn Fn(u64) -> bool, seg_bytes: u64) -> Batch {
        let mut b = Batch {
            buf: Vec::new(),
            described: self.disk_end,
            settled: 0,
            lines: 0,
            next: self.written_end,
        };
        while b.next < self.next_rec {
            let rec = b.next;
            let Some(json) = self.recent_json(rec) else {
                break;
            };
            let len = record::encoded_len(rec, &json);
            if is_done(rec) {
                b.settled += len;
                b.next += 1;
                continue;
            }
            let mut line = Vec::with_capacity(len as usize + 48);
            if rec > b.described {
                record::encode_done(b.described, rec, &mut line);
            }
            record::encode(rec, &json, &mut line);
            if b.lines > 0 && seg_bytes + (b.buf.len() + line.len()) as u64 > self.segment_bytes {
                break;
            }
            b.buf.extend_from_slice(&line);
            b.settled += len;
            b.lines += 1;
            b.next += 1;
            b.described = b.next;
        }
        b
    }

    /// Appends `batch` to the tail segment (holding `seg_bytes`) and moves
    /// the bookkeeping past it. On failure the file is cut back to
    /// `seg_bytes` so that every line stays whole, and the tail handle is
    /// closed (the next try opens the file again).
    fn write_batch(&mut self, batch: Batch, seg_bytes: u64) -> io::Result<()> {
        if let Some(f) = self.tail.as_mut() {
            if let Err(e) = f.write_all(&batch.buf) {
                let _ = f.set_len(seg_bytes);
                self.tail = None;
                self.tail_base = None;
                return Err(e);
            }
            self.tail_dirty = true;
        }
        if let Some(s) = self.segments.back_mut() {
            s.end = batch.described;
            s.bytes += batch.buf.len() as u64;
        }
        self.disk_end = batch.described;
        self.written_end = batch.next;
        self.lines_written += batch.lines;
        self.unwritten_bytes = self.unwritten_bytes.saturating_sub(batch.settled);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;
    use std::fs;

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
    fn done_records_leave_memory_without_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        // Streaming with no flush at all (none is due): each record is
        // done a moment after it is appended. Memory and the byte count
        // the bounds see stay flat, and nothing touches the card.
        for i in 0..3 * RECENT_RECORDS as u64 {
            fill(&mut s, i, i + 1);
            s.settle(&|r| r <= i);
        }
        assert_eq!(s.unwritten(), 0);
        assert_eq!(s.total_bytes(), 0);
        assert!(s.recent.len() <= RECENT_RECORDS, "{}", s.recent.len());
        assert_eq!(seg_files(dir.path()), 0);
        // A record not done stays; the next flush writes it behind a done
        // range for the ones let go.
        let n = s.next_rec();
        fill(&mut s, n, n + 2);
        s.settle(&|r| r < n);
        assert_eq!(s.unwritten(), 2);
        s.flush(&|r| r < n).unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.acked_below(), n);
        assert_eq!(get(&mut s, n), Some(rec(n)));
        assert_eq!(get(&mut s, n + 1), Some(rec(n + 1)));
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
}
