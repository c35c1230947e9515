//! `berthctl`, Berth's operator and on-call tool: hosts, instances, allocations, error stories,
//! error codes, declarative configuration, and a one-command dev cluster.
//!
//! Exit codes are part of the interface, so scripts can tell "the controller said no" from "there
//! is no controller" from "my token is wrong":
//! 0 success, 1 refused or failed, 2 controller unreachable, 3 token missing or refused,
//! 64 bad command line.

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

pub mod actions;
pub mod apply;
pub mod client;
pub mod dev;
pub mod errors;
pub mod explain;
pub mod hosts;
pub mod instances;
pub mod process;
pub mod render;
pub mod settings;

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_UNREACHABLE: u8 = 2;
pub const EXIT_AUTH: u8 = 3;
/// clap's own default (2) would collide with "controller unreachable".
pub const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "berthctl",
    version,
    about = "Berth's operator and on-call tool",
    long_about = "Berth's operator and on-call tool.\n\n\
        Start a local cluster with `berthctl dev`. Against a real controller, set BERTH_CONTROLLER \
        and BERTH_TOKEN (or ~/.config/berth/berthctl.toml) and run `berthctl instances`.\n\n\
        Exit codes: 0 ok, 1 refused or failed, 2 controller unreachable, 3 token missing or \
        refused, 64 bad command line."
)]
pub struct Cli {
    /// Controller base URL [default: http://127.0.0.1:6820].
    #[arg(
        long,
        global = true,
        env = "BERTH_CONTROLLER",
        value_name = "URL",
        help_heading = "Global options"
    )]
    pub controller: Option<String>,
    /// Bearer token for the controller.
    #[arg(
        long,
        global = true,
        env = "BERTH_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        value_parser = TokenParser,
        help_heading = "Global options"
    )]
    pub token: Option<String>,
    /// The CA certificate (PEM) that signed an `https://` controller's certificate.
    #[arg(
        long,
        global = true,
        env = "BERTH_CA_FILE",
        value_name = "FILE",
        help_heading = "Global options"
    )]
    pub ca_file: Option<PathBuf>,
    /// berthctl's own config file (keys: controller, token, token_file, ca_file)
    /// [default: ~/.config/berth/berthctl.toml].
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        help_heading = "Global options"
    )]
    pub config: Option<PathBuf>,
    /// Print the controller's JSON instead of tables.
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List hosts (or `hosts show ID|NAME`, `hosts delete ID|NAME`).
    Hosts(HostsArgs),
    /// List instances (or `instances show ID`, `instances info ID`).
    Instances(InstancesArgs),
    /// Allocate an idle instance of an application, as a matchmaker would.
    Allocate(AllocateArgs),
    /// Release an allocated instance.
    Deallocate(DeallocateArgs),
    /// Stop new allocations and instances on a host; running matches finish.
    Drain(DrainArgs),
    /// Follow a failed request by its identifier.
    Errors(ErrorsArgs),
    /// Explain an error code (works offline).
    Explain(ExplainArgs),
    /// Create or update applications, profiles, fleets and regions from a TOML file.
    Apply(ApplyArgs),
    /// Run a complete local cluster: controller, agent, sample games.
    Dev(DevArgs),
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct HostsArgs {
    #[command(subcommand)]
    pub command: Option<HostsCommand>,
}

