//! One function per CLI verb: resolve settings, open what the verb needs, call the engine, render.

mod demo;
mod init;
mod observe;
mod status;

use crate::cache::Cache;
use crate::cli::{CacheCommand, Cli, Command, RunArgs, Selection, VerifyArgs};
use crate::error::{Error, exit};
use crate::graph::Graph;
use crate::pipeline;
use crate::report::{Event, Human, Sink, json};
use crate::run::session::Session;
use crate::run::{self, Force, Interrupt, Options};
use crate::settings::Settings;
use std::path::PathBuf;
use std::time::Duration;

/// Run one invocation; returns the process exit code.
pub fn dispatch(cli: Cli) -> Result<u8, Error> {
    let settings = Settings::from_cli(&cli);
    match &cli.command {
        Command::Run(args) => run_cmd(&settings, args),
        Command::Status(args) => status::status(&settings, args),
        Command::Why(args) => observe::why(&settings, args),
        Command::Verify(args) => verify_cmd(&settings, args),
        Command::Graph(args) => observe::graph(&settings, args),
        Command::Log(args) => observe::log(&settings, args),
        Command::History(args) => observe::history(&settings, args),
        Command::Completions(args) => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(args.shell, &mut cmd, "kkpipe", &mut std::io::stdout());
            Ok(exit::OK)
        }
        Command::Init(args) => init::init(&settings, args),
        Command::Ci(args) => init::ci(&settings, args),
        Command::Demo(args) => demo::demo(&settings, args),
        Command::Cache(c) => cache_cmd(&settings, c),
    }
}

/// The repository root: the nearest directory, from `-C` or the current one upwards, with pipeline.toml.
pub(crate) fn root(settings: &Settings) -> Result<PathBuf, Error> {
    Ok(pipeline::discover(&settings.start_dir)?)
}

/// Load and check the pipeline (nothing is written before this succeeds), then open the cache.
pub(crate) fn open_session(settings: &Settings, sel: &Selection) -> Result<Session, Error> {
    let root = root(settings)?;
    let p = pipeline::load(&root)?;
    let graph = Graph::build(&p)?;
    let event = settings.event(sel)?;
    let cache = Cache::open(&root)?;
    let mut s = Session::new(p, graph, cache, event, sel.env_name.clone(), settings.caller_env.clone())?;
    s.progress = settings.interactive;
    Ok(s)
}

pub(crate) fn human(settings: &Settings, to_stderr: bool, session: &Session) -> Human {
    let names: Vec<String> = session.pipeline.stages.iter().map(|s| s.name.clone()).collect();
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
            None if o.failed => exit::FAILED,
            None => exit::OK,
        },
    }
}

/// `kkpipe run`: `None` when nothing was selected or for a dry run.
pub(crate) fn run_outcome(settings: &Settings, args: &RunArgs) -> Result<Option<run::Outcome>, Error> {
    let mut s = open_session(settings, &args.selection)?;
    let force = match (args.force, args.stages.is_empty()) {
        (false, _) => Force::No,
        (true, true) => Force::All,
        (true, false) => Force::Stages(args.stages.clone()),
    };
    if args.dry_run {
        let selected = s.select(&args.stages)?;
        if nothing_selected(&s, &selected) {
            return Ok(None);
        }
        status::dry_run(settings, &mut s, &selected, &force, args.json)?;
        return Ok(None);
    }
    let opts = Options {
        targets: args.stages.clone(),
        force,
        jobs: args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)),
        fail_fast: args.fail_fast,
        verify: !args.no_verify,
        replay: args.replay,
        probe_only: false,
    };
    execute(settings, &mut s, &opts, args.json, args.lock_timeout)
}

fn nothing_selected(s: &Session, selected: &[crate::graph::Selected]) -> bool {
    if selected.contains(&crate::graph::Selected::Yes) {
        return false;
    }
    let what = match &s.event {
        Some(e) => format!("no stage runs on {e}"),
        None => "no stage selected".into(),
    };
    eprintln!("kkpipe: {what}; nothing to do");
    true
}

