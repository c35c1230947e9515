//! The Berth controller: keeps the inventory of hosts and game server instances, hands idle
//! instances to matchmakers, and keeps every fleet at its size.
//!
//! Map: [`config`] (controller.toml), [`store`] (SQLite, group commit), [`inventory`] (the one
//! task that owns all state), [`engine`] (the pure allocation choice), [`agent_client`] (calls
//! to agents), [`actuator`] (carries out reconciler plans), [`api`] (HTTP).

pub mod actuator;
pub mod agent_client;
pub mod api;
pub mod config;
pub mod engine;
pub mod inventory;
pub mod metrics;
pub mod model;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use berth_daemon::state_lock::{LockError, StateLock};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;

/// How long in-flight requests may take to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(10);
/// How often host expiry is checked: well inside the 1 s slack of the detection target.
const TICK: Duration = Duration::from_millis(100);

pub use berth_protocol::time::unix_now;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Locked(#[from] LockError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot handle SIGHUP: {0}")]
    Signal(std::io::Error),
}

/// Runs the controller until `shutdown` becomes true. `on_ready` is called once the store is
/// loaded and the listener bound.
pub async fn run(
    config: Config,
    shutdown: watch::Receiver<bool>,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), RunError> {
    let config = Arc::new(config);
    let _lock = lock_database(&config.database)?;
    let store = store::Store::open(&config.database).await?;
    let snapshot = store.load().await?;
    tracing::info!(
        hosts = snapshot.hosts.len(),
        instances = snapshot.instances.len(),
        allocations = snapshot.allocations.len(),
        database = %config.database.display(),
        "state loaded"
    );
    let metrics = Arc::new(metrics::Metrics::new(config.tls.is_some()));
    let writer = store.start_writer(metrics.store());
    let flush = writer.clone();
    let agents = match &config.tls {
        Some(tls) => agent_client::AgentClient::with_tls(&tls.client),
        None => agent_client::AgentClient::new(),
    };
    let (inventory, actions) = inventory::Inventory::start(
        config.clone(),
        snapshot,
        writer,
        metrics.clone(),
        agents.clone(),
    );

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

    let ticker = {
        let inventory = inventory.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(TICK);
            loop {
                tokio::select! {
                    _ = t.tick() => inventory.tick().await,
                    _ = shutdown.changed() => return,
                }
            }
        })
    };
    let actuator = tokio::spawn(actuator::run(
        inventory.clone(),
        agents.clone(),
        actions,
        config.reconcile_interval,
        shutdown.clone(),
    ));
    let watchdog = {
        let inventory = inventory.clone();
        tokio::spawn(berth_daemon::watchdog(
            move || {
                let inventory = inventory.clone();
                async move { inventory.counts().await.is_ok() }
            },
            shutdown.clone(),
        ))
    };
    let tls_metrics = metrics.tls.clone();
    // Installed before the daemon says it is ready, so a SIGHUP never finds it without one.
    let hangup = berth_daemon::reload_on_hangup(
        berth_http::tls::reloader(config.tls.clone(), tls_metrics.clone()),
        shutdown.clone(),
    )
    .map_err(RunError::Signal)?;
    let app = api::router(api::AppState::new(
        &config, inventory, agents, store, metrics,
    ));
    tracing::info!(listen = %local, "controller ready");
    on_ready(local);
    let tls = config.tls.as_ref().map(|t| {
        berth_http::ServeTls::new(
            t,
            &tls_metrics,
            berth_protocol::ErrorCode::InvalidCredentials,
        )
    });
    if let Err(e) = berth_http::serve(listener, app, shutdown, DRAIN, tls).await {
        tracing::warn!(error = %e, "shutdown");
    }
    ticker.abort();
    hangup.abort();
    actuator.abort();
    watchdog.abort();
    // Writes nobody waits for (releases) may still be lingering in the writer.
    if let Err(e) = flush.flush().await {
        tracing::warn!(error = %e, "the last writes were not saved");
    }
    Ok(())
}

/// The controller's claim on its database, beside it (`controller.db.lock`): a second
/// controller on the same file would hand one instance to two matchmakers.
fn lock_database(database: &std::path::Path) -> Result<StateLock, LockError> {
    if let Some(dir) = database.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| LockError::Open {
            path: dir.to_owned(),
            source,
        })?;
    }
    let mut path = database.as_os_str().to_owned();
    path.push(".lock");
    StateLock::acquire(
        "berth-controller",
        format!("the database {}", database.display()),
        "database (controller.toml), and listen address",
        std::path::Path::new(&path),
    )
}
