//! Anti-spoofing on shared customer segments: a customer cannot get its neighbour held by
//! writing the neighbour's address as the source of its own packets.
//!
//! Several customers share one bridge or VLAN behind the router (as in the demo). Each
//! customer address is *bound* to the MAC address it is sent from: statically in the policy
//! (`anti_spoofing.bindings`), or learnt from the router's neighbour table (ARP and NDP). A
//! learnt binding is sticky: it moves to another MAC only after its own MAC has not been seen
//! with the address for `rebind_after` (a replaced server; a poisoner of the neighbour table
//! must outlast the real owner, who answers the router's probes).
//!
//! The agent's second table, `inet <enforcement.table>_spoof`, holds the bindings and one
//! three rules per family in a `prerouting` chain at priority `raw` (-300), before conntrack:
//!
//! ```text
//! ip saddr @bound4 ip saddr . ether saddr != @bind4 update @spoofed4 { ether saddr . ip saddr counter }
//! ip saddr @bound4 ip saddr . ether saddr != @bind4 limit rate 2/second log group 17735
//! ip saddr @bound4 ip saddr . ether saddr != @bind4 counter drop
//! ```
//!
//! (Separate rules: when `spoofed4` is full its `update` fails and ends the rule, and a
//! `limit` over its rate ends its rule too; the drop must depend on neither.)
//!
//! A forged packet never creates a conntrack entry and never reaches the per-source counters,
//! so it cannot count against the address it names. When a forged packet is logged (NFLOG group
//! [`NFLOG_GROUP`], at most twice a second), the task reads `spoofed4`
//! and `spoofed6` (the sending MAC, the forged source, packets): when one MAC's forged packets
//! within `window` reach `packets`, the addresses bound to that MAC — the sender — are
//! detected as [`Category::Spoofing`] and go to the decision task like any detection. A MAC
//! with no binding cannot be attributed; its packets are still dropped, and logged.
//!
//! Unbound addresses (never seen in the neighbour table: addresses routed behind a customer's
//! own router, or exempted floating addresses) pass as before. In dry-run the rule counts and
//! detects without dropping. The table outlives the agent like the main one; with
//! `anti_spoofing.enabled: false` it is removed at start and reload.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::daemon::Event;
use crate::messages::{Category, Counted, Detection, Evidence, SpoofEvidence, Time};
use crate::policy::{AntiSpoofing, Policy};

/// A MAC address.
pub type Mac = [u8; 6];

/// How often the neighbour table and the drop counters are read (one `nft` run each time:
/// forged packets are dropped at once, only the detection of their sender waits for this).
pub const INTERVAL: Duration = Duration::from_secs(2);
/// A learnt binding not seen in the neighbour table for this long is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Size of each `spoofedN` set (sending MAC × forged source pairs; elements expire after
/// five minutes without a packet).
pub const SPOOFED_SET_SIZE: u32 = 65_536;
/// Most forged sources listed in one detection's evidence.
const EVIDENCE_SOURCES: usize = 16;
/// Most addresses of one sender detected at once.
const MAX_SENDER_ADDRESSES: usize = 16;

