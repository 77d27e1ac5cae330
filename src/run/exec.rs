//! Running one command: `bash -euo pipefail -c SCRIPT` in its own process group, with a cleared
//! environment, output streamed line by line (masked) to the scheduler and kept as the log.

use crate::hash::key::SHELL;
use crate::mask::Masker;
use crate::pipeline::Stage;
use crate::run::Msg;
use crate::run::watchdog;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Variables every stage gets from the caller, unkeyed: what a shell needs to work at all. Anything else
/// must be listed in `env`, `pass_env` or `secret_env`, so the key sees everything a stage depends on.
pub(crate) const BASE_ENV: &[&str] =
    &["PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TERM", "TZ", "TMPDIR"];

/// The environment a stage's command sees: the base set from the caller, keyed `env`, `pass_env` and
/// `secret_env` from the caller, and kkpipe's own `KKPIPE_STAGE`, `KKPIPE_ENV` (the deployment
/// environment; a check stage that reads it should be `per_env`) and `KKPIPE` (its executable).
pub(crate) fn stage_env(stage: &Stage, caller: &HashMap<String, String>, env_name: &str) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for name in BASE_ENV {
        if let Some(v) = caller.get(*name) {
            env.insert(name.to_string(), v.clone());
        }
    }
    for name in stage.pass_env.iter().chain(&stage.secret_env) {
        if let Some(v) = caller.get(name) {
            env.insert(name.clone(), v.clone());
        }
    }
    for (k, v) in &stage.env {
        env.insert(k.clone(), v.clone());
    }
    env.insert("KKPIPE_STAGE".into(), stage.name.clone());
    env.insert("KKPIPE_ENV".into(), env_name.to_string());
    // This kkpipe, for probes that call `"$KKPIPE" same-data` (it need not be on PATH: `cargo run`, a CI
    // runner's tool cache).
    if let Ok(exe) = std::env::current_exe() {
        env.insert("KKPIPE".into(), exe.to_string_lossy().into_owned());
    }
    env.into_iter().collect()
}

#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub script: String,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    /// Where the stage may say why it failed ([`FAILURE_NOTE_VAR`]); read and removed when it exits.
    pub note: Option<PathBuf>,
}

/// The variable naming a file in which a stage (or `kkpipe plan-check` inside it) may write, before it fails,
/// why: its first lines become the failure's detail in the summary, the job summary and JSON.
pub(crate) const FAILURE_NOTE_VAR: &str = "KKPIPE_FAILURE_NOTE";

/// A failure note's text (its first 64 KiB), and the file removed. Only a regular file is read: a link the stage
/// put there is removed, not followed.
fn take_note(path: &std::path::Path) -> Option<String> {
    let regular = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file());
    let mut bytes = Vec::new();
    let read = regular
        .then(|| std::fs::File::open(path).and_then(|f| std::io::Read::read_to_end(&mut f.take(64 << 10), &mut bytes)))
        .is_some_and(|r| r.is_ok());
    let _ = std::fs::remove_file(path);
    read.then(|| String::from_utf8_lossy(&bytes).into_owned())
}

/// What the summary shows of a failure note, once masked: its first five non-empty lines, each at most 200
/// characters with control characters as spaces (a note must not end a table row or start a CI command), joined.
pub(crate) fn note_summary(masked: &str) -> Option<String> {
    let line = |l: &str| -> String {
        let clean: String = l.trim().chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        match clean.chars().count() > 200 {
            true => clean.chars().take(199).chain(['…']).collect(),
            false => clean,
        }
    };
    let lines: Vec<String> = masked.lines().map(line).filter(|l| !l.trim().is_empty()).take(5).collect();
    (!lines.is_empty()).then(|| lines.join("; "))
}

#[derive(Debug)]
pub(crate) struct Exit {
    /// `None` when killed by a signal or when it could not start.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub spawn_error: Option<String>,
    pub log: RawLog,
    pub duration: Duration,
    /// What the stage wrote in its failure note (unmasked).
    pub note: Option<String>,
}

/// What a stage wrote, byte for byte and unmasked: it can only be read masked, and is masked once the stage's
/// own sensitive outputs are known (a stage that prints the kubeconfig it just wrote), so the stored log never
/// holds what the streamed lines could not yet mask. Masked whole, a secret across a cut line is masked too.
#[derive(Debug, Default)]
pub(crate) struct RawLog(Vec<u8>);

impl RawLog {
    pub(crate) fn masked(&self, m: &Masker) -> Vec<u8> {
        m.mask(&self.0)
    }
}

impl Exit {
    fn not_started(why: String, start: Instant) -> Exit {
        let log = RawLog::default();
        Exit { code: None, signal: None, spawn_error: Some(why), log, duration: start.elapsed(), note: None }
    }

