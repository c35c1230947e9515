//! Support for Berth's end-to-end tests: they run the real binaries (`berth-controller`,
//! `berth-agent`, `berth-sample-game`, `berth-bad-game`) as separate processes on loopback and
//! only ever wait for observable state, never for a fixed time.
//!
//! * [`bin_dir`] builds the workspace's binaries once per test process and finds them.
//! * [`PortBlock`] hands every agent game and management port ranges that no other agent of
//!   this test process uses, so agents can run in parallel tests.
//! * [`TestDir`] is a scratch directory under `target/e2e`, kept when a test fails.
//! * [`AgentProcess`] writes an `agent.toml`, runs `berth-agent`, restarts and kills it, and
//!   on drop kills every game it started so that no game outlives its test.
//!   [`AgentConfig::joined`] registers it with a controller.
//! * [`ControllerProcess`] writes a `controller.toml` (free loopback port, SQLite database in
//!   its directory, join/admin/matchmaker tokens, regions, short heartbeats), runs
//!   `berth-controller`, kills and restarts it on the same database, and drives its API
//!   (applications, profiles, fleets, allocations, listings, waits); it also starts agents
//!   registered with it ([`ControllerProcess::spawn_agent`]).
//! * [`berth_command`] runs a binary without the test environment's `BERTH_*` overrides.
//! * [`FaultProxy`] sits between the controller and one agent and can answer allocations with
//!   garbage: fault injection on the network path, with the agent untouched.
//! * [`Http`] / [`Response`]: any request, with status, headers and JSON body, so tests can
//!   check error bodies ([`Response::assert_error`]).
//! * [`wait_for`] polls a condition until it holds, failing with the last thing it saw.
//! * [`json`]: the fields of API objects tests read ([`json::id_of`], [`json::kv`], …), and
//!   [`metric`] / [`assert_metrics`] for Prometheus samples.
//! * [`game_info`], [`sample_game_profile`], [`bad_game_profile`]: drive the test games.
//! * [`pid_alive`], [`count_instance_processes`], [`pids_writing_under`], [`arg_value`]: what
//!   the kernel says about processes.
//! * [`with_descriptor_census`] adds what this process holds open to a failure that ran out of
//!   descriptors or found a port taken.
//! * Agents and controllers can listen on other addresses than loopback
//!   ([`AgentConfig::listen_ip`], [`ControllerConfig::listen_ip`]) and an agent can run under a
//!   wrapper command ([`AgentConfig::wrapper`], e.g. `ip netns exec <ns>`), for tests that put
//!   daemons in network namespaces; [`game_info_at`] reaches such a game. A controller can
//!   too ([`ControllerConfig::wrapper`]), with its database where the test says
//!   ([`ControllerConfig::database`]): on a small disk of the test's own, say.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How often [`wait_for`] looks again.
pub const POLL: Duration = Duration::from_millis(10);
/// Failure guard for waits on things that normally happen within milliseconds to a few
/// seconds. Generous because a loaded 2-core CI machine runs several agents and games at once;
/// reaching it means the test failed, not that it was slow.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Failure guard for one HTTP request or one `INFO` query.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Binaries and directories

/// The workspace root (the directory of the top `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// `target/<profile>`, holding every workspace binary, freshly built.
///
/// The first call in a process runs `cargo build --bins --workspace` with the profile of the
/// running test binary: `cargo test` builds only this package's binaries, and a test must never
/// run a stale `berth-agent`. Later calls (from any thread) wait for that build and reuse it.
/// A failed build fails every test that needs a binary, with the build's own message, without
/// building again.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match DIR.get_or_init(build_binaries) {
        Ok(dir) => dir,
        Err(e) => panic!("{e}"),
    }
}

