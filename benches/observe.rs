//! Throughput of the conntrack hot path: parse + customer filter on a realistic mix of
//! ctnetlink messages captured from the kernel (tests/fixtures/ctnetlink/), one message per
//! datagram as the kernel delivers events.
//!
//! Run: `cargo bench --bench observe`. Figures in docs/performance.md (## Observe).

use std::hint::black_box;
use std::net::{Ipv4Addr, Ipv6Addr};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use egressguard::messages::Time;
use egressguard::observe::CustomerFilter;
use egressguard::observe::ctnetlink::{messages, parse_buffer};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Every event message of the fixtures, each as its own datagram: TCP life cycles (new,
/// updates, destroy), UDP and ICMP flows of customers, and inbound (foreign) flows; v4 and v6.
fn event_mix() -> Vec<Vec<u8>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ctnetlink");
    let mut out = Vec::new();
    for name in [
        "tcp4", "tcp6", "udp4", "udp6", "icmp4", "icmp6", "inbound4", "inbound6",
    ] {
        let b = std::fs::read(format!("{dir}/{name}.bin")).expect("fixture");
        let mut rest = &b[..];
        for m in messages(&b) {
            let m = m.expect("fixture parses");
            let len = 16 + m.payload.len();
            out.push(rest[..len].to_vec());
            rest = &rest[(len + 3) & !3..];
        }
    }
    out
}

fn small_filter() -> CustomerFilter {
    CustomerFilter::new([
        "203.0.113.0/24".parse().unwrap(),
        "2001:db8:c::/64".parse().unwrap(),
    ])
}

/// A provider with 1000 customer prefixes per family (the test prefixes among them).
fn large_filter() -> CustomerFilter {
    let mut nets: Vec<IpNet> = Vec::new();
    for i in 0..1000u32 {
        let v4 = Ipv4Addr::from(0x0a00_0000u32 + (i << 10));
        nets.push(Ipv4Net::new(v4, 22).unwrap().into());
        let v6 =
            Ipv6Addr::from(0x2001_0db8_1000_0000_0000_0000_0000_0000u128 + (u128::from(i) << 80));
        nets.push(Ipv6Net::new(v6, 48).unwrap().into());
    }
    nets.push("203.0.113.0/24".parse().unwrap());
    nets.push("2001:db8:c::/64".parse().unwrap());
    CustomerFilter::new(nets)
}

fn bench_parse(c: &mut Criterion) {
    let mix = event_mix();
    let mut g = c.benchmark_group("ctnetlink");
    g.throughput(Throughput::Elements(mix.len() as u64));
    for (name, filter) in [
        ("small_filter", small_filter()),
        ("1000_prefixes", large_filter()),
    ] {
        g.bench_function(format!("parse_filter_mix/{name}"), |b| {
            b.iter(|| {
                let mut kept = 0u64;
                for m in &mix {
                    let c = parse_buffer(
                        black_box(m),
                        Time(1),
                        &filter,
                        |e| {
                            black_box(e);
                        },
                        |_, _| {},
                    );
                    kept += c.kept;
                }
                black_box(kept)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_parse);
criterion_main!(benches);
