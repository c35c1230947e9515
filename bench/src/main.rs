//! `berth-bench`: measures Berth end to end with real processes on loopback.
//!
//! * `allocate` — allocate/release cycles from many concurrent matchmakers against a durable
//!   controller, agents and sample games (peak, closed loop), or with `--match-seconds` only
//!   allocations, whose games end their matches themselves; then latency at half that rate
//!   (open loop) and unloaded (one matchmaker); a crash check that every held allocation
//!   survives a SIGKILL; and the same load through a do-nothing two-hop HTTP chain (the ceiling).
//! * `spawn` — time for 100 and 1 000 games to be online on one host, and the agent's RSS.
//! * `detect` — time from a host freezing to its idle instances leaving the pool.
//!
//! Each prints one JSON line. Build first: `cargo build --release --workspace --bins`.

mod client;
mod cluster;
mod hop;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use http::Method;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::client::Client;
use crate::cluster::{
    ADMIN, Cluster, Confined, CpuTime, Daemon, MATCHMAKER, MachineTime, Placement, bin_dir,
    cpu_idle, free_port, pids_of, rss_bytes,
};

#[derive(Debug, Parser)]
#[command(
    name = "berth-bench",
    about = "Berth benchmarks (release build recommended)"
)]
struct Cli {
    /// Where berth-controller, berth-agent and berth-sample-game are (default: next to this).
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Allocation throughput and latency, durable, end to end.
    Allocate {
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 2)]
        agents: usize,
        #[arg(long, default_value_t = 100)]
        instances_per_agent: u32,
        /// worker_threads of each agent (default: the agent's own default).
        #[arg(long)]
        agent_threads: Option<usize>,
        /// worker_threads of the controller (default: the controller's own default).
        #[arg(long)]
        controller_threads: Option<usize>,
        /// Where the processes run: `shared` lets the scheduler place every process on every
        /// CPU; `split` keeps the controller and the load generator on the first half of the
        /// CPUs and the agents with their games on the rest, as production puts them on
        /// different machines (the ceiling chain is unconfined either way).
        #[arg(long, value_enum, default_value_t = PlacementArg::Shared)]
        placement: PlacementArg,
        /// `[tls]` on the controller and the agents (the e2e tests' certificates, from the
        /// source tree): matchmakers, the controller and the agents all talk over TLS 1.3.
        #[arg(long)]
        tls: bool,
        /// Matches end in the game, as an Arcus game may end its own: each sample game
        /// reports 4 over Arcus this many seconds after its allocation (decimals allowed), and
        /// matchmakers only allocate. Without it, each matchmaker releases its allocation at once (an
        /// allocate/release cycle, two requests per allocation). Give it instances to spare:
        /// each is busy for its match plus the allocation and the release's report (≈ 20–40 ms
        /// at peak here), and a refusal for an empty pool counts as an error.
        #[arg(long, value_parser = parse_match_seconds)]
        match_seconds: Option<f64>,
        /// Runs, each on a new cluster. With more than one, a last line gives each figure's
        /// range over them: this machine's speed varies from run to run.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        runs: u32,
        /// Print only the JSON line (the default prints it too, after a summary).
        #[arg(long)]
        json: bool,
    },
    /// Time for N games to be online on one host.
    Spawn {
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        games: Vec<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Time from a host's death (its agent frozen) to its idle instances leaving the pool.
    Detect {
        #[arg(long)]
        json: bool,
    },
    /// Controller memory with a large inventory: hosts are registered through the agent API
    /// by this process (no games run), then the controller's RSS is read.
    Inventory {
        #[arg(long, default_value_t = 100_000)]
        instances: usize,
        #[arg(long, default_value_t = 100)]
        per_host: usize,
        #[arg(long)]
        json: bool,
    },
    /// Internal: one hop of the ceiling chain.
    #[command(hide = true)]
    Hop {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        next: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PlacementArg {
    Shared,
    Split,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    berth_http::tls::install_crypto_provider();
    // One thread, as load generators are built: the load generator shares the machine with what
    // it measures, and a second runtime thread only adds wake-ups between the two (3 of 3
    // alternating runs: 0.036–0.038 ms of CPU per cycle against 0.042–0.060). The hops of the
    // ceiling chain run on it too, so the ceiling is measured the same way.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Cmd::Hop { port, next } => hop::serve(port, next).await,
            Cmd::Allocate {
                seconds,
                concurrency,
                agents,
                instances_per_agent,
                agent_threads,
                controller_threads,
                placement,
                tls,
                match_seconds,
                runs,
                json,
            } => {
                let bin = bin_dir(cli.bin_dir.as_deref())?;
                let setup = Setup {
                    controller_threads,
                    agent_threads,
                    placement: match placement {
                        PlacementArg::Shared => None,
                        PlacementArg::Split => Some(Placement::split()?),
                    },
                    tls,
                    match_seconds,
                };
                let mut results = Vec::new();
                for _ in 0..runs {
                    let r = allocate(
                        bin.clone(),
                        seconds,
                        concurrency,
                        agents,
                        instances_per_agent,
                        setup,
                    )
                    .await?;
                    report(&r, json);
                    results.push(r);
                }
                if results.len() > 1 {
                    report(&ranges(&results), json);
                }
                Ok(())
            }
            Cmd::Spawn { games, json } => {
                let bin = bin_dir(cli.bin_dir.as_deref())?;
                let r = spawn(bin, &games).await?;
                report(&r, json);
                Ok(())
            }
            Cmd::Inventory {
                instances,
                per_host,
                json,
            } => {
                let bin = bin_dir(cli.bin_dir.as_deref())?;
                let r = inventory(bin, instances, per_host).await?;
                report(&r, json);
                Ok(())
            }
            Cmd::Detect { json } => {
                let bin = bin_dir(cli.bin_dir.as_deref())?;
                let r = detect(bin).await?;
                report(&r, json);
                Ok(())
            }
        }
    })
}

