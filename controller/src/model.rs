//! The controller's records: what the store keeps in SQLite as JSON bodies, and the compact
//! forms the inventory keeps in memory.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use berth_protocol::agent_api::{Capacity, InstanceView};
use berth_protocol::controller_api::{I3dInstance, InstanceObject};
use berth_protocol::{InstanceStatus, KeyValue, ManagementProtocol, RuntimeState};
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

/// A matchmaker's claim on an instance. Bodies stored by older versions also carry
/// `releasedAt: null`, which loading ignores: a release deletes the row.
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
    /// The instance's version when it was claimed for this allocation; no report older than
    /// that can end it.
    pub agent_version: u64,
    pub identifier: String,
    pub created_at: u64,
    /// The answer given, replayed as is for a repeated `Idempotency-Key` (in both shapes,
    /// for the native and the i3D route). Only a keyed allocation can be replayed, so only
    /// it keeps them: without a key they would be three quarters of every row written and
    /// deleted per allocation (≈ 1.5 KB of 2), never read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<Arc<InstanceObject>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_i3d: Option<Arc<I3dInstance>>,
}

/// Which of the two allocation routes asked, so which shape its answer takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Native,
    I3d,
}

/// An allocation's answer, in the shape of the route that asked for it.
#[derive(Debug, Clone)]
pub enum Answer {
    Native(Arc<InstanceObject>),
    /// The i3D route answers with a list of one.
    I3d(Arc<I3dInstance>),
}

impl AllocationRecord {
    /// The answer kept for a replay, in the shape asked for; `None` for an allocation made
    /// without a key.
    pub fn replay(&self, shape: Shape) -> Option<Answer> {
        match shape {
            Shape::Native => self.response.clone().map(Answer::Native),
            Shape::I3d => self.response_i3d.clone().map(Answer::I3d),
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Strings that repeat across thousands of instances (profile ids, builds, map and mode names,
/// game versions), stored once. Bounded, so a misbehaving agent sending unique strings costs
/// ordinary allocations rather than growing this forever.
#[derive(Debug, Default)]
pub struct Interner {
    set: std::collections::HashSet<Arc<str>>,
}

const INTERNER_CAP: usize = 16_384;

impl Interner {
    pub fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.set.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        if self.set.len() < INTERNER_CAP {
            self.set.insert(a.clone());
        }
        a
    }
}

/// The game's live state (Arcus 0x20), boxed because most idle instances' is small or absent.
#[derive(Debug, Clone, PartialEq)]
pub struct GameState {
    pub num_players: Option<i32>,
    pub num_players_max: Option<i32>,
    pub live_host_name: Option<Box<str>>,
    pub live_map: Option<Arc<str>>,
    pub live_rules: Option<Arc<str>>,
    pub live_game_version: Option<Arc<str>>,
    /// Why the link is down, while it is: mostly for a game that never came up, so kept in
    /// this box rather than in every instance, behind a thin pointer so that the box stays in
    /// its allocation size class (80 → 88 bytes, both a 96-byte chunk).
    #[allow(clippy::box_collection)]
    pub arcus_error: Option<Box<String>>,
}

/// An agent's last report of an instance, as the controller keeps it in memory: the same facts
/// as [`InstanceView`] in about a third of the space (shared strings, `u32` seconds with 0 for
/// "none", live state boxed, lists as boxed slices). The inventory holds one per instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub profile_id: Arc<str>,
    pub build: Arc<str>,
    pub management_protocol: ManagementProtocol,
    pub port: u16,
    pub management_port: u16,
    pub status: InstanceStatus,
    pub state: RuntimeState,
    pub pid: Option<NonZeroU32>,
    pub pid_changed_at: u32,
    pub started_at: u32,
    pub stopped_at: u32,
    pub created_at: u32,
    pub updated_at: u32,
    pub exit_code: Option<i32>,
    pub exit_signal: Option<i32>,
    pub restarts: u32,
    pub auto_restart: bool,
    pub arcus_connected: bool,
    pub releasing: bool,
    pub game: Option<Box<GameState>>,
    pub held: Option<Box<Held>>,
    pub version: u64,
}

/// What only an allocated (or just released) instance has, boxed so idle ones do not pay for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub allocation_id: Option<Box<str>>,
    pub allocated_at: u32,
    pub metadata: Box<[KeyValue]>,
    pub reverse_metadata: Box<[KeyValue]>,
}

fn secs(t: Option<u64>) -> u32 {
    t.map_or(0, |t| u32::try_from(t).unwrap_or(u32::MAX))
}

fn opt(t: u32) -> Option<u64> {
    (t != 0).then_some(u64::from(t))
}

impl Report {
    pub fn from_view(v: InstanceView, strings: &mut Interner) -> Self {
        let has_game = v.num_players.is_some()
            || v.num_players_max.is_some()
            || v.live_host_name.is_some()
            || v.live_map.is_some()
            || v.live_rules.is_some()
            || v.live_game_version.is_some()
            || v.arcus_error.is_some();
        let game = has_game.then(|| {
            Box::new(GameState {
                num_players: v.num_players,
                num_players_max: v.num_players_max,
                live_host_name: v.live_host_name.map(String::into_boxed_str),
                live_map: v.live_map.as_deref().map(|s| strings.get(s)),
                live_rules: v.live_rules.as_deref().map(|s| strings.get(s)),
                live_game_version: v.live_game_version.as_deref().map(|s| strings.get(s)),
                arcus_error: v.arcus_error.map(Box::new),
            })
        });
        let held = (v.allocation_id.is_some()
            || v.allocated_at.is_some()
            || !v.metadata.is_empty()
            || !v.reverse_metadata.is_empty())
        .then(|| {
            Box::new(Held {
                allocation_id: v.allocation_id.map(String::into_boxed_str),
                allocated_at: secs(v.allocated_at),
                metadata: v.metadata.into_boxed_slice(),
                reverse_metadata: v.reverse_metadata.into_boxed_slice(),
            })
        });
        Self {
            profile_id: strings.get(&v.profile_id),
            build: strings.get(&v.build),
            management_protocol: v.management_protocol,
            port: v.port,
            management_port: v.management_port,
            status: v.status,
            state: v.state,
            // Pid 0 is never a child's: the agent sends it for none.
            pid: v.pid.and_then(NonZeroU32::new),
            pid_changed_at: secs(v.pid_changed_at),
            started_at: secs(v.started_at),
            stopped_at: secs(v.stopped_at),
            created_at: secs(Some(v.created_at)),
            updated_at: secs(Some(v.updated_at)),
            exit_code: v.exit_code,
            exit_signal: v.exit_signal,
            restarts: v.restarts,
            auto_restart: v.auto_restart,
            arcus_connected: v.arcus_connected,
            releasing: v.releasing,
            game,
            held,
            version: v.version,
        }
    }