fn build_binaries() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("the test binary's own path: {e}"))?;
    // target/<profile>/deps/<test exe>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("{} is not in target/<profile>/deps", exe.display()))?
        .to_owned();
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| format!("{} has no parent", profile_dir.display()))?
        .to_owned();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--bins", "--workspace", "--target-dir"])
        .arg(&target_dir)
        .current_dir(workspace_root())
        .stdin(Stdio::null());
    if release {
        cmd.arg("--release");
    }
    let started = Instant::now();
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cargo} to build the binaries under test: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{cargo} build --bins --workspace{}` failed ({}); the end-to-end tests need every \
             binary of the workspace:\n{}",
            if release { " --release" } else { "" },
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    eprintln!(
        "[e2e] binaries in {} (build took {:.1}s)",
        profile_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(profile_dir)
}

/// The path of a workspace binary, e.g. `bin("berth-agent")`.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} was not built by `cargo build --bins --workspace`",
        path.display()
    );
    path
}

/// `target/e2e`: where test directories live.
pub fn e2e_root() -> PathBuf {
    bin_dir()
        .parent()
        .map_or_else(|| bin_dir().join("e2e"), |t| t.join("e2e"))
}

/// A short random suffix, to keep names of parallel tests (and test runs) apart.
pub fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// A scratch directory `target/e2e/<name>-<short id>`. Removed on drop when the test passed;
/// kept when it failed (the thread is panicking), with the agent and game logs inside, or
/// when `BERTH_E2E_KEEP` is set.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> Self {
        let path = e2e_root().join(format!("{name}-{}", short_id()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "[e2e] test failed; its files are kept in {}",
                self.path.display()
            );
        } else if std::env::var_os("BERTH_E2E_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Ports

const GAME_BASE: u32 = 20_000;
const GAME_SPAN: u32 = 10_000;
const MANAGEMENT_BASE: u32 = 30_000;
const MANAGEMENT_SPAN: u32 = 2_768;
/// Ports per block and range: more than any one test deploys.
pub const BLOCK_PORTS: u16 = 40;
/// Blocks there are room for; the management range is the smaller one.
const BLOCKS: u32 = MANAGEMENT_SPAN / BLOCK_PORTS as u32;

/// Game and management port ranges for one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortBlock {
    pub game: RangeInclusive<u16>,
    pub management: RangeInclusive<u16>,
}

impl PortBlock {
    /// A block no other agent of this test process uses, and most likely none of another
    /// test process running at the same time.
    ///
    /// Blocks are taken round-robin from a process-wide counter that starts at an offset
    /// derived from the process id. Each block is also claimed with a lock file under
    /// `target/e2e/ports` (held until the process exits), so test binaries running at once
    /// from the same target directory skip each other's blocks instead of racing for the
    /// same ports. Only when all 69 blocks are held does a block get shared. Both ranges sit
    /// below the kernel's default ephemeral range (32768-60999), as the agent requires.
    pub fn next() -> Self {
        static NEXT: OnceLock<AtomicU32> = OnceLock::new();
        let counter =
            NEXT.get_or_init(|| AtomicU32::new(std::process::id().wrapping_mul(7) % BLOCKS));
        for _ in 0..BLOCKS {
            let block = counter.fetch_add(1, Ordering::Relaxed) % BLOCKS;
            // A block some other program sits in (a benchmark or a dev cluster, whose agents
            // use the default ranges from their start) stays claimed but unused.
            if claim_block(block) && Self::block(block).is_free() {
                return Self::block(block);
            }
        }
        Self::block(counter.fetch_add(1, Ordering::Relaxed) % BLOCKS)
    }

    /// Whether every port of the block can be bound on loopback right now.
    fn is_free(&self) -> bool {
        self.game
            .clone()
            .chain(self.management.clone())
            .all(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
    }

    fn block(block: u32) -> Self {
        let n = u32::from(BLOCK_PORTS);
        let game = GAME_BASE + block * (GAME_SPAN / BLOCKS);
        let management = MANAGEMENT_BASE + block * n;
        let range = |start: u32| start as u16..=(start + n - 1) as u16;
        Self {
            game: range(game),
            management: range(management),
        }
    }
}

/// Takes block `block`'s lock file for the rest of this process, if nobody holds it. The lock
/// is per open file, so a block this process already holds is refused too.
fn claim_block(block: u32) -> bool {
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    let dir = e2e_root().join("ports");
    let file = std::fs::create_dir_all(&dir).and_then(|()| {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("block-{block}.lock")))
    });
    match file {
        Ok(f) => {
            if f.try_lock().is_err() {
                return false;
            }
            HELD.lock().unwrap_or_else(|e| e.into_inner()).push(f);
            true
        }
        // Without a lock directory, fall back to the per-process counter alone.
        Err(_) => true,
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for agent and controller listeners),
/// never one this process handed out before: the kernel may give the same ephemeral port to two
/// `bind(0)` calls in a row once the first socket is closed, and two daemons of tests running at
/// once would then race for it.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| {
                panic!(
                    "{}",
                    with_descriptor_census(format!("bind 127.0.0.1:0: {e}"))
                )
            })
            .port();
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
}

/// `"a-b"`, as the agent's configuration writes a range.
pub fn range_text(r: &RangeInclusive<u16>) -> String {
    format!("{}-{}", r.start(), r.end())
}

// ---------------------------------------------------------------------------------------------
// Descriptor exhaustion

/// `message`, followed by what this process holds open when `message` reports that it ran out
/// of descriptors (EMFILE) or that a port was taken (EADDRINUSE). Once, on a fresh CI machine,
/// a suite failed with both, far below the process's limit, and could not be reproduced; the
/// next occurrence then says what this process held.
pub fn with_descriptor_census(message: String) -> String {
    if [
        "os error 24",
        "Too many open files",
        "os error 98",
        "Address already in use",
    ]
    .iter()
    .any(|m| message.contains(m))
    {
        format!("{message}\n{}", fd_census())
    } else {
        message
    }
}

/// The open descriptors of this process, counted by kind (sockets also by TCP state and
/// ports, files by directory), most frequent first, with the process's limit.
pub fn fd_census() -> String {
    let mut sockets_by_inode = std::collections::HashMap::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let port = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    .unwrap_or(0)
            };
            let state = match f[3] {
                "01" => "ESTABLISHED",
                "02" => "SYN_SENT",
                "06" => "TIME_WAIT",
                "07" => "CLOSE",
                "08" => "CLOSE_WAIT",
                "0A" => "LISTEN",
                other => other,
            };
            sockets_by_inode.insert(
                f[9].to_owned(),
                format!("tcp {state} local :{} remote :{}", port(f[1]), port(f[2])),
            );
        }
    }
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    let mut total = 0;
    for entry in std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
    {
        total += 1;
        let target = std::fs::read_link(entry.path())
            .map(|t| t.display().to_string())
            .unwrap_or_else(|e| format!("(unreadable: {e})"));
        let kind = if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
        {
            sockets_by_inode
                .get(inode)
                .cloned()
                .unwrap_or_else(|| "socket (not TCP)".to_owned())
        } else if target.starts_with("pipe:") {
            "pipe".to_owned()
        } else if target.starts_with('/') {
            let dir = Path::new(&target).parent().unwrap_or(Path::new("/"));
            format!("file in {}", dir.display())
        } else {
            target
        };
        *counts.entry(kind).or_default() += 1;
    }
    let mut ranked: Vec<(String, usize)> = counts.into_iter().collect();
    ranked.sort_by_key(|r| std::cmp::Reverse(r.1));
    let limit = std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let mut out = format!("this process holds {total} descriptors ({limit}); the most common:");
    for (kind, n) in ranked.iter().take(15) {
        out.push_str(&format!("\n  {n:>6}  {kind}"));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Waiting

/// What a [`wait_for`] probe returns: a value when the condition holds, or what it saw instead.
pub trait Probe {
    type Value;
    fn into_result(self) -> Result<Self::Value, String>;
}

impl<T> Probe for Option<T> {
    type Value = T;
    fn into_result(self) -> Result<T, String> {
        self.ok_or_else(|| "(the condition did not hold)".to_owned())
    }
}

impl<T, E: Debug> Probe for Result<T, E> {
    type Value = T;
    fn into_result(self) -> Result<T, String> {
        self.map_err(|e| format!("{e:#?}"))
    }
}

/// Runs `probe` every [`POLL`] until it yields a value, and returns that value. Panics after
/// `timeout` naming `desc` and the last thing the probe saw (its `Err`; a probe returning
/// `Option` can only say that the condition did not hold).
///
/// Accepts both `|| async { … }` and `async || { … }`.
pub async fn wait_for<R, F>(desc: &str, timeout: Duration, mut probe: F) -> R::Value
where
    F: AsyncFnMut() -> R,
    R: Probe,
{
    let started = Instant::now();
    loop {
        match probe().await.into_result() {
            Ok(v) => return v,
            Err(last) => {
                if started.elapsed() >= timeout {
                    panic!(
                        "timed out after {:.1}s waiting for {desc}; last observed: {last}",
                        timeout.as_secs_f64()
                    );
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// A file of `tests/fixtures/tls` (test-only certificates: see its README).
pub fn tls_fixture(name: &str) -> PathBuf {
    berth_http::tls::test_certificate(name)
}

/// Copies the fixture `identity`'s certificate and key, and the CA files `cas` joined into one,
/// into `dir` as `cert.pem`, `key.pem` and `ca.pem`, and returns the `[tls]` table naming the
/// copies: a test can replace them and send the daemon SIGHUP.
pub fn install_tls(dir: &Path, identity: &str, cas: &[&str]) -> String {
    install_tls_with_crl(dir, identity, cas, None)
}

/// [`install_tls`], and with `crl` the fixture `{crl}.pem` as `crl.pem`, named by `crl_file`.
pub fn install_tls_with_crl(dir: &Path, identity: &str, cas: &[&str], crl: Option<&str>) -> String {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let read = |name: String| {
        std::fs::read(tls_fixture(&name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
    };
    let (cert, key, ca) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    // Each file is written whole under another name and renamed, as a certificate manager
    // does, so a reload never reads half a file.
    let write = |to: &Path, bytes: Vec<u8>| {
        let tmp = to.with_extension("tmp");
        std::fs::write(&tmp, bytes).expect("write a TLS file");
        std::fs::rename(&tmp, to).expect("rename a TLS file");
    };
    write(&cert, read(format!("{identity}.pem")));
    write(&key, read(format!("{identity}.key")));
    write(
        &ca,
        cas.iter().flat_map(|c| read(format!("{c}.pem"))).collect(),
    );
    let crl_file = crl.map(|crl| {
        let path = dir.join("crl.pem");
        write(&path, read(format!("{crl}.pem")));
        path
    });
    berth_http::tls::tls_table(&berth_http::tls::TlsFiles {
        cert_file: cert,
        key_file: key,
        ca_file: ca,
        crl_file,
    })
}

/// A TLS client configuration trusting the CAs `cas` (fixture names) and presenting
/// `identity`'s certificate (`None`: none).
pub fn tls_client(cas: &[&str], identity: Option<&str>) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        for c in CertificateDer::pem_file_iter(tls_fixture(&format!("{ca}.pem"))).expect("CA file")
        {
            roots.add(c.expect("a CA certificate")).expect("usable CA");
        }
    }
    let builder = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(roots);
    match identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let chain = CertificateDer::pem_file_iter(tls_fixture(&format!("{id}.pem")))
                .expect("certificate file")
                .collect::<Result<Vec<_>, _>>()
                .expect("certificates");
            let key = PrivateKeyDer::from_pem_file(tls_fixture(&format!("{id}.key"))).expect("key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("certificate and key")
        }
    }
}

/// An HTTP/1 client, for `http://` and `https://` URLs (trusting every test CA and presenting
/// the `controller` test certificate, as an operator holding one would). Every request opens a
/// new connection: a test that kills and restarts a daemon must never get a stale pooled
/// connection.
#[derive(Debug, Clone)]
pub struct Http {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

/// An answer, whatever its status.
#[derive(Debug, Clone)]
pub struct Response {
    pub method: Method,
    /// The request path (without the query), what error bodies report as `path`.
    pub path: String,
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
    /// The body as JSON; `Null` when it is empty or not JSON (then see `text`).
    pub json: Value,
}

impl Http {
    pub fn new() -> Self {
        // Every test CA: the harness reaches (and sees ready) a daemon whatever its certificate.
        Self::with_tls(tls_client(&["ca", "rogue-ca", "ca2"], Some("controller")))
    }

    /// A client with its own TLS configuration (another CA, no certificate, …).
    pub fn with_tls(tls: rustls::ClientConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(https);
        Self { client }
    }

    /// Sends one request. `Err` only when no HTTP answer came (refused, reset, timed out).
    pub async fn try_send(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Response, String> {
        let bytes = body
            .map(|b| serde_json::to_vec(b).map(Bytes::from))
            .transpose()
            .map_err(|e| e.to_string())?;
        self.try_send_bytes(method, url, token, headers, bytes)
            .await
    }

    /// Sends one request with a raw body (sent as `application/json`, whatever it holds), for
    /// malformed and oversized bodies. `Err` only when no HTTP answer came.
    pub async fn try_send_bytes(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> Result<Response, String> {
        let mut req = http::Request::builder().method(method.clone()).uri(url);
        if let Some(t) = token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let bytes = match body {
            Some(b) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                b
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(bytes))
            .map_err(|e| format!("bad request {url}: {e}"))?;
        let path = req.uri().path().to_owned();
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("{method} {url}: {e:?}"))?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{method} {url}: body cut off: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, headers, body))
        };
        let (status, headers, body) = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| format!("{method} {url}: no answer within {CALL_TIMEOUT:?}"))??;
        let text = String::from_utf8_lossy(&body).into_owned();
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok(Response {
            method,
            path,
            status,
            headers,
            text,
            json,
        })
    }

    /// GETs a streamed body (e.g. `logs?follow=true`) and reads it until `done` holds for what
    /// came so far, then drops the connection. Panics naming `url` and what came if `timeout`
    /// passes first.
    pub async fn read_stream_until(
        &self,
        url: &str,
        token: &str,
        timeout: Duration,
        done: impl Fn(&[u8]) -> bool,
    ) -> Vec<u8> {
        let req = http::Request::builder()
            .uri(url)
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .expect("a GET request");
        let mut got = Vec::new();
        let read = async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            if resp.status() != 200 {
                return Err(format!("status {}", resp.status()));
            }
            let mut body = resp.into_body();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| e.to_string())?;
                if let Some(data) = frame.data_ref() {
                    got.extend_from_slice(data);
                    if done(&got) {
                        return Ok(());
                    }
                }
            }
            Err("the stream ended".to_owned())
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(Ok(())) => got,
            Ok(Err(e)) => panic!("GET {url}: {e}; it sent {} bytes", got.len()),
            Err(_) => panic!(
                "GET {url}: not done within {timeout:?}; it sent {} bytes ending {:?}",
                got.len(),
                String::from_utf8_lossy(&got[got.len().saturating_sub(300)..])
            ),
        }
    }

    /// Sends one request; panics when no HTTP answer came.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Response {
        self.try_send(method, url, token, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{}", with_descriptor_census(e)))
    }
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Panics, showing the answer, unless the status is `status`.
    #[track_caller]
    pub fn expect(self, status: u16) -> Self {
        assert_eq!(
            self.status, status,
            "{} {} answered {} (expected {status}): {}",
            self.method, self.path, self.status, self.text
        );
        self
    }

    /// Checks the one error shape of ERRORS.md: `statusCode` equal to the HTTP status, the
    /// string `code`, the agent `errorCode` (or its absence), a message and details to act on,
    /// the correlation `identifier` (also in `X-Correlation-Id`), the request path and an RFC
    /// 3339 timestamp. Returns the body.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str, error_code: Option<u32>) -> &Value {
        let b = &self.json;
        let ctx = format!(
            "{} {} → {}: {}",
            self.method, self.path, self.status, self.text
        );
        assert_eq!(self.status, status, "HTTP status of {ctx}");
        assert_eq!(b["statusCode"], json!(status), "statusCode of {ctx}");
        assert_eq!(b["code"], json!(code), "code of {ctx}");
        match error_code {
            Some(n) => assert_eq!(b["errorCode"], json!(n), "errorCode of {ctx}"),
            None => assert!(b.get("errorCode").is_none(), "no errorCode expected: {ctx}"),
        }
        for field in ["message", "details", "identifier", "timestamp"] {
            assert!(
                b[field].as_str().is_some_and(|s| !s.trim().is_empty()),
                "{field} must be a non-empty string: {ctx}"
            );
        }
        assert_eq!(b["path"], json!(self.path), "path of {ctx}");
        let ts = b["timestamp"].as_str().unwrap_or_default();
        assert!(
            ts.len() >= 20 && ts.as_bytes()[10] == b'T' && ts.ends_with('Z'),
            "timestamp {ts:?} is not RFC 3339 UTC: {ctx}"
        );
        assert_eq!(
            self.header("x-correlation-id"),
            b["identifier"].as_str(),
            "X-Correlation-Id must equal identifier: {ctx}"
        );
        b
    }
}

