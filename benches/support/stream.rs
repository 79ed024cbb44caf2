//! The synthetic traffic the detect and pipeline benchmarks share: a realistic mixed stream
//! of 4096 customer hosts behind a router doing ordinary things (answered HTTPS, DNS lookups,
//! state changes and destroys of established flows), inbound connections from the internet
//! (the customer is the reply side: ignored by source; 30% of events), counter samples every
//! 250 ms per host (1.6% of events), and five attackers (SYN flood, port scan, network scan,
//! brute force, spam; 10% of events). Events are 1 µs apart (1M events per second of event
//! time). Also a spoofed-source flood, and the bench policy.

#![allow(dead_code)] // each bench uses part of it

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;

use egressguard::messages::{
    CounterSample, FlowEvent, FlowEventKind, Observation, TcpState, Time, ct_status, proto,
};
use egressguard::policy::Policy;

pub const T0: u64 = 1_800_000_000 * 1_000_000_000;

pub struct Lcg(u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

pub fn customer(i: u64) -> IpAddr {
    // 100.64.0.0/16, the bench policy's customer network
    IpAddr::V4(Ipv4Addr::from(0x6440_0000u32 | (i as u32 & 0xffff)))
}

pub fn internet(i: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 | (i as u32 & 0x00ff_ffff)))
}

pub struct Ev {
    pub kind: FlowEventKind,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub status: u32,
    pub state: Option<TcpState>,
}

pub fn ev(t: u64, e: Ev) -> Observation {
    Observation::Flow(FlowEvent {
        time: Time(t),
        kind: e.kind,
        src: e.src,
        dst: e.dst,
        proto: e.proto,
        sport: e.sport,
        dport: e.dport,
        icmp: None,
        status: e.status,
        tcp_state: e.state,
        orig_packets: None,
        orig_bytes: None,
        reply_packets: None,
        reply_bytes: None,
        start: None,
        stop: None,
        labels: 0,
    })
}

pub fn syn(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Ev {
    Ev {
        kind: FlowEventKind::New,
        src,
        dst,
        proto: proto::TCP,
        sport,
        dport,
        status: 0,
        state: Some(TcpState::SynSent),
    }
}

pub fn mixed_stream(n: usize) -> Vec<Observation> {
    let mut r = Lcg(42);
    let mut out = Vec::with_capacity(n);
    let mut t = T0;
    let hosts = 4096;
    let mut next_counter = T0 + 250_000_000;
    let mut i = 0u64;
    while out.len() < n {
        t += 1_000; // 1 µs
        i += 1;
        if t >= next_counter {
            for h in 0..hosts {
                out.push(Observation::Counters(CounterSample {
                    time: Time(t),
                    addr: customer(h),
                    packets: 1_000 + r.next() % 5_000,
                    bytes: 1_000_000 + r.next() % 5_000_000,
                    interval_ns: 250_000_000,
                    udp_packets: 0,
                    echo_packets: 0,
                }));
            }
            next_counter += 250_000_000;
            continue;
        }
        let roll = r.next() % 100;
        let h = customer(r.next() % hosts);
        let sport = (1024 + r.next() % 60_000) as u16;
        let e = match roll {
            // inbound: an internet client connects to a customer server
            0..=29 => syn(internet(r.next()), h, sport, 443),
            // outbound HTTPS: new, or answered
            30..=59 => {
                let mut e = syn(h, internet(r.next() % 50_000), sport, 443);
                if roll % 2 == 1 {
                    e.kind = FlowEventKind::Update;
                    e.status = ct_status::SEEN_REPLY;
                    e.state = Some(TcpState::SynRecv);
                }
                e
            }
            // DNS to a few resolvers: new, or answered
            60..=79 => Ev {
                kind: if roll.is_multiple_of(2) {
                    FlowEventKind::New
                } else {
                    FlowEventKind::Update
                },
                src: h,
                dst: internet(r.next() % 4),
                proto: proto::UDP,
                sport,
                dport: 53,
                status: if roll.is_multiple_of(2) {
                    0
                } else {
                    ct_status::SEEN_REPLY
                },
                state: None,
            },
            // established flows closing, destroys
            80..=89 => Ev {
                kind: if roll.is_multiple_of(2) {
                    FlowEventKind::Update
                } else {
                    FlowEventKind::Destroy
                },
                src: h,
                dst: internet(r.next() % 50_000),
                proto: proto::TCP,
                sport,
                dport: 443,
                status: ct_status::SEEN_REPLY | ct_status::ASSURED,
                state: Some(TcpState::TimeWait),
            },
            // attackers
            _ => {
                let a = roll - 90;
                let src = customer(60_000 + a / 2);
                match a / 2 {
                    0 => syn(src, internet(7), sport, 80),
                    1 => syn(src, internet(8), 60_000, (i % 65_535) as u16 + 1),
                    2 => syn(src, internet(r.next()), sport, 23),
                    3 => syn(src, internet(9), sport, 22),
                    _ => syn(src, internet(r.next()), sport, 25),
                }
            }
        };
        out.push(ev(t, e));
    }
    out.truncate(n);
    out
}

pub fn spoofed_stream(n: usize) -> Vec<Observation> {
    (0..n as u64)
        .map(|i| {
            let mut e = syn(
                customer(i.wrapping_mul(2_654_435_761)),
                internet(7),
                1234,
                53,
            );
            e.proto = proto::UDP;
            e.state = None;
            ev(T0 + i * 1_000, e)
        })
        .collect()
}

pub fn policy(max_sources: u32) -> Arc<Policy> {
    let text = format!(
        "version: 1\nnetworks:\n  - prefix: 100.64.0.0/16\ndetection:\n  max_sources: {max_sources}\n"
    );
    Arc::new(Policy::from_text(&text, Path::new("<bench>")).expect("bench policy"))
}

/// When `evaluate` is due: every 250 ms of event time, on the boundaries, as in the daemon.
pub struct Cadence {
    next: u64,
}

impl Cadence {
    /// The evaluation interval (the policy default).
    pub const INTERVAL: u64 = 250_000_000;

    /// The first evaluation is at the boundary after `first` (nanoseconds).
    pub fn starting(first: u64) -> Cadence {
        Cadence {
            next: first - first % Self::INTERVAL + Self::INTERVAL,
        }
    }

    /// The evaluation time if one is due before an event at `t`.
    pub fn due(&mut self, t: u64) -> Option<Time> {
        if t < self.next {
            return None;
        }
        let at = Time(self.next);
        self.next += Self::INTERVAL;
        Some(at)
    }
}
