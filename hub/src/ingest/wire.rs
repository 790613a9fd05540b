//! WebSocket framing (RFC 6455, the server's side) for device connections,
//! as pure code: [`Decoder`] turns the bytes a device sends into messages,
//! [`encode`] frames what the hub sends back.
//!
//! Why the device side has its own framing: an idle device connection is
//! the hub's memory budget, and a general WebSocket stream keeps a read
//! buffer, waker proxies and its settings per connection whether anything
//! arrives or not. The decoder holds bytes only while a frame is half
//! received (or frames arrived behind the one just returned); an idle
//! connection holds no buffer at all. Dashboards keep `tokio-tungstenite`.
//!
//! What a server must do and this does: client frames must be masked;
//! reserved bits and opcodes, fragmented or oversized (> 125 bytes)
//! control frames, a continuation without a start and a new data frame
//! inside a fragmented message are protocol errors (close 1002); a message
//! (all its fragments together) over the size limit closes with 1009
//! before its payload is buffered; a text message that is not UTF-8
//! closes with 1007. Control frames may come between the fragments of a
//! message. No extension is negotiated, so none is understood.

use thiserror::Error;

/// Largest payload of a control frame (ping, pong, close).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// Opcodes of the frames this module reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// A continuation of a fragmented message.
    Continuation = 0x0,
    /// A text frame.
    Text = 0x1,
    /// A binary frame.
    Binary = 0x2,
    /// A close frame.
    Close = 0x8,
    /// A ping.
    Ping = 0x9,
    /// A pong.
    Pong = 0xA,
}

/// One message from a device.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A text message (all its fragments), valid UTF-8.
    Text(String),
    /// A binary message (devices send text; its bytes are not kept).
    Binary,
    /// A ping, with its payload for the pong.
    Ping(Vec<u8>),
    /// A pong.
    Pong,
    /// The peer closes: its status code, if it sent one it may send
    /// (otherwise 1002, as the reply must say).
    Close(Option<u16>),
}

/// Why the bytes from a device cannot be read on.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// A message (or one of its frames) over the size limit: close 1009.
    #[error("message of {size} bytes exceeds {max_size}")]
    TooBig {
        /// Its size in bytes, as far as known.
        size: usize,
        /// The limit.
        max_size: usize,
    },
    /// A text message that is not UTF-8: close 1007.
    #[error("text message is not UTF-8")]
    Utf8,
    /// A frame no client may send: close 1002.
    #[error("WebSocket protocol violation: {0}")]
    Protocol(&'static str),
}

/// Turns bytes from a device into messages, keeping what it cannot use
/// yet.
#[derive(Debug)]
pub struct Decoder {
    /// Largest message, all fragments together.
    max_message: usize,
    /// What is kept between reads; `None` (no allocation) while the
    /// connection is idle.
    held: Option<Box<Held>>,
}

/// Bytes and fragments kept between reads.
#[derive(Debug, Default)]
struct Held {
    /// Bytes received and not yet decoded, from `start` on: part of a
    /// frame, or frames behind the message last returned.
    buf: Vec<u8>,
    /// Where the undecoded bytes in `buf` begin.
    start: usize,
    /// A fragmented message being assembled (rare: devices send each
    /// reading in one frame).
    fragments: Option<Fragments>,
}

/// The fragments of a data message received so far.
#[derive(Debug)]
struct Fragments {
    /// Text (else binary).
    text: bool,
    /// The payload so far (a binary message's is only counted).
    payload: Vec<u8>,
    /// Its size so far.
    size: usize,
}

/// A frame's header.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Bytes of the header, mask included.
    len: usize,
    /// Bytes of the payload.
    payload: usize,
}

