//! The object store behind one trait: get, create-only put, compare-and-swap put, list, delete. The shared
//! remote (`crate::remote`) keeps its protocol on top of it.
//!
//! Every backend is one file implementing [`ObjectStore`] over names relative to the remote's root (its URL's
//! prefix is the backend's business): S3 through the `object_store` crate (`object.rs`), GCS through its JSON
//! API (`gcs.rs`; both the default cargo feature `s3-gcs`), a directory for `file://` (`dir.rs`: shared disks
//! and tests), memory (`memory.rs`: unit tests of leases and sharing), and refs in a git remote for `git:`
//! (`git.rs`). [`SCHEMES`] is the one list of URL schemes. [`Store`] is
//! what the rest of kkpipe holds: any backend, marked down after the first failure to reach it, so an
//! unreachable store costs one timeout and one warning, not one per stage.
//!
//! Adding a backend: a file here implementing [`ObjectStore`] (with its tests), and a row in [`SCHEMES`].

mod dir;
#[cfg(feature = "s3-gcs")]
mod gcs;
mod git;
pub mod memory;
#[cfg(feature = "s3-gcs")]
mod object;

use std::collections::HashMap;
use std::sync::Arc;
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

/// An object's version, for compare-and-swap: whatever the backend compares (an ETag, a generation, a
/// content hash, a counter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub(crate) e_tag: Option<String>,
    pub(crate) version: Option<String>,
}

impl Version {
    pub(crate) fn tag(tag: String) -> Version {
        Version { e_tag: Some(tag), version: None }
    }
}

/// One listed object.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Relative to the remote's root, `/`-separated.
    pub name: String,
    pub modified_ms: i64,
    pub size: u64,
}

/// What a remote store does. Names are relative to the remote's root; a miss is `Ok(None)`, never an error.
pub trait ObjectStore: Send + Sync {
    /// An object's bytes and version; `None` when there is none.
    fn get(&self, name: &str) -> Result<Option<(Vec<u8>, Version)>>;

    /// Write `bytes` only if `expected` is the object's version now (`None`: only if there is no object).
    /// Returns the new version, or `None` when another writer was first.
    fn put_if(&self, name: &str, bytes: Vec<u8>, expected: Option<&Version>) -> Result<Option<Version>>;

    /// Every object below `under`.
    fn list(&self, under: &str) -> Result<Vec<Listed>>;

    /// Remove an object (absent is fine).
    fn delete(&self, name: &str) -> Result<()>;

    fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.get(name)?.is_some())
    }
}

/// What a backend is opened with: the caller's environment (the stores' standard variables, `AWS_*` and
/// `GOOGLE_*`) and the repository's root (a `git:` remote's name is the checkout's).
pub struct Opening<'a> {
    pub env: &'a HashMap<String, String>,
    pub root: &'a std::path::Path,
}

/// Opens a backend for a URL.
type Opener = fn(&url::Url, &Opening) -> std::result::Result<Arc<dyn ObjectStore>, String>;

/// A URL scheme kkpipe knows, and how to open it.
pub struct Scheme {
    pub name: &'static str,
    /// How its URLs start, for messages.
    pub form: &'static str,
    /// Whether a pull request's job may write the reviews it showed (docs/review.md): not on `git:`, where a
    /// pull request writes no ref.
    pub reviews: bool,
    open: Opener,
}

/// The one list of remote URL schemes (pipeline.toml's check and `open` both read it).
pub const SCHEMES: &[Scheme] = &[
    Scheme { name: "s3", form: "s3://", reviews: true, open: open_object },
    Scheme { name: "s3a", form: "s3a://", reviews: true, open: open_object },
    Scheme { name: "gs", form: "gs://", reviews: true, open: open_gcs },
    Scheme { name: "file", form: "file://", reviews: true, open: |url, _| Ok(Arc::new(dir::Dir::open(url)?)) },
    Scheme { name: "git", form: "git:", reviews: false, open: |url, o| Ok(Arc::new(git::Git::open(url, o)?)) },
];

#[cfg(feature = "s3-gcs")]
fn open_object(url: &url::Url, o: &Opening) -> std::result::Result<Arc<dyn ObjectStore>, String> {
    Ok(Arc::new(object::Client::open(url, o.env)?))
}

#[cfg(feature = "s3-gcs")]
fn open_gcs(url: &url::Url, o: &Opening) -> std::result::Result<Arc<dyn ObjectStore>, String> {
    Ok(Arc::new(gcs::Gcs::open(url, o.env)?))
}

#[cfg(not(feature = "s3-gcs"))]
fn open_object(_: &url::Url, _: &Opening) -> std::result::Result<Arc<dyn ObjectStore>, String> {
    Err("this kkpipe was built without S3 and GCS support (the cargo feature `s3-gcs`)".into())
}

#[cfg(not(feature = "s3-gcs"))]
use open_object as open_gcs;

/// The prefix a bucket URL keeps its objects under: its path, percent-decoded, without slashes around it
/// (`s3://b/team%20a/` -> `team a`), so that it is the prefix an IAM policy names.
#[cfg(feature = "s3-gcs")]
fn prefix_of(url: &url::Url) -> String {
    percent_encoding::percent_decode_str(url.path()).decode_utf8_lossy().trim_matches('/').to_string()
}

