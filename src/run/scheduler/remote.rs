//! The scheduler and the shared remote: before a stage that must run starts, a check stage asks for another
//! runner's result with its inputs and a deploy stage takes its deploy lease, each as a job that answers by
//! message (`Msg::LookedUp`, `Msg::LeaseHeld`, `Msg::Leased`) while every other stage goes on; after a stage
//! ends, its success is shared and a deploy's attempt recorded on the shared ledger. In a run without a remote,
//! each of these returns at once.

use super::{Acting, Done, Error, Msg, Queued, Scheduler, Slot};
use crate::evaluate;
use crate::fresh::{Decision, OutputRecord, Reason, State};
use crate::hash::key::{Key, Keyed};
use crate::remote::{LeaseGuard, Pulled};
use crate::report::{Event, Notice};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A stage's question to the remote, with what it goes on with when the answer comes.
pub(super) struct Asking {
    /// The job that asks it (a message of a job the stage no longer waits for is never taken for this one's).
    pub(super) job: usize,
    pub(super) keyed: Keyed,
    pub(super) reason: Reason,
    pub(super) wait: Wait,
}

pub(super) enum Wait {
    /// A deploy stage's lease.
    Lease {
        resume: Resume,
        /// Another runner held the lease: what it did is learned and the stage decided on again.
        waited: bool,
    },
    /// A check stage's result with these inputs, made by another runner.
    Lookup,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Resume {
    /// Decide again, with what the shared ledger says now.
    Decide,
    /// Run the stage (the decision to run was made after the ledger was read), unless another runner held the
    /// lease meanwhile: then decide again, as it may have deployed.
    Launch,
    /// As `Launch`, for a stage that must run whatever its record says (a retry, a need a retry sent back,
    /// `--force`): sent back to wait meanwhile, it still must.
    Forced,
}

/// How taking a deploy lease went.
pub(super) enum Taken {
    Go,
    /// The wait is a job now: the stage goes on when it reports (`Msg::Leased`).
    Pending,
    Stop,
}

/// What asking the remote changed.
pub(super) enum Asked {
    /// Nothing: act on the decision as it is.
    Keep,
    /// The local cache learned something: decide again.
    Again,
    /// The stage cannot go on (its deploy lease, a read-only remote); it is done.
    Done,
}

impl<'a> Scheduler<'a, '_> {
    /// Deploy stages read the shared ledger before anything is decided (all at once).
    pub(super) fn learn_ledger(&mut self, chosen: &[usize]) {
        let Some(remote) = self.remote() else { return };
        let deploys: Vec<&crate::pipeline::Stage> =
            chosen.iter().map(|&i| &self.cx.pipeline.stages[i]).filter(|s| s.is_deploy()).collect();
        if !deploys.is_empty() {
            remote.learn_ledger(self.env.cache, &deploys, self.cx.env);
        }
        self.ledger_read = Instant::now();
        self.remote_warnings();
    }

    pub(super) fn remote_warnings(&mut self) {
        if let Some(remote) = self.remote() {
            let url = remote.url.clone();
            for stage in remote.take_published() {
                self.sink.event(&Event::Notice(Notice::Published { stage, remote: url.clone() }));
            }
            for w in remote.take_warnings() {
                self.sink.event(&Event::Warning { message: w });
            }
        }
    }

    /// A stage that must run asks the remote first. A check stage: did another runner make this key (then
    /// it is in the local cache now)? A deploy stage: take its deploy lease, so no other runner deploys it
    /// in this environment meanwhile, and learn the shared ledger again: the runner we waited for may have
    /// deployed the same key.
    pub(super) fn ask_remote(&mut self, i: usize, step: &evaluate::Step, forced: bool) -> Asked {
        if self.env.remote.is_none() {
            return Asked::Keep;
        }
        let evaluate::Step::Decided(keyed, Decision::Run(reason)) = step else { return Asked::Keep };
        if self.opts.probe_only {
            return Asked::Keep;
        }
        let stage = &self.cx.pipeline.stages[i];
        let asked = if !stage.is_deploy() {
            match forced {
                true => Asked::Keep,
                false => {
                    self.look_up(i, keyed, reason);
                    Asked::Done
                }
            }
        } else {
            // One that must run whatever its record says (a retry, `--force`) goes on for its own reason when the
            // lease is free at once; after a wait it is decided again, as another runner may have deployed.
            let resume = if forced { Resume::Forced } else { Resume::Decide };
            match self.take_lease(i, keyed, reason, resume) {
                Taken::Go => Asked::Again,
                Taken::Pending | Taken::Stop => Asked::Done,
            }
        };
        self.remote_warnings();
        asked
    }

