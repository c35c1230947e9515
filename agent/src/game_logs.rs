//! Games' log files (`<log_dir>/<instance id>.log`, the game's stdout and stderr): kept under a
//! size bound while the game runs, and removed some time after the instance is gone.
//!
//! A game writes its log through a descriptor it was given at spawn (opened `O_APPEND`), and
//! keeps writing across agent restarts, so the agent cannot reopen the file for it. A file over
//! the limit is rotated in place: its head, cut at a block boundary, is copied to `<id>.log.1`
//! (older copies move to `.2`, `.3`, …) and then removed from the live file with
//! `FALLOC_FL_COLLAPSE_RANGE`. The kernel does that under the inode's lock, so the game's
//! concurrent appends land after what is left and nothing is lost or written twice. Where the
//! filesystem cannot collapse a range (tmpfs, btrfs, NFS), the whole file is copied and then
//! truncated (logrotate's `copytruncate`): what the game writes between the two steps is lost.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};

use crate::Shutdown;
use crate::metrics::Metrics;
use crate::supervisor::{SupervisorHandle, log_path};

/// How often log sizes are checked. A game can write past the limit by what it writes in this
/// time.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often logs of removed instances are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The validated `game_log_*` keys of `agent.toml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogPolicy {
    /// A live log larger than this is rotated.
    pub max_bytes: u64,
    /// Rotated copies kept per instance (`.1` newest). 0: the head is dropped, not kept.
    pub keep: u32,
    /// How long the logs of a removed instance stay after their last write.
    pub retention: Duration,
}

/// `<log_dir>/<id>.log.<n>`: the `n`-th newest rotated copy.
pub fn rotated_path(log_dir: &Path, id: &str, n: u32) -> PathBuf {
    log_dir.join(format!("{id}.log.{n}"))
}

/// What one rotation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rotated {
    /// The head was moved out; the game's later writes are all kept.
    Collapsed { moved: u64 },
    /// The filesystem cannot collapse a range: copied whole and truncated.
    CopyTruncated { moved: u64 },
}

