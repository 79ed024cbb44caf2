//! The enforcer against the real kernel, inside the router namespace of a [`Topology`]:
//! blocks and quarantines cut traffic as a user would check with ping, expiry and unblock
//! lift them, the operator's own tables stay byte-identical, drift is repaired, blackhole
//! routes follow the blocks, and start-up errors name their fix.
//!
//! The enforcer runs on a current-thread tokio runtime on a thread that entered the router
//! namespace (`Netns::enter`), so its netlink sockets live there and the `nft` children it
//! spawns inherit the namespace. Each test uses its own table name, and checks that the table
//! never appears outside the namespace.

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egressguard::enforce::route::RouteTag;
use egressguard::enforce::{EnforceError, EnforceOptions, Enforcer, RemoveTarget, remove_all};
use egressguard::messages::{BlockKind, DesiredBlock, DesiredBlocks, Time};
use egressguard::netns::{Netns, Topology};
use egressguard::policy::Policy;

use crate::common::require_root;

static SEQ: AtomicU32 = AtomicU32::new(0);

fn table_name() -> String {
    format!(
        "egt{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A policy for `table`: `top` is added at the top level (it may set `mode:`), `enf` inside
/// `enforcement:`.
fn policy_with(table: &str, top: &str, enf: &str) -> Arc<Policy> {
    let mode = if top.contains("mode:") {
        ""
    } else {
        "mode: enforce\n"
    };
    let text = format!(
        "version: 1\n{mode}{top}networks:\n  - prefix: 203.0.113.0/24\n  - prefix: 2001:db8:c::/64\n\
         enforcement:\n  table: {table}\n  reconcile_interval: 200ms\n  walled_garden:\n    - 198.51.100.53/32\n    - 2001:db8:1::35/128\n{enf}"
    );
    Arc::new(Policy::from_text(&text, Path::new("<test>")).expect("test policy is valid"))
}

fn policy(table: &str, top: &str) -> Arc<Policy> {
    policy_with(table, top, "")
}

const BLACKHOLE: &str = "  blackhole:\n    enabled: true\n    table: 100\n    protocol: 201\n";

fn block(target: &str, kind: BlockKind, expires: Option<Time>) -> DesiredBlock {
    DesiredBlock {
        target: target.parse().expect("target"),
        kind,
        expires,
        announce: vec![],
        flowspec: None,
        except: vec![],
    }
}

fn desired(generation: u64, blocks: Vec<DesiredBlock>) -> Arc<DesiredBlocks> {
    Arc::new(DesiredBlocks {
        generation,
        blocks: blocks.into_iter().map(|b| (b.target, b)).collect(),
        ..DesiredBlocks::default()
    })
}

/// Runs `f` on a current-thread runtime inside the router namespace.
fn in_router<F, Fut>(topo: &Topology, f: F)
where
    F: FnOnce() -> Fut + Send,
    Fut: std::future::Future<Output = ()>,
{
    topo.router
        .enter(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(f());
        })
        .expect("enter router namespace");
}

/// Pings `dst` once from `ns`, without blocking the runtime.
async fn ping(ns: &Netns, dst: IpAddr) -> bool {
    let d = dst.to_string();
    let mut cmd: tokio::process::Command = ns.command(&["ping", "-c", "1", "-W", "1", &d]).into();
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Polls `check` until it holds or `limit` passes; returns the time it took.
async fn eventually<F, Fut>(limit: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn nft_in(ns: &Netns, args: &[&str]) -> String {
    let mut full = vec!["nft"];
    full.extend_from_slice(args);
    ns.run(&full)
        .unwrap_or_else(|e| panic!("nft {args:?}: {e}"))
}

async fn nft_async(ns: &Netns, args: &[&str]) -> Option<String> {
    let mut full = vec!["nft"];
    full.extend_from_slice(args);
    let mut cmd: tokio::process::Command = ns.command(&full).into();
    let out = cmd.output().await.ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn set_list(ns: &Netns, table: &str, set: &str) -> String {
    nft_in(ns, &["list", "set", "inet", table, set])
}

/// The table must never leak into the test runner's own namespace.
fn assert_not_in_host(table: &str) {
    let out = std::process::Command::new("nft")
        .args(["list", "table", "inet", table])
        .output()
        .expect("nft runs");
    assert!(
        !out.status.success(),
        "table inet {table} appeared outside the router namespace"
    );
}

fn topology(customers: &[u16], internet: &[u16]) -> Topology {
    let mut topo = Topology::new().expect("topology");
    for c in customers {
        topo.add_customer(*c).expect("customer");
    }
    for h in internet {
        topo.add_internet_host(*h).expect("internet host");
    }
    topo
}

#[test]
fn blocked_address_reaches_nothing_and_nothing_reaches_it_while_its_neighbour_can() {
    if !require_root(
        "blocked_address_reaches_nothing_and_nothing_reaches_it_while_its_neighbour_can",
    ) {
        return;
    }
    let topo = topology(&[10, 11], &[20]);
    let table = table_name();
    let (bad, good, inet) = (&topo.customers[0], &topo.customers[1], &topo.internet[0]);
    in_router(&topo, || async {
        let mut e = Enforcer::init(policy(&table, "")).await.expect("init");
        for dst in [inet.v4, inet.v6] {
            assert!(
                ping(&bad.ns, dst).await,
                "before the block {dst} is reachable"
            );
        }
        e.apply(desired(
            1,
            vec![
                block(&format!("{}/32", bad.v4), BlockKind::Block, None),
                block(&format!("{}/128", bad.v6), BlockKind::Terminate, None),
            ],
        ))
        .await
        .expect("apply");
        assert!(set_list(&topo.router, &table, "blocked4").contains(&bad.v4.to_string()));
        assert!(set_list(&topo.router, &table, "blocked6").contains(&bad.v6.to_string()));
        for (from, to) in [(bad.v4, inet.v4), (bad.v6, inet.v6)] {
            assert!(
                !ping(&bad.ns, to).await,
                "blocked {from} still reaches {to}"
            );
        }
        for dst in [bad.v4, bad.v6] {
            assert!(!ping(&inet.ns, dst).await, "{dst} is still reachable");
        }
        for dst in [inet.v4, inet.v6] {
            assert!(ping(&good.ns, dst).await, "the neighbour lost {dst}");
        }
        for dst in [good.v4, good.v6] {
            assert!(
                ping(&inet.ns, dst).await,
                "the neighbour {dst} is unreachable"
            );
        }
        // The drops are counted.
        let fwd = nft_in(&topo.router, &["list", "chain", "inet", &table, "forward"]);
        assert!(
            fwd.lines()
                .any(|l| l.contains("@blocked4") && !l.contains("packets 0 ")),
            "{fwd}"
        );
        // Unblock lifts it at once.
        e.apply(desired(2, vec![])).await.expect("unblock");
        for dst in [inet.v4, inet.v6] {
            assert!(
                ping(&bad.ns, dst).await,
                "unblocked host cannot reach {dst}"
            );
        }
        assert!(!set_list(&topo.router, &table, "blocked4").contains(&bad.v4.to_string()));
    });
    assert_not_in_host(&table);
}

#[test]
fn quarantined_address_reaches_only_the_walled_garden() {
    if !require_root("quarantined_address_reaches_only_the_walled_garden") {
        return;
    }
    let topo = topology(&[10, 11], &[20, 53]);
    let table = table_name();
    let (q, other, inet, garden) = (
        &topo.customers[0],
        &topo.customers[1],
        &topo.internet[0],
        &topo.internet[1],
    );
    in_router(&topo, || async {
        let mut e = Enforcer::init(policy(&table, "")).await.expect("init");
        e.apply(desired(
            1,
            vec![
                block(&format!("{}/32", q.v4), BlockKind::Quarantine, None),
                block(&format!("{}/128", q.v6), BlockKind::Quarantine, None),
            ],
        ))
        .await
        .expect("apply");
        for dst in [garden.v4, garden.v6] {
            // Replies from the garden come back (conntrack: established).
            assert!(
                ping(&q.ns, dst).await,
                "quarantined host lost the garden {dst}"
            );
        }
        for dst in [inet.v4, inet.v6, other.v4, other.v6] {
            assert!(
                !ping(&q.ns, dst).await,
                "quarantined host still reaches {dst}"
            );
        }
        for dst in [q.v4, q.v6] {
            assert!(
                !ping(&inet.ns, dst).await,
                "{dst} reachable from the internet"
            );
            assert!(
                !ping(&garden.ns, dst).await,
                "the garden may answer {dst}, not open connections to it"
            );
        }
        for dst in [inet.v4, inet.v6] {
            assert!(ping(&other.ns, dst).await, "the neighbour lost {dst}");
        }
    });
    assert_not_in_host(&table);
}

#[test]
fn expiry_lifts_a_block_by_itself_even_with_the_agent_stopped() {
    if !require_root("expiry_lifts_a_block_by_itself_even_with_the_agent_stopped") {
        return;
    }
    let topo = topology(&[10], &[20]);
    let table = table_name();
    let (c, inet) = (&topo.customers[0], &topo.internet[0]);
    in_router(&topo, || async {
        let mut e = Enforcer::init(policy(&table, "")).await.expect("init");
        let expires = Time::now().saturating_add(Duration::from_secs(4));
        e.apply(desired(
            1,
            vec![
                block(&format!("{}/32", c.v4), BlockKind::Block, Some(expires)),
                block(&format!("{}/128", c.v6), BlockKind::Block, Some(expires)),
            ],
        ))
        .await
        .expect("apply");
        let listed = set_list(&topo.router, &table, "blocked4");
        assert!(
            listed.contains("timeout"),
            "element carries its timeout: {listed}"
        );
        assert!(!ping(&c.ns, inet.v4).await);
        assert!(!ping(&c.ns, inet.v6).await);
        // The agent is gone: the kernel lifts the block by itself.
        drop(e);
        let lifted = eventually(Duration::from_secs(8), || async {
            ping(&c.ns, inet.v4).await && ping(&c.ns, inet.v6).await
        })
        .await;
        assert!(lifted.is_some(), "the block did not expire");
        assert!(Time::now() >= expires, "lifted before its time");
        assert!(!set_list(&topo.router, &table, "blocked4").contains(&c.v4.to_string()));
    });
    assert_not_in_host(&table);
}

#[test]
fn operator_tables_are_byte_identical_across_start_reload_restart_and_stop() {
    if !require_root("operator_tables_are_byte_identical_across_start_reload_restart_and_stop") {
        return;
    }
    let topo = topology(&[10], &[20]);
    let table = table_name();
    let r = &topo.router;
    let ruleset = r#"table inet filter {
    chain forward {
        type filter hook forward priority filter; policy accept;
        ct state established,related accept
        ip saddr 203.0.113.0/24 counter accept
        ip6 saddr 2001:db8:c::/64 accept
    }
    chain input {
        type filter hook input priority filter; policy accept;
        tcp dport 22 accept
    }
}
table ip nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr 203.0.113.0/24 oifname "br-inet" masquerade
    }
}
"#;
    let path = std::env::temp_dir().join(format!("{table}-operator.nft"));
    std::fs::write(&path, ruleset).expect("write ruleset");
    nft_in(r, &["-f", path.to_str().expect("utf-8 path")]);
    let _ = std::fs::remove_file(&path);
    let snapshot = || {
        (
            nft_in(r, &["list", "table", "inet", "filter"]),
            nft_in(r, &["list", "table", "ip", "nat"]),
        )
    };
    // Counters of the operator's rules change with traffic; none flows during the test.
    let before = snapshot();
    let c = &topo.customers[0];
    in_router(&topo, || async {
        let p = policy(&table, "");
        let mut e = Enforcer::init(p.clone()).await.expect("start");
        assert_eq!(snapshot(), before, "start changed the operator's tables");
        e.apply(desired(
            1,
            vec![block(&format!("{}/32", c.v4), BlockKind::Block, None)],
        ))
        .await
        .expect("apply");
        // Reload with a changed policy (another garden address).
        let p2 = policy(&table, "allow:\n  - 203.0.113.250/32\n");
        e.set_policy(p2.clone()).await.expect("reload");
        assert_eq!(snapshot(), before, "reload changed the operator's tables");
        // Stop, then restart: the block must still be there right after start, before any
        // desired blocks arrive (no gap), and after the reconcile tick too.
        drop(e);
        assert_eq!(snapshot(), before, "stop changed the operator's tables");
        let listed = set_list(r, &table, "blocked4");
        assert!(listed.contains(&c.v4.to_string()), "stop removed the block");
        let mut e = Enforcer::init(p2).await.expect("restart");
        assert!(
            set_list(r, &table, "blocked4").contains(&c.v4.to_string()),
            "restart opened a gap"
        );
        e.reconcile().await.expect("reconcile");
        assert!(set_list(r, &table, "blocked4").contains(&c.v4.to_string()));
        assert_eq!(snapshot(), before, "restart changed the operator's tables");
        // Purge removes only ours.
        let report = remove_all(&RemoveTarget::from_policy(&p), &EnforceOptions::default())
            .await
            .expect("remove");
        assert!(report.table_removed);
        assert_eq!(snapshot(), before, "purge changed the operator's tables");
        assert!(
            topo.router
                .run(&["nft", "list", "table", "inet", &table])
                .is_err()
        );
    });
    assert_not_in_host(&table);
}

#[test]
fn drift_is_repaired_by_the_writer_task_within_a_second() {
    if !require_root("drift_is_repaired_by_the_writer_task_within_a_second") {
        return;
    }
    let topo = topology(&[10], &[20]);
    let table = table_name();
    let (c, inet) = (&topo.customers[0], &topo.internet[0]);
    let r = &topo.router;
    in_router(&topo, || async {
        let p = policy_with(&table, "", BLACKHOLE);
        let e = Enforcer::init(p).await.expect("init");
        let handle = e.spawn();
        let mut d = (*desired(
            1,
            vec![
                block(&format!("{}/32", c.v4), BlockKind::Block, None),
                block(&format!("{}/128", c.v6), BlockKind::Block, None),
            ],
        ))
        .clone();
        handle.submit(d.clone());
        let held = eventually(Duration::from_secs(3), || async {
            nft_async(r, &["list", "set", "inet", &table, "blocked4"])
                .await
                .is_some_and(|s| s.contains(&c.v4.to_string()))
        })
        .await;
        assert!(held.is_some(), "the writer did not apply the block");

        // The admin deletes the whole table.
        nft_in(r, &["delete", "table", "inet", &table]);
        let back = eventually(Duration::from_secs(3), || async {
            nft_async(r, &["list", "set", "inet", &table, "blocked4"])
                .await
                .is_some_and(|s| s.contains(&c.v4.to_string()))
        })
        .await
        .expect("table not repaired");
        assert!(back < Duration::from_secs(1), "repair took {back:?}");
        assert!(!ping(&c.ns, inet.v4).await, "repaired table does not drop");

        // The admin flushes the table (all rules gone).
        nft_in(r, &["flush", "table", "inet", &table]);
        let back = eventually(Duration::from_secs(3), || async {
            nft_async(r, &["list", "chain", "inet", &table, "forward"])
                .await
                .is_some_and(|s| s.contains("@blocked4"))
        })
        .await
        .expect("flushed rules not repaired");
        assert!(back < Duration::from_secs(1), "repair took {back:?}");

        // An element removed by hand.
        nft_in(
            r,
            &[
                "delete",
                "element",
                "inet",
                &table,
                "blocked6",
                &format!("{{ {} }}", c.v6),
            ],
        );
        eventually(Duration::from_secs(3), || async {
            nft_async(r, &["list", "set", "inet", &table, "blocked6"])
                .await
                .is_some_and(|s| s.contains(&c.v6.to_string()))
        })
        .await
        .expect("element not repaired");

        // A route deleted by hand.
        topo.router
            .run(&[
                "ip",
                "route",
                "del",
                "blackhole",
                &format!("{}/32", c.v4),
                "table",
                "100",
            ])
            .expect("delete route");
        eventually(Duration::from_secs(3), || async {
            let mut cmd: tokio::process::Command = r
                .command(&["ip", "route", "show", "table", "100", "proto", "201"])
                .into();
            cmd.output()
                .await
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&c.v4.to_string()))
        })
        .await
        .expect("route not repaired");

        let stats = handle.stats();
        assert!(stats.repairs >= 4, "{stats:?}");
        assert_eq!(stats.errors, 0, "{stats:?}");

        // Unblocking through the handle lifts the block and the route.
        d.generation = 2;
        d.blocks.clear();
        handle.submit(d);
        eventually(Duration::from_secs(3), || async {
            ping(&c.ns, inet.v4).await
        })
        .await
        .expect("unblock not applied");
        handle.shutdown().await.expect("shutdown");
    });
    assert_not_in_host(&table);
}

