//! Learning from the remote, and telling it: check stages' entries, deploy stages' ledger records.

use super::protocol::{self, EntryBody, LedgerBody, Refused};
use super::{Pulled, Remote};
use crate::cache::archive::OutputDoc;
use crate::cache::{BlobStore, Cache, End, NewAttempt, RunMeta, now_ms};
use crate::fresh::{OutputRecord, State};
use crate::hash::Hash;
use crate::hash::key::Key;
use crate::pipeline::Stage;
use crate::store;

/// A blob's name and content.
type Blob = (Hash, Vec<u8>);

/// A check stage's success found on the remote, its blobs already in the local blob store.
pub(crate) struct Fetched {
    key: Key,
    outputs: Vec<OutputRecord>,
    manifest: Vec<u8>,
    started_ms: i64,
    duration_ms: i64,
    commit: Option<String>,
}

/// An attempt to learn into the local cache.
struct Learned<'a> {
    stage: &'a Stage,
    env: &'a str,
    key: Key,
    state: State,
    outputs: Vec<OutputRecord>,
    manifest: Option<Vec<u8>>,
    started_ms: i64,
    duration_ms: i64,
    commit: Option<String>,
    audit: Option<crate::fresh::Audit>,
}

/// What an unreadable ledger head stands for: an attempt with inputs nobody knows, so not believed.
fn unreadable(env: &str, stage: &str) -> LedgerBody {
    LedgerBody {
        version: protocol::VERSION,
        env: env.into(),
        stage: stage.into(),
        seq: 0,
        key: "unreadable".into(),
        state: State::Interrupted,
        who: "unknown".into(),
        at_ms: now_ms(),
        commit: None,
        outputs: Vec::new(),
        duration_ms: 0,
        audit: None,
    }
}

impl Remote {
    /// The network half of a check stage's local miss with `key`: the remote's entry for it, if there is a
    /// trusted one whose every blob verifies (each is put into `blobs`) and whose every output lies inside the
    /// stage's declared outputs. Touches no database, so it runs as a job on a thread of its own.
    pub(crate) fn fetch(&self, blobs: &BlobStore, stage: &Stage, key: &Key) -> Option<Fetched> {
        let what = format!("the entry of `{}` for key {key}", stage.name);
        let (body, _) = self.read::<EntryBody>(&protocol::entry(&stage.name, &key.to_string()), &what)?;
        if body.version != protocol::VERSION || body.stage != stage.name || body.key != key.to_string() {
            self.refused(&what, Refused::Misplaced(format!("`{}` with key {}", body.stage, body.key)));
            return None;
        }
        let (outputs, manifest) = self.fetch_outputs(blobs, stage, key, &body.outputs, &what)?;
        let (started_ms, duration_ms, commit) = (body.created_ms, body.duration_ms, body.commit);
        Some(Fetched { key: *key, outputs, manifest, started_ms, duration_ms, commit })
    }

    /// The cache half: record what [`Remote::fetch`] found as a success of `stage` here.
    pub(crate) fn learn_fetched(&self, cache: &Cache, stage: &Stage, env: &str, f: Fetched) -> Pulled {
        let learned = Learned {
            stage,
            env,
            key: f.key,
            state: State::Success,
            outputs: f.outputs,
            manifest: Some(f.manifest),
            started_ms: f.started_ms,
            duration_ms: f.duration_ms,
            commit: f.commit,
            audit: None,
        };
        match self.learn(cache, learned) {
            true => Pulled::Imported,
            false => Pulled::Miss,
        }
    }

