//! Append-only migrations, tracked by `PRAGMA user_version`. Never edit a released step: add one.

use rusqlite::Connection;

pub(super) const VERSION: i64 = 8;

const STEPS: &[&str] = &[
    // 1: the initial schema.
    "
    CREATE TABLE runs(
        id          INTEGER PRIMARY KEY,
        started_at  INTEGER NOT NULL,
        finished_at INTEGER,
        command     TEXT NOT NULL,
        event       TEXT,
        branch      TEXT,
        env         TEXT NOT NULL,
        git_commit  TEXT,
        pid         INTEGER,
        host        TEXT,
        outcome     TEXT,
        ran INTEGER, fresh INTEGER, restored INTEGER, failed INTEGER, skipped INTEGER, saved_ms INTEGER
    );
    CREATE TABLE stage_runs(
        id          INTEGER PRIMARY KEY,
        run_id      INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        stage       TEXT NOT NULL,
        env         TEXT NOT NULL,
        key         BLOB NOT NULL,
        state       TEXT NOT NULL,
        reason      TEXT,
        started_at  INTEGER NOT NULL,
        duration_ms INTEGER,
        exit_code   INTEGER,
        log         BLOB
    );
    CREATE INDEX stage_runs_by_key ON stage_runs(stage, key, state, started_at);
    CREATE INDEX stage_runs_by_env ON stage_runs(stage, env, started_at);
    CREATE INDEX stage_runs_by_stage ON stage_runs(stage, started_at);
    CREATE INDEX stage_runs_by_run ON stage_runs(run_id);
    CREATE TABLE manifests(
        key  BLOB PRIMARY KEY,
        data BLOB NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE outputs(
        stage_run_id INTEGER NOT NULL REFERENCES stage_runs(id) ON DELETE CASCADE,
        path         BLOB NOT NULL,
        kind         TEXT NOT NULL,
        hash         BLOB,
        exec         INTEGER NOT NULL DEFAULT 0,
        target       BLOB,
        size         INTEGER NOT NULL DEFAULT 0,
        sensitive    INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY(stage_run_id, path)
    ) WITHOUT ROWID;
    CREATE INDEX outputs_by_hash ON outputs(hash);
    CREATE TABLE meta(
        name  TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE stat_snapshot(
        id   INTEGER PRIMARY KEY CHECK (id = 1),
        data BLOB NOT NULL
    );
    ",
    // 2: attempts are ordered by a local per-stage sequence, never by a clock.
    "
    ALTER TABLE stage_runs ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
    UPDATE stage_runs SET seq = (SELECT COUNT(*) FROM stage_runs o WHERE o.stage = stage_runs.stage AND (o.started_at < stage_runs.started_at OR (o.started_at = stage_runs.started_at AND o.id <= stage_runs.id)));
    CREATE INDEX stage_runs_by_seq ON stage_runs(stage, seq);
    CREATE INDEX stage_runs_by_env_seq ON stage_runs(stage, env, seq);
    ",
    // 3: the newest record of each shared deploy ledger (per remote) already learned or written here, and the
    // local attempt it is in step with.
    "
    CREATE TABLE remote_ledger(
        remote    TEXT NOT NULL,
        stage     TEXT NOT NULL,
        env       TEXT NOT NULL,
        seq       INTEGER NOT NULL,
        local_seq INTEGER NOT NULL,
        PRIMARY KEY(remote, stage, env)
    ) WITHOUT ROWID;
    ",
    // 4: the stat cache moved to a file of its own beside the database (`Cache::save_stat_snapshot`).
    "
    DROP TABLE stat_snapshot;
    ",
    // 5: the permission bits of output files and directories (NULL: recorded before they were kept).
    "
    ALTER TABLE outputs ADD COLUMN mode INTEGER;
    ",
    // 6: who ran it, from which branch, whether the tree was dirty, the CI run (`audit::Audit` as JSON).
    "
    ALTER TABLE runs ADD COLUMN audit TEXT;
    ",
    // 7: each deploy stage's last drift probe per environment (as first written; replaced by 8).
    "
    CREATE TABLE probes(
        stage TEXT NOT NULL,
        env   TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        drift TEXT,
        PRIMARY KEY(stage, env)
    ) WITHOUT ROWID;
    ",
    // 8: what was last seen of each deploy stage's live system per environment (`probes::Probe`): a probe, or a
    // deploy. What step 7 kept is dropped (a sighting is found again by the next probe).
    "
    DROP TABLE probes;
    CREATE TABLE probes(
        stage TEXT NOT NULL,
        env   TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        seen  TEXT NOT NULL,
        drift TEXT,
        PRIMARY KEY(stage, env)
    ) WITHOUT ROWID;
    ",
];

pub(super) enum MigrateError {
    Newer(i64),
    Sql(rusqlite::Error),
}

pub(super) fn migrate(conn: &Connection) -> Result<(), MigrateError> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(MigrateError::Sql)?;
    if current > VERSION {
        return Err(MigrateError::Newer(current));
    }
    if current == VERSION {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE").map_err(MigrateError::Sql)?;
    // Re-read under the write lock: a concurrent kkpipe may have migrated meanwhile.
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(MigrateError::Sql)?;
    let result = (|| {
        for (i, step) in STEPS.iter().enumerate().skip(current as usize) {
            conn.execute_batch(step)?;
            conn.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        }
        conn.execute_batch("COMMIT")
    })();
    if let Err(e) = result {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(MigrateError::Sql(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache at version 7 (its first `probes` table, with a row) migrates to the current schema, and what it
    /// kept of probes is dropped, never misread.
    #[test]
    fn a_version_7_cache_migrates_and_drops_its_old_probes() {
        let conn = Connection::open_in_memory().unwrap();
        for (i, step) in STEPS.iter().take(7).enumerate() {
            conn.execute_batch(step).unwrap();
            conn.execute_batch(&format!("PRAGMA user_version = {}", i + 1)).unwrap();
        }
        conn.execute_batch("INSERT INTO probes(stage, env, at_ms, drift) VALUES ('a', 'default', 1, 'x')").unwrap();
        assert!(migrate(&conn).is_ok());
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, VERSION);
        let rows: i64 = conn.query_row("SELECT COUNT(*) FROM probes", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 0);
        conn.execute_batch("INSERT INTO probes(stage, env, at_ms, seen) VALUES ('a', 'default', 1, 'in-sync')")
            .unwrap();
    }
}
