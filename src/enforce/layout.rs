//! The shape of the agent's own nft table: its sets, its chains and their rules, built with
//! the `nftables` crate's JSON schema types, and the JSON transaction ([`Tx`]) they go into.
//!
//! Everything the agent puts into the kernel is described here and nowhere else, so the
//! module documentation of [`crate::enforce`] and this file stay the single source of truth
//! for the table layout.

use std::borrow::Cow;
use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;
use nftables::expr::{
    CT, Elem, Expression, NamedExpression, Payload, PayloadField, Prefix, SetItem,
};
use nftables::schema::{
    Chain, Element, FlushObject, NfCmd, NfListObject, Set, SetFlag, SetType, SetTypeValue, Table,
};
use nftables::stmt::{Counter, Match, Operator, Return, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde_json::Value;

use crate::meter::{Kind, Meters, SAMPLE_ONE_IN, SAMPLED_LABEL};

/// Priority of the agent's base chains: `filter - 10`, so its drops happen before the
/// operator's own filter chains (priority `filter` = 0, firewalld's `filter + 10`, VyOS's 0)
/// can accept the packet, and after conntrack (-200) and DNAT (-100) have run.
pub const CHAIN_PRIORITY: i32 = -10;

/// Idle timeout of a source in the per-source counter sets, in seconds.
pub const COUNTER_TIMEOUT_SECS: u32 = 300;

/// Idle timeout of a source in the flood meters' sets ([`crate::meter`]), in seconds: a
/// token bucket idle this long is full again anyway.
pub const METER_TIMEOUT_SECS: u32 = 60;

/// How long a source stays sampled after its last new flow above the sampling rate.
pub const HOT_TIMEOUT_SECS: u32 = 1;

/// Longest timeout the agent puts on an element (ten years), far below the kernel's limit.
pub const MAX_TIMEOUT_SECS: u64 = 10 * 365 * 24 * 3600;

/// Prefix of every rule comment; the rest names the rule.
pub const RULE_TAG: &str = "egressguard:";

/// Address family of a set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fam {
    /// IPv4 (`ipv4_addr`, `ip saddr`).
    V4,
    /// IPv6 (`ipv6_addr`, `ip6 saddr`).
    V6,
}

impl Fam {
    /// The family of an address.
    pub fn of(addr: IpAddr) -> Fam {
        match addr {
            IpAddr::V4(_) => Fam::V4,
            IpAddr::V6(_) => Fam::V6,
        }
    }

    fn proto(self) -> &'static str {
        match self {
            Fam::V4 => "ip",
            Fam::V6 => "ip6",
        }
    }

    fn set_type(self) -> SetType {
        match self {
            Fam::V4 => SetType::Ipv4Addr,
            Fam::V6 => SetType::Ipv6Addr,
        }
    }

    /// The nft type name of the family's addresses.
    pub fn type_name(self) -> &'static str {
        match self {
            Fam::V4 => "ipv4_addr",
            Fam::V6 => "ipv6_addr",
        }
    }
}

/// What a set holds, which fixes its flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Blocked addresses: `flags interval, timeout`.
    Blocked,
    /// Quarantined addresses: `flags interval, timeout`.
    Quarantine,
    /// Customer networks from the policy: `flags interval`.
    Customers,
    /// Allowlisted addresses from the policy: `flags interval`.
    Allow,
    /// Walled-garden destinations from the policy: `flags interval`.
    Garden,
    /// Per-source counters, filled by the packet path: `flags dynamic, timeout`.
    Counters,
    /// Per-source counters of UDP packets of flows never answered (`ct state new`), as
    /// [`Role::Counters`]: the single-flow UDP flood (`flood.udp_pps`).
    UdpCounters,
    /// Per-source counters of ICMP/ICMPv6 echo requests, as [`Role::Counters`]: the ping
    /// flood (`flood.icmp_pps`).
    EchoCounters,
    /// Sources of learnt flowspec rules, dropped as senders only: `flags interval`.
    Learnt,
    /// A flood meter's token buckets, one per source ([`crate::meter`]): `flags dynamic,
    /// timeout`, filled by the packet path.
    Meter(Kind),
    /// The sampling meter's token buckets (`detection.sample_flows_above`).
    Sample,
    /// Sources above the sampling rate, for [`HOT_TIMEOUT_SECS`] after their last flow
    /// over it: every new flow of theirs is sampled (the meter alone lets the first
    /// `sample_flows_above` flows of each second through unsampled).
    Hot,
}

impl Role {
    /// Roles whose elements the agent manages (all but the counters).
    pub const MANAGED: [Role; 6] = [
        Role::Blocked,
        Role::Quarantine,
        Role::Customers,
        Role::Allow,
        Role::Garden,
        Role::Learnt,
    ];

    /// Whether elements carry timeouts.
    pub fn timed(self) -> bool {
        matches!(self, Role::Blocked | Role::Quarantine) || self.counting()
    }

    /// Whether the set is a per-source set filled by the packet path (counters, meters).
    pub fn counting(self) -> bool {
        matches!(
            self,
            Role::Counters | Role::UdpCounters | Role::EchoCounters
        ) || self.metering()
    }

    /// Whether the set holds a meter's token buckets.
    pub fn metering(self) -> bool {
        matches!(self, Role::Meter(_) | Role::Sample | Role::Hot)
    }
}

/// One set of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SetId {
    /// What it holds.
    pub role: Role,
    /// Address family.
    pub fam: Fam,
}

impl SetId {
    /// Constructs a set id.
    pub const fn new(role: Role, fam: Fam) -> SetId {
        SetId { role, fam }
    }

