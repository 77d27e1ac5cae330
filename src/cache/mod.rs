//! The cache under `.kkpipe/`: a SQLite database of what ran, and a content-addressed blob store of outputs.
//!
//! - `cache.db`: runs, stage runs (key, state, timing, masked log), manifests (the structured inputs behind
//!   each key), outputs of successful stage runs, and the stat cache. WAL mode, an explicit busy timeout,
//!   writes in `BEGIN IMMEDIATE` transactions, migrations on `PRAGMA user_version` (append-only). A new
//!   database is built aside and linked into place, so concurrent first runs never see it half set up.
//! - `blobs/`: outputs by BLAKE3, see [`store`]. A row pointing at a blob is committed only after the blob.
//! - `sensitive/`: sensitive output blobs and `secret.key`, 32 random bytes (mode 0600) keying the HMAC of
//!   `secret_env` values. Kept apart so a CI cache can save `.kkpipe/` without them.
//!
//! A stage run row is inserted as `running` *before* the stage starts and becomes `success` only in the
//! transaction that also records its outputs: an interrupted or killed run can never look fresh.

pub mod archive;
pub mod gc;
mod schema;
pub mod store;

use crate::hash::key::{DecodeError, Key, Manifest};
use crate::hash::{Entry, Hash};
use crate::relpath::RelPath;
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
pub use store::BlobStore;

