//! Kernel flood meters: the contract between the agent's nft table ([`crate::enforce`]),
//! which builds them, and the detector ([`crate::detect`]), which reads what they report.
//!
//! A flood must be cut within a fraction of a second, faster than one read of the counters
//! (`detection.counter_interval`) or an average over the flood window. So the forward chain
//! holds one per-source token bucket per kind of flood, at the policy's threshold:
//!
//! ```text
//! ip saddr @customers4 update @meter_pps4 { ip saddr limit rate over 150000/second burst 30000 packets } ct label set 64
//! ```
//!
//! Bytes are metered as a quota of one second of the threshold per one-second window
//! (`add @meter_bytes4 { ip saddr quota over N bytes }` in a set with a 1 s timeout): the
//! kernel's byte `limit` lets a full second of its rate through before it trips, and nft's
//! JSON has whole seconds only. A byte flood at twice the threshold trips half a second into
//! its window.
//!
//! A source that sends faster than the threshold for longer than the burst allows
//! (`detection.flood_tolerance` at twice the threshold) sets the conntrack label of its
//! [`Kind`] on the flow of the packet. Conntrack reports the change at once (a `NEW` event
//! carries it, a flow already confirmed gets an `UPDATE` with `CTA_LABELS`), and the detector
//! confirms the rest of the flood rule from what it knows of the source (the unanswered share
//! for `pps`/`bps`, few targets for new flows and SYNs) and decides in the same batch.
//! Labels 64..127 are the agent's; bit `i` of [`crate::messages::FlowEvent::labels`] is label
//! `64 + i`.
//!
//! One meter per kind serves the lowest threshold of that kind among the flood-enabled
//! profiles: it confirms a crossing for the profiles with exactly that threshold; a profile
//! with a higher one is detected from the counters and the flood window as before.
//!
//! Sampling: a source that opens more than `detection.sample_flows_above` new flows per
//! second (a token bucket like the meters') is "hot" for a second after its last flow above
//! that rate (`meter_hot4`); every new flow of a hot source carries [`SAMPLED_LABEL`], and
//! all but one in [`SAMPLE_ONE_IN`] of them (`numgen random`) get `ct event set 0x0`: no
//! event at all, for the agent or any other conntrack listener. The detector counts each
//! reported one [`SAMPLE_ONE_IN`] times.

use crate::policy::{Flood, Policy};

/// The first conntrack label the agent uses; bit `i` of an event's labels is label
/// `LABEL_BASE + i`.
pub const LABEL_BASE: u8 = 64;

/// The label of a flow reported as one sample of [`SAMPLE_ONE_IN`].
pub const SAMPLED_LABEL: u8 = 127;

/// The bit of [`SAMPLED_LABEL`] in an event's labels.
pub const SAMPLED_BIT: u64 = 1 << (SAMPLED_LABEL - LABEL_BASE);

/// One flow reported of this many while a source is sampled.
pub const SAMPLE_ONE_IN: u32 = 16;

/// Every meter label's bit.
pub const METER_BITS: u64 = (1 << Kind::ALL.len()) - 1;

/// What a meter counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Every packet (`flood.pps`).
    Pps,
    /// Every byte (`flood.bps`, metered in bytes).
    Bps,
    /// UDP packets of unanswered flows after each flow's first (`flood.udp_pps`).
    Udp,
    /// Echo requests (`flood.icmp_pps`).
    Echo,
    /// First packets of new flows (`flood.new_flows_per_sec`).
    NewFlows,
    /// First packets of new TCP flows (`flood.unreplied_syn_per_sec`; the detector checks
    /// that they go unanswered).
    Syn,
}

impl Kind {
    /// Every kind, in label order.
    pub const ALL: [Kind; 6] = [
        Kind::Pps,
        Kind::Bps,
        Kind::Udp,
        Kind::Echo,
        Kind::NewFlows,
        Kind::Syn,
    ];

