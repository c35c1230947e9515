//! Where the controller is and which token to present: flag > environment > config file.
//!
//! Every value remembers where it came from, because "the token was refused" is only half an
//! answer at 3 a.m.; "the token from BERTH_TOKEN was refused" says what to fix.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::client::Api;
use crate::{EXIT_FAILED, Exit, Invocation};

pub const DEFAULT_CONTROLLER: &str = "http://127.0.0.1:6820";
const FILE_KEYS: [&str; 4] = ["controller", "token", "token_file", "ca_file"];

/// Where a setting came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Flag(&'static str),
    Env(&'static str),
    File {
        key: &'static str,
        path: PathBuf,
    },
    TokenFile {
        token_file: PathBuf,
        config: PathBuf,
    },
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flag(flag) => write!(f, "{flag}"),
            Self::Env(var) => write!(f, "{var}"),
            Self::File { key, path } => write!(f, "`{key}` in {}", path.display()),
            Self::TokenFile { token_file, config } => write!(
                f,
                "{} (token_file in {})",
                token_file.display(),
                config.display()
            ),
            Self::Default => f.write_str("the default"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub controller: String,
    pub controller_source: Source,
    pub token: Option<(String, Source)>,
    /// The CA an `https://` controller's certificate is checked against.
    pub ca_file: Option<(PathBuf, Source)>,
}

impl Settings {
    /// Fails (exit 1) when an `https://` controller has no CA to check it against, or the CA
    /// file cannot be used, naming where each setting came from.
    pub fn into_api(self) -> Result<Api> {
        if !self.controller.starts_with("https://") {
            return Ok(Api::new(
                self.controller,
                self.controller_source,
                self.token,
            ));
        }
        let Some((path, source)) = &self.ca_file else {
            return Err(Exit::failed(format!(
                "error: the controller {} (from {}) is https://, but no CA is set to check its \
                 certificate: give --ca-file (BERTH_CA_FILE, or ca_file in berthctl.toml) with \
                 the CA that signed it",
                self.controller, self.controller_source
            )));
        };
        let tls = berth_http::tls::trusting(path)
            .map_err(|e| Exit::failed(format!("error: CA file from {source}: {e}")))?;
        Ok(Api::new(self.controller, self.controller_source, self.token).with_tls(&tls))
    }
}

/// `berthctl.toml` after strict checking.
#[derive(Debug, Default)]
struct FileConfig {
    path: PathBuf,
    controller: Option<String>,
    token: Option<(String, Source)>,
    ca_file: Option<(PathBuf, Source)>,
}

pub fn default_config_path() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".config"),
    };
    Some(base.join("berth").join("berthctl.toml"))
}

pub fn resolve(inv: &Invocation) -> Result<Settings> {
    let cli = &inv.cli;
    let file = match &cli.config {
        Some(path) => Some(load_file(path)?.ok_or_else(|| {
            Exit::failed(format!(
                "error: config file {} does not exist (given with --config)",
                path.display()
            ))
        })?),
        None => match default_config_path() {
            Some(path) => load_file(&path)?,
            None => None,
        },
    };
    let nonempty = |v: &Option<String>| v.as_ref().filter(|s| !s.trim().is_empty()).cloned();

    let (controller, controller_source) = match nonempty(&cli.controller) {
        Some(c) if inv.controller_from_env => (c, Source::Env("BERTH_CONTROLLER")),
        Some(c) => (c, Source::Flag("--controller")),
        None => match file
            .as_ref()
            .and_then(|f| Some((f.controller.clone()?, &f.path)))
        {
            Some((c, path)) => (
                c,
                Source::File {
                    key: "controller",
                    path: path.clone(),
                },
            ),
            None => (DEFAULT_CONTROLLER.to_owned(), Source::Default),
        },
    };
    let controller = normalize_url(&controller).map_err(|why| {
        Exit::failed(format!(
            "error: controller URL from {controller_source}: {why}"
        ))
    })?;

    let token = match nonempty(&cli.token) {
        Some(t) if inv.token_from_env => Some((t.trim().to_owned(), Source::Env("BERTH_TOKEN"))),
        Some(t) => Some((t.trim().to_owned(), Source::Flag("--token"))),
        None => file.as_ref().and_then(|f| f.token.clone()),
    };
    let ca_file = match &cli.ca_file {
        Some(p) if inv.ca_file_from_env => Some((p.clone(), Source::Env("BERTH_CA_FILE"))),
        Some(p) => Some((p.clone(), Source::Flag("--ca-file"))),
        None => file.as_ref().and_then(|f| f.ca_file.clone()),
    };
    Ok(Settings {
        controller,
        controller_source,
        token,
        ca_file,
    })
}

