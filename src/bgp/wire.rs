//! BGP messages on the wire: framing and header checks, the OPEN, KEEPALIVE, NOTIFICATION
//! and UPDATE messages the speaker sends, and the strict decoding of what a peer sends, with
//! the NOTIFICATION (RFC 4271 section 6) that answers each protocol error.
//!
//! bgpkit-parser 0.23 is the codec for OPEN (both ways), NOTIFICATION, KEEPALIVE,
//! ROUTE-REFRESH and the unicast (RTBH) UPDATEs with their common path attributes. What it
//! gets wrong is done here, each in a small function that says why:
//! - OPEN: its encoder truncates a 4-octet AS into the 2-octet field; we put AS_TRANS (23456)
//!   there and the real AS in the 4-octet AS capability (RFC 6793).
//! - Flowspec UPDATEs: its MP_REACH encoder omits the next-hop length byte when there is no
//!   next hop (flowspec needs a zero-length next hop, RFC 8955 section 4), and it writes the
//!   traffic-rate community with type 0x40; the MP_REACH/MP_UNREACH and extended-communities
//!   attributes of flowspec routes are therefore written here (see [`super::flowspec`]).
//! - Received UPDATEs: it does not decode SAFI 133 NLRI and tolerates framing errors a session
//!   must answer with a NOTIFICATION (a bad attribute length ends its parse silently), so the
//!   UPDATE receive path is a strict walker of our own; it is fuzzed (`fuzz/fuzz_targets/bgp_update.rs`).
//!
//! These workarounds belong upstream in bgpkit-parser.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use bgpkit_parser::models::{
    Afi as KAfi, AsPath, AsnLength, AttrFlags, Attribute, AttributeValue, Attributes, BgpError,
    BgpMessage, BgpNotificationMessage, BgpOpenMessage, BgpUpdateMessage, Capability,
    CapabilityValue, Community as KCommunity, LargeCommunity, NetworkPrefix, NextHopAddress, Nlri,
    OptParam, Origin, ParamValue, Safi as KSafi,
    capabilities::{
        BgpCapabilityType, FourOctetAsCapability, MultiprotocolExtensionsCapability,
        RouteRefreshCapability,
    },
};
use bytes::{Bytes, BytesMut};
use ipnet::IpNet;
use serde::Serialize;

use super::flowspec::{Afi, FlowNlri, FlowspecError, SAFI_FLOWSPEC};
use crate::policy::{Community, Family};

/// Length of the message header.
pub const HEADER_LEN: usize = 19;
/// Largest message without the extended-message capability (RFC 4271).
pub const MAX_MESSAGE: usize = 4096;
/// The 2-octet AS placeholder for 4-octet AS numbers (RFC 6793).
pub const AS_TRANS: u16 = 23456;
/// SAFI of unicast routes.
pub const SAFI_UNICAST: u8 = 1;

/// Message types.
pub mod msg {
    /// OPEN.
    pub const OPEN: u8 = 1;
    /// UPDATE.
    pub const UPDATE: u8 = 2;
    /// NOTIFICATION.
    pub const NOTIFICATION: u8 = 3;
    /// KEEPALIVE.
    pub const KEEPALIVE: u8 = 4;
    /// ROUTE-REFRESH (RFC 2918).
    pub const ROUTE_REFRESH: u8 = 5;
}

/// Path attribute type codes used here.
pub mod attr {
    /// ORIGIN (well-known).
    pub const ORIGIN: u8 = 1;
    /// AS_PATH (well-known).
    pub const AS_PATH: u8 = 2;
    /// NEXT_HOP (well-known).
    pub const NEXT_HOP: u8 = 3;
    /// MULTI_EXIT_DISC (optional non-transitive).
    pub const MED: u8 = 4;
    /// LOCAL_PREF (well-known).
    pub const LOCAL_PREF: u8 = 5;
    /// ATOMIC_AGGREGATE (well-known).
    pub const ATOMIC_AGGREGATE: u8 = 6;
    /// AGGREGATOR (optional transitive).
    pub const AGGREGATOR: u8 = 7;
    /// COMMUNITIES (RFC 1997, optional transitive).
    pub const COMMUNITIES: u8 = 8;
    /// ORIGINATOR_ID (RFC 4456, optional non-transitive).
    pub const ORIGINATOR_ID: u8 = 9;
    /// CLUSTER_LIST (RFC 4456, optional non-transitive).
    pub const CLUSTER_LIST: u8 = 10;
    /// MP_REACH_NLRI (RFC 4760, optional non-transitive).
    pub const MP_REACH: u8 = 14;
    /// MP_UNREACH_NLRI (RFC 4760, optional non-transitive).
    pub const MP_UNREACH: u8 = 15;
    /// EXTENDED_COMMUNITIES (RFC 4360, optional transitive).
    pub const EXT_COMMUNITIES: u8 = 16;
    /// AS4_PATH (RFC 6793, optional transitive).
    pub const AS4_PATH: u8 = 17;
    /// AS4_AGGREGATOR (RFC 6793, optional transitive).
    pub const AS4_AGGREGATOR: u8 = 18;
    /// LARGE_COMMUNITY (RFC 8092, optional transitive).
    pub const LARGE_COMMUNITIES: u8 = 32;

    /// The Optional (0x80) and Transitive (0x40) bits an attribute must carry, for the
    /// attributes checked here.
    pub fn flags(code: u8) -> Option<u8> {
        match code {
            ORIGIN | AS_PATH | NEXT_HOP | LOCAL_PREF | ATOMIC_AGGREGATE => Some(0x40),
            MED | ORIGINATOR_ID | CLUSTER_LIST | MP_REACH | MP_UNREACH => Some(0x80),
            AGGREGATOR | COMMUNITIES | EXT_COMMUNITIES | AS4_PATH | AS4_AGGREGATOR
            | LARGE_COMMUNITIES => Some(0xc0),
            _ => None,
        }
    }
}

