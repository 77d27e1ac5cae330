//! The core engine: make-like runs, content keys, the cache, early cutoff, failures, bad input.

use crate::harness::*;
use std::path::PathBuf;

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn second_run_executes_nothing_and_says_fresh() {
    let repo = Repo::fixture("tiny");
    let first = repo.run(&[]).ok();
    assert_eq!(sorted(first.ran()), ["apply", "docs", "lint", "plan"]);
    assert_eq!(repo.read("out/applied.txt"), repo.read("out/plan.txt"));

    let second = repo.kk(&["run"]).ok();
    assert!(second.stdout.contains("0 ran, 4 fresh"), "{}", second.stdout);
    assert!(!second.stdout.contains("Running"), "{}", second.stdout);
}

#[test]
fn editing_one_file_reruns_exactly_its_stages_and_status_names_it() {
    let repo = Repo::fixture("tiny");
    repo.run(&[]).ok();
    repo.edit("terraform/vars.tfvars", "tiny", "small");

    let status = repo.kk(&["status"]).ok();
    let line = |name: &str| status.stdout.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_string();
    assert!(line("plan ").ends_with("stale: input `terraform/vars.tfvars` modified"), "{}", status.stdout);
    assert!(line("lint ").contains("fresh"), "{}", status.stdout);

    let r = repo.run(&[]).ok();
    assert_eq!(r.ran(), ["plan", "apply"]);
    assert_eq!(sorted(r.with_state("fresh")), ["docs", "lint"]);
    assert_eq!(r.reason_of("apply")["kind"], "upstream-outputs-changed");
    assert_eq!(r.reason_of("apply")["stage"], "plan");
}

#[test]
fn touching_every_file_reruns_nothing() {
    let repo = Repo::fixture("tiny");
    repo.run(&[]).ok();
    repo.touch_all(5);
    let r = repo.run(&[]).ok();
    assert!(r.ran().is_empty(), "{}", r.stderr);
}

/// Hashing reads every file of a fresh checkout without writing their access times back (a tenth of the work
/// of hashing small files; docs/performance.md). Big files (8 MiB and more) are memory-mapped through a second
/// open, which sets theirs once.
#[test]
fn hashing_writes_no_access_times_to_small_files() {
    let repo = Repo::fixture("tiny");
    let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
    let files: Vec<PathBuf> = ["terraform/main.tf", "terraform/vars.tfvars", "docs/README.md"]
        .iter()
        .map(|f| repo.path(f))
        .chain([repo.path("control.txt")])
        .collect();
    repo.write("control.txt", "read by cat, not by kkpipe\n");
    let accessed = |f: &PathBuf| std::fs::metadata(f).unwrap().accessed().unwrap();
    for f in &files {
        let file = std::fs::File::options().write(true).open(f).unwrap();
        file.set_times(std::fs::FileTimes::new().set_accessed(old)).unwrap();
    }
    // The control: on this filesystem, a plain read of a file whose access time is older than its change does
    // update it (relatime).
    let control = &files[3];
    assert!(std::process::Command::new("cat").arg(control).output().unwrap().status.success());
    if accessed(control) == old {
        eprintln!("this filesystem does not update access times on read: nothing to compare");
        return;
    }
    repo.kk(&["status"]).ok();
    for f in &files[..3] {
        assert_eq!(accessed(f), old, "{} was hashed and its access time moved", f.display());
    }
}

#[test]
fn a_copied_repository_keeps_every_hit() {
    let repo = Repo::fixture("tiny");
    repo.run(&[]).ok();
    let copy = repo.sibling("elsewhere/deeper");
    copy_tree(&repo.root, &copy);
    let r = Run::from(repo.cmd_in(&copy, &["run", "--json"]).output().unwrap()).ok();
    assert!(r.ran().is_empty(), "{}", r.stderr);
    assert_eq!(r.with_state("fresh").len(), 4);
}

