//! `kkpipe remote keygen|status`, as text or JSON.

use std::fmt::Write;

/// What `kkpipe remote status` shows.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Status {
    pub url: String,
    pub mode: &'static str,
    pub why: String,
    /// `None` when the store answered; else what went wrong.
    pub error: Option<String>,
    pub entries: usize,
    pub blobs: usize,
    pub blob_bytes: u64,
    pub ledger: Vec<LedgerRow>,
    /// Deploy leases held now (not released, not expired).
    pub leases: Vec<String>,
    /// Deploy stages (in the environment asked for) whose latest record is in this cache only: the ledger has
    /// none, or an older one. The next run of a writer publishes a success the ledger has none of.
    pub only_here: Vec<String>,
}

#[derive(Debug, serde::Serialize)]
pub(crate) struct LedgerRow {
    pub env: String,
    pub stage: String,
    pub seq: u64,
    pub state: crate::fresh::State,
    pub key: String,
    pub who: String,
    /// When its writer made it (RFC 3339, the writer's clock).
    pub at: String,
    pub commit: Option<String>,
    /// `false`: not signed by a trusted key (ignored by every runner).
    pub trusted: bool,
}

/// `kkpipe history --stage X`: the remote ledger's records of the stage, after this cache's.
pub(crate) fn ledger_table(url: &str, rows: &[LedgerRow]) -> String {
    let mut t = format!(
        "
the ledger on the remote `{url}`:
"
    );
    let _ = writeln!(
        t,
        "{:>5}  {:<20}  {:<11}  {:<12}  {:<16}  {:<24}  {:<8}",
        "seq", "when", "state", "key", "commit", "by", "env"
    );
    for r in rows {
        let trust = if r.trusted { "" } else { "  (untrusted signer: ignored)" };
        let _ = writeln!(
            t,
            "{:>5}  {:<20}  {:<11}  {:<12}  {:<16}  {:<24}  {:<8}{trust}",
            r.seq,
            r.at,
            r.state.as_str(),
            r.key.get(..12).unwrap_or(&r.key),
            r.commit.as_deref().map(|c| super::short_commit(c, 10)).unwrap_or_else(|| "-".into()),
            r.who,
            r.env
        );
    }
    if rows.is_empty() {
        t.push_str("  (no record)\n");
    }
    t
}

pub(crate) fn keygen(private: &str, public: &str, json: bool) -> String {
    if json {
        return format!("{}\n", serde_json::json!({ "private": private, "public": public }));
    }
    format!(
        "private: {private}\npublic:  {public}\n\nStore the private key as the CI secret KKPIPE_SIGNING_KEY of trusted jobs only (never \
         pull requests), and add the public key to `[remote] trusted_keys` in pipeline.toml.\n"
    )
}

pub(crate) fn off(why: &str, json: bool) -> String {
    if json {
        return format!("{}\n", serde_json::json!({ "url": null, "mode": "off", "why": why }));
    }
    format!("remote: off ({why})\n")
}

pub(crate) fn status(s: &Status, json: bool) -> String {
    if json {
        return format!("{}\n", serde_json::to_string_pretty(s).expect("serializable"));
    }
    let mut t = String::new();
    let _ = writeln!(t, "remote:  {}", s.url);
    let _ = writeln!(t, "mode:    {} ({})", s.mode, s.why);
    match &s.error {
        Some(e) => {
            let _ = writeln!(t, "store:   does not answer: {e}");
            return t;
        }
        None => {
            let _ = writeln!(t, "store:   answers");
        }
    }
    let _ = writeln!(t, "holds:   {} entries, {} blobs ({:.1} MB)", s.entries, s.blobs, s.blob_bytes as f64 / 1e6);
    for l in &s.ledger {
        let trust = if l.trusted { "" } else { "  (untrusted signer: ignored)" };
        let _ = writeln!(
            t,
            "ledger:  {} in {}: {} #{} by {}, key {}{trust}",
            l.stage,
            l.env,
            l.state.as_str(),
            l.seq,
            l.who,
            l.key
        );
    }
    let here = s.ledger.len();
    let _ = writeln!(
        t,
        "records: {here} ledger record{} on the remote, {} deploy stage{} with a newer record in this cache only{}",
        if here == 1 { "" } else { "s" },
        s.only_here.len(),
        if s.only_here.len() == 1 { "" } else { "s" },
        match s.only_here.is_empty() {
            true => String::new(),
            false => format!(": {} (a writer's next run publishes them)", s.only_here.join(", ")),
        }
    );
    for l in &s.leases {
        let _ = writeln!(t, "lease:   {l}");
    }
    t
}
