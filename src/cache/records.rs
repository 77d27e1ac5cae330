//! Runs and stage runs: the one write API (used by runs and by `cache import` alike) and the reads behind
//! [`History`].
//!
//! Attempts are ordered by `seq`, a per-stage sequence assigned when a row is written here, never by a
//! clock: an archive from a runner whose clock ran ahead cannot outrank later local attempts.

use super::{Cache, Error, Result, RunCounts, RunMeta, RunOutcome, RunRow, hostname, now_ms};
use crate::fresh::Audit;
use crate::fresh::{Attempt, History, OutputRecord, State, StoredReason};
use crate::hash::key::{DecodeError, Key, Manifest};
use crate::hash::{Entry, Hash};
use crate::relpath::RelPath;
use rusqlite::{Connection, OptionalExtension, params};

/// What a cache knows of a shared deploy ledger (see [`Cache::remote_seen`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerSeen {
    /// The newest record learned or written here.
    pub seq: u64,
    /// A local attempt came after it that the shared ledger never heard of (deployed with `--remote off`, or
    /// while the store did not answer).
    pub unsynced: bool,
}

/// A value in the database that is none of the values kkpipe writes: reported with its row.
#[derive(Debug, thiserror::Error)]
#[error("{table} row {id}: {column} `{value}` is not one kkpipe writes")]
pub(crate) struct BadValue {
    pub table: &'static str,
    pub id: i64,
    pub column: &'static str,
    pub value: String,
}

fn bad(table: &'static str, id: i64, column: &'static str, index: usize, value: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        index,
        rusqlite::types::Type::Text,
        Box::new(BadValue { table, id, column, value }),
    )
}

/// One stage run to record: a new attempt (`Running`, no end yet) or a finished one (an import).
pub struct NewAttempt<'a> {
    pub run_id: i64,
    pub stage: &'a str,
    pub env: &'a str,
    pub key: Key,
    /// The manifest's canonical encoding (none for a deploy attempt learned from a remote ledger whose
    /// manifest could not be had).
    pub manifest: Option<&'a [u8]>,
    pub state: State,
    /// The stored form of the reason (see `fresh::Reason::encode`).
    pub reason: Option<&'a str>,
    pub started_at: i64,
    pub end: Option<End<'a>>,
}

/// How a stage run ended.
pub struct End<'a> {
    pub duration_ms: i64,
    pub exit_code: Option<i64>,
    pub log: &'a [u8],
    pub outputs: &'a [OutputRecord],
}

impl End<'_> {
    /// The end of a run that was stopped before it could report anything.
    pub fn empty() -> End<'static> {
        End { duration_ms: 0, exit_code: None, log: &[], outputs: &[] }
    }
}

/// The audit fields as stored (`NULL` when there are none).
fn audit_text(a: &Audit) -> Option<String> {
    (a != &Audit::default()).then(|| serde_json::to_string(a).expect("serialisable"))
}

