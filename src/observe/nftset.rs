//! The counter sets' elements read straight from nf_tables over netlink: one
//! `NFT_MSG_GETSETELEM` dump per set, parsed in place, instead of an `nft -j list set` child
//! per set and second (each a process start, a ruleset cache and a JSON document; six of them
//! a second cost the agent more CPU than everything else it does during a 25k SYN/s flood).
//!
//! Request (`linux/netfilter/nf_tables.h`): `nlmsghdr` type `NFNL_SUBSYS_NFTABLES << 8 |
//! NFT_MSG_GETSETELEM`, flags `NLM_F_REQUEST | NLM_F_DUMP`, an `nfgenmsg` for `NFPROTO_INET`,
//! then `NFTA_SET_ELEM_LIST_TABLE` and `NFTA_SET_ELEM_LIST_SET` (NUL-terminated names).
//! Reply: `NFT_MSG_NEWSETELEM` messages (`NLM_F_MULTI`) until `NLMSG_DONE`, each with
//! `NFTA_SET_ELEM_LIST_ELEMENTS` → `NFTA_LIST_ELEM` → `NFTA_SET_ELEM_KEY` →
//! `NFTA_DATA_VALUE` (the address, 4 or 16 bytes) and the element's counter: one expression
//! as `NFTA_SET_ELEM_EXPR`, several as `NFTA_SET_ELEM_EXPRESSIONS` → `NFTA_LIST_ELEM`, each
//! `NFTA_EXPR_NAME` "counter" with `NFTA_EXPR_DATA` → `NFTA_COUNTER_BYTES`,
//! `NFTA_COUNTER_PACKETS` (big endian). Everything read is checked; a malformed reply is an
//! error, never a panic.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use nix::sys::socket::{MsgFlags, setsockopt, sockopt};
use nix::sys::time::TimeVal;

use super::ObserveError;
use super::counters::{Counted, Reading};
use super::ctnetlink::{
    Attrs, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN, ParseError, be_u64,
    messages,
};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFPROTO_INET: u8 = 1;
const NFGENMSG_LEN: usize = 4;

// enum nft_set_elem_list_attributes
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
// enum nft_list_attributes
const NFTA_LIST_ELEM: u16 = 1;
// enum nft_set_elem_attributes
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_EXPR: u16 = 7;
const NFTA_SET_ELEM_EXPRESSIONS: u16 = 10;
// enum nft_data_attributes
const NFTA_DATA_VALUE: u16 = 1;
// enum nft_expr_attributes
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
// enum nft_counter_attributes
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;

/// How long one receive may wait before the dump counts as failed.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);