#[test]
fn blackhole_routes_follow_the_blocks_and_only_ours_are_touched() {
    if !require_root("blackhole_routes_follow_the_blocks_and_only_ours_are_touched") {
        return;
    }
    let topo = topology(&[10, 11], &[20]);
    let table = table_name();
    let r = &topo.router;
    let show = |fam: &str| {
        r.run(&["ip", fam, "route", "show", "table", "100", "proto", "201"])
            .expect("ip route")
    };
    // Someone else's route in the same table, with another protocol.
    r.run(&[
        "ip",
        "route",
        "add",
        "blackhole",
        "192.0.2.0/24",
        "table",
        "100",
        "proto",
        "static",
    ])
    .expect("foreign route");
    let (c, q) = (&topo.customers[0], &topo.customers[1]);
    in_router(&topo, || async {
        let p = policy_with(&table, "", BLACKHOLE);
        let mut e = Enforcer::init(p.clone()).await.expect("init");
        e.apply(desired(
            1,
            vec![
                block(&format!("{}/32", c.v4), BlockKind::Block, None),
                block("2001:db8:c::/64", BlockKind::Block, None),
                block(&format!("{}/32", q.v4), BlockKind::Quarantine, None),
            ],
        ))
        .await
        .expect("apply");
        let v4 = show("-4");
        assert!(v4.contains(&format!("blackhole {}", c.v4)), "{v4}");
        assert!(
            !v4.contains(&q.v4.to_string()),
            "quarantine got a route: {v4}"
        );
        let v6 = show("-6");
        assert!(v6.contains("blackhole 2001:db8:c::/64"), "{v6}");
        e.apply(desired(2, vec![])).await.expect("unblock");
        assert!(!show("-4").contains("blackhole"), "{}", show("-4"));
        assert!(!show("-6").contains("blackhole"), "{}", show("-6"));
        let all = r
            .run(&["ip", "route", "show", "table", "100"])
            .expect("ip route");
        assert!(all.contains("192.0.2.0/24"), "foreign route removed: {all}");
        remove_all(&RemoveTarget::from_policy(&p), &EnforceOptions::default())
            .await
            .expect("remove");
        let tag = RouteTag {
            table: 100,
            protocol: 201,
        };
        assert!(
            egressguard::enforce::list_routes(tag)
                .await
                .unwrap()
                .is_empty()
        );
    });
    assert_not_in_host(&table);
}

