//! Writing recorded outputs back into the repository without ever following a link.
//!
//! A restore writes what a cache entry (possibly imported from another machine) says. Paths are checked
//! before (they must lie inside the stage's declared outputs), and here every directory on the way is
//! opened relative to its parent with `O_NOFOLLOW`, so a symlink planted in the workspace (`out -> ../.git`)
//! cannot redirect a write: a link above the declared output refuses the restore, one at or below it is
//! part of the output and is replaced. Files and links are created under a temporary name in `.kkpipe/tmp/`
//! and renamed over the old entry, which replaces a link instead of writing through it.

use crate::relpath::RelPath;
use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::{Mode, SFlag, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, symlinkat, unlinkat};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

const DIR_FLAGS: OFlag = OFlag::O_DIRECTORY.union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);

fn os(name: &[u8]) -> &OsStr {
    OsStr::from_bytes(name)
}

fn io_err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// The repository root, opened once; everything below is reached from it one component at a time. New files
/// and links are made in the cache's temporary directory and renamed into place, so a kill mid-restore leaves
/// nothing in the workspace (the next run empties that directory).
pub(super) struct Root {
    root: OwnedFd,
    tmp: OwnedFd,
}

impl Root {
    pub(super) fn open(root: &Path, tmp: &Path) -> io::Result<Root> {
        // The root itself may be reached through links (`/tmp` on some systems): it is the user's choice.
        let open = |p: &Path| openat(nix::fcntl::AT_FDCWD, p, OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty());
        std::fs::create_dir_all(tmp)?;
        Ok(Root { root: open(root).map_err(io_err)?, tmp: open(tmp).map_err(io_err)? })
    }

    /// Open directory `dir`, creating missing directories. The first `keep` names must already be real
    /// directories (links there refuse the restore); deeper names belong to the output and whatever is in
    /// their way (a file, a link) is removed.
    pub(super) fn dir(&self, dir: &RelPath, keep: usize) -> io::Result<OwnedFd> {
        let mut fd = self.root.try_clone()?;
        let mut shown = RelPath::root();
        for (depth, name) in dir.names().into_iter().enumerate() {
            shown = shown.join_name(name);
            fd = match openat(&fd, os(name), DIR_FLAGS, Mode::empty()) {
                Ok(next) => next,
                Err(Errno::ENOENT) => {
                    mkdirat(&fd, os(name), Mode::from_bits_truncate(0o755)).map_err(io_err)?;
                    openat(&fd, os(name), DIR_FLAGS, Mode::empty()).map_err(io_err)?
                }
                Err(Errno::ELOOP | Errno::ENOTDIR) if depth >= keep => {
                    remove(&fd, name)?;
                    mkdirat(&fd, os(name), Mode::from_bits_truncate(0o755)).map_err(io_err)?;
                    openat(&fd, os(name), DIR_FLAGS, Mode::empty()).map_err(io_err)?
                }
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    return Err(io::Error::other(format!(
                        "`{shown}` is a symlink or not a directory; outputs are only restored through real directories"
                    )));
                }
                Err(e) => return Err(io_err(e)),
            };
        }
        Ok(fd)
    }

    /// Put `fill`'s content at `dir/name` with `mode`, replacing what is there. `fill` returns `false` to give
    /// up (the content is not available), leaving the old entry as it was.
    pub(super) fn write_file(
        &self,
        dir: &OwnedFd,
        name: &[u8],
        mode: u32,
        fill: impl FnOnce(&mut std::fs::File) -> io::Result<bool>,
    ) -> io::Result<bool> {
        let tmp = temp_name();
        let flags = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(&self.tmp, os(&tmp), flags, Mode::from_bits_truncate(0o600)).map_err(io_err)?;
        let mut file = std::fs::File::from(fd);
        let done = fill(&mut file).and_then(|ok| {
            if ok {
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            }
            Ok(ok)
        });
        drop(file);
        match done {
            Ok(true) => self.replace_with(&tmp, dir, name).map(|()| true),
            other => {
                let _ = unlinkat(&self.tmp, os(&tmp), UnlinkatFlags::NoRemoveDir);
                other
            }
        }
    }

    /// Make `dir/name` a symlink with `target`, replacing what is there.
    pub(super) fn write_link(&self, dir: &OwnedFd, name: &[u8], target: &[u8]) -> io::Result<()> {
        let tmp = temp_name();
        symlinkat(os(target), &self.tmp, os(&tmp)).map_err(io_err)?;
        self.replace_with(&tmp, dir, name)
    }

    /// Rename the temporary `tmp` over `dir/name` (a directory in the way is removed first: rename cannot
    /// replace it). An output on another file system than `.kkpipe/` (a mount) gets a copy made beside it
    /// under a temporary name first, renamed the same way: a kill can then leave that name in the output
    /// directory, which the next restore of it prunes.
    fn replace_with(&self, tmp: &[u8], dir: &OwnedFd, name: &[u8]) -> io::Result<()> {
        if is_dir(dir, name) {
            remove(dir, name)?;
        }
        let moved = match renameat(&self.tmp, os(tmp), dir, os(name)) {
            Err(Errno::EXDEV) => self.copy_beside(tmp, dir).and_then(|local| {
                let renamed = renameat(dir, os(&local), dir, os(name)).map_err(|e| {
                    let _ = unlinkat(dir, os(&local), UnlinkatFlags::NoRemoveDir);
                    io_err(e)
                });
                let _ = unlinkat(&self.tmp, os(&[b"journal-".as_slice(), &local].concat()), UnlinkatFlags::NoRemoveDir);
                renamed
            }),
            r => r.map_err(io_err),
        };
        let _ = unlinkat(&self.tmp, os(tmp), UnlinkatFlags::NoRemoveDir);
        moved
    }

    /// A copy of the temporary file or link `tmp` in `dir`, under a temporary name of its own. Where it is goes
    /// into a journal in `.kkpipe/tmp/` first, so the next run removes it if a kill leaves it there
    /// ([`sweep_journal`]).
    fn copy_beside(&self, tmp: &[u8], dir: &OwnedFd) -> io::Result<Vec<u8>> {
        let local = [BESIDE.as_bytes(), &temp_name()].concat();
        let at = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(dir)))?;
        let journal = [b"journal-".as_slice(), &local].concat();
        let fd = openat(
            &self.tmp,
            os(&journal),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(io_err)?;
        std::io::Write::write_all(&mut std::fs::File::from(fd), at.join(os(&local)).as_os_str().as_bytes())?;
        if let Ok(target) = nix::fcntl::readlinkat(&self.tmp, os(tmp)) {
            symlinkat(target.as_os_str(), dir, os(&local)).map_err(io_err)?;
            return Ok(local);
        }
        let from = openat(&self.tmp, os(tmp), OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(io_err)?;
        let mut from = std::fs::File::from(from);
        let flags = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let to = openat(dir, os(&local), flags, Mode::from_bits_truncate(0o600)).map_err(io_err)?;
        let mut to = std::fs::File::from(to);
        let copied = std::io::copy(&mut from, &mut to).and_then(|_| to.set_permissions(from.metadata()?.permissions()));
        if let Err(e) = copied {
            let _ = unlinkat(dir, os(&local), UnlinkatFlags::NoRemoveDir);
            return Err(e);
        }
        Ok(local)
    }
}