/// Rotates `path` if it is larger than `policy.max_bytes`. `collapse` is cleared the first time
/// the filesystem refuses to collapse a range, so later rotations go straight to copying.
fn rotate_if_large(
    path: &Path,
    policy: &LogPolicy,
    collapse: &AtomicBool,
) -> io::Result<Option<Rotated>> {
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let len = meta.len();
    if len <= policy.max_bytes {
        return Ok(None);
    }
    let block = meta.blksize().max(512);
    // The cut must be block-aligned and must not reach the end of the file (the kernel refuses
    // a collapse that does).
    let cut = (len - 1) / block * block;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let dir = path.parent().unwrap_or(Path::new("."));
    let id = name.strip_suffix(".log").unwrap_or(name);
    shift(dir, id, policy.keep)?;
    // The copy gets its name only when complete, so that a reader following the log sees a
    // new `.1` once, with its final length.
    let tmp = dir.join(format!("{id}.log.1.tmp"));
    let mut copy = if policy.keep > 0 {
        Some(File::create(&tmp)?)
    } else {
        None
    };
    let rotated = if cut > 0 && collapse.load(Ordering::Relaxed) {
        if let Some(out) = copy.as_mut() {
            copy_range(&file, 0, cut, out)?;
        }
        match fallocate(
            file.as_fd(),
            FallocateFlags::FALLOC_FL_COLLAPSE_RANGE,
            0,
            cut as i64,
        ) {
            Ok(()) => Rotated::Collapsed { moved: cut },
            Err(Errno::EOPNOTSUPP | Errno::EINVAL) => {
                collapse.store(false, Ordering::Relaxed);
                tracing::warn!(
                    path = %path.display(),
                    "this filesystem cannot collapse a file range: game logs are rotated by copy \
                     and truncate, and a line written during the copy can be lost (put log_dir on \
                     ext4 or XFS to keep every line)"
                );
                // The copy so far is [0, cut); finish it.
                Rotated::CopyTruncated {
                    moved: finish_copy_truncate(&file, cut, copy.as_mut())?,
                }
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        Rotated::CopyTruncated {
            moved: finish_copy_truncate(&file, 0, copy.as_mut())?,
        }
    };
    if copy.is_some() {
        std::fs::rename(&tmp, rotated_path(dir, id, 1))?;
    }
    Ok(Some(rotated))
}

/// Copies `[from, end)` of `file` to `out` (when kept) and truncates `file` to 0.
fn finish_copy_truncate(file: &File, from: u64, out: Option<&mut File>) -> io::Result<u64> {
    let end = file.metadata()?.len();
    if let Some(out) = out {
        copy_range(file, from, end - from.min(end), out)?;
    }
    // The game's descriptor is O_APPEND, so its next write starts at the new end.
    file.set_len(0)?;
    Ok(end)
}

/// Copies `len` bytes of `file` from `offset` to the end of `out` (`copy_file_range` where the
/// kernel can).
fn copy_range(mut file: &File, offset: u64, len: u64, out: &mut File) -> io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    io::copy(&mut file.take(len), out)?;
    Ok(())
}

/// `.k` becomes `.k+1` for every kept copy, the oldest dropped, so that `.1` is free.
fn shift(dir: &Path, id: &str, keep: u32) -> io::Result<()> {
    if keep == 0 {
        return Ok(());
    }
    for k in (1..keep).rev() {
        match std::fs::rename(rotated_path(dir, id, k), rotated_path(dir, id, k + 1)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// The instance id a file in the log directory belongs to: `<id>.log`, `<id>.log.<n>`, or a
/// copy a crash left half made (`<id>.log.1.tmp`), which retention must remove too.
fn owner(name: &str) -> Option<&str> {
    let name = name.strip_suffix(".tmp").unwrap_or(name);
    if let Some(id) = name.strip_suffix(".log") {
        return Some(id);
    }
    let (stem, n) = name.rsplit_once('.')?;
    n.parse::<u32>().ok()?;
    stem.strip_suffix(".log")
}

/// Rotates every live log in `dir` over the limit. Returns how many it rotated.
fn rotate_all(dir: &Path, policy: &LogPolicy, collapse: &AtomicBool) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut rotated = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        // One statx per file and second; a file is opened only when it is over the limit.
        if path.extension().is_none_or(|e| e != "log")
            || entry.metadata().is_ok_and(|m| m.len() <= policy.max_bytes)
        {
            continue;
        }
        match rotate_if_large(&path, policy, collapse) {
            Ok(Some(r)) => {
                rotated += 1;
                tracing::debug!(path = %path.display(), ?r, "game log rotated");
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot rotate game log");
            }
        }
    }
    rotated
}

/// Removes the logs of instances not in `live` whose newest file was last written more than
/// `retention` ago. Returns how many files it removed.
fn remove_stale(dir: &Path, live: &HashSet<String>, retention: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let now = SystemTime::now();
    // An instance's files go together, decided by the newest of them.
    let mut newest: HashMap<String, (SystemTime, Vec<PathBuf>)> = HashMap::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(owner) else {
            continue;
        };
        if live.contains(id) {
            continue;
        }
        let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else {
            continue;
        };
        let slot = newest
            .entry(id.to_owned())
            .or_insert((SystemTime::UNIX_EPOCH, Vec::new()));
        slot.0 = slot.0.max(modified);
        slot.1.push(entry.path());
    }
    let mut removed = 0;
    for (id, (modified, files)) in newest {
        if now.duration_since(modified).unwrap_or_default() < retention {
            continue;
        }
        for f in files {
            match std::fs::remove_file(&f) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %f.display(), error = %e, "cannot remove game log")
                }
            }
        }
        tracing::info!(instance_id = %id, "logs of a removed instance deleted after retention");
    }
    removed
}

