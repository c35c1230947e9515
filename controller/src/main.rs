//! `berth-controller`: parse flags, validate the configuration before binding anything, start
//! tracing, run, and map the outcome to an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use berth_controller::config::{Config, EXIT_CONFIG};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "berth-controller",
    version,
    about = "Berth controller: inventory and allocation API"
)]
struct Cli {
    /// Configuration file (controller.toml).
    #[arg(long, short, env = "BERTH_CONTROLLER_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Override `listen`.
    #[arg(long, global = true)]
    listen: Option<String>,
    /// Override `database`.
    #[arg(long, global = true)]
    database: Option<String>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the controller (the default).
    Run,
    /// Check the configuration and exit: 0 when valid, 78 naming the bad key otherwise.
    Validate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before the config is loaded: loading builds the TLS configuration.
    berth_http::tls::install_crypto_provider();
    let mut flags = Vec::new();
    if let Some(l) = &cli.listen {
        flags.push(("listen", l.clone()));
    }
    if let Some(d) = &cli.database {
        flags.push(("database", d.clone()));
    }
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = match Config::load(cli.config.as_deref(), &env, &flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("berth-controller: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if matches!(cli.command, Some(Cmd::Validate)) {
        println!(
            "configuration valid: listen {}, database {}, {} token(s), {} region(s)",
            config.listen,
            config.database.display(),
            config.tokens.len(),
            config.regions.len()
        );
        if let Some(tls) = &config.tls {
            println!("tls: {}", tls.loaded());
        }
        return ExitCode::SUCCESS;
    }
    berth_daemon::run_daemon(
        "berth-controller",
        config.log_format,
        config.worker_threads,
        "no new requests, finishing in-flight ones",
        |rx| berth_controller::run(config, rx, |_| berth_daemon::notify_ready()),
    )
}
