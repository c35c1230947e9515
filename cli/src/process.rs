//! The processes `berthctl dev` owns: the controller and the agent it starts, and at the end the
//! sample games the agent left running (the agent never stops games when it stops itself, so
//! that upgrading it cannot end matches; in dev, stopping means stopping everything).

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

const POLL: Duration = Duration::from_millis(50);

/// A daemon started by dev, logging to its own file.
#[derive(Debug)]
pub struct Daemon {
    pub name: &'static str,
    pub log: PathBuf,
    child: Child,
    status: Option<ExitStatus>,
}

/// A command for a Berth daemon, without the caller's `BERTH_<KEY>` overrides: the daemons read
/// them, and a BERTH_LISTEN or BERTH_DATABASE left in the user's shell would silently point dev
/// somewhere else. BERTH_LOG (the log level) stays.
pub fn daemon_command(exe: &Path) -> Command {
    let mut cmd = Command::new(exe);
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str()
            && k.starts_with("BERTH_")
            && k != "BERTH_LOG"
        {
            cmd.env_remove(k);
        }
    }
    cmd
}

impl Daemon {
    pub fn spawn(name: &'static str, exe: &Path, args: &[&OsStr], log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = daemon_command(exe);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Text logs without colour codes: these files are read with less and tail.
            .env("NO_COLOR", "1");
        // Own process group: Ctrl-C in the terminal reaches only berthctl, which then stops
        // the daemons in order and cleans up after them.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let parent = std::process::id();
        // SAFETY: runs in the forked child before exec and only makes the async-signal-safe
        // calls prctl(2) and getppid(2); it allocates nothing.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                // If berthctl dies without cleaning up (SIGKILL), the daemons follow it rather
                // than holding the ports for the next run.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("berthctl exited during start"));
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        Ok(Self {
            name,
            log: log.to_owned(),
            child,
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status once the process has exited (reaped here).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    fn signal(&mut self, sig: Signal) {
        if self.exited().is_none() {
            let _ = kill(Pid::from_raw(self.pid() as i32), sig);
        }
    }

    /// `exit code 78: invalid configuration`, `killed by SIGKILL`.
    pub fn describe(status: ExitStatus) -> String {
        use std::os::unix::process::ExitStatusExt;
        if let Some(code) = status.code() {
            let why = match code {
                78 => ": invalid configuration",
                _ => "",
            };
            return format!("exit code {code}{why}");
        }
        match status.signal().and_then(|s| Signal::try_from(s).ok()) {
            Some(sig) => format!("killed by {sig}"),
            None => status.to_string(),
        }
    }

    /// The last `n` lines of its log, indented, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }
}

impl Drop for Daemon {
    /// A panic or an early return must not leave a daemon holding the dev ports.
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    if lines.is_empty() {
        return format!("    ({} is empty)", path.display());
    }
    lines[start..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// SIGTERM to every daemon, up to `grace` for them to exit, then SIGKILL. Returns the names
/// of those that had to be killed.
pub async fn stop_daemons(daemons: &mut [&mut Daemon], grace: Duration) -> Vec<&'static str> {
    for d in daemons.iter_mut() {
        d.signal(Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && daemons.iter_mut().any(|d| d.exited().is_none()) {
        tokio::time::sleep(POLL).await;
    }
    let mut killed = Vec::new();
    for d in daemons.iter_mut() {
        if d.exited().is_none() {
            killed.push(d.name);
            let _ = d.child.kill();
            let _ = d.child.wait();
        }
    }
    killed
}

/// State and start time (clock ticks since boot) of a process, from /proc.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields after the last ')' do not.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// Alive and still the process that was recorded (a recycled pid has another start time).
fn is_same_alive(pid: u32, start_time: u64) -> bool {
    match stat(pid) {
        Some((state, start)) => {
            !matches!(state, 'Z' | 'X') && (start_time == 0 || start == start_time)
        }
        None => false,
    }
}

/// A game recorded in the agent's state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Game {
    pub pid: u32,
    pub start_time: u64,
}

/// Games in `<state_dir>/agent-state.json`.
pub fn recorded_games(state_file: &Path) -> Vec<Game> {
    let Ok(text) = std::fs::read_to_string(state_file) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    v.get("instances")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| {
            let pid = u32::try_from(i.get("pid")?.as_u64()?).ok()?;
            let start_time = i
                .get("startTime")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            (pid > 1).then_some(Game { pid, start_time })
        })
        .collect()
}

/// SIGTERM to each live game's process group (the agent starts every game as a session
/// leader, so the group is the pid), 2 s to exit, then SIGKILL. Returns (stopped, killed).
pub async fn stop_games(games: &[Game]) -> (usize, usize) {
    let live: Vec<Game> = games
        .iter()
        .copied()
        .filter(|g| is_same_alive(g.pid, g.start_time))
        .collect();
    let send = |g: &Game, sig: Signal| {
        let pid = Pid::from_raw(g.pid as i32);
        if killpg(pid, sig).is_err() {
            let _ = kill(pid, sig);
        }
    };
    for g in &live {
        send(g, Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && live.iter().any(|g| is_same_alive(g.pid, g.start_time)) {
        tokio::time::sleep(POLL).await;
    }
    let mut killed = 0;
    for g in &live {
        if is_same_alive(g.pid, g.start_time) {
            send(g, Signal::SIGKILL);
            killed += 1;
        }
    }
    (live.len(), killed)
}

/// Live processes among `games`.
pub fn live_games(games: &[Game]) -> Vec<Game> {
    games
        .iter()
        .copied()
        .filter(|g| is_same_alive(g.pid, g.start_time))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_recycled_pids_are_not() {
        let me = std::process::id();
        let (_, start) = stat(me).expect("own stat");
        assert!(is_same_alive(me, start));
        assert!(!is_same_alive(me, start + 1));
    }

    #[test]
    fn reads_the_agent_state_file() {
        let p = std::env::temp_dir().join(format!("berthctl-state-{}.json", uuid::Uuid::new_v4()));
        std::fs::write(
            &p,
            r#"{"format":1,"instances":[{"id":"a","pid":123,"startTime":9},{"id":"b","pid":null}]}"#,
        )
        .unwrap();
        assert_eq!(
            recorded_games(&p),
            [Game {
                pid: 123,
                start_time: 9
            }]
        );
        std::fs::remove_file(&p).unwrap();
        assert!(recorded_games(&p).is_empty());
    }
}
