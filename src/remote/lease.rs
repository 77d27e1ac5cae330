//! Deploy leases: at most one runner deploys a stage to an environment at a time.
//!
//! A lease is an object taken by a conditional create (or by swapping out a released or expired one), renewed
//! by its holder every third of its lifetime, and released by a last swap. Expiry is judged on the waiter's
//! own monotonic clock: a lease is expired once the waiter has seen the same version of it for the whole
//! lifetime, so clocks that disagree between machines cannot end a live lease early. The lease carries its
//! holder's lifetime and a waiter honours the longer of that and its own, so runners configured with
//! different `lease_seconds` never judge each other's leases by the shorter one.

use super::Remote;
use super::protocol::{self, Lease};
use crate::clock::Clock;
use crate::store;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub(crate) enum LeaseError {
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
    /// The store stopped answering while another runner held the lease: that runner may be deploying.
    #[error(
        "not deployed: the remote `{url}` stopped answering while {holder} held the deploy lease of `{stage}` in `{env}` ({why}); it may still be deploying\n  hint: run again once the store answers, or pass `--remote off` to deploy without the lease once you know it is not"
    )]
    LostSight { url: String, stage: String, env: String, holder: String, why: String },
    /// The store did not answer: whether another runner holds the lease is unknown, so the deploy fails closed,
    /// as terraform does when it cannot take its state lock.
    #[error(
        "not deployed: the remote `{url}` did not answer when `{stage}` in `{env}` needed its deploy lease ({why}): another runner may be deploying it\n  hint: run again once the store answers, or pass `--remote off` to deploy without the lease once you know no one else is"
    )]
    Unreachable { url: String, stage: String, env: String, why: String },
}

/// What the waiter knows about someone else's lease.
struct Seen {
    version: store::Version,
    since: Instant,
}

/// How often a waiter looks at the lease again.
const POLL: Duration = Duration::from_millis(250);

/// The longest lifetime a waiter honours from a lease it finds: a lease is not signed, and one planted with an
/// endless lifetime must not block deploys for good (it still takes a day, or ten of our own lifetimes).
const HONOURED_AT_MOST: Duration = Duration::from_secs(24 * 3600);

impl Remote {
    /// Take the deploy lease of `stage` in `env`, waiting up to `timeout` for its holder (`waiting` is told
    /// whom, once; `stop` ends the wait early). Every failure is an error: a deploy never goes on without it.
    /// Taken, the store answered: it is counted up again for the rest of the run (the ledger is read and
    /// written next).
    pub(crate) fn acquire(
        &self,
        stage: &str,
        env: &str,
        timeout: Duration,
        waiting: &mut dyn FnMut(&str),
        stop: &dyn Fn() -> bool,
    ) -> Result<LeaseGuard, LeaseError> {
        let name = protocol::lease(env, stage);
        let clock = self.clock.as_ref();
        // `None`: no deadline that a clock can represent (a --lock-timeout of centuries).
        let deadline = clock.now().checked_add(timeout);
        let mut seen: Option<Seen> = None;
        let mut told: Option<String> = None;
        // The backend itself, not marked down: a request of another stage that failed meanwhile says nothing
        // about this lease, and the wait must know the lease's fate first-hand.
        let backend = self.store.always();
        let failed = |e, told: &Option<String>| self.lease_failed(e, stage, env, told.clone());
        let mine = self.new_lease();
        loop {
            let current = match backend.get(&name) {
                Ok(c) => c,
                Err(e) => return failed(e, &told),
            };
            let holder = match &current {
                None => None,
                Some((bytes, version)) => live_holder(bytes, version, &mut seen, self.lease_ttl, clock),
            };
            if holder.is_none() && !stop() {
                let lease = Lease { expires_ms: clock.wall_ms() + mine.ttl_ms, ..mine.clone() };
                let bytes = serde_json::to_vec(&lease).expect("serializable");
                match backend.put_if(&name, bytes, current.as_ref().map(|(_, v)| v)) {
                    Ok(Some(version)) => {
                        let held = Held { store: backend, name, lease, version, clock: self.clock.clone() };
                        self.store.revive();
                        return Ok(LeaseGuard::start(held, self.lease_ttl));
                    }
                    // Another runner was first: look again.
                    Ok(None) => {}
                    Err(e) => return failed(e, &told),
                }
            }
            let who = holder.unwrap_or_else(|| "another runner".into());
            if deadline.is_some_and(|d| clock.now() >= d) || stop() {
                let waited = if stop() { Duration::ZERO } else { timeout };
                return Err(LeaseError::Held { stage: stage.into(), env: env.into(), holder: who, waited });
            }
            if told.is_none() {
                waiting(&who);
                told = Some(who);
            }
            clock.sleep(POLL);
        }
    }

