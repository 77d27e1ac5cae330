//! The shared cache and deploy ledger on the team's object store (`[remote]`, docs/remote.md).
//!
//! The local cache stays the first level: the scheduler asks the remote only when the local cache misses (a
//! check stage), or before it would deploy (a deploy stage). What the remote says is learned into the local
//! cache through the cache's one write API and then decided on like everything else, so `fresh::decide` is
//! still the only place a stage is found fresh, and a remote entry restores only what its stage declares.
//!
//! Nothing here ever fails a run: an unreachable store, an untrusted or tampered object is a warning and a
//! miss. What is believed was signed by a trusted key and every byte restored from it verified its BLAKE3.

pub(crate) mod admin;
mod lease;
pub(crate) mod protocol;
pub(crate) mod review;
mod share;

use crate::pipeline::RemoteSpec;
use crate::sign::{PrivateKey, PublicKey};
use crate::store::{self, Store};
pub(crate) use lease::{LeaseError, LeaseGuard};
pub(crate) use share::Fetched;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The variable that overrides `[remote] url` (or, set to `off`, disables the remote).
pub(crate) const REMOTE_VAR: &str = "KKPIPE_REMOTE";
/// The variable that holds the writer's private key.
pub(crate) const SIGNING_KEY_VAR: &str = "KKPIPE_SIGNING_KEY";

/// `--remote`: lower what the configuration allows, never raise it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Lower {
    ReadOnly,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Mode {
    Off,
    ReadOnly,
    ReadWrite,
}

impl Mode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::ReadOnly => "read-only",
            Mode::ReadWrite => "read-write",
        }
    }
}

/// Why the remote is in its mode: the first rule that applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    NotConfigured,
    EnvOff,
    FlagOff,
    PullRequest,
    FlagReadOnly,
    NoSigningKey,
    /// KKPIPE_SIGNING_KEY's public key is not in `trusted_keys`: what it wrote would be believed by no one,
    /// its failed deploys seen by no one.
    UntrustedSigningKey,
    SigningKey,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Why::NotConfigured => "no `[remote] url` in pipeline.toml and no KKPIPE_REMOTE",
            Why::EnvOff => "KKPIPE_REMOTE=off",
            Why::FlagOff => "--remote off",
            // A run's mode: `preview` stores its reviewed plans whatever the mode (docs/remote.md).
            Why::PullRequest => "a pull_request event never writes",
            Why::FlagReadOnly => "--remote read-only",
            Why::NoSigningKey => "KKPIPE_SIGNING_KEY is not set",
            Why::UntrustedSigningKey => "KKPIPE_SIGNING_KEY's public key is not in `[remote] trusted_keys`",
            Why::SigningKey => "KKPIPE_SIGNING_KEY is set",
        })
    }
}

/// The remote this invocation uses, before anything is contacted.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub url: Option<String>,
    pub mode: Mode,
    pub why: Why,
    pub signer: Option<PrivateKey>,
}

/// Work out the URL and mode from `[remote]`, the environment, `--remote` and the event. A malformed
/// `KKPIPE_SIGNING_KEY` is an error: silently reading only would hide a broken secret.
pub(crate) fn resolve(
    spec: Option<&RemoteSpec>,
    env: &HashMap<String, String>,
    lower: Option<Lower>,
    pull_request: bool,
) -> Result<Resolved, String> {
    let off = |why| Ok(Resolved { url: None, mode: Mode::Off, why, signer: None });
    let url = match env.get(REMOTE_VAR).map(|v| v.trim()).filter(|v| !v.is_empty()) {
        Some("off") => return off(Why::EnvOff),
        Some(u) => u.to_string(),
        None => match spec.and_then(|s| s.url.clone()) {
            Some(u) => u,
            None => return off(Why::NotConfigured),
        },
    };
    if lower == Some(Lower::Off) {
        return off(Why::FlagOff);
    }
    let signer = match env.get(SIGNING_KEY_VAR).filter(|v| !v.trim().is_empty()) {
        Some(text) => Some(PrivateKey::parse(text).map_err(|e| format!("{SIGNING_KEY_VAR} {e}"))?),
        None => None,
    };
    let read_only = |why| Ok(Resolved { url: Some(url.clone()), mode: Mode::ReadOnly, why, signer: None });
    match (pull_request, lower, signer) {
        (true, _, _) => read_only(Why::PullRequest),
        (_, Some(Lower::ReadOnly), _) => read_only(Why::FlagReadOnly),
        (_, _, None) => read_only(Why::NoSigningKey),
        (_, _, Some(k)) => {
            Ok(Resolved { url: Some(url), mode: Mode::ReadWrite, why: Why::SigningKey, signer: Some(k) })
        }
    }
}

/// An open remote. Warnings are collected for the caller to show, once each.
pub(crate) struct Remote {
    pub url: String,
    pub mode: Mode,
    pub why: Why,
    store: Store,
    trusted: Vec<PublicKey>,
    clock: Arc<dyn crate::clock::Clock>,
    signer: Option<PrivateKey>,
    lease_ttl: Duration,
    who: String,
    commit: Option<String>,
    /// This run's audit fields, carried by every ledger record it writes.
    audit: Mutex<crate::fresh::Audit>,
    warnings: Mutex<Vec<String>>,
    /// Stages whose local record this runner published as the ledger's first (`take_published`).
    published: Mutex<Vec<String>>,
    warned_down: AtomicBool,
}

