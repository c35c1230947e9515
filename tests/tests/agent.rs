//! End-to-end tests of `berth-agent`: the real agent binary supervising real
//! `berth-sample-game` and `berth-bad-game` processes on loopback, driven through its HTTP API
//! and observed through the API, the games' `INFO` answers, the state file and /proc.
//!
//! Every test has its own agent(s), directory and ports, so tests run in parallel. Nothing
//! sleeps for a fixed time: every wait polls for the state it needs, with a failure timeout.

use std::time::{Duration, Instant};

use berth_e2e::json::{kv, pid_of, port_of};
use berth_e2e::{
    AgentConfig, AgentProcess, TIMEOUT, TestDir, assert_second_daemon_refused, bad_game_profile,
    berth_command, bin, children_of, count_instance_processes, deploy_body, free_port, game_info,
    pid_alive, sample_game_profile, short_id, signal, silent_game_profile, wait_for,
    wait_game_info,
};
use berth_protocol::arcus::MAX_BURST;
use http::Method;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// The `fields` of the agent's JSON log records with this message about instance `id` (its
/// log is a file, so the agent writes JSON lines).
fn log_records(agent: &AgentProcess, message: &str, id: &str) -> Vec<Value> {
    agent
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|r| r["fields"].clone())
        .filter(|f| f["message"] == message && f["instance_id"] == id)
        .collect()
}

/// Allocates instance `id` on the agent with `metadata` and `allocation_id`, and waits until the
/// game has confirmed it (status 5) and the agent has it on disk.
async fn allocate_confirmed(agent: &AgentProcess, id: &str, metadata: &Value, allocation_id: &str) {
    agent
        .post(
            &format!("/v1/instances/{id}/allocate"),
            &json!({"metadata": metadata, "allocationId": allocation_id}),
        )
        .await
        .expect(200);
    agent.wait_allocation_persisted(id).await;
}

