//! The shared remote (`[remote]`, docs/remote.md) against real object stores on loopback: SeaweedFS and
//! moto's server (two S3 implementations), fake-gcs-server (GCS's JSON API, generation preconditions
//! included), `git daemon` (git's own server, with receive-pack: the `git:` store), and `file://`. Each test
//! runs its scenario on every store.
//!
//! The servers come from the test venv that scripts/test installs; each test process starts one of each
//! (on free ports) and a watcher stops them when the process exits.

use crate::harness::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    File,
    Seaweed,
    Moto,
    Gcs,
    Git,
}

const BUCKET: &str = "kkpipe-test";

/// A running S3 server.
struct Server {
    endpoint: String,
    child: Child,
}

fn free_port() -> u16 {
    loop {
        let p = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // SeaweedFS also listens on port + 10000 unless told otherwise; keep clear of that range.
        if p < 50000 {
            return p;
        }
    }
}

/// Stop `pid` when this test process exits (the servers must not outlive the suite). The watcher is not
/// waited for: it ends on its own, after the test process.
#[allow(clippy::zombie_processes)]
fn reap_with_us(pid: u32) {
    let me = std::process::id();
    Command::new("sh")
        .args(["-c", &format!("while kill -0 {me} 2>/dev/null; do sleep 1; done; kill {pid} 2>/dev/null")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
}

fn start(kind: Kind, dir: &Path) -> Server {
    std::fs::create_dir_all(dir).unwrap();
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    let s3 = free_port();
    let mut cmd = match kind {
        Kind::Seaweed => {
            let mut c = Command::new(test_tool("venv/bin/weed"));
            let p: Vec<u16> = (0..7).map(|_| free_port()).collect();
            c.arg("server").args([
                format!("-dir={}", dir.display()),
                "-ip=127.0.0.1".into(),
                "-ip.bind=127.0.0.1".into(),
                format!("-master.port={}", p[0]),
                format!("-master.port.grpc={}", p[1]),
                format!("-volume.port={}", p[2]),
                format!("-volume.port.grpc={}", p[3]),
                format!("-filer.port={}", p[4]),
                format!("-filer.port.grpc={}", p[5]),
                format!("-filer.localSocket={}/filer.sock", dir.display()),
                "-s3".into(),
                format!("-s3.port={s3}"),
                format!("-s3.port.grpc={}", p[6]),
                "-s3.port.iceberg=0".into(),
                "-s3.port.lance=0".into(),
                "-master.telemetry=false".into(),
                "-volume.max=20".into(),
                "-master.volumeSizeLimitMB=64".into(),
            ]);
            c
        }
        Kind::Moto => {
            let mut c = Command::new(test_tool("venv/bin/moto_server"));
            c.args(["-H", "127.0.0.1", "-p", &s3.to_string()]);
            c
        }
        Kind::Gcs => {
            let mut c = Command::new(test_tool("venv/bin/fake-gcs-server"));
            let port = s3.to_string();
            c.args(["-scheme", "http", "-host", "127.0.0.1", "-port", &port, "-backend", "memory"]);
            // Its XML API answers on the public host; kkpipe speaks the JSON API, which answers anywhere.
            c.args(["-public-host", &format!("127.0.0.1:{port}"), "-log-level", "warn"]);
            c
        }
        Kind::File | Kind::Git => unreachable!("no object store server"),
    };
    let child = cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
    reap_with_us(child.id());
    let endpoint = format!("http://127.0.0.1:{s3}");
    // Ready when the bucket can be made (SeaweedFS takes a few seconds to elect its master).
    let make_bucket = match kind {
        Kind::Gcs => ("POST", "/storage/v1/b".to_string(), format!("{{\"name\": \"{BUCKET}\"}}")),
        _ => ("PUT", format!("/{BUCKET}"), String::new()),
    };
    let ready = within(Duration::from_secs(60), || {
        http(&endpoint, make_bucket.0, &make_bucket.1, make_bucket.2.as_bytes())
            .is_some_and(|(c, _)| c == 200 || c == 409)
    });
    assert!(ready, "{kind:?} did not start:\n{}", std::fs::read_to_string(dir.join("server.log")).unwrap_or_default());
    Server { endpoint, child }
}

fn shared_server(kind: Kind) -> &'static str {
    static SEAWEED: OnceLock<Server> = OnceLock::new();
    static MOTO: OnceLock<Server> = OnceLock::new();
    static GCS: OnceLock<Server> = OnceLock::new();
    let cell = match kind {
        Kind::Seaweed => &SEAWEED,
        Kind::Moto => &MOTO,
        _ => &GCS,
    };
    let s = cell.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kkpipe-{kind:?}-{}", std::process::id()));
        start(kind, &dir)
    });
    &s.endpoint
}

/// A `git daemon` serving the bare repositories below `base`, pushes included, on a free port.
fn start_git_daemon(base: &Path) -> (String, Child) {
    std::fs::create_dir_all(base).unwrap();
    let port = free_port();
    let log = std::fs::File::create(base.join("daemon.log")).unwrap();
    // git-daemon itself, not `git daemon`: that is a parent that waits for it, and killing it would leave the
    // server running.
    let exec_path = git(base, &["--exec-path"]);
    let child = Command::new(Path::new(exec_path.trim()).join("git-daemon"))
        .args(["--reuseaddr", "--export-all", "--enable=receive-pack", "--listen=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--base-path={}", base.display()))
        .arg(base)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    reap_with_us(child.id());
    let ready = within(Duration::from_secs(20), || TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert!(ready, "git daemon did not start: {}", std::fs::read_to_string(base.join("daemon.log")).unwrap());
    (format!("git://127.0.0.1:{port}"), child)
}

/// The test process's git daemon, and the directory its repositories are in.
fn git_daemon() -> &'static (String, PathBuf) {
    static DAEMON: OnceLock<(String, PathBuf)> = OnceLock::new();
    DAEMON.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("kkpipe-git-daemon-{}", std::process::id()));
        let (url, child) = start_git_daemon(&base);
        // Stopped by its reaper when this process exits.
        std::mem::forget(child);
        (url, base)
    })
}

/// One plain HTTP/1.0 request (unsigned: both servers let anyone make a bucket on loopback).
fn http(endpoint: &str, method: &str, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    let addr = endpoint.strip_prefix("http://").unwrap();
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let split = out.windows(4).position(|w| w == b"\r\n\r\n")?;
    let status: u16 = String::from_utf8_lossy(&out[..split]).split_whitespace().nth(1)?.parse().ok()?;
    Some((status, out[split + 4..].to_vec()))
}

