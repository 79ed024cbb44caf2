//! Per-source packet and byte counters from the agent's nft table.
//!
//! The table `inet <policy.enforcement.table>` (built by `enforce`) holds two dynamic sets,
//! `src_counters4` and `src_counters6`, filled by a forward-chain rule with one element per
//! customer source and a counter on each element. Every `counter_interval` the reader takes
//! one snapshot of the six counter sets, one `nft -j list set inet <T> <set>` each (nft
//! 1.0.6 refuses two `list set` commands in one invocation, and a `list sets` of the table
//! would list the flood meters' sets too), and turns the differences into
//! [`CounterSample`]s.
//!
//! Elements come and go: an element expires after the set's timeout without traffic and may
//! come back later with fresh counters. A counter that went down, or an address not in the
//! previous snapshot, is a new element whose whole count falls in this interval; the first
//! snapshot after start only sets the baseline. (The set's timeout must be well above the
//! interval, or an element could expire and outgrow its old count within one interval.)
//!
//! What the enforce table must contain (checked with nft 1.0.6 on Linux 6.18; `update`
//! refreshes the timeout on every packet, so an element lives as long as its source sends):
//!
//! ```text
//! set customers4    { type ipv4_addr; flags interval; elements = { <customer v4 prefixes> } }
//! set customers6    { type ipv6_addr; flags interval; elements = { <customer v6 prefixes> } }
//! set src_counters4 { type ipv4_addr; size 65536; flags dynamic,timeout; timeout 10m; }
//! set src_counters6 { type ipv6_addr; size 65536; flags dynamic,timeout; timeout 10m; }
//! chain forward {
//!     type filter hook forward priority filter; policy accept;
//!     ip saddr @customers4 update @src_counters4 { ip saddr counter }
//!     ip6 saddr @customers6 update @src_counters6 { ip6 saddr counter }
//! }
//! ```
//!
//! Two more pairs of sets count what one packet counter cannot tell from a backup stream,
//! per source and the same way (`flood.udp_pps`, `flood.icmp_pps`):
//!
//! ```text
//! set src_udp4  { type ipv4_addr; size 65536; flags dynamic,timeout; timeout 5m; }   (and 6)
//! set src_echo4 { type ipv4_addr; size 65536; flags dynamic,timeout; timeout 5m; }   (and 6)
//!     ip saddr @customers4 meta l4proto udp ct state new update @src_udp4 { ip saddr counter }
//!     ip saddr @customers4 icmp type echo-request update @src_echo4 { ip saddr counter }
//!     ip6 saddr @customers6 icmpv6 type echo-request update @src_echo6 { ip6 saddr counter }
//! ```
//!
//! `ct state new` on a UDP packet from the customer means its flow has seen no reply yet (a
//! flow the customer's own service answers is in the reply direction, never `new`). Their
//! deltas go in the same [`CounterSample`] as the source's packet count (`udp_packets`,
//! `echo_packets`).
//!
//! The counting rules must come before any rule that drops blocked sources if blocked traffic
//! should still be measured (after it, if not). The table must also hold at least one rule
//! with a `ct` expression (e.g. `ct state invalid drop`), or conntrack does not track
//! forwarded traffic in the namespace at all and the listener sees no events.

use std::collections::HashMap;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::Sender;

use crate::messages::{CounterSample, Observation, Time};

use super::filter::FilterHandle;
use super::nftset::SetDumper;
use super::{ObserveError, ObserveStats, add};

/// Most samples sent to the detector in one batch.
pub const COUNTER_BATCH: usize = 4096;

/// Names of the counter sets in the agent's table.
pub const COUNTER_SETS: [&str; 2] = ["src_counters4", "src_counters6"];

/// Names of the per-source counters of unanswered UDP packets.
pub const UDP_SETS: [&str; 2] = ["src_udp4", "src_udp6"];

/// Names of the per-source counters of echo requests.
pub const ECHO_SETS: [&str; 2] = ["src_echo4", "src_echo6"];

