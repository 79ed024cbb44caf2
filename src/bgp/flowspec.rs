//! Flowspec NLRI (RFC 8955 for IPv4, RFC 8956 for IPv6): the byte codec, the flowspec
//! routes a block asks for, and the translation of received rules into [`LearnedRule`]s.
//!
//! Encoded by hand, not with bgpkit-parser 0.23: its flowspec encoder does not sort the
//! components, does not fix the end-of-list and first-AND bits, and has no IPv6 prefix offset;
//! its decoder guesses the family of a prefix from its length, ignores the RFC 8956 offset
//! byte and does not say how many bytes one NLRI used, so a list of NLRIs cannot be walked
//! with it. Both are small and covered byte for byte by the RFC examples in the tests below.
//! (Fixes that belong upstream in bgpkit-parser.)

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::policy::LearnBounds;

/// SAFI of flowspec routes (RFC 8955).
pub const SAFI_FLOWSPEC: u8 = 133;

/// Flowspec component types (RFC 8955 section 4.2.2, RFC 8956 section 3).
pub mod component {
    /// Destination prefix.
    pub const DST_PREFIX: u8 = 1;
    /// Source prefix.
    pub const SRC_PREFIX: u8 = 2;
    /// IP protocol (IPv4) / upper-layer protocol (IPv6).
    pub const PROTOCOL: u8 = 3;
    /// Source or destination port.
    pub const PORT: u8 = 4;
    /// Destination port.
    pub const DST_PORT: u8 = 5;
    /// Source port.
    pub const SRC_PORT: u8 = 6;
    /// ICMP type.
    pub const ICMP_TYPE: u8 = 7;
    /// ICMP code.
    pub const ICMP_CODE: u8 = 8;
    /// TCP flags (bitmask).
    pub const TCP_FLAGS: u8 = 9;
    /// Packet length.
    pub const PACKET_LENGTH: u8 = 10;
    /// DSCP.
    pub const DSCP: u8 = 11;
    /// Fragment (bitmask).
    pub const FRAGMENT: u8 = 12;
    /// Flow label (IPv6 only).
    pub const FLOW_LABEL: u8 = 13;
}

/// Why flowspec bytes could not be decoded or a rule could not be encoded.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlowspecError {
    /// The data ended inside an NLRI.
    #[error("flowspec NLRI truncated")]
    Truncated,
    /// Components are not in strictly increasing type order (RFC 8955 section 4.2).
    #[error("flowspec component type {found} follows type {previous}")]
    Order {
        /// The type before.
        previous: u8,
        /// The type found.
        found: u8,
    },
    /// A component type this codec does not know.
    #[error("unknown flowspec component type {0}")]
    UnknownComponent(u8),
    /// A prefix length beyond the family's width, or an offset beyond the length.
    #[error("invalid flowspec prefix length {length} (offset {offset})")]
    Prefix {
        /// The length.
        length: u8,
        /// The offset (IPv6).
        offset: u8,
    },
    /// The first operator of a list has its AND bit set.
    #[error("first operator of component {0} has the AND bit set")]
    FirstAnd(u8),
    /// An NLRI longer than the 12-bit length field allows, or an empty one.
    #[error("flowspec NLRI length {0} out of range")]
    Length(usize),
    /// A component holds no operator.
    #[error("component {0} has no operator")]
    Empty(u8),
    /// A numeric operator has its reserved bit set.
    #[error("numeric operator of component {0} has the reserved bit set")]
    Reserved(u8),
}

/// One NLRI of a list whose framing held ([`FlowNlri::decode_each`]): decoded, or the bytes
/// of a malformed one (length prefix included) and what is wrong with it.
pub type Located<'a> = Result<FlowNlri, (&'a [u8], FlowspecError)>;

/// Address family of a flowspec NLRI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Afi {
    /// AFI 1.
    Ipv4 = 1,
    /// AFI 2.
    Ipv6 = 2,
}

impl Afi {
    /// The family of an address.
    pub fn of(addr: &IpAddr) -> Afi {
        match addr {
            IpAddr::V4(_) => Afi::Ipv4,
            IpAddr::V6(_) => Afi::Ipv6,
        }
    }

    /// From the wire value.
    pub fn from_u16(v: u16) -> Option<Afi> {
        match v {
            1 => Some(Afi::Ipv4),
            2 => Some(Afi::Ipv6),
            _ => None,
        }
    }
}

/// A numeric operator and its value (RFC 8955 section 4.2.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NumOp {
    /// AND with the previous term (else OR). Cleared on the first operator by the encoder.
    pub and: bool,
    /// Less than.
    pub lt: bool,
    /// Greater than.
    pub gt: bool,
    /// Equal.
    pub eq: bool,
    /// The value.
    pub value: u64,
}

impl NumOp {
    /// `== value`, ORed with the previous term.
    pub fn eq(value: u64) -> NumOp {
        NumOp {
            and: false,
            lt: false,
            gt: false,
            eq: true,
            value,
        }
    }
}

