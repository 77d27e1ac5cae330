//! The stage watchdog: a small process that stops kkpipe's stages when kkpipe dies, however it dies.
//!
//! Stages run in process groups of their own (so a terminal's Ctrl-C reaches kkpipe first), which also means
//! nothing stops them when kkpipe is SIGKILLed: a killed deploy would keep applying while the next one starts.
//! So the first stage spawned also starts this binary as `kkpipe __kkpipe-watchdog`, with its stdin a pipe whose
//! write end only kkpipe holds. kkpipe writes `+PGID` when a stage's group starts and `-PGID` once it is fully
//! finished; the watchdog keeps that set. When kkpipe exits for any reason (normal exit, panic, internal error,
//! SIGKILL) the kernel closes the pipe, the watchdog reads EOF and stops every group still registered: SIGTERM,
//! up to the stop grace (`KKPIPE_STOP_GRACE`) for them to go, then SIGKILL. After a normal run the set is empty and it exits at once.
//!
//! The watchdog also holds an exclusive `flock` on `.kkpipe/stages.lock` for as long as it lives. The run lock
//! is released the moment kkpipe dies, but its stages may still be stopping (a tool finishing cleanly on
//! SIGTERM); the next run takes the run lock and then waits for `stages.lock` (see `lock::acquire`), so it
//! never starts a deploy while a killed run's stages are still going.
//!
//! A process can leave its group (`setsid`, `daemon()`, `ssh -f`), so groups alone do not find everything a
//! stage started. Every stage process gets `KKPIPE_PROCESS_TAG=RUN.JOB` in its environment, which children
//! inherit whatever group or session they move to; the processes still carrying a stage's tag are stopped when
//! the stage ends ([`stop_leftovers`]), and every process carrying this run's tag when kkpipe dies. And kkpipe
//! is a child subreaper: a process whose parent died (a daemon's double fork) becomes kkpipe's child, outside
//! kkpipe's own process group, so it is found even when its environment cannot be read (`env -i`, a
//! non-dumpable `ssh-agent`): by its tag if it has one, else when its stage ends alone, else when the run ends
//! ([`stop_orphans`]).
//!
//! Why a pipe and not `PR_SET_PDEATHSIG` on each stage: that needs an `unsafe` `pre_exec`, fires when the
//! spawning *thread* ends (here a short-lived job thread), and reaches only the shell, not the processes it
//! starts. A pipe's EOF is process-wide, needs no unsafe code, and the watchdog signals the whole group.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{ChildStdin, Command, ExitCode, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The hidden first argument that makes the binary a watchdog (dispatched in `main.rs`, before clap).
pub(crate) const ARG: &str = "__kkpipe-watchdog";

const POLL: Duration = Duration::from_millis(50);

/// The stop grace when none is given (a watchdog started by an older kkpipe of the same binary path).
const DEFAULT_GRACE: Duration = Duration::from_secs(7);

/// The write end of the watchdog's stdin, or `None` if it could not be started. Process-wide: it watches
/// this process's death. Never closed before exit: closing it is what tells the watchdog to act.
static WATCHDOG: OnceLock<Option<Mutex<ChildStdin>>> = OnceLock::new();

/// The variable that marks every process a stage starts (see the module docs).
pub(crate) const TAG_VAR: &str = "KKPIPE_PROCESS_TAG";

/// The watchdog's pid: a child of kkpipe in a group of its own, never an orphan.
static WATCHDOG_PID: OnceLock<i32> = OnceLock::new();

/// kkpipe's children from before it became a subreaper (it may have been exec'd by a program that had some):
/// never orphans of its stages.
static EARLIER: OnceLock<Vec<i32>> = OnceLock::new();

/// kkpipe's children that it does not wait for itself ([`crate::children`]): orphans of its stages (a subreaper
/// inherits them), with whether they are zombies. Children in kkpipe's own process group (a `terraform` it runs
/// and waits for) are not either.
pub(crate) fn orphans() -> Vec<(Pid, bool)> {
    let me = std::process::id() as i32;
    let my_group = nix::unistd::getpgrp().as_raw();
    let own = crate::children::owned();
    let watchdog = WATCHDOG_PID.get().copied();
    let earlier = EARLIER.get().map(Vec::as_slice).unwrap_or_default();
    let Ok(proc) = std::fs::read_dir("/proc") else { return Vec::new() };
    proc.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&pid| !own.contains(&pid) && Some(pid) != watchdog && !earlier.contains(&pid))
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let mut f = stat.rsplit_once(')')?.1.split_whitespace();
            let state = f.next()?.chars().next()?;
            let ppid: i32 = f.next()?.parse().ok()?;
            let pgrp: i32 = f.next()?.parse().ok()?;
            (ppid == me && pgrp != my_group).then_some((Pid::from_raw(pid), matches!(state, 'Z' | 'X')))
        })
        .collect()
}

