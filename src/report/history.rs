//! `kkpipe history`: recent runs, or one stage's runs (a deploy stage's ledger), as a table or JSON.

use super::{format_duration, timestamp};
use crate::fresh::{Attempt, RunOutcome, RunRow, State, StoredReason};
use serde::Serialize;
use std::fmt::Write;
use std::time::Duration;

/// One stage run in `history --stage --json`.
#[derive(Serialize)]
struct StageRunItem<'a> {
    run: i64,
    stage: &'a str,
    env: &'a str,
    state: State,
    at: String,
    duration_ms: Option<i64>,
    exit_code: Option<i64>,
    key: String,
    git_commit: Option<&'a str>,
    event: Option<&'a str>,
    branch: Option<&'a str>,
    #[serde(flatten)]
    audit: &'a crate::fresh::Audit,
    /// The reason as recorded; `{"kind": "unreadable", "text": ...}` when this kkpipe cannot decode it.
    reason: Option<serde_json::Value>,
}

fn reason_json(r: &StoredReason) -> serde_json::Value {
    match r {
        StoredReason::Known(r) => serde_json::to_value(r).expect("a reason serialises"),
        StoredReason::Unreadable(text) => serde_json::json!({ "kind": "unreadable", "text": text }),
    }
}

pub(crate) fn stage_json(rows: &[(Attempt, RunRow)]) -> String {
    serde_json::to_string_pretty(&stage_items(rows)).expect("serialisable")
}

fn stage_items(rows: &[(Attempt, RunRow)]) -> Vec<StageRunItem<'_>> {
    rows.iter()
        .map(|(sr, r)| StageRunItem {
            run: sr.run_id,
            stage: &sr.stage,
            env: &sr.env,
            state: sr.state,
            at: timestamp(sr.started_at),
            duration_ms: sr.duration_ms,
            exit_code: sr.exit_code,
            key: sr.key.to_string(),
            git_commit: r.git_commit.as_deref(),
            event: r.event.as_deref(),
            branch: r.branch.as_deref(),
            audit: &r.audit,
            reason: sr.reason.as_ref().map(reason_json),
        })
        .collect()
}

/// `history --stage X --json` with a remote: this cache's runs (`"where": "local"`), then the remote ledger's
/// records (`"where": "remote"`).
pub(crate) fn with_remote(rows: &[(Attempt, RunRow)], ledger: &[super::remote::LedgerRow]) -> String {
    let at = |v: serde_json::Value, place: &str| {
        let mut v = v;
        v["where"] = place.into();
        v
    };
    let local = stage_items(rows).into_iter().map(|i| at(serde_json::to_value(i).expect("serialisable"), "local"));
    let remote = ledger.iter().map(|r| at(serde_json::to_value(r).expect("serialisable"), "remote"));
    serde_json::to_string_pretty(&local.chain(remote).collect::<Vec<_>>()).expect("serialisable")
}

fn took(ms: Option<i64>) -> String {
    ms.map(|d| format_duration(Duration::from_millis(d.max(0) as u64))).unwrap_or_default()
}

fn short_commit(c: Option<&str>) -> String {
    c.map(|c| super::short_commit(c, 10)).unwrap_or_else(|| "-".into())
}

fn event_text(event: Option<&str>, branch: Option<&str>) -> String {
    match (event, branch) {
        (Some(e), Some(b)) => format!("{e} {b}"),
        (Some(e), None) => e.to_string(),
        _ => "local".into(),
    }
}

/// The commit, `-dirty` when the tree had uncommitted changes (as `git describe --dirty` says it).
fn commit_text(r: &RunRow) -> String {
    let dirty = if r.audit.dirty == Some(true) { "-dirty" } else { "" };
    format!("{}{dirty}", short_commit(r.git_commit.as_deref()))
}