    /// The records of `docs`, checked against `stage`'s declared outputs, with their blobs (and the manifest
    /// named by `key`) downloaded, verified and put into the local store. `None` (warned) if anything is off.
    fn fetch_outputs(
        &self,
        blobs: &BlobStore,
        stage: &Stage,
        key: &Key,
        docs: &[OutputDoc],
        what: &str,
    ) -> Option<(Vec<OutputRecord>, Vec<u8>)> {
        let mut outputs = Vec::with_capacity(docs.len());
        for doc in docs {
            match doc.checked() {
                Ok(o) => outputs.push(o),
                Err(why) => {
                    self.refused(what, why);
                    return None;
                }
            }
        }
        if let Some((_, why)) = crate::fresh::refusal_of(&outputs, &stage.outputs) {
            self.refused(what, why);
            return None;
        }
        let mut wanted: Vec<Hash> = docs.iter().filter_map(|d| d.shared_blob()).collect();
        wanted.push(key.0);
        wanted.sort_by_key(|h| h.0);
        wanted.dedup();
        let mut manifest = None;
        for (h, bytes) in self.fetch_blobs(wanted, what)? {
            if let Err(e) = blobs.put_bytes(&bytes, false) {
                self.warn(format!("cannot store a blob from the remote in the local cache: {e}"));
                return None;
            }
            if h == key.0 {
                manifest = Some(bytes);
            }
        }
        Some((outputs, manifest.expect("fetched")))
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

    fn cache_failed(&self, e: crate::cache::Error) {
        self.warn(format!("cannot record what the remote holds in the local cache: {e}"));
    }

    /// Record what the remote said as a finished attempt of this cache (through its one write API).
    fn learn(&self, cache: &Cache, l: Learned<'_>) -> bool {
        let meta = RunMeta {
            command: "remote".into(),
            event: None,
            branch: None,
            env: l.env.into(),
            git_commit: l.commit,
            audit: l.audit.unwrap_or_default(),
        };
        let attempt = NewAttempt {
            run_id: 0,
            stage: &l.stage.name,
            env: l.env,
            key: l.key,
            manifest: l.manifest.as_deref(),
            state: l.state,
            reason: None,
            started_at: l.started_ms,
            end: Some(End {
                duration_ms: l.duration_ms,
                exit_code: l.state.succeeded().then_some(0),
                log: &[],
                outputs: &l.outputs,
            }),
        };
        match cache.import_attempt(&meta, attempt) {
            Ok(_) => true,
            Err(e) => {
                self.cache_failed(e);
                false
            }
        }
    }

    /// Learn the shared ledger's records for deploy `stages` in `env` (read in parallel) that are newer than
    /// what this cache knows: each becomes the stage's latest attempt here. What cannot be believed as it is
    /// (not signed by a trusted key, a success whose outputs cannot be had, news while this cache holds
    /// attempts the ledger never heard of) is learned as interrupted: the live state is unknown, deploy again.
    pub(crate) fn learn_ledger(&self, cache: &Cache, stages: &[&Stage], env: &str) {
        let names: Vec<String> = stages.iter().map(|s| s.name.clone()).collect();
        let read = self.store.each(names, |s, name| {
            let head = s.get(&protocol::ledger(env, &name));
            let logged = s.list(&protocol::history_of(env, &name));
            (name, head, logged)
        });
        for ((name, got, logged), stage) in read.into_iter().zip(stages) {
            let what = format!("the ledger record of `{name}` in `{env}`");
            let head = match got {
                // A head this kkpipe cannot read (damaged, or written by a newer kkpipe) still says the stage was
                // deployed since: the live state is unknown, never what this cache last saw.
                Ok(Some((bytes, _))) => {
                    Some(self.open_record(&bytes, env, &name, &what).unwrap_or_else(|| (unreadable(env, &name), false)))
                }
                Ok(None) => None,
                Err(e) => {
                    self.failed(&what, e);
                    continue;
                }
            };
            let Some((body, believed)) = self.latest_record(head, logged, env, &name, &what) else {
                self.publish_local(cache, stage, env);
                continue;
            };
            let seen = match cache.remote_seen(&self.url, &name, env) {
                Ok(s) => s,
                Err(e) => {
                    self.warn(format!("cannot read what this cache knows of the remote: {e}"));
                    continue;
                }
            };
            // A record that is not believed says nothing about the ledger's order: its `seq` is whatever its
            // writer chose (a planted u64::MAX would hide every later record). It is learned as "live state
            // unknown" each time it is found, and never moves what this cache has seen.
            if believed && seen.is_some_and(|s| body.seq <= s.seq) {
                continue;
            }
            let in_step = seen.is_none_or(|s| !s.unsynced);
            if self.learn_record(cache, stage, env, &body, believed && in_step, &what)
                && believed
                && let Err(e) = cache.set_remote_seen(&self.url, &name, env, body.seq)
            {
                self.cache_failed(e);
            }
        }
    }

    /// The ledger has no record of `stage` in `env`, and this runner writes: a deploy this cache remembers
    /// (made before the remote was configured, or with `--remote off`) is published as the ledger's first record,
    /// so that losing this cache (an evicted CI cache) never costs a deploy again. Only a success or an adoption,
    /// with its outputs; a failed attempt is left out (without a record, the next runner deploys anyway).
    fn publish_local(&self, cache: &Cache, stage: &Stage, env: &str) {
        use crate::fresh::History;
        if self.signer.is_none() {
            return;
        }
        let Ok(Some(a)) = cache.latest_attempt(&stage.name, Some(env)) else { return };
        if !a.state.succeeded() {
            return;
        }
        let Ok(Some(Ok(manifest))) = cache.manifest(&a.key) else { return };
        let bytes = manifest.encode();
        // A manifest of an older key scheme encodes otherwise: its key would not name these bytes.
        if crate::hash::Hash::of(&bytes) != a.key.0 {
            return;
        }
        let Ok(outputs) = cache.outputs(&a) else { return };
        let done = Some((a.state, &outputs[..], a.duration_ms.unwrap_or(0)));
        if self.record(cache, stage, env, &a.key, &bytes, done) {
            self.published.lock().expect("published").push(stage.name.clone());
        }
    }

    /// The ledger's latest record of `name`, and whether it is believed: the head, checked against the history.
    /// A newer believed record in the history means the head was replaced by an older one (or deleted, or its
    /// last update was lost); history objects above the head that are none of them mean the head cannot be
    /// vouched for. A head that is not believed already means "deploy again", whatever the history says.
    fn latest_record(
        &self,
        head: Option<(LedgerBody, bool)>,
        logged: Result<Vec<store::Listed>, store::Error>,
        env: &str,
        name: &str,
        what: &str,
    ) -> Option<(LedgerBody, bool)> {
        if let Some((body, false)) = head {
            return Some((body, false));
        }
        let after = head.as_ref().map_or(0, |(b, _)| b.seq);
        let newer = match self.newest_logged(logged, env, name, after, what) {
            Logged::Nothing => return head,
            Logged::Newer(newer) => *newer,
            Logged::Unsure => {
                self.warn(format!(
                    "{what} on the remote `{}`: the newest object of its history is no believed record: the head \
                     is not believed, deploying again",
                    self.url
                ));
                return head.map(|(body, _)| (body, false));
            }
        };
        let was = head.map_or("missing".into(), |(b, _)| format!("at {}", b.seq));
        self.warn(format!(
            "{what} on the remote `{}` is {was} while its history holds {}: the head was replaced or lost; using \
             the newest record of the history",
            self.url, newer.seq
        ));
        Some((newer, true))
    }

    /// A ledger record of this runner's attempt, as of now.
    #[allow(clippy::too_many_arguments)]
    fn ledger_body(
        &self,
        stage: &Stage,
        env: &str,
        seq: u64,
        key: &Key,
        state: State,
        outputs: Vec<OutputDoc>,
        duration_ms: i64,
    ) -> LedgerBody {
        LedgerBody {
            version: protocol::VERSION,
            env: env.into(),
            stage: stage.name.clone(),
            seq,
            key: key.to_string(),
            state,
            who: self.who.clone(),
            at_ms: now_ms(),
            commit: self.commit.clone(),
            outputs,
            duration_ms,
            audit: Some(self.audit.lock().unwrap_or_else(|e| e.into_inner()).clone())
                .filter(|a| a != &crate::fresh::Audit::default()),
        }
    }

    /// The next sequence number of the ledger of `stage` in `env`, and the head's version to swap: one more than
    /// the believed head, the newest believed record of the history, and what this cache knows. Only believed
    /// records' numbers are used. Over a head that is not believed (tampered, or by an untrusted key) the true
    /// number is unknown: the wall clock (milliseconds) is a floor later than any honest record's, so readers
    /// that saw the replaced head still learn the next one.
    fn next_seq(
        &self,
        cache: &Cache,
        stage: &Stage,
        env: &str,
        floor: u64,
        what: &str,
    ) -> Option<(u64, Option<store::Version>)> {
        let (head, version) = match self.store.get(&protocol::ledger(env, &stage.name)) {
            Ok(None) => (0, None),
            Ok(Some((bytes, v))) => match protocol::open::<LedgerBody>(&bytes, &self.trusted) {
                Ok(head) => (head.seq, Some(v)),
                Err(_) => (now_ms().max(0) as u64, Some(v)),
            },
            Err(e) => {
                self.failed(what, e);
                return None;
            }
        };
        let listed = self.store.list(&protocol::history_of(env, &stage.name));
        let logged = match self.newest_logged(listed, env, &stage.name, head, what) {
            Logged::Nothing => 0,
            Logged::Newer(b) => b.seq,
            // The history's true top is unknown: the wall clock is a floor above any honest record's.
            Logged::Unsure => now_ms().max(0) as u64,
        };
        let seen = cache.remote_seen(&self.url, &stage.name, env).ok().flatten().map_or(0, |s| s.seq);
        match head.max(logged).max(seen).max(floor).checked_add(1) {
            Some(seq) => Some((seq, version)),
            None => {
                self.warn(format!("{what} on the remote `{}` is at the largest sequence number", self.url));
                None
            }
        }
    }

    /// A ledger record read from the store, and whether it is believed (signed by a trusted key). `None`
    /// (warned) when it cannot be read at all or names another stage or environment.
    fn open_record(&self, bytes: &[u8], env: &str, name: &str, what: &str) -> Option<(LedgerBody, bool)> {
        let (body, believed) = match protocol::open::<LedgerBody>(bytes, &self.trusted) {
            Ok(body) => (body, true),
            Err(why) => match protocol::peek::<LedgerBody>(bytes) {
                Some(body) => {
                    self.warn(format!("{what} on the remote `{}` is not believed ({why}): deploying again", self.url));
                    (body, false)
                }
                None => {
                    self.refused(what, why);
                    return None;
                }
            },
        };
        if body.env != env || body.stage != name || body.version != protocol::VERSION {
            self.refused(what, Refused::Misplaced(format!("`{}` in `{}`", body.stage, body.env)));
            return None;
        }
        Some((body, believed))
    }

    /// What the ledger history of `name` holds above `after` (the head's number). The newest object there must
    /// be a believed record under its own number; anything else (an object nobody trusted signed, a misnamed
    /// copy, a listing that fails on a planted name) means the history cannot vouch for the head, which is then
    /// not believed either (fail closed: planted objects can cost a redeploy, never a skip).
    fn newest_logged(
        &self,
        listed: Result<Vec<store::Listed>, store::Error>,
        env: &str,
        name: &str,
        after: u64,
        what: &str,
    ) -> Logged {
        let listed = match listed {
            Ok(l) => l,
            Err(e) => {
                self.warn(format!("cannot list the history of {what} on the remote `{}`: {e}", self.url));
                return Logged::Unsure;
            }
        };
        let prefix = format!("{}/", protocol::history_of(env, name));
        let mut newest: Option<u64> = None;
        for l in &listed {
            match l.name.strip_prefix(&prefix).map(str::parse::<u64>) {
                Some(Ok(seq)) => newest = newest.max(Some(seq)),
                // A name that is no record's: planted.
                _ => return Logged::Unsure,
            }
        }
        let Some(seq) = newest.filter(|&s| s > after) else { return Logged::Nothing };
        let Ok(Some((bytes, _))) = self.store.get(&protocol::history(env, name, seq)) else { return Logged::Unsure };
        match protocol::open::<LedgerBody>(&bytes, &self.trusted) {
            Ok(body)
                if body.seq == seq && body.env == env && body.stage == name && body.version == protocol::VERSION =>
            {
                Logged::Newer(Box::new(body))
            }
            _ => Logged::Unsure,
        }
    }

    /// One ledger record as the stage's latest attempt here; `as_is`: believed, and nothing local to weigh.
    fn learn_record(
        &self,
        cache: &Cache,
        stage: &Stage,
        env: &str,
        body: &LedgerBody,
        as_is: bool,
        what: &str,
    ) -> bool {
        // A key that is no hash stands for "some other attempt": it matches no current key.
        let key = Hash::from_hex(&body.key).map(Key).unwrap_or(Key(Hash::of(body.key.as_bytes())));
        let mut l = Learned {
            stage,
            env,
            key,
            state: State::Interrupted,
            outputs: Vec::new(),
            manifest: None,
            started_ms: body.at_ms,
            duration_ms: body.duration_ms,
            commit: body.commit.clone(),
            audit: body.audit.clone(),
        };
        match (as_is, body.state) {
            (true, state @ (State::Success | State::Adopted)) => {
                if let Some((outputs, manifest)) = self.fetch_outputs(&cache.blobs, stage, &key, &body.outputs, what) {
                    (l.state, l.outputs, l.manifest) = (state, outputs, Some(manifest));
                }
            }
            (true, State::Failed) => l.state = State::Failed,
            _ => {}
        }
        if l.manifest.is_none() {
            // Only for `why`'s comparison: an attempt learned without its manifest still counts.
            l.manifest = match self.store.get(&protocol::blob(&key.to_string())) {
                Ok(Some((bytes, _))) if Hash::of(&bytes) == key.0 => Some(bytes),
                _ => None,
            };
        }
        self.learn(cache, l)
    }

    /// Share a check stage's success: blobs first (the manifest and every output that is not sensitive), then
    /// the entry, create-only (an entry already there, by another writer, is left as it is).
    pub(crate) fn publish(
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
        let Some((docs, blobs)) = self.upload_outputs(cache, stage, key, manifest, outputs, &what) else { return };
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
        // A blob that was there already was not uploaded again, so `cache gc --remote` may have judged it
        // unnamed just before this entry named it: the same upload once more puts back any that went.
        let uploaded = self.store.put_if(&name, protocol::seal(&body, signer), None).and_then(|_| self.upload(&blobs));
        if let Err(e) = uploaded {
            self.failed(&what, e);
        }
    }

    /// Upload the manifest and the non-sensitive outputs' contents; returns the outputs' records to share and
    /// the blobs uploaded.
    fn upload_outputs(
        &self,
        cache: &Cache,
        stage: &Stage,
        key: &Key,
        manifest: &[u8],
        outputs: &[OutputRecord],
        what: &str,
    ) -> Option<(Vec<OutputDoc>, Vec<Blob>)> {
        let docs: Result<Vec<OutputDoc>, String> = outputs.iter().map(OutputDoc::of).collect();
        let docs = match docs {
            Ok(d) => d,
            Err(why) => {
                self.warn(format!("not sharing `{}` on the remote: {why}", stage.name));
                return None;
            }
        };
        let mut blobs = vec![(key.0, manifest.to_vec())];
        for h in docs.iter().filter_map(|d| d.shared_blob()) {
            let Some(bytes) = cache.blobs.read_verified(&h) else {
                self.warn(format!(
                    "not sharing `{}` on the remote: an output is no longer in the local cache",
                    stage.name
                ));
                return None;
            };
            blobs.push((h, bytes));
        }
        if let Err(e) = self.upload(&blobs) {
            self.failed(what, e);
            return None;
        }
        Some((docs, blobs))
    }

    /// Upload blobs that are not in the store yet (in parallel; create-only, so a concurrent writer's copy of
    /// the same content is left as it is).
    fn upload(&self, blobs: &[Blob]) -> Result<(), store::Error> {
        let uploaded = self.store.each(blobs.iter().collect(), |s, (h, bytes)| {
            let name = protocol::blob(&h.to_hex());
            match s.exists(&name) {
                Ok(true) => Ok(()),
                Ok(false) => s.put_if(&name, bytes.clone(), None).map(|_| ()),
                Err(e) => Err(e),
            }
        });
        uploaded.into_iter().collect()
    }

    /// Record a deploy attempt in the shared ledger by compare-and-swap: one more than the believed record there
    /// (over one that is not believed, at least the wall clock's milliseconds) and than what this cache knows:
    /// the sequence never goes back for this runner. Its manifest, and for
    /// a success its outputs, go up first. Returns whether the ledger has it.
    pub(crate) fn record(
        &self,
        cache: &Cache,
        stage: &Stage,
        env: &str,
        key: &Key,
        manifest: &[u8],
        done: Option<(State, &[OutputRecord], i64)>,
    ) -> bool {
        let Some(signer) = &self.signer else { return false };
        let name = protocol::ledger(env, &stage.name);
        let what = format!("the ledger record of `{}` in `{env}`", stage.name);
        let (state, outputs, duration_ms) = done.unwrap_or((State::Running, &[], 0));
        let shared = if state.succeeded() { outputs } else { &[] };
        let Some((docs, _)) = self.upload_outputs(cache, stage, key, manifest, shared, &what) else { return false };
        // A number found taken in the history (by a writer that lost the head, or by something planted) is
        // never tried again.
        let mut floor = 0;
        for _ in 0..16 {
            let Some((seq, version)) = self.next_seq(cache, stage, env, floor, &what) else { return false };
            floor = seq;
            let body = self.ledger_body(stage, env, seq, key, state, docs.clone(), duration_ms);
            let sealed = protocol::seal(&body, signer);
            // The number is claimed in the history first (create-only): a record is kept for good before it is
            // the head, so a replay of an older head is found out, and two writers never share a number.
            match self.store.put_if(&protocol::history(env, &stage.name, seq), sealed.clone(), None) {
                Ok(Some(_)) => {}
                Ok(None) => continue,
                Err(e) => {
                    self.failed(&format!("the history of {what}"), e);
                    return false;
                }
            }
            match self.store.put_if(&name, sealed, version.as_ref()) {
                Ok(Some(_)) => {
                    if let Err(e) = cache.set_remote_seen(&self.url, &stage.name, env, seq) {
                        self.cache_failed(e);
                    }
                    return true;
                }
                Ok(None) => continue,
                Err(e) => {
                    self.failed(&what, e);
                    return false;
                }
            }
        }
        self.warn(format!("could not update {what} on the remote `{}`: too many concurrent writers", self.url));
        false
    }
}

/// What a ledger's history holds above its head (see `Share::newest_logged`).
enum Logged {
    Nothing,
    Newer(Box<LedgerBody>),
    /// The newest object is no believed record under its own number, or the history cannot be listed.
    Unsure,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::tests::Manual;
    use crate::fresh::History;
    use crate::hash::Hash;
    use crate::sign::PrivateKey;
    use crate::store::ObjectStore;
    use crate::store::memory::Memory;
    use std::sync::Arc;
    use std::time::Duration;

