//! A zero-allocation parser for ctnetlink (conntrack over nfnetlink) messages.
//!
//! It reads what the kernel sends on a `NETLINK_NETFILTER` socket: the conntrack events of
//! the `NFNLGRP_CONNTRACK_*` multicast groups and the replies to a table dump. Each message
//! becomes a [`FlowEvent`] borrowed from nothing: the parser walks the attributes in place,
//! stops as soon as the original tuple shows a source outside the [`CustomerFilter`], and
//! never touches the heap. Everything it reads is treated as hostile: every length is
//! checked, and a malformed message is a [`ParseError`], never a panic.
//!
//! Why not `netlink-packet-netfilter`: its conntrack module (0.4) builds a `Vec` per nested
//! attribute and does not decode counters, timestamps or ICMP tuples, which this hot path
//! needs at millions of events per second.
//!
//! Layout (from `linux/netfilter/nfnetlink_conntrack.h`): a `nlmsghdr` (16 bytes, host
//! order), an `nfgenmsg` (family, version, resource id), then netlink attributes whose
//! header is in host order and whose payload is in network order.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::messages::{FlowEvent, FlowEventKind, TcpState, Time};

use super::filter::CustomerFilter;

/// `nlmsghdr` length.
pub const NLMSG_HDRLEN: usize = 16;
/// `nfgenmsg` length.
pub const NFGENMSG_LEN: usize = 4;
/// `NLMSG_NOOP`.
pub const NLMSG_NOOP: u16 = 1;
/// `NLMSG_ERROR`.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`.
pub const NLMSG_DONE: u16 = 3;
/// `NLMSG_OVERRUN`.
pub const NLMSG_OVERRUN: u16 = 4;
/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_MULTI`: part of a dump.
pub const NLM_F_MULTI: u16 = 0x2;
/// `NLM_F_DUMP_INTR`: the table changed during the dump; it may be inconsistent.
pub const NLM_F_DUMP_INTR: u16 = 0x10;
/// `NLM_F_DUMP` (`NLM_F_ROOT | NLM_F_MATCH`).
pub const NLM_F_DUMP: u16 = 0x300;
/// `NLM_F_CREATE`: set on events of new flows.
pub const NLM_F_CREATE: u16 = 0x400;

/// `NFNL_SUBSYS_CTNETLINK`.
pub const NFNL_SUBSYS_CTNETLINK: u8 = 1;
/// `IPCTNL_MSG_CT_NEW`.
pub const IPCTNL_MSG_CT_NEW: u8 = 0;
/// `IPCTNL_MSG_CT_GET`.
pub const IPCTNL_MSG_CT_GET: u8 = 1;
/// `IPCTNL_MSG_CT_DELETE`.
pub const IPCTNL_MSG_CT_DELETE: u8 = 2;

/// Multicast group of new flows (`NFNLGRP_CONNTRACK_NEW`).
pub const NFNLGRP_CONNTRACK_NEW: u32 = 1;
/// Multicast group of flow updates (`NFNLGRP_CONNTRACK_UPDATE`).
pub const NFNLGRP_CONNTRACK_UPDATE: u32 = 2;
/// Multicast group of destroyed flows (`NFNLGRP_CONNTRACK_DESTROY`).
pub const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;

const NLA_TYPE_MASK: u16 = !(0x8000 | 0x4000);

// enum ctattr_type
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_TIMESTAMP: u16 = 20;
const CTA_LABELS: u16 = 22;
// enum ctattr_tuple
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
// enum ctattr_ip
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
// enum ctattr_l4proto
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;
// enum ctattr_protoinfo / ctattr_protoinfo_tcp
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
// enum ctattr_counters
const CTA_COUNTERS_PACKETS: u16 = 1;
const CTA_COUNTERS_BYTES: u16 = 2;
const CTA_COUNTERS32_PACKETS: u16 = 3;
const CTA_COUNTERS32_BYTES: u16 = 4;
// enum ctattr_tstamp
const CTA_TIMESTAMP_START: u16 = 1;
const CTA_TIMESTAMP_STOP: u16 = 2;

/// What is wrong with a message. `Copy` and allocation-free: counting one costs nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A netlink message header claims a length shorter than itself or longer than the data.
    #[error("netlink message length {len} invalid with {avail} bytes left")]
    MessageLength {
        /// The claimed length.
        len: usize,
        /// Bytes that were left in the buffer.
        avail: usize,
    },
    /// A message is too short for its fixed headers.
    #[error("message too short for its {0} header")]
    Short(&'static str),
    /// An attribute header claims a length shorter than itself or longer than its container.
    #[error("attribute length invalid in {0}")]
    AttrLength(&'static str),
    /// An attribute's payload has the wrong size for its type.
    #[error("attribute {0} has the wrong size")]
    AttrSize(&'static str),
    /// A conntrack message without the original tuple, or a tuple without its addresses.
    #[error("conntrack message without {0}")]
    Missing(&'static str),
    /// Source and destination of a tuple are of different address families.
    #[error("tuple mixes IPv4 and IPv6 addresses")]
    MixedFamily,
}

/// One netlink message: header fields and the payload after the `nlmsghdr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NlMsg<'a> {
    /// `nlmsg_type`.
    pub kind: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// Everything after the header.
    pub payload: &'a [u8],
}

