//! A parallel walk of the input trees.
//!
//! Directories are read on rayon's pool (one task per directory, work-stealing), because on a 50,000-file
//! tree the walk and its `lstat` calls are the floor of a no-op check. Symlinks are never followed, so link
//! loops and links out of the repository are harmless: they are recorded as links. FIFOs, sockets and
//! devices are skipped with a warning (opening a FIFO would block).

use super::Error;
use crate::relpath::RelPath;
use rayon::prelude::*;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// The `lstat` fields that decide whether a file can have changed (git's rule, minus uid/gid).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub mode: u32,
}

impl Stat {
    pub fn of(m: &fs::Metadata) -> Stat {
        Stat {
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            ino: m.ino(),
            mode: m.mode(),
        }
    }

    pub fn exec(&self) -> bool {
        self.mode & 0o111 != 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Symlink,
}

#[derive(Clone, Debug)]
pub struct Walked {
    pub path: RelPath,
    pub kind: Kind,
    pub stat: Stat,
}

/// Files found below one start, and warnings about what was skipped.
type Found = (Vec<Walked>, Vec<String>);

/// Directories never descended into: kkpipe's cache and git's store.
const PRUNED: &[&[u8]] = &[b".kkpipe", b".git"];

/// Walk every start (a file or a directory, relative to `root`), returning regular files and symlinks.
/// Missing starts contribute nothing (the caller warns about patterns that match nothing).
pub fn walk(root: &Path, starts: &[RelPath], warnings: &mut Vec<String>) -> Result<Vec<Walked>, Error> {
    let starts = minimal_starts(starts);
    let results: Vec<Result<Found, Error>> = starts.par_iter().map(|s| walk_start(root, s)).collect();
    let mut out = Vec::new();
    for r in results {
        let (files, warns) = r?;
        out.extend(files);
        warnings.extend(warns);
    }
    Ok(out)
}

/// Drop starts that lie below another start, so no file is walked twice.
fn minimal_starts(starts: &[RelPath]) -> Vec<RelPath> {
    let mut sorted: Vec<RelPath> = starts.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut out: Vec<RelPath> = Vec::new();
    for s in sorted {
        if !out.iter().any(|o| s.starts_with(o)) {
            out.push(s);
        }
    }
    out
}

fn walk_start(root: &Path, start: &RelPath) -> Result<Found, Error> {
    let abs = start.under(root);
    let meta = match fs::symlink_metadata(&abs) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(Error::read(start, e)),
    };
    let mut files = Vec::new();
    let mut warnings = Vec::new();
    if meta.is_dir() {
        walk_dir(root, start.clone(), &mut files, &mut warnings)?;
    } else {
        classify(start.clone(), &meta, &mut files, &mut warnings);
    }
    Ok((files, warnings))
}

fn classify(path: RelPath, meta: &fs::Metadata, files: &mut Vec<Walked>, warnings: &mut Vec<String>) {
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        Kind::File
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_dir() {
        return;
    } else {
        let what = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "a device"
        };
        warnings.push(format!("skipping `{path}`: it is {what}, not a file"));
        return;
    };
    files.push(Walked { path, kind, stat: Stat::of(meta) });
}

fn walk_dir(root: &Path, dir: RelPath, files: &mut Vec<Walked>, warnings: &mut Vec<String>) -> Result<(), Error> {
    let abs = dir.under(root);
    let rd = fs::read_dir(&abs).map_err(|e| Error::read(&dir, e))?;
    let mut subdirs = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::read(&dir, e))?;
        let name = entry.file_name();
        let name = name.as_bytes();
        let path = dir.join_name(name);
        // DirEntry::metadata is an lstat relative to the open directory: it never follows links.
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // vanished mid-walk
            Err(e) => return Err(Error::read(&path, e)),
        };
        if meta.is_dir() {
            if !(dir.is_root() && PRUNED.contains(&name)) {
                subdirs.push(path);
            }
        } else {
            classify(path, &meta, files, warnings);
        }
    }
    if subdirs.len() == 1 {
        return walk_dir(root, subdirs.pop().expect("one"), files, warnings);
    }
    let nested: Vec<Result<Found, Error>> = subdirs
        .into_par_iter()
        .map(|d| {
            let mut f = Vec::new();
            let mut w = Vec::new();
            walk_dir(root, d, &mut f, &mut w).map(|()| (f, w))
        })
        .collect();
    for r in nested {
        let (f, w) = r?;
        files.extend(f);
        warnings.extend(w);
    }
    Ok(())
}