    /// A runner of the team: its own cache (in `dir`), the shared in-memory store, the team's key.
    struct Runner {
        remote: Remote,
        cache: Cache,
        _dir: tempfile::TempDir,
    }

    fn runner(store: &Arc<Memory>, key: &PrivateKey, who: &str) -> Runner {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(Manual::default());
        let remote = Remote::for_tests(store.clone(), clock, Duration::from_secs(6), who).signing_with(key);
        Runner { remote, cache: Cache::open(dir.path()).unwrap(), _dir: dir }
    }

    fn deploy_stage() -> Stage {
        let p = crate::pipeline::parse(
            std::path::Path::new("/nonexistent"),
            std::path::Path::new("/nonexistent/pipeline.toml"),
            "[stages.apply]\nkind = \"deploy\"\nrun = \"true\"\n",
        )
        .unwrap();
        p.stages[0].clone()
    }

    impl Runner {
        fn deployed(&self, stage: &Stage, manifest: &[u8]) -> Key {
            let key = Key(Hash::of(manifest));
            self.remote.record(&self.cache, stage, "prod", &key, manifest, Some((State::Success, &[], 5)));
            key
        }

        fn latest(&self) -> Option<(Key, State)> {
            self.cache.latest_attempt("apply", Some("prod")).unwrap().map(|a| (a.key, a.state))
        }
    }