#[test]
fn a_git_clone_with_the_cache_copied_in_keeps_every_hit() {
    let repo = Repo::fixture("tiny");
    let git = |dir: &std::path::Path, args: &[&str]| {
        let st = std::process::Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(st.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&st.stderr));
    };
    git(&repo.root, &["init", "-q", "-b", "main"]);
    git(&repo.root, &["add", "-A"]);
    git(&repo.root, &["commit", "-q", "-m", "fixture"]);
    repo.run(&[]).ok();
    let clone = repo.sibling("clone");
    git(repo.root.parent().unwrap(), &["clone", "-q", repo.root.to_str().unwrap(), clone.to_str().unwrap()]);
    copy_tree(&repo.path(".kkpipe"), &clone.join(".kkpipe"));
    let r = Run::from(repo.cmd_in(&clone, &["run", "--json"]).output().unwrap()).ok();
    assert!(r.ran().is_empty(), "{}", r.stderr);
    // Outputs are not in git: they came back from the store.
    assert_eq!(sorted(r.with_state("restored")), ["apply", "docs", "plan"]);
    assert_eq!(std::fs::read_to_string(clone.join("out/applied.txt")).unwrap(), repo.read("out/applied.txt"));
}

#[test]
fn command_and_keyed_env_changes_rerun_with_that_reason_but_pass_env_does_not() {
    let mut repo = Repo::fixture("tiny");
    repo.edit("pipeline.toml", "[stages.docs]\n", "[stages.docs]\npass_env = [\"DOCS_TOKEN\"]\n");
    repo.set_env("DOCS_TOKEN", "first");
    repo.run(&[]).ok();

    repo.set_env("DOCS_TOKEN", "second");
    assert!(repo.run(&[]).ok().ran().is_empty());

    repo.edit("pipeline.toml", "echo applied", "echo applied again");
    let r = repo.run(&[]).ok();
    assert_eq!(r.ran(), ["apply"]);
    assert_eq!(r.reason_of("apply")["kind"], "command-changed");

    repo.edit("pipeline.toml", "MODE = \"test\"", "MODE = \"prod\"");
    let r = repo.run(&[]).ok();
    // Global env enters every stage's key.
    assert_eq!(sorted(r.ran()), ["apply", "docs", "lint", "plan"]);
    assert_eq!(r.reason_of("lint")["kind"], "env-changed");
    assert_eq!(r.reason_of("lint")["name"], "MODE");
}

#[test]
fn early_cutoff_keeps_dependents_fresh_when_outputs_are_identical() {
    let repo = Repo::fixture("tiny");
    repo.run(&[]).ok();
    repo.edit("terraform/main.tf", "# the demo resource", "# the demo resource, now commented differently");
    let r = repo.run(&[]).ok();
    assert_eq!(r.ran(), ["lint", "plan"]);
    assert_eq!(r.with_state("fresh"), ["apply", "docs"]);
}

#[test]
fn a_failing_stage_stops_its_dependents_but_not_independent_stages() {
    let repo = Repo::fixture("tiny");
    repo.run(&[]).ok();
    repo.edit("terraform/main.tf", "resource \"terraform_data\"", "resourse \"terraform_data\"");
    repo.write("docs/more.md", "another\n");
    let r = repo.run(&[]);
    assert_eq!(r.code, 1);
    assert_eq!(r.with_state("failed"), ["lint"]);
    assert_eq!(r.with_state("skipped"), ["plan", "apply"]);
    assert_eq!(r.ran(), ["docs"]);
    assert_eq!(repo.state_of("lint"), "failed");

    // The failure is recorded, never as a success: the next run tries again.
    let again = repo.run(&[]);
    assert_eq!(again.code, 1);
    assert_eq!(again.reason_of("lint")["kind"], "last-run-failed");

    repo.edit("terraform/main.tf", "resourse \"terraform_data\" \"cluster\"", "resource \"terraform_data\" \"fixed\"");
    let fixed = repo.run(&[]).ok();
    assert_eq!(fixed.ran(), ["lint", "plan", "apply"]);
    assert_eq!(fixed.with_state("fresh"), ["docs"]);
}

