//! `kkpipe remote keygen|status` and `kkpipe cache gc --remote`.

use super::Opened;
use crate::cli::{RemoteCommand, Selection};
use crate::error::{Error, exit};
use crate::remote::{Mode, admin};
use crate::settings::Settings;
use crate::sign::PrivateKey;

pub(super) fn remote(settings: &Settings, c: &RemoteCommand) -> Result<u8, Error> {
    match c {
        RemoteCommand::Keygen { json } => {
            let k = PrivateKey::generate();
            print!("{}", crate::report::remote::keygen(&k.to_text(), &k.public().to_string(), *json));
            Ok(exit::OK)
        }
        RemoteCommand::Status { json, selection } => {
            let o = Opened::open(settings, selection)?;
            let resolved = o.resolve_remote(settings)?;
            let why = resolved.why.to_string();
            let Some(r) = o.open_remote(settings, resolved)? else {
                print!("{}", crate::report::remote::off(&why, *json));
                return Ok(exit::OK);
            };
            let mut s = admin::status(&r);
            s.only_here = only_here(&o, &r)?;
            print!("{}", crate::report::remote::status(&s, *json));
            // A store that does not answer is worth a non-zero exit here (and only here: runs go on locally).
            Ok(if s.error.is_some() { exit::FAILED } else { exit::OK })
        }
    }
}

/// The deploy stages whose latest record in `o.env` is in this cache only: the ledger was never in step with it.
fn only_here(o: &Opened, r: &crate::remote::Remote) -> Result<Vec<String>, Error> {
    use crate::fresh::History;
    let mut out = Vec::new();
    for stage in o.pipeline.stages.iter().filter(|s| s.is_deploy()) {
        if o.cache.latest_attempt(&stage.name, Some(&o.env))?.is_none() {
            continue;
        }
        if o.cache.remote_seen(&r.url, &stage.name, &o.env)?.is_none_or(|seen| seen.unsynced) {
            out.push(format!("`{}`", stage.name));
        }
    }
    Ok(out)
}

/// `kkpipe cache gc --remote`: only a writer collects (a pull request's job can never delete).
pub(super) fn gc(settings: &Settings, max_age_days: Option<u64>, grace_hours: Option<u64>) -> Result<u8, Error> {
    // The environment does not matter here; the event does (a pull request's job never deletes).
    let sel = Selection { event: None, branch: None, env_name: "default".into(), remote: None };
    let Some(r) = Opened::open(settings, &sel)?.remote(settings)? else {
        return Err(Error::Usage("`cache gc --remote`: no remote is configured (or it is off)".into()));
    };
    if r.mode != Mode::ReadWrite {
        return Err(Error::Usage(format!(
            "`cache gc --remote` deletes from `{}`, which is read-only here ({})\n  hint: run it where {} is set",
            r.url,
            r.why,
            crate::remote::SIGNING_KEY_VAR
        )));
    }
    let c = admin::gc(&r, max_age_days.unwrap_or(30), grace_hours.unwrap_or(24))
        .map_err(|e| Error::Usage(format!("`cache gc --remote` on `{}` failed: {e}", r.url)))?;
    eprintln!(
        "kkpipe: removed {} entries and {} blobs ({:.1} MB) from `{}`",
        c.entries,
        c.blobs,
        c.bytes as f64 / 1e6,
        r.url
    );
    Ok(exit::OK)
}