/// Every `"pid": <n>` anywhere in a JSON value.
fn collect_pids(v: &Value, out: &mut BTreeSet<u32>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k == "pid" {
                    if let Some(p) = v.as_u64().and_then(|p| u32::try_from(p).ok()) {
                        out.insert(p);
                    }
                } else {
                    collect_pids(v, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_pids(v, out)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Daemons

/// A daemon's command, run under `wrapper` (e.g. `ip netns exec <ns>`) when there is one.
fn wrapped(wrapper: &[String], daemon: &str) -> Command {
    match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = berth_command(program);
            cmd.args(args).arg(bin(daemon));
            cmd
        }
        None => berth_command(bin(daemon)),
    }
}

/// A command running `program` without any `BERTH_*` variable of the test's environment:
/// the daemons take them as config overrides, and only the files the tests write may count.
pub fn berth_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BERTH_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Starts a second `daemon` (`berth-agent` or `berth-controller`) with `config` (the text of
/// its file) on the state of one that runs as `holder`, and checks that it gives up at once:
/// exit 1, its stderr naming the holder's pid and every one of `mentions` (the lock file, the
/// state). One still running after 10 s is killed and the test fails.
pub async fn assert_second_daemon_refused(
    daemon: &str,
    config: &str,
    holder: u32,
    mentions: &[&str],
) {
    let dir = TestDir::new(&format!("{daemon}-second"));
    let path = dir.join("second.toml");
    std::fs::write(&path, config).expect("write the second daemon's config");
    let mut cmd = berth_command(bin(daemon));
    let mut child = cmd
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start a second {daemon}: {e}"));
    let within = Duration::from_secs(10);
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            reap_killed(child);
            panic!("a second {daemon} on the same state still runs after {within:?}");
        }
        tokio::time::sleep(POLL).await;
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("another {daemon} (pid {holder})"))
            && mentions.iter().all(|m| stderr.contains(m)),
        "names the running {daemon} and {mentions:?}: {stderr}"
    );
}

/// One run after another of a daemon binary (`berth-agent` or `berth-controller`), its output
/// appended to one log file. Dropping it kills the running process.
#[derive(Debug)]
struct Daemon {
    /// The binary's name, for messages.
    name: &'static str,
    log_path: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    fn new(name: &'static str, log_path: PathBuf) -> Self {
        Self {
            name,
            log_path,
            child: None,
        }
    }

