//! Engine tests driven by synthetic streams: for every category an attack that must be
//! detected (with its evidence checked), the near miss just under the threshold that must
//! not, and the benign workloads that look a little like attacks.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::messages::{CounterSample, FlowEvent, FlowEventKind, TcpState, ct_status, proto};

/// 2027-01-15T08:00:00Z: a multiple of every default window (10 s, 60 s, 300 s).
const T0: u64 = 1_800_000_000 * 1_000_000_000;
const MS: u64 = 1_000_000;

pub(super) const POLICY: &str = "\
version: 1
networks:
  - prefix: 203.0.113.0/24
  - prefix: 192.0.2.0/24
    profile: mailrelay
  - prefix: 2001:db8:1::/48
profiles:
  mailrelay:
    spam:
      enabled: false
enforcement:
  ipv6_block_prefix: 64
";

fn policy_from(text: &str) -> Arc<Policy> {
    Arc::new(Policy::from_text(text, Path::new("<test>")).expect("test policy is valid"))
}

fn policy() -> Arc<Policy> {
    policy_from(POLICY)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `n` distinct internet addresses, deterministic.
fn internet(i: u32) -> IpAddr {
    let a = 0x0a00_0000u32 | (i.wrapping_mul(2_654_435_761) & 0x00ff_ffff);
    IpAddr::from(a.to_be_bytes())
}

#[allow(clippy::too_many_arguments)]
fn flow(
    ms: u64,
    kind: FlowEventKind,
    src: &str,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
    status: u32,
    state: Option<TcpState>,
) -> Observation {
    Observation::Flow(FlowEvent {
        time: Time(T0 + ms * MS),
        kind,
        src: ip(src),
        dst,
        proto,
        sport,
        dport,
        icmp: None,
        status,
        tcp_state: state,
        orig_packets: None,
        orig_bytes: None,
        reply_packets: None,
        reply_bytes: None,
        start: None,
        stop: None,
        labels: 0,
    })
}

fn syn(ms: u64, src: &str, dst: IpAddr, sport: u16, dport: u16) -> Observation {
    flow(
        ms,
        FlowEventKind::New,
        src,
        dst,
        proto::TCP,
        sport,
        dport,
        0,
        Some(TcpState::SynSent),
    )
}

fn synack(ms: u64, src: &str, dst: IpAddr, sport: u16, dport: u16) -> Observation {
    flow(
        ms,
        FlowEventKind::Update,
        src,
        dst,
        proto::TCP,
        sport,
        dport,
        ct_status::SEEN_REPLY,
        Some(TcpState::SynRecv),
    )
}

fn established(ms: u64, src: &str, dst: IpAddr, sport: u16, dport: u16) -> Observation {
    flow(
        ms,
        FlowEventKind::Update,
        src,
        dst,
        proto::TCP,
        sport,
        dport,
        ct_status::SEEN_REPLY | ct_status::ASSURED,
        Some(TcpState::Established),
    )
}

fn rst(ms: u64, src: &str, dst: IpAddr, sport: u16, dport: u16) -> Observation {
    flow(
        ms,
        FlowEventKind::Update,
        src,
        dst,
        proto::TCP,
        sport,
        dport,
        ct_status::SEEN_REPLY,
        Some(TcpState::Close),
    )
}

fn udp(ms: u64, src: &str, dst: IpAddr, sport: u16, dport: u16) -> Observation {
    flow(
        ms,
        FlowEventKind::New,
        src,
        dst,
        proto::UDP,
        sport,
        dport,
        0,
        None,
    )
}

fn udp_reply(ms: u64, src: &str, dst: IpAddr, sport: u16, dport: u16) -> Observation {
    flow(
        ms,
        FlowEventKind::Update,
        src,
        dst,
        proto::UDP,
        sport,
        dport,
        ct_status::SEEN_REPLY,
        None,
    )
}

fn counters(ms: u64, addr: &str, packets: u64, bytes: u64) -> Observation {
    Observation::Counters(CounterSample {
        time: Time(T0 + ms * MS),
        addr: ip(addr),
        packets,
        bytes,
        interval_ns: 1_000 * MS,
        udp_packets: 0,
        echo_packets: 0,
    })
}

/// A full TCP connection that the destination accepted.
fn answered_tcp(
    out: &mut Vec<Observation>,
    ms: u64,
    src: &str,
    dst: IpAddr,
    sport: u16,
    dport: u16,
) {
    out.push(syn(ms, src, dst, sport, dport));
    out.push(synack(ms + 1, src, dst, sport, dport));
    out.push(established(ms + 2, src, dst, sport, dport));
}

/// Drives `engine` like the daemon: events in order, `evaluate` on every evaluation-interval
/// boundary of event time, and for `tail_ms` after the last event.
fn drive(engine: &mut Engine, obs: &[Observation], tail_ms: u64) -> Vec<Detection> {
    let interval = engine.policy().detection.evaluation_interval.as_nanos() as u64;
    let mut out = Vec::new();
    let Some(first) = obs.first() else {
        return out;
    };
    let mut next = first.time().as_nanos() - first.time().as_nanos() % interval + interval;
    for o in obs {
        while o.time().as_nanos() >= next {
            engine.evaluate(Time(next), &mut out);
            next += interval;
        }
        engine.observe(o);
    }
    let end = obs.last().unwrap().time().as_nanos() + tail_ms * MS;
    while next <= end {
        engine.evaluate(Time(next), &mut out);
        next += interval;
    }
    out
}

fn run(obs: &[Observation]) -> Vec<Detection> {
    let mut e = Engine::new(policy());
    drive(&mut e, obs, 1_000)
}

fn sorted(mut obs: Vec<Observation>) -> Vec<Observation> {
    obs.sort_by_key(|o| o.time());
    obs
}

fn of(d: &[Detection], c: Category) -> Vec<&Detection> {
    d.iter().filter(|d| d.category == c).collect()
}

fn crossed_value(d: &Detection, signal: &str) -> f64 {
    d.evidence
        .crossed
        .iter()
        .find(|c| c.signal == signal)
        .unwrap_or_else(|| panic!("{signal} not crossed in {:#?}", d.evidence.crossed))
        .value
}

const BOT: &str = "203.0.113.7";

// ---------------------------------------------------------------------------------------------
// flood
// ---------------------------------------------------------------------------------------------

/// `rate` SYNs per second from `src` to one target, never answered, from `start_ms` on.
fn syn_flood(src: &str, start_ms: u64, rate: u64, secs: u64) -> Vec<Observation> {
    let target = ip("198.51.100.10");
    (0..rate * secs)
        .map(|i| {
            syn(
                start_ms + i * 1000 / rate,
                src,
                target,
                1024 + (i % 60_000) as u16,
                80,
            )
        })
        .collect()
}

#[test]
fn syn_flood_is_detected_with_evidence() {
    let d = run(&syn_flood(BOT, 0, 1_000, 10));
    let floods = of(&d, Category::Flood);
    assert_eq!(floods.len(), 1, "{d:#?}");
    assert_eq!(d.len(), 1, "nothing but the flood: {d:#?}");
    let f = floods[0];
    assert_eq!(f.source, "203.0.113.7/32".parse::<IpNet>().unwrap());
    assert_eq!(f.profile, "default");
    // 500 unanswered SYN/s averaged over 10 s: crossed with the 5000th SYN at 4.999 s.
    assert_eq!(f.time, Time(T0 + 5_000 * MS));
    assert!(crossed_value(f, "unreplied_syn_per_sec") >= 500.0);
    assert!(
        f.evidence
            .crossed
            .iter()
            .all(|c| c.signal != "new_flows_per_sec")
    );
    let ev = &f.evidence;
    assert_eq!(ev.window_end, f.time);
    assert_eq!(ev.window_start, Time(T0 - 5_000 * MS));
    assert_eq!(ev.first_seen, Time(T0));
    assert!(ev.last_seen >= Time(T0 + 4_999 * MS) && ev.last_seen <= f.time);
    assert_eq!(ev.top_destinations[0].key, ip("198.51.100.10"));
    assert_eq!(ev.top_destinations[0].count, 5_000);
    assert_eq!(ev.top_ports[0].key, 80);
    assert_eq!(ev.top_ports[0].count, 5_000);
    assert_eq!(ev.counts["distinct_destinations"], 1.0);
    assert!(!ev.sample.is_empty() && ev.sample.len() <= SAMPLE_MAX);
    assert!(ev.sample.iter().all(|s| s.dport == 80 && !s.answered));
}

#[test]
fn syn_flood_just_under_the_threshold_is_not() {
    // 499 unanswered SYN/s for a minute: never 500 on average over 10 s.
    let d = run(&syn_flood(BOT, 0, 499, 60));
    assert!(d.is_empty(), "{d:#?}");
}

#[test]
fn detection_latency_is_within_one_evaluation_interval() {
    // The flood starts 7.3 s into a 10 s epoch, so the window straddles two epochs.
    for start in [0u64, 3_100, 7_300, 9_950] {
        let obs = syn_flood(BOT, start, 2_000, 6);
        // Truth: the 5000th SYN puts 5000 SYNs in the trailing 10 s window.
        let crossing = obs[4_999].time();
        let d = run(&obs);
        let f = of(&d, Category::Flood);
        assert_eq!(f.len(), 1, "start {start}: {d:#?}");
        let lag = f[0].time.as_nanos() - crossing.as_nanos();
        assert!(
            lag <= 250 * MS,
            "start {start}: detected {lag} ns after the crossing"
        );
    }
}

#[test]
fn amplification_requests_are_a_flood() {
    // Spoofed-looking NTP monlist requests to 50 reflectors, 600/s, never answered.
    let obs: Vec<_> = (0..6_000u64)
        .map(|i| udp(i * 1000 / 600, BOT, internet((i % 50) as u32), 40_000, 123))
        .collect();
    let d = run(&obs);
    let f = of(&d, Category::Flood);
    assert_eq!(f.len(), 1, "{d:#?}");
    assert!(crossed_value(f[0], "amplification_flows_per_sec") >= 500.0);
    assert_eq!(f[0].evidence.top_ports[0].key, 123);
}

#[test]
fn packet_flood_by_counters_is_detected() {
    // One UDP flow (one 5-tuple: one conntrack entry, never answered) carrying 300k pps.
    let mut obs = vec![udp(0, BOT, ip("198.51.100.99"), 5555, 9999)];
    for s in 1..=12 {
        obs.push(counters(s * 1000, BOT, 300_000, 300_000 * 64));
    }
    let d = run(&obs);
    let f = of(&d, Category::Flood);
    assert_eq!(f.len(), 1, "{d:#?}");
    assert_eq!(crossed_value(f[0], "pps"), 300_000.0);
    // The first sample (at 1 s) already averages 300k pps: the next evaluation reports it.
    assert_eq!(f[0].time, Time(T0 + 1_250 * MS));
}

#[test]
fn packet_rate_just_under_the_threshold_is_not() {
    let mut obs = vec![udp(0, BOT, ip("198.51.100.99"), 5555, 9999)];
    for s in 1..=30 {
        obs.push(counters(s * 1000, BOT, 149_999, 149_999 * 64));
    }
    assert!(run(&obs).is_empty());
}

#[test]
fn backup_job_at_high_bandwidth_is_not_a_flood() {
    // One answered TCP flow to the backup server, then 8 Gbit/s for two minutes.
    let mut obs = Vec::new();
    answered_tcp(&mut obs, 0, BOT, ip("198.51.100.50"), 50_000, 873);
    for s in 1..=120 {
        obs.push(counters(s * 1000, BOT, 700_000, 1_000_000_000));
    }
    let d = run(&obs);
    assert!(d.is_empty(), "{d:#?}");
}

#[test]
fn busy_web_server_is_not_a_flood() {
    // Clients connect in (the customer is the reply side: original src is the client),
    // and the server's responses show in its counters: 250k pps, 3 Gbit/s. Its own outgoing
    // flows are a few answered lookups.
    let server = "203.0.113.80";
    let mut obs = Vec::new();
    for i in 0..60_000u64 {
        let client = internet(i as u32);
        let ms = i;
        obs.push(Observation::Flow(FlowEvent {
            time: Time(T0 + ms * MS),
            kind: FlowEventKind::New,
            src: client,
            dst: ip(server),
            proto: proto::TCP,
            sport: 30_000 + (i % 30_000) as u16,
            dport: 443,
            icmp: None,
            status: 0,
            tcp_state: Some(TcpState::SynSent),
            orig_packets: None,
            orig_bytes: None,
            reply_packets: None,
            reply_bytes: None,
            start: None,
            stop: None,
            labels: 0,
        }));
    }
    for s in 0..60u64 {
        obs.push(udp(
            s * 1000 + 5,
            server,
            ip("198.51.100.53"),
            40_000 + s as u16,
            53,
        ));
        obs.push(udp_reply(
            s * 1000 + 6,
            server,
            ip("198.51.100.53"),
            40_000 + s as u16,
            53,
        ));
        obs.push(counters(s * 1000 + 999, server, 250_000, 375_000_000));
    }
    let d = run(&sorted(obs));
    assert!(d.is_empty(), "{d:#?}");
}

#[test]
fn dns_resolver_is_not_flagged() {
    // 3000 queries/s to 5000 authoritative servers for 30 s, all answered.
    let src = "203.0.113.53";
    let mut obs = Vec::new();
    for i in 0..90_000u64 {
        let ms = i / 3;
        let dst = internet((i % 5_000) as u32);
        let sport = 1024 + (i % 60_000) as u16;
        obs.push(udp(ms, src, dst, sport, 53));
        obs.push(udp_reply(ms + 20, src, dst, sport, 53));
    }
    let d = run(&sorted(obs));
    assert!(d.is_empty(), "{d:#?}");
}

/// A counter sample with its unanswered-UDP and echo-request shares.
fn class_counters(ms: u64, addr: &str, packets: u64, udp: u64, echo: u64) -> Observation {
    Observation::Counters(CounterSample {
        time: Time(T0 + ms * MS),
        addr: ip(addr),
        packets,
        bytes: packets * 100,
        interval_ns: 1_000 * MS,
        udp_packets: udp,
        echo_packets: echo,
    })
}

fn ping(ms: u64, src: &str, dst: IpAddr, id: u16) -> Observation {
    flow(
        ms,
        FlowEventKind::New,
        src,
        dst,
        proto::ICMP,
        id,
        0,
        0,
        None,
    )
}

#[test]
fn single_flow_udp_flood_is_a_udp_flood() {
    // hping3 --udp -k: one flow, never answered, 50k pps (a third of `pps`).
    let target = ip("198.51.100.99");
    let mut obs = vec![udp(0, BOT, target, 5555, 9999)];
    for s in 1..=8 {
        obs.push(class_counters(s * 1000, BOT, 50_000, 50_000, 0));
    }
    let d = run(&obs);
    let f = of(&d, Category::Flood);
    assert_eq!(f.len(), 1, "{d:#?}");
    assert!((crossed_value(f[0], "udp_pps") - 50_000.0).abs() <= 1.0);
    assert_eq!(f[0].evidence.pattern.as_deref(), Some("udp_flood"));
    assert_eq!(f[0].evidence.top_destinations[0].key, target);
    // The first sample already averages 50k: the next evaluation reports it.
    assert_eq!(f[0].time, Time(T0 + 1_250 * MS));
}

#[test]
fn ping_flood_answered_echo_by_echo_is_an_icmp_flood() {
    // `ping -f`: one ICMP flow, every echo answered, 30k echo requests/s.
    let target = ip("198.51.100.98");
    let mut obs = vec![ping(0, BOT, target, 77)];
    obs.push(flow(
        1,
        FlowEventKind::Update,
        BOT,
        target,
        proto::ICMP,
        77,
        0,
        ct_status::SEEN_REPLY,
        None,
    ));
    for s in 1..=8 {
        obs.push(class_counters(s * 1000, BOT, 30_000, 0, 30_000));
    }
    let d = run(&obs);
    let f = of(&d, Category::Flood);
    assert_eq!(f.len(), 1, "{d:#?}");
    assert_eq!(crossed_value(f[0], "icmp_pps"), 30_000.0);
    assert_eq!(f[0].evidence.pattern.as_deref(), Some("icmp_flood"));
    assert_eq!(f[0].evidence.top_destinations[0].key, target);
}

#[test]
fn udp_and_echo_rates_just_under_their_thresholds_are_not() {
    let mut obs = vec![udp(0, BOT, ip("198.51.100.99"), 5555, 9999)];
    obs.push(ping(0, BOT, ip("198.51.100.98"), 77));
    for s in 1..=30 {
        obs.push(class_counters(s * 1000, BOT, 24_998, 19_999, 4_999));
    }
    let d = run(&obs);
    assert!(d.is_empty(), "{d:#?}");
}

#[test]
fn ipv6_echo_spread_over_addresses_of_one_64_is_one_flood() {
    // 16 addresses of one /64, each 1,000 echo requests/s (under a quarter of the
    // threshold each): one source, 16k/s.
    let mut obs = vec![ping(0, "2001:db8:1:5::1", ip("2001:db8:ffff::1"), 9)];
    for s in 1..=8u64 {
        for a in 1..=16 {
            obs.push(class_counters(
                s * 1000,
                &format!("2001:db8:1:5::{a:x}"),
                1_000,
                0,
                1_000,
            ));
        }
    }
    let d = run(&obs);
    let f = of(&d, Category::Flood);
    assert_eq!(f.len(), 1, "{d:#?}");
    assert_eq!(f[0].evidence.pattern.as_deref(), Some("icmp_flood"));
}

#[test]
fn a_held_source_is_not_charged_its_echo_requests() {
    let mut e = Engine::new(policy());
    let mut obs = vec![ping(0, BOT, ip("198.51.100.98"), 77)];
    for s in 1..=3 {
        obs.push(class_counters(s * 1000, BOT, 30_000, 0, 30_000));
    }
    let d = drive(&mut e, &obs, 0);
    assert_eq!(of(&d, Category::Flood).len(), 1);
    e.on_hold_change(&HoldChange::Held {
        target: "203.0.113.7/32".parse().unwrap(),
        since: Time(T0 + 3_500 * MS),
        kind: BlockKind::Quarantine,
    });
    let later: Vec<_> = (4..=40)
        .map(|s| class_counters(s * 1000, BOT, 30_000, 0, 30_000))
        .collect();
    let d = drive(&mut e, &later, 1_000);
    assert!(d.is_empty(), "{d:#?}");
}

// ---------------------------------------------------------------------------------------------
// brute force
// ---------------------------------------------------------------------------------------------

fn ssh_attempts(n: u64, every_ms: u64) -> Vec<Observation> {
    let target = ip("198.51.100.22");
    let mut obs = Vec::new();
    for i in 0..n {
        let ms = i * every_ms;
        let sport = 40_000 + i as u16;
        answered_tcp(&mut obs, ms, BOT, target, sport, 22);
        obs.push(flow(
            ms + 900,
            FlowEventKind::Update,
            BOT,
            target,
            proto::TCP,
            sport,
            22,
            ct_status::SEEN_REPLY | ct_status::ASSURED,
            Some(TcpState::TimeWait),
        ));
    }
    sorted(obs)
}

#[test]
fn ssh_brute_force_is_detected() {
    let d = run(&ssh_attempts(40, 1_000));
    let b = of(&d, Category::BruteForce);
    assert_eq!(b.len(), 1, "{d:#?}");
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(crossed_value(b[0], "attempts"), 30.0);
    // The 30th attempt starts at 29 s: reported by the next evaluation.
    assert_eq!(b[0].time, Time(T0 + 29_250 * MS));
    let ev = &b[0].evidence;
    assert_eq!(ev.top_destinations[0].key, ip("198.51.100.22"));
    assert_eq!(ev.top_destinations[0].count, 30);
    assert_eq!(ev.top_ports[0].key, 22);
    assert_eq!(ev.counts["accepted_by_target"], 30.0);
    assert!(ev.sample.iter().all(|s| s.dport == 22));
    assert!(ev.sample.iter().any(|s| s.answered));
}

#[test]
fn brute_force_just_under_the_threshold_is_not() {
    assert!(run(&ssh_attempts(29, 1_000)).is_empty());
    // 30 attempts spread over more than the window never have 30 in it.
    assert!(run(&ssh_attempts(30, 2_100)).is_empty());
}

#[test]
fn long_sessions_are_not_attempts() {
    // 40 sessions to the same server, each lasting 20 s (kernel timestamps say so).
    let target = ip("198.51.100.22");
    let mut obs = Vec::new();
    for i in 0..40u64 {
        let ms = i * 1_000;
        let sport = 40_000 + i as u16;
        answered_tcp(&mut obs, ms, BOT, target, sport, 22);
        if let Observation::Flow(mut e) = established(ms + 20_000, BOT, target, sport, 22) {
            e.tcp_state = Some(TcpState::TimeWait);
            e.start = Some(Time(T0 + ms * MS));
            obs.push(Observation::Flow(e));
        }
    }
    let d = run(&sorted(obs));
    // The first 20 sessions end after the 30th has started: they count until they end,
    // so the attempts in the window stay below 30 once the long ones are taken back.
    assert!(of(&d, Category::BruteForce).len() <= 1, "{d:#?}");
    let mut e = Engine::new(policy());
    let obs2 = sorted({
        let mut v = Vec::new();
        for i in 0..40u64 {
            let ms = i * 1_000;
            let sport = 40_000 + i as u16;
            answered_tcp(&mut v, ms, BOT, target, sport, 22);
            // ends 16 s later (> 15 s max_flow_duration)
            if let Observation::Flow(mut x) = established(ms + 16_000, BOT, target, sport, 22) {
                x.tcp_state = Some(TcpState::TimeWait);
                x.start = Some(Time(T0 + ms * MS));
                v.push(Observation::Flow(x));
            }
        }
        v
    });
    let d2 = drive(&mut e, &obs2, 1_000);
    assert!(of(&d2, Category::BruteForce).is_empty(), "{d2:#?}");
}

#[test]
fn configuration_management_fan_out_is_not_brute_force() {
    // One SSH session to each of 300 servers in a minute (ansible), all answered.
    let mut obs = Vec::new();
    for i in 0..300u64 {
        answered_tcp(
            &mut obs,
            i * 200,
            BOT,
            internet(i as u32),
            40_000 + i as u16,
            22,
        );
    }
    let d = run(&sorted(obs));
    assert!(d.is_empty(), "{d:#?}");
}

/// `each` SSH sessions to each of `targets` servers, round-robin one every `every_ms`: each
/// completes its handshake and closes 900 ms later (a failed guess, `MaxAuthTries 1`).
fn spread_sessions(targets: u32, each: u32, every_ms: u64) -> Vec<Observation> {
    let mut obs = Vec::new();
    let mut k = 0u64;
    for _ in 0..each {
        for t in 0..targets {
            let (ms, sport, dst) = (k * every_ms, 30_000 + k as u16, internet(1_000 + t));
            answered_tcp(&mut obs, ms, BOT, dst, sport, 22);
            obs.push(flow(
                ms + 900,
                FlowEventKind::Update,
                BOT,
                dst,
                proto::TCP,
                sport,
                22,
                ct_status::SEEN_REPLY | ct_status::ASSURED,
                Some(TcpState::TimeWait),
            ));
            k += 1;
        }
    }
    sorted(obs)
}

#[test]
fn spread_brute_force_is_detected_with_its_pattern() {
    // 30 servers, 4 guesses each, in 48 s: no server gets near the per-target 30.
    let d = run(&spread_sessions(30, 4, 400));
    let b = of(&d, Category::BruteForce);
    assert_eq!(b.len(), 1, "{d:#?}");
    assert_eq!(d.len(), 1, "{d:#?}");
    let ev = &b[0].evidence;
    assert_eq!(ev.pattern.as_deref(), Some("spread"));
    assert!(crossed_value(b[0], "attempts") >= 60.0, "{ev:#?}");
    let targets = crossed_value(b[0], "distinct_targets");
    assert!((20.0..=40.0).contains(&targets), "{ev:#?}");
    assert!(ev.counts["attempts_per_target"] >= 2.0, "{ev:#?}");
    assert!(!ev.top_destinations.is_empty());
    assert!(ev.top_destinations.iter().all(|t| t.count <= 4), "{ev:#?}");
    assert_eq!(ev.top_ports[0].key, 22);
    // Reported before the last round ends.
    assert!(b[0].time < Time(T0 + 48_000 * MS), "{:?}", b[0].time);
    let text = b[0].to_string();
    assert!(
        text.contains("Pattern: a few login attempts at each of many servers (spread)")
            && text.contains("spread over many servers")
    );
}

#[test]
fn spread_brute_force_just_under_the_thresholds_is_not() {
    // 25 servers twice: 50 sessions, under 60.
    assert!(run(&spread_sessions(25, 2, 500)).is_empty());
    // 75 sessions at 15 servers: under 20 targets (and under the per-target 30).
    assert!(run(&spread_sessions(15, 5, 500)).is_empty());
    // 90 sessions over 150 s: never 60 in one minute.
    assert!(run(&spread_sessions(30, 3, 1_700)).is_empty());
}

#[test]
fn deployment_tool_and_user_sessions_are_not_spread_brute_force() {
    // A deployment tool sshing to 10 hosts six times each in a minute: 60 sessions, but
    // at 10 targets.
    assert!(run(&spread_sessions(10, 6, 900)).is_empty());
    // A user's sessions to two servers, and a monitoring check connecting once to each of
    // 120 SSH servers a minute (one session per host: not a guess).
    let mut obs = spread_sessions(2, 10, 3_000);
    for i in 0..120u32 {
        answered_tcp(
            &mut obs,
            u64::from(i) * 450,
            BOT,
            internet(5_000 + i),
            50_000 + i as u16,
            22,
        );
    }
    let d = run(&sorted(obs));
    assert!(d.is_empty(), "{d:#?}");
}

/// An SSH session from [`BOT`] to `dst` that starts at `ms` and ends `lasts_ms` later, the
/// closing event carrying the kernel's start stamp.
fn long_ssh_session(obs: &mut Vec<Observation>, ms: u64, dst: IpAddr, sport: u16, lasts_ms: u64) {
    answered_tcp(obs, ms, BOT, dst, sport, 22);
    if let Observation::Flow(mut e) = established(ms + lasts_ms, BOT, dst, sport, 22) {
        e.tcp_state = Some(TcpState::TimeWait);
        e.start = Some(Time(T0 + ms * MS));
        obs.push(Observation::Flow(e));
    }
}

#[test]
fn spread_sessions_that_last_are_not_attempts() {
    // 90 sessions at 30 servers, one a second, each lasting 20 s (kernel timestamps): at
    // most the 20 still open count at any time.
    let mut obs = Vec::new();
    for k in 0..90u64 {
        let (ms, sport, dst) = (
            k * 1_000,
            30_000 + k as u16,
            internet(1_000 + k as u32 % 30),
        );
        long_ssh_session(&mut obs, ms, dst, sport, 20_000);
    }
    let d = run(&sorted(obs));
    assert!(of(&d, Category::BruteForce).is_empty(), "{d:#?}");
}

#[test]
fn a_scan_of_the_ssh_port_is_not_spread_brute_force() {
    // A SYN sweep of port 22 over 300 hosts: 40 open (SYN-ACK, then the scanner's reset,
    // never established), the rest silent.
    let mut obs = Vec::new();
    for i in 0..300u32 {
        let (ms, dst) = (u64::from(i) * 100, internet(7_000 + i));
        obs.push(syn(ms, BOT, dst, 40_000, 22));
        if i % 7 == 0 {
            obs.push(synack(ms + 1, BOT, dst, 40_000, 22));
            obs.push(rst(ms + 2, BOT, dst, 40_000, 22));
        }
    }
    let d = run(&sorted(obs));
    assert!(of(&d, Category::BruteForce).is_empty(), "{d:#?}");
    assert_eq!(of(&d, Category::NetworkScan).len(), 1, "{d:#?}");
}

#[test]
fn spread_rule_can_be_switched_off() {
    let text = POLICY.replace(
        "profiles:\n",
        "profiles:\n  default:\n    brute_force:\n      spread: {enabled: false}\n",
    );
    let mut e = Engine::new(policy_from(&text));
    assert!(drive(&mut e, &spread_sessions(30, 4, 400), 1_000).is_empty());
}

// ---------------------------------------------------------------------------------------------
// port scan
// ---------------------------------------------------------------------------------------------

/// A SYN scan of `ports` ports of one target, `per_sec` a second: closed ports reset, every
/// 50th port open.
fn port_scan(ports: u16, per_sec: u64) -> Vec<Observation> {
    let target = ip("198.51.100.33");
    let mut obs = Vec::new();
    for p in 1..=ports {
        let ms = u64::from(p) * 1000 / per_sec;
        obs.push(syn(ms, BOT, target, 61_000, p));
        if p % 50 == 0 {
            obs.push(synack(ms + 1, BOT, target, 61_000, p));
        } else {
            obs.push(rst(ms + 1, BOT, target, 61_000, p));
        }
    }
    sorted(obs)
}

#[test]
fn port_scan_is_detected() {
    let d = run(&port_scan(1_000, 500));
    let p = of(&d, Category::PortScan);
    assert_eq!(p.len(), 1, "{d:#?}");
    assert_eq!(d.len(), 1, "{d:#?}");
    assert!(crossed_value(p[0], "distinct_ports") >= 100.0);
    assert!(crossed_value(p[0], "unanswered_ratio") >= 0.9);
    assert_eq!(p[0].evidence.top_destinations[0].key, ip("198.51.100.33"));
    // ~100 ports at 500/s: detected within the first quarter second after 0.2 s.
    assert!(p[0].time <= Time(T0 + 500 * MS), "{:?}", p[0].time);
}

#[test]
fn port_scan_just_under_the_threshold_is_not() {
    // 90 ports: under 100 including the linear-counting error (±6% at this size).
    let d = run(&port_scan(90, 100));
    assert!(d.is_empty(), "{d:#?}");
}

#[test]
fn many_open_ports_of_one_server_is_not_a_scan() {
    // 150 ports, all accepted: a monitoring check of a server's services.
    let target = ip("198.51.100.34");
    let mut obs = Vec::new();
    for p in 1..=150u16 {
        answered_tcp(&mut obs, u64::from(p) * 10, BOT, target, 50_000, 1_000 + p);
    }
    let d = run(&sorted(obs));
    assert!(d.is_empty(), "{d:#?}");
}

#[test]
fn port_scan_hidden_in_busy_traffic_is_still_detected() {
    // A web crawler's 20 new flows/s to 2000 sites and a resolver's 50 lookups/s keep the
    // target table busy; the scanned host still wins its entry.
    let mut obs = port_scan(400, 20);
    for i in 0..400u64 {
        let ms = i * 50;
        answered_tcp(
            &mut obs,
            ms,
            BOT,
            internet(i as u32),
            50_000 + i as u16,
            443,
        );
        for j in 0..2 {
            let sport = (i * 2 + j) as u16;
            obs.push(udp(ms + j, BOT, ip("198.51.100.53"), sport, 53));
            obs.push(udp_reply(ms + j + 3, BOT, ip("198.51.100.53"), sport, 53));
        }
    }
    let obs = sorted(obs);
    let mut e = Engine::new(policy());
    let d = drive(&mut e, &obs, 1_000);
    assert_eq!(of(&d, Category::PortScan).len(), 1, "{d:#?}");
}

// ---------------------------------------------------------------------------------------------
// network scan
// ---------------------------------------------------------------------------------------------

fn telnet_sweep(n: u32, per_sec: u64) -> Vec<Observation> {
    (0..n)
        .map(|i| syn(u64::from(i) * 1000 / per_sec, BOT, internet(i), 50_000, 23))
        .collect()
}

#[test]
fn network_scan_is_detected() {
    let d = run(&telnet_sweep(1_000, 100));
    let n = of(&d, Category::NetworkScan);
    assert_eq!(n.len(), 1, "{d:#?}");
    assert!(crossed_value(n[0], "distinct_destinations") >= 200.0);
    assert_eq!(n[0].evidence.top_ports[0].key, 23);
    assert_eq!(n[0].evidence.counts["distinct_ports"], 1.0);
}

#[test]
fn network_scan_just_under_the_threshold_is_not() {
    // 170 addresses: 15% under 200, outside the sketch's error (σ ≈ 5% at this size).
    let d = run(&telnet_sweep(170, 10));
    assert!(
        d.is_empty(),
        "{:#?}",
        d.iter().map(|d| &d.evidence.crossed).collect::<Vec<_>>()
    );
}

#[test]
fn downloading_from_many_mirrors_is_not_a_scan() {
    // 600 mirrors in a minute on 80 and 443, all answered.
    let mut obs = Vec::new();
    for i in 0..600u64 {
        let port = if i % 2 == 0 { 80 } else { 443 };
        answered_tcp(
            &mut obs,
            i * 100,
            BOT,
            internet(i as u32),
            40_000 + i as u16,
            port,
        );
    }
    let d = run(&sorted(obs));
    assert!(d.is_empty(), "{d:#?}");
}

#[test]
fn peer_to_peer_fan_out_is_not_a_network_scan() {
    // 2000 peers on random ports, most not answering.
    let obs: Vec<_> = (0..2_000u32)
        .map(|i| {
            udp(
                u64::from(i) * 20,
                BOT,
                internet(i),
                6_881,
                10_000 + (i * 7919 % 50_000) as u16,
            )
        })
        .collect();
    let d = run(&obs);
    assert!(of(&d, Category::NetworkScan).is_empty(), "{d:#?}");
    assert!(of(&d, Category::PortScan).is_empty(), "{d:#?}");
}

#[test]
fn ipv6_sources_are_aggregated_per_64() {
    // Each probe from a different address of the same /64.
    let obs: Vec<_> = (0..1_000u32)
        .map(|i| {
            let src = format!("2001:db8:1:5::{:x}", i + 1);
            let dst: IpAddr = format!("2001:db8:ffff::{:x}", i + 1).parse().unwrap();
            syn(u64::from(i) * 10, &src, dst, 50_000, 22)
        })
        .collect();
    let mut e = Engine::new(policy());
    let d = drive(&mut e, &obs, 1_000);
    let n = of(&d, Category::NetworkScan);
    assert_eq!(n.len(), 1, "{d:#?}");
    assert_eq!(n[0].source, "2001:db8:1:5::/64".parse::<IpNet>().unwrap());
    assert_eq!(e.stats().tracked_sources, 1);
}

// ---------------------------------------------------------------------------------------------
// spam
// ---------------------------------------------------------------------------------------------

fn smtp_fan_out(src: &str, n: u32, every_ms: u64) -> Vec<Observation> {
    let mut obs = Vec::new();
    for i in 0..n {
        answered_tcp(
            &mut obs,
            u64::from(i) * every_ms,
            src,
            internet(i),
            45_000 + i as u16,
            25,
        );
    }
    sorted(obs)
}

#[test]
fn spam_is_detected() {
    let d = run(&smtp_fan_out(BOT, 80, 2_000));
    let s = of(&d, Category::Spam);
    assert_eq!(s.len(), 1, "{d:#?}");
    assert_eq!(d.len(), 1, "{d:#?}");
    assert!(crossed_value(s[0], "distinct_destinations") >= 40.0);
    assert_eq!(s[0].evidence.top_ports[0].key, 25);
    assert!(s[0].evidence.sample.iter().all(|x| x.dport == 25));
}

#[test]
fn spam_just_under_the_threshold_is_not() {
    // 35 mail servers in 5 minutes: under 40 including the sketch's error.
    assert!(run(&smtp_fan_out(BOT, 35, 5_000)).is_empty());
}

/// Like [`smtp_fan_out`], to `port`.
fn smtp_fan_out_to(src: &str, n: u32, every_ms: u64, port: u16) -> Vec<Observation> {
    let mut obs = Vec::new();
    for i in 0..n {
        answered_tcp(
            &mut obs,
            u64::from(i) * every_ms,
            src,
            internet(i),
            45_000 + i as u16,
            port,
        );
    }
    sorted(obs)
}

#[test]
fn submission_port_fan_out_is_spam_by_default_and_names_the_port() {
    for port in [587u16, 465] {
        let mut obs = smtp_fan_out_to(BOT, 60, 2_000, port);
        // The host's web traffic alongside: not in the spam evidence's ports.
        for i in 0..200u32 {
            answered_tcp(
                &mut obs,
                u64::from(i) * 500,
                BOT,
                internet(9_000 + i % 5),
                20_000 + i as u16,
                443,
            );
        }
        let d = run(&sorted(obs));
        let s = of(&d, Category::Spam);
        assert_eq!(s.len(), 1, "{port}: {d:#?}");
        let ev = &s[0].evidence;
        assert!(crossed_value(s[0], "distinct_destinations") >= 40.0);
        assert_eq!(ev.top_ports.len(), 1, "{ev:#?}");
        assert_eq!(ev.top_ports[0].key, port, "{ev:#?}");
    }
}

#[test]
fn submitting_to_two_servers_is_not_spam() {
    // A mail client (or a web application) submitting 200 messages in 5 minutes to its
    // provider's two submission servers, and a relay's handful of MX on 25.
    let mut obs = Vec::new();
    for i in 0..200u32 {
        let dst = internet(i % 2);
        answered_tcp(
            &mut obs,
            u64::from(i) * 1_500,
            BOT,
            dst,
            20_000 + i as u16,
            587,
        );
        answered_tcp(
            &mut obs,
            u64::from(i) * 1_500 + 7,
            BOT,
            internet(100 + i % 6),
            30_000 + i as u16,
            25,
        );
    }
    let d = run(&sorted(obs));
    assert!(d.is_empty(), "{d:#?}");
}

#[test]
fn mail_relay_profile_is_not_spam() {
    // The same fan-out, 10 times wider, from the relay network (spam disabled).
    let d = run(&smtp_fan_out("192.0.2.25", 800, 300));
    assert!(d.is_empty(), "{d:#?}");
}

// ---------------------------------------------------------------------------------------------
// engine behaviour
// ---------------------------------------------------------------------------------------------

#[test]
fn a_detected_source_is_held_down_then_rearmed() {
    // A SYN flood for 60 s, then quiet.
    let d = run(&syn_flood(BOT, 0, 1_000, 60));
    let f = of(&d, Category::Flood);
    assert!(f.len() >= 5 && f.len() <= 6, "{}", f.len());
    for w in f.windows(2) {
        // Not again before the 10 s window has rolled over ...
        assert!(w[1].time.since(w[0].time).as_secs_f64() >= 10.0);
        // ... but re-armed right after it.
        assert!(w[1].time.since(w[0].time).as_secs_f64() <= 10.25);
    }
    let mut e = Engine::new(policy());
    drive(&mut e, &syn_flood(BOT, 0, 1_000, 60), 0);
    assert!(e.stats().held_down > 0);
    // Quiet afterwards: nothing more.
    let mut more = Vec::new();
    e.observe(&Observation::Tick {
        time: Time(T0 + 200_000 * MS),
    });
    e.evaluate(Time(T0 + 200_000 * MS), &mut more);
    assert!(more.is_empty());
}

#[test]
fn non_customers_are_ignored() {
    let obs: Vec<_> = (0..10_000u64)
        .map(|i| syn(i / 2, "198.51.100.200", ip("203.0.113.9"), 1_000, 22))
        .collect();
    let mut e = Engine::new(policy());
    assert!(drive(&mut e, &obs, 0).is_empty());
    let s = e.stats();
    assert_eq!(s.tracked_sources, 0);
    assert_eq!(s.ignored, 10_000);
}

#[test]
fn dumped_flows_are_not_new() {
    // After a loss the observer dumps the table: 10 000 established flows at once.
    let mut obs = vec![Observation::Lost { time: Time(T0) }];
    for i in 0..10_000u64 {
        obs.push(flow(
            1,
            FlowEventKind::Existing,
            BOT,
            internet(i as u32),
            proto::TCP,
            (1024 + i) as u16,
            443,
            ct_status::SEEN_REPLY | ct_status::ASSURED,
            Some(TcpState::Established),
        ));
    }
    let mut e = Engine::new(policy());
    assert!(drive(&mut e, &obs, 1_000).is_empty());
    assert_eq!(e.stats().dumped_flows, 10_000);
    assert_eq!(e.stats().lost, 1);
}

/// What a dump at `dump_ms` shows of a scan's `n` filtered ports (unanswered SYNs; its
/// closed ports are never in a dump, the kernel deletes a flow whose only reply is a reset)
/// from `BOT` to distinct ports of one server, all started at `start` (the kernel's stamps).
fn filtered_probes(dump_ms: u64, n: u16, start: Time) -> impl Iterator<Item = Observation> {
    (1..=n).map(move |p| {
        let mut o = flow(
            dump_ms,
            FlowEventKind::Existing,
            BOT,
            internet(1),
            proto::TCP,
            40_000 + p,
            p,
            0,
            Some(TcpState::SynSent),
        );
        if let Observation::Flow(e) = &mut o {
            e.start = Some(start);
        }
        o
    })
}

/// A resynchronising dump after a loss at 5 s: a scan's `n` filtered ports
/// ([`filtered_probes`]) started `age_ms` before the loss.
fn dump_after_loss(n: u16, age_ms: u64) -> Vec<Observation> {
    let loss = T0 + 5_000 * MS;
    let mut obs = vec![Observation::Lost { time: Time(loss) }];
    obs.extend(filtered_probes(5_100, n, Time(loss - age_ms * MS)));
    obs
}

#[test]
fn a_scan_lost_in_an_overflow_is_recovered_from_the_dump() {
    // The scan's own events went with the overflow; the dump that follows holds its probes
    // of filtered ports, stamped by the kernel as started around the loss: they count as new.
    let mut e = Engine::new(policy());
    let found = drive(&mut e, &dump_after_loss(150, 500), 1_000);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].category, Category::PortScan);
    assert_eq!(e.stats().recovered_flows, 150);
    assert_eq!(e.stats().dumped_flows, 0);
}