    /// The set's name in the table (`blocked4`, `src_counters6`, ...).
    pub fn name(self) -> &'static str {
        match (self.role, self.fam) {
            (Role::Blocked, Fam::V4) => "blocked4",
            (Role::Blocked, Fam::V6) => "blocked6",
            (Role::Quarantine, Fam::V4) => "quarantine4",
            (Role::Quarantine, Fam::V6) => "quarantine6",
            (Role::Customers, Fam::V4) => "customers4",
            (Role::Customers, Fam::V6) => "customers6",
            (Role::Allow, Fam::V4) => "allow4",
            (Role::Allow, Fam::V6) => "allow6",
            (Role::Garden, Fam::V4) => "garden4",
            (Role::Garden, Fam::V6) => "garden6",
            (Role::Counters, Fam::V4) => "src_counters4",
            (Role::Counters, Fam::V6) => "src_counters6",
            (Role::UdpCounters, Fam::V4) => "src_udp4",
            (Role::UdpCounters, Fam::V6) => "src_udp6",
            (Role::EchoCounters, Fam::V4) => "src_echo4",
            (Role::EchoCounters, Fam::V6) => "src_echo6",
            (Role::Learnt, Fam::V4) => "learnt4",
            (Role::Learnt, Fam::V6) => "learnt6",
            (Role::Meter(k), fam) => meter_set_name(k, fam),
            (Role::Sample, Fam::V4) => "meter_sample4",
            (Role::Sample, Fam::V6) => "meter_sample6",
            (Role::Hot, Fam::V4) => "meter_hot4",
            (Role::Hot, Fam::V6) => "meter_hot6",
        }
    }

    /// Every set of the table, in creation order.
    pub fn all() -> impl Iterator<Item = SetId> {
        [
            Role::Customers,
            Role::Allow,
            Role::Garden,
            Role::Blocked,
            Role::Quarantine,
            Role::Learnt,
            Role::Counters,
            Role::UdpCounters,
            Role::EchoCounters,
        ]
        .into_iter()
        .chain(Kind::ALL.map(Role::Meter))
        .chain([Role::Sample, Role::Hot])
        .flat_map(|r| [SetId::new(r, Fam::V4), SetId::new(r, Fam::V6)])
    }

    /// The sets whose elements the agent manages.
    pub fn managed() -> impl Iterator<Item = SetId> {
        SetId::all().filter(|s| !s.role.counting())
    }

    /// Whether the set is created apart from the JSON transactions, by
    /// [`TableSpec::side_set_script`]: the byte meter's, whose elements live one window of
    /// [`crate::meter::Meters::bytes_window_ms`] (under a second by default).
    pub fn side(self) -> bool {
        self.role == Role::Meter(Kind::Bps)
    }

    /// The flags the set must have, as `nft -j list` shows them (nft 1.0.6 does not list
    /// `dynamic`, so it is left out of the comparison).
    pub fn listed_flags(self) -> Vec<&'static str> {
        match self.role {
            Role::Blocked | Role::Quarantine => vec!["interval", "timeout"],
            Role::Customers | Role::Allow | Role::Garden | Role::Learnt => vec!["interval"],
            Role::Counters
            | Role::UdpCounters
            | Role::EchoCounters
            | Role::Meter(_)
            | Role::Sample
            | Role::Hot => vec!["timeout"],
        }
    }
}

fn meter_set_name(k: Kind, fam: Fam) -> &'static str {
    match (k, fam) {
        (Kind::Pps, Fam::V4) => "meter_pps4",
        (Kind::Pps, Fam::V6) => "meter_pps6",
        (Kind::Bps, Fam::V4) => "meter_bytes4",
        (Kind::Bps, Fam::V6) => "meter_bytes6",
        (Kind::Udp, Fam::V4) => "meter_udp4",
        (Kind::Udp, Fam::V6) => "meter_udp6",
        (Kind::Echo, Fam::V4) => "meter_echo4",
        (Kind::Echo, Fam::V6) => "meter_echo6",
        (Kind::NewFlows, Fam::V4) => "meter_new4",
        (Kind::NewFlows, Fam::V6) => "meter_new6",
        (Kind::Syn, Fam::V4) => "meter_syn4",
        (Kind::Syn, Fam::V6) => "meter_syn6",
    }
}

fn set_timeout(role: Role) -> u32 {
    if role == Role::Hot {
        HOT_TIMEOUT_SECS
    } else if role.metering() {
        METER_TIMEOUT_SECS
    } else {
        COUNTER_TIMEOUT_SECS
    }
}

/// The parameters of the table that do not come from the blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSpec {
    /// The table's name (family `inet`).
    pub table: String,
    /// Size of each per-source counter set.
    pub counter_set_size: u32,
    /// The flood meters and sampling of the forward chain.
    pub meters: Meters,
}

