//! What `berth-agent` and `berth-controller` share outside HTTP: strict configuration files
//! with single-key overrides and errors that name the key, secrets read from files, the
//! tracing setup (JSON under systemd, text on a terminal), the stop signals, and the lock
//! that keeps a second daemon off the same state ([`state_lock`]).

pub mod state_lock;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::de::DeserializeOwned;

/// Exit code for a bad configuration (sysexits `EX_CONFIG`); the systemd units list it in
/// `RestartPreventExitStatus=` so a typo does not become a restart loop.
pub const EXIT_CONFIG: u8 = 78;

/// A configuration key that is wrong, and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub message: String,
}

/// Builds [`ConfigError`]s for one file.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub name: String,
}

impl ConfigFile {
    pub fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.name.clone(),
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

/// How a value given as a string (flag or variable) becomes TOML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Str,
    Bool,
    Int,
    Float,
}

/// Reads `path` (or nothing), applies `BERTH_<KEY>` variables from `env` and then `flags` for
/// the keys in `overridable`, and parses the result strictly into `T`.
pub fn load<T: DeserializeOwned>(
    path: Option<&Path>,
    env: &[(String, String)],
    flags: &[(&str, String)],
    overridable: &[(&str, Kind)],
) -> Result<(T, ConfigFile), ConfigError> {
    let file = ConfigFile {
        name: path.map_or_else(|| "(defaults)".to_owned(), |p| p.display().to_string()),
    };
    let text = match path {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| file.err("(file)", format!("cannot read the file: {e}")))?,
        None => String::new(),
    };
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| file.err(&toml_key(&e, &text), e.message()))?;
    let kind_of = |key: &str| overridable.iter().find(|(k, _)| *k == key).map(|(_, t)| *t);
    for (name, value) in env {
        let Some(key) = name.strip_prefix("BERTH_") else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        if let Some(kind) = kind_of(&key) {
            table.insert(key, typed(kind, value));
        }
    }
    for (key, value) in flags {
        let kind = kind_of(key).unwrap_or(Kind::Str);
        table.insert((*key).to_owned(), typed(kind, value));
    }
    // Parsed from text (not from the table) so that every error has a span, and so a key.
    let merged = toml::to_string(&table)
        .map_err(|e| file.err("(file)", format!("cannot merge overrides: {e}")))?;
    let raw: T = toml::from_str(&merged).map_err(|e: toml::de::Error| {
        let msg = e.message().to_owned();
        let key = unknown_field(&msg).unwrap_or_else(|| toml_key(&e, &merged));
        file.err(&key, msg)
    })?;
    Ok((raw, file))
}

fn typed(kind: Kind, value: &str) -> toml::Value {
    let s = || toml::Value::String(value.to_owned());
    match kind {
        Kind::Str => s(),
        Kind::Bool => match value {
            "true" | "1" => toml::Value::Boolean(true),
            "false" | "0" => toml::Value::Boolean(false),
            _ => s(),
        },
        Kind::Int => value.parse().map_or_else(|_| s(), toml::Value::Integer),
        Kind::Float => value.parse().map_or_else(|_| s(), toml::Value::Float),
    }
}

/// The name in serde's "unknown field `x`, expected …" message.
fn unknown_field(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_owned())
}

/// The key a TOML error points at, from the line of its span.
fn toml_key(e: &toml::de::Error, text: &str) -> String {
    e.span()
        .and_then(|span| {
            let start = span.start.min(text.len());
            let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
            let line = &text[line_start..];
            let line = &line[..line.find('\n').unwrap_or(line.len())];
            let key = line.split('=').next()?.trim();
            (!key.is_empty()).then(|| key.to_owned())
        })
        .unwrap_or_else(|| "(syntax)".to_owned())
}

/// A secret given inline or in a file (trimmed), at least 16 characters.
pub fn secret(
    file: &ConfigFile,
    key: &str,
    inline: Option<String>,
    path: Option<PathBuf>,
) -> Result<Option<String>, ConfigError> {
    let value = match (inline, path) {
        (Some(_), Some(_)) => {
            return Err(file.err(key, format!("set either {key} or {key}_file, not both")));
        }
        (Some(v), None) => v,
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map_err(|e| {
                file.err(
                    &format!("{key}_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?
            .trim()
            .to_owned(),
        (None, None) => return Ok(None),
    };
    if value.len() < 16 {
        return Err(file.err(
            key,
            "is shorter than 16 characters; use a long random secret (openssl rand -hex 32)",
        ));
    }
    Ok(Some(value))
}

/// Checks an `http://` or `https://host[:port]` URL and returns it without a trailing slash.
/// Whether the scheme fits the daemon's `[tls]` is the caller's check.
pub fn http_url(file: &ConfigFile, key: &str, url: &str) -> Result<String, ConfigError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| file.err(key, format!("{url:?} must start with http:// or https://")))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(file.err(key, format!("{url:?} has no host")));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// How a daemon writes its logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// JSON when stderr is not a terminal (systemd, files), human text on a terminal.
    Auto,
    Json,
    Text,
}

impl LogFormat {
    pub fn parse(file: &ConfigFile, value: Option<&str>) -> Result<Self, ConfigError> {
        match value {
            None | Some("auto") => Ok(Self::Auto),
            Some("json") => Ok(Self::Json),
            Some("text") => Ok(Self::Text),
            Some(other) => Err(file.err(
                "log_format",
                format!("{other:?} is not one of \"auto\", \"json\", \"text\""),
            )),
        }
    }
}

/// Installs the global subscriber. The level comes from `BERTH_LOG` (default `info`).
pub fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().with_current_span(true).init();
    } else {
        builder.init();
    }
}