/// A bitmask operator and its value (RFC 8955 section 4.2.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BitOp {
    /// AND with the previous term.
    pub and: bool,
    /// Negate.
    pub not: bool,
    /// Match: all bits (else any bit).
    pub matched: bool,
    /// The bitmask.
    pub value: u64,
}

/// A prefix component: the prefix and, for IPv6, the bit offset where matching starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PrefixMatch {
    /// The prefix (its length is the last bit matched).
    pub prefix: IpNet,
    /// First bit matched (IPv6 only; 0 for IPv4).
    pub offset: u8,
}

/// One flowspec component.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Component {
    /// Type 1 or 2 (destination or source prefix).
    Prefix(u8, PrefixMatch),
    /// A numeric component (types 3-8, 10, 11, 13).
    Numeric(u8, Vec<NumOp>),
    /// A bitmask component (types 9 and 12).
    Bitmask(u8, Vec<BitOp>),
}

impl Component {
    /// The component type.
    pub fn kind(&self) -> u8 {
        match self {
            Component::Prefix(t, _) | Component::Numeric(t, _) | Component::Bitmask(t, _) => *t,
        }
    }
}

/// One flowspec NLRI: a family and its components.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FlowNlri {
    /// IPv4 or IPv6.
    pub afi: Afi,
    /// The components (sorted by type when encoded).
    pub components: Vec<Component>,
}

fn value_len(v: u64) -> (u8, usize) {
    if v <= 0xff {
        (0, 1)
    } else if v <= 0xffff {
        (1, 2)
    } else if v <= 0xffff_ffff {
        (2, 4)
    } else {
        (3, 8)
    }
}

fn put_value(out: &mut Vec<u8>, v: u64, len: usize) {
    out.extend_from_slice(&v.to_be_bytes()[8 - len..]);
}

fn put_prefix(out: &mut Vec<u8>, afi: Afi, p: &PrefixMatch) -> Result<(), FlowspecError> {
    let len = p.prefix.prefix_len();
    let err = FlowspecError::Prefix {
        length: len,
        offset: p.offset,
    };
    match (afi, p.prefix.addr()) {
        (Afi::Ipv4, IpAddr::V4(a)) => {
            if p.offset != 0 {
                return Err(err);
            }
            out.push(len);
            out.extend_from_slice(&a.octets()[..usize::from(len).div_ceil(8)]);
        }
        (Afi::Ipv6, IpAddr::V6(a)) => {
            if p.offset > len {
                return Err(err);
            }
            out.push(len);
            out.push(p.offset);
            // The pattern: bits offset..len of the address, left-aligned (RFC 8956 3.1).
            let bits = u128::from(a);
            let width = u32::from(len - p.offset);
            let pattern = if width == 0 {
                0
            } else {
                (bits << p.offset) & (u128::MAX << (128 - width))
            };
            out.extend_from_slice(&pattern.to_be_bytes()[..(width as usize).div_ceil(8)]);
        }
        _ => return Err(err),
    }
    Ok(())
}

impl FlowNlri {
    /// The source prefix component, when there is one.
    pub fn source(&self) -> Option<IpNet> {
        self.components.iter().find_map(|c| match c {
            Component::Prefix(t, p) if *t == component::SRC_PREFIX => Some(p.prefix),
            _ => None,
        })
    }

