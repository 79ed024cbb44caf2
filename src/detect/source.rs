//! The state kept per tracked source: one flat, fixed-size struct (no heap), updated per
//! event and read at evaluation.
//!
//! Each category has its own two-epoch window (epoch length = the category's `window`), so
//! a count "in the window" is `cur + prev × (share of prev still inside the window)`, and a
//! distinct count is estimated the same way from linear-counting bitmaps. Evaluation reads
//! the state without changing it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::sketch::{
    Bits, Keyed, SpaceSaving, Span, TwoEpochs, hash16, hash128, sliding, sliding_distinct_folded,
};

/// Number of per-target entries (heavy hitters) kept per source for brute force and port scan.
pub const TARGETS: usize = 3;
/// Number of destination ports kept per source for the evidence.
pub const PORTS: usize = 3;

/// A tracked source: an address, or its IPv6 aggregate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SrcKey {
    /// The (aggregated) address, IPv4 in the low 32 bits ([`split4`]).
    pub addr: [u32; 4],
    /// Prefix length of the aggregate (32 or 128 for a single address).
    pub len: u8,
    /// IPv6.
    pub v6: bool,
}

impl SrcKey {
    /// The key of an aggregate.
    pub fn from_net(n: &IpNet) -> SrcKey {
        let (a, v6) = match n.network() {
            IpAddr::V4(a) => (u128::from(u32::from(a)), false),
            IpAddr::V6(a) => (u128::from(a), true),
        };
        SrcKey {
            addr: split4(a),
            len: n.prefix_len(),
            v6,
        }
    }

    /// The aggregate as a prefix.
    pub fn net(&self) -> IpNet {
        let a = join4(self.addr);
        let ip = if self.v6 {
            IpAddr::V6(Ipv6Addr::from(a))
        } else {
            IpAddr::V4(Ipv4Addr::from(a as u32))
        };
        IpNet::new(ip, self.len).unwrap_or_else(|_| IpNet::from(ip))
    }

    /// Hash for the source index.
    #[inline]
    pub fn hash(&self) -> u64 {
        hash128(join4(self.addr)) ^ (u64::from(self.len) << 1 | u64::from(self.v6))
    }
}

/// An address as two words (keeps structs 8-byte aligned, unlike `u128`).
#[inline]
pub fn split(a: u128) -> [u64; 2] {
    [(a >> 64) as u64, a as u64]
}

/// An address as four words (keeps the target entries 4-byte aligned).
#[inline]
pub fn split4(a: u128) -> [u32; 4] {
    [
        (a >> 96) as u32,
        (a >> 64) as u32,
        (a >> 32) as u32,
        a as u32,
    ]
}

/// Inverse of [`split4`].
#[inline]
pub fn join4(a: [u32; 4]) -> u128 {
    a.iter().fold(0u128, |acc, w| (acc << 32) | u128::from(*w))
}

/// Inverse of [`split`].
#[inline]
pub fn join(a: [u64; 2]) -> u128 {
    (u128::from(a[0]) << 64) | u128::from(a[1])
}

/// An address as a 128-bit number (IPv4 in the low 32 bits).
#[inline]
pub fn addr_bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The inverse of [`addr_bits`], given the family.
pub fn bits_addr(a: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(a))
    } else {
        IpAddr::V4(Ipv4Addr::from(a as u32))
    }
}

/// Flood counters of one epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FloodCounts {
    /// New flows.
    pub new: u32,
    /// New TCP flows (SYNs).
    pub syn: u32,
    /// TCP flows answered (SYN-ACK or RST).
    pub syn_answered: u32,
    /// New UDP flows to amplification ports.
    pub amp: u32,
    /// Of those, answered.
    pub amp_answered: u32,
    /// Flows answered (any protocol).
    pub answered: u32,
    /// Distinct destinations.
    pub targets: Bits<2>,
    /// Packets from the counters.
    pub packets: u32,
    /// Milliseconds covered by counter samples.
    pub ms: u32,
    /// Bytes from the counters: high and low 32 bits (keeps the struct 4-byte aligned).
    pub bytes: [u32; 2],
}

