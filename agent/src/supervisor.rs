//! The supervisor: one task that owns every instance on this host.
//!
//! API handlers, Arcus links, exit watchers and timers all talk to it through [`Command`]; it
//! applies each command to its state in order, so there is no lock and no two actors can
//! disagree about an instance. Every change bumps the instance's version, is pushed to the
//! controller link as a snapshot, and marks the state file dirty (written shortly after, in
//! one batch).

use std::cmp::Reverse;
use std::collections::binary_heap::PeekMut;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_protocol::agent_api::{
    AllocateRequest, CommandRequest, DeallocateRequest, DeployRequest, InstanceView, Profile,
};
use berth_protocol::arcus::{LiveState, Message};
use berth_protocol::metadata::{self, MetadataError};
use berth_protocol::time::unix_now;
use berth_protocol::{InstanceStatus, KeyValue, ManagementProtocol, RuntimeState};
use nix::sys::signal::Signal;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::arcus_link::{self, LinkParams};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::ports::{PortError, PortPool};
use crate::process::{self, ExitInfo, SpawnRequest, Spawner};
use crate::state::{
    Desired, GameRecord, Journal, PersistedAllocation, PersistedInstance, StateFile, StateWriter,
};
use crate::template;

/// Grace between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// A run shorter than this counts as a crash for restart backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(30);
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Changes are written to the state file at most this long after they happen, so a burst
/// costs one write. Allocations do not wait for it: they are journaled before they are
/// answered (`answer_journaled`).
const FLUSH_DELAY: Duration = Duration::from_millis(100);
/// How long a released game that never confirms allocations stays out of the pool.
const RELEASE_GRACE: Duration = Duration::from_secs(2);
/// Why a message could not be handed to a game whose link queue is full.
const QUEUE_FULL: &str = "the game is not reading its Arcus link (queue full)";

/// What the Arcus link (or the port probe of a `none` game) saw.
#[derive(Debug)]
pub enum LinkEvent {
    Connected,
    Disconnected {
        reason: String,
    },
    ProtocolError {
        reason: String,
    },
    /// The game has not accepted a connection on its management port for a while.
    NotListening {
        reason: String,
    },
    /// The game, linked, has sent no frame for longer than its health interval allows.
    Silent {
        reason: String,
    },
    /// A silent game sent a frame again.
    Heard,
    Status(i32),
    LiveState(LiveState),
    ReverseMetadata(Vec<KeyValue>),
    /// A `none` game's port accepts connections: it is online.
    GamePortOpen,
}

#[derive(Debug, Clone, Copy)]
pub enum Timer {
    Restart,
    Terminate,
    Kill,
    ConfirmTimeout {
        seq: u64,
    },
    /// A release the game never acknowledged: free it anyway if the game never confirms.
    ReleaseGrace,
}

type Reply<T, E> = oneshot::Sender<Result<T, E>>;

/// A timer the supervisor set for one run of an instance. Timers live in the supervisor's own
/// queue, not in a task each: every release sets one, so under load a spawned task per timer
/// was thousands of tasks asleep at once, each woken only to be ignored.
#[derive(Debug)]
struct Due {
    at: Instant,
    /// Order of setting, so that timers due at the same instant fire in that order.
    seq: u64,
    id: String,
    run: u64,
    timer: Timer,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Everything the supervisor can be asked or told. Closed: nothing else changes an instance.
#[derive(Debug)]
pub enum Command {
    Deploy {
        req: DeployRequest,
        reply: Reply<InstanceView, DeployError>,
    },
    Remove {
        id: String,
        force: bool,
        reply: Reply<InstanceView, InstanceError>,
    },
    Stop {
        id: String,
        timeout_seconds: Option<u32>,
        force: bool,
        reply: Reply<InstanceView, InstanceError>,
    },
    Start {
        id: String,
        reply: Reply<InstanceView, InstanceError>,
    },
    Allocate {
        id: String,
        req: AllocateRequest,
        reply: Reply<InstanceView, AllocateError>,
    },
    Deallocate {
        id: String,
        req: DeallocateRequest,
        reply: Reply<InstanceView, InstanceError>,
    },
    PushMetadata {
        id: String,
        metadata: Vec<KeyValue>,
        reply: Reply<InstanceView, InstanceError>,
    },
    CustomCommand {
        id: String,
        req: CommandRequest,
        reply: Reply<InstanceView, InstanceError>,
    },
    Get {
        id: String,
        reply: oneshot::Sender<Option<InstanceView>>,
    },
    List {
        reply: oneshot::Sender<Vec<InstanceView>>,
    },
    /// The ids alone, for the log keeper's sweep: no view is built.
    Ids {
        reply: oneshot::Sender<HashSet<String>>,
    },
    /// A liveness probe, answered with the number of instances: unlike `List` it copies
    /// nothing, so the watchdog and `/readyz` cost the supervisor next to no time.
    Ping {
        reply: oneshot::Sender<usize>,
    },
    /// The controller gave us a host id.
    Registered {
        host_id: u64,
    },
    /// The spawner's answer to `spawn_run`.
    Spawned {
        id: String,
        run: u64,
        result: Result<process::Process, String>,
    },
    Exited {
        id: String,
        run: u64,
        exit: ExitInfo,
    },
    Link {
        id: String,
        run: u64,
        event: LinkEvent,
    },
    Timer {
        id: String,
        run: u64,
        timer: Timer,
    },
}

/// A change for the controller link.
#[derive(Debug, Clone)]
pub enum Update {
    Instance(Box<InstanceView>),
    Removed { id: String, version: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{0}")]
    Invalid(String),
    #[error("instance {0} already exists with a different profile")]
    Conflict(String),
    #[error("this host already runs {0} instances (max_instances)")]
    HostFull(usize),
    /// Its record could not be written: a game is never started that a restarted agent would
    /// not know of.
    #[error(
        "instance {id} not deployed: the agent cannot record it on disk ({source}); free space on the disk that holds the agent's state_dir"
    )]
    NotRecorded {
        id: String,
        source: crate::state::StateError,
    },
    #[error(transparent)]
    Ports(#[from] PortError),
    #[error("the agent is shutting down")]
    ShuttingDown,
}

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("instance {0} does not exist on this host")]
    NotFound(String),
    #[error(
        "instance {0} is allocated (a match is in progress); deallocate it first or pass force=true"
    )]
    Allocated(String),
    #[error("{0}")]
    Invalid(String),
    #[error("instance {id} cannot receive messages: {reason}")]
    Unreachable { id: String, reason: String },
    /// A stop, removal or start that could not be recorded is not made: after a restart the
    /// agent would undo it.
    #[error(
        "instance {id} left as it is: the agent cannot record the change on disk ({source}); free space on the disk that holds the agent's state_dir"
    )]
    NotRecorded {
        id: String,
        source: crate::state::StateError,
    },
    #[error("the agent is shutting down")]
    ShuttingDown,
}

#[derive(Debug, thiserror::Error)]
pub enum AllocateError {
    #[error("instance {0} does not exist on this host")]
    NotOnHost(String),
    #[error("instance {id} is not allocatable: {reason}")]
    NotAllocatable { id: String, reason: String },
    #[error("instance {0} is already being allocated")]
    Allocating(String),
    #[error("instance {0} is already allocated")]
    AlreadyAllocated(String),
    #[error("allocation of instance {id} aborted: {reason}")]
    TimedOut { id: String, reason: String },
    /// The allocation could not be recorded on disk; after a restart the agent would not know
    /// the match and would release it on the game, so it is refused.
    #[error(
        "allocation of instance {id} refused: the agent cannot record it on disk ({source}); free space on the disk that holds the agent's state_dir"
    )]
    NotRecorded {
        id: String,
        source: crate::state::StateError,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("the agent is shutting down")]
    ShuttingDown,
}

/// Facts about this host that games and templates see.
#[derive(Debug, Clone)]
pub struct HostFacts {
    pub host_id: Option<u64>,
    pub host_name: String,
    pub region: String,
    pub dc_location: String,
    pub is_virtual: bool,
}

/// The cloneable front of the supervisor, used by the API and the controller link.
#[derive(Debug, Clone)]
pub struct SupervisorHandle {
    tx: mpsc::Sender<Command>,
}

macro_rules! ask {
    ($self:ident, $err:expr, $variant:ident { $($field:ident $(: $value:expr)?),* }) => {{
        let (reply, rx) = oneshot::channel();
        if $self.tx.send(Command::$variant { $($field $(: $value)?,)* reply }).await.is_err() {
            return Err($err);
        }
        rx.await.unwrap_or(Err($err))
    }};
}

impl SupervisorHandle {
    pub async fn deploy(&self, req: DeployRequest) -> Result<InstanceView, DeployError> {
        ask!(self, DeployError::ShuttingDown, Deploy { req })
    }

    pub async fn remove(&self, id: String, force: bool) -> Result<InstanceView, InstanceError> {
        ask!(self, InstanceError::ShuttingDown, Remove { id, force })
    }

