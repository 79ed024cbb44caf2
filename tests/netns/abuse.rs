//! Abuse-proofing, each attack run against the real agent, kernel and tools: the circuit
//! breaker tripped by one customer's spoofed scans, operator blocks of the router's own
//! lifelines, protection that
//! would silently lift holds (a walled garden or allow entry over customer space, an
//! address allowlisted after it was held), IPv6 enforcement switched off by the router's own
//! address in the customer /64, a deleted state database, and blackhole routes that outlive
//! their holds.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use egressguard::netns::{Agent, Netns, Topology};
use serde_json::Value as Json;

use crate::common::{agent_bin, require_root, require_tools, wait_for};

const CUST: &str = "203.0.113.10";
const BASE: &str = "version: 1
mode: enforce
networks:
  - prefix: 203.0.113.0/24
  - prefix: 2001:db8:c::/64
";

/// A router with customers .10 and .11 and one internet host .20, the agent running in it.
struct Rig {
    agent: Agent,
    dir: tempfile::TempDir,
    topo: Topology,
}

impl Rig {
    fn new(policy: &str) -> Rig {
        Rig::with_customers(&[10, 11], policy)
    }

    /// The rig with customers `203.0.113.<host>` and the internet host .20.
    fn with_customers(hosts: &[u16], policy: &str) -> Rig {
        let mut topo = Topology::new().expect("topology");
        for h in hosts {
            topo.add_customer(*h).expect("customer");
        }
        topo.add_internet_host(20).expect("internet host");
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = start(&topo.router, dir.path(), policy, &[]);
        Rig { agent, dir, topo }
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.agent.cli(&agent_bin(), args)
    }

    /// Runs a verb that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "egressguard {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Json {
        serde_json::from_str(&self.ok(args)).expect("JSON reply")
    }

    /// The elements of one set of the agent's table, as `nft list set` prints it.
    fn set(&self, name: &str) -> String {
        self.topo
            .router
            .run(&["nft", "list", "set", "inet", "egressguard", name])
            .unwrap_or_default()
    }

    fn policy_path(&self) -> std::path::PathBuf {
        self.dir.path().join("policy.yaml")
    }

    /// Writes `policy` and asks for a reload; the reload's output.
    fn reload(&self, policy: &str) -> Output {
        std::fs::write(self.policy_path(), policy).expect("write policy");
        self.cli(&["reload"])
    }

    /// `egressguard check` run inside the router (so it sees the router's addresses).
    fn check(&self) -> (bool, String) {
        let exe = agent_bin();
        let path = self.policy_path();
        let out = self
            .topo
            .router
            .command(&[
                exe.to_str().expect("utf-8 path"),
                "check",
                "--policy",
                path.to_str().expect("utf-8 path"),
                "--socket",
                "/nonexistent",
            ])
            .output()
            .expect("run check");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    fn restart(&mut self, extra: &[&str]) {
        self.agent.stop(Duration::from_secs(5));
        let policy = std::fs::read_to_string(self.policy_path()).expect("policy");
        self.agent = start(&self.topo.router, self.dir.path(), &policy, extra);
    }
}

fn start(ns: &Netns, dir: &Path, policy: &str, extra: &[&str]) -> Agent {
    let mut a = Agent::start_with_args(Some(ns), &agent_bin(), dir, policy, false, extra)
        .expect("agent starts");
    a.wait_for(&["started"], Duration::from_secs(10))
        .expect("agent started");
    a
}

/// Whether one ping from `from` to `to` (optionally from source address `src`) is answered
/// within a second.
fn pings(from: &Netns, to: &str, src: Option<&str>) -> bool {
    let mut args = vec!["ping", "-c", "1", "-W", "1"];
    if let Some(s) = src {
        args.extend(["-I", s]);
    }
    args.push(to);
    from.succeeds(&args)
}

