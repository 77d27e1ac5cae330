//! Stage lifetime: no stage outlives kkpipe, however kkpipe ends (the watchdog, src/run/watchdog.rs).

use crate::harness::*;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

fn proc_pids() -> impl Iterator<Item = String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether any live process is still in process group `pgid` (the stage's shell and all it started).
fn group_alive(pgid: i32) -> bool {
    proc_pids().any(|p| stat(&p).is_some_and(|(s, g)| g == pgid && !matches!(s, 'Z' | 'X')))
}

/// Live watchdogs started by a kkpipe running in `dir` (they inherit its working directory).
fn watchdogs_in(dir: &Path) -> Vec<String> {
    let dir = dir.canonicalize().unwrap();
    proc_pids()
        .filter(|p| {
            let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            cmdline.split(|&b| b == 0).any(|a| a == b"__kkpipe-watchdog")
                && std::fs::read_link(format!("/proc/{p}/cwd")).is_ok_and(|c| c == dir)
                && stat(p).is_some_and(|(s, _)| !matches!(s, 'Z' | 'X'))
        })
        .collect()
}

/// If the test fails, do not leave the stage's group running for a minute.
struct KillGroupOnPanic(i32);

impl Drop for KillGroupOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() && group_alive(self.0) {
            let _ = killpg(Pid::from_raw(self.0), Signal::SIGKILL);
        }
    }
}

/// Run `script` as a stage (it writes its shell's pid to `$PID_FILE`, outside the repository, then waits),
/// SIGKILL kkpipe while it runs, and require the stage's whole process group to be gone within 10 s.
fn sigkilled_kkpipe_takes_its_stage_along(script: &str) {
    let repo = Repo::empty();
    let pid_file = repo.sibling("stage.pid");
    let stderr_file = repo.sibling("kkpipe.stderr");
    repo.write(
        "pipeline.toml",
        &format!("[stages.long]\nrun = {script:?}\nenv = {{ PID_FILE = {:?} }}\n", pid_file.to_str().unwrap()),
    );
    let mut kkpipe = repo
        .cmd_in(&repo.root, &["run"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_file).unwrap())
        .spawn()
        .unwrap();
    let stderr = || std::fs::read_to_string(&stderr_file).unwrap_or_default();

    let mut pid = None;
    let started = within(Duration::from_secs(20), || {
        pid = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.strip_suffix('\n')?.parse::<i32>().ok());
        pid.is_some()
    });
    assert!(started, "the stage did not start:\n{}", stderr());
    let pid = pid.unwrap();
    let _cleanup = KillGroupOnPanic(pid);
    assert!(
        within(Duration::from_secs(20), || !watchdogs_in(&repo.root).is_empty()),
        "no watchdog is running:\n{}",
        stderr()
    );

    // The race is set up: kkpipe is running the stage, whose shell leads a live process group.
    assert!(kkpipe.try_wait().unwrap().is_none(), "kkpipe ended before it was killed:\n{}", stderr());
    assert!(alive(pid) && group_alive(pid), "the stage is alive right before kkpipe is killed");
    kkpipe.kill().unwrap(); // SIGKILL: no handler, no Drop, no cleanup in kkpipe itself.
    kkpipe.wait().unwrap();

    let gone = within(Duration::from_secs(10), || !alive(pid) && !group_alive(pid));
    assert!(gone, "stage {pid} (or its group) outlived the SIGKILLed kkpipe:\n{}", stderr());
    assert!(
        within(Duration::from_secs(10), || watchdogs_in(&repo.root).is_empty()),
        "the watchdog lingers after its stages are gone"
    );
}

#[test]
fn stages_die_with_kkpipe_even_on_sigkill() {
    sigkilled_kkpipe_takes_its_stage_along("echo $$ > \"$PID_FILE\"; sleep 60");
}

/// SIGTERM is only the polite first step: a stage that ignores it is SIGKILLed after the grace period.
#[test]
fn a_stage_that_ignores_sigterm_dies_with_kkpipe_too() {
    // Ignored before the pid is written, so the kill cannot land before the trap is set.
    sigkilled_kkpipe_takes_its_stage_along("trap '' TERM; echo $$ > \"$PID_FILE\"; sleep 60");
}

/// After a normal run there is nothing to stop: the watchdog exits as soon as kkpipe does.
#[test]
fn a_normal_run_leaves_no_watchdog_behind() {
    let repo = Repo::empty();
    repo.write("pipeline.toml", "[stages.s]\nrun = \"echo hi > out.txt\"\noutputs = [\"out.txt\"]\n");
    let r = repo.run(&[]).ok();
    assert_eq!(r.ran(), ["s"]);
    assert!(!r.stderr.contains("watchdog"), "{}", r.stderr);
    assert!(within(Duration::from_secs(5), || watchdogs_in(&repo.root).is_empty()), "a watchdog outlives kkpipe");
}