pub(crate) fn stage_table(stage: &str, rows: &[(Attempt, RunRow)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>5}  {:<20}  {:<11}  {:<12}  {:<16}  {:<14}  {:<16}  {:<8}  {:<18}  {:>8}  reason",
        "run", "when", "state", "key", "commit", "branch", "by", "env", "event", "took"
    );
    for (sr, r) in rows {
        let _ = writeln!(
            out,
            "{:>5}  {:<20}  {:<11}  {:<12}  {:<16}  {:<14}  {:<16}  {:<8}  {:<18}  {:>8}  {}{}",
            sr.run_id,
            timestamp(sr.started_at),
            sr.state.as_str(),
            &sr.key.to_string()[..12],
            commit_text(r),
            r.audit.git_branch.as_deref().unwrap_or("-"),
            r.audit.actor.as_deref().unwrap_or("-"),
            sr.env,
            event_text(r.event.as_deref(), r.branch.as_deref()),
            took(sr.duration_ms),
            sr.reason.as_ref().map(ToString::to_string).unwrap_or_default(),
            r.audit.run_url.as_deref().map(|u| format!("  ({u})")).unwrap_or_default(),
        );
    }
    if rows.is_empty() {
        let _ = writeln!(out, "(no recorded run of `{stage}`)");
    }
    out
}

pub(crate) fn runs_json(runs: &[RunRow]) -> String {
    serde_json::to_string_pretty(runs).expect("serialisable")
}

pub(crate) fn runs_table(runs: &[RunRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>5}  {:<20}  {:<7}  {:<18}  {:<8}  {:<10}  {:>4} {:>5} {:>8} {:>6}  {:>8}  saved",
        "run", "when", "command", "event", "env", "commit", "ran", "fresh", "restored", "failed", "took"
    );
    for r in runs {
        let duration = r.finished_at.map(|f| took(Some(f - r.started_at))).unwrap_or_else(|| "-".into());
        let outcome = match r.outcome {
            None => "  (running or killed)".to_string(),
            Some(RunOutcome::Ok) => String::new(),
            Some(o) => format!("  ({})", o.as_str()),
        };
        let _ = writeln!(
            out,
            "{:>5}  {:<20}  {:<7}  {:<18}  {:<8}  {:<10}  {:>4} {:>5} {:>8} {:>6}  {:>8}  {}{outcome}",
            r.id,
            timestamp(r.started_at),
            r.command,
            event_text(r.event.as_deref(), r.branch.as_deref()),
            r.env,
            short_commit(r.git_commit.as_deref()),
            r.counts.ran,
            r.counts.fresh,
            r.counts.restored,
            r.counts.failed,
            duration,
            took(Some(r.counts.saved_ms)),
        );
    }
    out
}

#[derive(Debug, Default, Clone, serde::Serialize)]
/// What `cache stats` shows.
pub struct CacheStats {
    pub runs: i64,
    pub stage_runs: i64,
    pub successful: i64,
    pub failed: i64,
    pub manifests: i64,
    pub blobs: usize,
    pub blob_bytes: u64,
    pub sensitive_blobs: usize,
    pub sensitive_bytes: u64,
    pub stat_entries: i64,
    pub database_bytes: u64,
}

/// `cache stats` for people.
pub(crate) fn stats_table(s: &CacheStats) -> String {
    let mb = |b: u64| b as f64 / 1e6;
    format!(
        "runs:            {}\nstage runs:      {} ({} successful, {} failed or interrupted)\nmanifests:       {}\nstored outputs:  {} ({:.1} MB)\nsensitive:       {} ({:.1} MB)\nstat cache:      {} files\ndatabase:        {:.1} MB\n",
        s.runs,
        s.stage_runs,
        s.successful,
        s.failed,
        s.manifests,
        s.blobs,
        mb(s.blob_bytes),
        s.sensitive_blobs,
        mb(s.sensitive_bytes),
        s.stat_entries,
        mb(s.database_bytes)
    )
}