#[test]
fn answered_flows_dumped_after_a_loss_are_not_counted_again() {
    // A busy customer's established flows may have been seen live before the overflow:
    // counting them from the dump too would double its rates.
    let mut obs = dump_after_loss(150, 500);
    for o in &mut obs {
        if let Observation::Flow(e) = o {
            e.status |= ct_status::SEEN_REPLY | ct_status::ASSURED;
            e.tcp_state = Some(TcpState::Established);
        }
    }
    let mut e = Engine::new(policy());
    assert!(drive(&mut e, &obs, 1_000).is_empty());
    assert_eq!(e.stats().recovered_flows, 0);
    assert_eq!(e.stats().dumped_flows, 150);
}

#[test]
fn open_ports_of_a_lost_syn_scan_are_recovered_as_accepted() {
    // A SYN scan resets the SYN-ACKs of open ports: CLOSE with a reply, kept 10 s. From a
    // dump of the blind period they count as new and accepted, so a server with 150 open
    // ports is no scan (the share unaccepted is what makes one).
    let mut obs = dump_after_loss(150, 500);
    for o in &mut obs {
        if let Observation::Flow(e) = o {
            e.status |= ct_status::SEEN_REPLY;
            e.tcp_state = Some(TcpState::Close);
        }
    }
    let mut e = Engine::new(policy());
    assert!(drive(&mut e, &obs, 1_000).is_empty());
    assert_eq!(e.stats().recovered_flows, 150);
}