/// NOTIFICATION error codes and sub-codes (RFC 4271 section 4.5, RFC 4486).
pub mod err {
    /// Message header error.
    pub const HEADER: u8 = 1;
    /// Connection not synchronised (bad marker).
    pub const HEADER_SYNC: u8 = 1;
    /// Bad message length.
    pub const HEADER_LENGTH: u8 = 2;
    /// Bad message type.
    pub const HEADER_TYPE: u8 = 3;
    /// OPEN message error.
    pub const OPEN: u8 = 2;
    /// Unsupported version number.
    pub const OPEN_VERSION: u8 = 1;
    /// Bad peer AS.
    pub const OPEN_PEER_AS: u8 = 2;
    /// Bad BGP identifier.
    pub const OPEN_BGP_ID: u8 = 3;
    /// Unsupported optional parameter.
    pub const OPEN_PARAM: u8 = 4;
    /// Unacceptable hold time.
    pub const OPEN_HOLD: u8 = 6;
    /// UPDATE message error.
    pub const UPDATE: u8 = 3;
    /// Malformed attribute list.
    pub const UPDATE_ATTR_LIST: u8 = 1;
    /// Missing well-known attribute.
    pub const UPDATE_MISSING: u8 = 3;
    /// Attribute flags error.
    pub const UPDATE_ATTR_FLAGS: u8 = 4;
    /// Attribute length error.
    pub const UPDATE_ATTR_LEN: u8 = 5;
    /// Invalid ORIGIN.
    pub const UPDATE_ORIGIN: u8 = 6;
    /// Optional attribute error.
    pub const UPDATE_OPTIONAL: u8 = 9;
    /// Invalid network field.
    pub const UPDATE_NETWORK: u8 = 10;
    /// Malformed AS_PATH.
    pub const UPDATE_AS_PATH: u8 = 11;
    /// Hold timer expired.
    pub const HOLD_EXPIRED: u8 = 4;
    /// Finite state machine error.
    pub const FSM: u8 = 5;
    /// Cease.
    pub const CEASE: u8 = 6;
    /// Cease: administrative shutdown (RFC 4486).
    pub const CEASE_SHUTDOWN: u8 = 2;
    /// Cease: peer de-configured.
    pub const CEASE_DECONFIGURED: u8 = 3;
    /// Cease: administrative reset.
    pub const CEASE_RESET: u8 = 4;
    /// Cease: connection collision resolution (RFC 4486).
    pub const CEASE_COLLISION: u8 = 7;
}

/// A NOTIFICATION: what we send on a protocol error, or what the peer sent us.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Notification {
    /// Error code.
    pub code: u8,
    /// Error sub-code.
    pub subcode: u8,
    /// Data (the offending field, as RFC 4271 asks).
    pub data: Vec<u8>,
}

impl Notification {
    /// A notification with data.
    pub fn new(code: u8, subcode: u8, data: impl Into<Vec<u8>>) -> Notification {
        Notification {
            code,
            subcode,
            data: data.into(),
        }
    }

    /// Encodes it as a whole message (bgpkit-parser's encoder).
    pub fn encode(&self) -> Vec<u8> {
        let m = BgpMessage::Notification(BgpNotificationMessage {
            error: BgpError::new(self.code, self.subcode),
            data: self.data.clone(),
        });
        m.encode(AsnLength::Bits32)
            .map(|b| b.to_vec())
            // A NOTIFICATION of at most a few hundred bytes cannot exceed the length field;
            // fall back to the bare header + codes should the codec ever refuse.
            .unwrap_or_else(|_| frame(msg::NOTIFICATION, &[self.code, self.subcode]))
    }
}

impl std::fmt::Display for Notification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.code, self.subcode)?;
        if !self.data.is_empty() {
            write!(f, " data ")?;
            for b in self.data.iter().take(32) {
                write!(f, "{b:02x}")?;
            }
        }
        Ok(())
    }
}

/// Puts a header on a message body.
pub fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let len = HEADER_LEN + body.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&[0xff; 16]);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.push(kind);
    out.extend_from_slice(body);
    out
}

/// Checks a received header; returns the message type and total length.
pub fn check_header(h: &[u8; HEADER_LEN]) -> Result<(u8, usize), Notification> {
    if h[..16].iter().any(|b| *b != 0xff) {
        return Err(Notification::new(err::HEADER, err::HEADER_SYNC, []));
    }
    let len = usize::from(u16::from_be_bytes([h[16], h[17]]));
    let kind = h[18];
    let bad_len = || Notification::new(err::HEADER, err::HEADER_LENGTH, [h[16], h[17]]);
    if !(HEADER_LEN..=MAX_MESSAGE).contains(&len) {
        return Err(bad_len());
    }
    let ok = match kind {
        msg::OPEN => len >= 29,
        msg::UPDATE => len >= 23,
        msg::NOTIFICATION => len >= 21,
        msg::KEEPALIVE => len == HEADER_LEN,
        msg::ROUTE_REFRESH => len == 23,
        _ => return Err(Notification::new(err::HEADER, err::HEADER_TYPE, [kind])),
    };
    if !ok {
        return Err(bad_len());
    }
    Ok((kind, len))
}

/// `(AFI, SAFI)` of a policy family.
pub fn family_code(f: Family) -> (u16, u8) {
    match f {
        Family::Ipv4Unicast => (1, SAFI_UNICAST),
        Family::Ipv6Unicast => (2, SAFI_UNICAST),
        Family::Ipv4Flowspec => (1, SAFI_FLOWSPEC),
        Family::Ipv6Flowspec => (2, SAFI_FLOWSPEC),
    }
}

/// The policy family of an `(AFI, SAFI)`.
pub fn family_of(afi: u16, safi: u8) -> Option<Family> {
    Family::ALL
        .iter()
        .map(|(f, _)| *f)
        .find(|f| family_code(*f) == (afi, safi))
}

/// What the peer said in its OPEN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerOpen {
    /// Its AS (from the 4-octet capability when present).
    pub asn: u32,
    /// Proposed hold time.
    pub hold_time: u16,
    /// BGP identifier.
    pub router_id: Ipv4Addr,
    /// Multiprotocol families it offered.
    pub families: BTreeSet<(u16, u8)>,
    /// It speaks 4-octet AS numbers.
    pub four_octet: bool,
    /// It understands ROUTE-REFRESH.
    pub route_refresh: bool,
    /// Its Graceful Restart capability (RFC 4724), when it sent one.
    pub graceful_restart: Option<PeerGr>,
    /// Its Long-Lived Graceful Restart capability (RFC 9494): per `(AFI, SAFI)`, the
    /// Forwarding State bit and the long-lived stale time in seconds.
    pub long_lived: BTreeMap<(u16, u8), (bool, u32)>,
}

/// A peer's Graceful Restart capability (RFC 4724 section 3).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerGr {
    /// Restart State (R): the peer has just restarted.
    pub restarted: bool,
    /// Restart time in seconds.
    pub restart_time: u16,
    /// Families whose routes it keeps across its restart: `(AFI, SAFI)` → Forwarding State.
    pub families: BTreeMap<(u16, u8), bool>,
}

/// Graceful restart as we advertise it in our OPEN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrOffer {
    /// Restart time in seconds (at most 4095).
    pub restart_time: u16,
    /// Set the Restart State bit: the first session since the agent started.
    pub restarted: bool,
    /// Long-lived stale time in seconds (0: no LLGR capability).
    pub long_lived_stale_time: u32,
}

