//! End-to-end tests of TLS between the daemons (DESIGN.md §7): a controller and an agent, each
//! with its own certificate from the test CA (`tests/fixtures/tls`), authenticate each other
//! both ways; an agent serves only callers with a certificate the CA vouches for; the
//! controller's agent routes need one, its matchmaker routes do not.

use berth_e2e::json::{id_of, kv, port_of};
use berth_e2e::{
    AgentConfig, AgentProcess, ControllerConfig, ControllerProcess, Http, TIMEOUT, bin, tls_client,
    tls_fixture, wait_game_info,
};
use http::Method;
use serde_json::json;

/// `berthctl` against `c` with `env` added; (exit code, stdout, stderr).
fn berthctl(c: &ControllerProcess, env: &[(&str, String)], args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(bin("berthctl"))
        .args(args)
        .env("BERTH_CONTROLLER", c.url())
        .env("BERTH_TOKEN", c.admin_token())
        .env_remove("BERTH_CA_FILE")
        // A developer's own berthctl.toml must not leak into the test.
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run berthctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn tls_cluster(name: &str) -> (ControllerProcess, AgentProcess) {
    let config = ControllerConfig {
        tls: Some("controller".to_owned()),
        ..ControllerConfig::new()
    };
    let c = ControllerProcess::spawn(name, config).await;
    assert!(c.url().starts_with("https://"), "{}", c.url());
    let mut agent = AgentConfig::joined(&format!("{name}-host"), &c);
    agent.tls = Some("agent".to_owned());
    let a = AgentProcess::spawn(&format!("{name}-agent"), agent).await;
    (c, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_and_agent_allocate_over_mutual_tls() {
    let (c, a) = tls_cluster("tls-allocate").await;
    assert!(a.url().starts_with("https://"), "{}", a.url());
    c.sample_fleet(7, 456, 1, 0, &[]).await;
    // Registration, heartbeats and events (agent → controller) and the deploy (controller →
    // agent) all went over TLS for the instance to be online.
    let online = c.wait_online(7, 1).await;
    let metadata = kv(&[("map", "dust")]);
    let answer = c
        .allocate(7, &json!({"metadata": metadata}), &[])
        .await
        .expect(200)
        .json;
    assert_eq!(id_of(&answer), id_of(&online[0]));
    let info = wait_game_info(port_of(&answer), "allocated", |i| i["allocated"] == true).await;
    assert_eq!(info["allocation"], metadata, "{info}");

    // A matchmaker needs no certificate, only to trust the CA.
    let no_cert = Http::with_tls(tls_client(&["ca"], None));
    let r = no_cert
        .send(
            Method::GET,
            &format!("{}/v1/instances?applicationId=7", c.url()),
            Some(c.admin_token()),
            &[],
            None,
        )
        .await
        .expect(200);
    assert_eq!(r.json.as_array().map(Vec::len), Some(1), "{}", r.text);

    // berthctl, given the CA.
    let ca = tls_fixture("ca.pem").display().to_string();
    let (code, out, err) = berthctl(&c, &[("BERTH_CA_FILE", ca)], &["hosts"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&a.config().host_name), "{out}");
    // Without it, it says what to set.
    let (code, _, err) = berthctl(&c, &[], &["hosts"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--ca-file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_without_the_right_certificate_are_refused() {
    let (c, a) = tls_cluster("tls-refuse").await;
    let healthz = format!("{}/healthz", a.url());

    // The agent: no certificate, or one from another CA, ends at the handshake.
    let no_cert = Http::with_tls(tls_client(&["ca"], None));
    refused_for(&no_cert, &healthz, "CertificateRequired").await;
    let rogue = Http::with_tls(tls_client(&["ca"], Some("rogue")));
    refused_for(&rogue, &healthz, "UnknownCA").await;
    // Nor does plain HTTP get an answer from a TLS port.
    let plain = format!("http://127.0.0.1:{}/healthz", a.config().listen_port);
    let e = no_cert
        .try_send(Method::GET, &plain, None, &[], None)
        .await
        .expect_err("plain HTTP");
    assert!(!e.contains("answered"), "plain HTTP: {e}");
    // The agent kept serving those who hold a certificate.
    a.http()
        .send(Method::GET, &healthz, None, &[], None)
        .await
        .expect(200);
    // Each refusal is counted where it happened.
    let m = a.get("/metrics").await.expect(200);
    let failures = berth_e2e::metric(&m.text, "berth_agent_tls_handshake_failures_total", "")
        .unwrap_or_else(|| panic!("no handshake failure counter:\n{}", m.text));
    assert!(
        failures >= 3.0,
        "{failures} failed handshakes counted, 3 made"
    );

    // The controller: an agent route without a certificate is refused whatever the token,
    // with what to do.
    let r = no_cert
        .send(
            Method::POST,
            &format!("{}/v1/agent/heartbeat", c.url()),
            Some(a.token()),
            &[],
            Some(&json!({"hostId": 1, "instances": []})),
        )
        .await;
    r.assert_error(403, "INVALID_CREDENTIALS", None);
    assert!(r.text.contains("client certificate"), "{}", r.text);
    // A server certificate from another CA is refused by the client side too.
    let other_ca = Http::with_tls(tls_client(&["rogue-ca"], None));
    other_ca
        .try_send(
            Method::GET,
            &format!("{}/healthz", c.url()),
            None,
            &[],
            None,
        )
        .await
        .expect_err("the controller's certificate is not from rogue-ca");
    let m = c.metrics().await;
    let failures = berth_e2e::metric(&m, "berth_controller_tls_handshake_failures_total", "")
        .unwrap_or_else(|| panic!("no handshake failure counter:\n{m}"));
    assert!(
        failures >= 1.0,
        "the refused handshake was counted: {failures}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_a_certificate_from_another_ca_is_told_why() {
    let config = ControllerConfig {
        tls: Some("controller".to_owned()),
        ..ControllerConfig::new()
    };
    let c = ControllerProcess::spawn("tls-rogue-agent", config).await;
    let mut agent = AgentConfig::joined("rogue-host", &c);
    agent.tls = Some("rogue".to_owned());
    let a = AgentProcess::spawn("tls-rogue-agent-agent", agent).await;
    let why = registration_failure(&a, "UnknownCA").await;
    assert!(
        why.contains("UnknownCA") && why.contains("not signed by the server's tls.ca_file"),
        "{why}"
    );
    assert!(c.hosts().await.is_empty(), "no host registered");
}

/// The log line of `a`'s first failed registration with the controller.
/// A controller that trusts the fixtures' second CA too, with `crl` as its revocation lists.
async fn second_ca_controller(name: &str, crl: &'static str) -> ControllerProcess {
    let config = ControllerConfig {
        tls: Some("controller".to_owned()),
        tls_cas: vec!["ca", "ca2"],
        tls_crl: Some(crl),
        ..ControllerConfig::new()
    };
    ControllerProcess::spawn(name, config).await
}

/// An agent of `c` on host `{name}-host` showing the fixture certificate `identity`.
async fn agent_showing(c: &ControllerProcess, name: &str, identity: &str) -> AgentProcess {
    let mut agent = AgentConfig::joined(&format!("{name}-host"), c);
    agent.tls = Some(identity.to_owned());
    AgentProcess::spawn(name, agent).await
}

/// The agent's logged registration failure that names `reason`. The first may not: see
/// [`refused_for`].
async fn registration_failure(a: &AgentProcess, reason: &str) -> String {
    line_of(
        "the agent's registration failure",
        || a.log(),
        |l| l.contains("cannot register with the controller") && l.contains(reason),
    )
    .await
}

/// The first line of a daemon's log (`log`) that `pred` accepts, once there is one.
async fn line_of(what: &str, log: impl Fn() -> String, pred: impl Fn(&str) -> bool) -> String {
    berth_e2e::wait_for(what, TIMEOUT, async || {
        log().lines().find(|l| pred(l)).map(str::to_owned)
    })
    .await
}

/// Asserts that `url`'s daemon ends every handshake over the client's certificate, for
/// `reason` (a TLS alert). TLS 1.3 completes the client's side of the handshake first, so the
/// client sees either the server's alert or, when the alert and the close overtake its
/// request, only a connection closed before the request went out: neither is an answer, and
/// the alert is looked for over a few attempts.
async fn refused_for(http: &Http, url: &str, reason: &str) {
    let mut seen = Vec::new();
    for _ in 0..5 {
        let e = http
            .try_send(Method::GET, url, None, &[], None)
            .await
            .expect_err("a refused certificate gets no answer");
        if e.contains(reason) {
            return;
        }
        seen.push(e);
    }
    panic!("{url}: refused, but never with {reason}: {seen:?}");
}

/// One allocation on fleet 7, released again.
async fn allocate_and_release(c: &ControllerProcess) {
    let answer = c.allocate(7, &json!({}), &[]).await.expect(200).json;
    c.matchmaker(
        Method::POST,
        &format!("/v1/instances/{}/deallocate", id_of(&answer)),
        Some(&json!({})),
    )
    .await
    .expect(200);
}

/// Whether a handshake with `url`'s daemon got as far as an HTTP answer: `Err` carries the
/// client's error when it did not.
async fn reaches(http: &Http, url: &str) -> Result<u16, String> {
    http.try_send(Method::GET, url, None, &[], None)
        .await
        .map(|r| r.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_cas_rotate_on_sighup_without_a_restart() {
    let (mut c, a) = tls_cluster("tls-rotate").await;
    c.sample_fleet(7, 456, 1, 0, &[]).await;
    c.wait_online(7, 1).await;
    let agent_healthz = format!("{}/healthz", a.url());
    let controller_healthz = format!("{}/healthz", c.url());
    let heartbeat = format!("{}/v1/agent/heartbeat", c.url());
    // Clients that trust only the new CA ("Another CA", the fixtures' rogue-ca), and one that
    // presents a certificate from it.
    let trusts_new = Http::with_tls(tls_client(&["rogue-ca"], Some("controller")));
    let shows_new = Http::with_tls(tls_client(&["ca", "rogue-ca"], Some("rogue")));
    let shows_old = Http::with_tls(tls_client(&["ca", "rogue-ca"], Some("controller")));
    reaches(&trusts_new, &agent_healthz)
        .await
        .expect_err("the agent's certificate is from the old CA");
    reaches(&shows_new, &heartbeat)
        .await
        .expect_err("the controller does not trust the new CA yet");

    // 1. Both daemons trust both CAs.
    for reply in [
        {
            c.replace_tls("controller", &["ca", "rogue-ca"]);
            c.hangup().await
        },
        {
            a.replace_tls("agent", &["ca", "rogue-ca"]);
            a.hangup().await
        },
    ] {
        assert!(reply.contains("reloaded the [tls] files"), "{reply}");
    }
    let r = shows_new
        .send(Method::POST, &heartbeat, None, &[], Some(&json!({})))
        .await;
    // Past the handshake: now only the (missing) token is wrong.
    r.assert_error(401, "MISSING_CREDENTIALS", None);
    // An allocation opens the controller's kept-alive link to the agent, with its
    // certificate from the old CA.
    allocate_and_release(&c).await;

    // A bad file is refused and changes nothing: the agent keeps serving with what it had.
    std::fs::write(a.dir().join("tls/key.pem"), "not a key").expect("write");
    let reply = a.hangup().await;
    assert!(
        reply.contains("cannot reload the [tls] files") && reply.contains("tls.key_file"),
        "{reply}"
    );
    assert_eq!(reaches(&shows_old, &agent_healthz).await, Ok(200));
    let m = a.get("/metrics").await.expect(200);
    let count = |result: &str| {
        berth_e2e::metric(
            &m.text,
            "berth_agent_tls_reloads_total",
            &format!("result=\"{result}\""),
        )
    };
    assert_eq!(
        (count("ok"), count("failed")),
        (Some(1.0), Some(1.0)),
        "{}",
        m.text
    );
    let expiry = berth_e2e::metric(
        &m.text,
        "berth_agent_tls_certificate_expiry_timestamp_seconds",
        "",
    );
    // The fixtures' notAfter: 2126-10-31T13:36:21Z.
    assert_eq!(expiry, Some(4_949_127_381.0), "{}", m.text);

    // 2. Each daemon moves to a certificate from the new CA. Allocation works across the
    // kept-alive link, which the controller opened with its certificate from the old CA.
    a.replace_tls("rogue", &["ca", "rogue-ca"]);
    assert!(a.hangup().await.contains("reloaded"));
    allocate_and_release(&c).await;
    c.replace_tls("rogue", &["ca", "rogue-ca"]);
    assert!(c.hangup().await.contains("reloaded"));
    assert_eq!(reaches(&trusts_new, &agent_healthz).await, Ok(200));
    assert_eq!(reaches(&trusts_new, &controller_healthz).await, Ok(200));

    // 3. The old CA is dropped: its certificates are refused from then on. The controller's
    // kept-alive link to the agent (used a moment ago; a link idle for 5 s is dropped) was
    // opened with a certificate from the old CA: the agent refuses the next call on it and
    // closes it, and the controller sends the call again on a new connection, showing its new
    // certificate. No call fails.
    a.replace_tls("rogue", &["rogue-ca"]);
    assert!(a.hangup().await.contains("reloaded"));
    let mark = a.log().len();
    allocate_and_release(&c).await;
    let since = &a.log()[mark..];
    assert!(
        since.contains("AGENT_UNAUTHENTICATED") && since.contains("reloaded its [tls] files"),
        "the agent did not refuse the link opened with the old certificate:\n{since}"
    );
    c.replace_tls("rogue", &["rogue-ca"]);
    assert!(c.hangup().await.contains("reloaded"));
    refused_for(&shows_old, &agent_healthz, "UnknownCA").await;
    c.set_http(shows_new.clone());
    reaches(&shows_old, &heartbeat)
        .await
        .expect_err("the old CA is gone from the controller too");

    // The agent was never restarted: its client side must now show the new certificate. A
    // controller restarted on the new files (trusting only the new CA) hears from it again
    // only over fresh connections, where the agent shows what it reloaded.
    let mark = a.log().len();
    c.kill9();
    c.start().await;
    berth_e2e::wait_for("a heartbeat from the agent", TIMEOUT, async || {
        let m = c.metrics().await;
        berth_e2e::metric(&m, "berth_controller_heartbeats_total", "").filter(|n| *n >= 1.0)
    })
    .await;
    c.wait_online(7, 1).await;
    let since = &a.log()[mark..];
    assert!(
        !since.contains("UnknownCA"),
        "the agent showed a certificate the controller refused:\n{since}"
    );
    let pid = a.pid();
    c.allocate(7, &json!({}), &[]).await.expect(200);
    assert_eq!(a.pid(), pid, "the agent ran throughout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_tls_changes_nothing() {
    let c = ControllerProcess::spawn("hup-plain", ControllerConfig::new()).await;
    let reply = c.hangup().await;
    assert!(reply.contains("no [tls] to reload"), "{reply}");
    c.call(Method::GET, "/healthz", None, &[], None)
        .await
        .expect(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_certificate_is_revoked_is_refused_and_told_why() {
    // The controller trusts a second CA, and has that CA's revocation list, which lists the
    // fixture `revoked`.
    let c = second_ca_controller("tls-revoked", "ca2-crl").await;
    let revoked = agent_showing(&c, "tls-revoked-agent", "revoked").await;
    // Another certificate of the same CA, not listed: it registers and serves games.
    let good = agent_showing(&c, "tls-revoked-good", "agent2").await;
    c.sample_fleet(7, 456, 1, 0, &[]).await;
    let online = c.wait_online(7, 1).await;
    assert_eq!(
        online[0]["hostName"],
        good.config().host_name,
        "{}",
        online[0]
    );
    let why = registration_failure(&revoked, "CertificateRevoked").await;
    assert!(
        why.contains("CertificateRevoked") && why.contains("tls.crl_file"),
        "{why}"
    );
    let hosts = c.hosts().await;
    assert_eq!(hosts.len(), 1, "only the good host registered: {hosts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_by_a_reload_is_cut_off_on_connections_already_open() {
    // The controller starts with the second CA's list empty, so the agent's certificate (the
    // fixture `revoked`, from that CA) is accepted.
    let c = second_ca_controller("tls-revoke-live", "ca2-crl-empty").await;
    let a = agent_showing(&c, "tls-revoke-live-agent", "revoked").await;
    c.sample_fleet(7, 456, 1, 0, &[]).await;
    c.wait_online(7, 1).await;
    // Heartbeats go on the agent's kept-alive connection, opened with that certificate.
    // Then the list naming it is published and the controller reloads.
    c.replace_tls_with_crl("controller", &["ca", "ca2"], "ca2-crl");
    let reloaded = c.hangup().await;
    assert!(reloaded.contains("reloaded the [tls] files"), "{reloaded}");
    // The next heartbeat on that connection is refused and the connection closed; the
    // heartbeat sent again on a new connection is refused at the handshake, which says why.
    let refused = line_of(
        "the refused heartbeat",
        || c.log(),
        |l| l.contains("request refused") && l.contains("/v1/agent/heartbeat"),
    )
    .await;
    assert!(
        refused.contains("INVALID_CREDENTIALS")
            && refused.contains("Revoked")
            && refused.contains("reloaded its [tls] files"),
        "{refused}"
    );
    let why = line_of(
        "the agent's failed heartbeat",
        || a.log(),
        |l| l.contains("heartbeat failed") && l.contains("CertificateRevoked"),
    )
    .await;
    assert!(why.contains("tls.crl_file"), "{why}");
    // Cut off from the controller, the host leaves the pool once its heartbeats expire.
    c.wait_host(&a.config().host_name, "unreachable", |h| {
        h["reachable"] == false
    })
    .await;
}
