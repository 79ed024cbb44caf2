//! Every message that crosses a channel between the agent's tasks.
//!
//! Stages own their data and talk only through these types. All derive `Serialize` and
//! `Deserialize`, so a stream can be recorded as JSON lines and replayed through the pure
//! stages (`detect`, `decide`) in tests. Time is carried inside each message ([`Time`]);
//! nothing after `observe` reads the clock.
//!
//! ```text
//! observe ──Observation──▶ detect ──Detection──▶ decide ──Decision / DesiredBlocks──▶ enforce
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use crate::time::Time;

/// IP protocol numbers the detectors care about.
pub mod proto {
    /// ICMP (IPv4).
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// SCTP.
    pub const SCTP: u8 = 132;
}

// ---------------------------------------------------------------------------------------------
// observe → detect
// ---------------------------------------------------------------------------------------------

/// What a conntrack event says happened to a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowEventKind {
    /// A new flow (ctnetlink `IPCTNL_MSG_CT_NEW` with `NLM_F_CREATE`).
    New,
    /// A flow found by a dump of the table (`NLM_F_MULTI`), at start or to resynchronise after
    /// lost events: it may have been seen live already.
    Existing,
    /// A change to a known flow (reply seen, TCP state change, assured).
    Update,
    /// The flow ended or timed out (`IPCTNL_MSG_CT_DELETE`).
    Destroy,
}

/// TCP connection-tracking state (`enum tcp_conntrack` in the kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TcpState {
    /// No state.
    None,
    /// SYN sent, nothing back yet.
    SynSent,
    /// SYN+ACK seen.
    SynRecv,
    /// Established.
    Established,
    /// FIN wait.
    FinWait,
    /// Close wait.
    CloseWait,
    /// Last ACK.
    LastAck,
    /// Time wait.
    TimeWait,
    /// Closed (also after a RST).
    Close,
    /// Listen (simultaneous open).
    Listen,
    /// SYN sent in both directions.
    SynSent2,
    /// Any value this build does not know.
    Other(u8),
}

impl TcpState {
    /// Maps the kernel's numeric state.
    pub fn from_kernel(v: u8) -> TcpState {
        match v {
            0 => TcpState::None,
            1 => TcpState::SynSent,
            2 => TcpState::SynRecv,
            3 => TcpState::Established,
            4 => TcpState::FinWait,
            5 => TcpState::CloseWait,
            6 => TcpState::LastAck,
            7 => TcpState::TimeWait,
            8 => TcpState::Close,
            9 => TcpState::Listen,
            10 => TcpState::SynSent2,
            other => TcpState::Other(other),
        }
    }
}

/// Conntrack status bits (`enum ip_conntrack_status`) the detectors use.
pub mod ct_status {
    /// The flow expects a related connection.
    pub const EXPECTED: u32 = 1 << 0;
    /// A packet was seen in the reply direction.
    pub const SEEN_REPLY: u32 = 1 << 1;
    /// Seen both ways long enough to be kept under pressure.
    pub const ASSURED: u32 = 1 << 2;
    /// Confirmed: the original packet left the box.
    pub const CONFIRMED: u32 = 1 << 3;
}

/// One conntrack event: the original-direction tuple plus what the kernel told about the flow.
///
/// `Copy` and allocation-free, so the parser can hand it on without touching the heap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEvent {
    /// When the agent received the event (or the kernel's timestamp when it has one).
    pub time: Time,
    /// New, update or destroy.
    pub kind: FlowEventKind,
    /// Original source: the customer's address.
    pub src: IpAddr,
    /// Original destination.
    pub dst: IpAddr,
    /// IP protocol number ([`proto`]).
    pub proto: u8,
    /// Source port (TCP/UDP/SCTP), else 0.
    pub sport: u16,
    /// Destination port (TCP/UDP/SCTP), else 0.
    pub dport: u16,
    /// ICMP type and code for ICMP/ICMPv6 flows.
    pub icmp: Option<(u8, u8)>,
    /// Conntrack status bits ([`ct_status`]).
    pub status: u32,
    /// TCP state, for TCP flows when the kernel included it.
    pub tcp_state: Option<TcpState>,
    /// Packets and bytes in the original direction (needs `nf_conntrack_acct`).
    pub orig_packets: Option<u64>,
    /// Bytes in the original direction.
    pub orig_bytes: Option<u64>,
    /// Packets in the reply direction.
    pub reply_packets: Option<u64>,
    /// Bytes in the reply direction.
    pub reply_bytes: Option<u64>,
    /// Flow start (needs `nf_conntrack_timestamp`).
    pub start: Option<Time>,
    /// Flow stop, on destroy events (needs `nf_conntrack_timestamp`).
    pub stop: Option<Time>,
    /// The agent's conntrack labels 64..127 (bit `i` is label `64 + i`; [`crate::meter`]),
    /// when the event carries `CTA_LABELS`.
    #[serde(default)]
    pub labels: u64,
}

