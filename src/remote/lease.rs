//! Deploy leases: at most one runner deploys a stage to an environment at a time.
//!
//! A lease is an object taken by a conditional create (or by swapping out a released or expired one), renewed
//! by its holder every third of its lifetime, and released by a last swap. Expiry is judged on the waiter's
//! own monotonic clock: a lease is expired once the waiter has seen the same version of it for the whole
//! lifetime, so clocks that disagree between machines cannot end a live lease early.

use super::protocol::{self, Lease};
use super::{Remote, store};
use crate::cache::now_ms;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "`{stage}` in `{env}` is being deployed by {holder} (the remote's deploy lease); waited {} s\n  hint: raise --lock-timeout, or wait for that deploy to end",
        waited.as_secs()
    )]
    Held { stage: String, env: String, holder: String, waited: Duration },
    /// The store answers but will not let us take the lease (permissions): deploying anyway would be
    /// deploying without it.
    #[error(
        "not deployed: the remote `{url}` refused the deploy lease of `{stage}` in `{env}`: {why}\n  hint: the writer role needs to read and write `leases/` (docs/remote.md), or pass `--remote off` to deploy without the lease"
    )]
    Refused { url: String, stage: String, env: String, why: String },
}

/// What the waiter knows about someone else's lease.
struct Seen {
    version: store::Version,
    since: Instant,
}

impl Remote {
    /// Take the deploy lease of `stage` in `env`, waiting up to `timeout` for its holder (`waiting` is told
    /// whom, once; `stop` ends the wait early). `Ok(None)`: the store did not answer (warned; the deploy
    /// goes on under the local run lock, as without a remote).
    pub fn acquire(
        &self,
        stage: &str,
        env: &str,
        timeout: Duration,
        waiting: &mut dyn FnMut(&str),
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<LeaseGuard>, LeaseError> {
        let name = protocol::lease(env, stage);
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).expect("the operating system's random source");
        let mine = Lease {
            holder: id.iter().map(|b| format!("{b:02x}")).collect(),
            who: self.who.clone(),
            expires_ms: 0,
            released: false,
        };
        let deadline = Instant::now() + timeout;
        let mut seen: Option<Seen> = None;
        let mut told = false;
        let unreachable = |e: store::Error| match e {
            store::Error::Unreachable(_) => {
                self.failed("the deploy lease", e);
                Ok(None)
            }
            store::Error::Refused(why) => {
                Err(LeaseError::Refused { url: self.url.clone(), stage: stage.into(), env: env.into(), why })
            }
        };
        loop {
            let current = match self.store.get(&name) {
                Ok(c) => c,
                Err(e) => return unreachable(e),
            };
            let holder = match &current {
                None => None,
                Some((bytes, version)) => self.live_holder(bytes, version, &mut seen),
            };
            if holder.is_none() {
                let lease = Lease { expires_ms: now_ms() + self.lease_ttl.as_millis() as i64, ..mine.clone() };
                let bytes = serde_json::to_vec(&lease).expect("serializable");
                match self.store.put_if(&name, bytes, current.as_ref().map(|(_, v)| v)) {
                    Ok(Some(version)) => {
                        return Ok(Some(LeaseGuard::start(self.store.clone(), name, lease, version, self.lease_ttl)));
                    }
                    // Another runner was first: look again.
                    Ok(None) => {}
                    Err(e) => return unreachable(e),
                }
            }
            let who = holder.unwrap_or_else(|| "another runner".into());
            if Instant::now() >= deadline || stop() {
                let waited = if stop() { Duration::ZERO } else { timeout };
                return Err(LeaseError::Held { stage: stage.into(), env: env.into(), holder: who, waited });
            }
            if !told {
                waiting(&who);
                told = true;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Who holds the lease stored as `bytes` (at `version`), if it is live: not released, and renewed within
    /// its lifetime as this runner has watched it. Unreadable leases count as released.
    fn live_holder(&self, bytes: &[u8], version: &store::Version, seen: &mut Option<Seen>) -> Option<String> {
        let lease: Lease = serde_json::from_slice(bytes).ok()?;
        if lease.released {
            return None;
        }
        match seen {
            Some(s) if &s.version == version => (s.since.elapsed() < self.lease_ttl).then_some(lease.who),
            _ => {
                *seen = Some(Seen { version: version.clone(), since: Instant::now() });
                Some(lease.who)
            }
        }
    }
}

/// A held deploy lease: renewed in the background, released when dropped.
pub struct LeaseGuard {
    stop: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl LeaseGuard {
    fn start(
        store: Arc<store::Store>,
        name: String,
        lease: Lease,
        version: store::Version,
        ttl: Duration,
    ) -> LeaseGuard {
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let (flag, lost_flag) = (stop.clone(), lost.clone());
        let renewer = std::thread::spawn(move || {
            let (mut lease, mut version) = (lease, version);
            let mut next = Instant::now() + ttl / 3;
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if Instant::now() < next {
                    continue;
                }
                lease.expires_ms = now_ms() + ttl.as_millis() as i64;
                match store.put_if_always(&name, serde_json::to_vec(&lease).expect("serializable"), Some(&version)) {
                    Ok(Some(v)) => {
                        version = v;
                        next = Instant::now() + ttl / 3;
                    }
                    // Someone else swapped it: it expired for them. Stop renewing; the deploy is told.
                    Ok(None) => {
                        lost_flag.store(true, Ordering::Relaxed);
                        return;
                    }
                    // The store did not answer: try again soon, there is time left.
                    Err(_) => next = Instant::now() + Duration::from_secs(1).min(ttl / 3),
                }
            }
            lease.released = true;
            let _ = store.put_if_always(&name, serde_json::to_vec(&lease).expect("serializable"), Some(&version));
        });
        LeaseGuard { stop, lost, renewer: Some(renewer) }
    }

    /// Whether another runner took the lease over while it was held (it could not be renewed in time).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.renewer.take() {
            let _ = h.join();
        }
    }
}