    /// The conntrack label it sets.
    pub fn label(self) -> u8 {
        LABEL_BASE + self as u8
    }

    /// Its bit in an event's labels.
    pub fn bit(self) -> u64 {
        1 << (self as u8)
    }

    /// The policy key of its threshold (`flood.<key>`), also the signal of its evidence.
    pub fn key(self) -> &'static str {
        match self {
            Kind::Pps => "pps",
            Kind::Bps => "bps",
            Kind::Udp => "udp_pps",
            Kind::Echo => "icmp_pps",
            Kind::NewFlows => "new_flows_per_sec",
            Kind::Syn => "unreplied_syn_per_sec",
        }
    }

    /// The name of its sets and rules (`meter_<name>4`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pps => "pps",
            Kind::Bps => "bytes",
            Kind::Udp => "udp",
            Kind::Echo => "echo",
            Kind::NewFlows => "new",
            Kind::Syn => "syn",
        }
    }

    /// A profile's threshold of this kind, in the policy's unit (bits/s for [`Kind::Bps`]).
    pub fn threshold(self, f: &Flood) -> u64 {
        match self {
            Kind::Pps => f.pps,
            Kind::Bps => f.bps,
            Kind::Udp => f.udp_pps,
            Kind::Echo => f.icmp_pps,
            Kind::NewFlows => f.new_flows_per_sec,
            Kind::Syn => f.unreplied_syn_per_sec,
        }
    }
}

/// The meters of a policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meters {
    /// Threshold per kind, in the policy's unit ([`Kind::ALL`] order); 0: no meter.
    pub rate: [u64; 6],
    /// `detection.flood_tolerance` in milliseconds.
    pub tolerance_ms: u64,
    /// `detection.sample_flows_above`; 0: no sampling.
    pub sample_above: u64,
}

impl Meters {
    /// The meters `policy` asks for: per kind, the lowest non-zero threshold among the
    /// profiles that detect floods.
    pub fn of_policy(policy: &Policy) -> Meters {
        let mut rate = [0u64; 6];
        for (i, k) in Kind::ALL.into_iter().enumerate() {
            rate[i] = policy
                .profiles
                .values()
                .filter(|p| p.flood.enabled)
                .map(|p| k.threshold(&p.flood))
                .filter(|&t| t > 0)
                .min()
                .unwrap_or(0);
        }
        Meters {
            rate,
            tolerance_ms: policy.detection.flood_tolerance.as_millis() as u64,
            sample_above: policy.detection.sample_flows_above,
        }
    }

    /// The meter's threshold for `kind`, if there is a meter.
    pub fn rate(&self, kind: Kind) -> Option<u64> {
        Some(self.rate[kind as usize]).filter(|&r| r > 0)
    }

    /// What the kernel's meter takes for `kind`: (rate per second, burst) in packets for a
    /// `limit`; for [`Kind::Bps`] (bytes per second, the quota of one
    /// [`Meters::bytes_window_ms`]), as the kernel's byte `limit` cannot trip within its
    /// first second. None where the kernel cannot meter the rate (see
    /// [`kernel_can_meter`]): that threshold is judged from the counters only.
    pub fn limit(&self, kind: Kind) -> Option<(u64, u64)> {
        let r = self.rate(kind)?;
        if kind == Kind::Bps {
            let r = (r / 8).max(1);
            return Some((r, burst(r, self.bytes_window_ms())));
        }
        let b = burst(r, self.tolerance_ms);
        kernel_can_meter(r, b).then_some((r, b))
    }

    /// The byte meter's window: twice the tolerance, so that at twice the threshold its
    /// quota (the threshold's bytes in one window) is spent after the tolerance, as a
    /// packet meter's bucket is.
    pub fn bytes_window_ms(&self) -> u64 {
        self.tolerance_ms.saturating_mul(2).max(1)
    }

