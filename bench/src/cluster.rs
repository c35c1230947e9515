//! Starting and stopping real Berth processes on loopback for a benchmark run.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::client::Client;

pub const ADMIN: &str = "bench-admin-token-0123456789";
pub const MATCHMAKER: &str = "bench-matchmaker-token-0123456789";
pub const JOIN: &str = "bench-join-token-0123456789";

/// Which CPUs the processes of a run may use.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    /// The controller and the load generator (this process).
    pub controller: CpuSet,
    /// The agents, and so their spawners and games, which inherit it.
    pub host: CpuSet,
}

impl Placement {
    /// The CPUs this process may use, split in two halves: the first for the controller's
    /// side, the rest for the hosts' side, as production splits them between machines.
    pub fn split() -> Result<Self> {
        let all = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
        let cpus: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| all.is_set(c).unwrap_or(false))
            .collect();
        if cpus.len() < 2 {
            bail!(
                "--placement split needs at least 2 CPUs, this process may use {}",
                cpus.len()
            );
        }
        let (a, b) = cpus.split_at(cpus.len() / 2);
        let set = |list: &[usize]| -> Result<CpuSet> {
            let mut s = CpuSet::new();
            for &c in list {
                s.set(c)?;
            }
            Ok(s)
        };
        Ok(Self {
            controller: set(a)?,
            host: set(b)?,
        })
    }
}

/// Runs `f` with the calling thread confined to `cpus` (a child forked meanwhile inherits the
/// mask), then puts the thread's mask back.
pub fn with_cpus<T>(cpus: Option<&CpuSet>, f: impl FnOnce() -> T) -> Result<T> {
    let Some(cpus) = cpus else { return Ok(f()) };
    let before = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
    sched_setaffinity(Pid::from_raw(0), cpus).context("sched_setaffinity")?;
    let out = f();
    sched_setaffinity(Pid::from_raw(0), &before).context("sched_setaffinity")?;
    Ok(out)
}

/// Confines the calling thread (the load generator's runtime thread) to `cpus` until dropped.
pub struct Confined(Option<CpuSet>);

impl Confined {
    pub fn to(cpus: Option<&CpuSet>) -> Result<Self> {
        let Some(cpus) = cpus else {
            return Ok(Self(None));
        };
        let before = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
        sched_setaffinity(Pid::from_raw(0), cpus).context("sched_setaffinity")?;
        Ok(Self(Some(before)))
    }
}

impl Drop for Confined {
    fn drop(&mut self) {
        if let Some(before) = &self.0 {
            let _ = sched_setaffinity(Pid::from_raw(0), before);
        }
    }
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Resident set size of a process, from /proc.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU time a process has used, in seconds, split as the kernel accounts it.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTime {
    pub user: f64,
    /// Time in the kernel on the process's behalf: system calls, and for loopback TCP the
    /// receiver's side of every send too.
    pub system: f64,
}

impl CpuTime {
    pub fn of(pid: u32) -> CpuTime {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return CpuTime::default();
        };
        let Some(rest) = text.rfind(')').map(|i| &text[i + 1..]) else {
            return CpuTime::default();
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        // SAFETY: sysconf only reads a system constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        // utime and stime are fields 14 and 15: the 12th and 13th after the state (field 3).
        let seconds =
            |i: usize| f.get(i).and_then(|t| t.parse::<f64>().ok()).unwrap_or(0.0) / hz.max(1.0);
        CpuTime {
            user: seconds(11),
            system: seconds(12),
        }
    }

    pub fn total(self) -> f64 {
        self.user + self.system
    }
}

impl std::ops::Add for CpuTime {
    type Output = CpuTime;
    fn add(self, o: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user + o.user,
            system: self.system + o.system,
        }
    }
}

impl std::ops::Sub for CpuTime {
    type Output = CpuTime;
    fn sub(self, o: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user - o.user,
            system: self.system - o.system,
        }
    }
}

impl std::iter::Sum for CpuTime {
    fn sum<I: Iterator<Item = CpuTime>>(iter: I) -> CpuTime {
        iter.fold(CpuTime::default(), |a, b| a + b)
    }
}

/// How this machine's idle CPUs wait: the cpuidle driver, and with `haltpoll` (a VM guest)
/// how long a vCPU polls before it halts. A halted vCPU costs a VM exit to wake, which shows in
/// unloaded latency (see BENCHMARKS.md), so the figures say which kind of machine made them.
/// `null` where the machine does not say.
pub fn cpu_idle() -> Value {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .map(|t| t.trim().to_owned())
    };
    serde_json::json!({
        "driver": read("/sys/devices/system/cpu/cpuidle/current_driver"),
        "haltPollNs": read("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
            .and_then(|t| t.parse::<u64>().ok()),
    })
}

