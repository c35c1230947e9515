//! `berthctl apply -f FILE`: make the controller's regions, applications, builds, profiles and fleets
//! match a TOML file. Field names are exactly the API's camelCase ones, so what one GETs is what
//! one applies.
//!
//! The whole file is checked before the first request: a typo in the last fleet must not leave
//! the first half of a change applied.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use berth_protocol::agent_api::Profile;
use berth_protocol::controller_api::{Application, Build, Fleet, Region};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Exit;
use crate::client::Api;
use crate::render::pretty_json;
use berth_http::percent_encode;

/// One kind of resource the controller keeps under `/v1/<collection>`.
pub trait Kind: Serialize + DeserializeOwned + PartialEq + Clone {
    const KIND: &'static str;
    const COLLECTION: &'static str;
    fn id(&self) -> String;
    /// Copies fields the controller fills in itself, so they never count as a difference.
    fn adopt_server_fields(&mut self, _remote: &Self) {}
}

impl Kind for Region {
    const KIND: &'static str = "region";
    const COLLECTION: &'static str = "regions";
    fn id(&self) -> String {
        self.id.to_string()
    }
}

impl Kind for Application {
    const KIND: &'static str = "application";
    const COLLECTION: &'static str = "applications";
    fn id(&self) -> String {
        self.id.to_string()
    }
}

impl Kind for Build {
    const KIND: &'static str = "build";
    const COLLECTION: &'static str = "builds";
    fn id(&self) -> String {
        self.id.clone()
    }
}

impl Kind for Profile {
    const KIND: &'static str = "profile";
    const COLLECTION: &'static str = "profiles";
    fn id(&self) -> String {
        self.id.clone()
    }
}

impl Kind for Fleet {
    const KIND: &'static str = "fleet";
    const COLLECTION: &'static str = "fleets";
    fn id(&self) -> String {
        self.id.to_string()
    }
    fn adopt_server_fields(&mut self, remote: &Self) {
        self.deployment_environment_id = remote.deployment_environment_id;
    }
}

/// A resource of any kind, in the order it must be applied (what it refers to first).
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    Region(Region),
    Application(Application),
    Build(Box<Build>),
    Profile(Box<Profile>),
    Fleet(Box<Fleet>),
}

impl Resource {
    pub fn describe(&self) -> String {
        match self {
            Self::Region(r) => format!("region {}", r.id()),
            Self::Application(a) => format!("application {}", a.id()),
            Self::Build(b) => format!("build {}", b.id()),
            Self::Profile(p) => format!("profile {}", p.id()),
            Self::Fleet(f) => format!("fleet {}", f.id()),
        }
    }
}

/// The top-level tables, in apply order.
const TABLES: [&str; 5] = ["regions", "applications", "builds", "profiles", "fleets"];

/// Parses and checks the file completely; every error names the file, the table and the key.
pub fn parse(text: &str, file: &str) -> Result<Vec<Resource>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        format!("{file}: not valid TOML: {}", e.to_string().trim())
    })?;
    for key in table.keys() {
        if !TABLES.contains(&key.as_str()) {
            return Err(format!(
                "{file}: unknown key `{key}` at the top level; apply knows only the arrays of \
                 tables {}",
                TABLES.map(|t| format!("[[{t}]]")).join(", ")
            ));
        }
    }
    let mut out = Vec::new();
    for name in TABLES {
        let Some(value) = table.get(name) else {
            continue;
        };
        let items = value.as_array().ok_or_else(|| {
            format!("{file}: `{name}` must be an array of tables: write [[{name}]] (two brackets)")
        })?;
        match name {
            "regions" => out.extend(
                items_of::<Region>(file, name, items)?
                    .into_iter()
                    .map(Resource::Region),
            ),
            "applications" => out.extend(
                items_of::<Application>(file, name, items)?
                    .into_iter()
                    .map(Resource::Application),
            ),
            "builds" => out.extend(
                items_of::<Build>(file, name, items)?
                    .into_iter()
                    .map(|b| Resource::Build(Box::new(b))),
            ),
            "profiles" => out.extend(
                items_of::<Profile>(file, name, items)?
                    .into_iter()
                    .map(|p| Resource::Profile(Box::new(p))),
            ),
            _ => out.extend(
                items_of::<Fleet>(file, name, items)?
                    .into_iter()
                    .map(|f| Resource::Fleet(Box::new(f))),
            ),
        }
    }
    Ok(out)
}

