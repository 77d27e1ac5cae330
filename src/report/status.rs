//! `kkpipe status` and `kkpipe run --dry-run` for people: a line per stage.

use super::{StageRow, StageState, Summary, age, format_duration};
use crate::fresh::Reason;
use crate::graph::CiEvent;
use std::io::Write;

/// What a dry run would do, in numbers.
pub(crate) fn dry_run_summary(rows: &[StageRow]) -> Summary {
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

/// The closing line of a dry run; `maybe` of those that would run do so only if a stage they need changes its
/// outputs.
pub(crate) fn dry_run_line(s: &Summary, maybe: usize) -> String {
    let restore = if s.restored > 0 { format!(" ({} with outputs to restore)", s.restored) } else { String::new() };
    let would = match maybe {
        0 => format!("{} would run", s.would_run),
        m if m == s.would_run => format!("{m} would run only if a stage they need changes its outputs"),
        m => format!("{} would run ({m} only if a stage they need changes its outputs)", s.would_run),
    };
    format!("dry run: {would}, {} fresh{restore}; nothing was run", s.fresh + s.restored)
}

/// The human table: one line per stage with its state and first reason (masked).
pub(crate) fn print_table(
    color: bool,
    event: Option<(&CiEvent, &str)>,
    rows: &[StageRow],
    mask: &dyn Fn(&str) -> String,
) {
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
            let when = r.recorded_at.as_ref().and_then(|t| t.parse::<jiff::Timestamp>().ok()).map(|t| {
                format!("{} {}", if r.duration_ms.is_some() { "ran" } else { "recorded" }, age(t.as_millisecond()))
            });
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