/// A unique instance id (instance ids also find game processes in /proc, across parallel
/// tests).
fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", short_id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_game_goes_setup_starting_online() {
    let agent = AgentProcess::start_new("setup-starting-online").await;
    let id = new_id("a");

    let deployed = agent.deploy_sample(&id, 300, 0).await;
    assert_eq!(deployed["id"], json!(id));
    assert_eq!(deployed["status"], 1, "deploy answers in setup: {deployed}");
    assert_eq!(deployed["state"], "created", "{deployed}");

    // The game reports 3 for its 300 ms startup delay: long enough to be seen by polling.
    let starting = agent
        .wait_instance(&id, "status 3 (starting)", |i| i["status"] == 3)
        .await;
    assert_eq!(starting["state"], "running", "{starting}");
    let game_pid = pid_of(&starting);
    assert!(pid_alive(game_pid));

    let online = agent.wait_online(&id).await;
    assert_eq!(pid_of(&online), game_pid, "the same process went online");
    assert_eq!(online["restarts"], 0);
    assert_eq!(
        online["liveMap"], "sample",
        "the game's live state: {online}"
    );

    let listed = agent.instances().await;
    let mine: Vec<_> = listed.iter().filter(|i| i["id"] == json!(id)).collect();
    assert_eq!(mine.len(), 1, "GET /v1/instances lists it once: {listed:?}");
    assert_eq!(mine[0]["status"], 4);

    let log_file = agent.game_log_path(&id);
    assert!(log_file.is_file(), "{} is missing", log_file.display());
    let logs = agent
        .get(&format!("/v1/instances/{id}/logs?tail=10"))
        .await
        .expect(200);
    assert!(
        logs.text
            .contains(&format!("berth-sample-game {id} listening")),
        "the game's listening line is in its log: {:?}",
        logs.text
    );
    assert_eq!(count_instance_processes(&id), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_metadata_reaches_the_game() {
    let agent = AgentProcess::start_new("allocation-metadata").await;
    let id = new_id("b");
    agent.deploy_sample(&id, 0, 0).await;
    let online = agent.wait_online(&id).await;
    let game_port = port_of(&online);

    let metadata = kv(&[("map", "dust"), ("players", "16")]);
    let allocated = agent
        .post(
            &format!("/v1/instances/{id}/allocate"),
            &json!({"metadata": metadata, "allocationId": "alloc-b-1"}),
        )
        .await
        .expect(200)
        .json;
    assert_eq!(allocated["status"], 5, "{allocated}");
    assert!(allocated["allocatedAt"].is_u64(), "{allocated}");
    assert_eq!(allocated["metadata"], metadata);
    assert_eq!(allocated["allocationId"], "alloc-b-1");

    let info = wait_game_info(game_port, "allocated", |i| i["allocated"] == true).await;
    assert_eq!(info["instanceId"], json!(id), "the right process answered");
    assert_eq!(info["allocation"], metadata, "{info}");
    assert_eq!(
        info["hostInformation"]["serverName"],
        json!(agent.config().host_name),
        "{info}"
    );
    assert_eq!(info["hostInformation"]["region"], "eu-west-1", "{info}");
    assert_eq!(
        info["instanceInformation"]["instanceId"],
        json!(id),
        "{info}"
    );
    assert_eq!(info["instanceInformation"]["applicationId"], 7, "{info}");

    // Once the game's own status 5 has reached the agent, releasing it cannot race it.
    agent.wait_allocation_persisted(&id).await;
    let released = agent
        .post(&format!("/v1/instances/{id}/deallocate"), &json!({}))
        .await
        .expect(200)
        .json;
    assert_eq!(released["status"], 4, "{released}");
    assert!(released["allocatedAt"].is_null(), "{released}");
    let info = wait_game_info(game_port, "released by the agent's \"deallocated\"", |i| {
        i["allocated"] == false
    })
    .await;
    assert_eq!(info["allocation"], json!([]), "{info}");
    agent.wait_online(&id).await;

    let pushed = kv(&[("motd", "welcome")]);
    let r = agent
        .post(
            &format!("/v1/instances/{id}/metadata"),
            &json!({"metadata": pushed}),
        )
        .await
        .expect(200);
    assert_eq!(r.json["metadata"], pushed, "{}", r.text);
    wait_game_info(game_port, "the pushed metadata", |i| {
        i["metadata"]
            .as_array()
            .is_some_and(|m| m.contains(&pushed[0]))
    })
    .await;

    agent
        .post(
            &format!("/v1/instances/{id}/command"),
            &json!({"command": "say", "argument": "hello"}),
        )
        .await
        .expect(200);
    // The game survived the command and still answers.
    let info = game_info(game_port).await.expect("INFO after the command");
    assert_eq!(info["instanceId"], json!(id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_error_code_on_purpose() {
    let agent = AgentProcess::start_new("error-codes").await;
    let ok = new_id("c-ok");
    let starting = new_id("c-starting");
    let confirm = new_id("c-confirm");
    agent.deploy_sample(&ok, 0, 0).await;
    agent.deploy_sample(&starting, 60_000, 0).await;
    let count_file = agent.dir().join("never-confirm.count");
    agent
        .deploy(&json!({
            "id": confirm,
            "managementProtocol": "arcus",
            "confirmAllocation": true,
            "profile": bad_game_profile("never-confirm", 8, "never-confirm", &count_file),
        }))
        .await;
    let http = agent.http().clone();
    let url = |path: &str| format!("{}{path}", agent.url());
    let allocate = |id: &str| format!("/v1/instances/{id}/allocate");

    // 76001, and 401 without any token.
    let r = http
        .send(
            Method::GET,
            &url("/v1/instances"),
            Some("not-the-agent-token-0000"),
            &[],
            None,
        )
        .await;
    r.assert_error(403, "AGENT_UNAUTHENTICATED", Some(76001));
    let r = http
        .send(Method::GET, &url("/v1/instances"), None, &[], None)
        .await;
    r.assert_error(401, "MISSING_CREDENTIALS", None);

    // 76003, once with the caller's correlation id and once with one the agent makes up.
    let path = allocate("no-such-instance");
    let r = http
        .send(
            Method::POST,
            &url(&path),
            Some(agent.token()),
            &[("X-Correlation-Id", "test-abc-1")],
            Some(&json!({})),
        )
        .await;
    r.assert_error(404, "INSTANCE_NOT_ON_HOST", Some(76003));
    assert_eq!(r.json["identifier"], "test-abc-1");
    let r1 = agent.post(&path, &json!({})).await;
    let r2 = agent.post(&path, &json!({})).await;
    r1.assert_error(404, "INSTANCE_NOT_ON_HOST", Some(76003));
    r2.assert_error(404, "INSTANCE_NOT_ON_HOST", Some(76003));
    assert_ne!(
        r1.json["identifier"], r2.json["identifier"],
        "every request gets its own identifier"
    );
    assert!(
        r1.json["details"]
            .as_str()
            .is_some_and(|d| d.contains("no-such-instance")),
        "details name the instance: {}",
        r1.text
    );

    // 76004: the game is up and linked but still in its startup delay.
    agent
        .wait_instance(&starting, "status 3 with the Arcus link up", |i| {
            i["status"] == 3 && i["arcusConnected"] == true
        })
        .await;
    agent
        .post(&allocate(&starting), &json!({}))
        .await
        .assert_error(404, "INSTANCE_NOT_ALLOCATABLE", Some(76004));

    // 76006
    agent.wait_online(&ok).await;
    agent.post(&allocate(&ok), &json!({})).await.expect(200);
    let r = agent.post(&allocate(&ok), &json!({})).await;
    r.assert_error(422, "INSTANCE_ALREADY_ALLOCATED", Some(76006));

    // 76005 while a confirmAllocation allocation waits for a game that never confirms, then
    // 76007 for that allocation itself.
    agent.wait_online(&confirm).await;
    let first = tokio::spawn({
        let (http, url, token) = (
            http.clone(),
            url(&allocate(&confirm)),
            agent.token().to_owned(),
        );
        async move {
            let started = Instant::now();
            let body = json!({"metadata": kv(&[("map", "nuke")]), "timeoutMs": 3000});
            let r = http
                .send(Method::POST, &url, Some(&token), &[], Some(&body))
                .await;
            (r, started.elapsed())
        }
    });
    agent
        .wait_instance(&confirm, "status 6 (allocating)", |i| i["status"] == 6)
        .await;
    let r = agent.post(&allocate(&confirm), &json!({})).await;
    r.assert_error(422, "INSTANCE_ALLOCATING", Some(76005));
    let (r, took) = first.await.expect("the first allocation task");
    r.assert_error(422, "ALLOCATION_TIMED_OUT", Some(76007));
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_millis(4900),
        "the agent waited for the requested 3000 ms, not its 5 s default: {took:?}"
    );
    let back = agent
        .wait_instance(&confirm, "online again after the timeout", |i| {
            i["status"] == 4
        })
        .await;
    assert!(back["allocatedAt"].is_null(), "{back}");
    assert_eq!(
        back["metadata"],
        json!([]),
        "no trace of the allocation that never happened: {back}"
    );

    // 76002: a host whose game port range holds one port cannot take a second game.
    let mut config = AgentConfig::new("error-codes-one-port");
    let only = *config.game_ports.start();
    config.game_ports = only..=only;
    let small = AgentProcess::spawn("error-codes-one-port", config).await;
    let first = small.deploy_sample(&new_id("c-one"), 0, 0).await;
    assert_eq!(first["port"], only);
    let r = small
        .post(
            "/v1/instances",
            &deploy_body(&new_id("c-two"), sample_game_profile("sample-1.0", 7, 0, 0)),
        )
        .await;
    r.assert_error(422, "AGENT_SERVER_ERROR", Some(76002));
    assert!(
        r.json["details"]
            .as_str()
            .is_some_and(|d| d.contains("game_ports")),
        "details name the exhausted range: {}",
        r.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_game_is_restarted() {
    let agent = AgentProcess::start_new("crash-restart").await;
    let id = new_id("d");
    agent.deploy_sample(&id, 0, 0).await;
    let before = agent.wait_online(&id).await;
    let old_pid = pid_of(&before);

    signal(old_pid, Signal::SIGKILL).expect("SIGKILL the game");
    // The first restart comes 250 ms after the exit, so the offline instance is normally
    // seen; the restart itself is what must happen.
    let mut offline = None;
    let after = wait_for("the game restarted and online", TIMEOUT, async || {
        let i = agent.instance(&id).await;
        if i["status"] == 2 {
            offline = Some(i.clone());
        }
        if i["pid"].is_u64()
            && pid_of(&i) != old_pid
            && i["status"] == 4
            && i["arcusConnected"] == true
        {
            Ok(i)
        } else {
            Err(i)
        }
    })
    .await;
    if let Some(o) = &offline {
        assert_eq!(o["exitSignal"], 9, "the kill is recorded: {o}");
        assert_eq!(o["state"], "restarting", "waiting out the backoff: {o}");
        assert!(o["pid"].is_null(), "{o}");
    }
    // Whether or not polling caught the offline instance, the agent logged the exit (with the
    // signal) and the restart it scheduled.
    let exits = log_records(&agent, "game exited", &id);
    assert!(
        exits.iter().any(|r| r["exit"] == "Signal(9)"
            && r["pid"]
                .as_str()
                .is_some_and(|p| p.contains(&old_pid.to_string()))),
        "no \"game exited\" record with pid {old_pid} and Signal(9) for {id}: {exits:?}\n{}",
        agent.log()
    );
    assert!(
        !log_records(&agent, "restart scheduled", &id).is_empty(),
        "no \"restart scheduled\" record for {id}:\n{}",
        agent.log()
    );
    assert_eq!(after["restarts"], 1, "{after}");
    assert!(!pid_alive(old_pid));
    assert!(pid_alive(pid_of(&after)));
    assert_eq!(count_instance_processes(&id), 1);
    let info = game_info(port_of(&after))
        .await
        .expect("the new game answers");
    assert_eq!(info["instanceId"], json!(id));
}

/// An allocation is on disk when it is answered: killed right after the answer, before the
/// coalesced snapshot, the agent still has it at restart (from its journal), with its id and
/// metadata, and does not release it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_answered_then_agent_killed_at_once_survives() {
    let mut agent = AgentProcess::start_new("kill-after-answer").await;
    let id = new_id("j");
    agent.deploy_sample(&id, 0, 0).await;
    let pid = pid_of(&agent.wait_online(&id).await);
    agent.wait_pids_persisted(&[id.as_str()]).await;
    let metadata = kv(&[("match", "journal"), ("players", "4")]);
    agent
        .post(
            &format!("/v1/instances/{id}/allocate"),
            &json!({"metadata": metadata, "allocationId": "alloc-j"}),
        )
        .await
        .expect(200);
    agent.kill9();
    let in_snapshot = agent
        .persisted_instance(&id)
        .is_some_and(|i| i["allocation"]["id"] == "alloc-j");
    if in_snapshot {
        // Only on a machine so slow that the snapshot (100 ms later) beat the kill.
        eprintln!("the snapshot already held the allocation: the journal was not needed");
    }
    agent.start().await;
    let i = agent
        .wait_instance(&id, "allocated (5) with the Arcus link up", |i| {
            i["status"] == 5 && i["arcusConnected"] == true
        })
        .await;
    assert_eq!(pid_of(&i), pid, "re-adopted, not restarted: {i}");
    assert_eq!(i["allocationId"], "alloc-j", "{i}");
    assert_eq!(i["metadata"], metadata, "{i}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_three_times_readopts_games() {
    let mut agent = AgentProcess::start_new("sigkill-readopt").await;
    let ids: Vec<String> = (0..4).map(|n| new_id(&format!("e{n}"))).collect();
    for id in &ids {
        agent.deploy_sample(id, 0, 0).await;
    }
    let mut pids = Vec::new();
    let mut ports = Vec::new();
    for id in &ids {
        let i = agent.wait_online(id).await;
        pids.push(pid_of(&i));
        ports.push(port_of(&i));
    }
    let metadata: Vec<Value> = (0..2)
        .map(|n| kv(&[("match", &format!("m{n}")), ("players", "8")]))
        .collect();
    for n in 0..2 {
        allocate_confirmed(&agent, &ids[n], &metadata[n], &format!("alloc-{n}")).await;
    }
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    agent.wait_pids_persisted(&id_refs).await;

    for round in 1..=3 {
        agent.kill9();
        for (id, p) in ids.iter().zip(&pids) {
            assert!(
                pid_alive(*p),
                "round {round}: game {id} died with the agent"
            );
        }
        agent.start().await;
        for (n, id) in ids.iter().enumerate() {
            let i = if n < 2 {
                agent
                    .wait_instance(id, "allocated (5) with the Arcus link up", |i| {
                        i["status"] == 5 && i["arcusConnected"] == true
                    })
                    .await
            } else {
                agent.wait_online(id).await
            };
            assert_eq!(
                pid_of(&i),
                pids[n],
                "round {round}: {id} re-adopted, not restarted"
            );
            assert_eq!(i["restarts"], 0, "round {round}: {i}");
            if n < 2 {
                assert_eq!(i["metadata"], metadata[n], "round {round}: {i}");
                assert_eq!(i["allocationId"], json!(format!("alloc-{n}")), "{i}");
                assert!(i["allocatedAt"].is_u64(), "{i}");
            }
            assert_eq!(
                count_instance_processes(id),
                1,
                "round {round}: exactly one process runs {id}"
            );
            let info = game_info(ports[n]).await.expect("INFO");
            assert_eq!(info["instanceId"], json!(id));
            assert_eq!(info["allocated"], json!(n < 2), "round {round}: {info}");
        }
    }

    // The agent still works after all that.
    agent
        .post(&format!("/v1/instances/{}/deallocate", ids[0]), &json!({}))
        .await
        .expect(200);
    wait_game_info(ports[0], "released", |i| i["allocated"] == false).await;
    agent.wait_online(&ids[0]).await;
    let fresh = kv(&[("match", "m2")]);
    let r = agent
        .post(
            &format!("/v1/instances/{}/allocate", ids[2]),
            &json!({"metadata": fresh}),
        )
        .await
        .expect(200);
    assert_eq!(r.json["status"], 5);
    let info = wait_game_info(ports[2], "allocated", |i| i["allocated"] == true).await;
    assert_eq!(info["allocation"], fresh);
    for (id, p) in ids.iter().zip(&pids) {
        assert_eq!(pid_of(&agent.instance(id).await), *p);
    }
}

/// An agent whose state is lost while its games run (its `state_dir` wiped or replaced, a
/// corrupt state file moved away) finds them by the record in their environment and adopts
/// them: the same processes and ports, no second set; a match in progress stays allocated
/// (learned from the game) and a release naming the allocation's id, which the controller
/// still holds, reaches the game; an idle game is offered again. Another agent's games on the
/// same machine are left to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_state_was_lost_adopts_its_running_games() {
    let mut agent = AgentProcess::start_new("lost-state").await;
    let (busy, idle) = (new_id("l-busy"), new_id("l-idle"));
    for id in [&busy, &idle] {
        agent.deploy_sample(id, 0, 0).await;
    }
    let busy_before = agent.wait_online(&busy).await;
    let idle_before = agent.wait_online(&idle).await;
    allocate_confirmed(&agent, &busy, &kv(&[("map", "dust")]), "match-1").await;
    let other = AgentProcess::start_new("lost-state-other").await;
    let theirs = new_id("l-theirs");
    other.deploy_sample(&theirs, 0, 0).await;
    let theirs_pid = pid_of(&other.wait_online(&theirs).await);

    agent.kill9();
    std::fs::remove_dir_all(agent.state_dir()).expect("wipe the agent's state_dir");
    agent.start().await;
    let b = agent
        .wait_instance(&busy, "adopted in its match", |i| {
            i["status"] == 5 && i["arcusConnected"] == true
        })
        .await;
    assert_eq!(pid_of(&b), pid_of(&busy_before), "the same process: {b}");
    assert_eq!(port_of(&b), port_of(&busy_before), "{b}");
    assert_eq!(b["fleetId"], busy_before["fleetId"], "{b}");
    assert_eq!(b["profileId"], busy_before["profileId"], "{b}");
    assert!(b["allocationId"].is_null(), "learned from the game: {b}");
    let i = agent.wait_online(&idle).await;
    assert_eq!(pid_of(&i), pid_of(&idle_before), "the same process: {i}");
    let listed = agent.get("/v1/instances").await.expect(200).json;
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(2),
        "its two games, not the other agent's: {listed}"
    );
    for id in [&busy, &idle, &theirs] {
        assert_eq!(count_instance_processes(id), 1, "{id} runs once");
    }
    assert_eq!(
        log_records(
            &agent,
            "adopted a running game this agent had no record of (its state was lost); a match it runs is learned from the game",
            &busy
        )
        .len(),
        1
    );

    let allocate = async |id: &str| {
        agent
            .post(&format!("/v1/instances/{id}/allocate"), &json!({}))
            .await
    };
    allocate(&busy)
        .await
        .assert_error(422, "INSTANCE_ALREADY_ALLOCATED", Some(76006));
    allocate(&idle).await.expect(200);
    agent
        .post(
            &format!("/v1/instances/{busy}/deallocate"),
            &json!({"allocationId": "match-1"}),
        )
        .await
        .expect(200);
    wait_game_info(port_of(&b), "released", |i| i["allocated"] == false).await;
    agent.wait_online(&busy).await;

    // Now in the new state: a plain restart re-adopts them as ever.
    agent.kill9();
    agent.start().await;
    let again = agent.wait_online(&busy).await;
    assert_eq!(pid_of(&again), pid_of(&busy_before), "{again}");
    let theirs_now = other.wait_online(&theirs).await;
    assert_eq!(pid_of(&theirs_now), theirs_pid, "{theirs_now}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn game_dying_while_agent_down_is_restarted() {
    let mut agent = AgentProcess::start_new("died-while-down").await;
    let id = new_id("f");
    agent.deploy_sample(&id, 0, 0).await;
    let before = agent.wait_online(&id).await;
    let old_pid = pid_of(&before);
    // The match dies with the game: the restarted game must come back free.
    allocate_confirmed(&agent, &id, &kv(&[("map", "inferno")]), "alloc-f").await;
    agent.wait_pids_persisted(&[&id]).await;

    agent.kill9();
    signal(old_pid, Signal::SIGKILL).expect("SIGKILL the game");
    wait_for("the game to be gone", TIMEOUT, async || {
        (!pid_alive(old_pid)).then_some(())
    })
    .await;
    agent.start().await;

    let after = agent
        .wait_instance(&id, "restarted with a new pid, online", |i| {
            i["pid"].as_u64().is_some_and(|p| p != u64::from(old_pid))
                && i["status"] == 4
                && i["arcusConnected"] == true
        })
        .await;
    assert_eq!(after["restarts"], 1, "the restart is reported: {after}");
    assert_eq!(after["autoRestart"], true);
    assert!(after["allocationId"].is_null(), "{after}");
    assert!(after["allocatedAt"].is_null(), "{after}");
    assert_eq!(
        after["metadata"],
        json!([]),
        "the old match's metadata is gone: {after}"
    );
    assert_eq!(count_instance_processes(&id), 1);
    let info = game_info(port_of(&after)).await.expect("INFO");
    assert_eq!(info["instanceId"], json!(id));
}

/// A game that ends its match while its agent is down tells the restarted agent so (it sends
/// its status on every new link): the instance is free again, with the same process, and takes
/// the next match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_ended_while_agent_down_is_free_after_the_restart() {
    let mut agent = AgentProcess::start_new("ended-while-down").await;
    let id = new_id("g");
    // 1 s matches.
    agent.deploy_sample(&id, 0, 1).await;
    let before = agent.wait_online(&id).await;
    let (pid, port) = (pid_of(&before), port_of(&before));
    agent.wait_pids_persisted(&[&id]).await;
    allocate_confirmed(&agent, &id, &kv(&[("map", "mirage")]), "alloc-g").await;

    agent.kill9();
    wait_game_info(port, "the match over, with no agent to tell", |i| {
        i["allocated"] == false && i["status"] == 4
    })
    .await;
    agent.start().await;

    let after = agent
        .wait_instance(&id, "free again (4, no allocation), link up", |i| {
            i["status"] == 4 && i["allocationId"].is_null() && i["arcusConnected"] == true
        })
        .await;
    assert_eq!(pid_of(&after), pid, "re-adopted, not restarted: {after}");
    assert_eq!(after["restarts"], 0, "{after}");
    assert!(after["allocatedAt"].is_null(), "{after}");
    let r = agent
        .post(
            &format!("/v1/instances/{id}/allocate"),
            &json!({"metadata": kv(&[("map", "nuke")]), "allocationId": "alloc-g2"}),
        )
        .await
        .expect(200);
    assert_eq!(r.json["status"], 5, "{}", r.json);
    let info = wait_game_info(port, "the next match", |i| i["allocated"] == true).await;
    assert_eq!(info["allocation"], kv(&[("map", "nuke")]), "{info}");
    assert_eq!(info["allocationsReceived"], 2, "{info}");
    assert_eq!(info["allocatedDuringMatch"], 0, "{info}");
}

/// The agent is killed right after it answered deploys and started their games, before its
/// state file holds them. The restarted agent knows every instance (each was journaled before
/// its game could start) and takes back each game, found by its instance id (its pid never
/// recorded): one game per instance, none restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_right_after_deploying_neither_orphans_nor_duplicates_games() {
    let mut agent = AgentProcess::start_new("killed-after-deploy").await;
    let ids: Vec<String> = (0..4).map(|n| new_id(&format!("d{n}"))).collect();
    for id in &ids {
        agent.deploy_sample(id, 0, 0).await;
    }
    // Killed once the games run, most likely before the state file (written up to 100 ms
    // after a change) has their pids; if it has them, the restart is an ordinary one.
    wait_for("the games started", TIMEOUT, async || {
        ids.iter()
            .all(|id| count_instance_processes(id) == 1)
            .then_some(())
    })
    .await;
    agent.kill9();
    agent.start().await;
    for id in &ids {
        let view = agent.wait_online(id).await;
        assert_eq!(view["restarts"], 0, "{view}");
        assert_eq!(count_instance_processes(id), 1, "one game for {id}: {view}");
    }
}

/// The agent is killed right after it answered removals, before its state file holds them.
/// The restarted agent starts none of those games again: the sample games, which left at the
/// soft stop, are gone with their instances, and a game that ignores the soft stop (it never
/// reads a frame) is still stopped, by SIGTERM once its grace (2 s) is over, although the
/// agent that set that timer is dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_right_after_removing_starts_none_of_those_games_again() {
    let mut agent = AgentProcess::start_new("killed-after-remove").await;
    let samples: Vec<String> = (0..3).map(|n| new_id(&format!("r{n}"))).collect();
    for id in &samples {
        agent.deploy_sample(id, 0, 0).await;
    }
    let deaf = new_id("r-deaf");
    let (mut profile, _) = silent_game_profile("bad-deaf", 9, agent.dir().path());
    profile["stopTimeoutSeconds"] = json!(2);
    agent.deploy(&deploy_body(&deaf, profile)).await;
    let ids: Vec<&str> = samples
        .iter()
        .map(String::as_str)
        .chain([deaf.as_str()])
        .collect();
    for id in &ids {
        agent.wait_online(id).await;
    }
    agent.wait_pids_persisted(&ids).await;

    for id in &ids {
        agent
            .delete(&format!("/v1/instances/{id}"))
            .await
            .expect(200);
    }
    // Killed at once: the state file is written up to 100 ms after a change.
    agent.kill9();
    // The restarted agent sets the grace while it starts, so after this.
    let restarting = Instant::now();
    agent.start().await;

    wait_for("every removed instance to be gone", TIMEOUT, async || {
        let listed = agent.instances().await;
        let left: Vec<&Value> = listed
            .iter()
            .filter(|i| i["id"].as_str().is_some_and(|id| ids.contains(&id)))
            .collect();
        for i in &left {
            assert_eq!(
                i["state"], "shuttingdown",
                "a removed instance came back after the restart: {i}"
            );
        }
        left.is_empty().then_some(())
    })
    .await;
    assert!(
        restarting.elapsed() >= Duration::from_secs(2),
        "the deaf game keeps its whole grace"
    );
    for id in &ids {
        assert_eq!(count_instance_processes(id), 0, "no game left for {id}");
    }
}

/// The agent's spawner (`berth-agent spawner`, its child).
fn spawner_of(agent: &AgentProcess) -> Option<u32> {
    children_of(agent.pid()?).into_iter().find(|&pid| {
        berth_e2e::cmdline(pid).is_some_and(|args| args.get(1).is_some_and(|a| a == "spawner"))
    })
}

/// What `/proc/<pid>/fd/*` point at.
fn descriptors(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|t| t.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The spawner (the agent's helper that forks games) is killed. The games keep running, the
/// agent notices and starts a new spawner, a game killed afterwards is seen to exit and is
/// restarted, and a new instance starts. No game holds the spawner's socket: games that
/// inherited it kept it open, so the agent never saw the spawner die, their exits went
/// unseen (a dead game stayed "running") and spawns were never answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_spawner_is_replaced_and_no_game_exit_goes_unseen() {
    let agent = AgentProcess::start_new("spawner-killed").await;
    let ids: Vec<String> = (0..2).map(|n| new_id(&format!("s{n}"))).collect();
    for id in &ids {
        agent.deploy_sample(id, 0, 0).await;
    }
    let mut pids = Vec::new();
    for id in &ids {
        pids.push(pid_of(&agent.wait_online(id).await));
    }
    let spawner = spawner_of(&agent).expect("the agent runs a spawner");
    let socket = std::fs::read_link(format!("/proc/{spawner}/fd/3"))
        .expect("the spawner's socket")
        .display()
        .to_string();
    for &pid in &pids {
        let held = descriptors(pid);
        assert!(
            !held.contains(&socket),
            "game {pid} holds the spawner's socket {socket}: {held:?}"
        );
    }

    signal(spawner, Signal::SIGKILL).expect("SIGKILL the spawner");
    wait_for("a new spawner", TIMEOUT, async || {
        spawner_of(&agent).filter(|&p| p != spawner).map(|_| ())
    })
    .await;
    for &pid in &pids {
        assert!(pid_alive(pid), "game {pid} keeps running");
    }

    signal(pids[0], Signal::SIGKILL).expect("SIGKILL a game");
    let restarted = agent
        .wait_instance(&ids[0], "restarted with a new pid, online", |i| {
            i["pid"].as_u64().is_some_and(|p| p != u64::from(pids[0])) && i["status"] == 4
        })
        .await;
    assert_eq!(restarted["restarts"], 1, "{restarted}");
    assert_eq!(count_instance_processes(&ids[0]), 1);
    let other = agent.instance(&ids[1]).await;
    assert_eq!(pid_of(&other), pids[1], "{other}");

    let late = new_id("s-late");
    agent.deploy_sample(&late, 0, 0).await;
    agent.wait_online(&late).await;
}

/// Waits until instance `id` runs a process other than `old_pid` and is online again.
async fn wait_restarted(agent: &AgentProcess, id: &str, old_pid: u32) -> Value {
    agent
        .wait_instance(id, "restarted, online", |i| {
            i["pid"].as_u64().is_some_and(|p| p != u64::from(old_pid)) && i["status"] == 4
        })
        .await
}

/// The sample game's profile run through a shell that first starts `helper` in the background
/// and then becomes the game (`exec`): a game with a helper process of its own.
fn sample_with_helper(profile_id: &str, helper: &str) -> Value {
    let mut profile = sample_game_profile(profile_id, 7, 0, 0);
    let args: Vec<String> = profile["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    let game = profile["executable"]
        .as_str()
        .expect("executable")
        .to_owned();
    profile["executable"] = json!("/bin/sh");
    profile["args"] = json!(["-c", format!("{helper} & exec {game} {}", args.join(" "))]);
    profile
}

/// A game that crashes leaves nothing behind: a helper it started (here a `sleep` from the
/// shell that then became the game) would otherwise live on, holding whatever the game gave it
/// (its ports, its Arcus listener) against the restart. It is killed with the game's process
/// group when the game exits, or at the agent's start when the game ended while the agent
/// was down, and the restart comes up alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_game_leaves_no_helper_behind() {
    let mut agent = AgentProcess::start_new("game-remains").await;
    let id = new_id("h");
    let marker = format!("{}", 100_000 + std::process::id() % 100_000);
    let profile = sample_with_helper("sample-helper", &format!("sleep {marker}"));
    agent.deploy(&deploy_body(&id, profile)).await;
    let before = agent.wait_online(&id).await;
    let helper = wait_for("the helper", TIMEOUT, async || {
        berth_e2e::pids_with_arg(&marker).first().copied()
    })
    .await;

    signal(pid_of(&before), Signal::SIGKILL).expect("SIGKILL the game");
    let after = wait_restarted(&agent, &id, pid_of(&before)).await;
    wait_for("the old helper to be gone", TIMEOUT, async || {
        (!pid_alive(helper)).then_some(())
    })
    .await;
    assert_eq!(count_instance_processes(&id), 1, "{after}");

    // The same while the agent is down: the restarted agent kills the helper the ended game
    // left (found by its instance id, in a session nothing leads any more) before it starts
    // the game again.
    let helper = wait_for("the new helper", TIMEOUT, async || {
        berth_e2e::pids_with_arg(&marker).first().copied()
    })
    .await;
    agent.wait_pids_persisted(&[&id]).await;
    agent.kill9();
    let leader = pid_of(&after);
    signal(leader, Signal::SIGKILL).expect("SIGKILL the game");
    wait_for("the game to be gone", TIMEOUT, async || {
        (!pid_alive(leader)).then_some(())
    })
    .await;
    assert!(pid_alive(helper), "the helper outlives its game");
    agent.start().await;
    wait_for("the helper to be gone", TIMEOUT, async || {
        (!pid_alive(helper)).then_some(())
    })
    .await;
    let again = wait_restarted(&agent, &id, leader).await;
    assert_eq!(count_instance_processes(&id), 1, "{again}");
    let _ = agent
        .delete(&format!("/v1/instances/{id}?force=true"))
        .await;
}

/// A helper that left its game's session (`setsid`, as a daemon's double fork does) is not in
/// the game's process group, which the agent kills when the game ends; it is found by the
/// instance id in its environment and killed too, when the game crashes and when it is
/// removed. The restart, which carries the same id, is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_helper_that_left_the_games_session_goes_with_the_game() {
    let agent = AgentProcess::start_new("game-leaver").await;
    let id = new_id("s");
    let marker = format!("{}", 200_000 + std::process::id() % 100_000);
    let profile = sample_with_helper("sample-leaver", &format!("setsid sleep {marker}"));
    agent.deploy(&deploy_body(&id, profile)).await;
    let before = agent.wait_online(&id).await;
    let helper = wait_for("the helper in a session of its own", TIMEOUT, async || {
        let pid = *berth_e2e::pids_with_arg(&marker).first().ok_or(())?;
        (berth_e2e::session_of(pid) == Some(pid))
            .then_some(pid)
            .ok_or(())
    })
    .await;

    signal(pid_of(&before), Signal::SIGKILL).expect("SIGKILL the game");
    wait_for("the helper to be gone", TIMEOUT, async || {
        (!pid_alive(helper)).then_some(())
    })
    .await;
    let after = wait_restarted(&agent, &id, pid_of(&before)).await;
    assert_eq!(count_instance_processes(&id), 1, "{after}");
    assert_eq!(
        log_records(
            &agent,
            "killed a process the game had started outside its process group (setsid); it would have outlived the game",
            &id
        )
        .len(),
        1
    );
    let second = wait_for("the restart's helper", TIMEOUT, async || {
        berth_e2e::pids_with_arg(&marker).first().copied().ok_or(())
    })
    .await;
    assert_ne!(second, helper);
    // The restart and its own helper started after the first game's end, so the pass over
    // /proc that killed the first helper left them.
    assert!(pid_alive(pid_of(&after)) && pid_alive(second));
    agent
        .delete(&format!("/v1/instances/{id}?force=true"))
        .await
        .expect(200);
    wait_for("the restart's helper gone with it", TIMEOUT, async || {
        (!pid_alive(second)).then_some(())
    })
    .await;
}

/// A second agent started on a running agent's state directory (another listen port, so the
/// port does not stop it) exits at once, naming the running agent's pid and the lock file, and
/// touches nothing: the games keep their process and their Arcus link to the first agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_the_same_state_directory_is_refused() {
    let agent = AgentProcess::start_new("state-lock").await;
    let id = new_id("l");
    agent.deploy_sample(&id, 0, 0).await;
    let before = agent.wait_online(&id).await;
    let connects = arcus_connects(&agent).await;

    let mut other = agent.config().clone();
    other.listen_port = free_port();
    assert_second_daemon_refused(
        "berth-agent",
        &other.toml(agent.state_dir()),
        agent.pid().expect("the first agent runs"),
        &["agent.lock", &agent.state_dir().display().to_string()],
    )
    .await;

    let after = agent.instance(&id).await;
    assert_eq!(pid_of(&after), pid_of(&before), "{after}");
    assert_eq!(after["arcusConnected"], true, "{after}");
    assert_eq!(
        arcus_connects(&agent).await,
        connects,
        "no game's link was taken and given back"
    );
    agent
        .post(&format!("/v1/instances/{id}/allocate"), &json!({}))
        .await
        .expect(200);
}

