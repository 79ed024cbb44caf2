//! Detection engine throughput on a realistic mixed stream, and under a spoofed-source flood.
//!
//! `cargo bench --bench detect`; figures in docs/performance.md (## Detect).
//!
//! The mixed stream: 4096 customer hosts behind a router doing ordinary things (answered
//! HTTPS, DNS lookups, state changes and destroys of established flows), inbound connections
//! from the internet (the customer is the reply side: ignored by source; 30% of events),
//! counter samples every 250 ms per host (1.6% of events), and five attackers (SYN flood,
//! port scan, network scan, brute force, spam; 10% of events). Events are 1 µs apart (1M events per second of
//! event time); `evaluate` runs every 250 ms of event time, as in the daemon.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use egressguard::detect::Engine;
use egressguard::messages::{
    CounterSample, Detection, FlowEvent, FlowEventKind, Observation, TcpState, Time, ct_status,
    proto,
};
use egressguard::policy::Policy;

const T0: u64 = 1_800_000_000 * 1_000_000_000;

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

fn customer(i: u64) -> IpAddr {
    // 100.64.0.0/16, the bench policy's customer network
    IpAddr::V4(Ipv4Addr::from(0x6440_0000u32 | (i as u32 & 0xffff)))
}

fn internet(i: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 | (i as u32 & 0x00ff_ffff)))
}

struct Ev {
    kind: FlowEventKind,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
    status: u32,
    state: Option<TcpState>,
}

fn ev(t: u64, e: Ev) -> Observation {
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
    })
}

fn syn(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Ev {
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

fn mixed_stream(n: usize) -> Vec<Observation> {
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

fn spoofed_stream(n: usize) -> Vec<Observation> {
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

fn policy(max_sources: u32) -> Arc<Policy> {
    let text = format!(
        "version: 1\nnetworks:\n  - prefix: 100.64.0.0/16\ndetection:\n  max_sources: {max_sources}\n"
    );
    Arc::new(Policy::from_text(&text, Path::new("<bench>")).expect("bench policy"))
}

/// Feeds the stream, evaluating every 250 ms of event time.
fn replay(engine: &mut Engine, stream: &[Observation], out: &mut Vec<Detection>) {
    let interval = 250_000_000;
    let first = stream.first().map_or(T0, |o| o.time().as_nanos());
    let mut next = first - first % interval + interval;
    for o in stream {
        let t = o.time().as_nanos();
        if t >= next {
            engine.evaluate(Time(next), out);
            next += interval;
        }
        engine.observe(black_box(o));
    }
}

fn shifted(stream: &[Observation], shift: u64) -> Vec<Observation> {
    stream
        .iter()
        .map(|o| {
            let mut o = o.clone();
            match &mut o {
                Observation::Flow(e) => e.time = Time(e.time.as_nanos() + shift),
                Observation::Counters(c) => c.time = Time(c.time.as_nanos() + shift),
                Observation::Tick { time } | Observation::Lost { time } => {
                    *time = Time(time.as_nanos() + shift)
                }
            }
            o
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let n = 1_000_000;
    let mixed = mixed_stream(n);
    let later = shifted(&mixed, 2_000_000_000);
    let spoofed = spoofed_stream(n);

    let mut g = c.benchmark_group("detect");
    g.throughput(Throughput::Elements(n as u64));
    g.sample_size(20);
    g.bench_function("mixed_stream_1M_events_cold", |b| {
        b.iter_batched_ref(
            || (Engine::new(policy(262_144)), Vec::with_capacity(64)),
            |(engine, out)| replay(engine, &mixed, out),
            BatchSize::LargeInput,
        )
    });
    // Warm engine: the same traffic again two seconds later, tables already grown.
    g.bench_function("mixed_stream_1M_events_warm", |b| {
        b.iter_batched_ref(
            || {
                let mut e = Engine::new(policy(262_144));
                let mut out = Vec::with_capacity(64);
                replay(&mut e, &mixed, &mut out);
                (e, out)
            },
            |(engine, out)| replay(engine, &later, out),
            BatchSize::LargeInput,
        )
    });
    g.bench_function("spoofed_sources_1M_events_cap_65536", |b| {
        b.iter_batched_ref(
            || (Engine::new(policy(65_536)), Vec::with_capacity(64)),
            |(engine, out)| replay(engine, &spoofed, out),
            BatchSize::LargeInput,
        )
    });
    g.finish();

    // Not timed: what the mixed stream raises (the five attackers, nothing else).
    let mut e = Engine::new(policy(262_144));
    let mut out = Vec::new();
    replay(&mut e, &mixed, &mut out);
    replay(&mut e, &later, &mut out);
    let mut found: Vec<_> = out
        .iter()
        .map(|d| (d.source.to_string(), d.category))
        .collect();
    found.sort();
    found.dedup();
    eprintln!("mixed stream detections: {found:?}");
    eprintln!("stats: {:?}", e.stats());
}

criterion_group!(benches, bench);
criterion_main!(benches);
