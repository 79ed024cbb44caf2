//! Wall-clock time as carried inside events.
//!
//! Every stage after `observe` takes its notion of "now" from the messages it receives, never
//! from the system clock, so that a recorded stream replays to the same decisions. [`Time`] is
//! nanoseconds since the UNIX epoch: `Copy`, 8 bytes, cheap on the hot path.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A point in time: nanoseconds since 1970-01-01T00:00:00Z.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Time(pub u64);

impl Time {
    /// The UNIX epoch.
    pub const EPOCH: Time = Time(0);

    /// The current wall-clock time. Only `observe`, timers and the CLI may call this.
    pub fn now() -> Time {
        Time::from(SystemTime::now())
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
