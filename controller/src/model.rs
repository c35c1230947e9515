//! The controller's persistent records. The inventory keeps them in memory; the store keeps
//! them in SQLite as JSON bodies.

use std::collections::BTreeMap;

use berth_protocol::KeyValue;
use berth_protocol::agent_api::{Capacity, InstanceView};
use berth_protocol::controller_api::{I3dInstance, InstanceObject};
use serde::{Deserialize, Serialize};

/// A registered host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRecord {
    pub id: u64,
    pub name: String,
    pub region_id: u32,
    pub dc_location_id: u32,
    pub is_virtual: bool,
    pub labels: BTreeMap<String, String>,
    pub advertise_url: String,
    pub addresses: Vec<String>,
    pub capacity: Capacity,
    pub agent_version: String,
    /// What the controller presents to the agent. The agent chose it; it is a credential the
    /// controller uses, so it cannot be stored as a digest.
    pub agent_token: String,
    /// SHA-256 of the host token, hex: the agent's heartbeats and events must match it.
    pub host_token_digest: String,
    pub draining: bool,
    pub registered_at: u64,
}

/// An instance the controller knows of (deployed by it, or reported by an agent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceRecord {
    pub id: String,
    pub host_id: u64,
    pub application_id: u32,
    pub fleet_id: Option<u64>,
    /// The agent's latest report.
    pub view: InstanceView,
    pub created_at: u64,
    pub removed_at: Option<u64>,
}

/// A matchmaker's claim on an instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationRecord {
    pub id: String,
    pub instance_id: String,
    pub host_id: u64,
    pub application_id: u32,
    pub metadata: Vec<KeyValue>,
    pub idempotency_key: Option<String>,
    /// SHA-256 (hex) of what was asked: the same key with a different request is refused.
    pub request_digest: String,
    /// The agent's instance version when it confirmed; older reports cannot end it.
    pub agent_version: u64,
    pub identifier: String,
    pub created_at: u64,
    pub released_at: Option<u64>,
    /// The answer given, replayed as is for a repeated `Idempotency-Key` (in both shapes,
    /// for the native and the i3D route).
    pub response: InstanceObject,
    pub response_i3d: I3dInstance,
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}