fn audit_actions(show: &Json) -> Vec<String> {
    show["audit"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["action"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn abuse_protection_changes_never_lift_a_hold() {
    if !require_root("abuse_protection_changes_never_lift_a_hold") {
        return;
    }
    let policy = format!("{BASE}allow:\n  - 203.0.113.1\n");
    let mut rig = Rig::new(&policy);
    let cust = &rig.topo.customers[0].ns;
    assert!(pings(cust, "198.51.100.20", None), "no connectivity before");
    rig.ok(&["block", CUST, "--reason", "abuse ticket 1", "--for", "1h"]);
    wait_for("the block in blocked4", Duration::from_secs(3), || {
        rig.set("blocked4").contains(CUST).then_some(())
    });
    assert!(
        !pings(cust, "198.51.100.20", None),
        "the block does not drop"
    );

    // The attack of the issue: a walled garden over everything, then an allow entry over the
    // customer network. Both are refused, by `check` and by `reload`, naming the line.
    for (bad, line, needle) in [
        (
            format!("{policy}enforcement:\n  walled_garden:\n    - 0.0.0.0/0\n"),
            "policy.yaml:10:",
            "walled_garden[0]",
        ),
        (
            format!("{BASE}allow:\n  - 203.0.113.1\n  - 203.0.0.0/16\n"),
            "policy.yaml:8:",
            "covers the whole customer network 203.0.113.0/24",
        ),
    ] {
        std::fs::write(rig.policy_path(), &bad).expect("write");
        let (ok, text) = rig.check();
        assert!(!ok, "check accepted {bad}: {text}");
        assert!(
            text.contains(line) && text.contains(needle),
            "check does not name {line} {needle}: {text}"
        );
        let out = rig.reload(&bad);
        assert!(!out.status.success(), "reload accepted {bad}");
        assert!(
            rig.set("blocked4").contains(CUST),
            "a refused reload lifted the block"
        );
    }

    // Allowlisting the held address itself suspends the hold: not enforced, still listed,
    // audited; never lifted, also across a restart.
    let allowed = format!("{BASE}allow:\n  - 203.0.113.1\n  - {CUST}\n");
    let out = rig.reload(&allowed);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "the suspended hold out of blocked4",
        Duration::from_secs(3),
        || (!rig.set("blocked4").contains(CUST)).then_some(()),
    );
    let check_suspended = |rig: &Rig| {
        let list = rig.json(&["list", "--json"]);
        assert_eq!(list[0]["target"], "203.0.113.10/32", "{list}");
        assert_eq!(list[0]["suspended"], "allowlisted", "{list}");
        assert!(rig.ok(&["list"]).contains("suspended"), "list text");
        let status = rig.ok(&["status"]);
        assert!(status.contains("1 suspended by protection"), "{status}");
    };
    check_suspended(&rig);
    let show = rig.json(&["show", CUST, "--json"]);
    let actions = audit_actions(&show);
    assert!(
        actions.contains(&"protected_suspend".to_owned()),
        "{actions:?}"
    );
    assert!(
        !actions.contains(&"protected_lift".to_owned()),
        "{actions:?}"
    );
    rig.restart(&[]);
    check_suspended(&rig);
    assert!(!rig.set("blocked4").contains(CUST));

    // Taking the allow entry out enforces the same hold again.
    let out = rig.reload(&policy);
    assert!(out.status.success());
    wait_for("the hold back in blocked4", Duration::from_secs(3), || {
        rig.set("blocked4").contains(CUST).then_some(())
    });
    let cust = &rig.topo.customers[0].ns;
    assert!(!pings(cust, "198.51.100.20", None));
    let actions = audit_actions(&rig.json(&["show", CUST, "--json"]));
    assert!(
        actions.contains(&"protected_resume".to_owned()),
        "{actions:?}"
    );
}

#[test]
fn abuse_ipv6_offender_in_the_routers_64_is_held_with_the_router_excepted() {
    if !require_root("abuse_ipv6_offender_in_the_routers_64_is_held_with_the_router_excepted") {
        return;
    }
    require_tools("nmap", &["nmap"]);
    // The router's own 2001:db8:c::1 is in the customer /64 (the usual case); nothing in the
    // policy mentions it.
    let rig = Rig::new(BASE);
    let (ok, text) = rig.check();
    assert!(ok, "{text}");
    assert!(
        text.contains("this router's own 2001:db8:c::1/128") && text.contains("policy.yaml:5:"),
        "check does not warn about the held /64 holding the router's address: {text}"
    );
    let cust = &rig.topo.customers[0].ns;
    assert!(pings(cust, "2001:db8:1::14", None));
    // A real scan over IPv6 from 2001:db8:c::a: 300 ports, bounded in time.
    cust.run(&[
        "timeout",
        "40",
        "nmap",
        "-6",
        "-Pn",
        "-n",
        "--max-retries",
        "0",
        "-sS",
        "-T4",
        "-p",
        "1-300",
        "2001:db8:1::14",
    ])
    .expect("nmap");
    wait_for("the /64 held", Duration::from_secs(15), || {
        rig.set("quarantine6")
            .contains("2001:db8:c::/64")
            .then_some(())
    });
    assert!(
        rig.set("allow6").contains("2001:db8:c::1"),
        "the router's address is not excepted: {}",
        rig.set("allow6")
    );
    // The offender is cut off; the router's own address in that /64 still works.
    assert!(
        !pings(cust, "2001:db8:1::14", None),
        "the hold does not drop"
    );
    assert!(
        pings(&rig.topo.router, "2001:db8:1::14", Some("2001:db8:c::1")),
        "the router's own address in the held /64 lost its traffic"
    );
    let list = rig.json(&["list", "--json"]);
    assert_eq!(list[0]["target"], "2001:db8:c::/64", "{list}");
    let status = rig.ok(&["status"]);
    assert!(
        status.contains("1 holds contain protected addresses")
            && status.contains("this router only"),
        "status does not say the hold is local-only: {status}"
    );
}

#[test]
fn abuse_deleted_state_database_does_not_lift_the_blocks() {
    if !require_root("abuse_deleted_state_database_does_not_lift_the_blocks") {
        return;
    }
    let mut rig = Rig::new(BASE);
    rig.ok(&["block", CUST, "--reason", "abuse ticket 2", "--for", "1h"]);
    wait_for("the block in blocked4", Duration::from_secs(3), || {
        rig.set("blocked4").contains(CUST).then_some(())
    });
    rig.agent.stop(Duration::from_secs(5));
    for f in ["state.db", "state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(rig.dir.path().join(f));
    }
    // Started again on the lost database: it refuses, says what to do, and the kernel keeps
    // the block.
    let policy = std::fs::read_to_string(rig.policy_path()).expect("policy");
    let mut agent = Agent::start(
        Some(&rig.topo.router),
        &agent_bin(),
        rig.dir.path(),
        &policy,
        false,
    )
    .expect("spawn");
    let line = agent
        .wait_for(&["--fresh-state"], Duration::from_secs(10))
        .expect("the refusal names --fresh-state");
    assert!(
        line.contains("state.db") && line.contains("1 blocked"),
        "{line}"
    );
    let status = agent.stop(Duration::from_secs(5));
    assert_ne!(status.and_then(|s| s.code()), Some(0), "it started anyway");
    assert!(
        rig.set("blocked4").contains(CUST),
        "the refused start lifted the block"
    );

    // With --fresh-state the operator drops them on purpose, audited; the next start is
    // ordinary.
    rig.agent = start(
        &rig.topo.router,
        rig.dir.path(),
        &policy,
        &["--fresh-state"],
    );
    wait_for("the table emptied", Duration::from_secs(3), || {
        (!rig.set("blocked4").contains(CUST)).then_some(())
    });
    rig.restart(&[]);
    rig.agent.stop(Duration::from_secs(5));
    let store = egressguard::state::Store::open(&rig.dir.path().join("state.db")).expect("db");
    let audit = store.audit(None, 100).expect("audit");
    assert!(
        audit
            .iter()
            .any(|a| a.entry.action == "fresh_state" && a.entry.reason.contains("1 address")),
        "no audit entry for --fresh-state: {audit:#?}"
    );
}

/// The agent's blackhole routes (protocol 201) in the router, v4 and v6.
fn routes(rig: &Rig) -> String {
    let r = &rig.topo.router;
    r.run(&["ip", "route", "show", "type", "blackhole", "proto", "201"])
        .unwrap_or_default()
        + &r.run(&[
            "ip",
            "-6",
            "route",
            "show",
            "type",
            "blackhole",
            "proto",
            "201",
        ])
        .unwrap_or_default()
}

#[test]
fn abuse_blackhole_routes_never_outlive_their_holds() {
    if !require_root("abuse_blackhole_routes_never_outlive_their_holds") {
        return;
    }
    // Blackholing off (the default): a block and a restart install no route, and a stale
    // route of the agent's protocol (an older configuration's) is removed at start.
    let mut rig = Rig::new(BASE);
    rig.ok(&["block", CUST, "--reason", "r", "--for", "1h"]);
    wait_for("the block in blocked4", Duration::from_secs(3), || {
        rig.set("blocked4").contains(CUST).then_some(())
    });
    rig.topo
        .router
        .run(&[
            "ip",
            "route",
            "add",
            "blackhole",
            "203.0.113.99/32",
            "proto",
            "201",
        ])
        .expect("stale route");
    rig.restart(&[]);
    wait_for(
        "no agent route with blackholing off",
        Duration::from_secs(3),
        || routes(&rig).trim().is_empty().then_some(()),
    );
    assert!(rig.set("blocked4").contains(CUST));
    rig.ok(&["unblock", CUST, "--ticket", "T-1"]);

    // Blackholing on: a hold for 2 s and one for an hour each get a route. The agent
    // is down when the first expires: at start its route goes, the other stays.
    let on = format!("{BASE}enforcement:\n  blackhole:\n    enabled: true\n");
    assert!(rig.reload(&on).status.success());
    rig.ok(&["block", CUST, "--reason", "r", "--for", "2s"]);
    rig.ok(&["block", "203.0.113.11", "--reason", "r", "--for", "1h"]);
    wait_for("both routes", Duration::from_secs(3), || {
        let r = routes(&rig);
        (r.contains("203.0.113.10") && r.contains("203.0.113.11")).then_some(())
    });
    rig.agent.stop(Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(3));
    rig.agent = start(&rig.topo.router, rig.dir.path(), &on, &[]);
    // The start may pass through an empty table (stop withdraws nothing, but the start
    // reconciles): wait for the live hold's route, then the expired one must be gone.
    wait_for(
        "the live hold's route back and the expired one's removed",
        Duration::from_secs(3),
        || {
            let r = routes(&rig);
            (r.contains("203.0.113.11") && !r.contains("203.0.113.10")).then_some(())
        },
    );
    rig.agent.drain();
    let log = rig.agent.log();
    assert!(
        !log.lines()
            .any(|l| l.contains("route removed") && l.contains("203.0.113.11")),
        "the live hold's route was withdrawn at start:\n{log}"
    );
    // An unblock removes its route.
    rig.ok(&["unblock", "203.0.113.11", "--ticket", "T-2"]);
    wait_for(
        "the unblocked route removed",
        Duration::from_secs(3),
        || routes(&rig).trim().is_empty().then_some(()),
    );
}

#[test]
fn abuse_one_customer_cannot_trip_the_breaker_for_the_others() {
    if !require_root("abuse_one_customer_cannot_trip_the_breaker_for_the_others") {
        return;
    }
    require_tools("nmap", &["nmap"]);
    let hooks = tempfile::tempdir().expect("hooks dir");
    let policy = format!(
        "version: 1
mode: enforce
networks:
  - prefix: 203.0.113.0/25
    name: pool-a
  - prefix: 203.0.113.128/25
    name: pool-b
allow:
  - 203.0.113.1
profiles:
  default:
    port_scan:
      distinct_ports: 20
      min_unanswered_ratio: 0.0
circuit_breaker:
  max_new_blocks_per_minute: 3
  cool_down: 10m
notify:
  command: [/bin/sh, -c, 'cat > \"$0/n-$(date +%s%N)-$$.json\"', {hooks}]
metrics:
  listen: 127.0.0.1:9475
",
        hooks = hooks.path().display()
    );
    let rig = Rig::with_customers(&[10, 200], &policy);
    let spoofer = &rig.topo.customers[0].ns;
    // The attack: scans in the names of six neighbours of pool-a, from one customer.
    for i in 0..6 {
        let src = format!("203.0.113.{}", 30 + i);
        forged_scan(spoofer, &src, 40);
    }
    wait_for("pool-a's breaker tripped", Duration::from_secs(15), || {
        let s = rig.json(&["status", "--json"]);
        s["breaker"]["networks"]
            .as_array()?
            .iter()
            .any(|n| n["network"] == "203.0.113.0/25" && n["state"] == "tripped")
            .then_some(())
    });
    // pool-b is untouched: its real scanner is held at once.
    let real = &rig.topo.customers[1].ns;
    real.run(&[
        "timeout",
        "20",
        "nmap",
        "-Pn",
        "-n",
        "--max-retries",
        "0",
        "-sS",
        "-T5",
        "-p",
        "1-40",
        "198.51.100.20",
    ])
    .expect("nmap");
    wait_for("pool-b's scanner held", Duration::from_secs(10), || {
        rig.set("quarantine4")
            .contains("203.0.113.200")
            .then_some(())
    });
    let s = rig.json(&["status", "--json"]);
    let b = s["breaker"]["networks"]
        .as_array()
        .expect("networks")
        .iter()
        .find(|n| n["network"] == "203.0.113.128/25")
        .cloned()
        .expect("pool-b breaker");
    assert_eq!(b["state"], "armed", "{s}");
    // The trip is in the metrics and went to the notify hook.
    let scrape = "exec 3<>/dev/tcp/127.0.0.1/9475; \
                  printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3; timeout 5 cat <&3";
    let metrics = rig
        .topo
        .router
        .run(&["bash", "-c", scrape])
        .expect("scrape");
    assert!(
        metrics.contains("egressguard_breaker_network_tripped{network=\"203.0.113.0/25\"} 1")
            && metrics
                .contains("egressguard_breaker_network_tripped{network=\"203.0.113.128/25\"} 0"),
        "{metrics}"
    );
    wait_for(
        "the breaker_tripped notification",
        Duration::from_secs(10),
        || {
            std::fs::read_dir(hooks.path())
                .ok()?
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .any(|t| t.contains("\"breaker_tripped\"") && t.contains("203.0.113.0/25"))
                .then_some(())
        },
    );
    // An operator re-arms it by name.
    let out = rig.ok(&["breaker", "reset", "pool-a"]);
    assert!(out.contains("re-armed for 203.0.113.0/25"), "{out}");
    let s = rig.json(&["status", "--json"]);
    assert_eq!(s["breaker"]["tripped"], false, "{s}");
}

#[test]
fn abuse_operator_block_of_the_routers_lifelines_is_refused() {
    if !require_root("abuse_operator_block_of_the_routers_lifelines_is_refused") {
        return;
    }
    let rig = Rig::new(BASE);
    // A next hop toward outside the customer networks, learnt on reload.
    rig.topo
        .router
        .run(&["ip", "route", "add", "192.0.2.0/24", "via", "198.51.100.20"])
        .expect("route");
    assert!(rig.reload(BASE).status.success());
    for (target, why) in [
        ("::1", "loopback"),
        ("127.0.0.2", "loopback"),
        ("fe80::1", "link-local"),
        ("224.0.0.5", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("255.255.255.255", "broadcast"),
        ("203.0.113.255", "broadcast"),
        ("8.8.8.8", "outside"),
    ] {
        let out = rig.cli(&["block", target, "--reason", "r", "--for", "1h"]);
        let text = String::from_utf8_lossy(&out.stderr).to_lowercase()
            + &String::from_utf8_lossy(&out.stdout).to_lowercase();
        assert_eq!(out.status.code(), Some(4), "{target} accepted: {text}");
        assert!(
            text.contains(why),
            "{target}: the refusal does not say {why}: {text}"
        );
    }
    for (target, why) in [
        ("198.51.100.20", "next hop"),
        ("127.0.0.0/8", "loopback"),
        ("0.0.0.0/0", "loopback"),
    ] {
        let out = rig.cli(&[
            "block",
            target,
            "--reason",
            "r",
            "--for",
            "1h",
            "--outside-networks",
        ]);
        let text = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert_eq!(
            out.status.code(),
            Some(4),
            "{target} accepted with --outside-networks"
        );
        assert!(text.contains(why), "{target}: {text}");
    }
    // An outside attacker's address with the flag is accepted; nothing protected is in a set.
    rig.ok(&[
        "block",
        "8.8.8.8",
        "--reason",
        "attacker",
        "--for",
        "1h",
        "--outside-networks",
    ]);
    wait_for("8.8.8.8 in blocked4", Duration::from_secs(3), || {
        rig.set("blocked4").contains("8.8.8.8").then_some(())
    });
    let sets = rig.set("blocked4") + &rig.set("blocked6");
    for never in [
        "127.0.0",
        "224.0.0.5",
        "0.0.0.0",
        "fe80::",
        "::1",
        "198.51.100.20",
    ] {
        assert!(!sets.contains(never), "{never} in the sets: {sets}");
    }
    assert!(
        pings(&rig.topo.router, "127.0.0.1", None),
        "the router lost loopback"
    );
    assert!(pings(&rig.topo.customers[0].ns, "198.51.100.20", None));
}

/// BIRD as a route reflector in an upstream namespace, announcing `flows` (BIRD `route flow4
/// ...;` lines, each given traffic-rate 0, i.e. discard) to the agent.
fn reflector_conf(flows: &[String]) -> String {
    let mut statics = String::new();
    for f in flows {
        statics.push_str(&format!(
            "  route {f} {{ bgp_ext_community.add((generic, 0x80060000, 0x0)); }};\n"
        ));
    }
    format!(
        r#"router id 192.0.2.2;
log "{{log}}" all;
flow4 table flowtab4;
flow6 table flowtab6;
protocol device {{ }}
protocol static flows {{
  flow4 {{ table flowtab4; }};
{statics}}}
protocol bgp rr1 {{
  local 192.0.2.2 as 64500;
  neighbor 192.0.2.1 as 64500;
  passive on;
  hold time 9;
  flow4 {{ table flowtab4; import none; export all; }};
  flow6 {{ table flowtab6; import none; export all; }};
}}
"#
    )
}

/// Counts the echo requests from `from` that reach `ns` (an nft counter in its own input
/// hook); returns a reader of the count.
fn count_echo_requests<'a>(ns: &'a Netns, from: &str) -> impl Fn() -> u64 + 'a {
    for cmd in [
        "add table ip probe".to_owned(),
        "add chain ip probe in { type filter hook input priority 0; }".to_owned(),
        format!("add rule ip probe in ip saddr {from} icmp type echo-request counter"),
    ] {
        let mut args = vec!["nft"];
        args.extend(cmd.split(' '));
        ns.run(&args).expect("probe counter");
    }
    move || {
        let out = ns
            .run(&["nft", "list", "chain", "ip", "probe", "in"])
            .unwrap_or_default();
        out.split("packets ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

/// The issue's attack: a trusted peer (`accept_flowspec`) announces `source 32.0.0.0/3 then
/// discard` and other rules outside what the agent would hold itself. Only the plain discard
/// of one customer address is enforced, as a source-only drop; the others are refused and
/// counted by reason, with bounded memory; the per-peer cap holds; `list` and `status` show
/// it all; a withdrawal lifts the drop.
#[test]
fn abuse_learnt_flowspec_is_bounded_and_source_only() {
    if !require_root("abuse_learnt_flowspec_is_bounded_and_source_only") {
        return;
    }
    let mut topo = Topology::new().expect("topology");
    for h in [10, 11] {
        topo.add_customer(h).expect("customer");
    }
    topo.add_internet_host(20).expect("internet host");
    let upstream = Netns::new("upstream").expect("upstream ns");
    egressguard::netns::veth(&topo.router, "up0", &upstream, "eth0").expect("veth");
    egressguard::netns::addr(&topo.router, "up0", "192.0.2.1/26").expect("addr");
    egressguard::netns::addr(&upstream, "eth0", "192.0.2.2/26").expect("addr");
    let mut flows: Vec<String> = [
        "32.0.0.0/3",       // the issue's quarter of IPv4 (an eighth, strictly)
        "203.0.113.0/24",   // the whole customer network: wider than a block
        "198.51.100.20/32", // the internet host: outside the networks
        "203.0.113.1/32",   // the router's own address: protected
        "203.0.113.10/32",  // one customer: enforced
    ]
    .iter()
    .map(|s| format!("flow4 {{ src {s}; }}"))
    .collect();
    flows.push("flow4 { dst 203.0.113.11/32; }".into()); // no source: untranslatable
    let bird = crate::bird::Bird::start_with(&upstream, &reflector_conf(&flows));
    let policy = format!(
        "{BASE}bgp:
  local_as: 64500
  router_id: 192.0.2.1
  peers:
    - name: rr1
      address: 192.0.2.2
      remote_as: 64500
      hold_time: 9
      families: [ipv4-flowspec, ipv6-flowspec]
      announce: [flowspec]
      accept_flowspec: true
      max_learned: 3
"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = start(&topo.router, dir.path(), &policy, &[]);
    let rig = Rig { agent, dir, topo };
    let peer = |rig: &Rig| rig.json(&["status", "--json"])["bgp"][0].clone();
    wait_for(
        "the learnt rule in learnt4",
        Duration::from_secs(30),
        || rig.set("learnt4").contains(CUST).then_some(()),
    );
    let p = wait_for("every refusal counted", Duration::from_secs(10), || {
        let p = peer(&rig);
        (p["learned_refused"].as_u64() >= Some(4)).then_some(p)
    });
    let by = &p["learned_refused_by"];
    assert_eq!(by["too_wide"], 2, "{p}");
    assert_eq!(by["outside_networks"], 1, "{p}");
    assert_eq!(by["untranslatable"], 1, "{p}");
    assert_eq!(
        p["learned"], 2,
        "the customer and the router's address are kept: {p}"
    );

    // Nothing but the one customer address reaches any drop or guard set of the table.
    for set in ["blocked4", "quarantine4", "learnt4", "allow4"] {
        let elems = rig.set(set);
        for never in [
            "32.0.0.0",
            "198.51.100.20",
            "203.0.113.0/24",
            "203.0.113.1 ",
        ] {
            assert!(!elems.contains(never), "{never} is in {set}:\n{elems}");
        }
    }
    assert!(
        !rig.set("blocked4").contains(CUST),
        "a learnt rule is a hold"
    );

    // Source only: the customer sends nothing, but still receives; its neighbour and the
    // internet host the peer tried to block are untouched.
    let cust = &rig.topo.customers[0].ns;
    let neighbour = &rig.topo.customers[1].ns;
    let internet = &rig.topo.internet[0].ns;
    let arrived = count_echo_requests(cust, "198.51.100.20");
    assert!(
        !pings(cust, "198.51.100.20", None),
        "the learnt rule does not drop"
    );
    assert!(
        !pings(internet, CUST, None),
        "the customer's replies get out"
    );
    assert!(arrived() >= 1, "traffic to the customer is dropped too");
    assert!(
        pings(neighbour, "198.51.100.20", None),
        "the neighbour is cut off"
    );
    assert!(
        pings(internet, "203.0.113.11", None),
        "the internet host is cut off"
    );

    // `status` and `list` show the rules, enforced or not and why.
    let status = rig.json(&["status", "--json"]);
    let learnt = status["learnt"].as_array().expect("learnt").clone();
    let find = |src: &str| {
        learnt
            .iter()
            .find(|l| l["source"] == src)
            .unwrap_or_else(|| panic!("{src} not in status.learnt: {learnt:?}"))
    };
    assert_eq!(find("203.0.113.10/32")["enforced"], true);
    assert_eq!(find("203.0.113.1/32")["enforced"], false);
    assert!(
        find("203.0.113.1/32")["refused"]
            .as_str()
            .is_some_and(|r| r.contains("protected")),
        "{learnt:?}"
    );
    let list = rig.ok(&["list"]);
    assert!(
        list.lines().any(|l| l.contains("203.0.113.10/32")
            && l.contains("rr1")
            && l.contains("source only")),
        "list does not show the learnt rule:\n{list}"
    );
    let human = rig.ok(&["status"]);
    assert!(human.contains("2 learnt, 1 enforced; 4 refused"), "{human}");

    // The cap: two more customer rules, one slot left (max_learned 3). And 300 refused
    // rules cost the agent nothing but counters: the last eight are kept.
    flows.push("flow4 { src 203.0.113.50/32; }".into());
    flows.push("flow4 { src 203.0.113.51/32; }".into());
    for i in 0..300 {
        flows.push(format!(
            "flow4 {{ src 100.64.{}.{}/32; }}",
            i / 200,
            i % 200
        ));
    }
    bird.reconfigure(&reflector_conf(&flows));
    let p = wait_for(
        "the cap and the flood counted",
        Duration::from_secs(20),
        || {
            let p = peer(&rig);
            (p["learned_refused"].as_u64() >= Some(305)).then_some(p)
        },
    );
    assert_eq!(p["learned_refused_by"]["peer_cap"], 1, "{p}");
    assert_eq!(p["learned_refused_by"]["outside_networks"], 301, "{p}");
    assert_eq!(p["learned"], 3, "{p}");
    assert_eq!(
        p["recent_refusals"].as_array().map(Vec::len),
        Some(8),
        "{p}"
    );
    // The counters come from the session; the set follows once the agent has applied it.
    let learnt4 = wait_for("the new rule in learnt4", Duration::from_secs(10), || {
        let l = rig.set("learnt4");
        (l.contains("203.0.113.50") || l.contains("203.0.113.51")).then_some(l)
    });
    let extra = ["203.0.113.50", "203.0.113.51"]
        .iter()
        .filter(|a| learnt4.contains(*a))
        .count();
    assert_eq!(extra, 1, "the cap did not hold: {learnt4}");
    assert!(
        learnt4.contains(CUST),
        "a rule in force was displaced: {learnt4}"
    );

    // The peer withdraws the customer's rule: the drop is lifted at once.
    flows.retain(|f| !f.contains("203.0.113.10/32"));
    bird.reconfigure(&reflector_conf(&flows));
    wait_for("the withdrawn rule lifted", Duration::from_secs(10), || {
        (!rig.set("learnt4").contains(CUST)).then_some(())
    });
    assert!(
        pings(cust, "198.51.100.20", None),
        "the customer is still cut off"
    );
}

/// SYNs to 300 successive ports of the internet host .20 from `ns`, written with `forged`
/// as the source (a port scan in the neighbour's name).
/// A SYN scan (ports 1, 2, ...) of 198.51.100.20 in the name of `forged`, `count` probes 2 ms
/// apart, bounded by a 20 s timeout.
fn forged_scan(ns: &Netns, forged: &str, count: u32) {
    let count = count.to_string();
    let out = ns
        .command(&[
            "timeout",
            "20",
            "hping3",
            "-S",
            "-a",
            forged,
            "-p",
            "++1",
            "-c",
            &count,
            "-i",
            "u2000",
            "198.51.100.20",
        ])
        .output()
        .expect("hping3");
    assert!(!out.stderr.is_empty(), "hping3 did not run");
}

#[test]
fn abuse_spoofing_a_neighbour_holds_the_spoofer_never_the_neighbour() {
    if !require_root("abuse_spoofing_a_neighbour_holds_the_spoofer_never_the_neighbour") {
        return;
    }
    require_tools("spoofing test", &["hping3"]);
    // Both customers share the router's bridge; a scan of 20 ports is enough to be held.
    let policy = format!(
        "{BASE}allow:\n  - 203.0.113.1\nprofiles:\n  default:\n    port_scan:\n      distinct_ports: 20\n      min_unanswered_ratio: 0.0\n"
    );
    let mut rig = Rig::new(&policy);
    let spoofer = &rig.topo.customers[0].ns;
    let neighbour = &rig.topo.customers[1].ns;
    // The internet host counts what reaches it in the neighbour's name.
    let inet = &rig.topo.internet[0].ns;
    inet.run(&["nft", "add table inet probe"])
        .expect("probe table");
    inet.run(&[
        "nft",
        "add chain inet probe input { type filter hook input priority 0; }",
    ])
    .expect("probe chain");
    inet.run(&[
        "nft",
        "add rule inet probe input ip saddr 203.0.113.11 tcp flags syn counter",
    ])
    .expect("probe rule");

    // Both servers talk: the router's neighbour table binds each address to its MAC.
    assert!(pings(spoofer, "198.51.100.20", None));
    assert!(pings(neighbour, "198.51.100.20", None));
    wait_for("both bindings learnt", Duration::from_secs(5), || {
        let b = bind(&rig);
        (b.contains("203.0.113.10 . ") && b.contains("203.0.113.11 . ")).then_some(())
    });

    // The attack: a port scan in the neighbour's name.
    forged_scan(spoofer, "203.0.113.11", 300);
    wait_for("the spoofer held", Duration::from_secs(10), || {
        rig.set("quarantine4")
            .contains("203.0.113.10")
            .then_some(())
    });
    let list = rig.json(&["list", "--json"]);
    let held: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|h| h["target"].as_str())
        .collect();
    assert_eq!(held, ["203.0.113.10/32"], "{list}");
    let show = rig.json(&["show", "203.0.113.10", "--json"]);
    let text = show.to_string();
    assert!(text.contains("\"spoofing\""), "category: {show}");
    assert!(
        text.contains("spoofed_sources") && text.contains("203.0.113.11"),
        "evidence names the forged source: {show}"
    );
    // Not one forged SYN left the router, and the spoofed set counted them.
    assert_eq!(
        forged_arrived(&rig.topo.internet[0].ns),
        0,
        "forged packets reached the internet"
    );
    let spoofed = rig
        .topo
        .router
        .run(&[
            "nft",
            "list",
            "set",
            "inet",
            "egressguard_spoof",
            "spoofed4",
        ])
        .unwrap_or_default();
    assert!(
        spoofed.contains(". 203.0.113.11 counter packets"),
        "{spoofed}"
    );
    wait_for(
        "status counts the forged packets",
        Duration::from_secs(5),
        || {
            let a = rig.json(&["status", "--json"])["anti_spoofing"].clone();
            (a["enabled"] == true
                && a["bindings"].as_u64()? >= 2
                && a["forged_packets"].as_u64()? >= 300
                && a["detections"].as_u64()? >= 1)
                .then_some(())
        },
    );
    assert!(rig.ok(&["status"]).contains("forged packets dropped"));
    rig.agent.drain();
    assert!(
        !rig.agent.log().contains("cannot bind the NFLOG group"),
        "the drop counters are read on NFLOG, not by listing every tick:\n{}",
        rig.agent.log()
    );
    // The neighbour is never held and its traffic never fails.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!rig.set("quarantine4").contains("203.0.113.11"));
    assert!(!rig.set("blocked4").contains("203.0.113.11"));
    assert!(
        !rig.ok(&["list"]).contains("203.0.113.11"),
        "the neighbour is listed"
    );
    assert!(
        pings(neighbour, "198.51.100.20", None),
        "the neighbour lost its traffic"
    );

    // The table deleted by hand is back, bindings and all, within seconds.
    rig.topo
        .router
        .run(&["nft", "delete", "table", "inet", "egressguard_spoof"])
        .expect("delete the spoof table");
    wait_for("the spoof table back", Duration::from_secs(6), || {
        let b = bind(&rig);
        (b.contains("203.0.113.10 . ") && b.contains("203.0.113.11 . ")).then_some(())
    });

    // A restart keeps the learnt bindings (from the kernel's table): the attack fails again
    // at once, before the neighbour table has been read.
    rig.ok(&["unblock", CUST, "--ticket", "T-1"]);
    rig.restart(&[]);
    forged_scan(&rig.topo.customers[0].ns, "203.0.113.11", 300);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        forged_arrived(&rig.topo.internet[0].ns),
        0,
        "forged packets reached the internet after a restart"
    );
    assert!(!rig.ok(&["list"]).contains("203.0.113.11"));

    // Control: with anti-spoofing off the same attack gets the neighbour held — the attack
    // above was real — and the table is gone.
    let off = format!("{policy}anti_spoofing:\n  enabled: false\n");
    let r = rig.reload(&off);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    wait_for("the spoof table removed", Duration::from_secs(5), || {
        bind(&rig).is_empty().then_some(())
    });
    forged_scan(&rig.topo.customers[0].ns, "203.0.113.11", 300);
    wait_for("the framed neighbour held", Duration::from_secs(10), || {
        rig.set("quarantine4")
            .contains("203.0.113.11")
            .then_some(())
    });
    rig.agent.drain();
}

/// How many forged SYNs (source .11) the internet host's probe counter saw.
fn forged_arrived(inet: &Netns) -> u64 {
    let r = inet
        .run(&["nft", "list", "chain", "inet", "probe", "input"])
        .unwrap_or_default();
    r.split("packets ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(u64::MAX)
}

/// The bindings of the agent's anti-spoofing table.
fn bind(rig: &Rig) -> String {
    rig.topo
        .router
        .run(&["nft", "list", "set", "inet", "egressguard_spoof", "bind4"])
        .unwrap_or_default()
}