/// The prefix of a copy made beside an output on another file system.
const BESIDE: &str = ".kkpipe-restore-";

/// Remove what a restore killed mid-way left beside outputs on another file system (each named in a journal in
/// `tmp`), then the journals. Called with the run lock held, before `tmp` is emptied.
pub(super) fn sweep_journal(tmp: &Path) {
    let Ok(rd) = std::fs::read_dir(tmp) else { return };
    for e in rd.flatten() {
        if !e.file_name().as_bytes().starts_with(b"journal-") {
            continue;
        }
        if let Ok(path) = std::fs::read(e.path()) {
            let path = Path::new(OsStr::from_bytes(&path));
            // Only ever a name this code made: never a path a journal could be made to name otherwise.
            if path.file_name().is_some_and(|n| n.as_bytes().starts_with(BESIDE.as_bytes())) {
                let _ = std::fs::remove_file(path);
            }
        }
        let _ = std::fs::remove_file(e.path());
    }
}

/// Set the permission bits of the open directory `dir`.
pub(super) fn set_mode(dir: &OwnedFd, mode: u32) -> io::Result<()> {
    nix::sys::stat::fchmod(dir, Mode::from_bits_truncate(mode)).map_err(io_err)
}

/// A name for a file being written, unique in this process.
fn temp_name() -> Vec<u8> {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("restore-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)).into_bytes()
}

fn is_dir(dir: &impl AsFd, name: &[u8]) -> bool {
    fstatat(dir, os(name), AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR)
}

/// Remove every entry of the open directory `dir` whose name is not in `keep`, but never a `.git` or `.kkpipe`
/// (a repository nested in an output is not the output's to remove).
pub(super) fn prune(dir: &OwnedFd, keep: &HashSet<&[u8]>) -> io::Result<()> {
    for name in list(dir)? {
        if !keep.contains(&name[..]) && !crate::relpath::RESERVED.contains(&&name[..]) {
            remove(dir, &name)?;
        }
    }
    Ok(())
}

/// The entry names of an open directory.
fn list(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    // A descriptor of its own: a duplicate would share (and move) the directory's read position.
    let fresh = openat(dir, ".", OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()).map_err(io_err)?;
    let d = nix::dir::Dir::from_fd(fresh).map_err(io_err)?;
    let mut names = Vec::new();
    for e in d {
        let e = e.map_err(io_err)?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    Ok(names)
}

/// Remove `dir/name` whatever it is, never following a link (a directory is emptied first, through
/// descriptors opened without following links).
fn remove(dir: &OwnedFd, name: &[u8]) -> io::Result<()> {
    if is_dir(dir, name) {
        let sub = openat(dir, os(name), DIR_FLAGS, Mode::empty()).map_err(io_err)?;
        for n in list(&sub)? {
            remove(&sub, &n)?;
        }
        return unlinkat(dir, os(name), UnlinkatFlags::RemoveDir).map_err(io_err);
    }
    match unlinkat(dir, os(name), UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(io_err(e)),
    }
}
