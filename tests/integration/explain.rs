//! Explain and observe: `why`, JSON output against its schemas, graphs, logs, history, completions, masking.

use crate::harness::*;
use std::io::Write;
use std::process::{Command, Stdio};

fn why(repo: &Repo, stage: &str) -> String {
    repo.kk(&["why", stage]).ok().stdout
}

fn why_json(repo: &Repo, stage: &str) -> serde_json::Value {
    repo.kk(&["why", stage, "--json"]).ok().json()
}

#[test]
fn why_names_file_changes_env_and_command_changes() {
    let repo = Repo::fixture("tiny");
    repo.run(&[]).ok();
    assert!(why(&repo, "docs").starts_with("`docs` is fresh since "), "{}", why(&repo, "docs"));

    repo.edit("docs/README.md", "A fixture.", "A fixture, edited.");
    repo.write("docs/added.md", "new\n");
    let text = why(&repo, "docs");
    assert!(text.contains("`docs` is stale: input `docs/README.md` modified (and 1 more)"), "{text}");
    assert!(text.contains("inputs: 1 modified, 1 added, 0 removed"), "{text}");
    assert!(text.contains("modified docs/README.md") && text.contains("added    docs/added.md"), "{text}");
    repo.run(&[]).ok();
    std::fs::remove_file(repo.path("docs/added.md")).unwrap();
    let text = why(&repo, "docs");
    assert!(text.contains("input `docs/added.md` removed"), "{text}");
    assert!(text.contains("removed  docs/added.md"), "{text}");

    repo.edit("pipeline.toml", "MODE = \"test\"", "MODE = \"staging\"");
    let text = why(&repo, "lint");
    assert!(text.contains("env `MODE` changed"), "{text}");
    assert!(text.contains("MODE: \"test\" -> \"staging\""), "{text}");

    repo.edit("pipeline.toml", "echo applied", "echo applied twice");
    let text = why(&repo, "apply");
    assert!(text.contains("command:\n    - echo applied\n    + echo applied twice"), "{text}");
}

#[test]
fn why_lists_the_first_twenty_changes_and_all_of_them_on_request() {
    let repo = Repo::fixture("tiny");
    repo.run(&[]).ok();
    for n in 0..25 {
        repo.write(&format!("docs/page-{n:02}.md"), "page\n");
    }
    let short = why(&repo, "docs");
    assert!(short.contains("inputs: 0 modified, 25 added, 0 removed"), "{short}");
    assert!(short.contains("... and 5 more (`--all` lists them)"), "{short}");
    let all = repo.kk(&["why", "docs", "--all"]).ok().stdout;
    assert!(all.contains("docs/page-24.md") && !all.contains("more (`--all`"), "{all}");
}

#[test]
fn why_follows_a_two_level_cascade_to_its_root_cause() {
    let repo = Repo::empty();
    repo.write("src/a.txt", "one\n").write(
        "pipeline.toml",
        r#"
[stages.a]
run = "mkdir -p out && tr a-z A-Z < src/a.txt > out/a"
inputs = ["src"]
outputs = ["out/a"]
[stages.b]
run = "cp out/a out/b"
outputs = ["out/b"]
needs = ["a"]
[stages.c]
run = "cp out/b out/c"
outputs = ["out/c"]
needs = ["b"]
"#,
    );
    repo.run(&[]).ok();
    repo.write("src/a.txt", "two\n");
    repo.run(&["a"]).ok();
    let text = why(&repo, "c");
    assert!(text.contains("`c` is stale: needs `b`, which is stale"), "{text}");
    assert!(text.contains("because `b` is stale: stage `a` produced different outputs (`out/a`)"), "{text}");
    assert!(text.contains("because `a` ran: input `src/a.txt` modified"), "{text}");
    assert!(text.contains("root cause: input `src/a.txt` modified (stage `a`)"), "{text}");
    let doc = why_json(&repo, "c");
    assert_eq!(doc["cascade"].as_array().unwrap().len(), 2);
    assert_eq!(doc["root_cause"]["stage"], "a");
    assert_eq!(doc["root_cause"]["reason"]["path"], "src/a.txt");
    assert_eq!(doc["root_cause"]["recorded"], true);
}