impl TableSpec {
    fn set_object(&self, id: SetId) -> Set<'static> {
        let mut flags = HashSet::new();
        let (mut size, mut timeout) = (None, None);
        match id.role {
            Role::Blocked | Role::Quarantine => {
                flags.insert(SetFlag::Interval);
                flags.insert(SetFlag::Timeout);
            }
            Role::Customers | Role::Allow | Role::Garden | Role::Learnt => {
                flags.insert(SetFlag::Interval);
            }
            Role::Counters
            | Role::UdpCounters
            | Role::EchoCounters
            | Role::Meter(_)
            | Role::Sample
            | Role::Hot => {
                // nft 1.0.6's JSON parser refuses `dynamic`; the kernel set gets it from the
                // `update` statement that uses it (written in the same transaction).
                flags.insert(SetFlag::Timeout);
                size = Some(self.counter_set_size);
                timeout = Some(set_timeout(id.role));
            }
        }
        Set {
            family: NfFamily::INet,
            table: Cow::Owned(self.table.clone()),
            name: Cow::Borrowed(id.name()),
            handle: None,
            set_type: SetTypeValue::Single(id.fam.set_type()),
            policy: None,
            flags: Some(flags),
            elem: None,
            timeout,
            gc_interval: None,
            size,
            comment: None,
        }
    }

    /// The set's expected size and default timeout as listed (only counter sets have them;
    /// nft lists whole seconds, so a byte window under a second is listed as 0).
    pub fn listed_size_timeout(&self, id: SetId) -> (Option<u64>, Option<u64>) {
        match id.role {
            _ if id.side() => (
                Some(u64::from(self.counter_set_size)),
                Some(self.meters.bytes_window_ms() / 1000),
            ),
            r if r.counting() => (
                Some(u64::from(self.counter_set_size)),
                Some(u64::from(set_timeout(r))),
            ),
            _ => (None, None),
        }
    }

    /// The comment a [`SetId::side`] set carries: its exact window, which the listing's
    /// whole seconds cannot tell (`None` for the other sets).
    pub fn listed_comment(&self, id: SetId) -> Option<String> {
        id.side().then(|| {
            format!(
                "egressguard: byte quota window {} ms",
                self.meters.bytes_window_ms()
            )
        })
    }

    /// The nft script (text syntax) that creates the [`SetId::side`] set `id`, and the
    /// table if need be: nft's JSON cannot spell a timeout under a second.
    pub fn side_set_script(&self, id: SetId) -> String {
        format!(
            "add table inet {table}\nadd set inet {table} {name} {{ type {ty}; size {size}; \
             flags dynamic,timeout; timeout {ms}ms; comment \"{comment}\"; }}\n",
            table = self.table,
            name = id.name(),
            ty = id.fam.type_name(),
            size = self.counter_set_size,
            ms = self.meters.bytes_window_ms(),
            comment = self.listed_comment(id).unwrap_or_default(),
        )
    }

    fn table_object(&self) -> Table<'static> {
        Table {
            family: NfFamily::INet,
            name: Cow::Owned(self.table.clone()),
            handle: None,
        }
    }

    fn chain_object(&self, chain: ChainId, with_hook: bool) -> Chain<'static> {
        Chain {
            family: NfFamily::INet,
            table: Cow::Owned(self.table.clone()),
            name: Cow::Borrowed(chain.name()),
            newname: None,
            handle: None,
            _type: with_hook.then_some(NfChainType::Filter),
            hook: with_hook.then_some(chain.hook()),
            prio: with_hook.then_some(CHAIN_PRIORITY),
            dev: None,
            policy: with_hook.then_some(NfChainPolicy::Accept),
        }
    }
}

/// One base chain of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChainId {
    /// Forwarded traffic: the customers' traffic through the router.
    Forward,
    /// Traffic to the router itself.
    Input,
    /// Traffic from the router itself.
    Output,
}

impl ChainId {
    /// All chains.
    pub const ALL: [ChainId; 3] = [ChainId::Forward, ChainId::Input, ChainId::Output];

    /// The chain's name.
    pub fn name(self) -> &'static str {
        match self {
            ChainId::Forward => "forward",
            ChainId::Input => "input",
            ChainId::Output => "output",
        }
    }

    fn hook(self) -> NfHook {
        match self {
            ChainId::Forward => NfHook::Forward,
            ChainId::Input => NfHook::Input,
            ChainId::Output => NfHook::Output,
        }
    }

    /// The hook name as `nft -j list` shows it.
    pub fn hook_name(self) -> &'static str {
        self.name()
    }
}

// ---------------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------------

fn addr(fam: Fam, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(fam.proto()),
            field: Cow::Borrowed(field),
        },
    )))
}

fn in_set(fam: Fam, field: &'static str, set: SetId) -> Statement<'static> {
    Statement::Match(Match {
        left: addr(fam, field),
        right: Expression::String(Cow::Owned(format!("@{}", set.name()))),
        op: Operator::EQ,
    })
}

fn not_in_set(fam: Fam, field: &'static str, set: SetId) -> Statement<'static> {
    Statement::Match(Match {
        left: addr(fam, field),
        right: Expression::String(Cow::Owned(format!("@{}", set.name()))),
        op: Operator::NEQ,
    })
}

fn counter() -> Statement<'static> {
    Statement::Counter(Counter::Anonymous(None))
}

fn drop_() -> Statement<'static> {
    Statement::Drop(None)
}

fn return_() -> Statement<'static> {
    Statement::Return(None::<Return>)
}

fn ct_established() -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::CT(CT {
            key: Cow::Borrowed("state"),
            family: None,
            dir: None,
        })),
        right: Expression::List(vec![
            Expression::String(Cow::Borrowed("established")),
            Expression::String(Cow::Borrowed("related")),
        ]),
        op: Operator::IN,
    })
}

fn l4proto(p: &'static str) -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Meta(nftables::expr::Meta {
            key: nftables::expr::MetaKey::L4proto,
        })),
        right: Expression::String(Cow::Borrowed(p)),
        op: Operator::EQ,
    })
}

fn ct_state(state: &'static str) -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::CT(CT {
            key: Cow::Borrowed("state"),
            family: None,
            dir: None,
        })),
        right: Expression::String(Cow::Borrowed(state)),
        op: Operator::IN,
    })
}

