//! One function per CLI verb: resolve settings, open what the verb needs, call the engine, render.

mod demo;
mod init;
mod status;

use crate::cache::Cache;
use crate::cli::{CacheCommand, Cli, Command, RunArgs, Selection};
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
    Ok(Session::new(p, graph, cache, event, sel.env_name.clone(), settings.caller_env.clone())?)
}

pub(crate) fn human(settings: &Settings, to_stderr: bool, session: &Session) -> Human {
    let names: Vec<String> = session.pipeline.stages.iter().map(|s| s.name.clone()).collect();
    Human::new(settings.color, settings.style, settings.quiet, settings.verbose, to_stderr, &names)
}

fn run_cmd(settings: &Settings, args: &RunArgs) -> Result<u8, Error> {
    Ok(match run_outcome(settings, args)? {
        None => exit::OK,
        Some(o) => match o.interrupted {
            Some(sig) if sig == signal_hook::consts::SIGTERM => exit::SIGTERM,
            Some(_) => exit::SIGINT,
            None if o.failed => exit::FAILED,
            None => exit::OK,
        },
    })
}

/// `kkpipe run`: `None` when nothing was selected or for a dry run.
pub(crate) fn run_outcome(settings: &Settings, args: &RunArgs) -> Result<Option<run::Outcome>, Error> {
    let mut s = open_session(settings, &args.selection)?;
    let selected = s.select(&args.stages)?;
    let force = match (args.force, args.stages.is_empty()) {
        (false, _) => Force::No,
        (true, true) => Force::All,
        (true, false) => Force::Stages(args.stages.clone()),
    };
    if !selected.contains(&crate::graph::Selected::Yes) {
        let what = match &s.event {
            Some(e) => format!("no stage runs on {e}"),
            None => "no stage selected".into(),
        };
        eprintln!("kkpipe: {what}; nothing to do");
        return Ok(None);
    }
    if args.dry_run {
        status::dry_run(settings, &mut s, &selected, &force, args.json)?;
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
    let human = human(settings, args.json, &s);
    let mut sink: Box<dyn Sink> = if args.json {
        Box::new(json::Json { human, context: json::Context::new(s.event.as_ref(), &s.env_name) })
    } else {
        Box::new(human)
    };
    let _lock = run::lock::acquire(s.cache.dir(), "run", Duration::from_secs(args.lock_timeout), |holder| {
        eprintln!("kkpipe: waiting for the run lock, held by {holder}");
    })?;
    let interrupt = Interrupt::install();
    let opts = Options {
        targets: args.stages.clone(),
        force,
        jobs: args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)),
        fail_fast: args.fail_fast,
        verify: !args.no_verify,
        replay: args.replay,
    };
    if let Some(e) = &s.event {
        sink.event(&Event::Info(format!("kkpipe: selecting stages for {e}")));
    }
    Ok(Some(run::run(&mut s, &opts, sink.as_mut(), &interrupt)?))
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
