//! The control protocol's messages. Stable JSON: `egressguard <verb> --json` prints the
//! reply body exactly as defined here, so scripts can rely on these field names.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::messages::{BlockKind, Category, Evidence, Time};

/// Offenses (and audit entries) in one `show` reply when the request names no limit.
pub const DEFAULT_PAGE: usize = 20;
/// The most offenses (and audit entries) one `show` reply carries, whatever is asked: an
/// offense with its evidence is a few KiB, so a page stays well under a MiB. `show --all`
/// asks page after page.
pub const MAX_PAGE: usize = 100;

/// A request from the CLI.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case")]
pub enum Request {
    /// Agent state summary.
    Status,
    /// Active blocks.
    List,
    /// Offense history of one address, one page of it: the newest `limit` offenses and
    /// audit entries after skipping the `offset` newest.
    Show {
        /// The address, or the held prefix (an IPv6 aggregate such as a /64).
        addr: IpNet,
        /// Entries per page; [`DEFAULT_PAGE`] when absent, at most [`MAX_PAGE`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
        /// How many of the newest entries to skip (the pages before this one).
        #[serde(default, skip_serializing_if = "is_zero")]
        offset: usize,
    },
    /// Manual block.
    Block {
        /// The address (`203.0.113.7`) or prefix (`203.0.113.0/28`).
        #[serde(deserialize_with = "address_or_prefix")]
        addr: IpNet,
        /// Why (goes to the audit trail and the notification).
        reason: String,
        /// How long, in seconds.
        for_secs: u64,
        /// Also a target outside every customer network (`--outside-networks`); protected
        /// addresses (loopback, link-local, multicast, unspecified, broadcast, the router's
        /// next hops) are refused whatever this says.
        #[serde(default)]
        outside_networks: bool,
    },
    /// Manual unblock.
    Unblock {
        /// The address, or the held prefix (an IPv6 aggregate such as a /64).
        addr: IpNet,
        /// The abuse desk's ticket that justifies it.
        ticket: String,
    },
    /// Re-read the policy file.
    Reload,
    /// Re-arm tripped circuit breakers (`egressguard breaker reset [NETWORK]`).
    BreakerReset {
        /// The network entry (its prefix, an address in it, or its name); every entry when
        /// absent.
        #[serde(default)]
        network: Option<String>,
    },
    /// What the reconnect list of a policy text would do now against the agent's state,
    /// without applying anything (for `check`).
    PreviewReconnects {
        /// The policy file's text.
        policy: String,
        /// Its path, for error positions.
        path: String,
    },
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// An address (`203.0.113.7`, held as its host prefix) or a prefix (`203.0.113.0/28`).
fn address_or_prefix<'de, D: serde::Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
    let s = String::deserialize(d)?;
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| serde::de::Error::custom(format!("`{s}` is neither an address nor a prefix")))
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    /// Done; the body depends on the request.
    Ok {
        /// The answer.
        body: Body,
    },
    /// Refused or failed; `error` says why in words for the operator.
    Error {
        /// What went wrong.
        error: String,
    },
}

/// Reply bodies, one per verb.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Body {
    /// `status`.
    Status(Box<StatusView>),
    /// `list`.
    List(Vec<BlockView>),
    /// `show`.
    Show(Box<HistoryView>),
    /// `check`: each reconnect authorisation's outcome if the policy were loaded now.
    Reconnects {
        /// In file order.
        reconnects: Vec<ReconnectView>,
    },
    /// `breaker reset`: the network entries re-armed now (empty when none was tripped).
    BreakerReset {
        /// The entries' prefixes.
        reset: Vec<IpNet>,
        /// What was done, in words.
        message: String,
    },
    /// `block`, `unblock`, `reload`: what was done, in words.
    Done {
        /// E.g. `blocked 203.0.113.7/32 until 2026-11-25T05:00:00Z`.
        message: String,
    },
}