    pub async fn stop(
        &self,
        id: String,
        timeout_seconds: Option<u32>,
        force: bool,
    ) -> Result<InstanceView, InstanceError> {
        ask!(
            self,
            InstanceError::ShuttingDown,
            Stop {
                id,
                timeout_seconds,
                force
            }
        )
    }

    pub async fn start(&self, id: String) -> Result<InstanceView, InstanceError> {
        ask!(self, InstanceError::ShuttingDown, Start { id })
    }

    pub async fn allocate(
        &self,
        id: String,
        req: AllocateRequest,
    ) -> Result<InstanceView, AllocateError> {
        ask!(self, AllocateError::ShuttingDown, Allocate { id, req })
    }

    pub async fn deallocate(
        &self,
        id: String,
        req: DeallocateRequest,
    ) -> Result<InstanceView, InstanceError> {
        ask!(self, InstanceError::ShuttingDown, Deallocate { id, req })
    }

    pub async fn push_metadata(
        &self,
        id: String,
        metadata: Vec<KeyValue>,
    ) -> Result<InstanceView, InstanceError> {
        ask!(
            self,
            InstanceError::ShuttingDown,
            PushMetadata { id, metadata }
        )
    }

    pub async fn custom_command(
        &self,
        id: String,
        req: CommandRequest,
    ) -> Result<InstanceView, InstanceError> {
        ask!(self, InstanceError::ShuttingDown, CustomCommand { id, req })
    }

    pub async fn get(&self, id: String) -> Option<InstanceView> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Get { id, reply }).await.ok()?;
        rx.await.ok().flatten()
    }

    /// Every instance; `None` when the supervisor has stopped.
    pub async fn list(&self) -> Option<Vec<InstanceView>> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::List { reply }).await.ok()?;
        rx.await.ok()
    }

    /// The id of every instance; `None` when the supervisor has stopped.
    pub async fn ids(&self) -> Option<HashSet<String>> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Ids { reply }).await.ok()?;
        rx.await.ok()
    }

    /// The number of instances, once the supervisor has worked through the commands queued
    /// before this one; `None` when it has stopped.
    pub async fn ping(&self) -> Option<usize> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Ping { reply }).await.ok()?;
        rx.await.ok()
    }

    pub async fn registered(&self, host_id: u64) {
        let _ = self.tx.send(Command::Registered { host_id }).await;
    }
}

/// An allocation waiting for the game's own status 5 (`confirmAllocation`).
#[derive(Debug)]
struct Pending {
    seq: u64,
    allocation_id: Option<String>,
    reply: Reply<InstanceView, AllocateError>,
}

enum Allocated {
    Done,
    AwaitingGame {
        seq: u64,
        allocation_id: Option<String>,
    },
}

#[derive(Debug)]
struct Instance {
    id: String,
    fleet_id: Option<u64>,
    protocol: ManagementProtocol,
    confirm_allocation: bool,
    profile: Profile,
    port: u16,
    management_port: u16,
    status: InstanceStatus,
    state: RuntimeState,
    desired: Desired,
    /// Incremented at every spawn or adoption; events of older runs are stale.
    run: u64,
    /// A spawn request is with the spawner.
    spawning: bool,
    pid: Option<u32>,
    start_time: u64,
    started_at: Option<u64>,
    run_started: Option<Instant>,
    pid_changed_at: Option<u64>,
    stopped_at: Option<u64>,
    created_at: u64,
    updated_at: u64,
    exit: Option<ExitInfo>,
    restarts: u32,
    crash_streak: u32,
    /// Sender to the Arcus link (or the port probe of a `none` game) of the current run.
    link: Option<mpsc::Sender<Message>>,
    arcus_connected: bool,
    /// Linked, but the game has sent nothing for longer than its health interval allows
    /// (frozen, stopped, deadlocked): shown as a link that is down, and not allocated.
    arcus_silent: bool,
    /// Why the link is not up while the game runs; shown, never persisted.
    arcus_error: Option<String>,
    live: Option<LiveState>,
    metadata: Vec<KeyValue>,
    reverse_metadata: Vec<KeyValue>,
    allocation: Option<PersistedAllocation>,
    pending: Option<Pending>,
    /// The agent released an allocation the game was told about, and the game has not yet
    /// reported 4. Until it does the instance is not offered again: the game's reports carry no
    /// allocation id, so a late 4 acknowledging this release could otherwise end the next
    /// match, and a late 5 would look like the game allocating itself.
    release_pending: Option<Instant>,
    /// The game has reported 5 during this run: it acknowledges allocations and releases.
    game_confirms: bool,
    /// Re-adopted with no allocation on record and no status heard since: a 5 the game
    /// reports now is an allocation the agent told it of but crashed before writing down (and
    /// so never acknowledged), not one the game made itself.
    adopted_free: bool,
    /// Found running with no record (see [`GameRecord`]) and no status heard since: a 5 the
    /// game reports now is its match, which the controller knows.
    recovered: bool,
    version: u64,
}

impl Instance {
    /// A just-deployed instance: never started, nothing heard from the game yet.
    fn new(
        id: String,
        fleet_id: Option<u64>,
        protocol: ManagementProtocol,
        confirm_allocation: bool,
        profile: Profile,
        port: u16,
        management_port: u16,
    ) -> Self {
        let now = unix_now();
        Self {
            id,
            fleet_id,
            protocol,
            confirm_allocation,
            profile,
            port,
            management_port,
            status: InstanceStatus::Setup,
            state: RuntimeState::Created,
            desired: Desired::Running,
            run: 0,
            spawning: false,
            pid: None,
            start_time: 0,
            started_at: None,
            run_started: None,
            pid_changed_at: None,
            stopped_at: None,
            created_at: now,
            updated_at: now,
            exit: None,
            restarts: 0,
            crash_streak: 0,
            link: None,
            arcus_connected: false,
            arcus_silent: false,
            arcus_error: None,
            live: None,
            metadata: Vec::new(),
            reverse_metadata: Vec::new(),
            allocation: None,
            pending: None,
            release_pending: None,
            game_confirms: false,
            adopted_free: false,
            recovered: false,
            version: 0,
        }
    }

    fn view(&self) -> InstanceView {
        let (exit_code, exit_signal) = match self.exit {
            Some(ExitInfo::Code(c)) => (Some(c), None),
            Some(ExitInfo::Signal(s)) => (None, Some(s)),
            _ => (None, None),
        };
        InstanceView {
            id: self.id.clone(),
            application_id: self.profile.application_id,
            fleet_id: self.fleet_id,
            profile_id: self.profile.id.clone(),
            build: self.profile.build.clone(),
            management_protocol: self.protocol,
            port: self.port,
            management_port: self.management_port,
            status: self.status,
            state: self.state,
            pid: self.pid,
            pid_changed_at: self.pid_changed_at,
            started_at: self.started_at,
            stopped_at: self.stopped_at,
            created_at: self.created_at,
            updated_at: self.updated_at,
            exit_code,
            exit_signal,
            restarts: self.restarts,
            auto_restart: self.profile.auto_restart,
            arcus_connected: self.arcus_connected && !self.arcus_silent,
            arcus_error: self.arcus_error.clone(),
            num_players: self.live.as_ref().map(|l| l.players),
            num_players_max: self.live.as_ref().map(|l| l.max_players),
            live_host_name: self.live.as_ref().map(|l| l.name.clone()),
            live_map: self.live.as_ref().map(|l| l.map.clone()),
            live_rules: self.live.as_ref().map(|l| l.mode.clone()),
            live_game_version: self.live.as_ref().map(|l| l.version.clone()),
            metadata: self.metadata.clone(),
            reverse_metadata: self.reverse_metadata.clone(),
            allocation_id: self.allocation.as_ref().and_then(|a| a.id.clone()),
            allocated_at: self.allocation.as_ref().map(|a| a.at),
            releasing: self.release_pending.is_some(),
            version: self.version,
        }
    }

    fn persisted(&self) -> PersistedInstance {
        PersistedInstance {
            id: self.id.clone(),
            fleet_id: self.fleet_id,
            management_protocol: self.protocol,
            confirm_allocation: self.confirm_allocation,
            profile: self.profile.clone(),
            port: self.port,
            management_port: self.management_port,
            pid: self.pid,
            start_time: self.start_time,
            started_at: self.started_at,
            pid_changed_at: self.pid_changed_at,
            stopped_at: self.stopped_at,
            created_at: self.created_at,
            desired: self.desired,
            restarts: self.restarts,
            status: self.status,
            allocation: self.allocation.clone(),
            metadata: self.metadata.clone(),
            reverse_metadata: self.reverse_metadata.clone(),
            recovered: self.recovered,
        }
    }

    fn is_arcus(&self) -> bool {
        self.protocol == ManagementProtocol::Arcus
    }

    /// The link, if the game behind it has finished the Arcus handshake.
    fn connected_link(&self) -> Option<&mpsc::Sender<Message>> {
        self.link.as_ref().filter(|_| self.arcus_connected)
    }
}

