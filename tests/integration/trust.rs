//! Cache trust: what a stage reads is what is keyed, whichever stages are selected, whatever the checkout.

use crate::harness::*;
use std::os::unix::fs::PermissionsExt;

/// A nested project's `.kkpipe/` and `.git/` (at any depth) are never inputs: their churn reruns nothing.
#[test]
fn a_nested_projects_kkpipe_and_git_are_never_inputs() {
    let repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        "[stages.s]\nrun = \"ls -R vendor > listing.txt\"\ninputs = [\"vendor\"]\noutputs = [\"listing.txt\"]\n",
    );
    repo.write("vendor/lib/code.tf", "v1\n");
    repo.write("vendor/lib/.git/HEAD", "ref: refs/heads/main\n");
    repo.write("vendor/lib/.kkpipe/cache.db", "x");
    repo.write("vendor/deeper/sub/.git", "gitdir: ../../.git/modules/sub\n");
    repo.run(&[]).ok();
    assert_eq!(repo.input_paths("s"), ["vendor/lib/code.tf"]);
    repo.write("vendor/lib/.git/HEAD", "ref: refs/heads/other\n");
    repo.write("vendor/lib/.kkpipe/cache.db", "y");
    repo.write("vendor/deeper/sub/.git", "gitdir: elsewhere\n");
    assert!(repo.run(&[]).ok().ran().is_empty());
    repo.write("vendor/lib/code.tf", "v2\n");
    assert_eq!(repo.run(&[]).ok().ran(), ["s"]);
}

