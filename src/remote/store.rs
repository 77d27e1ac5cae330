//! The object store, seen synchronously: get, create-only put, compare-and-swap put, list, delete.
//!
//! S3 and GCS go through the `object_store` crate on a small tokio runtime built only when a remote is
//! configured; `file://` is a directory (create-only by `link(2)`, compare-and-swap under `flock`), for tests
//! and shared disks. Every request is bounded by a timeout; the first failure to reach the store marks it down
//! for the rest of the invocation, so an unreachable store costs one timeout and one warning, not one per stage.

use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion, path::Path as Key};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long one request may take, retries included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

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
    Object { store: Arc<dyn ObjectStore>, rt: tokio::runtime::Runtime },
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
        "s3" | "s3a" | "gs" => {
            let client = object_store::ClientOptions::new()
                .with_timeout(REQUEST_TIMEOUT)
                .with_connect_timeout(CONNECT_TIMEOUT)
                .with_allow_http(env.get("AWS_ALLOW_HTTP").is_some_and(|v| v.eq_ignore_ascii_case("true")));
            let retry =
                object_store::RetryConfig { max_retries: 2, retry_timeout: REQUEST_TIMEOUT, ..Default::default() };
            let bucket = url.host_str().ok_or_else(|| format!("`{url}` names no bucket"))?;
            let store: Arc<dyn ObjectStore> = if url.scheme() == "gs" {
                let mut b = object_store::gcp::GoogleCloudStorageBuilder::new();
                for (k, v) in env.iter().filter(|(k, _)| k.starts_with("GOOGLE_")) {
                    if let Ok(key) = k.to_ascii_lowercase().parse() {
                        b = b.with_config(key, v);
                    }
                }
                Arc::new(
                    b.with_bucket_name(bucket)
                        .with_client_options(client)
                        .with_retry(retry)
                        .build()
                        .map_err(|e| e.to_string())?,
                )
            } else {
                let mut b = object_store::aws::AmazonS3Builder::new();
                for (k, v) in env.iter().filter(|(k, _)| k.starts_with("AWS_")) {
                    if let Ok(key) = k.to_ascii_lowercase().parse() {
                        b = b.with_config(key, v);
                    }
                }
                Arc::new(
                    b.with_bucket_name(bucket)
                        .with_client_options(client)
                        .with_retry(retry)
                        .build()
                        .map_err(|e| e.to_string())?,
                )
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("kkpipe-remote")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the remote's runtime: {e}"))?;
            Backend::Object { store, rt }
        }
        other => return Err(format!("`{other}://` is not a remote kkpipe knows; use s3://, gs:// or file://")),
    };
    Ok(Store { backend, prefix, down: AtomicBool::new(false) })
}

fn classify(e: object_store::Error) -> Error {
    match e {
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. } => {
            Error::Unreachable(e.to_string())
        }
        e if e.to_string().contains("error sending request") || e.to_string().contains("onnect") => {
            Error::Unreachable(e.to_string())
        }
        e => Error::Refused(e.to_string()),
    }
}

impl Store {
    fn key(&self, name: &str) -> Key {
        match self.prefix.is_empty() {
            true => Key::from(name),
            false => Key::from(format!("{}/{name}", self.prefix)),
        }
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Run one request with the timeout; an unreachable store is marked down.
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

    fn block<T>(rt: &tokio::runtime::Runtime, fut: impl Future<Output = object_store::Result<T>>) -> Result<T> {
        rt.block_on(async {
            match tokio::time::timeout(REQUEST_TIMEOUT + CONNECT_TIMEOUT, fut).await {
                Ok(r) => r.map_err(classify),
                Err(_) => Err(Error::Unreachable(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))),
            }
        })
    }

    /// An object's bytes and version; `None` when there is none.
    pub fn get(&self, name: &str) -> Result<Option<(Vec<u8>, Version)>> {
        let key = self.key(name);
        self.call(|b| match b {
            Backend::Object { store, rt } => Self::block(rt, async {
                let got = match store.get(&key).await {
                    Ok(g) => g,
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(e),
                };
                let v = Version { e_tag: got.meta.e_tag.clone(), version: got.meta.version.clone() };
                Ok(Some((got.bytes().await?.to_vec(), v)))
            }),
            Backend::Dir(root) => dir::get(&root.join(key.as_ref())),
        })
    }

    pub fn exists(&self, name: &str) -> Result<bool> {
        let key = self.key(name);
        self.call(|b| match b {
            Backend::Object { store, rt } => Self::block(rt, async {
                match store.head(&key).await {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(e) => Err(e),
                }
            }),
            Backend::Dir(root) => Ok(root.join(key.as_ref()).exists()),
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
            Backend::Object { store, rt } => {
                let mode = match expected {
                    None => PutMode::Create,
                    Some(v) => PutMode::Update(UpdateVersion { e_tag: v.e_tag.clone(), version: v.version.clone() }),
                };
                let opts = PutOptions { mode, ..Default::default() };
                Self::block(rt, async {
                    match store.put_opts(&key, PutPayload::from(bytes), opts).await {
                        Ok(r) => Ok(Some(Version { e_tag: r.e_tag, version: r.version })),
                        Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                            Ok(None)
                        }
                        Err(e) => Err(e),
                    }
                })
            }
            Backend::Dir(root) => dir::put_if(&root.join(key.as_ref()), &bytes, expected),
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
            Backend::Object { store, rt } => Self::block(rt, async {
                let mut out = Vec::new();
                let mut s = store.list(Some(&key));
                while let Some(m) = s.next().await {
                    let m = m?;
                    out.push(Listed {
                        name: m.location.as_ref()[strip..].to_string(),
                        modified_ms: m.last_modified.timestamp_millis(),
                        size: m.size,
                    });
                }
                Ok(out)
            }),
            Backend::Dir(root) => Ok(dir::list(root, &root.join(key.as_ref()), strip)),
        })
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        let key = self.key(name);
        self.call(|b| match b {
            Backend::Object { store, rt } => Self::block(rt, async {
                match store.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e),
                }
            }),
            Backend::Dir(root) => match std::fs::remove_file(root.join(key.as_ref())) {
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