    /// Encodes the NLRI with its length prefix. Components are sorted by type, the first
    /// operator of each list gets its AND bit cleared, the last its end-of-list bit set, and
    /// every value the shortest length that holds it (BIRD resets the session otherwise).
    pub fn encode(&self) -> Result<Vec<u8>, FlowspecError> {
        let mut comps: Vec<&Component> = self.components.iter().collect();
        comps.sort_by_key(|c| c.kind());
        let mut body = Vec::with_capacity(32);
        let mut previous = 0u8;
        for c in comps {
            let t = c.kind();
            if t <= previous {
                return Err(FlowspecError::Order { previous, found: t });
            }
            previous = t;
            body.push(t);
            match c {
                Component::Prefix(_, p) => put_prefix(&mut body, self.afi, p)?,
                Component::Numeric(_, ops) => {
                    if ops.is_empty() {
                        return Err(FlowspecError::Empty(t));
                    }
                    for (i, op) in ops.iter().enumerate() {
                        let (lbits, len) = value_len(op.value);
                        let mut b = lbits << 4;
                        if i + 1 == ops.len() {
                            b |= 0x80;
                        }
                        if op.and && i > 0 {
                            b |= 0x40;
                        }
                        b |= u8::from(op.lt) << 2 | u8::from(op.gt) << 1 | u8::from(op.eq);
                        body.push(b);
                        put_value(&mut body, op.value, len);
                    }
                }
                Component::Bitmask(_, ops) => {
                    if ops.is_empty() {
                        return Err(FlowspecError::Empty(t));
                    }
                    for (i, op) in ops.iter().enumerate() {
                        let (lbits, len) = value_len(op.value);
                        let mut b = lbits << 4;
                        if i + 1 == ops.len() {
                            b |= 0x80;
                        }
                        if op.and && i > 0 {
                            b |= 0x40;
                        }
                        b |= u8::from(op.not) << 1 | u8::from(op.matched);
                        body.push(b);
                        put_value(&mut body, op.value, len);
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(body.len() + 2);
        match body.len() {
            0 => return Err(FlowspecError::Length(0)),
            n if n < 240 => out.push(n as u8),
            n if n <= 0x0fff => {
                out.push(0xf0 | (n >> 8) as u8);
                out.push(n as u8);
            }
            n => return Err(FlowspecError::Length(n)),
        }
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decodes one NLRI from the front of `data`; returns it and the bytes it used.
    pub fn decode(afi: Afi, data: &[u8]) -> Result<(FlowNlri, usize), FlowspecError> {
        let (head, len) = frame(data)?;
        if len == 0 {
            return Err(FlowspecError::Length(0));
        }
        let body = &data[head..head + len];
        let mut r = Reader { data: body, pos: 0 };
        let mut components = Vec::new();
        let mut previous = 0u8;
        while r.pos < body.len() {
            let t = r.u8()?;
            if t <= previous {
                return Err(FlowspecError::Order { previous, found: t });
            }
            previous = t;
            let c = match t {
                component::DST_PREFIX | component::SRC_PREFIX => {
                    Component::Prefix(t, r.prefix(afi)?)
                }
                component::TCP_FLAGS | component::FRAGMENT => Component::Bitmask(
                    t,
                    read_ops(&mut r, t, 0x0c, |b, value| BitOp {
                        and: b & 0x40 != 0,
                        not: b & 0x02 != 0,
                        matched: b & 0x01 != 0,
                        value,
                    })?,
                ),
                3..=8 | 10 | 11 | 13 => {
                    if t == component::FLOW_LABEL && afi == Afi::Ipv4 {
                        return Err(FlowspecError::UnknownComponent(t));
                    }
                    Component::Numeric(
                        t,
                        read_ops(&mut r, t, 0x08, |b, value| NumOp {
                            and: b & 0x40 != 0,
                            lt: b & 0x04 != 0,
                            gt: b & 0x02 != 0,
                            eq: b & 0x01 != 0,
                            value,
                        })?,
                    )
                }
                other => return Err(FlowspecError::UnknownComponent(other)),
            };
            components.push(c);
        }
        Ok((FlowNlri { afi, components }, head + len))
    }

    /// Decodes a list of NLRIs (the rest of an MP_REACH or MP_UNREACH attribute) one by one.
    /// The outer error is the list's framing: an NLRI's length prefix that runs past the end,
    /// so no NLRI after it can be located. An NLRI that can be located but does not decode
    /// comes back as its own error, with its bytes (length prefix included), so that the
    /// others in the list still count (RFC 8955 section 4.2 makes it malformed; see
    /// [`super::wire::decode_update`] for what the session does with it).
    pub fn decode_each(afi: Afi, mut data: &[u8]) -> Result<Vec<Located<'_>>, FlowspecError> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let (head, len) = frame(data)?;
            let (whole, rest) = data.split_at(head + len);
            out.push(match FlowNlri::decode(afi, whole) {
                Ok((n, _)) => Ok(n),
                Err(e) => Err((whole, e)),
            });
            data = rest;
        }
        Ok(out)
    }

    /// Decodes a whole list of NLRIs (the rest of an MP_REACH or MP_UNREACH attribute).
    pub fn decode_all(afi: Afi, mut data: &[u8]) -> Result<Vec<FlowNlri>, FlowspecError> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let (n, used) = FlowNlri::decode(afi, data)?;
            out.push(n);
            data = &data[used..];
        }
        Ok(out)
    }
}

/// The length prefix of the NLRI at the front of `data` (RFC 8955 section 4.2: one octet
/// below 240, else two with the high nibble 0xf): returns the prefix's size and the length
/// of the NLRI value, which must fit in `data`.
fn frame(data: &[u8]) -> Result<(usize, usize), FlowspecError> {
    let first = *data.first().ok_or(FlowspecError::Truncated)?;
    let (head, len) = if first >= 0xf0 {
        let second = *data.get(1).ok_or(FlowspecError::Truncated)?;
        (2, (usize::from(first & 0x0f) << 8) | usize::from(second))
    } else {
        (1, usize::from(first))
    };
    if data.len() - head < len {
        return Err(FlowspecError::Truncated);
    }
    Ok((head, len))
}

/// Reads one component's operator list (RFC 8955 4.2.1): the first operator must not carry
/// the AND bit, `reserved` bits must be zero, the end-of-list bit closes it.
fn read_ops<T>(
    r: &mut Reader<'_>,
    t: u8,
    reserved: u8,
    op: impl Fn(u8, u64) -> T,
) -> Result<Vec<T>, FlowspecError> {
    let mut ops = Vec::new();
    loop {
        let b = r.u8()?;
        let len = 1usize << ((b >> 4) & 3);
        if ops.is_empty() && b & 0x40 != 0 {
            return Err(FlowspecError::FirstAnd(t));
        }
        if b & reserved != 0 {
            return Err(FlowspecError::Reserved(t));
        }
        ops.push(op(b, r.value(len)?));
        if b & 0x80 != 0 {
            return Ok(ops);
        }
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u8(&mut self) -> Result<u8, FlowspecError> {
        let b = *self.data.get(self.pos).ok_or(FlowspecError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    fn bytes(&mut self, n: usize) -> Result<&[u8], FlowspecError> {
        let s = self
            .data
            .get(self.pos..self.pos + n)
            .ok_or(FlowspecError::Truncated)?;
        self.pos += n;
        Ok(s)
    }

    fn value(&mut self, n: usize) -> Result<u64, FlowspecError> {
        Ok(self
            .bytes(n)?
            .iter()
            .fold(0u64, |acc, b| acc << 8 | u64::from(*b)))
    }

    fn prefix(&mut self, afi: Afi) -> Result<PrefixMatch, FlowspecError> {
        let length = self.u8()?;
        match afi {
            Afi::Ipv4 => {
                if length > 32 {
                    return Err(FlowspecError::Prefix { length, offset: 0 });
                }
                let b = self.bytes(usize::from(length).div_ceil(8))?;
                let mut o = [0u8; 4];
                o[..b.len()].copy_from_slice(b);
                let net = Ipv4Net::new(Ipv4Addr::from(o), length)
                    .map_err(|_| FlowspecError::Prefix { length, offset: 0 })?;
                Ok(PrefixMatch {
                    prefix: IpNet::V4(net.trunc()),
                    offset: 0,
                })
            }
            Afi::Ipv6 => {
                let offset = self.u8()?;
                if length > 128 || offset > length {
                    return Err(FlowspecError::Prefix { length, offset });
                }
                let width = usize::from(length - offset);
                let b = self.bytes(width.div_ceil(8))?;
                let mut o = [0u8; 16];
                o[..b.len()].copy_from_slice(b);
                let pattern = u128::from_be_bytes(o);
                let bits = if offset >= 128 { 0 } else { pattern >> offset };
                let net = Ipv6Net::new(Ipv6Addr::from(bits), length)
                    .map_err(|_| FlowspecError::Prefix { length, offset })?;
                Ok(PrefixMatch {
                    prefix: IpNet::V6(net.trunc()),
                    offset,
                })
            }
        }
    }
}

/// The flowspec traffic-rate extended community (RFC 8955 section 7.3): type 0x80, sub-type
/// 0x06, a 2-octet AS (informational) and the rate in bytes per second as IEEE float; 0
/// discards.
///
/// Encoded by hand: bgpkit-parser 0.23 writes type 0x40 for it (a non-transitive
/// two-octet-AS community), which BIRD and GoBGP do not read as traffic-rate.
pub fn traffic_rate(asn: u16, bytes_per_sec: f32) -> [u8; 8] {
    let a = asn.to_be_bytes();
    let r = bytes_per_sec.to_be_bytes();
    [0x80, 0x06, a[0], a[1], r[0], r[1], r[2], r[3]]
}

/// What a learned rule does to matching traffic.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum LearnedAction {
    /// traffic-rate 0: drop.
    Discard,
    /// traffic-rate: limit to this many bytes per second.
    RateLimit {
        /// Bytes per second.
        bytes_per_sec: u64,
    },
}

/// A flowspec rule received from a peer, translated exactly into what the enforcer can apply:
/// traffic from `source` (and to `destination`, when given) of `proto` to `dports`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LearnedRule {
    /// The peer (its policy name) that announced it.
    pub peer: String,
    /// Source prefix.
    pub source: IpNet,
    /// Destination prefix, when the rule has one.
    pub destination: Option<IpNet>,
    /// IP protocol, when the rule restricts it.
    pub proto: Option<u8>,
    /// Destination ports (sorted), or all when empty.
    pub dports: Vec<u16>,
    /// What to do.
    pub action: LearnedAction,
}

/// Why a received rule could not be translated exactly.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Untranslatable {
    /// The rule does not match on a source prefix: the enforcer blocks sources only.
    #[error("no source prefix")]
    NoSource,
    /// An IPv6 prefix with a non-zero offset.
    #[error("prefix with bit offset {0}")]
    Offset(u8),
    /// A component the enforcer does not express.
    #[error("component type {0} not supported")]
    Component(u8),
    /// An operator list that is not a plain list of values (or port ranges).
    #[error("operators of component {0} are not a list of values")]
    Operators(u8),
    /// Too many ports after expanding ranges.
    #[error("more than {0} ports")]
    TooManyPorts(usize),
    /// No traffic-rate action (or an action other than traffic-rate).
    #[error("no traffic-rate action")]
    NoAction,
    /// A traffic-rate that is not a finite non-negative number.
    #[error("traffic-rate {0} is not a rate")]
    BadRate(String),
}

/// Most ports a learned rule may expand to.
pub const MAX_LEARNED_PORTS: usize = 1024;

/// Values matched by an operator list of `==` terms ORed together, and `>=a AND <=b` ranges.
fn values(t: u8, ops: &[NumOp], max: u64) -> Result<Vec<u64>, Untranslatable> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < ops.len() {
        let op = ops[i];
        if op.and && i > 0 {
            return Err(Untranslatable::Operators(t));
        }
        let next = ops.get(i + 1);
        match (op.lt, op.gt, op.eq, next) {
            (false, false, true, n) if n.is_none_or(|n| !n.and) => {
                out.push(op.value);
                i += 1;
            }
            // >= a AND <= b
            (false, true, true, Some(n)) if n.and && n.lt && n.eq && !n.gt => {
                if n.value < op.value || n.value - op.value > MAX_LEARNED_PORTS as u64 {
                    return Err(Untranslatable::TooManyPorts(MAX_LEARNED_PORTS));
                }
                out.extend(op.value..=n.value);
                i += 2;
            }
            _ => return Err(Untranslatable::Operators(t)),
        }
        if out.len() > MAX_LEARNED_PORTS {
            return Err(Untranslatable::TooManyPorts(MAX_LEARNED_PORTS));
        }
    }
    if out.iter().any(|v| *v > max) {
        return Err(Untranslatable::Operators(t));
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Why a learnt rule is not enforced. Counted per reason in the peer's statistics; the
/// rule itself is not kept (a peer announcing millions of refused rules costs no memory).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    /// The NLRI has no exact translation.
    #[error("untranslatable: {0}")]
    Untranslatable(#[from] Untranslatable),
    /// Anything but a plain discard of a source prefix (a destination, protocol, ports or a
    /// rate limit): the agent enforces learnt rules as source-only drops.
    #[error("not a plain discard of a source prefix")]
    NotSourceDiscard,
    /// The source is not inside the policy's `networks:`: a peer cannot make this router
    /// drop traffic of anyone but its own customers.
    #[error("source {0} is outside the policy's networks")]
    OutsideNetworks(IpNet),
    /// The source is wider than the policy's block width (/32, `ipv6_block_prefix`).
    #[error("source {prefix} is wider than the block width /{width}")]
    TooWide {
        /// The rule's source.
        prefix: IpNet,
        /// The widest prefix length accepted for its family.
        width: u8,
    },
    /// The peer already has `max_learned` rules in force.
    #[error("the peer's max_learned ({0}) rules are in force")]
    PeerCap(u32),
    /// The source holds protected addresses (allowlisted or the router's own).
    #[error("source {0} holds protected addresses")]
    Protected(IpNet),
}

impl Refusal {
    /// The reason's short name, as counted in `status` and the metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Untranslatable(_) => "untranslatable",
            Refusal::NotSourceDiscard => "not_source_discard",
            Refusal::OutsideNetworks(_) => "outside_networks",
            Refusal::TooWide { .. } => "too_wide",
            Refusal::PeerCap(_) => "peer_cap",
            Refusal::Protected(_) => "protected",
        }
    }
}