impl Decoder {
    /// A decoder for messages of up to `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Decoder {
            max_message,
            held: None,
        }
    }

    /// Decodes the next message from what was kept and `input` (bytes just
    /// read; may be empty) and keeps the rest. `Ok(None)`: no message is
    /// complete yet, read more. Call it with an empty `input` until it
    /// returns `Ok(None)` before reading again: several messages may
    /// arrive in one read. After an error the connection must close.
    pub fn feed(&mut self, input: &[u8]) -> Result<Option<Incoming>, WireError> {
        let Some(held) = self.held.as_deref_mut() else {
            // Nothing kept (the common case): decode straight from the
            // input, keep only what is left of it.
            let (mut rest, mut fragments) = (input, None);
            let r = next_message(&mut fragments, self.max_message, &mut rest);
            if r.is_ok() && (!rest.is_empty() || fragments.is_some()) {
                self.held = Some(Box::new(Held {
                    buf: rest.to_vec(),
                    start: 0,
                    fragments,
                }));
            }
            return r;
        };
        if !input.is_empty() {
            held.buf.drain(..held.start);
            held.start = 0;
            held.buf.extend_from_slice(input);
        }
        let mut rest = &held.buf[held.start..];
        let r = next_message(&mut held.fragments, self.max_message, &mut rest);
        held.start = held.buf.len() - rest.len();
        if held.start == held.buf.len() {
            if held.fragments.is_none() {
                self.held = None;
            } else {
                held.buf = Vec::new();
                held.start = 0;
            }
        }
        r
    }

    /// Keeps `bytes` to decode ahead of the next input (what arrived with
    /// the upgrade request).
    pub fn keep(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            let held = self.held.get_or_insert_with(Box::default);
            held.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes kept between reads (for tests and the memory accounting).
    pub fn kept(&self) -> usize {
        self.held.as_ref().map_or(0, |h| h.buf.len() - h.start)
    }

    /// Whether anything is kept between reads (an allocation).
    pub fn holds(&self) -> bool {
        self.held.is_some()
    }
}

/// Decodes frames from the front of `input` until a message is complete,
/// advancing `input` past every whole frame it used.
fn next_message(
    fragments: &mut Option<Fragments>,
    max: usize,
    input: &mut &[u8],
) -> Result<Option<Incoming>, WireError> {
    loop {
        let Some(h) = header(input)? else {
            return Ok(None);
        };
        check_size(&h, fragments.as_ref(), max)?;
        let end = h.len + h.payload;
        if input.len() < end {
            return Ok(None);
        }
        let payload = &input[h.len..end];
        let message = frame(fragments, &h, payload)?;
        *input = &input[end..];
        if let Some(m) = message {
            return Ok(Some(m));
        }
    }
}

