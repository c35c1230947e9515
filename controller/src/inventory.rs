//! The inventory: one task that owns everything the controller knows — regions, hosts,
//! applications, profiles, fleets, instances, allocations, claims in flight — fed by a closed
//! [`Command`] enum.
//!
//! Because one task applies every change in order, a claim is atomic by construction: once an
//! instance is marked as being allocated, no other request can choose it. Durable state goes to
//! the store's writer; the inventory never waits for the disk itself, it hands the commit
//! receipt to the caller that must not answer before it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use berth_http::Failure;
use berth_protocol::agent_api::{DeployRequest, InstanceView, Profile};
use berth_protocol::controller_api::{
    Application, AttemptStory, Build, DcLocation, DeploymentEnvironment, ErrorStory, Fleet,
    HostObject, I3dInstance, I3dIpAddress, InstanceObject, Region,
};
use berth_protocol::filter::{Condition, Filter};
use berth_protocol::link::{
    EventsRequest, EventsResponse, HeartbeatRequest, HeartbeatResponse, RegisterRequest,
    RegisterResponse,
};
use berth_protocol::time::rfc3339;
use berth_protocol::{Attempt, ErrorCode, InstanceStatus, KeyValue, RuntimeState};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::agent_client::{AgentClient, AgentFailure, AgentTarget};
use crate::config::{Config, digest};
use crate::engine::{self, Availability, Cond, Facts, Rank, Resolved};
use crate::metrics::Metrics;
use crate::model::{
    AllocationRecord, Answer, HostRecord, InstanceRecord, Interner, Report, Shape, hex,
};
use crate::store::{DeletedHost, Snapshot, Write, Writer};
use crate::unix_now;

/// How long an instance an agent refused is skipped, unless the agent reports it sooner.
const REFUSED_FOR: Duration = Duration::from_secs(5);
/// The first wait before a host whose agent did not answer a call is asked again whether it
/// answers (`GET /v1/host`); each failed probe doubles it up to [`PROBE_MAX`]. Heartbeats do
/// not bring the host back: they prove the agent can reach the controller, not the other way
/// round.
const PROBE_FIRST: Duration = Duration::from_millis(500);
const PROBE_MAX: Duration = Duration::from_secs(5);
/// Instances a fleet deploys per host per reconcile round.
const DEPLOY_BURST: u32 = 32;
/// How long a host that failed a deploy is left alone.
const DEPLOY_BACKOFF: Duration = Duration::from_secs(5);

pub type Commit = oneshot::Receiver<Result<(), crate::store::CommitError>>;

/// What the allocation handler gets back at each step.
#[derive(Debug)]
pub enum Step {
    /// Ask this agent to allocate, then report the outcome with `settle`.
    Call(Box<AgentCall>),
    /// Allocated. Answer once `committed` (when present) says the allocation is on disk. The
    /// record is the one the inventory keeps; the answer is in the shape the route gives.
    Done {
        allocation: Arc<AllocationRecord>,
        answer: Answer,
        committed: Option<Commit>,
    },
    Refused(Box<Failure>),
}

#[derive(Debug)]
pub struct AgentCall {
    pub claim_id: u64,
    pub instance_id: String,
    pub allocation_id: String,
    pub target: Arc<AgentTarget>,
    pub metadata: Vec<KeyValue>,
    pub game_metadata: Option<Vec<KeyValue>>,
}

/// An allocation request, parsed and validated by the API layer.
#[derive(Debug)]
pub struct AllocateInput {
    pub application_id: u32,
    pub filter: Filter,
    pub metadata: Vec<KeyValue>,
    pub game_metadata: Option<Vec<KeyValue>>,
    pub idempotency_key: Option<String>,
    pub request_digest: String,
    pub identifier: String,
    pub shape: Shape,
}

/// Work for the actuator: calls to agents that make reality match the inventory.
#[derive(Debug, Clone)]
pub enum Action {
    Deploy {
        target: Arc<AgentTarget>,
        request: Box<DeployRequest>,
    },
    Remove {
        target: Arc<AgentTarget>,
        instance_id: String,
    },
    /// An agent holds an allocation the controller does not know (lost in a crash before it
    /// was acknowledged): release it.
    Deallocate {
        target: Arc<AgentTarget>,
        instance_id: String,
        allocation_id: String,
    },
    /// Asks an agent that did not answer a call whether it answers now.
    Probe { target: Arc<AgentTarget> },
}

#[derive(Debug)]
pub enum ActionResult {
    Deployed {
        host_id: u64,
        instance_id: String,
        result: Result<InstanceView, AgentFailure>,
    },
    Removed {
        host_id: u64,
        instance_id: String,
        result: Result<InstanceView, AgentFailure>,
    },
    Deallocated {
        host_id: u64,
        result: Result<InstanceView, AgentFailure>,
    },
    Probed {
        host_id: u64,
        /// Why the agent still does not answer.
        result: Result<(), String>,
    },
}

/// Operations on one instance that go through its agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceOp {
    Metadata,
    Command,
    Stop,
}

#[derive(Debug)]
pub enum Release {
    /// Nothing to release: the instance as it is.
    NotAllocated(Box<InstanceObject>),
    /// Ask the agent, then `finish_release`.
    Call {
        target: Arc<AgentTarget>,
        allocation_id: Option<String>,
    },
}

/// Listing parameters for `GET /v1/instances`.
#[derive(Debug, Default)]
pub struct ListQuery {
    pub filter: Filter,
    pub status: Option<InstanceStatus>,
    pub application_id: Option<u32>,
}

type Reply<T> = oneshot::Sender<T>;

/// Instances by status (index = status number) and hosts by state, for the metrics.
pub type Counts = ([i64; 7], Vec<(&'static str, i64)>);

/// Everything the inventory can be asked. Closed: nothing else changes its state.
#[derive(Debug)]
pub enum Command {
    Claim(Box<AllocateInput>, Reply<Step>),
    Settle(u64, Result<InstanceView, AgentFailure>, Reply<Step>),
    AbortAllocation {
        instance_id: String,
        allocation_id: String,
    },
    BeginRelease(String, Option<String>, Reply<Result<Release, Failure>>),
    FinishRelease(
        String,
        Option<String>,
        Result<InstanceView, AgentFailure>,
        Reply<InstanceObject>,
    ),
    BeginOp(String, InstanceOp, Reply<Result<Arc<AgentTarget>, Failure>>),
    ApplyView(u64, Box<InstanceView>, Reply<Option<InstanceObject>>),
    Register(
        Box<RegisterRequest>,
        Reply<Result<(RegisterResponse, Commit), Failure>>,
    ),
    Heartbeat(
        [u8; 32],
        HeartbeatRequest,
        Reply<Result<HeartbeatResponse, Failure>>,
    ),
    Events(
        [u8; 32],
        Box<EventsRequest>,
        Reply<Result<EventsResponse, Failure>>,
    ),
    ListInstances(ListQuery, Reply<Result<Vec<InstanceObject>, Failure>>),
    GetInstance(String, Reply<Option<InstanceObject>>),
    Hosts(Reply<Vec<HostObject>>),
    Host(u64, Reply<Result<HostObject, Failure>>),
    Drain(u64, bool, Reply<Result<(HostObject, Commit), Failure>>),
    /// Take a host out of service: the host id and whether its allocations may be released.
    DeleteHost(u64, bool, Reply<Result<(HostObject, Commit), Failure>>),
    Crud(
        Crud,
        Reply<Result<(serde_json::Value, Option<Commit>), Failure>>,
    ),
    Story(String, Reply<Option<ErrorStory>>),
    RecordFailure(Box<berth_http::FailureRecord>),
    Plan(Reply<Vec<Action>>),
    ActionDone(Box<ActionResult>),
    Counts(Reply<Counts>),
    Tick,
}

/// Resource operations of the admin API.
#[derive(Debug)]
pub enum Crud {
    PutApplication(Application, bool),
    DeleteApplication(u32),
    ListApplications,
    GetApplication(u32),
    PutBuild(Box<Build>, bool),
    DeleteBuild(String),
    ListBuilds,
    GetBuild(String),
    PutProfile(Box<Profile>, bool),
    DeleteProfile(String),
    ListProfiles,
    GetProfile(String),
    PutFleet(Box<Fleet>, bool),
    DeleteFleet(u64),
    ListFleets,
    GetFleet(u64),
    PutRegion(Region),
    DeleteRegion(u32),
    ListRegions,
    GetRegion(u32),
    PutDcLocation(DcLocation),
    ListDcLocations,
    PutEnvironment(DeploymentEnvironment),
    ListEnvironments,
}

/// The front of the inventory used by handlers, the actuator and the ticker.
#[derive(Debug, Clone)]
pub struct InventoryHandle {
    tx: mpsc::Sender<Command>,
}

fn gone() -> Failure {
    Failure::new(
        ErrorCode::ServiceUnavailable,
        "The controller is shutting down.",
        "the controller is shutting down; retry shortly",
    )
}

impl InventoryHandle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Failure> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    pub async fn claim(&self, input: AllocateInput) -> Step {
        self.ask(|r| Command::Claim(Box::new(input), r))
            .await
            .unwrap_or_else(|f| Step::Refused(Box::new(f)))
    }

    pub async fn settle(&self, claim_id: u64, result: Result<InstanceView, AgentFailure>) -> Step {
        self.ask(|r| Command::Settle(claim_id, result, r))
            .await
            .unwrap_or_else(|f| Step::Refused(Box::new(f)))
    }

    pub async fn abort_allocation(&self, instance_id: String, allocation_id: String) {
        let _ = self
            .tx
            .send(Command::AbortAllocation {
                instance_id,
                allocation_id,
            })
            .await;
    }

    pub async fn begin_release(
        &self,
        id: String,
        allocation_id: Option<String>,
    ) -> Result<Release, Failure> {
        self.ask(|r| Command::BeginRelease(id, allocation_id, r))
            .await?
    }

    pub async fn finish_release(
        &self,
        id: String,
        allocation_id: Option<String>,
        result: Result<InstanceView, AgentFailure>,
    ) -> Result<InstanceObject, Failure> {
        self.ask(|r| Command::FinishRelease(id, allocation_id, result, r))
            .await
    }

    pub async fn begin_op(&self, id: String, op: InstanceOp) -> Result<Arc<AgentTarget>, Failure> {
        self.ask(|r| Command::BeginOp(id, op, r)).await?
    }

    pub async fn apply_view(&self, host_id: u64, view: InstanceView) -> Option<InstanceObject> {
        self.ask(|r| Command::ApplyView(host_id, Box::new(view), r))
            .await
            .ok()
            .flatten()
    }

    pub async fn register(
        &self,
        req: RegisterRequest,
    ) -> Result<(RegisterResponse, Commit), Failure> {
        self.ask(|r| Command::Register(Box::new(req), r)).await?
    }

    pub async fn heartbeat(
        &self,
        token: [u8; 32],
        req: HeartbeatRequest,
    ) -> Result<HeartbeatResponse, Failure> {
        self.ask(|r| Command::Heartbeat(token, req, r)).await?
    }

    pub async fn events(
        &self,
        token: [u8; 32],
        req: EventsRequest,
    ) -> Result<EventsResponse, Failure> {
        self.ask(|r| Command::Events(token, Box::new(req), r))
            .await?
    }

    pub async fn list_instances(&self, q: ListQuery) -> Result<Vec<InstanceObject>, Failure> {
        self.ask(|r| Command::ListInstances(q, r)).await?
    }

    pub async fn instance(&self, id: String) -> Result<Option<InstanceObject>, Failure> {
        self.ask(|r| Command::GetInstance(id, r)).await
    }

    pub async fn hosts(&self) -> Result<Vec<HostObject>, Failure> {
        self.ask(Command::Hosts).await
    }

    pub async fn host(&self, id: u64) -> Result<HostObject, Failure> {
        self.ask(|r| Command::Host(id, r)).await?
    }

    /// Forgets a host that is out of service. Refused while its agent is heard from, and,
    /// unless `release_allocations`, while it holds allocations.
    pub async fn delete_host(
        &self,
        id: u64,
        release_allocations: bool,
    ) -> Result<(HostObject, Commit), Failure> {
        self.ask(|r| Command::DeleteHost(id, release_allocations, r))
            .await?
    }

    pub async fn drain(&self, id: u64, on: bool) -> Result<(HostObject, Commit), Failure> {
        self.ask(|r| Command::Drain(id, on, r)).await?
    }

    pub async fn crud(&self, op: Crud) -> Result<(serde_json::Value, Option<Commit>), Failure> {
        self.ask(|r| Command::Crud(op, r)).await?
    }

    pub async fn story(&self, identifier: String) -> Result<Option<ErrorStory>, Failure> {
        self.ask(|r| Command::Story(identifier, r)).await
    }

    /// Never blocks the caller (it runs inside the response path of a failed request).
    pub fn record_failure(&self, record: berth_http::FailureRecord) {
        let _ = self.tx.try_send(Command::RecordFailure(Box::new(record)));
    }

    pub async fn plan(&self) -> Result<Vec<Action>, Failure> {
        self.ask(Command::Plan).await
    }

    pub async fn action_done(&self, result: ActionResult) {
        let _ = self.tx.send(Command::ActionDone(Box::new(result))).await;
    }

    pub async fn counts(&self) -> Result<Counts, Failure> {
        self.ask(Command::Counts).await
    }

    pub async fn tick(&self) {
        let _ = self.tx.send(Command::Tick).await;
    }
}

#[derive(Debug)]
struct Host {
    rec: HostRecord,
    /// How to reach the agent, with the lane that batches its allocations and releases; built
    /// at registration and shared by every call, which only reads it.
    target: Arc<AgentTarget>,
    token_digest: [u8; 32],
    last_heartbeat: Instant,
    /// [`Inventory::excused`] at `last_heartbeat`: the controller's own stalls since then do
    /// not count as the host's silence.
    excused_at: Duration,
    reachable: bool,
    /// A full report arrived since the controller started (or since the host came back).
    synced: bool,
    deploy_backoff_until: Option<Instant>,
    /// The agent did not answer a call: the host is skipped until a probe gets an answer.
    not_answering: Option<Box<NotAnswering>>,
    /// The agent refused an allocation it could not record on its disk: skip the host until
    /// then (all its instances share that disk).
    cannot_record_until: Option<Instant>,
}

impl Host {
    fn target(&self) -> Arc<AgentTarget> {
        self.target.clone()
    }

    /// How long the host has been silent, less the time the controller itself did not run
    /// (`excused`, its running total of stalls).
    fn silent_for(&self, excused: Duration) -> Duration {
        self.last_heartbeat
            .elapsed()
            .saturating_sub(excused.saturating_sub(self.excused_at))
    }

    fn heard(&mut self, excused: Duration) {
        self.last_heartbeat = Instant::now();
        self.excused_at = excused;
    }

    fn state(&self) -> HostState {
        if !self.reachable {
            HostState::Unreachable
        } else if self.not_answering.is_some() {
            HostState::NotAnswering
        } else if self.rec.draining {
            HostState::Draining
        } else {
            HostState::Ready
        }
    }
}

/// A host whose agent heartbeats but did not answer the controller's last call: a firewall
/// that lets the agent out but not the controller in, an `advertise_url` no longer the
/// agent's, an agent whose API hangs. Allocations do not try it (each try would cost a
/// matchmaker the call's timeout) until a probe gets an answer.
#[derive(Debug)]
struct NotAnswering {
    /// When the first call failed.
    started: Instant,
    error: String,
    next_probe: Instant,
    backoff: Duration,
    probing: bool,
}

/// A host as listings and metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostState {
    Ready,
    Unreachable,
    NotAnswering,
    Draining,
}