    /// This runner's lease, with a random holder id.
    fn new_lease(&self) -> Lease {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).expect("the operating system's random source");
        Lease {
            holder: id.iter().map(|b| format!("{b:02x}")).collect(),
            who: self.who.clone(),
            expires_ms: 0,
            released: false,
            ttl_ms: self.lease_ttl.as_millis() as i64,
        }
    }

    /// What a store error means for a lease wait: the deploy fails closed. A refusal (permissions) and a store
    /// that does not answer both leave it unknown whether another runner is deploying.
    fn lease_failed(
        &self,
        e: store::Error,
        stage: &str,
        env: &str,
        holder: Option<String>,
    ) -> Result<LeaseGuard, LeaseError> {
        let (url, stage, env) = (self.url.clone(), stage.to_string(), env.to_string());
        match (e, holder) {
            (store::Error::Refused(why), _) => Err(LeaseError::Refused { url, stage, env, why }),
            (store::Error::Unreachable(why), Some(holder)) => {
                Err(LeaseError::LostSight { url, stage, env, holder, why })
            }
            (store::Error::Unreachable(why), None) => {
                self.failed("the deploy lease", store::Error::Unreachable(why.clone()));
                Err(LeaseError::Unreachable { url, stage, env, why })
            }
        }
    }
}

/// Who holds the lease stored as `bytes` (at `version`), if it is live: not released, and renewed within the
/// longer of its own lifetime and `ttl` as this runner has watched it. Unreadable leases count as released.
fn live_holder(
    bytes: &[u8],
    version: &store::Version,
    seen: &mut Option<Seen>,
    ttl: Duration,
    clock: &dyn Clock,
) -> Option<String> {
    let lease: Lease = serde_json::from_slice(bytes).ok()?;
    if lease.released {
        return None;
    }
    let theirs = Duration::from_millis(lease.ttl_ms.max(0) as u64).min(HONOURED_AT_MOST.max(ttl * 10));
    let lifetime = ttl.max(theirs);
    match seen {
        Some(s) if &s.version == version => (clock.now().duration_since(s.since) < lifetime).then_some(lease.who),
        _ => {
            *seen = Some(Seen { version: version.clone(), since: clock.now() });
            Some(lease.who)
        }
    }
}

/// A lease this runner holds, as the renewer keeps it.
struct Held {
    store: Arc<dyn store::ObjectStore>,
    name: String,
    lease: Lease,
    version: store::Version,
    clock: Arc<dyn Clock>,
}

/// How one renewal went.
#[derive(Debug, PartialEq, Eq)]
enum Renewed {
    Yes,
    /// Someone else swapped it: it expired for them.
    Lost,
    /// The store did not answer: try again soon, there is time left.
    NoAnswer,
}

impl Held {
    fn renew(&mut self, ttl: Duration) -> Renewed {
        self.lease.expires_ms = self.clock.wall_ms() + ttl.as_millis() as i64;
        let bytes = serde_json::to_vec(&self.lease).expect("serializable");
        match self.store.put_if(&self.name, bytes, Some(&self.version)) {
            Ok(Some(v)) => {
                self.version = v;
                Renewed::Yes
            }
            Ok(None) => Renewed::Lost,
            Err(_) => Renewed::NoAnswer,
        }
    }

