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

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use egressguard::detect::Engine;
use egressguard::messages::{FlowEventKind, Observation, Time, proto};
use egressguard::observe::CustomerFilter;
use egressguard::observe::conntrack::update_has_signal;
use egressguard::observe::ctnetlink::parse_buffer;

#[path = "support/stream.rs"]
mod stream;
use stream::{Cadence, mixed_stream, policy};

#[path = "support/ctmsg.rs"]
mod ctmsg;
use ctmsg::encode;

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
                let m = encode(&e, i as u32, 120);
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