/// Stored audit fields; text this kkpipe cannot read counts as none (they inform, they never decide).
fn audit_of(text: Option<String>) -> Audit {
    text.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

fn compress(bytes: &[u8]) -> rusqlite::Result<Vec<u8>> {
    zstd::encode_all(bytes, 3).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// Insert a run row; `finished` for a run that is over (an import).
pub(super) fn insert_run(
    c: &Connection,
    meta: &RunMeta,
    started_at: i64,
    finished: Option<(i64, RunOutcome)>,
) -> rusqlite::Result<i64> {
    c.prepare_cached(
        "INSERT INTO runs(started_at, finished_at, outcome, command, event, branch, env, git_commit, pid, host, audit) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11)",
    )?
    .execute(params![
        started_at,
        finished.map(|f| f.0),
        finished.map(|f| f.1.as_str()),
        meta.command,
        meta.event,
        meta.branch,
        meta.env,
        meta.git_commit,
        std::process::id(),
        hostname(),
        audit_text(&meta.audit),
    ])?;
    Ok(c.last_insert_rowid())
}

/// Insert a stage run with its manifest (and, when it is over, its end and outputs). Returns its id.
pub(super) fn insert_attempt(c: &Connection, a: &NewAttempt<'_>) -> rusqlite::Result<i64> {
    if let Some(m) = a.manifest {
        c.prepare_cached("INSERT OR IGNORE INTO manifests(key, data) VALUES (?1, ?2)")?
            .execute(params![&a.key.0.0[..], compress(m)?])?;
    }
    c.prepare_cached(
        "INSERT INTO stage_runs(run_id, stage, env, key, state, reason, started_at, seq) VALUES (?1,?2,?3,?4,?5,?6,?7, (SELECT COALESCE(MAX(seq), 0) + 1 FROM stage_runs WHERE stage = ?2))",
    )?
    .execute(params![a.run_id, a.stage, a.env, &a.key.0.0[..], a.state.as_str(), a.reason, a.started_at])?;
    let id = c.last_insert_rowid();
    if let Some(end) = &a.end {
        record_end(c, id, a.state, end)?;
    }
    Ok(id)
}

/// A finished attempt learned from elsewhere (an archive, the remote), in a finished run of its own. Returns
/// the attempt's id.
pub(super) fn insert_imported(c: &Connection, meta: &RunMeta, mut a: NewAttempt<'_>) -> rusqlite::Result<i64> {
    let finished = a.started_at + a.end.as_ref().map_or(0, |e| e.duration_ms);
    let outcome = if a.state.succeeded() { RunOutcome::Ok } else { RunOutcome::Failed };
    a.run_id = insert_run(c, meta, a.started_at, Some((finished, outcome)))?;
    insert_attempt(c, &a)
}

/// Record a stage run's end: state, timing, log and, in the same statement group, its outputs.
pub(super) fn record_end(c: &Connection, id: i64, state: State, end: &End<'_>) -> rusqlite::Result<()> {
    c.prepare_cached("UPDATE stage_runs SET state=?2, duration_ms=?3, exit_code=?4, log=?5 WHERE id=?1")?
        .execute(params![id, state.as_str(), end.duration_ms, end.exit_code, compress(end.log)?])?;
    let mut ins = c.prepare_cached(
        "INSERT OR REPLACE INTO outputs(stage_run_id, path, kind, hash, exec, target, size, sensitive, mode) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)",
    )?;
    for o in end.outputs {
        let (kind, hash, exec, target): (&str, Option<&[u8]>, bool, Option<&[u8]>) = match &o.entry {
            Entry::File { hash, exec } => ("file", Some(&hash.0[..]), *exec, None),
            Entry::Symlink { target } => ("symlink", None, false, Some(target)),
            Entry::Dir { listing } => ("dir", Some(&listing.0[..]), false, None),
        };
        ins.execute(params![id, o.path.as_bytes(), kind, hash, exec, target, o.size as i64, o.sensitive, o.mode])?;
    }
    Ok(())
}

const ATTEMPT_COLS: &str = "id, run_id, stage, env, key, state, started_at, duration_ms, exit_code, reason, seq";
const RUN_COLS: &str = "id, started_at, finished_at, command, event, branch, env, git_commit, outcome, ran, fresh, restored, failed, skipped, saved_ms, audit";

fn attempt_at(r: &rusqlite::Row<'_>, o: usize) -> rusqlite::Result<Attempt> {
    let id: i64 = r.get(o)?;
    let key: Vec<u8> = r.get(o + 4)?;
    let key =
        Hash::from_slice(&key).ok_or_else(|| bad("stage_runs", id, "key", o + 4, format!("{} bytes", key.len())))?;
    let state: String = r.get(o + 5)?;
    let state = State::parse(&state).ok_or_else(|| bad("stage_runs", id, "state", o + 5, state.clone()))?;
    Ok(Attempt {
        id,
        run_id: r.get(o + 1)?,
        stage: r.get(o + 2)?,
        env: r.get(o + 3)?,
        key: Key(key),
        state,
        started_at: r.get(o + 6)?,
        duration_ms: r.get(o + 7)?,
        exit_code: r.get(o + 8)?,
        reason: r.get::<_, Option<String>>(o + 9)?.map(|t| StoredReason::decode(&t)),
        seq: r.get(o + 10)?,
    })
}

fn run_at(r: &rusqlite::Row<'_>, o: usize) -> rusqlite::Result<RunRow> {
    let id: i64 = r.get(o)?;
    let outcome = match r.get::<_, Option<String>>(o + 8)? {
        None => None,
        Some(t) => Some(RunOutcome::parse(&t).ok_or_else(|| bad("runs", id, "outcome", o + 8, t.clone()))?),
    };
    let count = |i: usize| -> rusqlite::Result<i64> { Ok(r.get::<_, Option<i64>>(o + i)?.unwrap_or(0)) };
    Ok(RunRow {
        id,
        started_at: r.get(o + 1)?,
        finished_at: r.get(o + 2)?,
        command: r.get(o + 3)?,
        event: r.get(o + 4)?,
        branch: r.get(o + 5)?,
        env: r.get(o + 6)?,
        git_commit: r.get(o + 7)?,
        outcome,
        counts: RunCounts {
            ran: count(9)?,
            fresh: count(10)?,
            restored: count(11)?,
            failed: count(12)?,
            skipped: count(13)?,
            saved_ms: count(14)?,
        },
        audit: audit_of(r.get(o + 15)?),
    })
}

fn output_at(r: &rusqlite::Row<'_>, id: i64) -> rusqlite::Result<OutputRecord> {
    let path: Vec<u8> = r.get(0)?;
    let path = RelPath::from_bytes(&path)
        .map_err(|_| bad("outputs", id, "path", 0, String::from_utf8_lossy(&path).into_owned()))?;
    let kind: String = r.get(1)?;
    let entry = match kind.as_str() {
        "symlink" => Entry::Symlink { target: r.get::<_, Option<Vec<u8>>>(4)?.unwrap_or_default() },
        "file" | "dir" => {
            let h: Vec<u8> = r.get::<_, Option<Vec<u8>>>(2)?.unwrap_or_default();
            let hash =
                Hash::from_slice(&h).ok_or_else(|| bad("outputs", id, "hash", 2, format!("{} bytes", h.len())))?;
            if kind == "dir" { Entry::Dir { listing: hash } } else { Entry::File { hash, exec: r.get(3)? } }
        }
        _ => return Err(bad("outputs", id, "kind", 1, kind)),
    };
    let mode: Option<u32> = r.get(7)?;
    Ok(OutputRecord {
        path,
        entry,
        size: r.get::<_, i64>(5)? as u64,
        sensitive: r.get(6)?,
        mode: mode.map(|m| m & 0o777),
    })
}

impl Cache {
    pub fn begin_run(&self, meta: &RunMeta) -> Result<i64> {
        self.write(|c| insert_run(c, meta, now_ms(), None))
    }

    /// The run's audit fields once more (a deploy found out whether the tree is dirty).
    pub fn set_run_audit(&self, run_id: i64, audit: &Audit) -> Result<()> {
        self.write(|c| c.execute("UPDATE runs SET audit=?2 WHERE id=?1", params![run_id, audit_text(audit)]).map(drop))
    }

    pub fn finish_run(&self, run_id: i64, outcome: RunOutcome, counts: &RunCounts) -> Result<()> {
        self.write(|c| {
            c.execute(
                "UPDATE runs SET finished_at=?2, outcome=?3, ran=?4, fresh=?5, restored=?6, failed=?7, skipped=?8, saved_ms=?9 WHERE id=?1",
                params![
                    run_id,
                    now_ms(),
                    outcome.as_str(),
                    counts.ran,
                    counts.fresh,
                    counts.restored,
                    counts.failed,
                    counts.skipped,
                    counts.saved_ms
                ],
            )?;
            Ok(())
        })
    }

    /// Rows left `running` by a process that died (the caller holds the run lock, so none is live).
    pub fn mark_interrupted_leftovers(&self) -> Result<usize> {
        self.write(|c| {
            let n = c.execute("UPDATE stage_runs SET state='interrupted' WHERE state='running'", [])?;
            c.execute("UPDATE runs SET outcome='interrupted' WHERE outcome IS NULL", [])?;
            Ok(n)
        })
    }

    /// Record that a stage is about to run: its manifest and a `running` row, in one transaction. The row
    /// can become a success only in [`Cache::finish_stage`], with its outputs: an interrupted run never
    /// looks fresh.
    pub fn start_stage(
        &self,
        run_id: i64,
        stage: &str,
        env: &str,
        m: &Manifest,
        reason: &crate::fresh::Reason,
    ) -> Result<i64> {
        let encoded = m.encode();
        let reason = reason.encode();
        let a = NewAttempt {
            run_id,
            stage,
            env,
            key: Key(Hash::of(&encoded)),
            manifest: Some(&encoded),
            state: State::Running,
            reason: Some(&reason),
            started_at: now_ms(),
            end: None,
        };
        self.write(|c| insert_attempt(c, &a))
    }

    /// Record a stage's end. Outputs are stored (blobs already in place) in the same transaction that
    /// flips the row to its final state.
    pub fn finish_stage(&self, id: i64, state: State, end: &End<'_>) -> Result<()> {
        self.write(|c| record_end(c, id, state, end))
    }

    /// Record an attempt that happened elsewhere (see [`insert_imported`]).
    pub fn import_attempt(&self, meta: &RunMeta, a: NewAttempt<'_>) -> Result<i64> {
        self.write(|c| insert_imported(c, meta, a))
    }

    /// What this cache knows of `remote`'s ledger for `stage` in `env`: `None` before it has learned or written
    /// any record there.
    pub fn remote_seen(&self, remote: &str, stage: &str, env: &str) -> Result<Option<LedgerSeen>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT r.seq, r.local_seq, (SELECT COALESCE(MAX(seq), 0) FROM stage_runs WHERE stage=?2 AND env=?3) FROM remote_ledger r WHERE r.remote=?1 AND r.stage=?2 AND r.env=?3",
            )
            .map_err(|e| self.err(e))?;
        let row: Option<(i64, i64, i64)> = stmt
            .query_row(params![remote, stage, env], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(row.map(|(seq, synced, latest)| LedgerSeen { seq: seq.max(0) as u64, unsynced: latest > synced }))
    }

    /// Note that the ledger record `seq` is known here (learned, or written by this runner), and that every local
    /// attempt of the stage in `env` so far is in step with it. The sequence never goes back.
    pub fn set_remote_seen(&self, remote: &str, stage: &str, env: &str, seq: u64) -> Result<()> {
        self.write(|c| {
            c.prepare_cached(
                "INSERT INTO remote_ledger(remote, stage, env, seq, local_seq) VALUES (?1,?2,?3,?4, (SELECT COALESCE(MAX(seq), 0) FROM stage_runs WHERE stage=?2 AND env=?3)) ON CONFLICT(remote, stage, env) DO UPDATE SET seq = MAX(seq, excluded.seq), local_seq = excluded.local_seq",
            )?
            .execute(params![remote, stage, env, seq as i64])?;
            Ok(())
        })
    }

    fn one_attempt(&self, where_clause: &str, p: impl rusqlite::Params) -> Result<Option<Attempt>> {
        let sql =
            format!("SELECT {ATTEMPT_COLS} FROM stage_runs WHERE {where_clause} ORDER BY seq DESC, id DESC LIMIT 1");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| self.err(e))?;
        stmt.query_row(p, |r| attempt_at(r, 0)).optional().map_err(|e| self.err(e))
    }

    pub fn stage_run(&self, id: i64) -> Result<Option<Attempt>> {
        self.one_attempt("id=?1", params![id])
    }

    /// Stage runs of one stage, newest first (the deploy ledger and `kkpipe log --run`).
    pub fn stage_history(&self, stage: &str, env: Option<&str>, limit: i64) -> Result<Vec<(Attempt, RunRow)>> {
        let prefixed =
            |cols: &str, t: &str| cols.split(", ").map(|c| format!("{t}.{c}")).collect::<Vec<_>>().join(", ");
        let sql = format!(
            "SELECT {}, {} FROM stage_runs s JOIN runs r ON r.id = s.run_id WHERE s.stage=?1 AND (?2 IS NULL OR s.env=?2) ORDER BY s.seq DESC, s.id DESC LIMIT ?3",
            prefixed(ATTEMPT_COLS, "s"),
            prefixed(RUN_COLS, "r"),
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![stage, env, limit], |r| Ok((attempt_at(r, 0)?, run_at(r, 11)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.err(e))
    }

    pub fn outputs_of(&self, stage_run_id: i64) -> Result<Vec<OutputRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT path, kind, hash, exec, target, size, sensitive, mode FROM outputs WHERE stage_run_id=?1 ORDER BY path",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt.query_map([stage_run_id], |r| output_at(r, stage_run_id)).map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.err(e))
    }

    pub fn log(&self, stage_run_id: i64) -> Result<Option<Vec<u8>>> {
        let mut stmt = self.conn.prepare_cached("SELECT log FROM stage_runs WHERE id=?1").map_err(|e| self.err(e))?;
        let data: Option<Option<Vec<u8>>> =
            stmt.query_row([stage_run_id], |r| r.get(0)).optional().map_err(|e| self.err(e))?;
        Ok(data.flatten().map(|d| zstd::decode_all(&d[..]).unwrap_or_default()))
    }

    /// Event, branch and commit of every run, for export.
    pub fn run_meta(&self) -> Result<std::collections::HashMap<i64, RunMeta>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, command, event, branch, env, git_commit, audit FROM runs")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                let meta = RunMeta {
                    command: r.get(1)?,
                    event: r.get(2)?,
                    branch: r.get(3)?,
                    env: r.get(4)?,
                    git_commit: r.get(5)?,
                    audit: audit_of(r.get(6)?),
                };
                Ok((r.get::<_, i64>(0)?, meta))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>().map_err(|e| self.err(e))
    }

    pub fn runs(&self, limit: i64) -> Result<Vec<RunRow>> {
        let sql = format!("SELECT {RUN_COLS} FROM runs ORDER BY id DESC LIMIT ?1");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| self.err(e))?;
        let rows = stmt.query_map([limit], |r| run_at(r, 0)).map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.err(e))
    }
}

