//! What is on disk now: one invocation's walk of the input trees, file digests (through the stat cache),
//! resolved tools and secret MACs, turned into each stage's [`Manifest`]. It decides nothing (that is
//! `fresh`) and writes nothing but the stat cache (`persist_stat_cache`).

use crate::cache::Cache;
use crate::fresh::{OutputRecord, Reason};
use crate::hash::files::FileHasher;
use crate::hash::key::{FileList, Keyed, Manifest, SHELL, secret_mac, secret_unset};
use crate::hash::select::{Matcher, Trees};
use crate::hash::walk::{self, Walked};
use crate::hash::{self, Hash};
use crate::pipeline::{Pipeline, Stage};
use crate::relpath::RelPath;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Why a tool cannot be keyed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToolError {
    NotFound { name: String },
    Unreadable { name: String, path: PathBuf, error: String },
}

impl ToolError {
    pub(crate) fn name(&self) -> &str {
        match self {
            ToolError::NotFound { name } | ToolError::Unreadable { name, .. } => name,
        }
    }
}

pub(crate) struct Session<'a> {
    root: &'a Path,
    pipeline: &'a Pipeline,
    caller_env: &'a HashMap<String, String>,
    /// The deployment environment: part of `per_env` stages' manifests.
    env_name: &'a str,
    hasher: FileHasher,
    matchers: Vec<Matcher>,
    global: Matcher,
    /// The walked input trees, one group per walk start.
    walked: Trees,
    /// The stages the last whole walk was for, while nothing was walked again since: walking them again (a
    /// preflight deciding before the run does) reads nothing new.
    walked_for: Option<Vec<usize>>,
    tools: HashMap<String, Result<Hash, ToolError>>,
    secret_key: Option<[u8; 32]>,
    warnings: Vec<String>,
    warned: HashSet<String>,
    /// Show a spinner while hashing many files (on a terminal).
    progress: bool,
    /// Input lists computed ahead, in parallel, for stages whose trees are unchanged since the walk.
    inputs_ahead: HashMap<usize, Inputs>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error(transparent)]
    Hash(#[from] hash::Error),
    #[error(transparent)]
    Cache(#[from] crate::cache::Error),
}

impl<'a> Session<'a> {
    /// `snapshot`: the stored stat cache; `secret_key`: the HMAC key for `secret_env` values, when a stage
    /// has any.
    pub(crate) fn new(
        pipeline: &'a Pipeline,
        caller_env: &'a HashMap<String, String>,
        env_name: &'a str,
        snapshot: Vec<u8>,
        secret_key: Option<[u8; 32]>,
        progress: bool,
    ) -> Session<'a> {
        let mut matchers = crate::hash::select::Matchers::default();
        let matchers = pipeline
            .stages
            .iter()
            .map(|s| matchers.matcher(&s.inputs, s.outputs.iter().map(|o| o.path.clone()).collect()))
            .collect();
        Session {
            root: &pipeline.root,
            hasher: FileHasher::new(&pipeline.root, snapshot),
            pipeline,
            caller_env,
            env_name,
            matchers,
            global: Matcher::new(&pipeline.global_inputs, Vec::new()),
            walked: Trees::default(),
            walked_for: None,
            tools: HashMap::new(),
            secret_key,
            warnings: Vec::new(),
            warned: HashSet::new(),
            progress,
            inputs_ahead: HashMap::new(),
        }
    }

    fn warn_once(&mut self, w: String) {
        if self.warned.insert(w.clone()) {
            self.warnings.push(w);
        }
    }

    /// Warnings found so far (patterns matching nothing, special files skipped), each once.
    pub(crate) fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    // ------------------------------------------------------------ inputs

    /// Whether `path` (present or not) is one of stage `i`'s inputs or a global input, as its patterns say.
    pub(crate) fn is_input(&self, i: usize, path: &RelPath) -> bool {
        self.matchers[i].matches(path) || (self.global.matches(path) && !self.matchers[i].excluded(path))
    }

    /// Walk the input trees of `stages` (and the global inputs) once, in parallel, and digest their inputs
    /// ahead, in parallel too.
    pub(crate) fn walk(&mut self, stages: &[usize]) -> Result<(), Error> {
        if self.walked_for.as_deref() == Some(stages) {
            return Ok(());
        }
        let mut starts = self.global.starts().to_vec();
        for &i in stages {
            starts.extend_from_slice(self.matchers[i].starts());
        }
        let mut warnings = Vec::new();
        let (hasher, matchers, global) = (&self.hasher, &self.matchers, &self.global);
        let wanted = |p: &RelPath| global.matches(p) || stages.iter().any(|&i| matchers[i].matches(p));
        // Files the stat cache cannot vouch for (once it is decoded) are hashed while the walk goes on.
        self.walked = Trees::new(walk::walk(self.root, &starts, &mut warnings, &|w| hasher.prehash(w, wanted))?);
        self.inputs_ahead.clear();
        for w in warnings {
            self.warn_once(w);
        }
        self.walked_for = Some(stages.to_vec());
        self.prefetch_inputs(stages)
    }

    /// Walk again the trees of one stage (its files may have been written or restored since the walk).
    pub(crate) fn rewalk(&mut self, i: usize) -> Result<(), Error> {
        self.walked_for = None;
        let mut starts = self.matchers[i].starts().to_vec();
        starts.extend_from_slice(self.global.starts());
        let mut warnings = Vec::new();
        let fresh = walk::walk(self.root, &starts, &mut warnings, &|_| {})?;
        self.inputs_ahead.clear();
        let mut groups = std::mem::take(&mut self.walked).into_groups();
        groups.retain(|g| !fresh.iter().any(|f| g.start.starts_with(&f.start)));
        for g in &mut groups {
            g.files.retain(|w| !fresh.iter().any(|f| w.path.starts_with(&f.start)));
        }
        groups.extend(fresh);
        self.walked = Trees::new(groups);
        for w in warnings {
            self.warn_once(w);
        }
        Ok(())
    }

    /// Compute the input lists of `stages` in parallel (each stage's files are also hashed in parallel), for
    /// `manifest` to use while the workspace is unchanged.
    fn prefetch_inputs(&mut self, stages: &[usize]) -> Result<(), Error> {
        use rayon::prelude::*;
        let (walked, hasher, progress, matchers) = (&self.walked, &self.hasher, self.progress, &self.matchers);
        // Big files first, one at a time for all the stages together (see `FileHasher::hash_big`).
        let big: Vec<&Walked> = walked
            .files()
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

    /// The digest of a recorded output as the workspace holds it now (for `fresh::Workspace`).
    pub(crate) fn hasher(&self) -> &FileHasher {
        &self.hasher
    }

    // ------------------------------------------------------------ tools

    /// The PATH a stage's commands see: its own `env` may set one.
    fn stage_path(&self, i: usize) -> Option<&str> {
        let stage = &self.pipeline.stages[i];
        stage.env.get("PATH").or_else(|| self.caller_env.get("PATH")).map(String::as_str)
    }

    /// Where stage `i`'s commands find tool `name` (on the PATH they see, from the stage's directory).
    pub(crate) fn tool_path(&self, i: usize, name: &str) -> Option<PathBuf> {
        find_on_path_from(name, self.stage_path(i), &self.pipeline.stages[i].dir.under(self.root))
    }

    /// Resolve and hash stage `i`'s tools on the PATH its commands see, following symlinks to the file that
    /// runs (Debian's `/usr/bin/python3`, Homebrew, alternatives).
    pub(crate) fn tools(&mut self, i: usize) -> Result<Vec<(String, Hash)>, ToolError> {
        let mut out = Vec::new();
        // Relative and empty PATH entries are resolved from the stage's directory, as its shell resolves them.
        let cwd = self.pipeline.stages[i].dir.under(self.root);
        for name in &self.pipeline.stages[i].tools {
            let cache_key = format!("{}\0{}\0{name}", self.stage_path(i).unwrap_or(""), cwd.display());
            if !self.tools.contains_key(&cache_key) {
                let resolved = match find_on_path_from(name, self.stage_path(i), &cwd) {
                    None => Err(ToolError::NotFound { name: name.clone() }),
                    Some(p) => self.hasher.tool_hash(&p).map_err(|e| ToolError::Unreadable {
                        name: name.clone(),
                        path: p.clone(),
                        error: e.to_string(),
                    }),
                };
                self.tools.insert(cache_key.clone(), resolved);
            }
            out.push((name.clone(), self.tools[&cache_key].clone()?));
        }
        out.sort();
        Ok(out)
    }

    // ------------------------------------------------------------ manifest

    /// Each `secret_env` variable of `stage` as an HMAC of its value (or "unset"), sorted by name.
    fn secret_env(&self, stage: &crate::pipeline::Stage) -> Vec<(String, crate::hash::Hash)> {
        let mut out = Vec::new();
        if !stage.secret_env.is_empty() {
            let key = self.secret_key.expect("a secret key is given when a stage has secret_env");
            for name in &stage.secret_env {
                let value = self.caller_env.get(name).map(String::as_str).filter(|v| !v.is_empty());
                out.push((name.clone(), value.map_or_else(secret_unset, |v| secret_mac(&key, name, v))));
            }
            out.sort();
        }
        out
    }

    /// Everything stage `i`'s result may depend on, given the outputs of the stages it needs.
    /// `Ok(Err(reason))` when the manifest cannot be complete (a tool is missing or unreadable).
    pub(crate) fn manifest(
        &mut self,
        i: usize,
        needs: &[(String, Vec<OutputRecord>)],
    ) -> Result<Result<Keyed, Reason>, Error> {
        let tools = match self.tools(i) {
            Ok(t) => t,
            Err(e) => return Ok(Err(Reason::ToolMissing { name: e.name().to_string() })),
        };
        let stage = &self.pipeline.stages[i];
        // What a stage writes is never its own input, global or not: otherwise each run's result makes the next
        // run stale (a deploy whose output is under `[pipeline] inputs` would deploy on every run).
        let global_inputs = if self.global.is_empty() {
            Vec::new()
        } else {
            let mut g = files(&self.walked, &self.hasher, self.progress, &self.global)?.0;
            g.retain(|(p, _)| !stage.outputs.iter().any(|o| p.starts_with(&o.path)));
            g
        };
        let (inputs, unmatched) = match self.inputs_ahead.remove(&i) {
            Some(ahead) => ahead,
            None => files(&self.walked, &self.hasher, self.progress, &self.matchers[i])?,
        };
        for pi in unmatched {
            let w =
                format!("stage `{}`: input pattern `{}` matches no file", stage.name, self.matchers[i].patterns()[pi]);
            self.warn_once(w);
        }
        let secret_env = self.secret_env(stage);
        let mut needs: Vec<(String, FileList)> = needs
            .iter()
            .map(|(n, outs)| (n.clone(), outs.iter().map(|o| (o.path.clone(), o.entry.clone())).collect()))
            .collect();
        needs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut pass_env = stage.pass_env.clone();
        pass_env.sort();
        let mut outputs: Vec<(RelPath, bool)> = stage.outputs.iter().map(|o| (o.path.clone(), o.sensitive)).collect();
        outputs.sort();
        let env = self.keyed_env(stage);
        Ok(Ok(Keyed::new(Manifest {
            shell: SHELL.iter().map(|s| s.to_string()).collect(),
            dir: stage.dir.clone(),
            run: stage.run.clone(),
            env_scope: if stage.per_env { self.env_name.to_string() } else { String::new() },
            env,
            secret_env,
            pass_env,
            outputs,
            tools,
            global_inputs,
            inputs,
            needs,
        })))
    }

    /// The keyed environment: the stage's `env`, and for a stage with a `plan_policy` the policy and the
    /// override. A plan checked under another policy or override is another result: one accepted under
    /// `KKPIPE_ALLOW_DESTROY` is not fresh in a run without it (docs/review.md).
    fn keyed_env(&self, stage: &Stage) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = stage.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Some(p) = &stage.plan_policy {
            let allow = self.caller_env.get("KKPIPE_ALLOW_DESTROY").cloned().unwrap_or_default();
            env.push(("KKPIPE_ALLOW_DESTROY".into(), allow));
            env.push(("KKPIPE_PLAN_POLICY".into(), format!("deny={} allow={}", p.deny.join(","), p.allow.join(","))));
            env.sort();
        }
        env
    }

    // ------------------------------------------------------------ stat cache

    /// Save what this invocation learned into the stat cache. In the walked trees, the cache then holds the
    /// files walked, each with what was learned now or else its old entry, and what was learned of files
    /// found since (outputs); a file gone is forgotten. Elsewhere (tools, other trees) old entries stay unless
    /// relearned; `cache gc` prunes them. A no-op status writes, and scans, nothing.
    pub(crate) fn persist_stat_cache(&self, cache: &Cache) {
        use crate::hash::files::{encode_snapshot, snapshot_entries};
        let new = self.hasher.take_new_entries();
        if new.is_empty() {
            return;
        }
        let known = self.hasher.known();
        let walked_here = |p: &[u8]| p.first() != Some(&b'/') && self.walked.covers(p);
        let relearned: HashSet<&[u8], foldhash::fast::RandomState> =
            new.files.keys().map(|p| p.as_bytes()).chain(new.tools.iter().map(|(p, _)| p.as_slice())).collect();
        let old = snapshot_entries(self.hasher.snapshot());
        let kept = old.into_iter().filter(|(p, _)| !walked_here(p) && !relearned.contains(p));
        let unchanged = self
            .walked
            .files()
            .filter(|w| !new.files.contains_key(&w.path))
            .filter_map(|w| known.get(w.path.as_bytes()).map(|e| (w.path.as_bytes(), *e)));
        let learned = new.files.iter().map(|(p, e)| (p.as_bytes(), *e));
        let tools = new.tools.iter().map(|(p, e)| (p.as_slice(), *e));
        cache.save_stat_snapshot(&encode_snapshot(kept.chain(unchanged).chain(learned).chain(tools)));
    }

    /// For `-v`: how much was read, and how much the stat cache saved.
    pub(crate) fn hashing_summary(&self) -> String {
        use std::sync::atomic::Ordering;
        let c = &self.hasher.counters;
        format!(
            "hashed {} files ({:.1} MB); the stat cache vouched for {} more",
            c.files_hashed.load(Ordering::Relaxed),
            c.bytes_hashed.load(Ordering::Relaxed) as f64 / 1e6,
            c.stat_hits.load(Ordering::Relaxed)
        )
    }
}

