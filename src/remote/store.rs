//! The object store, seen synchronously: get, create-only put, compare-and-swap put, list, delete.
//!
//! S3 and GCS go through the `object_store` crate on a small tokio runtime built only when a remote is
//! configured (`object.rs`, the default cargo feature `s3-gcs`); `file://` is a directory (create-only by
//! `link(2)`, compare-and-swap under `flock`), for tests and shared disks. Every request is bounded by a
//! timeout; the first failure to reach the store marks it down for the rest of the invocation, so an
//! unreachable store costs one timeout and one warning, not one per stage.

#[cfg(feature = "s3-gcs")]
mod object;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store did not answer (refused, timed out, 5xx after retries): the caller works locally.
    #[error("{0}")]
    Unreachable(String),
    /// The store answered, but not as expected (permission denied, bad request).
    #[error("{0}")]
    Refused(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// An object's version, for compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    e_tag: Option<String>,
    version: Option<String>,
}

/// One listed object.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Below the remote's prefix, `/`-separated.
    pub name: String,
    pub modified_ms: i64,
    pub size: u64,
}

enum Backend {
    #[cfg(feature = "s3-gcs")]
    Object(object::Client),
    Dir(PathBuf),
}

pub struct Store {
    backend: Backend,
    prefix: String,
    down: AtomicBool,
}

/// The store for `url` (`s3://`, `gs://`, `file://`), configured from `env` (the caller's environment: the
/// stores' standard variables, `AWS_*` and `GOOGLE_*`).
pub fn open(url: &url::Url, env: &HashMap<String, String>) -> std::result::Result<Store, String> {
    let mut prefix = url.path().trim_matches('/').to_string();
    let backend = match url.scheme() {
        "file" => {
            prefix.clear();
            Backend::Dir(url.to_file_path().map_err(|_| format!("`{url}` is not a local path"))?)
        }
        #[cfg(feature = "s3-gcs")]
        "s3" | "s3a" | "gs" => Backend::Object(object::Client::open(url, env)?),
        #[cfg(not(feature = "s3-gcs"))]
        "s3" | "s3a" | "gs" => {
            let _ = env;
            return Err("this kkpipe was built without S3 and GCS support (the cargo feature `s3-gcs`)".into());
        }
        other => return Err(format!("`{other}://` is not a remote kkpipe knows; use s3://, gs:// or file://")),
    };
    Ok(Store { backend, prefix, down: AtomicBool::new(false) })
}

impl Store {
    fn key(&self, name: &str) -> String {
        match self.prefix.is_empty() {
            true => name.to_string(),
            false => format!("{}/{name}", self.prefix),
        }
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Run one request; an unreachable store is marked down.
    fn call<T>(&self, f: impl FnOnce(&Backend) -> Result<T>) -> Result<T> {
        if self.is_down() {
            return Err(Error::Unreachable("the remote did not answer earlier in this run".into()));
        }
        let r = f(&self.backend);
        if let Err(Error::Unreachable(_)) = &r {
            self.down.store(true, Ordering::Relaxed);
        }
        r
    }

    /// An object's bytes and version; `None` when there is none.
    pub fn get(&self, name: &str) -> Result<Option<(Vec<u8>, Version)>> {
        let key = self.key(name);
        self.call(|b| match b {
            #[cfg(feature = "s3-gcs")]
            Backend::Object(c) => c.get(&key),
            Backend::Dir(root) => dir::get(&root.join(&key)),
        })
    }

    pub fn exists(&self, name: &str) -> Result<bool> {
        let key = self.key(name);
        self.call(|b| match b {
            #[cfg(feature = "s3-gcs")]
            Backend::Object(c) => c.exists(&key),
            Backend::Dir(root) => Ok(root.join(&key).exists()),
        })
    }

    /// Write `bytes` only if `expected` is the object's version now (`None`: only if there is no object).
    /// Returns the new version, or `None` when another writer was first.
    pub fn put_if(&self, name: &str, bytes: Vec<u8>, expected: Option<&Version>) -> Result<Option<Version>> {
        self.call(|b| self.put_if_on(b, name, bytes, expected))
    }

    /// [`Store::put_if`] even when the store was marked down: a held deploy lease keeps being renewed (and is
    /// released) for as long as the store may come back.
    pub fn put_if_always(&self, name: &str, bytes: Vec<u8>, expected: Option<&Version>) -> Result<Option<Version>> {
        self.put_if_on(&self.backend, name, bytes, expected)
    }

    fn put_if_on(
        &self,
        b: &Backend,
        name: &str,
        bytes: Vec<u8>,
        expected: Option<&Version>,
    ) -> Result<Option<Version>> {
        let key = self.key(name);
        match b {
            #[cfg(feature = "s3-gcs")]
            Backend::Object(c) => c.put_if(&key, bytes, expected),
            Backend::Dir(root) => dir::put_if(&root.join(&key), &bytes, expected),
        }
    }

    /// Names below `under` (relative to the remote's prefix).
    pub fn list(&self, under: &str) -> Result<Vec<Listed>> {
        let key = self.key(under);
        let strip = match self.prefix.is_empty() {
            true => 0,
            false => self.prefix.len() + 1,
        };
        self.call(|b| match b {
            #[cfg(feature = "s3-gcs")]
            Backend::Object(c) => c.list(&key, strip),
            Backend::Dir(root) => Ok(dir::list(root, &root.join(&key), strip)),
        })
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        let key = self.key(name);
        self.call(|b| match b {
            #[cfg(feature = "s3-gcs")]
            Backend::Object(c) => c.delete(&key),
            Backend::Dir(root) => match std::fs::remove_file(root.join(&key)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::Refused(e.to_string())),
            },
        })
    }

