//! What the decision reads about the past: recorded attempts, their outputs and manifests. The SQLite cache
//! implements [`History`]; the decision's unit tests use an in-memory double.

use super::StoredReason;
use crate::hash::Entry;
use crate::hash::key::{DecodeError, Key, Manifest};
use crate::pipeline::Output;
use crate::relpath::RelPath;

/// How a recorded stage run ended (or that it has not yet). One string form each, in the database and JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    Success,
    Failed,
    Interrupted,
}

impl State {
    pub const ALL: [State; 4] = [State::Running, State::Success, State::Failed, State::Interrupted];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Success => "success",
            State::Failed => "failed",
            State::Interrupted => "interrupted",
        }
    }

    /// `None` for text that is no state: the caller reports the row it came from.
    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// How an invocation of `run` or `verify` ended (the `runs` table). One string form each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunOutcome {
    Ok,
    Failed,
    Interrupted,
}

impl RunOutcome {
    pub const ALL: [RunOutcome; 3] = [RunOutcome::Ok, RunOutcome::Failed, RunOutcome::Interrupted];

    pub fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Ok => "ok",
            RunOutcome::Failed => "failed",
            RunOutcome::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> Option<RunOutcome> {
        RunOutcome::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunCounts {
    pub ran: i64,
    pub fresh: i64,
    pub restored: i64,
    pub failed: i64,
    pub skipped: i64,
    pub saved_ms: i64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RunRow {
    pub id: i64,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub command: String,
    pub event: Option<String>,
    pub branch: Option<String>,
    pub env: String,
    pub git_commit: Option<String>,
    /// `None` while running, or when the process was killed.
    pub outcome: Option<RunOutcome>,
    #[serde(flatten)]
    pub counts: RunCounts,
}

/// One recorded attempt to run a stage: a row of the cache's `stage_runs`.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub id: i64,
    pub run_id: i64,
    pub stage: String,
    pub env: String,
    pub key: Key,
    pub state: State,
    /// Unix milliseconds (for display: order comes from the local sequence, never from clocks).
    pub started_at: i64,
    pub duration_ms: Option<i64>,
    pub exit_code: Option<i64>,
    pub reason: Option<StoredReason>,
    /// This cache's order of the stage's attempts (see `cache::records`).
    pub seq: i64,
}

/// One output file, link or directory recorded with a successful run.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputRecord {
    pub path: RelPath,
    pub entry: Entry,
    pub size: u64,
    pub sensitive: bool,
}

impl OutputRecord {
    /// The declared output (of a stage that declares `declared` now) this record may be written into, or
    /// why it may not: it must lie inside one of those outputs, outside `.git` and `.kkpipe`, and a link must
    /// point (read as text, never resolved on disk) to somewhere inside the same output. Whatever an archive
    /// says, a restore writes nothing else.
    pub fn confined_to<'d>(&self, declared: &'d [Output]) -> Result<&'d Output, String> {
        let names = self.path.names();
        if self.path.through_reserved() {
            return Err("it is inside `.git` or `.kkpipe`".into());
        }
        let Some(d) = declared.iter().find(|d| self.path.starts_with(&d.path)) else {
            return Err("it is not inside the stage's declared outputs".into());
        };
        match &self.entry {
            Entry::Symlink { target } if link_escapes(&names, target, &d.path.names()) => {
                Err(format!("it is a link that points out of the output `{}`", d.path))
            }
            _ => Ok(d),
        }
    }

    /// Why this record may not be written for a stage that declares `declared`: see [`Self::confined_to`].
    pub fn refusal(&self, declared: &[Output]) -> Option<String> {
        self.confined_to(declared).err()
    }
}

/// Whether a link at `link` (names) with text `target` leads out of the directory `within` (names).
fn link_escapes(link: &[&[u8]], target: &[u8], within: &[&[u8]]) -> bool {
    if target.starts_with(b"/") {
        return true;
    }
    let mut at: Vec<&[u8]> = link[..link.len().saturating_sub(1)].to_vec();
    for c in target.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if at.len() <= within.len() {
                    return true;
                }
                at.pop();
            }
            name => at.push(name),
        }
    }
    at.len() < within.len() || at[..within.len()] != *within
}

/// The recorded past, as the decision needs it. `env` is `Some` for deploy stages (their ledger is per
/// deployment environment) and `None` for check stages (a cache shared by every environment).
pub trait History {
    type Error;
    /// The most recent attempt, whatever its outcome: for a deploy stage, the head of its ledger.
    fn latest_attempt(&self, stage: &str, env: Option<&str>) -> Result<Option<Attempt>, Self::Error>;
    /// The most recent successful attempt: what a stale stage is compared with.
    fn latest_success(&self, stage: &str, env: Option<&str>) -> Result<Option<Attempt>, Self::Error>;
    /// The most recent successful attempt with exactly this key: a check stage's cache lookup.
    fn success_with_key(&self, stage: &str, key: &Key) -> Result<Option<Attempt>, Self::Error>;
    /// The manifest behind a key: `None` when not stored, `Some(Err)` when stored by another key scheme.
    fn manifest(&self, key: &Key) -> Result<Option<Result<Manifest, DecodeError>>, Self::Error>;
    /// What a successful attempt recorded as its outputs.
    fn outputs(&self, attempt: &Attempt) -> Result<Vec<OutputRecord>, Self::Error>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::Hash;

    fn rec(path: &str, entry: Entry) -> OutputRecord {
        OutputRecord { path: RelPath::parse(path).unwrap(), entry, size: 0, sensitive: false }
    }

    fn out(path: &str) -> Output {
        Output { path: RelPath::parse(path).unwrap(), sensitive: false, regenerate: None }
    }

    fn link(path: &str, target: &str) -> OutputRecord {
        rec(path, Entry::Symlink { target: target.as_bytes().to_vec() })
    }

    #[test]
    fn a_record_may_only_name_paths_inside_the_current_declared_outputs() {
        let file = |p| rec(p, Entry::File { hash: Hash::of(b"x"), exec: true });
        let declared = [out("build"), out("plan.tfplan")];
        assert_eq!(file("build/a.txt").refusal(&declared), None);
        assert_eq!(file("plan.tfplan").refusal(&declared), None);
        assert!(file("src/main.tf").refusal(&declared).unwrap().contains("not inside"));
        assert!(file("build2/a").refusal(&declared).is_some(), "a name prefix is not a directory prefix");
        assert!(file(".git/hooks/pre-commit").refusal(&[out(".git")]).unwrap().contains("`.git`"));
        assert!(file("build/.kkpipe/cache.db").refusal(&declared).unwrap().contains("`.kkpipe`"));
    }

    #[test]
    fn a_link_record_may_not_point_out_of_its_output() {
        let declared = [out("build"), out("single")];
        for ok in ["a.txt", "sub/../a.txt", "./a.txt", ".", "sub/x"] {
            assert_eq!(link("build/l", ok).refusal(&declared), None, "{ok}");
        }
        assert_eq!(link("build/sub/l", "../a.txt").refusal(&declared), None);
        for bad in ["..", "../x", "/etc/passwd", "../build/a.txt", "sub/../../x"] {
            assert!(link("build/l", bad).refusal(&declared).is_some(), "{bad}");
        }
        // A declared output that is itself a link points out of itself whatever its text.
        assert!(link("single", "other").refusal(&declared).is_some());
    }
}
