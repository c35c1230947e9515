//! The only module that spawns or signals processes.
//!
//! Games are started in their own session (and so their own process group), with stdout and
//! stderr in a per-instance log file and no other descriptor of the agent, so that killing or
//! restarting the agent never reaches them.
//!
//! Forking the agent itself gets slower with every game it runs: the kernel copies its page
//! tables and its descriptor table (a socket per game) and then closes every inherited
//! descriptor at `exec`, so starting N games costs O(N²). Games are therefore started by a
//! **spawner**: the agent binary run again (`berth-agent spawner`) at start, single-threaded,
//! with a handful of descriptors, that forks and execs on request and reaps its children,
//! reporting their exit codes. If it dies, the agent watches its children through pidfds and
//! starts a new spawner. Re-adopted games (after an agent restart) are watched through pidfds.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_protocol::agent_api::Limits;
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, Interest};
use tokio::sync::{mpsc, oneshot};

/// What to start. Owned and serialisable: it travels to the spawner process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpawnRequest {
    pub executable: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<PathBuf>,
    pub log_path: PathBuf,
    /// Run as this user and group instead of the agent's.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub limits: Limits,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitInfo {
    Code(i32),
    Signal(i32),
    /// Not a child whose status we could read (re-adopted after an agent restart).
    Unknown,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot open log file {path}: {source}")]
    LogFile { path: PathBuf, source: io::Error },
    #[error("cannot start {executable}: {source}")]
    Exec {
        executable: PathBuf,
        source: io::Error,
    },
    #[error("{0}")]
    Spawner(String),
}

/// A process we started or re-adopted, identified by pid and kernel start time (pids are
/// reused; the pair is not).
#[derive(Debug)]
pub struct Process {
    pub pid: u32,
    pub start_time: u64,
    exit: ExitSource,
}

#[derive(Debug)]
enum ExitSource {
    /// The spawner reaps it and reports its exit.
    Spawner(oneshot::Receiver<ExitInfo>),
    /// Our own child: pidfd to wait, then waitpid for the status.
    Child(Option<OwnedFd>),
    /// Someone else's child now: pidfd to wait; the status is not ours to read.
    Adopted(Option<OwnedFd>),
}

impl Process {
    /// Waits until the process has exited.
    pub async fn wait(self) -> ExitInfo {
        match self.exit {
            ExitSource::Spawner(rx) => match rx.await {
                Ok(exit) => exit,
                // The spawner died; it handed the process to a pidfd watcher, which reports.
                Err(_) => ExitInfo::Unknown,
            },
            ExitSource::Child(fd) => {
                wait_pidfd(fd, self.pid, self.start_time).await;
                reap(self.pid).await
            }
            ExitSource::Adopted(fd) => {
                wait_pidfd(fd, self.pid, self.start_time).await;
                ExitInfo::Unknown
            }
        }
    }
}

/// Starts a game directly from this process (what the spawner does, and the fallback when
/// there is no spawner). Returns the pid.
pub fn spawn_direct(req: &SpawnRequest) -> Result<u32, SpawnError> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&req.log_path)
        .map_err(|source| SpawnError::LogFile {
            path: req.log_path.clone(),
            source,
        })?;
    let log_err = log.try_clone().map_err(|source| SpawnError::LogFile {
        path: req.log_path.clone(),
        source,
    })?;
    let mut cmd = Command::new(&req.executable);
    cmd.args(&req.args)
        // The agent's environment may hold tokens; games get only what the profile says.
        .env_clear()
        .envs(req.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    if let Some(dir) = &req.working_dir {
        cmd.current_dir(dir);
    }
    if let Some(gid) = req.gid {
        cmd.gid(gid);
    }
    if let Some(uid) = req.uid {
        // std drops supplementary groups when root switches uid.
        cmd.uid(uid);
    }
    let limits = req.limits.clone();
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe system calls close_range(2), setsid(2), prctl(2) and setrlimit(2); it
    // allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // A game gets stdin, stdout and stderr and nothing else of ours: any other
            // descriptor (one a parent leaked to the agent, the spawner's socket) is closed at
            // exec. Marked rather than closed, so that std still hears of a failed exec. On
            // kernels before 5.11 this fails, and only Berth's own descriptors, all opened
            // close-on-exec, are kept from the game.
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            // Own session and process group: a signal to the agent's group or session (Ctrl-C,
            // systemd stopping the agent) never reaches the game.
            nix::unistd::setsid().map_err(io::Error::from)?;
            // Under systemd the agent holds ambient CAP_SETUID/CAP_SETGID/CAP_KILL; a game
            // must not inherit them. Fails harmlessly on kernels without ambient capabilities.
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            );
            apply_limits(&limits)
        });
    }
    let child = cmd.spawn().map_err(|source| SpawnError::Exec {
        executable: req.executable.clone(),
        source,
    })?;
    // The std handle is dropped without waiting: whoever spawned reaps the child.
    Ok(child.id())
}

