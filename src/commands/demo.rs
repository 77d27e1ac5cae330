//! `kkpipe demo`: the README's main command. Writes the embedded KKP repository and runs its pipeline as a
//! push to main three times: everything, nothing, and only what an edit to `kubermatic/values.yaml` affects.

use super::run_outcome;
use crate::cli::{DemoArgs, RunArgs, Selection};
use crate::error::{Error, exit};
use crate::kkp::demo;
use crate::report::format_duration;
use crate::run::Outcome;
use crate::session::find_on_path;
use crate::settings::Settings;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(super) fn demo(settings: &Settings, args: &DemoArgs) -> Result<u8, Error> {
    let path_var = settings.caller_env.get("PATH").cloned().unwrap_or_default();
    check_tools(&path_var)?;
    let dir = prepare_dir(args.dir.as_deref())?;
    demo::write_repo(&dir).map_err(|(path, e)| Error::io("write", &path, e))?;
    let git = find_on_path("git", Some(&path_var)).is_some();
    if git {
        git_commit(&dir, "KKP GitOps repository (kkpipe demo)");
    }
    let s = demo_settings(settings, &dir, &path_var);
    let args = push_to_main();

    banner(&format!("kkpipe demo: a KKP GitOps repository (GitHub Actions, AWS, Route53) in {}", dir.display()));
    step(
        1,
        "first push to main: nothing has run yet, so every stage runs (terraform is real; kubeone, the KKP installer, helm, sops, kubectl, flux and aws are stand-ins from bin/)",
    );
    let first = must(run_outcome(&s, &args)?)?;
    step(
        2,
        "a second push with no changes: every stage is fresh and skipped (deploy stages' drift probes confirm the live state)",
    );
    let second = must(run_outcome(&s, &args)?)?;
    let values = dir.join("kubermatic/values.yaml");
    let text = std::fs::read_to_string(&values).map_err(|e| Error::io("read", &values, e))?;
    std::fs::write(&values, text.replacen("replicaCount: 2", "replicaCount: 3", 1))
        .map_err(|e| Error::io("write", &values, e))?;
    if git {
        git_commit(&dir, "Scale the nginx ingress controller to 3 replicas");
    }
    step(
        3,
        "a push that edits kubermatic/values.yaml (nginx replicaCount 2 -> 3): only kkp-deploy, and what consumes its outputs, runs",
    );
    let third = must(run_outcome(&s, &args)?)?;

    banner("What happened");
    println!("  1. first push:  {}", line(&first));
    println!("  2. no changes:  {}", line(&second));
    println!("  3. values edit: {}", line(&third));
    println!(
        "  kkp-deploy's output (the ingress address) did not change, so dns-update and flux-bootstrap stayed fresh:\n  \
         kkpipe keys each stage by its inputs and its needs' outputs, not by what ran before it (early cutoff)."
    );
    banner("Continue");
    println!(
        "  cd {} && . ./demo.env      # stand-in tools on PATH, fake credentials, HOME inside the demo",
        dir.display()
    );
    println!("  kkpipe -C {} status", dir.display());
    println!("  kkpipe run --event push --branch main --dry-run    # after editing terraform/aws/terraform.tfvars");
    println!("  rm -rf {}                  # when done", dir.display());
    Ok(if [&first, &second, &third].iter().any(|o| o.failed) { exit::FAILED } else { exit::OK })
}

/// Fail early, with how to install it, when a tool the demo pipeline runs is missing.
fn check_tools(path_var: &str) -> Result<(), Error> {
    for (tool, how) in [
        (
            "terraform",
            "install terraform 1.4 or newer (https://developer.hashicorp.com/terraform/install); the demo runs it for real, offline",
        ),
        (
            "python3",
            "install Python 3; the demo's stand-ins for kubeone, the KKP installer, sops, kubectl and flux are Python scripts",
        ),
        ("bash", "install bash; kkpipe runs stage commands with it"),
    ] {
        if find_on_path(tool, Some(path_var)).is_none() {
            return Err(Error::Usage(format!("`{tool}` is not on PATH: {how}")));
        }
    }
    Ok(())
}

/// The directory the demo repository goes into: `--dir` (absent or empty, created), else a new one in the
/// temporary directory that is kept after the demo.
fn prepare_dir(dir: Option<&Path>) -> Result<PathBuf, Error> {
    Ok(match dir {
        Some(d) => {
            if d.exists() && std::fs::read_dir(d).map(|mut r| r.next().is_some()).unwrap_or(true) {
                return Err(Error::Usage(format!("`{}` exists and is not empty; pick a new directory", d.display())));
            }
            std::fs::create_dir_all(d).map_err(|e| Error::io("create", d, e))?;
            std::path::absolute(d).unwrap_or_else(|_| d.to_path_buf())
        }
        None => tempfile::Builder::new()
            .prefix("kkpipe-demo-")
            .tempdir()
            .map_err(|e| Error::io("create a directory in", &std::env::temp_dir(), e))?
            .keep(),
    })
}

/// The caller's settings, pointed at the demo repository with its stand-in tools and fake credentials.
fn demo_settings(settings: &Settings, dir: &Path, path_var: &str) -> Settings {
    let mut s = settings.clone();
    s.start_dir = dir.to_path_buf();
    s.provider = None;
    s.style = crate::report::Style::Plain;
    // The demo plays a CI job's pushes: nothing asks, and files the pipeline made are not uncommitted edits.
    s.in_ci = true;
    for (k, v) in demo::environment(dir, path_var) {
        s.caller_env.insert(k, v);
    }
    s
}

/// `kkpipe run` as a push to main, the same for each of the demo's three runs.
fn push_to_main() -> RunArgs {
    RunArgs {
        stages: Vec::new(),
        dry_run: false,
        force: false,
        jobs: None,
        fail_fast: false,
        lock_timeout: 60,
        no_verify: false,
        replay: false,
        yes: false,
        allow_dirty: false,
        json: false,
        json_lines: false,
        selection: Selection {
            event: Some("push".into()),
            branch: Some("main".into()),
            env_name: "default".into(),
            remote: None,
        },
    }
}

fn must(o: Option<Outcome>) -> Result<Outcome, Error> {
    o.ok_or_else(|| Error::Usage("the demo pipeline selected no stage".into()))
}

fn line(o: &Outcome) -> String {
    let ran: Vec<&str> =
        o.rows.iter().filter(|r| r.state == crate::report::StageState::Ran).map(|r| r.name.as_str()).collect();
    let took = format_duration(Duration::from_millis(o.summary.duration_ms));
    match ran.len() {
        0 => format!("0 ran, {} fresh, in {took}", o.summary.fresh + o.summary.restored),
        n if n == o.rows.len() => format!("all {n} stages ran in {took}"),
        _ => format!("ran {} ({} fresh) in {took}", ran.join(", "), o.summary.fresh + o.summary.restored),
    }
}

fn banner(text: &str) {
    println!("\n== {text} ==");
}

fn step(n: u32, text: &str) {
    println!("\n-- step {n}/3: {text}\n");
}

fn git_commit(dir: &Path, message: &str) {
    let run = |args: &[&str]| {
        let _ = std::process::Command::new("git")
            .args([
                "-c",
                "user.name=kkpipe demo",
                "-c",
                "user.email=demo@kkpipe.invalid",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    };
    if !dir.join(".git").exists() {
        run(&["init", "-q"]);
    }
    run(&["add", "-A"]);
    run(&["commit", "-q", "-m", message]);
}