/// Iterates over the netlink messages in one datagram. After an error it yields nothing more:
/// a message with a bad length leaves no way to find the next one.
#[derive(Clone, Debug)]
pub struct Messages<'a> {
    buf: &'a [u8],
}

/// The messages in `buf`.
pub fn messages(buf: &[u8]) -> Messages<'_> {
    Messages { buf }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<NlMsg<'a>, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let avail = self.buf.len();
        let Some(hdr) = self.buf.get(..NLMSG_HDRLEN) else {
            self.buf = &[];
            return Some(Err(ParseError::Short("nlmsghdr")));
        };
        let len = u32::from_ne_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
        if len < NLMSG_HDRLEN || len > avail {
            self.buf = &[];
            return Some(Err(ParseError::MessageLength { len, avail }));
        }
        let msg = NlMsg {
            kind: u16::from_ne_bytes([hdr[4], hdr[5]]),
            flags: u16::from_ne_bytes([hdr[6], hdr[7]]),
            seq: u32::from_ne_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]),
            payload: &self.buf[NLMSG_HDRLEN..len],
        };
        let next = align4(len).min(avail);
        self.buf = &self.buf[next..];
        Some(Ok(msg))
    }
}

#[inline]
fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Iterates over netlink attributes: `(type without flags, payload)`.
#[derive(Clone, Debug)]
pub(super) struct Attrs<'a> {
    buf: &'a [u8],
    ctx: &'static str,
}

impl<'a> Attrs<'a> {
    pub(super) fn new(buf: &'a [u8], ctx: &'static str) -> Attrs<'a> {
        Attrs { buf, ctx }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), ParseError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let b = self.buf;
        if b.len() < 4 {
            self.buf = &[];
            return Some(Err(ParseError::AttrLength(self.ctx)));
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            self.buf = &[];
            return Some(Err(ParseError::AttrLength(self.ctx)));
        }
        let payload = &b[4..len];
        self.buf = &b[align4(len).min(b.len())..];
        Some(Ok((kind, payload)))
    }
}

#[inline]
fn be_u8(p: &[u8], what: &'static str) -> Result<u8, ParseError> {
    match p {
        [v, ..] => Ok(*v),
        [] => Err(ParseError::AttrSize(what)),
    }
}

#[inline]
fn be_u16(p: &[u8], what: &'static str) -> Result<u16, ParseError> {
    p.get(..2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or(ParseError::AttrSize(what))
}

#[inline]
fn be_u32(p: &[u8], what: &'static str) -> Result<u32, ParseError> {
    p.get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .ok_or(ParseError::AttrSize(what))
}

#[inline]
pub(super) fn be_u64(p: &[u8], what: &'static str) -> Result<u64, ParseError> {
    p.get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or(ParseError::AttrSize(what))
}

#[inline]
fn be_u128(p: &[u8], what: &'static str) -> Result<u128, ParseError> {
    p.get(..16)
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
        .map(u128::from_be_bytes)
        .ok_or(ParseError::AttrSize(what))
}

/// An address of a tuple as the kernel sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Addr {
    None,
    V4(u32),
    V6(u128),
}