    fn release(mut self) {
        self.lease.released = true;
        let bytes = serde_json::to_vec(&self.lease).expect("serializable");
        let _ = self.store.put_if(&self.name, bytes, Some(&self.version));
    }
}

/// A held deploy lease: renewed in the background, released when dropped.
pub(crate) struct LeaseGuard {
    stop: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl LeaseGuard {
    fn start(mut held: Held, ttl: Duration) -> LeaseGuard {
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let (flag, lost_flag) = (stop.clone(), lost.clone());
        let renewer = std::thread::spawn(move || {
            let clock = held.clock.clone();
            let mut next = clock.now() + ttl / 3;
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                if clock.now() < next {
                    continue;
                }
                next = match held.renew(ttl) {
                    Renewed::Yes => clock.now() + ttl / 3,
                    Renewed::Lost => {
                        lost_flag.store(true, Ordering::Relaxed);
                        return;
                    }
                    Renewed::NoAnswer => clock.now() + Duration::from_secs(1).min(ttl / 3),
                };
            }
            held.release();
        });
        LeaseGuard { stop, lost, renewer: Some(renewer) }
    }

    /// Whether another runner took the lease over while it was held (it could not be renewed in time).
    pub(crate) fn lost(&self) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::tests::Manual;
    use crate::store::ObjectStore;
    use crate::store::memory::Memory;
    use std::sync::Mutex;

    const TTL: Duration = Duration::from_secs(6);

    fn remote(store: &Arc<Memory>, clock: &Arc<Manual>, ttl: Duration, who: &str) -> Remote {
        Remote::for_tests(store.clone(), clock.clone(), ttl, who)
    }

    fn take(r: &Remote, timeout: Duration) -> (Result<LeaseGuard, LeaseError>, Vec<String>) {
        let mut told = Vec::new();
        let got = r.acquire("apply", "prod", timeout, &mut |w| told.push(w.to_string()), &|| false);
        (got, told)
    }

    /// A lease left by a runner that died: not released, never renewed.
    fn dead_lease(store: &Memory, who: &str, ttl_ms: i64) {
        let lease = Lease { holder: "dead".into(), who: who.into(), expires_ms: 0, released: false, ttl_ms };
        store.plant(&protocol::lease("prod", "apply"), &serde_json::to_vec(&lease).unwrap());
    }

    #[test]
    fn a_free_lease_is_taken_and_a_held_one_is_waited_for_until_the_timeout() {
        let (store, clock) = (Arc::new(Memory::default()), Arc::new(Manual::default()));
        let a = remote(&store, &clock, TTL, "a@ci");
        let (held, told) = take(&a, Duration::ZERO);
        let held = held.expect("the store answered");
        assert!(told.is_empty());
        let b = remote(&store, &clock, TTL, "b@ci");
        let (refused, told) = take(&b, Duration::from_secs(2));
        assert!(matches!(refused, Err(LeaseError::Held { ref holder, .. }) if holder == "a@ci"), "{:?}", refused.err());
        assert_eq!(told, ["a@ci"], "the waiter says whom it waits for, once");
        // Released on drop: the next runner takes it at once.
        drop(held);
        let start = clock.now();
        assert!(take(&b, Duration::ZERO).0.is_ok());
        assert_eq!(clock.now(), start, "no wait for a released lease");
    }

    #[test]
    fn a_dead_holders_lease_expires_a_whole_lifetime_after_the_waiter_first_sees_it() {
        let (store, clock) = (Arc::new(Memory::default()), Arc::new(Manual::default()));
        dead_lease(&store, "dead@ci", TTL.as_millis() as i64);
        let b = remote(&store, &clock, TTL, "b@ci");
        let start = clock.now();
        let (got, told) = take(&b, Duration::from_secs(60));
        assert!(got.is_ok());
        assert_eq!(told, ["dead@ci"]);
        let waited = clock.now() - start;
        assert!(waited >= TTL && waited < TTL + POLL * 2, "{waited:?}");
    }

