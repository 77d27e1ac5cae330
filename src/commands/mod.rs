//! One function per CLI verb: resolve settings, open what the verb needs, call the engine, render.

mod cache;
mod comment;
mod demo;
mod init;
mod observe;
mod plan_check;
mod preview;
mod remote;
mod same_data;
mod status;

use crate::cache::Cache;
use crate::cli::{AdoptArgs, Cli, Command, RunArgs, Selection, VerifyArgs};
use crate::error::{Error, exit};
use crate::evaluate::Context;
use crate::graph::{CiEvent, Graph};
use crate::mask::Masker;
use crate::pipeline::{self, Pipeline};
use crate::report::{Event, Fanout, Human, JsonLines, Notice, Sink, json};
use crate::run::{self, Force, Interrupt, Options};
use crate::session::Session;
use crate::settings::Settings;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// Run one invocation; returns the process exit code.
pub(crate) fn dispatch(cli: Cli) -> Result<u8, Error> {
    let settings = Settings::from_cli(&cli);
    match &cli.command {
        Command::Run(args) => run_cmd(&settings, args),
        Command::Status(args) => status::status(&settings, args),
        Command::Why(args) => observe::why(&settings, args),
        Command::Verify(args) => verify_cmd(&settings, args),
        Command::Adopt(args) => adopt_cmd(&settings, args),
        Command::Preview(args) => preview::preview(&settings, args),
        Command::Comment(args) => comment::comment(&settings, args),
        Command::Graph(args) => observe::graph(&settings, args),
        Command::Log(args) => observe::log(&settings, args),
        Command::History(args) => observe::history(&settings, args),
        Command::Completions(args) => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(args.shell, &mut cmd, "kkpipe", &mut std::io::stdout());
            Ok(exit::OK)
        }
        Command::SameData(args) => same_data::same_data(args),
        Command::PlanCheck(args) => plan_check::plan_check(&settings, args),
        Command::Init(args) => init::init(&settings, args),
        Command::Ci(args) => init::ci(&settings, args),
        Command::Demo(args) => demo::demo(&settings, args),
        Command::Cache(c) => cache::cache(&settings, c),
        Command::Remote(c) => remote::remote(&settings, c),
    }
}

/// The repository root: the nearest directory, from `-C` or the current one upwards, with pipeline.toml.
pub(crate) fn root(settings: &Settings) -> Result<PathBuf, Error> {
    Ok(pipeline::discover(&settings.start_dir)?)
}

/// A loaded and checked pipeline with its graph, the CI event and environment, and the open cache. Nothing is
/// written before the pipeline has loaded.
pub(crate) struct Opened {
    pub pipeline: Pipeline,
    pub graph: Graph,
    pub event: Option<CiEvent>,
    pub env: String,
    pub cache: Cache,
    /// `--remote read-only|off`.
    pub remote_lower: Option<crate::remote::Lower>,
}

impl Opened {
    pub(crate) fn open(settings: &Settings, sel: &Selection) -> Result<Opened, Error> {
        let root = root(settings)?;
        let pipeline = pipeline::load(&root)?;
        let graph = Graph::build(&pipeline)?;
        let event = settings.event(sel)?;
        let cache = Cache::open(&root)?;
        Ok(Opened { pipeline, graph, event, env: sel.env_name.clone(), cache, remote_lower: sel.remote })
    }

