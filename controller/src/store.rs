//! SQLite persistence: migrations at start, a full load into memory, and one writer task that
//! commits in groups.
//!
//! Every write goes through the writer. It takes the first waiting write, drains whatever else
//! is queued (up to a batch), applies all of it in one `BEGIN IMMEDIATE` transaction and
//! commits once, so under load one fsync covers many allocations. A caller that must not
//! answer before its write is durable (an allocation) waits for its batch's commit. Writes
//! nobody waits for (a release) linger a few milliseconds for one that somebody does, so an
//! idle controller's release rides along with the next allocation's commit.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use berth_protocol::agent_api::Profile;
use berth_protocol::controller_api::{
    Application, Build, DcLocation, DeploymentEnvironment, ErrorStory, Fleet, Region,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, Row};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::StoreMetrics;
use crate::model::{AllocationRecord, HostRecord, InstanceRecord};

/// Most writes applied in one transaction.
const MAX_BATCH: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the database directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database {path}: {source}{}", advice(source))]
    Open { path: PathBuf, source: sqlx::Error },
    #[error(
        "database {path} was written by a newer berth-controller (it has schema version {version}; this one knows up to {known}); nothing was changed. Run that newer version again, or restore a backup taken before the upgrade"
    )]
    Newer {
        path: PathBuf,
        version: i64,
        known: i64,
    },
    #[error("database {path}: updating its schema failed: {source}")]
    Migrate {
        path: PathBuf,
        source: sqlx::migrate::MigrateError,
    },
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("stored {table} row {id} is not valid JSON: {source}")]
    Corrupt {
        table: &'static str,
        id: String,
        source: serde_json::Error,
    },
    #[error("the database writer has stopped")]
    WriterGone,
}

/// Removed instances kept as history: what `GET /v1/instances?all=true` shows. Older ones are
/// deleted (every thousand removals), so that fleets that come and go do not grow the file
/// for ever.
pub const REMOVED_INSTANCES_KEPT: usize = 1000;

/// Deleted hosts remembered, the newest ids: enough to say what became of a recent one, and the
/// highest id is always among them, so that no id is given twice. Machines that come and go
/// (autoscaled VMs, say) do not grow the file for ever.
pub const DELETED_HOSTS_KEPT: usize = 1000;

/// Why a write did not reach the database.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// The disk or the file takes no writes now: full, an I/O error, read-only, locked. Writes
    /// nobody waits for are kept and tried again; the writer goes on by itself once the disk
    /// takes writes.
    #[error("the database {path} cannot be written: {reason}")]
    Unavailable { path: PathBuf, reason: String },
    /// The database refused this write itself (a constraint): trying again cannot help.
    #[error("the database {path} refused the write: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("the database writer has stopped")]
    Stopped,
}

/// The writer's commits have failed since `since`: what `/readyz` reports.
#[derive(Debug, Clone)]
pub struct Trouble {
    pub since: std::time::Instant,
    /// Failed commits since then.
    pub failures: u64,
    /// Writes kept for the next try.
    pub kept: usize,
    pub error: CommitError,
}

/// One change to persist.
#[derive(Debug, Clone)]
pub enum Write {
    Region(Region),
    DeleteRegion(u32),
    DcLocation(DcLocation),
    Environment(DeploymentEnvironment),
    Application(Application),
    DeleteApplication(u32),
    Profile(Profile),
    DeleteProfile(String),
    Build(Build),
    DeleteBuild(String),
    Fleet(Fleet),
    DeleteFleet(u64),
    Host(Box<HostRecord>),
    /// A host taken out of service: its row goes, its id is remembered (never given again).
    DeleteHost(DeletedHost),
    Instance(Box<InstanceRecord>),
    /// A new allocation (inserted when its agent is asked; never rewritten).
    Allocation(Arc<AllocationRecord>),
    /// A released allocation (deleted: active allocations are the only ones kept).
    ReleaseAllocation(String),
    ErrorStory(Box<ErrorStory>),
    /// Keep only the newest `keep` error stories.
    PruneErrorStories {
        keep: usize,
    },
    /// Keep only the newest `keep` removed instances (live ones are never touched).
    PruneRemovedInstances {
        keep: usize,
    },
    /// Nothing to write: its commit receipt says that everything queued before it is on disk.
    Flush,
    /// One small row, written while commits fail and nothing else waits, to learn when the
    /// disk takes writes again.
    Probe,
}

impl Write {
    /// The write's kind and key, for a log line.
    fn describe(&self) -> String {
        match self {
            Write::Region(r) => format!("region {}", r.id),
            Write::DeleteRegion(id) => format!("deletion of region {id}"),
            Write::DcLocation(d) => format!("dc location {}", d.id),
            Write::Environment(e) => format!("deployment environment {}", e.id),
            Write::Application(a) => format!("application {}", a.id),
            Write::DeleteApplication(id) => format!("deletion of application {id}"),
            Write::Profile(p) => format!("profile {}", p.id),
            Write::DeleteProfile(id) => format!("deletion of profile {id}"),
            Write::Build(b) => format!("build {}", b.id),
            Write::DeleteBuild(id) => format!("deletion of build {id}"),
            Write::Fleet(f) => format!("fleet {}", f.id),
            Write::DeleteFleet(id) => format!("deletion of fleet {id}"),
            Write::Host(h) => format!("host {} ({})", h.id, h.name),
            Write::DeleteHost(h) => format!("deletion of host {} ({})", h.id, h.name),
            Write::Instance(i) => format!("instance {}", i.id),
            Write::Allocation(a) => format!("allocation {} of instance {}", a.id, a.instance_id),
            Write::ReleaseAllocation(id) => format!("release of allocation {id}"),
            Write::ErrorStory(s) => format!("error story {}", s.identifier),
            Write::PruneErrorStories { .. } => "pruning of error stories".to_owned(),
            Write::PruneRemovedInstances { .. } => "pruning of removed instances".to_owned(),
            Write::Flush => "flush".to_owned(),
            Write::Probe => "write probe".to_owned(),
        }
    }
}

/// A host an operator deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedHost {
    pub id: u64,
    pub name: String,
    /// Unix seconds.
    pub deleted_at: u64,
}

