//! Declared outputs: stored in the blob store after a successful run, checked and restored on a hit.

use super::place;
use crate::cache::BlobStore;
use crate::fresh::{OutputRecord, Present, Workspace};
use crate::hash::Entry;
use crate::hash::files::FileHasher;
use crate::hash::walk::{Kind, Stat, Walked};
use crate::pipeline::Output;
use crate::relpath::RelPath;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error(
        "declared output `{0}` was not created by the stage\n  hint: fix the command, or remove the path from `outputs`"
    )]
    Missing(RelPath),
    #[error("cannot store output `{path}`: {source}")]
    Store { path: String, source: std::io::Error },
}

/// Store every declared output of a finished stage (files, directory trees, symlinks) and describe them;
/// directories are recorded too (with their entry names), so a restore can put back exactly this tree.
/// Blobs land before the caller commits the row that points at them.
pub(crate) fn collect(root: &Path, declared: &[Output], blobs: &BlobStore) -> Result<Vec<OutputRecord>, Error> {
    let mut out = Vec::new();
    for o in declared {
        let abs = o.path.under(root);
        let meta = fs::symlink_metadata(&abs).map_err(|_| Error::Missing(o.path.clone()))?;
        if !meta.is_dir() {
            out.extend(store_one(&o.path, &abs, &meta, o.sensitive, blobs)?);
            continue;
        }
        let mut dirs: Vec<(RelPath, Option<u32>)> = Vec::new();
        let mut inside = Vec::new();
        // A repository nested in an output (a gh-pages worktree) is not the stage's output: never collected.
        let ours = |e: &walkdir::DirEntry| !crate::relpath::RESERVED.contains(&e.file_name().as_bytes());
        for e in walkdir::WalkDir::new(&abs).follow_links(false).sort_by_file_name().into_iter().filter_entry(ours) {
            let e = e.map_err(|e| Error::Store { path: o.path.display(), source: e.into() })?;
            let rel = RelPath::from_path_under(root, e.path()).expect("below the root");
            let m = e.path().symlink_metadata().map_err(|e| Error::Store { path: rel.display(), source: e })?;
            if e.file_type().is_dir() {
                let mut mode = Some(m.permissions().mode() & PERMISSIONS);
                if o.sensitive {
                    // A secret's directory is its owner's alone, in the workspace as in the store; one that cannot
                    // be made so (another user's mount point) keeps no mode, rather than one never matched.
                    mode = fs::set_permissions(e.path(), fs::Permissions::from_mode(0o700)).ok().map(|()| 0o700);
                }
                dirs.push((rel, mode));
                continue;
            }
            inside.extend(store_one(&rel, e.path(), &m, o.sensitive, blobs)?);
        }
        // Each directory's entries: the files and links recorded below it and its subdirectories.
        let children = children(inside.iter().map(|r| &r.path).chain(dirs.iter().skip(1).map(|(d, _)| d)));
        let recorded: Vec<OutputRecord> = dirs
            .iter()
            .map(|(d, mode)| OutputRecord {
                path: d.clone(),
                entry: Entry::Dir { listing: Entry::listing(children.get(d).into_iter().flatten().copied()) },
                size: 0,
                sensitive: o.sensitive,
                mode: *mode,
            })
            .collect();
        out.extend(recorded);
        out.extend(inside);
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}
/// The names found directly in each directory that holds one of `paths`.
fn children<'a>(paths: impl Iterator<Item = &'a RelPath>) -> HashMap<RelPath, Vec<&'a [u8]>> {
    let mut out: HashMap<RelPath, Vec<&[u8]>> = HashMap::new();
    for p in paths {
        let (parent, name) = p.split_last();
        out.entry(parent).or_default().push(name);
    }
    out
}

/// The permission bits kept with a file or directory: no setuid, setgid or sticky bit ever comes back.
const PERMISSIONS: u32 = 0o777;

/// The permission bits on disk as a restore compares them: a directory counts as its owner's in any case (a
/// restore cannot make it otherwise); a secret's group and other bits do count (they must go).
fn on_disk(meta: &fs::Metadata) -> u32 {
    let mode = meta.permissions().mode() & PERMISSIONS;
    if meta.is_dir() { mode | 0o700 } else { mode }
}