#[test]
fn a_scan_in_a_sustained_overflow_is_recovered_once() {
    // Losses every second from 1 s to 6 s; the scan (150 filtered ports, started at 2 s)
    // lost with them. The dump requested at 6 s holds it: counted, although the last loss
    // is four seconds after the scan began. A second dump at 8 s holds it again: not
    // counted twice.
    let scan = |dump_ms: u64| filtered_probes(dump_ms, 150, Time(T0 + 2_000 * MS));
    let mut obs: Vec<Observation> = (1..=6u64)
        .map(|s| Observation::Lost {
            time: Time(T0 + s * 1_000 * MS),
        })
        .collect();
    obs.extend(scan(6_500));
    obs.push(Observation::Resynced {
        time: Time(T0 + 6_600 * MS),
        started: Time(T0 + 6_000 * MS),
    });
    obs.extend(scan(8_500));
    obs.push(Observation::Resynced {
        time: Time(T0 + 8_600 * MS),
        started: Time(T0 + 8_000 * MS),
    });
    let mut e = Engine::new(policy());
    let found = drive(&mut e, &obs, 1_000);
    assert_eq!(of(&found, Category::PortScan).len(), 1, "{found:#?}");
    assert_eq!(e.stats().recovered_flows, 150);
    assert_eq!(e.stats().dumped_flows, 150);
}

