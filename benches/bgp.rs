//! BGP speaker CPU costs: computing a peer's routes from 10,000 desired blocks, encoding them
//! as UPDATEs, and decoding a full flowspec UPDATE from a peer.
//!
//! `cargo bench --bench bgp`

use std::collections::BTreeSet;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use egressguard::bgp::flowspec::{Afi, block_nlri, traffic_rate};
use egressguard::bgp::routes::desired_routes;
use egressguard::bgp::wire::{self, PathCtx};
use egressguard::messages::{Announce, BlockKind, DesiredBlock, DesiredBlocks, FlowspecScope};
use egressguard::policy::{Family, Policy};
use ipnet::IpNet;

fn blocks(n: u32) -> DesiredBlocks {
    let mut b = DesiredBlocks::default();
    for i in 0..n {
        let t = IpNet::from(IpAddr::V4(Ipv4Addr::from(0xc612_0000u32 + i)));
        b.blocks.insert(
            t,
            DesiredBlock {
                target: t,
                kind: BlockKind::Block,
                expires: None,
                announce: vec![Announce::Flowspec, Announce::Rtbh],
                flowspec: Some(FlowspecScope {
                    proto: Some(6),
                    dports: vec![25, 587],
                    rate_bytes_per_sec: 0,
                }),
                except: vec![],
            },
        );
    }
    b
}

fn bench(c: &mut Criterion) {
    let text = "version: 1\nnetworks:\n  - prefix: 198.18.0.0/15\nbgp:\n  local_as: 65001\n  router_id: 192.0.2.1\n  peers:\n    - address: 192.0.2.2\n      remote_as: 65002\n      announce: [flowspec, rtbh]\n      families: [ipv4-flowspec, ipv4-unicast]\n      rtbh_next_hop_v4: 192.0.2.66\n";
    let peer = Policy::from_text(text, Path::new("<bench>"))
        .expect("policy")
        .bgp
        .expect("bgp")
        .peers
        .remove(0);
    let fams: BTreeSet<Family> = peer.families.iter().copied().collect();
    let b = blocks(10_000);
    c.bench_function("bgp/desired_routes_10k_blocks", |bn| {
        bn.iter(|| desired_routes(black_box(&peer), &fams, black_box(&b)))
    });

    let ctx = PathCtx {
        local_as: 65001,
        ibgp: false,
        four_octet: true,
    };
    let nlris: Vec<Vec<u8>> = b
        .blocks
        .keys()
        .map(|t| block_nlri(t, Some(6), &[25, 587]).encode().expect("nlri"))
        .collect();
    c.bench_function("bgp/flow_announce_10k_rules", |bn| {
        bn.iter(|| {
            wire::flow_announce(
                &ctx,
                Afi::Ipv4,
                traffic_rate(0, 0.0),
                &[],
                black_box(&nlris),
            )
        })
    });

    let full = wire::flow_announce(&ctx, Afi::Ipv4, traffic_rate(0, 0.0), &[], &nlris[..1000])
        .expect("updates")
        .remove(0);
    c.bench_function("bgp/decode_full_flowspec_update", |bn| {
        bn.iter(|| wire::decode_update(black_box(&full), true))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