/// The `berth_agent_arcus_connects_total` counter from `/metrics`.
async fn arcus_connects(agent: &AgentProcess) -> f64 {
    let m = agent.get("/metrics").await.expect(200);
    berth_e2e::metric(&m.text, "berth_agent_arcus_connects_total", "")
        .unwrap_or_else(|| panic!("no Arcus connect counter in /metrics:\n{}", m.text))
}

/// The `berth_agent_arcus_protocol_errors_total` counter from `/metrics`.
async fn protocol_errors(agent: &AgentProcess) -> f64 {
    let m = agent.get("/metrics").await.expect(200);
    m.text
        .lines()
        .find_map(|l| l.strip_prefix("berth_agent_arcus_protocol_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no protocol error counter in /metrics:\n{}", m.text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_arcus_closes_only_that_link() {
    let agent = AgentProcess::start_new("malformed-arcus").await;
    let sample = new_id("g-sample");
    agent.deploy_sample(&sample, 0, 0).await;
    let modes = ["bad-hello", "bad-frame", "huge-frame", "array-root"];
    let mut bad = Vec::new();
    for mode in modes {
        let id = new_id(&format!("g-{mode}"));
        let count_file = agent.dir().join(format!("{mode}.count"));
        agent
            .deploy(&deploy_body(
                &id,
                bad_game_profile(&format!("bad-{mode}"), 9, mode, &count_file),
            ))
            .await;
        bad.push((mode, id, count_file));
    }
    // And a game that never listens for Arcus at all.
    let mute = new_id("g-mute");
    agent
        .deploy(&deploy_body(
            &mute,
            json!({"id": "mute", "applicationId": 9, "build": "1", "executable": "/bin/sleep", "args": ["60"]}),
        ))
        .await;

    let sample_before = agent.wait_online(&sample).await;
    for (mode, _, count_file) in &bad {
        wait_for(
            &format!("the agent to reconnect to the {mode} game"),
            TIMEOUT,
            async || {
                let lines = std::fs::read_to_string(count_file).map_or(0, |t| t.lines().count());
                if lines >= 2 { Ok(lines) } else { Err(lines) }
            },
        )
        .await;
    }
    wait_for(
        "a protocol error per bad game in /metrics",
        TIMEOUT,
        async || {
            let n = protocol_errors(&agent).await;
            if n >= modes.len() as f64 {
                Ok(n)
            } else {
                Err(n)
            }
        },
    )
    .await;

    let health = agent
        .http()
        .send(
            Method::GET,
            &format!("{}/healthz", agent.url()),
            None,
            &[],
            None,
        )
        .await;
    assert_eq!(health.status, 200, "{}", health.text);
    for (mode, id, _) in &bad {
        let i = agent.instance(id).await;
        assert_eq!(
            i["state"], "running",
            "{mode}: the game is left running: {i}"
        );
        assert_eq!(i["restarts"], 0, "{mode}: {i}");
        assert!(pid_alive(pid_of(&i)), "{mode}");
        agent
            .post(&format!("/v1/instances/{id}/allocate"), &json!({}))
            .await
            .assert_error(404, "INSTANCE_NOT_ALLOCATABLE", Some(76004));
    }

    // Each instance says why its link is down; the sample game's is up, with nothing to say.
    let mute_seen = agent
        .wait_instance(&mute, "the reason its link is down", |i| {
            i["arcusError"].as_str().is_some()
        })
        .await;
    let why = mute_seen["arcusError"].as_str().unwrap_or_default();
    assert!(
        why.contains("does not accept connections on its management port")
            && why.contains(&format!("127.0.0.1:{}", mute_seen["managementPort"])),
        "{mute_seen}"
    );
    assert_eq!(mute_seen["status"], 3, "{mute_seen}");
    for (_, id, _) in &bad {
        // Between its link's handshake and the bad frame that follows, a bad game's link is
        // briefly up, with no reason to give.
        agent
            .wait_instance(id, "the reason its link is down", |i| {
                i["arcusError"].as_str().is_some_and(|e| !e.is_empty())
            })
            .await;
    }

    let sample_now = agent.wait_online(&sample).await;
    assert!(sample_now.get("arcusError").is_none(), "{sample_now}");
    assert_eq!(pid_of(&sample_now), pid_of(&sample_before));
    let r = agent
        .post(
            &format!("/v1/instances/{sample}/allocate"),
            &json!({"metadata": kv(&[("map", "dust")])}),
        )
        .await
        .expect(200);
    assert_eq!(r.json["status"], 5);
    wait_game_info(port_of(&sample_now), "allocated", |i| {
        i["allocated"] == true
    })
    .await;
    assert!(
        agent.pid().is_some_and(pid_alive),
        "the agent is still running"
    );
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
}

/// Runs `berth-agent --config <file> validate`: (exit code, stderr).
/// A game that stops sending (frozen; here by SIGSTOP) keeps its link for the protocol's 20 s,
/// but once it has sent nothing for 1.5 health intervals it is shown with its link down, says
/// why, and is refused for allocation: a match sent there would wait for a server that does
/// not run. When it sends again it is offered again, on the same link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_game_is_not_allocated_until_it_sends_again() {
    let agent = AgentProcess::start_new("frozen-game").await;
    let id = new_id("f");
    agent.deploy_sample(&id, 0, 0).await;
    let pid = pid_of(&agent.wait_online(&id).await);
    let connects = arcus_connects(&agent).await;

    signal(pid, Signal::SIGSTOP).expect("SIGSTOP the game");
    let frozen = agent
        .wait_instance(&id, "the game's silence noticed", |i| {
            i["arcusConnected"] == false
        })
        .await;
    assert_eq!(frozen["status"], 4, "its status stands: {frozen}");
    let why = frozen["arcusError"].as_str().unwrap_or_default();
    assert!(
        why.contains("has sent nothing on its Arcus link") && why.contains("not offered"),
        "{frozen}"
    );
    let allocate = async || {
        agent
            .post(&format!("/v1/instances/{id}/allocate"), &json!({}))
            .await
    };
    let refused = allocate().await;
    let body = refused.assert_error(404, "INSTANCE_NOT_ALLOCATABLE", Some(76004));
    assert!(
        body["details"]
            .as_str()
            .is_some_and(|d| d.contains("has sent nothing")),
        "{body}"
    );

    signal(pid, Signal::SIGCONT).expect("SIGCONT the game");
    let back = agent
        .wait_instance(&id, "the game heard again", |i| i["arcusConnected"] == true)
        .await;
    assert!(back["arcusError"].is_null(), "{back}");
    assert_eq!(
        arcus_connects(&agent).await,
        connects,
        "the link was never closed"
    );
    let allocated = allocate().await.expect(200).json;
    assert_eq!(allocated["status"], 5, "{allocated}");
}

/// An agent that did not run for longer than a game may be silent (stopped, its VM paused,
/// starved of CPU) finds the game's frames waiting in the socket when it runs again: it reads
/// them before it judges the game, so no game is called silent, nor taken out of the pool,
/// for the agent's own pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_paused_past_the_silence_limit_does_not_call_its_games_silent() {
    let agent = AgentProcess::start_new("paused-agent").await;
    // Several links, each with its own chance to judge before it reads.
    let ids: Vec<String> = (0..4).map(|n| new_id(&format!("p{n}"))).collect();
    for id in &ids {
        agent.deploy_sample(id, 0, 0).await;
    }
    let mut ports = Vec::new();
    for id in &ids {
        ports.push(port_of(&agent.wait_online(id).await));
    }
    let pid = agent.pid().expect("the agent runs");
    signal(pid, Signal::SIGSTOP).expect("SIGSTOP the agent");
    // The fault itself: a pause longer than the 7.5 s a linked game may go without a frame.
    tokio::time::sleep(Duration::from_millis(8_500)).await;
    signal(pid, Signal::SIGCONT).expect("SIGCONT the agent");
    for (id, port) in ids.iter().zip(&ports) {
        // Sent on the same link after the pause: once the game has it, its link task has run.
        agent
            .post(
                &format!("/v1/instances/{id}/metadata"),
                &json!({"metadata": kv(&[("after", "pause")])}),
            )
            .await
            .expect(200);
        wait_game_info(*port, "the metadata sent after the pause", |i| {
            i["metadata"]
                .as_array()
                .is_some_and(|m| m.iter().any(|kv| kv["key"] == "after"))
        })
        .await;
        let i = agent.instance(id).await;
        assert_eq!(i["arcusConnected"], true, "{i}");
        assert!(
            log_records(&agent, "the game does not answer", id).is_empty(),
            "{}",
            agent.log()
        );
    }
}

/// ARCUS.md §6: never more than `MAX_BURST` frames to a game that has not answered. A game
/// that reports 4 and then stays silent gets the first `MAX_BURST` commands at once, and the
/// rest only after the link's pause (50 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_to_a_silent_game_wait_after_a_burst() {
    let agent = AgentProcess::start_new("burst-pause").await;
    let id = new_id("g-silent");
    let (profile, frames_file) = silent_game_profile("bad-log-frames", 9, agent.dir().path());
    agent.deploy(&deploy_body(&id, profile)).await;
    agent.wait_online(&id).await;
    let commands = MAX_BURST + 5;
    for n in 0..commands {
        agent
            .post(
                &format!("/v1/instances/{id}/command"),
                &json!({"command": format!("c{n}")}),
            )
            .await
            .expect(200);
    }
    // Arrival times (µs) of the custom commands (0x45), in order.
    let at: Vec<u64> = wait_for("every command at the game", TIMEOUT, async || {
        let text = std::fs::read_to_string(&frames_file).unwrap_or_default();
        let at: Vec<u64> = text
            .lines()
            .filter_map(|l| l.strip_suffix(" 45"))
            .map(|t| t.parse().expect("a time in the frames file"))
            .collect();
        if at.len() >= commands {
            Ok(at)
        } else {
            Err(at.len())
        }
    })
    .await;
    assert_eq!(at.len(), commands, "each command sent once");
    // The pause is a lower bound; the margin is for the game's own reads being late.
    let gap_ms = (at[MAX_BURST] - at[MAX_BURST - 1]) as f64 / 1000.0;
    assert!(
        gap_ms >= 25.0,
        "command {} reached the game {gap_ms} ms after command {}: the agent did not pause \
         after {MAX_BURST} unanswered frames",
        MAX_BURST + 1,
        MAX_BURST
    );
}