#[test]
fn counters_and_conntrack_work_for_customer_traffic() {
    if !require_root("counters_and_conntrack_work_for_customer_traffic") {
        return;
    }
    crate::common::require_tools(
        "counters_and_conntrack_work_for_customer_traffic",
        &["conntrack"],
    );
    let topo = topology(&[10], &[20]);
    let table = table_name();
    let (c, inet) = (&topo.customers[0], &topo.internet[0]);
    in_router(&topo, || async {
        let _e = Enforcer::init(policy(&table, "")).await.expect("init");
        // The layout, for the record (`--nocapture`).
        eprintln!(
            "{}",
            nft_in(&topo.router, &["list", "table", "inet", &table])
        );
        assert!(ping(&c.ns, inet.v4).await);
        assert!(ping(&c.ns, inet.v6).await);
        let s4 = set_list(&topo.router, &table, "src_counters4");
        assert!(
            s4.contains(&format!("{} ", c.v4)) && s4.contains("counter packets"),
            "{s4}"
        );
        assert!(!s4.contains("counter packets 0 "), "{s4}");
        let s6 = set_list(&topo.router, &table, "src_counters6");
        assert!(s6.contains(&c.v6.to_string()), "{s6}");
        let ct = topo
            .router
            .run(&["conntrack", "-L", "-s", &c.v4.to_string()])
            .unwrap_or_default();
        assert!(
            ct.contains(&inet.v4.to_string()),
            "no conntrack entry: {ct}"
        );
    });
}

