//! Arcus, the management protocol between a host agent and a game server (ARCUS.md).
//!
//! This is a sans-IO codec: [`decode`] looks at a byte slice and either yields one frame, asks
//! for more bytes, or rejects the input; [`Decoder`] buffers a byte stream on top of it;
//! [`Encoder`] writes frames with an incrementing packet id. The agent and the game SDK wrap
//! these in their own sockets.
//!
//! Header rules are checked before a payload is buffered, so a peer announcing a 4 GiB frame is
//! rejected after 12 bytes, not after we allocated for it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::io;
use std::time::Duration;

use crate::metadata::KeyValue;

/// The 6-byte hello the game sends first: `"arc"`, NUL, version 1, padding 0.
pub const HELLO: [u8; 6] = [0x61, 0x72, 0x63, 0x00, 0x01, 0x00];
/// The agent's only acceptable answer to the hello: opcode 0x04, packet id 0, length 0.
pub const HELLO_REPLY: [u8; HEADER_LEN] = [0, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
pub const HEADER_LEN: usize = 12;
/// Largest payload a frame may carry (a frame is at most 128 KiB).
pub const MAX_PAYLOAD_LEN: u32 = 131_060;
/// Each side sends a health frame this often once the handshake is done.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// A side that receives no complete frame for this long treats the link as dead.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(20);
/// The agent must answer the hello within this time of connecting.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
/// The SDK closes a link when more than 48 messages queue between two of its ticks; we stay
/// well under that.
pub const MAX_BURST: usize = 40;

/// Every opcode of ARCUS.md §4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Health = 0x02,
    HelloReply = 0x04,
    LiveState = 0x20,
    SoftStop = 0x30,
    Metadata = 0x40,
    ReverseMetadata = 0x41,
    CustomCommand = 0x45,
    HostInformation = 0x50,
    Allocated = 0x60,
    InstanceInformation = 0x70,
    InstanceStatus = 0x71,
}

impl Opcode {
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0x02 => Self::Health,
            0x04 => Self::HelloReply,
            0x20 => Self::LiveState,
            0x30 => Self::SoftStop,
            0x40 => Self::Metadata,
            0x41 => Self::ReverseMetadata,
            0x45 => Self::CustomCommand,
            0x50 => Self::HostInformation,
            0x60 => Self::Allocated,
            0x70 => Self::InstanceInformation,
            0x71 => Self::InstanceStatus,
            _ => return None,
        })
    }

    /// Which side may send this opcode. `None` means both.
    fn sender(self) -> Option<Role> {
        match self {
            Self::Health => None,
            Self::LiveState | Self::ReverseMetadata | Self::InstanceStatus => Some(Role::Game),
            Self::HelloReply
            | Self::SoftStop
            | Self::Metadata
            | Self::CustomCommand
            | Self::HostInformation
            | Self::Allocated
            | Self::InstanceInformation => Some(Role::Agent),
        }
    }
}

/// The side of the link a decoder or encoder works for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The host agent: connects, receives game messages.
    Agent,
    /// The game server: listens, receives agent messages.
    Game,
}

/// A decoded 12-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub opcode: Opcode,
    pub packet_id: u32,
    pub length: u32,
}

impl Header {
    /// Checks a header before any payload byte is read.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Self, ArcusError> {
        if bytes[0] != 0 {
            return Err(ArcusError::NonZeroFlags(bytes[0]));
        }
        let opcode = Opcode::from_byte(bytes[1]).ok_or(ArcusError::UnknownOpcode(bytes[1]))?;
        let packet_id = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let length = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if length > MAX_PAYLOAD_LEN {
            return Err(ArcusError::FrameTooLarge(length));
        }
        Ok(Self {
            opcode,
            packet_id,
            length,
        })
    }
}

