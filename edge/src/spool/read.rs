//! Reading records back: from memory for recent ones, else through the
//! sequential backlog [`Cursor`] over the segment files, with the retries
//! and give-ups of [`READ_TRIES`]; and the newest records at start.

use std::fs::File;
use std::io;
use std::sync::Arc;

use super::cursor::{Cursor, READ_TRIES};
use super::{record, Slot, Spool};

impl Spool {
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

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;

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
}