/// The supervisor task's state.
pub struct Supervisor {
    host: HostFacts,
    config: Arc<Config>,
    instances: HashMap<String, Instance>,
    ports: PortPool,
    tx: mpsc::Sender<Command>,
    rx: mpsc::Receiver<Command>,
    updates: mpsc::UnboundedSender<Update>,
    writer: StateWriter,
    /// The number of the last snapshot handed to the writer.
    snapshot_seq: u64,
    journal: Journal,
    generation: u64,
    agent_token: String,
    counter: u64,
    next_seq: u64,
    flush_at: Option<Instant>,
    /// Pending timers, earliest first.
    timers: BinaryHeap<Reverse<Due>>,
    timers_set: u64,
    metrics: Arc<Metrics>,
    spawner: Spawner,
    /// `state_dir` as games' records name it (see [`GameRecord`]).
    record_dir: String,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("instances", &self.instances.len())
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// Builds the supervisor from the state file, re-adopting every game that still runs.
    /// The returned state has its generation bumped and must be persisted before serving.
    pub fn restore(
        config: Arc<Config>,
        host: HostFacts,
        mut state: StateFile,
        updates: mpsc::UnboundedSender<Update>,
        metrics: Arc<Metrics>,
        spawner: Spawner,
    ) -> (Self, SupervisorHandle) {
        let (tx, rx) = mpsc::channel(8192);
        state.generation += 1;
        let writer = StateWriter::start(
            config.state_dir.clone(),
            metrics.snapshot_write_failures.clone(),
        );
        let journal = Journal::new(
            config.state_dir.clone(),
            state.seq,
            metrics.journal_write_failures.clone(),
        );
        let record_dir = std::fs::canonicalize(&config.state_dir)
            .unwrap_or_else(|_| config.state_dir.clone())
            .to_string_lossy()
            .into_owned();
        let mut sup = Self {
            record_dir,
            ports: PortPool::new(config.game_ports.clone(), config.management_ports.clone()),
            host,
            config,
            instances: HashMap::new(),
            tx: tx.clone(),
            rx,
            updates,
            writer,
            snapshot_seq: state.seq,
            journal,
            generation: state.generation,
            agent_token: state.agent_token.clone(),
            counter: 0,
            next_seq: 0,
            flush_at: None,
            timers: BinaryHeap::new(),
            timers_set: 0,
            metrics,
            spawner,
        };
        let now = unix_now();
        // Games whose recorded process is gone (or never recorded) may still run under a pid
        // the state file never got: looked for once, together.
        let mut recorded: HashMap<String, process::Process> = HashMap::new();
        for p in &state.instances {
            if let Some(proc_) = p.pid.and_then(|pid| process::adopt(pid, p.start_time)) {
                recorded.insert(p.id.clone(), proc_);
            }
        }
        let missing: std::collections::HashSet<&str> = state
            .instances
            .iter()
            .filter(|p| p.desired != Desired::Removed && !recorded.contains_key(&p.id))
            .map(|p| p.id.as_str())
            .collect();
        let mut unrecorded = process::find_unrecorded(&missing);
        for (id, pid) in unrecorded.remains.drain(..) {
            // As when the agent sees a game end: nothing of it may keep its ports from the
            // restart.
            tracing::warn!(instance_id = %id, pid, "killed a process left over from a game that ended while the agent was down");
            process::kill_remain(pid);
        }
        for p in state.instances {
            sup.ports.mark_used(p.port);
            sup.ports.mark_used(p.management_port);
            let mut inst = Instance {
                status: InstanceStatus::Offline,
                state: RuntimeState::Exited,
                desired: p.desired,
                started_at: p.started_at,
                pid_changed_at: p.pid_changed_at,
                stopped_at: p.stopped_at,
                created_at: p.created_at,
                updated_at: now,
                restarts: p.restarts,
                metadata: p.metadata,
                reverse_metadata: p.reverse_metadata,
                allocation: p.allocation,
                recovered: p.recovered,
                ..Instance::new(
                    p.id.clone(),
                    p.fleet_id,
                    p.management_protocol,
                    p.confirm_allocation,
                    p.profile,
                    p.port,
                    p.management_port,
                )
            };
            let adopted = match recorded.remove(&p.id) {
                Some(proc_) => Some(proc_),
                None => unrecorded.games.remove(&p.id).inspect(|proc_| {
                    tracing::warn!(instance_id = %inst.id, pid = proc_.pid, recorded_pid = ?p.pid, "re-adopted a game the state file did not record (the agent stopped before writing its pid)");
                    if p.pid.is_some() {
                        // The recorded process ended, and its match with it; this one is the
                        // restart the agent made before it stopped.
                        if inst.allocation.take().is_some() {
                            inst.metadata.clear();
                        }
                        inst.restarts += 1;
                        inst.pid_changed_at = Some(now);
                    }
                }),
            };
            match adopted {
                Some(proc_) => {
                    tracing::info!(instance_id = %inst.id, pid = proc_.pid, "re-adopted running game");
                    sup.metrics.readopted.inc();
                    inst.run = 1;
                    inst.pid = Some(proc_.pid);
                    inst.start_time = proc_.start_time;
                    inst.run_started = Some(Instant::now());
                    inst.state = RuntimeState::Running;
                    // The game re-sends its status when the link is back; until then an
                    // allocated game stays allocated and an idle one is not offered.
                    inst.status = if inst.allocation.is_some() {
                        InstanceStatus::Allocated
                    } else {
                        inst.adopted_free = !inst.recovered;
                        InstanceStatus::Starting
                    };
                    // A stop or removal under way lost its timers with the agent: the game
                    // gets its whole grace again (it may not have been told yet), then SIGTERM.
                    let stopping = (inst.desired != Desired::Running).then(|| {
                        Duration::from_secs(inst.profile.stop_timeout_seconds.max(1).into())
                    });
                    if stopping.is_some() {
                        inst.state = RuntimeState::ShuttingDown;
                    }
                    sup.instances.insert(inst.id.clone(), inst);
                    sup.watch(&p.id, proc_);
                    if let Some(grace) = stopping {
                        sup.schedule(&p.id, 1, Timer::Terminate, grace);
                    }
                }
                None => {
                    if p.pid.is_some() {
                        tracing::warn!(instance_id = %inst.id, "game exited while the agent was down");
                        inst.stopped_at = Some(now);
                        // As in `exited`: the match ended with the process, and a restart
                        // by policy is counted as one.
                        if inst.allocation.take().is_some() {
                            inst.metadata.clear();
                        }
                        if inst.desired == Desired::Running && inst.profile.auto_restart {
                            inst.restarts += 1;
                            sup.metrics.restarts.inc();
                        }
                    }
                    let id = inst.id.clone();
                    let restart = inst.desired == Desired::Running && inst.profile.auto_restart;
                    if inst.desired == Desired::Removed {
                        sup.ports.release(inst.port);
                        sup.ports.release(inst.management_port);
                        continue;
                    }
                    sup.instances.insert(id.clone(), inst);
                    if restart {
                        sup.spawn_run(&id);
                    }
                }
            }
        }
        sup.adopt_orphans();
        let ids: Vec<String> = sup.instances.keys().cloned().collect();
        for id in ids {
            sup.changed(&id, true);
        }
        sup.flush_now();
        let handle = SupervisorHandle { tx };
        (sup, handle)
    }

    pub fn agent_token(&self) -> &str {
        &self.agent_token
    }

    /// Adopts the running games this agent started that its state does not know: it was lost
    /// (a wiped or replaced `state_dir`, a corrupt state file moved away) while they ran.
    /// Left alone they would run unmanaged, invisible to the controller, while a second set
    /// was started beside them. Each one's environment carries what the agent needs (see
    /// [`GameRecord`]); its allocation, if it is in a match, is learned from the game itself
    /// when its link is up, and the controller still holds its id.
    fn adopt_orphans(&mut self) {
        let known: HashSet<&str> = self.instances.keys().map(String::as_str).collect();
        let uid = self
            .config
            .run_as
            .as_ref()
            .map_or_else(|| nix::unistd::geteuid().as_raw(), |r| r.uid);
        let orphans = process::find_orphans(&known, uid);
        for o in orphans {
            let record: GameRecord = match serde_json::from_str(&o.record) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(instance_id = %o.id, pid = o.process.pid, error = %e, "a game's BERTH_AGENT_RECORD cannot be read; not adopted");
                    continue;
                }
            };
            if record.state_dir != self.record_dir {
                continue;
            }

