//! `kkpipe why`: every difference between a stage's current inputs and those of its last successful run, and
//! the chain from the stage up to the root cause ("`kubeone-apply` is stale because `terraform-apply` produced
//! different outputs, which ran because `terraform/aws/main.tf` was modified").
//!
//! Nothing is guessed: differences come from comparing stored manifests, and the upstream chain follows the
//! current reasons of stale stages or, for stages that already reran, the reason recorded with that run.

use crate::cache::StageRun;
use crate::fresh::{Diff, Reason};
use crate::hash::Entry;
use crate::report::{StageState, timestamp};
use crate::run::session::{Decision, Evaluation, Session};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct RunRef {
    pub run: i64,
    pub at: String,
    pub at_ms: i64,
    pub duration_ms: Option<i64>,
    pub key: String,
}

impl RunRef {
    fn of(r: &StageRun) -> RunRef {
        RunRef {
            run: r.run_id,
            at: timestamp(r.started_at),
            at_ms: r.started_at,
            duration_ms: r.duration_ms,
            key: r.key.to_string(),
        }
    }
}

/// One link of the chain from a stage to its root cause.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub stage: String,
    pub reason: Reason,
    /// True when this is the reason recorded with the stage's last run (it already reran), not a current one.
    pub recorded: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct InputFile {
    pub path: String,
    /// BLAKE3 of the content, hex (what `b3sum` prints); absent for symlinks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub executable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub stage: String,
    pub state: StageState,
    pub key: Option<String>,
    /// The first reason (what `status` prints); absent when fresh.
    pub reason: Option<Reason>,
    /// Fresh: the run that made it fresh. Stale: the last successful run it is compared with.
    pub compared_with: Option<RunRef>,
    pub differences: Option<Diff>,
    /// From this stage's direct upstream cause to the root cause.
    pub cascade: Vec<Step>,
    pub root_cause: Option<Step>,
    pub inputs: Vec<InputFile>,
}

pub fn explain(s: &Session, evals: &[Option<Evaluation>], i: usize) -> Result<Explanation, crate::cache::Error> {
    let stage = s.stage(i);
    let env = stage.is_deploy().then_some(s.env_name.as_str());
    let eval = evals[i].as_ref();
    let manifest = eval.and_then(|e| e.manifest.as_ref());
    let mut inputs: Vec<InputFile> = Vec::new();
    if let Some(m) = manifest {
        for (path, entry) in m.global_inputs.iter().chain(&m.inputs) {
            inputs.push(match entry {
                Entry::File { hash, exec } => {
                    InputFile { path: path.display(), blake3: Some(hash.to_hex()), executable: *exec, symlink: None }
                }
                Entry::Symlink { target } => InputFile {
                    path: path.display(),
                    blake3: None,
                    executable: false,
                    symlink: Some(String::from_utf8_lossy(target).into_owned()),
                },
            });
        }
    }
    let mut x = Explanation {
        stage: stage.name.clone(),
        state: StageState::SkippedByEvent,
        key: manifest.map(|m| m.key().to_string()),
        reason: None,
        compared_with: None,
        differences: None,
        cascade: Vec::new(),
        root_cause: None,
        inputs,
    };
    let Some(eval) = eval else { return Ok(x) };
    match &eval.decision {
        Decision::Fresh(hit) => {
            x.state = if hit.needs_work() { StageState::Restored } else { StageState::Fresh };
            x.compared_with = Some(RunRef::of(&hit.record));
        }
        Decision::Stale(reason) => {
            x.state = match reason {
                Reason::NeverRun | Reason::NeverDeployed { .. } => StageState::NeverRun,
                Reason::LastRunFailed { .. } | Reason::LastRunInterrupted => StageState::Failed,
                _ => StageState::Stale,
            };
            x.reason = Some(reason.clone());
            if let Some(base) = s.cache.latest_success(&stage.name, env)? {
                x.compared_with = Some(RunRef::of(&base));
                // A manifest from another key scheme cannot be compared: the reason already says so.
                if let (Some(m), Some(Ok(old))) = (manifest, s.cache.manifest(&base.key)?) {
                    x.differences = Some(Diff::between(&old, m));
                }
            }
            x.cascade = cascade(s, evals, i, reason)?;
            x.root_cause = x
                .cascade
                .last()
                .cloned()
                .or_else(|| Some(Step { stage: stage.name.clone(), reason: reason.clone(), recorded: false }));
        }
    }
    Ok(x)
}

