//! berthctl against no controller, or against a fake one that answers one canned response:
//! exit codes, messages that say what to do, strict files checked before any request, and the
//! exact request line (the filter must be URL-encoded).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::thread::JoinHandle;

/// A port nobody listens on (bound, then released).
fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("berthctl-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// berthctl with no settings from the environment or the user's config file.
fn berthctl(args: &[&str], env: &[(&str, &str)]) -> Output {
    let home = scratch();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_berthctl"));
    cmd.args(args)
        .env_remove("BERTH_CONTROLLER")
        .env_remove("BERTH_TOKEN")
        .env("XDG_CONFIG_HOME", &home)
        .env("HOME", &home);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run berthctl");
    let _ = std::fs::remove_dir_all(&home);
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Answers one request with `status` and `body`; the join handle gives the request line.
fn fake_controller(status: u16, body: &'static str) -> (String, JoinHandle<String>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut first = String::new();
        r.read_line(&mut first).expect("request line");
        let mut line = String::new();
        while r.read_line(&mut line).is_ok_and(|n| n > 2) {
            line.clear();
        }
        let resp = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).expect("write");
        first.trim().to_owned()
    });
    (url, h)
}

#[test]
fn unreachable_controller_exits_2_with_a_clear_message() {
    let url = format!("http://127.0.0.1:{}", dead_port());
    let o = berthctl(&["--controller", &url, "instances"], &[]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = stderr(&o);
    assert!(
        err.starts_with(&format!("error: cannot reach the controller at {url}")),
        "{err}"
    );
    assert!(
        err.contains("is it running? (set --controller or BERTH_CONTROLLER)"),
        "{err}"
    );

    // From the environment, the message says so.
    let o = berthctl(&["hosts"], &[("BERTH_CONTROLLER", &url)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("(from BERTH_CONTROLLER)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn flag_beats_env_beats_config_file() {
    let dead = format!("http://127.0.0.1:{}", dead_port());
    let dir = scratch();
    let cfg = dir.join("berthctl.toml");
    std::fs::write(&cfg, format!("controller = \"{dead}/from-file\"\n")).expect("write");
    let cfg = cfg.to_str().expect("utf-8");
    let o = berthctl(&["--config", cfg, "hosts"], &[]);
    assert!(
        stderr(&o).contains("(from `controller` in"),
        "{}",
        stderr(&o)
    );
    let o = berthctl(&["--config", cfg, "hosts"], &[("BERTH_CONTROLLER", &dead)]);
    assert!(
        stderr(&o).contains("(from BERTH_CONTROLLER)"),
        "{}",
        stderr(&o)
    );
    let o = berthctl(
        &["--config", cfg, "--controller", &dead, "hosts"],
        &[("BERTH_CONTROLLER", "http://127.0.0.1:9")],
    );
    assert!(stderr(&o).contains("(from --controller)"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn config_file_is_strict() {
    let dir = scratch();
    let cfg = dir.join("berthctl.toml");
    std::fs::write(&cfg, "controller = \"http://127.0.0.1:9\"\ntokn = \"x\"\n").expect("write");
    let o = berthctl(&["--config", cfg.to_str().expect("utf-8"), "hosts"], &[]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = stderr(&o);
    assert!(err.contains(&cfg.display().to_string()), "{err}");
    assert!(err.contains("unknown key `tokn`"), "{err}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn refused_token_exits_3_naming_where_it_came_from() {
    let (url, h) = fake_controller(
        403,
        r#"{"statusCode":403,"code":"INVALID_CREDENTIALS","message":"Invalid credentials.","details":"the token is unknown or revoked","identifier":"id-403","path":"/v1/hosts","timestamp":"2026-01-01T00:00:00Z"}"#,
    );
    let o = berthctl(
        &["--controller", &url, "hosts"],
        &[("BERTH_TOKEN", "wrong-token")],
    );
    h.join().expect("fake");
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    let err = stderr(&o);
    assert!(err.contains("refused the token from BERTH_TOKEN"), "{err}");
    assert!(err.contains("the token is unknown or revoked"), "{err}");

    let (url, h) = fake_controller(
        401,
        r#"{"statusCode":401,"code":"MISSING_CREDENTIALS","message":"Missing credentials.","details":"no Authorization header","identifier":"id-401","path":"/v1/hosts","timestamp":"2026-01-01T00:00:00Z"}"#,
    );
    let o = berthctl(&["--controller", &url, "hosts"], &[]);
    h.join().expect("fake");
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert!(
        stderr(&o).contains("--token, BERTH_TOKEN"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn refusal_shows_code_identifier_and_next_step_and_the_filter_is_encoded() {
    let (url, h) = fake_controller(
        404,
        r#"{"statusCode":404,"code":"NO_ALLOCATABLE_INSTANCE","message":"Unable to allocate application instance.","details":"fleetId=456 matches 40 instances: 38 allocated, 2 on unreachable hosts","identifier":"3bc545b7","path":"/v1/instances","timestamp":"2026-01-01T00:00:00Z"}"#,
    );
    let o = berthctl(
        &[
            "--controller",
            &url,
            "--token",
            "t",
            "instances",
            "--filter",
            "regionName=\"eu west\" and fleetId=456",
            "--status",
            "online",
            "--all",
        ],
        &[],
    );
    let request = h.join().expect("fake");
    assert_eq!(
        request,
        "GET /v1/instances?filter=regionName%3D%22eu%20west%22%20and%20fleetId%3D456&status=4&all=true HTTP/1.1"
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = stderr(&o);
    assert!(
        err.starts_with(
            "error: NO_ALLOCATABLE_INSTANCE (HTTP 404): fleetId=456 matches 40 instances"
        ),
        "{err}"
    );
    assert!(err.contains("\nidentifier: 3bc545b7\n"), "{err}");
    assert!(err.contains("run: berthctl errors show 3bc545b7"), "{err}");
}

#[test]
fn json_prints_the_answer_as_sent() {
    let (url, h) = fake_controller(200, r#"[{"zeta":1,"alpha":{"b":2.50,"a":[]}}]"#);
    let o = berthctl(&["--controller", &url, "hosts", "--json"], &[]);
    h.join().expect("fake");
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    // Field order and number spelling survive.
    assert!(
        out.find("zeta").expect("zeta") < out.find("alpha").expect("alpha"),
        "{out}"
    );
    assert!(out.contains("2.50"), "{out}");
}

#[test]
fn apply_checks_the_whole_file_before_any_request() {
    let dir = scratch();
    // A controller that is not there: a request would exit 2, validation exits 1.
    let url = format!("http://127.0.0.1:{}", dead_port());
    let cases: [(&str, &[&str]); 5] = [
        (
            "[[applications]]\nid = 7\nname = \"arena\"\n\n[[fleets]]\nid = 1\nname = \"f\"\napplicationId = 7\nprofileId = \"p\"\ninstances_per_host = 4\n",
            &[
                "fleets[0]",
                "unknown key `instances_per_host`",
                "did you mean `instancesPerHost`",
            ],
        ),
        (
            "[[applications]]\nid = 7\nname = \"a\"\n\n[[applications]]\nid = 8\nnmae = \"b\"\n",
            &[
                "applications[1]",
                "the 2nd [[applications]] table",
                "unknown key `nmae`",
            ],
        ),
        (
            "[[profiles]]\nid = \"p\"\napplicationId = \"seven\"\nexecutable = \"/x\"\n",
            &["profiles[0]", "key `applicationId`"],
        ),
        (
            "[[fleet]]\nid = 1\n",
            &["unknown key `fleet`", "[[fleets]]"],
        ),
        (
            "[[regions]]\nid = 1\nname = \"a\"\nping_ip = \"1.2.3.4\"\n",
            &["regions[0]", "`pingIp`"],
        ),
    ];
    for (i, (text, wants)) in cases.iter().enumerate() {
        let file = dir.join(format!("case{i}.toml"));
        std::fs::write(&file, text).expect("write");
        let f = file.to_str().expect("utf-8");
        let o = berthctl(&["--controller", &url, "apply", "-f", f], &[]);
        assert_eq!(o.status.code(), Some(1), "case {i}: {o:?}");
        let err = stderr(&o);
        assert!(err.contains(f), "case {i}: file not named:\n{err}");
        for w in *wants {
            assert!(err.contains(w), "case {i}: {w:?} missing:\n{err}");
        }
        assert!(err.contains("nothing was applied"), "case {i}:\n{err}");
    }
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn usage_errors_exit_64_not_2() {
    let o = berthctl(&["instances", "--status", "7"], &[]);
    assert_eq!(o.status.code(), Some(64), "{o:?}");
    let o = berthctl(&["allocate", "1", "--meta", "novalue"], &[]);
    assert_eq!(o.status.code(), Some(64), "{o:?}");
    assert!(stderr(&o).contains("KEY=VALUE"));
}

#[test]
fn header_values_with_control_characters_are_usage_errors() {
    let url = format!("http://127.0.0.1:{}", dead_port());
    let o = berthctl(
        &[
            "--controller",
            &url,
            "--token",
            "t",
            "allocate",
            "1",
            "--idempotency-key",
            "a\nb",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(64), "{o:?}");
    let err = stderr(&o);
    assert!(err.contains("--idempotency-key"), "{err}");
    assert!(err.contains("U+000A") && err.contains("uuidgen"), "{err}");

    let o = berthctl(
        &["--controller", &url, "instances"],
        &[("BERTH_TOKEN", "abc\u{7}def")],
    );
    assert_eq!(o.status.code(), Some(64), "{o:?}");
    let err = stderr(&o);
    assert!(
        err.contains("BERTH_TOKEN") && err.contains("U+0007"),
        "{err}"
    );
    // Not the token's value: it is a secret.
    assert!(!err.contains("def"), "{err}");
}