/// The run lock is free the moment kkpipe is SIGKILLed, but its stage may take a while to stop (a tool that
/// finishes cleanly on SIGTERM). The next run waits for it: two deploys never overlap.
#[test]
fn the_next_run_waits_for_the_stages_of_a_killed_run_to_stop() {
    let mut repo = Repo::empty();
    // The stage's trap takes 2 s: well within the watchdog's grace, so the stage stops on its own.
    repo.set_env("KKPIPE_STOP_GRACE", "10");
    let log = repo.sibling("events.log");
    let pid_file = repo.sibling("stage.pid");
    repo.write(
        "pipeline.toml",
        &format!(
            "[stages.old]\nkind = \"deploy\"\nrun = \"trap 'sleep 2; echo old-stopped >> \\\"$LOG\\\"; exit 0' TERM; echo $$ > \\\"$PID_FILE\\\"; sleep 60 & wait\"\n\
             env = {{ LOG = {log:?}, PID_FILE = {pid:?} }}\n\
             [stages.new]\nkind = \"deploy\"\nrun = \"echo new-started >> \\\"$LOG\\\"\"\nenv = {{ LOG = {log:?} }}\n",
            log = log.to_str().unwrap(),
            pid = pid_file.to_str().unwrap()
        ),
    );
    let mut kkpipe =
        repo.cmd_in(&repo.root, &["run", "old"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    assert!(within(Duration::from_secs(20), || pid_file.exists()), "the old stage did not start");
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    let _cleanup = KillGroupOnPanic(pid);
    kkpipe.kill().unwrap();
    kkpipe.wait().unwrap();
    // The old stage is still stopping (its trap takes 2 s) while the next run starts.
    assert!(alive(pid), "the race is set up: the old stage is still running when the next run starts");
    let next = repo.kk(&["run", "new"]);
    assert_eq!(next.code, 0, "{}", next.all());
    assert!(next.stderr.contains("held by a killed kkpipe run whose stages are still stopping"), "{}", next.stderr);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "old-stopped\nnew-started\n");
}

/// The pid a stage wrote to `file`, waiting for it up to 20 s.
fn pid_in(file: &Path) -> i32 {
    let mut pid = None;
    let written = within(Duration::from_secs(20), || {
        pid = std::fs::read_to_string(file).ok().and_then(|s| s.trim().parse::<i32>().ok());
        pid.is_some()
    });
    assert!(written, "no pid in {}", file.display());
    pid.unwrap()
}

/// If the test fails, do not leave a stray process running for minutes.
struct KillOnPanic(i32);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = nix::sys::signal::kill(Pid::from_raw(self.0), Signal::SIGKILL);
        }
    }
}

/// Issue 21, item 9: a background child with closed pipes survived a normal exit (the group was killed only
/// when pipes stayed open), and one that left the group (`setsid`, `daemon()`, `ssh -f`) survived everything.
/// Nothing a stage starts outlives the stage: its group and every process still carrying its tag are stopped
/// when it ends.
#[test]
fn nothing_a_stage_starts_outlives_it() {
    // The setsid case ends the stage only once the child leads a group of its own (field 5 of its stat), so
    // the stage's group no longer holds it when the stage ends.
    let own_group = r#"until [ "$(cut -d' ' -f5 /proc/$c/stat)" = "$c" ]; do sleep 0.01; done; "#;
    for (name, start, wait) in [("background", "", ""), ("setsid", "setsid ", own_group)] {
        let repo = Repo::empty();
        let pid_file = repo.sibling("child.pid");
        let script = format!("{start}sleep 300 </dev/null >/dev/null 2>&1 & c=$!; {wait}echo $c > \"$PID_FILE\"");
        repo.write(
            "pipeline.toml",
            &format!("[stages.leave]\nrun = {script:?}\nenv = {{ PID_FILE = {:?} }}\n", pid_file.to_str().unwrap()),
        );
        let r = repo.run(&[]).ok();
        assert_eq!(r.ran(), ["leave"]);
        let child = pid_in(&pid_file);
        let _cleanup = KillOnPanic(child);
        assert!(
            within(Duration::from_secs(5), || !alive(child)),
            "{name}: child {child} outlived its stage and kkpipe"
        );
    }
}

