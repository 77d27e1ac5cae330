//! A parallel walk of the input trees.
//!
//! Directories are read on rayon's pool (one task per directory, work-stealing), because on a 50,000-file
//! tree the walk and its `lstat` calls are the floor of a no-op check.
//!
//! Symlinks are resolved the way the stage that reads them will: a link to a file or a directory inside the
//! repository is followed, and what it points to is found under the link's own path (`link/sub/f`), so the
//! target's content is keyed. A link that leaves the repository, points into `.git`/`.kkpipe`, dangles, or
//! would lead the walk back into a directory it is already inside (a loop) is not followed: it is found as a
//! link and its link text is keyed. FIFOs, sockets and devices are skipped with a warning (opening a FIFO
//! would block).

use super::Error;
use crate::relpath::RelPath;
use rayon::prelude::*;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The `lstat` fields that decide whether a file can have changed (git's rule, minus uid/gid).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub mode: u32,
}

impl Stat {
    pub(crate) fn of(m: &fs::Metadata) -> Stat {
        Stat {
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            ino: m.ino(),
            mode: m.mode(),
        }
    }

    pub(crate) fn exec(&self) -> bool {
        self.mode & 0o111 != 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A regular file, or an in-repository link to one (`stat` is then the target's).
    File,
    /// A link that is not followed: its text is what is keyed.
    Symlink,
    /// A directory with nothing in it: a clean copy has it, so it is part of the key (`mkdir src/overlays`).
    /// A directory with entries is keyed through them.
    EmptyDir,
}

#[derive(Clone, Debug)]
pub(crate) struct Walked {
    pub path: RelPath,
    pub kind: Kind,
    pub stat: Stat,
}

/// The files below one walk start, in no particular order (directories are read in parallel).
#[derive(Debug, Clone, Default)]
pub(crate) struct Group {
    pub start: RelPath,
    pub files: Vec<Walked>,
}

/// A callback for each file found.
pub(crate) type OnFile<'a> = dyn Fn(&Walked) + Sync + 'a;

/// Never inputs, at any depth: kkpipe's caches and git's stores (or a worktree's `.git` file), so a nested
/// project's never leak into a key. The walk never descends into them; `select::Matcher` refuses paths
/// through them (a name check, not a glob: `**/.git/**` would be a regex run on every file). The same names
/// are never outputs either (`cache::outputs`).
pub(crate) const NEVER_INPUTS: &[&[u8]] = crate::relpath::RESERVED;

/// What the whole walk shares: the root as given and as the kernel resolves it (links are judged against it).
struct Walk<'a> {
    root: &'a Path,
    real_root: PathBuf,
    on_file: &'a OnFile<'a>,
    /// The `lstat` of each directory on the way down to a start (`None`: missing), taken once however many
    /// starts lie below it: a thousand literal patterns in ten directories make ten calls, not two thousand.
    above: std::collections::HashMap<&'a [u8], Option<fs::Metadata>>,
}

/// Walk every start (a file or a directory, relative to `root`), returning regular files and symlinks per
/// start. Starts below another start are walked once, as part of it; the result for a start never depends
/// on which other starts are walked beside it. Missing starts contribute nothing (the caller warns about
/// patterns that match nothing).
///
/// `on_file` sees every file as soon as it is found, on the walking thread: hashing can start while
/// directories are still being read.
pub(crate) fn walk(
    root: &Path,
    starts: &[RelPath],
    warnings: &mut Vec<String>,
    on_file: &OnFile<'_>,
) -> Result<Vec<Group>, Error> {
    match pool() {
        Some(p) => p.install(|| walk_here(root, starts, warnings, on_file)),
        None => walk_here(root, starts, warnings, on_file),
    }
}

/// The walk's own threads. Reading directories and `lstat`ing files is system calls, not computation: with
/// more threads than cores, a walk keeps more requests in flight (a cold disk, a network file system) and
/// keeps its share of a machine that other processes keep busy (the scheduler shares CPU time per thread;
/// `git status` `lstat`s with up to 20). Hashing stays on the pool sized to the CPUs this process may use
/// ([`super::files::FileHasher::prehash`] hashes on at most that many walk threads at once).
/// `KKPIPE_WALK_THREADS` sets the count; the default is 8, or the CPU count when it is larger.
fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = std::env::var("KKPIPE_WALK_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(cpus.max(8));
        rayon::ThreadPoolBuilder::new().num_threads(threads).thread_name(|i| format!("walk-{i}")).build().ok()
    })
    .as_ref()
}

