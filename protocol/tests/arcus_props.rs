//! Property tests for the Arcus codec (ARCUS.md): what one side encodes the other decodes to the
//! same message, partial input only ever asks for more, and no byte sequence or chunking makes
//! the decoder panic or disagree with itself.

#[path = "../fuzz/checks.rs"]
mod checks;

use berth_protocol::KeyValue;
use berth_protocol::arcus::{
    self, Decoded, Decoder, Encoder, Frame, HEADER_LEN, LiveState, Message, Role,
};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use serde_json::{Map, Value};

/// Strings over all of Unicode, control characters and quotes included; `any::<String>()`
/// leaves out newlines.
fn text() -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..12).prop_map(|chars| chars.into_iter().collect())
}

/// i32 across its whole range, with the edges always in the mix.
fn int() -> impl Strategy<Value = i32> {
    prop_oneof![
        Just(i32::MIN),
        Just(i32::MAX),
        Just(0),
        Just(-1),
        any::<i32>()
    ]
}

fn data() -> impl Strategy<Value = Vec<KeyValue>> {
    vec(
        (text(), text()).prop_map(|(k, v)| KeyValue::new(k, v)),
        0..6,
    )
}

/// JSON scalars that survive a text round trip exactly. Floats are left out here: serde_json
/// without its `float_roundtrip` feature parses some of them a few ULPs off, which
/// `floats_roundtrip_within_a_few_ulps` pins down.
fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        text().prop_map(Value::from),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            btree_map(text(), inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Host and instance information: any object, the empty one included (sent as length 0).
fn object() -> impl Strategy<Value = Map<String, Value>> {
    btree_map(text(), json(), 0..6).prop_map(|m| m.into_iter().collect())
}

const LIVE_STATE_FIELDS: [&str; 6] = ["players", "maxPlayers", "name", "map", "mode", "version"];

fn live_state() -> impl Strategy<Value = LiveState> {
    let extra_key = text().prop_filter("a named live state field", |k| {
        !LIVE_STATE_FIELDS.contains(&k.as_str())
    });
    (
        int(),
        int(),
        (text(), text(), text(), text()),
        btree_map(extra_key, scalar(), 0..4),
    )
        .prop_map(
            |(players, max_players, (name, map, mode, version), extra)| LiveState {
                players,
                max_players,
                name,
                map,
                mode,
                version,
                extra: extra.into_iter().collect(),
            },
        )
}

/// Messages the agent sends, which the game decodes.
fn to_game() -> impl Strategy<Value = Message> {
    prop_oneof![
        Just(Message::Health),
        Just(Message::HelloReply),
        int().prop_map(|timeout| Message::SoftStop { timeout }),
        data().prop_map(Message::Metadata),
        data().prop_map(Message::CustomCommand),
        object().prop_map(Message::HostInformation),
        data().prop_map(Message::Allocated),
        object().prop_map(Message::InstanceInformation),
    ]
}

/// Messages the game sends, which the agent decodes.
fn to_agent() -> impl Strategy<Value = Message> {
    prop_oneof![
        Just(Message::Health),
        live_state().prop_map(Message::LiveState),
        data().prop_map(Message::ReverseMetadata),
        int().prop_map(|status| Message::InstanceStatus { status }),
    ]
}

fn any_message() -> impl Strategy<Value = Message> {
    prop_oneof![to_game(), to_agent()]
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Agent), Just(Role::Game)]
}

fn other(role: Role) -> Role {
    match role {
        Role::Agent => Role::Game,
        Role::Game => Role::Agent,
    }
}

/// Which side receives `message` (Health goes both ways; the agent's side is returned).
fn receiver(message: &Message) -> Role {
    match message {
        Message::LiveState(_)
        | Message::ReverseMetadata(_)
        | Message::InstanceStatus { .. }
        | Message::Health => Role::Agent,
        _ => Role::Game,
    }
}

