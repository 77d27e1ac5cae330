//! Moving a cache between machines: `kkpipe cache export FILE` / `kkpipe cache import FILE`.
//!
//! An archive is a zstd-compressed tar of `kkpipe-cache/archive.json` (the stage runs it carries, with their
//! outputs, as path-independent records), `manifests/<key>` (each run's structured inputs), `blobs/<blake3>`
//! (output contents) and `logs/<n>`. Sensitive outputs and the stored per-repository HMAC key (`secret.key`)
//! travel only with `--include-sensitive`; a key derived from `KKPIPE_SECRET_KEY` is never stored, so never exported.
//!
//! Import treats the archive as untrusted. Everything is read into a temporary directory outside the cache
//! and checked before the first write: entry names (no absolute paths, no `..`, no links or devices), sizes,
//! the schema version, every blob and manifest against its hash, every path in the records. Only then are
//! blobs stored and rows inserted (in one transaction), so a rejected archive leaves the local cache as it was.
//! Local entries are never replaced: an imported run that is already there is skipped.

use super::records::{self, End, NewAttempt};
use super::store::Staged;
use super::{BlobStore, Cache, RunMeta};
use crate::fresh::{Attempt, History, OutputRecord, State, StoredReason};
use crate::hash::key::{Key, Manifest};
use crate::hash::{Entry, Hash};
use crate::pipeline::Stage;
use crate::relpath::RelPath;
use rusqlite::params;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::Path;

pub(crate) const FORMAT: &str = "kkpipe-cache-archive";
/// 2: entries carry every latest attempt (failed and interrupted ones too) with its state and the exporter's
/// sequence, and outputs record directories. 3: outputs carry their permission bits, and the exact bytes of a
/// path or link text that is not UTF-8. 4: entries carry their run's audit fields and may be `adopted`
/// (an older kkpipe refuses the schema by number, saying to upgrade). 5: the document carries each deploy
/// stage's last drift probe. Schemas 1 to 4 are still read.
pub(crate) const SCHEMA: u32 = 5;
const ROOT: &str = "kkpipe-cache";
/// No single entry may be larger than this (a plan or chart bundle is far smaller).
pub(crate) const MAX_ENTRY: u64 = 2 << 30;
/// Nor the archive, decompressed.
pub(crate) const MAX_TOTAL: u64 = 16 << 30;
/// What is read into memory (the document, manifests and logs; blobs go to disk as they are read), together.
/// A larger log is left out of an export.
pub(crate) const MAX_IN_MEMORY: u64 = 512 << 20;
/// One stage log in an archive: a larger one is left out of an export.
pub(crate) const MAX_LOG: u64 = 64 << 20;
/// `archive.json`: parsed, it takes a few times its size in memory. An export leaves out entries beyond it.
pub(crate) const MAX_DOCUMENT: u64 = 64 << 20;
const MAX_ENTRIES: usize = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the archive `{}`: {source}", path.display())]
    Read { path: std::path::PathBuf, source: std::io::Error },
    #[error("cannot write the archive `{}`: {source}", path.display())]
    Write { path: std::path::PathBuf, source: std::io::Error },
    #[error("rejected the archive `{}`: {why}\n  hint: the local cache was not changed; only import archives made by `kkpipe cache export`", path.display())]
    Rejected { path: std::path::PathBuf, why: String },
    #[error(transparent)]
    Cache(#[from] super::Error),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    format: String,
    schema: u32,
    kkpipe_version: String,
    created_at: String,
    include_sensitive: bool,
    entries: Vec<ArchiveEntry>,
    /// The last drift probe of each stage per environment (schema 5).
    #[serde(default)]
    probes: Vec<super::probes::Probe>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ArchiveEntry {
    stage: String,
    env: String,
    key: String,
    started_at: i64,
    duration_ms: Option<i64>,
    exit_code: Option<i64>,
    reason: Option<String>,
    event: Option<String>,
    branch: Option<String>,
    git_commit: Option<String>,
    /// Who ran it, from where (schema 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    audit: Option<crate::fresh::Audit>,
    outputs: Vec<OutputDoc>,
    log: Option<String>,
    /// How the attempt ended; schema 1 carried successes only.
    #[serde(default = "success")]
    state: String,
    /// The exporting cache's sequence of this attempt: the order of the ledger, never a clock.
    #[serde(default)]
    seq: i64,
}

fn success() -> String {
    State::Success.as_str().into()
}

/// An output record in the path-independent form that archives and remote entries carry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OutputDoc {
    path: String,
    /// Hex BLAKE3 for files; absent for symlinks.
    hash: Option<String>,
    exec: bool,
    /// Link text for symlinks.
    target: Option<String>,
    size: u64,
    sensitive: bool,
    /// A directory of the output; `hash` is then its listing (schema 2).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    dir: bool,
    /// Permission bits of a file or directory (schema 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mode: Option<u32>,
    /// The path's exact bytes (base64) when they are not UTF-8; `path` is then only for display (schema 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path_bytes: Option<String>,
    /// Likewise for a link's text (schema 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target_bytes: Option<String>,
}