impl FloodCounts {
    /// Bytes from the counters.
    #[inline]
    pub fn bytes(&self) -> u64 {
        (u64::from(self.bytes[0]) << 32) | u64::from(self.bytes[1])
    }

    #[inline]
    fn add_bytes(&mut self, b: u64) {
        let v = self.bytes().saturating_add(b);
        self.bytes = [(v >> 32) as u32, v as u32];
    }
}

/// Network-scan counters of one epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NetScanCounts {
    /// Distinct destinations.
    pub dsts: Bits<8>,
    /// Distinct destination ports.
    pub ports: Bits<2>,
    /// New flows.
    pub flows: u32,
    /// Flows answered (also by a reset; not by an ICMP error, which leaves the flow
    /// unreplied in conntrack).
    pub answered: u32,
}

/// Network-scan counters: the current epoch in full, the previous one with its destination
/// bitmap folded to half resolution.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NetScan {
    /// Epoch number of `cur`.
    pub epoch: u32,
    /// When in the epochs events came.
    pub span: Span,
    /// Current epoch.
    pub cur: NetScanCounts,
    /// Previous epoch's destinations (128 bits).
    pub prev_dsts: Bits<4>,
    /// Previous epoch's ports (32 bits: "few ports" needs no more).
    pub prev_ports: Bits<1>,
    /// Previous epoch's flows.
    pub prev_flows: u32,
    /// Previous epoch's answered flows.
    pub prev_answered: u32,
    /// Flows carried through (TCP established, anything else answered), current and
    /// previous epoch; saturates at `u16::MAX` (a busy client, never a sweep).
    pub completed: [u16; 2],
}

impl NetScan {
    #[inline]
    fn at(&mut self, t: u64, len: u64) -> &mut NetScanCounts {
        let d = super::sketch::epoch_of(t, len).wrapping_sub(self.epoch);
        if d != 0 && d < u32::MAX / 2 {
            if d == 1 {
                self.prev_dsts = self.cur.dsts.fold();
                self.prev_ports = self.cur.ports.fold();
                self.prev_flows = self.cur.flows;
                self.prev_answered = self.cur.answered;
                self.completed = [0, self.completed[0]];
            } else {
                *self = NetScan::default();
            }
            self.cur = NetScanCounts::default();
            self.span.rolled(d);
            self.epoch = super::sketch::epoch_of(t, len);
        }
        if d < u32::MAX / 2 {
            self.span.note(t, len);
        }
        &mut self.cur
    }
}

/// Spam counters: current epoch in full, previous folded.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Spam {
    /// Epoch number of `cur_*`.
    pub epoch: u32,
    /// When in the epochs events came.
    pub span: Span,
    /// New SMTP flows, current and previous epoch (evidence only: saturates at 65,535 an
    /// epoch; the threshold is on distinct destinations).
    pub flows: [u16; 2],
    /// SMTP flows answered, current and previous epoch (evidence only, as `flows`).
    pub answered: [u16; 2],
    /// Distinct SMTP destinations in the current epoch (128 bits).
    pub dsts: Bits<4>,
    /// ... and in the previous epoch (64 bits).
    pub prev_dsts: Bits<2>,
}

impl Spam {
    #[inline]
    fn roll(&mut self, t: u64, len: u64) {
        let d = super::sketch::epoch_of(t, len).wrapping_sub(self.epoch);
        if d != 0 && d < u32::MAX / 2 {
            if d == 1 {
                self.prev_dsts = self.dsts.fold();
                self.flows = [0, self.flows[0]];
                self.answered = [0, self.answered[0]];
            } else {
                *self = Spam::default();
            }
            self.dsts = Bits::default();
            self.span.rolled(d);
            self.epoch = super::sketch::epoch_of(t, len);
        }
        if d < u32::MAX / 2 {
            self.span.note(t, len);
        }
    }
}

