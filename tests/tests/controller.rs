//! End-to-end tests of `berth-controller`: the real controller with its SQLite database, real
//! `berth-agent`s registered with it, and real `berth-sample-game` processes, all on loopback.
//! Matchmakers and operators are played through the controller's HTTP API; what the games
//! learned is read through their `INFO` answers; faults are injected with signals (SIGKILL,
//! SIGSTOP) and, on the controller → agent path, with a [`FaultProxy`].
//!
//! Every test has its own controller, agents, directories and ports, so tests run in parallel.
//! Controllers run with short timings (200 ms heartbeats, 1 s expiry, 200 ms reconcile) so that
//! expiry and repair are seen quickly. Nothing sleeps for a fixed time to synchronise: every wait
//! polls for the state it needs, with a failure timeout.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_e2e::json::{details, id_of, ids, kv, pid_of, port_of};
use berth_e2e::{
    AgentConfig, AgentProcess, ControllerConfig, ControllerProcess, ControllerToken, FaultProxy,
    Response, TIMEOUT, assert_metrics, assert_second_daemon_refused, count_instance_processes,
    fleet_body, free_port, game_info, is_allocatable, metric, short_id, signal, wait_for,
    wait_game_info,
};
use bytes::Bytes;
use http::Method;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

fn host_of(instance: &Value) -> u64 {
    instance["hostId"]
        .as_u64()
        .unwrap_or_else(|| panic!("instance has no hostId: {instance}"))
}

