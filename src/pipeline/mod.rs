//! `pipeline.toml` -> a validated [`Pipeline`].
//!
//! Loading is pure with respect to the cache: every error here is found before `.kkpipe/` is opened, so a bad
//! pipeline never touches the database. Errors name the file, the line where we can, the stage and the key.

mod raw;

use crate::relpath::RelPath;
use raw::{RawOutput, RawPipeline, RawStage, StringOrList};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

pub(crate) const FILE_NAME: &str = "pipeline.toml";

/// The CI events a stage may run on. `manual` is a local or dispatched run; `schedule` a cron trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    PullRequest,
    Push,
    Schedule,
    Manual,
}

impl Trigger {
    pub const ALL: [Trigger; 4] = [Trigger::PullRequest, Trigger::Push, Trigger::Schedule, Trigger::Manual];

    /// The one string form, in `pipeline.toml`, flags, the database and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::PullRequest => "pull_request",
            Trigger::Push => "push",
            Trigger::Schedule => "schedule",
            Trigger::Manual => "manual",
        }
    }

    pub fn parse(s: &str) -> Option<Trigger> {
        Trigger::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// "pull_request, push, schedule, manual", for messages.
    pub fn known() -> String {
        Trigger::ALL.map(Trigger::as_str).join(", ")
    }
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
const DEFAULT_BRANCHES: &[&str] = &["main"];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no `{FILE_NAME}` found in `{}` or any parent directory\n  hint: run kkpipe inside a repository that has one, pass `-C DIR`, or create one with `kkpipe init`",
        start.display()
    )]
    NotFound { start: PathBuf },
    #[error("`{}` is not a directory ({why})\n  hint: check the path given to `-C`", start.display())]
    NoDir { start: PathBuf, why: String },
    #[error("cannot read `{}`: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}:{line}:{column}: {message}{}", file.display(), stage.as_ref().map(|s| format!(" (in stage `{s}`)")).unwrap_or_default())]
    Syntax { file: PathBuf, line: usize, column: usize, stage: Option<String>, message: String },
    #[error("{}{}: {}{message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default(), place.as_ref().map(|p| format!("{p}: ")).unwrap_or_default())]
    Invalid { file: PathBuf, line: Option<usize>, place: Option<String>, message: String },
}

impl Error {
    fn invalid(file: &Path, place: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        Error::Invalid { file: file.to_path_buf(), line: None, place: place.into(), message: message.into() }
    }
}

/// `on_drift`: what a run does with a deploy stage whose probe found drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDrift {
    /// Deploy again: the run exists to make the live system what the repository says.
    #[default]
    Apply,
    /// Apply nothing: the stage is reported drifted, what needs it is skipped, and the run fails.
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A check or build: fresh when any successful run with the same key is recorded.
    #[default]
    Check,
    /// Changes a live system: fresh only when its key equals the key of the most recent run in the
    /// environment (a ledger, not a cache), optionally confirmed by a `verify` probe.
    Deploy,
}

#[derive(Debug, Clone)]
pub struct Output {
    pub path: RelPath,
    /// Never printed, never exported without `--include-sensitive`, stored with mode 0600.
    pub sensitive: bool,
    /// A cheap command that recreates the output when it is missing and not in the store.
    pub regenerate: Option<String>,
}

/// Glob patterns relative to the repository root, already normalised.
#[derive(Debug, Clone, Default)]
pub struct InputSpec {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    pub description: Option<String>,
    pub dir: RelPath,
    pub run: Vec<String>,
    pub inputs: InputSpec,
    pub outputs: Vec<Output>,
    pub needs: Vec<String>,
    /// Global `[env]` merged with the stage's own `env` (the stage wins). Keyed.
    pub env: BTreeMap<String, String>,
    /// Taken from the caller, never stored, masked in all output; `plain_env` names are here too.
    pub pass_env: Vec<String>,
    pub secret_env: Vec<String>,
    /// Of `pass_env`, those that are no secrets (`plain_env`: a repository's name, a forge's host), shown as they
    /// are instead of masked.
    pub plain_env: Vec<String>,
    /// Of `pass_env` and `secret_env`, those that must be set (not empty) before anything runs, when the stage
    /// may run: a missing secret is found before terraform applies, not when the stage that needs it starts.
    pub required_env: Vec<String>,
    pub tools: Vec<String>,
    /// `None`: every event.
    pub on: Option<Vec<Trigger>>,
    pub branches: Vec<String>,
    pub kind: Kind,
    /// Keyed by the deployment environment (`--env`): the result depends on that environment's live state.
    pub per_env: bool,
    pub verify: Option<String>,
    /// A deploy stage with no record may be adopted when `verify` finds the live system in sync (`adopt`,
    /// default true); false for a probe that sees drift in part only (docs/pipeline-toml.md, "Adoption").
    pub adopt: bool,
    pub retry_needs_if: Option<String>,
    /// The terraform plan this stage makes (`*.tfplan` outputs) may not do what this denies (docs/review.md).
    pub plan_policy: Option<PlanPolicy>,
    pub on_drift: OnDrift,
}

