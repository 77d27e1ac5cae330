//! `kkpipe status` and `kkpipe run --dry-run`: evaluate every selected stage without running anything. During
//! a run (another process holding the run lock), `status` shows the stages it is running as `running`.

use super::{Opened, human};
use crate::cli::StatusArgs;
use crate::error::{Error, exit};
use crate::evaluate::{self, Evaluation};
use crate::fresh::History;
use crate::graph::Selected;
use crate::report::{Event, Sink, StageRow, StageState, json, status};
use crate::run::Force;
use crate::settings::Settings;

/// Evaluate the selected stages and turn them into rows (warnings printed on the way).
fn evaluated_rows(
    settings: &Settings,
    o: &Opened,
    selected: &[Selected],
    forced: &dyn Fn(usize) -> bool,
    dry_run: bool,
) -> Result<Vec<StageRow>, Error> {
    let mut session = o.session(settings)?;
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
    Ok(status::rows(&o.pipeline, &o.graph.order, selected, &evals, dry_run, &last, holder.as_ref()))
}

/// Rows of every selected stage, for `status` and `graph`.
pub(super) fn status_rows(settings: &Settings, o: &Opened, targets: &[String]) -> Result<Vec<StageRow>, Error> {
    let selected = o.cx().select(targets)?;
    evaluated_rows(settings, o, &selected, &|_| false, false)
}

pub fn status(settings: &Settings, args: &StatusArgs) -> Result<u8, Error> {
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
pub fn dry_run(
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
    let mut sink: Box<dyn Sink> = if as_json {
        Box::new(json::Json { human, context: json::Context::new(o.event.as_ref(), &o.env) })
    } else {
        Box::new(human)
    };
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
    sink.event(&Event::Report { rows, summary });
    Ok(exit::OK)
}
