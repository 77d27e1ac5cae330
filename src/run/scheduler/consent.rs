//! A deploy is deliberate. Before anything starts, the stages that may run are worked out as `status` does:
//! their required variables must be set, and the deploys among them must ship no uncommitted change to their
//! inputs (unless `--allow-dirty`) and, outside CI, someone must say yes (or `--yes`). A deploy that turns out to
//! be needed only later (drift found by its probe, another runner's ledger) meets the same checks when it starts:
//! one nobody consented to is not started.

use super::{Error, Scheduler};
use crate::fresh::Decision;
use crate::graph::Selected;
use crate::hash::key::Keyed;
use crate::relpath::RelPath;
use crate::run::{Consent, Deploys, ask_on_terminal};

impl Scheduler<'_, '_> {
    /// Before anything starts, for the stages that may run: every variable a stage requires (`required_env`)
    /// is set, all that is missing named at once; and a run that would deploy is deliberate ([`Self::consent`]).
    pub(super) fn preflight(&mut self, selected: &[Selected]) -> Result<(), Error> {
        let stages = &self.cx.pipeline.stages;
        let chosen = |i: usize| selected[i] == Selected::Yes;
        // `verify` and `adopt` deploy nothing.
        let deploys = !self.opts.probe_only
            && self.opts.deploys == Deploys::Run
            && (0..selected.len()).any(|i| chosen(i) && stages[i].is_deploy());
        if !deploys && !(0..selected.len()).any(|i| chosen(i) && !stages[i].required_env.is_empty()) {
            return Ok(());
        }
        if deploys {
            // Before any stage runs: what the run's own stages change later is not an uncommitted edit.
            let _ = self.uncommitted_at_start();
        }
        let force = &self.opts.force;
        let evals =
            crate::evaluate::all(self.cx, self.s, self.env.cache, selected, &|i| force.includes(&stages[i].name))?;
        let may_run: Vec<usize> = (0..evals.len())
            .filter(|&i| evals[i].as_ref().is_some_and(|e| matches!(e.decision, Decision::Run(_))))
            .collect();
        let missing: Vec<(String, String)> = may_run
            .iter()
            .flat_map(|&i| stages[i].required_env.iter().map(move |v| (i, v)))
            .filter(|(_, v)| self.env.caller_env.get(*v).is_none_or(|value| value.is_empty()))
            .map(|(i, v)| (stages[i].name.clone(), v.clone()))
            .collect();
        if !missing.is_empty() {
            return Err(Error::MissingEnv(missing));
        }
        let wrong: Vec<String> = may_run.iter().flat_map(|&i| self.wrong_tool_versions(i)).collect();
        if !wrong.is_empty() {
            return Err(Error::ToolVersions(wrong));
        }
        let deploying: Vec<(usize, Option<&Keyed>)> = may_run
            .into_iter()
            .filter(|&i| deploys && stages[i].is_deploy())
            .map(|i| (i, evals[i].as_ref().and_then(|e| e.keyed.as_ref())))
            .collect();
        match deploying.is_empty() {
            true => Ok(()),
            false => self.consent(&deploying),
        }
    }