/// One destination of a source: flows, distinct ports and authentication attempts.
///
/// The Space-Saving weight (`score`) counts what makes a destination interesting (a port not
/// seen before on it, an authentication attempt), not plain flows: a resolver or a CDN that
/// gets most of a host's flows on one port does not push a scanned or attacked server out.
/// Only `score` inherits the replaced entry's weight; the reported counts start at zero.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Target {
    /// The destination (see [`addr_bits`], [`split4`]).
    pub addr: [u32; 4],
    /// Distinct destination ports in the current epoch (128 bits).
    pub ports: Bits<4>,
    /// ... and in the previous epoch (64 bits).
    pub prev_ports: Bits<2>,
    /// New flows, current and previous epoch.
    pub flows: [u16; 2],
    /// Flows the destination accepted (SYN-ACK, or any reply for non-TCP).
    pub accepted: [u16; 2],
    /// New flows to authentication ports.
    pub auth: [u16; 2],
    /// Eviction weight: new ports + authentication attempts, current and previous epoch.
    pub score: [u16; 2],
}

impl Keyed for Target {
    type Key = [u32; 4];
    fn key(&self) -> [u32; 4] {
        self.addr
    }
    fn weight(&self, pw: f64) -> f64 {
        sliding(u64::from(self.score[0]), u64::from(self.score[1]), pw)
    }
    fn fresh(addr: [u32; 4], inherited: u16) -> Target {
        Target {
            addr,
            score: [inherited, 0],
            ..Target::default()
        }
    }
    fn roll(&mut self, gap: u32) {
        if gap == 1 {
            self.prev_ports = self.ports.fold();
            self.ports = Bits::default();
            self.flows = [0, self.flows[0]];
            self.accepted = [0, self.accepted[0]];
            self.auth = [0, self.auth[0]];
            self.score = [0, self.score[0]];
        } else {
            *self = Target::default();
        }
    }
    fn occupied(&self) -> bool {
        self.flows != [0, 0]
    }
}

/// One destination port of a source.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PortEntry {
    /// The port.
    pub port: u16,
    /// New flows, current and previous epoch.
    pub flows: [u16; 2],
    /// Inherited weight.
    pub err: u16,
}

impl Keyed for PortEntry {
    type Key = u16;
    fn key(&self) -> u16 {
        self.port
    }
    fn weight(&self, pw: f64) -> f64 {
        sliding(u64::from(self.flows[0]), u64::from(self.flows[1]), pw)
    }
    fn fresh(port: u16, inherited: u16) -> PortEntry {
        PortEntry {
            port,
            flows: [inherited, 0],
            err: inherited,
        }
    }
    fn roll(&mut self, gap: u32) {
        // The previous epoch keeps what the entry surely saw, not the weight it inherited:
        // top-port counts are never above the truth.
        self.flows = if gap == 1 {
            [0, self.flows[0].saturating_sub(self.err)]
        } else {
            [0, 0]
        };
        self.err = 0;
    }
    fn occupied(&self) -> bool {
        self.flows != [0, 0]
    }
}

/// Flag: the slot holds a source.
pub const OCCUPIED: u8 = 1;
/// Flag: the source saw an event since the last evaluation.
pub const TOUCHED: u8 = 2;
/// Flag: the source is held (quarantined, blocked, terminated) by the decision task: its
/// counter samples are not charged (what they count is traffic the hold drops).
pub const HELD: u8 = 4;
/// Flag: the source started afresh recently (the engine's `fresh` map has the time): events
/// from before that time are not charged.
pub const FRESH: u8 = 8;
/// Flag: the hold is a block or a termination: nothing of the source passes the router.
pub const HELD_ALL: u8 = 16;
/// Flag: the source has an exact port tracker ([`super::exact`]).
pub const EXACT: u8 = 32;
/// Flag: the source has a slow-scan tracker ([`super::slow`]).
pub const SLOW: u8 = 64;
/// Flag: the kernel samples the source's new flows ([`crate::meter`]); its live events each
/// stand for [`crate::meter::SAMPLE_ONE_IN`] flows in the flood counts.
pub const SAMPLED: u8 = 128;

