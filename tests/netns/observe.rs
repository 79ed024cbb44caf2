//! The observers against the real kernel: a customer namespace makes TCP, UDP and ICMP flows
//! (IPv4 and IPv6) through the router namespace, where the conntrack listener and the counter
//! reader run; the tests assert the exact events and counters they delivered.
//!
//! Also here: an event flood that overflows a deliberately small socket buffer (ENOBUFS
//! counted, view resynchronised by a dump), the fixture capture used by the parser's unit
//! tests (`--ignored`), and the end-to-end rate measurement of docs/performance.md.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use egressguard::messages::{FlowEvent, FlowEventKind, Observation, TcpState, ct_status, proto};
use egressguard::netns::{Host, Netns, Topology};
use egressguard::observe::{
    ConntrackListener, CounterReader, CustomerFilter, FilterHandle, ListenerOptions, ObserveStats,
    Updates,
};
use tokio::sync::mpsc;

use crate::common::{repo, require_root};

const TABLE: &str = "egressguard";

/// The minimal table this module needs from `enforce` (same names as the full table).
fn counter_table() -> String {
    format!(
        r#"table inet {TABLE} {{
  set customers4 {{ type ipv4_addr; flags interval; elements = {{ 203.0.113.0/24 }} }}
  set customers6 {{ type ipv6_addr; flags interval; elements = {{ 2001:db8:c::/64 }} }}
  set src_counters4 {{ type ipv4_addr; size 65536; flags dynamic,timeout; timeout 10m; }}
  set src_counters6 {{ type ipv6_addr; size 65536; flags dynamic,timeout; timeout 10m; }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ct state invalid counter
    ip saddr @customers4 update @src_counters4 {{ ip saddr counter }}
    ip6 saddr @customers6 update @src_counters6 {{ ip6 saddr counter }}
  }}
}}
"#
    )
}