/// Whether a counter set may be missing (a table written by an older agent has no class
/// counters): it then reads as empty. The per-source packet counters must be there.
fn optional(set: &str) -> bool {
    !COUNTER_SETS.contains(&set)
}

/// What a counter set counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Counted {
    /// Every packet of the source ([`COUNTER_SETS`]).
    #[default]
    All,
    /// UDP packets of flows not answered ([`UDP_SETS`]).
    UdpUnanswered,
    /// ICMP/ICMPv6 echo requests ([`ECHO_SETS`]).
    Echo,
}

impl Counted {
    fn of_set(name: &str) -> Option<Counted> {
        if COUNTER_SETS.contains(&name) {
            Some(Counted::All)
        } else if UDP_SETS.contains(&name) {
            Some(Counted::UdpUnanswered)
        } else if ECHO_SETS.contains(&name) {
            Some(Counted::Echo)
        } else {
            None
        }
    }
}

/// One element's counter as read from nft.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    /// The source address.
    pub addr: IpAddr,
    /// Packets since the element was created.
    pub packets: u64,
    /// Bytes since the element was created.
    pub bytes: u64,
    /// Which set it is from.
    pub counted: Counted,
}

/// Reads the counter sets out of `nft -j list sets` output. Elements without a counter, and
/// sets other than [`COUNTER_SETS`], [`UDP_SETS`] and [`ECHO_SETS`], are skipped.
///
/// The listing is read in one pass into typed values, never into a JSON tree: a counter set
/// of 65,536 elements is ~6 MB of JSON, which as a `serde_json::Value` tree took ~85 MB of
/// heap every interval (and kept the agent's resident memory ~190 MB above its tables).
pub fn parse_nft_sets(json: &[u8]) -> Result<Vec<Reading>, ObserveError> {
    let listing: listing::Listing = serde_json::from_slice(json).map_err(ObserveError::NftJson)?;
    Ok(listing
        .nftables
        .into_iter()
        .filter_map(|item| item.set)
        .filter_map(|set| Some((Counted::of_set(&set.name)?, set.elem)))
        .flat_map(|(counted, elems)| {
            elems.into_iter().filter_map(move |e| match e {
                listing::Elem::Counted(r) => Some(Reading { counted, ..r }),
                listing::Elem::Other => None,
            })
        })
        .collect())
}

/// The shape of `nft -j list sets` (libnftables-json(5)) as far as the counters need it;
/// unknown keys are skipped as they stream by.
mod listing {
    use std::fmt;
    use std::net::IpAddr;

    use serde::Deserialize;
    use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

    use super::{Counted, Reading};

    #[derive(Deserialize)]
    pub(super) struct Listing {
        #[serde(default)]
        pub(super) nftables: Vec<Item>,
    }

    /// One object of the `nftables` array (`metainfo`, `set`, ...): only sets are kept.
    #[derive(Deserialize)]
    pub(super) struct Item {
        #[serde(default)]
        pub(super) set: Option<Set>,
    }

    #[derive(Deserialize)]
    pub(super) struct Set {
        #[serde(default)]
        pub(super) name: String,
        #[serde(default)]
        pub(super) elem: Vec<Elem>,
    }

    /// A set element: `{"elem": {"val": ADDR, "counter": {...}, ...}}` with an address and a
    /// counter, or anything else (a plain value, a prefix, a range, an element without a
    /// counter).
    pub(super) enum Elem {
        Counted(Reading),
        Other,
    }

    /// A key of an element object, read without allocating.
    #[derive(Deserialize)]
    #[serde(field_identifier, rename_all = "lowercase")]
    enum Key {
        Elem,
        #[serde(other)]
        Other,
    }

    #[derive(Deserialize)]
    struct Body {
        #[serde(default)]
        val: Val,
        #[serde(default)]
        counter: Option<Counter>,
    }

    #[derive(Deserialize)]
    struct Counter {
        #[serde(default)]
        packets: u64,
        #[serde(default)]
        bytes: u64,
    }

    /// An element's value: an address string, or anything else (`None`).
    #[derive(Default)]
    struct Val(Option<IpAddr>);