/// Keeps `log_dir` bounded until shutdown: rotation every [`CHECK_EVERY`], removal of logs of
/// instances the supervisor no longer has every [`SWEEP_EVERY`]. File work runs on the blocking
/// pool, away from the game links.
pub async fn keep_bounded(
    log_dir: PathBuf,
    policy: LogPolicy,
    supervisor: SupervisorHandle,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
) {
    let collapse = Arc::new(AtomicBool::new(true));
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = check.tick() => {
                let (dir, collapse) = (log_dir.clone(), collapse.clone());
                let n = tokio::task::spawn_blocking(move || rotate_all(&dir, &policy, &collapse))
                    .await
                    .unwrap_or(0);
                metrics.game_log_rotations.inc_by(n as u64);
            }
            _ = sweep.tick() => {
                let Some(live) = supervisor.ids().await else { return };
                let dir = log_dir.clone();
                let n = tokio::task::spawn_blocking(move || {
                    remove_stale(&dir, &live, policy.retention)
                })
                .await
                .unwrap_or(0);
                metrics.game_logs_removed.inc_by(n as u64);
            }
        }
    }
}

/// Where a reader of the live log goes on after reading up to `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// At this offset of the live log.
    Live(u64),
    /// The new `.1` from `from` to `to` (its end), then the live log from its start: a
    /// rotation moved bytes the reader had not read yet.
    CopyThenLive { from: u64, to: u64 },
    /// Not now: the live log is shorter than `offset` while `.1` is unchanged, which is a
    /// rotation caught between its collapse and its rename.
    Wait,
}

/// Where a reader of `<id>.log` that has read up to `offset` goes on, given that `moved` bytes
/// left the file's head since (the length of a new `.1`; `None` if `.1` is unchanged) and the
/// file is now `len` long. With `give_up`, a file shorter than `offset` is read from its start
/// (truncated by hand, or rotated with no copies kept). A reader that falls a whole rotation
/// behind goes on from the newest copy.
fn resume(offset: u64, moved: Option<u64>, len: u64, give_up: bool) -> Resume {
    match moved {
        Some(moved) if offset < moved => Resume::CopyThenLive {
            from: offset,
            to: moved,
        },
        Some(moved) => Resume::Live((offset - moved).min(len)),
        None if offset <= len => Resume::Live(offset),
        None if give_up => Resume::Live(0),
        None => Resume::Wait,
    }
}

/// The log files of instance `id`, oldest first: the kept copies, then the live log. Reading
/// them in this order gives the game's output without gaps (but for copy-and-truncate
/// rotations).
pub fn files_oldest_first(log_dir: &Path, id: &str, keep_at_most: u32) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = (1..=keep_at_most)
        .rev()
        .map(|n| rotated_path(log_dir, id, n))
        .filter(|p| p.exists())
        .collect();
    files.push(log_path(log_dir, id));
    files
}

// Reading a game's log across rotations (the API's `tail` and `follow`).

/// The last `lines` lines of a file and its length.
fn read_tail(path: &Path, lines: usize) -> (Vec<u8>, u64) {
    let Ok(mut f) = File::open(path) else {
        return (Vec::new(), 0);
    };
    let len = f.metadata().map_or(0, |m| m.len());
    // Read backwards in blocks until enough newlines are seen.
    let mut start = len;
    let mut buf = Vec::new();
    while start > 0 {
        let step = start.min(64 * 1024);
        start -= step;
        let mut block = vec![0u8; step as usize];
        if f.seek(SeekFrom::Start(start)).is_err() || f.read_exact(&mut block).is_err() {
            break;
        }
        block.extend_from_slice(&buf);
        buf = block;
        let newlines = buf.iter().filter(|b| **b == b'\n').count();
        if newlines > lines {
            break;
        }
    }
    (last_lines(buf, lines), len)
}

