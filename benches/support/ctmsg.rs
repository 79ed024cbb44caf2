//! ctnetlink flow messages built the way the kernel lays out its conntrack events, shared by
//! the pipeline bench (as the events the parser reads) and the flow-rate measurement (as
//! requests that create flows, `tests/netns/flowgen.rs`).

#![allow(dead_code)] // each includer uses part of it

use std::net::IpAddr;

use egressguard::messages::{FlowEvent, FlowEventKind, TcpState};

const NLA_F_NESTED: u16 = 0x8000;

/// A netlink message under construction: attributes with host-order headers, network-order
/// payloads, each padded to 4 bytes.
struct Msg(Vec<u8>);

impl Msg {
    fn attr(&mut self, ty: u16, payload: &[u8]) {
        self.0
            .extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(payload);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn nested(&mut self, ty: u16, build: impl FnOnce(&mut Msg)) {
        let at = self.0.len();
        self.0.extend_from_slice(&[0; 4]);
        build(self);
        let len = (self.0.len() - at) as u16;
        self.0[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        self.0[at + 2..at + 4].copy_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }
}

fn tuple(m: &mut Msg, src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16) {
    m.nested(1 /* CTA_TUPLE_IP */, |m| match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            m.attr(1 /* CTA_IP_V4_SRC */, &s.octets());
            m.attr(2 /* CTA_IP_V4_DST */, &d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            m.attr(3 /* CTA_IP_V6_SRC */, &s.octets());
            m.attr(4 /* CTA_IP_V6_DST */, &d.octets());
        }
        _ => unreachable!("the stream never mixes families"),
    });
    m.nested(2 /* CTA_TUPLE_PROTO */, |m| {
        m.attr(1 /* CTA_PROTO_NUM */, &[proto]);
        m.attr(2 /* CTA_PROTO_SRC_PORT */, &sport.to_be_bytes());
        m.attr(3 /* CTA_PROTO_DST_PORT */, &dport.to_be_bytes());
    });
}

/// The kernel's number for a TCP state (the inverse of `TcpState::from_kernel`).
fn kernel_state(s: TcpState) -> u8 {
    (0..=255)
        .find(|&v| TcpState::from_kernel(v) == s)
        .expect("every state has a number")
}

/// The event as the kernel's `ctnetlink_conntrack_event` lays it out, with `timeout` seconds
/// left (not on a destroy).
pub fn encode(e: &FlowEvent, id: u32, timeout: u32) -> Vec<u8> {
    let (ty, flags): (u16, u16) = match e.kind {
        FlowEventKind::New => (0x0100, 0x0600), // IPCTNL_MSG_CT_NEW, NLM_F_CREATE|NLM_F_EXCL
        FlowEventKind::Existing => (0x0100, 0x0002), // from a dump: NLM_F_MULTI
        FlowEventKind::Update => (0x0100, 0),
        FlowEventKind::Destroy => (0x0102, 0), // IPCTNL_MSG_CT_DELETE
    };
    let family = if e.src.is_ipv4() { 2 } else { 10 };
    let mut m = Msg(vec![0; 16]);
    m.0.extend_from_slice(&[family, 0, 0, 0]);
    m.nested(
        1, /* CTA_TUPLE_ORIG */
        |m| tuple(m, e.src, e.dst, e.proto, e.sport, e.dport),
    );
    m.nested(
        2, /* CTA_TUPLE_REPLY */
        |m| tuple(m, e.dst, e.src, e.proto, e.dport, e.sport),
    );
    m.attr(12 /* CTA_ID */, &id.to_be_bytes());
    m.attr(3 /* CTA_STATUS */, &e.status.to_be_bytes());
    if e.kind != FlowEventKind::Destroy {
        m.attr(7 /* CTA_TIMEOUT */, &timeout.to_be_bytes());
    }
    if let Some(state) = e.tcp_state {
        m.nested(4 /* CTA_PROTOINFO */, |m| {
            m.nested(1 /* CTA_PROTOINFO_TCP */, |m| {
                m.attr(1 /* STATE */, &[kernel_state(state)]);
                m.attr(2 /* WSCALE_ORIGINAL */, &[7]);
                m.attr(3 /* WSCALE_REPLY */, &[7]);
                m.attr(4 /* FLAGS_ORIGINAL */, &[0x23, 0x23]);
                m.attr(5 /* FLAGS_REPLY */, &[0x33, 0x33]);
            })
        });
    }
    m.attr(8 /* CTA_MARK */, &0u32.to_be_bytes());
    m.attr(11 /* CTA_USE */, &1u32.to_be_bytes());
    let len = m.0.len() as u32;
    m.0[0..4].copy_from_slice(&len.to_ne_bytes());
    m.0[4..6].copy_from_slice(&ty.to_ne_bytes());
    m.0[6..8].copy_from_slice(&flags.to_ne_bytes());
    m.0
}

/// A request to create the flow `src:sport → dst:dport` (`proto`) with `timeout` seconds to
/// live, as `conntrack -I` sends it: both tuples and the timeout; the event's other attributes
/// (status, id, mark, use count) are left out, with them kernel 6.18 refuses the request
/// (`EBUSY`). Sequence number `seq`; no acknowledgement asked, so the kernel answers only a
/// refusal.
pub fn create_request(
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
    timeout: u32,
    seq: u32,
) -> Vec<u8> {
    let family = if src.is_ipv4() { 2 } else { 10 };
    let mut m = Msg(vec![0; 16]);
    m.0.extend_from_slice(&[family, 0, 0, 0]);
    m.nested(
        1, /* CTA_TUPLE_ORIG */
        |m| tuple(m, src, dst, proto, sport, dport),
    );
    m.nested(
        2, /* CTA_TUPLE_REPLY */
        |m| tuple(m, dst, src, proto, dport, sport),
    );
    m.attr(7 /* CTA_TIMEOUT */, &timeout.to_be_bytes());
    let len = m.0.len() as u32;
    m.0[0..4].copy_from_slice(&len.to_ne_bytes());
    m.0[4..6].copy_from_slice(&0x0100u16.to_ne_bytes()); // IPCTNL_MSG_CT_NEW
    // NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL
    m.0[6..8].copy_from_slice(&0x0601u16.to_ne_bytes());
    m.0[8..12].copy_from_slice(&seq.to_ne_bytes());
    m.0
}