/// `plan_policy`: actions denied in the stage's plans, except on addresses matching an `allow` pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanPolicy {
    pub deny: Vec<String>,
    pub allow: Vec<String>,
}

impl Stage {
    /// The `*.tfplan` outputs: terraform plans.
    pub fn plans(&self) -> impl Iterator<Item = &Output> {
        self.outputs.iter().filter(|o| o.path.display().ends_with(".tfplan"))
    }

    pub fn runs_on(&self, event: Trigger, branch: Option<&str>) -> bool {
        let on = match &self.on {
            None => return true,
            Some(on) => on,
        };
        if !on.contains(&event) {
            return false;
        }
        if event != Trigger::Push {
            return true;
        }
        match branch {
            None => true,
            Some(b) => self.branches.iter().any(|p| branch_matches(p, b)),
        }
    }

    pub fn is_deploy(&self) -> bool {
        self.kind == Kind::Deploy
    }
}

/// `*` matches any branch; `prefix/*` any branch below the prefix; anything else literally.
pub(crate) fn branch_matches(pattern: &str, branch: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_suffix('*') {
        Some(prefix) => branch.starts_with(prefix),
        None => pattern == branch,
    }
}

#[derive(Debug, Clone)]
pub struct Pipeline {
    pub root: PathBuf,
    pub file: PathBuf,
    pub global_inputs: InputSpec,
    pub stages: Vec<Stage>,
    /// `[remote]`: the shared cache and deploy ledger (docs/remote.md).
    pub remote: Option<RemoteSpec>,
    index: HashMap<String, usize>,
    /// The line of each stage's `[stages.NAME]` header (for errors found later, such as a cycle).
    pub lines: HashMap<String, usize>,
}

/// `[remote]` of pipeline.toml, checked.
#[derive(Debug, Clone)]
pub struct RemoteSpec {
    /// `s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX` or `file:///path`; `KKPIPE_REMOTE` overrides it.
    pub url: Option<String>,
    /// Public keys whose entries and ledger records are believed.
    pub trusted_keys: Vec<crate::sign::PublicKey>,
    /// How long a deploy lease lasts without renewal (`lease_seconds`).
    pub lease: std::time::Duration,
}

impl RemoteSpec {
    pub const DEFAULT_LEASE: std::time::Duration = std::time::Duration::from_secs(60);
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.index.get(name).map(|i| &self.stages[*i])
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }
}

/// Walk up from `start` to the first directory holding `pipeline.toml`, like git finds `.git`.
pub(crate) fn discover(start: &Path) -> Result<PathBuf, Error> {
    let start = std::path::absolute(start).unwrap_or_else(|_| start.to_path_buf());
    match std::fs::metadata(&start) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(Error::NoDir { start, why: "it is a file".into() }),
        Err(e) => return Err(Error::NoDir { start, why: e.to_string() }),
    }
    let mut dir = Some(start.as_path());
    while let Some(d) = dir {
        if d.join(FILE_NAME).is_file() {
            return Ok(d.to_path_buf());
        }
        dir = d.parent();
    }
    Err(Error::NotFound { start })
}

pub fn load(root: &Path) -> Result<Pipeline, Error> {
    let file = root.join(FILE_NAME);
    let text = std::fs::read_to_string(&file).map_err(|source| Error::Read { path: file.clone(), source })?;
    parse(root, &file, &text)
}

pub fn parse(root: &Path, file: &Path, text: &str) -> Result<Pipeline, Error> {
    let mut raw: RawPipeline = toml::from_str(text).map_err(|e| syntax_error(file, text, &e))?;
    refuse_nul(file, text)?;
    let remote = raw.remote.take().map(|r| remote_spec(file, text, r)).transpose()?;
    let mut p = validate(root, file, raw).map_err(|e| with_line(e, text))?;
    p.remote = remote;
    p.lines = stage_lines(text);
    Ok(p)
}