impl HostState {
    const ALL: [Self; 4] = [
        Self::Ready,
        Self::Unreachable,
        Self::NotAnswering,
        Self::Draining,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Unreachable => "unreachable",
            Self::NotAnswering => "not_answering",
            Self::Draining => "draining",
        }
    }
}

/// The status an instance is shown with: the controller's own knowledge (an allocation in
/// flight or held) overrides what its agent last reported.
fn shown_status(claimed: bool, allocated: bool, reported: InstanceStatus) -> InstanceStatus {
    if claimed {
        InstanceStatus::Allocating
    } else if allocated {
        InstanceStatus::Allocated
    } else {
        reported
    }
}

/// An instance in memory: compact (see [`Report`]); [`Inst::record`] gives the stored form.
#[derive(Debug)]
struct Inst {
    id: Arc<str>,
    host_id: u64,
    application_id: u32,
    fleet_id: Option<u64>,
    created_at: u64,
    report: Report,
    /// An allocation attempt is in flight to this instance's agent.
    claimed: bool,
    removing: bool,
}

impl Inst {
    fn view(&self) -> InstanceView {
        self.report
            .to_view(&self.id, self.application_id, self.fleet_id)
    }

    /// The stored form (written when the instance appears and when it is removed).
    fn record(&self, removed_at: Option<u64>) -> InstanceRecord {
        InstanceRecord {
            id: self.id.to_string(),
            host_id: self.host_id,
            application_id: self.application_id,
            fleet_id: self.fleet_id,
            view: self.view(),
            created_at: self.created_at,
            removed_at,
        }
    }
}

/// The idle instances of one application, ordered so that the first one that passes the
/// filter on a usable host is the engine's choice. Only instance-level conditions decide
/// membership; host-level ones (reachable, re-synced, not draining, the filter's host columns)
/// are checked while walking, so a host changing state needs no update here.
#[derive(Debug, Default)]
struct AppIndex {
    /// Hosts with idle instances, in the engine's order ([`engine::rank`]).
    hosts: BTreeSet<Rank>,
    idle: HashMap<u64, BTreeSet<Arc<str>>>,
}

/// The parts of an allocation an instance object shows.
#[derive(Debug, Clone, Copy)]
struct AllocView<'a> {
    id: &'a str,
    created_at: u64,
    metadata: &'a [KeyValue],
}

#[derive(Debug)]
struct Claim {
    input: AllocateInput,
    resolved: Resolved,
    instance_id: String,
    allocation_id: String,
    attempts: Vec<AttemptStory>,
    started: Instant,
    /// The current attempt's row, submitted when the agent is asked, its commit, and the
    /// answer if the agent takes it.
    written: Option<Written>,
}

#[derive(Debug)]
struct Written {
    record: Arc<AllocationRecord>,
    answer: Answer,
    commit: Commit,
}

/// The inventory task's state.
pub struct Inventory {
    config: Arc<Config>,
    writer: Writer,
    metrics: Arc<Metrics>,
    regions: BTreeMap<u32, Region>,
    dc_locations: BTreeMap<u32, DcLocation>,
    environments: BTreeMap<u32, DeploymentEnvironment>,
    applications: BTreeMap<u32, Application>,
    profiles: BTreeMap<String, Profile>,
    builds: BTreeMap<String, Build>,
    fleets: BTreeMap<u64, Fleet>,
    /// Fleets deleted through this database: their instances are removed. An instance of a
    /// fleet in neither map was never this database's to manage (a new, wrong or restored
    /// database) and is left alone.
    deleted_fleets: HashSet<u64>,
    /// Such unknown fleets, each warned about once.
    unknown_fleets: HashSet<u64>,
    hosts: BTreeMap<u64, Host>,
    /// Hosts an operator deleted: their ids are never given again.
    deleted_hosts: BTreeMap<u64, DeletedHost>,
    instances: HashMap<Arc<str>, Inst>,
    by_application: HashMap<u32, BTreeSet<Arc<str>>>,
    /// Profile ids, builds, maps, modes and versions, stored once.
    strings: Interner,
    /// Active allocations by instance id, shared with the writer (and with the handler that
    /// answers from one) rather than copied.
    allocations: HashMap<String, Arc<AllocationRecord>>,
    by_key: HashMap<String, String>,
    /// Instances whose allocation was loaded at start and not yet confirmed by its agent: the
    /// row is written while the agent is asked, so a loaded row may be an allocation the agent
    /// never received, and counts only once the agent's full report says it holds it.
    unconfirmed: HashSet<String>,
    host_allocations: HashMap<u64, u32>,
    /// The candidate index: allocation walks it instead of scanning every instance.
    index: HashMap<u32, AppIndex>,
    /// Instances whose agent refused an allocation, until when they are passed over (put back
    /// on the tick that ends that): few at any time, so kept here rather than in every instance.
    refused: HashMap<String, Instant>,
    claims: HashMap<u64, Claim>,
    inflight_keys: HashSet<String>,
    next_claim: u64,
    pending_deploys: HashMap<String, (u64, u64)>,
    stories: VecDeque<String>,
    story_map: HashMap<String, ErrorStory>,
    stories_since_prune: usize,
    removals_since_prune: usize,
    actions: mpsc::UnboundedSender<Action>,
    agents: AgentClient,
    /// When the last tick ran: a tick far later than its period means the controller itself
    /// did not run (stopped, its VM paused, starved of CPU) and could hear no agent.
    last_tick: Instant,
    /// The total of such stalls, which no host's silence includes.
    excused: Duration,
}

impl std::fmt::Debug for Inventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inventory")
            .field("hosts", &self.hosts.len())
            .field("instances", &self.instances.len())
            .finish_non_exhaustive()
    }
}

/// The host's agent as calls reach it, starting its batching lane.
fn host_target(agents: &AgentClient, rec: &HostRecord) -> Arc<AgentTarget> {
    let plain = AgentTarget {
        host_id: rec.id,
        host_name: rec.name.clone(),
        url: rec.advertise_url.clone(),
        token: rec.agent_token.clone(),
        lane: None,
    };
    let lane = agents.lane(&plain);
    Arc::new(AgentTarget {
        lane: Some(lane),
        ..plain
    })
}

fn not_found(what: &str) -> Failure {
    Failure::new(ErrorCode::ResourceNotFound, "Not found.", what.to_owned())
}

fn host_not_registered(host_id: u64, instance_id: &str) -> Failure {
    not_found(&format!(
        "host {host_id} of instance {instance_id} is not registered; its agent must register again"
    ))
}

/// What a registration must say before anything is done with it (the controller then calls the
/// agent at `advertiseUrl`): a usable host name, and the scheme the controller reaches agents
/// with.
pub fn check_registration(req: &RegisterRequest, tls: bool) -> Result<(), Failure> {
    if req.host_name.trim().is_empty() || req.host_name.len() > 253 {
        // A runaway name is shown cut short: the point is which agent sent it.
        let name = &req.host_name;
        let shown: String = name.chars().take(64).collect();
        let cut = if shown.len() < name.len() { "…" } else { "" };
        return Err(invalid(format!(
            "hostName {shown:?}{cut} is {} bytes long; it must be 1-253 bytes and not blank (set host_name in agent.toml)",
            name.len()
        )));
    }
    // With TLS the controller reaches agents only over it, so that allocations go to the
    // host the certificate names; without, it has nothing to verify an agent with.
    let scheme = if tls { "https://" } else { "http://" };
    if !req.advertise_url.starts_with(scheme) {
        return Err(invalid(format!(
            "advertiseUrl {:?} must be an {scheme} URL the controller can reach ({})",
            req.advertise_url,
            if tls {
                "this controller runs TLS: set [tls] in agent.toml"
            } else {
                "this controller has no [tls]: remove [tls] from agent.toml or add it to controller.toml"
            }
        )));
    }
    Ok(())
}

fn invalid(details: impl Into<String>) -> Failure {
    Failure::invalid_request(details)
}

fn parse_digest(hex_text: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, chunk) in hex_text.as_bytes().chunks(2).take(32).enumerate() {
        out[i] = std::str::from_utf8(chunk)
            .ok()
            .and_then(|s| u8::from_str_radix(s, 16).ok())
            .unwrap_or(0);
    }
    out
}

impl Inventory {
    /// Builds the inventory from what the store loaded and the configuration. Every known host
    /// gets a full expiry window from now before it can be declared unreachable.
    pub fn start(
        config: Arc<Config>,
        snapshot: Snapshot,
        writer: Writer,
        metrics: Arc<Metrics>,
        agents: AgentClient,
    ) -> (InventoryHandle, mpsc::UnboundedReceiver<Action>) {
        let (actions, actions_rx) = mpsc::unbounded_channel();
        let now = Instant::now();
        let mut inv = Self {
            writer,
            metrics,
            regions: snapshot.regions.into_iter().map(|r| (r.id, r)).collect(),
            dc_locations: snapshot
                .dc_locations
                .into_iter()
                .map(|d| (d.id, d))
                .collect(),
            environments: snapshot
                .environments
                .into_iter()
                .map(|e| (e.id, e))
                .collect(),
            applications: snapshot
                .applications
                .into_iter()
                .map(|a| (a.id, a))
                .collect(),
            profiles: snapshot
                .profiles
                .into_iter()
                .map(|p| (p.id.clone(), p))
                .collect(),
            builds: snapshot
                .builds
                .into_iter()
                .map(|b| (b.id.clone(), b))
                .collect(),
            fleets: snapshot.fleets.into_iter().map(|f| (f.id, f)).collect(),
            deleted_fleets: snapshot.deleted_fleets.into_iter().collect(),
            unknown_fleets: HashSet::new(),
            deleted_hosts: snapshot
                .deleted_hosts
                .into_iter()
                .map(|d| (d.id, d))
                .collect(),
            hosts: snapshot
                .hosts
                .into_iter()
                .map(|rec| {
                    let token_digest = parse_digest(&rec.host_token_digest);
                    (
                        rec.id,
                        Host {
                            target: host_target(&agents, &rec),
                            rec,
                            token_digest,
                            last_heartbeat: now,
                            excused_at: Duration::ZERO,
                            reachable: true,
                            synced: false,
                            deploy_backoff_until: None,
                            not_answering: None,
                            cannot_record_until: None,
                        },
                    )
                })
                .collect(),
            instances: HashMap::new(),
            by_application: HashMap::new(),
            strings: Interner::default(),
            allocations: HashMap::new(),
            by_key: HashMap::new(),
            host_allocations: HashMap::new(),
            index: HashMap::new(),
            refused: HashMap::new(),
            claims: HashMap::new(),
            inflight_keys: HashSet::new(),
            unconfirmed: HashSet::new(),
            next_claim: 1,
            pending_deploys: HashMap::new(),
            stories: VecDeque::new(),
            story_map: HashMap::new(),
            stories_since_prune: 0,
            removals_since_prune: 0,
            actions,
            config,
            agents,
            last_tick: now,
            excused: Duration::ZERO,
        };
        for rec in snapshot.instances {
            inv.insert_instance(rec);
        }
        for a in snapshot.allocations {
            inv.unconfirmed.insert(a.instance_id.clone());
            inv.insert_allocation(Arc::new(a));
        }
        // Configured regions, DC locations and environments win over stored ones.
        for r in inv.config.regions.clone() {
            inv.writer.submit(Write::Region(r.clone()));
            inv.regions.insert(r.id, r);
        }
        for d in inv.config.dc_locations.clone() {
            inv.writer.submit(Write::DcLocation(d.clone()));
            inv.dc_locations.insert(d.id, d);
        }
        let mut envs = inv.config.deployment_environments.clone();
        if envs.is_empty() && inv.environments.is_empty() {
            envs = vec![
                DeploymentEnvironment {
                    id: 1,
                    name: "production".into(),
                },
                DeploymentEnvironment {
                    id: 2,
                    name: "staging".into(),
                },
            ];
        }
        for e in envs {
            inv.writer.submit(Write::Environment(e.clone()));
            inv.environments.insert(e.id, e);
        }
        let (tx, rx) = mpsc::channel(16_384);
        tokio::spawn(inv.run(rx));
        (InventoryHandle { tx }, actions_rx)
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(cmd) = rx.recv().await {
            self.handle(cmd);
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Claim(input, reply) => {
                let step = self.claim(*input);
                let _ = reply.send(step);
            }
            Command::Settle(claim_id, result, reply) => {
                let step = self.settle(claim_id, result);
                let _ = reply.send(step);
            }
            Command::AbortAllocation {
                instance_id,
                allocation_id,
            } => self.abort_allocation(&instance_id, &allocation_id),
            Command::BeginRelease(id, allocation_id, reply) => {
                let _ = reply.send(self.begin_release(&id, allocation_id));
            }
            Command::FinishRelease(id, allocation_id, result, reply) => {
                if let Some(done) = self.finish_release(&id, allocation_id, result) {
                    let _ = reply.send(done);
                }
            }
            Command::BeginOp(id, op, reply) => {
                let _ = reply.send(self.begin_op(&id, op));
            }
            Command::ApplyView(host_id, view, reply) => {
                let id = view.id.clone();
                self.apply_answer(host_id, *view);
                let _ = reply.send(self.object_of(&id));
            }
            Command::Register(req, reply) => {
                let _ = reply.send(self.register(*req));
            }
            Command::Heartbeat(token, req, reply) => {
                let _ = reply.send(self.heartbeat(token, &req));
            }
            Command::Events(token, req, reply) => {
                let _ = reply.send(self.events(token, *req));
            }
            Command::ListInstances(q, reply) => {
                let _ = reply.send(self.list_instances(&q));
            }
            Command::GetInstance(id, reply) => {
                let _ = reply.send(self.object_of(&id));
            }
            Command::Hosts(reply) => {
                let tally = self.tally(None);
                let hosts = self.hosts.values();
                let _ = reply.send(hosts.map(|h| self.host_object(h, &tally)).collect());
            }
            Command::Host(id, reply) => {
                let tally = self.tally(Some(id));
                let host = match self.hosts.get(&id) {
                    Some(h) => Ok(self.host_object(h, &tally)),
                    None => Err(self.host_missing(id)),
                };
                let _ = reply.send(host);
            }
            Command::Drain(id, on, reply) => {
                let _ = reply.send(self.drain(id, on));
            }
            Command::DeleteHost(id, release, reply) => {
                let _ = reply.send(self.delete_host(id, release));
            }
            Command::Crud(op, reply) => {
                let _ = reply.send(self.crud(op));
            }
            Command::Story(id, reply) => {
                let _ = reply.send(self.story_map.get(&id).cloned());
            }
            Command::RecordFailure(record) => self.record_failure(*record),
            Command::Plan(reply) => {
                let _ = reply.send(self.plan());
            }
            Command::ActionDone(result) => self.action_done(*result),
            Command::Counts(reply) => {
                let _ = reply.send(self.counts());
            }
            Command::Tick => self.tick(),
        }
    }

