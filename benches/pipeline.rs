//! The observe parser and the detection engine together, on one core: the mixed stream of
//! `support/stream.rs` encoded as the ctnetlink datagrams the kernel would deliver (one event
//! per datagram, with the attributes a real event carries: both tuples, id, status, timeout,
//! protocol info, mark, use count), parsed, filtered by customer prefix, thinned of
//! state-only updates as the listener does, and fed to the engine, which evaluates every
//! 250 ms of event time. Counter samples go to the engine directly (they come from the nft
//! counter reader, not from conntrack). Target (issue #4): at least 1 million events per
//! second per core.
//!
//! `cargo bench --bench pipeline`; figures in docs/performance.md (## Detect).

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use egressguard::detect::Engine;
use egressguard::messages::{FlowEvent, FlowEventKind, Observation, TcpState, Time, proto};
use egressguard::observe::CustomerFilter;
use egressguard::observe::conntrack::update_has_signal;
use egressguard::observe::ctnetlink::parse_buffer;

#[path = "support/stream.rs"]
mod stream;
use stream::{Cadence, mixed_stream, policy};

const NLA_F_NESTED: u16 = 0x8000;

/// A netlink message under construction: attributes with host-order headers, network-order
/// payloads, each padded to 4 bytes.
struct Msg(Vec<u8>);