/// Everything in the database, as loaded at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub regions: Vec<Region>,
    pub dc_locations: Vec<DcLocation>,
    pub environments: Vec<DeploymentEnvironment>,
    pub applications: Vec<Application>,
    pub profiles: Vec<Profile>,
    pub builds: Vec<Build>,
    pub fleets: Vec<Fleet>,
    /// Fleets deleted through this database (their instances are removed).
    pub deleted_fleets: Vec<u64>,
    pub hosts: Vec<HostRecord>,
    /// Hosts deleted by an operator.
    pub deleted_hosts: Vec<DeletedHost>,
    /// Instances not removed.
    pub instances: Vec<InstanceRecord>,
    /// Allocations not released.
    pub allocations: Vec<AllocationRecord>,
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    path: PathBuf,
    /// Set by the writer while its commits fail.
    trouble: watch::Sender<Option<Trouble>>,
}

type Done = oneshot::Sender<Result<(), CommitError>>;

/// Submits writes to the writer task.
#[derive(Debug, Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<(Write, Option<Done>)>,
}

impl Writer {
    /// Queues a write; it will be committed with the next batch.
    pub fn submit(&self, w: Write) {
        let _ = self.tx.send((w, None));
    }

    /// Waits until every write queued so far is committed (at shutdown: writes nobody waits
    /// for may be lingering).
    pub async fn flush(&self) -> Result<(), CommitError> {
        self.submit_durable(Write::Flush)
            .await
            .unwrap_or(Err(CommitError::Stopped))
    }

    /// Queues a write and returns a receiver that fires once its batch is committed.
    pub fn submit_durable(&self, w: Write) -> oneshot::Receiver<Result<(), CommitError>> {
        let (done, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError((_, Some(done)))) = self.tx.send((w, Some(done))) {
            let _ = done.send(Err(CommitError::Stopped));
        }
        rx
    }
}

fn to_json<T: Serialize>(v: &T) -> String {
    // Serialising our own plain data types cannot fail (no maps with non-string keys).
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_owned())
}

impl Store {
    /// Opens (creating if needed) the database and runs the migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let opts = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|source| StoreError::Open {
                path: path.to_owned(),
                source,
            })?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk when it returns, so an acknowledged allocation
            // survives a crash of the machine, not only of the process.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            // A checkpoint every 10 000 WAL pages (≈ 40 MB) instead of 1 000: the rows an
            // allocation touches are rewritten many times between two checkpoints, and each
            // checkpoint copies a hot page once, so fewer copies and database fsyncs per
            // allocation (+2–8 % peak in 5 of 5 A/B pairs).
            .pragma("wal_autocheckpoint", "10000")
            // A batch's multi-row statements keep a statement journal; past 64 KiB SQLite
            // spills it to a temporary file, created and unlinked per batch (≈ 50/s at
            // peak). It is never needed after a crash, so it stays in memory.
            .pragma("temp_store", "memory")
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(|source| StoreError::Open {
                path: path.to_owned(),
                source,
            })?;
        let migrator = sqlx::migrate!("./migrations");
        // A rollback to an older controller is a likely operator action: say so, rather than
        // sqlx's "previously applied but missing". Checked before anything is applied.
        migrator.run(&pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::VersionMissing(version) => StoreError::Newer {
                path: path.to_owned(),
                version,
                known: migrator.iter().map(|m| m.version).max().unwrap_or(0),
            },
            source => StoreError::Migrate {
                path: path.to_owned(),
                source,
            },
        })?;
        Ok(Self {
            pool,
            path: path.to_owned(),
            trouble: watch::Sender::new(None),
        })
    }

    /// Since when, and why, commits fail; `None` while they succeed.
    pub fn trouble(&self) -> Option<Trouble> {
        self.trouble.borrow().clone()
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn load(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            regions: self
                .bodies("regions", "SELECT id, body FROM regions")
                .await?,
            dc_locations: self
                .bodies("dc_locations", "SELECT id, body FROM dc_locations")
                .await?,
            environments: self
                .bodies(
                    "deployment_environments",
                    "SELECT id, body FROM deployment_environments",
                )
                .await?,
            applications: self
                .bodies("applications", "SELECT id, body FROM applications")
                .await?,
            profiles: self
                .bodies("profiles", "SELECT id, body FROM profiles")
                .await?,
            builds: self.bodies("builds", "SELECT id, body FROM builds").await?,
            fleets: self.bodies("fleets", "SELECT id, body FROM fleets").await?,
            deleted_fleets: sqlx::query_scalar::<_, i64>("SELECT id FROM deleted_fleets")
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .map(|id| id as u64)
                .collect(),
            hosts: self.bodies("hosts", "SELECT id, body FROM hosts").await?,
            deleted_hosts: sqlx::query_as::<_, (i64, String, i64)>(
                "SELECT id, name, deleted_at FROM deleted_hosts",
            )
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|(id, name, at)| DeletedHost {
                id: id as u64,
                name,
                deleted_at: at as u64,
            })
            .collect(),
            instances: self
                .bodies(
                    "instances",
                    "SELECT id, body FROM instances WHERE removed_at IS NULL",
                )
                .await?,
            allocations: self
                .bodies(
                    "allocations",
                    "SELECT id, body FROM allocations WHERE released_at IS NULL",
                )
                .await?,
        })
    }

    async fn bodies<T: DeserializeOwned>(
        &self,
        table: &'static str,
        sql: &str,
    ) -> Result<Vec<T>, StoreError> {
        let rows = sqlx::query(sql).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                let id: String = row
                    .try_get::<String, _>(0)
                    .or_else(|_| row.try_get::<i64, _>(0).map(|i| i.to_string()))?;
                let body: String = row.try_get(1)?;
                serde_json::from_str(&body).map_err(|source| StoreError::Corrupt {
                    table,
                    id,
                    source,
                })
            })
            .collect()
    }

    /// The removed instances kept as history, newest first, for `all=true` listings.
    pub async fn removed_instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT body FROM instances WHERE removed_at IS NOT NULL ORDER BY removed_at DESC LIMIT ?",
        )
        .bind(REMOVED_INSTANCES_KEPT as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let body: String = row.try_get(0)?;
                serde_json::from_str(&body).map_err(|source| StoreError::Corrupt {
                    table: "instances",
                    id: String::new(),
                    source,
                })
            })
            .collect()
    }

    pub async fn error_story(&self, identifier: &str) -> Result<Option<ErrorStory>, StoreError> {
        let row = sqlx::query("SELECT body FROM error_stories WHERE identifier = ?")
            .bind(identifier)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let body: String = r.try_get(0)?;
            serde_json::from_str(&body).map_err(|source| StoreError::Corrupt {
                table: "error_stories",
                id: identifier.to_owned(),
                source,
            })
        })
        .transpose()
    }

    /// Starts the writer task.
    pub fn start_writer(&self, metrics: StoreMetrics) -> Writer {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(
            self.pool.clone(),
            self.path.clone(),
            rx,
            metrics,
            self.trouble.clone(),
        ));
        Writer { tx }
    }
}

