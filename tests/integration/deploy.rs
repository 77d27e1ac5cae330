//! Deploy semantics: the per-environment ledger, drift probes, plan binding and the run lock.

use crate::harness::*;

fn push(repo: &Repo, extra: &[&str]) -> Run {
    let mut a = vec!["--event", "push", "--branch", "main"];
    a.extend_from_slice(extra);
    repo.run(&a).ok()
}

fn instance_type(repo: &Repo) -> String {
    let state: serde_json::Value = serde_json::from_str(&repo.read("terraform/aws/terraform.tfstate")).unwrap();
    let cp = state["resources"].as_array().unwrap().iter().find(|r| r["name"] == "control_plane").unwrap();
    cp["instances"][0]["attributes"]["input"]["value"]["instance_type"].as_str().unwrap().to_string()
}

#[test]
fn deploying_a_then_b_then_a_deploys_three_times_and_the_ledger_shows_it() {
    let repo = Repo::kkp_demo();
    push(&repo, &[]);
    repo.edit("terraform/aws/terraform.tfvars", "\"t3.large\"", "\"t3.xlarge\"");
    let b = push(&repo, &[]);
    assert!(b.ran().contains(&"terraform-apply".to_string()));
    assert_eq!(instance_type(&repo), "t3.xlarge");

    // Back to A: the plan for A is a cache hit (a check stage), but the apply is a ledger: the last apply
    // was B, so A is applied again. The restored plan for A was made against older state; terraform
    // refuses it and kkpipe replans once.
    repo.edit("terraform/aws/terraform.tfvars", "\"t3.xlarge\"", "\"t3.large\"");
    let a = push(&repo, &[]);
    assert!(a.ran().contains(&"terraform-apply".to_string()), "{}", a.stderr);
    assert_eq!(instance_type(&repo), "t3.large");

    let ledger = repo.kk(&["history", "--stage", "terraform-apply", "--json"]).ok().json();
    let entries = ledger.as_array().unwrap();
    let successes: Vec<&serde_json::Value> = entries.iter().filter(|e| e["state"] == "success").collect();
    // (The keys differ: each apply's key includes the plan it applied, and A was replanned.)
    assert_eq!(successes.len(), 3, "{ledger:#}");
    for e in successes {
        assert_eq!(e["event"], "push");
        assert_eq!(e["branch"], "main");
        assert_eq!(e["env"], "default");
    }
    let text = repo.kk(&["history", "--stage", "terraform-apply"]).ok().stdout;
    assert!(text.lines().count() >= 4, "{text}");
}

#[test]
fn a_ledger_is_not_a_cache_a_b_a_applies_a_again() {
    let repo = slow_deploy();
    repo.run(&[]).ok();
    repo.write("config/app.yaml", "replicas: 2\n");
    repo.run(&[]).ok();
    repo.write("config/app.yaml", "replicas: 1\n");
    let again = repo.run(&[]).ok();
    assert_eq!(again.ran(), ["deploy"], "a plain cache would call A a hit");
    assert_eq!(again.reason_of("deploy")["kind"], "input-changed");
    assert_eq!(repo.read("applies.log"), "applied\napplied\napplied\n");
    let ledger = repo.kk(&["history", "--stage", "deploy", "--json"]).ok().json();
    let keys: Vec<&str> = ledger.as_array().unwrap().iter().map(|e| e["key"].as_str().unwrap()).collect();
    assert_eq!(keys.len(), 3);
    assert_eq!(keys[0], keys[2], "newest first: A, B, A");
    assert_ne!(keys[0], keys[1]);
    // A failed deploy also counts: the next run deploys again even with unchanged inputs.
    repo.edit("pipeline.toml", "\"sleep 2\", ", "\"test -e go\", ");
    repo.write("config/app.yaml", "replicas: 3\n");
    assert_eq!(repo.run(&[]).code, 1);
    repo.write("go", "");
    let retried = repo.run(&[]).ok();
    assert_eq!(retried.reason_of("deploy")["kind"], "last-run-failed");
}

