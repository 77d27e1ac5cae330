//! Events -> what the user sees. The scheduler emits typed [`Event`]s; a renderer turns them into human
//! lines (plain, GitHub Actions or GitLab CI conventions) or into JSON. Both consume the same stream.

pub mod graph;
pub mod history;
mod human;
pub mod json;
pub mod progress;
pub mod remote;
pub mod status;
pub mod why;

use crate::fresh::{Decision, Reason};
use crate::pipeline::Kind;
use serde::Serialize;
use std::time::Duration;

pub use human::{Human, Style};

/// A stage's state as reported by `status` and `run` (and their `--json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageState {
    /// Inputs unchanged since a successful run; nothing to do.
    Fresh,
    /// Fresh, with outputs put back from the cache (or regenerated).
    Restored,
    Stale,
    NeverRun,
    Failed,
    SkippedByEvent,
    /// `run`: the stage ran and succeeded.
    Ran,
    /// `run`: not started because a stage it needs failed (or the run stopped first).
    Skipped,
    Interrupted,
    /// `run --dry-run`: would run.
    WouldRun,
    /// `verify`: the drift probe says the live system no longer matches the last apply.
    Drifted,
    /// `status`: a live `kkpipe run` (the run lock's holder) is running the stage now.
    Running,
}

impl StageState {
    /// The one mapping from a decision to what a user sees. `dry_run`: a stage that must run "would run".
    pub fn of(d: &Decision, dry_run: bool) -> StageState {
        match d {
            Decision::Fresh(_) => StageState::Fresh,
            Decision::Restore(..) => StageState::Restored,
            Decision::Run(_) if dry_run => StageState::WouldRun,
            Decision::Run(Reason::NeverRun | Reason::NeverDeployed { .. }) => StageState::NeverRun,
            Decision::Run(Reason::LastRunFailed { .. } | Reason::LastRunInterrupted) => StageState::Failed,
            Decision::Run(_) => StageState::Stale,
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            StageState::Fresh => "fresh",
            StageState::Restored => "restored",
            StageState::Stale => "stale",
            StageState::NeverRun => "never run",
            StageState::Failed => "failed",
            StageState::SkippedByEvent => "skipped by event",
            StageState::Ran => "ran",
            StageState::Skipped => "skipped",
            StageState::Interrupted => "interrupted",
            StageState::WouldRun => "would run",
            StageState::Drifted => "drifted",
            StageState::Running => "running",
        }
    }
}

/// One stage in a `status` or `run` report.
#[derive(Debug, Clone, Serialize)]
pub struct StageRow {
    pub name: String,
    pub kind: Kind,
    pub state: StageState,
    /// The stage key (hex), when it could be computed.
    pub key: Option<String>,
    /// Why the stage is stale / ran; empty when fresh.
    pub reasons: Vec<Reason>,
    /// The duration of the run that is reported (this run's, or the recorded one for a fresh stage).
    pub duration_ms: Option<i64>,
    /// When the reported state was recorded (RFC 3339), if ever.
    pub recorded_at: Option<String>,
    /// Outputs put back from the cache (or to be, for `status`).
    pub restored: Vec<String>,
    pub needs: Vec<String>,
    /// Why a stage was skipped, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// `status`, for a `running` stage: the process running it (the run lock's holder).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<RunHolder>,
}

/// Who runs a stage that `status` shows as running: the holder of the repository's run lock.
#[derive(Debug, Clone, Serialize)]
pub struct RunHolder {
    /// `run` or `verify`.
    pub command: String,
    pub pid: u32,
    pub host: String,
    /// When it took the run lock (RFC 3339).
    pub since: String,
}

impl From<&crate::run::lock::Holder> for RunHolder {
    fn from(h: &crate::run::lock::Holder) -> RunHolder {
        RunHolder { command: h.command.clone(), pid: h.pid, host: h.host.clone(), since: timestamp(h.since_ms) }
    }
}

impl StageRow {
    /// A row with the stage's static facts; the caller fills in what happened.
    pub fn new(stage: &crate::pipeline::Stage, state: StageState) -> StageRow {
        StageRow {
            name: stage.name.clone(),
            kind: stage.kind,
            state,
            key: None,
            reasons: Vec::new(),
            duration_ms: None,
            recorded_at: None,
            restored: Vec::new(),
            needs: stage.needs.clone(),
            note: None,
            holder: None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub ran: usize,
    pub fresh: usize,
    pub restored: usize,
    pub failed: usize,
    pub skipped: usize,
    pub interrupted: usize,
    pub would_run: usize,
    /// `verify`: stages whose probe ran and found the live system in sync / drifted.
    pub verified: usize,
    pub drifted: usize,
    pub duration_ms: u64,
    /// Sum of the recorded durations of stages that were skipped as fresh.
    pub saved_ms: u64,
}

#[derive(Debug, Clone)]
pub enum Event {
    Warning(String),
    Info(String),
    Fresh {
        stage: String,
        restored: Vec<String>,
        saved: Duration,
    },
    Started {
        stage: String,
        reason: Reason,
    },
    Probing {
        stage: String,
    },
    Line {
        stage: String,
        line: Vec<u8>,
    },
    Finished {
        stage: String,
        ok: bool,
        duration: Duration,
        detail: Option<String>,
        log: Vec<u8>,
    },
    Skipped {
        stage: String,
        because: String,
    },
    /// `run --dry-run`; `masked`: the reason's text with secrets masked.
    WouldRun {
        stage: String,
        reason: Reason,
        masked: String,
    },
    Drift {
        stage: String,
        output: String,
    },
    Summary(Summary),
    /// The last event of `run`, `verify` and `run --dry-run`: every stage's row.
    Report {
        rows: Vec<StageRow>,
        summary: Summary,
    },
}

pub trait Sink {
    fn event(&mut self, e: &Event);
    /// Called about every 50 ms while stages run, with each running stage and how long it has run.
    fn tick(&mut self, _running: &[(String, Duration)]) {}
}

/// The note on a fresh stage whose outputs are in no cache (sensitive ones, on a fresh CI runner).
pub fn unavailable_note(unavailable: &[crate::fresh::OutputRecord]) -> String {
    let list: Vec<String> = unavailable.iter().map(|o| format!("`{}`", o.path)).collect();
    format!("not in this cache, made only if a stage that needs them runs: {}", list.join(", "))
}

pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        let s = d.as_secs();
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// Unix milliseconds as RFC 3339 (UTC).
pub fn timestamp(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.round(jiff::Unit::Second).unwrap_or(t).to_string())
        .unwrap_or_default()
}

/// "3 minutes ago"-style age of a Unix-millisecond time.
pub fn age(ms: i64) -> String {
    let secs = (crate::cache::now_ms() - ms).max(0) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}
