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
    /// A deploy stage kkpipe did not run: its probe found the live system already matching these inputs (or
    /// `kkpipe adopt --assume-deployed` said so). Counts as a success of this key.
    Adopted,
}

impl State {
    pub const ALL: [State; 5] = [State::Running, State::Success, State::Failed, State::Interrupted, State::Adopted];

    /// What the live system (or a check's result) holds this key's result: a success, or an adoption.
    pub fn succeeded(self) -> bool {
        matches!(self, State::Success | State::Adopted)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Success => "success",
            State::Failed => "failed",
            State::Interrupted => "interrupted",
            State::Adopted => "adopted",
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
    #[serde(flatten)]
    pub audit: Audit,
}

/// Where a run came from. Every field is optional: an old record, a machine without git, a CI that does not
/// say. Serialised as is in the remote ledger, `history --json` and archives.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
// Unknown fields are read past: a newer kkpipe may add one, and audit fields inform, never decide.
pub struct Audit {
    /// The branch checked out (in CI: the branch the job runs on; a pull request's source branch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_branch: Option<String>,
    /// Whether the checkout had uncommitted changes when a deploy started (`None`: not looked at, because
    /// nothing deployed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty: Option<bool>,
    /// Who: the CI's actor, or `user@host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The CI job or pipeline that ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_url: Option<String>,
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
    /// Permission bits (`0o777`) of a file or directory, restored with it; `None` for links and for records
    /// made before they were kept (a file then gets 0644 or 0755).
    pub mode: Option<u32>,
}

impl OutputRecord {
    /// The declared output (of a stage that declares `declared` now) this record may be written into, or
    /// why it may not: it must lie inside one of those outputs, outside `.git` and `.kkpipe`, and a link must
    /// lead, as the kernel would resolve it through the other links of the same result (`links`), to somewhere
    /// inside the same output. Link texts are only read, never resolved on disk. Whatever an archive says, a
    /// restore writes nothing else.
    pub fn confined_to<'d>(&self, declared: &'d [Output], links: &Links<'_>) -> Result<&'d Output, String> {
        if self.path.through_reserved() {
            return Err("it is inside `.git` or `.kkpipe`".into());
        }
        let Some(d) = declared.iter().find(|d| self.path.starts_with(&d.path)) else {
            return Err("it is not inside the stage's declared outputs".into());
        };
        match &self.entry {
            Entry::Symlink { target } if links.escapes(&self.path.names(), target, &d.path.names()) => {
                Err(format!("it is a link that points out of the output `{}`", d.path))
            }
            _ => Ok(d),
        }
    }

    /// Why this record of a result whose links are `links` may not be written for a stage that declares
    /// `declared`: see [`Self::confined_to`].
    pub fn refusal(&self, declared: &[Output], links: &Links<'_>) -> Option<String> {
        self.confined_to(declared, links).err()
    }
}

/// The first record of one result (all its records) that may not be written for a stage that declares
/// `declared`, and why: one that [`OutputRecord::refusal`] refuses, or one below a declared output whose
/// directories on the way (the output itself included) are not recorded. A complete tree is what lets a restore
/// make the disk below an output exactly the records (it prunes what a recorded directory does not list), so
/// that a link is resolved against what will be there, not against leftovers.
pub(crate) fn refusal_of<'r>(records: &'r [OutputRecord], declared: &[Output]) -> Option<(&'r RelPath, String)> {
    let links = Links::of(records);
    for r in records {
        let d = match r.confined_to(declared, &links) {
            Ok(d) => d,
            Err(why) => return Some((&r.path, why)),
        };
        let depth = d.path.names().len();
        let names = r.path.names();
        for n in depth..names.len() {
            let dir = names[..n].join(&b'/');
            if !matches!(links.0.get(dir.as_slice()), Some(Node::Dir)) {
                let dir = String::from_utf8_lossy(&dir).into_owned();
                return Some((&r.path, format!("its result does not record the directory `{dir}` it is in")));
            }
        }
    }
    None
}

/// One result's records by path, as the kernel will find them once they are restored: a link's text is
/// resolved through them (`out/l1 -> l0/..` with `out/l0 -> .` is the repository root, not `out`). Below a
/// declared output the disk then holds exactly these records, so a name that is none of them does not exist.
#[derive(Default)]
pub struct Links<'r>(std::collections::HashMap<&'r [u8], Node<'r>>);

enum Node<'r> {
    Dir,
    File,
    Link(&'r [u8]),
}

/// The kernel gives up after 40 links on one path (`ELOOP`); a result that needs more is refused.
const MAX_LINKS: usize = 40;

impl<'r> Links<'r> {
    pub fn of(records: &'r [OutputRecord]) -> Links<'r> {
        let node = |r: &'r OutputRecord| match &r.entry {
            Entry::Symlink { target } => Node::Link(target.as_slice()),
            Entry::Dir { .. } => Node::Dir,
            Entry::File { .. } => Node::File,
        };
        Links(records.iter().map(|r| (r.path.as_bytes(), node(r))).collect())
    }

