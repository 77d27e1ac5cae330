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
    /// Some stage it needs has not ended yet, or one that needs it still runs on its outputs (it is to run again).
    Wait,
    /// A stage it needs (the first, in `needs` order) ended without outputs: it never starts.
    Blocked { need: usize, because: Shortfall },
}

/// The verdict on a stage that needs `needs` and is needed by `dependents`, given every stage's phase. A stage
/// sent back to run again (a retry's stale plan) waits while a stage that needs it runs: its outputs are not
/// rewritten under a command reading them.
pub(super) fn verdict(needs: &[usize], dependents: &[usize], phase: &dyn Fn(usize) -> Phase) -> Verdict {
    if let Some((need, because)) = needs.iter().find_map(|&j| match phase(j) {
        Phase::Ended(s) => Some((j, s)),
        _ => None,
    }) {
        return Verdict::Blocked { need, because };
    }
    let in_use = dependents.iter().any(|&d| phase(d) == Phase::Busy);
    match needs.iter().all(|&j| phase(j) == Phase::Succeeded) && !in_use {
        true => Verdict::Ready,
        false => Verdict::Wait,
    }
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
        assert_eq!(verdict(&[0, 1], &[], &phases(&p)), Verdict::Ready);
        assert_eq!(verdict(&[], &[], &phases(&p)), Verdict::Ready, "no needs: ready at once");
        let p = [Phase::Succeeded, Phase::Busy, Phase::Waiting];
        assert_eq!(verdict(&[0, 1], &[], &phases(&p)), Verdict::Wait);
        let p = [Phase::Succeeded, Phase::Waiting, Phase::Waiting];
        assert_eq!(verdict(&[0, 1], &[], &phases(&p)), Verdict::Wait);
    }

    #[test]
    fn a_stage_to_run_again_waits_while_a_stage_that_needs_it_runs() {
        // 0 is the plan sent back by 2's retry; 1 needs it too and still runs on its outputs.
        let p = [Phase::Waiting, Phase::Busy, Phase::Waiting];
        assert_eq!(verdict(&[], &[1, 2], &phases(&p)), Verdict::Wait);
        let p = [Phase::Waiting, Phase::Succeeded, Phase::Waiting];
        assert_eq!(verdict(&[], &[1, 2], &phases(&p)), Verdict::Ready, "once it is done, the plan runs again");
        let p = [Phase::Waiting, Phase::Ended(Shortfall::Failed), Phase::Waiting];
        assert_eq!(verdict(&[], &[1, 2], &phases(&p)), Verdict::Ready);
    }

    #[test]
    fn a_need_that_ended_without_outputs_blocks_and_is_named() {
        let p = [Phase::Busy, Phase::Ended(Shortfall::Failed), Phase::Ended(Shortfall::Drifted)];
        assert_eq!(verdict(&[0, 1, 2], &[], &phases(&p)), Verdict::Blocked { need: 1, because: Shortfall::Failed });
        // Blocked even while another need still runs: it can never start.
        assert_eq!(verdict(&[2, 0], &[], &phases(&p)), Verdict::Blocked { need: 2, because: Shortfall::Drifted });
        let p = [Phase::Ended(Shortfall::Skipped)];
        let Verdict::Blocked { because, .. } = verdict(&[0], &[], &phases(&p)) else { panic!() };
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
