//! Events -> what the user sees. The scheduler emits typed [`Event`]s; a renderer turns them into human
//! lines (plain, GitHub Actions or GitLab CI conventions) or into JSON. Both consume the same stream.

pub(crate) mod event;
pub(crate) mod graph;
pub(crate) mod history;
mod human;
pub(crate) mod json;
pub(crate) mod preview;
pub(crate) mod progress;
pub(crate) mod remote;
pub(crate) mod status;
pub(crate) mod why;

use crate::fresh::Reason;
use crate::pipeline::Kind;
use serde::Serialize;

pub(crate) use crate::clock::{age, format_duration, timestamp};
pub(crate) use event::{Event, Fanout, JsonLines, Notice, Sink, StageEnd};
pub(crate) use human::{Human, Style};

/// A stage's state as reported by `status` and `run` (and their `--json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum StageState {
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
    /// `run`, `adopt`: a deploy stage with no record here was not run: its probe found the live system already
    /// matching its inputs, and that is now its record.
    Adopted,
}

impl StageState {
    pub(crate) fn word(self) -> &'static str {
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
            StageState::Adopted => "adopted",
        }
    }
}

/// One stage in a `status` or `run` report.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StageRow {
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
    /// Why a stage was skipped, or how it failed (its exit code and failure note), in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// `status`, for a `running` stage: the process running it (the run lock's holder).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<RunHolder>,
}

/// Who runs a stage that `status` shows as running: the holder of the repository's run lock.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RunHolder {
    /// `run` or `verify`.
    pub command: String,
    pub pid: u32,
    pub host: String,
    /// When it took the run lock (RFC 3339).
    pub since: String,
}

impl StageRow {
    /// A row with the stage's static facts; the caller fills in what happened.
    pub(crate) fn new(stage: &crate::pipeline::Stage, state: StageState) -> StageRow {
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
pub(crate) struct Summary {
    pub ran: usize,
    pub fresh: usize,
    pub restored: usize,
    pub failed: usize,
    pub skipped: usize,
    pub interrupted: usize,
    pub would_run: usize,
    /// `verify`: stages whose probe ran and found the live system in sync / drifted.
    pub verified: usize,
    /// Stages whose probe found drift: left as they are (`verify`, `on_drift = "fail"`), or deployed again.
    pub drifted: usize,
    /// Of those, deployed again (`on_drift = "apply"`, the default).
    pub drift_applied: usize,
    /// Deploy stages adopted: in sync without running (they count as fresh too).
    pub adopted: usize,
    pub duration_ms: u64,
    /// Sum of the recorded durations of stages that were skipped as fresh.
    pub saved_ms: u64,
}

/// The note on a fresh stage whose outputs are in no cache (sensitive ones, on a fresh CI runner).
pub(crate) fn unavailable_note(unavailable: &[crate::fresh::OutputRecord]) -> String {
    let list: Vec<String> = unavailable.iter().map(|o| format!("`{}`", o.path)).collect();
    format!("not in this cache, made only if a stage that needs them runs: {}", list.join(", "))
}

/// The first `n` characters of a commit id, for people: never a byte slice, since a commit may come from a store
/// or a file anyone could write.
pub(crate) fn short_commit(c: &str, n: usize) -> String {
    c.chars().take(n).collect()
}
