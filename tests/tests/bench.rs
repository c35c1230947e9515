//! `berth-bench` itself, briefly: `allocate` in both of its modes and `inventory`.
//! BENCHMARKS.md's figures come from it, so it must keep starting a cluster, driving it and
//! checking durability. Its figures are not asserted here (a debug build on a shared CI
//! machine says nothing about speed); what is asserted is that every allocation it made was
//! answered and durable, and that every synthetic host registered.

use std::process::{Command, Stdio};

use berth_e2e::{bin, bin_dir};
use serde_json::Value;

/// Runs `berth-bench <args> --json --bin-dir …`; returns its last line, parsed, and the line.
fn run_bench(args: &[&str]) -> (Value, String) {
    let out = Command::new(bin("berth-bench"))
        .args(args)
        .arg("--json")
        .arg("--bin-dir")
        .arg(bin_dir())
        .stdin(Stdio::null())
        .output()
        .expect("run berth-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "berth-bench {args:?} failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    let line = stdout.lines().last().unwrap_or_default().to_owned();
    let result: Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}\n{stderr}"));
    eprintln!("berth-bench {args:?}: {line}");
    (result, line)
}

fn run_allocate(extra: &[&str]) -> Value {
    let mut args = vec![
        "allocate",
        "--seconds",
        "1",
        "--concurrency",
        "2",
        "--agents",
        "2",
        "--instances-per-agent",
        "40",
    ];
    args.extend_from_slice(extra);
    let (result, line) = run_bench(&args);
    for figure in ["allocations", "heldAcrossControllerKill"] {
        assert!(
            result[figure].as_u64().is_some_and(|n| n > 0),
            "{figure}: {line}"
        );
    }
    assert_eq!(result["durable"], true, "{line}");
    assert_eq!(result["matchesGivenAway"], 0, "{line}");
    assert_eq!(result["instancesNotReturned"], 0, "{line}");
    assert_eq!(result["errors"], 0, "{line}");
    assert_eq!(result["halfLoad"]["errors"], 0, "{line}");
    assert_eq!(result["unloaded"]["errors"], 0, "{line}");
    result
}

#[test]
fn the_allocate_benchmark_runs_with_either_kind_of_release() {
    let cycles = run_allocate(&[]);
    assert_eq!(cycles["releasedBy"], "matchmaker");
    assert_eq!(cycles["matchSeconds"], Value::Null);

    // Games that end their own matches: the matchmakers only allocate, so the run goes on
    // only as long as the games hand their instances back.
    let matches = run_allocate(&["--match-seconds", "0.01"]);
    assert_eq!(matches["releasedBy"], "game");
    assert_eq!(matches["matchSeconds"], 0.01);
    let allocations = matches["allocations"].as_u64().unwrap_or(0);
    assert!(
        allocations > 80,
        "{allocations} allocations in the measured second from 80 instances: games did not hand \
         them back"
    );
}

/// `berth-bench inventory` (BENCHMARKS.md's controller memory figures), small: every synthetic
/// host registers and the controller lists every instance.
#[test]
fn the_inventory_benchmark_registers_every_host() {
    let (result, line) = run_bench(&["inventory", "--instances", "300", "--per-host", "100"]);
    assert_eq!(result["hosts"], 3, "{line}");
    assert_eq!(result["instances"], 300, "{line}");
}