impl FlowEvent {
    /// Whether a packet was ever seen in the reply direction.
    pub fn seen_reply(&self) -> bool {
        self.status & ct_status::SEEN_REPLY != 0
    }
}

/// Packet and byte rates of one customer source over one counter interval, from the nft
/// per-address counters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CounterSample {
    /// End of the interval.
    pub time: Time,
    /// The customer source address.
    pub addr: IpAddr,
    /// Packets forwarded from `addr` during the interval.
    pub packets: u64,
    /// Bytes forwarded from `addr` during the interval.
    pub bytes: u64,
    /// Length of the interval in nanoseconds.
    pub interval_ns: u64,
    /// Of `packets`, UDP packets of flows that saw no reply (`ct state new`), each flow's
    /// first packet left out (`ct status confirmed`).
    #[serde(default)]
    pub udp_packets: u64,
    /// Of `packets`, ICMP and ICMPv6 echo requests.
    #[serde(default)]
    pub echo_packets: u64,
}

impl CounterSample {
    /// Packets per second over the interval.
    pub fn pps(&self) -> f64 {
        rate(self.packets, self.interval_ns)
    }

    /// Bits per second over the interval.
    pub fn bps(&self) -> f64 {
        rate(self.bytes.saturating_mul(8), self.interval_ns)
    }
}

fn rate(count: u64, interval_ns: u64) -> f64 {
    if interval_ns == 0 {
        0.0
    } else {
        count as f64 * 1e9 / interval_ns as f64
    }
}

/// Everything the observers send to the detector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Observation {
    /// One conntrack event from a customer source.
    Flow(FlowEvent),
    /// One counter sample.
    Counters(CounterSample),
    /// The clock moved on with no event (lets windows close on a quiet link).
    Tick {
        /// Now.
        time: Time,
    },
    /// The kernel dropped events (ENOBUFS); a resynchronising dump follows.
    Lost {
        /// When the loss was noticed.
        time: Time,
    },
    /// A dump of the conntrack table ended; its flows came before this.
    Resynced {
        /// When it ended.
        time: Time,
        /// When it was requested: flows alive then are in it.
        started: Time,
    },
}

impl Observation {
    /// The time the observation carries.
    pub fn time(&self) -> Time {
        match self {
            Observation::Flow(e) => e.time,
            Observation::Counters(c) => c.time,
            Observation::Tick { time }
            | Observation::Lost { time }
            | Observation::Resynced { time, .. } => *time,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// detect → decide
// ---------------------------------------------------------------------------------------------

/// The abuse categories of DESIGN.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Outgoing (D)DoS.
    Flood,
    /// Password guessing against authentication ports.
    BruteForce,
    /// Many ports of one target.
    PortScan,
    /// One port across many targets.
    NetworkScan,
    /// SMTP fan-out.
    Spam,
    /// Packets sent with a source address bound to another server's MAC address (the
    /// sender tried to get its neighbour held): detected by `antispoof`, not the engine.
    Spoofing,
}

impl Category {
    /// All categories, in a fixed order.
    pub const ALL: [Category; 6] = [
        Category::Flood,
        Category::BruteForce,
        Category::PortScan,
        Category::NetworkScan,
        Category::Spam,
        Category::Spoofing,
    ];

    /// The categories the detection engine computes from flows and counters, in
    /// [`Category::ALL`] order.
    pub const DETECTED: [Category; 5] = [
        Category::Flood,
        Category::BruteForce,
        Category::PortScan,
        Category::NetworkScan,
        Category::Spam,
    ];

    /// The name used in the policy file, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Flood => "flood",
            Category::BruteForce => "brute_force",
            Category::PortScan => "port_scan",
            Category::NetworkScan => "network_scan",
            Category::Spam => "spam",
            Category::Spoofing => "spoofing",
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A signal that crossed its threshold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Crossed {
    /// The threshold's name as in the policy (`distinct_ports`, `pps`, ...).
    pub signal: String,
    /// The value measured in the window.
    pub value: f64,
    /// The threshold from the policy profile.
    pub threshold: f64,
}

/// A count attached to a destination or port in the evidence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counted<T> {
    /// The destination address, port, ...
    pub key: T,
    /// How many flows (or packets) it had in the window.
    pub count: u64,
}

/// One flow kept as a sample in the evidence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowSample {
    /// When it was seen.
    pub time: Time,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol.
    pub proto: u8,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Whether the destination ever answered.
    pub answered: bool,
}

/// What the abuse desk forwards to the customer: precise, bounded, readable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// Start of the window the counts cover.
    pub window_start: Time,
    /// End of the window.
    pub window_end: Time,
    /// The signals that crossed their thresholds.
    pub crossed: Vec<Crossed>,
    /// Other counts measured in the window, by name (flows, unanswered, pps, ...).
    pub counts: BTreeMap<String, f64>,
    /// The most-hit destinations, most first.
    pub top_destinations: Vec<Counted<IpAddr>>,
    /// The most-hit destination ports, most first.
    pub top_ports: Vec<Counted<u16>>,
    /// First event of the source in the window.
    pub first_seen: Time,
    /// Last event of the source in the window.
    pub last_seen: Time,
    /// A bounded sample of the flows.
    pub sample: Vec<FlowSample>,
    /// For a spoofing detection: the sender's MAC address and the source addresses it
    /// forged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spoofing: Option<SpoofEvidence>,
    /// Which pattern of the category crossed, when it has several (absent: the category's
    /// plain rule): `icmp_flood` (echo requests crossed `flood.icmp_pps`), `udp_flood`
    /// (unanswered UDP crossed `flood.udp_pps`), `spread` (a brute force of a few attempts at
    /// each of many targets), `answered_sweep` and `slow_scan` (network scan), `udp_scan`
    /// (port scan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
}

