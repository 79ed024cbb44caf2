//! The policy: what to watch, what counts as abuse, what to do about it, and who may be let
//! back on.
//!
//! The file is YAML, schema version 1 (see `policies/default.yaml` for the documented
//! reference). Loading goes in three steps:
//!
//! 1. [`raw`]: serde reads the text into [`raw::RawPolicy`]; unknown fields and wrong shapes
//!    stop here with the line and column serde_yaml reports.
//! 2. [`locate`]: an independent pass over the YAML events maps every path
//!    (`networks[2].prefix`) to its line and column.
//! 3. `validate`: every value is parsed and every rule checked; *all* errors are collected,
//!    each placed at its path's position, and the typed [`Policy`] is built.
//!
//! The typed policy is immutable and cheap to share (`Arc<Policy>`); a reload builds a new one
//! and swaps it in only when it validated.

pub mod defaults;
mod error;
pub mod locate;
pub mod raw;
mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;

pub use error::{Diagnostic, PolicyError, Severity};
pub use raw::{FlowspecMatch, Mode};

use crate::messages::{Announce, BlockKind, Category, Time};

/// A validated policy.
#[derive(Clone, Debug, Serialize)]
pub struct Policy {
    /// Where it was read from, and a digest of its text.
    pub source: PolicySource,
    /// Enforce, or only log.
    pub mode: Mode,
    /// Customer networks, most specific first (so the first match is the longest prefix).
    pub networks: Vec<Network>,
    /// Profiles by name, each fully resolved (built-in defaults ← `default` ← the profile).
    pub profiles: BTreeMap<String, Profile>,
    /// Addresses and prefixes never to block.
    pub allow: Vec<IpNet>,
    /// Also protect the router's own addresses, BGP peers and walled-garden destinations.
    pub protect_infrastructure: bool,
    /// Per-category actions.
    pub actions: BTreeMap<Category, CategoryAction>,
    /// What the holds an operator makes are announced as.
    pub operator_blocks: OperatorBlocks,
    /// The escalation ladder.
    pub escalation: Escalation,
    /// Conditions every reconnect authorisation must attest.
    pub reconnect_requires: BTreeSet<String>,
    /// Reconnect authorisations.
    pub reconnect: Vec<Reconnect>,
    /// Router-side enforcement.
    pub enforcement: Enforcement,
    /// Circuit breaker limits.
    pub circuit_breaker: CircuitBreaker,
    /// Source-address bindings on shared customer segments.
    pub anti_spoofing: AntiSpoofing,
    /// BGP speaker, when configured.
    pub bgp: Option<Bgp>,
    /// Alerts.
    pub notify: Notify,
    /// Prometheus exposition address, when turned on.
    pub metrics: Option<SocketAddr>,
    /// Detection engine settings.
    pub detection: DetectionSettings,
}

/// Where a policy came from.
#[derive(Clone, Debug, Serialize)]
pub struct PolicySource {
    /// The file (or `<inline>` in tests).
    pub path: PathBuf,
    /// Short digest of the file's text, shown by `status` as the policy version.
    pub digest: String,
}

/// A customer network to watch.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Network {
    /// The prefix.
    pub prefix: IpNet,
    /// The profile its thresholds come from.
    pub profile: String,
    /// Optional label for logs.
    pub name: Option<String>,
    /// Prefix length of one customer's allocation in this entry (IPv4 default 32, IPv6
    /// default 64): the circuit breaker counts holds inside one such prefix once.
    pub customer_prefix: u8,
}

impl Network {
    /// The customer aggregate that `target` falls in: `target` widened to
    /// `customer_prefix` (a target already at least that wide is its own aggregate).
    pub fn aggregate_of(&self, target: &IpNet) -> IpNet {
        if target.prefix_len() <= self.customer_prefix {
            target.trunc()
        } else {
            IpNet::new(target.addr(), self.customer_prefix)
                .map(|n| n.trunc())
                .unwrap_or(*target)
        }
    }

    /// The entry's label for logs and `status`: its name, else its prefix.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.prefix.to_string())
    }
}

/// Thresholds per category, fully resolved.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Profile {
    /// Outgoing (D)DoS.
    pub flood: Flood,
    /// Brute force.
    pub brute_force: BruteForce,
    /// Port scan.
    pub port_scan: PortScan,
    /// Network scan.
    pub network_scan: NetworkScan,
    /// Spam.
    pub spam: Spam,
}