impl History for Cache {
    type Error = Error;

    fn latest_attempt(&self, stage: &str, env: Option<&str>) -> Result<Option<Attempt>> {
        match env {
            Some(env) => self.one_attempt("stage=?1 AND env=?2", params![stage, env]),
            None => self.one_attempt("stage=?1", params![stage]),
        }
    }

    fn latest_success(&self, stage: &str, env: Option<&str>) -> Result<Option<Attempt>> {
        match env {
            Some(env) => {
                self.one_attempt("stage=?1 AND env=?2 AND state IN ('success', 'adopted')", params![stage, env])
            }
            None => self.one_attempt("stage=?1 AND state IN ('success', 'adopted')", params![stage]),
        }
    }

    fn success_with_key(&self, stage: &str, key: &Key) -> Result<Option<Attempt>> {
        self.one_attempt("stage=?1 AND key=?2 AND state='success'", params![stage, &key.0.0[..]])
    }

    fn manifest(&self, key: &Key) -> Result<Option<std::result::Result<Manifest, DecodeError>>> {
        let mut stmt = self.conn.prepare_cached("SELECT data FROM manifests WHERE key=?1").map_err(|e| self.err(e))?;
        let data: Option<Vec<u8>> = stmt.query_row([&key.0.0[..]], |r| r.get(0)).optional().map_err(|e| self.err(e))?;
        Ok(data.map(|d| match zstd::decode_all(&d[..]) {
            Ok(raw) => Manifest::decode(&raw),
            Err(_) => Err(DecodeError::Corrupt),
        }))
    }

    fn outputs(&self, attempt: &Attempt) -> Result<Vec<OutputRecord>> {
        self.outputs_of(attempt.id)
    }
}
