//! Where the ceilings are saved: two slot files in the state directory,
//! `energy-ceiling.0` and `energy-ceiling.1`, written in turn.
//!
//! - A write overwrites the slot that does *not* hold the newest values,
//!   in place (`pwrite` at offset 0, then `fdatasync`): no new file, no
//!   rename, no directory sync, no new block once the slot has its size
//!   (so it works on a full card). A write torn by a power cut leaves the
//!   other slot — the values saved before, which bounded every reading
//!   that had left — intact.
//! - A slot is text, checksummed:
//!
//!   ```text
//!   ems-edge energy ceiling
//!   generation 42
//!   main 1234.567
//!   mains-a 88.2
//!   crc 1a2b3c4d
//!   ```
//!
//!   `crc` is the CRC-32 ([`crc32`]) of every byte before its line. The
//!   slot with a valid checksum and the higher generation wins. A shorter
//!   content is padded with newlines to the slot's length (the file never
//!   shrinks, which would be another metadata write).
//! - Both files are created (and the directory fsynced) once, at the first
//!   start; from then on a save costs one 4 KiB page and one `fdatasync`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;

use super::Values;
use crate::spool::record::crc32;
use crate::state_dir::StateDir;

/// First line of a slot.
const HEADER: &str = "ems-edge energy ceiling";

/// What was found at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// No slot holds values (the first start).
    Nothing,
    /// Values of this generation.
    Values(u64),
    /// Slot files with content, none of it valid: the ceilings are lost
    /// (the caller warns; counters continue from their state files).
    Damaged,
}

/// The two slot files (see the module docs).
#[derive(Debug)]
pub struct CeilingFile {
    /// The slots, open for reading and writing.
    slots: [File; 2],
    /// Their lengths.
    lens: [u64; 2],
    /// Generation of the newest valid slot (0: none).
    generation: u64,
    /// The slot the next save goes to.
    next: usize,
    /// The files' paths, for messages.
    name: String,
}

/// A save prepared under the outbox lock and done outside it
/// ([`CeilingWrite::run`]).
#[derive(Debug)]
pub struct CeilingWrite {
    /// The slot's file.
    file: File,
    /// Which slot.
    slot: usize,
    /// Its generation.
    generation: u64,
    /// The bytes, padded to the slot's length.
    bytes: Vec<u8>,
    /// The values it saves.
    pub values: Values,
}

impl CeilingWrite {
    /// Writes the slot and makes it durable.
    pub fn run(&self) -> io::Result<()> {
        self.file.write_all_at(&self.bytes, 0)?;
        self.file.sync_data()
    }
}

impl CeilingFile {
    /// Opens (creating on the first start) the slot files in `dir`; returns
    /// them with the newest saved values.
    pub fn open(dir: &StateDir) -> io::Result<(CeilingFile, Values, Found)> {
        let mut created = false;
        let mut open = |slot: usize| -> io::Result<File> {
            let path = dir.ceiling_file(slot);
            created |= !path.exists();
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
        };
        let slots = [open(0)?, open(1)?];
        if created {
            dir.sync()?;
        }
        let mut lens = [0; 2];
        let mut best: Option<(u64, usize, Values)> = None;
        let mut content = false;
        for (i, f) in slots.iter().enumerate() {
            let mut bytes = Vec::new();
            io::Read::read_to_end(&mut &*f, &mut bytes)?;
            lens[i] = bytes.len() as u64;
            content |= bytes.iter().any(|b| !b.is_ascii_whitespace());
            if let Some((generation, values)) = decode(&bytes) {
                if best.as_ref().map_or(true, |(g, _, _)| generation > *g) {
                    best = Some((generation, i, values));
                }
            }
        }
        let (generation, newest, values, found) = match best {
            Some((g, i, v)) => (g, i, v, Found::Values(g)),
            None if content => (0, 1, Values::new(), Found::Damaged),
            None => (0, 1, Values::new(), Found::Nothing),
        };
        let file = CeilingFile {
            slots,
            lens,
            generation,
            next: 1 - newest,
            name: format!("{} (and .1)", dir.ceiling_file(0).display()),
        };
        Ok((file, values, found))
    }

    /// The files, for messages.
    pub fn describe(&self) -> &str {
        &self.name
    }

    /// Prepares saving `values` in the slot not holding the newest ones.
    pub fn prepare(&self, values: Values) -> io::Result<CeilingWrite> {
        let generation = self.generation + 1;
        let mut bytes = encode(generation, &values);
        let len = self.lens[self.next] as usize;
        if bytes.len() < len {
            bytes.resize(len, b'\n');
        }
        Ok(CeilingWrite {
            file: self.slots[self.next].try_clone()?,
            slot: self.next,
            generation,
            bytes,
            values,
        })
    }

    /// `w` (from [`CeilingFile::prepare`]) was written durably: the next
    /// save goes to the other slot. (After a failed write the same slot is
    /// written again: the other one still holds the newest valid values.)
    pub fn saved(&mut self, w: &CeilingWrite) {
        self.generation = w.generation;
        self.lens[w.slot] = self.lens[w.slot].max(w.bytes.len() as u64);
        self.next = 1 - w.slot;
    }
}