impl Profile {
    /// Whether a category is detected at all under this profile.
    pub fn enabled(&self, c: Category) -> bool {
        match c {
            Category::Flood => self.flood.enabled,
            Category::BruteForce => self.brute_force.enabled,
            Category::PortScan => self.port_scan.enabled,
            Category::NetworkScan => self.network_scan.enabled,
            Category::Spam => self.spam.enabled,
            // Not a profile's: `anti_spoofing.enabled` turns it on and off.
            Category::Spoofing => true,
        }
    }
}

/// Flood thresholds. Any one crossed in `window` is a detection.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Flood {
    /// Detect floods at all.
    pub enabled: bool,
    /// Averaging window.
    #[serde(serialize_with = "ser::duration")]
    pub window: Duration,
    /// Packets per second from one source (nft counters).
    pub pps: u64,
    /// Bits per second from one source (nft counters).
    pub bps: u64,
    /// UDP packets per second of flows the source opened that were never answered, less
    /// its new flows per second (each flow's first packet): a single-flow UDP flood.
    pub udp_pps: u64,
    /// ICMP and ICMPv6 echo requests per second from one source: a ping flood, answered or
    /// not.
    pub icmp_pps: u64,
    /// New flows per second from one source.
    pub new_flows_per_sec: u64,
    /// TCP SYNs per second that were never answered.
    pub unreplied_syn_per_sec: u64,
    /// UDP ports prone to amplification (DNS, NTP, SSDP, memcached, ...).
    pub amplification_ports: Vec<u16>,
    /// New UDP flows per second to amplification ports.
    pub amplification_flows_per_sec: u64,
    /// A flood goes to at most this many targets; wider fan-out is a scan.
    pub max_targets: u32,
}

/// Brute-force thresholds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BruteForce {
    /// Detect brute force at all.
    pub enabled: bool,
    /// Window.
    #[serde(serialize_with = "ser::duration")]
    pub window: Duration,
    /// Connections to one target's authentication port within the window.
    pub attempts: u32,
    /// Only flows shorter than this count as attempts.
    #[serde(serialize_with = "ser::duration")]
    pub max_flow_duration: Duration,
    /// Authentication ports.
    pub ports: Vec<u16>,
    /// Spread brute force: a few attempts at each of many targets.
    pub spread: Spread,
}

/// Spread brute-force thresholds: completed short sessions to authentication ports across
/// targets (the per-target `attempts` is never reached when a guesser moves on after a few
/// tries).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Spread {
    /// Detect spread brute force at all.
    pub enabled: bool,
    /// Completed short sessions to authentication ports, all targets, within the window.
    pub attempts: u32,
    /// Distinct targets of those sessions.
    pub distinct_targets: u32,
}

/// Port-scan thresholds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PortScan {
    /// Detect port scans at all.
    pub enabled: bool,
    /// Window.
    #[serde(serialize_with = "ser::duration")]
    pub window: Duration,
    /// Distinct destination ports on one target within the window.
    pub distinct_ports: u32,
    /// Share of those flows that went unanswered or were reset (0..=1).
    pub min_unanswered_ratio: f64,
    /// UDP scan: distinct UDP ports of one target within the window (outside the
    /// traceroute port ranges), the flows unanswered as `min_unanswered_ratio` says; 0 off.
    /// A closed UDP port answers with an ICMP port-unreachable, which the target's kernel
    /// rate-limits (Linux: about one per second), so a UDP scan crawls below
    /// `distinct_ports`.
    pub udp_distinct_ports: u32,
}

/// Network-scan thresholds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NetworkScan {
    /// Detect network scans at all.
    pub enabled: bool,
    /// Window.
    #[serde(serialize_with = "ser::duration")]
    pub window: Duration,
    /// Distinct destination addresses on one port within the window.
    pub distinct_destinations: u32,
    /// Share of those flows that went unanswered (0..=1).
    pub min_unanswered_ratio: f64,
    /// Answered sweep: distinct destinations on few ports within the window whose flows
    /// the source did not carry through (TCP never established: a stateless scanner's
    /// half-open or reset probes; anything unanswered), whatever the targets answered; 0 off.
    pub answered_distinct_destinations: u32,
    /// Share of the flows not carried through for an answered or a slow sweep (0..=1).
    pub min_incomplete_ratio: f64,
    /// Slow sweeps, over a long window.
    pub slow: SlowScan,
}