/// Parses `02:00:5e:10:00:0a` (or with `-`); `None` unless six hex bytes.
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut out = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for b in &mut out {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// `02:00:5e:10:00:0a`.
pub fn format_mac(m: Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The name of the anti-spoofing table next to the agent's table `table`.
pub fn table_name(table: &str) -> String {
    format!("{table}_spoof")
}

/// Where a binding comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The policy's `anti_spoofing.bindings`: never relearnt.
    Static,
    /// The neighbour table (or the kernel's table at start).
    Learnt,
}

#[derive(Clone, Debug)]
struct Bound {
    mac: Mac,
    origin: Origin,
    /// When the neighbour table last showed the address at `mac`.
    seen: Instant,
    /// When another MAC was last reported for the address (warned once per change).
    conflict: Option<Mac>,
}

/// The bindings: which MAC each customer address may be sent from.
#[derive(Debug)]
pub struct Bindings {
    cfg: AntiSpoofing,
    networks: Vec<IpNet>,
    map: BTreeMap<IpAddr, Bound>,
    learnt: usize,
    /// Set when the bindings changed since the table was last written.
    dirty: bool,
}

impl Bindings {
    /// The policy's bindings; nothing learnt yet.
    pub fn new(policy: &Policy, now: Instant) -> Bindings {
        let mut b = Bindings {
            cfg: policy.anti_spoofing.clone(),
            networks: Vec::new(),
            map: BTreeMap::new(),
            learnt: 0,
            dirty: true,
        };
        b.set_policy(policy, now);
        b
    }

    /// Applies a new policy: static bindings replace learnt ones, exempt and out-of-network
    /// addresses lose theirs, the learnt rest stays.
    pub fn set_policy(&mut self, policy: &Policy, now: Instant) {
        self.cfg = policy.anti_spoofing.clone();
        self.networks = policy.networks.iter().map(|n| n.prefix).collect();
        let keep: Vec<(IpAddr, Bound)> = std::mem::take(&mut self.map)
            .into_iter()
            .filter(|(a, b)| b.origin == Origin::Learnt && self.learnable(*a))
            .collect();
        self.map = keep.into_iter().collect();
        for s in &self.cfg.bindings {
            if let Some(mac) = parse_mac(&s.mac) {
                self.map.insert(
                    s.address,
                    Bound {
                        mac,
                        origin: Origin::Static,
                        seen: now,
                        conflict: None,
                    },
                );
            }
        }
        self.learnt = self
            .map
            .values()
            .filter(|b| b.origin == Origin::Learnt)
            .count();
        self.dirty = true;
    }

    fn learnable(&self, a: IpAddr) -> bool {
        let net = IpNet::from(a);
        self.networks.iter().any(|n| n.contains(&net))
            && !self.cfg.exempt.iter().any(|e| e.contains(&net))
            && !a.is_unspecified()
            && !a.is_multicast()
    }

    /// Takes one entry of the neighbour table (or of the kernel's table at start): binds an
    /// unbound customer address, refreshes a binding, or moves a learnt one whose MAC has
    /// not been seen for `rebind_after`. Returns whether the bindings changed.
    pub fn observe(&mut self, addr: IpAddr, mac: Mac, now: Instant) -> bool {
        if !self.cfg.learn || !self.learnable(addr) || mac == [0; 6] {
            return false;
        }
        match self.map.get_mut(&addr) {
            None => {
                if self.learnt >= self.cfg.max_bindings as usize {
                    debug!(%addr, "anti-spoofing: binding table full, not learnt");
                    return false;
                }
                info!(%addr, mac = %format_mac(mac), "anti-spoofing: binding learnt");
                self.map.insert(
                    addr,
                    Bound {
                        mac,
                        origin: Origin::Learnt,
                        seen: now,
                        conflict: None,
                    },
                );
                self.learnt += 1;
                self.dirty = true;
                true
            }
            Some(b) if b.mac == mac => {
                b.seen = now;
                b.conflict = None;
                false
            }
            Some(b) => {
                let quiet = now.saturating_duration_since(b.seen);
                if b.origin == Origin::Learnt && quiet >= self.cfg.rebind_after {
                    info!(%addr, from = %format_mac(b.mac), to = %format_mac(mac),
                        quiet_secs = quiet.as_secs(), "anti-spoofing: binding moved");
                    b.mac = mac;
                    b.seen = now;
                    b.conflict = None;
                    self.dirty = true;
                    return true;
                }
                if b.conflict != Some(mac) {
                    b.conflict = Some(mac);
                    warn!(%addr, bound = %format_mac(b.mac), claimed = %format_mac(mac),
                        origin = ?b.origin,
                        "anti-spoofing: the neighbour table shows another MAC for a bound \
                         address (neighbour-table poisoning, or a moved server); the binding stays");
                }
                false
            }
        }
    }

    /// Forgets learnt bindings not seen for [`FORGET_AFTER`].
    pub fn expire(&mut self, now: Instant) {
        let before = self.map.len();
        self.map.retain(|_, b| {
            b.origin == Origin::Static || now.saturating_duration_since(b.seen) < FORGET_AFTER
        });
        if self.map.len() != before {
            self.learnt -= before - self.map.len();
            self.dirty = true;
        }
    }

    /// The MAC `addr` is bound to.
    pub fn mac_of(&self, addr: IpAddr) -> Option<Mac> {
        self.map.get(&addr).map(|b| b.mac)
    }

    /// The addresses bound to `mac` (at most `limit`).
    pub fn addresses_of(&self, mac: Mac, limit: usize) -> Vec<IpAddr> {
        self.map
            .iter()
            .filter(|(_, b)| b.mac == mac)
            .map(|(a, _)| *a)
            .take(limit)
            .collect()
    }

    /// How many bindings there are.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The nft script that makes the table hold exactly these bindings (one atomic
    /// transaction; the drop counters in `spoofedN` are kept).
    pub fn script(&self, table: &str, drop: bool) -> String {
        let t = format!("inet {table}");
        let mut s = format!(
            "add table {t}\n\
             add set {t} bound4 {{ type ipv4_addr; }}\n\
             add set {t} bound6 {{ type ipv6_addr; }}\n\
             add set {t} bind4 {{ type ipv4_addr . ether_addr; }}\n\
             add set {t} bind6 {{ type ipv6_addr . ether_addr; }}\n\
             add set {t} spoofed4 {{ type ether_addr . ipv4_addr; size {SPOOFED_SET_SIZE}; flags dynamic,timeout; timeout 5m; }}\n\
             add set {t} spoofed6 {{ type ether_addr . ipv6_addr; size {SPOOFED_SET_SIZE}; flags dynamic,timeout; timeout 5m; }}\n\
             add chain {t} prerouting {{ type filter hook prerouting priority raw; policy accept; }}\n\
             flush chain {t} prerouting\n"
        );
        // Counting and dropping are two rules: when `spoofedN` is full the `update` fails
        // and ends its rule, and a drop in the same rule would be skipped.
        for (ip, n) in [("ip", "4"), ("ip6", "6")] {
            let forged = format!("{ip} saddr @bound{n} {ip} saddr . ether saddr != @bind{n}");
            s.push_str(&format!(
                "add rule {t} prerouting {forged} update @spoofed{n} {{ ether saddr . {ip} saddr counter }} \
                 comment \"egressguard:spoofed-count{n}\"\n"
            ));
            s.push_str(&format!(
                "add rule {t} prerouting {forged} limit rate 2/second log group {NFLOG_GROUP} \
                 comment \"egressguard:spoofed-log{n}\"\n"
            ));
            if drop {
                s.push_str(&format!(
                    "add rule {t} prerouting {forged} counter drop comment \"egressguard:spoofed-drop{n}\"\n"
                ));
            }
        }
        for n in ["bound4", "bound6", "bind4", "bind6"] {
            s.push_str(&format!("flush set {t} {n}\n"));
        }
        let (mut b4, mut b6, mut p4, mut p6) = (vec![], vec![], vec![], vec![]);
        for (a, b) in &self.map {
            let pair = format!("{a} . {}", format_mac(b.mac));
            match a {
                IpAddr::V4(_) => {
                    b4.push(a.to_string());
                    p4.push(pair);
                }
                IpAddr::V6(_) => {
                    b6.push(a.to_string());
                    p6.push(pair);
                }
            }
        }
        for (set, elems) in [("bound4", b4), ("bound6", b6), ("bind4", p4), ("bind6", p6)] {
            for chunk in elems.chunks(4096) {
                s.push_str(&format!(
                    "add element {t} {set} {{ {} }}\n",
                    chunk.join(", ")
                ));
            }
        }
        s
    }
}

/// One reading of a `spoofedN` element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpoofReading {
    /// The sending MAC.
    pub mac: Mac,
    /// The forged source.
    pub source: IpAddr,
    /// Packets dropped so far.
    pub packets: u64,
}

