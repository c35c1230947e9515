//! `controller.toml`: strict parsing, `BERTH_*` and flag overrides, and validation into
//! [`Config`] before any port is bound.

use std::collections::HashSet;
use std::fmt::Display;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use berth_daemon::{ConfigError, EXIT_CONFIG, LogFormat};
use berth_daemon::{ConfigFile, Kind};
use berth_http::tls::{ClientCerts, Tls, TlsFiles};
use berth_protocol::controller_api::{DcLocation, DeploymentEnvironment, Region};
use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    database: Option<String>,
    join_token: Option<String>,
    join_token_file: Option<PathBuf>,
    heartbeat_period_ms: Option<u64>,
    heartbeat_expiry_factor: Option<f64>,
    max_allocation_attempts: Option<u32>,
    reconcile_interval_ms: Option<u64>,
    error_retention: Option<usize>,
    log_format: Option<String>,
    worker_threads: Option<usize>,
    tls: Option<TlsFiles>,
    #[serde(default)]
    tokens: Vec<RawToken>,
    #[serde(default)]
    regions: Vec<RawRegion>,
    #[serde(default)]
    dc_locations: Vec<RawDcLocation>,
    #[serde(default)]
    deployment_environments: Vec<DeploymentEnvironment>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    token: Option<String>,
    token_file: Option<PathBuf>,
    role: String,
    name: Option<String>,
    /// Requests per second this token may make; 0 (the default) for no limit.
    rate_limit_per_second: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    id: u32,
    name: String,
    ping_ip: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDcLocation {
    id: u32,
    name: String,
    region: String,
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything.
    Admin,
    /// Allocate, release, read instances and error stories.
    Matchmaker,
}

/// A configured token, kept only as a SHA-256 digest.
#[derive(Debug, Clone)]
pub struct TokenEntry {
    pub digest: [u8; 32],
    pub role: Role,
    pub name: String,
    pub rate_limit: u64,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub database: PathBuf,
    pub join_token_digest: [u8; 32],
    pub heartbeat_period: Duration,
    pub heartbeat_expiry_factor: f64,
    pub max_allocation_attempts: u32,
    pub reconcile_interval: Duration,
    pub error_retention: usize,
    pub log_format: LogFormat,
    /// Runtime threads (1: everything but SQLite on one thread); half the cores by default.
    pub worker_threads: usize,
    pub tokens: Vec<TokenEntry>,
    pub regions: Vec<Region>,
    pub dc_locations: Vec<DcLocation>,
    pub deployment_environments: Vec<DeploymentEnvironment>,
    /// `[tls]`: HTTPS on the listener (agents' routes then need a client certificate) and
    /// towards agents.
    pub tls: Option<Tls>,
}

const OVERRIDABLE: &[(&str, Kind)] = &[
    ("listen", Kind::Str),
    ("database", Kind::Str),
    ("join_token", Kind::Str),
    ("join_token_file", Kind::Str),
    ("heartbeat_period_ms", Kind::Int),
    ("heartbeat_expiry_factor", Kind::Float),
    ("max_allocation_attempts", Kind::Int),
    ("reconcile_interval_ms", Kind::Int),
    ("error_retention", Kind::Int),
    ("log_format", Kind::Str),
    ("worker_threads", Kind::Int),
];