/// Run (or probe) the selected stages under the repository's run lock.
fn execute(
    settings: &Settings,
    s: &mut Session,
    opts: &Options,
    json: bool,
    lock_timeout: u64,
) -> Result<Option<run::Outcome>, Error> {
    let selected = s.select(&opts.targets)?;
    if nothing_selected(s, &selected) {
        return Ok(None);
    }
    // A missing tool is an error before anything runs.
    for (i, sel) in selected.iter().enumerate() {
        if *sel == crate::graph::Selected::Yes
            && let Err(tool) = s.tools(i)
        {
            return Err(Error::Usage(format!(
                "stage `{}` needs tool `{tool}`, which is not on PATH\n  hint: install it, or fix `tools` in {}",
                s.stage(i).name,
                pipeline::FILE_NAME
            )));
        }
    }
    let live = settings.interactive && !json;
    s.progress = settings.interactive;
    let title = match &s.event {
        Some(e) => format!("{e} (environment `{}`)", s.env_name),
        None => format!("local run (environment `{}`)", s.env_name),
    };
    let summary_file = (settings.provider == Some(crate::ci::Provider::Github))
        .then(|| settings.caller_env.get("GITHUB_STEP_SUMMARY").filter(|f| !f.is_empty()).map(std::path::PathBuf::from))
        .flatten();
    let human = human(settings, json, s).with_live_progress(live).with_step_summary(summary_file, title);
    let mut sink: Box<dyn Sink> = if json {
        Box::new(json::Json { human, context: json::Context::new(s.event.as_ref(), &s.env_name) })
    } else {
        Box::new(human)
    };
    let command = if opts.probe_only { "verify" } else { "run" };
    let _lock = lock(&s.cache, command, lock_timeout)?;
    let interrupt = Interrupt::install();
    if let Some(e) = &s.event {
        sink.event(&Event::Info(format!("kkpipe: selecting stages for {e} (environment `{}`)", s.env_name)));
    }
    let outcome = run::run(s, opts, sink.as_mut(), &interrupt)?;
    if settings.verbose {
        eprintln!("kkpipe: {}", s.hashing_summary());
    }
    Ok(Some(outcome))
}

/// Takes the repository's run lock, telling the user whom they are waiting for.
fn lock(cache: &Cache, command: &str, timeout_secs: u64) -> Result<run::lock::RunLock, run::lock::Error> {
    run::lock::acquire(cache.dir(), command, Duration::from_secs(timeout_secs), |holder| {
        eprintln!("kkpipe: waiting for the run lock, held by {holder}");
    })
}

fn verify_cmd(settings: &Settings, args: &VerifyArgs) -> Result<u8, Error> {
    let mut s = open_session(settings, &args.selection)?;
    let opts = Options {
        targets: args.stages.clone(),
        force: Force::No,
        jobs: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
        fail_fast: false,
        verify: true,
        replay: false,
        probe_only: true,
    };
    Ok(exit_code(execute(settings, &mut s, &opts, args.json, args.lock_timeout)?.as_ref()))
}