    // ----- indexes -------------------------------------------------------------------------

    fn rank(&self, host_id: u64) -> Rank {
        let vm = self.hosts.get(&host_id).is_some_and(|h| h.rec.is_virtual);
        let n = self.host_allocations.get(&host_id).copied().unwrap_or(0);
        engine::rank(vm, n, host_id)
    }

    fn refused_at(&self, id: &str, now: Instant) -> bool {
        !self.refused.is_empty() && self.refused.get(id).is_some_and(|t| *t > now)
    }

    /// Instance-level conditions of [`Availability::Allocatable`].
    fn instance_idle(&self, i: &Inst, now: Instant) -> bool {
        !i.removing
            && !i.claimed
            && !self.allocations.contains_key(&*i.id)
            && !self.refused_at(&i.id, now)
            && i.report.is_allocatable()
    }

    /// Puts an instance in or out of the candidate index after anything about it changed.
    fn reindex(&mut self, id: &str) {
        let Some(inst) = self.instances.get(id) else {
            return;
        };
        let (app, host) = (inst.application_id, inst.host_id);
        let inst_id = inst.id.clone();
        let idle = self.instance_idle(inst, Instant::now());
        let rank = self.rank(host);
        let ai = self.index.entry(app).or_default();
        if idle {
            let set = ai.idle.entry(host).or_default();
            if set.insert(inst_id) && set.len() == 1 {
                ai.hosts.insert(rank);
            }
        } else if let Some(set) = ai.idle.get_mut(&host)
            && set.remove(id)
            && set.is_empty()
        {
            ai.idle.remove(&host);
            ai.hosts.remove(&rank);
        }
    }

    /// A host's rank is about to change (its allocation count, or VM flag): moves its entries.
    fn rerank(&mut self, host_id: u64, old: Rank) {
        let new = self.rank(host_id);
        if new == old {
            return;
        }
        for ai in self.index.values_mut() {
            if ai.hosts.remove(&old) {
                ai.hosts.insert(new);
            }
        }
    }

    /// The engine's choice, found through the index: the first idle instance, on a usable host
    /// in rank order, that passes the filter.
    fn choose_indexed(&self, app: u32, filter: &Resolved, now: Instant) -> Option<String> {
        let ai = self.index.get(&app)?;
        for &(_, _, host_id) in &ai.hosts {
            let Some(host) = self.hosts.get(&host_id) else {
                continue;
            };
            if !host.reachable
                || !host.synced
                || host.rec.draining
                || host.not_answering.is_some()
                || host.cannot_record_until.is_some_and(|t| t > now)
            {
                continue;
            }
            for id in ai.idle.get(&host_id).into_iter().flatten() {
                let Some(inst) = self.instances.get(id) else {
                    continue;
                };
                let f = self.facts(inst, now);
                if f.availability == Availability::Allocatable
                    && filter.conds.iter().all(|(c, _)| c.matches(&f))
                {
                    return Some(id.to_string());
                }
            }
        }
        None
    }

    fn insert_instance(&mut self, rec: InstanceRecord) {
        // One allocation of the id, shared by the map, the application's set and the index.
        let id: Arc<str> = Arc::from(rec.id.as_str());
        self.by_application
            .entry(rec.application_id)
            .or_default()
            .insert(id.clone());
        let inst = Inst {
            id: id.clone(),
            host_id: rec.host_id,
            application_id: rec.application_id,
            fleet_id: rec.fleet_id,
            created_at: rec.created_at,
            report: Report::from_view(rec.view, &mut self.strings),
            claimed: false,
            removing: false,
        };
        self.instances.insert(id.clone(), inst);
        self.reindex(&id);
    }

    fn insert_allocation(&mut self, a: Arc<AllocationRecord>) {
        if let Some(k) = &a.idempotency_key {
            self.by_key.insert(k.clone(), a.instance_id.clone());
        }
        let old = self.rank(a.host_id);
        *self.host_allocations.entry(a.host_id).or_insert(0) += 1;
        self.rerank(a.host_id, old);
        let id = a.instance_id.clone();
        self.allocations.insert(id.clone(), a);
        self.reindex(&id);
    }

    /// Ends an allocation in memory and on disk. Nobody waits for the disk here: a release
    /// lost in a crash comes back at restart and is released again by the agent's next report
    /// (status 4 with a newer version), so only allocations need to be durable before an answer.
    fn release_allocation(&mut self, instance_id: &str, why: &str) {
        let Some(a) = self.allocations.remove(instance_id) else {
            return;
        };
        self.unconfirmed.remove(instance_id);
        if let Some(k) = &a.idempotency_key {
            self.by_key.remove(k);
        }
        let old = self.rank(a.host_id);
        if let Some(n) = self.host_allocations.get_mut(&a.host_id) {
            *n = n.saturating_sub(1);
        }
        self.rerank(a.host_id, old);
        self.reindex(instance_id);
        tracing::debug!(instance_id, allocation_id = %a.id, reason = why, "allocation released");
        self.writer.submit(Write::ReleaseAllocation(a.id.clone()));
    }

    fn remove_instance(&mut self, id: &str, why: &str) {
        self.release_allocation(id, why);
        if let Some(inst) = self.instances.get_mut(id) {
            // Out of the index before it leaves the map.
            inst.removing = true;
        }
        self.reindex(id);
        self.refused.remove(id);
        if let Some(mut inst) = self.instances.remove(id) {
            if let Some(set) = self.by_application.get_mut(&inst.application_id) {
                set.remove(id);
            }
            inst.report.status = InstanceStatus::Inactive;
            tracing::info!(
                instance_id = id,
                host_id = inst.host_id,
                reason = why,
                "instance removed"
            );
            self.writer
                .submit(Write::Instance(Box::new(inst.record(Some(unix_now())))));
            self.removals_since_prune += 1;
            if self.removals_since_prune >= crate::store::REMOVED_INSTANCES_KEPT {
                self.removals_since_prune = 0;
                self.writer.submit(Write::PruneRemovedInstances {
                    keep: crate::store::REMOVED_INSTANCES_KEPT,
                });
            }
        }
    }

    // ----- views ---------------------------------------------------------------------------

    fn availability(&self, i: &Inst, now: Instant) -> Availability {
        if i.removing {
            return Availability::Stopping;
        }
        if i.claimed {
            return Availability::Allocating;
        }
        if self.allocations.contains_key(&*i.id) {
            return Availability::Allocated;
        }
        let Some(host) = self.hosts.get(&i.host_id) else {
            return Availability::HostUnreachable;
        };
        if !host.reachable {
            return Availability::HostUnreachable;
        }
        if host.not_answering.is_some() {
            return Availability::AgentNotAnswering;
        }
        if host.cannot_record_until.is_some_and(|t| t > now) {
            return Availability::AgentCannotRecord;
        }
        if !host.synced {
            return Availability::HostResyncing;
        }
        if host.rec.draining {
            return Availability::HostDraining;
        }
        if self.refused_at(&i.id, now) {
            return Availability::RecentlyRefused;
        }
        let v = &i.report;
        match v.status {
            InstanceStatus::Allocated | InstanceStatus::Allocating => Availability::Allocated,
            _ if v.state.is_stopping() => Availability::Stopping,
            InstanceStatus::Online if v.releasing => Availability::Releasing,
            InstanceStatus::Online if v.is_allocatable() => Availability::Allocatable,
            InstanceStatus::Online => Availability::ArcusDown,
            InstanceStatus::Starting
                if v.game.as_deref().is_some_and(|g| g.arcus_error.is_some()) =>
            {
                Availability::NoLink
            }
            _ => Availability::NotOnline,
        }
    }

    fn shown_status(&self, i: &Inst) -> InstanceStatus {
        shown_status(
            i.claimed,
            self.allocations.contains_key(&*i.id),
            i.report.status,
        )
    }

    fn environment_of(&self, fleet_id: Option<u64>) -> Option<u32> {
        fleet_id
            .and_then(|f| self.fleets.get(&f))
            .map(|f| f.deployment_environment_id)
    }

    fn object_of(&self, id: &str) -> Option<InstanceObject> {
        self.instances.get(id).map(|i| self.object(i))
    }

    fn object(&self, inst: &Inst) -> InstanceObject {
        let alloc = self.allocations.get(&*inst.id).map(|a| AllocView {
            id: &a.id,
            created_at: a.created_at,
            metadata: &a.metadata,
        });
        self.object_with(inst, alloc)
    }

    fn object_with(&self, inst: &Inst, alloc: Option<AllocView<'_>>) -> InstanceObject {
        let v = &inst.report;
        let game = v.game.as_deref();
        let host = self.hosts.get(&inst.host_id);
        let region_id = host.map_or(0, |h| h.rec.region_id);
        let dc_id = host.map_or(0, |h| h.rec.dc_location_id);
        let status = shown_status(inst.claimed, alloc.is_some(), v.status);
        let state = if host.is_some_and(|h| !h.reachable) {
            RuntimeState::ServerUnreachable
        } else {
            v.state
        };
        InstanceObject {
            id: inst.id.to_string(),
            application_id: inst.application_id,
            fleet_id: inst.fleet_id,
            deployment_environment_id: self.environment_of(inst.fleet_id),
            profile_id: v.profile_id.to_string(),
            build: v.build.to_string(),
            host_id: inst.host_id,
            host_name: host.map(|h| h.rec.name.clone()).unwrap_or_default(),
            region_id,
            region_name: self
                .regions
                .get(&region_id)
                .map(|r| r.name.clone())
                .unwrap_or_default(),
            dc_location_id: dc_id,
            dc_location_name: self
                .dc_locations
                .get(&dc_id)
                .map(|d| d.name.clone())
                .unwrap_or_default(),
            is_virtual: u8::from(host.is_some_and(|h| h.rec.is_virtual)),
            ip_address: host
                .and_then(|h| h.rec.addresses.first().cloned())
                .unwrap_or_default(),
            port: v.port,
            management_port: v.management_port,
            status,
            state,
            pid: v.pid.map(NonZeroU32::get),
            arcus_connected: v.arcus_connected,
            arcus_error: game.and_then(|g| g.arcus_error.as_deref().cloned()),
            num_players: game.and_then(|g| g.num_players),
            num_players_max: game.and_then(|g| g.num_players_max),
            live_host_name: game.and_then(|g| g.live_host_name.as_deref().map(str::to_owned)),
            live_map: game.and_then(|g| g.live_map.as_deref().map(str::to_owned)),
            live_rules: game.and_then(|g| g.live_rules.as_deref().map(str::to_owned)),
            live_game_version: game.and_then(|g| g.live_game_version.as_deref().map(str::to_owned)),
            metadata: match &alloc {
                Some(a) if v.metadata().is_empty() => a.metadata.to_vec(),
                _ => v.metadata().to_vec(),
            },
            reverse_metadata: v.reverse_metadata().to_vec(),
            allocation_id: alloc.as_ref().map(|a| a.id.to_owned()),
            allocated_at: alloc.as_ref().map(|a| rfc3339(a.created_at)),
            restarts: v.restarts,
            auto_restart: v.auto_restart,
            releasing: v.releasing,
            created_at: rfc3339(inst.created_at),
            updated_at: rfc3339(u64::from(v.updated_at)),
        }
    }

    /// Instances per host by status, in one pass over the instances (of one host, or all).
    /// A claimed instance counts under its reported status here, unlike in instance objects
    /// and the metrics: host listings have always shown it so.
    fn tally(&self, only: Option<u64>) -> HashMap<u64, [usize; 7]> {
        let mut out: HashMap<u64, [usize; 7]> = HashMap::new();
        for i in self.instances.values() {
            if only.is_some_and(|h| h != i.host_id) {
                continue;
            }
            let allocated = self.allocations.contains_key(&*i.id);
            let status = shown_status(false, allocated, i.report.status);
            out.entry(i.host_id).or_default()[status as usize] += 1;
        }
        out
    }

