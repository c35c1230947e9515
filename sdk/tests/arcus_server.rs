//! The SDK's Arcus server against an agent-side client (ARCUS.md §2–§5).

mod common;

use std::time::Duration;

use berth_protocol::KeyValue;
use berth_protocol::arcus::{
    ArcusError, HEALTH_INTERVAL, HELLO, HELLO_REPLY, LiveState, Message, Opcode, encode_with_id,
};
use berth_sdk::{
    ArcusServer, Event, GameStatus, HELLO_REPLY_TIMEOUT, HandshakeError, LinkClosed, SdkError,
};
use common::{Agent, guard, read_to_close};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn server() -> ArcusServer {
    ArcusServer::bind(0).await.expect("bind on a free port")
}

async fn next_event(server: &mut ArcusServer) -> Event {
    guard("an SDK event", server.next_event())
        .await
        .expect("the server task is running")
}

async fn expect_connected(server: &mut ArcusServer) {
    match next_event(server).await {
        Event::Connected { .. } => {}
        other => panic!("expected Connected, got {other:?}"),
    }
}

fn live_state(players: i32) -> LiveState {
    LiveState {
        players,
        max_players: 16,
        name: "test".into(),
        map: "dust".into(),
        mode: "ffa".into(),
        version: "1".into(),
        extra: Map::new(),
    }
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

#[tokio::test]
async fn bind_failure_names_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    match ArcusServer::bind(port).await {
        Err(SdkError::Bind { addr, .. }) => assert_eq!(addr.port(), port),
        other => panic!("expected a bind error, got {other:?}"),
    }
}

#[tokio::test]
async fn handshake_then_status_arrives() {
    let mut server = server().await;
    assert!(server.local_addr().ip().is_loopback());
    let mut agent = Agent::connect(server.local_addr()).await;
    assert_eq!(
        agent.next_message().await,
        Some(Message::InstanceStatus { status: 3 })
    );
    expect_connected(&mut server).await;
}

#[tokio::test]
async fn status_changes_reach_the_agent() {
    let mut server = server().await;
    let handle = server.handle().clone();
    let mut agent = Agent::connect(server.local_addr()).await;
    assert_eq!(agent.next_status().await, 3);
    expect_connected(&mut server).await;

    handle.set_status(GameStatus::Online).expect("set");
    assert_eq!(agent.next_status().await, 4);
    handle.set_status(GameStatus::Allocated).expect("set");
    // An unchanged status is not repeated: the next frame is the following change.
    handle.set_status(GameStatus::Allocated).expect("set");
    handle.set_status(GameStatus::Online).expect("set");
    assert_eq!(
        agent.next_non_health().await,
        Some(Message::InstanceStatus { status: 5 })
    );
    assert_eq!(
        agent.next_non_health().await,
        Some(Message::InstanceStatus { status: 4 })
    );
}

#[tokio::test]
async fn state_set_without_agent_is_sent_on_connect() {
    let mut server = server().await;
    let handle = server.handle().clone();
    handle.set_status(GameStatus::Online).expect("set");
    handle.set_live_state(live_state(1)).expect("set");
    handle
        .send_reverse_metadata(vec![KeyValue::new("score", "7")])
        .expect("send");

    let mut agent = Agent::connect(server.local_addr()).await;
    assert_eq!(
        agent.next_message().await,
        Some(Message::InstanceStatus { status: 4 })
    );
    assert_eq!(
        agent.next_message().await,
        Some(Message::LiveState(live_state(1)))
    );
    assert_eq!(
        agent.next_message().await,
        Some(Message::ReverseMetadata(vec![KeyValue::new("score", "7")]))
    );
    expect_connected(&mut server).await;

    // The live state was delivered and did not change, so the next link gets only the status
    // (ARCUS.md §2.4): the frame after it is the status change below, not a live state.
    let mut second = Agent::connect(server.local_addr()).await;
    assert_eq!(
        second.next_message().await,
        Some(Message::InstanceStatus { status: 4 })
    );
    handle.set_status(GameStatus::Allocated).expect("set");
    assert_eq!(
        second.next_non_health().await,
        Some(Message::InstanceStatus { status: 5 })
    );
    // A changed live state goes out at once on the current link.
    handle.set_live_state(live_state(2)).expect("set");
    assert_eq!(
        second.next_non_health().await,
        Some(Message::LiveState(live_state(2)))
    );
    handle
        .send_reverse_metadata(vec![KeyValue::new("round", "2")])
        .expect("send");
    assert_eq!(
        second.next_non_health().await,
        Some(Message::ReverseMetadata(vec![KeyValue::new("round", "2")]))
    );
}

