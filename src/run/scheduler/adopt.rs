//! Adoption: a deploy stage that would deploy with no record of its own here (a repository adopting kkpipe, a
//! CI cache evicted after a quiet week) first asks its probe whether the live system already matches its
//! inputs. In sync, it is recorded as `adopted` with the current key, its outputs made by their `regenerate`
//! commands where missing, and nothing is applied; drifted, it deploys (`run`) or is reported drifted
//! (`kkpipe adopt`, which never deploys).

use super::{Done, Ended, Error, Job, Scheduler, Slot};
use crate::cache::outputs;
use crate::fresh::{Reason, State};
use crate::hash::key::Keyed;
use crate::report::{Event, Notice, StageEnd};
use crate::run::{Deploys, exec::Exit};
use std::time::Duration;

impl Scheduler<'_, '_> {
    /// Whether stage `i`, about to run for `reason` with its lease held, is probed for adoption instead: in
    /// `run`, a deploy stage with a probe and no record in this environment; in `adopt`, every deploy stage.
    pub(super) fn adoptable(&self, i: usize, reason: &Reason) -> bool {
        let stage = &self.cx.pipeline.stages[i];
        stage.is_deploy()
            && match self.opts.deploys {
                Deploys::Run => stage.adopt && stage.verify.is_some() && matches!(reason, Reason::NeverDeployed { .. }),
                Deploys::Adopt { .. } => true,
            }
    }

    pub(super) fn adopt(&mut self, i: usize, keyed: Keyed, reason: Reason) -> Result<(), Error> {
        let stage = self.cx.pipeline.stages[i].clone();
        match (stage.verify, self.opts.deploys) {
            (Some(_), _) if !stage.adopt => {
                let why = "`adopt = false`: its probe cannot see all that its inputs say";
                self.cannot_adopt(i, keyed, reason, why.into())
            }
            (Some(probe), _) => {
                self.sink.event(&Event::Probing { stage: stage.name });
                self.spawn(i, probe, Job::Adopt { reason, regenerating: false }, keyed, Vec::new())
            }
            (None, Deploys::Adopt { assume_deployed: true }) => {
                let message = format!(
                    "`{}` has no `verify` probe: adopted as deployed on your word (--assume-deployed); nothing checked \
                     that the live system matches its inputs",
                    stage.name
                );
                self.sink.event(&Event::Warning { message });
                self.adopt_outputs(i, keyed, reason)
            }
            (None, _) => {
                let why = "it has no `verify` probe to tell (pass --assume-deployed to adopt it anyway)";
                self.cannot_adopt(i, keyed, reason, why.into())
            }
        }
    }

    /// In sync: make every declared output again with its `regenerate` command (one on disk may be an older
    /// deploy's, or a regeneration cut short: only what the live system says now is recorded), then record. An
    /// output without one has no source but a deploy.
    fn adopt_outputs(&mut self, i: usize, keyed: Keyed, reason: Reason) -> Result<(), Error> {
        let stage = self.cx.pipeline.stages[i].clone();
        let Some(script) = super::transition::script_of(stage.outputs.iter().map(|o| o.regenerate.as_deref())) else {
            let o = stage.outputs.iter().find(|o| o.regenerate.is_none()).expect("one has none");
            let why = format!("its output `{}` has no `regenerate` command: only a deploy makes it", o.path);
            return self.cannot_adopt(i, keyed, reason, why);
        };
        if stage.outputs.is_empty() {
            return self.record_adopted(i, keyed, reason);
        }
        let outputs = stage.outputs.iter().map(|o| o.path.display()).collect();
        self.sink.event(&Event::Notice(Notice::Adopting { stage: stage.name.clone(), outputs }));
        self.spawn(i, script, Job::Adopt { reason, regenerating: true }, keyed, Vec::new())
    }

    /// The adoption probe (or its regeneration) of stage `i` ended.
    pub(super) fn adopt_exited(
        &mut self,
        i: usize,
        keyed: Keyed,
        reason: Reason,
        regenerating: bool,
        exit: Exit,
    ) -> Result<(), Error> {
        if self.interrupt.signal().is_some() {
            self.skip(i, "run interrupted".into());
            return Ok(());
        }
        if exit.success() {
            self.workspace_changed |= regenerating;
            return match regenerating {
                true => self.record_adopted(i, keyed, reason),
                false => self.adopt_outputs(i, keyed, reason),
            };
        }
        if regenerating {
            return self.cannot_adopt(i, keyed, reason, "the `regenerate` command of its outputs failed".into());
        }
        // Not kept as drift: an adoption probe compares the live system with inputs never deployed.
        let (output, _) = self.report_drift(i, &exit);
        match self.opts.deploys {
            // Drift is no reason to adopt: it deploys as any stale deploy does (its lease, fail-fast, consent).
            Deploys::Run => self.launch_stage(i, keyed, Reason::Drift { output }),
            Deploys::Adopt { .. } => {
                self.slots[i] = Slot::Done(Done::Drifted { key: keyed.key, output });
                Ok(())
            }
        }
    }

    /// Not adopted: `run` deploys after all (saying why); `adopt` leaves it, and its dependents, alone.
    fn cannot_adopt(&mut self, i: usize, keyed: Keyed, reason: Reason, why: String) -> Result<(), Error> {
        match self.opts.deploys {
            Deploys::Run => {
                let message = format!("`{}` is not adopted: {why}; deploying it", self.name(i));
                self.sink.event(&Event::Warning { message });
                self.launch(i, keyed, reason, false)
            }
            Deploys::Adopt { .. } => {
                self.skip(i, format!("not adopted: {why}"));
                Ok(())
            }
        }
    }

    /// Record stage `i` as adopted with its current key and outputs, locally and on the shared ledger.
    fn record_adopted(&mut self, i: usize, keyed: Keyed, reason: Reason) -> Result<(), Error> {
        // What the probe compared the live system with must still be the inputs: else decide again.
        if let Some(why) = self.changed_while_running(i, &keyed) {
            if std::mem::replace(&mut self.second_chances[i].adopted_again, true) {
                let why = format!("{why} (its probe), twice: something writes into its inputs");
                return self.cannot_adopt(i, keyed, reason, why);
            }
            let message = format!("`{}`: {why} (its probe); deciding again", self.name(i));
            self.sink.event(&Event::Warning { message });
            self.workspace_changed = true;
            self.slots[i] = Slot::waiting();
            return Ok(());
        }
        let stage = &self.cx.pipeline.stages[i];
        let outs = match outputs::collect(&self.cx.pipeline.root, &stage.outputs, &self.env.cache.blobs) {
            Ok(outs) => outs,
            Err(e) => return self.cannot_adopt(i, keyed, reason, e.to_string()),
        };
        for o in &outs {
            self.mask_output(o);
        }
        let row = self.env.cache.start_stage(self.run_id, &stage.name, self.cx.env, &keyed.manifest, &reason)?;
        let ended = Ended { row, duration: Duration::ZERO, code: Some(0), log: Vec::new(), outputs: outs.clone() };
        self.conclude(i, &keyed, State::Adopted, ended, StageEnd::Adopted)?;
        self.slots[i] = Slot::Done(Done::Adopted { outputs: outs, key: keyed.key });
        Ok(())
    }
}