/// A store for one test: its URL, the environment kkpipe needs for it, and direct access to its objects.
struct Store {
    url: String,
    endpoint: Option<String>,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Store {
    fn new(kind: Kind) -> Store {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let prefix = format!("t{}", tmp.path().file_name().unwrap().to_string_lossy().replace('.', ""));
        match kind {
            Kind::File => Store { url: format!("file://{}", dir.display()), endpoint: None, dir, _tmp: tmp },
            Kind::Git => {
                let (daemon, base) = git_daemon();
                git(base, &["init", "-q", "--bare", &format!("{prefix}.git")]);
                let url = format!("git:{daemon}/{prefix}.git");
                Store { url, endpoint: None, dir: PathBuf::new(), _tmp: tmp }
            }
            _ => Store::on(kind, shared_server(kind).to_string(), prefix, tmp),
        }
    }

    fn on(kind: Kind, endpoint: String, prefix: String, tmp: tempfile::TempDir) -> Store {
        let scheme = if kind == Kind::Gcs { "gs" } else { "s3" };
        let url = format!("{scheme}://{BUCKET}/{prefix}");
        Store { url, endpoint: Some(endpoint), dir: PathBuf::new(), _tmp: tmp }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        match &self.endpoint {
            None => Vec::new(),
            // A bearer token, sent as to GCS (the emulator takes any).
            Some(e) if self.url.starts_with("gs://") => {
                vec![("GOOGLE_BASE_URL", e.clone()), ("GOOGLE_BEARER_TOKEN", "emulator-token".into())]
            }
            Some(e) => vec![
                ("AWS_ENDPOINT_URL", e.clone()),
                ("AWS_ALLOW_HTTP", "true".into()),
                ("AWS_ACCESS_KEY_ID", "test".into()),
                ("AWS_SECRET_ACCESS_KEY", "test".into()),
                ("AWS_REGION", "us-east-1".into()),
            ],
        }
    }

    /// A `file://` store, read as the directory it is; the others through a client.
    fn on_disk(&self) -> bool {
        self.url.starts_with("file://")
    }

    fn names(&self, under: &str) -> Vec<String> {
        if !self.on_disk() {
            return self.s3().list(under).unwrap().into_iter().map(|l| l.name).collect();
        }
        walkdir::WalkDir::new(self.dir.join(under))
            .into_iter()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_file())
            .map(|e| e.path().strip_prefix(&self.dir).unwrap().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock") && !n.rsplit('/').next().unwrap().starts_with(".tmp-"))
            .collect()
    }

    fn get(&self, name: &str) -> Vec<u8> {
        match self.on_disk() {
            true => std::fs::read(self.dir.join(name)).unwrap(),
            false => self.s3().get(name).unwrap().expect("the object").0,
        }
    }

    /// A signed S3 client (moto refuses anonymous reads and overwrites), a GCS client, or a git client: kkpipe's store
    /// client, used here only as a client of the store.
    fn s3(&self) -> kkpipe::store::Store {
        let env: std::collections::HashMap<String, String> =
            self.env().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let opening = kkpipe::store::Opening { env: &env, root: self._tmp.path() };
        kkpipe::store::open(&url::Url::parse(&self.url).unwrap(), &opening).unwrap()
    }

    /// Overwrite an object behind kkpipe's back (as someone with write access to the bucket).
    fn tamper(&self, name: &str, bytes: &[u8]) {
        if self.on_disk() {
            return std::fs::write(self.dir.join(name), bytes).unwrap();
        }
        let s3 = self.s3();
        s3.delete(name).unwrap();
        assert!(s3.put_if(name, bytes.to_vec(), None).unwrap().is_some());
    }
}

struct Keys {
    private: String,
    public: String,
}

fn keygen() -> Keys {
    let r = Run::from(kkpipe_in(Path::new("."), &["remote", "keygen", "--json"]).output().unwrap()).ok();
    let j = r.json();
    Keys { private: j["private"].as_str().unwrap().into(), public: j["public"].as_str().unwrap().into() }
}

const BUILD_AND_DEPLOY: &str = r#"
[stages.build]
run = "echo build >> ../ran.log; mkdir -p out; cat src.txt src.txt > out/app.txt; printf 'secret' > out/token"
inputs = ["src.txt"]
outputs = ["out/app.txt", { path = "out/token", sensitive = true }]

[stages.deploy]
kind = "deploy"
needs = ["build"]
run = "echo deploy >> ../ran.log; cat out/app.txt >> $DEPLOYED"
pass_env = ["DEPLOYED"]
"#;

/// A clone (a runner) of a repository whose pipeline uses `store`, trusting `trusted`, signing with `signer`.
fn runner(store: &Store, stages: &str, trusted: &[&str], signer: Option<&str>, extra: &str) -> Repo {
    let mut r = Repo::empty();
    let keys: Vec<String> = trusted.iter().map(|k| format!("\"{k}\"")).collect();
    let text = format!("[remote]\nurl = \"{}\"\ntrusted_keys = [{}]\n{extra}\n{stages}", store.url, keys.join(", "));
    r.write("pipeline.toml", &text);
    r.write("src.txt", "v1\n");
    for (k, v) in store.env() {
        r.set_env(k, &v);
    }
    if let Some(k) = signer {
        r.set_env("KKPIPE_SIGNING_KEY", k);
    }
    let deployed = r.sibling("deployed.log");
    r.set_env("DEPLOYED", deployed.to_str().unwrap());
    r
}

fn warnings(r: &Run) -> Vec<String> {
    r.stderr.lines().filter(|l| l.contains("warning")).map(str::to_string).collect()
}

fn two_clones_share_hits_byte_for_byte_and_nothing_runs_twice(kind: Kind) {
    let store = Store::new(kind);
    let k = keygen();
    let a = runner(&store, BUILD_AND_DEPLOY, &[&k.public], Some(&k.private), "");
    let first = a.run(&[]).ok();
    assert_eq!(first.ran(), ["build", "deploy"], "{kind:?}");
    // The sensitive output never leaves the machine: only the app's bytes and the manifests are blobs.
    let blobs = store.names("blobs");
    let token = blake3::hash(b"secret").to_hex().to_string();
    assert!(!blobs.iter().any(|b| b.ends_with(&token)), "{kind:?}: the sensitive output was uploaded");
    // The check stage's success is an entry; the deploy's is its ledger record.
    assert_eq!(store.names("entries").len(), 1, "{kind:?}: {:?}", store.names(""));
    assert_eq!(store.names("ledger").len(), 1, "{kind:?}: {:?}", store.names(""));

    let b = runner(&store, BUILD_AND_DEPLOY, &[&k.public], None, "");
    let second = b.run(&[]).ok();
    assert!(second.ran().is_empty(), "{kind:?}: {}", second.stderr);
    assert_eq!(second.with_state("restored"), ["build"], "{kind:?}");
    assert_eq!(second.with_state("fresh"), ["deploy"], "{kind:?}: the shared ledger says it is deployed");
    assert_eq!(b.read("out/app.txt"), a.read("out/app.txt"));
    assert_eq!(b.read("out/app.txt"), "v1\nv1\n");
    assert!(!b.exists("out/token"), "{kind:?}: a sensitive output came from the remote");
    assert_eq!(std::fs::read_to_string(a.sibling("ran.log")).unwrap(), "build\ndeploy\n");
    assert!(!b.sibling("ran.log").exists(), "{kind:?}: b ran a stage");
    assert!(warnings(&second).is_empty(), "{kind:?}: {}", second.stderr);
}

fn a_pull_request_run_writes_nothing_even_with_the_signing_key(kind: Kind) {
    let store = Store::new(kind);
    let k = keygen();
    let pr = runner(&store, BUILD_AND_DEPLOY, &[&k.public], Some(&k.private), "");
    let r = pr.run(&["--event", "pull_request", "build"]).ok();
    assert_eq!(r.ran(), ["build"], "{kind:?}");
    assert!(store.names("").is_empty(), "{kind:?}: a pull request wrote {:?}", store.names(""));
    let status = pr.kk(&["remote", "status", "--event", "pull_request", "--json"]).ok().json();
    assert_eq!(status["mode"], "read-only");
    assert_eq!(status["why"], "a pull_request event never writes");
}

fn entries_signed_by_an_untrusted_key_are_misses(kind: Kind) {
    let store = Store::new(kind);
    let (mallory, k) = (keygen(), keygen());
    // Mallory can write to the bucket and signs with her own key.
    let m = runner(&store, BUILD_AND_DEPLOY, &[&mallory.public], Some(&mallory.private), "");
    m.write("src.txt", "v1\n");
    m.run(&["build"]).ok();
    assert_eq!(store.names("entries").len(), 1);
    let b = runner(&store, BUILD_AND_DEPLOY, &[&k.public], None, "");
    let r = b.run(&["build"]).ok();
    assert_eq!(r.ran(), ["build"], "{kind:?}: an untrusted entry was believed");
    let w = warnings(&r);
    assert_eq!(w.len(), 1, "{kind:?}: {}", r.stderr);
    assert!(w[0].contains("not in `trusted_keys`") && w[0].contains(&store.url), "{}", w[0]);
}

fn a_tampered_blob_or_entry_is_a_miss_and_the_right_output_is_made(kind: Kind) {
    let store = Store::new(kind);
    let k = keygen();
    let a = runner(&store, BUILD_AND_DEPLOY, &[&k.public], Some(&k.private), "");
    a.run(&["build"]).ok();
    let app = blake3::hash(b"v1\nv1\n").to_hex().to_string();
    store.tamper(&format!("blobs/{app}"), b"rm -rf /\n");

    let b = runner(&store, BUILD_AND_DEPLOY, &[&k.public], None, "");
    let r = b.run(&["build"]).ok();
    assert_eq!(r.ran(), ["build"], "{kind:?}");
    assert_eq!(b.read("out/app.txt"), "v1\nv1\n");
    assert!(r.stderr.contains("does not match its BLAKE3"), "{kind:?}: {}", r.stderr);

    // Now the entry: point its output at another path with a valid-looking body but the old signature.
    let entry = store.names("entries").pop().unwrap();
    let mut doc: serde_json::Value = serde_json::from_slice(&store.get(&entry)).unwrap();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut body: serde_json::Value =
        serde_json::from_slice(&b64.decode(doc["body"].as_str().unwrap()).unwrap()).unwrap();
    body["outputs"][0]["path"] = "pipeline.toml".into();
    doc["body"] = b64.encode(serde_json::to_vec(&body).unwrap()).into();
    store.tamper(&entry, &serde_json::to_vec(&doc).unwrap());
    let c = runner(&store, BUILD_AND_DEPLOY, &[&k.public], None, "");
    let before = c.read("pipeline.toml");
    let r = c.run(&["build"]).ok();
    assert_eq!(r.ran(), ["build"], "{kind:?}");
    assert!(r.stderr.contains("signature does not verify"), "{kind:?}: {}", r.stderr);
    assert_eq!(c.read("pipeline.toml"), before);
    assert_eq!(c.read("out/app.txt"), "v1\nv1\n");
}

/// Two writers of BUILD_AND_DEPLOY whose deploy fails while the file `fail-now` beside each repository exists.
fn failable_deployers(store: &Store, k: &Keys) -> (Repo, Repo) {
    let stages =
        BUILD_AND_DEPLOY.replace("echo deploy >> ../ran.log;", "echo deploy >> ../ran.log; test ! -e $FAIL &&");
    let stages = stages.replace("pass_env = [\"DEPLOYED\"]", "pass_env = [\"DEPLOYED\", \"FAIL\"]");
    let mut a = runner(store, &stages, &[&k.public], Some(&k.private), "");
    let mut b = runner(store, &stages, &[&k.public], Some(&k.private), "");
    a.set_env("FAIL", a.sibling("fail-now").to_str().unwrap());
    b.set_env("FAIL", b.sibling("fail-now").to_str().unwrap());
    (a, b)
}

fn a_failed_deploy_on_one_runner_makes_the_next_runner_redeploy(kind: Kind) {
    let store = Store::new(kind);
    let k = keygen();
    let (a, b) = failable_deployers(&store, &k);
    a.run(&[]).ok();
    // Runner b deploys the same key again (forced) and fails: the live state is unknown.
    std::fs::write(b.sibling("fail-now"), "").unwrap();
    let failed = b.run(&["--force", "deploy"]);
    assert_eq!(failed.code, 1, "{kind:?}: {}", failed.stderr);
    // Runner a's own cache says deployed; the shared ledger says the latest attempt failed.
    let again = a.run(&[]).ok();
    assert_eq!(again.ran(), ["deploy"], "{kind:?}: {}", again.stderr);
    assert_eq!(again.reason_of("deploy")["kind"], "last-run-failed", "{kind:?}");
    let status = a.kk(&["remote", "status", "--json"]).ok().json();
    let rec = &status["ledger"][0];
    assert_eq!((rec["state"].as_str(), rec["trusted"].as_bool()), (Some("success"), Some(true)), "{status:#}");
}

/// Helper 16: a store that listed `history/default/deploy` as a text prefix also returned `deploy-eu`'s
/// history, took it for a planted record and deployed `deploy` again on every run. Stages whose names share a
/// prefix stay deployed, and a fresh clone deploys neither.
fn deploy_stages_whose_names_share_a_prefix_stay_deployed(kind: Kind) {
    let store = Store::new(kind);
    let k = keygen();
    let stages = "[stages.deploy]\nkind = \"deploy\"\nrun = \"echo deploy >> ../ran.log\"\n\n\
                  [stages.deploy-eu]\nkind = \"deploy\"\nrun = \"echo deploy-eu >> ../ran.log\"\n";
    let a = runner(&store, stages, &[&k.public], Some(&k.private), "");
    assert_eq!(a.run(&[]).ok().ran(), ["deploy", "deploy-eu"]);
    let again = a.run(&[]).ok();
    assert!(again.ran().is_empty(), "{kind:?}: {}", again.stderr);
    assert!(warnings(&again).is_empty(), "{kind:?}: {}", again.stderr);
    let fresh_clone = runner(&store, stages, &[&k.public], Some(&k.private), "");
    let r = fresh_clone.run(&[]).ok();
    assert!(r.ran().is_empty(), "{kind:?}: {}", r.stderr);
}

/// Helper 17: a bucket prefix with characters the S3 client escapes (`~`, a space, `é`) was cut at the wrong
/// place when its objects were listed: no ledger record was found and every run deployed again.
fn a_prefix_with_characters_a_store_escapes_keeps_its_ledger(kind: Kind) {
    let store = Store::new(kind);
    let (url, _) = store.url.split_once("//").unwrap();
    let tail = &store.url[url.len() + 2..];
    let store = Store { url: format!("{url}//{tail}~team%20%C3%A9/kkpipe"), ..store };
    let k = keygen();
    let stages = "[stages.deploy]\nkind = \"deploy\"\nrun = \"echo deploy >> ../ran.log\"\n";
    let a = runner(&store, stages, &[&k.public], Some(&k.private), "");
    assert_eq!(a.run(&[]).ok().ran(), ["deploy"]);
    let fresh_clone = runner(&store, stages, &[&k.public], Some(&k.private), "");
    let r = fresh_clone.run(&[]).ok();
    assert!(r.ran().is_empty() && warnings(&r).is_empty(), "{kind:?}: {}", r.stderr);
    let status = fresh_clone.kk(&["remote", "status", "--json"]).ok().json();
    assert_eq!(status["ledger"].as_array().map(Vec::len), Some(1), "{kind:?}: {status:#}");
}

/// A deploy that takes a while and logs when it starts and ends, to one file shared by the runners.
fn slow_deploy(seconds: f64) -> String {
    format!(
        r#"
[stages.deploy]
kind = "deploy"
run = "echo start $(cat src.txt) >> $DEPLOYED; sleep {seconds}; echo end $(cat src.txt) >> $DEPLOYED"
inputs = ["src.txt"]
pass_env = ["DEPLOYED"]
"#
    )
}

/// Two runners whose deploys log to one shared file (returned too).
fn two_deployers(store: &Store, k: &Keys, a_stages: &str, b_stages: &str, extra: &str) -> (Repo, Repo, PathBuf) {
    let a = runner(store, a_stages, &[&k.public], Some(&k.private), extra);
    let mut b = runner(store, b_stages, &[&k.public], Some(&k.private), extra);
    let log = a.sibling("deployed.log");
    b.set_env("DEPLOYED", log.to_str().unwrap());
    (a, b, log)
}

/// Start `kkpipe ARGS` in `repo` and return once its deploy has begun (it wrote "start" to `log`).
fn deploy_started(repo: &Repo, log: &Path, args: &[&str], out: fn() -> Stdio) -> Child {
    let child = repo.cmd_in(&repo.root, args).stdout(out()).stderr(out()).spawn().unwrap();
    assert!(within(Duration::from_secs(20), || std::fs::read_to_string(log).is_ok_and(|l| l.contains("start"))));
    child
}

fn two_runners_deploying_the_same_stage_at_once_never_overlap(kind: Kind) {
    let store = Store::new(kind);
    let k = keygen();
    let (a, b, log) = two_deployers(&store, &k, &slow_deploy(1.5), &slow_deploy(1.5), "");
    b.write("src.txt", "v2\n");
    let first = deploy_started(&a, &log, &["run", "--json"], Stdio::piped);
    let second = b.kk(&["run", "--json", "--lock-timeout", "60"]).ok();
    let first = Run::from(first.wait_with_output().unwrap()).ok();
    assert_eq!(first.ran(), ["deploy"]);
    assert_eq!(second.ran(), ["deploy"], "{kind:?}: {}", second.stderr);
    // The race happened: b found a's lease and waited for it.
    assert!(second.stderr.contains("waiting for the deploy lease of `deploy`"), "{kind:?}: {}", second.stderr);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "start v1\nend v1\nstart v2\nend v2\n", "{kind:?}");
}