fn nft_apply(ns: &Netns, text: &str) {
    let mut c = ns
        .command(&["nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nft");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write table");
    let out = c.wait_with_output().expect("nft");
    assert!(
        out.status.success(),
        "nft -f failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn customer_filter() -> Arc<FilterHandle> {
    FilterHandle::new(CustomerFilter::new([
        Topology::CUSTOMER_V4.parse().unwrap(),
        Topology::CUSTOMER_V6.parse().unwrap(),
    ]))
}

/// A router with one customer (.10) and one internet host (.20) and the counter table.
fn topology() -> Topology {
    let mut topo = Topology::new().expect("topology");
    topo.add_customer(10).expect("customer");
    topo.add_internet_host(20).expect("internet host");
    nft_apply(&topo.router, &counter_table());
    topo
}

struct Rig {
    rx: mpsc::Receiver<Vec<Observation>>,
    listener: ConntrackListener,
    stats: Arc<ObserveStats>,
}

fn listen(topo: &Topology, opts: ListenerOptions) -> Rig {
    let (tx, rx) = mpsc::channel(1 << 16);
    let filter = customer_filter();
    let listener = topo
        .router
        .enter(move || ConntrackListener::open(filter, opts, tx))
        .expect("enter router")
        .expect("open listener");
    let stats = listener.stats();
    Rig {
        rx,
        listener,
        stats,
    }
}

impl Rig {
    /// Collects observations until `done` holds for what was collected, or `limit` passes.
    fn collect_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&[Observation]) -> bool,
    ) -> Vec<Observation> {
        let deadline = Instant::now() + limit;
        let mut all = Vec::new();
        loop {
            while let Ok(batch) = self.rx.try_recv() {
                all.extend(batch);
            }
            if done(&all) || Instant::now() >= deadline {
                return all;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn flows(obs: &[Observation]) -> Vec<FlowEvent> {
    obs.iter()
        .filter_map(|o| match o {
            Observation::Flow(e) => Some(*e),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// traffic
// ---------------------------------------------------------------------------------------------

/// One TCP connection from the customer to the internet host: connect, "ping"/"pong", close.
/// Returns the customer's source port.
fn tcp_flow(cust: &Host, inet: &Host, v6: bool, port: u16) -> u16 {
    let (src, dst) = if v6 {
        (cust.v6, inet.v6)
    } else {
        (cust.v4, inet.v4)
    };
    let listener = inet
        .ns
        .enter(move || TcpListener::bind(SocketAddr::new(dst, port)))
        .unwrap()
        .expect("bind tcp listener");
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut b = [0u8; 4];
        s.read_exact(&mut b).expect("server read");
        s.write_all(b"pong").expect("server write");
        let _ = s.read(&mut b);
    });
    let mut c = cust
        .ns
        .enter(move || {
            TcpStream::connect_timeout(&SocketAddr::new(dst, port), Duration::from_secs(3))
        })
        .unwrap()
        .expect("connect");
    let sport = c.local_addr().unwrap().port();
    assert_eq!(c.local_addr().unwrap().ip(), src);
    c.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");
    drop(c);
    server.join().unwrap();
    sport
}

/// One UDP exchange: a datagram from `sport` to `dport`, answered once.
fn udp_flow(cust: &Host, inet: &Host, v6: bool, sport: u16, dport: u16) {
    let (src, dst) = if v6 {
        (cust.v6, inet.v6)
    } else {
        (cust.v4, inet.v4)
    };
    let server = inet
        .ns
        .enter(move || UdpSocket::bind(SocketAddr::new(dst, dport)))
        .unwrap()
        .expect("bind udp server");
    server
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let client = cust
        .ns
        .enter(move || UdpSocket::bind(SocketAddr::new(src, sport)))
        .unwrap()
        .expect("bind udp client");
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    client
        .send_to(b"query", SocketAddr::new(dst, dport))
        .unwrap();
    let mut b = [0u8; 16];
    let (n, from) = server.recv_from(&mut b).expect("server got the datagram");
    server.send_to(&b[..n], from).unwrap();
    client.recv_from(&mut b).expect("client got the answer");
}

fn ping(cust: &Host, dst: IpAddr) {
    let d = dst.to_string();
    assert!(
        cust.ns.succeeds(&["ping", "-c", "1", "-W", "2", &d]),
        "ping {d} failed"
    );
}

/// Deletes the customer's conntrack entries in the router: destroy events follow.
fn destroy_flows(router: &Netns, src: IpAddr) {
    crate::common::require_tools("destroy_flows", &["conntrack"]);
    let fam = if src.is_ipv6() { "ipv6" } else { "ipv4" };
    let _ = router.run(&["conntrack", "-D", "-f", fam, "-s", &src.to_string()]);
}

// ---------------------------------------------------------------------------------------------
// tests
// ---------------------------------------------------------------------------------------------

fn find(
    evs: &[FlowEvent],
    kind: FlowEventKind,
    proto_: u8,
    pred: impl Fn(&FlowEvent) -> bool,
) -> Option<FlowEvent> {
    evs.iter()
        .find(|e| e.kind == kind && e.proto == proto_ && pred(e))
        .copied()
}

fn flows_of_one_family(v6: bool) {
    let topo = topology();
    let cust = &topo.customers[0];
    let inet = &topo.internet[0];
    let (src, dst) = if v6 {
        (cust.v6, inet.v6)
    } else {
        (cust.v4, inet.v4)
    };
    let mut rig = listen(
        &topo,
        ListenerOptions {
            updates: Updates::Signals,
            destroys: true,
            ..ListenerOptions::default()
        },
    );
    // The start dump ran (empty table for customers), and the listener is subscribed.
    let stats = rig.stats.clone();
    rig.collect_until(Duration::from_secs(5), |_| stats.snapshot().dumps >= 1);

    let sport = tcp_flow(cust, inet, v6, 8080);
    udp_flow(cust, inet, v6, 40053, 5353);
    ping(cust, dst);
    // Inbound flow from the internet: not a customer source, must not show up.
    ping(inet, src);
    destroy_flows(&topo.router, src);

    let icmp_req = if v6 { 128 } else { 8 };
    let icmp_proto = if v6 { proto::ICMPV6 } else { proto::ICMP };
    let want = |evs: &[FlowEvent]| {
        find(evs, FlowEventKind::Destroy, proto::TCP, |_| true).is_some()
            && find(evs, FlowEventKind::Destroy, proto::UDP, |_| true).is_some()
            && find(evs, FlowEventKind::Destroy, icmp_proto, |_| true).is_some()
    };
    let obs = rig.collect_until(Duration::from_secs(10), |o| want(&flows(o)));
    let all = flows(&obs);
    assert!(want(&all), "missing destroy events in {all:#?}");
    let filter = customer_filter().get();
    for e in &all {
        assert!(
            filter.contains(e.src),
            "only customer sources are kept: {e:?}"
        );
    }
    // The router's own multicast (IGMP/MLD from its bridge address, a customer-network
    // address) may show up too; the customer host's flows are the ones under test.
    let evs: Vec<FlowEvent> = all.into_iter().filter(|e| e.src == src).collect();
    for e in &evs {
        assert_eq!(e.dst, dst, "{e:?}");
    }

    // TCP: new (SYN_SENT), answered (SYN_RECV), established, destroyed with counters.
    let tcp_new =
        find(&evs, FlowEventKind::New, proto::TCP, |e| e.sport == sport).expect("tcp new event");
    assert_eq!(tcp_new.dport, 8080);
    assert_eq!(tcp_new.tcp_state, Some(TcpState::SynSent));
    assert!(!tcp_new.seen_reply());
    let answered = evs.iter().any(|e| {
        e.kind == FlowEventKind::Update
            && e.proto == proto::TCP
            && e.seen_reply()
            && matches!(e.tcp_state, Some(TcpState::SynRecv | TcpState::Established))
    });
    assert!(answered, "tcp update with the reply: {evs:#?}");
    assert!(
        find(&evs, FlowEventKind::Update, proto::TCP, |e| e.tcp_state
            == Some(TcpState::Established)
            && e.status & ct_status::ASSURED != 0)
        .is_some(),
        "tcp established+assured update: {evs:#?}"
    );
    assert!(
        !evs.iter().any(|e| e.kind == FlowEventKind::Update
            && matches!(
                e.tcp_state,
                Some(TcpState::FinWait | TcpState::TimeWait | TcpState::LastAck)
            )),
        "teardown updates are dropped under Updates::Signals"
    );
    let tcp_end = find(&evs, FlowEventKind::Destroy, proto::TCP, |e| {
        e.sport == sport
    })
    .expect("tcp destroy");
    assert!(tcp_end.seen_reply());
    // 3-way handshake + "ping" + FIN/ACKs: at least 5 packets each way is not guaranteed,
    // but both directions carried the 4-byte payloads.
    assert!(tcp_end.orig_packets.unwrap_or(0) >= 4, "{tcp_end:?}");
    assert!(tcp_end.reply_packets.unwrap_or(0) >= 3, "{tcp_end:?}");
    assert!(tcp_end.orig_bytes.unwrap_or(0) > 4 * 40, "{tcp_end:?}");
    let (start, stop) = (
        tcp_end.start.unwrap(),
        tcp_end.stop.expect("stop timestamp"),
    );
    assert!(stop >= start);

    // UDP: new with ports, reply seen, destroy with exactly one packet each way.
    let udp_new = find(&evs, FlowEventKind::New, proto::UDP, |_| true).expect("udp new");
    assert_eq!((udp_new.sport, udp_new.dport), (40053, 5353));
    assert!(!udp_new.seen_reply());
    let udp_end = find(&evs, FlowEventKind::Destroy, proto::UDP, |_| true).unwrap();
    assert!(udp_end.seen_reply());
    assert_eq!(udp_end.orig_packets, Some(1));
    assert_eq!(udp_end.reply_packets, Some(1));
    let ip_udp = if v6 { 40 + 8 + 5 } else { 20 + 8 + 5 };
    assert_eq!(udp_end.orig_bytes, Some(ip_udp));
    assert_eq!(udp_end.reply_bytes, Some(ip_udp));

    // ICMP: echo request, one each way.
    let icmp_new = find(&evs, FlowEventKind::New, icmp_proto, |_| true).expect("icmp new");
    assert_eq!(icmp_new.icmp, Some((icmp_req, 0)));
    assert_eq!((icmp_new.sport, icmp_new.dport), (0, 0));
    let icmp_end = find(&evs, FlowEventKind::Destroy, icmp_proto, |_| true).unwrap();
    assert_eq!(icmp_end.orig_packets, Some(1));
    assert_eq!(icmp_end.reply_packets, Some(1));

    let s = rig.stats.snapshot();
    assert_eq!(s.parse_errors, 0);
    assert_eq!(s.lost, 0);
    assert!(
        s.events_seen > s.events_kept - s.dump_flows.min(s.events_kept),
        "the inbound ping was seen and filtered: {s:?}"
    );
    rig.listener.stop();
}

#[test]
fn conntrack_events_for_tcp_udp_icmp_v4() {
    if !require_root("conntrack_events_for_tcp_udp_icmp_v4") {
        return;
    }
    flows_of_one_family(false);
}

#[test]
fn conntrack_events_for_tcp_udp_icmp_v6() {
    if !require_root("conntrack_events_for_tcp_udp_icmp_v6") {
        return;
    }
    flows_of_one_family(true);
}

#[test]
fn start_dump_reports_flows_that_were_open_before_the_listener() {
    if !require_root("start_dump_reports_flows_that_were_open_before_the_listener") {
        return;
    }
    let topo = topology();
    let cust = &topo.customers[0];
    let inet = &topo.internet[0];
    // Flows made before the listener exists: only a dump can show them.
    udp_flow(cust, inet, false, 41000, 5353);
    udp_flow(cust, inet, true, 41001, 5353);
    ping(inet, cust.v4); // inbound: filtered out of the dump too
    let mut rig = listen(&topo, ListenerOptions::default());
    // Only the customer hosts' flows: the router's own address in the customer network
    // (203.0.113.1) sends multicast reports (IGMP, MLD) whenever the kernel feels like it.
    let from_hosts = |e: &&FlowEvent| e.src == cust.v4 || e.src == cust.v6;
    let obs = rig.collect_until(Duration::from_secs(5), |o| {
        flows(o).iter().filter(from_hosts).count() >= 2
    });
    let evs: Vec<_> = flows(&obs).into_iter().filter(|e| from_hosts(&e)).collect();
    assert_eq!(evs.len(), 2, "{evs:#?}");
    for (sport, src) in [(41000, cust.v4), (41001, cust.v6)] {
        let e = evs
            .iter()
            .find(|e| e.sport == sport)
            .unwrap_or_else(|| panic!("dump misses {sport}: {evs:#?}"));
        assert_eq!(e.kind, FlowEventKind::Existing);
        assert_eq!(e.src, src);
        assert_eq!(e.dport, 5353);
        assert!(e.seen_reply());
    }
    // A quiet link: a tick within a second or so lets the detector close its windows.
    let quiet = rig.collect_until(Duration::from_secs(3), |o| {
        o.iter().any(|x| matches!(x, Observation::Tick { .. }))
    });
    assert!(
        quiet.iter().any(|x| matches!(x, Observation::Tick { .. })),
        "no tick on a quiet link: {quiet:?}"
    );
    let s = rig.stats.snapshot();
    assert_eq!(s.dumps, 1);
    assert_eq!(
        s.dump_flows, 3,
        "two customer flows and one inbound ping: {s:?}"
    );
    // Later events may come from the router's own address in the customer network (IGMP,
    // MLD reports); none from the customer host, whose flows are idle.
    assert!(s.events_kept >= 2, "{s:?}");
    assert!(
        !flows(&quiet)
            .iter()
            .any(|e| e.src == cust.v4 || e.src == cust.v6),
        "{quiet:?}"
    );
}

#[test]
fn filter_reload_takes_effect_without_restart() {
    if !require_root("filter_reload_takes_effect_without_restart") {
        return;
    }
    let topo = topology();
    let cust = &topo.customers[0];
    let inet = &topo.internet[0];
    let (tx, mut rx) = mpsc::channel(1024);
    // Start with a policy whose only customers are the "internet" network.
    let filter = FilterHandle::new(CustomerFilter::new([Topology::INTERNET_V4
        .parse()
        .unwrap()]));
    let f2 = filter.clone();
    let listener = topo
        .router
        .enter(move || {
            ConntrackListener::open(
                f2,
                ListenerOptions {
                    dump_at_start: false,
                    ..ListenerOptions::default()
                },
                tx,
            )
        })
        .unwrap()
        .unwrap();
    let stats = listener.stats();
    udp_flow(cust, inet, false, 42000, 5353);
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.snapshot().events_seen < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(stats.snapshot().events_seen >= 2);
    let mut early = Vec::new();
    while let Ok(b) = rx.try_recv() {
        early.extend(flows(&b));
    }
    assert!(
        !early.iter().any(|e| e.src == cust.v4),
        "customer flow kept under the old filter: {early:#?}"
    );
    filter.replace(CustomerFilter::new([Topology::CUSTOMER_V4
        .parse()
        .unwrap()]));
    udp_flow(cust, inet, false, 42001, 5353);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while Instant::now() < deadline && got.is_empty() {
        while let Ok(b) = rx.try_recv() {
            got.extend(flows(&b).into_iter().filter(|e| e.src == cust.v4));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        got.iter().all(|e| e.sport == 42001 && e.dport == 5353) && !got.is_empty(),
        "{got:#?}"
    );
    listener.stop();
}

#[test]
fn event_flood_overflows_the_buffer_counts_loss_and_resyncs_by_dump() {
    if !require_root("event_flood_overflows_the_buffer_counts_loss_and_resyncs_by_dump") {
        return;
    }
    let topo = topology();
    let cust = &topo.customers[0];
    let inet = &topo.internet[0];
    // A tiny buffer (the kernel's minimum is a few KB), and a consumer that does not read
    // while the flood runs: the channel is small, so the listener blocks and the socket fills.
    let (tx, mut rx) = mpsc::channel(1);
    let filter = customer_filter();
    let listener = topo
        .router
        .enter(move || {
            ConntrackListener::open(
                filter,
                ListenerOptions {
                    rcvbuf: 4096,
                    max_batch: 16,
                    min_resync_interval: Duration::from_millis(0),
                    ..ListenerOptions::default()
                },
                tx,
            )
        })
        .unwrap()
        .unwrap();
    let stats = listener.stats();
    // 2000 short UDP flows (one datagram each, no answer needed), bounded in count and time.
    let dst = inet.v4;
    let src = cust.v4;
    let sender = cust
        .ns
        .enter(move || UdpSocket::bind(SocketAddr::new(src, 0)))
        .unwrap()
        .unwrap();
    let sink = inet
        .ns
        .enter(move || UdpSocket::bind(SocketAddr::new(dst, 9)))
        .unwrap()
        .unwrap();
    // Neighbours resolved first, so no datagram waits in (and falls out of) an ARP queue.
    ping(cust, dst);
    let flood = 2000u16;
    for i in 0..flood {
        sender
            .send_to(b"x", SocketAddr::new(dst, 10_000 + i))
            .unwrap();
        if i % 50 == 49 {
            // Stay below the veth backlog; the socket buffer is what must overflow.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    drop(sink);
    crate::common::require_tools("the flood comparison", &["conntrack"]);
    // What the kernel holds now: the customer's UDP flows to the flood ports.
    let table = topo
        .router
        .run(&["conntrack", "-L", "-p", "udp", "-s", &src.to_string()])
        .expect("conntrack -L");
    let in_kernel: BTreeSet<u16> = table
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("dport="))
                .and_then(|p| p.parse().ok())
        })
        .filter(|p| (10_000..10_000 + flood).contains(p))
        .collect();
    assert!(
        in_kernel.len() > 1000,
        "the flood made flows: {}",
        in_kernel.len()
    );
    // Now consume everything: Lost must be there, then a dump brings the flows back.
    let mut all = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        while let Ok(b) = rx.try_recv() {
            all.extend(b);
        }
        let seen: BTreeSet<u16> = flows(&all).iter().map(|e| e.dport).collect();
        if stats.snapshot().lost > 0 && in_kernel.is_subset(&seen) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = stats.snapshot();
    assert!(s.lost >= 1, "the flood overflowed the buffer: {s:?}");
    assert!(s.dumps >= 2, "start dump plus a resync dump: {s:?}");
    let lost_at = all
        .iter()
        .position(|o| matches!(o, Observation::Lost { .. }))
        .expect("Observation::Lost delivered");
    let seen: BTreeSet<u16> = flows(&all).iter().map(|e| e.dport).collect();
    let missing: Vec<_> = in_kernel.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "events plus resync dumps cover every flow of the table; missing {missing:?}; {s:?}"
    );
    // The resync dump came after the loss report and holds flows the events did not.
    let after: BTreeSet<u16> = flows(&all[lost_at..]).iter().map(|e| e.dport).collect();
    assert!(after.len() > 1000, "{}", after.len());
    assert_eq!(s.parse_errors, 0);
    listener.stop();
}

#[test]
fn counter_reader_reports_per_source_deltas() {
    if !require_root("counter_reader_reports_per_source_deltas") {
        return;
    }
    let mut topo = topology();
    topo.add_customer(11).expect("second customer");
    let inet = &topo.internet[0];
    let filter = customer_filter();
    // First contact (neighbour discovery and the like) happens before the baseline.
    for c in &topo.customers {
        ping(c, inet.v4);
        ping(c, inet.v6);
    }
    let mut reader = CounterReader::new(TABLE, filter);
    let r = &mut reader;
    let first = topo.router.enter(|| r.read()).unwrap().expect("first read");
    assert!(first.is_empty(), "first read is the baseline");

    // Customer .10: 3 UDP datagrams of 100 bytes payload, v4; customer .11: 2 over v6.
    let send = |h: &Host, dst: IpAddr, n: usize| {
        let src = if dst.is_ipv6() { h.v6 } else { h.v4 };
        let s =
            h.ns.enter(move || UdpSocket::bind(SocketAddr::new(src, 0)))
                .unwrap()
                .unwrap();
        for _ in 0..n {
            s.send_to(&[0u8; 100], SocketAddr::new(dst, 9)).unwrap();
        }
    };
    send(&topo.customers[0], inet.v4, 3);
    send(&topo.customers[1], inet.v6, 2);
    let r = &mut reader;
    let mut samples = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while samples.len() < 2 && Instant::now() < deadline {
        samples.extend(topo.router.enter(|| r.read()).unwrap().expect("read"));
    }
    samples.sort_by_key(|s| s.addr);
    assert_eq!(samples.len(), 2, "{samples:#?}");
    let v4 = samples
        .iter()
        .find(|s| s.addr == topo.customers[0].v4)
        .unwrap();
    assert_eq!((v4.packets, v4.bytes), (3, 3 * (20 + 8 + 100)));
    let v6 = samples
        .iter()
        .find(|s| s.addr == topo.customers[1].v6)
        .unwrap();
    assert_eq!((v6.packets, v6.bytes), (2, 2 * (40 + 8 + 100)));
    assert!(v4.interval_ns > 0);

    // Nothing new: no samples. One more packet: a delta of exactly one.
    let r = &mut reader;
    assert!(topo.router.enter(|| r.read()).unwrap().unwrap().is_empty());
    send(&topo.customers[0], inet.v4, 1);
    let r = &mut reader;
    let s = topo.router.enter(|| r.read()).unwrap().unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(
        (s[0].addr, s[0].packets, s[0].bytes),
        (topo.customers[0].v4, 1, 128)
    );

    // The element is deleted (as on expiry) and comes back with a fresh counter.
    topo.router
        .run(&[
            "nft",
            "delete",
            "element",
            "inet",
            TABLE,
            "src_counters4",
            "{",
            "203.0.113.10",
            "}",
        ])
        .expect("delete element");
    send(&topo.customers[0], inet.v4, 2);
    let r = &mut reader;
    let s = topo.router.enter(|| r.read()).unwrap().unwrap();
    assert_eq!(s.len(), 1);
    // The fresh element's whole count (the 2 datagrams, and whatever else the customer sent
    // since the delete) is the delta: smaller than the old counter, never a negative delta.
    let listing = topo
        .router
        .run(&["nft", "-j", "list", "set", "inet", TABLE, "src_counters4"])
        .unwrap();
    let now = egressguard::observe::counters::parse_nft_sets(listing.as_bytes()).unwrap();
    assert_eq!((s[0].packets, s[0].bytes), (now[0].packets, now[0].bytes));
    assert!(s[0].packets >= 2 && s[0].packets < 6, "{s:?}");
    assert_eq!(reader.stats().snapshot().counter_reads, 5);
    assert!(reader.reads_over_netlink(), "the reader fell back to nft");
}

#[test]
fn netlink_set_dump_reads_what_nft_lists() {
    if !require_root("netlink_set_dump_reads_what_nft_lists") {
        return;
    }
    use egressguard::observe::counters::{Counted, parse_nft_sets};
    use egressguard::observe::nftset::SetDumper;
    let topo = topology();
    // 20,000 IPv4 elements (a dump of many datagrams) and a few IPv6 ones, each with its own
    // counter, in a table of their own.
    let mut script = String::from(
        "table inet egd_dump {\n set src_counters4 { type ipv4_addr; size 65536; counter; }\n set src_counters6 { type ipv6_addr; size 65536; counter; }\n}\n",
    );
    let v4: Vec<String> = (0..20_000u32)
        .map(|i| {
            format!(
                "10.{}.{}.{} counter packets {} bytes {}",
                i >> 16,
                (i >> 8) & 255,
                i & 255,
                i + 1,
                (i + 1) * 100
            )
        })
        .collect();
    script.push_str(&format!(
        "add element inet egd_dump src_counters4 {{ {} }}\n",
        v4.join(", ")
    ));
    script.push_str("add element inet egd_dump src_counters6 { 2001:db8:c::5 counter packets 3 bytes 300, 2001:db8:c::6 counter packets 0 bytes 0 }\n");
    let path = std::env::temp_dir().join(format!("egd-dump-{}.nft", std::process::id()));
    std::fs::write(&path, script).expect("script");
    topo.router
        .run(&["nft", "-f", path.to_str().expect("utf-8")])
        .expect("nft -f");
    let _ = std::fs::remove_file(&path);
    for set in ["src_counters4", "src_counters6"] {
        let got = topo
            .router
            .enter(|| {
                let mut d = SetDumper::open().expect("netlink socket");
                let mut out = Vec::new();
                d.dump("egd_dump", set, Counted::All, &mut out)
                    .map(|()| out)
            })
            .unwrap()
            .expect("netlink dump");
        let listing = topo
            .router
            .run(&["nft", "-j", "list", "set", "inet", "egd_dump", set])
            .expect("nft list set");
        let mut want = parse_nft_sets(listing.as_bytes()).expect("nft JSON");
        let mut got = got;
        want.sort_by_key(|r| r.addr);
        got.sort_by_key(|r| r.addr);
        assert_eq!(got.len(), if set.ends_with('4') { 20_000 } else { 2 });
        assert_eq!(got, want, "{set}: netlink and nft disagree");
    }
    // A set that does not exist: the kernel's refusal, an error naming the set.
    let e = topo
        .router
        .enter(|| {
            let mut d = SetDumper::open().expect("netlink socket");
            d.dump("egd_dump", "no_such_set", Counted::All, &mut Vec::new())
        })
        .unwrap()
        .expect_err("no such set");
    assert!(e.to_string().contains("no_such_set"), "{e}");
    // The socket is still usable after a refusal (no stale reply is taken for the next).
    let again = topo
        .router
        .enter(|| {
            let mut d = SetDumper::open().expect("netlink socket");
            let _ = d.dump("egd_dump", "no_such_set", Counted::All, &mut Vec::new());
            let mut out = Vec::new();
            d.dump("egd_dump", "src_counters6", Counted::All, &mut out)
                .map(|()| out.len())
        })
        .unwrap()
        .expect("dump after a refusal");
    assert_eq!(again, 2);
}

#[test]
fn counter_reader_thread_delivers_counters_on_its_interval() {
    if !require_root("counter_reader_thread_delivers_counters_on_its_interval") {
        return;
    }
    let topo = topology();
    let cust = &topo.customers[0];
    let inet = &topo.internet[0];
    let (tx, mut rx) = mpsc::channel(16);
    let reader = CounterReader::new(TABLE, customer_filter());
    let handle = topo
        .router
        .enter(move || reader.spawn(Duration::from_millis(200), tx))
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = None;
    while got.is_none() && Instant::now() < deadline {
        udp_flow(cust, inet, false, 43000, 5353);
        std::thread::sleep(Duration::from_millis(100));
        while let Ok(b) = rx.try_recv() {
            for o in b {
                if let Observation::Counters(c) = o {
                    got = Some(c);
                }
            }
        }
    }
    let c = got.expect("a counter sample within 5 s");
    assert_eq!(c.addr, cust.v4);
    assert!(c.packets >= 1);
    assert!(c.interval_ns >= 150_000_000, "{c:?}");
    handle.stop();
}

// ---------------------------------------------------------------------------------------------
// fixture capture (run by hand: cargo test --test netns capture_ctnetlink_fixtures -- --ignored)
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "writes tests/fixtures/ctnetlink/; run by hand to refresh the fixtures"]
fn capture_ctnetlink_fixtures() {
    use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_NETFILTER};
    if !require_root("capture_ctnetlink_fixtures") {
        return;
    }
    let topo = topology();
    let cust = &topo.customers[0];
    let inet = &topo.internet[0];
    let dir = repo().join("tests/fixtures/ctnetlink");
    std::fs::create_dir_all(&dir).unwrap();
    let sock = topo
        .router
        .enter(|| {
            egressguard::observe::conntrack::enable_sysctls();
            let mut s = Socket::new(NETLINK_NETFILTER).unwrap();
            s.bind_auto().unwrap();
            for g in [1, 2, 3] {
                s.add_membership(g).unwrap();
            }
            s
        })
        .unwrap();
    nix::sys::socket::setsockopt(
        &sock,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(0, 300_000),
    )
    .unwrap();
    let drain = |name: &str| {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let mut s: &mut [u8] = &mut buf[..];
            match sock.recv(&mut s, 0) {
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
        }
        std::fs::write(dir.join(name), &out).unwrap();
    };
    for v6 in [false, true] {
        let fam = if v6 { "6" } else { "4" };
        let (src, dst) = if v6 {
            (cust.v6, inet.v6)
        } else {
            (cust.v4, inet.v4)
        };
        tcp_flow(cust, inet, v6, 8080);
        destroy_flows(&topo.router, src);
        drain(&format!("tcp{fam}.bin"));
        udp_flow(cust, inet, v6, 40053, 5353);
        destroy_flows(&topo.router, src);
        drain(&format!("udp{fam}.bin"));
        ping(cust, dst);
        destroy_flows(&topo.router, src);
        drain(&format!("icmp{fam}.bin"));
        ping(inet, src);
        destroy_flows(&topo.router, dst);
        drain(&format!("inbound{fam}.bin"));
    }
    // A dump with two open flows (v4 UDP, v6 UDP) and an inbound one.
    udp_flow(cust, inet, false, 40054, 5353);
    udp_flow(cust, inet, true, 40055, 5353);
    ping(inet, cust.v4);
    drain("ignored.bin");
    let mut d = topo
        .router
        .enter(|| {
            let mut s = Socket::new(NETLINK_NETFILTER).unwrap();
            s.bind_auto().unwrap();
            s
        })
        .unwrap();
    let mut req = [0u8; 20];
    let n = egressguard::observe::ctnetlink::dump_request(&mut req, 7);
    d.send_to(&req[..n], &NlAddr::new(0, 0), 0).unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let mut s: &mut [u8] = &mut buf[..];
        let n = d.recv(&mut s, 0).unwrap();
        out.extend_from_slice(&buf[..n]);
        let done = egressguard::observe::ctnetlink::messages(&buf[..n])
            .flatten()
            .any(|m| m.kind == 3);
        if done {
            break;
        }
    }
    std::fs::write(dir.join("dump.bin"), &out).unwrap();
    let _ = std::fs::remove_file(dir.join("ignored.bin"));
    let _ = &mut d;
}

// ---------------------------------------------------------------------------------------------
// end-to-end rate measurement (docs/performance.md, ## Observe):
//   sudo cargo test --release --test netns measure_new_flow_rate -- --ignored --nocapture
// ---------------------------------------------------------------------------------------------

/// Drives new UDP flows (one datagram each, distinct ports) from a customer through the router
/// at rising rates, with the listener at its defaults and a consumer draining the channel, and
/// prints for each rate whether the listener followed with zero lost events. Bounded: at most
/// `flows` datagrams per step, 1.5 s per step, to the internet host of the topology only.
#[test]
#[ignore = "measurement; run by hand with --release --nocapture"]
fn measure_new_flow_rate() {
    if !require_root("measure_new_flow_rate") {
        return;
    }
    let topo = topology();
    let cust = &topo.customers[0];
    let inet = &topo.internet[0];
    let (src, dst) = (cust.v4, inet.v4);
    ping(cust, dst);
    // The internet host drops the flood silently (no ICMP errors back).
    nft_apply(
        &inet.ns,
        "table inet sink {\n chain input {\n type filter hook input priority 0; policy accept;\n udp dport 1024-65535 drop\n }\n}\n",
    );
    let rates: Vec<u64> = std::env::var("EGD_RATES")
        .ok()
        .map(|s| s.split(',').filter_map(|r| r.parse().ok()).collect())
        .unwrap_or_else(|| vec![10_000, 25_000, 50_000, 75_000, 100_000, 150_000, 200_000]);
    let mut best = 0u64;
    eprintln!("target/s  sent  achieved/s  in_table  new_events  lost  verdict");
    for rate in rates {
        let _ = topo.router.run(&["conntrack", "-F"]);
        let flows = (rate * 3 / 2).min(120_000) as usize;
        let (tx, mut rx) = mpsc::channel(1024);
        let filter = customer_filter();
        let listener = topo
            .router
            .enter(move || ConntrackListener::open(filter, ListenerOptions::default(), tx))
            .unwrap()
            .unwrap();
        let stats = listener.stats();
        let consumer = std::thread::spawn(move || {
            let mut new = 0u64;
            while let Some(b) = rx.blocking_recv() {
                new += b
                    .iter()
                    .filter(|o| {
                        matches!(o, Observation::Flow(e) if e.kind == FlowEventKind::New
                            && e.proto == proto::UDP && e.dport >= 1024)
                    })
                    .count() as u64;
            }
            new
        });
        // Wait for the start dump, so the events are what counts.
        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.snapshot().dumps == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let socks: Vec<UdpSocket> = (0..2)
            .map(|_| {
                cust.ns
                    .enter(move || UdpSocket::bind(SocketAddr::new(src, 0)))
                    .unwrap()
                    .unwrap()
            })
            .collect();
        // Two sender threads (one socket each, half the flows and half the rate each), so
        // the generator is not limited to one core; flow k of a thread goes to port 1024 + k.
        let run = crate::flowgen::paced(
            socks.len(),
            flows as u64,
            rate,
            Duration::from_secs(5),
            |t, k| {
                socks[t]
                    .send_to(b"x", SocketAddr::new(dst, 1024 + k as u16))
                    .is_ok()
            },
        );
        let (sent, elapsed) = (run.sent as usize, run.elapsed);
        // Let the listener drain what is queued, then count what the kernel holds.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = u64::MAX;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(300));
            let k = stats.snapshot().events_seen;
            if k == last {
                break;
            }
            last = k;
        }
        let table = topo
            .router
            .run(&["conntrack", "-L", "-p", "udp", "-s", &src.to_string()])
            .unwrap_or_default();
        let in_table = table
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("dport="))
                    .and_then(|p| p.parse::<u16>().ok())
                    .is_some_and(|p| p >= 1024)
            })
            .count() as u64;
        listener.stop();
        let new = consumer.join().unwrap();
        let s = stats.snapshot();
        let ok = s.lost == 0 && new >= in_table && in_table > 0;
        let achieved = (sent as f64 / elapsed.as_secs_f64()) as u64;
        if ok {
            best = best.max(achieved);
        }
        eprintln!(
            "{rate:>8}  {sent:>6}  {achieved:>10}  {in_table:>8}  {new:>10}  {:>4}  {}",
            s.lost,
            if ok { "followed" } else { "LOST" }
        );
    }
    eprintln!("highest achieved rate followed with zero lost events: {best} new flows/s");
}
