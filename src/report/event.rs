//! The one stream of what happens in a run: typed [`Event`]s, which every reporter (human, JSON report, JSON
//! lines, CI conventions) consumes as a peer through [`Sink`].

use super::{StageRow, Summary};
use crate::fresh::Reason;
use serde::Serialize;
use std::time::Duration;

/// Something that happened, in the order it happened. Serialised (one JSON object per line) by `run
/// --json-lines`: schema `kkpipe.event.v1`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub(crate) enum Event {
    /// Something the user should look at; the run goes on.
    Warning {
        message: String,
    },
    Notice(Notice),
    /// A stage is fresh (with its outputs put back from the cache, if `restored` names any).
    Fresh {
        stage: String,
        restored: Vec<String>,
        #[serde(rename = "saved_ms", serialize_with = "millis")]
        saved: Duration,
    },
    Started {
        stage: String,
        reason: Reason,
    },
    /// A deploy stage's drift probe runs.
    Probing {
        stage: String,
    },
    /// A line of a stage's output, masked.
    Line {
        stage: String,
        #[serde(rename = "text", serialize_with = "lossy")]
        line: Vec<u8>,
    },
    Finished {
        stage: String,
        end: StageEnd,
        #[serde(rename = "duration_ms", serialize_with = "millis")]
        duration: Duration,
        /// The stage's log, shown again by quiet human output when it failed.
        #[serde(skip)]
        log: Vec<u8>,
    },
    /// Not started: a stage it needs did not succeed, or the run stopped first.
    Skipped {
        stage: String,
        because: String,
    },
    /// `run --dry-run`; `masked`: the reason's text with secrets masked.
    WouldRun {
        stage: String,
        reason: Reason,
        #[serde(skip)]
        masked: String,
    },
    /// A deploy stage's probe says the live system no longer matches its last apply.
    Drift {
        stage: String,
        output: String,
        /// What drifted, when the probe is a `terraform plan`: its resources and how they change.
        resources: Vec<crate::tfplan::TextChange>,
    },
    Summary(Summary),
    /// The last event of `run`, `verify` and `run --dry-run`: every stage's row.
    Report {
        stages: Vec<StageRow>,
        summary: Summary,
    },
}

/// How a stage that was started (or was about to be) ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub(crate) enum StageEnd {
    Ok,
    /// It ran and failed: `detail` says how (an exit code, a signal, declared outputs it did not make).
    Failed {
        detail: String,
    },
    /// A signal asked the run to stop while it ran: never a success, whatever its exit code.
    Interrupted,
    /// It was not started after all: its tools cannot be keyed, its deploy lease was refused or held too long.
    NotStarted {
        detail: String,
    },
    /// A deploy stage with no record here: its probe found the live system already matching its inputs (or
    /// `adopt --assume-deployed`), so it was recorded as deployed instead of run.
    Adopted,
}