    /// Run `f` for each item with up to 8 requests in flight (blob uploads and downloads, ledger reads).
    pub fn each<T: Send, R: Send>(&self, items: Vec<T>, f: impl Fn(&Store, T) -> R + Sync) -> Vec<R> {
        use rayon::prelude::*;
        let pool = rayon::ThreadPoolBuilder::new().num_threads(items.len().clamp(1, 8)).build();
        match pool {
            Ok(pool) => pool.install(|| items.into_par_iter().map(|t| f(self, t)).collect()),
            Err(_) => items.into_iter().map(|t| f(self, t)).collect(),
        }
    }
}

/// `file://`: the same operations on a directory.
mod dir {
    use super::{Error, Listed, Result, Version};
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    fn io(e: std::io::Error, p: &Path) -> Error {
        Error::Refused(format!("`{}`: {e}", p.display()))
    }

    /// A file's version: its content's BLAKE3 (a rewrite with the same bytes is the same version).
    fn version_of(bytes: &[u8]) -> Version {
        Version { e_tag: Some(blake3::hash(bytes).to_hex().to_string()), version: None }
    }

    pub fn get(p: &Path) -> Result<Option<(Vec<u8>, Version)>> {
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

    pub fn put_if(p: &Path, bytes: &[u8], expected: Option<&Version>) -> Result<Option<Version>> {
        let t = temp_beside(p, bytes)?;
        let Some(expected) = expected else {
            // link(2) fails if the name exists: create-only, atomically.
            return match std::fs::hard_link(t.path(), p) {
                Ok(()) => Ok(Some(version_of(bytes))),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(io(e, p)),
            };
        };
        // Compare and swap under an exclusive lock on a sibling lock file.
        let lock_path = p.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io(e, &lock_path))?;
        let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io(e.into(), &lock_path))?;
        match get(p)? {
            Some((_, now)) if &now == expected => {
                t.persist(p).map_err(|e| io(e.error, p))?;
                Ok(Some(version_of(bytes)))
            }
            _ => Ok(None),
        }
    }

    pub fn list(root: &Path, under: &Path, strip: usize) -> Vec<Listed> {
        let mut out = Vec::new();
        for e in walkdir::WalkDir::new(under).into_iter().filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy();
            if !e.file_type().is_file() || name.starts_with(".tmp-") || name.ends_with(".lock") {
                continue;
            }
            let Ok(rel) = e.path().strip_prefix(root) else { continue };
            let rel = rel.to_string_lossy().into_owned();
            let Ok(meta) = e.metadata() else { continue };
            out.push(Listed {
                name: rel.get(strip..).unwrap_or_default().to_string(),
                modified_ms: meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000,
                size: meta.size(),
            });
        }
        out
    }
}