/// Slow network scans: the same signals as an answered sweep over a long window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SlowScan {
    /// Detect slow sweeps at all.
    pub enabled: bool,
    /// Window.
    #[serde(serialize_with = "ser::duration")]
    pub window: Duration,
    /// Distinct destinations on few ports within the window.
    pub distinct_destinations: u32,
}

/// Spam thresholds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Spam {
    /// Detect spam at all (off for mail relays).
    pub enabled: bool,
    /// Window.
    #[serde(serialize_with = "ser::duration")]
    pub window: Duration,
    /// Distinct SMTP destinations within the window.
    pub distinct_destinations: u32,
    /// SMTP ports (default 25, 465 and 587).
    pub ports: Vec<u16>,
}

/// What to do about one category.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CategoryAction {
    /// The ladder rung (1-based) the first offense of this category starts on at least.
    pub start_at: usize,
    /// BGP announcements for blocks of this category.
    pub announce: Vec<Announce>,
    /// How narrowly the flowspec rule matches.
    pub flowspec_match: FlowspecMatch,
    /// Flowspec rate limit in bytes per second; 0 discards.
    pub rate_limit: u32,
}

/// What to announce for a hold an operator made (`egressguard block`), which has no category.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OperatorBlocks {
    /// BGP announcements; by default every kind any category announces (the strictest).
    pub announce: Vec<Announce>,
    /// Flowspec rate limit in bytes per second; 0 discards. The rule matches the whole
    /// source (an operator block names no service).
    pub rate_limit: u32,
}

/// The escalation ladder.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Escalation {
    /// Offenses older than this no longer count.
    #[serde(serialize_with = "ser::duration")]
    pub forget_after: Duration,
    /// Rung N applies to the Nth offense; the last rung repeats.
    pub ladder: Vec<Rung>,
}

impl Escalation {
    /// The rung for the `offense`th offense (1-based), starting at least at `start_at`.
    pub fn rung(&self, offense: u32, start_at: usize) -> &Rung {
        let n = (offense.max(1) as usize).max(start_at.max(1));
        &self.ladder[n.min(self.ladder.len()) - 1]
    }
}

/// One rung of the ladder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Rung {
    /// Quarantine, block or terminate.
    pub kind: BlockKind,
    /// How long.
    pub hold: Hold,
    /// Whether its holds are announced to the BGP peers (as `actions:` say for the hold's
    /// category); default [`defaults::rung_announce`].
    pub announce: bool,
}

/// How long a rung holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// For a fixed time, then lifted by itself.
    For(Duration),
    /// Until a reconnect authorisation lifts it.
    UntilReconnect,
    /// For good (termination); only an explicit override lifts it.
    Forever,
}

impl Serialize for Hold {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Hold::For(d) => s.collect_str(&format_args!("for {}", format_duration(*d))),
            Hold::UntilReconnect => s.serialize_str("until reconnect"),
            Hold::Forever => s.serialize_str("forever"),
        }
    }
}

/// A duration in the largest unit that divides it exactly: `180d`, `90m`, `250ms`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    match s {
        0 => "0s".to_owned(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Serialisation of the effective policy in the units the file is written in.
mod ser {
    use std::time::Duration;

    use crate::messages::Time;

    pub fn duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&super::format_duration(*d))
    }

    pub fn time<S: serde::Serializer>(t: &Time, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(t)
    }
}

/// A reconnect authorisation written by the abuse desk.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reconnect {
    /// The address (or aggregated prefix) to let back on.
    pub address: IpNet,
    /// The abuse desk's ticket; an authorisation is used once per ticket.
    pub ticket: String,
    /// Who authorised it.
    pub authorised_by: String,
    /// The conditions attested.
    pub conditions: BTreeSet<String>,
    /// After this the authorisation is void.
    #[serde(serialize_with = "ser::time")]
    pub expires: Time,
    /// Lift even a termination.
    pub override_termination: bool,
}

/// Router-side enforcement settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Enforcement {
    /// The nft table (family `inet`) the agent owns.
    pub table: String,
    /// What a quarantined address may still reach.
    pub walled_garden: Vec<IpNet>,
    /// Blackhole routes.
    pub blackhole: Blackhole,
    /// IPv6 block prefix length: 128 blocks the address, 64 its /64.
    pub ipv6_block_prefix: u8,
    /// How often the kernel's state is compared with the desired state.
    #[serde(serialize_with = "ser::duration")]
    pub reconcile_interval: Duration,
}