/// Capability codes bgpkit-parser has no encoder for that we write by hand.
pub mod cap {
    /// Graceful Restart (RFC 4724).
    pub const GRACEFUL_RESTART: u8 = 64;
    /// Long-Lived Graceful Restart (RFC 9494).
    pub const LONG_LIVED_GR: u8 = 71;
    /// Restart State bit of the Restart Flags.
    pub const RESTART_STATE: u16 = 0x8000;
    /// Forwarding State bit of an address family's flags.
    pub const FORWARDING_STATE: u8 = 0x80;
}

/// The Graceful Restart capability's value: flags and restart time, then each family with
/// the Forwarding State bit set (the agent's blocks outlive it, in the kernel and in its
/// database).
pub fn graceful_restart_value(gr: &GrOffer, families: &[Family]) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + 4 * families.len());
    let flags = if gr.restarted { cap::RESTART_STATE } else { 0 };
    v.extend_from_slice(&(flags | (gr.restart_time & 0x0fff)).to_be_bytes());
    for f in families {
        let (afi, safi) = family_code(*f);
        v.extend_from_slice(&afi.to_be_bytes());
        v.push(safi);
        v.push(cap::FORWARDING_STATE);
    }
    v
}

/// The Long-Lived Graceful Restart capability's value (RFC 9494 section 3): each family
/// with the Forwarding State bit and the 24-bit long-lived stale time.
pub fn long_lived_value(stale_time: u32, families: &[Family]) -> Vec<u8> {
    let mut v = Vec::with_capacity(7 * families.len());
    let t = stale_time.min(0xff_ffff).to_be_bytes();
    for f in families {
        let (afi, safi) = family_code(*f);
        v.extend_from_slice(&afi.to_be_bytes());
        v.push(safi);
        v.push(cap::FORWARDING_STATE);
        v.extend_from_slice(&t[1..]);
    }
    v
}

/// Parses a Graceful Restart capability's value; `None` when malformed (ignored then, as if
/// it had not been sent).
pub fn parse_graceful_restart(v: &[u8]) -> Option<PeerGr> {
    let (head, rest) = v.split_first_chunk::<2>()?;
    if !rest.len().is_multiple_of(4) {
        return None;
    }
    let word = u16::from_be_bytes(*head);
    Some(PeerGr {
        restarted: word & cap::RESTART_STATE != 0,
        restart_time: word & 0x0fff,
        families: rest
            .chunks_exact(4)
            .map(|c| {
                (
                    (u16::from_be_bytes([c[0], c[1]]), c[2]),
                    c[3] & cap::FORWARDING_STATE != 0,
                )
            })
            .collect(),
    })
}

/// Parses a Long-Lived Graceful Restart capability's value; `None` when malformed.
pub fn parse_long_lived(v: &[u8]) -> Option<BTreeMap<(u16, u8), (bool, u32)>> {
    if !v.len().is_multiple_of(7) {
        return None;
    }
    Some(
        v.chunks_exact(7)
            .map(|c| {
                (
                    (u16::from_be_bytes([c[0], c[1]]), c[2]),
                    (
                        c[3] & cap::FORWARDING_STATE != 0,
                        u32::from_be_bytes([0, c[4], c[5], c[6]]),
                    ),
                )
            })
            .collect(),
    )
}

/// Encodes our OPEN (bgpkit-parser), with AS_TRANS in the 2-octet field for a 4-octet AS.
pub fn encode_open(
    local_as: u32,
    hold_time: u16,
    router_id: Ipv4Addr,
    families: &[Family],
) -> Vec<u8> {
    encode_open_gr(local_as, hold_time, router_id, families, None)
}

/// [`encode_open`] with the Graceful Restart (and, with a long-lived stale time, the
/// Long-Lived Graceful Restart) capability for every family; bgpkit-parser has no LLGR
/// encoder, so both are written here as raw capability values.
pub fn encode_open_gr(
    local_as: u32,
    hold_time: u16,
    router_id: Ipv4Addr,
    families: &[Family],
    gr: Option<GrOffer>,
) -> Vec<u8> {
    let mut caps: Vec<Capability> = families
        .iter()
        .map(|f| {
            let (afi, safi) = family_code(*f);
            let afi = if afi == 1 { KAfi::Ipv4 } else { KAfi::Ipv6 };
            let safi = if safi == SAFI_FLOWSPEC {
                KSafi::FlowSpec
            } else {
                KSafi::Unicast
            };
            Capability {
                ty: BgpCapabilityType::MULTIPROTOCOL_EXTENSIONS_FOR_BGP_4,
                value: CapabilityValue::MultiprotocolExtensions(
                    MultiprotocolExtensionsCapability { afi, safi },
                ),
            }
        })
        .collect();
    caps.push(Capability {
        ty: BgpCapabilityType::ROUTE_REFRESH_CAPABILITY_FOR_BGP_4,
        value: CapabilityValue::RouteRefresh(RouteRefreshCapability),
    });
    caps.push(Capability {
        ty: BgpCapabilityType::SUPPORT_FOR_4_OCTET_AS_NUMBER_CAPABILITY,
        value: CapabilityValue::FourOctetAs(FourOctetAsCapability { asn: local_as }),
    });
    if let Some(gr) = gr.filter(|g| g.restart_time > 0) {
        caps.push(Capability {
            ty: BgpCapabilityType::GRACEFUL_RESTART_CAPABILITY,
            value: CapabilityValue::Raw(graceful_restart_value(&gr, families)),
        });
        if gr.long_lived_stale_time > 0 {
            caps.push(Capability {
                ty: BgpCapabilityType::LONG_LIVED_GRACEFUL_RESTART_CAPABILITY,
                value: CapabilityValue::Raw(long_lived_value(gr.long_lived_stale_time, families)),
            });
        }
    }
    // Workaround: bgpkit-parser writes `u16::from(asn)`, truncating a 4-octet AS.
    let two_octet = u16::try_from(local_as).unwrap_or(AS_TRANS);
    let open = BgpOpenMessage {
        version: 4,
        asn: two_octet.into(),
        hold_time,
        bgp_identifier: router_id,
        extended_length: false,
        opt_params: vec![OptParam {
            param_type: 2,
            param_value: ParamValue::Capacities(caps),
        }],
    };
    BgpMessage::Open(open)
        .encode(AsnLength::Bits32)
        .map(|b| b.to_vec())
        // Four families and two capabilities are far below every length limit.
        .unwrap_or_default()
}

/// A KEEPALIVE (bgpkit-parser).
pub fn encode_keepalive() -> Vec<u8> {
    BgpMessage::KeepAlive
        .encode(AsnLength::Bits32)
        .map(|b| b.to_vec())
        .unwrap_or_else(|_| frame(msg::KEEPALIVE, &[]))
}