fn walk_here(
    root: &Path,
    starts: &[RelPath],
    warnings: &mut Vec<String>,
    on_file: &OnFile<'_>,
) -> Result<Vec<Group>, Error> {
    let real_root = fs::canonicalize(root).map_err(|e| Error::read(root.display(), e))?;
    let starts = minimal_starts(starts);
    let dirs: std::collections::HashSet<&[u8]> =
        starts.iter().flat_map(|s| RelPath::ancestors_of(s.as_bytes()).skip(1)).collect();
    let lstat = |d: &[u8]| fs::symlink_metadata(root.join(std::ffi::OsStr::from_bytes(d))).ok();
    let above = dirs.into_par_iter().map(|d| (d, lstat(d))).collect();
    let w = Walk { root, real_root, on_file, above };
    let found: Vec<Result<(Group, Vec<String>), Error>> = starts.par_iter().map(|s| w.start(s)).collect();
    let mut groups = Vec::with_capacity(found.len());
    for r in found {
        let (g, ws) = r?;
        groups.push(g);
        warnings.extend(ws);
    }
    Ok(groups)
}

/// Drop starts that lie below another start, so no file is walked twice. Shortest first, each checked by
/// its ancestors' lookups: a thousand literal patterns cost a thousand lookups, not a million comparisons.
fn minimal_starts(starts: &[RelPath]) -> Vec<RelPath> {
    let mut sorted: Vec<&RelPath> = starts.iter().collect();
    sorted.sort_unstable_by_key(|s| s.as_bytes().len());
    let mut kept: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
    let mut out: Vec<RelPath> = Vec::new();
    for s in sorted {
        let b = s.as_bytes();
        if !RelPath::ancestors_of(b).chain([b]).any(|a| kept.contains(a)) {
            kept.insert(b);
            out.push(s.clone());
        }
    }
    out.sort();
    out
}

/// How a symlink is treated (see the module docs).
enum Link {
    /// Followed to a file: found under the link's path with the target's `stat`.
    File(fs::Metadata),
    /// Followed to a directory; the resolved location of the link's parent, for loop detection below it.
    Dir(PathBuf),
    /// Found as a link; with a warning when the user should know why it was not followed.
    Kept(Option<String>),
}

/// Files found so far, and warnings or the first error (kept in order as results).
type Found = Mutex<(Vec<Walked>, Vec<Result<String, Error>>)>;

