//! `agent.toml`: strict parsing, single-key overrides from flags and `BERTH_*` variables, and
//! validation into [`Config`] before any port is bound.

pub use berth_daemon::{ConfigError, EXIT_CONFIG, LogFormat};
use berth_daemon::{ConfigFile, Kind};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_http::tls::{ClientCerts, Tls, TlsFiles};

use crate::game_logs::LogPolicy;

/// A game's live log is rotated past 10 MiB by default (Nomad's per-file default too).
const DEFAULT_GAME_LOG_MAX_BYTES: u64 = 10 << 20;
const MIN_GAME_LOG_MAX_BYTES: u64 = 64 << 10;
const MAX_GAME_LOG_MAX_BYTES: u64 = 1 << 40;

/// The file as written. Unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    controller_url: Option<String>,
    join_token: Option<String>,
    join_token_file: Option<PathBuf>,
    listen: Option<String>,
    advertise_url: Option<String>,
    state_dir: Option<PathBuf>,
    log_dir: Option<PathBuf>,
    host_name: Option<String>,
    region: Option<String>,
    dc_location: Option<String>,
    is_virtual: Option<bool>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    addresses: Option<Vec<String>>,
    game_ports: Option<String>,
    management_ports: Option<String>,
    run_as_user: Option<String>,
    allocation_timeout_ms: Option<u64>,
    max_instances: Option<usize>,
    log_format: Option<String>,
    worker_threads: Option<usize>,
    game_log_max_bytes: Option<u64>,
    game_log_files: Option<u32>,
    game_log_retention_hours: Option<u64>,
    tls: Option<TlsFiles>,
    #[serde(default)]
    tokens: Vec<RawToken>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    token: Option<String>,
    token_file: Option<PathBuf>,
    #[serde(default)]
    role: Option<String>,
}

/// A user games run as instead of the agent's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub controller_url: Option<String>,
    pub join_token: Option<String>,
    pub listen: SocketAddr,
    pub advertise_url: String,
    pub state_dir: PathBuf,
    pub log_dir: PathBuf,
    pub host_name: String,
    pub region: String,
    pub dc_location: String,
    /// `None`: detect at start.
    pub is_virtual: Option<bool>,
    pub labels: BTreeMap<String, String>,
    pub addresses: Vec<String>,
    pub game_ports: RangeInclusive<u16>,
    pub management_ports: RangeInclusive<u16>,
    pub run_as: Option<RunAs>,
    pub allocation_timeout: Duration,
    pub max_instances: usize,
    pub log_format: LogFormat,
    /// Runtime threads (1: everything on one thread).
    pub worker_threads: usize,
    /// Tokens accepted on the API besides the one the agent gives the controller.
    pub api_tokens: Vec<String>,
    /// How games' log files are bounded.
    pub game_logs: LogPolicy,
    /// `[tls]`: HTTPS on the listener, for callers with a certificate the CA vouches for (the
    /// controller, operators), and towards the controller.
    pub tls: Option<Tls>,
}

/// Keys that `BERTH_<KEY>` variables and flags may override.
const OVERRIDABLE: &[(&str, Kind)] = &[
    ("controller_url", Kind::Str),
    ("join_token", Kind::Str),
    ("join_token_file", Kind::Str),
    ("listen", Kind::Str),
    ("advertise_url", Kind::Str),
    ("state_dir", Kind::Str),
    ("log_dir", Kind::Str),
    ("host_name", Kind::Str),
    ("region", Kind::Str),
    ("dc_location", Kind::Str),
    ("is_virtual", Kind::Bool),
    ("game_ports", Kind::Str),
    ("management_ports", Kind::Str),
    ("run_as_user", Kind::Str),
    ("allocation_timeout_ms", Kind::Int),
    ("max_instances", Kind::Int),
    ("log_format", Kind::Str),
    ("worker_threads", Kind::Int),
    ("game_log_max_bytes", Kind::Int),
    ("game_log_files", Kind::Int),
    ("game_log_retention_hours", Kind::Int),
];

impl Config {
    /// Reads, overrides and validates. `overrides` are `(key, value)` pairs from flags; they win
    /// over `BERTH_*` variables, which win over the file.
    pub fn load(
        path: Option<&Path>,
        env: &[(String, String)],
        overrides: &[(&str, String)],
    ) -> Result<Self, ConfigError> {
        let (raw, file) = berth_daemon::load::<RawConfig>(path, env, overrides, OVERRIDABLE)?;
        let err = |key: &str, message: String| file.err(key, message);
        Self::validate(raw, &file, &err)
    }