    fn host_object(&self, h: &Host, tally: &HashMap<u64, [usize; 7]>) -> HostObject {
        let counts = tally.get(&h.rec.id).copied().unwrap_or_default();
        let by_status: BTreeMap<String, usize> = InstanceStatus::ALL
            .into_iter()
            .filter(|s| counts[*s as usize] > 0)
            .map(|s| (s.name().to_owned(), counts[s as usize]))
            .collect();
        let last = h.last_heartbeat.elapsed().as_secs();
        HostObject {
            id: h.rec.id,
            name: h.rec.name.clone(),
            region_id: h.rec.region_id,
            region_name: self
                .regions
                .get(&h.rec.region_id)
                .map(|r| r.name.clone())
                .unwrap_or_default(),
            dc_location_id: h.rec.dc_location_id,
            dc_location_name: self
                .dc_locations
                .get(&h.rec.dc_location_id)
                .map(|d| d.name.clone())
                .unwrap_or_default(),
            is_virtual: u8::from(h.rec.is_virtual),
            labels: h.rec.labels.clone(),
            advertise_url: h.rec.advertise_url.clone(),
            addresses: h.rec.addresses.clone(),
            capacity: h.rec.capacity.clone(),
            agent_version: h.rec.agent_version.clone(),
            state: h.state().name().to_owned(),
            reachable: h.reachable,
            draining: h.rec.draining,
            last_heartbeat_at: Some(rfc3339(unix_now().saturating_sub(last))),
            registered_at: rfc3339(h.rec.registered_at),
            instances: counts.iter().sum(),
            instances_by_status: by_status,
            agent_error: h.not_answering.as_ref().map(|n| n.error.clone()),
            agent_error_since: h
                .not_answering
                .as_ref()
                .map(|n| rfc3339(unix_now().saturating_sub(n.started.elapsed().as_secs()))),
        }
    }

    fn counts(&self) -> Counts {
        let mut by_status = [0i64; 7];
        for i in self.instances.values() {
            by_status[self.shown_status(i) as usize] += 1;
        }
        let mut hosts = [0i64; HostState::ALL.len()];
        for h in self.hosts.values() {
            hosts[h.state() as usize] += 1;
        }
        let hosts = HostState::ALL
            .into_iter()
            .map(|s| (s.name(), hosts[s as usize]))
            .collect();
        (by_status, hosts)
    }

    // ----- filters ---------------------------------------------------------------------------

    /// Names and ids in the filter, resolved; a value that names nothing is a 404 naming it.
    fn resolve(&self, filter: &Filter) -> Result<Resolved, Failure> {
        let missing = |c: &Condition, what: &str| {
            Failure::new(
                ErrorCode::FilterValueNotFound,
                "Unable to allocate application instance.",
                format!("filter {}={} names no {what}", c.column(), c.value_string()),
            )
        };
        let mut conds = Vec::new();
        for c in &filter.conditions {
            let text = format!("{}={}", c.column(), c.value_string());
            let cond = match c {
                Condition::FleetId(id) => {
                    if !self.fleets.contains_key(id) {
                        return Err(missing(c, "fleet"));
                    }
                    Cond::FleetIds(vec![*id])
                }
                Condition::FleetName(name) => {
                    let ids: Vec<u64> = self
                        .fleets
                        .values()
                        .filter(|f| &f.name == name)
                        .map(|f| f.id)
                        .collect();
                    if ids.is_empty() {
                        return Err(missing(c, "fleet"));
                    }
                    Cond::FleetIds(ids)
                }
                Condition::RegionId(id) => {
                    let id = u32::try_from(*id)
                        .ok()
                        .filter(|i| self.regions.contains_key(i));
                    Cond::RegionIds(vec![id.ok_or_else(|| missing(c, "region"))?])
                }
                Condition::RegionName(name) => {
                    let id = self
                        .regions
                        .values()
                        .find(|r| &r.name == name)
                        .map(|r| r.id);
                    Cond::RegionIds(vec![id.ok_or_else(|| missing(c, "region"))?])
                }
                Condition::DcLocationId(id) => {
                    let id = u32::try_from(*id)
                        .ok()
                        .filter(|i| self.dc_locations.contains_key(i));
                    Cond::DcLocationIds(vec![id.ok_or_else(|| missing(c, "DC location"))?])
                }
                Condition::DcLocationName(name) => {
                    let ids: Vec<u32> = self
                        .dc_locations
                        .values()
                        .filter(|d| &d.name == name)
                        .map(|d| d.id)
                        .collect();
                    if ids.is_empty() {
                        return Err(missing(c, "DC location"));
                    }
                    Cond::DcLocationIds(ids)
                }
                Condition::DeploymentEnvironmentId(id) => {
                    let id = u32::try_from(*id)
                        .ok()
                        .filter(|i| self.environments.contains_key(i));
                    Cond::EnvironmentIds(vec![
                        id.ok_or_else(|| missing(c, "deployment environment"))?,
                    ])
                }
                Condition::DeploymentEnvironmentName(name) => {
                    let id = self
                        .environments
                        .values()
                        .find(|e| &e.name == name)
                        .map(|e| e.id);
                    Cond::EnvironmentIds(vec![
                        id.ok_or_else(|| missing(c, "deployment environment"))?,
                    ])
                }
                Condition::IsVirtual(v) => Cond::IsVirtual(*v),
            };
            conds.push((cond, text));
        }
        Ok(Resolved { conds })
    }

    fn facts(&self, inst: &Inst, now: Instant) -> Facts {
        let host = self.hosts.get(&inst.host_id);
        Facts {
            host_id: inst.host_id,
            fleet_id: inst.fleet_id,
            environment_id: self.environment_of(inst.fleet_id),
            region_id: host.map_or(0, |h| h.rec.region_id),
            dc_location_id: host.map_or(0, |h| h.rec.dc_location_id),
            is_virtual: host.is_some_and(|h| h.rec.is_virtual),
            availability: self.availability(inst, now),
            host_allocations: self
                .host_allocations
                .get(&inst.host_id)
                .copied()
                .unwrap_or(0),
        }
    }

    // ----- allocation ------------------------------------------------------------------------

    fn claim(&mut self, input: AllocateInput) -> Step {
        let refuse = |f: Failure| Step::Refused(Box::new(f));
        if !self.applications.contains_key(&input.application_id) {
            return refuse(Failure::new(
                ErrorCode::ApplicationNotFound,
                "Unable to allocate application instance.",
                format!(
                    "application {} does not exist; create it with POST /v1/applications",
                    input.application_id
                ),
            ));
        }
        if let Some(key) = &input.idempotency_key {
            if let Some(instance_id) = self.by_key.get(key)
                && let Some(a) = self.allocations.get(instance_id)
            {
                if a.request_digest != input.request_digest {
                    return refuse(Failure::new(
                        ErrorCode::IdempotencyKeyReused,
                        "Unable to allocate application instance.",
                        format!(
                            "Idempotency-Key {key:?} was used for a different request (allocation {}); use a new key for a new match",
                            a.id
                        ),
                    ));
                }
                if self.unconfirmed.contains(instance_id) {
                    let mut f = Failure::new(
                        ErrorCode::ServiceUnavailable,
                        "Unable to allocate application instance.",
                        format!(
                            "allocation {} of instance {} (Idempotency-Key {key:?}) was written just before the controller restarted, and host {} has not reported since, so whether its game received it is not known yet; retry in a moment",
                            a.id, a.instance_id, a.host_id
                        ),
                    );
                    f.retry_after_secs = Some(1);
                    return refuse(f);
                }
                let Some(answer) = a.replay(input.shape) else {
                    // Every keyed allocation keeps its answer; this one was stored without.
                    return refuse(Failure::new(
                        ErrorCode::InternalError,
                        "Unable to allocate application instance.",
                        format!(
                            "allocation {} (Idempotency-Key {key:?}) has no stored answer to replay; release it and allocate again",
                            a.id
                        ),
                    ));
                };
                tracing::info!(instance_id = %a.instance_id, allocation_id = %a.id, "idempotent replay");
                return Step::Done {
                    allocation: a.clone(),
                    answer,
                    committed: None,
                };
            }
            if self.inflight_keys.contains(key) {
                let mut f = Failure::new(
                    ErrorCode::IdempotencyKeyReused,
                    "Unable to allocate application instance.",
                    format!(
                        "a request with Idempotency-Key {key:?} is still in progress; retry it in a moment"
                    ),
                );
                f.retry_after_secs = Some(1);
                return refuse(f);
            }
        }
        let resolved = match self.resolve(&input.filter) {
            Ok(r) => r,
            Err(f) => return refuse(f),
        };
        if let Some(key) = &input.idempotency_key {
            self.inflight_keys.insert(key.clone());
        }
        let claim = Claim {
            input,
            resolved,
            instance_id: String::new(),
            allocation_id: String::new(),
            attempts: Vec::new(),
            started: Instant::now(),
            written: None,
        };
        self.next_attempt(claim)
    }

    fn next_attempt(&mut self, mut claim: Claim) -> Step {
        let now = Instant::now();
        let chosen = if claim.attempts.len() >= self.config.max_allocation_attempts as usize {
            None
        } else {
            let indexed = self.choose_indexed(claim.input.application_id, &claim.resolved, now);
            // The index must agree with the pure engine: checked on every choice in debug
            // builds (every end-to-end test), and the full scan also explains a refusal.
            let scanned = if indexed.is_none() || cfg!(debug_assertions) {
                let ids: Vec<&Arc<str>> = self
                    .by_application
                    .get(&claim.input.application_id)
                    .map(|s| s.iter().collect())
                    .unwrap_or_default();
                let facts: Vec<Facts> = ids
                    .iter()
                    .filter_map(|id| self.instances.get(&***id))
                    .map(|i| self.facts(i, now))
                    .collect();
                Some(engine::choose(&facts, &claim.resolved).map(|i| ids[i].to_string()))
            } else {
                None
            };
            if let (Some(i), Some(Ok(s))) = (&indexed, &scanned) {
                debug_assert_eq!(i, s, "candidate index disagrees with the engine");
            }
            match (indexed, scanned) {
                (Some(id), _) => Some(id),
                (None, Some(Ok(id))) => {
                    debug_assert!(false, "candidate index missed {id}");
                    Some(id)
                }
                (None, Some(Err(refusal))) if claim.attempts.is_empty() => {
                    let mut f = Failure::new(
                        ErrorCode::NoAllocatableInstance,
                        "Unable to allocate application instance.",
                        refusal.details(claim.input.application_id),
                    );
                    f.story = Some(Box::new(json!({"decision": refusal.to_json()})));
                    return self.finish_claim(claim, f);
                }
                (None, _) => None,
            }
        };
        let Some(instance_id) = chosen else {
            return self.fail_after_attempts(claim);
        };
        let Some(inst) = self.instances.get_mut(instance_id.as_str()) else {
            return self.fail_after_attempts(claim);
        };
        // Claimed only once there is an agent to ask: a claim nobody settles would hide the
        // instance from allocation for good.
        let Some(target) = self.hosts.get(&inst.host_id).map(Host::target) else {
            return self.fail_after_attempts(claim);
        };
        inst.claimed = true;
        self.reindex(&instance_id);
        let claim_id = self.next_claim;
        self.next_claim += 1;
        claim.instance_id = instance_id.clone();
        claim.allocation_id = uuid::Uuid::new_v4().to_string();
        // Written now, while the agent is asked, so that the commit's fsync overlaps the
        // agent's answer instead of following it. Until the agent confirms, the row proves
        // nothing: a controller that stops in between finds it at start and keeps it only if
        // the agent reports holding it (`confirm_loaded_allocations`).
        let (record, answer) = self.allocation_record(&claim);
        let record = Arc::new(record);
        let commit = self
            .writer
            .submit_durable(Write::Allocation(record.clone()));
        claim.written = Some(Written {
            record,
            answer,
            commit,
        });
        let call = AgentCall {
            claim_id,
            instance_id,
            allocation_id: claim.allocation_id.clone(),
            target,
            metadata: claim.input.metadata.clone(),
            game_metadata: claim.input.game_metadata.clone(),
        };
        self.claims.insert(claim_id, claim);
        Step::Call(Box::new(call))
    }

    /// The allocation of the claim's current attempt as it is answered if the agent takes it:
    /// the instance as the controller knows it now, allocated. It is written before the agent
    /// answers, so it is the answer: a replay after a restart gives the same body. Without a
    /// key nothing can replay it, so only the shape asked for is built, and the row keeps none.
    fn allocation_record(&self, claim: &Claim) -> (AllocationRecord, Answer) {
        let inst = &self.instances[claim.instance_id.as_str()];
        let created_at = unix_now();
        let mut response = self.object_with(
            inst,
            Some(AllocView {
                id: &claim.allocation_id,
                created_at,
                metadata: &claim.input.metadata,
            }),
        );
        // The answer shows the allocation made, not the claim in progress it is for now.
        response.status = InstanceStatus::Allocated;
        response.updated_at = rfc3339(created_at);
        let keyed = claim.input.idempotency_key.is_some();
        let response_i3d = (keyed || claim.input.shape == Shape::I3d)
            .then(|| Arc::new(i3d_object(&response, inst)));
        let response = Arc::new(response);
        let answer = match &response_i3d {
            Some(o) if claim.input.shape == Shape::I3d => Answer::I3d(o.clone()),
            _ => Answer::Native(response.clone()),
        };
        let record = AllocationRecord {
            id: claim.allocation_id.clone(),
            instance_id: claim.instance_id.clone(),
            host_id: inst.host_id,
            application_id: claim.input.application_id,
            metadata: claim.input.metadata.clone(),
            idempotency_key: claim.input.idempotency_key.clone(),
            request_digest: claim.input.request_digest.clone(),
            agent_version: inst.report.version,
            identifier: claim.input.identifier.clone(),
            created_at,
            response: keyed.then_some(response),
            response_i3d: response_i3d.filter(|_| keyed),
        };
        (record, answer)
    }