/// The line of each `[stages.NAME]` header, for messages about a stage found after parsing.
fn stage_lines(text: &str) -> HashMap<String, usize> {
    let mut lines = HashMap::new();
    for (n, l) in text.lines().enumerate() {
        let l = l.trim();
        if let Some(name) = l.strip_prefix("[stages.").and_then(|r| r.strip_suffix(']')) {
            lines.entry(name.trim().trim_matches('"').to_string()).or_insert(n + 1);
        }
    }
    lines
}

/// An error about `stage `NAME`, key `KEY``, with the line of that key in its table (or of its header).
fn with_line(e: Error, text: &str) -> Error {
    let Error::Invalid { file, line: None, place: Some(place), message } = e else { return e };
    let stage = place.strip_prefix("stage `").and_then(|r| r.split('`').next());
    let key = place.split(", key `").nth(1).and_then(|r| r.split('`').next());
    let line = stage.and_then(|s| {
        let header = *stage_lines(text).get(s)?;
        let in_table = text.lines().enumerate().skip(header).take_while(|(_, l)| !l.trim_start().starts_with('['));
        let at_key = key.and_then(|k| {
            in_table
                .clone()
                .find(|(_, l)| l.trim_start().strip_prefix(k).is_some_and(|r| r.trim_start().starts_with('=')))
        });
        Some(at_key.map_or(header, |(n, _)| n + 1))
    });
    Error::Invalid { file, line, place: Some(place), message }
}

/// The escapes that write a NUL in a TOML string (`\x00` is TOML 1.1's, which the parser takes).
const NUL_ESCAPES: [&str; 3] = ["\\u0000", "\\U00000000", "\\x00"];

/// A NUL character (`\u0000` in a TOML string) can reach no process, environment or path: refused at its line,
/// with its key, before anything is run or recorded.
fn refuse_nul(file: &Path, text: &str) -> Result<(), Error> {
    fn find(v: &toml::Value, path: &str) -> Option<String> {
        match v {
            toml::Value::String(s) if s.contains('\0') => Some(path.to_string()),
            toml::Value::Array(a) => a.iter().find_map(|x| find(x, path)),
            toml::Value::Table(t) => t.iter().find_map(|(k, x)| {
                if k.contains('\0') {
                    return Some(format!("{path}.{}", k.escape_debug()));
                }
                find(x, &if path.is_empty() { k.clone() } else { format!("{path}.{k}") })
            }),
            _ => None,
        }
    }
    // Only an escape makes a NUL (a raw one is a syntax error; `\x00` is TOML 1.1's): without one, no second
    // parse of the file.
    if !NUL_ESCAPES.iter().any(|e| text.contains(e)) {
        return Ok(());
    }
    let Ok(table) = text.parse::<toml::Table>() else { return Ok(()) };
    let Some(key) = find(&toml::Value::Table(table), "") else { return Ok(()) };
    let message = format!("`{key}` holds a NUL character, which no command, variable or path can carry; remove it");
    // Where it is written: the first escape that makes one.
    let at = NUL_ESCAPES.iter().filter_map(|e| text.find(e)).min();
    match at {
        Some(at) => {
            let before = &text[..at];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            Err(Error::Syntax { file: file.to_path_buf(), line, column, stage: stage_at(before), message })
        }
        None => Err(Error::invalid(file, None, message)),
    }
}

/// `[remote]`, with each bad value reported at its line.
fn remote_spec(file: &Path, text: &str, r: raw::RawRemote) -> Result<RemoteSpec, Error> {
    let at = |span: std::ops::Range<usize>, message: String| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
        Error::Syntax { file: file.to_path_buf(), line, column, stage: None, message }
    };
    if let Some(u) = &r.url {
        use crate::store::{known_scheme, scheme_list};
        let ok = url::Url::parse(u.get_ref()).is_ok_and(|p| known_scheme(p.scheme()));
        if !ok {
            return Err(at(u.span(), format!("remote.url `{}` is not an {} URL", u.get_ref(), scheme_list())));
        }
    }
    let mut trusted_keys = Vec::new();
    for k in &r.trusted_keys {
        let key = crate::sign::PublicKey::parse(k.get_ref()).map_err(|e| {
            at(
                k.span(),
                format!(
                    "remote.trusted_keys: {e}\n  hint: `kkpipe remote keygen` prints a key pair; list its `public` here"
                ),
            )
        })?;
        trusted_keys.push(key);
    }
    let lease = match r.lease_seconds {
        Some(0) => return Err(Error::invalid(file, Some("remote".into()), "lease_seconds must be at least 1")),
        Some(s) => std::time::Duration::from_secs(s),
        None => RemoteSpec::DEFAULT_LEASE,
    };
    Ok(RemoteSpec { url: r.url.map(|u| u.into_inner()), trusted_keys, lease })
}

