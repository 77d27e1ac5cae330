//! The shared cache and deploy ledger on the team's object store (`[remote]`, docs/remote.md).
//!
//! The local cache stays the first level: the scheduler asks the remote only when the local cache misses (a
//! check stage), or before it would deploy (a deploy stage). What the remote says is learned into the local
//! cache through the cache's one write API and then decided on like everything else, so `fresh::decide` is
//! still the only place a stage is found fresh, and a remote entry restores only what its stage declares.
//!
//! Nothing here ever fails a run: an unreachable store, an untrusted or tampered object is a warning and a
//! miss. What is believed was signed by a trusted key and every byte restored from it verified its BLAKE3.

pub mod admin;
pub mod protocol;
pub mod store;

use crate::cache::{Cache, End, NewAttempt, RunMeta, now_ms};
use crate::fresh::{OutputRecord, State};
use crate::hash::Hash;
use crate::hash::key::Key;
use crate::pipeline::{RemoteSpec, Stage};
use crate::sign::{PrivateKey, PublicKey};
use protocol::{EntryBody, Lease, LedgerBody, Refused};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
pub use store::Store;

/// The variable that overrides `[remote] url` (or, set to `off`, disables the remote).
pub const REMOTE_VAR: &str = "KKPIPE_REMOTE";
/// The variable that holds the writer's private key.
pub const SIGNING_KEY_VAR: &str = "KKPIPE_SIGNING_KEY";

/// `--remote`: lower what the configuration allows, never raise it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lower {
    ReadOnly,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Off,
    ReadOnly,
    ReadWrite,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::ReadOnly => "read-only",
            Mode::ReadWrite => "read-write",
        }
    }
}

/// Why the remote is in its mode: the first rule that applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    NotConfigured,
    EnvOff,
    FlagOff,
    PullRequest,
    FlagReadOnly,
    NoSigningKey,
    SigningKey,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Why::NotConfigured => "no `[remote] url` in pipeline.toml and no KKPIPE_REMOTE",
            Why::EnvOff => "KKPIPE_REMOTE=off",
            Why::FlagOff => "--remote off",
            Why::PullRequest => "a pull_request event never writes",
            Why::FlagReadOnly => "--remote read-only",
            Why::NoSigningKey => "KKPIPE_SIGNING_KEY is not set",
            Why::SigningKey => "KKPIPE_SIGNING_KEY is set",
        })
    }
}

/// The remote this invocation uses, before anything is contacted.
#[derive(Debug)]
pub struct Resolved {
    pub url: Option<String>,
    pub mode: Mode,
    pub why: Why,
    pub signer: Option<PrivateKey>,
}

/// Work out the URL and mode from `[remote]`, the environment, `--remote` and the event. A malformed
/// `KKPIPE_SIGNING_KEY` is an error: silently reading only would hide a broken secret.
pub fn resolve(
    spec: Option<&RemoteSpec>,
    env: &HashMap<String, String>,
    lower: Option<Lower>,
    pull_request: bool,
) -> Result<Resolved, String> {
    let off = |why| Ok(Resolved { url: None, mode: Mode::Off, why, signer: None });
    let url = match env.get(REMOTE_VAR).map(|v| v.trim()).filter(|v| !v.is_empty()) {
        Some("off") => return off(Why::EnvOff),
        Some(u) => u.to_string(),
        None => match spec.and_then(|s| s.url.clone()) {
            Some(u) => u,
            None => return off(Why::NotConfigured),
        },
    };
    if lower == Some(Lower::Off) {
        return off(Why::FlagOff);
    }
    let signer = match env.get(SIGNING_KEY_VAR).filter(|v| !v.trim().is_empty()) {
        Some(text) => Some(PrivateKey::parse(text).map_err(|e| format!("{SIGNING_KEY_VAR} {e}"))?),
        None => None,
    };
    let read_only = |why| Ok(Resolved { url: Some(url.clone()), mode: Mode::ReadOnly, why, signer: None });
    match (pull_request, lower, signer) {
        (true, _, _) => read_only(Why::PullRequest),
        (_, Some(Lower::ReadOnly), _) => read_only(Why::FlagReadOnly),
        (_, _, None) => read_only(Why::NoSigningKey),
        (_, _, Some(k)) => {
            Ok(Resolved { url: Some(url), mode: Mode::ReadWrite, why: Why::SigningKey, signer: Some(k) })
        }
    }
}

