//! The agent's local state: enough to re-adopt every game after the agent restarts.
//!
//! Two files. The **snapshot** (`agent-state.json`) holds every instance; it is written
//! atomically (temp file, fsync, rename, fsync of the directory) and coalesced, so a burst of
//! changes costs one write. The **journal** (`agent-state.journal`) takes the one change that
//! must be written before it is answered — an allocation — as one small line, and the writer
//! writes every line waiting at once (group commit), so an allocation never waits for every
//! instance to be serialised. Journal lines are not fsynced (see `write_loop`). Each line names the snapshot it follows: after a newer
//! snapshot it is ignored, even if the crash came before the journal was emptied.

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
    /// The writer's sequence number of this snapshot: journal lines with this `base` follow it.
    #[serde(default)]
    pub seq: u64,
    pub instances: Vec<PersistedInstance>,
}

/// One journal line: an instance's allocation state as it was acknowledged.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JournalEntry {
    /// The snapshot this line follows.
    pub base: u64,
    pub id: String,
    pub status: InstanceStatus,
    pub allocation: Option<PersistedAllocation>,
    pub metadata: Vec<KeyValue>,
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

pub fn journal_path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent-state.journal")
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
                seq: 0,
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
    let mut state = state;
    replay_journal(state_dir, &mut state);
    Ok(state)
}

/// Applies the journal lines that follow this snapshot. A line cut short by a crash (the last
/// one) is not a change that was acknowledged, and is skipped.
fn replay_journal(state_dir: &Path, state: &mut StateFile) {
    let Ok(text) = std::fs::read_to_string(journal_path(state_dir)) else {
        return;
    };
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<JournalEntry>(line) else {
            continue;
        };
        if e.base != state.seq {
            continue;
        }
        if let Some(inst) = state.instances.iter_mut().find(|i| i.id == e.id) {
            inst.status = e.status;
            inst.allocation = e.allocation;
            inst.metadata = e.metadata;
        }
    }
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

/// What the writer thread is given, in order.
#[derive(Debug)]
enum Job {
    Snapshot { seq: u64, bytes: Vec<u8> },
    Journal { seq: u64, line: Vec<u8> },
}

/// Hands snapshots and journal lines to the writer thread. Every job carries a sequence
/// number, and the writer publishes the number of the last one on disk, so that an answer can
/// wait until what it acknowledges is written.
#[derive(Debug, Clone)]
pub struct StateWriter {
    tx: std::sync::mpsc::Sender<Job>,
    written: watch::Receiver<u64>,
}

impl StateWriter {
    /// Starts the writer thread for `state_dir`.
    pub fn start(state_dir: PathBuf) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let (written_tx, written) = watch::channel(0u64);
        let spawned = std::thread::Builder::new()
            .name("berth-state".to_owned())
            .spawn(move || write_loop(&state_dir, &rx, &written_tx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the state writer; state will not be saved");
        }
        Self { tx, written }
    }

    /// Queues snapshot number `seq`.
    pub fn save(&self, seq: u64, bytes: Vec<u8>) {
        let _ = self.tx.send(Job::Snapshot { seq, bytes });
    }

    /// Queues journal line number `seq`.
    pub fn append(&self, seq: u64, entry: &JournalEntry) {
        let mut line = serde_json::to_vec(entry).unwrap_or_default();
        line.push(b'\n');
        let _ = self.tx.send(Job::Journal { seq, line });
    }

    /// The number of the last job on disk.
    pub fn written(&self) -> watch::Receiver<u64> {
        self.written.clone()
    }
}