/// The mode a restored file or directory gets: as recorded, a secret's only ever its owner's, and a directory
/// always its owner's to manage (kkpipe writes and prunes in it). `check` compares with the same.
fn restored_mode(rec: &OutputRecord) -> Option<u32> {
    let mode = match (&rec.entry, rec.mode) {
        (Entry::Symlink { .. }, _) => return None,
        (Entry::File { exec, .. }, None) => file_mode(rec.sensitive, *exec),
        (Entry::Dir { .. }, None) => return None,
        (Entry::File { .. }, Some(m)) => m & PERMISSIONS,
        (Entry::Dir { .. }, Some(m)) => m & PERMISSIONS | 0o700,
    };
    Some(if rec.sensitive { mode & 0o700 } else { mode })
}

/// The mode a stored output file gets when none is recorded: a secret's copy is as private as the stored one.
fn file_mode(sensitive: bool, exec: bool) -> u32 {
    match (sensitive, exec) {
        (true, true) => 0o700,
        (true, false) => 0o600,
        (false, true) => 0o755,
        (false, false) => 0o644,
    }
}

fn store_one(
    rel: &RelPath,
    abs: &Path,
    meta: &fs::Metadata,
    sensitive: bool,
    blobs: &BlobStore,
) -> Result<Option<OutputRecord>, Error> {
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(abs).map_err(|e| Error::Store { path: rel.display(), source: e })?;
        return Ok(Some(OutputRecord {
            path: rel.clone(),
            entry: Entry::Symlink { target: target.as_os_str().as_bytes().to_vec() },
            size: 0,
            sensitive,
            mode: None,
        }));
    }
    if !ft.is_file() {
        return Ok(None);
    }
    let (hash, size) = blobs.put(abs, sensitive).map_err(|e| Error::Store { path: rel.display(), source: e })?;
    let exec = Stat::of(meta).exec();
    let mut mode = Some(meta.permissions().mode() & PERMISSIONS);
    if sensitive {
        // The workspace copy of a secret is as private as the stored one (if it cannot be made so, no mode is
        // kept: a restore makes it private, and nothing compares a mode that could never match).
        let private = file_mode(true, exec);
        mode = fs::set_permissions(abs, fs::Permissions::from_mode(private)).ok().map(|()| private);
    }
    Ok(Some(OutputRecord { path: rel.clone(), entry: Entry::File { hash, exec }, size, sensitive, mode }))
}

/// The workspace and the blob store of one checkout, for the decision.
pub(crate) struct Disk<'a> {
    pub root: &'a Path,
    pub hasher: &'a FileHasher,
    pub blobs: &'a BlobStore,
}

impl Workspace for Disk<'_> {
    fn present(&self, output: &OutputRecord) -> Present {
        check(self.root, output, self.hasher)
    }

    fn stored(&self, output: &OutputRecord) -> bool {
        restorable(output, self.blobs)
    }
}

/// Give a regenerated output its recorded mode before it is compared with the record: what is regenerated is
/// the content (a command's umask, or a secret made private when collected, is no difference).
pub(crate) fn set_recorded_mode(root: &Path, rec: &OutputRecord) {
    let abs = rec.path.under(root);
    if let Some(mode) = restored_mode(rec)
        && fs::symlink_metadata(&abs).is_ok_and(|m| !m.file_type().is_symlink())
    {
        let _ = fs::set_permissions(abs, fs::Permissions::from_mode(mode));
    }
}