/// Whether a translated rule is one the agent enforces: a plain discard of a source prefix
/// inside `bounds`' networks and no wider than its block widths.
pub fn admit(rule: &LearnedRule, bounds: &LearnBounds) -> Result<(), Refusal> {
    if rule.destination.is_some()
        || rule.proto.is_some()
        || !rule.dports.is_empty()
        || rule.action != LearnedAction::Discard
    {
        return Err(Refusal::NotSourceDiscard);
    }
    let width = match rule.source {
        IpNet::V4(_) => bounds.ipv4_width,
        IpNet::V6(_) => bounds.ipv6_width,
    };
    if rule.source.prefix_len() < width {
        return Err(Refusal::TooWide {
            prefix: rule.source,
            width,
        });
    }
    if !bounds.networks.iter().any(|n| n.contains(&rule.source)) {
        return Err(Refusal::OutsideNetworks(rule.source));
    }
    Ok(())
}

/// Translates a received flowspec NLRI and the extended communities of its UPDATE into a
/// [`LearnedRule`], or says why it cannot be expressed exactly.
pub fn translate(
    peer: &str,
    nlri: &FlowNlri,
    ext_communities: &[[u8; 8]],
) -> Result<LearnedRule, Untranslatable> {
    let mut source = None;
    let mut destination = None;
    let mut proto = None;
    let mut dports = Vec::new();
    for c in &nlri.components {
        match c {
            Component::Prefix(t, p) => {
                if p.offset != 0 {
                    return Err(Untranslatable::Offset(p.offset));
                }
                if *t == component::SRC_PREFIX {
                    source = Some(p.prefix);
                } else {
                    destination = Some(p.prefix);
                }
            }
            Component::Numeric(component::PROTOCOL, ops) => {
                let v = values(component::PROTOCOL, ops, 255)?;
                match v.as_slice() {
                    [one] => proto = Some(*one as u8),
                    _ => return Err(Untranslatable::Operators(component::PROTOCOL)),
                }
            }
            Component::Numeric(component::DST_PORT, ops) => {
                dports = values(component::DST_PORT, ops, 65535)?
                    .into_iter()
                    .map(|v| v as u16)
                    .collect();
            }
            other => return Err(Untranslatable::Component(other.kind())),
        }
    }
    let source = source.ok_or(Untranslatable::NoSource)?;
    let rate = ext_communities
        .iter()
        .find(|c| c[0] == 0x80 && c[1] == 0x06)
        .map(|c| f32::from_be_bytes([c[4], c[5], c[6], c[7]]))
        .ok_or(Untranslatable::NoAction)?;
    if !rate.is_finite() || rate < 0.0 {
        return Err(Untranslatable::BadRate(rate.to_string()));
    }
    let action = if rate == 0.0 {
        LearnedAction::Discard
    } else {
        LearnedAction::RateLimit {
            bytes_per_sec: rate as u64,
        }
    };
    Ok(LearnedRule {
        peer: peer.to_owned(),
        source,
        destination,
        proto,
        dports,
        action,
    })
}

