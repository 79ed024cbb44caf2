//! The element fast path: set element adds and deletes sent to the kernel directly, as one
//! nfnetlink batch (`NFNL_MSG_BATCH_BEGIN`, `NFT_MSG_DELSETELEM`…, `NFT_MSG_NEWSETELEM`…,
//! `NFNL_MSG_BATCH_END`, resource id `NFNL_SUBSYS_NFTABLES`), so a change set is still one
//! nf_tables transaction: the kernel commits all of it or rolls all of it back.
//!
//! `nft -j -f -` spends ~90 ms of CPU on 10,000 elements (JSON parsing, its interval code,
//! freeing its objects) and tens of seconds on deleting as many interval elements; the kernel
//! commit itself is a fraction of that. The table's structure (table, sets, chains, rules) is
//! rare and stays on nft; this module only carries elements.
//!
//! # Wire format (what nft 1.0.6 sends, checked with `strace -e sendmsg -xx nft ...`)
//!
//! Interval sets (rbtree, one address field) hold each prefix as two elements: the start key
//! (with `NFTA_SET_ELEM_TIMEOUT`, milliseconds big endian, when it has one) and the end key
//! (last address + 1) flagged `NFT_SET_ELEM_INTERVAL_END`. A prefix that ends at the top of
//! the address space has no end element; its start carries nft's user data
//! `NFTNL_UDATA_SET_ELEM_FLAGS = NFTNL_SET_ELEM_F_INTERVAL_OPEN`, as nft writes it, so that
//! `nft list` shows it as the prefix it is. Attribute order, the list-element numbering
//! (1, 2, 3 … per message) and the message flags (`NLM_F_CREATE` on adds) are nft's. Two
//! deliberate differences, neither of which the kernel reads:
//!
//! * no `NFTA_SET_ELEM_LIST_SET_ID` (it only names sets created in the same batch; the set is
//!   looked up by name first), and deletes carry only key and flags (nft adds the timeout and
//!   expiration from its cache);
//! * no "first segment" (`0.0.0.0` or `::` flagged interval end) that nft's interval code
//!   adds when it sees the set empty: an address below the lowest start element is not in
//!   the set either way (the namespace tests check drops and non-drops packet by packet).
//!
//! Every set whose elements the agent writes is such an interval set (`blocked*`,
//! `quarantine*`, `customers*`, `allow*`, `garden*`); the per-source counter sets are filled
//! by the packet path, so elements of plain (hash) sets, a single key without end, are not
//! needed and not encoded.
//!
//! Every element message asks for an acknowledgement (`NLM_F_ACK`); the kernel processes the
//! whole batch inside `sendmsg` and queues one reply per message, so the replies are read
//! without waiting until every message is acknowledged or the queue is empty. The socket has
//! extended acks on, so a refusal names the offending element (`NLMSGERR_ATTR_OFFS`), and
//! capped acks, so an error does not echo the whole message back. The whole batch must be in
//! one `sendmsg` (the kernel aborts a batch whose end is not in the same datagram), so the
//! send buffer is forced (`SO_SNDBUFFORCE`, needs CAP_NET_ADMIN) to the batch size, as nft
//! does. The batch begin can carry the ruleset generation id (`NFNL_BATCH_GENID`): if anyone
//! committed since the table was listed, the kernel refuses the batch with `ERESTART` instead
//! of applying changes planned against a stale listing.

use std::io;
use std::net::IpAddr;
use std::os::fd::AsFd;

use ipnet::IpNet;
use netlink_sys::protocols::NETLINK_NETFILTER;
use netlink_sys::{Socket, SocketAddr};

use super::layout::{ElemKey, Fam, SetId};

const NLMSG_HDRLEN: usize = 16;
#[cfg(test)]
const NFGENMSG_LEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
/// Reply flag: the echoed request was cut to its header.
const NLM_F_CAPPED: u16 = 0x100;
/// Reply flag: extended ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;

const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_BATCH_GENID: u16 = 1;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;

const NLA_F_NESTED: u16 = 0x8000;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
/// nft's user data of an open interval: TLV `NFTNL_UDATA_SET_ELEM_FLAGS` (1), length 4,
/// `NFTNL_SET_ELEM_F_INTERVAL_OPEN` (1) in host order.
const UDATA_INTERVAL_OPEN: [u8; 6] = {
    let v = 1u32.to_ne_bytes();
    [1, 4, v[0], v[1], v[2], v[3]]
};

/// Elements of one message are cut at this many bytes of `NFTA_SET_ELEM_LIST_ELEMENTS`
/// (a netlink attribute's length is 16 bits).
pub const MAX_ELEMS_BYTES: usize = 32 * 1024;

const EPERM: i32 = 1;
const ERESTART: i32 = 85;
const ENOBUFS: i32 = 105;

