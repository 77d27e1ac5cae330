//! The last drift probe of each deploy stage, per environment: what the live system looked like when kkpipe
//! last asked (a scheduled `kkpipe verify`, or a push's probe). `kkpipe preview` shows a reviewer the drift
//! still open; cache archives carry it, so a CI job that restores the cache sees it.

use super::{Cache, Result, now_ms};
use rusqlite::params;
use serde::{Deserialize, Serialize};

/// A probe's masked output is kept up to this many bytes (a plan's changes are at its end: the tail is kept).
pub const MAX_OUTPUT: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub stage: String,
    pub env: String,
    /// When it ended, in milliseconds since the epoch.
    pub at_ms: i64,
    /// What it printed when it found drift (masked); `None`: the live system was in sync.
    pub drift: Option<String>,
}

impl Probe {
    /// A probe that just ended here.
    pub fn now(stage: &str, env: &str, drift: Option<&str>) -> Probe {
        Probe { stage: stage.into(), env: env.into(), at_ms: now_ms(), drift: drift.map(tail) }
    }
}

/// The last [`MAX_OUTPUT`] bytes of `text`, cut at a line.
fn tail(text: &str) -> String {
    if text.len() <= MAX_OUTPUT {
        return text.to_string();
    }
    let mut from = text.len() - MAX_OUTPUT;
    while !text.is_char_boundary(from) {
        from += 1;
    }
    let cut = &text[from..];
    cut.find('\n').map_or(cut, |n| &cut[n + 1..]).to_string()
}

impl Cache {
    /// Keep `p`, a probe that just ended here, as its stage's last probe in its environment.
    pub fn record_probe(&self, p: &Probe) -> Result<()> {
        self.write(|c| {
            c.prepare_cached("INSERT OR REPLACE INTO probes(stage, env, at_ms, drift) VALUES (?1,?2,?3,?4)")?
                .execute(params![p.stage, p.env, p.at_ms, p.drift])
                .map(drop)
        })
    }

    /// The last probe of every stage (in `env`, or every environment), by stage name.
    pub fn probes(&self, env: Option<&str>) -> Result<Vec<Probe>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT stage, env, at_ms, drift FROM probes WHERE ?1 IS NULL OR env=?1 ORDER BY stage, env",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![env], |r| {
                Ok(Probe { stage: r.get(0)?, env: r.get(1)?, at_ms: r.get(2)?, drift: r.get(3)? })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.err(e))
    }

    /// When the latest deploy of `stage` in `env` that succeeded (or was adopted) started, in milliseconds: drift
    /// probed before it is repaired.
    pub fn last_deployed_ms(&self, stage: &str, env: &str) -> Result<Option<i64>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT MAX(started_at) FROM stage_runs WHERE stage=?1 AND env=?2 AND state IN ('success', 'adopted')",
            )
            .map_err(|e| self.err(e))?;
        stmt.query_row(params![stage, env], |r| r.get(0)).map_err(|e| self.err(e))
    }
}

/// A probe from a cache archive: kept unless the one known here is as new or newer.
pub(super) fn import(c: &rusqlite::Connection, p: &Probe) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO probes(stage, env, at_ms, drift) VALUES (?1,?2,?3,?4) ON CONFLICT(stage, env) DO UPDATE SET at_ms = excluded.at_ms, drift = excluded.drift WHERE excluded.at_ms > probes.at_ms",
    )?
    .execute(params![p.stage, p.env, p.at_ms, p.drift])
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_output_keeps_its_end_from_a_line() {
        let long = format!("{}\n  # terraform_data.a will be updated in-place\n", "x".repeat(MAX_OUTPUT + 10));
        let kept = tail(&long);
        assert_eq!(kept, "  # terraform_data.a will be updated in-place\n");
        assert_eq!(tail("short\n"), "short\n");
        let wide = "é".repeat(MAX_OUTPUT);
        assert!(tail(&wide).len() <= MAX_OUTPUT);
    }
}
