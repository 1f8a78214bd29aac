//! Jittered exponential backoff: the one type every retry loop in pier uses (fetching a
//! revision, polling a queue after an error, writing a status record).
//!
//! The delay before retry `n` (counting from 0) is drawn uniformly from
//! `[d/2, d]` where `d = min(max, base * 2^n)`: growing so a struggling service gets room,
//! jittered so a fleet of agents that failed together does not retry together, and never
//! below half the nominal delay so a retry is never immediate. Sleeping goes through
//! `tokio::time`, so tests can pause and advance the clock.

use std::future::Future;
use std::time::Duration;

use rand::RngExt;

/// A retry schedule and how far along it is.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    /// Total attempts allowed (the first try included); `u32::MAX` for no limit.
    attempts: u32,
    /// Retries handed out so far.
    retries: u32,
}

impl Backoff {
    /// A schedule starting at `base`, capped at `max`, allowing `attempts` tries in total
    /// (so `attempts - 1` delays). `attempts` of 0 behaves as 1.
    pub fn new(base: Duration, max: Duration, attempts: u32) -> Backoff {
        Backoff {
            base,
            max: max.max(base),
            attempts: attempts.max(1),
            retries: 0,
        }
    }

    /// A schedule that never gives up (for loops that must keep going, e.g. queue polling).
    pub fn unbounded(base: Duration, max: Duration) -> Backoff {
        Backoff::new(base, max, u32::MAX)
    }

    /// The defaults for network calls: 200 ms, doubling to 10 s, 6 attempts (about 20 s).
    pub fn network() -> Backoff {
        Backoff::new(Duration::from_millis(200), Duration::from_secs(10), 6)
    }

    /// The delay before the next retry, or `None` once the attempts are used up.
    pub fn next_delay(&mut self) -> Option<Duration> {
        if self.retries.saturating_add(1) >= self.attempts {
            return None;
        }
        let nominal = self.nominal(self.retries);
        self.retries += 1;
        let low = nominal / 2;
        let jitter = rand::rng().random_range(0..=(nominal - low).as_millis() as u64);
        Some(low + Duration::from_millis(jitter))
    }

    /// Starts the schedule over (after a success, in a long-running loop).
    pub fn reset(&mut self) {
        self.retries = 0;
    }

    /// How many retries have been handed out since the start or the last reset.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    fn nominal(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// Runs `op` until it succeeds, fails with an error `transient` says is permanent, or the
    /// attempts run out (then the last error is returned). Sleeps the jittered delay between
    /// tries. `op` gets the attempt number, starting at 1, for logging.
    pub async fn retry<T, E, F, Fut>(
        &self,
        mut op: F,
        transient: impl Fn(&E) -> bool,
    ) -> Result<T, E>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut schedule = self.clone();
        schedule.reset();
        let mut attempt = 1;
        loop {
            match op(attempt).await {
                Ok(v) => return Ok(v),
                Err(e) if transient(&e) => match schedule.next_delay() {
                    Some(d) => {
                        tokio::time::sleep(d).await;
                        attempt += 1;
                    }
                    None => return Err(e),
                },
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn delays_grow_within_jitter_and_stop() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350), 5);
        let bounds = [(50, 100), (100, 200), (175, 350), (175, 350)];
        for (lo, hi) in bounds {
            let d = b.next_delay().unwrap().as_millis();
            assert!((lo..=hi).contains(&d), "{d} not in {lo}..={hi}");
        }
        assert_eq!(b.next_delay(), None);
        b.reset();
        assert!(b.next_delay().is_some());
    }

    #[test]
    fn unbounded_does_not_overflow() {
        let mut b = Backoff::unbounded(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..100 {
            assert!(b.next_delay().unwrap() <= Duration::from_secs(30));
        }
    }

    #[tokio::test]
    async fn retry_stops_on_success_permanent_error_or_exhaustion() {
        let b = Backoff::new(Duration::from_millis(1), Duration::from_millis(4), 4);
        let calls = Cell::new(0);
        let r: Result<u32, &str> = b
            .retry(
                |n| {
                    calls.set(calls.get() + 1);
                    async move {
                        if n < 3 {
                            Err("flaky")
                        } else {
                            Ok(n)
                        }
                    }
                },
                |_| true,
            )
            .await;
        assert_eq!(r, Ok(3));

        calls.set(0);
        let r: Result<(), &str> = b
            .retry(
                |_| {
                    calls.set(calls.get() + 1);
                    async { Err("forbidden") }
                },
                |e| *e != "forbidden",
            )
            .await;
        assert_eq!((r, calls.get()), (Err("forbidden"), 1));

        calls.set(0);
        let r: Result<(), &str> = b
            .retry(
                |_| {
                    calls.set(calls.get() + 1);
                    async { Err("down") }
                },
                |_| true,
            )
            .await;
        assert_eq!((r, calls.get()), (Err("down"), 4));
    }
}