#[derive(Debug, Subcommand)]
pub enum HostsCommand {
    /// Everything about one host, by id or name.
    Show { host: String },
    /// Forget a host taken out of service (its agent stopped, the machine gone).
    ///
    /// Refused while its agent is heard from, and while it holds allocations unless told to
    /// release them. Its instances leave the inventory; an agent that comes back later
    /// registers as a new host.
    Delete {
        /// Host id or name.
        host: String,
        /// Release the host's allocations with it (if it is only cut off, its matches may
        /// still be running).
        #[arg(long)]
        release_allocations: bool,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct InstancesArgs {
    /// Allocation filter, e.g. "regionName=eu-west-1 and isVirtual=0".
    #[arg(long, value_name = "EXPR")]
    pub filter: Option<String>,
    /// Only this status: a number 0-6 or a name (online, allocated, ...).
    #[arg(long, value_name = "N", value_parser = parse_status)]
    pub status: Option<u8>,
    /// Include removed instances (status 0).
    #[arg(long)]
    pub all: bool,
    /// Only this application.
    #[arg(long, value_name = "ID")]
    pub application: Option<u32>,
    /// Full ids and more columns.
    #[arg(long)]
    pub wide: bool,
    #[command(subcommand)]
    pub command: Option<InstancesCommand>,
}

#[derive(Debug, Subcommand)]
pub enum InstancesCommand {
    /// Everything about one instance (an id prefix from the table is enough).
    Show { id: String },
    /// Ask the game itself what it learned: sends `INFO` to its game port (berth-sample-game
    /// answers it).
    Info { id: String },
}

#[derive(Debug, Args)]
pub struct AllocateArgs {
    /// The application's numeric id.
    pub application_id: u32,
    /// Allocation filter, e.g. "regionName=eu-west-1".
    #[arg(long, value_name = "EXPR")]
    pub filter: Option<String>,
    /// Metadata for the game, repeatable: --meta map=dust --meta mode=ranked.
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
    pub meta: Vec<(String, String)>,
    /// Send an Idempotency-Key: a retry with the same key gets the same instance back.
    #[arg(long, value_name = "KEY", value_parser = parse_idempotency_key)]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Args)]
pub struct DeallocateArgs {
    /// The instance (an id prefix from `berthctl instances` is enough).
    pub instance_id: String,
    /// Release only if this is still the instance's allocation.
    #[arg(long, value_name = "ID")]
    pub allocation_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct DrainArgs {
    /// Host id or name.
    pub host: String,
    /// Stop draining: the host takes allocations and instances again.
    #[arg(long)]
    pub undo: bool,
}

#[derive(Debug, Args)]
pub struct ErrorsArgs {
    #[command(subcommand)]
    pub command: ErrorsCommand,
}

#[derive(Debug, Subcommand)]
pub enum ErrorsCommand {
    /// What happened to a failed request: the decision and every attempt.
    Show { identifier: String },
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// A code (no_allocatable_instance) or a 76000-series number (76007).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub code: Option<String>,
    /// List every code.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// TOML with [[regions]], [[applications]], [[profiles]], [[fleets]] using the API's
    /// camelCase field names.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Where berth-controller, berth-agent and berth-sample-game are
    /// [default: berthctl's own directory].
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Configs, tokens, database, logs and agent state.
    #[arg(long, value_name = "DIR", default_value = ".berth-dev")]
    pub data_dir: PathBuf,
    /// The controller listens on 127.0.0.1:PORT.
    #[arg(long, value_name = "PORT", default_value_t = 6820)]
    pub controller_port: u16,
    /// The agent listens on 127.0.0.1:PORT.
    #[arg(long, value_name = "PORT", default_value_t = 6824)]
    pub agent_port: u16,
    /// Sample games to keep running.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub instances: u32,
    /// The agent's game port range.
    #[arg(long, value_name = "FROM-TO", default_value = "20000-20999", value_parser = parse_range)]
    pub game_ports: String,
    /// The agent's management (Arcus) port range.
    #[arg(long, value_name = "FROM-TO", default_value = "30000-30999", value_parser = parse_range)]
    pub management_ports: String,
    /// Start, allocate one game, verify the game received the metadata, stop. For CI.
    #[arg(long)]
    pub check: bool,
}

fn parse_status(s: &str) -> Result<u8, String> {
    let found = match s.parse::<i64>() {
        Ok(n) => berth_protocol::InstanceStatus::from_number(n),
        Err(_) => berth_protocol::InstanceStatus::ALL
            .into_iter()
            .find(|st| st.name().eq_ignore_ascii_case(s)),
    };
    found.map(|st| st.number()).ok_or_else(|| {
        let all: Vec<String> = berth_protocol::InstanceStatus::ALL
            .iter()
            .map(|st| format!("{} {}", st.number(), st.name()))
            .collect();
        format!("not a status; use one of: {}", all.join(", "))
    })
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err("expected KEY=VALUE, e.g. map=dust".to_owned()),
    }
}

/// What keeps `s` from being an HTTP header value (a control character such as a line
/// break), if anything.
fn header_value_problem(s: &str) -> Option<String> {
    if http::HeaderValue::from_str(s).is_ok() {
        return None;
    }
    let found = s
        .chars()
        .enumerate()
        .find(|&(_, c)| (c < ' ' && c != '\t') || c == '\x7f');
    Some(match found {
        Some((at, c)) => format!(
            "character {} is the control character U+{:04X}",
            at + 1,
            u32::from(c)
        ),
        None => "it holds bytes an HTTP header cannot carry".to_owned(),
    })
}

fn parse_idempotency_key(s: &str) -> Result<String, String> {
    match header_value_problem(s) {
        None => Ok(s.to_owned()),
        Some(why) => Err(format!(
            "--idempotency-key is sent as the Idempotency-Key header, and a header cannot hold \
             control characters: {why}; use 1-255 visible ASCII characters, e.g. a UUID from \
             `uuidgen`"
        )),
    }
}

/// `--token` / `BERTH_TOKEN`: it is trimmed later (settings.rs) and sent as `Authorization:
/// Bearer <token>`, so it must make a header value. Its own error, because clap's would print
/// the value, a secret.
#[derive(Debug, Clone, Copy)]
struct TokenParser;

impl clap::builder::TypedValueParser for TokenParser {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        let refuse = |why: &str| {
            cmd.clone().error(
                clap::error::ErrorKind::ValueValidation,
                format!(
                    "the token (--token or BERTH_TOKEN) is sent in the Authorization header, \
                     and {why}; copy the token again from the [[tokens]] of controller.toml \
                     (or from the output of `berthctl dev`)"
                ),
            )
        };
        let s = value.to_str().ok_or_else(|| refuse("it is not UTF-8"))?;
        match header_value_problem(s.trim()) {
            None => Ok(s.to_owned()),
            Some(why) => Err(refuse(&format!(
                "a header cannot hold control characters: {why}"
            ))),
        }
    }
}

fn parse_range(s: &str) -> Result<String, String> {
    let bad = || format!("{s:?} is not a port range such as 20000-20999");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if a == 0 || a > b {
        return Err(bad());
    }
    Ok(format!("{a}-{b}"))
}

/// A parsed command line plus where `--controller` and `--token` came from, which the error
/// messages need ("the token from BERTH_TOKEN was refused").
#[derive(Debug)]
pub struct Invocation {
    pub cli: Cli,
    pub controller_from_env: bool,
    pub token_from_env: bool,
    pub ca_file_from_env: bool,
}

impl Invocation {
    /// Parses the process's arguments; prints usage errors and exits 64 (help and version: 0).
    pub fn from_env() -> Self {
        match Self::try_from_args(std::env::args_os()) {
            Ok(inv) => inv,
            Err(e) => {
                let _ = e.print();
                let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
                std::process::exit(i32::from(code));
            }
        }
    }

    pub fn try_from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Cli::command().try_get_matches_from(args)?;
        let from_env = |id: &str| matches.value_source(id) == Some(ValueSource::EnvVariable);
        let controller_from_env = from_env("controller");
        let token_from_env = from_env("token");
        let ca_file_from_env = from_env("ca_file");
        let cli = Cli::from_arg_matches(&matches)?;
        Ok(Self {
            cli,
            controller_from_env,
            token_from_env,
            ca_file_from_env,
        })
    }
}

/// An error that decides the exit code and says exactly what to print.
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub message: String,
    /// The controller's error body, printed on stdout under `--json` so scripts can parse it.
    pub body: Option<bytes::Bytes>,
}