#[test]
fn why_names_never_run_failed_missing_output_tool_and_forced() {
    let mut repo = Repo::empty();
    repo.write("tools/mytool", "#!/bin/sh\necho v1\n");
    std::fs::set_permissions(repo.path("tools/mytool"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", repo.path("tools").display(), std::env::var("PATH").unwrap());
    repo.set_env("PATH", &path);
    repo.write(
        "pipeline.toml",
        r#"
[stages.gen]
run = "mytool > stamp.txt; date +%s%N >> stamp.txt"
tools = ["mytool"]
outputs = ["stamp.txt"]
[stages.use]
run = "cat stamp.txt > used.txt"
needs = ["gen"]
outputs = ["used.txt"]
[stages.flaky]
run = "test -e ok"
"#,
    );
    assert!(why(&repo, "gen").contains("`gen` has never run successfully"));
    let r = repo.run(&[]);
    assert_eq!(r.code, 1);
    assert!(why(&repo, "flaky").contains("`flaky` is stale: last run failed (exit code 1)"));

    repo.write("tools/mytool", "#!/bin/sh\necho v2\n");
    let text = why(&repo, "gen");
    assert!(text.contains("`gen` is stale: tool `mytool` changed"), "{text}");
    assert!(text.contains("tool `mytool` changed (its executable's content differs)"), "{text}");
    repo.run(&["use"]).ok();

    // An output gone from the workspace and from the store.
    std::fs::remove_file(repo.path("used.txt")).unwrap();
    std::fs::remove_dir_all(repo.path(".kkpipe/blobs")).unwrap();
    assert!(why(&repo, "use").contains("output `used.txt` missing and not in the cache"), "{}", why(&repo, "use"));
    repo.run(&["use"]).ok();

    repo.run(&["--force", "gen"]).ok();
    let text = why(&repo, "use");
    assert!(text.contains("stage `gen` produced different outputs (`stamp.txt`)"), "{text}");
    assert!(text.contains("because `gen` ran: forced"), "{text}");
}

#[test]
fn status_and_why_json_match_their_schemas_and_hashes_match_blake3() {
    let repo = Repo::fixture("tiny");
    check_schema(&schema("kkpipe.status.v1.json"), &repo.kk(&["status", "--json"]).ok().stdout);
    let run = repo.run(&[]).ok();
    check_schema(&schema("kkpipe.run.v1.json"), &run.stdout);
    repo.edit("terraform/vars.tfvars", "tiny", "tinier");
    check_schema(&schema("kkpipe.status.v1.json"), &repo.kk(&["status", "--json"]).ok().stdout);
    check_schema(&schema("kkpipe.run.v1.json"), &repo.kk(&["run", "--dry-run", "--json"]).ok().stdout);
    for stage in ["lint", "plan", "apply", "docs"] {
        let text = repo.kk(&["why", stage, "--json"]).ok().stdout;
        check_schema(&schema("kkpipe.why.v1.json"), &text);
    }
    let doc = why_json(&repo, "plan");
    let inputs = doc["inputs"].as_array().unwrap();
    assert_eq!(inputs.len(), 2);
    for f in inputs {
        let path = f["path"].as_str().unwrap();
        let expected = blake3::hash(&std::fs::read(repo.path(path)).unwrap()).to_hex().to_string();
        assert_eq!(f["blake3"], expected.as_str(), "{path}");
    }
    assert_eq!(doc["differences"]["inputs"]["modified"][0], "terraform/vars.tfvars");
}

#[test]
fn graphs_parse_and_show_every_stage_and_edge() {
    let repo = Repo::kkp_demo();
    repo.run(&["terraform-plan"]).ok();
    let stages = repo.status_json()["stages"].as_array().unwrap().clone();
    let edges: Vec<(String, String)> = stages
        .iter()
        .flat_map(|s| {
            let to = s["name"].as_str().unwrap().to_string();
            s["needs"].as_array().unwrap().iter().map(move |n| (n.as_str().unwrap().to_string(), to.clone()))
        })
        .collect();
    let id = |n: &str| n.replace('-', "_");

    let mermaid = repo.kk(&["graph", "--format", "mermaid"]).ok().stdout;
    let parsed = mermaid_parse(&mermaid).unwrap_or_else(|why| panic!("mermaid rejects:\n{mermaid}\n{why}"));
    assert!(parsed.contains("flowchart"));
    for s in &stages {
        let name = s["name"].as_str().unwrap();
        assert!(mermaid.contains(&format!("{}[\"{name}<br/><i>", id(name))), "{name} missing:\n{mermaid}");
    }
    assert!(mermaid.contains("terraform_plan[\"terraform-plan<br/><i>fresh</i>\"]:::fresh"), "{mermaid}");
    assert!(mermaid.contains("kkp_deploy[\"kkp-deploy<br/><i>never run</i>\"]:::neverrun"), "{mermaid}");
    for (from, to) in &edges {
        assert!(mermaid.contains(&format!("{} --> {}", id(from), id(to))), "edge {from} -> {to}:\n{mermaid}");
    }

    // For a terminal: a line per stage in run order, its state and what it needs.
    let text = repo.kk(&["graph", "--format", "text"]).ok().stdout;
    assert_eq!(text.lines().count(), stages.len(), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("terraform-plan ") && l.contains("fresh") && l.contains("<- ")),
        "{text}"
    );
    for (from, to) in &edges {
        let line = text.lines().find(|l| l.starts_with(&format!("{to} "))).unwrap();
        assert!(
            line.split("<- ").nth(1).is_some_and(|n| n.split(", ").any(|x| x.trim() == from)),
            "{from} -> {to}: {text}"
        );
    }
    assert_eq!(repo.kk(&["graph"]).ok().stdout, mermaid, "not on a terminal: Mermaid, as before");

    let dot = repo.kk(&["graph", "--format", "dot"]).ok().stdout;
    let script = "import sys, pydot, json\n(g,) = pydot.graph_from_dot_data(sys.stdin.read())\nprint(json.dumps({'nodes': sorted(n.get_name().strip('\"') for n in g.get_nodes() if n.get_name() not in ('node', 'edge', 'graph')), 'edges': sorted([e.get_source().strip('\"'), e.get_destination().strip('\"')] for e in g.get_edges())}))";
    let mut py = Command::new(test_tool("venv/bin/python"))
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    py.stdin.take().unwrap().write_all(dot.as_bytes()).unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(out.status.success(), "pydot rejects:\n{dot}\n{}", String::from_utf8_lossy(&out.stderr));
    let parsed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<String> = stages.iter().map(|s| s["name"].as_str().unwrap().to_string()).collect();
    names.sort();
    assert_eq!(parsed["nodes"], serde_json::json!(names));
    let mut want: Vec<Vec<String>> = edges.iter().map(|(a, b)| vec![a.clone(), b.clone()]).collect();
    want.sort();
    assert_eq!(parsed["edges"], serde_json::json!(want));

    // Restricted to a pull request's selection.
    let pr = repo.kk(&["graph", "--event", "pull_request"]).ok().stdout;
    assert!(pr.contains("terraform_plan") && !pr.contains("kkp_deploy"), "{pr}");
}

#[test]
fn a_passed_through_secret_is_never_shown_or_stored() {
    let secret = "s3cr3t-Pa55w0rd-for-the-test";
    let b64 = "czNjcjN0LVBhNTV3MHJkLWZvci10aGUtdGVzdA==";
    let mut repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        r#"
[stages.leaky]
run = ["echo \"token is $API_TOKEN\"", "printf %s \"$API_TOKEN\" | base64", "echo \"$API_TOKEN\" >&2", "echo secret-file-content-line > creds.txt", "cat creds.txt"]
pass_env = ["API_TOKEN"]
outputs = [{ path = "creds.txt", sensitive = true }]
[stages.reader]
run = "cat creds.txt; exit 1"
needs = ["leaky"]
"#,
    );
    repo.set_env("API_TOKEN", secret);
    let human = repo.kk(&["run"]);
    let json = repo.kk(&["run", "--json", "--force"]);
    let log = repo.kk(&["log", "leaky"]).ok();
    let reader_log = repo.kk(&["log", "reader"]).ok();
    let why = repo.kk(&["why", "reader", "--json"]).ok();
    let history = repo.kk(&["history", "--stage", "leaky", "--json"]).ok();
    for (what, text) in [
        ("terminal", human.all()),
        ("json", json.all()),
        ("log", log.all()),
        ("reader log", reader_log.all()),
        ("why", why.all()),
        ("history", history.all()),
    ] {
        assert!(!text.contains(secret), "{what} shows the secret:\n{text}");
        assert!(!text.contains(b64), "{what} shows the secret's base64:\n{text}");
    }
    assert!(log.stdout.contains("token is ***"), "{}", log.stdout);
    // The sensitive output's content is masked once it is known, here in a downstream stage's output.
    assert!(
        reader_log.stdout.contains("***") && !reader_log.stdout.contains("secret-file-content-line"),
        "{}",
        reader_log.stdout
    );
    for e in walkdir::WalkDir::new(repo.path(".kkpipe")) {
        let e = e.unwrap();
        if e.file_type().is_file() {
            let bytes = std::fs::read(e.path()).unwrap();
            let hay = String::from_utf8_lossy(&bytes);
            assert!(!hay.contains(secret), "{} holds the secret", e.path().display());
            if let Ok(plain) = zstd::decode_all(&bytes[..]) {
                assert!(
                    !String::from_utf8_lossy(&plain).contains(secret),
                    "{} holds it compressed",
                    e.path().display()
                );
            }
        }
    }
    // Logs are compressed in the database: read them back through SQLite as well.
    let conn = rusqlite::Connection::open(repo.path(".kkpipe/cache.db")).unwrap();
    let mut stmt = conn.prepare("SELECT log FROM stage_runs WHERE log IS NOT NULL").unwrap();
    let logs: Vec<Vec<u8>> = stmt.query_map([], |r| r.get(0)).unwrap().map(|r| r.unwrap()).collect();
    assert!(!logs.is_empty());
    for l in logs {
        let plain = zstd::decode_all(&l[..]).unwrap();
        assert!(!String::from_utf8_lossy(&plain).contains(secret));
    }
}