    /// Every attempt failed (or candidates ran out after some did): the last agent answer is
    /// the error, with every attempt listed.
    fn fail_after_attempts(&mut self, claim: Claim) -> Step {
        let Some(last) = claim.attempts.last().cloned() else {
            let f = Failure::new(
                ErrorCode::InternalError,
                "Unable to allocate application instance.",
                "no candidate could be claimed",
            );
            return self.finish_claim(claim, f);
        };
        let code = ErrorCode::parse(&last.code).unwrap_or(ErrorCode::AgentInternalError);
        let host = self.hosts.get(&last.host_id);
        let where_ = host.map_or_else(String::new, |h| {
            format!(
                " on host {} ({}, {})",
                h.rec.id,
                self.regions
                    .get(&h.rec.region_id)
                    .map_or("?", |r| r.name.as_str()),
                berth_protocol::HostKind::from_is_virtual(h.rec.is_virtual)
            )
        });
        let details = format!(
            "Instance {}{where_}: {}; tried {} candidate{}.",
            last.instance_id,
            last.details,
            claim.attempts.len(),
            if claim.attempts.len() == 1 { "" } else { "s" }
        );
        let mut f = Failure::new(code, "Unable to allocate application instance.", details);
        f.error_code = last.error_code.or(code.agent_code());
        f.attempts = Some(
            claim
                .attempts
                .iter()
                .map(|a| Attempt {
                    instance_id: a.instance_id.clone(),
                    host_id: a.host_id,
                    error_code: a.error_code,
                    status_code: a.status_code,
                    code: ErrorCode::parse(&a.code),
                    details: a.details.clone(),
                })
                .collect(),
        );
        self.finish_claim(claim, f)
    }

    fn finish_claim(&mut self, claim: Claim, mut failure: Failure) -> Step {
        if let Some(key) = &claim.input.idempotency_key {
            self.inflight_keys.remove(key);
        }
        let mut story = failure.story.take().map_or_else(|| json!({}), |b| *b);
        if story.get("decision").is_none() {
            story["decision"] = json!({"filter": claim.resolved.text()});
        }
        story["attempts"] = serde_json::to_value(&claim.attempts).unwrap_or_default();
        failure.story = Some(Box::new(story));
        let code = failure.code;
        self.metrics.allocation(Err(code));
        self.metrics
            .allocation_seconds
            .observe(claim.started.elapsed().as_secs_f64());
        Step::Refused(Box::new(failure))
    }

    fn settle(&mut self, claim_id: u64, result: Result<InstanceView, AgentFailure>) -> Step {
        let Some(mut claim) = self.claims.remove(&claim_id) else {
            return Step::Refused(Box::new(Failure::new(
                ErrorCode::InternalError,
                "Unable to allocate application instance.",
                format!("claim {claim_id} is unknown"),
            )));
        };
        let instance_id = claim.instance_id.clone();
        // Back in the candidate index below, once the outcome is known.
        if let Some(inst) = self.instances.get_mut(instance_id.as_str()) {
            inst.claimed = false;
        }
        let written = claim.written.take();
        match (
            result,
            self.instances.get_mut(instance_id.as_str()),
            written,
        ) {
            (
                Ok(view),
                Some(inst),
                Some(Written {
                    record: alloc,
                    answer,
                    commit,
                }),
            ) => {
                if view.version >= inst.report.version {
                    inst.report = Report::from_view(view, &mut self.strings);
                }
                if let Some(key) = &claim.input.idempotency_key {
                    self.inflight_keys.remove(key);
                }
                // The record kept is the one written: a replay after a restart is the same.
                let (host_id, started) = (alloc.host_id, claim.started);
                self.insert_allocation(alloc.clone());
                // A report newer than the answer may have come while the agent was asked (an
                // events request overtaking the answer): a game that ended its match at once.
                // `apply_view` left it to us, as the allocation was not yet made.
                self.reconcile_allocation(&instance_id);
                self.metrics.allocation(Ok(()));
                self.metrics
                    .allocation_seconds
                    .observe(started.elapsed().as_secs_f64());
                tracing::debug!(instance_id = %alloc.instance_id, host_id, allocation_id = %alloc.id, "allocated");
                Step::Done {
                    allocation: alloc,
                    answer,
                    committed: Some(commit),
                }
            }
            (result, _, written) => {
                if written.is_some() {
                    // Nobody waits for this: a row left behind by a crash is not confirmed by
                    // the agent at the next start, and goes then.
                    self.writer
                        .submit(Write::ReleaseAllocation(claim.allocation_id.clone()));
                }
                // A report that came while the agent was asked, showing the allocation held
                // after all (the answer was lost or late), is released on the agent here.
                self.reconcile_allocation(&instance_id);
                match result {
                    // Removed while the agent was allocating: nothing to hand out.
                    Ok(_) => self.fail_after_attempts(claim),
                    Err(f) => self.agent_refused(claim, f),
                }
            }
        }
    }

    /// The agent refused the claim's current attempt: noted, and the next candidate tried.
    fn agent_refused(&mut self, mut claim: Claim, f: AgentFailure) -> Step {
        let instance_id = claim.instance_id.clone();
        self.metrics.agent_attempt_failures.inc();
        let host = self.hosts.get(&f.host_id);
        tracing::warn!(instance_id = %instance_id, host_id = f.host_id, code = %f.code, details = %f.details, attempt = claim.attempts.len() + 1, "agent refused the allocation");
        claim.attempts.push(AttemptStory {
            instance_id: instance_id.clone(),
            host_id: f.host_id,
            host_name: host.map(|h| h.rec.name.clone()).unwrap_or_default(),
            agent_url: host
                .map(|h| h.rec.advertise_url.clone())
                .unwrap_or_default(),
            status_code: f.status,
            error_code: f.error_code,
            code: f.code.as_str().to_owned(),
            details: f.details.clone(),
            elapsed_ms: f.elapsed_ms,
        });
        match f.code {
            ErrorCode::AgentUnreachable => self.not_answering(f.host_id, &f.details),
            // The only allocation refusal with this code: the agent's disk takes no journal
            // line (see the agent's `AllocateError::NotRecorded`).
            ErrorCode::AgentServerError => {
                if let Some(h) = self.hosts.get_mut(&f.host_id) {
                    h.cannot_record_until = Some(Instant::now() + REFUSED_FOR);
                }
            }
            _ => {}
        }
        if self.instances.contains_key(instance_id.as_str()) {
            self.refused
                .insert(instance_id.clone(), Instant::now() + REFUSED_FOR);
        }
        self.reindex(&instance_id);
        self.next_attempt(claim)
    }

    /// The allocation could not be made durable: forget it and release it on the agent.
    fn abort_allocation(&mut self, instance_id: &str, allocation_id: &str) {
        if self
            .allocations
            .get(instance_id)
            .is_some_and(|a| a.id == allocation_id)
        {
            self.release_allocation(instance_id, "not durable");
            if let Some(target) = self
                .instances
                .get(instance_id)
                .and_then(|i| self.hosts.get(&i.host_id))
                .map(Host::target)
            {
                let _ = self.actions.send(Action::Deallocate {
                    target,
                    instance_id: instance_id.to_owned(),
                    allocation_id: allocation_id.to_owned(),
                });
            }
        }
    }

    fn begin_release(&mut self, id: &str, want: Option<String>) -> Result<Release, Failure> {
        let inst = self
            .instances
            .get(id)
            .ok_or_else(|| not_found(&format!("instance {id} does not exist")))?;
        if inst.claimed {
            // A claim is only ever made on an instance with no allocation: any other named
            // allocation has ended (its game ended the match, say), and waiting would not make
            // it current again.
            if let Some(w) = &want
                && !self
                    .claims
                    .values()
                    .any(|c| c.instance_id == id && c.allocation_id == *w)
            {
                return Err(invalid(format!(
                    "allocationId {w} is not the current allocation of instance {id} (it has ended, and the instance is being allocated to another request right now); nothing was released"
                )));
            }
            return Err(Failure::new(
                ErrorCode::InstanceAllocating,
                "Unable to deallocate application instance.",
                format!("instance {id} is being allocated right now; retry in a moment"),
            ));
        }
        let target = self
            .hosts
            .get(&inst.host_id)
            .map(Host::target)
            .ok_or_else(|| host_not_registered(inst.host_id, id))?;
        match self.allocations.get(id) {
            Some(a) => {
                if let Some(w) = &want
                    && *w != a.id
                {
                    return Err(invalid(format!(
                        "allocationId {w} is not the current allocation of instance {id} ({}); nothing was released",
                        a.id
                    )));
                }
                Ok(Release::Call {
                    target,
                    allocation_id: Some(a.id.clone()),
                })
            }
            // The game allocated itself, or an allocation the controller lost: release it
            // on the agent too.
            None if inst.report.status == InstanceStatus::Allocated => Ok(Release::Call {
                target,
                allocation_id: inst.report.allocation_id().map(str::to_owned),
            }),
            None => Ok(Release::NotAllocated(Box::new(self.object(inst)))),
        }
    }

    fn finish_release(
        &mut self,
        id: &str,
        allocation_id: Option<String>,
        result: Result<InstanceView, AgentFailure>,
    ) -> Option<InstanceObject> {
        let host_id = self.instances.get(id).map(|i| i.host_id)?;
        // Released first, so the agent's answer below is not mistaken for the game ending
        // its match.
        if let (Some(want), Some(a)) = (&allocation_id, self.allocations.get(id))
            && *want == a.id
        {
            self.release_allocation(id, "deallocated");
        }
        match result {
            Ok(view) => self.apply_view(host_id, view),
            Err(f) => {
                // The controller releases anyway; the agent is told again when it next
                // reports the allocation (see `apply_view`).
                tracing::warn!(instance_id = id, error = %f.details, "agent did not confirm the release");
                if f.code == ErrorCode::AgentUnreachable {
                    self.not_answering(host_id, &f.details);
                }
            }
        }
        self.object_of(id)
    }

    fn begin_op(&self, id: &str, op: InstanceOp) -> Result<Arc<AgentTarget>, Failure> {
        let inst = self
            .instances
            .get(id)
            .ok_or_else(|| not_found(&format!("instance {id} does not exist")))?;
        let host = self
            .hosts
            .get(&inst.host_id)
            .ok_or_else(|| host_not_registered(inst.host_id, id))?;
        if !host.reachable {
            return Err(Failure::new(
                ErrorCode::AgentUnreachable,
                "Unable to act on application instance.",
                format!(
                    "host {} ({}) of instance {id} is unreachable; {op:?} cannot be delivered",
                    host.rec.id, host.rec.name
                ),
            ));
        }
        Ok(host.target())
    }

    // ----- agents ----------------------------------------------------------------------------

    fn region_for(&mut self, name: &str) -> u32 {
        if let Some(r) = self.regions.values().find(|r| r.name == name) {
            return r.id;
        }
        let id = self.regions.keys().max().copied().unwrap_or(0) + 1;
        tracing::warn!(
            region = name,
            id,
            "an agent reported an unknown region; created it (add it to [[regions]] with its ping_ip)"
        );
        let r = Region {
            id,
            name: name.to_owned(),
            ping_ip: None,
        };
        self.writer.submit(Write::Region(r.clone()));
        self.regions.insert(id, r);
        id
    }

    fn dc_for(&mut self, region_id: u32, name: &str) -> u32 {
        if let Some(d) = self
            .dc_locations
            .values()
            .find(|d| d.region_id == region_id && d.name == name)
        {
            return d.id;
        }
        let id = self.dc_locations.keys().max().copied().unwrap_or(0) + 1;
        let d = DcLocation {
            id,
            name: name.to_owned(),
            region_id,
        };
        self.writer.submit(Write::DcLocation(d.clone()));
        self.dc_locations.insert(id, d);
        id
    }