fn apply_limits(limits: &Limits) -> io::Result<()> {
    let set = |res, v: Option<u64>| -> io::Result<()> {
        if let Some(v) = v {
            setrlimit(res, v, v).map_err(io::Error::from)?;
        }
        Ok(())
    };
    set(Resource::RLIMIT_NOFILE, limits.open_files)?;
    set(Resource::RLIMIT_AS, limits.address_space_bytes)?;
    set(Resource::RLIMIT_CORE, limits.core_bytes)?;
    set(Resource::RLIMIT_NPROC, limits.processes)?;
    Ok(())
}

/// Takes back a process recorded before an agent restart, if the same process (pid and start
/// time) is still alive.
pub fn adopt(pid: u32, start_time: u64) -> Option<Process> {
    if pid == 0 || start_time == 0 {
        return None;
    }
    let pidfd = pidfd_open(pid).ok();
    // Checked after opening the pidfd: if the start time matches now, the pidfd pins the
    // process we recorded and not a later one with a recycled pid.
    let s = stat(pid)?;
    if s.start_time != start_time || s.state == 'Z' || s.state == 'X' {
        return None;
    }
    Some(Process {
        pid,
        start_time,
        exit: ExitSource::Adopted(pidfd),
    })
}

async fn wait_pidfd(fd: Option<OwnedFd>, pid: u32, start_time: u64) {
    match fd {
        // SAFETY: an OwnedFd is open for as long as it lives and always returns the same
        // descriptor from as_raw_fd; the AsyncFd owns it until it is dropped.
        Some(fd) => match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
            Ok(afd) => {
                // A pidfd becomes readable once the process has terminated.
                let _ = afd.readable().await;
            }
            Err(_) => poll_exit(pid, start_time).await,
        },
        None => poll_exit(pid, start_time).await,
    }
}

async fn reap(pid: u32) -> ExitInfo {
    loop {
        match waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return ExitInfo::Code(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return ExitInfo::Signal(sig as i32),
            Ok(WaitStatus::StillAlive) => tokio::time::sleep(Duration::from_millis(5)).await,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return ExitInfo::Unknown,
        }
    }
}