#[test]
fn class_counters_count_echo_requests_and_unanswered_udp() {
    if !require_root("class_counters_count_echo_requests_and_unanswered_udp") {
        return;
    }
    crate::common::require_tools(
        "class_counters_count_echo_requests_and_unanswered_udp",
        &["hping3"],
    );
    let topo = topology(&[10], &[20]);
    let table = table_name();
    let (c, inet) = (&topo.customers[0], &topo.internet[0]);
    in_router(&topo, || async {
        let _e = Enforcer::init(policy(&table, "")).await.expect("init");
        assert!(ping(&c.ns, inet.v4).await);
        assert!(ping(&c.ns, inet.v6).await);
        // Seven datagrams of one flow to a closed port: the answers are ICMP errors, no
        // reply of the flow, so all but the first count (the first is what every resolver
        // query is: not counted, `ct status confirmed`).
        let dst = inet.v4.to_string();
        c.ns.run(&[
            "hping3", "--udp", "-k", "-s", "4000", "-p", "9", "-c", "7", "-i", "u1000", &dst,
        ])
        .ok();
        let echo4 = set_list(&topo.router, &table, "src_echo4");
        assert!(
            echo4.contains(&format!("{} ", c.v4)) && !echo4.contains("counter packets 0 "),
            "{echo4}"
        );
        let echo6 = set_list(&topo.router, &table, "src_echo6");
        assert!(echo6.contains(&c.v6.to_string()), "{echo6}");
        let udp4 = set_list(&topo.router, &table, "src_udp4");
        assert!(
            udp4.contains(&format!("{} counter packets 6 ", c.v4)),
            "{udp4}"
        );
        // The replies of the router's pings are not echo requests of the internet host.
        assert!(!echo4.contains(&dst), "{echo4}");
    });
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn dry_run_logs_what_it_would_do_and_enforces_nothing() {
    if !require_root("dry_run_logs_what_it_would_do_and_enforces_nothing") {
        return;
    }
    let topo = topology(&[10], &[20]);
    let table = table_name();
    let (c, inet) = (&topo.customers[0], &topo.internet[0]);
    let capture = Capture::default();
    in_router(&topo, || async {
        let w = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let p = policy_with(&table, "mode: dry-run\n", BLACKHOLE);
        let mut e = Enforcer::init(p).await.expect("init");
        e.apply(desired(
            1,
            vec![
                block(&format!("{}/32", c.v4), BlockKind::Block, None),
                block(&format!("{}/128", c.v6), BlockKind::Quarantine, None),
            ],
        ))
        .await
        .expect("apply");
        assert!(ping(&c.ns, inet.v4).await, "dry run blocked");
        assert!(!set_list(&topo.router, &table, "blocked4").contains(&c.v4.to_string()));
        let routes = topo
            .router
            .run(&["ip", "route", "show", "table", "100"])
            .unwrap_or_default();
        assert!(routes.is_empty(), "{routes}");
        e.apply(desired(2, vec![])).await.expect("apply");
    });
    let log = String::from_utf8_lossy(&capture.0.lock().expect("lock")).into_owned();
    assert!(
        log.lines()
            .any(|l| l.contains("would block") && l.contains(&c.v4.to_string())),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("would quarantine") && l.contains(&c.v6.to_string())),
        "{log}"
    );
    assert!(log.contains("would unblock"), "{log}");
    assert_not_in_host(&table);
}