fn cache_cmd(settings: &Settings, c: &CacheCommand) -> Result<u8, Error> {
    let root = root(settings)?;
    match c {
        CacheCommand::Export { file, include_sensitive, selection } => {
            let mut s = open_session(settings, selection)?;
            // The hits of the current state, and every stage's latest success (per environment).
            let mut runs = s.cache.live_stage_runs()?;
            let all = s.select(&[])?;
            let everything: Vec<crate::graph::Selected> = all.iter().map(|_| crate::graph::Selected::Yes).collect();
            match s.evaluate(&everything, &|_| false) {
                Ok(evals) => {
                    for e in evals.iter().flatten() {
                        if let crate::run::session::Decision::Fresh(hit) = &e.decision
                            && !runs.iter().any(|r| r.id == hit.record.id)
                        {
                            runs.push(hit.record.clone());
                        }
                    }
                }
                Err(e) => eprintln!("warning: exporting the latest runs only: {e}"),
            }
            runs.sort_by_key(|r| r.id);
            let report = crate::cache::archive::export(&s.cache, &runs, file, *include_sensitive)?;
            eprintln!(
                "kkpipe: exported {} stage runs and {} stored outputs ({:.1} MB) to `{}`{}",
                report.entries,
                report.blobs,
                report.bytes as f64 / 1e6,
                file.display(),
                if report.sensitive_left_out > 0 {
                    format!(
                        "; left out {} sensitive outputs (`--include-sensitive` adds them)",
                        report.sensitive_left_out
                    )
                } else {
                    String::new()
                }
            );
            Ok(exit::OK)
        }
        CacheCommand::Import { file, lock_timeout } => {
            let cache = Cache::open(&root)?;
            let _lock = lock(&cache, "cache import", *lock_timeout)?;
            let report = crate::cache::archive::import(&cache, file)?;
            eprintln!(
                "kkpipe: imported {} stage runs ({} already here) and {} stored outputs from `{}`",
                report.entries,
                report.skipped_existing,
                report.blobs,
                file.display()
            );
            Ok(exit::OK)
        }
        CacheCommand::Gc { max_size, max_age, keep } => {
            let cache = Cache::open(&root)?;
            let _lock = lock(&cache, "cache gc", 600)?;
            let mut policy = crate::cache::gc::Policy::default();
            if let Some(s) = max_size {
                policy.max_size = crate::cache::gc::parse_size(s).map_err(Error::Usage)?;
            }
            if let Some(d) = max_age {
                policy.max_age_days = *d;
            }
            if let Some(k) = keep {
                policy.keep_per_stage = *k;
            }
            let before = cache.stats()?;
            let r = cache.gc(&policy, &root)?;
            let after = cache.stats()?;
            eprintln!(
                "kkpipe: removed {} stage runs, {} runs, {} manifests and {} stored outputs ({:.1} MB); the cache now holds {} stage runs and {:.1} MB of outputs (was {:.1} MB)",
                r.stage_runs_removed,
                r.runs_removed,
                r.manifests_removed,
                r.blobs_removed,
                r.bytes_freed as f64 / 1e6,
                after.stage_runs,
                (after.blob_bytes + after.sensitive_bytes) as f64 / 1e6,
                (before.blob_bytes + before.sensitive_bytes) as f64 / 1e6,
            );
            Ok(exit::OK)
        }
        CacheCommand::Stats { json } => {
            if !Cache::exists(&root) {
                eprintln!("kkpipe: no cache at `{}` yet", Cache::dir_of(&root).display());
                return Ok(exit::OK);
            }
            let s = Cache::open(&root)?.stats()?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&s).expect("serialisable"));
            } else {
                println!("runs:            {}", s.runs);
                println!(
                    "stage runs:      {} ({} successful, {} failed or interrupted)",
                    s.stage_runs, s.successful, s.failed
                );
                println!("manifests:       {}", s.manifests);
                println!("stored outputs:  {} ({:.1} MB)", s.blobs, s.blob_bytes as f64 / 1e6);
                println!("sensitive:       {} ({:.1} MB)", s.sensitive_blobs, s.sensitive_bytes as f64 / 1e6);
                println!("stat cache:      {} files", s.stat_entries);
                println!("database:        {:.1} MB", s.database_bytes as f64 / 1e6);
            }
            Ok(exit::OK)
        }
        CacheCommand::Reset => {
            let dir = Cache::dir_of(&root);
            if dir.exists() {
                // Hold the run lock while deleting, so no run is writing. A corrupt database cannot be opened,
                // but then no run can be using it either.
                let held = match Cache::open(&root) {
                    Ok(cache) => Some(lock(&cache, "cache reset", 10)?),
                    Err(_) => None,
                };
                std::fs::remove_dir_all(&dir)
                    .map_err(|e| Error::io(format!("cannot remove `{}`", dir.display()), e))?;
                drop(held);
                eprintln!("kkpipe: removed `{}`", dir.display());
            } else {
                eprintln!("kkpipe: no cache at `{}`", dir.display());
            }
            Ok(exit::OK)
        }
    }
}