    /// The report as the agent sent it.
    pub fn to_view(&self, id: &str, application_id: u32, fleet_id: Option<u64>) -> InstanceView {
        let g = self.game.as_deref();
        let h = self.held.as_deref();
        InstanceView {
            id: id.to_owned(),
            application_id,
            fleet_id,
            profile_id: self.profile_id.to_string(),
            build: self.build.to_string(),
            management_protocol: self.management_protocol,
            port: self.port,
            management_port: self.management_port,
            status: self.status,
            state: self.state,
            pid: self.pid.map(NonZeroU32::get),
            pid_changed_at: opt(self.pid_changed_at),
            started_at: opt(self.started_at),
            stopped_at: opt(self.stopped_at),
            created_at: u64::from(self.created_at),
            updated_at: u64::from(self.updated_at),
            exit_code: self.exit_code,
            exit_signal: self.exit_signal,
            restarts: self.restarts,
            auto_restart: self.auto_restart,
            arcus_connected: self.arcus_connected,
            num_players: g.and_then(|g| g.num_players),
            num_players_max: g.and_then(|g| g.num_players_max),
            live_host_name: g.and_then(|g| g.live_host_name.as_deref().map(str::to_owned)),
            live_map: g.and_then(|g| g.live_map.as_deref().map(str::to_owned)),
            live_rules: g.and_then(|g| g.live_rules.as_deref().map(str::to_owned)),
            live_game_version: g.and_then(|g| g.live_game_version.as_deref().map(str::to_owned)),
            arcus_error: g.and_then(|g| g.arcus_error.as_deref().cloned()),
            metadata: self.metadata().to_vec(),
            reverse_metadata: self.reverse_metadata().to_vec(),
            allocation_id: self.allocation_id().map(str::to_owned),
            allocated_at: h.and_then(|h| opt(h.allocated_at)),
            releasing: self.releasing,
            version: self.version,
        }
    }

    pub fn metadata(&self) -> &[KeyValue] {
        self.held.as_deref().map_or(&[], |h| &h.metadata)
    }

    pub fn reverse_metadata(&self) -> &[KeyValue] {
        self.held.as_deref().map_or(&[], |h| &h.reverse_metadata)
    }

    pub fn allocation_id(&self) -> Option<&str> {
        self.held
            .as_deref()
            .and_then(|h| h.allocation_id.as_deref())
    }

