//! The documented defaults of every policy setting.
//!
//! `policies/default.yaml` repeats these values with their explanation; a unit test keeps the
//! two in step. Change a default here and there together.

use std::time::Duration;

/// Schema version this build reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Name of the profile every other profile inherits from.
pub const DEFAULT_PROFILE: &str = "default";

// flood
pub const FLOOD_WINDOW: Duration = Duration::from_secs(10);
pub const FLOOD_PPS: u64 = 150_000;
pub const FLOOD_BPS: u64 = 5_000_000_000;
/// Unanswered UDP packets/s beyond one per new flow: a single-flow UDP flood (FastNetMon's
/// default 20k for all packets); answered UDP (DNS, QUIC, VPN, RTP) never counts.
pub const FLOOD_UDP_PPS: u64 = 20_000;
/// ICMP(v6) echo requests/s: a ping flood, answered or not.
pub const FLOOD_ICMP_PPS: u64 = 5_000;
pub const FLOOD_NEW_FLOWS_PER_SEC: u64 = 2_000;
pub const FLOOD_UNREPLIED_SYN_PER_SEC: u64 = 500;
/// Chargen, DNS, NTP, NetBIOS, SNMP, CLDAP, SSDP, WS-Discovery, mDNS, memcached.
pub const FLOOD_AMPLIFICATION_PORTS: &[u16] =
    &[19, 53, 123, 137, 161, 389, 1900, 3702, 5353, 11211];
pub const FLOOD_AMPLIFICATION_FLOWS_PER_SEC: u64 = 500;
pub const FLOOD_MAX_TARGETS: u32 = 8;

// brute force
pub const BRUTE_WINDOW: Duration = Duration::from_secs(60);
pub const BRUTE_ATTEMPTS: u32 = 30;
pub const BRUTE_MAX_FLOW_DURATION: Duration = Duration::from_secs(15);
/// FTP, SSH, telnet, POP3, IMAP, SMB, MSSQL, MySQL, RDP, PostgreSQL, VNC, MikroTik Winbox.
pub const BRUTE_PORTS: &[u16] = &[
    21, 22, 23, 110, 143, 445, 1433, 3306, 3389, 5432, 5900, 8291,
];
/// Spread brute force: completed short sessions to auth ports across all targets in the
/// window. A deployment tool reaching 10 hosts a few times makes ~30 sessions to 10 targets;
/// a botnet's guesser hits dozens of hosts with a few guesses each.
pub const BRUTE_SPREAD_ATTEMPTS: u32 = 60;
/// Spread brute force: distinct targets of those sessions.
pub const BRUTE_SPREAD_DISTINCT_TARGETS: u32 = 20;
/// The most distinct targets the per-source sketch tells apart (a 32-bit bitmap).
pub const BRUTE_SPREAD_MAX_DISTINCT_TARGETS: u32 = 32;
/// The most sessions the per-source counters hold in an epoch.
pub const BRUTE_SPREAD_MAX_ATTEMPTS: u32 = 255;

// port scan
pub const PORTSCAN_WINDOW: Duration = Duration::from_secs(60);
pub const PORTSCAN_DISTINCT_PORTS: u32 = 100;
pub const PORTSCAN_MIN_UNANSWERED_RATIO: f64 = 0.5;
/// nmap -sU against a Linux target whose closed ports answer at the kernel's ICMP rate limit
/// (about one per second) probes some 60 distinct ports a minute; one traceroute uses at
/// most 90 ports, all inside the excluded traceroute ranges.
pub const PORTSCAN_UDP_DISTINCT_PORTS: u32 = 50;

// network scan
pub const NETSCAN_WINDOW: Duration = Duration::from_secs(60);
pub const NETSCAN_DISTINCT_DESTINATIONS: u32 = 200;
pub const NETSCAN_MIN_UNANSWERED_RATIO: f64 = 0.5;
/// The same fan-out as an unanswered sweep: what tells a scanner from a busy client is that
/// it never completes a handshake, not how many targets it has.
pub const NETSCAN_ANSWERED_DISTINCT_DESTINATIONS: u32 = 200;
pub const NETSCAN_MIN_INCOMPLETE_RATIO: f64 = 0.5;
pub const NETSCAN_SLOW_WINDOW: Duration = Duration::from_secs(3_600);
/// One probe per second reaches it in 5 minutes; 300 fresh destinations an hour, nearly all
/// not carried through, on a few ports is no benign workload's pattern.
pub const NETSCAN_SLOW_DISTINCT_DESTINATIONS: u32 = 300;

// spam
pub const SPAM_WINDOW: Duration = Duration::from_secs(300);
pub const SPAM_DISTINCT_DESTINATIONS: u32 = 40;
/// SMTP, submission over TLS, submission: a client submits to one or two servers, so
/// fan-out on 465/587 to many destinations is abuse as much as on 25.
pub const SPAM_PORTS: &[u16] = &[25, 465, 587];