    pub(crate) fn cx(&self) -> Context<'_> {
        Context { pipeline: &self.pipeline, graph: &self.graph, event: self.event.as_ref(), env: &self.env }
    }

    /// The view of the workspace for this invocation.
    pub(crate) fn session<'a>(&'a self, settings: &'a Settings) -> Result<Session<'a>, Error> {
        let secret_key = match self.pipeline.stages.iter().any(|s| !s.secret_env.is_empty()) {
            true => Some(secret_key(&self.cache, &settings.caller_env)?),
            false => None,
        };
        let snapshot = self.cache.stat_snapshot();
        Ok(Session::new(&self.pipeline, &settings.caller_env, &self.env, snapshot, secret_key, settings.interactive))
    }

    pub(crate) fn masker(&self, settings: &Settings) -> Masker {
        Masker::for_pipeline(&self.pipeline, &settings.caller_env)
    }

    /// The remote this invocation uses (`None`: none configured, or off). Nothing is contacted yet.
    pub(crate) fn remote(&self, settings: &Settings) -> Result<Option<crate::remote::Remote>, Error> {
        self.open_remote(settings, self.resolve_remote(settings)?)
    }

    /// Which remote, in which mode, and why; a pull request never writes, not even a pull request's job run
    /// with `--event push`.
    pub(crate) fn resolve_remote(&self, settings: &Settings) -> Result<crate::remote::Resolved, Error> {
        let is_pr = |e: &CiEvent| e.name == crate::pipeline::Trigger::PullRequest;
        let pull_request = self.event.as_ref().is_some_and(is_pr) || settings.ci_event().as_ref().is_some_and(is_pr);
        crate::remote::resolve(self.pipeline.remote.as_ref(), &settings.caller_env, self.remote_lower, pull_request)
            .map_err(Error::Usage)
    }

    pub(crate) fn open_remote(
        &self,
        settings: &Settings,
        r: crate::remote::Resolved,
    ) -> Result<Option<crate::remote::Remote>, Error> {
        let commit = crate::audit::git_head(&self.pipeline.root);
        let root = &self.pipeline.root;
        crate::remote::Remote::open(r, self.pipeline.remote.as_ref(), &settings.caller_env, root, commit)
            .map_err(Error::Usage)
    }

    /// "push to `main` (environment `production`)", or a local run.
    pub(crate) fn title(&self) -> String {
        match &self.event {
            Some(e) => format!("{e} (environment `{}`)", self.env),
            None => format!("local run (environment `{}`)", self.env),
        }
    }
}

/// The HMAC key for `secret_env` values, the one place it is chosen: derived from `KKPIPE_SECRET_KEY` when the
/// caller sets it (the same on every machine with that secret; never written), else the repository's own random
/// key. An empty value (a CI secret that did not reach the job, as on pull requests from forks) counts as unset,
/// with a warning: stages with `secret_env` then rerun on each fresh runner, which is slow but never wrong.
fn secret_key(cache: &Cache, caller_env: &HashMap<String, String>) -> Result<[u8; 32], Error> {
    match caller_env.get(crate::cache::SECRET_KEY_VAR).map(String::as_str) {
        Some("") => {
            eprintln!(
                "warning: `{}` is set but empty; keying secret_env values with this repository's own key instead \
                 (stages with secret_env rerun on a fresh runner)",
                crate::cache::SECRET_KEY_VAR
            );
            Ok(cache.secret_key()?)
        }
        Some(secret) => Ok(crate::cache::shared_secret_key(secret)),
        None => Ok(cache.secret_key()?),
    }
}

pub(crate) fn human(settings: &Settings, to_stderr: bool, p: &Pipeline) -> Human {
    let names: Vec<String> = p.stages.iter().map(|s| s.name.clone()).collect();
    Human::new(settings.color, settings.style, settings.quiet, settings.verbose, to_stderr, &names)
}

fn run_cmd(settings: &Settings, args: &RunArgs) -> Result<u8, Error> {
    Ok(exit_code(run_outcome(settings, args)?.as_ref()))
}

fn exit_code(o: Option<&run::Outcome>) -> u8 {
    match o {
        None => exit::OK,
        Some(o) => match o.interrupted {
            Some(sig) if sig == signal_hook::consts::SIGTERM => exit::SIGTERM,
            Some(_) => exit::SIGINT,
            None if o.locked_out => exit::LOCKED,
            None if o.failed => exit::FAILED,
            None => exit::OK,
        },
    }
}

