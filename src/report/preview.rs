//! `kkpipe preview`: what a merge into the target branch will do, for a reviewer. Markdown (a pull-request
//! comment or job summary) or JSON (`kkpipe.preview.v1`); built from the same rows as `status`.

use super::json::Context;
use super::{StageRow, StageState};
use crate::fresh::Reason;
use crate::pipeline::Kind;
use crate::tfplan::PlanSummary;
use serde::Serialize;
use std::fmt::Write;

pub(crate) const SCHEMA: &str = "kkpipe.preview.v1";

/// The first line of every preview starts so, with the pull request's commit after it when the CI names one:
/// `[//]: # (kkpipe-preview 0123456789ab…)`. A Markdown link definition, which GitHub, GitLab and Bitbucket all
/// render as nothing (an HTML comment would show on Bitbucket); `kkpipe comment` finds its comment by it.
pub(crate) const MARKER_PREFIX: &str = "[//]: # (kkpipe-preview";

/// The marker line for `commit`.
pub(crate) fn marker(commit: Option<&str>) -> String {
    match commit {
        Some(c) => format!("{MARKER_PREFIX} {c})"),
        None => format!("{MARKER_PREFIX})"),
    }
}

/// The commit a preview's marker names: `Some("")` for a preview that names none, `None` for text that is no
/// preview.
pub(crate) fn marked_commit(text: &str) -> Option<&str> {
    let rest = text.lines().next()?.strip_prefix(MARKER_PREFIX)?;
    Some(rest.trim_end().strip_suffix(')')?.trim())
}

/// What a merge does to one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum OnMerge {
    /// A check stage that will run.
    Runs,
    /// A deploy stage that will apply.
    Deploys,
    /// Will run only if a stage it needs produces other outputs than last time (early cutoff).
    IfUpstreamChanges,
    /// Nothing to do: its inputs are unchanged (a deploy stays as deployed).
    Fresh,
    /// The push does not select it.
    NotOnPush,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct PreviewStage {
    pub name: String,
    pub kind: Kind,
    pub on_merge: OnMerge,
    /// Why it will run, the root cause as `status` gives it (masked); `None` for fresh stages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason_text: Option<String>,
}

/// The plan a terraform stage made in this job, summarised.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PlanPreview {
    pub stage: String,
    /// The plan file, relative to the repository.
    pub plan: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<PlanSummary>,
    /// What its stage's `plan_policy` denies in it (and `KKPIPE_ALLOW_DESTROY` does not allow).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub denied: Vec<Denied>,
    /// Why there is no summary (not planned with these inputs, `terraform show` failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Denied {
    pub address: String,
    pub action: String,
    /// `KKPIPE_ALLOW_DESTROY` allows it in this job (the merge's push needs it again).
    pub overridden: bool,
}

