//! What leaves the spool: segments released once every record in them is
//! done, and the oldest readings the bounds drop — `spool_max_bytes`, and
//! the memory queue while the card cannot be written (oldest segment file
//! first, then the oldest readings in memory).

use std::collections::VecDeque;
use std::fs;
use std::io;

use super::{record, DropCause, Dropped, Segment, Spool};

impl Spool {
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

    /// The memory queue is over its bound while writes fail: drop the
    /// oldest readings (see the module docs).
    pub(super) fn overflow(&mut self, dropped: &mut Vec<Dropped>) {
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
    pub(super) fn drop_segment(&mut self) -> Option<u64> {
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

    pub(super) fn delete_segment(&mut self, seg: &Segment) {
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
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;
    use super::*;

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
}