fn syntax_error(file: &Path, text: &str, e: &toml::de::Error) -> Error {
    let offset = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    let mut message = e.message().trim().to_string();
    if message.contains("untagged enum RawOutput") {
        message = "an output is a path string or a table like `{ path = \"out/plan\", sensitive = true }`".into();
    } else if message.contains("untagged enum StringOrList") {
        message = "`run` and `verify` are each a string or a list of strings (one command per line)".into();
    } else if let Some(v) = unknown_variant(&message, "pull_request") {
        message = format!("unknown event `{v}`; known events: {}", Trigger::known());
    } else if let Some(v) = unknown_variant(&message, "deploy") {
        message = format!("unknown kind `{v}`; use \"check\" (the default) or \"deploy\"");
    } else if let Some((field, expected)) = message.strip_prefix("unknown field `").and_then(|r| r.split_once('`')) {
        // serde: "unknown field `inputz`, expected one of `run`, `inputs`, ...": say which one was meant.
        let known: Vec<String> = expected.split('`').skip(1).step_by(2).map(str::to_string).collect();
        message = format!("unknown key `{field}`{}; known keys: {}", suggest(field, known.iter()), known.join(", "));
    }
    Error::Syntax { file: file.to_path_buf(), line, column, stage: stage_at(before), message }
}

/// serde's "unknown variant `x`, expected ..." for the enum whose variants include `marker`: `x`.
fn unknown_variant<'m>(message: &'m str, marker: &str) -> Option<&'m str> {
    let rest = message.strip_prefix("unknown variant `")?;
    let (value, expected) = rest.split_once('`')?;
    expected.contains(&format!("`{marker}`")).then_some(value)
}

/// The stage whose table encloses a byte offset, read from the nearest `[stages.NAME]` header above it.
fn stage_at(before: &str) -> Option<String> {
    for line in before.lines().rev() {
        let l = line.trim();
        if let Some(header) = l.strip_prefix('[').and_then(|h| h.trim_start_matches('[').split(']').next()) {
            let header = header.trim();
            return header
                .strip_prefix("stages.")
                .map(|rest| rest.split('.').next().unwrap_or(rest).trim_matches('"').to_string());
        }
    }
    None
}

fn validate(root: &Path, file: &Path, raw: RawPipeline) -> Result<Pipeline, Error> {
    let global_env = raw.env;
    for name in global_env.keys() {
        check_env_name(file, None, "env", name)?;
    }
    let global_inputs = InputSpec {
        include: normalise_patterns(root, file, None, "pipeline.inputs", &raw.pipeline.inputs)?,
        exclude: normalise_patterns(root, file, None, "pipeline.exclude", &raw.pipeline.exclude)?,
    };

    let mut stages = Vec::with_capacity(raw.stages.len());
    let mut index = HashMap::new();
    for (name, rs) in raw.stages {
        check_stage_name(file, &name)?;
        let stage = validate_stage(root, file, &name, rs, &global_env)?;
        index.insert(name, stages.len());
        stages.push(stage);
    }
    if stages.is_empty() {
        return Err(Error::invalid(file, None, "no stages defined; add a `[stages.NAME]` table with a `run` command"));
    }

    for s in &stages {
        let mut seen = BTreeSet::new();
        for need in &s.needs {
            if need == &s.name {
                return Err(Error::invalid(file, place(&s.name, "needs"), "a stage cannot need itself"));
            }
            if !index.contains_key(need) {
                return Err(Error::invalid(
                    file,
                    place(&s.name, "needs"),
                    format!("unknown stage `{need}`{}", suggest(need, index.keys())),
                ));
            }
            if !seen.insert(need) {
                return Err(Error::invalid(file, place(&s.name, "needs"), format!("`{need}` is listed twice")));
            }
        }
    }
    check_outputs_disjoint(file, &stages)?;
    check_events(file, &stages, &index)?;
    Ok(Pipeline {
        root: root.to_path_buf(),
        file: file.to_path_buf(),
        global_inputs,
        stages,
        remote: None,
        index,
        lines: HashMap::new(),
    })
}