/// A tool is the file that runs: found on the stage's own PATH when its `env` sets one, and keyed by the
/// content of a symlink's target (alternatives, Homebrew, Debian's python3).
#[test]
fn tools_are_resolved_on_the_stages_own_path_and_followed_through_symlinks() {
    let repo = Repo::empty();
    let root = repo.root.to_str().unwrap().to_string();
    repo.write(
        "pipeline.toml",
        &format!(
            "[stages.s]\nrun = \"mytool > out.txt\"\noutputs = [\"out.txt\"]\ntools = [\"mytool\"]\nenv = {{ PATH = \"{root}/bin:/usr/bin:/bin\" }}\n"
        ),
    );
    for (name, text) in [("v1", "one"), ("v2", "two"), ("v1-copy", "one")] {
        repo.write(&format!("tools/{name}"), &format!("#!/bin/sh\necho {text}\n"));
        std::fs::set_permissions(repo.path(&format!("tools/{name}")), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::create_dir_all(repo.path("bin")).unwrap();
    std::os::unix::fs::symlink("../tools/v1", repo.path("bin/mytool")).unwrap();
    // Not on the caller's PATH at all: only the stage's PATH has it.
    assert_eq!(repo.run(&[]).ok().ran(), ["s"]);
    assert_eq!(repo.read("out.txt"), "one\n");
    // Retargeted to a file with the same content: the same tool.
    std::fs::remove_file(repo.path("bin/mytool")).unwrap();
    std::os::unix::fs::symlink("../tools/v1-copy", repo.path("bin/mytool")).unwrap();
    assert!(repo.run(&[]).ok().ran().is_empty());
    // Retargeted to another program: the tool changed.
    std::fs::remove_file(repo.path("bin/mytool")).unwrap();
    std::os::unix::fs::symlink("../tools/v2", repo.path("bin/mytool")).unwrap();
    let r = repo.run(&[]).ok();
    assert_eq!(r.ran(), ["s"]);
    assert_eq!(r.reason_of("s")["kind"], "tool-changed");
    assert_eq!(repo.read("out.txt"), "two\n");
}

/// The deployment environment reaches stages as `KKPIPE_ENV`.
#[test]
fn stages_see_the_deployment_environment_as_kkpipe_env() {
    let repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        "[stages.d]\nkind = \"deploy\"\nrun = \"echo \\\"$KKPIPE_ENV\\\" > env.txt\"\noutputs = [\"env.txt\"]\n",
    );
    repo.run(&["--env", "staging"]).ok();
    assert_eq!(repo.read("env.txt"), "staging\n");
    repo.run(&["--env", "production"]).ok();
    assert_eq!(repo.read("env.txt"), "production\n");
}

/// An unknown state in the database is an error naming its row (exit 3), never silently another state.
#[test]
fn an_unknown_stage_run_state_in_the_database_is_an_error_naming_the_row() {
    let repo = Repo::fixture("tiny");
    repo.run(&[]).ok();
    let conn = rusqlite::Connection::open(repo.path(".kkpipe/cache.db")).unwrap();
    let id: i64 = conn.query_row("SELECT id FROM stage_runs WHERE stage = 'lint'", [], |r| r.get(0)).unwrap();
    conn.execute("UPDATE stage_runs SET state = 'sucess' WHERE id = ?1", [id]).unwrap();
    drop(conn);
    let r = repo.kk(&["status"]);
    assert_eq!(r.code, 3, "{}", r.all());
    assert!(r.stderr.contains(&format!("stage_runs row {id}: state `sucess`")), "{}", r.stderr);
    assert!(r.stderr.contains("kkpipe cache reset"), "{}", r.stderr);
}

/// A recorded reason this kkpipe cannot decode is shown as such, not dropped.
#[test]
fn an_undecodable_recorded_reason_is_shown_as_such() {
    let repo = Repo::fixture("tiny");
    repo.run(&[]).ok();
    let conn = rusqlite::Connection::open(repo.path(".kkpipe/cache.db")).unwrap();
    conn.execute("UPDATE stage_runs SET reason = '{\"kind\":\"from-the-future\",\"v\":9}' WHERE stage = 'lint'", [])
        .unwrap();
    drop(conn);
    let text = repo.kk(&["history", "--stage", "lint"]).ok().stdout;
    assert!(text.contains("cannot read: {\"kind\":\"from-the-future\",\"v\":9}"), "{text}");
    let json = repo.kk(&["history", "--stage", "lint", "--json"]).ok().json();
    assert_eq!(json[0]["reason"]["kind"], "unreadable");
}

/// The inputs `why --json` lists for a stage, as `path -> blake3 or link text`.
fn keyed_inputs(repo: &Repo, stage: &str) -> Vec<(String, String)> {
    repo.inputs_of(stage)
        .iter()
        .map(|f| {
            let what = f["blake3"].as_str().or(f["symlink"].as_str()).unwrap_or_default();
            (f["path"].as_str().unwrap().to_string(), what.to_string())
        })
        .collect()
}

/// Item 3: with `link` (a symlink to a directory) walked whole for one stage, another stage's
/// `link/sub/**` still finds its files, so its edits are seen whichever stages are selected.
#[test]
fn a_walk_start_below_a_symlinked_directory_is_seen_whatever_else_is_selected() {
    let repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        "[stages.deep]\nrun = \"cat link/sub/f.txt > deep.out\"\ninputs = [\"link/sub/**\"]\noutputs = [\"deep.out\"]\n\
         [stages.whole]\nrun = \"ls -R link/ > whole.out\"\ninputs = [\"link\"]\noutputs = [\"whole.out\"]\n",
    );
    repo.write("real/sub/f.txt", "v1\n");
    std::os::unix::fs::symlink("real", repo.path("link")).unwrap();
    repo.run(&[]).ok();
    let alone = keyed_inputs(&repo, "deep");
    assert_eq!(alone.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), ["link/sub/f.txt"]);
    repo.write("real/sub/f.txt", "v2\n");
    let r = repo.run(&[]).ok();
    assert_eq!(r.ran(), ["deep", "whole"]);
    assert_eq!(r.reason_of("deep")["path"], "link/sub/f.txt");
    assert_eq!(repo.read("deep.out"), "v2\n");
    // Alone, the same inputs: the key does not depend on the selection.
    repo.write("real/sub/f.txt", "v3\n");
    assert_eq!(repo.run(&["deep"]).ok().ran(), ["deep"]);
    assert!(repo.run(&[]).ok().ran() == ["whole"], "only `whole` was left to rerun");
}

