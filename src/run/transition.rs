//! The edges of a stage's state machine (docs/architecture.md, "A stage's run") that follow a job's end or a
//! hit, without I/O: given what happened, where the stage goes next. The scheduler does what the answer says
//! (restore, spawn, record) and decides no edge itself. With the queue (`queue.rs`: waiting -> ready or
//! blocked), these are the transitions; the unit tests below walk each edge.

use crate::fresh::{self, OutputRecord, Reason};
use crate::pipeline::{OnDrift, Stage};

/// How a stage's own command ended, and what the run knows around it.
pub(super) struct CommandEnd<'a> {
    pub(super) code: Option<i32>,
    pub(super) signal: Option<i32>,
    pub(super) spawn_error: Option<&'a str>,
    /// A signal asked kkpipe to stop while the command ran (or before its end was handled).
    pub(super) stopped: bool,
    /// The first line of its failure note, masked (`exec::note_summary`).
    pub(super) note: Option<&'a str>,
    /// Its output, masked.
    pub(super) log: &'a [u8],
    pub(super) retry_needs_if: Option<&'a str>,
    /// Its needs were sent back once already in this run.
    pub(super) retried: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum AfterCommand {
    /// Stopped by a signal, whatever its exit code: its outputs may be partial.
    Interrupted,
    /// Exit code 0: collect its outputs.
    Succeeded,
    /// `retry_needs_if` matched: its needs run again, then it does, once.
    RetryNeeds {
        detail: String,
    },
    Failed {
        detail: String,
    },
}

pub(super) fn after_command(e: &CommandEnd) -> AfterCommand {
    if e.stopped {
        return AfterCommand::Interrupted;
    }
    if e.code == Some(0) {
        return AfterCommand::Succeeded;
    }
    let how = match (e.code, e.signal, e.spawn_error) {
        (_, _, Some(err)) => err.to_string(),
        (Some(c), _, _) => format!("exit code {c}"),
        (None, Some(s), _) => format!("killed by signal {s}"),
        _ => "failed".into(),
    };
    let detail = match e.note {
        Some(n) => format!("{how}: {n}"),
        None => how,
    };
    match e.retry_needs_if {
        Some(p) if !e.retried && String::from_utf8_lossy(e.log).contains(p) => {
            AfterCommand::RetryNeeds { detail: format!("{detail}; output says \"{p}\"") }
        }
        _ => AfterCommand::Failed { detail },
    }
}

/// The drift probe a fresh deploy stage runs before it counts as fresh, if any.
pub(super) fn probe_of(stage: &Stage, verify: bool) -> Option<&str> {
    stage.verify.as_deref().filter(|_| stage.is_deploy() && verify)
}

/// What a fresh stage does once its outputs are restored.
#[derive(Debug, PartialEq)]
pub(super) enum AfterHit {
    /// Remake the outputs that are in no cache with their `regenerate` commands.
    Regenerate(String),
    /// An output is in no cache and nothing can remake it: the stage runs.
    RunAfterAll(Reason),
    /// Its drift probe decides.
    Probe(String),
    Fresh,
}

/// `materialize`: a stage that needs it runs and reads its outputs, so those in no cache must be made.
pub(super) fn after_hit(stage: &Stage, verify: bool, materialize: bool, unavailable: &[OutputRecord]) -> AfterHit {
    if materialize && !unavailable.is_empty() {
        return match regenerate_script(stage, unavailable) {
            Some(script) => AfterHit::Regenerate(script),
            None => AfterHit::RunAfterAll(output_missing(unavailable)),
        };
    }
    after_outputs(stage, verify)
}

/// Every output is in place (restored or regenerated): probe, or fresh.
fn after_outputs(stage: &Stage, verify: bool) -> AfterHit {
    match probe_of(stage, verify) {
        Some(p) => AfterHit::Probe(p.to_string()),
        None => AfterHit::Fresh,
    }
}

/// The `regenerate` commands of `missing`, each once, in order; `None` when one has none.
pub(super) fn regenerate_script(stage: &Stage, missing: &[OutputRecord]) -> Option<String> {
    script_of(missing.iter().map(|o| fresh::regenerate_command(stage, o)))
}

/// Commands as one script, each once, in order; `None` when one is missing.
pub(super) fn script_of<'s>(commands: impl Iterator<Item = Option<&'s str>>) -> Option<String> {
    let mut cmds: Vec<&str> = Vec::new();
    for cmd in commands {
        let cmd = cmd?;
        if !cmds.contains(&cmd) {
            cmds.push(cmd);
        }
    }
    Some(cmds.join("\n"))
}

