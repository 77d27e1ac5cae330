//! `KKPIPE_SECRET_KEY`: runners given the same secret key `secret_env` values with the same HMAC key, so a stage
//! with `secret_env` is fresh on a fresh runner; the key derived from it is never stored or exported.

use crate::harness::*;
use std::path::Path;

const PIPELINE: &str = r#"
[stages.use]
run = ["echo used > used.txt"]
secret_env = ["TOKEN"]
outputs = ["used.txt"]
"#;

const TOKEN: &str = "tok-hunter2-low-entropy";
const SHARED: &str = "ci-secret-3f9c1e0b7d2a4c6e8f";
const OTHER: &str = "ci-secret-another-runner-9a8b";

/// A copy of the repository, with a cache of its own.
fn copy() -> Repo {
    let mut r = Repo::empty();
    r.write("pipeline.toml", PIPELINE);
    r.set_env("TOKEN", TOKEN);
    r
}

/// Every invocation's output, to check that no secret ever shows.
#[derive(Default)]
struct Seen(String);

impl Seen {
    fn kk(&mut self, repo: &Repo, args: &[&str]) -> Run {
        let r = repo.kk(args);
        self.0.push_str(&r.all());
        r
    }

    /// The stage key `status --json` reports for `use`.
    fn key(&mut self, repo: &Repo) -> String {
        let r = self.kk(repo, &["status", "--json"]).ok();
        check_schema(&schema("kkpipe.status.v1.json"), &r.stdout);
        r.json()["stages"][0]["key"].as_str().expect("a stage key").to_string()
    }
}

fn derived(secret: &str) -> [u8; 32] {
    blake3::derive_key("kkpipe 2026 secret_env HMAC key v1", secret.as_bytes())
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// What must never be at rest or shown: the secret_env value, the shared secret, the key derived from it.
fn assert_nothing_secret_in(what: &str, bytes: &[u8]) {
    let plain = zstd::decode_all(bytes).unwrap_or_default();
    for hay in [bytes, &plain[..]] {
        for (name, needle) in [("TOKEN's value", TOKEN.as_bytes()), ("KKPIPE_SECRET_KEY", SHARED.as_bytes())] {
            assert!(!find(hay, needle), "{what} holds {name}");
        }
        let key = derived(SHARED);
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!find(hay, &key) && !find(hay, hex.as_bytes()), "{what} holds the derived key");
    }
}

fn assert_nothing_secret_under(dir: &Path) {
    for e in walkdir::WalkDir::new(dir) {
        let e = e.unwrap();
        if e.file_type().is_file() {
            assert_nothing_secret_in(&e.path().display().to_string(), &std::fs::read(e.path()).unwrap());
        }
    }
}

#[test]
fn copies_with_the_same_kkpipe_secret_key_have_the_same_secret_env_keys() {
    let mut seen = Seen::default();
    let (mut a, mut b) = (copy(), copy());
    a.set_env("KKPIPE_SECRET_KEY", SHARED);
    b.set_env("KKPIPE_SECRET_KEY", SHARED);
    let key_a = seen.key(&a);
    assert_eq!(seen.key(&b), key_a, "the same secret: the same key, in another cache");
    b.set_env("KKPIPE_SECRET_KEY", OTHER);
    assert_ne!(seen.key(&b), key_a, "another secret: another key");
    b.set_env("KKPIPE_SECRET_KEY", SHARED).set_env("TOKEN", "tok-another-value");
    assert_ne!(seen.key(&b), key_a, "the secret_env value is still keyed");
    b.set_env("TOKEN", TOKEN);

    // Run in A; B (a fresh runner) gets A's exported cache without anything sensitive and finds it fresh.
    assert_eq!(seen.kk(&a, &["run", "--json"]).ok().ran(), ["use"]);
    assert!(!a.exists(".kkpipe/sensitive/secret.key"), "no key is made or stored for KKPIPE_SECRET_KEY");
    let archive = a.sibling("cache.tar.zst");
    seen.kk(&a, &["cache", "export", archive.to_str().unwrap()]).ok();
    seen.kk(&b, &["cache", "import", archive.to_str().unwrap()]).ok();
    assert_eq!(b.state_of("use"), "restored", "fresh, with its output to put back from the imported cache");
    assert!(seen.kk(&b, &["run", "--json"]).ok().ran().is_empty(), "nothing reruns on the fresh runner");
    b.set_env("KKPIPE_SECRET_KEY", OTHER);
    let other = seen.kk(&b, &["run", "--json"]).ok();
    assert_eq!(other.ran(), ["use"]);
    assert_eq!(other.reason_of("use")["kind"], "secret-env-changed");

    // Even an export with everything sensitive carries no key: none is stored, and the derived one never is.
    let full = a.sibling("full.tar.zst");
    seen.kk(&a, &["cache", "export", "--include-sensitive", full.to_str().unwrap()]).ok();
    let raw = zstd::decode_all(std::fs::File::open(&full).unwrap()).unwrap();
    let names: Vec<String> = tar::Archive::new(&raw[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with("secret.key")), "{names:?}");
    assert!(!a.exists(".kkpipe/sensitive/secret.key"), "exporting makes no key either");
    for file in [&archive, &full] {
        assert_nothing_secret_in(&file.display().to_string(), &std::fs::read(file).unwrap());
    }
    assert_nothing_secret_under(&a.path(".kkpipe"));
    assert_nothing_secret_under(&b.path(".kkpipe"));
    assert_nothing_secret_in("kkpipe's output", seen.0.as_bytes());
}

