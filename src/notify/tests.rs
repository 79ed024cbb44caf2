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
            spoofing: None,
            pattern: None,
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

/// Whether a process runs (a zombie waiting for its reaper does not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with(['R', 'S', 'D', 'T', 't']))
        })
        .unwrap_or(false)
}

async fn gone(pid: i32) -> bool {
    for _ in 0..100 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn pids(path: &std::path::Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn another(target: &str) -> Notification {
    let mut n = notification();
    n.decision.target = target.parse().unwrap();
    n
}

#[tokio::test]
async fn a_hook_that_backgrounds_a_child_succeeds_once_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pids");
    let count = dir.path().join("count");
    // The backgrounded sleep keeps the hook's stderr open for 30 s: waiting for the end of
    // the output (as before) ran into the timeout and retried.
    let n = Notifier::spawn(cfg(
        dir.path(),
        &format!(
            "echo run >> {c}; sleep 30 & echo $! >> {p}; exit 0",
            c = count.display(),
            p = pidfile.display()
        ),
        3000,
        2,
    ));
    let started = std::time::Instant::now();
    n.notify(notification());
    settle(&n, |s| s.sent.load(Ordering::Relaxed) == 1).await;
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "reported only after {:?}: it waited for the background child",
        started.elapsed()
    );
    assert_eq!(n.stats().failed.load(Ordering::Relaxed), 0);
    assert_eq!(n.stats().runs.load(Ordering::Relaxed), 1);
    assert_eq!(std::fs::read_to_string(&count).unwrap().lines().count(), 1);
    let children = pids(&pidfile);
    assert_eq!(children.len(), 1);
    assert!(
        gone(children[0]).await,
        "the background sleep was left running"
    );
}

#[tokio::test]
async fn a_hanging_hook_is_killed_with_its_children_at_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pids");
    let n = Notifier::spawn(cfg(
        dir.path(),
        &format!(
            "echo $$ >> {p}; sleep 30 & echo $! >> {p}; sleep 30",
            p = pidfile.display()
        ),
        300,
        0,
    ));
    n.notify(notification());
    settle(&n, |s| s.failed.load(Ordering::Relaxed) == 1).await;
    let procs = pids(&pidfile);
    assert_eq!(procs.len(), 2, "the hook and its child");
    for p in procs {
        assert!(
            gone(p).await,
            "process {p} of the hook's group survived the timeout"
        );
    }
}

#[tokio::test]
async fn a_hanging_hook_delays_only_its_own_incident() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("reported");
    // The hook hangs for 203.0.113.7 (the first incident) and reports any other at once.
    let n = Notifier::spawn(cfg(
        dir.path(),
        &format!(
            "body=$(cat); case \"$body\" in *203.0.113.7/32*) sleep 30;; esac; echo \"$body\" >> {}",
            out.display()
        ),
        2000,
        1,
    ));
    n.notify(notification());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    n.notify(another("203.0.113.8/32"));
    settle(&n, |s| s.sent.load(Ordering::Relaxed) == 1).await;
    let waited = started.elapsed();
    // Before, the second report waited for the first's timeout × attempts plus the backoff
    // (2 s + 1 s + 2 s); now it is bounded by its own hook's run.
    assert!(
        waited < Duration::from_millis(1500),
        "the second incident's report took {waited:?}"
    );
    let reported = std::fs::read_to_string(&out).unwrap();
    assert!(reported.contains("203.0.113.8/32"), "{reported}");
    assert!(!reported.contains("203.0.113.7/32"), "{reported}");
    assert_eq!(n.stats().failed.load(Ordering::Relaxed), 0, "still trying");
}

#[tokio::test]
async fn notifications_about_one_address_stay_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("order");
    let n = Notifier::spawn(cfg(
        dir.path(),
        &format!(
            "body=$(cat); sleep 0.1; case \"$body\" in *'\"kind\":null'*) echo release;; *) echo hold;; esac >> {}",
            out.display()
        ),
        5000,
        0,
    ));
    let mut release = notification();
    release.decision.kind = None;
    n.notify(notification());
    n.notify(release);
    settle(&n, |s| s.sent.load(Ordering::Relaxed) == 2).await;
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "hold\nrelease\n");
}

#[tokio::test]
async fn set_config_applies_to_the_next_notification() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    let second = dir.path().join("second");
    let n = Notifier::spawn(cfg(
        dir.path(),
        &format!("cat > {}", first.display()),
        5000,
        0,
    ));
    n.notify(notification());
    settle(&n, |s| s.sent.load(Ordering::Relaxed) == 1).await;
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    n.set_config(cfg(&sub, &format!("cat > {}", second.display()), 5000, 0));
    n.notify(another("203.0.113.9/32"));
    settle(&n, |s| s.sent.load(Ordering::Relaxed) == 2).await;
    assert!(
        std::fs::read_to_string(&second)
            .unwrap()
            .contains("203.0.113.9/32")
    );
    assert!(
        !std::fs::read_to_string(&first)
            .unwrap()
            .contains("203.0.113.9/32")
    );
}
