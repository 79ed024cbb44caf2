//! The hook gets the documented JSON on stdin; a hanging hook is killed at the timeout; a
//! failing one is retried; reports are written.

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::messages::{BlockKind, Category, Cause, Counted, Crossed, Decision, Evidence, Time};

fn notification() -> Notification {
    Notification {
        schema: SCHEMA.into(),
        router: "edge1".into(),
        policy_version: "abc".into(),
        decision: Decision {
            time: Time::from_secs(1_790_000_000),
            target: "203.0.113.7/32".parse().unwrap(),
            kind: Some(BlockKind::Quarantine),
            expires: Some(Time::from_secs(1_790_003_600)),
            offense: 1,
            cause: Cause::Detection {
                category: Category::PortScan,
            },
            dry_run: false,
        },
        evidence: Some(Evidence {
            window_start: Time::from_secs(1_789_999_940),
            window_end: Time::from_secs(1_790_000_000),
            crossed: vec![Crossed {
                signal: "distinct_ports".into(),
                value: 812.0,
                threshold: 100.0,
            }],
            counts: BTreeMap::new(),
            top_destinations: vec![Counted {
                key: "198.51.100.20".parse().unwrap(),
                count: 812,
            }],
            top_ports: vec![Counted { key: 22, count: 1 }],
            first_seen: Time::from_secs(1_789_999_950),
            last_seen: Time::from_secs(1_790_000_000),
            sample: vec![],
        }),
    }
}

fn cfg(dir: &std::path::Path, script: &str, timeout_ms: u64, retries: u32) -> Notify {
    let hook = dir.join("hook.sh");
    std::fs::write(&hook, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    Notify {
        command: Some(vec![hook.display().to_string()]),
        timeout: Duration::from_millis(timeout_ms),
        retries,
        report_dir: Some(dir.join("reports")),
        reporter: Some("abuse@example.net".into()),
    }
}

async fn settle(n: &Notifier, want: impl Fn(&NotifyStats) -> bool) {
    for _ in 0..200 {
        if want(n.stats()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("notifier did not settle: {:?}", n.stats());
}

#[tokio::test]
async fn hook_gets_the_decision_as_json_on_stdin_and_a_report_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("got.json");
    let n = Notifier::spawn(cfg(
        dir.path(),
        &format!("cat > {}", out.display()),
        5000,
        0,
    ));
    n.notify(notification());
    settle(&n, |s| s.sent.load(Ordering::Relaxed) == 1).await;
    let got: Notification = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(got, notification());
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["schema"], "egressguard.notify.v1");
    assert_eq!(v["decision"]["target"], "203.0.113.7/32");
    assert_eq!(v["decision"]["kind"], "quarantine");
    assert_eq!(v["decision"]["cause"]["by"], "detection");
    assert_eq!(v["evidence"]["crossed"][0]["signal"], "distinct_ports");

    let reports: Vec<_> = std::fs::read_dir(dir.path().join("reports"))
        .unwrap()
        .collect();
    assert_eq!(reports.len(), 1);
    let text = std::fs::read_to_string(reports[0].as_ref().unwrap().path()).unwrap();
    assert!(text.contains("X-XARF: PLAIN"), "{text}");
    assert!(text.contains("Report-Type: portscan"), "{text}");
    assert!(text.contains("Source: 203.0.113.7/32"), "{text}");
    assert!(
        text.contains("distinct_ports: 812 (threshold 100)"),
        "{text}"
    );
    assert!(text.contains("Reported-From: abuse@example.net"), "{text}");
}

#[tokio::test]
async fn hanging_hook_is_killed_and_failing_hook_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let n = Notifier::spawn(cfg(dir.path(), "sleep 30", 200, 0));
    n.notify(notification());
    settle(&n, |s| s.failed.load(Ordering::Relaxed) == 1).await;

    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("count");
    let n = Notifier::spawn(cfg(
        dir.path(),
        &format!("echo x >> {}; exit 1", count.display()),
        5000,
        1,
    ));
    n.notify(notification());
    settle(&n, |s| s.failed.load(Ordering::Relaxed) == 1).await;
    assert_eq!(
        std::fs::read_to_string(&count).unwrap().lines().count(),
        2,
        "one try plus one retry"
    );
}

#[tokio::test]
async fn a_full_queue_drops_instead_of_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let n = Notifier::spawn(cfg(dir.path(), "sleep 1", 5000, 0));
    for _ in 0..(QUEUE + 10) {
        n.notify(notification());
    }
    assert!(n.stats().dropped.load(Ordering::Relaxed) >= 9);
}