/// A deploy stage's last drift probe, as the preview shows it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ProbeSeen {
    pub stage: String,
    /// When it ended (RFC 3339, UTC).
    pub probed_at: String,
    pub state: ProbeState,
    /// What drifted, when the probe is a `terraform plan` (`drifted` only; at most 200).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<crate::tfplan::TextChange>,
    /// Drifted resources beyond those listed.
    #[serde(skip_serializing_if = "is_zero")]
    pub more: usize,
    /// The probe's first line of output, when it names no terraform resources (`drifted` only; masked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// What the push after the merge does about the drift (`drifted` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_merge: Option<DriftOnMerge>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum ProbeState {
    /// Its probe found the live system as deployed.
    InSync,
    Drifted,
    /// Deployed since its last probe: as the repository said then.
    Deployed,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum DriftOnMerge {
    /// The merge deploys the stage anyway (its inputs changed).
    Deploys,
    /// Its probe runs again and, if it still drifted, deploys it again (`on_drift = "apply"`).
    ProbesAndDeploys,
    /// Its probe runs again and, if it still drifted, fails the push (`on_drift = "fail"`).
    ProbesAndFails,
    /// The push does not select it, or does not reach it.
    Nothing,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Preview {
    pub schema: &'static str,
    #[serde(flatten)]
    pub context: Context,
    /// The pull request's head commit this preview is of, as the CI's variables name it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    pub stages: Vec<PreviewStage>,
    pub plans: Vec<PlanPreview>,
    /// Each deploy stage's last drift probe in this environment that this cache knows (a scheduled `kkpipe
    /// verify` keeps them current).
    pub probes: Vec<ProbeSeen>,
}

impl PreviewStage {
    /// A `status` row of the push's evaluation, as the merge will meet it. `mask` hides secrets in reasons.
    pub(crate) fn from_row(r: &StageRow, mask: &dyn Fn(&str) -> String) -> PreviewStage {
        let reason = r.reasons.first().cloned();
        let on_merge = match (r.state, &reason) {
            (StageState::SkippedByEvent, _) => OnMerge::NotOnPush,
            (StageState::Fresh | StageState::Restored | StageState::Adopted, _) => OnMerge::Fresh,
            (_, Some(Reason::UpstreamStale { .. })) => OnMerge::IfUpstreamChanges,
            _ if r.kind == Kind::Deploy => OnMerge::Deploys,
            _ => OnMerge::Runs,
        };
        let reason = reason.filter(|_| !matches!(on_merge, OnMerge::Fresh | OnMerge::NotOnPush));
        let reason_text = reason.as_ref().map(|x| mask(&x.to_string()));
        PreviewStage { name: r.name.clone(), kind: r.kind, on_merge, reason, reason_text }
    }
}

impl Preview {
    pub(crate) fn markdown(&self) -> String {
        let mut t = String::new();
        let target = self.context.event.as_ref().and_then(|e| e.branch.as_deref()).unwrap_or("the target branch");
        let _ = writeln!(
            t,
            "{}\n### kkpipe preview: merging into {} (environment {})\n",
            marker(self.commit.as_deref()),
            code(target),
            code(&self.context.env)
        );
        if let Some(c) = &self.commit {
            let _ = writeln!(t, "Of commit `{}`.\n", super::short_commit(c, 12));
        }
        let _ = writeln!(t, "{}\n", self.headline());
        let _ = writeln!(t, "| stage | on merge | why |\n|---|---|---|");
        for s in self.stages.iter().filter(|s| s.on_merge != OnMerge::NotOnPush) {
            let why = s.reason_text.as_deref().map(cell).unwrap_or_default();
            let words = match self.drifted(&s.name).and_then(|p| p.on_merge) {
                Some(DriftOnMerge::ProbesAndDeploys) => "**drifted**: deploys again if it still differs".into(),
                Some(DriftOnMerge::ProbesAndFails) => "**drifted**: fails the push if it still differs".into(),
                _ => on_merge_words(s),
            };
            let _ = writeln!(t, "| {} | {words} | {why} |", code(&s.name));
        }
        self.drift_markdown(&mut t);
        for p in &self.plans {
            plan_markdown(&mut t, p);
        }
        t
    }

    /// The last probe of `stage`, when it found drift no deploy has applied over.
    fn drifted(&self, stage: &str) -> Option<&ProbeSeen> {
        self.probes.iter().find(|p| p.stage == stage && p.state == ProbeState::Drifted)
    }

    /// The drift the last probes found and no deploy has applied over yet, or that they found none.
    fn drift_markdown(&self, t: &mut String) {
        let drifted: Vec<&ProbeSeen> = self.probes.iter().filter(|p| p.state == ProbeState::Drifted).collect();
        if drifted.is_empty() {
            if let Some(last) = self.probes.iter().map(|p| p.probed_at.as_str()).max() {
                let _ = writeln!(
                    t,
                    "\nNo drift known: what kkpipe last saw of the deploys (latest {}) was the live system as deployed.",
                    when(last)
                );
            }
            return;
        }
        let _ = writeln!(t, "\n#### Drift the probes found\n");
        for p in drifted {
            let what = match (&p.resources[..], &p.detail) {
                ([], Some(d)) => code(d),
                ([], None) => "the live system differs from the last deploy".into(),
                (r, _) => crate::tfplan::name_changes(r, p.more, 10, &code),
            };
            let then = match p.on_merge {
                Some(DriftOnMerge::Deploys) => "the merge deploys it anyway, over the drift",
                Some(DriftOnMerge::ProbesAndDeploys) => {
                    "on merge its probe runs again and, if it still differs, **the merge deploys it again** (`on_drift = \"apply\"`)"
                }
                Some(DriftOnMerge::ProbesAndFails) => {
                    "on merge its probe runs again and, if it still differs, the push fails without deploying (`on_drift = \"fail\"`)"
                }
                Some(DriftOnMerge::Nothing) | None => "the merge neither probes nor deploys it",
            };
            let _ = writeln!(t, "- {} (probed {}): {what}; {then}.", code(&p.stage), when(&p.probed_at));
        }
    }

    /// `Merging deploys 1 stage (kkp-deploy) and runs 0 checks; 2 run only if ...; 6 stay fresh.`
    fn headline(&self) -> String {
        let names = |m: OnMerge| -> Vec<String> {
            self.stages.iter().filter(|s| s.on_merge == m).map(|s| code(&s.name)).collect()
        };
        let (deploys, runs, maybe) = (names(OnMerge::Deploys), names(OnMerge::Runs), names(OnMerge::IfUpstreamChanges));
        let open = |p: &&ProbeSeen| p.state == ProbeState::Drifted && p.on_merge != Some(DriftOnMerge::Deploys);
        let drifted: Vec<String> = self.probes.iter().filter(open).map(|p| code(&p.stage)).collect();
        // A drifted stage is counted as drifted, not as fresh.
        let fresh = self
            .stages
            .iter()
            .filter(|s| s.on_merge == OnMerge::Fresh && !self.probes.iter().filter(open).any(|p| p.stage == s.name))
            .count();
        let mut parts = Vec::new();
        parts.push(match deploys.len() {
            0 if !drifted.is_empty() => "**Merging deploys no change of its own**".to_string(),
            0 => "**Merging deploys nothing**".to_string(),
            n => format!("**Merging deploys {n} stage{}**: {}", plural(n), deploys.join(", ")),
        });
        if !runs.is_empty() {
            parts.push(format!("runs {} check{}: {}", runs.len(), plural(runs.len()), runs.join(", ")));
        }
        if !maybe.is_empty() {
            parts.push(format!("{} only if a stage they need changes its outputs: {}", maybe.len(), maybe.join(", ")));
        }
        if !drifted.is_empty() {
            parts.push(format!("the probes found drift in {} (below)", drifted.join(", ")));
        }
        parts.push(format!("{fresh} stay fresh"));
        format!("{}.", parts.join("; "))
    }
}

/// `text` as a Markdown code span, whatever it holds: a fence longer than any run of backticks in it (CommonMark
/// 6.1), control characters escaped, pipes escaped for a table. What a pull request or a probe printed (a
/// resource address, a for_each key) then shows as the text it is, never as a link or HTML.
pub(crate) fn code(text: &str) -> String {
    let text = crate::relpath::escape_controls(text).replace('|', "\\|");
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest + 1);
    let pad = if text.starts_with('`') || text.ends_with('`') { " " } else { "" };
    format!("{fence}{pad}{text}{pad}{fence}")
}