/// Why an element batch failed.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The nfnetlink socket could not be opened or set up (no nf_tables, no netlink).
    #[error("cannot open an nfnetlink socket")]
    Open(#[source] io::Error),
    /// The send buffer could not be made large enough for the batch.
    #[error("cannot raise the nfnetlink send buffer to {bytes} bytes")]
    Buffer {
        /// The batch size.
        bytes: usize,
        /// The setsockopt error.
        #[source]
        source: io::Error,
    },
    /// Sending the batch failed; the kernel did not process it.
    #[error("sending a batch of {bytes} bytes failed")]
    Send {
        /// The batch size.
        bytes: usize,
        /// The send error.
        #[source]
        source: io::Error,
    },
    /// Reading the kernel's replies failed (replies may be lost; the outcome is unknown).
    #[error("reading the kernel's replies failed")]
    Recv(#[source] io::Error),
    /// Some messages were never acknowledged (the outcome is unknown).
    #[error("{missing} of {messages} messages were not acknowledged")]
    Unacknowledged {
        /// Messages without a reply.
        missing: usize,
        /// Element messages in the batch.
        messages: usize,
    },
    /// A reply could not be read.
    #[error("malformed nfnetlink reply: {0}")]
    Malformed(&'static str),
    /// An element cannot be expressed (its family differs from its set's).
    #[error("element {key} does not fit set {set}")]
    Encode {
        /// The set.
        set: &'static str,
        /// The element.
        key: ElemKey,
    },
    /// The kernel refused an element; it rolled the whole batch back.
    #[error(
        "the kernel refused to {verb} {elem} in set {set}{}; nothing of the batch was applied",
        message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default()
    )]
    Refused {
        /// `add` or `delete`.
        verb: &'static str,
        /// The set.
        set: &'static str,
        /// The element (or the elements of the refused message, when the kernel did not
        /// point at one).
        elem: String,
        /// The kernel's errno.
        errno: i32,
        /// The kernel's extended ack message, when it gave one.
        message: Option<String>,
        /// The errno as an error.
        #[source]
        source: io::Error,
    },
    /// The kernel refused the batch as a whole (commit failure, no memory, no privilege).
    #[error("the kernel refused the batch; nothing of it was applied")]
    Rejected {
        /// The kernel's errno.
        errno: i32,
        /// The errno as an error.
        #[source]
        source: io::Error,
    },
    /// Someone committed a ruleset change since the table was listed (`ERESTART` on
    /// `NFNL_BATCH_GENID`); nothing was applied.
    #[error("the ruleset changed since it was read (generation {expected}); nothing was applied")]
    GenerationChanged {
        /// The generation the batch was planned against.
        expected: u32,
    },
}

impl BatchError {
    /// Whether the fast path itself failed (socket, buffer, transport, encoding), as opposed
    /// to the kernel refusing the change set: then nft may do the same job.
    pub fn is_transport(&self) -> bool {
        !matches!(
            self,
            BatchError::Refused { .. }
                | BatchError::Rejected { .. }
                | BatchError::GenerationChanged { .. }
        )
    }

    /// The kernel's errno, when it refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            BatchError::Refused { errno, .. } | BatchError::Rejected { errno, .. } => Some(*errno),
            BatchError::GenerationChanged { .. } => Some(ERESTART),
            _ => None,
        }
    }

    /// Whether the kernel refused for lack of privilege.
    pub fn is_permission(&self) -> bool {
        self.errno() == Some(EPERM)
    }
}

/// Add or delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verb {
    /// `NFT_MSG_DELSETELEM`.
    Delete,
    /// `NFT_MSG_NEWSETELEM`.
    Add,
}

impl Verb {
    fn name(self) -> &'static str {
        match self {
            Verb::Add => "add",
            Verb::Delete => "delete",
        }
    }
}

/// One element change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    /// The set (an interval set of the agent's table).
    pub set: SetId,
    /// The element.
    pub key: ElemKey,
    /// Add or delete.
    pub verb: Verb,
    /// Timeout in seconds (adds to timeout sets only).
    pub timeout_secs: Option<u64>,
}

/// The element's key bytes: start, and end (last address + 1) unless it ends at the top.
fn bounds(key: &ElemKey) -> Option<(IpAddr, Option<IpAddr>)> {
    let (first, last) = match key {
        ElemKey::Net(IpNet::V4(n)) => (IpAddr::V4(n.network()), IpAddr::V4(n.broadcast())),
        ElemKey::Net(IpNet::V6(n)) => (IpAddr::V6(n.network()), IpAddr::V6(n.broadcast())),
        ElemKey::Range(a, b) => (*a, *b),
    };
    let end = match (first, last) {
        (IpAddr::V4(f), IpAddr::V4(l)) if u32::from(f) <= u32::from(l) => {
            u32::from(l).checked_add(1).map(|e| IpAddr::V4(e.into()))
        }
        (IpAddr::V6(f), IpAddr::V6(l)) if u128::from(f) <= u128::from(l) => {
            u128::from(l).checked_add(1).map(|e| IpAddr::V6(e.into()))
        }
        _ => return None,
    };
    Some((first, end))
}