fn items_of<T: Kind>(file: &str, name: &str, items: &[toml::Value]) -> Result<Vec<T>, String> {
    let mut out: Vec<T> = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!(
            "{file}: {name}[{i}] (the {} [[{name}]] table)",
            ordinal(i + 1)
        );
        if !item.is_table() {
            return Err(format!("{at}: must be a table, not {}", item.type_str()));
        }
        let parsed: T = serde_path_to_error::deserialize(item.clone())
            .map_err(|e| format!("{at}: {}", field_error(&e)))?;
        if let Some(first) = seen.insert(parsed.id(), i) {
            return Err(format!(
                "{at}: id {} is already used by {name}[{first}]; each {} must appear once",
                parsed.id(),
                T::KIND
            ));
        }
        out.push(parsed);
    }
    Ok(out)
}

/// serde's message, with the key it is about and a hint for the snake_case habit of TOML.
fn field_error(e: &serde_path_to_error::Error<toml::de::Error>) -> String {
    let path = e.path().to_string();
    let inner = e.inner().message().to_owned();
    let mut msg = if path.is_empty() || path == "." {
        inner.clone()
    } else {
        format!("key `{path}`: {inner}")
    };
    if let Some(rest) = inner.strip_prefix("unknown field `")
        && let Some(end) = rest.find('`')
    {
        let key = &rest[..end];
        let camel = camel_case(key);
        msg = format!("unknown key `{key}`");
        if camel != key && inner.contains(&format!("`{camel}`")) {
            msg.push_str(&format!(
                "; did you mean `{camel}`? apply uses the API's camelCase field names"
            ));
        }
        if let Some(expected) = inner.find("expected") {
            msg.push_str(&format!(" ({})", &inner[expected..]));
        }
    }
    msg
}