/// An open remote. Warnings are collected for the caller to show, once each.
pub struct Remote {
    pub url: String,
    pub mode: Mode,
    pub why: Why,
    store: Arc<Store>,
    trusted: Vec<PublicKey>,
    signer: Option<PrivateKey>,
    lease_ttl: Duration,
    who: String,
    commit: Option<String>,
    warnings: Mutex<Vec<String>>,
    warned_down: AtomicBool,
}

/// How a check stage's local miss went on the remote.
#[derive(Debug, PartialEq, Eq)]
pub enum Pulled {
    /// A trusted entry with verified contents is now in the local cache.
    Imported,
    Miss,
}

impl Remote {
    pub fn open(
        r: Resolved,
        spec: Option<&RemoteSpec>,
        env: &HashMap<String, String>,
        commit: Option<String>,
    ) -> Result<Option<Remote>, String> {
        let Some(url) = r.url else { return Ok(None) };
        let parsed = url::Url::parse(&url).map_err(|e| format!("the remote URL `{url}` is not a URL: {e}"))?;
        let store = store::open(&parsed, env).map_err(|e| format!("cannot open the remote `{url}`: {e}"))?;
        let user = env.get("USER").cloned().unwrap_or_else(|| "unknown".into());
        let remote = Remote {
            url,
            mode: r.mode,
            why: r.why,
            store: Arc::new(store),
            trusted: spec.map(|s| s.trusted_keys.clone()).unwrap_or_default(),
            signer: r.signer,
            lease_ttl: spec.map_or(RemoteSpec::DEFAULT_LEASE, |s| s.lease),
            who: format!("{user}@{}", crate::cache::hostname()),
            commit,
            warnings: Mutex::new(Vec::new()),
            warned_down: AtomicBool::new(false),
        };
        if let Some(k) = &remote.signer
            && !remote.trusted.contains(&k.public())
        {
            remote.warn(format!(
                "the public key of {SIGNING_KEY_VAR} ({}) is not in `[remote] trusted_keys`: no runner (this one \
                 included) will believe what this run writes",
                k.public()
            ));
        }
        Ok(Some(remote))
    }