/// How long writes nobody waits for (releases, instance records) wait for company before they
/// are committed on their own: a durable write arriving meanwhile takes them into its commit.
/// Without it, an idle controller commits each release by itself, and the next allocation's
/// commit queues behind that one's fsync. Losing them in a crash costs nothing: a released
/// allocation's row found at start is dropped at its agent's next report.
const LINGER: Duration = Duration::from_millis(5);

type Queued = (Write, Option<Done>);

/// A commit this slow is logged: allocations wait for it, so the disk is what to look at.
const SLOW_COMMIT: Duration = Duration::from_millis(100);

/// While the database takes no writes, kept writes are tried again after this pause (or with
/// the next write), doubling up to `RETRY_CAP`.
const RETRY_START: Duration = Duration::from_millis(50);
const RETRY_CAP: Duration = Duration::from_secs(2);
/// Most writes kept while the database takes none; past it the oldest go (a restart rebuilds
/// instances from the agents' registrations).
const MAX_KEPT: usize = 100_000;
/// While commits keep failing, one log line per this period says so.
const FAILING_LOG_EVERY: Duration = Duration::from_secs(10);

/// Whether a write of a batch that did not reach the disk is kept and written later. Memory
/// already holds every one of them, and a controller that forgot them while it runs would
/// disagree with its own database: a release forgotten leaves the allocation's row, and that
/// row then refuses every later allocation of the instance. An allocation's row is not kept:
/// its caller was told, and withdrew the allocation. Error stories are diagnostics the
/// inventory also keeps in memory, and a disk that stays full must not make them pile up.
fn kept_after_failure(w: &Write) -> bool {
    !matches!(
        w,
        Write::Allocation(_)
            | Write::Flush
            | Write::Probe
            | Write::ErrorStory(_)
            | Write::PruneErrorStories { .. }
            | Write::PruneRemovedInstances { .. }
    )
}

/// What an operator can do about a database that cannot be opened, by SQLite's primary
/// result code.
fn advice(e: &sqlx::Error) -> &'static str {
    let code = match e {
        sqlx::Error::Database(d) => d.code().and_then(|c| c.parse::<i32>().ok()),
        _ => None,
    };
    match code.map(|c| c & 0xff) {
        Some(11 | 26) => {
            "; the file is damaged or is not a SQLite database: stop the controller and restore it from a backup (`sqlite3 FILE .recover` may save most of its rows into a new file); the controller never repairs it"
        }
        Some(8) => "; the file or its directory is read-only to the controller's user",
        Some(13) => "; the disk that holds it is full",
        Some(14) => {
            "; check that its directory exists and that the controller's user may write there"
        }
        _ => "",
    }
}

/// Sorts a failed commit's error: is the disk or the file the problem, or this write?
fn classify(path: &Path, e: &sqlx::Error) -> CommitError {
    // SQLite's primary result codes (the low byte of an extended code): BUSY, LOCKED, NOMEM,
    // READONLY, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB. A damaged file is not a
    // refusal of this write: nothing can be written until an operator restores it, and
    // `/readyz` must say so.
    let unavailable = match e {
        sqlx::Error::Database(d) => d
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_none_or(|c| matches!(c & 0xff, 5..=8 | 10 | 11 | 13..=15 | 26)),
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    };
    let (path, reason) = (path.to_owned(), e.to_string());
    if unavailable {
        CommitError::Unavailable { path, reason }
    } else {
        CommitError::Refused { path, reason }
    }
}

/// Commits `batch` on the writer's connection, opening one if it has none. A connection whose
/// commit failed is closed, not given back to the pool: SQLite rolls some failed transactions
/// back by itself (a full disk does), sqlx then still counts one open, and that connection
/// would refuse every later `BEGIN`.
async fn attempt(
    pool: &SqlitePool,
    conn: &mut Option<sqlx::pool::PoolConnection<sqlx::Sqlite>>,
    batch: &[Queued],
) -> Result<(), sqlx::Error> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(pool.acquire().await?),
    };
    let result = commit(c, batch).await;
    if result.is_err()
        && let Some(c) = conn.take()
    {
        let _ = c.close().await;
    }
    result
}

/// Commits that keep failing: since when, how many, and when that was last logged.
struct Failing {
    since: std::time::Instant,
    failures: u64,
    logged: Option<std::time::Instant>,
}

