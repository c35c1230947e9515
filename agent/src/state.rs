//! The agent's local state: enough to re-adopt every game after the agent restarts.
//!
//! Two kinds of file. The **snapshot** (`agent-state.json`) holds every instance; it is written
//! atomically (temp file, fsync, rename, fsync of the directory) by a writer thread and
//! coalesced, so a burst of changes costs one write. The **journal** takes the one change that
//! must be written before it is answered — an allocation — as one small line, written by the
//! supervisor itself before it answers (`Journal`), so an allocation neither waits for every
//! instance to be serialised nor hands off to another thread. Each snapshot has a journal file
//! of its own (`agent-state.journal.<seq>`) for the changes made after it; once a snapshot is
//! on disk, the writer deletes the journals before it. Loading replays every journal from the
//! snapshot's on, in order, so a snapshot that never reached the disk loses nothing.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use berth_protocol::agent_api::Profile;
use berth_protocol::{InstanceStatus, KeyValue, ManagementProtocol};
use prometheus_client::metrics::counter::Counter;
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
    /// The snapshot this line follows (also the journal file's number; lines of the single
    /// journal file of earlier versions need it).
    pub base: u64,
    pub id: String,
    pub status: InstanceStatus,
    pub allocation: Option<PersistedAllocation>,
    pub metadata: Vec<KeyValue>,
    /// A new instance's whole record, written before its game is started: a game must never
    /// run that a restarted agent would not know of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<Box<PersistedInstance>>,
    /// What the operator or the controller now wants of the instance (stop, remove, start),
    /// written before the game is signalled: a restarted agent must not bring back a game it
    /// was told to remove. Such a line changes only `desired` (its `status` is the instance's
    /// at the time, for a reader).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<Desired>,
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
    /// Learned from a game found running with no record (see [`GameRecord`]): the controller
    /// holds its id, so a release naming any id ends it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recovered: bool,
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
    /// Found running with no record; until its game first reports a status, a 5 from it is
    /// its match (learned, not released as an allocation nobody acknowledged).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recovered: bool,
}

/// What a game's environment carries for the agent (`BERTH_AGENT_RECORD`): which agent
/// started it (its `state_dir`) and what the agent must know to supervise it. An agent whose
/// state was lost (a wiped or replaced `state_dir`, a corrupt state file moved away) finds its
/// running games by it and adopts them, instead of leaving them unmanaged and starting a second
/// set beside them. Games ignore it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GameRecord {
    pub state_dir: String,
    pub fleet_id: Option<u64>,
    pub management_protocol: ManagementProtocol,
    pub confirm_allocation: bool,
    pub profile: Profile,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot read state file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "state file {path} is corrupt ({source}); move it away to start afresh: running games started by this agent are then found by their environment and adopted, with their matches"
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

/// The journal of the changes made after snapshot `base`.
pub fn journal_path(state_dir: &Path, base: u64) -> PathBuf {
    state_dir.join(format!("{JOURNAL_PREFIX}{base}"))
}

const JOURNAL_PREFIX: &str = "agent-state.journal.";
/// Held while an agent runs on this directory (see `berth_daemon::state_lock`).
pub const LOCK_FILE: &str = "agent.lock";

/// The single journal file agents before numbered journals wrote; replayed and then deleted.
fn legacy_journal_path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent-state.journal")
}

/// The numbered journals in `state_dir`, by number.
fn journals(state_dir: &Path) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir(state_dir) else {
        return Vec::new();
    };
    let mut bases: Vec<u64> = dir
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            name.to_str()?.strip_prefix(JOURNAL_PREFIX)?.parse().ok()
        })
        .collect();
    bases.sort_unstable();
    bases
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

/// Applies the journal lines that follow this snapshot, oldest first: the old single journal,
/// then every numbered one from the snapshot's on. Lines of an older snapshot are stale (that
/// snapshot holds them). A line cut short by a crash (the last one) is not a change that was
/// acknowledged, and is skipped. Afterwards `seq` is past every journal found, so the next
/// snapshot's journal is a new file.
fn replay_journal(state_dir: &Path, state: &mut StateFile) {
    let base = state.seq;
    let numbered = journals(state_dir);
    let files = std::iter::once(legacy_journal_path(state_dir)).chain(
        numbered
            .iter()
            .filter(|&&n| n >= base)
            .map(|&n| journal_path(state_dir, n)),
    );
    for path in files {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for line in text.lines() {
            let Ok(e) = serde_json::from_str::<JournalEntry>(line) else {
                continue;
            };
            if e.base < base {
                continue;
            }
            state.seq = state.seq.max(e.base);
            match (
                state.instances.iter_mut().find(|i| i.id == e.id),
                e.instance,
                e.desired,
            ) {
                (Some(_), Some(_), _) => {}
                (Some(inst), None, Some(desired)) => inst.desired = desired,
                (Some(inst), None, None) => {
                    inst.status = e.status;
                    inst.allocation = e.allocation;
                    inst.metadata = e.metadata;
                }
                (None, Some(new), _) => state.instances.push(*new),
                (None, None, _) => {}
            }
        }
    }
    if let Some(&last) = numbered.last() {
        state.seq = state.seq.max(last);
    }
}