fn validate(file: &std::path::Path) -> (Option<i32>, String) {
    let out = berth_command(bin("berth-agent"))
        .arg("--config")
        .arg(file)
        .arg("validate")
        .output()
        .expect("run berth-agent validate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_exits_78_naming_the_key() {
    let dir = TestDir::new("validate");
    let config = AgentConfig::new("validate-host");
    let valid = config.toml(&dir.join("state"));

    let good = dir.join("good.toml");
    std::fs::write(&good, &valid).expect("write");
    let (code, stderr) = validate(&good);
    assert_eq!(code, Some(0), "a valid file passes: {stderr}");

    let unknown = dir.join("unknown.toml");
    std::fs::write(&unknown, format!("no_such_key = 5\n{valid}")).expect("write");
    let (code, stderr) = validate(&unknown);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("no_such_key"),
        "stderr names the key: {stderr}"
    );

    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .expect("the kernel's ephemeral port range");
    let low: u16 = range
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("ephemeral range start");
    let mut eph = config.clone();
    eph.game_ports = low..=low + 10;
    let ephemeral = dir.join("ephemeral.toml");
    std::fs::write(&ephemeral, eph.toml(&dir.join("state"))).expect("write");
    let (code, stderr) = validate(&ephemeral);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("game_ports"),
        "stderr names the key: {stderr}"
    );
    assert!(
        !dir.join("state").exists(),
        "validate touches nothing: the state directory was created"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leaves_games_running() {
    let mut agent = AgentProcess::start_new("sigterm").await;
    let ids = [new_id("i0"), new_id("i1")];
    for id in &ids {
        agent.deploy_sample(id, 0, 0).await;
    }
    let mut pids = Vec::new();
    for id in &ids {
        pids.push(pid_of(&agent.wait_online(id).await));
    }
    // The first allocation must survive the stop: written by the agent's shutdown itself.
    agent
        .post(
            &format!("/v1/instances/{}/allocate", ids[0]),
            &json!({"metadata": kv(&[("map", "mirage")])}),
        )
        .await
        .expect(200);

    let status = agent.sigterm().await;
    assert_eq!(status.code(), Some(0), "SIGTERM is a clean stop: {status}");
    for (id, p) in ids.iter().zip(&pids) {
        assert!(pid_alive(*p), "game {id} survived the agent's stop");
        assert_eq!(count_instance_processes(id), 1);
    }

    agent.start().await;
    let first = agent
        .wait_instance(&ids[0], "still allocated, link up", |i| {
            i["status"] == 5 && i["arcusConnected"] == true
        })
        .await;
    assert_eq!(pid_of(&first), pids[0]);
    assert_eq!(first["metadata"], kv(&[("map", "mirage")]));
    let second = agent.wait_online(&ids[1]).await;
    assert_eq!(pid_of(&second), pids[1]);
    assert_eq!(second["restarts"], 0);
}

/// A game that ignores the soft stop is sent SIGTERM when its timeout runs out: one of the
/// supervisor's own timers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_game_ignoring_the_soft_stop_gets_sigterm_after_its_timeout() {
    let agent = AgentProcess::start_new("stop-ignored").await;
    let id = new_id("k");
    let count_file = agent.dir().join("stubborn.count");
    // `never-confirm` reads every frame and answers none, the soft stop included.
    agent
        .deploy(&json!({
            "id": id,
            "managementProtocol": "arcus",
            "profile": bad_game_profile("stubborn", 8, "never-confirm", &count_file),
        }))
        .await;
    let pid = pid_of(&agent.wait_online(&id).await);

    let asked = Instant::now();
    let r = agent
        .post(
            &format!("/v1/instances/{id}/stop"),
            &json!({"timeoutSeconds": 1}),
        )
        .await
        .expect(200);
    assert_eq!(r.json["state"], "draining", "{}", r.text);
    let stopped = agent
        .wait_instance(&id, "stopped (status 2)", |i| {
            i["status"] == 2 && i["pid"].is_null()
        })
        .await;
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "SIGTERM came before the 1 s timeout: {took:?}"
    );
    assert_eq!(stopped["exitSignal"], 15, "ended by SIGTERM: {stopped}");
    assert_eq!(stopped["state"], "dead", "{stopped}");
    assert_eq!(
        stopped["restarts"], 0,
        "a stopped game is not restarted: {stopped}"
    );
    assert!(!pid_alive(pid));
    assert!(
        agent
            .log()
            .contains("the game did not stop within its grace; sending SIGTERM"),
        "the agent says why it sent SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_remove() {
    let agent = AgentProcess::start_new("stop-remove").await;
    let id = new_id("j");
    agent.deploy_sample(&id, 0, 0).await;
    let old_pid = pid_of(&agent.wait_online(&id).await);

    let r = agent
        .post(
            &format!("/v1/instances/{id}/stop"),
            &json!({"timeoutSeconds": 2}),
        )
        .await
        .expect(200);
    assert_eq!(
        r.json["state"], "draining",
        "a soft stop was sent: {}",
        r.text
    );
    let stopped = agent
        .wait_instance(&id, "exited (status 2)", |i| {
            i["status"] == 2 && i["state"] == "exited"
        })
        .await;
    assert_eq!(stopped["exitCode"], 0, "{stopped}");
    assert!(stopped["exitSignal"].is_null(), "{stopped}");
    assert!(stopped["pid"].is_null(), "{stopped}");
    assert_eq!(stopped["restarts"], 0, "a stopped game is not restarted");
    assert!(!pid_alive(old_pid));
    let log = std::fs::read_to_string(agent.game_log_path(&id)).expect("game log");
    assert!(
        log.contains("soft stop (timeout 2s)"),
        "the game got the soft stop with the requested timeout: {log}"
    );

    agent
        .delete(&format!("/v1/instances/{id}"))
        .await
        .expect(200);
    agent
        .get(&format!("/v1/instances/{id}"))
        .await
        .assert_error(404, "INSTANCE_NOT_ON_HOST", Some(76003));

    let busy = new_id("j-busy");
    agent.deploy_sample(&busy, 0, 0).await;
    let online = agent.wait_online(&busy).await;
    agent
        .post(&format!("/v1/instances/{busy}/allocate"), &json!({}))
        .await
        .expect(200);
    agent
        .delete(&format!("/v1/instances/{busy}"))
        .await
        .assert_error(422, "INSTANCE_ALREADY_ALLOCATED", Some(76006));
    agent
        .post(&format!("/v1/instances/{busy}/stop"), &json!({}))
        .await
        .assert_error(422, "INSTANCE_ALREADY_ALLOCATED", Some(76006));
    let still = agent.instance(&busy).await;
    assert_eq!(still["status"], 5, "{still}");
    assert_eq!(still["state"], "running", "{still}");
    assert_eq!(pid_of(&still), pid_of(&online));
    assert!(pid_alive(pid_of(&online)), "the match keeps running");
    let info = wait_game_info(port_of(&online), "allocated", |i| i["allocated"] == true).await;
    assert_eq!(info["instanceId"], json!(busy));
}