/// Everything known about one source. Fixed size: see the `size_of` test.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SourceState {
    /// Which source.
    pub key: SrcKey,
    /// Last event of the source.
    pub last_seen: u64,
    /// Less recently seen neighbour in the LRU list (toward the tail).
    pub older: u32,
    /// More recently seen neighbour in the LRU list (toward the head).
    pub newer: u32,
    /// Per category ([`Category::DETECTED`] order): no new detection before this, in whole
    /// seconds since the epoch modulo 2^16 (holds are shorter than 9 hours; see `held`).
    pub hold_until: [u16; 5],
    /// Index of the profile in the engine's profile table.
    pub profile: u16,
    /// [`OCCUPIED`], [`TOUCHED`].
    pub flags: u8,
    /// Flow samples written to the sample ring in the current target epoch.
    pub samples: u8,
    /// Bit i: category i is held down until `hold_until[i]`.
    pub held: u8,
    /// Flood counters.
    pub flood: TwoEpochs<FloodCounts>,
    /// Per-destination heavy hitters (brute force, port scan, evidence).
    pub targets: SpaceSaving<Target, TARGETS>,
    /// Activity span of `targets` (and `ports`, which moves with it).
    pub tspan: Span,
    /// Destination-port heavy hitters (evidence).
    pub ports: SpaceSaving<PortEntry, PORTS>,
    /// Network-scan counters.
    pub netscan: NetScan,
    /// Spam counters.
    pub spam: Spam,
    /// Spread brute force (with `auth_targets`, `auth_prev_targets`): TCP sessions to
    /// authentication ports that completed the handshake (conntrack `ASSURED`,
    /// `ESTABLISHED`), less those that then lasted longer than `max_flow_duration`; current
    /// and previous epoch of the target table (they roll with it).
    ///
    /// The three fields are 9 bytes, paid for by the spam counters' narrowing to 16 bits and
    /// the byte of padding the struct had: its size is unchanged (496). Separate fields, not a
    /// struct, so that the odd byte fills the padding.
    pub auth_sessions: [u16; 2],
    /// Distinct destinations of the current epoch's sessions: a 32-bit linear-counting
    /// bitmap, which tells up to 32 targets apart (`spread.distinct_targets` ≤ 32).
    pub auth_targets: u32,
    /// ... and of the previous epoch's, folded to 8 bits (only its share still in the
    /// window counts).
    pub auth_prev_targets: u8,
}

impl SourceState {
    /// Forgets every count, sample mark and hold-down of the source: it keeps only its
    /// identity, its place in the table and its flags.
    pub fn start_afresh(&mut self) {
        *self = SourceState {
            key: self.key,
            last_seen: self.last_seen,
            older: self.older,
            newer: self.newer,
            profile: self.profile,
            flags: self.flags,
            ..SourceState::default()
        };
    }

    /// Whether category `i` is held down at `now_ns` (clears an expired hold).
    #[inline]
    pub fn is_held(&mut self, i: usize, now_ns: u64) -> bool {
        if self.held & (1 << i) == 0 {
            return false;
        }
        let now = (now_ns / 1_000_000_000) as u16;
        if (self.hold_until[i].wrapping_sub(now) as i16) > 0 {
            true
        } else {
            self.held &= !(1 << i);
            false
        }
    }

    /// Holds category `i` down for `len_ns` from `now_ns` (at most 9 hours).
    #[inline]
    pub fn hold(&mut self, i: usize, now_ns: u64, len_ns: u64) {
        let until = now_ns
            .saturating_add(len_ns.min(32_000 * 1_000_000_000))
            .div_ceil(1_000_000_000);
        self.hold_until[i] = until as u16;
        self.held |= 1 << i;
    }
}

