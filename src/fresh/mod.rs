//! The decision: is a stage fresh, fresh once its outputs are restored, or must it run, and why.
//!
//! [`decide`] is the only place this is worked out. `status`, `run --dry-run`, `why`, `verify` and `run` all
//! call it, with the stage's current manifest (from `session`), the recorded past ([`History`]: the SQLite
//! cache, or an in-memory double in the tests below) and the workspace's view of the recorded outputs
//! ([`Workspace`]). It is pure apart from those reads.
//!
//! - A check stage is a cache: fresh when any successful run with the same key is recorded.
//! - A deploy stage is a ledger per deployment environment: fresh only when the most recent attempt there
//!   succeeded with the same key (deploy A, then B, then A again deploys A again).
//! - A hit's outputs must be in the workspace, or restorable from the store; outputs that are in no store
//!   but sensitive or regenerable are "unavailable": made only when a stage that needs them runs.
//! - Otherwise the first reason, found by comparing manifests field by field ([`Diff`]), as cargo does.

mod diff;
pub(crate) mod history;
mod reason;

pub(crate) use diff::{Diff, FileChanges};
pub(crate) use history::{
    Attempt, Audit, History, Links, OutputRecord, RunCounts, RunOutcome, RunRow, State, refusal_of,
};
pub(crate) use reason::{Change, Reason, StoredReason};

use crate::hash::key::{DecodeError, Keyed};
use crate::pipeline::Stage;

/// What the workspace holds for one recorded output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Present {
    Same,
    Differs,
    Missing,
}

/// The workspace and the blob store, as the decision sees them.
pub(crate) trait Workspace {
    fn present(&self, output: &OutputRecord) -> Present;
    /// Whether the store can put the output back.
    fn stored(&self, output: &OutputRecord) -> bool;
}

/// Everything the decision is about.
pub(crate) struct Query<'a> {
    pub stage: &'a Stage,
    /// The deployment environment (`--env`).
    pub env: &'a str,
    /// The current manifest, or why it cannot be made (a tool is missing).
    pub inputs: Result<&'a Keyed, Reason>,
    /// Run whatever the history says: forced, a replan, drift found by a probe, an output that could not be
    /// restored or regenerated.
    pub must_run: Option<Reason>,
    /// `status` and `--dry-run` only: a stage this one needs is stale, so its key was computed from that
    /// stage's last known outputs and can only be provisional.
    pub stale_upstream: Option<&'a str>,
}

/// A recorded success whose key matches.
#[derive(Debug, Clone)]
pub(crate) struct Hit {
    pub record: Attempt,
    /// Everything the successful run recorded.
    pub outputs: Vec<OutputRecord>,
    /// Missing from the workspace and the store, but sensitive (kept out of shared caches on purpose) or
    /// regenerable: made only when a stage that needs them has to run.
    pub unavailable: Vec<OutputRecord>,
}

#[derive(Debug, Clone)]
pub(crate) enum Decision {
    /// Nothing to do.
    Fresh(Hit),
    /// Fresh once these outputs (missing or modified in the workspace) are put back from the store.
    Restore(Hit, Vec<OutputRecord>),
    /// The stage must run, and the first reason why.
    Run(Reason),
}

impl Decision {
    pub(crate) fn hit(&self) -> Option<&Hit> {
        match self {
            Decision::Fresh(h) | Decision::Restore(h, _) => Some(h),
            Decision::Run(_) => None,
        }
    }

    pub(crate) fn reason(&self) -> Option<&Reason> {
        match self {
            Decision::Run(r) => Some(r),
            _ => None,
        }
    }
}