/// `127.0.0.1:6820` is what people type; the scheme (`http://`) is implied.
pub fn normalize_url(url: &str) -> Result<String, String> {
    let url = url.trim();
    let (scheme, rest) = match url.split_once("://") {
        Some((s @ ("http" | "https"), rest)) => (s, rest),
        Some(_) => return Err(format!("{url:?} must start with http:// or https://")),
        None => ("http", url),
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{url:?} has no host"));
    }
    let full = format!("{scheme}://{rest}");
    if full.parse::<http::Uri>().is_err() {
        return Err(format!("{url:?} is not a valid URL"));
    }
    Ok(full)
}

/// Reads and strictly checks the file; `Ok(None)` when it does not exist.
fn load_file(path: &Path) -> Result<Option<FileConfig>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Exit::failed(format!(
                "error: cannot read config file {}: {e}",
                path.display()
            )));
        }
    };
    let fail = |msg: String| Exit::new(EXIT_FAILED, format!("error: {}: {msg}", path.display()));
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| fail(format!("not valid TOML: {}", e.message())))?;
    for key in table.keys() {
        if !FILE_KEYS.contains(&key.as_str()) {
            return Err(fail(format!(
                "unknown key `{key}`; berthctl.toml knows only {}",
                FILE_KEYS.join(", ")
            ))
            .into());
        }
    }
    let string = |key: &str| -> Result<Option<String>, Exit> {
        match table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(fail(format!(
                "`{key}` must be a string, not {}",
                other.type_str()
            ))),
        }
    };
    let controller = string("controller")?;
    let inline = string("token")?;
    let token_file = string("token_file")?;
    let token = match (inline, token_file) {
        (Some(_), Some(_)) => {
            return Err(fail("set either `token` or `token_file`, not both".to_owned()).into());
        }
        (Some(t), None) => Some((
            t.trim().to_owned(),
            Source::File {
                key: "token",
                path: path.to_owned(),
            },
        )),
        (None, Some(f)) => {
            // Relative to the config file, so the pair can be moved together.
            let file = path.parent().unwrap_or(Path::new(".")).join(f);
            let t = std::fs::read_to_string(&file)
                .map_err(|e| fail(format!("token_file {} cannot be read: {e}", file.display())))?;
            Some((
                t.trim().to_owned(),
                Source::TokenFile {
                    token_file: file,
                    config: path.to_owned(),
                },
            ))
        }
        (None, None) => None,
    };
    // Relative to the config file, as token_file is.
    let ca_file = string("ca_file")?.map(|f| {
        (
            path.parent().unwrap_or(Path::new(".")).join(f),
            Source::File {
                key: "ca_file",
                path: path.to_owned(),
            },
        )
    });
    Ok(Some(FileConfig {
        path: path.to_owned(),
        controller,
        token,
        ca_file,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            normalize_url("127.0.0.1:6820").unwrap(),
            "http://127.0.0.1:6820"
        );
        assert_eq!(normalize_url("http://h:1/").unwrap(), "http://h:1");
        assert_eq!(normalize_url("https://h:1/").unwrap(), "https://h:1");
        assert!(normalize_url("ftp://h").is_err());
        assert!(normalize_url("http://").is_err());
    }

    #[test]
    fn strict_file() {
        let dir = std::env::temp_dir().join(format!("berthctl-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("berthctl.toml");
        std::fs::write(&p, "controller = \"http://x:1\"\ntokn = \"abc\"\n").unwrap();
        let e = load_file(&p).unwrap_err().to_string();
        assert!(e.contains("unknown key `tokn`"), "{e}");
        std::fs::write(dir.join("t"), "secret-token\n").unwrap();
        std::fs::write(&p, "token_file = \"t\"\n").unwrap();
        let f = load_file(&p).unwrap().unwrap();
        let (tok, src) = f.token.unwrap();
        assert_eq!(tok, "secret-token");
        assert!(src.to_string().contains("token_file"));
        std::fs::write(&p, "token = \"a\"\ntoken_file = \"t\"\n").unwrap();
        assert!(load_file(&p).unwrap_err().to_string().contains("not both"));
        assert!(load_file(&dir.join("missing.toml")).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