/// What one flow event means for the counters, decided once per event.
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowFacts {
    /// A new flow attempt.
    pub new: bool,
    /// The first reply of a flow (SYN-ACK, RST, or a reply to a non-TCP flow).
    pub answer: bool,
    /// The destination accepted the flow (SYN-ACK; any reply for non-TCP).
    pub accepted: bool,
    /// TCP.
    pub tcp: bool,
    /// UDP to an amplification port.
    pub amp: bool,
    /// To an authentication port.
    pub auth: bool,
    /// TCP to an SMTP port.
    pub smtp: bool,
    /// A closing event proving the flow lasted longer than the brute-force limit.
    pub long_auth: bool,
    /// A TCP flow to an authentication port completed its handshake, seen live (`ASSURED`,
    /// `ESTABLISHED`): the server answered and the client went on.
    pub session: bool,
    /// The flow was carried through: a TCP handshake completed (`ASSURED`), or the first
    /// reply to a non-TCP flow.
    pub completed: bool,
    /// UDP.
    pub udp: bool,
    /// Destination as bits.
    pub dst: u128,
    /// Destination port.
    pub dport: u16,
    /// Flows this event stands for in the flood counts (0 and 1: itself; a sampled
    /// source's events more).
    pub weight: u32,
}

/// Window lengths (ns) of the categories, in [`Category::DETECTED`] order.
pub type Windows = [u64; 5];

impl SourceState {
    /// Applies one flow event.
    #[inline]
    pub fn on_flow(&mut self, t: u64, f: &FlowFacts, w: &Windows, enabled: u8) {
        let dst_h = hash128(f.dst);
        if enabled & 1 != 0 {
            let c = self.flood.at(t, w[0]);
            let n = f.weight.max(1);
            if f.new {
                c.new = c.new.saturating_add(n);
                c.targets.insert(dst_h);
                if f.tcp {
                    c.syn = c.syn.saturating_add(n);
                }
                if f.amp {
                    c.amp = c.amp.saturating_add(n);
                }
            }
            if f.answer {
                c.answered = c.answered.saturating_add(n);
                if f.tcp {
                    c.syn_answered = c.syn_answered.saturating_add(n);
                }
                if f.amp {
                    c.amp_answered = c.amp_answered.saturating_add(n);
                }
            }
        }
        // Targets and ports feed brute force, port scan and every evidence record.
        let tw = w[2];
        let before = self.targets.epoch;
        self.targets.roll(t, tw, Some(&mut self.tspan));
        let gap = self.targets.epoch.wrapping_sub(before);
        if gap != 0 {
            self.roll_auth(gap);
        }
        self.ports.roll(t, tw, None);
        if f.session {
            self.auth_sessions[0] = self.auth_sessions[0].saturating_add(1);
            self.auth_targets |= 1 << ((dst_h >> 32) % 32);
        }
        if f.long_auth {
            // A long session is not a guess (see the target entry below).
            let s = &mut self.auth_sessions;
            if s[0] > 0 {
                s[0] -= 1;
            } else {
                s[1] = s[1].saturating_sub(1);
            }
        }
        let key = split4(f.dst);
        if f.new {
            let pw = super::sketch::epoch_view(self.targets.epoch, &self.tspan, t, tw).prev_weight;
            let (e, hit) = self.targets.upsert(key, pw);
            e.flows[0] = e.flows[0].saturating_add(1);
            let new_port = e.ports.insert_new(hash16(f.dport));
            if f.auth {
                e.auth[0] = e.auth[0].saturating_add(1);
            }
            // Only a destination seen before gains weight (a further port, a further login
            // attempt): newcomers enter at the floor, so a stream of one-off destinations
            // (a crawler, a resolver re-entering) never raises it above a scanned host.
            if hit {
                let score = u16::from(new_port) + u16::from(f.auth);
                e.score[0] = e.score[0].saturating_add(score);
            }
            if f.accepted {
                e.accepted[0] = e.accepted[0].saturating_add(1);
            }
            let (p, _) = self.ports.upsert(f.dport, pw);
            p.flows[0] = p.flows[0].saturating_add(1);
        } else if (f.accepted || f.long_auth)
            && let Some(e) = self.targets.find(key)
        {
            if f.accepted {
                e.accepted[0] = e.accepted[0].saturating_add(1);
            }
            if f.long_auth {
                // A long session is not a guess: take it back from whichever epoch has it.
                if e.auth[0] > 0 {
                    e.auth[0] -= 1;
                } else {
                    e.auth[1] = e.auth[1].saturating_sub(1);
                }
            }
        }
        if enabled & 8 != 0 {
            let c = self.netscan.at(t, w[3]);
            if f.new {
                c.flows = c.flows.saturating_add(1);
                c.dsts.insert(dst_h);
                c.ports.insert(hash16(f.dport));
            }
            if f.answer {
                c.answered = c.answered.saturating_add(1);
            }
            if f.completed {
                let n = &mut self.netscan.completed[0];
                *n = n.saturating_add(1);
            }
        }
        if enabled & 16 != 0 && f.smtp {
            let c = &mut self.spam;
            c.roll(t, w[4]);
            if f.new {
                c.flows[0] = c.flows[0].saturating_add(1);
                c.dsts.insert(dst_h);
            }
            if f.answer {
                c.answered[0] = c.answered[0].saturating_add(1);
            }
        }
    }