/// Decodes and checks a peer's OPEN (whole message, header included) with bgpkit-parser.
pub fn decode_open(m: &[u8]) -> Result<PeerOpen, Notification> {
    let body = m.get(HEADER_LEN..).unwrap_or_default();
    // Version first: RFC 4271 wants the largest version we support in the data.
    if body.first() != Some(&4) {
        return Err(Notification::new(err::OPEN, err::OPEN_VERSION, [0, 4]));
    }
    // bgpkit-parser reads past a short optional-parameter block without complaint; check the
    // declared length against the message first.
    if body.len() < 10 || usize::from(body[9]) != body.len() - 10 {
        return Err(Notification::new(
            err::HEADER,
            err::HEADER_LENGTH,
            (m.len() as u16).to_be_bytes(),
        ));
    }
    let mut b = Bytes::copy_from_slice(body);
    let open = bgpkit_parser::parser::bgp::messages::parse_bgp_open_message(&mut b)
        .map_err(|_| Notification::new(err::OPEN, 0, []))?;
    let mut out = PeerOpen {
        asn: u32::from(open.asn),
        hold_time: open.hold_time,
        router_id: open.bgp_identifier,
        families: BTreeSet::new(),
        four_octet: false,
        route_refresh: false,
        graceful_restart: None,
        long_lived: BTreeMap::new(),
    };
    for p in &open.opt_params {
        match &p.param_value {
            ParamValue::Capacities(caps) if p.param_type == 2 => {
                for c in caps {
                    match &c.value {
                        CapabilityValue::MultiprotocolExtensions(mp) => {
                            out.families.insert((mp.afi as u16, mp.safi as u8));
                        }
                        CapabilityValue::FourOctetAs(f) => {
                            out.four_octet = true;
                            out.asn = f.asn;
                        }
                        CapabilityValue::RouteRefresh(_) => out.route_refresh = true,
                        CapabilityValue::GracefulRestart(g) => {
                            out.graceful_restart = Some(PeerGr {
                                restarted: g.restart_state,
                                restart_time: g.restart_time,
                                families: g
                                    .address_families
                                    .iter()
                                    .map(|f| ((f.afi as u16, f.safi as u8), f.forwarding_state))
                                    .collect(),
                            });
                        }
                        CapabilityValue::Raw(raw)
                            if c.ty == BgpCapabilityType::GRACEFUL_RESTART_CAPABILITY =>
                        {
                            out.graceful_restart = parse_graceful_restart(raw);
                        }
                        CapabilityValue::Raw(raw)
                            if c.ty
                                == BgpCapabilityType::LONG_LIVED_GRACEFUL_RESTART_CAPABILITY =>
                        {
                            out.long_lived = parse_long_lived(raw).unwrap_or_default();
                        }
                        CapabilityValue::Raw(raw)
                            if c.ty == BgpCapabilityType::MULTIPROTOCOL_EXTENSIONS_FOR_BGP_4
                                && raw.len() == 4 =>
                        {
                            out.families
                                .insert((u16::from_be_bytes([raw[0], raw[1]]), raw[3]));
                        }
                        _ => {}
                    }
                }
            }
            _ => {
                return Err(Notification::new(
                    err::OPEN,
                    err::OPEN_PARAM,
                    [p.param_type],
                ));
            }
        }
    }
    if out.hold_time == 1 || out.hold_time == 2 {
        return Err(Notification::new(
            err::OPEN,
            err::OPEN_HOLD,
            out.hold_time.to_be_bytes(),
        ));
    }
    if out.router_id.is_unspecified() {
        return Err(Notification::new(
            err::OPEN,
            err::OPEN_BGP_ID,
            out.router_id.octets(),
        ));
    }
    Ok(out)
}

/// What a received UPDATE says, as far as the speaker cares.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UpdateIn {
    /// Flowspec routes announced.
    pub flow_reach: Vec<FlowNlri>,
    /// Flowspec routes withdrawn.
    pub flow_unreach: Vec<FlowNlri>,
    /// The UPDATE's extended communities (each 8 bytes).
    pub ext_communities: Vec<[u8; 8]>,
    /// Unicast prefixes announced or withdrawn (counted, not used).
    pub unicast: usize,
    /// End-of-RIB marker for `(AFI, SAFI)`.
    pub end_of_rib: Option<(u16, u8)>,
    /// RFC 7606 treat-as-withdraw: a malformed (or missing) attribute made every route the
    /// UPDATE announces count as withdrawn (they were moved to `flow_unreach`). The first
    /// reason found.
    pub treat_as_withdraw: Option<Malformed>,
    /// RFC 7606 attribute discard: attributes dropped (malformed ATOMIC_AGGREGATE,
    /// AGGREGATOR, AS4_*; repeated attributes) while the UPDATE was processed.
    pub discarded: Vec<Malformed>,
    /// Flowspec NLRI that could be located (their length prefixes hold) but not decoded:
    /// each is treated as withdrawn on its own, the UPDATE's other routes stand.
    pub bad_nlri: Vec<BadNlri>,
    /// Families whose MP_REACH_NLRI / MP_UNREACH_NLRI hid their NLRI: "AFI/SAFI disable"
    /// (RFC 4760 section 7). Nothing of theirs is in the fields above.
    pub disabled: Vec<FamilyError>,
}

/// A flowspec NLRI of known length whose content is malformed (RFC 8955 section 4.2).
#[derive(Clone, Debug, PartialEq)]
pub struct BadNlri {
    /// Its family.
    pub afi: Afi,
    /// The NLRI as received, length prefix included (the key it would have been learnt
    /// under, were it well-formed).
    pub nlri: Vec<u8>,
    /// What is wrong with it.
    pub error: FlowspecError,
}

/// An MP_REACH_NLRI or MP_UNREACH_NLRI whose AFI/SAFI could be read but whose NLRI could not
/// be located: that family is disabled for the rest of the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct FamilyError {
    /// The AFI.
    pub afi: u16,
    /// The SAFI.
    pub safi: u8,
    /// What was wrong.
    pub reason: &'static str,
}

impl FamilyError {
    /// The policy name of the family (`ipv4-flowspec`), or `afi A safi S`.
    pub fn family(&self) -> String {
        family_name(self.afi, self.safi)
    }
}

/// The policy name of `(AFI, SAFI)` (`ipv4-flowspec`), or `afi A safi S` for one the policy
/// has no name for.
pub fn family_name(afi: u16, safi: u8) -> String {
    Family::ALL
        .iter()
        .find(|(f, _)| family_code(*f) == (afi, safi))
        .map(|(_, name)| (*name).to_owned())
        .unwrap_or_else(|| format!("afi {afi} safi {safi}"))
}

impl std::fmt::Display for FamilyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.family(), self.reason)
    }
}

