//! The scheduler.
//!
//! One thread (the caller's) owns all state: it asks the queue (`queue.rs`) which stage may start, makes its
//! manifest when its needs are done (their outputs are part of it), asks [`fresh::decide`] what to do,
//! restores or probes fresh stages, and starts stale ones as jobs on threads of their own, bounded by `-j`.
//! Anything slow is a job that reports back by message (`run::Msg`): a stage's process, a wait for a deploy
//! lease, a lookup on the remote. A failed stage is an outcome, not an error: its dependents are skipped,
//! independent stages go on. If the scheduler itself fails or panics, the running stages are stopped (see
//! [`Scheduler`]'s `Drop`). What it does with the shared remote (lookups, deploy leases, sharing) is in
//! `remote.rs`; adoption and consent, its two policies, in `adopt.rs` and `consent.rs`.

mod adopt;
mod consent;
mod remote;

use super::exec::{self, Exit};
use super::queue::{self, Phase, Shortfall, Verdict};
use super::transition::{self, AfterCommand, AfterHit, AfterProbe, AfterRegenerateFailed, CommandEnd};
use super::watchdog;
use super::{Env, Error, Msg, Options, Outcome};
use crate::cache::outputs::{self, NotRestored};
use crate::cache::{End, RunCounts, RunMeta, RunOutcome};
use crate::evaluate::{self, Context};
use crate::fresh::{self, Decision, Hit, OutputRecord, Present, Reason, State};
use crate::graph::Selected;
use crate::hash::key::{Key, Keyed};
use crate::remote::LeaseGuard;
use crate::report::{Event, Notice, Sink, StageEnd, StageRow, StageState, Summary};
use crate::session::Session;
use remote::{Asked, Asking, Resume, Taken, Wait};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

/// How long the ledger read at the start of a run stands for the deploys decided after it.
const LEDGER_FRESH_FOR: Duration = Duration::from_secs(1);

/// What a job is doing, with what it needs when it ends.
enum Job {
    /// The stage's own command; `row` is its `running` stage run.
    Stage { row: i64, reason: Reason },
    /// A deploy stage's drift probe on a hit.
    Probe { hit: Hit },
    /// Recreating outputs that are in no cache.
    Regenerate { hit: Hit },
    /// A deploy stage that would deploy without a record here: its probe (`regenerating`: then the `regenerate`
    /// commands of its outputs that are missing) decides whether it is adopted instead (`reason`: why it would run).
    Adopt { reason: Reason, regenerating: bool },
}

struct Active {
    /// Its job: a message of another job of the stage (one it no longer waits for) is never taken for this one's.
    job: usize,
    started: Instant,
    pgid: Option<i32>,
    /// What the job does (a command, a probe, a regeneration, an adoption).
    work: Job,
    keyed: Keyed,
    /// Outputs already put back from the store before a probe or regeneration started.
    restored: Vec<String>,
    /// A signal asked us to stop while this job ran: even a clean exit is then an interrupted run.
    signalled: bool,
    /// A deploy's lease, held through its probe, regeneration or command until its end is recorded.
    lease: Option<LeaseGuard>,
}

#[derive(Clone)]
enum Done {
    Fresh {
        outputs: Vec<OutputRecord>,
        /// Its drift probe ran and found the live system in sync.
        verified: bool,
        /// Recorded outputs that are in no cache (see `Hit::unavailable`).
        unavailable: Vec<OutputRecord>,
        restored: Vec<String>,
        recorded_ms: i64,
        saved_ms: i64,
        key: Key,
        /// A plan stage's (one with a `plan_policy`) `Manifest::content_key`: its review is found by it.
        content: Option<Key>,
    },
    Ran {
        outputs: Vec<OutputRecord>,
        duration: Duration,
        key: Key,
        content: Option<Key>,
        reason: Reason,
    },
    Failed {
        duration: Duration,
        key: Option<Key>,
        reason: Reason,
        /// How it failed (an exit code and the stage's failure note, or why it did not start).
        detail: String,
    },
    Skipped(String),
    Interrupted {
        key: Key,
        reason: Reason,
    },
    /// `verify`: stale, so there is no apply to compare the live system with.
    NotVerified {
        key: Key,
        reason: Reason,
    },
    /// `verify`: the probe found drift.
    Drifted {
        key: Key,
        output: String,
    },
    /// Not run: the live system already matched its inputs, and that is now its record.
    Adopted {
        outputs: Vec<OutputRecord>,
        key: Key,
    },
}

/// Where a stage of this run is. A deploy lease lives in the two places a deploy can hold one, so a stage that
/// waits behind others or is done cannot hold one.
enum Slot {
    Idle,
    Waiting(Queued),
    /// The scheduler is acting on it now (deciding, restoring, recording how a job ended): never seen between two
    /// messages, as each path ends in another state.
    Deciding(Acting),
    Active(Box<Active>),
    /// A stage that must run, waiting for the remote on a job thread of its own (its deploy lease, or a lookup
    /// of its result): every stage that does not need it goes on meanwhile.
    Asking(Box<Asking>),
    Done(Done),
}

/// What the scheduler holds of a stage it acts on now.
#[derive(Default)]
struct Acting {
    /// Its deploy lease, if it holds one.
    lease: Option<LeaseGuard>,
    /// Why it must run whatever its record says (a retry, a need a retry sent back): sent back to wait for its
    /// needs meanwhile, it still must.
    must_run: Option<Reason>,
}

/// Each retry a stage gets once per run, used or not. Kept apart from its [`Slot`], which a retry replaces.
#[derive(Clone, Copy, Default)]
struct SecondChances {
    /// `retry_needs_if` sent its needs back.
    needs_sent_back: bool,
    /// Its `regenerate` commands failed and it waited for its needs' outputs.
    regenerated_after_needs: bool,
    /// Its inputs moved during its adoption probe: the next time, it is not adopted.
    adopted_again: bool,
}

/// What a waiting stage does when it starts.
#[derive(Default)]
struct Queued {
    /// Run whatever its history says (a replan asked by a stage that needs it).
    must_run: Option<Reason>,
    /// A stage that needs it runs: make its outputs that are in no cache (regenerate them, or run).
    materialize: bool,
}

impl Slot {
    fn waiting() -> Slot {
        Slot::Waiting(Queued::default())
    }
}

struct Scheduler<'a, 's> {
    cx: Context<'a>,
    s: &'a mut Session<'s>,
    env: &'a Env<'a>,
    opts: &'a Options,
    sink: &'a mut dyn Sink,
    slots: Vec<Slot>,
    run_id: i64,
    jobs: HashMap<usize, usize>,
    tx: mpsc::Sender<Msg>,
    /// A stage ran or outputs were restored: inputs must be walked again before the next manifest.
    workspace_changed: bool,
    /// What each stage used up of its one second chance in this run.
    second_chances: Vec<SecondChances>,
    /// The stages a retry sent back to run again, until they have (see `queue::again_verdict`).
    again: Vec<usize>,
    stopping: Option<String>,