impl Msg {
    fn attr(&mut self, ty: u16, payload: &[u8]) {
        self.0
            .extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(payload);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn nested(&mut self, ty: u16, build: impl FnOnce(&mut Msg)) {
        let at = self.0.len();
        self.0.extend_from_slice(&[0; 4]);
        build(self);
        let len = (self.0.len() - at) as u16;
        self.0[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        self.0[at + 2..at + 4].copy_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }
}

fn tuple(m: &mut Msg, src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16) {
    m.nested(1 /* CTA_TUPLE_IP */, |m| match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            m.attr(1 /* CTA_IP_V4_SRC */, &s.octets());
            m.attr(2 /* CTA_IP_V4_DST */, &d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            m.attr(3 /* CTA_IP_V6_SRC */, &s.octets());
            m.attr(4 /* CTA_IP_V6_DST */, &d.octets());
        }
        _ => unreachable!("the stream never mixes families"),
    });
    m.nested(2 /* CTA_TUPLE_PROTO */, |m| {
        m.attr(1 /* CTA_PROTO_NUM */, &[proto]);
        m.attr(2 /* CTA_PROTO_SRC_PORT */, &sport.to_be_bytes());
        m.attr(3 /* CTA_PROTO_DST_PORT */, &dport.to_be_bytes());
    });
}

/// The kernel's number for a TCP state (the inverse of `TcpState::from_kernel`).
fn kernel_state(s: TcpState) -> u8 {
    (0..=255)
        .find(|&v| TcpState::from_kernel(v) == s)
        .expect("every state has a number")
}

/// The event as the kernel's `ctnetlink_conntrack_event` lays it out.
fn encode(e: &FlowEvent, id: u32) -> Vec<u8> {
    let (ty, flags): (u16, u16) = match e.kind {
        FlowEventKind::New => (0x0100, 0x0600), // IPCTNL_MSG_CT_NEW, NLM_F_CREATE|NLM_F_EXCL
        FlowEventKind::Update => (0x0100, 0),
        FlowEventKind::Destroy => (0x0102, 0), // IPCTNL_MSG_CT_DELETE
    };
    let family = if e.src.is_ipv4() { 2 } else { 10 };
    let mut m = Msg(vec![0; 16]);
    m.0.extend_from_slice(&[family, 0, 0, 0]);
    m.nested(
        1, /* CTA_TUPLE_ORIG */
        |m| tuple(m, e.src, e.dst, e.proto, e.sport, e.dport),
    );
    m.nested(
        2, /* CTA_TUPLE_REPLY */
        |m| tuple(m, e.dst, e.src, e.proto, e.dport, e.sport),
    );
    m.attr(12 /* CTA_ID */, &id.to_be_bytes());
    m.attr(3 /* CTA_STATUS */, &e.status.to_be_bytes());
    if e.kind != FlowEventKind::Destroy {
        m.attr(7 /* CTA_TIMEOUT */, &120u32.to_be_bytes());
    }
    if let Some(state) = e.tcp_state {
        m.nested(4 /* CTA_PROTOINFO */, |m| {
            m.nested(1 /* CTA_PROTOINFO_TCP */, |m| {
                m.attr(1 /* STATE */, &[kernel_state(state)]);
                m.attr(2 /* WSCALE_ORIGINAL */, &[7]);
                m.attr(3 /* WSCALE_REPLY */, &[7]);
                m.attr(4 /* FLAGS_ORIGINAL */, &[0x23, 0x23]);
                m.attr(5 /* FLAGS_REPLY */, &[0x33, 0x33]);
            })
        });
    }
    m.attr(8 /* CTA_MARK */, &0u32.to_be_bytes());
    m.attr(11 /* CTA_USE */, &1u32.to_be_bytes());
    let len = m.0.len() as u32;
    m.0[0..4].copy_from_slice(&len.to_ne_bytes());
    m.0[4..6].copy_from_slice(&ty.to_ne_bytes());
    m.0[6..8].copy_from_slice(&flags.to_ne_bytes());
    m.0
}

/// What the pipeline reads: datagrams (packed, with their event times) or counter samples.
enum Item {
    Datagram { at: usize, len: usize, time: Time },
    Counters(Observation),
}

struct Input {
    bytes: Vec<u8>,
    items: Vec<Item>,
}

fn input(n: usize) -> Input {
    let filter = filter();
    let mut bytes = Vec::new();
    let mut items = Vec::with_capacity(n);
    for (i, o) in mixed_stream(n).into_iter().enumerate() {
        match o {
            Observation::Flow(e) => {
                let m = encode(&e, i as u32);
                // The encoder is checked against the parser, which is checked against the
                // kernel's own messages (tests/fixtures/ctnetlink).
                let mut back = None;
                parse_buffer(&m, e.time, &filter, |p| back = Some(p), |_, _| {});
                match back {
                    Some(p) => assert!(
                        (
                            p.kind,
                            p.src,
                            p.dst,
                            p.proto,
                            p.sport,
                            p.dport,
                            p.status,
                            p.tcp_state
                        ) == (
                            e.kind,
                            e.src,
                            e.dst,
                            e.proto,
                            e.sport,
                            e.dport,
                            e.status,
                            e.tcp_state
                        ),
                        "encoder and parser disagree: {e:?} / {p:?}"
                    ),
                    None => assert!(!filter.contains(e.src), "customer event dropped: {e:?}"),
                }
                items.push(Item::Datagram {
                    at: bytes.len(),
                    len: m.len(),
                    time: e.time,
                });
                bytes.extend_from_slice(&m);
            }
            c => items.push(Item::Counters(c)),
        }
    }
    Input { bytes, items }
}

fn filter() -> CustomerFilter {
    CustomerFilter::new(["100.64.0.0/16".parse().expect("prefix")])
}

/// Runs the whole input through parser and engine; returns the detections raised.
fn run(engine: &mut Engine, input: &Input, filter: &CustomerFilter) -> usize {
    let mut out = Vec::with_capacity(64);
    let first = match input.items.first() {
        Some(Item::Datagram { time, .. }) => time.as_nanos(),
        Some(Item::Counters(c)) => c.time().as_nanos(),
        None => return 0,
    };
    let mut cadence = Cadence::starting(first);
    for item in &input.items {
        match item {
            Item::Datagram { at, len, time } => {
                if let Some(t) = cadence.due(time.as_nanos()) {
                    engine.evaluate(t, &mut out);
                }
                parse_buffer(
                    black_box(&input.bytes[*at..*at + *len]),
                    *time,
                    filter,
                    |e| {
                        if e.kind != FlowEventKind::Update || update_has_signal(&e) {
                            engine.observe(&Observation::Flow(e));
                        }
                    },
                    |_, _| {},
                );
            }
            Item::Counters(c) => engine.observe(c),
        }
    }
    out.len()
}

fn bench(c: &mut Criterion) {
    let n = 1_000_000;
    let input = input(n);
    let filter = filter();
    let udp = input
        .items
        .iter()
        .filter(|i| matches!(i, Item::Datagram { .. }))
        .count();
    eprintln!(
        "pipeline input: {n} events, {udp} conntrack datagrams, {} bytes (proto {} = TCP)",
        input.bytes.len(),
        proto::TCP
    );

    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(n as u64));
    g.sample_size(20);
    g.bench_function("parse_filter_detect_1M_events", |b| {
        b.iter_batched_ref(
            || Engine::new(policy(262_144)),
            |engine| black_box(run(engine, &input, &filter)),
            BatchSize::LargeInput,
        )
    });
    g.finish();

    // Not timed: the attackers are found through the parser as well.
    let mut e = Engine::new(policy(262_144));
    let raised = run(&mut e, &input, &filter);
    eprintln!("pipeline detections: {raised}; stats: {:?}", e.stats());
    assert!(raised >= 5, "the five attackers must be detected");
}

criterion_group!(benches, bench);
criterion_main!(benches);