    pub fn writable(&self) -> bool {
        self.signer.is_some()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn warn(&self, w: String) {
        self.warnings.lock().expect("warnings").push(w);
    }

    /// Warnings since the last call, for the caller to show.
    pub fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut *self.warnings.lock().expect("warnings"))
    }

    /// A store error: the first "unreachable" is one warning naming the remote; refusals are each a warning.
    fn failed(&self, what: &str, e: store::Error) {
        match e {
            store::Error::Unreachable(m) => {
                if !self.warned_down.swap(true, Ordering::Relaxed) {
                    self.warn(format!(
                        "the remote `{}` did not answer ({m}); working locally for the rest of this run",
                        self.url
                    ));
                }
            }
            store::Error::Refused(m) => self.warn(format!("the remote `{}` refused {what}: {m}", self.url)),
        }
    }

    fn refused(&self, what: &str, why: impl std::fmt::Display) {
        self.warn(format!("ignored {what} on the remote `{}`: {why}; treated as a miss", self.url));
    }

    /// The signed object at `name`, checked; `None` (with a warning when it exists) otherwise.
    fn read<T: protocol::Signed>(&self, name: &str, what: &str) -> Option<(T, store::Version)> {
        match self.store.get(name) {
            Ok(None) => None,
            Ok(Some((bytes, version))) => match protocol::open::<T>(&bytes, &self.trusted) {
                Ok(body) => Some((body, version)),
                Err(why) => {
                    self.refused(what, why);
                    None
                }
            },
            Err(e) => {
                self.failed(what, e);
                None
            }
        }
    }

    /// Download blobs, verifying each against its name. `None` when any is missing or does not verify.
    fn fetch_blobs(&self, hashes: Vec<Hash>, what: &str) -> Option<Vec<(Hash, Vec<u8>)>> {
        let got = self.store.each(hashes, |s, h| (h, s.get(&protocol::blob(&h.to_hex()))));
        let mut out = Vec::with_capacity(got.len());
        for (h, r) in got {
            match r {
                Ok(Some((bytes, _))) if Hash::of(&bytes) == h => out.push((h, bytes)),
                Ok(Some(_)) => {
                    self.refused(what, format_args!("its blob {h} does not match its BLAKE3"));
                    return None;
                }
                Ok(None) => {
                    self.refused(what, format_args!("its blob {h} is missing"));
                    return None;
                }
                Err(e) => {
                    self.failed(what, e);
                    return None;
                }
            }
        }
        Some(out)
    }

    /// A local miss of `stage` with `key`: learn the remote's entry for it, if there is a trusted one whose
    /// every blob verifies and whose every output lies inside the stage's declared outputs.
    pub fn pull(&self, cache: &Cache, stage: &Stage, key: &Key, env: &str) -> Pulled {
        let what = format!("the entry of `{}` for key {key}", stage.name);
        let Some((body, _)) = self.read::<EntryBody>(&protocol::entry(&stage.name, &key.to_string()), &what) else {
            return Pulled::Miss;
        };
        self.import_entry(cache, stage, key, env, body, &what)
    }

    fn import_entry(&self, cache: &Cache, stage: &Stage, key: &Key, env: &str, body: EntryBody, what: &str) -> Pulled {
        if body.version != protocol::VERSION || body.stage != stage.name || body.key != key.to_string() {
            self.refused(what, Refused::Misplaced(format!("`{}` with key {}", body.stage, body.key)));
            return Pulled::Miss;
        }
        let mut outputs = Vec::with_capacity(body.outputs.len());
        for doc in &body.outputs {
            match doc.checked().and_then(|o| o.refusal(&stage.outputs).map_or(Ok(o), Err)) {
                Ok(o) => outputs.push(o),
                Err(why) => {
                    self.refused(what, why);
                    return Pulled::Miss;
                }
            }
        }
        let mut wanted: Vec<Hash> = body.outputs.iter().filter_map(|d| d.shared_blob()).collect();
        wanted.push(key.0);
        wanted.sort_by_key(|h| h.0);
        wanted.dedup();
        let Some(blobs) = self.fetch_blobs(wanted, what) else { return Pulled::Miss };
        let mut manifest = None;
        for (h, bytes) in &blobs {
            if *h == key.0 {
                manifest = Some(bytes.as_slice());
            }
            if let Err(e) = cache.blobs.put_bytes(bytes, false) {
                self.warn(format!("cannot store a blob from the remote in the local cache: {e}"));
                return Pulled::Miss;
            }
        }
        let meta = RunMeta {
            command: "remote".into(),
            event: None,
            branch: None,
            env: env.into(),
            git_commit: body.commit.clone(),
        };
        let attempt = NewAttempt {
            run_id: 0,
            stage: &stage.name,
            env,
            key: *key,
            manifest,
            state: State::Success,
            reason: None,
            started_at: body.created_ms,
            end: Some(End { duration_ms: body.duration_ms, exit_code: Some(0), log: &[], outputs: &outputs }),
        };
        match cache.import_attempt(&meta, attempt) {
            Ok(_) => Pulled::Imported,
            Err(e) => {
                self.warn(format!("cannot record what the remote holds in the local cache: {e}"));
                Pulled::Miss
            }
        }
    }

    /// Learn the shared ledger's records for deploy `stages` in `env` (read in parallel) that are newer than
    /// what this cache knows: each becomes the stage's latest attempt here. A success is learned with its
    /// entry (its outputs); a success whose entry cannot be had is learned as interrupted (deploy again).
    pub fn learn_ledger(&self, cache: &Cache, stages: &[&Stage], env: &str) {
        let names: Vec<String> = stages.iter().map(|s| s.name.clone()).collect();
        let read = self.store.each(names, |_, name| {
            let what = format!("the ledger record of `{name}` in `{env}`");
            let record = self.read::<LedgerBody>(&protocol::ledger(env, &name), &what);
            (name, record, what)
        });
        for ((name, record, what), stage) in read.into_iter().zip(stages) {
            let Some((body, _)) = record else { continue };
            if body.env != env || body.stage != name || body.version != protocol::VERSION {
                self.refused(&what, Refused::Misplaced(format!("`{}` in `{}`", body.stage, body.env)));
                continue;
            }
            match cache.remote_seen(&self.url, &name, env) {
                Ok(seen) if body.seq > seen => {}
                _ => continue,
            }
            self.import_ledger(cache, stage, env, &body, &what);
            if let Err(e) = cache.set_remote_seen(&self.url, &name, env, body.seq) {
                self.warn(format!("cannot record what the remote holds in the local cache: {e}"));
            }
        }
    }

    fn import_ledger(&self, cache: &Cache, stage: &Stage, env: &str, body: &LedgerBody, what: &str) {
        let Some(key) = Hash::from_hex(&body.key).map(Key) else {
            self.refused(what, "its key is not a BLAKE3 hash");
            return;
        };
        if body.state == State::Success {
            let entry_what = format!("the entry of `{}` for key {key}", stage.name);
            let entry = self.read::<EntryBody>(&protocol::entry(&stage.name, &body.key), &entry_what);
            if let Some((entry, _)) = entry
                && self.import_entry(cache, stage, &key, env, entry, &entry_what) == Pulled::Imported
            {
                return;
            }
        }
        let state = match body.state {
            State::Failed => State::Failed,
            _ => State::Interrupted,
        };
        // Only for `why`'s comparison: an attempt learned without its manifest still counts.
        let manifest = match self.store.get(&protocol::blob(&body.key)) {
            Ok(Some((bytes, _))) if Hash::of(&bytes) == key.0 => Some(bytes),
            _ => None,
        };
        let meta = RunMeta {
            command: "remote".into(),
            event: None,
            branch: None,
            env: env.into(),
            git_commit: body.commit.clone(),
        };
        let attempt = NewAttempt {
            run_id: 0,
            stage: &stage.name,
            env,
            key,
            manifest: manifest.as_deref(),
            state,
            reason: None,
            started_at: body.at_ms,
            end: Some(End::empty()),
        };
        if let Err(e) = cache.import_attempt(&meta, attempt) {
            self.warn(format!("cannot record what the remote holds in the local cache: {e}"));
        }
    }

    /// Share a success: blobs first (the manifest and every output that is not sensitive), then the entry,
    /// create-only (an entry already there, by another writer, is left as it is).
    pub fn publish(
        &self,
        cache: &Cache,
        stage: &Stage,
        key: &Key,
        manifest: &[u8],
        outputs: &[OutputRecord],
        duration_ms: i64,
    ) {
        let Some(signer) = &self.signer else { return };
        let what = format!("the entry of `{}`", stage.name);
        let mut docs = Vec::with_capacity(outputs.len());
        for o in outputs {
            match crate::cache::archive::OutputDoc::of(o) {
                Ok(d) => docs.push(d),
                Err(why) => return self.warn(format!("not sharing `{}` on the remote: {why}", stage.name)),
            }
        }
        let mut blobs: Vec<(Hash, Option<Vec<u8>>)> =
            docs.iter().filter_map(|d| d.shared_blob()).map(|h| (h, cache.blobs.read_verified(&h))).collect();
        blobs.push((key.0, Some(manifest.to_vec())));
        if blobs.iter().any(|(_, b)| b.is_none()) {
            return self.warn(format!(
                "not sharing `{}` on the remote: an output is no longer in the local cache",
                stage.name
            ));
        }
        let blobs = blobs.into_iter().map(|(h, b)| (h, b.expect("checked"))).collect();
        if let Err(e) = self.upload(blobs) {
            return self.failed(&what, e);
        }
        let body = EntryBody {
            version: protocol::VERSION,
            stage: stage.name.clone(),
            key: key.to_string(),
            outputs: docs,
            duration_ms,
            commit: self.commit.clone(),
            who: self.who.clone(),
            created_ms: now_ms(),
        };
        let name = protocol::entry(&stage.name, &key.to_string());
        if let Err(e) = self.store.put_if(&name, protocol::seal(&body, signer), None) {
            self.failed(&what, e);
        }
    }

    /// Upload blobs that are not in the store yet (in parallel; create-only, so a concurrent writer's copy of
    /// the same content is left as it is).
    fn upload(&self, blobs: Vec<(Hash, Vec<u8>)>) -> Result<(), store::Error> {
        let uploaded = self.store.each(blobs, |s, (h, bytes)| {
            let name = protocol::blob(&h.to_hex());
            match s.exists(&name) {
                Ok(true) => Ok(()),
                Ok(false) => s.put_if(&name, bytes, None).map(|_| ()),
                Err(e) => Err(e),
            }
        });
        uploaded.into_iter().collect()
    }

    /// Record a deploy attempt in the shared ledger by compare-and-swap: one more than the newest record
    /// (or than what this cache knows, if the record there is not believed). The manifest goes first, so
    /// other runners can tell what the attempt was.
    pub fn record(&self, cache: &Cache, stage: &str, env: &str, key: &Key, manifest: &[u8], state: State) {
        let Some(signer) = &self.signer else { return };
        let name = protocol::ledger(env, stage);
        let what = format!("the ledger record of `{stage}` in `{env}`");
        if state == State::Running
            && let Err(e) = self.upload(vec![(key.0, manifest.to_vec())])
        {
            return self.failed(&what, e);
        }
        for _ in 0..16 {
            let (current, version) = match self.store.get(&name) {
                Ok(None) => (0, None),
                Ok(Some((bytes, v))) => {
                    let seq = protocol::open::<LedgerBody>(&bytes, &self.trusted).map_or(0, |b| b.seq);
                    (seq, Some(v))
                }
                Err(e) => return self.failed(&what, e),
            };
            let seen = cache.remote_seen(&self.url, stage, env).unwrap_or(0);
            let body = LedgerBody {
                version: protocol::VERSION,
                env: env.into(),
                stage: stage.into(),
                seq: current.max(seen) + 1,
                key: key.to_string(),
                state,
                who: self.who.clone(),
                at_ms: now_ms(),
                commit: self.commit.clone(),
            };
            match self.store.put_if(&name, protocol::seal(&body, signer), version.as_ref()) {
                Ok(Some(_)) => {
                    let _ = cache.set_remote_seen(&self.url, stage, env, body.seq);
                    return;
                }
                Ok(None) => continue,
                Err(e) => return self.failed(&what, e),
            }
        }
        self.warn(format!("could not update {what} on the remote `{}`: too many concurrent writers", self.url));
    }

    /// Take the deploy lease of `stage` in `env`, waiting up to `timeout` for its holder (`waiting` is told
    /// whom, once; `stop` ends the wait early). `Ok(None)`: the store did not answer (warned; deploy on).
    pub fn acquire(
        &self,
        stage: &str,
        env: &str,
        timeout: Duration,
        waiting: &mut dyn FnMut(&str),
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<LeaseGuard>, LeaseError> {
        let name = protocol::lease(env, stage);
        let holder = Hash::of(&[now_ms().to_le_bytes(), (std::process::id() as i64).to_le_bytes()].concat()).to_hex();
        let deadline = Instant::now() + timeout;
        let mut told = false;
        loop {
            let mine = Lease {
                holder: holder.clone(),
                who: self.who.clone(),
                expires_ms: now_ms() + self.lease_ttl.as_millis() as i64,
                released: false,
            };
            let bytes = serde_json::to_vec(&mine).expect("serializable");
            let current = match self.store.get(&name) {
                Ok(c) => c,
                Err(e) => {
                    self.failed("the deploy lease", e);
                    return Ok(None);
                }
            };
            let (expected, held_by) = match &current {
                None => (None, None),
                Some((b, v)) => match serde_json::from_slice::<Lease>(b) {
                    Ok(l) if !l.released && l.expires_ms > now_ms() => (Some(v), Some(l.who)),
                    _ => (Some(v), None),
                },
            };
            if held_by.is_none() {
                match self.store.put_if(&name, bytes, expected) {
                    Ok(Some(version)) => {
                        return Ok(Some(LeaseGuard::start(self.store.clone(), name, mine, version, self.lease_ttl)));
                    }
                    Ok(None) => continue,
                    Err(e) => {
                        self.failed("the deploy lease", e);
                        return Ok(None);
                    }
                }
            }
            let who = held_by.unwrap_or_default();
            if Instant::now() >= deadline {
                return Err(LeaseError { stage: stage.into(), env: env.into(), holder: who, waited: timeout });
            }
            if !told {
                waiting(&who);
                told = true;
            }
            if stop() {
                return Err(LeaseError { stage: stage.into(), env: env.into(), holder: who, waited: Duration::ZERO });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "`{stage}` in `{env}` is being deployed by {holder} (the remote's deploy lease); waited {} s\n  hint: raise --lock-timeout, or wait for that deploy to end",
    waited.as_secs()
)]
pub struct LeaseError {
    pub stage: String,
    pub env: String,
    pub holder: String,
    pub waited: Duration,
}

/// A held deploy lease: renewed in the background, released when dropped.
pub struct LeaseGuard {
    stop: Arc<AtomicBool>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl LeaseGuard {
    fn start(store: Arc<Store>, name: String, lease: Lease, version: store::Version, ttl: Duration) -> LeaseGuard {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let renewer = std::thread::spawn(move || {
            let (mut lease, mut version) = (lease, version);
            let mut last = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if last.elapsed() < ttl / 3 {
                    continue;
                }
                last = Instant::now();
                lease.expires_ms = now_ms() + ttl.as_millis() as i64;
                if let Ok(Some(v)) =
                    store.put_if(&name, serde_json::to_vec(&lease).expect("serializable"), Some(&version))
                {
                    version = v;
                }
            }
            lease.released = true;
            let _ = store.put_if(&name, serde_json::to_vec(&lease).expect("serializable"), Some(&version));
        });
        LeaseGuard { stop, renewer: Some(renewer) }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.renewer.take() {
            let _ = h.join();
        }
    }
}