/// The instances on host `host_id`, from a controller listing.
fn on_host(list: &[Value], host_id: u64) -> Vec<Value> {
    list.iter()
        .filter(|i| host_of(i) == host_id)
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Placement order

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_metal_before_vm_across_three_hosts() {
    let c = ControllerProcess::start_new("ctl-tiers").await;
    c.sample_fleet(7, 456, 2, 0, &[]).await;
    let _bm_a = c.spawn_agent("ctl-tiers", "bm-a").await;
    let _bm_b = c.spawn_agent("ctl-tiers", "bm-b").await;
    let mut vm_config = AgentConfig::joined("vm-c", &c);
    vm_config.is_virtual = true;
    let _vm = AgentProcess::spawn("ctl-tiers-vm-c", vm_config).await;

    let online = c.wait_online(7, 6).await;
    assert_eq!(ids(&online).len(), 6);
    let hosts = c.hosts().await;
    assert_eq!(hosts.len(), 3, "{hosts:?}");
    for h in &hosts {
        let vm = h["name"] == "vm-c";
        assert_eq!(h["isVirtual"], u8::from(vm), "{h}");
        assert_eq!(h["reachable"], true, "{h}");
        assert_eq!(h["state"], "ready", "{h}");
        assert_eq!(h["regionName"], "eu-west-1", "{h}");
        assert_eq!(h["instances"], 2, "instancesPerHost=2 on every host: {h}");
    }
    let vm_host = c.host_named("vm-c").await["id"].as_u64().expect("host id");
    for i in &online {
        assert_eq!(i["isVirtual"], u8::from(host_of(i) == vm_host), "{i}");
    }

    // isVirtual=1 asks for a VM: chosen although all four bare-metal instances are idle.
    let asked_vm = c.allocate_ok(7, "isVirtual=1").await;
    assert_eq!(asked_vm["isVirtual"], 1, "{asked_vm}");
    assert_eq!(host_of(&asked_vm), vm_host, "{asked_vm}");
    assert_eq!(asked_vm["status"], 5, "{asked_vm}");

    // Without a filter: the four bare-metal instances first (even though the VM host now runs
    // an allocation), packed: the second goes where the first went while that host has room.
    let mut bare = Vec::new();
    for n in 0..4 {
        let a = c.allocate_ok(7, "").await;
        assert_eq!(a["isVirtual"], 0, "allocation {n} must be bare metal: {a}");
        assert_ne!(host_of(&a), vm_host, "{a}");
        bare.push(a);
    }
    assert_eq!(host_of(&bare[0]), host_of(&bare[1]), "packing: {bare:?}");
    assert_eq!(host_of(&bare[2]), host_of(&bare[3]), "packing: {bare:?}");
    assert_ne!(
        host_of(&bare[0]),
        host_of(&bare[2]),
        "the second host once the first is full: {bare:?}"
    );

    // Only now the VM's other instance.
    let vm_last = c.allocate_ok(7, "").await;
    assert_eq!(vm_last["isVirtual"], 1, "{vm_last}");
    assert_eq!(host_of(&vm_last), vm_host);
    assert_ne!(id_of(&vm_last), id_of(&asked_vm));

    let mut all: Vec<Value> = bare.clone();
    all.push(asked_vm);
    all.push(vm_last);
    assert_eq!(ids(&all), ids(&online), "every instance allocated once");

    let none = c.allocate(7, &json!({}), &[]).await;
    let body = none.assert_error(404, "NO_ALLOCATABLE_INSTANCE", None);
    assert!(details(body).contains("6 allocated"), "{body}");

    for h in c.hosts().await {
        assert_eq!(h["instancesByStatus"]["allocated"], 2, "{h}");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Filters, on the native and both i3D routes

/// The same allocation filter on the native route and on the i3D route with PATCH and POST.
async fn on_every_route(c: &ControllerProcess, application_id: u32, filter: &str) -> Vec<Response> {
    vec![
        c.allocate(application_id, &json!({"filter": filter}), &[])
            .await,
        c.allocate_i3d(Method::PATCH, application_id, filter, None)
            .await,
        c.allocate_i3d(Method::POST, application_id, filter, Some(&json!({})))
            .await,
    ]
}

/// Every field of DESIGN.md §4.1's i3D instance, with its type.
fn check_i3d_instance(v: &Value, application_id: u32, fleet_id: u64) {
    const FIELDS: [&str; 31] = [
        "id",
        "applicationId",
        "applicationBuildId",
        "deploymentEnvironmentId",
        "fleetId",
        "hostId",
        "regionId",
        "dcLocationId",
        "isVirtual",
        "ipAddress",
        "port",
        "managementPort",
        "status",
        "numPlayers",
        "numPlayersMax",
        "liveHostName",
        "liveMap",
        "liveRules",
        "liveGameVersion",
        "metadata",
        "labelReadOnly",
        "labelPublic",
        "pid",
        "pidChangedAt",
        "startedAt",
        "stoppedAt",
        "createdAt",
        "updatedAt",
        "autoRestart",
        "manuallyDeployed",
        "markedForDeletion",
    ];
    for f in FIELDS {
        assert!(v.get(f).is_some(), "i3D field {f} is missing: {v}");
    }
    assert!(v["id"].is_string(), "{v}");
    assert_eq!(v["applicationId"], application_id, "{v}");
    assert_eq!(v["fleetId"], fleet_id, "{v}");
    assert_eq!(v["status"], 5, "{v}");
    assert_eq!(v["deploymentEnvironmentId"], 1, "production: {v}");
    assert_eq!(v["regionId"], 1, "eu-west-1: {v}");
    assert!(v["dcLocationId"].as_u64().is_some_and(|d| d > 0), "{v}");
    assert!(v["hostId"].as_u64().is_some_and(|h| h > 0), "{v}");
    assert!(matches!(v["isVirtual"].as_u64(), Some(0 | 1)), "{v}");
    let ips = v["ipAddress"].as_array().expect("ipAddress is a list");
    assert!(!ips.is_empty(), "{v}");
    for ip in ips {
        assert!(
            ip["ipAddress"]
                .as_str()
                .is_some_and(|s| s.parse::<std::net::IpAddr>().is_ok()),
            "{ip}"
        );
        assert!(matches!(ip["ipVersion"].as_u64(), Some(4 | 6)), "{ip}");
        assert_eq!(ip["private"], 0, "{ip}");
    }
    for port in ["port", "managementPort", "pid"] {
        assert!(v[port].as_u64().is_some_and(|p| p > 0), "{port}: {v}");
    }
    for ts in [
        "pidChangedAt",
        "startedAt",
        "stoppedAt",
        "createdAt",
        "updatedAt",
    ] {
        assert!(v[ts].is_u64(), "{ts} must be unix seconds: {v}");
    }
    for t in ["createdAt", "updatedAt", "startedAt"] {
        assert!(v[t].as_u64().is_some_and(|s| s > 1_600_000_000), "{t}: {v}");
    }
    for n in [
        "numPlayers",
        "numPlayersMax",
        "autoRestart",
        "manuallyDeployed",
        "markedForDeletion",
    ] {
        assert!(v[n].is_i64() || v[n].is_u64(), "{n} is a number: {v}");
    }
    assert_eq!(v["manuallyDeployed"], 0, "deployed by its fleet: {v}");
    for s in [
        "applicationBuildId",
        "liveHostName",
        "liveMap",
        "liveRules",
        "liveGameVersion",
    ] {
        assert!(v[s].is_string(), "{s} is a string: {v}");
    }
    for l in ["metadata", "labelReadOnly", "labelPublic"] {
        assert!(v[l].is_array(), "{l} is a list: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_filter_error() {
    let c = ControllerProcess::start_new("ctl-filters").await;
    c.sample_fleet(7, 456, 3, 0, &[]).await;
    let _agent = c.spawn_agent("ctl-filters", "filters-bm").await;
    c.wait_online(7, 3).await;

    let cases: &[(&str, u16, &str, &[&str])] = &[
        (
            "regionId=1 or fleetId=2",
            400,
            "INVALID_FILTER_SYNTAX",
            &["and"],
        ),
        ("regionId", 400, "INVALID_FILTER_SYNTAX", &["regionId"]),
        (
            "region=1",
            400,
            "INVALID_FILTER_COLUMN",
            &["region", "regionName", "isVirtual"],
        ),
        ("status=4", 400, "UNSUPPORTED_FILTER_COLUMN", &["status"]),
        (
            "numPlayers=2",
            400,
            "UNSUPPORTED_FILTER_COLUMN",
            &["numPlayers"],
        ),
        (
            "regionName=mars-1",
            404,
            "FILTER_VALUE_NOT_FOUND",
            &["regionName=mars-1"],
        ),
        (
            "fleetId=999",
            404,
            "FILTER_VALUE_NOT_FOUND",
            &["fleetId=999"],
        ),
        (
            "dcLocationName=nowhere",
            404,
            "FILTER_VALUE_NOT_FOUND",
            &["dcLocationName=nowhere"],
        ),
        (
            "deploymentEnvironmentName=qa",
            404,
            "FILTER_VALUE_NOT_FOUND",
            &["deploymentEnvironmentName=qa"],
        ),
        (
            "isVirtual=1",
            404,
            "NO_ALLOCATABLE_INSTANCE",
            &["isVirtual=1 removed 3"],
        ),
    ];
    for (filter, status, code, needles) in cases {
        for r in on_every_route(&c, 7, filter).await {
            let body = r.assert_error(*status, code, None);
            for n in *needles {
                assert!(
                    details(body).contains(n),
                    "{filter:?} on {} {}: details should name {n:?}: {body}",
                    r.method,
                    r.path
                );
            }
        }
    }
    for r in on_every_route(&c, 99, "").await {
        let body = r.assert_error(404, "APPLICATION_NOT_FOUND", None);
        assert!(details(body).contains("99"), "{body}");
    }
    assert!(
        c.instances("?applicationId=7")
            .await
            .iter()
            .all(is_allocatable),
        "no refusal touched an instance"
    );

    // A quoted value and `AND` in any case are fine; one allocation per route.
    let good = r#"regionName="eu-west-1" AND isVirtual=0 and fleetId='456'"#;
    let native = c.allocate_ok(7, good).await;
    assert_eq!(native["status"], 5, "{native}");
    let mut allocated = vec![id_of(&native)];
    for method in [Method::PATCH, Method::POST] {
        let r = c
            .allocate_i3d(
                method.clone(),
                7,
                good,
                Some(&json!({"metadata": kv(&[("route", "i3d")])})),
            )
            .await
            .expect(200);
        let list = r.json.as_array().expect("the i3D answer is a JSON array");
        assert_eq!(list.len(), 1, "{method}: {}", r.text);
        check_i3d_instance(&list[0], 7, 456);
        assert_eq!(list[0]["metadata"], kv(&[("route", "i3d")]));
        allocated.push(id_of(&list[0]));
    }
    assert_eq!(
        allocated.iter().collect::<HashSet<_>>().len(),
        3,
        "{allocated:?}"
    );

    for r in on_every_route(&c, 7, "").await {
        let body = r.assert_error(404, "NO_ALLOCATABLE_INSTANCE", None);
        assert!(details(body).contains("3 allocated"), "{body}");
    }
    for r in on_every_route(&c, 7, "fleetId=456").await {
        let body = r.assert_error(404, "NO_ALLOCATABLE_INSTANCE", None);
        assert!(
            details(body).contains("fleetId=456 matches 3 instances: 3 allocated"),
            "{body}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Metadata

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_reaches_the_allocated_game() {
    let c = ControllerProcess::start_new("ctl-metadata").await;
    c.sample_fleet(7, 456, 1, 0, &[]).await;
    let a = c.spawn_agent("ctl-metadata", "meta-bm").await;
    let online = c.wait_online(7, 1).await;
    let id = id_of(&online[0]);

    let metadata = kv(&[("map", "dust"), ("mode", "ranked")]);
    let answer = c
        .allocate(7, &json!({"metadata": metadata}), &[])
        .await
        .expect(200)
        .json;
    assert_eq!(id_of(&answer), id);
    assert_eq!(answer["metadata"], metadata, "{answer}");
    assert!(answer["allocationId"].is_string(), "{answer}");

    let info = wait_game_info(port_of(&answer), "allocated", |i| i["allocated"] == true).await;
    assert_eq!(info["instanceId"], json!(id), "the right game answered");
    assert_eq!(
        info["allocation"], metadata,
        "exactly that allocation: {info}"
    );
    assert_eq!(
        info["hostInformation"]["serverName"],
        json!(a.config().host_name),
        "{info}"
    );
    assert_eq!(info["instanceInformation"]["fleetId"], "456", "{info}");

    let at_controller = c.instance(&id).await;
    assert_eq!(at_controller["status"], 5, "{at_controller}");
    assert_eq!(at_controller["metadata"], metadata, "{at_controller}");
    assert_eq!(at_controller["allocationId"], answer["allocationId"]);
    let listed = c.instances("?status=5").await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["metadata"], metadata);
}

// ---------------------------------------------------------------------------------------------
// 4. Concurrency

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_matchmakers_six_instances() {
    const MATCHMAKERS: usize = 40;
    let c = ControllerProcess::start_new("ctl-forty").await;
    c.sample_fleet(7, 456, 3, 0, &[]).await;
    let a = c.spawn_agent("ctl-forty", "forty-a").await;
    let b = c.spawn_agent("ctl-forty", "forty-b").await;
    let online = c.wait_online(7, 6).await;

    let barrier = Arc::new(tokio::sync::Barrier::new(MATCHMAKERS));
    let url = format!("{}/v1/applications/7/allocate", c.url());
    let mut tasks = Vec::new();
    for n in 0..MATCHMAKERS {
        let (http, url, token, barrier) = (
            c.http().clone(),
            url.clone(),
            c.matchmaker_token().to_owned(),
            barrier.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let body = json!({"metadata": kv(&[("matchmaker", &n.to_string())])});
            barrier.wait().await;
            (
                n,
                http.send(Method::POST, &url, Some(&token), &[], Some(&body))
                    .await,
            )
        }));
    }
    let mut won = BTreeMap::new();
    let mut refused = 0;
    for t in tasks {
        let (n, r) = t.await.expect("matchmaker task");
        assert!(r.status < 500, "no 5xx: {} {}", r.status, r.text);
        match r.status {
            200 => {
                assert_eq!(r.json["status"], 5, "{}", r.text);
                assert_eq!(
                    r.json["metadata"],
                    kv(&[("matchmaker", &n.to_string())]),
                    "each winner gets its own match: {}",
                    r.text
                );
                let prev = won.insert(id_of(&r.json), (n, r.json.clone()));
                assert!(
                    prev.is_none(),
                    "instance {} handed to two matchmakers",
                    r.json["id"]
                );
            }
            _ => {
                r.assert_error(404, "NO_ALLOCATABLE_INSTANCE", None);
                refused += 1;
            }
        }
    }
    assert_eq!(won.len(), 6, "exactly 6 distinct instances were handed out");
    assert_eq!(refused, MATCHMAKERS - 6);
    assert_eq!(won.keys().cloned().collect::<BTreeSet<_>>(), ids(&online));

    let listed = c.instances("?applicationId=7").await;
    assert_eq!(listed.len(), 6);
    for i in &listed {
        assert_eq!(i["status"], 5, "{i}");
        let (n, answer) = &won[&id_of(i)];
        assert_eq!(
            i["allocationId"], answer["allocationId"],
            "matchmaker {n}: {i}"
        );
        assert_eq!(i["metadata"], answer["metadata"], "matchmaker {n}: {i}");
    }
    // The agents agree: every instance is allocated once, with the controller's allocation.
    for agent in [&a, &b] {
        for i in agent.instances().await {
            assert_eq!(i["status"], 5, "{i}");
            let (_, answer) = &won[&id_of(&i)];
            assert_eq!(i["allocationId"], answer["allocationId"], "{i}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Idempotency

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_replay() {
    let mut c = ControllerProcess::start_new("ctl-idempotent").await;
    c.sample_fleet(7, 456, 2, 0, &[]).await;
    let agent = c.spawn_agent("ctl-idempotent", "idem-bm").await;
    c.wait_online(7, 2).await;

    let key = format!("match-{}", short_id());
    let headers = [("Idempotency-Key", key.as_str())];
    let body = json!({"filter": "regionName=eu-west-1", "metadata": kv(&[("map", "dust")])});
    let first = c.allocate(7, &body, &headers).await.expect(200);
    // A keyed allocation keeps its answer on disk, in both shapes, for replays.
    let allocation_id = first.json["allocationId"].as_str().expect("allocationId");
    let stored = c.stored_allocation_body(allocation_id).await;
    assert_eq!(stored["response"], first.json, "{stored}");
    assert_eq!(stored["responseI3d"]["id"], first.json["id"], "{stored}");
    let again = c.allocate(7, &body, &headers).await.expect(200);
    assert_eq!(
        again.json, first.json,
        "a replay answers the identical body"
    );
    assert_eq!(again.json["id"], first.json["id"]);
    assert_eq!(again.json["allocationId"], first.json["allocationId"]);
    assert_eq!(
        c.instances("?status=5").await.len(),
        1,
        "the replay allocated nothing new"
    );

    let other = json!({"filter": "regionName=eu-west-1", "metadata": kv(&[("map", "mirage")])});
    let reused = c.allocate(7, &other, &headers).await;
    let err = reused.assert_error(409, "IDEMPOTENCY_KEY_REUSED", None);
    assert!(details(err).contains(&key), "{err}");

    // A restarted controller answers a replay once the agent's report has confirmed the
    // allocation (rows are written while the agent is asked); until then it says to retry.
    let agent_pid = agent.pid().expect("the agent runs");
    signal(agent_pid, Signal::SIGSTOP).expect("SIGSTOP the agent");
    c.kill9();
    c.start().await;
    let early = c.allocate(7, &body, &headers).await;
    let err = early.assert_error(503, "SERVICE_UNAVAILABLE", None);
    assert!(details(err).contains("retry in a moment"), "{err}");
    assert!(details(err).contains(&key), "{err}");
    assert_eq!(early.header("retry-after"), Some("1"));
    signal(agent_pid, Signal::SIGCONT).expect("SIGCONT the agent");
    let after = allocate_once_confirmed(&c, &body, &headers).await;
    assert_eq!(
        after.json, first.json,
        "the replay after a controller crash answers the same allocation"
    );
    c.allocate(7, &other, &headers)
        .await
        .assert_error(409, "IDEMPOTENCY_KEY_REUSED", None);

    // A new key is a new match: the other instance, once the agent has re-registered.
    let fresh_key = format!("match-{}", short_id());
    let fresh = c
        .allocate_when_offered(7, &body, &[("Idempotency-Key", fresh_key.as_str())])
        .await;
    assert_ne!(fresh["id"], first.json["id"]);
    assert_eq!(c.instances("?status=5").await.len(), 2);
}

// ---------------------------------------------------------------------------------------------
// 6. Release

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_and_reallocation() {
    let c = ControllerProcess::start_new("ctl-release").await;
    c.sample_fleet(7, 70, 1, 0, &[]).await;
    // Application 8's game ends its match by itself after 1 s.
    c.sample_fleet(8, 80, 1, 1, &[]).await;
    let _agent = c.spawn_agent("ctl-release", "release-bm").await;
    let x = id_of(&c.wait_online(7, 1).await[0]);
    let y = id_of(&c.wait_online(8, 1).await[0]);

    // Released by the matchmaker.
    let first = c.allocate_ok(7, "").await;
    assert_eq!(id_of(&first), x);
    // Without a key nothing can replay the answer, so the row does not keep it.
    let allocation_id = first["allocationId"].as_str().expect("allocationId");
    let stored = c.stored_allocation_body(allocation_id).await;
    assert_eq!(stored["instanceId"], json!(x), "{stored}");
    assert!(stored.get("response").is_none(), "{stored}");
    assert!(stored.get("responseI3d").is_none(), "{stored}");
    let port = port_of(&first);
    wait_game_info(port, "allocated", |i| i["allocated"] == true).await;
    let released = c
        .matchmaker(
            Method::POST,
            &format!("/v1/instances/{x}/deallocate"),
            Some(&json!({})),
        )
        .await
        .expect(200)
        .json;
    assert_eq!(released["status"], 4, "{released}");
    assert!(released["allocationId"].is_null(), "{released}");
    let seen = c.instance(&x).await;
    assert_eq!(seen["status"], 4, "{seen}");
    assert!(seen["allocationId"].is_null(), "{seen}");
    wait_game_info(port, "released", |i| i["allocated"] == false).await;
    let second = c.allocate_when_offered(7, &json!({}), &[]).await;
    assert_eq!(
        id_of(&second),
        x,
        "the same instance can be allocated again"
    );
    assert_ne!(second["allocationId"], first["allocationId"]);

    // Released by the game killed mid-match: restarted by its agent, allocatable again.
    wait_game_info(port, "allocated", |i| i["allocated"] == true).await;
    let old_pid = pid_of(&second);
    signal(old_pid, Signal::SIGKILL).expect("SIGKILL the game");
    let restarted = c
        .wait_instance(&x, "released, restarted and online", |i| {
            i["allocationId"].is_null()
                && is_allocatable(i)
                && i["pid"].as_u64().is_some_and(|p| p != u64::from(old_pid))
        })
        .await;
    assert!(
        restarted["restarts"].as_u64().is_some_and(|r| r >= 1),
        "{restarted}"
    );
    assert_eq!(count_instance_processes(&x), 1);
    let third = c.allocate_ok(7, "").await;
    assert_eq!(id_of(&third), x);
    assert_eq!(pid_of(&third), pid_of(&restarted));

    // Released by the game ending its match: no deallocate call at all.
    let match_start = c.allocate_ok(8, "").await;
    assert_eq!(id_of(&match_start), y);
    let ended = c
        .wait_instance(&y, "released by the game after its 1 s match", |i| {
            i["status"] == 4 && i["allocationId"].is_null()
        })
        .await;
    assert!(is_allocatable(&ended), "{ended}");
    let info = game_info(port_of(&ended)).await.expect("INFO");
    assert_eq!(info["allocated"], false, "{info}");
    let next_match = c.allocate_ok(8, "").await;
    assert_eq!(id_of(&next_match), y);
    assert_ne!(next_match["allocationId"], match_start["allocationId"]);
}

/// A game told to stop that has not left yet still reports 4 (here one that ignores the soft
/// stop, for its 30 s grace). It is not offered: no matchmaker gets a game on its way out, no
/// allocation is tried on it first, and a refusal says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_game_being_stopped_is_not_offered() {
    let c = ControllerProcess::start_new("ctl-stopping").await;
    c.create_application(9, "deaf").await;
    let (mut profile, _) = berth_e2e::silent_game_profile("deaf-9", 9, c.dir().path());
    profile["stopTimeoutSeconds"] = json!(30);
    c.create_profile(&profile).await;
    c.create_fleet(&fleet_body(90, 9, "deaf-9", 2, &[])).await;
    let _agent = c.spawn_agent("ctl-stopping", "stopping-bm").await;
    let online = c.wait_online(9, 2).await;
    let (stopping, other) = (id_of(&online[0]), id_of(&online[1]));

    c.admin(
        Method::POST,
        &format!("/v1/instances/{stopping}/stop"),
        Some(&json!({})),
    )
    .await
    .expect(200);
    let seen = c
        .wait_instance(&stopping, "draining", |i| i["state"] == "draining")
        .await;
    assert_eq!(seen["status"], 4, "the game still reports 4: {seen}");
    let got = c.allocate_ok(9, "").await;
    assert_eq!(id_of(&got), other, "the other game: {got}");
    let r = c.allocate(9, &json!({}), &[]).await;
    let body = r.assert_error(404, "NO_ALLOCATABLE_INSTANCE", None);
    assert!(
        details(body).contains("1 being stopped or removed"),
        "{body}"
    );
    assert_eq!(
        c.instance(&stopping).await["state"],
        "draining",
        "no allocation reached it"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. A frozen agent

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_agent_leaves_pool_and_rejoins() {
    let c = ControllerProcess::start_new("ctl-frozen").await;
    c.sample_fleet(7, 456, 2, 0, &[]).await;
    let agents = [
        c.spawn_agent("ctl-frozen", "frozen-a").await,
        c.spawn_agent("ctl-frozen", "frozen-b").await,
    ];
    let before = c.wait_online(7, 4).await;
    let pids: BTreeMap<String, u32> = before.iter().map(|i| (id_of(i), pid_of(i))).collect();

    // The first allocation decides which host is "A" (the engine's tie-break).
    let held = c.allocate_ok(7, "").await;
    let a_host = host_of(&held);
    let a_hosts = c.hosts().await;
    let a_name = a_hosts
        .iter()
        .find(|h| h["id"] == a_host)
        .map(|h| h["name"].as_str().unwrap_or_default().to_owned())
        .expect("host of the allocation");
    let a = agents
        .iter()
        .find(|g| g.config().host_name == a_name)
        .expect("agent A");
    let a_idle = id_of(
        &on_host(&before, a_host)
            .into_iter()
            .find(|i| id_of(i) != id_of(&held))
            .expect("A's idle instance"),
    );

    let frozen_at = Instant::now();
    signal(a.pid().expect("agent A runs"), Signal::SIGSTOP).expect("SIGSTOP agent A");
    c.wait_host(&a_name, "unreachable", |h| h["reachable"] == false)
        .await;
    let detected = frozen_at.elapsed();
    assert!(
        detected <= c.config().expiry() + Duration::from_secs(1),
        "a silent host must leave the pool within expiry + 1 s; took {detected:?}"
    );
    let a_seen = c.host_named(&a_name).await;
    assert_eq!(a_seen["state"], "unreachable", "{a_seen}");

    // A's match is kept, marked server_unreachable.
    let kept = c.instance(&id_of(&held)).await;
    assert_eq!(kept["status"], 5, "{kept}");
    assert_eq!(kept["allocationId"], held["allocationId"], "{kept}");
    assert_eq!(kept["state"], "server_unreachable", "{kept}");

    // A's idle instance is out of the pool: allocations land on B only, until B is full.
    for _ in 0..2 {
        let on_b = c.allocate_ok(7, "").await;
        assert_ne!(host_of(&on_b), a_host, "{on_b}");
    }
    let none = c.allocate(7, &json!({}), &[]).await;
    let body = none.assert_error(404, "NO_ALLOCATABLE_INSTANCE", None);
    assert!(
        details(body).contains("1 on unreachable hosts") && details(body).contains("3 allocated"),
        "{body}"
    );

    // Thawed: A rejoins and its idle instance is allocatable again, nothing duplicated.
    signal(a.pid().expect("agent A runs"), Signal::SIGCONT).expect("SIGCONT agent A");
    c.wait_host(&a_name, "reachable again", |h| h["reachable"] == true)
        .await;
    let back = c.allocate_when_offered(7, &json!({}), &[]).await;
    assert_eq!(id_of(&back), a_idle, "{back}");
    let kept = c.instance(&id_of(&held)).await;
    assert_eq!(kept["status"], 5, "{kept}");
    assert_eq!(kept["allocationId"], held["allocationId"], "{kept}");
    assert_eq!(kept["state"], "running", "{kept}");

    let after = c.instances("?applicationId=7").await;
    assert_eq!(ids(&after), ids(&before), "instance ids unchanged");
    for i in &after {
        assert_eq!(pid_of(i), pids[&id_of(i)], "game pids unchanged: {i}");
        assert_eq!(count_instance_processes(&id_of(i)), 1, "{i}");
    }
    for h in c.hosts().await {
        assert_eq!(h["instances"], 2, "{h}");
        assert_eq!(h["reachable"], true, "{h}");
    }
    for g in &agents {
        assert_eq!(g.instances().await.len(), 2);
    }
}

/// The controller itself stops (SIGSTOP, as a paused VM or a starved process would) for three
/// expiry windows. When it runs again it does not blame the hosts for its own deafness: the
/// host that kept running is not declared unreachable nor asked to register again, its idle
/// game is offered at once, and the stall is counted. A host that really went silent during
/// the pause (frozen too) is still found, within expiry + 1 s of the thaw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_controller_blames_no_host_for_its_own_pause() {
    let c = ControllerProcess::start_new("ctl-paused").await;
    c.sample_fleet(7, 457, 2, 0, &[]).await;
    let agents = [
        c.spawn_agent("ctl-paused", "paused-a").await,
        c.spawn_agent("ctl-paused", "paused-b").await,
    ];
    c.wait_online(7, 4).await;
    let held = c.allocate_ok(7, "").await;
    let (a, b) = (&agents[0], &agents[1]);
    let registered = registrations(a);
    let host_name = |g: &AgentProcess| g.config().host_name.clone();

    let controller = c.pid().expect("the controller runs");
    signal(controller, Signal::SIGSTOP).expect("SIGSTOP the controller");
    signal(b.pid().expect("agent B runs"), Signal::SIGSTOP).expect("SIGSTOP agent B");
    // The fault's length, not a wait for a state: three expiry windows.
    tokio::time::sleep(c.config().expiry() * 3).await;
    let thawed = Instant::now();
    signal(controller, Signal::SIGCONT).expect("SIGCONT the controller");

    let lost_b = c
        .wait_host(&host_name(b), "unreachable", |h| h["reachable"] == false)
        .await;
    assert_eq!(lost_b["state"], "unreachable", "{lost_b}");
    let detected = thawed.elapsed();
    assert!(
        detected <= c.config().expiry() + Duration::from_secs(1),
        "a host silent through the pause must still leave the pool within expiry + 1 s of the thaw; took {detected:?}"
    );
    let seen_a = c.host_named(&host_name(a)).await;
    assert_eq!(seen_a["state"], "ready", "{seen_a}");
    let m = c.metrics().await;
    assert!(
        metric(&m, "berth_controller_stalls_total", "").is_some_and(|n| n >= 1.0),
        "the stall is counted:\n{m}"
    );
    assert_eq!(
        metric(&m, "berth_controller_hosts_lost_total", ""),
        Some(1.0),
        "only the frozen agent's host was declared lost"
    );
    assert_eq!(
        registrations(a),
        registered,
        "the host that kept running was not asked to register again"
    );
    assert!(
        c.log()
            .contains("that time is not counted as any host's silence"),
        "the controller says why"
    );

    // The held match never moved, and the running host takes the next one.
    let kept = c.instance(&id_of(&held)).await;
    assert_eq!(kept["allocationId"], held["allocationId"], "{kept}");
    let next = c.allocate_ok(7, "").await;
    assert_eq!(json!(host_of(&next)), seen_a["id"], "{next}");
    signal(b.pid().expect("agent B runs"), Signal::SIGCONT).expect("SIGCONT agent B");
    c.wait_host(&host_name(b), "reachable again", |h| h["reachable"] == true)
        .await;
}

// ---------------------------------------------------------------------------------------------
// 8. Controller crash

/// Allocates with `headers` (an `Idempotency-Key`), retrying while a restarted controller
/// answers 503 because the key's allocation is not yet confirmed by its agent.
async fn allocate_once_confirmed(
    c: &ControllerProcess,
    body: &Value,
    headers: &[(&str, &str)],
) -> Response {
    wait_for("the key's allocation to be answered", TIMEOUT, async || {
        let r = c.allocate(7, body, headers).await;
        match r.status {
            200 => Ok(r),
            503 => Err(format!("still {}", r.text)),
            _ => panic!("allocate answered {} {}", r.status, r.text),
        }
    })
    .await
}

/// An allocation's row is written while its agent is asked, so that the commit's fsync
/// overlaps the call. A controller that dies in between leaves a row for an allocation no game
/// received and no matchmaker was told of. At start the row stands (the instance is not handed
/// out, a replay of its key is told to retry) until the agent's full report shows it does not
/// hold it; then it goes, and the key allocates afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_written_but_never_answered_is_dropped_at_restart() {
    let mut c = ControllerProcess::start_new("ctl-unanswered").await;
    c.sample_fleet(7, 456, 1, 0, &[]).await;
    let agent_config = AgentConfig::joined("unanswered-bm", &c);
    let proxy = FaultProxy::start(format!("http://127.0.0.1:{}", agent_config.listen_port)).await;
    let agent = AgentProcess::spawn(
        "ctl-unanswered-bm",
        agent_config.advertise_url(&proxy.url()),
    )
    .await;
    let instance = id_of(&c.wait_online(7, 1).await[0]);

    proxy.hold_allocations(true);
    let key = format!("match-{}", short_id());
    let body = json!({"metadata": kv(&[("map", "dust")])});
    let lost = {
        let (http, url, token) = (c.http().clone(), c.url(), c.matchmaker_token().to_owned());
        let (key, body) = (key.clone(), body.clone());
        tokio::spawn(async move {
            http.try_send(
                Method::POST,
                &format!("{url}/v1/applications/7/allocate"),
                Some(&token),
                &[("Idempotency-Key", key.as_str())],
                Some(&body),
            )
            .await
        })
    };
    let rows = wait_for(
        "the allocation row on disk and its call at the agent's door",
        TIMEOUT,
        async || {
            let rows = c.stored_allocations().await;
            (!rows.is_empty() && proxy.held_allocations() == 1).then_some(rows)
        },
    )
    .await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (written, on) = rows[0].clone();
    assert_eq!(on, instance);

    // A release while the allocation is in flight: of the allocation being made (or of
    // whatever the instance holds), "retry in a moment"; of another one, which has ended since
    // the instance is being allocated again, "not the current allocation" at once.
    let release = async |body: Value| {
        c.matchmaker(
            Method::POST,
            &format!("/v1/instances/{instance}/deallocate"),
            Some(&body),
        )
        .await
    };
    for body in [json!({}), json!({"allocationId": written})] {
        release(body)
            .await
            .assert_error(422, "INSTANCE_ALLOCATING", Some(76005));
    }
    let ended = "00000000-0000-4000-8000-00000000e7d0";
    let r = release(json!({"allocationId": ended})).await;
    let err = r.assert_error(400, "INVALID_REQUEST", None);
    assert!(
        details(err).contains("not the current allocation") && details(err).contains(ended),
        "{err}"
    );

    // The agent is frozen so that the restarted controller is seen before its report.
    let agent_pid = agent.pid().expect("the agent runs");
    signal(agent_pid, Signal::SIGSTOP).expect("SIGSTOP the agent");
    c.kill9();
    assert!(
        lost.await.expect("the matchmaker task").is_err(),
        "the matchmaker never got an answer"
    );
    proxy.hold_allocations(false);
    c.start().await;
    let i = c.instance(&instance).await;
    assert_eq!(i["status"], 5, "not handed out while unconfirmed: {i}");
    assert_eq!(i["allocationId"], json!(written), "{i}");
    let headers = [("Idempotency-Key", key.as_str())];
    let early = c.allocate(7, &body, &headers).await;
    let err = early.assert_error(503, "SERVICE_UNAVAILABLE", None);
    assert!(details(err).contains(&written), "{err}");
    assert_eq!(early.header("retry-after"), Some("1"));

    signal(agent_pid, Signal::SIGCONT).expect("SIGCONT the agent");
    let fresh = allocate_once_confirmed(&c, &body, &headers).await.json;
    assert_eq!(id_of(&fresh), instance);
    assert_ne!(fresh["allocationId"], json!(written), "{fresh}");
    assert!(
        c.log().contains("its agent does not hold it"),
        "the controller says why the row went"
    );
    let held = agent.instance(&instance).await;
    assert_eq!(held["allocationId"], fresh["allocationId"], "{held}");
    let new_id = fresh["allocationId"]
        .as_str()
        .expect("allocationId")
        .to_owned();
    wait_for("only the new row on disk", TIMEOUT, async || {
        let rows = c.stored_allocations().await;
        (rows == [(new_id.clone(), instance.clone())])
            .then_some(())
            .ok_or(format!("{rows:?}"))
    })
    .await;
    // The game has the new allocation.
    wait_game_info(port_of(&held), "allocated", |i| i["allocated"] == true).await;
}

fn registrations(agent: &AgentProcess) -> usize {
    agent
        .log()
        .matches("registered with the controller")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_sigkill_loses_no_acknowledged_allocation() {
    const K: usize = 5;
    let mut c = ControllerProcess::start_new("ctl-crash").await;
    c.sample_fleet(7, 456, 3, 0, &[]).await;
    let agents = [
        c.spawn_agent("ctl-crash", "crash-a").await,
        c.spawn_agent("ctl-crash", "crash-b").await,
    ];
    let before = c.wait_online(7, 6).await;
    let mut acked = BTreeMap::new();
    for _ in 0..K {
        let a = c.allocate_ok(7, "").await;
        acked.insert(id_of(&a), a["allocationId"].clone());
    }
    assert_eq!(acked.len(), K);
    let registered: Vec<usize> = agents.iter().map(registrations).collect();

    c.kill9();
    c.start().await;
    let restarted = Instant::now();

    // Every acknowledged allocation is there, before and after the agents come back.
    let check = async |when: &str| {
        for (id, alloc) in &acked {
            let i = c.instance(id).await;
            assert_eq!(i["status"], 5, "{when}: {i}");
            assert_eq!(&i["allocationId"], alloc, "{when}: {i}");
        }
    };
    check("right after the restart").await;

    // No host is declared dead during the first expiry window after the restart, and both
    // stay listed.
    let window = c.config().expiry();
    let expected: BTreeSet<&str> = agents
        .iter()
        .map(|a| a.config().host_name.as_str())
        .collect();
    let mut looks = 0;
    while restarted.elapsed() < window {
        let hosts = c.hosts().await;
        let elapsed = restarted.elapsed();
        let names: BTreeSet<&str> = hosts.iter().filter_map(|h| h["name"].as_str()).collect();
        assert_eq!(names, expected, "{elapsed:?} after the restart: {hosts:?}");
        for h in &hosts {
            assert_eq!(h["reachable"], true, "{elapsed:?} after the restart: {h}");
        }
        looks += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        looks > 0,
        "the hosts were never looked at within the {window:?} expiry window: the restart and \
         the first checks took {:?}",
        restarted.elapsed()
    );

    for (agent, n) in agents.iter().zip(&registered) {
        wait_for("the agent registers again", TIMEOUT, async || {
            (registrations(agent) > *n).then_some(())
        })
        .await;
    }
    check("after the agents re-registered").await;

    // New allocations still work: the one idle instance, then nothing.
    let fresh = c.allocate_when_offered(7, &json!({}), &[]).await;
    assert!(!acked.contains_key(&id_of(&fresh)), "{fresh}");
    let none = c.allocate(7, &json!({}), &[]).await;
    let body = none.assert_error(404, "NO_ALLOCATABLE_INSTANCE", None);
    assert!(details(body).contains("6 allocated"), "{body}");

    // Nothing duplicated, nothing lost, and the agents hold the same allocations.
    let after = c.instances("?applicationId=7").await;
    assert_eq!(ids(&after), ids(&before));
    for h in c.hosts().await {
        assert_eq!(h["instances"], 3, "{h}");
        assert_eq!(h["reachable"], true, "{h}");
    }
    for agent in &agents {
        let list = agent.instances().await;
        assert_eq!(list.len(), 3);
        for i in list {
            assert_eq!(count_instance_processes(&id_of(&i)), 1, "{i}");
            if let Some(alloc) = acked.get(&id_of(&i)) {
                assert_eq!(&i["allocationId"], alloc, "the agent agrees: {i}");
            }
        }
    }
}

/// Matches that end while the controller is down: the allocations come back from the store
/// at the restart, unconfirmed, and the agents' full reports (the games ended them) release
/// them, on disk too. Meanwhile they are not offered, and afterwards all are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matches_ended_while_the_controller_is_down_are_released_at_its_restart() {
    let mut c = ControllerProcess::start_new("ctl-ended-down").await;
    // 2 s matches.
    c.sample_fleet(7, 456, 3, 2, &[]).await;
    let agent = c.spawn_agent("ctl-ended-down", "ended-down").await;
    let before = c.wait_online(7, 3).await;
    let mut ended = Vec::new();
    for _ in 0..2 {
        ended.push(c.allocate_ok(7, "").await);
    }
    let registered = registrations(&agent);

    c.kill9();
    for a in &ended {
        wait_game_info(port_of(a), "the match over, its controller down", |i| {
            i["allocated"] == false
        })
        .await;
    }
    c.start().await;
    wait_for("the agent registers again", TIMEOUT, async || {
        (registrations(&agent) > registered).then_some(())
    })
    .await;
    let free = c
        .wait_instances("?applicationId=7", "all 3 free again", |l| {
            l.len() == 3
                && l.iter()
                    .all(|i| is_allocatable(i) && i["allocationId"].is_null())
        })
        .await;
    assert_eq!(ids(&free), ids(&before));
    wait_for("no allocation rows left on disk", TIMEOUT, async || {
        let rows = c.stored_allocations().await;
        rows.is_empty().then_some(()).ok_or(format!("{rows:?}"))
    })
    .await;
    // The whole pool takes matches again.
    let mut next = Vec::new();
    for _ in 0..3 {
        next.push(c.allocate_ok(7, "").await);
    }
    assert_eq!(ids(&next), ids(&before));
    for i in &next {
        let info = game_info(port_of(i)).await.expect("INFO");
        assert_eq!(info["allocatedDuringMatch"], 0, "{info}");
    }
}

/// A second controller started on a running controller's database (another port, so the port
/// does not stop it) exits at once, naming the running one's pid and the lock file: two
/// controllers on one database would each claim instances in their own memory. The first one
/// serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_controller_on_the_same_database_is_refused() {
    let c = ControllerProcess::start_new("ctl-db-lock").await;
    c.sample_fleet(7, 456, 1, 0, &[]).await;
    let _agent = c.spawn_agent("ctl-db-lock", "db-lock-bm").await;
    c.wait_online(7, 1).await;

    let mut other = c.config().clone();
    other.listen_port = free_port();
    assert_second_daemon_refused(
        "berth-controller",
        &other.toml(c.database()),
        c.pid().expect("the first controller runs"),
        &["controller.db.lock", &c.database().display().to_string()],
    )
    .await;
    let a = c.allocate_ok(7, "").await;
    assert_eq!(a["status"], 5, "{a}");
}

/// Two agents under one host name (a cloned machine image, a copied agent.toml): the second
/// is refused while the first is alive, saying why, so the first keeps its host, its instances
/// and its match; the second gets the name once the first has gone silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_under_a_live_hosts_name_is_refused() {
    let c = ControllerProcess::start_new("ctl-twin").await;
    c.sample_fleet(7, 456, 1, 0, &[]).await;
    let mut first = c.spawn_agent("ctl-twin", "twin").await;
    c.wait_online(7, 1).await;
    let held = c.allocate_ok(7, "").await;
    let refusals = || c.log().matches("is host 1 of another agent").count();

    let second = AgentProcess::spawn("ctl-twin-second", AgentConfig::joined("twin", &c)).await;
    wait_for("three refused registrations", TIMEOUT, async || {
        (refusals() >= 3).then_some(()).ok_or(refusals())
    })
    .await;
    let host = c.host_named("twin").await;
    assert_eq!(host["id"], 1, "{host}");
    assert_eq!(c.hosts().await.len(), 1);
    let kept = c.instance(&id_of(&held)).await;
    assert_eq!(kept["status"], 5, "{kept}");
    assert_eq!(kept["allocationId"], held["allocationId"], "{kept}");
    assert_eq!(
        ids(&c.instances("?applicationId=7").await),
        ids(std::slice::from_ref(&held))
    );
    assert!(
        second
            .log()
            .contains("give this agent its own host_name in agent.toml"),
        "the refused agent says why"
    );

    // The first agent gone silent, the second takes the name over, with its own instance.
    first.kill9();
    let taken = c
        .wait_host("twin", "taken over by the second agent", |h| {
            h["reachable"] == true && h["instances"] == 1
        })
        .await;
    assert_eq!(taken["id"], 1, "{taken}");
    let now = c.wait_online(7, 1).await;
    assert_eq!(now[0]["hostId"], 1, "{now:?}");
    assert_ne!(id_of(&now[0]), id_of(&held), "the second agent's own game");
    assert_eq!(
        ids(&second.instances().await),
        ids(&now),
        "the instance listed is the second agent's"
    );
}

/// An agent whose advertised address the controller cannot call (nothing listens there), or
/// where another agent answers (a copied agent.toml), is refused at registration, and its log
/// says why and what to set, instead of showing as a ready host whose every deploy and
/// allocation fails. The agent that does answer there is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_the_controller_cannot_call_is_refused_and_told_why() {
    let c = ControllerProcess::start_new("ctl-advertise").await;
    c.sample_fleet(7, 456, 1, 0, &[]).await;
    let real = c.spawn_agent("ctl-advertise", "real").await;
    c.wait_online(7, 1).await;
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let closed = AgentProcess::spawn(
        "ctl-advertise-closed",
        AgentConfig::joined("closed", &c).advertise_url(&nowhere),
    )
    .await;
    let copied = AgentProcess::spawn(
        "ctl-advertise-copied",
        AgentConfig::joined("copied", &c).advertise_url(&real.url()),
    )
    .await;
    let refusal = async |agent: &AgentProcess, says: &[&str]| {
        wait_for(
            &format!("{}'s refusal", agent.config().host_name),
            TIMEOUT,
            async || {
                let log = agent.log();
                let line = log
                    .lines()
                    .find(|l| l.contains("cannot register") && says.iter().all(|s| l.contains(s)));
                line.map(str::to_owned).ok_or(())
            },
        )
        .await
    };
    refusal(
        &closed,
        &[
            &format!("cannot call this agent at advertiseUrl {nowhere}"),
            "set advertise_url in agent.toml",
        ],
    )
    .await;
    refusal(
        &copied,
        &[&real.url(), "give each agent its own advertise_url"],
    )
    .await;
    let hosts = c.hosts().await;
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    assert_eq!(hosts[0]["name"], "real", "{hosts:?}");
    let a = c.allocate_ok(7, "").await;
    assert_eq!(a["hostName"], "real", "{a}");
}

/// A host whose agent heartbeats but stops answering the controller's calls (a firewall that
/// lets the agent out but not the controller in) is set aside at the first call that fails:
/// listed `not_answering` with why, told so through its heartbeats, and not tried again by
/// allocations (each try would cost a matchmaker the call's timeout). The controller probes it
/// and offers it again once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_stops_answering_is_set_aside_until_it_answers() {
    let c = ControllerProcess::start_new("ctl-walled").await;
    c.sample_fleet(7, 456, 2, 0, &[]).await;
    let config = AgentConfig::joined("walled-bm", &c);
    let proxy = FaultProxy::start(format!("http://127.0.0.1:{}", config.listen_port)).await;
    let walled = AgentProcess::spawn("ctl-walled-bm", config.advertise_url(&proxy.url())).await;
    let mut vm = AgentConfig::joined("open-vm", &c);
    vm.is_virtual = true;
    let _open = AgentProcess::spawn("ctl-walled-vm", vm).await;
    c.wait_online(7, 4).await;

    proxy.refuse_all(true);
    // Bare metal first: the call to it fails, and the VM takes the allocation.
    let a = c.allocate_ok(7, "").await;
    assert_eq!(a["hostName"], "open-vm", "{a}");
    let tried = proxy.refused().0;
    assert!(tried >= 1, "the walled host was tried first");
    let h = c.host_named("walled-bm").await;
    assert_eq!(h["state"], "not_answering", "{h}");
    assert_eq!(h["reachable"], true, "its heartbeats still come: {h}");
    let why = h["agentError"].as_str().unwrap_or_default();
    assert!(why.contains(&proxy.url()), "{h}");
    assert!(h["agentErrorSince"].is_string(), "{h}");
    let metrics = c.metrics().await;
    assert_metrics(
        &metrics,
        &[("berth_controller_hosts", "state=\"not_answering\"", 1.0)],
    );
    wait_for("the agent told why", TIMEOUT, async || {
        walled
            .log()
            .lines()
            .any(|l| {
                l.contains("the controller cannot call this agent") && l.contains(&proxy.url())
            })
            .then_some(())
            .ok_or(())
    })
    .await;

    // Allocations keep to the VM while the controller's probes go unanswered.
    let release = async |a: &Value| {
        c.matchmaker(
            Method::POST,
            &format!("/v1/instances/{}/deallocate", id_of(a)),
            Some(&json!({})),
        )
        .await
        .expect(200);
    };
    release(&a).await;
    wait_for("two unanswered probes", TIMEOUT, async || {
        let a = c.allocate_when_offered(7, &json!({}), &[]).await;
        assert_eq!(a["hostName"], "open-vm", "{a}");
        release(&a).await;
        (proxy.refused().1 >= 2).then_some(()).ok_or(())
    })
    .await;
    assert_eq!(
        proxy.refused().0,
        tried,
        "no allocation tried the walled host again"
    );
    let r = c.allocate(7, &json!({"filter": "isVirtual=0"}), &[]).await;
    let body = r.assert_error(404, "NO_ALLOCATABLE_INSTANCE", None);
    assert!(
        details(body).contains("2 on hosts whose agent does not answer the controller's calls"),
        "{body}"
    );

    proxy.refuse_all(false);
    let h = c
        .wait_host("walled-bm", "answering again", |h| h["state"] == "ready")
        .await;
    assert!(h.get("agentError").is_none(), "{h}");
    assert!(c.log().contains("answers the controller again"));
    wait_for("the agent told it is reached again", TIMEOUT, async || {
        walled
            .log()
            .contains("the controller reaches this agent again")
            .then_some(())
            .ok_or(())
    })
    .await;
    let a = c.allocate_when_offered(7, &json!({}), &[]).await;
    assert_eq!(a["hostName"], "walled-bm", "{a}");
}

/// A game that never listens for Arcus (a new integration's first mistake) is explained where
/// an operator looks: the instance object says why its link is down, and an allocation's
/// refusal counts it as starting with no link and says where to look.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_game_that_never_listens_is_explained() {
    let c = ControllerProcess::start_new("ctl-mute").await;
    c.create_application(8, "mute").await;
    c.create_profile(&json!({
        "id": "mute-1", "applicationId": 8, "build": "1",
        "executable": "/bin/sleep", "args": ["60"], "stopTimeoutSeconds": 1,
    }))
    .await;
    c.create_fleet(&fleet_body(801, 8, "mute-1", 1, &[])).await;
    let _agent = c.spawn_agent("ctl-mute", "mute-bm").await;
    let listed = c
        .wait_instances("?applicationId=8", "the game's reason", |l| {
            l.len() == 1 && l[0]["arcusError"].as_str().is_some()
        })
        .await;
    let i = &listed[0];
    assert_eq!(i["status"], 3, "{i}");
    let why = i["arcusError"].as_str().unwrap_or_default();
    assert!(
        why.contains("does not accept connections on its management port")
            && why.contains(&format!(":{}", i["managementPort"])),
        "{i}"
    );
    let r = c.allocate(8, &json!({}), &[]).await;
    let body = r.assert_error(404, "NO_ALLOCATABLE_INSTANCE", None);
    assert!(
        details(body).contains("1 starting with no Arcus link to their game")
            && details(body).contains("berthctl instances show"),
        "{body}"
    );
}

/// A host taken out of service is deleted by an operator: refused while its agent is alive
/// and while it holds a match (naming it), then forgotten with its instances, for good across
/// a controller restart, and its id is never given again. The agent started again on that
/// machine registers as a new host with its games, nothing duplicated, and the match released
/// with the host is released on the agent too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_host_is_forgotten_and_comes_back_only_as_a_new_host() {
    let mut c = ControllerProcess::start_new("ctl-delete-host").await;
    c.sample_fleet(7, 456, 2, 0, &[]).await;
    // The host to delete is the newest (id 2), so that giving its id again would show, and a
    // VM, so that a filter puts the match there.
    let _kept = c.spawn_agent("ctl-delete-host", "kept-bm").await;
    c.wait_host("kept-bm", "registered", |h| h["id"] == 1).await;
    let gone_name = "retired-vm";
    let mut config = AgentConfig::joined(gone_name, &c);
    config.is_virtual = true;
    let mut victim = AgentProcess::spawn("ctl-delete-host-vm", config).await;
    let before = c.wait_online(7, 4).await;
    let held = c.allocate_ok(7, "isVirtual=1").await;
    let gone_id = host_of(&held);
    assert_eq!(gone_id, 2, "{held}");
    let path = format!("/v1/hosts/{gone_id}");
    let delete = async |query: &str| {
        c.admin(Method::DELETE, &format!("{path}{query}"), None)
            .await
    };

    let alive = delete("").await;
    let body = alive.assert_error(400, "INVALID_REQUEST", None);
    assert!(
        details(body).contains("is reachable") && details(body).contains("systemctl stop"),
        "{body}"
    );
    let denied = c.matchmaker(Method::DELETE, &path, None).await;
    denied.assert_error(403, "INVALID_CREDENTIALS", None);

    // The machine's agent stops (its games keep running, as on any agent stop).
    victim.kill9();
    c.wait_host(gone_name, "unreachable", |h| h["reachable"] == false)
        .await;
    let holding = delete("").await;
    let body = holding.assert_error(400, "INVALID_REQUEST", None);
    assert!(
        details(body).contains("holds 1 allocation:")
            && details(body).contains(&id_of(&held))
            && details(body).contains("releaseAllocations=true"),
        "{body}"
    );
    let unclear = delete("?releaseAllocations=perhaps").await;
    let body = unclear.assert_error(400, "INVALID_REQUEST", None);
    assert!(
        details(body).contains("releaseAllocations=\"perhaps\""),
        "{body}"
    );
    assert_eq!(c.hosts().await.len(), 2, "nothing deleted by a refusal");

    let deleted = delete("?releaseAllocations=true").await.expect(200);
    let h = deleted.json;
    assert_eq!(h["id"], gone_id, "{h}");
    assert_eq!(h["instances"], 2, "{h}");
    let check_gone = async |c: &ControllerProcess| {
        let hosts = c.hosts().await;
        assert_eq!(hosts.len(), 1, "{hosts:?}");
        assert_ne!(hosts[0]["id"], gone_id, "{hosts:?}");
        let missing = c.admin(Method::GET, &path, None).await;
        let body = missing.assert_error(404, "RESOURCE_NOT_FOUND", None);
        assert!(
            details(body).contains("was deleted at") && details(body).contains(gone_name),
            "{body}"
        );
        let left = c.instances("?applicationId=7").await;
        assert!(on_host(&left, gone_id).is_empty(), "{left:?}");
        assert_eq!(left.len(), 2, "{left:?}");
    };
    check_gone(&c).await;
    assert!(
        c.stored_allocations().await.is_empty(),
        "the release is on disk"
    );
    c.sigterm().await;
    c.start().await;
    check_gone(&c).await;

    // The agent started again on that machine: a new host, same games, the match released.
    victim.start().await;
    let back = c
        .wait_host(gone_name, "registered again", |h| {
            h["reachable"] == true && h["instances"] == 2
        })
        .await;
    let new_id = back["id"].as_u64().expect("host id");
    assert_eq!(
        new_id, 3,
        "a deleted host's id is never given again: {back}"
    );
    let released = c
        .wait_instance(&id_of(&held), "released on its agent", |i| {
            i["status"] == 4 && i["allocationId"].is_null()
        })
        .await;
    assert_eq!(host_of(&released), new_id, "{released}");
    let after = c.wait_online(7, 4).await;
    assert_eq!(
        ids(&after),
        ids(&before),
        "the same games, none deployed twice"
    );
    for i in &after {
        assert_eq!(count_instance_processes(&id_of(i)), 1, "{i}");
    }
}

/// An agent given another host name (agent.toml edited, the machine's hostname changed) keeps
/// its host: the same id under the new name, with its games and the match one of them runs,
/// and no second set deployed beside them. While the old registration is alive, the name
/// change is refused, saying why: it could be a copy of the agent's state on another machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_agent_keeps_its_host_and_its_games() {
    let c = ControllerProcess::start_new("ctl-rename").await;
    c.sample_fleet(7, 456, 2, 0, &[]).await;
    let mut agent = c.spawn_agent("ctl-rename", "old-name").await;
    let before = c.wait_online(7, 2).await;
    let held = c.allocate_ok(7, "").await;
    let pids: BTreeMap<String, u32> = before.iter().map(|i| (id_of(i), pid_of(i))).collect();

    agent.kill9();
    agent.rename("new-name");
    agent.start().await;
    let renamed = c
        .wait_host("new-name", "the old host renamed", |h| {
            h["reachable"] == true && h["instances"] == 2
        })
        .await;
    assert_eq!(renamed["id"], 1, "{renamed}");
    let hosts = c.hosts().await;
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    let kept = c.instance(&id_of(&held)).await;
    assert_eq!(kept["status"], 5, "{kept}");
    assert_eq!(kept["allocationId"], held["allocationId"], "{kept}");
    assert_eq!(kept["hostName"], "new-name", "{kept}");
    // The reconciler counts the renamed host's games as its own: a fleet of 3 per host
    // deploys exactly one more there.
    c.put_fleet(&fleet_body(456, 7, "sample-7", 3, &[])).await;
    let on_agent = wait_agent_count(&agent, 3).await;
    let kept: Vec<&Value> = on_agent
        .iter()
        .filter(|i| pids.contains_key(&id_of(i)))
        .collect();
    assert_eq!(kept.len(), 2, "{on_agent:?}");
    for i in kept {
        assert_eq!(pid_of(i), pids[&id_of(i)], "the same game: {i}");
    }
    // Listed by the controller once it has taken in the deploy's answer, and counted with it.
    let listed = c
        .wait_instances("?applicationId=7", "the agent's three", |l| {
            ids(l) == ids(&on_agent)
        })
        .await;
    let deploys = metric(
        &c.metrics().await,
        "berth_controller_reconcile_deploys_total",
        "",
    );
    assert_eq!(deploys, Some(3.0), "2 at first, then 1");
    assert!(listed.iter().all(|i| host_of(i) == 1), "{listed:?}");
}

/// An agent renamed onto the name of another host (a typo, a hostname reused) would take that
/// host over and leave its own behind, with its games: it is refused, saying which host holds
/// the name and what to do. Once that host is deleted, it is accepted as its own host under the
/// new name, with its games and their match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_renamed_onto_another_hosts_name_waits_for_the_name() {
    let c = ControllerProcess::start_new("ctl-name-clash").await;
    c.sample_fleet(7, 456, 1, 0, &[]).await;
    let mut mover = c.spawn_agent("ctl-name-clash", "mover").await;
    c.wait_online(7, 1).await;
    let held = c.allocate_ok(7, "").await;
    let mut gone = c.spawn_agent("ctl-name-clash", "taken").await;
    c.wait_host("taken", "registered", |h| h["id"] == 2).await;
    gone.kill9();
    c.wait_host("taken", "silent", |h| h["reachable"] == false)
        .await;

    mover.kill9();
    mover.rename("taken");
    mover.start().await;
    let refusal = wait_for("the refusal", TIMEOUT, async || {
        let log = mover.log();
        let line = log
            .lines()
            .find(|l| l.contains("cannot register") && l.contains("two hosts cannot share a name"))
            .map(str::to_owned);
        line.ok_or(())
    })
    .await;
    assert!(
        refusal.contains("berthctl hosts delete 2") && refusal.contains("this agent is host 1"),
        "{refusal}"
    );
    let hosts = c.hosts().await;
    assert_eq!(hosts.len(), 2, "{hosts:?}");
    assert_eq!(
        hosts[1]["name"], "taken",
        "host 2 keeps its name: {hosts:?}"
    );

    c.admin(Method::DELETE, "/v1/hosts/2", None)
        .await
        .expect(200);
    let renamed = c
        .wait_host("taken", "host 1 under the new name", |h| {
            h["id"] == 1 && h["reachable"] == true
        })
        .await;
    assert_eq!(renamed["instances"], 1, "{renamed}");
    let kept = c.instance(&id_of(&held)).await;
    assert_eq!(kept["allocationId"], held["allocationId"], "{kept}");
    assert_eq!(pid_of(&kept), pid_of(&held), "the same game: {kept}");
    assert_eq!(c.hosts().await.len(), 1);
}

