//! Running the graph.
//!
//! One thread (the caller's) owns all state: it decides which stage is ready, computes its key when its
//! needs are done (their outputs are part of it), skips or restores fresh stages, and starts stale ones
//! as jobs on threads of their own, bounded by `-j`. Jobs report back by message (`exec::Msg`). A failed
//! stage is an outcome, not an error: its dependents are skipped, independent stages go on.

pub mod exec;
pub mod lock;
pub mod outputs;
pub mod session;

use crate::cache::{OutputRecord, RunCounts, RunMeta, State};
use crate::fresh::Reason;
use crate::graph::Selected;
use crate::hash::key::{Key, Manifest};
use crate::report::{Event, Sink, StageRow, StageState, Summary};
use exec::{Exit, Msg};
use session::{Decision, Hit, Session};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use session::Error;

/// Grace period between forwarding SIGINT/SIGTERM to the stages and killing them.
const INTERRUPT_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default)]
pub enum Force {
    #[default]
    No,
    All,
    Stages(Vec<String>),
}

impl Force {
    pub fn includes(&self, stage: &str) -> bool {
        match self {
            Force::No => false,
            Force::All => true,
            Force::Stages(list) => list.iter().any(|s| s == stage),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub targets: Vec<String>,
    pub force: Force,
    pub jobs: usize,
    pub fail_fast: bool,
    /// Run deploy stages' `verify` probes on a hit.
    pub verify: bool,
    /// Print the stored log of stages skipped as fresh.
    pub replay: bool,
    /// `kkpipe verify`: run deploy stages' drift probes, never a stage.
    pub probe_only: bool,
}

/// The signal number that asked us to stop, set from a signal handler.
#[derive(Clone, Default)]
pub struct Interrupt(pub Arc<AtomicUsize>);

impl Interrupt {
    pub fn install() -> Interrupt {
        let flag = Arc::new(AtomicUsize::new(0));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
            let _ = signal_hook::flag::register_usize(sig, flag.clone(), sig as usize);
        }
        Interrupt(flag)
    }

    pub fn signal(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s as i32),
        }
    }
}

pub struct Outcome {
    pub rows: Vec<StageRow>,
    pub summary: Summary,
    pub failed: bool,
    /// The signal that interrupted the run, if any.
    pub interrupted: Option<i32>,
}

/// How a stage run ended, for the cache.
struct End {
    row: i64,
    duration: Duration,
    code: Option<i32>,
    log: Vec<u8>,
    outputs: Vec<OutputRecord>,
}

enum JobKind {
    Stage { row: i64 },
    Probe,
    Regenerate,
}

struct Active {
    started: Instant,
    pgid: Option<i32>,
    kind: JobKind,
    manifest: Manifest,
    reason: Option<Reason>,
    hit: Option<Hit>,
    /// Outputs already put back from the store before a probe or regeneration started.
    restored: Vec<String>,
}

#[derive(Clone)]
enum Done {
    Fresh {
        outputs: Vec<OutputRecord>,
        /// Recorded outputs that are in no cache (see `Hit::unavailable`).
        unavailable: Vec<OutputRecord>,
        restored: Vec<String>,
        recorded_ms: i64,
        saved_ms: i64,
        key: Key,
    },
    Ran {
        outputs: Vec<OutputRecord>,
        duration: Duration,
        key: Key,
        reason: Reason,
    },
    Failed {
        duration: Duration,
        key: Option<Key>,
        reason: Option<Reason>,
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
}

enum Slot {
    Idle,
    Waiting,
    Active(Box<Active>),
    Done(Done),
}

struct Scheduler<'a> {
    s: &'a mut Session,
    opts: &'a Options,
    sink: &'a mut dyn Sink,
    slots: Vec<Slot>,
    run_id: i64,
    next_job: usize,
    jobs: HashMap<usize, usize>,
    tx: mpsc::Sender<Msg>,
    workspace_changed: bool,
    retried: HashSet<usize>,
    replan: HashMap<usize, String>,
    stopping: Option<String>,
    /// Stages whose drift probe ran and passed.
    verified: HashSet<usize>,
    /// Fresh stages whose unavailable outputs a dependent needs: regenerate them, or rerun the stage.
    materialize: HashSet<usize>,
    /// Stages whose regenerate command failed once (and waited for their needs' outputs).
    regenerate_retried: HashSet<usize>,
}