/// The tokio runtime of a daemon: one thread runs everything when `worker_threads` is 1 (no
/// cross-thread wake-ups, the cheapest on small machines), otherwise a work-stealing pool.
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads)
            .enable_all()
            .build()
    }
}

/// The part of a daemon's `main` after its configuration is known to be valid: starts tracing
/// and the runtime, runs `run` with the stop signal, and maps the outcome to an exit code.
/// `name` (`berth-agent`) prefixes what is written to stderr; `stopping` is logged on a stop
/// signal (see [`shutdown_on_signal`]).
pub fn run_daemon<Fut, E>(
    name: &str,
    log_format: LogFormat,
    worker_threads: usize,
    stopping: &'static str,
    run: impl FnOnce(tokio::sync::watch::Receiver<bool>) -> Fut,
) -> ExitCode
where
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    init_tracing(log_format);
    let runtime = match runtime(worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async { run(shutdown_on_signal(stopping)).await });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let role = name.strip_prefix("berth-").unwrap_or(name);
            tracing::error!(error = %e, "{role} failed");
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The shutdown signal every task of a daemon watches: becomes `true` on SIGTERM or SIGINT,
/// after telling systemd the service is stopping. `what` is logged (e.g. "games keep running").
pub fn shutdown_on_signal(what: &'static str) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        stop_signal().await;
        tracing::info!("stopping: {what}");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        let _ = tx.send(true);
    });
    rx
}

/// Calls `reload` on every SIGHUP (`systemctl reload`: see the units' `ExecReload=`) until
/// `shutdown`, telling systemd the daemon is reloading meanwhile. Handling the signal also keeps
/// its default action, ending the process, from stopping a daemon sent one by mistake. The
/// handler is in place when this returns.
pub fn reload_on_hangup(
    mut reload: impl FnMut() + Send + 'static,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                received = hangups.recv() => {
                    if received.is_none() {
                        return;
                    }
                }
                _ = shutdown.changed() => return,
            }
            let mut states = vec![sd_notify::NotifyState::Reloading];
            // systemd 253 and later fail a reload announced without the time it began.
            states.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
            let _ = sd_notify::notify(false, &states);
            // A few small files read in place: a reload is rare and short, so it does not
            // earn a blocking-pool thread.
            reload();
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        }
    }))
}

/// Tells systemd the daemon is ready (no-op outside systemd).
pub fn notify_ready() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
}

/// Pings systemd's watchdog (when `WatchdogSec=` is set) only after `alive` answers true: the
/// probe is a round trip through the daemon's owner task, so a wedged state machine gets the
/// daemon restarted rather than kept alive by a healthy-looking timer.
pub async fn watchdog<F, Fut>(alive: F, mut shutdown: tokio::sync::watch::Receiver<bool>)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let period = std::time::Duration::from_micros(usec) / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.changed() => return,
        }
        if tokio::time::timeout(period, alive()).await.unwrap_or(false) {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        } else {
            tracing::error!("the owner task did not answer; withholding the watchdog ping");
        }
    }
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without handlers the default action (exit) applies, which is still a stop.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct T {
        a: Option<String>,
        n: Option<i64>,
        b: Option<bool>,
    }

    const KEYS: &[(&str, Kind)] = &[("a", Kind::Str), ("n", Kind::Int), ("b", Kind::Bool)];

    /// A config file in the temp dir that goes away with the test, so runs leave nothing behind.
    struct Written(PathBuf);

    impl std::ops::Deref for Written {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Written {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn write(text: &str) -> Written {
        let p = std::env::temp_dir().join(format!("berth-daemon-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&p, text).expect("write");
        Written(p)
    }

    #[test]
    fn errors_name_the_key() {
        let p = write("a = \"x\"\nzzz = 1\n");
        let e = load::<T>(Some(&p), &[], &[], KEYS).expect_err("unknown");
        assert_eq!(e.key, "zzz");
        let p = write("n = \"nope\"\n");
        assert_eq!(
            load::<T>(Some(&p), &[], &[], KEYS).expect_err("type").key,
            "n"
        );
        let p = write("a = \n");
        assert_eq!(
            load::<T>(Some(&p), &[], &[], KEYS).expect_err("syntax").key,
            "a"
        );
    }

    #[test]
    fn overrides_apply_in_order() {
        let p = write("a = \"file\"\nn = 1\n");
        let env = vec![
            ("BERTH_A".to_owned(), "env".to_owned()),
            ("BERTH_N".to_owned(), "7".to_owned()),
            ("BERTH_B".to_owned(), "true".to_owned()),
        ];
        let (t, _) = load::<T>(Some(&p), &env, &[("a", "flag".to_owned())], KEYS).expect("ok");
        assert_eq!(t.a.as_deref(), Some("flag"));
        assert_eq!(t.n, Some(7));
        assert_eq!(t.b, Some(true));
    }

    #[test]
    fn secrets_and_urls() {
        let f = ConfigFile { name: "x".into() };
        assert!(secret(&f, "t", Some("short".into()), None).is_err());
        assert_eq!(
            secret(&f, "t", Some("0123456789abcdef".into()), None)
                .expect("ok")
                .as_deref(),
            Some("0123456789abcdef")
        );
        assert_eq!(http_url(&f, "u", "https://x/").expect("ok"), "https://x");
        assert!(http_url(&f, "u", "ftp://x").is_err());
        assert!(http_url(&f, "u", "https://").is_err());
        assert_eq!(http_url(&f, "u", "http://x:1/").expect("ok"), "http://x:1");
    }
}