#[test]
fn log_history_and_completions_after_several_runs() {
    let repo = Repo::fixture("tiny");
    repo.run(&[]).ok();
    repo.edit("terraform/vars.tfvars", "tiny", "bigger");
    repo.run(&[]).ok();
    repo.run(&[]).ok();

    let log = repo.kk(&["log", "plan"]).ok();
    assert_eq!(log.stdout, "planned in test mode\n");
    assert!(log.stderr.contains("`plan`, run 2: Success"), "{}", log.stderr);
    let first = repo.kk(&["log", "plan", "--run", "1"]).ok();
    assert!(first.stderr.contains("run 1"), "{}", first.stderr);
    assert_eq!(repo.kk(&["log", "plan", "--run", "3"]).code, 2, "plan did not run in run 3");

    let history = repo.kk(&["history"]).ok().stdout;
    let lines: Vec<&str> = history.lines().collect();
    assert_eq!(lines.len(), 4, "{history}");
    assert!(
        lines[1].trim_start().starts_with('3') && lines[1].contains("    0     4"),
        "run 3: 0 ran, 4 fresh:\n{history}"
    );
    assert!(lines[3].trim_start().starts_with('1') && lines[3].contains("    4     0"), "run 1: 4 ran:\n{history}");
    let runs = repo.kk(&["history", "--json"]).ok().json();
    assert_eq!(runs[0]["ran"], 0);
    assert_eq!(runs[0]["fresh"], 4);
    assert!(runs[0]["saved_ms"].as_i64().unwrap() >= 0);
    assert_eq!(runs[1]["ran"], 2);

    let ledger = repo.kk(&["history", "--stage", "plan"]).ok().stdout;
    assert!(ledger.contains("input `terraform/vars.tfvars` modified") && ledger.contains("never run"), "{ledger}");

    for shell in ["bash", "zsh", "fish"] {
        let c = repo.kk(&["completions", shell]).ok().stdout;
        assert!(c.contains("kkpipe") && c.contains("history"), "{shell}");
    }
}