#[tokio::test]
async fn oversized_messages_are_refused_by_the_handle() {
    let server = server().await;
    let mut state = live_state(0);
    state.name = "x".repeat(200_000);
    assert!(matches!(
        server.handle().set_live_state(state),
        Err(SdkError::Protocol(ArcusError::PayloadTooLarge { .. }))
    ));
    let mut state = live_state(0);
    state.extra.insert("players".into(), json!(3));
    assert!(matches!(
        server.handle().set_live_state(state),
        Err(SdkError::Protocol(ArcusError::InvalidPayload { .. }))
    ));
    let too_many: Vec<_> = (0..65).map(|i| KeyValue::new(i.to_string(), "v")).collect();
    assert!(matches!(
        server.handle().send_reverse_metadata(too_many),
        Err(SdkError::Metadata(_))
    ));
}

#[tokio::test]
async fn agent_messages_become_events() {
    let mut server = server().await;
    let mut agent = Agent::connect(server.local_addr()).await;
    assert_eq!(agent.next_status().await, 3);
    expect_connected(&mut server).await;

    let host = object(json!({"id": 1, "serverId": 2, "serverName": "h1"}));
    let instance = object(json!({"fleetId": "f", "hostId": 1, "isVirtual": false}));
    let allocation = vec![KeyValue::new("players", "16"), KeyValue::new("map", "dust")];
    agent.send(&Message::HostInformation(host.clone())).await;
    agent
        .send(&Message::InstanceInformation(instance.clone()))
        .await;
    // None of these is for the game: health and a late hello reply are swallowed, and a
    // game-side opcode travelling the wrong way is ignored (ARCUS.md §4).
    agent.send(&Message::Health).await;
    agent.send_raw(&HELLO_REPLY).await;
    agent.send(&Message::InstanceStatus { status: 4 }).await;
    agent.send(&Message::Allocated(allocation.clone())).await;
    agent
        .send(&Message::Metadata(vec![KeyValue::new("mode", "ranked")]))
        .await;
    agent
        .send(&Message::CustomCommand(vec![KeyValue::new(
            "command",
            "deallocated",
        )]))
        .await;
    agent.send(&Message::SoftStop { timeout: 5 }).await;

    match next_event(&mut server).await {
        Event::HostInformation(got) => assert_eq!(got, host),
        other => panic!("expected host information, got {other:?}"),
    }
    match next_event(&mut server).await {
        Event::InstanceInformation(got) => assert_eq!(got, instance),
        other => panic!("expected instance information, got {other:?}"),
    }
    match next_event(&mut server).await {
        Event::Allocated(got) => assert_eq!(got, allocation),
        other => panic!("expected allocated, got {other:?}"),
    }
    match next_event(&mut server).await {
        Event::Metadata(got) => assert_eq!(got, vec![KeyValue::new("mode", "ranked")]),
        other => panic!("expected metadata, got {other:?}"),
    }
    match next_event(&mut server).await {
        Event::CustomCommand(got) => {
            assert_eq!(got, vec![KeyValue::new("command", "deallocated")]);
        }
        other => panic!("expected a custom command, got {other:?}"),
    }
    match next_event(&mut server).await {
        Event::SoftStop { timeout } => assert_eq!(timeout, 5),
        other => panic!("expected soft stop, got {other:?}"),
    }
}

#[tokio::test]
async fn frames_split_into_single_bytes_are_reassembled() {
    let mut server = server().await;
    let mut agent = Agent::connect(server.local_addr()).await;
    assert_eq!(agent.next_status().await, 3);
    expect_connected(&mut server).await;

    // Without Nagle every write leaves as its own segment, so the game really sees the frame
    // a byte at a time.
    agent.stream.set_nodelay(true).expect("nodelay");
    let mut bytes = Vec::new();
    encode_with_id(&Message::SoftStop { timeout: 9 }, 1, &mut bytes).expect("encode");
    for byte in bytes {
        agent.send_raw(&[byte]).await;
    }
    match next_event(&mut server).await {
        Event::SoftStop { timeout } => assert_eq!(timeout, 9),
        other => panic!("expected soft stop, got {other:?}"),
    }
}

#[tokio::test]
async fn client_that_speaks_first_is_closed() {
    let mut server = server().await;
    let mut stream = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    let started = tokio::time::Instant::now();
    // Shorter than a hello reply: the game must not wait for the rest of 12 bytes.
    stream.write_all(b"hi\n").await.expect("write garbage");
    let got = read_to_close(&mut stream).await;
    assert!(
        started.elapsed() < HELLO_REPLY_TIMEOUT / 2,
        "closed only after {:?}",
        started.elapsed()
    );
    // Depending on whether the garbage arrived before the accept, the game either closed at
    // once or said hello first; it never sent a status.
    assert!(
        HELLO.starts_with(&got),
        "expected nothing or the hello, got {got:02x?}"
    );
    match next_event(&mut server).await {
        Event::Rejected {
            reason:
                HandshakeError::Protocol(ArcusError::SpokeFirst(_) | ArcusError::BadHelloReply { .. }),
            ..
        } => {}
        other => panic!("expected a rejection, got {other:?}"),
    }

    // The server still serves a well-behaved agent afterwards.
    let mut agent = Agent::connect(server.local_addr()).await;
    assert_eq!(agent.next_status().await, 3);
    expect_connected(&mut server).await;
}