fn place(stage: &str, key: &str) -> Option<String> {
    Some(format!("stage `{stage}`, key `{key}`"))
}

fn check_stage_name(file: &Path, name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            file,
            Some(format!("stage `{name}`")),
            "stage names use letters, digits, `-`, `_` and `.`, starting with a letter or digit",
        ))
    }
}

fn check_env_name(file: &Path, stage: Option<&str>, key: &str, name: &str) -> Result<(), Error> {
    let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        let p = match stage {
            Some(s) => place(s, key),
            None => Some(format!("`[{key}]`")),
        };
        Err(Error::invalid(file, p, format!("`{name}` is not a valid environment variable name")))
    }
}

/// `pass_env` with `plain_env` after it: passed the same way, only not masked, so a name is in one of them.
fn passed(file: &Path, name: &str, mut pass_env: Vec<String>, plain_env: Vec<String>) -> Result<Vec<String>, Error> {
    pass_env.extend(plain_env);
    if let Some(n) = pass_env.iter().enumerate().find_map(|(i, n)| pass_env[..i].contains(n).then_some(n)) {
        let what = format!("`{n}` is listed twice (in `pass_env` or `plain_env`); keep it once");
        return Err(Error::invalid(file, place(name, "plain_env"), what));
    }
    Ok(pass_env)
}

/// `verify` only on deploy stages, `adopt` and `on_drift` only with `verify`, `plan_policy` only on checks.
fn check_probe(file: &Path, name: &str, rs: &RawStage, kind: Kind) -> Result<(), Error> {
    let (verify, adopt) = (rs.verify.is_some(), rs.adopt.is_some());
    if rs.on_drift.is_some() && !verify {
        let what = "only a stage with a `verify` probe finds drift; add one or remove `on_drift`";
        return Err(Error::invalid(file, place(name, "on_drift"), what));
    }
    if rs.plan_policy.is_some() && kind == Kind::Deploy {
        let what = "a deploy stage would apply before its own plan is checked: put the policy on the stage that \
                    makes the plan (the deploy stages that need it check it again before they run)";
        return Err(Error::invalid(file, place(name, "plan_policy"), what));
    }
    if verify && kind != Kind::Deploy {
        return Err(Error::invalid(
            file,
            place(name, "verify"),
            "a drift probe only makes sense for deploy stages; add `kind = \"deploy\"`",
        ));
    }
    if adopt && !verify {
        return Err(Error::invalid(
            file,
            place(name, "adopt"),
            "adoption asks the stage's `verify` probe; a stage without one is never adopted (remove `adopt`)",
        ));
    }
    Ok(())
}

fn validate_stage(
    root: &Path,
    file: &Path,
    name: &str,
    mut rs: RawStage,
    global_env: &BTreeMap<String, String>,
) -> Result<Stage, Error> {
    let kind = rs.kind.unwrap_or_default();
    check_probe(file, name, &rs, kind)?;
    let run = stage_run(file, name, rs.run)?;
    let dir = stage_dir(root, file, name, rs.dir.as_deref())?;
    let include = normalise_patterns(root, file, Some(name), "inputs", &rs.inputs)?;
    let exclude = normalise_patterns(root, file, Some(name), "exclude", &rs.exclude)?;
    let outputs = rs.outputs.into_iter().map(|o| stage_output(file, name, o)).collect::<Result<Vec<_>, _>>()?;
    let plain = rs.plain_env.clone();
    rs.pass_env = passed(file, name, rs.pass_env, rs.plain_env)?;
    let env = stage_env(file, name, rs.env, &rs.pass_env, &rs.secret_env, global_env)?;
    if let Some(n) = rs.required_env.iter().find(|n| !rs.pass_env.contains(n) && !rs.secret_env.contains(n)) {
        let what = format!("`{n}` is not one the stage receives; add it to `pass_env` or `secret_env`");
        return Err(Error::invalid(file, place(name, "required_env"), what));
    }
    check_tools(file, name, &rs.tools)?;
    if rs.branches.is_some() && !rs.on.as_ref().is_none_or(|on| on.contains(&Trigger::Push)) {
        return Err(Error::invalid(
            file,
            place(name, "branches"),
            "`branches` filters push events; add \"push\" to `on` or remove `branches`",
        ));
    }
    let plan_policy = rs.plan_policy.map(|p| plan_policy(file, name, p, &outputs)).transpose()?;
    if rs.retry_needs_if.is_some() && rs.needs.is_empty() {
        return Err(Error::invalid(file, place(name, "retry_needs_if"), "the stage has no `needs` to rerun"));
    }
    Ok(Stage {
        name: name.to_string(),
        description: rs.description,
        dir,
        run,
        inputs: InputSpec { include, exclude },
        outputs,
        needs: rs.needs,
        env,
        pass_env: rs.pass_env,
        secret_env: rs.secret_env,
        plain_env: plain,
        required_env: rs.required_env,
        tools: rs.tools,
        on: rs.on,
        branches: rs.branches.unwrap_or_else(|| DEFAULT_BRANCHES.iter().map(|s| s.to_string()).collect()),
        kind,
        per_env: rs.per_env,
        verify: rs.verify.map(StringOrList::lines),
        adopt: rs.adopt.unwrap_or(true),
        retry_needs_if: rs.retry_needs_if,
        plan_policy,
        on_drift: rs.on_drift.unwrap_or_default(),
    })
}