fn report(v: &Value, json_only: bool) {
    if !json_only {
        eprintln!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
    println!("{v}");
}

/// The controller's database commits so far, from its metrics: how many, how long in all,
/// how many writes they carried, and how many took over 10 ms (what stalls allocations).
#[derive(Debug, Clone, Copy)]
struct Commits {
    count: f64,
    seconds: f64,
    writes: f64,
    over_10ms: f64,
}

impl Commits {
    /// `None` when the controller's metrics cannot be read or lack the commit series (an
    /// older controller): the output then says `null` rather than zero commits.
    async fn read(client: &Client, base: &str) -> Option<Commits> {
        let url = format!("{base}/metrics");
        match client.get(&url, Some(ADMIN)).await {
            Ok((200, body)) => Commits::parse(&String::from_utf8_lossy(&body)),
            _ => None,
        }
    }

    fn parse(text: &str) -> Option<Commits> {
        let value = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
        };
        let histogram = "berth_controller_store_commit_duration_seconds";
        let count = value(&format!("{histogram}_count"))?;
        Some(Commits {
            count,
            seconds: value(&format!("{histogram}_sum"))?,
            writes: value("berth_controller_store_writes_total")?,
            over_10ms: count - value(&format!("{histogram}_bucket{{le=\"0.01\"}}"))?,
        })
    }
}

impl std::ops::Sub for Commits {
    type Output = Commits;
    fn sub(self, o: Commits) -> Commits {
        Commits {
            count: self.count - o.count,
            seconds: self.seconds - o.seconds,
            writes: self.writes - o.writes,
            over_10ms: self.over_10ms - o.over_10ms,
        }
    }
}

/// Each figure's lowest, median and highest value over several `allocate` runs.
fn ranges(runs: &[Value]) -> Value {
    const FIGURES: [(&str, &str); 10] = [
        ("allocationsPerSecond", "/allocationsPerSecond"),
        ("p50Ms", "/p50Ms"),
        ("p99Ms", "/p99Ms"),
        ("halfLoadP99Ms", "/halfLoad/p99Ms"),
        ("unloadedP50Ms", "/unloaded/p50Ms"),
        ("unloadedP99Ms", "/unloaded/p99Ms"),
        ("ceilingRequestsPerSecond", "/ceilingRequestsPerSecond"),
        (
            "plainHopRequestsPerCoreSecond",
            "/plainHopRequestsPerCoreSecond",
        ),
        ("machineBusy", "/machineBusy"),
        ("agentRssBytes", "/agentRssBytes"),
    ];
    let range = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = match n {
            0 => None,
            _ if n % 2 == 1 => Some(values[n / 2]),
            _ => Some(round3((values[n / 2 - 1] + values[n / 2]) / 2.0)),
        };
        json!({
            "min": values.first(),
            "median": median,
            "max": values.last(),
        })
    };
    let sum_of = |pointer: &str| {
        runs.iter()
            .map(|r| {
                r.pointer(pointer)
                    .and_then(Value::as_object)
                    .map_or(0.0, |o| o.values().filter_map(Value::as_f64).sum())
            })
            .map(round3)
            .collect::<Vec<f64>>()
    };
    let mut figures = serde_json::Map::new();
    for (name, pointer) in FIGURES {
        let values = runs
            .iter()
            .filter_map(|r| r.pointer(pointer)?.as_f64())
            .collect();
        figures.insert(name.to_owned(), range(values));
    }
    figures.insert(
        "cpuMsPerAllocation".to_owned(),
        range(sum_of("/cpuMsPerAllocation")),
    );
    figures.insert(
        "kernelMsPerAllocation".to_owned(),
        range(sum_of("/kernelMsPerAllocation")),
    );
    json!({
        "benchmark": "allocate",
        "runs": runs.len(),
        // Every run of one invocation has the same setup: the line says what was measured.
        "placement": runs.first().map(|r| r["placement"].clone()),
        "tls": runs.first().map(|r| r["tls"].clone()),
        "releasedBy": runs.first().map(|r| r["releasedBy"].clone()),
        "matchSeconds": runs.first().map(|r| r["matchSeconds"].clone()),
        "cpuIdle": runs.first().map(|r| r["cpuIdle"].clone()),
        "durable": runs.iter().all(|r| r["durable"] == true),
        // null if any run's games could not say.
        "matchesGivenAway": runs
            .iter()
            .map(|r| r["matchesGivenAway"].as_u64())
            .sum::<Option<u64>>(),
        "instancesNotReturned": runs
            .iter()
            .filter_map(|r| r["instancesNotReturned"].as_u64())
            .sum::<u64>(),
        "errors": runs.iter().filter_map(|r| r["errors"].as_u64()).sum::<u64>(),
        "ranges": figures,
    })
}

/// Latencies in microseconds, and how many operations failed.
#[derive(Debug, Default)]
struct Stats {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    micros: Vec<u32>,
}

