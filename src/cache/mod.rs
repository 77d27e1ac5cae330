//! The cache under `.kkpipe/`: a SQLite database of what ran, and a content-addressed blob store of outputs.
//!
//! - `cache.db`: runs, stage runs (key, state, timing, masked log), manifests (the structured inputs behind
//!   each key), outputs of successful stage runs. WAL mode, an explicit busy timeout,
//!   writes in `BEGIN IMMEDIATE` transactions, migrations on `PRAGMA user_version` (append-only). A new
//!   database is built aside and linked into place, so concurrent first runs never see it half set up.
//! - `stat-cache`: the stat cache, one checksummed file ([`Cache::save_stat_snapshot`]).
//! - `blobs/`: outputs by BLAKE3, see [`store`]. A row pointing at a blob is committed only after the blob.
//! - `sensitive/`: sensitive output blobs and `secret.key`, 32 random bytes (mode 0600) keying the HMAC of
//!   `secret_env` values unless `KKPIPE_SECRET_KEY` is set (then the key is derived from that secret and
//!   never stored). Kept apart so a CI cache can save `.kkpipe/` without them.
//!
//! A stage run row is inserted as `running` *before* the stage starts and becomes `success` only in the
//! transaction that also records its outputs: an interrupted or killed run can never look fresh. Every row
//! is written through [`records`], the one write API, by runs and `cache import` alike.

pub(crate) mod archive;
pub(crate) mod gc;
pub(crate) mod outputs;
mod place;
pub(crate) mod probes;
mod records;
mod schema;
pub(crate) mod store;

pub(crate) use crate::fresh::{RunCounts, RunOutcome, RunRow};
pub(crate) use records::{BadValue, End, NewAttempt};
use rusqlite::Connection;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
pub(crate) use store::BlobStore;

pub(crate) const DIR_NAME: &str = ".kkpipe";
pub(crate) const DB_NAME: &str = "cache.db";
/// The stat cache, a file of its own beside the database (see [`Cache::save_stat_snapshot`]).
const STAT_CACHE_NAME: &str = "stat-cache";
pub(crate) const SECRET_KEY_NAME: &str = "sensitive/secret.key";
/// A secret shared by the machines of one repository (a CI secret). When set, the HMAC key of `secret_env`
/// values is derived from it instead of the random per-repository `secret.key`.
pub(crate) const SECRET_KEY_VAR: &str = "KKPIPE_SECRET_KEY";
/// The BLAKE3 `derive_key` context for [`shared_secret_key`]; changing it changes every secret_env key.
const SECRET_KEY_CONTEXT: &str = "kkpipe 2026 secret_env HMAC key v1";

/// The HMAC key for `secret_env` values derived from the value of [`SECRET_KEY_VAR`]: the same on every
/// machine given the same secret, so their keys match. It is never written anywhere (not to `.kkpipe/`, not
/// into an export): it exists only in the memory of the process that was given the secret.
pub(crate) fn shared_secret_key(secret: &str) -> [u8; 32] {
    blake3::derive_key(SECRET_KEY_CONTEXT, secret.as_bytes())
}

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
    #[error("cannot write the cache `{}`: {source}\n  hint: check free disk space and permissions; nothing was recorded for the failed write", path.display())]
    Write { path: PathBuf, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("cache: {0}")]
    Other(String),
}

pub(crate) type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Clone, Default)]
pub struct RunMeta {
    pub command: String,
    pub event: Option<String>,
    pub branch: Option<String>,
    pub env: String,
    pub git_commit: Option<String>,
    pub audit: crate::fresh::Audit,
}

pub struct Cache {
    dir: PathBuf,
    db_path: PathBuf,
    conn: Connection,
    pub blobs: BlobStore,
}

