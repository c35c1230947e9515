//! `berth-sample-game`: the game server Berth's tests, dev mode and benchmarks run.
//!
//! Its flags and its `INFO` answer are a contract for outside harnesses (ARCUS.md §8). It is
//! kept tiny (one thread, no allocation per idle second) because benchmarks start a thousand of
//! them on one host.

use std::process::ExitCode;
use std::time::Duration;

use berth_protocol::metadata;
use berth_sdk::{ArcusHandle, ArcusServer, Event, Events, GameStatus, KeyValue, LiveState};
use clap::{Parser, ValueEnum};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, sleep_until};

/// Longest request line on the game port; a client that sends more is cut off rather than
/// buffered.
const MAX_LINE: usize = 1024;
const MAX_PLAYERS: i32 = 16;
/// Pause after a failed accept on the game port (for example out of file descriptors), as the
/// SDK does on its management port, so the accept loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ManagementProtocol {
    Arcus,
    /// No management port at all, like a game that integrates no SDK.
    None,
}

/// A sample game server that speaks Arcus and reports what it learned on its game port.
#[derive(Debug, Parser)]
#[command(name = "berth-sample-game", version)]
struct Args {
    /// TCP port for game clients (the `INFO` query).
    #[arg(long)]
    port: u16,
    /// Loopback port the Berth agent connects to for Arcus.
    #[arg(long)]
    management_port: Option<u16>,
    #[arg(long)]
    instance_id: String,
    /// Time spent in status 3 before reporting 4.
    #[arg(long, default_value_t = 0)]
    startup_delay_ms: u64,
    /// After an allocation, report 4 again after this many seconds (decimals allowed, e.g.
    /// 0.02 for the benchmark's short matches); 0 stays allocated until released.
    #[arg(long, default_value = "0", value_parser = parse_match_seconds)]
    match_seconds: Duration,
    #[arg(long, value_enum, default_value_t = ManagementProtocol::Arcus)]
    management_protocol: ManagementProtocol,
}

/// What `INFO` answers: everything the game learned over Arcus.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Info {
    instance_id: String,
    status: i32,
    allocated: bool,
    allocation: Vec<KeyValue>,
    metadata: Vec<KeyValue>,
    host_information: Map<String, Value>,
    instance_information: Map<String, Value>,
    /// `allocated` frames received.
    allocations_received: u64,
    /// Those that came while a match was in progress: the platform giving a running match to
    /// another matchmaker, which must never happen. The fault tests read it from every game.
    allocated_during_match: u64,
}