/// `kkpipe run`: `None` when nothing was selected or for a dry run.
pub(crate) fn run_outcome(settings: &Settings, args: &RunArgs) -> Result<Option<run::Outcome>, Error> {
    let o = Opened::open(settings, &args.selection)?;
    let rs = RunSettings::resolve(settings, args)?;
    if args.dry_run {
        let selected = o.cx().select(&args.stages)?;
        if !nothing_selected(&o, &selected) {
            status::dry_run(settings, &o, &selected, &rs.opts.force, args.json)?;
        }
        return Ok(None);
    }
    execute(settings, &o, &rs)
}

/// How one `run`, `verify` or `adopt` goes: its flags and the settings of the environment, resolved once before
/// anything runs.
struct RunSettings {
    opts: Options,
    output: Output,
}

impl RunSettings {
    fn resolve(settings: &Settings, args: &RunArgs) -> Result<RunSettings, Error> {
        let force = match (args.force, args.stages.is_empty()) {
            (false, _) => Force::No,
            (true, true) => Force::All,
            (true, false) => Force::Stages(args.stages.clone()),
        };
        let opts = Options {
            targets: args.stages.clone(),
            force,
            jobs: args.jobs.unwrap_or_else(available_cpus),
            fail_fast: args.fail_fast,
            verify: !args.no_verify,
            replay: args.replay,
            probe_only: false,
            lock_timeout: Duration::from_secs(args.lock_timeout),
            stop_grace: settings.stop_grace()?,
            deploys: crate::run::Deploys::Run,
            consent: settings.consent(args.yes),
            allow_dirty: args.allow_dirty,
            in_ci: settings.in_ci,
        };
        let output = match (args.json, args.json_lines) {
            (true, _) => Output::Json,
            (_, true) => Output::JsonLines,
            _ => Output::Human,
        };
        Ok(RunSettings { opts, output })
    }

    /// `verify` (`probe_only`) and `adopt`, which probe and never deploy: nothing to consent to.
    fn deploying_nothing(
        settings: &Settings,
        stages: &[String],
        probing: &crate::cli::Probing,
        deploys: crate::run::Deploys,
        probe_only: bool,
    ) -> Result<RunSettings, Error> {
        let opts = Options {
            targets: stages.to_vec(),
            force: Force::No,
            jobs: available_cpus(),
            fail_fast: false,
            verify: true,
            replay: false,
            probe_only,
            lock_timeout: Duration::from_secs(probing.lock_timeout),
            stop_grace: settings.stop_grace()?,
            deploys,
            consent: crate::run::Consent::Refused,
            allow_dirty: false,
            in_ci: settings.in_ci,
        };
        Ok(RunSettings { opts, output: if probing.json { Output::Json } else { Output::Human } })
    }
}

/// What stdout carries: human output, one JSON report at the end, or each event as a line of JSON. With
/// either JSON, human output goes to stderr.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    Human,
    Json,
    JsonLines,
}

/// CPUs this process may really use (affinity and cgroup quota, which `available_parallelism` reads).
pub(crate) fn available_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}

fn nothing_selected(o: &Opened, selected: &[crate::graph::Selected]) -> bool {
    if selected.contains(&crate::graph::Selected::Yes) {
        return false;
    }
    let what = match &o.event {
        Some(e) => format!("no stage runs on {e}"),
        None => "no stage selected".into(),
    };
    eprintln!("kkpipe: {what}; nothing to do");
    true
}

/// A missing or unreadable tool is an error before anything runs.
fn check_tools(session: &mut Session<'_>, o: &Opened, selected: &[crate::graph::Selected]) -> Result<(), Error> {
    for (i, sel) in selected.iter().enumerate() {
        if *sel == crate::graph::Selected::Yes
            && let Err(e) = session.tools(i)
        {
            return Err(Error::Tool { stage: o.pipeline.stages[i].name.clone(), error: e });
        }
    }
    Ok(())
}