            let (port, management_port) = (o.port, o.management_port);
            tracing::warn!(instance_id = %o.id, pid = o.process.pid, port, "adopted a running game this agent had no record of (its state was lost); a match it runs is learned from the game");
            self.metrics.readopted.inc();
            self.ports.mark_used(port);
            self.ports.mark_used(management_port);
            let now = unix_now();
            let mut inst = Instance::new(
                o.id.clone(),
                record.fleet_id,
                record.management_protocol,
                record.confirm_allocation,
                record.profile,
                port,
                management_port,
            );
            inst.run = 1;
            inst.pid = Some(o.process.pid);
            inst.start_time = o.process.start_time;
            inst.started_at = Some(now);
            inst.pid_changed_at = Some(now);
            inst.run_started = Some(Instant::now());
            inst.state = RuntimeState::Running;
            inst.recovered = true;
            if inst.is_arcus() {
                // Not offered until the game says whether it is in a match.
                inst.status = InstanceStatus::Starting;
            } else {
                // A game without Arcus cannot say whether it is in a match: it is taken to
                // be, until a release (naming any allocation) or its exit ends it.
                inst.status = InstanceStatus::Allocated;
                inst.allocation = Some(PersistedAllocation {
                    id: None,
                    at: now,
                    game_confirmed: false,
                    recovered: true,
                });
            }
            self.instances.insert(o.id.clone(), inst);
            self.watch(&o.id, o.process);
        }
    }

    /// Runs until `shutdown` fires. Games are left running; the state is written first.
    pub async fn run(mut self, mut shutdown: crate::Shutdown) {
        // One sleep for all timers, moved only when the earliest one changes: most timers
        // are set behind others (a release's grace is always the same length).
        let next_timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(next_timer);
        loop {
            let flush_at = self.flush_at;
            let due = self.timers.peek().map(|Reverse(d)| d.at);
            if let Some(at) = due
                && next_timer.deadline() != at
            {
                next_timer.as_mut().reset(at);
            }
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                },
                () = &mut next_timer, if due.is_some() => self.fire_due_timers(),
                _ = async { tokio::time::sleep_until(flush_at.unwrap_or_else(Instant::now)).await }, if flush_at.is_some() => {
                    self.flush_now();
                }
                _ = shutdown.changed() => break,
            }
        }
        // The last snapshot goes through the writer too (in order, after anything still
        // queued), and the agent exits only once it is on disk.
        self.flush_now();
        let target = self.snapshot_seq;
        let mut written = self.writer.written();
        let on_disk = tokio::time::timeout(Duration::from_secs(10), async {
            while *written.borrow_and_update() < target {
                if written.changed().await.is_err() {
                    return false;
                }
            }
            true
        })
        .await;
        if on_disk != Ok(true) {
            tracing::error!("state not saved at shutdown");
        }
        tracing::info!(
            instances = self.instances.len(),
            "supervisor stopped; games keep running"
        );
    }

    fn snapshot(&self, seq: u64) -> StateFile {
        StateFile {
            format: 1,
            generation: self.generation,
            agent_token: self.agent_token.clone(),
            seq,
            instances: self.instances.values().map(Instance::persisted).collect(),
        }
    }

    fn flush_now(&mut self) {
        self.flush_at = None;
        let seq = self.snapshot_seq + 1;
        match serde_json::to_vec(&self.snapshot(seq)) {
            Ok(bytes) => {
                self.snapshot_seq = seq;
                self.journal.rotate(seq);
                self.writer.save(seq, bytes);
            }
            Err(e) => tracing::error!(error = %e, "state not serialised"),
        }
    }

    /// Answers an allocation once it is on disk: an allocation the agent acknowledged and then
    /// forgot in a crash would come back as one the game made itself, with no id, which no
    /// release can end. One journal line, written here and now.
    fn answer_journaled(&mut self, reply: Reply<InstanceView, AllocateError>, id: &str) {
        let Some(inst) = self.instances.get_mut(id) else {
            let _ = reply.send(Err(AllocateError::NotOnHost(id.to_owned())));
            return;
        };
        let journaled = self.journal.append(
            inst.id.clone(),
            inst.status,
            inst.allocation.clone(),
            inst.metadata.clone(),
        );
        if let Err(source) = journaled {
            // Not on disk, so not given.
            let error = AllocateError::NotRecorded {
                id: id.to_owned(),
                source,
            };
            self.withdraw(id, reply, error);
            return;
        }
        self.metrics.allocations_ok.inc();
        let _ = reply.send(Ok(inst.view()));
    }

    /// An allocation the game was sent but that is not given after all: the instance is free
    /// and carries no match metadata, and the game, which did get `allocated`, hears that it
    /// is free.
    fn withdraw(
        &mut self,
        id: &str,
        reply: Reply<InstanceView, AllocateError>,
        error: AllocateError,
    ) {
        if let Some(inst) = self.instances.get_mut(id) {
            inst.status = InstanceStatus::Online;
            inst.allocation = None;
            inst.metadata.clear();
            let run = inst.run;
            if tell_released(inst) {
                self.schedule(id, run, Timer::ReleaseGrace, RELEASE_GRACE);
            }
        }
        self.metrics.allocations_failed.inc();
        let _ = reply.send(Err(error));
        self.changed(id, true);
    }

    /// Records a change: new version, snapshot to the controller, state file later.
    fn changed(&mut self, id: &str, persist: bool) {
        // Taken before the lookup (which borrows `self.instances`); a version skipped for an
        // unknown id is harmless, versions only have to rise.
        let version = self.next_version();
        let Some(inst) = self.instances.get_mut(id) else {
            return;
        };
        inst.version = version;
        inst.updated_at = unix_now();
        let _ = self.updates.send(Update::Instance(Box::new(inst.view())));
        if persist {
            self.schedule_flush();
        }
    }

    /// Versions carry the generation in their high bits, so they keep rising across agent
    /// restarts and a stale snapshot never overwrites a newer one at the controller.
    fn next_version(&mut self) -> u64 {
        self.counter += 1;
        (self.generation << 40) | self.counter
    }

    /// Writes the state file within `FLUSH_DELAY`, together with whatever else changes by then.
    fn schedule_flush(&mut self) {
        if self.flush_at.is_none() {
            self.flush_at = Some(Instant::now() + FLUSH_DELAY);
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Deploy { req, reply } => {
                let r = self.deploy(req);
                let _ = reply.send(r);
            }
            Command::Remove { id, force, reply } => {
                let r = self.remove(&id, force);
                let _ = reply.send(r);
            }
            Command::Stop {
                id,
                timeout_seconds,
                force,
                reply,
            } => {
                let r = self.stop(&id, timeout_seconds, force, Desired::Stopped);
                let _ = reply.send(r);
            }
            Command::Start { id, reply } => {
                let r = self.start(&id);
                let _ = reply.send(r);
            }
            Command::Allocate { id, req, reply } => self.allocate(id, req, reply),
            Command::Deallocate { id, req, reply } => {
                let r = self.deallocate(&id, req);
                let _ = reply.send(r);
            }
            Command::PushMetadata {
                id,
                metadata,
                reply,
            } => {
                let r = self.push_metadata(&id, metadata);
                let _ = reply.send(r);
            }
            Command::CustomCommand { id, req, reply } => {
                let r = self.custom_command(&id, req);
                let _ = reply.send(r);
            }
            Command::Get { id, reply } => {
                let _ = reply.send(self.instances.get(&id).map(Instance::view));
            }
            Command::List { reply } => {
                let mut all: Vec<_> = self.instances.values().map(Instance::view).collect();
                all.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
                let _ = reply.send(all);
            }
            Command::Ids { reply } => {
                let _ = reply.send(self.instances.keys().cloned().collect());
            }
            Command::Ping { reply } => {
                let _ = reply.send(self.instances.len());
            }
            Command::Registered { host_id } => self.registered(host_id),
            Command::Spawned { id, run, result } => self.spawned(&id, run, result),
            Command::Exited { id, run, exit } => self.exited(&id, run, exit),
            Command::Link { id, run, event } => self.link_event(&id, run, event),
            Command::Timer { id, run, timer } => self.timer(&id, run, timer),
        }
    }

    fn deploy(&mut self, req: DeployRequest) -> Result<InstanceView, DeployError> {
        let id = match req.id {
            Some(id) => {
                validate_id(&id).map_err(DeployError::Invalid)?;
                id
            }
            None => uuid::Uuid::new_v4().to_string(),
        };
        if let Some(existing) = self.instances.get(&id) {
            // A retried deploy of the same instance is answered, not repeated.
            if existing.profile == req.profile
                && existing.fleet_id == req.fleet_id
                && existing.protocol == req.management_protocol
                && existing.desired != Desired::Removed
            {
                return Ok(existing.view());
            }
            return Err(DeployError::Conflict(id));
        }
        if self.instances.len() >= self.config.max_instances {
            return Err(DeployError::HostFull(self.config.max_instances));
        }
        validate_profile(&req.profile, &self.host).map_err(DeployError::Invalid)?;
        let (port, management_port) = self.ports.reserve()?;
        let inst = Instance::new(
            id.clone(),
            req.fleet_id,
            req.management_protocol,
            req.confirm_allocation,
            req.profile,
            port,
            management_port,
        );
        if let Err(source) = self.journal.append_deployed(inst.persisted()) {
            self.ports.release(port);
            self.ports.release(management_port);
            return Err(DeployError::NotRecorded { id, source });
        }
        tracing::info!(instance_id = %id, port, management_port, profile = %inst.profile.id, "instance deployed");
        self.instances.insert(id.clone(), inst);
        self.changed(&id, true);
        let view = self.instances[&id].view();
        // Answer in status 1 and spawn as the next command: the caller sees setup, and a burst
        // of deploys is not held up by fork/exec.
        self.schedule_now(&id, 0, Timer::Restart);
        Ok(view)
    }

    fn schedule_now(&self, id: &str, run: u64, timer: Timer) {
        let cmd = Command::Timer {
            id: id.to_owned(),
            run,
            timer,
        };
        if let Err(mpsc::error::TrySendError::Full(cmd)) = self.tx.try_send(cmd) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(cmd).await;
            });
        }
    }

    /// Starts a process for the instance and its Arcus link.
    fn spawn_run(&mut self, id: &str) {
        let host = &self.host;
        let log_dir = self.config.log_dir.clone();
        let run_as = self.config.run_as.clone();
        let Some(inst) = self.instances.get_mut(id) else {
            return;
        };
        let vars = |name: &str| template_var(name, inst_vars(inst), host);
        let args: Result<Vec<String>, _> = inst
            .profile
            .args
            .iter()
            .map(|a| template::expand(a, &vars))
            .collect();
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("BERTH_INSTANCE_ID".into(), inst.id.clone()),
            ("BERTH_PORT".into(), inst.port.to_string()),
            (
                "BERTH_MANAGEMENT_PORT".into(),
                inst.management_port.to_string(),
            ),
            (
                "BERTH_HOST_ID".into(),
                host.host_id.unwrap_or(0).to_string(),
            ),
            (
                "BERTH_AGENT_RECORD".into(),
                serde_json::to_string(&GameRecord {
                    state_dir: self.record_dir.clone(),
                    fleet_id: inst.fleet_id,
                    management_protocol: inst.protocol,
                    confirm_allocation: inst.confirm_allocation,
                    profile: inst.profile.clone(),
                })
                .unwrap_or_default(),
            ),
        ];
        let mut env_err = None;
        for (k, v) in &inst.profile.env {
            match template::expand(v, &vars) {
                Ok(v) => env.push((k.clone(), v)),
                Err(e) => env_err = Some(e),
            }
        }
        let request = match (args, env_err) {
            (Err(e), _) | (_, Some(e)) => Err(e.to_string()),
            (Ok(args), None) => {
                if let Err(e) = std::fs::create_dir_all(&log_dir) {
                    tracing::warn!(error = %e, dir = %log_dir.display(), "cannot create log directory");
                }
                Ok(SpawnRequest {
                    executable: inst.profile.executable.clone().into(),
                    args,
                    env,
                    working_dir: inst.profile.working_dir.clone().map(Into::into),
                    log_path: log_path(&log_dir, &inst.id),
                    uid: run_as.as_ref().map(|r| r.uid),
                    gid: run_as.as_ref().map(|r| r.gid),
                    limits: inst.profile.limits.clone(),
                })
            }
        };
        inst.run += 1;
        let run = inst.run;
        match request {
            Ok(request) => {
                // The spawner answers with a `Spawned` command; the supervisor carries on.
                inst.spawning = true;
                let spawner = self.spawner.clone();
                let tx = self.tx.clone();
                let id = id.to_owned();
                tokio::spawn(async move {
                    let result = spawner.spawn(request).await.map_err(|e| e.to_string());
                    let _ = tx.send(Command::Spawned { id, run, result }).await;
                });
            }
            Err(reason) => self.spawn_failed(id, run, &reason),
        }
    }

    fn spawned(&mut self, id: &str, run: u64, result: Result<process::Process, String>) {
        let current = self
            .instances
            .get(id)
            .is_some_and(|i| i.run == run && i.spawning);
        if !current {
            // Removed (or replaced) while starting: this process has no instance to serve.
            if let Ok(p) = result {
                let _ = process::signal_group(p.pid, Signal::SIGKILL);
            }
            return;
        }
        let Some(inst) = self.instances.get_mut(id) else {
            return;
        };
        inst.spawning = false;
        let proc_ = match result {
            Ok(p) => p,
            Err(reason) => {
                self.spawn_failed(id, run, &reason);
                self.changed(id, true);
                return;
            }
        };
        let now = unix_now();
        tracing::info!(instance_id = %id, pid = proc_.pid, run, "game started");
        let pid = proc_.pid;
        inst.pid = Some(pid);
        inst.start_time = proc_.start_time;
        inst.started_at = Some(now);
        inst.run_started = Some(Instant::now());
        inst.pid_changed_at = Some(now);
        inst.exit = None;
        inst.status = InstanceStatus::Starting;
        inst.state = RuntimeState::Running;
        inst.live = None;
        inst.arcus_connected = false;
        inst.arcus_silent = false;
        inst.arcus_error = None;
        let stop_now = inst.desired != Desired::Running;
        self.watch(id, proc_);
        if stop_now {
            // Stopped or removed while it was starting.
            let _ = process::signal_group(pid, Signal::SIGTERM);
            if let Some(inst) = self.instances.get_mut(id) {
                inst.state = RuntimeState::ShuttingDown;
            }
            self.schedule(id, run, Timer::Kill, KILL_GRACE);
        }
        self.changed(id, true);
    }

    fn spawn_failed(&mut self, id: &str, run: u64, reason: &str) {
        let Some(inst) = self.instances.get_mut(id) else {
            return;
        };
        tracing::error!(instance_id = %id, error = %reason, "game could not be started");
        self.metrics.spawn_failures.inc();
        inst.spawning = false;
        inst.pid = None;
        inst.status = InstanceStatus::Offline;
        inst.state = RuntimeState::Dead;
        inst.stopped_at = Some(unix_now());
        if inst.desired == Desired::Removed {
            self.finish_remove(id);
            return;
        }
        self.schedule_restart(id, run);
    }

    /// Watches a (spawned or adopted) process and starts its link.
    fn watch(&mut self, id: &str, proc_: process::Process) {
        let host = &self.host;
        let Some(inst) = self.instances.get_mut(id) else {
            return;
        };
        let run = inst.run;
        let tx = self.tx.clone();
        let exit_id = inst.id.clone();
        tokio::spawn(async move {
            let exit = proc_.wait().await;
            let _ = tx
                .send(Command::Exited {
                    id: exit_id,
                    run,
                    exit,
                })
                .await;
        });
        inst.link = Some(match inst.protocol {
            ManagementProtocol::Arcus => arcus_link::start(
                LinkParams {
                    instance_id: inst.id.clone(),
                    run,
                    management_port: inst.management_port,
                    host_information: host_information(host),
                    instance_information: instance_information(inst, host),
                },
                self.tx.clone(),
            ),
            ManagementProtocol::None => {
                probe_game_port(inst.id.clone(), run, inst.port, self.tx.clone())
            }
        });
    }

    fn schedule(&mut self, id: &str, run: u64, timer: Timer, after: Duration) {
        self.timers_set += 1;
        self.timers.push(Reverse(Due {
            at: Instant::now() + after,
            seq: self.timers_set,
            id: id.to_owned(),
            run,
            timer,
        }));
    }

    fn fire_due_timers(&mut self) {
        let now = Instant::now();
        loop {
            let due = match self.timers.peek_mut() {
                Some(top) if top.0.at <= now => PeekMut::pop(top).0,
                _ => break,
            };
            self.timer(&due.id, due.run, due.timer);
        }
    }

    fn schedule_restart(&mut self, id: &str, run: u64) {
        let Some(inst) = self.instances.get_mut(id) else {
            return;
        };
        if inst.desired != Desired::Running || !inst.profile.auto_restart {
            return;
        }
        inst.crash_streak += 1;
        let exp = inst.crash_streak.saturating_sub(1).min(16);
        let delay = (BACKOFF_BASE * 2u32.pow(exp)).min(BACKOFF_CAP);
        inst.state = RuntimeState::Restarting;
        tracing::info!(instance_id = %id, delay_ms = delay.as_millis() as u64, "restart scheduled");
        self.schedule(id, run, Timer::Restart, delay);
    }

    fn exited(&mut self, id: &str, run: u64, exit: ExitInfo) {
        let Some(inst) = self.instances.get_mut(id) else {
            return;
        };
        if inst.run != run {
            return;
        }
        let now = unix_now();
        tracing::info!(instance_id = %id, pid = ?inst.pid, exit = ?exit, "game exited");
        if let Some(pid) = inst.pid {
            process::kill_group_remains(pid);
            // A pass over /proc, off this task; the restart comes 250 ms or more later, and
            // a process started after `by` is left.
            if let Some(by) = process::now_ticks() {
                let ended = process::Ended {
                    id: id.to_owned(),
                    started: inst.start_time,
                    by,
                };
                tokio::task::spawn_blocking(move || {
                    for pid in process::kill_leavers(&ended) {
                        tracing::warn!(instance_id = %ended.id, pid, "killed a process the game had started outside its process group (setsid); it would have outlived the game");
                    }
                });
            }
        }
        inst.pid = None;
        inst.exit = Some(exit);
        inst.stopped_at = Some(now);
        inst.status = InstanceStatus::Offline;
        inst.state = match exit {
            ExitInfo::Code(0) | ExitInfo::Unknown => RuntimeState::Exited,
            _ => RuntimeState::Dead,
        };
        inst.link = None;
        inst.arcus_connected = false;
        inst.arcus_silent = false;
        inst.arcus_error = None;
        inst.live = None;
        // A game that exits ends its match (i3D: the platform restarts it and it is free again).
        inst.release_pending = None;
        inst.game_confirms = false;
        if inst.allocation.take().is_some() || inst.pending.is_some() {
            inst.metadata.clear();
        }
        if let Some(p) = inst.pending.take() {
            let _ = p.reply.send(Err(AllocateError::TimedOut {
                id: id.to_owned(),
                reason: "the game exited before confirming the allocation".to_owned(),
            }));
        }
        if inst
            .run_started
            .take()
            .is_some_and(|t| t.elapsed() >= HEALTHY_RUN)
        {
            inst.crash_streak = 0;
        }
        match inst.desired {
            Desired::Removed => {
                self.finish_remove(id);
                return;
            }
            Desired::Running if inst.profile.auto_restart => {
                inst.restarts += 1;
                self.metrics.restarts.inc();
                self.schedule_restart(id, run);
            }
            _ => {}
        }
        self.changed(id, true);
    }

    fn finish_remove(&mut self, id: &str) {
        if let Some(inst) = self.instances.remove(id) {
            self.ports.release(inst.port);
            self.ports.release(inst.management_port);
            let version = self.next_version();
            let _ = self.updates.send(Update::Removed {
                id: id.to_owned(),
                version,
            });
            tracing::info!(instance_id = %id, "instance removed");
            self.schedule_flush();
        }
    }

    fn timer(&mut self, id: &str, run: u64, timer: Timer) {
        let Some(inst) = self.instances.get_mut(id) else {
            return;
        };
        if inst.run != run {
            return;
        }
        match timer {
            Timer::Restart => {
                if inst.pid.is_none() && !inst.spawning && inst.desired == Desired::Running {
                    self.spawn_run(id);
                    self.changed(id, true);
                }
            }
            Timer::Terminate => {
                if let Some(pid) = inst.pid {
                    tracing::info!(instance_id = %id, pid, "the game did not stop within its grace; sending SIGTERM");
                    let _ = process::signal_group(pid, Signal::SIGTERM);
                    inst.state = RuntimeState::ShuttingDown;
                    self.schedule(id, run, Timer::Kill, KILL_GRACE);
                    self.changed(id, false);
                }
            }
            Timer::Kill => {
                if let Some(pid) = inst.pid {
                    tracing::warn!(instance_id = %id, pid, "game ignored SIGTERM; sending SIGKILL");
                    let _ = process::signal_group(pid, Signal::SIGKILL);
                }
            }
            Timer::ReleaseGrace => {
                if inst.release_pending.is_some() && !inst.game_confirms {
                    // This game never reports 5, so it will not report 4 either.
                    inst.release_pending = None;
                    self.changed(id, false);
                }
            }
            Timer::ConfirmTimeout { seq } => {
                if inst.pending.as_ref().is_some_and(|p| p.seq == seq)
                    && let Some(p) = inst.pending.take()
                {
                    let error = AllocateError::TimedOut {
                        id: id.to_owned(),
                        reason: "the game did not confirm the allocation (status 5) in time"
                            .to_owned(),
                    };
                    self.withdraw(id, p.reply, error);
                }
            }
        }
    }

    fn stop(
        &mut self,
        id: &str,
        timeout_seconds: Option<u32>,
        force: bool,
        desired: Desired,
    ) -> Result<InstanceView, InstanceError> {
        let inst = self
            .instances
            .get_mut(id)
            .ok_or_else(|| InstanceError::NotFound(id.to_owned()))?;
        if !force && (inst.allocation.is_some() || inst.pending.is_some()) && inst.pid.is_some() {
            return Err(InstanceError::Allocated(id.to_owned()));
        }
        record_desired(&mut self.journal, inst, desired)?;
        inst.desired = desired;
        let run = inst.run;
        let timeout = timeout_seconds
            .unwrap_or(inst.profile.stop_timeout_seconds)
            .max(1);
        match inst.pid {
            None => {
                if desired == Desired::Removed {
                    let view = inst.view();
                    self.finish_remove(id);
                    return Ok(view);
                }
                inst.state = RuntimeState::Exited;
            }
            Some(pid) => {
                let soft = inst.is_arcus()
                    && inst.connected_link().is_some_and(|l| {
                        l.try_send(Message::SoftStop {
                            timeout: timeout as i32,
                        })
                        .is_ok()
                    });
                if soft {
                    tracing::info!(instance_id = %id, timeout, "soft stop sent");
                    inst.state = RuntimeState::Draining;
                    self.schedule(
                        id,
                        run,
                        Timer::Terminate,
                        Duration::from_secs(timeout.into()),
                    );
                } else {
                    tracing::info!(instance_id = %id, pid, "sending SIGTERM");
                    let _ = process::signal_group(pid, Signal::SIGTERM);
                    inst.state = RuntimeState::ShuttingDown;
                    self.schedule(id, run, Timer::Kill, KILL_GRACE);
                }
            }
        }
        self.changed(id, true);
        Ok(self.instances[id].view())
    }

    fn remove(&mut self, id: &str, force: bool) -> Result<InstanceView, InstanceError> {
        self.stop(id, None, force, Desired::Removed)
    }

    fn start(&mut self, id: &str) -> Result<InstanceView, InstanceError> {
        let inst = self
            .instances
            .get_mut(id)
            .ok_or_else(|| InstanceError::NotFound(id.to_owned()))?;
        if inst.desired == Desired::Removed {
            return Err(InstanceError::Invalid(format!(
                "instance {id} is being removed"
            )));
        }
        record_desired(&mut self.journal, inst, Desired::Running)?;
        inst.desired = Desired::Running;
        inst.crash_streak = 0;
        if inst.pid.is_none() && !inst.spawning {
            self.spawn_run(id);
        }
        self.changed(id, true);
        Ok(self.instances[id].view())
    }

    fn allocate(
        &mut self,
        id: String,
        req: AllocateRequest,
        reply: Reply<InstanceView, AllocateError>,
    ) {
        match self.try_allocate(&id, req) {
            Ok(Allocated::AwaitingGame { seq, allocation_id }) => {
                // Answered when the game confirms, or by the timeout.
                if let Some(inst) = self.instances.get_mut(&id) {
                    inst.pending = Some(Pending {
                        seq,
                        allocation_id,
                        reply,
                    });
                }
            }
            Ok(Allocated::Done) => {
                // Journaled by `try_allocate`, before the game heard of it.
                self.metrics.allocations_ok.inc();
                if let Some(inst) = self.instances.get(&id) {
                    let _ = reply.send(Ok(inst.view()));
                }
            }
            Err(e) => {
                self.metrics.allocations_failed.inc();
                let _ = reply.send(Err(e));
            }
        }
    }

    fn try_allocate(&mut self, id: &str, req: AllocateRequest) -> Result<Allocated, AllocateError> {
        metadata::validate(&req.metadata).map_err(|e| AllocateError::Invalid(e.to_string()))?;
        if let Some(m) = &req.game_metadata {
            metadata::validate(m)
                .map_err(|e: MetadataError| AllocateError::Invalid(format!("gameMetadata: {e}")))?;
        }
        let timeout = req
            .timeout_ms
            .map_or(self.config.allocation_timeout, Duration::from_millis)
            .min(self.config.allocation_timeout);
        let seq = self.next_seq;
        self.next_seq += 1;
        let inst = self
            .instances
            .get_mut(id)
            .ok_or_else(|| AllocateError::NotOnHost(id.to_owned()))?;
        match inst.status {
            InstanceStatus::Allocating => return Err(AllocateError::Allocating(id.to_owned())),
            InstanceStatus::Allocated => {
                return Err(AllocateError::AlreadyAllocated(id.to_owned()));
            }
            InstanceStatus::Online => {}
            other => {
                return Err(AllocateError::NotAllocatable {
                    id: id.to_owned(),
                    reason: format!("its status is {other}, not 4 (online)"),
                });
            }
        }
        if inst.release_pending.is_some() {
            return Err(AllocateError::NotAllocatable {
                id: id.to_owned(),
                reason: "the game has not yet acknowledged the release of its previous allocation"
                    .to_owned(),
            });
        }
        if inst.desired != Desired::Running {
            return Err(AllocateError::NotAllocatable {
                id: id.to_owned(),
                reason: format!("it is {}", inst.state),
            });
        }
        if inst.is_arcus() {
            let Some(link) = inst.connected_link() else {
                return Err(AllocateError::NotAllocatable {
                    id: id.to_owned(),
                    reason: "the Arcus link to the game is down".to_owned(),
                });
            };
            if inst.arcus_silent {
                return Err(AllocateError::NotAllocatable {
                    id: id.to_owned(),
                    reason: inst.arcus_error.clone().unwrap_or_default(),
                });
            }
            // Both frames or neither: a half-sent allocation must not be reported as done.
            if link.capacity() < 2 {
                return Err(AllocateError::TimedOut {
                    id: id.to_owned(),
                    reason: QUEUE_FULL.to_owned(),
                });
            }
        }
        let now = unix_now();
        let confirmed_later = inst.confirm_allocation && inst.is_arcus();
        let allocation = PersistedAllocation {
            id: req.allocation_id.clone(),
            at: now,
            game_confirmed: false,
            recovered: false,
        };
        if !confirmed_later {
            // On disk before the game hears of it: refused here, it is refused for good.
            self.journal
                .append(
                    id.to_owned(),
                    InstanceStatus::Allocated,
                    Some(allocation.clone()),
                    req.metadata.clone(),
                )
                .map_err(|source| AllocateError::NotRecorded {
                    id: id.to_owned(),
                    source,
                })?;
        }
        if let Some(link) = inst.connected_link() {
            let _ = link.try_send(Message::Allocated(req.metadata.clone()));
            if let Some(m) = &req.game_metadata {
                let _ = link.try_send(Message::Metadata(m.clone()));
            }
        }
        // Recorded now, not when the game confirms: pairs pushed while it is pending reach the
        // game after `allocated`, so merging them into this copy keeps it equal to what the
        // game was sent.
        inst.metadata = req.metadata;
        if confirmed_later {
            inst.status = InstanceStatus::Allocating;
            let run = inst.run;
            self.schedule(id, run, Timer::ConfirmTimeout { seq }, timeout);
            self.changed(id, false);
            return Ok(Allocated::AwaitingGame {
                seq,
                allocation_id: req.allocation_id,
            });
        }
        inst.status = InstanceStatus::Allocated;
        inst.allocation = Some(allocation);
        tracing::info!(instance_id = %id, "allocated");
        self.changed(id, true);
        Ok(Allocated::Done)
    }

    fn deallocate(
        &mut self,
        id: &str,
        req: DeallocateRequest,
    ) -> Result<InstanceView, InstanceError> {
        let inst = self
            .instances
            .get_mut(id)
            .ok_or_else(|| InstanceError::NotFound(id.to_owned()))?;
        // A match learned from an adopted game has no id here; the controller holds it.
        if let (Some(want), Some(alloc)) = (&req.allocation_id, &inst.allocation)
            && alloc.id.as_ref() != Some(want)
            && !(alloc.id.is_none() && alloc.recovered)
        {
            return Err(InstanceError::Invalid(format!(
                "allocationId {want} is not the instance's allocation ({}); nothing was released",
                alloc
                    .id
                    .as_deref()
                    .unwrap_or("allocated by the game itself")
            )));
        }
        if let Some(p) = inst.pending.take() {
            let _ = p.reply.send(Err(AllocateError::TimedOut {
                id: id.to_owned(),
                reason: "deallocated before the game confirmed".to_owned(),
            }));
        }
        let was_allocated = inst.allocation.take().is_some()
            || matches!(
                inst.status,
                InstanceStatus::Allocating | InstanceStatus::Allocated
            );
        if was_allocated {
            inst.metadata.clear();
            if inst.pid.is_some() {
                inst.status = InstanceStatus::Online;
            }
            let run = inst.run;
            if tell_released(inst) {
                self.schedule(id, run, Timer::ReleaseGrace, RELEASE_GRACE);
            }
            tracing::debug!(instance_id = %id, "deallocated");
            self.changed(id, true);
        }
        Ok(self.instances[id].view())
    }

    fn reachable_link(&self, id: &str) -> Result<&mpsc::Sender<Message>, InstanceError> {
        let inst = self
            .instances
            .get(id)
            .ok_or_else(|| InstanceError::NotFound(id.to_owned()))?;
        if !inst.is_arcus() {
            return Err(InstanceError::Invalid(format!(
                "instance {id} uses management protocol none; the game cannot receive messages"
            )));
        }
        inst.connected_link()
            .ok_or_else(|| InstanceError::Unreachable {
                id: id.to_owned(),
                reason: "the Arcus link to the game is down".to_owned(),
            })
    }

    fn push_metadata(
        &mut self,
        id: &str,
        pairs: Vec<KeyValue>,
    ) -> Result<InstanceView, InstanceError> {
        metadata::validate(&pairs).map_err(|e| InstanceError::Invalid(e.to_string()))?;
        let link = self.reachable_link(id)?;
        link.try_send(Message::Metadata(pairs.clone()))
            .map_err(|_| InstanceError::Unreachable {
                id: id.to_owned(),
                reason: QUEUE_FULL.to_owned(),
            })?;
        let inst = self
            .instances
            .get_mut(id)
            .ok_or_else(|| InstanceError::NotFound(id.to_owned()))?;
        metadata::merge(&mut inst.metadata, pairs);
        self.changed(id, true);
        Ok(self.instances[id].view())
    }

    fn custom_command(
        &mut self,
        id: &str,
        req: CommandRequest,
    ) -> Result<InstanceView, InstanceError> {
        if req.command.is_empty() {
            return Err(InstanceError::Invalid(
                "command must not be empty".to_owned(),
            ));
        }
        let mut data = vec![KeyValue::new("command", req.command)];
        if let Some(a) = req.argument {
            data.push(KeyValue::new("argument", a));
        }
        data.extend(req.data);
        metadata::validate(&data).map_err(|e| InstanceError::Invalid(e.to_string()))?;
        let link = self.reachable_link(id)?;
        link.try_send(Message::CustomCommand(data))
            .map_err(|_| InstanceError::Unreachable {
                id: id.to_owned(),
                reason: QUEUE_FULL.to_owned(),
            })?;
        Ok(self.instances[id].view())
    }

    fn registered(&mut self, host_id: u64) {
        if self.host.host_id == Some(host_id) {
            return;
        }
        self.host.host_id = Some(host_id);
        let host = &self.host;
        // Connected games learn the host id now, others when their link comes up.
        for inst in self.instances.values() {
            if let Some(link) = inst.connected_link() {
                let _ = link.try_send(Message::HostInformation(host_information(host)));
                let _ = link.try_send(Message::InstanceInformation(instance_information(
                    inst, host,
                )));
            }
        }
    }

    fn link_event(&mut self, id: &str, run: u64, event: LinkEvent) {
        let Some(inst) = self.instances.get_mut(id) else {
            return;
        };
        if inst.run != run || inst.pid.is_none() {
            return;
        }
        let mut persist = false;
        let mut grace = false;
        // Changes nobody outside sees (the game confirming what we already report) are saved
        // but neither versioned nor pushed to the controller.
        let mut visible = true;
        match event {
            LinkEvent::Connected => {
                tracing::debug!(instance_id = %id, "Arcus link up");
                inst.arcus_connected = true;
                inst.arcus_silent = false;
                inst.arcus_error = None;
                self.metrics.arcus_connects.inc();
                // A release made while the link was down: the game hears of it now.
                if inst.release_pending.is_some() && tell_released(inst) {
                    self.schedule(id, run, Timer::ReleaseGrace, RELEASE_GRACE);
                }
            }
            LinkEvent::Disconnected { reason } => {
                tracing::info!(instance_id = %id, %reason, "Arcus link down");
                inst.arcus_connected = false;
                inst.arcus_silent = false;
                inst.arcus_error = Some(reason);
            }
            LinkEvent::ProtocolError { reason } => {
                tracing::warn!(instance_id = %id, %reason, "Arcus protocol error; link closed");
                self.metrics.arcus_protocol_errors.inc();
                inst.arcus_connected = false;
                inst.arcus_silent = false;
                inst.arcus_error = Some(reason);
            }
            LinkEvent::NotListening { reason } => {
                if inst.arcus_error.as_deref() == Some(reason.as_str()) {
                    return;
                }
                tracing::warn!(instance_id = %id, %reason, "the game does not accept its Arcus link");
                inst.arcus_error = Some(reason);
            }
            LinkEvent::Silent { reason } => {
                tracing::warn!(instance_id = %id, %reason, "the game does not answer");
                inst.arcus_silent = true;
                inst.arcus_error = Some(reason);
            }
            LinkEvent::Heard => {
                tracing::info!(instance_id = %id, "the game answers again");
                inst.arcus_silent = false;
                inst.arcus_error = None;
            }
            LinkEvent::GamePortOpen => {
                if inst.status == InstanceStatus::Starting {
                    inst.status = InstanceStatus::Online;
                }
            }
            LinkEvent::LiveState(state) => inst.live = Some(state),
            LinkEvent::ReverseMetadata(data) => {
                inst.reverse_metadata = data;
                persist = true;
            }
            LinkEvent::Status(status) => {
                persist = true;
                if status == 5 {
                    inst.game_confirms = true;
                }
                let adopted_free = std::mem::take(&mut inst.adopted_free);
                match (status, inst.status) {
                    // The game's own 4 after it confirmed: the match is over.
                    (4, InstanceStatus::Allocated) => {
                        if inst.allocation.as_ref().is_some_and(|a| a.game_confirmed) {
                            tracing::info!(instance_id = %id, "game ended its match; allocatable again");
                            inst.allocation = None;
                            inst.metadata.clear();
                            inst.status = InstanceStatus::Online;
                        }
                    }
                    (4, InstanceStatus::Allocating) => {}
                    (4, _) => {
                        inst.release_pending = None;
                        inst.status = InstanceStatus::Online;
                    }
                    // The game has not yet heard of the release: its 5 is stale.
                    (5, _) if inst.release_pending.is_some() && inst.pending.is_none() => {
                        inst.game_confirms = true;
                        visible = false;
                    }
                    (5, _) if adopted_free => {
                        tracing::warn!(instance_id = %id, "re-adopted game reports an allocation the agent never acknowledged; releasing it");
                        inst.metadata.clear();
                        grace = tell_released(inst);
                    }
                    (5, InstanceStatus::Allocating) => {
                        if let Some(p) = inst.pending.take() {
                            inst.status = InstanceStatus::Allocated;
                            inst.allocation = Some(PersistedAllocation {
                                id: p.allocation_id,
                                at: unix_now(),
                                game_confirmed: true,
                                recovered: false,
                            });
                            self.changed(id, true);
                            self.answer_journaled(p.reply, id);
                            return;
                        }
                    }
                    (5, InstanceStatus::Allocated) => {
                        if let Some(a) = inst.allocation.as_mut() {
                            a.game_confirmed = true;
                        }
                        visible = false;
                    }
                    (5, _) => {
                        // The game allocated itself (e.g. players joined directly), or a game
                        // found with no record is in the match the controller holds: it is
                        // not free, whatever the controller thinks.
                        if inst.recovered {
                            tracing::info!(instance_id = %id, "an adopted game is in a match; it stays allocated");
                        }
                        inst.status = InstanceStatus::Allocated;
                        inst.allocation = Some(PersistedAllocation {
                            id: None,
                            at: unix_now(),
                            game_confirmed: true,
                            recovered: inst.recovered,
                        });
                    }
                    (3, InstanceStatus::Online) => inst.status = InstanceStatus::Starting,
                    (3, _) => {}
                    (other, _) => {
                        tracing::warn!(instance_id = %id, status = other, "game reported an unknown status; ignored");
                        return;
                    }
                }
                // Only an adopted game's first status can be the match the controller holds.
                inst.recovered = false;
            }
        }
        if grace {
            self.schedule(id, run, Timer::ReleaseGrace, RELEASE_GRACE);
        }
        if visible {
            self.changed(id, persist);
        } else if persist {
            self.schedule_flush();
        }
    }
}

