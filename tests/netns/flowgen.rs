//! Traffic generators shared by the namespace tests: a paced, bounded driver of new UDP flows
//! ([`paced`]), a sender of IPv4/UDP datagrams with a source address of the caller's choice
//! ([`RawUdp`], for spoofed-source floods), the permutation that gives a spoofed flood its
//! distinct sources ([`spread`]), an internet host that drops what it is sent ([`sink`]), a
//! prefix the router forwards into nothing ([`egress_sink`]), and flows created in the
//! router's conntrack table directly ([`CtInject`], [`paced_injected`]).
//!
//! Every generator is bounded in count and in time, and sends only from and to namespaces
//! the test built.

#![allow(dead_code)] // shared by the `netns` and `storm` test binaries, each using part of it

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use egressguard::messages::proto;
use egressguard::netns::{Netns, NetnsError};
use egressguard::observe::ctnetlink::{self, NLMSG_ERROR};
use netlink_sys::protocols::NETLINK_NETFILTER;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// What a [`paced`] run did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Paced {
    /// Datagrams handed to the kernel.
    pub sent: u64,
    /// Sends that failed (e.g. `ENOBUFS` from a full device queue).
    pub failed: u64,
    /// From the first send to the last.
    pub elapsed: Duration,
}

impl Paced {
    /// The achieved rate, datagrams per second.
    pub fn rate(&self) -> u64 {
        (self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)) as u64
    }
}

/// Sends `count` datagrams in total at `rate` per second, spread over `threads` threads, and
/// stops early when `limit` has passed. `send(t, k)` sends the `k`-th datagram of thread `t`
/// (`k` counts from 0 per thread; `k * threads + t` numbers the datagram across threads) and
/// says whether the kernel took it. Pacing sleeps every 64 datagrams until that datagram is
/// due, so the rate holds on average without a syscall per datagram for the clock.
pub fn paced<F>(threads: usize, count: u64, rate: u64, limit: Duration, send: F) -> Paced
where
    F: Fn(usize, u64) -> bool + Sync,
{
    let threads = threads.max(1);
    let per_thread_rate = (rate / threads as u64).max(1);
    let started = Instant::now();
    let deadline = started + limit;
    let send = &send;
    let results: Vec<(u64, u64)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                // Thread t sends the datagrams t, t + threads, t + 2 threads, ... of `count`.
                let mine = count / threads as u64 + u64::from((t as u64) < count % threads as u64);
                sc.spawn(move || {
                    let (mut sent, mut failed) = (0u64, 0u64);
                    for k in 0..mine {
                        if send(t, k) {
                            sent += 1;
                        } else {
                            failed += 1;
                        }
                        if (k + 1).is_multiple_of(64) {
                            let now = Instant::now();
                            if now >= deadline {
                                break;
                            }
                            let due = started
                                + Duration::from_nanos((k + 1) * 1_000_000_000 / per_thread_rate);
                            if due > now {
                                std::thread::sleep(due - now);
                            }
                        }
                    }
                    (sent, failed)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sender thread"))
            .collect()
    });
    Paced {
        sent: results.iter().map(|r| r.0).sum(),
        failed: results.iter().map(|r| r.1).sum(),
        elapsed: started.elapsed(),
    }
}

/// The `i`-th of 2^`bits` distinct values, in an order that looks random: a bijection of
/// `[0, 2^bits)` (odd multipliers and a right xorshift, each invertible modulo 2^bits). So
/// `base | spread(i, 24)` for `i < 2^24` gives every address of a /8 exactly once.
pub fn spread(i: u32, bits: u32) -> u32 {
    let mask = if bits >= 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    };
    let mut x = i.wrapping_mul(0x9E37_79B1) & mask;
    x ^= x >> (bits / 2).max(1);
    x.wrapping_mul(0x85EB_CA6B) & mask
}

/// Runs `open` inside `ns`, so the socket it opens lives there; `what` names it in errors.
fn open_in<T: Send>(
    ns: &Netns,
    what: &str,
    open: impl FnOnce() -> io::Result<T> + Send,
) -> Result<T, NetnsError> {
    ns.enter(open)?.map_err(|source| NetnsError::Spawn {
        cmd: what.into(),
        source,
    })
}