/// One journal line: the entry as JSON, then a newline.
fn journal_line(entry: &JournalEntry) -> serde_json::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(entry)?;
    line.push(b'\n');
    Ok(line)
}

/// The journal of the newest snapshot, owned by the supervisor. Lines are written at once,
/// without fsync: the journal protects against the *agent process* dying (SIGKILL, restart,
/// upgrade), and a written line survives that in the page cache, readable at once. Only a host
/// crash loses it, and that also ends every game it describes. A write is one small `write` to
/// the page cache — cheaper than waking another thread to do it.
#[derive(Debug)]
pub struct Journal {
    state_dir: PathBuf,
    base: u64,
    file: Option<File>,
    failures: Counter,
    /// The last write failed, perhaps halfway through its line.
    torn: bool,
}

impl Journal {
    /// The journal following snapshot `base` (opened at the first line).
    pub fn new(state_dir: PathBuf, base: u64, failures: Counter) -> Self {
        Self {
            state_dir,
            base,
            file: None,
            failures,
            torn: false,
        }
    }

    /// Snapshot `base` now holds every change so far: the next lines go to its journal.
    pub fn rotate(&mut self, base: u64) {
        self.base = base;
        self.file = None;
        self.torn = false;
    }

    /// Appends an instance's allocation state as one line, written before this returns. An
    /// allocation whose line cannot be written is refused by the caller: after a restart the
    /// agent would not know the match, and would release it on the game.
    pub fn append(
        &mut self,
        id: String,
        status: InstanceStatus,
        allocation: Option<PersistedAllocation>,
        metadata: Vec<KeyValue>,
    ) -> Result<(), StateError> {
        self.write(&JournalEntry {
            base: self.base,
            id,
            status,
            allocation,
            metadata,
            instance: None,
            desired: None,
        })
    }

    /// Appends what is now wanted of an instance, before anything acts on it; a change that
    /// cannot be written is refused by the caller.
    pub fn append_desired(
        &mut self,
        id: String,
        status: InstanceStatus,
        desired: Desired,
    ) -> Result<(), StateError> {
        self.write(&JournalEntry {
            base: self.base,
            id,
            status,
            allocation: None,
            metadata: Vec::new(),
            instance: None,
            desired: Some(desired),
        })
    }

    /// Appends a new instance's whole record, before its game is started; an instance whose
    /// record cannot be written is not deployed.
    pub fn append_deployed(&mut self, instance: PersistedInstance) -> Result<(), StateError> {
        self.write(&JournalEntry {
            base: self.base,
            id: instance.id.clone(),
            status: instance.status,
            allocation: None,
            metadata: Vec::new(),
            instance: Some(Box::new(instance)),
            desired: None,
        })
    }

    fn write(&mut self, entry: &JournalEntry) -> Result<(), StateError> {
        let path = journal_path(&self.state_dir, self.base);
        let wrap = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        // Serialising our own plain data cannot fail (no maps with non-string keys).
        let mut line = journal_line(entry).map_err(|e| wrap(io::Error::other(e)))?;
        if self.torn {
            // A failed write may have left part of a line: this one starts on a line of its
            // own, and loading skips the fragment (it does not parse).
            line.insert(0, b'\n');
        }
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| {
                        self.failures.inc();
                        wrap(e)
                    })?,
            ),
        };
        let written = file.write_all(&line);
        self.torn = written.is_err();
        if self.torn {
            self.failures.inc();
            // Opened again for the next line.
            self.file = None;
        }
        written.map_err(wrap)
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
    let written = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| {
            drop(f);
            std::fs::rename(&tmp, &path)
        });
    if let Err(e) = written {
        // A full disk must not also keep the half-written copies.
        let _ = std::fs::remove_file(&tmp);
        return Err(wrap(e));
    }
    File::open(state_dir)
        .and_then(|d| d.sync_all())
        .map_err(wrap)?;
    Ok(())
}