    fn validate(
        raw: RawConfig,
        file: &ConfigFile,
        err: &dyn Fn(&str, String) -> ConfigError,
    ) -> Result<Self, ConfigError> {
        let listen_text = raw.listen.unwrap_or_else(|| "0.0.0.0:6824".to_owned());
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            err(
                "listen",
                format!("{listen_text:?} is not an address:port such as \"0.0.0.0:6824\""),
            )
        })?;

        let controller_url = match raw.controller_url {
            Some(u) if u.is_empty() => None,
            Some(u) => Some(berth_daemon::http_url(file, "controller_url", &u)?),
            None => None,
        };
        let join_token =
            berth_daemon::secret(file, "join_token", raw.join_token, raw.join_token_file)?;
        if controller_url.is_some() && join_token.is_none() {
            return Err(err(
                "join_token",
                "controller_url is set but no join_token or join_token_file: the agent cannot register"
                    .to_owned(),
            ));
        }

        let tls = match &raw.tls {
            None => None,
            Some(files) => Some(
                Tls::load(files, ClientCerts::Required).map_err(|e| err(e.key(), e.to_string()))?,
            ),
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let advertise_url = match raw.advertise_url {
            Some(u) => berth_daemon::http_url(file, "advertise_url", &u)?,
            None => {
                let ip = if listen.ip().is_unspecified() {
                    default_ip()
                } else {
                    listen.ip()
                };
                format!("{scheme}://{}", SocketAddr::new(ip, listen.port()))
            }
        };
        // With TLS the listener speaks only TLS, and the controller must be reached over it.
        for (key, url) in [
            ("advertise_url", Some(&advertise_url)),
            ("controller_url", controller_url.as_ref()),
        ] {
            if let Some(url) = url
                && !url.starts_with(&format!("{scheme}://"))
            {
                return Err(err(
                    key,
                    format!(
                        "{url:?} must start with {scheme}:// {}",
                        if tls.is_some() {
                            "when [tls] is set"
                        } else {
                            "unless [tls] is set"
                        }
                    ),
                ));
            }
        }

        let state_dir = raw
            .state_dir
            .unwrap_or_else(|| PathBuf::from("/var/lib/berth/agent"));
        if state_dir.as_os_str().is_empty() {
            return Err(err("state_dir", "must not be empty".to_owned()));
        }
        let log_dir = raw.log_dir.unwrap_or_else(|| state_dir.join("logs"));

        let host_name = match raw.host_name {
            Some(h) if h.trim().is_empty() => {
                return Err(err("host_name", "must not be empty".to_owned()));
            }
            Some(h) => h,
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.is_empty())
                .ok_or_else(|| {
                    err(
                        "host_name",
                        "not set and the system host name cannot be read; set host_name".to_owned(),
                    )
                })?,
        };
        let region = raw.region.unwrap_or_else(|| "local".to_owned());
        if region.trim().is_empty() {
            return Err(err("region", "must not be empty".to_owned()));
        }
        let dc_location = raw.dc_location.unwrap_or_else(|| region.clone());

        let game_ports = port_range(
            "game_ports",
            raw.game_ports.as_deref().unwrap_or("20000-29999"),
            err,
        )?;
        let management_ports = port_range(
            "management_ports",
            raw.management_ports.as_deref().unwrap_or("30000-32767"),
            err,
        )?;
        if game_ports.start() <= management_ports.end()
            && management_ports.start() <= game_ports.end()
        {
            return Err(err(
                "management_ports",
                format!(
                    "{}-{} overlaps game_ports {}-{}; the two ranges must be separate",
                    management_ports.start(),
                    management_ports.end(),
                    game_ports.start(),
                    game_ports.end()
                ),
            ));
        }
        if let Some(eph) = ephemeral_range() {
            for (key, r) in [
                ("game_ports", &game_ports),
                ("management_ports", &management_ports),
            ] {
                if r.start() <= eph.end() && eph.start() <= r.end() {
                    return Err(err(
                        key,
                        format!(
                            "{}-{} overlaps the kernel's ephemeral port range {}-{} \
                             (/proc/sys/net/ipv4/ip_local_port_range): outgoing connections \
                             would take game ports; choose ports outside it or shrink the kernel range",
                            r.start(),
                            r.end(),
                            eph.start(),
                            eph.end()
                        ),
                    ));
                }
            }
        }

        let run_as = match raw.run_as_user {
            None => None,
            Some(name) => {
                let user = nix::unistd::User::from_name(&name)
                    .map_err(|e| err("run_as_user", format!("cannot look up {name:?}: {e}")))?
                    .ok_or_else(|| {
                        err(
                            "run_as_user",
                            format!("no such user {name:?}; create it (useradd --system {name}) or remove the key"),
                        )
                    })?;
                if user.uid.is_root() {
                    return Err(err(
                        "run_as_user",
                        format!("{name:?} is root; games must run unprivileged"),
                    ));
                }
                Some(RunAs {
                    name,
                    uid: user.uid.as_raw(),
                    gid: user.gid.as_raw(),
                })
            }
        };

        let allocation_timeout_ms = raw.allocation_timeout_ms.unwrap_or(5000);
        if !(100..=5000).contains(&allocation_timeout_ms) {
            return Err(err(
                "allocation_timeout_ms",
                format!(
                    "{allocation_timeout_ms} is outside 100-5000 (the protocol allows at most 5 s)"
                ),
            ));
        }
        let max_instances = raw.max_instances.unwrap_or(4096);
        if max_instances == 0 {
            return Err(err("max_instances", "must be at least 1".to_owned()));
        }
        let log_format = LogFormat::parse(file, raw.log_format.as_deref())?;
        let worker_threads = raw.worker_threads.unwrap_or(1);
        if !(1..=64).contains(&worker_threads) {
            return Err(err(
                "worker_threads",
                format!("{worker_threads} is outside 1-64"),
            ));
        }

        let max_bytes = raw.game_log_max_bytes.unwrap_or(DEFAULT_GAME_LOG_MAX_BYTES);
        if !(MIN_GAME_LOG_MAX_BYTES..=MAX_GAME_LOG_MAX_BYTES).contains(&max_bytes) {
            return Err(err(
                "game_log_max_bytes",
                format!(
                    "{max_bytes} is outside {MIN_GAME_LOG_MAX_BYTES}-{MAX_GAME_LOG_MAX_BYTES} \
                     (64 KiB to 1 TiB; the default is {DEFAULT_GAME_LOG_MAX_BYTES}, 10 MiB)"
                ),
            ));
        }
        let keep = raw.game_log_files.unwrap_or(2);
        if keep > 100 {
            return Err(err(
                "game_log_files",
                format!("{keep} is more than 100 rotated files per game"),
            ));
        }
        let retention_hours = raw.game_log_retention_hours.unwrap_or(72);
        if retention_hours > 24 * 366 {
            return Err(err(
                "game_log_retention_hours",
                format!("{retention_hours} is more than a year (8784 hours)"),
            ));
        }
        let game_logs = LogPolicy {
            max_bytes,
            keep,
            retention: Duration::from_secs(retention_hours * 3600),
        };

        let addresses = match raw.addresses {
            Some(list) => {
                for a in &list {
                    a.parse::<IpAddr>()
                        .map_err(|_| err("addresses", format!("{a:?} is not an IP address")))?;
                }
                list
            }
            None => vec![default_ip().to_string()],
        };

        let mut api_tokens = Vec::new();
        for (i, t) in raw.tokens.into_iter().enumerate() {
            let key = format!("tokens[{i}]");
            if let Some(role) = &t.role
                && role != "admin"
                && role != "controller"
            {
                return Err(err(
                    &format!("{key}.role"),
                    format!("{role:?} is not one of \"admin\", \"controller\""),
                ));
            }
            let token = berth_daemon::secret(file, &format!("{key}.token"), t.token, t.token_file)?
                .ok_or_else(|| err(&key, "needs token or token_file".to_owned()))?;
            api_tokens.push(token);
        }

        Ok(Self {
            controller_url,
            join_token,
            listen,
            advertise_url,
            state_dir,
            log_dir,
            host_name,
            region,
            dc_location,
            is_virtual: raw.is_virtual,
            labels: raw.labels,
            addresses,
            game_ports,
            management_ports,
            run_as,
            allocation_timeout: Duration::from_millis(allocation_timeout_ms),
            max_instances,
            log_format,
            worker_threads,
            api_tokens,
            game_logs,
            tls,
        })
    }
}