async fn write_loop(
    pool: SqlitePool,
    path: PathBuf,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    metrics: StoreMetrics,
    trouble: watch::Sender<Option<Trouble>>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut kept: Vec<Write> = Vec::new();
    let mut conn: Option<sqlx::pool::PoolConnection<sqlx::Sqlite>> = None;
    let mut failing: Option<Failing> = None;
    let mut retry = RETRY_START;
    let mut open = true;
    while open {
        if kept.is_empty() {
            let Some(first) = rx.recv().await else { break };
            batch.push(first);
        } else {
            // Kept writes go first, in the order they were made, with the next write or once
            // the pause is over.
            let next = tokio::time::timeout(retry, rx.recv()).await;
            batch.extend(kept.drain(..).map(|w| (w, None)));
            match next {
                Ok(Some(w)) => batch.push(w),
                Ok(None) => open = false,
                Err(_) => {}
            }
        }
        drain(&mut rx, &mut batch);
        if open && batch.iter().all(|(_, done)| done.is_none()) {
            let until = tokio::time::Instant::now() + LINGER;
            while batch.len() < MAX_BATCH {
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(w)) => {
                        let durable = w.1.is_some();
                        batch.push(w);
                        drain(&mut rx, &mut batch);
                        if durable {
                            break;
                        }
                    }
                    Ok(None) => {
                        open = false;
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        let started = std::time::Instant::now();
        let result = attempt(&pool, &mut conn, &batch).await;
        let took = started.elapsed();
        metrics.commit_seconds.observe(took.as_secs_f64());
        if took >= SLOW_COMMIT {
            tracing::warn!(
                ms = took.as_millis() as u64,
                writes = batch.len(),
                "slow database commit: allocations wait for it; check the disk's fsync latency"
            );
        }
        let error = match result {
            Ok(()) => {
                let writes = batch.iter().filter(|(w, _)| !matches!(w, Write::Flush));
                metrics.writes.inc_by(writes.count() as u64);
                for (_, done) in batch.drain(..) {
                    if let Some(done) = done {
                        let _ = done.send(Ok(()));
                    }
                }
                if let Some(f) = failing.take() {
                    tracing::warn!(
                        failed_commits = f.failures,
                        seconds = f.since.elapsed().as_secs(),
                        database = %path.display(),
                        "database commits succeed again; the writes kept meanwhile are written"
                    );
                    trouble.send_replace(None);
                }
                retry = RETRY_START;
                continue;
            }
            Err(e) => {
                metrics.failures.inc();
                classify(&path, &e)
            }
        };
        if matches!(error, CommitError::Refused { .. }) && batch.len() > 1 {
            // One write the database refuses must not take the others with it: each is
            // tried on its own.
            tracing::error!(error = %error, writes = batch.len(), "database commit failed; writing its writes one by one");
            for (w, done) in batch.drain(..) {
                let alone = [(w, None)];
                let outcome = attempt(&pool, &mut conn, &alone)
                    .await
                    .map_err(|e| classify(&path, &e));
                let [(w, _)] = alone;
                match &outcome {
                    Ok(()) => {
                        metrics.writes.inc();
                    }
                    Err(e @ CommitError::Refused { .. }) => {
                        tracing::error!(error = %e, write = w.describe(), "a write the database refuses is dropped");
                    }
                    Err(_) => {
                        if kept_after_failure(&w) {
                            kept.push(w);
                        }
                    }
                }
                if let Some(done) = done {
                    let _ = done.send(outcome);
                }
            }
            continue;
        }
        for (w, done) in batch.drain(..) {
            if let Some(done) = done {
                let _ = done.send(Err(error.clone()));
            }
            if matches!(error, CommitError::Unavailable { .. }) && kept_after_failure(&w) {
                kept.push(w);
            }
        }
        if let CommitError::Refused { .. } = error {
            tracing::error!(error = %error, "database commit failed");
            continue;
        }
        if kept.is_empty() {
            // Nothing else would find out when the disk takes writes again.
            kept.push(Write::Probe);
        }
        if kept.len() > MAX_KEPT {
            let dropped = kept.len() - MAX_KEPT;
            kept.drain(..dropped);
            tracing::error!(
                dropped,
                kept = kept.len(),
                "the database has taken no writes for long: the oldest kept writes are dropped; a restart rebuilds instances from the agents"
            );
        }
        let now = std::time::Instant::now();
        let f = failing.get_or_insert(Failing {
            since: now,
            failures: 0,
            logged: None,
        });
        f.failures += 1;
        if f.logged
            .is_none_or(|t| now.duration_since(t) >= FAILING_LOG_EVERY)
        {
            f.logged = Some(now);
            tracing::error!(
                error = %error,
                failed_commits = f.failures,
                seconds = f.since.elapsed().as_secs(),
                kept = kept.len(),
                "database commits fail: allocations are refused (503) until the disk takes writes again; other writes are kept and retried"
            );
        }
        trouble.send_replace(Some(Trouble {
            since: f.since,
            failures: f.failures,
            kept: kept.iter().filter(|w| !matches!(w, Write::Probe)).count(),
            error,
        }));
        retry = (retry * 2).min(RETRY_CAP);
    }
    if !kept.is_empty() {
        tracing::error!(
            writes = kept.len(),
            database = %path.display(),
            "the writer stopped with writes the database never took; agents' registrations rebuild instances at the next start"
        );
    }
}

/// Moves whatever else is queued into the batch, up to its limit.
fn drain(rx: &mut mpsc::UnboundedReceiver<Queued>, batch: &mut Vec<Queued>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(w) => batch.push(w),
            Err(_) => break,
        }
    }
}

/// Applies a batch in one transaction. Allocation inserts and releases, the bulk of the
/// traffic, become at most one DELETE and one INSERT statement each; an allocation made and
/// released within the batch is not written at all. Releases go first so that an instance
/// released and allocated again in the same batch does not trip the
/// one-active-allocation-per-instance index.
async fn commit(conn: &mut sqlx::SqliteConnection, batch: &[Queued]) -> Result<(), sqlx::Error> {
    let inserted: HashSet<&str> = batch
        .iter()
        .filter_map(|(w, _)| match w {
            Write::Allocation(a) => Some(a.id.as_str()),
            _ => None,
        })
        .collect();
    let mut inserts: Vec<&AllocationRecord> = Vec::new();
    let mut releases: Vec<&str> = Vec::new();
    let mut cancelled: HashSet<&str> = HashSet::new();
    let mut others: Vec<&Write> = Vec::new();
    for (w, _) in batch {
        match w {
            Write::Allocation(a) => inserts.push(a),
            Write::ReleaseAllocation(id) if inserted.contains(id.as_str()) => {
                cancelled.insert(id.as_str());
            }
            Write::ReleaseAllocation(id) => releases.push(id),
            Write::Flush => {}
            other => others.push(other),
        }
    }
    inserts.retain(|a| !cancelled.contains(a.id.as_str()));
    if others.is_empty() {
        return allocation_rows(conn, &releases, &inserts).await;
    }
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    for w in others {
        apply(&mut tx, w).await?;
    }
    allocation_rows(&mut tx, &releases, &inserts).await?;
    tx.commit().await
}

macro_rules! delete_one {
    () => {
        "DELETE FROM allocations WHERE id = ?"
    };
}
macro_rules! delete_many {
    () => {
        "DELETE FROM allocations WHERE id IN (SELECT value FROM json_each(?))"
    };
}
macro_rules! insert_one {
    () => {
        "INSERT INTO allocations (id, instance_id, idempotency_key, created_at, body) \
         VALUES (?, ?, ?, ?, ?)"
    };
}
// `value` of an object is its JSON text: the body as stored.
macro_rules! insert_many {
    () => {
        "INSERT INTO allocations (id, instance_id, idempotency_key, created_at, body) \
         SELECT value ->> 'id', value ->> 'instanceId', value ->> 'idempotencyKey', \
         value ->> 'createdAt', value FROM json_each(?)"
    };
}
/// Both statements, and both again in their own transaction.
macro_rules! both {
    ($delete:ident, $insert:ident, $wrap:expr) => {
        if $wrap {
            concat!(
                "BEGIN IMMEDIATE; ",
                $delete!(),
                "; ",
                $insert!(),
                "; COMMIT"
            )
        } else {
            concat!($delete!(), "; ", $insert!())
        }
    };
}

