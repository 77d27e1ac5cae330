//! `kkpipe status` and `kkpipe run --dry-run`: evaluate every selected stage without running anything.

use super::open_session;
use crate::cache::State;
use crate::cli::StatusArgs;
use crate::error::{Error, exit};
use crate::fresh::Reason;
use crate::graph::Selected;
use crate::report::{StageRow, StageState, Summary, age, format_duration, json, timestamp};
use crate::run::Force;
use crate::run::session::{Decision, Evaluation, Session};
use crate::settings::Settings;
use std::io::Write;

pub fn status(settings: &Settings, args: &StatusArgs) -> Result<u8, Error> {
    let mut s = open_session(settings, &args.selection)?;
    let selected = s.select(&args.stages)?;
    let evals = s.evaluate(&selected, &|_| false)?;
    for w in std::mem::take(&mut s.warnings) {
        eprintln!("warning: {w}");
    }
    let rows = rows(&s, &selected, &evals, false)?;
    if settings.verbose {
        eprintln!("kkpipe: {}", s.hashing_summary());
    }
    if args.json {
        json::print(json::STATUS_SCHEMA, &json::Context::new(s.event.as_ref(), &s.env_name), &rows, None);
    } else {
        print_table(settings, &s, &rows);
    }
    Ok(exit::OK)
}

pub fn dry_run(
    settings: &Settings,
    s: &mut Session,
    selected: &[Selected],
    force: &Force,
    as_json: bool,
) -> Result<u8, Error> {
    let names: Vec<String> = s.pipeline.stages.iter().map(|st| st.name.clone()).collect();
    let forced = |i: usize| force.includes(&names[i]);
    let evals = s.evaluate(selected, &forced)?;
    for w in std::mem::take(&mut s.warnings) {
        eprintln!("warning: {w}");
    }
    let rows = rows(s, selected, &evals, true)?;
    let mut summary = Summary::default();
    for r in &rows {
        match r.state {
            StageState::WouldRun => summary.would_run += 1,
            StageState::Fresh => summary.fresh += 1,
            StageState::Restored => summary.restored += 1,
            _ => {}
        }
    }
    if as_json {
        json::print(json::RUN_SCHEMA, &json::Context::new(s.event.as_ref(), &s.env_name), &rows, Some(&summary));
    } else {
        print_table(settings, s, &rows);
        println!(
            "dry run: {} would run, {} fresh{}; nothing was run",
            summary.would_run,
            summary.fresh + summary.restored,
            if summary.restored > 0 {
                format!(" ({} with outputs to restore)", summary.restored)
            } else {
                String::new()
            }
        );
    }
    Ok(exit::OK)
}

/// One row per stage, in graph order. `dry_run` reports stale stages as "would run".
pub fn rows(
    s: &Session,
    selected: &[Selected],
    evals: &[Option<Evaluation>],
    dry_run: bool,
) -> Result<Vec<StageRow>, Error> {
    let mut rows = Vec::new();
    for &i in &s.graph.order {
        let stage = s.stage(i);
        let mut row = StageRow::new(stage, StageState::SkippedByEvent);
        match (selected[i], &evals[i]) {
            (Selected::NotRequested, _) => continue,
            (Selected::SkippedByEvent, _) | (_, None) => {}
            (Selected::Yes, Some(e)) => {
                row.key = e.manifest.as_ref().map(|m| m.key().to_string());
                match &e.decision {
                    Decision::Fresh(hit) => {
                        row.state = if hit.needs_work() { StageState::Restored } else { StageState::Fresh };
                        row.restored = hit.restore.iter().map(|o| o.path.display()).collect();
                        if !hit.unavailable.is_empty() {
                            row.note = Some(crate::report::unavailable_note(&hit.unavailable));
                        }
                        row.recorded_at = Some(timestamp(hit.record.started_at));
                        row.duration_ms = hit.record.duration_ms;
                    }
                    Decision::Stale(reason) => {
                        row.state = match reason {
                            _ if dry_run => StageState::WouldRun,
                            Reason::NeverRun | Reason::NeverDeployed { .. } => StageState::NeverRun,
                            Reason::LastRunFailed { .. } | Reason::LastRunInterrupted => StageState::Failed,
                            _ => StageState::Stale,
                        };
                        row.reasons = vec![reason.clone()];
                        let env = stage.is_deploy().then_some(s.env_name.as_str());
                        if let Some(last) = s.cache.latest_attempt(&stage.name, env)?
                            && last.state != State::Running
                        {
                            row.recorded_at = Some(timestamp(last.started_at));
                            row.duration_ms = last.duration_ms;
                        }
                    }
                }
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

fn print_table(settings: &Settings, s: &Session, rows: &[StageRow]) {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    let paint = |color: &str, text: &str| {
        if settings.color { format!("{color}{text}\x1b[0m") } else { text.to_string() }
    };
    if let Some(e) = &s.event {
        let _ = writeln!(out, "stages for {e} (environment `{}`):", s.env_name);
    }
    for r in rows {
        let (color, word) = match r.state {
            StageState::Fresh | StageState::Restored => ("\x1b[32m", r.state.word()),
            StageState::Failed => ("\x1b[31m", r.state.word()),
            StageState::SkippedByEvent => ("\x1b[2m", r.state.word()),
            _ => ("\x1b[33m", r.state.word()),
        };
        let detail = match r.state {
            StageState::Fresh | StageState::Restored => {
                let when = r
                    .recorded_at
                    .as_ref()
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .map(|t| format!("ran {}", age(t.as_millisecond())));
                let took = r
                    .duration_ms
                    .map(|d| format!("took {}", format_duration(std::time::Duration::from_millis(d.max(0) as u64))));
                let mut bits: Vec<String> = when.into_iter().chain(took).collect();
                if let Some(note) = &r.note {
                    bits.push(note.clone());
                }
                if !r.restored.is_empty() {
                    bits.push(format!(
                        "outputs to restore: {}",
                        r.restored.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", ")
                    ));
                }
                if bits.is_empty() { String::new() } else { format!(" ({})", bits.join(", ")) }
            }
            _ => r
                .reasons
                .first()
                .filter(|x| !(r.state == StageState::NeverRun && **x == Reason::NeverRun))
                .map(|x| format!(": {}", s.masker.read().expect("masker").mask_str(&x.to_string())))
                .unwrap_or_default(),
        };
        let _ = writeln!(out, "{:<width$}  {}{}", r.name, paint(color, word), detail);
    }
}
