//! The nftables ruleset generation id (`NFT_MSG_GETGEN` over nfnetlink): the kernel bumps it
//! on every committed transaction in the namespace, by anyone. The reconcile loop reads it
//! each tick and lists the agent's table only when it changed since the last verified
//! listing, so an idle tick costs one netlink round trip instead of an `nft` process and a
//! listing of every set (the per-source counter sets can hold hundreds of thousands of
//! elements). Packet-path set updates and element timeouts do not bump it; neither is drift.
//!
//! The request and reply are a few fixed fields, encoded and decoded here by hand; a reply
//! that does not parse is an error value.

use rtnetlink::sys::protocols::NETLINK_NETFILTER;
use rtnetlink::sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;

/// Why the generation id could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    /// The netlink socket failed.
    #[error("nfnetlink socket")]
    Io(#[source] std::io::Error),
    /// The kernel answered with an error.
    #[error("the kernel refused NFT_MSG_GETGEN")]
    Kernel(#[source] std::io::Error),
    /// The reply is malformed.
    #[error("malformed NFT_MSG_NEWGEN reply: {0}")]
    Malformed(&'static str),
}

/// The `NFT_MSG_GETGEN` request with sequence number `seq`.
pub fn request(seq: u32) -> [u8; NLMSG_HDRLEN + NFGENMSG_LEN] {
    let mut b = [0u8; NLMSG_HDRLEN + NFGENMSG_LEN];
    b[0..4].copy_from_slice(&((NLMSG_HDRLEN + NFGENMSG_LEN) as u32).to_ne_bytes());
    b[4..6].copy_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    b[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    // pid 0; nfgenmsg: family AF_UNSPEC, version NFNETLINK_V0, res_id 0.
    b
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Reads the generation id from a datagram; `Ok(None)` when it holds no answer to `seq`.
pub fn parse_reply(buf: &[u8], seq: u32) -> Result<Option<u32>, GenError> {
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32_at(buf, off).ok_or(GenError::Malformed("header"))? as usize;
        let kind = u16_at(buf, off + 4).ok_or(GenError::Malformed("header"))?;
        let mseq = u32_at(buf, off + 8).ok_or(GenError::Malformed("header"))?;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return Err(GenError::Malformed("message length"));
        }
        let msg = &buf[off..off + len];
        if mseq == seq {
            if kind == NLMSG_ERROR {
                let code = u32_at(msg, NLMSG_HDRLEN).ok_or(GenError::Malformed("error"))? as i32;
                if code != 0 {
                    return Err(GenError::Kernel(std::io::Error::from_raw_os_error(-code)));
                }
            } else if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
                let mut a = NLMSG_HDRLEN + NFGENMSG_LEN;
                while a + 4 <= msg.len() {
                    let alen = u16_at(msg, a).ok_or(GenError::Malformed("attribute"))? as usize;
                    let atype =
                        u16_at(msg, a + 2).ok_or(GenError::Malformed("attribute"))? & 0x3fff;
                    if alen < 4 || a + alen > msg.len() {
                        return Err(GenError::Malformed("attribute length"));
                    }
                    if atype == NFTA_GEN_ID {
                        let v = msg
                            .get(a + 4..a + 8)
                            .ok_or(GenError::Malformed("NFTA_GEN_ID"))?;
                        let id = u32::from_be_bytes(
                            v.try_into()
                                .map_err(|_| GenError::Malformed("NFTA_GEN_ID"))?,
                        );
                        return Ok(Some(id));
                    }
                    a += (alen + 3) & !3;
                }
                return Err(GenError::Malformed("no NFTA_GEN_ID"));
            }
        }
        off += (len + 3) & !3;
    }
    Ok(None)
}

/// A nfnetlink socket for reading the generation id.
pub struct GenWatch {
    sock: TokioSocket,
    seq: u32,
}

impl std::fmt::Debug for GenWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenWatch").field("seq", &self.seq).finish()
    }
}

impl GenWatch {
    /// Opens the socket in the calling thread's network namespace.
    pub fn open() -> Result<GenWatch, GenError> {
        let mut sock = TokioSocket::new(NETLINK_NETFILTER).map_err(GenError::Io)?;
        sock.socket_mut().bind_auto().map_err(GenError::Io)?;
        sock.socket_mut()
            .connect(&SocketAddr::new(0, 0))
            .map_err(GenError::Io)?;
        Ok(GenWatch { sock, seq: 0 })
    }

    /// The current generation id.
    pub async fn get(&mut self) -> Result<u32, GenError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.sock.send(&request(seq)).await.map_err(GenError::Io)?;
        for _ in 0..16 {
            let mut buf: Vec<u8> = Vec::with_capacity(4096);
            self.sock.recv(&mut buf).await.map_err(GenError::Io)?;
            if let Some(id) = parse_reply(&buf, seq)? {
                return Ok(id);
            }
        }
        Err(GenError::Malformed("no answer among 16 datagrams"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(seq: u32, gen_id: u32) -> Vec<u8> {
        let mut b = Vec::new();
        let len = NLMSG_HDRLEN + NFGENMSG_LEN + 8 + 8;
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN).to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&[0, 0, 0, 0]);
        // NFTA_GEN_PROC_PID first, then NFTA_GEN_ID (order must not matter).
        b.extend_from_slice(&8u16.to_ne_bytes());
        b.extend_from_slice(&2u16.to_ne_bytes());
        b.extend_from_slice(&77u32.to_be_bytes());
        b.extend_from_slice(&8u16.to_ne_bytes());
        b.extend_from_slice(&NFTA_GEN_ID.to_ne_bytes());
        b.extend_from_slice(&gen_id.to_be_bytes());
        b
    }

    #[test]
    fn request_is_a_getgen_for_nftables() {
        let r = request(7);
        assert_eq!(u32_at(&r, 0), Some(20));
        assert_eq!(u16_at(&r, 4), Some(0x0a10));
        assert_eq!(u32_at(&r, 8), Some(7));
    }

    #[test]
    fn reads_the_generation_id() {
        assert_eq!(parse_reply(&reply(7, 4242), 7).unwrap(), Some(4242));
        assert_eq!(parse_reply(&reply(6, 4242), 7).unwrap(), None, "other seq");
    }

    #[test]
    fn errors_and_garbage_are_values() {
        let mut e = Vec::new();
        e.extend_from_slice(&36u32.to_ne_bytes());
        e.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        e.extend_from_slice(&0u16.to_ne_bytes());
        e.extend_from_slice(&7u32.to_ne_bytes());
        e.extend_from_slice(&0u32.to_ne_bytes());
        e.extend_from_slice(&(-1i32).to_ne_bytes());
        e.extend_from_slice(&request(7)[..16]);
        assert!(matches!(parse_reply(&e, 7), Err(GenError::Kernel(_))));
        let full = reply(7, 1);
        for cut in 1..full.len() {
            let _ = parse_reply(&full[..cut], 7);
        }
        let mut bad = reply(7, 1);
        bad[20..22].copy_from_slice(&2u16.to_ne_bytes());
        assert!(parse_reply(&bad, 7).is_err());
    }
}
