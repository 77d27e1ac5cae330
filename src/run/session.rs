//! One invocation's view of the repository: the pipeline, its graph, the cache, and the hashing state.
//! It computes each stage's manifest and decides whether the stage is fresh, for `status`, `run`, `why`
//! and `verify` alike.

use crate::cache::{Cache, OutputRecord, StageRun, State};
use crate::fresh::{Diff, Reason};
use crate::graph::{Event, Graph, Selected};
use crate::hash::files::FileHasher;
use crate::hash::key::{DecodeError, FileList, Key, Manifest, SHELL, secret_mac};
use crate::hash::select::Matcher;
use crate::hash::walk::{self, Group, Walked};
use crate::hash::{self, Hash};
use crate::mask::Masker;
use crate::pipeline::{Pipeline, Stage};
use crate::relpath::RelPath;
use crate::run::outputs::{self, Present};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Whether a stage can be skipped, with what that takes.
#[derive(Debug, Clone)]
pub enum Decision {
    Fresh(Hit),
    Stale(Reason),
}

#[derive(Debug, Clone)]
pub struct Hit {
    pub record: StageRun,
    /// Everything the successful run recorded.
    pub outputs: Vec<OutputRecord>,
    /// Missing or modified in the workspace, present in the store.
    pub restore: Vec<OutputRecord>,
    /// Missing from the workspace and the store, but sensitive (deliberately kept out of shared caches) or
    /// regenerable: made only when a stage that needs them has to run (by `regenerate`, or by rerunning).
    pub unavailable: Vec<OutputRecord>,
}

impl Hit {
    pub fn needs_work(&self) -> bool {
        !self.restore.is_empty()
    }
}

/// What a stage's evaluation produced: its manifest (when computable) and decision.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub manifest: Option<Manifest>,
    pub decision: Decision,
    /// True when an upstream stage was stale, so the key was computed against its last known outputs.
    pub provisional: bool,
}

