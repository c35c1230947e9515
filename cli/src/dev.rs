//! `berthctl dev`: a whole Berth on one machine with one command. It writes a controller and
//! an agent config into a data directory, starts both, applies a demo application whose fleet
//! runs the sample game, waits until the games are online, and prints how to allocate one.
//! Ctrl-C stops everything it started, games included.
//!
//! `--check` does the same, then allocates a game the way the printed curl would, asks the game
//! over its own port whether the metadata arrived, and stops: the end-to-end smoke test for CI.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use berth_protocol::agent_api::Profile;
use berth_protocol::controller_api::{
    AllocateBody, Application, Fleet, HostObject, InstanceObject,
};
use berth_protocol::{InstanceStatus, KeyValue, ManagementProtocol};
use http::Method;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::apply::{self, Resource};
use crate::client::Api;
use crate::process::{self, Daemon};
use crate::render::plural;
use crate::settings::Source;
use crate::{DevArgs, Exit, instances};

const CONTROLLER_BIN: &str = "berth-controller";
const AGENT_BIN: &str = "berth-agent";
const GAME_BIN: &str = "berth-sample-game";
const HOST_NAME: &str = "dev-host-1";
const REGION: &str = "local";
const APPLICATION_ID: u32 = 1;
const POLL: Duration = Duration::from_millis(50);
const START_TIMEOUT: Duration = Duration::from_secs(20);
const GAMES_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(10);
/// With the agent's restart backoff (0.5 s, 1 s, 2 s, …) a crash loop gets here in seconds.
const CRASH_LOOP_RESTARTS: u32 = 2;

pub async fn run(args: &DevArgs) -> Result<()> {
    let bins = Binaries::find(args.bin_dir.as_deref())?;
    let data = prepare_data_dir(&args.data_dir)?;
    let _lock = DevLock::take(&data)?;
    let (tokens, fresh) = Tokens::load_or_create(&data)?;
    check_ports(args)?;
    let paths = write_configs(args, &data, &tokens)?;
    validate_configs(&bins, &paths)?;

    println!(
        "Starting Berth in {}{}",
        data.display(),
        if fresh { " (new tokens generated)" } else { "" }
    );
    let stop = StopSignal::install()?;
    let mut cluster = Cluster {
        args: args.clone(),
        data,
        bins,
        tokens,
        paths,
        stop,
        controller: None,
        agent: None,
        open_line: false,
    };
    let result = cluster.run().await;
    match &result {
        Ok(()) => cluster.end_line(),
        Err(e) => match e.downcast_ref::<Interrupted>() {
            Some(Interrupted(why)) => {
                cluster.finish_open("interrupted");
                println!("{why}: stopping");
            }
            None => cluster.finish_open("failed"),
        },
    }
    let stopped = cluster.shutdown().await;
    match result {
        // CI's timeout sends SIGTERM: an interrupted check did not pass.
        Err(e) if args.check && e.downcast_ref::<Interrupted>().is_some() => {
            stopped?;
            Err(Exit::failed(format!(
                "error: dev check {e} before it passed"
            )))
        }
        Err(e) if e.downcast_ref::<Interrupted>().is_none() => {
            // The cause is printed last, where the eye lands after the shutdown lines.
            if let Err(s) = stopped {
                eprintln!("{}", message_of(&s));
            }
            Err(e)
        }
        _ => stopped,
    }
}

fn message_of(e: &anyhow::Error) -> String {
    match e.downcast_ref::<Exit>() {
        Some(x) => x.message.clone(),
        None => format!("error: {e:#}"),
    }
}

/// The user asked to stop (Ctrl-C, SIGTERM, SIGHUP) while dev was starting or checking.
#[derive(Debug)]
struct Interrupted(&'static str);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted by {}", self.0)
    }
}

impl std::error::Error for Interrupted {}

// ----- before anything starts ----------------------------------------------------------------

#[derive(Debug, Clone)]
struct Binaries {
    controller: PathBuf,
    agent: PathBuf,
    game: PathBuf,
}