/// Deletes the released rows and inserts the new ones with one query string, so that it is
/// one round trip to SQLite's worker thread (a wake-up of an idle thread each, on the path of
/// every allocation when the controller is not busy). Several rows go in as one JSON array
/// (`json_each`), so every batch is one of a few query strings, each prepared once: with one
/// parameter per row, each batch size was a new string for SQLite to parse and plan (a tenth
/// of its thread at peak). Two statements, outside a transaction, get their own
/// `BEGIN IMMEDIATE … COMMIT` in the same string.
async fn allocation_rows(
    conn: &mut sqlx::SqliteConnection,
    releases: &[&str],
    inserts: &[&AllocationRecord],
) -> Result<(), sqlx::Error> {
    // A single row keeps the plain statement: the unloaded controller's one allocation.
    let wrap = !conn.is_in_transaction() && !releases.is_empty() && !inserts.is_empty();
    let sql = match (releases, inserts) {
        ([], []) => return Ok(()),
        ([_], []) => delete_one!(),
        (_, []) => delete_many!(),
        ([], [_]) => insert_one!(),
        ([], _) => insert_many!(),
        ([_], [_]) => both!(delete_one, insert_one, wrap),
        ([_], _) => both!(delete_one, insert_many, wrap),
        (_, [_]) => both!(delete_many, insert_one, wrap),
        _ => both!(delete_many, insert_many, wrap),
    };
    let q = sqlx::query(sql);
    let q = match releases {
        [] => q,
        [id] => q.bind(*id),
        ids => q.bind(to_json(&ids)),
    };
    let q = match inserts {
        [] => q,
        [a] => q
            .bind(a.id.as_str())
            .bind(a.instance_id.as_str())
            .bind(a.idempotency_key.as_deref())
            .bind(a.created_at as i64)
            .bind(to_json(a)),
        rows => q.bind(to_json(&rows)),
    };
    let result = q.execute(&mut *conn).await;
    if result.is_err() && wrap {
        // The statement that failed left the transaction open (or SQLite already rolled it
        // back, and this fails harmlessly).
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
    }
    result.map(drop)
}

