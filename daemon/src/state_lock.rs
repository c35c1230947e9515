//! One daemon per state: an exclusive lock on a file beside the state, taken before anything
//! reads the state or binds a port.
//!
//! Two controllers on one database would each claim instances in their own memory and hand one
//! instance to two matchmakers; two agents on one state directory would both adopt the same
//! games and take their Arcus links from each other. The lock is `flock`-style (the kernel
//! drops it when the process dies, SIGKILL included, so a restart never finds a stale one) and
//! close-on-exec, so the games an agent starts never hold it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Held for as long as the daemon runs; dropping it releases the lock.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another {daemon} ({}) is using {what} (it holds {}): stop it first, or give this one its own {setting}",
        holder.map_or("pid unknown".to_owned(), |p| format!("pid {p}")),
        path.display()
    )]
    Held {
        daemon: &'static str,
        what: String,
        /// The configuration key that chooses the state, for the remedy.
        setting: &'static str,
        path: PathBuf,
        /// The pid the holder wrote into the file, when it could be read.
        holder: Option<u32>,
    },
    #[error("cannot open the lock file {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
}

impl StateLock {
    /// Takes the lock at `path` for `daemon` (`berth-agent`), or says who holds it. `what`
    /// names the state it guards in the error ("the database /var/lib/berth/controller.db"),
    /// `setting` the configuration key that would give a second daemon its own.
    /// The file is created if needed (its directory must exist) and records this process's
    /// pid for the next one's error message.
    pub fn acquire(
        daemon: &'static str,
        what: String,
        setting: &'static str,
        path: &Path,
    ) -> Result<Self, LockError> {
        let open_error = |source| LockError::Open {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(open_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(LockError::Held {
                    daemon,
                    what,
                    setting,
                    path: path.to_owned(),
                    holder,
                });
            }
            Err(TryLockError::Error(e)) => return Err(open_error(e)),
        }
        // Only a message aid: a crash before this line leaves the old pid, which the next
        // holder overwrites.
        let pid = std::process::id();
        let _ = file
            .set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{pid}"));
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = std::env::temp_dir().join(format!("berth-lock-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("test.lock");
        let first =
            StateLock::acquire("berth-test", "the test state".to_owned(), "state", &path).unwrap();
        // Another open file description of the same file, as another process would have.
        let second = StateLock::acquire("berth-test", "the test state".to_owned(), "state", &path);
        match second {
            Err(e @ LockError::Held { holder, .. }) => {
                assert_eq!(holder, Some(std::process::id()));
                let text = e.to_string();
                assert!(
                    text.contains("another berth-test")
                        && text.contains(&format!("pid {}", std::process::id()))
                        && text.contains("the test state")
                        && text.contains("test.lock")
                        && text.ends_with("its own state"),
                    "{text}"
                );
            }
            other => panic!("the second lock must be refused: {other:?}"),
        }
        drop(first);
        let again = StateLock::acquire("berth-test", "the test state".to_owned(), "state", &path);
        assert!(again.is_ok(), "released on drop: {again:?}");
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_directory_is_named() {
        let path = std::env::temp_dir()
            .join(format!("berth-lock-missing-{}", uuid::Uuid::new_v4()))
            .join("x.lock");
        let e = StateLock::acquire("berth-test", "x".to_owned(), "state", &path).unwrap_err();
        assert!(matches!(e, LockError::Open { .. }), "{e:?}");
        assert!(e.to_string().contains("x.lock"), "{e}");
    }
}