/// Hands snapshots to the writer thread. Every snapshot carries a sequence number, and the
/// writer publishes the number of the last one on disk.
#[derive(Debug, Clone)]
pub struct StateWriter {
    tx: std::sync::mpsc::Sender<(u64, Vec<u8>)>,
    written: watch::Receiver<u64>,
}

impl StateWriter {
    /// Starts the writer thread for `state_dir`; `failures` counts the snapshots it could not
    /// write.
    pub fn start(state_dir: PathBuf, failures: Counter) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let (written_tx, written) = watch::channel(0u64);
        let spawned = std::thread::Builder::new()
            .name("berth-state".to_owned())
            .spawn(move || write_loop(&state_dir, &rx, &written_tx, &failures));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the state writer; state will not be saved");
        }
        Self { tx, written }
    }

    /// Queues snapshot number `seq`.
    pub fn save(&self, seq: u64, bytes: Vec<u8>) {
        let _ = self.tx.send((seq, bytes));
    }

    /// The number of the last snapshot the writer is done with: on disk, or refused by it.
    pub fn written(&self) -> watch::Receiver<u64> {
        self.written.clone()
    }
}

/// A snapshot the disk refused is written again after this pause, doubling up to the cap.
const STATE_RETRY_START: std::time::Duration = std::time::Duration::from_millis(100);
const STATE_RETRY_CAP: std::time::Duration = std::time::Duration::from_secs(5);
/// While the state file cannot be written, one log line per this period says so.
const STATE_FAILURE_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

