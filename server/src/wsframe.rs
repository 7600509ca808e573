//! The WebSocket wire format, server side (RFC 6455), and nothing more.
//!
//! The server only ever *sends* data: its frames are unmasked, so one
//! encoded frame is byte-for-byte the same for every socket and the hub
//! encodes each message once ([`text`]). Clients send only control frames
//! (pong, ping, close); [`Decoder`] checks their framing, hands control
//! frames over and skips any data frame's payload without keeping it, so a
//! socket's read side needs no more than a few hundred bytes.

use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use sha1::{Digest, Sha1};

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Close code: the peer broke the protocol.
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Close code: a frame larger than we accept.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code: a normal close (our echo of a close without a code).
pub const CLOSE_NORMAL: u16 = 1000;

/// Largest control-frame payload (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

fn encode(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    out.put_u8(0x80 | opcode); // FIN, no extensions
    match payload.len() {
        n if n < 126 => out.put_u8(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(payload);
    out.freeze()
}

/// An unmasked text frame carrying `json`.
pub fn text(json: &str) -> Bytes {
    encode(OP_TEXT, json.as_bytes())
}

/// A ping with an empty payload.
pub fn ping() -> Bytes {
    encode(OP_PING, &[])
}

/// A pong echoing a ping's payload.
pub fn pong(payload: &[u8]) -> Bytes {
    encode(OP_PONG, payload)
}

/// A close frame with a code and a short reason (at most 123 bytes).
pub fn close(code: u16, reason: &str) -> Bytes {
    let reason = &reason.as_bytes()[..reason.len().min(MAX_CONTROL_PAYLOAD - 2)];
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason);
    encode(OP_CLOSE, &payload)
}

/// What a client sent, frame by frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A ping; answer with [`pong`] of this payload.
    Ping(Vec<u8>),
    /// A pong: the peer is alive.
    Pong,
    /// A text, binary or continuation frame, skipped (the peer is alive).
    Data,
    /// A close, with its code when it had one.
    Close(Option<u16>),
}

/// Why a client's bytes cannot be read as WebSocket frames; the session
/// closes with [`Violation::close_code`].
#[derive(Debug, PartialEq, Eq)]
pub enum Violation {
    Protocol(&'static str),
    TooBig,
}

impl Violation {
    pub fn close_code(&self) -> u16 {
        match self {
            Violation::Protocol(_) => CLOSE_PROTOCOL_ERROR,
            Violation::TooBig => CLOSE_TOO_BIG,
        }
    }

    /// The reason sent with the close frame.
    pub fn close_reason(&self) -> &'static str {
        match self {
            Violation::Protocol(_) => "protocol error",
            Violation::TooBig => "message too big",
        }
    }
}

/// Where the decoder is inside the current frame.
enum Part {
    /// Collecting the header (2 to 14 bytes).
    Header,
    /// Collecting a control frame's payload.
    Control { opcode: u8, mask: [u8; 4], len: usize },
    /// Skipping this many payload bytes of a data frame.
    Skip(u64),
}

/// Incremental decoder of client frames.
pub struct Decoder {
    max_frame: u64,
    part: Part,
    head: [u8; 14],
    head_len: usize,
    control: Vec<u8>,
    /// Inside a fragmented data message (a continuation may follow).
    in_message: bool,
}

impl Decoder {
    /// `max_frame`: the largest payload accepted in one frame.
    pub fn new(max_frame: usize) -> Self {
        Self {
            max_frame: max_frame as u64,
            part: Part::Header,
            head: [0; 14],
            head_len: 0,
            control: Vec::new(),
            in_message: false,
        }
    }