/// `plan_policy`: known actions (default: those that destroy), valid address patterns, and a plan to check.
fn plan_policy(file: &Path, name: &str, p: raw::RawPlanPolicy, outputs: &[Output]) -> Result<PlanPolicy, Error> {
    let deny = p.deny.unwrap_or_else(|| crate::tfplan::DENY_BY_DEFAULT.iter().map(|a| a.to_string()).collect());
    if let Some(a) = deny.iter().find(|a| !crate::tfplan::ACTIONS.contains(&a.as_str())) {
        let known = crate::tfplan::ACTIONS.join(", ");
        return Err(Error::invalid(
            file,
            place(name, "plan_policy.deny"),
            format!("unknown action `{a}`; known: {known}"),
        ));
    }
    if let Err(e) = crate::tfplan::address_patterns(p.allow.iter().map(String::as_str)) {
        return Err(Error::invalid(file, place(name, "plan_policy.allow"), e));
    }
    if !outputs.iter().any(|o| o.path.display().ends_with(".tfplan")) {
        let what = "the stage declares no `*.tfplan` output for the policy to check; add the plan file to `outputs`";
        return Err(Error::invalid(file, place(name, "plan_policy"), what));
    }
    Ok(PlanPolicy { deny, allow: p.allow })
}

/// `tools`: command names, found on PATH.
fn check_tools(file: &Path, name: &str, tools: &[String]) -> Result<(), Error> {
    match tools.iter().find(|t| t.is_empty() || t.contains('/') || t.contains(char::is_whitespace)) {
        Some(t) => Err(Error::invalid(
            file,
            place(name, "tools"),
            format!("`{t}` is not a command name; list names found on PATH, like \"terraform\""),
        )),
        None => Ok(()),
    }
}

/// `run`: a string or a list of lines, not all blank.
fn stage_run(file: &Path, name: &str, run: StringOrList) -> Result<Vec<String>, Error> {
    let run = match run {
        StringOrList::One(s) => vec![s],
        StringOrList::Many(v) => v,
    };
    if run.iter().all(|l| l.trim().is_empty()) {
        return Err(Error::invalid(file, place(name, "run"), "the command is empty"));
    }
    Ok(run)
}

/// `dir`: a directory that exists in the repository (the repository root by default).
fn stage_dir(root: &Path, file: &Path, name: &str, dir: Option<&str>) -> Result<RelPath, Error> {
    let Some(d) = dir else { return Ok(RelPath::root()) };
    let p = RelPath::parse(d).map_err(|e| Error::invalid(file, place(name, "dir"), format!("`{d}` {e}")))?;
    if !p.under(root).is_dir() {
        return Err(Error::invalid(
            file,
            place(name, "dir"),
            format!("directory `{d}` does not exist in `{}`; create it or fix the path", root.display()),
        ));
    }
    Ok(p)
}