#[test]
fn missing_nft_names_the_package_to_install() {
    if !require_root("missing_nft_names_the_package_to_install") {
        return;
    }
    let ns = Netns::new("nonft").expect("netns");
    let table = table_name();
    ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let opts = EnforceOptions {
                nft: "/nonexistent/nft".into(),
                ..EnforceOptions::default()
            };
            let err = match Enforcer::init_with(policy(&table, ""), opts).await {
                Ok(_) => panic!("init succeeded without nft"),
                Err(e) => e,
            };
            assert!(matches!(err, EnforceError::NftMissing { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains("install the nftables package"), "{msg}");
            assert!(msg.contains("/nonexistent/nft"), "{msg}");
        });
    })
    .expect("enter");
}

#[test]
fn unprivileged_nft_is_told_to_run_as_root_and_nothing_is_half_installed() {
    if !require_root("unprivileged_nft_is_told_to_run_as_root_and_nothing_is_half_installed") {
        return;
    }
    let ns = Netns::new("noperm").expect("netns");
    let table = table_name();
    let dir = tempfile::tempdir().expect("tempdir");
    let wrapper = dir.path().join("nft-as-nobody");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\nexec setpriv --reuid=65534 --regid=65534 --clear-groups nft \"$@\"\n",
    )
    .expect("wrapper");
    std::process::Command::new("chmod")
        .args(["755", wrapper.to_str().expect("utf-8")])
        .status()
        .expect("chmod");
    ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let opts = EnforceOptions {
                nft: wrapper.clone(),
                ..EnforceOptions::default()
            };
            let err = match Enforcer::init_with(policy(&table, ""), opts).await {
                Ok(_) => panic!("init succeeded without privilege"),
                Err(e) => e,
            };
            assert!(
                matches!(err, EnforceError::PermissionDenied { .. }),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains("run egressguard as root or with CAP_NET_ADMIN"),
                "{msg}"
            );
        });
    })
    .expect("enter");
    assert!(
        ns.run(&["nft", "list", "table", "inet", &table]).is_err(),
        "a table was left behind"
    );
}

#[test]
fn a_refused_transaction_leaves_nothing_behind() {
    if !require_root("a_refused_transaction_leaves_nothing_behind") {
        return;
    }
    use egressguard::enforce::layout::{ElemKey, Fam, Role, SetId, Structure, TableSpec, Tx};
    use egressguard::enforce::nft::Nft;
    let ns = Netns::new("atomic").expect("netns");
    let table = table_name();
    ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let spec = TableSpec {
                table: table.clone(),
                counter_set_size: 65536,
                meters: Default::default(),
            };
            let mut tx = Tx::new();
            tx.structure(&spec, &Structure::fresh());
            // Overlapping intervals in one set: nft refuses the whole transaction.
            tx.add_elements(
                &spec,
                SetId::new(Role::Blocked, Fam::V4),
                &[
                    (ElemKey::Net("203.0.113.0/24".parse().unwrap()), None),
                    (ElemKey::Net("203.0.113.5/32".parse().unwrap()), None),
                ],
            );
            let err = Nft::new("nft").apply(&tx).await.expect_err("refused");
            assert!(matches!(err, EnforceError::NftFailed { .. }), "{err:?}");
        });
    })
    .expect("enter");
    assert!(
        ns.run(&["nft", "list", "table", "inet", &table]).is_err(),
        "half a table was installed"
    );
}

// ---------------------------------------------------------------------------------------------
// The element fast path (one nfnetlink batch per change set)
// ---------------------------------------------------------------------------------------------

/// The elements of a set as `nft -j list set` shows them: (element, timeout, expires).
fn listed_elems(ns: &Netns, table: &str, set: &str) -> Vec<(String, Option<u64>, Option<u64>)> {
    let out = nft_in(ns, &["-j", "list", "set", "inet", table, set]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("nft -j prints JSON");
    let key = |k: &serde_json::Value| match k {
        serde_json::Value::String(s) => s.clone(),
        other => match other.get("prefix") {
            Some(p) => format!("{}/{}", p["addr"].as_str().unwrap_or("?"), p["len"]),
            None => other.to_string(),
        },
    };
    v["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .filter_map(|o| o.get("set"))
        .flat_map(|s| {
            s.get("elem")
                .and_then(|e| e.as_array())
                .cloned()
                .unwrap_or_default()
        })
        .map(|e| match e.get("elem") {
            Some(inner) => (
                key(&inner["val"]),
                inner["timeout"].as_u64(),
                inner["expires"].as_u64(),
            ),
            None => (key(&e), None, None),
        })
        .collect()
}

/// Writes the agent's table, empty, with nft (what the batch tests start from).
async fn fresh_table(table: &str) {
    use egressguard::enforce::layout::{Structure, TableSpec, Tx};
    let spec = TableSpec {
        table: table.to_owned(),
        counter_set_size: 65536,
        meters: Default::default(),
    };
    let mut tx = Tx::new();
    tx.structure(&spec, &Structure::fresh());
    egressguard::enforce::nft::Nft::new("nft")
        .apply(&tx)
        .await
        .expect("structure");
}

fn in_netns<F, Fut>(ns: &Netns, f: F)
where
    F: FnOnce() -> Fut + Send,
    Fut: std::future::Future<Output = ()>,
{
    ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(f());
    })
    .expect("enter namespace");
}