/// The versions a pipeline pins (a stage's `KUBEONE_VERSION`, `KKP_VERSION`, `FLUX_VERSION`, ...) live once:
/// before anything runs, each must agree with what the CI job installed (the same variable in the job's
/// environment, set by the generated CI file) and with the repository (kubeone's Kubernetes range, Flux's oldest
/// Kubernetes, KKP one minor at a time). A pull request that breaks one fails its check before merge.
fn check_versions(settings: &Settings, o: &Opened) -> Result<(), Error> {
    let provider = settings.provider.unwrap_or(crate::ci::Provider::Github);
    let pinned = crate::ci::files::pinned_versions(&o.pipeline, provider);
    let mut wrong: Vec<String> = Vec::new();
    // In CI the job's variable is what its CI file installed; outside CI it installs nothing kkpipe runs.
    if settings.in_ci {
        for s in &o.pipeline.stages {
            for (var, pin) in s.env.iter().filter(|(k, _)| pinned.contains_key(k.as_str())) {
                if let Some(installed) = settings.caller_env.get(var).filter(|v| !v.is_empty())
                    && !crate::kkp::versions::same_version(installed, pin)
                {
                    wrong.push(format!(
                        "stage `{}` pins {var} = \"{pin}\", but this job installed {var} = \"{installed}\" (its CI file)",
                        s.name
                    ));
                }
            }
        }
    }
    // Only what the pipeline pins itself: a default it does not name is kkpipe's choice, not a contradiction.
    let explicit = |k: &str| o.pipeline.stages.iter().find_map(|s| s.env.get(k)).map(String::as_str);
    let get = |k: &str| explicit(k).filter(|_| pinned.contains_key(k)).map(str::to_string);
    for (fatal, text) in crate::kkp::versions::contradictions(&o.pipeline.root, &get) {
        match fatal {
            true => wrong.push(text),
            false => eprintln!("kkpipe: warning: {text}"),
        }
    }
    if wrong.is_empty() {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "not started: the pinned versions disagree:\n  {}\n  hint: set each version once, in the stage's `env` in {}, and regenerate the CI file (`kkpipe ci PROVIDER --force`)",
        wrong.join("\n  "),
        crate::pipeline::FILE_NAME
    )))
}

/// Run (or probe) the selected stages under the repository's run lock.
fn execute(settings: &Settings, o: &Opened, rs: &RunSettings) -> Result<Option<run::Outcome>, Error> {
    let (opts, output) = (&rs.opts, rs.output);
    let selected = o.cx().select(&opts.targets)?;
    if nothing_selected(o, &selected) {
        return Ok(None);
    }
    let mut session = o.session(settings)?;
    check_tools(&mut session, o, &selected)?;
    check_versions(settings, o)?;
    let json = output != Output::Human;
    let live = settings.interactive && !json;
    let summary_file = settings
        .provider
        .and_then(|p| p.conventions().summary_file)
        .and_then(|var| settings.caller_env.get(var).filter(|f| !f.is_empty()).map(PathBuf::from));
    let human = human(settings, json, &o.pipeline).with_live_progress(live).with_step_summary(summary_file, o.title());
    let mut reporters: Vec<Box<dyn Sink>> = vec![Box::new(human)];
    match output {
        Output::Human => {}
        Output::Json => reporters.push(Box::new(json::Json { context: json::Context::new(o.event.as_ref(), &o.env) })),
        Output::JsonLines => reporters.push(Box::new(JsonLines)),
    }
    let mut sink = Fanout(reporters);
    let command = if opts.probe_only { "verify" } else { "run" };
    let _lock = lock(&o.cache, command, opts.lock_timeout.as_secs())?;
    let interrupt = Interrupt::install();
    if let Some(e) = &o.event {
        sink.event(&Event::Notice(Notice::Selecting { ci_event: e.to_string(), env: o.env.clone() }));
    }
    let remote = o.remote(settings)?;
    let env = run::Env {
        cache: &o.cache,
        caller_env: &settings.caller_env,
        masker: std::sync::Arc::new(std::sync::RwLock::new(o.masker(settings))),
        remote: remote.map(std::sync::Arc::new),
    };
    let outcome = run::run(o.cx(), &mut session, &env, opts, &mut sink, &interrupt)?;
    if settings.verbose {
        eprintln!("kkpipe: {}", session.hashing_summary());
    }
    Ok(Some(outcome))
}