impl Stats {
    fn merge(&mut self, o: Stats) {
        self.ok += o.ok;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        self.micros.extend(o.micros);
    }

    fn record(&mut self, r: Result<Result<Duration, String>, tokio::task::JoinError>) {
        match r {
            Ok(Ok(d)) => {
                self.ok += 1;
                self.micros
                    .push(d.as_micros().min(u128::from(u32::MAX)) as u32);
            }
            Ok(Err(e)) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e.to_string());
            }
        }
    }

    fn percentile_ms(&mut self, p: f64) -> f64 {
        if self.micros.is_empty() {
            return 0.0;
        }
        self.micros.sort_unstable();
        let i = ((self.micros.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.micros[i]) / 1000.0
    }
}

/// The application the load allocates from.
const BENCH_APP: u32 = 1;
/// With `--match-seconds`, the application of the crash check's held allocations.
const HOLD_APP: u32 = 2;

/// One worker's operation: returns the latency to record, or why it failed.
type Op = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<Duration, String>> + Send>>
        + Send
        + Sync,
>;

/// Runs `op` from `concurrency` workers: `warmup` unmeasured, then `measure`. `sample` is
/// taken as the measured window opens and as it closes, so what it reads (CPU time) covers
/// the same operations as the statistics.
async fn drive<T>(
    concurrency: usize,
    warmup: Duration,
    measure: Duration,
    op: Op,
    sample: impl AsyncFn() -> T,
) -> (Stats, Duration, [T; 2]) {
    let start = Instant::now() + warmup;
    let end = start + measure;
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let op = op.clone();
        workers.push(tokio::spawn(async move {
            let mut s = Stats::default();
            loop {
                let now = Instant::now();
                if now >= end {
                    return s;
                }
                let r = op().await;
                if now >= start {
                    s.record(Ok(r));
                }
            }
        }));
    }
    tokio::time::sleep_until(start.into()).await;
    let opened = sample().await;
    tokio::time::sleep_until(end.into()).await;
    let closed = sample().await;
    let mut total = Stats::default();
    for w in workers {
        if let Ok(s) = w.await {
            total.merge(s);
        }
    }
    (total, measure, [opened, closed])
}

/// Starts `op` at a steady `rate` per second for `measure` (open loop: a slow answer does not
/// delay the next start), at most `max_outstanding` at once; a start that finds that many
/// still running is counted as an error rather than silently skipped.
async fn drive_paced(rate: f64, max_outstanding: usize, measure: Duration, op: Op) -> Stats {
    let permits = Arc::new(tokio::sync::Semaphore::new(max_outstanding));
    let t0 = Instant::now();
    let mut started = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    let mut total = Stats::default();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let elapsed = t0.elapsed();
        if elapsed >= measure {
            break;
        }
        let due = (elapsed.as_secs_f64() * rate) as u64;
        while started < due {
            started += 1;
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                total.errors += 1;
                total
                    .first_error
                    .get_or_insert_with(|| format!("{max_outstanding} operations outstanding"));
                continue;
            };
            let op = op.clone();
            tasks.spawn(async move {
                let r = op().await;
                drop(permit);
                r
            });
        }
        while let Some(done) = tasks.try_join_next() {
            total.record(done);
        }
    }
    while let Some(done) = tasks.join_next().await {
        total.record(done);
    }
    total
}

#[derive(serde::Deserialize)]
struct Allocated {
    id: String,
    #[serde(rename = "allocationId")]
    allocation_id: Option<String>,
}

/// How the processes of an `allocate` run are set up, beyond their number.
#[derive(Debug, Clone, Copy)]
struct Setup {
    /// `worker_threads` (None: the daemons' defaults).
    controller_threads: Option<usize>,
    agent_threads: Option<usize>,
    placement: Option<Placement>,
    tls: bool,
    /// Games end their own matches after this many seconds; None: matchmakers release.
    match_seconds: Option<f64>,
}

fn parse_match_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 3600.0 => Ok(s),
        _ => Err(format!(
            "'{text}' is not a match length in seconds between 0 and 3600 (for example 0.01)"
        )),
    }
}