pub(crate) fn check(root: &Path, rec: &OutputRecord, hasher: &FileHasher) -> Present {
    let abs = rec.path.under(root);
    let meta = match fs::symlink_metadata(&abs) {
        Ok(m) => m,
        Err(_) => return Present::Missing,
    };
    // Permissions are part of the output (a 0600 key in a 0700 directory), when they were recorded: compared as
    // a restore would set them, so what a restore cannot make (a directory without its owner's rwx) is no
    // difference to put right on every run.
    if rec.mode.is_some() && !meta.file_type().is_symlink() && restored_mode(rec) != Some(on_disk(&meta)) {
        return Present::Differs;
    }
    let kind = if meta.file_type().is_symlink() {
        Kind::Symlink
    } else if meta.is_file() {
        Kind::File
    } else if meta.is_dir() {
        // The same entry names as recorded: a file dropped into an output directory is a difference.
        let Ok(rd) = fs::read_dir(&abs) else { return Present::Differs };
        let names: Vec<std::ffi::OsString> = rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
        let ours = names.iter().map(|n| n.as_bytes()).filter(|n| !crate::relpath::RESERVED.contains(n));
        let listing = Entry::listing(ours);
        return if rec.entry == (Entry::Dir { listing }) { Present::Same } else { Present::Differs };
    } else {
        return Present::Differs;
    };
    let walked = Walked { path: rec.path.clone(), kind, stat: Stat::of(&meta) };
    match hasher.digest(&walked) {
        Ok(e) if e == rec.entry => Present::Same,
        Ok(_) => Present::Differs,
        Err(_) => Present::Missing,
    }
}

/// Why a restore stopped (the stage then runs instead).
#[derive(Debug)]
pub(crate) enum NotRestored {
    /// The blob is not in the store (or did not verify).
    Unavailable(RelPath),
    /// The record may not be written here, or writing it failed.
    Refused { path: RelPath, why: String },
}

/// Put `write` (records of one hit, missing or different in the workspace) back from the store, exactly:
/// a recorded directory ends up with exactly the entries `all` (the hit's records) lists. Only paths
/// inside the stage's current `declared` outputs are written, and never through a symlink (see `place`).
pub(crate) fn restore(
    root: &Path,
    declared: &[Output],
    write: &[OutputRecord],
    all: &[OutputRecord],
    blobs: &BlobStore,
) -> Result<(), NotRestored> {
    let refused = |path: &RelPath, why: String| NotRestored::Refused { path: path.clone(), why };
    let top = place::Root::open(root, blobs.tmp_dir()).map_err(|e| refused(&RelPath::root(), e.to_string()))?;
    if let Some((path, why)) = crate::fresh::refusal_of(all, declared) {
        return Err(refused(path, why));
    }
    let children = children(all.iter().map(|r| &r.path));
    let links = crate::fresh::Links::of(all);
    for rec in write {
        let output = rec.confined_to(declared, &links).map_err(|why| refused(&rec.path, why))?;
        // Directories above the declared output must be real ones; from the output down, all is ours.
        let keep = output.path.names().len().saturating_sub(1);
        let io = |e: std::io::Error| refused(&rec.path, e.to_string());
        let (parent, name) = rec.path.split_last();
        match &rec.entry {
            Entry::Dir { .. } => {
                let dir = top.dir(&rec.path, keep).map_err(io)?;
                let names: HashSet<&[u8]> = children.get(&rec.path).into_iter().flatten().copied().collect();
                place::prune(&dir, &names).map_err(io)?;
                if let Some(mode) = restored_mode(rec) {
                    place::set_mode(&dir, mode).map_err(io)?;
                }
            }
            Entry::Symlink { target } => {
                top.write_link(&top.dir(&parent, keep).map_err(io)?, name, target).map_err(io)?
            }
            Entry::File { hash, exec } => {
                let dir = top.dir(&parent, keep).map_err(io)?;
                let mode = restored_mode(rec).unwrap_or_else(|| file_mode(rec.sensitive, *exec));
                if !top.write_file(&dir, name, mode, |f| blobs.copy_verified(hash, f)).map_err(io)? {
                    return Err(NotRestored::Unavailable(rec.path.clone()));
                }
            }
        }
    }
    Ok(())
}

/// True when the store can put the record back (links and directories need no blob).
pub(crate) fn restorable(rec: &OutputRecord, blobs: &BlobStore) -> bool {
    match &rec.entry {
        Entry::Symlink { .. } | Entry::Dir { .. } => true,
        Entry::File { hash, .. } => blobs.has(hash),
    }
}