/// Takes the repository's run lock, telling the user whom they are waiting for.
pub(crate) fn lock(cache: &Cache, command: &str, timeout_secs: u64) -> Result<run::lock::RunLock, run::lock::Error> {
    let lock = run::lock::acquire(cache.dir(), command, Duration::from_secs(timeout_secs), |holder| {
        eprintln!("kkpipe: waiting for the run lock, held by {holder}");
    })?;
    // What a run killed before it could clean up left, which no other run reads: its stages' failure notes and
    // the reviews it fetched.
    for dir in ["notes", "reviews"] {
        let _ = std::fs::remove_dir_all(cache.dir().join(dir));
    }
    Ok(lock)
}

fn verify_cmd(settings: &Settings, args: &VerifyArgs) -> Result<u8, Error> {
    let o = Opened::open(settings, &args.probing.selection)?;
    let rs = RunSettings::deploying_nothing(settings, &args.stages, &args.probing, run::Deploys::Run, true)?;
    let outcome = execute(settings, &o, &rs)?;
    let code = exit_code(outcome.as_ref());
    // Drift (1) and interrupts outrank it; a check that checked nothing must not pass for "in sync".
    if code != exit::OK || outcome.as_ref().is_some_and(|r| r.summary.verified > 0) {
        return Ok(code);
    }
    eprintln!("kkpipe: nothing was verified: {}", nothing_verified(&o.pipeline, outcome.as_ref()));
    Ok(exit::NOTHING_VERIFIED)
}

/// `kkpipe adopt`: run what must run, but adopt deploy stages instead of deploying them. Exit 1 unless every
/// selected stage ended fresh, ran or adopted.
fn adopt_cmd(settings: &Settings, args: &AdoptArgs) -> Result<u8, Error> {
    let o = Opened::open(settings, &args.probing.selection)?;
    let deploys = crate::run::Deploys::Adopt { assume_deployed: args.assume_deployed };
    let rs = RunSettings::deploying_nothing(settings, &args.stages, &args.probing, deploys, false)?;
    let outcome = execute(settings, &o, &rs)?;
    let code = exit_code(outcome.as_ref());
    use crate::report::StageState as S;
    let settled = |s: S| matches!(s, S::Fresh | S::Restored | S::Ran | S::Adopted | S::SkippedByEvent);
    match outcome {
        Some(out) if code == exit::OK && !out.rows.iter().all(|r| settled(r.state)) => Ok(exit::FAILED),
        _ => Ok(code),
    }
}

/// Why `verify` probed no stage, in words: nothing selected, no probe, or nothing deployed with these inputs.
fn nothing_verified(p: &Pipeline, outcome: Option<&run::Outcome>) -> String {
    let hint = "  hint: `verify` probes the deploy stages with a `verify` command that are deployed with their current \
                inputs (`kkpipe status` shows which are not)";
    let Some(o) = outcome else { return format!("no stage selected\n{hint}") };
    let probed = |name: &str| p.stages.iter().any(|s| s.name == name && s.is_deploy() && s.verify.is_some());
    let with_probe: Vec<&str> = o
        .rows
        .iter()
        .filter(|r| r.state != crate::report::StageState::SkippedByEvent)
        .map(|r| r.name.as_str())
        .filter(|n| probed(n))
        .collect();
    if with_probe.is_empty() {
        return format!("no selected deploy stage has a `verify` probe\n{hint}");
    }
    let list: Vec<String> = with_probe.iter().map(|n| format!("`{n}`")).collect();
    format!("{} not deployed with the current inputs, so not probed\n{hint}", list.join(", "))
}