pub struct Session {
    pub root: PathBuf,
    pub pipeline: Pipeline,
    pub graph: Graph,
    pub cache: Cache,
    pub event: Option<Event>,
    pub env_name: String,
    pub hasher: FileHasher,
    pub masker: Arc<RwLock<Masker>>,
    caller_env: HashMap<String, String>,
    matchers: Vec<Matcher>,
    global: Matcher,
    /// The walked input trees, one group per walk start.
    walked: Vec<Group>,
    tools: HashMap<String, Result<(PathBuf, Hash), String>>,
    secret_key: Option<[u8; 32]>,
    pub warnings: Vec<String>,
    warned: HashSet<String>,
    /// Show a spinner while hashing many files (set on a terminal).
    pub progress: bool,
    /// Input lists computed ahead, in parallel, for stages whose trees are unchanged since the walk.
    inputs_ahead: HashMap<usize, Inputs>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Hash(#[from] hash::Error),
    #[error(transparent)]
    Cache(#[from] crate::cache::Error),
}

impl Session {
    pub fn new(
        pipeline: Pipeline,
        graph: Graph,
        cache: Cache,
        event: Option<Event>,
        env_name: String,
        caller_env: HashMap<String, String>,
    ) -> Result<Session, Error> {
        let root = pipeline.root.clone();
        let snapshot = cache.stat_snapshot()?;
        let matchers = pipeline
            .stages
            .iter()
            .map(|s| Matcher::new(&s.inputs, s.outputs.iter().map(|o| o.path.clone()).collect()))
            .collect();
        let global = Matcher::new(&pipeline.global_inputs, Vec::new());
        let mut masker = Masker::new();
        for s in &pipeline.stages {
            for name in s.pass_env.iter().chain(&s.secret_env) {
                if let Some(v) = caller_env.get(name) {
                    masker.add(v.as_bytes());
                }
            }
        }
        Ok(Session {
            hasher: FileHasher::new(&root, snapshot),
            root,
            pipeline,
            graph,
            cache,
            event,
            env_name,
            masker: Arc::new(RwLock::new(masker)),
            caller_env,
            matchers,
            global,
            walked: Vec::new(),
            tools: HashMap::new(),
            secret_key: None,
            warnings: Vec::new(),
            warned: HashSet::new(),
            progress: false,
            inputs_ahead: HashMap::new(),
        })
    }

    pub fn stage(&self, i: usize) -> &Stage {
        &self.pipeline.stages[i]
    }

    pub fn select(&self, targets: &[String]) -> Result<Vec<Selected>, crate::graph::Error> {
        self.graph.select(&self.pipeline, targets, self.event.as_ref())
    }

    fn warn_once(&mut self, w: String) {
        if self.warned.insert(w.clone()) {
            self.warnings.push(w);
        }
    }

    // ------------------------------------------------------------ inputs

    /// Walk the input trees of `stages` (and the global inputs) once, in parallel.
    pub fn walk(&mut self, stages: &[usize]) -> Result<(), Error> {
        let mut starts = self.global.starts();
        for &i in stages {
            starts.extend(self.matchers[i].starts());
        }
        let mut warnings = Vec::new();
        let (hasher, matchers, global) = (&self.hasher, &self.matchers, &self.global);
        let wanted = |p: &RelPath| global.matches(p) || stages.iter().any(|&i| matchers[i].matches(p));
        // Files the stat cache cannot vouch for (once it is decoded) are hashed while the walk goes on.
        self.walked = walk::walk(&self.root, &starts, &mut warnings, &|w| hasher.prehash(w, wanted))?;
        self.inputs_ahead.clear();
        for w in warnings {
            self.warn_once(w);
        }
        Ok(())
    }

    /// Walk again the trees of one stage (its files may have been written by a stage that just ran).
    pub fn rewalk(&mut self, i: usize) -> Result<(), Error> {
        let mut starts = self.matchers[i].starts();
        starts.extend(self.global.starts());
        let mut warnings = Vec::new();
        let fresh = walk::walk(&self.root, &starts, &mut warnings, &|_| {})?;
        self.inputs_ahead.clear();
        for g in &mut self.walked {
            g.files.retain(|w| !fresh.iter().any(|f| w.path.starts_with(&f.start)));
        }
        self.walked.extend(fresh);
        for w in warnings {
            self.warn_once(w);
        }
        Ok(())
    }

    /// Compute the input lists of `stages` in parallel (each stage's files are also hashed in parallel), for
    /// `manifest` to use while the workspace is unchanged.
    pub fn prefetch_inputs(&mut self, stages: &[usize]) -> Result<(), Error> {
        use rayon::prelude::*;
        let (walked, hasher, progress, matchers) = (&self.walked, &self.hasher, self.progress, &self.matchers);
        // Big files first, one at a time for all the stages together (see `FileHasher::hash_big`).
        let big: Vec<&Walked> = walked
            .iter()
            .flat_map(|g| g.files.iter())
            .filter(|w| crate::hash::files::is_big(w) && stages.iter().any(|&i| matchers[i].matches(&w.path)))
            .collect();
        hasher.hash_big(&big)?;
        let lists: Vec<Result<(usize, Inputs), Error>> =
            stages.par_iter().map(|&i| Ok((i, files(walked, hasher, progress, &matchers[i])?))).collect();
        for r in lists {
            let (i, l) = r?;
            self.inputs_ahead.insert(i, l);
        }
        Ok(())
    }

    fn files(&self, m: &Matcher) -> Result<Inputs, Error> {
        files(&self.walked, &self.hasher, self.progress, m)
    }

    // ------------------------------------------------------------ tools and secrets

    /// Resolve and hash the stage's tools on the caller's PATH. `Err(name)` for the first missing one.
    pub fn tools(&mut self, i: usize) -> Result<Vec<(String, Hash)>, String> {
        let names = self.pipeline.stages[i].tools.clone();
        let mut out = Vec::new();
        for name in names {
            if !self.tools.contains_key(&name) {
                let resolved = match find_on_path(&name, self.caller_env.get("PATH").map(String::as_str)) {
                    None => Err(name.clone()),
                    Some(p) => self.hasher.tool_hash(&p).map(|h| (p, h)).map_err(|_| name.clone()),
                };
                self.tools.insert(name.clone(), resolved);
            }
            match &self.tools[&name] {
                Ok((_, h)) => out.push((name.clone(), *h)),
                Err(n) => return Err(n.clone()),
            }
        }
        out.sort();
        Ok(out)
    }

    fn secret_key(&mut self) -> Result<[u8; 32], Error> {
        if let Some(k) = self.secret_key {
            return Ok(k);
        }
        let k = self.cache.secret_key()?;
        self.secret_key = Some(k);
        Ok(k)
    }

    // ------------------------------------------------------------ manifest

    /// Everything stage `i`'s result may depend on, given the outputs of the stages it needs.
    /// `Ok(Err(reason))` when the manifest cannot be complete (a tool is missing).
    pub fn manifest(
        &mut self,
        i: usize,
        needs: &[(String, Vec<OutputRecord>)],
    ) -> Result<Result<Manifest, Reason>, Error> {
        let tools = match self.tools(i) {
            Ok(t) => t,
            Err(name) => return Ok(Err(Reason::ToolMissing { name })),
        };
        let (global_inputs, _) =
            if self.global.is_empty() { (Vec::new(), Vec::new()) } else { self.files(&self.global)? };
        let (inputs, unmatched) = match self.inputs_ahead.remove(&i) {
            Some(ahead) => ahead,
            None => self.files(&self.matchers[i])?,
        };
        let stage = &self.pipeline.stages[i];
        let unmatched_warnings: Vec<String> = unmatched
            .iter()
            .map(|&pi| {
                format!("stage `{}`: input pattern `{}` matches no file", stage.name, self.matchers[i].patterns()[pi])
            })
            .collect();
        let mut secret_env = Vec::new();
        let secret_names = stage.secret_env.clone();
        if !secret_names.is_empty() {
            let key = self.secret_key()?;
            for name in &secret_names {
                let value = self.caller_env.get(name).map(String::as_str).unwrap_or("");
                secret_env.push((name.clone(), secret_mac(&key, name, value)));
            }
            secret_env.sort();
        }
        let stage = &self.pipeline.stages[i];
        let mut needs_files: Vec<(String, FileList)> = needs
            .iter()
            .map(|(n, outs)| (n.clone(), outs.iter().map(|o| (o.path.clone(), o.entry.clone())).collect()))
            .collect();
        needs_files.sort_by(|a, b| a.0.cmp(&b.0));
        let mut pass_env = stage.pass_env.clone();
        pass_env.sort();
        let mut outputs: Vec<(RelPath, bool)> = stage.outputs.iter().map(|o| (o.path.clone(), o.sensitive)).collect();
        outputs.sort();
        let m = Manifest {
            shell: SHELL.iter().map(|s| s.to_string()).collect(),
            dir: stage.dir.clone(),
            run: stage.run.clone(),
            env_scope: if stage.per_env { self.env_name.clone() } else { String::new() },
            env: stage.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            secret_env,
            pass_env,
            outputs,
            tools,
            global_inputs,
            inputs,
            needs: needs_files,
        };
        for w in unmatched_warnings {
            self.warn_once(w);
        }
        Ok(Ok(m))
    }

    // ------------------------------------------------------------ decision

    /// Check stages are a cache (any successful run with this key); deploy stages a ledger (the most recent
    /// run in this environment must be a success with this key).
    pub fn decide(&self, i: usize, m: &Manifest, key: &Key) -> Result<Decision, Error> {
        let stage = &self.pipeline.stages[i];
        let env = stage.is_deploy().then_some(self.env_name.as_str());
        let hit = if stage.is_deploy() {
            self.cache.latest_attempt(&stage.name, env)?.filter(|r| r.state == State::Success && r.key == *key)
        } else {
            self.cache.success_with_key(&stage.name, key)?
        };
        if let Some(record) = hit {
            let recorded = self.cache.outputs(record.id)?;
            let mut restore = Vec::new();
            let mut unavailable = Vec::new();
            for o in &recorded {
                if outputs::check(&self.root, o, &self.hasher) == Present::Same {
                    continue;
                }
                if outputs::restorable(o, &self.cache.blobs) {
                    restore.push(o.clone());
                } else if o.sensitive || self.regenerate_command(stage, o).is_some() {
                    unavailable.push(o.clone());
                } else {
                    return Ok(Decision::Stale(Reason::OutputMissing { path: o.path.display() }));
                }
            }
            return Ok(Decision::Fresh(Hit { record, outputs: recorded, restore, unavailable }));
        }
        Ok(Decision::Stale(self.explain(i, m, key)?))
    }

    fn regenerate_command(&self, stage: &Stage, o: &OutputRecord) -> Option<String> {
        stage.outputs.iter().find(|d| o.path.starts_with(&d.path)).and_then(|d| d.regenerate.clone())
    }

    /// One script recreating all `missing` outputs of stage `i`, when every one has a `regenerate` command.
    pub fn regenerate_script(&self, i: usize, missing: &[OutputRecord]) -> Option<String> {
        let stage = self.stage(i);
        let mut cmds: Vec<String> = Vec::new();
        for o in missing {
            let cmd = self.regenerate_command(stage, o)?;
            if !cmds.contains(&cmd) {
                cmds.push(cmd);
            }
        }
        Some(cmds.join("\n"))
    }

    /// The first reason a stage without a hit must run.
    fn explain(&self, i: usize, m: &Manifest, key: &Key) -> Result<Reason, Error> {
        let stage = &self.pipeline.stages[i];
        let env = stage.is_deploy().then_some(self.env_name.as_str());
        let last = self.cache.latest_attempt(&stage.name, env)?;
        let attempt_reason = |r: &StageRun| match r.state {
            State::Failed => Some(Reason::LastRunFailed { exit_code: r.exit_code }),
            State::Interrupted | State::Running => Some(Reason::LastRunInterrupted),
            State::Success => None,
        };
        if let Some(l) = &last
            && l.key == *key
            && let Some(r) = attempt_reason(l)
        {
            return Ok(r);
        }
        let Some(base) = self.cache.latest_success(&stage.name, env)? else {
            if let Some(r) = last.as_ref().and_then(attempt_reason) {
                return Ok(r);
            }
            return Ok(if stage.is_deploy() {
                Reason::NeverDeployed { env: self.env_name.clone() }
            } else {
                Reason::NeverRun
            });
        };
        match self.cache.manifest(&base.key)? {
            Some(Ok(old)) => Ok(Diff::between(&old, m)
                .first_reason()
                .or_else(|| last.as_ref().and_then(attempt_reason))
                .unwrap_or(Reason::NeverRun)),
            Some(Err(DecodeError::Version(v))) => Ok(Reason::KeySchemeChanged { old_version: Some(v) }),
            Some(Err(DecodeError::Corrupt)) | None => Ok(Reason::KeySchemeChanged { old_version: None }),
        }
    }

    /// The outputs a stage is known to produce when it is not fresh now: those of its latest success.
    pub fn last_known_outputs(&self, i: usize) -> Result<Vec<OutputRecord>, Error> {
        let stage = &self.pipeline.stages[i];
        let env = stage.is_deploy().then_some(self.env_name.as_str());
        match self.cache.latest_success(&stage.name, env)? {
            Some(r) => Ok(self.cache.outputs(r.id)?),
            None => Ok(Vec::new()),
        }
    }

    /// Evaluate stages without running anything (`status`, `run --dry-run`, `why`, `verify`): each selected
    /// stage in order, with the outputs of fresh needs, or the last known outputs of stale ones.
    pub fn evaluate(
        &mut self,
        selected: &[Selected],
        forced: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<Option<Evaluation>>, Error> {
        let n = self.pipeline.stages.len();
        let chosen: Vec<usize> = (0..n).filter(|&i| selected[i] == Selected::Yes).collect();
        self.walk(&chosen)?;
        self.prefetch_inputs(&chosen)?;
        let mut evals: Vec<Option<Evaluation>> = vec![None; n];
        for &i in &self.graph.order.clone() {
            if selected[i] != Selected::Yes {
                continue;
            }
            let mut needs = Vec::new();
            let mut stale_need = None;
            for &j in &self.graph.needs[i].clone() {
                let name = self.pipeline.stages[j].name.clone();
                match evals[j].as_ref().map(|e| &e.decision) {
                    Some(Decision::Fresh(h)) => needs.push((name, h.outputs.clone())),
                    _ => {
                        stale_need.get_or_insert(name.clone());
                        needs.push((name, self.last_known_outputs(j)?));
                    }
                }
            }
            let eval = match self.manifest(i, &needs)? {
                Err(reason) => Evaluation { manifest: None, decision: Decision::Stale(reason), provisional: false },
                Ok(m) => {
                    let key = m.key();
                    let mut decision =
                        if forced(i) { Decision::Stale(Reason::Forced) } else { self.decide(i, &m, &key)? };
                    if let Some(up) = &stale_need {
                        decision = match decision {
                            Decision::Fresh(_) | Decision::Stale(Reason::UpstreamOutputsChanged { .. }) => {
                                Decision::Stale(Reason::UpstreamStale { stage: up.clone() })
                            }
                            other => other,
                        };
                    }
                    Evaluation { manifest: Some(m), decision, provisional: stale_need.is_some() }
                }
            };
            evals[i] = Some(eval);
        }
        self.persist_stat_cache();
        Ok(evals)
    }

    /// Save what this invocation learned into the stat cache, forgetting then files that are gone from the
    /// trees it walked (`cache gc` prunes the rest). A no-op status writes, and scans, nothing.
    pub fn persist_stat_cache(&self) {
        let new = self.hasher.take_new_entries();
        if new.is_empty() {
            return;
        }
        let seen: HashSet<&[u8]> = self.walked.iter().flat_map(|g| g.files.iter().map(|w| w.path.as_bytes())).collect();
        let gone = |p: &[u8]| {
            p.first() != Some(&b'/')
                && !seen.contains(p)
                && RelPath::from_bytes(p).is_ok_and(|rel| self.walked.iter().any(|g| rel.starts_with(&g.start)))
        };
        let mut merged: HashMap<&[u8], crate::hash::files::StatEntry> =
            crate::hash::files::snapshot_entries(self.hasher.snapshot())
                .into_iter()
                .filter(|(p, _)| !gone(p))
                .collect();
        for (p, e) in &new {
            merged.insert(p, *e);
        }
        self.cache.save_stat_snapshot(&crate::hash::files::encode_snapshot(merged));
    }

    /// For `-v`: how much was read, and how much the stat cache saved.
    pub fn hashing_summary(&self) -> String {
        use std::sync::atomic::Ordering;
        let c = &self.hasher.counters;
        format!(
            "hashed {} files ({:.1} MB); the stat cache vouched for {} more",
            c.files_hashed.load(Ordering::Relaxed),
            c.bytes_hashed.load(Ordering::Relaxed) as f64 / 1e6,
            c.stat_hits.load(Ordering::Relaxed)
        )
    }

    /// Add a sensitive output's content to the masker (a stage that prints a kubeconfig shows `***`).
    pub fn mask_output(&self, o: &OutputRecord) {
        if !o.sensitive {
            return;
        }
        if let Ok(bytes) = std::fs::read(o.path.under(&self.root))
            && bytes.len() <= 1 << 20
        {
            self.masker.write().expect("masker").add(&bytes);
        }
    }

    /// The environment a stage's command sees: the base set, keyed env, and pass/secret env from the caller.
    pub fn command_env(&self, stage: &Stage) -> Vec<(String, String)> {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for name in super::exec::BASE_ENV {
            if let Some(v) = self.caller_env.get(*name) {
                env.insert(name.to_string(), v.clone());
            }
        }
        for name in stage.pass_env.iter().chain(&stage.secret_env) {
            if let Some(v) = self.caller_env.get(name) {
                env.insert(name.clone(), v.clone());
            }
        }
        for (k, v) in &stage.env {
            env.insert(k.clone(), v.clone());
        }
        env.insert("KKPIPE_STAGE".into(), stage.name.clone());
        env.into_iter().collect()
    }
}

pub fn find_on_path(name: &str, path: Option<&str>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    for dir in path?.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(name);
        if let Ok(m) = std::fs::metadata(&candidate)
            && m.is_file()
            && m.permissions().mode() & 0o111 != 0
        {
            return Some(std::path::absolute(&candidate).unwrap_or(candidate));
        }
    }
    None
}

/// A stage's digested input files, and the indices of its include patterns that matched nothing.
type Inputs = (FileList, Vec<usize>);

/// The files `m` selects from the walk, digested, and the include patterns that matched nothing.
fn files(walked: &[Group], hasher: &FileHasher, progress: bool, m: &Matcher) -> Result<Inputs, Error> {
    let list = crate::hash::select::select(walked, m);
    let _spinner = crate::report::progress::HashProgress::start(
        progress && list.len() >= 2000,
        "hashing inputs",
        hasher.counters.clone(),
    );
    let digests = hasher.digest_all(&list)?;
    let files: FileList = list.iter().map(|w| w.path.clone()).zip(digests).collect();
    // Patterns that select nothing are worth a warning, not an error.
    let unmatched =
        (0..m.patterns().len()).filter(|&pi| !files.iter().any(|(p, _)| m.pattern_matches(pi, p))).collect();
    Ok((files, unmatched))
}