/// An agent whose `state_dir` is wiped while its games run (a reinstall, a corrupt state file
/// moved away) comes back with a new agent token, takes its host over once the old
/// registration has gone silent, and brings its running games with it: the same instances,
/// processes and match, no second set deployed beside them, and the matchmaker's release
/// reaches the game.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_state_was_wiped_keeps_its_host_games_and_matches() {
    let c = ControllerProcess::start_new("ctl-wiped").await;
    c.sample_fleet(7, 456, 2, 0, &[]).await;
    let mut agent = c.spawn_agent("ctl-wiped", "wiped-bm").await;
    let before = c.wait_online(7, 2).await;
    let held = c.allocate_ok(7, "").await;
    wait_game_info(port_of(&held), "allocated", |i| i["allocated"] == true).await;
    let pids: BTreeMap<String, u32> = before.iter().map(|i| (id_of(i), pid_of(i))).collect();

    agent.kill9();
    std::fs::remove_dir_all(agent.state_dir()).expect("wipe the agent's state_dir");
    agent.start().await;
    // At once, though the old registration is not yet silent: the agent answered at the
    // host's own address with its new token, so the old one is not there any more.
    wait_for(
        "the agent with a new token registered",
        TIMEOUT,
        async || {
            (registrations(&agent) == 2)
                .then_some(())
                .ok_or(agent.log())
        },
    )
    .await;
    assert!(
        !agent.log().contains("cannot register"),
        "not refused: {}",
        agent.log()
    );
    assert!(
        c.log()
            .contains("host taken over by an agent with a new token")
    );
    let host = c
        .wait_host("wiped-bm", "its games adopted", |h| {
            h["reachable"] == true && h["instancesByStatus"]["online"] == 1
        })
        .await;
    assert_eq!(host["id"], 1, "{host}");
    assert_eq!(c.hosts().await.len(), 1);
    let listed = c
        .wait_instances("?applicationId=7", "both games", |l| l.len() == 2)
        .await;
    for i in &listed {
        assert_eq!(pids.get(&id_of(i)), Some(&pid_of(i)), "the same game: {i}");
    }
    let kept = c.instance(&id_of(&held)).await;
    assert_eq!(kept["status"], 5, "{kept}");
    assert_eq!(kept["allocationId"], held["allocationId"], "{kept}");
    for id in pids.keys() {
        assert_eq!(count_instance_processes(id), 1, "{id} runs once");
    }
    let deploys = metric(
        &c.metrics().await,
        "berth_controller_reconcile_deploys_total",
        "",
    );
    assert_eq!(
        deploys,
        Some(2.0),
        "no second set: {:?}",
        agent.instances().await
    );

    c.matchmaker(
        Method::POST,
        &format!("/v1/instances/{}/deallocate", id_of(&held)),
        Some(&json!({"allocationId": held["allocationId"]})),
    )
    .await
    .expect(200);
    wait_game_info(port_of(&held), "released", |i| i["allocated"] == false).await;
    let again = c.allocate_when_offered(7, &json!({}), &[]).await;
    assert!(pids.contains_key(&id_of(&again)), "{again}");
}

