//! Time, behind a trait where waiting is part of the logic (deploy leases), so that expiry, renewal and
//! takeover are unit-tested on a clock the test moves; and the wall-clock helpers every report uses.

use std::time::{Duration, Instant};

pub(crate) trait Clock: Send + Sync {
    /// Monotonic time: what waits and expiries are judged on.
    fn now(&self) -> Instant;
    /// Unix milliseconds, for what is written down (never for a decision).
    fn wall_ms(&self) -> i64;
    fn sleep(&self, d: Duration);
}

/// The machine's clocks.
pub(crate) struct System;

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
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// This machine's name, for who ran what.
pub(crate) fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "unknown-host".into())
}

/// A duration as people read it: `850ms`, `3.2s`, `4m05s`.
pub(crate) fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        let s = d.as_secs();
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// Unix milliseconds as RFC 3339 (UTC).
pub(crate) fn timestamp(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.round(jiff::Unit::Second).unwrap_or(t).to_string())
        .unwrap_or_default()
}

/// "3 minutes ago"-style age of a Unix-millisecond time.
pub(crate) fn age(ms: i64) -> String {
    let secs = (now_ms() - ms).max(0) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
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