fn ct_status(status: &'static str) -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::CT(CT {
            key: Cow::Borrowed("status"),
            family: None,
            dir: None,
        })),
        right: Expression::String(Cow::Borrowed(status)),
        op: Operator::IN,
    })
}

fn payload_eq(
    protocol: &'static str,
    field: &'static str,
    value: &'static str,
) -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(
            PayloadField {
                protocol: Cow::Borrowed(protocol),
                field: Cow::Borrowed(field),
            },
        ))),
        right: Expression::String(Cow::Borrowed(value)),
        op: Operator::EQ,
    })
}

fn neighbour_discovery() -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(
            PayloadField {
                protocol: Cow::Borrowed("icmpv6"),
                field: Cow::Borrowed("type"),
            },
        ))),
        right: Expression::Named(NamedExpression::Set(
            [
                "nd-router-solicit",
                "nd-router-advert",
                "nd-neighbor-solicit",
                "nd-neighbor-advert",
            ]
            .into_iter()
            .map(|t| SetItem::Element(Expression::String(Cow::Borrowed(t))))
            .collect(),
        )),
        op: Operator::EQ,
    })
}

/// One rule of the table before serialisation.
#[derive(Clone, Debug)]
pub struct RuleDef {
    /// Its chain.
    pub chain: ChainId,
    /// Its comment (`egressguard:<name>`), which names it in the listing.
    pub comment: String,
    /// Its statements.
    pub expr: Vec<Statement<'static>>,
    /// Statements after `expr` in nft's JSON, for what the crate's types cannot express:
    /// `update @<set> { ip saddr counter }` or `{ ip saddr limit rate over ... }`
    /// (`nftables::stmt::Set` has no `stmt` member), `ct label set`, `ct event set`,
    /// `numgen`.
    pub tail: Vec<Value>,
}

impl RuleDef {
    /// Whether the rule's own statements ([`RuleDef::tail`]) fill `set`.
    fn fills(&self, set: SetId) -> bool {
        let name = format!("@{}", set.name());
        self.tail
            .iter()
            .any(|v| v.pointer("/set/set").and_then(Value::as_str) == Some(name.as_str()))
    }
}

fn rule(chain: ChainId, name: &str, expr: Vec<Statement<'static>>) -> RuleDef {
    RuleDef {
        chain,
        comment: format!("{RULE_TAG}{name}"),
        expr,
        tail: Vec::new(),
    }
}

/// `update @<set> { <fam> saddr <stmt> }` (no statement: `update @<set> { <fam> saddr }`).
fn update_json(set: SetId, stmt: Value) -> Value {
    let mut v = serde_json::json!({
        "set": {
            "op": "update",
            "elem": serde_json::to_value(addr(set.fam, "saddr")).unwrap_or(Value::Null),
            "set": format!("@{}", set.name()),
        }
    });
    if !stmt.is_null() {
        v["set"]["stmt"] = Value::Array(vec![stmt]);
    }
    v
}

/// `update @<set> { <fam> saddr counter }`.
fn counter_update(set: SetId) -> Value {
    update_json(set, serde_json::json!({ "counter": null }))
}

/// `add @<set> { <fam> saddr quota over <bytes> bytes }` in a set whose elements time out
/// after one byte window ([`TableSpec::side_set_script`]): `add` leaves an element's timeout
/// alone, so each lives one window from its source's first packet, and the next packet
/// starts a fresh quota.
fn quota_add(set: SetId, bytes: u64) -> Value {
    serde_json::json!({
        "set": {
            "op": "add",
            "elem": serde_json::to_value(addr(set.fam, "saddr")).unwrap_or(Value::Null),
            "set": format!("@{}", set.name()),
            "stmt": [{ "quota": { "val": bytes, "val_unit": "bytes", "inv": true } }],
        }
    })
}

/// `update @<set> { <fam> saddr limit rate over <rate>/second burst <burst> packets }`.
fn limit_update(set: SetId, rate: u64, burst: u64) -> Value {
    update_json(
        set,
        serde_json::json!({ "limit": { "rate": rate, "burst": burst, "per": "second", "inv": true } }),
    )
}

/// `ct label set <label>`.
fn ct_label_set(label: u8) -> Value {
    serde_json::json!({ "mangle": { "key": { "ct": { "key": "label" } }, "value": label } })
}

/// The first packet of a flow: `ct state new ct status != confirmed` (conntrack confirms a
/// flow once its first packet has left).
fn first_packet() -> [Statement<'static>; 2] {
    [
        ct_state("new"),
        Statement::Match(Match {
            left: Expression::Named(NamedExpression::CT(CT {
                key: Cow::Borrowed("status"),
                family: None,
                dir: None,
            })),
            right: Expression::String(Cow::Borrowed("confirmed")),
            op: Operator::NEQ,
        }),
    ]
}

