//! Declared outputs: stored in the blob store after a successful run, checked and restored on a hit.

use crate::cache::BlobStore;
use crate::fresh::{OutputRecord, Present, Workspace};
use crate::hash::Entry;
use crate::hash::files::FileHasher;
use crate::hash::walk::{Kind, Stat, Walked};
use crate::pipeline::Output;
use crate::relpath::RelPath;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "declared output `{0}` was not created by the stage\n  hint: fix the command, or remove the path from `outputs`"
    )]
    Missing(RelPath),
    #[error("cannot store output `{path}`: {source}")]
    Store { path: String, source: std::io::Error },
}

/// Store every declared output of a finished stage (files, directory trees, symlinks) and describe them.
/// Blobs land before the caller commits the row that points at them.
pub fn collect(root: &Path, declared: &[Output], blobs: &BlobStore) -> Result<Vec<OutputRecord>, Error> {
    let mut out = Vec::new();
    for o in declared {
        let abs = o.path.under(root);
        let meta = fs::symlink_metadata(&abs).map_err(|_| Error::Missing(o.path.clone()))?;
        if meta.is_dir() {
            for e in walkdir::WalkDir::new(&abs).follow_links(false).sort_by_file_name() {
                let e = e.map_err(|e| Error::Store { path: o.path.display(), source: e.into() })?;
                if e.file_type().is_dir() {
                    continue;
                }
                let rel = RelPath::from_path_under(root, e.path()).expect("below the root");
                let m = e.path().symlink_metadata().map_err(|e| Error::Store { path: rel.display(), source: e })?;
                if let Some(r) = store_one(&rel, e.path(), &m, o.sensitive, blobs)? {
                    out.push(r);
                }
            }
        } else if let Some(r) = store_one(&o.path, &abs, &meta, o.sensitive, blobs)? {
            out.push(r);
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
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
        }));
    }
    if !ft.is_file() {
        return Ok(None);
    }
    let (hash, size) = blobs.put(abs, sensitive).map_err(|e| Error::Store { path: rel.display(), source: e })?;
    let exec = Stat::of(meta).exec();
    if sensitive {
        // The workspace copy of a secret is as private as the stored one.
        use std::os::unix::fs::PermissionsExt;
        let mode = if exec { 0o700 } else { 0o600 };
        let _ = fs::set_permissions(abs, fs::Permissions::from_mode(mode));
    }
    Ok(Some(OutputRecord { path: rel.clone(), entry: Entry::File { hash, exec }, size, sensitive }))
}

/// The workspace and the blob store of one checkout, for the decision.
pub struct Disk<'a> {
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

pub fn check(root: &Path, rec: &OutputRecord, hasher: &FileHasher) -> Present {
    let abs = rec.path.under(root);
    let meta = match fs::symlink_metadata(&abs) {
        Ok(m) => m,
        Err(_) => return Present::Missing,
    };
    let kind = if meta.file_type().is_symlink() {
        Kind::Symlink
    } else if meta.is_file() {
        Kind::File
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

/// Put a recorded output back into the workspace from the store. `Ok(false)`: the blob is gone.
pub fn restore(root: &Path, rec: &OutputRecord, blobs: &BlobStore) -> std::io::Result<bool> {
    let abs = rec.path.under(root);
    match &rec.entry {
        Entry::Symlink { target } => {
            if let Some(p) = abs.parent() {
                fs::create_dir_all(p)?;
            }
            let _ = fs::remove_file(&abs);
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &abs)?;
            Ok(true)
        }
        Entry::File { hash, exec } => {
            if abs.is_dir() {
                return Err(std::io::Error::other(format!("`{}` is a directory in the workspace", rec.path)));
            }
            let mode = match (rec.sensitive, exec) {
                (true, true) => 0o700,
                (true, false) => 0o600,
                (false, true) => 0o755,
                (false, false) => 0o644,
            };
            blobs.restore(hash, &abs, mode)
        }
    }
}

/// True when every recorded file output can be restored from the store.
pub fn restorable(rec: &OutputRecord, blobs: &BlobStore) -> bool {
    match &rec.entry {
        Entry::Symlink { .. } => true,
        Entry::File { hash, .. } => blobs.has(hash),
    }
}
