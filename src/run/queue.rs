//! The order of a run, without I/O: which waiting stages may start now, and which never will because a stage
//! they need ended without outputs. Pure functions over each stage's [`Phase`], unit-tested on their own (as
//! cargo's `DependencyQueue` is); the scheduler maps its stages' states onto phases and acts on the answers.

/// Where a stage is, as far as the order of the run is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Not selected for this run: it neither waits nor blocks.
    NotSelected,
    Waiting,
    /// A job of its own runs for it (its command, a probe, a regeneration, a lease wait, a lookup): it holds a
    /// place under `-j`.
    Busy,
    /// Fresh or ran: its outputs are there for the stages that need it.
    Succeeded,
    /// Over without outputs for its dependents.
    Ended(Shortfall),
}

/// How a stage ended without outputs for its dependents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shortfall {
    Failed,
    Interrupted,
    /// `verify`: stale, so not probed.
    Stale,
    Drifted,
    /// Not started itself.
    Skipped,
}

impl Shortfall {
    /// "needs `x`, which ..."
    pub(super) fn words(self) -> &'static str {
        match self {
            Shortfall::Failed => "failed",
            Shortfall::Interrupted => "was interrupted",
            Shortfall::Stale => "is stale",
            Shortfall::Drifted => "drifted",
            Shortfall::Skipped => "did not run",
        }
    }
}

/// What the queue says about one waiting stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Every stage it needs succeeded: it may start (when a place under `-j` is free).
    Ready,
    /// Some stage it needs has not ended yet.
    Wait,
    /// A stage it needs (the first, in `needs` order) ended without outputs: it never starts.
    Blocked { need: usize, because: Shortfall },
}

/// The verdict on a stage that needs `needs`, given every stage's phase.
pub(super) fn verdict(needs: &[usize], phase: &dyn Fn(usize) -> Phase) -> Verdict {
    if let Some((need, because)) = needs.iter().find_map(|&j| match phase(j) {
        Phase::Ended(s) => Some((j, s)),
        _ => None,
    }) {
        return Verdict::Blocked { need, because };
    }
    match needs.iter().all(|&j| phase(j) == Phase::Succeeded) {
        true => Verdict::Ready,
        false => Verdict::Wait,
    }
}

/// The stages sent back to run again in this run (`again`: a retry's stale plan, until it has) and the graph,
/// for [`again_verdict`].
pub(super) struct Again<'a> {
    pub(super) stages: &'a [usize],
    pub(super) needs: &'a [Vec<usize>],
    pub(super) dependents: &'a [Vec<usize>],
}

/// The verdict on stage `i`, ready by its needs, from the stages sent back to run again: such a stage starts only
/// once nothing downstream of it runs (its outputs are never rewritten under a command reading them), and
/// nothing downstream of it starts before it has run, or ever, if it ends without outputs. Downstream through
/// check stages too: a deploy applies the plans it reaches through them. Costs nothing while no stage is sent
/// back.
pub(super) fn again_verdict(i: usize, again: &Again<'_>, phase: &dyn Fn(usize) -> Phase) -> Verdict {
    if again.stages.is_empty() {
        return Verdict::Ready;
    }
    let upstream = reach(i, again.needs);
    for &k in again.stages.iter().filter(|k| upstream.contains(k)) {
        match phase(k) {
            Phase::Ended(because) => return Verdict::Blocked { need: k, because },
            Phase::Succeeded | Phase::NotSelected => {}
            Phase::Waiting | Phase::Busy => return Verdict::Wait,
        }
    }
    if again.stages.contains(&i) && reach(i, again.dependents).iter().any(|&d| phase(d) == Phase::Busy) {
        return Verdict::Wait;
    }
    Verdict::Ready
}

/// Every stage reachable from `i` along `edges` (not `i` itself).
fn reach(i: usize, edges: &[Vec<usize>]) -> Vec<usize> {
    let (mut seen, mut stack) = (vec![false; edges.len()], edges[i].clone());
    while let Some(j) = stack.pop() {
        if !std::mem::replace(&mut seen[j], true) {
            stack.extend(&edges[j]);
        }
    }
    (0..edges.len()).filter(|&j| seen[j] && j != i).collect()
}