/// What kkpipe does on its own account, as it does it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "notice", rename_all = "kebab-case")]
pub(crate) enum Notice {
    /// The CI event (and deployment environment) the stages are selected for.
    Selecting { ci_event: String, env: String },
    /// SIGINT or SIGTERM: running stages are stopped, within the stop grace.
    Stopping {
        signal: String,
        #[serde(rename = "grace_ms", serialize_with = "millis")]
        grace: Duration,
    },
    /// A check stage's result with these inputs was found on the shared remote.
    RemoteHit { stage: String, remote: String },
    /// The remote's ledger had no record of a deploy stage that this cache remembers deployed: this runner
    /// published it (moving an installation onto the remote).
    Published { stage: String, remote: String },
    /// Outputs in no cache are made again by their `regenerate` command, for a stage that needs them.
    Regenerating { stage: String, outputs: Vec<String> },
    /// A deploy stage being adopted (in sync) makes its outputs again from the live system.
    Adopting { stage: String, outputs: Vec<String> },
    /// A deploy stage waits for its deploy lease, held by another runner.
    LeaseWait { stage: String, holder: String },
    /// `retry_needs_if`: the stage's output asked for its needs to run again; it is retried once.
    Retrying { stage: String, pattern: String, needs: Vec<String> },
    /// The stage ran, but its inputs changed while it did (or could not be read again): its outputs go to the
    /// stages that need it, but the result is not kept as a success to reuse; it runs again next time.
    NotKept { stage: String, why: String },
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let quoted = |list: &[String]| list.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        match self {
            Notice::Selecting { ci_event, env } => {
                write!(f, "kkpipe: selecting stages for {ci_event} (environment `{env}`)")
            }
            Notice::Stopping { signal, grace } => write!(
                f,
                "kkpipe: {signal} received: stopping running stages (waiting up to {})",
                super::format_duration(*grace)
            ),
            Notice::RemoteHit { stage, remote } => {
                write!(f, "kkpipe: `{stage}` with these inputs is on the remote `{remote}`")
            }
            Notice::Published { stage, remote } => write!(
                f,
                "kkpipe: the remote `{remote}` had no record of `{stage}`: published what this cache remembers deployed"
            ),
            Notice::Regenerating { stage, outputs } => write!(
                f,
                "Regenerating {} of `{stage}` (not in the cache; a stage that needs it runs, or a probe reads it)",
                quoted(outputs)
            ),
            Notice::Adopting { stage, outputs } => {
                write!(f, "kkpipe: `{stage}` is in sync: making {} again from the live system", quoted(outputs))
            }
            Notice::LeaseWait { stage, holder } => {
                write!(f, "kkpipe: waiting for the deploy lease of `{stage}`, held by {holder}")
            }
            Notice::NotKept { stage, why } => write!(
                f,
                "kkpipe: `{stage}`: {why}; its result is not kept (it runs again next time)\n  hint: a file the \
                 stage writes itself belongs in its `outputs` or `exclude`; a lock file it updates, committed"
            ),
            Notice::Retrying { stage, pattern, needs } => write!(
                f,
                "kkpipe: `{stage}` reported \"{pattern}\": rerunning {} and retrying `{stage}` once",
                quoted(needs)
            ),
        }
    }
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

fn lossy<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(b))
}

/// A reporter: it sees every event of the stream.
pub(crate) trait Sink {
    fn event(&mut self, e: &Event);
    /// Called about every 50 ms while stages run, with each running stage and how long it has run.
    fn tick(&mut self, _running: &[(String, Duration)]) {}
}

/// Several reporters as peers: each event goes to each, in order.
pub(crate) struct Fanout(pub Vec<Box<dyn Sink>>);

impl Sink for Fanout {
    fn event(&mut self, e: &Event) {
        for s in &mut self.0 {
            s.event(e);
        }
    }

    fn tick(&mut self, running: &[(String, Duration)]) {
        for s in &mut self.0 {
            s.tick(running);
        }
    }
}

/// `run --json-lines`: each event, as it happens, as one line of JSON on stdout (flushed at once, so a
/// follower sees it live).
pub(crate) struct JsonLines;

pub(crate) const EVENT_SCHEMA: &str = "kkpipe.event.v1";

impl Sink for JsonLines {
    fn event(&mut self, e: &Event) {
        use std::io::Write;
        let mut value = serde_json::to_value(e).expect("events serialise");
        if let Some(obj) = value.as_object_mut() {
            obj.insert("schema".into(), EVENT_SCHEMA.into());
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{value}");
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_with_their_kind_and_typed_fields() {
        let e = Event::Notice(Notice::LeaseWait { stage: "apply".into(), holder: "ci@runner".into() });
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"event": "notice", "notice": "lease-wait", "stage": "apply", "holder": "ci@runner"})
        );
        let e = Event::Finished {
            stage: "plan".into(),
            end: StageEnd::Failed { detail: "exit code 1".into() },
            duration: Duration::from_millis(1500),
            log: b"secret log".to_vec(),
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"event": "finished", "stage": "plan", "end": {"result": "failed", "detail": "exit code 1"}, "duration_ms": 1500})
        );
        let e = Event::Line { stage: "plan".into(), line: b"caf\xc3\xa9 \xff".to_vec() };
        assert_eq!(serde_json::to_value(&e).unwrap()["text"], "café \u{fffd}");
    }
}