#[test]
fn flows_dumped_after_a_loss_that_started_long_before_are_not_new() {
    // Started ten seconds before the loss: seen live back then (or before the agent ran).
    let mut e = Engine::new(policy());
    assert!(drive(&mut e, &dump_after_loss(150, 10_000), 1_000).is_empty());
    assert_eq!(e.stats().recovered_flows, 0);
    assert_eq!(e.stats().dumped_flows, 150);
}

/// A dump after a loss at `T0 + 5 s`: `n` unanswered UDP flows, flow `i` from `src(i)`,
/// started `age_ms` before the loss.
fn unanswered_dump(n: u32, age_ms: u64, src: impl Fn(u32) -> String) -> Vec<Observation> {
    let loss = T0 + 5_000 * MS;
    let mut obs = vec![Observation::Lost { time: Time(loss) }];
    for i in 0..n {
        let s = src(i);
        let dst = if s.contains(':') {
            ip("2001:db8:ffff::1")
        } else {
            internet(i)
        };
        let mut o = udp(5_100, &s, dst, 40_000, 9);
        if let Observation::Flow(e) = &mut o {
            e.kind = FlowEventKind::Existing;
            e.start = Some(Time(loss - age_ms * MS));
        }
        obs.push(o);
    }
    obs
}

#[test]
fn unanswered_flows_dumped_after_a_loss_count_only_from_the_blind_period() {
    let mut e = Engine::new(policy());
    drive(&mut e, &unanswered_dump(300, 500, |_| BOT.into()), 1_000);
    assert_eq!(e.stats().recovered_flows, 300);
    let mut e = Engine::new(policy());
    drive(&mut e, &unanswered_dump(300, 10_000, |_| BOT.into()), 1_000);
    assert_eq!(e.stats().recovered_flows, 0);
    assert_eq!(e.stats().dumped_flows, 300);
}