impl Binaries {
    fn find(bin_dir: Option<&Path>) -> Result<Self> {
        let dir = match bin_dir {
            Some(d) => d.to_owned(),
            None => std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_owned))
                .context("cannot tell where berthctl itself is; pass --bin-dir")?,
        };
        let missing: Vec<&str> = [CONTROLLER_BIN, AGENT_BIN, GAME_BIN]
            .into_iter()
            .filter(|b| !dir.join(b).is_file())
            .collect();
        if !missing.is_empty() {
            let mut msg = format!(
                "error: berthctl dev runs {CONTROLLER_BIN}, {AGENT_BIN} and {GAME_BIN} from {}, \
                 but {} {} not there.\n\
                 Build them from the workspace root with:\n\n    cargo build --workspace --bins\n",
                dir.display(),
                missing.join(", "),
                if missing.len() == 1 { "is" } else { "are" }
            );
            if bin_dir.is_none() {
                msg.push_str("\nor point --bin-dir at the directory that holds them.");
            }
            return Err(Exit::failed(msg));
        }
        let abs = |name: &str| {
            let p = dir.join(name);
            std::fs::canonicalize(&p).unwrap_or(p)
        };
        Ok(Self {
            controller: abs(CONTROLLER_BIN),
            agent: abs(AGENT_BIN),
            game: abs(GAME_BIN),
        })
    }
}

fn prepare_data_dir(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir.join("agent"))
        .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    // Absolute, because the configs are read by processes that may resolve paths elsewhere.
    std::fs::canonicalize(dir).with_context(|| format!("cannot resolve {}", dir.display()))
}

/// One dev per data directory: two would fight over the database and the agent state.
#[derive(Debug)]
struct DevLock(PathBuf);