/// Follow upstream reasons from stage `i` to the first one that is not about an upstream stage.
fn cascade(
    s: &Session,
    evals: &[Option<Evaluation>],
    i: usize,
    reason: &Reason,
) -> Result<Vec<Step>, crate::cache::Error> {
    let mut steps = Vec::new();
    let mut reason = reason.clone();
    let mut seen = vec![i];
    for _ in 0..s.pipeline.stages.len() {
        let up = match &reason {
            Reason::UpstreamStale { stage } | Reason::UpstreamOutputsChanged { stage, .. } => stage.clone(),
            _ => break,
        };
        let Some(j) = s.pipeline.index_of(&up) else { break };
        if seen.contains(&j) {
            break;
        }
        seen.push(j);
        let (next, recorded) = match evals[j].as_ref().map(|e| &e.decision) {
            Some(Decision::Stale(r)) => (Some(r.clone()), false),
            _ => {
                // Fresh now: it reran earlier; its reason is stored with that run.
                let st = s.stage(j);
                let env = st.is_deploy().then_some(s.env_name.as_str());
                let recorded = s
                    .cache
                    .latest_success(&st.name, env)?
                    .and_then(|r| r.reason)
                    .and_then(|text| serde_json::from_str::<Reason>(&text).ok());
                (recorded, true)
            }
        };
        let Some(next) = next else { break };
        steps.push(Step { stage: up, reason: next.clone(), recorded });
        reason = next;
    }
    Ok(steps)
}