/// What a fresh deploy stage does after its drift probe ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum AfterProbe {
    /// The run is stopping: a probe the stop cut short says nothing about the live system (one may exit 0 on
    /// the signal).
    Skip,
    /// In sync: fresh, and verified.
    InSync,
    /// Drift, and the stage stops there (`verify`, or `on_drift = "fail"`).
    Drifted,
    /// Drift: deploy again (`on_drift = "apply"`).
    Redeploy,
}

pub(super) fn after_probe(stopped: bool, in_sync: bool, probe_only: bool, on_drift: OnDrift) -> AfterProbe {
    match (stopped, in_sync) {
        (true, _) => AfterProbe::Skip,
        (false, true) => AfterProbe::InSync,
        (false, false) if probe_only || on_drift == OnDrift::Fail => AfterProbe::Drifted,
        (false, false) => AfterProbe::Redeploy,
    }
}

/// What a stage does after its `regenerate` commands failed.
#[derive(Debug, PartialEq)]
pub(super) enum AfterRegenerateFailed {
    /// Once: the commands may read outputs of its needs that are in no cache either (a kubeconfig made from
    /// terraform's output); those are made and the stage is decided again.
    MakeNeedsFirst,
    /// It runs, for the first output that could not be remade.
    RunAfterAll(Reason),
}

pub(super) fn after_regenerate_failed(first_time: bool, missing: &[OutputRecord]) -> AfterRegenerateFailed {
    match first_time {
        true => AfterRegenerateFailed::MakeNeedsFirst,
        false => AfterRegenerateFailed::RunAfterAll(output_missing(missing)),
    }
}

/// Why a stage runs when outputs of its could not be remade: the first of them.
pub(super) fn output_missing(missing: &[OutputRecord]) -> Reason {
    Reason::OutputMissing { path: missing.first().map(|o| o.path.display()).unwrap_or_default() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::{Entry, Hash};
    use crate::relpath::RelPath;

    fn stages(toml: &str) -> Vec<Stage> {
        let root = std::path::Path::new("/repo");
        crate::pipeline::parse(root, &root.join("pipeline.toml"), toml).unwrap().stages
    }

    fn stage(toml: &str) -> Stage {
        stages(toml).remove(0)
    }

    fn missing(path: &str) -> OutputRecord {
        let entry = Entry::File { hash: Hash::of(path.as_bytes()), exec: false };
        OutputRecord {
            path: RelPath::from_bytes(path.as_bytes()).unwrap(),
            entry,
            size: 1,
            sensitive: false,
            mode: None,
        }
    }

    fn end<'a>(code: Option<i32>, log: &'a [u8]) -> CommandEnd<'a> {
        let retry = Some("Saved plan is stale");
        CommandEnd {
            code,
            signal: None,
            spawn_error: None,
            stopped: false,
            note: None,
            log,
            retry_needs_if: retry,
            retried: false,
        }
    }

    #[test]
    fn a_command_that_was_stopped_is_interrupted_whatever_its_exit_code() {
        for code in [Some(0), Some(1), None] {
            assert_eq!(after_command(&CommandEnd { stopped: true, ..end(code, b"") }), AfterCommand::Interrupted);
        }
        assert_eq!(after_command(&end(Some(0), b"Saved plan is stale")), AfterCommand::Succeeded);
    }

    #[test]
    fn a_failure_says_how_it_failed_with_the_first_line_of_its_note() {
        let failed = |e: CommandEnd| match after_command(&e) {
            AfterCommand::Failed { detail } => detail,
            other => panic!("{other:?}"),
        };
        assert_eq!(failed(end(Some(2), b"")), "exit code 2");
        assert_eq!(failed(CommandEnd { signal: Some(9), ..end(None, b"") }), "killed by signal 9");
        assert_eq!(failed(CommandEnd { spawn_error: Some("cannot start sh"), ..end(None, b"") }), "cannot start sh");
        assert_eq!(
            failed(CommandEnd { note: Some("quota exceeded"), ..end(Some(1), b"") }),
            "exit code 1: quota exceeded"
        );
        assert_eq!(failed(end(None, b"")), "failed");
    }

    #[test]
    fn retry_needs_if_sends_the_needs_back_once_when_the_output_says_so() {
        let log = b"Error: Saved plan is stale\n";
        let detail = "exit code 1; output says \"Saved plan is stale\"".to_string();
        assert_eq!(after_command(&end(Some(1), log)), AfterCommand::RetryNeeds { detail });
        let again = CommandEnd { retried: true, ..end(Some(1), log) };
        assert!(matches!(after_command(&again), AfterCommand::Failed { .. }), "only once");
        assert!(matches!(after_command(&end(Some(1), b"Error: other")), AfterCommand::Failed { .. }));
        let no_pattern = CommandEnd { retry_needs_if: None, ..end(Some(1), log) };
        assert!(matches!(after_command(&no_pattern), AfterCommand::Failed { .. }));
    }

    const STAGES: &str = r#"