/// Run the selected stages. The caller holds the run lock.
pub fn run(s: &mut Session, opts: &Options, sink: &mut dyn Sink, interrupt: &Interrupt) -> Result<Outcome, Error> {
    let start = Instant::now();
    let selected = s.select(&opts.targets).map_err(|e| crate::cache::Error::Other(e.to_string()))?;
    let chosen: Vec<usize> = (0..selected.len()).filter(|&i| selected[i] == Selected::Yes).collect();
    s.cache.mark_interrupted_leftovers()?;
    s.cache.blobs.clean_tmp();
    s.walk(&chosen)?;
    s.prefetch_inputs(&chosen)?;
    for w in std::mem::take(&mut s.warnings) {
        sink.event(&Event::Warning(w));
    }
    let meta = RunMeta {
        command: if opts.probe_only { "verify" } else { "run" }.into(),
        event: s.event.as_ref().map(|e| e.name.clone()),
        branch: s.event.as_ref().and_then(|e| e.branch.clone()),
        env: s.env_name.clone(),
        git_commit: git_head(&s.root),
    };
    let run_id = s.cache.begin_run(&meta)?;
    let (tx, rx) = mpsc::channel();
    let slots =
        (0..selected.len()).map(|i| if selected[i] == Selected::Yes { Slot::Waiting } else { Slot::Idle }).collect();
    let mut sch = Scheduler {
        s,
        opts,
        sink,
        slots,
        run_id,
        next_job: 0,
        jobs: HashMap::new(),
        tx,
        workspace_changed: false,
        retried: HashSet::new(),
        replan: HashMap::new(),
        stopping: None,
        verified: HashSet::new(),
        materialize: HashSet::new(),
        regenerate_retried: HashSet::new(),
    };
    let interrupted = sch.drive(&rx, interrupt)?;
    for w in std::mem::take(&mut sch.s.warnings) {
        sch.sink.event(&Event::Warning(w));
    }
    let (rows, mut summary) = sch.rows(&selected);
    summary.duration_ms = start.elapsed().as_millis() as u64;
    let failed = summary.failed > 0 || summary.drifted > 0 || interrupted.is_some();
    let counts = RunCounts {
        ran: summary.ran as i64,
        fresh: summary.fresh as i64,
        restored: summary.restored as i64,
        failed: (summary.failed + summary.drifted) as i64,
        skipped: summary.skipped as i64,
        saved_ms: summary.saved_ms as i64,
    };
    let outcome = if interrupted.is_some() {
        "interrupted"
    } else if failed {
        "failed"
    } else {
        "ok"
    };
    sch.s.cache.finish_run(run_id, outcome, &counts)?;
    sch.s.persist_stat_cache();
    if let Err(e) = sch.s.cache.auto_gc(&sch.s.root) {
        sch.sink.event(&Event::Warning(format!("automatic cache gc failed: {e}")));
    }
    sch.sink.event(&Event::Summary(summary.clone()));
    sch.sink.finish(&rows, &summary);
    Ok(Outcome { rows, summary, failed, interrupted })
}

impl Active {
    fn new(
        kind: JobKind,
        manifest: Manifest,
        reason: Option<Reason>,
        hit: Option<Hit>,
        restored: Vec<String>,
    ) -> Active {
        Active { started: Instant::now(), pgid: None, kind, manifest, reason, hit, restored }
    }
}