/// Text as JSON carries it: the string, and the exact bytes (base64) only when they are not UTF-8.
fn text_and_bytes(bytes: &[u8]) -> (String, Option<String>) {
    use base64::Engine;
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_string(), None),
        Err(_) => {
            (String::from_utf8_lossy(bytes).into_owned(), Some(base64::engine::general_purpose::STANDARD.encode(bytes)))
        }
    }
}

/// The exact bytes of a field carried by [`text_and_bytes`].
fn exact_bytes(text: &str, bytes: &Option<String>, what: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    match bytes {
        None => Ok(text.as_bytes().to_vec()),
        Some(b) => {
            base64::engine::general_purpose::STANDARD.decode(b).map_err(|_| format!("{what} of `{text}`: bad base64"))
        }
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct ExportReport {
    pub entries: usize,
    pub blobs: usize,
    pub bytes: u64,
    pub sensitive_left_out: usize,
    /// What could not travel (an import would refuse it), each with why: left out, so that what export writes
    /// import accepts.
    pub left_out: Vec<String>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct ImportReport {
    pub entries: usize,
    pub skipped_existing: usize,
    /// Entries of stages the current pipeline does not have (never restored, so not imported).
    pub skipped_unknown: usize,
    pub blobs: usize,
    /// The archive's `secret.key` was installed (asked for, and no key was stored yet).
    pub secret_key: bool,
    /// The archive carried a `secret.key` that was not asked for, so not installed.
    pub secret_key_left: bool,
}

/// Write `runs` (with their outputs) into a new archive at `file`.
pub(crate) fn export(
    cache: &Cache,
    runs: &[Attempt],
    stages: &[Stage],
    file: &Path,
    include_sensitive: bool,
) -> Result<ExportReport, Error> {
    let werr = |source| Error::Write { path: file.to_path_buf(), source };
    let mut report = ExportReport::default();
    let (entries, contents) = collect(cache, runs, stages, file, include_sensitive, &mut report)?;
    let mut doc = Document {
        format: FORMAT.into(),
        schema: SCHEMA,
        kkpipe_version: env!("CARGO_PKG_VERSION").into(),
        created_at: jiff::Timestamp::now().to_string(),
        include_sensitive,
        entries,
        probes: cache
            .probes(None)?
            .into_iter()
            .filter(|p| stages.iter().any(|s| s.name == p.stage && s.is_deploy()))
            .collect(),
    };
    fit_document(&mut doc, &mut report);
    report.entries = doc.entries.len();
    let tmp = file.with_extension("partial");
    let out = std::fs::File::create(&tmp).map_err(werr)?;
    if let Err(e) = write_tar(cache, out, &doc, &contents, &mut report) {
        let _ = std::fs::remove_file(&tmp);
        return Err(werr(e));
    }
    std::fs::rename(&tmp, file).map_err(werr)?;
    Ok(report)
}

/// Leave out the entries with the most outputs until `archive.json` fits what an import reads
/// ([`MAX_DOCUMENT`]). What they name is still written; an import stores only what an entry names.
fn fit_document(doc: &mut Document, report: &mut ExportReport) {
    // Measured as it is written: the document itself, pretty-printed.
    let size = |d: &Document| serde_json::to_vec_pretty(d).map_or(u64::MAX, |v| v.len() as u64);
    while size(doc) > MAX_DOCUMENT && !doc.entries.is_empty() {
        let (i, _) = doc.entries.iter().enumerate().max_by_key(|(_, e)| e.outputs.len()).expect("not empty");
        let e = doc.entries.remove(i);
        let n = e.outputs.len();
        report.left_out.push(format!("stage `{}` ({n} outputs): more than an archive's document may hold", e.stage));
    }
}

/// What an export writes next to `archive.json`, gathered from the cache before the tar is started.
struct Contents {
    /// The blobs to carry, each with whether any output holding it is sensitive.
    blobs: BTreeMap<Hash, bool>,
    manifests: BTreeSet<Key>,
    /// `logs/<name>` entries, named by their position.
    logs: Vec<(String, Vec<u8>)>,
}

/// The archive records of `runs` and the contents they refer to; counts left-out sensitive outputs in `report`.
fn collect(
    cache: &Cache,
    runs: &[Attempt],
    stages: &[Stage],
    file: &Path,
    include_sensitive: bool,
    report: &mut ExportReport,
) -> Result<(Vec<ArchiveEntry>, Contents), Error> {
    let mut entries = Vec::new();
    let mut contents = Contents { blobs: BTreeMap::new(), manifests: BTreeSet::new(), logs: Vec::new() };
    let meta = cache.run_meta()?;
    for r in runs {
        let outs = cache.outputs_of(r.id)?;
        // The import's own check, made here: a result it would refuse (a link out of its output, a record
        // inside `.git` from an older kkpipe) is left out, not exported to fail the whole import elsewhere.
        if let Some(stage) = stages.iter().find(|s| s.name == r.stage)
            && let Some((path, why)) = crate::fresh::refusal_of(&outs, &stage.outputs)
        {
            report.left_out.push(format!("stage `{}`, output `{path}`: {why}", r.stage));
            continue;
        }
        let mut outputs = Vec::new();
        for o in &outs {
            outputs.push(archive_output(cache, o, file, include_sensitive, report, &mut contents.blobs)?);
        }
        contents.manifests.insert(r.key);
        let log = archive_log(cache, r, &mut contents.logs, report)?;
        let run = meta.get(&r.run_id);
        entries.push(ArchiveEntry {
            stage: r.stage.clone(),
            env: r.env.clone(),
            key: r.key.to_string(),
            started_at: r.started_at,
            duration_ms: r.duration_ms,
            exit_code: r.exit_code,
            reason: r.reason.as_ref().map(StoredReason::to_stored),
            event: run.and_then(|m| m.event.clone()),
            branch: run.and_then(|m| m.branch.clone()),
            git_commit: run.and_then(|m| m.git_commit.clone()),
            audit: run.map(|m| m.audit.clone()).filter(|a| a != &crate::fresh::Audit::default()),
            outputs,
            log,
            // A row still "running" under the export's lock is one whose kkpipe died: interrupted.
            state: match r.state {
                State::Running => State::Interrupted.as_str().into(),
                s => s.as_str().into(),
            },
            seq: r.seq,
        });
    }
    Ok((entries, contents))
}

/// The name under `logs/` of run `r`'s log, added to `logs`. Logs are read into memory by an import, within a
/// bound: at most half of it for logs (each at most [`MAX_LOG`]), the rest for the document and manifests. A log
/// beyond that stays here.
fn archive_log(
    cache: &Cache,
    r: &Attempt,
    logs: &mut Vec<(String, Vec<u8>)>,
    report: &mut ExportReport,
) -> Result<Option<String>, Error> {
    let Some(log) = cache.log(r.id)?.filter(|l| !l.is_empty()) else { return Ok(None) };
    let size: u64 = logs.iter().map(|(_, l)| l.len() as u64).sum();
    if log.len() as u64 > MAX_LOG || size + log.len() as u64 > MAX_IN_MEMORY / 2 {
        let (stage, n) = (&r.stage, log.len());
        report.left_out.push(format!("the log of stage `{stage}` ({n} bytes): more than an archive's logs may hold"));
        return Ok(None);
    }
    let name = logs.len().to_string();
    logs.push((name.clone(), log));
    Ok(Some(name))
}

/// One output's record, noting in `blobs` the content to carry (unless it is sensitive and left out).
fn archive_output(
    cache: &Cache,
    o: &OutputRecord,
    file: &Path,
    include_sensitive: bool,
    report: &mut ExportReport,
    blobs: &mut BTreeMap<Hash, bool>,
) -> Result<OutputDoc, Error> {
    if let Entry::File { hash, .. } = &o.entry {
        if o.sensitive && !include_sensitive {
            report.sensitive_left_out += 1;
        } else if o.size > MAX_ENTRY {
            // More than an import takes in one entry: the output is unavailable on the other side.
            report.left_out.push(format!("output `{}`: {} bytes, more than an archive entry may hold", o.path, o.size));
        } else if cache.blobs.has(hash) {
            blobs.entry(*hash).and_modify(|s| *s |= o.sensitive).or_insert(o.sensitive);
        }
    }
    OutputDoc::of(o).map_err(|why| Error::Rejected { path: file.to_path_buf(), why })
}

/// Write the zstd-compressed tar to `out` and sync it; counts the blobs written in `report`.
fn write_tar(
    cache: &Cache,
    out: std::fs::File,
    doc: &Document,
    contents: &Contents,
    report: &mut ExportReport,
) -> std::io::Result<()> {
    let enc = zstd::Encoder::new(out, 3)?;
    let mut tar = tar::Builder::new(enc);
    tar.mode(tar::HeaderMode::Deterministic);
    let mut add = |name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o600);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        tar.append_data(&mut h, format!("{ROOT}/{name}"), bytes)
    };
    add("archive.json", &serde_json::to_vec_pretty(doc).expect("serialisable"))?;
    for key in &contents.manifests {
        if let Some(Ok(m)) = cache.manifest(key).map_err(std::io::Error::other)? {
            add(&format!("manifests/{key}"), &m.encode())?;
        }
    }
    for hash in contents.blobs.keys() {
        if let Some(bytes) = cache.blobs.read_verified(hash) {
            report.blobs += 1;
            report.bytes += bytes.len() as u64;
            add(&format!("blobs/{hash}"), &bytes)?;
        }
    }
    for (name, bytes) in &contents.logs {
        add(&format!("logs/{name}"), bytes)?;
    }
    // Only the stored per-repository key, and never a new one: a key derived from `KKPIPE_SECRET_KEY` is not
    // the cache's to export.
    if doc.include_sensitive
        && let Some(key) = cache.stored_secret_key()
    {
        add("secret.key", &key)?;
    }
    let enc = tar.into_inner()?;
    let mut f = enc.finish()?;
    f.flush()?;
    f.sync_all()
}

/// The checked content of an archive, before anything is stored. Blobs are staged on disk (verified against
/// their names), everything else is in memory, within [`MAX_IN_MEMORY`].
struct Checked {
    doc: Document,
    manifests: BTreeMap<Key, Vec<u8>>,
    blobs: BTreeMap<Hash, Staged>,
    logs: BTreeMap<String, Vec<u8>>,
    secret_key: Option<[u8; 32]>,
}

/// What the tar entries read so far hold, checked one by one.
#[derive(Default)]
struct Parts {
    doc: Option<Document>,
    manifests: BTreeMap<Key, Vec<u8>>,
    blobs: BTreeMap<Hash, Staged>,
    logs: BTreeMap<String, Vec<u8>>,
    secret_key: Option<[u8; 32]>,
    in_memory: u64,
    /// Once `archive.json` is read: the blobs its entries of this pipeline's stages name. Others are skipped
    /// unread, never staged.
    needed: Option<BTreeSet<Hash>>,
}

/// One regular file of the archive: its name checked, its content read (a blob's staged on disk).
struct TarFile {
    /// The whole entry name, for messages.
    name: String,
    /// The name below `kkpipe-cache/`.
    rest: String,
    content: Content,
}

enum Content {
    Bytes(Vec<u8>),
    Blob(Staged),
}

/// Read and check the whole archive at `file`, staging its blobs in `blobs`' temporary directory and storing
/// nothing.
fn read_checked(file: &Path, blobs: &BlobStore, stages: &[Stage]) -> Result<Checked, Error> {
    let reject = |why: String| Error::Rejected { path: file.to_path_buf(), why };
    let f = std::fs::File::open(file).map_err(|source| Error::Read { path: file.to_path_buf(), source })?;
    let dec = zstd::Decoder::new(f).map_err(|e| reject(format!("not a zstd stream: {e}")))?;
    // Count decompressed bytes: a small archive cannot make us write unbounded data.
    let mut tar = tar::Archive::new(dec.take(MAX_TOTAL + 1));
    let mut parts = Parts::default();
    let mut count = 0usize;
    let entries = tar.entries().map_err(|e| reject(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| reject(format!("damaged tar archive: {e}")))?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(reject(format!("more than {MAX_ENTRIES} entries")));
        }
        if let Some(f) = read_entry(entry, blobs, &parts, &reject)? {
            add_part(&mut parts, f, stages, &reject)?;
        }
    }
    let Parts { doc, manifests, blobs, logs, secret_key, .. } = parts;
    let doc = doc.ok_or_else(|| reject("no archive.json: not a kkpipe cache archive".into()))?;
    check_document(&doc, &manifests, &logs, &reject)?;
    Ok(Checked { doc, manifests, blobs, logs, secret_key })
}