    pub(crate) fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Start `cmd` on a thread of its own; its lines and its exit arrive on `tx`.
pub(crate) fn spawn(job: usize, cmd: Spec, masker: Arc<RwLock<Masker>>, tx: Sender<Msg>) {
    std::thread::Builder::new()
        .name(format!("job-{job}"))
        .spawn(move || {
            let result = execute(job, &cmd, &masker, &tx);
            let _ = tx.send(Msg::Exited { job, result });
        })
        .expect("spawn a job thread");
}

/// The shell running `cmd`'s script: its directory, only its environment, piped output, no input.
/// Run before the script, on its first line (so bash's line numbers in messages stay the script's): wait for
/// kkpipe's go, which comes once the stage's process group is registered with the watchdog, then give the
/// script no input. Without the go (kkpipe died in between) the stage exits before doing anything.
const GATE: &str = "read -r _ || exit 125; exec </dev/null; ";

fn command(cmd: &Spec, tag: &str) -> Command {
    let mut c = Command::new(SHELL[0]);
    c.args(&SHELL[1..])
        .arg(format!("{GATE}{}", cmd.script))
        .current_dir(&cmd.cwd)
        .env_clear()
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .envs(cmd.note.iter().map(|p| (FAILURE_NOTE_VAR, p)))
        .env(watchdog::TAG_VAR, tag)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: signals are forwarded to the whole tree, and a terminal's Ctrl-C reaches
        // kkpipe first, which decides how to stop the stages.
        .process_group(0);
    c
}

fn execute(job: usize, cmd: &Spec, masker: &Arc<RwLock<Masker>>, tx: &Sender<Msg>) -> Exit {
    let start = Instant::now();
    let tag = watchdog::tag(job);
    let (mut child, owned) = match crate::children::spawn_owned(|| command(cmd, &tag).spawn(), std::process::Child::id)
    {
        Ok(spawned) => spawned,
        Err(e) => return Exit::not_started(format!("cannot start `{}`: {e}", SHELL[0]), start),
    };
    let pgid = child.id() as i32;
    // Registered before the stage may start (see GATE), so the group is stopped however kkpipe dies (owned as
    // kkpipe's own child when spawned, never an orphan to reap).
    let watch = watchdog::watch(pgid);
    if let Some(mut go) = child.stdin.take() {
        let _ = std::io::Write::write_all(&mut go, b"\n");
    }
    let _ = tx.send(Msg::Spawned { job, pgid });

    let log = Arc::new(Mutex::new(Vec::new()));
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let readers: Vec<_> = [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|stream| {
        let (tx, log, masker, done) = (tx.clone(), log.clone(), masker.clone(), done_tx.clone());
        std::thread::spawn(move || {
            pump(job, stream, &tx, &log, &masker);
            let _ = done.send(());
        })
    })
    .collect();
    drop(done_tx);
    let status = child.wait();
    drop(owned);

    drain(readers, &done_rx, pgid);
    // Nothing a stage started outlives it: the group and whatever left it are stopped, and only then is the
    // group unregistered (a kkpipe killed before this point leaves them to the watchdog).
    watchdog::stop_leftovers(pgid, &tag);
    drop(watch);
    let log = RawLog(std::mem::take(&mut *log.lock().expect("log")));
    let note = cmd.note.as_deref().and_then(take_note);
    match status {
        Ok(s) => Exit { code: s.code(), signal: s.signal(), spawn_error: None, log, duration: start.elapsed(), note },
        Err(e) => Exit {
            code: None,
            signal: None,
            spawn_error: Some(format!("waiting for the stage failed: {e}")),
            log,
            duration: start.elapsed(),
            note,
        },
    }
}

/// Wait for the reader threads to reach the end of their pipes. A background process that inherited the
/// pipes would keep them open forever: give the readers a moment to drain, then stop the rest of the
/// process group.
fn drain(readers: Vec<std::thread::JoinHandle<()>>, done_rx: &mpsc::Receiver<()>, pgid: i32) {
    let mut open = readers.len();
    let deadline = Instant::now() + Duration::from_secs(2);
    while open > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left) {
            Ok(()) => open -= 1,
            Err(_) => {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL);
                while open > 0 && done_rx.recv_timeout(Duration::from_secs(5)).is_ok() {
                    open -= 1;
                }
                break;
            }
        }
    }
    for r in readers {
        if r.is_finished() {
            let _ = r.join();
        }
    }
}

/// Forward lines (masked) to the scheduler, and every byte into the raw log. Very long lines are cut into
/// pieces so a binary blob on stdout cannot exhaust memory; a cut never splits a secret (see
/// [`Masker::split_point`]): the bytes where one may begin are carried into the next piece.
fn pump(job: usize, stream: Box<dyn Read + Send>, tx: &Sender<Msg>, log: &Mutex<Vec<u8>>, masker: &RwLock<Masker>) {
    const MAX_LINE: usize = 64 * 1024;
    let mut r = BufReader::with_capacity(64 * 1024, stream);
    let mut buf = Vec::new();
    let send = |line: &[u8]| {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let _ = tx.send(Msg::Line { job, line: masker.read().expect("masker").mask(line) });
    };
    loop {
        let carried = buf.len();
        let limit = MAX_LINE - carried;
        let n = match (&mut r).take(limit as u64).read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        log.lock().expect("log").extend_from_slice(&buf[carried..]);
        if n == limit && !buf.ends_with(b"\n") {
            let at = masker.read().expect("masker").split_point(&buf, MAX_LINE / 2);
            send(&buf[..at]);
            buf.drain(..at);
        } else {
            send(&buf);
            buf.clear();
        }
    }
    if !buf.is_empty() {
        send(&buf);
    }
}

/// Send `sig` to a job's whole process group.
pub(crate) fn signal_group(pgid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), sig);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_note_is_a_few_short_clean_lines() {
        assert_eq!(note_summary("\n  why it failed  \n\nretry\n"), Some("why it failed; retry".into()));
        assert_eq!(note_summary("a\rb\x1b[31mc"), Some("a b [31mc".into()), "no CR or escape reaches a CI log");
        let long = "x".repeat(500);
        assert_eq!(note_summary(&long).unwrap().chars().count(), 200);
        assert_eq!(note_summary("1\n2\n3\n4\n5\n6\n"), Some("1; 2; 3; 4; 5".into()));
        assert_eq!(note_summary(" \n\n"), None);
    }
}