/// Journals a change of what is wanted of `inst`, before anything acts on it: a restarted
/// agent must not start again a game it was told to stop or remove. A change that cannot be
/// written is not made.
fn record_desired(
    journal: &mut Journal,
    inst: &Instance,
    desired: Desired,
) -> Result<(), InstanceError> {
    if inst.desired == desired {
        return Ok(());
    }
    journal
        .append_desired(inst.id.clone(), inst.status, desired)
        .map_err(|source| InstanceError::NotRecorded {
            id: inst.id.clone(),
            source,
        })
}

/// Tells the game its allocation is over. Arcus has no "released" message; the Berth SDK
/// treats this custom command as one. Returns whether the game was told (and so whether its
/// acknowledgement is awaited).
fn tell_released(inst: &mut Instance) -> bool {
    let told = inst.connected_link().is_some_and(|link| {
        link.try_send(Message::CustomCommand(vec![KeyValue::new(
            "command",
            "deallocated",
        )]))
        .is_ok()
    });
    if told || (inst.is_arcus() && inst.pid.is_some()) {
        // Not told because the link is down (e.g. the game was just re-adopted): the game
        // still believes it is allocated and will say so when the link is back. It is told
        // then (see `LinkEvent::Connected`); until it acknowledges, its 5 is stale.
        inst.release_pending = Some(Instant::now());
    }
    told
}

fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || id.starts_with('.')
    {
        return Err(format!(
            "id {id:?} must be 1-64 characters of letters, digits, '-', '_' or '.', not starting with '.'"
        ));
    }
    Ok(())
}

fn validate_profile(p: &Profile, host: &HostFacts) -> Result<(), String> {
    if p.executable.is_empty() {
        return Err("profile.executable must not be empty".to_owned());
    }
    let exe = Path::new(&p.executable);
    if exe.is_absolute() && !exe.is_file() {
        return Err(format!(
            "profile.executable {} does not exist on host {} (or is not a file)",
            p.executable, host.host_name
        ));
    }
    if let Some(dir) = &p.working_dir
        && !Path::new(dir).is_dir()
    {
        return Err(format!(
            "profile.workingDir {dir} is not a directory on host {}",
            host.host_name
        ));
    }
    let vars = |name: &str| template::VARIABLES.contains(&name).then(|| "0".to_owned());
    for (i, a) in p.args.iter().enumerate() {
        template::expand(a, &vars).map_err(|e| format!("profile.args[{i}]: {e}"))?;
    }
    for (k, v) in &p.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(format!(
                "profile.env key {k:?} is not a valid variable name"
            ));
        }
        template::expand(v, &vars).map_err(|e| format!("profile.env.{k}: {e}"))?;
    }
    if p.stop_timeout_seconds > 3600 {
        return Err(format!(
            "profile.stopTimeoutSeconds {} is over 3600",
            p.stop_timeout_seconds
        ));
    }
    Ok(())
}

