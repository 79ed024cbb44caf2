//! Detection engine throughput on a realistic mixed stream, and under a spoofed-source flood.
//!
//! `cargo bench --bench detect`; figures in docs/performance.md (## Detect). The streams are
//! described in `support/stream.rs`; `evaluate` runs every 250 ms of event time, as in the
//! daemon.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use egressguard::detect::Engine;
use egressguard::messages::{Detection, Observation, Time};

#[path = "support/stream.rs"]
mod stream;
use stream::{Cadence, T0, mixed_stream, policy, spoofed_stream};

/// Feeds the stream, evaluating every 250 ms of event time.
fn replay(engine: &mut Engine, stream: &[Observation], out: &mut Vec<Detection>) {
    let mut cadence = Cadence::starting(stream.first().map_or(T0, |o| o.time().as_nanos()));
    for o in stream {
        if let Some(at) = cadence.due(o.time().as_nanos()) {
            engine.evaluate(at, out);
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
                Observation::Tick { time }
                | Observation::Lost { time }
                | Observation::Resynced { time, .. } => *time = Time(time.as_nanos() + shift),
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