    /// The sampling meter: (new flows per second, burst).
    pub fn sampling(&self) -> Option<(u64, u64)> {
        let r = Some(self.sample_above).filter(|&r| r > 0)?;
        let b = burst(r, self.tolerance_ms);
        kernel_can_meter(r, b).then_some((r, b))
    }

    /// Whether the meter of `kind` confirms a crossing of `threshold` (a profile's): it is
    /// at exactly that rate.
    pub fn serves(&self, kind: Kind, threshold: u64) -> bool {
        threshold > 0 && self.rate(kind) == Some(threshold)
    }
}

/// Whether the kernel's packet `limit` takes `rate` per second with `burst` (Linux
/// `nft_limit_init`): the burst is a 32-bit attribute, and the rate at most one packet per
/// nanosecond. Beyond that the kernel refuses the rule (`EOVERFLOW`), and the agent's whole
/// table with it.
pub fn kernel_can_meter(rate: u64, burst: u64) -> bool {
    burst <= u64::from(u32::MAX) && rate <= 1_000_000_000
}

/// A token bucket's burst for `rate` per second over `ms` milliseconds (at least 1). At
/// twice the rate the bucket empties after `ms`.
fn burst(rate: u64, ms: u64) -> u64 {
    (rate.saturating_mul(ms) / 1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_the_agents_half_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for k in Kind::ALL {
            assert!(k.label() >= LABEL_BASE && k.label() < SAMPLED_LABEL);
            assert!(seen.insert(k.label()));
            assert_eq!(k.bit(), 1 << (k.label() - LABEL_BASE));
            assert_ne!(k.bit() & METER_BITS, 0);
        }
        assert_eq!(SAMPLED_BIT & METER_BITS, 0);
    }

    #[test]
    fn the_lowest_threshold_of_flood_profiles_is_metered() {
        let text = "version: 1\nnetworks:\n  - prefix: 192.0.2.0/24\n  - prefix: 198.51.100.0/24\n    profile: big\nprofiles:\n  default:\n    flood:\n      udp_pps: 30k\n  big:\n    flood:\n      udp_pps: 10k\n      pps: 300k\n  off:\n    flood:\n      enabled: false\n      udp_pps: 1k\n";
        let p = Policy::from_text(text, std::path::Path::new("t.yaml")).unwrap();
        let m = Meters::of_policy(&p);
        assert_eq!(
            m.rate(Kind::Udp),
            Some(10_000),
            "the disabled profile is left out"
        );
        assert!(m.serves(Kind::Udp, 10_000));
        assert!(!m.serves(Kind::Udp, 30_000));
        // 200 ms at 10k/s.
        assert_eq!(m.limit(Kind::Udp), Some((10_000, 2_000)));
        // bps is metered in bytes, a quota of the threshold's bytes in a window of twice the
        // tolerance: spent at twice the threshold after the tolerance.
        let (bytes, quota) = m.limit(Kind::Bps).unwrap();
        assert_eq!(bytes, m.rate(Kind::Bps).unwrap() / 8);
        assert_eq!(m.bytes_window_ms(), 400);
        assert_eq!(quota, bytes * 4 / 10);
        assert_eq!(m.sampling(), Some((5_000, 1_000)));
    }

    #[test]
    fn rates_the_kernel_refuses_get_no_meter() {
        let mut m = Meters {
            rate: [0; 6],
            tolerance_ms: 200,
            sample_above: 0,
        };
        // A burst past 32 bits, a packet rate past 10⁹/s.
        m.rate[Kind::Pps as usize] = 100_000_000_000;
        assert_eq!(m.limit(Kind::Pps), None);
        m.rate[Kind::Pps as usize] = 100_000_000;
        assert_eq!(m.limit(Kind::Pps), Some((100_000_000, 20_000_000)));
        // Bytes are a quota (64 bits), whatever the rate.
        m.rate[Kind::Bps as usize] = 1_000_000_000_000;
        assert_eq!(m.limit(Kind::Bps), Some((125_000_000_000, 50_000_000_000)));
    }
}