#[test]
fn without_kkpipe_secret_key_each_copy_keys_with_its_own_random_key() {
    let mut seen = Seen::default();
    let (mut a, b) = (copy(), copy());
    let key_a = seen.key(&a);
    assert_eq!(seen.key(&a), key_a, "the repository's key is kept");
    assert!(a.exists(".kkpipe/sensitive/secret.key"));
    assert_ne!(seen.key(&b), key_a, "another cache, another random key: the stage would rerun");

    // Set but empty counts as unset, with a warning naming the variable.
    a.set_env("KKPIPE_SECRET_KEY", "");
    let r = seen.kk(&a, &["status", "--json"]).ok();
    assert_eq!(r.json()["stages"][0]["key"], key_a.as_str());
    assert!(r.stderr.contains("warning: `KKPIPE_SECRET_KEY` is set but empty"), "{}", r.stderr);
    // Setting it changes the key (the stage reruns once), and the random key stays unused on disk.
    a.set_env("KKPIPE_SECRET_KEY", SHARED);
    assert_ne!(seen.key(&a), key_a);
    assert!(!seen.0.contains(TOKEN), "{}", seen.0);
}

/// Issue 21, item 11: the first runs on a new checkout each made a random key and the later one replaced the
/// earlier by a rename, so two runs started together keyed `secret_env` differently (the second redeployed).
/// The key is created once (create-only), and every run uses the one that is stored.
#[test]
fn two_first_runs_started_together_key_secret_env_alike() {
    for trial in 0..8 {
        let repo = copy();
        let kids: Vec<_> = (0..3)
            .map(|_| {
                repo.cmd_in(&repo.root, &["status", "--json"]).stdout(std::process::Stdio::piped()).spawn().unwrap()
            })
            .collect();
        let keys: Vec<String> = kids
            .into_iter()
            .map(|k| {
                let out = Run::from(k.wait_with_output().unwrap()).ok();
                out.json()["stages"][0]["key"].as_str().unwrap().to_string()
            })
            .collect();
        assert!(keys.iter().all(|k| *k == keys[0]), "trial {trial}: runs started together keyed alike: {keys:?}");
        let mut seen = Seen::default();
        assert_eq!(seen.key(&repo), keys[0], "trial {trial}: and later runs use the same stored key");
    }
}

/// Issue 21, item 14: `cache import` installed an archive's `secret.key` unasked on a fresh runner, so whoever
/// wrote the archive chose the key and could test guesses of `secret_env` values against later exports. Only
/// `--with-secret-key` installs it.
#[test]
fn an_imported_archive_does_not_plant_the_hmac_key_unasked() {
    let mut seen = Seen::default();
    let (a, b) = (copy(), copy());
    seen.kk(&a, &["run"]).ok();
    let key_a = seen.key(&a);
    let archive = a.sibling("a.tar.zst");
    seen.kk(&a, &["cache", "export", archive.to_str().unwrap(), "--include-sensitive"]).ok();

    let r = seen.kk(&b, &["cache", "import", archive.to_str().unwrap()]).ok();
    assert!(r.stderr.contains("carries a secret.key, not installed"), "{}", r.stderr);
    assert!(!b.exists(".kkpipe/sensitive/secret.key"), "no key was planted");
    assert_ne!(seen.key(&b), key_a, "b keys with a key of its own");

    // Asked for on a cache without a key: installed, and the stage is fresh with a's record.
    let c = copy();
    let r = seen.kk(&c, &["cache", "import", archive.to_str().unwrap(), "--with-secret-key"]).ok();
    assert!(r.stderr.contains("installed the archive's secret.key"), "{}", r.stderr);
    assert_eq!(seen.key(&c), key_a);
    assert!(seen.kk(&c, &["run", "--json"]).ok().ran().is_empty(), "fresh with the imported record");
    // A cache that has a key keeps it, asked or not.
    let r = seen.kk(&b, &["cache", "import", archive.to_str().unwrap(), "--with-secret-key"]).ok();
    assert!(!r.stderr.contains("installed"), "{}", r.stderr);
    assert_ne!(seen.key(&b), key_a);
}
