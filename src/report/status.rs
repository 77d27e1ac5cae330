//! `kkpipe status` and `kkpipe run --dry-run`: a row per evaluated stage, as a table or JSON.

use super::{StageRow, StageState, Summary, age, format_duration, timestamp};
use crate::evaluate::Evaluation;
use crate::fresh::{Attempt, Decision, Reason, State};
use crate::graph::{Event, Selected};
use crate::pipeline::Pipeline;
use std::io::Write;

/// The row of one evaluated stage. `last`: its latest recorded attempt (shown for stages that must run).
pub fn row(stage: &crate::pipeline::Stage, eval: &Evaluation, dry_run: bool, last: Option<&Attempt>) -> StageRow {
    let mut row = StageRow::new(stage, StageState::of(&eval.decision, dry_run));
    row.key = eval.keyed.as_ref().map(|k| k.key.to_string());
    match &eval.decision {
        Decision::Fresh(hit) | Decision::Restore(hit, _) => {
            if let Decision::Restore(_, restore) = &eval.decision {
                row.restored = restore.iter().map(|o| o.path.display()).collect();
            }
            if !hit.unavailable.is_empty() {
                row.note = Some(super::unavailable_note(&hit.unavailable));
            }
            row.recorded_at = Some(timestamp(hit.record.started_at));
            row.duration_ms = hit.record.duration_ms;
        }
        Decision::Run(reason) => {
            row.reasons = vec![reason.clone()];
            if let Some(last) = last.filter(|l| l.state != State::Running) {
                row.recorded_at = Some(timestamp(last.started_at));
                row.duration_ms = last.duration_ms;
            }
        }
    }
    row
}

/// Rows in graph order: evaluated stages, and those the event does not select.
pub fn rows(
    pipeline: &Pipeline,
    order: &[usize],
    selected: &[Selected],
    evals: &[Option<Evaluation>],
    dry_run: bool,
    last: &dyn Fn(usize) -> Option<Attempt>,
) -> Vec<StageRow> {
    let mut rows = Vec::new();
    for &i in order {
        let stage = &pipeline.stages[i];
        match (selected[i], &evals[i]) {
            (Selected::NotRequested, _) => {}
            (Selected::Yes, Some(e)) => rows.push(row(stage, e, dry_run, last(i).as_ref())),
            _ => rows.push(StageRow::new(stage, StageState::SkippedByEvent)),
        }
    }
    rows
}

/// What a dry run would do, in numbers.
pub fn dry_run_summary(rows: &[StageRow]) -> Summary {
    let mut summary = Summary::default();
    for r in rows {
        match r.state {
            StageState::WouldRun => summary.would_run += 1,
            StageState::Fresh => summary.fresh += 1,
            StageState::Restored => summary.restored += 1,
            _ => {}
        }
    }
    summary
}

/// The closing line of a dry run.
pub fn dry_run_line(s: &Summary) -> String {
    let restore = if s.restored > 0 { format!(" ({} with outputs to restore)", s.restored) } else { String::new() };
    format!("dry run: {} would run, {} fresh{restore}; nothing was run", s.would_run, s.fresh + s.restored)
}

/// The human table: one line per stage with its state and first reason (masked).
pub fn print_table(color: bool, event: Option<(&Event, &str)>, rows: &[StageRow], mask: &dyn Fn(&str) -> String) {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    let paint = |c: &str, text: &str| if color { format!("{c}{text}\x1b[0m") } else { text.to_string() };
    if let Some((e, env)) = event {
        let _ = writeln!(out, "stages for {e} (environment `{env}`):");
    }
    for r in rows {
        let c = match r.state {
            StageState::Fresh | StageState::Restored => "\x1b[32m",
            StageState::Failed => "\x1b[31m",
            StageState::SkippedByEvent => "\x1b[2m",
            _ => "\x1b[33m",
        };
        let _ = writeln!(out, "{:<width$}  {}{}", r.name, paint(c, r.state.word()), detail(r, mask));
    }
}

/// What follows the state: when a fresh stage ran and what it will restore, or a stale stage's reason.
fn detail(r: &StageRow, mask: &dyn Fn(&str) -> String) -> String {
    match r.state {
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
            bits.extend(r.note.clone());
            if !r.restored.is_empty() {
                let list: Vec<String> = r.restored.iter().map(|p| format!("`{p}`")).collect();
                bits.push(format!("outputs to restore: {}", list.join(", ")));
            }
            if bits.is_empty() { String::new() } else { format!(" ({})", bits.join(", ")) }
        }
        _ => r
            .reasons
            .first()
            .filter(|x| !(r.state == StageState::NeverRun && **x == Reason::NeverRun))
            .map(|x| format!(": {}", mask(&x.to_string())))
            .unwrap_or_default(),
    }
}
