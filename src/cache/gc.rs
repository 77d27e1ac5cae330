//! Keeping the cache bounded: `kkpipe cache gc`, and the automatic collection after runs.
//!
//! The default policy (docs/ci.md, "Cache size"):
//! - always kept, whatever their age: per stage the latest successful run and the latest attempt; per deploy
//!   stage and environment the same (the ledger's head). These are what the next run's hits come from.
//! - other successful runs: the [`Policy::keep_per_stage`] newest per stage and environment, if younger than
//!   [`Policy::max_age_days`]; failed and interrupted runs that are not the latest attempt are removed;
//! - run history: the [`Policy::keep_runs`] newest runs (older ones lose their stage runs' logs with them);
//! - blobs, manifests and stat-cache entries nothing refers to any more are removed;
//! - if the stored outputs are still larger than [`Policy::max_size`], the oldest runs that are not always
//!   kept go first, until they fit.
//!
//! `kkpipe run` collects automatically every [`AUTO_EVERY`] runs, so the store cannot grow without bound.

use super::{Cache, Result};
use rusqlite::params;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// Runs between automatic collections.
pub(crate) const AUTO_EVERY: i64 = 20;

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub max_age_days: u64,
    pub max_size: u64,
    pub keep_per_stage: usize,
    pub keep_runs: usize,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy { max_age_days: 30, max_size: 1 << 30, keep_per_stage: 5, keep_runs: 200 }
    }
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    pub stage_runs_removed: usize,
    pub runs_removed: usize,
    pub manifests_removed: usize,
    pub blobs_removed: usize,
    pub bytes_freed: u64,
    pub stat_entries_removed: usize,
}

pub(crate) use crate::report::history::CacheStats as Stats;

struct Row {
    id: i64,
    stage: String,
    env: String,
    success: bool,
    started_at: i64,
}

impl Cache {
    pub fn stats(&self) -> Result<Stats> {
        let count =
            |sql: &str| -> Result<i64> { self.conn().query_row(sql, [], |r| r.get(0)).map_err(|e| self.err(e)) };
        let mut s = Stats {
            runs: count("SELECT COUNT(*) FROM runs")?,
            stage_runs: count("SELECT COUNT(*) FROM stage_runs")?,
            successful: count("SELECT COUNT(*) FROM stage_runs WHERE state='success'")?,
            failed: count("SELECT COUNT(*) FROM stage_runs WHERE state IN ('failed', 'interrupted')")?,
            manifests: count("SELECT COUNT(*) FROM manifests")?,
            stat_entries: crate::hash::files::snapshot_entries(&self.stat_snapshot()).len() as i64,
            ..Stats::default()
        };
        for (_, size, sensitive) in self.blobs.list() {
            if sensitive {
                s.sensitive_blobs += 1;
                s.sensitive_bytes += size;
            } else {
                s.blobs += 1;
                s.blob_bytes += size;
            }
        }
        for suffix in ["", "-wal", "-shm"] {
            let p = self.db_path().with_file_name(format!("{}{suffix}", super::DB_NAME));
            s.database_bytes += std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        }
        Ok(s)
    }

    fn rows(&self) -> Result<Vec<Row>> {
        let mut stmt = self
            .conn()
            .prepare("SELECT id, stage, env, state, started_at FROM stage_runs WHERE state != 'running' ORDER BY seq DESC, id DESC")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Row {
                    id: r.get(0)?,
                    stage: r.get(1)?,
                    env: r.get(2)?,
                    success: crate::fresh::State::parse(&r.get::<_, String>(3)?).is_some_and(|s| s.succeeded()),
                    started_at: r.get(4)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.err(e))
    }

    /// Stage runs the next run's decisions depend on: never collected.
    fn essential(rows: &[Row]) -> BTreeSet<i64> {
        let mut keep = BTreeSet::new();
        // (stage, environment or any, successes only): rows are newest first, so the first row seen for a
        // kind is its latest attempt / latest success.
        let mut seen: BTreeSet<(String, Option<String>, bool)> = BTreeSet::new();
        for r in rows {
            let mut kinds = vec![(r.stage.clone(), None, false), (r.stage.clone(), Some(r.env.clone()), false)];
            if r.success {
                kinds.push((r.stage.clone(), None, true));
                kinds.push((r.stage.clone(), Some(r.env.clone()), true));
            }
            for kind in kinds {
                if seen.insert(kind) {
                    keep.insert(r.id);
                }
            }
        }
        keep
    }

