//! What kkpipe last saw of each deploy stage's live system, per environment: its drift probe found it in sync
//! or drifted (a scheduled `kkpipe verify`, or a push's probe), or a deploy made it what the repository says.
//! `kkpipe preview` shows a reviewer the drift still open; cache archives carry it, so a CI job that restores
//! the cache sees it.
//!
//! A deploy counts as a sighting of its own (the live system is as deployed), recorded where it happened: which
//! came last is never decided by comparing this machine's clock with another's attempt records.

use super::{Cache, Result, now_ms};
use crate::tfplan::TextChange;
use rusqlite::params;
use serde::{Deserialize, Serialize};

/// At most this many drifted resources are kept (the rest are counted).
pub(crate) const MAX_RESOURCES: usize = 200;
/// A probe's first line is kept up to this many characters.
pub(crate) const MAX_DETAIL: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub stage: String,
    pub env: String,
    /// When, in milliseconds since the epoch (this machine's clock, or the exporter's).
    pub at_ms: i64,
    pub seen: Seen,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "seen", rename_all = "kebab-case")]
pub enum Seen {
    /// The probe found the live system as last deployed.
    InSync,
    /// A deploy succeeded (or adopted the live system): it is as the repository says.
    Deployed,
    /// The probe found drift.
    Drifted {
        /// What drifted, when the probe is a `terraform plan` (at most [`MAX_RESOURCES`]).
        resources: Vec<TextChange>,
        /// Drifted resources beyond those.
        more: usize,
        /// Its first line of output (masked, controls escaped, at most [`MAX_DETAIL`] characters).
        detail: String,
    },
}

impl Seen {
    /// What a drift probe's (masked) output says drifted, with the resources it names (`tfplan::changes_in_text`).
    pub fn drifted(output: &str, mut resources: Vec<TextChange>) -> Seen {
        let more = resources.len().saturating_sub(MAX_RESOURCES);
        resources.truncate(MAX_RESOURCES);
        let first = output.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
        let detail: String = crate::relpath::escape_controls(first).chars().take(MAX_DETAIL).collect();
        Seen::Drifted { resources, more, detail }
    }

    fn word(&self) -> &'static str {
        match self {
            Seen::InSync => "in-sync",
            Seen::Deployed => "deployed",
            Seen::Drifted { .. } => "drifted",
        }
    }
}

impl Probe {
    /// What was seen here just now.
    pub fn now(stage: &str, env: &str, seen: Seen) -> Probe {
        Probe { stage: stage.into(), env: env.into(), at_ms: now_ms(), seen }
    }
}

fn row(p: &Probe) -> (String, Option<String>) {
    let drift = match &p.seen {
        Seen::Drifted { .. } => Some(serde_json::to_string(&p.seen).expect("serialisable")),
        _ => None,
    };
    (p.seen.word().to_string(), drift)
}

fn upsert(c: &rusqlite::Connection, p: &Probe, only_if_newer: bool) -> rusqlite::Result<()> {
    let (seen, drift) = row(p);
    let sql = match only_if_newer {
        false => "INSERT OR REPLACE INTO probes(stage, env, at_ms, seen, drift) VALUES (?1,?2,?3,?4,?5)",
        true => {
            "INSERT INTO probes(stage, env, at_ms, seen, drift) VALUES (?1,?2,?3,?4,?5) ON CONFLICT(stage, env) DO UPDATE SET at_ms = excluded.at_ms, seen = excluded.seen, drift = excluded.drift WHERE excluded.at_ms > probes.at_ms"
        }
    };
    c.prepare_cached(sql)?.execute(params![p.stage, p.env, p.at_ms, seen, drift]).map(drop)
}

impl Cache {
    /// Keep `p`, seen here just now, as its stage's last sighting in its environment.
    pub fn record_probe(&self, p: &Probe) -> Result<()> {
        self.write(|c| upsert(c, p, false))
    }

    /// The last sighting of every stage (in `env`, or every environment), by stage name. A row this kkpipe
    /// cannot read is left out.
    pub fn probes(&self, env: Option<&str>) -> Result<Vec<Probe>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT stage, env, at_ms, seen, drift FROM probes WHERE ?1 IS NULL OR env=?1 ORDER BY stage, env",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![env], |r| {
                let (seen, drift): (String, Option<String>) = (r.get(3)?, r.get(4)?);
                let seen = match (seen.as_str(), drift) {
                    ("in-sync", _) => Some(Seen::InSync),
                    ("deployed", _) => Some(Seen::Deployed),
                    ("drifted", Some(d)) => serde_json::from_str(&d).ok(),
                    _ => None,
                };
                let (stage, env, at_ms) = (r.get(0)?, r.get(1)?, r.get(2)?);
                Ok(seen.map(|seen| Probe { stage, env, at_ms, seen }))
            })
            .map_err(|e| self.err(e))?;
        let rows = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.err(e))?;
        Ok(rows.into_iter().flatten().collect())
    }
}

/// A sighting from a cache archive: kept when it is newer than the one known here. One dated after now is
/// left out: an archive's clock must not hide what this machine sees later.
pub(super) fn import(c: &rusqlite::Connection, p: &Probe) -> rusqlite::Result<()> {
    if p.at_ms > now_ms() {
        return Ok(());
    }
    upsert(c, p, true)
}

/// Why an archive's sighting is not one kkpipe writes, if it is not.
pub(super) fn malformed(p: &Probe) -> Option<String> {
    let clean = |s: &str| !s.is_empty() && !s.chars().any(char::is_control);
    if !clean(&p.stage) || !clean(&p.env) || p.at_ms <= 0 {
        return Some("a drift probe has no stage, environment or time".into());
    }
    match &p.seen {
        Seen::Drifted { resources, detail, .. }
            if resources.len() > MAX_RESOURCES
                || detail.chars().count() > MAX_DETAIL
                || detail.chars().any(char::is_control)
                || resources.iter().any(|r| r.address.chars().any(char::is_control)) =>
        {
            Some(format!("stage `{}`: its drift probe's record is larger than kkpipe writes", p.stage))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_keeps_the_resources_counted_and_the_first_line_escaped() {
        let mut text = String::from("\u{1b}[1mRefreshing\u{1b}[0m state\n");
        for n in 0..(MAX_RESOURCES + 5) {
            text.push_str(&format!("  # terraform_data.n[{n}] will be updated in-place\n"));
        }
        let Seen::Drifted { resources, more, detail } = Seen::drifted(&text, crate::tfplan::changes_in_text(&text))
        else {
            panic!()
        };
        assert_eq!((resources.len(), more), (MAX_RESOURCES, 5));
        assert_eq!(resources[0].address, "terraform_data.n[0]", "the first ones are kept");
        assert!(!detail.chars().any(char::is_control) && detail.contains("Refreshing"), "{detail}");
        let long = Seen::drifted(&"x".repeat(5000), Vec::new());
        assert!(matches!(long, Seen::Drifted { detail, .. } if detail.len() == MAX_DETAIL));
    }
}
