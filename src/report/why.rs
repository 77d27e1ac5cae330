//! `kkpipe why` for people: the state, the chain to the root cause, and every difference from the last
//! successful run, grouped.

use crate::fresh::{Diff, FileChanges, Reason, StoredReason};
use crate::report::{StageState, format_duration};
use serde::Serialize;
use std::fmt::Write;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct RunRef {
    pub run: i64,
    pub at: String,
    pub at_ms: i64,
    pub duration_ms: Option<i64>,
    pub key: String,
    /// The attempt was an adoption: the probe found the live system in sync, nothing ran.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub adopted: bool,
}

/// One link of the chain from a stage to its root cause.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Cause {
    pub stage: String,
    #[serde(serialize_with = "serialize_stored")]
    pub reason: StoredReason,
    /// True when this is the reason recorded with the stage's last run (it already reran), not a current one.
    pub recorded: bool,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct InputFile {
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
/// Everything `why` says about a stage (`why --json`: schema kkpipe.why.v1).
pub(crate) struct Explanation {
    pub stage: String,
    pub state: StageState,
    pub key: Option<String>,
    /// The first reason (what `status` prints); absent when fresh.
    pub reason: Option<Reason>,
    /// Fresh: the run that made it fresh. Stale: the last successful run it is compared with.
    pub compared_with: Option<RunRef>,
    pub differences: Option<Diff>,
    /// From this stage's direct upstream cause to the root cause.
    pub cascade: Vec<Cause>,
    pub root_cause: Option<Cause>,
    pub inputs: Vec<InputFile>,
}

/// A stored reason in JSON: the reason itself, or `{"kind": "unreadable", "text": ...}`.
fn serialize_stored<S: serde::Serializer>(r: &StoredReason, s: S) -> Result<S::Ok, S::Error> {
    match r {
        StoredReason::Known(r) => r.serialize(s),
        StoredReason::Unreadable(text) => serde_json::json!({ "kind": "unreadable", "text": text }).serialize(s),
    }
}

/// Human rendering. `limit`: how many paths to list per group (`None`: all).
pub(crate) fn render(x: &Explanation, limit: Option<usize>, mask: &dyn Fn(&str) -> String) -> String {
    let mut t = String::new();
    if !headline(&mut t, x, mask) {
        return t;
    }
    let (Some(base), Some(d)) = (&x.compared_with, &x.differences) else { return t };
    let took = base
        .duration_ms
        .map(|ms| format!(", took {}", format_duration(std::time::Duration::from_millis(ms.max(0) as u64))))
        .unwrap_or_default();
    let _ = writeln!(t, "\nDifferences from its last successful run (run {}, {}{took}):", base.run, base.at);
    if d.is_empty() {
        let _ = writeln!(t, "  {}", no_difference(x.reason.as_ref(), mask));
    }
    differences(&mut t, d, limit, mask);
    t
}

/// The first lines: fresh, not selected, or stale with its cause. False when there is nothing more to say.
fn headline(t: &mut String, x: &Explanation, mask: &dyn Fn(&str) -> String) -> bool {
    let name = &x.stage;
    match x.state {
        StageState::Fresh | StageState::Restored => {
            let since =
                x.compared_with.as_ref().map(|r| format!(" since {} (run {})", r.at, r.run)).unwrap_or_default();
            let what = match x.compared_with.as_ref().is_some_and(|r| r.adopted) {
                true => {
                    "its inputs are unchanged since it was adopted (its probe found the live system in sync; nothing ran)"
                }
                false => "its inputs are unchanged since that successful run",
            };
            let _ = writeln!(t, "`{name}` is fresh{since}: {what}.");
            if x.state == StageState::Restored {
                let _ = writeln!(
                    t,
                    "Some outputs are missing from the workspace; `kkpipe run` restores them from the cache."
                );
            }
            return false;
        }
        StageState::SkippedByEvent => {
            let _ = writeln!(t, "`{name}` does not run on this event.");
            return false;
        }
        _ => {}
    }
    match &x.reason {
        Some(Reason::NeverRun) => {
            let _ = writeln!(t, "`{name}` has never run successfully, so there is nothing to compare with.");
        }
        Some(Reason::NeverDeployed { env }) => {
            let _ = writeln!(t, "`{name}` has never been deployed to environment `{env}`.");
        }
        r => {
            let _ = writeln!(t, "`{name}` is stale: {}", r.as_ref().map(|r| mask(&r.to_string())).unwrap_or_default());
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
    true
}

/// Why a stale stage whose inputs are all unchanged is stale.
fn no_difference(reason: Option<&Reason>, mask: &dyn Fn(&str) -> String) -> String {
    let text = reason.map(|r| mask(&r.to_string())).unwrap_or_default();
    match reason {
        Some(Reason::UpstreamStale { stage }) => {
            format!("none yet: it reruns only if `{stage}` produces different outputs when it reruns")
        }
        Some(Reason::LastRunFailed { .. } | Reason::LastRunInterrupted) => {
            format!("none in its inputs: {text}, and a failed run is never a success")
        }
        Some(Reason::Drift { .. }) => "none in its inputs: the live system drifted from the last apply".into(),
        Some(Reason::Forced) => "none: the run was forced".into(),
        _ => format!("none in its inputs ({text})"),
    }
}

fn differences(t: &mut String, d: &Diff, limit: Option<usize>, mask: &dyn Fn(&str) -> String) {
    if let Some(c) = &d.command {
        let _ = writeln!(t, "  command:");
        for l in c.old.iter().filter(|l| !c.new.contains(l)) {
            let _ = writeln!(t, "    - {}", mask(l));
        }
        for l in c.new.iter().filter(|l| !c.old.contains(l)) {
            let _ = writeln!(t, "    + {}", mask(l));
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
        let show =
            |v: &Option<String>| v.as_ref().map(|v| format!("{:?}", mask(v))).unwrap_or_else(|| "(unset)".into());
        for e in &d.env {
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
        if !c.is_empty() {
            let (m, a, r) = (c.modified.len(), c.added.len(), c.removed.len());
            let _ = writeln!(t, "  {title}: {m} modified, {a} added, {r} removed");
            list_paths(t, c, limit);
        }
    }
    if !d.needs_added.is_empty() || !d.needs_removed.is_empty() {
        let _ = writeln!(t, "  needs: added {:?}, removed {:?}", d.needs_added, d.needs_removed);
    }
    for n in &d.needs {
        let _ = writeln!(t, "  outputs of `{}` ({} changed):", n.stage, n.outputs.len());
        list_paths(t, &n.outputs, limit);
    }
}

fn list_paths(t: &mut String, c: &FileChanges, limit: Option<usize>) {
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