/// One of `outputs`: a path inside the repository, not the root, not in `.kkpipe/` or `.git/`.
fn stage_output(file: &Path, name: &str, o: RawOutput) -> Result<Output, Error> {
    let (path, sensitive, regenerate) = match o {
        RawOutput::Path(p) => (p, false, None),
        RawOutput::Detailed(d) => (d.path, d.sensitive, d.regenerate),
    };
    let rel =
        RelPath::parse(&path).map_err(|e| Error::invalid(file, place(name, "outputs"), format!("`{path}` {e}")))?;
    if rel.is_root() {
        return Err(Error::invalid(file, place(name, "outputs"), "the repository root cannot be an output"));
    }
    if rel.through_reserved() {
        return Err(Error::invalid(
            file,
            place(name, "outputs"),
            format!("`{path}` is (inside) a `.kkpipe` or `.git`, which are never outputs"),
        ));
    }
    Ok(Output { path: rel, sensitive, regenerate })
}

/// The keyed environment (global `[env]` with the stage's own on top), after checking every name, and that
/// `pass_env` / `secret_env` names are neither set by the pipeline nor listed twice.
fn stage_env(
    file: &Path,
    name: &str,
    own: BTreeMap<String, String>,
    pass_env: &[String],
    secret_env: &[String],
    global_env: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, Error> {
    let mut env = global_env.clone();
    for (k, v) in own {
        check_env_name(file, Some(name), "env", &k)?;
        env.insert(k, v);
    }
    for (key, list) in [("pass_env", pass_env), ("secret_env", secret_env)] {
        for n in list {
            check_env_name(file, Some(name), key, n)?;
            if env.contains_key(n) {
                return Err(Error::invalid(
                    file,
                    place(name, key),
                    format!(
                        "`{n}` also has a value in `env`; a variable is either set by the pipeline or taken from the caller"
                    ),
                ));
            }
        }
    }
    if let Some(n) = pass_env.iter().find(|n| secret_env.contains(n)) {
        return Err(Error::invalid(
            file,
            place(name, "secret_env"),
            format!("`{n}` is in both `pass_env` and `secret_env`; keep it in one"),
        ));
    }
    Ok(env)
}

/// Normalise patterns (`./x` -> `x`), check their glob syntax, and turn a bare existing directory into
/// `dir/**` ("a bare directory means everything below it").
fn normalise_patterns(
    root: &Path,
    file: &Path,
    stage: Option<&str>,
    key: &str,
    patterns: &[String],
) -> Result<Vec<String>, Error> {
    let at = || match stage {
        Some(s) => place(s, key),
        None => Some(format!("`{key}`")),
    };
    let mut out = Vec::with_capacity(patterns.len());
    for p in patterns {
        let trimmed = p.trim();
        if trimmed.is_empty() {
            return Err(Error::invalid(file, at(), "empty pattern"));
        }
        if trimmed.starts_with('/') {
            return Err(Error::invalid(
                file,
                at(),
                format!("`{p}` is absolute; patterns are relative to the repository root"),
            ));
        }
        let mut norm = trimmed.trim_start_matches("./").trim_end_matches('/').to_string();
        if norm.split('/').any(|c| c == "..") {
            return Err(Error::invalid(
                file,
                at(),
                format!("`{p}` contains `..`; inputs must stay inside the repository"),
            ));
        }
        if norm.is_empty() || norm == "." {
            norm = "**".to_string();
        } else if !has_glob_meta(&norm) && root.join(&norm).is_dir() {
            norm.push_str("/**");
        }
        if let Err(e) = globset::GlobBuilder::new(&norm).literal_separator(true).build() {
            return Err(Error::invalid(file, at(), format!("invalid glob `{p}`: {}", e.kind())));
        }
        out.push(norm);
    }
    Ok(out)
}

pub(crate) fn has_glob_meta(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

fn check_outputs_disjoint(file: &Path, stages: &[Stage]) -> Result<(), Error> {
    let mut claimed: Vec<(&RelPath, &str)> = Vec::new();
    for s in stages {
        for o in &s.outputs {
            for (other, owner) in &claimed {
                if o.path.starts_with(other) || other.starts_with(&o.path) {
                    let msg = if *owner == s.name {
                        format!("`{}` overlaps `{}` of the same stage; list it once", o.path, other)
                    } else {
                        format!(
                            "`{}` is also claimed by stage `{owner}` (`{other}`); each output belongs to one stage",
                            o.path
                        )
                    };
                    return Err(Error::invalid(file, place(&s.name, "outputs"), msg));
                }
            }
            claimed.push((&o.path, &s.name));
        }
    }
    Ok(())
}

/// A stage selected for an event must find all its `needs` selected for that event too, or a CI run of that
/// event could never satisfy it.
fn check_events(file: &Path, stages: &[Stage], index: &HashMap<String, usize>) -> Result<(), Error> {
    for s in stages {
        let events: Vec<Trigger> = match &s.on {
            None => Trigger::ALL.to_vec(),
            Some(on) => on.clone(),
        };
        for need in &s.needs {
            let n = &stages[index[need]];
            for e in &events {
                let branches: Vec<Option<&str>> = if *e == Trigger::Push && s.on.is_some() {
                    s.branches.iter().map(|b| Some(b.as_str())).collect()
                } else {
                    vec![None]
                };
                for b in branches {
                    let covered = match (&n.on, b) {
                        (None, _) => true,
                        (Some(on), None) => on.contains(e),
                        (Some(on), Some(b)) => {
                            on.contains(e) && n.branches.iter().any(|nb| nb == b || branch_matches(nb, b))
                        }
                    };
                    if !covered {
                        let what = match b {
                            Some(b) => format!("push to `{b}`"),
                            None => format!("`{e}`"),
                        };
                        return Err(Error::invalid(
                            file,
                            place(&s.name, "needs"),
                            format!(
                                "runs on {what} but needs `{need}`, which does not; add the event to `{need}`'s `on` or remove it from this stage's `on`"
                            ),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// " (did you mean `x`?)" for near misses.
pub(crate) fn suggest<'a>(name: &str, candidates: impl Iterator<Item = &'a String>) -> String {
    let best = candidates
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((_, c)) => format!(" (did you mean `{c}`?)"),
        None => String::new(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Pipeline, Error> {
        let dir = tempfile::tempdir().unwrap();
        parse(dir.path(), &dir.path().join(FILE_NAME), text)
    }

    #[test]
    fn unknown_key_names_line_and_stage() {
        let err = parse_str("[stages.a]\nrun = \"true\"\n\n[stages.b]\nrun = \"true\"\ninput = [\"x\"]\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(":6:"), "{msg}");
        assert!(msg.contains("stage `b`"), "{msg}");
        assert!(msg.contains("input"), "{msg}");
    }

    #[test]
    fn unknown_need_suggests() {
        let err = parse_str("[stages.plan]\nrun = \"true\"\n[stages.apply]\nrun = \"true\"\nneeds = [\"plna\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown stage `plna`") && err.contains("did you mean `plan`"), "{err}");
    }

    #[test]
    fn event_needs_must_be_selected_too() {
        let err = parse_str(
            "[stages.apply]\nrun = \"true\"\non = [\"push\"]\n[stages.check]\nrun = \"true\"\non = [\"pull_request\"]\nneeds = [\"apply\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("stage `check`") && err.contains("`pull_request`"), "{err}");
    }

    proptest::proptest! {
        /// Loading never panics, whatever the text: it is a pipeline or an error that renders (the same
        /// property `fuzz/fuzz_targets/pipeline_toml.rs` checks with coverage guidance).
        #[test]
        fn loading_never_panics(pieces in proptest::collection::vec(proptest::prop_oneof![
            proptest::strategy::Just("[stages.a]\n".to_string()),
            proptest::strategy::Just("[stages.b]\n".to_string()),
            proptest::strategy::Just("[pipeline]\n".to_string()),
            proptest::strategy::Just("[env]\n".to_string()),
            proptest::strategy::Just("run = \"true\"\n".to_string()),
            proptest::strategy::Just("needs = [\"a\", \"b\"]\n".to_string()),
            proptest::strategy::Just("inputs = [\"**/*.tf\", \"x/[\"]\n".to_string()),
            proptest::strategy::Just("outputs = [{ path = \"../x\" }, \"o\"]\n".to_string()),
            proptest::strategy::Just("on = [\"push\"]\nbranches = [\"*\"]\n".to_string()),
            proptest::strategy::Just("kind = \"deploy\"\nverify = \"true\"\n".to_string()),
            "[a-z_.\\[\\]=\"{},\n ]{0,12}",
            ".{0,8}",
        ], 0..12)) {
            let text: String = pieces.concat();
            match parse_str(&text) {
                Ok(p) => {
                    let _ = crate::graph::Graph::build(&p).map_err(|e| e.to_string());
                }
                Err(e) => {
                    let _ = e.to_string();
                }
            }
        }
    }

    #[test]
    fn branch_patterns() {
        assert!(branch_matches("*", "x"));
        assert!(branch_matches("release/*", "release/1.2"));
        assert!(!branch_matches("main", "mainline"));
    }
}