/// Parses the header at the front of `b` (`None`: not all of it yet).
fn header(b: &[u8]) -> Result<Option<Header>, WireError> {
    let [b0, b1, ..] = *b else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(WireError::Protocol("reserved bits set"));
    }
    if b1 & 0x80 == 0 {
        return Err(WireError::Protocol("unmasked frame from a client"));
    }
    let (payload, at) = match b1 & 0x7F {
        126 => match b.get(2..4) {
            Some(n) => (u64::from(u16::from_be_bytes([n[0], n[1]])), 4),
            None => return Ok(None),
        },
        127 => match b.get(2..10).and_then(|n| <[u8; 8]>::try_from(n).ok()) {
            Some(n) => (u64::from_be_bytes(n), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let Some(mask) = b.get(at..at + 4).and_then(|m| <[u8; 4]>::try_from(m).ok()) else {
        return Ok(None);
    };
    Ok(Some(Header {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0F,
        mask,
        len: at + 4,
        // Larger than any limit on a 32-bit target too: refused below.
        payload: usize::try_from(payload).unwrap_or(usize::MAX),
    }))
}

/// Refuses a frame before its payload is buffered: control frames over
/// 125 bytes, data over the message limit.
fn check_size(h: &Header, fragments: Option<&Fragments>, max: usize) -> Result<(), WireError> {
    if h.opcode & 0x8 != 0 {
        if h.payload > MAX_CONTROL_PAYLOAD {
            return Err(WireError::Protocol("control frame over 125 bytes"));
        }
        return Ok(());
    }
    let so_far = match (h.opcode, fragments) {
        (0x0, Some(f)) => f.size,
        _ => 0,
    };
    let size = so_far.saturating_add(h.payload);
    if size > max {
        return Err(WireError::TooBig {
            size,
            max_size: max,
        });
    }
    Ok(())
}

/// One whole frame: a message, or `None` when it only added a fragment.
fn frame(
    fragments: &mut Option<Fragments>,
    h: &Header,
    masked: &[u8],
) -> Result<Option<Incoming>, WireError> {
    const CONTINUATION: u8 = Op::Continuation as u8;
    const TEXT: u8 = Op::Text as u8;
    const BINARY: u8 = Op::Binary as u8;
    const CLOSE: u8 = Op::Close as u8;
    const PING: u8 = Op::Ping as u8;
    const PONG: u8 = Op::Pong as u8;
    if h.opcode & 0x8 != 0 && !h.fin {
        return Err(WireError::Protocol("fragmented control frame"));
    }
    match (h.opcode, fragments.as_mut()) {
        (CLOSE, _) => close(&unmask(masked, h.mask)).map(|code| Some(Incoming::Close(code))),
        (PING, _) => Ok(Some(Incoming::Ping(unmask(masked, h.mask)))),
        (PONG, _) => Ok(Some(Incoming::Pong)),
        (TEXT | BINARY, Some(_)) => Err(WireError::Protocol(
            "new data frame inside a fragmented message",
        )),
        (TEXT, None) if h.fin => text(unmask(masked, h.mask)).map(Some),
        (BINARY, None) if h.fin => Ok(Some(Incoming::Binary)),
        (TEXT | BINARY, None) => {
            let text = h.opcode == TEXT;
            let payload = if text {
                unmask(masked, h.mask)
            } else {
                Vec::new()
            };
            *fragments = Some(Fragments {
                text,
                payload,
                size: masked.len(),
            });
            Ok(None)
        }
        (CONTINUATION, None) => Err(WireError::Protocol("continuation without a message")),
        (CONTINUATION, Some(f)) => {
            if f.text {
                // The mask restarts with every frame.
                let at = f.payload.len();
                f.payload.extend_from_slice(masked);
                apply_mask(&mut f.payload[at..], h.mask);
            }
            f.size += masked.len();
            if !h.fin {
                return Ok(None);
            }
            match fragments.take() {
                Some(Fragments {
                    text: true,
                    payload,
                    ..
                }) => text(payload).map(Some),
                _ => Ok(Some(Incoming::Binary)),
            }
        }
        _ => Err(WireError::Protocol("reserved opcode")),
    }
}

/// A text message's payload as a string.
fn text(payload: Vec<u8>) -> Result<Incoming, WireError> {
    String::from_utf8(payload)
        .map(Incoming::Text)
        .map_err(|_| WireError::Utf8)
}

/// A close frame's payload: no code, or a code and a UTF-8 reason.
fn close(payload: &[u8]) -> Result<Option<u16>, WireError> {
    match payload {
        [] => Ok(None),
        [_] => Err(WireError::Protocol("close frame with a one-byte payload")),
        [hi, lo, reason @ ..] => {
            if std::str::from_utf8(reason).is_err() {
                return Err(WireError::Utf8);
            }
            let code = u16::from_be_bytes([*hi, *lo]);
            // Codes a peer may send (RFC 6455 7.4, the IANA registry);
            // any other is answered with 1002.
            let allowed = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            Ok(Some(if allowed { code } else { 1002 }))
        }
    }
}

/// A copy of a masked payload, unmasked.
fn unmask(masked: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut p = masked.to_vec();
    apply_mask(&mut p, mask);
    p
}

/// XORs `mask` over `data`, starting at the mask's first byte.
fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (b, m) in chunks.into_remainder().iter_mut().zip(mask) {
        *b ^= m;
    }
}

/// Appends one whole, unmasked frame (a server's) with `payload` to `out`.
/// Control frames' payloads are cut at 125 bytes.
pub fn encode(out: &mut Vec<u8>, op: Op, payload: &[u8]) {
    let is_control = (op as u8) & 0x8 != 0;
    let payload = if is_control {
        &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)]
    } else {
        payload
    };
    out.reserve(10 + payload.len());
    out.push(0x80 | op as u8);
    match payload.len() {
        n @ 0..=125 => out.push(n as u8),
        n @ 126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// Appends a close frame with `code` and `reason` (cut to fit a control
/// frame, at a character boundary) to `out`.
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
    encode(out, Op::Close, &payload[..2 + cut]);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

    /// A client's frame: masked, as RFC 6455 section 5.7 builds them.
    fn client(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![first];
        match payload.len() {
            n @ 0..=125 => f.push(0x80 | n as u8),
            n @ 126..=0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&MASK);
        let at = f.len();
        f.extend_from_slice(payload);
        apply_mask(&mut f[at..], MASK);
        f
    }

    fn all(d: &mut Decoder, input: &[u8]) -> Vec<Result<Incoming, WireError>> {
        let mut out = Vec::new();
        let mut next = d.feed(input);
        loop {
            match next {
                Ok(Some(m)) => out.push(Ok(m)),
                Ok(None) => return out,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
            next = d.feed(&[]);
        }
    }

    #[test]
    fn the_rfc_examples_decode() {
        // RFC 6455 5.7: a masked "Hello" from a client.
        let hello = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let mut d = Decoder::new(16_384);
        assert_eq!(d.feed(&hello), Ok(Some(Incoming::Text("Hello".into()))));
        assert_eq!(d.kept(), 0);
        // A masked ping with "Hello" as its payload.
        let ping = client(0x89, b"Hello");
        assert_eq!(d.feed(&ping), Ok(Some(Incoming::Ping(b"Hello".to_vec()))));
    }

    #[test]
    fn the_server_frames_encode_as_in_the_rfc() {
        let mut out = Vec::new();
        encode(&mut out, Op::Text, b"Hello");
        assert_eq!(out, [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        out.clear();
        encode(&mut out, Op::Binary, &[0u8; 256]);
        assert_eq!(out[..4], [0x82, 0x7E, 0x01, 0x00]);
        assert_eq!(out.len(), 4 + 256);
        out.clear();
        encode(&mut out, Op::Binary, &vec![0u8; 65_536]);
        assert_eq!(out[..10], [0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0]);
        out.clear();
        encode_close(&mut out, 1009, "message too big");
        assert_eq!(out[..4], [0x88, 17, 0x03, 0xF1]);
        assert_eq!(&out[4..], b"message too big");
        out.clear();
        encode_close(&mut out, 1000, &"é".repeat(100));
        assert!(out.len() <= 2 + 125);
        assert!(std::str::from_utf8(&out[4..]).is_ok());
    }

    #[test]
    fn frames_split_anywhere_and_joined_in_one_read_decode_alike() {
        let reading = r#"{"type":"reading","epoch":1,"seq":2}"#;
        let mut stream = client(0x81, reading.as_bytes());
        stream.extend(client(0x89, b""));
        stream.extend(client(0x81, &vec![b'x'; 300]));
        stream.extend(client(0x8A, b"p"));
        let want = vec![
            Ok(Incoming::Text(reading.into())),
            Ok(Incoming::Ping(Vec::new())),
            Ok(Incoming::Text("x".repeat(300))),
            Ok(Incoming::Pong),
        ];
        let mut d = Decoder::new(16_384);
        assert_eq!(all(&mut d, &stream), want);
        assert!(!d.holds());
        for chunk in [1, 2, 3, 7, 64, 1000] {
            let mut d = Decoder::new(16_384);
            let got: Vec<_> = stream.chunks(chunk).flat_map(|c| all(&mut d, c)).collect();
            assert_eq!(got, want, "read in chunks of {chunk}");
            assert_eq!(d.kept(), 0);
            assert!(!d.holds(), "nothing kept once idle");
        }
    }

    #[test]
    fn fragments_join_with_control_frames_between_them() {
        let mut stream = client(0x01, b"{\"a\":");
        stream.extend(client(0x89, b"hi"));
        stream.extend(client(0x00, "\"é".as_bytes()));
        stream.extend(client(0x80, b"\"}"));
        let mut d = Decoder::new(16_384);
        assert_eq!(
            all(&mut d, &stream),
            vec![
                Ok(Incoming::Ping(b"hi".to_vec())),
                Ok(Incoming::Text("{\"a\":\"é\"}".into()))
            ]
        );
        // The same bytes in reads of any size, and bytes kept from the
        // upgrade request ahead of them.
        for chunk in [1, 5, 9, 13] {
            let mut d = Decoder::new(16_384);
            d.keep(&stream[..3]);
            let got: Vec<_> = stream[3..]
                .chunks(chunk)
                .flat_map(|c| all(&mut d, c))
                .collect();
            assert_eq!(got.len(), 2, "read in chunks of {chunk}");
            assert!(!d.holds());
        }
        // A character split between two fragments is still UTF-8.
        let euro = "€".as_bytes();
        let mut split = client(0x01, &euro[..1]);
        split.extend(client(0x80, &euro[1..]));
        assert_eq!(all(&mut d, &split), vec![Ok(Incoming::Text("€".into()))]);
        let mut bin = client(0x02, b"ab");
        bin.extend(client(0x80, b"cd"));
        assert_eq!(all(&mut d, &bin), vec![Ok(Incoming::Binary)]);
    }

    #[test]
    fn protocol_violations_are_refused() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x81, 0x01, b'x'], "unmasked frame from a client"),
            (client(0xC1, b"x"), "reserved bits set"),
            (client(0x83, b"x"), "reserved opcode"),
            (client(0x8B, b"x"), "reserved opcode"),
            (client(0x09, b""), "fragmented control frame"),
            (client(0x89, &[0; 126]), "control frame over 125 bytes"),
            (client(0x80, b"x"), "continuation without a message"),
            (client(0x88, &[3]), "close frame with a one-byte payload"),
            (
                [client(0x01, b"a"), client(0x81, b"b")].concat(),
                "new data frame inside a fragmented message",
            ),
        ];
        for (bytes, what) in cases {
            let mut d = Decoder::new(16_384);
            assert_eq!(
                all(&mut d, &bytes).pop(),
                Some(Err(WireError::Protocol(what))),
                "{bytes:x?}"
            );
        }
    }

    #[test]
    fn oversized_messages_are_refused_from_their_header() {
        let mut d = Decoder::new(100);
        // Only the header of a 101-byte frame: refused before its payload.
        let big = client(0x81, &[b'x'; 101]);
        assert_eq!(
            d.feed(&big[..8]),
            Err(WireError::TooBig {
                size: 101,
                max_size: 100
            })
        );
        let mut d = Decoder::new(100);
        let huge = [0x81, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4];
        assert!(matches!(d.feed(&huge), Err(WireError::TooBig { .. })));
        // Fragments count together.
        let mut d = Decoder::new(100);
        let mut frags = client(0x01, &[b'x'; 60]);
        frags.extend(client(0x80, &[b'x'; 41]));
        assert_eq!(
            all(&mut d, &frags).pop(),
            Some(Err(WireError::TooBig {
                size: 101,
                max_size: 100
            }))
        );
        // Exactly the limit is fine.
        let mut d = Decoder::new(100);
        let ok = client(0x81, &[b'x'; 100]);
        assert_eq!(d.feed(&ok), Ok(Some(Incoming::Text("x".repeat(100)))));
    }

    #[test]
    fn text_must_be_utf8() {
        let mut d = Decoder::new(100);
        assert_eq!(d.feed(&client(0x81, &[0xC3, 0x28])), Err(WireError::Utf8));
        let mut d = Decoder::new(100);
        let mut frags = client(0x01, b"ok");
        frags.extend(client(0x80, &[0xFF]));
        assert_eq!(all(&mut d, &frags).pop(), Some(Err(WireError::Utf8)));
    }

    #[test]
    fn close_codes_are_read_and_forbidden_ones_answered_with_1002() {
        let mut d = Decoder::new(100);
        assert_eq!(d.feed(&client(0x88, b"")), Ok(Some(Incoming::Close(None))));
        let bye = [&1000u16.to_be_bytes()[..], b"bye"].concat();
        assert_eq!(
            d.feed(&client(0x88, &bye)),
            Ok(Some(Incoming::Close(Some(1000))))
        );
        for forbidden in [999u16, 1004, 1005, 1006, 1015, 2999, 5000] {
            let c = client(0x88, &forbidden.to_be_bytes());
            assert_eq!(
                d.feed(&c),
                Ok(Some(Incoming::Close(Some(1002)))),
                "{forbidden}"
            );
        }
        let bad_reason = [&1000u16.to_be_bytes()[..], &[0xFF]].concat();
        assert_eq!(d.feed(&client(0x88, &bad_reason)), Err(WireError::Utf8));
    }

    #[test]
    fn the_mask_applies_over_any_length_and_offset() {
        for n in 0..20 {
            let data: Vec<u8> = (0..n as u8).collect();
            let mut fast = data.clone();
            apply_mask(&mut fast, MASK);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ MASK[i % 4])
                .collect();
            assert_eq!(fast, slow, "{n} bytes");
        }
    }
}
