//! `kkpipe remote status` and `kkpipe cache gc --remote`: what the store holds, and its retention.

use super::Remote;
use super::protocol::{self, EntryBody, LedgerBody};
use crate::cache::now_ms;
use crate::store;
use std::collections::BTreeSet;

pub(crate) use crate::report::remote::{LedgerRow, Status};

pub(crate) fn status(r: &Remote) -> Status {
    let mut s = Status {
        url: r.url.clone(),
        mode: r.mode.as_str(),
        why: r.why.to_string(),
        error: None,
        entries: 0,
        blobs: 0,
        blob_bytes: 0,
        ledger: Vec::new(),
        leases: Vec::new(),
        only_here: Vec::new(),
    };
    if let Err(e) = fill(r, &mut s) {
        s.error = Some(e.to_string());
    }
    s
}

fn fill(r: &Remote, s: &mut Status) -> store::Result<()> {
    let st = r.store();
    s.entries = st.list("entries")?.len();
    let blobs = st.list("blobs")?;
    s.blobs = blobs.len();
    s.blob_bytes = blobs.iter().map(|b| b.size).sum();
    for l in st.list("ledger")? {
        let Some((bytes, _)) = st.get(&l.name)? else { continue };
        let trusted = protocol::open::<LedgerBody>(&bytes, &r.trusted).is_ok();
        if let Some(b) = protocol::peek::<LedgerBody>(&bytes) {
            s.ledger.push(row(b, trusted));
        }
    }
    for l in st.list("leases")? {
        let Some((bytes, _)) = st.get(&l.name)? else { continue };
        if let Ok(lease) = serde_json::from_slice::<protocol::Lease>(&bytes)
            && !lease.released
            && lease.expires_ms > now_ms()
        {
            s.leases.push(format!("{} by {}", l.name.trim_start_matches("leases/"), lease.who));
        }
    }
    Ok(())
}

/// Every ledger record of `stage` the remote keeps for good (its history), in `env` or every environment,
/// newest first, at most `limit`.
pub(crate) fn ledger_history(
    r: &Remote,
    stage: &str,
    env: Option<&str>,
    limit: usize,
) -> store::Result<Vec<LedgerRow>> {
    let st = r.store();
    let under = env.map_or("history".to_string(), |e| format!("history/{e}"));
    let mut names: Vec<String> =
        st.list(&under)?.into_iter().map(|l| l.name).filter(|n| n.split('/').nth(2) == Some(stage)).collect();
    // Zero-padded sequence numbers: the name's order is the ledger's, per environment.
    names.sort_by(|a, b| b.rsplit('/').next().cmp(&a.rsplit('/').next()));
    let mut rows = Vec::new();
    for name in names.into_iter().take(limit) {
        let Some((bytes, _)) = st.get(&name)? else { continue };
        let trusted = protocol::open::<LedgerBody>(&bytes, &r.trusted).is_ok();
        if let Some(b) = protocol::peek::<LedgerBody>(&bytes).filter(|b| b.stage == stage) {
            rows.push(row(b, trusted));
        }
    }
    Ok(rows)
}

fn row(b: LedgerBody, trusted: bool) -> LedgerRow {
    LedgerRow {
        at: crate::clock::timestamp(b.at_ms),
        commit: b.commit,
        env: b.env,
        stage: b.stage,
        seq: b.seq,
        state: b.state,
        key: b.key,
        who: b.who,
        trusted,
    }
}

/// What `cache gc --remote` removed.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct Collected {
    pub entries: usize,
    pub blobs: usize,
    pub bytes: u64,
}

/// Remove check stages' entries older than `max_age_days`, then blobs that no remaining entry or deploy ledger
/// record names and that are older than `grace_hours` (a concurrent writer uploads blobs before the entry that
/// names them, and checks after writing it that they are still there).
pub(crate) fn gc(r: &Remote, max_age_days: u64, grace_hours: u64) -> store::Result<Collected> {
    let st = r.store();
    let now = now_ms();
    // Blobs a deploy ledger record names: its manifest and, for a success, its outputs (what is deployed).
    let mut named: BTreeSet<String> = BTreeSet::new();
    for l in st.list("ledger")? {
        if let Some((bytes, _)) = st.get(&l.name)?
            && let Some(b) = protocol::peek::<LedgerBody>(&bytes)
        {
            named.insert(protocol::blob(&b.key));
            named.extend(b.outputs.iter().filter_map(|o| o.shared_blob()).map(|h| protocol::blob(&h.to_hex())));
        }
    }
    let mut out = Collected::default();
    let max_age = max_age_days as i64 * 86_400_000;
    for e in st.list("entries")? {
        if now - e.modified_ms > max_age {
            st.delete(&e.name)?;
            out.entries += 1;
            continue;
        }
        if let Some((bytes, _)) = st.get(&e.name)?
            && let Some(b) = protocol::peek::<EntryBody>(&bytes)
        {
            named.insert(protocol::blob(&b.key));
            named.extend(b.outputs.iter().filter_map(|o| o.shared_blob()).map(|h| protocol::blob(&h.to_hex())));
        }
    }
    let grace = grace_hours as i64 * 3_600_000;
    for b in st.list("blobs")? {
        if !named.contains(&b.name) && now - b.modified_ms >= grace {
            st.delete(&b.name)?;
            out.blobs += 1;
            out.bytes += b.size;
        }
    }
    Ok(out)
}