/// The whole machine's CPU counters (all cores, in clock ticks), from the first line of
/// /proc/stat: what every process and the kernel used, and what the hypervisor took.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineTime {
    pub busy: u64,
    pub idle: u64,
    /// Time a virtual CPU wanted to run but the hypervisor ran something else.
    pub steal: u64,
}

impl MachineTime {
    pub fn now() -> MachineTime {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let f: Vec<u64> = text
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|t| t.parse().ok())
            .collect();
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        MachineTime {
            busy: at(0) + at(1) + at(2) + at(5) + at(6),
            idle: at(3) + at(4),
            steal: at(7),
        }
    }

    /// Shares of the time between `self` and a later reading: (busy, steal).
    pub fn shares_until(self, later: MachineTime) -> (f64, f64) {
        let busy = later.busy.saturating_sub(self.busy) as f64;
        let idle = later.idle.saturating_sub(self.idle) as f64;
        let steal = later.steal.saturating_sub(self.steal) as f64;
        let all = (busy + idle + steal).max(1.0);
        (busy / all, steal / all)
    }
}

/// Pids of running processes whose executable is `exe`.
pub fn pids_of(exe: &Path) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe))
        .collect()
}

/// A daemon we started; killed (with its games, for agents) on drop.
#[derive(Debug)]
pub struct Daemon {
    pub name: String,
    pub url: String,
    child: Option<Child>,
    args: Vec<String>,
    exe: PathBuf,
    log: PathBuf,
    state_dir: Option<PathBuf>,
    cpus: Option<CpuSet>,
}