impl Scheduler<'_> {
    fn name(&self, i: usize) -> String {
        self.s.stage(i).name.clone()
    }

    fn forced(&self, i: usize) -> bool {
        self.opts.force.includes(&self.s.stage(i).name)
    }

    fn active_count(&self) -> usize {
        self.slots.iter().filter(|s| matches!(s, Slot::Active(_))).count()
    }

    fn drive(&mut self, rx: &mpsc::Receiver<Msg>, interrupt: &Interrupt) -> Result<Option<i32>, Error> {
        let mut signalled: Option<(i32, Instant)> = None;
        let mut killed = false;
        loop {
            if let Some(sig) = interrupt.signal()
                && signalled.is_none()
            {
                signalled = Some((sig, Instant::now()));
                self.stopping = Some("run interrupted".into());
                let name = if sig == signal_hook::consts::SIGTERM { "SIGTERM" } else { "SIGINT" };
                self.sink.event(&Event::Info(format!(
                    "kkpipe: {name} received: stopping running stages (waiting up to {}s)",
                    INTERRUPT_GRACE.as_secs()
                )));
                let forwarded = nix::sys::signal::Signal::try_from(sig).unwrap_or(nix::sys::signal::Signal::SIGTERM);
                self.signal_all(forwarded);
            }
            if let Some((_, at)) = signalled
                && !killed
                && at.elapsed() > INTERRUPT_GRACE
            {
                self.signal_all(nix::sys::signal::Signal::SIGKILL);
                killed = true;
            }
            if self.stopping.is_none() {
                self.start_ready()?;
            }
            if self.active_count() == 0 {
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
                Ok(msg) => self.handle(msg, signalled.is_some())?,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let why = self.stopping.clone().unwrap_or_default();
        for i in 0..self.slots.len() {
            if matches!(self.slots[i], Slot::Waiting) {
                self.slots[i] = Slot::Done(Done::Skipped(why.clone()));
                let stage = self.name(i);
                self.sink.event(&Event::Skipped { stage, because: why.clone() });
            }
        }
        Ok(signalled.map(|(s, _)| s))
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
        for i in self.s.graph.order.clone() {
            if !matches!(self.slots[i], Slot::Waiting) {
                continue;
            }
            let mut blocked_by = None;
            let mut ready = true;
            for &j in &self.s.graph.needs[i] {
                match &self.slots[j] {
                    Slot::Done(Done::Fresh { .. } | Done::Ran { .. }) => {}
                    Slot::Done(_) => {
                        blocked_by.get_or_insert(j);
                    }
                    _ => ready = false,
                }
            }
            if let Some(j) = blocked_by {
                let because = match &self.slots[j] {
                    Slot::Done(Done::Failed { .. }) => {
                        format!("needs `{}`, which failed", self.name(j))
                    }
                    Slot::Done(Done::Interrupted { .. }) => {
                        format!("needs `{}`, which was interrupted", self.name(j))
                    }
                    Slot::Done(Done::NotVerified { .. }) => format!("needs `{}`, which is stale", self.name(j)),
                    Slot::Done(Done::Drifted { .. }) => format!("needs `{}`, which drifted", self.name(j)),
                    _ => format!("needs `{}`, which did not run", self.name(j)),
                };
                self.slots[i] = Slot::Done(Done::Skipped(because.clone()));
                self.sink.event(&Event::Skipped { stage: self.name(i), because });
                continue;
            }
            if ready && self.active_count() < self.opts.jobs.max(1) {
                self.start(i)?;
                progress = true;
                if self.stopping.is_some() {
                    return Ok(false);
                }
            }
        }
        Ok(progress)
    }

    fn start(&mut self, i: usize) -> Result<(), Error> {
        if self.workspace_changed {
            self.s.rewalk(i)?;
        }
        let needs: Vec<(String, Vec<OutputRecord>)> = self.s.graph.needs[i]
            .iter()
            .map(|&j| {
                let outs = match &self.slots[j] {
                    Slot::Done(Done::Fresh { outputs, .. } | Done::Ran { outputs, .. }) => outputs.clone(),
                    _ => Vec::new(),
                };
                (self.name(j), outs)
            })
            .collect();
        let manifest = match self.s.manifest(i, &needs)? {
            Ok(m) => m,
            Err(reason) => {
                let stage = self.name(i);
                self.sink.event(&Event::Finished {
                    stage,
                    ok: false,
                    duration: Duration::ZERO,
                    detail: Some(reason.to_string()),
                    log: Vec::new(),
                });
                self.slots[i] = Slot::Done(Done::Failed { duration: Duration::ZERO, key: None, reason: Some(reason) });
                return Ok(());
            }
        };
        let key = manifest.key();
        let decision = if let Some(dependent) = self.replan.remove(&i) {
            Decision::Stale(Reason::PlanStale { stage: dependent })
        } else if self.forced(i) {
            Decision::Stale(Reason::Forced)
        } else {
            self.s.decide(i, &manifest, &key)?
        };
        match decision {
            Decision::Stale(reason) => self.launch_stage(i, manifest, reason),
            Decision::Fresh(hit) => self.on_hit(i, manifest, hit),
        }
    }

    /// A hit: restore outputs, probe deploys for drift, or finish. Outputs that are in no cache are made
    /// only when a stage that needs them runs (`materialize`).
    fn on_hit(&mut self, i: usize, manifest: Manifest, mut hit: Hit) -> Result<(), Error> {
        let root = self.s.root.clone();
        let mut restored = Vec::new();
        for o in std::mem::take(&mut hit.restore) {
            match outputs::restore(&root, &o, &self.s.cache.blobs) {
                Ok(true) => restored.push(o.path.display()),
                _ => {
                    return self.launch_stage(i, manifest, Reason::OutputMissing { path: o.path.display() });
                }
            }
        }
        for o in &hit.outputs {
            self.s.mask_output(o);
        }
        let stage = self.s.stage(i).clone();
        if self.materialize.contains(&i) && !hit.unavailable.is_empty() {
            let first = hit.unavailable[0].path.display();
            let Some(script) = self.s.regenerate_script(i, &hit.unavailable) else {
                self.materialize.remove(&i);
                return self.launch_stage(i, manifest, Reason::OutputMissing { path: first });
            };
            let list: Vec<String> = hit.unavailable.iter().map(|o| format!("`{}`", o.path)).collect();
            self.sink.event(&Event::Info(format!(
                "Regenerating {} of `{}` (not in the cache; a stage that needs it runs)",
                list.join(", "),
                stage.name
            )));
            return self.spawn(i, script, Active::new(JobKind::Regenerate, manifest, None, Some(hit), restored));
        }
        if stage.is_deploy()
            && self.opts.verify
            && let Some(probe) = stage.verify.clone()
        {
            self.sink.event(&Event::Probing { stage: stage.name.clone() });
            return self.spawn(i, probe, Active::new(JobKind::Probe, manifest, None, Some(hit), restored));
        }
        self.finish_fresh(i, &manifest, hit, restored);
        Ok(())
    }

    fn finish_fresh(&mut self, i: usize, manifest: &Manifest, hit: Hit, restored: Vec<String>) {
        let stage = self.name(i);
        let saved_ms = hit.record.duration_ms.unwrap_or(0);
        if self.opts.replay
            && let Ok(Some(log)) = self.s.cache.log(hit.record.id)
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
            unavailable: hit.unavailable,
            restored,
            recorded_ms: hit.record.started_at,
            saved_ms,
            key: manifest.key(),
        });
    }

    /// Before stage `i` runs (or regenerates), every output of its needs must be in the workspace. Needs with
    /// outputs in no cache are sent back to be materialized, and `i` waits for them. Returns whether all are there.
    fn needs_available(&mut self, i: usize) -> bool {
        let mut ok = true;
        for j in self.s.graph.needs[i].clone() {
            if let Slot::Done(Done::Fresh { unavailable, .. }) = &self.slots[j]
                && !unavailable.is_empty()
            {
                self.slots[j] = Slot::Waiting;
                self.materialize.insert(j);
                ok = false;
            }
        }
        if !ok {
            self.slots[i] = Slot::Waiting;
        }
        ok
    }

    fn launch_stage(&mut self, i: usize, manifest: Manifest, reason: Reason) -> Result<(), Error> {
        let stage = self.s.stage(i).clone();
        if !self.opts.probe_only && !self.needs_available(i) {
            return Ok(());
        }
        if self.opts.probe_only {
            self.sink.event(&Event::Skipped { stage: stage.name.clone(), because: format!("not verified: {reason}") });
            self.slots[i] = Slot::Done(Done::NotVerified { key: manifest.key(), reason });
            return Ok(());
        }
        let reason_json = serde_json::to_string(&reason).unwrap_or_default();
        let row = self.s.cache.start_stage(self.run_id, &stage.name, &self.s.env_name, &manifest, &reason_json)?;
        self.sink.event(&Event::Started { stage: stage.name.clone(), reason: reason.clone() });
        let script = stage.run.join("\n");
        self.spawn(i, script, Active::new(JobKind::Stage { row }, manifest, Some(reason), None, Vec::new()))
    }

    fn spawn(&mut self, i: usize, script: String, active: Active) -> Result<(), Error> {
        let stage = self.s.stage(i).clone();
        let job = self.next_job;
        self.next_job += 1;
        self.jobs.insert(job, i);
        let spec = exec::Spec { script, cwd: stage.dir.under(&self.s.root), env: self.s.command_env(&stage) };
        exec::spawn(job, spec, self.s.masker.clone(), self.tx.clone());
        self.slots[i] = Slot::Active(Box::new(active));
        Ok(())
    }

    fn handle(&mut self, msg: Msg, interrupted: bool) -> Result<(), Error> {
        match msg {
            Msg::Spawned { job, pgid } => {
                if let Some(&i) = self.jobs.get(&job)
                    && let Slot::Active(a) = &mut self.slots[i]
                {
                    a.pgid = Some(pgid);
                }
            }
            Msg::Line { job, line } => {
                // Probe and regenerate output is kept for the drift report, not streamed.
                if let Some(&i) = self.jobs.get(&job)
                    && matches!(&self.slots[i], Slot::Active(a) if matches!(a.kind, JobKind::Stage { .. }))
                {
                    self.sink.event(&Event::Line { stage: self.name(i), line });
                }
            }
            Msg::Exited { job, result } => {
                let Some(i) = self.jobs.remove(&job) else {
                    return Ok(());
                };
                let Slot::Active(a) = std::mem::replace(&mut self.slots[i], Slot::Waiting) else {
                    return Ok(());
                };
                let a = *a;
                match a.kind {
                    JobKind::Stage { row } => {
                        self.workspace_changed = true;
                        self.stage_exited(i, row, a.manifest, a.reason.unwrap_or(Reason::Forced), result, interrupted)?;
                    }
                    JobKind::Probe => {
                        self.probe_exited(i, a.manifest, a.hit.expect("probe has a hit"), a.restored, result)?
                    }
                    JobKind::Regenerate => {
                        self.workspace_changed = true;
                        self.regenerate_exited(i, a.manifest, a.hit.expect("regenerate has a hit"), a.restored, result)?
                    }
                }
            }
        }
        Ok(())
    }

    fn stage_exited(
        &mut self,
        i: usize,
        row: i64,
        manifest: Manifest,
        reason: Reason,
        exit: Exit,
        interrupted: bool,
    ) -> Result<(), Error> {
        let stage = self.s.stage(i).clone();
        let key = manifest.key();
        let mut end = End { row, duration: exit.duration, code: exit.code, log: exit.log, outputs: Vec::new() };
        if exit.code == Some(0) {
            match outputs::collect(&self.s.root, &stage.outputs, &self.s.cache.blobs) {
                Ok(outs) => {
                    for o in &outs {
                        self.s.mask_output(o);
                    }
                    end.outputs = outs.clone();
                    self.conclude(i, State::Success, end, None)?;
                    self.slots[i] = Slot::Done(Done::Ran { outputs: outs, duration: exit.duration, key, reason });
                    return Ok(());
                }
                Err(e) => {
                    // Exit code 0 without its declared outputs is still a failure.
                    end.log.extend_from_slice(format!("kkpipe: {e}\n").as_bytes());
                    end.code = Some(1);
                    return self.fail(i, key, reason, end, e.to_string());
                }
            }
        }
        if interrupted {
            self.conclude(i, State::Interrupted, end, Some("interrupted".into()))?;
            self.slots[i] = Slot::Done(Done::Interrupted { key, reason });
            return Ok(());
        }
        let detail = match (exit.code, exit.signal, &exit.spawn_error) {
            (_, _, Some(e)) => e.clone(),
            (Some(c), _, _) => format!("exit code {c}"),
            (None, Some(s), _) => format!("killed by signal {s}"),
            _ => "failed".into(),
        };
        if let Some(pattern) = stage.retry_needs_if.clone()
            && !self.retried.contains(&i)
            && String::from_utf8_lossy(&end.log).contains(&pattern)
        {
            self.conclude(i, State::Failed, end, Some(format!("{detail}; output says \"{pattern}\"")))?;
            self.retried.insert(i);
            let needs = self.s.graph.needs[i].clone();
            let names: Vec<String> = needs.iter().map(|&j| format!("`{}`", self.name(j))).collect();
            self.sink.event(&Event::Info(format!(
                "kkpipe: `{}` reported \"{pattern}\": rerunning {} and retrying `{}` once",
                stage.name,
                names.join(", "),
                stage.name
            )));
            for j in needs {
                self.slots[j] = Slot::Waiting;
                self.replan.insert(j, stage.name.clone());
            }
            self.slots[i] = Slot::Waiting;
            return Ok(());
        }
        self.fail(i, key, reason, end, detail)
    }

    /// Record how a stage run ended (one transaction: state, log, outputs) and announce it. A failure's
    /// log is shown again in quiet mode.
    fn conclude(&mut self, i: usize, state: State, end: End, detail: Option<String>) -> Result<(), Error> {
        let ok = state == State::Success;
        self.s.cache.finish_stage(end.row, state, end.duration.as_millis() as i64, end.code, &end.log, &end.outputs)?;
        let log = if ok || state == State::Interrupted { Vec::new() } else { end.log };
        self.sink.event(&Event::Finished { stage: self.name(i), ok, duration: end.duration, detail, log });
        Ok(())
    }

    fn fail(&mut self, i: usize, key: Key, reason: Reason, end: End, detail: String) -> Result<(), Error> {
        let duration = end.duration;
        self.conclude(i, State::Failed, end, Some(detail))?;
        self.slots[i] = Slot::Done(Done::Failed { duration, key: Some(key), reason: Some(reason) });
        if self.opts.fail_fast && self.stopping.is_none() {
            self.stopping = Some("not started: a stage failed and --fail-fast is set".into());
        }
        Ok(())
    }

    fn probe_exited(
        &mut self,
        i: usize,
        manifest: Manifest,
        hit: Hit,
        restored: Vec<String>,
        exit: Exit,
    ) -> Result<(), Error> {
        if exit.success() {
            self.verified.insert(i);
            self.finish_fresh(i, &manifest, hit, restored);
            return Ok(());
        }
        let output = String::from_utf8_lossy(&exit.log).into_owned();
        self.sink.event(&Event::Drift { stage: self.name(i), output: output.clone() });
        if self.opts.probe_only {
            self.slots[i] = Slot::Done(Done::Drifted { key: manifest.key(), output });
            return Ok(());
        }
        self.launch_stage(i, manifest, Reason::Drift { output })
    }

    fn regenerate_exited(
        &mut self,
        i: usize,
        manifest: Manifest,
        mut hit: Hit,
        mut restored: Vec<String>,
        exit: Exit,
    ) -> Result<(), Error> {
        let regenerated: Vec<OutputRecord> = std::mem::take(&mut hit.unavailable);
        if !exit.success() {
            // The command may read outputs of the stages it needs that are not there either (a kubeconfig is
            // made from terraform's output): materialize those, then try once more.
            if self.regenerate_retried.insert(i) && !self.needs_available(i) {
                return Ok(());
            }
            self.materialize.remove(&i);
            let path = regenerated.first().map(|o| o.path.display()).unwrap_or_default();
            return self.launch_stage(i, manifest, Reason::OutputMissing { path });
        }
        self.materialize.remove(&i);
        for o in &regenerated {
            if outputs::check(&self.s.root, o, &self.s.hasher) != outputs::Present::Same {
                return self.launch_stage(i, manifest, Reason::OutputRegeneratedDiffers { path: o.path.display() });
            }
            self.s.mask_output(o);
        }
        restored.extend(regenerated.iter().map(|o| o.path.display()));
        let stage = self.s.stage(i).clone();
        if stage.is_deploy()
            && self.opts.verify
            && let Some(probe) = stage.verify.clone()
        {
            return self.spawn(i, probe, Active::new(JobKind::Probe, manifest, None, Some(hit), restored));
        }
        self.finish_fresh(i, &manifest, hit, restored);
        Ok(())
    }

    fn rows(&self, selected: &[Selected]) -> (Vec<StageRow>, Summary) {
        let mut rows = Vec::new();
        let mut sum = Summary::default();
        for &i in &self.s.graph.order {
            let stage = self.s.stage(i);
            let mut row = StageRow::new(stage, StageState::Skipped);
            match (&selected[i], &self.slots[i]) {
                (Selected::NotRequested, _) => continue,
                (Selected::SkippedByEvent, _) => row.state = StageState::SkippedByEvent,
                (_, Slot::Done(d)) => match d {
                    Done::Fresh { restored, unavailable, recorded_ms, saved_ms, key, .. } => {
                        row.state = if restored.is_empty() { StageState::Fresh } else { StageState::Restored };
                        if !unavailable.is_empty() {
                            row.note = Some(crate::report::unavailable_note(unavailable));
                        }
                        row.key = Some(key.to_string());
                        row.restored = restored.clone();
                        row.duration_ms = Some(*saved_ms);
                        row.recorded_at = Some(crate::report::timestamp(*recorded_ms));
                        if restored.is_empty() {
                            sum.fresh += 1;
                        } else {
                            sum.restored += 1;
                        }
                        if self.verified.contains(&i) {
                            sum.verified += 1;
                        }
                        sum.saved_ms += (*saved_ms).max(0) as u64;
                    }
                    Done::Ran { duration, key, reason, .. } => {
                        row.state = StageState::Ran;
                        row.key = Some(key.to_string());
                        row.reasons = vec![reason.clone()];
                        row.duration_ms = Some(duration.as_millis() as i64);
                        sum.ran += 1;
                    }
                    Done::Failed { duration, key, reason } => {
                        row.state = StageState::Failed;
                        row.key = key.map(|k| k.to_string());
                        row.reasons = reason.iter().cloned().collect();
                        row.duration_ms = Some(duration.as_millis() as i64);
                        sum.failed += 1;
                    }
                    Done::Skipped(because) => {
                        row.note = Some(because.clone());
                        sum.skipped += 1;
                    }
                    Done::Interrupted { key, reason } => {
                        row.state = StageState::Interrupted;
                        row.key = Some(key.to_string());
                        row.reasons = vec![reason.clone()];
                        sum.interrupted += 1;
                    }
                    Done::NotVerified { key, reason } => {
                        row.state = StageState::Stale;
                        row.key = Some(key.to_string());
                        row.reasons = vec![reason.clone()];
                        row.note = Some("not verified: stale".into());
                    }
                    Done::Drifted { key, output } => {
                        row.state = StageState::Drifted;
                        row.key = Some(key.to_string());
                        row.reasons = vec![Reason::Drift { output: output.clone() }];
                        sum.drifted += 1;
                    }
                },
                _ => sum.skipped += 1,
            }
            rows.push(row);
        }
        (rows, sum)
    }
}

/// The checked-out commit, read from `.git` without spawning git (cheap, and fine when git is absent).
pub fn git_head(root: &std::path::Path) -> Option<String> {
    let mut git_dir = root.join(".git");
    if git_dir.is_file() {
        let text = std::fs::read_to_string(&git_dir).ok()?;
        git_dir = root.join(text.strip_prefix("gitdir:")?.trim());
    }
    let head = std::fs::read_to_string(git_dir.join("HEAD")).ok()?;
    let head = head.trim();
    let Some(reference) = head.strip_prefix("ref:") else {
        return Some(head.to_string());
    };
    let reference = reference.trim();
    if let Ok(h) = std::fs::read_to_string(git_dir.join(reference)) {
        return Some(h.trim().to_string());
    }
    let packed = std::fs::read_to_string(git_dir.join("packed-refs")).ok()?;
    packed.lines().find_map(|l| l.strip_suffix(reference).map(|h| h.trim().to_string()))
}