#[test]
fn a_dump_at_the_cap_evicts_no_tracked_source() {
    let p = policy_from(&format!("{POLICY}detection:\n  max_sources: 1024\n"));
    let mut e = Engine::new(p);
    let spoofed = |i: u32| format!("2001:db8:1:{i:x}::1");
    for i in 0..1024u32 {
        e.observe(&udp(
            u64::from(i),
            &spoofed(i),
            ip("2001:db8:ffff::1"),
            1,
            9,
        ));
    }
    // The dump holds 5,000 untracked sources' flows from the blind period, and 24 of tracked
    // ones: those are counted, the others skipped.
    let obs = unanswered_dump(5_024, 500, |i| {
        spoofed(if i < 5_000 { 10_000 + i } else { i - 5_000 })
    });
    drive(&mut e, &obs, 1_000);
    let s = e.stats();
    assert_eq!(s.evictions, 0);
    assert_eq!(s.untracked_skipped, 5_000);
    assert_eq!(s.recovered_flows, 24);
    assert_eq!(s.tracked_sources, 1024);
}

#[test]
fn sources_are_capped_and_the_idlest_evicted() {
    let p = policy_from(&format!("{POLICY}detection:\n  max_sources: 1024\n"));
    let mut e = Engine::new(p);
    let mut out = Vec::new();
    for i in 0..10_000u32 {
        let src = IpAddr::from((0xcb00_7100u32 | (i & 0xff)).to_be_bytes());
        // Only 256 addresses in 203.0.113.0/24: use the IPv6 network for more.
        let src = if i < 256 {
            src
        } else {
            format!("2001:db8:1:{:x}::1", i).parse().unwrap()
        };
        if let Observation::Flow(mut f) = syn(u64::from(i), BOT, ip("198.51.100.1"), 1, 80) {
            f.src = src;
            f.dst = if src.is_ipv4() {
                f.dst
            } else {
                ip("2001:db8:ffff::1")
            };
            e.observe(&Observation::Flow(f));
        }
        if i % 250 == 0 {
            e.evaluate(Time(T0 + u64::from(i) * MS), &mut out);
        }
    }
    let s = e.stats();
    assert_eq!(s.tracked_sources, 1024);
    assert_eq!(s.evictions, 10_000 - 1024);
    // The most recent are kept, the oldest gone.
    assert!(e.is_tracked("2001:db8:1:270f::1".parse().unwrap()));
    assert!(!e.is_tracked(ip("203.0.113.0")));
}

#[test]
fn destroys_of_untracked_sources_do_not_evict_a_scanner() {
    // A spoofed storm at the cap: each source's NEW evicts the idlest, and its DESTROY a
    // second later must not come back for another slot (the scanner's, whose own events thin
    // out in an overflow).
    let p = policy_from(&format!("{POLICY}detection:\n  max_sources: 1024\n"));
    let mut e = Engine::new(p);
    let target = ip("198.51.100.33");
    let spoofed = |i: u32| format!("2001:db8:1:{i:x}::1");
    let mut out = Vec::new();
    for i in 0..1024u32 {
        e.observe(&udp(
            u64::from(i),
            &spoofed(i),
            ip("2001:db8:ffff::1"),
            1,
            9,
        ));
    }
    // The scanner's first half, then the DESTROYs of 10,000 spoofed flows nobody tracks
    // any more (their NEWs went long ago), then the second half.
    for p in 1..=60u16 {
        e.observe(&syn(2_000 + u64::from(p), BOT, target, 61_000, p));
    }
    for i in 0..10_000u32 {
        let Observation::Flow(mut d) = udp(2_100, BOT, ip("2001:db8:ffff::1"), 1, 9) else {
            unreachable!()
        };
        d.kind = FlowEventKind::Destroy;
        d.src = spoofed(20_000 + i).parse().unwrap();
        e.observe(&Observation::Flow(d));
    }
    for p in 61..=120u16 {
        e.observe(&syn(2_200 + u64::from(p), BOT, target, 61_000, p));
        e.observe(&rst(2_201 + u64::from(p), BOT, target, 61_000, p));
    }
    e.evaluate(Time(T0 + 3_000 * MS), &mut out);
    assert_eq!(of(&out, Category::PortScan).len(), 1, "{out:#?}");
    let s = e.stats();
    assert_eq!(s.tracked_sources, 1024);
    assert_eq!(
        s.evictions, 1,
        "only the scanner's own arrival evicted a source"
    );
}

#[test]
fn policy_reload_keeps_the_windows() {
    // Half the flood, reload (same thresholds, new Arc), the other half: detected at the
    // same moment as without the reload.
    let obs = syn_flood(BOT, 0, 1_000, 8);
    let (a, b) = obs.split_at(3_000);
    let mut e = Engine::new(policy());
    let mut d = drive(&mut e, a, 0);
    e.set_policy(policy_from(&format!("{POLICY}# reloaded\n")));
    d.extend(drive(&mut e, b, 1_000));
    let f = of(&d, Category::Flood);
    assert_eq!(f.len(), 1, "{d:#?}");
    assert_eq!(f[0].time, Time(T0 + 5_000 * MS));
}

#[test]
fn policy_reload_applies_new_thresholds_and_cap() {
    let mut e = Engine::new(policy());
    drive(&mut e, &port_scan(60, 100), 0);
    // Lower the port-scan threshold: the next event crosses it.
    e.set_policy(policy_from(&POLICY.replace(
        "profiles:\n",
        "profiles:\n  default:\n    port_scan:\n      distinct_ports: 50\n",
    )));
    let mut d = Vec::new();
    e.observe(&syn(700, BOT, ip("198.51.100.33"), 61_000, 61));
    e.evaluate(Time(T0 + 750 * MS), &mut d);
    assert_eq!(of(&d, Category::PortScan).len(), 1, "{d:#?}");
    // Shrink the cap below the tracked count.
    let p = policy_from(&format!("{POLICY}detection:\n  max_sources: 1024\n"));
    for i in 0..200u32 {
        e.observe(&syn(
            800,
            &format!("203.0.113.{}", i % 250),
            ip("198.51.100.1"),
            1,
            80,
        ));
    }
    e.set_policy(p);
    assert!(e.stats().tracked_sources <= 1024);
    assert_eq!(e.stats().max_sources, 1024);
}

#[test]
fn disabling_a_category_on_reload_stops_it() {
    let text = POLICY.replace(
        "profiles:\n",
        "profiles:\n  default:\n    network_scan:\n      enabled: false\n",
    );
    let mut e = Engine::new(policy_from(&text));
    let d = drive(&mut e, &telnet_sweep(1_000, 100), 1_000);
    assert!(of(&d, Category::NetworkScan).is_empty(), "{d:#?}");
}

#[test]
fn replay_is_deterministic() {
    let mut obs = port_scan(300, 200);
    obs.extend(syn_flood("203.0.113.8", 0, 1_000, 8));
    obs.extend(smtp_fan_out("203.0.113.9", 60, 100));
    let obs = sorted(obs);
    let a = run(&obs);
    let b = run(&obs);
    assert_eq!(a, b);
    assert_eq!(a.len(), 3, "{a:#?}");
}

