//! Deciding stages without running anything (`status`, `run --dry-run`, `why`, `graph`, `cache export`), and
//! the one step the scheduler shares with it: manifest -> [`fresh::decide`].
//!
//! Stages are evaluated in graph order; a stage whose need is stale is keyed with that need's last known
//! outputs, and its decision is provisional ([`Reason::UpstreamStale`]).

use crate::cache::Cache;
use crate::cache::outputs::Disk;
use crate::fresh::{self, Decision, History, OutputRecord, Query, Reason};
use crate::graph::{CiEvent, Graph, Selected};
use crate::hash::key::Keyed;
use crate::pipeline::Pipeline;
use crate::session::{self, Session};

/// What a command works on, resolved from flags and the CI's variables.
#[derive(Clone, Copy)]
pub(crate) struct Context<'a> {
    pub pipeline: &'a Pipeline,
    pub graph: &'a Graph,
    pub event: Option<&'a CiEvent>,
    /// The deployment environment (`--env`).
    pub env: &'a str,
}

impl Context<'_> {
    pub(crate) fn select(&self, targets: &[String]) -> Result<Vec<Selected>, crate::graph::Error> {
        self.graph.select(self.pipeline, targets, self.event)
    }

    /// The history filter of stage `i`: deploy stages keep a ledger per environment.
    pub(crate) fn ledger_env(&self, i: usize) -> Option<&str> {
        self.pipeline.stages[i].is_deploy().then_some(self.env)
    }
}

/// A stage's manifest (when it could be made) and its decision.
#[derive(Debug, Clone)]
pub(crate) struct Evaluation {
    pub keyed: Option<Keyed>,
    pub decision: Decision,
}

/// The one mapping from a decision to what a user sees. `dry_run`: a stage that must run "would run".
pub(crate) fn state_of(d: &Decision, dry_run: bool) -> crate::report::StageState {
    use crate::report::StageState;
    match d {
        Decision::Fresh(_) => StageState::Fresh,
        Decision::Restore(..) => StageState::Restored,
        Decision::Run(_) if dry_run => StageState::WouldRun,
        Decision::Run(Reason::NeverRun | Reason::NeverDeployed { .. }) => StageState::NeverRun,
        Decision::Run(Reason::LastRunFailed { .. } | Reason::LastRunInterrupted) => StageState::Failed,
        Decision::Run(_) => StageState::Stale,
    }
}

/// One stage, decided. (Short-lived: moved straight into the scheduler or an [`Evaluation`].)
#[allow(clippy::large_enum_variant)]
pub(crate) enum Step {
    /// The manifest cannot be made (a tool is missing or unreadable): the stage must run and cannot.
    NoManifest(Reason),
    Decided(Keyed, Decision),
}

impl From<Step> for Evaluation {
    fn from(s: Step) -> Evaluation {
        match s {
            Step::NoManifest(r) => Evaluation { keyed: None, decision: Decision::Run(r) },
            Step::Decided(k, d) => Evaluation { keyed: Some(k), decision: d },
        }
    }
}

/// Make stage `i`'s manifest from its needs' outputs and decide it.
pub(crate) fn stage(
    cx: Context<'_>,
    session: &mut Session<'_>,
    cache: &Cache,
    i: usize,
    needs: &[(String, Vec<OutputRecord>)],
    must_run: Option<Reason>,
    stale_upstream: Option<&str>,
) -> Result<Step, session::Error> {
    let manifest = session.manifest(i, needs)?;
    let disk = Disk { root: &cx.pipeline.root, hasher: session.hasher(), blobs: &cache.blobs };
    // A stage that cannot be keyed is asked of the decision too: one that never ran says so first.
    let inputs = manifest.as_ref().map_err(Clone::clone);
    let q = Query { stage: &cx.pipeline.stages[i], env: cx.env, inputs, must_run, stale_upstream };
    let decision = cache.reading(|| fresh::decide(&q, cache, &disk))?;
    Ok(match (manifest, decision) {
        (Ok(keyed), decision) => Step::Decided(keyed, decision),
        (Err(_), Decision::Run(first)) => Step::NoManifest(first),
        (Err(_), _) => unreachable!("no key, no hit"),
    })
}

/// The outputs a stage is known to produce when it is not fresh now: those of its latest success.
pub(crate) fn last_known_outputs(
    cx: Context<'_>,
    cache: &Cache,
    i: usize,
) -> Result<Vec<OutputRecord>, crate::cache::Error> {
    match cache.latest_success(&cx.pipeline.stages[i].name, cx.ledger_env(i))? {
        Some(r) => cache.outputs(&r),
        None => Ok(Vec::new()),
    }
}

/// Evaluate every selected stage in graph order, with the outputs of fresh needs, or the last known outputs of
/// stale ones. `forced(i)`: `run --dry-run --force`.
pub(crate) fn all(
    cx: Context<'_>,
    session: &mut Session<'_>,
    cache: &Cache,
    selected: &[Selected],
    forced: &dyn Fn(usize) -> bool,
) -> Result<Vec<Option<Evaluation>>, session::Error> {
    let chosen: Vec<usize> = (0..selected.len()).filter(|&i| selected[i] == Selected::Yes).collect();
    session.walk(&chosen)?;
    let mut evals: Vec<Option<Evaluation>> = vec![None; selected.len()];
    for &i in &cx.graph.order {
        if selected[i] != Selected::Yes {
            continue;
        }
        let mut needs = Vec::new();
        let mut stale_need = None;
        for &j in &cx.graph.needs[i] {
            let name = cx.pipeline.stages[j].name.clone();
            match evals[j].as_ref().and_then(|e| e.decision.hit()) {
                Some(hit) => needs.push((name, hit.outputs.clone())),
                None => {
                    stale_need.get_or_insert(name.clone());
                    needs.push((name, last_known_outputs(cx, cache, j)?));
                }
            }
        }
        let must_run = forced(i).then_some(Reason::Forced);
        evals[i] = Some(stage(cx, session, cache, i, &needs, must_run, stale_need.as_deref())?.into());
    }
    session.persist_stat_cache(cache);
    Ok(evals)
}