/// A deploy stage `rollout` that logs its start and end (with src.txt) and between them waits for `gate`, which
/// the test creates when it has seen what it wanted to see meanwhile; then `more` stages.
fn gated_rollout(gate: &Path, more: &str) -> String {
    format!(
        r#"
[stages.rollout]
kind = "deploy"
run = "echo start $(cat src.txt) >> $DEPLOYED; while [ ! -e {gate} ]; do sleep 0.02; done; echo end $(cat src.txt) >> $DEPLOYED"
inputs = ["src.txt"]
pass_env = ["DEPLOYED"]
{more}"#,
        gate = gate.display()
    )
}

/// Issue 20: the wait for a deploy lease is a job of its own. While runner a holds `rollout`'s lease (its deploy
/// waits for a gate the test opens), runner b's `side` and its dependent `after` run, stream their output and
/// are recorded; b's `rollout` runs only once a's has ended.
#[test]
fn while_a_deploy_waits_for_its_lease_independent_stages_run_stream_and_are_recorded() {
    let store = Store::new(Kind::File);
    let k = keygen();
    let gate = store._tmp.path().join("gate");
    let stages = gated_rollout(
        &gate,
        "\n[stages.side]\nrun = \"echo side-ran\"\n\n[stages.after]\nneeds = [\"side\"]\nrun = \"echo after-ran\"\n",
    );
    let (a, b, log) = two_deployers(&store, &k, &stages, &stages, "");
    b.write("src.txt", "v2\n");
    let first = deploy_started(&a, &log, &["run", "--json", "rollout"], Stdio::piped);
    let mut second = Live::spawn(b.cmd_in(&b.root, &["run", "-j", "2", "--lock-timeout", "60"]));
    // b's output arrives, and its stages end, while a still deploys (its gate is closed).
    second.until(Duration::from_secs(30), |l| l.contains("after-ran"));
    second.until(Duration::from_secs(30), |l| l.trim_start().starts_with("Ok after"));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "start v1\n", "a's deploy is still running");
    assert!(second.seen.iter().any(|l| l.starts_with("side") && l.contains("side-ran")), "{:#?}", second.seen);
    let status = b.status_json();
    let state =
        |name: &str| status["stages"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()["state"].clone();
    assert_eq!(
        (state("side"), state("after")),
        ("fresh".into(), "fresh".into()),
        "recorded during the wait: {status:#}"
    );
    std::fs::write(&gate, "").unwrap();
    let first = Run::from(first.wait_with_output().unwrap()).ok();
    assert_eq!(first.ran(), ["rollout"]);
    let (second, seen) = second.finish();
    let second = second.ok();
    assert!(
        seen.iter().any(|l| l.contains("waiting for the deploy lease of `rollout`")),
        "{seen:#?}\n{}",
        second.stderr
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "start v1\nend v1\nstart v2\nend v2\n");
    assert_eq!(b.state_of("rollout"), "fresh");
}