#[test]
fn the_ledger_records_the_commit_when_in_git() {
    let repo = Repo::kkp_demo();
    let git = |args: &[&str]| {
        let o = std::process::Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
            .args(args)
            .current_dir(&repo.root)
            .output()
            .unwrap();
        assert!(o.status.success());
        String::from_utf8(o.stdout).unwrap()
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "initial"]);
    let head = git(&["rev-parse", "HEAD"]).trim().to_string();
    push(&repo, &[]);
    let ledger = repo.kk(&["history", "--stage", "kkp-deploy", "--json"]).ok().json();
    assert_eq!(ledger[0]["git_commit"], head.as_str());
    let text = repo.kk(&["history", "--stage", "kkp-deploy"]).ok().stdout;
    assert!(text.contains(&head[..10]), "{text}");
}

#[test]
fn environments_keep_separate_ledgers() {
    let repo = Repo::kkp_demo();
    let staging = push(&repo, &["--env", "staging"]);
    assert_eq!(staging.ran().len(), 9);
    // Production has never been deployed: every deploy stage runs, or is adopted where its probe finds the live
    // system in sync (the demo's environments share one simulated cloud); check stages are a shared cache.
    let production = push(&repo, &["--env", "production"]);
    let (ran, adopted) = (production.ran(), production.with_state("adopted"));
    for s in
        ["terraform-backend-prepare", "terraform-apply", "kubeone-apply", "kkp-deploy", "dns-update", "flux-bootstrap"]
    {
        let s = s.to_string();
        assert!(ran.contains(&s) || adopted.contains(&s), "{s} must deploy to production: {ran:?} {adopted:?}");
    }
    assert_eq!(adopted.len(), 6, "every probe finds the shared cloud in sync: {adopted:?}");
    assert!(!ran.contains(&"terraform-kkp-validate".to_string()), "check stages are a shared cache");
    // The plan is `per_env`: production gets a plan of its own.
    assert_eq!(production.reason_of("terraform-plan")["kind"], "env-scope-changed");
    let ledger = repo.kk(&["history", "--stage", "kkp-deploy", "--env", "production", "--json"]).ok().json();
    assert_eq!(ledger[0]["state"], "adopted", "{ledger:#}");
    assert!(push(&repo, &["--env", "staging"]).ran().is_empty());
    assert!(push(&repo, &["--env", "production"]).ran().is_empty());
    let staging_ledger = repo.kk(&["history", "--stage", "kkp-deploy", "--env", "staging", "--json"]).ok().json();
    assert_eq!(staging_ledger.as_array().unwrap().len(), 1);
}

#[test]
fn drift_is_reported_by_verify_and_repaired_by_the_next_run() {
    let repo = Repo::kkp_demo();
    push(&repo, &[]);
    let clean = repo.kk(&["verify", "--json"]).ok();
    assert_eq!(clean.json()["summary"]["verified"], 6, "backend-prepare, terraform, kubeone, KKP, DNS, Flux");
    assert_eq!(clean.json()["summary"]["drifted"], 0);

    // Change the live state behind kkpipe's back.
    drift_demo_nodes(&repo);
    let serial_before: serde_json::Value = serde_json::from_str(&repo.read("terraform/aws/terraform.tfstate")).unwrap();

    let drift = repo.kk(&["verify", "--json"]);
    assert_eq!(drift.code, 1, "{}", drift.all());
    assert_eq!(drift.with_state("drifted"), ["terraform-apply"]);
    assert!(drift.stderr.contains("terraform-apply: drift detected by verify"), "{}", drift.stderr);
    let serial_after: serde_json::Value = serde_json::from_str(&repo.read("terraform/aws/terraform.tfstate")).unwrap();
    assert_eq!(serial_before["serial"], serial_after["serial"], "verify applies nothing");
    assert_eq!(instance_type(&repo), "c5.large");

    // Issue 24, item 5: `on_drift = "fail"` applies nothing, says what drifted, and fails the run.
    let stale = "retry_needs_if = \"Saved plan is stale\"";
    repo.edit("pipeline.toml", stale, &format!("{stale}\non_drift = \"fail\""));
    let refused = repo.run(&["--event", "push", "--branch", "main"]);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert_eq!(refused.with_state("drifted"), ["terraform-apply"]);
    assert_eq!(refused.json()["summary"]["drifted"], 1);
    assert!(!refused.stderr.contains("0 drifted") && refused.stderr.contains("1 drifted"), "{}", refused.stderr);
    assert_eq!(instance_type(&repo), "c5.large", "nothing applied");
    repo.edit("pipeline.toml", &format!("{stale}\non_drift = \"fail\""), stale);

    // By default drift is deployed again, and counted as drift.
    let repair = push(&repo, &[]);
    assert!(repair.ran().contains(&"terraform-apply".to_string()), "{}", repair.stderr);
    assert_eq!(repair.reason_of("terraform-apply")["kind"], "drift");
    assert_eq!(
        (repair.json()["summary"]["drifted"].clone(), repair.json()["summary"]["drift_applied"].clone()),
        (1.into(), 1.into())
    );
    assert!(repair.stderr.contains("1 drifted (1 deployed again)"), "{}", repair.stderr);
    assert_eq!(instance_type(&repo), "t3.large");
    let clean = repo.kk(&["verify"]).ok();
    assert!(clean.stdout.contains("6 in sync, 0 drifted"), "{}", clean.stdout);
}

