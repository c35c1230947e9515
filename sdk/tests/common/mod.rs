//! An agent-side Arcus client for the tests: it plays the Berth agent against the SDK's server.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use berth_protocol::arcus::{self, Decoder, Encoder, Frame, HELLO, HELLO_REPLY, Message, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Failure guard only: every wait below is for an event that should come at once (or, for
/// health frames, within a few seconds). Hitting it fails the test instead of hanging it.
pub const GUARD: Duration = Duration::from_secs(10);

pub async fn guard<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(GUARD, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

pub struct Agent {
    pub stream: TcpStream,
    decoder: Decoder,
    encoder: Encoder,
}

impl Agent {
    /// Connects and completes the handshake as ARCUS.md §2 asks of the agent.
    pub async fn connect(addr: SocketAddr) -> Self {
        let mut stream = guard("connect", TcpStream::connect(addr))
            .await
            .expect("connect to the management port");
        let mut hello = [0u8; HELLO.len()];
        guard("the hello", stream.read_exact(&mut hello))
            .await
            .expect("read the hello");
        arcus::check_hello(&hello).expect("the game's hello");
        stream
            .write_all(&HELLO_REPLY)
            .await
            .expect("send the hello reply");
        Self::from_stream(stream)
    }

    pub fn from_stream(stream: TcpStream) -> Self {
        Self {
            stream,
            decoder: Decoder::new(Role::Agent),
            encoder: Encoder::new(),
        }
    }

    pub async fn send(&mut self, message: &Message) {
        let mut out = Vec::new();
        self.encoder.encode(message, &mut out).expect("encode");
        self.send_raw(&out).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .await
            .expect("write to the game");
    }

    /// The next message from the game; `None` once the game closed the link.
    pub async fn next_message(&mut self) -> Option<Message> {
        loop {
            match self
                .decoder
                .next_frame()
                .expect("the game sends valid Arcus")
            {
                Some(Frame::Message { message, .. }) => return Some(message),
                Some(Frame::Ignored { opcode }) => panic!("the game sent agent opcode {opcode:?}"),
                None => {}
            }
            let mut buf = [0u8; 4096];
            match guard("a frame from the game", self.stream.read(&mut buf)).await {
                // A reset is how a close with unread input looks; both end the link.
                Ok(0) | Err(_) => return None,
                Ok(n) => self.decoder.extend(&buf[..n]),
            }
        }
    }

    /// The next message that is not a health frame.
    pub async fn next_non_health(&mut self) -> Option<Message> {
        loop {
            match self.next_message().await? {
                Message::Health => continue,
                other => return Some(other),
            }
        }
    }

    /// The next status, skipping health frames and live states.
    pub async fn next_status(&mut self) -> i32 {
        loop {
            match self.next_message().await {
                Some(Message::InstanceStatus { status }) => return status,
                Some(Message::Health | Message::LiveState(_)) => continue,
                Some(other) => panic!("expected a status, got {other:?}"),
                None => panic!("the game closed the link while we waited for a status"),
            }
        }
    }

    /// Waits until the game closes the link, failing on anything but health frames.
    pub async fn expect_closed(&mut self) {
        loop {
            match self.next_message().await {
                None => return,
                Some(Message::Health) => continue,
                Some(other) => panic!("expected the link to close, got {other:?}"),
            }
        }
    }
}

/// Reads until EOF or reset and returns every byte received.
pub async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match guard("the game to close the connection", stream.read(&mut buf)).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}