/// The game's live state (0x20). All six named fields are required; anything else is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveState {
    pub players: i32,
    #[serde(rename = "maxPlayers")]
    pub max_players: i32,
    pub name: String,
    pub map: String,
    pub mode: String,
    pub version: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One Arcus message with its payload decoded and validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Health,
    HelloReply,
    /// Ask the game to finish and exit within `timeout` seconds.
    SoftStop {
        timeout: i32,
    },
    Metadata(Vec<KeyValue>),
    CustomCommand(Vec<KeyValue>),
    HostInformation(Map<String, Value>),
    Allocated(Vec<KeyValue>),
    InstanceInformation(Map<String, Value>),
    LiveState(LiveState),
    ReverseMetadata(Vec<KeyValue>),
    /// The game's own status: 3 starting, 4 online, 5 allocated.
    InstanceStatus {
        status: i32,
    },
}

impl Message {
    pub fn opcode(&self) -> Opcode {
        match self {
            Self::Health => Opcode::Health,
            Self::HelloReply => Opcode::HelloReply,
            Self::SoftStop { .. } => Opcode::SoftStop,
            Self::Metadata(_) => Opcode::Metadata,
            Self::CustomCommand(_) => Opcode::CustomCommand,
            Self::HostInformation(_) => Opcode::HostInformation,
            Self::Allocated(_) => Opcode::Allocated,
            Self::InstanceInformation(_) => Opcode::InstanceInformation,
            Self::LiveState(_) => Opcode::LiveState,
            Self::ReverseMetadata(_) => Opcode::ReverseMetadata,
            Self::InstanceStatus { .. } => Opcode::InstanceStatus,
        }
    }

    /// Writes the JSON payload to `w`; payload-less messages write nothing (never `{}`).
    fn write_payload<W: io::Write>(&self, w: W) -> serde_json::Result<()> {
        #[derive(Serialize)]
        struct Timeout {
            timeout: i32,
        }
        #[derive(Serialize)]
        struct Status {
            status: i32,
        }
        match self {
            Self::Health | Self::HelloReply => Ok(()),
            Self::SoftStop { timeout } => serde_json::to_writer(w, &Timeout { timeout: *timeout }),
            Self::Metadata(d)
            | Self::CustomCommand(d)
            | Self::Allocated(d)
            | Self::ReverseMetadata(d) => serde_json::to_writer(w, &Data { data: d }),
            Self::HostInformation(m) | Self::InstanceInformation(m) => {
                if m.is_empty() {
                    return Ok(());
                }
                serde_json::to_writer(w, m)
            }
            Self::LiveState(s) => serde_json::to_writer(w, s),
            Self::InstanceStatus { status } => {
                serde_json::to_writer(w, &Status { status: *status })
            }
        }
    }
}

/// The `{"data": [...]}` payload shared by the key/value messages.
#[derive(Serialize)]
struct Data<'a> {
    data: &'a [KeyValue],
}

/// Counts bytes instead of keeping them, so sizes can be checked without a buffer.
#[derive(Debug, Default)]
struct ByteCounter(usize);

impl io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The length of `value`'s compact JSON encoding, without building it.
pub fn json_len<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<usize> {
    let mut counter = ByteCounter::default();
    serde_json::to_writer(&mut counter, value)?;
    Ok(counter.0)
}

/// What [`decode`] found at the start of a buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// The buffer holds no complete frame yet; at least this many more bytes are needed.
    Incomplete { needed: usize },
    /// A complete frame of `len` bytes (header included).
    Frame { len: usize, frame: Frame },
}

/// One complete frame, as seen by the side that decoded it.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A message meant for this side, validated.
    Message { packet_id: u32, message: Message },
    /// A known opcode travelling the wrong way: ARCUS.md says to ignore it, so its payload is
    /// not even parsed.
    Ignored { opcode: Opcode },
}

/// Why a byte stream is not valid Arcus. Any of these closes the link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArcusError {
    #[error("bad hello {got:02x?}: expected 61 72 63 00 01 00 (\"arc\", NUL, version 1, 0)")]
    BadHello { got: Vec<u8> },
    #[error("bad hello reply {got:02x?}: expected exactly 00 04 00 00 00 00 00 00 00 00 00 00")]
    BadHelloReply { got: Vec<u8> },
    #[error("peer sent {0} bytes before the hello; the agent must wait for the game's hello")]
    SpokeFirst(usize),
    #[error("header flags byte is {0:#04x}; Arcus requires 0")]
    NonZeroFlags(u8),
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("frame announces a {0}-byte payload; the limit is 131060")]
    FrameTooLarge(u32),
    #[error("{opcode:?} payload is invalid: {reason}")]
    InvalidPayload { opcode: Opcode, reason: String },
    #[error("{opcode:?} payload encodes to {len} bytes; the limit is 131060")]
    PayloadTooLarge { opcode: Opcode, len: usize },
}