/// Parses `nft -j list set inet T spoofedN`; elements of other shapes are skipped.
pub fn parse_spoofed(json: &[u8]) -> Result<Vec<SpoofReading>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
    let items = v
        .get("nftables")
        .and_then(|n| n.as_array())
        .ok_or("no `nftables` array")?;
    let mut out = Vec::new();
    for it in items {
        let Some(set) = it.get("set") else { continue };
        if !set
            .get("name")
            .and_then(|n| n.as_str())
            .is_some_and(|n| n.starts_with("spoofed"))
        {
            continue;
        }
        let Some(elems) = set.get("elem").and_then(|e| e.as_array()) else {
            continue;
        };
        for e in elems {
            let inner = e.get("elem").unwrap_or(e);
            let Some(parts) = inner
                .get("val")
                .and_then(|v| v.get("concat"))
                .and_then(|c| c.as_array())
            else {
                continue;
            };
            let (Some(mac), Some(source)) = (
                parts.first().and_then(|m| m.as_str()).and_then(parse_mac),
                parts
                    .get(1)
                    .and_then(|a| a.as_str())
                    .and_then(|a| a.parse().ok()),
            ) else {
                continue;
            };
            let packets = inner
                .get("counter")
                .and_then(|c| c.get("packets"))
                .and_then(|p| p.as_u64())
                .unwrap_or(0);
            out.push(SpoofReading {
                mac,
                source,
                packets,
            });
        }
    }
    Ok(out)
}

/// Most MACs without a binding reported per reading (and remembered as already logged).
const UNBOUND_REPORTED: usize = 8;
const UNBOUND_REMEMBERED: usize = 4096;

/// What one snapshot of the drop counters showed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SpoofUpdate {
    /// MACs with a binding whose forged packets within the window reached the threshold,
    /// each with its forged sources (most packets first).
    pub senders: Vec<(Mac, Vec<Counted<IpAddr>>)>,
    /// MACs without a binding that forged packets in this snapshot, not logged within the
    /// window yet (at most [`UNBOUND_REPORTED`]).
    pub unbound: Vec<(Mac, Vec<Counted<IpAddr>>)>,
}

/// One snapshot's forged packets from one MAC: when, how many, the biggest sources.
type Snapshot = (Instant, u64, Vec<Counted<IpAddr>>);

/// Turns readings into per-MAC forged packet counts over the window. Memory is bounded:
/// readings come from sets of at most [`SPOOFED_SET_SIZE`] elements, only MACs with a
/// binding (real servers) are tracked over the window, one entry per snapshot each, with
/// at most [`EVIDENCE_SOURCES`] sources.
#[derive(Debug, Default)]
pub struct SpoofCounter {
    last: HashMap<(Mac, IpAddr), u64>,
    /// Per bound MAC: (when, packets, forged sources) of each snapshot within the window.
    recent: HashMap<Mac, VecDeque<Snapshot>>,
    /// Per MAC: no new detection before this.
    quiet_until: HashMap<Mac, Instant>,
    /// Unbound MACs already logged, and when.
    warned: HashMap<Mac, Instant>,
    /// Forged packets dropped in total.
    pub dropped: u64,
}

/// The `limit` biggest of `by`, most first.
fn top(by: HashMap<IpAddr, u64>, limit: usize) -> Vec<Counted<IpAddr>> {
    let mut list: Vec<Counted<IpAddr>> = by
        .into_iter()
        .map(|(key, count)| Counted { key, count })
        .collect();
    list.sort_by(|a, b| b.count.cmp(&a.count).then(a.key.cmp(&b.key)));
    list.truncate(limit);
    list
}

impl SpoofCounter {
    /// Takes one snapshot of both sets; `bound` says whether a MAC has a binding.
    pub fn update(
        &mut self,
        readings: &[SpoofReading],
        cfg: &AntiSpoofing,
        now: Instant,
        bound: impl Fn(Mac) -> bool,
    ) -> SpoofUpdate {
        let mut seen = HashMap::with_capacity(readings.len());
        let mut this: HashMap<Mac, HashMap<IpAddr, u64>> = HashMap::new();
        for r in readings {
            let key = (r.mac, r.source);
            let before = self.last.get(&key).copied().unwrap_or(0);
            let delta = if r.packets >= before {
                r.packets - before
            } else {
                r.packets
            };
            seen.insert(key, r.packets);
            if delta > 0 {
                self.dropped += delta;
                *this.entry(r.mac).or_default().entry(r.source).or_default() += delta;
            }
        }
        self.last = seen;
        self.warned
            .retain(|_, t| now.saturating_duration_since(*t) < cfg.window);
        let mut out = SpoofUpdate::default();
        for (mac, by) in this {
            let total: u64 = by.values().sum();
            if bound(mac) {
                self.recent.entry(mac).or_default().push_back((
                    now,
                    total,
                    top(by, EVIDENCE_SOURCES),
                ));
            } else if out.unbound.len() < UNBOUND_REPORTED && !self.warned.contains_key(&mac) {
                if self.warned.len() >= UNBOUND_REMEMBERED {
                    self.warned.clear();
                }
                self.warned.insert(mac, now);
                out.unbound.push((mac, top(by, EVIDENCE_SOURCES)));
            }
        }
        self.recent.retain(|mac, q| {
            while q
                .front()
                .is_some_and(|(t, _, _)| now.saturating_duration_since(*t) >= cfg.window)
            {
                q.pop_front();
            }
            !q.is_empty() && bound(*mac)
        });
        self.quiet_until.retain(|_, t| *t > now);
        for (mac, q) in &self.recent {
            let total: u64 = q.iter().map(|x| x.1).sum();
            if total < cfg.packets || self.quiet_until.contains_key(mac) {
                continue;
            }
            let mut by: HashMap<IpAddr, u64> = HashMap::new();
            for (_, _, sources) in q {
                for c in sources {
                    *by.entry(c.key).or_default() += c.count;
                }
            }
            out.senders.push((*mac, top(by, EVIDENCE_SOURCES)));
        }
        out
    }

