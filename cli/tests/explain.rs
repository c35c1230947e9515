//! `berthctl explain` for every code of ERRORS.md, in both of the forms people paste: the
//! string code (any case) and the 76000-series number. Offline by design: the controller URL
//! points nowhere and the command must still succeed.

use std::process::{Command, Output};

use berth_protocol::ErrorCode;

fn berthctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_berthctl"))
        .args(args)
        .env("BERTH_CONTROLLER", "http://127.0.0.1:9")
        .env_remove("BERTH_TOKEN")
        .output()
        .expect("run berthctl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The block of `out` that explains `code` (76007 prints two blocks).
fn block_of(out: &str, code: ErrorCode) -> String {
    let start = out
        .lines()
        .position(|l| l == code.as_str())
        .unwrap_or_else(|| panic!("no block headed {code} in:\n{out}"));
    out.lines()
        .skip(start)
        .take_while(|l| {
            // The next block starts with another code on a line of its own.
            !ErrorCode::ALL
                .iter()
                .any(|c| *c != code && *l == c.as_str())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_explains(out: &str, code: ErrorCode) {
    let block = block_of(out, code);
    let e = code.explain();
    assert!(
        block.contains(e.meaning),
        "{code}: meaning missing:\n{block}"
    );
    for c in e.causes {
        assert!(block.contains(c), "{code}: cause {c:?} missing:\n{block}");
    }
    for c in e.checks {
        assert!(block.contains(c), "{code}: check {c:?} missing:\n{block}");
    }
    let status = block
        .lines()
        .find(|l| l.trim_start().starts_with("HTTP status:"))
        .unwrap_or_else(|| panic!("{code}: no HTTP status line:\n{block}"));
    assert_eq!(
        status.split_whitespace().last(),
        Some(code.http_status().to_string().as_str()),
        "{code}: wrong status line {status:?}"
    );
    match code.agent_code() {
        Some(n) => assert!(
            block.contains(&n.to_string()),
            "{code}: errorCode {n} missing"
        ),
        None => assert!(
            block.contains("errorCode:"),
            "{code}: errorCode line missing"
        ),
    }
    assert!(block.contains("Likely causes:") && block.contains("What to check:"));
}

#[test]
fn explains_every_string_code_in_any_case() {
    for code in ErrorCode::ALL {
        for form in [code.as_str().to_ascii_lowercase(), code.as_str().to_owned()] {
            let o = berthctl(&["explain", &form]);
            assert!(o.status.success(), "explain {form}: {o:?}");
            assert_explains(&stdout(&o), code);
        }
    }
}

#[test]
fn explains_every_agent_number_with_all_its_codes() {
    for code in ErrorCode::ALL {
        let Some(n) = code.agent_code() else {
            continue;
        };
        let o = berthctl(&["explain", &n.to_string()]);
        assert!(o.status.success(), "explain {n}: {o:?}");
        let out = stdout(&o);
        for c in ErrorCode::from_agent_code(n) {
            assert_explains(&out, c);
        }
    }
    let out = stdout(&berthctl(&["explain", "76007"]));
    assert!(out.contains("ALLOCATION_TIMED_OUT") && out.contains("AGENT_UNREACHABLE"));
}

#[test]
fn explain_json_has_every_field() {
    let o = berthctl(&["explain", "76006", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["code"], "INSTANCE_ALREADY_ALLOCATED");
    assert_eq!(v["errorCode"], 76006);
    assert_eq!(v["httpStatus"], 422);
    assert!(v["causes"].as_array().is_some_and(|c| !c.is_empty()));
}

#[test]
fn explain_all_lists_every_code() {
    let o = berthctl(&["explain", "--all"]);
    assert!(o.status.success(), "{o:?}");
    let out = stdout(&o);
    for code in ErrorCode::ALL {
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(code.as_str()))
            .unwrap_or_else(|| panic!("{code} not listed:\n{out}"));
        assert!(line.contains(&code.http_status().to_string()), "{line}");
    }
}

#[test]
fn unknown_code_fails_listing_the_valid_ones() {
    let o = berthctl(&["explain", "NO_SUCH_THING"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("\"NO_SUCH_THING\" is not a Berth error code"),
        "{err}"
    );
    for code in ErrorCode::ALL {
        assert!(err.contains(code.as_str()), "{code} not listed:\n{err}");
    }
    let o = berthctl(&["explain", "76099"]);
    assert_eq!(o.status.code(), Some(1));
}
