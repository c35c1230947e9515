//! The game-server side of Arcus (ARCUS.md §2–§5, §8) for Rust games.
//!
//! A game binds an [`ArcusServer`] on its management port. The server owns one background task
//! that listens on `127.0.0.1:<port>`, performs the handshake (the game's hello goes first),
//! keeps the link healthy and turns agent messages into [`Event`]s. The game talks back through
//! an [`ArcusHandle`]: status, live state and reverse metadata.
//!
//! ```no_run
//! # async fn game() -> Result<(), berth_sdk::SdkError> {
//! use berth_sdk::{ArcusServer, Event, GameStatus};
//!
//! let mut arcus = ArcusServer::bind(7777).await?;
//! arcus.handle().set_status(GameStatus::Online)?;
//! while let Some(event) = arcus.next_event().await {
//!     match event {
//!         Event::Allocated(_) => arcus.handle().set_status(GameStatus::Allocated)?,
//!         Event::SoftStop { .. } => break,
//!         _ => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Status and live state are *state*, not messages: setting them while no agent is connected
//! just records them, and every new link starts with the current status (and the live state, if
//! it changed since it was last sent), so a game never has to track the link itself.

mod server;

pub use berth_protocol::KeyValue;
pub use berth_protocol::arcus::LiveState;
pub use server::{
    ArcusHandle, ArcusServer, Event, Events, HELLO_REPLY_TIMEOUT, HandshakeError, LinkClosed,
};

use std::io;
use std::net::SocketAddr;

use berth_protocol::arcus::ArcusError;
use berth_protocol::metadata::MetadataError;

/// The status a game reports about itself (ARCUS.md §4, opcode 0x71).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GameStatus {
    /// Running but not ready for players yet.
    Starting = 3,
    /// Ready and idle: the agent may allocate it.
    Online = 4,
    /// In a match. Going back to [`GameStatus::Online`] releases the allocation.
    Allocated = 5,
}

impl GameStatus {
    /// The number sent on the wire.
    pub fn number(self) -> i32 {
        self as i32
    }

    pub fn from_number(n: i32) -> Option<Self> {
        match n {
            3 => Some(Self::Starting),
            4 => Some(Self::Online),
            5 => Some(Self::Allocated),
            _ => None,
        }
    }
}

/// Why the SDK refused a request.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    #[error("cannot listen for the Berth agent on management port {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The background task is gone: the runtime is shutting down.
    #[error("the Arcus server task has stopped")]
    Stopped,
    #[error("reverse metadata refused: {0}")]
    Metadata(#[from] MetadataError),
    #[error("message refused: {0}")]
    Protocol(#[from] ArcusError),
}
