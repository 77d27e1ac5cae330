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
use std::sync::Mutex;

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

/// The files below one walk start, in no particular order (directories are read in parallel).
#[derive(Debug, Clone, Default)]
pub struct Group {
    pub start: RelPath,
    pub files: Vec<Walked>,
}

/// A callback for each file found.
pub type OnFile<'a> = dyn Fn(&Walked) + Sync + 'a;

/// Never descended into, at any depth: kkpipe's caches and git's stores (a nested project's too).
const PRUNED: &[&[u8]] = &[b".kkpipe", b".git"];

/// Walk every start (a file or a directory, relative to `root`), returning regular files and symlinks per
/// start. Starts below another start are walked once, as part of it. Missing starts contribute nothing (the
/// caller warns about patterns that match nothing).
///
/// `on_file` sees every file as soon as it is found, on the walking thread: hashing can start while
/// directories are still being read.
pub fn walk(
    root: &Path,
    starts: &[RelPath],
    warnings: &mut Vec<String>,
    on_file: &OnFile<'_>,
) -> Result<Vec<Group>, Error> {
    let starts = minimal_starts(starts);
    let found: Vec<Result<(Group, Vec<String>), Error>> =
        starts.par_iter().map(|s| walk_start(root, s, on_file)).collect();
    let mut groups = Vec::with_capacity(found.len());
    for r in found {
        let (g, w) = r?;
        groups.push(g);
        warnings.extend(w);
    }
    Ok(groups)
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

fn walk_start(root: &Path, start: &RelPath, on_file: &OnFile<'_>) -> Result<(Group, Vec<String>), Error> {
    let abs = start.under(root);
    let meta = match fs::symlink_metadata(&abs) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((Group { start: start.clone(), files: Vec::new() }, Vec::new()));
        }
        Err(e) => return Err(Error::read(start, e)),
    };
    let out = Mutex::new((Vec::new(), Vec::new()));
    if meta.is_dir() {
        rayon::scope(|scope| walk_dir(scope, root, start.clone(), &out, on_file));
    } else {
        let mut files = Vec::new();
        let mut warnings = Vec::new();
        classify(start.clone(), &meta, &mut files, &mut warnings);
        files.iter().for_each(on_file);
        let mut found = out.lock().expect("walk");
        found.0.extend(files);
        found.1.extend(warnings.into_iter().map(Ok));
    }
    let (files, mut errors_and_warnings): (Vec<Walked>, Vec<Result<String, Error>>) = out.into_inner().expect("walk");
    let mut warnings = Vec::new();
    for w in errors_and_warnings.drain(..) {
        warnings.push(w?);
    }
    Ok((Group { start: start.clone(), files }, warnings))
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

/// Files found so far, and warnings or the first error (kept in order as results).
type Found = Mutex<(Vec<Walked>, Vec<Result<String, Error>>)>;

/// Read one directory, add its files to `out` in one batch, and spawn a task per subdirectory.
fn walk_dir<'s>(scope: &rayon::Scope<'s>, root: &'s Path, dir: RelPath, out: &'s Found, on_file: &'s OnFile<'s>) {
    let mut files = Vec::new();
    let mut warnings = Vec::new();
    let mut failure = None;
    match fs::read_dir(dir.under(root)) {
        Err(e) => failure = Some(Error::read(&dir, e)),
        Ok(rd) => {
            for entry in rd {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        failure = Some(Error::read(&dir, e));
                        break;
                    }
                };
                let name = entry.file_name();
                let name = name.as_bytes();
                let path = dir.join_name(name);
                // DirEntry::metadata is an lstat relative to the open directory: it never follows links.
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // vanished mid-walk
                    Err(e) => {
                        failure = Some(Error::read(&path, e));
                        break;
                    }
                };
                if PRUNED.contains(&name) {
                    continue;
                }
                if meta.is_dir() {
                    scope.spawn(move |s| walk_dir(s, root, path, out, on_file));
                } else {
                    classify(path, &meta, &mut files, &mut warnings);
                }
            }
        }
    }
    files.iter().for_each(on_file);
    let mut found = out.lock().expect("walk");
    found.0.append(&mut files);
    found.1.extend(warnings.into_iter().map(Ok));
    if let Some(e) = failure {
        found.1.push(Err(e));
    }
}