async fn allocate(
    bin: PathBuf,
    seconds: u64,
    concurrency: usize,
    agents: usize,
    per_agent: u32,
    setup: Setup,
) -> Result<Value> {
    let Setup {
        controller_threads,
        agent_threads,
        placement,
        tls,
        match_seconds,
    } = setup;
    let instances = agents * per_agent as usize;
    if instances < concurrency {
        bail!(
            "{instances} instances cannot serve {concurrency} concurrent matchmakers; raise --instances-per-agent"
        );
    }
    let mut cluster = Cluster::new(bin)?;
    cluster.controller_threads = controller_threads;
    cluster.agent_threads = agent_threads;
    cluster.placement = placement;
    cluster.tls = tls;
    cluster.agent_slots = agents;
    // Games that end their own matches cannot hold an allocation across the crash check, so
    // that check allocates from a fleet of games that stay allocated until released, idle
    // while the load runs.
    let hold = concurrency.min(instances / 2).max(1);
    let hold_per_agent = match match_seconds {
        Some(_) => hold.div_ceil(agents),
        None => 0,
    };
    cluster.check_ports_for(per_agent as usize + hold_per_agent)?;
    cluster.start_controller().await?;
    for i in 0..agents {
        cluster.start_agent(i, false, true).await?;
    }
    cluster
        .create_fleet(BENCH_APP, per_agent, match_seconds)
        .await?;
    let hold_app = if hold_per_agent > 0 {
        cluster
            .create_fleet(HOLD_APP, hold_per_agent as u32, None)
            .await?;
        HOLD_APP
    } else {
        BENCH_APP
    };
    cluster
        .wait_online(
            instances + hold_per_agent * agents,
            Duration::from_secs(120),
        )
        .await
        .context("waiting for the fleet")?;
    // The load generator runs on the controller's side of the split until the ceiling.
    let confined = Confined::to(placement.as_ref().map(|p| &p.controller))?;

    let base = cluster.controller_url().to_owned();
    let client = cluster.new_client()?;
    let body = Bytes::from(
        json!({"filter": "regionName=bench", "metadata": [{"key": "map", "value": "dust"}]})
            .to_string(),
    );
    let op: Op = {
        let client = client.clone();
        let base = base.clone();
        Arc::new(move || {
            let client = client.clone();
            let base = base.clone();
            let body = body.clone();
            Box::pin(async move {
                let t = Instant::now();
                let (status, b) = client
                    .send(
                        Method::POST,
                        &format!("{base}/v1/applications/{BENCH_APP}/allocate"),
                        Some(MATCHMAKER),
                        Some(body),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                let took = t.elapsed();
                if status != 200 {
                    return Err(format!(
                        "allocate: {status} {}",
                        String::from_utf8_lossy(&b)
                    ));
                }
                let a: Allocated = serde_json::from_slice(&b).map_err(|e| e.to_string())?;
                if match_seconds.is_some() {
                    return Ok(took);
                }
                let (status, b) = client
                    .send(
                        Method::POST,
                        &format!("{base}/v1/instances/{}/deallocate", a.id),
                        Some(MATCHMAKER),
                        None,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                if status != 200 {
                    return Err(format!(
                        "deallocate: {status} {}",
                        String::from_utf8_lossy(&b)
                    ));
                }
                Ok(took)
            })
        })
    };
    // CPU used by each kind of process in the measured window: where a cycle's cost goes.
    let controller_pid = cluster.controller.as_ref().and_then(Daemon::pid);
    let agent_pids: Vec<u32> = cluster.agents.iter().filter_map(Daemon::pid).collect();
    let game_pids = pids_of(&cluster.sample_game());
    // CPU first, at the window's edge; the metrics request after it takes a millisecond.
    let cpu_now = async || {
        let machine = MachineTime::now();
        let processes = [
            controller_pid.map(CpuTime::of).unwrap_or_default(),
            agent_pids.iter().copied().map(CpuTime::of).sum(),
            game_pids.iter().copied().map(CpuTime::of).sum(),
            CpuTime::of(std::process::id()),
        ];
        let commits = Commits::read(&client, &base).await;
        (machine, processes, commits)
    };
    let (
        mut stats,
        window,
        [
            (machine_before, cpu_before, commits_before),
            (machine_after, cpu_after, commits_after),
        ],
    ) = drive(
        concurrency,
        Duration::from_secs(1),
        Duration::from_secs(seconds),
        op.clone(),
        cpu_now,
    )
    .await;
    let peak = stats.ok as f64 / window.as_secs_f64();
    // DESIGN.md §9 states latency at half of peak load and unloaded; both are measured on the
    // same cluster right after the peak.
    let half_commits_before = Commits::read(&client, &base).await;
    let mut half = drive_paced(
        peak / 2.0,
        instances,
        Duration::from_secs(seconds),
        op.clone(),
    )
    .await;
    let half_commits = Commits::read(&client, &base)
        .await
        .zip(half_commits_before)
        .map(|(after, before)| after - before);
    let (mut unloaded, _, _) = drive(
        1,
        Duration::from_millis(200),
        Duration::from_secs(seconds.clamp(1, 5)),
        op,
        async || (),
    )
    .await;
    let used: Vec<CpuTime> = cpu_after
        .iter()
        .zip(&cpu_before)
        .map(|(a, b)| *a - *b)
        .collect();
    let per_cycle = |seconds: &dyn Fn(&CpuTime) -> f64| {
        let ms = |i: usize| round3(seconds(&used[i]) * 1000.0 / (stats.ok.max(1) as f64));
        json!({
            "controller": ms(0),
            "agents": ms(1),
            "games": ms(2),
            "loadGenerator": ms(3),
        })
    };
    let cpu_ms_per_allocation = per_cycle(&|t| t.total());
    let kernel_ms_per_allocation = per_cycle(&|t| t.system);
    let (busy, steal) = machine_before.shares_until(machine_after);
    let commits = commits_after
        .zip(commits_before)
        .map(|(after, before)| after - before);
    let controller_rss = cluster
        .controller
        .as_ref()
        .and_then(Daemon::pid)
        .map_or(0, rss_bytes);
    let agent_rss = cluster
        .agents
        .iter()
        .filter_map(Daemon::pid)
        .map(rss_bytes)
        .max()
        .unwrap_or(0);

    // Liveness: every instance the runs used comes back to the pool, however its allocation
    // ended (a release, or the game ending its match).
    let not_returned = instances_not_returned(&client, &base, instances).await?;

    // Durability: hold some allocations, SIGKILL the controller, and find them all again.
    let mut held = Vec::new();
    // Instances released in the last cycles are offered again once their games acknowledge
    // the release: a refusal now is a busy pool, retried, not a durability failure.
    let deadline = Instant::now() + Duration::from_secs(10);
    while held.len() < hold {
        let (status, b) = client
            .send(
                Method::POST,
                &format!("{base}/v1/applications/{hold_app}/allocate"),
                Some(MATCHMAKER),
                Some(Bytes::from_static(b"{}")),
            )
            .await?;
        if status == 200 {
            let a: Allocated = serde_json::from_slice(&b)?;
            held.push((a.id, a.allocation_id));
        } else if Instant::now() >= deadline {
            bail!(
                "could not hold {hold} allocations for the crash check ({} held); last answer {status}: {}",
                held.len(),
                String::from_utf8_lossy(&b)
            );
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let client2 = cluster.client.clone();
    if let Some(c) = cluster.controller.as_mut() {
        c.restart(&client2).await?;
    }
    let mut durable = true;
    for (id, alloc) in &held {
        let (status, b) = client
            .get(&format!("{base}/v1/instances/{id}"), Some(ADMIN))
            .await?;
        let v: Value = serde_json::from_slice(&b).unwrap_or_default();
        if status != 200 || v["status"] != 5 || v["allocationId"].as_str() != alloc.as_deref() {
            durable = false;
        }
    }

    let given_away = matches_given_away(&client, &base).await?;

    drop(confined);
    let ceiling = ceiling(concurrency, seconds).await?;
    let secs = window.as_secs_f64();
    Ok(json!({
        "benchmark": "allocate",
        "allocationsPerSecond": (stats.ok as f64 / secs).round(),
        "p50Ms": round3(stats.percentile_ms(0.50)),
        "p99Ms": round3(stats.percentile_ms(0.99)),
        "halfLoad": {
            "ratePerSecond": (peak / 2.0).round(),
            "achievedPerSecond": (half.ok as f64 / secs).round(),
            "p50Ms": round3(half.percentile_ms(0.50)),
            "p99Ms": round3(half.percentile_ms(0.99)),
            "errors": half.errors,
            "firstError": half.first_error.take(),
            "commitsOver10Ms": half_commits.map(|c| c.over_10ms),
        },
        "unloaded": {
            "p50Ms": round3(unloaded.percentile_ms(0.50)),
            "p99Ms": round3(unloaded.percentile_ms(0.99)),
            "errors": unloaded.errors,
        },
        "durable": durable,
        "matchesGivenAway": given_away,
        "instancesNotReturned": not_returned,
        "heldAcrossControllerKill": held.len(),
        "instances": instances,
        "concurrency": concurrency,
        "agents": agents,
        "agentThreads": agent_threads,
        "controllerThreads": controller_threads,
        "placement": if placement.is_some() { "split" } else { "shared" },
        "tls": tls,
        "releasedBy": if match_seconds.is_some() { "game" } else { "matchmaker" },
        "matchSeconds": match_seconds,
        "seconds": seconds,
        "allocations": stats.ok,
        "errors": stats.errors,
        "firstError": stats.first_error,
        "agentRssBytes": agent_rss,
        "controllerRssBytes": controller_rss,
        "ceilingRequestsPerSecond": ceiling.per_second.round(),
        "cpuMsPerAllocation": cpu_ms_per_allocation,
        "kernelMsPerAllocation": kernel_ms_per_allocation,
        "machineBusy": round3(busy),
        "machineSteal": round3(steal),
        "commits": commits.map(|c| json!({
            "perSecond": (c.count / secs).round(),
            "writesPerCommit": round3(c.writes / c.count.max(1.0)),
            "meanMs": round3(c.seconds * 1000.0 / c.count.max(1.0)),
            "over10Ms": c.over_10ms,
        })),
        "plainHopRequestsPerCoreSecond": ceiling.per_core_second.round(),
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "cpuIdle": cpu_idle(),
    }))
}

/// How many of the benchmark fleet's `instances` are still not allocatable when the pool has
/// had [`RETURN_WITHIN`] to settle after the load: an allocation the controller holds on to
/// after it ended is an instance lost to the pool. Must be 0.
async fn instances_not_returned(client: &Client, base: &str, instances: usize) -> Result<usize> {
    const RETURN_WITHIN: Duration = Duration::from_secs(10);
    let deadline = Instant::now() + RETURN_WITHIN;
    loop {
        let (status, body) = client
            .get(
                &format!("{base}/v1/instances?applicationId={BENCH_APP}"),
                Some(ADMIN),
            )
            .await?;
        if status != 200 {
            bail!(
                "GET /v1/instances: {status} {}",
                String::from_utf8_lossy(&body)
            );
        }
        let free = serde_json::from_slice::<Vec<Value>>(&body)?
            .iter()
            .filter(|i| i["status"] == 4 && i["allocationId"].is_null())
            .count();
        let missing = instances.saturating_sub(free);
        if missing == 0 || Instant::now() >= deadline {
            return Ok(missing);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks every game for `INFO` and adds up the `allocated` frames each received while its match
/// ran: a running match given to a second matchmaker, seen from the game. Must be 0. None when
/// the games do not count them (an older `berth-sample-game` under `--bin-dir`).
async fn matches_given_away(client: &Client, base: &str) -> Result<Option<u64>> {
    let (status, body) = client
        .get(&format!("{base}/v1/instances"), Some(ADMIN))
        .await?;
    if status != 200 {
        bail!(
            "GET /v1/instances: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    let mut given_away = 0;
    for instance in serde_json::from_slice::<Vec<Value>>(&body)? {
        let port = instance["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .with_context(|| format!("an instance without a port: {instance}"))?;
        let ask = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            stream.write_all(b"INFO\n").await?;
            let mut line = String::new();
            tokio::io::BufReader::new(stream)
                .read_line(&mut line)
                .await?;
            anyhow::Ok(line)
        };
        let line = tokio::time::timeout(Duration::from_secs(5), ask)
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r)
            .with_context(|| format!("INFO of the game on port {port} ({})", instance["id"]))?;
        let info: Value = serde_json::from_str(&line)
            .with_context(|| format!("INFO of the game on port {port}: {line:?}"))?;
        match info["allocatedDuringMatch"].as_u64() {
            Some(n) => given_away += n,
            None => return Ok(None),
        }
    }
    Ok(Some(given_away))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A child process killed (and reaped) when this is dropped, on every way out.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What plain HTTP does on this machine in this run.
struct Ceiling {
    /// Requests per second through client → hop → hop, same concurrency.
    per_second: f64,
    /// Requests the last hop (a plain server that answers `{}`) serves per second of its own
    /// CPU: the figure DESIGN.md §9 gives for its reference machine (~160 000 per core).
    per_core_second: f64,
}

async fn ceiling(concurrency: usize, seconds: u64) -> Result<Ceiling> {
    let me = std::env::current_exe()?;
    let (p1, p2) = (free_port()?, free_port()?);
    let hop2 = KillOnDrop(
        std::process::Command::new(&me)
            .args(["hop", "--port", &p2.to_string()])
            .spawn()?,
    );
    let _hop1 = KillOnDrop(
        std::process::Command::new(&me)
            .args([
                "hop",
                "--port",
                &p1.to_string(),
                "--next",
                &format!("http://127.0.0.1:{p2}/"),
            ])
            .spawn()?,
    );
    let client = Client::new();
    let url = format!("http://127.0.0.1:{p1}/");
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get(&url, None).await.is_err() {
        if Instant::now() > deadline {
            bail!("ceiling chain did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let op: Op = Arc::new(move || {
        let client = client.clone();
        let url = url.clone();
        Box::pin(async move {
            let t = Instant::now();
            let (status, _) = client
                .send(Method::POST, &url, None, Some(Bytes::from_static(b"{}")))
                .await
                .map_err(|e| e.to_string())?;
            if status != 200 {
                return Err(format!("hop: {status}"));
            }
            Ok(t.elapsed())
        })
    });
    let last_hop = hop2.0.id();
    let (stats, window, [before, after]) = drive(
        concurrency,
        Duration::from_secs(1),
        Duration::from_secs(seconds),
        op,
        async || CpuTime::of(last_hop),
    )
    .await;
    let busy = (after - before).total();
    Ok(Ceiling {
        per_second: stats.ok as f64 / window.as_secs_f64(),
        per_core_second: if busy > 0.0 {
            stats.ok as f64 / busy
        } else {
            0.0
        },
    })
}

async fn spawn(bin: PathBuf, sizes: &[usize]) -> Result<Value> {
    let mut results = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let mut cluster = Cluster::new(bin.clone())?;
        // One agent per cluster, each in its own ranges: the last cluster's games may still
        // be letting go of their ports.
        cluster.agent_slots = sizes.len();
        cluster.check_ports_for(n)?;
        cluster.start_agent(i, false, false).await?;
        let agent = cluster.agents[0].url.clone();
        let game = cluster.sample_game().display().to_string();
        let client = cluster.client.clone();
        let started = Instant::now();
        let mut deploys = Vec::new();
        // Deploy as a matchmaker's reconciler would: many requests in flight at once.
        let per_task = n.div_ceil(32);
        for t in 0..n.div_ceil(per_task) {
            let client = client.clone();
            let agent = agent.clone();
            let game = game.clone();
            let count = per_task.min(n - t * per_task);
            deploys.push(tokio::spawn(async move {
                for _ in 0..count {
                    let body = json!({"profile": {
                        "id": "spawn", "applicationId": 1, "executable": game,
                        "args": ["--port={port}", "--management-port={managementPort}", "--instance-id={instanceId}"],
                    }});
                    let (status, text) = client.post(&format!("{agent}/v1/instances"), Some(ADMIN), &body).await?;
                    if status != 201 {
                        bail!("deploy: {status} {text}");
                    }
                }
                Ok(())
            }));
        }
        for d in deploys {
            d.await??;
        }
        let deployed = started.elapsed();
        loop {
            let (_, b) = client
                .get(&format!("{agent}/v1/instances"), Some(ADMIN))
                .await?;
            let list: Vec<Value> = serde_json::from_slice(&b)?;
            let online = list
                .iter()
                .filter(|i| i["status"] == 4 && i["arcusConnected"] == true)
                .count();
            if online >= n {
                break;
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("only {online} of {n} games online after 120 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let online = started.elapsed();
        let rss = cluster.agents[0].pid().map_or(0, rss_bytes);
        results.push(json!({
            "games": n,
            "onlineSeconds": round3(online.as_secs_f64()),
            "deployRequestsSeconds": round3(deployed.as_secs_f64()),
            "agentRssBytes": rss,
        }));
    }
    Ok(json!({"benchmark": "spawn", "results": results}))
}

async fn detect(bin: PathBuf) -> Result<Value> {
    let mut cluster = Cluster::new(bin)?;
    cluster.start_controller().await?;
    cluster.start_agent(0, false, true).await?;
    cluster.create_fleet(BENCH_APP, 4, None).await?;
    cluster.wait_online(4, Duration::from_secs(60)).await?;
    let host_url = format!("{}/v1/hosts/1", cluster.controller_url());
    let client = cluster.client.clone();
    // Freeze the agent (as a hung host would be): it stops heartbeating, games keep running.
    let frozen = Instant::now();
    cluster.agents[0].signal(Signal::SIGSTOP);
    loop {
        let (_, b) = client.get(&host_url, Some(ADMIN)).await?;
        let h: Value = serde_json::from_slice(&b)?;
        if h["reachable"] == false {
            break;
        }
        if frozen.elapsed() > Duration::from_secs(30) {
            bail!("host still reachable after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let detected = frozen.elapsed();
    let (status, _) = client
        .post(
            &format!("{}/v1/applications/1/allocate", cluster.controller_url()),
            Some(MATCHMAKER),
            &json!({}),
        )
        .await?;
    let thawed = Instant::now();
    cluster.agents[0].signal(Signal::SIGCONT);
    cluster.wait_online(4, Duration::from_secs(30)).await?;
    let rejoined = thawed.elapsed();
    Ok(json!({
        "benchmark": "detect",
        "heartbeatPeriodMs": 1000,
        "expiryFactor": 5.0,
        "boundMs": 6000,
        "detectedMs": detected.as_millis() as u64,
        "allocateWhileDeadStatus": status,
        "rejoinedMs": rejoined.as_millis() as u64,
    }))
}

/// Registers `instances` instances on hosts of `per_host` each, as agents would, and reads the
/// controller's memory. The instances carry realistic fields (ids, live state, ports).
async fn inventory(bin: PathBuf, instances: usize, per_host: usize) -> Result<Value> {
    let mut cluster = Cluster::new(bin)?;
    cluster.start_controller().await?;
    let base = cluster.controller_url().to_owned();
    let client = cluster.client.clone();
    let controller_pid = cluster
        .controller
        .as_ref()
        .and_then(Daemon::pid)
        .context("the controller is not running")?;
    let rss_empty = rss_bytes(controller_pid);
    let identities = synthetic_agents().await?;
    let hosts = instances.div_ceil(per_host.max(1));
    let started = Instant::now();
    let mut made = 0usize;
    for h in 0..hosts {
        let n = per_host.min(instances - made);
        let views: Vec<Value> = (0..n)
            .map(|i| {
                json!({
                    "id": uuid::Uuid::new_v4().to_string(), "applicationId": 1, "fleetId": 1,
                    "profileId": "bench-1", "build": "1.0.0", "managementProtocol": "arcus",
                    "port": 20000 + i, "managementPort": 30000 + i, "status": 4, "state": "running",
                    "pid": 1000 + i, "pidChangedAt": 1_700_000_000u64, "startedAt": 1_700_000_000u64,
                    "createdAt": 1_700_000_000u64, "updatedAt": 1_700_000_000u64, "restarts": 0,
                    "autoRestart": true, "arcusConnected": true, "numPlayers": 0, "numPlayersMax": 16,
                    "liveHostName": format!("bench-game-{h}-{i}"), "liveMap": "dust", "liveRules": "ranked",
                    "liveGameVersion": "1.0.0", "metadata": [], "reverseMetadata": [], "version": 1,
                })
            })
            .collect();
        made += n;
        let body = json!({
            "hostName": format!("synthetic-{h}"), "region": "bench", "dcLocation": "bench-1",
            "isVirtual": false, "advertiseUrl": format!("http://127.0.0.1:{identities}/{h}"),
            "addresses": ["127.0.0.1"], "labels": {}, "capacity": {"cpus": 32, "memoryBytes": 1u64 << 37},
            "agentVersion": "bench", "agentToken": format!("synthetic-agent-token-{h}-0123456789"),
            "instances": views,
        });
        let (status, text) = client
            .post(
                &format!("{base}/v1/agent/register"),
                Some(cluster::JOIN),
                &body,
            )
            .await?;
        if status != 200 {
            bail!("register host {h}: {status} {text}");
        }
    }
    let registered = started.elapsed();
    // Read memory once the controller lists everything and its RSS has stopped moving.
    let listed = wait_inventory(&client, &base, hosts, made, Duration::from_secs(60)).await?;
    let rss = settled_rss(controller_pid, Duration::from_secs(30)).await?;
    Ok(json!({
        "benchmark": "inventory",
        "instances": made,
        "hosts": listed.len(),
        "registerSeconds": round3(registered.as_secs_f64()),
        "controllerRssBytes": rss,
        "controllerRssEmptyBytes": rss_empty,
        "bytesPerInstance": (rss.saturating_sub(rss_empty)) / made.max(1) as u64,
    }))
}

/// The one thing the controller asks a registering agent (`GET /v1/host`, to check that it
/// can call it at its advertised address), answered for every synthetic host at once: host `h`
/// is advertised as `http://127.0.0.1:<port>/<h>`. Returns the port.
async fn synthetic_agents() -> Result<u16> {
    use http_body_util::Full;
    use hyper::body::Incoming;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                let h = req
                    .uri()
                    .path()
                    .trim_start_matches('/')
                    .split('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let body = json!({
                    "hostName": format!("synthetic-{h}"), "region": "bench", "dcLocation": "bench-1",
                    "isVirtual": false, "labels": {}, "capacity": {"cpus": 32, "memoryBytes": 1u64 << 37},
                    "agentVersion": "bench", "instances": 0, "instancesByStatus": {},
                    "loadAverage": [0.0, 0.0, 0.0], "registered": false, "controllerUrl": "",
                });
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                    body.to_string(),
                ))))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
            );
        }
    });
    Ok(port)
}

/// Waits until `GET /v1/hosts` lists `hosts` hosts holding `instances` instances in all;
/// returns that listing.
async fn wait_inventory(
    client: &Client,
    base: &str,
    hosts: usize,
    instances: usize,
    within: Duration,
) -> Result<Vec<Value>> {
    let deadline = Instant::now() + within;
    loop {
        let (status, b) = client.get(&format!("{base}/v1/hosts"), Some(ADMIN)).await?;
        if status != 200 {
            bail!("GET /v1/hosts: {status} {}", String::from_utf8_lossy(&b));
        }
        let listed: Vec<Value> = serde_json::from_slice(&b)?;
        let held: u64 = listed.iter().filter_map(|h| h["instances"].as_u64()).sum();
        if listed.len() == hosts && held == instances as u64 {
            return Ok(listed);
        }
        if Instant::now() > deadline {
            bail!(
                "after {within:?} the controller lists {} of {hosts} hosts holding {held} of \
                 {instances} instances",
                listed.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A process's RSS once it has settled: two readings 200 ms apart that differ by less than
/// 1 %.
async fn settled_rss(pid: u32, within: Duration) -> Result<u64> {
    let deadline = Instant::now() + within;
    let mut last = rss_bytes(pid);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = rss_bytes(pid);
        if now == 0 {
            bail!("process {pid} is gone (no RSS in /proc/{pid}/status)");
        }
        if now.abs_diff(last) * 100 < last {
            return Ok(now);
        }
        if Instant::now() > deadline {
            bail!(
                "the RSS of process {pid} still moved by 1 % or more in 200 ms after {within:?}: \
                 {last} -> {now} bytes"
            );
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(rate: f64, unloaded_p50: f64, durable: bool, errors: u64) -> Value {
        json!({
            "allocationsPerSecond": rate,
            "unloaded": {"p50Ms": unloaded_p50},
            "durable": durable,
            "errors": errors,
            "cpuMsPerAllocation": {"controller": 0.1, "agents": 0.05, "games": 0.04, "loadGenerator": 0.02},
            "placement": "split",
            "tls": true,
            "cpuIdle": {"driver": "haltpoll", "haltPollNs": 0},
        })
    }

    #[test]
    fn ranges_give_each_figure_its_lowest_median_and_highest() {
        let runs = [
            run(6000.0, 0.45, true, 0),
            run(5000.0, 0.40, true, 2),
            run(7000.0, 0.50, true, 1),
        ];
        let r = ranges(&runs);
        assert_eq!(
            (&r["placement"], &r["tls"], &r["cpuIdle"]),
            (
                &json!("split"),
                &json!(true),
                &json!({"driver": "haltpoll", "haltPollNs": 0})
            )
        );
        assert_eq!(
            r["ranges"]["allocationsPerSecond"],
            json!({"min": 5000.0, "median": 6000.0, "max": 7000.0})
        );
        assert_eq!(
            r["ranges"]["unloadedP50Ms"],
            json!({"min": 0.40, "median": 0.45, "max": 0.50})
        );
        assert_eq!(r["ranges"]["cpuMsPerAllocation"]["median"], 0.21);
        // A figure no run has stays empty rather than made up.
        assert_eq!(r["ranges"]["p99Ms"]["median"], Value::Null);
        assert_eq!(
            (r["runs"].as_u64(), r["errors"].as_u64()),
            (Some(3), Some(3))
        );
        assert_eq!(r["durable"], true);
    }

    #[test]
    fn commits_are_read_from_the_controllers_metrics() {
        let text = "# TYPE berth_controller_store_commit_duration_seconds histogram
berth_controller_store_commit_duration_seconds_sum 1.5
berth_controller_store_commit_duration_seconds_count 100
berth_controller_store_commit_duration_seconds_bucket{le=\"0.005\"} 90
berth_controller_store_commit_duration_seconds_bucket{le=\"0.01\"} 97
berth_controller_store_commit_duration_seconds_bucket{le=\"+Inf\"} 100
berth_controller_store_writes_total 1600
";
        let c = Commits::parse(text).expect("every series is there");
        assert_eq!((c.count, c.seconds, c.writes), (100.0, 1.5, 1600.0));
        assert_eq!(c.over_10ms, 3.0);
        // A controller without the series gives no figures, not zeros.
        assert!(Commits::parse("berth_controller_store_writes_total 5").is_none());
    }

    #[test]
    fn one_run_that_lost_an_allocation_makes_the_ranges_not_durable() {
        let r = ranges(&[run(6000.0, 0.45, true, 0), run(5000.0, 0.45, false, 0)]);
        assert_eq!(r["durable"], false);
        // An even count's median lies between the middle two.
        assert_eq!(r["ranges"]["allocationsPerSecond"]["median"], 5500.0);
    }
}
