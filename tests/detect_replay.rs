//! Recorded observation streams (`tests/streams/*.jsonl`, one `Observation` per line)
//! replayed through the detection engine, asserting the exact detections.
//!
//! Replay semantics: every observation is fed to `Engine::observe` in file order; a `tick`
//! is also an evaluation instant (`Engine::evaluate(tick.time)`), as the daemon's timer
//! would be.

use std::path::Path;
use std::sync::Arc;

use egressguard::detect::Engine;
use egressguard::messages::{Category, Detection, Observation};
use egressguard::policy::Policy;

fn replay(stream: &str) -> (Engine, Vec<Detection>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/streams");
    let policy = Policy::load(&dir.join("policy.yaml")).expect("replay policy is valid");
    let mut engine = Engine::new(Arc::new(policy));
    let text = std::fs::read_to_string(dir.join(stream)).expect("stream file");
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let obs: Observation =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{stream}:{}: {e}", n + 1));
        engine.observe(&obs);
        if let Observation::Tick { time } = obs {
            engine.evaluate(time, &mut out);
        }
    }
    (engine, out)
}

/// (seconds after the stream's start, source, category, signals crossed)
type Expected = (f64, &'static str, Category, &'static [&'static str]);

#[test]
fn mixed_stream_gives_exactly_the_expected_detections() {
    let (engine, got) = replay("mixed.jsonl");
    let t0 = 1_800_000_000u64 * 1_000_000_000;
    let summary: Vec<(f64, String, Category, Vec<String>)> = got
        .iter()
        .map(|d| {
            (
                (d.time.as_nanos() - t0) as f64 / 1e9,
                d.source.to_string(),
                d.category,
                d.evidence
                    .crossed
                    .iter()
                    .map(|c| c.signal.clone())
                    .collect(),
            )
        })
        .collect();
    // The resolver, the web server and the mail relay in the same stream raise nothing.
    let expected: &[Expected] = &[
        (
            10.75,
            "203.0.113.8/32",
            Category::PortScan,
            &["distinct_ports", "unanswered_ratio"],
        ),
        (
            20.25,
            "203.0.113.9/32",
            Category::Spam,
            &["distinct_destinations"],
        ),
        (
            23.75,
            "2001:db8:1:5::/64",
            Category::NetworkScan,
            &["distinct_destinations", "unanswered_ratio"],
        ),
        (29.25, "203.0.113.7/32", Category::BruteForce, &["attempts"]),
    ];
    let want: Vec<(f64, String, Category, Vec<String>)> = expected
        .iter()
        .map(|(t, s, c, x)| {
            (
                *t,
                s.to_string(),
                *c,
                x.iter().map(|s| s.to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(summary, want);

    // Evidence of the brute force: the target, the port, the attempts, answered samples.
    let bf = &got[3].evidence;
    assert_eq!(bf.top_destinations[0].key.to_string(), "198.51.100.22");
    assert_eq!(bf.top_destinations[0].count, 30);
    assert_eq!(bf.top_ports[0].key, 22);
    assert_eq!(bf.crossed[0].value, 30.0);
    assert!(bf.sample.iter().all(|s| s.dport == 22 && s.answered));
    // Of the port scan: the scanned host first, 3 open ports of 100+ accepted.
    let ps = &got[0].evidence;
    assert_eq!(ps.top_destinations[0].key.to_string(), "198.51.100.33");
    assert!(ps.counts["accepted_by_target"] <= 3.0);

    let stats = engine.stats();
    assert_eq!(stats.events, 4_721);
    assert_eq!(stats.tracked_sources, 7);
    assert_eq!(stats.evictions, 0);
    assert_eq!(stats.detections_by_category.values().sum::<u64>(), 4);
}
