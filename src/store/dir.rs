//! `file://`: the store as a directory (shared disks, tests). Create-only by `link(2)`, compare-and-swap under
//! an exclusive `flock` on a sibling lock file, a version that is the content's BLAKE3.

use super::{Error, Listed, ObjectStore, Result, Version};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub(super) struct Dir {
    root: PathBuf,
}

fn io(e: std::io::Error, p: &Path) -> Error {
    Error::Refused(format!("`{}`: {e}", p.display()))
}

/// A file's version: its content's BLAKE3 (a rewrite with the same bytes is the same version).
fn version_of(bytes: &[u8]) -> Version {
    Version::tag(blake3::hash(bytes).to_hex().to_string())
}

fn read(p: &Path) -> Result<Option<(Vec<u8>, Version)>> {
    match std::fs::read(p) {
        Ok(b) => {
            let v = version_of(&b);
            Ok(Some((b, v)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(e, p)),
    }
}

fn temp_beside(p: &Path, bytes: &[u8]) -> Result<tempfile::NamedTempFile> {
    let dir = p.parent().expect("below the root");
    std::fs::create_dir_all(dir).map_err(|e| io(e, dir))?;
    let mut t = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir).map_err(|e| io(e, dir))?;
    t.write_all(bytes).and_then(|()| t.as_file().sync_all()).map_err(|e| io(e, p))?;
    Ok(t)
}

impl Dir {
    pub(super) fn open(url: &url::Url) -> std::result::Result<Dir, String> {
        Ok(Dir { root: url.to_file_path().map_err(|_| format!("`{url}` is not a local path"))? })
    }
}

impl ObjectStore for Dir {
    fn get(&self, name: &str) -> Result<Option<(Vec<u8>, Version)>> {
        read(&self.root.join(name))
    }

    fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.root.join(name).exists())
    }

    fn put_if(&self, name: &str, bytes: Vec<u8>, expected: Option<&Version>) -> Result<Option<Version>> {
        let p = self.root.join(name);
        let t = temp_beside(&p, &bytes)?;
        let Some(expected) = expected else {
            // link(2) fails if the name exists: create-only, atomically.
            return match std::fs::hard_link(t.path(), &p) {
                Ok(()) => Ok(Some(version_of(&bytes))),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(io(e, &p)),
            };
        };
        let lock_path = p.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io(e, &lock_path))?;
        let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io(e.into(), &lock_path))?;
        match read(&p)? {
            Some((_, now)) if &now == expected => {
                t.persist(&p).map_err(|e| io(e.error, &p))?;
                Ok(Some(version_of(&bytes)))
            }
            _ => Ok(None),
        }
    }

    fn list(&self, under: &str) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        for e in walkdir::WalkDir::new(self.root.join(under)).into_iter().filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy();
            if !e.file_type().is_file() || name.starts_with(".tmp-") || name.ends_with(".lock") {
                continue;
            }
            let Ok(rel) = e.path().strip_prefix(&self.root) else { continue };
            let Ok(meta) = e.metadata() else { continue };
            out.push(Listed {
                name: rel.to_string_lossy().into_owned(),
                modified_ms: meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000,
                size: meta.size(),
            });
        }
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<()> {
        let p = self.root.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(e, &p)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_only_and_compare_and_swap_on_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let d = Dir::open(&url::Url::from_directory_path(tmp.path()).unwrap()).unwrap();
        crate::store::memory::tests::behaves_as_a_store(&d);
    }
}