fn encode(message: &Message, packet_id: u32) -> Vec<u8> {
    let mut out = Vec::new();
    arcus::encode_with_id(message, packet_id, &mut out).expect("small messages encode");
    out
}

/// What `role` should make of a frame carrying `message` with `packet_id`.
fn expected_frame(message: &Message, packet_id: u32, role: Role) -> Frame {
    if *message == Message::Health || receiver(message) == role {
        Frame::Message {
            // The hello reply is a fixed frame: packet id 0 whatever the encoder was given.
            packet_id: if *message == Message::HelloReply {
                0
            } else {
                packet_id
            },
            message: message.clone(),
        }
    } else {
        Frame::Ignored {
            opcode: message.opcode(),
        }
    }
}

fn roundtrip(message: Message, packet_id: u32, role: Role) -> Result<(), TestCaseError> {
    let bytes = encode(&message, packet_id);
    prop_assert_eq!(
        arcus::decode(&bytes, role),
        Ok(Decoded::Frame {
            len: bytes.len(),
            frame: expected_frame(&message, packet_id, role),
        })
    );
    // The same frame travelling the wrong way is ignored, unparsed; health is for both sides.
    prop_assert_eq!(
        arcus::decode(&bytes, other(role)),
        Ok(Decoded::Frame {
            len: bytes.len(),
            frame: expected_frame(&message, packet_id, other(role)),
        })
    );
    Ok(())
}

/// Valid frames with a few bytes overwritten: gets past the header checks into payload
/// validation far more often than uniform random bytes do.
fn damaged_stream() -> impl Strategy<Value = Vec<u8>> {
    (
        vec((any_message(), any::<u32>()), 1..4),
        vec((any::<usize>(), any::<u8>()), 0..4),
    )
        .prop_map(|(messages, damage)| {
            let mut bytes = Vec::new();
            for (m, id) in &messages {
                bytes.extend(encode(m, *id));
            }
            for (at, b) in damage {
                let i = at % bytes.len();
                bytes[i] = b;
            }
            bytes
        })
}

/// A header announcing exactly the payload that follows, for a known opcode, with a payload
/// that is random bytes or random JSON: exercises every payload parser with junk.
fn framed_junk() -> impl Strategy<Value = Vec<u8>> {
    let opcode = prop::sample::select(vec![
        0x02u8, 0x04, 0x20, 0x30, 0x40, 0x41, 0x45, 0x50, 0x60, 0x70, 0x71,
    ]);
    let payload = prop_oneof![
        vec(any::<u8>(), 0..64),
        json().prop_map(|v| v.to_string().into_bytes()),
        object().prop_map(|m| Value::Object(m).to_string().into_bytes()),
    ];
    (opcode, payload).prop_map(|(op, payload)| {
        let mut v = vec![0, op, 0, 0, 0, 0, 0, 1];
        v.extend((payload.len() as u32).to_be_bytes());
        v.extend(payload);
        v
    })
}