/// A slot's content for `values`.
pub fn encode(generation: u64, values: &Values) -> Vec<u8> {
    let mut text = format!("{HEADER}\ngeneration {generation}\n");
    for (meter, v) in values {
        text.push_str(&format!("{meter} {v}\n"));
    }
    let crc = crc32(text.as_bytes());
    text.push_str(&format!("crc {crc:08x}\n"));
    text.into_bytes()
}

/// A slot's generation and values, `None` if it is not valid.
pub fn decode(bytes: &[u8]) -> Option<(u64, Values)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let at = text.find("\ncrc ")? + 1;
    let (body, tail) = text.split_at(at);
    let crc = u32::from_str_radix(tail.get(4..12)?, 16).ok()?;
    if crc != crc32(body.as_bytes()) || !tail[12..].trim().is_empty() {
        return None;
    }
    let mut lines = body.lines();
    if lines.next()? != HEADER {
        return None;
    }
    let generation = lines.next()?.strip_prefix("generation ")?.parse().ok()?;
    let mut values = Values::new();
    for line in lines {
        let (meter, v) = line.split_once(' ')?;
        let v: f64 = v.parse().ok()?;
        if !(v.is_finite() && v >= 0.0) {
            return None;
        }
        values.insert(meter.to_string(), v);
    }
    Some((generation, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(pairs: &[(&str, f64)]) -> Values {
        pairs.iter().map(|(m, v)| (m.to_string(), *v)).collect()
    }

    fn save(f: &mut CeilingFile, v: Values) {
        let w = f.prepare(v).unwrap();
        w.run().unwrap();
        f.saved(&w);
    }

    #[test]
    fn values_round_trip_exactly() {
        let v = values(&[("main", 1234.567), ("mains-a", 0.1 + 0.2), ("x", 0.0)]);
        let bytes = encode(7, &v);
        assert_eq!(decode(&bytes), Some((7, v.clone())));
        // Padding after the checksum line is fine.
        let mut padded = bytes.clone();
        padded.extend_from_slice(b"\n\n\n");
        assert_eq!(decode(&padded), Some((7, v)));
        // Any changed byte before it is caught.
        for i in 0..bytes.len() - 1 {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert_eq!(decode(&bad), None, "byte {i}");
        }
        assert_eq!(decode(b""), None);
        assert_eq!(decode(&[0; 64]), None);
    }

    #[test]
    fn saves_alternate_and_the_newest_wins_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let (mut f, v, found) = CeilingFile::open(&state).unwrap();
        assert_eq!((v.len(), found), (0, Found::Nothing));
        assert!(state.ceiling_file(0).exists() && state.ceiling_file(1).exists());
        save(&mut f, values(&[("main", 10.0)]));
        save(&mut f, values(&[("main", 20.0)]));
        save(&mut f, values(&[("main", 30.0)]));
        drop(f);
        let (mut f, v, found) = CeilingFile::open(&state).unwrap();
        assert_eq!((v, found), (values(&[("main", 30.0)]), Found::Values(3)));
        // A lower value with a newer generation (the orderly stop's exact
        // values) wins too.
        save(&mut f, values(&[("main", 25.5)]));
        let (_, v, _) = CeilingFile::open(&state).unwrap();
        assert_eq!(v, values(&[("main", 25.5)]));
    }

    #[test]
    fn a_torn_save_leaves_the_values_saved_before() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let (mut f, _, _) = CeilingFile::open(&state).unwrap();
        save(&mut f, values(&[("main", 10.0), ("pv", 3.0)]));
        save(&mut f, values(&[("main", 20.0), ("pv", 4.0)]));
        // The next save goes to the slot holding generation 1 and is torn
        // by a power cut: half of it on the card.
        let w = f.prepare(values(&[("main", 30.0), ("pv", 5.0)])).unwrap();
        let half = &w.bytes[..w.bytes.len() / 2];
        std::fs::OpenOptions::new()
            .write(true)
            .open(state.ceiling_file(w.slot))
            .unwrap()
            .write_all_at(half, 0)
            .unwrap();
        drop(f);
        let (_, v, found) = CeilingFile::open(&state).unwrap();
        assert_eq!(found, Found::Values(2));
        assert_eq!(v, values(&[("main", 20.0), ("pv", 4.0)]));
    }

    #[test]
    fn shorter_content_is_padded_and_both_damaged_is_told() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let (mut f, _, _) = CeilingFile::open(&state).unwrap();
        let many: Values = (0..20).map(|i| (format!("meter-{i}"), i as f64)).collect();
        save(&mut f, many.clone());
        save(&mut f, many);
        let len = std::fs::metadata(state.ceiling_file(0)).unwrap().len();
        save(&mut f, values(&[("main", 1.0)]));
        assert_eq!(
            std::fs::metadata(state.ceiling_file(0)).unwrap().len(),
            len,
            "never shrinks"
        );
        let (_, v, _) = CeilingFile::open(&state).unwrap();
        assert_eq!(v, values(&[("main", 1.0)]));
        drop(f);
        for slot in 0..2 {
            std::fs::write(state.ceiling_file(slot), "garbage\n").unwrap();
        }
        let (_, v, found) = CeilingFile::open(&state).unwrap();
        assert_eq!((v.len(), found), (0, Found::Damaged));
    }
}