fn write_loop(
    state_dir: &Path,
    rx: &std::sync::mpsc::Receiver<(u64, Vec<u8>)>,
    written: &watch::Sender<u64>,
    failures: &Counter,
) {
    // Journals that may exist: those found now, and one per snapshot queued since.
    let mut journals = journals(state_dir);
    let mut legacy = true;
    // Snapshots not written in a row, and when that was last logged: a disk that stays full
    // is logged once a minute, not at every snapshot.
    let mut failed = 0u64;
    let mut logged: Option<std::time::Instant> = None;
    // The newest snapshot the disk refused: written again after a pause, unless a newer one
    // comes first. Without it, a disk that filled after the last change would keep an older
    // snapshot (without the games deployed since) until something else changed.
    let mut unwritten: Option<(u64, Vec<u8>)> = None;
    let mut pause = STATE_RETRY_START;
    loop {
        let first = match unwritten.take() {
            None => match rx.recv() {
                Ok(s) => s,
                Err(_) => return,
            },
            Some(old) => match rx.recv_timeout(pause) {
                Ok(s) => {
                    journals.push(old.0);
                    s
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => old,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            },
        };
        // The newest snapshot covers every one queued before it.
        let mut newest = first;
        for next in rx.try_iter() {
            journals.push(newest.0);
            newest = next;
        }
        let (seq, bytes) = newest;
        journals.push(seq);
        match write_atomic(state_dir, &bytes) {
            Ok(()) => {
                if failed > 0 {
                    tracing::warn!(
                        failed,
                        "state file written again; games keep their records across restarts"
                    );
                    failed = 0;
                    logged = None;
                    pause = STATE_RETRY_START;
                }
                // Lines of older journals are in this snapshot now.
                journals.retain(|&base| {
                    base >= seq || remove_stale(&journal_path(state_dir, base)).is_err()
                });
                if legacy && remove_stale(&legacy_journal_path(state_dir)).is_ok() {
                    legacy = false;
                }
            }
            Err(e) => {
                failures.inc();
                failed += 1;
                if logged.is_none_or(|t| t.elapsed() >= STATE_FAILURE_LOG_EVERY) {
                    logged = Some(std::time::Instant::now());
                    tracing::error!(error = %e, failed, "state file not written; allocations are refused while their journal lines cannot be written either; free space on the disk of state_dir");
                }
                journals.retain(|&base| base != seq);
                unwritten = Some((seq, bytes));
                pause = (pause * 2).min(STATE_RETRY_CAP);
            }
        }
        // Published after failures too: a broken disk is logged, not a reason to hold
        // shutdown forever.
        written.send_replace(seq);
    }
}

/// Deletes a journal a snapshot on disk made stale; one already gone is fine.
fn remove_stale(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            tracing::warn!(error = %e, path = %path.display(), "stale journal not deleted");
            Err(e)
        }
        _ => Ok(()),
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
            recovered: false,
        }
    }

    /// A game adopted with no record keeps what it is (a 5 from it is its match, a release
    /// naming any id ends that match) across another restart; the flags are written only when
    /// set, so every other record reads the same to an older agent.
    #[test]
    fn recovered_flags_survive_a_restart_and_are_written_only_when_set() {
        let plain = serde_json::to_string(&instance("a")).expect("serialise");
        assert!(!plain.contains("recovered"), "{plain}");
        let mut adopted = instance("b");
        adopted.recovered = true;
        adopted.allocation = Some(PersistedAllocation {
            id: None,
            at: 1,
            game_confirmed: false,
            recovered: true,
        });
        let text = serde_json::to_string(&adopted).expect("serialise");
        let back: PersistedInstance = serde_json::from_str(&text).expect("read back");
        assert!(back.recovered, "{text}");
        assert!(
            back.allocation
                .is_some_and(|a| a.recovered && a.id.is_none())
        );
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
                recovered: false,
            }),
            metadata: vec![KeyValue::new("map", "dust")],
            instance: None,
            desired: None,
        }
    }

    fn snapshot(seq: u64) -> Vec<u8> {
        serde_json::to_vec(&StateFile {
            format: FORMAT,
            generation: 1,
            agent_token: "t".into(),
            seq,
            instances: vec![instance("a")],
        })
        .expect("ser")
    }

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("berth-journal-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    /// A state directory whose snapshot `seq` (instance `a`) is on disk, and its journal.
    fn journal_after_snapshot(seq: u64) -> (PathBuf, Journal) {
        let dir = temp_dir();
        std::fs::write(state_path(&dir), snapshot(seq)).expect("snapshot");
        let journal = Journal::new(dir.clone(), seq, Counter::default());
        (dir, journal)
    }

    /// Journals allocation `alloc` (with `map=dust`) of instance `id`.
    fn append_allocation(journal: &mut Journal, id: &str, alloc: &str) {
        let e = entry(0, alloc);
        journal
            .append(id.into(), e.status, e.allocation, e.metadata)
            .expect("journaled");
    }

    fn allocation_of(state: &StateFile) -> Option<&str> {
        state.instances[0].allocation.as_ref()?.id.as_deref()
    }

    async fn wait_written(writer: &StateWriter, seq: u64) {
        let mut written = writer.written();
        while *written.borrow_and_update() < seq {
            written.changed().await.expect("writer alive");
        }
    }

    /// A snapshot the disk refused (here: a directory where the state file goes, so the
    /// rename fails) is written again by itself once it can be, with no newer snapshot, and
    /// leaves no temporary copy behind.
    #[tokio::test]
    async fn a_refused_snapshot_is_written_once_the_disk_takes_it() {
        let dir = temp_dir();
        std::fs::create_dir_all(state_path(&dir)).expect("a directory in the way");
        let writer = StateWriter::start(dir.clone(), Counter::default());
        writer.save(1, snapshot(1));
        wait_written(&writer, 1).await;
        assert!(state_path(&dir).is_dir(), "not written while in the way");
        std::fs::remove_dir(state_path(&dir)).expect("out of the way");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while load(&dir).map(|s| s.seq).ok() != Some(1) {
            assert!(std::time::Instant::now() < deadline, "never written again");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["agent-state.json"], "{names:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn journal_lines_follow_their_snapshot() {
        let dir = temp_dir();
        let writer = StateWriter::start(dir.clone(), Counter::default());
        writer.save(1, snapshot(1));
        wait_written(&writer, 1).await;
        let mut journal = Journal::new(dir.clone(), 1, Counter::default());
        append_allocation(&mut journal, "a", "first");
        append_allocation(&mut journal, "a", "second");
        // Written before `append` returns: no writer thread in between.
        let loaded = load(&dir).expect("load");
        let a = &loaded.instances[0];
        assert_eq!(a.status, InstanceStatus::Allocated);
        assert_eq!(allocation_of(&loaded), Some("second"));
        assert_eq!(a.metadata, vec![KeyValue::new("map", "dust")]);
        assert_eq!(loaded.seq, 1);

        // A snapshot that never reached the disk loses nothing: its journal is replayed after
        // the older one.
        journal.rotate(2);
        append_allocation(&mut journal, "a", "third");
        let loaded = load(&dir).expect("load");
        assert_eq!(allocation_of(&loaded), Some("third"));
        assert_eq!(
            loaded.seq, 2,
            "the next snapshot's journal must be a new file"
        );

        // Once a newer snapshot is on disk, the older journals are gone and their lines stale.
        writer.save(2, snapshot(2));
        wait_written(&writer, 2).await;
        assert!(!journal_path(&dir, 1).exists());
        assert!(journal_path(&dir, 2).exists());
        let loaded = load(&dir).expect("load");
        assert_eq!(allocation_of(&loaded), Some("third"));
        writer.save(3, snapshot(3));
        wait_written(&writer, 3).await;
        assert!(!journal_path(&dir, 2).exists());
        let loaded = load(&dir).expect("load");
        assert!(allocation_of(&loaded).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An instance deployed after the last snapshot on disk comes back from its journal line,
    /// with the allocation lines that follow it.
    #[test]
    fn an_instance_deployed_after_the_snapshot_comes_back_from_the_journal() {
        let (dir, mut journal) = journal_after_snapshot(4);
        let mut new = instance("b");
        new.status = InstanceStatus::Setup;
        journal.append_deployed(new).expect("deployed");
        append_allocation(&mut journal, "b", "m-1");
        let loaded = load(&dir).expect("load");
        let ids: Vec<&str> = loaded.instances.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        let b = &loaded.instances[1];
        assert_eq!(b.status, InstanceStatus::Allocated);
        assert_eq!(
            b.allocation.as_ref().and_then(|a| a.id.as_deref()),
            Some("m-1")
        );
        // A line of an instance the snapshot already has does not replace it.
        let mut again = instance("a");
        again.port = 1;
        journal.append_deployed(again).expect("deployed");
        assert_eq!(
            load(&dir).expect("load").instances[0].port,
            instance("a").port
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A stop or removal is on disk before the game hears of it, and changes nothing but what
    /// is wanted of the instance: its match stays as journaled.
    #[test]
    fn a_desired_line_changes_only_what_is_wanted() {
        let (dir, mut journal) = journal_after_snapshot(4);
        append_allocation(&mut journal, "a", "m-1");
        journal
            .append_desired("a".into(), InstanceStatus::Allocated, Desired::Removed)
            .expect("journaled");
        let loaded = load(&dir).expect("load");
        assert_eq!(loaded.instances[0].desired, Desired::Removed);
        assert_eq!(allocation_of(&loaded), Some("m-1"));
        assert_eq!(
            loaded.instances[0].metadata,
            vec![KeyValue::new("map", "dust")]
        );
        journal
            .append_desired("a".into(), InstanceStatus::Allocated, Desired::Running)
            .expect("journaled");
        assert_eq!(
            load(&dir).expect("load").instances[0].desired,
            Desired::Running
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stale_and_torn_lines_are_skipped() {
        let dir = temp_dir();
        std::fs::write(state_path(&dir), snapshot(4)).expect("snapshot");
        let line = |e: &JournalEntry| journal_line(e).expect("ser");
        // Lines older than the snapshot, even in a journal the crash left behind, are stale.
        std::fs::write(journal_path(&dir, 3), line(&entry(3, "stale"))).expect("journal");
        // A torn last line (a crash mid-write) is not an acknowledged change.
        let mut torn = line(&entry(4, "kept"));
        torn.extend_from_slice(br#"{"base":4,"id":"a","sta"#);
        std::fs::write(journal_path(&dir, 4), torn).expect("journal");
        let loaded = load(&dir).expect("load");
        assert_eq!(allocation_of(&loaded), Some("kept"));
        std::fs::remove_file(journal_path(&dir, 4)).expect("rm");
        let loaded = load(&dir).expect("load");
        assert_eq!(loaded.instances[0].status, InstanceStatus::Online);
        assert!(allocation_of(&loaded).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_single_journal_of_earlier_versions_is_replayed_then_deleted() {
        let dir = temp_dir();
        std::fs::write(state_path(&dir), snapshot(4)).expect("snapshot");
        let mut lines = journal_line(&entry(3, "stale")).expect("ser");
        lines.extend(journal_line(&entry(4, "upgraded")).expect("ser"));
        std::fs::write(legacy_journal_path(&dir), lines).expect("journal");
        let loaded = load(&dir).expect("load");
        assert_eq!(allocation_of(&loaded), Some("upgraded"));
        let writer = StateWriter::start(dir.clone(), Counter::default());
        writer.save(5, snapshot(5));
        wait_written(&writer, 5).await;
        assert!(!legacy_journal_path(&dir).exists());
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
