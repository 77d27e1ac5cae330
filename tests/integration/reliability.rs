//! Reliability and security: kills at random points, concurrent runs, interrupts, hostile and odd input
//! files, a read-only or full disk, and secrets at rest.

use crate::harness::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A small deterministic generator: the fault-injection test is seeded and reproducible.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const FAULT_PIPELINE: &str = r#"
[stages.gen]
run = ["mkdir -p out", "cat src/*.txt | tr a-z A-Z > out/gen.txt", "sleep 0.05"]
inputs = ["src"]
outputs = ["out/gen.txt"]

[stages.big]
run = ["head -c 3000000 /dev/zero | tr '\\0' x > big.bin", "cat src/*.txt >> big.bin"]
inputs = ["src"]
outputs = ["big.bin"]

[stages.use]
run = ["cat out/gen.txt > out/use.txt", "sleep 0.05"]
needs = ["gen"]
outputs = ["out/use.txt"]

[stages.deploy]
kind = "deploy"
run = "cat out/use.txt >> deploys.log"
needs = ["use", "big"]
"#;

/// What must hold after any crash: the database is intact, nothing claims success without its outputs.
fn check_invariants(repo: &Repo, context: &str) {
    let conn = rusqlite::Connection::open(repo.path(".kkpipe/cache.db")).unwrap();
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok", "{context}");
    let mut stmt = conn
        .prepare("SELECT o.path, o.hash FROM outputs o JOIN stage_runs s ON s.id = o.stage_run_id WHERE s.state = 'success' AND o.kind = 'file'")
        .unwrap();
    let rows: Vec<(Vec<u8>, Vec<u8>)> =
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(|r| r.unwrap()).collect();
    for (path, hash) in rows {
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        let blob = repo.path(&format!(".kkpipe/blobs/{}/{}", &hex[..2], &hex[2..]));
        let bytes = std::fs::read(&blob).unwrap_or_else(|_| {
            panic!("{context}: a success row points at a missing blob for {}", String::from_utf8_lossy(&path))
        });
        assert_eq!(blake3::hash(&bytes).as_bytes().to_vec(), hash, "{context}: a damaged blob");
    }
    let missing: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM stage_runs s WHERE NOT EXISTS (SELECT 1 FROM manifests m WHERE m.key = s.key)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(missing, 0, "{context}: a stage run without its manifest");
}