/// Check one tar entry's name, type and size and read it; `None` for a directory, which is skipped.
fn read_entry<R: Read>(
    mut entry: tar::Entry<'_, R>,
    blobs: &BlobStore,
    parts: &Parts,
    reject: &impl Fn(String) -> Error,
) -> Result<Option<TarFile>, Error> {
    let raw = entry.path_bytes().into_owned();
    let name = String::from_utf8(raw).map_err(|_| reject("an entry name is not UTF-8".into()))?;
    if name.starts_with('/') {
        return Err(reject(format!("entry `{name}` has an absolute path")));
    }
    if name.split('/').any(|c| c == "..") {
        return Err(reject(format!("entry `{name}` contains `..`")));
    }
    let kind = entry.header().entry_type();
    if kind.is_dir() {
        return Ok(None);
    }
    if !kind.is_file() {
        let what = if kind.is_symlink() || kind.is_hard_link() { "a link" } else { "not a regular file" };
        return Err(reject(format!("entry `{name}` is {what}; archives hold regular files only")));
    }
    let size = entry.header().size().map_err(|e| reject(format!("entry `{name}`: {e}")))?;
    if size > MAX_ENTRY {
        return Err(reject(format!("entry `{name}` is {size} bytes, more than the {MAX_ENTRY}-byte limit")));
    }
    let Some(rest) = name.strip_prefix(&format!("{ROOT}/")) else {
        return Err(reject(format!("unexpected entry `{name}` outside `{ROOT}/`")));
    };
    let rest = rest.to_string();
    // What an import reads depends on the document, which `kkpipe cache export` writes first.
    let Some(needed) = &parts.needed else {
        return match rest == "archive.json" {
            true if size > MAX_DOCUMENT => {
                Err(reject(format!("`archive.json` is {size} bytes, more than the {MAX_DOCUMENT}-byte limit")))
            }
            true => read_small(entry, name, rest, size, parts.in_memory, reject).map(Some),
            false => Err(reject(format!("entry `{name}` comes before `archive.json`, which an export writes first"))),
        };
    };
    let content = if let Some(hex) = rest.strip_prefix("blobs/") {
        let hash = Hash::from_hex(hex).ok_or_else(|| reject(format!("bad blob name `{name}`")))?;
        if !needed.contains(&hash) {
            // Named by no entry this import could take: read past, never stored (its bytes still count).
            std::io::copy(&mut entry, &mut std::io::sink()).map_err(|e| reject(format!("entry `{name}`: {e}")))?;
            return Ok(None);
        }
        let staged = blobs.stage(&mut entry).map_err(|e| reject(format!("entry `{name}`: {e}")))?;
        if staged.size != size {
            return Err(reject(format!("entry `{name}` is truncated")));
        }
        Content::Blob(staged)
    } else {
        if rest.starts_with("logs/") && size > MAX_LOG {
            return Err(reject(format!("entry `{name}` is {size} bytes, more than a log's {MAX_LOG}-byte limit")));
        }
        return read_small(entry, name, rest, size, parts.in_memory, reject).map(Some);
    };
    Ok(Some(TarFile { name, rest, content }))
}