    /// Issue 21, item 10: a runner configured with a short `lease_seconds` never takes over a lease whose holder
    /// renews on a longer lifetime: it honours the longer of the two.
    #[test]
    fn a_waiter_honours_the_holders_longer_lifetime() {
        let (store, clock) = (Arc::new(Memory::default()), Arc::new(Manual::default()));
        dead_lease(&store, "slow@ci", 30_000);
        let b = remote(&store, &clock, Duration::from_secs(2), "b@ci");
        let start = clock.now();
        assert!(take(&b, Duration::from_secs(60)).0.is_ok());
        assert!(clock.now() - start >= Duration::from_secs(30), "{:?}", clock.now() - start);
    }

    /// A lease is not signed: one planted with an endless lifetime blocks deploys for a day at most.
    #[test]
    fn a_planted_endless_lifetime_is_honoured_for_a_day_at_most() {
        let (store, clock) = (Arc::new(Memory::default()), Arc::new(Manual::default()));
        dead_lease(&store, "mallory", i64::MAX);
        let b = remote(&store, &clock, TTL, "b@ci");
        let start = clock.now();
        assert!(take(&b, Duration::MAX).0.is_ok(), "an endless timeout is no overflow either");
        let waited = clock.now() - start;
        assert!(waited >= HONOURED_AT_MOST && waited < HONOURED_AT_MOST + POLL * 2, "{waited:?}");
    }

    /// A holder that keeps renewing is never expired by a waiter, however long it waits.
    #[test]
    fn a_renewed_lease_never_expires_for_a_waiter() {
        let (store, clock) = (Arc::new(Memory::default()), Arc::new(Manual::default()));
        dead_lease(&store, "busy@ci", TTL.as_millis() as i64);
        // Each time the waiter sleeps, the holder renews (a new version of the lease object).
        let renewing = store.clone();
        *clock.on_sleep.lock().unwrap() = Some(Box::new(move || dead_lease(&renewing, "busy@ci", 6000)));
        let b = remote(&store, &clock, TTL, "b@ci");
        let (got, _) = take(&b, Duration::from_secs(120));
        assert!(matches!(got, Err(LeaseError::Held { .. })), "a live lease was taken over");
    }

    #[test]
    fn renewing_swaps_the_version_and_a_lease_taken_over_is_lost() {
        let (store, clock) = (Arc::new(Memory::default()), Arc::new(Manual::default()));
        let name = protocol::lease("prod", "apply");
        let lease = Lease { holder: "me".into(), who: "a@ci".into(), expires_ms: 0, released: false, ttl_ms: 6000 };
        let version = store.put_if(&name, b"{}".to_vec(), None).unwrap().unwrap();
        let mut held = Held { store: store.clone(), name: name.clone(), lease, version, clock: clock.clone() };
        assert_eq!(held.renew(TTL), Renewed::Yes);
        assert_eq!(held.renew(TTL), Renewed::Yes, "renewing with the version it got last time");
        dead_lease(&store, "thief@ci", 6000);
        assert_eq!(held.renew(TTL), Renewed::Lost);
    }

    /// Two runners racing for a free lease: the compare-and-swap lets exactly one in.
    #[test]
    fn of_two_runners_racing_for_a_lease_exactly_one_takes_it() {
        let (store, clock) = (Arc::new(Memory::default()), Arc::new(Manual::default()));
        let won = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for who in ["a@ci", "b@ci", "c@ci", "d@ci"] {
                let (store, clock, won) = (&store, &clock, &won);
                s.spawn(move || {
                    let r = remote(store, clock, TTL, who);
                    if let Ok(g) = take(&r, Duration::ZERO).0 {
                        won.lock().unwrap().push(who);
                        std::mem::forget(g);
                    }
                });
            }
        });
        assert_eq!(won.lock().unwrap().len(), 1, "{:?}", won.lock().unwrap());
    }
}