#[test]
fn fail_fast_starts_nothing_after_the_first_failure() {
    let repo = Repo::fixture("tiny");
    repo.edit("terraform/main.tf", "resource \"terraform_data\"", "resourse \"terraform_data\"");
    let r = repo.run(&["--fail-fast", "-j", "1"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.with_state("failed"), ["lint"]);
    assert!(r.ran().is_empty(), "{}", r.stdout);
}

#[test]
fn running_a_target_runs_it_and_its_needs_only() {
    let repo = Repo::fixture("tiny");
    let r = repo.run(&["plan"]).ok();
    assert_eq!(r.ran(), ["lint", "plan"]);
    assert!(!repo.exists("out/applied.txt"));
    assert!(!repo.exists("docs-lines.txt"));
    let status = repo.status_json();
    let states: Vec<(String, String)> = status["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap().to_string(), s["state"].as_str().unwrap().to_string()))
        .collect();
    assert!(states.contains(&("apply".into(), "never-run".into())), "{states:?}");
}

#[test]
fn dry_run_says_what_would_run_and_runs_nothing() {
    let repo = Repo::fixture("tiny");
    let r = repo.kk(&["run", "--dry-run"]).ok();
    assert!(r.stdout.contains("Would run") || r.stdout.contains("would run"), "{}", r.stdout);
    assert!(r.stdout.contains("never run"), "{}", r.stdout);
    assert!(!repo.exists("out/plan.txt"));
    repo.run(&[]).ok();
    repo.edit("docs/README.md", "A fixture.", "A fixture, edited.");
    let dry = repo.kk(&["run", "--dry-run", "--json"]).ok();
    assert_eq!(dry.with_state("would-run"), ["docs"]);
    assert_eq!(dry.reason_of("docs")["path"], "docs/README.md");
    assert_eq!(repo.read("docs-lines.txt").trim(), "2");
}

#[test]
fn force_reruns_fresh_stages() {
    let repo = Repo::fixture("tiny");
    repo.run(&[]).ok();
    let r = repo.run(&["--force", "plan"]).ok();
    assert_eq!(r.ran(), ["plan"]);
    assert_eq!(r.reason_of("plan")["kind"], "forced");
    assert_eq!(r.with_state("fresh"), ["lint"]);
    let all = repo.run(&["--force"]).ok();
    assert_eq!(all.ran().len(), 4);
}

#[test]
fn jobs_bound_how_many_stages_run_at_once() {
    // Each stage waits for the other to have started: only possible when both run concurrently.
    let repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        r#"
[stages.left]
run = "touch started-left; for i in $(seq 50); do [ -e started-right ] && exit 0; sleep 0.1; done; exit 1"
[stages.right]
run = "touch started-right; for i in $(seq 50); do [ -e started-left ] && exit 0; sleep 0.1; done; exit 1"
"#,
    );
    let together = repo.run(&["-j", "2"]).ok();
    assert_eq!(sorted(together.ran()), ["left", "right"]);
    std::fs::remove_file(repo.path("started-left")).unwrap();
    std::fs::remove_file(repo.path("started-right")).unwrap();
    let one_at_a_time = repo.run(&["-j", "1", "--force"]);
    assert_eq!(one_at_a_time.code, 1, "with -j 1 the first stage must wait alone");
}

#[test]
fn stage_output_is_prefixed_and_kept_as_the_log() {
    let repo = Repo::fixture("tiny");
    let r = repo.kk(&["run", "plan"]).ok();
    assert!(r.stdout.lines().any(|l| l.starts_with("plan") && l.ends_with("| planned in test mode")), "{}", r.stdout);
}

#[test]
fn only_listed_variables_reach_a_stage() {
    let mut repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        "[stages.env]\nrun = \"env | cut -d= -f1 | sort > seen.txt\"\npass_env = [\"PASSED\"]\noutputs = [\"seen.txt\"]\n",
    );
    repo.set_env("PASSED", "1").set_env("LEAKED", "1");
    repo.run(&[]).ok();
    let seen = repo.read("seen.txt");
    assert!(seen.lines().any(|l| l == "PASSED"), "{seen}");
    assert!(!seen.lines().any(|l| l == "LEAKED"), "{seen}");
    assert!(seen.lines().any(|l| l == "PATH"), "{seen}");
}

#[test]
fn operates_on_another_directory_with_dash_c_and_finds_the_root_from_below() {
    let repo = Repo::fixture("tiny");
    let outside = repo.sibling("");
    let r = Run::from(
        repo.cmd_in(&outside, &["-C", repo.root.to_str().unwrap(), "run", "--json", "lint"]).output().unwrap(),
    )
    .ok();
    assert_eq!(r.ran(), ["lint"]);
    let below = Run::from(repo.cmd_in(&repo.path("terraform"), &["status", "--json"]).output().unwrap()).ok();
    assert_eq!(below.json()["stages"].as_array().unwrap().len(), 4);
}