    #[test]
    fn a_deploy_recorded_by_one_runner_is_the_latest_for_a_fresh_one() {
        let (store, key, stage) = (Arc::new(Memory::default()), PrivateKey::generate(), deploy_stage());
        let a = runner(&store, &key, "a@ci");
        let k1 = a.deployed(&stage, b"manifest one");
        let k2 = a.deployed(&stage, b"manifest two");
        let b = runner(&store, &key, "b@laptop");
        b.remote.learn_ledger(&b.cache, &[&stage], "prod");
        assert_eq!(b.latest(), Some((k2, State::Success)));
        assert_ne!(k1, k2);
        assert!(b.remote.take_warnings().is_empty());
        // Learned once: the same record is not learned again.
        b.remote.learn_ledger(&b.cache, &[&stage], "prod");
        assert_eq!(b.cache.latest_attempt("apply", Some("prod")).unwrap().unwrap().seq, 1);
    }

    /// Review of issue 22: a head this kkpipe cannot read (damaged, or from a newer kkpipe with fields it does
    /// not know) is not skipped over in favour of what this cache last saw: the live state is unknown.
    #[test]
    fn an_unreadable_head_means_deploy_again_not_what_this_cache_saw() {
        let (store, key, stage) = (Arc::new(Memory::default()), PrivateKey::generate(), deploy_stage());
        let a = runner(&store, &key, "a@ci");
        let k1 = a.deployed(&stage, b"manifest one");
        let b = runner(&store, &key, "b@laptop");
        b.remote.learn_ledger(&b.cache, &[&stage], "prod");
        assert_eq!(b.latest(), Some((k1, State::Success)));
        let newer =
            br#"{"format":"kkpipe-signed","kind":"ledger","body":"eyJ2ZXJzaW9uIjogOX0=","signature":"","signer":""}"#;
        store.plant(&protocol::ledger("prod", "apply"), newer);
        b.remote.learn_ledger(&b.cache, &[&stage], "prod");
        let (latest_key, state) = b.latest().unwrap();
        assert_eq!(state, State::Interrupted, "deploy again");
        assert_ne!(latest_key, k1);
    }