    /// Set when the scheduler goes away: lease waits still running stop.
    cancel: Arc<AtomicBool>,
    interrupt: super::Interrupt,
    /// A deploy did not start because another runner held its lease for longer than `--lock-timeout`.
    locked_out: bool,
    /// When the deploy stages' shared ledger was read: a deploy decided later than a moment after that reads
    /// its record again, so it never acts on what another runner did minutes ago.
    ledger_read: Instant,
    /// This run's audit fields (`dirty` is known once a deploy is).
    audit: crate::fresh::Audit,
    /// The deploy stages someone consented to before the run (outside CI without `--yes`): no other deploys.
    consented: HashSet<usize>,
    /// `git status` when the first deploy was checked: a path a stage of this run changed since is the
    /// pipeline's doing (terraform's lock file), not an uncommitted edit.
    uncommitted_at_start: Option<Result<Option<Vec<String>>, String>>,
}

/// Run the selected stages. The caller holds the run lock.
pub(crate) fn run(
    cx: Context<'_>,
    s: &mut Session<'_>,
    env: &Env<'_>,
    opts: &Options,
    sink: &mut dyn Sink,
    interrupt: &super::Interrupt,
) -> Result<Outcome, Error> {
    let start = Instant::now();
    let selected = cx.select(&opts.targets)?;
    let chosen: Vec<usize> = (0..selected.len()).filter(|&i| selected[i] == Selected::Yes).collect();
    env.cache.mark_interrupted_leftovers()?;
    env.cache.blobs.clean_tmp();
    s.walk(&chosen)?;
    for w in s.take_warnings() {
        sink.event(&Event::Warning { message: w });
    }
    let meta = run_meta(cx, env, opts);
    let audit = meta.audit.clone();
    let run_id = env.cache.begin_run(&meta)?;
    let (tx, rx) = mpsc::channel();
    let slots =
        (0..selected.len()).map(|i| if selected[i] == Selected::Yes { Slot::waiting() } else { Slot::Idle }).collect();
    let mut sch = Scheduler {
        cx,
        s,
        env,
        opts,
        sink,
        slots,
        run_id,
        jobs: HashMap::new(),
        tx,
        workspace_changed: false,
        second_chances: vec![SecondChances::default(); cx.pipeline.stages.len()],
        again: Vec::new(),
        stopping: None,
        cancel: Arc::new(AtomicBool::new(false)),
        interrupt: interrupt.clone(),
        locked_out: false,
        ledger_read: Instant::now(),
        audit,
        consented: HashSet::new(),
        uncommitted_at_start: None,
    };
    if let Some(remote) = sch.remote() {
        remote.set_audit(sch.audit.clone());
    }
    sch.learn_ledger(&chosen);
    if let Err(e) = sch.preflight(&selected) {
        // Nothing was started: the run is over, not left "running".
        let _ = sch.env.cache.finish_run(run_id, RunOutcome::Failed, &RunCounts::default());
        return Err(e);
    }
    let interrupted = sch.drive(&rx, interrupt)?;
    sch.finish(&selected, start, interrupted)
}

/// What a run records about itself: the command, the CI event, the commit and the audit fields.
fn run_meta(cx: Context<'_>, env: &Env<'_>, opts: &Options) -> RunMeta {
    let provider = crate::ci::detect(&|k| env.caller_env.get(k).cloned());
    RunMeta {
        command: match (opts.probe_only, opts.deploys) {
            (true, _) => "verify",
            (false, super::Deploys::Adopt { .. }) => "adopt",
            (false, super::Deploys::Run) => "run",
        }
        .into(),
        event: cx.event.map(|e| e.name.as_str().to_string()),
        branch: cx.event.and_then(|e| e.branch.clone()),
        env: cx.env.to_string(),
        git_commit: crate::audit::git_head(&cx.pipeline.root),
        audit: crate::audit::of(&cx.pipeline.root, provider, env.caller_env),
    }
}

impl Drop for Scheduler<'_, '_> {
    /// On an internal error or a panic, no stage may keep running on its own: stop them all. Their rows stay
    /// `running` and are marked interrupted by the next run (or below, on an error).
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        // Nothing a stage started outlives the run: orphans whose stage could not be told are stopped now.
        watchdog::stop_orphans();
        let active: Vec<(Option<i32>, Option<i64>)> = self
            .slots
            .iter()
            .filter_map(|s| match s {
                Slot::Active(a) => Some((a.pgid, if let Job::Stage { row, .. } = a.work { Some(row) } else { None })),
                _ => None,
            })
            .collect();
        if active.is_empty() {
            return;
        }
        for (pgid, _) in &active {
            if let Some(pgid) = pgid {
                exec::signal_group(*pgid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        for (_, row) in active {
            if let Some(row) = row {
                let _ = self.env.cache.finish_stage(row, State::Interrupted, &End::empty());
            }
        }
    }
}

impl<'a> Scheduler<'a, '_> {
    fn name(&self, i: usize) -> String {
        self.cx.pipeline.stages[i].name.clone()
    }

    /// The remote, borrowed for the whole run rather than from `self`.
    fn remote(&self) -> Option<&'a crate::remote::Remote> {
        self.env.remote.as_deref()
    }

    /// Stage `j` as the queue sees it. A job (a process, a lease wait, a lookup) holds its stage's place under
    /// `-j`: a lease is then never held by a stage queued behind others.
    fn phase(&self, j: usize) -> Phase {
        match &self.slots[j] {
            Slot::Idle => Phase::NotSelected,
            Slot::Waiting(_) => Phase::Waiting,
            Slot::Deciding(_) | Slot::Active(_) | Slot::Asking(_) => Phase::Busy,
            Slot::Done(Done::Fresh { .. } | Done::Ran { .. } | Done::Adopted { .. }) => Phase::Succeeded,
            Slot::Done(Done::Failed { .. }) => Phase::Ended(Shortfall::Failed),
            Slot::Done(Done::Interrupted { .. }) => Phase::Ended(Shortfall::Interrupted),
            Slot::Done(Done::NotVerified { .. }) => Phase::Ended(Shortfall::Stale),
            Slot::Done(Done::Drifted { .. }) => Phase::Ended(Shortfall::Drifted),
            Slot::Done(Done::Skipped(_)) => Phase::Ended(Shortfall::Skipped),
        }
    }

    /// Record the run's end, persist what was learned, report.
    fn finish(self, selected: &[Selected], start: Instant, interrupted: Option<i32>) -> Result<Outcome, Error> {
        for w in self.s.take_warnings() {
            self.sink.event(&Event::Warning { message: w });
        }
        let (rows, mut summary) = self.rows(selected);
        summary.duration_ms = start.elapsed().as_millis() as u64;
        // Drift deployed again is repaired; drift left as it is (verify, `on_drift = "fail"`) fails the run.
        let drift_left = summary.drifted - summary.drift_applied;
        let failed = summary.failed > 0 || drift_left > 0 || interrupted.is_some();
        let counts = RunCounts {
            ran: summary.ran as i64,
            // An adopted stage is fresh with its key, as far as the run's counts go.
            fresh: (summary.fresh + summary.adopted) as i64,
            restored: summary.restored as i64,
            failed: (summary.failed + drift_left) as i64,
            skipped: summary.skipped as i64,
            saved_ms: summary.saved_ms as i64,
        };
        let outcome = match (interrupted, failed) {
            (Some(_), _) => RunOutcome::Interrupted,
            (None, true) => RunOutcome::Failed,
            (None, false) => RunOutcome::Ok,
        };
        let cache = self.env.cache;
        cache.finish_run(self.run_id, outcome, &counts)?;
        self.s.persist_stat_cache(cache);
        if let Err(e) = cache.auto_gc(&self.cx.pipeline.root) {
            self.sink.event(&Event::Warning { message: format!("automatic cache gc failed: {e}") });
        }
        self.sink.event(&Event::Summary(summary.clone()));
        self.sink.event(&Event::Report { stages: rows.clone(), summary: summary.clone() });
        let locked_out = self.locked_out;
        Ok(Outcome { rows, summary, failed, interrupted, locked_out })
    }