/// For kernels without pidfd: check every half second.
async fn poll_exit(pid: u32, start_time: u64) {
    loop {
        match stat(pid) {
            Some(s) if s.start_time == start_time && s.state != 'Z' && s.state != 'X' => {}
            _ => return,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Kills what is left of a game's process group right after its leader exited: a helper it
/// started must not keep its ports or its Arcus listener from the restart (systemd does the
/// same with a service's cgroup). Nothing left (ESRCH) is the usual case. Never falls back to
/// the pid alone, and never called for a game that ended while the agent was down: only now,
/// while the group still exists or its id was freed a moment ago, can it name no other group.
pub fn kill_group_remains(pgid: u32) {
    let _ = kill(Pid::from_raw(-(pgid as i32)), Signal::SIGKILL);
}

/// Signals the whole process group of a game (its pid is its group id, from `setsid`).
pub fn signal_group(pid: u32, signal: Signal) -> nix::Result<()> {
    match kill(Pid::from_raw(-(pid as i32)), signal) {
        // The leader may have called setpgid itself; fall back to the process alone.
        Err(nix::errno::Errno::ESRCH) => kill(Pid::from_raw(pid as i32), signal),
        other => other,
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; it touches
    // no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Fields of `/proc/<pid>/stat` the agent needs.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub state: char,
    /// The session's id: a game, started in a session of its own, leads it.
    pub session: u32,
    /// Clock ticks after boot at which the process started.
    pub start_time: u64,
}

/// What one pass over `/proc` found of instances whose recorded game is gone.
#[derive(Debug, Default)]
pub struct Unrecorded {
    /// Each instance's running game, found by its instance id.
    pub games: HashMap<String, Process>,
    /// Processes of those instances whose game has ended (helpers it started, in a session
    /// nothing leads any more), with their instance: what [`kill_group_remains`] would have
    /// killed had the agent seen that game end.
    pub remains: Vec<(String, u32)>,
}

/// Visits every process that `wanted` keeps by its stat and whose environment names an
/// instance (`BERTH_INSTANCE_ID`): its pid, stat, instance id and whole environment. One pass
/// over `/proc`; an environment is read only for a process `wanted` keeps.
fn scan_games(wanted: impl Fn(u32, &Stat) -> bool, mut visit: impl FnMut(u32, &Stat, &str, &[u8])) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(s) = stat(pid).filter(|s| wanted(pid, s)) else {
            continue;
        };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if let Some(id) = env_value(&environ, "BERTH_INSTANCE_ID") {
            visit(pid, &s, id, &environ);
        }
    }
}

/// One variable of a NUL-separated environment block, if it is there and UTF-8.
fn env_value<'a>(environ: &'a [u8], key: &str) -> Option<&'a str> {
    environ
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(key.as_bytes())?.strip_prefix(b"="))
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Finds running games of `ids` whose pid the agent never recorded: it was stopped after
/// starting them and before their pid reached its state file (or while the disk took no
/// writes). A game is the leader of a session of its own, and its environment names its
/// instance (`BERTH_INSTANCE_ID`, which instance ids, UUIDs, make unique even with several
/// agents on one machine). Of two live ones, the older is the game: a helper that left the
/// game's session (`setsid`) leads one of its own and came later (one left by a game that
/// ended while the agent ran was killed then, see [`kill_leavers`]). Processes with such an id
/// in a session whose leader is gone are the remains of a game that ended while the agent was
/// down. One pass over `/proc`, at start only.
pub fn find_unrecorded(ids: &std::collections::HashSet<&str>) -> Unrecorded {
    let mut found = Unrecorded::default();
    if ids.is_empty() {
        return found;
    }
    scan_games(
        |_, _| true,
        |pid, s, id, _| {
            if !ids.contains(id) {
                return;
            }
            if s.session != pid {
                // Its session's leader (the game that started it) is gone, not merely elsewhere;
                // a leader not yet reaped by whoever inherited it is gone too.
                let leader = stat(s.session);
                if leader.is_none_or(|l| l.session != s.session || matches!(l.state, 'Z' | 'X')) {
                    found.remains.push((id.to_owned(), pid));
                }
                return;
            }
            // Started in the same clock tick (10 ms): the lower pid, as pids are handed out
            // in order.
            if found
                .games
                .get(id)
                .is_some_and(|p| (p.start_time, p.pid) <= (s.start_time, pid))
            {
                return;
            }
            // `adopt` refuses a process that has ended (a zombie).
            if let Some(p) = adopt(pid, s.start_time) {
                found.games.insert(id.to_owned(), p);
            }
        },
    );
    found
}

/// A running game the agent has no record of, found by its environment.
#[derive(Debug)]
pub struct Orphan {
    pub id: String,
    pub process: Process,
    /// `BERTH_AGENT_RECORD`, as the agent wrote it when it started the game.
    pub record: String,
    /// `BERTH_PORT` and `BERTH_MANAGEMENT_PORT`.
    pub port: u16,
    pub management_port: u16,
}

