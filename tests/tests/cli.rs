//! `berthctl` against a real controller and agent: what an on-call engineer runs at 3 a.m.
//! `errors show` must reconstruct a failed allocation from its identifier alone.

use std::process::Command;

use berth_e2e::{
    AgentConfig, AgentProcess, ControllerConfig, ControllerProcess, FaultProxy, bin, short_id,
};
use serde_json::json;

fn berthctl(c: &ControllerProcess, token: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("berthctl"))
        .args(args)
        .env("BERTH_CONTROLLER", c.url())
        .env("BERTH_TOKEN", token)
        // A developer's own berthctl.toml must not leak into the test.
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .expect("run berthctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_show_reconstructs_a_failed_allocation() {
    let mut config = ControllerConfig::new();
    config.max_allocation_attempts = Some(2);
    let c = ControllerProcess::spawn("cli-story", config).await;
    c.sample_fleet(7, 456, 2, 0, &[]).await;
    let agent_config = AgentConfig::joined("cli-story-bm", &c);
    let proxy = FaultProxy::start(format!("http://127.0.0.1:{}", agent_config.listen_port)).await;
    let _agent =
        AgentProcess::spawn("cli-story-bm", agent_config.advertise_url(&proxy.url())).await;
    let online = c.wait_online(7, 2).await;

    // Both candidates answer garbage: the allocation fails after two attempts.
    proxy.garbage_allocations(true);
    let identifier = format!("cli-{}", short_id());
    let failed = c
        .allocate(
            7,
            &json!({"filter": "fleetId=456"}),
            &[("X-Correlation-Id", identifier.as_str())],
        )
        .await;
    failed.assert_error(500, "AGENT_INTERNAL_ERROR", Some(76000));

    // The engineer has only the identifier from the matchmaker's log.
    let (code, out, err) = berthctl(&c, c.matchmaker_token(), &["errors", "show", &identifier]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    for needle in [
        identifier.as_str(),
        "POST /v1/applications/7/allocate",
        "AGENT_INTERNAL_ERROR",
        "76000",
        "fleetId=456",
        "cli-story-bm",
        proxy.url().as_str(),
    ] {
        assert!(
            out.contains(needle),
            "`errors show` must mention {needle}:\n{out}"
        );
    }
    // One entry per candidate, each naming the instance tried.
    for inst in &online {
        let id = inst["id"].as_str().expect("id");
        assert!(out.contains(id), "attempt on {id} missing:\n{out}");
    }

    // The same story as JSON, for tooling.
    let (code, out, _) = berthctl(
        &c,
        c.matchmaker_token(),
        &["--json", "errors", "show", &identifier],
    );
    assert_eq!(code, 0);
    let story: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        story["attempts"].as_array().map(Vec::len),
        Some(2),
        "{story}"
    );

    // A refusal without attempts: the story explains what removed the candidates.
    proxy.garbage_allocations(false);
    let identifier = format!("cli-{}", short_id());
    c.allocate(
        7,
        &json!({"filter": "isVirtual=1"}),
        &[("X-Correlation-Id", identifier.as_str())],
    )
    .await
    .assert_error(404, "NO_ALLOCATABLE_INSTANCE", None);
    let (code, out, err) = berthctl(&c, c.matchmaker_token(), &["errors", "show", &identifier]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("isVirtual=1"), "{out}");
    assert!(out.contains("NO_ALLOCATABLE_INSTANCE"), "{out}");

    // An unknown identifier is a clear 404, exit 1.
    let (code, _, err) = berthctl(&c, c.matchmaker_token(), &["errors", "show", "no-such-id"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("RESOURCE_NOT_FOUND"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_and_drain_against_a_real_controller() {
    let c = ControllerProcess::spawn("cli-tables", ControllerConfig::new()).await;
    c.sample_fleet(3, 30, 2, 0, &[]).await;
    let mut agent =
        AgentProcess::spawn("cli-tables-bm", AgentConfig::joined("cli-tables-bm", &c)).await;
    c.wait_online(3, 2).await;

    let (code, out, err) = berthctl(&c, c.admin_token(), &["hosts"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("cli-tables-bm") && out.contains("ready"),
        "{out}"
    );

    let (code, out, err) = berthctl(
        &c,
        c.admin_token(),
        &["allocate", "3", "--meta", "map=dust"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("map=dust"), "{out}");

    let (code, out, err) = berthctl(&c, c.admin_token(), &["instances", "--status", "5"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("allocated"), "{out}");

    let (code, out, err) = berthctl(&c, c.admin_token(), &["drain", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("draining"), "{out}");
    // A draining host takes no new allocation: the refusal says why.
    let (code, _, err) = berthctl(&c, c.admin_token(), &["allocate", "3"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("NO_ALLOCATABLE_INSTANCE") && err.contains("draining"),
        "{err}"
    );
    let (code, _, err) = berthctl(&c, c.admin_token(), &["drain", "1", "--undo"]);
    assert_eq!(code, 0, "{err}");

    // A matchmaker token on an admin command: exit 3, naming where the token came from.
    let (code, _, err) = berthctl(&c, c.matchmaker_token(), &["drain", "1"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("BERTH_TOKEN"), "{err}");

    // Taking the host out of service: refused while its agent runs, then while it holds the
    // match, then done with the match released.
    let delete = |extra: &[&str]| {
        let mut args = vec!["hosts", "delete", "cli-tables-bm"];
        args.extend_from_slice(extra);
        berthctl(&c, c.admin_token(), &args)
    };
    let (code, _, err) = delete(&[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is reachable"), "{err}");
    agent.kill9();
    c.wait_host("cli-tables-bm", "unreachable", |h| h["reachable"] == false)
        .await;
    let (code, _, err) = delete(&[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--release-allocations"), "{err}");
    let (code, out, err) = delete(&["--release-allocations"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("host 1 (cli-tables-bm) deleted: 2 instances removed from the inventory, 1 allocation released"),
        "{out}"
    );
    let (code, out, err) = berthctl(&c, c.admin_token(), &["hosts"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("No hosts have registered"), "{out}");
}