// ---------------------------------------------------------------------------------------------
// 9. Fleet sizing

async fn wait_agent_count(agent: &AgentProcess, n: usize) -> Vec<Value> {
    wait_for(
        &format!("{} to run {n} instances", agent.config().host_name),
        TIMEOUT,
        async || {
            let list = agent.instances().await;
            if list.len() == n { Ok(list) } else { Err(list) }
        },
    )
    .await
}

/// Waits until the controller has taken in its agents' answers to `n` removals in all (its
/// reconciler counts them as it applies them): from then on a listing reflects every one of
/// them, including any instance such a late answer would wrongly bring back.
async fn wait_removal_answers(c: &ControllerProcess, n: u32) {
    wait_for(
        &format!("{n} removal answers taken in"),
        TIMEOUT,
        async || {
            let text = c.metrics().await;
            let seen = metric(&text, "berth_controller_reconcile_removals_total", "");
            if seen == Some(f64::from(n)) {
                Ok(())
            } else {
                Err(seen)
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_sizing_and_drift_repair() {
    let c = ControllerProcess::start_new("ctl-sizing").await;
    c.sample_fleet(7, 900, 3, 0, &[]).await;
    // Both agents sit behind proxies that hold their answers to removals back for 300 ms: each
    // agent has long reported the removal itself when the controller sees the answer.
    let mut agents = Vec::new();
    let mut proxies = Vec::new();
    for name in ["size-a", "size-b"] {
        let config = AgentConfig::joined(name, &c);
        let proxy = FaultProxy::start(format!("http://127.0.0.1:{}", config.listen_port)).await;
        proxy.delay_removal_answers(Duration::from_millis(300));
        let url = proxy.url();
        proxies.push(proxy);
        agents.push(
            AgentProcess::spawn(&format!("ctl-sizing-{name}"), config.advertise_url(&url)).await,
        );
    }
    let six = c.wait_online(7, 6).await;
    let fleet = |per_host: u32| fleet_body(900, 7, "sample-7", per_host, &[]);
    let mut host_ids = Vec::new();
    for g in &agents {
        let h = c.host_named(&g.config().host_name).await;
        host_ids.push(h["id"].as_u64().expect("host id"));
    }

    // Shrink: idle instances go, one per host stays.
    c.put_fleet(&fleet(1)).await;
    wait_removal_answers(&c, 4).await;
    let two = c
        .wait_instances("?applicationId=7", "one instance per host", |l| {
            l.len() == 2 && host_ids.iter().all(|h| on_host(l, *h).len() == 1)
        })
        .await;
    assert!(
        ids(&two).is_subset(&ids(&six)),
        "shrinking removes, never replaces"
    );
    for g in &agents {
        wait_agent_count(g, 1).await;
    }

    // Drift: an instance removed behind the controller's back is replaced.
    let gone = id_of(&on_host(&two, host_ids[0])[0]);
    agents[0]
        .delete(&format!("/v1/instances/{gone}"))
        .await
        .expect(200);
    let repaired = c
        .wait_instances("?applicationId=7", "a replacement on host A", |l| {
            l.len() == 2
                && !l.iter().any(|i| id_of(i) == gone)
                && on_host(l, host_ids[0]).len() == 1
                && l.iter().all(is_allocatable)
        })
        .await;
    assert_eq!(count_instance_processes(&gone), 0);
    wait_agent_count(&agents[0], 1).await;

    // Shrink to 0 with one allocated: the match keeps its instance until it is released.
    let held = c.allocate_ok(7, "").await;
    let idle = id_of(
        repaired
            .iter()
            .find(|i| id_of(i) != id_of(&held))
            .expect("the other instance"),
    );
    c.put_fleet(&fleet(0)).await;
    wait_removal_answers(&c, 5).await;
    let kept = c
        .wait_instances("?applicationId=7", "only the allocated instance", |l| {
            l.len() == 1 && id_of(&l[0]) == id_of(&held)
        })
        .await;
    assert_eq!(kept[0]["status"], 5, "{}", kept[0]);
    assert_eq!(kept[0]["allocationId"], held["allocationId"]);
    assert_eq!(count_instance_processes(&idle), 0);
    let held_agent = if host_of(&held) == host_ids[0] { 0 } else { 1 };
    wait_agent_count(&agents[1 - held_agent], 0).await;
    let still = agents[held_agent].instance(&id_of(&held)).await;
    assert_eq!(still["status"], 5, "{still}");

    // Released: now it goes too.
    c.matchmaker(
        Method::POST,
        &format!("/v1/instances/{}/deallocate", id_of(&held)),
        Some(&json!({})),
    )
    .await
    .expect(200);
    wait_removal_answers(&c, 6).await;
    c.wait_instances("?applicationId=7", "no instances once released", |l| {
        l.is_empty()
    })
    .await;
    wait_agent_count(&agents[held_agent], 0).await;

    // Grow again, then delete the fleet: its idle instances go away.
    c.put_fleet(&fleet(1)).await;
    c.wait_online(7, 2).await;
    c.admin(Method::DELETE, "/v1/fleets/900", None)
        .await
        .expect(200);
    wait_removal_answers(&c, 8).await;
    c.wait_instances("?applicationId=7", "no instances without a fleet", |l| {
        l.is_empty()
    })
    .await;
    for g in &agents {
        wait_agent_count(g, 0).await;
    }
}

/// The controller comes back on a database that never had the hosts' fleet (the wrong file,
/// a new one, an old backup). It must not take the hosts' games away: their instances are
/// listed, left running and reported in the log, not removed. Once the fleet is created again
/// they are its own (only what is missing is deployed); a fleet deleted here still has its
/// instances removed (see `fleet_sizing_and_drift_repair`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_without_the_fleet_removes_none_of_its_games() {
    let mut c = ControllerProcess::start_new("ctl-nofleet").await;
    c.sample_fleet(7, 901, 2, 0, &[]).await;
    let agent = c.spawn_agent("ctl-nofleet", "nofleet-a").await;
    let before = c.wait_online(7, 2).await;
    let pids: BTreeMap<String, u32> = before.iter().map(|i| (id_of(i), pid_of(i))).collect();

    c.sigterm().await;
    let db = c.database().to_owned();
    for suffix in ["", "-wal", "-shm"] {
        let file = std::path::PathBuf::from(format!("{}{suffix}", db.display()));
        if file.exists() {
            std::fs::rename(&file, format!("{}.old", file.display())).expect("move away");
        }
    }
    c.start().await;
    // The agent registers again with both instances: the reconciler then runs with them.
    let seen = c
        .wait_instances("", "the agent's two instances", |l| l.len() == 2)
        .await;
    assert_eq!(ids(&seen), ids(&before));
    wait_for("the warning about the unknown fleet", TIMEOUT, async || {
        c.log()
            .contains("instances of fleet 901, which this controller's database has never had")
            .then_some(())
    })
    .await;
    let m = c.metrics().await;
    assert_eq!(
        metric(&m, "berth_controller_reconcile_removals_total", ""),
        Some(0.0),
        "nothing removed"
    );
    for g in agent.instances().await {
        assert_eq!(
            pids.get(&id_of(&g)),
            Some(&pid_of(&g)),
            "still running: {g}"
        );
    }

    // The fleet again, with one more per host: the two are its own, so one is deployed (not
    // three beside two unmanaged ones) and none removed.
    c.sample_fleet(7, 901, 3, 0, &[]).await;
    let owned = c.wait_online(7, 3).await;
    assert!(ids(&before).is_subset(&ids(&owned)), "{owned:?}");
    let m = c.metrics().await;
    assert_eq!(
        metric(&m, "berth_controller_reconcile_deploys_total", ""),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "berth_controller_reconcile_removals_total", ""),
        Some(0.0)
    );
    assert_eq!(agent.instances().await.len(), 3);
}

// ---------------------------------------------------------------------------------------------
// 10. Every controller error code

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_controller_error_code() {
    let limited = format!("e2e-limited-{}", short_id());
    let mut config = ControllerConfig::new();
    // A 5 s expiry window: a dead agent is still tried for a while.
    config.heartbeat_expiry_factor = 25.0;
    config.extra_tokens.push(ControllerToken {
        token: limited.clone(),
        role: "matchmaker".to_owned(),
        rate_limit_per_second: Some(3),
    });
    let c = ControllerProcess::spawn("ctl-errors", config).await;
    // Application 1 runs on agent K only; application 2 on agent P, behind a fault proxy.
    c.sample_fleet(1, 11, 3, 0, &[("role", "k")]).await;
    c.sample_fleet(2, 12, 1, 0, &[("role", "p")]).await;
    let mut k = AgentProcess::spawn(
        "ctl-errors-k",
        AgentConfig::joined("errors-k", &c).labels(&[("role", "k")]),
    )
    .await;
    let p_config = AgentConfig::joined("errors-p", &c).labels(&[("role", "p")]);
    let proxy = FaultProxy::start(format!("http://127.0.0.1:{}", p_config.listen_port)).await;
    let _p = AgentProcess::spawn("ctl-errors-p", p_config.advertise_url(&proxy.url())).await;
    let k_instances = c.wait_online(1, 3).await;
    let p_instances = c.wait_online(2, 1).await;

    let get = |path: &str, token: Option<&str>| {
        let path = path.to_owned();
        let token = token.map(str::to_owned);
        let c = &c;
        async move {
            c.call(Method::GET, &path, token.as_deref(), &[], None)
                .await
        }
    };

    // 401 / 403
    get("/v1/instances", None)
        .await
        .assert_error(401, "MISSING_CREDENTIALS", None);
    get("/v1/instances", Some("not-a-token"))
        .await
        .assert_error(403, "INVALID_CREDENTIALS", None);
    let fleet = fleet_body(13, 1, "sample-1", 1, &[]);
    let r = c.matchmaker(Method::POST, "/v1/fleets", Some(&fleet)).await;
    let body = r.assert_error(403, "INVALID_CREDENTIALS", None);
    assert!(details(body).contains("admin"), "{body}");

    // 400 INVALID_REQUEST
    let raw = |path: &str, body: Bytes| {
        let url = format!("{}{path}", c.url());
        let token = c.matchmaker_token().to_owned();
        let http = c.http().clone();
        async move {
            http.try_send_bytes(Method::POST, &url, Some(&token), &[], Some(body))
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        }
    };
    raw(
        "/v1/applications/1/allocate",
        Bytes::from_static(b"{\"filter\": "),
    )
    .await
    .assert_error(400, "INVALID_REQUEST", None);
    let r = c
        .allocate(1, &json!({"metadata": [{"key": "map", "value": 5}]}), &[])
        .await;
    let body = r.assert_error(400, "INVALID_REQUEST", None);
    assert!(
        details(body).contains("metadata[0].value"),
        "names the field: {body}"
    );
    let pairs: Vec<(String, String)> = (0..65).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let many: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let r = c.allocate(1, &json!({"metadata": kv(&many)}), &[]).await;
    let body = r.assert_error(400, "INVALID_REQUEST", None);
    assert!(details(body).contains("metadata"), "{body}");
    let r = c
        .admin(
            Method::POST,
            "/v1/applications",
            Some(&json!({"id": 3, "name": "x", "bogus": 1})),
        )
        .await;
    let body = r.assert_error(400, "INVALID_REQUEST", None);
    assert!(details(body).contains("bogus"), "{body}");

    // 413
    let big = format!("{{\"filter\": \"{}\"}}", "a".repeat((1 << 20) + 16));
    raw("/v1/applications/1/allocate", Bytes::from(big))
        .await
        .assert_error(413, "PAYLOAD_TOO_LARGE", None);

    // 404 RESOURCE_NOT_FOUND
    for path in ["/v1/instances/nope", "/v1/hosts/999", "/v1/no-such-route"] {
        get(path, Some(c.matchmaker_token()))
            .await
            .assert_error(404, "RESOURCE_NOT_FOUND", None);
    }

    // 429 with Retry-After for the token limited to 3 requests per second (a bucket of 3,
    // refilled at 3 per second): of 10 quick requests, the first 3 pass and then about one per
    // 333 ms they take.
    let started = Instant::now();
    let mut answers = Vec::new();
    for _ in 0..10 {
        answers.push(get("/v1/instances", Some(&limited)).await);
    }
    let refilled = (started.elapsed().as_secs_f64() * 3.0).ceil() as usize;
    let statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        admitted >= 3 && admitted <= 3 + refilled && admitted < statuses.len(),
        "a burst of 3, then 3 per second, may pass ({refilled} refilled): {statuses:?}"
    );
    assert_eq!(&statuses[..3], [200, 200, 200], "the burst passes");
    let limited_answers: Vec<&Response> = answers.iter().filter(|r| r.status == 429).collect();
    for r in &limited_answers {
        r.assert_error(429, "RATE_LIMITED", None);
        assert!(
            r.header("retry-after")
                .is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1)),
            "Retry-After: {:?}",
            r.headers
        );
    }
    assert!(answers.iter().all(|r| r.status == 200 || r.status == 429));
    // Other tokens are not affected.
    get("/v1/instances", Some(c.matchmaker_token()))
        .await
        .expect(200);

    // 409 (one of K's three instances; the other two are for the 504 below)
    let key = [("Idempotency-Key", "errors-key")];
    let keyed = c.allocate(1, &json!({}), &key).await.expect(200).json;
    c.allocate(1, &json!({"metadata": kv(&[("a", "b")])}), &key)
        .await
        .assert_error(409, "IDEMPOTENCY_KEY_REUSED", None);
    let p_id = id_of(&p_instances[0]);

    // 500 AGENT_INTERNAL_ERROR (76000): the agent's answer cannot be understood.
    proxy.garbage_allocations(true);
    let r = c.allocate(2, &json!({}), &[]).await;
    let body = r.assert_error(500, "AGENT_INTERNAL_ERROR", Some(76000));
    let attempts = body["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 1, "{body}");
    assert_eq!(attempts[0]["instanceId"], json!(p_id), "{body}");
    assert_eq!(attempts[0]["errorCode"], 76000, "{body}");
    assert_eq!(proxy.garbage_answers(), 1);
    proxy.garbage_allocations(false);
    let p_seen = c.instance(&p_id).await;
    assert_eq!(p_seen["status"], 4, "nothing was allocated: {p_seen}");

    // 504 AGENT_UNREACHABLE (76007): agent K died, its host is still inside its expiry window.
    k.kill9();
    let r = c.allocate(1, &json!({}), &[]).await;
    let body = r.assert_error(504, "AGENT_UNREACHABLE", Some(76007));
    let attempts = body["attempts"].as_array().expect("attempts");
    // One attempt: once K's agent did not answer, K's other idle instance is not worth
    // another call (up to 6 s on a timeout) to the same dead agent.
    assert_eq!(attempts.len(), 1, "only one call to K's dead agent: {body}");
    let mut idle = ids(&k_instances);
    idle.remove(&id_of(&keyed));
    let tried = attempts[0]["instanceId"].as_str().unwrap_or_default();
    assert!(idle.contains(tried), "{body}");
    assert_eq!(attempts[0]["errorCode"], 76007, "{body}");
    assert_eq!(attempts[0]["statusCode"], 504, "{body}");
    // Right after, K is skipped as a whole, and the refusal says why.
    let r = c.allocate(1, &json!({}), &[]).await;
    let body = r.assert_error(404, "NO_ALLOCATABLE_INSTANCE", None);
    assert!(
        details(body).contains("2 on hosts whose agent does not answer the controller's calls"),
        "{body}"
    );
    let k_host = c.host_named("errors-k").await;
    assert_eq!(
        k_host["reachable"], true,
        "still inside the window: {k_host}"
    );
    assert_eq!(k_host["state"], "not_answering", "{k_host}");
}

