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

/// Spawn a child with `spawn` and own it at once, until the [`Owned`] guard is dropped: once it was waited for
/// (or its waiting thread unwound: a pid owned for good would shield a later orphan that reuses it).
pub(crate) fn spawn_owned<T>(
    spawn: impl FnOnce() -> std::io::Result<T>,
    pid: impl Fn(&T) -> u32,
) -> std::io::Result<(T, Owned)> {
    let _held = spawning();
    let child = spawn()?;
    let pid = pid(&child) as i32;
    own().push(pid);
    Ok((child, Owned(pid)))
}

/// A child kkpipe waits for itself, owned until dropped.
#[must_use = "the child is disowned when the guard is dropped"]
pub(crate) struct Owned(i32);

impl Drop for Owned {
    fn drop(&mut self) {
        let mut own = own();
        // One entry: the same pid, reused by a newer child, may be owned again already.
        if let Some(at) = own.iter().position(|&p| p == self.0) {
            own.swap_remove(at);
        }
    }
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