/// A malformed attribute handled without a session reset (RFC 7606).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Malformed {
    /// The attribute type code (0 when even the header was cut off).
    pub code: u8,
    /// What was wrong.
    pub reason: &'static str,
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (attribute type {})", self.reason, self.code)
    }
}

fn check_prefixes(mut d: &[u8], max_bits: u8) -> Result<usize, ()> {
    let mut n = 0;
    while let Some((&len, rest)) = d.split_first() {
        if len > max_bits {
            return Err(());
        }
        let bytes = usize::from(len).div_ceil(8);
        d = rest.get(bytes..).ok_or(())?;
        n += 1;
    }
    Ok(n)
}

/// The AFI and SAFI an MP_REACH_NLRI / MP_UNREACH_NLRI value starts with.
fn afi_safi(value: &[u8]) -> Option<(u16, u8)> {
    match value {
        [a, b, safi, ..] => Some((u16::from_be_bytes([*a, *b]), *safi)),
        _ => None,
    }
}

/// Reads the NLRI of an MP_REACH_NLRI (`reach`) or MP_UNREACH_NLRI of `(afi, safi)` into
/// `out`. `Err` is the reason to disable the family: the NLRI cannot be located (RFC 7606
/// section 5.3: a prefix length beyond the family, or an NLRI that overruns the attribute).
/// A flowspec NLRI that can be located but not decoded goes to [`UpdateIn::bad_nlri`].
fn mp_nlri(
    out: &mut UpdateIn,
    (afi, safi): (u16, u8),
    nlri: &[u8],
    reach: bool,
) -> Result<(), &'static str> {
    match (Afi::from_u16(afi), safi) {
        (Some(a), SAFI_FLOWSPEC) => {
            let each = FlowNlri::decode_each(a, nlri)
                .map_err(|_| "a flowspec NLRI length overruns the attribute")?;
            for n in each {
                match n {
                    Ok(n) if reach => out.flow_reach.push(n),
                    Ok(n) => out.flow_unreach.push(n),
                    Err((bytes, error)) => out.bad_nlri.push(BadNlri {
                        afi: a,
                        nlri: bytes.to_vec(),
                        error,
                    }),
                }
            }
        }
        (Some(a), SAFI_UNICAST) => {
            let bits = if a == Afi::Ipv4 { 32 } else { 128 };
            out.unicast += check_prefixes(nlri, bits)
                .map_err(|_| "a prefix is longer than the family's or overruns the attribute")?;
        }
        // Not a family of ours: nothing to learn from it.
        _ => {}
    }
    Ok(())
}

fn check_as_path(d: &[u8], four: bool) -> bool {
    let w = if four { 4 } else { 2 };
    let mut i = 0;
    while i < d.len() {
        let Some(&[t, n]) = d.get(i..i + 2).and_then(|s| <&[u8; 2]>::try_from(s).ok()) else {
            return false;
        };
        if !(1..=4).contains(&t) || n == 0 {
            return false;
        }
        i += 2 + usize::from(n) * w;
    }
    i == d.len()
}

