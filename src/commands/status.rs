//! `kkpipe status` and `kkpipe run --dry-run`: evaluate every selected stage without running anything. During
//! a run (another process holding the run lock), `status` shows the stages it is running as `running`.

use super::{Opened, human};
use crate::cli::StatusArgs;
use crate::error::{Error, exit};
use crate::evaluate::{self, Evaluation};
use crate::fresh::{Attempt, Decision, History, State, StoredReason};
use crate::graph::Selected;
use crate::pipeline::Pipeline;
use crate::report::{Event, Fanout, Sink, StageRow, StageState, json, status, timestamp};
use crate::run::Force;
use crate::run::lock::Holder;
use crate::settings::Settings;

/// Evaluate the selected stages and turn them into rows (warnings printed on the way).
fn evaluated_rows(
    settings: &Settings,
    o: &Opened,
    selected: &[Selected],
    forced: &dyn Fn(usize) -> bool,
    dry_run: bool,
) -> Result<Vec<StageRow>, Error> {
    Ok(evaluated(settings, o, selected, forced, dry_run)?.0)
}

/// The rows and the evaluations behind them (each stage's manifest, for `preview`).
fn evaluated(
    settings: &Settings,
    o: &Opened,
    selected: &[Selected],
    forced: &dyn Fn(usize) -> bool,
    dry_run: bool,
) -> Result<(Vec<StageRow>, Vec<Option<Evaluation>>), Error> {
    let mut session = o.session(settings)?;
    if dry_run {
        // As the run itself would: a missing tool is an error before anything, not a reason to run.
        super::check_tools(&mut session, o, selected)?;
    }
    let evals: Vec<Option<Evaluation>> = evaluate::all(o.cx(), &mut session, &o.cache, selected, forced)?;
    for w in session.take_warnings() {
        eprintln!("warning: {w}");
    }
    if settings.verbose {
        eprintln!("kkpipe: {}", session.hashing_summary());
    }
    let cx = o.cx();
    let last = |i: usize| o.cache.latest_attempt(&o.pipeline.stages[i].name, cx.ledger_env(i)).ok().flatten();
    // A run in progress: the stages it is running are shown as running, with who runs them (never in a dry
    // run, which says what a run would do).
    let holder = if dry_run { None } else { crate::run::lock::live_holder(o.cache.dir()) };
    let rows = rows(&o.pipeline, &o.graph.order, selected, &evals, dry_run, &last, holder.as_ref());
    Ok((rows, evals))
}

/// Rows of every selected stage with their evaluations, for `preview`.
pub(super) fn status_evaluations(
    settings: &Settings,
    o: &Opened,
) -> Result<(Vec<StageRow>, Vec<Option<Evaluation>>), Error> {
    let selected = o.cx().select(&[])?;
    evaluated(settings, o, &selected, &|_| false, false)
}

/// Rows of every selected stage, for `status` and `graph`.
pub(super) fn status_rows(settings: &Settings, o: &Opened, targets: &[String]) -> Result<Vec<StageRow>, Error> {
    let selected = o.cx().select(targets)?;
    evaluated_rows(settings, o, &selected, &|_| false, false)
}

pub(super) fn status(settings: &Settings, args: &StatusArgs) -> Result<u8, Error> {
    let o = Opened::open(settings, &args.selection)?;
    let rows = status_rows(settings, &o, &args.stages)?;
    if args.json {
        json::print(json::STATUS_SCHEMA, &json::Context::new(o.event.as_ref(), &o.env), &rows, None);
    } else {
        let masker = o.masker(settings);
        let event = o.event.as_ref().map(|e| (e, o.env.as_str()));
        status::print_table(settings.color, event, &rows, &|t| masker.mask_str(t));
    }
    Ok(exit::OK)
}

/// What `run` would do, through the same sinks as a run: "Would run" and "Fresh" lines, or the JSON report.
pub(super) fn dry_run(
    settings: &Settings,
    o: &Opened,
    selected: &[Selected],
    force: &Force,
    as_json: bool,
) -> Result<u8, Error> {
    let forced = |i: usize| force.includes(&o.pipeline.stages[i].name);
    let rows = evaluated_rows(settings, o, selected, &forced, true)?;
    let summary = status::dry_run_summary(&rows);
    let mut human = human(settings, as_json, &o.pipeline);
    human.dry_run = true;
    let mut reporters: Vec<Box<dyn Sink>> = vec![Box::new(human)];
    if as_json {
        reporters.push(Box::new(json::Json { context: json::Context::new(o.event.as_ref(), &o.env) }));
    }
    let mut sink = Fanout(reporters);
    let masker = o.masker(settings);
    for r in &rows {
        match (r.state, r.reasons.first()) {
            (StageState::WouldRun, Some(reason)) => sink.event(&Event::WouldRun {
                stage: r.name.clone(),
                reason: reason.clone(),
                masked: masker.mask_str(&reason.to_string()),
            }),
            (StageState::Fresh | StageState::Restored, _) => sink.event(&Event::Fresh {
                stage: r.name.clone(),
                restored: r.restored.clone(),
                saved: Default::default(),
            }),
            _ => {}
        }
    }
    sink.event(&Event::Summary(summary.clone()));
    sink.event(&Event::Report { stages: rows, summary });
    Ok(exit::OK)
}

/// The row of one evaluated stage. `last`: its latest recorded attempt (shown for stages that must run);
/// `holder`: the live holder of the run lock, if a run is in progress (`status` only, never a dry run).
fn row(
    stage: &crate::pipeline::Stage,
    eval: &Evaluation,
    dry_run: bool,
    last: Option<&Attempt>,
    holder: Option<&Holder>,
) -> StageRow {
    if let Some((attempt, holder)) = running_now(last, holder) {
        return running_row(stage, eval, attempt, holder);
    }
    let mut row = StageRow::new(stage, crate::evaluate::state_of(&eval.decision, dry_run));
    row.key = eval.keyed.as_ref().map(|k| k.key.to_string());
    match &eval.decision {
        Decision::Fresh(hit) | Decision::Restore(hit, _) => {
            if let Decision::Restore(_, restore) = &eval.decision {
                row.restored = restore.iter().map(|o| o.path.display()).collect();
            }
            if !hit.unavailable.is_empty() {
                row.note = Some(crate::report::unavailable_note(&hit.unavailable));
            }
            row.recorded_at = Some(timestamp(hit.record.started_at));
            row.duration_ms = hit.record.duration_ms;
            if hit.record.state == State::Adopted {
                // Not run by kkpipe: its probe found the live system in sync when it had no record.
                row.note = Some("adopted: in sync when its probe ran, never run by kkpipe".into());
                row.duration_ms = None;
            }
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
fn rows(
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