    /// Applies one counter sample.
    #[inline]
    pub fn on_counters(&mut self, t: u64, packets: u64, bytes: u64, interval_ns: u64, w: &Windows) {
        let c = self.flood.at(t, w[0]);
        c.packets = c
            .packets
            .saturating_add(u32::try_from(packets).unwrap_or(u32::MAX));
        c.add_bytes(bytes);
        c.ms =
            c.ms.saturating_add(u32::try_from(interval_ns / 1_000_000).unwrap_or(u32::MAX));
    }
}

/// Estimated network-scan measures of a source at some time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NetScanView {
    /// New flows in the window.
    pub flows: f64,
    /// Flows never answered (a reset is an answer; an ICMP error is not: the kernel ties it
    /// to the flow as RELATED and leaves the flow unreplied).
    pub unanswered: f64,
    /// Flows not carried through: TCP never established, anything else unanswered.
    pub incomplete: f64,
    /// The completed count saturated: too busy a client to tell.
    pub completed_saturated: bool,
    /// Distinct destinations.
    pub dsts: f64,
    /// Distinct destination ports.
    pub ports: f64,
    /// Too many ports to count: no sweep of a few ports.
    pub ports_saturated: bool,
}

/// Estimated flood measures of a source at some time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FloodView {
    /// New flows in the window.
    pub new: f64,
    /// New TCP flows.
    pub syn: f64,
    /// TCP flows never answered.
    pub syn_unanswered: f64,
    /// UDP flows to amplification ports.
    pub amp: f64,
    /// Of those, never answered.
    pub amp_unanswered: f64,
    /// Flows never answered.
    pub unanswered: f64,
    /// Distinct destinations.
    pub targets: f64,
    /// Packets per second from the counters (0 without samples).
    pub pps: f64,
    /// Bits per second from the counters.
    pub bps: f64,
}

impl SourceState {
    /// The flood measures at `t`.
    pub fn flood_view(&self, t: u64, len: u64) -> FloodView {
        let (c, p, pw) = self.flood.view(t, len);
        let s = |a: u32, b: u32| sliding(u64::from(a), u64::from(b), pw);
        let new = s(c.new, p.new);
        let answered = s(c.answered, p.answered);
        let syn = s(c.syn, p.syn);
        let amp = s(c.amp, p.amp);
        let ms = s(c.ms, p.ms);
        let (pps, bps) = if ms > 0.0 {
            (
                s(c.packets, p.packets) * 1000.0 / ms,
                sliding(c.bytes(), p.bytes(), pw) * 8.0 * 1000.0 / ms,
            )
        } else {
            (0.0, 0.0)
        };
        FloodView {
            new,
            syn,
            syn_unanswered: (syn - s(c.syn_answered, p.syn_answered)).max(0.0),
            amp,
            amp_unanswered: (amp - s(c.amp_answered, p.amp_answered)).max(0.0),
            unanswered: (new - answered).max(0.0),
            // Over both epochs (conservative for the "few targets" test).
            targets: c.targets.union(&p.targets).estimate(),
            pps,
            bps,
        }
    }