pub(crate) use crate::clock::{hostname, now_ms};

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
        // The query planner's stability guarantee: one plan per statement. Without it the bundled SQLite
        // (built with STAT4) re-prepares a cached statement whenever a bound value changes, which was most of
        // the cost of a no-op run of a thousand stages.
        self.conn
            .set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
            .map_err(|e| classify(&self.db_path, e))?;
        self.conn.set_prepared_statement_cache_capacity(64);
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `f`'s reads as one read transaction: one snapshot, and one lock of the database's shared memory rather
    /// than one per statement (a no-op run of a thousand stages spent four `fcntl` calls per stage on them).
    /// Inside a transaction already, `f` just runs in it.
    pub(crate) fn reading<T>(&self, f: impl FnOnce() -> T) -> T {
        let began = self.conn.is_autocommit() && self.conn.execute_batch("BEGIN DEFERRED").is_ok();
        let out = f();
        // A read transaction has nothing to lose: if it cannot commit, it is rolled back.
        if began && self.conn.execute_batch("COMMIT").is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        out
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

    /// The per-repository key for HMACs of secret env values, created (0600) on first use. Used only when
    /// [`SECRET_KEY_VAR`] is not set (see [`shared_secret_key`]).
    pub fn secret_key(&self) -> Result<[u8; 32]> {
        if let Some(k) = self.stored_secret_key() {
            return Ok(k);
        }
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| Error::Other(format!("no randomness for the secret key: {e}")))?;
        self.install_secret_key(&key)
    }

    /// The per-repository key if one is stored; never creates one.
    pub(crate) fn stored_secret_key(&self) -> Option<[u8; 32]> {
        fs::read(self.dir.join(SECRET_KEY_NAME)).ok().and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
    }

    /// Store `key` unless a key is already stored, and return the key that is stored now. Create-only (a
    /// complete file linked into place, which fails if the name exists): two first runs started together on a
    /// new checkout, each with its own random key, end up keying `secret_env` with the same one, the winner's.
    pub(crate) fn install_secret_key(&self, key: &[u8; 32]) -> Result<[u8; 32]> {
        let path = self.dir.join(SECRET_KEY_NAME);
        let sensitive = self.dir.join(store::SENSITIVE_DIR);
        let write = || -> std::io::Result<()> {
            match fs::DirBuilder::new().mode(0o700).create(&sensitive) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
            let mut tmp = tempfile::Builder::new().prefix("secret.key.").tempfile_in(&sensitive)?;
            tmp.as_file().set_permissions(fs::Permissions::from_mode(0o600))?;
            tmp.write_all(key)?;
            tmp.as_file().sync_all()?;
            match tmp.persist_noclobber(&path) {
                Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                r => r.map(drop).map_err(|e| e.error),
            }
        };
        write().map_err(|e| Error::Write { path: path.clone(), source: e.into() })?;
        self.stored_secret_key().ok_or_else(|| Error::Other(format!("`{}` is not a 32-byte key", path.display())))
    }

    // ---------------------------------------------------------------- stat cache

    /// The stat cache snapshot (see `hash::files::encode_snapshot`); empty when there is none, or when it is
    /// damaged or unreadable (it only saves work: every file is then hashed again).
    pub fn stat_snapshot(&self) -> Vec<u8> {
        fs::read(self.dir.join(STAT_CACHE_NAME)).map(crate::hash::files::checked_snapshot).unwrap_or_default()
    }

    /// Store the stat cache snapshot: a file beside the database, replaced by a rename (a 5 MB blob written
    /// through SQLite's WAL and checkpoint cost 40-75 ms per cold run; the file costs a few). Best effort by
    /// design: without it the next invocation only hashes more. Not synced: its checksum rejects a torn file.
    pub fn save_stat_snapshot(&self, bytes: &[u8]) {
        // A temporary file of its own (created exclusively, a random name), so two writers never share one.
        let write = || -> std::io::Result<()> {
            let mut tmp = tempfile::Builder::new().prefix(&format!("{STAT_CACHE_NAME}.")).tempfile_in(&self.dir)?;
            tmp.write_all(bytes)?;
            tmp.persist(self.dir.join(STAT_CACHE_NAME)).map_err(|e| e.error)?;
            Ok(())
        };
        let _ = write();
    }

    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn write_tx<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        self.write(f)
    }
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
            Err(Error::Write { path: db_path.to_path_buf(), source: e.into() })
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
    if let rusqlite::Error::FromSqlConversionFailure(_, _, ref inner) = e
        && let Some(bad) = inner.downcast_ref::<BadValue>()
    {
        return Error::Corrupt { path: path.to_path_buf(), detail: bad.to_string() };
    }
    if let rusqlite::Error::SqliteFailure(f, ref msg) = e {
        let detail = msg.clone().unwrap_or_else(|| f.to_string());
        return match f.code {
            C::DatabaseCorrupt | C::NotADatabase => Error::Corrupt { path: path.to_path_buf(), detail },
            C::DatabaseBusy | C::DatabaseLocked => Error::Busy { path: path.to_path_buf() },
            C::ReadOnly | C::CannotOpen | C::PermissionDenied => {
                Error::Write { path: path.to_path_buf(), source: format!("{detail} (is `.kkpipe/` read-only?)").into() }
            }
            C::DiskFull | C::SystemIoFailure => Error::Write { path: path.to_path_buf(), source: Box::new(e) },
            _ => Error::Other(format!("{}: {detail}", path.display())),
        };
    }
    Error::Other(format!("{}: {e}", path.display()))
}