/// `2026-12-05T05:17:03Z` as `2026-12-05 05:17 UTC`.
fn when(rfc3339: &str) -> String {
    match rfc3339.get(..16) {
        Some(minute) if rfc3339.ends_with('Z') => format!("{} UTC", minute.replace('T', " ")),
        _ => rfc3339.to_string(),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn on_merge_words(s: &PreviewStage) -> String {
    match (s.on_merge, &s.reason) {
        (OnMerge::Deploys, _) => "**deploys**".into(),
        (OnMerge::Runs, _) => "runs".into(),
        (OnMerge::IfUpstreamChanges, Some(Reason::UpstreamStale { stage })) => {
            format!(
                "{} only if {} changes its outputs",
                if s.kind == Kind::Deploy { "deploys" } else { "runs" },
                code(stage)
            )
        }
        (OnMerge::IfUpstreamChanges, _) => "only if a stage it needs changes its outputs".into(),
        (OnMerge::Fresh, _) if s.kind == Kind::Deploy => "stays as deployed".into(),
        (OnMerge::Fresh, _) => "fresh".into(),
        (OnMerge::NotOnPush, _) => "not on a push".into(),
    }
}

/// A table cell: no line breaks or pipes from a reason's text.
fn cell(text: &str) -> String {
    text.lines().next().unwrap_or("").replace('|', "\\|")
}

fn plan_markdown(t: &mut String, p: &PlanPreview) {
    let _ = write!(t, "\n#### {}: {}\n\n", code(&p.stage), code(&p.plan));
    let Some(s) = &p.summary else {
        let _ = writeln!(t, "{}", p.note.as_deref().unwrap_or("no plan"));
        return;
    };
    if s.is_empty() && s.outputs.is_empty() {
        let _ = writeln!(t, "No changes: the live infrastructure matches the configuration.");
        return;
    }
    let _ = writeln!(t, "Plan: {}.\n", s.counts());
    if !p.denied.is_empty() {
        let items: Vec<String> = p
            .denied
            .iter()
            .map(|d| {
                let note = if d.overridden { " (allowed in this job by `KKPIPE_ALLOW_DESTROY`)" } else { "" };
                format!("{} {}{note}", d.action, code(&d.address))
            })
            .collect();
        let _ = writeln!(
            t,
            "**Denied by the plan policy**: {}. The plan stage fails, and so does the apply on merge, unless \
             `KKPIPE_ALLOW_DESTROY` allows them there too (docs/review.md).\n",
            items.join(", ")
        );
    }
    for (what, list) in [
        ("**destroyed and created again (replace)**", &s.replace),
        ("**destroyed**", &s.delete),
        ("created", &s.create),
        ("updated in place", &s.update),
        ("read", &s.read),
        ("removed from the state, not destroyed (forget)", &s.forget),
        ("imported", &s.imported),
    ] {
        if !list.is_empty() {
            let items: Vec<String> = list.iter().map(|a| code(a)).collect();
            let _ = writeln!(t, "- {what}: {}", items.join(", "));
        }
    }
    if !s.moved.is_empty() {
        let items: Vec<String> = s.moved.iter().map(|m| format!("{} -> {}", code(&m.from), code(&m.to))).collect();
        let _ = writeln!(t, "- moved: {}", items.join(", "));
    }
    if !s.outputs.is_empty() {
        let items: Vec<String> = s.outputs.iter().map(|o| format!("{} ({})", code(&o.name), o.change)).collect();
        let _ = writeln!(t, "- outputs: {} (values not shown)", items.join(", "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a pull request or a probe printed stays text in the comment: no link, no HTML, no table cell break.
    #[test]
    fn a_code_span_holds_any_text() {
        assert_eq!(code("terraform_data.a[0]"), "`terraform_data.a[0]`");
        let link = code("x`[click](https://evil.example)`y");
        assert_eq!(link, "``x`[click](https://evil.example)`y``");
        assert_eq!(code("`a`"), "`` `a` ``");
        assert_eq!(code("a|b\u{1b}[31m"), "`a\\|b\\u{1b}[31m`");
    }
}
