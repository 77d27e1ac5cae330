//! The run lock: one `kkpipe run` (or `verify`) per repository cache at a time.
//!
//! An advisory `flock` on `.kkpipe/run.lock`, released by the kernel when the holder exits however it
//! exits, so a crash never leaves a stale lock. The holder writes who it is (pid, host, command, since) into
//! the file, so a waiter can say whom it waits for. Because every deploy stage runs under this lock, two
//! processes can never apply the same deploy stage of the same environment at once. Readers (`status`,
//! `why`, `log`) take no lock: SQLite's WAL lets them read while a run writes.

use std::fs;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("timed out after {waited}s waiting for the run lock on `{}`, held by {holder}\n  hint: wait for it to finish, or raise `--lock-timeout`", path.display())]
    Timeout { path: PathBuf, waited: u64, holder: String },
    #[error("cannot take the run lock `{}`: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

pub struct RunLock {
    _file: fs::File,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    pub command: String,
    pub since_ms: i64,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`kkpipe {}` (pid {} on {}, since {}, {})",
            self.command,
            self.pid,
            self.host,
            crate::report::timestamp(self.since_ms),
            crate::report::age(self.since_ms)
        )
    }
}

fn read_holder(path: &Path) -> String {
    let mut s = String::new();
    let _ = fs::File::open(path).and_then(|mut f| f.read_to_string(&mut s));
    serde_json::from_str::<Holder>(&s).map(|h| h.to_string()).unwrap_or_else(|_| "another kkpipe process".into())
}

/// Take the lock, waiting up to `timeout`. `on_wait` is told once whom we wait for.
pub fn acquire(
    cache_dir: &Path,
    command: &str,
    timeout: Duration,
    mut on_wait: impl FnMut(&str),
) -> Result<RunLock, Error> {
    let path = cache_dir.join("run.lock");
    let io = |source| Error::Io { path: path.clone(), source };
    let mut file =
        fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
    let start = Instant::now();
    let mut told = false;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(fs::TryLockError::WouldBlock) => {
                let holder = read_holder(&path);
                if !told {
                    on_wait(&holder);
                    told = true;
                }
                if start.elapsed() >= timeout {
                    return Err(Error::Timeout { path, waited: start.elapsed().as_secs(), holder });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(fs::TryLockError::Error(e)) => return Err(io(e)),
        }
    }
    let me = Holder {
        pid: std::process::id(),
        host: crate::cache::hostname(),
        command: command.to_string(),
        since_ms: crate::cache::now_ms(),
    };
    let text = serde_json::to_string(&me).expect("serialisable");
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    Ok(RunLock { _file: file })
}