    /// Network-scan measures at `t`.
    pub fn netscan_view(&self, t: u64, len: u64) -> NetScanView {
        let n = &self.netscan;
        let v = super::sketch::epoch_view(n.epoch, &n.span, t, len);
        let pw = v.prev_weight;
        let (c, pd, pp, pf, pa, pc, cc) = if v.same {
            (
                n.cur,
                n.prev_dsts,
                n.prev_ports,
                n.prev_flows,
                n.prev_answered,
                n.completed[1],
                n.completed[0],
            )
        } else if v.next {
            (
                NetScanCounts::default(),
                n.cur.dsts.fold(),
                n.cur.ports.fold(),
                n.cur.flows,
                n.cur.answered,
                n.completed[0],
                0,
            )
        } else {
            return NetScanView::default();
        };
        let flows = sliding(u64::from(c.flows), u64::from(pf), pw);
        let answered = sliding(u64::from(c.answered), u64::from(pa), pw);
        let completed = sliding(u64::from(cc), u64::from(pc), pw);
        let dsts = sliding_distinct_folded(&c.dsts, &pd, pw);
        let ports = sliding_distinct_folded(&c.ports, &pp, pw);
        let saturated = c.ports.saturated() || c.ports.fold::<1>().union(&pp).zeros() == 0;
        NetScanView {
            flows,
            unanswered: (flows - answered).max(0.0),
            incomplete: (flows - completed).max(0.0),
            completed_saturated: cc == u16::MAX || pc == u16::MAX,
            dsts,
            ports,
            ports_saturated: saturated,
        }
    }

    /// Spam measures at `t`: (flows, answered, distinct destinations).
    pub fn spam_view(&self, t: u64, len: u64) -> (f64, f64, f64) {
        let s = &self.spam;
        let v = super::sketch::epoch_view(s.epoch, &s.span, t, len);
        let pw = v.prev_weight;
        if v.same {
            (
                sliding(u64::from(s.flows[0]), u64::from(s.flows[1]), pw),
                sliding(u64::from(s.answered[0]), u64::from(s.answered[1]), pw),
                sliding_distinct_folded(&s.dsts, &s.prev_dsts, pw),
            )
        } else if v.next {
            (
                sliding(0, u64::from(s.flows[0]), pw),
                sliding(0, u64::from(s.answered[0]), pw),
                sliding_distinct_folded(&Bits::<4>::default(), &s.dsts.fold::<2>(), pw),
            )
        } else {
            (0.0, 0.0, 0.0)
        }
    }

    /// Moves the spread brute-force counters `gap` epochs on.
    #[inline]
    fn roll_auth(&mut self, gap: u32) {
        if gap == 1 {
            self.auth_sessions = [0, self.auth_sessions[0]];
            self.auth_prev_targets = fold8(self.auth_targets);
        } else {
            self.auth_sessions = [0, 0];
            self.auth_prev_targets = 0;
        }
        self.auth_targets = 0;
    }

    /// Spread brute-force measures at `t` (target-table epochs of `len`): (completed short
    /// sessions to authentication ports, their distinct targets, whether the targets'
    /// bitmap is past its reliable range).
    pub fn spread_view(&self, t: u64, len: u64) -> (f64, f64, bool) {
        let v = super::sketch::epoch_view(self.targets.epoch, &self.tspan, t, len);
        let (sc, sp) = shift(self.auth_sessions, &v);
        let lc8 = |b: u8| super::sketch::linear_count(8, b.count_zeros());
        let (targets, saturated) = if v.same {
            // The current epoch at full resolution; the previous one's extra targets at 8
            // bits (as `sliding_distinct_folded`).
            let c = super::sketch::linear_count(32, self.auth_targets.count_zeros());
            let cf = fold8(self.auth_targets);
            let extra = (lc8(cf | self.auth_prev_targets) - lc8(cf)).max(0.0);
            (c + extra * v.prev_weight, c > 32.0)
        } else if v.next {
            (lc8(fold8(self.auth_targets)) * v.prev_weight, false)
        } else {
            (0.0, false)
        };
        (sliding(sc, sp, v.prev_weight), targets, saturated)
    }