/// Blackhole route settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Blackhole {
    /// Install blackhole routes.
    pub enabled: bool,
    /// Routing table id (254 is `main`).
    pub table: u32,
    /// Route protocol number that tags the agent's routes.
    pub protocol: u8,
}

/// Circuit breaker limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CircuitBreaker {
    /// New automatic holds per minute inside one customer network entry, counted per
    /// customer aggregate; one more trips that entry's breaker.
    pub max_new_blocks_per_minute: u32,
    /// Active automatic holds inside one customer network entry, counted per customer
    /// aggregate.
    pub max_blocks_per_network: u32,
    /// How long a tripped entry takes no new automatic holds before it re-arms by itself.
    #[serde(serialize_with = "ser::duration")]
    pub cool_down: Duration,
}

/// Anti-spoofing: which MAC address may send with which customer source address.
///
/// An address with a binding (static, or learnt from the router's neighbour table) that
/// arrives from another MAC address is dropped before conntrack sees it, so it never counts
/// against its owner; the drops are counted per sending MAC, and the addresses bound to that
/// MAC are detected as [`Category::Spoofing`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AntiSpoofing {
    /// Bind, drop and detect at all.
    pub enabled: bool,
    /// Learn bindings from the router's neighbour table (ARP/NDP).
    pub learn: bool,
    /// Static bindings: the address may be sent only from this MAC; never relearnt.
    pub bindings: Vec<Binding>,
    /// Addresses never bound (floating addresses that move between servers: VRRP, keepalived).
    pub exempt: Vec<IpNet>,
    /// A learnt binding moves to another MAC only after its MAC has not been seen with the
    /// address for this long.
    #[serde(serialize_with = "ser::duration")]
    pub rebind_after: Duration,
    /// Forged packets from one MAC within `window` that make a detection.
    pub packets: u64,
    /// The window `packets` counts in.
    #[serde(serialize_with = "ser::duration")]
    pub window: Duration,
    /// Most learnt bindings kept.
    pub max_bindings: u32,
}

/// One static binding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Binding {
    /// The customer address.
    pub address: IpAddr,
    /// The only MAC address it may be sent from (lower case, colon-separated).
    pub mac: String,
}

/// BGP speaker settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Bgp {
    /// Our AS.
    pub local_as: u32,
    /// Our router id.
    pub router_id: Ipv4Addr,
    /// Peers.
    pub peers: Vec<Peer>,
    /// Where to accept inbound BGP connections from the peers (off when `None`).
    pub listen: Option<std::net::SocketAddr>,
    /// What a learnt flowspec rule may cover, derived from `networks:` and the block widths
    /// (not written in the `bgp:` section).
    pub learn: LearnBounds,
    /// Graceful restart advertised to every peer (`bgp.graceful_restart:`).
    pub graceful_restart: GracefulRestart,
}

/// Graceful restart as the restarting speaker (RFC 4724) and long-lived graceful restart
/// (RFC 9494): how long peers keep the agent's routes when its sessions drop without a
/// NOTIFICATION (restart, crash, `systemctl stop`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GracefulRestart {
    /// Restart time in seconds advertised (0: graceful restart off, and with it LLGR).
    pub restart_time: u16,
    /// Long-lived stale time in seconds advertised (0: LLGR off).
    pub long_lived_stale_time: u32,
}

impl GracefulRestart {
    /// Graceful restart is advertised.
    pub fn enabled(&self) -> bool {
        self.restart_time > 0
    }
}

impl Default for GracefulRestart {
    fn default() -> GracefulRestart {
        GracefulRestart {
            restart_time: defaults::GR_RESTART_TIME.as_secs() as u16,
            long_lived_stale_time: defaults::GR_LONG_LIVED_STALE_TIME.as_secs() as u32,
        }
    }
}

/// The bounds of learnt flowspec rules: a source inside one of `networks` and no wider than
/// the widths the agent itself blocks (an IPv4 address, an IPv6 `ipv6_block_prefix`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LearnBounds {
    /// The customer networks.
    pub networks: Vec<IpNet>,
    /// Shortest IPv4 source prefix accepted (32).
    pub ipv4_width: u8,
    /// Shortest IPv6 source prefix accepted (`enforcement.ipv6_block_prefix`).
    pub ipv6_width: u8,
}

/// Address families of a BGP session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// AFI 1 SAFI 1.
    Ipv4Unicast,
    /// AFI 2 SAFI 1.
    Ipv6Unicast,
    /// AFI 1 SAFI 133.
    Ipv4Flowspec,
    /// AFI 2 SAFI 133.
    Ipv6Flowspec,
}

