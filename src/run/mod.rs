//! Running the graph: the scheduler ([`scheduler`]) runs stale stages as processes ([`exec`]) under the
//! repository's run lock ([`lock`]), restores fresh ones, records every attempt, and reports by events.

pub(crate) mod exec;
pub(crate) mod lock;
mod queue;
mod scheduler;
mod transition;
pub(crate) mod watchdog;

pub(crate) use scheduler::run;

use crate::cache::Cache;
use crate::mask::Masker;
use crate::report::{StageRow, Summary};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error(transparent)]
    Session(#[from] crate::session::Error),
    #[error(transparent)]
    Cache(#[from] crate::cache::Error),
    #[error(transparent)]
    Graph(#[from] crate::graph::Error),
    /// Stages that may run lack variables they require (`required_env`): nothing was started.
    #[error("{}", missing_env(.0))]
    MissingEnv(Vec<(String, String)>),
    /// Deploy stages whose inputs have uncommitted changes, without `--allow-dirty`: nothing was started.
    #[error("{}", dirty(.0))]
    Dirty(Vec<(String, String)>),
    /// Tools of stages that may run say another version than the pipeline pins: nothing was started.
    #[error(
        "not started: tools are not the versions the pipeline pins:\n  {}\n  hint: install the pinned versions (the CI file does), or change the pin in the stage's `env`",
        .0.join("\n  ")
    )]
    ToolVersions(Vec<String>),
    /// Whether deploy inputs have uncommitted changes cannot be told (git fails): nothing was started.
    #[error(
        "cannot tell whether the deploy stages' inputs have uncommitted changes: {0}\n  hint: fix what git says, or pass --allow-dirty to deploy the working tree as it is"
    )]
    CannotTellDirty(String),
    /// A run that would deploy was not confirmed: nothing was started.
    #[error("{}", not_confirmed(.stages, .env, *.asked))]
    NotConfirmed { stages: Vec<String>, env: String, asked: bool },
}

fn dirty(found: &[(String, String)]) -> String {
    let lines: Vec<String> = found.iter().map(|(s, p)| format!("  stage `{s}`: `{p}`")).collect();
    format!(
        "not started: deploy stages would ship uncommitted changes to their inputs:\n{}\n  hint: commit them (the ledger records the commit that was deployed), or pass --allow-dirty to deploy the working tree as it is",
        lines.join("\n")
    )
}

fn not_confirmed(stages: &[String], env: &str, asked: bool) -> String {
    let list: Vec<String> = stages.iter().map(|s| format!("`{s}`")).collect();
    let why = match asked {
        true => "not confirmed",
        false => "no terminal to ask on",
    };
    format!(
        "not started: this run would deploy {} to environment `{env}` ({why})\n  hint: pass --yes to deploy without asking, or run the stages that do not deploy by name (`kkpipe status` shows which would run)",
        list.join(", ")
    )
}

/// What a run does with a deploy stage that would deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deploys {
    /// Deploy it; but one with a `verify` probe and no record in this environment is probed first and adopted
    /// when the live system already matches its inputs.
    Run,
    /// `kkpipe adopt`: never deploy; probe each and adopt it when in sync (one without a probe only with
    /// `assume_deployed`).
    Adopt { assume_deployed: bool },
}

/// Whether a run that would deploy may go on (docs/pipeline-toml.md, "A deploy is deliberate").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Consent {
    /// In CI, or `--yes`: deploy without asking.
    Given,
    /// Outside CI on a terminal: list the deploys and ask.
    Ask,
    /// Outside CI without a terminal and without `--yes`: deploy nothing.
    Refused,
}

/// Ask a yes/no question on the terminal (stderr), default no.
pub(crate) fn ask_on_terminal(question: &str) -> bool {
    use std::io::Write;
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).is_ok() && matches!(answer.trim(), "y" | "Y" | "yes" | "Yes" | "YES")
}

fn missing_env(missing: &[(String, String)]) -> String {
    let lines: Vec<String> = missing.iter().map(|(s, v)| format!("  stage `{s}` requires `{v}`")).collect();
    format!(
        "not started: {} required variable(s) are not set (or empty), and the stages that need them may run:\n{}\n  hint: set them in the environment; in CI, as secrets of the same names (docs/ci.md), passed to the job",
        missing.len(),
        lines.join("\n")
    )
}

#[derive(Debug, Clone, Default)]
pub(crate) enum Force {
    #[default]
    No,
    All,
    Stages(Vec<String>),
}

impl Force {
    pub(crate) fn includes(&self, stage: &str) -> bool {
        match self {
            Force::No => false,
            Force::All => true,
            Force::Stages(list) => list.iter().any(|s| s == stage),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Options {
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
    /// How long to wait for another runner's deploy lease on the remote (`--lock-timeout`).
    pub lock_timeout: std::time::Duration,
    /// How long stages get to stop after a forwarded SIGINT/SIGTERM (or kkpipe's death) before SIGKILL
    /// (`KKPIPE_STOP_GRACE`).
    pub stop_grace: std::time::Duration,
    /// Deploy, or adopt what is in sync (`kkpipe adopt`).
    pub deploys: Deploys,
    /// Whether deploys may start (`--yes`, CI, or a question on the terminal).
    pub consent: Consent,
    /// Deploy inputs with uncommitted changes (`--allow-dirty`).
    pub allow_dirty: bool,
    /// Running in CI: untracked files there are the pipeline's own, not uncommitted edits.
    pub in_ci: bool,
}

/// The signal number that asked us to stop, set from a signal handler.
#[derive(Clone, Default)]
pub(crate) struct Interrupt(pub Arc<AtomicUsize>);

impl Interrupt {
    pub(crate) fn install() -> Interrupt {
        let flag = Arc::new(AtomicUsize::new(0));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
            let _ = signal_hook::flag::register_usize(sig, flag.clone(), sig as usize);
        }
        Interrupt(flag)
    }

    pub(crate) fn signal(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s as i32),
        }
    }
}

/// Messages a job (a stage's process, a wait for a deploy lease, a lookup on the remote) sends to the scheduler thread, which owns
/// all state and all printing.
pub(crate) enum Msg {
    Spawned {
        job: usize,
        pgid: i32,
    },
    Line {
        job: usize,
        line: Vec<u8>,
    },
    Exited {
        job: usize,
        result: exec::Exit,
    },
    /// The deploy lease is held by another runner: the wait has begun.
    LeaseHeld {
        job: usize,
        holder: String,
    },
    /// The wait for a deploy lease is over.
    Leased {
        job: usize,
        result: Result<crate::remote::LeaseGuard, crate::remote::LeaseError>,
    },
    /// A check stage's lookup on the remote is over: what it found, if anything.
    LookedUp {
        job: usize,
        found: Option<crate::remote::Fetched>,
    },
}

pub(crate) struct Outcome {
    pub rows: Vec<StageRow>,
    pub summary: Summary,
    pub failed: bool,
    /// The signal that interrupted the run, if any.
    pub interrupted: Option<i32>,
    /// A deploy did not start: another runner held its deploy lease for longer than `--lock-timeout`.
    pub locked_out: bool,
}

/// What a run needs besides the session: the cache, the caller's environment, and the masker of the
/// invocation (stage output is masked with it before it is shown or stored).
pub(crate) struct Env<'a> {
    pub cache: &'a Cache,
    pub caller_env: &'a HashMap<String, String>,
    pub masker: Arc<RwLock<Masker>>,
    /// The shared cache and deploy ledger, when one is configured and not off.
    pub remote: Option<Arc<crate::remote::Remote>>,
}