    /// Collect garbage under `policy`. The caller holds the run lock. `root` is the repository (for the stat cache).
    pub fn gc(&self, policy: &Policy, root: &Path) -> Result<Report> {
        let mut report = Report::default();
        let now = super::now_ms();
        let max_age_ms = policy.max_age_days as i64 * 86_400_000;
        let rows = self.rows()?;
        let essential = Self::essential(&rows);
        let mut per_stage: HashMap<(String, String), usize> = HashMap::new();
        let mut doomed: Vec<i64> = Vec::new();
        let mut candidates: Vec<(i64, i64)> = Vec::new(); // kept for now, removable if over size (started_at, id)
        for r in &rows {
            if essential.contains(&r.id) {
                continue;
            }
            if !r.success {
                doomed.push(r.id);
                continue;
            }
            let n = per_stage.entry((r.stage.clone(), r.env.clone())).or_insert(0);
            *n += 1;
            if *n > policy.keep_per_stage || now - r.started_at > max_age_ms {
                doomed.push(r.id);
            } else {
                candidates.push((r.started_at, r.id));
            }
        }
        self.remove_stage_runs(&doomed, &mut report)?;
        self.trim_runs(policy.keep_runs, &mut report)?;
        self.sweep(&mut report)?;
        // Still too big: drop the oldest removable runs, a few at a time.
        candidates.sort();
        while self.blobs.list().iter().map(|(_, size, _)| size).sum::<u64>() > policy.max_size && !candidates.is_empty()
        {
            let take = candidates.len().min(8);
            let batch: Vec<i64> = candidates.drain(..take).map(|(_, id)| id).collect();
            self.remove_stage_runs(&batch, &mut report)?;
            self.sweep(&mut report)?;
        }
        report.stat_entries_removed = self.prune_stat_cache(root)?;
        let _ = self.conn().execute_batch("PRAGMA incremental_vacuum; PRAGMA wal_checkpoint(TRUNCATE);");
        self.set_meta("last_gc_run", &self.last_run_id()?.to_string())?;
        Ok(report)
    }