impl Walk<'_> {
    fn start(&self, start: &RelPath) -> Result<(Group, Vec<String>), Error> {
        let group = |files| Group { start: start.clone(), files };
        // A start reached through an unfollowed link (`link/sub` with `link` out of the repository) is that
        // link: the same thing a walk of `link` itself finds.
        if let Some((kept, warning)) = self.kept_link_above(start) {
            (self.on_file)(&kept);
            return Ok((group(vec![kept]), warning.into_iter().collect()));
        }
        let out: Found = Mutex::new((Vec::new(), Vec::new()));
        match fs::symlink_metadata(start.under(self.root)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((group(Vec::new()), Vec::new())),
            Err(e) => return Err(Error::read(start, e)),
            Ok(meta) => rayon::scope(|scope| {
                let mut batch = Batch::default();
                self.entry(scope, start.clone(), meta, &[], &out, &mut batch);
                batch.add_to(&out);
            }),
        }
        let (files, results) = out.into_inner().expect("walk");
        let warnings = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok((group(files), warnings))
    }

    /// The first link on the way down to `start` that is not followed, as a walked entry.
    /// With the warning that says why it was not followed, if any.
    fn kept_link_above(&self, start: &RelPath) -> Option<(Walked, Option<String>)> {
        for dir in RelPath::ancestors_of(start.as_bytes()).skip(1) {
            let meta = self.above.get(dir)?.as_ref()?;
            if !meta.file_type().is_symlink() {
                continue;
            }
            let prefix = RelPath::from_bytes(dir).ok()?;
            if let Link::Kept(warning) = self.resolve(&prefix, &[]) {
                return Some((Walked { path: prefix, kind: Kind::Symlink, stat: Stat::of(meta) }, warning));
            }
        }
        None
    }

    /// One directory entry (or start) found with `lstat` metadata `meta`, added to `batch`; a directory
    /// becomes a task of its own. `chain`: where the walk followed directory links on its way here, resolved.
    fn entry<'s>(
        &'s self,
        scope: &rayon::Scope<'s>,
        path: RelPath,
        meta: fs::Metadata,
        chain: &[PathBuf],
        out: &'s Found,
        batch: &mut Batch,
    ) {
        let ft = meta.file_type();
        if ft.is_dir() {
            let chain = chain.to_vec();
            scope.spawn(move |s| self.dir(s, path, chain, out));
            return;
        }
        let walked = if ft.is_symlink() {
            match self.resolve(&path, chain) {
                Link::File(target) => Some(Walked { path, kind: Kind::File, stat: Stat::of(&target) }),
                Link::Dir(here) => {
                    let mut chain = chain.to_vec();
                    chain.push(here);
                    scope.spawn(move |s| self.dir(s, path, chain, out));
                    None
                }
                Link::Kept(warning) => {
                    batch.warnings.extend(warning);
                    Some(Walked { path, kind: Kind::Symlink, stat: Stat::of(&meta) })
                }
            }
        } else {
            classify(path, &meta, &mut batch.warnings)
        };
        if let Some(w) = walked {
            (self.on_file)(&w);
            batch.files.push(w);
        }
    }

    /// Decide whether the link at `path` is followed (module docs). `chain`: directory links followed above.
    fn resolve(&self, path: &RelPath, chain: &[PathBuf]) -> Link {
        let abs = path.under(self.root);
        let target = match fs::canonicalize(&abs) {
            Ok(t) => t,
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) => {
                return Link::Kept(Some(format!("`{path}` is a symlink loop: not followed, its link text is keyed")));
            }
            // Dangling (or unreadable): a state of its own, keyed by its text; creating the target changes it.
            Err(_) => return Link::Kept(None),
        };
        let Ok(inside) = target.strip_prefix(&self.real_root) else {
            return Link::Kept(Some(format!(
                "`{path}` links out of the repository: its link text is keyed, not what it points to"
            )));
        };
        if inside.components().any(|c| NEVER_INPUTS.contains(&c.as_os_str().as_bytes())) {
            return Link::Kept(None);
        }
        match fs::metadata(&target) {
            Ok(m) if m.is_file() => Link::File(m),
            Ok(m) if m.is_dir() => {
                // Following a link to a directory the walk is inside (here, or where an earlier link was
                // followed) would never end.
                let here = abs.parent().and_then(|p| fs::canonicalize(p).ok()).unwrap_or_default();
                if chain.iter().chain([&here]).any(|c| c.starts_with(&target)) {
                    Link::Kept(Some(format!(
                        "`{path}` leads back into a directory it is in (a loop): not followed, its link text is keyed"
                    )))
                } else {
                    Link::Dir(here)
                }
            }
            _ => Link::Kept(None),
        }
    }

    /// Read one directory and handle each entry; its files reach `out` in one batch (one lock per directory).
    fn dir<'s>(&'s self, scope: &rayon::Scope<'s>, dir: RelPath, chain: Vec<PathBuf>, out: &'s Found) {
        let mut batch = Batch::default();
        match fs::read_dir(dir.under(self.root)) {
            Err(e) => batch.failure = Some(Error::read(&dir, e)),
            Ok(rd) => {
                let mut empty = true;
                for entry in rd {
                    empty = false;
                    let entry = match entry {
                        Ok(e) => e,
                        Err(e) => {
                            batch.failure = Some(Error::read(&dir, e));
                            break;
                        }
                    };
                    let name = entry.file_name();
                    let name = name.as_bytes();
                    if NEVER_INPUTS.contains(&name) {
                        continue;
                    }
                    let path = dir.join_name(name);
                    // DirEntry::metadata is an lstat relative to the open directory: it never follows links.
                    match entry.metadata() {
                        Ok(meta) => self.entry(scope, path, meta, &chain, out, &mut batch),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // vanished mid-walk
                        Err(e) => {
                            batch.failure = Some(Error::read(&path, e));
                            break;
                        }
                    }
                }
                if empty && !dir.as_bytes().is_empty() {
                    match fs::symlink_metadata(dir.under(self.root)) {
                        Ok(meta) => batch.files.push(Walked { path: dir, kind: Kind::EmptyDir, stat: Stat::of(&meta) }),
                        Err(e) => batch.failure = Some(Error::read(&dir, e)),
                    }
                }
            }
        }
        batch.add_to(out);
    }
}

/// What one directory contributed, added to the walk's results at once.
#[derive(Default)]
struct Batch {
    files: Vec<Walked>,
    warnings: Vec<String>,
    failure: Option<Error>,
}

impl Batch {
    fn add_to(self, out: &Found) {
        let mut found = out.lock().expect("walk");
        found.0.extend(self.files);
        found.1.extend(self.warnings.into_iter().map(Ok));
        found.1.extend(self.failure.map(Err));
    }
}

/// A regular file as a walked entry; FIFOs, sockets and devices are skipped with a warning.
fn classify(path: RelPath, meta: &fs::Metadata, warnings: &mut Vec<String>) -> Option<Walked> {
    let ft = meta.file_type();
    if ft.is_file() {
        return Some(Walked { path, kind: Kind::File, stat: Stat::of(meta) });
    }
    let what = if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "a device"
    };
    warnings.push(format!("skipping `{path}`: it is {what}, not a file"));
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(v: &[&str]) -> Vec<RelPath> {
        v.iter().map(|p| RelPath::parse(p).unwrap()).collect()
    }

    #[test]
    fn starts_below_another_start_are_dropped_but_siblings_sharing_a_prefix_stay() {
        let got = minimal_starts(&paths(&["a/b", "a", "ab", "a/b/c", "c", "a", "a-b/x"]));
        assert_eq!(got, paths(&["a", "a-b/x", "ab", "c"]));
        assert_eq!(minimal_starts(&paths(&["x/y", "", "z"])), paths(&[""]));
        assert!(minimal_starts(&[]).is_empty());
    }
}
