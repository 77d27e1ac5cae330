//! `kkpipe cache export|import|gc|stats|reset`.

use super::{Opened, lock, root};
use crate::cache::Cache;
use crate::cli::{CacheCommand, Selection};
use crate::error::{Error, exit};
use crate::fresh::Attempt;
use crate::graph::Selected;
use crate::settings::Settings;
use std::path::Path;

pub(super) fn cache(settings: &Settings, c: &CacheCommand) -> Result<u8, Error> {
    match c {
        CacheCommand::Export { file, include_sensitive, selection } => {
            export(settings, selection, file, *include_sensitive)
        }
        CacheCommand::Import { file, with_secret_key, lock_timeout } => {
            let root = root(settings)?;
            // Records are checked against the stages' declared outputs, so the pipeline must load.
            let pipeline = crate::pipeline::load(&root)?;
            let cache = Cache::open(&root)?;
            let _lock = lock(&cache, "cache import", *lock_timeout)?;
            let r = crate::cache::archive::import(&cache, file, &pipeline.stages, *with_secret_key)?;
            let unknown = match r.skipped_unknown {
                0 => String::new(),
                n => format!("; left out {n} of stages this pipeline does not have"),
            };
            eprintln!(
                "kkpipe: imported {} stage runs ({} already here{unknown}) and {} stored outputs from `{}`",
                r.entries,
                r.skipped_existing,
                r.blobs,
                file.display()
            );
            if r.secret_key {
                eprintln!("kkpipe: installed the archive's secret.key (the HMAC key of secret_env values)");
            }
            if r.secret_key_left {
                eprintln!(
                    "kkpipe: warning: the archive carries a secret.key, not installed: whoever made the archive chose it \
                     (`--with-secret-key` installs it, for an archive you made; or set KKPIPE_SECRET_KEY on every runner)"
                );
            }
            Ok(exit::OK)
        }
        CacheCommand::Gc { remote: true, max_age, grace_hours, .. } => {
            super::remote::gc(settings, *max_age, *grace_hours)
        }
        CacheCommand::Gc { max_size, max_age, keep, .. } => gc(settings, max_size.as_deref(), *max_age, *keep),
        CacheCommand::Stats { json } => {
            let root = root(settings)?;
            if !Cache::exists(&root) {
                eprintln!("kkpipe: no cache at `{}` yet", Cache::dir_of(&root).display());
                return Ok(exit::OK);
            }
            let s = Cache::open(&root)?.stats()?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&s).expect("serialisable"));
            } else {
                print!("{}", crate::report::history::stats_table(&s));
            }
            Ok(exit::OK)
        }
        CacheCommand::Reset => reset(&root(settings)?),
    }
}

/// The stage runs behind the current hits, and every stage's latest success (per environment).
fn export(settings: &Settings, selection: &Selection, file: &Path, include_sensitive: bool) -> Result<u8, Error> {
    let o = Opened::open(settings, selection)?;
    let mut runs: Vec<Attempt> = o.cache.live_stage_runs()?;
    let everything = vec![Selected::Yes; o.pipeline.stages.len()];
    let mut session = o.session(settings)?;
    match crate::evaluate::all(o.cx(), &mut session, &o.cache, &everything, &|_| false) {
        Ok(evals) => {
            for hit in evals.iter().flatten().filter_map(|e| e.decision.hit()) {
                if !runs.iter().any(|r| r.id == hit.record.id) {
                    runs.push(hit.record.clone());
                }
            }
        }
        Err(e) => eprintln!("warning: exporting the latest runs only: {e}"),
    }
    runs.sort_by_key(|r| r.id);
    let r = crate::cache::archive::export(&o.cache, &runs, &o.pipeline.stages, file, include_sensitive)?;
    for why in &r.left_out {
        eprintln!("kkpipe: warning: left out of the export, an import would refuse it: {why}");
    }
    let left_out = match r.sensitive_left_out {
        0 => String::new(),
        n => format!("; left out {n} sensitive outputs (`--include-sensitive` adds them)"),
    };
    eprintln!(
        "kkpipe: exported {} stage runs and {} stored outputs ({:.1} MB) to `{}`{left_out}",
        r.entries,
        r.blobs,
        r.bytes as f64 / 1e6,
        file.display()
    );
    Ok(exit::OK)
}

fn gc(settings: &Settings, max_size: Option<&str>, max_age: Option<u64>, keep: Option<usize>) -> Result<u8, Error> {
    let root = root(settings)?;
    let cache = Cache::open(&root)?;
    let _lock = lock(&cache, "cache gc", 600)?;
    let mut policy = crate::cache::gc::Policy::default();
    if let Some(s) = max_size {
        policy.max_size = crate::cache::gc::parse_size(s).map_err(Error::Usage)?;
    }
    if let Some(d) = max_age {
        policy.max_age_days = d;
    }
    if let Some(k) = keep {
        policy.keep_per_stage = k;
    }
    let before = cache.stats()?;
    let r = cache.gc(&policy, &root)?;
    let after = cache.stats()?;
    let mb = |b: u64| b as f64 / 1e6;
    eprintln!(
        "kkpipe: removed {} stage runs, {} runs, {} manifests and {} stored outputs ({:.1} MB); the cache now holds {} stage runs and {:.1} MB of outputs (was {:.1} MB)",
        r.stage_runs_removed,
        r.runs_removed,
        r.manifests_removed,
        r.blobs_removed,
        mb(r.bytes_freed),
        after.stage_runs,
        mb(after.blob_bytes + after.sensitive_bytes),
        mb(before.blob_bytes + before.sensitive_bytes),
    );
    Ok(exit::OK)
}

fn reset(root: &Path) -> Result<u8, Error> {
    let dir = Cache::dir_of(root);
    if !dir.exists() {
        eprintln!("kkpipe: no cache at `{}`", dir.display());
        return Ok(exit::OK);
    }
    // Hold the run lock while deleting, so no run is writing. A corrupt database cannot be opened, but then no
    // run can be using it either.
    let held = match Cache::open(root) {
        Ok(cache) => Some(lock(&cache, "cache reset", 10)?),
        Err(_) => None,
    };
    std::fs::remove_dir_all(&dir).map_err(|e| Error::io("remove", &dir, e))?;
    drop(held);
    eprintln!("kkpipe: removed `{}`", dir.display());
    Ok(exit::OK)
}