    fn remove_stage_runs(&self, ids: &[i64], report: &mut Report) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let n = self.write_tx(|c| {
            let mut del = c.prepare_cached("DELETE FROM stage_runs WHERE id=?1")?;
            let mut n = 0;
            for id in ids {
                c.prepare_cached("DELETE FROM outputs WHERE stage_run_id=?1")?.execute([id])?;
                n += del.execute([id])?;
            }
            Ok(n)
        })?;
        report.stage_runs_removed += n;
        Ok(())
    }

    /// Keep the newest `keep` runs in the history, and any run that still has stage runs.
    fn trim_runs(&self, keep: usize, report: &mut Report) -> Result<()> {
        let n = self.write_tx(|c| {
            c.execute(
                "DELETE FROM runs WHERE id NOT IN (SELECT id FROM runs ORDER BY id DESC LIMIT ?1)
                   AND id NOT IN (SELECT DISTINCT run_id FROM stage_runs)
                   AND outcome IS NOT NULL",
                params![keep as i64],
            )
        })?;
        report.runs_removed += n;
        Ok(())
    }

    /// Remove manifests and blobs nothing refers to, and what was last seen of a deploy stage no record of which
    /// is left (a stage removed from the pipeline, an environment no longer deployed).
    fn sweep(&self, report: &mut Report) -> Result<()> {
        report.manifests_removed += self.write_tx(|c| {
            c.execute(
                "DELETE FROM probes WHERE NOT EXISTS (SELECT 1 FROM stage_runs s WHERE s.stage = probes.stage AND s.env = probes.env)",
                [],
            )?;
            c.execute("DELETE FROM manifests WHERE key NOT IN (SELECT DISTINCT key FROM stage_runs)", [])
        })?;
        let mut referenced: BTreeSet<(Vec<u8>, bool)> = BTreeSet::new();
        {
            let mut stmt = self
                .conn()
                .prepare("SELECT hash, sensitive FROM outputs WHERE hash IS NOT NULL")
                .map_err(|e| self.err(e))?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, bool>(1)?))).map_err(|e| self.err(e))?;
            for r in rows {
                referenced.insert(r.map_err(|e| self.err(e))?);
            }
        }
        for (hash, size, sensitive) in self.blobs.list() {
            if !referenced.contains(&(hash.0.to_vec(), sensitive)) && self.blobs.remove(&hash, sensitive).is_ok() {
                report.blobs_removed += 1;
                report.bytes_freed += size;
            }
        }
        Ok(())
    }

    /// Stat-cache entries for files that no longer exist.
    fn prune_stat_cache(&self, root: &Path) -> Result<usize> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = self.stat_snapshot();
        let mut entries = crate::hash::files::snapshot_entries(&bytes);
        let before = entries.len();
        entries.retain(|(p, _)| {
            let path = std::path::Path::new(std::ffi::OsStr::from_bytes(p));
            let abs = if p.first() == Some(&b'/') { path.to_path_buf() } else { root.join(path) };
            std::fs::symlink_metadata(abs).is_ok()
        });
        let removed = before - entries.len();
        if removed > 0 {
            self.save_stat_snapshot(&crate::hash::files::encode_snapshot(entries));
        }
        Ok(removed)
    }

    fn last_run_id(&self) -> Result<i64> {
        self.conn().query_row("SELECT COALESCE(MAX(id), 0) FROM runs", [], |r| r.get(0)).map_err(|e| self.err(e))
    }

    pub(crate) fn meta(&self, name: &str) -> Result<Option<String>> {
        use rusqlite::OptionalExtension;
        self.conn()
            .query_row("SELECT value FROM meta WHERE name=?1", [name], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    fn set_meta(&self, name: &str, value: &str) -> Result<()> {
        self.write_tx(|c| c.execute("INSERT OR REPLACE INTO meta(name, value) VALUES (?1, ?2)", params![name, value]))?;
        Ok(())
    }

    /// After a run: collect when [`AUTO_EVERY`] runs have passed since the last collection.
    pub fn auto_gc(&self, root: &Path) -> Result<Option<Report>> {
        let last: i64 = self.meta("last_gc_run")?.and_then(|v| v.parse().ok()).unwrap_or(0);
        if self.last_run_id()? - last < AUTO_EVERY {
            return Ok(None);
        }
        self.gc(&Policy::default(), root).map(Some)
    }

    /// Every stage run the next run's decisions depend on (for export): see [`Self::essential`].
    pub fn live_stage_runs(&self) -> Result<Vec<crate::fresh::Attempt>> {
        let rows = self.rows()?;
        let mut out = Vec::new();
        for id in Self::essential(&rows) {
            out.extend(self.stage_run(id)?);
        }
        Ok(out)
    }
}

/// Parse sizes like `500M`, `2G`, `1024K`, `123` (bytes).
pub(crate) fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        None => (t, 1u64),
        Some((i, _)) => {
            let unit = t[i..].to_ascii_uppercase();
            let m = match unit.trim_end_matches('B').trim_end_matches('I') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size unit in `{text}`; use K, M, G or T")),
            };
            (&t[..i], m)
        }
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("`{text}` is not a size like 500M or 2G"))?;
    if n < 0.0 {
        return Err(format!("`{text}` is negative"));
    }
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    /// What was last seen of a stage with no record left goes with its records; a recorded stage's stays.
    #[test]
    fn a_sighting_without_records_is_swept() {
        use crate::cache::probes::{Probe, Seen};
        let tmp = tempfile::tempdir().unwrap();
        let cache = crate::cache::Cache::open(tmp.path()).unwrap();
        cache.record_probe(&Probe::now("gone", "default", Seen::InSync)).unwrap();
        assert_eq!(cache.probes(None).unwrap().len(), 1);
        cache.gc(&super::Policy::default(), tmp.path()).unwrap();
        assert!(cache.probes(None).unwrap().is_empty());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("500M"), Ok(500 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("5 apples").is_err());
    }
}