struct InstVars {
    port: u16,
    management_port: u16,
    id: String,
    fleet_id: Option<u64>,
    application_id: u32,
    build: String,
}

fn inst_vars(inst: &Instance) -> InstVars {
    InstVars {
        port: inst.port,
        management_port: inst.management_port,
        id: inst.id.clone(),
        fleet_id: inst.fleet_id,
        application_id: inst.profile.application_id,
        build: inst.profile.build.clone(),
    }
}

fn template_var(name: &str, v: InstVars, host: &HostFacts) -> Option<String> {
    Some(match name {
        "port" => v.port.to_string(),
        "managementPort" => v.management_port.to_string(),
        "instanceId" => v.id,
        "hostId" => host.host_id.unwrap_or(0).to_string(),
        "hostName" => host.host_name.clone(),
        "region" => host.region.clone(),
        "dcLocation" => host.dc_location.clone(),
        "fleetId" => v.fleet_id.unwrap_or(0).to_string(),
        "applicationId" => v.application_id.to_string(),
        "build" => v.build,
        _ => return None,
    })
}

fn host_information(host: &HostFacts) -> Map<String, Value> {
    let id = host.host_id.unwrap_or(0);
    let v = json!({
        "id": id,
        "serverId": id,
        "serverName": host.host_name,
        "region": host.region,
        "dcLocation": host.dc_location,
        "isVirtual": host.is_virtual,
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn instance_information(inst: &Instance, host: &HostFacts) -> Map<String, Value> {
    let v = json!({
        "fleetId": inst.fleet_id.unwrap_or(0).to_string(),
        "hostId": host.host_id.unwrap_or(0),
        "isVirtual": host.is_virtual,
        "instanceId": inst.id,
        "applicationId": inst.profile.application_id,
        "profile": inst.profile.id,
        "build": inst.profile.build,
        "port": inst.port,
        "managementPort": inst.management_port,
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

pub fn log_path(log_dir: &Path, id: &str) -> PathBuf {
    log_dir.join(format!("{id}.log"))
}

/// For `none` games: online once the game port accepts a TCP connection. Ends when the
/// supervisor drops the sender (new run, exit, removal).
fn probe_game_port(
    id: String,
    run: u64,
    port: u16,
    events: mpsc::Sender<Command>,
) -> mpsc::Sender<Message> {
    let (tx, mut rx) = mpsc::channel::<Message>(1);
    tokio::spawn(async move {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            if matches!(rx.try_recv(), Err(mpsc::error::TryRecvError::Disconnected)) {
                return;
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                let _ = events
                    .send(Command::Link {
                        id,
                        run,
                        event: LinkEvent::GamePortOpen,
                    })
                    .await;
                // Keep the receiver alive until the run ends so sends never fail loudly.
                while rx.recv().await.is_some() {}
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(at: Instant, seq: u64, id: &str) -> Reverse<Due> {
        Reverse(Due {
            at,
            seq,
            id: id.to_owned(),
            run: 1,
            timer: Timer::ReleaseGrace,
        })
    }

    #[test]
    fn timers_come_out_earliest_first_and_in_order_of_setting_when_due_together() {
        let now = Instant::now();
        let mut timers = BinaryHeap::new();
        timers.push(due(now + Duration::from_secs(2), 1, "grace"));
        timers.push(due(now + Duration::from_millis(5), 2, "kill"));
        timers.push(due(now + Duration::from_secs(2), 3, "grace-later-set"));
        timers.push(due(now, 4, "restart"));
        let order: Vec<String> =
            std::iter::from_fn(|| timers.pop().map(|Reverse(d)| d.id)).collect();
        assert_eq!(order, ["restart", "kill", "grace", "grace-later-set"]);
    }
}