    /// The tools of stage `i` whose version its `env` pins (`KUBEONE_VERSION` for `kubeone`, ...) and that say
    /// another version (each tool's own version command, run as the stage would find it): the CI file installs
    /// the pins, a laptop may have anything.
    fn wrong_tool_versions(&self, i: usize) -> Vec<String> {
        let stage = &self.cx.pipeline.stages[i];
        let mut wrong = Vec::new();
        if !crate::kkp::versions::VERSION_COMMANDS.iter().any(|(var, _, _)| stage.env.contains_key(*var)) {
            return wrong;
        }
        let env = crate::run::exec::stage_env(stage, self.env.caller_env, self.cx.env);
        for &(var, tool, args) in crate::kkp::versions::VERSION_COMMANDS {
            let (Some(pin), true) = (stage.env.get(var), stage.tools.iter().any(|t| t == tool)) else { continue };
            let Some(path) = self.s.tool_path(i, tool) else { continue };
            let said = std::process::Command::new(&path)
                .args(args)
                .env_clear()
                .envs(env.iter().cloned())
                .stdin(std::process::Stdio::null())
                .output()
                .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)));
            let found = said.as_deref().ok().and_then(crate::kkp::versions::first_version);
            if found.as_deref().is_none_or(|v| !crate::kkp::versions::same_version(v, pin)) {
                wrong.push(format!(
                    "stage `{}` pins {var} = \"{pin}\", but `{}` says {}",
                    stage.name,
                    path.display(),
                    found.map_or("no version".to_string(), |v| format!("version {v}"))
                ));
            }
        }
        wrong
    }

    /// The deploys that may run ship no uncommitted change to their inputs (unless `--allow-dirty`), and
    /// outside CI someone said yes. Whether the tree is dirty goes into the audit fields.
    fn consent(&mut self, deploying: &[(usize, Option<&Keyed>)]) -> Result<(), Error> {
        let (opts, stages) = (self.opts, &self.cx.pipeline.stages);
        let changed = self.uncommitted_at_start();
        self.note_dirty(&changed)?;
        if !opts.allow_dirty {
            let paths = changed.map_err(Error::CannotTellDirty)?.unwrap_or_default();
            let found: Vec<(String, String)> = deploying
                .iter()
                .flat_map(|&(i, keyed)| self.dirty_inputs(i, keyed, &paths).into_iter().map(move |p| (i, p)))
                .map(|(i, p)| (stages[i].name.clone(), p))
                .collect();
            if !found.is_empty() {
                return Err(Error::Dirty(found));
            }
        }
        let names = || deploying.iter().map(|&(i, _)| stages[i].name.clone()).collect::<Vec<_>>();
        let env = self.cx.env.to_string();
        let yes = match opts.consent {
            Consent::Given => true,
            Consent::Refused => return Err(Error::NotConfirmed { stages: names(), env, asked: false }),
            Consent::Ask => {
                let list: Vec<String> = names().iter().map(|n| format!("`{n}`")).collect();
                // On a line of its own, whatever a progress line left on the terminal.
                let q =
                    format!("\r\x1b[2Kkkpipe: this run may deploy {} to environment `{env}`. Deploy?", list.join(", "));
                ask_on_terminal(&q)
            }
        };
        if !yes {
            return Err(Error::NotConfirmed { stages: names(), env, asked: true });
        }
        self.consented.extend(deploying.iter().map(|&(i, _)| i));
        Ok(())
    }

    /// Why stage `i` may not deploy now that it is about to, if it may not: nobody consented to it (outside CI
    /// without `--yes`: it has to deploy only now, after the run asked), or its inputs have uncommitted changes.
    pub(super) fn deploy_refusal(&mut self, i: usize, keyed: &Keyed) -> Option<String> {
        let name = self.name(i);
        if self.opts.consent != Consent::Given && !self.consented.contains(&i) {
            return Some(format!(
                "not deployed: `{name}` has to deploy only now (its probe found drift, or another runner deployed), \
                 and this run did not ask about it\n  hint: pass --yes to deploy it (`kkpipe status` and `kkpipe \
                 verify` show why it must)"
            ));
        }
        let changed = self.uncommitted_at_start();
        if let Err(e) = self.note_dirty(&changed) {
            return Some(format!("not deployed: the run's record cannot be updated: {e}"));
        }
        if self.opts.allow_dirty {
            return None;
        }
        let paths = match changed {
            Err(e) => return Some(format!("not deployed: {}", Error::CannotTellDirty(e))),
            Ok(paths) => paths.unwrap_or_default(),
        };
        let dirty = self.dirty_inputs(i, Some(keyed), &paths);
        (!dirty.is_empty()).then(|| {
            let list: Vec<String> = dirty.iter().map(|p| format!("`{p}`")).collect();
            format!(
                "not deployed: `{name}` would ship uncommitted changes: {}\n  hint: commit them, or pass --allow-dirty",
                list.join(", ")
            )
        })
    }

    /// Of git's uncommitted `paths`, those that are stage `i`'s: one its input patterns take (present or
    /// deleted), or those of a check stage it needs at any depth (what a build stage renders is deployed), one
    /// with an input file below it (a submodule), and `pipeline.toml`, which says what it runs.
    fn dirty_inputs(&self, i: usize, keyed: Option<&Keyed>, paths: &[String]) -> Vec<String> {
        let walked: Vec<&RelPath> = keyed
            .map(|k| k.manifest.inputs.iter().chain(&k.manifest.global_inputs).map(|(p, _)| p).collect())
            .unwrap_or_default();
        let mut stages = vec![i];
        let mut k = 0;
        while k < stages.len() {
            for &j in &self.cx.graph.needs[stages[k]] {
                if !self.cx.pipeline.stages[j].is_deploy() && !stages.contains(&j) {
                    stages.push(j);
                }
            }
            k += 1;
        }
        paths
            .iter()
            .filter(|p| {
                *p == crate::pipeline::FILE_NAME
                    || RelPath::parse(p).is_ok_and(|rp| {
                        stages.iter().any(|&s| self.s.is_input(s, &rp))
                            || walked.iter().any(|w| w.starts_with(&rp) && **w != rp)
                    })
            })
            .cloned()
            .collect()
    }

    /// The uncommitted changes as they were when the first deploy was checked (taken then, once per run).
    fn uncommitted_at_start(&mut self) -> Result<Option<Vec<String>>, String> {
        let (root, untracked) = (&self.cx.pipeline.root, !self.opts.in_ci);
        self.uncommitted_at_start.get_or_insert_with(|| crate::audit::uncommitted(root, untracked)).clone()
    }

    /// Whether the tree is dirty, into the audit fields of the run and of every ledger record from now on.
    fn note_dirty(&mut self, changed: &Result<Option<Vec<String>>, String>) -> Result<(), Error> {
        self.audit.dirty = match changed {
            Ok(c) => c.as_ref().map(|c| !c.is_empty()),
            Err(_) => None,
        };
        self.env.cache.set_run_audit(self.run_id, &self.audit)?;
        if let Some(remote) = self.remote() {
            remote.set_audit(self.audit.clone());
        }
        Ok(())
    }
}