#[test]
fn flux_bootstrap_reruns_when_flux_system_is_missing() {
    let repo = Repo::kkp_demo();
    push(&repo, &[]);
    std::fs::remove_dir_all(repo.path("flux/clusters/master/flux-system")).unwrap();
    let r = push(&repo, &[]);
    assert_eq!(r.ran(), ["flux-bootstrap"]);
    assert_eq!(r.reason_of("flux-bootstrap")["kind"], "drift");
    assert!(repo.exists("flux/clusters/master/flux-system/gotk-sync.yaml"));
    assert!(push(&repo, &[]).ran().is_empty());
}

/// A pipeline whose deploy stage takes a while and records each apply.
fn slow_deploy() -> Repo {
    let repo = Repo::empty();
    repo.write("config/app.yaml", "replicas: 1\n").write(
        "pipeline.toml",
        r#"
[stages.deploy]
kind = "deploy"
run = ["sleep 2", "echo applied >> applies.log"]
inputs = ["config"]
"#,
    );
    repo
}

#[test]
fn concurrent_runs_never_apply_twice() {
    let repo = slow_deploy();
    let spawn = || {
        repo.cmd_in(&repo.root, &["run", "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = spawn();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let second = spawn();
    let (a, b) = (Run::from(first.wait_with_output().unwrap()), Run::from(second.wait_with_output().unwrap()));
    let (a, b) = (a.ok(), b.ok());
    assert_eq!(repo.read("applies.log"), "applied\n", "exactly one apply");
    assert_eq!(a.ran(), ["deploy"]);
    assert!(b.ran().is_empty(), "the second run waited, then found the stage fresh");
    assert!(b.stderr.contains("waiting for the run lock, held by `kkpipe run` (pid "), "{}", b.stderr);
}

#[test]
fn a_run_that_cannot_get_the_lock_in_time_names_the_holder() {
    let repo = slow_deploy();
    let first = repo.cmd_in(&repo.root, &["run"]).stdout(std::process::Stdio::null()).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let second = repo.kk(&["run", "--lock-timeout", "0"]);
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success());
    assert_eq!(second.code, 4, "{}", second.all());
    let host = nix_hostname();
    assert!(
        second.stderr.contains(&format!("held by `kkpipe run` (pid {} on {host}", first_pid(&second.stderr))),
        "{}",
        second.stderr
    );
    assert!(second.stderr.contains("--lock-timeout"), "{}", second.stderr);
    assert_eq!(repo.read("applies.log"), "applied\n");
}

fn first_pid(text: &str) -> String {
    text.split("(pid ").nth(1).and_then(|r| r.split(' ').next()).unwrap_or("?").to_string()
}

fn nix_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

#[test]
fn status_why_and_log_work_while_a_run_holds_the_lock() {
    let repo = slow_deploy();
    repo.run(&[]).ok();
    repo.write("config/app.yaml", "replicas: 2\n");
    let run = repo.cmd_in(&repo.root, &["run"]).stdout(std::process::Stdio::null()).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let status = repo.kk(&["status"]).ok();
    assert!(status.stdout.contains("deploy"), "{}", status.stdout);
    repo.kk(&["why", "deploy"]).ok();
    repo.kk(&["log", "deploy"]).ok();
    repo.kk(&["history"]).ok();
    assert!(run.wait_with_output().unwrap().status.success());
}

/// Issue 22, item 5 (variables): a missing secret was found only when the stage that needs it started, after
/// the stages before it had applied. `required_env` is checked before anything starts, for every stage that may
/// run, and all that is missing is named at once (exit 2, nothing run).
#[test]
fn a_missing_required_secret_stops_the_run_before_anything_runs() {
    let mut repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        r#"
[stages.apply]
kind = "deploy"
run = "echo applied >> ../applied.log"
inputs = ["infra.tf"]

[stages.bootstrap]
kind = "deploy"
needs = ["apply"]
run = "test -n \"$TOKEN_GITHUB\" && echo bootstrapped >> ../applied.log"
pass_env = ["TOKEN_GITHUB", "OPTIONAL"]
secret_env = ["DEPLOY_KEY"]
required_env = ["TOKEN_GITHUB", "DEPLOY_KEY"]
"#,
    );
    repo.write("infra.tf", "v1\n");
    let r = repo.kk(&["run"]);
    assert_eq!(r.code, 2, "{}", r.all());
    for needed in ["stage `bootstrap` requires `TOKEN_GITHUB`", "stage `bootstrap` requires `DEPLOY_KEY`"] {
        assert!(r.stderr.contains(needed), "{needed}: {}", r.stderr);
    }
    assert!(!repo.sibling("applied.log").exists(), "nothing was applied before the check");
    repo.set_env("TOKEN_GITHUB", "ghp_x").set_env("DEPLOY_KEY", "");
    let r = repo.kk(&["run"]);
    assert_eq!(r.code, 2, "an empty secret counts as missing: {}", r.all());
    repo.set_env("DEPLOY_KEY", "key-material");
    assert_eq!(repo.run(&[]).ok().ran(), ["apply", "bootstrap"]);
    // Fresh stages need nothing: a run without the token (a `pass_env` value is not keyed) does nothing and
    // succeeds. (An emptied `secret_env` changes the stage's key: it would run, so it would be required.)
    repo.set_env("TOKEN_GITHUB", "");
    assert!(repo.run(&[]).ok().ran().is_empty());
    // Once a change would make bootstrap run again (after apply), the check comes first again.
    repo.write("infra.tf", "v2\n");
    assert_eq!(repo.kk(&["run"]).code, 2);
    assert_eq!(std::fs::read_to_string(repo.sibling("applied.log")).unwrap(), "applied\nbootstrapped\n");
}

#[test]
fn required_env_names_only_variables_the_stage_receives() {
    let repo = Repo::empty();
    repo.write("pipeline.toml", "[stages.s]\nrun = \"true\"\npass_env = [\"A\"]\nrequired_env = [\"A\", \"B\"]\n");
    let r = repo.kk(&["run"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("pipeline.toml") && r.stderr.contains("`B`") && r.stderr.contains("pass_env"),
        "{}",
        r.stderr
    );
}

/// A committed repository on `main` with a check stage and a deploy stage of `config/`.
fn committed_deploy() -> Repo {
    let repo = Repo::empty();
    repo.write("config/app.yaml", "replicas: 1\n").write(
        "pipeline.toml",
        r#"
[stages.lint]
run = ["echo linted >> lints.log"]
inputs = ["config"]

[stages.deploy]
kind = "deploy"
run = ["echo applied >> applies.log"]
inputs = ["config"]
needs = ["lint"]
"#,
    );
    repo.write(".gitignore", ".kkpipe/\n*.log\n");
    git(&repo.root, &["init", "-q"]);
    git(&repo.root, &["add", "-A"]);
    git(&repo.root, &["commit", "-q", "-m", "initial"]);
    repo
}

/// `kkpipe ARGS` as a person at a laptop would run it: no CI variables.
fn local(repo: &Repo, args: &[&str]) -> Run {
    let mut c = repo.cmd_in(&repo.root, args);
    c.env_remove("CI");
    Run::from(c.output().unwrap())
}

#[test]
fn a_local_run_that_would_deploy_without_a_terminal_starts_nothing_unless_yes() {
    let repo = committed_deploy();
    let refused = local(&repo, &["run"]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("would deploy `deploy` to environment `default` (no terminal to ask on)")
            && refused.stderr.contains("--yes"),
        "{}",
        refused.stderr
    );
    assert!(!repo.exists("applies.log") && !repo.exists("lints.log"), "nothing started, not even the check");
    // A run that deploys nothing asks nothing.
    local(&repo, &["run", "lint"]).ok();
    assert_eq!(repo.read("lints.log"), "linted\n");
    local(&repo, &["run", "--yes"]).ok();
    assert_eq!(repo.read("applies.log"), "applied\n");
    // Once deployed with these inputs nothing would deploy: nothing asks.
    local(&repo, &["run"]).ok();
    assert_eq!(repo.read("applies.log"), "applied\n");
}

#[test]
fn a_local_run_asks_on_a_terminal_and_deploys_only_on_yes() {
    let repo = committed_deploy();
    // `script` gives kkpipe a terminal (a pty) and types the answer into it.
    let on_terminal = |answer: &str| {
        let cmd = format!("{} run", env!("CARGO_BIN_EXE_kkpipe"));
        let mut c = std::process::Command::new("script");
        c.args(["-qec", &cmd, "/dev/null"]).current_dir(&repo.root).env_remove("CI");
        let mut child = c.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(answer.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let no = on_terminal("n\n");
    assert!(no.contains("this run may deploy `deploy` to environment `default`. Deploy? [y/N]"), "{no}");
    assert!(no.contains("not confirmed"), "{no}");
    assert!(!repo.exists("applies.log"));
    let yes = on_terminal("y\n");
    assert!(yes.contains("Deploy? [y/N]"), "{yes}");
    assert_eq!(repo.read("applies.log"), "applied\n", "{yes}");
}

#[test]
fn uncommitted_deploy_inputs_are_refused_unless_allow_dirty_and_the_ledger_records_the_dirty_tree() {
    let repo = committed_deploy();
    repo.write("config/app.yaml", "replicas: 2\n");
    let refused = local(&repo, &["run", "--yes"]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("stage `deploy`: `config/app.yaml`"), "{}", refused.stderr);
    assert!(refused.stderr.contains("--allow-dirty"), "{}", refused.stderr);
    assert!(!repo.exists("applies.log"));
    // An untracked file among the inputs is as uncommitted as an edit; a change elsewhere is not the deploy's.
    git(&repo.root, &["commit", "-qam", "two replicas"]);
    repo.write("config/extra.yaml", "x: 1\n").write("notes.txt", "not an input\n");
    let untracked = local(&repo, &["run", "--yes"]);
    assert_eq!(untracked.code, 2, "{}", untracked.stderr);
    assert!(untracked.stderr.contains("`config/extra.yaml`") && !untracked.stderr.contains("notes.txt"));
    let deployed = local(&repo, &["run", "--yes", "--allow-dirty", "--json"]).ok();
    assert_eq!(deployed.ran(), ["lint", "deploy"]);
    let head = git(&repo.root, &["rev-parse", "HEAD"]).trim().to_string();
    let ledger = repo.kk(&["history", "--stage", "deploy", "--json"]).ok().json();
    let record = &ledger[0];
    assert_eq!(record["git_commit"], head.as_str());
    assert_eq!(record["dirty"], true, "{ledger:#}");
    assert_eq!(record["git_branch"], "main");
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    assert!(record["actor"].as_str().unwrap().starts_with(&format!("{user}@")), "{record}");
    let table = repo.kk(&["history", "--stage", "deploy"]).ok().stdout;
    assert!(table.contains(&format!("{}-dirty", &head[..10])), "{table}");
}

#[test]
fn in_ci_nothing_asks_the_pipelines_own_files_are_not_uncommitted_and_the_ledger_names_the_job() {
    let mut repo = committed_deploy();
    for (k, v) in [
        ("GITHUB_ACTIONS", "true"),
        ("GITHUB_EVENT_NAME", "push"),
        ("GITHUB_REF_NAME", "main"),
        ("GITHUB_ACTOR", "octocat"),
        ("GITHUB_SERVER_URL", "https://github.example"),
        ("GITHUB_REPOSITORY", "team/gitops"),
        ("GITHUB_RUN_ID", "4242"),
    ] {
        repo.set_env(k, v);
    }
    // A file an earlier step made (terraform's lock file, say) is no edit of anyone's.
    repo.write("config/.generated", "made by the job\n");
    repo.run(&[]).ok();
    assert_eq!(repo.read("applies.log"), "applied\n");
    let record = &repo.kk(&["history", "--stage", "deploy", "--json"]).ok().json()[0];
    assert_eq!(record["actor"], "octocat", "{record}");
    assert_eq!(record["run_url"], "https://github.example/team/gitops/actions/runs/4242");
    assert_eq!(record["dirty"], false);
    // A tracked file changed under the job is: it is not the commit the push names.
    repo.write("config/app.yaml", "replicas: 5\n");
    let refused = repo.run(&[]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("`config/app.yaml`"), "{}", refused.stderr);
}

/// Review of issue 22 (H1): a deploy that has to run only once the run is under way (its probe found drift)
/// meets the same consent and uncommitted-change checks as one known before: without `--yes` and a terminal it
/// is not started; with uncommitted inputs it needs `--allow-dirty`; a refused run is over, not "running".
#[test]
fn a_deploy_found_drifted_during_a_local_run_is_not_started_without_consent_or_with_uncommitted_inputs() {
    let repo = committed_deploy();
    repo.edit("pipeline.toml", "needs = [\"lint\"]", "needs = [\"lint\"]\nverify = \"test -f applies.log\"");
    git(&repo.root, &["commit", "-qam", "probe"]);
    local(&repo, &["run", "--yes"]).ok();
    std::fs::remove_file(repo.path("applies.log")).unwrap();
    let refused = local(&repo, &["run"]);
    assert_eq!(refused.code, 1, "{}", refused.all());
    assert!(refused.all().contains("has to deploy only now"), "{}", refused.all());
    assert!(!repo.exists("applies.log"), "no consent, no deploy");
    // Consent, but an uncommitted edit of the deploy's own command in pipeline.toml.
    repo.edit("pipeline.toml", "echo applied", "echo applied-uncommitted");
    let dirty = local(&repo, &["run", "--yes"]);
    assert_ne!(dirty.code, 0, "{}", dirty.all());
    assert!(dirty.all().contains("`pipeline.toml`"), "{}", dirty.all());
    assert!(!repo.exists("applies.log"));
    let runs = repo.kk(&["history", "--json"]).ok().json();
    assert!(runs.as_array().unwrap().iter().all(|r| !r["outcome"].is_null()), "no run left running: {runs:#}");
    local(&repo, &["run", "--yes", "--allow-dirty"]).ok();
    assert_eq!(repo.read("applies.log"), "applied-uncommitted\n");
}

/// Second review of issue 22 (N3, N4): an uncommitted input of a check stage a deploy needs (what a build
/// renders is deployed) is refused too; a tracked input the run's own stages rewrote (terraform's lock file) is
/// not an uncommitted edit.
#[test]
fn uncommitted_changes_are_followed_through_needs_but_a_stages_own_writes_are_not_edits() {
    let repo = Repo::empty();
    repo.write("manifests/app.yaml", "replicas: 1\n").write("tf/lock.hcl", "hashes: darwin\n").write(
        "pipeline.toml",
        r#"
[stages.render]
run = ["mkdir -p out && cp manifests/app.yaml out/rendered.yaml", "echo 'hashes: darwin linux' > tf/lock.hcl"]
inputs = ["manifests"]
outputs = ["out/rendered.yaml"]

[stages.apply]
kind = "deploy"
run = ["cat out/rendered.yaml >> live.log"]
inputs = ["tf"]
needs = ["render"]
"#,
    );
    repo.write(".gitignore", ".kkpipe/\nout/\nlive.log\n");
    git(&repo.root, &["init", "-q"]);
    git(&repo.root, &["add", "-A"]);
    git(&repo.root, &["commit", "-q", "-m", "initial"]);
    // The lock file `render` rewrites (as `terraform init` adds a platform's hash) is the run's own doing.
    repo.run(&[]).ok();
    assert_eq!(repo.read("live.log"), "replicas: 1\n");
    git(&repo.root, &["checkout", "tf/lock.hcl"]);
    repo.write("manifests/app.yaml", "replicas: 99\n");
    let r = repo.run(&[]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("stage `apply`: `manifests/app.yaml`"), "{}", r.stderr);
    assert_eq!(repo.read("live.log"), "replicas: 1\n");
}