#[test]
fn a_stage_that_does_not_create_its_declared_output_fails() {
    let repo = Repo::empty();
    repo.write("pipeline.toml", "[stages.lazy]\nrun = \"true\"\noutputs = [\"never/written.txt\"]\n");
    let r = repo.run(&[]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("declared output `never/written.txt` was not created"), "{}", r.stderr);
    assert_eq!(repo.state_of("lazy"), "failed");
}

#[test]
fn the_cache_is_git_ignored_from_the_inside() {
    let repo = Repo::fixture("tiny");
    repo.run(&["lint"]).ok();
    assert_eq!(repo.read(".kkpipe/.gitignore").lines().last(), Some("*"));
}

// ------------------------------------------------------------------ bad input

/// Run `kkpipe run` on a broken pipeline: exit 2, the message contains every `needle`, the cache is untouched.
fn rejects(pipeline: &str, needles: &[&str]) {
    let repo = Repo::fixture("tiny");
    repo.run(&["lint"]).ok();
    let before = repo.db_bytes();
    repo.write("pipeline.toml", pipeline);
    let r = repo.kk(&["run"]);
    assert_eq!(r.code, 2, "{}", r.all());
    for n in needles {
        assert!(r.stderr.contains(n), "missing `{n}` in:\n{}", r.stderr);
    }
    assert_eq!(repo.db_bytes(), before, "the cache database changed");
    assert!(!repo.exists("out/plan.txt"), "nothing may run");
}

#[test]
fn syntax_errors_name_file_line_and_column() {
    rejects("[stages.a]\nrun = \"true\"\n\n[stages.b\nrun = \"x\"\n", &["pipeline.toml:4:", "error:"]);
}

#[test]
fn unknown_keys_name_the_key_and_stage() {
    rejects(
        "[stages.a]\nrun = \"true\"\ninput = [\"x\"]\n",
        &["pipeline.toml:3:", "unknown key `input` (did you mean `inputs`?)", "stage `a`"],
    );
}

#[test]
fn wrong_types_are_rejected() {
    rejects(
        "[stages.a]\nrun = 5\n",
        &["pipeline.toml:2:", "`run` and `verify` are each a string or a list of strings"],
    );
    rejects("[stages.a]\nrun = \"true\"\nneeds = \"b\"\n", &["pipeline.toml:3:", "stage `a`"]);
    // A plan policy names known actions, valid patterns, and a plan to check.
    let plan = "[stages.p]\nrun = \"true\"\noutputs = [\"p.tfplan\"]\n";
    rejects(
        &format!("{plan}plan_policy = {{ deny = [\"destroy\"] }}\n"),
        &["stage `p`, key `plan_policy.deny`", "unknown action `destroy`; known: create, update, delete"],
    );
    rejects(
        "[stages.p]\nkind = \"deploy\"\nrun = \"true\"\noutputs = [\"p.tfplan\"]\nplan_policy = {}\n",
        &["key `plan_policy`", "a deploy stage would apply before its own plan is checked"],
    );
    rejects("[stages.p]\nrun = \"true\"\nplan_policy = {}\n", &["key `plan_policy`", "declares no `*.tfplan` output"]);
}

#[test]
fn unknown_needs_and_cycles_are_named() {
    rejects(
        "[stages.a]\nrun = \"true\"\nneeds = [\"lnit\"]\n[stages.lint]\nrun = \"true\"\n",
        &["pipeline.toml:3:", "stage `a`", "unknown stage `lnit`", "did you mean `lint`"],
    );
    rejects(
        "[stages.a]\nrun = \"true\"\nneeds = [\"b\"]\n[stages.b]\nrun = \"true\"\nneeds = [\"a\"]\n",
        &["pipeline.toml:1: dependency cycle: a -> b -> a"],
    );
}