    /// No new detection for `mac` within the window.
    pub fn detected(&mut self, mac: Mac, cfg: &AntiSpoofing, now: Instant) {
        self.quiet_until.insert(mac, now + cfg.window);
    }
}

/// The detections for one sender: each address bound to its MAC (its IPv6 ones widened to
/// the policy's block prefix, once each).
pub fn detections(
    policy: &Policy,
    bindings: &Bindings,
    mac: Mac,
    sources: &[Counted<IpAddr>],
    window: Duration,
    now: Time,
) -> Vec<Detection> {
    let packets: u64 = sources.iter().map(|s| s.count).sum();
    let mut targets: Vec<IpNet> = Vec::new();
    for a in bindings.addresses_of(mac, MAX_SENDER_ADDRESSES) {
        let net = match a {
            IpAddr::V4(_) => IpNet::from(a),
            IpAddr::V6(_) => IpNet::new(a, policy.enforcement.ipv6_block_prefix)
                .map(|n| n.trunc())
                .unwrap_or_else(|_| IpNet::from(a)),
        };
        if !targets.contains(&net) {
            targets.push(net);
        }
    }
    let start = Time(
        now.as_nanos()
            .saturating_sub(u64::try_from(window.as_nanos()).unwrap_or(u64::MAX)),
    );
    targets
        .into_iter()
        .filter_map(|net| {
            let profile = policy.network_of(net.addr())?.profile.clone();
            Some(Detection {
                time: now,
                source: net,
                category: Category::Spoofing,
                profile,
                evidence: Evidence {
                    window_start: start,
                    window_end: now,
                    pattern: None,
                    crossed: vec![crate::messages::Crossed {
                        signal: "spoofed_packets".into(),
                        value: packets as f64,
                        threshold: policy.anti_spoofing.packets as f64,
                    }],
                    counts: [("spoofed_packets".to_owned(), packets as f64)]
                        .into_iter()
                        .collect(),
                    top_destinations: Vec::new(),
                    top_ports: Vec::new(),
                    first_seen: start,
                    last_seen: now,
                    sample: Vec::new(),
                    spoofing: Some(SpoofEvidence {
                        mac: format_mac(mac),
                        spoofed_sources: sources.to_vec(),
                    }),
                },
            })
        })
        .collect()
}

async fn nft(args: &[&str], stdin: Option<&str>) -> Result<Vec<u8>, String> {
    // Run synchronously on this thread (its own; the runtime only carries the neighbour dumps).
    use std::io::Write;
    let mut cmd = std::process::Command::new("nft");
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("cannot run nft: {e}"))?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(text.as_bytes())
            .map_err(|e| format!("writing to nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Writes the bindings; a table some other hand changed incompatibly is replaced.
async fn write(table: &str, bindings: &Bindings, drop: bool) -> Result<(), String> {
    let script = bindings.script(table, drop);
    if nft(&["-f", "-"], Some(&script)).await.is_ok() {
        return Ok(());
    }
    let _ = nft(&["delete", "table", "inet", table], None).await;
    nft(&["-f", "-"], Some(&script)).await.map(|_| ())
}

/// The bindings the kernel's table holds (kept from the last run, so a restart does not
/// hand a poisoner a fresh start).
async fn kernel_bindings(table: &str) -> Vec<(IpAddr, Mac)> {
    let mut out = Vec::new();
    for set in ["bind4", "bind6"] {
        if let Ok(json) = nft(&["-j", "list", "set", "inet", table, set], None).await {
            out.extend(parse_bindings(&json));
        }
    }
    out
}

/// The (address, MAC) pairs of `nft -j list set inet T bindN`; anything else is skipped.
pub fn parse_bindings(json: &[u8]) -> Vec<(IpAddr, Mac)> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(json) else {
        return Vec::new();
    };
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|it| it["set"]["elem"].as_array())
        .flatten()
        .filter_map(|e| {
            let parts = e["concat"].as_array()?;
            Some((
                parts.first()?.as_str()?.parse().ok()?,
                parse_mac(parts.get(1)?.as_str()?)?,
            ))
        })
        .collect()
}

/// One dump of the neighbour table: usable entries (address, MAC).
async fn neighbours(handle: &rtnetlink::Handle) -> Result<Vec<(IpAddr, Mac)>, String> {
    let msgs: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| format!("neighbour table dump: {e}"))?;
    Ok(msgs.iter().filter_map(neighbour_entry).collect())
}

fn neighbour_entry(m: &NeighbourMessage) -> Option<(IpAddr, Mac)> {
    if !matches!(
        m.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
    ) {
        return None;
    }
    let mut addr = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                addr = Some(IpAddr::V4(*v4))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                addr = Some(IpAddr::V6(*v6))
            }
            NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
                mac = <Mac>::try_from(b.as_slice()).ok()
            }
            _ => {}
        }
    }
    Some((addr?, mac?))
}

/// The NFLOG group the anti-spoofing rules log to (at most twice a second per family): the
/// agent reads the drop counters when one arrives, instead of listing them on a timer.
pub const NFLOG_GROUP: u16 = 17_735;

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_NONE: u8 = 0;

