//! `berth-agent`: parse flags, validate the configuration before binding anything, start
//! tracing, run, and map the outcome to an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use berth_agent::config::{Config, EXIT_CONFIG};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "berth-agent",
    version,
    about = "Berth host agent: runs and supervises game servers on this host"
)]
struct Cli {
    /// Configuration file (agent.toml).
    #[arg(long, short, env = "BERTH_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Override `listen`.
    #[arg(long, global = true)]
    listen: Option<String>,
    /// Override `state_dir`.
    #[arg(long, global = true)]
    state_dir: Option<String>,
    /// Override `controller_url`.
    #[arg(long, global = true)]
    controller_url: Option<String>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the agent (the default).
    Run,
    /// Check the configuration and exit: 0 when valid, 78 naming the bad key otherwise.
    Validate,
    /// Internal: the process that starts games for the agent (see `process.rs`).
    #[command(hide = true)]
    Spawner,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before the config is loaded: loading builds the TLS configuration.
    berth_http::tls::install_crypto_provider();
    if matches!(cli.command, Some(Cmd::Spawner)) {
        return ExitCode::from(berth_agent::process::spawner_main() as u8);
    }
    let mut overrides = Vec::new();
    for (key, value) in [
        ("listen", &cli.listen),
        ("state_dir", &cli.state_dir),
        ("controller_url", &cli.controller_url),
    ] {
        if let Some(v) = value {
            overrides.push((key, v.clone()));
        }
    }
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = match Config::load(cli.config.as_deref(), &env, &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("berth-agent: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if matches!(cli.command, Some(Cmd::Validate)) {
        println!(
            "configuration valid: host {} in {}/{}, listen {}, state in {}",
            config.host_name,
            config.region,
            config.dc_location,
            config.listen,
            config.state_dir.display()
        );
        if let Some(tls) = &config.tls {
            println!("tls: {}", tls.loaded());
        }
        return ExitCode::SUCCESS;
    }
    berth_daemon::run_daemon(
        "berth-agent",
        config.log_format,
        config.worker_threads,
        "games keep running",
        |rx| berth_agent::run(config, rx, |_| berth_daemon::notify_ready()),
    )
}
