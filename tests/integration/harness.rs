//! A small builder for story-like tests: copy a fixture, run kkpipe, edit files, run again, assert.

#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_kkpipe");

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Variables that change kkpipe's behaviour (CI detection, colours); tests start without them.
const AMBIENT: &[&str] = &[
    "GITHUB_ACTIONS",
    "GITHUB_EVENT_NAME",
    "GITHUB_REF_NAME",
    "GITHUB_BASE_REF",
    "GITHUB_STEP_SUMMARY",
    "GITLAB_CI",
    "CI_PIPELINE_SOURCE",
    "CI_COMMIT_BRANCH",
    "CI_MERGE_REQUEST_TARGET_BRANCH_NAME",
    "BITBUCKET_BUILD_NUMBER",
    "BITBUCKET_COMMIT",
    "BITBUCKET_BRANCH",
    "BITBUCKET_PR_ID",
    "GITHUB_TOKEN",
    "KKPIPE_GITLAB_TOKEN",
    "KKPIPE_BITBUCKET_TOKEN",
    "KKPIPE_ENV",
    "KKPIPE_SECRET_KEY",
    "KKPIPE_REMOTE",
    "KKPIPE_SIGNING_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ALLOW_HTTP",
    "NO_COLOR",
    "CI",
];

/// `kkpipe ARGS` in `dir`, without the ambient variables that would change its behaviour, as a generic CI job
/// (`CI=true`: deploys need no confirmation; the tests of a local run's consent remove it). Stages get 2 s to
/// stop after a signal (`KKPIPE_STOP_GRACE`, 7 s by default) unless a test sets its own.
pub fn kkpipe_in(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args).current_dir(dir);
    for k in AMBIENT {
        c.env_remove(k);
    }
    c.env("CI", "true");
    c.env("KKPIPE_STOP_GRACE", "2");
    c
}

/// The caller's PATH with the directory of the real `python3` first: a version manager's shim (pyenv's is a
/// bash script) costs more than the stand-in it starts, and the demo's stand-ins are started hundreds of times.
fn stand_in_path() -> String {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::var("PATH").unwrap_or_default();
        let exe = Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output();
        let dir = exe.ok().filter(|o| o.status.success()).and_then(|o| {
            Path::new(String::from_utf8_lossy(&o.stdout).trim()).parent().map(|d| d.to_string_lossy().into_owned())
        });
        match dir {
            Some(d) if !d.is_empty() => format!("{d}:{path}"),
            _ => path,
        }
    })
    .clone()
}

