//! What the agent's listeners (the control socket, the metrics port) share to stay up
//! against hostile local clients: a back-off on accept errors and a rate limit for the
//! warnings that a flood would otherwise turn into a log flood.
//!
//! An accept that fails with `EMFILE` (the process is out of file descriptors) leaves the
//! pending connection in the backlog, so the listener stays readable and a loop that simply
//! retries spins a core until a descriptor frees up. [`Backoff`] makes the loop sleep
//! instead, 10 ms doubling to 1 s, and resets on the next successful accept.

use std::time::{Duration, Instant};

/// First pause after a failed accept.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between two accept attempts while they keep failing.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Back-off between failed accepts.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// An accept succeeded: the next failure waits [`BACKOFF_MIN`] again.
    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    /// The pause to take after this failure; doubles the next one, at most [`BACKOFF_MAX`].
    pub fn failed(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }
}

/// Lets one warning through per interval and counts the ones held back.
#[derive(Debug)]
pub struct RateLimit {
    every: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl RateLimit {
    /// At most one warning per `every`.
    pub fn new(every: Duration) -> RateLimit {
        RateLimit {
            every,
            last: None,
            held_back: 0,
        }
    }

    /// `Some(n)` when a warning may be logged now, `n` being how many were held back since
    /// the last one; `None` when this one is held back.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let waits: Vec<_> = (0..10).map(|_| b.failed().as_millis()).collect();
        assert_eq!(
            waits,
            [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000],
            "{waits:?}"
        );
        b.reset();
        assert_eq!(b.failed(), BACKOFF_MIN);
    }

    #[test]
    fn rate_limit_lets_one_through_per_interval_and_counts_the_rest() {
        let mut r = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(r.allow(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(r.allow(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(r.allow(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(r.allow(t0 + Duration::from_secs(11)), None);
        assert_eq!(r.allow(t0 + Duration::from_secs(21)), Some(1));
    }
}