/// Half the cores, at least one. Allocation state has one owner task whatever the thread count,
/// and the SQLite writer and the kernel's network stack need cores too; every thread more is a
/// thread that other threads' wake-ups have to reach. On 2 cores one thread gave a higher peak
/// in 9 of 10 alternating benchmark runs (+4–22 %) and less controller CPU per allocation in
/// 10 of 10 than one thread per core (BENCHMARKS.md).
fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Config {
    pub fn load(
        path: Option<&Path>,
        env: &[(String, String)],
        flags: &[(&str, String)],
    ) -> Result<Self, ConfigError> {
        let (raw, file) = berth_daemon::load::<RawConfig>(path, env, flags, OVERRIDABLE)?;
        Self::validate(raw, &file)
    }

    /// The expiry window: a host silent this long is unreachable.
    pub fn expiry(&self) -> Duration {
        self.heartbeat_period.mul_f64(self.heartbeat_expiry_factor)
    }

    fn validate(raw: RawConfig, file: &ConfigFile) -> Result<Self, ConfigError> {
        let listen_text = raw.listen.unwrap_or_else(|| "0.0.0.0:6820".to_owned());
        let listen = listen_text.parse().map_err(|_| {
            file.err(
                "listen",
                format!("{listen_text:?} is not an address:port such as \"0.0.0.0:6820\""),
            )
        })?;
        let database = database_path(
            file,
            raw.database
                .as_deref()
                .unwrap_or("sqlite:///var/lib/berth/controller.db"),
        )?;
        let join_token =
            berth_daemon::secret(file, "join_token", raw.join_token, raw.join_token_file)?
                .ok_or_else(|| {
                    file.err(
                    "join_token",
                    "is required: agents register with it (generate one with openssl rand -hex 32)",
                )
                })?;
        let period = raw.heartbeat_period_ms.unwrap_or(1000);
        within(file, "heartbeat_period_ms", period, 100..=60_000, "")?;
        let factor = raw.heartbeat_expiry_factor.unwrap_or(5.0);
        within(
            file,
            "heartbeat_expiry_factor",
            factor,
            1.5..=100.0,
            ": one late heartbeat must not kill a host",
        )?;
        let attempts = raw.max_allocation_attempts.unwrap_or(3);
        within(file, "max_allocation_attempts", attempts, 1..=20, "")?;
        let reconcile = raw.reconcile_interval_ms.unwrap_or(1000);
        within(file, "reconcile_interval_ms", reconcile, 100..=600_000, "")?;
        let log_format = LogFormat::parse(file, raw.log_format.as_deref())?;
        let worker_threads = raw.worker_threads.unwrap_or_else(default_worker_threads);
        within(file, "worker_threads", worker_threads, 1..=256, "")?;

        let mut tokens = Vec::new();
        for (i, t) in raw.tokens.into_iter().enumerate() {
            let key = format!("tokens[{i}]");
            let role = match t.role.as_str() {
                "admin" => Role::Admin,
                "matchmaker" => Role::Matchmaker,
                other => {
                    return Err(file.err(
                        &format!("{key}.role"),
                        format!("{other:?} is not one of \"admin\", \"matchmaker\""),
                    ));
                }
            };
            let token = berth_daemon::secret(file, &format!("{key}.token"), t.token, t.token_file)?
                .ok_or_else(|| file.err(&key, "needs token or token_file"))?;
            tokens.push(TokenEntry {
                digest: digest(&token),
                role,
                name: t.name.unwrap_or_else(|| format!("{}-{i}", t.role)),
                rate_limit: t.rate_limit_per_second.unwrap_or(0),
            });
        }

        let mut region_ids = HashSet::new();
        let mut region_names = HashSet::new();
        let mut regions = Vec::new();
        for (i, r) in raw.regions.into_iter().enumerate() {
            let key = format!("regions[{i}]");
            if r.id == 0 || !region_ids.insert(r.id) {
                return Err(file.err(&format!("{key}.id"), format!("{} is 0 or used twice", r.id)));
            }
            if r.name.trim().is_empty() || !region_names.insert(r.name.clone()) {
                return Err(file.err(
                    &format!("{key}.name"),
                    format!("{:?} is empty or used twice", r.name),
                ));
            }
            if let Some(ip) = &r.ping_ip
                && ip.parse::<std::net::IpAddr>().is_err()
            {
                return Err(file.err(
                    &format!("{key}.ping_ip"),
                    format!("{ip:?} is not an IP address"),
                ));
            }
            regions.push(Region {
                id: r.id,
                name: r.name,
                ping_ip: r.ping_ip,
            });
        }
        let mut dc_locations = Vec::new();
        let mut dc_ids = HashSet::new();
        for (i, d) in raw.dc_locations.into_iter().enumerate() {
            let key = format!("dc_locations[{i}]");
            let region = regions.iter().find(|r| r.name == d.region).ok_or_else(|| {
                file.err(
                    &format!("{key}.region"),
                    format!("{:?} is not one of the [[regions]]", d.region),
                )
            })?;
            if d.id == 0 || !dc_ids.insert(d.id) {
                return Err(file.err(&format!("{key}.id"), format!("{} is 0 or used twice", d.id)));
            }
            dc_locations.push(DcLocation {
                id: d.id,
                name: d.name,
                region_id: region.id,
            });
        }
        let mut env_ids = HashSet::new();
        for (i, e) in raw.deployment_environments.iter().enumerate() {
            if e.id == 0 || !env_ids.insert(e.id) || e.name.trim().is_empty() {
                return Err(file.err(
                    &format!("deployment_environments[{i}]"),
                    format!(
                        "id {} / name {:?}: ids must be unique and non-zero, names non-empty",
                        e.id, e.name
                    ),
                ));
            }
        }
        let tls = match &raw.tls {
            None => None,
            Some(files) => Some(
                Tls::load(files, ClientCerts::Optional)
                    .map_err(|e| file.err(e.key(), e.to_string()))?,
            ),
        };
        Ok(Self {
            listen,
            database,
            join_token_digest: digest(&join_token),
            heartbeat_period: Duration::from_millis(period),
            heartbeat_expiry_factor: factor,
            max_allocation_attempts: attempts,
            reconcile_interval: Duration::from_millis(reconcile),
            error_retention: raw.error_retention.unwrap_or(10_000).max(100),
            log_format,
            worker_threads,
            tokens,
            regions,
            dc_locations,
            deployment_environments: raw.deployment_environments,
            tls,
        })
    }
}

