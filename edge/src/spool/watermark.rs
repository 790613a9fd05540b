//! The ack watermark file (`acked`): every record below it is done. Read
//! at open, saved before segments are deleted and, when acks of records on
//! disk moved it, periodically.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;

use super::{record, Spool};
use crate::state_dir::StateDir;

impl Spool {
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

    pub(super) fn write_watermark(&mut self, low: u64) -> io::Result<()> {
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
}

/// What the `acked` file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Watermark {
    /// No file (a new spool).
    Absent,
    /// A checksum mismatch or garbage.
    Damaged,
    /// Every record below this is done.
    Valid(u64),
}

/// Reads the `acked` file.
pub(super) fn read_watermark(dir: &StateDir) -> Watermark {
    match fs::read(dir.watermark_file()) {
        Ok(bytes) => record::decode_watermark(&bytes).map_or(Watermark::Damaged, Watermark::Valid),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Watermark::Absent,
        Err(_) => Watermark::Damaged,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;
    use super::*;

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
}