/// A failure under `--fail-fast` starts nothing new: a deploy waiting for another runner's lease stops waiting at
/// once and is skipped, instead of keeping the run alive until the lease comes (or `--lock-timeout`).
#[test]
fn a_failure_with_fail_fast_ends_a_lease_wait_at_once() {
    let store = Store::new(Kind::File);
    let k = keygen();
    let gate = store._tmp.path().join("gate");
    let stages = gated_rollout(&gate, "\n[stages.broken]\nrun = \"sleep 0.5; exit 3\"\n");
    let (a, b, log) = two_deployers(&store, &k, &stages, &stages, "");
    b.write("src.txt", "v2\n");
    let first = deploy_started(&a, &log, &["run", "--json", "rollout"], Stdio::piped);
    // a's deploy goes on until after b has ended: a b that waited for the lease would give up only after 60 s,
    // with `rollout` failed (held too long), not skipped.
    let second = b.run(&["-j", "2", "--fail-fast", "--lock-timeout", "60"]);
    std::fs::write(&gate, "").unwrap();
    Run::from(first.wait_with_output().unwrap()).ok();
    assert_eq!(second.code, 1, "{}", second.stderr);
    assert!(
        second.stderr.contains("waiting for the deploy lease of `rollout`"),
        "the race happened: {}",
        second.stderr
    );
    assert_eq!(second.with_state("failed"), ["broken"]);
    assert_eq!(second.with_state("skipped"), ["rollout"], "{}", second.stderr);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "start v1\nend v1\n", "only a deployed");
}

fn the_second_runner_skips_when_the_first_deployed_the_same_key_while_it_waited(kind: Kind) {
    let store = Store::new(kind);
    let k = keygen();
    let (a, b, log) = two_deployers(&store, &k, &slow_deploy(1.5), &slow_deploy(1.5), "");
    let first = deploy_started(&a, &log, &["run", "--json"], Stdio::piped);
    let second = b.kk(&["run", "--json", "--lock-timeout", "60"]).ok();
    Run::from(first.wait_with_output().unwrap()).ok();
    assert!(second.stderr.contains("waiting for the deploy lease"), "{kind:?}: {}", second.stderr);
    assert!(second.ran().is_empty(), "{kind:?}: {}", second.stderr);
    assert_eq!(second.with_state("fresh"), ["deploy"]);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "start v1\nend v1\n", "{kind:?}");
}

fn a_lease_whose_holder_was_killed_expires_and_the_next_run_deploys(kind: Kind) {
    let store = Store::new(kind);
    let k = keygen();
    // A waiter judges expiry on its own clock from when it first sees the lease: it waits the whole 2 s.
    let (a, b, log) = two_deployers(&store, &k, &slow_deploy(60.0), &slow_deploy(0.0), "lease_seconds = 2");
    let mut holder = deploy_started(&a, &log, &["run"], Stdio::null);
    holder.kill().unwrap(); // SIGKILL: no release, no ledger update
    holder.wait().unwrap();
    let started = Instant::now();
    let next = b.kk(&["run", "--json", "--lock-timeout", "30"]).ok();
    assert!(next.stderr.contains("waiting for the deploy lease"), "{kind:?}: {}", next.stderr);
    assert_eq!(next.ran(), ["deploy"], "{kind:?}: the dead holder's deploy never ended: deploy again");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(warnings(&next).is_empty(), "{kind:?}: {}", next.stderr);
    assert!(std::fs::read_to_string(&log).unwrap().ends_with("start v1\nend v1\n"));
}

