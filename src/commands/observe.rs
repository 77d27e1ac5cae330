//! Read-only views: `why`, `graph`, `log`, `history`. None takes the run lock: they work during a run.

use super::{open_session, root};
use crate::cache::Cache;
use crate::cli::{GraphArgs, GraphFormat, HistoryArgs, LogArgs, WhyArgs};
use crate::error::{Error, exit};
use crate::explain;
use crate::report::{StageRow, StageState, age, format_duration, json, timestamp};
use crate::settings::Settings;
use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

pub fn why(settings: &Settings, args: &WhyArgs) -> Result<u8, Error> {
    let mut s = open_session(settings, &args.selection)?;
    let selected = s.select(std::slice::from_ref(&args.stage))?;
    let i = s.pipeline.index_of(&args.stage).expect("selected, so known");
    let evals = s.evaluate(&selected, &|_| false)?;
    for w in std::mem::take(&mut s.warnings) {
        eprintln!("warning: {w}");
    }
    let x = explain::explain(&s, &evals, i)?;
    let masker = s.masker.read().expect("masker");
    if args.json {
        #[derive(serde::Serialize)]
        struct Doc<'a> {
            schema: &'static str,
            #[serde(flatten)]
            context: json::Context,
            #[serde(flatten)]
            explanation: &'a explain::Explanation,
        }
        let doc = Doc {
            schema: json::WHY_SCHEMA,
            context: json::Context::new(s.event.as_ref(), &s.env_name),
            explanation: &x,
        };
        let text = serde_json::to_string_pretty(&doc).expect("serialisable");
        println!("{}", masker.mask_str(&text));
    } else {
        let limit = if args.all { None } else { Some(20) };
        print!("{}", explain::render(&x, limit, &|t| masker.mask_str(t)));
    }
    Ok(exit::OK)
}

pub fn graph(settings: &Settings, args: &GraphArgs) -> Result<u8, Error> {
    let mut s = open_session(settings, &args.selection)?;
    let selected = s.select(&args.stages)?;
    let evals = s.evaluate(&selected, &|_| false)?;
    let rows: Vec<StageRow> = super::status::rows(&s, &selected, &evals, false)?
        .into_iter()
        .filter(|r| s.event.is_none() || r.state != StageState::SkippedByEvent)
        .collect();
    let text = match args.format {
        GraphFormat::Mermaid => crate::report::graph::mermaid(&rows),
        GraphFormat::Dot => crate::report::graph::dot(&rows),
    };
    print!("{text}");
    Ok(exit::OK)
}

fn open_existing(settings: &Settings) -> Result<Option<Cache>, Error> {
    let root = root(settings)?;
    if !Cache::exists(&root) {
        return Ok(None);
    }
    Ok(Some(Cache::open(&root)?))
}

pub fn log(settings: &Settings, args: &LogArgs) -> Result<u8, Error> {
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
    let log = cache.log(sr.id)?.unwrap_or_default();
    let _ = std::io::stdout().lock().write_all(&log);
    Ok(exit::OK)
}

pub fn history(settings: &Settings, args: &HistoryArgs) -> Result<u8, Error> {
    let Some(cache) = open_existing(settings)? else {
        if args.json {
            println!("[]");
        } else {
            eprintln!("kkpipe: nothing has run in this repository yet");
        }
        return Ok(exit::OK);
    };
    let mut out = String::new();
    match &args.stage {
        Some(stage) => {
            let rows = cache.stage_history(stage, args.env_name.as_deref(), args.limit)?;
            if args.json {
                let items: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|(sr, r)| {
                        serde_json::json!({
                            "run": sr.run_id, "stage": sr.stage, "env": sr.env, "state": sr.state,
                            "at": timestamp(sr.started_at), "duration_ms": sr.duration_ms, "exit_code": sr.exit_code,
                            "key": sr.key.to_string(), "git_commit": r.git_commit, "event": r.event, "branch": r.branch,
                            "reason": sr.reason.as_deref().and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok()),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&items).expect("serialisable"));
                return Ok(exit::OK);
            }
            let _ = writeln!(
                out,
                "{:>5}  {:<20}  {:<11}  {:<12}  {:<10}  {:<8}  {:<18}  {:>8}  reason",
                "run", "when", "state", "key", "commit", "env", "event", "took"
            );
            for (sr, r) in &rows {
                let reason = sr
                    .reason
                    .as_deref()
                    .and_then(|t| serde_json::from_str::<crate::fresh::Reason>(t).ok())
                    .map(|x| x.to_string())
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "{:>5}  {:<20}  {:<11}  {:<12}  {:<10}  {:<8}  {:<18}  {:>8}  {reason}",
                    sr.run_id,
                    timestamp(sr.started_at),
                    format!("{:?}", sr.state).to_lowercase(),
                    &sr.key.to_string()[..12],
                    r.git_commit.as_deref().map(|c| &c[..c.len().min(10)]).unwrap_or("-"),
                    sr.env,
                    event_text(r.event.as_deref(), r.branch.as_deref()),
                    sr.duration_ms.map(|d| format_duration(Duration::from_millis(d.max(0) as u64))).unwrap_or_default(),
                );
            }
            if rows.is_empty() {
                let _ = writeln!(out, "(no recorded run of `{stage}`)");
            }
        }
        None => {
            let runs = cache.runs(args.limit)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&runs).expect("serialisable"));
                return Ok(exit::OK);
            }
            let _ = writeln!(
                out,
                "{:>5}  {:<20}  {:<7}  {:<18}  {:<8}  {:<10}  {:>4} {:>5} {:>8} {:>6}  {:>8}  saved",
                "run", "when", "command", "event", "env", "commit", "ran", "fresh", "restored", "failed", "took"
            );
            for r in &runs {
                let took = r
                    .finished_at
                    .map(|f| format_duration(Duration::from_millis((f - r.started_at).max(0) as u64)))
                    .unwrap_or_else(|| "-".into());
                let _ = writeln!(
                    out,
                    "{:>5}  {:<20}  {:<7}  {:<18}  {:<8}  {:<10}  {:>4} {:>5} {:>8} {:>6}  {:>8}  {}{}",
                    r.id,
                    timestamp(r.started_at),
                    r.command,
                    event_text(r.event.as_deref(), r.branch.as_deref()),
                    r.env,
                    r.git_commit.as_deref().map(|c| &c[..c.len().min(10)]).unwrap_or("-"),
                    r.counts.ran,
                    r.counts.fresh,
                    r.counts.restored,
                    r.counts.failed,
                    took,
                    format_duration(Duration::from_millis(r.counts.saved_ms.max(0) as u64)),
                    match r.outcome.as_deref() {
                        None => "  (running or killed)".to_string(),
                        Some("ok") => String::new(),
                        Some(o) => format!("  ({o})"),
                    }
                );
            }
        }
    }
    print!("{out}");
    Ok(exit::OK)
}

fn event_text(event: Option<&str>, branch: Option<&str>) -> String {
    match (event, branch) {
        (Some(e), Some(b)) => format!("{e} {b}"),
        (Some(e), None) => e.to_string(),
        _ => "local".into(),
    }
}