    impl<'de> Deserialize<'de> for Elem {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Elem, D::Error> {
            d.deserialize_any(ElemVisitor)
        }
    }

    struct ElemVisitor;

    impl<'de> Visitor<'de> for ElemVisitor {
        type Value = Elem;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a set element")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Elem, A::Error> {
            let mut out = Elem::Other;
            while let Some(key) = map.next_key::<Key>()? {
                if let Key::Elem = key {
                    let b: Body = map.next_value()?;
                    if let (Val(Some(addr)), Some(c)) = (b.val, b.counter) {
                        out = Elem::Counted(Reading {
                            addr,
                            packets: c.packets,
                            bytes: c.bytes,
                            counted: Counted::All,
                        });
                    }
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(out)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Elem, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Elem::Other)
        }

        fn visit_str<E>(self, _: &str) -> Result<Elem, E> {
            Ok(Elem::Other)
        }

        fn visit_u64<E>(self, _: u64) -> Result<Elem, E> {
            Ok(Elem::Other)
        }

        fn visit_i64<E>(self, _: i64) -> Result<Elem, E> {
            Ok(Elem::Other)
        }
    }

    impl<'de> Deserialize<'de> for Val {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Val, D::Error> {
            d.deserialize_any(ValVisitor)
        }
    }

    struct ValVisitor;

    impl<'de> Visitor<'de> for ValVisitor {
        type Value = Val;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an element value")
        }

        fn visit_str<E>(self, s: &str) -> Result<Val, E> {
            Ok(Val(s.parse().ok()))
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Val, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(Val(None))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Val, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Val(None))
        }

        fn visit_u64<E>(self, _: u64) -> Result<Val, E> {
            Ok(Val(None))
        }

        fn visit_i64<E>(self, _: i64) -> Result<Val, E> {
            Ok(Val(None))
        }
    }
}

/// Turns successive snapshots into per-interval deltas.
#[derive(Debug, Default)]
pub struct CounterDeltas {
    prev: HashMap<(IpAddr, Counted), (u64, u64)>,
    primed: bool,
}

impl CounterDeltas {
    /// An empty tracker: its first snapshot is the baseline.
    pub fn new() -> CounterDeltas {
        CounterDeltas::default()
    }

    /// Takes a snapshot read at `time`, `interval_ns` after the previous one, and returns a
    /// sample for every address that sent something since.
    pub fn update(
        &mut self,
        readings: &[Reading],
        time: Time,
        interval_ns: u64,
    ) -> Vec<CounterSample> {
        let mut next = HashMap::with_capacity(readings.len());
        let mut out: Vec<CounterSample> = Vec::new();
        // The per-class deltas, added to the address's sample after the pass.
        let mut classes: Vec<(IpAddr, Counted, u64)> = Vec::new();
        for r in readings {
            next.insert((r.addr, r.counted), (r.packets, r.bytes));
            if !self.primed {
                continue;
            }
            let (packets, bytes) = match self.prev.get(&(r.addr, r.counted)) {
                // Same element, still growing (or idle).
                Some(&(pp, pb)) if r.packets >= pp && r.bytes >= pb => {
                    (r.packets - pp, r.bytes - pb)
                }
                // Gone down: the element expired and came back; all of it is new.
                Some(_) => (r.packets, r.bytes),
                // Not there last time: created during this interval.
                None => (r.packets, r.bytes),
            };
            if packets == 0 && bytes == 0 {
                continue;
            }
            if r.counted != Counted::All {
                classes.push((r.addr, r.counted, packets));
                continue;
            }
            out.push(CounterSample {
                time,
                addr: r.addr,
                packets,
                bytes,
                interval_ns,
                udp_packets: 0,
                echo_packets: 0,
            });
        }
        if !classes.is_empty() {
            let at: HashMap<IpAddr, usize> =
                out.iter().enumerate().map(|(i, s)| (s.addr, i)).collect();
            for (addr, counted, packets) in classes {
                // Every packet a class set counts passed the all-packets rule first; an
                // address missing there (its set was full) gets a sample of its own.
                let i = match at.get(&addr) {
                    Some(&i) => i,
                    None => {
                        out.push(CounterSample {
                            time,
                            addr,
                            packets: 0,
                            bytes: 0,
                            interval_ns,
                            udp_packets: 0,
                            echo_packets: 0,
                        });
                        out.len() - 1
                    }
                };
                let s = &mut out[i];
                match counted {
                    Counted::UdpUnanswered => s.udp_packets = s.udp_packets.saturating_add(packets),
                    Counted::Echo => s.echo_packets = s.echo_packets.saturating_add(packets),
                    Counted::All => {}
                }
            }
        }
        self.prev = next;
        self.primed = true;
        out
    }
}