impl Daemon {
    /// The running process's pid; `None` before it started or after `kill9`.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args)
            .env("BERTH_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = with_cpus(self.cpus.as_ref(), || cmd.spawn())?
            .with_context(|| format!("starting {}", self.exe.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub async fn wait_ready(&mut self, client: &Client) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = client.get(&format!("{}/readyz", self.url), None).await {
                return Ok(());
            }
            if let Some(c) = &mut self.child
                && let Some(status) = c.try_wait()?
            {
                bail!(
                    "{} exited ({status}); see {}",
                    self.name,
                    self.log.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready after 30 s; see {}",
                    self.name,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `sig` to the running process; nothing when none runs (a pid of 0 would signal
    /// our own process group).
    pub fn signal(&self, sig: Signal) {
        if let Some(pid) = self.pid().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn restart(&mut self, client: &Client) -> Result<()> {
        self.kill9();
        self.spawn()?;
        self.wait_ready(client).await
    }

    /// Stops the games this agent started (they do not die with it, by design).
    fn kill_games(&self) {
        let Some(dir) = &self.state_dir else { return };
        let Ok(text) = std::fs::read_to_string(dir.join("agent-state.json")) else {
            return;
        };
        let Ok(state) = serde_json::from_str::<Value>(&text) else {
            return;
        };
        for inst in state["instances"].as_array().into_iter().flatten() {
            if let Some(pid) = inst["pid"].as_i64().filter(|p| *p > 1) {
                let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.signal(Signal::SIGCONT);
        self.kill9();
        self.kill_games();
    }
}

/// Where agents' game port ranges start.
const GAME_PORTS_FROM: usize = 20_000;
/// Where agents' management port ranges start; they end below the kernel's ephemeral range.
const MANAGEMENT_PORTS_FROM: usize = 30_000;
/// The most ports an agent gets in each range: room for 1 000 games.
const MAX_AGENT_PORTS: usize = 1_100;

/// The first port of the kernel's ephemeral range (32768 unless configured otherwise), which
/// the agent refuses to overlap.
fn ephemeral_start() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A controller and agents in a scratch directory.
#[derive(Debug)]
pub struct Cluster {
    /// `worker_threads` for the controller and the agents (None: their defaults).
    pub controller_threads: Option<usize>,
    pub agent_threads: Option<usize>,
    /// CPUs for each side (None: the scheduler places every process).
    pub placement: Option<Placement>,
    /// `[tls]` on the controller and the agents, with the test certificates.
    pub tls: bool,
    /// How many agents the port ranges are divided between (agent indexes `0..agent_slots`).
    pub agent_slots: usize,
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub client: Client,
    pub controller: Option<Daemon>,
    pub agents: Vec<Daemon>,
}

impl Cluster {
    pub fn new(bin: PathBuf) -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("berth-bench-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            controller_threads: None,
            agent_threads: None,
            placement: None,
            tls: false,
            agent_slots: 1,
            dir,
            bin,
            client: Client::new(),
            controller: None,
            agents: Vec::new(),
        })
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// `[tls]` for `identity`'s test certificate, or nothing without `tls`.
    fn tls_table(&self, identity: &str) -> Result<String> {
        if !self.tls {
            return Ok(String::new());
        }
        let ca = berth_http::tls::test_certificate("ca.pem");
        if !ca.is_file() {
            bail!(
                "--tls uses the e2e tests' certificates, and {} is missing: run the benchmark \
                 from the source tree it was built in",
                ca.display()
            );
        }
        Ok(berth_http::tls::test_tls_table(
            &format!("{identity}.pem"),
            &format!("{identity}.key"),
            "ca.pem",
        ))
    }

    /// A client for this cluster's daemons: with `tls`, it trusts the test CA and shows the
    /// controller's test certificate (agents accept no caller without one).
    pub fn new_client(&self) -> Result<Client> {
        if !self.tls {
            return Ok(Client::new());
        }
        // The controller's own certificate and CA: what it shows agents as a client.
        let files = berth_http::tls::TlsFiles::test("controller.pem", "controller.key", "ca.pem");
        let tls = berth_http::tls::Tls::load(&files, berth_http::tls::ClientCerts::Optional)?;
        Ok(Client::with_tls(tls.client))
    }

    pub fn controller_url(&self) -> &str {
        self.controller.as_ref().map_or("", |c| c.url.as_str())
    }

    pub async fn start_controller(&mut self) -> Result<()> {
        self.client = self.new_client()?;
        let port = free_port()?;
        let cfg = self.dir.join("controller.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"listen = "127.0.0.1:{port}"
database = "sqlite://{db}"
join_token = "{JOIN}"
log_format = "json"
{threads}
{tls}
[[tokens]]
token = "{ADMIN}"
role = "admin"
[[tokens]]
token = "{MATCHMAKER}"
role = "matchmaker"
[[regions]]
id = 1
name = "bench"
ping_ip = "127.0.0.1"
"#,
                db = self.dir.join("controller.db").display(),
                threads = self
                    .controller_threads
                    .map_or(String::new(), |n| format!("worker_threads = {n}")),
                tls = self.tls_table("controller")?,
            ),
        )?;
        let mut d = Daemon {
            name: "controller".into(),
            url: format!("{}://127.0.0.1:{port}", self.scheme()),
            child: None,
            args: vec!["--config".into(), cfg.display().to_string()],
            exe: self.bin.join("berth-controller"),
            log: self.dir.join("controller.log"),
            state_dir: None,
            cpus: self.placement.map(|p| p.controller),
        };
        d.spawn()?;
        d.wait_ready(&self.client).await?;
        self.controller = Some(d);
        Ok(())
    }

    /// Ports each agent gets in its game and its management range: the management ports
    /// between 30000 and the kernel's ephemeral range, shared by `agent_slots` agents, at most
    /// 1 100 each.
    pub fn ports_per_agent(&self) -> usize {
        (ephemeral_start().saturating_sub(MANAGEMENT_PORTS_FROM) / self.agent_slots.max(1))
            .min(MAX_AGENT_PORTS)
    }

    /// Fails unless every agent can get `games` ports in each range, naming the limit.
    pub fn check_ports_for(&self, games: usize) -> Result<()> {
        let span = self.ports_per_agent();
        if games > span {
            bail!(
                "{games} games per agent need as many game and management ports each, but with \
                 {} agents every agent gets {span}: management ports must lie between \
                 {MANAGEMENT_PORTS_FROM} and the kernel's ephemeral range (from {}, see \
                 /proc/sys/net/ipv4/ip_local_port_range); use fewer agents or fewer games per \
                 agent",
                self.agent_slots,
                ephemeral_start()
            );
        }
        Ok(())
    }

    /// Starts an agent; `index` (below `agent_slots`) picks disjoint port ranges.
    pub async fn start_agent(
        &mut self,
        index: usize,
        is_virtual: bool,
        register: bool,
    ) -> Result<()> {
        if index >= self.agent_slots {
            bail!(
                "agent index {index} is beyond the {} agents the ports were divided for",
                self.agent_slots
            );
        }
        let span = self.ports_per_agent();
        if span == 0 {
            bail!(
                "no management ports are left for {} agents between {MANAGEMENT_PORTS_FROM} and \
                 the kernel's ephemeral range (from {}); use fewer agents",
                self.agent_slots,
                ephemeral_start()
            );
        }
        let port = free_port()?;
        let state = self.dir.join(format!("agent-{index}"));
        let game = GAME_PORTS_FROM + index * span;
        let mgmt = MANAGEMENT_PORTS_FROM + index * span;
        let controller = if register {
            format!(
                "controller_url = \"{}\"\njoin_token = \"{JOIN}\"\n",
                self.controller_url()
            )
        } else {
            String::new()
        };
        let cfg = self.dir.join(format!("agent-{index}.toml"));
        std::fs::write(
            &cfg,
            format!(
                r#"{controller}listen = "127.0.0.1:{port}"
state_dir = "{state}"
host_name = "bench-{index}"
region = "bench"
dc_location = "bench-1"
is_virtual = {is_virtual}
addresses = ["127.0.0.1"]
game_ports = "{game}-{}"
management_ports = "{mgmt}-{}"
log_format = "json"
{threads}
{tls}
[[tokens]]
token = "{ADMIN}"
"#,
                game + span - 1,
                mgmt + span - 1,
                state = state.display(),
                threads = self
                    .agent_threads
                    .map_or(String::new(), |n| format!("worker_threads = {n}")),
                tls = self.tls_table("agent")?,
            ),
        )?;
        let mut d = Daemon {
            name: format!("agent-{index}"),
            url: format!("{}://127.0.0.1:{port}", self.scheme()),
            child: None,
            args: vec!["--config".into(), cfg.display().to_string()],
            exe: self.bin.join("berth-agent"),
            log: self.dir.join(format!("agent-{index}.log")),
            state_dir: Some(state),
            cpus: self.placement.map(|p| p.host),
        };
        d.spawn()?;
        d.wait_ready(&self.client).await?;
        self.agents.push(d);
        Ok(())
    }

    pub fn sample_game(&self) -> PathBuf {
        self.bin.join("berth-sample-game")
    }

    /// Creates application `app` with a profile and a fleet of `per_host` sample games on
    /// every host; with `match_seconds`, the games end each match after that long.
    pub async fn create_fleet(
        &self,
        app: u32,
        per_host: u32,
        match_seconds: Option<f64>,
    ) -> Result<()> {
        let url = self.controller_url();
        let game = self.sample_game();
        let mut args = vec![
            "--port={port}".to_string(),
            "--management-port={managementPort}".to_string(),
            "--instance-id={instanceId}".to_string(),
        ];
        args.extend(match_seconds.map(|s| format!("--match-seconds={s}")));
        let name = format!("bench-{app}");
        let bodies = [
            (
                "/v1/applications",
                serde_json::json!({"id": app, "name": name, "managementProtocol": "arcus"}),
            ),
            (
                "/v1/profiles",
                serde_json::json!({
                    "id": name, "applicationId": app, "build": "bench",
                    "executable": game.display().to_string(), "args": args,
                }),
            ),
            (
                "/v1/fleets",
                serde_json::json!({
                    "id": app, "name": name, "applicationId": app, "deploymentEnvironment": "production",
                    "profileId": name, "regions": ["bench"], "instancesPerHost": per_host,
                }),
            ),
        ];
        for (path, body) in bodies {
            let (status, text) = self
                .client
                .post(&format!("{url}{path}"), Some(ADMIN), &body)
                .await?;
            if status != 201 {
                bail!("POST {path}: {status} {text}");
            }
        }
        Ok(())
    }

    /// Waits until `n` instances are online at the controller.
    pub async fn wait_online(&self, n: usize, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        let url = format!("{}/v1/instances?status=4", self.controller_url());
        loop {
            let (_, body) = self.client.get(&url, Some(ADMIN)).await?;
            let online = serde_json::from_slice::<Vec<Value>>(&body)
                .map(|v| v.iter().filter(|i| i["arcusConnected"] == true).count())
                .unwrap_or(0);
            if online >= n {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!("only {online} of {n} instances online after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.agents.clear();
        self.controller = None;
        if std::env::var_os("BERTH_BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The directory holding the other binaries: next to this one.
pub fn bin_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    let dir = match explicit {
        Some(d) => d.to_owned(),
        None => std::env::current_exe()?
            .parent()
            .context("no parent directory")?
            .to_owned(),
    };
    for b in ["berth-controller", "berth-agent", "berth-sample-game"] {
        if !dir.join(b).is_file() {
            bail!(
                "{} not found in {}; build everything first: cargo build --release --workspace --bins",
                b,
                dir.display()
            );
        }
    }
    Ok(dir)
}