/// `egressguard status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    /// Agent version.
    pub version: String,
    /// `enforce` or `dry-run`.
    pub mode: String,
    /// The policy file.
    pub policy_file: String,
    /// Digest of the policy in force.
    pub policy_version: String,
    /// When the agent started.
    pub started: Time,
    /// When this status was taken.
    pub now: Time,
    /// Sources the detector tracks now.
    pub sources_tracked: u64,
    /// The cap on tracked sources (`detection.max_sources`).
    #[serde(default)]
    pub max_sources: u64,
    /// Sources evicted (idlest first) to stay under the cap, since start.
    #[serde(default)]
    pub source_evictions: u64,
    /// Flows a resynchronising dump showed as started in the blind period after a loss,
    /// counted as new.
    #[serde(default)]
    pub flows_recovered: u64,
    /// Bytes held by the detector's tables, by its own account (slab, index, sample ring).
    #[serde(default)]
    pub detector_memory_bytes: u64,
    /// Flow events carrying a kernel flood meter's label since start (`crate::meter`).
    #[serde(default)]
    pub meter_reports: u64,
    /// New flows the kernel reported as one of 16 (a source above
    /// `detection.sample_flows_above`) since start.
    #[serde(default)]
    pub sampled_flows: u64,
    /// Conntrack events seen since start.
    pub events_seen: u64,
    /// Conntrack events the kernel dropped (ENOBUFS) since start.
    pub events_lost: u64,
    /// Time of the last conntrack event, if any.
    pub last_event: Option<Time>,
    /// Active quarantines.
    pub quarantined: u64,
    /// Active blocks.
    pub blocked: u64,
    /// Terminated addresses.
    pub terminated: u64,
    /// Holds suspended because their target became protected (not enforced, not lifted).
    #[serde(default)]
    pub suspended: u64,
    /// Circuit breaker.
    pub breaker: BreakerView,
    /// Anti-spoofing on shared segments.
    #[serde(default)]
    pub anti_spoofing: AntiSpoofView,
    /// BGP sessions.
    pub bgp: Vec<PeerView>,
    /// Flowspec rules learnt from `accept_flowspec` peers, by peer and source.
    #[serde(default)]
    pub learnt: Vec<LearntView>,
    /// The BGP listener, when `bgp.listen` is set.
    #[serde(default)]
    pub bgp_listener: Option<BgpListenerView>,
    /// Outcome of each reconnect authorisation at the last (re)load.
    pub reconnects: Vec<ReconnectView>,
    /// Things the operator should look at (no events seen, breaker tripped, ...).
    pub warnings: Vec<String>,
}

/// Anti-spoofing counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AntiSpoofView {
    /// Whether `anti_spoofing.enabled` is on.
    pub enabled: bool,
    /// Address–MAC bindings in force (static and learnt).
    pub bindings: u64,
    /// Packets with a forged bound source dropped (counted, in dry-run) since start.
    pub forged_packets: u64,
    /// Spoofing detections sent to the decisions since start.
    pub detections: u64,
}

/// Circuit breaker state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BreakerView {
    /// Whether new blocks are being held back.
    pub tripped: bool,
    /// Since when.
    pub since: Option<Time>,
    /// Why, in words.
    pub reason: Option<String>,
    /// Blocks held back while tripped.
    pub held_back: u64,
    /// How long a trip lasts unless reset, in seconds.
    #[serde(default)]
    pub cool_down_secs: u64,
    /// Every customer network entry's breaker, most specific first.
    #[serde(default)]
    pub networks: Vec<NetworkBreakerView>,
}

/// One customer network entry's circuit breaker (`status`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetworkBreakerView {
    /// The entry's prefix.
    pub network: IpNet,
    /// Its name.
    pub name: Option<String>,
    /// `armed` or `tripped`.
    pub state: String,
    /// When it tripped, while tripped.
    pub since: Option<Time>,
    /// When it re-arms by itself, while tripped.
    pub rearms_at: Option<Time>,
    /// Why it tripped, while tripped.
    pub reason: Option<String>,
    /// Prefix length of one customer aggregate in it.
    pub customer_prefix: u8,
    /// Customer aggregates newly held in the last minute.
    pub new_last_minute: u32,
    /// The per-minute cap.
    pub max_new_per_minute: u32,
    /// Customer aggregates held now by automatic holds.
    pub active: u32,
    /// The cap on them.
    pub max_active: u32,
    /// Detections suppressed in this entry since start.
    pub suppressed: u64,
}

