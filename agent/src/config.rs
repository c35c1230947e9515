//! `agent.toml`: strict parsing, single-key overrides from flags and `BERTH_*` variables, and
//! validation into [`Config`] before any port is bound.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Exit code for a bad configuration (sysexits `EX_CONFIG`); systemd units list it in
/// `RestartPreventExitStatus=` so a typo does not become a restart loop.
pub const EXIT_CONFIG: i32 = 78;

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

/// A configuration key that is wrong, and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub message: String,
}

/// How the agent writes its logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// JSON when stderr is not a terminal (systemd), human text otherwise.
    Auto,
    Json,
    Text,
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
    /// Tokens accepted on the API besides the one the agent gives the controller.
    pub api_tokens: Vec<String>,
}

/// Keys that `BERTH_<KEY>` variables and flags may override.
const OVERRIDABLE: &[&str] = &[
    "controller_url",
    "join_token",
    "join_token_file",
    "listen",
    "advertise_url",
    "state_dir",
    "log_dir",
    "host_name",
    "region",
    "dc_location",
    "is_virtual",
    "game_ports",
    "management_ports",
    "run_as_user",
    "allocation_timeout_ms",
    "max_instances",
    "log_format",
];

impl Config {
    /// Reads, overrides and validates. `overrides` are `(key, value)` pairs from flags; they win
    /// over `BERTH_*` variables, which win over the file.
    pub fn load(
        path: Option<&Path>,
        env: &[(String, String)],
        overrides: &[(&str, String)],
    ) -> Result<Self, ConfigError> {
        let file = path.map_or_else(|| "(defaults)".to_owned(), |p| p.display().to_string());
        let err = |key: &str, message: String| ConfigError {
            file: file.clone(),
            key: key.to_owned(),
            message,
        };
        let text = match path {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| err("(file)", format!("cannot read the file: {e}")))?,
            None => String::new(),
        };
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| err(&toml_key(&e, &text), e.message().to_owned()))?;
        for (name, value) in env {
            let Some(key) = name.strip_prefix("BERTH_") else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            if OVERRIDABLE.contains(&key.as_str()) {
                table.insert(key.clone(), typed_override(&key, value));
            }
        }
        for (key, value) in overrides {
            table.insert((*key).to_owned(), typed_override(key, value));
        }
        // Parsed from text (not from the table) so that every error has a span, and so a key.
        let merged = toml::to_string(&table)
            .map_err(|e| err("(file)", format!("cannot merge overrides: {e}")))?;
        let raw: RawConfig = toml::from_str(&merged).map_err(|e: toml::de::Error| {
            let msg = e.message().to_owned();
            let key = unknown_field(&msg).unwrap_or_else(|| toml_key(&e, &merged));
            err(&key, msg)
        })?;
        Self::validate(raw, &err)
    }

    fn validate(
        raw: RawConfig,
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
            Some(u) => Some(
                check_url("controller_url", &u, err)?
                    .trim_end_matches('/')
                    .to_owned(),
            ),
            None => None,
        };
        let join_token = secret(raw.join_token, raw.join_token_file, "join_token", err)?;
        if controller_url.is_some() && join_token.is_none() {
            return Err(err(
                "join_token",
                "controller_url is set but no join_token or join_token_file: the agent cannot register"
                    .to_owned(),
            ));
        }

        let advertise_url = match raw.advertise_url {
            Some(u) => check_url("advertise_url", &u, err)?
                .trim_end_matches('/')
                .to_owned(),
            None => {
                let ip = if listen.ip().is_unspecified() {
                    default_ip()
                } else {
                    listen.ip()
                };
                format!("http://{}", SocketAddr::new(ip, listen.port()))
            }
        };

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
        let log_format = match raw.log_format.as_deref() {
            None | Some("auto") => LogFormat::Auto,
            Some("json") => LogFormat::Json,
            Some("text") => LogFormat::Text,
            Some(other) => {
                return Err(err(
                    "log_format",
                    format!("{other:?} is not one of \"auto\", \"json\", \"text\""),
                ));
            }
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
            let token = secret(t.token, t.token_file, &format!("{key}.token"), err)?
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
            api_tokens,
        })
    }
}

/// Flags and variables arrive as strings; give the keys that are not strings their type so the
/// strict parse accepts them.
fn typed_override(key: &str, value: &str) -> toml::Value {
    match key {
        "is_virtual" => match value {
            "true" | "1" => toml::Value::Boolean(true),
            "false" | "0" => toml::Value::Boolean(false),
            _ => toml::Value::String(value.to_owned()),
        },
        "allocation_timeout_ms" | "max_instances" => value.parse::<i64>().map_or_else(
            |_| toml::Value::String(value.to_owned()),
            toml::Value::Integer,
        ),
        _ => toml::Value::String(value.to_owned()),
    }
}

/// The name in serde's "unknown field `x`, expected …" message.
fn unknown_field(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_owned())
}

/// The key a TOML error points at, from its span in the text.
fn toml_key(e: &toml::de::Error, text: &str) -> String {
    e.span()
        .and_then(|span| {
            let line_start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
            let line = &text[line_start..];
            let line = &line[..line.find('\n').unwrap_or(line.len())];
            let key = line.split('=').next()?.trim();
            (!key.is_empty()).then(|| key.to_owned())
        })
        .unwrap_or_else(|| "(syntax)".to_owned())
}

fn check_url<'a>(
    key: &str,
    url: &'a str,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<&'a str, ConfigError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| err(key, format!("{url:?} must start with http:// or https://")))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(err(key, format!("{url:?} has no host")));
    }
    if url.starts_with("https://") {
        return Err(err(
            key,
            format!(
                "{url:?}: TLS to the controller is not supported yet; use http:// on a private network"
            ),
        ));
    }
    Ok(url)
}

/// A secret given inline or in a file (first line, trimmed).
fn secret(
    inline: Option<String>,
    file: Option<PathBuf>,
    key: &str,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Option<String>, ConfigError> {
    let value = match (inline, file) {
        (Some(_), Some(_)) => {
            return Err(err(
                key,
                format!("set either {key} or {key}_file, not both"),
            ));
        }
        (Some(v), None) => v,
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map_err(|e| {
                err(
                    &format!("{key}_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?
            .trim()
            .to_owned(),
        (None, None) => return Ok(None),
    };
    if value.len() < 16 {
        return Err(err(
            key,
            "is shorter than 16 characters; use a long random secret (openssl rand -hex 32)"
                .to_owned(),
        ));
    }
    Ok(Some(value))
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