/// This process's children now, by pid.
fn children_now() -> Vec<i32> {
    let me = std::process::id().to_string();
    std::fs::read_to_string(format!("/proc/self/task/{me}/children"))
        .map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// Reap the orphans that have exited (a subreaper must, or they stay zombies in their groups and count against
/// the user's process limit).
fn reap_orphans() {
    let _held = crate::children::spawning();
    for (pid, zombie) in orphans() {
        if zombie {
            let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        }
    }
}

/// Whether `pid`'s environment can be read (a non-dumpable process's cannot, not even by its own user).
fn readable_env(pid: Pid) -> bool {
    std::fs::read(format!("/proc/{pid}/environ")).is_ok()
}

/// Stop every orphan kkpipe still has: at the end of a run nothing a stage started may be left.
pub(crate) fn stop_orphans() {
    if WATCHDOG.get().is_none() {
        return; // no stage ran: kkpipe is no subreaper, and a no-op run pays for no scan
    }
    for _ in 0..3 {
        let left: Vec<Pid> = orphans().into_iter().filter(|(_, zombie)| !zombie).map(|(p, _)| p).collect();
        if left.is_empty() {
            break;
        }
        stop_processes(left);
    }
    reap_orphans();
}

/// SIGTERM, up to [`LEFTOVER_GRACE`] to go (reaping what exits), then SIGKILL.
fn stop_processes(mut left: Vec<Pid>) {
    signal_orphans(&left, Signal::SIGTERM);
    let deadline = Instant::now() + LEFTOVER_GRACE;
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        reap_orphans();
        left.retain(|&p| alive(p));
    }
    signal_orphans(&left, Signal::SIGKILL);
    reap_orphans();
}

/// Signal those of `pids` that are orphans still, holding the spawn lock: never a child kkpipe has just spawned
/// and is about to own (a `git` of the remote while the run ends), nor a newer child that reuses the pid of an
/// orphan reaped since it was listed.
fn signal_orphans(pids: &[Pid], sig: Signal) {
    let _held = crate::children::spawning();
    let now: Vec<Pid> = orphans().into_iter().filter(|(_, zombie)| !zombie).map(|(p, _)| p).collect();
    for p in pids.iter().filter(|p| now.contains(p)) {
        let _ = nix::sys::signal::kill(*p, sig);
    }
}

/// How long leftovers of a finished stage get between SIGTERM and SIGKILL.
const LEFTOVER_GRACE: Duration = Duration::from_secs(1);

/// This kkpipe process's part of every tag: its pid and a random number, so a tag never matches another
/// run's processes (pids are reused).
fn run_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let mut r = [0u8; 8];
        let _ = getrandom::fill(&mut r);
        format!("{}-{:016x}", std::process::id(), u64::from_le_bytes(r))
    })
}

/// The tag of job `job`'s processes.
pub(crate) fn tag(job: usize) -> String {
    format!("{}.{job}", run_tag())
}

/// The processes (other than this one) whose environment has `TAG_VAR` equal to `tag`, or starting with
/// `tag` when `prefix`. Processes that vanish or that we may not read are skipped.
fn tagged(tag: &str, prefix: bool) -> Vec<Pid> {
    let entry = format!("{TAG_VAR}={tag}");
    let me = std::process::id();
    let Ok(proc) = std::fs::read_dir("/proc") else { return Vec::new() };
    proc.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|&b| b == 0).any(|v| match prefix {
                    true => v.starts_with(entry.as_bytes()),
                    false => v == entry.as_bytes(),
                })
            })
        })
        .map(|pid| Pid::from_raw(pid as i32))
        .collect()
}