fn addr_bytes(a: &IpAddr, out: &mut Vec<u8>) {
    match a {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

fn sort_key(key: &ElemKey) -> u128 {
    match bounds(key) {
        Some((IpAddr::V4(a), _)) => u128::from(u32::from(a)),
        Some((IpAddr::V6(a), _)) => u128::from(a),
        None => 0,
    }
}

/// A little netlink writer.
struct Writer {
    b: Vec<u8>,
}

impl Writer {
    fn align(&mut self) {
        while !self.b.len().is_multiple_of(4) {
            self.b.push(0);
        }
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.b.extend_from_slice(&(len as u16).to_ne_bytes());
        self.b.extend_from_slice(&kind.to_ne_bytes());
        self.b.extend_from_slice(payload);
        self.align();
    }

    fn nest_start(&mut self, kind: u16) -> usize {
        let at = self.b.len();
        self.b.extend_from_slice(&[0, 0]);
        self.b
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn nest_end(&mut self, at: usize) {
        let len = (self.b.len() - at) as u16;
        self.b[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn msg_start(&mut self, kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
        let at = self.b.len();
        self.b.extend_from_slice(&[0; 4]);
        self.b.extend_from_slice(&kind.to_ne_bytes());
        self.b.extend_from_slice(&flags.to_ne_bytes());
        self.b.extend_from_slice(&seq.to_ne_bytes());
        self.b.extend_from_slice(&0u32.to_ne_bytes());
        self.b.push(family);
        self.b.push(0); // NFNETLINK_V0
        self.b.extend_from_slice(&res_id.to_be_bytes());
        at
    }

    fn msg_end(&mut self, at: usize) {
        let len = (self.b.len() - at) as u32;
        self.b[at..at + 4].copy_from_slice(&len.to_ne_bytes());
    }
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

/// One element message of a batch, for matching replies.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MsgMeta {
    seq: u32,
    set: SetId,
    verb: Verb,
    /// Offset of each list element (from the message start) and the op it belongs to.
    elems: Vec<(u32, usize)>,
}

/// An encoded batch: the bytes for one `sendmsg` and what is needed to read the replies.
#[derive(Clone, Debug)]
pub struct Batch {
    bytes: Vec<u8>,
    begin_seq: u32,
    genid: Option<u32>,
    msgs: Vec<MsgMeta>,
    ops: Vec<Op>,
}

impl Batch {
    /// Encodes `ops` on sets of table `inet <table>` as one batch: deletes first (so a
    /// replaced element's old copy is gone before the new one comes), then adds, one message
    /// per set and verb (more when it exceeds [`MAX_ELEMS_BYTES`]), elements in address
    /// order. Sequence numbers start at `first_seq` (the batch begin). With `genid`, the
    /// kernel refuses the batch if the ruleset generation is no longer that one.
    pub fn encode(
        table: &str,
        ops: &[Op],
        first_seq: u32,
        genid: Option<u32>,
    ) -> Result<Batch, BatchError> {
        let mut ops: Vec<Op> = ops.to_vec();
        ops.sort_by_key(|o| (o.verb, o.set, sort_key(&o.key)));
        let mut w = Writer {
            b: Vec::with_capacity(64 + ops.len() * 80),
        };
        let mut seq = first_seq;
        let begin = w.msg_start(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
        );
        if let Some(g) = genid {
            w.attr(NFNL_BATCH_GENID, &g.to_be_bytes());
        }
        w.msg_end(begin);
        let table_attr = cstr(table);
        let mut msgs: Vec<MsgMeta> = Vec::new();
        let mut i = 0;
        let mut key_buf = Vec::with_capacity(16);
        while i < ops.len() {
            let (set, verb) = (ops[i].set, ops[i].verb);
            seq = seq.wrapping_add(1);
            let (kind, flags) = match verb {
                Verb::Add => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK),
                Verb::Delete => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
            };
            let m = w.msg_start(
                (NFNL_SUBSYS_NFTABLES << 8) | kind,
                flags,
                seq,
                NFPROTO_INET,
                0,
            );
            w.attr(NFTA_SET_ELEM_LIST_TABLE, &table_attr);
            w.attr(NFTA_SET_ELEM_LIST_SET, &cstr(set.name()));
            let list = w.nest_start(NFTA_SET_ELEM_LIST_ELEMENTS);
            let mut meta = MsgMeta {
                seq,
                set,
                verb,
                elems: Vec::new(),
            };
            let mut index: u16 = 0;
            while i < ops.len()
                && ops[i].set == set
                && ops[i].verb == verb
                && w.b.len() - list < MAX_ELEMS_BYTES
            {
                let op = &ops[i];
                let fam_ok = match op.key {
                    ElemKey::Net(n) => Fam::of(n.addr()) == set.fam,
                    ElemKey::Range(a, b) => Fam::of(a) == set.fam && Fam::of(b) == set.fam,
                };
                let Some((start, end)) = bounds(&op.key).filter(|_| fam_ok) else {
                    return Err(BatchError::Encode {
                        set: set.name(),
                        key: op.key,
                    });
                };
                // Start element.
                index = index.wrapping_add(1);
                meta.elems.push(((w.b.len() - m) as u32, i));
                let e = w.nest_start(index);
                if verb == Verb::Add
                    && let Some(t) = op.timeout_secs
                {
                    w.attr(
                        NFTA_SET_ELEM_TIMEOUT,
                        &(t.saturating_mul(1000)).to_be_bytes(),
                    );
                }
                key_buf.clear();
                addr_bytes(&start, &mut key_buf);
                let k = w.nest_start(NFTA_SET_ELEM_KEY);
                w.attr(NFTA_DATA_VALUE, &key_buf);
                w.nest_end(k);
                if end.is_none() {
                    w.attr(NFTA_SET_ELEM_USERDATA, &UDATA_INTERVAL_OPEN);
                }
                w.nest_end(e);
                // End element (last address + 1), unless the interval is open.
                if let Some(end) = end {
                    index = index.wrapping_add(1);
                    meta.elems.push(((w.b.len() - m) as u32, i));
                    let e = w.nest_start(index);
                    w.attr(
                        NFTA_SET_ELEM_FLAGS,
                        &NFT_SET_ELEM_INTERVAL_END.to_be_bytes(),
                    );
                    key_buf.clear();
                    addr_bytes(&end, &mut key_buf);
                    let k = w.nest_start(NFTA_SET_ELEM_KEY);
                    w.attr(NFTA_DATA_VALUE, &key_buf);
                    w.nest_end(k);
                    w.nest_end(e);
                }
                i += 1;
            }
            w.nest_end(list);
            w.msg_end(m);
            msgs.push(meta);
        }
        seq = seq.wrapping_add(1);
        let end = w.msg_start(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
        );
        w.msg_end(end);
        Ok(Batch {
            bytes: w.b,
            begin_seq: first_seq,
            genid,
            msgs,
            ops,
        })
    }

    /// The bytes to send.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Element messages in the batch.
    pub fn messages(&self) -> usize {
        self.msgs.len()
    }

    /// The sequence number after the batch's last one.
    pub fn next_seq(&self) -> u32 {
        self.begin_seq
            .wrapping_add(self.msgs.len() as u32)
            .wrapping_add(2)
    }

    fn refused(
        &self,
        msg: &MsgMeta,
        errno: i32,
        offs: Option<u32>,
        text: Option<String>,
    ) -> BatchError {
        let hit = offs.and_then(|o| {
            msg.elems
                .iter()
                .take_while(|(at, _)| *at <= o)
                .last()
                .map(|(_, i)| *i)
        });
        let elem = match hit {
            Some(i) => self.ops[i].key.to_string(),
            None => {
                let first = msg.elems.first().map(|(_, i)| self.ops[*i].key.to_string());
                let last = msg.elems.last().map(|(_, i)| self.ops[*i].key.to_string());
                let count = {
                    let mut v: Vec<usize> = msg.elems.iter().map(|(_, i)| *i).collect();
                    v.dedup();
                    v.len()
                };
                format!(
                    "one of {count} elements ({} … {})",
                    first.unwrap_or_default(),
                    last.unwrap_or_default()
                )
            }
        };
        BatchError::Refused {
            verb: msg.verb.name(),
            set: msg.set.name(),
            elem,
            errno,
            message: text,
            source: io::Error::from_raw_os_error(errno),
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The replies to one batch, as they come in.
#[derive(Debug)]
pub struct Replies<'a> {
    batch: &'a Batch,
    acked: Vec<bool>,
    missing: usize,
    first_error: Option<BatchError>,
    batch_error: Option<BatchError>,
}

impl<'a> Replies<'a> {
    /// Nothing received yet.
    pub fn new(batch: &'a Batch) -> Replies<'a> {
        Replies {
            batch,
            acked: vec![false; batch.msgs.len()],
            missing: batch.msgs.len(),
            first_error: None,
            batch_error: None,
        }
    }

    /// Whether every element message has its reply.
    pub fn complete(&self) -> bool {
        self.missing == 0
    }

    /// Reads one datagram of replies. Replies to other sequence numbers (an earlier batch)
    /// are skipped.
    pub fn absorb(&mut self, buf: &[u8]) -> Result<(), BatchError> {
        let mut off = 0;
        while off + NLMSG_HDRLEN <= buf.len() {
            let len = u32_at(buf, off).ok_or(BatchError::Malformed("header"))? as usize;
            let kind = u16_at(buf, off + 4).ok_or(BatchError::Malformed("header"))?;
            let flags = u16_at(buf, off + 6).ok_or(BatchError::Malformed("header"))?;
            if len < NLMSG_HDRLEN || off + len > buf.len() {
                return Err(BatchError::Malformed("message length"));
            }
            let msg = &buf[off..off + len];
            off += (len + 3) & !3;
            if kind != NLMSG_ERROR {
                continue;
            }
            let code = u32_at(msg, NLMSG_HDRLEN).ok_or(BatchError::Malformed("error code"))? as i32;
            let orig = NLMSG_HDRLEN + 4;
            let orig_len =
                u32_at(msg, orig).ok_or(BatchError::Malformed("echoed header"))? as usize;
            let seq = u32_at(msg, orig + 8).ok_or(BatchError::Malformed("echoed header"))?;
            let errno = code
                .checked_neg()
                .ok_or(BatchError::Malformed("error code"))?;
            let (mut offs, mut text) = (None, None);
            if flags & NLM_F_ACK_TLVS != 0 {
                let mut a = if flags & NLM_F_CAPPED != 0 {
                    orig + NLMSG_HDRLEN
                } else {
                    orig + ((orig_len.max(NLMSG_HDRLEN) + 3) & !3)
                };
                while a + 4 <= msg.len() {
                    let alen =
                        u16_at(msg, a).ok_or(BatchError::Malformed("ack attribute"))? as usize;
                    let atype =
                        u16_at(msg, a + 2).ok_or(BatchError::Malformed("ack attribute"))? & 0x3fff;
                    if alen < 4 || a + alen > msg.len() {
                        return Err(BatchError::Malformed("ack attribute length"));
                    }
                    let payload = &msg[a + 4..a + alen];
                    match atype {
                        NLMSGERR_ATTR_OFFS => offs = u32_at(payload, 0),
                        NLMSGERR_ATTR_MSG => {
                            let s = payload.split(|b| *b == 0).next().unwrap_or_default();
                            text = Some(String::from_utf8_lossy(s).into_owned());
                        }
                        _ => {}
                    }
                    a += (alen + 3) & !3;
                }
            }
            if seq == self.batch.begin_seq {
                if errno != 0 && self.batch_error.is_none() {
                    self.batch_error = Some(match (errno, self.batch.genid) {
                        (ERESTART, Some(expected)) => BatchError::GenerationChanged { expected },
                        _ => BatchError::Rejected {
                            errno,
                            source: io::Error::from_raw_os_error(errno),
                        },
                    });
                }
                continue;
            }
            let Some(idx) = seq
                .checked_sub(self.batch.begin_seq.wrapping_add(1))
                .map(|d| d as usize)
                .filter(|d| *d < self.batch.msgs.len())
            else {
                continue;
            };
            if !self.acked[idx] {
                self.acked[idx] = true;
                self.missing -= 1;
            }
            if errno != 0 && self.first_error.is_none() {
                self.first_error =
                    Some(self.batch.refused(&self.batch.msgs[idx], errno, offs, text));
            }
        }
        Ok(())
    }

    /// The outcome once no more replies are queued: `Ok` only when every message was
    /// acknowledged without error and the batch itself was not refused.
    pub fn outcome(self) -> Result<(), BatchError> {
        if let Some(e) = self.batch_error {
            return Err(e);
        }
        if let Some(e) = self.first_error {
            return Err(e);
        }
        if self.missing > 0 {
            return Err(BatchError::Unacknowledged {
                missing: self.missing,
                messages: self.batch.msgs.len(),
            });
        }
        Ok(())
    }

    /// Whether the batch as a whole was refused (no per-message replies follow).
    fn batch_refused(&self) -> bool {
        self.batch_error.is_some()
    }
}

/// What one batch sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// Element messages.
    pub messages: usize,
    /// Bytes in the one `sendmsg`.
    pub bytes: usize,
}

/// An nfnetlink socket for element batches.
pub struct NlBatch {
    sock: Socket,
    seq: u32,
    sndbuf: usize,
}

impl std::fmt::Debug for NlBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NlBatch")
            .field("seq", &self.seq)
            .field("sndbuf", &self.sndbuf)
            .finish()
    }
}

/// Replies read per batch before giving up on a socket that keeps delivering others.
const MAX_DATAGRAMS: usize = 1 << 20;

impl NlBatch {
    /// Opens the socket in the calling thread's network namespace (extended and capped acks
    /// on, non-blocking reads).
    pub fn open() -> Result<NlBatch, BatchError> {
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(BatchError::Open)?;
        sock.bind_auto().map_err(BatchError::Open)?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(BatchError::Open)?;
        sock.set_ext_ack(true).map_err(BatchError::Open)?;
        sock.set_cap_ack(true).map_err(BatchError::Open)?;
        sock.set_non_blocking(true).map_err(BatchError::Open)?;
        // Start from a sequence number unlikely to collide with a previous process's.
        let seq = (std::process::id() << 16) ^ 0x5eed;
        Ok(NlBatch {
            sock,
            seq,
            sndbuf: 0,
        })
    }

    fn drain(&self) -> Result<(), BatchError> {
        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        for _ in 0..MAX_DATAGRAMS {
            buf.clear();
            match self.sock.recv(&mut buf, 0) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                // A lost reply of an earlier batch (ENOBUFS) is reported once; it is history.
                Err(e) if e.raw_os_error() == Some(ENOBUFS) => {}
                Err(e) => return Err(BatchError::Recv(e)),
            }
        }
        Ok(())
    }

    /// Applies `ops` to table `inet <table>` as one transaction and waits for the kernel's
    /// verdict. `genid`: refuse if the ruleset generation is no longer this one.
    ///
    /// The kernel commits the batch inside the `sendmsg` call, which blocks the calling
    /// thread for as long as the commit takes (tens of milliseconds for 10,000 elements).
    pub fn apply(
        &mut self,
        table: &str,
        ops: &[Op],
        genid: Option<u32>,
    ) -> Result<Sent, BatchError> {
        if ops.is_empty() {
            return Ok(Sent::default());
        }
        self.drain()?;
        let batch = Batch::encode(table, ops, self.seq, genid)?;
        self.seq = batch.next_seq();
        let bytes = batch.bytes().len();
        // The whole batch goes in one datagram; the kernel refuses one larger than the send
        // buffer (less some slack), so raise it as nft does.
        let need = bytes + 4096;
        if need > self.sndbuf {
            nix::sys::socket::setsockopt(
                &self.sock.as_fd(),
                nix::sys::socket::sockopt::SndBufForce,
                &need,
            )
            .map_err(|e| BatchError::Buffer {
                bytes,
                source: io::Error::from(e),
            })?;
            self.sndbuf = need;
        }
        // One reply per element message; make room for them (an skb's true size is ~1 KiB).
        let replies = (batch.messages() + 2) * 2048;
        if replies > 200 * 1024 {
            nix::sys::socket::setsockopt(
                &self.sock.as_fd(),
                nix::sys::socket::sockopt::RcvBufForce,
                &replies,
            )
            .map_err(|e| BatchError::Buffer {
                bytes: replies,
                source: io::Error::from(e),
            })?;
        }
        let sent = self
            .sock
            .send(batch.bytes(), 0)
            .map_err(|source| BatchError::Send { bytes, source })?;
        if sent != bytes {
            return Err(BatchError::Send {
                bytes,
                source: io::Error::new(io::ErrorKind::WriteZero, format!("only {sent} bytes sent")),
            });
        }
        let mut replies = Replies::new(&batch);
        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        for _ in 0..MAX_DATAGRAMS {
            if replies.complete() {
                break;
            }
            buf.clear();
            match self.sock.recv(&mut buf, 0) {
                Ok(_) => replies.absorb(&buf)?,
                // The kernel queued every reply before `send` returned: an empty queue means
                // there are no more (a refused batch as a whole has no per-message replies).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(BatchError::Recv(e)),
            }
        }
        if replies.batch_refused() {
            // Per-message acks may follow a commit failure; leave none for the next batch.
            self.drain()?;
        }
        replies.outcome()?;
        Ok(Sent {
            messages: batch.messages(),
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enforce::layout::Role;

    fn b4() -> SetId {
        SetId::new(Role::Blocked, Fam::V4)
    }
    fn b6() -> SetId {
        SetId::new(Role::Blocked, Fam::V6)
    }
    fn op(set: SetId, key: &str, verb: Verb, t: Option<u64>) -> Op {
        Op {
            set,
            key: ElemKey::Net(key.parse().unwrap()),
            verb,
            timeout_secs: t,
        }
    }

    /// Bytes as `strace -xx` prints them.
    fn hex(s: &str) -> Vec<u8> {
        s.split("\\x")
            .filter(|p| !p.is_empty())
            .map(|p| u8::from_str_radix(p, 16).unwrap())
            .collect()
    }

    /// The element list attribute of the batch's first element message.
    fn elements_of(b: &Batch) -> &[u8] {
        let bytes = b.bytes();
        let begin_len = u32_at(bytes, 0).unwrap() as usize;
        let m = &bytes[begin_len..];
        let mlen = u32_at(m, 0).unwrap() as usize;
        let m = &m[..mlen];
        let mut a = NLMSG_HDRLEN + NFGENMSG_LEN;
        loop {
            let alen = u16_at(m, a).unwrap() as usize;
            let atype = u16_at(m, a + 2).unwrap();
            if atype == NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED {
                return &m[a + 4..a + alen];
            }
            a += (alen + 3) & !3;
        }
    }

    #[test]
    fn v4_address_with_timeout_is_nfts_start_and_end() {
        // `nft add element inet t blocked4 '{ 10.0.0.1 timeout 1h }'`, nft 1.0.6 (strace).
        let nft = hex(
            "\\x1c\\x00\\x01\\x80\\x0c\\x00\\x04\\x00\\x00\\x00\\x00\\x00\\x00\\x36\\xee\\x80\\x0c\\x00\\x01\\x80\\x08\\x00\\x01\\x00\\x0a\\x00\\x00\\x01\\x18\\x00\\x02\\x80\\x08\\x00\\x03\\x00\\x00\\x00\\x00\\x01\\x0c\\x00\\x01\\x80\\x08\\x00\\x01\\x00\\x0a\\x00\\x00\\x02",
        );
        let b = Batch::encode(
            "t",
            &[op(b4(), "10.0.0.1/32", Verb::Add, Some(3600))],
            0,
            None,
        )
        .unwrap();
        assert_eq!(elements_of(&b), nft.as_slice());
        // Whole batch: begin (20) + message (table "t", set "blocked4", no set id) + end (20).
        let bytes = b.bytes();
        let begin = hex(
            "\\x14\\x00\\x00\\x00\\x10\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x0a",
        );
        assert_eq!(&bytes[..20], begin.as_slice());
        let m = &bytes[20..];
        assert_eq!(u32_at(m, 0), Some(100));
        assert_eq!(u16_at(m, 4), Some(0x0a0c));
        assert_eq!(u16_at(m, 6), Some(NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK));
        assert_eq!(u32_at(m, 8), Some(1));
        assert_eq!(&m[16..20], &[1, 0, 0, 0], "NFPROTO_INET, v0, res_id 0");
        assert_eq!(&m[20..28], &[6, 0, 1, 0, b't', 0, 0, 0]);
        assert_eq!(
            &m[28..44],
            &[
                13, 0, 2, 0, b'b', b'l', b'o', b'c', b'k', b'e', b'd', b'4', 0, 0, 0, 0
            ]
        );
        let end = &bytes[120..];
        assert_eq!(end.len(), 20);
        assert_eq!(u16_at(end, 4), Some(NFNL_MSG_BATCH_END));
        assert_eq!(u32_at(end, 8), Some(2));
        assert_eq!(&end[16..20], &[0, 0, 0, 10]);
        assert_eq!(b.next_seq(), 3);
    }

    #[test]
    fn v6_slash_64_with_timeout_matches_nft() {
        // From `nft add element inet t blocked6 '{ 2001:db8::/64 timeout 1h }'`, without the
        // leading `::` interval-end element nft adds to an empty set.
        let nft = hex(
            "\\x28\\x00\\x01\\x80\\x0c\\x00\\x04\\x00\\x00\\x00\\x00\\x00\\x00\\x36\\xee\\x80\\x18\\x00\\x01\\x80\\x14\\x00\\x01\\x00\\x20\\x01\\x0d\\xb8\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x24\\x00\\x02\\x80\\x08\\x00\\x03\\x00\\x00\\x00\\x00\\x01\\x18\\x00\\x01\\x80\\x14\\x00\\x01\\x00\\x20\\x01\\x0d\\xb8\\x00\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00",
        );
        let b = Batch::encode(
            "t",
            &[op(b6(), "2001:db8::/64", Verb::Add, Some(3600))],
            0,
            None,
        )
        .unwrap();
        assert_eq!(elements_of(&b), nft.as_slice());
    }

    #[test]
    fn v6_slash_128_without_timeout() {
        let b = Batch::encode(
            "t",
            &[op(b6(), "2001:db8::5/128", Verb::Add, None)],
            0,
            None,
        )
        .unwrap();
        let mut want = Vec::new();
        // start: key only
        want.extend_from_slice(&[0x1c, 0, 1, 0x80, 0x18, 0, 1, 0x80, 0x14, 0, 1, 0]);
        want.extend_from_slice(
            &"2001:db8::5"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        // end: flags + key ::6
        want.extend_from_slice(&[
            0x24, 0, 2, 0x80, 8, 0, 3, 0, 0, 0, 0, 1, 0x18, 0, 1, 0x80, 0x14, 0, 1, 0,
        ]);
        want.extend_from_slice(
            &"2001:db8::6"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        assert_eq!(elements_of(&b), want.as_slice());
    }

    #[test]
    fn delete_is_key_and_flags_only_like_nft_less_its_cache() {
        // `nft delete element inet t blocked4 '{ 10.1.0.6 }'` sends the start with its cached
        // timeout and expiration (ignored by the kernel); this sends key and flags.
        let b = Batch::encode(
            "t",
            &[op(b4(), "10.1.0.6/32", Verb::Delete, Some(3600))],
            0,
            None,
        )
        .unwrap();
        let nft_end = hex(
            "\\x18\\x00\\x02\\x80\\x08\\x00\\x03\\x00\\x00\\x00\\x00\\x01\\x0c\\x00\\x01\\x80\\x08\\x00\\x01\\x00\\x0a\\x01\\x00\\x07",
        );
        let start =
            hex("\\x10\\x00\\x01\\x80\\x0c\\x00\\x01\\x80\\x08\\x00\\x01\\x00\\x0a\\x01\\x00\\x06");
        let mut want = start;
        want.extend_from_slice(&nft_end);
        assert_eq!(elements_of(&b), want.as_slice());
        let m = &b.bytes()[20..];
        assert_eq!(u16_at(m, 4), Some(0x0a0e));
        assert_eq!(u16_at(m, 6), Some(NLM_F_REQUEST | NLM_F_ACK));
    }

    #[test]
    fn top_of_the_address_space_is_an_open_interval_like_nft() {
        // `nft add element inet t blocked4 '{ 255.255.255.255 timeout 1h, 255.255.254.0/24 }'`.
        let nft = hex(
            "\\x10\\x00\\x01\\x80\\x0c\\x00\\x01\\x80\\x08\\x00\\x01\\x00\\xff\\xff\\xfe\\x00\\x18\\x00\\x02\\x80\\x08\\x00\\x03\\x00\\x00\\x00\\x00\\x01\\x0c\\x00\\x01\\x80\\x08\\x00\\x01\\x00\\xff\\xff\\xff\\x00\\x28\\x00\\x03\\x80\\x0c\\x00\\x04\\x00\\x00\\x00\\x00\\x00\\x00\\x36\\xee\\x80\\x0c\\x00\\x01\\x80\\x08\\x00\\x01\\x00\\xff\\xff\\xff\\xff\\x0a\\x00\\x06\\x00\\x01\\x04\\x01\\x00\\x00\\x00\\x00\\x00",
        );
        let b = Batch::encode(
            "t",
            &[
                op(b4(), "255.255.255.255/32", Verb::Add, Some(3600)),
                op(b4(), "255.255.254.0/24", Verb::Add, None),
            ],
            0,
            None,
        )
        .unwrap();
        assert_eq!(elements_of(&b), nft.as_slice());
    }

    #[test]
    fn deletes_come_first_and_messages_are_cut() {
        let mut ops: Vec<Op> = (0..5000u32)
            .map(|i| Op {
                set: b4(),
                key: ElemKey::Net(IpNet::from(IpAddr::V4((0xc612_0000 + i).into()))),
                verb: Verb::Add,
                timeout_secs: Some(60),
            })
            .collect();
        ops.push(op(b6(), "2001:db8::1/128", Verb::Delete, None));
        let b = Batch::encode("egressguard", &ops, 100, Some(7)).unwrap();
        assert!(b.messages() >= 8, "{}", b.messages());
        assert_eq!(b.msgs[0].verb, Verb::Delete);
        assert!(b.msgs[1..].iter().all(|m| m.verb == Verb::Add));
        // Begin carries the generation id.
        assert_eq!(&b.bytes()[20..28], &[8, 0, 1, 0, 0, 0, 0, 7]);
        // Every message parses and no element list exceeds a netlink attribute.
        let mut off = 0;
        let mut seqs = Vec::new();
        while off < b.bytes().len() {
            let len = u32_at(b.bytes(), off).unwrap() as usize;
            assert!(len < 65535);
            seqs.push(u32_at(b.bytes(), off + 8).unwrap());
            off += len;
        }
        assert_eq!(off, b.bytes().len());
        let want: Vec<u32> = (100..100 + b.messages() as u32 + 2).collect();
        assert_eq!(seqs, want);
        assert_eq!(b.msgs.iter().map(|m| m.elems.len()).sum::<usize>(), 10_002);
    }

    #[test]
    fn a_family_mismatch_is_an_error() {
        assert!(matches!(
            Batch::encode(
                "t",
                &[op(b4(), "2001:db8::1/128", Verb::Add, None)],
                0,
                None
            ),
            Err(BatchError::Encode { .. })
        ));
    }

    fn ack(seq: u32, errno: i32, offs: Option<u32>, msg: Option<&str>) -> Vec<u8> {
        let mut tlv = Vec::new();
        if let Some(m) = msg {
            let s = cstr(m);
            tlv.extend_from_slice(&((4 + s.len()) as u16).to_ne_bytes());
            tlv.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
            tlv.extend_from_slice(&s);
            while tlv.len() % 4 != 0 {
                tlv.push(0);
            }
        }
        if let Some(o) = offs {
            tlv.extend_from_slice(&8u16.to_ne_bytes());
            tlv.extend_from_slice(&NLMSGERR_ATTR_OFFS.to_ne_bytes());
            tlv.extend_from_slice(&o.to_ne_bytes());
        }
        let mut b = Vec::new();
        let len = NLMSG_HDRLEN + 4 + NLMSG_HDRLEN + tlv.len();
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        let flags = NLM_F_CAPPED | if tlv.is_empty() { 0 } else { NLM_F_ACK_TLVS };
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&(-errno).to_ne_bytes());
        b.extend_from_slice(&200u32.to_ne_bytes());
        b.extend_from_slice(&0x0a0cu16.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&tlv);
        b
    }

    fn three() -> Batch {
        Batch::encode(
            "t",
            &[
                op(b4(), "10.0.0.1/32", Verb::Add, Some(60)),
                op(b4(), "10.0.0.9/32", Verb::Add, Some(60)),
                op(b6(), "2001:db8::/64", Verb::Delete, None),
            ],
            10,
            Some(5),
        )
        .unwrap()
    }

    #[test]
    fn all_acked_is_success() {
        let b = three();
        let mut r = Replies::new(&b);
        r.absorb(&ack(11, 0, None, None)).unwrap();
        assert!(!r.complete());
        // An old batch's reply is skipped.
        r.absorb(&ack(3, 2, None, None)).unwrap();
        let mut two = ack(12, 0, None, None);
        two.extend_from_slice(&ack(12, 0, None, None));
        r.absorb(&two).unwrap();
        assert!(r.complete());
        r.outcome().unwrap();
    }

    #[test]
    fn a_refused_element_is_named() {
        let b = three();
        // Second message (adds to blocked4): offset of its third list element (10.0.0.9 start).
        let offs = b.msgs[1].elems[2].0 + 4;
        let mut r = Replies::new(&b);
        r.absorb(&ack(11, 0, None, None)).unwrap();
        r.absorb(&ack(12, 39, Some(offs), Some("interval overlaps")))
            .unwrap();
        assert!(r.complete());
        let e = r.outcome().unwrap_err();
        match &e {
            BatchError::Refused {
                verb,
                set,
                elem,
                errno,
                message,
                ..
            } => {
                assert_eq!(
                    (*verb, *set, elem.as_str(), *errno),
                    ("add", "blocked4", "10.0.0.9", 39)
                );
                assert_eq!(message.as_deref(), Some("interval overlaps"));
            }
            other => panic!("{other:?}"),
        }
        assert!(!e.is_transport());
        // Without an offset the message's elements are named.
        let mut r = Replies::new(&b);
        r.absorb(&ack(11, 2, None, None)).unwrap();
        let e = r.outcome().unwrap_err();
        assert!(
            e.to_string().contains("one of 1 elements (2001:db8::/64"),
            "{e}"
        );
    }

    #[test]
    fn batch_level_refusals_and_missing_acks() {
        let b = three();
        let mut r = Replies::new(&b);
        r.absorb(&ack(10, ERESTART, None, None)).unwrap();
        assert!(matches!(
            r.outcome(),
            Err(BatchError::GenerationChanged { expected: 5 })
        ));
        let mut r = Replies::new(&b);
        r.absorb(&ack(10, EPERM, None, None)).unwrap();
        assert!(r.outcome().unwrap_err().is_permission());
        let mut r = Replies::new(&b);
        r.absorb(&ack(11, 0, None, None)).unwrap();
        let e = r.outcome().unwrap_err();
        assert!(
            matches!(
                e,
                BatchError::Unacknowledged {
                    missing: 1,
                    messages: 2
                }
            ),
            "{e:?}"
        );
        assert!(e.is_transport());
    }

    #[test]
    fn garbage_replies_are_errors_not_panics() {
        let b = three();
        let full = ack(12, 39, Some(40), Some("x"));
        for cut in 0..full.len() {
            let mut r = Replies::new(&b);
            let _ = r.absorb(&full[..cut]);
        }
        let mut bad = full.clone();
        bad[0..4].copy_from_slice(&9999u32.to_ne_bytes());
        assert!(Replies::new(&b).absorb(&bad).is_err());
        let mut bad = full;
        let at = NLMSG_HDRLEN + 4 + NLMSG_HDRLEN;
        bad[at..at + 2].copy_from_slice(&2u16.to_ne_bytes());
        assert!(Replies::new(&b).absorb(&bad).is_err());
    }
}