/// Issue 21, item 9, on SIGKILL: a `setsid` child of a running stage is outside every process group the watchdog
/// knows; it is found by its tag and stopped with the rest.
#[test]
fn a_setsid_child_dies_with_a_sigkilled_kkpipe() {
    let repo = Repo::empty();
    let pid_file = repo.sibling("child.pid");
    repo.write(
        "pipeline.toml",
        &format!(
            "[stages.long]\nrun = 'setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $! > \"$PID_FILE\"; sleep 60'\nenv = {{ PID_FILE = {:?} }}\n",
            pid_file.to_str().unwrap()
        ),
    );
    let mut kkpipe = repo.cmd_in(&repo.root, &["run"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let child = pid_in(&pid_file);
    let _cleanup = KillOnPanic(child);
    assert!(within(Duration::from_secs(20), || !watchdogs_in(&repo.root).is_empty()), "no watchdog");
    let own = within(Duration::from_secs(10), || stat(&child.to_string()).is_some_and(|(_, pgrp)| pgrp == child));
    assert!(own, "setsid made the child a group (and session) of its own");
    assert!(kkpipe.try_wait().unwrap().is_none(), "kkpipe is still running the stage");
    kkpipe.kill().unwrap();
    kkpipe.wait().unwrap();
    assert!(
        within(Duration::from_secs(10), || !alive(child)),
        "the setsid child {child} outlived the SIGKILLed kkpipe"
    );
}

/// Review of item 9: a kkpipe run inside a stage started its watchdog with the outer run's tag, so when the outer
/// kkpipe was SIGKILLed its watchdog's stop took the inner watchdog before it had stopped the inner stage (which
/// ignores SIGTERM), and that stage lived on. The watchdog carries no tag and ends only when its pipe does.
#[test]
fn a_nested_kkpipe_run_stops_its_stages_when_the_outer_one_is_killed() {
    let repo = Repo::empty();
    let pid_file = repo.sibling("inner.pid");
    let kkpipe = env!("CARGO_BIN_EXE_kkpipe");
    repo.write(
        "pipeline.toml",
        &format!(
            "[stages.outer]\nrun = {:?}\nenv = {{ KKPIPE_STOP_GRACE = \"1\" }}\n",
            format!("{kkpipe} -C inner run")
        ),
    );
    repo.write(
        "inner/pipeline.toml",
        &format!("[stages.inner]\nrun = {:?}\n", format!("trap '' TERM; echo $$ > {}; sleep 300", pid_file.display())),
    );
    let mut outer = repo.cmd_in(&repo.root, &["run"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let inner = pid_in(&pid_file);
    let _cleanup = KillOnPanic(inner);
    // Both watchdogs run in the outer repository (the inner run is `-C inner` from there).
    assert!(within(Duration::from_secs(20), || watchdogs_in(&repo.root).len() == 2), "the inner watchdog runs");
    assert!(outer.try_wait().unwrap().is_none() && alive(inner), "both runs are running");
    outer.kill().unwrap();
    outer.wait().unwrap();
    assert!(within(Duration::from_secs(20), || !alive(inner)), "the inner stage {inner} outlived both runs");
}

/// Review of item 9: a process that clears its environment (`env -i`) or cannot have it read (a non-dumpable
/// `ssh-agent` on a runner that is not root) carries no tag kkpipe can see, and left the stage's group. kkpipe is
/// a child subreaper: such an orphan becomes its child and is stopped when its stage ends.
#[test]
fn an_untagged_daemon_a_stage_leaves_is_stopped_too() {
    let repo = Repo::empty();
    let pid_file = repo.sibling("daemon.pid");
    // The stage ends once the daemon leads a group of its own and provably carries no tag.
    let f = pid_file.display();
    let script = format!(
        "(env -i setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {f}) && until [ -s {f} ]; do sleep 0.01; done; \
         d=$(cat {f}); until [ \"$(cut -d' ' -f5 /proc/$d/stat)\" = \"$d\" ]; do sleep 0.01; done; \
         ! grep -qa KKPIPE_PROCESS_TAG /proc/$d/environ"
    );
    repo.write("pipeline.toml", &format!("[stages.agent]\nrun = {script:?}\n"));
    let r = repo.run(&[]).ok();
    assert_eq!(r.ran(), ["agent"]);
    let daemon = pid_in(&pid_file);
    let _cleanup = KillOnPanic(daemon);
    assert!(within(Duration::from_secs(5), || !alive(daemon)), "the untagged daemon {daemon} outlived its stage");
}

/// Review of item 9: as a subreaper, kkpipe inherits the orphans a stage leaves; those that exit were reaped
/// only when the stage ended, so a stage that starts many short background jobs piled up zombies against the
/// user's process limit. They are reaped while the stage runs.
#[test]
fn orphans_that_exit_while_their_stage_runs_are_reaped() {
    let repo = Repo::empty();
    let count = repo.sibling("zombies");
    // 200 orphans that exit at once, then (after a moment) the zombies among kkpipe's children ($PPID).
    let script = format!(
        "for i in $(seq 1 200); do ( true & ); done; sleep 1; n=0; \
         for f in /proc/[0-9]*/status; do \
           if grep -qs \"^PPid:.$PPID$\" $f && grep -qs '^State:.Z' $f; then n=$((n+1)); fi; \
         done; echo $n > {}",
        count.display()
    );
    repo.write("pipeline.toml", &format!("[stages.many]\nrun = {script:?}\n"));
    assert_eq!(repo.run(&[]).ok().ran(), ["many"]);
    let zombies: usize = std::fs::read_to_string(&count).unwrap().trim().parse().unwrap();
    assert!(zombies < 20, "{zombies} zombies of kkpipe while its stage ran");
}