/// Decodes a received UPDATE (whole message) with the error handling of RFC 7606: what
/// breaks the message framing, the unicast NLRI fields, a repeated MP_REACH/MP_UNREACH or
/// one whose AFI/SAFI cannot even be read is an error (the NOTIFICATION to reset the session
/// with); an MP_REACH/MP_UNREACH whose NLRI cannot be located disables its family
/// ([`UpdateIn::disabled`]); a flowspec NLRI of known length that does not decode is
/// treated as withdrawn alone ([`UpdateIn::bad_nlri`]); a malformed or missing path
/// attribute otherwise makes the UPDATE treat-as-withdraw or has the attribute discarded, as
/// the RFC says for each (see [`UpdateIn::treat_as_withdraw`] and [`UpdateIn::discarded`]).
/// `four_octet` says whether AS numbers in AS_PATH are 4 octets wide on this session.
pub fn decode_update(m: &[u8], four_octet: bool) -> Result<UpdateIn, Notification> {
    let list = || Notification::new(err::UPDATE, err::UPDATE_ATTR_LIST, []);
    let body = m.get(HEADER_LEN..).ok_or_else(list)?;
    let mut out = UpdateIn::default();
    if body.len() < 4 {
        return Err(list());
    }
    let wlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let withdrawn = body.get(2..2 + wlen).ok_or_else(list)?;
    let rest = &body[2 + wlen..];
    if rest.len() < 2 {
        return Err(list());
    }
    let alen = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
    let attrs = rest.get(2..2 + alen).ok_or_else(list)?;
    let nlri = &rest[2 + alen..];
    let network = || Notification::new(err::UPDATE, err::UPDATE_NETWORK, []);
    out.unicast += check_prefixes(withdrawn, 32).map_err(|_| network())?;
    let announced = check_prefixes(nlri, 32).map_err(|_| network())?;
    out.unicast += announced;
    if wlen == 0 && alen == 0 && nlri.is_empty() {
        out.end_of_rib = Some((1, SAFI_UNICAST));
        return Ok(out);
    }

    let mut seen = [false; 256];
    let mut i = 0;
    let mut mp_reach = false;
    let mut only_empty_unreach = None;
    let mut count = 0;
    let mut withdraw: Option<Malformed> = None;
    let mut taw = |code: u8, reason: &'static str| {
        withdraw.get_or_insert(Malformed { code, reason });
    };
    while i < attrs.len() {
        let start = i;
        let flags = attrs[i];
        // RFC 7606 section 4: fewer octets left than an attribute header, or a length that
        // overruns the attribute field, is treat-as-withdraw; the Total Path Attribute
        // Length still locates the NLRI field. Only when the broken attribute is the one
        // carrying NLRI (MP_REACH/MP_UNREACH) can the routes not be found: session reset.
        let Some(&code) = attrs.get(i + 1) else {
            taw(0, "truncated attribute header");
            break;
        };
        let extended = flags & 0x10 != 0;
        let head = if extended { 4 } else { 3 };
        let len = match attrs.get(i + 2..i + head) {
            Some([l]) => usize::from(*l),
            Some([h, l]) => usize::from(u16::from_be_bytes([*h, *l])),
            _ => usize::MAX,
        };
        let Some(value) = attrs.get(i + head..).and_then(|v| v.get(..len)) else {
            if code == attr::MP_REACH || code == attr::MP_UNREACH {
                // RFC 4760 section 7: the family is disabled when it can be read (the
                // attribute's start is there); the rest of the UPDATE is treat-as-withdraw
                // as for any overrunning attribute (RFC 7606 section 4).
                if let Some(family) = attrs.get(i + head..).and_then(afi_safi) {
                    out.disabled.push(FamilyError {
                        afi: family.0,
                        safi: family.1,
                        reason: "attribute length overruns the path attributes",
                    });
                    taw(code, "attribute length overruns the path attributes");
                    break;
                }
                return Err(Notification::new(
                    err::UPDATE,
                    err::UPDATE_ATTR_LEN,
                    attrs[start..].iter().take(64).copied().collect::<Vec<u8>>(),
                ));
            }
            taw(code, "attribute length overruns the path attributes");
            break;
        };
        i += head + len;
        let whole = &attrs[start..i];
        if seen[usize::from(code)] {
            // RFC 7606 section 3 g: a repeated MP_REACH/MP_UNREACH resets the session; any
            // other repeated attribute is discarded after its first occurrence.
            if code == attr::MP_REACH || code == attr::MP_UNREACH {
                return Err(list());
            }
            out.discarded.push(Malformed {
                code,
                reason: "repeated attribute",
            });
            continue;
        }
        seen[usize::from(code)] = true;
        count += 1;
        let optional = || Notification::new(err::UPDATE, err::UPDATE_OPTIONAL, whole.to_vec());
        let discard = |out: &mut UpdateIn, reason: &'static str| {
            out.discarded.push(Malformed { code, reason });
        };
        // RFC 7606 section 3 c: Optional/Transitive bits in conflict with the attribute's
        // definition make it malformed.
        if let Some(expected) = attr::flags(code)
            && flags & 0xc0 != expected
        {
            match code {
                // RFC 7606 section 5.3 (flags inconsistent with RFC 4760): AFI/SAFI disable
                // when the family can be read, else session reset.
                attr::MP_REACH | attr::MP_UNREACH => {
                    let Some((afi, safi)) = afi_safi(value) else {
                        return Err(Notification::new(
                            err::UPDATE,
                            err::UPDATE_ATTR_FLAGS,
                            whole.to_vec(),
                        ));
                    };
                    out.disabled.push(FamilyError {
                        afi,
                        safi,
                        reason: "attribute flags",
                    });
                }
                attr::ATOMIC_AGGREGATE
                | attr::AGGREGATOR
                | attr::AS4_PATH
                | attr::AS4_AGGREGATOR => discard(&mut out, "attribute flags"),
                _ => taw(code, "attribute flags"),
            }
            continue;
        }
        match code {
            // RFC 7606 section 7.1.
            attr::ORIGIN if len != 1 || value[0] > 2 => taw(code, "malformed ORIGIN"),
            // Section 7.2.
            attr::AS_PATH if !check_as_path(value, four_octet) => taw(code, "malformed AS_PATH"),
            // Sections 7.3, 7.4, 7.5, 7.9.
            attr::NEXT_HOP if len != 4 => taw(code, "malformed NEXT_HOP"),
            attr::MED if len != 4 => taw(code, "malformed MULTI_EXIT_DISC"),
            attr::LOCAL_PREF if len != 4 => taw(code, "malformed LOCAL_PREF"),
            attr::ORIGINATOR_ID if len != 4 => taw(code, "malformed ORIGINATOR_ID"),
            // Sections 7.8, 7.10, 7.14; RFC 8092 section 6.
            attr::COMMUNITIES if len == 0 || len % 4 != 0 => taw(code, "malformed COMMUNITIES"),
            attr::CLUSTER_LIST if len == 0 || len % 4 != 0 => taw(code, "malformed CLUSTER_LIST"),
            attr::LARGE_COMMUNITIES if len == 0 || len % 12 != 0 => {
                taw(code, "malformed LARGE_COMMUNITY")
            }
            attr::EXT_COMMUNITIES if len == 0 || len % 8 != 0 => {
                taw(code, "malformed EXTENDED_COMMUNITIES")
            }
            attr::EXT_COMMUNITIES => {
                out.ext_communities.extend(
                    value
                        .chunks_exact(8)
                        .filter_map(|c| <[u8; 8]>::try_from(c).ok()),
                );
            }
            // Sections 7.6, 7.7; RFC 6793 section 6 for AS4_PATH and AS4_AGGREGATOR.
            attr::ATOMIC_AGGREGATE if len != 0 => discard(&mut out, "malformed ATOMIC_AGGREGATE"),
            attr::AGGREGATOR if len != if four_octet { 8 } else { 6 } => {
                discard(&mut out, "malformed AGGREGATOR")
            }
            attr::AS4_PATH if !check_as_path(value, true) => {
                discard(&mut out, "malformed AS4_PATH")
            }
            attr::AS4_AGGREGATOR if len != 8 => discard(&mut out, "malformed AS4_AGGREGATOR"),
            // MP_REACH_NLRI / MP_UNREACH_NLRI (RFC 7606 sections 3 j, 5.3, 7.11; RFC 4760
            // section 7). Three outcomes, weakest first:
            // - A flowspec NLRI whose length prefix holds but whose components do not decode
            //   (bad type order, operator, prefix length, unknown type: "malformed", RFC 8955
            //   section 4.2) still lets the NLRI field be parsed, every NLRI located by its
            //   own length: section 3 j's condition for treat-as-withdraw, and no NLRI length
            //   is "inconsistent with the given AFI/SAFI" (section 5.3; flowspec lengths are
            //   free up to 4095). That NLRI alone is treated as withdrawn, the UPDATE's other
            //   routes stand: what RFC 9830 section 5 prescribes when a malformed NLRI can be
            //   skipped, and what RFC 7606 section 5.4 does with a typed NLRI it cannot use.
            //   (RFC 8955 section 10 only points at RFC 7606 and RFC 4760.)
            // - The AFI/SAFI can be read but the NLRI cannot be located (a next-hop length or
            //   an NLRI length overrunning the attribute, a prefix too long for the family,
            //   the fixed fields cut short): "AFI/SAFI disable" for that family, the choice
            //   sections 5.3 and 7.11 leave beside session reset. See `FamilyError`.
            // - Not even the AFI/SAFI can be read (fewer than 3 octets): session reset,
            //   UPDATE Message Error / Optional Attribute Error.
            attr::MP_REACH => {
                mp_reach = true;
                let family = afi_safi(value).ok_or_else(optional)?;
                // Next-hop length, next hop, one reserved octet, then the NLRI (RFC 4760
                // section 3). Flowspec's next hop is ignored (RFC 8955 section 4).
                let located = match value.get(3) {
                    None => Err("MP_REACH_NLRI shorter than its fixed fields"),
                    Some(&nh) => match (family, value.get(4 + usize::from(nh) + 1..)) {
                        (_, None) => Err("next-hop length overruns MP_REACH_NLRI"),
                        ((1, SAFI_UNICAST), _) if ![4, 16, 32].contains(&nh) => {
                            Err("next-hop length inconsistent with the family")
                        }
                        ((2, SAFI_UNICAST), _) if ![16, 32].contains(&nh) => {
                            Err("next-hop length inconsistent with the family")
                        }
                        (_, Some(rest)) => mp_nlri(&mut out, family, rest, true),
                    },
                };
                if let Err(reason) = located {
                    out.disabled.push(FamilyError {
                        afi: family.0,
                        safi: family.1,
                        reason,
                    });
                }
            }
            attr::MP_UNREACH => {
                let family = afi_safi(value).ok_or_else(optional)?;
                let rest = &value[3..];
                if rest.is_empty() {
                    only_empty_unreach = Some(family);
                }
                if let Err(reason) = mp_nlri(&mut out, family, rest, false) {
                    out.disabled.push(FamilyError {
                        afi: family.0,
                        safi: family.1,
                        reason,
                    });
                }
            }
            _ => {}
        }
    }
    // RFC 7606 section 3 d: a missing well-known mandatory attribute is treat-as-withdraw.
    if announced > 0 || mp_reach {
        for code in [attr::ORIGIN, attr::AS_PATH] {
            if !seen[usize::from(code)] {
                taw(code, "missing well-known attribute");
            }
        }
        if announced > 0 && !seen[usize::from(attr::NEXT_HOP)] {
            taw(attr::NEXT_HOP, "missing well-known attribute");
        }
    }
    if let Some(m) = withdraw {
        // Every route the UPDATE announces is withdrawn instead.
        out.treat_as_withdraw = Some(m);
        let reach = std::mem::take(&mut out.flow_reach);
        out.flow_unreach.extend(reach);
        out.ext_communities.clear();
    }
    if count == 1 && wlen == 0 && nlri.is_empty() {
        out.end_of_rib = only_empty_unreach;
    }
    Ok(out)
}