#[test]
fn piped_output_has_no_progress_bars_or_colours() {
    let repo = Repo::fixture("tiny");
    let r = repo.kk(&["run"]).ok();
    assert!(!r.all().contains('\u{1b}'), "escape codes in non-terminal output:\n{}", r.all());
    let forced = repo.kk(&["--color", "always", "status"]).ok();
    assert!(forced.stdout.contains("\u{1b}[32m"), "--color always colours");
    let mut repo = repo;
    repo.set_env("NO_COLOR", "1");
    let plain = repo.kk(&["--color", "auto", "status"]).ok();
    assert!(!plain.stdout.contains('\u{1b}'));
}

/// Issue 13, item 14: tools colour their output even into a pipe (terraform does); kkpipe passes colours on
/// only when it colours its own output (a terminal, a CI log, `--color always`), in the run and in `kkpipe log`.
#[test]
fn stage_output_colours_reach_only_a_coloured_output() {
    let repo = Repo::empty();
    repo.write("pipeline.toml", "[stages.s]\nrun = \"printf '\\\\033[1mbold\\\\033[0m plain\\\\n'\"\n");
    let piped = repo.kk(&["run"]).ok();
    assert!(piped.all().contains("bold plain"), "{}", piped.all());
    assert!(!piped.all().contains('\u{1b}'), "escape codes in piped output: {:?}", piped.all());
    let log = repo.kk(&["log", "s"]).ok();
    assert_eq!(log.stdout.trim_end(), "bold plain");
    let coloured = repo.kk(&["--color", "always", "run", "--force", "s"]).ok();
    assert!(coloured.all().contains("\u{1b}[1mbold\u{1b}[0m plain"), "{:?}", coloured.all());
    assert!(repo.kk(&["--color", "always", "log", "s"]).ok().stdout.contains("\u{1b}[1mbold"));
}

/// What a person sees, whole: a first run, then `status` after an edit (times and ages filtered out).
#[test]
fn human_output_of_a_run_and_of_status_after_an_edit() {
    let repo = Repo::fixture("tiny");
    let first = repo.kk(&["--color", "never", "run", "-j", "1"]).ok();
    repo.edit("terraform/main.tf", "resource", "resource # edited\nresource");
    let status = repo.kk(&["--color", "never", "status"]).ok();
    let filters = vec![(r"\d+(\.\d+)?(ms|s)\b", "[time]"), (r"\d+m\d\ds\b", "[time]"), (r"\d+[smhd] ago", "[age]")];
    insta::with_settings!({ filters => filters }, {
        insta::assert_snapshot!("first_run", first.stdout);
        insta::assert_snapshot!("status_after_an_edit", status.stdout);
    });
}