/// Read an entry that is kept in memory, if it fits in what is left of [`MAX_IN_MEMORY`] (checked before a
/// byte is read).
fn read_small<R: Read>(
    mut entry: tar::Entry<'_, R>,
    name: String,
    rest: String,
    size: u64,
    in_memory: u64,
    reject: &impl Fn(String) -> Error,
) -> Result<TarFile, Error> {
    if in_memory + size > MAX_IN_MEMORY {
        return Err(reject(format!("its records and logs are more than {MAX_IN_MEMORY} bytes (at `{name}`)")));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut bytes).map_err(|e| reject(format!("entry `{name}`: {e}")))?;
    if bytes.len() as u64 != size {
        return Err(reject(format!("entry `{name}` is truncated")));
    }
    Ok(TarFile { name, rest, content: Content::Bytes(bytes) })
}

/// File one read entry under what it is (document, key, manifest, blob, log), checking its content.
fn add_part(parts: &mut Parts, f: TarFile, stages: &[Stage], reject: &impl Fn(String) -> Error) -> Result<(), Error> {
    let TarFile { name, rest, content } = f;
    let bytes = match content {
        Content::Blob(staged) => {
            let hex = rest.strip_prefix("blobs/").expect("staged only for blobs/");
            let hash = Hash::from_hex(hex).ok_or_else(|| reject(format!("bad blob name `{name}`")))?;
            if staged.hash != hash {
                return Err(reject(format!("blob `{hex}` does not match its hash (damaged or tampered with)")));
            }
            parts.blobs.insert(hash, staged);
            return Ok(());
        }
        Content::Bytes(b) => b,
    };
    parts.in_memory += bytes.len() as u64;
    if parts.in_memory > MAX_IN_MEMORY {
        return Err(reject(format!("its records and logs are more than {MAX_IN_MEMORY} bytes")));
    }
    match rest.split_once('/') {
        None if rest == "archive.json" && parts.doc.is_none() => {
            let doc = parse_document(&bytes, reject)?;
            parts.needed = Some(
                doc.entries
                    .iter()
                    .filter(|e| stages.iter().any(|s| s.name == e.stage))
                    .flat_map(|e| e.outputs.iter().filter(|o| !o.dir))
                    .filter_map(|o| o.hash.as_deref().and_then(Hash::from_hex))
                    .collect(),
            );
            parts.doc = Some(doc);
        }
        None if rest == "secret.key" => {
            parts.secret_key =
                Some(<[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| reject("secret.key is not 32 bytes".into()))?);
        }
        Some(("manifests", hex)) => {
            let key = Hash::from_hex(hex).map(Key).ok_or_else(|| reject(format!("bad manifest name `{name}`")))?;
            if Hash::of(&bytes) != key.0 {
                return Err(reject(format!("manifest `{hex}` does not match its hash")));
            }
            Manifest::decode(&bytes).map_err(|e| reject(format!("manifest `{hex}` cannot be decoded ({e:?})")))?;
            parts.manifests.insert(key, bytes);
        }
        Some(("logs", n)) if !n.is_empty() && !n.contains('/') => {
            parts.logs.insert(n.to_string(), bytes);
        }
        _ => return Err(reject(format!("unexpected entry `{name}`"))),
    }
    Ok(())
}

