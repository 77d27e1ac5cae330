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
    let human = human(settings, json, s).with_live_progress(live);
    let mut sink: Box<dyn Sink> = if json {
        Box::new(json::Json { human, context: json::Context::new(s.event.as_ref(), &s.env_name) })
    } else {
        Box::new(human)
    };
    let command = if opts.probe_only { "verify" } else { "run" };
    let _lock = run::lock::acquire(s.cache.dir(), command, Duration::from_secs(lock_timeout), |holder| {
        eprintln!("kkpipe: waiting for the run lock, held by {holder}");
    })?;
    let interrupt = Interrupt::install();
    if let Some(e) = &s.event {
        sink.event(&Event::Info(format!("kkpipe: selecting stages for {e} (environment `{}`)", s.env_name)));
    }
    Ok(Some(run::run(s, opts, sink.as_mut(), &interrupt)?))
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
        CacheCommand::Reset => {
            let dir = Cache::dir_of(&root);
            if dir.exists() {
                let cache = Cache::open(&root).ok();
                // Hold the run lock while deleting, so no run is writing (a corrupt cache cannot be opened,
                // but then nothing can be running against it either).
                let _lock = cache.as_ref().map(|c| {
                    run::lock::acquire(c.dir(), "cache reset", Duration::from_secs(10), |holder| {
                        eprintln!("kkpipe: waiting for the run lock, held by {holder}");
                    })
                });
                if let Some(Err(e)) = _lock {
                    return Err(e.into());
                }
                drop(cache);
                std::fs::remove_dir_all(&dir)
                    .map_err(|e| Error::io(format!("cannot remove `{}`", dir.display()), e))?;
                eprintln!("kkpipe: removed `{}`", dir.display());
            } else {
                eprintln!("kkpipe: no cache at `{}`", dir.display());
            }
            Ok(exit::OK)
        }
    }
}
