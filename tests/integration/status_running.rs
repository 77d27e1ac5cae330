//! `status` while a run is in progress shows the stage it runs as running, naming the run lock's holder; a stage
//! left running by a killed run is interrupted. And `verify` that verified nothing says so and exits 5.

use crate::harness::*;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// `prepare` is quick; `deploy` marks that it started, then takes long enough to be looked at.
fn slow_pipeline() -> Repo {
    let repo = Repo::empty();
    repo.write("config/app.yaml", "replicas: 1\n").write(
        "pipeline.toml",
        r#"
[stages.prepare]
run = ["echo prepared > prepared.txt"]
outputs = ["prepared.txt"]

[stages.deploy]
kind = "deploy"
run = ["echo $$ > stage.pid", "touch started.marker", "sleep 30", "echo applied >> applies.log"]
inputs = ["config"]
needs = ["prepare"]
"#,
    );
    repo
}

fn spawn_run(repo: &Repo) -> Child {
    repo.cmd_in(&repo.root, &["run"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

/// Wait (at most 30 s) until `deploy` has started, with the run still going.
fn wait_for_marker(repo: &Repo, child: &mut Child) {
    let start = Instant::now();
    while !(repo.exists("started.marker") && repo.exists("stage.pid")) {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before the stage started");
        assert!(start.elapsed() < Duration::from_secs(30), "the stage never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    // `echo $$` may still be writing the pid.
    while repo.read("stage.pid").trim().parse::<i32>().is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "no stage pid");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hostname() -> String {
    nix::unistd::gethostname().unwrap().into_string().unwrap()
}

fn stage<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["stages"].as_array().unwrap().iter().find(|s| s["name"] == name).expect("stage")
}

fn line_of<'a>(table: &'a str, name: &str) -> &'a str {
    table.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("no `{name}` in:\n{table}"))
}

#[test]
fn status_during_a_run_shows_the_running_stage_and_its_holder() {
    let repo = slow_pipeline();
    let mut child = spawn_run(&repo);
    wait_for_marker(&repo, &mut child);
    let human = repo.kk(&["status"]);
    let json = repo.kk(&["status", "--json"]);
    // The race is real: both views were taken while the stage was running and the run had not ended.
    let still_running = child.try_wait().unwrap().is_none();
    let finished = repo.exists("applies.log");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let ended = child.wait().unwrap();
    assert!(still_running && !finished && repo.exists("started.marker"), "status was not taken during the stage");
    assert_eq!(ended.code(), Some(143), "the run was stopped by SIGTERM");

    let (human, json) = (human.ok(), json.ok());
    let pid = child.id();
    let deploy = line_of(&human.stdout, "deploy");
    assert!(deploy.contains("running"), "{}", human.stdout);
    assert!(deploy.contains(&format!("by `kkpipe run`, pid {pid} on {}", hostname())), "{}", human.stdout);
    assert!(deploy.contains("never deployed to environment `default`"), "why it runs: {}", human.stdout);
    assert!(line_of(&human.stdout, "prepare").contains("fresh"), "{}", human.stdout);

    check_schema(&schema("kkpipe.status.v1.json"), &json.stdout);
    let doc = json.json();
    let d = stage(&doc, "deploy");
    assert_eq!(d["state"], "running", "{doc:#}");
    assert_eq!(d["holder"]["pid"], pid);
    assert_eq!(d["holder"]["command"], "run");
    assert_eq!(d["holder"]["host"], hostname().as_str());
    assert_eq!(d["reasons"][0]["kind"], "never-deployed");
    assert!(d["recorded_at"].is_string() && d["duration_ms"].is_null(), "{d}");
    assert_eq!(stage(&doc, "prepare")["state"], "fresh");
    assert!(stage(&doc, "prepare").get("holder").is_none(), "only a running stage names the holder");

    // Once the run is over, the interrupted attempt is what it is.
    let after = repo.status_json();
    assert_eq!(stage(&after, "deploy")["state"], "failed");
    assert_eq!(stage(&after, "deploy")["reasons"][0]["kind"], "last-run-interrupted");
    assert!(stage(&after, "deploy").get("holder").is_none());
}

#[test]
fn a_stage_left_running_by_a_killed_run_is_interrupted_not_running() {
    let repo = slow_pipeline();
    let mut child = spawn_run(&repo);
    wait_for_marker(&repo, &mut child);
    // SIGKILL: the attempt row keeps no end, and the stage's process group lives on, orphaned.
    child.kill().unwrap();
    child.wait().unwrap();
    let stage_group = nix::unistd::Pid::from_raw(repo.read("stage.pid").trim().parse().unwrap());
    let dead = child.id();
    let lock = repo.read(".kkpipe/run.lock");
    assert!(lock.contains(&format!("\"pid\":{dead}")), "the dead holder's record stays behind: {lock}");
    let stale = repo.kk(&["status", "--json"]);
    // A record naming a live process (this test) does not make a holder either: only the kernel's lock does.
    let me = serde_json::json!({"pid": std::process::id(), "host": hostname(), "command": "run", "since_ms": 0});
    repo.write(".kkpipe/run.lock", &me.to_string());
    let forged = repo.kk(&["status"]);
    let _ = nix::sys::signal::killpg(stage_group, nix::sys::signal::Signal::SIGKILL);

    let doc = stale.ok().json();
    let d = stage(&doc, "deploy");
    assert_eq!(d["state"], "failed", "{doc:#}");
    assert_eq!(d["reasons"][0]["kind"], "last-run-interrupted");
    assert!(d.get("holder").is_none(), "{d}");
    let forged = forged.ok();
    let line = line_of(&forged.stdout, "deploy");
    assert!(!line.contains("running") && line.contains("last run was interrupted"), "{}", forged.stdout);
}

/// A deploy stage with a `verify` probe (the live state is `applies.log`), and a check stage.
fn probed_pipeline() -> Repo {
    let repo = Repo::empty();
    repo.write("config/app.yaml", "replicas: 1\n").write(
        "pipeline.toml",
        r#"
[stages.build]
run = ["echo built > built.txt"]
outputs = ["built.txt"]

[stages.deploy]
kind = "deploy"
run = ["echo applied >> applies.log"]
verify = "test -f applies.log"
inputs = ["config"]
"#,
    );
    repo
}

#[test]
fn verify_that_verified_nothing_says_so_and_exits_5() {
    let repo = probed_pipeline();
    // Nothing deployed yet.
    let r = repo.kk(&["verify"]);
    assert_eq!(r.code, 5, "{}", r.all());
    assert!(
        r.stderr.contains("kkpipe: nothing was verified: `deploy` not deployed with the current inputs"),
        "{}",
        r.stderr
    );
    let j = repo.kk(&["verify", "--json"]);
    assert_eq!(j.code, 5, "{}", j.all());
    assert_eq!(j.json()["summary"]["verified"], 0);
    assert!(j.stderr.contains("nothing was verified"), "{}", j.stderr);

    // Deployed: the probe runs and passes.
    repo.run(&[]).ok();
    let ok = repo.kk(&["verify"]).ok();
    assert!(ok.stdout.contains("1 in sync, 0 drifted"), "{}", ok.all());
    assert!(!ok.stderr.contains("nothing was verified"), "{}", ok.stderr);
    assert_eq!(repo.kk(&["verify", "--json"]).ok().json()["summary"]["verified"], 1);

    // Drift still exits 1.
    std::fs::remove_file(repo.path("applies.log")).unwrap();
    let drift = repo.kk(&["verify"]);
    assert_eq!(drift.code, 1, "{}", drift.all());
    assert!(!drift.stderr.contains("nothing was verified"), "{}", drift.stderr);
    repo.run(&[]).ok();

    // Inputs changed since the last deploy: that deploy is not what the repository says, so not probed.
    repo.write("config/app.yaml", "replicas: 2\n");
    let stale = repo.kk(&["verify"]);
    assert_eq!(stale.code, 5, "{}", stale.all());
    assert!(stale.stderr.contains("`deploy` not deployed with the current inputs"), "{}", stale.stderr);

    // Only the check stage selected: nothing has a probe.
    let check = repo.kk(&["verify", "build"]);
    assert_eq!(check.code, 5, "{}", check.all());
    assert!(
        check.stderr.contains("nothing was verified: no selected deploy stage has a `verify` probe"),
        "{}",
        check.stderr
    );
}

#[test]
fn verify_without_any_probe_exits_5_even_when_everything_is_deployed() {
    let repo = probed_pipeline();
    repo.edit("pipeline.toml", "verify = \"test -f applies.log\"\n", "");
    repo.run(&[]).ok();
    let r = repo.kk(&["verify"]);
    assert_eq!(r.code, 5, "{}", r.all());
    assert!(r.stderr.contains("no selected deploy stage has a `verify` probe"), "{}", r.stderr);
    assert!(r.stderr.contains("hint: "), "{}", r.stderr);
}