    /// Before deploy stage `i` runs with a remote: hold its deploy lease. Taking it is a job (another runner's
    /// lease is waited for, up to `--lock-timeout`, on a thread of its own): `Pending` until it reports. If the
    /// stage may not go on it is done, and why was shown.
    pub(super) fn take_lease(&mut self, i: usize, keyed: &Keyed, reason: &Reason, resume: Resume) -> Taken {
        let Some(remote) = self.env.remote.clone() else { return Taken::Go };
        if let Slot::Deciding(acting) = &mut self.slots[i] {
            match &acting.lease {
                // Another runner took it over while this one went on: take it again.
                Some(lease) if lease.lost() => acting.lease = None,
                Some(_) => return Taken::Go,
                None => {}
            }
        }
        if !remote.writable() {
            let detail = format!(
                "not deployed: the remote `{}` is read-only ({}), so this deploy would run without the shared \
                 deploy lease and ledger\n  hint: set {} (trusted jobs only), or pass `--remote off` to deploy \
                 without them",
                remote.url,
                remote.why,
                crate::remote::SIGNING_KEY_VAR
            );
            self.not_started(i, Some(keyed.key), reason.clone(), detail);
            return Taken::Stop;
        }
        let (name, env, timeout) = (self.name(i), self.cx.env.to_string(), self.opts.lock_timeout);
        let (interrupt, cancel) = (self.interrupt.clone(), self.cancel.clone());
        let reviews = self.reviews_to_fetch(i);
        let wait = Wait::Lease { resume, waited: false };
        self.ask(i, (keyed, reason, wait), "lease", move |job, tx| {
            let mut waiting = |holder: &str| {
                let _ = tx.send(Msg::LeaseHeld { job, holder: holder.to_string() });
            };
            let stop = || interrupt.signal().is_some() || cancel.load(Ordering::Relaxed);
            let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let lease = remote.acquire(&name, &env, timeout, &mut waiting, &stop)?;
                // With the lease held, what the plans it applies were reviewed as (docs/review.md).
                fetch_reviews(&remote, &env, &reviews);
                Ok(lease)
            }));
            let result = waited.unwrap_or_else(|_| {
                Err(crate::remote::LeaseError::Refused {
                    url: remote.url.clone(),
                    stage: name.clone(),
                    env: env.clone(),
                    why: "the wait for the lease failed (an internal error)".into(),
                })
            });
            Msg::Leased { job, result }
        });
        Taken::Pending
    }

    /// The lease wait of stage `i` is over: learn what the shared ledger says now (the runner that held the lease
    /// may have deployed), then go on at once, in the place under `-j` the wait held: run, or decide again. A
    /// store that did not answer was warned about and the deploy goes on under the local run lock, as without a
    /// remote.
    pub(super) fn leased(
        &mut self,
        i: usize,
        l: Asking,
        result: Result<LeaseGuard, crate::remote::LeaseError>,
    ) -> Result<(), Error> {
        self.remote_warnings();
        if let Some(why) = self.stopping_now() {
            drop(result);
            self.skip(i, why);
            return Ok(());
        }
        let lease = match result {
            Ok(lease) => lease,
            Err(e) => {
                use crate::remote::LeaseError::{Held, LostSight, Unreachable};
                self.locked_out |= matches!(e, Held { .. } | LostSight { .. } | Unreachable { .. });
                self.not_started(i, Some(l.keyed.key), l.reason, e.to_string());
                return Ok(());
            }
        };
        let Wait::Lease { resume, waited } = l.wait else { unreachable!("a lookup takes no lease") };
        // A stage that must run still must, unless another runner held the lease: it may have deployed.
        let must_run = (resume == Resume::Forced && !waited).then(|| l.reason.clone());
        self.slots[i] = Slot::Deciding(Acting { lease: Some(lease), must_run });
        if let Some(remote) = self.remote() {
            remote.learn_ledger(self.env.cache, &[&self.cx.pipeline.stages[i]], self.cx.env);
            self.remote_warnings();
        }
        // What it needs may have been sent back meanwhile (a retry of its needs): wait for them again.
        if !self.ready(i) {
            self.back_to_wait(i, false);
            return Ok(());
        }
        match (resume, waited) {
            (Resume::Launch | Resume::Forced, false) => self.launch_stage(i, l.keyed, l.reason),
            (Resume::Decide, _) | (_, true) => self.start(i, Queued::default(), true),
        }
    }

    /// Ask the remote for check stage `i`'s result with these inputs, as a job: the entry, its blobs downloaded
    /// and verified into the local blob store; the answer comes as `Msg::LookedUp`.
    pub(super) fn look_up(&mut self, i: usize, keyed: &Keyed, reason: &Reason) {
        let Some(remote) = self.env.remote.clone() else { return };
        let (stage, key, blobs) = (self.cx.pipeline.stages[i].clone(), keyed.key, self.env.cache.blobs.clone());
        self.ask(i, (keyed, reason, Wait::Lookup), "lookup", move |job, _| {
            let fetched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| remote.fetch(&blobs, &stage, &key)));
            Msg::LookedUp { job, found: fetched.ok().flatten() }
        });
    }

    /// Put stage `i`'s question to the remote on a thread of its own (`work` may send messages on the way); its
    /// answer, the message `work` returns, is sent however the work ends: the scheduler waits for every job.
    pub(super) fn ask(
        &mut self,
        i: usize,
        (keyed, reason, wait): (&Keyed, &Reason, Wait),
        what: &str,
        work: impl FnOnce(usize, &mpsc::Sender<Msg>) -> Msg + Send + 'static,
    ) {
        let job = self.new_job(i);
        let asking = Asking { job, keyed: keyed.clone(), reason: reason.clone(), wait };
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name(format!("{what}-{job}"))
            .spawn(move || {
                let answer = work(job, &tx);
                let _ = tx.send(answer);
            })
            .expect("spawn a job thread");
        self.slots[i] = Slot::Asking(Box::new(asking));
    }

    /// The question of job `job` was answered: its stage, and what it asked, if it still waits for the answer.
    pub(super) fn answered(&mut self, job: usize) -> Option<(usize, Asking)> {
        let i = self.jobs.remove(&job)?;
        if !matches!(&self.slots[i], Slot::Asking(a) if a.job == job) {
            return None;
        }
        match std::mem::replace(&mut self.slots[i], Slot::Deciding(Acting::default())) {
            Slot::Asking(a) => Some((i, *a)),
            _ => None,
        }
    }

    /// Check stage `i`'s lookup is over: what another runner made is learned into the cache and the stage
    /// decided again (fresh now); otherwise it runs, in the place under `-j` the lookup held.
    pub(super) fn looked_up(
        &mut self,
        i: usize,
        a: Asking,
        found: Option<crate::remote::Fetched>,
    ) -> Result<(), Error> {
        self.remote_warnings();
        if let Some(why) = self.stopping_now() {
            self.skip(i, why);
            return Ok(());
        }
        let stage = &self.cx.pipeline.stages[i];
        let learned = match (self.remote(), found) {
            (Some(remote), Some(f)) => remote.learn_fetched(self.env.cache, stage, self.cx.env, f) == Pulled::Imported,
            _ => false,
        };
        self.remote_warnings();
        // A need sent back meanwhile: decided again once it has run (what was learned stays in the cache).
        if !self.ready(i) {
            self.back_to_wait(i, false);
            return Ok(());
        }
        if !learned {
            return self.launch_stage(i, a.keyed, a.reason);
        }
        if let Some(remote) = self.remote() {
            let hit = Notice::RemoteHit { stage: stage.name.clone(), remote: remote.url.clone() };
            self.sink.event(&Event::Notice(hit));
        }
        self.start(i, Queued::default(), false)
    }

    /// Tell the remote how a stage run ended: a success is shared (blobs, then the entry); a deploy's
    /// attempt goes into the shared ledger, and its lease is released.
    pub(super) fn share(
        &mut self,
        i: usize,
        keyed: &Keyed,
        state: State,
        outputs: &[OutputRecord],
        duration: Duration,
    ) {
        let Some(remote) = self.remote() else { return };
        let stage = &self.cx.pipeline.stages[i];
        let manifest = keyed.manifest.encode();
        let ms = duration.as_millis() as i64;
        if !stage.is_deploy() {
            if state == State::Success {
                remote.publish(self.env.cache, stage, &keyed.key, &manifest, outputs, ms);
            }
        } else {
            remote.record(self.env.cache, stage, self.cx.env, &keyed.key, &manifest, Some((state, outputs, ms)));
        }
        let lease = match &mut self.slots[i] {
            Slot::Deciding(acting) => acting.lease.take(),
            _ => None,
        };
        if lease.is_some_and(|l| l.lost()) {
            self.sink.event(&Event::Warning {
                message: format!(
                    "the deploy lease of `{}` in `{}` could not be renewed in time and another runner took it over: it \
                 may have deployed at the same time (check `kkpipe remote status`)",
                    stage.name, self.cx.env
                ),
            });
        }
        self.remote_warnings();
    }

    /// The plan stages deploy `i` applies, with what they worked on and where their review goes for
    /// `plan-check --reviewed`.
    pub(super) fn reviews_to_fetch(&self, i: usize) -> Vec<(String, Key, std::path::PathBuf)> {
        let done = |j: usize| match &self.slots[j] {
            Slot::Done(Done::Fresh { content, .. } | Done::Ran { content, .. }) => *content,
            _ => None,
        };
        let applied = self.plans_applied_by(i).into_iter();
        applied.filter_map(|j| Some((self.name(j), done(j)?, self.review_file(&self.name(j))))).collect()
    }
}

/// Write each plan stage's review where `plan-check --reviewed` reads it, or remove what an earlier run left
/// there when the remote has none (runs on the lease's job thread).
fn fetch_reviews(remote: &crate::remote::Remote, env: &str, reviews: &[(String, Key, std::path::PathBuf)]) {
    for (stage, content, file) in reviews {
        let review = remote.review(env, stage, content);
        // Whole or not at all: two deploys applying the same plan fetch it at once.
        let written = review.map(|r| {
            let dir = file.parent().expect("a file in a directory");
            std::fs::create_dir_all(dir)?;
            let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
            std::io::Write::write_all(&mut tmp, &serde_json::to_vec_pretty(&r).expect("serialisable"))?;
            tmp.persist(file).map(drop).map_err(|e| e.error)
        });
        if !matches!(written, Some(Ok(()))) {
            let _ = std::fs::remove_file(file);
        }
    }
}