async fn apply(tx: &mut sqlx::SqliteConnection, w: &Write) -> Result<(), sqlx::Error> {
    match w {
        Write::Region(r) => {
            sqlx::query("INSERT OR REPLACE INTO regions (id, name, body) VALUES (?, ?, ?)")
                .bind(r.id)
                .bind(&r.name)
                .bind(to_json(r))
                .execute(&mut *tx)
                .await?;
        }
        Write::DeleteRegion(id) => {
            sqlx::query("DELETE FROM regions WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        Write::DcLocation(d) => {
            sqlx::query(
                "INSERT OR REPLACE INTO dc_locations (id, region_id, name, body) VALUES (?, ?, ?, ?)",
            )
            .bind(d.id)
            .bind(d.region_id)
            .bind(&d.name)
            .bind(to_json(d))
            .execute(&mut *tx)
            .await?;
        }
        Write::Environment(e) => {
            sqlx::query(
                "INSERT OR REPLACE INTO deployment_environments (id, name, body) VALUES (?, ?, ?)",
            )
            .bind(e.id)
            .bind(&e.name)
            .bind(to_json(e))
            .execute(&mut *tx)
            .await?;
        }
        Write::Application(a) => {
            sqlx::query("INSERT OR REPLACE INTO applications (id, body) VALUES (?, ?)")
                .bind(a.id)
                .bind(to_json(a))
                .execute(&mut *tx)
                .await?;
        }
        Write::DeleteApplication(id) => {
            sqlx::query("DELETE FROM applications WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        Write::Profile(p) => {
            sqlx::query("INSERT OR REPLACE INTO profiles (id, body) VALUES (?, ?)")
                .bind(&p.id)
                .bind(to_json(p))
                .execute(&mut *tx)
                .await?;
        }
        Write::DeleteProfile(id) => {
            sqlx::query("DELETE FROM profiles WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        Write::Build(b) => {
            sqlx::query(
                "INSERT OR REPLACE INTO builds (id, application_id, body) VALUES (?, ?, ?)",
            )
            .bind(&b.id)
            .bind(b.application_id)
            .bind(to_json(b))
            .execute(&mut *tx)
            .await?;
        }
        Write::DeleteBuild(id) => {
            sqlx::query("DELETE FROM builds WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        Write::Fleet(f) => {
            sqlx::query("INSERT OR REPLACE INTO fleets (id, body) VALUES (?, ?)")
                .bind(f.id as i64)
                .bind(to_json(f))
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM deleted_fleets WHERE id = ?")
                .bind(f.id as i64)
                .execute(&mut *tx)
                .await?;
        }
        Write::DeleteFleet(id) => {
            sqlx::query("DELETE FROM fleets WHERE id = ?")
                .bind(*id as i64)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT OR REPLACE INTO deleted_fleets (id, deleted_at) VALUES (?, ?)")
                .bind(*id as i64)
                .bind(crate::unix_now() as i64)
                .execute(&mut *tx)
                .await?;
        }
        Write::Host(h) => {
            sqlx::query("INSERT OR REPLACE INTO hosts (id, name, body) VALUES (?, ?, ?)")
                .bind(h.id as i64)
                .bind(&h.name)
                .bind(to_json(h))
                .execute(&mut *tx)
                .await?;
        }
        Write::DeleteHost(h) => {
            sqlx::query("DELETE FROM hosts WHERE id = ?")
                .bind(h.id as i64)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT OR REPLACE INTO deleted_hosts (id, name, deleted_at) VALUES (?, ?, ?)",
            )
            .bind(h.id as i64)
            .bind(&h.name)
            .bind(h.deleted_at as i64)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "DELETE FROM deleted_hosts WHERE id NOT IN (SELECT id FROM deleted_hosts ORDER BY id DESC LIMIT ?)",
            )
            .bind(DELETED_HOSTS_KEPT as i64)
            .execute(&mut *tx)
            .await?;
        }
        Write::Instance(i) => {
            sqlx::query(
                "INSERT OR REPLACE INTO instances (id, host_id, application_id, removed_at, body) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(&i.id)
            .bind(i.host_id as i64)
            .bind(i.application_id)
            .bind(i.removed_at.map(|t| t as i64))
            .bind(to_json(i))
            .execute(&mut *tx)
            .await?;
        }
        // Batched by `commit` (a flush has nothing to write).
        Write::Allocation(_) | Write::ReleaseAllocation(_) | Write::Flush => {}
        Write::Probe => {
            sqlx::query("INSERT OR REPLACE INTO write_probe (id, at) VALUES (1, ?)")
                .bind(crate::unix_now() as i64)
                .execute(&mut *tx)
                .await?;
        }
        Write::ErrorStory(s) => {
            sqlx::query(
                "INSERT OR REPLACE INTO error_stories (identifier, created_at, body) VALUES (?, ?, ?)",
            )
            .bind(&s.identifier)
            .bind(crate::unix_now() as i64)
            .bind(to_json(s))
            .execute(&mut *tx)
            .await?;
        }
        Write::PruneErrorStories { keep } => {
            sqlx::query(
                "DELETE FROM error_stories WHERE identifier NOT IN (SELECT identifier FROM error_stories ORDER BY created_at DESC LIMIT ?)",
            )
            .bind(*keep as i64)
            .execute(&mut *tx)
            .await?;
        }
        Write::PruneRemovedInstances { keep } => {
            sqlx::query(
                "DELETE FROM instances WHERE removed_at IS NOT NULL AND id NOT IN (SELECT id FROM instances WHERE removed_at IS NOT NULL ORDER BY removed_at DESC LIMIT ?)",
            )
            .bind(*keep as i64)
            .execute(&mut *tx)
            .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::allocation_body;

    /// A store in a fresh database file, removed when dropped.
    struct TempStore {
        dir: PathBuf,
        store: Store,
        writer: Writer,
    }

    impl TempStore {
        async fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("berth-store-{}", uuid::Uuid::new_v4()));
            let store = Store::open(&dir.join("controller.db"))
                .await
                .expect("open the store");
            let writer = store.start_writer(crate::metrics::Metrics::new(false).store());
            Self { dir, store, writer }
        }

        /// Active allocations as `(id, instance)`, sorted, as a restarted controller loads them.
        async fn active(&self) -> Vec<(String, String)> {
            let mut v: Vec<_> = self
                .store
                .load()
                .await
                .expect("load")
                .allocations
                .into_iter()
                .map(|a| (a.id, a.instance_id))
                .collect();
            v.sort();
            v
        }
    }

    impl Drop for TempStore {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A damaged database is refused at start with what to do about it, and left as it is.
    #[tokio::test]
    async fn a_damaged_database_is_refused_with_what_to_do() {
        let dir = std::env::temp_dir().join(format!("berth-store-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("controller.db");
        let garbage = vec![0x5a_u8; 8192];
        std::fs::write(&path, &garbage).expect("write");
        let e = Store::open(&path)
            .await
            .expect_err("not a database")
            .to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("restore it from a backup"),
            "{e}"
        );
        assert_eq!(
            std::fs::read(&path).expect("read"),
            garbage,
            "left as it was"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A database a newer controller migrated (a rollback after an upgrade) is refused with
    /// what to do, and left as it was.
    #[tokio::test]
    async fn a_database_of_a_newer_controller_is_refused_with_what_to_do() {
        let t = TempStore::new().await;
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (999, 'from the future', 1, x'00', 0)",
        )
        .execute(&t.store.pool)
        .await
        .expect("a newer migration");
        let path = t.dir.join("controller.db");
        let e = Store::open(&path).await.expect_err("newer");
        assert!(matches!(e, StoreError::Newer { version: 999, .. }), "{e:?}");
        let e = e.to_string();
        assert!(
            e.contains(&path.display().to_string())
                && e.contains("newer berth-controller")
                && e.contains("restore a backup"),
            "{e}"
        );
        let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations")
            .fetch_all(&t.store.pool)
            .await
            .expect("versions");
        assert_eq!(versions.last(), Some(&999), "left as it was");
    }

    fn instance(id: &str, removed_at: Option<u64>) -> Write {
        let view = serde_json::from_value(serde_json::json!({
            "id": id, "applicationId": 7, "profileId": "p", "build": "b",
            "managementProtocol": "arcus", "port": 1, "managementPort": 2, "status": 4,
            "state": "running", "createdAt": 1, "updatedAt": 1, "autoRestart": true,
            "version": 1,
        }))
        .expect("view");
        Write::Instance(Box::new(InstanceRecord {
            id: id.to_owned(),
            host_id: 1,
            application_id: 7,
            fleet_id: None,
            view,
            created_at: 1,
            removed_at,
        }))
    }

    /// History stays bounded: pruning keeps the newest removed instances and never touches a
    /// live one.
    #[tokio::test]
    async fn pruning_keeps_the_newest_removed_instances_and_every_live_one() {
        let t = TempStore::new().await;
        let mut writes: Vec<Write> = (1..=5)
            .map(|n| instance(&format!("gone-{n}"), Some(100 + n)))
            .collect();
        writes.push(instance("live-1", None));
        writes.push(instance("live-2", None));
        writes.push(Write::PruneRemovedInstances { keep: 2 });
        commit_ok(&t.writer, writes).await;
        let kept: Vec<String> = t
            .store
            .removed_instances()
            .await
            .expect("history")
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(kept, ["gone-5", "gone-4"]);
        let mut live: Vec<String> = t
            .store
            .load()
            .await
            .expect("load")
            .instances
            .into_iter()
            .map(|i| i.id)
            .collect();
        live.sort();
        assert_eq!(live, ["live-1", "live-2"]);
    }

    /// A deleted fleet stays known as deleted across restarts (its instances are removed),
    /// until a fleet of that id is created again.
    #[tokio::test]
    async fn a_deleted_fleet_is_remembered_until_created_again() {
        let t = TempStore::new().await;
        let fleet: berth_protocol::controller_api::Fleet = serde_json::from_value(
            serde_json::json!({"id": 9, "name": "f", "applicationId": 7, "profileId": "p", "instancesPerHost": 1}),
        )
        .expect("fleet");
        let load = async || t.store.load().await.expect("load");
        commit_ok(
            &t.writer,
            vec![Write::Fleet(fleet.clone()), Write::DeleteFleet(9)],
        )
        .await;
        let s = load().await;
        assert!(s.fleets.is_empty());
        assert_eq!(s.deleted_fleets, [9]);
        commit_ok(&t.writer, vec![Write::Fleet(fleet)]).await;
        let s = load().await;
        assert_eq!(s.fleets.len(), 1);
        assert!(s.deleted_fleets.is_empty());
    }

    /// A deleted host's row goes and its id stays taken; a new agent may then take its name.
    #[tokio::test]
    async fn a_deleted_host_keeps_its_id_and_frees_its_name() {
        let t = TempStore::new().await;
        let host = |id: u64| HostRecord {
            id,
            name: "ams-bm-017".to_owned(),
            region_id: 1,
            dc_location_id: 1,
            is_virtual: false,
            labels: Default::default(),
            advertise_url: "http://127.0.0.1:6824".to_owned(),
            addresses: Vec::new(),
            capacity: Default::default(),
            agent_version: "test".to_owned(),
            agent_token: "a".repeat(32),
            host_token_digest: "00".repeat(32),
            draining: false,
            registered_at: 1,
        };
        let gone = DeletedHost {
            id: 3,
            name: "ams-bm-017".to_owned(),
            deleted_at: 1_700_000_000,
        };
        commit_ok(
            &t.writer,
            vec![
                Write::Host(Box::new(host(3))),
                Write::DeleteHost(gone.clone()),
                Write::Host(Box::new(host(4))),
            ],
        )
        .await;
        let s = t.store.load().await.expect("load");
        assert_eq!(s.hosts, [host(4)]);
        assert_eq!(s.deleted_hosts, std::slice::from_ref(&gone));

        // Only the newest are remembered, and the highest id is always among them.
        let more = (10..10 + DELETED_HOSTS_KEPT as u64)
            .map(|id| Write::DeleteHost(DeletedHost { id, ..gone.clone() }));
        commit_ok(&t.writer, more.collect()).await;
        let ids: Vec<u64> = t
            .store
            .load()
            .await
            .expect("load")
            .deleted_hosts
            .iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(ids.len(), DELETED_HOSTS_KEPT);
        assert_eq!(ids.iter().min(), Some(&10));
        assert_eq!(ids.iter().max(), Some(&(9 + DELETED_HOSTS_KEPT as u64)));
    }

    fn allocation(id: &str, instance: &str) -> Write {
        let record = serde_json::from_value(allocation_body(id, instance)).expect("record");
        Write::Allocation(Arc::new(record))
    }

    fn release(id: &str) -> Write {
        Write::ReleaseAllocation(id.to_owned())
    }

    /// Queues every write at once and waits for each. They share one batch (up to
    /// `MAX_BATCH`): these tests run on a single-threaded runtime, where the writer task cannot
    /// run until the first wait, and it then drains the whole queue.
    async fn commit_all(w: &Writer, writes: Vec<Write>) -> Vec<Result<(), CommitError>> {
        let pending: Vec<_> = writes.into_iter().map(|x| w.submit_durable(x)).collect();
        let mut out = Vec::new();
        for p in pending {
            out.push(p.await.expect("the writer answers"));
        }
        out
    }

    /// [`commit_all`], each write committed.
    async fn commit_ok(w: &Writer, writes: Vec<Write>) {
        for r in commit_all(w, writes).await {
            r.expect("committed");
        }
    }

    fn pair(id: &str, instance: &str) -> (String, String) {
        (id.to_owned(), instance.to_owned())
    }

    #[tokio::test]
    async fn single_allocations_and_releases_are_durable() {
        let t = TempStore::new().await;
        commit_ok(&t.writer, vec![allocation("a-1", "i-1")]).await;
        commit_ok(&t.writer, vec![allocation("a-2", "i-2")]).await;
        assert_eq!(t.active().await, [pair("a-1", "i-1"), pair("a-2", "i-2")]);
        commit_ok(&t.writer, vec![release("a-1")]).await;
        assert_eq!(t.active().await, [pair("a-2", "i-2")]);
    }

    #[tokio::test]
    async fn a_second_active_allocation_of_one_instance_is_refused() {
        let t = TempStore::new().await;
        commit_ok(&t.writer, vec![allocation("a-1", "i-1")]).await;
        let refused = commit_all(&t.writer, vec![allocation("a-2", "i-1")]).await;
        let err = refused[0]
            .as_ref()
            .expect_err("the unique index refuses it");
        assert!(
            matches!(err, CommitError::Refused { .. }) && err.to_string().contains("UNIQUE"),
            "{err}"
        );
        assert_eq!(t.active().await, [pair("a-1", "i-1")]);
        // The writer goes on after a failed batch.
        commit_ok(&t.writer, vec![allocation("a-3", "i-3")]).await;
        assert_eq!(t.active().await, [pair("a-1", "i-1"), pair("a-3", "i-3")]);
    }

    #[tokio::test]
    async fn a_refused_write_takes_no_other_write_with_it() {
        let t = TempStore::new().await;
        commit_ok(
            &t.writer,
            vec![allocation("a-1", "i-1"), allocation("a-2", "i-2")],
        )
        .await;
        // One batch (this runtime runs the writer only once both are queued): the insert the
        // unique index refuses fails the batch's transaction, and the writer then writes each
        // write on its own, so the release still lands and only the insert is refused.
        let results = commit_all(&t.writer, vec![release("a-2"), allocation("a-3", "i-1")]).await;
        assert!(results[0].is_ok(), "{results:?}");
        assert!(
            matches!(results[1], Err(CommitError::Refused { .. })),
            "{results:?}"
        );
        assert_eq!(t.active().await, [pair("a-1", "i-1")]);
        // The connection is not left inside the failed transaction.
        commit_ok(&t.writer, vec![release("a-1"), allocation("a-4", "i-4")]).await;
        assert_eq!(t.active().await, [pair("a-4", "i-4")]);
        // The same with several rows of each (the JSON-array statements): of two inserts for
        // one instance, the first is written and the second refused; the releases land.
        commit_ok(&t.writer, vec![allocation("a-5", "i-5")]).await;
        let results = commit_all(
            &t.writer,
            vec![
                release("a-4"),
                release("a-5"),
                allocation("a-6", "i-6"),
                allocation("a-7", "i-6"),
            ],
        )
        .await;
        let refused: Vec<bool> = results.iter().map(Result::is_err).collect();
        assert_eq!(refused, [false, false, false, true], "{results:?}");
        assert_eq!(t.active().await, [pair("a-6", "i-6")]);
        // A write nobody waits for, refused, is dropped; the writer goes on.
        t.writer.submit(allocation("a-8", "i-6"));
        commit_ok(&t.writer, vec![allocation("a-9", "i-9")]).await;
        assert_eq!(t.active().await, [pair("a-6", "i-6"), pair("a-9", "i-9")]);
    }

    /// The disk takes no writes for a while (here: another connection holds the write lock
    /// past the busy timeout, which SQLite reports like a disk that cannot be written). The
    /// waiting allocation is refused at once; the release nobody waits for is kept, and lands
    /// once the database takes writes again, with no new write to carry it. Forgotten, its row
    /// would refuse every later allocation of the instance.
    #[tokio::test]
    async fn writes_kept_while_the_database_takes_none_land_when_it_does() {
        let t = TempStore::new().await;
        commit_ok(
            &t.writer,
            vec![allocation("a-1", "i-1"), allocation("a-2", "i-2")],
        )
        .await;
        let mut blocker = sqlx::SqliteConnection::connect(&format!(
            "sqlite://{}",
            t.dir.join("controller.db").display()
        ))
        .await
        .expect("a second connection");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut blocker)
            .await
            .expect("the write lock");
        t.writer.submit(release("a-1"));
        let refused = commit_all(&t.writer, vec![allocation("a-3", "i-3")]).await;
        assert!(
            matches!(refused[0], Err(CommitError::Unavailable { .. })),
            "{refused:?}"
        );
        let trouble = t.store.trouble().expect("the writer reports its trouble");
        assert!(trouble.failures >= 1 && trouble.kept == 1, "{trouble:?}");
        sqlx::query("ROLLBACK")
            .execute(&mut blocker)
            .await
            .expect("the lock let go");
        wait_active(&t, &[pair("a-2", "i-2")]).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while t.store.trouble().is_some() {
            assert!(tokio::time::Instant::now() < deadline, "still in trouble");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        commit_ok(&t.writer, vec![allocation("a-4", "i-1")]).await;
        assert_eq!(t.active().await, [pair("a-2", "i-2"), pair("a-4", "i-1")]);
    }

    /// Polls the store until `want` are the active allocations.
    async fn wait_active(t: &TempStore, want: &[(String, String)]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let active = t.active().await;
            if active == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still {active:?}, want {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn the_writer_counts_its_commits_and_their_writes() {
        let t = TempStore::new().await;
        let metrics = crate::metrics::Metrics::new(false);
        let writer = t.store.start_writer(metrics.store());
        commit_ok(&writer, vec![allocation("a-1", "i-1")]).await;
        // Refused (a second allocation of i-1): a failed commit, and no write counted.
        let refused = commit_all(&writer, vec![allocation("a-2", "i-1")]).await;
        assert!(refused[0].is_err(), "{refused:?}");
        writer.flush().await.expect("flushed");
        let text = metrics.render(&[0; 7], &[]);
        let line = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
                .to_owned()
        };
        assert_eq!(line("berth_controller_store_writes_total"), "1");
        assert_eq!(line("berth_controller_store_commit_failures_total"), "1");
        // The allocation, the refused one and the flush: three commits timed.
        assert_eq!(
            line("berth_controller_store_commit_duration_seconds_count"),
            "3"
        );
    }

    #[tokio::test]
    async fn writes_nobody_waits_for_are_committed_alone_after_a_while() {
        let mut t = TempStore::new().await;
        commit_ok(
            &t.writer,
            vec![allocation("a-1", "i-1"), allocation("a-2", "i-2")],
        )
        .await;
        t.writer.submit(release("a-1"));
        wait_active(&t, &[pair("a-2", "i-2")]).await;
        // And when the writer is dropped while they wait.
        t.writer.submit(release("a-2"));
        t.writer = t
            .store
            .start_writer(crate::metrics::Metrics::new(false).store());
        wait_active(&t, &[]).await;
        // A flush returns once what was queued before it is committed.
        commit_ok(&t.writer, vec![allocation("a-3", "i-3")]).await;
        t.writer.submit(release("a-3"));
        t.writer.flush().await.expect("flushed");
        assert_eq!(t.active().await, []);
    }

    #[tokio::test]
    async fn released_and_reallocated_in_one_batch() {
        let t = TempStore::new().await;
        commit_ok(&t.writer, vec![allocation("a-1", "i-1")]).await;
        commit_ok(
            &t.writer,
            vec![
                release("a-1"),
                allocation("a-2", "i-1"),
                // Made and released before any commit: never written.
                allocation("a-3", "i-3"),
                release("a-3"),
                Write::PruneErrorStories { keep: 10 },
            ],
        )
        .await;
        assert_eq!(t.active().await, [pair("a-2", "i-1")]);
    }

    #[tokio::test]
    async fn batches_of_every_shape_write_their_rows() {
        // None, one and several releases, each with none, one and several allocations: each
        // pair is a different query string.
        let t = TempStore::new().await;
        let mut next = 0;
        let mut live: Vec<String> = Vec::new();
        for releases in 0..3 {
            for inserts in 0..3 {
                // Enough rows standing to release from.
                while live.len() < releases {
                    let id = format!("a-{next:03}");
                    commit_ok(&t.writer, vec![allocation(&id, &format!("i-{next:03}"))]).await;
                    live.push(id);
                    next += 1;
                }
                let mut writes: Vec<Write> =
                    live.drain(..releases).map(|id| release(&id)).collect();
                for _ in 0..inserts {
                    let id = format!("a-{next:03}");
                    writes.push(allocation(&id, &format!("i-{next:03}")));
                    live.push(id);
                    next += 1;
                }
                commit_ok(&t.writer, writes).await;
                let mut want: Vec<_> = live
                    .iter()
                    .map(|id| pair(id, &id.replace("a-", "i-")))
                    .collect();
                want.sort();
                assert_eq!(
                    t.active().await,
                    want,
                    "{releases} releases, {inserts} inserts"
                );
            }
        }
        // What was written loads back whole.
        let loaded = t.store.load().await.expect("load");
        assert_eq!(loaded.allocations.len(), live.len());
        assert!(
            loaded
                .allocations
                .iter()
                .all(|a| a.metadata[0].value == "dust")
        );
    }

    #[tokio::test]
    async fn rows_written_together_load_back_unchanged() {
        // Several rows pass through SQLite's JSON functions: quotes, escapes, non-ASCII text
        // and large integers must come back as they were written.
        let t = TempStore::new().await;
        let records: Vec<AllocationRecord> = (0..3)
            .map(|i| {
                let mut a: AllocationRecord =
                    serde_json::from_value(allocation_body(&format!("a-{i}"), &format!("i-{i}")))
                        .expect("record");
                a.metadata[0].value = format!("\"quoted\" \\ line\nbreak é 😀 {i}");
                a.agent_version = u64::from(u32::MAX) << 20 | i;
                a.idempotency_key = (i == 1).then(|| "key-1".to_owned());
                a
            })
            .collect();
        let writes = records
            .iter()
            .map(|a| Write::Allocation(Arc::new(a.clone())))
            .collect();
        commit_ok(&t.writer, writes).await;
        let mut loaded = t.store.load().await.expect("load").allocations;
        loaded.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(loaded, records);
    }

    #[tokio::test]
    async fn large_batches() {
        let t = TempStore::new().await;
        let n = 1234;
        let writes = (0..n)
            .map(|i| allocation(&format!("a-{i:05}"), &format!("i-{i:05}")))
            .collect();
        commit_ok(&t.writer, writes).await;
        let released = 566;
        let writes = (0..released)
            .map(|i| release(&format!("a-{i:05}")))
            .collect();
        commit_ok(&t.writer, writes).await;
        let active = t.active().await;
        assert_eq!(active.len(), n - released);
        assert_eq!(
            active[0],
            pair(&format!("a-{released:05}"), &format!("i-{released:05}"))
        );
    }
}