/// The original-direction tuple.
#[derive(Clone, Copy, Debug)]
struct Tuple {
    src: Addr,
    dst: Addr,
    proto: u8,
    sport: u16,
    dport: u16,
    icmp_type: Option<u8>,
    icmp_code: Option<u8>,
}

fn parse_tuple(p: &[u8]) -> Result<Tuple, ParseError> {
    let mut t = Tuple {
        src: Addr::None,
        dst: Addr::None,
        proto: 0,
        sport: 0,
        dport: 0,
        icmp_type: None,
        icmp_code: None,
    };
    for a in Attrs::new(p, "CTA_TUPLE_ORIG") {
        let (kind, v) = a?;
        match kind {
            CTA_TUPLE_IP => {
                for a in Attrs::new(v, "CTA_TUPLE_IP") {
                    let (kind, v) = a?;
                    match kind {
                        CTA_IP_V4_SRC => t.src = Addr::V4(be_u32(v, "CTA_IP_V4_SRC")?),
                        CTA_IP_V4_DST => t.dst = Addr::V4(be_u32(v, "CTA_IP_V4_DST")?),
                        CTA_IP_V6_SRC => t.src = Addr::V6(be_u128(v, "CTA_IP_V6_SRC")?),
                        CTA_IP_V6_DST => t.dst = Addr::V6(be_u128(v, "CTA_IP_V6_DST")?),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for a in Attrs::new(v, "CTA_TUPLE_PROTO") {
                    let (kind, v) = a?;
                    match kind {
                        CTA_PROTO_NUM => t.proto = be_u8(v, "CTA_PROTO_NUM")?,
                        CTA_PROTO_SRC_PORT => t.sport = be_u16(v, "CTA_PROTO_SRC_PORT")?,
                        CTA_PROTO_DST_PORT => t.dport = be_u16(v, "CTA_PROTO_DST_PORT")?,
                        CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE => {
                            t.icmp_type = Some(be_u8(v, "CTA_PROTO_ICMP_TYPE")?)
                        }
                        CTA_PROTO_ICMP_CODE | CTA_PROTO_ICMPV6_CODE => {
                            t.icmp_code = Some(be_u8(v, "CTA_PROTO_ICMP_CODE")?)
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(t)
}

/// What one ctnetlink message turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A flow from a customer source.
    Flow(FlowEvent),
    /// A flow whose original source is not a customer address: dropped before anything else
    /// was read.
    Foreign,
    /// Not a conntrack flow message (expectations, other subsystems, `NLMSG_NOOP`).
    Ignored,
    /// `NLMSG_DONE`: the end of a dump.
    Done,
    /// `NLMSG_ERROR` with this (negative errno) code; 0 is an acknowledgement.
    Error(i32),
    /// `NLMSG_OVERRUN`: the kernel lost data.
    Overrun,
}

/// Parses one message. `time` is stamped into the event ([`FlowEvent::time`]).
///
/// The kind of event: a `NEW` message with `NLM_F_CREATE` is a new flow, one with
/// `NLM_F_MULTI` a flow found by a dump ([`FlowEventKind::Existing`]), any other `NEW` an
/// update; `DELETE` is a destroy.
pub fn parse(msg: &NlMsg<'_>, time: Time, filter: &CustomerFilter) -> Result<Parsed, ParseError> {
    match msg.kind {
        NLMSG_NOOP => return Ok(Parsed::Ignored),
        NLMSG_DONE => return Ok(Parsed::Done),
        NLMSG_OVERRUN => return Ok(Parsed::Overrun),
        NLMSG_ERROR => {
            let code = msg
                .payload
                .get(..4)
                .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(ParseError::Short("nlmsgerr"))?;
            return Ok(Parsed::Error(code));
        }
        _ => {}
    }
    let [subsys, ty] = msg.kind.to_be_bytes();
    if subsys != NFNL_SUBSYS_CTNETLINK {
        return Ok(Parsed::Ignored);
    }
    let kind = match ty {
        IPCTNL_MSG_CT_NEW if msg.flags & NLM_F_CREATE != 0 => FlowEventKind::New,
        IPCTNL_MSG_CT_NEW if msg.flags & NLM_F_MULTI != 0 => FlowEventKind::Existing,
        IPCTNL_MSG_CT_NEW => FlowEventKind::Update,
        IPCTNL_MSG_CT_DELETE => FlowEventKind::Destroy,
        _ => return Ok(Parsed::Ignored),
    };
    let attrs = msg
        .payload
        .get(NFGENMSG_LEN..)
        .ok_or(ParseError::Short("nfgenmsg"))?;

    let mut ev: Option<FlowEvent> = None;
    for a in Attrs::new(attrs, "conntrack message") {
        let (ty, v) = a?;
        if ty == CTA_TUPLE_ORIG {
            // The kernel puts the original tuple first: the filter runs before anything else
            // of the message is read.
            let t = parse_tuple(v)?;
            let (src, dst) = match (t.src, t.dst) {
                (Addr::V4(s), Addr::V4(d)) => {
                    if !filter.contains_v4(s) {
                        return Ok(Parsed::Foreign);
                    }
                    (IpAddr::V4(Ipv4Addr::from(s)), IpAddr::V4(Ipv4Addr::from(d)))
                }
                (Addr::V6(s), Addr::V6(d)) => {
                    if !filter.contains_v6(s) {
                        return Ok(Parsed::Foreign);
                    }
                    (IpAddr::V6(Ipv6Addr::from(s)), IpAddr::V6(Ipv6Addr::from(d)))
                }
                (Addr::None, _) | (_, Addr::None) => {
                    return Err(ParseError::Missing("tuple addresses"));
                }
                _ => return Err(ParseError::MixedFamily),
            };
            let icmp = t.icmp_type.map(|ty| (ty, t.icmp_code.unwrap_or(0)));
            ev = Some(FlowEvent {
                time,
                kind,
                src,
                dst,
                proto: t.proto,
                sport: t.sport,
                dport: t.dport,
                icmp,
                status: 0,
                tcp_state: None,
                orig_packets: None,
                orig_bytes: None,
                reply_packets: None,
                reply_bytes: None,
                start: None,
                stop: None,
                labels: 0,
            });
            continue;
        }
        // Attributes before the tuple are read once it is known: the kernel never sends them
        // first, and a hostile message that does is still parsed correctly below.
        let Some(e) = ev.as_mut() else {
            continue;
        };
        apply(e, ty, v)?;
    }
    let Some(mut e) = ev else {
        return Err(ParseError::Missing("CTA_TUPLE_ORIG"));
    };
    // A message that put attributes before the tuple: read them now (rare, never the kernel).
    for a in Attrs::new(attrs, "conntrack message") {
        let (ty, v) = a?;
        if ty == CTA_TUPLE_ORIG {
            break;
        }
        apply(&mut e, ty, v)?;
    }
    Ok(Parsed::Flow(e))
}

fn apply(e: &mut FlowEvent, ty: u16, v: &[u8]) -> Result<(), ParseError> {
    match ty {
        CTA_STATUS => e.status = be_u32(v, "CTA_STATUS")?,
        CTA_LABELS => {
            // The kernel's label bitmap (`unsigned long` words in host order, 128 bits):
            // labels 64..127, the agent's (`crate::meter`), are its second half.
            let half = Some(v)
                .filter(|v| v.len() == 16)
                .and_then(|v| <[u8; 8]>::try_from(&v[8..]).ok())
                .ok_or(ParseError::AttrSize("CTA_LABELS"))?;
            e.labels = u64::from_ne_bytes(half);
        }
        CTA_PROTOINFO => {
            for a in Attrs::new(v, "CTA_PROTOINFO") {
                let (kind, v) = a?;
                if kind == CTA_PROTOINFO_TCP {
                    for a in Attrs::new(v, "CTA_PROTOINFO_TCP") {
                        let (kind, v) = a?;
                        if kind == CTA_PROTOINFO_TCP_STATE {
                            e.tcp_state =
                                Some(TcpState::from_kernel(be_u8(v, "CTA_PROTOINFO_TCP_STATE")?));
                        }
                    }
                }
            }
        }
        CTA_COUNTERS_ORIG | CTA_COUNTERS_REPLY => {
            let (mut packets, mut bytes) = (None, None);
            for a in Attrs::new(v, "CTA_COUNTERS") {
                let (kind, v) = a?;
                match kind {
                    CTA_COUNTERS_PACKETS => packets = Some(be_u64(v, "CTA_COUNTERS_PACKETS")?),
                    CTA_COUNTERS_BYTES => bytes = Some(be_u64(v, "CTA_COUNTERS_BYTES")?),
                    CTA_COUNTERS32_PACKETS => {
                        packets = Some(u64::from(be_u32(v, "CTA_COUNTERS32_PACKETS")?))
                    }
                    CTA_COUNTERS32_BYTES => {
                        bytes = Some(u64::from(be_u32(v, "CTA_COUNTERS32_BYTES")?))
                    }
                    _ => {}
                }
            }
            if ty == CTA_COUNTERS_ORIG {
                e.orig_packets = packets;
                e.orig_bytes = bytes;
            } else {
                e.reply_packets = packets;
                e.reply_bytes = bytes;
            }
        }
        CTA_TIMESTAMP => {
            for a in Attrs::new(v, "CTA_TIMESTAMP") {
                let (kind, v) = a?;
                match kind {
                    CTA_TIMESTAMP_START => e.start = Some(Time(be_u64(v, "CTA_TIMESTAMP_START")?)),
                    CTA_TIMESTAMP_STOP => e.stop = Some(Time(be_u64(v, "CTA_TIMESTAMP_STOP")?)),
                    _ => {}
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Writes a conntrack table dump request (`IPCTNL_MSG_CT_GET` with `NLM_F_DUMP`, all address
/// families) into `buf` and returns its length.
pub fn dump_request(buf: &mut [u8; NLMSG_HDRLEN + NFGENMSG_LEN], seq: u32) -> usize {
    let len = (NLMSG_HDRLEN + NFGENMSG_LEN) as u32;
    let kind = (u16::from(NFNL_SUBSYS_CTNETLINK) << 8) | u16::from(IPCTNL_MSG_CT_GET);
    buf[0..4].copy_from_slice(&len.to_ne_bytes());
    buf[4..6].copy_from_slice(&kind.to_ne_bytes());
    buf[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    buf[8..12].copy_from_slice(&seq.to_ne_bytes());
    buf[12..16].copy_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: AF_UNSPEC (every family), NFNETLINK_V0, resource id 0.
    buf[16..20].copy_from_slice(&[0, 0, 0, 0]);
    len as usize
}

/// Counts what one buffer held, for the listener's statistics and for tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferCounts {
    /// Flow messages from customer sources, handed to the callback.
    pub kept: u64,
    /// Flow messages from other sources.
    pub foreign: u64,
    /// Malformed messages (or a malformed tail of the buffer).
    pub errors: u64,
    /// Messages that were not flows (done, errors, other subsystems).
    pub other: u64,
}

/// Parses every message of one datagram, calls `on_flow` for each customer flow and
/// `on_control` for every non-flow message (done, error, overrun). Never allocates.
pub fn parse_buffer(
    buf: &[u8],
    time: Time,
    filter: &CustomerFilter,
    mut on_flow: impl FnMut(FlowEvent),
    mut on_control: impl FnMut(&NlMsg<'_>, Parsed),
) -> BufferCounts {
    let mut c = BufferCounts::default();
    for m in messages(buf) {
        let Ok(m) = m else {
            c.errors += 1;
            break;
        };
        match parse(&m, time, filter) {
            Ok(Parsed::Flow(e)) => {
                c.kept += 1;
                on_flow(e);
            }
            Ok(Parsed::Foreign) => c.foreign += 1,
            Ok(p) => {
                c.other += 1;
                on_control(&m, p);
            }
            Err(_) => c.errors += 1,
        }
    }
    c
}

#[cfg(test)]
mod tests;