    #[test]
    fn a_head_replaced_by_an_older_record_is_found_out_by_the_history() {
        let (store, key, stage) = (Arc::new(Memory::default()), PrivateKey::generate(), deploy_stage());
        let a = runner(&store, &key, "a@ci");
        a.deployed(&stage, b"manifest one");
        let old = store.get(&protocol::ledger("prod", "apply")).unwrap().unwrap().0;
        let k2 = a.deployed(&stage, b"manifest two");
        store.plant(&protocol::ledger("prod", "apply"), &old);
        let b = runner(&store, &key, "b@laptop");
        b.remote.learn_ledger(&b.cache, &[&stage], "prod");
        assert_eq!(b.latest(), Some((k2, State::Success)), "the history's newer record wins");
        let warned = b.remote.take_warnings().join("\n");
        assert!(warned.contains("is at 1 while its history holds 2"), "{warned}");
        // A deleted head is found out the same way.
        store.delete(&protocol::ledger("prod", "apply")).unwrap();
        let c = runner(&store, &key, "c@laptop");
        c.remote.learn_ledger(&c.cache, &[&stage], "prod");
        assert_eq!(c.latest(), Some((k2, State::Success)));
    }

    #[test]
    fn a_writer_over_a_replayed_head_numbers_its_record_after_the_history() {
        let (store, key, stage) = (Arc::new(Memory::default()), PrivateKey::generate(), deploy_stage());
        let a = runner(&store, &key, "a@ci");
        a.deployed(&stage, b"manifest one");
        let old = store.get(&protocol::ledger("prod", "apply")).unwrap().unwrap().0;
        a.deployed(&stage, b"manifest two");
        a.deployed(&stage, b"manifest three");
        store.plant(&protocol::ledger("prod", "apply"), &old);
        // b has never read the ledger: it writes over the replayed head (1), after the history's newest (3).
        let b = runner(&store, &key, "b@laptop");
        let k3 = b.deployed(&stage, b"manifest four");
        assert!(store.get(&protocol::history("prod", "apply", 4)).unwrap().is_some(), "numbered after the history");
        let c = runner(&store, &key, "c@ci");
        c.remote.learn_ledger(&c.cache, &[&stage], "prod");
        assert_eq!(c.latest(), Some((k3, State::Success)), "the newest deploy is the latest");
        assert!(c.remote.take_warnings().is_empty(), "head and history agree again");
    }

