//! The child processes kkpipe spawns in a process group of their own and waits for itself: stage shells
//! (`run::exec`) and the `git` of a `git:` remote (`store::git`). kkpipe is a child subreaper while stages run, so
//! the watchdog (`run::watchdog`) takes every other child outside kkpipe's own group for an orphan a stage left,
//! to reap or to stop: one of these reaped there would leave its waiting thread without its exit status.

use std::sync::{Mutex, MutexGuard};

/// The children kkpipe waits for itself, by pid.
static OWN: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Held while a child is spawned and until it is owned, and while orphans are reaped: a child that failed to
/// exec is a zombie std waits for itself, never an orphan to reap.
static SPAWNING: Mutex<()> = Mutex::new(());

/// Spawn a child with `spawn` and own it at once; [`disown`] it once waited for.
pub(crate) fn spawn_owned<T>(
    spawn: impl FnOnce() -> std::io::Result<T>,
    pid: impl Fn(&T) -> u32,
) -> std::io::Result<T> {
    let _held = spawning();
    let child = spawn()?;
    own().push(pid(&child) as i32);
    Ok(child)
}

pub(crate) fn disown(pid: i32) {
    own().retain(|&p| p != pid);
}

/// The children owned now.
pub(crate) fn owned() -> Vec<i32> {
    own().clone()
}

/// Whether kkpipe waits for no child of its own now.
pub(crate) fn none_owned() -> bool {
    own().is_empty()
}

/// No child is spawned while this is held (reaping orphans holds it).
pub(crate) fn spawning() -> MutexGuard<'static, ()> {
    SPAWNING.lock().unwrap_or_else(|e| e.into_inner())
}

fn own() -> MutexGuard<'static, Vec<i32>> {
    OWN.lock().unwrap_or_else(|e| e.into_inner())
}
