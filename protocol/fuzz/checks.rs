//! What the fuzz targets hold one input to, shared with `tests/fuzz_corpus.rs` and the property
//! tests, so a corpus file replayed under `cargo test` is checked exactly as the fuzzer checks
//! it. Every check panics on failure: a panic is how libFuzzer recognises a finding.

// Each includer uses a different part of this file.
#![allow(dead_code)]

use berth_protocol::arcus::{
    self, ArcusError, Decoded, Decoder, Frame, HEADER_LEN, MAX_PAYLOAD_LEN, Message, Role,
};
use berth_protocol::filter::{Filter, FilterError};
use serde_json::{Map, Value};

/// The checks of the `arcus_decode` target.
///
/// The whole input is read as a stream by both roles, so raw frames (the ARCUS.md §7 vectors)
/// are valid seeds as they are. Then the first byte picks chunk sizes and the rest is fed to a
/// [`Decoder`] in those chunks, which must agree with reading the same bytes all at once.
pub fn arcus_decode(data: &[u8]) {
    for role in [Role::Agent, Role::Game] {
        walk(data, role);
    }
    if let Some((&selector, stream)) = data.split_first() {
        for role in [Role::Agent, Role::Game] {
            let whole = walk(stream, role);
            let chunked = feed(stream, role, &chunk_sizes(selector));
            assert_eq!(
                chunked, whole,
                "{role:?}: chunks from selector {selector:#04x} disagree with one read"
            );
        }
    }
}

/// What reading a byte stream produced: every frame in order, the error that ended it if any,
/// and how many bytes were consumed by whole frames (where the error, or the incomplete rest,
/// starts).
#[derive(Debug, PartialEq)]
pub struct Outcome {
    pub frames: Vec<Frame>,
    pub error: Option<ArcusError>,
    pub consumed: usize,
}

/// Reads `buf` with [`arcus::decode`] alone, as a reader holding every byte at once would, and
/// checks each answer on the way.
pub fn walk(buf: &[u8], role: Role) -> Outcome {
    let mut frames = Vec::new();
    let mut consumed = 0;
    loop {
        let rest = &buf[consumed..];
        match arcus::decode(rest, role) {
            Ok(Decoded::Incomplete { needed }) => {
                assert!(needed >= 1, "Incomplete with needed 0");
                assert!(
                    rest.len() + needed <= HEADER_LEN + MAX_PAYLOAD_LEN as usize,
                    "asks for {needed} more bytes after {}: more than a frame can hold",
                    rest.len()
                );
                return Outcome {
                    frames,
                    error: None,
                    consumed,
                };
            }
            Ok(Decoded::Frame { len, frame }) => {
                assert!(
                    (HEADER_LEN..=rest.len()).contains(&len),
                    "frame of {len} bytes out of {}",
                    rest.len()
                );
                if let Frame::Message { packet_id, message } = &frame {
                    reencode(message, *packet_id, role);
                }
                frames.push(frame);
                consumed += len;
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                return Outcome {
                    frames,
                    error: Some(e),
                    consumed,
                };
            }
        }
    }
}

/// Feeds `stream` to a [`Decoder`] in chunks of the given sizes (cycled; 0 counts as 1), taking
/// every frame after each chunk, and stops at the first error as the agent's link would.
pub fn feed(stream: &[u8], role: Role, sizes: &[usize]) -> Outcome {
    let mut decoder = Decoder::new(role);
    let mut frames = Vec::new();
    let mut fed = 0;
    let mut sizes = sizes.iter().copied().cycle();
    while fed < stream.len() {
        let n = sizes
            .next()
            .unwrap_or(usize::MAX)
            .clamp(1, stream.len() - fed);
        decoder.extend(&stream[fed..fed + n]);
        fed += n;
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    return Outcome {
                        frames,
                        error: Some(e),
                        consumed: fed - decoder.pending(),
                    };
                }
            }
        }
    }
    Outcome {
        frames,
        error: None,
        consumed: fed - decoder.pending(),
    }
}

/// Two chunk sizes from one byte, alternated: each nibble is a size of 1 to 15, and 15 means
/// "everything left", so one byte covers byte-at-a-time, splits inside headers, and one read.
pub fn chunk_sizes(selector: u8) -> [usize; 2] {
    let size = |nibble: u8| match nibble {
        15 => usize::MAX,
        n => usize::from(n) + 1,
    };
    [size(selector & 0x0f), size(selector >> 4)]
}