[stages.apply]
kind = "deploy"
run = "true"
verify = "terraform plan -detailed-exitcode"
outputs = [{ path = "out/kubeconfig", regenerate = "make-kubeconfig" }, "out/state.json"]

[stages.check]
run = "true"
outputs = [{ path = "out/a", regenerate = "make-a" }]
"#;

    #[test]
    fn only_a_stage_with_a_probe_is_probed_and_only_when_verifying() {
        let s = stages(STAGES);
        let apply = s.iter().find(|s| s.name == "apply").unwrap();
        let check = s.iter().find(|s| s.name == "check").unwrap();
        assert_eq!(probe_of(apply, true), Some("terraform plan -detailed-exitcode"));
        assert_eq!(probe_of(apply, false), None, "--no-verify");
        assert_eq!(probe_of(check, true), None, "no probe (pipeline.toml allows one on deploy stages only)");
        assert_eq!(after_outputs(apply, true), AfterHit::Probe("terraform plan -detailed-exitcode".into()));
        assert_eq!(after_outputs(check, true), AfterHit::Fresh);
    }

    #[test]
    fn outputs_in_no_cache_are_regenerated_only_when_a_dependent_needs_them() {
        let s = stages(STAGES);
        let apply = s.iter().find(|s| s.name == "apply").unwrap();
        let kubeconfig = [missing("out/kubeconfig")];
        assert_eq!(after_hit(apply, true, true, &kubeconfig), AfterHit::Regenerate("make-kubeconfig".into()));
        // Nobody reads them: the probe decides, the outputs stay missing.
        assert_eq!(
            after_hit(apply, true, false, &kubeconfig),
            AfterHit::Probe("terraform plan -detailed-exitcode".into())
        );
        assert_eq!(after_hit(apply, false, false, &kubeconfig), AfterHit::Fresh);
        // One output without a `regenerate` command: the stage runs, naming the first missing output.
        let both = [missing("out/kubeconfig"), missing("out/state.json")];
        let reason = Reason::OutputMissing { path: "out/kubeconfig".into() };
        assert_eq!(after_hit(apply, true, true, &both), AfterHit::RunAfterAll(reason));
        assert_eq!(after_hit(apply, true, true, &[]), AfterHit::Probe("terraform plan -detailed-exitcode".into()));
    }

    #[test]
    fn a_regenerate_script_runs_each_command_once_in_order() {
        let s = stage(
            r#"
[stages.kubeone]
run = "true"
outputs = [{ path = "a", regenerate = "make both" }, { path = "b", regenerate = "make both" }, { path = "c", regenerate = "make c" }]
"#,
        );
        let all = [missing("a"), missing("c"), missing("b")];
        assert_eq!(regenerate_script(&s, &all).as_deref(), Some("make both\nmake c"));
    }

    #[test]
    fn a_probe_decides_in_sync_drifted_or_redeploy_and_nothing_when_stopped() {
        use AfterProbe::*;
        assert_eq!(after_probe(true, true, false, OnDrift::Apply), Skip);
        assert_eq!(after_probe(true, false, false, OnDrift::Apply), Skip);
        assert_eq!(after_probe(false, true, false, OnDrift::Fail), InSync);
        assert_eq!(after_probe(false, false, false, OnDrift::Apply), Redeploy);
        assert_eq!(after_probe(false, false, false, OnDrift::Fail), Drifted);
        assert_eq!(after_probe(false, false, true, OnDrift::Apply), Drifted, "`kkpipe verify` never deploys");
    }

    #[test]
    fn a_failed_regeneration_makes_the_needs_first_once_then_runs_the_stage() {
        let m = [missing("out/kubeconfig")];
        assert_eq!(after_regenerate_failed(true, &m), AfterRegenerateFailed::MakeNeedsFirst);
        let reason = Reason::OutputMissing { path: "out/kubeconfig".into() };
        assert_eq!(after_regenerate_failed(false, &m), AfterRegenerateFailed::RunAfterAll(reason));
    }
}