/// How many more stages may start under `-j jobs`, with `phases` as they are.
pub(super) fn free_places(phases: impl Iterator<Item = Phase>, jobs: usize) -> usize {
    jobs.max(1).saturating_sub(phases.filter(|p| *p == Phase::Busy).count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phases(list: &[Phase]) -> impl Fn(usize) -> Phase + '_ {
        move |i| list[i]
    }

    #[test]
    fn a_stage_is_ready_once_every_need_succeeded() {
        let p = [Phase::Succeeded, Phase::Succeeded, Phase::Waiting];
        assert_eq!(verdict(&[0, 1], &phases(&p)), Verdict::Ready);
        assert_eq!(verdict(&[], &phases(&p)), Verdict::Ready, "no needs: ready at once");
        let p = [Phase::Succeeded, Phase::Busy, Phase::Waiting];
        assert_eq!(verdict(&[0, 1], &phases(&p)), Verdict::Wait);
        let p = [Phase::Succeeded, Phase::Waiting, Phase::Waiting];
        assert_eq!(verdict(&[0, 1], &phases(&p)), Verdict::Wait);
    }

    /// plan (0) -> policy (1) -> apply-b (2), and apply-a (3) needs plan too; a gate (4) that apply-c (5) needs
    /// beside policy.
    fn graph() -> (Vec<Vec<usize>>, Vec<Vec<usize>>) {
        let needs = vec![vec![], vec![0], vec![1], vec![0], vec![], vec![1, 4]];
        let mut dependents = vec![Vec::new(); needs.len()];
        for (i, n) in needs.iter().enumerate() {
            for &j in n {
                dependents[j].push(i);
            }
        }
        (needs, dependents)
    }

    #[test]
    fn a_stage_sent_back_waits_while_anything_downstream_of_it_runs() {
        let (needs, dependents) = graph();
        let again = Again { stages: &[0], needs: &needs, dependents: &dependents };
        use Phase::{Busy, Ended, Succeeded, Waiting};
        use Verdict::{Blocked, Ready, Wait};
        // apply-a's retry sent the plan back while apply-b, through the policy, still applies it.
        let p = [Waiting, Succeeded, Busy, Waiting, Succeeded, Succeeded];
        assert_eq!(again_verdict(0, &again, &phases(&p)), Wait);
        let p = [Waiting, Succeeded, Succeeded, Waiting, Succeeded, Succeeded];
        assert_eq!(again_verdict(0, &again, &phases(&p)), Ready, "once it is done, the plan runs again");
        // Nothing downstream of the plan starts before it has run again, however far (apply-c via the policy).
        assert_eq!(again_verdict(5, &again, &phases(&p)), Wait);
        assert_eq!(again_verdict(3, &again, &phases(&p)), Wait);
        assert_eq!(again_verdict(4, &again, &phases(&p)), Ready, "the gate does not need the plan");
        // Nor ever, when it fails: named as the stage it waited for.
        let p = [Ended(Shortfall::Failed), Succeeded, Waiting, Waiting, Succeeded, Waiting];
        assert_eq!(again_verdict(5, &again, &phases(&p)), Blocked { need: 0, because: Shortfall::Failed });
        let none = Again { stages: &[], needs: &needs, dependents: &dependents };
        let p = [Waiting, Succeeded, Busy, Waiting, Succeeded, Succeeded];
        assert_eq!(again_verdict(0, &none, &phases(&p)), Ready, "no stage sent back: none held");
    }

    #[test]
    fn a_need_that_ended_without_outputs_blocks_and_is_named() {
        let p = [Phase::Busy, Phase::Ended(Shortfall::Failed), Phase::Ended(Shortfall::Drifted)];
        assert_eq!(verdict(&[0, 1, 2], &phases(&p)), Verdict::Blocked { need: 1, because: Shortfall::Failed });
        // Blocked even while another need still runs: it can never start.
        assert_eq!(verdict(&[2, 0], &phases(&p)), Verdict::Blocked { need: 2, because: Shortfall::Drifted });
        let p = [Phase::Ended(Shortfall::Skipped)];
        let Verdict::Blocked { because, .. } = verdict(&[0], &phases(&p)) else { panic!() };
        assert_eq!(because.words(), "did not run");
    }

    #[test]
    fn busy_stages_hold_their_places_under_jobs() {
        let p = [Phase::Busy, Phase::Waiting, Phase::Succeeded, Phase::NotSelected, Phase::Busy];
        assert_eq!(free_places(p.into_iter(), 3), 1);
        assert_eq!(free_places(p.into_iter(), 2), 0);
        assert_eq!(free_places(p.into_iter(), 1), 0, "never negative");
        assert_eq!(free_places([Phase::Waiting].into_iter(), 0), 1, "-j 0 means one at a time");
    }
}
