//! The Berth host agent: supervises game server processes on one host, speaks Arcus to them,
//! serves the agent API on TCP 6824 and reports to the controller.
//!
//! Map: [`config`] (agent.toml), [`supervisor`] (the one task that owns all instances),
//! [`process`] (the only code that spawns or signals), [`arcus_link`] (one Arcus client task
//! per game), [`ports`], [`state`] (the re-adoption file), [`controller_link`], [`api`] (HTTP).

pub mod api;
pub mod arcus_link;
pub mod config;
pub mod controller_link;
pub mod detect;
pub mod game_logs;
pub mod metrics;
pub mod ports;
pub mod process;
pub mod state;
pub mod supervisor;
pub mod template;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use berth_protocol::agent_api::Capacity;
use berth_protocol::link::RegisterRequest;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::supervisor::{HostFacts, Supervisor};

/// Becomes `true` when the agent should stop. Games keep running when it does.
pub type Shutdown = watch::Receiver<bool>;

/// How long in-flight API requests may take to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Locked(#[from] berth_daemon::state_lock::LockError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(
        "cannot listen on {addr}: {source} (is another agent running? set listen in agent.toml)"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot handle SIGHUP: {0}")]
    Signal(std::io::Error),
}

/// Runs the agent until `shutdown`. `on_ready` is called once the state is restored and the
/// listener is bound (systemd's READY=1).
pub async fn run(
    config: Config,
    shutdown: Shutdown,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), RunError> {
    process::raise_nofile_limit();
    let config = Arc::new(config);
    // Before the state is read: a second agent on this directory would adopt the same games.
    std::fs::create_dir_all(&config.state_dir).map_err(|source| state::StateError::CreateDir {
        path: config.state_dir.clone(),
        source,
    })?;
    let _lock = berth_daemon::state_lock::StateLock::acquire(
        "berth-agent",
        format!("the state directory {}", config.state_dir.display()),
        "state_dir (agent.toml), and listen port",
        &config.state_dir.join(state::LOCK_FILE),
    )?;
    let state = state::load(&config.state_dir)?;
    let is_virtual = match config.is_virtual {
        Some(v) => v,
        None => {
            let (v, why) = detect::is_virtual();
            tracing::info!(is_virtual = v, reason = %why, "virtualisation detected");
            v
        }
    };
    let metrics = Arc::new(Metrics::new(config.tls.is_some()));
    let (updates_tx, updates_rx) = mpsc::unbounded_channel();
    let facts = HostFacts {
        host_id: None,
        host_name: config.host_name.clone(),
        region: config.region.clone(),
        dc_location: config.dc_location.clone(),
        is_virtual,
    };
    let (supervisor, handle) = Supervisor::restore(
        config.clone(),
        facts,
        state,
        updates_tx,
        metrics.clone(),
        process::Spawner::start(),
    );
    let agent_token = supervisor.agent_token().to_owned();

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: config.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| RunError::Bind {
        addr: config.listen,
        source,
    })?;
    let sup_task = tokio::spawn(supervisor.run(shutdown.clone()));

    let capacity = Capacity {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory_bytes: {
            let mut sys = sysinfo::System::new();
            sys.refresh_memory();
            sys.total_memory()
        },
    };
    let (host_id_tx, host_id_rx) = watch::channel(None);
    let link_task = match (&config.controller_url, &config.join_token) {
        (Some(url), Some(join)) => {
            let identity = controller_link::Identity {
                controller_url: url.clone(),
                join_token: join.clone(),
                register: RegisterRequest {
                    host_name: config.host_name.clone(),
                    region: config.region.clone(),
                    dc_location: config.dc_location.clone(),
                    is_virtual,
                    advertise_url: config.advertise_url.clone(),
                    addresses: config.addresses.clone(),
                    labels: config.labels.clone(),
                    capacity: capacity.clone(),
                    agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                    agent_token: agent_token.clone(),
                    instances: Vec::new(),
                },
                tls: config.tls.as_ref().map(|t| t.client.clone()),
            };
            Some(tokio::spawn(controller_link::run(
                identity,
                handle.clone(),
                updates_rx,
                host_id_tx,
                metrics.clone(),
                shutdown.clone(),
            )))
        }
        _ => {
            tracing::info!("no controller_url: running standalone");
            // Nobody reads instance updates; drop them as they come.
            tokio::spawn(async move {
                let mut rx = updates_rx;
                while rx.recv().await.is_some() {}
            });
            None
        }
    };

    let log_keeper = tokio::spawn(game_logs::keep_bounded(
        config.log_dir.clone(),
        config.game_logs,
        handle.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let tls_metrics = metrics.tls.clone();
    // Installed before the daemon says it is ready, so a SIGHUP never finds it without one.
    let hangup = berth_daemon::reload_on_hangup(
        berth_http::tls::reloader(config.tls.clone(), tls_metrics.clone()),
        shutdown.clone(),
    )
    .map_err(RunError::Signal)?;
    let mut tokens = config.api_tokens.clone();
    tokens.push(agent_token);
    let app = api::router(api::ApiState {
        supervisor: handle.clone(),
        tokens: tokens.into(),
        metrics,
        host: Arc::new(api::HostStatic {
            host_name: config.host_name.clone(),
            region: config.region.clone(),
            dc_location: config.dc_location.clone(),
            is_virtual,
            labels: config.labels.clone(),
            capacity,
            controller_url: config.controller_url.clone().unwrap_or_default(),
        }),
        host_id: host_id_rx,
        log_dir: config.log_dir.clone(),
        log_files_kept: config.game_logs.keep,
    });
    tracing::info!(listen = %local, host_name = %config.host_name, "agent ready");
    on_ready(local);
    let watchdog = {
        let supervisor = handle.clone();
        tokio::spawn(berth_daemon::watchdog(
            move || {
                let supervisor = supervisor.clone();
                async move { supervisor.ping().await.is_some() }
            },
            shutdown.clone(),
        ))
    };
    let tls = config.tls.as_ref().map(|t| {
        berth_http::ServeTls::new(
            t,
            &tls_metrics,
            berth_protocol::ErrorCode::AgentUnauthenticated,
        )
    });
    if let Err(e) = berth_http::serve(listener, app, shutdown, DRAIN, tls).await {
        tracing::warn!(error = %e, "shutdown");
    }
    watchdog.abort();
    hangup.abort();
    log_keeper.abort();
    if let Some(t) = link_task {
        t.abort();
    }
    let _ = sup_task.await;
    Ok(())
}