/// `archive.json`, parsed, of the format and schema this kkpipe reads.
fn parse_document(bytes: &[u8], reject: &impl Fn(String) -> Error) -> Result<Document, Error> {
    let d: Document = serde_json::from_slice(bytes).map_err(|e| reject(format!("archive.json: {e}")))?;
    if d.format != FORMAT {
        return Err(reject(format!("format `{}` is not `{FORMAT}`", d.format)));
    }
    if !(1..=SCHEMA).contains(&d.schema) {
        return Err(reject(format!(
            "archive schema {} is not supported (this kkpipe reads schema {SCHEMA}); upgrade kkpipe",
            d.schema
        )));
    }
    Ok(d)
}

/// Check that every record of the document is well-formed and that the manifest and log it names came along.
fn check_document(
    doc: &Document,
    manifests: &BTreeMap<Key, Vec<u8>>,
    logs: &BTreeMap<String, Vec<u8>>,
    reject: &impl Fn(String) -> Error,
) -> Result<(), Error> {
    for e in &doc.entries {
        let key = Hash::from_hex(&e.key).map(Key).ok_or_else(|| reject(format!("stage `{}`: bad key", e.stage)))?;
        if !manifests.contains_key(&key) {
            return Err(reject(format!("stage `{}`: its manifest is missing", e.stage)));
        }
        if e.stage.is_empty() || e.env.is_empty() {
            return Err(reject("an entry has no stage or environment".into()));
        }
        if State::parse(&e.state).is_none_or(|s| s == State::Running) {
            return Err(reject(format!("stage `{}`: `{}` is not a finished attempt's state", e.stage, e.state)));
        }
        for o in &e.outputs {
            check_output(e, o, reject)?;
        }
        if let Some(l) = &e.log
            && !logs.contains_key(l)
        {
            return Err(reject(format!("stage `{}`: its log is missing", e.stage)));
        }
    }
    if doc.schema < 5 && !doc.probes.is_empty() {
        return Err(reject(format!("drift probes in a schema {} archive (they came with schema 5)", doc.schema)));
    }
    if let Some(why) = doc.probes.iter().find_map(super::probes::malformed) {
        return Err(reject(why));
    }
    Ok(())
}