/// A bare input that is a link out of the repository (`vendor`, given as `inputs = ["vendor"]`, becomes
/// `vendor/**` because it leads to a directory): the stage reads through it, so its link text is keyed, and
/// pointing it elsewhere reruns the stage.
#[test]
fn a_bare_input_that_links_out_of_the_repository_is_keyed_by_its_link_text() {
    let repo = Repo::empty();
    let (one, two) = (repo.sibling("vendor-1"), repo.sibling("vendor-2"));
    for d in [&one, &two] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("lib.txt"), "outside").unwrap();
    }
    std::os::unix::fs::symlink(&one, repo.path("vendor")).unwrap();
    repo.write("pipeline.toml", "[stages.s]\nrun = \"true\"\ninputs = [\"vendor\"]\n");
    repo.run(&[]).ok();
    assert!(keyed_inputs(&repo, "s").contains(&("vendor".into(), one.display().to_string())));
    assert!(repo.run(&[]).ok().ran().is_empty());
    std::fs::remove_file(repo.path("vendor")).unwrap();
    std::os::unix::fs::symlink(&two, repo.path("vendor")).unwrap();
    let r = repo.run(&[]).ok();
    assert_eq!(r.ran(), ["s"]);
    assert_eq!(r.reason_of("s")["path"], "vendor");
}

/// Item 4: a link inside the repository is keyed by what it points to (file or directory); a link out of
/// the repository keeps its link text and gets one warning; a dangling link is a state of its own; loops are
/// not followed.
#[test]
fn in_repo_symlinks_are_keyed_by_their_target() {
    let repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        "[stages.s]\nrun = \"cat in/*.txt in/dir/* > s.out || true\"\ninputs = [\"in\"]\noutputs = [\"s.out\"]\n",
    );
    repo.write("targets/a.txt", "A1\n");
    repo.write("targets/d/x", "X1\n");
    let outside = repo.sibling("outside.txt");
    std::fs::write(&outside, "O1").unwrap();
    std::fs::create_dir_all(repo.path("in")).unwrap();
    std::os::unix::fs::symlink("../targets/a.txt", repo.path("in/file.txt")).unwrap();
    std::os::unix::fs::symlink("../targets/d", repo.path("in/dir")).unwrap();
    std::os::unix::fs::symlink(&outside, repo.path("in/out.txt")).unwrap();
    std::os::unix::fs::symlink("../targets/missing.txt", repo.path("in/dangling.txt")).unwrap();
    std::os::unix::fs::symlink(".", repo.path("in/self")).unwrap();
    let first = repo.run(&[]).ok();
    let warned = |r: &Run, what: &str| r.stderr.lines().filter(|l| l.contains("warning") && l.contains(what)).count();
    assert_eq!(warned(&first, "`in/out.txt` links out of the repository"), 1, "{}", first.stderr);
    assert_eq!(warned(&first, "`in/self`"), 1, "{}", first.stderr);
    let inputs = keyed_inputs(&repo, "s");
    let blake = |s: &str| blake3::hash(s.as_bytes()).to_hex().to_string();
    assert!(inputs.contains(&("in/file.txt".into(), blake("A1\n"))), "{inputs:?}");
    assert!(inputs.contains(&("in/dir/x".into(), blake("X1\n"))), "{inputs:?}");
    assert!(inputs.contains(&("in/out.txt".into(), outside.display().to_string())), "{inputs:?}");
    assert!(inputs.contains(&("in/dangling.txt".into(), "../targets/missing.txt".into())), "{inputs:?}");
    assert!(inputs.contains(&("in/self".into(), ".".into())), "{inputs:?}");
    // Editing a target the stage reads through a link reruns it.
    repo.write("targets/a.txt", "A2\n");
    let r = repo.run(&[]).ok();
    assert_eq!(r.reason_of("s")["path"], "in/file.txt");
    repo.write("targets/d/x", "X2\n");
    assert_eq!(repo.run(&[]).ok().reason_of("s")["path"], "in/dir/x");
    // Creating the dangling link's target is a change; outside content is not an input.
    repo.write("targets/missing.txt", "M\n");
    assert_eq!(repo.run(&[]).ok().reason_of("s")["path"], "in/dangling.txt");
    std::fs::write(&outside, "O2").unwrap();
    assert!(repo.run(&[]).ok().ran().is_empty());
}