/// The last `lines` lines of `buf` (a last line without its newline counts).
fn last_lines(mut buf: Vec<u8>, lines: usize) -> Vec<u8> {
    let mut cut = 0;
    let mut seen = 0;
    for (i, b) in buf.iter().enumerate().rev() {
        if *b == b'\n' && i + 1 != buf.len() {
            seen += 1;
            if seen == lines {
                cut = i + 1;
                break;
            }
        }
    }
    if lines == 0 {
        cut = buf.len();
    }
    buf.split_off(cut)
}

/// The last `lines` lines of a game's output across its files (oldest first), and the length
/// of the last (live) file. The files are one stream cut at block boundaries, often mid-line,
/// so lines are counted on the joined bytes.
pub fn read_tail_of_files(files: &[PathBuf], lines: usize) -> (Vec<u8>, u64) {
    let mut joined = Vec::new();
    let mut live_len = None;
    for f in files.iter().rev() {
        // One line more than asked: the first may be the end of a line the older file starts.
        let (mut chunk, len) = read_tail(f, lines + 1);
        live_len.get_or_insert(len);
        let whole = chunk.len() as u64 == len;
        chunk.extend_from_slice(&joined);
        joined = chunk;
        if !whole {
            break;
        }
    }
    (last_lines(joined, lines), live_len.unwrap_or(0))
}

/// Which `.1` copy exists (inode and length), to notice a rotation.
pub fn copy_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.ino(), m.len()))
}