fn port_range(
    key: &str,
    text: &str,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<RangeInclusive<u16>, ConfigError> {
    let bad = || {
        err(
            key,
            format!("{text:?} is not a port range such as \"20000-29999\""),
        )
    };
    let (a, b) = text.split_once('-').ok_or_else(bad)?;
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if a == 0 || a > b {
        return Err(err(
            key,
            format!("{text:?}: the range must be low-high with 1 <= low <= high"),
        ));
    }
    if a < 1024 {
        return Err(err(
            key,
            format!("{text:?} includes privileged ports below 1024; games run unprivileged"),
        ));
    }
    Ok(a..=b)
}

/// The kernel's ephemeral port range, when it can be read.
pub fn ephemeral_range() -> Option<RangeInclusive<u16>> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|s| s.parse::<u16>().ok());
    Some(it.next()??..=it.next()??)
}

/// The address other machines most likely reach us on: the source address of a route to a
/// public address (no packet is sent), loopback when there is no route.
fn default_ip() -> IpAddr {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:9")?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("berth-agent-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("agent.toml");
        std::fs::write(&path, text).expect("write");
        let r = Config::load(Some(&path), &[], &[]);
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    #[test]
    fn contract_keys_parse() {
        let c = load(
            r#"
controller_url = "http://10.0.0.2:6820"
join_token = "0123456789abcdef0123"
listen = "0.0.0.0:6824"
advertise_url = "http://10.0.0.5:6824"
state_dir = "/var/lib/berth/agent"
host_name = "ams-bm-017"
region = "eu-west-1"
dc_location = "ams1"
is_virtual = false
labels = { tier = "gold" }
game_ports = "20000-29999"
management_ports = "30000-32767"
"#,
        )
        .expect("valid");
        assert_eq!(c.host_name, "ams-bm-017");
        assert_eq!(c.is_virtual, Some(false));
        assert_eq!(c.labels.get("tier").map(String::as_str), Some("gold"));
        assert_eq!(c.game_ports, 20000..=29999);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = load("listen = \"0.0.0.0:6824\"\nlisten_port = 5\n").expect_err("strict");
        assert_eq!(e.key, "listen_port");
    }

    #[test]
    fn bad_values_are_named() {
        assert_eq!(
            load("game_ports = \"a-b\"").expect_err("bad").key,
            "game_ports"
        );
        assert_eq!(load("listen = \"nope\"").expect_err("bad").key, "listen");
        assert_eq!(
            load("game_ports = \"20000-20010\"\nmanagement_ports = \"20005-20020\"")
                .expect_err("overlap")
                .key,
            "management_ports"
        );
        assert_eq!(
            load("controller_url = \"http://x:1\"")
                .expect_err("no token")
                .key,
            "join_token"
        );
        assert_eq!(
            load("is_virtual = \"maybe\"").expect_err("type").key,
            "is_virtual"
        );
        if let Some(eph) = ephemeral_range() {
            let text = format!("game_ports = \"{}-{}\"", eph.start(), eph.start() + 10);
            assert_eq!(load(&text).expect_err("ephemeral").key, "game_ports");
        }
    }

    #[test]
    fn game_log_bounds() {
        let c = load("").expect("defaults");
        assert_eq!(
            c.game_logs,
            LogPolicy {
                max_bytes: 10 << 20,
                keep: 2,
                retention: Duration::from_secs(72 * 3600),
            }
        );
        let e = load("game_log_max_bytes = 1000").expect_err("too small");
        assert_eq!(e.key, "game_log_max_bytes");
        assert!(e.to_string().contains("1000 is outside 65536-"), "{e}");
        assert_eq!(
            load("game_log_files = 101").expect_err("many").key,
            "game_log_files"
        );
        assert_eq!(
            load("game_log_retention_hours = 9000")
                .expect_err("long")
                .key,
            "game_log_retention_hours"
        );
        let c =
            load("game_log_max_bytes = 65536\ngame_log_files = 0\ngame_log_retention_hours = 0")
                .expect("edges");
        assert_eq!(c.game_logs.keep, 0);
        assert_eq!(c.game_logs.retention, Duration::ZERO);
    }

    fn tls_table(cert: &str, key: &str) -> String {
        berth_http::tls::test_tls_table(cert, key, "ca.pem")
    }

    #[test]
    fn tls_is_checked_before_anything_is_bound() {
        let tls = tls_table("agent.pem", "agent.key");
        let c = load(&format!("listen = \"127.0.0.1:6824\"\n{tls}")).expect("valid");
        assert!(c.tls.is_some());
        assert_eq!(
            c.advertise_url, "https://127.0.0.1:6824",
            "the default follows [tls]"
        );
        let e = load(&format!(
            "controller_url = \"http://10.0.0.2:6820\"\njoin_token = \"0123456789abcdef0123\"\n{tls}"
        ))
        .expect_err("plain controller URL with TLS");
        assert_eq!(e.key, "controller_url");
        assert!(e.to_string().contains("https://"), "{e}");
        let e = load("advertise_url = \"https://10.0.0.5:6824\"").expect_err("https without TLS");
        assert_eq!(e.key, "advertise_url");
        let e = load(&tls_table("missing.pem", "agent.key")).expect_err("missing");
        assert_eq!(e.key, "tls.cert_file");
        let e = load(&tls_table("agent.pem", "controller.key")).expect_err("mismatch");
        assert_eq!(e.key, "tls.key_file");
        let e = load("[tls]\ncert_file = \"a\"\n").expect_err("incomplete table");
        assert!(e.to_string().contains("key_file"), "{e}");
    }

    #[test]
    fn env_and_flags_override() {
        let env = vec![
            ("BERTH_REGION".to_owned(), "us-east-1".to_owned()),
            ("BERTH_IS_VIRTUAL".to_owned(), "true".to_owned()),
            ("UNRELATED".to_owned(), "x".to_owned()),
        ];
        let c = Config::load(None, &env, &[("region", "eu-west-2".to_owned())]).expect("valid");
        assert_eq!(c.region, "eu-west-2");
        assert_eq!(c.is_virtual, Some(true));
    }
}