    fn drive(&mut self, rx: &mpsc::Receiver<Msg>, interrupt: &super::Interrupt) -> Result<Option<i32>, Error> {
        let mut signalled: Option<(i32, Instant)> = None;
        let mut killed = false;
        loop {
            if let Some(sig) = interrupt.signal()
                && signalled.is_none()
            {
                signalled = Some((sig, Instant::now()));
                self.stop_for_signal(sig);
            }
            if let Some((_, at)) = signalled
                && !killed
                && at.elapsed() > self.opts.stop_grace
            {
                self.signal_all(nix::sys::signal::Signal::SIGKILL);
                killed = true;
            }
            if self.stopping.is_none() {
                self.start_ready()?;
            }
            if self.jobs.is_empty() {
                break;
            }
            let running: Vec<(String, Duration)> = (0..self.slots.len())
                .filter_map(|i| match &self.slots[i] {
                    Slot::Active(a) => Some((self.name(i), a.started.elapsed())),
                    _ => None,
                })
                .collect();
            self.sink.tick(&running);
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(msg) => self.handle(msg)?,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let why = self.stopping.clone().unwrap_or_default();
        for i in 0..self.slots.len() {
            debug_assert!(!matches!(self.slots[i], Slot::Deciding(_)), "a path left `{}` deciding", self.name(i));
            if matches!(self.slots[i], Slot::Waiting(_) | Slot::Deciding(_)) {
                self.skip(i, why.clone());
            }
        }
        Ok(signalled.map(|(s, _)| s))
    }

    /// SIGINT/SIGTERM: start nothing new, forward the signal to every running stage, and remember that each
    /// was signalled (a stage that then exits 0 stopped early: interrupted, never a success).
    fn stop_for_signal(&mut self, sig: i32) {
        self.stop("run interrupted".into());
        let name = if sig == signal_hook::consts::SIGTERM { "SIGTERM" } else { "SIGINT" };
        self.sink.event(&Event::Notice(Notice::Stopping { signal: name.into(), grace: self.opts.stop_grace }));
        for slot in &mut self.slots {
            if let Slot::Active(a) = slot {
                a.signalled = true;
            }
        }
        let forwarded = nix::sys::signal::Signal::try_from(sig).unwrap_or(nix::sys::signal::Signal::SIGTERM);
        self.signal_all(forwarded);
    }

    fn signal_all(&self, sig: nix::sys::signal::Signal) {
        for slot in &self.slots {
            if let Slot::Active(a) = slot
                && let Some(pgid) = a.pgid
            {
                exec::signal_group(pgid, sig);
            }
        }
    }

    /// Start every waiting stage whose needs are done, up to the job limit; skip those whose needs failed.
    fn start_ready(&mut self) -> Result<(), Error> {
        // Starting a stage can send earlier ones back to wait (materializing their outputs): pass again until
        // a pass starts nothing.
        while self.start_ready_pass()? {}
        Ok(())
    }

    fn start_ready_pass(&mut self) -> Result<bool, Error> {
        let mut progress = false;
        // Counted once a pass, not once a ready stage (a chain of a thousand fresh stages is one pass): nothing
        // busy ends during a pass, only messages end jobs.
        let mut free = queue::free_places((0..self.slots.len()).map(|j| self.phase(j)), self.opts.jobs);
        // Kept once it ended without outputs: what is downstream of it is skipped, however far.
        let again = std::mem::take(&mut self.again);
        self.again = again.into_iter().filter(|&j| self.phase(j) != Phase::Succeeded).collect();
        for i in self.cx.graph.order.clone() {
            if !matches!(self.slots[i], Slot::Waiting(_)) {
                continue;
            }
            match self.verdict(i) {
                Verdict::Blocked { need, because } => {
                    let why = format!("needs `{}`, which {}", self.name(need), because.words());
                    self.skip(i, why);
                    progress = true;
                }
                Verdict::Wait => {}
                Verdict::Ready => {
                    if free == 0 {
                        continue;
                    }
                    let Slot::Waiting(q) = std::mem::replace(&mut self.slots[i], Slot::Deciding(Acting::default()))
                    else {
                        unreachable!()
                    };
                    self.start(i, q, true)?;
                    // A fresh stage is done at once; one that runs (or asks the remote) holds a place.
                    free -= usize::from(self.phase(i) == Phase::Busy);
                    progress = true;
                    if self.stopping.is_some() {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(progress)
    }

    /// Make stage `i`'s manifest from its needs' outputs, decide, and act on the decision; `ask`: ask the remote
    /// when it must run (not when it was just asked).
    fn start(&mut self, i: usize, q: Queued, ask: bool) -> Result<(), Error> {
        if self.workspace_changed {
            self.s.rewalk(i)?;
        }
        if let Slot::Deciding(acting) = &mut self.slots[i] {
            acting.must_run = q.must_run.clone();
        }
        let needs = self.needs_outputs(i);
        let must_run =
            q.must_run.or_else(|| self.opts.force.includes(&self.cx.pipeline.stages[i].name).then_some(Reason::Forced));
        let forced = must_run.is_some();
        if let Some(remote) = self.remote()
            && self.cx.pipeline.stages[i].is_deploy()
            && self.ledger_read.elapsed() > LEDGER_FRESH_FOR
        {
            remote.learn_ledger(self.env.cache, &[&self.cx.pipeline.stages[i]], self.cx.env);
            self.remote_warnings();
        }
        let mut step = evaluate::stage(self.cx, self.s, self.env.cache, i, &needs, must_run.clone(), None)?;
        match if ask { self.ask_remote(i, &step, forced) } else { Asked::Keep } {
            Asked::Keep => {}
            Asked::Again => step = evaluate::stage(self.cx, self.s, self.env.cache, i, &needs, must_run, None)?,
            Asked::Done => return Ok(()),
        }
        match step {
            evaluate::Step::NoManifest(reason) => {
                // A tool is missing or unreadable: the stage cannot even be keyed.
                self.not_started(i, None, reason.clone(), reason.to_string());
                Ok(())
            }
            evaluate::Step::Decided(keyed, Decision::Run(reason)) => self.launch_stage(i, keyed, reason),
            evaluate::Step::Decided(keyed, Decision::Fresh(hit)) => {
                self.on_hit(i, keyed, hit, Vec::new(), q.materialize)
            }
            evaluate::Step::Decided(keyed, Decision::Restore(hit, restore)) => {
                self.on_hit(i, keyed, hit, restore, q.materialize)
            }
        }
    }

    /// The queue's verdict on stage `i`: its needs, then the stages a retry sent back to run again.
    fn verdict(&self, i: usize) -> Verdict {
        let graph = &self.cx.graph;
        match queue::verdict(&graph.needs[i], &|j| self.phase(j)) {
            Verdict::Ready => {
                let again = queue::Again { stages: &self.again, needs: &graph.needs, dependents: &graph.dependents };
                queue::again_verdict(i, &again, &|j| self.phase(j))
            }
            other => other,
        }
    }

    /// Whether stage `i` may go on now (see [`Self::verdict`]).
    fn ready(&self, i: usize) -> bool {
        self.verdict(i) == Verdict::Ready
    }

    /// The outputs of the stages `i` needs, as its manifest names them.
    fn needs_outputs(&self, i: usize) -> Vec<(String, Vec<OutputRecord>)> {
        let outputs = |j: usize| match &self.slots[j] {
            Slot::Done(Done::Fresh { outputs, .. } | Done::Ran { outputs, .. } | Done::Adopted { outputs, .. }) => {
                outputs.clone()
            }
            _ => Vec::new(),
        };
        self.cx.graph.needs[i].iter().map(|&j| (self.name(j), outputs(j))).collect()
    }

    /// Why stage `i`'s result cannot be reused, if it cannot: something in its inputs (files, the outputs of its
    /// needs) changed since it was keyed, or could not be read again. Walked again now that it has run (the
    /// stat cache makes an unchanged tree cheap).
    fn changed_while_running(&mut self, i: usize, keyed: &Keyed) -> Option<String> {
        let needs = self.needs_outputs(i);
        let now = match self.s.rewalk(i).and_then(|()| self.s.manifest(i, &needs)) {
            Ok(Ok(now)) => now,
            Ok(Err(reason)) => return Some(format!("{reason} while it ran")),
            Err(e) => return Some(format!("its inputs could not be read again after it ran ({e})")),
        };
        if now.key == keyed.key {
            return None;
        }
        let first = fresh::Diff::between(&keyed.manifest, &now.manifest).first_reason();
        Some(first.map_or_else(|| "its inputs changed while it ran".to_string(), |r| format!("{r} while it ran")))
    }

    /// Why nothing new starts now, if it does not: the run is stopping, or a signal reached kkpipe before the loop
    /// saw it (the loop stops everything else next).
    fn stopping_now(&self) -> Option<String> {
        self.stopping.clone().or_else(|| self.interrupt.signal().map(|_| "run interrupted".to_string()))
    }

    /// Start nothing new, and end the lease waits (they would only be skipped when they end).
    fn stop(&mut self, why: String) {
        self.stopping.get_or_insert(why);
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// A job of stage `i` now: its number, counted until it reports its end.
    fn new_job(&mut self, i: usize) -> usize {
        // Numbered for the whole process, not the run: a job's number is in the tag its processes carry, and the
        // leftovers of a finished job are found by it (a process that runs pipelines in turn, like `kkpipe demo`,
        // must never take another run's processes for them).
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let job = NEXT.fetch_add(1, Ordering::Relaxed);
        self.jobs.insert(job, i);
        job
    }

    /// Stage `i` will not start: a need did not succeed, or the run is stopping. A lease it holds goes at once.
    fn skip(&mut self, i: usize, because: String) {
        self.slots[i] = Slot::Done(Done::Skipped(because.clone()));
        self.sink.event(&Event::Skipped { stage: self.name(i), because });
    }

    /// A stage that will not start after all (no attempt is recorded): shown as failed, with why.
    fn not_started(&mut self, i: usize, key: Option<Key>, reason: Reason, detail: String) {
        let end = StageEnd::NotStarted { detail: detail.clone() };
        self.sink.event(&Event::Finished { stage: self.name(i), end, duration: Duration::ZERO, log: Vec::new() });
        let detail = format!("not started: {detail}");
        self.slots[i] = Slot::Done(Done::Failed { duration: Duration::ZERO, key, reason, detail });
    }

    /// Something observed while acting on a hit (drift, an output that could not be restored or
    /// regenerated) means the stage must run after all (the decision says `Run(reason)` to a stage that must).
    fn run_after_all(&mut self, i: usize, keyed: Keyed, reason: Reason) -> Result<(), Error> {
        // Sent back to wait for its needs meanwhile, it still must (and says why).
        if let Slot::Deciding(acting) = &mut self.slots[i] {
            acting.must_run = Some(reason.clone());
        }
        self.launch_stage(i, keyed, reason)
    }

    /// A hit: restore outputs, probe deploys for drift, or finish. Outputs that are in no cache are made
    /// only when a stage that needs them runs (`materialize`).
    fn on_hit(
        &mut self,
        i: usize,
        keyed: Keyed,
        hit: Hit,
        restore: Vec<OutputRecord>,
        materialize: bool,
    ) -> Result<(), Error> {
        let probes = transition::probe_of(&self.cx.pipeline.stages[i], self.opts.verify).is_some();
        // A probe reads what its needs made (a kubeconfig): those in no cache are made first, or a fresh runner
        // would take their absence for drift. The stage waits for them and is decided again, before it has
        // restored anything (what it restores is then reported once).
        if probes && !self.regenerable_needs_available(i, materialize) {
            return Ok(());
        }
        if !restore.is_empty() {
            self.workspace_changed = true;
            let declared = &self.cx.pipeline.stages[i].outputs;
            let root = &self.cx.pipeline.root;
            if let Err(e) = outputs::restore(root, declared, &restore, &hit.outputs, &self.env.cache.blobs) {
                let reason = match e {
                    NotRestored::Unavailable(path) => Reason::OutputMissing { path: path.display() },
                    NotRestored::Refused { path, why } => Reason::OutputNotRestored { path: path.display(), why },
                };
                return self.run_after_all(i, keyed, reason);
            }
        }
        let restored: Vec<String> = restore.iter().map(|o| o.path.display()).collect();
        for o in &hit.outputs {
            self.mask_output(o);
        }
        let stage = &self.cx.pipeline.stages[i];
        match transition::after_hit(stage, self.opts.verify, materialize, &hit.unavailable) {
            AfterHit::Regenerate(script) => {
                let outputs = hit.unavailable.iter().map(|o| o.path.display()).collect();
                self.sink.event(&Event::Notice(Notice::Regenerating { stage: stage.name.clone(), outputs }));
                self.spawn(i, script, Job::Regenerate { hit }, keyed, restored)
            }
            AfterHit::RunAfterAll(reason) => self.run_after_all(i, keyed, reason),
            AfterHit::Probe(probe) => self.probe(i, probe, hit, keyed, restored),
            AfterHit::Fresh => self.finish_fresh(i, &keyed, hit, restored, false),
        }
    }

    fn probe(&mut self, i: usize, probe: String, hit: Hit, keyed: Keyed, restored: Vec<String>) -> Result<(), Error> {
        self.sink.event(&Event::Probing { stage: self.name(i) });
        self.spawn(i, probe, Job::Probe { hit }, keyed, restored)
    }

    fn finish_fresh(
        &mut self,
        i: usize,
        keyed: &Keyed,
        hit: Hit,
        restored: Vec<String>,
        verified: bool,
    ) -> Result<(), Error> {
        let stage = self.name(i);
        let saved_ms = hit.record.duration_ms.unwrap_or(0);
        if self.opts.replay
            && let Some(log) = self.env.cache.log(hit.record.id)?
        {
            for line in log.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                self.sink.event(&Event::Line { stage: stage.clone(), line: line.to_vec() });
            }
        }
        self.sink.event(&Event::Fresh {
            stage,
            restored: restored.clone(),
            saved: Duration::from_millis(saved_ms.max(0) as u64),
        });
        self.slots[i] = Slot::Done(Done::Fresh {
            outputs: hit.outputs,
            verified,
            unavailable: hit.unavailable,
            restored,
            recorded_ms: hit.record.started_at,
            saved_ms,
            key: keyed.key,
            content: self.content_key(i, keyed),
        });
        Ok(())
    }

    /// Before stage `i` runs (or regenerates), every output of its needs must be in the workspace. Needs with
    /// outputs in no cache are sent back to be materialized, and `i` waits for them (`materialize`: `i` itself
    /// was regenerating, and goes on with that). Returns whether all are there.
    fn needs_available(&mut self, i: usize, materialize: bool) -> bool {
        self.make_needs_available(i, materialize, false)
    }

    /// Before a probe: the outputs of stage `i`'s needs that are in no cache but have a `regenerate` command are
    /// made again (cheap, read-only: `terraform output`, `kubeone kubeconfig`); one only a run of its stage could
    /// make (a plan) is left alone, as a probe does not read it.
    fn regenerable_needs_available(&mut self, i: usize, materialize: bool) -> bool {
        self.make_needs_available(i, materialize, true)
    }

    fn make_needs_available(&mut self, i: usize, materialize: bool, only_regenerable: bool) -> bool {
        let mut ok = true;
        for j in self.cx.graph.needs[i].clone() {
            if let Slot::Done(Done::Fresh { unavailable, .. }) = &self.slots[j]
                && !unavailable.is_empty()
                && (!only_regenerable
                    || transition::regenerate_script(&self.cx.pipeline.stages[j], unavailable).is_some())
            {
                self.slots[j] = Slot::Waiting(Queued { must_run: None, materialize: true });
                ok = false;
            }
        }
        if !ok {
            self.back_to_wait(i, materialize);
        }
        ok
    }

    /// Stage `i`, acted on now, waits for its needs again; one that must run still must.
    fn back_to_wait(&mut self, i: usize, materialize: bool) {
        let must_run = match &mut self.slots[i] {
            Slot::Deciding(acting) => acting.must_run.take(),
            _ => None,
        };
        self.slots[i] = Slot::Waiting(Queued { must_run, materialize });
    }

    fn launch_stage(&mut self, i: usize, keyed: Keyed, reason: Reason) -> Result<(), Error> {
        self.launch(i, keyed, reason, true)
    }

    /// Start stage `i` for `reason`: its lease first if it deploys, then adoption (`may_adopt`: not once an
    /// adoption failed) or its command.
    fn launch(&mut self, i: usize, keyed: Keyed, reason: Reason, may_adopt: bool) -> Result<(), Error> {
        // Also after a probe or a regeneration that a signal cut short: nothing new starts once stopping.
        if let Some(why) = self.stopping_now() {
            self.skip(i, why);
            return Ok(());
        }
        let stage = self.cx.pipeline.stages[i].clone();
        if self.opts.probe_only {
            self.sink.event(&Event::Skipped { stage: stage.name.clone(), because: format!("not verified: {reason}") });
            self.slots[i] = Slot::Done(Done::NotVerified { key: keyed.key, reason });
            return Ok(());
        }
        // Also after a probe, a regeneration or a lookup: a need may have been sent back meanwhile (a retry's
        // stale plan, outputs to make again), and what it makes next is what this stage must work on.
        if !self.ready(i) {
            self.back_to_wait(i, false);
            return Ok(());
        }
        if !self.needs_available(i, false) {
            return Ok(());
        }
        // Also when a hit turned into a run (drift, an output that could not be put back). If another runner
        // held the lease, start over: it may have deployed, and what its deploy left is to be decided on again.
        if stage.is_deploy() {
            match self.take_lease(i, &keyed, &reason, Resume::Launch) {
                Taken::Go => {}
                Taken::Pending | Taken::Stop => return Ok(()),
            }
        }
        if may_adopt && self.adoptable(i, &reason) {
            return self.adopt(i, keyed, reason);
        }
        self.run_command(i, keyed, reason)
    }

    /// Run stage `i`'s command (a deploy with its lease held). Before it starts, the ledger says it is being deployed:
    /// anyone who finds this record without a live lease knows the deploy did not end; a deploy the ledger would
    /// not know of is not started (another runner would take the older record for what is live).
    fn run_command(&mut self, i: usize, keyed: Keyed, reason: Reason) -> Result<(), Error> {
        let stage = self.cx.pipeline.stages[i].clone();
        if stage.is_deploy()
            && let Some(detail) = self.deploy_refusal(i, &keyed)
        {
            self.not_started(i, Some(keyed.key), reason, detail);
            return Ok(());
        }
        if stage.is_deploy()
            && let Some(remote) = self.remote()
            && !remote.record(self.env.cache, &stage, self.cx.env, &keyed.key, &keyed.manifest.encode(), None)
        {
            self.remote_warnings();
            self.locked_out = true;
            let detail = format!(
                "not deployed: the remote `{}` did not take the record that `{}` is being deployed to `{}`; other \
                 runners would not know of it\n  hint: run again once the store answers, or pass `--remote off` to \
                 deploy without the shared ledger",
                remote.url, stage.name, self.cx.env
            );
            self.not_started(i, Some(keyed.key), reason, detail);
            return Ok(());
        }
        self.remote_warnings();
        let row = self.env.cache.start_stage(self.run_id, &stage.name, self.cx.env, &keyed.manifest, &reason)?;
        self.sink.event(&Event::Started { stage: stage.name.clone(), reason: reason.clone() });
        let script = self.stage_script(i);
        self.spawn(i, script, Job::Stage { row, reason }, keyed, Vec::new())
    }

    /// The content key of a plan stage; none for the others (it is a second encoding and hash of the manifest).
    fn content_key(&self, i: usize, keyed: &Keyed) -> Option<Key> {
        self.cx.pipeline.stages[i].plan_policy.as_ref().map(|_| keyed.manifest.content_key())
    }

    /// Where the review of plan stage `stage` is put for `plan-check --reviewed` (`.kkpipe/reviews/STAGE.json`).
    fn review_file(&self, stage: &str) -> std::path::PathBuf {
        self.env.cache.dir().join("reviews").join(format!("{stage}.json"))
    }

    /// The stages whose plans deploy stage `i` may apply: those with a `plan_policy` among its needs and, through
    /// check stages, their needs (a check between the plan and the apply passes it on). A deploy in between is
    /// the one that applies it.
    fn plans_applied_by(&self, i: usize) -> Vec<usize> {
        let stages = &self.cx.pipeline.stages;
        let (mut out, mut seen, mut stack) = (Vec::new(), HashSet::new(), self.cx.graph.needs[i].clone());
        while let Some(j) = stack.pop() {
            if !seen.insert(j) || stages[j].is_deploy() {
                continue;
            }
            if stages[j].plan_policy.is_some() {
                out.push(j);
            }
            stack.extend(&self.cx.graph.needs[j]);
        }
        out
    }

    /// A stage's script: its `run` lines, then `kkpipe plan-check` on each plan it made if it has a
    /// `plan_policy`; a deploy first checks the plans of the stages it needs as they are now, whoever made them
    /// (a cache, another runner): what is about to be applied.
    fn stage_script(&self, i: usize) -> String {
        let pipeline = &self.cx.pipeline;
        let stage = &pipeline.stages[i];
        let allow_destroy = self.env.caller_env.get("KKPIPE_ALLOW_DESTROY").map(String::as_str).unwrap_or("");
        // A deploy checks each plan it applies against its review too, when the remote had one (fetched with the
        // deploy lease); never a file a run without the remote left.
        let with_remote = self.env.remote.is_some();
        let checks = |s: &crate::pipeline::Stage, deploying: bool| -> Vec<String> {
            let Some(policy) = &s.plan_policy else { return Vec::new() };
            let reviewed = Some(self.review_file(&s.name)).filter(|f| with_remote && deploying && f.exists());
            s.plans()
                .map(|o| {
                    let plan = o.path.under(&pipeline.root);
                    plan_check_line(&s.dir.under(&pipeline.root), policy, &plan, allow_destroy, reviewed.as_deref())
                })
                .collect()
        };
        let mut lines: Vec<String> = Vec::new();
        if stage.is_deploy() {
            let applied = self.plans_applied_by(i).into_iter().map(|j| &pipeline.stages[j]);
            lines.extend(applied.flat_map(|s| checks(s, true)));
        }
        lines.extend(stage.run.iter().cloned());
        lines.extend(checks(stage, false));
        lines.join("\n")
    }

    fn spawn(&mut self, i: usize, script: String, job: Job, keyed: Keyed, restored: Vec<String>) -> Result<(), Error> {
        let stage = &self.cx.pipeline.stages[i];
        let id = self.new_job(i);
        let mut env = exec::stage_env(stage, self.env.caller_env, self.cx.env);
        // What a deploy stamps on the live system and its probe compares: these inputs, this command.
        env.push(("KKPIPE_KEY".into(), keyed.key.to_string()));
        // A file per job for its failure note, beside the cache (removed when the job ends).
        let notes = self.env.cache.dir().join("notes");
        let note = std::fs::create_dir_all(&notes).ok().map(|()| notes.join(format!("{}-{id}", std::process::id())));
        let spec = exec::Spec { script, cwd: stage.dir.under(&self.cx.pipeline.root), env, note };
        watchdog::start(self.env.cache.dir(), self.opts.stop_grace);
        exec::spawn(id, spec, self.env.masker.clone(), self.tx.clone());
        let lease = match std::mem::replace(&mut self.slots[i], Slot::Idle) {
            Slot::Deciding(acting) => acting.lease,
            _ => None,
        };
        let active = Active {
            job: id,
            started: Instant::now(),
            pgid: None,
            work: job,
            keyed,
            restored,
            signalled: false,
            lease,
        };
        self.slots[i] = Slot::Active(Box::new(active));
        Ok(())
    }

    fn handle(&mut self, msg: Msg) -> Result<(), Error> {
        match msg {
            Msg::Spawned { job, pgid } => {
                if let Some(&i) = self.jobs.get(&job)
                    && let Slot::Active(a) = &mut self.slots[i]
                    && a.job == job
                {
                    a.pgid = Some(pgid);
                }
            }
            Msg::Line { job, line } => {
                // Probe and regenerate output is kept for the drift report, not streamed.
                if let Some(&i) = self.jobs.get(&job)
                    && matches!(&self.slots[i], Slot::Active(a) if a.job == job && matches!(a.work, Job::Stage { .. }))
                {
                    self.sink.event(&Event::Line { stage: self.name(i), line });
                }
            }
            Msg::LeaseHeld { job, holder } => {
                if let Some(&i) = self.jobs.get(&job)
                    && let Slot::Asking(a) = &mut self.slots[i]
                    && a.job == job
                    && let Wait::Lease { waited, .. } = &mut a.wait
                {
                    *waited = true;
                    self.sink.event(&Event::Notice(Notice::LeaseWait { stage: self.name(i), holder }));
                }
            }
            Msg::Leased { job, result } => {
                if let Some((i, asking)) = self.answered(job) {
                    self.leased(i, asking, result)?;
                }
            }
            Msg::LookedUp { job, found } => {
                if let Some((i, asking)) = self.answered(job) {
                    self.looked_up(i, asking, found)?;
                }
            }
            Msg::Exited { job, result } => self.exited(job, result)?,
        }
        Ok(())
    }

    /// A job's process ended: what happens next depends on what the job was.
    fn exited(&mut self, job: usize, result: Exit) -> Result<(), Error> {
        let Some(i) = self.jobs.remove(&job) else { return Ok(()) };
        if !matches!(&self.slots[i], Slot::Active(a) if a.job == job) {
            return Ok(());
        }
        let Slot::Active(a) = std::mem::replace(&mut self.slots[i], Slot::Idle) else { unreachable!() };
        let mut a = *a;
        self.slots[i] = Slot::Deciding(Acting { lease: a.lease.take(), must_run: None });
        match a.work {
            Job::Stage { row, reason } => {
                self.workspace_changed = true;
                self.stage_exited(i, row, a.keyed, reason, result, a.signalled)
            }
            Job::Probe { hit } => self.probe_exited(i, a.keyed, hit, a.restored, result),
            Job::Regenerate { hit } => {
                self.workspace_changed = true;
                self.regenerate_exited(i, a.keyed, hit, a.restored, result)
            }
            Job::Adopt { reason, regenerating } => self.adopt_exited(i, a.keyed, reason, regenerating, result),
        }
    }

    fn stage_exited(
        &mut self,
        i: usize,
        row: i64,
        keyed: Keyed,
        reason: Reason,
        exit: Exit,
        signalled: bool,
    ) -> Result<(), Error> {
        let key = keyed.key;
        // Whatever the stage's end, what it printed of its own sensitive outputs is masked in what is kept.
        self.mask_declared(i);
        let log = exit.log.masked(&self.env.masker.read().expect("masker"));
        let ended = Ended { row, duration: exit.duration, code: exit.code, log, outputs: Vec::new() };
        // Masked before it is cut: a secret cut in two would not be recognised.
        let note = exit.note.as_deref().map(|n| self.env.masker.read().expect("masker").mask_str(n));
        let note = note.as_deref().and_then(exec::note_summary);
        let stage = &self.cx.pipeline.stages[i];
        let end = CommandEnd {
            code: exit.code,
            signal: exit.signal,
            spawn_error: exit.spawn_error.as_deref(),
            // A signal kkpipe has seen by now counts, even one the loop has not acted on yet: a SIGTERM that
            // reached kkpipe and the stage together (a CI cancel, systemd stopping a cgroup) may let the stage
            // exit 0 first.
            stopped: signalled || self.interrupt.signal().is_some(),
            note: note.as_deref(),
            log: &ended.log,
            retry_needs_if: stage.retry_needs_if.as_deref(),
            retried: self.second_chances[i].needs_sent_back,
        };
        match transition::after_command(&end) {
            AfterCommand::Interrupted => {
                self.conclude(i, &keyed, State::Interrupted, ended, StageEnd::Interrupted)?;
                self.slots[i] = Slot::Done(Done::Interrupted { key, reason });
                Ok(())
            }
            AfterCommand::Succeeded => self.stage_succeeded(i, keyed, reason, ended, &exit),
            AfterCommand::RetryNeeds { detail } => {
                self.send_needs_back(i);
                // Recorded (a deploy's on the shared ledger, with its lease held) before it goes back to wait.
                self.conclude(i, &keyed, State::Failed, ended, StageEnd::Failed { detail })?;
                // It runs again for the reason it ran (drift stays drift), once its needs did.
                self.slots[i] = Slot::Waiting(Queued { must_run: Some(reason), materialize: false });
                Ok(())
            }
            AfterCommand::Failed { detail } => self.fail(i, &keyed, reason, ended, detail),
        }
    }

    /// Exit code 0: collect and record the outputs. A result made while its inputs moved is no success to reuse
    /// under either key: it is recorded interrupted (so it runs again next time) and its outputs still go to the
    /// stages that need it.
    fn stage_succeeded(
        &mut self,
        i: usize,
        keyed: Keyed,
        reason: Reason,
        mut ended: Ended,
        exit: &Exit,
    ) -> Result<(), Error> {
        let not_kept = self.changed_while_running(i, &keyed);
        let stage = &self.cx.pipeline.stages[i];
        let outs = match outputs::collect(&self.cx.pipeline.root, &stage.outputs, &self.env.cache.blobs) {
            Ok(outs) => outs,
            Err(e) => {
                // Exit code 0 without its declared outputs is still a failure.
                ended.log.extend_from_slice(format!("kkpipe: {e}\n").as_bytes());
                ended.code = Some(1);
                return self.fail(i, &keyed, reason, ended, e.to_string());
            }
        };
        // Its sensitive outputs were read into the masker when it ended (`mask_declared`), so the log
        // `stage_exited` masked already masks them.
        ended.outputs = outs.clone();
        let state = match not_kept {
            None => State::Success,
            Some(why) => {
                ended.log.extend_from_slice(format!("kkpipe: {why}: its result is not kept\n").as_bytes());
                self.sink.event(&Event::Notice(Notice::NotKept { stage: self.name(i), why }));
                State::Interrupted
            }
        };
        self.conclude(i, &keyed, state, ended, StageEnd::Ok)?;
        let (duration, key, content) = (exit.duration, keyed.key, self.content_key(i, &keyed));
        self.slots[i] = Slot::Done(Done::Ran { outputs: outs, duration, key, content, reason });
        Ok(())
    }

    /// `retry_needs_if` matched the failed stage's log (terraform's "Saved plan is stale"): its needs run
    /// again (and then the stage, once: the caller sends it back to wait).
    fn send_needs_back(&mut self, i: usize) {
        let stage = &self.cx.pipeline.stages[i];
        let (name, pattern) = (stage.name.clone(), stage.retry_needs_if.clone().unwrap_or_default());
        self.second_chances[i].needs_sent_back = true;
        let needs = self.cx.graph.needs[i].clone();
        let names = needs.iter().map(|&j| self.name(j)).collect();
        self.sink.event(&Event::Notice(Notice::Retrying { stage: name.clone(), pattern, needs: names }));
        for j in needs {
            let stale = Reason::PlanStale { stage: name.clone() };
            match &mut self.slots[j] {
                Slot::Done(_) => self.slots[j] = Slot::Waiting(Queued { must_run: Some(stale), materialize: false }),
                // Sent back already (another stage's retry, or to make its outputs): it runs when it starts.
                Slot::Waiting(q) => {
                    q.must_run.get_or_insert(stale);
                }
                // Busy: it runs again already, and the stage waits for that run (starting it a second time beside it
                // would run it twice at once). A stage sent back never starts while one downstream of it runs, so
                // no stage ends while its need is busy: this arm only keeps that so.
                Slot::Idle | Slot::Deciding(_) | Slot::Active(_) | Slot::Asking(_) => {}
            }
            if !self.again.contains(&j) {
                self.again.push(j);
            }
        }
    }

    /// Record how a stage run ended (one transaction: state, log, outputs) and announce it. A failure's
    /// log is shown again in quiet mode.
    fn conclude(&mut self, i: usize, keyed: &Keyed, state: State, e: Ended, how: StageEnd) -> Result<(), Error> {
        let ok = state.succeeded();
        let end = End {
            duration_ms: e.duration.as_millis() as i64,
            exit_code: e.code.map(i64::from),
            log: &e.log,
            outputs: &e.outputs,
        };
        self.env.cache.finish_stage(e.row, state, &end)?;
        if ok && self.cx.pipeline.stages[i].is_deploy() {
            // What the live system is now: as deployed (drift the probes found before is applied over).
            let deployed = crate::cache::probes::Seen::Deployed;
            self.env.cache.record_probe(&crate::cache::probes::Probe::now(&self.name(i), self.cx.env, deployed))?;
        }
        self.share(i, keyed, state, &e.outputs, e.duration);
        let log = if ok || state == State::Interrupted { Vec::new() } else { e.log };
        self.sink.event(&Event::Finished { stage: self.name(i), end: how, duration: e.duration, log });
        Ok(())
    }

    fn fail(&mut self, i: usize, keyed: &Keyed, reason: Reason, e: Ended, detail: String) -> Result<(), Error> {
        let duration = e.duration;
        self.conclude(i, keyed, State::Failed, e, StageEnd::Failed { detail: detail.clone() })?;
        let detail = format!("failed: {detail}");
        self.slots[i] = Slot::Done(Done::Failed { duration, key: Some(keyed.key), reason, detail });
        if self.opts.fail_fast && self.stopping.is_none() {
            self.stop("not started: a stage failed and --fail-fast is set".into());
        }
        Ok(())
    }

    fn probe_exited(
        &mut self,
        i: usize,
        keyed: Keyed,
        hit: Hit,
        restored: Vec<String>,
        exit: Exit,
    ) -> Result<(), Error> {
        let stopped = self.interrupt.signal().is_some();
        let on_drift = self.cx.pipeline.stages[i].on_drift;
        match transition::after_probe(stopped, exit.success(), self.opts.probe_only, on_drift) {
            AfterProbe::Skip => {
                // No drift to report, nothing to keep.
                self.skip(i, "run interrupted".into());
                Ok(())
            }
            AfterProbe::InSync => {
                self.probed(i, None)?;
                self.finish_fresh(i, &keyed, hit, restored, true)
            }
            AfterProbe::Drifted => {
                let output = self.probed(i, Some(&exit))?;
                self.slots[i] = Slot::Done(Done::Drifted { key: keyed.key, output });
                Ok(())
            }
            AfterProbe::Redeploy => {
                let output = self.probed(i, Some(&exit))?;
                self.run_after_all(i, keyed, Reason::Drift { output })
            }
        }
    }

    /// The drift probe of stage `i` (on a hit: it compared the live system with its last deploy) ended: in sync
    /// (`drift` None) or not. Kept as what was last seen of it (what `kkpipe preview` shows); drift is reported,
    /// and its masked output returned.
    fn probed(&mut self, i: usize, drift: Option<&Exit>) -> Result<String, Error> {
        use crate::cache::probes::{Probe, Seen};
        let (seen, output) = match drift {
            Some(e) => {
                let (output, resources) = self.report_drift(i, e);
                (Seen::drifted(&output, resources), output)
            }
            None => (Seen::InSync, String::new()),
        };
        self.env.cache.record_probe(&Probe::now(&self.cx.pipeline.stages[i].name, self.cx.env, seen))?;
        Ok(output)
    }

    /// A probe of stage `i` found drift: its output masked, what it names as changing, reported.
    fn report_drift(&mut self, i: usize, exit: &Exit) -> (String, Vec<crate::tfplan::TextChange>) {
        let output = String::from_utf8_lossy(&exit.log.masked(&self.env.masker.read().expect("masker"))).into_owned();
        let resources = crate::tfplan::changes_in_text(&output);
        self.sink.event(&Event::Drift { stage: self.name(i), output: output.clone(), resources: resources.clone() });
        (output, resources)
    }

    fn regenerate_exited(
        &mut self,
        i: usize,
        keyed: Keyed,
        mut hit: Hit,
        mut restored: Vec<String>,
        exit: Exit,
    ) -> Result<(), Error> {
        let regenerated: Vec<OutputRecord> = std::mem::take(&mut hit.unavailable);
        if !exit.success() {
            let first_time = !std::mem::replace(&mut self.second_chances[i].regenerated_after_needs, true);
            return match transition::after_regenerate_failed(first_time, &regenerated) {
                AfterRegenerateFailed::MakeNeedsFirst if !self.needs_available(i, true) => Ok(()),
                // Every output of its needs is there: remaking them cannot help, so the stage runs.
                AfterRegenerateFailed::MakeNeedsFirst => {
                    self.run_after_all(i, keyed, transition::output_missing(&regenerated))
                }
                AfterRegenerateFailed::RunAfterAll(reason) => self.run_after_all(i, keyed, reason),
            };
        }
        for o in &regenerated {
            outputs::set_recorded_mode(&self.cx.pipeline.root, o);
            if outputs::check(&self.cx.pipeline.root, o, self.s.hasher()) != Present::Same {
                let path = o.path.display();
                return self.run_after_all(i, keyed, Reason::OutputRegeneratedDiffers { path });
            }
            self.mask_output(o);
        }
        restored.extend(regenerated.iter().map(|o| o.path.display()));
        match transition::probe_of(&self.cx.pipeline.stages[i], self.opts.verify) {
            Some(probe) => self.probe(i, probe.to_string(), hit, keyed, restored),
            None => self.finish_fresh(i, &keyed, hit, restored, false),
        }
    }

    /// Add what is on disk now at stage `i`'s declared sensitive outputs to the masker (files up to 1 MiB, the
    /// first thousand below a directory): a stage that fails after writing its kubeconfig and printing it must
    /// not leave it in its stored log.
    fn mask_declared(&self, i: usize) {
        let root = &self.cx.pipeline.root;
        let mut values = Vec::new();
        for o in self.cx.pipeline.stages[i].outputs.iter().filter(|o| o.sensitive) {
            let files = walkdir::WalkDir::new(o.path.under(root)).follow_links(false).into_iter().flatten();
            for f in files.filter(|f| f.file_type().is_file()).take(1000) {
                if f.metadata().is_ok_and(|m| m.len() <= 1 << 20)
                    && let Ok(bytes) = std::fs::read(f.path())
                {
                    values.push(bytes);
                }
            }
        }
        if !values.is_empty() {
            self.env.masker.write().expect("masker").add_all(values.iter().map(Vec::as_slice));
        }
    }

    /// Add a sensitive output's content to the masker (a stage that prints a kubeconfig shows `***`).
    fn mask_output(&self, o: &OutputRecord) {
        if !o.sensitive {
            return;
        }
        if let Ok(bytes) = std::fs::read(o.path.under(&self.cx.pipeline.root))
            && bytes.len() <= 1 << 20
        {
            self.env.masker.write().expect("masker").add(&bytes);
        }
    }

    fn rows(&self, selected: &[Selected]) -> (Vec<StageRow>, Summary) {
        let mut rows = Vec::new();
        let mut sum = Summary::default();
        for &i in &self.cx.graph.order {
            let stage = &self.cx.pipeline.stages[i];
            let mut row = StageRow::new(stage, StageState::Skipped);
            match (&selected[i], &self.slots[i]) {
                (Selected::NotRequested, _) => continue,
                (Selected::SkippedByEvent, _) => row.state = StageState::SkippedByEvent,
                (_, Slot::Done(d)) => done_row(d, &mut row, &mut sum),
                _ => sum.skipped += 1,
            }
            rows.push(row);
        }
        (rows, sum)
    }
}

/// A finished stage's row, and its count in the summary.
/// A fresh stage in the summary: fresh, or restored when outputs were put back; with what it saved.
fn fresh_counts(nothing_restored: bool, verified: bool, saved_ms: i64, sum: &mut Summary) -> StageState {
    let (count, state) = match nothing_restored {
        true => (&mut sum.fresh, StageState::Fresh),
        false => (&mut sum.restored, StageState::Restored),
    };
    *count += 1;
    sum.verified += usize::from(verified);
    sum.saved_ms += saved_ms.max(0) as u64;
    state
}

fn done_row(d: &Done, row: &mut StageRow, sum: &mut Summary) {
    let (state, key, reason) = match d {
        Done::Fresh { restored, unavailable, recorded_ms, saved_ms, key, verified, .. } => {
            row.note = (!unavailable.is_empty()).then(|| crate::report::unavailable_note(unavailable));
            row.restored = restored.clone();
            row.duration_ms = Some(*saved_ms);
            row.recorded_at = Some(crate::report::timestamp(*recorded_ms));
            (fresh_counts(restored.is_empty(), *verified, *saved_ms, sum), Some(*key), None)
        }
        Done::Ran { duration, key, reason, .. } => {
            row.duration_ms = Some(duration.as_millis() as i64);
            sum.ran += 1;
            if matches!(reason, Reason::Drift { .. }) {
                // Its probe found drift, and it was deployed again (`on_drift = "apply"`).
                sum.drifted += 1;
                sum.drift_applied += 1;
            }
            (StageState::Ran, Some(*key), Some(reason.clone()))
        }
        Done::Failed { duration, key, reason, detail } => {
            row.duration_ms = Some(duration.as_millis() as i64);
            row.note = Some(detail.clone());
            sum.failed += 1;
            (StageState::Failed, *key, Some(reason.clone()))
        }
        Done::Skipped(because) => {
            row.note = Some(because.clone());
            sum.skipped += 1;
            (StageState::Skipped, None, None)
        }
        Done::Interrupted { key, reason } => {
            sum.interrupted += 1;
            (StageState::Interrupted, Some(*key), Some(reason.clone()))
        }
        Done::NotVerified { key, reason } => {
            row.note = Some("not verified: stale".into());
            (StageState::Stale, Some(*key), Some(reason.clone()))
        }
        Done::Drifted { key, output } => {
            sum.drifted += 1;
            (StageState::Drifted, Some(*key), Some(Reason::Drift { output: output.clone() }))
        }
        Done::Adopted { key, .. } => {
            sum.adopted += 1;
            row.note = Some("in sync with these inputs without running: recorded as deployed".into());
            (StageState::Adopted, Some(*key), None)
        }
    };
    row.state = state;
    row.key = key.map(|k| k.to_string());
    row.reasons = reason.into_iter().collect();
}

/// How a stage run ended, before it is recorded.
struct Ended {
    row: i64,
    duration: Duration,
    code: Option<i32>,
    log: Vec<u8>,
    outputs: Vec<OutputRecord>,
}

/// `(cd DIR && "$KKPIPE" plan-check ...)`: terraform reads the plan where it was initialised.
fn plan_check_line(
    dir: &std::path::Path,
    p: &crate::pipeline::PlanPolicy,
    plan: &std::path::Path,
    allow_destroy: &str,
    reviewed: Option<&std::path::Path>,
) -> String {
    let q = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    let mut line =
        format!("(cd {} && \"$KKPIPE\" plan-check --deny {}", q(&dir.to_string_lossy()), q(&p.deny.join(",")));
    for a in &p.allow {
        line.push_str(&format!(" --allow {}", q(a)));
    }
    if let Some(r) = reviewed {
        line.push_str(&format!(" --reviewed {}", q(&r.to_string_lossy())));
    }
    line.push_str(&format!(" --allow-destroy {} {})", q(allow_destroy), q(&plan.to_string_lossy())));
    line
}

#[cfg(test)]
mod tests;