/// `--match-seconds`: a non-negative number of seconds, so that a harness can run matches
/// shorter than a second.
fn parse_match_seconds(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .ok_or_else(|| {
            format!("'{text}' is not a number of seconds ≥ 0 (for example 30, or 0.05 for 50 ms)")
        })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    // The game runs as a task, not as the `block_on` future itself: waking that future makes
    // the runtime poll the driver once more without waiting (an extra `epoll_wait` for every
    // frame from the agent), while a task woken by the Arcus task is simply run next.
    let outcome = match tokio::spawn(run(args)).await {
        Ok(outcome) => outcome,
        Err(e) => Err(format!("the game task failed: {e}")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("berth-sample-game: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let game_listener = TcpListener::bind(("0.0.0.0", args.port))
        .await
        .map_err(|e| format!("cannot listen on game port {}: {e}", args.port))?;
    let (arcus, mut events, management) = match args.management_protocol {
        ManagementProtocol::Arcus => {
            let port = args.management_port.ok_or(
                "--management-port is required unless --management-protocol none".to_string(),
            )?;
            let server = ArcusServer::bind(port).await.map_err(|e| e.to_string())?;
            // The bound port, not the flag, so `--management-port 0` reports where it listens.
            let bound = server.local_addr().port();
            let (handle, events) = server.into_parts();
            (Some(handle), Some(events), bound.to_string())
        }
        ManagementProtocol::None => (None, None, "none".to_string()),
    };
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM: {e}"))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT: {e}"))?;
    // Signals and game clients are waited for by their own tasks, so that the loop below,
    // woken for every Arcus event, polls only what the events change.
    let (stop_tx, mut stop) = oneshot::channel::<()>();
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
        let _ = stop_tx.send(());
    });
    let game_port = game_listener
        .local_addr()
        .map_err(|e| format!("game port {}: {e}", args.port))?
        .port();
    eprintln!(
        "berth-sample-game {} listening game={game_port} management={management}",
        args.instance_id
    );

    let (info, _) = watch::channel(Info {
        instance_id: args.instance_id.clone(),
        status: GameStatus::Starting.number(),
        allocated: false,
        allocation: Vec::new(),
        metadata: Vec::new(),
        host_information: Map::new(),
        instance_information: Map::new(),
        allocations_received: 0,
        allocated_during_match: 0,
    });
    let mut game = Game {
        arcus,
        info,
        instance_id: args.instance_id,
        ready: false,
        match_length: args.match_seconds,
        match_end: None,
    };
    tokio::spawn(serve_game_port(game_listener, game.info.subscribe()));
    let mut startup_done = None;
    if args.startup_delay_ms == 0 {
        game.become_ready()?;
    } else {
        game.publish()?;
        startup_done = Some(Instant::now() + Duration::from_millis(args.startup_delay_ms));
    }

    loop {
        tokio::select! {
            event = next_event(events.as_mut()) => match event {
                Some(event) => {
                    if game.on_event(event)? == Flow::Exit {
                        return Ok(());
                    }
                }
                None => return Err("the Arcus server stopped".to_string()),
            },
            () = sleep_until_some(startup_done) => {
                startup_done = None;
                game.become_ready()?;
            }
            () = sleep_until_some(game.match_end) => {
                game.release()?;
            }
            _ = &mut stop => return Ok(()),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Exit,
}

struct Game {
    arcus: Option<ArcusHandle>,
    info: watch::Sender<Info>,
    instance_id: String,
    ready: bool,
    match_length: Duration,
    match_end: Option<Instant>,
}

impl Game {
    /// Makes the status derived from the game's state visible to `INFO` and to the agent.
    fn publish(&mut self) -> Result<(), String> {
        self.change(|_| {})
    }

    /// Applies `change` to what `INFO` shows and publishes the status that follows from it, in
    /// one update: `INFO` readers are notified once, and the agent hears of the status only if
    /// it changed.
    fn change(&mut self, change: impl FnOnce(&mut Info)) -> Result<(), String> {
        let ready = self.ready;
        let mut status = GameStatus::Starting;
        self.info.send_modify(|info| {
            change(info);
            status = if info.allocated {
                GameStatus::Allocated
            } else if ready {
                GameStatus::Online
            } else {
                GameStatus::Starting
            };
            info.status = status.number();
        });
        match &self.arcus {
            Some(arcus) => arcus.set_status(status).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    fn become_ready(&mut self) -> Result<(), String> {
        self.ready = true;
        if let Some(arcus) = &self.arcus {
            arcus
                .set_live_state(LiveState {
                    players: 0,
                    max_players: MAX_PLAYERS,
                    name: format!("berth-sample-{}", self.instance_id),
                    map: "sample".to_string(),
                    mode: "default".to_string(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    extra: Map::new(),
                })
                .map_err(|e| e.to_string())?;
        }
        self.publish()
    }

    fn release(&mut self) -> Result<(), String> {
        self.match_end = None;
        self.change(|info| {
            info.allocated = false;
            info.allocation.clear();
        })
    }

    fn on_event(&mut self, event: Event) -> Result<Flow, String> {
        match event {
            Event::SoftStop { timeout } => {
                eprintln!("soft stop (timeout {timeout}s): exiting");
                return Ok(Flow::Exit);
            }
            Event::Allocated(data) => {
                // The match length comes from --match-seconds alone, so a harness controls
                // it without depending on what the matchmaker put in the allocation.
                self.match_end =
                    (!self.match_length.is_zero()).then(|| Instant::now() + self.match_length);
                let during_match = self.info.borrow().allocated;
                if during_match {
                    eprintln!(
                        "allocated again while a match is in progress: the platform gave this \
                         match away (new allocation {data:?})"
                    );
                }
                self.change(|info| {
                    info.allocations_received += 1;
                    info.allocated_during_match += u64::from(during_match);
                    info.allocated = true;
                    info.allocation = data;
                })?;
            }
            Event::CustomCommand(data) => {
                let deallocated = data
                    .iter()
                    .any(|kv| kv.key == "command" && kv.value == "deallocated");
                if deallocated {
                    self.release()?;
                }
            }
            Event::Metadata(data) => self
                .info
                .send_modify(|info| metadata::merge(&mut info.metadata, data)),
            Event::HostInformation(object) => {
                self.info.send_modify(|info| info.host_information = object);
            }
            Event::InstanceInformation(object) => {
                self.info
                    .send_modify(|info| info.instance_information = object);
            }
            Event::Connected { peer } => eprintln!("agent connected from {peer}"),
            Event::Disconnected { reason } => eprintln!("agent link closed: {reason}"),
            Event::Rejected { peer, reason } => eprintln!("refused {peer}: {reason}"),
        }
        Ok(Flow::Continue)
    }
}

/// Accepts game clients for as long as the game runs.
async fn serve_game_port(listener: TcpListener, info: watch::Receiver<Info>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_client(stream, info.clone()));
            }
            // A client that failed to connect is its own problem; keep serving the rest.
            Err(_) => tokio::time::sleep(ACCEPT_BACKOFF).await,
        }
    }
}

/// Answers `INFO` lines until the client goes away.
async fn serve_client(mut stream: TcpStream, info: watch::Receiver<Info>) {
    let (read, mut write) = stream.split();
    let mut reader = BufReader::with_capacity(256, read);
    let mut line = Vec::new();
    let mut reply = Vec::new();
    loop {
        line.clear();
        let limit = (MAX_LINE + 1) as u64;
        match (&mut reader).take(limit).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.len() > MAX_LINE {
            let _ = write.write_all(b"{\"error\":\"line too long\"}\n").await;
            return;
        }
        reply.clear();
        if line.trim_ascii() == b"INFO" {
            // Serializing from the borrow avoids cloning the state for every query.
            if serde_json::to_writer(&mut reply, &*info.borrow()).is_err() {
                return;
            }
            reply.push(b'\n');
        } else {
            reply.extend_from_slice(b"{\"error\":\"unknown command; send INFO\"}\n");
        }
        if write.write_all(&reply).await.is_err() {
            return;
        }
    }
}

async fn next_event(events: Option<&mut Events>) -> Option<Event> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