/// Writes the dump request for `set` of `inet <table>` into `buf` (cleared first).
pub fn request(buf: &mut Vec<u8>, table: &str, set: &str, seq: u32) {
    buf.clear();
    buf.extend_from_slice(&[0; NLMSG_HDRLEN]);
    let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM;
    buf[4..6].copy_from_slice(&kind.to_ne_bytes());
    buf[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    buf[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nfgenmsg: family, NFNETLINK_V0, resource id 0.
    buf.extend_from_slice(&[NFPROTO_INET, 0, 0, 0]);
    for (kind, name) in [
        (NFTA_SET_ELEM_LIST_TABLE, table),
        (NFTA_SET_ELEM_LIST_SET, set),
    ] {
        let len = 4 + name.len() + 1;
        buf.extend_from_slice(&(len as u16).to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(name.as_bytes());
        buf.push(0);
        buf.resize((buf.len() + 3) & !3, 0);
    }
    let len = buf.len() as u32;
    buf[0..4].copy_from_slice(&len.to_ne_bytes());
}

/// What one datagram of the reply held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// More messages follow.
    More,
    /// The dump is complete.
    Done,
    /// The kernel refused the request (a negative errno).
    Refused(i32),
}

/// Parses one datagram of the reply to request `seq`, appending the elements with a counter
/// (as `counted`) to `out`. Messages of other sequence numbers are skipped.
pub fn parse(
    buf: &[u8],
    seq: u32,
    counted: Counted,
    out: &mut Vec<Reading>,
) -> Result<Part, ParseError> {
    for m in messages(buf) {
        let m = m?;
        if m.seq != seq {
            continue;
        }
        match m.kind {
            NLMSG_DONE => return Ok(Part::Done),
            NLMSG_ERROR => {
                let code = m
                    .payload
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or(ParseError::Short("nlmsgerr"))?;
                if code != 0 {
                    return Ok(Part::Refused(code));
                }
            }
            k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM => {
                let attrs = m
                    .payload
                    .get(NFGENMSG_LEN..)
                    .ok_or(ParseError::Short("nfgenmsg"))?;
                for a in Attrs::new(attrs, "set element list") {
                    let (ty, v) = a?;
                    if ty == NFTA_SET_ELEM_LIST_ELEMENTS {
                        elements(v, counted, out)?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(Part::More)
}

fn elements(v: &[u8], counted: Counted, out: &mut Vec<Reading>) -> Result<(), ParseError> {
    for a in Attrs::new(v, "NFTA_SET_ELEM_LIST_ELEMENTS") {
        let (ty, elem) = a?;
        if ty != NFTA_LIST_ELEM {
            continue;
        }
        let mut addr = None;
        let mut counter = None;
        for a in Attrs::new(elem, "NFTA_LIST_ELEM") {
            let (ty, v) = a?;
            match ty {
                NFTA_SET_ELEM_KEY => {
                    for a in Attrs::new(v, "NFTA_SET_ELEM_KEY") {
                        let (ty, v) = a?;
                        if ty == NFTA_DATA_VALUE {
                            addr = address(v);
                        }
                    }
                }
                NFTA_SET_ELEM_EXPR => counter = counter.or(expression(v)?),
                NFTA_SET_ELEM_EXPRESSIONS => {
                    for a in Attrs::new(v, "NFTA_SET_ELEM_EXPRESSIONS") {
                        let (ty, v) = a?;
                        if ty == NFTA_LIST_ELEM {
                            counter = counter.or(expression(v)?);
                        }
                    }
                }
                _ => {}
            }
        }
        if let (Some(addr), Some((packets, bytes))) = (addr, counter) {
            out.push(Reading {
                addr,
                packets,
                bytes,
                counted,
            });
        }
    }
    Ok(())
}

fn address(v: &[u8]) -> Option<IpAddr> {
    match v.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(v[0], v[1], v[2], v[3]))),
        16 => <[u8; 16]>::try_from(v)
            .ok()
            .map(|b| IpAddr::V6(Ipv6Addr::from(b))),
        _ => None,
    }
}

/// A counter expression's (packets, bytes); None for another expression.
fn expression(v: &[u8]) -> Result<Option<(u64, u64)>, ParseError> {
    let mut is_counter = false;
    let mut data = None;
    for a in Attrs::new(v, "expression") {
        let (ty, v) = a?;
        match ty {
            NFTA_EXPR_NAME => is_counter = v.split(|&b| b == 0).next() == Some(b"counter"),
            NFTA_EXPR_DATA => data = Some(v),
            _ => {}
        }
    }
    let (true, Some(data)) = (is_counter, data) else {
        return Ok(None);
    };
    let (mut packets, mut bytes) = (None, None);
    for a in Attrs::new(data, "NFTA_EXPR_DATA") {
        let (ty, v) = a?;
        match ty {
            NFTA_COUNTER_PACKETS => packets = Some(be_u64(v, "NFTA_COUNTER_PACKETS")?),
            NFTA_COUNTER_BYTES => bytes = Some(be_u64(v, "NFTA_COUNTER_BYTES")?),
            _ => {}
        }
    }
    Ok(packets.zip(bytes))
}

/// A netlink socket for set dumps, kept open between reads.
#[derive(Debug)]
pub struct SetDumper {
    sock: Socket,
    req: Vec<u8>,
    buf: Vec<u8>,
    seq: u32,
}

impl SetDumper {
    /// Opens the socket (`NETLINK_NETFILTER`, in the calling thread's network namespace).
    pub fn open() -> io::Result<SetDumper> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        let t = TimeVal::new(
            RECV_TIMEOUT.as_secs() as _,
            RECV_TIMEOUT.subsec_micros() as _,
        );
        setsockopt(&sock, sockopt::ReceiveTimeout, &t).map_err(io::Error::from)?;
        Ok(SetDumper {
            sock,
            req: Vec::with_capacity(128),
            buf: vec![0; 64 * 1024],
            seq: 0,
        })
    }

    /// Every counted element of `set` in `inet <table>`, appended to `out` as `counted`.
    pub fn dump(
        &mut self,
        table: &str,
        set: &str,
        counted: Counted,
        out: &mut Vec<Reading>,
    ) -> Result<(), ObserveError> {
        let err = |source| ObserveError::SetDump {
            set: set.to_owned(),
            source,
        };
        self.seq = self.seq.wrapping_add(1);
        request(&mut self.req, table, set, self.seq);
        self.sock
            .send_to(&self.req, &SocketAddr::new(0, 0), 0)
            .map_err(err)?;
        let start = out.len();
        loop {
            let mut slice: &mut [u8] = &mut self.buf[..];
            let n = match self.sock.recv(&mut slice, MsgFlags::MSG_TRUNC.bits()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    out.truncate(start);
                    return Err(err(e));
                }
            };
            if n > self.buf.len() {
                // A datagram larger than the buffer: grow it and ask again from the start.
                out.truncate(start);
                self.buf.resize(n.next_power_of_two(), 0);
                self.drain();
                return self.dump(table, set, counted, out);
            }
            match parse(&self.buf[..n], self.seq, counted, out) {
                Ok(Part::More) => {}
                Ok(Part::Done) => return Ok(()),
                Ok(Part::Refused(code)) => {
                    out.truncate(start);
                    self.drain();
                    return Err(err(io::Error::from_raw_os_error(-code)));
                }
                Err(error) => {
                    out.truncate(start);
                    self.drain();
                    return Err(ObserveError::SetDumpMalformed {
                        set: set.to_owned(),
                        error,
                    });
                }
            }
        }
    }

    /// Reads and drops what is left of a dump (its sequence number is never asked again).
    fn drain(&mut self) {
        loop {
            let mut slice: &mut [u8] = &mut self.buf[..];
            if self
                .sock
                .recv(&mut slice, MsgFlags::MSG_DONTWAIT.bits())
                .is_err()
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An attribute with `kind` and `payload` (padded).
    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(payload);
        v.resize((v.len() + 3) & !3, 0);
        v
    }

    fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(kind | 0x8000, &parts.concat())
    }

    fn counter(packets: u64, bytes: u64) -> Vec<u8> {
        [
            attr(NFTA_EXPR_NAME, b"counter\0"),
            nested(
                NFTA_EXPR_DATA,
                &[
                    attr(NFTA_COUNTER_BYTES, &bytes.to_be_bytes()),
                    attr(NFTA_COUNTER_PACKETS, &packets.to_be_bytes()),
                ],
            ),
        ]
        .concat()
    }

    fn message(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0x2u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m
    }

    fn elems(seq: u32) -> Vec<u8> {
        let e1 = nested(
            NFTA_LIST_ELEM,
            &[
                nested(
                    NFTA_SET_ELEM_KEY,
                    &[attr(NFTA_DATA_VALUE, &[203, 0, 113, 10])],
                ),
                nested(NFTA_SET_ELEM_EXPR, &[counter(7, 700)]),
            ],
        );
        let v6: [u8; 16] = "2001:db8:c::5".parse::<Ipv6Addr>().unwrap().octets();
        let e2 = nested(
            NFTA_LIST_ELEM,
            &[
                nested(NFTA_SET_ELEM_KEY, &[attr(NFTA_DATA_VALUE, &v6)]),
                nested(
                    NFTA_SET_ELEM_EXPRESSIONS,
                    &[nested(NFTA_LIST_ELEM, &[counter(3, 300)])],
                ),
            ],
        );
        // An element without a counter is skipped.
        let e3 = nested(
            NFTA_LIST_ELEM,
            &[nested(
                NFTA_SET_ELEM_KEY,
                &[attr(NFTA_DATA_VALUE, &[10, 0, 0, 1])],
            )],
        );
        let mut body = vec![NFPROTO_INET, 0, 0, 0];
        body.extend(attr(NFTA_SET_ELEM_LIST_TABLE, b"egressguard\0"));
        body.extend(nested(NFTA_SET_ELEM_LIST_ELEMENTS, &[e1, e2, e3]));
        message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM, seq, &body)
    }

    #[test]
    fn elements_with_counters_are_read_both_ways_the_kernel_writes_them() {
        let mut buf = elems(5);
        buf.extend(message(NLMSG_DONE, 5, &[0; 4]));
        let mut out = Vec::new();
        assert_eq!(parse(&buf, 5, Counted::All, &mut out), Ok(Part::Done));
        assert_eq!(
            out,
            vec![
                Reading {
                    addr: "203.0.113.10".parse().unwrap(),
                    packets: 7,
                    bytes: 700,
                    counted: Counted::All,
                },
                Reading {
                    addr: "2001:db8:c::5".parse().unwrap(),
                    packets: 3,
                    bytes: 300,
                    counted: Counted::All,
                },
            ]
        );
        // Another request's messages are not this one's.
        let mut out = Vec::new();
        assert_eq!(parse(&buf, 6, Counted::All, &mut out), Ok(Part::More));
        assert!(out.is_empty());
    }

    #[test]
    fn a_refusal_and_garbage_are_errors_not_panics() {
        let mut err = (-2i32).to_ne_bytes().to_vec();
        err.extend_from_slice(&[0; 16]);
        let buf = message(NLMSG_ERROR, 9, &err);
        assert_eq!(
            parse(&buf, 9, Counted::All, &mut Vec::new()),
            Ok(Part::Refused(-2))
        );
        // Every truncation of a valid reply: an error or fewer elements, never a panic.
        let full = elems(1);
        for cut in 0..full.len() {
            let mut b = full[..cut].to_vec();
            if b.len() >= 4 {
                // Keep the header's length consistent with the cut, as a hostile peer could.
                b[0..4].copy_from_slice(&(cut as u32).to_ne_bytes());
            }
            let _ = parse(&b, 1, Counted::All, &mut Vec::new());
        }
    }

    #[test]
    fn the_request_names_table_and_set() {
        let mut b = Vec::new();
        request(&mut b, "egressguard", "src_counters4", 3);
        assert_eq!(b.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize,
            b.len()
        );
        assert_eq!(
            u16::from_ne_bytes([b[4], b[5]]),
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM
        );
        let text = String::from_utf8_lossy(&b);
        assert!(text.contains("egressguard\0") && text.contains("src_counters4\0"));
    }
}