/// What a spoofing detection saw: who sent, and whose addresses it wrote as the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoofEvidence {
    /// The sending MAC address (`02:00:00:00:00:0a`).
    pub mac: String,
    /// The forged source addresses with their dropped packets, most first (bounded).
    pub spoofed_sources: Vec<Counted<IpAddr>>,
}

/// The detector's verdict on one source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// When the threshold was crossed.
    pub time: Time,
    /// The offending source: an address, or its IPv6 aggregate (/64) when the policy says so.
    pub source: IpNet,
    /// The abuse category.
    pub category: Category,
    /// The profile whose thresholds applied.
    pub profile: String,
    /// Why.
    pub evidence: Evidence,
}

/// decide → detect: a hold began or ended (not sent for dry-run holds, which drop nothing).
/// The detector starts afresh for every source of the target: see
/// `detect::Engine::on_hold_change`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "change")]
pub enum HoldChange {
    /// The target is held (quarantined, blocked or terminated) from `since` on.
    Held {
        /// The held address or prefix.
        target: IpNet,
        /// When the hold began (the decision's time).
        since: Time,
        /// How: a quarantine lets flows to the walled garden pass, the others nothing.
        kind: BlockKind,
    },
    /// The hold of the target was lifted (unblock, reconnect, expiry) at `time`.
    Lifted {
        /// The address or prefix no longer held.
        target: IpNet,
        /// When it was lifted.
        time: Time,
    },
}

impl HoldChange {
    /// What a decision means for the detector, if anything.
    pub fn of(d: &Decision) -> Option<HoldChange> {
        match d.kind {
            Some(_) if d.dry_run => None,
            Some(kind) => Some(HoldChange::Held {
                target: d.target,
                since: d.time,
                kind,
            }),
            None => Some(HoldChange::Lifted {
                target: d.target,
                time: d.time,
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// decide → enforce
// ---------------------------------------------------------------------------------------------

/// How an address is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    /// May reach only the walled garden.
    Quarantine,
    /// Reaches nothing and nothing reaches it.
    Block,
    /// Blocked for good: no automatic reconnect.
    Terminate,
}

impl BlockKind {
    /// The name used in the policy, logs and CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            BlockKind::Quarantine => "quarantine",
            BlockKind::Block => "block",
            BlockKind::Terminate => "terminate",
        }
    }
}

impl fmt::Display for BlockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The BGP announcements a block asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Announce {
    /// A flowspec rule (RFC 8955/8956) matching the source.
    Flowspec,
    /// A unicast route with the BLACKHOLE community (RFC 7999).
    Rtbh,
}

/// Flowspec match detail for a block.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FlowspecScope {
    /// Restrict to this IP protocol (e.g. TCP for spam), or all when `None`.
    pub proto: Option<u8>,
    /// Restrict to these destination ports (e.g. 25), or all when empty.
    pub dports: Vec<u16>,
    /// Rate limit in bytes per second; 0 discards.
    pub rate_bytes_per_sec: u32,
}

/// One block the enforcers should hold: the unit of declarative enforcement.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DesiredBlock {
    /// The address or prefix (an IPv6 /64 when aggregated).
    pub target: IpNet,
    /// How it is held.
    pub kind: BlockKind,
    /// When it lifts by itself; `None` holds until a reconnect (or for good when terminated).
    pub expires: Option<Time>,
    /// BGP announcements to make for it.
    pub announce: Vec<Announce>,
    /// Flowspec match detail, when `announce` holds `Flowspec`.
    pub flowspec: Option<FlowspecScope>,
    /// Protected addresses inside `target` (the router's own, allowlisted ones): they stay
    /// reachable (the enforcer puts them into the allow guard that precedes every drop), and
    /// a block with exceptions is neither announced nor blackholed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<IpNet>,
}

