//! `kkpipe why`: every difference between a stage's current inputs and those of its last successful run, and
//! the chain from the stage up to the root cause ("`kubeone-apply` is stale because `terraform-apply` produced
//! different outputs, which ran because `terraform/aws/main.tf` was modified").
//!
//! Nothing is guessed: differences come from comparing stored manifests, and the upstream chain follows the
//! current reasons of stale stages or, for stages that already reran, the reason recorded with that run.

use crate::cache::Cache;
use crate::evaluate::{Context, Evaluation};
use crate::fresh::{Attempt, Decision, Diff, History, Reason, StoredReason};
use crate::hash::Entry;
use crate::report::why::{Cause, Explanation, InputFile, RunRef};
use crate::report::{StageState, timestamp};

/// The view of a recorded attempt that `why` compares with.
fn run_ref(r: &Attempt) -> RunRef {
    RunRef {
        run: r.run_id,
        at: timestamp(r.started_at),
        at_ms: r.started_at,
        duration_ms: r.duration_ms,
        key: r.key.to_string(),
        adopted: r.state == crate::fresh::State::Adopted,
    }
}

fn input_files(eval: Option<&Evaluation>) -> Vec<InputFile> {
    let Some(m) = eval.and_then(|e| e.keyed.as_ref()) else { return Vec::new() };
    m.manifest
        .global_inputs
        .iter()
        .chain(&m.manifest.inputs)
        .map(|(path, entry)| match entry {
            Entry::File { hash, exec } => {
                InputFile { path: path.display(), blake3: Some(hash.to_hex()), executable: *exec, symlink: None }
            }
            Entry::Symlink { target } => InputFile {
                path: path.display(),
                blake3: None,
                executable: false,
                symlink: Some(String::from_utf8_lossy(target).into_owned()),
            },
            // Only outputs record directories; inputs are files and links.
            Entry::Dir { listing } => {
                InputFile { path: path.display(), blake3: Some(listing.to_hex()), executable: false, symlink: None }
            }
        })
        .collect()
}

/// Explain stage `i`, evaluated in `evals`.
pub(crate) fn explain(
    cx: Context<'_>,
    cache: &Cache,
    evals: &[Option<Evaluation>],
    i: usize,
) -> Result<Explanation, crate::cache::Error> {
    let stage = &cx.pipeline.stages[i];
    let eval = evals[i].as_ref();
    let mut x = Explanation {
        stage: stage.name.clone(),
        state: StageState::SkippedByEvent,
        key: eval.and_then(|e| e.keyed.as_ref()).map(|k| k.key.to_string()),
        reason: None,
        compared_with: None,
        differences: None,
        cascade: Vec::new(),
        root_cause: None,
        inputs: input_files(eval),
    };
    let Some(eval) = eval else { return Ok(x) };
    x.state = crate::evaluate::state_of(&eval.decision, false);
    let reason = match &eval.decision {
        Decision::Fresh(hit) | Decision::Restore(hit, _) => {
            x.compared_with = Some(run_ref(&hit.record));
            return Ok(x);
        }
        Decision::Run(reason) => reason,
    };
    x.reason = Some(reason.clone());
    if let Some(base) = cache.latest_success(&stage.name, cx.ledger_env(i))? {
        x.compared_with = Some(run_ref(&base));
        // A manifest from another key scheme cannot be compared: the reason already says so.
        if let (Some(k), Some(Ok(old))) = (&eval.keyed, cache.manifest(&base.key)?) {
            x.differences = Some(Diff::between(&old, &k.manifest));
        }
    }
    x.cascade = cascade(cx, cache, evals, i, reason)?;
    x.root_cause = x.cascade.last().cloned().or_else(|| {
        Some(Cause { stage: stage.name.clone(), reason: StoredReason::Known(reason.clone()), recorded: false })
    });
    Ok(x)
}

/// Follow upstream reasons from stage `i` to the first one that is not about an upstream stage.
fn cascade(
    cx: Context<'_>,
    cache: &Cache,
    evals: &[Option<Evaluation>],
    i: usize,
    reason: &Reason,
) -> Result<Vec<Cause>, crate::cache::Error> {
    let mut steps = Vec::new();
    let mut reason = StoredReason::Known(reason.clone());
    let mut seen = vec![i];
    for _ in 0..cx.pipeline.stages.len() {
        let up = match reason.known() {
            Some(Reason::UpstreamStale { stage } | Reason::UpstreamOutputsChanged { stage, .. }) => stage.clone(),
            _ => break,
        };
        let Some(j) = cx.pipeline.index_of(&up) else { break };
        if seen.contains(&j) {
            break;
        }
        seen.push(j);
        let (next, recorded) = match evals[j].as_ref().and_then(|e| e.decision.reason()) {
            Some(r) => (Some(StoredReason::Known(r.clone())), false),
            // Fresh now: it reran earlier; its reason is stored with that run.
            None => (cache.latest_success(&up, cx.ledger_env(j))?.and_then(|r| r.reason), true),
        };
        let Some(next) = next else { break };
        steps.push(Cause { stage: up, reason: next.clone(), recorded });
        reason = next;
    }
    Ok(steps)
}
