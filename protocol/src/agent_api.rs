//! Requests and answers of the agent's HTTP API (DESIGN.md §4.2), shared by the agent, the
//! controller that calls it, and `berthctl`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::metadata::KeyValue;
use crate::status::{InstanceStatus, ManagementProtocol, RuntimeState};

/// How to launch a build (the `POST /v1/profiles` shape of DESIGN.md §4.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Profile {
    pub id: String,
    pub application_id: u32,
    #[serde(default)]
    pub build: String,
    pub executable: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default = "default_true")]
    pub auto_restart: bool,
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_seconds: u32,
    /// Resource limits applied to the game process (setrlimit before exec).
    #[serde(default, skip_serializing_if = "Limits::is_empty")]
    pub limits: Limits,
}

fn default_true() -> bool {
    true
}

fn default_stop_timeout() -> u32 {
    30
}

/// rlimits for a game process; absent fields leave the agent's own limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// RLIMIT_NOFILE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_files: Option<u64>,
    /// RLIMIT_AS, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_space_bytes: Option<u64>,
    /// RLIMIT_CORE, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core_bytes: Option<u64>,
    /// RLIMIT_NPROC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// `POST /v1/instances` on the agent: deploy one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeployRequest {
    /// Chosen by the controller so a retried deploy is idempotent; the agent makes one up when
    /// absent (manual deploys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_id: Option<u64>,
    #[serde(default)]
    pub management_protocol: ManagementProtocol,
    /// Wait for the game's own status 5 before answering an allocation.
    #[serde(default)]
    pub confirm_allocation: bool,
    pub profile: Profile,
}

/// An instance as the agent reports it: in API answers, registration and events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceView {
    pub id: String,
    pub application_id: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_id: Option<u64>,
    pub profile_id: String,
    pub build: String,
    pub management_protocol: ManagementProtocol,
    pub port: u16,
    pub management_port: u16,
    pub status: InstanceStatus,
    pub state: RuntimeState,
    #[serde(default)]
    pub pid: Option<u32>,
    /// Unix seconds.
    #[serde(default)]
    pub pid_changed_at: Option<u64>,
    #[serde(default)]
    pub started_at: Option<u64>,
    #[serde(default)]
    pub stopped_at: Option<u64>,
    pub created_at: u64,
    pub updated_at: u64,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub exit_signal: Option<i32>,
    #[serde(default)]
    pub restarts: u32,
    pub auto_restart: bool,
    /// Whether the agent's Arcus link to the game is up (always false for `none` games).
    #[serde(default)]
    pub arcus_connected: bool,
    /// Why the Arcus link is not up, while the game runs: the last attempt's failure (the game
    /// not listening on its management port yet, a bad hello, a dropped link).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arcus_error: Option<String>,
    #[serde(default)]
    pub num_players: Option<i32>,
    #[serde(default)]
    pub num_players_max: Option<i32>,
    #[serde(default)]
    pub live_host_name: Option<String>,
    #[serde(default)]
    pub live_map: Option<String>,
    #[serde(default)]
    pub live_rules: Option<String>,
    #[serde(default)]
    pub live_game_version: Option<String>,
    /// Allocation metadata (and metadata pushed later by operators).
    #[serde(default)]
    pub metadata: Vec<KeyValue>,
    /// Metadata the game sent to the platform (Arcus 0x41).
    #[serde(default)]
    pub reverse_metadata: Vec<KeyValue>,
    #[serde(default)]
    pub allocation_id: Option<String>,
    #[serde(default)]
    pub allocated_at: Option<u64>,
    /// Released, but the game has not yet acknowledged it (reported 4): not offered again
    /// until it does.
    #[serde(default)]
    pub releasing: bool,
    /// Increases with every change the agent makes to the instance, across agent restarts, so
    /// a receiver can drop reports older than what it has.
    pub version: u64,
}

impl InstanceView {
    /// Online, not being stopped, and for Arcus games with a live link: what the agent itself
    /// would allocate.
    pub fn is_allocatable(&self) -> bool {
        self.status == InstanceStatus::Online
            && !self.releasing
            && !self.state.is_stopping()
            && (self.management_protocol == ManagementProtocol::None || self.arcus_connected)
    }
}

/// `POST /v1/instances/{id}/allocate` on the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllocateRequest {
    #[serde(default)]
    pub metadata: Vec<KeyValue>,
    /// How long the agent may take; at most the 5 s allocation timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// The controller's id for this allocation; a later deallocate may name it so that it can
    /// never release a newer allocation by mistake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_id: Option<String>,
    /// Separate metadata for the running game, sent as Arcus `metadata` after `allocated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub game_metadata: Option<Vec<KeyValue>>,
}

/// `POST /v1/instances/{id}/deallocate` on the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeallocateRequest {
    /// When set, release only if this is still the instance's allocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_id: Option<String>,
}

/// `POST /v1/instances/{id}/metadata`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetadataRequest {
    pub metadata: Vec<KeyValue>,
}

/// `POST /v1/instances/{id}/command`: sent to the game as Arcus custom command 0x45 with the
/// pairs `command`, `argument` (when given) and then `data`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CommandRequest {
    pub command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argument: Option<String>,
    #[serde(default)]
    pub data: Vec<KeyValue>,
}

/// `POST /v1/instances/{id}/stop`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StopRequest {
    /// Soft-stop timeout; the profile's `stopTimeoutSeconds` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
}

/// Machine size, for placement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    pub cpus: u32,
    pub memory_bytes: u64,
}

/// `GET /v1/host` on the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostView {
    #[serde(default)]
    pub host_id: Option<u64>,
    pub host_name: String,
    pub region: String,
    pub dc_location: String,
    pub is_virtual: bool,
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
    pub agent_version: String,
    pub instances: usize,
    pub instances_by_status: BTreeMap<String, usize>,
    pub load_average: [f64; 3],
    pub registered: bool,
    pub controller_url: String,
}

/// One operation of `POST /v1/instances/batch`: the controller sends whatever allocations and
/// releases it has queued for a host in one request, so that under load one HTTP exchange
/// carries many of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "op", deny_unknown_fields)]
pub enum BatchOperation {
    #[serde(rename_all = "camelCase")]
    Allocate {
        id: String,
        /// The correlation id of the request this operation serves.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        identifier: Option<String>,
        request: AllocateRequest,
    },
    #[serde(rename_all = "camelCase")]
    Deallocate {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        identifier: Option<String>,
        request: DeallocateRequest,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BatchRequest {
    pub operations: Vec<BatchOperation>,
}

/// The outcome of one operation: the instance as it is now, or the error the single-operation
/// route would have answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BatchResult {
    Instance(Box<InstanceView>),
    Error(Box<crate::ErrorBody>),
}

/// Results in the order of the operations.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchResponse {
    pub results: Vec<BatchResult>,
}