/// How a check stage's local miss went on the remote.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pulled {
    /// A trusted entry with verified contents is now in the local cache.
    Imported,
    Miss,
}

impl Remote {
    pub(crate) fn open(
        r: Resolved,
        spec: Option<&RemoteSpec>,
        env: &HashMap<String, String>,
        root: &std::path::Path,
        commit: Option<String>,
    ) -> Result<Option<Remote>, String> {
        let Some(url) = r.url else { return Ok(None) };
        let parsed = url::Url::parse(&url).map_err(|e| format!("the remote URL `{url}` is not a URL: {e}"))?;
        let opening = store::Opening { env, root };
        let store = store::open(&parsed, &opening).map_err(|e| format!("cannot open the remote `{url}`: {e}"))?;
        let user = env.get("USER").cloned().unwrap_or_else(|| "unknown".into());
        let trusted = spec.map(|s| s.trusted_keys.clone()).unwrap_or_default();
        let (mut mode, mut why, mut signer) = (r.mode, r.why, r.signer);
        let mut warnings = Vec::new();
        if let Some(k) = &signer
            && !trusted.contains(&k.public())
        {
            warnings.push(format!(
                "the public key of {SIGNING_KEY_VAR} ({}) is not in `[remote] trusted_keys`: using the remote `{url}` \
                 read-only (add the key, or use the one it lists)",
                k.public()
            ));
            (mode, why, signer) = (Mode::ReadOnly, Why::UntrustedSigningKey, None);
        }
        let remote = Remote {
            url,
            mode,
            why,
            store,
            trusted,
            clock: Arc::new(crate::clock::System),
            signer,
            lease_ttl: spec.map_or(RemoteSpec::DEFAULT_LEASE, |s| s.lease),
            who: format!("{user}@{}", crate::cache::hostname()),
            commit,
            audit: Mutex::default(),
            warnings: Mutex::new(warnings),
            published: Mutex::default(),
            warned_down: AtomicBool::new(false),
        };
        Ok(Some(remote))
    }

    /// A writable remote on `store` trusting nobody, for unit tests of leases and sharing.
    #[cfg(test)]
    pub(crate) fn for_tests(
        store: Arc<dyn store::ObjectStore>,
        clock: Arc<dyn crate::clock::Clock>,
        lease_ttl: Duration,
        who: &str,
    ) -> Remote {
        Remote {
            url: "memory://".into(),
            mode: Mode::ReadWrite,
            why: Why::SigningKey,
            store: Store::new(store),
            trusted: Vec::new(),
            clock,
            signer: Some(PrivateKey::generate()),
            lease_ttl,
            who: who.into(),
            commit: None,
            audit: Mutex::default(),
            warnings: Mutex::new(Vec::new()),
            published: Mutex::default(),
            warned_down: AtomicBool::new(false),
        }
    }

    /// The same remote, signing with `key` and trusting it (runners of one team, for unit tests of sharing).
    #[cfg(test)]
    pub(crate) fn signing_with(mut self, key: &PrivateKey) -> Remote {
        self.trusted = vec![key.public()];
        self.signer = Some(PrivateKey::parse(&key.to_text()).expect("a key parses back"));
        self
    }

    /// The audit fields the ledger records written from now on carry.
    pub(crate) fn set_audit(&self, audit: crate::fresh::Audit) {
        *self.audit.lock().unwrap_or_else(|e| e.into_inner()) = audit;
    }

    pub(crate) fn writable(&self) -> bool {
        self.signer.is_some()
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    fn warn(&self, w: String) {
        self.warnings.lock().expect("warnings").push(w);
    }

    /// Stages whose record from this cache was published since the last call (the ledger had none).
    pub(crate) fn take_published(&self) -> Vec<String> {
        std::mem::take(&mut *self.published.lock().expect("published"))
    }

    /// Warnings since the last call, for the caller to show.
    pub(crate) fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut *self.warnings.lock().expect("warnings"))
    }

    /// A store error: the first "unreachable" is one warning naming the remote; refusals are each a warning.
    fn failed(&self, what: &str, e: store::Error) {
        match e {
            store::Error::Unreachable(m) => {
                if !self.warned_down.swap(true, Ordering::Relaxed) {
                    self.warn(format!(
                        "the remote `{}` did not answer ({m}); working locally for the rest of this run",
                        self.url
                    ));
                }
            }
            store::Error::Refused(m) => self.warn(format!("the remote `{}` refused {what}: {m}", self.url)),
        }
    }

    fn refused(&self, what: &str, why: impl std::fmt::Display) {
        self.warn(format!("ignored {what} on the remote `{}`: {why}; treated as a miss", self.url));
    }

    /// The signed object at `name`, checked; `None` (with a warning when it exists) otherwise.
    fn read<T: protocol::Signed>(&self, name: &str, what: &str) -> Option<(T, store::Version)> {
        match self.store.get(name) {
            Ok(None) => None,
            Ok(Some((bytes, version))) => match protocol::open::<T>(&bytes, &self.trusted) {
                Ok(body) => Some((body, version)),
                Err(why) => {
                    self.refused(what, why);
                    None
                }
            },
            Err(e) => {
                self.failed(what, e);
                None
            }
        }
    }
}