fn eight_concurrent_publishers_of_one_key_leave_one_valid_entry(kind: Kind) {
    let store = Store::new(kind);
    let k = keygen();
    let gate = tempfile::tempdir().unwrap();
    // Each runner's build waits until all eight are running, so all eight publish at about the same time.
    let stages = format!(
        r#"
[stages.build]
run = "touch {gate}/$$; while [ $(ls {gate} | wc -l) -lt 8 ]; do sleep 0.05; done; mkdir -p out; cat src.txt > out/app.txt"
inputs = ["src.txt"]
outputs = ["out/app.txt"]
"#,
        gate = gate.path().display()
    );
    let runners: Vec<Repo> = (0..8).map(|_| runner(&store, &stages, &[&k.public], Some(&k.private), "")).collect();
    let children: Vec<_> = runners
        .iter()
        .map(|r| r.cmd_in(&r.root, &["run", "--json"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap())
        .collect();
    for c in children {
        let r = Run::from(c.wait_with_output().unwrap()).ok();
        assert_eq!(r.ran(), ["build"], "{kind:?}");
    }
    assert_eq!(std::fs::read_dir(gate.path()).unwrap().count(), 8, "all eight ran at once");
    assert_eq!(store.names("entries").len(), 1, "{kind:?}: {:?}", store.names("entries"));
    let ninth = runner(&store, &stages, &[&k.public], None, "");
    let r = ninth.run(&[]).ok();
    assert_eq!(r.with_state("restored"), ["build"], "{kind:?}: {}", r.stderr);
    assert!(warnings(&r).is_empty(), "{kind:?}: {}", r.stderr);
}

/// The store contract on the real server: create-only and compare-and-swap hold when eight writers race for
/// one name (exactly one wins each round), a stale version is refused, listing and deleting work. This is what
/// leases and the ledger stand on; the scenarios above rarely make two writes meet.
fn the_store_keeps_its_contract_when_writers_race(kind: Kind) {
    let store = Store::new(kind);
    let s = store.s3();
    let name = "ledger/prod/contract";
    assert!(s.get(name).unwrap().is_none(), "{kind:?}");
    // Each round's bytes differ from every earlier round's: a write of the bytes already there may succeed on
    // a store whose version is the content's digest (an ETag, a git object id), and is no change.
    let race = |round: u8, expected: Option<kkpipe::store::Version>| -> Vec<kkpipe::store::Version> {
        std::thread::scope(|scope| {
            let writers: Vec<_> = (0..8u8)
                .map(|i| {
                    let (s, expected) = (&s, expected.clone());
                    scope.spawn(move || s.put_if(name, vec![round, i], expected.as_ref()).unwrap())
                })
                .collect();
            writers.into_iter().filter_map(|w| w.join().unwrap()).collect()
        })
    };
    let created = race(0, None);
    assert_eq!(created.len(), 1, "{kind:?}: exactly one create-only writer wins");
    let (bytes, v1) = s.get(name).unwrap().unwrap();
    assert_eq!(v1, created[0], "{kind:?}");
    let swapped = race(1, Some(v1.clone()));
    assert_eq!(swapped.len(), 1, "{kind:?}: exactly one compare-and-swap from one version wins");
    assert!(s.put_if(name, b"late".to_vec(), Some(&v1)).unwrap().is_none(), "{kind:?}: a stale version");
    let (now, v2) = s.get(name).unwrap().unwrap();
    assert_ne!(now, bytes, "{kind:?}");
    assert_eq!(v2, swapped[0], "{kind:?}");
    s.put_if("blobs/ab", b"x".to_vec(), None).unwrap().unwrap();
    assert_eq!(store.names("ledger"), [name], "{kind:?}");
    // Below a name as a directory: `history/prod` is not `history/prod-eu`.
    s.put_if("ledger/prod-eu/contract", b"x".to_vec(), None).unwrap().unwrap();
    assert_eq!(store.names("ledger/prod"), [name], "{kind:?}");
    assert!(s.exists("blobs/ab").unwrap());
    s.delete("blobs/ab").unwrap();
    s.delete("blobs/ab").unwrap();
    assert!(!s.exists("blobs/ab").unwrap(), "{kind:?}");
}

fn a_store_killed_mid_run_gives_one_warning_and_the_deploy_fails_closed(kind: Kind) {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = match kind {
        Kind::Git => {
            let base = tmp.path().join("server");
            let (endpoint, child) = start_git_daemon(&base);
            git(&base, &["init", "-q", "--bare", "killed.git"]);
            Server { endpoint, child }
        }
        _ => start(kind, &tmp.path().join("server")),
    };
    let store = match kind {
        Kind::Git => {
            let url = format!("git:{}/killed.git", server.endpoint);
            Store { url, endpoint: None, dir: PathBuf::new(), _tmp: tempfile::tempdir().unwrap() }
        }
        _ => Store::on(kind, server.endpoint.clone(), "killed".into(), tempfile::tempdir().unwrap()),
    };
    let k = keygen();
    let stages = format!(
        r#"
[stages.one]
run = "mkdir -p out; echo one > out/one; kill -9 {pid} 2> /dev/null || true; sleep 0.5"
outputs = ["out/one"]

[stages.two]
needs = ["one"]
run = "cat out/one > out/two"
outputs = ["out/two"]

[stages.three]
kind = "deploy"
needs = ["two"]
run = "cat out/two"
"#,
        pid = server.child.id()
    );
    let r = runner(&store, &stages, &[&k.public], Some(&k.private), "");
    let run = r.run(&[]);
    assert!(server.child.try_wait().unwrap().is_some(), "{kind:?}: the store was not killed");
    // Issue 23, item 4: the check stages go on locally; the deploy fails closed (exit 4), naming the store.
    assert_eq!(run.code, 4, "{kind:?}: {}", run.stderr);
    assert_eq!(run.ran(), ["one", "two"]);
    let w = warnings(&run);
    assert_eq!(w.len(), 1, "{kind:?}: one warning, naming the remote: {}", run.stderr);
    assert!(w[0].contains(&store.url) && w[0].contains("did not answer"), "{}", w[0]);
    assert!(
        run.stderr.contains("not deployed") && run.stderr.contains("`three`") && run.stderr.contains("--remote off"),
        "{kind:?}: {}",
        run.stderr
    );
    // `--remote off` is the explicit way to deploy alone.
    let again = r.kk(&["run", "--json", "--remote", "off", "--force"]).ok();
    assert_eq!(again.ran(), ["one", "two", "three"]);
}

#[test]
fn a_deploy_with_a_read_only_remote_is_refused_not_run_without_the_lease() {
    let store = Store::new(Kind::File);
    let k = keygen();
    let r = runner(&store, BUILD_AND_DEPLOY, &[&k.public], None, "");
    let run = r.run(&[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(run.ran(), ["build"]);
    assert!(run.stderr.contains("is read-only (KKPIPE_SIGNING_KEY is not set)"), "{}", run.stderr);
    assert!(!r.sibling("deployed.log").exists());
    // `--remote off` is the explicit way to deploy on one's own.
    let own = r.run(&["--remote", "off"]).ok();
    assert_eq!(own.ran(), ["deploy"]);
}

#[test]
fn remote_configuration_errors_name_the_file_line_and_variable() {
    let store = Store::new(Kind::File);
    let r = runner(&store, BUILD_AND_DEPLOY, &["ed25519:bm90IGEga2V5"], None, "");
    let bad = r.kk(&["status"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("pipeline.toml:3:") && bad.stderr.contains("trusted_keys"), "{}", bad.stderr);
    assert!(bad.stderr.contains("kkpipe remote keygen"), "{}", bad.stderr);

    let k = keygen();
    let mut r = runner(&store, BUILD_AND_DEPLOY, &[&k.public], None, "");
    r.set_env("KKPIPE_SIGNING_KEY", &k.public);
    let bad = r.kk(&["run"]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("KKPIPE_SIGNING_KEY is not a private key"), "{}", bad.stderr);
    assert!(store.names("").is_empty());

    r.set_env("KKPIPE_SIGNING_KEY", &k.private);
    r.set_env("KKPIPE_REMOTE", "off");
    let off = r.kk(&["remote", "status"]).ok();
    assert_eq!(off.stdout, "remote: off (KKPIPE_REMOTE=off)\n");
}

#[test]
fn remote_gc_removes_old_entries_and_unnamed_blobs_but_keeps_what_the_ledger_names() {
    let store = Store::new(Kind::File);
    let k = keygen();
    let a = runner(&store, BUILD_AND_DEPLOY, &[&k.public], Some(&k.private), "");
    a.run(&[]).ok();
    a.write("src.txt", "v2\n");
    a.run(&[]).ok();
    assert_eq!(store.names("entries").len(), 2);
    let stray = blake3::hash(b"stray").to_hex().to_string();
    std::fs::write(store.dir.join(format!("blobs/{stray}")), "stray").unwrap();
    // Nothing is old yet: only the stray blob goes (with no grace period).
    a.kk(&["cache", "gc", "--remote", "--grace-hours", "0"]).ok();
    assert!(!store.names("blobs").iter().any(|b| b.ends_with(&stray)));
    assert_eq!(store.names("entries").len(), 2);
    // Every entry is "old" now: both go, and the blobs only they named; the deploy's ledger record keeps its
    // manifest.
    let gc = a.kk(&["cache", "gc", "--remote", "--max-age", "0", "--grace-hours", "0"]).ok();
    assert!(gc.stderr.contains("removed 2 entries"), "{}", gc.stderr);
    assert!(!store.names("blobs").iter().any(|b| b.ends_with(&blake3::hash(b"v2\nv2\n").to_hex().to_string())));
    let b = runner(&store, BUILD_AND_DEPLOY, &[&k.public], None, "");
    b.write("src.txt", "v2\n");
    let r = b.run(&["deploy"]).ok();
    assert!(r.ran().contains(&"build".to_string()), "the v2 build entry was collected");
    assert_eq!(r.with_state("fresh"), ["deploy"], "the ledger still says v2 is deployed: {}", r.stderr);
    // A pull request's job cannot collect, whatever key it holds.
    let mut pr = runner(&store, BUILD_AND_DEPLOY, &[&k.public], Some(&k.private), "");
    pr.set_env("GITHUB_ACTIONS", "true").set_env("GITHUB_EVENT_NAME", "pull_request");
    let refused = pr.kk(&["cache", "gc", "--remote", "--max-age", "0", "--grace-hours", "0"]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("read-only here (a pull_request event never writes)"), "{}", refused.stderr);
    assert_eq!(store.names("ledger").len(), 1);
}

#[test]
fn a_deploy_lease_held_past_the_lock_timeout_exits_4_without_deploying() {
    let store = Store::new(Kind::File);
    let k = keygen();
    let (a, b, log) = two_deployers(&store, &k, &slow_deploy(4.0), &slow_deploy(0.0), "");
    b.write("src.txt", "v2\n");
    let first = deploy_started(&a, &log, &["run", "--json"], Stdio::piped);
    let late = b.kk(&["run", "--json", "--lock-timeout", "1"]);
    Run::from(first.wait_with_output().unwrap()).ok();
    assert_eq!(late.code, 4, "{}", late.stderr);
    assert!(
        late.stderr.contains("is being deployed by") && late.stderr.contains("raise --lock-timeout"),
        "{}",
        late.stderr
    );
    assert_eq!(late.with_state("failed"), ["deploy"]);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "start v1\nend v1\n", "b deployed without the lease");
}

#[test]
fn a_signing_key_that_is_not_trusted_makes_the_remote_read_only() {
    let store = Store::new(Kind::File);
    let (k, other) = (keygen(), keygen());
    let r = runner(&store, BUILD_AND_DEPLOY, &[&k.public], Some(&other.private), "");
    let status = r.kk(&["remote", "status", "--json"]).ok();
    assert_eq!(status.json()["mode"], "read-only");
    assert_eq!(status.json()["why"], "KKPIPE_SIGNING_KEY's public key is not in `[remote] trusted_keys`");
    let run = r.run(&["build"]).ok();
    assert!(run.stderr.contains("using the remote") && run.stderr.contains("read-only"), "{}", run.stderr);
    assert!(store.names("").is_empty(), "an untrusted key wrote {:?}", store.names(""));
}

#[test]
fn a_deploy_the_shared_ledger_never_heard_of_is_not_overruled_by_an_older_record() {
    let store = Store::new(Kind::File);
    let k = keygen();
    let (a, b) = failable_deployers(&store, &k);
    a.run(&[]).ok();
    b.write("src.txt", "v2\n");
    b.run(&[]).ok(); // the ledger: v2 deployed, which a has not seen
    // a deploys v3 on its own (no remote) and fails: the last thing applied is a failed v3.
    a.write("src.txt", "v3\n");
    std::fs::write(a.sibling("fail-now"), "").unwrap();
    assert_eq!(a.run(&["--remote", "off"]).code, 1);
    std::fs::remove_file(a.sibling("fail-now")).unwrap();
    // Back on the remote at v2: the ledger's "v2 deployed" predates a's failed v3, so a deploys again.
    a.write("src.txt", "v2\n");
    let again = a.run(&[]).ok();
    assert_eq!(again.ran().last().map(String::as_str), Some("deploy"), "{}", again.stderr);
    // Now a is in step with the ledger: the next run is a no-op.
    let next = a.run(&[]).ok();
    assert!(next.ran().is_empty(), "{}", next.stderr);
}

/// The scenarios above that take a store's kind, as one test per store (so the stores run in parallel, and a
/// failure names its store).
macro_rules! on_stores {
    ($($store:ident: $kind:ident),*; $names:tt) => {
        $( on_stores!(@one $store $kind $names); )*
    };
    (@one $store:ident $kind:ident [$($name:ident),* $(,)?]) => {
        mod $store {
            $( #[test] fn $name() { super::$name(super::Kind::$kind) } )*
        }
    };
}

on_stores!(file: File, seaweedfs: Seaweed, moto: Moto, gcs: Gcs, git: Git; [
    two_clones_share_hits_byte_for_byte_and_nothing_runs_twice,
    a_pull_request_run_writes_nothing_even_with_the_signing_key,
    entries_signed_by_an_untrusted_key_are_misses,
    a_tampered_blob_or_entry_is_a_miss_and_the_right_output_is_made,
    a_failed_deploy_on_one_runner_makes_the_next_runner_redeploy,
    two_runners_deploying_the_same_stage_at_once_never_overlap,
    the_second_runner_skips_when_the_first_deployed_the_same_key_while_it_waited,
    a_lease_whose_holder_was_killed_expires_and_the_next_run_deploys,
    eight_concurrent_publishers_of_one_key_leave_one_valid_entry,
    the_store_keeps_its_contract_when_writers_race,
    deploy_stages_whose_names_share_a_prefix_stay_deployed,
]);

#[test]
fn an_escaped_prefix_keeps_its_ledger_on_seaweedfs() {
    a_prefix_with_characters_a_store_escapes_keeps_its_ledger(Kind::Seaweed);
}

#[test]
fn an_escaped_prefix_keeps_its_ledger_on_moto() {
    a_prefix_with_characters_a_store_escapes_keeps_its_ledger(Kind::Moto);
}

#[test]
fn an_escaped_prefix_keeps_its_ledger_on_gcs() {
    a_prefix_with_characters_a_store_escapes_keeps_its_ledger(Kind::Gcs);
}

#[test]
fn a_seaweedfs_store_killed_mid_run_gives_one_warning_and_the_deploy_fails_closed() {
    a_store_killed_mid_run_gives_one_warning_and_the_deploy_fails_closed(Kind::Seaweed);
}

#[test]
fn a_moto_store_killed_mid_run_gives_one_warning_and_the_deploy_fails_closed() {
    a_store_killed_mid_run_gives_one_warning_and_the_deploy_fails_closed(Kind::Moto);
}

#[test]
fn a_gcs_store_killed_mid_run_gives_one_warning_and_the_deploy_fails_closed() {
    a_store_killed_mid_run_gives_one_warning_and_the_deploy_fails_closed(Kind::Gcs);
}

#[test]
fn a_git_store_killed_mid_run_gives_one_warning_and_the_deploy_fails_closed() {
    a_store_killed_mid_run_gives_one_warning_and_the_deploy_fails_closed(Kind::Git);
}

/// Issue 21, item 6: the sequence number of a ledger record nobody signed was used. Anyone who can write the
/// bucket planted `seq = u64::MAX`: the next signed record overflowed (a panic here, a wrap to 0 in a release
/// build) and runners that had seen a record ignored every later one. Only believed records order the ledger.
#[test]
fn an_unsigned_ledger_record_with_the_largest_seq_is_never_used() {
    let store = Store::new(Kind::File);
    let k = keygen();
    let a = runner(&store, BUILD_AND_DEPLOY, &[&k.public], Some(&k.private), "");
    a.run(&[]).ok();
    let name = "ledger/default/deploy";
    let mut doc: serde_json::Value = serde_json::from_slice(&store.get(name)).unwrap();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut body: serde_json::Value =
        serde_json::from_slice(&b64.decode(doc["body"].as_str().unwrap()).unwrap()).unwrap();
    body["seq"] = u64::MAX.into();
    doc["body"] = b64.encode(serde_json::to_vec(&body).unwrap()).into();
    store.tamper(name, &serde_json::to_vec(&doc).unwrap());

    // A fresh writer does not believe the planted head: it deploys again and writes a signed record.
    let b = runner(&store, BUILD_AND_DEPLOY, &[&k.public], Some(&k.private), "");
    b.write("src.txt", "v2\n");
    let r = b.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.ran(), ["build", "deploy"], "{}", r.stderr);
    assert!(r.stderr.contains("not believed"), "{}", r.stderr);
    // a, which saw the first record, learns b's: v2 is deployed now, so a deploys v1 again.
    let again = a.run(&[]).ok();
    assert_eq!(again.ran(), ["deploy"], "{}", again.stderr);
    // And a fresh runner with v1 finds a's record the latest: nothing to do.
    let c = runner(&store, BUILD_AND_DEPLOY, &[&k.public], None, "");
    let fresh = c.run(&[]).ok();
    assert_eq!(fresh.with_state("fresh"), ["deploy"], "{}", fresh.stderr);
}

/// A file store on which a runner deployed v1, then v2; with the team's keys and v1's signed ledger record.
fn deployed_v1_then_v2() -> (Store, Keys, Vec<u8>) {
    let store = Store::new(Kind::File);
    let k = keygen();
    let a = runner(&store, BUILD_AND_DEPLOY, &[&k.public], Some(&k.private), "");
    a.run(&[]).ok();
    let v1_record = store.get("ledger/default/deploy");
    a.write("src.txt", "v2\n");
    assert_eq!(a.run(&[]).ok().ran(), ["build", "deploy"]);
    (store, k, v1_record)
}

/// Issue 21, item 5: anyone with write access to the bucket (no signing key needed) could put an older signed
/// ledger record back at the head, and a fresh runner believed an older deploy was the latest and skipped. Every
/// record is also kept create-only under its number in the ledger's history, and a head older than the history
/// is not believed as the latest.
#[test]
fn a_replayed_older_ledger_record_does_not_make_a_fresh_runner_skip() {
    let (store, k, v1_record) = deployed_v1_then_v2();
    let head = "ledger/default/deploy";
    assert_eq!(
        store.names("history/default/deploy").len(),
        4,
        "every record is kept (each deploy writes running, then its end)"
    );
    // The attacker puts v1's record back at the head: it is validly signed, only old.
    store.tamper(head, &v1_record);

    // A fresh runner on v1 (a revert) must deploy: v2 is what is live.
    let c = runner(&store, BUILD_AND_DEPLOY, &[&k.public], Some(&k.private), "");
    let r = c.run(&[]).ok();
    assert_eq!(r.ran(), ["build", "deploy"], "{}", r.stderr);
    assert!(r.stderr.contains("its history holds 4"), "the replay is named: {}", r.stderr);
    // Without the replay, the same question has the honest answer: v2 is fresh for a v2 runner.
    let d = runner(&store, BUILD_AND_DEPLOY, &[&k.public], None, "");
    d.write("src.txt", "v1\n");
    assert_eq!(d.run(&[]).ok().with_state("fresh"), ["deploy"], "c's v1 deploy is the head now");
}

/// Issue 21, item 10: waiters expired a lease after their own `lease_seconds` while its holder renewed on its own
/// schedule, so runners on commits with 30 s and 1 s deployed at once. A lease carries its lifetime and a waiter
/// honours the longer one.
#[test]
fn runners_with_different_lease_lifetimes_never_deploy_at_once() {
    let store = Store::new(Kind::File);
    let k = keygen();
    let gate = store._tmp.path().join("gate");
    let a = runner(&store, &gated_rollout(&gate, ""), &[&k.public], Some(&k.private), "lease_seconds = 30");
    let mut b = runner(&store, &gated_rollout(&gate, ""), &[&k.public], Some(&k.private), "lease_seconds = 1");
    let log = a.sibling("deployed.log");
    b.set_env("DEPLOYED", log.to_str().unwrap());
    b.write("src.txt", "v2\n");
    // a holds the lease (renewing every 10 s, so its object does not change during the test).
    let first = deploy_started(&a, &log, &["run", "--json"], Stdio::piped);
    let mut second = Live::spawn(b.cmd_in(&b.root, &["run", "--lock-timeout", "60"]));
    second.until(Duration::from_secs(30), |l| l.contains("waiting for the deploy lease of `rollout`"));
    // Three of b's own lifetimes pass with a's lease unchanged: by its own lifetime b would have taken it.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "start v1\n", "b has not started while a deploys");
    std::fs::write(&gate, "").unwrap();
    assert_eq!(Run::from(first.wait_with_output().unwrap()).ok().ran(), ["rollout"]);
    let (second, _) = second.finish();
    second.ok();
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "start v1\nend v1\nstart v2\nend v2\n");
}

/// Review of item 5: planting copies of an old record under new, higher names in the history hid the real newer
/// records from a reader that looked at the newest few only, and the replayed head was believed again. History
/// objects above the head that are no believed records mean the head is not believed: deploy again.
#[test]
fn planted_history_names_cannot_hide_a_newer_deploy() {
    let (store, k, v1_record) = deployed_v1_then_v2();
    let head = "ledger/default/deploy";
    store.tamper(head, &v1_record);
    for n in 91..=99u64 {
        let name = format!("history/default/deploy/{n:020}");
        std::fs::write(store.dir.join(&name), &v1_record).unwrap();
    }
    let c = runner(&store, BUILD_AND_DEPLOY, &[&k.public], None, "");
    let r = c.run(&["--remote", "read-only"]);
    assert!(r.stderr.contains("head is not believed"), "{}", r.stderr);
    assert_ne!(c.state_of("deploy"), "fresh", "a v1 runner does not take v1 for what is live: {}", r.stderr);
}

/// Third review of issue 21: a deploy could take its lease (from the store itself) after the run had counted the
/// store down, then neither read nor write the ledger, and run: another runner then took the older record for
/// what is live and skipped. A deploy starts only once the ledger has its `running` record.
#[test]
fn a_deploy_the_ledger_cannot_record_is_not_run() {
    let store = Store::new(Kind::File);
    let k = keygen();
    let a = runner(&store, BUILD_AND_DEPLOY, &[&k.public], Some(&k.private), "");
    // The store grants the lease but takes no ledger record (a policy that allows `leases/` only).
    std::fs::create_dir_all(store.dir.join("ledger/default/deploy/in-the-way")).unwrap();
    let r = a.run(&[]);
    assert_eq!(r.code, 4, "{}", r.all());
    assert_eq!(r.ran(), ["build"], "the check stage runs, the deploy does not");
    assert!(r.stderr.contains("did not take the record") && r.stderr.contains("`deploy`"), "{}", r.stderr);
    assert!(!a.sibling("deployed.log").exists(), "nothing was deployed");
    std::fs::remove_dir_all(store.dir.join("ledger/default/deploy")).unwrap();
    assert_eq!(a.run(&[]).ok().ran(), ["deploy"], "once the ledger takes it, the deploy runs");
}

/// Issue 23, item 2, on the demo with real terraform: `git:origin` keeps the ledger in the repository's own
/// remote. A runner that lost `.kkpipe/` (a new clone, an evicted CI cache) deploys nothing another runner
/// deployed; a pull request's run and its preview write no ref.
#[test]
fn a_git_origin_remote_keeps_the_demos_ledger_and_a_pull_request_writes_no_ref() {
    let mut repo = Repo::kkp_demo();
    let origin = tempfile::tempdir().unwrap();
    git(origin.path(), &["init", "-q", "--bare", "origin.git"]);
    let keys = keygen();
    let toml = repo.read("pipeline.toml");
    repo.write(
        "pipeline.toml",
        &format!("[remote]\nurl = \"git:origin\"\ntrusted_keys = [\"{}\"]\n\n{toml}", keys.public),
    );
    git(&repo.root, &["init", "-q", "-b", "main"]);
    git(&repo.root, &["remote", "add", "origin", origin.path().join("origin.git").to_str().unwrap()]);
    git(&repo.root, &["add", "-A"]);
    git(&repo.root, &["commit", "-qm", "initial"]);
    let root = repo.root.clone();
    let refs = || git(&root, &["ls-remote", "origin", "refs/kkpipe/*"]);
    let push = ["--event", "push", "--branch", "main"];
    repo.set_env("KKPIPE_SIGNING_KEY", &keys.private);
    let first = repo.run(&push).ok();
    assert!(first.ran().contains(&"kkp-deploy".to_string()), "{}", first.stderr);
    let ledger = refs();
    assert!(ledger.contains("refs/kkpipe/ledger/default/kkp-deploy"), "{ledger}");
    assert!(git(&repo.root, &["branch", "-r"]).trim().is_empty() && !ledger.contains("refs/heads/"));

    // The cache is gone; the remote's ledger says what is deployed.
    std::fs::remove_dir_all(repo.path(".kkpipe")).unwrap();
    let again = repo.run(&push).ok();
    let deploys = ["terraform-apply", "kubeone-apply", "kkp-deploy", "dns-update", "flux-bootstrap"];
    let ran = again.ran();
    assert!(deploys.iter().all(|d| !ran.contains(&d.to_string())), "deployed again: {ran:?}\n{}", again.stderr);

    // A pull request: its run and its preview (in the pull request's CI job) write no ref.
    repo.set_env("KKPIPE_SIGNING_KEY", "");
    git(&repo.root, &["checkout", "-qb", "scale"]);
    repo.edit("terraform/aws/terraform.tfvars", "t3.large", "t3.xlarge");
    git(&repo.root, &["commit", "-qam", "Bigger control plane"]);
    let before = refs();
    repo.run(&["--event", "pull_request", "--branch", "main"]).ok();
    let pr_job = [("GITHUB_ACTIONS", "true"), ("GITHUB_EVENT_NAME", "pull_request"), ("GITHUB_BASE_REF", "main")];
    let mut in_job = repo.cmd_in(&repo.root, &["preview"]);
    in_job.envs(pr_job);
    let preview = Run::from(in_job.output().unwrap()).ok();
    assert!(!preview.stderr.contains("stored the reviewed plan"), "{}", preview.stderr);
    assert_eq!(refs(), before, "a pull request wrote a ref");
}

/// Issue 23, item 5: moving an installation onto the remote. A runner that deployed before the remote knew of
/// it (here with `--remote off`) publishes its record once it writes; `remote status` says where records live;
/// a fresh clone then deploys nothing, and `history --stage` shows the remote's ledger.
#[test]
fn a_runners_local_deploy_record_is_published_once_and_a_fresh_clone_deploys_nothing() {
    let store = Store::new(Kind::File);
    let k = keygen();
    let a = runner(&store, BUILD_AND_DEPLOY, &[&k.public], Some(&k.private), "");
    let alone = a.kk(&["run", "--json", "--remote", "off"]).ok();
    assert_eq!(alone.ran(), ["build", "deploy"]);
    assert!(store.names("ledger").is_empty());
    let status = a.kk(&["remote", "status"]).ok();
    assert!(
        status.stdout.contains(
            "0 ledger records on the remote, 1 deploy stage with a newer record in this cache only: `deploy`"
        ),
        "{}",
        status.stdout
    );

    let published = a.run(&[]).ok();
    assert!(published.ran().is_empty(), "{}", published.stderr);
    assert!(
        published.stderr.contains("had no record of `deploy`: published what this cache remembers deployed"),
        "{}",
        published.stderr
    );
    assert_eq!(store.names("ledger"), ["ledger/default/deploy"]);
    let status = a.kk(&["remote", "status"]).ok();
    assert!(status.stdout.contains("1 ledger record on the remote, 0 deploy stages"), "{}", status.stdout);
    let again = a.run(&[]).ok();
    assert!(!again.stderr.contains("published"), "published once: {}", again.stderr);

    // A new clone (an evicted CI cache): the check stage runs again, the deploy does not.
    let b = runner(&store, BUILD_AND_DEPLOY, &[&k.public], Some(&k.private), "");
    let history = b.kk(&["history", "--stage", "deploy"]).ok();
    assert!(
        history.stdout.contains("the ledger on the remote") && history.stdout.contains("success"),
        "{}",
        history.stdout
    );
    let fresh = b.run(&[]).ok();
    assert_eq!(fresh.ran(), ["build"], "{}", fresh.stderr);
    let deployed = std::fs::read_to_string(a.sibling("deployed.log")).unwrap();
    assert_eq!(deployed.matches("v1").count(), 2, "deployed once (`cat src.txt src.txt`): {deployed}");
    let json = b.kk(&["history", "--stage", "deploy", "--json"]).ok().json();
    let remote: Vec<&serde_json::Value> = json.as_array().unwrap().iter().filter(|r| r["where"] == "remote").collect();
    assert_eq!(remote.len(), 1, "{json:#}");
    assert_eq!((remote[0]["state"].as_str(), remote[0]["trusted"].as_bool()), (Some("success"), Some(true)));
}