/// Finds running games with an agent's record (`BERTH_AGENT_RECORD`) whose instance is not in
/// `known`, owned by `uid` (the games' user): candidates for an agent whose state was lost (a
/// wiped or replaced `state_dir`, a corrupt state file moved away) while they ran; the caller
/// keeps those whose record names its `state_dir`. A game is a session leader; of two live ones
/// with one instance id, the older (see [`find_unrecorded`]). One pass over `/proc`, at start
/// only.
pub fn find_orphans(known: &std::collections::HashSet<&str>, uid: u32) -> Vec<Orphan> {
    use std::os::unix::fs::MetadataExt;
    // By instance id: the candidate's start time, with what the orphan will hold.
    let mut found: HashMap<String, (u64, u32, String, u16, u16)> = HashMap::new();
    let leader = |pid: u32, s: &Stat| s.session == pid && !matches!(s.state, 'Z' | 'X');
    scan_games(leader, |pid, s, id, environ| {
        if known.contains(id) {
            return;
        }
        let port = |key| env_value(environ, key).and_then(|p| p.parse::<u16>().ok());
        let (Some(record), Some(game), Some(management)) = (
            env_value(environ, "BERTH_AGENT_RECORD"),
            port("BERTH_PORT"),
            port("BERTH_MANAGEMENT_PORT"),
        ) else {
            return;
        };
        if std::fs::metadata(format!("/proc/{pid}"))
            .ok()
            .map(|m| m.uid())
            != Some(uid)
        {
            return;
        }
        if found
            .get(id)
            .is_some_and(|(t, p, ..)| (*t, *p) <= (s.start_time, pid))
        {
            return;
        }
        let record = record.to_owned();
        found.insert(id.to_owned(), (s.start_time, pid, record, game, management));
    });
    found
        .into_iter()
        .filter_map(|(id, (start_time, pid, record, port, management_port))| {
            Some(Orphan {
                id,
                process: adopt(pid, start_time)?,
                record,
                port,
                management_port,
            })
        })
        .collect()
}

/// Kills one process [`find_unrecorded`] found left over from an ended game.
pub fn kill_remain(pid: u32) {
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
}

/// A game that ended, and the clock tick (as `/proc` start times count them) by which it had.
#[derive(Debug, Clone)]
pub struct Ended {
    pub id: String,
    /// The game's own start time: whatever it started came later.
    pub started: u64,
    /// Now, when its end was seen; its restart comes later (the first after 250 ms).
    pub by: u64,
}

/// Kills what an ended game left outside its process group, which [`kill_group_remains`]
/// misses: processes with its instance id that started during its run and left its session
/// (`setsid`, a daemon's double fork), holding its ports and files against the restart. A
/// process that started after the end seen is a restart's, and is left. One pass over
/// `/proc`; returns the pids killed.
pub fn kill_leavers(ended: &Ended) -> Vec<u32> {
    let mut killed = Vec::new();
    let during = |_: u32, s: &Stat| {
        !matches!(s.state, 'Z' | 'X') && (ended.started..=ended.by).contains(&s.start_time)
    };
    scan_games(during, |pid, _, id, _| {
        if id == ended.id {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            killed.push(pid);
        }
    });
    killed
}

/// The clock tick now, as `/proc/<pid>/stat` counts start times (since boot); `None` when
/// `/proc/uptime` cannot be read.
pub fn now_ticks() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    let per_sec = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)? as f64;
    // Rounded up: a process started in this tick is counted as before the end.
    Some((secs * per_sec).ceil() as u64)
}

pub fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<Stat> {
    // The command name (field 2) may contain spaces and parentheses; the fields after the
    // last ')' are unambiguous.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields 4 (ppid), 5 (pgrp), 6 (session).
    let session = fields.nth(2)?.parse().ok()?;
    // Field 22 (starttime) is the 16th after the session.
    let start_time = fields.nth(15)?.parse().ok()?;
    Some(Stat {
        state,
        session,
        start_time,
    })
}