/// A raw IPv4 socket with `IP_HDRINCL`: sends UDP datagrams whose IP header, source address
/// included, the caller writes. Opened inside a namespace, it sends from there.
#[derive(Debug)]
pub struct RawUdp {
    sock: Socket,
}

/// Bytes of one datagram built by [`RawUdp::send`]: IPv4 header, UDP header, 4 bytes payload.
const RAW_LEN: usize = 20 + 8 + 4;

impl RawUdp {
    /// Opens the socket inside `ns`.
    pub fn open(ns: &Netns) -> Result<RawUdp, NetnsError> {
        let sock = open_in(ns, "raw IPv4 socket", || {
            let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))?;
            s.set_header_included_v4(true)?;
            // A deep send buffer: the sender outruns the veth queue in bursts.
            s.set_send_buffer_size(4 << 20)?;
            Ok(s)
        })?;
        Ok(RawUdp { sock })
    }

    /// Sends one UDP datagram `src:sport → dst:dport`. The kernel fills in the IP header's
    /// total length, identification and checksum; the UDP checksum is 0 (none, legal on IPv4).
    pub fn send(&self, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> io::Result<usize> {
        let mut p = [0u8; RAW_LEN];
        p[0] = 0x45; // version 4, header 5 words
        p[8] = 64; // TTL
        p[9] = 17; // UDP
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[24..26].copy_from_slice(&((RAW_LEN - 20) as u16).to_be_bytes());
        p[28..32].copy_from_slice(b"egd!");
        let to = SockAddr::from(SocketAddrV4::new(dst, 0));
        self.sock.send_to(&p, &to)
    }
}