    /// The memory store, whose listing of the ledger's history fails (as an S3 listing does on a planted
    /// `history/env/stage//x`).
    struct HistoryUnlisted(Arc<Memory>);

    impl ObjectStore for HistoryUnlisted {
        fn get(&self, name: &str) -> store::Result<Option<(Vec<u8>, store::Version)>> {
            self.0.get(name)
        }
        fn put_if(&self, n: &str, b: Vec<u8>, v: Option<&store::Version>) -> store::Result<Option<store::Version>> {
            self.0.put_if(n, b, v)
        }
        fn list(&self, under: &str) -> store::Result<Vec<store::Listed>> {
            match under.starts_with("history/") {
                true => Err(store::Error::Refused("contained empty path segment".into())),
                false => self.0.list(under),
            }
        }
        fn delete(&self, name: &str) -> store::Result<()> {
            self.0.delete(name)
        }
    }

    /// Runner a deploys twice; then someone with write access puts the first record back as the head (a
    /// replay). Returns the first deploy's key.
    fn head_replayed(store: &Arc<Memory>, key: &PrivateKey, stage: &Stage) -> Key {
        let a = runner(store, key, "a@ci");
        let k1 = a.deployed(stage, b"manifest one");
        let old = store.get(&protocol::ledger("prod", "apply")).unwrap().unwrap().0;
        a.deployed(stage, b"manifest two");
        store.plant(&protocol::ledger("prod", "apply"), &old);
        k1
    }