impl Exit {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            body: None,
        }
    }

    pub fn failed(message: impl Into<String>) -> anyhow::Error {
        Self::new(EXIT_FAILED, message).into()
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// Runs a parsed command line and returns the process exit code.
pub fn run(inv: Invocation) -> u8 {
    // Dev keeps Rust's default (ignore): dying of SIGPIPE there would skip stopping the games.
    if !matches!(inv.cli.command, Command::Dev(_)) {
        restore_sigpipe();
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return EXIT_FAILED;
        }
    };
    let json = inv.cli.json;
    match runtime.block_on(dispatch(&inv)) {
        Ok(()) => 0,
        Err(e) => report(&e, json),
    }
}

async fn dispatch(inv: &Invocation) -> anyhow::Result<()> {
    let json = inv.cli.json;
    match &inv.cli.command {
        Command::Explain(a) => return explain::run(a, json),
        Command::Dev(a) => return dev::run(a).await,
        _ => {}
    }
    let api = settings::resolve(inv)?.into_api()?;
    match &inv.cli.command {
        Command::Hosts(a) => match &a.command {
            None => hosts::list(&api, json).await,
            Some(HostsCommand::Show { host }) => hosts::show(&api, host, json).await,
            Some(HostsCommand::Delete {
                host,
                release_allocations,
            }) => actions::delete_host(&api, host, *release_allocations, json).await,
        },
        Command::Instances(a) => match &a.command {
            None => instances::list(&api, a, json).await,
            Some(InstancesCommand::Show { id }) => instances::show(&api, id, json).await,
            Some(InstancesCommand::Info { id }) => instances::info(&api, id, json).await,
        },
        Command::Allocate(a) => actions::allocate(&api, a, json).await,
        Command::Deallocate(a) => actions::deallocate(&api, a, json).await,
        Command::Drain(a) => actions::drain(&api, a, json).await,
        Command::Errors(a) => match &a.command {
            ErrorsCommand::Show { identifier } => errors::show(&api, identifier, json).await,
        },
        Command::Apply(a) => apply::run(&api, &a.file, json).await,
        Command::Explain(_) | Command::Dev(_) => unreachable!("handled above"),
    }
}

fn report(e: &anyhow::Error, json: bool) -> u8 {
    match e.downcast_ref::<Exit>() {
        Some(exit) => {
            if json && let Some(body) = &exit.body {
                println!("{}", render::pretty_json(body));
            }
            eprintln!("{}", exit.message);
            exit.code
        }
        None => {
            eprintln!("error: {e:#}");
            EXIT_FAILED
        }
    }
}

/// Rust ignores SIGPIPE, which turns `berthctl instances | head` into a panic on the next
/// write; a command-line tool should just stop, like every other Unix tool.
fn restore_sigpipe() {
    // SAFETY: called before any thread is started; setting a signal to its default action
    // has no memory-safety implications.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