/// Makes `host` drop, before anything else sees them, the UDP datagrams to ports 1024-65535
/// that reach it (to its own address or routed to it), without an ICMP error back: a silent
/// sink for flow floods.
pub fn sink(host: &Netns) -> Result<(), NetnsError> {
    let rules = "table inet egd_sink {\n chain pre {\n  type filter hook prerouting priority -300; policy accept;\n  udp dport 1024-65535 drop\n }\n}\n";
    let mut c = host
        .command(&["nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| NetnsError::Spawn {
            cmd: "nft -f -".into(),
            source,
        })?;
    if let Some(mut stdin) = c.stdin.take() {
        use std::io::Write;
        stdin
            .write_all(rules.as_bytes())
            .map_err(|source| NetnsError::Spawn {
                cmd: "nft -f -".into(),
                source,
            })?;
    }
    let out = c.wait_with_output().map_err(|source| NetnsError::Spawn {
        cmd: "nft -f -".into(),
        source,
    })?;
    if !out.status.success() {
        return Err(NetnsError::Failed {
            cmd: "nft -f - (sink table)".into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Routes `prefix` in `router` to an `ifb` device with no queue, which drops whatever is
/// routed to it: the router forwards the traffic as it would upstream (conntrack confirms the
/// flow at postrouting, so the agent sees it), and no second namespace spends the shared
/// cores on receiving it. For flow-rate measurements, where the generator must not be the
/// limit.
pub fn egress_sink(router: &Netns, prefix: &str) -> Result<(), NetnsError> {
    router.run(&["ip", "link", "add", "egd-egress", "type", "ifb"])?;
    router.run(&["ip", "link", "set", "egd-egress", "up"])?;
    router.run(&[
        "tc",
        "qdisc",
        "replace",
        "dev",
        "egd-egress",
        "root",
        "noqueue",
    ])?;
    router.run(&["ip", "route", "add", prefix, "dev", "egd-egress"])?;
    Ok(())
}

/// Creates UDP flows in a namespace's conntrack table through ctnetlink, as `conntrack -I`
/// does, many to a `sendmsg`. Listeners get the same `NEW` event as for a forwarded packet's
/// flow (and the `DESTROY` when it times out), without the cost of the packet path: for
/// event rates the namespace's packet path cannot reach on a small machine.
#[derive(Debug)]
pub struct CtInject {
    sock: netlink_sys::Socket,
    buf: Vec<u8>,
    reply: Vec<u8>,
    id: u32,
    /// The errno of the last refusal, if any.
    pub refusal: Option<io::Error>,
}

impl CtInject {
    /// Opens the socket inside `ns`.
    pub fn open(ns: &Netns) -> Result<CtInject, NetnsError> {
        let sock = open_in(ns, "NETLINK_NETFILTER socket", || {
            let mut s = netlink_sys::Socket::new(NETLINK_NETFILTER)?;
            s.bind_auto()?;
            s.set_non_blocking(true)?;
            Ok(s)
        })?;
        Ok(CtInject {
            sock,
            buf: Vec::with_capacity(64 * 1024),
            reply: vec![0; 64 * 1024],
            id: 0,
            refusal: None,
        })
    }

    /// Creates the UDP flows `(src, sport, dst, dport)` with `timeout` seconds to live, in one
    /// `sendmsg`, and returns how many the kernel refused (it answers only refusals).
    pub fn create(
        &mut self,
        flows: impl IntoIterator<Item = (Ipv4Addr, u16, Ipv4Addr, u16)>,
        timeout: u32,
    ) -> io::Result<u64> {
        self.buf.clear();
        for (src, sport, dst, dport) in flows {
            self.id = self.id.wrapping_add(1);
            let m = crate::ctmsg::create_request(
                src.into(),
                dst.into(),
                proto::UDP,
                sport,
                dport,
                timeout,
                self.id,
            );
            self.buf.extend_from_slice(&m);
        }
        self.sock
            .send_to(&self.buf, &netlink_sys::SocketAddr::new(0, 0), 0)?;
        let mut refused = 0;
        loop {
            let mut slice: &mut [u8] = &mut self.reply[..];
            match self.sock.recv(&mut slice, 0) {
                Ok(n) => {
                    for m in ctnetlink::messages(&self.reply[..n.min(self.reply.len())]).flatten() {
                        let code = m
                            .payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                        if m.kind == NLMSG_ERROR
                            && let Some(c) = code.filter(|&c| c != 0)
                        {
                            refused += 1;
                            self.refusal = Some(io::Error::from_raw_os_error(-c));
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(refused)
    }
}

/// Flows per [`CtInject::create`] call in [`paced_injected`].
pub const INJECT_BATCH: u64 = 64;

/// Like [`paced`], for flows created by `injectors` (one sender thread each) in batches of
/// [`INJECT_BATCH`]: `count` flows at `rate` per second, flow `i` being `flow(i)`
/// (`(src, sport, dst, dport)`), each living `timeout` seconds. A refused flow counts as failed.
pub fn paced_injected<F>(
    injectors: &[std::sync::Mutex<CtInject>],
    count: u64,
    rate: u64,
    limit: Duration,
    timeout: u32,
    flow: F,
) -> Paced
where
    F: Fn(u64) -> (Ipv4Addr, u16, Ipv4Addr, u16) + Sync,
{
    assert!(!injectors.is_empty(), "paced_injected needs an injector");
    let threads = injectors.len() as u64;
    let refused = std::sync::atomic::AtomicU64::new(0);
    let b = paced(
        threads as usize,
        count / INJECT_BATCH,
        (rate / INJECT_BATCH).max(1),
        limit,
        |t, k| {
            let first = (k * threads + t as u64) * INJECT_BATCH;
            let mut inj = injectors[t].lock().expect("injector");
            match inj.create((first..first + INJECT_BATCH).map(&flow), timeout) {
                Ok(r) => {
                    refused.fetch_add(r, std::sync::atomic::Ordering::Relaxed);
                    true
                }
                Err(_) => false,
            }
        },
    );
    let refused = refused.into_inner();
    Paced {
        sent: (b.sent * INJECT_BATCH).saturating_sub(refused),
        failed: b.failed * INJECT_BATCH + refused,
        elapsed: b.elapsed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_a_permutation() {
        for bits in [4u32, 10, 16] {
            let n = 1u32 << bits;
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let v = spread(i, bits);
                assert!(v < n);
                assert!(!seen[v as usize], "bits {bits}: {v} twice");
                seen[v as usize] = true;
            }
        }
    }
}