    #[test]
    fn a_history_that_cannot_be_listed_never_vouches_for_a_head() {
        let (store, key, stage) = (Arc::new(Memory::default()), PrivateKey::generate(), deploy_stage());
        let k1 = head_replayed(&store, &key, &stage);
        let dir = tempfile::tempdir().unwrap();
        let unlisted = Arc::new(HistoryUnlisted(store.clone()));
        let remote =
            Remote::for_tests(unlisted, Arc::new(Manual::default()), Duration::from_secs(6), "c@ci").signing_with(&key);
        let c = Runner { remote, cache: Cache::open(dir.path()).unwrap(), _dir: dir };
        c.remote.learn_ledger(&c.cache, &[&stage], "prod");
        assert_eq!(c.latest(), Some((k1, State::Interrupted)), "the replayed head is not believed");
    }

    #[test]
    fn a_number_taken_in_the_history_is_never_tried_again() {
        let (store, key, stage) = (Arc::new(Memory::default()), PrivateKey::generate(), deploy_stage());
        head_replayed(&store, &key, &stage);
        // And junk where the next number would go.
        store.plant(&protocol::history("prod", "apply", 3), b"junk");
        let b = runner(&store, &key, "b@laptop");
        let k3 = b.deployed(&stage, b"manifest three");
        assert!(b.remote.take_warnings().iter().all(|w| !w.contains("could not update")), "b's record is written");
        let c = runner(&store, &key, "c@ci");
        c.remote.learn_ledger(&c.cache, &[&stage], "prod");
        assert_eq!(c.latest(), Some((k3, State::Success)), "b's deploy is the latest");
    }

    #[test]
    fn history_objects_that_are_not_believed_or_misnamed_never_vouch_for_a_head() {
        let (store, key, stage) = (Arc::new(Memory::default()), PrivateKey::generate(), deploy_stage());
        let a = runner(&store, &key, "a@ci");
        let k1 = a.deployed(&stage, b"manifest one");
        let v1 = store.get(&protocol::history("prod", "apply", 1)).unwrap().unwrap().0;
        a.deployed(&stage, b"manifest two");
        store.plant(&protocol::ledger("prod", "apply"), &v1);
        // Newest in the history: a signed record copied under another number, or a name that is no number.
        for planted in [protocol::history("prod", "apply", 99), format!("{}/x", protocol::history_of("prod", "apply"))]
        {
            store.plant(&planted, &v1);
            let b = runner(&store, &key, "b@laptop");
            b.remote.learn_ledger(&b.cache, &[&stage], "prod");
            assert_eq!(b.latest(), Some((k1, State::Interrupted)), "{planted}: learned as 'live state unknown'");
            assert!(b.remote.take_warnings().join("\n").contains("head is not believed"), "{planted}");
            store.delete(&planted).unwrap();
        }
    }
}
