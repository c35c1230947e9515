//! Fault tests of the whole system (DESIGN.md §10): the real controller, agents and sample
//! games, hit with concurrent matchmakers, SIGKILLs of either daemon under load, network
//! partitions between network namespaces, a full disk under the controller's database, and
//! malformed or slow input.
//!
//! Fault schedules (when to kill, how long to hold, which agent) come from a seeded xorshift
//! PRNG. Every test prints its seed; `BERTH_FAULT_SEED=<n>` runs the same schedule again.
//! Waits poll for observable state with a failure timeout; the only fixed delays are the
//! randomised ones that decide when a fault is injected and how long it lasts.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_e2e::json::{details, id_of, ids, kv, pid_of};
use berth_e2e::{
    AgentConfig, AgentProcess, ControllerConfig, ControllerProcess, Http, Response, TIMEOUT,
    arg_value, assert_no_match_given_away, count_instance_processes, fleet_body, game_info,
    is_allocatable, pid_alive, pids_writing_under, sample_game_profile, short_id, wait_for,
};
use bytes::Bytes;
use http::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Helpers

/// Says why a test did not run, both in its captured output and on the terminal.
fn skipped(reason: &str) {
    println!("SKIPPED: {reason}");
    eprintln!("SKIPPED: {reason}");
}