/// `KEY: V is outside LO-HI` (then `why`, if any) unless `v` is in `range`.
fn within<T: PartialOrd + Display>(
    file: &ConfigFile,
    key: &str,
    v: T,
    range: RangeInclusive<T>,
    why: &str,
) -> Result<(), ConfigError> {
    if range.contains(&v) {
        return Ok(());
    }
    let (lo, hi) = range.into_inner();
    Err(file.err(key, format!("{v} is outside {lo}-{hi}{why}")))
}

/// `sqlite:///abs/path.db` or `sqlite://relative/path.db` → the file path.
fn database_path(file: &ConfigFile, url: &str) -> Result<PathBuf, ConfigError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Err(file.err(
            "database",
            "PostgreSQL is not supported yet; use sqlite:///var/lib/berth/controller.db",
        ));
    }
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| {
            file.err(
                "database",
                format!(
                    "{url:?} is not a sqlite:// URL such as sqlite:///var/lib/berth/controller.db"
                ),
            )
        })?;
    if path.is_empty() || path.contains(":memory:") || path.contains('?') {
        return Err(file.err(
            "database",
            format!("{url:?}: give a file path; in-memory databases would lose allocations"),
        ));
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let p = std::env::temp_dir().join(format!("berth-ctl-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&p, text).expect("write");
        let r = Config::load(Some(&p), &[], &[]);
        let _ = std::fs::remove_file(&p);
        r
    }

    const OK: &str = r#"
listen = "0.0.0.0:6820"
database = "sqlite:///var/lib/berth/controller.db"
join_token = "0123456789abcdef0123"
heartbeat_period_ms = 1000
heartbeat_expiry_factor = 5.0
[[tokens]]
token = "matchmaker-token-0123456789"
role = "matchmaker"
[[regions]]
id = 1
name = "eu-west-1"
ping_ip = "203.0.113.10"
"#;

    #[test]
    fn tls_files_are_checked_at_load() {
        let table = |cert: &str, key: &str, ca: &str| {
            format!("{OK}{}", berth_http::tls::test_tls_table(cert, key, ca))
        };
        let c = load(&table("controller.pem", "controller.key", "ca.pem")).expect("valid");
        assert!(c.tls.is_some());
        let e = load(&table("controller.pem", "agent.key", "ca.pem")).expect_err("mismatch");
        assert_eq!(e.key, "tls.key_file");
        let e = load(&table("controller.pem", "controller.key", "none.pem")).expect_err("no CA");
        assert_eq!(e.key, "tls.ca_file");
        assert!(e.to_string().contains("none.pem"), "{e}");
    }

    #[test]
    fn contract_keys_parse() {
        let c = load(OK).expect("valid");
        assert_eq!(c.database, PathBuf::from("/var/lib/berth/controller.db"));
        assert_eq!(c.expiry(), Duration::from_secs(5));
        assert_eq!(c.tokens[0].role, Role::Matchmaker);
        assert_eq!(c.regions[0].name, "eu-west-1");
    }

    #[test]
    fn bad_keys_are_named() {
        let key = |t: &str| load(t).expect_err("invalid").key;
        assert_eq!(key(&format!("{OK}\nbogus = 1")), "bogus");
        assert_eq!(
            key(&OK.replace("role = \"matchmaker\"", "role = \"root\"")),
            "tokens[0].role"
        );
        assert_eq!(
            key(&OK.replace("sqlite:///var", "postgres://var")),
            "database"
        );
        assert_eq!(key(&OK.replace("5.0", "1.0")), "heartbeat_expiry_factor");
        assert_eq!(
            key(&OK.replace("join_token = \"0123456789abcdef0123\"", "")),
            "join_token"
        );
        assert_eq!(
            key(&OK.replace("203.0.113.10", "nope")),
            "regions[0].ping_ip"
        );
    }

    #[test]
    fn range_messages_name_the_range() {
        let message = |t: &str| load(t).expect_err("invalid").message;
        assert_eq!(
            message(&OK.replace("5.0", "1.0")),
            "1 is outside 1.5-100: one late heartbeat must not kill a host"
        );
        assert_eq!(
            message(&OK.replace("= 1000", "= 99")),
            "99 is outside 100-60000"
        );
        assert_eq!(
            message(&format!("max_allocation_attempts = 21\n{OK}")),
            "21 is outside 1-20"
        );
        assert_eq!(
            message(&format!("reconcile_interval_ms = 600001\n{OK}")),
            "600001 is outside 100-600000"
        );
        assert_eq!(
            message(&format!("worker_threads = 0\n{OK}")),
            "0 is outside 1-256"
        );
    }
}