/// The bytes of the live log `path` from `offset` on (at most 1 MiB), preceded by what a
/// rotation moved to `copy` that the reader had not read, and where the next read of the live
/// log starts. `moved`: bytes moved out of the file's head by a rotation since `offset` was
/// taken. `None` also when a rotation is half done (see [`resume`]).
pub fn read_from(
    path: &Path,
    copy: &Path,
    offset: u64,
    moved: Option<u64>,
    give_up: bool,
) -> Option<(Vec<u8>, u64)> {
    const MAX: u64 = 1 << 20;
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut bytes = Vec::new();
    let offset = match resume(offset, moved, len, give_up) {
        Resume::Wait => return None,
        Resume::Live(offset) => offset,
        Resume::CopyThenLive { from, to } => {
            let mut c = File::open(copy).ok()?;
            c.seek(SeekFrom::Start(from)).ok()?;
            c.take(to - from).read_to_end(&mut bytes).ok()?;
            0
        }
    };
    f.seek(SeekFrom::Start(offset)).ok()?;
    let before = bytes.len();
    f.take(MAX).read_to_end(&mut bytes).ok()?;
    let next = offset + (bytes.len() - before) as u64;
    Some((bytes, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("berth-logs-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn policy(max_bytes: u64, keep: u32) -> LogPolicy {
        LogPolicy {
            max_bytes,
            keep,
            retention: Duration::from_secs(3600),
        }
    }

    /// Numbered lines, as a game would write them.
    fn lines(from: usize, to: usize) -> String {
        (from..to)
            .map(|n| format!("line {n:06} of the game's output\n"))
            .collect()
    }

    fn append(path: &Path, text: &str) {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open");
        f.write_all(text.as_bytes()).expect("write");
    }

    /// Everything the instance's files hold, oldest first.
    fn all(dir: &Path, id: &str) -> String {
        files_oldest_first(dir, id, 10)
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    #[test]
    fn rotation_keeps_every_byte_in_order_and_bounds_the_count() {
        let d = dir();
        let path = log_path(&d, "g1");
        let collapse = AtomicBool::new(true);
        let p = policy(16 * 1024, 2);
        let mut written = String::new();
        for round in 0..6 {
            let chunk = lines(round * 700, (round + 1) * 700);
            append(&path, &chunk);
            written.push_str(&chunk);
            let r = rotate_if_large(&path, &p, &collapse).expect("rotate");
            assert!(
                r.is_some(),
                "round {round}: {} bytes is over the limit",
                chunk.len()
            );
        }
        assert!(
            !rotated_path(&d, "g1", 3).exists(),
            "only 2 copies are kept"
        );
        let kept = all(&d, "g1");
        assert!(
            written.ends_with(&kept),
            "the kept files are the tail of the output"
        );
        if collapse.load(Ordering::Relaxed) {
            // Collapse keeps the live file's last block: the live file is short, and the
            // copies are whole blocks.
            let live = std::fs::metadata(&path).expect("live").len();
            assert!(live <= 4096, "live log is {live} bytes after rotation");
            assert_eq!(
                std::fs::metadata(rotated_path(&d, "g1", 1))
                    .expect(".1")
                    .len()
                    % 512,
                0
            );
        } else {
            println!("the temporary directory cannot collapse ranges: checked the copy path only");
        }
        // Under the limit: nothing happens.
        assert_eq!(rotate_if_large(&path, &p, &collapse).expect("rotate"), None);
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn keep_zero_drops_the_head() {
        let d = dir();
        let path = log_path(&d, "g2");
        let collapse = AtomicBool::new(true);
        append(&path, &lines(0, 2000));
        rotate_if_large(&path, &policy(8 * 1024, 0), &collapse)
            .expect("rotate")
            .expect("rotated");
        assert!(!rotated_path(&d, "g2", 1).exists());
        assert!(lines(0, 2000).ends_with(&std::fs::read_to_string(&path).expect("live")));
        std::fs::remove_dir_all(&d).ok();
    }

    /// Rotates 1 000 lines in `d` and checks that the file was copied whole and truncated.
    fn rotates_by_copy_and_truncate(d: &Path, collapse: &AtomicBool) {
        let path = log_path(d, "g3");
        let text = lines(0, 1000);
        append(&path, &text);
        let r = rotate_if_large(&path, &policy(8 * 1024, 1), collapse).expect("rotate");
        assert_eq!(
            r,
            Some(Rotated::CopyTruncated {
                moved: text.len() as u64
            })
        );
        assert_eq!(std::fs::metadata(&path).expect("live").len(), 0);
        assert_eq!(
            all(d, "g3"),
            text,
            "nothing lost when nothing was written meanwhile"
        );
        // A write after the truncation starts at the beginning (O_APPEND), no hole.
        append(&path, "next\n");
        assert_eq!(std::fs::read_to_string(&path).expect("live"), "next\n");
    }

    #[test]
    fn copy_truncate_when_collapse_is_off() {
        let d = dir();
        rotates_by_copy_and_truncate(&d, &AtomicBool::new(false));
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn a_filesystem_without_collapse_switches_to_copy_truncate() {
        // tmpfs refuses FALLOC_FL_COLLAPSE_RANGE.
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            println!("skipped: no /dev/shm (tmpfs) here");
            return;
        }
        let d = shm.join(format!("berth-logs-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).expect("dir");
        let collapse = AtomicBool::new(true);
        rotates_by_copy_and_truncate(&d, &collapse);
        assert!(
            !collapse.load(Ordering::Relaxed),
            "later rotations copy at once"
        );
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn stale_logs_of_removed_instances_go_and_live_ones_stay() {
        let d = dir();
        for id in ["live", "gone"] {
            append(&log_path(&d, id), "x\n");
            append(&rotated_path(&d, id, 1), "y\n");
        }
        append(&d.join("gone.log.1.tmp"), "a copy a crash left\n");
        append(&d.join("notes.txt"), "not a log\n");
        let live: HashSet<String> = ["live".to_owned()].into();
        assert_eq!(
            remove_stale(&d, &live, Duration::from_secs(3600)),
            0,
            "too recent"
        );
        assert_eq!(remove_stale(&d, &live, Duration::ZERO), 3);
        assert!(log_path(&d, "live").exists() && rotated_path(&d, "live", 1).exists());
        assert!(!log_path(&d, "gone").exists() && !rotated_path(&d, "gone", 1).exists());
        assert!(!d.join("gone.log.1.tmp").exists());
        assert!(d.join("notes.txt").exists());
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn owners_of_file_names() {
        assert_eq!(owner("abc.log"), Some("abc"));
        assert_eq!(owner("abc.log.3"), Some("abc"));
        assert_eq!(owner("abc.log.1.tmp"), Some("abc"));
        assert_eq!(owner("abc.log.x"), None);
        assert_eq!(owner("abc.txt"), None);
    }

    #[test]
    fn reader_offsets_follow_a_rotation() {
        // Read past the cut: go on in the live log.
        assert_eq!(resume(10_000, Some(8192), 3000, false), Resume::Live(1808));
        // The cut took bytes not read yet: they are in the new copy.
        assert_eq!(
            resume(5000, Some(8192), 3000, false),
            Resume::CopyThenLive {
                from: 5000,
                to: 8192
            }
        );
        assert_eq!(resume(10_000, None, 12_000, false), Resume::Live(10_000));
        // Mid-rotation (collapsed, not yet renamed): wait; after a while, start over.
        assert_eq!(resume(10_000, None, 500, false), Resume::Wait);
        assert_eq!(resume(10_000, None, 500, true), Resume::Live(0));
        assert_eq!(resume(20_000, Some(8192), 50, false), Resume::Live(50));
    }

    #[test]
    fn tail_lines() {
        let dir = std::env::temp_dir().join(format!("berth-tail-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("l.log");
        std::fs::write(&p, "a\nb\nc\nd\n").expect("write");
        assert_eq!(read_tail(&p, 2).0, b"c\nd\n");
        assert_eq!(read_tail(&p, 10).0, b"a\nb\nc\nd\n");
        assert_eq!(read_tail(&p, 0).0, b"");
        assert_eq!(read_tail(&dir.join("none"), 3).0, b"");
        let (_, len) = read_tail(&p, 1);
        std::fs::write(&p, "a\nb\nc\nd\ne\n").expect("append");
        let none = dir.join("none");
        assert_eq!(
            read_from(&p, &none, len, None, false).expect("read").0,
            b"e\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_follower_reads_what_a_rotation_moved_before_it_read_it() {
        let dir = std::env::temp_dir().join(format!("berth-follow-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (live, copy) = (dir.join("g.log"), dir.join("g.log.1"));
        // Read up to 3 of "abcdefgh"; then 6 bytes moved to the copy and "ij" appended.
        std::fs::write(&copy, "abcdef").expect("write");
        std::fs::write(&live, "ghij").expect("write");
        let (bytes, next) = read_from(&live, &copy, 3, Some(6), false).expect("read");
        assert_eq!((bytes.as_slice(), next), (&b"defghij"[..], 4));
        // Had it read past the cut (7), it goes on in the live file.
        let (bytes, next) = read_from(&live, &copy, 7, Some(6), false).expect("read");
        assert_eq!((bytes.as_slice(), next), (&b"hij"[..], 4));
        // Shorter with the copy unchanged: a rotation half done; wait.
        assert_eq!(read_from(&live, &copy, 9, None, false), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tail_spans_rotated_copies() {
        let dir = std::env::temp_dir().join(format!("berth-tail-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let files = [dir.join("g.log.2"), dir.join("g.log.1"), dir.join("g.log")];
        // One stream cut mid-line twice, as a rotation at a block boundary cuts it.
        std::fs::write(&files[0], "l1\nl2\nl").expect("write");
        std::fs::write(&files[1], "3\nl4\nl5").expect("write");
        std::fs::write(&files[2], "\nl6\n").expect("write");
        assert_eq!(read_tail_of_files(&files, 1).0, b"l6\n");
        assert_eq!(read_tail_of_files(&files, 2).0, b"l5\nl6\n");
        assert_eq!(read_tail_of_files(&files, 3).0, b"l4\nl5\nl6\n");
        assert_eq!(
            read_tail_of_files(&files, 100).0,
            b"l1\nl2\nl3\nl4\nl5\nl6\n"
        );
        assert_eq!(
            read_tail_of_files(&files, 1).1,
            4,
            "offset: the live file's length"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