/// Decide one stage.
pub(crate) fn decide<H: History + ?Sized>(
    q: &Query<'_>,
    history: &H,
    ws: &dyn Workspace,
) -> Result<Decision, H::Error> {
    let keyed = match &q.inputs {
        // A stage that never ran is "never run", whatever else keeps it from being keyed now (a missing tool).
        Err(reason) => {
            let env = q.stage.is_deploy().then_some(q.env);
            let first = match history.latest_attempt(&q.stage.name, env)? {
                None => never(q),
                Some(_) => reason.clone(),
            };
            return Ok(Decision::Run(first));
        }
        Ok(k) => *k,
    };
    if let Some(reason) = &q.must_run {
        return Ok(Decision::Run(reason.clone()));
    }
    let stage = &q.stage.name;
    let env = q.stage.is_deploy().then_some(q.env);
    let hit = if q.stage.is_deploy() {
        history.latest_attempt(stage, env)?.filter(|a| a.state.succeeded() && a.key == keyed.key)
    } else {
        history.success_with_key(stage, &keyed.key)?
    };
    let decision = match hit {
        Some(record) => check_outputs(q.stage, record, history, ws)?,
        None => Decision::Run(why_run(q, keyed, history)?),
    };
    Ok(match (q.stale_upstream, decision) {
        (
            Some(up),
            Decision::Fresh(_) | Decision::Restore(..) | Decision::Run(Reason::UpstreamOutputsChanged { .. }),
        ) => Decision::Run(Reason::UpstreamStale { stage: up.to_string() }),
        (_, d) => d,
    })
}

/// A hit is fresh when each recorded output is in the workspace, restorable, or deliberately unavailable.
fn check_outputs<H: History + ?Sized>(
    stage: &Stage,
    record: Attempt,
    history: &H,
    ws: &dyn Workspace,
) -> Result<Decision, H::Error> {
    let outputs = history.outputs(&record)?;
    let mut restore = Vec::new();
    let mut unavailable = Vec::new();
    let mut checked = false;
    for o in &outputs {
        if ws.present(o) == Present::Same {
            continue;
        }
        // Something must be restored: the whole result must be one a restore may write (checked once).
        if !std::mem::replace(&mut checked, true)
            && let Some((path, why)) = history::refusal_of(&outputs, &stage.outputs)
        {
            return Ok(Decision::Run(Reason::OutputNotRestored { path: path.display(), why }));
        }
        if ws.stored(o) {
            restore.push(o.clone());
        } else if o.sensitive || regenerate_command(stage, o).is_some() {
            unavailable.push(o.clone());
        } else {
            return Ok(Decision::Run(Reason::OutputMissing { path: o.path.display() }));
        }
    }
    let hit = Hit { record, outputs, unavailable };
    Ok(if restore.is_empty() { Decision::Fresh(hit) } else { Decision::Restore(hit, restore) })
}

/// The `regenerate` command of the declared output that holds a recorded one.
pub(crate) fn regenerate_command<'s>(stage: &'s Stage, o: &OutputRecord) -> Option<&'s str> {
    stage.outputs.iter().find(|d| o.path.starts_with(&d.path)).and_then(|d| d.regenerate.as_deref())
}

/// The reason of a stage with no attempt at all (in its environment, for a deploy stage).
fn never(q: &Query<'_>) -> Reason {
    if q.stage.is_deploy() { Reason::NeverDeployed { env: q.env.to_string() } } else { Reason::NeverRun }
}

/// The first reason a stage without a hit must run: its last attempt with this key failed or was
/// interrupted, or the first difference from its last successful run.
fn why_run<H: History + ?Sized>(q: &Query<'_>, keyed: &Keyed, history: &H) -> Result<Reason, H::Error> {
    let stage = &q.stage.name;
    let env = q.stage.is_deploy().then_some(q.env);
    let last = history.latest_attempt(stage, env)?;
    let attempt_reason = |a: &Attempt| match a.state {
        State::Failed => Some(Reason::LastRunFailed { exit_code: a.exit_code }),
        State::Interrupted | State::Running => Some(Reason::LastRunInterrupted),
        State::Success | State::Adopted => None,
    };
    if let Some(l) = &last
        && l.key == keyed.key
        && let Some(r) = attempt_reason(l)
    {
        return Ok(r);
    }
    let never = || never(q);
    let Some(base) = history.latest_success(stage, env)? else {
        return Ok(last.as_ref().and_then(attempt_reason).unwrap_or_else(never));
    };
    Ok(match history.manifest(&base.key)? {
        // The same manifest as the last success but no hit: only a later failed or interrupted attempt (of a
        // deploy, with other inputs) explains that; it left the live state unknown.
        Some(Ok(old)) => Diff::between(&old, &keyed.manifest)
            .first_reason()
            .or_else(|| last.as_ref().and_then(attempt_reason))
            .unwrap_or_else(never),
        Some(Err(DecodeError::Version(v))) => Reason::KeySchemeChanged { old_version: Some(v) },
        Some(Err(DecodeError::Corrupt)) | None => Reason::KeySchemeChanged { old_version: None },
    })
}

#[cfg(test)]
mod tests;