/// Reads the counter sets of one table at an interval.
#[derive(Debug)]
pub struct CounterReader {
    table: String,
    filter: Arc<FilterHandle>,
    deltas: CounterDeltas,
    last: Option<Instant>,
    stats: Arc<ObserveStats>,
    /// The netlink socket of the set dumps, opened on the first read.
    dumper: Option<SetDumper>,
    /// Reads since netlink last failed and `nft` was used instead (logged once per failure).
    fell_back: bool,
}

impl CounterReader {
    /// A reader of the sets in `inet <table>`, keeping customer sources only.
    pub fn new(table: impl Into<String>, filter: Arc<FilterHandle>) -> CounterReader {
        CounterReader {
            table: table.into(),
            filter,
            deltas: CounterDeltas::new(),
            last: None,
            stats: Arc::new(ObserveStats::default()),
            dumper: None,
            fell_back: false,
        }
    }

    /// Shares counters with a listener's (so `status` reads one [`ObserveStats`]).
    pub fn with_stats(mut self, stats: Arc<ObserveStats>) -> CounterReader {
        self.stats = stats;
        self
    }

    /// Whether the last read went over netlink (not `nft`).
    pub fn reads_over_netlink(&self) -> bool {
        self.dumper.is_some() && !self.fell_back
    }

    /// The reader's counters.
    pub fn stats(&self) -> Arc<ObserveStats> {
        self.stats.clone()
    }

    /// Reads the six counter sets and returns the raw readings: over netlink
    /// ([`super::nftset`]), or, where that fails, with one `nft -j list set` per set (a
    /// `list sets` of the table would also list the flood meters' sets, an element per
    /// sending source in each; nft 1.0.6 refuses two `list set` commands in one invocation).
    pub fn read_raw(&mut self) -> Result<Vec<Reading>, ObserveError> {
        let sets = COUNTER_SETS
            .iter()
            .map(|s| (*s, Counted::All))
            .chain(UDP_SETS.iter().map(|s| (*s, Counted::UdpUnanswered)))
            .chain(ECHO_SETS.iter().map(|s| (*s, Counted::Echo)));
        let netlink = match self.dumper.take() {
            Some(d) => Ok(d),
            None => SetDumper::open().map_err(|source| ObserveError::SetDump {
                set: "(socket)".into(),
                source,
            }),
        };
        let mut out = Vec::new();
        let failed = match netlink {
            Ok(mut d) => {
                let r = sets.clone().try_for_each(|(set, counted)| {
                    match d.dump(&self.table, set, counted, &mut out) {
                        Err(ObserveError::SetDump { source, .. })
                            if optional(set) && source.raw_os_error() == Some(libc::ENOENT) =>
                        {
                            Ok(())
                        }
                        r => r,
                    }
                });
                self.dumper = Some(d);
                r.err()
            }
            Err(e) => Some(e),
        };
        let Some(e) = failed else {
            if std::mem::take(&mut self.fell_back) {
                tracing::info!("counter sets read over netlink again");
            }
            return Ok(out);
        };
        let out = sets
            .map(|(set, _)| self.list_set(set))
            .collect::<Result<Vec<_>, _>>()?
            .concat();
        if !std::mem::replace(&mut self.fell_back, true) {
            tracing::warn!(
                error = %crate::logging::error_chain(&e),
                "cannot read the counter sets over netlink; reading them with nft"
            );
        }
        Ok(out)
    }

