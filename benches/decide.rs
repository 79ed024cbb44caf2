//! Decisions committed per second: one detection → one offense + hold + audit entry, written
//! to the SQLite store in one transaction (WAL, synchronous=FULL, so one fsync per batch), on
//! disk; the same in batches of 64 detections; and the decision logic alone against an
//! in-memory database.
//!
//! Run: `cargo bench --bench decide`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use egressguard::decide::{Decider, InfraSet};
use egressguard::messages::{Category, Counted, Crossed, Detection, Evidence, Time};
use egressguard::policy::Policy;
use egressguard::state::Store;
use ipnet::IpNet;

const POLICY: &str = r#"version: 1
mode: enforce
networks:
  - prefix: 100.64.0.0/10
circuit_breaker:
  max_new_blocks_per_minute: 4000000000
  max_blocks_per_network: 4000000000
"#;

const T0: u64 = 1_795_564_800;

fn detection(n: u64) -> Detection {
    let time = Time::from_secs(T0 + n);
    let addr: IpNet = format!(
        "100.{}.{}.{}/32",
        64 + (n >> 16) % 64,
        (n >> 8) & 255,
        n & 255
    )
    .parse()
    .unwrap();
    Detection {
        time,
        source: addr,
        category: Category::PortScan,
        profile: "default".into(),
        evidence: Evidence {
            window_start: Time::from_secs(T0 + n - 60),
            window_end: time,
            crossed: vec![Crossed {
                signal: "distinct_ports".into(),
                value: 150.0,
                threshold: 100.0,
            }],
            counts: BTreeMap::from([("flows".to_owned(), 300.0)]),
            top_destinations: (0..10)
                .map(|i| Counted {
                    key: format!("192.0.2.{i}").parse().unwrap(),
                    count: 30,
                })
                .collect(),
            top_ports: (0..10)
                .map(|i| Counted {
                    key: 1000 + i,
                    count: 30,
                })
                .collect(),
            first_seen: Time::from_secs(T0 + n - 60),
            last_seen: time,
            sample: Vec::new(),
            spoofing: None,
            pattern: None,
        },
    }
}

fn decider(store: Store) -> Decider {
    let policy = Arc::new(Policy::from_text(POLICY, Path::new("bench.yaml")).unwrap());
    Decider::new(policy, store, InfraSet::default(), Time::from_secs(T0)).unwrap()
}

/// Feeds detections of new addresses, one second apart; quarantines last 1 h, so about
/// 3,600 holds are live at any time, as on a busy router.
fn run(c: &mut Criterion, name: &str, mut d: Decider, batch: u64) {
    let mut n = 100u64;
    let mut group = c.benchmark_group("decide");
    group.throughput(Throughput::Elements(batch));
    group.sample_size(20);
    group.bench_function(name, |b| {
        b.iter(|| {
            let ds: Vec<Detection> = (0..batch).map(|i| detection(n + i)).collect();
            n += batch;
            let out = d.on_detections(&ds).unwrap();
            assert_eq!(out.len() as u64, batch);
            if n % 256 < batch {
                d.on_tick(Time::from_secs(T0 + n)).unwrap();
            }
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    // On disk, not tmpfs, so the fsync is real.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let disk = |name: &str| Store::open(&dir.path().join(name)).unwrap();
    run(
        c,
        "commit_one_detection_on_disk",
        decider(disk("one.db")),
        1,
    );
    run(
        c,
        "commit_64_detections_on_disk",
        decider(disk("batch.db")),
        64,
    );
    run(
        c,
        "decide_one_detection_in_memory",
        decider(Store::open_in_memory().unwrap()),
        1,
    );
}

criterion_group!(decide, benches);
criterion_main!(decide);