/// Stop what a finished stage left behind: the rest of its process group (a background job with closed
/// pipes) and every process that still carries its tag (one that left the group: `setsid`, `ssh -f`).
/// SIGTERM, up to a second to go, then SIGKILL. Returns how many processes were left.
pub(crate) fn stop_leftovers(pgid: i32, tag: &str) -> usize {
    reap_orphans();
    let group = || killpg(Pid::from_raw(pgid), None).is_ok();
    let mut left = tagged(tag, false);
    // Orphans whose environment cannot be read are this stage's if kkpipe waits for no other child (a stage, a
    // `git`); else they wait for the end of the run.
    if crate::children::none_owned() {
        let unreadable = orphans().into_iter().filter(|&(p, zombie)| !zombie && !readable_env(p));
        left.extend(unreadable.map(|(p, _)| p).filter(|p| !left.contains(p)).collect::<Vec<_>>());
    }
    if left.is_empty() && !group() {
        return 0;
    }
    let found = left.len() + usize::from(group());
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGTERM);
    for &p in &left {
        let _ = nix::sys::signal::kill(p, Signal::SIGTERM);
    }
    let deadline = Instant::now() + LEFTOVER_GRACE;
    while (group() || !left.is_empty()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        reap_orphans();
        left.retain(|&p| alive(p));
    }
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    for p in left {
        let _ = nix::sys::signal::kill(p, Signal::SIGKILL);
    }
    reap_orphans();
    found
}

/// Exists and has not exited (a zombie waits only for its parent to reap it).
fn alive(p: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{p}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()))
        .is_some_and(|state| !matches!(state, 'Z' | 'X'))
}

/// The file the watchdog holds locked while it lives, in the cache directory.
pub(crate) const LOCK_NAME: &str = "stages.lock";

/// Start the watchdog for the cache in `cache_dir` if it is not running yet. Called before the first stage
/// is spawned, so a stage is unwatched only between its spawn and its `+PGID` line, and a run with nothing
/// to run starts no process.
pub(crate) fn start(cache_dir: &Path, grace: Duration) {
    WATCHDOG.get_or_init(|| {
        // Orphans of the stages become kkpipe's children (see the module docs); the children it already had
        // are not theirs. A thread reaps those that exit while stages run.
        let _ = EARLIER.set(children_now());
        let _ = nix::sys::prctl::set_child_subreaper(true);
        let _ = std::thread::Builder::new().name("reaper".into()).spawn(|| {
            loop {
                std::thread::sleep(Duration::from_millis(100));
                if !crate::children::none_owned() {
                    reap_orphans();
                }
            }
        });
        launch_watchdog(cache_dir, grace)
    });
}

fn launch_watchdog(cache_dir: &Path, grace: Duration) -> Option<Mutex<ChildStdin>> {
    match launch(&cache_dir.join(LOCK_NAME), grace) {
        Ok(stdin) => Some(Mutex::new(stdin)),
        Err(e) => {
            eprintln!("warning: cannot start the stage watchdog ({e}): stages would outlive a killed kkpipe");
            None
        }
    }
}

/// Whether this process runs a watchdog: then `stages.lock` is held by our own, for our own stages (a process
/// that runs several pipelines in turn, like `kkpipe demo`, must not wait for itself).
pub(crate) fn ours() -> bool {
    pipe().is_some()
}

fn pipe() -> Option<&'static Mutex<ChildStdin>> {
    WATCHDOG.get().and_then(Option::as_ref)
}

fn launch(lock: &Path, grace: Duration) -> std::io::Result<ChildStdin> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg(ARG)
        .arg(lock)
        .arg(grace.as_millis().to_string())
        .arg(run_tag())
        // Not one of the stage's processes: a kkpipe run inside a stage starts its watchdog with the outer tag
        // in its environment, and the outer stop must not take it before it has stopped its own stages.
        .env_remove(TAG_VAR)
        // std opens the pipe close-on-exec, so stages never inherit the write end (which would hide
        // kkpipe's death from the watchdog for as long as a stage lives).
        .stdin(Stdio::piped())
        // Its stdout is a pipe to us only (one byte: "locked"), never the caller's: it must not hold
        // `$(kkpipe ...)` or a CI log pipe open after kkpipe exits.
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        // Its own process group: a terminal's Ctrl-C goes to kkpipe, not to the watchdog.
        .process_group(0)
        .spawn()?;
    // The child is never waited for: it outlives us by design and is reaped by whoever inherits it.
    let _ = WATCHDOG_PID.set(child.id() as i32);
    let mut stdin = child.stdin.take().ok_or_else(|| std::io::Error::other("no stdin pipe"))?;
    // Wait for the watchdog to hold its lock (it answers once it does): a stage never runs before that.
    let mut ready = [0u8; 1];
    let mut out = child.stdout.take().ok_or_else(|| std::io::Error::other("no stdout pipe"))?;
    std::io::Read::read_exact(&mut out, &mut ready)?;
    stdin.flush()?;
    Ok(stdin)
}

/// A stage's process group, registered with the watchdog until dropped.
#[must_use = "the group is unregistered when the guard is dropped"]
pub(crate) struct Watch {
    pgid: i32,
}