// escalation
pub const FORGET_AFTER: Duration = Duration::from_secs(180 * 86_400);
pub const FIRST_QUARANTINE: Duration = Duration::from_secs(3_600);
/// Whether the holds of a rung are announced to the BGP peers, by the rung's action: a
/// quarantine is enforced on this router only (its walled garden stays reachable there), a
/// block and a termination are announced as `actions:` (or `operator_blocks:`) say.
pub const fn rung_announce(kind: crate::messages::BlockKind) -> bool {
    !matches!(kind, crate::messages::BlockKind::Quarantine)
}

// reconnect
pub const RECONNECT_REQUIRES: &[&str] = &["fee_paid", "reinstalled", "acknowledged"];

// enforcement
pub const NFT_TABLE: &str = "egressguard";
pub const BLACKHOLE_TABLE: u32 = 254;
/// Route protocol number tagging the agent's blackhole routes (unassigned in
/// `/etc/iproute2/rt_protos`).
pub const BLACKHOLE_PROTOCOL: u8 = 201;
/// Offenders' IPv6 addresses are held per /64: a customer server owns its /64 and can hop
/// between its addresses at will.
pub const IPV6_BLOCK_PREFIX: u8 = 64;
pub const RECONCILE_INTERVAL: Duration = Duration::from_millis(500);

// circuit breaker
pub const BREAKER_MAX_NEW_BLOCKS_PER_MINUTE: u32 = 20;
pub const BREAKER_MAX_BLOCKS_PER_NETWORK: u32 = 32;
/// How long a tripped network entry takes no new automatic holds before it re-arms by itself.
pub const BREAKER_COOL_DOWN: Duration = Duration::from_secs(600);
/// Anti-spoofing: on. A source address bound to one MAC address, sent from another, is
/// dropped before conntrack and counted against the sender.
pub const ANTI_SPOOFING_ENABLED: bool = true;
/// Anti-spoofing: bindings are learnt from the router's neighbour table.
pub const ANTI_SPOOFING_LEARN: bool = true;
/// A learnt binding moves to another MAC address only after its own MAC has not been seen
/// with the address for this long (a moved or replaced server; a poisoner must outlast it).
pub const ANTI_SPOOFING_REBIND_AFTER: Duration = Duration::from_secs(600);
/// Forged packets from one MAC address within [`ANTI_SPOOFING_WINDOW`] that make a
/// spoofing detection against the addresses bound to that MAC.
pub const ANTI_SPOOFING_PACKETS: u64 = 10;
/// The window [`ANTI_SPOOFING_PACKETS`] counts in.
pub const ANTI_SPOOFING_WINDOW: Duration = Duration::from_secs(60);
/// Most learnt bindings kept (the neighbour table of a large segment; each ~100 B).
pub const ANTI_SPOOFING_MAX_BINDINGS: u32 = 65_536;

/// Prefix length of one customer's allocation inside an IPv4 network entry: an address.
pub const CUSTOMER_PREFIX_V4: u8 = 32;
/// Prefix length of one customer's allocation inside an IPv6 network entry: a /64
/// (RFC 6177, and the smallest subnet SLAAC works on).
pub const CUSTOMER_PREFIX_V6: u8 = 64;

// bgp
pub const BGP_PORT: u16 = 179;
pub const BGP_HOLD_TIME: u16 = 90;
/// Flowspec rules in force from one `accept_flowspec` peer; more are refused and counted.
pub const MAX_LEARNED: u32 = 1000;
/// Graceful restart (RFC 4724): how long a peer keeps our routes after the session drops
/// (the agent restarting or crashing) before it removes them.
pub const GR_RESTART_TIME: Duration = Duration::from_secs(120);
/// Long-lived graceful restart (RFC 9494): how much longer a peer that supports it keeps
/// them, as long-lived stale routes, once the restart time is over.
pub const GR_LONG_LIVED_STALE_TIME: Duration = Duration::from_secs(3600);
/// Largest restart time: the capability has 12 bits for it.
pub const GR_RESTART_TIME_MAX: u64 = 4095;
/// Largest long-lived stale time: 24 bits.
pub const GR_LONG_LIVED_STALE_TIME_MAX: u64 = 0xff_ffff;
/// Most communities in one of a peer's community lists (`rtbh_communities`,
/// `flowspec_communities`): 64 large communities are 768 bytes, which keeps every UPDATE
/// within 4096 bytes.
pub const MAX_COMMUNITIES: usize = 64;

// notify
pub const NOTIFY_TIMEOUT: Duration = Duration::from_secs(10);
pub const NOTIFY_RETRIES: u32 = 3;

// detection
pub const EVALUATION_INTERVAL: Duration = Duration::from_millis(250);
pub const COUNTER_INTERVAL: Duration = Duration::from_secs(1);
/// How long a source at twice a flood threshold goes before the kernel meter reports it:
/// the meter's burst is `threshold × tolerance`.
pub const FLOOD_TOLERANCE: Duration = Duration::from_millis(200);
/// New flows per second of one source above which the kernel reports one flow in 16.
pub const SAMPLE_FLOWS_ABOVE: u64 = 5_000;
pub const MAX_SOURCES: u32 = 262_144;