/// xorshift64*: tiny, deterministic, good enough for fault schedules.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    /// The generator of one test: `BERTH_FAULT_SEED` (or the clock) mixed with the test's
    /// name, so that one seed reproduces every test of a run.
    fn seeded(test: &str) -> Self {
        let base = std::env::var("BERTH_FAULT_SEED")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
                    ^ u64::from(std::process::id())
            });
        eprintln!("[faults] {test}: seed {base} (BERTH_FAULT_SEED={base} reproduces it)");
        // FNV-1a of the name, so tests of one run get different schedules.
        let name = test.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Self((base ^ name) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// An independent generator for a worker task.
    fn fork(&mut self) -> Self {
        Self(self.next() | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

fn alloc_of(instance: &Value) -> String {
    instance["allocationId"]
        .as_str()
        .unwrap_or_else(|| panic!("instance has no allocationId: {instance}"))
        .to_owned()
}

/// The errors an allocation may legitimately end with while agents die and come back, with
/// their documented HTTP status and agent code (ERRORS.md).
fn documented_allocation_error(code: &str) -> Option<(u16, Option<u32>)> {
    Some(match code {
        "NO_ALLOCATABLE_INSTANCE" => (404, None),
        "AGENT_UNREACHABLE" => (504, Some(76007)),
        "ALLOCATION_TIMED_OUT" => (422, Some(76007)),
        "INSTANCE_NOT_ON_HOST" => (404, Some(76003)),
        "INSTANCE_NOT_ALLOCATABLE" => (404, Some(76004)),
        "INSTANCE_ALLOCATING" => (422, Some(76005)),
        "INSTANCE_ALREADY_ALLOCATED" => (422, Some(76006)),
        _ => return None,
    })
}

/// Checks the error shape of ERRORS.md for any code; returns the code.
#[track_caller]
fn error_code_of(r: &Response) -> String {
    let code = r.json["code"].as_str().unwrap_or_default().to_owned();
    let expected_code = documented_allocation_error(&code).and_then(|(_, e)| e);
    r.assert_error(r.status, &code, expected_code);
    code
}

/// The controller's instances of application 7, by id.
async fn controller_view(c_http: &Http, url: &str, token: &str) -> Result<Vec<Value>, String> {
    let r = c_http
        .try_send(
            Method::GET,
            &format!("{url}/v1/instances?applicationId=7"),
            Some(token),
            &[],
            None,
        )
        .await?;
    match r.json {
        Value::Array(list) if r.status == 200 => Ok(list),
        _ => Err(format!("GET /v1/instances: {} {}", r.status, r.text)),
    }
}

/// A short summary of instances for failure messages.
fn brief(list: &[Value]) -> String {
    list.iter()
        .map(|i| {
            format!(
                "{} st={} alloc={} pid={} arcus={}",
                i["id"], i["status"], i["allocationId"], i["pid"], i["arcusConnected"]
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// One request with a failure timeout of its own: a request caught by a SIGKILL must not hold
/// a worker for the harness's long default.
async fn send_within(
    http: &Http,
    within: Duration,
    method: Method,
    url: &str,
    token: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> Result<Response, String> {
    match tokio::time::timeout(
        within,
        http.try_send(method, url, Some(token), headers, Some(body)),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {within:?}")),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Concurrent allocators: the history has no double allocation

#[derive(Debug, Clone)]
struct Held {
    instance: String,
    allocation: String,
    acked: Duration,
    release_sent: Duration,
}

/// Releases `allocated` (an instance object an allocation answered) by name; panics unless
/// 200.
async fn release_ok(c: &ControllerProcess, allocated: &Value) {
    let (base, instance, allocation) = (c.url(), id_of(allocated), alloc_of(allocated));
    let r = release_named(
        c.http(),
        &base,
        c.matchmaker_token(),
        &instance,
        &allocation,
    )
    .await
    .expect("an answer");
    assert_eq!(r.status, 200, "{}", r.text);
}

/// A matchmaker's release of its own allocation, named so that it never ends another match.
async fn release_named(
    http: &Http,
    base: &str,
    token: &str,
    instance: &str,
    allocation: &str,
) -> Result<Response, String> {
    http.try_send(
        Method::POST,
        &format!("{base}/v1/instances/{instance}/deallocate"),
        Some(token),
        &[],
        Some(&json!({"allocationId": allocation})),
    )
    .await
}

/// How many matchmakers `run_matchmakers` runs, how long, and which refusals it takes besides
/// an empty pool.
struct Load {
    tasks: usize,
    /// Allocation attempts in all.
    max_ops: u64,
    max_time: Duration,
    /// Set: the matchmakers stop before their next allocation.
    stop: Option<Arc<AtomicBool>>,
    /// Set: a 503 `SERVICE_UNAVAILABLE` saying that the database cannot be written (and that
    /// nothing was allocated) is a refusal too, counted here.
    unwritable: Option<Arc<AtomicU64>>,
}

impl Load {
    fn new(tasks: usize, max_ops: u64, max_time: Duration) -> Self {
        Self {
            tasks,
            max_ops,
            max_time,
            stop: None,
            unwritable: None,
        }
    }
}

/// Whether `r` is the controller's refusal of an allocation it could not write to its
/// database: a 503 that says so, says that nothing was allocated, and asks for a retry.
fn refused_as_unwritable(r: &Response) -> bool {
    let d = details(&r.json);
    r.status == 503
        && r.json["code"] == "SERVICE_UNAVAILABLE"
        && d.contains("cannot be written")
        && d.contains("Nothing was allocated")
        && r.header("retry-after") == Some("1")
}

/// The load of the history checks: `load.tasks` matchmakers allocate from application 7
/// until `load.max_ops` attempts in all, `load.max_time` or `load.stop`; `allocated` handles
/// each acknowledged allocation (with a random number for its choices) and returns what was
/// wrong with it. A refusal of a busy pool must be a full 404 `NO_ALLOCATABLE_INSTANCE`, and
/// is followed by a pause of up to a few milliseconds so that nobody spins on a full pool.
/// Returns every problem and the refusals.
async fn run_matchmakers<F, Fut>(
    c: &ControllerProcess,
    load: Load,
    rng: &mut Rng,
    allocated: F,
) -> (Vec<String>, u64)
where
    F: Fn(Response, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Vec<String>> + Send,
{
    let started = Instant::now();
    let budget = Arc::new(AtomicU64::new(0));
    let refusals = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for n in 0..load.tasks {
        let (http, token) = (c.http().clone(), c.matchmaker_token().to_owned());
        let url = format!("{}/v1/applications/7/allocate", c.url());
        let body = json!({"metadata": kv(&[("matchmaker", &n.to_string())])});
        let (budget, refusals, allocated) = (budget.clone(), refusals.clone(), allocated.clone());
        let (stop, unwritable) = (load.stop.clone(), load.unwritable.clone());
        let (max_ops, max_time) = (load.max_ops, load.max_time);
        let mut rng = rng.fork();
        workers.push(tokio::spawn(async move {
            let mut problems = Vec::new();
            while started.elapsed() < max_time
                && !stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed))
                && budget.fetch_add(1, Ordering::Relaxed) < max_ops
                && problems.len() <= 5
            {
                let r = match http
                    .try_send(Method::POST, &url, Some(&token), &[], Some(&body))
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        problems.push(format!("allocate: no answer: {e}"));
                        break;
                    }
                };
                match (r.status, &unwritable) {
                    (200, _) if r.json["status"] == 5 => {
                        problems.extend(allocated(r, rng.next()).await);
                    }
                    (404, _) if r.json["code"] == "NO_ALLOCATABLE_INSTANCE" => {
                        r.assert_error(404, "NO_ALLOCATABLE_INSTANCE", None);
                        refusals.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(rng.below(3))).await;
                    }
                    (503, Some(count)) if refused_as_unwritable(&r) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5 + rng.below(10))).await;
                    }
                    _ => problems.push(format!("allocate: {} {}", r.status, r.text)),
                }
            }
            problems
        }));
    }
    let mut problems = Vec::new();
    for w in workers {
        problems.extend(w.await.expect("matchmaker task"));
    }
    (problems, refusals.load(Ordering::Relaxed))
}

/// [`check_in_game_then_release`] for `run_matchmakers`, counting in `checked`.
fn checks_in_game(
    c: &ControllerProcess,
    checked: &Arc<AtomicU64>,
) -> impl Fn(Response, u64) -> CheckFuture + Clone + Send + 'static {
    let checked = checked.clone();
    let who = (c.http().clone(), c.url(), c.matchmaker_token().to_owned());
    move |r: Response, random: u64| -> CheckFuture {
        Box::pin(check_in_game_then_release(
            who.clone(),
            checked.clone(),
            r,
            random,
        ))
    }
}

type CheckFuture = std::pin::Pin<Box<dyn Future<Output = Vec<String>> + Send>>;

/// A matchmaker's handling of each match in the tests that check matches in their games:
/// after up to 30 ms it asks the game over `INFO` whether it is running this very match (the
/// matchmaker's own metadata, and a matchmaker releases before it allocates again; a game not
/// allocated yet is asked again, as `allocated` may still be on its way), counts it in
/// `checked`, and releases it by name.
async fn check_in_game_then_release(
    c: (Http, String, String),
    checked: Arc<AtomicU64>,
    r: Response,
    random: u64,
) -> Vec<String> {
    let (http, base, token) = c;
    let (instance, allocation) = (id_of(&r.json), alloc_of(&r.json));
    let mut problems = Vec::new();
    tokio::time::sleep(Duration::from_millis(random % 30)).await;
    let port = r.json["port"].as_u64().and_then(|p| u16::try_from(p).ok());
    // The agent answers once it sent `allocated`; the frame may still be on its way to the
    // game, so a game not allocated yet is asked again, for a while. Any other match is wrong
    // at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let Some(port) = port else {
            problems.push(format!("no port: {}", r.json));
            break;
        };
        match game_info(port).await {
            Ok(i) if i["allocated"] == true && i["allocation"] == r.json["metadata"] => {
                checked.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Ok(i) if i["allocated"] == false && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(i) => {
                problems.push(format!(
                    "{instance} ({allocation}): the game is not running this match: {i}"
                ));
                break;
            }
            Err(e) => {
                problems.push(format!(
                    "{instance} ({allocation}): the game does not answer: {e}"
                ));
                break;
            }
        }
    }
    match release_named(&http, &base, &token, &instance, &allocation).await {
        Ok(d) if d.status == 200 => {}
        Ok(d) => problems.push(format!(
            "release {instance} ({allocation}): {} {}",
            d.status, d.text
        )),
        Err(e) => problems.push(format!("release {instance}: no answer: {e}")),
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_allocators_history_check() {
    const TASKS: usize = 16;
    /// Allocation attempts; with the releases, a few thousand requests.
    const MAX_OPS: u64 = 3000;
    const MAX_TIME: Duration = Duration::from_secs(20);
    let mut rng = Rng::seeded("concurrent_allocators_history_check");
    let c = ControllerProcess::start_new("flt-history").await;
    c.sample_fleet(7, 456, 4, 0, &[]).await;
    let mut agents = Vec::new();
    for name in ["hist-a", "hist-b", "hist-c"] {
        agents.push(c.spawn_agent("flt-history", name).await);
    }
    let online = c.wait_online(7, 12).await;

    let started = Instant::now();
    // Counts every request sent, releases included.
    let ops = Arc::new(AtomicU64::new(0));
    let history = Arc::new(Mutex::new(Vec::<Held>::new()));
    let (http, base, token) = (c.http().clone(), c.url(), c.matchmaker_token().to_owned());
    let allocated = {
        let (ops, history) = (ops.clone(), history.clone());
        move |r: Response, random: u64| {
            let (http, base, token) = (http.clone(), base.clone(), token.clone());
            let (ops, history) = (ops.clone(), history.clone());
            async move {
                let acked = started.elapsed();
                let instance = id_of(&r.json);
                let allocation = alloc_of(&r.json);
                // A short match.
                let hold = random % 4;
                if hold > 0 {
                    tokio::time::sleep(Duration::from_millis(hold)).await;
                }
                let release_sent = started.elapsed();
                ops.fetch_add(1, Ordering::Relaxed);
                let d = release_named(&http, &base, &token, &instance, &allocation).await;
                let problem = match d {
                    Ok(d) if d.status == 200 => None,
                    Ok(d) => Some(format!(
                        "deallocate {instance} ({allocation}): {} {}",
                        d.status, d.text
                    )),
                    Err(e) => Some(format!("deallocate: no answer: {e}")),
                };
                history.lock().expect("history").push(Held {
                    instance,
                    allocation,
                    acked,
                    release_sent,
                });
                problem.into_iter().collect()
            }
        }
    };
    let (problems, refusals) =
        run_matchmakers(&c, Load::new(TASKS, MAX_OPS, MAX_TIME), &mut rng, allocated).await;
    let took = started.elapsed();
    let history = history.lock().expect("history").clone();
    // Each allocation attempt is a request too.
    let op_count = ops.load(Ordering::Relaxed) + history.len() as u64 + refusals;
    eprintln!(
        "[faults] concurrent_allocators_history_check: {op_count} requests in {:.1}s: {} \
         acknowledged allocations (each released), {refusals} NO_ALLOCATABLE_INSTANCE refusals",
        took.as_secs_f64(),
        history.len(),
    );
    assert!(
        problems.is_empty(),
        "only 200s and full 404 NO_ALLOCATABLE_INSTANCE bodies are acceptable (no 5xx): \
         {problems:#?}"
    );
    assert!(
        history.len() >= 100,
        "too few allocations to say anything: {}",
        history.len()
    );

    // Zero double allocations: per instance, no two [ack, release sent] intervals overlap.
    let mut by_instance: BTreeMap<&str, Vec<&Held>> = BTreeMap::new();
    for h in &history {
        by_instance.entry(&h.instance).or_default().push(h);
    }
    for (instance, list) in &mut by_instance {
        list.sort_by_key(|h| h.acked);
        for pair in list.windows(2) {
            assert!(
                pair[1].acked > pair[0].release_sent,
                "instance {instance} was handed out twice at once: {:?} and {:?}",
                pair[0],
                pair[1]
            );
        }
    }
    let distinct: BTreeSet<&str> = history.iter().map(|h| h.allocation.as_str()).collect();
    assert_eq!(distinct.len(), history.len(), "allocation ids are unique");
    assert!(
        by_instance.keys().all(|i| ids(&online).contains(*i)),
        "only fleet instances were handed out"
    );

    // Everything is back in the pool, nothing duplicated.
    c.wait_instances("?applicationId=7", "all 12 instances idle again", |l| {
        l.len() == 12 && l.iter().all(is_allocatable)
    })
    .await;
    for i in &online {
        assert_eq!(count_instance_processes(&id_of(i)), 1, "{i}");
    }
    // The games' side: each acknowledged allocation reached exactly one game, and no game was
    // sent one while its match ran.
    let received = assert_no_match_given_away(&online).await;
    assert_eq!(
        received,
        history.len() as u64,
        "allocated frames the games received"
    );
}

/// Games that end their own matches, as Arcus games may (status 4 while allocated), while
/// matchmakers only allocate: an instance returns to the pool only through its game's report,
/// the agent's event and the controller's release, racing the next allocations. No game is
/// sent an allocation during its match, every acknowledged allocation reaches exactly one
/// game, and the whole pool is free again afterwards. Half the games end each match after
/// 1 ms, so that the agent's report of the match's end often reaches the controller before
/// the agent's answer to the allocation does (which once left such instances allocated at
/// the controller for good). Matchmakers also release half their allocations at once, naming
/// them, racing the game's own end: the release succeeds, or, when the game was first and the
/// instance already holds another match, is refused with "not the current allocation" and
/// releases nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn games_ending_their_own_matches_under_concurrent_allocators() {
    const TASKS: usize = 8;
    /// Allocation attempts, refusals of a busy pool included.
    const MAX_OPS: u64 = 3000;
    const MAX_TIME: Duration = Duration::from_secs(10);
    let mut rng = Rng::seeded("games_ending_their_own_matches_under_concurrent_allocators");
    let c = ControllerProcess::start_new("flt-matchend").await;
    c.create_application(7, "game-7").await;
    // Short matches, so each instance goes round the pool many times in the test's seconds.
    for (fleet, profile_id, match_seconds) in
        [(456, "sample-7", "0.02"), (457, "sample-7b", "0.001")]
    {
        let mut profile = sample_game_profile(profile_id, 7, 0, 0);
        for arg in profile["args"].as_array_mut().expect("profile args") {
            if arg == "--match-seconds=0" {
                *arg = json!(format!("--match-seconds={match_seconds}"));
            }
        }
        c.create_profile(&profile).await;
        c.create_fleet(&fleet_body(fleet, 7, profile_id, 2, &[]))
            .await;
    }
    let mut agents = Vec::new();
    for name in ["matchend-a", "matchend-b", "matchend-c"] {
        agents.push(c.spawn_agent("flt-matchend", name).await);
    }
    let online = c.wait_online(7, 12).await;

    let started = Instant::now();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    // Releases that went through, and those the game's own end overtook.
    let releases = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let allocated = {
        let (acked, releases) = (acked.clone(), releases.clone());
        let (http, base, token) = (c.http().clone(), c.url(), c.matchmaker_token().to_owned());
        move |r: Response, random: u64| {
            let instance = id_of(&r.json);
            let allocation = alloc_of(&r.json);
            acked.lock().expect("acked").push(allocation.clone());
            let (http, base, token, releases) =
                (http.clone(), base.clone(), token.clone(), releases.clone());
            async move {
                if random.is_multiple_of(2) {
                    return Vec::new();
                }
                let d = release_named(&http, &base, &token, &instance, &allocation).await;
                match d {
                    Ok(d) if d.status == 200 => {
                        releases[0].fetch_add(1, Ordering::Relaxed);
                        Vec::new()
                    }
                    Ok(d)
                        if d.status == 400
                            && d.json["code"] == "INVALID_REQUEST"
                            && details(&d.json).contains("not the current allocation") =>
                    {
                        releases[1].fetch_add(1, Ordering::Relaxed);
                        Vec::new()
                    }
                    Ok(d) => vec![format!(
                        "deallocate {instance} ({allocation}): {} {}",
                        d.status, d.text
                    )],
                    Err(e) => vec![format!("deallocate {instance}: no answer: {e}")],
                }
            }
        }
    };
    let (problems, refusals) =
        run_matchmakers(&c, Load::new(TASKS, MAX_OPS, MAX_TIME), &mut rng, allocated).await;
    let acked = acked.lock().expect("acked").clone();
    eprintln!(
        "[faults] games_ending_their_own_matches_under_concurrent_allocators: {} acknowledged \
         allocations in {:.1}s, {refusals} NO_ALLOCATABLE_INSTANCE refusals; releases: {} \
         went through, {} came after the game ended the match",
        acked.len(),
        started.elapsed().as_secs_f64(),
        releases[0].load(Ordering::Relaxed),
        releases[1].load(Ordering::Relaxed),
    );
    assert!(
        problems.is_empty(),
        "only 200s with status 5 and full 404 NO_ALLOCATABLE_INSTANCE bodies, and releases \
         that went through or came after the match: {problems:#?}"
    );
    assert!(
        acked.len() >= 100,
        "too few allocations to say anything: {}",
        acked.len()
    );
    let distinct: BTreeSet<&str> = acked.iter().map(String::as_str).collect();
    assert_eq!(distinct.len(), acked.len(), "allocation ids are unique");

    // Every match ends by itself, so the whole pool comes back without a single release.
    c.wait_instances("?applicationId=7", "all 12 instances idle again", |l| {
        l.len() == 12 && l.iter().all(is_allocatable)
    })
    .await;
    let received = assert_no_match_given_away(&online).await;
    assert_eq!(
        received,
        acked.len() as u64,
        "allocated frames the games received"
    );
    for i in &online {
        assert_eq!(count_instance_processes(&id_of(i)), 1, "{i}");
    }
}

/// The fleet shrinks and grows while matchmakers allocate from it: the reconciler removes only
/// idle instances, never one a matchmaker was just given. Each matchmaker asks its game, while
/// it holds the allocation, whether it is running that very match (its metadata), then
/// releases it by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_resizing_under_allocation_load_ends_no_match() {
    const TASKS: usize = 6;
    const MAX_TIME: Duration = Duration::from_secs(6);
    let mut rng = Rng::seeded("fleet_resizing_under_allocation_load_ends_no_match");
    let c = ControllerProcess::start_new("flt-resize").await;
    c.sample_fleet(7, 456, 4, 0, &[]).await;
    let mut agents = Vec::new();
    for name in ["resize-a", "resize-b"] {
        agents.push(c.spawn_agent("flt-resize", name).await);
    }
    c.wait_online(7, 8).await;

    let stop = Arc::new(AtomicBool::new(false));
    let resizes = {
        let (c_url, http, token) = (c.url(), c.http().clone(), c.admin_token().to_owned());
        let stop = stop.clone();
        let mut rng = rng.fork();
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let per_host = if n.is_multiple_of(2) { 1 } else { 4 };
                let body = fleet_body(456, 7, "sample-7", per_host, &[]);
                let r = http
                    .try_send(
                        Method::PUT,
                        &format!("{c_url}/v1/fleets/456"),
                        Some(&token),
                        &[],
                        Some(&body),
                    )
                    .await;
                assert!(r.is_ok_and(|r| r.status == 200), "resize {n}");
                n += 1;
                tokio::time::sleep(Duration::from_millis(100 + rng.below(300))).await;
            }
            n
        })
    };
    let checked = Arc::new(AtomicU64::new(0));
    let allocated = checks_in_game(&c, &checked);
    let load = Load::new(TASKS, u64::MAX, MAX_TIME);
    let (problems, _) = run_matchmakers(&c, load, &mut rng, allocated).await;
    let checked = checked.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let resized = resizes.await.expect("resizer task");
    eprintln!(
        "[faults] fleet_resizing_under_allocation_load_ends_no_match: {checked} matches checked \
         in their games, {resized} resizes"
    );
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(
        checked >= 50 && resized >= 6,
        "{checked} matches, {resized} resizes"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Controller SIGKILLs under load, matchmakers retrying with idempotency keys

/// An allocation acknowledged to a worker and never released by it.
#[derive(Debug, Clone)]
struct Kept {
    key: String,
    instance: String,
    allocation: String,
}

#[derive(Debug, Default)]
struct CrashLedger {
    kept: Vec<Kept>,
    released: usize,
    retried_keys: usize,
    replays: usize,
    not_found: usize,
    /// 5xx answers and requests without an answer, retried.
    retried_failures: BTreeMap<String, usize>,
    problems: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_sigkill_during_load_with_idempotent_retries() {
    const WORKERS: usize = 8;
    const MAX_KEPT: usize = 5;
    let mut rng = Rng::seeded("controller_sigkill_during_load_with_idempotent_retries");
    let mut c = ControllerProcess::start_new("flt-ctlkill").await;
    c.sample_fleet(7, 456, 6, 0, &[]).await;
    let agents = [
        c.spawn_agent("flt", "ctlkill-a").await,
        c.spawn_agent("flt", "ctlkill-b").await,
    ];
    let before = c.wait_online(7, 12).await;
    let pids: BTreeMap<String, u32> = before.iter().map(|i| (id_of(i), pid_of(i))).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Mutex::new(CrashLedger::default()));
    let kept_count = Arc::new(AtomicUsize::new(0));
    let run = short_id();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (http, base, token) = (c.http().clone(), c.url(), c.matchmaker_token().to_owned());
        let (stop, ledger, kept_count, run) = (
            stop.clone(),
            ledger.clone(),
            kept_count.clone(),
            run.clone(),
        );
        let mut rng = rng.fork();
        workers.push(tokio::spawn(async move {
            let alloc_url = format!("{base}/v1/applications/7/allocate");
            let note_retry = |what: String| {
                *ledger
                    .lock()
                    .expect("ledger")
                    .retried_failures
                    .entry(what)
                    .or_default() += 1;
            };
            let problem = |p: String| ledger.lock().expect("ledger").problems.push(p);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("flt-{run}-{w}-{n}");
                let body = json!({"metadata": kv(&[("key", &key)])});
                let headers = [("Idempotency-Key", key.as_str())];
                // Allocate: the same key until an answer that settles it.
                let mut answer = None;
                let mut tries = 0;
                loop {
                    tries += 1;
                    if tries > 300 {
                        problem(format!("{key}: no settling answer after {tries} tries"));
                        break;
                    }
                    let r = send_within(
                        &http,
                        Duration::from_secs(3),
                        Method::POST,
                        &alloc_url,
                        &token,
                        &headers,
                        &body,
                    )
                    .await;
                    match r {
                        Err(_) => note_retry("allocate: no answer".to_owned()),
                        Ok(r) if r.status == 200 => {
                            answer = Some(r.json);
                            break;
                        }
                        Ok(r) if r.status == 404 => {
                            r.assert_error(404, "NO_ALLOCATABLE_INSTANCE", None);
                            ledger.lock().expect("ledger").not_found += 1;
                            break;
                        }
                        Ok(r) if r.status >= 500 => {
                            note_retry(format!("allocate: {} {}", r.status, r.json["code"]));
                        }
                        // The first try of this key is still being worked on.
                        Ok(r)
                            if r.status == 409
                                && tries > 1
                                && details(&r.json).contains("still in progress") =>
                        {
                            r.assert_error(409, "IDEMPOTENCY_KEY_REUSED", None);
                            note_retry("allocate: 409 still in progress".to_owned());
                        }
                        Ok(r) => {
                            problem(format!("{key}: allocate answered {} {}", r.status, r.text));
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20 + rng.below(40))).await;
                }
                let Some(answer) = answer else {
                    tokio::time::sleep(Duration::from_millis(rng.below(20))).await;
                    continue;
                };
                let instance = id_of(&answer);
                let allocation = alloc_of(&answer);
                if answer["metadata"] != kv(&[("key", &key)]) {
                    problem(format!("{key}: answered another request's allocation: {answer}"));
                }
                // A key retried, or now and then any key: asking again must give the same.
                if tries > 1 || rng.chance(20) {
                    let mut again = None;
                    for _ in 0..300 {
                        match send_within(
                            &http,
                            Duration::from_secs(3),
                            Method::POST,
                            &alloc_url,
                            &token,
                            &headers,
                            &body,
                        )
                        .await
                        {
                            Ok(r) if r.status == 200 => {
                                again = Some(r.json);
                                break;
                            }
                            Ok(r) if r.status < 500 => {
                                problem(format!(
                                    "{key}: the replay of an acknowledged allocation answered {} {}",
                                    r.status, r.text
                                ));
                                break;
                            }
                            Ok(r) => note_retry(format!("replay: {} {}", r.status, r.json["code"])),
                            Err(_) => note_retry("replay: no answer".to_owned()),
                        }
                        tokio::time::sleep(Duration::from_millis(20 + rng.below(40))).await;
                    }
                    if let Some(again) = again {
                        if id_of(&again) != instance || alloc_of(&again) != allocation {
                            problem(format!(
                                "{key}: two 200s for one key differ: {answer} vs {again}"
                            ));
                        }
                        ledger.lock().expect("ledger").replays += 1;
                    }
                }
                if tries > 1 {
                    ledger.lock().expect("ledger").retried_keys += 1;
                }
                // Keep a few for good; release the rest after a short match.
                let keep = rng.chance(25)
                    && kept_count
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| {
                            (k < MAX_KEPT).then_some(k + 1)
                        })
                        .is_ok();
                if keep {
                    ledger.lock().expect("ledger").kept.push(Kept {
                        key,
                        instance,
                        allocation,
                    });
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(rng.below(30))).await;
                let release_url = format!("{base}/v1/instances/{instance}/deallocate");
                let release_body = json!({"allocationId": allocation});
                let mut released = false;
                for attempt in 1..=300 {
                    match send_within(
                        &http,
                        Duration::from_secs(3),
                        Method::POST,
                        &release_url,
                        &token,
                        &[],
                        &release_body,
                    )
                    .await
                    {
                        Ok(r) if r.status == 200 => {
                            released = true;
                            break;
                        }
                        // A retry after the release went through and the instance was
                        // handed to someone else (or is being handed out right now).
                        Ok(r)
                            if attempt > 1
                                && r.status == 400
                                && details(&r.json).contains("not the current allocation") =>
                        {
                            released = true;
                            break;
                        }
                        Ok(r) if r.status >= 500 => {
                            note_retry(format!("release: {} {}", r.status, r.json["code"]));
                        }
                        Ok(r) => {
                            problem(format!(
                                "{key}: release of {instance} ({allocation}) answered {} {}",
                                r.status, r.text
                            ));
                            break;
                        }
                        Err(_) => note_retry("release: no answer".to_owned()),
                    }
                    tokio::time::sleep(Duration::from_millis(20 + rng.below(40))).await;
                }
                if released {
                    ledger.lock().expect("ledger").released += 1;
                } else {
                    problem(format!("{key}: release of {instance} never went through"));
                }
            }
        }));
    }

    // The fault schedule: 3-4 SIGKILLs at random points of the load, each followed by a
    // restart on the same database.
    let crashes = 3 + rng.below(2);
    for n in 1..=crashes {
        tokio::time::sleep(rng.millis(400, 1500)).await;
        c.kill9();
        eprintln!("[faults] controller SIGKILL {n}/{crashes}");
        c.start().await;
    }
    tokio::time::sleep(rng.millis(300, 800)).await;
    stop.store(true, Ordering::Relaxed);
    let stopping = Instant::now();
    for w in workers {
        w.await.expect("worker task");
    }
    eprintln!("[faults] workers stopped in {:?}", stopping.elapsed());
    let ledger = Arc::try_unwrap(ledger)
        .expect("workers are done")
        .into_inner()
        .expect("ledger");
    eprintln!(
        "[faults] controller_sigkill_during_load_with_idempotent_retries: {crashes} crashes; {} \
         kept, {} released, {} keys retried, {} replays checked, {} refusals; retried: {:?}",
        ledger.kept.len(),
        ledger.released,
        ledger.retried_keys,
        ledger.replays,
        ledger.not_found,
        ledger.retried_failures
    );
    assert!(ledger.problems.is_empty(), "{:#?}", ledger.problems);
    assert!(
        ledger.released + ledger.kept.len() >= 20,
        "too little load to say anything"
    );

    // (b) No instance is in two kept allocations.
    let mut kept_by_instance: BTreeMap<&str, &Kept> = BTreeMap::new();
    for k in &ledger.kept {
        if let Some(other) = kept_by_instance.insert(&k.instance, k) {
            panic!(
                "instance {} is held by two acknowledged allocations: {other:?} and {k:?}",
                k.instance
            );
        }
    }
    let kept_allocations: BTreeMap<&str, &str> = ledger
        .kept
        .iter()
        .map(|k| (k.instance.as_str(), k.allocation.as_str()))
        .collect();

    // Settled: (a) every kept allocation is at the controller, (c) nothing else is allocated
    // anywhere, nothing is being allocated, and the agents agree.
    let (http, base, token) = (c.http().clone(), c.url(), c.matchmaker_token().to_owned());
    let settling = Instant::now();
    wait_for(
        "the controller and both agents to hold exactly the kept allocations",
        TIMEOUT,
        async || {
            let list = controller_view(&http, &base, &token).await?;
            if list.len() != 12 {
                return Err(format!("controller lists {}: {}", list.len(), brief(&list)));
            }
            for i in &list {
                let id = id_of(i);
                match kept_allocations.get(id.as_str()) {
                    Some(a) if i["status"] == 5 && i["allocationId"] == json!(a) => {}
                    Some(a) => {
                        let key = &kept_by_instance[id.as_str()].key;
                        return Err(format!(
                            "kept {id} ({a}, key {key}) is not allocated so: {i}"
                        ));
                    }
                    None if i["status"] == 5 || i["status"] == 6 => {
                        return Err(format!("controller: {id} allocated by nobody: {i}"));
                    }
                    None => {}
                }
            }
            for agent in &agents {
                for i in agent.instances().await {
                    let id = id_of(&i);
                    let status = i["status"].as_u64().unwrap_or_default();
                    let held = kept_allocations.get(id.as_str());
                    match (status, held) {
                        (5, Some(a)) if i["allocationId"] == json!(a) => {}
                        (5 | 6, _) | (_, Some(_)) => {
                            return Err(format!(
                                "{}: {id} is {i} (kept: {held:?})",
                                agent.config().host_name
                            ));
                        }
                        _ => {}
                    }
                }
            }
            Ok(())
        },
    )
    .await;

    eprintln!(
        "[faults] settled {:?} after the load stopped; the controller released {} allocations \
         it never acknowledged",
        settling.elapsed(),
        c.log()
            .matches("agent holds an allocation the controller never acknowledged")
            .count()
    );
    // Nothing duplicated or restarted along the way, and the controller still allocates.
    let after = c.instances("?applicationId=7").await;
    assert_eq!(ids(&after), ids(&before));
    for i in &after {
        assert_eq!(pid_of(i), pids[&id_of(i)], "no game restarted: {i}");
        assert_eq!(count_instance_processes(&id_of(i)), 1, "{i}");
    }
    assert_no_match_given_away(&after).await;
    if ledger.kept.len() < 12 {
        let fresh = c.allocate_when_offered(7, &json!({}), &[]).await;
        assert!(
            !kept_allocations.contains_key(id_of(&fresh).as_str()),
            "{fresh}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Agent SIGKILL and restart, five times, under load

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_restart_loop_under_load() {
    const WORKERS: usize = 3;
    const MAX_KEPT: usize = 3;
    const ROUNDS: usize = 5;
    let mut rng = Rng::seeded("agent_sigkill_restart_loop_under_load");
    let c = ControllerProcess::start_new("flt-agentkill").await;
    c.sample_fleet(7, 456, 4, 0, &[]).await;
    let mut agents = vec![
        c.spawn_agent("flt", "agentkill-a").await,
        c.spawn_agent("flt", "agentkill-b").await,
    ];
    let online = c.wait_online(7, 8).await;
    let pids: BTreeMap<String, u32> = online.iter().map(|i| (id_of(i), pid_of(i))).collect();
    let mut per_agent: Vec<BTreeSet<String>> = Vec::new();
    for a in &agents {
        let list = a.instances().await;
        assert_eq!(list.len(), 4);
        per_agent.push(ids(&list));
        let listed: Vec<&str> = list
            .iter()
            .map(|i| i["id"].as_str().unwrap_or(""))
            .collect();
        a.wait_pids_persisted(&listed).await;
    }

    // Workers allocate and release through the controller; a few allocations are kept. The
    // gate pauses them (each holds it for one whole allocate-hold-release cycle) while a
    // round is checked.
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let kept = Arc::new(Mutex::new(BTreeMap::<String, String>::new()));
    let problems = Arc::new(Mutex::new(Vec::<String>::new()));
    let outcomes = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (http, base, token) = (c.http().clone(), c.url(), c.matchmaker_token().to_owned());
        let (gate, stop, kept, problems, outcomes) = (
            gate.clone(),
            stop.clone(),
            kept.clone(),
            problems.clone(),
            outcomes.clone(),
        );
        let mut rng = rng.fork();
        workers.push(tokio::spawn(async move {
            let count = |what: &str| {
                *outcomes
                    .lock()
                    .expect("outcomes")
                    .entry(what.to_owned())
                    .or_default() += 1;
            };
            while !stop.load(Ordering::Relaxed) {
                let cycle = gate.read().await;
                let r = send_within(
                    &http,
                    Duration::from_secs(10),
                    Method::POST,
                    &format!("{base}/v1/applications/7/allocate"),
                    &token,
                    &[],
                    &json!({}),
                )
                .await;
                let r = match r {
                    Ok(r) => r,
                    Err(e) => {
                        problems
                            .lock()
                            .expect("problems")
                            .push(format!("allocate: {e}"));
                        break;
                    }
                };
                if r.status != 200 {
                    let code = error_code_of(&r);
                    if documented_allocation_error(&code).is_none() {
                        problems
                            .lock()
                            .expect("problems")
                            .push(format!("allocate: {} {}", r.status, r.text));
                    }
                    count(&code);
                    drop(cycle);
                    tokio::time::sleep(rng.millis(10, 50)).await;
                    continue;
                }
                count("allocated");
                let instance = id_of(&r.json);
                let allocation = alloc_of(&r.json);
                {
                    let mut k = kept.lock().expect("kept");
                    if k.len() < MAX_KEPT && rng.chance(20) {
                        k.insert(instance, allocation);
                        continue;
                    }
                }
                tokio::time::sleep(rng.millis(20, 200)).await;
                let d = send_within(
                    &http,
                    Duration::from_secs(10),
                    Method::POST,
                    &format!("{base}/v1/instances/{instance}/deallocate"),
                    &token,
                    &[],
                    &json!({"allocationId": allocation}),
                )
                .await;
                match d {
                    Ok(d) if d.status == 200 => count("released"),
                    Ok(d) => problems
                        .lock()
                        .expect("problems")
                        .push(format!("deallocate {instance}: {} {}", d.status, d.text)),
                    Err(e) => problems
                        .lock()
                        .expect("problems")
                        .push(format!("deallocate {instance}: {e}")),
                }
            }
        }));
    }

    for round in 1..=ROUNDS {
        tokio::time::sleep(rng.millis(100, 700)).await;
        let k = rng.below(agents.len() as u64) as usize;
        agents[k].kill9();
        for id in &per_agent[k] {
            assert!(
                pid_alive(pids[id]),
                "round {round}: game {id} died with its agent"
            );
        }
        tokio::time::sleep(rng.millis(0, 400)).await;
        agents[k].start().await;
        eprintln!(
            "[faults] round {round}: SIGKILLed and restarted {}",
            agents[k].config().host_name
        );
        // Some load on the restarted agent, then pause and check.
        tokio::time::sleep(rng.millis(50, 300)).await;
        let pausing = Instant::now();
        let pause = gate.write().await;
        let paused = Instant::now();
        let kept_now = kept.lock().expect("kept").clone();
        let (http, base, token) = (c.http().clone(), c.url(), c.matchmaker_token().to_owned());
        let agents_ref = &agents;
        let per_agent_ref = &per_agent;
        let pids_ref = &pids;
        wait_for(
            &format!("round {round}: games re-adopted and allocations agreed"),
            TIMEOUT,
            async || {
                for (a, mine) in agents_ref.iter().zip(per_agent_ref) {
                    let list = a.instances().await;
                    if ids(&list) != *mine {
                        return Err(format!("{} lists {}", a.config().host_name, brief(&list)));
                    }
                    for i in &list {
                        let id = id_of(i);
                        if i["pid"] != json!(pids_ref[&id]) || i["restarts"] != 0 {
                            return Err(format!(
                                "{id} not re-adopted as pid {}: {i}",
                                pids_ref[&id]
                            ));
                        }
                        let ok = match kept_now.get(&id) {
                            Some(alloc) => i["status"] == 5 && i["allocationId"] == json!(alloc),
                            None => i["status"] == 4 && i["allocationId"].is_null(),
                        };
                        if !ok || i["arcusConnected"] != true {
                            return Err(format!(
                                "{} (kept {:?}): {i}",
                                a.config().host_name,
                                kept_now.get(&id)
                            ));
                        }
                    }
                }
                let list = controller_view(&http, &base, &token).await?;
                for i in &list {
                    let id = id_of(i);
                    let ok = match kept_now.get(&id) {
                        Some(alloc) => i["status"] == 5 && i["allocationId"] == json!(alloc),
                        None => is_allocatable(i) && i["allocationId"].is_null(),
                    };
                    if !ok {
                        return Err(format!("controller (kept {:?}): {i}", kept_now.get(&id)));
                    }
                }
                if list.len() != 8 {
                    return Err(format!("controller lists {}", brief(&list)));
                }
                Ok(())
            },
        )
        .await;
        eprintln!(
            "[faults] round {round}: paused in {:?}, converged {:?} later",
            paused - pausing,
            paused.elapsed()
        );
        // Exactly one process per instance, and no game this test's agents started that its
        // agent does not know.
        for (a, mine) in agents.iter().zip(&per_agent) {
            for id in mine {
                assert_eq!(count_instance_processes(id), 1, "round {round}: {id}");
            }
            for pid in pids_writing_under(a.state_dir()) {
                let id = arg_value(pid, "instance-id").unwrap_or_default();
                assert!(
                    mine.contains(&id),
                    "round {round}: orphaned game pid {pid} ({id:?}) of {}",
                    a.config().host_name
                );
            }
        }
        drop(pause);
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker task");
    }
    let problems = problems.lock().expect("problems").clone();
    let outcomes = outcomes.lock().expect("outcomes").clone();
    let unacknowledged: usize = agents
        .iter()
        .map(|a| {
            a.log()
                .matches("re-adopted game reports an allocation the agent never acknowledged")
                .count()
        })
        .sum();
    eprintln!(
        "[faults] agent_sigkill_restart_loop_under_load: outcomes {outcomes:?}, kept {:?}; \
         released after re-adoption: {unacknowledged} never acknowledged by an agent, {} \
         never acknowledged by the controller",
        kept.lock().expect("kept"),
        c.log()
            .matches("agent holds an allocation the controller never acknowledged")
            .count()
    );
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(
        outcomes.get("allocated").copied().unwrap_or(0) >= 10,
        "too little load: {outcomes:?}"
    );
    // Games kept running through every agent restart: none was sent an allocation while its
    // match ran.
    assert_no_match_given_away(&c.instances("?applicationId=7").await).await;
}

// ---------------------------------------------------------------------------------------------
// 4. Network partitions between network namespaces

/// A network namespace joined to the host by a veth pair: `10.213.<n>.1/30` on the host side,
/// `.2` inside. Deleted on drop, also when the test fails.
#[derive(Debug)]
struct NetNs {
    name: String,
    host_veth: String,
    net: u8,
    created: bool,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    /// `Err` when namespaces cannot be made here (`ip netns add` fails: no permission, no
    /// kernel support). Anything failing after that is a test failure (a panic; the guard
    /// removes what was made).
    fn create() -> Result<Self, String> {
        let tag = short_id();
        let tag = &tag[..6];
        // A /30 no interface of this machine uses yet.
        let used = Command::new("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let start = u8::from_str_radix(&tag[..2], 16).unwrap_or(0);
        let net = (0..=255u8)
            .map(|k| start.wrapping_add(k))
            .find(|n| !used.contains(&format!("10.213.{n}.")))
            .expect("a free 10.213.x.0/30 subnet");
        let mut ns = Self {
            name: format!("berth-{tag}"),
            host_veth: format!("bvh-{tag}"),
            net,
            created: false,
        };
        ip(&["netns", "add", &ns.name])?;
        ns.created = true;
        let peer = format!("bvn-{tag}");
        let host_addr = format!("{}/30", ns.host_ip());
        let ns_addr = format!("{}/30", ns.inner_ip());
        let setup = || -> Result<(), String> {
            ip(&[
                "link",
                "add",
                &ns.host_veth,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
            ])?;
            ip(&["link", "set", &peer, "netns", &ns.name])?;
            ip(&["addr", "add", &host_addr, "dev", &ns.host_veth])?;
            ip(&["link", "set", &ns.host_veth, "up"])?;
            ip(&[
                "netns", "exec", &ns.name, "ip", "addr", "add", &ns_addr, "dev", &peer,
            ])?;
            ip(&["netns", "exec", &ns.name, "ip", "link", "set", &peer, "up"])?;
            ip(&["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"])?;
            // The namespace's ARP entry for the host is static, as a cached entry would be
            // across a real network outage: the kernel flushes learned entries when the link
            // loses its carrier, and re-resolving them waits for ARP's 1 s retransmit timer,
            // which would stretch a 300 ms cut past the 1 s expiry window all by itself. (The
            // host side re-resolves at once when its end comes back up.)
            let mac = std::fs::read_to_string(format!("/sys/class/net/{}/address", ns.host_veth))
                .map_err(|e| format!("MAC address of {}: {e}", ns.host_veth))?;
            ip(&[
                "netns",
                "exec",
                &ns.name,
                "ip",
                "neigh",
                "replace",
                &ns.host_ip(),
                "lladdr",
                mac.trim(),
                "dev",
                &peer,
                "nud",
                "permanent",
            ])
        };
        if let Err(e) = setup() {
            panic!("namespace {} was made but cannot be wired: {e}", ns.name);
        }
        Ok(ns)
    }

    fn host_ip(&self) -> String {
        format!("10.213.{}.1", self.net)
    }

    fn inner_ip(&self) -> String {
        format!("10.213.{}.2", self.net)
    }

    /// Cuts (or restores) the link: the host side of the veth goes down (up).
    fn link(&self, up: bool) {
        ip(&[
            "link",
            "set",
            &self.host_veth,
            if up { "up" } else { "down" },
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    }

    fn wrapper(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name]
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        let _ = ip(&["link", "del", &self.host_veth]);
        if self.created
            && let Err(e) = ip(&["netns", "del", &self.name])
        {
            eprintln!("[faults] {e}");
        }
    }
}

/// Watches the controller while a partition happens, recording every change it sees.
struct Watch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<WatchReport>,
}

/// What a [`Watch`] saw.
#[derive(Debug, Default)]
struct WatchReport {
    /// Polls that read both the host list and the instance list.
    observations: usize,
    /// Every difference from the baseline.
    changes: Vec<String>,
    /// Reads that got no usable answer (the first few), and how many there were.
    failures: Vec<String>,
    failed_reads: usize,
}

impl WatchReport {
    fn failed(&mut self, why: String) {
        self.failed_reads += 1;
        if self.failures.len() < 10 {
            self.failures.push(why);
        }
    }
}

impl Watch {
    /// Polls every ~20 ms: the host named `host` must stay listed and reachable and every
    /// instance keep the status, pid and allocation of `baseline`.
    fn start(
        c: &ControllerProcess,
        host: &str,
        baseline: &[Value],
        excluded: &BTreeSet<String>,
    ) -> Self {
        let (http, base, token) = (c.http().clone(), c.url(), c.matchmaker_token().to_owned());
        let host = host.to_owned();
        let baseline: BTreeMap<String, Value> = baseline
            .iter()
            .filter(|i| !excluded.contains(&id_of(i)))
            .map(|i| (id_of(i), i.clone()))
            .collect();
        let excluded = excluded.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut report = WatchReport::default();
            while !flag.load(Ordering::Relaxed) {
                let mut complete = true;
                let hosts = http
                    .try_send(
                        Method::GET,
                        &format!("{base}/v1/hosts"),
                        Some(&token),
                        &[],
                        None,
                    )
                    .await;
                match hosts {
                    Ok(Response {
                        status: 200,
                        json: Value::Array(hosts),
                        ..
                    }) => match hosts.iter().find(|h| h["name"] == json!(host)) {
                        Some(h) if h["reachable"] != true => {
                            report.changes.push(format!("host became unreachable: {h}"));
                        }
                        Some(_) => {}
                        None => report
                            .changes
                            .push(format!("host {host} is no longer listed: {hosts:?}")),
                    },
                    Ok(r) => {
                        complete = false;
                        report.failed(format!("GET /v1/hosts: {} {}", r.status, r.text));
                    }
                    Err(e) => {
                        complete = false;
                        report.failed(e);
                    }
                }
                match controller_view(&http, &base, &token).await {
                    Ok(list) => {
                        let now: BTreeMap<String, &Value> = list
                            .iter()
                            .filter(|i| !excluded.contains(&id_of(i)))
                            .map(|i| (id_of(i), i))
                            .collect();
                        if now.len() != baseline.len() {
                            report
                                .changes
                                .push(format!("instance count changed: {}", brief(&list)));
                        }
                        for (id, was) in &baseline {
                            let Some(i) = now.get(id) else { continue };
                            for field in
                                ["status", "pid", "allocationId", "arcusConnected", "state"]
                            {
                                if i[field] != was[field] {
                                    report.changes.push(format!(
                                        "{id}: {field} {} -> {}",
                                        was[field], i[field]
                                    ));
                                }
                            }
                        }
                    }
                    Err(e) => {
                        complete = false;
                        report.failed(e);
                    }
                }
                if complete {
                    report.observations += 1;
                }
                if report.changes.len() > 20 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            report
        });
        Self { stop, task }
    }

    async fn finish(self) -> WatchReport {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("watch task")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_partitions_with_namespaces() {
    let mut rng = Rng::seeded("network_partitions_with_namespaces");
    // Declared first, so it is dropped last: after the agent and its games are gone.
    let Some(net) = NetNs::create()
        .map_err(|reason| skipped(&format!("network namespaces unavailable: {reason}")))
        .ok()
    else {
        return;
    };
    let mut config = ControllerConfig::new();
    config.listen_ip = "0.0.0.0".to_owned();
    let c = ControllerProcess::spawn("flt-partition", config).await;
    assert_eq!(c.config().expiry(), Duration::from_secs(1));
    c.sample_fleet(7, 456, 3, 0, &[]).await;

    let mut inner = AgentConfig::joined("part-ns", &c);
    inner.listen_ip = net.inner_ip();
    inner.controller_url = Some(format!(
        "http://{}:{}",
        net.host_ip(),
        c.config().listen_port
    ));
    inner.dc_location = "ns1".to_owned();
    inner.wrapper = net.wrapper();
    let advertise = format!("http://{}:{}", net.inner_ip(), inner.listen_port);
    let ns_agent = AgentProcess::spawn("flt-partition-ns", inner.advertise_url(&advertise)).await;
    let _lo_agent =
        AgentProcess::spawn("flt-partition-lo", AgentConfig::joined("part-lo", &c)).await;
    let before = c.wait_online(7, 6).await;
    let ns_host = c.host_named("part-ns").await;
    assert_eq!(ns_host["advertiseUrl"], json!(advertise), "{ns_host}");
    let ns_host_id = ns_host["id"].clone();
    let on_ns: BTreeSet<String> = before
        .iter()
        .filter(|i| i["hostId"] == ns_host_id)
        .map(id_of)
        .collect();
    assert_eq!(on_ns.len(), 3, "{}", brief(&before));
    let pids: BTreeMap<String, u32> = before.iter().map(|i| (id_of(i), pid_of(i))).collect();
    let ns_ids: Vec<String> = on_ns.iter().cloned().collect();
    let ns_refs: Vec<&str> = ns_ids.iter().map(String::as_str).collect();
    ns_agent.wait_pids_persisted(&ns_refs).await;

    // A match on the namespaced host.
    let held = c.allocate_ok(7, "dcLocationName=ns1").await;
    assert!(on_ns.contains(&id_of(&held)), "{held}");
    let held_id = id_of(&held);
    let baseline = c
        .wait_instance(&held_id, "allocated", |i| i["status"] == 5)
        .await;
    assert_eq!(baseline["allocationId"], held["allocationId"]);
    let snapshot = c.instances("?applicationId=7").await;

    // (a) A partition shorter than the expiry window changes nothing. Meanwhile matchmakers
    // keep allocating on the loopback host.
    let lo_ids: BTreeSet<String> = ids(&snapshot).difference(&on_ns).cloned().collect();
    let watch = Watch::start(&c, "part-ns", &snapshot, &lo_ids);
    let churn_stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (http, base, token) = (c.http().clone(), c.url(), c.matchmaker_token().to_owned());
        let stop = churn_stop.clone();
        tokio::spawn(async move {
            let mut done = 0;
            let mut problems = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = http
                    .send(
                        Method::POST,
                        &format!("{base}/v1/applications/7/allocate"),
                        Some(&token),
                        &[],
                        Some(&json!({"filter": "dcLocationName=ams1"})),
                    )
                    .await;
                match r.status {
                    200 => {
                        let d = http
                            .send(
                                Method::POST,
                                &format!("{base}/v1/instances/{}/deallocate", id_of(&r.json)),
                                Some(&token),
                                &[],
                                Some(&json!({"allocationId": r.json["allocationId"]})),
                            )
                            .await;
                        if d.status == 200 {
                            done += 1;
                        } else {
                            problems.push(d.text);
                        }
                    }
                    404 => {
                        r.assert_error(404, "NO_ALLOCATABLE_INSTANCE", None);
                    }
                    _ => problems.push(r.text),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (done, problems)
        })
    };
    let short = rng.millis(250, 350);
    net.link(false);
    let cut = Instant::now();
    tokio::time::sleep(short).await;
    net.link(true);
    eprintln!("[faults] short partition of {:?}", cut.elapsed());
    // Observe for a whole expiry window after the link came back: a host that missed
    // heartbeats would be declared unreachable within it.
    tokio::time::sleep(c.config().expiry() + Duration::from_millis(500)).await;
    let watched = watch.finish().await;
    churn_stop.store(true, Ordering::Relaxed);
    let (churned, churn_problems) = churn.await.expect("churn task");
    assert!(
        watched.observations >= 10,
        "the watch saw the controller's hosts and instances only {} times; {} reads failed, \
         the first: {:#?}",
        watched.observations,
        watched.failed_reads,
        watched.failures
    );
    if watched.failed_reads > 0 {
        eprintln!(
            "[faults] the watch could not read the controller {} times: {:#?}",
            watched.failed_reads, watched.failures
        );
    }
    let changes = &watched.changes;
    assert!(
        changes.is_empty(),
        "a {short:?} partition (expiry {:?}) changed: {changes:#?}",
        c.config().expiry()
    );
    assert!(churn_problems.is_empty(), "{churn_problems:#?}");
    assert!(churned >= 3, "allocations kept working: {churned}");
    // And allocations on the namespaced host still work.
    let again = c.allocate_ok(7, "dcLocationName=ns1").await;
    assert!(
        on_ns.contains(&id_of(&again)) && id_of(&again) != held_id,
        "{again}"
    );
    c.matchmaker(
        Method::POST,
        &format!("/v1/instances/{}/deallocate", id_of(&again)),
        Some(&json!({"allocationId": again["allocationId"]})),
    )
    .await
    .expect(200);
    c.wait_instances(
        "?applicationId=7",
        "the released instance back in the pool",
        |l| l.iter().filter(|i| id_of(i) != held_id).all(is_allocatable),
    )
    .await;

    // (b) A partition longer than the window: the host is lost, its idle instances leave the
    // pool, its match stays allocated.
    let long = rng.millis(2300, 2700);
    net.link(false);
    let cut = Instant::now();
    let lost = c
        .wait_host("part-ns", "unreachable", |h| h["reachable"] == false)
        .await;
    let detected = cut.elapsed();
    assert!(
        detected <= c.config().expiry() + Duration::from_secs(1),
        "a cut-off host must leave the pool within expiry + 1 s; took {detected:?}"
    );
    assert_eq!(lost["state"], "unreachable", "{lost}");
    let kept = c.instance(&held_id).await;
    assert_eq!(kept["status"], 5, "{kept}");
    assert_eq!(kept["allocationId"], held["allocationId"], "{kept}");
    assert_eq!(kept["state"], "server_unreachable", "{kept}");
    let refused = c
        .allocate(7, &json!({"filter": "dcLocationName=ns1"}), &[])
        .await;
    let body = refused.assert_error(404, "NO_ALLOCATABLE_INSTANCE", None);
    assert!(
        details(body).contains("2 on unreachable hosts"),
        "details name the unreachable host's instances: {body}"
    );
    let mut taken = Vec::new();
    loop {
        let r = c.allocate(7, &json!({}), &[]).await;
        if r.status == 404 {
            let body = r.assert_error(404, "NO_ALLOCATABLE_INSTANCE", None);
            assert!(details(body).contains("on unreachable hosts"), "{body}");
            break;
        }
        let a = r.expect(200).json;
        assert!(lo_ids.contains(&id_of(&a)), "only the loopback host: {a}");
        taken.push(a);
        assert!(taken.len() <= 3, "{taken:?}");
    }
    assert_eq!(taken.len(), 3, "all three loopback instances, nothing else");
    let remaining = long.saturating_sub(cut.elapsed());
    tokio::time::sleep(remaining).await;
    // Still lost, still holding its match, at the end of the partition.
    let kept = c.instance(&held_id).await;
    assert_eq!(kept["status"], 5, "{kept}");
    assert_eq!(kept["allocationId"], held["allocationId"], "{kept}");
    assert_eq!(c.host_named("part-ns").await["reachable"], false);
    net.link(true);
    eprintln!("[faults] long partition of {:?}", cut.elapsed());

    // (c) Healed: it rejoins, reconciles without duplicates, its idle instances are offered
    // again.
    c.wait_host("part-ns", "reachable again", |h| h["reachable"] == true)
        .await;
    let healed = c
        .wait_instances(
            "?applicationId=7",
            "the namespaced host's idle instances back",
            |l| {
                l.len() == 6
                    && l.iter()
                        .filter(|i| on_ns.contains(&id_of(i)) && id_of(i) != held_id)
                        .all(is_allocatable)
            },
        )
        .await;
    assert_eq!(ids(&healed), ids(&before), "instance ids unchanged");
    for i in &healed {
        assert_eq!(pid_of(i), pids[&id_of(i)], "no game restarted: {i}");
        assert_eq!(count_instance_processes(&id_of(i)), 1, "{i}");
    }
    let kept = c.instance(&held_id).await;
    assert_eq!(kept["status"], 5, "{kept}");
    assert_eq!(kept["allocationId"], held["allocationId"], "{kept}");
    assert_eq!(kept["state"], "running", "{kept}");
    for h in c.hosts().await {
        assert_eq!(h["instances"], 3, "{h}");
    }
    assert_eq!(ns_agent.instances().await.len(), 3);
    let back = c.allocate_ok(7, "dcLocationName=ns1").await;
    assert!(
        on_ns.contains(&id_of(&back)) && id_of(&back) != held_id,
        "{back}"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Full disks: under the controller's database, under an agent's state

/// A small tmpfs in a mount namespace of its own, held open by a `sleep`: a disk the test can
/// fill without touching the machine's. Daemons run on it through [`SmallDisk::wrapper`]; the
/// test reaches its files through `/proc/<holder>/root`. The mount goes with the namespace's
/// last process, also when the test fails.
struct SmallDisk {
    holder: std::process::Child,
    path: std::path::PathBuf,
    _dir: berth_e2e::TestDir,
}

impl SmallDisk {
    /// `Err` when a mount namespace or a tmpfs cannot be made here (no permission).
    fn mount(name: &str, bytes: u64) -> Result<Self, String> {
        use std::io::BufRead;
        let dir = berth_e2e::TestDir::new(name);
        let path = dir.join("disk");
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o "size=$1" berth-test "$2" && echo mounted && exec sleep 600"#)
            .arg("sh")
            .arg(bytes.to_string())
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run unshare: {e}"))?;
        let mut line = String::new();
        let stdout = holder.stdout.take().expect("piped");
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        if line.trim() != "mounted" {
            let _ = holder.kill();
            let out = holder.wait_with_output().map_err(|e| e.to_string())?;
            return Err(format!(
                "unshare --mount with a tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self {
            holder,
            path,
            _dir: dir,
        })
    }

    /// Where the disk is, as processes in its namespace see it.
    fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn wrapper(&self) -> Vec<String> {
        let pid = self.holder.id().to_string();
        ["nsenter", "-t", &pid, "-m", "--"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    }

    /// `name` on the disk, as this process reaches it.
    fn file(&self, name: &str) -> std::path::PathBuf {
        let inside = self.path.join(name);
        let relative = inside.strip_prefix("/").expect("an absolute path");
        std::path::Path::new(&format!("/proc/{}/root", self.holder.id())).join(relative)
    }

    /// Writes a file until the disk refuses more; returns the bytes it took.
    fn fill(&self) -> u64 {
        use std::io::Write as _;
        let path = self.file("filler");
        let mut f =
            std::fs::File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let chunk = vec![0u8; 64 << 10];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        written
    }

    fn free(&self) {
        let path = self.file("filler");
        std::fs::remove_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A small disk of the test's own and a controller config with its database there (the
/// controller runs in the disk's mount namespace); `None`, with the reason printed, where such
/// a disk cannot be made.
fn controller_on_small_disk(name: &str) -> Option<(SmallDisk, ControllerConfig)> {
    let disk = SmallDisk::mount(name, 8 << 20)
        .map_err(|reason| skipped(&format!("no small disk of the test's own: {reason}")))
        .ok()?;
    let mut config = ControllerConfig::new();
    config.database = Some(disk.path().join("controller.db"));
    config.wrapper = disk.wrapper();
    Some((disk, config))
}

/// The disk under the controller's database fills up while matchmakers allocate, then gets
/// room again. Allocations it cannot write are refused with a 503 that says so (and their
/// games are released); releases and settings made meanwhile are kept and written once it has
/// room, with no restart; nothing is left allocated, no instance refuses matches afterwards,
/// and a restart finds what was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_disk_full_under_allocation_load() {
    const TASKS: usize = 4;
    let mut rng = Rng::seeded("controller_disk_full_under_allocation_load");
    // Declared first, so it is dropped last.
    let Some((disk, config)) = controller_on_small_disk("flt-disk-fs") else {
        return;
    };
    let mut c = ControllerProcess::spawn("flt-disk", config).await;
    c.sample_fleet(7, 456, 3, 0, &[]).await;
    let mut agents = Vec::new();
    for name in ["disk-a", "disk-b"] {
        agents.push(c.spawn_agent("flt-disk", name).await);
    }
    let pool = c.wait_online(7, 6).await;

    let stop = Arc::new(AtomicBool::new(false));
    let unwritable = Arc::new(AtomicU64::new(0));
    let checked = Arc::new(AtomicU64::new(0));
    let allocated = checks_in_game(&c, &checked);
    let mut load = Load::new(TASKS, u64::MAX, Duration::from_secs(90));
    load.stop = Some(stop.clone());
    load.unwritable = Some(unwritable.clone());
    let at_least = async |what: &str, counter: &AtomicU64, n: u64| {
        wait_for(&format!("{n} {what}"), TIMEOUT, async || {
            let seen = counter.load(Ordering::Relaxed);
            (seen >= n).then_some(seen)
        })
        .await
    };
    let readyz = async || {
        c.http()
            .try_send(Method::GET, &format!("{}/readyz", c.url()), None, &[], None)
            .await
    };
    let phases = async {
        at_least("matches checked before the disk fills", &checked, 30).await;
        let filled = disk.fill();
        at_least("allocations refused as unwritable", &unwritable, 20).await;
        let r = readyz().await.expect("readyz answers");
        assert!(
            r.status == 503
                && r.json["reason"]
                    .as_str()
                    .is_some_and(|s| s.contains("commits fail")),
            "{} {}",
            r.status,
            r.text
        );
        // A setting made meanwhile is in effect at once, and said to be written later.
        let app = json!({"id": 8, "name": "made-while-full", "managementProtocol": "arcus"});
        let r = c.admin(Method::POST, "/v1/applications", Some(&app)).await;
        r.assert_error(503, "SERVICE_UNAVAILABLE", None);
        assert!(details(&r.json).contains("in effect"), "{}", r.text);
        c.admin(Method::GET, "/v1/applications/8", None)
            .await
            .expect(200);
        let before = checked.load(Ordering::Relaxed);
        disk.free();
        at_least(
            "matches checked after the disk has room",
            &checked,
            before + 30,
        )
        .await;
        wait_for("/readyz to say ready", TIMEOUT, async || {
            readyz().await.ok().filter(|r| r.status == 200)
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        (filled, before)
    };
    let ((problems, refusals), (filled, before)) =
        tokio::join!(run_matchmakers(&c, load, &mut rng, allocated), phases);
    eprintln!(
        "[faults] controller_disk_full_under_allocation_load: the disk filled with {} KiB; \
         {before} matches checked before it had room again, {} after; {} allocations refused \
         as unwritable, {refusals} NO_ALLOCATABLE_INSTANCE refusals",
        filled >> 10,
        checked.load(Ordering::Relaxed) - before,
        unwritable.load(Ordering::Relaxed),
    );
    assert!(problems.is_empty(), "{problems:#?}");

    // Every instance is free again at the controller and in its game, and no game was sent a
    // second match while one ran.
    wait_for("every instance free again", TIMEOUT, async || {
        let list = c.instances("?applicationId=7").await;
        let free = list.iter().filter(|i| is_allocatable(i)).count();
        (free == 6).then_some(()).ok_or_else(|| brief(&list))
    })
    .await;
    for instance in &pool {
        berth_e2e::wait_game_info(berth_e2e::json::port_of(instance), "not allocated", |i| {
            i["allocated"] == false
        })
        .await;
    }
    assert_no_match_given_away(&pool).await;
    // No instance refuses a match (a release the database never took would leave its row, and
    // that row would refuse every later allocation of the instance), and a restart finds the
    // matches acknowledged and the setting made while the disk was full.
    let mut held = BTreeMap::new();
    for _ in 0..6 {
        let a = c.allocate_ok(7, "").await;
        held.insert(id_of(&a), alloc_of(&a));
    }
    assert_eq!(held.len(), 6, "{held:?}");
    c.kill9();
    c.start().await;
    c.admin(Method::GET, "/v1/applications/8", None)
        .await
        .expect(200);
    wait_for("the held matches after the restart", TIMEOUT, async || {
        let list = c.instances("?applicationId=7").await;
        let kept = list
            .iter()
            .filter(|i| i["status"] == 5 && held.get(&id_of(i)) == Some(&alloc_of(i)))
            .count();
        (kept == 6).then_some(()).ok_or_else(|| brief(&list))
    })
    .await;
}

/// A controller restarted while the disk under its database is full takes its agent back:
/// the registration is answered (the host's record is kept for when the disk has room), the
/// match it holds is confirmed by the agent's full report, and an allocation is refused because
/// it cannot be written (a 503 that says so), not for want of a host. Once the disk has room,
/// matches are made at once and survive another restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restarted_on_a_full_disk_takes_its_agents_back() {
    let Some((disk, config)) = controller_on_small_disk("flt-fullstart-fs") else {
        return;
    };
    let mut c = ControllerProcess::spawn("flt-fullstart", config).await;
    c.sample_fleet(7, 456, 2, 0, &[]).await;
    let agent = c.spawn_agent("flt-fullstart", "fullstart-bm").await;
    c.wait_online(7, 2).await;
    let held = c.allocate_ok(7, "").await;

    disk.fill();
    c.kill9();
    // Not ready, as soon as the agent's registration fails to commit: serving is enough.
    c.start_serving().await;
    let refused = wait_for("an allocation refused as unwritable", TIMEOUT, async || {
        let r = c.allocate(7, &json!({}), &[]).await;
        if refused_as_unwritable(&r) {
            Ok(r)
        } else {
            Err(format!("{} {}", r.status, r.text))
        }
    })
    .await;
    assert!(
        details(&refused.json).contains("controller.db"),
        "{}",
        refused.text
    );
    let kept = c.instance(&id_of(&held)).await;
    assert_eq!(kept["status"], 5, "{kept}");
    assert_eq!(kept["allocationId"], held["allocationId"], "{kept}");
    // Its answer may still be on its way to the agent when the allocation is refused.
    wait_for("the agent registered again", TIMEOUT, async || {
        let n = agent
            .log()
            .matches("registered with the controller")
            .count();
        (n >= 2).then_some(()).ok_or(n)
    })
    .await;

    disk.free();
    let made = c.allocate_when_offered(7, &json!({}), &[]).await;
    c.kill9();
    c.start().await;
    for a in [&held, &made] {
        c.wait_instance(&id_of(a), "still held after the restart", |i| {
            i["status"] == 5 && i["allocationId"] == a["allocationId"]
        })
        .await;
    }
}

/// The disk under an agent's state directory fills up. The agent cannot record an allocation
/// before it answers, so it refuses it (76002, saying why) before its game hears of it, and
/// the controller skips the host for a while and places matches elsewhere. The match the host
/// already runs goes on. A game that crashes meanwhile is started again under a pid the state
/// file cannot take, and a new instance is refused (76002) with no game started; the agent,
/// killed and restarted on the full disk, finds the match in the same process and the
/// restarted game by its instance id, with no duplicate. Once the disk has room, the host
/// takes matches again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_disk_full_refuses_allocations_and_keeps_matches() {
    // Declared first, so it is dropped last.
    let Some(disk) = SmallDisk::mount("flt-agent-disk-fs", 1 << 20)
        .map_err(|reason| skipped(&format!("no small disk of the test's own: {reason}")))
        .ok()
    else {
        return;
    };
    let c = ControllerProcess::start_new("flt-agent-disk").await;
    c.sample_fleet(7, 456, 2, 0, &[]).await;
    let logs = berth_e2e::TestDir::new("flt-agent-disk-logs");
    let mut config = AgentConfig::joined("disk-full", &c);
    config.dc_location = "full1".to_owned();
    config.state_dir = Some(disk.path().to_owned());
    config.wrapper = disk.wrapper();
    // Only the agent's state is on the small disk; the games' logs are not.
    let log_dir = serde_json::to_string(&logs.path().to_string_lossy()).expect("a string");
    config.extra.push(format!("log_dir = {log_dir}"));
    let mut full = AgentProcess::spawn("flt-agent-disk-full", config).await;
    let _other = c.spawn_agent("flt-agent-disk", "disk-ok").await;
    let pool = c.wait_online(7, 4).await;
    let full_host = c.host_named("disk-full").await["id"].clone();
    let on_full: Vec<&Value> = pool.iter().filter(|i| i["hostId"] == full_host).collect();
    assert_eq!(on_full.len(), 2, "{}", brief(&pool));

    // The disk fills while its games run: their records (pids) are on it already. (A game
    // started after the last snapshot the disk took is not re-adopted by a restart.)
    let state_file = disk.file("agent-state.json");
    wait_for(
        "the full host's games recorded on its disk",
        TIMEOUT,
        async || {
            let text = std::fs::read_to_string(&state_file).map_err(|e| e.to_string())?;
            let state: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            let with_pid = state["instances"]
                .as_array()
                .map_or(0, |l| l.iter().filter(|i| i["pid"].is_u64()).count());
            (with_pid == 2).then_some(()).ok_or(text)
        },
    )
    .await;
    let held = c.allocate_ok(7, "dcLocationName=full1").await;
    let held_id = id_of(&held);
    let held_pid = pid_of(&c.instance(&held_id).await);
    let filled = disk.fill();

    // A line still fits while the journal's last block has room: those allocations are
    // recorded, and released again. Then one is refused, before its game heard of it, saying
    // why and what to do.
    let recorded = AtomicU64::new(0);
    let r = wait_for(
        "an allocation refused on the full host",
        TIMEOUT,
        async || {
            let r = c
                .allocate(7, &json!({"filter": "dcLocationName=full1"}), &[])
                .await;
            match r.status {
                200 => {
                    recorded.fetch_add(1, Ordering::Relaxed);
                    release_ok(&c, &r.json).await;
                    Err("recorded: the journal's last block had room".to_owned())
                }
                404 => Err(r.text),
                _ => Ok(r),
            }
        },
    )
    .await;
    let body = r.assert_error(422, "AGENT_SERVER_ERROR", Some(76002));
    let said = body.to_string();
    assert!(
        said.contains("cannot record it on disk") && said.contains("state_dir"),
        "{said}"
    );
    let metrics = full.get("/metrics").await.expect(200).text;
    let journal = berth_e2e::metric(
        &metrics,
        "berth_agent_state_write_failures_total",
        "file=\"journal\"",
    );
    assert!(journal.is_some_and(|n| n >= 1.0), "{metrics}");
    let mut received = 0;
    for i in &on_full {
        received +=
            game_info(berth_e2e::json::port_of(i)).await.expect("INFO")["allocationsReceived"]
                .as_u64()
                .expect("a count");
    }
    let recorded = recorded.load(Ordering::Relaxed);
    assert_eq!(
        received,
        1 + recorded,
        "only the held match and the {recorded} recorded ones reached a game on the full host"
    );
    // Matches go to the other host meanwhile: the full one is skipped, not tried again.
    let mut elsewhere = Vec::new();
    for _ in 0..2 {
        let a = c
            .allocate(7, &json!({"filter": ""}), &[])
            .await
            .expect(200)
            .json;
        assert_ne!(a["hostId"], full_host, "{a}");
        elsewhere.push(a);
    }
    let r = c.allocate(7, &json!({"filter": ""}), &[]).await;
    let body = r.assert_error(404, "NO_ALLOCATABLE_INSTANCE", None);
    assert!(
        body.to_string()
            .contains("could not record an allocation on its disk"),
        "{body}"
    );
    for a in &elsewhere {
        release_ok(&c, a).await;
    }
    // The match in progress goes on.
    let now = c.instance(&held_id).await;
    assert!(
        now["status"] == 5 && now["allocationId"] == held["allocationId"],
        "{now}"
    );

    // While the disk stays full: the idle game crashes and is started again (a pid the state
    // file cannot take). Then the agent is killed and restarted, the disk still full.
    let idle = on_full
        .iter()
        .map(|i| id_of(i))
        .find(|id| *id != held_id)
        .expect("the idle instance");
    let crashed = pid_of(&c.instance(&idle).await);
    berth_e2e::signal(crashed, nix::sys::signal::Signal::SIGKILL).expect("kill the game");
    let restarted = wait_for("the crashed game started again", TIMEOUT, async || {
        let i = c.instance(&idle).await;
        let pid = i["pid"].as_u64().and_then(|p| u32::try_from(p).ok());
        pid.filter(|&p| p != crashed && i["status"] == 4)
            .ok_or_else(|| i.to_string())
    })
    .await;
    // A new instance is not deployed on that host: its record cannot be written, so its game
    // is not started. (While the journal's last block has room, one is: removed again.)
    let (third, r) = wait_for("a deploy refused on the full host", TIMEOUT, async || {
        let id = uuid::Uuid::new_v4().to_string();
        let body = berth_e2e::deploy_body(&id, sample_game_profile("sample-extra", 7, 0, 0));
        let r = full.post("/v1/instances", &body).await;
        if r.status == 201 {
            full.delete(&format!("/v1/instances/{id}?force=true")).await;
            return Err("recorded: the journal's last block had room".to_owned());
        }
        Ok((id, r))
    })
    .await;
    let said = r
        .assert_error(422, "AGENT_SERVER_ERROR", Some(76002))
        .to_string();
    assert!(
        said.contains("not deployed") && said.contains("state_dir"),
        "{said}"
    );
    full.kill9();
    full.start().await;
    wait_for(
        "both games re-adopted by the restarted agent",
        TIMEOUT,
        async || {
            let h = c.instance(&held_id).await;
            let i = c.instance(&idle).await;
            let ok = h["status"] == 5
                && h["allocationId"] == held["allocationId"]
                && pid_of(&h) == held_pid
                && i["status"] == 4
                && pid_of(&i) == restarted;
            ok.then_some(()).ok_or_else(|| format!("{h}\n{i}"))
        },
    )
    .await;
    assert_eq!(
        count_instance_processes(&idle),
        1,
        "the crashed game's restart, once"
    );
    assert_eq!(
        count_instance_processes(&third),
        0,
        "no game runs for an instance whose record the disk did not take"
    );

    // Room again: the host takes matches again.
    disk.free();
    let again = c
        .allocate_when_offered(7, &json!({"filter": "dcLocationName=full1"}), &[])
        .await;
    assert_ne!(id_of(&again), held_id, "{again}");
    assert_no_match_given_away(&c.instances("?applicationId=7").await).await;
    eprintln!(
        "[faults] agent_disk_full_refuses_allocations_and_keeps_matches: the disk filled with {} \
         KiB; {recorded} allocations still recorded in the journal's last block, then refused",
        filled >> 10
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Bad input

/// A daemon under attack: where to send what.
struct Target {
    name: &'static str,
    url: String,
    token: String,
    /// A POST route with a 1 MiB body limit.
    post_path: String,
    /// A body with a wrong type, and the field its error must name.
    wrong_type: (Value, &'static str),
    /// An authenticated GET that must keep working.
    get_path: &'static str,
    pid: u32,
}

/// Opens a connection, sends the start of a request a byte at a time, then stalls. Returns
/// how long after connecting the server closed the connection.
async fn stalled_client(addr: String, seed: u64) -> Result<Duration, String> {
    let opened = Instant::now();
    let mut s = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let partial = b"GET /healthz HTTP/1.1\r\nHost: berth\r\nX-Slow: yes";
    let n = 5 + (seed % (partial.len() as u64 - 5)) as usize;
    for b in &partial[..n] {
        if s.write_all(&[*b]).await.is_err() {
            return Ok(opened.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Stalled: wait for the server to give up on us.
    let mut buf = [0u8; 512];
    let read = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    match read {
        Ok(()) => Ok(opened.elapsed()),
        Err(_) => Err(format!(
            "{addr}: a stalled request was still open after {:?}",
            opened.elapsed()
        )),
    }
}

async fn malformed_bodies(http: &Http, t: &Target) {
    let url = format!("{}{}", t.url, t.post_path);
    let raw = |body: Vec<u8>| {
        let (http, url, token) = (http.clone(), url.clone(), t.token.clone());
        async move {
            http.try_send_bytes(
                Method::POST,
                &url,
                Some(&token),
                &[],
                Some(Bytes::from(body)),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"))
        }
    };
    // Over 1 MiB.
    let big = format!("{{\"filter\": \"{}\"}}", "a".repeat((1 << 20) + 16));
    raw(big.into_bytes())
        .await
        .assert_error(413, "PAYLOAD_TOO_LARGE", None);
    // Malformed JSON.
    for body in [&b"{\"filter\": "[..], b"{,}", b"not json", b"{\"a\":1}}"] {
        let r = raw(body.to_vec()).await;
        let b = r.assert_error(400, "INVALID_REQUEST", None);
        assert!(details(b).contains("JSON"), "{}: {b}", t.name);
    }
    // A wrong type names the field.
    let r = raw(serde_json::to_vec(&t.wrong_type.0).expect("json")).await;
    let b = r.assert_error(400, "INVALID_REQUEST", None);
    assert!(
        details(b).contains(t.wrong_type.1),
        "{}: the error names {}: {b}",
        t.name,
        t.wrong_type.1
    );
    // Deeply nested.
    for body in [
        "[".repeat(100_000),
        format!("{{\"metadata\": {}", "[".repeat(100_000)),
        format!(
            "{{\"filter\": \"x\", \"gameMetadata\": {}",
            "{\"a\":".repeat(50_000)
        ),
    ] {
        raw(body.into_bytes())
            .await
            .assert_error(400, "INVALID_REQUEST", None);
    }
    // Invalid UTF-8, inside a string and outside one.
    for body in [
        &b"{\"filter\": \"\xff\xfe\"}"[..],
        b"\xc3\x28",
        b"{\"\xf0\x28\x8c\x28\": 1}",
    ] {
        raw(body.to_vec())
            .await
            .assert_error(400, "INVALID_REQUEST", None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_the_daemon_keeps_serving() {
    const STALLED: usize = 50;
    let mut rng = Rng::seeded("bad_input_is_refused_and_the_daemon_keeps_serving");
    let c = ControllerProcess::start_new("flt-badinput").await;
    c.create_application(1, "bad-input").await;
    let agent = AgentProcess::start_new("flt-badinput-agent").await;
    let targets = [
        Target {
            name: "controller",
            url: c.url(),
            token: c.matchmaker_token().to_owned(),
            post_path: "/v1/applications/1/allocate".to_owned(),
            wrong_type: (
                json!({"metadata": [{"key": "map", "value": 5}]}),
                "metadata[0].value",
            ),
            get_path: "/v1/instances",
            pid: c.pid().expect("controller runs"),
        },
        Target {
            name: "agent",
            url: agent.url(),
            token: agent.token().to_owned(),
            post_path: "/v1/instances".to_owned(),
            wrong_type: (
                json!({"id": "x", "managementProtocol": "arcus", "profile": {"id": "p", "applicationId": "seven"}}),
                "profile.applicationId",
            ),
            get_path: "/v1/instances",
            pid: agent.pid().expect("agent runs"),
        },
    ];
    let http = Http::new();

    // Stalled clients on both daemons, running all along.
    let mut stalled = Vec::new();
    for t in &targets {
        let addr = t.url.trim_start_matches("http://").to_owned();
        for _ in 0..STALLED {
            stalled.push(tokio::spawn(stalled_client(addr.clone(), rng.next())));
        }
    }
    // Let them connect and start dribbling before the rest.
    let slow_started = Instant::now();

    // Meanwhile: malformed bodies, and normal requests with normal latency.
    for t in &targets {
        malformed_bodies(&http, t).await;
    }
    let malformed_took = slow_started.elapsed();
    let mut worst = Duration::ZERO;
    let mut normal = 0;
    while slow_started.elapsed() < Duration::from_secs(8) {
        for t in &targets {
            for (path, token) in [("/healthz", None), (t.get_path, Some(t.token.as_str()))] {
                let sent = Instant::now();
                let r = http
                    .send(Method::GET, &format!("{}{path}", t.url), token, &[], None)
                    .await;
                let took = sent.elapsed();
                assert_eq!(
                    r.status, 200,
                    "{} {path} while under attack: {}",
                    t.name, r.text
                );
                worst = worst.max(took);
                normal += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // At least five rounds over both daemons: a measurement, not an accident of timing.
    let min_normal = 5 * 2 * targets.len();
    assert!(
        normal >= min_normal,
        "only {normal} normal requests were measured under attack (at least {min_normal} \
         needed): the malformed bodies took {malformed_took:?} of the 8 s window"
    );
    assert!(
        worst < Duration::from_secs(1),
        "normal requests kept their latency under attack; the slowest took {worst:?}"
    );

    let mut closed_after = Vec::new();
    for s in stalled {
        closed_after.push(
            s.await
                .expect("stalled client")
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    let latest = closed_after.iter().max().copied().unwrap_or_default();
    eprintln!(
        "[faults] bad input: {normal} normal requests, slowest {worst:?}; {} stalled \
         connections closed after {:?}..{latest:?}",
        closed_after.len(),
        closed_after.iter().min().copied().unwrap_or_default()
    );
    assert!(latest <= Duration::from_secs(15), "{latest:?}");

    for t in &targets {
        http.send(Method::GET, &format!("{}/healthz", t.url), None, &[], None)
            .await
            .expect(200);
        assert!(pid_alive(t.pid), "{} is still running", t.name);
    }
    for (name, log) in [("controller", c.log()), ("agent", agent.log())] {
        assert!(!log.contains("panicked"), "{name} panicked:\n{log}");
    }
}