#[test]
fn ten_thousand_blocks_go_in_and_out_as_one_batch_with_their_timeouts() {
    if !require_root("ten_thousand_blocks_go_in_and_out_as_one_batch_with_their_timeouts") {
        return;
    }
    let ns = Netns::new("fast10k").expect("netns");
    let table = table_name();
    // 10,000 IPv4 addresses from 198.18.0.0/15 (RFC 2544), some IPv6 /128s and /64s.
    let v4: Vec<String> = (0..10_000u32)
        .map(|i| {
            std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) + i * 3)
                .to_string()
        })
        .collect();
    let v6_128: Vec<String> = (1..=50u32).map(|i| format!("2001:db8:c::{i:x}")).collect();
    let v6_64: Vec<String> = (1..=20u32)
        .map(|i| format!("2001:db8:d:{i:x}::/64"))
        .collect();
    in_netns(&ns, || async {
        let mut e = Enforcer::init(policy(&table, "")).await.expect("init");
        let expires = Time::now().saturating_add(Duration::from_secs(3600));
        let mut blocks: Vec<DesiredBlock> = v4
            .iter()
            .map(|a| block(&format!("{a}/32"), BlockKind::Block, Some(expires)))
            .collect();
        blocks.extend(
            v6_128
                .iter()
                .map(|a| block(&format!("{a}/128"), BlockKind::Block, Some(expires))),
        );
        blocks.extend(v6_64.iter().map(|n| block(n, BlockKind::Quarantine, None)));
        let report = e.apply(desired(1, blocks)).await.expect("apply 10k");
        assert_eq!(report.added, 10_000 + 50 + 20, "{report:?}");
        let stats = e.stats();
        assert_eq!(stats.fast_path_fallbacks, 0, "{stats:?}");
        assert!(
            stats.last_netlink_us > 0,
            "the batch went over nfnetlink: {stats:?}"
        );
        eprintln!("add 10,070: {stats:?}");

        let b4 = listed_elems(&ns, &table, "blocked4");
        assert_eq!(b4.len(), 10_000);
        let got: std::collections::BTreeSet<&str> = b4.iter().map(|(k, _, _)| k.as_str()).collect();
        let want: std::collections::BTreeSet<&str> = v4.iter().map(String::as_str).collect();
        assert_eq!(got, want, "exactly the blocked addresses");
        for (k, timeout, exp) in &b4 {
            assert_eq!(*timeout, Some(3600), "{k}");
            assert!(
                exp.is_some_and(|x| (3590..=3600).contains(&x)),
                "{k} expires {exp:?}"
            );
        }
        let b6 = listed_elems(&ns, &table, "blocked6");
        let got: std::collections::BTreeSet<&str> = b6.iter().map(|(k, _, _)| k.as_str()).collect();
        let want: std::collections::BTreeSet<&str> = v6_128.iter().map(String::as_str).collect();
        assert_eq!(got, want);
        assert!(b6.iter().all(|(_, t, _)| *t == Some(3600)));
        let q6 = listed_elems(&ns, &table, "quarantine6");
        let got: std::collections::BTreeSet<&str> = q6.iter().map(|(k, _, _)| k.as_str()).collect();
        let want: std::collections::BTreeSet<&str> = v6_64.iter().map(String::as_str).collect();
        assert_eq!(got, want);
        assert!(
            q6.iter().all(|(_, t, _)| t.is_none()),
            "no expiry, no timeout"
        );

        // Everything lifted at once: 10,070 interval deletes in one batch.
        let started = Instant::now();
        let report = e.apply(desired(2, vec![])).await.expect("unblock all");
        let took = started.elapsed();
        assert_eq!(report.removed, 10_070, "{report:?}");
        for set in ["blocked4", "blocked6", "quarantine6"] {
            assert!(listed_elems(&ns, &table, set).is_empty(), "{set} not empty");
        }
        let stats = e.stats();
        assert_eq!(stats.fast_path_fallbacks, 0, "{stats:?}");
        eprintln!("delete 10,070 in {took:?}: {stats:?}");
        // Nothing left to do: a reconcile finds the kernel in step.
        let r = e.reconcile().await.expect("reconcile");
        assert!(!r.applied, "{r:?}");
        remove_all(
            &RemoveTarget::from_policy(&policy(&table, "")),
            &EnforceOptions::default(),
        )
        .await
        .expect("remove");
    });
    assert_not_in_host(&table);
}

