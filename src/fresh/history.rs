//! What the decision reads about the past: recorded attempts, their outputs and manifests. The SQLite cache
//! implements [`History`]; the decision's unit tests use an in-memory double.

use super::StoredReason;
use crate::hash::Entry;
use crate::hash::key::{DecodeError, Key, Manifest};
use crate::relpath::RelPath;

/// How a recorded stage run ended (or that it has not yet). One string form each, in the database and JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
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
}

/// One output file, link or directory recorded with a successful run.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputRecord {
    pub path: RelPath,
    pub entry: Entry,
    pub size: u64,
    pub sensitive: bool,
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