    /// Whether the link at `link` (names) with text `target` leads out of the directory `within` (names):
    /// resolved component by component from the link's directory, following the result's own links on the
    /// way and at the end.
    fn escapes<'a>(&'a self, link: &[&'a [u8]], target: &'a [u8], within: &[&[u8]]) -> bool {
        let mut at: Vec<&[u8]> = link[..link.len().saturating_sub(1)].to_vec();
        // Components still to walk, the next one last.
        let mut todo: Vec<&[u8]> = Vec::new();
        let mut next_text = Some(target);
        let mut followed = 0;
        loop {
            if let Some(text) = next_text.take() {
                if text.starts_with(b"/") {
                    return true;
                }
                todo.extend(text.split(|&b| b == b'/').rev());
            }
            let Some(c) = todo.pop() else { break };
            match c {
                b"" | b"." => {}
                b".." if at.len() <= within.len() => return true,
                b".." => {
                    at.pop();
                }
                // `.git` and `.kkpipe` are never restored or pruned: what is there is not the result's.
                name if crate::relpath::RESERVED.contains(&name) => return true,
                name => {
                    at.push(name);
                    // Anything but a link is walked as a directory, lexically: a name that is no record does not
                    // exist once restored, and were it made later (a directory), this is how it resolves.
                    if let Some(Node::Link(text)) = self.0.get(at.join(&b'/').as_slice()) {
                        followed += 1;
                        if followed > MAX_LINKS {
                            return true;
                        }
                        at.pop();
                        next_text = Some(text);
                    }
                }
            }
        }
        at.len() < within.len() || at[..within.len()] != *within
    }
}

/// The recorded past, as the decision needs it. `env` is `Some` for deploy stages (their ledger is per
/// deployment environment) and `None` for check stages (a cache shared by every environment).
pub(crate) trait History {
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
        OutputRecord { path: RelPath::parse(path).unwrap(), entry, size: 0, sensitive: false, mode: None }
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
        assert_eq!(file("build/a.txt").refusal(&declared, &Links::default()), None);
        assert_eq!(file("plan.tfplan").refusal(&declared, &Links::default()), None);
        assert!(file("src/main.tf").refusal(&declared, &Links::default()).unwrap().contains("not inside"));
        assert!(
            file("build2/a").refusal(&declared, &Links::default()).is_some(),
            "a name prefix is not a directory prefix"
        );
        assert!(file(".git/hooks/pre-commit").refusal(&[out(".git")], &Links::default()).unwrap().contains("`.git`"));
        assert!(file("build/.kkpipe/cache.db").refusal(&declared, &Links::default()).unwrap().contains("`.kkpipe`"));
    }

    #[test]
    fn a_link_record_may_not_point_out_of_its_output() {
        let declared = [out("build"), out("single")];
        for ok in ["a.txt", "sub/../a.txt", "./a.txt", ".", "sub/x"] {
            assert_eq!(link("build/l", ok).refusal(&declared, &Links::default()), None, "{ok}");
        }
        assert_eq!(link("build/sub/l", "../a.txt").refusal(&declared, &Links::default()), None);
        for bad in ["..", "../x", "/etc/passwd", "../build/a.txt", "sub/../../x"] {
            assert!(link("build/l", bad).refusal(&declared, &Links::default()).is_some(), "{bad}");
        }
        // A declared output that is itself a link points out of itself whatever its text.
        assert!(link("single", "other").refusal(&declared, &Links::default()).is_some());
    }

    #[test]
    fn a_chain_of_links_is_resolved_through_the_results_own_links() {
        let declared = [out("out")];
        // out/l0 -> ., out/lK -> l(K-1)/..: each text stays inside `out` on its own; l1 is the repository root.
        let mut chain = vec![rec("out", Entry::Dir { listing: Hash::of(b"") }), link("out/l0", ".")];
        for k in 1..=20 {
            chain.push(link(&format!("out/l{k}"), &format!("l{}/..", k - 1)));
        }
        chain.push(link("out/pwn", "l20/etc"));
        let (path, why) = refusal_of(&chain, &declared).expect("the chain is refused");
        assert_eq!(path.to_string(), "out/l1");
        assert!(why.contains("points out"), "{why}");
        // Links through links that stay inside are fine, and so is one that dangles inside.
        let dir = |p| rec(p, Entry::Dir { listing: Hash::of(b"") });
        let fine =
            [dir("out"), link("out/a", "sub"), dir("out/sub"), link("out/sub/b", "../c"), link("out/d", "a/b/x")];
        assert_eq!(refusal_of(&fine, &declared), None);
        let via = [dir("out"), link("out/a", "sub/deeper"), link("out/x", "a/../../etc")];
        assert_eq!(refusal_of(&via, &declared), None, "out/sub/deeper/../../etc is out/etc");
        let up = [dir("out"), link("out/a", "sub/deeper"), link("out/x", "a/../../../etc")];
        assert!(refusal_of(&up, &declared).is_some(), "out/sub/deeper/../../../etc is the root's etc");
        // A loop is refused as the kernel would (ELOOP), not followed forever.
        let ring = [dir("out"), link("out/p", "q"), link("out/q", "p")];
        assert!(refusal_of(&ring, &declared).is_some());
        // A result must record the directories its entries are in: a restore then makes the disk below the
        // output exactly the records, and nothing left there by an earlier restore can redirect a link.
        let bare = [link("out/d1/up", "..")];
        let (path, why) = refusal_of(&bare, &declared).expect("incomplete");
        assert_eq!((path.to_string(), why.contains("`out`")), ("out/d1/up".into(), true));
        let (_, why) = refusal_of(&[dir("out"), link("out/d1/up", "..")], &declared).expect("incomplete");
        assert!(why.contains("`out/d1`"), "{why}");
    }
}