/// `git ARGS` in `dir` as a fixed author, on `main` by default; asserts success and returns stdout.
/// Change the demo's nodes behind kkpipe's back, as someone with the cloud's credentials would: drift.
pub fn drift_demo_nodes(repo: &Repo) {
    let tf = std::process::Command::new("terraform")
        .args(["apply", "-input=false", "-auto-approve", "-var", "control_plane_type=c5.large"])
        .current_dir(repo.path("terraform/aws"))
        .env("HOME", repo.env_var("HOME"))
        .output()
        .unwrap();
    assert!(tf.status.success(), "{}", String::from_utf8_lossy(&tf.stderr));
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let o = Command::new("git")
        .args(["-c", "user.name=ci", "-c", "user.email=ci@example.invalid", "-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub struct Repo {
    _tmp: tempfile::TempDir,
    pub root: PathBuf,
    env: Vec<(String, String)>,
}

pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in walkdir::WalkDir::new(from).follow_links(false) {
        let e = e.unwrap();
        let rel = e.path().strip_prefix(from).unwrap();
        let dest = to.join(rel);
        let ft = e.file_type();
        if ft.is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path()).unwrap(), &dest).unwrap();
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

impl Repo {
    /// A copy of `fixtures/NAME` in a fresh temp dir.
    pub fn fixture(name: &str) -> Repo {
        let r = Repo::empty();
        copy_tree(&fixtures().join(name), &r.root);
        r
    }

    /// The KKP demo repository (fixtures/kkp-demo) with the pipeline `kkpipe demo` gives it (`init --ci github
    /// --cloud aws --dns --force`, which replaces the wizard's workflow) and the demo's stand-in environment
    /// (demo.env): stand-in tools first on PATH, fake credentials.
    pub fn kkp_demo() -> Repo {
        let r = Repo::kkp_wizard("kkp-demo");
        r.kk(&["init", "--ci", "github", "--cloud", "aws", "--dns", "--force"]).ok();
        r
    }

    /// A wizard-shaped KKP fixture as it is before `kkpipe init`, with its stand-in environment (demo.env).
    pub fn kkp_wizard(fixture: &str) -> Repo {
        let mut r = Repo::fixture(fixture);
        if !r.exists("bin") {
            // One set of stand-ins serves every fixture (fixtures/kkp-gce/README.md).
            copy_tree(&fixtures().join("kkp-demo/bin"), &r.path("bin"));
        }
        let dir = r.root.to_str().unwrap().to_string();
        for line in r.read("demo.env").lines() {
            let Some(rest) = line.strip_prefix("export ") else {
                continue;
            };
            let (k, v) = rest.split_once('=').unwrap();
            let v = ['"', '\''].iter().find_map(|q| v.strip_prefix(*q)?.strip_suffix(*q)).unwrap_or(v);
            let v = v.replace("$KKP_DEMO_DIR", &dir).replace("$PATH", &stand_in_path());
            r.set_env(k, &v);
        }
        r
    }

    pub fn empty() -> Repo {
        let tmp = tempfile::Builder::new().prefix("kkpipe-test-").tempdir().unwrap();
        let root = tmp.path().join("repo");
        std::fs::create_dir_all(&root).unwrap();
        Repo { _tmp: tmp, root, env: Vec::new() }
    }

    /// A second location inside the same temp dir (for copies and clones).
    pub fn sibling(&self, name: &str) -> PathBuf {
        self.root.parent().unwrap().join(name)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn write(&self, rel: &str, content: &str) -> &Self {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
        self
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }

    pub fn exists(&self, rel: &str) -> bool {
        self.path(rel).exists()
    }

    /// Replace the first occurrence of `from` in a file.
    pub fn edit(&self, rel: &str, from: &str, to: &str) -> &Self {
        let text = self.read(rel);
        assert!(text.contains(from), "`{from}` not in {rel}");
        self.write(rel, &text.replacen(from, to, 1))
    }

    pub fn set_env(&mut self, k: &str, v: &str) -> &mut Self {
        self.env.retain(|(x, _)| x != k);
        self.env.push((k.into(), v.into()));
        self
    }

    /// A variable as the kkpipe processes of this test see it.
    pub fn env_var(&self, k: &str) -> String {
        self.env
            .iter()
            .find(|(x, _)| x == k)
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var(k).ok())
            .unwrap_or_default()
    }

    pub fn cmd_in(&self, dir: &Path, args: &[&str]) -> Command {
        let mut c = kkpipe_in(dir, args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    pub fn kk(&self, args: &[&str]) -> Run {
        Run::from(self.cmd_in(&self.root, args).output().expect("run kkpipe"))
    }

    /// `kkpipe run --json ARGS`, asserting the exit code.
    pub fn run(&self, args: &[&str]) -> Run {
        let mut a = vec!["run", "--json"];
        a.extend_from_slice(args);
        self.kk(&a)
    }

    /// The input files `why STAGE --json` lists (path, blake3 or symlink text, executable).
    pub fn inputs_of(&self, stage: &str) -> Vec<Value> {
        self.kk(&["why", stage, "--json"]).ok().json()["inputs"].as_array().unwrap().clone()
    }

    /// Just the paths of [`Repo::inputs_of`].
    pub fn input_paths(&self, stage: &str) -> Vec<String> {
        self.inputs_of(stage).iter().map(|f| f["path"].as_str().unwrap().to_string()).collect()
    }

    pub fn status_json(&self) -> Value {
        let r = self.kk(&["status", "--json"]);
        assert_eq!(r.code, 0, "status failed: {}", r.stderr);
        r.json()
    }

    /// The state `status --json` reports for one stage, with its first reason's text.
    pub fn state_of(&self, stage: &str) -> String {
        let doc = self.status_json();
        let s = doc["stages"].as_array().unwrap().iter().find(|s| s["name"] == stage).expect("stage");
        s["state"].as_str().unwrap().to_string()
    }

    /// Set every file's mtime to now + `secs` (what a fresh checkout does to mtimes).
    pub fn touch_all(&self, secs: u64) {
        let t = std::time::SystemTime::now() + std::time::Duration::from_secs(secs);
        for e in walkdir::WalkDir::new(&self.root) {
            let e = e.unwrap();
            if e.file_type().is_file() && !e.path().components().any(|c| c.as_os_str() == ".kkpipe") {
                let f = std::fs::File::options().write(true).open(e.path()).unwrap();
                f.set_modified(t).unwrap();
            }
        }
    }

    pub fn db_bytes(&self) -> Vec<u8> {
        std::fs::read(self.path(".kkpipe/cache.db")).unwrap()
    }
}

/// A tool scripts/test installs into target/test-tools (check-jsonschema, pydot, mermaid).
pub fn test_tool(rel: &str) -> PathBuf {
    let dir = std::env::var_os("KKPIPE_TEST_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-tools"));
    let p = dir.join(rel);
    assert!(p.exists(), "{} is missing: run the suite with scripts/test, which installs the test tools", p.display());
    p
}

/// Validate JSON text against a schema file with check-jsonschema.
pub fn check_schema(schema: &Path, json_text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("doc.json");
    std::fs::write(&doc, json_text).unwrap();
    check_jsonschema(&["--schemafile".as_ref(), schema.as_os_str()], &doc);
}

/// Run check-jsonschema with `args` on `file`, failing the test with its report and the file.
pub fn check_jsonschema(args: &[&std::ffi::OsStr], file: &Path) {
    let out = Command::new(test_tool("venv/bin/check-jsonschema")).args(args).arg(file).output().unwrap();
    assert!(
        out.status.success(),
        "{} does not validate ({args:?}):\n{}{}\n{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(file).unwrap_or_default()
    );
}

pub fn schema(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schema").join(name)
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr))
    }

    /// Stage names in a `--json` report with the given state.
    pub fn with_state(&self, state: &str) -> Vec<String> {
        let doc = self.json();
        doc["stages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["state"] == state)
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn ran(&self) -> Vec<String> {
        self.with_state("ran")
    }

    pub fn reason_of(&self, stage: &str) -> Value {
        let doc = self.json();
        doc["stages"].as_array().unwrap().iter().find(|s| s["name"] == stage).expect("stage")["reasons"][0].clone()
    }

    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "kkpipe failed\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }

    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// `/proc/PID/stat` fields after the command name: state, ppid, pgrp, ...
pub fn stat(pid: &str) -> Option<(char, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = text.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let pgrp = fields.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

/// Exists and has not exited: an exited stage stays a zombie until whoever inherited it reaps it.
pub fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && stat(&pid.to_string()).is_some_and(|(s, _)| !matches!(s, 'Z' | 'X'))
}

/// Poll `done` every 20 ms for at most `limit`.
pub fn within(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Validate each of `docs` (JSON texts) against a schema file, in one check-jsonschema call.
pub fn check_schema_each(schema: &Path, docs: &[String]) {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let f = dir.path().join(format!("doc-{i:03}.json"));
            std::fs::write(&f, d).unwrap();
            f
        })
        .collect();
    let out = Command::new(test_tool("venv/bin/check-jsonschema"))
        .arg("--schemafile")
        .arg(schema)
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "not every document validates against {}:\n{}{}\n{docs:#?}",
        schema.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running kkpipe whose stdout is read line by line as it comes: the harness's way to wait for something a
/// run says (never a fixed sleep).
pub struct Live {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every stdout line read so far.
    pub seen: Vec<String>,
}

impl Live {
    pub fn spawn(mut cmd: Command) -> Live {
        use std::process::Stdio;
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run kkpipe");
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Live { child, lines, seen: Vec::new() }
    }

    /// Read until a line satisfies `what`, for at most `limit` (then the test fails, showing what was seen).
    pub fn until(&mut self, limit: Duration, what: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + limit;
        while !self.seen.iter().any(|l| what(l)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("not said within {limit:?}; stdout so far:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Wait for the exit: how it went (stdout empty: it is in `seen`) and every stdout line.
    pub fn finish(mut self) -> (Run, Vec<String>) {
        let out = self.child.wait_with_output().unwrap();
        self.seen.extend(self.lines.iter());
        (Run::from(out), self.seen)
    }
}

/// Parse Mermaid text with the real mermaid parser (scripts/mermaid-parse.mjs): its JSON, or why it rejects it.
pub fn mermaid_parse(text: &str) -> Result<String, String> {
    use std::io::Write;
    use std::process::Stdio;
    let mut node = Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/mermaid-parse.mjs"))
        .env("NODE_PATH", test_tool("node/node_modules"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    node.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = node.wait_with_output().unwrap();
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}
