//! Operations: both daemons under a service manager. sd_notify messages arrive on a
//! NOTIFY_SOCKET the test owns (READY once the port is bound, WATCHDOG pings from the owner
//! task, STOPPING on SIGTERM), SIGTERM exits 0, and `validate` exits 78 naming the key.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use berth_e2e::{PortBlock, TestDir, berth_command, bin, free_port};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Receives sd_notify datagrams like systemd does.
struct NotifySocket {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(path: &Path) -> Self {
        let sock = UnixDatagram::bind(path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        Self {
            sock,
            seen: Vec::new(),
        }
    }

    /// Waits for a datagram containing `line` (e.g. `READY=1`); panics with what arrived.
    fn expect(&mut self, line: &str, within: Duration) {
        let deadline = Instant::now() + within;
        if self.seen.iter().any(|m| m.lines().any(|l| l == line)) {
            return;
        }
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let hit = msg.lines().any(|l| l == line);
                self.seen.push(msg);
                if hit {
                    return;
                }
            }
        }
        panic!("no {line} within {within:?}; received: {:?}", self.seen);
    }
}

/// Kills the daemon if the test fails before it exits on its own.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        assert!(Instant::now() < deadline, "did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts `exe` the way systemd's Type=notify with WatchdogSec=0.6s would.
fn start_notified(exe: &Path, config: &Path, socket: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log");
    // systemd names the watched pid in WATCHDOG_PID; `exec` keeps the shell's pid, so `$$` is
    // the daemon's own.
    berth_command("/bin/sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" --config \"$1\"")
        .arg(exe)
        .arg(config)
        .env("NOTIFY_SOCKET", socket)
        .env("WATCHDOG_USEC", "600000")
        .env("BERTH_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn")
}

fn notify_cycle(exe: &Path, dir: &TestDir, config: &Path) {
    let socket = dir.join("notify.sock");
    let mut notify = NotifySocket::bind(&socket);
    let mut guard = Guard(start_notified(
        exe,
        config,
        &socket,
        &dir.join("daemon.log"),
    ));
    let child = &mut guard.0;
    notify.expect("READY=1", Duration::from_secs(30));
    // Pings come every third of the watchdog interval, each after a round trip through the
    // daemon's owner task.
    notify.expect("WATCHDOG=1", Duration::from_secs(5));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    notify.expect("STOPPING=1", Duration::from_secs(5));
    let status = wait_exit(child, Duration::from_secs(15));
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM must end in a clean exit: {status}"
    );
}

fn controller_toml(dir: &TestDir, port: u16) -> std::path::PathBuf {
    let path = dir.join("controller.toml");
    std::fs::write(
        &path,
        format!(
            r#"listen = "127.0.0.1:{port}"
database = "sqlite://{}"
join_token = "ops-join-token-0123456789"
[[tokens]]
token = "ops-admin-token-0123456789"
role = "admin"
"#,
            dir.join("controller.db").display()
        ),
    )
    .expect("write config");
    path
}

#[test]
fn controller_notifies_systemd_and_stops_cleanly() {
    let dir = TestDir::new("ops-controller-notify");
    let config = controller_toml(&dir, free_port());
    notify_cycle(&bin("berth-controller"), &dir, &config);
}

#[test]
fn agent_notifies_systemd_and_stops_cleanly() {
    let dir = TestDir::new("ops-agent-notify");
    let ports = PortBlock::next();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:{}"
state_dir = "{}"
host_name = "ops-1"
is_virtual = false
game_ports = "{}-{}"
management_ports = "{}-{}"
"#,
            free_port(),
            dir.join("state").display(),
            ports.game.start(),
            ports.game.end(),
            ports.management.start(),
            ports.management.end(),
        ),
    )
    .expect("write config");
    notify_cycle(&bin("berth-agent"), &dir, &config);
}

#[test]
fn controller_validate_exits_78_naming_the_key() {
    let dir = TestDir::new("ops-controller-validate");
    let good = controller_toml(&dir, free_port());
    let run = |path: &Path| {
        berth_command(bin("berth-controller"))
            .arg("--config")
            .arg(path)
            .arg("validate")
            .output()
            .expect("run validate")
    };
    let out = run(&good);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&good).expect("read");
    // With [tls], it says until when the certificate is valid.
    let tls = dir.join("tls.toml");
    let table = berth_http::tls::test_tls_table("controller.pem", "controller.key", "ca.pem");
    std::fs::write(&tls, format!("{text}{table}")).expect("write");
    let out = run(&tls);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("tls: certificate valid until 2126-10-31T13:36:21Z"),
        "{said}"
    );
    // Top-level keys go before the first table: appended at the end, they would land in the
    // last `[[tokens]]` entry and be refused there as unknown token fields instead.
    let top_level = |line: &str| {
        let broken = text.replacen("[[tokens]]", &format!("{line}\n[[tokens]]"), 1);
        assert_ne!(broken, text, "controller_toml() has a [[tokens]] table");
        broken
    };
    for (broken, key, says) in [
        (
            top_level("heartbeat_perod_ms = 5"),
            "heartbeat_perod_ms",
            // The keys offered instead are the top-level ones, not a token's.
            &[
                "unknown field `heartbeat_perod_ms`",
                "`heartbeat_period_ms`",
            ][..],
        ),
        (
            text.replace("role = \"admin\"", "role = \"root\""),
            "tokens[0].role",
            &["\"root\" is not one of"],
        ),
        (
            text.replace(
                "join_token = \"ops-join-token-0123456789\"",
                "join_token = \"short\"",
            ),
            "join_token",
            &["shorter than 16 characters"],
        ),
        (
            top_level("heartbeat_expiry_factor = 1.0"),
            "heartbeat_expiry_factor",
            // The range check itself, with the value it refused.
            &["1 is outside 1.5-100"],
        ),
    ] {
        let path = dir.join("broken.toml");
        std::fs::write(&path, &broken).expect("write");
        let out = run(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{key}: {stderr}");
        assert!(
            stderr.contains(&format!(": {key}: ")),
            "stderr must name {key}: {stderr}"
        );
        for needle in says {
            assert!(
                stderr.contains(needle),
                "{key}: stderr must say {needle:?}: {stderr}"
            );
        }
    }
    // Validation happens before anything is created: no database file appeared.
    assert!(!dir.join("controller.db").exists());
}