/// Raises our open-file limit to the hard limit: every game costs the agent a socket.
pub fn raise_nofile_limit() {
    if let Ok((soft, hard)) = nix::sys::resource::getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

// ----- the spawner ----------------------------------------------------------------------------

/// The subcommand that runs the spawner.
pub const SPAWNER_ARG: &str = "spawner";
/// The descriptor on which the spawner finds its socket.
const SPAWNER_FD: i32 = 3;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ToSpawner {
    id: u64,
    request: SpawnRequest,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum FromSpawner {
    Spawned { id: u64, pid: u32 },
    Failed { id: u64, error: String },
    Exited { pid: u32, exit: ExitInfo },
}

/// The spawner process's main loop: requests in on fd 3, replies and exits out on it. Ends
/// when the agent closes its end (the agent exited): games are not its to stop.
pub fn spawner_main() -> i32 {
    // SAFETY: the agent starts us with the socketpair end on fd 3 and nothing else owns it.
    // fcntl(2) only sets that descriptor's close-on-exec flag: every game would otherwise
    // inherit the socket and hold it open, and the agent, never reading end-of-file, would
    // not notice this process die (the exits of its games unreported, spawns unanswered).
    let sock = unsafe {
        libc::fcntl(SPAWNER_FD, libc::F_SETFD, libc::FD_CLOEXEC);
        StdUnixStream::from_raw_fd(SPAWNER_FD)
    };
    let Ok(write_half) = sock.try_clone() else {
        return 1;
    };
    let out = Arc::new(Mutex::new(write_half));
    let send = |out: &Mutex<StdUnixStream>, msg: &FromSpawner| {
        let mut line = serde_json::to_vec(msg).unwrap_or_default();
        line.push(b'\n');
        // A poisoned lock only means another thread panicked mid-write; keep going.
        let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
        w.write_all(&line).is_ok()
    };
    {
        let out = out.clone();
        std::thread::spawn(move || {
            loop {
                match waitpid(Pid::from_raw(-1), None) {
                    Ok(WaitStatus::Exited(pid, code)) => {
                        let msg = FromSpawner::Exited {
                            pid: pid.as_raw() as u32,
                            exit: ExitInfo::Code(code),
                        };
                        if !send(&out, &msg) {
                            return;
                        }
                    }
                    Ok(WaitStatus::Signaled(pid, sig, _)) => {
                        let msg = FromSpawner::Exited {
                            pid: pid.as_raw() as u32,
                            exit: ExitInfo::Signal(sig as i32),
                        };
                        if !send(&out, &msg) {
                            return;
                        }
                    }
                    // No children yet: nothing to reap.
                    Err(nix::errno::Errno::ECHILD) => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    _ => {}
                }
            }
        });
    }
    for line in BufReader::new(sock).lines() {
        let Ok(line) = line else { break };
        let Ok(msg) = serde_json::from_str::<ToSpawner>(&line) else {
            continue;
        };
        // Spawn and reply under the writer lock, so that the reaper cannot report this
        // child's exit before the agent has heard that it started.
        let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
        let reply = match spawn_direct(&msg.request) {
            Ok(pid) => FromSpawner::Spawned { id: msg.id, pid },
            Err(e) => FromSpawner::Failed {
                id: msg.id,
                error: e.to_string(),
            },
        };
        let mut bytes = serde_json::to_vec(&reply).unwrap_or_default();
        bytes.push(b'\n');
        if w.write_all(&bytes).is_err() {
            break;
        }
    }
    0
}

type SpawnReply = oneshot::Sender<Result<Process, SpawnError>>;

/// Starts games through the spawner process (or directly when there is none).
#[derive(Debug, Clone)]
pub struct Spawner {
    tx: Option<mpsc::UnboundedSender<(SpawnRequest, SpawnReply)>>,
}

impl Spawner {
    /// Starts the spawner process from our own executable.
    pub fn start() -> Self {
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "no spawner: starting games directly");
                return Self::direct();
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(client(exe, rx));
        Self { tx: Some(tx) }
    }

    /// Starts games from the agent process itself (tests, or no spawner available).
    pub fn direct() -> Self {
        Self { tx: None }
    }

    pub async fn spawn(&self, req: SpawnRequest) -> Result<Process, SpawnError> {
        let Some(tx) = &self.tx else {
            return spawn_here(req).await;
        };
        let (reply, rx) = oneshot::channel();
        if tx.send((req.clone(), reply)).is_err() {
            return spawn_here(req).await;
        }
        rx.await
            .unwrap_or_else(|_| Err(SpawnError::Spawner("the spawner stopped".to_owned())))
    }
}

async fn spawn_here(req: SpawnRequest) -> Result<Process, SpawnError> {
    let pid = tokio::task::spawn_blocking(move || spawn_direct(&req))
        .await
        .map_err(|e| SpawnError::Spawner(e.to_string()))??;
    // Our unreaped child cannot have its pid reused, so this pidfd is for the right process.
    let pidfd = pidfd_open(pid).ok();
    Ok(Process {
        pid,
        start_time: stat(pid).map_or(0, |s| s.start_time),
        exit: ExitSource::Child(pidfd),
    })
}

fn start_spawner(
    exe: &std::path::Path,
) -> io::Result<(tokio::net::UnixStream, std::process::Child)> {
    let (ours, theirs) = StdUnixStream::pair()?;
    let theirs: OwnedFd = theirs.into();
    let raw = theirs.into_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.arg(SPAWNER_ARG)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // SAFETY: runs in the forked child before exec; dup2(2) is async-signal-safe. It puts the
    // socket on the fd the spawner expects, without the close-on-exec flag.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, SPAWNER_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn();
    // SAFETY: `raw` came from into_raw_fd above and is closed exactly once, here, in the parent.
    unsafe { libc::close(raw) };
    let child = child?;
    ours.set_nonblocking(true)?;
    Ok((tokio::net::UnixStream::from_std(ours)?, child))
}

/// The agent side of the spawner: sends requests, matches replies, delivers exits. Restarts
/// the spawner if it dies, handing its live children to pidfd watchers.
async fn client(exe: PathBuf, mut rx: mpsc::UnboundedReceiver<(SpawnRequest, SpawnReply)>) {
    let mut next_id = 0u64;
    loop {
        let (stream, mut child) = match start_spawner(&exe) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the spawner; starting games directly");
                while let Some((req, reply)) = rx.recv().await {
                    let _ = reply.send(spawn_here(req).await);
                }
                return;
            }
        };
        let (read, mut write) = stream.into_split();
        let mut lines = tokio::io::BufReader::new(read).lines();
        let mut pending: HashMap<u64, SpawnReply> = HashMap::new();
        let mut exits: HashMap<u32, oneshot::Sender<ExitInfo>> = HashMap::new();
        let mut start_times: HashMap<u32, u64> = HashMap::new();
        loop {
            tokio::select! {
                req = rx.recv() => {
                    let Some((request, reply)) = req else { return };
                    next_id += 1;
                    let mut line = serde_json::to_vec(&ToSpawner { id: next_id, request }).unwrap_or_default();
                    line.push(b'\n');
                    if write.write_all(&line).await.is_err() {
                        let _ = reply.send(Err(SpawnError::Spawner("the spawner stopped".to_owned())));
                        break;
                    }
                    pending.insert(next_id, reply);
                }
                line = lines.next_line() => {
                    let Ok(Some(line)) = line else { break };
                    match serde_json::from_str::<FromSpawner>(&line) {
                        Ok(FromSpawner::Spawned { id, pid }) => {
                            let (tx, exit_rx) = oneshot::channel();
                            exits.insert(pid, tx);
                            let start_time = stat(pid).map_or(0, |s| s.start_time);
                            start_times.insert(pid, start_time);
                            if let Some(reply) = pending.remove(&id) {
                                let _ = reply.send(Ok(Process { pid, start_time, exit: ExitSource::Spawner(exit_rx) }));
                            }
                        }
                        Ok(FromSpawner::Failed { id, error }) => {
                            if let Some(reply) = pending.remove(&id) {
                                let _ = reply.send(Err(SpawnError::Spawner(error)));
                            }
                        }
                        Ok(FromSpawner::Exited { pid, exit }) => {
                            start_times.remove(&pid);
                            if let Some(tx) = exits.remove(&pid) {
                                let _ = tx.send(exit);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "unreadable message from the spawner"),
                    }
                }
            }
        }
        // The spawner is gone: its children now belong to init. Watch them by pidfd.
        tracing::error!("the spawner stopped; watching its games by pidfd and starting a new one");
        let _ = child.kill();
        let _ = child.wait();
        for (_, reply) in pending.drain() {
            let _ = reply.send(Err(SpawnError::Spawner("the spawner stopped".to_owned())));
        }
        for (pid, tx) in exits.drain() {
            let start_time = start_times.get(&pid).copied().unwrap_or(0);
            if let Some(p) = adopt(pid, start_time) {
                tokio::spawn(async move {
                    let _ = tx.send(p.wait().await);
                });
            } else {
                let _ = tx.send(ExitInfo::Unknown);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_names() {
        let line = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let s = parse_stat(line).expect("parse");
        assert_eq!(s.state, 'S');
        assert_eq!(s.session, 1234);
        assert_eq!(s.start_time, 987654);
    }

    /// A game the agent started and never recorded is found by the instance id in its
    /// environment, as the leader of its own session; a process of another instance, or one
    /// that leads no session, is not.
    #[test]
    fn unrecorded_games_are_found_by_their_instance_id() {
        let id = uuid::Uuid::new_v4().to_string();
        let other = uuid::Uuid::new_v4().to_string();
        let start = |id: &str, own_session: bool| {
            let mut cmd = if own_session {
                let mut c = Command::new("setsid");
                c.args(["sleep", "30"]);
                c
            } else {
                let mut c = Command::new("sleep");
                c.arg("30");
                c
            };
            cmd.env("BERTH_INSTANCE_ID", id)
                .spawn()
                .expect("a test process")
        };
        let mut game = start(&id, true);
        wait_leading(game.id());
        // A helper the game started that left its session: it leads one of its own, later.
        let mut helper = later(game.id(), || start(&id, true));
        // Of ours, but in the test runner's session: neither its game nor a remain of one.
        let mut child = start(&id, false);
        let mut stranger = start(&other, true);
        wait_leading(helper.id());
        let ids = std::collections::HashSet::from([id.as_str()]);
        let found = find_unrecorded(&ids);
        for p in [&mut game, &mut helper, &mut child, &mut stranger] {
            let _ = p.kill();
            let _ = p.wait();
        }
        assert_eq!(found.games.len(), 1, "{found:?}");
        assert_eq!(found.games[&id].pid, game.id());
        assert!(
            found.remains.iter().all(|(i, _)| *i == id),
            "none of the stranger's: {found:?}"
        );
    }

    /// A process started by `spawn` in a later clock tick than `first` (retried until it is),
    /// so that the two cannot be told apart by their pids alone.
    fn later(first: u32, spawn: impl Fn() -> std::process::Child) -> std::process::Child {
        let first = stat(first).expect("the first process").start_time;
        loop {
            let mut p = spawn();
            if stat(p.id()).is_some_and(|s| s.start_time > first) {
                return p;
            }
            let _ = p.kill();
            let _ = p.wait();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits until `setsid` has made `pid` the leader of its own session (it then execs).
    fn wait_leading(pid: u32) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while stat(pid).is_none_or(|s| s.session != pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "{pid} never led a session"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Leading its session, `setsid` execs `sleep`; its environment stays.
    }

    /// An agent that lost its state finds the games whose record it wrote: the game, not a
    /// helper that left its session, and not a game of an instance it knows.
    #[test]
    fn orphans_are_found_by_their_record() {
        let (id, known_id) = (
            uuid::Uuid::new_v4().to_string(),
            uuid::Uuid::new_v4().to_string(),
        );
        let start = |id: &str| {
            Command::new("setsid")
                .args(["sleep", "30"])
                .env("BERTH_INSTANCE_ID", id)
                .env("BERTH_PORT", "20001")
                .env("BERTH_MANAGEMENT_PORT", "30001")
                .env("BERTH_AGENT_RECORD", r#"{"stateDir":"/var/lib/x"}"#)
                .spawn()
                .expect("a test process")
        };
        let mut game = start(&id);
        wait_leading(game.id());
        let mut helper = later(game.id(), || start(&id));
        let mut known = start(&known_id);
        wait_leading(helper.id());
        wait_leading(known.id());
        let uid = nix::unistd::geteuid().as_raw();
        let found = find_orphans(&std::collections::HashSet::from([known_id.as_str()]), uid);
        let other_user = find_orphans(&std::collections::HashSet::new(), uid + 1);
        for p in [&mut game, &mut helper, &mut known] {
            let _ = p.kill();
            let _ = p.wait();
        }
        let ours: Vec<&Orphan> = found.iter().filter(|o| o.id == id).collect();
        assert_eq!(ours.len(), 1, "{found:?}");
        assert_eq!(ours[0].process.pid, game.id(), "{found:?}");
        assert_eq!((ours[0].port, ours[0].management_port), (20001, 30001));
        assert_eq!(ours[0].record, r#"{"stateDir":"/var/lib/x"}"#);
        assert!(found.iter().all(|o| o.id != known_id), "{found:?}");
        assert!(
            other_user.iter().all(|o| o.id != id),
            "another user's games are not ours: {other_user:?}"
        );
    }

    /// A process of an instance in a session whose leader (the game) is gone is a remain; one
    /// whose game still runs is part of that game.
    #[test]
    fn the_remains_of_an_ended_game_are_found() {
        let id = uuid::Uuid::new_v4().to_string();
        // The game leads its session and has started a helper in it.
        let mut game = Command::new("setsid")
            .args(["sh", "-c", "sleep 31 & exec sleep 30"])
            .env("BERTH_INSTANCE_ID", &id)
            .spawn()
            .expect("a test game");
        let ids = std::collections::HashSet::from([id.as_str()]);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let scan = |want: &dyn Fn(&Unrecorded) -> bool| loop {
            let found = find_unrecorded(&ids);
            if want(&found) || std::time::Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // Once the shell has become `sleep 30`, it has started the helper.
        let became_game = |f: &Unrecorded| {
            f.games.get(&id).is_some_and(|p| {
                std::fs::read_to_string(format!("/proc/{}/comm", p.pid))
                    .is_ok_and(|c| c.trim() == "sleep")
            })
        };
        let found = scan(&|f| became_game(f) && f.remains.is_empty());
        assert!(found.games.contains_key(&id), "{found:?}");
        assert!(found.remains.is_empty(), "the game runs: {found:?}");
        let leader = found.games[&id].pid;

        let _ = game.kill();
        let _ = game.wait();
        let found = scan(&|f| !f.remains.is_empty());
        assert!(found.games.is_empty(), "{found:?}");
        assert_eq!(found.remains.len(), 1, "the helper: {found:?}");
        let (of, helper) = found.remains[0].clone();
        assert_eq!(of, id);
        assert_ne!(helper, leader);
        kill_remain(helper);
        let gone = scan(&|f| f.remains.is_empty());
        assert!(gone.remains.is_empty(), "{gone:?}");
    }

    #[test]
    fn own_stat_is_readable() {
        let s = stat(std::process::id()).expect("self");
        assert!(s.start_time > 0);
    }

    #[tokio::test]
    async fn spawn_wait_and_adopt() {
        let dir = std::env::temp_dir().join(format!("berth-proc-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let log = dir.join("x.log");
        let req = SpawnRequest {
            executable: "/bin/sh".into(),
            args: vec!["-c".into(), "echo hello; exit 3".into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            working_dir: None,
            log_path: log.clone(),
            uid: None,
            gid: None,
            limits: Limits::default(),
        };
        let spawner = Spawner::direct();
        let p = spawner.spawn(req.clone()).await.expect("spawn");
        let (pid, start) = (p.pid, p.start_time);
        assert_eq!(p.wait().await, ExitInfo::Code(3));
        assert!(
            adopt(pid, start).is_none(),
            "a reaped process cannot be adopted"
        );
        assert_eq!(std::fs::read_to_string(&log).expect("log"), "hello\n");

        let req = SpawnRequest {
            args: vec!["-c".into(), "sleep 30".into()],
            ..req
        };
        let p = spawner.spawn(req).await.expect("spawn");
        let again = adopt(p.pid, p.start_time).expect("alive");
        assert!(matches!(again.exit, ExitSource::Adopted(_)));
        assert!(
            adopt(p.pid, p.start_time + 1).is_none(),
            "start time must match"
        );
        signal_group(p.pid, Signal::SIGKILL).expect("kill");
        assert_eq!(p.wait().await, ExitInfo::Signal(libc::SIGKILL));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