/// One BGP session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerView {
    /// Peer name from the policy.
    pub name: String,
    /// Peer address.
    pub address: IpAddr,
    /// FSM state.
    pub state: String,
    /// Since when in that state.
    pub since: Option<Time>,
    /// Routes announced now.
    pub announced: u64,
    /// The current session was opened by the peer (to `bgp.listen`).
    #[serde(default)]
    pub inbound: bool,
    /// Why the session is not up, or the last thing that went wrong.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Flowspec rules learnt from the peer and kept (at most its `max_learned`).
    #[serde(default)]
    pub learned: u64,
    /// Flowspec rules from the peer refused since the session task started.
    #[serde(default)]
    pub learned_refused: u64,
    /// The refusals by reason (`outside_networks`, `too_wide`, `not_source_discard`,
    /// `peer_cap`, `untranslatable`).
    #[serde(default)]
    pub learned_refused_by: BTreeMap<String, u64>,
    /// The last few refusals, newest last.
    #[serde(default)]
    pub recent_refusals: Vec<RefusedView>,
    /// Received UPDATEs treated as withdraw for a malformed attribute (RFC 7606).
    #[serde(default)]
    pub treat_as_withdraw: u64,
    /// Malformed attributes discarded (RFC 7606).
    #[serde(default)]
    pub attributes_discarded: u64,
    /// Malformed flowspec NLRI treated as withdrawn alone (RFC 8955 section 4.2).
    #[serde(default)]
    pub nlri_treat_as_withdraw: u64,
    /// Families disabled (RFC 4760 section 7), over all sessions.
    #[serde(default)]
    pub families_disabled: u64,
    /// Families disabled on the current session, with why (enabled again by the next one).
    #[serde(default)]
    pub disabled_families: Vec<DisabledFamilyView>,
}

/// A family disabled on a session (`status`): its learnt rules dropped, its UPDATEs
/// ignored until the session restarts; our announcements in it continue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisabledFamilyView {
    /// `ipv4-flowspec`, `ipv6-unicast`, ... or `afi A safi S`.
    pub family: String,
    /// What was wrong with the MP_REACH_NLRI / MP_UNREACH_NLRI.
    pub reason: String,
}

/// One refused learnt flowspec rule (`status`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefusedView {
    /// The rule's source prefix, when it has one.
    pub source: Option<IpNet>,
    /// Why it is not enforced.
    pub reason: String,
}

/// One flowspec rule learnt from a peer (`status`, `list`): traffic *from* `source` is
/// dropped on this router while the peer announces it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LearntView {
    /// The peer's policy name.
    pub peer: String,
    /// The source prefix.
    pub source: IpNet,
    /// Whether it is enforced (in the `learnt4`/`learnt6` sets).
    pub enforced: bool,
    /// Why not, when it is not (the source became protected, or a reload narrowed the
    /// bounds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// The BGP listener (`bgp.listen`), for `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BgpListenerView {
    /// The address bound; none when binding failed.
    pub address: Option<std::net::SocketAddr>,
    /// Connections accepted from configured peers.
    pub accepted: u64,
    /// Connections refused (not from a configured peer).
    pub refused: u64,
    /// The last error (binding, TCP MD5 keys).
    pub last_error: Option<String>,
}

/// One reconnect authorisation's outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReconnectView {
    /// The ticket.
    pub ticket: String,
    /// The address.
    pub address: IpNet,
    /// `applied`, `already used`, or why it was refused.
    pub outcome: String,
}

/// One active block (`egressguard list`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockView {
    /// Address or prefix.
    pub target: IpNet,
    /// Quarantine, block or terminate.
    pub kind: BlockKind,
    /// The category detected, if a detection caused it.
    pub category: Option<Category>,
    /// Why, in words.
    pub reason: String,
    /// Since when.
    pub since: Time,
    /// Until when; `None` until a reconnect (or for good).
    pub until: Option<Time>,
    /// Offense number.
    pub offense: u32,
    /// True when only logged (dry-run).
    pub dry_run: bool,
    /// Set when the hold is suspended (recorded, not enforced) because its target became
    /// protected: `allowlisted` or `infrastructure`. Only an operator lifts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended: Option<String>,
}

/// One past offense (`egressguard show`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OffenseView {
    /// When.
    pub time: Time,
    /// Offense number.
    pub number: u32,
    /// Category.
    pub category: Category,
    /// What was decided, in words.
    pub decision: String,
    /// The evidence.
    pub evidence: Option<Evidence>,
}

/// One audit trail entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditView {
    /// When.
    pub time: Time,
    /// Who: `agent`, or the operator's user name.
    pub actor: String,
    /// What.
    pub action: String,
    /// Details in words.
    pub detail: String,
}

/// `egressguard show ADDR`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryView {
    /// The address or prefix asked about.
    pub target: IpNet,
    /// Its current hold, if any.
    pub current: Option<BlockView>,
    /// Offenses of this page, oldest first.
    pub offenses: Vec<OffenseView>,
    /// Offenses on record that are not in `offenses` (older ones beyond the page, and the
    /// `offset` newest skipped).
    #[serde(default)]
    pub offenses_omitted: u64,
    /// Audit entries of this page, oldest first.
    pub audit: Vec<AuditView>,
    /// Audit entries on record that are not in `audit` (likewise).
    #[serde(default)]
    pub audit_omitted: u64,
}