    /// What the agent itself would allocate (mirrors [`InstanceView::is_allocatable`]).
    pub fn is_allocatable(&self) -> bool {
        self.status == InstanceStatus::Online
            && !self.releasing
            && !self.state.is_stopping()
            && (self.management_protocol == ManagementProtocol::None || self.arcus_connected)
    }
}

/// An allocation row's body as the store keeps it, for tests.
#[cfg(test)]
pub(crate) fn allocation_body(id: &str, instance_id: &str) -> serde_json::Value {
    let response = serde_json::json!({
        "id": instance_id, "applicationId": 7, "fleetId": 456, "deploymentEnvironmentId": 1,
        "profileId": "arena-1.0", "build": "1.0.0", "hostId": 1, "hostName": "bm-1",
        "regionId": 1, "regionName": "eu", "dcLocationId": 1, "dcLocationName": "eu-1",
        "isVirtual": 0, "ipAddress": "203.0.113.1", "port": 20000,
        "managementPort": 30000, "status": 5, "state": "running", "pid": 42,
        "arcusConnected": true, "numPlayers": null, "numPlayersMax": null,
        "liveHostName": null, "liveMap": null, "liveRules": null,
        "liveGameVersion": null, "metadata": [], "reverseMetadata": [],
        "allocationId": id, "allocatedAt": "2026-11-18T00:00:00Z", "restarts": 0,
        "autoRestart": true, "releasing": false,
        "createdAt": "2026-11-18T00:00:00Z", "updatedAt": "2026-11-18T00:00:00Z",
    });
    let response_i3d = serde_json::json!({
        "id": instance_id, "applicationId": 7, "applicationBuildId": "1.0.0",
        "deploymentEnvironmentId": 1, "fleetId": 456, "hostId": 1, "regionId": 1,
        "dcLocationId": 1, "isVirtual": 0,
        "ipAddress": [{"ipAddress": "203.0.113.1", "ipVersion": 4, "private": 0}],
        "port": 20000, "managementPort": 30000, "status": 5, "numPlayers": 0,
        "numPlayersMax": 0, "liveHostName": "", "liveMap": "", "liveRules": "",
        "liveGameVersion": "", "metadata": [], "labelReadOnly": [], "labelPublic": [],
        "pid": 42, "pidChangedAt": 0, "startedAt": 0, "stoppedAt": 0,
        "createdAt": 1_795_000_000u64, "updatedAt": 1_795_000_000u64, "autoRestart": 1,
        "manuallyDeployed": 0, "markedForDeletion": 0,
    });
    serde_json::json!({
        "id": id, "instanceId": instance_id, "hostId": 1, "applicationId": 7,
        "metadata": [{"key": "map", "value": "dust"}], "idempotencyKey": null,
        "requestDigest": "00", "agentVersion": 3, "identifier": "c-1",
        "createdAt": 1_795_000_000u64,
        "response": response, "responseI3d": response_i3d,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_stored_with_released_at_still_load() {
        // A body as earlier versions wrote it, `releasedAt` included.
        let mut body = allocation_body("a-1", "i-1");
        if let Some(o) = body.as_object_mut() {
            o.insert("releasedAt".to_owned(), serde_json::Value::Null);
        }
        let a: AllocationRecord = serde_json::from_value(body.clone()).expect("old body");
        assert_eq!(a.request_digest, "00");
        // What is written now is the same body without the field.
        let mut now = body;
        if let Some(o) = now.as_object_mut() {
            o.remove("releasedAt");
        }
        assert_eq!(serde_json::to_value(&a).expect("body"), now);
    }

    #[test]
    fn report_round_trips_the_view() {
        let view: InstanceView = serde_json::from_value(serde_json::json!({
            "id": "i-1", "applicationId": 7, "fleetId": 456, "profileId": "arena-1.0",
            "build": "1.0.0", "managementProtocol": "arcus", "port": 20000,
            "managementPort": 30000, "status": 5, "state": "running", "pid": 42,
            "pidChangedAt": 1_795_000_000u64, "startedAt": 1_795_000_000u64,
            "createdAt": 1_795_000_000u64, "updatedAt": 1_795_000_001u64, "restarts": 2,
            "autoRestart": true, "arcusConnected": true, "numPlayers": 3, "numPlayersMax": 16,
            "liveHostName": "game-1", "liveMap": "dust", "liveRules": "ranked",
            "liveGameVersion": "1.0", "metadata": [{"key": "map", "value": "dust"}],
            "reverseMetadata": [], "allocationId": "a-1", "allocatedAt": 1_795_000_002u64,
            "releasing": false, "version": 99,
        }))
        .expect("view");
        let mut strings = Interner::default();
        let report = Report::from_view(view.clone(), &mut strings);
        assert_eq!(report.to_view("i-1", 7, Some(456)), view);
        // Shared strings are stored once.
        let again = Report::from_view(view, &mut strings);
        assert!(Arc::ptr_eq(&report.profile_id, &again.profile_id));
        // A starting game whose link is down, and says why, with no live state.
        let down: InstanceView = serde_json::from_value(serde_json::json!({
            "id": "i-1", "applicationId": 7, "fleetId": 456, "profileId": "arena-1.0",
            "build": "1.0.0", "managementProtocol": "arcus", "port": 20000,
            "managementPort": 30000, "status": 3, "state": "running", "pid": 42,
            "createdAt": 1_795_000_000u64, "updatedAt": 1_795_000_001u64,
            "autoRestart": true, "arcusError": "the game does not accept connections",
            "version": 3,
        }))
        .expect("view");
        let report = Report::from_view(down.clone(), &mut strings);
        assert_eq!(report.to_view("i-1", 7, Some(456)), down);
    }
}
