//! The only module that spawns or signals processes.
//!
//! Games are started in their own session (and so their own process group), with stdout and
//! stderr in a per-instance log file and no other descriptor of the agent, so that killing or
//! restarting the agent never reaches them. Each process is pinned by a pidfd: exits are
//! noticed without polling, and a re-adopted process (no longer our child) is watched the same
//! way as one we spawned.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_protocol::agent_api::Limits;
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::config::RunAs;

/// What to start.
#[derive(Debug)]
pub struct SpawnSpec<'a> {
    pub executable: &'a Path,
    pub args: &'a [String],
    pub env: &'a [(String, String)],
    pub working_dir: Option<&'a Path>,
    pub log_path: &'a Path,
    pub run_as: Option<&'a RunAs>,
    pub limits: &'a Limits,
}

/// A process we started or re-adopted, identified by pid and kernel start time (pids are
/// reused; the pair is not).
#[derive(Debug)]
pub struct Process {
    pub pid: u32,
    pub start_time: u64,
    /// True for our own children, which we must reap and whose exit code we can read.
    pub is_child: bool,
    pidfd: Option<OwnedFd>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    Code(i32),
    Signal(i32),
    /// Not our child (re-adopted after an agent restart): the kernel does not tell us.
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
}

/// Starts a game process in a new session with its output in `log_path`.
pub fn spawn(spec: &SpawnSpec<'_>) -> Result<Process, SpawnError> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(spec.log_path)
        .map_err(|source| SpawnError::LogFile {
            path: spec.log_path.to_owned(),
            source,
        })?;
    let log_err = log.try_clone().map_err(|source| SpawnError::LogFile {
        path: spec.log_path.to_owned(),
        source,
    })?;
    let mut cmd = Command::new(spec.executable);
    cmd.args(spec.args)
        // The agent's environment may hold tokens; games get only what the profile says.
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    if let Some(dir) = spec.working_dir {
        cmd.current_dir(dir);
    }
    if let Some(user) = spec.run_as {
        // std drops supplementary groups when root switches uid.
        cmd.uid(user.uid).gid(user.gid);
    }
    let limits = spec.limits.clone();
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe system calls setsid(2), prctl(2) and setrlimit(2); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
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
        executable: spec.executable.to_owned(),
        source,
    })?;
    let pid = child.id();
    // The std handle is dropped without waiting: the pidfd watcher reaps the child.
    drop(child);
    // Our unreaped child cannot have its pid reused, so this pidfd is for the right process.
    let pidfd = pidfd_open(pid).ok();
    let start_time = stat(pid).map(|s| s.start_time).unwrap_or(0);
    Ok(Process {
        pid,
        start_time,
        is_child: true,
        pidfd,
    })
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
        is_child: false,
        pidfd,
    })
}

impl Process {
    /// Waits until the process has exited, reaping it if it is our child.
    pub async fn wait(self) -> ExitInfo {
        match self.pidfd {
            // SAFETY: an OwnedFd is open for as long as it lives and always returns the same
            // descriptor from as_raw_fd; the AsyncFd owns it until it is dropped.
            Some(fd) => match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
                Ok(afd) => {
                    // A pidfd becomes readable once the process has terminated.
                    let _ = afd.readable().await;
                }
                Err(_) => poll_exit(self.pid, self.start_time).await,
            },
            None => poll_exit(self.pid, self.start_time).await,
        }
        if !self.is_child {
            return ExitInfo::Unknown;
        }
        loop {
            match waitpid(Pid::from_raw(self.pid as i32), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return ExitInfo::Code(code),
                Ok(WaitStatus::Signaled(_, sig, _)) => return ExitInfo::Signal(sig as i32),
                Ok(WaitStatus::StillAlive) => tokio::time::sleep(Duration::from_millis(5)).await,
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return ExitInfo::Unknown,
            }
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
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    debug_assert!(fd.as_raw_fd() >= 0);
    Ok(fd)
}

/// Fields of `/proc/<pid>/stat` the agent needs.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub state: char,
    /// Clock ticks after boot at which the process started.
    pub start_time: u64,
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
    // Field 22 (starttime) is the 20th after the state (field 3).
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(Stat { state, start_time })
}

/// Raises our open-file limit to the hard limit: every game costs the agent a pidfd and a
/// socket.
pub fn raise_nofile_limit() {
    if let Ok((soft, hard)) = nix::sys::resource::getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
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
        assert_eq!(s.start_time, 987654);
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
        let env = vec![("PATH".to_owned(), "/usr/bin:/bin".to_owned())];
        let args = vec!["-c".to_owned(), "echo hello; exit 3".to_owned()];
        let spec = SpawnSpec {
            executable: Path::new("/bin/sh"),
            args: &args,
            env: &env,
            working_dir: None,
            log_path: &log,
            run_as: None,
            limits: &Limits::default(),
        };
        let p = spawn(&spec).expect("spawn");
        assert!(p.is_child);
        let (pid, start) = (p.pid, p.start_time);
        assert_eq!(p.wait().await, ExitInfo::Code(3));
        assert!(
            adopt(pid, start).is_none(),
            "a reaped process cannot be adopted"
        );
        assert_eq!(std::fs::read_to_string(&log).expect("log"), "hello\n");

        let args = vec!["-c".to_owned(), "sleep 30".to_owned()];
        let spec = SpawnSpec {
            args: &args,
            ..spec
        };
        let p = spawn(&spec).expect("spawn");
        let again = adopt(p.pid, p.start_time).expect("alive");
        assert!(!again.is_child);
        assert!(
            adopt(p.pid, p.start_time + 1).is_none(),
            "start time must match"
        );
        signal_group(p.pid, Signal::SIGKILL).expect("kill");
        assert_eq!(p.wait().await, ExitInfo::Signal(libc::SIGKILL));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
