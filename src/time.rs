//! Wall-clock time as carried inside events.
//!
//! Every stage after `observe` takes its notion of "now" from the messages it receives, never
//! from the system clock, so that a recorded stream replays to the same decisions. [`Time`] is
//! nanoseconds since the UNIX epoch: `Copy`, 8 bytes, cheap on the hot path.

use std::fmt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Steps smaller than this are drift or scheduling noise: [`resync`] leaves them alone.
pub const STEP_THRESHOLD: Duration = Duration::from_secs(2);

/// The process's clock: the wall time at a fixed monotonic instant (ns since the epoch,
/// moved only by [`resync`]) and that instant.
fn anchor() -> (&'static AtomicU64, Instant) {
    static ANCHOR: OnceLock<(AtomicU64, Instant)> = OnceLock::new();
    let (base, mono) = ANCHOR.get_or_init(|| {
        let mono = Instant::now();
        (AtomicU64::new(Time::from(SystemTime::now()).0), mono)
    });
    (base, *mono)
}

/// The step between the system clock and [`Time::now`] (positive: the system clock is
/// ahead), if it is at least [`STEP_THRESHOLD`].
pub fn step_between(system: Time, ours: Time) -> Option<i64> {
    let d = (i128::from(system.0) - i128::from(ours.0))
        .clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    (d.unsigned_abs() >= STEP_THRESHOLD.as_nanos() as u64).then_some(d)
}

/// Takes a step of the system clock into [`Time::now`], returning it (ns, positive:
/// forward), when there was one. The one caller is the decision task, which moves every hold
/// expiry by the same amount at the same moment, so hold durations stay monotonic.
pub fn resync() -> Option<i64> {
    let ours = Time::now();
    let step = step_between(Time::from(SystemTime::now()), ours)?;
    let (base, _) = anchor();
    let moved = if step >= 0 {
        base.load(Ordering::Relaxed)
            .saturating_add(step.unsigned_abs())
    } else {
        base.load(Ordering::Relaxed)
            .saturating_sub(step.unsigned_abs())
    };
    base.store(moved, Ordering::Relaxed);
    Some(step)
}

/// A point in time: nanoseconds since 1970-01-01T00:00:00Z.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Time(pub u64);

impl Time {
    /// The UNIX epoch.
    pub const EPOCH: Time = Time(0);

    /// The current wall-clock time, advanced by the monotonic clock: a step of the system
    /// clock (NTP setting the time, `date -s`) does not show here until [`resync`] takes it
    /// in, so every duration measured in `Time` is monotonic between resyncs. Only
    /// `observe`, timers and the CLI may call this.
    pub fn now() -> Time {
        let (base, mono) = anchor();
        let wall = base.load(Ordering::Relaxed);
        let elapsed = u64::try_from(mono.elapsed().as_nanos()).unwrap_or(u64::MAX);
        Time(wall.saturating_add(elapsed))
    }

    /// From whole seconds since the epoch.
    pub const fn from_secs(secs: u64) -> Time {
        Time(secs.saturating_mul(1_000_000_000))
    }

    /// From milliseconds since the epoch.
    pub const fn from_millis(ms: u64) -> Time {
        Time(ms.saturating_mul(1_000_000))
    }

    /// Nanoseconds since the epoch.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Whole seconds since the epoch.
    pub const fn as_secs(self) -> u64 {
        self.0 / 1_000_000_000
    }

    /// This time plus a duration, saturating at the far future.
    pub fn saturating_add(self, d: Duration) -> Time {
        Time(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }

    /// This time minus a duration, saturating at the epoch.
    pub fn saturating_sub(self, d: Duration) -> Time {
        Time(
            self.0
                .saturating_sub(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }

    /// The duration from `earlier` to `self`, zero when `earlier` is later.
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// As a `SystemTime`.
    pub fn to_system(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.0)
    }

    /// Parses an RFC 3339 timestamp such as `2026-12-31T23:59:59Z`.
    pub fn parse_rfc3339(s: &str) -> Result<Time, humantime::TimestampError> {
        humantime::parse_rfc3339_weak(s).map(Time::from)
    }
}

impl From<SystemTime> for Time {
    fn from(t: SystemTime) -> Time {
        let nanos = t
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Time(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

impl fmt::Display for Time {
    /// RFC 3339 in UTC with second precision, e.g. `2026-11-25T04:00:43Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = Time::from_secs(self.as_secs()).to_system();
        write!(f, "{}", humantime::format_rfc3339_seconds(secs))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_step_is_two_seconds_or_more_either_way() {
        let t = Time::from_secs(1_800_000_000);
        assert_eq!(
            step_between(t.saturating_add(Duration::from_millis(1999)), t),
            None
        );
        assert_eq!(
            step_between(t.saturating_add(Duration::from_secs(3600)), t),
            Some(3_600_000_000_000)
        );
        assert_eq!(
            step_between(t.saturating_sub(Duration::from_secs(60)), t),
            Some(-60_000_000_000)
        );
        assert_eq!(step_between(t, t), None);
    }

    #[test]
    fn now_follows_the_system_clock_and_never_goes_back() {
        let a = Time::now();
        let sys = Time::from(SystemTime::now());
        assert!(
            step_between(sys, a).is_none(),
            "anchored near the system clock"
        );
        assert_eq!(resync(), None, "nothing stepped");
        let b = Time::now();
        assert!(b >= a);
    }

    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        let t = Time::parse_rfc3339("2026-12-31T23:59:59Z").unwrap();
        assert_eq!(t.to_string(), "2026-12-31T23:59:59Z");
        assert_eq!(t.as_secs(), 1_798_761_599);
    }

    #[test]
    fn arithmetic_saturates() {
        assert_eq!(Time(5).saturating_sub(Duration::from_secs(1)), Time::EPOCH);
        assert_eq!(
            Time(u64::MAX - 1).saturating_add(Duration::from_secs(1)),
            Time(u64::MAX)
        );
        assert_eq!(Time(10).since(Time(20)), Duration::ZERO);
    }
}