/// A decoded message, encoded again, must decode to itself: what the agent stores and forwards
/// is what the game sent. Re-encoding may not fit a frame any more (`1E2` becomes `100.0`), so
/// only that is excused.
fn reencode(message: &Message, packet_id: u32, role: Role) {
    let mut out = Vec::new();
    match arcus::encode_with_id(message, packet_id, &mut out) {
        Ok(()) => {}
        Err(ArcusError::PayloadTooLarge { .. }) => return,
        Err(e) => panic!("decoded {message:?} does not encode again: {e}"),
    }
    // The hello reply is a fixed frame; its packet id is always 0.
    let packet_id = if *message == Message::HelloReply {
        0
    } else {
        packet_id
    };
    let again = arcus::decode(&out, role);
    let same = match &again {
        Ok(Decoded::Frame {
            len,
            frame:
                Frame::Message {
                    packet_id: id,
                    message: m,
                },
        }) => *len == out.len() && *id == packet_id && same_message(m, message),
        _ => false,
    };
    assert!(
        same,
        "{message:?} re-encoded as {:?} decodes to {again:?}",
        String::from_utf8_lossy(&out)
    );
}

/// Message equality, except that JSON floats may differ in the last places: serde_json without
/// its `float_roundtrip` feature parses some shortest-form floats 1–2 ULPs off (e.g.
/// `-1.0498824276453545e74` comes back as `-1.0498824276453543e74`), a limit of the dependency's
/// configuration rather than of the codec; 4 ULPs leaves a margin.
pub fn same_message(a: &Message, b: &Message) -> bool {
    match (a, b) {
        (Message::HostInformation(x), Message::HostInformation(y))
        | (Message::InstanceInformation(x), Message::InstanceInformation(y)) => same_object(x, y),
        (Message::LiveState(x), Message::LiveState(y)) => {
            x.players == y.players
                && x.max_players == y.max_players
                && x.name == y.name
                && x.map == y.map
                && x.mode == y.mode
                && x.version == y.version
                && same_object(&x.extra, &y.extra)
        }
        _ => a == b,
    }
}

fn same_object(a: &Map<String, Value>, b: &Map<String, Value>) -> bool {
    a.len() == b.len()
        && a.iter()
            .all(|(k, v)| b.get(k).is_some_and(|w| same_value(v, w)))
}

fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() && y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => x == y || x.to_bits().abs_diff(y.to_bits()) <= 4,
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same_value(v, w))
        }
        (Value::Object(x), Value::Object(y)) => same_object(x, y),
        _ => a == b,
    }
}

/// The checks of the `filter_parse` target: any bytes, read as (lossy) UTF-8.
pub fn filter_parse(data: &[u8]) {
    // The verdict itself is checked inside; a fuzz target has nothing to return.
    let _ = filter_text(&String::from_utf8_lossy(data));
}

/// Parses `text` and checks the answer: a filter prints to canonical text that parses back to
/// it, is no longer than the input and prints the same again; an error points inside the input
/// at a character boundary and says something short enough for an error body.
pub fn filter_text(text: &str) -> Result<Filter, FilterError> {
    let parsed = Filter::parse(text);
    match &parsed {
        Ok(filter) => {
            let canonical = filter.to_string();
            assert!(
                canonical.len() <= text.len(),
                "canonical {canonical:?} is longer than input {text:?}"
            );
            let again = Filter::parse(&canonical)
                .unwrap_or_else(|e| panic!("canonical {canonical:?} of {text:?} fails: {e}"));
            assert_eq!(&again, filter, "canonical {canonical:?} of {text:?}");
            assert_eq!(again.to_string(), canonical);
        }
        Err(e) => {
            if let FilterError::Syntax { position, .. } = e {
                assert!(
                    *position <= text.len() && text.is_char_boundary(*position),
                    "position {position} in {text:?}"
                );
            }
            let message = e.to_string();
            assert!(
                !message.is_empty() && message.len() <= 512,
                "message of {} bytes: {message}",
                message.len()
            );
        }
    }
    parsed
}