/// The flood meters and the sampling of one family (see [`crate::meter`]), in chain order.
fn meter_rules(fam: Fam, meters: &Meters) -> Vec<RuleDef> {
    let sfx = if fam == Fam::V4 { "4" } else { "6" };
    let customers = in_set(fam, "saddr", SetId::new(Role::Customers, fam));
    let mut out = Vec::new();
    for kind in Kind::ALL {
        let Some((rate, burst)) = meters.limit(kind) else {
            continue;
        };
        let mut expr = vec![customers.clone()];
        match kind {
            Kind::Pps | Kind::Bps => {}
            Kind::Udp => expr.extend([l4proto("udp"), ct_state("new"), ct_status("confirmed")]),
            Kind::Echo => expr.push(match fam {
                Fam::V4 => payload_eq("icmp", "type", "echo-request"),
                Fam::V6 => payload_eq("icmpv6", "type", "echo-request"),
            }),
            Kind::NewFlows => expr.extend(first_packet()),
            Kind::Syn => {
                expr.push(l4proto("tcp"));
                expr.extend(first_packet());
            }
        }
        // The threshold is in the name: a reload that changes it rewrites the rule.
        let mut r = rule(
            ChainId::Forward,
            &format!("meter-{}-{rate}-{burst}{sfx}", kind.name()),
            expr,
        );
        let set = SetId::new(Role::Meter(kind), fam);
        let meter = if kind == Kind::Bps {
            quota_add(set, burst)
        } else {
            limit_update(set, rate, burst)
        };
        r.tail = vec![meter, ct_label_set(kind.label())];
        out.push(r);
    }
    if let Some((rate, burst)) = meters.sampling() {
        let mut expr = vec![customers.clone()];
        expr.extend(first_packet());
        let mut r = rule(
            ChainId::Forward,
            &format!("sample-over-{rate}-{burst}{sfx}"),
            expr,
        );
        r.tail = vec![
            limit_update(SetId::new(Role::Sample, fam), rate, burst),
            update_json(SetId::new(Role::Hot, fam), serde_json::Value::Null),
        ];
        out.push(r);
        // Every new flow of a hot source is sampled, the first of each second included.
        let mut expr = vec![
            customers.clone(),
            in_set(fam, "saddr", SetId::new(Role::Hot, fam)),
        ];
        expr.extend(first_packet());
        let mut r = rule(ChainId::Forward, &format!("sample-hot{sfx}"), expr);
        r.tail = vec![ct_label_set(SAMPLED_LABEL)];
        out.push(r);
        // Of a sampled source's new flows, all but one in SAMPLE_ONE_IN report nothing.
        let label = Statement::Match(Match {
            left: Expression::Named(NamedExpression::CT(CT {
                key: Cow::Borrowed("label"),
                family: None,
                dir: None,
            })),
            right: Expression::Number(u32::from(SAMPLED_LABEL)),
            op: Operator::IN,
        });
        let mut expr = vec![
            in_set(fam, "saddr", SetId::new(Role::Customers, fam)),
            label,
        ];
        expr.extend(first_packet());
        let mut r = rule(
            ChainId::Forward,
            &format!("sample-one-in-{SAMPLE_ONE_IN}{sfx}"),
            expr,
        );
        r.tail = vec![
            serde_json::json!({ "match": {
                "op": "!=",
                "left": { "numgen": { "mode": "random", "mod": SAMPLE_ONE_IN, "offset": 0 } },
                "right": 0,
            }}),
            serde_json::json!({ "mangle": { "key": { "ct": { "key": "event" } }, "value": 0 } }),
        ];
        out.push(r);
    }
    out
}

