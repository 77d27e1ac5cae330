//! The run lock: one `kkpipe run` (or `verify`) per repository cache at a time.
//!
//! An advisory `flock` on `.kkpipe/run.lock`, released by the kernel when the holder exits however it
//! exits, so a crash never leaves a stale lock. The holder writes who it is (pid, host, command, since) into
//! the file, so a waiter can say whom it waits for. Because every deploy stage runs under this lock, two
//! processes can never apply the same deploy stage of the same environment at once. Readers (`status`,
//! `why`, `log`) take no lock: SQLite's WAL lets them read while a run writes.
//!
//! Whether a holder is alive *now* ([`live_holder`], for `status`) is asked of the kernel, never of the
//! file's content (a killed holder leaves it behind, and its pid may be reused): the holder also holds an
//! exclusive `flock` on `.kkpipe/run.live`, which a reader probes with a shared try-lock. Probing `run.lock`
//! itself could make a run that is just starting see it taken (and fail at once with `--lock-timeout 0`);
//! nothing waits on `run.live` except the holder, for the moment a probe lasts.

use std::fs;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("timed out after {waited}s waiting for the run lock on `{}`, held by {holder}\n  hint: wait for it to finish, or raise `--lock-timeout`", path.display())]
    Timeout { path: PathBuf, waited: u64, holder: String },
    #[error("cannot take the run lock `{}`: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

const LOCK_NAME: &str = "run.lock";
const LIVE_NAME: &str = "run.live";

/// The held run lock; dropping it releases it (`run.live` first, so a live holder always holds `run.lock`).
pub(crate) struct RunLock {
    _live: fs::File,
    _file: fs::File,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Holder {
    pub pid: u32,
    pub host: String,
    pub command: String,
    pub since_ms: i64,
}

impl From<&Holder> for crate::report::RunHolder {
    fn from(h: &Holder) -> crate::report::RunHolder {
        let since = crate::clock::timestamp(h.since_ms);
        crate::report::RunHolder { command: h.command.clone(), pid: h.pid, host: h.host.clone(), since }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`kkpipe {}` (pid {} on {}, since {}, {})",
            self.command,
            self.pid,
            self.host,
            crate::clock::timestamp(self.since_ms),
            crate::clock::age(self.since_ms)
        )
    }
}

fn parse_holder(path: &Path) -> Option<Holder> {
    let mut s = String::new();
    fs::File::open(path).and_then(|mut f| f.read_to_string(&mut s)).ok()?;
    serde_json::from_str::<Holder>(&s).ok()
}

fn read_holder(path: &Path) -> String {
    parse_holder(path).map(|h| h.to_string()).unwrap_or_else(|| "another kkpipe process".into())
}

/// Who holds the run lock of the cache in `cache_dir` right now, if a live process does. Takes no lock that
/// a run waits for, creates nothing, and works on a read-only cache. `None` also when the holder's record is
/// unreadable (never the case for a kkpipe that holds the lock: it writes the record before `run.live`).
pub(crate) fn live_holder(cache_dir: &Path) -> Option<Holder> {
    let live = fs::File::open(cache_dir.join(LIVE_NAME)).ok()?;
    match live.try_lock_shared() {
        // Nobody holds it exclusively: no run is in progress. Dropping `live` releases the probe.
        Ok(()) => None,
        Err(fs::TryLockError::WouldBlock) => parse_holder(&cache_dir.join(LOCK_NAME)),
        Err(fs::TryLockError::Error(_)) => None,
    }
}

/// Take the lock, waiting up to `timeout`. `on_wait` is told once whom we wait for.
pub(crate) fn acquire(
    cache_dir: &Path,
    command: &str,
    timeout: Duration,
    mut on_wait: impl FnMut(&str),
) -> Result<RunLock, Error> {
    let path = cache_dir.join(LOCK_NAME);
    let io = |source| Error::Io { path: path.clone(), source };
    let mut file =
        fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
    let start = Instant::now();
    wait(&path, start, timeout, &mut on_wait, || file.try_lock(), || read_holder(&path))?;
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
    wait_for_stages(cache_dir, start, timeout, &mut on_wait)?;
    // Marks the holder alive, after its record is complete. Blocks only while a reader's probe lasts.
    let live_path = cache_dir.join(LIVE_NAME);
    let live = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&live_path)
        .and_then(|f| f.lock().map(|()| f))
        .map_err(|source| Error::Io { path: live_path, source })?;
    Ok(RunLock { _live: live, _file: file })
}

/// Wait until no watchdog of an earlier, killed run is still stopping its stages (it holds
/// `stages.lock` until they are gone: see `run::watchdog`), within what is left of `timeout`.
fn wait_for_stages(
    cache_dir: &Path,
    start: Instant,
    timeout: Duration,
    on_wait: &mut impl FnMut(&str),
) -> Result<(), Error> {
    let path = cache_dir.join(super::watchdog::LOCK_NAME);
    if super::watchdog::ours() {
        return Ok(());
    }
    let Ok(file) = fs::File::open(&path) else { return Ok(()) }; // no run has spawned a stage here yet
    // The shared lock is released when `file` is dropped: this only waits.
    let what = || "a killed kkpipe run whose stages are still stopping".to_string();
    wait(&path, start, timeout, on_wait, || file.try_lock_shared(), what)
}

/// Try `lock` until it succeeds or `timeout` (counted from `start`) has passed, telling `on_wait` once whom
/// we wait for (`holder`).
fn wait(
    path: &Path,
    start: Instant,
    timeout: Duration,
    on_wait: &mut impl FnMut(&str),
    lock: impl Fn() -> Result<(), fs::TryLockError>,
    holder: impl Fn() -> String,
) -> Result<(), Error> {
    let mut told = false;
    loop {
        match lock() {
            Ok(()) => return Ok(()),
            Err(fs::TryLockError::WouldBlock) => {
                let holder = holder();
                if !told {
                    on_wait(&holder);
                    told = true;
                }
                if start.elapsed() >= timeout {
                    return Err(Error::Timeout { path: path.to_path_buf(), waited: start.elapsed().as_secs(), holder });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(fs::TryLockError::Error(e)) => return Err(Error::Io { path: path.to_path_buf(), source: e }),
        }
    }
}