/// Issue 21, item 16: an empty environment name (an unset CI variable in `KKPIPE_ENV=`) or one that is a path
/// was accepted once, and every later export was unimportable. Refused at parse time, before anything is written.
#[test]
fn an_empty_or_odd_environment_name_is_refused_before_anything_is_recorded() {
    let mut repo = Repo::fixture("tiny");
    for args in [&["run", "--env", ""][..], &["run", "--env", "../prod"], &["status", "--env", "prod\nx"]] {
        let r = repo.kk(args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("environment name"), "{args:?}: {}", r.stderr);
    }
    repo.set_env("KKPIPE_ENV", "");
    let r = repo.kk(&["run"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("empty"), "{}", r.stderr);
    assert!(!repo.exists(".kkpipe"), "nothing was recorded");
    repo.set_env("KKPIPE_ENV", "eu-west-1.prod_2");
    repo.run(&[]).ok();
}

/// Issue 21, item 18: a NUL character in `pipeline.toml` (`env`, `run`, `tools`) was no load error: the stage
/// failed at spawn with no file or line, and a failed attempt was recorded. Now it is refused at its line.
#[test]
fn a_nul_character_in_pipeline_toml_is_a_load_error_at_its_line() {
    for (field, value) in [
        ("env", r#"{ MODE = "a\u0000b" }"#),
        ("run", r#""echo \u0000""#),
        ("tools", r#"["terra\U00000000form"]"#),
        ("run", r#""echo \x00""#),
    ] {
        let repo = Repo::empty();
        let run = if field == "run" { "" } else { "run = \"true\"\n" };
        repo.write("pipeline.toml", &format!("[stages.one]\nrun = \"true\"\n\n[stages.two]\n{field} = {value}\n{run}"));
        let r = repo.kk(&["run"]);
        assert_eq!(r.code, 2, "{field}: {}", r.stderr);
        assert!(r.stderr.contains("pipeline.toml:5:") && r.stderr.contains("NUL"), "{field}: {}", r.stderr);
        assert!(r.stderr.contains("stages.two"), "{field}: the key is named: {}", r.stderr);
        assert!(!repo.exists(".kkpipe"), "{field}: nothing was recorded");
    }
}

/// Issue 21, item 24: a file name with a newline put `::error ...` (or `::stop-commands::`) at the start of a line
/// of a GitHub Actions log, through kkpipe's own messages (a reason names the file) and through a stage's output
/// (which prints it); any pull request can add such a file. kkpipe's messages escape control characters, and a
/// stage's output is shown with workflow commands paused.
#[test]
fn a_file_name_cannot_inject_ci_workflow_commands() {
    let mut repo = Repo::empty();
    repo.write("pipeline.toml", "[stages.list]\nrun = \"ls src\"\ninputs = [\"src\"]\n");
    let evil = "src/x\n::error title=pwned::injected\n::stop-commands::x";
    repo.write(evil, "one\n");
    repo.set_env("GITHUB_ACTIONS", "true");
    repo.run(&[]).ok();
    repo.write(evil, "two\n");
    let r = repo.kk(&["run"]).ok();
    assert!(r.stdout.contains("pwned"), "the stage printed the name and a reason names it: {}", r.stdout);
    only_own_workflow_commands(&r.stdout, &r.stderr);
    assert!(
        r.stdout.contains(r"src/x\n::error title=pwned::injected"),
        "the reason shows the name escaped: {}",
        r.stdout
    );
}

/// Review of issue 24 (H1): a CI log ends a line at a carriage return too. Stage output with `\r::command` is
/// shown streamed prefixed (two stages at once) and again under a failure: neither may start a command.
#[test]
fn a_carriage_return_in_stage_output_cannot_start_a_workflow_command() {
    let mut repo = Repo::empty();
    let evil = r"printf 'x\r::error title=pwned::injected\r::stop-commands::x\n'";
    repo.write(
        "pipeline.toml",
        &format!("[stages.a]\nrun = \"{evil}; sleep 1\"\n[stages.b]\nrun = [\"{evil}\", \"exit 3\"]\n"),
    );
    repo.set_env("GITHUB_ACTIONS", "true");
    let r = repo.kk(&["run", "-j", "2"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stdout.contains("goes on below, its lines prefixed"), "two stages streamed at once: {}", r.stdout);
    assert!(r.stdout.contains("pwned"), "{}", r.stdout);
    only_own_workflow_commands(&r.stdout, &r.stderr);
    assert!(r.stdout.contains("::error title=kkpipe::b failed"), "kkpipe's own annotation stands: {}", r.stdout);
}

/// Every workflow command in the log is kkpipe's own, or inside a pause kkpipe opened and closed; lines end at
/// `\n` and at `\r`, as GitHub's runner reads them.
fn only_own_workflow_commands(stdout: &str, stderr: &str) {
    let mut paused: Option<String> = None;
    for line in stdout.split(['\n', '\r']).chain(stderr.split(['\n', '\r'])) {
        match &paused {
            Some(token) if line == format!("::{token}::") => paused = None,
            Some(_) => {}
            None if line.starts_with("::stop-commands::") => {
                paused = Some(line.trim_start_matches("::stop-commands::").to_string());
            }
            None if line.starts_with("::") => {
                let own = ["::group::", "::endgroup::", "::error title=kkpipe::"].iter().any(|c| line.starts_with(c));
                assert!(own, "a workflow command kkpipe did not write: {line:?}\n{stdout}");
            }
            None => {}
        }
    }
    assert!(paused.is_none(), "every pause is closed");
}

/// Issue 21, item 4: relative and empty `PATH` entries were resolved from kkpipe's directory (and empty ones
/// dropped), while the stage's bash resolves them from the stage's `dir`: the keyed tool was not the one that
/// ran, and `-C repo` from elsewhere failed with "not on PATH". Tools are now found where the stage finds them.
#[test]
fn tools_on_relative_path_entries_are_found_from_the_stages_dir() {
    let repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        "[stages.s]\ndir = \"sub\"\nrun = \"mytool\"\ntools = [\"mytool\"]\nenv = { PATH = \"bin::/usr/bin:/bin\" }\n",
    );
    repo.write("sub/bin/mytool", "#!/bin/sh\necho tool one\n");
    std::fs::set_permissions(repo.path("sub/bin/mytool"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // From the parent directory, with -C: the tool is found below the stage's dir, as bash finds it.
    let elsewhere = repo.root.parent().unwrap().to_path_buf();
    let root = repo.root.to_str().unwrap().to_string();
    let r = repo.cmd_in(&elsewhere, &["-C", &root, "run", "--json"]).output().unwrap();
    let r = Run::from(r).ok();
    assert_eq!(r.ran(), ["s"]);
    // Upgrading the tool that runs reruns the stage.
    repo.write("sub/bin/mytool", "#!/bin/sh\necho tool two\n");
    let r = Run::from(repo.cmd_in(&elsewhere, &["-C", &root, "run", "--json"]).output().unwrap()).ok();
    assert_eq!(r.ran(), ["s"], "{}", r.stderr);
    assert_eq!(r.reason_of("s")["kind"], "tool-changed");
}

/// Issue 21, item 19: a literal exclude meant "this path and below" only if it was a directory when the pipeline
/// loaded: `infra/.terraform`, made by an upstream stage, counted as an input once, so the deploy ran twice.
#[test]
fn a_literal_exclude_covers_a_directory_made_after_load() {
    let repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        r#"
[stages.init]
run = "mkdir -p infra/.terraform && date +%s%N > infra/.terraform/plugin"
outputs = ["infra/.terraform"]

[stages.deploy]
needs = ["init"]
run = "cat infra/main.tf > applied.txt"
inputs = ["infra"]
exclude = ["infra/.terraform"]
outputs = ["applied.txt"]
"#,
    );
    repo.write("infra/main.tf", "resource {}\n");
    assert_eq!(repo.run(&[]).ok().ran(), ["init", "deploy"]);
    let r = repo.run(&[]).ok();
    assert!(r.ran().is_empty(), "nothing changed, nothing runs: {:?}\n{}", r.ran(), r.stdout);
    assert!(!repo.input_paths("deploy").iter().any(|p| p.contains(".terraform")), "{:?}", repo.input_paths("deploy"));
}

/// Issue 21, item 20: a stage's own output under `[pipeline] inputs` made it stale after every run (4 runs, 4
/// deploys). What a stage writes is never its own input, global or not.
#[test]
fn a_stages_own_output_under_pipeline_inputs_does_not_make_it_stale() {
    let repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        r#"
[pipeline]
inputs = ["state"]

[stages.deploy]
run = "date +%s%N > state/deployed.txt"
outputs = ["state/deployed.txt"]
"#,
    );
    repo.write("state/config", "a\n");
    assert_eq!(repo.run(&[]).ok().ran(), ["deploy"]);
    for _ in 0..3 {
        let r = repo.run(&[]).ok();
        assert!(r.ran().is_empty(), "{:?}\n{}", r.ran(), r.stdout);
    }
    repo.write("state/config", "b\n");
    assert_eq!(repo.run(&[]).ok().ran(), ["deploy"], "a real global input still counts");
}

const CUT: usize = 64 * 1024;

/// Issue 21, item 12: lines were masked as they streamed, before the stage's sensitive output existed, and the
/// stored log (and `logs/N` of `cache export`) kept what the stage printed of it. The stored log is masked with
/// everything known when the stage ends.
#[test]
fn what_a_stage_prints_of_its_own_sensitive_output_is_not_stored() {
    let repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        r#"
[stages.kubeone]
run = ["echo admin-cert-0f9e8d7c6b5a > kubeconfig", "cat kubeconfig"]
outputs = [{ path = "kubeconfig", sensitive = true }]
"#,
    );
    repo.run(&[]).ok();
    let log = repo.kk(&["log", "kubeone"]).ok();
    assert!(log.stdout.contains("***") && !log.stdout.contains("admin-cert"), "{}", log.stdout);
    let archive = repo.sibling("c.tar.zst");
    repo.kk(&["cache", "export", archive.to_str().unwrap(), "--include-sensitive"]).ok();
    let tar = zstd::decode_all(std::fs::File::open(&archive).unwrap()).unwrap();
    let mut logs = 0;
    for e in tar::Archive::new(&tar[..]).entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut body).unwrap();
        if name.contains("/logs/") {
            logs += 1;
            assert!(!String::from_utf8_lossy(&body).contains("admin-cert"), "{name} holds the credential");
        }
    }
    assert_eq!(logs, 1, "the log is exported, masked");
}

/// Issue 21, item 13: a secret straddling the 64 KiB cut of a very long line was shown and stored in two
/// unmasked halves. A cut never splits a secret, and the stored log is masked whole.
#[test]
fn a_secret_across_the_cut_of_a_long_line_is_masked() {
    let mut repo = Repo::empty();
    let secret = "tok-0123456789-abcdefghij";
    for start in [CUT - 10, CUT - 1, 2 * CUT - 30] {
        repo.write(
            "pipeline.toml",
            &format!(
                "[stages.long]\nrun = \"head -c {start} /dev/zero | tr '\\\\0' x; echo \\\"$TOKEN tail\\\"\"\npass_env = [\"TOKEN\"]\n"
            ),
        );
        repo.set_env("TOKEN", secret);
        let r = repo.kk(&["run", "--force", "-v"]).ok();
        assert!(r.stdout.contains("*** tail"), "{start}: the line is shown, masked");
        let log = repo.kk(&["log", "long"]).ok();
        for (what, text) in [("output", &r.stdout), ("log", &log.stdout)] {
            for half in [&secret[..10], &secret[10..]] {
                assert!(!text.contains(half), "{start}: {what} shows part of the secret: {half}");
            }
        }
        assert_eq!(log.stdout.matches('x').count(), start, "{start}: the stored log keeps every byte");
    }
}

/// Issue 21, item 3: empty directories under a bare-directory input were not part of the key (`mkdir
/// src/overlays` reran nothing), while outputs record them and a clean copy differs. An empty directory is an
/// input entry like a file.
#[test]
fn an_empty_directory_under_a_directory_input_is_part_of_the_key() {
    let repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        "[stages.list]\nrun = \"find src | sort > listing.txt\"\ninputs = [\"src\"]\noutputs = [\"listing.txt\"]\n",
    );
    repo.write("src/base/kustomization.yaml", "resources: []\n");
    repo.run(&[]).ok();
    std::fs::create_dir(repo.path("src/overlays")).unwrap();
    let r = repo.run(&[]).ok();
    assert_eq!(r.ran(), ["list"], "{}", r.stdout);
    assert_eq!(r.reason_of("list")["path"], "src/overlays");
    assert!(repo.read("listing.txt").contains("src/overlays"));
    assert!(repo.run(&[]).ok().ran().is_empty(), "fresh until it changes again");
    // Something in it: the directory is keyed through its entries instead.
    repo.write("src/overlays/prod.yaml", "x: 1\n");
    assert_eq!(repo.run(&[]).ok().ran(), ["list"]);
    // Back to an empty directory, then to none: each is the key of an earlier run, whose result comes back.
    std::fs::remove_file(repo.path("src/overlays/prod.yaml")).unwrap();
    let r = repo.run(&[]).ok();
    assert_eq!(r.with_state("restored"), ["list"], "{}", r.stdout);
    assert!(repo.read("listing.txt").ends_with("src/overlays\n"));
    std::fs::remove_dir(repo.path("src/overlays")).unwrap();
    let r = repo.run(&[]).ok();
    assert_eq!(r.with_state("restored"), ["list"], "removing it is a change too: {}", r.stdout);
    assert_eq!(repo.read("listing.txt"), "src\nsrc/base\nsrc/base/kustomization.yaml\n");
}

/// Review of item 12: the stored log was masked again only after a success; a stage that wrote its kubeconfig,
/// printed it and failed kept it in its log, its export and the failure's log shown at the end.
#[test]
fn what_a_failed_stage_prints_of_its_sensitive_output_is_not_stored() {
    let repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        r#"
[stages.kubeone]
run = ["mkdir -p creds && date +%s%N | sha256sum | cut -c1-32 > creds/kubeconfig", "cat creds/kubeconfig", "exit 3"]
outputs = [{ path = "creds", sensitive = true }]
"#,
    );
    // Quiet: nothing streams, and the failure's log is shown at its end, from what is kept.
    let r = repo.kk(&["run", "-q"]);
    assert_eq!(r.code, 1, "{}", r.all());
    let secret = repo.read("creds/kubeconfig").trim().to_string();
    assert_eq!(secret.len(), 32);
    assert!(r.all().contains("***") && !r.all().contains(&secret), "the failure's log: {}", r.all());
    let log = repo.kk(&["log", "kubeone"]).ok();
    assert!(log.stdout.contains("***") && !log.stdout.contains(&secret), "{}", log.stdout);
    let archive = repo.sibling("c.tar.zst");
    repo.kk(&["cache", "export", archive.to_str().unwrap()]).ok();
    let tar = zstd::decode_all(std::fs::File::open(&archive).unwrap()).unwrap();
    assert!(!String::from_utf8_lossy(&tar).contains(&secret), "the export");
}

/// Review of item 3: an empty `infra/.terraform` (its `providers` removed) became an input despite
/// `exclude = ["**/.terraform/**"]`, and filling it again reran the deploy. An empty directory is no input when
/// the excludes take whatever could be in it.
#[test]
fn an_empty_directory_the_excludes_cover_is_no_input() {
    let repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        "[stages.apply]\nkind = \"deploy\"\nrun = \"cat infra/main.tf > applied.txt\"\ninputs = [\"infra\"]\nexclude = [\"**/.terraform/**\"]\noutputs = [\"applied.txt\"]\n",
    );
    repo.write("infra/main.tf", "resource {}\n");
    std::fs::create_dir_all(repo.path("infra/.terraform/providers")).unwrap();
    assert_eq!(repo.run(&[]).ok().ran(), ["apply"]);
    std::fs::remove_dir(repo.path("infra/.terraform/providers")).unwrap();
    assert!(repo.run(&[]).ok().ran().is_empty(), "an emptied .terraform is no input");
    repo.write("infra/.terraform/providers/p", "plugin\n");
    assert!(repo.run(&[]).ok().ran().is_empty(), "nor a filled one");
}