/// The drop rules of one family, in chain order: a blocked address sends and receives
/// nothing; a quarantined one reaches only the garden, which may answer it; a learnt source
/// sends nothing (it still receives). Forward holds all six; input the three `-from` rules,
/// output the other three.
fn drop_rules(fam: Fam) -> [(String, Vec<Statement<'static>>); 6] {
    let sfx = if fam == Fam::V4 { "4" } else { "6" };
    let blocked = SetId::new(Role::Blocked, fam);
    let quar = SetId::new(Role::Quarantine, fam);
    let allow = SetId::new(Role::Allow, fam);
    let garden = SetId::new(Role::Garden, fam);
    let learnt = SetId::new(Role::Learnt, fam);
    [
        (
            format!("blocked-from{sfx}"),
            vec![
                in_set(fam, "saddr", blocked),
                not_in_set(fam, "saddr", allow),
                counter(),
                drop_(),
            ],
        ),
        (
            format!("blocked-to{sfx}"),
            vec![
                in_set(fam, "daddr", blocked),
                not_in_set(fam, "daddr", allow),
                counter(),
                drop_(),
            ],
        ),
        (
            format!("quarantine-from{sfx}"),
            vec![
                in_set(fam, "saddr", quar),
                not_in_set(fam, "saddr", allow),
                not_in_set(fam, "daddr", garden),
                counter(),
                drop_(),
            ],
        ),
        (
            format!("quarantine-garden-replies{sfx}"),
            vec![
                in_set(fam, "daddr", quar),
                in_set(fam, "saddr", garden),
                ct_established(),
                return_(),
            ],
        ),
        (
            format!("quarantine-to{sfx}"),
            vec![
                in_set(fam, "daddr", quar),
                not_in_set(fam, "daddr", allow),
                counter(),
                drop_(),
            ],
        ),
        (
            format!("learnt-from{sfx}"),
            vec![
                in_set(fam, "saddr", learnt),
                not_in_set(fam, "saddr", allow),
                counter(),
                drop_(),
            ],
        ),
    ]
}

/// Every rule of the table, in order, for both families.
pub fn rules(meters: &Meters) -> Vec<RuleDef> {
    use ChainId::*;
    let mut out = Vec::new();
    // forward: per-source counters first, so the observer also sees what blocked sources
    // still try to send.
    for fam in [Fam::V4, Fam::V6] {
        let sfx = if fam == Fam::V4 { "4" } else { "6" };
        let mut r = rule(
            Forward,
            &format!("count-customers{sfx}"),
            vec![in_set(fam, "saddr", SetId::new(Role::Customers, fam))],
        );
        r.tail = vec![counter_update(SetId::new(Role::Counters, fam))];
        out.push(r);
    }
    // The two floods one packet counter cannot tell from a backup stream: UDP packets of
    // flows never answered (`ct state new` in the original direction: no reply seen yet;
    // what a customer's own services send are replies, never counted), and echo requests.
    // A flow's first packet is left out (`ct status confirmed`: conntrack confirms a flow
    // after its first packet left the router): a resolver's queries, and a storm of spoofed
    // one-packet flows, make no element at all, so the set holds only sources that keep
    // sending into unanswered flows.
    for fam in [Fam::V4, Fam::V6] {
        let sfx = if fam == Fam::V4 { "4" } else { "6" };
        let customers = in_set(fam, "saddr", SetId::new(Role::Customers, fam));
        let mut r = rule(
            Forward,
            &format!("count-udp-unanswered{sfx}"),
            vec![
                customers.clone(),
                l4proto("udp"),
                ct_state("new"),
                ct_status("confirmed"),
            ],
        );
        r.tail = vec![counter_update(SetId::new(Role::UdpCounters, fam))];
        out.push(r);
        let (icmp, echo) = match fam {
            Fam::V4 => ("icmp", "echo-request"),
            Fam::V6 => ("icmpv6", "echo-request"),
        };
        let mut r = rule(
            Forward,
            &format!("count-echo{sfx}"),
            vec![customers, payload_eq(icmp, "type", echo)],
        );
        r.tail = vec![counter_update(SetId::new(Role::EchoCounters, fam))];
        out.push(r);
    }
    // The flood meters and sampling, before the drops like the counters: a held source's
    // new flows are sampled too.
    for fam in [Fam::V4, Fam::V6] {
        out.extend(meter_rules(fam, meters));
    }
    for fam in [Fam::V4, Fam::V6] {
        for (name, expr) in drop_rules(fam) {
            out.push(rule(Forward, &name, expr));
        }
    }
    // input and output: the router's own addresses. Neighbour discovery stays up so a
    // quarantined host can still resolve its gateway to reach the garden.
    out.push(rule(
        Input,
        "neighbour-discovery",
        vec![neighbour_discovery(), return_()],
    ));
    out.push(rule(
        Output,
        "neighbour-discovery",
        vec![neighbour_discovery(), return_()],
    ));
    // The router itself: what a held address sends to it (input), what it sends to a held
    // address (output). The same rules as in forward, for the direction each chain sees.
    for fam in [Fam::V4, Fam::V6] {
        for (name, expr) in drop_rules(fam) {
            let chain = if name.contains("-from") {
                Input
            } else {
                Output
            };
            out.push(rule(chain, &name, expr));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Elements
// ---------------------------------------------------------------------------------------------

/// The key of a set element as the kernel lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ElemKey {
    /// An address or a prefix.
    Net(IpNet),
    /// A range that is not a prefix (only put there by hand).
    Range(IpAddr, IpAddr),
}

impl std::fmt::Display for ElemKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ElemKey::Net(n) if n.prefix_len() == n.max_prefix_len() => write!(f, "{}", n.addr()),
            ElemKey::Net(n) => write!(f, "{n}"),
            ElemKey::Range(a, b) => write!(f, "{a}-{b}"),
        }
    }
}

fn key_expr(key: &ElemKey) -> Expression<'static> {
    match key {
        ElemKey::Net(n) if n.prefix_len() == n.max_prefix_len() => {
            Expression::String(Cow::Owned(n.addr().to_string()))
        }
        ElemKey::Net(n) => Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(Expression::String(Cow::Owned(n.network().to_string()))),
            len: u32::from(n.prefix_len()),
        })),
        ElemKey::Range(a, b) => Expression::Range(Box::new(nftables::expr::Range {
            range: [
                Expression::String(Cow::Owned(a.to_string())),
                Expression::String(Cow::Owned(b.to_string())),
            ],
        })),
    }
}

fn elem_expr(key: &ElemKey, timeout_secs: Option<u64>) -> Expression<'static> {
    match timeout_secs {
        None => key_expr(key),
        Some(t) => Expression::Named(NamedExpression::Elem(Elem {
            val: Box::new(key_expr(key)),
            timeout: Some(t.clamp(1, MAX_TIMEOUT_SECS) as u32),
            expires: None,
            comment: None,
            counter: None,
        })),
    }
}

// ---------------------------------------------------------------------------------------------
// Transactions
// ---------------------------------------------------------------------------------------------

/// One `nft -j -f -` transaction: a list of commands, applied all or nothing.
#[derive(Clone, Debug, Default)]
pub struct Tx {
    cmds: Vec<Value>,
}

fn to_value(cmd: NfCmd<'_>) -> Value {
    // The schema types serialise infallibly (no maps with non-string keys, no floats).
    serde_json::to_value(cmd).unwrap_or(Value::Null)
}

impl Tx {
    /// An empty transaction.
    pub fn new() -> Tx {
        Tx::default()
    }

    /// Number of commands.
    pub fn len(&self) -> usize {
        self.cmds.len()
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }

    /// The JSON document fed to `nft -j -f -`.
    pub fn to_json(&self) -> String {
        serde_json::json!({ "nftables": self.cmds }).to_string()
    }

    /// `add table inet T` (does nothing when it exists).
    pub fn add_table(&mut self, spec: &TableSpec) {
        self.cmds.push(to_value(NfCmd::Add(NfListObject::Table(
            spec.table_object(),
        ))));
    }