/// The `NFULNL_MSG_CONFIG` request binding `group` with copy mode "none" (the message is
/// only a signal; the counters say who and how much).
pub fn nflog_bind_request(group: u16, seq: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(40);
    let flags: u16 = 0x1 | 0x4; // NLM_F_REQUEST | NLM_F_ACK
    b.extend_from_slice(&0u32.to_ne_bytes()); // length, below
    b.extend_from_slice(&((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG).to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&[0, 0]); // nfgenmsg: AF_UNSPEC, NFNETLINK_V0
    b.extend_from_slice(&group.to_be_bytes());
    // NFULA_CFG_CMD { u8 command }, padded to 4.
    b.extend_from_slice(&5u16.to_ne_bytes());
    b.extend_from_slice(&NFULA_CFG_CMD.to_ne_bytes());
    b.extend_from_slice(&[NFULNL_CFG_CMD_BIND, 0, 0, 0]);
    // NFULA_CFG_MODE { be32 copy_range, u8 copy_mode, u8 pad }, padded to 4.
    b.extend_from_slice(&10u16.to_ne_bytes());
    b.extend_from_slice(&NFULA_CFG_MODE.to_ne_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(&[NFULNL_COPY_NONE, 0, 0, 0]);
    let len = b.len() as u32;
    b[0..4].copy_from_slice(&len.to_ne_bytes());
    b
}

/// The error code of an `NLMSG_ERROR` acknowledgement for `seq` (0: success), if `buf`
/// holds one.
fn ack_error(buf: &[u8], seq: u32) -> Option<i32> {
    let mut off = 0;
    while off + 20 <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().ok()?);
        let s = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().ok()?);
        if len < 16 || off + len > buf.len() {
            return None;
        }
        if kind == 2 && s == seq {
            return Some(i32::from_ne_bytes(buf[off + 16..off + 20].try_into().ok()?));
        }
        off += (len + 3) & !3;
    }
    None
}

/// The `NFT_MSG_GETTABLE` request for `inet <table>` (with an acknowledgement).
pub fn get_table_request(table: &str, seq: u32) -> Vec<u8> {
    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NFT_MSG_GETTABLE: u16 = 1;
    const NFPROTO_INET: u8 = 1;
    const NFTA_TABLE_NAME: u16 = 1;
    let mut b = Vec::with_capacity(32 + table.len());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE).to_ne_bytes());
    b.extend_from_slice(&(0x1u16 | 0x4).to_ne_bytes()); // NLM_F_REQUEST | NLM_F_ACK
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&[NFPROTO_INET, 0, 0, 0]);
    let name_len = table.len() + 1;
    b.extend_from_slice(&((4 + name_len) as u16).to_ne_bytes());
    b.extend_from_slice(&NFTA_TABLE_NAME.to_ne_bytes());
    b.extend_from_slice(table.as_bytes());
    b.push(0);
    while b.len() % 4 != 0 {
        b.push(0);
    }
    let len = b.len() as u32;
    b[0..4].copy_from_slice(&len.to_ne_bytes());
    b
}

/// Asks the kernel whether `inet <table>` exists: one netlink round trip, no `nft` run and
/// no listing. `None` when the answer could not be read.
async fn table_exists(
    sock: &mut rtnetlink::sys::TokioSocket,
    table: &str,
    seq: u32,
) -> Option<bool> {
    use rtnetlink::sys::AsyncSocketExt;
    sock.send(&get_table_request(table, seq)).await.ok()?;
    for _ in 0..8 {
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        sock.recv(&mut buf).await.ok()?;
        if let Some(e) = ack_error(&buf, seq) {
            return Some(e == 0);
        }
    }
    None
}

fn nfnl_socket() -> std::io::Result<rtnetlink::sys::TokioSocket> {
    use rtnetlink::sys::protocols::NETLINK_NETFILTER;
    use rtnetlink::sys::{AsyncSocket, SocketAddr, TokioSocket};
    let mut sock = TokioSocket::new(NETLINK_NETFILTER)?;
    sock.socket_mut().bind_auto()?;
    sock.socket_mut().connect(&SocketAddr::new(0, 0))?;
    Ok(sock)
}

/// A socket bound to [`NFLOG_GROUP`]: readable when a forged packet was logged.
struct Nflog {
    sock: rtnetlink::sys::TokioSocket,
}

