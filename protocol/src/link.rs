//! Messages between the agent and the controller (`/v1/agent/*` on the controller).
//!
//! The agent registers with the join token and gets a host id and a host token; it then sends
//! heartbeats and batched instance snapshots with that token. Snapshots carry the instance's
//! `version`, so a late or repeated batch can never roll the controller's view back.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::agent_api::{Capacity, InstanceView};

/// `POST /v1/agent/register`, authenticated with the join token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterRequest {
    pub host_name: String,
    pub region: String,
    pub dc_location: String,
    pub is_virtual: bool,
    /// How the controller reaches this agent.
    pub advertise_url: String,
    /// Addresses game clients use to reach this host's game ports.
    pub addresses: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
    pub agent_version: String,
    /// The token the controller must present when calling this agent. The agent keeps it
    /// across restarts, so the controller's calls keep working while the agent restarts.
    pub agent_token: String,
    /// Every instance the agent runs, in full: the controller reconciles against it.
    pub instances: Vec<InstanceView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterResponse {
    pub host_id: u64,
    /// Authenticates this agent's heartbeats and events; it acts only for this host.
    pub host_token: String,
    pub heartbeat_period_ms: u64,
    pub heartbeat_expiry_factor: f64,
}

/// `POST /v1/agent/heartbeat`, authenticated with the host token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatRequest {
    pub host_id: u64,
    pub seq: u64,
    /// The highest instance version the agent has sent in events so far. The controller does
    /// not need it to stay whole (the agent sends events again until they are acknowledged,
    /// and a restarted controller asks every agent for a full registration); it is kept on the
    /// wire so that agents and controllers of neighbouring versions keep understanding each
    /// other.
    pub max_version: u64,
    pub load_average: [f64; 3],
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatResponse {
    /// The controller wants a full registration (it lost or doubts its view of this host).
    #[serde(default)]
    pub reregister: bool,
    /// The controller cannot call this agent at the `advertiseUrl` it registered with (a
    /// firewall changed, the address moved): why. Its games are not allocated meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cannot_call: Option<String>,
}

/// `POST /v1/agent/events`, authenticated with the host token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventsRequest {
    pub host_id: u64,
    /// Latest snapshot of every instance that changed since the last batch.
    #[serde(default)]
    pub instances: Vec<InstanceView>,
    /// Instances the agent no longer has.
    #[serde(default)]
    pub removed: Vec<RemovedInstance>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemovedInstance {
    pub id: String,
    pub version: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventsResponse {
    #[serde(default)]
    pub reregister: bool,
}