impl DevLock {
    fn take(data: &Path) -> Result<Self> {
        let path = data.join("dev.pid");
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Ok(pid) = text.trim().parse::<u32>()
            && pid != std::process::id()
            && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "berthctl")
        {
            return Err(Exit::failed(format!(
                "error: another `berthctl dev` (pid {pid}) is using {}; stop it (Ctrl-C in its \
                 terminal, or kill {pid}) or pass another --data-dir",
                data.display()
            )));
        }
        std::fs::write(&path, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for DevLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The three secrets of the dev cluster, generated once so that restarts keep working with
/// tokens already pasted into a shell.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tokens {
    pub join: String,
    pub admin: String,
    pub matchmaker: String,
}

impl Tokens {
    fn load_or_create(data: &Path) -> Result<(Self, bool)> {
        let path = data.join("tokens.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let t: Self = toml::from_str(&text).map_err(|e| {
                    Exit::failed(format!(
                        "error: {} is not valid ({}); delete it to generate new tokens",
                        path.display(),
                        e.message()
                    ))
                })?;
                Ok((t, false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let new = || uuid::Uuid::new_v4().simple().to_string();
                let t = Self {
                    join: new(),
                    admin: new(),
                    matchmaker: new(),
                };
                let text = format!(
                    "# Tokens of the `berthctl dev` cluster. Delete this file to get new ones.\n{}",
                    toml::to_string(&t)?
                );
                write_private(&path, &text)?;
                Ok((t, true))
            }
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn check_ports(args: &DevArgs) -> Result<()> {
    if args.controller_port == args.agent_port {
        return Err(Exit::failed(format!(
            "error: --controller-port and --agent-port are both {}; they must differ",
            args.agent_port
        )));
    }
    let mut problems = Vec::new();
    for (port, what, flag) in [
        (args.controller_port, "the controller", "--controller-port"),
        (args.agent_port, "the agent", "--agent-port"),
    ] {
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => problems.push(format!(
                "port {port} (for {what}) is already in use, perhaps by an earlier Berth; \
                 free it, or choose another with {flag} {}",
                port.saturating_add(100)
            )),
            Err(e) => problems.push(format!(
                "cannot listen on 127.0.0.1:{port} (for {what}): {e}; choose another with {flag}"
            )),
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(Exit::failed(format!(
        "error: {}",
        problems.join("\nerror: ")
    )))
}

#[derive(Debug, Clone)]
struct ConfigPaths {
    controller: PathBuf,
    agent: PathBuf,
    controller_log: PathBuf,
    agent_log: PathBuf,
    agent_state: PathBuf,
}

#[derive(Serialize)]
struct ControllerToml<'a> {
    listen: String,
    database: String,
    join_token: &'a str,
    heartbeat_period_ms: u64,
    heartbeat_expiry_factor: f64,
    log_format: &'static str,
    tokens: Vec<TokenToml<'a>>,
    regions: Vec<RegionToml>,
}

#[derive(Serialize)]
struct TokenToml<'a> {
    token: &'a str,
    role: &'static str,
    name: &'static str,
}

#[derive(Serialize)]
struct RegionToml {
    id: u32,
    name: &'static str,
    ping_ip: &'static str,
}

#[derive(Serialize)]
struct AgentToml<'a> {
    controller_url: String,
    join_token: &'a str,
    listen: String,
    advertise_url: String,
    state_dir: String,
    host_name: &'static str,
    region: &'static str,
    dc_location: &'static str,
    is_virtual: bool,
    game_ports: &'a str,
    management_ports: &'a str,
    addresses: Vec<&'static str>,
    log_format: &'static str,
}

/// Rewritten at every start, so ports and paths always match the flags of this run.
fn write_configs(args: &DevArgs, data: &Path, tokens: &Tokens) -> Result<ConfigPaths> {
    let controller = ControllerToml {
        listen: format!("127.0.0.1:{}", args.controller_port),
        database: format!("sqlite://{}", data.join("controller.db").display()),
        join_token: &tokens.join,
        heartbeat_period_ms: 1000,
        heartbeat_expiry_factor: 5.0,
        log_format: "text",
        tokens: vec![
            TokenToml {
                token: &tokens.admin,
                role: "admin",
                name: "dev-admin",
            },
            TokenToml {
                token: &tokens.matchmaker,
                role: "matchmaker",
                name: "dev-matchmaker",
            },
        ],
        regions: vec![RegionToml {
            id: 1,
            name: REGION,
            ping_ip: "127.0.0.1",
        }],
    };
    let agent = AgentToml {
        controller_url: format!("http://127.0.0.1:{}", args.controller_port),
        join_token: &tokens.join,
        listen: format!("127.0.0.1:{}", args.agent_port),
        advertise_url: format!("http://127.0.0.1:{}", args.agent_port),
        state_dir: data.join("agent").display().to_string(),
        host_name: HOST_NAME,
        region: REGION,
        dc_location: "local-1",
        is_virtual: false,
        game_ports: &args.game_ports,
        management_ports: &args.management_ports,
        addresses: vec!["127.0.0.1"],
        log_format: "text",
    };
    let header = "# Written by `berthctl dev` at every start; edits are overwritten.\n";
    let paths = ConfigPaths {
        controller: data.join("controller.toml"),
        agent: data.join("agent.toml"),
        controller_log: data.join("controller.log"),
        agent_log: data.join("agent.log"),
        agent_state: data.join("agent").join("agent-state.json"),
    };
    write_private(
        &paths.controller,
        &format!("{header}{}", toml::to_string(&controller)?),
    )?;
    write_private(
        &paths.agent,
        &format!("{header}{}", toml::to_string(&agent)?),
    )?;
    Ok(paths)
}

/// Each daemon checks its config and names the bad key: cheaper and clearer than starting it
/// and reading its log.
fn validate_configs(bins: &Binaries, paths: &ConfigPaths) -> Result<()> {
    for (exe, config) in [
        (&bins.controller, &paths.controller),
        (&bins.agent, &paths.agent),
    ] {
        let out = process::daemon_command(exe)
            .arg("--config")
            .arg(config)
            .arg("validate")
            .output()
            .with_context(|| format!("cannot run {}", exe.display()))?;
        if !out.status.success() {
            let text = String::from_utf8_lossy(&out.stderr);
            let hint = if text.contains("game_ports") {
                "\nchange the range with --game-ports FROM-TO"
            } else if text.contains("management_ports") {
                "\nchange the range with --management-ports FROM-TO"
            } else {
                ""
            };
            return Err(Exit::failed(format!(
                "error: {} refuses the generated {}:\n  {}{hint}",
                exe.file_name().unwrap_or_default().to_string_lossy(),
                config.display(),
                text.trim()
            )));
        }
    }
    Ok(())
}

// ----- signals -------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct StopSignal(watch::Receiver<Option<&'static str>>);

impl StopSignal {
    fn install() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let why = tokio::select! {
                _ = int.recv() => "Ctrl-C",
                _ = term.recv() => "SIGTERM",
                _ = hup.recv() => "SIGHUP",
            };
            let _ = tx.send(Some(why));
        });
        Ok(Self(rx))
    }

    fn requested(&self) -> Option<&'static str> {
        *self.0.borrow()
    }

    async fn wait(&mut self) -> &'static str {
        loop {
            if let Some(why) = *self.0.borrow_and_update() {
                return why;
            }
            if self.0.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

// ----- the running cluster -------------------------------------------------------------------

struct Cluster {
    args: DevArgs,
    data: PathBuf,
    bins: Binaries,
    tokens: Tokens,
    paths: ConfigPaths,
    stop: StopSignal,
    controller: Option<Daemon>,
    agent: Option<Daemon>,
    /// A progress line is waiting for its end ("… ready").
    open_line: bool,
}

impl Cluster {
    fn controller_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.args.controller_port)
    }

    fn agent_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.args.agent_port)
    }

    fn admin(&self) -> Api {
        Api::new(
            self.controller_url(),
            Source::Default,
            Some((self.tokens.admin.clone(), Source::Default)),
        )
    }

    fn begin(&mut self, what: &str) {
        print!("  {what:<11} ");
        let _ = std::io::stdout().flush();
        self.open_line = true;
    }

    fn finish(&mut self, text: &str) {
        println!("{text}");
        self.open_line = false;
    }

    /// Ends a waiting progress line with `word`, if one is open.
    fn finish_open(&mut self, word: &str) {
        if self.open_line {
            self.finish(word);
        }
    }

    fn end_line(&mut self) {
        if self.open_line {
            println!();
            self.open_line = false;
        }
    }

    async fn run(&mut self) -> Result<()> {
        let games = self.start().await?;
        self.end_line();
        println!();
        let mut shown = games;
        print!("{}", instances::table(&mut shown, false));
        println!();
        if self.args.check {
            return self.check().await;
        }
        self.print_ready(games_online(&shown));
        self.watch().await
    }

    /// Controller, agent, demo resources, games: each step waits for what the next one needs.
    async fn start(&mut self) -> Result<Vec<InstanceObject>> {
        let api = self.admin();

        let t = Instant::now();
        self.begin("controller");
        let config = self.paths.controller.clone();
        let log = self.paths.controller_log.clone();
        self.controller = Some(Daemon::spawn(
            "berth-controller",
            &self.bins.controller,
            &["--config".as_ref(), config.as_os_str()],
            &log,
        )?);
        let readyz = api.clone();
        self.wait_for(
            "the controller to be ready (GET /readyz)",
            START_TIMEOUT,
            20,
            || {
                let api = readyz.clone();
                async move {
                    api.request(Method::GET, "/readyz", None, &[])
                        .await
                        .map(|_| ())
                        .map_err(|e| NotYet::from(e.to_string()))
                }
            },
        )
        .await?;
        let pid = self.controller.as_ref().map_or(0, Daemon::pid);
        self.finish(&format!(
            "ready at {} (pid {pid}, {:.1} s)",
            self.controller_url(),
            t.elapsed().as_secs_f64()
        ));

        let t = Instant::now();
        self.begin("agent");
        let config = self.paths.agent.clone();
        let log = self.paths.agent_log.clone();
        self.agent = Some(Daemon::spawn(
            "berth-agent",
            &self.bins.agent,
            &["--config".as_ref(), config.as_os_str()],
            &log,
        )?);
        let hosts_api = api.clone();
        let host_id = self
            .wait_for(
                &format!("host {HOST_NAME} to register and be reachable"),
                START_TIMEOUT,
                20,
                || {
                    let api = hosts_api.clone();
                    async move { reachable_host(&api).await }
                },
            )
            .await?;
        let pid = self.agent.as_ref().map_or(0, Daemon::pid);
        self.finish(&format!(
            "ready at {}, host {HOST_NAME} registered as host {host_id} (pid {pid}, {:.1} s)",
            self.agent_url(),
            t.elapsed().as_secs_f64()
        ));

        self.begin("demo");
        let mut lines = Vec::new();
        for r in demo_resources(&self.bins.game, self.args.instances) {
            lines.push(apply::apply(&api, &r).await?.line());
        }
        self.finish(&lines.join(", "));

        let t = Instant::now();
        let n = self.args.instances as usize;
        self.begin("games");
        let games_api = api.clone();
        let seen = Rc::new(RefCell::new(HashMap::new()));
        let games = self
            .wait_for(
                &format!("{n} sample games to be online"),
                GAMES_TIMEOUT,
                0,
                || {
                    let api = games_api.clone();
                    let seen = Rc::clone(&seen);
                    async move { online_games(&api, host_id, n, &seen).await }
                },
            )
            .await;
        let games = match games {
            Ok(g) => g,
            Err(e) => return Err(self.explain_games_failure(e, &api, host_id).await),
        };
        self.finish(&format!(
            "{} online ({:.1} s)",
            plural(n, "sample game", "sample games"),
            t.elapsed().as_secs_f64()
        ));
        Ok(games)
    }

    /// Polls `probe` until it succeeds, the timeout passes, a daemon dies or the user stops.
    /// On timeout the last `log_lines` of each daemon's log are part of the error.
    async fn wait_for<T, F, Fut>(
        &mut self,
        what: &str,
        timeout: Duration,
        log_lines: usize,
        mut probe: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, NotYet>>,
    {
        let start = Instant::now();
        loop {
            if let Some(why) = self.stop.requested() {
                return Err(Interrupted(why).into());
            }
            self.check_daemons()?;
            let head = match probe().await {
                Ok(t) => return Ok(t),
                Err(NotYet::Waiting(_)) if start.elapsed() <= timeout => None,
                Err(NotYet::Waiting(last)) => Some(format!(
                    "error: timed out after {} s waiting for {what}; last seen: {last}",
                    timeout.as_secs()
                )),
                Err(NotYet::Hopeless(why)) => Some(format!(
                    "error: gave up waiting for {what} after {:.1} s: {why}",
                    start.elapsed().as_secs_f64()
                )),
            };
            if let Some(head) = head {
                let mut msg = head;
                let daemons = [&self.controller, &self.agent];
                for d in daemons.into_iter().flatten().filter(|_| log_lines > 0) {
                    let _ = write!(
                        msg,
                        "\nlast lines of {}:\n{}",
                        d.log.display(),
                        d.log_tail(log_lines)
                    );
                }
                return Err(Exit::failed(msg));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// An error naming the daemon that died, with its last log lines.
    fn check_daemons(&mut self) -> Result<()> {
        for d in [&mut self.controller, &mut self.agent]
            .into_iter()
            .flatten()
        {
            if let Some(status) = d.exited() {
                let msg = format!(
                    "error: {} stopped unexpectedly ({}); last lines of {}:\n{}",
                    d.name,
                    Daemon::describe(status),
                    d.log.display(),
                    d.log_tail(20)
                );
                return Err(Exit::failed(msg));
            }
        }
        Ok(())
    }

    async fn explain_games_failure(&self, e: anyhow::Error, api: &Api, host: u64) -> anyhow::Error {
        if e.downcast_ref::<Exit>().is_none() {
            return e;
        }
        let mut msg = message_of(&e);
        if let Some(agent) = &self.agent {
            let _ = write!(
                msg,
                "\nlast lines of {}:\n{}",
                agent.log.display(),
                agent.log_tail(10)
            );
        }
        // The games' own logs say why they never reported status 4; show the first one.
        if let Ok(list) = app_instances(api, host).await
            && let Some(stuck) = list.iter().find(|i| i.status != InstanceStatus::Online)
        {
            let log = self
                .data
                .join("agent")
                .join("logs")
                .join(format!("{}.log", stuck.id));
            let _ = write!(
                msg,
                "\ninstance {} is {} {}, state {}; last lines of {}:\n{}",
                stuck.id,
                stuck.status.number(),
                stuck.status.name(),
                stuck.state,
                log.display(),
                process::tail(&log, 10)
            );
        }
        Exit::failed(msg)
    }

    fn print_ready(&self, online: usize) {
        let c = self.controller_url();
        let me = invoked_as();
        let data = self.data.display();
        println!(
            "Berth is running: controller {c}, agent {}, {} online.",
            self.agent_url(),
            plural(online, "sample game", "sample games")
        );
        println!("Allocate one:");
        println!(
            "  curl -s -X POST {c}/v1/applications/{APPLICATION_ID}/allocate -H 'Authorization: Bearer {}' \
             -H 'Content-Type: application/json' -d '{{\"filter\": \"regionName={REGION}\", \"metadata\": \
             [{{\"key\": \"map\", \"value\": \"dust\"}}]}}'",
            self.tokens.matchmaker
        );
        println!(
            "Ask the game what it learned:   echo INFO | nc -w1 127.0.0.1 <port from the answer>   \
             (or: {me} instances info <id from the answer>)"
        );
        println!(
            "Use berthctl:   export BERTH_CONTROLLER={c} BERTH_TOKEN={}; {me} instances",
            self.tokens.admin
        );
        println!("Logs: {data}/controller.log, {data}/agent.log, {data}/agent/logs/<instance>.log");
        println!("Press Ctrl-C to stop.");
    }

    /// Until Ctrl-C (Ok) or a daemon dies (Err).
    async fn watch(&mut self) -> Result<()> {
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                why = stop.wait() => {
                    println!("\n{why}: stopping");
                    return Ok(());
                }
                () = tokio::time::sleep(Duration::from_millis(200)) => self.check_daemons()?,
            }
        }
    }

    /// What the printed curl does, then the game's own word that the metadata arrived.
    async fn check(&mut self) -> Result<()> {
        let mm = self
            .admin()
            .with_token(self.tokens.matchmaker.clone(), Source::Default);
        let body = AllocateBody {
            filter: format!("regionName={REGION}"),
            metadata: vec![KeyValue::new("map", "dust")],
            game_metadata: None,
        };
        let path = format!("/v1/applications/{APPLICATION_ID}/allocate");
        let raw = mm.post(&path, &body, &[]).await?;
        let i: InstanceObject = mm.decode(&path, &raw)?;
        let addr = format!("{}:{}", i.ip_address, i.port);
        println!("check: allocated instance {} at {addr} with map=dust", i.id);

        // The agent answers once it has sent `allocated`; the game may read it a moment later.
        let start = Instant::now();
        let mut last;
        loop {
            self.check_daemons()?;
            if let Some(why) = self.stop.requested() {
                return Err(Interrupted(why).into());
            }
            last = match instances::game_info(&addr).await {
                Ok(line) => match verify_info(&line) {
                    Ok(()) => {
                        println!("check: the game answers INFO with allocated=true and map=dust");
                        println!("dev check passed");
                        return Ok(());
                    }
                    Err(why) => format!("{why}; INFO said {line}"),
                },
                Err(e) => format!("{e:#}"),
            };
            if start.elapsed() > Duration::from_secs(5) {
                return Err(Exit::failed(format!(
                    "error: dev check failed: the allocated game at {addr} did not confirm the \
                     allocation within 5 s: {last}\ngame log: {}",
                    self.data
                        .join("agent")
                        .join("logs")
                        .join(format!("{}.log", i.id))
                        .display()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Agent and controller first (so nothing restarts a game), then the games they leave.
    async fn shutdown(&mut self) -> Result<()> {
        self.end_line();
        let mut daemons: Vec<&mut Daemon> = [&mut self.agent, &mut self.controller]
            .into_iter()
            .flatten()
            .collect();
        let names: Vec<&str> = daemons.iter().map(|d| d.name).collect();
        let killed = process::stop_daemons(&mut daemons, STOP_GRACE).await;
        let games = process::recorded_games(&self.paths.agent_state);
        let (stopped, games_killed) = process::stop_games(&games).await;
        let left = process::live_games(&games);
        let mut parts = Vec::new();
        if !names.is_empty() {
            parts.push(names.join(", "));
        }
        if stopped > 0 {
            parts.push(plural(stopped, "sample game", "sample games"));
        }
        let mut notes = Vec::new();
        if !killed.is_empty() {
            notes.push(format!(
                "{} did not exit within {} s and {} killed",
                killed.join(" and "),
                STOP_GRACE.as_secs(),
                if killed.len() == 1 { "was" } else { "were" }
            ));
        }
        if games_killed > 0 {
            notes.push(format!(
                "{} needed SIGKILL",
                plural(games_killed, "game", "games")
            ));
        }
        if parts.is_empty() {
            println!("stopped");
        } else if notes.is_empty() {
            println!("stopped: {}", parts.join(", "));
        } else {
            println!("stopped: {} ({})", parts.join(", "), notes.join("; "));
        }
        if !left.is_empty() {
            let pids: Vec<String> = left.iter().map(|g| g.pid.to_string()).collect();
            let pids = pids.join(" ");
            return Err(Exit::failed(format!(
                "error: sample games still running after SIGKILL: pids {pids}\n\
                 They hold their ports until they are gone. See what they are doing with \
                 `ps -o pid,stat,wchan,cmd -p {}` (state D: stuck in the kernel, usually on \
                 I/O; it dies once that returns), then `kill -9 {pids}` again before the next \
                 `berthctl dev`.",
                pids.replace(' ', ",")
            )));
        }
        Ok(())
    }
}

/// How to run berthctl again in the printed hints: the path it was started with when that
/// was a path (`target/debug/berthctl` after `cargo run`), else its name.
fn invoked_as() -> String {
    std::env::args()
        .next()
        .filter(|a| a.contains('/'))
        .unwrap_or_else(|| "berthctl".to_owned())
}

fn games_online(list: &[InstanceObject]) -> usize {
    list.iter()
        .filter(|i| i.status == InstanceStatus::Online)
        .count()
}

async fn reachable_host(api: &Api) -> Result<u64, NotYet> {
    let raw = api
        .request(Method::GET, "/v1/hosts", None, &[])
        .await
        .map_err(|e| e.to_string())?;
    let hosts: Vec<HostObject> = serde_json::from_slice(&raw).map_err(|e| e.to_string())?;
    match hosts.iter().find(|h| h.name == HOST_NAME) {
        Some(h) if h.reachable => Ok(h.id),
        Some(h) => Err(format!("host {} is {}", h.id, h.state).into()),
        None => Err(format!("{HOST_NAME} has not registered").into()),
    }
}

async fn app_instances(api: &Api, host: u64) -> Result<Vec<InstanceObject>, NotYet> {
    let path = format!("/v1/instances?applicationId={APPLICATION_ID}");
    let raw = api
        .request(Method::GET, &path, None, &[])
        .await
        .map_err(|e| e.to_string())?;
    let mut list: Vec<InstanceObject> = serde_json::from_slice(&raw).map_err(|e| e.to_string())?;
    // An older registration of the same name (a deleted agent state dir) is another host.
    list.retain(|i| i.host_id == host);
    Ok(list)
}

/// Exactly `n` online: during a scale-down from an earlier run's --instances there are more.
/// Games that all keep crashing will not come online in time; better to say so at once.
/// `seen` holds each instance's restart count when first seen: restarts of earlier runs (every
/// dev stop kills the games, and the agent counts that) say nothing about this one.
async fn online_games(
    api: &Api,
    host: u64,
    n: usize,
    seen: &RefCell<HashMap<String, u32>>,
) -> Result<Vec<InstanceObject>, NotYet> {
    let list = app_instances(api, host).await?;
    let online = games_online(&list);
    if online == n {
        return Ok(list);
    }
    if list.is_empty() {
        return Err("no instances yet (the controller deploys them within a second)".into());
    }
    let summary = format!("{online} of {n} online; {}", instances::summary(&list));
    let mut seen = seen.borrow_mut();
    let crashing = list.iter().all(|i| {
        let first = *seen.entry(i.id.clone()).or_insert(i.restarts);
        i.restarts.saturating_sub(first) >= CRASH_LOOP_RESTARTS
    });
    if online == 0 && crashing {
        return Err(NotYet::Hopeless(format!(
            "every sample game keeps crashing: each restarted {CRASH_LOOP_RESTARTS} times or \
             more while dev waited ({summary})"
        )));
    }
    Err(summary.into())
}

/// Why a wait goes on, or why it cannot succeed.
#[derive(Debug)]
enum NotYet {
    Waiting(String),
    Hopeless(String),
}

impl From<String> for NotYet {
    fn from(why: String) -> Self {
        Self::Waiting(why)
    }
}

impl From<&str> for NotYet {
    fn from(why: &str) -> Self {
        Self::Waiting(why.to_owned())
    }
}

/// The demo: one application, its profile running the sample game, a fleet of `n` per host.
pub fn demo_resources(game: &Path, n: u32) -> Vec<Resource> {
    let application = Application {
        id: APPLICATION_ID,
        name: "demo".to_owned(),
        management_protocol: ManagementProtocol::Arcus,
        confirm_allocation: false,
    };
    let profile: Profile = serde_json::from_value(serde_json::json!({
        "id": "demo-1",
        "applicationId": APPLICATION_ID,
        "build": "dev",
        "executable": game.display().to_string(),
        "args": [
            "--port={port}",
            "--management-port={managementPort}",
            "--instance-id={instanceId}",
            "--match-seconds=0"
        ],
    }))
    .expect("the demo profile is valid");
    let fleet: Fleet = serde_json::from_value(serde_json::json!({
        "id": 1,
        "name": "demo",
        "applicationId": APPLICATION_ID,
        "deploymentEnvironment": "production",
        "profileId": "demo-1",
        "regions": [REGION],
        "instancesPerHost": n,
    }))
    .expect("the demo fleet is valid");
    vec![
        Resource::Application(application),
        Resource::Profile(Box::new(profile)),
        Resource::Fleet(Box::new(fleet)),
    ]
}

/// The game confirms it was allocated and received `map=dust`.
fn verify_info(line: &str) -> Result<(), String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("INFO is not JSON ({e})"))?;
    if v.get("allocated") != Some(&serde_json::Value::Bool(true)) {
        return Err("the game does not report allocated=true".to_owned());
    }
    let has_dust = ["allocation", "metadata"].iter().any(|k| {
        v.get(*k)
            .and_then(serde_json::Value::as_array)
            .is_some_and(|pairs| {
                pairs.iter().any(|p| {
                    p.get("key") == Some(&"map".into()) && p.get("value") == Some(&"dust".into())
                })
            })
    });
    if !has_dust {
        return Err("the game did not receive map=dust".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_verification() {
        assert!(
            verify_info(r#"{"allocated":true,"allocation":[{"key":"map","value":"dust"}]}"#)
                .is_ok()
        );
        assert!(
            verify_info(r#"{"allocated":false,"allocation":[{"key":"map","value":"dust"}]}"#)
                .is_err()
        );
        assert!(verify_info(r#"{"allocated":true,"allocation":[]}"#).is_err());
        assert!(verify_info("nope").is_err());
    }

    #[test]
    fn demo_resources_are_the_documented_ones() {
        let r = demo_resources(Path::new("/x/berth-sample-game"), 4);
        let Resource::Profile(p) = &r[1] else {
            panic!("profile second")
        };
        assert_eq!(p.executable, "/x/berth-sample-game");
        assert_eq!(p.args[0], "--port={port}");
        let Resource::Fleet(f) = &r[2] else {
            panic!("fleet third")
        };
        assert_eq!(f.instances_per_host, 4);
        assert_eq!(f.regions, ["local"]);
    }

    #[test]
    fn configs_are_valid_toml_with_absolute_paths() {
        let dir = std::env::temp_dir().join(format!("berthctl-dev-{}", uuid::Uuid::new_v4()));
        let data = prepare_data_dir(&dir).unwrap();
        let (t, fresh) = Tokens::load_or_create(&data).unwrap();
        assert!(fresh && t.admin.len() >= 16);
        let (again, fresh) = Tokens::load_or_create(&data).unwrap();
        assert!(!fresh && again.admin == t.admin);
        let args = DevArgs {
            bin_dir: None,
            data_dir: dir.clone(),
            controller_port: 6820,
            agent_port: 6824,
            instances: 4,
            game_ports: "20000-20999".into(),
            management_ports: "30000-30999".into(),
            check: false,
        };
        let p = write_configs(&args, &data, &t).unwrap();
        let c: toml::Table = std::fs::read_to_string(&p.controller)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(c["listen"].as_str(), Some("127.0.0.1:6820"));
        assert!(c["database"].as_str().unwrap().starts_with("sqlite:///"));
        assert_eq!(c["tokens"].as_array().unwrap().len(), 2);
        assert_eq!(c["regions"][0]["name"].as_str(), Some("local"));
        let a: toml::Table = std::fs::read_to_string(&p.agent).unwrap().parse().unwrap();
        assert_eq!(a["advertise_url"].as_str(), Some("http://127.0.0.1:6824"));
        assert_eq!(a["game_ports"].as_str(), Some("20000-20999"));
        assert_eq!(a["is_virtual"].as_bool(), Some(false));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