#[test]
fn evidence_reads_well_and_round_trips_as_json() {
    let d = run(&ssh_attempts(40, 1_000));
    let text = d[0].to_string();
    for needle in [
        "Abuse detected from 203.0.113.7: repeated login attempts",
        "[brute_force]",
        "profile \"default\"",
        "connections to login services of one server (attempts): 30 (limit 30)",
        "198.51.100.22",
        "Most contacted destination ports",
        "tcp 40000 -> 198.51.100.22:22 answered",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    let json = serde_json::to_string(&d[0]).unwrap();
    let back: Detection = serde_json::from_str(&json).unwrap();
    assert_eq!(back, d[0]);
}

#[test]
fn evaluate_does_not_allocate_without_detections() {
    // The touch list is reused: its capacity stays put across evaluations.
    let mut e = Engine::new(policy());
    let mut out = Vec::new();
    for round in 0..10u64 {
        for i in 0..100u64 {
            e.observe(&udp(
                round * 250 + i,
                BOT,
                ip("198.51.100.53"),
                i as u16,
                53,
            ));
        }
        e.evaluate(Time(T0 + (round + 1) * 250 * MS), &mut out);
    }
    let cap = e.touched.capacity();
    for round in 10..20u64 {
        e.observe(&udp(round * 250, BOT, ip("198.51.100.53"), 1, 53));
        e.evaluate(Time(T0 + (round + 1) * 250 * MS), &mut out);
    }
    assert_eq!(e.touched.capacity(), cap);
    assert!(out.is_empty());
}

#[test]
fn arbitrary_streams_never_panic_and_respect_the_cap() {
    // Deterministic pseudo-random garbage: times jumping back and forth (to the far past and
    // the far future), every kind, status and state, both families, zero intervals.
    let p = policy_from(&format!("{POLICY}detection:\n  max_sources: 1024\n"));
    let mut e = Engine::new(p);
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::new();
    for i in 0..200_000u64 {
        let r = next();
        let time = match r % 7 {
            0 => Time(r),
            1 => Time(0),
            2 => Time(u64::MAX - (r % 1000)),
            _ => Time(T0 + (i * 997 % 100_000) * MS),
        };
        let v6 = r & 8 != 0;
        let src: IpAddr = if v6 {
            format!("2001:db8:1:{:x}::{:x}", r % 5000, r % 77)
                .parse()
                .unwrap()
        } else {
            IpAddr::from([203, 0, 113, (r >> 8) as u8])
        };
        let dst: IpAddr = if (r >> 3) % 11 == 0 {
            // mismatched family now and then
            IpAddr::from([198, 51, 100, 1])
        } else if v6 {
            format!("2001:db8:ffff::{:x}", r % 9999).parse().unwrap()
        } else {
            IpAddr::from(((r >> 16) as u32).to_be_bytes())
        };
        let obs = match (r >> 40) % 10 {
            0 => Observation::Counters(CounterSample {
                time,
                addr: src,
                packets: next(),
                bytes: next(),
                interval_ns: next() % 3,
                udp_packets: 0,
                echo_packets: 0,
            }),
            1 => Observation::Tick { time },
            2 => Observation::Lost { time },
            _ => Observation::Flow(FlowEvent {
                time,
                kind: [
                    FlowEventKind::New,
                    FlowEventKind::Update,
                    FlowEventKind::Destroy,
                ][(r >> 20) as usize % 3],
                src,
                dst,
                proto: [proto::TCP, proto::UDP, proto::ICMP, 47][(r >> 24) as usize % 4],
                sport: (r >> 28) as u16,
                dport: [22, 25, 53, 123, 443, (r >> 44) as u16][(r >> 32) as usize % 6],
                icmp: None,
                status: (r >> 48) as u32 & 0xf,
                tcp_state: Some(TcpState::from_kernel((r >> 52) as u8 % 13)),
                orig_packets: None,
                orig_bytes: None,
                reply_packets: None,
                reply_bytes: None,
                start: if r & 1 == 0 { Some(Time(next())) } else { None },
                stop: None,
                labels: 0,
            }),
        };
        e.observe(&obs);
        if i % 97 == 0 {
            e.evaluate(time, &mut out);
        }
        if i % 50_000 == 0 {
            let text = if i % 100_000 == 0 {
                format!("{POLICY}detection:\n  max_sources: 2048\n")
            } else {
                format!("{POLICY}detection:\n  max_sources: 1024\n")
            };
            e.set_policy(policy_from(&text));
        }
        assert!(e.stats().tracked_sources <= e.stats().max_sources);
    }
    for d in &out {
        // Every detection is printable and serialisable.
        assert!(!d.to_string().is_empty());
        serde_json::to_string(d).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// holds: the detector starts afresh when a hold begins or is lifted
// ---------------------------------------------------------------------------------------------

fn held(ms: u64) -> HoldChange {
    HoldChange::Held {
        target: "203.0.113.7/32".parse().unwrap(),
        since: Time(T0 + ms * MS),
        kind: BlockKind::Quarantine,
    }
}

fn lifted(ms: u64) -> HoldChange {
    HoldChange::Lifted {
        target: "203.0.113.7/32".parse().unwrap(),
        time: Time(T0 + ms * MS),
    }
}

/// A packet flood by counters: `pps` packets per second of samples from `from_ms` for `secs`,
/// with the unanswered flows that make counter rates count.
fn counter_flood(from_ms: u64, secs: u64, pps: u64) -> Vec<Observation> {
    let mut obs = Vec::new();
    for s in 0..secs {
        let ms = from_ms + s * 1000;
        obs.push(syn(ms, BOT, ip("198.51.100.10"), 1024 + s as u16, 80));
        obs.push(counters(ms + 500, BOT, pps, pps * 1000));
    }
    obs
}

#[test]
fn a_flood_continuing_into_its_hold_is_not_charged_again() {
    let mut e = Engine::new(policy());
    let mut d = drive(&mut e, &counter_flood(0, 5, 200_000), 0);
    let first = of(&d, Category::Flood);
    assert_eq!(first.len(), 1, "{d:#?}");
    let since = first[0].time.as_nanos() / MS - T0 / MS;
    e.on_hold_change(&held(since));
    // The counter rule counts before the hold's drop: the flood goes on in the samples for
    // 20 s more (what the hold drops), and no flow passes.
    let mut rest: Vec<Observation> = (0..20)
        .map(|s| counters(since + 500 + s * 1000, BOT, 200_000, 200_000_000))
        .collect();
    // A sample taken before the hold, queued behind it.
    rest.insert(0, counters(since - 100, BOT, 200_000, 200_000_000));
    d = drive(&mut e, &rest, 1_000);
    assert!(d.is_empty(), "charged again while held: {d:#?}");
    let st = e.stats();
    assert_eq!(st.held_samples, 21, "{st:?}");
    assert_eq!(st.holds, 1);
}

#[test]
fn flows_from_before_the_hold_are_not_charged() {
    let mut e = Engine::new(policy());
    // 60 of a port scan's probes seen, then the hold (a quarantine), then 60 more probes that
    // happened before it arrive late: nothing crosses 100 ports.
    let scan = port_scan(120, 100);
    let (before, late): (Vec<_>, Vec<_>) = scan
        .into_iter()
        .partition(|o| o.time().as_nanos() < T0 + 600 * MS);
    drive(&mut e, &before, 0);
    e.on_hold_change(&held(1_300));
    let d = drive(&mut e, &late, 500);
    assert!(d.is_empty(), "{d:#?}");
    assert!(e.stats().stale_events > 0);
}

#[test]
fn abuse_through_the_quarantine_is_a_new_offense_with_its_own_window() {
    let garden = format!("{POLICY}  walled_garden: [198.51.100.33]\n");
    let mut e = Engine::new(policy_from(&garden));
    e.on_hold_change(&held(0));
    // A scan of the abuse portal (in the walled garden) passes the quarantine.
    let d = drive(&mut e, &port_scan(1_000, 500), 500);
    let p = of(&d, Category::PortScan);
    assert_eq!(p.len(), 1, "{d:#?}");
    // The evidence window begins no earlier than the hold: the decision may count it.
    assert!(
        p[0].evidence.window_start >= Time(T0),
        "{:?}",
        p[0].evidence
    );
}

#[test]
fn after_a_lift_a_re_offense_is_detected_at_once() {
    let mut e = Engine::new(policy());
    let d = drive(&mut e, &port_scan(1_000, 500), 0);
    assert_eq!(of(&d, Category::PortScan).len(), 1);
    e.on_hold_change(&held(2_100));
    // Reconnected 10 s later, well inside the 60 s port-scan window and its hold-down.
    e.on_hold_change(&lifted(12_000));
    let again: Vec<Observation> = port_scan(1_000, 500)
        .into_iter()
        .map(|o| match o {
            Observation::Flow(mut f) => {
                f.time = Time(f.time.as_nanos() + 13_000 * MS);
                Observation::Flow(f)
            }
            o => o,
        })
        .collect();
    let d = drive(&mut e, &again, 500);
    let p = of(&d, Category::PortScan);
    assert_eq!(p.len(), 1, "re-offense not detected: {d:#?}");
    // Within the normal latency: ~100 ports at 500/s, the next evaluation.
    assert!(p[0].time <= Time(T0 + 13_500 * MS), "{:?}", p[0].time);
    assert!(p[0].evidence.window_start >= Time(T0 + 12_000 * MS));
    // Counter samples count again.
    assert_eq!(e.stats().holds, 0);
}

#[test]
fn a_hold_known_at_start_covers_sources_seen_later() {
    let mut e = Engine::new(policy());
    e.on_hold_change(&HoldChange::Held {
        target: "203.0.113.0/28".parse().unwrap(),
        since: Time(T0),
        kind: BlockKind::Quarantine,
    });
    let d = drive(&mut e, &counter_flood(1_000, 10, 200_000), 500);
    // The flows (they passed) count; the counter samples (dropped) do not.
    assert!(of(&d, Category::Flood).is_empty(), "{d:#?}");
    assert_eq!(e.stats().held_samples, 10);
}

// ---------------------------------------------------------------------------------------------
// category: a scan that touches auth ports is a scan
// ---------------------------------------------------------------------------------------------

const SHORT_SCAN_WINDOW: &str = "\
version: 1
networks:
  - prefix: 203.0.113.0/24
profiles:
  default:
    port_scan:
      window: 2s
";

#[test]
fn a_port_sweep_through_auth_ports_is_a_port_scan_not_brute_force() {
    let mut e = Engine::new(policy_from(SHORT_SCAN_WINDOW));
    // Ports 1-1000 at 500/s: 21, 22, 23, 110, 143, 445 among them (×30 when scaled from the
    // 2 s table to the 60 s brute-force window).
    let d = drive(&mut e, &port_scan(1_000, 500), 1_000);
    assert!(of(&d, Category::BruteForce).is_empty(), "{d:#?}");
    assert_eq!(of(&d, Category::PortScan).len(), 1, "{d:#?}");
}

#[test]
fn brute_force_with_a_short_scan_window_is_still_brute_force() {
    let mut e = Engine::new(policy_from(SHORT_SCAN_WINDOW));
    let d = drive(&mut e, &ssh_attempts(40, 100), 1_000);
    assert_eq!(of(&d, Category::BruteForce).len(), 1, "{d:#?}");
}

#[test]
fn port_scan_evidence_counts_every_port_seen_exactly() {
    // 1000 ports in 200 ms: all seen by the first evaluation after the crossing. The
    // 128-bit bitmap that drives the threshold saturates near 620; the evidence is exact.
    let d = run(&port_scan(1_000, 5_000));
    let p = of(&d, Category::PortScan);
    assert_eq!(p.len(), 1, "{d:#?}");
    let ev = &p[0].evidence;
    assert_eq!(ev.counts["distinct_ports"], 1000.0, "{:?}", ev.counts);
    assert!(!ev.counts.contains_key("distinct_ports_at_least"));
    assert_eq!(crossed_value(p[0], "distinct_ports"), 1000.0);
    // Mid-scan, the count is what was seen so far, exactly: ports 1..=124 by 250 ms.
    let d = run(&port_scan(1_000, 500));
    let p = of(&d, Category::PortScan);
    assert_eq!(p[0].evidence.counts["distinct_ports"], 124.0);
    assert_eq!(p[0].evidence.counts["flows_to_target"], 124.0);
}

#[test]
fn top_port_counts_are_never_inflated() {
    // One port hit 50 times, then a scan of 500 others once each, over an epoch boundary.
    let target = ip("198.51.100.33");
    let mut obs = Vec::new();
    for i in 0..50u64 {
        obs.push(syn(59_000 + i, BOT, target, 40_000 + i as u16, 443));
    }
    for p in 1..=500u16 {
        obs.push(syn(
            59_100 + u64::from(p) * 2,
            BOT,
            target,
            61_000,
            1000 + p,
        ));
    }
    let d = run(&sorted(obs));
    let p = of(&d, Category::PortScan);
    assert_eq!(p.len(), 1, "{d:#?}");
    for c in &p[0].evidence.top_ports {
        let truth = if c.key == 443 { 50 } else { 1 };
        assert!(
            c.count <= truth,
            "port {} reported {} (saw {truth})",
            c.key,
            c.count
        );
    }
}

#[test]
fn a_reload_keeps_the_flood_rates_and_applies_new_rate_thresholds() {
    let mut e = Engine::new(policy());
    let target = ip("198.51.100.98");
    // 4k echo requests/s: under the shipped 5k.
    let mut obs = vec![ping(0, BOT, target, 77)];
    for s in 1..=3 {
        obs.push(class_counters(s * 1000, BOT, 4_000, 0, 4_000));
    }
    assert!(drive(&mut e, &obs, 0).is_empty());
    // The same policy again, then one with `icmp_pps: 3k`: the rates go on.
    e.set_policy(policy_from(&format!("{POLICY}# reloaded\n")));
    e.set_policy(policy_from(&POLICY.replace(
        "profiles:\n",
        "profiles:\n  default:\n    flood:\n      icmp_pps: 3k\n",
    )));
    let later = vec![class_counters(4_000, BOT, 4_000, 0, 4_000)];
    let d = drive(&mut e, &later, 500);
    let f = of(&d, Category::Flood);
    assert_eq!(f.len(), 1, "{d:#?}");
    assert_eq!(f[0].evidence.pattern.as_deref(), Some("icmp_flood"));
    // Averaged over the four seconds, not only the one after the reload.
    assert_eq!(f[0].evidence.counts["icmp_pps"], 4_000.0);
}

// ---------------------------------------------------------------------------------------------
// issue 18: answered sweeps, UDP scans at the ICMP rate limit, slow scans
// ---------------------------------------------------------------------------------------------

fn pattern(d: &Detection) -> Option<&str> {
    d.evidence.pattern.as_deref()
}

/// A stateless scanner (masscan) sweeping port `port` of `n` hosts, `per_sec` a second: every
/// target answers, with a SYN-ACK (open, `open_every` 1) or a reset; the scanner's kernel
/// resets each SYN-ACK, so no handshake completes.
fn stateless_sweep(n: u32, per_sec: u64, port: u16, open_every: u32) -> Vec<Observation> {
    let mut obs = Vec::new();
    for i in 0..n {
        let ms = u64::from(i) * 1000 / per_sec;
        let dst = internet(i);
        obs.push(syn(ms, BOT, dst, 61_000, port));
        if i % open_every == 0 {
            obs.push(synack(ms + 1, BOT, dst, 61_000, port));
            obs.push(rst(ms + 2, BOT, dst, 61_000, port));
        } else {
            obs.push(rst(ms + 1, BOT, dst, 61_000, port));
        }
    }
    sorted(obs)
}

#[test]
fn answered_sweep_of_a_stateless_scanner_is_detected() {
    // Every target answers with a SYN-ACK: no flow is unanswered, none completes.
    let d = run(&stateless_sweep(1_000, 100, 80, 1));
    let n = of(&d, Category::NetworkScan);
    assert_eq!(n.len(), 1, "{d:#?}");
    assert_eq!(pattern(n[0]), Some("answered_sweep"));
    assert!(crossed_value(n[0], "distinct_destinations") >= 200.0);
    assert!(crossed_value(n[0], "incomplete_ratio") >= 0.99);
    assert_eq!(n[0].evidence.counts["unanswered_ratio"], 0.0);
    assert_eq!(n[0].evidence.top_ports[0].key, 80);
    // 200 hosts at 100/s: within the quarter second after 2 s.
    assert!(n[0].time <= Time(T0 + 2_500 * MS), "{:?}", n[0].time);
    assert!(
        serde_json::to_string(&n[0].evidence)
            .unwrap()
            .contains(r#""pattern":"answered_sweep""#)
    );
}

#[test]
fn sweep_of_closed_ports_answered_by_resets_is_detected() {
    // Hosts up, port closed: every probe reset by the target (an answer to the old rule).
    let d = run(&stateless_sweep(1_000, 100, 23, 1_000_000));
    let n = of(&d, Category::NetworkScan);
    assert_eq!(n.len(), 1, "{d:#?}");
    assert_eq!(pattern(n[0]), Some("answered_sweep"));
}

#[test]
fn answered_sweep_just_under_the_threshold_is_not() {
    let d = run(&stateless_sweep(170, 10, 80, 1));
    assert!(d.is_empty(), "{d:#?}");
}

#[test]
fn unanswered_sweep_keeps_its_plain_pattern() {
    let d = run(&telnet_sweep(1_000, 100));
    let n = of(&d, Category::NetworkScan);
    assert_eq!(n.len(), 1, "{d:#?}");
    assert_eq!(pattern(n[0]), None);
}

#[test]
fn busy_web_client_with_failures_is_not_an_answered_sweep() {
    // A crawler: 1200 sites in two minutes on 443, 30 % of them not answering or refusing.
    let mut obs = Vec::new();
    for i in 0..1_200u64 {
        let ms = i * 100;
        let dst = internet(i as u32);
        let sport = 30_000 + i as u16;
        match i % 10 {
            0..=1 => obs.push(syn(ms, BOT, dst, sport, 443)),
            2 => {
                obs.push(syn(ms, BOT, dst, sport, 443));
                obs.push(rst(ms + 1, BOT, dst, sport, 443));
            }
            _ => answered_tcp(&mut obs, ms, BOT, dst, sport, 443),
        }
    }
    let d = run(&sorted(obs));
    assert!(d.is_empty(), "{d:#?}");
}

/// nmap -sU against a Linux host whose closed ports answer with ICMP port-unreachable at
/// the kernel's rate limit: a burst of `burst` ports, then one new port a second, each
/// unanswered probe retried once with a new source port; ICMP errors leave the flows
/// unreplied in conntrack. `secs` seconds.
fn udp_scan(burst: u16, secs: u64) -> Vec<Observation> {
    let target = ip("198.51.100.44");
    let mut obs = Vec::new();
    for p in 0..burst {
        obs.push(udp(u64::from(p), BOT, target, 58_859, 1 + p));
    }
    for s in 0..secs {
        let port = 1 + burst + s as u16;
        obs.push(udp(1_000 + s * 1_000, BOT, target, 58_861, port));
        obs.push(udp(1_500 + s * 1_000, BOT, target, 58_863, port));
    }
    sorted(obs)
}

#[test]
fn udp_scan_at_the_icmp_rate_limit_is_detected() {
    // 20 + 1/s: about 80 ports in a minute, under `distinct_ports` (100).
    let d = run(&udp_scan(20, 60));
    let p = of(&d, Category::PortScan);
    assert_eq!(p.len(), 1, "{d:#?}");
    assert_eq!(pattern(p[0]), Some("udp_scan"));
    assert!(crossed_value(p[0], "distinct_udp_ports") >= 50.0);
    assert!(crossed_value(p[0], "unanswered_ratio") >= 0.9);
    assert_eq!(p[0].evidence.top_destinations[0].key, ip("198.51.100.44"));
    // The 50th port comes at 31 s.
    assert!(p[0].time <= Time(T0 + 32_000 * MS), "{:?}", p[0].time);
}

#[test]
fn udp_scan_just_under_the_threshold_is_not() {
    let d = run(&udp_scan(10, 30));
    assert!(d.is_empty(), "{d:#?}");
}

#[test]
fn traceroutes_are_not_a_udp_scan() {
    // UDP traceroute to one host every 10 s for two minutes: 30 hops × 3 probes, ports
    // 33434 on, answered by ICMP time-exceeded (unreplied to conntrack); tracepath the same
    // from 44444.
    let target = ip("198.51.100.45");
    for base in [33_434u16, 44_444] {
        let mut obs = Vec::new();
        for round in 0..12u64 {
            for probe in 0..90u16 {
                let ms = round * 10_000 + u64::from(probe) * 20;
                obs.push(udp(ms, BOT, target, 40_000 + round as u16, base + probe));
            }
        }
        let d = run(&sorted(obs));
        assert!(d.is_empty(), "from {base}: {d:#?}");
    }
}

#[test]
fn rtp_media_to_one_peer_is_not_a_udp_scan() {
    // A media server: 120 calls to one gateway on distinct ports, every stream answered.
    let target = ip("198.51.100.46");
    let mut obs = Vec::new();
    for c in 0..120u16 {
        let ms = u64::from(c) * 400;
        obs.push(udp(ms, BOT, target, 20_000 + c * 2, 30_000 + c * 2));
        obs.push(udp_reply(
            ms + 30,
            BOT,
            target,
            20_000 + c * 2,
            30_000 + c * 2,
        ));
    }
    let d = run(&sorted(obs));
    assert!(d.is_empty(), "{d:#?}");
}

/// A slow sweep: one SYN a second to a new host on port 22 for `secs` seconds, answered by
/// nothing (`answered` false) or with a SYN-ACK the scanner resets.
fn slow_sweep(secs: u32, answered: bool) -> Vec<Observation> {
    let mut obs = Vec::new();
    for i in 0..secs {
        let ms = u64::from(i) * 1_000;
        let dst = internet(i);
        obs.push(syn(ms, BOT, dst, 61_000, 22));
        if answered {
            obs.push(synack(ms + 1, BOT, dst, 61_000, 22));
            obs.push(rst(ms + 2, BOT, dst, 61_000, 22));
        }
    }
    sorted(obs)
}

#[test]
fn slow_scan_at_one_probe_per_second_is_detected_within_ten_minutes() {
    for answered in [false, true] {
        let d = run(&slow_sweep(900, answered));
        let n = of(&d, Category::NetworkScan);
        assert_eq!(n.len(), 1, "answered {answered}: {d:#?}");
        assert_eq!(pattern(n[0]), Some("slow_scan"));
        assert!(crossed_value(n[0], "distinct_destinations") >= 300.0);
        assert!(n[0].time <= Time(T0 + 600_000 * MS), "{:?}", n[0].time);
        // The evidence covers the sweep from before the tracker attached.
        let ev = &n[0].evidence;
        assert!(ev.window_end.since(ev.window_start) >= std::time::Duration::from_secs(290));
        assert_eq!(ev.top_ports[0].key, 22);
    }
}

#[test]
fn slow_scan_just_under_the_threshold_is_not() {
    // 250 hosts at one a second, then nothing: under 300 (σ ≈ 5 % at this size).
    let d = run(&slow_sweep(250, false));
    assert!(d.is_empty(), "{d:#?}");
}

#[test]
fn monitoring_poller_and_resolver_are_not_slow_scans() {
    // A poller connects to 500 hosts round-robin, two a second, for 20 minutes (every
    // check completes); a resolver asks 2000 servers in turn; 5 % of the checks fail.
    let poller = "203.0.113.60";
    let resolver = "203.0.113.61";
    let mut obs = Vec::new();
    for i in 0..2_400u64 {
        let ms = i * 500;
        let dst = internet((i % 500) as u32);
        let sport = 20_000 + (i % 40_000) as u16;
        if i % 20 == 0 {
            obs.push(syn(ms, poller, dst, sport, 443));
        } else {
            answered_tcp(&mut obs, ms, poller, dst, sport, 443);
        }
        let ns = internet(10_000 + (i % 2_000) as u32);
        obs.push(udp(ms + 7, resolver, ns, sport, 53));
        if i % 20 != 0 {
            obs.push(udp_reply(ms + 30, resolver, ns, sport, 53));
        }
    }
    let d = run(&sorted(obs));
    assert!(d.is_empty(), "{d:#?}");
}

#[test]
fn slow_scan_keys_switch_it_off() {
    let text = "version: 1\nnetworks:\n  - prefix: 203.0.113.0/24\nprofiles:\n  default:\n    network_scan:\n      slow:\n        enabled: false\n";
    let mut e = Engine::new(policy_from(text));
    let d = drive(&mut e, &slow_sweep(900, false), 1_000);
    assert!(d.is_empty(), "{d:#?}");
    // A shorter window and a lower threshold detect sooner.
    let text = "version: 1\nnetworks:\n  - prefix: 203.0.113.0/24\nprofiles:\n  default:\n    network_scan:\n      slow: {window: 10m, distinct_destinations: 100}\n";
    let mut e = Engine::new(policy_from(text));
    let d = drive(&mut e, &slow_sweep(900, false), 1_000);
    let n = of(&d, Category::NetworkScan);
    assert!(!n.is_empty(), "{d:#?}");
    assert!(n[0].time <= Time(T0 + 130_000 * MS), "{:?}", n[0].time);
}

#[test]
fn completions_seen_only_in_a_dump_spare_a_busy_client() {
    // The ASSURED events of a crawler's connections went with an overflow; the dump that
    // follows shows them established. Without the dump's word it would be an answered sweep.
    let mut obs = vec![Observation::Lost {
        time: Time(T0 + MS),
    }];
    for i in 0..600u64 {
        let ms = 10 + i * 50;
        let dst = internet(i as u32);
        let sport = 30_000 + i as u16;
        obs.push(syn(ms, BOT, dst, sport, 443));
        obs.push(synack(ms + 1, BOT, dst, sport, 443));
        obs.push(flow(
            ms + 2,
            FlowEventKind::Existing,
            BOT,
            dst,
            proto::TCP,
            sport,
            443,
            ct_status::SEEN_REPLY | ct_status::ASSURED,
            Some(TcpState::Established),
        ));
    }
    let d = run(&sorted(obs.clone()));
    assert!(d.is_empty(), "{d:#?}");
    // The same stream without the dump is one.
    obs.retain(|o| !matches!(o, Observation::Flow(f) if f.kind == FlowEventKind::Existing));
    let d = run(&sorted(obs));
    assert_eq!(
        of(&d, Category::NetworkScan)
            .first()
            .and_then(|d| pattern(d)),
        Some("answered_sweep"),
        "{d:#?}"
    );
}

#[test]
fn the_report_names_the_pattern() {
    let d = run(&stateless_sweep(1_000, 100, 80, 1));
    let text = of(&d, Category::NetworkScan)[0].to_string();
    assert!(
        text.contains("Pattern: a sweep whose targets answered")
            && text.contains("(answered_sweep)"),
        "{text}"
    );
    let plain = of(&run(&telnet_sweep(1_000, 100)), Category::NetworkScan)[0].to_string();
    assert!(!plain.contains("Pattern:"), "{plain}");
}

// ---------------------------------------------------------------------------------------------
// Kernel flood meters and sampling (crate::meter)
// ---------------------------------------------------------------------------------------------

/// `o` with the labels of `kinds` (and of sampling when `sampled`).
fn labelled(mut o: Observation, kinds: &[Kind], sampled: bool) -> Observation {
    if let Observation::Flow(e) = &mut o {
        e.labels = kinds.iter().map(|k| k.bit()).fold(0, |a, b| a | b);
        if sampled {
            e.labels |= meter::SAMPLED_BIT;
        }
    }
    o
}

/// Observes `obs` and, like the daemon, evaluates at once when the engine asks for it.
fn observe_urgent(e: &mut Engine, obs: &[Observation]) -> Vec<Detection> {
    let mut out = Vec::new();
    for o in obs {
        e.observe(o);
        if e.take_urgent() {
            e.evaluate_floods(o.time(), &mut out);
        }
    }
    out
}

#[test]
fn a_udp_meter_report_is_a_flood_at_once() {
    // One flow, then the label update the meter's trip makes 200 ms later: held then, not
    // at the next counter read.
    let target = ip("198.51.100.99");
    let mut e = Engine::new(policy());
    let obs = [
        udp(0, BOT, target, 5555, 9999),
        labelled(
            flow(
                200,
                FlowEventKind::Update,
                BOT,
                target,
                proto::UDP,
                5555,
                9999,
                ct_status::CONFIRMED,
                None,
            ),
            &[Kind::Udp],
            false,
        ),
    ];
    let d = observe_urgent(&mut e, &obs);
    let f = of(&d, Category::Flood);
    assert_eq!(f.len(), 1, "{d:#?}");
    assert_eq!(f[0].time, Time(T0 + 200 * MS), "decided on the report");
    assert_eq!(crossed_value(f[0], "udp_pps"), 20_000.0);
    assert_eq!(f[0].evidence.pattern.as_deref(), Some("udp_flood"));
    assert_eq!(f[0].evidence.counts["kernel_meter"], 1.0);
    assert_eq!(f[0].evidence.top_destinations[0].key, target);
    assert_eq!(e.stats().meter_hints, 1);
    // Held down: the next report is no second detection.
    let again = labelled(
        flow(
            400,
            FlowEventKind::Update,
            BOT,
            target,
            proto::UDP,
            5556,
            9999,
            ct_status::CONFIRMED,
            None,
        ),
        &[Kind::Udp],
        false,
    );
    assert!(observe_urgent(&mut e, &[again]).is_empty());
}

#[test]
fn a_pps_meter_report_needs_unanswered_traffic() {
    // A backup stream: its flows answered. The packet meter trips, the rule does not.
    let target = ip("198.51.100.98");
    let mut e = Engine::new(policy());
    let mut obs = Vec::new();
    answered_tcp(&mut obs, 0, BOT, target, 40000, 873);
    obs.push(labelled(
        flow(
            300,
            FlowEventKind::Update,
            BOT,
            target,
            proto::TCP,
            40000,
            873,
            ct_status::SEEN_REPLY | ct_status::ASSURED,
            Some(TcpState::Established),
        ),
        &[Kind::Pps, Kind::Bps],
        false,
    ));
    assert!(observe_urgent(&mut e, &obs).is_empty());
    // The same report for a source whose flows go unanswered is a flood.
    let mut e = Engine::new(policy());
    let obs = [
        syn(0, BOT, target, 40001, 80),
        labelled(syn(300, BOT, target, 40002, 80), &[Kind::Pps], false),
    ];
    let d = observe_urgent(&mut e, &obs);
    assert_eq!(of(&d, Category::Flood).len(), 1, "{d:#?}");
    assert_eq!(crossed_value(&d[0], "pps"), 150_000.0);
}

#[test]
fn a_meter_below_the_profiles_threshold_confirms_nothing() {
    // The meter serves the lowest threshold (the `low` profile's); a source of the default
    // profile (30k) is judged by its own counters, not by a meter at 10k.
    let text = format!(
        "{}  low:\n    flood:\n      udp_pps: 10k\n",
        POLICY
            .replace(
                "profiles:\n",
                "profiles:\n  default:\n    flood:\n      udp_pps: 30k\n"
            )
            .replace("enforcement:\n  ipv6_block_prefix: 64\n", "")
    ) + "enforcement:\n  ipv6_block_prefix: 64\n";
    let p = policy_from(&text);
    assert_eq!(Meters::of_policy(&p).rate(Kind::Udp), Some(10_000));
    let target = ip("198.51.100.99");
    let mut e = Engine::new(p);
    let obs = [
        udp(0, BOT, target, 5555, 9999),
        labelled(udp(200, BOT, target, 5556, 9999), &[Kind::Udp], false),
    ];
    assert!(observe_urgent(&mut e, &obs).is_empty());
}

#[test]
fn a_syn_meter_report_needs_the_syns_unanswered_and_few_targets() {
    let target = ip("198.51.100.97");
    // Answered SYNs (a load test against one server): no flood.
    let mut e = Engine::new(policy());
    let mut obs = Vec::new();
    for i in 0..50u16 {
        answered_tcp(&mut obs, u64::from(i), BOT, target, 30000 + i, 443);
    }
    obs.push(labelled(
        syn(60, BOT, target, 31000, 443),
        &[Kind::Syn],
        false,
    ));
    assert!(observe_urgent(&mut e, &obs).is_empty());
    // Unanswered SYNs at one target: a SYN flood, decided on the report.
    let mut e = Engine::new(policy());
    let mut obs: Vec<Observation> = (0..50u16)
        .map(|i| syn(u64::from(i), BOT, target, 30000 + i, 80))
        .collect();
    obs.push(labelled(
        syn(60, BOT, target, 31000, 80),
        &[Kind::Syn, Kind::NewFlows],
        false,
    ));
    let d = observe_urgent(&mut e, &obs);
    let f = of(&d, Category::Flood);
    assert_eq!(f.len(), 1, "{d:#?}");
    assert_eq!(f[0].time, Time(T0 + 60 * MS));
    assert_eq!(crossed_value(f[0], "unreplied_syn_per_sec"), 500.0);
    assert_eq!(crossed_value(f[0], "new_flows_per_sec"), 2_000.0);
}

#[test]
fn a_fast_port_scan_is_a_scan_not_a_syn_flood() {
    // nmap -T4: 300 ports of one host in 150 ms, unanswered; the SYN and new-flow meters
    // trip, the scan rule reports it.
    let target = ip("198.51.100.21");
    let mut e = Engine::new(policy());
    let mut obs: Vec<Observation> = (0..300u16)
        .map(|p| syn(u64::from(p) / 2, BOT, target, 40000, p + 1))
        .collect();
    obs.push(labelled(
        syn(151, BOT, target, 40000, 301),
        &[Kind::Syn, Kind::NewFlows],
        false,
    ));
    let d = observe_urgent(&mut e, &obs);
    assert!(d.is_empty(), "{d:#?}");
    // The next evaluation reports the scan, whole.
    let mut d = Vec::new();
    e.evaluate(Time(T0 + 250 * MS), &mut d);
    assert!(of(&d, Category::Flood).is_empty(), "{d:#?}");
    assert_eq!(of(&d, Category::PortScan).len(), 1, "{d:#?}");
}

#[test]
fn a_fast_scans_early_meter_report_is_not_a_flood() {
    // nmap -sT -T4: the SYN meter trips after ~100 probes, before the port-scan rule's 100
    // distinct ports: the flows on distinct ports already say scan.
    let target = ip("198.51.100.21");
    let mut e = Engine::new(policy());
    let mut obs: Vec<Observation> = (0..60u16)
        .map(|p| syn(u64::from(p) / 2, BOT, target, 40000 + p, p + 1))
        .collect();
    obs.push(labelled(
        syn(31, BOT, target, 40100, 61),
        &[Kind::Syn, Kind::NewFlows],
        false,
    ));
    assert!(observe_urgent(&mut e, &obs).is_empty());
    // The same report on a SYN flood at one port is one.
    let mut e = Engine::new(policy());
    let mut obs: Vec<Observation> = (0..60u16)
        .map(|p| syn(u64::from(p) / 2, BOT, target, 40000 + p, 80))
        .collect();
    obs.push(labelled(
        syn(31, BOT, target, 40100, 80),
        &[Kind::Syn],
        false,
    ));
    let d = observe_urgent(&mut e, &obs);
    assert_eq!(of(&d, Category::Flood).len(), 1, "{d:#?}");
}

#[test]
fn a_meter_report_from_before_a_hold_is_not_a_second_offense() {
    // A scan decided; in the moments before its hold, its probes trip the new-flow meter.
    // The hold starts the source afresh: the report is the first offense's, not a flood.
    let target = ip("198.51.100.21");
    let mut e = Engine::new(policy());
    let obs = [labelled(
        udp(100, BOT, target, 5555, 9999),
        &[Kind::NewFlows],
        false,
    )];
    e.observe(&obs[0]);
    e.on_hold_change(&HoldChange::Held {
        target: "203.0.113.7/32".parse().unwrap(),
        since: Time(T0 + 120 * MS),
        kind: BlockKind::Quarantine,
    });
    assert!(e.take_urgent());
    let mut d = Vec::new();
    e.evaluate_floods(Time(T0 + 150 * MS), &mut d);
    e.evaluate(Time(T0 + 250 * MS), &mut d);
    assert!(d.is_empty(), "{d:#?}");
}

#[test]
fn a_dumps_labels_are_old_news() {
    // At start the dump lists a flow a meter labelled before the agent restarted.
    let target = ip("198.51.100.99");
    let mut e = Engine::new(policy());
    let mut old = labelled(udp(0, BOT, target, 5555, 9999), &[Kind::Udp], false);
    if let Observation::Flow(f) = &mut old {
        f.kind = FlowEventKind::Existing;
        f.status = ct_status::SEEN_REPLY;
    }
    assert!(observe_urgent(&mut e, &[old]).is_empty());
    assert_eq!(e.stats().meter_hints, 0);
}

#[test]
fn a_held_sources_meter_reports_are_not_new_evidence() {
    let target = ip("198.51.100.99");
    let mut e = Engine::new(policy());
    e.on_hold_change(&HoldChange::Held {
        target: "203.0.113.7/32".parse().unwrap(),
        since: Time(T0),
        kind: BlockKind::Quarantine,
    });
    let obs = [labelled(
        udp(100, BOT, target, 5555, 9999),
        &[Kind::Udp],
        false,
    )];
    assert!(observe_urgent(&mut e, &obs).is_empty());
    assert_eq!(e.stats().meter_hints, 0);
}

#[test]
fn sampled_flows_count_sixteen_times_in_the_flood_rates() {
    // 100 unanswered SYNs/s reported, each one in 16: 1600 SYNs/s, above 500 (and under the
    // 2000 new flows/s), from events
    // under the threshold themselves. Their answers count as many times: answered, no flood.
    let target = ip("198.51.100.96");
    let mut obs = Vec::new();
    for i in 0..1000u64 {
        obs.push(labelled(
            syn(i * 10, BOT, target, (i % 60_000) as u16, 80),
            &[],
            true,
        ));
    }
    let d = run(&obs);
    let f = of(&d, Category::Flood);
    assert_eq!(f.len(), 1, "{d:#?}");
    assert!(crossed_value(f[0], "unreplied_syn_per_sec") >= 500.0);
    assert_eq!(f[0].evidence.counts["sampled_one_in"], 16.0);
    let mut obs = Vec::new();
    for i in 0..1000u64 {
        let ms = i * 10;
        let port = (i % 60_000) as u16;
        obs.push(labelled(syn(ms, BOT, target, port, 443), &[], true));
        obs.push(synack(ms + 1, BOT, target, port, 443));
    }
    let d = run(&sorted(obs));
    assert!(of(&d, Category::Flood).is_empty(), "{d:#?}");
    // Without the label the same events are 100/s: no flood.
    let obs: Vec<Observation> = (0..1000u64)
        .map(|i| syn(i * 10, BOT, target, (i % 60_000) as u16, 80))
        .collect();
    assert!(of(&run(&obs), Category::Flood).is_empty());
}
