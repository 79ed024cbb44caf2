//! Enforcement benchmarks against the real kernel, inside a private network namespace
//! (root only; skipped otherwise):
//!
//! * `nft_add_10k`: one transaction adding 10,000 timed addresses to `blocked4` (building the
//!   JSON with the `nftables` schema types, serialising it, running `nft -j -f -`);
//! * `netlink_encode_10k`: encoding 10,000 timed adds as one nfnetlink batch (no I/O);
//! * `netlink_add_10k` / `netlink_delete_10k`: the fast path, 10,000 adds or deletes of
//!   `blocked4` as one nfnetlink batch (encode, one `sendmsg` in which the kernel commits,
//!   read the acknowledgements);
//! * `enforcer_apply_10k`: `Enforcer::apply` of 10,000 desired blocks end to end (read the
//!   table back, diff, one element batch, read back to verify);
//! * `reconcile_idle_10k` / `reconcile_idle_empty`: one reconcile tick when nothing drifted.
//!
//! Addresses are from 198.18.0.0/15 (RFC 2544, benchmarking); no packet is sent.
//!
//! Run: `cargo bench --bench enforce` as root.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use egressguard::enforce::Enforcer;
use egressguard::enforce::layout::{ElemKey, Fam, Role, SetId, Structure, TableSpec, Tx};
use egressguard::enforce::nft::Nft;
use egressguard::enforce::nlbatch::{Batch, NlBatch, Op, Verb};
use egressguard::messages::{BlockKind, DesiredBlock, DesiredBlocks, Time};
use egressguard::netns::Netns;
use egressguard::policy::Policy;
use ipnet::IpNet;

const N: u32 = 10_000;

fn addrs() -> Vec<IpNet> {
    (0..N)
        .map(|i| {
            let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i);
            IpNet::from(IpAddr::V4(a))
        })
        .collect()
}

fn nft(args: &[&str]) {
    let ok = Command::new("nft")
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "nft {args:?} failed");
}

fn desired(generation: u64, nets: &[IpNet]) -> Arc<DesiredBlocks> {
    let expires = Some(Time::now().saturating_add(Duration::from_secs(3600)));
    let blocks: BTreeMap<IpNet, DesiredBlock> = nets
        .iter()
        .map(|n| {
            (
                *n,
                DesiredBlock {
                    target: *n,
                    kind: BlockKind::Block,
                    expires,
                    announce: vec![],
                    flowspec: None,
                    except: vec![],
                },
            )
        })
        .collect();
    Arc::new(DesiredBlocks {
        generation,
        blocks,
        ..DesiredBlocks::default()
    })
}

fn benches(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let nets = addrs();
    let spec = TableSpec {
        table: "egbench".into(),
        counter_set_size: 65536,
        meters: Default::default(),
    };
    let runner = Nft::new("nft");
    let mut tx = Tx::new();
    tx.structure(&spec, &Structure::fresh());
    rt.block_on(runner.apply(&tx)).expect("structure");

    c.bench_function("nft_add_10k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                nft(&["flush", "set", "inet", "egbench", "blocked4"]);
                let start = Instant::now();
                let mut tx = Tx::new();
                let elems: Vec<(ElemKey, Option<u64>)> = nets
                    .iter()
                    .map(|n| (ElemKey::Net(*n), Some(3600)))
                    .collect();
                tx.add_elements(&spec, SetId::new(Role::Blocked, Fam::V4), &elems);
                rt.block_on(runner.apply(&tx)).expect("add 10k");
                total += start.elapsed();
            }
            total
        })
    });
    let b4 = SetId::new(Role::Blocked, Fam::V4);
    let ops = |verb: Verb| -> Vec<Op> {
        nets.iter()
            .map(|n| Op {
                set: b4,
                key: ElemKey::Net(*n),
                verb,
                timeout_secs: (verb == Verb::Add).then_some(3600),
            })
            .collect()
    };
    let (adds, dels) = (ops(Verb::Add), ops(Verb::Delete));
    c.bench_function("netlink_encode_10k", |b| {
        b.iter(|| Batch::encode("egbench", &adds, 1, Some(1)).expect("encode"))
    });
    let mut fast = NlBatch::open().expect("nfnetlink socket");
    nft(&["flush", "set", "inet", "egbench", "blocked4"]);
    c.bench_function("netlink_add_10k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                fast.apply("egbench", &adds, None).expect("add 10k");
                total += start.elapsed();
                fast.apply("egbench", &dels, None).expect("clear");
            }
            total
        })
    });
    c.bench_function("netlink_delete_10k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                fast.apply("egbench", &adds, None).expect("fill");
                let start = Instant::now();
                fast.apply("egbench", &dels, None).expect("delete 10k");
                total += start.elapsed();
            }
            total
        })
    });
    nft(&["delete", "table", "inet", "egbench"]);

    let policy = Arc::new(
        Policy::from_text(
            "version: 1\nmode: enforce\nnetworks:\n  - prefix: 198.18.0.0/15\nenforcement:\n  table: egbench2\n",
            Path::new("<bench>"),
        )
        .expect("policy"),
    );
    let mut enforcer = rt.block_on(Enforcer::init(policy)).expect("init");
    let mut generation = 0;
    c.bench_function("reconcile_idle_empty", |b| {
        b.iter(|| rt.block_on(enforcer.reconcile()).expect("reconcile"))
    });
    c.bench_function("enforcer_apply_10k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                generation += 1;
                let d = desired(generation, &nets);
                let start = Instant::now();
                rt.block_on(enforcer.apply(d)).expect("apply 10k");
                total += start.elapsed();
                generation += 1;
                rt.block_on(enforcer.apply(desired(generation, &[])))
                    .expect("clear");
            }
            total
        })
    });
    generation += 1;
    rt.block_on(enforcer.apply(desired(generation, &nets)))
        .expect("apply 10k");
    c.bench_function("reconcile_idle_10k", |b| {
        b.iter(|| rt.block_on(enforcer.reconcile()).expect("reconcile"))
    });
    nft(&["delete", "table", "inet", "egbench2"]);
}

fn main() {
    if !egressguard::netns::is_root() {
        eprintln!("SKIPPED enforce benchmarks: they need root (a network namespace, nftables)");
        return;
    }
    let ns = Netns::new("bench").expect("namespace");
    ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut c = Criterion::default()
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5))
            .configure_from_args();
        benches(&mut c, &rt);
        c.final_summary();
    })
    .expect("enter namespace");
}