/// The numbers of the `line NNNNNN` lines the bad game wrote, in file order (its other output,
/// on stderr, is in the same files and skipped).
fn numbered_lines(text: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|l| l.strip_prefix("line ")?.get(..6)?.parse().ok())
        .collect()
}

/// Where consecutive numbers do not follow each other (a line lost or repeated).
fn breaks(numbers: &[u32]) -> Vec<(u32, u32)> {
    numbers
        .windows(2)
        .filter(|w| w[1] != w[0] + 1)
        .map(|w| (w[0], w[1]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn game_logs_rotate_without_losing_a_line_and_go_after_removal() {
    const LINES: u32 = 4000; // 100 bytes each: 400 KB over ≈ 4 s
    const MAX: u64 = 64 * 1024;
    let mut config = AgentConfig::new("log-rotation");
    config.extra.push(format!("game_log_max_bytes = {MAX}"));
    config.extra.push("game_log_files = 2".to_owned());
    config.extra.push("game_log_retention_hours = 0".to_owned());
    let mut agent = AgentProcess::spawn("log-rotation", config).await;
    let chatty = new_id("g-chatty");
    let mut profile = bad_game_profile(
        "bad-chatty",
        9,
        "never-confirm",
        &agent.dir().join("chatty.count"),
    );
    profile["args"]
        .as_array_mut()
        .expect("args")
        .push(json!(format!("--log-lines={LINES}")));
    agent.deploy(&deploy_body(&chatty, profile)).await;
    // A reader following the log from the start sees every line once across the rotations.
    let follow = {
        let (http, token) = (agent.http().clone(), agent.token().to_owned());
        let url = format!(
            "{}/v1/instances/{chatty}/logs?tail=100000&follow=true",
            agent.url()
        );
        let last = format!("line {:06} ", LINES - 1);
        tokio::spawn(async move {
            http.read_stream_until(&url, &token, TIMEOUT, |got| {
                String::from_utf8_lossy(got).contains(&last)
            })
            .await
        })
    };
    let quiet = new_id("g-quiet");
    agent.deploy_sample(&quiet, 0, 0).await;
    agent.wait_online(&quiet).await;

    let live = agent.game_log_path(&chatty);
    let copy = |n: u32| live.with_file_name(format!("{chatty}.log.{n}"));
    // Oldest first: the stream as the game wrote it, minus what rotation dropped.
    let kept = || {
        [copy(2), copy(1), live.clone()]
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect::<String>()
    };
    // Done when the last line is written and the agent has rotated the live file since.
    wait_for(
        "the last line, with the live log under the limit",
        TIMEOUT,
        async || {
            let len = std::fs::metadata(&live).map_or(0, |m| m.len());
            let last = numbered_lines(&kept()).last().copied();
            if last == Some(LINES - 1) && len <= MAX && copy(2).exists() {
                Ok(())
            } else {
                Err(format!("last line {last:?}, live log {len} bytes"))
            }
        },
    )
    .await;

    assert!(!copy(3).exists(), "game_log_files = 2 keeps two copies");
    for p in [copy(2), copy(1), live.clone()] {
        let len = std::fs::metadata(&p).expect("a log file").len();
        // Checked every second: a file can pass the limit by what the game writes meanwhile.
        assert!(
            len <= MAX + 200 * 1024,
            "{} is {len} bytes with a limit of {MAX}",
            p.display()
        );
    }
    let numbers = numbered_lines(&kept());
    let first = numbers[0];
    assert!(first > 0, "the oldest output was dropped, not kept forever");
    let copy_truncate = agent.log().contains("cannot collapse a file range");
    if copy_truncate {
        // This filesystem rotates by copy and truncate: lines may be lost, never reordered.
        println!("log_dir's filesystem cannot collapse ranges; checking order only");
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
    } else {
        assert_eq!(
            breaks(&numbers),
            Vec::<(u32, u32)>::new(),
            "every line from {first} on is kept once, in order; (a, b): line b follows line a"
        );
    }

    let followed = follow.await.expect("the follower");
    let followed = numbered_lines(&String::from_utf8_lossy(&followed));
    if !copy_truncate {
        assert_eq!(
            followed.first(),
            Some(&0),
            "the follower started at the first line"
        );
        assert_eq!(
            breaks(&followed),
            Vec::<(u32, u32)>::new(),
            "follow=true: (a, b): line b follows line a"
        );
    }

    // The API's tail reads across the files.
    let tail = agent
        .get(&format!("/v1/instances/{chatty}/logs?tail=1000"))
        .await
        .expect(200);
    let tail_numbers = numbered_lines(&tail.text);
    assert_eq!(tail_numbers.last(), Some(&(LINES - 1)), "{}", tail.text);
    if !copy_truncate {
        assert!(
            tail_numbers.len() >= 990,
            "tail=1000 spans the rotated copies: {} numbered lines",
            tail_numbers.len()
        );
        assert_eq!(
            breaks(&tail_numbers),
            Vec::<(u32, u32)>::new(),
            "tail=1000: (a, b): line b follows line a"
        );
    }
    let m = agent.get("/metrics").await.expect(200);
    let rotations = berth_e2e::metric(&m.text, "berth_agent_game_log_rotations_total", "")
        .unwrap_or_else(|| panic!("no rotation counter in /metrics:\n{}", m.text));
    assert!(rotations >= 3.0, "{rotations} rotations for 400 KB");

    // Removed: its logs go at the next sweep (the first comes as the agent starts); the
    // running game's log stays. This game ignores a soft stop, so it is stopped with a short
    // timeout first.
    agent
        .post(
            &format!("/v1/instances/{chatty}/stop"),
            &json!({"timeoutSeconds": 1}),
        )
        .await
        .expect(200);
    agent
        .wait_instance(&chatty, "stopped (status 2, no process)", |i| {
            i["status"] == 2 && i["pid"].is_null()
        })
        .await;
    agent
        .delete(&format!("/v1/instances/{chatty}"))
        .await
        .expect(200);
    wait_for("the instance gone", TIMEOUT, async || {
        let status = agent.get(&format!("/v1/instances/{chatty}")).await.status;
        if status == 404 { Ok(()) } else { Err(status) }
    })
    .await;
    agent.sigterm().await;
    agent.start().await;
    wait_for("the removed instance's logs deleted", TIMEOUT, async || {
        let left: Vec<_> = [copy(2), copy(1), live.clone()]
            .into_iter()
            .filter(|p| p.exists())
            .collect();
        if left.is_empty() { Ok(()) } else { Err(left) }
    })
    .await;
    assert!(
        agent.game_log_path(&quiet).is_file(),
        "a running game's log survives retention 0"
    );
    agent.wait_online(&quiet).await;
}