// ---------------------------------------------------------------------------------------------
// 11. Error stories

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_story_reconstructs_a_failed_allocation() {
    let mut config = ControllerConfig::new();
    config.max_allocation_attempts = Some(2);
    let c = ControllerProcess::spawn("ctl-story", config).await;
    c.sample_fleet(7, 456, 3, 0, &[]).await;
    let agent_config = AgentConfig::joined("story-bm", &c);
    let proxy = FaultProxy::start(format!("http://127.0.0.1:{}", agent_config.listen_port)).await;
    let _agent =
        AgentProcess::spawn("ctl-story-bm", agent_config.advertise_url(&proxy.url())).await;
    let online = c.wait_online(7, 3).await;
    let host = c.host_named("story-bm").await;
    assert_eq!(host["advertiseUrl"], json!(proxy.url()));

    proxy.garbage_allocations(true);
    let identifier = format!("story-{}", short_id());
    let r = c
        .allocate(
            7,
            &json!({"filter": "fleetId=456"}),
            &[("X-Correlation-Id", identifier.as_str())],
        )
        .await;
    let body = r.assert_error(500, "AGENT_INTERNAL_ERROR", Some(76000));
    assert_eq!(
        body["identifier"],
        json!(identifier),
        "the caller's correlation id"
    );
    assert_eq!(
        body["attempts"].as_array().map(Vec::len),
        Some(2),
        "bounded by max_allocation_attempts: {body}"
    );
    assert_eq!(proxy.garbage_answers(), 2);

    let story = c
        .matchmaker(Method::GET, &format!("/v1/errors/{identifier}"), None)
        .await
        .expect(200)
        .json;
    assert_eq!(story["identifier"], json!(identifier), "{story}");
    assert_eq!(story["code"], "AGENT_INTERNAL_ERROR", "{story}");
    assert_eq!(story["errorCode"], 76000, "{story}");
    assert_eq!(story["statusCode"], 500, "{story}");
    assert_eq!(story["method"], "POST", "{story}");
    assert_eq!(story["path"], "/v1/applications/7/allocate", "{story}");
    assert_eq!(story["details"], body["details"], "{story}");
    assert!(!details(&story).is_empty());
    assert!(
        story["decision"].is_object(),
        "the decision is told: {story}"
    );
    assert_eq!(story["decision"]["filter"], "fleetId=456", "{story}");
    let attempts = story["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{story}");
    let mut tried = BTreeSet::new();
    for a in attempts {
        assert!(
            ids(&online).contains(a["instanceId"].as_str().unwrap_or_default()),
            "{a}"
        );
        tried.insert(a["instanceId"].as_str().unwrap_or_default().to_owned());
        assert_eq!(a["hostId"], host["id"], "{a}");
        assert_eq!(a["hostName"], "story-bm", "{a}");
        assert_eq!(a["agentUrl"], json!(proxy.url()), "{a}");
        assert_eq!(a["code"], "AGENT_INTERNAL_ERROR", "{a}");
        assert_eq!(a["errorCode"], 76000, "{a}");
        assert_eq!(a["statusCode"], 500, "{a}");
        assert!(
            a["details"]
                .as_str()
                .is_some_and(|d| d.contains("not an instance")),
            "the agent's answer is described: {a}"
        );
    }
    assert_eq!(tried.len(), 2, "two different candidates: {story}");
    proxy.garbage_allocations(false);

    // A filter error has a story too.
    let r = c.allocate(7, &json!({"filter": "region=1"}), &[]).await;
    let body = r.assert_error(400, "INVALID_FILTER_COLUMN", None).clone();
    let story = wait_for("the filter error's story", TIMEOUT, async || {
        let s = c
            .matchmaker(
                Method::GET,
                &format!(
                    "/v1/errors/{}",
                    body["identifier"].as_str().unwrap_or_default()
                ),
                None,
            )
            .await;
        if s.status == 200 {
            Ok(s.json)
        } else {
            Err(s.text)
        }
    })
    .await;
    assert_eq!(story["code"], "INVALID_FILTER_COLUMN", "{story}");
    assert_eq!(story["details"], body["details"], "{story}");
    assert_eq!(story["statusCode"], 400, "{story}");

    // And a refusal tells how candidates were removed.
    let r = c.allocate(7, &json!({"filter": "isVirtual=1"}), &[]).await;
    let body = r.assert_error(404, "NO_ALLOCATABLE_INSTANCE", None).clone();
    let story = c
        .matchmaker(
            Method::GET,
            &format!(
                "/v1/errors/{}",
                body["identifier"].as_str().unwrap_or_default()
            ),
            None,
        )
        .await
        .expect(200)
        .json;
    assert_eq!(story["decision"]["candidates"], 3, "{story}");
    assert_eq!(story["decision"]["matching"], 0, "{story}");
    assert_eq!(
        story["decision"]["removedByFilter"][0],
        json!({"condition": "isVirtual=1", "removed": 3}),
        "{story}"
    );

    c.matchmaker(Method::GET, "/v1/errors/no-such-identifier", None)
        .await
        .assert_error(404, "RESOURCE_NOT_FOUND", None);
}