#[test]
fn invalid_globs_outputs_and_dirs_are_rejected() {
    rejects(
        "[stages.a]\nrun = \"true\"\ninputs = [\"terraform/[main.tf\"]\n",
        &["stage `a`", "invalid glob `terraform/[main.tf`"],
    );
    rejects("[stages.a]\nrun = \"true\"\noutputs = [\"../outside\"]\n", &["stage `a`", "`../outside` contains `..`"]);
    rejects("[stages.a]\nrun = \"true\"\noutputs = [\"/etc/x\"]\n", &["stage `a`", "is absolute"]);
    rejects(
        "[stages.a]\nrun = \"true\"\noutputs = [\"out/x\"]\n[stages.b]\nrun = \"true\"\noutputs = [\"out\"]\n",
        &["stage `b`", "also claimed by stage `a`"],
    );
    rejects(
        "[stages.a]\nrun = \"true\"\ndir = \"no/such/dir\"\n",
        &["stage `a`", "directory `no/such/dir` does not exist"],
    );
}

#[test]
fn a_stage_whose_needs_do_not_run_on_its_event_is_rejected() {
    rejects(
        "[stages.apply]\nrun = \"true\"\non = [\"push\"]\n[stages.preview]\nrun = \"true\"\non = [\"pull_request\"]\nneeds = [\"apply\"]\n",
        &["stage `preview`", "runs on `pull_request` but needs `apply`, which does not"],
    );
    rejects(
        "[stages.apply]\nrun = \"true\"\non = [\"push\"]\n[stages.notify]\nrun = \"true\"\non = [\"push\"]\nbranches = [\"release\"]\nneeds = [\"apply\"]\n",
        &["stage `notify`", "push to `release`"],
    );
}

#[test]
fn a_glob_that_matches_nothing_is_a_warning_not_an_error() {
    let repo = Repo::fixture("tiny");
    repo.edit("pipeline.toml", "inputs = [\"docs/*.md\"]", "inputs = [\"docs/*.md\", \"docs/*.rst\"]");
    let r = repo.kk(&["run"]).ok();
    assert!(r.stderr.contains("warning: stage `docs`: input pattern `docs/*.rst` matches no file"), "{}", r.stderr);
}