/// The complete set of blocks the kernel and the BGP peers should hold, keyed by target.
///
/// The decision task sends a new one after every change; each enforcer computes the
/// difference with what it has applied and makes it so in one batch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredBlocks {
    /// Monotonic generation, so a writer can drop a stale set that arrives late.
    pub generation: u64,
    /// The blocks.
    pub blocks: BTreeMap<IpNet, DesiredBlock>,
    /// Sources to drop by learnt flowspec rules: traffic *from* them only, enforced on this
    /// router and never announced.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub learnt: BTreeSet<IpNet>,
}

/// Why a decision was taken.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Cause {
    /// A detection crossed a threshold.
    Detection {
        /// The category detected.
        category: Category,
    },
    /// An operator command (`egressguard block` / `unblock`).
    Operator {
        /// Who, as the control socket saw them (user name or uid).
        user: String,
        /// The reason or ticket they gave.
        reason: String,
    },
    /// A reconnect authorisation from the policy.
    Reconnect {
        /// The ticket.
        ticket: String,
        /// Who authorised it.
        authorised_by: String,
    },
    /// The block's time ran out.
    Expiry,
    /// Restored from the state database at start.
    Restore,
}

/// What the decision task did about an address; recorded in the audit trail and sent to the
/// notify hook.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// When.
    pub time: Time,
    /// The address or prefix.
    pub target: IpNet,
    /// The new hold, or `None` when the address was let back on.
    pub kind: Option<BlockKind>,
    /// When the hold lifts by itself.
    pub expires: Option<Time>,
    /// Offense number of this address within `forget_after` (0 for operator actions).
    pub offense: u32,
    /// Why.
    pub cause: Cause,
    /// True when the policy is in dry-run mode: logged, not enforced.
    pub dry_run: bool,
}

/// A change of one network entry's circuit breaker; sent to the notify hook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerEvent {
    /// When.
    pub time: Time,
    /// What happened.
    pub change: BreakerChange,
    /// The customer network entry (`networks[i].prefix`) whose breaker it is.
    pub network: IpNet,
    /// The entry's name, when it has one.
    pub name: Option<String>,
    /// New holds (customer aggregates) in the last minute when it tripped.
    pub count: u32,
    /// The per-minute cap.
    pub limit: u32,
    /// When a tripped breaker re-arms by itself.
    pub rearms_at: Option<Time>,
    /// Who re-armed it: `cool-down`, `policy reload` or the operator's user name.
    pub by: String,
    /// In words, for logs and mails.
    pub reason: String,
}

/// What happened to a network entry's circuit breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerChange {
    /// It tripped: the entry takes no new automatic holds until it re-arms.
    Tripped,
    /// It re-armed (cool-down over, or reset by an operator).
    Rearmed,
}

impl BreakerChange {
    /// The stable name (`tripped`, `rearmed`).
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerChange::Tripped => "tripped",
            BreakerChange::Rearmed => "rearmed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observation_round_trips_as_json() {
        let obs = Observation::Flow(FlowEvent {
            time: Time::from_secs(1),
            kind: FlowEventKind::New,
            src: "203.0.113.7".parse().unwrap(),
            dst: "198.51.100.1".parse().unwrap(),
            proto: proto::TCP,
            sport: 40000,
            dport: 22,
            icmp: None,
            status: ct_status::SEEN_REPLY,
            tcp_state: Some(TcpState::SynSent),
            orig_packets: None,
            orig_bytes: None,
            reply_packets: None,
            reply_bytes: None,
            start: None,
            stop: None,
            labels: 0,
        });
        let json = serde_json::to_string(&obs).unwrap();
        assert!(json.contains(r#""type":"flow""#), "{json}");
        let back: Observation = serde_json::from_str(&json).unwrap();
        assert_eq!(back, obs);
    }

    #[test]
    fn counter_rates() {
        let s = CounterSample {
            time: Time::from_secs(2),
            addr: "203.0.113.7".parse().unwrap(),
            packets: 500,
            bytes: 1_000,
            interval_ns: 500_000_000,
            udp_packets: 0,
            echo_packets: 0,
        };
        assert_eq!(s.pps(), 1000.0);
        assert_eq!(s.bps(), 16_000.0);
    }
}