/// Session facts the UPDATE encoders need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathCtx {
    /// Our AS.
    pub local_as: u32,
    /// The session is iBGP (LOCAL_PREF sent, empty AS_PATH).
    pub ibgp: bool,
    /// 4-octet AS numbers negotiated.
    pub four_octet: bool,
}

impl PathCtx {
    fn asn_len(&self) -> AsnLength {
        if self.four_octet {
            AsnLength::Bits32
        } else {
            AsnLength::Bits16
        }
    }

    /// ORIGIN, AS_PATH and (iBGP) LOCAL_PREF, as bgpkit-parser attribute values.
    fn common(&self) -> Vec<AttributeValue> {
        let mut v = vec![AttributeValue::Origin(Origin::IGP)];
        if self.ibgp {
            v.push(AttributeValue::AsPath(AsPath::new()));
            v.push(AttributeValue::LocalPreference(100));
        } else if self.four_octet || self.local_as <= 0xffff {
            v.push(AttributeValue::AsPath(AsPath::from_sequence([
                self.local_as
            ])));
        } else {
            v.push(AttributeValue::AsPath(AsPath::from_sequence([u32::from(
                AS_TRANS,
            )])));
            v.push(AttributeValue::As4Path(AsPath::from_sequence([
                self.local_as
            ])));
        }
        v
    }

    fn encode_attrs(&self, values: Vec<AttributeValue>) -> Result<BytesMut, WireError> {
        let attrs: Attributes = values.into_iter().map(attribute).collect();
        let mut buf = BytesMut::new();
        attrs
            .encode_to(self.asn_len(), &mut buf)
            .map_err(|e| WireError::Codec(e.to_string()))?;
        Ok(buf)
    }
}

/// Why an UPDATE could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// bgpkit-parser refused to encode.
    #[error("codec refused to encode: {0}")]
    Codec(String),
    /// A flowspec NLRI could not be encoded.
    #[error("flowspec NLRI")]
    Flowspec(#[source] super::flowspec::FlowspecError),
    /// One route does not fit a message.
    #[error("a route of {0} bytes does not fit one UPDATE")]
    TooBig(usize),
}

/// An attribute with the extended-length flag where its value may pass 255 bytes (the
/// multiprotocol NLRIs, and community lists): bgpkit-parser refuses to encode a longer value
/// without it.
fn attribute(value: AttributeValue) -> Attribute {
    let long = match &value {
        AttributeValue::MpReachNlri(_) | AttributeValue::MpUnreachNlri(_) => true,
        AttributeValue::Communities(c) => c.len() * 4 > 255,
        AttributeValue::LargeCommunities(c) => c.len() * 12 > 255,
        _ => false,
    };
    let mut a = Attribute::from(value);
    if long {
        a.flag |= AttrFlags::EXTENDED;
    }
    a
}

fn update_body(withdrawn: &[u8], attrs: &[u8], nlri: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + withdrawn.len() + attrs.len() + nlri.len());
    b.extend_from_slice(&(withdrawn.len() as u16).to_be_bytes());
    b.extend_from_slice(withdrawn);
    b.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    b.extend_from_slice(attrs);
    b.extend_from_slice(nlri);
    frame(msg::UPDATE, &b)
}

fn put_attr(out: &mut Vec<u8>, flags: u8, code: u8, value: &[u8]) {
    out.push(flags | 0x10);
    out.push(code);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

/// Splits encoded NLRIs into groups whose total fits `room` bytes.
fn pack(nlris: &[Vec<u8>], room: usize) -> Result<Vec<&[Vec<u8>]>, WireError> {
    let mut groups = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, n) in nlris.iter().enumerate() {
        if n.len() > room {
            return Err(WireError::TooBig(n.len()));
        }
        if size + n.len() > room {
            groups.push(&nlris[start..i]);
            start = i;
            size = 0;
        }
        size += n.len();
    }
    if start < nlris.len() {
        groups.push(&nlris[start..]);
    }
    Ok(groups)
}

/// UPDATEs announcing flowspec NLRIs (already encoded) with one traffic-rate action and the
/// peer's `communities` (standard and large, bgpkit-parser encodes them).
///
/// By hand around bgpkit-parser: MP_REACH with a zero-length next hop and the 0x8006
/// extended community (see the module doc).
pub fn flow_announce(
    ctx: &PathCtx,
    afi: Afi,
    traffic_rate: [u8; 8],
    communities: &[Community],
    nlris: &[Vec<u8>],
) -> Result<Vec<Vec<u8>>, WireError> {
    let mut values = ctx.common();
    values.extend(community_attrs(Vec::new(), communities));
    let mut attrs = ctx.encode_attrs(values)?.to_vec();
    // EXTENDED_COMMUNITIES: optional transitive.
    put_attr(&mut attrs, 0xc0, attr::EXT_COMMUNITIES, &traffic_rate);
    // MP_REACH header: flags, code, 2-byte length, AFI, SAFI, next-hop length 0, reserved.
    let room = (MAX_MESSAGE - HEADER_LEN - 4 - 4 - 5)
        .checked_sub(attrs.len())
        .ok_or(WireError::TooBig(attrs.len()))?;
    let mut out = Vec::new();
    for group in pack(nlris, room)? {
        let mut value = Vec::with_capacity(room + 5);
        value.extend_from_slice(&(afi as u16).to_be_bytes());
        value.push(SAFI_FLOWSPEC);
        value.push(0); // next-hop length: none for flowspec (RFC 8955 section 4)
        value.push(0); // reserved
        for n in group {
            value.extend_from_slice(n);
        }
        let mut a = attrs.clone();
        put_attr(&mut a, 0x80, attr::MP_REACH, &value);
        out.push(update_body(&[], &a, &[]));
    }
    Ok(out)
}