#[test]
fn sigkill_at_random_points_never_corrupts_the_cache() {
    let seed: u64 = std::env::var("KKPIPE_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_f00d);
    let mut rng = XorShift(seed);
    let repo = Repo::empty();
    repo.write("pipeline.toml", FAULT_PIPELINE).write("src/a.txt", "start\n");
    repo.run(&[]).ok();
    let mut killed_while_running = 0;
    for n in 0..50 {
        let context = format!("seed {seed}, iteration {n}");
        repo.write("src/a.txt", &format!("iteration {n}\n"));
        let mut child = repo.cmd_in(&repo.root, &["run"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(rng.next() % 150));
        if child.try_wait().unwrap().is_none() {
            killed_while_running += 1;
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // Its stages may still be stopping (the watchdog stops them): the next run waits for them.
        check_invariants(&repo, &context);

        let r = repo.run(&[]);
        assert_eq!(r.code, 0, "{context}: the next run fails:\n{}", r.all());
        check_invariants(&repo, &context);
        let expected = format!("ITERATION {n}\n");
        assert_eq!(repo.read("out/gen.txt"), expected, "{context}");
        assert_eq!(repo.read("out/use.txt"), expected, "{context}");
        assert!(repo.read("big.bin").ends_with(&format!("iteration {n}\n")), "{context}");
        let tmp = std::fs::read_dir(repo.path(".kkpipe/tmp")).map(|d| d.count()).unwrap_or(0);
        assert_eq!(tmp, 0, "{context}: half-written files left in .kkpipe/tmp");
        let again = repo.run(&[]).ok();
        assert!(again.ran().is_empty(), "{context}: not fresh after a complete run: {:?}", again.ran());
    }
    assert!(killed_while_running >= 25, "most kills must land while kkpipe runs (got {killed_while_running})");
}

#[test]
fn two_simultaneous_runs_equal_one_sequential_run() {
    let concurrent = Repo::empty();
    concurrent.write("pipeline.toml", FAULT_PIPELINE).write("src/a.txt", "same input\n");
    let sequential = Repo::empty();
    sequential.write("pipeline.toml", FAULT_PIPELINE).write("src/a.txt", "same input\n");
    sequential.run(&[]).ok();

    let spawn = || {
        concurrent
            .cmd_in(&concurrent.root, &["run", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let a = Run::from(a.wait_with_output().unwrap()).ok();
    let b = Run::from(b.wait_with_output().unwrap()).ok();
    let mut ran = a.ran();
    ran.extend(b.ran());
    ran.sort();
    assert_eq!(ran, ["big", "deploy", "gen", "use"], "each stage ran exactly once across both runs");
    for f in ["out/gen.txt", "out/use.txt", "big.bin", "deploys.log"] {
        assert_eq!(std::fs::read(concurrent.path(f)).unwrap(), std::fs::read(sequential.path(f)).unwrap(), "{f}");
    }
    check_invariants(&concurrent, "concurrent");
}

#[test]
fn first_runs_started_together_share_one_new_cache() {
    // Six kkpipes on a repository without a cache: each must open a complete database, not fail as busy.
    for attempt in 0..10 {
        let repo = Repo::empty();
        repo.write("pipeline.toml", "[stages.gen]\nrun = \"echo hi > out.txt\"\noutputs = [\"out.txt\"]\n");
        let start = std::sync::Barrier::new(6);
        let runs: Vec<Run> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..6)
                .map(|_| {
                    scope.spawn(|| {
                        let mut cmd = repo.cmd_in(&repo.root, &["run", "--json"]);
                        start.wait();
                        Run::from(cmd.output().unwrap())
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let ran: usize = runs.into_iter().map(|r| r.ok().ran().len()).sum();
        assert_eq!(ran, 1, "attempt {attempt}: the stage ran once across all six runs");
        let leftovers: Vec<_> = std::fs::read_dir(repo.path(".kkpipe"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("cache.db.new"))
            .collect();
        assert!(leftovers.is_empty(), "attempt {attempt}: {leftovers:?}");
        check_invariants(&repo, &format!("attempt {attempt}"));
    }
}

#[test]
fn parallel_stages_keep_their_outputs_and_logs_apart() {
    let repo = Repo::empty();
    let mut toml = String::new();
    for i in 0..8 {
        toml.push_str(&format!(
            "[stages.s{i}]\nrun = \"for n in $(seq 200); do echo s{i}-line-$n; done; seq 2000 | sed s/^/s{i}-/ > out{i}.txt\"\noutputs = [\"out{i}.txt\"]\n"
        ));
    }
    repo.write("pipeline.toml", &toml);
    repo.run(&["-j", "8"]).ok();
    for i in 0..8 {
        let log = repo.kk(&["log", &format!("s{i}")]).ok().stdout;
        assert_eq!(log.lines().count(), 200, "s{i}");
        assert!(log.lines().all(|l| l.starts_with(&format!("s{i}-line-"))), "s{i}'s log holds another stage's lines");
        assert!(repo.read(&format!("out{i}.txt")).lines().all(|l| l.starts_with(&format!("s{i}-"))));
    }
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(") Z ")).unwrap_or(true)
}

fn interrupted_by(signal: &str, code: i32, stage_cmd: &str) {
    let repo = Repo::empty();
    // Slow while `slow` exists (the interrupted run), quick afterwards (the rerun).
    let stage_cmd = format!("if [ -e slow ]; then {stage_cmd}; fi; touch done.txt");
    repo.write("slow", "");
    repo.write("pipeline.toml", &format!("[stages.long]\nrun = {stage_cmd:?}\noutputs = [\"done.txt\"]\n[stages.after]\nrun = \"true\"\nneeds = [\"long\"]\n"));
    let child = repo.cmd_in(&repo.root, &["run"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    // The shell creates the file before it writes the pid: wait for a whole number.
    let pid = || std::fs::read_to_string(repo.path("stage.pid")).ok()?.trim().parse::<i32>().ok();
    assert!(within(Duration::from_secs(10), || pid().is_some()), "the stage did not start");
    let stage_pid: i32 = pid().unwrap();
    assert!(pid_alive(stage_pid));
    let started = Instant::now();
    let st = Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(15), "the wait for stages is bounded");
    assert_eq!(out.status.code(), Some(code), "{}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_millis(100));
    assert!(!pid_alive(stage_pid), "the stage's process is gone");
    let status = repo.status_json();
    assert_eq!(status["stages"][0]["state"], "failed");
    assert_eq!(status["stages"][0]["reasons"][0]["kind"], "last-run-interrupted");
    std::fs::remove_file(repo.path("slow")).unwrap();
    let r = repo.run(&[]).ok();
    assert_eq!(r.ran(), ["long", "after"], "the interrupted stage is stale next time");
}

#[test]
fn sigint_during_a_long_stage_stops_it_and_exits_130() {
    interrupted_by("INT", 130, "echo $$ > stage.pid; sleep 30");
}

#[test]
fn sigterm_exits_143() {
    interrupted_by("TERM", 143, "echo $$ > stage.pid; sleep 30");
}

/// Tools that stop cleanly on SIGINT exit 0 with partial outputs: that is an interrupted run, never a success.
#[test]
fn interrupted_is_never_success_even_when_the_stage_exits_0() {
    interrupted_by("INT", 130, "trap 'touch done.txt; exit 0' INT TERM; echo $$ > stage.pid; sleep 30 & wait");
}

#[test]
fn a_stage_that_ignores_the_signal_is_killed_after_the_grace_period() {
    interrupted_by("INT", 130, "trap '' INT TERM; echo $$ > stage.pid; sleep 60");
}

// ------------------------------------------------------------------ hostile and odd input files

#[test]
fn symlink_loops_and_links_out_of_the_repository_are_hashed_as_links() {
    let repo = Repo::empty();
    repo.write("pipeline.toml", "[stages.s]\nrun = \"true\"\ninputs = [\"in\"]\n");
    let outside = repo.sibling("outside.txt");
    std::fs::write(&outside, "outside v1").unwrap();
    std::fs::create_dir_all(repo.path("in")).unwrap();
    std::os::unix::fs::symlink("b", repo.path("in/a")).unwrap();
    std::os::unix::fs::symlink("a", repo.path("in/b")).unwrap();
    std::os::unix::fs::symlink(&outside, repo.path("in/out")).unwrap();
    std::os::unix::fs::symlink("..", repo.path("in/up")).unwrap();
    repo.run(&[]).ok();
    let inputs = repo.inputs_of("s");
    let links: Vec<(&str, &str)> =
        inputs.iter().map(|f| (f["path"].as_str().unwrap(), f["symlink"].as_str().unwrap())).collect();
    assert_eq!(links, [("in/a", "b"), ("in/b", "a"), ("in/out", outside.to_str().unwrap()), ("in/up", "..")]);
    // The target's content is not an input: changing it outside the repository changes nothing.
    std::fs::write(&outside, "outside v2").unwrap();
    assert!(repo.run(&[]).ok().ran().is_empty());
    // Retargeting a link is a change.
    std::fs::remove_file(repo.path("in/a")).unwrap();
    std::os::unix::fs::symlink("c", repo.path("in/a")).unwrap();
    assert_eq!(repo.run(&[]).ok().reason_of("s")["path"], "in/a");
}

#[test]
fn non_utf8_file_names_are_inputs_like_any_other() {
    use std::os::unix::ffi::OsStrExt;
    let repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        "[stages.s]\nrun = \"ls in > listing.txt\"\ninputs = [\"in\"]\noutputs = [\"listing.txt\"]\n",
    );
    std::fs::create_dir_all(repo.path("in")).unwrap();
    let name = repo.path("in").join(std::ffi::OsStr::from_bytes(b"caf\xe9.txt"));
    std::fs::write(&name, "v1").unwrap();
    repo.run(&[]).ok();
    assert!(repo.run(&[]).ok().ran().is_empty());
    std::fs::write(&name, "v2").unwrap();
    let r = repo.run(&[]).ok();
    assert_eq!(r.ran(), ["s"]);
    assert_eq!(r.reason_of("s")["path"], "in/caf\u{fffd}.txt");
}

#[test]
fn fifos_and_sockets_are_skipped_with_a_warning_and_never_block() {
    let repo = Repo::empty();
    repo.write("pipeline.toml", "[stages.s]\nrun = \"true\"\ninputs = [\"in\"]\n").write("in/file.txt", "x");
    assert!(Command::new("mkfifo").arg(repo.path("in/pipe")).status().unwrap().success());
    let sock = repo.path("in/agent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut child =
        repo.cmd_in(&repo.root, &["run", "--json"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "kkpipe blocked on a FIFO");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = Run::from(child.wait_with_output().unwrap()).ok();
    assert!(r.stderr.contains("skipping `in/pipe`: it is a FIFO"), "{}", r.stderr);
    assert!(r.stderr.contains("skipping `in/agent.sock`: it is a socket"), "{}", r.stderr);
    let inputs = repo.inputs_of("s");
    assert_eq!(inputs.len(), 1);
}

#[test]
fn a_file_that_keeps_changing_while_it_is_hashed_is_a_clear_error() {
    let repo = Repo::empty();
    repo.write("pipeline.toml", "[stages.s]\nrun = \"true\"\ninputs = [\"data\"]\n");
    std::fs::create_dir_all(repo.path("data")).unwrap();
    let file = repo.path("data/growing.bin");
    std::fs::write(&file, vec![0u8; 64 << 20]).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, file) = (stop.clone(), file.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(file).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all(&[1u8; 4096]).unwrap();
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let r = repo.kk(&["run"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("`data/growing.bin` kept changing while it was hashed"), "{}", r.stderr);
}

/// Run kkpipe without root's power to read anything (when the tests run as root, as in CI).
fn unprivileged(repo: &Repo, args: &[&str]) -> Run {
    let mut c = if nix_is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
        c
    } else {
        Command::new(BIN)
    };
    c.args(args).current_dir(&repo.root).env_remove("GITHUB_ACTIONS").env_remove("GITLAB_CI");
    Run::from(c.output().unwrap())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// Open the temp directory tree to other users, for the unprivileged runs.
fn open_up(repo: &Repo) {
    let mut p = repo.root.clone();
    loop {
        if p.starts_with(std::env::temp_dir()) && p != std::env::temp_dir() {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode | 0o755)).unwrap();
        }
        if !p.pop() {
            break;
        }
    }
    for e in walkdir::WalkDir::new(&repo.root) {
        let e = e.unwrap();
        let mode = e.metadata().unwrap().permissions().mode();
        let add = if e.file_type().is_dir() { 0o777 } else { 0o666 };
        std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(mode | add)).unwrap();
    }
}

#[test]
fn an_unreadable_input_is_an_error_naming_it() {
    let repo = Repo::empty();
    repo.write("pipeline.toml", "[stages.s]\nrun = \"true\"\ninputs = [\"in\"]\n")
        .write("in/secret.txt", "x")
        .write("in/ok.txt", "y");
    open_up(&repo);
    std::fs::set_permissions(repo.path("in/secret.txt"), std::fs::Permissions::from_mode(0o000)).unwrap();
    let r = unprivileged(&repo, &["run"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("cannot read `in/secret.txt`") && r.stderr.contains("ermission denied"), "{}", r.stderr);
}

#[test]
fn a_read_only_cache_is_a_clear_error_and_loses_nothing() {
    let repo = Repo::fixture("tiny");
    repo.run(&[]).ok();
    repo.edit("docs/README.md", "A fixture.", "Changed.");
    open_up(&repo);
    // The cache belongs to someone else and is not writable for us.
    std::fs::set_permissions(repo.path(".kkpipe"), std::fs::Permissions::from_mode(0o755)).unwrap();
    for e in walkdir::WalkDir::new(repo.path(".kkpipe")).min_depth(1) {
        let e = e.unwrap();
        let mode = if e.file_type().is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let before = repo.db_bytes();
    let r = unprivileged(&repo, &["run"]);
    assert_eq!(r.code, 3, "{}", r.all());
    assert!(r.stderr.contains("read-only") || r.stderr.contains("cannot write the cache"), "{}", r.stderr);
    assert!(!r.stderr.contains("database is locked"), "{}", r.stderr);
    assert_eq!(repo.db_bytes(), before, "nothing lost");
    assert_eq!(repo.run(&[]).ok().ran(), ["docs"], "the cache still works for its owner");
}

#[test]
fn a_full_disk_is_a_clear_error_and_loses_nothing() {
    let repo = Repo::empty();
    // The stage may write as much as it likes (it raises its own soft limit); kkpipe, storing the output, may not.
    repo.write("pipeline.toml", "[stages.small]\nrun = \"echo hi > small.txt\"\noutputs = [\"small.txt\"]\n[stages.big]\nrun = \"ulimit -S -f unlimited; head -c 2000000 /dev/urandom > big.bin\"\noutputs = [\"big.bin\"]\nneeds = [\"small\"]\n");
    repo.run(&["small"]).ok();
    // A file-size limit makes every write past 1 MB fail with EFBIG, as a full disk fails with ENOSPC.
    let out = Command::new("bash")
        .args(["-c", &format!("trap '' XFSZ; ulimit -S -f 1000; exec {BIN} run")])
        .current_dir(&repo.root)
        .output()
        .unwrap();
    let r = Run::from(out);
    assert_ne!(r.code, 0, "{}", r.all());
    assert!(
        r.all().contains("cannot store output `big.bin`") || r.all().contains("cannot write the cache"),
        "{}",
        r.all()
    );
    assert!(!r.all().contains("panicked"), "{}", r.all());
    check_invariants(&repo, "after a full disk");
    assert_eq!(repo.status_json()["stages"][0]["state"], "fresh", "earlier entries are intact");
    assert_eq!(repo.run(&[]).ok().ran(), ["big"], "with space again, the run completes");
}

#[test]
fn very_large_files_and_deep_trees_are_inputs_too() {
    let repo = Repo::empty();
    repo.write("pipeline.toml", "[stages.s]\nrun = \"true\"\ninputs = [\"big\", \"deep\"]\n");
    std::fs::create_dir_all(repo.path("big")).unwrap();
    let f = std::fs::File::create(repo.path("big/image.tar")).unwrap();
    f.set_len(1 << 30).unwrap(); // sparse: 1 GiB of zeros
    let mut deep = String::from("deep");
    for i in 0..200 {
        deep.push_str(&format!("/d{i}"));
    }
    repo.write(&format!("{deep}/leaf.txt"), "bottom");
    repo.run(&[]).ok();
    let inputs = repo.inputs_of("s");
    let big = inputs.iter().find(|f| f["path"] == "big/image.tar").unwrap();
    let zeros = {
        let mut h = blake3::Hasher::new();
        let block = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            h.update(&block);
        }
        h.finalize().to_hex().to_string()
    };
    assert_eq!(big["blake3"], zeros.as_str());
    assert!(inputs.iter().any(|f| f["path"] == format!("{deep}/leaf.txt").as_str()));
    std::fs::write(repo.path(&format!("{deep}/leaf.txt")), "changed").unwrap();
    assert_eq!(repo.run(&[]).ok().ran(), ["s"]);
}

// ------------------------------------------------------------------ secrets at rest

#[test]
fn secrets_never_rest_in_the_cache_and_secret_env_is_keyed_as_an_hmac() {
    let secret = "hunter2-low-entropy";
    let mut repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        r#"
[stages.use]
run = ["echo \"$DB_PASSWORD $API_TOKEN\" > used.txt"]
pass_env = ["API_TOKEN"]
secret_env = ["DB_PASSWORD"]
outputs = [{ path = "used.txt", sensitive = true }]
"#,
    );
    repo.set_env("API_TOKEN", secret).set_env("DB_PASSWORD", secret);
    repo.run(&[]).ok();
    // A changed secret_env value reruns, named but not shown; a changed pass_env value does not.
    repo.set_env("API_TOKEN", "another-token-value");
    assert!(repo.run(&[]).ok().ran().is_empty());
    repo.set_env("DB_PASSWORD", "hunter3-low-entropy");
    let r = repo.run(&[]).ok();
    assert_eq!(r.reason_of("use")["kind"], "secret-env-changed");
    assert_eq!(r.reason_of("use")["name"], "DB_PASSWORD");
    let hex_of = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let bare = blake3::hash(secret.as_bytes()).to_hex().to_string();
    for e in walkdir::WalkDir::new(repo.path(".kkpipe")) {
        let e = e.unwrap();
        if !e.file_type().is_file() || e.path().starts_with(repo.path(".kkpipe/sensitive")) {
            continue;
        }
        let bytes = std::fs::read(e.path()).unwrap();
        let plain = zstd::decode_all(&bytes[..]).unwrap_or_default();
        for hay in [&bytes, &plain] {
            let text = String::from_utf8_lossy(hay);
            assert!(!text.contains(secret) && !text.contains("hunter3"), "{} holds a secret", e.path().display());
            assert!(
                !text.contains(&bare) && !text.contains(&hex_of(secret)),
                "{} holds a bare hash",
                e.path().display()
            );
        }
    }
    let mode = |p: &str| std::fs::metadata(repo.path(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(".kkpipe"), 0o700);
    assert_eq!(mode(".kkpipe/sensitive"), 0o700);
    assert_eq!(mode(".kkpipe/sensitive/secret.key"), 0o600);
    assert_eq!(mode("used.txt"), 0o600, "the workspace copy of a sensitive output is private too");
    for e in walkdir::WalkDir::new(repo.path(".kkpipe/sensitive/blobs")) {
        let e = e.unwrap();
        if e.file_type().is_file() {
            assert_eq!(e.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
}

/// Issue 21, item 1: an input edited while its stage ran (a long plan while you keep editing, a branch switch):
/// the result was recorded under the key computed before the stage started, and reverting the edit later made
/// that key a hit with the other content's result. Now the inputs are checked again when the stage ends: the
/// attempt is not kept, and the stage runs again next time.
#[test]
fn an_input_edited_while_its_stage_runs_never_makes_a_false_hit() {
    let repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        "[stages.build]\nrun = \"echo started; while [ ! -e gate ]; do sleep 0.02; done; cat src.txt > out.txt\"\ninputs = [\"src.txt\"]\noutputs = [\"out.txt\"]\n",
    );
    repo.write("src.txt", "one\n");
    let mut run = Live::spawn(repo.cmd_in(&repo.root, &["run"]));
    run.until(Duration::from_secs(30), |l| l.contains("started"));
    // The stage was keyed with "one"; it will read "two".
    repo.write("src.txt", "two\n");
    repo.write("gate", "");
    let (r, seen) = run.finish();
    assert_eq!(r.code, 0, "{}\n{seen:#?}", r.stderr);
    assert!(seen.iter().any(|l| l.contains("modified while it ran") && l.contains("not kept")), "{seen:#?}");
    assert_eq!(repo.read("out.txt"), "two\n");
    assert_ne!(repo.state_of("build"), "fresh", "a result made while its input moved is no success");
    // Back to "one": a clean run makes "one", and so must this one.
    repo.write("src.txt", "one\n");
    let r = repo.run(&[]).ok();
    assert_eq!(r.ran(), ["build"], "a false hit: {}", r.stderr);
    assert_eq!(repo.read("out.txt"), "one\n");
    let again = repo.run(&[]).ok();
    assert!(again.ran().is_empty());
}

/// Issue 21, item 2: a SIGTERM that reaches kkpipe and the stage together (a CI cancel, systemd stopping a
/// cgroup): a stage that traps it and exits 0 was recorded as a success, and its partial output was fresh next
/// time. A signal kkpipe has seen by the time it handles the exit makes the attempt interrupted.
#[test]
fn a_sigterm_to_kkpipe_and_its_stage_together_is_never_a_success() {
    for trial in 0..3 {
        let repo = Repo::empty();
        repo.write(
            "pipeline.toml",
            "[stages.s]\nrun = \"trap 'echo partial > out.txt; exit 0' TERM; echo $$ > stage.pid; while :; do sleep 0.01; done\"\noutputs = [\"out.txt\"]\n",
        );
        let child = repo.cmd_in(&repo.root, &["run"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        // The shell creates the file before it writes the pid: wait for a whole number.
        let pid = || std::fs::read_to_string(repo.path("stage.pid")).ok()?.trim().parse::<i32>().ok();
        assert!(within(Duration::from_secs(20), || pid().is_some()), "trial {trial}: the stage did not start");
        let stage: i32 = pid().unwrap();
        // Both at once, as a cgroup stop sends it: the stage's shell and kkpipe.
        let both = Command::new("kill").args(["-TERM", &stage.to_string(), &child.id().to_string()]).status().unwrap();
        assert!(both.success());
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(143), "trial {trial}: {}", String::from_utf8_lossy(&out.stderr));
        let status = repo.status_json();
        assert_eq!(status["stages"][0]["state"], "failed", "trial {trial}: the partial output is not a success");
        assert_eq!(status["stages"][0]["reasons"][0]["kind"], "last-run-interrupted", "trial {trial}");
    }
}