impl Family {
    /// All families with their policy names.
    pub const ALL: [(Family, &'static str); 4] = [
        (Family::Ipv4Unicast, "ipv4-unicast"),
        (Family::Ipv6Unicast, "ipv6-unicast"),
        (Family::Ipv4Flowspec, "ipv4-flowspec"),
        (Family::Ipv6Flowspec, "ipv6-flowspec"),
    ];
}

/// A BGP community from the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Community {
    /// RFC 1997 `asn:value`.
    Standard(u16, u16),
    /// RFC 8092 `global:local1:local2`.
    Large(u32, u32, u32),
}

/// A BGP peer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Peer {
    /// Label for logs and `status`.
    pub name: String,
    /// Peer address.
    pub address: IpAddr,
    /// TCP port.
    pub port: u16,
    /// Peer AS (equal to `local_as` for iBGP).
    pub remote_as: u32,
    /// Local address to bind.
    pub local_address: Option<IpAddr>,
    /// Proposed hold time in seconds (0 or at least 3).
    pub hold_time: u16,
    /// Families to negotiate.
    pub families: Vec<Family>,
    /// What to announce to this peer.
    pub announce: Vec<Announce>,
    /// Extra communities on RTBH routes (65535:666 and NO_EXPORT are always added).
    pub rtbh_communities: Vec<Community>,
    /// Communities on flowspec routes (none by default).
    pub flowspec_communities: Vec<Community>,
    /// Next hop of IPv4 RTBH routes.
    pub rtbh_next_hop_v4: Option<Ipv4Addr>,
    /// Next hop of IPv6 RTBH routes.
    pub rtbh_next_hop_v6: Option<std::net::Ipv6Addr>,
    /// Enforce flowspec rules learnt from this peer (within [`Bgp::learn`]).
    pub accept_flowspec: bool,
    /// Most learnt rules in force from this peer; more are refused and counted.
    pub max_learned: u32,
    /// File holding the TCP MD5 password.
    pub md5_password_file: Option<PathBuf>,
    /// Never connect to the peer; wait for it on `bgp.listen`.
    pub passive: bool,
}

/// Alerting.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Notify {
    /// Command run per decision, decision JSON on stdin.
    pub command: Option<Vec<String>>,
    /// How long the command may run.
    #[serde(serialize_with = "ser::duration")]
    pub timeout: Duration,
    /// Retries after a failure.
    pub retries: u32,
    /// Where X-ARF style abuse reports are written, one per incident.
    pub report_dir: Option<PathBuf>,
    /// Reporter address in the abuse reports.
    pub reporter: Option<String>,
}

/// Detection engine settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DetectionSettings {
    /// How often windows are evaluated.
    #[serde(serialize_with = "ser::duration")]
    pub evaluation_interval: Duration,
    /// How often nft counters are read.
    #[serde(serialize_with = "ser::duration")]
    pub counter_interval: Duration,
    /// Hard cap of tracked sources; the idlest is evicted beyond it.
    pub max_sources: u32,
    /// How long a source may exceed a packet or flow flood threshold, at twice its rate,
    /// before the kernel's per-source meter reports it (the meter's burst is `threshold ×
    /// tolerance`): shorter bursts are not floods.
    #[serde(serialize_with = "ser::duration")]
    pub flood_tolerance: Duration,
    /// New flows per second of one source above which the kernel reports only one of its
    /// flows in [`crate::meter::SAMPLE_ONE_IN`] (and the detector counts each sixteen times);
    /// 0: every flow is reported.
    pub sample_flows_above: u64,
}

/// Reads a policy file as text, refusing one larger than [`locate::MAX_POLICY_BYTES`]
/// without reading it whole (a policy path pointed at a huge file or a device must not
/// cost the agent its memory).
pub fn read_text(path: &Path) -> Result<String, PolicyError> {
    use std::io::Read;
    let err = |source| PolicyError::Read {
        path: path.to_owned(),
        source,
    };
    let f = std::fs::File::open(path).map_err(err)?;
    let limit = locate::MAX_POLICY_BYTES as u64;
    let mut text = String::new();
    f.take(limit + 1).read_to_string(&mut text).map_err(err)?;
    if text.len() as u64 > limit {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!(
                "the file is larger than {} MiB, the most the policy reader accepts",
                limit >> 20
            ),
        )));
    }
    Ok(text)
}

