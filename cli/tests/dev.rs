//! `berthctl dev --check` end to end: real controller, agent and sample games, an allocation,
//! the game's own confirmation that the metadata arrived, and a clean stop.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use berth_e2e::{bin_dir, free_port, pid_alive};

/// Runs berthctl, interrupting it (so it still cleans up) if it takes far too long.
fn run_with_deadline(mut cmd: Command, deadline: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn berthctl");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(deadline) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let out = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("berthctl ignored SIGINT")
                .expect("wait");
            panic!(
                "berthctl dev --check took over {deadline:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn dev_check_runs_a_cluster_allocates_and_stops_cleanly() {
    let bins = bin_dir();
    let data = std::env::temp_dir().join(format!("berthctl-dev-{}", uuid::Uuid::new_v4()));
    let controller_port = free_port();
    let mut agent_port = free_port();
    while agent_port == controller_port {
        agent_port = free_port();
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_berthctl"));
    cmd.arg("dev")
        .arg("--check")
        .arg("--bin-dir")
        .arg(bins)
        .arg("--data-dir")
        .arg(&data)
        .args(["--controller-port", &controller_port.to_string()])
        .args(["--agent-port", &agent_port.to_string()])
        .args(["--instances", "2"])
        .args(["--game-ports", "26000-26099"])
        .args(["--management-ports", "32000-32099"])
        .env_remove("BERTH_CONTROLLER")
        .env_remove("BERTH_TOKEN")
        .stdin(Stdio::null());
    let out = run_with_deadline(cmd, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("2 sample games online"), "{stdout}");
    assert!(stdout.contains("dev check passed"), "{stdout}");
    assert!(
        stdout.contains("stopped: berth-agent, berth-controller, 2 sample games"),
        "{stdout}"
    );

    // Every game the agent started is gone (a zombie awaiting its reaper counts as gone).
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data.join("agent/agent-state.json")).expect("agent state"),
    )
    .expect("state json");
    let pids: Vec<u64> = state["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|i| i["pid"].as_u64())
        .collect();
    assert_eq!(pids.len(), 2, "{state}");
    for pid in pids {
        let pid = u32::try_from(pid).expect("a pid");
        assert!(!pid_alive(pid), "game pid {pid} still runs");
    }
    std::fs::remove_dir_all(&data).expect("cleanup");
}

#[test]
fn dev_names_missing_binaries_and_the_build_command() {
    let empty = std::env::temp_dir().join(format!("berthctl-nobins-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&empty).expect("dir");
    let out = Command::new(env!("CARGO_BIN_EXE_berthctl"))
        .arg("dev")
        .arg("--bin-dir")
        .arg(&empty)
        .arg("--data-dir")
        .arg(empty.join("data"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    for name in ["berth-controller", "berth-agent", "berth-sample-game"] {
        assert!(err.contains(name), "{name} not named:\n{err}");
    }
    assert!(err.contains("cargo build --workspace --bins"), "{err}");
    std::fs::remove_dir_all(&empty).expect("cleanup");
}