    fn register(&mut self, req: RegisterRequest) -> Result<(RegisterResponse, Commit), Failure> {
        // A host is its name, so a second agent under a live host's name (a cloned machine
        // image, a copied agent.toml) would take the host over: the first agent's instances
        // would leave the inventory, matches in progress with them, and the two would take it
        // from each other at every registration. The agent's own token, kept in its state
        // across restarts, tells a restart from another agent; another agent gets the name
        // once the host it belonged to has gone silent (a reinstalled machine, say).
        //
        // An agent at the host's own address is not another agent: registration first called
        // it there (`check_advertised`) and it answered with this token, so the agent that
        // registered the host before is no longer there (its state was lost or reinstalled,
        // and it restarted). It takes the host over at once, with the games it adopted.
        let existing = self.hosts.values().find(|h| h.rec.name == req.host_name);
        // An agent renamed onto the name of another host would take that host over and leave
        // its own behind: its games reported under a host they are not attributed to (and so
        // ignored), the other host's removed, and a second set deployed beside its games.
        // Names are unique, so it must wait for the name to be free.
        if let Some(h) = existing
            && h.rec.agent_token != req.agent_token
            && let Some(own) = self
                .hosts
                .values()
                .find(|o| o.rec.agent_token == req.agent_token)
        {
            return Err(invalid(format!(
                "this agent is host {} ({:?}), and hostName {:?} is host {}, another machine's ({}, heard from {} ms ago); two hosts cannot share a name. Give this agent back its name in agent.toml, or, if host {} is gone for good, delete it (berthctl hosts delete {}) and this agent is accepted as host {} under the new name",
                own.rec.id,
                own.rec.name,
                req.host_name,
                h.rec.id,
                h.rec.advertise_url,
                h.last_heartbeat.elapsed().as_millis(),
                h.rec.id,
                h.rec.id,
                own.rec.id,
            )));
        }
        let same_address = existing
            .is_some_and(|h| h.rec.advertise_url == req.advertise_url.trim_end_matches('/'));
        if let Some(h) = existing
            && h.reachable
            && h.rec.agent_token != req.agent_token
            && !same_address
        {
            return Err(invalid(format!(
                "hostName {:?} is host {} of another agent, which is alive (reached at {}, heard from {} ms ago); give this agent its own host_name in agent.toml, or stop the other one: this one is accepted once the other has been silent for {} ms",
                req.host_name,
                h.rec.id,
                h.rec.advertise_url,
                h.last_heartbeat.elapsed().as_millis(),
                self.config.expiry().as_millis(),
            )));
        }
        // The agent's token also tells a renamed agent (a new host_name in agent.toml, the
        // machine's hostname changed) from a new machine: it keeps its host, and with it its
        // instances and the matches they run, rather than leaving them to a host that never
        // comes back while its new host deploys a second set beside them. While the old
        // registration is alive, the same token under another name is more likely a copy of
        // that agent's state_dir on another machine, which must not take the host from it.
        let renamed = match existing {
            Some(_) => None,
            None => self
                .hosts
                .values()
                .find(|h| h.rec.agent_token == req.agent_token),
        };
        if let Some(h) = renamed {
            if h.reachable {
                return Err(invalid(format!(
                    "this agent was registered as host {} ({:?}), which is alive (heard from {} ms ago); now it says hostName {:?}. If the agent was renamed, it is accepted as host {} under its new name once the old registration has been silent for {} ms. If this machine's state_dir was copied from {:?}'s, give this agent an empty state_dir",
                    h.rec.id,
                    h.rec.name,
                    h.last_heartbeat.elapsed().as_millis(),
                    req.host_name,
                    h.rec.id,
                    self.config.expiry().as_millis(),
                    h.rec.name,
                )));
            }
            tracing::warn!(host_id = h.rec.id, old_name = %h.rec.name, host_name = %req.host_name, "host renamed by its agent");
        }
        if let Some(h) = existing
            && h.rec.agent_token != req.agent_token
        {
            tracing::warn!(host_id = h.rec.id, host_name = %h.rec.name, same_address, "host taken over by an agent with a new token (its state_dir was lost or replaced, or the machine was reinstalled)");
        }
        let existing = existing
            .or(renamed)
            .map(|h| (h.rec.id, h.rec.draining, h.rec.registered_at));
        let region_id = self.region_for(&req.region);
        let dc_location_id = self.dc_for(region_id, &req.dc_location);
        let (id, draining, registered_at) = existing.unwrap_or_else(|| {
            (
                // Never a deleted host's id: its removed instances and logs still name it.
                self.hosts
                    .keys()
                    .chain(self.deleted_hosts.keys())
                    .max()
                    .copied()
                    .unwrap_or(0)
                    + 1,
                false,
                unix_now(),
            )
        });
        let token = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let token_digest = digest(&token);
        let rec = HostRecord {
            id,
            name: req.host_name.clone(),
            region_id,
            dc_location_id,
            is_virtual: req.is_virtual,
            labels: req.labels.clone(),
            advertise_url: req.advertise_url.trim_end_matches('/').to_owned(),
            addresses: req.addresses.clone(),
            capacity: req.capacity.clone(),
            agent_version: req.agent_version.clone(),
            agent_token: req.agent_token.clone(),
            host_token_digest: hex(&token_digest),
            draining,
            registered_at,
        };
        let commit = self
            .writer
            .submit_durable(Write::Host(Box::new(rec.clone())));
        let target = host_target(&self.agents, &rec);
        // The host's rank includes its VM flag, which a re-registration may change.
        let old_rank = self.rank(id);
        self.hosts.insert(
            id,
            Host {
                target,
                rec,
                token_digest,
                last_heartbeat: Instant::now(),
                excused_at: self.excused,
                reachable: true,
                synced: true,
                deploy_backoff_until: None,
                not_answering: None,
                cannot_record_until: None,
            },
        );
        self.rerank(id, old_rank);
        // Reconcile the full report: what the agent no longer has is gone; what it has that
        // we did not know is adopted.
        let reported: HashSet<&str> = req.instances.iter().map(|v| v.id.as_str()).collect();
        let gone: Vec<String> = self
            .instances
            .values()
            .filter(|i| i.host_id == id && !reported.contains(&*i.id))
            .filter(|i| !self.pending_deploys.contains_key(&*i.id))
            .map(|i| i.id.to_string())
            .collect();
        for g in gone {
            self.remove_instance(&g, "not reported by its agent");
        }
        for view in req.instances {
            self.apply_view(id, view);
        }
        self.confirm_loaded_allocations(id);
        tracing::info!(host_id = id, host_name = %req.host_name, region = %req.region, is_virtual = req.is_virtual, "host registered");
        Ok((
            RegisterResponse {
                host_id: id,
                host_token: token,
                heartbeat_period_ms: self.config.heartbeat_period.as_millis() as u64,
                heartbeat_expiry_factor: self.config.heartbeat_expiry_factor,
            },
            commit,
        ))
    }

    /// Allocations loaded at start stand until their agent's full report: each row was written
    /// while the agent was asked, so one the agent does not hold was never answered (the
    /// controller stopped first) and is dropped; one it holds is the allocation made.
    fn confirm_loaded_allocations(&mut self, host_id: u64) {
        let loaded: Vec<(String, bool)> = self
            .unconfirmed
            .iter()
            .filter_map(|id| {
                let a = self.allocations.get(id).filter(|a| a.host_id == host_id)?;
                let held = self.instances.get(id.as_str()).is_some_and(|i| {
                    matches!(
                        i.report.status,
                        InstanceStatus::Allocated | InstanceStatus::Allocating
                    ) && i.report.allocation_id() == Some(a.id.as_str())
                });
                Some((id.clone(), held))
            })
            .collect();
        for (instance_id, held) in loaded {
            if held {
                self.unconfirmed.remove(&instance_id);
                tracing::info!(instance_id = %instance_id, host_id, "allocation confirmed by its agent after the restart");
            } else {
                self.release_allocation(
                    &instance_id,
                    "its agent does not hold it: the controller stopped after writing it and before the agent answered, so it was never acknowledged",
                );
                self.check_dangling(&instance_id);
            }
        }
    }

    fn authenticate_host(&mut self, token: [u8; 32], host_id: u64) -> Result<&mut Host, Failure> {
        let host = self
            .hosts
            .get_mut(&host_id)
            .filter(|h| berth_http::constant_time_eq(&h.token_digest, &token));
        host.ok_or_else(|| {
            Failure::new(
                ErrorCode::InvalidCredentials,
                "Invalid credentials.",
                format!(
                    "the token is not the current host token of host {host_id}; register again"
                ),
            )
        })
    }

