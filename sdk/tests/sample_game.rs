//! The real `berth-sample-game` binary, driven the way the Berth agent and outside harnesses
//! drive it (ARCUS.md §8).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use berth_protocol::KeyValue;
use berth_protocol::arcus::Message;
use common::{Agent, guard};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader, Lines};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

/// A port that was free a moment ago. The game binds it itself, as it would under the agent.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("find a free port")
        .port()
}

/// A running sample game, killed on drop if the test did not see it exit.
struct SampleGame {
    child: Child,
    game_port: u16,
    management_port: u16,
    spawned: Instant,
    /// Its stderr, line by line; closed once the process has exited.
    stderr: mpsc::UnboundedReceiver<String>,
    exited: bool,
}

impl SampleGame {
    fn spawn(game_port: u16, management_port: u16, extra: &[&str]) -> Self {
        let spawned = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_berth-sample-game"))
            .args(["--port", &game_port.to_string()])
            .args(["--management-port", &management_port.to_string()])
            .args(["--instance-id", "test-1"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn berth-sample-game");
        let pipe = child.stderr.take().expect("piped stderr");
        let (tx, stderr) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                eprintln!("[sample game] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            game_port,
            management_port,
            spawned,
            stderr,
            exited: false,
        }
    }

    /// Starts a game on fresh ports and waits until both ports are bound.
    async fn start(extra: &[&str]) -> Self {
        let mut game = Self::spawn(free_port(), free_port(), extra);
        loop {
            let line = guard("the listening line", game.stderr.recv())
                .await
                .expect("the game exited before listening");
            if line.contains("listening") {
                assert_eq!(
                    line,
                    format!(
                        "berth-sample-game test-1 listening game={} management={}",
                        game.game_port,
                        if extra.contains(&"none") {
                            "none".to_string()
                        } else {
                            game.management_port.to_string()
                        }
                    )
                );
                return game;
            }
        }
    }

    async fn agent(&self) -> Agent {
        Agent::connect(([127, 0, 0, 1], self.management_port).into()).await
    }

    /// Collects stderr until the pipe closes, which happens when the process exits.
    async fn wait_exit(&mut self) -> (ExitStatus, Vec<String>) {
        let mut lines = Vec::new();
        while let Some(line) = guard("the game to exit", self.stderr.recv()).await {
            lines.push(line);
        }
        // The pipe closed, so the process is gone; this only reaps it.
        let status = self.child.wait().expect("wait for the game");
        self.exited = true;
        (status, lines)
    }

    fn signal(&self, signal: Signal) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        kill(Pid::from_raw(pid), signal).expect("signal the game");
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS line")
    }
}

impl Drop for SampleGame {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A client on the game port.
struct GameClient {
    lines: Lines<AsyncBufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl GameClient {
    async fn connect(port: u16) -> Self {
        let stream = guard("the game port", TcpStream::connect(("127.0.0.1", port)))
            .await
            .expect("connect to the game port");
        let (read, write) = stream.into_split();
        Self {
            lines: AsyncBufReader::new(read).lines(),
            write,
        }
    }

    async fn ask(&mut self, line: &str) -> Value {
        self.write
            .write_all(line.as_bytes())
            .await
            .expect("write to the game port");
        let answer = guard("an answer on the game port", self.lines.next_line())
            .await
            .expect("read the game port")
            .expect("one line before EOF");
        serde_json::from_str(&answer).expect("the answer is JSON")
    }
}

async fn info(port: u16) -> Value {
    GameClient::connect(port).await.ask("INFO\n").await
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

/// Waits for `want`, allowing only earlier statuses of the start-up sequence (3) before it.
async fn wait_status(agent: &mut Agent, want: i32) {
    loop {
        match agent.next_status().await {
            status if status == want => return,
            3 => continue,
            other => panic!("expected status {want}, got {other}"),
        }
    }
}

#[tokio::test]
async fn sample_game_lifecycle_over_arcus() {
    let mut game = SampleGame::start(&["--startup-delay-ms", "50"]).await;
    let mut agent = game.agent().await;
    // The first status is 3 unless the 50 ms start-up delay already ran out.
    let first = agent.next_status().await;
    assert!(first == 3 || first == 4, "first status {first}");
    if first == 3 {
        wait_status(&mut agent, 4).await;
    }

    let host = object(json!({"id": 7, "serverId": 70, "serverName": "host-7", "region": "eu"}));
    let instance = object(json!({"fleetId": "fleet-a", "hostId": 7, "isVirtual": false}));
    agent.send(&Message::HostInformation(host.clone())).await;
    agent
        .send(&Message::InstanceInformation(instance.clone()))
        .await;
    agent
        .send(&Message::Metadata(vec![
            KeyValue::new("mode", "ranked"),
            KeyValue::new("region", "eu"),
        ]))
        .await;
    agent
        .send(&Message::Allocated(vec![
            KeyValue::new("players", "16"),
            KeyValue::new("map", "dust"),
        ]))
        .await;
    // Frames are handled in order, so status 5 means everything before it was applied.
    wait_status(&mut agent, 5).await;

    let mut client = GameClient::connect(game.game_port).await;
    let got = client.ask("INFO\n").await;
    assert_eq!(got["instanceId"], "test-1");
    assert_eq!(got["status"], 5);
    assert_eq!(got["allocated"], true);
    assert_eq!(
        got["allocation"],
        json!([{"key": "players", "value": "16"}, {"key": "map", "value": "dust"}])
    );
    assert_eq!(
        got["metadata"],
        json!([{"key": "mode", "value": "ranked"}, {"key": "region", "value": "eu"}])
    );
    assert_eq!(got["hostInformation"], Value::Object(host));
    assert_eq!(got["instanceInformation"], Value::Object(instance));
    assert_eq!(got["allocationsReceived"], 1);
    assert_eq!(got["allocatedDuringMatch"], 0);
    // The connection stays open: unknown lines get an error, CRLF is tolerated.
    assert_eq!(
        client.ask("STATUS\r\n").await,
        json!({"error": "unknown command; send INFO"})
    );
    assert_eq!(client.ask("INFO\r\n").await["status"], 5);

    let rss = game.rss_kib();
    eprintln!("sample game RSS while allocated: {rss} KiB");

    // New metadata merges by key; a matchmaker release comes as a custom command.
    agent
        .send(&Message::Metadata(vec![
            KeyValue::new("mode", "casual"),
            KeyValue::new("round", "2"),
        ]))
        .await;
    release(&mut agent).await;
    let got = client.ask("INFO\n").await;
    assert_eq!(got["status"], 4);
    assert_eq!(got["allocated"], false);
    assert_eq!(got["allocation"], json!([]));
    assert_eq!(
        got["metadata"],
        json!([
            {"key": "mode", "value": "casual"},
            {"key": "region", "value": "eu"},
            {"key": "round", "value": "2"}
        ])
    );

    let asked = Instant::now();
    agent.send(&Message::SoftStop { timeout: 5 }).await;
    agent.expect_closed().await;
    let (status, _) = game.wait_exit().await;
    eprintln!("sample game exited {:?} after soft stop", asked.elapsed());
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[tokio::test]
async fn sample_game_ends_the_match_after_match_seconds() {
    // Fractions of a second are allowed, for benchmarks whose games end their own matches.
    let mut game = SampleGame::start(&["--match-seconds", "0.5"]).await;
    let mut agent = game.agent().await;
    wait_status(&mut agent, 4).await;
    eprintln!(
        "sample game (debug build): spawn to status 4 in {:?}",
        game.spawned.elapsed()
    );

    let allocated = Instant::now();
    agent
        .send(&Message::Allocated(vec![KeyValue::new("map", "dust")]))
        .await;
    assert_eq!(agent.next_status().await, 5);
    assert_eq!(agent.next_status().await, 4);
    let took = allocated.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "match ended after {took:?}"
    );
    let got = info(game.game_port).await;
    assert_eq!(got["allocated"], false);
    assert_eq!(got["allocation"], json!([]));

    // A second allocation starts a new match of the same length.
    agent
        .send(&Message::Allocated(vec![KeyValue::new("map", "inferno")]))
        .await;
    assert_eq!(agent.next_status().await, 5);
    assert_eq!(
        info(game.game_port).await["allocation"][0]["value"],
        "inferno"
    );
    assert_eq!(agent.next_status().await, 4);

    game.signal(Signal::SIGTERM);
    let (status, _) = game.wait_exit().await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

/// A matchmaker's release as the agent sends it (the custom command `deallocated`); the game
/// answers status 4.
async fn release(agent: &mut Agent) {
    agent
        .send(&Message::CustomCommand(vec![KeyValue::new(
            "command",
            "deallocated",
        )]))
        .await;
    assert_eq!(agent.next_status().await, 4);
}

/// A game started with no flags and allocated once (map `dust`) by an agent that is still
/// connected.
async fn allocated_game() -> (SampleGame, Agent) {
    let game = SampleGame::start(&[]).await;
    let mut agent = game.agent().await;
    wait_status(&mut agent, 4).await;
    agent
        .send(&Message::Allocated(vec![KeyValue::new("map", "dust")]))
        .await;
    assert_eq!(agent.next_status().await, 5);
    (game, agent)
}

#[tokio::test]
async fn sample_game_counts_an_allocation_that_arrives_during_a_match() {
    let (mut game, mut agent) = allocated_game().await;

    // A second matchmaker handed the running match: the game stays allocated (no new status)
    // and says so, on stderr and in INFO, where the fault tests look for it.
    agent
        .send(&Message::Allocated(vec![KeyValue::new("map", "inferno")]))
        .await;
    let line = loop {
        let line = guard("the game's complaint", game.stderr.recv())
            .await
            .expect("the game exited");
        if line.contains("while a match is in progress") {
            break line;
        }
    };
    assert!(line.contains("inferno"), "{line}");
    let got = info(game.game_port).await;
    assert_eq!(got["allocationsReceived"], 2);
    assert_eq!(got["allocatedDuringMatch"], 1);

    // After a release, an allocation is an ordinary one again.
    release(&mut agent).await;
    agent
        .send(&Message::Allocated(vec![KeyValue::new("map", "nuke")]))
        .await;
    assert_eq!(agent.next_status().await, 5);
    let got = info(game.game_port).await;
    assert_eq!(got["allocationsReceived"], 3);
    assert_eq!(got["allocatedDuringMatch"], 1);
}

#[test]
fn sample_game_refuses_a_match_length_that_is_not_seconds() {
    for bad in ["-1", "soon", "1e40"] {
        let out = Command::new(env!("CARGO_BIN_EXE_berth-sample-game"))
            .args(["--port", "0", "--instance-id", "test-1"])
            .arg(format!("--match-seconds={bad}"))
            .output()
            .expect("run berth-sample-game");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(
            stderr.contains("--match-seconds") && stderr.contains(&format!("'{bad}'")),
            "{bad}: {stderr}"
        );
    }
}

#[tokio::test]
async fn sample_game_reconnecting_agent_gets_the_status() {
    let (mut game, mut first) = allocated_game().await;
    // A restarted agent reconnects: the game drops the old link and reports where it is.
    let mut second = game.agent().await;
    assert_eq!(second.next_status().await, 5);
    first.expect_closed().await;

    game.signal(Signal::SIGINT);
    let (status, _) = game.wait_exit().await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[tokio::test]
async fn sample_game_without_management_protocol() {
    let mut game = SampleGame::start(&["--management-protocol", "none"]).await;
    let got = info(game.game_port).await;
    assert_eq!(got["status"], 4);
    assert_eq!(got["allocated"], false);
    assert_eq!(got["hostInformation"], json!({}));
    assert!(
        TcpStream::connect(("127.0.0.1", game.management_port))
            .await
            .is_err(),
        "the management port must stay closed"
    );
    game.signal(Signal::SIGINT);
    let (status, _) = game.wait_exit().await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[tokio::test]
async fn sample_game_bind_failure_exits_1_naming_the_port() {
    let taken = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let mut game = SampleGame::spawn(port, free_port(), &[]);
    let (status, lines) = game.wait_exit().await;
    assert_eq!(status.code(), Some(1), "exit status {status}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("game port") && l.contains(&port.to_string())),
        "stderr: {lines:?}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let mut game = SampleGame::spawn(free_port(), port, &[]);
    let (status, lines) = game.wait_exit().await;
    assert_eq!(status.code(), Some(1), "exit status {status}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("management port") && l.contains(&port.to_string())),
        "stderr: {lines:?}"
    );
}