    /// Reads `input`, pushing one event per complete frame to `events`.
    pub fn feed(&mut self, mut input: &[u8], events: &mut Vec<Event>) -> Result<(), Violation> {
        while !input.is_empty() {
            match &mut self.part {
                Part::Header => {
                    let take = (header_len(&self.head[..self.head_len]) - self.head_len).min(input.len());
                    self.head[self.head_len..self.head_len + take].copy_from_slice(&input[..take]);
                    self.head_len += take;
                    input = &input[take..];
                    if self.head_len == header_len(&self.head[..self.head_len]) {
                        self.begin_frame(events)?;
                        if closed(events) {
                            return Ok(()); // nothing after a close frame counts
                        }
                    }
                }
                Part::Control { opcode, mask, len } => {
                    let take = (*len - self.control.len()).min(input.len());
                    self.control.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if self.control.len() == *len {
                        let (opcode, mask) = (*opcode, *mask);
                        for (i, b) in self.control.iter_mut().enumerate() {
                            *b ^= mask[i % 4];
                        }
                        let payload = std::mem::take(&mut self.control);
                        events.push(control_event(opcode, payload)?);
                        self.part = Part::Header;
                        if closed(events) {
                            return Ok(()); // nothing after a close frame counts
                        }
                    }
                }
                Part::Skip(left) => {
                    let take = (*left).min(input.len() as u64);
                    *left -= take;
                    input = &input[take as usize..];
                    if *left == 0 {
                        self.part = Part::Header;
                    }
                }
            }
        }
        Ok(())
    }

    /// The header is complete: check it and set up for the payload.
    fn begin_frame(&mut self, events: &mut Vec<Event>) -> Result<(), Violation> {
        let h = &self.head[..self.head_len];
        self.head_len = 0;
        let fin = h[0] & 0x80 != 0;
        if h[0] & 0x70 != 0 {
            return Err(Violation::Protocol("reserved bits set (no extension was negotiated)"));
        }
        let opcode = h[0] & 0x0F;
        if h[1] & 0x80 == 0 {
            return Err(Violation::Protocol("client frames must be masked"));
        }
        let (len, ext) = match h[1] & 0x7F {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 2),
            127 => (u64::from_be_bytes(h[2..10].try_into().expect("8 bytes")), 8),
            n => (u64::from(n), 0),
        };
        if len >> 63 != 0 {
            return Err(Violation::Protocol("a 64-bit length with its top bit set"));
        }
        let mask: [u8; 4] = h[2 + ext..6 + ext].try_into().expect("4 bytes");
        match opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin || len > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(Violation::Protocol("control frames must be whole and at most 125 bytes"));
                }
                if len == 0 {
                    events.push(control_event(opcode, Vec::new())?);
                    self.part = Part::Header;
                } else {
                    self.control.clear();
                    self.part = Part::Control { opcode, mask, len: len as usize };
                }
            }
            OP_TEXT | OP_BINARY | OP_CONTINUATION => {
                match (opcode, self.in_message) {
                    (OP_CONTINUATION, false) => return Err(Violation::Protocol("continuation without a message")),
                    (OP_TEXT | OP_BINARY, true) => return Err(Violation::Protocol("new message inside a fragmented one")),
                    _ => {}
                }
                if len > self.max_frame {
                    return Err(Violation::TooBig);
                }
                self.in_message = !fin;
                events.push(Event::Data);
                self.part = if len == 0 { Part::Header } else { Part::Skip(len) };
            }
            _ => return Err(Violation::Protocol("unknown opcode")),
        }
        Ok(())
    }
}

