//! Time, behind a trait where waiting is part of the logic (deploy leases), so that expiry, renewal and
//! takeover are unit-tested on a clock the test moves; and the wall-clock helpers every report uses.

use std::time::{Duration, Instant};

pub trait Clock: Send + Sync {
    /// Monotonic time: what waits and expiries are judged on.
    fn now(&self) -> Instant;
    /// Unix milliseconds, for what is written down (never for a decision).
    fn wall_ms(&self) -> i64;
    fn sleep(&self, d: Duration);
}

/// The machine's clocks.
pub struct System;

impl Clock for System {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall_ms(&self) -> i64 {
        now_ms()
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d)
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A clock that moves only when someone sleeps on it; `on_sleep` runs at each sleep (another party acting
    /// while a waiter waits).
    pub(crate) struct Manual {
        start: Instant,
        elapsed: Mutex<Duration>,
        #[allow(clippy::type_complexity)]
        pub(crate) on_sleep: Mutex<Option<Box<dyn Fn() + Send>>>,
    }

    impl Default for Manual {
        fn default() -> Manual {
            Manual { start: Instant::now(), elapsed: Mutex::new(Duration::ZERO), on_sleep: Mutex::new(None) }
        }
    }

    impl Clock for Manual {
        fn now(&self) -> Instant {
            self.start + *self.elapsed.lock().unwrap()
        }

        fn wall_ms(&self) -> i64 {
            1_700_000_000_000 + self.elapsed.lock().unwrap().as_millis() as i64
        }

        fn sleep(&self, d: Duration) {
            *self.elapsed.lock().unwrap() += d;
            if let Some(f) = &*self.on_sleep.lock().unwrap() {
                f();
            }
        }
    }
}
