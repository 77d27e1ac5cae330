//! Read-only views: `why`, `graph`, `log`, `history`. None takes the run lock: they work during a run.

use super::{Opened, root};
use crate::cache::Cache;
use crate::cli::{GraphArgs, GraphFormat, HistoryArgs, LogArgs, WhyArgs};
use crate::error::{Error, exit};
use crate::explain;
use crate::report::{StageRow, StageState, age, format_duration, history, json, timestamp};
use crate::settings::Settings;
use std::io::Write;
use std::time::Duration;

pub(super) fn why(settings: &Settings, args: &WhyArgs) -> Result<u8, Error> {
    let o = Opened::open(settings, &args.selection)?;
    let selected = o.cx().select(std::slice::from_ref(&args.stage))?;
    let i = o.pipeline.index_of(&args.stage).expect("selected, so known");
    let mut session = o.session(settings)?;
    let evals = crate::evaluate::all(o.cx(), &mut session, &o.cache, &selected, &|_| false)?;
    for w in session.take_warnings() {
        eprintln!("warning: {w}");
    }
    let x = explain::explain(o.cx(), &o.cache, &evals, i)?;
    let masker = o.masker(settings);
    if args.json {
        #[derive(serde::Serialize)]
        struct Doc<'a> {
            schema: &'static str,
            #[serde(flatten)]
            context: json::Context,
            #[serde(flatten)]
            explanation: &'a crate::report::why::Explanation,
        }
        let doc =
            Doc { schema: json::WHY_SCHEMA, context: json::Context::new(o.event.as_ref(), &o.env), explanation: &x };
        let text = serde_json::to_string_pretty(&doc).expect("serialisable");
        println!("{}", masker.mask_str(&text));
    } else {
        let limit = if args.all { None } else { Some(20) };
        print!("{}", crate::report::why::render(&x, limit, &|t| masker.mask_str(t)));
    }
    Ok(exit::OK)
}

pub(super) fn graph(settings: &Settings, args: &GraphArgs) -> Result<u8, Error> {
    let o = Opened::open(settings, &args.selection)?;
    let rows: Vec<StageRow> = super::status::status_rows(settings, &o, &args.stages)?
        .into_iter()
        .filter(|r| o.event.is_none() || r.state != StageState::SkippedByEvent)
        .collect();
    let on_terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let format = args.format.unwrap_or(if on_terminal { GraphFormat::Text } else { GraphFormat::Mermaid });
    let text = match format {
        GraphFormat::Text => crate::report::graph::text(&rows),
        GraphFormat::Mermaid => crate::report::graph::mermaid(&rows),
        GraphFormat::Dot => crate::report::graph::dot(&rows),
    };
    print!("{text}");
    Ok(exit::OK)
}

/// The remote ledger's records of `stage` (with the remote's URL), when a remote is configured and answers;
/// what goes wrong is a warning, never a failure of `history`.
fn remote_ledger(
    settings: &Settings,
    stage: &str,
    args: &HistoryArgs,
) -> Option<(String, Vec<crate::report::remote::LedgerRow>)> {
    let env = args.env_name.clone().unwrap_or_else(|| "default".into());
    let sel = crate::cli::Selection { event: None, branch: None, env_name: env, remote: None };
    let remote = match super::Opened::open(settings, &sel).and_then(|o| o.remote(settings)) {
        Ok(r) => r?,
        Err(e) => {
            eprintln!("warning: the remote's ledger is not shown: {e}");
            return None;
        }
    };
    let limit = usize::try_from(args.limit).unwrap_or(0);
    let rows = crate::remote::admin::ledger_history(&remote, stage, args.env_name.as_deref(), limit);
    for w in remote.take_warnings() {
        eprintln!("warning: {w}");
    }
    match rows {
        Ok(rows) => Some((remote.url.clone(), rows)),
        Err(e) => {
            eprintln!("warning: the ledger on the remote `{}` could not be read: {e}", remote.url);
            None
        }
    }
}

fn open_existing(settings: &Settings) -> Result<Option<Cache>, Error> {
    let root = root(settings)?;
    if !Cache::exists(&root) {
        return Ok(None);
    }
    Ok(Some(Cache::open(&root)?))
}

pub(super) fn log(settings: &Settings, args: &LogArgs) -> Result<u8, Error> {
    let Some(cache) = open_existing(settings)? else {
        return Err(Error::Usage("nothing has run in this repository yet: there is no log".into()));
    };
    let runs = cache.stage_history(&args.stage, None, i64::MAX)?;
    let found = match args.run {
        Some(n) => runs.into_iter().find(|(sr, _)| sr.run_id == n),
        None => runs.into_iter().next(),
    };
    let Some((sr, _)) = found else {
        let which = args.run.map(|n| format!(" in run {n}")).unwrap_or_default();
        return Err(Error::Usage(format!(
            "no recorded run of stage `{}`{which}; `kkpipe history --stage {}` lists its runs",
            args.stage, args.stage
        )));
    };
    let took = sr
        .duration_ms
        .map(|d| format!(", took {}", format_duration(Duration::from_millis(d.max(0) as u64))))
        .unwrap_or_default();
    eprintln!(
        "== `{}`, run {}: {:?}{} at {} ({}{took}) ==",
        sr.stage,
        sr.run_id,
        sr.state,
        sr.exit_code.map(|c| format!(" (exit code {c})")).unwrap_or_default(),
        timestamp(sr.started_at),
        age(sr.started_at)
    );
    let mut log = cache.log(sr.id)?.unwrap_or_default();
    if !settings.color {
        log = anstream::adapter::strip_bytes(&log).into_vec();
    }
    let _ = std::io::stdout().lock().write_all(&log);
    Ok(exit::OK)
}

pub(super) fn history(settings: &Settings, args: &HistoryArgs) -> Result<u8, Error> {
    // A stage's ledger is also on the remote, which a fresh clone (no cache yet) reads too.
    let remote = match &args.stage {
        Some(stage) => remote_ledger(settings, stage, args),
        None => None,
    };
    let Some(cache) = open_existing(settings)? else {
        match (args.json, remote) {
            (true, Some((_, rows))) => println!("{}", history::with_remote(&[], &rows)),
            (true, None) => println!("[]"),
            (false, Some((url, rows))) => print!("{}", crate::report::remote::ledger_table(&url, &rows)),
            (false, None) => eprintln!("kkpipe: nothing has run in this repository yet"),
        }
        return Ok(exit::OK);
    };
    let text = match &args.stage {
        Some(stage) => {
            let rows = cache.stage_history(stage, args.env_name.as_deref(), args.limit)?;
            match (args.json, remote) {
                (true, Some((_, ledger))) => history::with_remote(&rows, &ledger) + "\n",
                (true, None) => history::stage_json(&rows) + "\n",
                (false, Some((url, ledger))) => {
                    history::stage_table(stage, &rows) + &crate::report::remote::ledger_table(&url, &ledger)
                }
                (false, None) => history::stage_table(stage, &rows),
            }
        }
        None => {
            let runs = cache.runs(args.limit)?;
            if args.json { history::runs_json(&runs) + "\n" } else { history::runs_table(&runs) }
        }
    };
    print!("{text}");
    Ok(exit::OK)
}