    fn heartbeat(
        &mut self,
        token: [u8; 32],
        req: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, Failure> {
        self.metrics.heartbeats.inc();
        let excused = self.excused;
        let host = self.authenticate_host(token, req.host_id)?;
        host.heard(excused);
        if !host.reachable {
            host.reachable = true;
            tracing::info!(
                host_id = req.host_id,
                "host reachable again; asking for a full report"
            );
        }
        Ok(HeartbeatResponse {
            reregister: !host.synced,
            cannot_call: host.not_answering.as_ref().map(|n| {
                format!(
                    "{} (for {} s); this host's games are not allocated until the controller reaches the agent at {} again",
                    n.error,
                    n.started.elapsed().as_secs(),
                    host.rec.advertise_url
                )
            }),
        })
    }

    fn events(&mut self, token: [u8; 32], req: EventsRequest) -> Result<EventsResponse, Failure> {
        let excused = self.excused;
        let host = self.authenticate_host(token, req.host_id)?;
        host.heard(excused);
        let synced = host.synced;
        if !synced {
            // A partial report cannot be trusted to be complete; ask for the full one.
            return Ok(EventsResponse { reregister: true });
        }
        for view in req.instances {
            self.apply_view(req.host_id, view);
        }
        for r in req.removed {
            let ours = self
                .instances
                .get(r.id.as_str())
                .is_some_and(|i| i.host_id == req.host_id && i.report.version <= r.version);
            if ours {
                self.remove_instance(&r.id, "removed by its agent");
            }
        }
        Ok(EventsResponse { reregister: false })
    }

    /// An agent's answer to a call about a known instance (remove, deallocate, stop, …). It
    /// may update the instance but never adopt it: the agent's own report that it removed the
    /// instance can arrive before this answer, and must not be undone by it (the instance would
    /// come back as a ghost that no agent runs).
    fn apply_answer(&mut self, host_id: u64, view: InstanceView) {
        if self.instances.contains_key(view.id.as_str()) {
            self.apply_view(host_id, view);
        }
    }

    /// Takes an agent's report of one instance into account.
    fn apply_view(&mut self, host_id: u64, view: InstanceView) {
        let id = view.id.clone();
        let Some(inst) = self.instances.get_mut(id.as_str()) else {
            if !self.hosts.contains_key(&host_id) {
                // An answer from a host deleted while the call was out (its instances went
                // with it): its agent reports the instance again when it registers as a new
                // host.
                return;
            }
            self.pending_deploys.remove(&id);
            // The agent's word, even for a fleet unknown here: the reconciler leaves such an
            // instance alone, and it is the fleet's own once the fleet is created.
            let fleet_id = view.fleet_id;
            let rec = InstanceRecord {
                id: id.clone(),
                host_id,
                application_id: view.application_id,
                fleet_id,
                view,
                created_at: unix_now(),
                removed_at: None,
            };
            tracing::info!(instance_id = %id, host_id, "instance reported by its agent");
            self.writer.submit(Write::Instance(Box::new(rec.clone())));
            self.insert_instance(rec);
            self.check_dangling(&id);
            return;
        };
        if inst.host_id != host_id {
            tracing::warn!(instance_id = %id, host_id, owner = inst.host_id, "a host reported another host's instance; ignored");
            return;
        }
        if view.version <= inst.report.version {
            return;
        }
        // Live state is not persisted: agents report it in full when they (re-)register.
        inst.report = Report::from_view(view, &mut self.strings);
        let claimed = inst.claimed;
        self.refused.remove(&id);
        self.reindex(&id);
        // While claimed, `settle` weighs this report against the allocation once the agent
        // answers.
        if !claimed {
            self.reconcile_allocation(&id);
        }
    }

    /// Weighs the agent's latest report of an instance against the controller's allocation of
    /// it: a report newer than the allocation that no longer holds it ends the allocation; with
    /// no allocation, one the agent holds is released on the agent (`check_dangling`).
    fn reconcile_allocation(&mut self, id: &str) {
        let Some(inst) = self.instances.get(id) else {
            return;
        };
        let (status, version) = (inst.report.status, inst.report.version);
        if let Some(a) = self.allocations.get(id) {
            // The agent holding another allocation id means it released ours: a release
            // answered just before a controller crash, and so not yet on disk, brings the
            // allocation back at restart while the agent has long moved on.
            let other = inst.report.allocation_id().is_some_and(|held| held != a.id);
            let still_ours = matches!(
                status,
                InstanceStatus::Allocated | InstanceStatus::Allocating
            ) && !other;
            if !still_ours && version > a.agent_version {
                let why = match status {
                    // Either the game reported 4, or a release answered just before a
                    // controller crash came back at restart: the agent is right either way.
                    InstanceStatus::Online => {
                        "its agent reports it free (the game ended its match, or a release was not yet on disk when the controller stopped)"
                    }
                    _ if other => "its agent holds another allocation",
                    _ => "the game exited",
                };
                self.release_allocation(id, why);
                self.check_dangling(id);
            }
        } else {
            self.check_dangling(id);
        }
    }

    /// An agent holds an allocation id the controller has no record of: it was never
    /// acknowledged (lost in a controller crash), so release it.
    fn check_dangling(&mut self, id: &str) {
        let Some(inst) = self.instances.get(id) else {
            return;
        };
        if inst.claimed || self.allocations.contains_key(id) {
            return;
        }
        if inst.report.status != InstanceStatus::Allocated {
            return;
        }
        let Some(allocation_id) = inst.report.allocation_id().map(str::to_owned) else {
            return;
        };
        let Some(target) = self.hosts.get(&inst.host_id).map(Host::target) else {
            return;
        };
        tracing::warn!(instance_id = id, %allocation_id, "agent holds an allocation the controller never acknowledged; releasing it");
        let _ = self.actions.send(Action::Deallocate {
            target,
            instance_id: id.to_owned(),
            allocation_id,
        });
    }

    fn tick(&mut self) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .refused
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.refused.remove(&id);
            self.reindex(&id);
        }
        // Ticks come every 100 ms. One later than a heartbeat period means the controller did
        // not run meanwhile: agents' heartbeats waited in its sockets, unheard, and holding
        // that against them would take every host out of the pool (and have each register
        // again) after any pause of the controller's own.
        let gap = now.saturating_duration_since(self.last_tick);
        self.last_tick = now;
        let period = self.config.heartbeat_period;
        if gap > period {
            self.excused += gap - period;
            self.metrics.stalls.inc();
            tracing::warn!(
                stalled_ms = gap.as_millis() as u64,
                "the controller did not run for a while (stopped, its machine paused, or starved of CPU); that time is not counted as any host's silence"
            );
        }
        let expiry = self.config.expiry();
        let excused = self.excused;
        for h in self.hosts.values_mut() {
            // Only while heartbeats come: a silent host is already out, and its registration
            // (which calls the agent first) brings it back.
            if let Some(n) = &mut h.not_answering
                && h.reachable
                && !n.probing
                && n.next_probe <= now
            {
                n.probing = true;
                let _ = self.actions.send(Action::Probe {
                    target: h.target.clone(),
                });
            }
            let silent = h.silent_for(excused);
            if h.reachable && silent > expiry {
                h.reachable = false;
                h.synced = false;
                self.metrics.hosts_lost.inc();
                tracing::warn!(
                    host_id = h.rec.id,
                    host_name = %h.rec.name,
                    silent_ms = silent.as_millis() as u64,
                    "host unreachable: its idle instances leave the pool, its matches stay allocated"
                );
            }
        }
    }

    // ----- listings ------------------------------------------------------------------------

    fn list_instances(&self, q: &ListQuery) -> Result<Vec<InstanceObject>, Failure> {
        let resolved = self.resolve(&q.filter).map_err(|mut f| {
            // A listing is not an allocation: a filter naming nothing is simply a 404.
            f.message = "Invalid filter.".to_owned();
            f
        })?;
        let now = Instant::now();
        let mut out: Vec<InstanceObject> = self
            .instances
            .values()
            .filter(|i| q.application_id.is_none_or(|a| i.application_id == a))
            .filter(|i| q.status.is_none_or(|s| self.shown_status(i) == s))
            .filter(|i| {
                let f = self.facts(i, now);
                resolved.conds.iter().all(|(c, _)| c.matches(&f))
            })
            .map(|i| self.object(i))
            .collect();
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Why host `id` is not here: deleted (when), or never registered.
    fn host_missing(&self, id: u64) -> Failure {
        match self.deleted_hosts.get(&id) {
            Some(d) => not_found(&format!(
                "host {id} ({}) was deleted at {}; an agent that comes back on that machine registers as a new host",
                d.name,
                rfc3339(d.deleted_at)
            )),
            None => not_found(&format!("host {id} does not exist")),
        }
    }

    fn drain(&mut self, id: u64, on: bool) -> Result<(HostObject, Commit), Failure> {
        let Some(host) = self.hosts.get_mut(&id) else {
            return Err(self.host_missing(id));
        };
        host.rec.draining = on;
        let commit = self
            .writer
            .submit_durable(Write::Host(Box::new(host.rec.clone())));
        tracing::info!(host_id = id, draining = on, "host drain changed");
        let obj = self.host_object(&self.hosts[&id], &self.tally(Some(id)));
        Ok((obj, commit))
    }

    /// Takes a host out of service: a machine decommissioned, reinstalled under another name,
    /// or lost for good, which would otherwise stay listed as unreachable with its instances.
    /// Its agent must be silent: a live one would register it again at once, and its games
    /// would run unmanaged meanwhile. Allocations are released only when asked: a host that is
    /// only cut off may still be running those matches.
    fn delete_host(
        &mut self,
        id: u64,
        release_allocations: bool,
    ) -> Result<(HostObject, Commit), Failure> {
        let Some(host) = self.hosts.get(&id) else {
            return Err(self.host_missing(id));
        };
        let name = host.rec.name.clone();
        if host.reachable {
            return Err(invalid(format!(
                "host {id} ({name}) is reachable: its agent was heard from {} ms ago and would register it again at once. Stop the agent on that machine first (systemctl stop berth-agent); the host can be deleted once it has been silent for {} ms and shows as unreachable. To only keep new work away from it, drain it",
                host.last_heartbeat.elapsed().as_millis(),
                self.config.expiry().as_millis()
            )));
        }
        let mut on_host: Vec<Arc<str>> = self
            .instances
            .values()
            .filter(|i| i.host_id == id)
            .map(|i| i.id.clone())
            .collect();
        on_host.sort();
        if let Some(i) = on_host.iter().find(|i| self.instances[&**i].claimed) {
            return Err(Failure::new(
                ErrorCode::InstanceAllocating,
                "Unable to delete host.",
                format!(
                    "instance {i} of host {id} ({name}) is being allocated right now; retry in a moment"
                ),
            ));
        }
        let held: Vec<String> = on_host
            .iter()
            .filter_map(|i| {
                let a = self.allocations.get(&**i)?;
                Some(format!("instance {i} (allocation {})", a.id))
            })
            .collect();
        if !held.is_empty() && !release_allocations {
            const SHOWN: usize = 5;
            let more = match held.len().saturating_sub(SHOWN) {
                0 => String::new(),
                n => format!(" and {n} more"),
            };
            return Err(invalid(format!(
                "host {id} ({name}) holds {} allocation{}: {}{more}. If the host is only cut off, those matches may still be in progress. Release them first (berthctl deallocate INSTANCE), or delete with releaseAllocations=true (berthctl hosts delete {id} --release-allocations) to release them with the host",
                held.len(),
                if held.len() == 1 { "" } else { "s" },
                held[..held.len().min(SHOWN)].join(", ")
            )));
        }
        let obj = self.host_object(&self.hosts[&id], &self.tally(Some(id)));
        for i in &on_host {
            self.remove_instance(i, "its host was deleted");
        }
        self.pending_deploys
            .retain(|_, (host_id, _)| *host_id != id);
        self.host_allocations.remove(&id);
        self.hosts.remove(&id);
        let gone = DeletedHost {
            id,
            name,
            deleted_at: unix_now(),
        };
        let commit = self.writer.submit_durable(Write::DeleteHost(gone.clone()));
        tracing::warn!(
            host_id = id,
            host_name = %gone.name,
            instances = on_host.len(),
            released = held.len(),
            "host deleted"
        );
        self.deleted_hosts.insert(id, gone);
        while self.deleted_hosts.len() > crate::store::DELETED_HOSTS_KEPT {
            self.deleted_hosts.pop_first();
        }
        Ok((obj, commit))
    }

    // ----- error stories ---------------------------------------------------------------------

    fn record_failure(&mut self, r: berth_http::FailureRecord) {
        let mut story = r.story.unwrap_or_default();
        let attempts: Vec<AttemptStory> = story
            .get_mut("attempts")
            .and_then(|a| serde_json::from_value(a.take()).ok())
            .unwrap_or_default();
        let body = r.body;
        let s = ErrorStory {
            identifier: body.identifier,
            timestamp: body.timestamp,
            method: r.method,
            path: body.path,
            status_code: body.status_code,
            code: body.code.as_str().to_owned(),
            error_code: body.error_code,
            message: body.message,
            details: body.details,
            decision: story.get_mut("decision").map(serde_json::Value::take),
            attempts,
        };
        self.writer.submit(Write::ErrorStory(Box::new(s.clone())));
        let identifier = s.identifier.clone();
        if self.story_map.insert(identifier.clone(), s).is_none() {
            self.stories.push_back(identifier);
        }
        while self.stories.len() > self.config.error_retention {
            if let Some(old) = self.stories.pop_front() {
                self.story_map.remove(&old);
            }
        }
        self.stories_since_prune += 1;
        if self.stories_since_prune >= 1000 {
            self.stories_since_prune = 0;
            self.writer.submit(Write::PruneErrorStories {
                keep: self.config.error_retention,
            });
        }
    }

    // ----- reconciler ------------------------------------------------------------------------

    fn fleet_wants(&self, fleet: &Fleet, host: &Host) -> bool {
        let region = self
            .regions
            .get(&host.rec.region_id)
            .map(|r| r.name.as_str())
            .unwrap_or("");
        (fleet.regions.is_empty() || fleet.regions.iter().any(|r| r == region))
            && fleet
                .host_labels
                .iter()
                .all(|(k, v)| host.rec.labels.get(k) == Some(v))
    }

    /// What the actuator should do now so that every fleet has its instances on every
    /// matching host. Marks what it plans, so the next plan does not repeat it.
    fn plan(&mut self) -> Vec<Action> {
        let now = Instant::now();
        let mut actions = Vec::new();
        let mut count: HashMap<(u64, u64), u32> = HashMap::new();
        let mut idle: HashMap<(u64, u64), Vec<Arc<str>>> = HashMap::new();
        let mut removals = Vec::new();
        let mut unknown: BTreeMap<u64, usize> = BTreeMap::new();
        for inst in self.instances.values() {
            let Some(fleet_id) = inst.fleet_id else {
                continue;
            };
            if inst.removing {
                continue;
            }
            if !self.fleets.contains_key(&fleet_id) && !self.deleted_fleets.contains(&fleet_id) {
                // Not deleted here, so not this database's to remove: one restored from an
                // old backup, or the wrong file, must not take the hosts' games away.
                *unknown.entry(fleet_id).or_default() += 1;
                continue;
            }
            let host_id = inst.host_id;
            let dead = inst.report.status == InstanceStatus::Offline
                && !inst.report.auto_restart
                && matches!(inst.report.state, RuntimeState::Exited | RuntimeState::Dead);
            let held = inst.claimed
                || self.allocations.contains_key(&*inst.id)
                || inst.report.status == InstanceStatus::Allocated;
            let wanted = self.fleets.get(&fleet_id).is_some_and(|f| {
                self.hosts
                    .get(&host_id)
                    .is_some_and(|h| self.fleet_wants(f, h))
            });
            if dead && !held {
                removals.push((host_id, inst.id.clone()));
                continue;
            }
            if !wanted {
                if !held {
                    removals.push((host_id, inst.id.clone()));
                }
                continue;
            }
            *count.entry((fleet_id, host_id)).or_insert(0) += 1;
            if !held {
                idle.entry((fleet_id, host_id))
                    .or_default()
                    .push(inst.id.clone());
            }
        }
        for (host_id, fleet_id) in self.pending_deploys.values() {
            *count.entry((*fleet_id, *host_id)).or_insert(0) += 1;
        }
        let mut deploys = Vec::new();
        for fleet in self.fleets.values() {
            let (Some(profile), Some(app)) = (
                self.profiles.get(&fleet.profile_id),
                self.applications.get(&fleet.application_id),
            ) else {
                continue;
            };
            for host in self.hosts.values() {
                // A host whose agent does not answer would fail every call; its probe
                // brings it back.
                if !host.reachable
                    || !host.synced
                    || host.not_answering.is_some()
                    || !self.fleet_wants(fleet, host)
                {
                    continue;
                }
                let have = count.get(&(fleet.id, host.rec.id)).copied().unwrap_or(0);
                let want = fleet.instances_per_host;
                if have < want
                    && !host.rec.draining
                    && host.deploy_backoff_until.is_none_or(|t| t <= now)
                {
                    for _ in 0..(want - have).min(DEPLOY_BURST) {
                        let id = uuid::Uuid::new_v4().to_string();
                        deploys.push((host.rec.id, fleet.id, id.clone()));
                        actions.push(Action::Deploy {
                            target: host.target(),
                            request: Box::new(DeployRequest {
                                id: Some(id),
                                fleet_id: Some(fleet.id),
                                management_protocol: app.management_protocol,
                                confirm_allocation: app.confirm_allocation,
                                profile: profile.clone(),
                            }),
                        });
                    }
                } else if have > want
                    && let Some(list) = idle.get(&(fleet.id, host.rec.id))
                {
                    // Remove the least useful first: not online before online.
                    let mut list: Vec<&Arc<str>> = list.iter().collect();
                    list.sort_by_key(|id| {
                        self.instances
                            .get(&***id)
                            .map(|i| i.report.status == InstanceStatus::Online)
                    });
                    for id in list.into_iter().take((have - want) as usize) {
                        removals.push((host.rec.id, id.clone()));
                    }
                }
            }
        }
        for (fleet_id, n) in unknown {
            if self.unknown_fleets.insert(fleet_id) {
                tracing::warn!(
                    fleet_id,
                    instances = n,
                    "instances of fleet {fleet_id}, which this controller's database has never had, are left running and are not removed (a new, wrong or restored database?); create the fleet to manage them, or create and delete it to remove them"
                );
            }
        }
        for (host_id, fleet_id, id) in deploys {
            self.pending_deploys.insert(id, (host_id, fleet_id));
        }
        for (host_id, id) in removals {
            let Some(host) = self.hosts.get(&host_id).filter(|h| h.reachable) else {
                continue;
            };
            let target = host.target();
            if let Some(inst) = self.instances.get_mut(&*id) {
                inst.removing = true;
            }
            self.reindex(&id);
            actions.push(Action::Remove {
                target,
                instance_id: id.to_string(),
            });
        }
        actions
    }

    fn action_done(&mut self, r: ActionResult) {
        match r {
            ActionResult::Deployed {
                host_id,
                instance_id,
                result,
            } => {
                self.pending_deploys.remove(&instance_id);
                match result {
                    Ok(view) => {
                        self.metrics.reconcile_deploys.inc();
                        self.apply_view(host_id, view);
                    }
                    Err(f) => {
                        tracing::warn!(host_id, code = %f.code, details = %f.details, "deploy failed; host skipped for 5 s");
                        if let Some(h) = self.hosts.get_mut(&host_id) {
                            h.deploy_backoff_until = Some(Instant::now() + DEPLOY_BACKOFF);
                        }
                        if f.code == ErrorCode::AgentUnreachable {
                            self.not_answering(host_id, &f.details);
                        }
                    }
                }
            }
            ActionResult::Removed {
                host_id,
                instance_id,
                result,
            } => match result {
                Ok(view) => {
                    self.metrics.reconcile_removals.inc();
                    self.apply_answer(host_id, view);
                }
                Err(f) if f.code == ErrorCode::InstanceNotOnHost => {
                    self.remove_instance(&instance_id, "already gone from its agent");
                }
                Err(f) => {
                    tracing::warn!(instance_id = %instance_id, details = %f.details, "remove failed; will retry");
                    if let Some(i) = self.instances.get_mut(instance_id.as_str()) {
                        i.removing = false;
                    }
                    self.reindex(&instance_id);
                    if f.code == ErrorCode::AgentUnreachable {
                        self.not_answering(host_id, &f.details);
                    }
                }
            },
            ActionResult::Deallocated { host_id, result } => match result {
                Ok(view) => self.apply_answer(host_id, view),
                Err(f) if f.code == ErrorCode::AgentUnreachable => {
                    self.not_answering(host_id, &f.details);
                }
                Err(_) => {}
            },
            ActionResult::Probed { host_id, result } => self.probed(host_id, result),
        }
    }

    /// A call to the host's agent got no answer: the host is set aside (allocations and
    /// deploys skip it) until a probe gets one. Calls already under way may fail too; they
    /// only refresh the reason.
    fn not_answering(&mut self, host_id: u64, error: &str) {
        let Some(h) = self.hosts.get_mut(&host_id) else {
            return;
        };
        if let Some(n) = &mut h.not_answering {
            if !n.probing {
                n.error = error.to_owned();
            }
            return;
        }
        tracing::warn!(host_id, host_name = %h.rec.name, error, "the controller cannot call this host's agent; its instances are not allocated until a probe gets an answer");
        let now = Instant::now();
        h.not_answering = Some(Box::new(NotAnswering {
            started: now,
            error: error.to_owned(),
            next_probe: now + PROBE_FIRST,
            backoff: PROBE_FIRST,
            probing: false,
        }));
    }

    fn probed(&mut self, host_id: u64, result: Result<(), String>) {
        let Some(h) = self.hosts.get_mut(&host_id) else {
            return;
        };
        let Some(n) = &mut h.not_answering else {
            return;
        };
        match result {
            Ok(()) => {
                tracing::info!(host_id, host_name = %h.rec.name, not_answering_ms = n.started.elapsed().as_millis() as u64, "the host's agent answers the controller again; its instances are offered again");
                h.not_answering = None;
            }
            Err(error) => {
                n.backoff = (n.backoff * 2).min(PROBE_MAX);
                n.next_probe = Instant::now() + n.backoff;
                n.probing = false;
                n.error = error;
            }
        }
    }

    // ----- resources -------------------------------------------------------------------------

    fn crud(&mut self, op: Crud) -> Result<(serde_json::Value, Option<Commit>), Failure> {
        match op {
            Crud::ListApplications => {
                Ok((json(&self.applications.values().collect::<Vec<_>>()), None))
            }
            Crud::GetApplication(id) => self
                .applications
                .get(&id)
                .map(|a| (json(a), None))
                .ok_or_else(|| not_found(&format!("application {id} does not exist"))),
            Crud::PutApplication(a, create) => {
                if a.id == 0 || a.name.trim().is_empty() {
                    return Err(invalid(format!(
                        "application id must be non-zero and name non-empty; got id {} and name {:?}",
                        a.id, a.name
                    )));
                }
                if create && self.applications.contains_key(&a.id) {
                    return Err(invalid(format!(
                        "application {} already exists; use PUT /v1/applications/{} to change it",
                        a.id, a.id
                    )));
                }
                let commit = self.writer.submit_durable(Write::Application(a.clone()));
                let v = json(&a);
                self.applications.insert(a.id, a);
                Ok((v, Some(commit)))
            }
            Crud::DeleteApplication(id) => {
                if !self.applications.contains_key(&id) {
                    return Err(not_found(&format!("application {id} does not exist")));
                }
                if let Some(f) = self.fleets.values().find(|f| f.application_id == id) {
                    return Err(invalid(format!(
                        "application {id} is used by fleet {}; delete the fleet first",
                        f.id
                    )));
                }
                let a = self.applications.remove(&id);
                let commit = self.writer.submit_durable(Write::DeleteApplication(id));
                Ok((json(&a), Some(commit)))
            }
            Crud::ListBuilds => Ok((json(&self.builds.values().collect::<Vec<_>>()), None)),
            Crud::GetBuild(id) => self
                .builds
                .get(&id)
                .map(|b| (json(b), None))
                .ok_or_else(|| not_found(&format!("build {id} does not exist"))),
            Crud::PutBuild(b, create) => {
                if b.id.trim().is_empty() || b.version.trim().is_empty() {
                    return Err(invalid(format!(
                        "build id and version must not be empty; got id {:?} and version {:?}",
                        b.id, b.version
                    )));
                }
                if !self.applications.contains_key(&b.application_id) {
                    return Err(invalid(format!(
                        "build.applicationId {} names no application; create it first",
                        b.application_id
                    )));
                }
                if let Some(h) = &b.sha256
                    && (h.len() != 64 || !h.bytes().all(|c| c.is_ascii_hexdigit()))
                {
                    return Err(invalid(format!(
                        "build.sha256 {h:?} is not 64 hexadecimal characters"
                    )));
                }
                if create && self.builds.contains_key(&b.id) {
                    return Err(invalid(format!(
                        "build {} already exists; use PUT /v1/builds/{} to change it",
                        b.id, b.id
                    )));
                }
                if let Some(other) = self.builds.values().find(|o| {
                    o.id != b.id && o.application_id == b.application_id && o.version == b.version
                }) {
                    return Err(invalid(format!(
                        "application {} already has build {} with version {:?}",
                        b.application_id, other.id, b.version
                    )));
                }
                let commit = self.writer.submit_durable(Write::Build((*b).clone()));
                let v = json(&*b);
                self.builds.insert(b.id.clone(), *b);
                Ok((v, Some(commit)))
            }
            Crud::DeleteBuild(id) => {
                let b = self
                    .builds
                    .get(&id)
                    .ok_or_else(|| not_found(&format!("build {id} does not exist")))?;
                if let Some(p) = self
                    .profiles
                    .values()
                    .find(|p| p.application_id == b.application_id && p.build == b.version)
                {
                    return Err(invalid(format!(
                        "build {id} is launched by profile {}; change or delete the profile first",
                        p.id
                    )));
                }
                let b = self.builds.remove(&id);
                let commit = self.writer.submit_durable(Write::DeleteBuild(id));
                Ok((json(&b), Some(commit)))
            }
            Crud::ListProfiles => Ok((json(&self.profiles.values().collect::<Vec<_>>()), None)),
            Crud::GetProfile(id) => self
                .profiles
                .get(&id)
                .map(|p| (json(p), None))
                .ok_or_else(|| not_found(&format!("profile {id} does not exist"))),
            Crud::PutProfile(p, create) => {
                if p.id.trim().is_empty() || p.executable.trim().is_empty() {
                    return Err(invalid(format!(
                        "profile id and executable must not be empty; got id {:?} and executable {:?}",
                        p.id, p.executable
                    )));
                }
                if !self.applications.contains_key(&p.application_id) {
                    return Err(invalid(format!(
                        "profile.applicationId {} names no application; create it first",
                        p.application_id
                    )));
                }
                // Once an application registers builds, its profiles must name one of them.
                let versions: Vec<&str> = self
                    .builds
                    .values()
                    .filter(|b| b.application_id == p.application_id)
                    .map(|b| b.version.as_str())
                    .collect();
                if !versions.is_empty() && !versions.contains(&p.build.as_str()) {
                    return Err(invalid(format!(
                        "profile.build {:?} is not a build of application {}; its builds: {}",
                        p.build,
                        p.application_id,
                        versions.join(", ")
                    )));
                }
                if create && self.profiles.contains_key(&p.id) {
                    return Err(invalid(format!(
                        "profile {} already exists; use PUT /v1/profiles/{} to change it",
                        p.id, p.id
                    )));
                }
                let commit = self.writer.submit_durable(Write::Profile((*p).clone()));
                let v = json(&*p);
                self.profiles.insert(p.id.clone(), *p);
                Ok((v, Some(commit)))
            }
            Crud::DeleteProfile(id) => {
                if let Some(f) = self.fleets.values().find(|f| f.profile_id == id) {
                    return Err(invalid(format!(
                        "profile {id} is used by fleet {}; change or delete the fleet first",
                        f.id
                    )));
                }
                let p = self
                    .profiles
                    .remove(&id)
                    .ok_or_else(|| not_found(&format!("profile {id} does not exist")))?;
                let commit = self.writer.submit_durable(Write::DeleteProfile(id));
                Ok((json(&p), Some(commit)))
            }
            Crud::ListFleets => Ok((json(&self.fleets.values().collect::<Vec<_>>()), None)),
            Crud::GetFleet(id) => self
                .fleets
                .get(&id)
                .map(|f| (json(f), None))
                .ok_or_else(|| not_found(&format!("fleet {id} does not exist"))),
            Crud::PutFleet(mut f, create) => {
                if f.id == 0 || f.name.trim().is_empty() {
                    return Err(invalid(format!(
                        "fleet id must be non-zero and name non-empty; got id {} and name {:?}",
                        f.id, f.name
                    )));
                }
                if create && self.fleets.contains_key(&f.id) {
                    return Err(invalid(format!(
                        "fleet {} already exists; use PUT /v1/fleets/{} to change it",
                        f.id, f.id
                    )));
                }
                if self
                    .fleets
                    .values()
                    .any(|o| o.name == f.name && o.id != f.id)
                {
                    return Err(invalid(format!(
                        "another fleet is already named {:?}; fleet names are unique",
                        f.name
                    )));
                }
                if !self.applications.contains_key(&f.application_id) {
                    return Err(invalid(format!(
                        "fleet.applicationId {} names no application",
                        f.application_id
                    )));
                }
                let profile = self.profiles.get(&f.profile_id).ok_or_else(|| {
                    invalid(format!(
                        "fleet.profileId {:?} names no profile; create it first",
                        f.profile_id
                    ))
                })?;
                if profile.application_id != f.application_id {
                    return Err(invalid(format!(
                        "profile {:?} is for application {}, not {}",
                        f.profile_id, profile.application_id, f.application_id
                    )));
                }
                if f.instances_per_host > 1000 {
                    return Err(invalid(format!(
                        "fleet.instancesPerHost {} is over 1000",
                        f.instances_per_host
                    )));
                }
                for r in &f.regions {
                    if !self.regions.values().any(|x| &x.name == r) {
                        return Err(invalid(format!(
                            "fleet.regions: {r:?} names no region; known: {}",
                            self.regions
                                .values()
                                .map(|x| x.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )));
                    }
                }
                let env = match self
                    .environments
                    .values()
                    .find(|e| e.name == f.deployment_environment)
                {
                    Some(e) => e.id,
                    None => {
                        let id = self.environments.keys().max().copied().unwrap_or(0) + 1;
                        let e = DeploymentEnvironment {
                            id,
                            name: f.deployment_environment.clone(),
                        };
                        self.writer.submit(Write::Environment(e.clone()));
                        self.environments.insert(id, e);
                        id
                    }
                };
                f.deployment_environment_id = env;
                let commit = self.writer.submit_durable(Write::Fleet((*f).clone()));
                let v = json(&*f);
                self.deleted_fleets.remove(&f.id);
                self.unknown_fleets.remove(&f.id);
                self.fleets.insert(f.id, *f);
                Ok((v, Some(commit)))
            }
            Crud::DeleteFleet(id) => {
                let f = self
                    .fleets
                    .remove(&id)
                    .ok_or_else(|| not_found(&format!("fleet {id} does not exist")))?;
                let commit = self.writer.submit_durable(Write::DeleteFleet(id));
                self.deleted_fleets.insert(id);
                Ok((json(&f), Some(commit)))
            }
            Crud::ListRegions => Ok((json(&self.regions.values().collect::<Vec<_>>()), None)),
            Crud::GetRegion(id) => self
                .regions
                .get(&id)
                .map(|r| (json(r), None))
                .ok_or_else(|| not_found(&format!("region {id} does not exist"))),
            Crud::PutRegion(r) => {
                if r.id == 0 || r.name.trim().is_empty() {
                    return Err(invalid(format!(
                        "region id must be non-zero and name non-empty; got id {} and name {:?}",
                        r.id, r.name
                    )));
                }
                if let Some(o) = self
                    .regions
                    .values()
                    .find(|o| o.name == r.name && o.id != r.id)
                {
                    return Err(invalid(format!(
                        "region name {:?} is taken by region {}; choose another name, or PUT /v1/regions/{} to change that region",
                        r.name, o.id, o.id
                    )));
                }
                let commit = self.writer.submit_durable(Write::Region(r.clone()));
                let v = json(&r);
                self.regions.insert(r.id, r);
                Ok((v, Some(commit)))
            }
            Crud::DeleteRegion(id) => {
                if let Some(h) = self.hosts.values().find(|h| h.rec.region_id == id) {
                    return Err(invalid(format!(
                        "region {id} has hosts (host {} {:?} among them); it cannot be deleted while any host is registered in it",
                        h.rec.id, h.rec.name
                    )));
                }
                let r = self
                    .regions
                    .remove(&id)
                    .ok_or_else(|| not_found(&format!("region {id} does not exist")))?;
                let commit = self.writer.submit_durable(Write::DeleteRegion(id));
                Ok((json(&r), Some(commit)))
            }
            Crud::ListDcLocations => {
                Ok((json(&self.dc_locations.values().collect::<Vec<_>>()), None))
            }
            Crud::PutDcLocation(d) => {
                if !self.regions.contains_key(&d.region_id) {
                    return Err(invalid(format!(
                        "dcLocation.regionId {} names no region",
                        d.region_id
                    )));
                }
                let commit = self.writer.submit_durable(Write::DcLocation(d.clone()));
                let v = json(&d);
                self.dc_locations.insert(d.id, d);
                Ok((v, Some(commit)))
            }
            Crud::ListEnvironments => {
                Ok((json(&self.environments.values().collect::<Vec<_>>()), None))
            }
            Crud::PutEnvironment(e) => {
                if e.id == 0 || e.name.trim().is_empty() {
                    return Err(invalid(format!(
                        "environment id must be non-zero and name non-empty; got id {} and name {:?}",
                        e.id, e.name
                    )));
                }
                let commit = self.writer.submit_durable(Write::Environment(e.clone()));
                let v = json(&e);
                self.environments.insert(e.id, e);
                Ok((v, Some(commit)))
            }
        }
    }
}

fn json<T: serde::Serialize + ?Sized>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

fn i3d_object(o: &InstanceObject, inst: &Inst) -> I3dInstance {
    let v = &inst.report;
    I3dInstance {
        id: o.id.clone(),
        application_id: o.application_id,
        application_build_id: o.build.clone(),
        deployment_environment_id: o.deployment_environment_id.unwrap_or(0),
        fleet_id: o.fleet_id.unwrap_or(0),
        host_id: o.host_id,
        region_id: o.region_id,
        dc_location_id: o.dc_location_id,
        is_virtual: o.is_virtual,
        ip_address: vec![I3dIpAddress {
            ip_address: o.ip_address.clone(),
            ip_version: if o.ip_address.contains(':') { 6 } else { 4 },
            private: 0,
        }],
        port: o.port,
        management_port: o.management_port,
        status: o.status,
        num_players: o.num_players.unwrap_or(0),
        num_players_max: o.num_players_max.unwrap_or(0),
        live_host_name: o.live_host_name.clone().unwrap_or_default(),
        live_map: o.live_map.clone().unwrap_or_default(),
        live_rules: o.live_rules.clone().unwrap_or_default(),
        live_game_version: o.live_game_version.clone().unwrap_or_default(),
        metadata: o.metadata.clone(),
        label_read_only: Vec::new(),
        label_public: Vec::new(),
        pid: o.pid.unwrap_or(0),
        pid_changed_at: u64::from(v.pid_changed_at),
        started_at: u64::from(v.started_at),
        stopped_at: u64::from(v.stopped_at),
        created_at: inst.created_at,
        updated_at: u64::from(v.updated_at),
        auto_restart: u8::from(o.auto_restart),
        manually_deployed: u8::from(inst.fleet_id.is_none()),
        marked_for_deletion: 0,
    }
}