    /// The target entries with their measures at `t`: (entry, flows, accepted, auth
    /// attempts, distinct ports), heaviest first.
    pub fn target_views(&self, t: u64, len: u64) -> Vec<(Target, f64, f64, f64, f64)> {
        let mut out: Vec<_> = self
            .targets
            .entries
            .iter()
            .filter(|e| e.occupied())
            .map(|e| target_view(e, self.targets.epoch, &self.tspan, t, len))
            .filter(|v| v.1 > 0.0 || v.3 > 0.0)
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        out
    }

    /// The port entries with their flows in the window at `t`, heaviest first.
    pub fn port_views(&self, t: u64, len: u64) -> Vec<(u16, f64)> {
        // The port table moves with the target table: use its activity span.
        let v = super::sketch::epoch_view(self.ports.epoch, &self.tspan, t, len);
        let mut out: Vec<_> = self
            .ports
            .entries
            .iter()
            .filter(|e| e.occupied())
            .map(|e| {
                // Only what the entry surely saw: its flows less the weight it inherited
                // (in the current epoch; a roll keeps only the sure part, see `roll`).
                let sure = [e.flows[0].saturating_sub(e.err), e.flows[1]];
                let (c, p) = shift(sure, &v);
                (e.port, sliding(c, p, v.prev_weight))
            })
            .filter(|(_, n)| *n > 0.0)
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }
}

/// A 32-bit bitmap folded to 8 bits (bit `h % 8` of bit `h % 32`).
#[inline]
fn fold8(b: u32) -> u8 {
    (b as u8) | ((b >> 8) as u8) | ((b >> 16) as u8) | ((b >> 24) as u8)
}

fn shift(v: [u16; 2], ev: &super::sketch::EpochView) -> (u64, u64) {
    if ev.same {
        (u64::from(v[0]), u64::from(v[1]))
    } else if ev.next {
        (0, u64::from(v[0]))
    } else {
        (0, 0)
    }
}

/// Measures of one target entry at `t`: (entry, flows, accepted, auth, distinct ports).
pub fn target_view(
    e: &Target,
    epoch: u32,
    span: &Span,
    t: u64,
    len: u64,
) -> (Target, f64, f64, f64, f64) {
    let v = super::sketch::epoch_view(epoch, span, t, len);
    let pw = v.prev_weight;
    let (fc, fp) = shift(e.flows, &v);
    let flows = sliding(fc, fp, pw);
    let (ac, ap) = shift(e.accepted, &v);
    let (uc, up) = shift(e.auth, &v);
    let ports = if v.same {
        sliding_distinct_folded(&e.ports, &e.prev_ports, pw)
    } else if v.next {
        sliding_distinct_folded(&Bits::<4>::default(), &e.ports.fold::<2>(), pw)
    } else {
        0.0
    };
    (*e, flows, sliding(ac, ap, pw), sliding(uc, up, pw), ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_state_fits_the_budget() {
        let size = std::mem::size_of::<SourceState>();
        // Per tracked source the engine also holds 8 bytes of index (2 slots of u32 per
        // source), 4 of touch list and 2.5 of sample ring (cap/16 samples of 40 bytes):
        // 496 + 14.5 ≤ 512.
        assert!(size <= 496, "SourceState is {size} bytes");
        // The spread brute-force fields took the spam counters' 8 bytes and the padding byte.
        assert_eq!(size, 496, "SourceState is {size} bytes");
    }

    #[test]
    fn keys_round_trip() {
        for n in ["203.0.113.7/32", "2001:db8:1:2::/64", "2001:db8::7/128"] {
            let net: IpNet = n.parse().unwrap();
            assert_eq!(SrcKey::from_net(&net).net(), net);
        }
    }
}