/// Register `pgid` with the watchdog (starting it if needed); dropping the guard unregisters it. Drop the
/// guard only once the group is fully finished, leftovers killed.
pub(crate) fn watch(pgid: i32) -> Watch {
    send('+', pgid);
    Watch { pgid }
}

impl Drop for Watch {
    fn drop(&mut self) {
        send('-', self.pgid);
    }
}

/// Write errors are ignored: if the watchdog is gone, the run goes on as it would without one (std ignores
/// SIGPIPE, so a write to a closed pipe is just an error).
fn send(op: char, pgid: i32) {
    if let Some(pipe) = pipe() {
        let mut w = pipe.lock().unwrap_or_else(|e| e.into_inner());
        // One short write: well under PIPE_BUF, so never split.
        let _ = w.write_all(format!("{op}{pgid}\n").as_bytes());
    }
}

/// The watchdog process (`kkpipe __kkpipe-watchdog LOCKFILE GRACE_MS RUN_TAG`): lock LOCKFILE, say so on
/// stdout, read `+PGID` / `-PGID` lines until EOF, then stop the groups still registered and every process
/// tagged with RUN_TAG, and exit (releasing the lock).
pub(crate) fn serve() -> ExitCode {
    let Some(path) = std::env::args_os().nth(2) else {
        return ExitCode::FAILURE;
    };
    let grace = std::env::args().nth(3).and_then(|g| g.parse().ok()).map_or(DEFAULT_GRACE, Duration::from_millis);
    let run = std::env::args().nth(4).filter(|t| !t.is_empty());
    let held = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .and_then(|f| f.lock().map(|()| f));
    let Ok(_held) = held else {
        return ExitCode::FAILURE;
    };
    // Only the pipe's end ends the watchdog: a signal meant for the stages (a CI cancel sent to every process,
    // an outer kkpipe's stop) must not take it before it has stopped them.
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT, signal_hook::consts::SIGHUP] {
        let _ = signal_hook::flag::register(sig, std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)));
    }
    if std::io::stdout().write_all(b"L").and_then(|()| std::io::stdout().flush()).is_err() {
        return ExitCode::FAILURE;
    }
    // A count, not a set: a pgid number freed by a finished stage can be reused by a new one before the
    // old stage's `-` line arrives.
    let mut groups: HashMap<i32, usize> = HashMap::new();
    let mut input = std::io::stdin().lock();
    let mut line = Vec::new();
    loop {
        line.clear();
        match input.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let Some((op, pgid)) = parse(&line) else {
            continue;
        };
        if op == b'+' {
            *groups.entry(pgid).or_default() += 1;
        } else if let Some(n) = groups.get_mut(&pgid) {
            *n -= 1;
            if *n == 0 {
                groups.remove(&pgid);
            }
        }
    }
    let strays = run.map(|t| tagged(&format!("{t}."), true)).unwrap_or_default();
    stop(groups.into_keys().collect(), strays, grace);
    ExitCode::SUCCESS
}

/// `+PGID` or `-PGID`. Groups 0 and 1 are refused: `killpg` would signal our own group or every process.
fn parse(line: &[u8]) -> Option<(u8, i32)> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let (&op, num) = line.split_first()?;
    let pgid: i32 = std::str::from_utf8(num).ok()?.parse().ok()?;
    (matches!(op, b'+' | b'-') && pgid > 1).then_some((op, pgid))
}

/// SIGTERM every group and every stray process, wait up to `grace` for them to be gone, SIGKILL the rest.
fn stop(mut groups: Vec<i32>, mut strays: Vec<Pid>, grace: Duration) {
    for &g in &groups {
        let _ = killpg(Pid::from_raw(g), Signal::SIGTERM);
    }
    for &p in &strays {
        let _ = nix::sys::signal::kill(p, Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    loop {
        // Signal 0 only checks: an error (no such group) means every process of the group has exited.
        groups.retain(|&g| killpg(Pid::from_raw(g), None).is_ok());
        strays.retain(|&p| alive(p));
        if (groups.is_empty() && strays.is_empty()) || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(POLL);
    }
    for g in groups {
        let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
    }
    for p in strays {
        let _ = nix::sys::signal::kill(p, Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn lines_parse_and_dangerous_groups_are_refused() {
        assert_eq!(parse(b"+1234\n"), Some((b'+', 1234)));
        assert_eq!(parse(b"-1234"), Some((b'-', 1234)));
        for bad in [&b"+0\n"[..], b"+1\n", b"+-5\n", b"*12\n", b"+\n", b"\n", b"+12x\n"] {
            assert_eq!(parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
