//! Resources and bodies of the controller's API (DESIGN.md §4.1), shared by the controller,
//! `berthctl` and tests. The field names are a contract for outside harnesses: fields may be
//! added, never renamed.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

use crate::metadata::KeyValue;
use crate::status::{InstanceStatus, ManagementProtocol, RuntimeState};

/// `POST /v1/applications`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Application {
    pub id: u32,
    pub name: String,
    #[serde(default)]
    pub management_protocol: ManagementProtocol,
    #[serde(default)]
    pub confirm_allocation: bool,
}

/// `POST /v1/builds`: a version of an application's server. Profiles name it in their
/// `build` field; for the process runtime it is an executable (and its files) present on the
/// hosts, for the container runtime an image. Uploading and distributing build files is
/// phase 2; the record, and the check that profiles name a known build, are here now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Build {
    pub id: String,
    pub application_id: u32,
    /// What profiles write in `build` (e.g. "1.0.0").
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executable: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Hex SHA-256 of the build's archive or executable, for verification on hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `POST /v1/regions`; also `[[regions]]` in controller.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Region {
    pub id: u32,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ping_ip: Option<String>,
}

/// A data centre inside a region. Created from config, the API, or when an agent first
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DcLocation {
    pub id: u32,
    pub name: String,
    pub region_id: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeploymentEnvironment {
    pub id: u32,
    pub name: String,
}

/// `POST /v1/fleets`: keep `instancesPerHost` instances of `profileId` on every host that is
/// in one of `regions` and carries all of `hostLabels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fleet {
    pub id: u64,
    pub name: String,
    pub application_id: u32,
    #[serde(default = "default_environment")]
    pub deployment_environment: String,
    pub profile_id: String,
    #[serde(default)]
    pub regions: Vec<String>,
    #[serde(default)]
    pub host_labels: BTreeMap<String, String>,
    pub instances_per_host: u32,
    /// Set by the controller from `deploymentEnvironment` (a value sent in is ignored, so a
    /// fleet read back can be sent again unchanged).
    #[serde(default)]
    pub deployment_environment_id: u32,
}

fn default_environment() -> String {
    "production".to_owned()
}

/// The native allocation body: `POST /v1/applications/{applicationId}/allocate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllocateBody {
    #[serde(default)]
    pub filter: String,
    #[serde(default)]
    pub metadata: Vec<KeyValue>,
    /// Separate metadata for the running game (Arcus `metadata` after `allocated`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub game_metadata: Option<Vec<KeyValue>>,
}

/// The i3D-compatible body: optional metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct I3dAllocateBody {
    #[serde(default)]
    pub metadata: Vec<KeyValue>,
}

/// `POST /v1/instances/{id}/metadata` and `/command` on the controller reuse the agent's
/// bodies; this is `/deallocate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeallocateBody {
    /// Release only if this is still the instance's allocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_id: Option<String>,
}

/// An instance in the native API (`GET /v1/instances`, allocation answers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceObject {
    pub id: String,
    pub application_id: u32,
    pub fleet_id: Option<u64>,
    pub deployment_environment_id: Option<u32>,
    pub profile_id: String,
    pub build: String,
    pub host_id: u64,
    pub host_name: String,
    pub region_id: u32,
    pub region_name: String,
    pub dc_location_id: u32,
    pub dc_location_name: String,
    /// 0 bare metal, 1 virtual machine (as in filters).
    pub is_virtual: u8,
    pub ip_address: String,
    pub port: u16,
    pub management_port: u16,
    pub status: InstanceStatus,
    pub state: RuntimeState,
    pub pid: Option<u32>,
    pub arcus_connected: bool,
    /// Why the Arcus link is not up, while the game runs (see the agent's instance view).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arcus_error: Option<String>,
    pub num_players: Option<i32>,
    pub num_players_max: Option<i32>,
    pub live_host_name: Option<String>,
    pub live_map: Option<String>,
    pub live_rules: Option<String>,
    pub live_game_version: Option<String>,
    pub metadata: Vec<KeyValue>,
    pub reverse_metadata: Vec<KeyValue>,
    pub allocation_id: Option<String>,
    /// RFC 3339.
    pub allocated_at: Option<String>,
    pub restarts: u32,
    pub auto_restart: bool,
    /// Released, waiting for its game to acknowledge (report 4): not offered until it does.
    #[serde(default)]
    pub releasing: bool,
    pub created_at: String,
    pub updated_at: String,
}

/// One entry of i3D's `ipAddress` list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct I3dIpAddress {
    pub ip_address: String,
    pub ip_version: u8,
    pub private: u8,
}

/// An instance in i3D's shape (the i3D-compatible allocation route). Times are unix seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct I3dInstance {
    pub id: String,
    pub application_id: u32,
    pub application_build_id: String,
    pub deployment_environment_id: u32,
    pub fleet_id: u64,
    pub host_id: u64,
    pub region_id: u32,
    pub dc_location_id: u32,
    pub is_virtual: u8,
    pub ip_address: Vec<I3dIpAddress>,
    pub port: u16,
    pub management_port: u16,
    pub status: InstanceStatus,
    pub num_players: i32,
    pub num_players_max: i32,
    pub live_host_name: String,
    pub live_map: String,
    pub live_rules: String,
    pub live_game_version: String,
    pub metadata: Vec<KeyValue>,
    pub label_read_only: Vec<KeyValue>,
    pub label_public: Vec<KeyValue>,
    pub pid: u32,
    pub pid_changed_at: u64,
    pub started_at: u64,
    pub stopped_at: u64,
    pub created_at: u64,
    pub updated_at: u64,
    pub auto_restart: u8,
    pub manually_deployed: u8,
    pub marked_for_deletion: u8,
}

/// A host in `GET /v1/hosts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostObject {
    pub id: u64,
    pub name: String,
    pub region_id: u32,
    pub region_name: String,
    pub dc_location_id: u32,
    pub dc_location_name: String,
    pub is_virtual: u8,
    pub labels: BTreeMap<String, String>,
    pub advertise_url: String,
    pub addresses: Vec<String>,
    pub capacity: crate::agent_api::Capacity,
    pub agent_version: String,
    /// `ready`, `unreachable`, `not_answering` (its agent heartbeats but does not answer the
    /// controller's calls: see `agentError`) or `draining`.
    pub state: String,
    pub reachable: bool,
    pub draining: bool,
    pub last_heartbeat_at: Option<String>,
    pub registered_at: String,
    pub instances: usize,
    pub instances_by_status: BTreeMap<String, usize>,
    /// Why the controller cannot call the host's agent at `advertiseUrl`, while it cannot: the
    /// host's instances are not offered until the agent answers again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_error: Option<String>,
    /// Since when the agent has not answered the controller's calls (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_error_since: Option<String>,
}

/// The story of a failed request (`GET /v1/errors/{identifier}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorStory {
    pub identifier: String,
    pub timestamp: String,
    pub method: String,
    pub path: String,
    pub status_code: u16,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    pub message: String,
    pub details: String,
    /// How the controller decided: the filter as understood, candidate counts, order.
    #[serde(default)]
    pub decision: Option<Value>,
    /// Every candidate tried, with the agent's answer.
    #[serde(default)]
    pub attempts: Vec<AttemptStory>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptStory {
    pub instance_id: String,
    pub host_id: u64,
    pub host_name: String,
    pub agent_url: String,
    pub status_code: u16,
    #[serde(default)]
    pub error_code: Option<u32>,
    pub code: String,
    pub details: String,
    pub elapsed_ms: u64,
}