#[test]
fn an_element_the_kernel_refuses_aborts_the_whole_batch() {
    if !require_root("an_element_the_kernel_refuses_aborts_the_whole_batch") {
        return;
    }
    use egressguard::enforce::genid::GenWatch;
    use egressguard::enforce::layout::{ElemKey, Fam, Role, SetId};
    use egressguard::enforce::nlbatch::{BatchError, NlBatch, Op, Verb};
    let ns = Netns::new("nlrefuse").expect("netns");
    let table = table_name();
    in_netns(&ns, || async {
        fresh_table(&table).await;
        let b4 = SetId::new(Role::Blocked, Fam::V4);
        let add = |a: String| Op {
            set: b4,
            key: ElemKey::Net(format!("{a}/32").parse().unwrap()),
            verb: Verb::Add,
            timeout_secs: Some(600),
        };
        let mut fast = NlBatch::open().expect("nfnetlink socket");
        let good: Vec<Op> = (1..=200u32)
            .map(|i| add(format!("198.18.{}.{}", i / 250, i % 250)))
            .collect();

        // A delete of an element that is not there.
        let mut ops = good.clone();
        ops.push(Op {
            set: b4,
            key: ElemKey::Net("192.0.2.77/32".parse().unwrap()),
            verb: Verb::Delete,
            timeout_secs: None,
        });
        let err = fast.apply(&table, &ops, None).expect_err("refused");
        match &err {
            BatchError::Refused {
                verb,
                set,
                elem,
                errno,
                ..
            } => {
                assert_eq!(
                    (*verb, *set, elem.as_str(), *errno),
                    ("delete", "blocked4", "192.0.2.77", 2),
                    "{err}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            listed_elems(&ns, &table, "blocked4").is_empty(),
            "half a batch applied"
        );

        // Overlapping intervals in one batch (a /24 over one of the addresses).
        let mut ops = good.clone();
        ops.push(Op {
            set: b4,
            key: ElemKey::Net("198.18.0.0/24".parse().unwrap()),
            verb: Verb::Add,
            timeout_secs: None,
        });
        let err = fast.apply(&table, &ops, None).expect_err("refused");
        assert!(
            matches!(
                err,
                BatchError::Refused {
                    verb: "add",
                    set: "blocked4",
                    ..
                }
            ),
            "{err:?}"
        );
        eprintln!(
            "overlap refused: {}",
            egressguard::enforce::DisplayChain(&err)
        );
        assert!(
            listed_elems(&ns, &table, "blocked4").is_empty(),
            "half a batch applied"
        );

        // A batch planned against an old generation is refused as a whole.
        let mut gen_watch = GenWatch::open().expect("genid socket");
        let old = gen_watch.get().await.expect("genid");
        nft_in(&ns, &["add", "table", "ip", "someone-else"]);
        let err = fast
            .apply(&table, &good, Some(old))
            .expect_err("stale generation");
        assert!(
            matches!(err, BatchError::GenerationChanged { .. }),
            "{err:?}"
        );
        assert!(
            listed_elems(&ns, &table, "blocked4").is_empty(),
            "a stale batch applied"
        );

        // The same socket then applies a good batch with the current generation.
        let now = gen_watch.get().await.expect("genid");
        let sent = fast.apply(&table, &good, Some(now)).expect("good batch");
        assert_eq!(sent.messages, 1);
        assert_eq!(listed_elems(&ns, &table, "blocked4").len(), 200);
    });
}

#[test]
fn the_top_of_the_address_space_goes_in_and_out_like_nft_writes_it() {
    if !require_root("the_top_of_the_address_space_goes_in_and_out_like_nft_writes_it") {
        return;
    }
    use egressguard::enforce::layout::{ElemKey, Fam, Role, SetId};
    use egressguard::enforce::nlbatch::{NlBatch, Op, Verb};
    let ns = Netns::new("nltop").expect("netns");
    let table = table_name();
    in_netns(&ns, || async {
        fresh_table(&table).await;
        let op = |set: SetId, k: &str, verb: Verb, t: Option<u64>| Op {
            set,
            key: ElemKey::Net(k.parse().unwrap()),
            verb,
            timeout_secs: t,
        };
        let (b4, b6) = (
            SetId::new(Role::Blocked, Fam::V4),
            SetId::new(Role::Blocked, Fam::V6),
        );
        let elems = [
            op(b4, "255.255.255.255/32", Verb::Add, Some(600)),
            op(b4, "255.255.255.0/31", Verb::Add, None),
            op(b4, "0.0.0.0/32", Verb::Add, None),
            op(b6, "ffff:ffff:ffff:ffff::/64", Verb::Add, Some(600)),
            op(b6, "::/128", Verb::Add, None),
        ];
        let mut fast = NlBatch::open().expect("socket");
        fast.apply(&table, &elems, None).expect("add");
        let mut got4: Vec<String> = listed_elems(&ns, &table, "blocked4")
            .into_iter()
            .map(|e| e.0)
            .collect();
        got4.sort();
        assert_eq!(got4, ["0.0.0.0", "255.255.255.0/31", "255.255.255.255"]);
        let mut got6: Vec<String> = listed_elems(&ns, &table, "blocked6")
            .into_iter()
            .map(|e| e.0)
            .collect();
        got6.sort();
        assert_eq!(got6, ["::", "ffff:ffff:ffff:ffff::/64"]);
        // nft itself can delete what the fast path put in, and the other way round.
        nft_in(
            &ns,
            &[
                "delete",
                "element",
                "inet",
                &table,
                "blocked4",
                "{ 255.255.255.255 }",
            ],
        );
        let dels: Vec<Op> = elems
            .iter()
            .filter(|o| o.key.to_string() != "255.255.255.255")
            .map(|o| Op {
                verb: Verb::Delete,
                timeout_secs: None,
                ..*o
            })
            .collect();
        fast.apply(&table, &dels, None).expect("delete");
        assert!(listed_elems(&ns, &table, "blocked4").is_empty());
        assert!(listed_elems(&ns, &table, "blocked6").is_empty());
    });
}

#[test]
fn forty_thousand_elements_are_one_batch_in_one_send_and_a_split_batch_is_void() {
    if !require_root("forty_thousand_elements_are_one_batch_in_one_send_and_a_split_batch_is_void")
    {
        return;
    }
    use egressguard::enforce::layout::{ElemKey, Fam, Role, SetId};
    use egressguard::enforce::nlbatch::{Batch, NlBatch, Op, Verb};
    let ns = Netns::new("nlbig").expect("netns");
    let table = table_name();
    in_netns(&ns, || async {
        fresh_table(&table).await;
        let b6 = SetId::new(Role::Blocked, Fam::V6);
        let ops: Vec<Op> = (0..40_000u128)
            .map(|i| Op {
                set: b6,
                key: ElemKey::Net(
                    std::net::IpAddr::V6(
                        (0x2001_0db8_0000_0000_0000_0000_0000_0000 + i * 2).into(),
                    )
                    .into(),
                ),
                verb: Verb::Add,
                timeout_secs: Some(600),
            })
            .collect();

        // The kernel aborts a batch whose end is not in the same datagram: sending one batch
        // in two pieces applies nothing.
        let batch = Batch::encode(&table, &ops[..1000], 1, None).expect("encode");
        let bytes = batch.bytes();
        let sock =
            netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER).expect("socket");
        sock.connect(&netlink_sys::SocketAddr::new(0, 0))
            .expect("connect");
        sock.send(&bytes[..bytes.len() - 20], 0)
            .expect("send all but the end");
        sock.send(&bytes[bytes.len() - 20..], 0)
            .expect("send the end");
        assert!(
            listed_elems(&ns, &table, "blocked6").is_empty(),
            "a split batch applied"
        );

        // 40,000 IPv6 elements (~3 MB) go as one datagram, far over the default send buffer.
        let started = Instant::now();
        let sent = NlBatch::open()
            .expect("socket")
            .apply(&table, &ops, None)
            .expect("40k");
        eprintln!(
            "40,000 IPv6 adds: {} bytes in {} messages, {:?}",
            sent.bytes,
            sent.messages,
            started.elapsed()
        );
        assert!(sent.bytes > 2 * 1024 * 1024, "{sent:?}");
        assert_eq!(listed_elems(&ns, &table, "blocked6").len(), 40_000);
    });
    assert_not_in_host(&table);
}

#[test]
fn without_the_fast_path_everything_goes_through_nft_and_the_stats_say_so() {
    if !require_root("without_the_fast_path_everything_goes_through_nft_and_the_stats_say_so") {
        return;
    }
    let ns = Netns::new("nofast").expect("netns");
    let table = table_name();
    in_netns(&ns, || async {
        let opts = EnforceOptions {
            fast_path: false,
            ..EnforceOptions::default()
        };
        let mut e = Enforcer::init_with(policy(&table, ""), opts)
            .await
            .expect("init");
        let expires = Time::now().saturating_add(Duration::from_secs(600));
        e.apply(desired(
            1,
            vec![
                block("198.18.0.7/32", BlockKind::Block, Some(expires)),
                block("2001:db8:e::/64", BlockKind::Quarantine, None),
            ],
        ))
        .await
        .expect("apply");
        let s = e.stats();
        assert!(s.last_nft_us > 0 && s.last_netlink_us == 0, "{s:?}");
        let b4 = listed_elems(&ns, &table, "blocked4");
        assert_eq!(b4.len(), 1);
        assert_eq!(b4[0].0, "198.18.0.7");
        assert_eq!(b4[0].1, Some(600));
        // The same table, now with the fast path: it takes over where nft left off.
        drop(e);
        let mut e = Enforcer::init(policy(&table, "")).await.expect("restart");
        e.apply(desired(
            2,
            vec![block("198.18.0.8/32", BlockKind::Block, None)],
        ))
        .await
        .expect("apply");
        let s = e.stats();
        assert!(s.last_netlink_us > 0 && s.fast_path_fallbacks == 0, "{s:?}");
        let b4: Vec<String> = listed_elems(&ns, &table, "blocked4")
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(b4, ["198.18.0.8"]);
        assert!(listed_elems(&ns, &table, "quarantine6").is_empty());
    });
}

#[test]
fn the_byte_meters_window_follows_the_tolerance_across_a_reload() {
    if !require_root("the_byte_meters_window_follows_the_tolerance_across_a_reload") {
        return;
    }
    let topo = topology(&[10], &[20]);
    let table = table_name();
    let c = &topo.customers[0];
    let r = &topo.router;
    in_router(&topo, || async {
        // nft's JSON has whole seconds only: the set is written in nft's text syntax, its
        // window twice the tolerance.
        let mut e = Enforcer::init(policy(&table, "")).await.expect("start");
        e.apply(desired(
            1,
            vec![block(&format!("{}/32", c.v4), BlockKind::Block, None)],
        ))
        .await
        .expect("apply");
        for fam in ["4", "6"] {
            let set = set_list(r, &table, &format!("meter_bytes{fam}"));
            assert!(set.contains("timeout 400ms"), "{set}");
            assert!(set.contains("flags dynamic,timeout"), "{set}");
        }
        // A reload with another tolerance: the window is not in the listing's whole
        // seconds, its comment tells; the set is replaced and its rule written again.
        let p2 = policy(&table, "detection:\n  flood_tolerance: 300ms\n");
        e.set_policy(p2).await.expect("reload");
        for fam in ["4", "6"] {
            let set = set_list(r, &table, &format!("meter_bytes{fam}"));
            assert!(set.contains("timeout 600ms"), "{set}");
            assert!(set.contains("byte quota window 600 ms"), "{set}");
        }
        let forward = nft_in(r, &["list", "chain", "inet", &table, "forward"]);
        for fam in ["4", "6"] {
            let rule = forward
                .lines()
                .find(|l| l.contains(&format!("add @meter_bytes{fam}")))
                .unwrap_or_else(|| panic!("no byte meter rule for {fam}:\n{forward}"));
            assert!(rule.contains("quota over"), "{rule}");
        }
        assert!(
            set_list(r, &table, "blocked4").contains(&c.v4.to_string()),
            "the reload lifted the block"
        );
        // In step: nothing left to do.
        e.reconcile().await.expect("reconcile");
        let set = set_list(r, &table, "meter_bytes4");
        assert!(set.contains("timeout 600ms"), "{set}");
        let report = remove_all(
            &RemoveTarget::from_policy(&policy(&table, "")),
            &EnforceOptions::default(),
        )
        .await
        .expect("remove");
        assert!(report.table_removed);
    });
    assert_not_in_host(&table);
}