fn any_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..300),
        damaged_stream(),
        vec(framed_junk(), 1..4).prop_map(|frames| frames.concat()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// (a) Every agent → game message, decoded by the game, is the message that was encoded.
    #[test]
    fn agent_to_game_messages_roundtrip(message in to_game(), id in any::<u32>()) {
        roundtrip(message, id, Role::Game)?;
    }

    /// (a) Every game → agent message, decoded by the agent, is the message that was encoded.
    #[test]
    fn game_to_agent_messages_roundtrip(message in to_agent(), id in any::<u32>()) {
        roundtrip(message, id, Role::Agent)?;
    }

    /// (b) Any strict prefix of a frame is incomplete, and never asks for more than the rest of
    /// the frame: a reader that reads exactly `needed` bytes cannot overrun into the next frame.
    #[test]
    fn strict_prefixes_ask_for_more(message in any_message(), id in any::<u32>(), role in role()) {
        let bytes = encode(&message, id);
        for n in 0..bytes.len() {
            match arcus::decode(&bytes[..n], role) {
                Ok(Decoded::Incomplete { needed }) => {
                    prop_assert!(needed >= 1);
                    prop_assert!(n + needed <= bytes.len(), "prefix {} needed {}", n, needed);
                    // Once the header is in, the frame's size is known exactly.
                    if n >= HEADER_LEN {
                        prop_assert_eq!(n + needed, bytes.len());
                    }
                }
                other => prop_assert!(false, "prefix {} of {:?}: {:?}", n, message, other),
            }
        }
    }

    /// (c) No bytes make `decode` panic, for either role, and a `Decoder` fed them in any
    /// chunking agrees with `decode` reading them at once (same frames, same error, same
    /// number of bytes consumed).
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in any_bytes(),
        chunks in vec(1usize..40, 1..16),
        selector in any::<u8>(),
    ) {
        for role in [Role::Agent, Role::Game] {
            let whole = checks::walk(&bytes, role);
            prop_assert_eq!(&checks::feed(&bytes, role, &chunks), &whole);
        }
        let mut fuzz_input = vec![selector];
        fuzz_input.extend(&bytes);
        checks::arcus_decode(&fuzz_input);
    }

    /// (d) Several frames fed through a `Decoder` in any chunk sizes come out exactly, in order;
    /// wrong-way frames come out as ignored; nothing is left over.
    #[test]
    fn streams_come_out_in_order(
        messages in vec(any_message(), 0..8),
        chunks in vec(1usize..64, 1..20),
        role in role(),
    ) {
        let mut encoder = Encoder::new();
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            encoder.encode(m, &mut stream).expect("small messages encode");
            expected.push(expected_frame(m, i as u32 + 1, role));
        }
        let mut decoder = Decoder::new(role);
        let mut got = Vec::new();
        let mut rest = &stream[..];
        for &size in chunks.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, tail) = rest.split_at(size.min(rest.len()));
            rest = tail;
            decoder.extend(chunk);
            while let Some(frame) = decoder.next_frame().expect("a valid stream") {
                got.push(frame);
            }
        }
        prop_assert_eq!(got, expected);
        prop_assert_eq!(decoder.pending(), 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Floats in free-form objects come back within a few ULPs, not always exactly: with
    /// serde_json's default float parsing `-1.0247909364598075e-302` comes back as
    /// `-1.0247909364598077e-302`.
    #[test]
    fn floats_roundtrip_within_a_few_ulps(
        x in any::<f64>().prop_filter("JSON has no NaN or infinity", |x| x.is_finite()),
    ) {
        let mut extra = Map::new();
        extra.insert("ping".into(), Value::from(x));
        for message in [
            Message::HostInformation(extra.clone()),
            Message::LiveState(LiveState {
                players: 1,
                max_players: 2,
                name: "n".into(),
                map: "m".into(),
                mode: "x".into(),
                version: "v".into(),
                extra: extra.clone(),
            }),
        ] {
            let bytes = encode(&message, 1);
            let Ok(Decoded::Frame { frame: Frame::Message { message: got, .. }, .. }) =
                arcus::decode(&bytes, receiver(&message))
            else {
                return Err(TestCaseError::fail(format!("{message:?} does not decode")));
            };
            prop_assert!(checks::same_message(&got, &message), "{:?} became {:?}", message, got);
        }
    }
}

/// Empty host/instance information is sent as a bare header and arrives as an empty object.
#[test]
fn empty_information_roundtrips_as_length_zero() {
    for message in [
        Message::HostInformation(Map::new()),
        Message::InstanceInformation(Map::new()),
    ] {
        let bytes = encode(&message, 9);
        assert_eq!(bytes.len(), HEADER_LEN);
        assert_eq!(
            arcus::decode(&bytes, Role::Game),
            Ok(Decoded::Frame {
                len: HEADER_LEN,
                frame: Frame::Message {
                    packet_id: 9,
                    message
                }
            })
        );
    }
}