impl Policy {
    /// Reads, validates and returns the policy at `path`.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        Policy::from_text(&read_text(path)?, path)
    }

    /// Validates policy text; `path` is used in diagnostics only.
    pub fn from_text(text: &str, path: &Path) -> Result<Policy, PolicyError> {
        let (policy, diags) = validate::validate(text, path, &[]);
        let errors: Vec<Diagnostic> = diags
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .cloned()
            .collect();
        match policy {
            Some(p) if errors.is_empty() => Ok(p),
            _ => Err(PolicyError::Invalid(errors)),
        }
    }

    /// Validates policy text and returns every diagnostic (errors and warnings) with the
    /// policy when it is valid. This is what `egressguard check` prints.
    pub fn check_text(text: &str, path: &Path) -> (Option<Policy>, Vec<Diagnostic>) {
        Policy::check_text_on(text, path, &[])
    }

    /// [`Policy::check_text`] on the router itself: `host` are its own addresses (interfaces,
    /// resolvers), and a held width that would include one of them is a warning.
    pub fn check_text_on(
        text: &str,
        path: &Path,
        host: &[IpAddr],
    ) -> (Option<Policy>, Vec<Diagnostic>) {
        let (policy, diags) = validate::validate(text, path, host);
        let ok = !diags.iter().any(|d| d.severity == Severity::Error);
        (if ok { policy } else { None }, diags)
    }

    /// The customer network that holds `addr`, by longest prefix.
    pub fn network_of(&self, addr: IpAddr) -> Option<&Network> {
        self.networks.iter().find(|n| n.prefix.contains(&addr))
    }

    /// The network entry `spec` names: its prefix exactly, else the entry an address or
    /// prefix lies in (longest prefix), else the entry of that name.
    pub fn find_network(&self, spec: &str) -> Option<&Network> {
        let spec = spec.trim();
        let net = spec
            .parse::<IpNet>()
            .ok()
            .or_else(|| spec.parse::<IpAddr>().ok().map(IpNet::from));
        match net {
            Some(net) => self
                .networks
                .iter()
                .find(|n| n.prefix == net.trunc())
                .or_else(|| self.networks.iter().find(|n| n.prefix.contains(&net))),
            None => self
                .networks
                .iter()
                .find(|n| n.name.as_deref() == Some(spec)),
        }
    }

    /// The profile for `addr`, when it is a customer address.
    pub fn profile_of(&self, addr: IpAddr) -> Option<(&str, &Profile)> {
        let n = self.network_of(addr)?;
        let p = self.profiles.get(&n.profile)?;
        Some((n.profile.as_str(), p))
    }

    /// Whether `addr` is allowlisted.
    pub fn is_allowed(&self, addr: IpAddr) -> bool {
        self.allow.iter().any(|a| a.contains(&addr))
    }

    /// Whether any allowlisted address lies inside `net` or `net` inside one (blocking `net`
    /// would touch allowlisted space).
    pub fn allow_overlaps(&self, net: &IpNet) -> bool {
        self.allow
            .iter()
            .any(|a| net.contains(a) || a.contains(net))
    }

    /// Whether `net` lies wholly inside allowlisted space (so it is never held).
    pub fn allow_covers(&self, net: &IpNet) -> bool {
        self.allow.iter().any(|a| a.contains(net))
    }

    /// The allowlisted prefixes strictly inside `net`: a hold of `net` keeps them reachable.
    pub fn allow_inside(&self, net: &IpNet) -> impl Iterator<Item = IpNet> + '_ {
        let net = *net;
        self.allow
            .iter()
            .filter(move |a| net.contains(*a) && !a.contains(&net))
            .copied()
    }

    /// What to block for an offending `addr`: the address itself, or its IPv6 aggregate.
    pub fn block_target(&self, addr: IpAddr) -> IpNet {
        match addr {
            IpAddr::V4(_) => IpNet::from(addr),
            IpAddr::V6(_) => IpNet::new(addr, self.enforcement.ipv6_block_prefix)
                .map(|n| n.trunc())
                .unwrap_or_else(|_| IpNet::from(addr)),
        }
    }

    /// The action settings for a category.
    pub fn action(&self, c: Category) -> &CategoryAction {
        &self.actions[&c]
    }

    /// Whether the agent enforces (as opposed to dry-run).
    pub fn enforcing(&self) -> bool {
        self.mode == Mode::Enforce
    }
}

#[cfg(test)]
mod tests;
