//! Detection: turns the observers' [`Observation`]s into [`Detection`]s with [`Evidence`].
//!
//! The [`Engine`] is a pure state machine: time comes only from the observations and from the
//! `now` given to [`Engine::evaluate`]; it never reads the clock, sleeps or does I/O, so unit
//! tests and recorded streams drive it deterministically.
//!
//! For every customer source (an address, or its IPv6 aggregate per
//! `enforcement.ipv6_block_prefix`) it keeps one fixed-size [`source::SourceState`]: per
//! category a two-epoch sliding window (epoch = the category's `window`), linear-counting
//! bitmaps for distinct destinations and ports, and small Space-Saving tables of the heaviest
//! destinations and ports. Sources are capped at `detection.max_sources`; beyond the cap the
//! idlest source is evicted (and counted). Per event nothing allocates: the slab grows to the
//! cap once, the index is sized at creation.
//!
//! The daemon calls:
//!
//! ```text
//! let mut engine = Engine::new(policy);            // Arc<Policy>
//! engine.observe(&observation);                    // for every Observation, in order
//! engine.evaluate(now, &mut detections);           // every detection.evaluation_interval
//! engine.set_policy(new_policy);                   // on reload; keeps the windows
//! engine.stats();                                  // for `status` and metrics
//! ```
//!
//! Windowed counts: each category's state has a current and a previous epoch (epochs are the
//! category's `window`, aligned to multiples of it since the UNIX epoch). The count "in the
//! window" is `cur + prev × w`, where `w` is the share of the previous epoch's *active span*
//! (first to last event, in 1/256 of the epoch) still inside `(now − window, now]`; distinct
//! counts combine the epochs' bitmaps the same way. So a steady rate is measured exactly and
//! an attack that began late in the previous epoch is counted in full (no lag at the epoch
//! boundary). Distinct counts are linear-counting estimates: about ±5–7 % (one standard
//! deviation) around the default thresholds; counts of flows and attempts are exact. The
//! threshold uses the estimates; the evidence of a port scan or brute force reports the
//! exact distinct ports of its destination from an [`exact`] tracker (attached at 8 ports;
//! `distinct_ports_at_least` when it could not be seeded with every earlier port). Top-port
//! counts are Space-Saving counts less their inherited error: never above what was seen.
//!
//! A threshold can only be crossed by an observation (time passing only lowers the windowed
//! counts; counter rates change with the next sample, itself an observation), so `evaluate`
//! looks only at the sources touched since the previous call: a
//! detection comes at the first `evaluate` after the event that crossed the threshold, i.e.
//! within one evaluation interval. After a detection, the source is held down for that
//! category until the category's window has fully rolled over, then re-armed.
//!
//! Holds ([`Engine::on_hold_change`], from the decision task): when a hold begins or is
//! lifted, every tracked source of the target starts afresh (windows, distinct sets and
//! hold-downs cleared; events from before the change not charged; evidence windows begin no
//! earlier). While held, a source's counter samples are not charged: the counting rule comes
//! before the hold's drop. So a hold's own effect is never evidence, and after a reconnect a
//! re-offense is detected within the category's usual latency.
//!
//! What each category looks at (all thresholds from the source's policy profile):
//!
//! | category | fires when (in the category's window) |
//! | --- | --- |
//! | flood | new flows/s ≥ `new_flows_per_sec` or unanswered SYNs/s ≥ `unreplied_syn_per_sec`, to at most `max_targets` destinations; or unanswered UDP flows/s to `amplification_ports` ≥ `amplification_flows_per_sec`; or counter pps ≥ `pps` or bps ≥ `bps` while at least half of the source's new flows went unanswered; or UDP packets/s of unanswered flows after each flow's first ≥ `udp_pps`, or echo requests/s ≥ `icmp_pps` (from the class counters, kept in [`rates`]; evidence `pattern` `udp_flood` / `icmp_flood`) |
//! | brute force | new flows to `ports` of one destination ≥ `attempts`, dominating its traffic (at least half its flows, more attempts than distinct ports, fewer distinct ports than the port-scan threshold; a source crossing port scan in the same evaluation is a port scan) (flows that ended after more than `max_flow_duration` are taken back when the kernel gives flow start times; the per-destination table runs on the port-scan window, and attempts are scaled to the brute-force window when the two differ) |
//! | brute force, `spread` | TCP sessions to `ports` that completed the handshake (`ASSURED`, `ESTABLISHED`) less those that outlasted `max_flow_duration`, all targets together, ≥ `spread.attempts` at ≥ `spread.distinct_targets` targets and ≥ 2 per target (targets from a 32-bit bitmap; past it the source's distinct destinations bound them); a source crossing network scan in the same evaluation is a network scan; evidence `pattern: spread` |
//! | port scan | distinct destination ports of one destination ≥ `distinct_ports`, and the share of its flows it did not accept (no SYN-ACK: unanswered or reset) ≥ `min_unanswered_ratio`; or (`udp_scan`) distinct UDP ports of one destination ≥ `udp_distinct_ports`, counted exactly by its [`exact`] tracker outside the traceroute ranges, its flows ≥ 90 % UDP and unanswered as above |
//! | network scan | distinct destinations ≥ `distinct_destinations` on few ports (distinct ports ≤ ¼ of the destinations), unanswered share ≥ `min_unanswered_ratio`; or (`answered_sweep`) distinct destinations ≥ `answered_distinct_destinations` on few ports, share not carried through ≥ `min_incomplete_ratio`; or (`slow_scan`) the same over `slow.window` ≥ `slow.distinct_destinations`, from a [`slow`] tracker |
//! | spam | distinct destinations of new TCP flows to `ports` (default 25, 465, 587 together) ≥ `distinct_destinations`; the evidence's top ports are the SMTP ports |
//!
//! A flow is *answered* when conntrack reports the first reply: an update with `SEEN_REPLY`,
//! not yet `ASSURED`, in TCP state `SYN_RECV` (SYN-ACK) or `CLOSE` (reset); any such update
//! for other protocols. An ICMP error (a closed UDP port's port-unreachable) is no answer:
//! the kernel ties it to the flow as RELATED and leaves the flow unreplied, with no event.
//! A flow is *carried through* (completed) when its TCP handshake completes (the update to
//! `ESTABLISHED` with `ASSURED`), or when a non-TCP flow is answered; a stateless scanner
//! resets every SYN-ACK, so none of its flows is. A flow from a dump of the table ([`FlowEventKind::Existing`], at start
//! or after [`Observation::Lost`]) counts as new only when the engine may not have seen it:
//! at start when unanswered; after a loss when its kernel start stamp falls in the blind
//! period (from 2 s before the first loss since the previous dump began, see
//! [`Observation::Resynced`]) and it is unanswered (a scan's filtered port: `SYN_SENT` lives
//! 120 s) or a TCP flow reset after an answer (a SYN scan's open port: the scanner resets the
//! SYN-ACK; counted as new and accepted). A scan's closed ports cannot be recovered: when the
//! only reply is a reset the kernel deletes the flow at once. Other answered flows from a
//! dump never count: a busy customer's rates would double. While the source table is full, a
//! dump's flows only reach sources already tracked, except recovered TCP flows (a scanner may
//! have been evicted while its events were lost); an event that records nothing (a destroy, a
//! state change) touches no source.
//!
//! [`FlowEventKind::Existing`]: crate::messages::FlowEventKind::Existing

mod evidence;
pub mod exact;
pub mod index;
pub mod rates;
pub mod ring;
pub mod sketch;
pub mod slow;
pub mod source;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use crate::messages::{
    BlockKind, Category, Counted, CounterSample, Crossed, Detection, Evidence, FlowEvent,
    FlowEventKind, HoldChange, Observation, TcpState, Time, ct_status, proto,
};
use crate::meter::{self, Kind, Meters};
use crate::policy::{Policy, Profile};

use index::{Got, Table};
use ring::{Ring, Sample};
use sketch::Keyed;
use source::{
    EXACT, FRESH, FlowFacts, HELD, HELD_ALL, OCCUPIED, SAMPLED, SLOW, SourceState, SrcKey, TOUCHED,
    Windows, addr_bits, bits_addr, target_view,
};

/// A kernel flood meter's report on a source ([`crate::meter`]).
#[derive(Clone, Copy, Debug)]
struct Hint {
    /// The source (a slot reused by another never inherits the hint).
    key: SrcKey,
    /// The meters' bits ([`Kind::bit`]).
    bits: u64,
    /// When the last one arrived (ns).
    t: u64,
}

/// Sources with a recent meter report at most; a meter trips only for a source that keeps
/// sending above a threshold, so these are floods, never a spoofed storm's one-packet sources.
const MAX_HINTS: usize = 4096;

/// How long a meter's report stands: a single-flow flood's flow is labelled once, and the
/// rest of its flood rule (the unanswered share, the targets) may need a few more events.
const HINT_TTL: u64 = 2_000_000_000;

/// Flow samples attached to one detection's evidence.
pub const SAMPLE_MAX: usize = 8;
/// Destinations and ports listed in one detection's evidence.
pub const TOP_MAX: usize = source::TARGETS;

const PORT_AUTH: u8 = 1;
const PORT_AMP: u8 = 2;
const PORT_SMTP: u8 = 4;