impl Nflog {
    async fn open(group: u16) -> std::io::Result<Nflog> {
        use rtnetlink::sys::AsyncSocketExt;
        let sock = nfnl_socket()?;
        sock.send(&nflog_bind_request(group, 1)).await?;
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        sock.recv(&mut buf).await?;
        match ack_error(&buf, 1) {
            Some(0) => Ok(Nflog { sock }),
            Some(e) => Err(std::io::Error::from_raw_os_error(-e)),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "no acknowledgement of the NFLOG bind",
            )),
        }
    }

    /// Waits until something was logged (one datagram per logged packet, at most a few
    /// per second; an overrun also means something was logged).
    async fn logged(&mut self) -> std::io::Result<()> {
        use rtnetlink::sys::AsyncSocketExt;
        let mut buf: Vec<u8> = Vec::with_capacity(8192);
        match self.sock.recv(&mut buf).await {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Counters of the anti-spoofing task, for `status` and metrics.
#[derive(Debug, Default)]
pub struct SpoofStats {
    /// Bindings held.
    pub bindings: std::sync::atomic::AtomicU64,
    /// Forged packets dropped (counted) since start.
    pub dropped: std::sync::atomic::AtomicU64,
    /// Spoofing detections sent.
    pub detections: std::sync::atomic::AtomicU64,
}

/// Runs [`run`] on a thread of its own (`egd-antispoof`, like the counter reader's), with a
/// one-thread runtime: its `nft` children and neighbour dumps stay off the workers that
/// carry the detector.
pub fn spawn(
    policy_rx: watch::Receiver<Arc<Policy>>,
    tx: mpsc::Sender<Event>,
    stop: watch::Receiver<bool>,
    stats: Arc<SpoofStats>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("egd-antispoof".into())
        .spawn(move || rt.block_on(run(policy_rx, tx, stop, stats)))
}

/// The task: learns bindings, keeps the table in step, reads the drops, sends detections.
/// Ends when `stop` turns true or the decision task is gone.
pub async fn run(
    mut policy_rx: watch::Receiver<Arc<Policy>>,
    tx: mpsc::Sender<Event>,
    mut stop: watch::Receiver<bool>,
    stats: Arc<SpoofStats>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut policy = Arc::clone(&policy_rx.borrow_and_update());
    let table = table_name(&policy.enforcement.table);
    let handle = match rtnetlink::new_connection() {
        Ok((conn, handle, _)) => {
            tokio::spawn(conn);
            Some(handle)
        }
        Err(e) => {
            warn!(error = %e, "anti-spoofing: no netlink connection; only static bindings apply");
            None
        }
    };
    let now = Instant::now();
    let mut bindings = Bindings::new(&policy, now);
    for (a, m) in kernel_bindings(&table).await {
        bindings.observe(a, m, now);
    }
    let mut counter = SpoofCounter::default();
    let mut written = false;
    let mut write_failed = false;
    let mut removed = false;
    // The drop counters are listed (an `nft` run) only when a forged packet was logged, or
    // when the ruleset generation moved (someone committed: the table may be gone); an idle
    // or flooded router pays one netlink round trip per tick. Without NFLOG or the
    // generation id, they are listed every tick.
    let mut nflog = match Nflog::open(NFLOG_GROUP).await {
        Ok(n) => Some(n),
        Err(e) => {
            warn!(group = NFLOG_GROUP, error = %e,
                "anti-spoofing: cannot bind the NFLOG group; the drop counters are listed every tick");
            None
        }
    };
    let mut genw = crate::enforce::genid::GenWatch::open().ok();
    let mut verified_gen: Option<u32> = None;
    let mut probe = nfnl_socket().ok();
    let mut seq: u32 = 0x5000;
    let mut pending = false;
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            logged = async {
                match nflog.as_mut() {
                    Some(n) => n.logged().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Err(e) = logged {
                    debug!(error = %e, "anti-spoofing: NFLOG read failed");
                }
                pending = true;
                continue;
            }
            changed = policy_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                policy = Arc::clone(&policy_rx.borrow_and_update());
                bindings.set_policy(&policy, Instant::now());
            }
            _ = stop.changed() => {
                if *stop.borrow() {
                    return;
                }
            }
        }
        if !policy.anti_spoofing.enabled {
            if !removed {
                match nft(&["delete", "table", "inet", &table], None).await {
                    Ok(_) => info!(%table, "anti-spoofing off: its table removed"),
                    Err(e) if e.contains("No such file") => {}
                    Err(e) => {
                        warn!(%table, error = %e, "anti-spoofing off: cannot remove its table")
                    }
                }
                removed = true;
                written = false;
            }
            continue;
        }
        removed = false;
        let now = Instant::now();
        if let Some(h) = &handle {
            match neighbours(h).await {
                Ok(entries) => {
                    for (a, m) in entries {
                        bindings.observe(a, m, now);
                    }
                }
                Err(e) => debug!(error = %e, "anti-spoofing: neighbour table not read"),
            }
        }
        bindings.expire(now);
        stats.bindings.store(bindings.len() as u64, Relaxed);
        // Someone committed (the generation moved): is the table still there? A netlink
        // question, not a listing: listing the table every time the enforcer commits cost
        // the agent ~150 MiB of RSS under a conntrack storm (measured, not understood).
        let current_gen = match genw.as_mut() {
            Some(g) => g.get().await.ok(),
            None => None,
        };
        let mut gone = false;
        if written && (current_gen.is_none() || current_gen != verified_gen) {
            seq = seq.wrapping_add(1);
            let exists = match probe.as_mut() {
                Some(p) => table_exists(p, &table, seq).await,
                None => None,
            };
            match exists {
                Some(false) => gone = true,
                Some(true) => verified_gen = current_gen,
                None => {}
            }
        }
        // The drop counters: when a forged packet was logged (or every tick without NFLOG).
        let mut readings = Vec::new();
        if (pending || nflog.is_none()) && written && !gone {
            pending = false;
            match nft(&["-j", "list", "sets", "table", "inet", &table], None).await {
                Ok(json) => match parse_spoofed(&json) {
                    Ok(r) => readings = r,
                    Err(e) => warn!(%table, error = %e, "anti-spoofing: unreadable drop counters"),
                },
                Err(_) => gone = true,
            }
        }
        if bindings.dirty || gone || !written {
            match write(&table, &bindings, policy.enforcing()).await {
                Ok(()) => {
                    if !written || gone {
                        info!(%table, bindings = bindings.len(), enforcing = policy.enforcing(),
                            "anti-spoofing table written");
                    }
                    bindings.dirty = false;
                    written = true;
                    write_failed = false;
                }
                Err(e) => {
                    if !write_failed {
                        warn!(%table, error = %e, "anti-spoofing: cannot write its table; retrying every second");
                    }
                    write_failed = true;
                    continue;
                }
            }
        }
        let update = counter.update(&readings, &policy.anti_spoofing, now, |m| {
            !bindings.addresses_of(m, 1).is_empty()
        });
        stats.dropped.store(counter.dropped, Relaxed);
        for (mac, sources) in &update.unbound {
            let forged: Vec<String> = sources
                .iter()
                .map(|s| format!("{}×{}", s.key, s.count))
                .collect();
            warn!(mac = %format_mac(*mac), forged = %forged.join(" "),
                "anti-spoofing: forged source addresses from a MAC with no binding: \
                 dropped, but no address to hold");
        }
        let mut out = Vec::new();
        for (mac, sources) in update.senders {
            let found = detections(
                &policy,
                &bindings,
                mac,
                &sources,
                policy.anti_spoofing.window,
                Time::now(),
            );
            counter.detected(mac, &policy.anti_spoofing, now);
            for d in &found {
                warn!(source = %d.source, mac = %format_mac(mac), forged = sources.len(),
                    "anti-spoofing: forged source addresses; the sender is detected");
            }
            stats.detections.fetch_add(found.len() as u64, Relaxed);
            out.extend(found);
        }
        if !out.is_empty() && tx.send(Event::Detections(out)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Mac = [2, 0, 0, 0, 0, 0x0a];
    const B: Mac = [2, 0, 0, 0, 0, 0x0b];

    fn policy(extra: &str) -> Policy {
        let text = format!(
            "version: 1\nnetworks:\n  - prefix: 203.0.113.0/24\n  - prefix: 2001:db8:c::/64\nanti_spoofing:\n  rebind_after: 10m\n  packets: 10\n  window: 60s\n{extra}"
        );
        Policy::from_text(&text, std::path::Path::new("p.yaml")).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn netlink_requests_are_well_formed_and_acks_are_read() {
        let b = nflog_bind_request(17_735, 9);
        assert_eq!(b.len(), 40);
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(u16::from_ne_bytes(b[4..6].try_into().unwrap()), 0x0401);
        assert_eq!(&b[18..20], &17_735u16.to_be_bytes());
        let t = get_table_request("egressguard_spoof", 3);
        assert_eq!(t.len() % 4, 0);
        assert_eq!(u16::from_ne_bytes(t[4..6].try_into().unwrap()), 0x0a01);
        assert!(t.windows(18).any(|w| w == b"egressguard_spoof\0"));
        // An NLMSG_ERROR for seq 3 with -ENOENT, after an unrelated message.
        let mut m = Vec::new();
        m.extend_from_slice(&20u32.to_ne_bytes());
        m.extend_from_slice(&0x0a00u16.to_ne_bytes());
        m.extend_from_slice(&[0, 0]);
        m.extend_from_slice(&3u32.to_ne_bytes());
        m.extend_from_slice(&[0; 8]);
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes());
        m.extend_from_slice(&[0, 0]);
        m.extend_from_slice(&3u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&(-2i32).to_ne_bytes());
        m.extend_from_slice(&[0; 16]);
        assert_eq!(ack_error(&m, 3), Some(-2));
        assert_eq!(ack_error(&m, 4), None);
        assert_eq!(
            ack_error(&m[..10], 3),
            None,
            "truncated: no answer, no panic"
        );
    }

    #[test]
    fn macs_parse_in_both_spellings_and_nothing_else() {
        assert_eq!(
            parse_mac("02:00:5E:10:00:0a"),
            Some([2, 0, 0x5e, 0x10, 0, 0x0a])
        );
        assert_eq!(
            parse_mac("02-00-5e-10-00-0a"),
            Some([2, 0, 0x5e, 0x10, 0, 0x0a])
        );
        for bad in [
            "",
            "02:00:5e:10:00",
            "02:00:5e:10:00:0a:01",
            "02:00:5e:10:00:zz",
            "020:0:5e:10:00:0a",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        assert_eq!(format_mac([2, 0, 0x5e, 0x10, 0, 0x0a]), "02:00:5e:10:00:0a");
    }

    #[test]
    fn a_poisoned_neighbour_entry_does_not_move_a_binding_while_its_owner_is_seen() {
        let p = policy("");
        let t0 = Instant::now();
        let mut b = Bindings::new(&p, t0);
        assert!(b.observe(ip("203.0.113.11"), B, t0), "first seen: learnt");
        // The poisoner claims .11 for an hour, while the owner keeps answering.
        for m in 1..60 {
            let t = t0 + Duration::from_secs(60 * m);
            assert!(!b.observe(ip("203.0.113.11"), A, t), "moved at minute {m}");
            b.observe(ip("203.0.113.11"), B, t + Duration::from_secs(1));
        }
        assert_eq!(b.mac_of(ip("203.0.113.11")), Some(B));
        // The owner is gone (replaced server): after rebind_after the new MAC takes it.
        let t = t0 + Duration::from_secs(3600 + 601);
        assert!(b.observe(ip("203.0.113.11"), A, t));
        assert_eq!(b.mac_of(ip("203.0.113.11")), Some(A));
    }

    #[test]
    fn static_exempt_and_foreign_addresses_are_never_learnt() {
        let p = policy(
            "  bindings:\n    - {address: 203.0.113.7, mac: \"02:00:00:00:00:0b\"}\n  exempt: [203.0.113.100/30]\n",
        );
        let t0 = Instant::now();
        let mut b = Bindings::new(&p, t0);
        let late = t0 + Duration::from_secs(86_000);
        assert!(
            !b.observe(ip("203.0.113.7"), A, late),
            "a static binding never moves"
        );
        assert_eq!(b.mac_of(ip("203.0.113.7")), Some(B));
        assert!(!b.observe(ip("203.0.113.101"), A, t0), "exempt");
        assert!(
            !b.observe(ip("198.51.100.1"), A, t0),
            "outside the networks"
        );
        assert!(!b.observe(ip("203.0.113.12"), [0; 6], t0), "no MAC");
        assert!(b.observe(ip("2001:db8:c::12"), A, t0), "IPv6 too");
        assert_eq!(b.addresses_of(A, 8), vec![ip("2001:db8:c::12")]);
        // Forgotten after a day unseen; the static one stays.
        b.expire(t0 + FORGET_AFTER + Duration::from_secs(1));
        assert_eq!(b.len(), 1);
        assert_eq!(b.mac_of(ip("203.0.113.7")), Some(B));
    }

    #[test]
    fn learning_stops_at_max_bindings() {
        let p = policy("  max_bindings: 2\n");
        let t0 = Instant::now();
        let mut b = Bindings::new(&p, t0);
        assert!(b.observe(ip("203.0.113.1"), A, t0));
        assert!(b.observe(ip("203.0.113.2"), A, t0));
        assert!(!b.observe(ip("203.0.113.3"), A, t0));
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn the_script_binds_every_address_and_drops_only_when_enforcing() {
        let p = policy("");
        let t0 = Instant::now();
        let mut b = Bindings::new(&p, t0);
        b.observe(ip("203.0.113.10"), A, t0);
        b.observe(ip("2001:db8:c::11"), B, t0);
        let s = b.script("egressguard_spoof", true);
        assert!(
            s.contains(
                "add element inet egressguard_spoof bind4 { 203.0.113.10 . 02:00:00:00:00:0a }"
            ),
            "{s}"
        );
        assert!(
            s.contains("add element inet egressguard_spoof bound6 { 2001:db8:c::11 }"),
            "{s}"
        );
        assert!(s.contains("priority raw"), "before conntrack: {s}");
        assert_eq!(s.matches(" counter drop comment").count(), 2, "{s}");
        assert_eq!(
            s.matches("counter } comment").count(),
            2,
            "count rules: {s}"
        );
        assert_eq!(
            b.script("egressguard_spoof", false)
                .matches(" drop ")
                .count(),
            0
        );
    }

    #[test]
    fn forged_packets_from_one_mac_over_the_threshold_detect_its_own_addresses() {
        let p = policy("");
        let cfg = &p.anti_spoofing;
        let t0 = Instant::now();
        let mut b = Bindings::new(&p, t0);
        b.observe(ip("203.0.113.10"), A, t0);
        b.observe(ip("203.0.113.11"), B, t0);
        let mut c = SpoofCounter::default();
        let r = |packets| SpoofReading {
            mac: A,
            source: ip("203.0.113.11"),
            packets,
        };
        let bound = |m: Mac| !b.addresses_of(m, 1).is_empty();
        assert!(c.update(&[r(4)], cfg, t0, bound).senders.is_empty());
        let hit = c
            .update(&[r(12)], cfg, t0 + Duration::from_secs(1), bound)
            .senders;
        assert_eq!(hit.len(), 1);
        assert_eq!(hit[0].0, A);
        assert_eq!(
            hit[0].1,
            vec![Counted {
                key: ip("203.0.113.11"),
                count: 12
            }]
        );
        let d = detections(&p, &b, A, &hit[0].1, cfg.window, Time(5_000_000_000_000));
        assert_eq!(d.len(), 1);
        assert_eq!(
            d[0].source,
            "203.0.113.10/32".parse::<IpNet>().unwrap(),
            "the sender"
        );
        assert_eq!(d[0].category, Category::Spoofing);
        let ev = d[0].evidence.spoofing.as_ref().unwrap();
        assert_eq!(ev.mac, "02:00:00:00:00:0a");
        c.detected(A, cfg, t0 + Duration::from_secs(1));
        assert!(
            c.update(&[r(30)], cfg, t0 + Duration::from_secs(2), bound)
                .senders
                .is_empty(),
            "quiet in the window"
        );
        // Below the threshold once the window has passed: slow drips are not detected.
        let later = t0 + Duration::from_secs(200);
        assert!(c.update(&[r(35)], cfg, later, bound).senders.is_empty());
        assert_eq!(c.dropped, 35);
        // An element that expired and came back counts from zero.
        assert!(
            c.update(&[r(3)], cfg, later + Duration::from_secs(1), bound)
                .senders
                .is_empty()
        );
        assert_eq!(c.dropped, 38);
    }

    #[test]
    fn unbound_senders_are_reported_once_per_window_and_never_tracked() {
        let p = policy("");
        let cfg = &p.anti_spoofing;
        let t0 = Instant::now();
        let mut c = SpoofCounter::default();
        // A flood from 10,000 random MACs, none bound.
        let readings: Vec<SpoofReading> = (0..10_000u32)
            .map(|i| {
                let [a, b, c2, d] = i.to_be_bytes();
                SpoofReading {
                    mac: [2, a, b, c2, d, 1],
                    source: ip("203.0.113.11"),
                    packets: 100,
                }
            })
            .collect();
        let u = c.update(&readings, cfg, t0, |_| false);
        assert!(u.senders.is_empty());
        assert_eq!(u.unbound.len(), UNBOUND_REPORTED, "bounded report");
        assert!(c.recent.is_empty(), "unbound MACs are not tracked");
        assert_eq!(c.dropped, 1_000_000);
        let more: Vec<SpoofReading> = readings
            .iter()
            .map(|r| SpoofReading { packets: 200, ..*r })
            .collect();
        let again = c.update(&more, cfg, t0 + Duration::from_secs(1), |_| false);
        assert_eq!(
            again.unbound.len(),
            UNBOUND_REPORTED,
            "others, not the same again"
        );
        assert!(
            again
                .unbound
                .iter()
                .all(|(m, _)| !u.unbound.iter().any(|(n, _)| n == m))
        );
    }

    #[test]
    fn the_spoofed_set_listing_parses_and_garbage_is_an_error_not_a_panic() {
        let json = br#"{"nftables":[{"metainfo":{"version":"1.0.6"}},{"set":{"family":"inet","name":"spoofed4","table":"t","type":["ether_addr","ipv4_addr"],"elem":[{"elem":{"val":{"concat":["36:e7:6a:b4:0a:4c","203.0.113.11"]},"expires":296,"counter":{"packets":5,"bytes":200}}},{"elem":{"val":{"concat":["zz","203.0.113.11"]}}},"odd"]}}]}"#;
        let r = parse_spoofed(json).unwrap();
        assert_eq!(
            r,
            vec![SpoofReading {
                mac: [0x36, 0xe7, 0x6a, 0xb4, 0x0a, 0x4c],
                source: ip("203.0.113.11"),
                packets: 5
            }]
        );
        assert!(parse_spoofed(b"{not json").is_err());
        let binds = br#"{"nftables":[{"set":{"name":"bind4","type":["ipv4_addr","ether_addr"],"elem":[{"concat":["203.0.113.10","36:e7:6a:b4:0a:4c"]},{"concat":["x","36:e7:6a:b4:0a:4c"]},{"concat":["203.0.113.11"]}]}}]}"#;
        assert_eq!(
            parse_bindings(binds),
            vec![(ip("203.0.113.10"), [0x36, 0xe7, 0x6a, 0xb4, 0x0a, 0x4c])]
        );
        assert!(parse_bindings(b"garbage").is_empty());
        assert!(parse_spoofed(b"{}").is_err());
        assert!(parse_spoofed(br#"{"nftables":[]}"#).unwrap().is_empty());
    }
}
