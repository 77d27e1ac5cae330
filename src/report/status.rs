//! `kkpipe status` and `kkpipe run --dry-run`: a row per evaluated stage, as a table or JSON.

use super::{StageRow, StageState, Summary, age, format_duration, timestamp};
use crate::evaluate::Evaluation;
use crate::fresh::{Attempt, Decision, Reason, State, StoredReason};
use crate::graph::{Event, Selected};
use crate::pipeline::Pipeline;
use crate::run::lock::Holder;
use std::io::Write;

/// The row of one evaluated stage. `last`: its latest recorded attempt (shown for stages that must run);
/// `holder`: the live holder of the run lock, if a run is in progress (`status` only, never a dry run).
pub fn row(
    stage: &crate::pipeline::Stage,
    eval: &Evaluation,
    dry_run: bool,
    last: Option<&Attempt>,
    holder: Option<&Holder>,
) -> StageRow {
    if let Some((attempt, holder)) = running_now(last, holder) {
        return running_row(stage, eval, attempt, holder);
    }
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

/// The attempt a live run is running now: the stage's latest attempt has no end yet and was started under the
/// current holder of the run lock. A row left `running` by a killed run has no live holder, or one that
/// started after it (and marks it interrupted): it stays "last run was interrupted".
fn running_now<'a>(last: Option<&'a Attempt>, holder: Option<&'a Holder>) -> Option<(&'a Attempt, &'a Holder)> {
    let (last, holder) = (last?, holder?);
    (last.state == State::Running && last.started_at >= holder.since_ms).then_some((last, holder))
}

/// A stage a live run is running: why the run started it, since when, and who runs it.
fn running_row(stage: &crate::pipeline::Stage, eval: &Evaluation, attempt: &Attempt, holder: &Holder) -> StageRow {
    let mut row = StageRow::new(stage, StageState::Running);
    row.key = eval.keyed.as_ref().map(|k| k.key.to_string());
    if let Some(StoredReason::Known(r)) = &attempt.reason {
        row.reasons = vec![r.clone()];
    }
    if eval.keyed.as_ref().is_some_and(|k| k.key != attempt.key) {
        row.note = Some("its inputs changed after it started: it will be stale when it ends".into());
    }
    row.recorded_at = Some(timestamp(attempt.started_at));
    row.holder = Some(holder.into());
    row
}

/// Rows in graph order: evaluated stages, and those the event does not select. `holder`: see [`row`].
pub fn rows(
    pipeline: &Pipeline,
    order: &[usize],
    selected: &[Selected],
    evals: &[Option<Evaluation>],
    dry_run: bool,
    last: &dyn Fn(usize) -> Option<Attempt>,
    holder: Option<&Holder>,
) -> Vec<StageRow> {
    let mut rows = Vec::new();
    for &i in order {
        let stage = &pipeline.stages[i];
        match (selected[i], &evals[i]) {
            (Selected::NotRequested, _) => {}
            (Selected::Yes, Some(e)) => rows.push(row(stage, e, dry_run, last(i).as_ref(), holder)),
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
        StageState::Running => running_detail(r, mask),
        _ => r
            .reasons
            .first()
            .filter(|x| !(r.state == StageState::NeverRun && **x == Reason::NeverRun))
            .map(|x| format!(": {}", mask(&x.to_string())))
            .unwrap_or_default(),
    }
}

/// ` (started 3s ago by `kkpipe run`, pid 4242 on host): reason`, and the note when its inputs changed since.
fn running_detail(r: &StageRow, mask: &dyn Fn(&str) -> String) -> String {
    let started = r
        .recorded_at
        .as_ref()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .map(|t| format!("started {} ", age(t.as_millisecond())))
        .unwrap_or_default();
    let by = r
        .holder
        .as_ref()
        .map(|h| format!(" ({started}by `kkpipe {}`, pid {} on {})", h.command, h.pid, h.host))
        .unwrap_or_default();
    let reason = r.reasons.first().map(|x| format!(": {}", mask(&x.to_string()))).unwrap_or_default();
    let note = r.note.as_ref().map(|n| format!("; {n}")).unwrap_or_default();
    format!("{by}{reason}{note}")
}