    /// `delete table inet T`.
    pub fn delete_table(&mut self, table: &str) {
        self.cmds
            .push(to_value(NfCmd::Delete(NfListObject::Table(Table {
                family: NfFamily::INet,
                name: Cow::Owned(table.to_owned()),
                handle: None,
            }))));
    }

    /// `add set` (does nothing when an identical set exists; its elements stay).
    pub fn add_set(&mut self, spec: &TableSpec, id: SetId) {
        self.cmds
            .push(to_value(NfCmd::Add(NfListObject::Set(Box::new(
                spec.set_object(id),
            )))));
    }

    /// `delete set` (only for a set whose definition is wrong; rules using it must be gone).
    pub fn delete_set(&mut self, spec: &TableSpec, id: SetId) {
        self.cmds
            .push(to_value(NfCmd::Delete(NfListObject::Set(Box::new(
                spec.set_object(id),
            )))));
    }

    /// `add chain` with its hook (does nothing when it exists).
    pub fn add_chain(&mut self, spec: &TableSpec, chain: ChainId) {
        self.cmds.push(to_value(NfCmd::Add(NfListObject::Chain(
            spec.chain_object(chain, true),
        ))));
    }

    /// `flush chain` (removes its rules).
    pub fn flush_chain(&mut self, spec: &TableSpec, chain: ChainId) {
        self.cmds.push(to_value(NfCmd::Flush(FlushObject::Chain(
            spec.chain_object(chain, false),
        ))));
    }

    /// `delete chain` (must be flushed first).
    pub fn delete_chain(&mut self, spec: &TableSpec, chain: ChainId) {
        self.cmds.push(to_value(NfCmd::Delete(NfListObject::Chain(
            spec.chain_object(chain, false),
        ))));
    }

    /// `add rule`.
    pub fn add_rule(&mut self, spec: &TableSpec, rule: &RuleDef) {
        let obj = nftables::schema::Rule {
            family: NfFamily::INet,
            table: Cow::Owned(spec.table.clone()),
            chain: Cow::Borrowed(rule.chain.name()),
            expr: Cow::Owned(rule.expr.clone()),
            handle: None,
            index: None,
            comment: Some(Cow::Owned(rule.comment.clone())),
        };
        let mut v = to_value(NfCmd::Add(NfListObject::Rule(obj)));
        if let Some(expr) = v
            .pointer_mut("/add/rule/expr")
            .and_then(Value::as_array_mut)
        {
            expr.extend(rule.tail.iter().cloned());
        }
        self.cmds.push(v);
    }

    /// `add element` with optional timeouts (seconds), all in one command.
    pub fn add_elements(&mut self, spec: &TableSpec, id: SetId, elems: &[(ElemKey, Option<u64>)]) {
        if elems.is_empty() {
            return;
        }
        let elem: Vec<Expression<'static>> = elems.iter().map(|(k, t)| elem_expr(k, *t)).collect();
        self.cmds
            .push(to_value(NfCmd::Add(NfListObject::Element(Element {
                family: NfFamily::INet,
                table: Cow::Owned(spec.table.clone()),
                name: Cow::Borrowed(id.name()),
                elem: Cow::Owned(elem),
            }))));
    }

    /// `delete element`, all in one command.
    pub fn delete_elements(&mut self, spec: &TableSpec, id: SetId, keys: &[ElemKey]) {
        if keys.is_empty() {
            return;
        }
        let elem: Vec<Expression<'static>> = keys.iter().map(key_expr).collect();
        self.cmds
            .push(to_value(NfCmd::Delete(NfListObject::Element(Element {
                family: NfFamily::INet,
                table: Cow::Owned(spec.table.clone()),
                name: Cow::Borrowed(id.name()),
                elem: Cow::Owned(elem),
            }))));
    }

    /// The whole structure: after flushing `flush` chains and deleting `drop_chains` and
    /// `drop_sets` (which are wrong), the table, the sets in `add_sets` and chains in
    /// `add_chains` (those missing or deleted) and every rule. Existing sets are never
    /// re-added: nft 1.0.6's JSON cannot spell `flags dynamic`, and re-adding a set with
    /// other flags fails. Elements are added separately.
    ///
    /// The [`SetId::side`] sets are neither added nor deleted here: the caller creates them
    /// first ([`TableSpec::side_set_script`]), and deletes a wrong one with
    /// [`Tx::structure_dropping_side`] before that.
    pub fn structure(&mut self, spec: &TableSpec, s: &Structure) {
        self.structure_with(spec, s, false);
    }

    /// The structure with the wrong [`SetId::side`] sets deleted and without the rules that
    /// fill a side set still to be created: the step before those are created. The table
    /// drops and counts as it should meanwhile; only the byte meter is missing.
    pub fn structure_dropping_side(&mut self, spec: &TableSpec, s: &Structure) {
        self.structure_with(spec, s, true);
    }

    fn structure_with(&mut self, spec: &TableSpec, s: &Structure, drop_side: bool) {
        for c in &s.flush {
            self.flush_chain(spec, *c);
        }
        for c in &s.drop_chains {
            self.delete_chain(spec, *c);
        }
        for id in s.drop_sets.iter().filter(|id| drop_side || !id.side()) {
            self.delete_set(spec, *id);
        }
        self.add_table(spec);
        for id in s.add_sets.iter().filter(|id| !id.side()) {
            self.add_set(spec, *id);
        }
        for c in &s.add_chains {
            self.add_chain(spec, *c);
        }
        let pending: Vec<SetId> = if drop_side {
            s.add_sets.iter().copied().filter(|id| id.side()).collect()
        } else {
            Vec::new()
        };
        for r in rules(&spec.meters) {
            if !pending.iter().any(|id| r.fills(*id)) {
                self.add_rule(spec, &r);
            }
        }
    }
}

