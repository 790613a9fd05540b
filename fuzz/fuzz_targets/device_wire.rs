//! The device side's WebSocket decoder (`ems_hub::ingest::wire`): every
//! byte a device sends after the upgrade goes through it. It must never
//! panic, decode the same messages however the bytes are split into reads,
//! never return a text message over the limit, and keep no more than one
//! frame and one read between reads.
#![no_main]

use ems_hub::ingest::wire::{Decoder, Incoming, WireError};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 1024;

/// Every message until the first error or the end of the input, reading
/// `chunk` bytes at a time.
fn decode(data: &[u8], chunk: usize) -> Vec<Result<Incoming, WireError>> {
    let mut d = Decoder::new(MAX);
    let mut out = Vec::new();
    for piece in data.chunks(chunk) {
        let mut next = d.feed(piece);
        loop {
            match next {
                Ok(Some(m)) => {
                    if let Incoming::Text(t) = &m {
                        assert!(t.len() <= MAX, "text of {} bytes", t.len());
                    }
                    out.push(Ok(m));
                }
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
            next = d.feed(&[]);
        }
        assert!(d.kept() <= MAX + 14 + chunk, "kept {}", d.kept());
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let whole = decode(data, data.len().max(1));
    let pieces = decode(data, usize::from(split % 64) + 1);
    // An oversized frame's error may come from its header before the rest
    // of the input is seen; everything before it is the same either way.
    assert_eq!(whole, pieces);
});