#[test]
fn a_missing_pipeline_says_where_it_looked() {
    let repo = Repo::empty();
    let r = repo.kk(&["status"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("no `pipeline.toml` found in"), "{}", r.stderr);
    assert!(r.stderr.contains(repo.root.to_str().unwrap()), "{}", r.stderr);
    assert!(!repo.exists(".kkpipe"), "no cache is created for a missing pipeline");
}

#[test]
fn a_corrupt_cache_is_reported_with_the_way_out() {
    let repo = Repo::fixture("tiny");
    repo.run(&[]).ok();
    std::fs::write(repo.path(".kkpipe/cache.db"), b"this is not a database, it is a test of the error path").unwrap();
    let _ = std::fs::remove_file(repo.path(".kkpipe/cache.db-wal"));
    let _ = std::fs::remove_file(repo.path(".kkpipe/cache.db-shm"));
    let r = repo.kk(&["run"]);
    assert_eq!(r.code, 3, "{}", r.all());
    assert!(r.stderr.contains("corrupt") && r.stderr.contains("kkpipe cache reset"), "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    repo.kk(&["cache", "reset"]).ok();
    let after = repo.run(&[]).ok();
    // A reset cache knows nothing: everything runs again, outputs are rewritten.
    assert_eq!(after.ran().len(), 4);
}

#[test]
fn a_cache_from_a_newer_kkpipe_is_refused_untouched() {
    let repo = Repo::fixture("tiny");
    repo.run(&["lint"]).ok();
    let db = repo.path(".kkpipe/cache.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("PRAGMA user_version = 99").unwrap();
    drop(conn);
    let before = repo.db_bytes();
    let r = repo.kk(&["run"]);
    assert_eq!(r.code, 3);
    assert!(r.stderr.contains("newer kkpipe (schema 99"), "{}", r.stderr);
    assert_eq!(repo.db_bytes(), before);
}

// ------------------------------------------------------------------ the realistic KKP fixture

#[test]
fn the_kkp_repository_runs_with_real_terraform_and_then_is_fresh() {
    let repo = Repo::kkp_demo();
    let first = repo.run(&[]).ok();
    assert_eq!(first.ran().len(), 9, "{}", first.stderr);
    assert!(repo.exists("terraform/aws/terraform.tfstate"), "terraform really applied");
    assert!(repo.read("terraform/aws/output.json").contains("kubeone_hosts"));
    assert!(repo.exists("flux/clusters/master/flux-system/gotk-sync.yaml"));
    let second = repo.run(&[]).ok();
    assert!(second.ran().is_empty(), "{}", second.stderr);
    assert_eq!(second.with_state("fresh").len(), 9);
}

#[test]
fn a_file_rewritten_within_the_same_second_with_the_same_size_is_still_detected() {
    let repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        "[stages.s]\nrun = \"cat in.txt > out.txt\"\ninputs = [\"in.txt\"]\noutputs = [\"out.txt\"]\n",
    );
    repo.write("in.txt", "aaaa");
    let mtime = std::fs::metadata(repo.path("in.txt")).unwrap().modified().unwrap();
    repo.run(&[]).ok();
    // Same size, and the very same mtime: only the content tells the files apart.
    repo.write("in.txt", "bbbb");
    std::fs::File::options().write(true).open(repo.path("in.txt")).unwrap().set_modified(mtime).unwrap();
    let r = repo.run(&[]).ok();
    assert_eq!(r.ran(), ["s"]);
    assert_eq!(repo.read("out.txt"), "bbbb");
}

#[test]
fn replay_prints_the_stored_log_of_fresh_stages() {
    let repo = Repo::fixture("tiny");
    repo.run(&[]).ok();
    let quiet = repo.kk(&["run"]).ok();
    assert!(!quiet.stdout.contains("planned in test mode"), "{}", quiet.stdout);
    let replayed = repo.kk(&["run", "--replay"]).ok();
    assert!(replayed.stdout.contains("plan  | planned in test mode"), "{}", replayed.stdout);
    assert!(replayed.stdout.contains("0 ran, 4 fresh"), "{}", replayed.stdout);
}

/// The stat cache vouches for file contents, so a damaged one must never be trusted entry by entry: a flipped
/// bit in a stored hash would make a fresh stage look stale (or, made to order, a stale one look fresh).
#[test]
fn a_damaged_stat_cache_is_dropped_whole_and_every_file_hashed_again() {
    let repo = Repo::empty();
    repo.write("pipeline.toml", "[stages.s]\nrun = \"true\"\ninputs = [\"in.txt\"]\n");
    repo.write("in.txt", "content");
    // Past git's racy window, so the file's digest is recorded.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    repo.run(&[]).ok();
    let vouched = repo.kk(&["-v", "status"]).ok();
    assert!(vouched.stderr.contains("hashed 0 files"), "{}", vouched.stderr);

    let path = repo.path(".kkpipe/stat-cache");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.windows(6).position(|w| w == b"in.txt").expect("an entry for in.txt") + 6;
    bytes[at + 32] ^= 0xff; // the first byte of its stored hash, after size, mtime, ctime and inode
    std::fs::write(&path, &bytes).unwrap();

    let after = repo.kk(&["-v", "status"]).ok();
    assert!(after.stderr.contains("hashed 1 files"), "{}", after.stderr);
    assert_eq!(repo.state_of("s"), "fresh");
}

/// After a stage runs, the next stages' trees are walked again; each stage must still see exactly its own
/// inputs (a walk again repeats the starts of the first walk), and the run after is a no-op.
#[test]
fn a_chain_of_one_file_stages_records_each_file_and_is_fresh_on_the_next_run() {
    let repo = Repo::empty();
    let mut toml = String::new();
    for i in 0..30 {
        let need = if i > 0 { format!("needs = [\"s{}\"]\n", i - 1) } else { String::new() };
        toml.push_str(&format!("[stages.s{i}]\nrun = \"true\"\ninputs = [\"src/d{}/f{i}.txt\"]\n{need}\n", i % 3));
        repo.write(&format!("src/d{}/f{i}.txt", i % 3), &format!("file {i}"));
    }
    repo.write("pipeline.toml", &toml);
    let first = repo.run(&[]).ok();
    assert!(!first.stderr.contains("matches no file"), "{}", first.stderr);
    assert_eq!(first.ran().len(), 30);
    for i in 0..30 {
        assert_eq!(repo.input_paths(&format!("s{i}")), [format!("src/d{}/f{i}.txt", i % 3)]);
    }
    assert_eq!(repo.run(&[]).ok().ran(), Vec::<String>::new());
}