/// A profile prepared for the hot path.
#[derive(Debug)]
struct Prepared {
    name: String,
    profile: Profile,
    /// Window lengths in ns, [`Category::DETECTED`] order.
    windows: Windows,
    /// Bit i: category i enabled.
    enabled: u8,
    /// Bit i: category i's counters kept (`enabled`, and the network-scan counters for
    /// the spread brute-force rule).
    counting: u8,
    /// Per destination port: [`PORT_AUTH`] | [`PORT_AMP`] | [`PORT_SMTP`].
    port_flags: Box<[u8]>,
    /// The slow-scan window in ns; 0 when slow scans are off (or network scans are).
    slow_window: u64,
}

impl Prepared {
    fn new(name: &str, p: &Profile) -> Prepared {
        let mut port_flags = vec![0u8; 65_536].into_boxed_slice();
        for &port in &p.brute_force.ports {
            port_flags[usize::from(port)] |= PORT_AUTH;
        }
        for &port in &p.flood.amplification_ports {
            port_flags[usize::from(port)] |= PORT_AMP;
        }
        for &port in &p.spam.ports {
            port_flags[usize::from(port)] |= PORT_SMTP;
        }
        let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        let mut enabled = 0u8;
        for (i, c) in Category::DETECTED.into_iter().enumerate() {
            if p.enabled(c) {
                enabled |= 1 << i;
            }
        }
        let spread = p.brute_force.enabled && p.brute_force.spread.enabled;
        Prepared {
            name: name.to_owned(),
            profile: p.clone(),
            counting: enabled | if spread { 1 << 3 } else { 0 },
            windows: [
                ns(p.flood.window),
                ns(p.brute_force.window),
                ns(p.port_scan.window),
                ns(p.network_scan.window),
                ns(p.spam.window),
            ],
            enabled,
            port_flags,
            slow_window: if p.network_scan.enabled && p.network_scan.slow.enabled {
                ns(p.network_scan.slow.window)
            } else {
                0
            },
        }
    }
}

/// Counters of the engine, for `status` and metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EngineStats {
    /// Sources tracked now.
    pub tracked_sources: u64,
    /// The cap (`detection.max_sources`).
    pub max_sources: u64,
    /// Sources evicted (idlest first) to stay under the cap, since start.
    pub evictions: u64,
    /// Observations seen.
    pub events: u64,
    /// Flow events from customer sources.
    pub flow_events: u64,
    /// Counter samples from customer sources.
    pub counter_samples: u64,
    /// Observations about addresses that are not customers (ignored).
    pub ignored: u64,
    /// Flows from a dump not counted as new (answered, or started before the blind period).
    pub dumped_flows: u64,
    /// Unanswered flows, and TCP flows reset after an answer, from a dump that started in a
    /// blind period (after a loss) and were counted as new: what the resynchronising dump
    /// recovered of the lost events.
    pub recovered_flows: u64,
    /// Flows from a dump of sources not tracked while the table was full, left untracked so
    /// that no tracked source was evicted for them.
    pub untracked_skipped: u64,
    /// `Lost` observations (the kernel dropped events).
    pub lost: u64,
    /// Detections raised, per category.
    pub detections_by_category: BTreeMap<Category, u64>,
    /// Crossings not reported again because the source was held down for that category.
    pub held_down: u64,
    /// Bytes held by the engine's tables (slab, index, touch list, sample ring).
    pub memory_bytes: u64,
    /// Holds in force that the engine knows of (from the decision task).
    pub holds: u64,
    /// Counter samples of held sources, not charged: they count traffic the hold drops.
    pub held_samples: u64,
    /// Flow events from before their source started afresh (a hold began or was lifted),
    /// and flows of held sources the hold does not let pass (seen before the hold reached
    /// the kernel), not charged.
    pub stale_events: u64,
    /// Flow events carrying a kernel flood meter's label ([`crate::meter`]).
    pub meter_hints: u64,
    /// New flows reported as one sample of [`crate::meter::SAMPLE_ONE_IN`] (and counted
    /// that many times).
    pub sampled_flows: u64,
}

/// The detection engine. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    policy: Arc<Policy>,
    profiles: Vec<Prepared>,
    nets4: Vec<(u32, u32, u16)>,
    nets6: Vec<(u128, u128, u16)>,
    v6_prefix: u8,
    table: Table,
    touched: Vec<u32>,
    ring: Ring,
    now: u64,
    evictions: u64,
    events: u64,
    flow_events: u64,
    counter_samples: u64,
    ignored: u64,
    dumped: u64,
    recovered: u64,
    untracked_skipped: u64,
    lost: u64,
    /// Event time of the last loss (0: none yet).
    lost_at: u64,
    /// Flows a dump shows as started from this event time on may have lost their events
    /// (0: nothing lost since the last dump).
    blind_from: u64,
    held_down: u64,
    detections: [u64; 5],
    /// Holds in force (target → since in ns, kind), as the decision task reported them.
    holds: HashMap<IpNet, (u64, BlockKind)>,
    /// The walled garden: where a quarantined source's flows may still go.
    garden: Vec<IpNet>,
    /// Prefix lengths present in `holds`: bit n of `[v4, v6]` for a /n.
    hold_lens: [u128; 2],
    /// Sources that started afresh recently (slot → time, ns; flag [`FRESH`]): their events
    /// from before that time are not charged and their evidence windows start no earlier.
    /// Bounded by the holds begun and lifted within the longest window.
    fresh: HashMap<u32, u64>,
    /// The kernel's flood meters as the policy builds them.
    meters: Meters,
    /// Sources a kernel meter reported recently (slot → hint), at most [`MAX_HINTS`].
    hints: HashMap<u32, Hint>,
    /// A hint arrived since the last evaluation: evaluate now, not at the next tick.
    urgent: bool,
    meter_hints: u64,
    sampled_flows: u64,
    held_samples: u64,
    stale_events: u64,
    /// Exact port sets of the destinations that look scanned (evidence).
    exact: exact::Pool,
    /// Unanswered-UDP and echo-request rates of the few sources sending them fast.
    rates: rates::Pool,
    /// Long-window counts of the sources that sweep (slow scans).
    slow: slow::Pool,
}

/// The [`HELD_ALL`] flag of a hold of `kind`.
fn held_all(kind: BlockKind) -> u8 {
    if kind == BlockKind::Quarantine {
        0
    } else {
        HELD_ALL
    }
}

/// How far before a loss a dumped flow may have started and still count as new: the events
/// of the moments before the kernel reported the overflow went with it.
const LOSS_LOOKBACK: u64 = 2_000_000_000;

fn mask4(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    }
}

fn mask6(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len.min(128)))
    }
}

impl Engine {
    /// An engine for `policy`, with no state.
    pub fn new(policy: Arc<Policy>) -> Engine {
        let cap = policy.detection.max_sources as usize;
        let mut e = Engine {
            profiles: Vec::new(),
            nets4: Vec::new(),
            nets6: Vec::new(),
            v6_prefix: policy.enforcement.ipv6_block_prefix,
            table: Table::new(cap),
            touched: Vec::new(),
            ring: Ring::new((cap / 16).clamp(1024, 16_384)),
            now: 0,
            evictions: 0,
            events: 0,
            flow_events: 0,
            counter_samples: 0,
            ignored: 0,
            dumped: 0,
            recovered: 0,
            untracked_skipped: 0,
            lost: 0,
            lost_at: 0,
            blind_from: 0,
            held_down: 0,
            detections: [0; 5],
            holds: HashMap::new(),
            garden: Vec::new(),
            hold_lens: [0; 2],
            fresh: HashMap::new(),
            held_samples: 0,
            stale_events: 0,
            exact: exact::Pool::default(),
            rates: rates::Pool::default(),
            slow: slow::Pool::default(),
            meters: Meters::of_policy(&policy),
            hints: HashMap::new(),
            urgent: false,
            meter_hints: 0,
            sampled_flows: 0,
            policy,
        };
        e.prepare();
        e
    }