pub const DIR_NAME: &str = ".kkpipe";
pub const DB_NAME: &str = "cache.db";
pub(crate) const SECRET_KEY_NAME: &str = "sensitive/secret.key";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot use the cache directory `{}`: {source}\n  hint: check that it is writable, or point kkpipe at a writable checkout", path.display())]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("the cache database `{}` is unreadable or corrupt ({detail})\n  hint: run `kkpipe cache reset` to start with an empty cache (outputs in the workspace are kept)", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("the cache `{}` was written by a newer kkpipe (schema {found}, this kkpipe knows {supported})\n  hint: upgrade kkpipe, or run `kkpipe cache reset` to start over", path.display())]
    NewerSchema { path: PathBuf, found: i64, supported: i64 },
    #[error("the cache database `{}` is busy: another kkpipe kept it locked for too long\n  hint: wait for the other kkpipe to finish and retry", path.display())]
    Busy { path: PathBuf },
    #[error("cannot write the cache `{}`: {detail}\n  hint: check free disk space and permissions; nothing was recorded for the failed write", path.display())]
    Write { path: PathBuf, detail: String },
    #[error("cache: {0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    Success,
    Failed,
    Interrupted,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Success => "success",
            State::Failed => "failed",
            State::Interrupted => "interrupted",
        }
    }
    fn parse(s: &str) -> State {
        match s {
            "running" => State::Running,
            "success" => State::Success,
            "failed" => State::Failed,
            _ => State::Interrupted,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StageRun {
    pub id: i64,
    pub run_id: i64,
    pub stage: String,
    pub env: String,
    pub key: Key,
    pub state: State,
    /// Unix milliseconds.
    pub started_at: i64,
    pub duration_ms: Option<i64>,
    pub exit_code: Option<i64>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutputRecord {
    pub path: RelPath,
    pub entry: Entry,
    pub size: u64,
    pub sensitive: bool,
}

#[derive(Debug, Clone, Default)]
pub struct RunMeta {
    pub command: String,
    pub event: Option<String>,
    pub branch: Option<String>,
    pub env: String,
    pub git_commit: Option<String>,
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
    pub outcome: Option<String>,
    #[serde(flatten)]
    pub counts: RunCounts,
}

pub struct Cache {
    dir: PathBuf,
    db_path: PathBuf,
    conn: Connection,
    pub blobs: BlobStore,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Cache {
    pub fn dir_of(root: &Path) -> PathBuf {
        root.join(DIR_NAME)
    }

    /// Open (creating on first use) the cache of the repository at `root`.
    pub fn open(root: &Path) -> Result<Cache> {
        let dir = Self::dir_of(root);
        let created = ensure_dir(&dir)?;
        if created {
            // Git-ignore the cache from the inside, without touching the user's .gitignore.
            let _ = fs::write(dir.join(".gitignore"), "# created by kkpipe: the cache is local state\n*\n");
        }
        let db_path = dir.join(DB_NAME);
        if !db_path.exists() {
            create_db(&db_path)?;
        }
        let conn = Connection::open(&db_path).map_err(|e| classify(&db_path, e))?;
        let cache = Cache { blobs: BlobStore::new(&dir), dir, db_path, conn };
        cache.configure()?;
        migrate(&cache.conn, &cache.db_path)?;
        Ok(cache)
    }

    /// True when a cache exists for `root` (commands that only read use this to avoid creating one).
    pub fn exists(root: &Path) -> bool {
        Self::dir_of(root).join(DB_NAME).is_file()
    }

    fn configure(&self) -> Result<()> {
        self.conn.busy_timeout(Duration::from_secs(30)).map_err(|e| classify(&self.db_path, e))?;
        // journal_mode returns a row; WAL lets `status`/`why`/`log` read while a run writes.
        self.conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(())).map_err(|e| classify(&self.db_path, e))?;
        self.conn
            .execute_batch("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;")
            .map_err(|e| classify(&self.db_path, e))?;
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    fn err(&self, e: rusqlite::Error) -> Error {
        classify(&self.db_path, e)
    }

    /// Run `f` in a `BEGIN IMMEDIATE` transaction (the write lock is taken up front, so no deadlock upgrade).
    fn write<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| self.err(e))?;
        match f(&self.conn) {
            Ok(v) => {
                self.conn.execute_batch("COMMIT").map_err(|e| {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    self.err(e)
                })?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(self.err(e))
            }
        }
    }

    /// The per-repository key for HMACs of secret env values, created (0600) on first use.
    pub fn secret_key(&self) -> Result<[u8; 32]> {
        let path = self.dir.join(SECRET_KEY_NAME);
        if let Ok(bytes) = fs::read(&path)
            && let Ok(k) = <[u8; 32]>::try_from(bytes.as_slice())
        {
            return Ok(k);
        }
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| Error::Other(format!("no randomness for the secret key: {e}")))?;
        self.write_secret_key(&key)?;
        Ok(key)
    }

    pub(crate) fn write_secret_key(&self, key: &[u8; 32]) -> Result<()> {
        let path = self.dir.join(SECRET_KEY_NAME);
        let tmp = self.dir.join(format!("{SECRET_KEY_NAME}.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let sensitive = self.dir.join(store::SENSITIVE_DIR);
            if !sensitive.is_dir() {
                fs::DirBuilder::new().mode(0o700).create(&sensitive)?;
            }
            let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(key)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| Error::Write { path: path.clone(), detail: e.to_string() })
    }

    // ---------------------------------------------------------------- stat cache

    /// The stat cache snapshot (see `hash::files::encode_snapshot`), empty when there is none.
    pub fn stat_snapshot(&self) -> Result<Vec<u8>> {
        let mut stmt =
            self.conn.prepare_cached("SELECT data FROM stat_snapshot WHERE id = 1").map_err(|e| self.err(e))?;
        let data: Option<Vec<u8>> = stmt.query_row([], |r| r.get(0)).optional().map_err(|e| self.err(e))?;
        Ok(data.unwrap_or_default())
    }

    /// Store the stat cache snapshot. Best effort by design: the stat cache only saves work, so a busy or
    /// read-only database just means the files are hashed again next time.
    pub fn save_stat_snapshot(&self, bytes: &[u8]) {
        let _ = self.conn.busy_timeout(Duration::from_millis(500));
        let _ = self.write(|c| {
            c.prepare_cached("INSERT OR REPLACE INTO stat_snapshot(id, data) VALUES (1, ?1)")?.execute([bytes])?;
            Ok(())
        });
        let _ = self.conn.busy_timeout(Duration::from_secs(30));
    }

    // ---------------------------------------------------------------- runs

    pub fn begin_run(&self, meta: &RunMeta) -> Result<i64> {
        self.write(|c| {
            c.execute(
                "INSERT INTO runs(started_at, command, event, branch, env, git_commit, pid, host) VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
                params![
                    now_ms(),
                    meta.command,
                    meta.event,
                    meta.branch,
                    meta.env,
                    meta.git_commit,
                    std::process::id(),
                    hostname()
                ],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    pub fn finish_run(&self, run_id: i64, outcome: &str, counts: &RunCounts) -> Result<()> {
        self.write(|c| {
            c.execute(
                "UPDATE runs SET finished_at=?2, outcome=?3, ran=?4, fresh=?5, restored=?6, failed=?7, skipped=?8, saved_ms=?9 WHERE id=?1",
                params![
                    run_id,
                    now_ms(),
                    outcome,
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

    // ---------------------------------------------------------------- stage runs

    const STAGE_RUN_COLS: &'static str =
        "id, run_id, stage, env, key, state, started_at, duration_ms, exit_code, reason";

    fn stage_run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StageRun> {
        let key: Vec<u8> = r.get(4)?;
        Ok(StageRun {
            id: r.get(0)?,
            run_id: r.get(1)?,
            stage: r.get(2)?,
            env: r.get(3)?,
            key: Key(Hash::from_slice(&key).unwrap_or_default()),
            state: State::parse(&r.get::<_, String>(5)?),
            started_at: r.get(6)?,
            duration_ms: r.get(7)?,
            exit_code: r.get(8)?,
            reason: r.get(9)?,
        })
    }

    fn one_stage_run(&self, where_clause: &str, p: impl rusqlite::Params) -> Result<Option<StageRun>> {
        let sql =
            // Newest by start time: imported runs keep their original times and never overtake newer local ones.
            format!("SELECT {} FROM stage_runs WHERE {where_clause} ORDER BY started_at DESC, id DESC LIMIT 1", Self::STAGE_RUN_COLS);
        let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| self.err(e))?;
        stmt.query_row(p, Self::stage_run_row).optional().map_err(|e| self.err(e))
    }

    /// The latest successful run of `stage` with exactly this key (a check stage's cache lookup).
    pub fn success_with_key(&self, stage: &str, key: &Key) -> Result<Option<StageRun>> {
        self.one_stage_run("stage=?1 AND key=?2 AND state='success'", params![stage, &key.0.0[..]])
    }

    /// The latest attempt of `stage` (in `env` if given), whatever its outcome.
    pub fn latest_attempt(&self, stage: &str, env: Option<&str>) -> Result<Option<StageRun>> {
        match env {
            Some(env) => self.one_stage_run("stage=?1 AND env=?2", params![stage, env]),
            None => self.one_stage_run("stage=?1", params![stage]),
        }
    }

    /// The latest successful run of `stage` (in `env` if given).
    pub fn latest_success(&self, stage: &str, env: Option<&str>) -> Result<Option<StageRun>> {
        match env {
            Some(env) => self.one_stage_run("stage=?1 AND env=?2 AND state='success'", params![stage, env]),
            None => self.one_stage_run("stage=?1 AND state='success'", params![stage]),
        }
    }

    pub fn stage_run(&self, id: i64) -> Result<Option<StageRun>> {
        self.one_stage_run("id=?1", params![id])
    }

    /// Stage runs of one stage, newest first (the deploy ledger and `kkpipe log --run`).
    pub fn stage_history(&self, stage: &str, env: Option<&str>, limit: i64) -> Result<Vec<(StageRun, RunRow)>> {
        let sql = format!(
            "SELECT {}, {} FROM stage_runs s JOIN runs r ON r.id = s.run_id WHERE s.stage=?1 AND (?2 IS NULL OR s.env=?2) ORDER BY s.started_at DESC, s.id DESC LIMIT ?3",
            Self::STAGE_RUN_COLS.split(", ").map(|c| format!("s.{c}")).collect::<Vec<_>>().join(", "),
            RUN_COLS.split(", ").map(|c| format!("r.{c}")).collect::<Vec<_>>().join(", "),
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![stage, env, limit], |r| Ok((Self::stage_run_row(r)?, run_row_at(r, 10)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.err(e))
    }

    /// Record that a stage is about to run: its manifest and a `running` row, in one transaction.
    pub fn start_stage(&self, run_id: i64, stage: &str, env: &str, manifest: &Manifest, reason: &str) -> Result<i64> {
        let key = manifest.key();
        let data = zstd::encode_all(&manifest.encode()[..], 3).map_err(|e| Error::Other(e.to_string()))?;
        self.write(|c| {
            c.prepare_cached("INSERT OR IGNORE INTO manifests(key, data) VALUES (?1, ?2)")?
                .execute(params![&key.0.0[..], data])?;
            c.prepare_cached(
                "INSERT INTO stage_runs(run_id, stage, env, key, state, reason, started_at) VALUES (?1,?2,?3,?4,'running',?5,?6)",
            )?
            .execute(params![run_id, stage, env, &key.0.0[..], reason, now_ms()])?;
            Ok(c.last_insert_rowid())
        })
    }

    /// Record a stage's end. Outputs are stored (blobs already in place) in the same transaction that
    /// flips the row to `success`.
    pub fn finish_stage(
        &self,
        id: i64,
        state: State,
        duration_ms: i64,
        exit_code: Option<i32>,
        log: &[u8],
        outputs: &[OutputRecord],
    ) -> Result<()> {
        let log = zstd::encode_all(log, 3).map_err(|e| Error::Other(e.to_string()))?;
        self.write(|c| {
            c.prepare_cached("UPDATE stage_runs SET state=?2, duration_ms=?3, exit_code=?4, log=?5 WHERE id=?1")?
                .execute(params![id, state.as_str(), duration_ms, exit_code, log])?;
            let mut ins = c.prepare_cached(
                "INSERT OR REPLACE INTO outputs(stage_run_id, path, kind, hash, exec, target, size, sensitive) VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
            )?;
            for o in outputs {
                let (kind, hash, exec, target): (&str, Option<Vec<u8>>, bool, Option<Vec<u8>>) = match &o.entry {
                    Entry::File { hash, exec } => ("file", Some(hash.0.to_vec()), *exec, None),
                    Entry::Symlink { target } => ("symlink", None, false, Some(target.clone())),
                };
                ins.execute(params![id, o.path.as_bytes(), kind, hash, exec, target, o.size as i64, o.sensitive])?;
            }
            Ok(())
        })
    }

    pub fn outputs(&self, stage_run_id: i64) -> Result<Vec<OutputRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT path, kind, hash, exec, target, size, sensitive FROM outputs WHERE stage_run_id=?1 ORDER BY path",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([stage_run_id], |r| {
                let path: Vec<u8> = r.get(0)?;
                let kind: String = r.get(1)?;
                let entry = if kind == "symlink" {
                    Entry::Symlink { target: r.get::<_, Option<Vec<u8>>>(4)?.unwrap_or_default() }
                } else {
                    let h: Vec<u8> = r.get::<_, Option<Vec<u8>>>(2)?.unwrap_or_default();
                    Entry::File { hash: Hash::from_slice(&h).unwrap_or_default(), exec: r.get(3)? }
                };
                Ok(OutputRecord {
                    path: RelPath::from_bytes(&path).unwrap_or_default(),
                    entry,
                    size: r.get::<_, i64>(5)? as u64,
                    sensitive: r.get(6)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.err(e))
    }

    /// The manifest stored for a key. `Ok(None)`: not stored; `Ok(Some(Err))`: stored by another key scheme.
    pub fn manifest(&self, key: &Key) -> Result<Option<std::result::Result<Manifest, DecodeError>>> {
        let mut stmt = self.conn.prepare_cached("SELECT data FROM manifests WHERE key=?1").map_err(|e| self.err(e))?;
        let data: Option<Vec<u8>> = stmt.query_row([&key.0.0[..]], |r| r.get(0)).optional().map_err(|e| self.err(e))?;
        Ok(data.map(|d| match zstd::decode_all(&d[..]) {
            Ok(raw) => Manifest::decode(&raw),
            Err(_) => Err(DecodeError::Corrupt),
        }))
    }

    pub fn log(&self, stage_run_id: i64) -> Result<Option<Vec<u8>>> {
        let mut stmt = self.conn.prepare_cached("SELECT log FROM stage_runs WHERE id=?1").map_err(|e| self.err(e))?;
        let data: Option<Option<Vec<u8>>> =
            stmt.query_row([stage_run_id], |r| r.get(0)).optional().map_err(|e| self.err(e))?;
        Ok(data.flatten().map(|d| zstd::decode_all(&d[..]).unwrap_or_default()))
    }

    /// Event, branch and commit of every run, for export.
    pub fn run_meta(&self) -> Result<HashMap<i64, RunMeta>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, command, event, branch, env, git_commit FROM runs")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    RunMeta {
                        command: r.get(1)?,
                        event: r.get(2)?,
                        branch: r.get(3)?,
                        env: r.get(4)?,
                        git_commit: r.get(5)?,
                    },
                ))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<HashMap<_, _>>>().map_err(|e| self.err(e))
    }

    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn write_tx<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        self.write(f)
    }

    pub fn runs(&self, limit: i64) -> Result<Vec<RunRow>> {
        let sql = format!("SELECT {RUN_COLS} FROM runs ORDER BY id DESC LIMIT ?1");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| self.err(e))?;
        let rows = stmt.query_map([limit], |r| run_row_at(r, 0)).map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.err(e))
    }
}

const RUN_COLS: &str = "id, started_at, finished_at, command, event, branch, env, git_commit, outcome, ran, fresh, restored, failed, skipped, saved_ms";

fn run_row_at(r: &rusqlite::Row<'_>, o: usize) -> rusqlite::Result<RunRow> {
    Ok(RunRow {
        id: r.get(o)?,
        started_at: r.get(o + 1)?,
        finished_at: r.get(o + 2)?,
        command: r.get(o + 3)?,
        event: r.get(o + 4)?,
        branch: r.get(o + 5)?,
        env: r.get(o + 6)?,
        git_commit: r.get(o + 7)?,
        outcome: r.get(o + 8)?,
        counts: RunCounts {
            ran: r.get::<_, Option<i64>>(o + 9)?.unwrap_or(0),
            fresh: r.get::<_, Option<i64>>(o + 10)?.unwrap_or(0),
            restored: r.get::<_, Option<i64>>(o + 11)?.unwrap_or(0),
            failed: r.get::<_, Option<i64>>(o + 12)?.unwrap_or(0),
            skipped: r.get::<_, Option<i64>>(o + 13)?.unwrap_or(0),
            saved_ms: r.get::<_, Option<i64>>(o + 14)?.unwrap_or(0),
        },
    })
}

/// Create `.kkpipe/` with mode 0700. Returns whether it was created now.
fn ensure_dir(dir: &Path) -> Result<bool> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            // The umask may have narrowed the mode further; never let it be wider.
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(false),
        Err(e) => Err(Error::Dir { path: dir.to_path_buf(), source: e }),
    }
}

/// Build a new database beside `db_path` and link it into place. Two first runs racing to set up the same
/// file fail: switching a database to WAL returns SQLITE_BUSY without waiting. Built aside, every kkpipe
/// opens either no database or a complete one (WAL and `auto_vacuum` are recorded in the file itself).
fn create_db(db_path: &Path) -> Result<()> {
    let tmp = db_path.with_file_name(format!("{DB_NAME}.new-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let built = (|| {
        let conn = Connection::open(&tmp).map_err(|e| classify(&tmp, e))?;
        // Before anything is written: lets gc give space back with `PRAGMA incremental_vacuum`.
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL").map_err(|e| classify(&tmp, e))?;
        conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(())).map_err(|e| classify(&tmp, e))?;
        migrate(&conn, &tmp)
        // Closing checkpoints the WAL into the file and removes `-wal`/`-shm`.
    })();
    // A hard link never replaces: when another kkpipe linked its database first, that one is used.
    let linked = built.and_then(|()| match fs::hard_link(&tmp, db_path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(Error::Write { path: db_path.to_path_buf(), detail: e.to_string() })
        }
        _ => Ok(()),
    });
    let _ = fs::remove_file(&tmp);
    linked
}

fn migrate(conn: &Connection, db_path: &Path) -> Result<()> {
    schema::migrate(conn).map_err(|e| match e {
        schema::MigrateError::Newer(found) => {
            Error::NewerSchema { path: db_path.to_path_buf(), found, supported: schema::VERSION }
        }
        schema::MigrateError::Sql(e) => classify(db_path, e),
    })
}

/// Map SQLite failures to errors a user can act on; never "database is locked" verbatim.
fn classify(path: &Path, e: rusqlite::Error) -> Error {
    use rusqlite::ErrorCode as C;
    if let rusqlite::Error::SqliteFailure(f, ref msg) = e {
        let detail = msg.clone().unwrap_or_else(|| f.to_string());
        return match f.code {
            C::DatabaseCorrupt | C::NotADatabase => Error::Corrupt { path: path.to_path_buf(), detail },
            C::DatabaseBusy | C::DatabaseLocked => Error::Busy { path: path.to_path_buf() },
            C::ReadOnly | C::CannotOpen | C::PermissionDenied => {
                Error::Write { path: path.to_path_buf(), detail: format!("{detail} (is `.kkpipe/` read-only?)") }
            }
            C::DiskFull | C::SystemIoFailure => Error::Write { path: path.to_path_buf(), detail },
            _ => Error::Other(format!("{}: {detail}", path.display())),
        };
    }
    Error::Other(format!("{}: {e}", path.display()))
}

pub fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "unknown-host".into())
}
