//! Berth's shared vocabulary. Everything that crosses a process boundary has its type here:
//! instance statuses and runtime states, the error body and every code, the agent API and the
//! agent ↔ controller messages, the allocation filter language, and the Arcus codec.
//!
//! This crate does no IO and depends on no runtime, so it can be fuzzed and property-tested
//! alone.

pub mod agent_api;
pub mod arcus;
pub mod controller_api;
pub mod error;
pub mod filter;
pub mod link;
pub mod metadata;
pub mod status;
pub mod time;

pub use error::{Attempt, ErrorBody, ErrorCode};
pub use metadata::KeyValue;
pub use status::{HostKind, InstanceStatus, ManagementProtocol, RuntimeState};