/// The first executable file named `name` in a `PATH` value, relative entries taken from kkpipe's directory.
pub(crate) fn find_on_path(name: &str, path: Option<&str>) -> Option<PathBuf> {
    find_on_path_from(name, path, &std::env::current_dir().ok()?)
}

/// The first executable file named `name` in a `PATH` value as a shell started in `cwd` finds it: an empty
/// entry is `cwd` itself, a relative one is below `cwd` (bash's rules), so the file keyed is the one that runs.
pub(crate) fn find_on_path_from(name: &str, path: Option<&str>, cwd: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    for dir in path?.split(':') {
        let candidate = cwd.join(dir).join(name);
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
fn files(walked: &Trees, hasher: &FileHasher, progress: bool, m: &Matcher) -> Result<Inputs, Error> {
    let list = crate::hash::select::select(walked, m);
    let counters = hasher.counters.clone();
    let _spinner =
        crate::report::progress::HashProgress::start(progress && list.len() >= 2000, "hashing inputs", move || {
            use std::sync::atomic::Ordering::Relaxed;
            let files = counters.files_hashed.load(Relaxed) + counters.stat_hits.load(Relaxed);
            (files, counters.bytes_hashed.load(Relaxed))
        });
    let digests = hasher.digest_all(&list)?;
    let files: FileList = list.iter().map(|w| w.path.clone()).zip(digests).collect();
    // Patterns that select nothing are worth a warning, not an error.
    let unmatched = m.unmatched(files.iter().map(|(p, _)| p));
    Ok((files, unmatched))
}