/// Check one output record of entry `e`: a clean relative path, and either a file's hash or a link's target.
fn check_output(e: &ArchiveEntry, o: &OutputDoc, reject: &impl Fn(String) -> Error) -> Result<(), Error> {
    o.checked().map(|_| ()).map_err(|why| reject(format!("stage `{}`: {why}", e.stage)))
}

/// The same attempt, imported before (or exported from here).
fn already_here(conn: &rusqlite::Connection, e: &ArchiveEntry, key: &Key) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT EXISTS(SELECT 1 FROM stage_runs WHERE stage=?1 AND env=?2 AND key=?3 AND state=?4 AND started_at=?5)",
    )?
    .query_row(params![e.stage, e.env, &key.0.0[..], e.state, e.started_at], |r| r.get(0))
}

/// One archive entry as a finished run with one stage run, through the cache's one write API.
fn insert_entry(conn: &rusqlite::Connection, e: &ArchiveEntry, key: Key, c: &Checked) -> rusqlite::Result<()> {
    let meta = RunMeta {
        command: "import".into(),
        event: e.event.clone(),
        branch: e.branch.clone(),
        env: e.env.clone(),
        git_commit: e.git_commit.clone(),
        audit: e.audit.clone().unwrap_or_default(),
    };
    let outputs: Vec<OutputRecord> = e.outputs.iter().map(OutputDoc::record).collect();
    let log = e.log.as_ref().map(|l| &c.logs[l][..]).unwrap_or_default();
    let attempt = NewAttempt {
        run_id: 0,
        stage: &e.stage,
        env: &e.env,
        key,
        manifest: Some(&c.manifests[&key]),
        state: State::parse(&e.state).expect("checked"),
        reason: e.reason.as_deref(),
        started_at: e.started_at,
        end: Some(End { duration_ms: e.duration_ms.unwrap_or(0), exit_code: e.exit_code, log, outputs: &outputs }),
    };
    records::insert_imported(conn, &meta, attempt)?;
    Ok(())
}