/// The flowspec NLRI for a block: source = the target, and the scope's protocol and
/// destination ports when it has them.
pub fn block_nlri(target: &IpNet, proto: Option<u8>, dports: &[u16]) -> FlowNlri {
    let afi = Afi::of(&target.addr());
    let mut components = vec![Component::Prefix(
        component::SRC_PREFIX,
        PrefixMatch {
            prefix: target.trunc(),
            offset: 0,
        },
    )];
    if let Some(p) = proto {
        components.push(Component::Numeric(
            component::PROTOCOL,
            vec![NumOp::eq(u64::from(p))],
        ));
    }
    if !dports.is_empty() {
        let mut ports: Vec<u16> = dports.to_vec();
        ports.sort_unstable();
        ports.dedup();
        components.push(Component::Numeric(
            component::DST_PORT,
            ports.into_iter().map(|p| NumOp::eq(u64::from(p))).collect(),
        ));
    }
    FlowNlri { afi, components }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn pfx(t: u8, s: &str) -> Component {
        Component::Prefix(
            t,
            PrefixMatch {
                prefix: v4(s),
                offset: 0,
            },
        )
    }

    fn op(and: bool, lt: bool, gt: bool, eq: bool, value: u64) -> NumOp {
        NumOp {
            and,
            lt,
            gt,
            eq,
            value,
        }
    }

    /// RFC 8955 section 4.3, example 1: packets to 192.0.2.0/24 and TCP port 25.
    #[test]
    fn rfc8955_example_1() {
        let wire = [
            0x0b, 0x01, 0x18, 0xc0, 0x00, 0x02, 0x03, 0x81, 0x06, 0x04, 0x81, 0x19,
        ];
        let n = FlowNlri {
            afi: Afi::Ipv4,
            // Given out of order on purpose: the encoder sorts.
            components: vec![
                Component::Numeric(component::PORT, vec![NumOp::eq(25)]),
                pfx(component::DST_PREFIX, "192.0.2.0/24"),
                Component::Numeric(component::PROTOCOL, vec![NumOp::eq(6)]),
            ],
        };
        assert_eq!(n.encode().unwrap(), wire);
        let (d, used) = FlowNlri::decode(Afi::Ipv4, &wire).unwrap();
        assert_eq!(used, wire.len());
        assert_eq!(d.encode().unwrap(), wire);
    }

    /// RFC 8955 section 4.3, example 2: packets to 192.0.2.0/24 from 203.0.113.0/24 and port
    /// {range [137, 139] or 8080}.
    #[test]
    fn rfc8955_example_2() {
        let wire = [
            0x12, 0x01, 0x18, 0xc0, 0x00, 0x02, 0x02, 0x18, 0xcb, 0x00, 0x71, 0x04, 0x03, 0x89,
            0x45, 0x8b, 0x91, 0x1f, 0x90,
        ];
        let n = FlowNlri {
            afi: Afi::Ipv4,
            components: vec![
                pfx(component::DST_PREFIX, "192.0.2.0/24"),
                pfx(component::SRC_PREFIX, "203.0.113.0/24"),
                Component::Numeric(
                    component::PORT,
                    vec![
                        op(false, false, true, true, 137),
                        op(true, true, false, true, 139),
                        op(false, false, false, true, 8080),
                    ],
                ),
            ],
        };
        assert_eq!(n.encode().unwrap(), wire);
        let (d, _) = FlowNlri::decode(Afi::Ipv4, &wire).unwrap();
        assert_eq!(d, n);
    }

    /// RFC 8955 section 4.3, example 3: packets to 192.0.2.1 and fragment {DF or FF}.
    #[test]
    fn rfc8955_example_3() {
        let wire = [0x09, 0x01, 0x20, 0xc0, 0x00, 0x02, 0x01, 0x0c, 0x80, 0x05];
        let n = FlowNlri {
            afi: Afi::Ipv4,
            components: vec![
                pfx(component::DST_PREFIX, "192.0.2.1/32"),
                Component::Bitmask(
                    component::FRAGMENT,
                    vec![BitOp {
                        and: false,
                        not: false,
                        matched: false,
                        value: 0x05,
                    }],
                ),
            ],
        };
        assert_eq!(n.encode().unwrap(), wire);
        assert_eq!(FlowNlri::decode(Afi::Ipv4, &wire).unwrap().0, n);
    }

    /// RFC 8956 section 3.8, example 1: packets to 2001:db8::/32 from
    /// ::1234:5678:9a00:0/64-104 with upper-layer protocol TCP.
    #[test]
    fn rfc8956_example_1() {
        let wire = [
            0x12, 0x01, 0x20, 0x00, 0x20, 0x01, 0x0d, 0xb8, 0x02, 0x68, 0x40, 0x12, 0x34, 0x56,
            0x78, 0x9a, 0x03, 0x81, 0x06,
        ];
        let n = FlowNlri {
            afi: Afi::Ipv6,
            components: vec![
                Component::Prefix(
                    component::DST_PREFIX,
                    PrefixMatch {
                        prefix: "2001:db8::/32".parse().unwrap(),
                        offset: 0,
                    },
                ),
                Component::Prefix(
                    component::SRC_PREFIX,
                    PrefixMatch {
                        prefix: "::1234:5678:9a00:0/104".parse().unwrap(),
                        offset: 64,
                    },
                ),
                Component::Numeric(component::PROTOCOL, vec![NumOp::eq(6)]),
            ],
        };
        assert_eq!(n.encode().unwrap(), wire);
        assert_eq!(FlowNlri::decode(Afi::Ipv6, &wire).unwrap().0, n);
    }

    #[test]
    fn encoder_fixes_and_and_end_bits_and_value_length() {
        let n = FlowNlri {
            afi: Afi::Ipv4,
            components: vec![Component::Numeric(
                component::DST_PORT,
                vec![
                    op(true, false, false, true, 25),
                    op(false, false, false, true, 587),
                ],
            )],
        };
        // First AND cleared (0x01), last end set with 2-byte value (0x91).
        assert_eq!(
            n.encode().unwrap(),
            [0x06, 0x05, 0x01, 0x19, 0x91, 0x02, 0x4b]
        );
    }

    #[test]
    fn block_nlri_bytes() {
        let n = block_nlri(&v4("203.0.113.7/32"), Some(6), &[587, 25, 25]);
        assert_eq!(
            n.encode().unwrap(),
            [
                0x0f, 0x02, 0x20, 203, 0, 113, 7, 0x03, 0x81, 0x06, 0x05, 0x01, 0x19, 0x91, 0x02,
                0x4b
            ]
        );
        let n6 = block_nlri(&"2001:db8:c::/64".parse().unwrap(), None, &[]);
        assert_eq!(
            n6.encode().unwrap(),
            [
                0x0b, 0x02, 0x40, 0x00, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x0c, 0x00, 0x00
            ]
        );
    }

    #[test]
    fn traffic_rate_is_0x8006() {
        assert_eq!(traffic_rate(0, 0.0), [0x80, 0x06, 0, 0, 0, 0, 0, 0]);
        // 1250000 bytes/s = 0x4998_9680 as f32.
        assert_eq!(
            traffic_rate(65000, 1_250_000.0),
            [0x80, 0x06, 0xfd, 0xe8, 0x49, 0x98, 0x96, 0x80]
        );
    }

    #[test]
    fn decoder_rejects_bad_input() {
        assert_eq!(
            FlowNlri::decode(Afi::Ipv4, &[0x06, 0x03, 0x81, 0x06, 0x02, 0x08, 0x0a]),
            Err(FlowspecError::Order {
                previous: 3,
                found: 2
            })
        );
        assert_eq!(
            FlowNlri::decode(Afi::Ipv4, &[0x03, 0x03, 0xc1, 0x06]),
            Err(FlowspecError::FirstAnd(3))
        );
        assert_eq!(
            FlowNlri::decode(Afi::Ipv4, &[0x03, 0x02, 0x21, 0x0a]),
            Err(FlowspecError::Prefix {
                length: 33,
                offset: 0
            })
        );
        assert_eq!(
            FlowNlri::decode(Afi::Ipv4, &[0x05, 0x02, 0x20, 0x0a]),
            Err(FlowspecError::Truncated)
        );
        assert_eq!(
            FlowNlri::decode(Afi::Ipv4, &[0x02, 0x03, 0x01]),
            Err(FlowspecError::Truncated)
        );
        assert_eq!(
            FlowNlri::decode(Afi::Ipv4, &[0x02, 0x0e, 0x81]),
            Err(FlowspecError::UnknownComponent(14))
        );
        assert_eq!(
            FlowNlri::decode(Afi::Ipv6, &[0x04, 0x02, 0x08, 0x09, 0xff]),
            Err(FlowspecError::Prefix {
                length: 8,
                offset: 9
            })
        );
    }

    #[test]
    fn long_length_field() {
        let ports: Vec<u16> = (1000..1100).collect();
        let n = block_nlri(&v4("192.0.2.1/32"), Some(17), &ports);
        let wire = n.encode().unwrap();
        assert_eq!(wire[0] & 0xf0, 0xf0);
        let (d, used) = FlowNlri::decode(Afi::Ipv4, &wire).unwrap();
        assert_eq!(used, wire.len());
        assert_eq!(d, n);
    }

    #[test]
    fn translate_exact_rules_and_refuse_others() {
        let n = block_nlri(&v4("203.0.113.7/32"), Some(6), &[25, 587]);
        let r = translate("rr1", &n, &[traffic_rate(0, 0.0)]).unwrap();
        assert_eq!(r.source, v4("203.0.113.7/32"));
        assert_eq!(r.proto, Some(6));
        assert_eq!(r.dports, vec![25, 587]);
        assert_eq!(r.action, LearnedAction::Discard);
        let r = translate("rr1", &n, &[traffic_rate(0, 1000.0)]).unwrap();
        assert_eq!(
            r.action,
            LearnedAction::RateLimit {
                bytes_per_sec: 1000
            }
        );
        // Port range 137..=139 from RFC 8955 example 2 (type 5 this time).
        let range = FlowNlri {
            afi: Afi::Ipv4,
            components: vec![
                pfx(component::SRC_PREFIX, "203.0.113.0/24"),
                Component::Numeric(
                    component::DST_PORT,
                    vec![
                        op(false, false, true, true, 137),
                        op(true, true, false, true, 139),
                        op(false, false, false, true, 8080),
                    ],
                ),
            ],
        };
        let r = translate("rr1", &range, &[traffic_rate(0, 0.0)]).unwrap();
        assert_eq!(r.dports, vec![137, 138, 139, 8080]);
        assert_eq!(
            translate("rr1", &n, &[]).unwrap_err(),
            Untranslatable::NoAction
        );
        let no_src = block_nlri(&v4("203.0.113.7/32"), None, &[]);
        let mut no_src = no_src;
        no_src.components[0] = pfx(component::DST_PREFIX, "203.0.113.7/32");
        assert_eq!(
            translate("rr1", &no_src, &[traffic_rate(0, 0.0)]).unwrap_err(),
            Untranslatable::NoSource
        );
        let gt = FlowNlri {
            afi: Afi::Ipv4,
            components: vec![
                pfx(component::SRC_PREFIX, "203.0.113.0/24"),
                Component::Numeric(
                    component::DST_PORT,
                    vec![op(false, false, true, false, 1024)],
                ),
            ],
        };
        assert_eq!(
            translate("rr1", &gt, &[traffic_rate(0, 0.0)]).unwrap_err(),
            Untranslatable::Operators(5)
        );
        let frag = FlowNlri {
            afi: Afi::Ipv4,
            components: vec![
                pfx(component::SRC_PREFIX, "203.0.113.0/24"),
                Component::Bitmask(
                    component::FRAGMENT,
                    vec![BitOp {
                        and: false,
                        not: false,
                        matched: false,
                        value: 1,
                    }],
                ),
            ],
        };
        assert_eq!(
            translate("rr1", &frag, &[traffic_rate(0, 0.0)]).unwrap_err(),
            Untranslatable::Component(12)
        );
    }

    fn learnt(source: &str) -> LearnedRule {
        LearnedRule {
            peer: "rr1".into(),
            source: source.parse().unwrap(),
            destination: None,
            proto: None,
            dports: vec![],
            action: LearnedAction::Discard,
        }
    }

    fn bounds() -> LearnBounds {
        LearnBounds {
            networks: vec![
                "203.0.113.0/24".parse().unwrap(),
                "2001:db8:c::/48".parse().unwrap(),
            ],
            ipv4_width: 32,
            ipv6_width: 64,
        }
    }

    /// The attack: `source 32.0.0.0/3 then discard` from a trusted peer would drop an
    /// eighth of IPv4 as senders; it is outside the networks and wider than a block.
    #[test]
    fn learnt_rules_are_bounded_to_customer_sources_of_block_width() {
        let b = bounds();
        assert_eq!(admit(&learnt("203.0.113.7/32"), &b), Ok(()));
        assert_eq!(admit(&learnt("2001:db8:c:5::/64"), &b), Ok(()));
        assert_eq!(admit(&learnt("2001:db8:c:5::9/128"), &b), Ok(()));
        assert_eq!(
            admit(&learnt("32.0.0.0/3"), &b),
            Err(Refusal::TooWide {
                prefix: "32.0.0.0/3".parse().unwrap(),
                width: 32
            })
        );
        assert_eq!(
            admit(&learnt("198.51.100.9/32"), &b),
            Err(Refusal::OutsideNetworks("198.51.100.9/32".parse().unwrap()))
        );
        assert!(matches!(
            admit(&learnt("203.0.113.0/24"), &b),
            Err(Refusal::TooWide { width: 32, .. })
        ));
        assert!(matches!(
            admit(&learnt("2001:db8:c::/48"), &b),
            Err(Refusal::TooWide { width: 64, .. })
        ));
        for r in [
            LearnedRule {
                destination: Some("198.51.100.0/24".parse().unwrap()),
                ..learnt("203.0.113.7/32")
            },
            LearnedRule {
                proto: Some(17),
                ..learnt("203.0.113.7/32")
            },
            LearnedRule {
                dports: vec![53],
                ..learnt("203.0.113.7/32")
            },
            LearnedRule {
                action: LearnedAction::RateLimit {
                    bytes_per_sec: 1000,
                },
                ..learnt("203.0.113.7/32")
            },
        ] {
            assert_eq!(admit(&r, &b), Err(Refusal::NotSourceDiscard), "{r:?}");
        }
        // Without networks (no bounds known), nothing is admitted.
        assert!(admit(&learnt("203.0.113.7/32"), &LearnBounds::default()).is_err());
    }
}
