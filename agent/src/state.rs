//! The agent's local state file: enough to re-adopt every game after the agent restarts.
//!
//! Writes are atomic (temp file, fsync, rename, fsync of the directory) and coalesced: the
//! supervisor hands the latest snapshot to a writer task and carries on, and the writer always
//! writes the newest snapshot it has, so a burst of changes costs one write, not one each.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use berth_protocol::agent_api::Profile;
use berth_protocol::{InstanceStatus, KeyValue, ManagementProtocol};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

const FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateFile {
    pub format: u32,
    /// Incremented at every agent start; the high bits of every instance version.
    pub generation: u64,
    /// The token the controller presents to this agent.
    pub agent_token: String,
    pub instances: Vec<PersistedInstance>,
}

/// What the supervisor wants to be true of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Stopped,
    Removed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PersistedAllocation {
    pub id: Option<String>,
    pub at: u64,
    /// The game reported status 5 during this allocation: a later 4 from it ends the match.
    pub game_confirmed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PersistedInstance {
    pub id: String,
    pub fleet_id: Option<u64>,
    pub management_protocol: ManagementProtocol,
    pub confirm_allocation: bool,
    pub profile: Profile,
    pub port: u16,
    pub management_port: u16,
    pub pid: Option<u32>,
    pub start_time: u64,
    pub started_at: Option<u64>,
    pub pid_changed_at: Option<u64>,
    pub stopped_at: Option<u64>,
    pub created_at: u64,
    pub desired: Desired,
    pub restarts: u32,
    pub status: InstanceStatus,
    pub allocation: Option<PersistedAllocation>,
    pub metadata: Vec<KeyValue>,
    pub reverse_metadata: Vec<KeyValue>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot read state file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "state file {path} is corrupt ({source}); move it away to start with no instances (running games will then not be re-adopted)"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("state file {path} has format {found}; this agent understands format {FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("cannot write state file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

pub fn state_path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent-state.json")
}

/// Reads the state file, or a fresh state when there is none.
pub fn load(state_dir: &Path) -> Result<StateFile, StateError> {
    std::fs::create_dir_all(state_dir).map_err(|source| StateError::CreateDir {
        path: state_dir.to_owned(),
        source,
    })?;
    let path = state_path(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(StateFile {
                format: FORMAT,
                generation: 0,
                agent_token: new_token(),
                instances: Vec::new(),
            });
        }
        Err(source) => return Err(StateError::Read { path, source }),
    };
    let state: StateFile =
        serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
    if state.format != FORMAT {
        return Err(StateError::Format {
            path,
            found: state.format,
        });
    }
    Ok(state)
}

/// A random 256-bit token, hex-encoded.
pub fn new_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Writes `bytes` to the state file atomically.
pub fn write_atomic(state_dir: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let path = state_path(state_dir);
    // A name of its own per write: the final write at shutdown may overlap a background one.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = state_dir.join(format!("agent-state.json.tmp.{}.{seq}", std::process::id()));
    let wrap = |source| StateError::Write {
        path: path.clone(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(wrap)?;
    f.write_all(bytes).map_err(wrap)?;
    f.sync_all().map_err(wrap)?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(wrap)?;
    File::open(state_dir)
        .and_then(|d| d.sync_all())
        .map_err(wrap)?;
    Ok(())
}

/// Hands snapshots to the writer task; the newest one always wins. Every snapshot carries a
/// sequence number, and the writer publishes the number of the last one it wrote, so that an
/// answer can wait until what it acknowledges is on disk.
#[derive(Debug, Clone)]
pub struct StateWriter {
    tx: watch::Sender<Option<(u64, Vec<u8>)>>,
    written: watch::Receiver<u64>,
}

impl StateWriter {
    /// Starts the writer task for `state_dir`.
    pub fn start(state_dir: PathBuf) -> Self {
        let (tx, mut rx) = watch::channel::<Option<(u64, Vec<u8>)>>(None);
        let (written_tx, written) = watch::channel(0u64);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some((seq, bytes)) = rx.borrow_and_update().clone() else {
                    continue;
                };
                let dir = state_dir.clone();
                match tokio::task::spawn_blocking(move || write_atomic(&dir, &bytes)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "state file not written"),
                    Err(e) => tracing::error!(error = %e, "state writer failed"),
                }
                // Published after failures too: a broken disk is logged, not a reason to
                // hold answers forever.
                written_tx.send_replace(seq);
            }
        });
        Self { tx, written }
    }

    /// Queues snapshot number `seq` (numbers increase).
    pub fn save(&self, seq: u64, bytes: Vec<u8>) {
        self.tx.send_replace(Some((seq, bytes)));
    }

    /// The number of the last snapshot written.
    pub fn written(&self) -> watch::Receiver<u64> {
        self.written.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("berth-state-{}", uuid::Uuid::new_v4()));
        let fresh = load(&dir).expect("fresh");
        assert_eq!(fresh.instances.len(), 0);
        assert_eq!(fresh.agent_token.len(), 64);
        let bytes = serde_json::to_vec(&fresh).expect("ser");
        write_atomic(&dir, &bytes).expect("write");
        let again = load(&dir).expect("load");
        assert_eq!(again.agent_token, fresh.agent_token);
        std::fs::write(state_path(&dir), b"{not json").expect("corrupt");
        assert!(matches!(load(&dir), Err(StateError::Corrupt { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