impl OutputDoc {
    pub(crate) fn of(o: &OutputRecord) -> Result<OutputDoc, String> {
        let (hash, target) = match &o.entry {
            Entry::File { hash, .. } => (Some(hash.to_hex()), None),
            Entry::Symlink { target } => (None, Some(text_and_bytes(target))),
            Entry::Dir { listing } => (Some(listing.to_hex()), None),
        };
        let (path, path_bytes) = text_and_bytes(o.path.as_bytes());
        let (target, target_bytes) = target.unzip();
        Ok(OutputDoc {
            path,
            hash,
            exec: matches!(o.entry, Entry::File { exec: true, .. }),
            target,
            size: o.size,
            sensitive: o.sensitive,
            dir: matches!(o.entry, Entry::Dir { .. }),
            mode: o.mode,
            path_bytes,
            target_bytes: target_bytes.flatten(),
        })
    }

    /// The record this stands for, if it is well-formed: a clean relative path, and either a hash (a file's
    /// content or a directory's listing) or a link's target. A file's blob may be absent on the other side
    /// (left out as sensitive, or collected before the export): the output is then unavailable there and
    /// its stage reruns when it is needed.
    pub(crate) fn checked(&self) -> Result<OutputRecord, String> {
        let exact = exact_bytes(&self.path, &self.path_bytes, "output path")?;
        let path = RelPath::from_bytes(&exact)
            .ok()
            .filter(|p| !p.is_root() && p.as_bytes() == exact.as_slice())
            .ok_or_else(|| format!("output path `{}` is not a clean relative path", self.path))?;
        let entry = match (&self.hash, &self.target) {
            (Some(h), None) => {
                let hash = Hash::from_hex(h).ok_or_else(|| format!("output `{}`: bad hash", self.path))?;
                match self.dir {
                    true => Entry::Dir { listing: hash },
                    false => Entry::File { hash, exec: self.exec },
                }
            }
            (None, Some(t)) => Entry::Symlink { target: exact_bytes(t, &self.target_bytes, "link text")? },
            _ => return Err(format!("output `{}`: neither a file nor a link", self.path)),
        };
        let mode = self.mode.map(|m| m & 0o777);
        Ok(OutputRecord { path, entry, size: self.size, sensitive: self.sensitive, mode })
    }

