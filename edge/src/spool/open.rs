//! Opening a spool: recovery of the segment files at start (torn lines
//! cut, empty, overlapping and unreadable files removed or set aside, gaps
//! reported) and the ack watermark the numbering continues from.

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::io;
use std::path::Path;

use super::cursor::Cursor;
use super::watermark::{read_watermark, Watermark};
use super::{record, Segment, Spool, MAX_SEGMENT_BYTES, UNWRITTEN_MAX_BYTES, UNWRITTEN_MIN_BYTES};
use crate::state_dir::{DirLock, StateDir};

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

/// The segment files found at open, and the done ranges in them.
struct Recovered {
    /// Segments kept, oldest first.
    segments: VecDeque<Segment>,
    /// Done ranges of the kept segments, in file order.
    done_ranges: Vec<(u64, u64)>,
}

impl Spool {
    /// Like [`Spool::open`], with the directory already locked by the caller.
    pub fn open_locked(lock: DirLock, max_bytes: u64) -> io::Result<Spool> {
        let dir = lock.dir().clone();
        let watermark = read_watermark(&dir);
        let Recovered {
            segments,
            done_ranges,
        } = recover_segments(&dir)?;
        warn_gaps(&segments);
        let files_end = segments.back().map_or(0, |s| s.end);
        let first = segments.front().map_or(files_end, |s| s.base);
        let start = watermark_or_first(&dir, watermark, first);
        let acked_below = continue_with_done(start, &done_ranges);
        let mut spool = Spool::recovered(lock, max_bytes, segments, watermark, acked_below);
        if !matches!(watermark, Watermark::Valid(_)) {
            // From now on a segment file lost below the first one is told
            // apart from one deleted after its acks.
            if let Err(e) = spool.write_watermark(acked_below) {
                log::warn!("spool: cannot save the ack watermark: {e}");
            }
        }
        Ok(spool)
    }

    /// The spool over the recovered `segments`, numbering from the last
    /// record in them or from `acked_below`, whichever is higher.
    fn recovered(
        lock: DirLock,
        max_bytes: u64,
        segments: VecDeque<Segment>,
        watermark: Watermark,
        acked_below: u64,
    ) -> Spool {
        let files_end = segments.back().map_or(0, |s| s.end);
        let next_rec = files_end.max(acked_below);
        // With no file left, the next one starts where the numbering is.
        let disk_end = if segments.is_empty() {
            next_rec
        } else {
            files_end
        };
        let saved_watermark = match watermark {
            Watermark::Valid(w) => w,
            _ => 0,
        };
        Spool {
            dir: lock.dir().clone(),
            max_bytes,
            segment_bytes: (max_bytes / 8).clamp(4096, MAX_SEGMENT_BYTES),
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
            lines_written: 0,
            write_failing: false,
            cursor: None,
            open_failure: None,
            to_sync: Vec::new(),
            acked_below,
            saved_watermark,
            dir_dirty: false,
            _lock: Some(lock),
        }
    }
}

/// Scans the segment files in `dir` in record order and keeps the good
/// ones; the others are removed or set aside (see [`recover_segment`]).
fn recover_segments(dir: &StateDir) -> io::Result<Recovered> {
    let mut bases = dir.segment_bases()?;
    bases.sort_unstable();
    let mut found = Recovered {
        segments: VecDeque::new(),
        done_ranges: Vec::new(),
    };
    for base in bases {
        let prev_end = found.segments.back().map_or(0, |s| s.end);
        if let Some((segment, done)) = recover_segment(dir, base, prev_end) {
            found.done_ranges.extend(done);
            found.segments.push_back(segment);
        }
    }
    Ok(found)
}

/// Scans the segment file starting at `base` (the previous one ends at
/// `prev_end`). Returns it with its done ranges if it is kept; a file that
/// overlaps the previous one or is empty is removed, one that cannot be
/// read is renamed to `….seg.unreadable`, each with a log line.
fn recover_segment(dir: &StateDir, base: u64, prev_end: u64) -> Option<(Segment, Vec<(u64, u64)>)> {
    let path = dir.segment_file(base);
    let scanned = scan(&path, base);
    match scanned {
        Ok(Scan { end: Some(end), .. }) if base < prev_end => {
            log::warn!(
                "spool: removing segment {} at open: it overlaps the previous one ({} records)",
                path.display(),
                end - base
            );
            let _ = fs::remove_file(&path);
            None
        }
        Ok(Scan {
            end: Some(end),
            bytes,
            lines,
            unreadable_blocks,
            done,
        }) => {
            if unreadable_blocks > 0 {
                log::error!(
                    "spool: {} has {unreadable_blocks} unreadable blocks; the readings in them are counted as lost when reached",
                    path.display()
                );
            }
            log::debug!("spool: segment {base}: {lines} records up to {end}");
            Some((Segment { base, end, bytes }, done))
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
            None
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
            None
        }
    }
}

/// Logs the records missing between consecutive segments (a segment file
/// is lost); they are counted as lost when reached.
fn warn_gaps(segments: &VecDeque<Segment>) {
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
}

/// Where the acks stood at the last stop: the saved watermark, or without
/// a usable one the first record on disk (`first`).
fn watermark_or_first(dir: &StateDir, watermark: Watermark, first: u64) -> u64 {
    match watermark {
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
    }
}

/// Done ranges that continue the watermark `low` move it: their records
/// were acked before they were written.
fn continue_with_done(low: u64, done_ranges: &[(u64, u64)]) -> u64 {
    done_ranges.iter().fold(
        low,
        |low, &(from, to)| {
            if from <= low {
                low.max(to)
            } else {
                low
            }
        },
    )
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
    use super::super::tests::*;
    use super::super::*;
    use super::*;
    use std::io::Write;

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
