//! The real `egressguard run` process against real BIRD 2 and GoBGP daemons: the agent runs in
//! the router namespace of a [`Topology`], the BGP daemon in an "upstream" namespace joined to
//! it by a veth (router 192.0.2.1, upstream 192.0.2.2). What an operator checks from the
//! upstream's side: an operator block (`egressguard block`) is announced as `operator_blocks:`
//! says, with the peer's `flowspec_communities` on the flowspec routes and its
//! `rtbh_communities` on the RTBH routes, and `unblock` withdraws both; a quarantine rung with
//! `announce: false` is enforced here and never announced, its escalation to a block rung is;
//! graceful restart (RFC 4724, RFC 9494) keeps the routes at the peer, as stale, across the
//! agent's `kill -9` and SIGTERM, refreshes them after the restart and flushes a hold that
//! expired while the agent was down. `bgp_agent_bench_bird` (ignored) measures block → route
//! and 10,000 operator blocks → BIRD (docs/performance.md).
//!
//! Traffic stays inside the namespaces; every generator is bounded by `timeout`.

use std::time::{Duration, Instant};

use egressguard::netns::{Agent, Netns, Topology, addr, veth};

use crate::bgp::{AGENT_V4, GOBGP_API, PEER_V4, bird_conf, gobgp_rib, gobgpd_conf};
use crate::bird::Bird;
use crate::common::{agent_bin, require_root, require_tools, wait_for};

/// The standard test topology plus an upstream namespace on the router's `up0`.
struct Rig {
    /// Declared first: the agent stops before the namespaces go.
    agent: Option<Agent>,
    dir: tempfile::TempDir,
    policy: String,
    upstream: Netns,
    topo: Topology,
}

/// The agent's policy: enforce, the customer networks, one peer at the upstream taking every
/// family, flowspec and RTBH, with communities for both. `top` is YAML merged at the top
/// level, `bgp` lines inside `bgp:` (two spaces in).
fn agent_policy(top: &str, bgp: &str) -> String {
    format!(
        r#"version: 1
mode: enforce
networks:
  - prefix: 203.0.113.0/24
  - prefix: 2001:db8:c::/48
  - prefix: 198.18.0.0/15
{top}
bgp:
  local_as: 65001
  router_id: {AGENT_V4}
{bgp}
  peers:
    - name: up
      address: {PEER_V4}
      remote_as: 65002
      hold_time: 9
      families: [ipv4-unicast, ipv6-unicast, ipv4-flowspec, ipv6-flowspec]
      announce: [flowspec, rtbh]
      rtbh_next_hop_v4: 192.0.2.66
      rtbh_next_hop_v6: 2001:db8:b::66
      rtbh_communities: ["65001:666", "65001:1:2"]
      flowspec_communities: ["65001:100", "65001:7:8"]
"#
    )
}

impl Rig {
    /// The namespaces (customer 10; internet hosts 21, a scan target, and 80, the walled
    /// garden), no agent yet: start the BGP daemon first, then [`Rig::start`].
    fn new(policy: String) -> Rig {
        let mut topo = Topology::new().expect("topology");
        topo.add_customer(10).expect("customer");
        topo.add_internet_host(21).expect("internet host");
        topo.add_internet_host(80).expect("internet host");
        let upstream = Netns::new("bgpaup").expect("upstream ns");
        veth(&topo.router, "up0", &upstream, "agent0").expect("veth");
        addr(&topo.router, "up0", "192.0.2.1/24").expect("addr");
        addr(&topo.router, "up0", "2001:db8:b::1/64").expect("addr");
        addr(&upstream, "agent0", "192.0.2.2/24").expect("addr");
        addr(&upstream, "agent0", "2001:db8:b::2/64").expect("addr");
        Rig {
            agent: None,
            dir: tempfile::tempdir().expect("tempdir"),
            policy,
            upstream,
            topo,
        }
    }

    /// Starts (or starts again, on the same state directory) the agent.
    fn start(&mut self) {
        let mut a = Agent::start(
            Some(&self.topo.router),
            &agent_bin(),
            self.dir.path(),
            &self.policy,
            false,
        )
        .expect("agent starts");
        a.wait_for(&["started"], Duration::from_secs(15))
            .expect("agent started");
        self.agent = Some(a);
    }

    fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("agent running")
    }

    /// `egressguard ARGS` against the agent; panics with its stderr when it fails.
    fn cli(&mut self, args: &[&str]) -> String {
        let out = self.agent().cli(&agent_bin(), args);
        if !out.status.success() {
            self.agent().drain();
            panic!(
                "egressguard {args:?} failed: {}\nagent log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.agent().log()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn block(&mut self, target: &str, dur: &str) {
        self.cli(&["block", target, "--reason", "e2e test", "--for", dur]);
    }

    fn unblock(&mut self, target: &str) {
        self.cli(&["unblock", target, "--ticket", "E2E-1"]);
    }

    /// The elements of one set of the agent's table, as `nft list` prints them.
    fn set(&self, name: &str) -> String {
        self.topo
            .router
            .run(&["nft", "list", "set", "inet", "egressguard", name])
            .unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// BIRD
// ---------------------------------------------------------------------------------------------

/// BIRD at the upstream, passive, importing every family of the agent's session.
fn bird(rig: &Rig) -> Bird {
    bird_conf(&rig.upstream, 65002, "", PEER_V4, AGENT_V4, "passive on;")
}

/// The rig with BIRD at the upstream and the agent running `policy`, their session
/// Established.
fn bird_rig(policy: String) -> (Rig, Bird) {
    let mut rig = Rig::new(policy);
    let b = bird(&rig);
    rig.start();
    wait_established(&b, "session with BIRD");
    (rig, b)
}

/// Waits until BIRD's session with the agent is Established.
fn wait_established(b: &Bird, what: &str) {
    wait_for(what, Duration::from_secs(30), || {
        b.birdc("show protocols agent")
            .contains("Established")
            .then_some(())
    });
}

/// `birdc show route table TABLE all`.
fn bird_table(b: &Bird, table: &str) -> String {
    b.birdc(&format!("show route table {table} all"))
}

/// The lines of the route whose first line contains `needle` in a `show route ... all`
/// listing (its first line and the indented attribute lines after it); `None` when absent.
fn route_entry(listing: &str, needle: &str) -> Option<String> {
    let mut lines = listing.lines().skip_while(|l| !l.contains(needle));
    let first = lines.next()?;
    let mut out = String::from(first);
    for l in lines.take_while(|l| l.starts_with([' ', '\t'])) {
        out.push('\n');
        out.push_str(l);
    }
    Some(out)
}

/// Waits for the route `needle` in BIRD's `table` and returns its entry.
fn bird_route(b: &Bird, table: &str, needle: &str) -> String {
    wait_for(
        &format!("{needle} in BIRD's {table}"),
        Duration::from_secs(15),
        || route_entry(&bird_table(b, table), needle),
    )
}

/// Waits until no route of BIRD's `table` contains `needle`.
fn bird_gone(b: &Bird, table: &str, needle: &str) {
    wait_for(
        &format!("{needle} gone from BIRD's {table}"),
        Duration::from_secs(15),
        || (!bird_table(b, table).contains(needle)).then_some(()),
    );
}

/// Asserts that `entry` carries every one of `want`.
fn assert_carries(entry: &str, want: &[&str]) {
    for w in want {
        assert!(entry.contains(w), "route lacks {w}:\n{entry}");
    }
}

/// The communities of the peer's flowspec routes as BIRD shows them: standard and large.
const FLOW_COMMUNITIES: [&str; 2] = ["(65001,100)", "(65001, 7, 8)"];
/// RTBH: BLACKHOLE, NO_EXPORT, the peer's standard and large community, the discard next hop.
const RTBH_V4: [&str; 5] = [
    "(65535,666)",
    "(65535,65281)",
    "(65001,666)",
    "(65001, 1, 2)",
    "192.0.2.66",
];
/// traffic-rate 0 (discard) with our AS 65001 (0xfde9).
const DISCARD: &str = "(generic, 0x8006fde9, 0x0)";

const FLOW_V4: &str = "flow4 { src 203.0.113.7/32; }";
const FLOW_V6: &str = "flow6 { src 2001:db8:c:5::/64; }";

#[test]
fn bgp_agent_bird_operator_block_announced_and_withdrawn() {
    if !require_root("bgp_agent_bird_operator_block_announced_and_withdrawn") {
        return;
    }
    // No `operator_blocks:`: an operator block announces what the strictest category does
    // (port_scan: flowspec and RTBH), a whole-source discard.
    let (mut rig, b) = bird_rig(agent_policy(
        "actions:\n  port_scan:\n    announce: [flowspec, rtbh]\n",
        "",
    ));

    rig.block("203.0.113.7", "1h");
    // An IPv6 address is held, and announced, as its /64.
    rig.block("2001:db8:c:5::7", "1h");

    let f4 = bird_route(&b, "flowtab4", FLOW_V4);
    assert_carries(&f4, &FLOW_COMMUNITIES);
    assert_carries(&f4, &[DISCARD]);
    let f6 = bird_route(&b, "flowtab6", FLOW_V6);
    assert_carries(&f6, &FLOW_COMMUNITIES);
    assert_carries(&f6, &[DISCARD]);
    let r4 = bird_route(&b, "master4", "203.0.113.7/32");
    assert_carries(&r4, &RTBH_V4);
    let r6 = bird_route(&b, "master6", "2001:db8:c:5::/64");
    assert_carries(
        &r6,
        &[
            "(65535,666)",
            "(65535,65281)",
            "(65001,666)",
            "2001:db8:b::66",
        ],
    );
    // RTBH routes carry the RTBH communities, not the flowspec ones, and vice versa.
    assert!(!r4.contains("(65001,100)"), "{r4}");
    assert!(!f4.contains("(65001,666)"), "{f4}");

    rig.unblock("203.0.113.7");
    bird_gone(&b, "flowtab4", "203.0.113.7");
    bird_gone(&b, "master4", "203.0.113.7");
    // The other hold's routes stay until it is lifted too.
    assert!(bird_table(&b, "flowtab6").contains(FLOW_V6));
    rig.unblock("2001:db8:c:5::/64");
    bird_gone(&b, "flowtab6", "2001:db8:c:5::");
    bird_gone(&b, "master6", "2001:db8:c:5::");
}

#[test]
fn bgp_agent_bird_quarantine_is_not_announced_its_escalation_is() {
    if !require_root("bgp_agent_bird_quarantine_is_not_announced_its_escalation_is") {
        return;
    }
    require_tools("nmap", &["nmap"]);
    // The shipped ladder's announce defaults: quarantine false, block true (left unwritten).
    let (rig, b) = bird_rig(agent_policy(
        r#"actions:
  port_scan:
    announce: [flowspec, rtbh]
escalation:
  ladder:
    - action: quarantine
      for: 1h
    - action: block
      until: reconnect
enforcement:
  walled_garden: [198.51.100.80]
"#,
        "",
    ));

    // A real SYN scan of 300 ports from customer 10: its first offense, a quarantine.
    let scan = |ns: &Netns, target: &str| {
        ns.run(&[
            "timeout",
            "40",
            "nmap",
            "-Pn",
            "-n",
            "--max-retries",
            "0",
            "-sS",
            "-T4",
            "-p",
            "1-300",
            target,
        ])
        .expect("nmap");
    };
    scan(&rig.topo.customers[0].ns, "198.51.100.21");
    wait_for("the scanner quarantined", Duration::from_secs(15), || {
        rig.set("quarantine4")
            .contains("203.0.113.10")
            .then_some(())
    });
    // Held here, and over a bounded wait never announced: no flowspec, no RTBH route.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        for table in ["flowtab4", "master4"] {
            let t = bird_table(&b, table);
            assert!(
                !t.contains("203.0.113.10"),
                "a quarantine (announce: false) was announced in {table}:\n{t}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // The second offense, after the hold began: a scan of the walled garden (which a
    // quarantined address may still reach) escalates to the block rung, announced.
    scan(&rig.topo.customers[0].ns, "198.51.100.80");
    wait_for("the scanner blocked", Duration::from_secs(15), || {
        rig.set("blocked4").contains("203.0.113.10").then_some(())
    });
    let f4 = bird_route(&b, "flowtab4", "flow4 { src 203.0.113.10/32; }");
    assert_carries(&f4, &FLOW_COMMUNITIES);
    let r4 = bird_route(&b, "master4", "203.0.113.10/32");
    assert_carries(&r4, &["(65535,666)", "(65001,666)"]);
}

/// LLGR_STALE (RFC 9494): the community a peer adds to our routes once the restart time has
/// run out and the long-lived stale time runs.
const LLGR_STALE: &str = "(65535,6)";

/// The graceful-restart policy of the GR tests: a short restart time, so the peer enters the
/// long-lived phase (and marks our routes LLGR_STALE) within the test.
fn gr_policy() -> String {
    agent_policy(
        "operator_blocks:\n  announce: [flowspec, rtbh]\n",
        "  graceful_restart:\n    restart_time: 2s\n    long_lived_stale_time: 1h\n",
    )
}

/// BIRD keeps the agent's routes across its absence: first in the RFC 4724 phase, then as
/// LLGR_STALE; `want` are the flowspec routes that must be there, stale. `down` is when the
/// agent went.
fn assert_bird_keeps_stale(b: &Bird, want: &[&str], down: Instant) {
    let proto = b.birdc("show protocols all agent");
    assert!(
        proto.contains("Neighbor graceful restart active"),
        "BIRD is not in graceful restart for the agent:\n{proto}"
    );
    for w in want {
        let e = route_entry(&bird_table(b, "flowtab4"), w)
            .unwrap_or_else(|| panic!("{w} dropped by BIRD within the restart time"));
        // Within the restart time (2 s; a loaded machine may have taken longer to get here)
        // the route is kept as it was.
        if down.elapsed() < Duration::from_millis(1500) {
            assert!(!e.contains(LLGR_STALE), "{e}");
        }
    }
    // Past the restart time (2 s): long-lived stale, marked so.
    for w in want {
        let e = wait_for(
            &format!("{w} LLGR_STALE in BIRD"),
            Duration::from_secs(10),
            || route_entry(&bird_table(b, "flowtab4"), w).filter(|e| e.contains(LLGR_STALE)),
        );
        assert_carries(&e, &FLOW_COMMUNITIES);
    }
    let proto = b.birdc("show protocols all agent");
    assert!(
        proto.contains("Neighbor graceful restart active") && proto.contains("LL stale timer"),
        "BIRD is not in long-lived graceful restart for the agent:\n{proto}"
    );
    let r4 = route_entry(&bird_table(b, "master4"), "203.0.113.7/32")
        .expect("RTBH route dropped by BIRD during the restart");
    assert_carries(&r4, &[LLGR_STALE, "(65535,666)"]);
}

/// After the restart: End-of-RIB ends BIRD's graceful restart, every route of `want` is
/// refreshed (no longer LLGR_STALE), every one of `gone` flushed.
fn assert_bird_refreshed(b: &Bird, want: &[&str], gone: &[&str]) {
    // From the agent's start until the refresh the live routes never leave BIRD: no gap.
    for w in want {
        wait_for(&format!("{w} refreshed"), Duration::from_secs(40), || {
            let e = route_entry(&bird_table(b, "flowtab4"), w)
                .unwrap_or_else(|| panic!("{w} left BIRD during the agent's restart"));
            (!e.contains(LLGR_STALE)).then_some(())
        });
    }
    wait_established(b, "session with BIRD after the restart");
    wait_for(
        "BIRD out of graceful restart",
        Duration::from_secs(15),
        || {
            let p = b.birdc("show protocols all agent");
            (!p.contains("graceful restart active")).then_some(())
        },
    );
    for g in gone {
        bird_gone(b, "flowtab4", g);
        bird_gone(b, "master4", g);
    }
    let r4 = bird_route(b, "master4", "203.0.113.7/32");
    assert!(!r4.contains(LLGR_STALE), "RTBH route still stale:\n{r4}");
}

#[test]
fn bgp_agent_bird_graceful_restart_across_kill_and_stop() {
    if !require_root("bgp_agent_bird_graceful_restart_across_kill_and_stop") {
        return;
    }
    let (mut rig, b) = bird_rig(gr_policy());
    let short = "flow4 { src 203.0.113.8/32; }";
    rig.block("203.0.113.7", "1h");
    rig.block("203.0.113.8", "6s");
    bird_route(&b, "flowtab4", FLOW_V4);
    bird_route(&b, "flowtab4", short);
    bird_route(&b, "master4", "203.0.113.8/32");

    // kill -9: the kernel closes the TCP connection, no NOTIFICATION.
    let killed = Instant::now();
    rig.agent().kill();
    wait_for(
        "BIRD sees the session down",
        Duration::from_secs(10),
        || (!b.birdc("show protocols agent").contains("Established")).then_some(()),
    );
    assert_bird_keeps_stale(&b, &[FLOW_V4, short], killed);
    // The 6 s hold expires while the agent is down.
    let down = Duration::from_secs(8);
    std::thread::sleep(down.saturating_sub(killed.elapsed()));
    rig.start();
    assert_bird_refreshed(&b, &[FLOW_V4], &["203.0.113.8"]);

    // SIGTERM: the agent closes without a NOTIFICATION, BIRD keeps the routes.
    let stopped = Instant::now();
    let st = rig.agent().stop(Duration::from_secs(10));
    assert!(st.is_some_and(|s| s.success()), "agent stop: {st:?}");
    wait_for(
        "BIRD sees the session down",
        Duration::from_secs(10),
        || (!b.birdc("show protocols agent").contains("Established")).then_some(()),
    );
    assert_bird_keeps_stale(&b, &[FLOW_V4], stopped);
    rig.start();
    assert_bird_refreshed(&b, &[FLOW_V4], &[]);
    let log = b.log();
    assert!(
        !log.contains("Received: Administrative shutdown") && !log.contains("Received: Cease"),
        "the agent sent a NOTIFICATION:\n{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// GoBGP
// ---------------------------------------------------------------------------------------------

/// GoBGP as a graceful-restart helper (RFC 4724 and RFC 9494) for the agent's session.
const GOBGP_GR: &str = r#"  [neighbors.graceful-restart.config]
    enabled = true
    restart-time = 120
    helper-only = true
    long-lived-enabled = true
"#;
const GOBGP_GR_AFI: &str = r#"    [neighbors.afi-safis.mp-graceful-restart.config]
      enabled = true
    [neighbors.afi-safis.long-lived-graceful-restart.config]
      enabled = true
      restart-time = 3600
"#;

fn gobgp_established(ns: &Netns, what: &str) {
    wait_for(what, Duration::from_secs(40), || {
        ns.run(&["gobgp", "-p", GOBGP_API, "neighbor"])
            .ok()
            .filter(|o| o.contains("Establ"))
            .map(|_| ())
    });
}

/// The line of GoBGP's `family` RIB that contains `needle`, waited for.
fn gobgp_route(ns: &Netns, family: &str, needle: &str) -> String {
    wait_for(
        &format!("{needle} in GoBGP's {family} RIB"),
        Duration::from_secs(15),
        || {
            gobgp_rib(ns, family)
                .lines()
                .find(|l| l.contains(needle))
                .map(str::to_owned)
        },
    )
}

fn gobgp_gone(ns: &Netns, family: &str, needle: &str) {
    wait_for(
        &format!("{needle} gone from GoBGP's {family} RIB"),
        Duration::from_secs(15),
        || (!gobgp_rib(ns, family).contains(needle)).then_some(()),
    );
}

#[test]
fn bgp_agent_gobgp_operator_block_announced_and_withdrawn() {
    if !require_root("bgp_agent_gobgp_operator_block_announced_and_withdrawn") {
        return;
    }
    // Written out this time, with a rate limit instead of a discard.
    let mut rig = Rig::new(agent_policy(
        "operator_blocks:\n  announce: [flowspec, rtbh]\n  rate_limit: 125000\n",
        "",
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let _g = gobgpd_conf(&rig.upstream, dir.path(), "", "", "");
    rig.start();
    gobgp_established(&rig.upstream, "session with GoBGP");
    rig.block("203.0.113.7", "1h");
    rig.block("2001:db8:c:5::7", "1h");
    let up = &rig.upstream;
    let flow = [
        "{Communities: 65001:100}",
        "{LargeCommunity: [ 65001:7:8]}",
        "rate: 125000.000000(as: 65001)",
    ];
    let f4 = gobgp_route(up, "ipv4-flowspec", "[source: 203.0.113.7/32]");
    assert_carries(&f4, &flow);
    // GoBGP prints an IPv6 source with its offset: `/64/0`.
    let f6 = gobgp_route(up, "ipv6-flowspec", "[source: 2001:db8:c:5::/64/0]");
    assert_carries(&f6, &flow);
    let rtbh = [
        "{Communities: blackhole, no-export, 65001:666}",
        "{LargeCommunity: [ 65001:1:2]}",
    ];
    let r4 = gobgp_route(up, "ipv4", "203.0.113.7/32");
    assert_carries(&r4, &rtbh);
    assert_carries(&r4, &["192.0.2.66"]);
    let r6 = gobgp_route(up, "ipv6", "2001:db8:c:5::/64");
    assert_carries(&r6, &rtbh);
    assert_carries(&r6, &["2001:db8:b::66"]);

    rig.unblock("203.0.113.7");
    let up = &rig.upstream;
    gobgp_gone(up, "ipv4-flowspec", "203.0.113.7");
    gobgp_gone(up, "ipv4", "203.0.113.7");
    assert!(gobgp_rib(up, "ipv6-flowspec").contains("2001:db8:c:5::/64"));
    rig.unblock("2001:db8:c:5::/64");
    let up = &rig.upstream;
    gobgp_gone(up, "ipv6-flowspec", "2001:db8:c:5::");
    gobgp_gone(up, "ipv6", "2001:db8:c:5::");

    // This GoBGP has no `graceful-restart` section (docs/bgp-upstream.md): graceful restart
    // is not negotiated, and the agent's routes go with its session.
    rig.block("203.0.113.9", "1h");
    gobgp_route(&rig.upstream, "ipv4-flowspec", "[source: 203.0.113.9/32]");
    rig.agent().kill();
    gobgp_gone(&rig.upstream, "ipv4-flowspec", "203.0.113.9");
    gobgp_gone(&rig.upstream, "ipv4", "203.0.113.9");
}

#[test]
fn bgp_agent_gobgp_graceful_restart_across_kill() {
    if !require_root("bgp_agent_gobgp_graceful_restart_across_kill") {
        return;
    }
    let mut rig = Rig::new(gr_policy());
    let dir = tempfile::tempdir().expect("tempdir");
    let _g = gobgpd_conf(&rig.upstream, dir.path(), "", GOBGP_GR, GOBGP_GR_AFI);
    rig.start();
    gobgp_established(&rig.upstream, "session with GoBGP");
    rig.block("203.0.113.7", "1h");
    rig.block("203.0.113.8", "6s");
    let up = &rig.upstream;
    gobgp_route(up, "ipv4-flowspec", "[source: 203.0.113.7/32]");
    gobgp_route(up, "ipv4-flowspec", "[source: 203.0.113.8/32]");
    gobgp_route(up, "ipv4", "203.0.113.8/32");
    // kill -9: GoBGP keeps every route, flowspec included, marked stale (`S`), and past the
    // restart time (2 s) with the LLGR_STALE community.
    let killed = Instant::now();
    rig.agent().kill();
    let up = &rig.upstream;
    wait_for(
        "GoBGP sees the session down",
        Duration::from_secs(10),
        || {
            (!up.run(&["gobgp", "-p", GOBGP_API, "neighbor"])
                .ok()?
                .contains("Establ"))
            .then_some(())
        },
    );
    let routes = [
        ("ipv4-flowspec", "[source: 203.0.113.7/32]"),
        ("ipv4-flowspec", "[source: 203.0.113.8/32]"),
        ("ipv4", "203.0.113.7/32"),
        ("ipv4", "203.0.113.8/32"),
    ];
    for (family, needle) in routes {
        let r = gobgp_route(up, family, needle);
        assert!(r.starts_with("S*>"), "not kept as stale: {r}");
        wait_for(
            &format!("{needle} llgr-stale in GoBGP"),
            Duration::from_secs(10),
            || {
                gobgp_rib(up, family)
                    .lines()
                    .find(|l| l.contains(needle) && l.contains("llgr-stale"))
                    .map(|_| ())
            },
        );
    }
    // The 6 s hold expires while the agent is down.
    std::thread::sleep(Duration::from_secs(8).saturating_sub(killed.elapsed()));
    rig.start();
    let up = &rig.upstream;
    gobgp_established(up, "session with GoBGP after the restart");
    // After End-of-RIB: the live hold refreshed, the expired one flushed.
    for (family, needle) in &routes[..] {
        if needle.contains("203.0.113.8") {
            gobgp_gone(up, family, needle);
        } else {
            wait_for(
                &format!("{needle} refreshed"),
                Duration::from_secs(15),
                || {
                    gobgp_rib(up, family)
                        .lines()
                        .find(|l| l.contains(needle))
                        .filter(|l| l.starts_with("*>") && !l.contains("llgr-stale"))
                        .map(|_| ())
                },
            );
        }
    }
}

/// The count of routes in BIRD's `table` (`show route table T count`: "N of M routes").
fn bird_count(b: &Bird, table: &str) -> usize {
    b.birdc(&format!("show route table {table} count"))
        .lines()
        .find_map(|l| l.trim().split(" of ").next()?.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// Scripted measurement (not a pass/fail test), the real agent against BIRD: an operator
/// block (`egressguard block`, the CLI process included) → its flowspec and RTBH routes in
/// BIRD's tables, and 10,000 operator holds in the agent's desired set → all in BIRD.
/// Figures go to docs/performance.md.
/// Run: `cargo test --release --test netns bgp_agent_bench_bird -- --ignored --nocapture`
#[test]
#[ignore]
fn bgp_agent_bench_bird() {
    if !require_root("bgp_agent_bench_bird") {
        return;
    }
    let (mut rig, b) = bird_rig(agent_policy(
        "operator_blocks:\n  announce: [flowspec, rtbh]\n",
        "",
    ));
    let base4 = bird_count(&b, "master4");
    // 1. One operator block at a time: `block` started → flowspec and RTBH route in BIRD.
    let n = 100;
    let mut lat = Vec::new();
    let mut cli = Vec::new();
    // From the CLI's reply (the hold is decided and in the desired set) to the routes.
    let mut after = Vec::new();
    for i in 0..n {
        let a = format!("203.0.113.{}", 100 + i);
        let rtbh = format!("show route table master4 {a}/32");
        let start = Instant::now();
        rig.block(&a, "1h");
        cli.push(start.elapsed());
        wait_for("flowspec and RTBH route", Duration::from_secs(5), || {
            (bird_count(&b, "flowtab4") == i + 1 && b.birdc(&rtbh).contains(&a)).then_some(())
        });
        lat.push(start.elapsed());
        after.push(start.elapsed() - cli[cli.len() - 1]);
    }
    lat.sort();
    cli.sort();
    after.sort();
    eprintln!(
        "BENCH operator block -> flowspec+RTBH in BIRD: median {:?} p90 {:?} p99 {:?} max {:?} (n={n}; includes birdc polls); `block` CLI round trip median {:?} p99 {:?}; slowest five {:?}",
        percentile(&lat, 50),
        percentile(&lat, 90),
        percentile(&lat, 99),
        lat[lat.len() - 1],
        percentile(&cli, 50),
        percentile(&cli, 99),
        &lat[lat.len() - 5..],
    );
    eprintln!(
        "BENCH `block` replied -> flowspec+RTBH in BIRD: median {:?} p99 {:?} max {:?}",
        percentile(&after, 50),
        percentile(&after, 99),
        after[after.len() - 1],
    );

    // 2. 10,000 operator holds (198.18.0.0/15, RFC 2544 benchmarking space) made while the
    // session is down, then the session comes up: Established → all in BIRD.
    assert!(b.birdc("disable agent").contains("disabled"));
    let total = 10_000u32;
    let made = Instant::now();
    let sock = rig.dir.path().join("control.sock");
    std::thread::scope(|s| {
        for t in 0..4u32 {
            let sock = &sock;
            s.spawn(move || {
                for i in (t..total).step_by(4) {
                    let a = std::net::Ipv4Addr::from(0xc612_0000u32 + i).to_string();
                    let out = std::process::Command::new(agent_bin())
                        .args(["block", &a, "--reason", "bench", "--for", "1h", "--socket"])
                        .arg(sock)
                        .output()
                        .expect("egressguard block");
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            });
        }
    });
    eprintln!(
        "BENCH {total} `egressguard block` calls (4 in parallel): {:?}",
        made.elapsed()
    );
    let want = total as usize + n;
    let enabled = Instant::now();
    assert!(b.birdc("enable agent").contains("enabled"));
    // The agent's connect retries back off to 60 s while BIRD refuses them.
    wait_for("session with BIRD again", Duration::from_secs(90), || {
        b.birdc("show protocols agent")
            .contains("Established")
            .then_some(())
    });
    let est = Instant::now();
    wait_for("every route in BIRD", Duration::from_secs(30), || {
        (bird_count(&b, "flowtab4") == want).then_some(())
    });
    let flow = est.elapsed();
    let rtbh0 = bird_count(&b, "master4");
    wait_for("every RTBH route in BIRD", Duration::from_secs(30), || {
        let c = bird_count(&b, "master4");
        (c == base4 + want).then_some(())
    });
    let all = est.elapsed();
    eprintln!(
        "BENCH {want} operator holds: Established -> all flowspec in BIRD {flow:?}, flowspec + RTBH {all:?} (enable -> Established {:?}; master4 had {rtbh0} when flowspec was complete)",
        est - enabled
    );
}