/// Decodes at most one frame from the start of `buf`, for the side `role`.
///
/// Never panics and never looks at payload bytes before the header has been accepted.
pub fn decode(buf: &[u8], role: Role) -> Result<Decoded, ArcusError> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(Decoded::Incomplete {
            needed: HEADER_LEN - buf.len(),
        });
    };
    let header = Header::parse(head)?;
    let total = HEADER_LEN + header.length as usize;
    if buf.len() < total {
        return Ok(Decoded::Incomplete {
            needed: total - buf.len(),
        });
    }
    let payload = &buf[HEADER_LEN..total];
    let frame = match header.opcode.sender() {
        Some(sender) if sender == role => Frame::Ignored {
            opcode: header.opcode,
        },
        _ => Frame::Message {
            packet_id: header.packet_id,
            message: parse_payload(header.opcode, payload)?,
        },
    };
    Ok(Decoded::Frame { len: total, frame })
}

fn parse_payload(opcode: Opcode, payload: &[u8]) -> Result<Message, ArcusError> {
    // An empty payload means the same as `{}`.
    let payload: &[u8] = if payload.is_empty() { b"{}" } else { payload };
    // serde's derived structs would also accept a JSON array; Arcus requires an object root, and
    // checking the first byte lets the typed messages deserialize straight from the bytes.
    let first = payload
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first != Some(&b'{') {
        let reason = match serde_json::from_slice::<Value>(payload) {
            Ok(other) => format!("root must be an object, got {}", kind(&other)),
            Err(e) => e.to_string(),
        };
        return Err(ArcusError::InvalidPayload { opcode, reason });
    }
    fn parse<'a, T: Deserialize<'a>>(
        opcode: Opcode,
        payload: &'a [u8],
        expected: &str,
    ) -> Result<T, ArcusError> {
        serde_json::from_slice(payload).map_err(|e| ArcusError::InvalidPayload {
            opcode,
            reason: format!("{e}; expected {expected}"),
        })
    }
    #[derive(Deserialize)]
    struct Data {
        data: Vec<KeyValue>,
    }
    #[derive(Deserialize)]
    struct Timeout {
        timeout: i32,
    }
    #[derive(Deserialize)]
    struct Status {
        status: i32,
    }
    const DATA: &str = r#"{"data": [{"key": string, "value": string}, ...]}"#;
    let data = || parse::<Data>(opcode, payload, DATA).map(|d| d.data);
    Ok(match opcode {
        Opcode::Health => {
            parse::<Map<String, Value>>(opcode, payload, "no payload")?;
            Message::Health
        }
        Opcode::HelloReply => {
            parse::<Map<String, Value>>(opcode, payload, "no payload")?;
            Message::HelloReply
        }
        Opcode::SoftStop => Message::SoftStop {
            timeout: parse::<Timeout>(opcode, payload, r#"{"timeout": int}"#)?.timeout,
        },
        Opcode::Metadata => Message::Metadata(data()?),
        Opcode::CustomCommand => Message::CustomCommand(data()?),
        Opcode::Allocated => Message::Allocated(data()?),
        Opcode::ReverseMetadata => Message::ReverseMetadata(data()?),
        Opcode::HostInformation => {
            Message::HostInformation(parse(opcode, payload, "a JSON object")?)
        }
        Opcode::InstanceInformation => {
            Message::InstanceInformation(parse(opcode, payload, "a JSON object")?)
        }
        Opcode::LiveState => Message::LiveState(parse(
            opcode,
            payload,
            "players, maxPlayers (int) and name, map, mode, version (string)",
        )?),
        Opcode::InstanceStatus => Message::InstanceStatus {
            status: parse::<Status>(opcode, payload, r#"{"status": int}"#)?.status,
        },
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks the 6 hello bytes the game sends first (agent side).
pub fn check_hello(bytes: &[u8; HELLO.len()]) -> Result<(), ArcusError> {
    if *bytes == HELLO {
        Ok(())
    } else {
        Err(ArcusError::BadHello {
            got: bytes.to_vec(),
        })
    }
}

/// Checks the 12-byte hello reply the agent sends (game side).
pub fn check_hello_reply(bytes: &[u8; HEADER_LEN]) -> Result<(), ArcusError> {
    if *bytes == HELLO_REPLY {
        Ok(())
    } else {
        Err(ArcusError::BadHelloReply {
            got: bytes.to_vec(),
        })
    }
}

/// Buffers a byte stream and yields whole frames.
#[derive(Debug)]
pub struct Decoder {
    role: Role,
    buf: Vec<u8>,
    start: usize,
}

impl Decoder {
    pub fn new(role: Role) -> Self {
        Self {
            role,
            buf: Vec::with_capacity(512),
            start: 0,
        }
    }

    /// Appends bytes read from the socket.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ArcusError> {
        match decode(&self.buf[self.start..], self.role)? {
            Decoded::Incomplete { .. } => {
                self.compact();
                Ok(None)
            }
            Decoded::Frame { len, frame } => {
                self.start += len;
                Ok(Some(frame))
            }
        }
    }

    /// Bytes buffered but not yet decoded.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

/// Writes frames with a packet id that starts at 1 and increments.
#[derive(Debug)]
pub struct Encoder {
    next_id: u32,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    pub fn new() -> Self {
        Self { next_id: 1 }
    }

    /// Appends one frame to `out`. On error nothing is written.
    pub fn encode(&mut self, message: &Message, out: &mut Vec<u8>) -> Result<(), ArcusError> {
        let id = self.next_id;
        encode_with_id(message, id, out)?;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        Ok(())
    }
}

/// Appends one frame with an explicit packet id to `out`. On error nothing is written.
pub fn encode_with_id(
    message: &Message,
    packet_id: u32,
    out: &mut Vec<u8>,
) -> Result<(), ArcusError> {
    let opcode = message.opcode();
    if opcode == Opcode::HelloReply {
        out.extend_from_slice(&HELLO_REPLY);
        return Ok(());
    }
    // Serialised straight into `out`, so the payload is neither buffered nor copied: the length
    // is patched in once known, and `out` is cut back on failure so nothing is written.
    let start = out.len();
    out.extend_from_slice(&[0, opcode as u8, 0, 0]);
    out.extend_from_slice(&packet_id.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    if let Err(e) = message.write_payload(&mut *out) {
        out.truncate(start);
        return Err(ArcusError::InvalidPayload {
            opcode,
            reason: e.to_string(),
        });
    }
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_PAYLOAD_LEN as usize {
        out.truncate(start);
        return Err(ArcusError::PayloadTooLarge { opcode, len });
    }
    out[start + 8..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// The size in bytes of the `data` payload for these pairs, to check limits before sending.
pub fn data_payload_len(data: &[KeyValue]) -> usize {
    json_len(&Data { data }).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).expect("hex"))
            .collect()
    }

    fn encoded(message: &Message, id: u32) -> Vec<u8> {
        let mut out = Vec::new();
        encode_with_id(message, id, &mut out).expect("encode");
        out
    }

    #[test]
    fn vector_hello_and_reply() {
        assert_eq!(HELLO.to_vec(), hex("61 72 63 00 01 00"));
        assert_eq!(
            HELLO_REPLY.to_vec(),
            hex("00 04 00 00 00 00 00 00 00 00 00 00")
        );
        assert_eq!(encoded(&Message::HelloReply, 99), HELLO_REPLY.to_vec());
        assert!(check_hello(&HELLO).is_ok());
        assert!(check_hello(b"arc\0\x02\0").is_err());
        assert!(check_hello_reply(&HELLO_REPLY).is_ok());
        let mut other_id = HELLO_REPLY;
        other_id[7] = 1;
        assert!(check_hello_reply(&other_id).is_err());
    }

    #[test]
    fn vector_health() {
        let bytes = hex("00 02 00 00 00 00 00 1e 00 00 00 00");
        assert_eq!(encoded(&Message::Health, 30), bytes);
        assert_eq!(
            decode(&bytes, Role::Game).expect("decode"),
            Decoded::Frame {
                len: 12,
                frame: Frame::Message {
                    packet_id: 30,
                    message: Message::Health
                }
            }
        );
    }

    #[test]
    fn vector_soft_stop() {
        let bytes =
            hex("00 30 00 00 00 00 00 07 00 00 00 0d 7b 22 74 69 6d 65 6f 75 74 22 3a 35 7d");
        let msg = Message::SoftStop { timeout: 5 };
        assert_eq!(encoded(&msg, 7), bytes);
        let Decoded::Frame { len, frame } = decode(&bytes, Role::Game).expect("decode") else {
            panic!("incomplete")
        };
        assert_eq!(len, bytes.len());
        assert_eq!(
            frame,
            Frame::Message {
                packet_id: 7,
                message: msg
            }
        );
        // The same frame arriving at the agent travels the wrong way: ignored.
        assert_eq!(
            decode(&bytes, Role::Agent).expect("decode"),
            Decoded::Frame {
                len: bytes.len(),
                frame: Frame::Ignored {
                    opcode: Opcode::SoftStop
                }
            }
        );
    }

    #[test]
    fn vector_status() {
        let bytes = hex("00 71 00 00 00 00 00 02 00 00 00 0c 7b 22 73 74 61 74 75 73 22 3a 34 7d");
        let msg = Message::InstanceStatus { status: 4 };
        assert_eq!(encoded(&msg, 2), bytes);
        let Decoded::Frame { frame, .. } = decode(&bytes, Role::Agent).expect("decode") else {
            panic!("incomplete")
        };
        assert_eq!(
            frame,
            Frame::Message {
                packet_id: 2,
                message: msg
            }
        );
    }

    #[test]
    fn vector_allocated() {
        let msg = Message::Allocated(vec![
            KeyValue::new("players", "16"),
            KeyValue::new("duration", "20"),
        ]);
        let bytes = encoded(&msg, 3);
        assert_eq!(bytes.len(), 12 + 73);
        assert_eq!(
            bytes[..12].to_vec(),
            hex("00 60 00 00 00 00 00 03 00 00 00 49")
        );
        assert_eq!(
            &bytes[12..],
            br#"{"data":[{"key":"players","value":"16"},{"key":"duration","value":"20"}]}"#
        );
    }

    #[test]
    fn vector_length_limit_from_header() {
        let mut ok = hex("00 41 00 00 00 00 00 01 00 01 ff f4");
        assert_eq!(
            decode(&ok, Role::Agent).expect("header accepted"),
            Decoded::Incomplete { needed: 131_060 }
        );
        ok[11] = 0xf5;
        assert_eq!(
            decode(&ok, Role::Agent),
            Err(ArcusError::FrameTooLarge(131_061))
        );
    }

    #[test]
    fn header_errors() {
        let flags = hex("01 02 00 00 00 00 00 01 00 00 00 00");
        assert_eq!(
            decode(&flags, Role::Agent),
            Err(ArcusError::NonZeroFlags(1))
        );
        let unknown = hex("00 99 00 00 00 00 00 01 00 00 00 00");
        assert_eq!(
            decode(&unknown, Role::Agent),
            Err(ArcusError::UnknownOpcode(0x99))
        );
        // Reserved bytes are ignored on receive.
        let reserved = hex("00 02 ff ee 00 00 00 01 00 00 00 00");
        assert!(matches!(
            decode(&reserved, Role::Agent),
            Ok(Decoded::Frame { .. })
        ));
    }

    fn raw(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0, opcode, 0, 0, 0, 0, 0, 1];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn payload_validation() {
        let bad = |op, p: &[u8]| {
            assert!(
                matches!(
                    decode(&raw(op, p), Role::Agent),
                    Err(ArcusError::InvalidPayload { .. })
                ),
                "{op:#x} {:?} should be rejected",
                String::from_utf8_lossy(p)
            )
        };
        bad(0x71, b"{\"status\":5.0}");
        bad(0x71, b"{\"status\":\"4\"}");
        bad(0x71, b"{\"status\":2147483648}");
        bad(0x71, b"{}");
        bad(0x71, b"[1]");
        bad(0x71, b"{\"status\":4");
        bad(0x71, b"\xff\xfe");
        bad(0x41, b"{\"data\":[{\"key\":\"a\",\"value\":3}]}");
        bad(0x41, b"{\"data\":{}}");
        bad(
            0x20,
            br#"{"players":1,"maxPlayers":2,"name":"n","map":"m","mode":"x"}"#,
        );
        let live = br#"{"players":1,"maxPlayers":2,"name":"n","map":"m","mode":"x","version":"v","ping":3}"#;
        let Ok(Decoded::Frame { frame, .. }) = decode(&raw(0x20, live), Role::Agent) else {
            panic!("live state rejected")
        };
        let Frame::Message {
            message: Message::LiveState(state),
            ..
        } = frame
        else {
            panic!("not live state")
        };
        assert_eq!(state.players, 1);
        assert_eq!(state.extra.get("ping"), Some(&Value::from(3)));
        // `{}` means the same as an empty payload.
        assert!(matches!(
            decode(&raw(0x02, b"{}"), Role::Agent),
            Ok(Decoded::Frame { .. })
        ));
        // Unknown extra keys are ignored.
        assert!(matches!(
            decode(&raw(0x71, b"{\"status\":3,\"x\":[1]}"), Role::Agent),
            Ok(Decoded::Frame { .. })
        ));
    }

    #[test]
    fn measured_sizes_match_the_encoding() {
        let data = vec![
            KeyValue::new("map", "dust \"2\""),
            KeyValue::new("é", "\u{1}"),
        ];
        let frame = encoded(&Message::Allocated(data.clone()), 1);
        assert_eq!(data_payload_len(&data), frame.len() - HEADER_LEN);
        let value = serde_json::json!({"a": [1, 2.5, null], "b": "\n"});
        assert_eq!(
            json_len(&value).expect("len"),
            serde_json::to_vec(&value).expect("vec").len()
        );
    }

    #[test]
    fn oversized_payload_is_refused_by_encoder() {
        let big = vec![KeyValue::new("k", "x".repeat(MAX_PAYLOAD_LEN as usize))];
        let mut out = Vec::new();
        assert!(matches!(
            encode_with_id(&Message::Allocated(big.clone()), 1, &mut out),
            Err(ArcusError::PayloadTooLarge { .. })
        ));
        assert!(out.is_empty());
        // Frames already in the buffer are kept.
        let health = encoded(&Message::Health, 1);
        out.extend_from_slice(&health);
        assert!(encode_with_id(&Message::Allocated(big), 2, &mut out).is_err());
        assert_eq!(out, health);
    }

    #[test]
    fn empty_information_is_sent_as_length_zero() {
        let bytes = encoded(&Message::HostInformation(Map::new()), 4);
        assert_eq!(bytes.len(), HEADER_LEN);
    }

    #[test]
    fn decoder_handles_split_and_merged_frames() {
        let mut stream = Vec::new();
        let mut enc = Encoder::new();
        let msgs = vec![
            Message::InstanceStatus { status: 3 },
            Message::Health,
            Message::ReverseMetadata(vec![KeyValue::new("a", "b")]),
            Message::InstanceStatus { status: 4 },
        ];
        for m in &msgs {
            enc.encode(m, &mut stream).expect("encode");
        }
        for chunk in [1usize, 2, 5, 13, 1000] {
            let mut dec = Decoder::new(Role::Agent);
            let mut got = Vec::new();
            for part in stream.chunks(chunk) {
                dec.extend(part);
                while let Some(Frame::Message { message, .. }) = dec.next_frame().expect("valid") {
                    got.push(message);
                }
            }
            assert_eq!(got, msgs, "chunk size {chunk}");
            assert_eq!(dec.pending(), 0);
        }
    }

    #[test]
    fn encoder_counts_from_one() {
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        enc.encode(&Message::Health, &mut out).expect("encode");
        enc.encode(&Message::Health, &mut out).expect("encode");
        assert_eq!(&out[4..8], &[0, 0, 0, 1]);
        assert_eq!(&out[16..20], &[0, 0, 0, 2]);
    }
}