/// UPDATEs withdrawing flowspec NLRIs (MP_UNREACH, by hand like [`flow_announce`]).
pub fn flow_withdraw(afi: Afi, nlris: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, WireError> {
    let room = MAX_MESSAGE - HEADER_LEN - 4 - 4 - 3;
    let mut out = Vec::new();
    for group in pack(nlris, room)? {
        let mut value = Vec::with_capacity(room + 3);
        value.extend_from_slice(&(afi as u16).to_be_bytes());
        value.push(SAFI_FLOWSPEC);
        for n in group {
            value.extend_from_slice(n);
        }
        let mut a = Vec::with_capacity(value.len() + 4);
        put_attr(&mut a, 0x80, attr::MP_UNREACH, &value);
        out.push(update_body(&[], &a, &[]));
    }
    Ok(out)
}

/// Prefixes per RTBH UPDATE: 200 IPv4 (5 bytes each) or 150 IPv6 (17 bytes each) keep every
/// message far below 4096 bytes whatever the communities.
const RTBH_CHUNK_V4: usize = 200;
const RTBH_CHUNK_V6: usize = 150;

/// The COMMUNITIES (`std` first, then the standard ones of `list`) and LARGE_COMMUNITIES
/// attributes, each only when it has an entry.
fn community_attrs(mut std: Vec<KCommunity>, list: &[Community]) -> Vec<AttributeValue> {
    let mut large = Vec::new();
    for c in list {
        match *c {
            Community::Standard(a, v) => std.push(KCommunity::Custom(u32::from(a).into(), v)),
            Community::Large(g, l1, l2) => large.push(LargeCommunity::new(g, [l1, l2])),
        }
    }
    let mut v = Vec::new();
    if !std.is_empty() {
        v.push(AttributeValue::Communities(std));
    }
    if !large.is_empty() {
        v.push(AttributeValue::LargeCommunities(large));
    }
    v
}

/// UPDATEs announcing RTBH routes (one family; bgpkit-parser encodes them).
pub fn rtbh_announce(
    ctx: &PathCtx,
    prefixes: &[IpNet],
    next_hop: IpAddr,
    extra: &[Community],
) -> Result<Vec<Vec<u8>>, WireError> {
    let mut out = Vec::new();
    let v6 = matches!(next_hop, IpAddr::V6(_));
    for chunk in prefixes.chunks(if v6 { RTBH_CHUNK_V6 } else { RTBH_CHUNK_V4 }) {
        let p: Vec<NetworkPrefix> = chunk.iter().map(|n| NetworkPrefix::new(*n, None)).collect();
        let mut values = ctx.common();
        values.extend(community_attrs(
            vec![
                KCommunity::Custom(65535u32.into(), 666), // BLACKHOLE (RFC 7999)
                KCommunity::NoExport,
            ],
            extra,
        ));
        let msg = match next_hop {
            IpAddr::V4(_) => {
                values.push(AttributeValue::NextHop(next_hop));
                BgpUpdateMessage {
                    withdrawn_prefixes: vec![],
                    attributes: Attributes::from_iter(values.into_iter().map(attribute)),
                    announced_prefixes: p,
                }
            }
            IpAddr::V6(nh) => {
                values.push(AttributeValue::MpReachNlri(Nlri {
                    afi: KAfi::Ipv6,
                    safi: KSafi::Unicast,
                    next_hop: Some(NextHopAddress::Ipv6(nh)),
                    prefixes: p,
                    labeled_prefixes: None,
                    link_state_nlris: None,
                    flowspec_nlris: None,
                }));
                BgpUpdateMessage {
                    withdrawn_prefixes: vec![],
                    attributes: Attributes::from_iter(values.into_iter().map(attribute)),
                    announced_prefixes: vec![],
                }
            }
        };
        let body = msg
            .encode(ctx.asn_len())
            .map_err(|e| WireError::Codec(e.to_string()))?;
        out.push(frame(msg::UPDATE, &body));
    }
    Ok(out)
}

/// UPDATEs withdrawing unicast routes of one family (bgpkit-parser).
pub fn rtbh_withdraw(prefixes: &[IpNet]) -> Result<Vec<Vec<u8>>, WireError> {
    let mut out = Vec::new();
    let v6 = prefixes.first().is_some_and(|p| matches!(p, IpNet::V6(_)));
    for chunk in prefixes.chunks(if v6 { RTBH_CHUNK_V6 } else { RTBH_CHUNK_V4 }) {
        let p: Vec<NetworkPrefix> = chunk.iter().map(|n| NetworkPrefix::new(*n, None)).collect();
        let msg = if v6 {
            let mut a = Attribute::from(AttributeValue::MpUnreachNlri(Nlri {
                afi: KAfi::Ipv6,
                safi: KSafi::Unicast,
                next_hop: None,
                prefixes: p,
                labeled_prefixes: None,
                link_state_nlris: None,
                flowspec_nlris: None,
            }));
            a.flag |= AttrFlags::EXTENDED;
            BgpUpdateMessage {
                withdrawn_prefixes: vec![],
                attributes: Attributes::from_iter([a]),
                announced_prefixes: vec![],
            }
        } else {
            BgpUpdateMessage {
                withdrawn_prefixes: p,
                attributes: Attributes::default(),
                announced_prefixes: vec![],
            }
        };
        let body = msg
            .encode(AsnLength::Bits32)
            .map_err(|e| WireError::Codec(e.to_string()))?;
        out.push(frame(msg::UPDATE, &body));
    }
    Ok(out)
}

/// The End-of-RIB marker of a family (RFC 4724 section 2).
pub fn end_of_rib(afi: u16, safi: u8) -> Vec<u8> {
    if (afi, safi) == (1, SAFI_UNICAST) {
        return update_body(&[], &[], &[]);
    }
    let mut value = afi.to_be_bytes().to_vec();
    value.push(safi);
    let mut a = Vec::new();
    a.extend_from_slice(&[0x80, attr::MP_UNREACH, 3]);
    a.extend_from_slice(&value);
    update_body(&[], &a, &[])
}

#[cfg(test)]
mod tests;