fn write_loop(state_dir: &Path, rx: &std::sync::mpsc::Receiver<Job>, written: &watch::Sender<u64>) {
    let journal = journal_path(state_dir);
    let open_journal = |truncate: bool| {
        OpenOptions::new()
            .create(true)
            .append(!truncate)
            .write(true)
            .truncate(truncate)
            .open(&journal)
    };
    let mut file = open_journal(false).ok();
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter());
        let last_seq = jobs.iter().map(|j| match j {
            Job::Snapshot { seq, .. } | Job::Journal { seq, .. } => *seq,
        });
        let last_seq = last_seq.max().unwrap_or(0);
        // The newest snapshot covers every job queued before it.
        let newest = jobs.iter().rposition(|j| matches!(j, Job::Snapshot { .. }));
        let tail = match newest {
            Some(i) => {
                if let Job::Snapshot { bytes, .. } = &jobs[i] {
                    match write_atomic(state_dir, bytes) {
                        // Lines before it are now stale (and ignored by `base` if this
                        // truncation is lost in a crash).
                        Ok(()) => file = open_journal(true).ok(),
                        Err(e) => tracing::error!(error = %e, "state file not written"),
                    }
                }
                &jobs[i + 1..]
            }
            None => &jobs[..],
        };
        let mut lines = Vec::new();
        for j in tail {
            if let Job::Journal { line, .. } = j {
                lines.extend_from_slice(line);
            }
        }
        if !lines.is_empty() {
            // No fsync: the journal protects against the *agent process* dying (SIGKILL,
            // restart, upgrade), and a written line survives that in the page cache, readable
            // at once. Only a host crash loses it, and that also ends every game it describes.
            // Snapshots, in contrast, are synced: the agent must be able to start after one.
            let result = match file.as_mut() {
                Some(f) => f.write_all(&lines),
                None => Err(io::Error::other("the journal could not be opened")),
            };
            if let Err(e) = result {
                tracing::error!(error = %e, path = %journal.display(), "journal not written");
                file = open_journal(false).ok();
            }
        }
        // Published after failures too: a broken disk is logged, not a reason to hold
        // answers forever.
        written.send_replace(last_seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str) -> PersistedInstance {
        PersistedInstance {
            id: id.to_owned(),
            fleet_id: None,
            management_protocol: ManagementProtocol::Arcus,
            confirm_allocation: false,
            profile: serde_json::from_value(serde_json::json!({
                "id": "p", "applicationId": 1, "executable": "/bin/true"
            }))
            .expect("profile"),
            port: 20000,
            management_port: 30000,
            pid: Some(42),
            start_time: 7,
            started_at: None,
            pid_changed_at: None,
            stopped_at: None,
            created_at: 0,
            desired: Desired::Running,
            restarts: 0,
            status: InstanceStatus::Online,
            allocation: None,
            metadata: Vec::new(),
            reverse_metadata: Vec::new(),
        }
    }

    fn entry(base: u64, alloc: &str) -> JournalEntry {
        JournalEntry {
            base,
            id: "a".into(),
            status: InstanceStatus::Allocated,
            allocation: Some(PersistedAllocation {
                id: Some(alloc.into()),
                at: 1,
                game_confirmed: false,
            }),
            metadata: vec![KeyValue::new("map", "dust")],
        }
    }

    #[tokio::test]
    async fn journal_lines_follow_their_snapshot() {
        let dir = std::env::temp_dir().join(format!("berth-journal-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let snapshot = |seq| {
            serde_json::to_vec(&StateFile {
                format: FORMAT,
                generation: 1,
                agent_token: "t".into(),
                seq,
                instances: vec![instance("a")],
            })
            .expect("ser")
        };
        let writer = StateWriter::start(dir.clone());
        let mut written = writer.written();
        writer.save(1, snapshot(1));
        writer.append(2, &entry(1, "first"));
        writer.append(3, &entry(1, "second"));
        while *written.borrow_and_update() < 3 {
            written.changed().await.expect("writer alive");
        }
        let loaded = load(&dir).expect("load");
        let a = &loaded.instances[0];
        assert_eq!(a.status, InstanceStatus::Allocated);
        assert_eq!(
            a.allocation.as_ref().and_then(|x| x.id.as_deref()),
            Some("second")
        );
        assert_eq!(a.metadata, vec![KeyValue::new("map", "dust")]);

        // A newer snapshot makes older lines stale, even if they were still in the file.
        std::fs::write(state_path(&dir), snapshot(4)).expect("snapshot");
        let mut stale = serde_json::to_vec(&entry(1, "stale")).expect("ser");
        stale.push(b'\n');
        // A torn last line (a crash mid-write) is not an acknowledged change.
        stale.extend_from_slice(br#"{"base":4,"id":"a","sta"#);
        std::fs::write(journal_path(&dir), stale).expect("journal");
        let loaded = load(&dir).expect("load");
        assert_eq!(loaded.instances[0].status, InstanceStatus::Online);
        assert!(loaded.instances[0].allocation.is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

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