/// What a structural rewrite does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Structure {
    /// Chains to flush (those that exist).
    pub flush: Vec<ChainId>,
    /// Chains to delete (their definition is wrong).
    pub drop_chains: Vec<ChainId>,
    /// Sets to delete (their definition is wrong).
    pub drop_sets: Vec<SetId>,
    /// Sets to create (missing or deleted).
    pub add_sets: Vec<SetId>,
    /// Chains to create (missing or deleted).
    pub add_chains: Vec<ChainId>,
}

impl Structure {
    /// The [`SetId::side`] sets to create before the JSON transaction.
    pub fn side_adds(&self) -> Vec<SetId> {
        self.add_sets
            .iter()
            .copied()
            .filter(|id| id.side())
            .collect()
    }

    /// Whether a [`SetId::side`] set is wrong and must be deleted first.
    pub fn drops_side(&self) -> bool {
        self.drop_sets.iter().any(|id| id.side())
    }

    /// Every rule written again, nothing else: after [`Tx::structure_dropping_side`] and the
    /// side sets' creation, every chain exists and the sets are right.
    pub fn rules_only() -> Structure {
        Structure {
            flush: ChainId::ALL.to_vec(),
            ..Structure::default()
        }
    }

    /// Everything from nothing (the table does not exist).
    pub fn fresh() -> Structure {
        Structure {
            add_sets: SetId::all().collect(),
            add_chains: ChainId::ALL.to_vec(),
            ..Structure::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TableSpec {
        TableSpec {
            table: "egressguard".into(),
            counter_set_size: 65536,
            meters: Meters::default(),
        }
    }

    #[test]
    fn counter_rule_carries_the_update_statement() {
        let mut tx = Tx::new();
        let r = rules(&Meters::default())
            .into_iter()
            .find(|r| !r.tail.is_empty())
            .unwrap();
        tx.add_rule(&spec(), &r);
        let json = tx.to_json();
        assert!(json.contains(r#""op":"update""#), "{json}");
        assert!(json.contains(r#""set":"@src_counters4""#), "{json}");
        assert!(json.contains(r#""stmt":[{"counter":null}]"#), "{json}");
    }

    #[test]
    fn elements_are_addresses_prefixes_or_timed() {
        let mut tx = Tx::new();
        tx.add_elements(
            &spec(),
            SetId::new(Role::Blocked, Fam::V6),
            &[
                (ElemKey::Net("2001:db8:c::5/128".parse().unwrap()), None),
                (ElemKey::Net("2001:db8:d::/64".parse().unwrap()), Some(30)),
            ],
        );
        let json = tx.to_json();
        assert!(json.contains(r#""2001:db8:c::5""#), "{json}");
        assert!(
            json.contains(r#""prefix":{"addr":"2001:db8:d::","len":64}"#),
            "{json}"
        );
        assert!(json.contains(r#""timeout":30"#), "{json}");
    }

    #[test]
    fn every_rule_has_a_unique_name_per_chain() {
        let mut seen = std::collections::BTreeSet::new();
        let meters = Meters {
            rate: [1; 6],
            tolerance_ms: 200,
            sample_above: 5000,
        };
        for r in rules(&meters) {
            assert!(seen.insert((r.chain, r.comment.clone())), "{}", r.comment);
        }
    }

    #[test]
    fn the_byte_meter_set_is_created_apart_with_its_window_in_milliseconds() {
        let spec = TableSpec {
            meters: Meters {
                rate: [0, 100_000_000, 0, 0, 0, 0],
                tolerance_ms: 150,
                sample_above: 0,
            },
            ..spec()
        };
        let bytes4 = SetId::new(Role::Meter(Kind::Bps), Fam::V4);
        assert!(bytes4.side() && SetId::all().filter(|s| s.side()).count() == 2);
        let script = spec.side_set_script(bytes4);
        assert_eq!(
            script,
            "add table inet egressguard\nadd set inet egressguard meter_bytes4 { type ipv4_addr; \
             size 65536; flags dynamic,timeout; timeout 300ms; \
             comment \"egressguard: byte quota window 300 ms\"; }\n"
        );
        assert_eq!(spec.listed_size_timeout(bytes4), (Some(65536), Some(0)));
        // The JSON never adds or deletes it; the step before its re-creation leaves out the
        // rule that fills it, and only that one.
        let s = Structure {
            drop_sets: vec![bytes4],
            add_sets: vec![bytes4],
            ..Structure::fresh()
        };
        let mut tx = Tx::new();
        tx.structure(&spec, &s);
        let full = tx.to_json();
        assert!(!full.contains(r#""name":"meter_bytes4""#), "{full}");
        assert!(full.contains(r#""set":"@meter_bytes4""#), "{full}");
        let mut tx = Tx::new();
        tx.structure_dropping_side(&spec, &s);
        let first = tx.to_json();
        assert!(first.contains(r#"{"delete":{"set""#), "{first}");
        assert!(!first.contains(r#""set":"@meter_bytes4""#), "{first}");
        assert!(first.contains(r#""set":"@meter_bytes6""#), "{first}");
        assert!(first.contains(r#""set":"@src_counters4""#), "{first}");
    }

    #[test]
    fn set_names_are_unique() {
        let names: std::collections::BTreeSet<_> = SetId::all().map(SetId::name).collect();
        assert_eq!(names.len(), 34);
    }
}