    fn list_set(&self, set: &str) -> Result<Vec<Reading>, ObserveError> {
        let args = ["-j", "list", "set", "inet", self.table.as_str(), set];
        let out = Command::new("nft")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(ObserveError::NftSpawn)?;
        if !out.status.success() {
            if optional(set) && String::from_utf8_lossy(&out.stderr).contains("No such file") {
                return Ok(Vec::new());
            }
            return Err(ObserveError::NftFailed {
                args: args.join(" "),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        parse_nft_sets(&out.stdout)
    }

    /// Reads once and returns the samples since the previous read (none on the first).
    pub fn read(&mut self) -> Result<Vec<CounterSample>, ObserveError> {
        let readings = match self.read_raw() {
            Ok(r) => r,
            Err(e) => {
                add(&self.stats.counter_errors, 1);
                return Err(e);
            }
        };
        add(&self.stats.counter_reads, 1);
        let now = Instant::now();
        let interval_ns = self
            .last
            .map(|t| u64::try_from(now.duration_since(t).as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        self.last = Some(now);
        let filter = self.filter.get();
        let readings: Vec<Reading> = readings
            .into_iter()
            .filter(|r| filter.contains(r.addr))
            .collect();
        let samples = self.deltas.update(&readings, Time::now(), interval_ns);
        add(&self.stats.counter_samples, samples.len() as u64);
        Ok(samples)
    }

    /// Starts a thread that reads every `interval` and sends the samples as one
    /// `Vec<Observation::Counters>` per read. Runs `nft` in the calling thread's network
    /// namespace.
    pub fn spawn(
        mut self,
        interval: Duration,
        tx: Sender<Vec<Observation>>,
    ) -> Result<CounterHandle, ObserveError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let stats = self.stats.clone();
        let thread = std::thread::Builder::new()
            .name("egd-counters".into())
            .spawn(move || {
                let mut last_error: Option<Instant> = None;
                let mut next = Instant::now();
                while !flag.load(Ordering::Relaxed) {
                    match self.read() {
                        Ok(samples) if !samples.is_empty() => {
                            // In batches of the listener's size: the channel to the detector
                            // is bounded in batches, so a batch must be bounded too (one
                            // batch of every source's sample is 10 MB at 65,536 sources).
                            let mut closed = false;
                            for chunk in samples.chunks(COUNTER_BATCH) {
                                let batch =
                                    chunk.iter().copied().map(Observation::Counters).collect();
                                if tx.blocking_send(batch).is_err() {
                                    closed = true;
                                    break;
                                }
                            }
                            if closed {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if last_error.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                                tracing::warn!(error = %e, "cannot read the nft counters");
                                last_error = Some(Instant::now());
                            }
                        }
                    }
                    next += interval;
                    let now = Instant::now();
                    if next < now {
                        next = now;
                    }
                    while !flag.load(Ordering::Relaxed) {
                        let now = Instant::now();
                        if now >= next {
                            break;
                        }
                        std::thread::park_timeout(next - now);
                    }
                }
            })
            .map_err(|e| ObserveError::Thread("counter reader", e))?;
        Ok(CounterHandle {
            stop,
            stats,
            thread: Some(thread),
        })
    }
}

/// The running counter reader. Dropping it stops the thread and waits for it.
#[derive(Debug)]
pub struct CounterHandle {
    stop: Arc<AtomicBool>,
    stats: Arc<ObserveStats>,
    thread: Option<JoinHandle<()>>,
}

impl CounterHandle {
    /// The reader's counters.
    pub fn stats(&self) -> Arc<ObserveStats> {
        self.stats.clone()
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for CounterHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"set": {"family": "inet", "name": "customers4", "table": "egdtest", "type": "ipv4_addr", "handle": 2, "flags": ["interval"], "elem": [{"prefix": {"addr": "203.0.113.0", "len": 24}}]}}, {"set": {"family": "inet", "name": "src_counters4", "table": "egdtest", "type": "ipv4_addr", "handle": 4, "size": 65536, "flags": ["timeout"], "timeout": 600, "elem": [{"elem": {"val": "203.0.113.5", "expires": 595, "counter": {"packets": 3, "bytes": 100}}}, {"elem": {"val": "203.0.113.6", "expires": 595}}]}}, {"set": {"family": "inet", "name": "src_counters6", "table": "egdtest", "type": "ipv6_addr", "handle": 5, "size": 65536, "flags": ["timeout"], "timeout": 600, "elem": [{"elem": {"val": "2001:db8:c::a", "expires": 599, "counter": {"packets": 7, "bytes": 700}}}]}}, {"set": {"family": "inet", "name": "blocked4", "table": "egdtest", "type": "ipv4_addr", "handle": 6, "elem": [{"elem": {"val": "203.0.113.9", "counter": {"packets": 1, "bytes": 1}}}]}}]}"#;

    #[test]
    fn reads_counter_sets_only() {
        let r = parse_nft_sets(LISTING.as_bytes()).unwrap();
        assert_eq!(
            r,
            vec![
                Reading {
                    addr: "203.0.113.5".parse().unwrap(),
                    packets: 3,
                    bytes: 100,
                    counted: Counted::All,
                },
                Reading {
                    addr: "2001:db8:c::a".parse().unwrap(),
                    packets: 7,
                    bytes: 700,
                    counted: Counted::All,
                },
            ]
        );
    }

    #[test]
    fn elements_of_other_shapes_are_skipped() {
        let odd = r#"{"nftables": [{"set": {"name": "src_counters4", "elem": [
            "203.0.113.1",
            {"prefix": {"addr": "203.0.113.0", "len": 24}},
            {"range": ["203.0.113.2", "203.0.113.3"]},
            {"elem": {"val": {"prefix": {"addr": "203.0.113.0", "len": 28}}, "counter": {"packets": 1, "bytes": 2}}},
            {"elem": {"val": "not an address", "counter": {"packets": 1, "bytes": 2}}},
            {"elem": {"counter": {"packets": 1, "bytes": 2}, "val": "203.0.113.4", "comment": "x"}},
            7
        ]}}]}"#;
        assert_eq!(
            parse_nft_sets(odd.as_bytes()).unwrap(),
            vec![rd("203.0.113.4", 1, 2)]
        );
    }

    #[test]
    fn a_full_counter_set_reads_in_one_pass() {
        let elems: Vec<String> = (0..65_536u32)
            .map(|i| {
                let a = std::net::Ipv4Addr::from(0x0A00_0000 | i);
                format!(r#"{{"elem": {{"val": "{a}", "timeout": 600, "expires": 599, "counter": {{"packets": {i}, "bytes": 1}}}}}}"#)
            })
            .collect();
        let json = format!(
            r#"{{"nftables": [{{"metainfo": {{}}}}, {{"set": {{"name": "src_counters4", "elem": [{}]}}}}]}}"#,
            elems.join(", ")
        );
        let r = parse_nft_sets(json.as_bytes()).unwrap();
        assert_eq!(r.len(), 65_536);
        assert_eq!(r[65_535], rd("10.0.255.255", 65_535, 1));
    }

    #[test]
    fn empty_sets_and_garbage() {
        let empty = r#"{"nftables": [{"metainfo": {}}, {"set": {"name": "src_counters6", "type": "ipv6_addr"}}]}"#;
        assert!(parse_nft_sets(empty.as_bytes()).unwrap().is_empty());
        assert!(parse_nft_sets(b"{}").unwrap().is_empty());
        assert!(matches!(
            parse_nft_sets(b"Error: no such table"),
            Err(ObserveError::NftJson(_))
        ));
    }

    fn rd(a: &str, p: u64, b: u64) -> Reading {
        Reading {
            addr: a.parse().unwrap(),
            packets: p,
            bytes: b,
            counted: Counted::All,
        }
    }

    fn class(a: &str, p: u64, counted: Counted) -> Reading {
        Reading {
            counted,
            ..rd(a, p, p * 100)
        }
    }

    #[test]
    fn class_sets_are_read_and_merged_into_the_address_sample() {
        let json = r#"{"nftables": [{"set": {"name": "src_counters4", "elem": [{"elem": {"val": "203.0.113.5", "counter": {"packets": 10, "bytes": 1000}}}]}}, {"set": {"name": "src_udp4", "elem": [{"elem": {"val": "203.0.113.5", "counter": {"packets": 7, "bytes": 700}}}]}}, {"set": {"name": "src_echo6", "elem": [{"elem": {"val": "2001:db8:c::a", "counter": {"packets": 3, "bytes": 300}}}]}}]}"#;
        let r = parse_nft_sets(json.as_bytes()).unwrap();
        assert_eq!(
            r,
            vec![
                rd("203.0.113.5", 10, 1000),
                class("203.0.113.5", 7, Counted::UdpUnanswered),
                class("2001:db8:c::a", 3, Counted::Echo),
            ]
        );
        let mut d = CounterDeltas::new();
        d.update(&r, Time(1), 0);
        let s = d.update(
            &[
                rd("203.0.113.5", 60_010, 6_001_000),
                class("203.0.113.5", 50_007, Counted::UdpUnanswered),
                class("2001:db8:c::a", 20_003, Counted::Echo),
            ],
            Time(2),
            1_000_000_000,
        );
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(
            (s[0].packets, s[0].udp_packets, s[0].echo_packets),
            (60_000, 50_000, 0)
        );
        // An address only in a class set (its all-packets element could not be made).
        assert_eq!(s[1].addr, "2001:db8:c::a".parse::<IpAddr>().unwrap());
        assert_eq!((s[1].packets, s[1].echo_packets), (0, 20_000));
        // The classes' elements are tracked apart from the address's: no mixing of counts.
        let s = d.update(
            &[
                rd("203.0.113.5", 60_020, 6_002_000),
                class("203.0.113.5", 50_007, Counted::UdpUnanswered),
            ],
            Time(3),
            1_000_000_000,
        );
        assert_eq!((s[0].packets, s[0].udp_packets), (10, 0));
    }

    #[test]
    fn first_snapshot_is_the_baseline_then_deltas() {
        let mut d = CounterDeltas::new();
        assert!(
            d.update(&[rd("203.0.113.5", 100, 10_000)], Time(1), 0)
                .is_empty()
        );
        let s = d.update(
            &[rd("203.0.113.5", 150, 15_000), rd("203.0.113.6", 5, 500)],
            Time(2),
            1_000_000_000,
        );
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].packets, s[0].bytes), (50, 5_000));
        assert_eq!(s[0].interval_ns, 1_000_000_000);
        assert_eq!(s[0].time, Time(2));
        assert_eq!(
            (s[1].packets, s[1].bytes),
            (5, 500),
            "new element counts whole"
        );
    }

    #[test]
    fn counter_going_down_is_a_new_element_not_a_negative_delta() {
        let mut d = CounterDeltas::new();
        d.update(&[rd("203.0.113.5", 100, 10_000)], Time(1), 0);
        let s = d.update(&[rd("203.0.113.5", 3, 300)], Time(2), 1);
        assert_eq!((s[0].packets, s[0].bytes), (3, 300));
    }

    #[test]
    fn idle_and_expired_addresses_send_nothing() {
        let mut d = CounterDeltas::new();
        d.update(
            &[rd("203.0.113.5", 100, 10_000), rd("203.0.113.6", 1, 1)],
            Time(1),
            0,
        );
        let s = d.update(&[rd("203.0.113.5", 100, 10_000)], Time(2), 1);
        assert!(s.is_empty());
        // 203.0.113.6 expired; when it comes back it counts from zero.
        let s = d.update(&[rd("203.0.113.6", 4, 40)], Time(3), 1);
        assert_eq!((s[0].packets, s[0].bytes), (4, 40));
    }
}