/// The small runtime an HTTP backend drives its requests on, one worker.
#[cfg(feature = "s3-gcs")]
fn runtime() -> std::result::Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("kkpipe-remote")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the remote's runtime: {e}"))
}

/// reqwest's error with its causes (the connection refused, the timeout): what a user needs to act on.
#[cfg(feature = "s3-gcs")]
pub(crate) fn http_error(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

/// `s3://, s3a://, gs://, file:// or git:`, for messages.
pub fn scheme_list() -> String {
    let names: Vec<String> = SCHEMES.iter().map(|s| s.form.to_string()).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.join(""),
    }
}

pub fn known_scheme(scheme: &str) -> bool {
    SCHEMES.iter().any(|s| s.name == scheme)
}

/// The scheme of `url`, if kkpipe knows it.
pub fn scheme_of(url: &url::Url) -> Option<&'static Scheme> {
    SCHEMES.iter().find(|s| s.name == url.scheme())
}

/// The store for `url`.
pub fn open(url: &url::Url, o: &Opening) -> std::result::Result<Store, String> {
    let scheme = scheme_of(url)
        .ok_or_else(|| format!("`{}://` is not a remote kkpipe knows; use {}", url.scheme(), scheme_list()))?;
    Ok(Store::new((scheme.open)(url, o)?))
}

/// A backend, marked down after the first failure to reach it: every later request fails at once.
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    down: AtomicBool,
}

impl Store {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Store {
        Store { inner, down: AtomicBool::new(false) }
    }

    /// The store answered after all (a deploy lease was taken from the backend itself): count it up again.
    pub fn revive(&self) {
        self.down.store(false, Ordering::Relaxed);
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Run one request; an unreachable store is marked down.
    fn call<T>(&self, f: impl FnOnce(&dyn ObjectStore) -> Result<T>) -> Result<T> {
        if self.is_down() {
            return Err(Error::Unreachable("the remote did not answer earlier in this run".into()));
        }
        let r = f(self.inner.as_ref());
        if let Err(Error::Unreachable(_)) = &r {
            self.down.store(true, Ordering::Relaxed);
        }
        r
    }

    pub fn get(&self, name: &str) -> Result<Option<(Vec<u8>, Version)>> {
        self.call(|s| s.get(name))
    }

    pub fn exists(&self, name: &str) -> Result<bool> {
        self.call(|s| s.exists(name))
    }

    /// See [`ObjectStore::put_if`].
    pub fn put_if(&self, name: &str, bytes: Vec<u8>, expected: Option<&Version>) -> Result<Option<Version>> {
        self.call(|s| s.put_if(name, bytes, expected))
    }

    /// The backend itself, not marked down: a held deploy lease keeps being renewed (and is released) for as
    /// long as the store may come back.
    pub fn always(&self) -> Arc<dyn ObjectStore> {
        self.inner.clone()
    }

    pub fn list(&self, under: &str) -> Result<Vec<Listed>> {
        self.call(|s| s.list(under))
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        self.call(|s| s.delete(name))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "s3-gcs")]
    #[test]
    fn a_bucket_prefix_is_the_path_as_typed() {
        let p = |u: &str| prefix_of(&url::Url::parse(u).unwrap());
        assert_eq!(p("gs://b/team a/kkpipé/"), "team a/kkpipé");
        assert_eq!(p("s3://b/kkpipe?region=eu-central-1"), "kkpipe");
        assert_eq!(p("s3://b"), "");
    }

    #[test]
    fn the_scheme_list_names_every_scheme_once() {
        assert_eq!(scheme_list(), "s3://, s3a://, gs://, file:// or git:");
        assert!(known_scheme("gs") && known_scheme("git") && !known_scheme("http"));
        let o = Opening { env: &HashMap::new(), root: std::path::Path::new(".") };
        let e = open(&url::Url::parse("ftp://x/y").unwrap(), &o).err().unwrap();
        assert!(e.contains("`ftp://` is not a remote") && e.contains("file://"), "{e}");
    }

    /// A backend that fails to answer once is not asked again in this invocation.
    #[test]
    fn a_store_that_did_not_answer_is_down_for_the_rest_of_the_invocation() {
        struct Flaky(std::sync::atomic::AtomicUsize);
        impl ObjectStore for Flaky {
            fn get(&self, _: &str) -> Result<Option<(Vec<u8>, Version)>> {
                self.0.fetch_add(1, Ordering::Relaxed);
                Err(Error::Unreachable("connection refused".into()))
            }
            fn put_if(&self, _: &str, _: Vec<u8>, _: Option<&Version>) -> Result<Option<Version>> {
                Ok(None)
            }
            fn list(&self, _: &str) -> Result<Vec<Listed>> {
                Ok(Vec::new())
            }
            fn delete(&self, _: &str) -> Result<()> {
                Ok(())
            }
        }
        let flaky = Arc::new(Flaky(Default::default()));
        let store = Store::new(flaky.clone());
        assert!(store.get("a").is_err() && store.get("b").is_err() && store.list("").is_err());
        assert_eq!(flaky.0.load(Ordering::Relaxed), 1, "asked once");
        assert!(store.is_down());
        // The lease's renewer still reaches the backend itself.
        assert!(store.always().put_if("lease", b"x".to_vec(), None).is_ok());
    }
}