/// Human rendering. `limit`: how many paths to list per group (`None`: all).
pub fn render(x: &Explanation, limit: Option<usize>, mask: &dyn Fn(&str) -> String) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let name = &x.stage;
    match x.state {
        StageState::Fresh | StageState::Restored => {
            let since =
                x.compared_with.as_ref().map(|r| format!(" since {} (run {})", r.at, r.run)).unwrap_or_default();
            let _ = writeln!(t, "`{name}` is fresh{since}: its inputs are unchanged since that successful run.");
            if x.state == StageState::Restored {
                let _ = writeln!(
                    t,
                    "Some outputs are missing from the workspace; `kkpipe run` restores them from the cache."
                );
            }
            return t;
        }
        StageState::SkippedByEvent => {
            let _ = writeln!(t, "`{name}` does not run on this event.");
            return t;
        }
        _ => {}
    }
    let reason = x.reason.as_ref().map(|r| mask(&r.to_string())).unwrap_or_default();
    match &x.reason {
        Some(Reason::NeverRun) => {
            let _ = writeln!(t, "`{name}` has never run successfully, so there is nothing to compare with.");
        }
        Some(Reason::NeverDeployed { env }) => {
            let _ = writeln!(t, "`{name}` has never been deployed to environment `{env}`.");
        }
        _ => {
            let _ = writeln!(t, "`{name}` is stale: {reason}");
        }
    }
    for step in &x.cascade {
        let how = if step.recorded { "ran" } else { "is stale" };
        let _ = writeln!(t, "  because `{}` {how}: {}", step.stage, mask(&step.reason.to_string()));
    }
    if let Some(root) = &x.root_cause
        && !x.cascade.is_empty()
    {
        let _ = writeln!(t, "root cause: {} (stage `{}`)", mask(&root.reason.to_string()), root.stage);
    }
    let (Some(base), Some(d)) = (&x.compared_with, &x.differences) else { return t };
    let took = base
        .duration_ms
        .map(|ms| {
            format!(", took {}", crate::report::format_duration(std::time::Duration::from_millis(ms.max(0) as u64)))
        })
        .unwrap_or_default();
    let _ = writeln!(t, "\nDifferences from its last successful run (run {}, {}{took}):", base.run, base.at);
    if d.is_empty() {
        let why = match &x.reason {
            Some(Reason::UpstreamStale { stage }) => {
                format!("none yet: it reruns only if `{stage}` produces different outputs when it reruns")
            }
            Some(Reason::LastRunFailed { .. } | Reason::LastRunInterrupted) => {
                format!("none in its inputs: {reason}, and a failed run is never a success")
            }
            Some(Reason::Drift { .. }) => "none in its inputs: the live system drifted from the last apply".into(),
            Some(Reason::Forced) => "none: the run was forced".into(),
            _ => format!("none in its inputs ({reason})"),
        };
        let _ = writeln!(t, "  {why}");
    }
    if let Some(c) = &d.command {
        let _ = writeln!(t, "  command:");
        for l in &c.old {
            if !c.new.contains(l) {
                let _ = writeln!(t, "    - {}", mask(l));
            }
        }
        for l in &c.new {
            if !c.old.contains(l) {
                let _ = writeln!(t, "    + {}", mask(l));
            }
        }
    }
    if d.shell {
        let _ = writeln!(t, "  shell: changed (a kkpipe upgrade)");
    }
    if let Some((old, new)) = &d.dir {
        let _ = writeln!(t, "  dir: `{old}` -> `{new}`");
    }
    if let Some((old, new)) = &d.env_scope {
        let _ = writeln!(t, "  environment (per_env): `{old}` -> `{new}`");
    }
    if !d.env.is_empty() {
        let _ = writeln!(t, "  env ({} changed):", d.env.len());
        for e in &d.env {
            let show =
                |v: &Option<String>| v.as_ref().map(|v| format!("{:?}", mask(v))).unwrap_or_else(|| "(unset)".into());
            let _ = writeln!(t, "    {}: {} -> {}", e.name, show(&e.old), show(&e.new));
        }
    }
    for n in &d.secret_env {
        let _ = writeln!(t, "  secret env `{n}`: value changed (not shown)");
    }
    if !d.pass_env_added.is_empty() || !d.pass_env_removed.is_empty() {
        let _ = writeln!(t, "  pass_env: added {:?}, removed {:?}", d.pass_env_added, d.pass_env_removed);
    }
    if d.outputs_declared {
        let _ = writeln!(t, "  declared outputs changed");
    }
    for tool in &d.tools {
        let _ = writeln!(t, "  tool `{tool}` changed (its executable's content differs)");
    }
    for (title, c) in [("global inputs", &d.global_inputs), ("inputs", &d.inputs)] {
        if c.is_empty() {
            continue;
        }
        let _ = writeln!(
            t,
            "  {title}: {} modified, {} added, {} removed",
            c.modified.len(),
            c.added.len(),
            c.removed.len()
        );
        list_paths(&mut t, c, limit);
    }
    if !d.needs_added.is_empty() || !d.needs_removed.is_empty() {
        let _ = writeln!(t, "  needs: added {:?}, removed {:?}", d.needs_added, d.needs_removed);
    }
    for n in &d.needs {
        let _ = writeln!(t, "  outputs of `{}` ({} changed):", n.stage, n.outputs.len());
        list_paths(&mut t, &n.outputs, limit);
    }
    t
}

fn list_paths(t: &mut String, c: &crate::fresh::FileChanges, limit: Option<usize>) {
    use std::fmt::Write;
    let all: Vec<(&str, String)> = c
        .modified
        .iter()
        .map(|p| ("modified", p.display()))
        .chain(c.added.iter().map(|p| ("added", p.display())))
        .chain(c.removed.iter().map(|p| ("removed", p.display())))
        .collect();
    let shown = limit.unwrap_or(usize::MAX).min(all.len());
    for (what, p) in &all[..shown] {
        let _ = writeln!(t, "    {what:<8} {p}");
    }
    if shown < all.len() {
        let _ = writeln!(t, "    ... and {} more (`--all` lists them)", all.len() - shown);
    }
}