    /// The record of a document that [`OutputDoc::checked`] accepted.
    fn record(&self) -> OutputRecord {
        self.checked().expect("checked")
    }

    /// The blob a file's content is stored as, unless it is sensitive (never shared).
    pub(crate) fn shared_blob(&self) -> Option<Hash> {
        (!self.sensitive && !self.dir && self.target.is_none())
            .then(|| self.hash.as_deref().and_then(Hash::from_hex))
            .flatten()
    }
}

/// Check every record against the stages of the pipeline it is imported into: a record may only name a
/// path its stage declares as an output now (see [`OutputRecord::refusal`]). Entries of stages the
/// pipeline does not have are left out. Returns which entries to import.
fn confine(c: &Checked, stages: &[Stage], file: &Path) -> Result<Vec<bool>, Error> {
    let mut wanted = Vec::with_capacity(c.doc.entries.len());
    for e in &c.doc.entries {
        let Some(stage) = stages.iter().find(|s| s.name == e.stage) else {
            wanted.push(false);
            continue;
        };
        let records: Vec<_> = e.outputs.iter().map(|o| o.record()).collect();
        if let Some((path, why)) = crate::fresh::refusal_of(&records, &stage.outputs) {
            return Err(Error::Rejected {
                path: file.to_path_buf(),
                why: format!("stage `{}`, output record `{path}`: {why}", e.stage),
            });
        }
        wanted.push(true);
    }
    Ok(wanted)
}

/// Merge an archive into the local cache of a repository whose pipeline has `stages`. The caller holds the
/// run lock.
///
/// Imported attempts are placed after every attempt this cache holds, in the archive's own order (its
/// sequence): importing is learning what happened elsewhere since. Later local attempts come after them.
pub fn import(cache: &Cache, file: &Path, stages: &[Stage], with_secret_key: bool) -> Result<ImportReport, Error> {
    let mut c = read_checked(file, &cache.blobs, stages)?;
    let wanted = confine(&c, stages, file)?;
    let mut report = ImportReport::default();
    // Blobs first (a rename each), then the rows that point at them, in one transaction. Only the blobs an
    // imported entry names are stored; the rest of what was staged is removed.
    let mut needed: BTreeMap<Hash, bool> = BTreeMap::new();
    for (e, _) in c.doc.entries.iter().zip(&wanted).filter(|(_, w)| **w) {
        for o in e.outputs.iter().filter(|o| !o.dir) {
            if let Some(h) = o.hash.as_deref().and_then(Hash::from_hex) {
                *needed.entry(h).or_default() |= o.sensitive;
            }
        }
    }
    for (hash, staged) in std::mem::take(&mut c.blobs) {
        let Some(&sensitive) = needed.get(&hash) else { continue };
        cache
            .blobs
            .commit_staged(staged, sensitive)
            .map_err(|e| super::Error::Write { path: cache.dir().join("blobs"), source: e.into() })?;
        report.blobs += 1;
    }
    // Whoever wrote the archive chose its key, and with it could test guesses of `secret_env` values against
    // what this cache exports later: installed only when the user says the archive is theirs.
    match (c.secret_key, with_secret_key) {
        (Some(key), true) => report.secret_key = cache.install_secret_key(&key)? == key,
        (Some(_), false) => report.secret_key_left = true,
        (None, _) => {}
    }
    let (imported, skipped) = cache.write_tx(|conn| {
        let mut imported = 0;
        let mut skipped = 0;
        let mut order: Vec<&ArchiveEntry> =
            c.doc.entries.iter().zip(&wanted).filter(|(_, w)| **w).map(|(e, _)| e).collect();
        order.sort_by_key(|e| e.seq);
        for e in order {
            let key = Key(Hash::from_hex(&e.key).expect("checked"));
            if already_here(conn, e, &key)? {
                skipped += 1;
                continue;
            }
            insert_entry(conn, e, key, &c)?;
            imported += 1;
        }
        // Only of deploy stages this pipeline has; see `probes::import` for which one wins.
        for p in c.doc.probes.iter().filter(|p| stages.iter().any(|s| s.name == p.stage && s.is_deploy())) {
            super::probes::import(conn, p)?;
        }
        Ok((imported, skipped))
    })?;
    report.entries = imported;
    report.skipped_unknown = wanted.iter().filter(|w| !**w).count();
    report.skipped_existing = skipped;
    Ok(report)
}