#[tokio::test]
async fn wrong_hello_reply_closes_the_connection() {
    let mut server = server().await;
    let mut stream = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    let mut hello = [0u8; HELLO.len()];
    guard("the hello", stream.read_exact(&mut hello))
        .await
        .expect("hello");
    assert_eq!(hello, HELLO);
    // A health frame with packet id 1 is a well-formed frame but not the hello reply.
    let mut reply = HELLO_REPLY;
    reply[7] = 1;
    stream.write_all(&reply).await.expect("write");
    let got = read_to_close(&mut stream).await;
    assert!(got.is_empty(), "expected no status, got {got:02x?}");
    match next_event(&mut server).await {
        Event::Rejected {
            reason: HandshakeError::Protocol(ArcusError::BadHelloReply { got }),
            ..
        } => assert_eq!(got, reply.to_vec()),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// Takes the 5 s hello reply timeout of real time.
#[tokio::test]
async fn silent_client_neither_blocks_the_agent_nor_stays_open() {
    let mut server = server().await;
    let mut silent = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    let mut hello = [0u8; HELLO.len()];
    guard("the hello", silent.read_exact(&mut hello))
        .await
        .expect("hello");
    let started = tokio::time::Instant::now();

    // A real agent gets through while the silent one is still in its handshake.
    let mut agent = Agent::connect(server.local_addr()).await;
    assert_eq!(agent.next_status().await, 3);
    expect_connected(&mut server).await;

    assert!(read_to_close(&mut silent).await.is_empty());
    let waited = started.elapsed();
    assert!(
        waited >= HELLO_REPLY_TIMEOUT - Duration::from_millis(100),
        "closed after {waited:?}"
    );
    match next_event(&mut server).await {
        Event::Rejected {
            reason: HandshakeError::Timeout,
            ..
        } => {}
        other => panic!("expected a handshake timeout, got {other:?}"),
    }
    // The established link is untouched.
    server.handle().set_status(GameStatus::Online).expect("set");
    assert_eq!(agent.next_status().await, 4);
}

#[tokio::test]
async fn new_connection_replaces_the_old_one() {
    let mut server = server().await;
    let handle = server.handle().clone();
    let mut first = Agent::connect(server.local_addr()).await;
    assert_eq!(first.next_status().await, 3);
    expect_connected(&mut server).await;

    let mut second = Agent::connect(server.local_addr()).await;
    assert_eq!(second.next_status().await, 3);
    first.expect_closed().await;
    match next_event(&mut server).await {
        Event::Disconnected {
            reason: LinkClosed::Replaced,
        } => {}
        other => panic!("expected the old link to be replaced, got {other:?}"),
    }
    expect_connected(&mut server).await;

    // Only the new link is live.
    handle.set_status(GameStatus::Online).expect("set");
    assert_eq!(second.next_status().await, 4);
}

/// Whether an error is the one a malformed frame must cause.
type ExpectedError = fn(&ArcusError) -> bool;

/// Bytes that are not valid Arcus for the game, each with a check of the error it must cause.
fn malformed_frames() -> Vec<(&'static str, Vec<u8>, ExpectedError)> {
    let frame = |opcode: u8, payload: &[u8]| {
        let mut v = vec![0, opcode, 0, 0, 0, 0, 0, 1];
        v.extend_from_slice(&u32::try_from(payload.len()).expect("len").to_be_bytes());
        v.extend_from_slice(payload);
        v
    };
    let mut flags = frame(0x02, b"");
    flags[0] = 1;
    vec![
        ("non-zero flags", flags, |e| {
            matches!(e, ArcusError::NonZeroFlags(1))
        }),
        ("unknown opcode", frame(0x99, b""), |e| {
            matches!(e, ArcusError::UnknownOpcode(0x99))
        }),
        (
            "frame over the limit",
            vec![0, 0x40, 0, 0, 0, 0, 0, 1, 0, 0x01, 0xff, 0xf5],
            |e| matches!(e, ArcusError::FrameTooLarge(131_061)),
        ),
        ("invalid JSON", frame(0x40, b"{\"data\":"), |e| {
            matches!(e, ArcusError::InvalidPayload { opcode: Opcode::Metadata, reason }
                if reason.contains("EOF while parsing"))
        }),
        ("array root", frame(0x50, b"[1,2]"), |e| {
            matches!(e, ArcusError::InvalidPayload { opcode: Opcode::HostInformation, reason }
                if reason.contains("root must be an object, got an array"))
        }),
        ("missing field", frame(0x30, b"{}"), |e| {
            matches!(e, ArcusError::InvalidPayload { opcode: Opcode::SoftStop, reason }
                if reason.contains("missing field `timeout`"))
        }),
        ("float timeout", frame(0x30, b"{\"timeout\":5.0}"), |e| {
            matches!(e, ArcusError::InvalidPayload { opcode: Opcode::SoftStop, reason }
                if reason.contains("floating point"))
        }),
    ]
}

#[tokio::test]
async fn malformed_frame_closes_the_link_and_the_server_accepts_a_new_one() {
    let mut server = server().await;
    for (name, bytes, expected) in malformed_frames() {
        let mut agent = Agent::connect(server.local_addr()).await;
        assert_eq!(agent.next_status().await, 3, "{name}");
        expect_connected(&mut server).await;
        agent.send_raw(&bytes).await;
        agent.expect_closed().await;
        match next_event(&mut server).await {
            Event::Disconnected {
                reason: LinkClosed::Protocol(e),
            } => assert!(expected(&e), "{name}: wrong protocol error {e:?}"),
            other => panic!("{name}: expected a protocol error, got {other:?}"),
        }
    }
    let mut agent = Agent::connect(server.local_addr()).await;
    assert_eq!(agent.next_status().await, 3);
}

#[tokio::test]
async fn agent_eof_is_reported() {
    let mut server = server().await;
    let mut agent = Agent::connect(server.local_addr()).await;
    assert_eq!(agent.next_status().await, 3);
    expect_connected(&mut server).await;
    drop(agent);
    match next_event(&mut server).await {
        Event::Disconnected {
            reason: LinkClosed::Eof | LinkClosed::Io(_),
        } => {}
        other => panic!("expected a disconnect, got {other:?}"),
    }
}

/// Takes one health interval (5 s) of real time: the interval is a protocol constant.
#[tokio::test]
async fn health_frames_are_sent() {
    let server = server().await;
    let mut agent = Agent::connect(server.local_addr()).await;
    assert_eq!(agent.next_status().await, 3);
    let started = tokio::time::Instant::now();
    assert_eq!(agent.next_message().await, Some(Message::Health));
    let waited = started.elapsed();
    assert!(
        waited >= HEALTH_INTERVAL - Duration::from_millis(100),
        "health came after {waited:?}, before the 5 s interval"
    );
}

/// Takes the full 20 s link timeout of real time; run with `--ignored`.
#[tokio::test]
#[ignore = "waits 20 s of real time for the link timeout"]
async fn silent_agent_is_dropped_after_the_link_timeout() {
    let mut server = server().await;
    let mut agent = Agent::connect(server.local_addr()).await;
    assert_eq!(agent.next_status().await, 3);
    expect_connected(&mut server).await;
    let event = tokio::time::timeout(Duration::from_secs(25), server.next_event())
        .await
        .expect("the link timed out within 25 s");
    match event {
        Some(Event::Disconnected {
            reason: LinkClosed::Timeout,
        }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    // The agent saw health frames, then the close.
    agent.expect_closed().await;
}

#[tokio::test]
async fn a_game_that_falls_behind_gets_every_event_in_order() {
    let mut server = server().await;
    let handle = server.handle().clone();
    let mut agent = Agent::connect(server.local_addr()).await;
    assert_eq!(agent.next_status().await, 3);
    // Far more frames than the event queue holds, while the game reads nothing.
    for i in 0..200 {
        agent
            .send(&Message::Metadata(vec![KeyValue::new("i", i.to_string())]))
            .await;
    }
    // The backlog only pauses reading from the agent; the game's own updates still go out.
    handle.set_status(GameStatus::Online).expect("set");
    assert_eq!(agent.next_status().await, 4);

    expect_connected(&mut server).await;
    for i in 0..200 {
        match next_event(&mut server).await {
            Event::Metadata(data) => assert_eq!(data, vec![KeyValue::new("i", i.to_string())]),
            other => panic!("expected metadata {i}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn dropping_the_events_keeps_the_link_working() {
    let server = server().await;
    let addr = server.local_addr();
    let (handle, events) = server.into_parts();
    drop(events);
    let mut agent = Agent::connect(addr).await;
    assert_eq!(agent.next_status().await, 3);
    for _ in 0..100 {
        agent.send(&Message::Metadata(Vec::new())).await;
    }
    handle.set_status(GameStatus::Online).expect("set");
    assert_eq!(agent.next_status().await, 4);
    // Events are discarded, not queued, so more agent traffic is still read and accepted.
    agent.send(&Message::SoftStop { timeout: 1 }).await;
    handle.set_status(GameStatus::Allocated).expect("set");
    assert_eq!(agent.next_status().await, 5);
}