    /// The policy in force.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    fn prepare(&mut self) {
        let p = &self.policy;
        self.profiles = p
            .profiles
            .iter()
            .map(|(name, prof)| Prepared::new(name, prof))
            .collect();
        let idx = |name: &str| -> u16 {
            self.profiles
                .iter()
                .position(|q| q.name == name)
                .unwrap_or(0) as u16
        };
        // `networks` is most specific first: the first match wins, as in `Policy::network_of`.
        self.nets4 = Vec::new();
        self.nets6 = Vec::new();
        for n in &p.networks {
            match n.prefix {
                IpNet::V4(v4) => {
                    let m = mask4(v4.prefix_len());
                    self.nets4
                        .push((u32::from(v4.network()) & m, m, idx(&n.profile)));
                }
                IpNet::V6(v6) => {
                    let m = mask6(v6.prefix_len());
                    self.nets6
                        .push((u128::from(v6.network()) & m, m, idx(&n.profile)));
                }
            }
        }
        self.v6_prefix = p.enforcement.ipv6_block_prefix;
        self.garden = p.enforcement.walled_garden.clone();
    }

    /// The profile index and the source key of a customer address.
    #[inline]
    fn customer(&self, addr: IpAddr) -> Option<(u16, SrcKey)> {
        match addr {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                let &(_, _, p) = self.nets4.iter().find(|(n, m, _)| a & m == *n)?;
                Some((
                    p,
                    SrcKey {
                        addr: source::split4(u128::from(a)),
                        len: 32,
                        v6: false,
                    },
                ))
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                let &(_, _, p) = self.nets6.iter().find(|(n, m, _)| a & m == *n)?;
                Some((
                    p,
                    SrcKey {
                        addr: source::split4(a & mask6(self.v6_prefix)),
                        len: self.v6_prefix,
                        v6: true,
                    },
                ))
            }
        }
    }

    /// The slot of a customer source, tracking it when new.
    #[inline]
    fn slot_of(&mut self, key: &SrcKey, profile: u16, t: u64) -> u32 {
        let slot = match self.table.get_or_insert(key) {
            Got::Found(s) => s,
            Got::New(s) => {
                self.init_slot(s, profile, t);
                s
            }
            Got::Evicted(s) => {
                self.evictions += 1;
                self.init_slot(s, profile, t);
                s
            }
        };
        let st = &mut self.table.slots[slot as usize];
        st.last_seen = st.last_seen.max(t);
        if st.flags & TOUCHED == 0 {
            st.flags |= TOUCHED;
            if self.touched.len() == self.touched.capacity() {
                // Each slot is listed at most once: never grow past the cap.
                let cap = self.table.cap();
                let add = self.touched.len().max(64).min(cap - self.touched.len());
                self.touched.reserve_exact(add.max(1));
            }
            self.touched.push(slot);
        }
        slot
    }

    fn init_slot(&mut self, s: u32, profile: u16, t: u64) {
        if !self.fresh.is_empty() {
            // A recycled slot: its previous source's reset time is not this one's.
            self.fresh.remove(&s);
        }
        if self.table.slots[s as usize].flags & EXACT != 0 {
            self.exact.drop_slot(s);
        }
        if !self.slow.is_empty() {
            self.slow.drop_slot(s);
            self.table.slots[s as usize].flags &= !SLOW;
        }
        let held = self.hold_covering(&self.table.slots[s as usize].key);
        let st = &mut self.table.slots[s as usize];
        st.profile = profile;
        st.last_seen = t;
        if let Some((since, kind)) = held {
            // A held source seen anew: charged only from the hold's start, like one tracked
            // when the hold began.
            st.flags |= HELD | FRESH | held_all(kind);
            self.fresh.insert(s, since.max(1));
        }
    }

    /// The hold in force that covers the whole of source `key`, if any: since, kind.
    fn hold_covering(&self, key: &SrcKey) -> Option<(u64, BlockKind)> {
        let lens = self.hold_lens[usize::from(key.v6)];
        if lens == 0 {
            return None;
        }
        let net = key.net();
        (0..=key.len)
            .rev()
            .filter(|&l| lens & (1u128 << l) != 0)
            .find_map(|l| {
                let n = IpNet::new(net.addr(), l).ok()?.trunc();
                self.holds.get(&n).copied()
            })
    }

    /// Takes in a hold that began or was lifted (from the decision task). Either way every
    /// tracked source inside (or containing) the target starts afresh at once: its windows,
    /// distinct sets and per-category hold-downs are cleared, and its events from before the
    /// change are not charged. So a hold's own effect is never new evidence (what it drops
    /// still passes the counter rule, and the flows of the moments before it are what the
    /// first offense was for), and after a reconnect or an unblock a re-offense is detected
    /// within the category's normal latency instead of after its window. While held, a
    /// source's counter samples are not charged at all; its new flows are (the kernel reports
    /// only flows whose first packet passed the router: for a quarantine, those to the walled
    /// garden). Dry-run holds drop nothing and are not reported here.
    pub fn on_hold_change(&mut self, change: &HoldChange) {
        let (target, at, held) = match *change {
            HoldChange::Held {
                target,
                since,
                kind,
            } => (target, since.as_nanos(), Some(kind)),
            HoldChange::Lifted { target, time } => (target, time.as_nanos(), None),
        };
        let target = target.trunc();
        let fam = usize::from(matches!(target, IpNet::V6(_)));
        if let Some(kind) = held {
            self.holds.insert(target, (at, kind));
            self.hold_lens[fam] |= 1u128 << target.prefix_len();
        } else if self.holds.remove(&target).is_some() {
            let len = target.prefix_len();
            if !self
                .holds
                .keys()
                .any(|n| n.prefix_len() == len && matches!(n, IpNet::V6(_)) == (fam == 1))
            {
                self.hold_lens[fam] &= !(1u128 << len);
            }
        }
        let slots: Vec<u32> = self.table.occupied().collect();
        for s in slots {
            let key = self.table.slots[s as usize].key;
            let net = key.net();
            if !(target.contains(&net) || net.contains(&target)) {
                continue;
            }
            let covered = self
                .hold_covering(&key)
                .map_or(0, |(_, kind)| HELD | held_all(kind));
            self.exact.drop_slot(s);
            self.rates.drop_slot(s);
            self.slow.drop_slot(s);
            // A meter's report from before is the first offense's, or the old hold's.
            self.hints.remove(&s);
            let st = &mut self.table.slots[s as usize];
            st.start_afresh();
            st.flags = (st.flags & !(HELD | HELD_ALL | EXACT | SLOW)) | covered | FRESH;
            self.fresh.insert(s, at.max(1));
        }
    }

    /// Keeps the exact port set of (source, destination) of a new flow, attaching one when
    /// the destination reaches [`exact::ATTACH_AT`] distinct ports.
    #[inline]
    fn exact_ports(&mut self, slot: u32, f: &FlowFacts, tw: u64) {
        let st = &self.table.slots[slot as usize];
        let dst = source::split4(f.dst);
        let epoch = st.targets.epoch;
        if st.flags & EXACT != 0
            && let Some(tr) = self.exact.get_mut(slot, dst)
        {
            tr.insert(epoch, f.dport);
            tr.note_flow(epoch, f.udp);
            return;
        }
        let Some(e) = st
            .targets
            .entries
            .iter()
            .find(|e| e.occupied() && e.addr == dst)
        else {
            return;
        };
        let ones = 128 - e.ports.zeros();
        if ones != exact::ATTACH_AT {
            return;
        }
        // Seed with this destination's ports in the source's samples of both epochs.
        let since = u64::from(epoch.saturating_sub(1)).saturating_mul(tw);
        let mut seed = vec![f.dport];
        self.ring
            .ports_to(st.key.hash() | 1, source::split(f.dst), since, &mut seed);
        let complete = seed.len() as u32 >= ones;
        self.exact.attach(slot, dst, epoch, &seed, complete);
        if let Some(tr) = self.exact.get_mut(slot, dst) {
            tr.note_flow(epoch, f.udp);
        }
        self.table.slots[slot as usize].flags |= EXACT;
    }

    /// The time source `slot` started afresh, if recently.
    #[inline]
    fn fresh_at(&self, slot: u32) -> Option<u64> {
        if self.table.slots[slot as usize].flags & FRESH == 0 {
            return None;
        }
        self.fresh.get(&slot).copied()
    }

    /// Forgets the reset times older than the longest window: no window reaches back to them.
    fn prune_fresh(&mut self, now: u64) {
        if self.fresh.is_empty() {
            return;
        }
        let longest = self
            .profiles
            .iter()
            .flat_map(|p| p.windows)
            .max()
            .unwrap_or(0);
        let slots = &mut self.table.slots;
        self.fresh.retain(|&s, &mut at| {
            let keep = now.saturating_sub(at) <= longest.saturating_mul(2);
            if !keep && let Some(st) = slots.get_mut(s as usize) {
                st.flags &= !FRESH;
            }
            keep
        });
    }

    /// Takes one observation into account. Allocation-free once the source table has grown
    /// to its cap.
    pub fn observe(&mut self, obs: &Observation) {
        self.events += 1;
        let t = obs.time().as_nanos();
        self.now = self.now.max(t);
        match obs {
            Observation::Flow(e) => self.on_flow(e),
            Observation::Counters(c) => {
                let Some((profile, key)) = self.customer(c.addr) else {
                    self.ignored += 1;
                    return;
                };
                if self.profiles[usize::from(profile)].enabled & 1 == 0 {
                    return;
                }
                self.counter_samples += 1;
                let w = self.profiles[usize::from(profile)].windows;
                let slot = self.slot_of(&key, profile, t);
                if self.table.slots[slot as usize].flags & HELD != 0 {
                    // Counted by the rule before the hold's drop: what the hold drops.
                    self.held_samples += 1;
                    return;
                }
                if self.fresh_at(slot).is_some_and(|at| c.time.as_nanos() < at) {
                    self.stale_events += 1;
                    return;
                }
                self.table.slots[slot as usize].on_counters(
                    c.time.as_nanos(),
                    c.packets,
                    c.bytes,
                    c.interval_ns,
                    &w,
                );
                if c.udp_packets > 0 || c.echo_packets > 0 {
                    self.charge_rates(slot, &key, profile, c);
                }
            }
            Observation::Tick { .. } => {}
            Observation::Lost { time } => {
                self.lost += 1;
                self.lost_at = time.as_nanos();
                if self.blind_from == 0 {
                    self.blind_from = self.lost_at.saturating_sub(LOSS_LOOKBACK).max(1);
                }
            }
            Observation::Resynced { started, .. } => {
                // The dump held every flow alive when it started. Losses during it leave a
                // blind period from then on; otherwise the next dump's flows were seen live.
                let started = started.as_nanos();
                self.blind_from = if self.lost_at >= started {
                    started.saturating_sub(LOSS_LOOKBACK).max(1)
                } else {
                    0
                };
            }
        }
    }

    #[inline]
    fn on_flow(&mut self, e: &FlowEvent) {
        let Some((profile, key)) = self.customer(e.src) else {
            self.ignored += 1;
            return;
        };
        if e.src.is_ipv4() != e.dst.is_ipv4() {
            self.ignored += 1;
            return;
        }
        self.flow_events += 1;
        let t = e.time.as_nanos();
        let prep = &self.profiles[usize::from(profile)];
        let seen_reply = e.status & ct_status::SEEN_REPLY != 0;
        let assured = e.status & ct_status::ASSURED != 0;
        let tcp = e.proto == proto::TCP;
        let udp = e.proto == proto::UDP;
        let pf = if tcp || udp {
            prep.port_flags[usize::from(e.dport)]
        } else {
            0
        };
        let mut f = FlowFacts {
            tcp,
            udp,
            amp: udp && pf & PORT_AMP != 0,
            auth: pf & PORT_AUTH != 0,
            smtp: tcp && pf & PORT_SMTP != 0,
            dst: addr_bits(e.dst),
            dport: e.dport,
            ..FlowFacts::default()
        };
        let mut recovered = false;
        match e.kind {
            FlowEventKind::New => f.new = true,
            FlowEventKind::Existing => {
                // A flow from a dump. At start, with no loss yet, an unanswered one counts as
                // new (an attack in progress when the agent starts). After a loss, a flow the
                // kernel stamps as started in the blind period (from `LOSS_LOOKBACK` before
                // the first loss since the previous dump began) counts as new when it is
                // unanswered (a filtered port), or a TCP flow reset after an answer (an open
                // port of a SYN scan; a reset as the only reply deletes the flow, so closed
                // ports are never in a dump): its own events may have gone with the overflow,
                // and the dump is all there is of it; without a start stamp only an unanswered
                // one does. Nothing else from a dump counts: an answered flow may have been
                // seen live already, and counting it twice would inflate a busy customer's
                // rates (a false flood).
                let reset = tcp && seen_reply && e.tcp_state == Some(TcpState::Close);
                let blind = match e.start {
                    _ if self.lost == 0 => !seen_reply,
                    _ if self.blind_from == 0 => false,
                    Some(s) => s.as_nanos() >= self.blind_from,
                    None => !seen_reply,
                };
                if blind && (!seen_reply || reset) {
                    recovered = self.lost > 0;
                    f.new = true;
                    f.answer = reset;
                    f.accepted = reset;
                } else {
                    self.dumped += 1;
                    // A carried-through flow from a dump counts as completed (never as new):
                    // its ASSURED event may have gone with a loss, and a busy client whose
                    // completions were lost must not look like an answered sweep. Counted
                    // twice when the event was seen live, which only errs toward no sweep.
                    f.completed = seen_reply && (!tcp || assured);
                }
            }
            FlowEventKind::Update => {
                if seen_reply && !assured {
                    match (tcp, e.tcp_state) {
                        (true, Some(TcpState::SynRecv)) => {
                            f.answer = true;
                            f.accepted = true;
                        }
                        (true, Some(TcpState::Close)) => f.answer = true,
                        (true, _) => {}
                        (false, _) => {
                            f.answer = true;
                            f.accepted = true;
                            // A reply is all a non-TCP flow has of a handshake.
                            f.completed = true;
                        }
                    }
                }
                // The handshake completed: the source carried the flow through (a stateless
                // scanner resets the SYN-ACK instead). The kernel reports ASSURED once, with
                // the move to ESTABLISHED.
                f.completed |=
                    tcp && seen_reply && assured && e.tcp_state == Some(TcpState::Established);
                if tcp && f.auth {
                    // A session is the live handshake only: a dump's carried-through flow
                    // counts as completed but may have been seen live, and a second count
                    // would make one long ssh session look like many.
                    f.session = f.completed;
                    let closing = matches!(e.tcp_state, Some(TcpState::TimeWait))
                        || (assured && matches!(e.tcp_state, Some(TcpState::Close)));
                    if let (true, Some(start)) = (closing, e.start) {
                        let max = prep.profile.brute_force.max_flow_duration;
                        f.long_auth = e.time.since(start) > max;
                    }
                }
            }
            FlowEventKind::Destroy => {}
        }
        // A meter's label is news on a live event only: a dump lists the labels of flows
        // labelled long ago (a flood before the agent restarted, or before a hold).
        let metered = if e.kind == FlowEventKind::Existing {
            0
        } else {
            e.labels & meter::METER_BITS
        };
        if !(f.new || f.answer || f.accepted || f.long_auth || f.completed) && metered == 0 {
            // A destroy, a state change or a flow already counted records nothing: it neither
            // touches a tracked source nor starts tracking one (which would evict a source
            // that matters: in a spoofed storm every source's DESTROY comes back a second
            // after its NEW).
            return;
        }
        if e.kind == FlowEventKind::Existing
            && !(recovered && tcp)
            && self.table.len() >= self.table.cap()
            && self.table.get(&key).is_none()
        {
            // A dump's flows are no reason to evict a live source: a dump during a spoofed
            // storm is a table full of one-off sources. The exception: TCP flows of the blind
            // period, a scan's probes, whose source may have been evicted by that storm while
            // its events were lost; they are what a dump is for.
            self.untracked_skipped += 1;
            return;
        }
        if recovered {
            self.recovered += 1;
        }
        let windows = prep.windows;
        let enabled = prep.counting;
        let slot = self.slot_of(&key, profile, t);
        if self.fresh_at(slot).is_some_and(|at| t < at) {
            // From before the source started afresh (queued while the hold began or ended).
            self.stale_events += 1;
            return;
        }
        let flags = self.table.slots[slot as usize].flags;
        if flags & HELD != 0
            && (flags & HELD_ALL != 0 || !self.garden.iter().any(|g| g.contains(&e.dst)))
        {
            // A flow the hold does not let pass, so it passed before the hold reached the
            // kernel (the decision is a few hundred ms ahead of the drop): the first
            // offense's traffic, not a new one.
            self.stale_events += 1;
            return;
        }
        if metered != 0 {
            self.meter_hint(slot, key, metered, t);
            if !(f.new || f.answer || f.accepted || f.long_auth || f.completed) {
                return;
            }
        }
        let st = &mut self.table.slots[slot as usize];
        // Sampling: a new flow carries the sampling label when its source is sampled, and
        // while it is, every event of the source is one of a sampled flow (the others report
        // nothing); a dump lists every flow, sampled or not.
        match e.kind {
            FlowEventKind::New if e.labels & meter::SAMPLED_BIT != 0 => {
                st.flags |= SAMPLED;
                self.sampled_flows += 1;
            }
            FlowEventKind::New => st.flags &= !SAMPLED,
            _ => {}
        }
        if st.flags & SAMPLED != 0 && e.kind != FlowEventKind::Existing {
            f.weight = meter::SAMPLE_ONE_IN;
        }
        // (Were the networks of one IPv6 aggregate under different profiles, the profile of
        // the address that first created the source applies; windows are those of the
        // profile of this event, which is the same in every sane policy.)
        let epoch = st.targets.epoch;
        st.on_flow(t, &f, &windows, enabled);
        if st.targets.epoch != epoch {
            st.samples = 0;
        }
        if st.flags & SLOW != 0
            && let Some(tr) = self.slow.get_mut(slot)
        {
            let len = self.profiles[usize::from(profile)].slow_window.max(1);
            let new = f
                .new
                .then(|| (sketch::hash128(f.dst), sketch::hash16(f.dport)));
            tr.on_flow(t, len, new, f.completed);
        }
        if f.new {
            self.exact_ports(slot, &f, windows[2]);
        }
        let st = &mut self.table.slots[slot as usize];
        if (f.new || f.answer) && st.samples < ring::PER_SOURCE_EPOCH {
            st.samples += 1;
            self.ring.push(Sample {
                source: key.hash() | 1,
                time: t,
                dst: source::split(f.dst),
                sport: e.sport,
                dport: e.dport,
                proto: e.proto,
                flags: u8::from(f.answer) | (u8::from(e.dst.is_ipv6()) << 1),
            });
        }
    }

    /// Charges a sample's unanswered-UDP and echo-request packets to the source's rate
    /// tracker ([`rates`]), attaching one when the sample is fast enough to matter.
    fn charge_rates(&mut self, slot: u32, key: &SrcKey, profile: u16, c: &CounterSample) {
        let prep = &self.profiles[usize::from(profile)];
        let f = &prep.profile.flood;
        let secs = (c.interval_ns as f64 / 1e9).max(1e-3);
        let share = rates::ATTACH_SHARE;
        // An IPv6 aggregate's addresses each have their own sample: rotating addresses must
        // not keep every one below the share.
        let attach = (key.v6 && key.len < 128)
            || c.udp_packets as f64 / secs >= f.udp_pps as f64 * share
            || c.echo_packets as f64 / secs >= f.icmp_pps as f64 * share;
        let charge = rates::Charge {
            t: c.time.as_nanos(),
            udp: c.udp_packets,
            echo: c.echo_packets,
            interval_ns: c.interval_ns,
            attach,
        };
        self.rates.charge(slot, key, charge, prep.windows[0]);
    }

    /// [`check`], and for a flood the rates of unanswered UDP and echo requests and the
    /// kernel meters' reports too.
    fn check_source(
        &self,
        c: Category,
        slot: u32,
        st: &SourceState,
        prep: &Prepared,
        now: u64,
    ) -> Option<Finding> {
        let found = check(c, st, prep, now);
        if c != Category::Flood {
            return found;
        }
        let found = self.check_rates(slot, st, prep, now, found);
        self.check_meters(slot, st, prep, now, found)
    }

    /// The flood rule with the class counters' rates: `flood.udp_pps`, `flood.icmp_pps`.
    fn check_rates(
        &self,
        slot: u32,
        st: &SourceState,
        prep: &Prepared,
        now: u64,
        found: Option<Finding>,
    ) -> Option<Finding> {
        let Some(r) = self.rates.view(slot, &st.key, now, prep.windows[0]) else {
            return found;
        };
        let f = &prep.profile.flood;
        // The kernel counts UDP packets of unanswered flows after each flow's first one
        // (the layout's `ct status confirmed`): a resolver's queries are not in it.
        let udp = r.udp_pps;
        let c_udp = udp >= f.udp_pps as f64;
        let c_icmp = r.echo_pps >= f.icmp_pps as f64;
        if !(c_udp || c_icmp) {
            return found;
        }
        let mut finding = found.unwrap_or_else(|| flood_finding(st, prep, now));
        // The class counters name the flood: a ping flood before a UDP one.
        finding.pattern = Some(if c_icmp { "icmp_flood" } else { "udp_flood" });
        if c_udp {
            finding
                .crossed
                .push(crossed("udp_pps", udp, f.udp_pps as f64));
        }
        if c_icmp {
            finding
                .crossed
                .push(crossed("icmp_pps", r.echo_pps, f.icmp_pps as f64));
        }
        finding.counts.push(("udp_pps", udp));
        finding.counts.push(("icmp_pps", r.echo_pps));
        Some(finding)
    }

    /// The flood rule with the kernel meters' reports ([`crate::meter`]): a meter at the
    /// profile's threshold tripped (the source sent above it for longer than
    /// `detection.flood_tolerance` allows at twice the rate), and what the meter cannot see
    /// holds too: for `pps`/`bps` at least half the source's new flows unanswered, for new
    /// flows few targets, for SYNs few targets and at least half of them unanswered.
    fn check_meters(
        &self,
        slot: u32,
        st: &SourceState,
        prep: &Prepared,
        now: u64,
        found: Option<Finding>,
    ) -> Option<Finding> {
        let Some(h) = self
            .hints
            .get(&slot)
            .filter(|h| h.key == st.key && now.saturating_sub(h.t) <= HINT_TTL)
        else {
            return found;
        };
        let f = &prep.profile.flood;
        let v = st.flood_view(now, prep.windows[0]);
        let few = v.targets.round() <= f64::from(f.max_targets);
        let unanswered = v.unanswered >= 1.0 && v.unanswered * 2.0 >= v.new;
        let scanning = || scan_shaped(st, prep, now);
        let mut hit = Vec::new();
        for kind in Kind::ALL {
            let threshold = kind.threshold(f);
            if h.bits & kind.bit() == 0 || !self.meters.serves(kind, threshold) {
                continue;
            }
            let rest = match kind {
                Kind::Pps | Kind::Bps => unanswered,
                Kind::Udp | Kind::Echo => true,
                Kind::NewFlows => few && !scanning(),
                Kind::Syn => few && v.syn > 0.0 && v.syn_unanswered * 2.0 >= v.syn && !scanning(),
            };
            if rest {
                hit.push(kind);
            }
        }
        if hit.is_empty() {
            return found;
        }
        let mut finding = found.unwrap_or_else(|| flood_finding(st, prep, now));
        for kind in hit {
            if finding.crossed.iter().any(|x| x.signal == kind.key()) {
                continue;
            }
            // The meter tells "above the threshold", not by how much: the threshold is the
            // value, a lower bound, where the counters have no higher one yet.
            let t = kind.threshold(f) as f64;
            finding.crossed.push(crossed(kind.key(), t, t));
            match finding.counts.iter_mut().find(|(k, _)| *k == kind.key()) {
                Some((_, v)) => *v = v.max(t),
                None => finding.counts.push((kind.key(), t)),
            }
            if finding.pattern.is_none() {
                finding.pattern = match kind {
                    Kind::Udp => Some("udp_flood"),
                    Kind::Echo => Some("icmp_flood"),
                    _ => None,
                };
            }
        }
        finding.counts.push(("kernel_meter", 1.0));
        Some(finding)
    }

    /// Records a kernel meter's report on a source and asks for an evaluation now.
    fn meter_hint(&mut self, slot: u32, key: SrcKey, bits: u64, t: u64) {
        self.meter_hints += 1;
        if self.hints.len() >= MAX_HINTS && !self.hints.contains_key(&slot) {
            let now = self.now;
            self.hints
                .retain(|_, h| now.saturating_sub(h.t) <= HINT_TTL);
            if self.hints.len() >= MAX_HINTS {
                return;
            }
        }
        let h = self.hints.entry(slot).or_insert(Hint { key, bits: 0, t });
        if h.key != key {
            *h = Hint { key, bits: 0, t };
        }
        h.bits |= bits;
        h.t = h.t.max(t);
        self.urgent = true;
    }

    /// Whether a kernel meter reported a source since the last call: the caller evaluates
    /// at once instead of at the next tick.
    pub fn take_urgent(&mut self) -> bool {
        std::mem::take(&mut self.urgent)
    }

    /// Evaluates every source that saw events since the last call, at `now`, and appends
    /// the detections to `out`. Call it every `detection.evaluation_interval`.
    pub fn evaluate(&mut self, now: Time, out: &mut Vec<Detection>) {
        let now = now.as_nanos().max(self.now);
        self.now = now;
        let touched = std::mem::take(&mut self.touched);
        for &slot in &touched {
            let st = &mut self.table.slots[slot as usize];
            if st.flags & TOUCHED == 0 {
                continue;
            }
            st.flags &= !TOUCHED;
            if st.flags & OCCUPIED == 0 {
                continue;
            }
            self.evaluate_slot(slot, now, out);
        }
        self.touched = touched;
        self.touched.clear();
        self.prune_fresh(now);
        if !self.hints.is_empty() {
            self.hints
                .retain(|_, h| now.saturating_sub(h.t) <= HINT_TTL);
        }
    }

    fn evaluate_slot(&mut self, slot: u32, now: u64, out: &mut Vec<Detection>) {
        self.evaluate_categories(slot, now, out, u8::MAX);
        self.slow_gate(slot, now);
    }

    /// Evaluates the categories of `mask` (bit i: [`Category::DETECTED`]`[i]`) for a slot.
    fn evaluate_categories(&mut self, slot: u32, now: u64, out: &mut Vec<Detection>, mask: u8) {
        let st = self.table.slots[slot as usize];
        let Some(prep) = self.profiles.get(usize::from(st.profile)) else {
            return;
        };
        for (i, c) in Category::DETECTED.into_iter().enumerate() {
            if prep.enabled & mask & (1 << i) == 0 {
                continue;
            }
            let Some(finding) = self
                .check_source(c, slot, &st, prep, now)
                .or_else(|| self.check_tracked(c, slot, &st, prep, now))
            else {
                continue;
            };
            // A source that crosses both in one evaluation is scanning: its authentication
            // attempts are part of the sweep, not a login attack.
            if c == Category::BruteForce
                && prep.enabled & (1 << 2) != 0
                && check(Category::PortScan, &st, prep, now).is_some()
            {
                continue;
            }
            // Likewise a spread brute force that is also a network scan is the scan.
            if finding.pattern == Some("spread")
                && prep.enabled & (1 << 3) != 0
                && check(Category::NetworkScan, &st, prep, now).is_some()
            {
                continue;
            }
            if self.table.slots[slot as usize].is_held(i, now) {
                self.held_down += 1;
                continue;
            }
            // A slow scan's evidence covers its long window (from shortly before the tracker
            // was attached), and it is held down as long: the next hour's sweep is news.
            let (window, fresh) = match (finding.pattern, self.slow.get(slot)) {
                (Some(PATTERN_SLOW), Some(tr)) => {
                    (prep.slow_window, tr.since.saturating_sub(prep.windows[3]))
                }
                _ => (prep.windows[i], 0),
            };
            self.table.slots[slot as usize].hold(i, now, window);
            self.detections[i] += 1;
            let fresh = self.fresh_at(slot).unwrap_or(0).max(fresh);
            let mut det =
                self.detection(&st, prep, c, finding, now, window.min(now - fresh.min(now)));
            self.exact_evidence(slot, &st, prep, &mut det, now);
            out.push(det);
        }
    }

    /// Evaluates the flood rule of the sources a kernel meter reported since the last call
    /// (see [`Engine::take_urgent`]), at `now`: a flood is decided on the report, the other
    /// categories wait for [`Engine::evaluate`] (a scan's evidence then covers what it sent
    /// until the evaluation, as without meters).
    pub fn evaluate_floods(&mut self, now: Time, out: &mut Vec<Detection>) {
        let now = now.as_nanos().max(self.now);
        self.now = now;
        let slots: Vec<u32> = self
            .hints
            .iter()
            .filter(|(_, h)| now.saturating_sub(h.t) <= HINT_TTL)
            .map(|(s, _)| *s)
            .collect();
        for slot in slots {
            let st = &self.table.slots[slot as usize];
            if st.flags & OCCUPIED == 0 || self.hints.get(&slot).is_none_or(|h| h.key != st.key) {
                continue;
            }
            self.evaluate_categories(slot, now, out, 1);
        }
    }

    /// Attaches a slow-scan tracker to a source whose network-scan window shows the start
    /// of a sweep (see [`slow`]).
    fn slow_gate(&mut self, slot: u32, now: u64) {
        let st = &self.table.slots[slot as usize];
        if st.flags & SLOW != 0 {
            return;
        }
        let Some(prep) = self.profiles.get(usize::from(st.profile)) else {
            return;
        };
        if prep.slow_window == 0 || prep.enabled & (1 << 3) == 0 {
            return;
        }
        let n = &st.netscan;
        if u64::from(n.cur.flows) + u64::from(n.prev_flows) < slow::ATTACH_AT as u64 {
            // Too few flows for the gate (the window's count is at most their sum).
            return;
        }
        let v = st.netscan_view(now, prep.windows[3]);
        let dsts = v.dsts.round();
        let ratio = if v.flows > 0.0 {
            v.incomplete / v.flows
        } else {
            0.0
        };
        if dsts < slow::ATTACH_AT
            || v.ports_saturated
            || v.ports.round() * 4.0 > dsts
            || v.completed_saturated
            || ratio < prep.profile.network_scan.min_incomplete_ratio
        {
            return;
        }
        // Seed with the network-scan window's current epoch (the same hashes).
        let n = &st.netscan;
        let cur = sketch::epoch_of(now, prep.windows[3]) == n.epoch;
        let mut seed = slow::Tracker::default();
        if cur {
            seed.dsts[0] = n.cur.dsts;
            seed.ports[0] = n.cur.ports;
            seed.flows[0] = n.cur.flows;
            seed.completed[0] = u32::from(n.completed[0]);
        }
        let len = prep.slow_window;
        match self.slow.attach(slot, now, len, &seed) {
            slow::Attached::Full => return,
            slow::Attached::Replaced(old) => {
                if let Some(x) = self.table.slots.get_mut(old as usize) {
                    // Its tracker went to a bigger sweep; it may attach again if it grows.
                    x.flags &= !SLOW;
                }
            }
            slow::Attached::Yes => {}
        }
        self.table.slots[slot as usize].flags |= SLOW;
    }

    /// The patterns that need the engine's trackers: a UDP port scan (exact port sets) and
    /// a slow network scan (long-window trackers).
    fn check_tracked(
        &self,
        c: Category,
        slot: u32,
        st: &SourceState,
        prep: &Prepared,
        now: u64,
    ) -> Option<Finding> {
        match c {
            Category::PortScan => self.check_udp_scan(slot, st, prep, now),
            Category::NetworkScan if st.flags & SLOW != 0 => {
                check_slow(self.slow.get(slot)?, prep, now)
            }
            _ => None,
        }
    }

    /// A UDP port scan: distinct UDP ports of one destination (outside the traceroute
    /// ranges) from its exact tracker, the destination's flows mostly UDP and unanswered.
    fn check_udp_scan(
        &self,
        slot: u32,
        st: &SourceState,
        prep: &Prepared,
        now: u64,
    ) -> Option<Finding> {
        let ps = &prep.profile.port_scan;
        if ps.udp_distinct_ports == 0 || st.flags & EXACT == 0 {
            return None;
        }
        let tw = prep.windows[2];
        let epoch = sketch::epoch_of(now, tw);
        let pw = sketch::epoch_view(st.targets.epoch, &st.tspan, now, tw).prev_weight;
        let mut best: Option<(Finding, f64)> = None;
        for e in st.targets.entries.iter().filter(|e| e.occupied()) {
            let Some(tr) = self.exact.get(slot, e.addr) else {
                continue;
            };
            let (ports, flows, udp) = tr.window_ports(epoch, pw, TRACEROUTE_PORTS);
            let ports = ports.round();
            if ports < f64::from(ps.udp_distinct_ports) || udp < flows * 0.9 {
                continue;
            }
            let (_, t_flows, accepted, _, _) = target_view(e, st.targets.epoch, &st.tspan, now, tw);
            let t_flows = t_flows.max(ports);
            let ratio = (1.0 - accepted / t_flows).max(0.0);
            if ratio < ps.min_unanswered_ratio || best.as_ref().is_some_and(|b| b.1 >= ports) {
                continue;
            }
            best = Some((
                Finding {
                    crossed: vec![
                        crossed(
                            "distinct_udp_ports",
                            ports,
                            f64::from(ps.udp_distinct_ports),
                        ),
                        crossed("unanswered_ratio", ratio, ps.min_unanswered_ratio),
                    ],
                    counts: vec![
                        ("distinct_udp_ports", ports),
                        ("flows_to_target", t_flows),
                        ("accepted_by_target", accepted),
                        ("unanswered_ratio", ratio),
                    ],
                    focus: Some(e.addr),
                    pattern: Some(PATTERN_UDP),
                },
                ports,
            ));
        }
        best.map(|b| b.0)
    }

    /// Replaces the estimated distinct ports of the detection's focus destination with the
    /// exact count when a tracker has it (a lower bound, `distinct_ports_at_least`, when the
    /// tracker attached after ports it could not recover).
    fn exact_evidence(
        &self,
        slot: u32,
        st: &SourceState,
        prep: &Prepared,
        det: &mut Detection,
        now: u64,
    ) {
        if st.flags & EXACT == 0
            || !matches!(det.category, Category::PortScan | Category::BruteForce)
        {
            return;
        }
        let Some(focus) = det.evidence.top_destinations.first() else {
            return;
        };
        let dst = source::split4(addr_bits(focus.key));
        let Some(tr) = self.exact.get(slot, dst) else {
            return;
        };
        let n = tr.count(sketch::epoch_of(now, prep.windows[2])) as f64;
        let ev = &mut det.evidence;
        for key in ["distinct_ports", "distinct_ports_on_target"] {
            let Some(v) = ev.counts.get_mut(key) else {
                continue;
            };
            if tr.complete {
                *v = n;
                if let Some(c) = ev
                    .crossed
                    .iter_mut()
                    .find(|c| c.signal == "distinct_ports" && n >= c.threshold)
                {
                    c.value = n;
                }
            } else {
                ev.counts.insert("distinct_ports_at_least".to_owned(), n);
                break;
            }
        }
    }

    fn detection(
        &self,
        st: &SourceState,
        prep: &Prepared,
        c: Category,
        f: Finding,
        now: u64,
        window: u64,
    ) -> Detection {
        // `window` is the category's, shortened to begin no earlier than the source's fresh
        // start: the evidence covers only what is charged.
        let window_start = Time(now.saturating_sub(window));
        let tw = prep.windows[2];
        let mut targets: Vec<(source::Target, f64)> = st
            .targets
            .entries
            .iter()
            .filter(|e| e.occupied())
            .map(|e| {
                let v = target_view(e, st.targets.epoch, &st.tspan, now, tw);
                (v.0, v.1)
            })
            .filter(|(_, n)| *n >= 0.5)
            .collect();
        // The target that crossed first, then by flows.
        targets.sort_by(|a, b| {
            let fa = Some(a.0.addr) == f.focus;
            let fb = Some(b.0.addr) == f.focus;
            fb.cmp(&fa).then(b.1.total_cmp(&a.1))
        });
        let top_destinations = targets
            .iter()
            .take(TOP_MAX)
            .map(|(t, n)| Counted {
                key: bits_addr(source::join4(t.addr), st.key.v6),
                count: n.round() as u64,
            })
            .collect();
        let top_ports = st
            .port_views(now, tw)
            .into_iter()
            .filter(|(_, n)| *n >= 0.5)
            // Spam evidence names the SMTP ports it counted (25, 465 or 587), not the
            // source's other traffic.
            .filter(|(p, _)| {
                c != Category::Spam || prep.port_flags[usize::from(*p)] & PORT_SMTP != 0
            })
            .take(TOP_MAX)
            .map(|(p, n)| Counted {
                key: p,
                count: n.round() as u64,
            })
            .collect();
        let sample = self
            .ring
            .collect(st.key.hash() | 1, window_start, SAMPLE_MAX);
        // The first flow of the source in the window, as far as the samples tell.
        let first_seen = self
            .ring
            .first(st.key.hash() | 1, window_start)
            .unwrap_or(window_start);
        Detection {
            time: Time(now),
            source: st.key.net(),
            category: c,
            profile: prep.name.clone(),
            evidence: Evidence {
                window_start,
                window_end: Time(now),
                pattern: f.pattern.map(str::to_owned),
                crossed: f.crossed,
                counts: f
                    .counts
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), round2(v)))
                    .collect(),
                top_destinations,
                top_ports,
                first_seen,
                last_seen: Time(st.last_seen),
                sample,
                spoofing: None,
            },
        }
    }

    /// Replaces the policy, keeping every source's windows where they still mean the same:
    /// a source that is no longer a customer is dropped; a category whose window length
    /// changed starts over; the source cap is applied (idlest dropped first).
    pub fn set_policy(&mut self, policy: Arc<Policy>) {
        let old: Vec<(String, Windows)> = self
            .profiles
            .iter()
            .map(|p| (p.name.clone(), p.windows))
            .collect();
        let old_slow: Vec<u64> = self.profiles.iter().map(|p| p.slow_window).collect();
        let old_v6 = self.v6_prefix;
        self.policy = policy;
        self.prepare();
        self.meters = Meters::of_policy(&self.policy);
        // Slots may move below; a meter reports a flood again soon enough.
        self.hints.clear();
        let cap = self.policy.detection.max_sources as usize;
        // A rebuilt table moves sources to other slots, away from their rate trackers.
        let mut flood_window_changed = cap != self.table.cap();
        if cap != self.table.cap() {
            self.evictions += self.table.resize(cap) as u64;
        }
        let slots: Vec<u32> = self.table.occupied().collect();
        for s in slots {
            let st = self.table.slots[s as usize];
            let addr = bits_addr(source::join4(st.key.addr), st.key.v6);
            let keep = match self.customer(addr) {
                Some((p, key))
                    if !st.key.v6 || (key.len == st.key.len && old_v6 == self.v6_prefix) =>
                {
                    Some(p)
                }
                _ => None,
            };
            let Some(p) = keep else {
                self.slow.drop_slot(s);
                self.table.remove(s);
                continue;
            };
            let new_w = self.profiles[usize::from(p)].windows;
            let old_w = old
                .get(usize::from(st.profile))
                .map(|(_, w)| *w)
                .unwrap_or([0; 5]);
            let x = &mut self.table.slots[s as usize];
            x.profile = p;
            if old_w[0] != new_w[0] {
                x.flood = Default::default();
                flood_window_changed = true;
            }
            if old_w[2] != new_w[2] {
                x.targets = Default::default();
                x.ports = Default::default();
            }
            if old_w[3] != new_w[3] {
                x.netscan = Default::default();
            }
            if old_slow.get(usize::from(st.profile)).copied()
                != Some(self.profiles[usize::from(p)].slow_window)
            {
                // A slow window of another length (or none) starts over.
                x.flags &= !SLOW;
                self.slow.drop_slot(s);
            }
            if old_w[4] != new_w[4] {
                x.spam = Default::default();
            }
        }
        if flood_window_changed {
            self.rates.clear();
        }
        // Rebuild the touch list from the flags (the table may have been rebuilt).
        self.touched.clear();
        let touched: Vec<u32> = self
            .table
            .occupied()
            .filter(|&s| self.table.slots[s as usize].flags & TOUCHED != 0)
            .collect();
        self.touched.extend(touched);
    }

    /// The engine's counters.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            tracked_sources: self.table.len() as u64,
            max_sources: self.table.cap() as u64,
            evictions: self.evictions,
            events: self.events,
            flow_events: self.flow_events,
            counter_samples: self.counter_samples,
            ignored: self.ignored,
            dumped_flows: self.dumped,
            recovered_flows: self.recovered,
            untracked_skipped: self.untracked_skipped,
            lost: self.lost,
            detections_by_category: Category::DETECTED
                .into_iter()
                .zip(self.detections)
                .collect(),
            held_down: self.held_down,
            memory_bytes: self.memory_bytes() as u64,
            holds: self.holds.len() as u64,
            held_samples: self.held_samples,
            stale_events: self.stale_events,
            meter_hints: self.meter_hints,
            sampled_flows: self.sampled_flows,
        }
    }

    /// Bytes held by the engine's tables: what grows with the number of sources (slab,
    /// index, touch list) plus the fixed sample ring and the per-profile port maps.
    pub fn memory_bytes(&self) -> usize {
        self.table.memory_bytes()
            + self.exact.memory_bytes()
            + self.rates.memory_bytes()
            + self.slow.memory_bytes()
            + self.touched.capacity() * 4
            + self.ring.memory_bytes()
            + self.profiles.len() * 65_536
    }

    /// Whether `addr`'s source (or aggregate) is tracked.
    pub fn is_tracked(&self, addr: IpAddr) -> bool {
        self.customer(addr)
            .is_some_and(|(_, k)| self.table.get(&k).is_some())
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// What crossed, for one category of one source.
#[derive(Debug)]
struct Finding {
    crossed: Vec<Crossed>,
    counts: Vec<(&'static str, f64)>,
    /// The destination the finding is about (brute force, port scan).
    focus: Option<[u32; 4]>,
    /// The pattern within the category, when it is not the category's plain one.
    pattern: Option<&'static str>,
}

/// Evidence pattern: a sweep whose targets answered, its flows never carried through.
pub const PATTERN_ANSWERED: &str = "answered_sweep";
/// Evidence pattern: a sweep over the slow-scan window.
pub const PATTERN_SLOW: &str = "slow_scan";
/// Evidence pattern: a UDP port scan below the port-scan threshold.
pub const PATTERN_UDP: &str = "udp_scan";

/// Destination ports left out of a UDP scan's count: UDP traceroute (33434 on, 3 probes
/// for up to 30 hops) and tracepath (44444 on). Their probes are answered by ICMP
/// time-exceeded or port-unreachable, which leaves the flows unreplied, like a scan's.
const TRACEROUTE_PORTS: &[(u16, u16)] = &[(33_434, 33_534), (44_444, 44_544)];

/// A slow sweep from a source's long-window tracker.
fn check_slow(tr: &slow::Tracker, prep: &Prepared, now: u64) -> Option<Finding> {
    let ns = &prep.profile.network_scan;
    let v = tr.view(now, prep.slow_window);
    let dsts = v.dsts.round();
    let ports = v.ports.round();
    let ratio = if v.flows > 0.0 {
        v.incomplete / v.flows
    } else {
        0.0
    };
    if dsts < f64::from(ns.slow.distinct_destinations)
        || v.ports_saturated
        || ports * 4.0 > dsts
        || ratio < ns.min_incomplete_ratio
    {
        return None;
    }
    Some(Finding {
        crossed: vec![
            crossed(
                "distinct_destinations",
                dsts,
                f64::from(ns.slow.distinct_destinations),
            ),
            crossed("incomplete_ratio", ratio, ns.min_incomplete_ratio),
        ],
        counts: vec![
            ("distinct_destinations", dsts),
            ("distinct_ports", ports),
            ("new_flows", v.flows),
            ("incomplete_flows", v.incomplete),
            ("incomplete_ratio", ratio),
            ("window_seconds", (prep.slow_window / 1_000_000_000) as f64),
        ],
        focus: None,
        pattern: Some(PATTERN_SLOW),
    })
}

fn crossed(signal: &str, value: f64, threshold: f64) -> Crossed {
    Crossed {
        signal: signal.to_owned(),
        value: round2(value),
        threshold,
    }
}

/// A flood finding with no threshold crossed yet, for the rules that add their own.
fn flood_finding(st: &SourceState, prep: &Prepared, now: u64) -> Finding {
    Finding {
        crossed: Vec::new(),
        counts: flood_counts(st, prep, now),
        focus: None,
        pattern: None,
    }
}

/// The flood measures of a source for the evidence.
fn flood_counts(st: &SourceState, prep: &Prepared, now: u64) -> Vec<(&'static str, f64)> {
    let w = prep.windows[0];
    let v = st.flood_view(now, w);
    let secs = w as f64 / 1e9;
    let share = if v.new > 0.0 {
        v.unanswered / v.new
    } else {
        0.0
    };
    let mut counts = vec![
        ("new_flows", v.new),
        ("new_flows_per_sec", v.new / secs),
        ("unanswered_flows", v.unanswered),
        ("unanswered_ratio", share),
        ("tcp_syn", v.syn),
        ("unreplied_syn_per_sec", v.syn_unanswered / secs),
        ("amplification_flows", v.amp),
        ("amplification_flows_per_sec", v.amp_unanswered / secs),
        ("distinct_destinations", v.targets.round()),
        ("pps", v.pps),
        ("bps", v.bps),
    ];
    if st.flags & SAMPLED != 0 {
        // The flow counts are estimates: each reported flow stood for this many.
        counts.push(("sampled_one_in", f64::from(meter::SAMPLE_ONE_IN)));
    }
    counts
}

/// An answered sweep: the fan-out of a network scan whose flows the source did not carry
/// through, whatever the targets answered (a stateless scanner resets every SYN-ACK).
fn check_answered_sweep(
    v: &source::NetScanView,
    ns: &crate::policy::NetworkScan,
) -> Option<Finding> {
    let dsts = v.dsts.round();
    let ports = v.ports.round();
    let ratio = if v.flows > 0.0 {
        v.incomplete / v.flows
    } else {
        0.0
    };
    if ns.answered_distinct_destinations == 0
        || dsts < f64::from(ns.answered_distinct_destinations)
        || v.ports_saturated
        || ports * 4.0 > dsts
        || v.completed_saturated
        || ratio < ns.min_incomplete_ratio
    {
        return None;
    }
    let unanswered_ratio = if v.flows > 0.0 {
        v.unanswered / v.flows
    } else {
        0.0
    };
    Some(Finding {
        crossed: vec![
            crossed(
                "distinct_destinations",
                dsts,
                f64::from(ns.answered_distinct_destinations),
            ),
            crossed("incomplete_ratio", ratio, ns.min_incomplete_ratio),
        ],
        counts: vec![
            ("distinct_destinations", dsts),
            ("distinct_ports", ports),
            ("new_flows", v.flows),
            ("unanswered_flows", v.unanswered),
            ("unanswered_ratio", unanswered_ratio),
            ("incomplete_flows", v.incomplete),
            ("incomplete_ratio", ratio),
        ],
        focus: None,
        pattern: Some(PATTERN_ANSWERED),
    })
}

/// Fewest distinct ports at one destination for [`scan_shaped`]: a flood's new flows reuse
/// a few ports, the meters trip after a hundred flows or more.
const SCAN_SHAPE_PORTS: f64 = 16.0;

/// Whether a source's new flows are a scan's, not a flood's: its port-scan or network-scan
/// rule holds, or (a fast scan trips the new-flow and SYN meters after a hundred probes or
/// so, before its own rule has seen enough) at one destination it opened most of its flows
/// on distinct ports. The scan rule then reports it at the next evaluation. Only for the
/// scan rules the profile has.
fn scan_shaped(st: &SourceState, prep: &Prepared, now: u64) -> bool {
    let port_scan = prep.enabled & (1 << 2) != 0;
    let network_scan = prep.enabled & (1 << 3) != 0;
    let spread = || {
        st.targets.entries.iter().filter(|e| e.occupied()).any(|e| {
            let (_, flows, _, _, ports) =
                target_view(e, st.targets.epoch, &st.tspan, now, prep.windows[2]);
            ports >= SCAN_SHAPE_PORTS && ports * 2.0 >= flows
        })
    };
    (port_scan && (spread() || check(Category::PortScan, st, prep, now).is_some()))
        || (network_scan && check(Category::NetworkScan, st, prep, now).is_some())
}

/// Checks one category. Allocation-free unless something crossed.
fn check(c: Category, st: &SourceState, prep: &Prepared, now: u64) -> Option<Finding> {
    let p = &prep.profile;
    let w = &prep.windows;
    match c {
        // Not from flows: `antispoof` sees the forged packets the kernel drops.
        Category::Spoofing => None,
        Category::Flood => {
            let f = &p.flood;
            let v = st.flood_view(now, w[0]);
            let secs = w[0] as f64 / 1e9;
            let new_rate = v.new / secs;
            let syn_rate = v.syn_unanswered / secs;
            let amp_rate = v.amp_unanswered / secs;
            let targets = v.targets.round();
            let few = targets <= f64::from(f.max_targets);
            let share = if v.new > 0.0 {
                v.unanswered / v.new
            } else {
                0.0
            };
            let unanswered_traffic = v.unanswered >= 1.0 && share >= 0.5;
            let c_new = few && new_rate >= f.new_flows_per_sec as f64;
            let c_syn = few && syn_rate >= f.unreplied_syn_per_sec as f64;
            let c_amp = amp_rate >= f.amplification_flows_per_sec as f64;
            let c_pps = unanswered_traffic && v.pps >= f.pps as f64;
            let c_bps = unanswered_traffic && v.bps >= f.bps as f64;
            if !(c_new || c_syn || c_amp || c_pps || c_bps) {
                return None;
            }
            let mut x = Vec::new();
            if c_new {
                x.push(crossed(
                    "new_flows_per_sec",
                    new_rate,
                    f.new_flows_per_sec as f64,
                ));
            }
            if c_syn {
                x.push(crossed(
                    "unreplied_syn_per_sec",
                    syn_rate,
                    f.unreplied_syn_per_sec as f64,
                ));
            }
            if c_amp {
                x.push(crossed(
                    "amplification_flows_per_sec",
                    amp_rate,
                    f.amplification_flows_per_sec as f64,
                ));
            }
            if c_pps {
                x.push(crossed("pps", v.pps, f.pps as f64));
            }
            if c_bps {
                x.push(crossed("bps", v.bps, f.bps as f64));
            }
            Some(Finding {
                crossed: x,
                counts: flood_counts(st, prep, now),
                focus: None,
                pattern: None,
            })
        }
        Category::BruteForce => {
            let b = &p.brute_force;
            // Attempts are counted in the target table, whose epochs follow the port-scan
            // window; scale when the brute-force window differs.
            let scale = w[1] as f64 / w[2] as f64;
            let mut best: Option<(source::Target, f64, f64, f64, f64)> = None;
            for e in st.targets.entries.iter().filter(|e| e.occupied()) {
                let v = target_view(e, st.targets.epoch, &st.tspan, now, w[2]);
                let (_, flows, _, auth, ports) = v;
                let attempts = auth * scale;
                // Brute force is repeated attempts at authentication ports dominating the
                // traffic to the target: at least half its flows, more attempts than ports
                // touched, and no wider sweep of its ports (a scan that passes 22 and 3389 on
                // its way through 1000 ports is a port scan, whatever the windows' scaling).
                let dominant = auth * 2.0 >= flows
                    && auth > ports.round()
                    && ports.round() < f64::from(p.port_scan.distinct_ports);
                if dominant
                    && attempts >= f64::from(b.attempts)
                    && best.is_none_or(|b| attempts > b.3 * scale)
                {
                    best = Some(v);
                }
            }
            let Some((t, flows, accepted, auth, ports)) = best else {
                return spread(st, prep, now);
            };
            let attempts = auth * scale;
            Some(Finding {
                crossed: vec![crossed("attempts", attempts, f64::from(b.attempts))],
                counts: vec![
                    ("attempts", attempts),
                    ("flows_to_target", flows),
                    ("accepted_by_target", accepted),
                    ("distinct_ports_on_target", ports.round()),
                ],
                focus: Some(t.addr),
                pattern: None,
            })
        }
        Category::PortScan => {
            let ps = &p.port_scan;
            let mut best: Option<(source::Target, f64, f64, f64, f64, f64)> = None;
            for e in st.targets.entries.iter().filter(|e| e.occupied()) {
                let (t, flows, accepted, auth, ports) =
                    target_view(e, st.targets.epoch, &st.tspan, now, w[2]);
                let ports = ports.round();
                let flows = flows.max(ports);
                let ratio = if flows > 0.0 {
                    (1.0 - accepted / flows).max(0.0)
                } else {
                    0.0
                };
                if ports >= f64::from(ps.distinct_ports)
                    && ratio >= ps.min_unanswered_ratio
                    && best.is_none_or(|b| ports > b.4)
                {
                    best = Some((t, flows, accepted, auth, ports, ratio));
                }
            }
            let (t, flows, accepted, _, ports, ratio) = best?;
            Some(Finding {
                crossed: vec![
                    crossed("distinct_ports", ports, f64::from(ps.distinct_ports)),
                    crossed("unanswered_ratio", ratio, ps.min_unanswered_ratio),
                ],
                counts: vec![
                    ("distinct_ports", ports),
                    ("flows_to_target", flows),
                    ("accepted_by_target", accepted),
                    ("unanswered_ratio", ratio),
                ],
                focus: Some(t.addr),
                pattern: None,
            })
        }
        Category::NetworkScan => {
            let ns = &p.network_scan;
            let v = st.netscan_view(now, w[3]);
            let (flows, unanswered) = (v.flows, v.unanswered);
            let dsts = v.dsts.round();
            let ports = v.ports.round();
            let ratio = if flows > 0.0 { unanswered / flows } else { 0.0 };
            let few_ports = !v.ports_saturated && ports * 4.0 <= dsts;
            if !(dsts >= f64::from(ns.distinct_destinations)
                && ratio >= ns.min_unanswered_ratio
                && few_ports)
            {
                return check_answered_sweep(&v, ns);
            }
            Some(Finding {
                crossed: vec![
                    crossed(
                        "distinct_destinations",
                        dsts,
                        f64::from(ns.distinct_destinations),
                    ),
                    crossed("unanswered_ratio", ratio, ns.min_unanswered_ratio),
                ],
                counts: vec![
                    ("distinct_destinations", dsts),
                    ("distinct_ports", ports),
                    ("new_flows", flows),
                    ("unanswered_flows", unanswered),
                    ("unanswered_ratio", ratio),
                ],
                focus: None,
                pattern: None,
            })
        }
        Category::Spam => {
            let sp = &p.spam;
            let (flows, answered, dsts) = st.spam_view(now, w[4]);
            let dsts = dsts.round();
            if dsts < f64::from(sp.distinct_destinations) {
                return None;
            }
            Some(Finding {
                crossed: vec![crossed(
                    "distinct_destinations",
                    dsts,
                    f64::from(sp.distinct_destinations),
                )],
                counts: vec![
                    ("distinct_destinations", dsts),
                    ("smtp_flows", flows),
                    ("smtp_flows_answered", answered),
                ],
                focus: None,
                pattern: None,
            })
        }
    }
}

/// Spread brute force: a few attempts at each of many targets, none reaching the per-target
/// `attempts`. Counts TCP sessions to authentication ports that completed the handshake (the
/// server answered, the client went on: what a network scan, which touches and leaves, does
/// not do) less those that lasted longer than `max_flow_duration`, across every target:
/// at least `spread.attempts` of them at `spread.distinct_targets` or more targets, and at
/// least two per target on average (one connection per host is a monitoring check or a
/// connect scan, not a guess at a password).
fn spread(st: &SourceState, prep: &Prepared, now: u64) -> Option<Finding> {
    let b = &prep.profile.brute_force;
    if !b.spread.enabled {
        return None;
    }
    let w = &prep.windows;
    let (sessions, targets, saturated) = st.spread_view(now, w[2]);
    let attempts = sessions * (w[1] as f64 / w[2] as f64);
    // Past 32 targets the sessions' own bitmap only says "many": take the source's distinct
    // destinations (the network-scan counters, kept while the spread rule is on), which
    // bound the targets from above, so that one session at each of 300 hosts stays one per
    // target. No more targets than sessions (a small bitmap's estimate may overshoot).
    let targets = if saturated {
        targets.max(st.netscan_view(now, w[3]).dsts)
    } else {
        targets
    };
    let targets = targets.min(sessions).round();
    if attempts < f64::from(b.spread.attempts)
        || targets < f64::from(b.spread.distinct_targets)
        || sessions < 2.0 * targets
    {
        return None;
    }
    Some(Finding {
        crossed: vec![
            crossed("attempts", attempts, f64::from(b.spread.attempts)),
            crossed(
                "distinct_targets",
                targets,
                f64::from(b.spread.distinct_targets),
            ),
        ],
        counts: vec![
            ("attempts", attempts),
            ("distinct_targets", targets),
            ("attempts_per_target", sessions / targets.max(1.0)),
        ],
        focus: None,
        pattern: Some("spread"),
    })
}

#[cfg(test)]
mod tests;