// ---------------------------------------------------------------------------------------------
// 12. Probes and metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_and_metrics() {
    let c = ControllerProcess::start_new("ctl-metrics").await;
    c.sample_fleet(7, 456, 2, 0, &[]).await;
    let _agent = c.spawn_agent("ctl-metrics", "metrics-bm").await;
    c.wait_online(7, 2).await;

    for probe in ["/healthz", "/readyz"] {
        let r = c
            .call(Method::GET, probe, None, &[], None)
            .await
            .expect(200);
        assert!(r.json["status"].is_string(), "{}", r.text);
    }
    c.call(Method::GET, "/metrics", None, &[], None)
        .await
        .assert_error(401, "MISSING_CREDENTIALS", None);

    let ok = "result=\"ok\"";
    let (online, allocated) = ("status=\"online\"", "status=\"allocated\"");
    let allocations = "berth_controller_allocations_total";
    let instances = "berth_controller_instances";
    let text = c.metrics().await;
    let before = metric(&text, allocations, ok).unwrap_or(0.0);
    assert_metrics(
        &text,
        &[
            (instances, online, 2.0),
            (instances, allocated, 0.0),
            ("berth_controller_hosts", "state=\"ready\"", 1.0),
        ],
    );

    // The database writer's figures: the allocation's row was committed before the answer.
    let (writes, commits) = (
        "berth_controller_store_writes_total",
        "berth_controller_store_commit_duration_seconds_count",
    );
    let writes_before = metric(&text, writes, "").expect("store_writes is exported");
    let commits_before = metric(&text, commits, "").expect("commit durations are exported");
    c.allocate_ok(7, "").await;
    let text = c.metrics().await;
    assert_metrics(
        &text,
        &[
            (allocations, ok, before + 1.0),
            (instances, online, 1.0),
            (instances, allocated, 1.0),
        ],
    );
    let more = |name: &str, than: f64| metric(&text, name, "").is_some_and(|v| v > than);
    assert!(
        more(writes, writes_before),
        "{writes} did not grow:\n{text}"
    );
    assert!(
        more(commits, commits_before),
        "{commits} did not grow:\n{text}"
    );

    c.allocate_ok(7, "").await;
    c.allocate(7, &json!({}), &[])
        .await
        .assert_error(404, "NO_ALLOCATABLE_INSTANCE", None);
    assert_metrics(
        &c.metrics().await,
        &[
            (allocations, ok, before + 2.0),
            (allocations, "result=\"NO_ALLOCATABLE_INSTANCE\"", 1.0),
            (instances, allocated, 2.0),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// 13. Builds

/// Builds are the versions profiles launch: once an application has builds, a profile must
/// name one, and a build in use cannot be deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_are_what_profiles_launch() {
    let c = ControllerProcess::start_new("ctl-builds").await;
    c.create_application(9, "builds").await;
    let build = json!({
        "id": "builds-1.0.0", "applicationId": 9, "version": "1.0.0",
        "executable": "/opt/game/server", "sha256": "ab".repeat(32),
    });
    c.admin(Method::POST, "/v1/builds", Some(&build))
        .await
        .expect(201);
    let listed = c
        .admin(Method::GET, "/v1/builds", None)
        .await
        .expect(200)
        .json;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    // A second build with the same version, and a malformed digest, are refused.
    let mut dup = build.clone();
    dup["id"] = json!("builds-again");
    c.admin(Method::POST, "/v1/builds", Some(&dup))
        .await
        .assert_error(400, "INVALID_REQUEST", None);
    let mut bad = build.clone();
    bad["id"] = json!("builds-bad");
    bad["version"] = json!("2.0.0");
    bad["sha256"] = json!("not-a-digest");
    let r = c.admin(Method::POST, "/v1/builds", Some(&bad)).await;
    assert!(details(r.assert_error(400, "INVALID_REQUEST", None)).contains("sha256"));

    // A profile naming a version that is not a build of its application.
    let mut profile = berth_e2e::sample_game_profile("builds-p", 9, 0, 0);
    profile["build"] = json!("9.9.9");
    let r = c.admin(Method::POST, "/v1/profiles", Some(&profile)).await;
    let body = r.assert_error(400, "INVALID_REQUEST", None);
    assert!(
        details(body).contains("1.0.0"),
        "the known builds are listed: {body}"
    );
    profile["build"] = json!("1.0.0");
    c.create_profile(&profile).await;

    // In use: not deletable until the profile goes.
    c.admin(Method::DELETE, "/v1/builds/builds-1.0.0", None)
        .await
        .assert_error(400, "INVALID_REQUEST", None);
    c.admin(Method::DELETE, "/v1/profiles/builds-p", None)
        .await
        .expect(200);
    c.admin(Method::DELETE, "/v1/builds/builds-1.0.0", None)
        .await
        .expect(200);
    c.admin(Method::GET, "/v1/builds/builds-1.0.0", None)
        .await
        .assert_error(404, "RESOURCE_NOT_FOUND", None);
    // Builds are an admin resource; a matchmaker may read them.
    c.matchmaker(Method::POST, "/v1/builds", Some(&build))
        .await
        .assert_error(403, "INVALID_CREDENTIALS", None);
    c.matchmaker(Method::GET, "/v1/builds", None)
        .await
        .expect(200);
}