/// How long the header that starts with `head` is (2 until its length
/// byte is known).
fn header_len(head: &[u8]) -> usize {
    if head.len() < 2 {
        return 2;
    }
    let ext = match head[1] & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if head[1] & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

fn closed(events: &[Event]) -> bool {
    matches!(events.last(), Some(Event::Close(_)))
}

fn control_event(opcode: u8, payload: Vec<u8>) -> Result<Event, Violation> {
    Ok(match opcode {
        OP_PING => Event::Ping(payload),
        OP_PONG => Event::Pong,
        _ => match payload.len() {
            0 => Event::Close(None),
            1 => return Err(Violation::Protocol("a close payload of one byte")),
            _ => {
                if std::str::from_utf8(&payload[2..]).is_err() {
                    return Err(Violation::Protocol("a close reason that is not UTF-8"));
                }
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                // RFC 6455 §7.4: the codes a peer may send.
                if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                    return Err(Violation::Protocol("a close code a peer may not send"));
                }
                Event::Close(Some(code))
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame, as a browser sends it.
    fn client(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn decode_bytewise(bytes: &[u8]) -> Result<Vec<Event>, Violation> {
        let mut d = Decoder::new(4096);
        let mut events = Vec::new();
        for b in bytes {
            d.feed(std::slice::from_ref(b), &mut events)?;
        }
        Ok(events)
    }

    #[test]
    fn accept_key_matches_the_rfc_example() {
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn server_frames_are_unmasked_with_the_right_length_form() {
        assert_eq!(&text("hi")[..], b"\x81\x02hi");
        assert_eq!(&ping()[..], b"\x89\x00");
        assert_eq!(&close(4008, "slow")[..], b"\x88\x06\x0f\xa8slow");
        let long = "x".repeat(300);
        let f = text(&long);
        assert_eq!(&f[..4], &[0x81, 126, 0x01, 0x2c]);
        assert_eq!(f.len(), 304);
        let huge = "y".repeat(70_000);
        let f = text(&huge);
        assert_eq!(&f[..10], &[0x81, 127, 0, 0, 0, 0, 0, 0x01, 0x11, 0x70]);
    }

    #[test]
    fn control_and_data_frames_decode_in_any_split() {
        let mut wire = client(0x89, b"are you there");
        wire.extend(client(0x8A, b""));
        wire.extend(client(0x81, "a text frame of 200 bytes: ".repeat(8).as_bytes()));
        wire.extend(client(0x01, b"frag"));
        wire.extend(client(0x80, b"ment"));
        wire.extend(client(0x88, b"\x03\xe8bye"));
        let want = vec![
            Event::Ping(b"are you there".to_vec()),
            Event::Pong,
            Event::Data,
            Event::Data,
            Event::Data,
            Event::Close(Some(1000)),
        ];
        assert_eq!(decode_bytewise(&wire).unwrap(), want);
        let mut d = Decoder::new(4096);
        let mut events = Vec::new();
        d.feed(&wire, &mut events).unwrap();
        assert_eq!(events, want);
    }

    #[test]
    fn protocol_violations_are_refused() {
        let unmasked = [0x81u8, 0x02, b'h', b'i'];
        assert!(matches!(decode_bytewise(&unmasked), Err(Violation::Protocol(_))));
        assert!(matches!(decode_bytewise(&client(0xC1, b"x")), Err(Violation::Protocol(_))), "RSV1");
        assert!(matches!(decode_bytewise(&client(0x83, b"x")), Err(Violation::Protocol(_))), "opcode 3");
        assert!(matches!(decode_bytewise(&client(0x80, b"x")), Err(Violation::Protocol(_))), "stray continuation");
        assert!(matches!(decode_bytewise(&client(0x09, b"x")), Err(Violation::Protocol(_))), "fragmented ping");
        assert!(matches!(decode_bytewise(&client(0x89, &[0; 126])), Err(Violation::Protocol(_))), "long ping");
        assert!(matches!(decode_bytewise(&client(0x88, b"\x03")), Err(Violation::Protocol(_))), "1-byte close");
        assert_eq!(decode_bytewise(&client(0x81, &[b'a'; 4097])), Err(Violation::TooBig));
        assert_eq!(decode_bytewise(&client(0x81, &[b'a'; 4096])).unwrap(), vec![Event::Data]);
    }

    #[test]
    fn violation_codes() {
        assert_eq!(Violation::TooBig.close_code(), 1009);
        assert_eq!(Violation::Protocol("x").close_code(), 1002);
    }
}