    /// Runs `cmd` (from [`berth_command`]) with `BERTH_LOG=log_level`, its stdout and stderr
    /// appended to the log, then waits until `{url}{probe}` answers 200.
    async fn start(
        &mut self,
        mut cmd: Command,
        log_level: &str,
        http: &Http,
        url: &str,
        probe: &str,
    ) {
        assert!(
            self.child.is_none(),
            "{} is already running; kill9() or sigterm() it first",
            self.name
        );
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path.display()));
        let log_err = log.try_clone().expect("clone the log file handle");
        // Earlier runs' lines are in the same file; only this run's "ready" line counts.
        let log_start = log.metadata().map_or(0, |m| m.len() as usize);
        let child = cmd
            .env("BERTH_LOG", log_level)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}",
                    with_descriptor_census(format!("spawn {} ({cmd:?}): {e}", self.name))
                )
            });
        self.child = Some(child);
        // The daemon may listen on 0.0.0.0 while it is reached on one address: the port decides.
        let port = url.rsplit(':').next().unwrap_or_default();
        self.wait_ready(http, &format!("{url}{probe}"), port, log_start)
            .await;
    }

    async fn wait_ready(&mut self, http: &Http, readyz: &str, port: &str, log_start: usize) {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                panic!(
                    "{}",
                    with_descriptor_census(format!(
                        "{} exited ({status}) before it was ready; its log:\n{}",
                        self.name,
                        self.log()
                    ))
                );
            }
            // A 200 alone could come from another daemon that took the port first; the
            // "ready" line in this process's own (JSON) log names the port it bound.
            match http.try_send(Method::GET, readyz, None, &[], None).await {
                Ok(r) if r.status == 200 && self.bound(port, log_start) => {
                    return;
                }
                _ if started.elapsed() >= TIMEOUT => panic!(
                    "{} was not ready within {TIMEOUT:?}; its log:\n{}",
                    self.name,
                    self.log()
                ),
                _ => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Whether this run (the log from `log_start` on) logged its "ready" line for `port`.
    fn bound(&self, port: &str, log_start: usize) -> bool {
        let suffix = format!(r#":{port}""#);
        self.log().get(log_start..).is_some_and(|log| {
            log.lines()
                .any(|l| l.contains(r#" ready","listen":""#) && l.contains(&suffix))
        })
    }

    /// SIGKILL, and wait until the kernel has reaped it.
    fn kill9(&mut self) {
        let child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        reap_killed(child);
    }

    /// SIGKILL, if it runs.
    fn kill_if_running(&mut self) {
        if let Some(child) = self.child.take() {
            reap_killed(child);
        }
    }

    /// SIGTERM, and the exit status once it has stopped.
    async fn sigterm(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        kill(pid_of(child.id()), Signal::SIGTERM)
            .unwrap_or_else(|e| panic!("SIGTERM {}: {e}", self.name));
        let started = Instant::now();
        loop {
            if let Some(status) = child
                .try_wait()
                .unwrap_or_else(|e| panic!("wait for {}: {e}", self.name))
            {
                return status;
            }
            if started.elapsed() >= TIMEOUT {
                reap_killed(child);
                panic!(
                    "{} did not stop within {TIMEOUT:?} of SIGTERM; its log:\n{}",
                    self.name,
                    self.log()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGHUP, and the log line that tells what the daemon did with it (reloaded its `[tls]`
    /// files, could not, or had none).
    async fn hangup(&self) -> String {
        const OUTCOMES: [&str; 3] = [
            "reloaded the [tls] files",
            "cannot reload the [tls] files",
            "no [tls] to reload",
        ];
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        let seen = self.log().len();
        kill(pid_of(pid), Signal::SIGHUP).unwrap_or_else(|e| panic!("SIGHUP {}: {e}", self.name));
        wait_for(
            &format!("{} to answer SIGHUP", self.name),
            TIMEOUT,
            async || {
                self.log().get(seen..).and_then(|new| {
                    new.lines()
                        .find(|l| OUTCOMES.iter().any(|o| l.contains(o)))
                        .map(str::to_owned)
                })
            },
        )
        .await
    }

    /// Everything it wrote so far (all runs).
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill_if_running();
    }
}

fn reap_killed(mut child: Child) {
    let _ = kill(pid_of(child.id()), Signal::SIGKILL);
    let _ = child.wait();
}

// ---------------------------------------------------------------------------------------------
// The agent

/// What goes into an agent's `agent.toml`. [`AgentConfig::new`] fills in a deterministic,
/// self-contained host (no controller, `is_virtual` given, its own port block).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The address the agent listens on (and the harness calls it at): loopback by default,
    /// another address e.g. inside a network namespace.
    pub listen_ip: String,
    pub listen_port: u16,
    pub host_name: String,
    pub region: String,
    pub dc_location: String,
    pub is_virtual: bool,
    pub game_ports: RangeInclusive<u16>,
    pub management_ports: RangeInclusive<u16>,
    pub token: String,
    pub controller_url: Option<String>,
    pub join_token: Option<String>,
    /// Raw TOML lines written before `[[tokens]]` (top-level keys or whole tables).
    pub extra: Vec<String>,
    /// A command the agent is run under, e.g. `["ip", "netns", "exec", "<ns>"]`; it must
    /// `exec` the agent (so the child's pid is the agent's). Empty: the agent is run directly.
    pub wrapper: Vec<String>,
    /// `None`: `state` in the agent's own directory. Elsewhere (a disk of the test's own in
    /// another mount namespace, say), the helpers that read the state file do not see it.
    pub state_dir: Option<PathBuf>,
    /// `[tls]` with this fixture certificate (e.g. `"agent"`): the agent then serves HTTPS
    /// only, to clients with a certificate.
    pub tls: Option<String>,
    /// The fixture CAs its `ca_file` holds (`["ca"]`).
    pub tls_cas: Vec<&'static str>,
    /// A fixture revocation list for its `crl_file`.
    pub tls_crl: Option<&'static str>,
}

impl AgentConfig {
    pub fn new(host_name: &str) -> Self {
        let ports = PortBlock::next();
        Self {
            listen_ip: "127.0.0.1".to_owned(),
            listen_port: free_port(),
            host_name: host_name.to_owned(),
            region: "eu-west-1".to_owned(),
            dc_location: "ams1".to_owned(),
            is_virtual: false,
            game_ports: ports.game,
            management_ports: ports.management,
            token: format!("e2e-{}", uuid::Uuid::new_v4().simple()),
            controller_url: None,
            join_token: None,
            extra: Vec::new(),
            wrapper: Vec::new(),
            state_dir: None,
            tls: None,
            tls_cas: vec!["ca"],
            tls_crl: None,
        }
    }

    /// An agent that registers with `controller` (its URL and join token).
    pub fn joined(host_name: &str, controller: &ControllerProcess) -> Self {
        let mut config = Self::new(host_name);
        config.controller_url = Some(controller.url());
        config.join_token = Some(controller.config().join_token.clone());
        config
    }

    /// Tells the controller to reach this agent at `url` (e.g. a [`FaultProxy`] in front of it).
    pub fn advertise_url(mut self, url: &str) -> Self {
        let s = serde_json::to_string(url).expect("a string serialises");
        self.extra.push(format!("advertise_url = {s}"));
        self
    }

    /// Host labels (`labels = { k = "v" }`), which fleets select hosts by.
    pub fn labels(mut self, labels: &[(&str, &str)]) -> Self {
        let s = |v: &str| serde_json::to_string(v).expect("a string serialises");
        let inner: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{} = {}", s(k), s(v)))
            .collect();
        self.extra
            .push(format!("labels = {{ {} }}", inner.join(", ")));
        self
    }

    /// The file's text for a given state directory. With `tls`, it also installs the TLS
    /// files in `tls/` beside the state directory (see [`install_tls`]).
    pub fn toml(&self, state_dir: &Path) -> String {
        let s = |v: &str| serde_json::to_string(v).expect("a string serialises");
        let mut t = String::new();
        let mut line = |l: String| {
            t.push_str(&l);
            t.push('\n');
        };
        line(format!(
            "listen = {}",
            s(&format!("{}:{}", self.listen_ip, self.listen_port))
        ));
        line(format!("state_dir = {}", s(&state_dir.to_string_lossy())));
        line(format!("host_name = {}", s(&self.host_name)));
        line(format!("region = {}", s(&self.region)));
        line(format!("dc_location = {}", s(&self.dc_location)));
        line(format!("is_virtual = {}", self.is_virtual));
        line(format!("game_ports = {}", s(&range_text(&self.game_ports))));
        line(format!(
            "management_ports = {}",
            s(&range_text(&self.management_ports))
        ));
        if let Some(u) = &self.controller_url {
            line(format!("controller_url = {}", s(u)));
        }
        if let Some(j) = &self.join_token {
            line(format!("join_token = {}", s(j)));
        }
        for l in &self.extra {
            line(l.clone());
        }
        if let Some(identity) = &self.tls {
            let dir = state_dir.with_file_name("tls");
            line(install_tls_with_crl(
                &dir,
                identity,
                &self.tls_cas,
                self.tls_crl,
            ));
        }
        line("[[tokens]]".to_owned());
        line(format!("token = {}", s(&self.token)));
        t
    }

    /// `http://` or, with [`AgentConfig::tls`], `https://`.
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

/// A `berth-agent` process with its own directory, config file, state and ports.
///
/// Dropping it kills the agent and every game it started (found through the state file, the
/// API answers seen by this handle, a last API listing, and the agent's children), so no game
/// outlives a test. The directory is kept when the test failed.
#[derive(Debug)]
pub struct AgentProcess {
    config: AgentConfig,
    config_path: PathBuf,
    state_dir: PathBuf,
    daemon: Daemon,
    http: Http,
    seen_pids: Mutex<BTreeSet<u32>>,
    /// Dropped after `Drop::drop` has killed every process writing into it.
    dir: TestDir,
}

impl AgentProcess {
    /// Starts an agent with [`AgentConfig::new`] in `target/e2e/<name>-…`.
    pub async fn start_new(name: &str) -> Self {
        Self::spawn(name, AgentConfig::new(name)).await
    }

    /// Writes the config and starts the agent; returns once `/readyz` answers 200.
    pub async fn spawn(name: &str, config: AgentConfig) -> Self {
        let dir = TestDir::new(name);
        let config_path = dir.join("agent.toml");
        let state_dir = config
            .state_dir
            .clone()
            .unwrap_or_else(|| dir.join("state"));
        std::fs::write(&config_path, config.toml(&state_dir))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
        let mut agent = Self {
            config,
            config_path,
            state_dir,
            daemon: Daemon::new("berth-agent", dir.join("agent.log")),
            http: Http::new(),
            seen_pids: Mutex::new(BTreeSet::new()),
            dir,
        };
        agent.start().await;
        agent
    }

    /// Gives the stopped agent another `host_name` in its config, for its next start.
    pub fn rename(&mut self, host_name: &str) {
        assert!(self.pid().is_none(), "stop the agent before renaming it");
        self.config.host_name = host_name.to_owned();
        std::fs::write(&self.config_path, self.config.toml(&self.state_dir))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", self.config_path.display()));
    }

    /// Starts the agent (again) on the same config and state; returns once it is ready.
    pub async fn start(&mut self) {
        let mut cmd = wrapped(&self.config.wrapper, "berth-agent");
        cmd.arg("--config").arg(&self.config_path);
        let url = self.url();
        self.daemon
            .start(cmd, "debug", &self.http, &url, "/readyz")
            .await;
    }

    /// SIGKILL, and wait until the kernel has reaped it. The games keep running.
    pub fn kill9(&mut self) {
        self.daemon.kill9();
    }

    /// SIGTERM, and the exit status once the agent has stopped.
    pub async fn sigterm(&mut self) -> ExitStatus {
        self.daemon.sigterm().await
    }

    /// The agent's own pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    pub fn url(&self) -> String {
        format!(
            "{}://{}:{}",
            self.config.scheme(),
            self.config.listen_ip,
            self.config.listen_port
        )
    }

    pub fn token(&self) -> &str {
        &self.config.token
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    pub fn dir(&self) -> &TestDir {
        &self.dir
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn http(&self) -> &Http {
        &self.http
    }

    /// The agent's stdout and stderr so far (all runs).
    pub fn log(&self) -> String {
        self.daemon.log()
    }

    /// Replaces its `[tls]` files (see [`install_tls`]) without a restart.
    pub fn replace_tls(&self, identity: &str, cas: &[&str]) {
        install_tls(&self.dir.join("tls"), identity, cas);
    }

    /// SIGHUP, and the log line saying what came of it.
    pub async fn hangup(&self) -> String {
        self.daemon.hangup().await
    }

    /// A game's log file, where the agent sends its stdout and stderr.
    pub fn game_log_path(&self, id: &str) -> PathBuf {
        self.state_dir.join("logs").join(format!("{id}.log"))
    }

    /// The agent's state file (`agent-state.json`), if written yet.
    pub fn state_file(&self) -> Option<Value> {
        let text = std::fs::read(self.state_dir.join("agent-state.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The persisted record of one instance.
    pub fn persisted_instance(&self, id: &str) -> Option<Value> {
        self.state_file()?["instances"]
            .as_array()?
            .iter()
            .find(|i| i["id"] == json!(id))
            .cloned()
    }

    /// Any request with this agent's token.
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Response {
        let url = format!("{}{path}", self.url());
        let resp = self
            .http
            .send(method, &url, Some(self.token()), &[], body)
            .await;
        self.remember_pids(&resp.json);
        resp
    }

    pub async fn get(&self, path: &str) -> Response {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Response {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Response {
        self.call(Method::DELETE, path, None).await
    }

    fn remember_pids(&self, v: &Value) {
        if let Ok(mut seen) = self.seen_pids.lock() {
            collect_pids(v, &mut seen);
        }
    }

    /// `POST /v1/instances`; panics unless 201.
    pub async fn deploy(&self, body: &Value) -> Value {
        self.post("/v1/instances", body).await.expect(201).json
    }

    /// Deploys `berth-sample-game` as instance `id`.
    pub async fn deploy_sample(
        &self,
        id: &str,
        startup_delay_ms: u64,
        match_seconds: u64,
    ) -> Value {
        let profile = sample_game_profile("sample-1.0", 7, startup_delay_ms, match_seconds);
        self.deploy(&deploy_body(id, profile)).await
    }

    /// `GET /v1/instances/{id}`; panics unless 200.
    pub async fn instance(&self, id: &str) -> Value {
        self.get(&format!("/v1/instances/{id}"))
            .await
            .expect(200)
            .json
    }

    /// `GET /v1/instances`; panics unless 200.
    pub async fn instances(&self) -> Vec<Value> {
        match self.get("/v1/instances").await.expect(200).json {
            Value::Array(list) => list,
            other => panic!("GET /v1/instances is not a list: {other}"),
        }
    }

    /// Polls the instance until `pred` holds; returns it.
    pub async fn wait_instance(
        &self,
        id: &str,
        desc: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_for(&format!("instance {id}: {desc}"), TIMEOUT, async || {
            let r = self.get(&format!("/v1/instances/{id}")).await;
            if r.status == 200 && pred(&r.json) {
                Ok(r.json)
            } else {
                Err(r.text)
            }
        })
        .await
    }

    /// Waits until the instance is online (4) with its Arcus link up: allocatable.
    pub async fn wait_online(&self, id: &str) -> Value {
        self.wait_instance(id, "status 4 with the Arcus link up", |i| {
            i["status"] == 4 && i["arcusConnected"] == true
        })
        .await
    }

    /// Waits until the state file records an allocation of `id` that the game itself has
    /// confirmed (its status 5 reached the agent): the allocation survives an agent restart,
    /// and no late status 5 from the game can race a deallocation.
    pub async fn wait_allocation_persisted(&self, id: &str) -> Value {
        wait_for(
            &format!("a game-confirmed allocation of {id} in the state file"),
            TIMEOUT,
            async || {
                self.persisted_instance(id)
                    .filter(|i| i["allocation"]["gameConfirmed"] == true)
            },
        )
        .await
    }

    /// Waits until the state file holds the current pid of every listed instance, so that a
    /// restarted agent knows them all.
    pub async fn wait_pids_persisted(&self, ids: &[&str]) {
        let mut want = Vec::new();
        for id in ids {
            want.push((id.to_string(), self.instance(id).await["pid"].clone()));
        }
        wait_for(
            "the state file to hold every game's pid",
            TIMEOUT,
            async || {
                let missing: Vec<_> = want
                    .iter()
                    .filter(|(id, pid)| {
                        pid.is_null()
                            || self.persisted_instance(id).is_none_or(|i| i["pid"] != *pid)
                    })
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(missing)
                }
            },
        )
        .await;
    }

    /// Every pid that may belong to a game of this agent.
    fn candidate_game_pids(&self) -> BTreeSet<u32> {
        let mut pids = self.seen_pids.lock().map(|s| s.clone()).unwrap_or_default();
        if let Some(state) = self.state_file() {
            collect_pids(&state, &mut pids);
        }
        if self.daemon.pid().is_some() {
            // A last listing covers games deployed but not yet seen or persisted.
            if let Some(list) = blocking_get(
                &self.config.listen_ip,
                self.config.listen_port,
                "/v1/instances",
                self.token(),
            ) {
                collect_pids(&list, &mut pids);
            }
        }
        if let Some(agent) = self.pid() {
            pids.extend(children_of(agent));
        }
        pids
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let mut pids = self.candidate_game_pids();
        let spawners = self.pid().map(children_of).unwrap_or_default();
        self.daemon.kill_if_running();
        // The agent's spawner exits once the agent is gone, after finishing a start in
        // progress; then every game of this agent, even one no listing or state file has
        // seen yet, is a process writing into this agent's directory.
        let deadline = Instant::now() + Duration::from_secs(2);
        while spawners.iter().any(|p| pid_alive(*p)) && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        pids.extend(pids_writing_under(&self.state_dir));
        let bins = bin_dir();
        for pid in pids {
            // Only our own game binaries: a recorded pid may have been reused by now.
            let ours = std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.starts_with(bins));
            if ours {
                // Games run in their own session: the pid is also the process group id.
                let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
                let _ = kill(pid_of(pid), Signal::SIGKILL);
            }
        }
    }
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(pid as i32)
}

/// A minimal blocking GET, for use in `Drop` (no runtime there to lean on).
fn blocking_get(ip: &str, port: u16, path: &str, token: &str) -> Option<Value> {
    let addr = std::net::SocketAddr::new(ip.parse().ok()?, port);
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let body = &text[text.find("\r\n\r\n")? + 4..];
    serde_json::from_str(body).ok()
}

// ---------------------------------------------------------------------------------------------
// The controller

/// An extra `[[tokens]]` entry of a controller.
#[derive(Debug, Clone)]
pub struct ControllerToken {
    pub token: String,
    /// `admin` or `matchmaker`.
    pub role: String,
    pub rate_limit_per_second: Option<u64>,
}

/// What goes into a controller's `controller.toml`. [`ControllerConfig::new`] gives a free
/// loopback port, fresh tokens, two regions and short timings so tests see expiry quickly:
/// heartbeats every 200 ms, a host unreachable after 1 s of silence, a reconcile every 200 ms.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The address the controller listens on: loopback by default; `0.0.0.0` to be reachable
    /// from other network namespaces too (the harness still calls it on loopback).
    pub listen_ip: String,
    pub listen_port: u16,
    pub join_token: String,
    pub admin_token: String,
    pub matchmaker_token: String,
    pub heartbeat_period_ms: u64,
    pub heartbeat_expiry_factor: f64,
    pub reconcile_interval_ms: u64,
    /// `None`: the controller's default (3).
    pub max_allocation_attempts: Option<u32>,
    /// `(id, name)` of every `[[regions]]` entry.
    pub regions: Vec<(u32, String)>,
    pub extra_tokens: Vec<ControllerToken>,
    /// Raw TOML lines written with the top-level keys (before any table).
    pub extra: Vec<String>,
    /// `[tls]` with this fixture certificate (e.g. `"controller"`).
    pub tls: Option<String>,
    /// The fixture CAs its `ca_file` holds (`["ca"]`).
    pub tls_cas: Vec<&'static str>,
    /// A fixture revocation list for its `crl_file`.
    pub tls_crl: Option<&'static str>,
    /// `None`: `data/controller.db` in the controller's own directory.
    pub database: Option<PathBuf>,
    /// Runs the controller under this command (e.g. `nsenter -t <pid> -m --`), like
    /// [`AgentConfig::wrapper`].
    pub wrapper: Vec<String>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl ControllerConfig {
    pub fn new() -> Self {
        let secret = |what: &str| format!("e2e-{what}-{}", uuid::Uuid::new_v4().simple());
        Self {
            listen_ip: "127.0.0.1".to_owned(),
            listen_port: free_port(),
            join_token: secret("join"),
            admin_token: secret("admin"),
            matchmaker_token: secret("matchmaker"),
            heartbeat_period_ms: 200,
            heartbeat_expiry_factor: 5.0,
            reconcile_interval_ms: 200,
            max_allocation_attempts: None,
            regions: vec![(1, "eu-west-1".to_owned()), (2, "us-east-1".to_owned())],
            extra_tokens: Vec::new(),
            extra: Vec::new(),
            tls: None,
            tls_cas: vec!["ca"],
            tls_crl: None,
            database: None,
            wrapper: Vec::new(),
        }
    }

    /// How long a silent host stays reachable.
    pub fn expiry(&self) -> Duration {
        Duration::from_millis(self.heartbeat_period_ms).mul_f64(self.heartbeat_expiry_factor)
    }

    /// The file's text for a given database file. With `tls`, it also installs the TLS files
    /// in `tls/` beside the database's directory (see [`install_tls`]).
    pub fn toml(&self, database: &Path) -> String {
        let s = |v: &str| serde_json::to_string(v).expect("a string serialises");
        let mut t = String::new();
        let mut line = |l: String| {
            t.push_str(&l);
            t.push('\n');
        };
        line(format!(
            "listen = {}",
            s(&format!("{}:{}", self.listen_ip, self.listen_port))
        ));
        line(format!(
            "database = {}",
            s(&format!("sqlite://{}", database.display()))
        ));
        line(format!("join_token = {}", s(&self.join_token)));
        line(format!(
            "heartbeat_period_ms = {}",
            self.heartbeat_period_ms
        ));
        // `{:?}` keeps the decimal point TOML needs for a float (5.0, not 5).
        line(format!(
            "heartbeat_expiry_factor = {:?}",
            self.heartbeat_expiry_factor
        ));
        line(format!(
            "reconcile_interval_ms = {}",
            self.reconcile_interval_ms
        ));
        if let Some(n) = self.max_allocation_attempts {
            line(format!("max_allocation_attempts = {n}"));
        }
        for l in &self.extra {
            line(l.clone());
        }
        if let Some(identity) = &self.tls {
            let data = database.parent().expect("the database's directory");
            let dir = data.with_file_name("tls");
            line(install_tls_with_crl(
                &dir,
                identity,
                &self.tls_cas,
                self.tls_crl,
            ));
        }
        let mut tokens = vec![
            ControllerToken {
                token: self.admin_token.clone(),
                role: "admin".to_owned(),
                rate_limit_per_second: None,
            },
            ControllerToken {
                token: self.matchmaker_token.clone(),
                role: "matchmaker".to_owned(),
                rate_limit_per_second: None,
            },
        ];
        tokens.extend(self.extra_tokens.iter().cloned());
        for (i, tok) in tokens.iter().enumerate() {
            line("[[tokens]]".to_owned());
            line(format!("token = {}", s(&tok.token)));
            line(format!("role = {}", s(&tok.role)));
            line(format!("name = {}", s(&format!("e2e-{}-{i}", tok.role))));
            if let Some(n) = tok.rate_limit_per_second {
                line(format!("rate_limit_per_second = {n}"));
            }
        }
        for (id, name) in &self.regions {
            line("[[regions]]".to_owned());
            line(format!("id = {id}"));
            line(format!("name = {}", s(name)));
        }
        t
    }
}

/// A `berth-controller` process with its own directory, config file and SQLite database.
/// [`ControllerProcess::kill9`] and [`ControllerProcess::start`] restart it on the same
/// database and port. Dropping it kills the controller.
#[derive(Debug)]
pub struct ControllerProcess {
    config: ControllerConfig,
    config_path: PathBuf,
    database: PathBuf,
    /// Declared before `dir`: dropping it kills the controller before the directory goes.
    daemon: Daemon,
    http: Http,
    dir: TestDir,
}

impl ControllerProcess {
    /// Starts a controller with [`ControllerConfig::new`] in `target/e2e/<name>-…`.
    pub async fn start_new(name: &str) -> Self {
        Self::spawn(name, ControllerConfig::new()).await
    }

    /// Writes the config and starts the controller; returns once `/readyz` answers 200.
    pub async fn spawn(name: &str, config: ControllerConfig) -> Self {
        let dir = TestDir::new(name);
        let config_path = dir.join("controller.toml");
        let database = config
            .database
            .clone()
            .unwrap_or_else(|| dir.join("data").join("controller.db"));
        std::fs::write(&config_path, config.toml(&database))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
        let mut controller = Self {
            config,
            config_path,
            database,
            daemon: Daemon::new("berth-controller", dir.join("controller.log")),
            http: Http::new(),
            dir,
        };
        controller.start().await;
        controller
    }

    /// Starts the controller (again) on the same config and database; returns once it is
    /// ready.
    pub async fn start(&mut self) {
        self.start_probed("/readyz").await;
    }

    /// Starts the controller (again); returns once it serves, even while `/readyz` says it
    /// cannot take allocations (its database refuses writes, say).
    pub async fn start_serving(&mut self) {
        self.start_probed("/healthz").await;
    }

    async fn start_probed(&mut self, probe: &str) {
        let mut cmd = wrapped(&self.config.wrapper, "berth-controller");
        cmd.arg("--config").arg(&self.config_path);
        let url = self.url();
        self.daemon
            .start(cmd, "info,berth_controller=debug", &self.http, &url, probe)
            .await;
    }

    /// SIGKILL, and wait until the kernel has reaped it.
    pub fn kill9(&mut self) {
        self.daemon.kill9();
    }

    /// SIGTERM, and the exit status once the controller has stopped.
    pub async fn sigterm(&mut self) -> ExitStatus {
        self.daemon.sigterm().await
    }

    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    pub fn url(&self) -> String {
        let ip = match self.config.listen_ip.as_str() {
            "0.0.0.0" => "127.0.0.1",
            ip => ip,
        };
        let scheme = if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{ip}:{}", self.config.listen_port)
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    pub fn admin_token(&self) -> &str {
        &self.config.admin_token
    }

    pub fn matchmaker_token(&self) -> &str {
        &self.config.matchmaker_token
    }

    pub fn database(&self) -> &Path {
        &self.database
    }

    /// A connection of our own to the controller's database, which it shares (WAL).
    async fn database_connection(&self) -> sqlx::SqliteConnection {
        use sqlx::Connection;
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&self.database)
            .create_if_missing(false);
        sqlx::SqliteConnection::connect_with(&options)
            .await
            .expect("open the controller's database")
    }

    /// The allocation rows on disk as `(allocation id, instance id)`, read from the database
    /// file itself (another SQLite connection, as after a crash), sorted.
    pub async fn stored_allocations(&self) -> Vec<(String, String)> {
        use sqlx::Connection;
        let mut conn = self.database_connection().await;
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT id, instance_id FROM allocations ORDER BY id")
                .fetch_all(&mut conn)
                .await
                .expect("read the allocations table");
        let _ = conn.close().await;
        rows
    }

    /// The stored body of allocation `id`, as JSON.
    pub async fn stored_allocation_body(&self, id: &str) -> Value {
        use sqlx::Connection;
        let mut conn = self.database_connection().await;
        let (body,): (String,) = sqlx::query_as("SELECT body FROM allocations WHERE id = ?")
            .bind(id)
            .fetch_one(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("read allocation {id}: {e}"));
        let _ = conn.close().await;
        serde_json::from_str(&body).expect("an allocation body is JSON")
    }

    pub fn dir(&self) -> &TestDir {
        &self.dir
    }

    pub fn http(&self) -> &Http {
        &self.http
    }

    /// The controller's output so far (all runs).
    pub fn log(&self) -> String {
        self.daemon.log()
    }

    /// Replaces its `[tls]` files (see [`install_tls`]) without a restart.
    pub fn replace_tls(&self, identity: &str, cas: &[&str]) {
        install_tls(&self.dir.join("tls"), identity, cas);
    }

    /// [`ControllerProcess::replace_tls`] with the revocation lists `crl` (a fixture name).
    pub fn replace_tls_with_crl(&self, identity: &str, cas: &[&str], crl: &str) {
        install_tls_with_crl(&self.dir.join("tls"), identity, cas, Some(crl));
    }

    /// SIGHUP, and the log line saying what came of it.
    pub async fn hangup(&self) -> String {
        self.daemon.hangup().await
    }

    /// Makes the harness's requests with another TLS client (for one that presents a
    /// certificate the controller's current CA vouches for).
    pub fn set_http(&mut self, http: Http) {
        self.http = http;
    }

    /// Any request to this controller: `path` may carry a query.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Response {
        let url = format!("{}{path}", self.url());
        self.http.send(method, &url, token, headers, body).await
    }

    /// A request with the admin token.
    pub async fn admin(&self, method: Method, path: &str, body: Option<&Value>) -> Response {
        self.call(method, path, Some(self.admin_token()), &[], body)
            .await
    }

    /// A request with the matchmaker token.
    pub async fn matchmaker(&self, method: Method, path: &str, body: Option<&Value>) -> Response {
        self.call(method, path, Some(self.matchmaker_token()), &[], body)
            .await
    }

    /// `POST /v1/applications` (Arcus, no confirmation); panics unless 201.
    pub async fn create_application(&self, id: u32, name: &str) -> Value {
        let body = json!({"id": id, "name": name, "managementProtocol": "arcus", "confirmAllocation": false});
        self.admin(Method::POST, "/v1/applications", Some(&body))
            .await
            .expect(201)
            .json
    }

    /// `POST /v1/profiles`; panics unless 201.
    pub async fn create_profile(&self, profile: &Value) -> Value {
        self.admin(Method::POST, "/v1/profiles", Some(profile))
            .await
            .expect(201)
            .json
    }

    /// `POST /v1/fleets`; panics unless 201.
    pub async fn create_fleet(&self, fleet: &Value) -> Value {
        self.admin(Method::POST, "/v1/fleets", Some(fleet))
            .await
            .expect(201)
            .json
    }

    /// `PUT /v1/fleets/{id}`; panics unless 200.
    pub async fn put_fleet(&self, fleet: &Value) -> Value {
        let id = &fleet["id"];
        self.admin(Method::PUT, &format!("/v1/fleets/{id}"), Some(fleet))
            .await
            .expect(200)
            .json
    }

    /// An application, a `berth-sample-game` profile (`{profile_id}`) and a fleet running
    /// `per_host` of it on every host of `eu-west-1` that carries `labels`.
    pub async fn sample_fleet(
        &self,
        application_id: u32,
        fleet_id: u64,
        per_host: u32,
        match_seconds: u64,
        labels: &[(&str, &str)],
    ) {
        self.create_application(application_id, &format!("game-{application_id}"))
            .await;
        let profile_id = format!("sample-{application_id}");
        let mut profile = sample_game_profile(&profile_id, application_id, 0, match_seconds);
        profile["stopTimeoutSeconds"] = json!(5);
        self.create_profile(&profile).await;
        self.create_fleet(&fleet_body(
            fleet_id,
            application_id,
            &profile_id,
            per_host,
            labels,
        ))
        .await;
    }

    /// `POST /v1/applications/{id}/allocate` with the matchmaker token and `headers`.
    pub async fn allocate(
        &self,
        application_id: u32,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> Response {
        self.call(
            Method::POST,
            &format!("/v1/applications/{application_id}/allocate"),
            Some(self.matchmaker_token()),
            headers,
            Some(body),
        )
        .await
    }

    /// Allocates; panics unless 200. Returns the instance object.
    pub async fn allocate_ok(&self, application_id: u32, filter: &str) -> Value {
        self.allocate(application_id, &json!({"filter": filter}), &[])
            .await
            .expect(200)
            .json
    }

    /// Allocates as soon as the controller offers an instance: after a release (the game must
    /// first acknowledge it, reporting 4 to its agent, which reports to the controller) or
    /// while a host re-registers. Meanwhile allocations are refused with 404
    /// NO_ALLOCATABLE_INSTANCE, and nothing else is acceptable. Returns the instance object.
    pub async fn allocate_when_offered(
        &self,
        application_id: u32,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> Value {
        wait_for("an allocatable instance", TIMEOUT, async || {
            let r = self.allocate(application_id, body, headers).await;
            if r.status == 200 {
                return Ok(r.json);
            }
            r.assert_error(404, "NO_ALLOCATABLE_INSTANCE", None);
            Err(r.text)
        })
        .await
    }

    /// A bare-metal agent in eu-west-1 registered with this controller: `host_name` is its
    /// host name, and its directory is `target/e2e/<prefix>-<host_name>-…`.
    pub async fn spawn_agent(&self, prefix: &str, host_name: &str) -> AgentProcess {
        AgentProcess::spawn(
            &format!("{prefix}-{host_name}"),
            AgentConfig::joined(host_name, self),
        )
        .await
    }

    /// The i3D-compatible route (`PATCH` or `POST`), `filters` URL-encoded into the query.
    pub async fn allocate_i3d(
        &self,
        method: Method,
        application_id: u32,
        filters: &str,
        body: Option<&Value>,
    ) -> Response {
        let mut path =
            format!("/v3/applicationInstance/game/{application_id}/empty/allocateWithErrors");
        if !filters.is_empty() {
            path.push_str("?filters=");
            path.push_str(&berth_http::percent_encode(filters));
        }
        self.call(method, &path, Some(self.matchmaker_token()), &[], body)
            .await
    }

    /// `GET /v1/instances{query}` (e.g. `?applicationId=7`); panics unless 200.
    pub async fn instances(&self, query: &str) -> Vec<Value> {
        match self
            .matchmaker(Method::GET, &format!("/v1/instances{query}"), None)
            .await
            .expect(200)
            .json
        {
            Value::Array(list) => list,
            other => panic!("GET /v1/instances is not a list: {other}"),
        }
    }

    /// `GET /v1/instances/{id}`; panics unless 200.
    pub async fn instance(&self, id: &str) -> Value {
        self.matchmaker(Method::GET, &format!("/v1/instances/{id}"), None)
            .await
            .expect(200)
            .json
    }

    /// `GET /v1/hosts`; panics unless 200.
    pub async fn hosts(&self) -> Vec<Value> {
        match self
            .matchmaker(Method::GET, "/v1/hosts", None)
            .await
            .expect(200)
            .json
        {
            Value::Array(list) => list,
            other => panic!("GET /v1/hosts is not a list: {other}"),
        }
    }

    /// The host the controller knows by this name.
    pub async fn host_named(&self, name: &str) -> Value {
        self.hosts()
            .await
            .into_iter()
            .find(|h| h["name"] == json!(name))
            .unwrap_or_else(|| panic!("no host named {name:?} is registered"))
    }

    /// Polls `GET /v1/instances{query}` until `pred` holds for the whole list; returns it.
    pub async fn wait_instances(
        &self,
        query: &str,
        desc: &str,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        wait_for(desc, TIMEOUT, async || {
            let list = self.instances(query).await;
            if pred(&list) {
                Ok(list)
            } else {
                Err(summary(&list))
            }
        })
        .await
    }

    /// Waits until the application has exactly `n` instances and every one is allocatable at
    /// the controller (status 4, Arcus link up); returns them.
    pub async fn wait_online(&self, application_id: u32, n: usize) -> Vec<Value> {
        self.wait_instances(
            &format!("?applicationId={application_id}"),
            &format!("{n} online instances of application {application_id}"),
            |list| list.len() == n && list.iter().all(is_allocatable),
        )
        .await
    }

    /// Polls one instance until `pred` holds; returns it.
    pub async fn wait_instance(
        &self,
        id: &str,
        desc: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_for(&format!("instance {id}: {desc}"), TIMEOUT, async || {
            let r = self
                .matchmaker(Method::GET, &format!("/v1/instances/{id}"), None)
                .await;
            if r.status == 200 && pred(&r.json) {
                Ok(r.json)
            } else {
                Err(r.text)
            }
        })
        .await
    }

    /// Polls `GET /v1/hosts` until `pred` holds for the host named `name`; returns it.
    pub async fn wait_host(&self, name: &str, desc: &str, pred: impl Fn(&Value) -> bool) -> Value {
        wait_for(&format!("host {name}: {desc}"), TIMEOUT, async || {
            let hosts = self.hosts().await;
            match hosts.iter().find(|h| h["name"] == json!(name)) {
                Some(h) if pred(h) => Ok(h.clone()),
                Some(h) => Err(h.to_string()),
                None => Err(format!("not registered; hosts: {hosts:?}")),
            }
        })
        .await
    }

    /// `GET /metrics` with the matchmaker token; panics unless 200.
    pub async fn metrics(&self) -> String {
        self.matchmaker(Method::GET, "/metrics", None)
            .await
            .expect(200)
            .text
    }
}

/// A fleet body (DESIGN.md §4.1 shape) in region `eu-west-1`.
pub fn fleet_body(
    id: u64,
    application_id: u32,
    profile_id: &str,
    per_host: u32,
    labels: &[(&str, &str)],
) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    json!({
        "id": id,
        "name": format!("fleet-{id}"),
        "applicationId": application_id,
        "deploymentEnvironment": "production",
        "profileId": profile_id,
        "regions": ["eu-west-1"],
        "hostLabels": labels,
        "instancesPerHost": per_host,
    })
}

/// Allocatable as the controller sees it: online with the Arcus link up.
pub fn is_allocatable(instance: &Value) -> bool {
    instance["status"] == 4 && instance["arcusConnected"] == true
}

/// `id host status allocationId` of every instance, for failure messages.
fn summary(list: &[Value]) -> String {
    let lines: Vec<String> = list
        .iter()
        .map(|i| {
            format!(
                "{} host={} status={} arcus={} alloc={}",
                i["id"], i["hostId"], i["status"], i["arcusConnected"], i["allocationId"]
            )
        })
        .collect();
    format!("{} instances: [{}]", list.len(), lines.join("; "))
}

/// The value of one Prometheus sample, e.g. `metric(text, "berth_controller_instances",
/// "status=\"online\"")`; `None` when the series is absent.
pub fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = if labels.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

/// Panics, showing the whole exposition `text`, unless every `(name, labels, value)` sample
/// is present with that value (see [`metric`]).
#[track_caller]
pub fn assert_metrics(text: &str, expected: &[(&str, &str, f64)]) {
    for &(name, labels, value) in expected {
        assert_eq!(
            metric(text, name, labels),
            Some(value),
            "{name}{{{labels}}} in:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// JSON

/// Reading the API's JSON objects: fields that must be there, and the metadata shape.
pub mod json {
    use std::collections::BTreeSet;

    use serde_json::{Value, json};

    /// `[{"key": k, "value": v}, …]`, the API's metadata shape.
    pub fn kv(pairs: &[(&str, &str)]) -> Value {
        pairs
            .iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect()
    }

    /// An instance's `id`; panics when it has none.
    #[track_caller]
    pub fn id_of(instance: &Value) -> String {
        instance["id"]
            .as_str()
            .unwrap_or_else(|| panic!("instance has no id: {instance}"))
            .to_owned()
    }

    /// An instance's `pid`; panics when it has none.
    #[track_caller]
    pub fn pid_of(instance: &Value) -> u32 {
        number_of(instance, "pid")
    }

    /// An instance's game `port`; panics when it has none.
    #[track_caller]
    pub fn port_of(instance: &Value) -> u16 {
        number_of(instance, "port")
    }

    #[track_caller]
    fn number_of<T: TryFrom<u64>>(instance: &Value, field: &str) -> T {
        instance[field]
            .as_u64()
            .and_then(|n| T::try_from(n).ok())
            .unwrap_or_else(|| panic!("instance has no {field} that fits: {instance}"))
    }

    /// An error body's `details` (empty when absent).
    pub fn details(body: &Value) -> &str {
        body["details"].as_str().unwrap_or_default()
    }

    /// The ids of a list of instances.
    pub fn ids(list: &[Value]) -> BTreeSet<String> {
        list.iter().map(id_of).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Fault injection

/// A tiny HTTP proxy between the controller and one agent (the agent's `advertise_url` points
/// at it). It forwards every request to the real agent, unless told to answer allocations with
/// `200 OK` and a body that is not JSON, to swallow allocations, or to hold the agent's answers
/// to removals back for a while (a slow network path): fault injection between the controller
/// and the agent, with the agent itself untouched.
#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    faults: std::sync::Arc<Faults>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Faults {
    garbage: std::sync::atomic::AtomicBool,
    garbage_answers: std::sync::atomic::AtomicU64,
    removal_delay_ms: std::sync::atomic::AtomicU64,
    hold: std::sync::atomic::AtomicBool,
    held: std::sync::atomic::AtomicU64,
    refuse: std::sync::atomic::AtomicBool,
    /// Requests closed unanswered while refusing: allocations, `GET /v1/host`, the rest.
    refused: [std::sync::atomic::AtomicU64; 3],
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `target` (`http://127.0.0.1:port`).
    pub async fn start(target: String) -> Self {
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let faults = Arc::new(Faults::default());
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(connector);
        let shared = (Arc::new(target), faults.clone(), client);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of descriptors or similar: back off instead of spinning.
                    tokio::time::sleep(POLL).await;
                    continue;
                };
                let (target, faults, client) = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (target, faults, client) =
                            (target.clone(), faults.clone(), client.clone());
                        async move {
                            if faults.refuse.load(Ordering::SeqCst) {
                                let kind = if req.uri().path().ends_with("/allocate")
                                    || req.uri().path().ends_with("/batch")
                                {
                                    0
                                } else if req.uri().path() == "/v1/host" {
                                    1
                                } else {
                                    2
                                };
                                faults.refused[kind].fetch_add(1, Ordering::SeqCst);
                                // An error closes the connection with no answer.
                                return Err(std::io::Error::other("refused by the fault proxy"));
                            }
                            Ok(proxy_one(req, &target, &faults, &client).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { port, faults, task }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// On: every allocation (`POST …/allocate`, or a batch holding one) is answered `200 OK`
    /// with a non-JSON body and never reaches the agent. Off: everything is forwarded.
    pub fn garbage_allocations(&self, on: bool) {
        self.faults.garbage.store(on, Ordering::SeqCst);
    }

    /// How many allocations were answered with garbage so far.
    pub fn garbage_answers(&self) -> u64 {
        self.faults.garbage_answers.load(Ordering::SeqCst)
    }

    /// On: every allocation is swallowed: never forwarded, never answered (the caller sees
    /// it only when it gives up or dies), as if the network lost it. Off: forwarded again,
    /// except those already swallowed.
    pub fn hold_allocations(&self, on: bool) {
        self.faults.hold.store(on, Ordering::SeqCst);
    }

    /// On: every request is read and its connection closed with no answer, as an agent
    /// behind a firewall that resets the controller's connections. Off: forwarded again.
    pub fn refuse_all(&self, on: bool) {
        self.faults.refuse.store(on, Ordering::SeqCst);
    }

    /// Requests refused so far: `(allocations and batches, GET /v1/host, others)`.
    pub fn refused(&self) -> (u64, u64, u64) {
        let n = |i: usize| self.faults.refused[i].load(Ordering::SeqCst);
        (n(0), n(1), n(2))
    }

    /// How many allocations were swallowed so far.
    pub fn held_allocations(&self) -> u64 {
        self.faults.held.load(Ordering::SeqCst)
    }

    /// Forwards every `DELETE` (instance removal) at once, but holds the agent's answer back
    /// for `delay` before passing it on: by then the agent has long reported the removal over
    /// its own link, so the controller sees the answer after the fact.
    pub fn delay_removal_answers(&self, delay: Duration) {
        self.faults
            .removal_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy_one(
    req: http::Request<hyper::body::Incoming>,
    target: &str,
    faults: &Faults,
    client: &Client<HttpConnector, Full<Bytes>>,
) -> http::Response<Full<Bytes>> {
    let reply = |status: u16, body: &'static str| {
        http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "text/plain")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("a static response")
    };
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return reply(400, "request body cut off");
    };
    // Allocations reach the agent alone (`…/allocate`) or in the controller's batches.
    let allocates = parts.uri.path().ends_with("/allocate")
        || (parts.uri.path().ends_with("/batch")
            && String::from_utf8_lossy(&body).contains(r#""op":"allocate""#));
    if faults.garbage.load(Ordering::SeqCst) && parts.method == Method::POST && allocates {
        faults.garbage_answers.fetch_add(1, Ordering::SeqCst);
        return reply(
            200,
            "<html>this is not the agent you are looking for</html>",
        );
    }
    if faults.hold.load(Ordering::SeqCst) && parts.method == Method::POST && allocates {
        faults.held.fetch_add(1, Ordering::SeqCst);
        // Ends only when the caller's connection does.
        return std::future::pending().await;
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = http::Request::builder()
        .method(parts.method.clone())
        .uri(format!("{target}{path}"));
    for (k, v) in &parts.headers {
        if k != http::header::HOST {
            out = out.header(k, v);
        }
    }
    let Ok(out) = out.body(Full::new(body)) else {
        return reply(400, "cannot forward");
    };
    let delay = match parts.method {
        Method::DELETE => Duration::from_millis(faults.removal_delay_ms.load(Ordering::SeqCst)),
        _ => Duration::ZERO,
    };
    let answer = client.request(out).await;
    if !delay.is_zero() {
        // Network latency on the way back, injected on purpose.
        tokio::time::sleep(delay).await;
    }
    match answer {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            match body.collect().await {
                Ok(b) => http::Response::from_parts(parts, Full::new(b.to_bytes())),
                Err(_) => reply(502, "agent answer cut off"),
            }
        }
        Err(_) => reply(502, "agent unreachable"),
    }
}

// ---------------------------------------------------------------------------------------------
// Games

/// The profile (DESIGN.md §4.1 shape) that runs `berth-sample-game`.
pub fn sample_game_profile(
    profile_id: &str,
    application_id: u32,
    startup_delay_ms: u64,
    match_seconds: u64,
) -> Value {
    json!({
        "id": profile_id,
        "applicationId": application_id,
        "build": "1.0.0",
        "executable": bin("berth-sample-game").to_string_lossy(),
        "args": [
            "--port={port}",
            "--management-port={managementPort}",
            "--instance-id={instanceId}",
            format!("--startup-delay-ms={startup_delay_ms}"),
            format!("--match-seconds={match_seconds}"),
        ],
    })
}

/// The profile that runs `berth-bad-game` in `mode`; it appends a line to `count_file` for
/// every management connection it accepts.
pub fn bad_game_profile(
    profile_id: &str,
    application_id: u32,
    mode: &str,
    count_file: &Path,
) -> Value {
    json!({
        "id": profile_id,
        "applicationId": application_id,
        "build": "bad",
        "executable": bin("berth-bad-game").to_string_lossy(),
        "args": [
            "--port={port}",
            "--management-port={managementPort}",
            "--instance-id={instanceId}",
            format!("--mode={mode}"),
            format!("--count-file={}", count_file.display()),
        ],
    })
}

/// The profile of a game that reports 4 and then never answers another frame, the soft stop
/// included (`berth-bad-game` in `log-frames` mode): a game that drains for ever, or hangs.
/// It logs every frame it gets to the returned file, in `dir`.
pub fn silent_game_profile(profile_id: &str, application_id: u32, dir: &Path) -> (Value, PathBuf) {
    let frames = dir.join(format!("{profile_id}.frames"));
    let mut profile = bad_game_profile(
        profile_id,
        application_id,
        "log-frames",
        &dir.join(format!("{profile_id}.count")),
    );
    if let Some(args) = profile["args"].as_array_mut() {
        args.push(json!(format!("--frames-file={}", frames.display())));
    }
    (profile, frames)
}

/// An agent deploy request for an Arcus game.
pub fn deploy_body(id: &str, profile: Value) -> Value {
    json!({"id": id, "managementProtocol": "arcus", "profile": profile})
}

/// Asks a test game what it learned over Arcus: connect to its game port, send `INFO`, read
/// one JSON line.
pub async fn game_info(port: u16) -> io::Result<Value> {
    game_info_at("127.0.0.1", port).await
}

/// [`game_info`] of a game reachable at `ip` (e.g. inside a network namespace).
pub async fn game_info_at(ip: &str, port: u16) -> io::Result<Value> {
    let query = async {
        let mut stream = TcpStream::connect((ip, port)).await?;
        stream.write_all(b"INFO\n").await?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await?;
        serde_json::from_str(&line).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("INFO answer {line:?}: {e}"),
            )
        })
    };
    tokio::time::timeout(CALL_TIMEOUT, query)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no INFO answer"))?
}

/// Asks every game of `instances` (controller instance objects, games on loopback) for `INFO`
/// and panics naming each one that was sent `allocated` while its match ran: a running match
/// given to a second matchmaker, seen from the game itself. Returns how many `allocated`
/// frames the games received in all.
pub async fn assert_no_match_given_away(instances: &[Value]) -> u64 {
    let mut received = 0;
    let mut given_away = Vec::new();
    for instance in instances {
        let id = json::id_of(instance);
        let info = game_info(json::port_of(instance))
            .await
            .unwrap_or_else(|e| panic!("INFO of {id}: {e}"));
        received += info["allocationsReceived"]
            .as_u64()
            .unwrap_or_else(|| panic!("INFO of {id} has no allocationsReceived: {info}"));
        if info["allocatedDuringMatch"] != 0 {
            given_away.push(format!("{id}: {info}"));
        }
    }
    assert!(
        given_away.is_empty(),
        "games sent `allocated` while a match was in progress: {given_away:#?}"
    );
    received
}

/// Polls a game's `INFO` until `pred` holds; returns the answer.
pub async fn wait_game_info(port: u16, desc: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(
        &format!("INFO of port {port}: {desc}"),
        TIMEOUT,
        async || match game_info(port).await {
            Ok(v) if pred(&v) => Ok(v),
            Ok(v) => Err(v.to_string()),
            Err(e) => Err(e.to_string()),
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Processes

/// The fields of `/proc/<pid>/stat` after the command's name (state, ppid, process group,
/// session, …), if the pid exists. The name (field 2) may hold spaces and parentheses; the
/// rest follows the last ')'.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The state letter of `/proc/<pid>/stat` (`R`, `S`, `Z`, …), if the pid exists.
pub fn process_state(pid: u32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// The session a process belongs to, if the pid exists.
pub fn session_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(3)?.parse().ok()
}

/// Whether `pid` is a live process (a zombie is dead, only not yet reaped).
pub fn pid_alive(pid: u32) -> bool {
    process_state(pid).is_some_and(|s| s != 'Z' && s != 'X')
}

/// A process's arguments, if it still exists.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Live processes with an argument containing `needle`.
pub fn pids_with_arg(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    all_pids()
        .into_iter()
        .filter(|&pid| pid != me && pid_alive(pid))
        .filter(|&pid| cmdline(pid).is_some_and(|args| args.iter().any(|a| a.contains(needle))))
        .collect()
}

/// Live processes whose standard output is a file under `dir`: every game an agent with that
/// state directory started (the agent sends each game's output to a log file there), whatever
/// the agent itself knows about them.
pub fn pids_writing_under(dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    all_pids()
        .into_iter()
        .filter(|&pid| pid != me && pid_alive(pid))
        .filter(|&pid| {
            std::fs::read_link(format!("/proc/{pid}/fd/1")).is_ok_and(|out| out.starts_with(dir))
        })
        .collect()
}

/// The value of a `--name=value` argument of a live process.
pub fn arg_value(pid: u32, name: &str) -> Option<String> {
    let prefix = format!("--{name}=");
    cmdline(pid)?
        .into_iter()
        .find_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
}

/// How many live processes run the game of `instance_id` (exactly one, unless something is
/// duplicated).
pub fn count_instance_processes(instance_id: &str) -> usize {
    pids_with_arg(&format!("--instance-id={instance_id}")).len()
}

/// Live direct children of `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&pid| stat_fields(pid).and_then(|f| f.get(1)?.parse::<u32>().ok()) == Some(parent))
        .filter(|&pid| pid_alive(pid))
        .collect()
}

/// Sends `signal` to one process.
pub fn signal(pid: u32, signal: Signal) -> nix::Result<()> {
    kill(pid_of(pid), signal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn census_names_what_is_open() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let census = with_descriptor_census("spawn x: Too many open files (os error 24)".into());
        assert!(census.contains("this process holds"), "{census}");
        assert!(census.contains("Max open files"), "{census}");
        assert!(
            census.contains(&format!("tcp LISTEN local :{port} remote :0")),
            "{census}"
        );
        assert_eq!(
            with_descriptor_census("something else".into()),
            "something else"
        );
    }
}