fn camel_case(s: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in s.chars() {
        if c == '_' || c == '-' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (1, 11) | (2, 12) | (3, 13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Created,
    /// With the fields that differed: `instancesPerHost: 4 → 8`.
    Updated(Vec<String>),
    Unchanged,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub kind: &'static str,
    pub id: String,
    pub action: Action,
    /// What the controller holds now.
    pub resource: Value,
}

impl Outcome {
    /// `created application 7`, `updated fleet 456 (instancesPerHost: 4 → 8)`.
    pub fn line(&self) -> String {
        match &self.action {
            Action::Created => format!("created {} {}", self.kind, self.id),
            Action::Unchanged => format!("unchanged {} {}", self.kind, self.id),
            Action::Updated(changes) if changes.is_empty() => {
                format!("updated {} {}", self.kind, self.id)
            }
            Action::Updated(changes) => {
                format!("updated {} {} ({})", self.kind, self.id, changes.join("; "))
            }
        }
    }

    pub fn to_json(&self) -> Value {
        let (action, changes) = match &self.action {
            Action::Created => ("created", Vec::new()),
            Action::Updated(c) => ("updated", c.clone()),
            Action::Unchanged => ("unchanged", Vec::new()),
        };
        serde_json::json!({
            "kind": self.kind,
            "id": self.id,
            "action": action,
            "changes": changes,
            "resource": self.resource,
        })
    }
}

pub async fn apply(api: &Api, r: &Resource) -> Result<Outcome> {
    match r {
        Resource::Region(x) => apply_typed(api, x).await,
        Resource::Application(x) => apply_typed(api, x).await,
        Resource::Build(x) => apply_typed(api, x.as_ref()).await,
        Resource::Profile(x) => apply_typed(api, x.as_ref()).await,
        Resource::Fleet(x) => apply_typed(api, x.as_ref()).await,
    }
}

async fn apply_typed<T: Kind>(api: &Api, desired: &T) -> Result<Outcome> {
    let id = desired.id();
    let one = format!("/v1/{}/{}", T::COLLECTION, percent_encode(&id));
    let outcome = |action, raw: &[u8]| Outcome {
        kind: T::KIND,
        id: id.clone(),
        action,
        resource: serde_json::from_slice(raw).unwrap_or(Value::Null),
    };
    let Some(raw) = api.get_opt(&one).await? else {
        let path = format!("/v1/{}", T::COLLECTION);
        let answer = api.post(&path, desired, &[]).await?;
        return Ok(outcome(Action::Created, &answer));
    };
    let remote: T = api.decode(&one, &raw)?;
    let mut desired = desired.clone();
    desired.adopt_server_fields(&remote);
    if desired == remote {
        return Ok(outcome(Action::Unchanged, &raw));
    }
    let changes = differences(&remote, &desired);
    let answer = api.put(&one, &desired).await?;
    Ok(outcome(Action::Updated(changes), &answer))
}

/// Top-level fields that differ, as `field: old → new`.
fn differences<T: Serialize>(old: &T, new: &T) -> Vec<String> {
    let (Ok(Value::Object(a)), Ok(Value::Object(b))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return Vec::new();
    };
    let short = |v: Option<&Value>| {
        let s = v.map_or_else(|| "(unset)".to_owned(), Value::to_string);
        if s.chars().count() > 40 {
            format!("{}…", s.chars().take(39).collect::<String>())
        } else {
            s
        }
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {} → {}", short(a.get(k)), short(b.get(k))))
        .collect()
}

pub async fn run(api: &Api, file: &Path, json: bool) -> Result<()> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Exit::failed(format!("error: cannot read {}: {e}", file.display())))?;
    let resources = parse(&text, &file.display().to_string())
        .map_err(|e| Exit::failed(format!("error: {e}\nnothing was applied")))?;
    if resources.is_empty() {
        println!(
            "{} has no [[regions]], [[applications]], [[builds]], [[profiles]] or [[fleets]]; nothing to do",
            file.display()
        );
        return Ok(());
    }
    let mut done = Vec::new();
    for r in &resources {
        let outcome = match apply(api, r).await {
            Ok(o) => o,
            Err(e) => {
                if !done.is_empty() && !json {
                    eprintln!(
                        "stopped at {}; the lines above were applied, the rest was not",
                        r.describe()
                    );
                }
                return Err(e);
            }
        };
        if !json {
            println!("{}", outcome.line());
        }
        done.push(outcome);
    }
    if json {
        let v = Value::Array(done.iter().map(Outcome::to_json).collect());
        println!("{}", pretty_json(v.to_string().as_bytes()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[fleets]]
id = 456
name = "arena-prod"
applicationId = 7
profileId = "arena-1.0"
regions = ["eu-west-1"]
instancesPerHost = 4

[[applications]]
id = 7
name = "arena"
managementProtocol = "arcus"

[[profiles]]
id = "arena-1.0"
applicationId = 7
build = "1.0.0"
executable = "/opt/arena/server"
args = ["-port={port}"]
env = { MODE = "ranked" }

[[regions]]
id = 1
name = "eu-west-1"
pingIp = "203.0.113.10"

[[builds]]
id = "arena-1.0.0"
applicationId = 7
version = "1.0.0"
executable = "/opt/arena/server"
"#;

    #[test]
    fn parses_in_dependency_order() {
        let r = parse(GOOD, "x.toml").expect("valid");
        let order: Vec<String> = r.iter().map(Resource::describe).collect();
        assert_eq!(
            order,
            [
                "region 1",
                "application 7",
                "build arena-1.0.0",
                "profile arena-1.0",
                "fleet 456"
            ]
        );
    }

    #[test]
    fn errors_name_file_table_and_key() {
        let e = parse(
            &GOOD.replace("instancesPerHost", "instances_per_host"),
            "f.toml",
        )
        .expect_err("snake");
        assert!(e.starts_with("f.toml: fleets[0]"), "{e}");
        assert!(e.contains("unknown key `instances_per_host`"), "{e}");
        assert!(e.contains("did you mean `instancesPerHost`"), "{e}");

        let e = parse(
            "[[applications]]\nid = 1\nname = \"a\"\n[[applications]]\nid = 2\nnmae = \"b\"\n",
            "f.toml",
        )
        .expect_err("typo");
        assert!(
            e.contains("applications[1] (the 2nd [[applications]] table)"),
            "{e}"
        );
        assert!(e.contains("`nmae`"), "{e}");

        let e =
            parse("[[applications]]\nid = \"seven\"\nname = \"a\"\n", "f.toml").expect_err("type");
        assert!(e.contains("key `id`"), "{e}");

        let e = parse("[[fleet]]\nid = 1\n", "f.toml").expect_err("table");
        assert!(e.contains("unknown key `fleet`"), "{e}");

        let e = parse("[applications]\nid = 1\n", "f.toml").expect_err("single");
        assert!(e.contains("[[applications]]"), "{e}");

        let e = parse(
            "[[regions]]\nid = 1\nname = \"a\"\n[[regions]]\nid = 1\nname = \"b\"\n",
            "f.toml",
        )
        .expect_err("dup");
        assert!(e.contains("already used by regions[0]"), "{e}");
    }

    #[test]
    fn differences_name_fields() {
        let a = Application {
            id: 1,
            name: "a".into(),
            management_protocol: Default::default(),
            confirm_allocation: false,
        };
        let mut b = a.clone();
        b.confirm_allocation = true;
        assert_eq!(differences(&a, &b), ["confirmAllocation: false → true"]);
    }
}
