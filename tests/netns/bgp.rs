//! The BGP speaker against real BIRD 2 and GoBGP daemons: each daemon runs in an "upstream"
//! namespace, the speaker in an "agent" namespace, joined by a veth pair. A block makes the
//! exact flowspec rule (and RTBH route) appear in the daemon's table, an unblock withdraws it,
//! a restarted daemon gets everything again, and flowspec from a trusted peer is learnt.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egressguard::bgp::{LearnedAction, SessionState, Speaker, SpeakerHandle};
use egressguard::messages::{Announce, BlockKind, DesiredBlock, DesiredBlocks, FlowspecScope};
use egressguard::netns::{Netns, Proc, addr, veth};
use egressguard::policy::{Bgp, Policy};
use ipnet::IpNet;
use tokio::sync::watch;

use crate::bird::Bird;
use crate::common::{require_root, wait_for};

pub(crate) const AGENT_V4: &str = "192.0.2.1";
pub(crate) const PEER_V4: &str = "192.0.2.2";

/// Two namespaces joined by a veth: the agent at .1 / ::1, the upstream at .2 / ::2.
struct Link {
    agent: Netns,
    upstream: Netns,
}

fn link() -> Link {
    egressguard::netns::sweep_stale();
    let agent = Netns::new("bgpagent").expect("agent ns");
    let upstream = Netns::new("bgpup").expect("upstream ns");
    veth(&agent, "up0", &upstream, "agent0").expect("veth");
    addr(&agent, "up0", "192.0.2.1/24").expect("addr");
    addr(&agent, "up0", "2001:db8:b::1/64").expect("addr");
    addr(&upstream, "agent0", "192.0.2.2/24").expect("addr");
    addr(&upstream, "agent0", "2001:db8:b::2/64").expect("addr");
    Link { agent, upstream }
}

/// A tokio runtime whose worker threads live in `ns`: sockets the speaker opens are there.
fn runtime_in(ns: &Netns) -> tokio::runtime::Runtime {
    let path = PathBuf::from(format!("/run/netns/{}", ns.name()));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(move || {
            let f = File::open(&path).expect("open netns");
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        })
        .build()
        .expect("runtime")
}

/// A speaker running policy `p` in the agent's namespace, fed `blocks` first; the runtime
/// must outlive the handle, and the sender changes what it announces.
fn speaker(
    l: &Link,
    p: Bgp,
    blocks: Arc<DesiredBlocks>,
) -> (
    tokio::runtime::Runtime,
    watch::Sender<Arc<DesiredBlocks>>,
    SpeakerHandle,
) {
    let rt = runtime_in(&l.agent);
    let (tx, rx) = watch::channel(blocks);
    let h = rt.block_on(async { Speaker::spawn(p, rx) });
    (rt, tx, h)
}

fn policy(peer_as: u32, port: u16, extra: &str) -> Bgp {
    policy_at(PEER_V4, peer_as, port, extra)
}

fn policy_at(peer_addr: &str, peer_as: u32, port: u16, extra: &str) -> Bgp {
    let text = format!(
        r#"version: 1
networks:
  - prefix: 203.0.113.0/24
  - prefix: 2001:db8:c::/48
bgp:
  local_as: 65001
  router_id: 192.0.2.1
  peers:
    - name: up
      address: {peer_addr}
      port: {port}
      remote_as: {peer_as}
      hold_time: 9
      families: [ipv4-unicast, ipv6-unicast, ipv4-flowspec, ipv6-flowspec]
      announce: [flowspec, rtbh]
      rtbh_next_hop_v4: 192.0.2.66
      rtbh_next_hop_v6: 2001:db8:b::66
      rtbh_communities: ["65001:666", "65001:1:2"]
{extra}"#
    );
    Policy::from_text(&text, Path::new("<bgp test>"))
        .expect("policy")
        .bgp
        .expect("bgp section")
}

fn block(
    target: &str,
    announce: &[Announce],
    scope: Option<FlowspecScope>,
) -> (IpNet, DesiredBlock) {
    let t: IpNet = target.parse().unwrap();
    (
        t,
        DesiredBlock {
            target: t,
            kind: BlockKind::Block,
            expires: None,
            announce: announce.to_vec(),
            flowspec: scope,
            except: vec![],
        },
    )
}

fn blocks(generation: u64, list: Vec<(IpNet, DesiredBlock)>) -> Arc<DesiredBlocks> {
    Arc::new(DesiredBlocks {
        generation,
        blocks: list.into_iter().collect::<BTreeMap<_, _>>(),
        ..DesiredBlocks::default()
    })
}

fn standard_blocks() -> Arc<DesiredBlocks> {
    blocks(
        1,
        vec![
            block(
                "203.0.113.7/32",
                &[Announce::Flowspec, Announce::Rtbh],
                Some(FlowspecScope {
                    proto: Some(6),
                    dports: vec![25, 587],
                    rate_bytes_per_sec: 0,
                }),
            ),
            block("203.0.113.8/32", &[Announce::Flowspec], None),
            block(
                "2001:db8:c:1::/64",
                &[Announce::Flowspec, Announce::Rtbh],
                Some(FlowspecScope {
                    proto: Some(17),
                    dports: vec![],
                    rate_bytes_per_sec: 125_000,
                }),
            ),
        ],
    )
}

fn established(h: &SpeakerHandle) -> bool {
    h.stats()
        .first()
        .is_some_and(|s| s.state == SessionState::Established)
}

// ---------------------------------------------------------------------------------------------
// BIRD
// ---------------------------------------------------------------------------------------------

fn bird(ns: &Netns, peer_as: u32, extra: &str) -> Bird {
    bird_at(ns, peer_as, extra, PEER_V4, AGENT_V4)
}

fn bird_at(ns: &Netns, peer_as: u32, extra: &str, local: &str, neighbor: &str) -> Bird {
    bird_conf(ns, peer_as, extra, local, neighbor, "passive on;")
}

/// BIRD with `session` in its `protocol bgp agent` block (`passive on;` by default).
pub(crate) fn bird_conf(
    ns: &Netns,
    peer_as: u32,
    extra: &str,
    local: &str,
    neighbor: &str,
    session: &str,
) -> Bird {
    let conf = format!(
        r#"
router id {PEER_V4};
log "{{log}}" all;
flow4 table flowtab4;
flow6 table flowtab6;
protocol device {{ }}
protocol direct {{ ipv4; ipv6; interface "agent0"; }}
{extra}
protocol bgp agent {{
  local {local} as {peer_as};
  neighbor {neighbor} as 65001;
  {session}
  hold time 9;
  ipv4 {{ import all; export none; }};
  ipv6 {{ import all; export none; }};
  flow4 {{ table flowtab4; import all; export {export}; }};
  flow6 {{ table flowtab6; import all; export {export}; }};
}}
"#,
        export = if extra.is_empty() { "none" } else { "all" },
    );
    Bird::start_with(ns, &conf)
}

fn bird_flow4(b: &Bird) -> String {
    b.birdc("show route table flowtab4 all")
}

#[test]
fn bgp_bird_flowspec_rtbh_withdraw_and_reannounce() {
    if !require_root("bgp_bird_flowspec_rtbh_withdraw_and_reannounce") {
        return;
    }
    let l = link();
    let mut b = bird(&l.upstream, 65002, "");
    let (rt, tx, h) = speaker(
        &l,
        policy(65002, 179, ""),
        Arc::new(DesiredBlocks::default()),
    );
    wait_for("session with BIRD", Duration::from_secs(20), || {
        established(&h).then_some(())
    });

    tx.send(standard_blocks()).unwrap();
    let v4 = "flow4 { src 203.0.113.7/32; proto 6; dport 25,587; }";
    let v4b = "flow4 { src 203.0.113.8/32; }";
    let v6 = "flow6 { src 2001:db8:c:1::/64; next header 17; }";
    let out = wait_for("flowspec routes in BIRD", Duration::from_secs(10), || {
        let o = bird_flow4(&b);
        if std::env::var_os("BGP_DEBUG").is_some() {
            eprintln!(
                "{o}\n{}",
                std::fs::read_to_string(b.dir.path().join("bird.log")).unwrap_or_default()
            );
        }
        (o.contains(v4) && o.contains(v4b)).then_some(o)
    });
    // traffic-rate 0 (discard): extended community type 0x80, sub-type 0x06, our AS 65001
    // (0xfde9) as the informational AS.
    assert!(
        out.contains("(generic, 0x8006fde9, 0x0)"),
        "no traffic-rate 0 in:\n{out}"
    );
    let out6 = wait_for(
        "IPv6 flowspec route in BIRD",
        Duration::from_secs(10),
        || {
            let o = b.birdc("show route table flowtab6 all");
            if std::env::var_os("BGP_DEBUG").is_some() {
                eprintln!("{o}");
            }
            o.contains(v6).then_some(o)
        },
    );
    // 125000 bytes/s as IEEE float = 0x47f42400.
    assert!(
        out6.contains("(generic, 0x8006fde9, 0x47f42400)"),
        "no traffic-rate 125000 in:\n{out6}"
    );
    // RTBH: unicast route with BLACKHOLE, NO_EXPORT and the peer's communities.
    let m4 = wait_for("RTBH v4 route in BIRD", Duration::from_secs(10), || {
        let o = b.birdc("show route table master4 203.0.113.7/32 all");
        o.contains("203.0.113.7/32").then_some(o)
    });
    for want in [
        "(65535,666)",
        "(65535,65281)",
        "(65001,666)",
        "(65001, 1, 2)",
        "192.0.2.66",
    ] {
        assert!(m4.contains(want), "RTBH v4 route lacks {want}:\n{m4}");
    }
    let m6 = wait_for("RTBH v6 route in BIRD", Duration::from_secs(10), || {
        let o = b.birdc("show route table master6 2001:db8:c:1::/64 all");
        o.contains("2001:db8:c:1::/64").then_some(o)
    });
    assert!(
        m6.contains("(65535,666)") && m6.contains("(65535,65281)"),
        "{m6}"
    );
    // The flowspec-only block has no RTBH route.
    assert!(
        !b.birdc("show route table master4 all")
            .contains("203.0.113.8"),
        "flowspec-only block announced as RTBH"
    );

    // Unblock one: its flowspec and RTBH routes go, the other stays.
    let mut next = (*standard_blocks()).clone();
    next.generation = 2;
    next.blocks
        .remove(&"203.0.113.7/32".parse::<IpNet>().unwrap());
    tx.send(Arc::new(next)).unwrap();
    wait_for("withdrawal in BIRD", Duration::from_secs(10), || {
        let o = bird_flow4(&b);
        (!o.contains(v4) && o.contains(v4b)).then_some(())
    });
    wait_for("RTBH withdrawal in BIRD", Duration::from_secs(10), || {
        (!b.birdc("show route table master4 all")
            .contains("203.0.113.7/32"))
        .then_some(())
    });

    // BIRD restarts: the session comes back and the whole set is announced again.
    tx.send(standard_blocks()).unwrap();
    wait_for("re-announced", Duration::from_secs(10), || {
        bird_flow4(&b).contains(v4).then_some(())
    });
    b.stop();
    wait_for("session down", Duration::from_secs(20), || {
        (!established(&h)).then_some(())
    });
    b.start(&l.upstream);
    wait_for(
        "flowspec again after BIRD restart",
        Duration::from_secs(30),
        || {
            let o = bird_flow4(&b);
            (o.contains(v4) && o.contains(v4b)).then_some(())
        },
    );
    let s = &h.stats()[0];
    assert!(s.resets >= 1, "{s:?}");
    assert!(s.updates_sent >= 4, "{s:?}");
    // Two v4 and one v6 flowspec route, one v4 and one v6 RTBH route.
    assert_eq!(s.routes_announced, 5, "{s:?}");
    assert!(s.uptime_secs.is_some());

    // Shutdown with graceful restart negotiated (BIRD 2 is a helper by default, `graceful
    // restart aware`): the TCP closes without a NOTIFICATION, BIRD keeps the routes as
    // stale, seconds later still.
    rt.block_on(h.shutdown());
    wait_for("BIRD in graceful restart", Duration::from_secs(10), || {
        let o = b.birdc("show protocols all agent");
        o.contains("Neighbor graceful restart active").then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    let o = bird_flow4(&b);
    assert!(
        o.contains(v4) && o.contains(v4b),
        "routes dropped on shutdown:\n{o}"
    );
    assert!(
        !b.log().contains("Received: Administrative shutdown"),
        "{}",
        b.log()
    );
}

#[test]
fn bgp_bird_flowspec_is_learnt_from_a_trusted_peer() {
    if !require_root("bgp_bird_flowspec_is_learnt_from_a_trusted_peer") {
        return;
    }
    let l = link();
    // Two rules inside the bounds (plain discards of a customer address and a customer /64)
    // and three outside: a port match (translatable), an untranslatable `dport > 1024`, and a
    // rate limit.
    let statics = r#"
protocol static flowstatic {
  flow4 { table flowtab4; };
  route flow4 { src 203.0.113.9/32; } {
    bgp_ext_community.add((generic, 0x80060000, 0x0));
  };
  route flow4 { src 203.0.113.9/32; proto 17; dport 53; } {
    bgp_ext_community.add((generic, 0x80060000, 0x0));
  };
  route flow4 { src 203.0.113.10/32; proto 6; dport > 1024; } {
    bgp_ext_community.add((generic, 0x80060000, 0x0));
  };
}
protocol static flowstatic6 {
  flow6 { table flowtab6; };
  route flow6 { src 2001:db8:c:9::/64; } {
    bgp_ext_community.add((generic, 0x80060000, 0x0));
  };
  route flow6 { src 2001:db8:c:a::/64; next header 6; dport 22; } {
    bgp_ext_community.add((generic, 0x80060000, 0x461c4000));
  };
}
"#;
    let _b = bird(&l.upstream, 65002, statics);
    let (rt, _tx, h) = speaker(
        &l,
        policy(65002, 179, "      accept_flowspec: true\n"),
        Arc::new(DesiredBlocks::default()),
    );
    let learned = h.learned();
    let rules = wait_for("both learned rules", Duration::from_secs(20), || {
        let m = learned.borrow().clone();
        (m.len() >= 2).then_some(m)
    });
    let mut r: Vec<_> = rules.values().collect();
    r.sort_by_key(|r| r.source);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r[0].source, "203.0.113.9/32".parse::<IpNet>().unwrap());
    assert_eq!(r[1].source, "2001:db8:c:9::/64".parse::<IpNet>().unwrap());
    for rule in &r {
        assert_eq!(rule.action, LearnedAction::Discard);
        assert!(rule.proto.is_none() && rule.dports.is_empty() && rule.destination.is_none());
    }
    let stats = wait_for("refusals counted", Duration::from_secs(5), || {
        let s = h.stats().remove(0);
        (s.learned_refused >= 3).then_some(s)
    });
    assert_eq!(
        stats.learned_refused_by.get("untranslatable"),
        Some(&1),
        "{stats:?}"
    );
    assert_eq!(
        stats.learned_refused_by.get("not_source_discard"),
        Some(&2),
        "{stats:?}"
    );
    assert_eq!(stats.learned, 2);
    rt.block_on(h.shutdown());
}

// ---------------------------------------------------------------------------------------------
// GoBGP
// ---------------------------------------------------------------------------------------------

pub(crate) const GOBGP_API: &str = "50051";

fn gobgpd(ns: &Netns, dir: &Path) -> Proc {
    gobgpd_with(ns, dir, "")
}

/// GoBGP with `auth` (e.g. `auth-password = "..."`) in the neighbour's config.
fn gobgpd_with(ns: &Netns, dir: &Path, auth: &str) -> Proc {
    gobgpd_conf(ns, dir, auth, "", "")
}

/// GoBGP with `auth` in the neighbour's config, `neighbor` (TOML tables of the neighbour,
/// e.g. `[neighbors.graceful-restart.config]`) after it and `afi` (tables of each address
/// family) after each family's config.
pub(crate) fn gobgpd_conf(ns: &Netns, dir: &Path, auth: &str, neighbor: &str, afi: &str) -> Proc {
    crate::common::require_tools("GoBGP", &["gobgpd", "gobgp"]);
    let conf = dir.join("gobgpd.toml");
    let mut afis = String::new();
    for f in [
        "ipv4-unicast",
        "ipv6-unicast",
        "ipv4-flowspec",
        "ipv6-flowspec",
    ] {
        afis.push_str(&format!(
            "  [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = \"{f}\"\n{afi}"
        ));
    }
    std::fs::write(
        &conf,
        format!(
            r#"[global.config]
  as = 65002
  router-id = "{PEER_V4}"
  local-address-list = ["{PEER_V4}"]

[[neighbors]]
  [neighbors.config]
    neighbor-address = "{AGENT_V4}"
    peer-as = 65001
    {auth}
  [neighbors.timers.config]
    hold-time = 9
  [neighbors.transport.config]
    passive-mode = true
{neighbor}
{afis}"#
        ),
    )
    .expect("write gobgpd.toml");
    let p = ns
        .spawn(&[
            "gobgpd",
            "-f",
            conf.to_str().unwrap(),
            "-t",
            "toml",
            "--api-hosts",
            &format!("127.0.0.1:{GOBGP_API}"),
            "--log-level",
            if std::env::var_os("BGP_DEBUG").is_some() {
                "debug"
            } else {
                "warn"
            },
        ])
        .expect("start gobgpd");
    wait_for("gobgpd API", Duration::from_secs(15), || {
        ns.run(&["gobgp", "-p", GOBGP_API, "neighbor"]).ok()
    });
    p
}

pub(crate) fn gobgp_rib(ns: &Netns, family: &str) -> String {
    ns.run(&["gobgp", "-p", GOBGP_API, "global", "rib", "-a", family])
        .unwrap_or_default()
}

#[test]
fn bgp_gobgp_flowspec_rtbh_withdraw_and_reannounce() {
    if !require_root("bgp_gobgp_flowspec_rtbh_withdraw_and_reannounce") {
        return;
    }
    let l = link();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut g = gobgpd(&l.upstream, dir.path());
    let (rt, tx, h) = speaker(
        &l,
        policy(65002, 179, "      accept_flowspec: true\n"),
        Arc::new(DesiredBlocks::default()),
    );
    wait_for("session with GoBGP", Duration::from_secs(30), || {
        if std::env::var_os("BGP_DEBUG").is_some() {
            eprintln!("{:?}", h.stats());
        }
        established(&h).then_some(())
    });
    tx.send(standard_blocks()).unwrap();
    let out = wait_for("flowspec in GoBGP", Duration::from_secs(10), || {
        let o = gobgp_rib(&l.upstream, "ipv4-flowspec");
        if std::env::var_os("BGP_DEBUG").is_some() {
            eprintln!("{o}");
        }
        (o.contains("203.0.113.7/32") && o.contains("203.0.113.8/32")).then_some(o)
    });
    let line = out
        .lines()
        .find(|l| l.contains("203.0.113.7/32"))
        .expect("line");
    for want in [
        "[source: 203.0.113.7/32]",
        "[protocol: ==tcp]",
        "[destination-port: ==25 ==587]",
        "discard(as: 65001)",
    ] {
        assert!(line.contains(want), "GoBGP route lacks {want}: {line}");
    }
    let out6 = wait_for("v6 flowspec in GoBGP", Duration::from_secs(10), || {
        let o = gobgp_rib(&l.upstream, "ipv6-flowspec");
        o.contains("2001:db8:c:1::/64").then_some(o)
    });
    assert!(
        out6.contains("[protocol: ==udp]") && out6.contains("rate: 125000"),
        "{out6}"
    );
    let u4 = wait_for("RTBH in GoBGP", Duration::from_secs(10), || {
        let o = gobgp_rib(&l.upstream, "ipv4");
        o.contains("203.0.113.7/32").then_some(o)
    });
    for want in [
        "blackhole",
        "no-export",
        "65001:666",
        "65001:1:2",
        "192.0.2.66",
    ] {
        assert!(u4.contains(want), "GoBGP RTBH route lacks {want}:\n{u4}");
    }

    // GoBGP's own flowspec rules reach the agent: one outside the bounds (a rate limit of
    // a source outside the networks) is refused and counted, a plain discard of a customer
    // address is learnt.
    let gobgp_flow = |verb: &str, rule: &[&str]| {
        let mut args = vec![
            "gobgp",
            "-p",
            GOBGP_API,
            "global",
            "rib",
            "-a",
            "ipv4-flowspec",
            verb,
            "match",
        ];
        args.extend_from_slice(rule);
        l.upstream.run(&args).expect("gobgp flowspec");
    };
    gobgp_flow(
        "add",
        &[
            "source",
            "198.51.100.9/32",
            "protocol",
            "udp",
            "destination-port",
            "==53",
            "then",
            "rate-limit",
            "1000",
        ],
    );
    wait_for("refusal counted", Duration::from_secs(10), || {
        let s = &h.stats()[0];
        (s.learned_refused_by.get("not_source_discard") == Some(&1)).then_some(())
    });
    gobgp_flow("add", &["source", "203.0.113.44/32", "then", "discard"]);
    let learned = h.learned();
    let rules = wait_for("rule learnt from GoBGP", Duration::from_secs(10), || {
        let m = learned.borrow().clone();
        (!m.is_empty()).then_some(m)
    });
    let r: Vec<_> = rules.values().collect();
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].source, "203.0.113.44/32".parse::<IpNet>().unwrap());
    assert_eq!(r[0].action, LearnedAction::Discard);
    gobgp_flow("del", &["source", "203.0.113.44/32"]);
    wait_for("learnt rule withdrawn", Duration::from_secs(10), || {
        learned.borrow().is_empty().then_some(())
    });

    let mut next = (*standard_blocks()).clone();
    next.generation = 2;
    next.blocks
        .remove(&"203.0.113.7/32".parse::<IpNet>().unwrap());
    tx.send(Arc::new(next)).unwrap();
    wait_for("withdrawal in GoBGP", Duration::from_secs(10), || {
        let o = gobgp_rib(&l.upstream, "ipv4-flowspec");
        (!o.contains("203.0.113.7/32") && o.contains("203.0.113.8/32")).then_some(())
    });
    wait_for("RTBH withdrawal in GoBGP", Duration::from_secs(10), || {
        (!gobgp_rib(&l.upstream, "ipv4").contains("203.0.113.7/32")).then_some(())
    });

    tx.send(standard_blocks()).unwrap();
    wait_for("re-announced", Duration::from_secs(10), || {
        gobgp_rib(&l.upstream, "ipv4-flowspec")
            .contains("203.0.113.7/32")
            .then_some(())
    });
    g.stop(Duration::from_secs(3));
    wait_for("session down", Duration::from_secs(30), || {
        (!established(&h)).then_some(())
    });
    let _g = gobgpd(&l.upstream, dir.path());
    wait_for(
        "flowspec again after GoBGP restart",
        Duration::from_secs(40),
        || {
            let o = gobgp_rib(&l.upstream, "ipv4-flowspec");
            (o.contains("203.0.113.7/32") && o.contains("203.0.113.8/32")).then_some(())
        },
    );
    rt.block_on(h.shutdown());
}

/// Scripted measurement (not a pass/fail test): latency from `DesiredBlocks` to the route in
/// BIRD's table, and 10,000 rules in one session. Figures go to docs/performance.md.
/// Run: `cargo test --release --test netns bgp_bench_bird -- --ignored --nocapture`
#[test]
#[ignore]
fn bgp_bench_bird() {
    if !require_root("bgp_bench_bird") {
        return;
    }
    let l = link();
    let b = bird(&l.upstream, 65002, "");
    let (rt, tx, h) = speaker(
        &l,
        policy(65002, 179, ""),
        Arc::new(DesiredBlocks::default()),
    );
    wait_for("session", Duration::from_secs(20), || {
        established(&h).then_some(())
    });

    // 1. One block at a time: time until BIRD shows it (birdc polling included).
    let mut lat = Vec::new();
    let mut list = Vec::new();
    for i in 0..20u32 {
        let t = format!("203.0.113.{}/32", 100 + i);
        list.push(block(&t, &[Announce::Flowspec], None));
        let start = Instant::now();
        tx.send(blocks(u64::from(i) + 1, list.clone())).unwrap();
        let want = format!("flow4 {{ src {t}; }}");
        wait_for("route", Duration::from_secs(5), || {
            bird_flow4(&b).contains(&want).then_some(())
        });
        lat.push(start.elapsed());
    }
    lat.sort();
    eprintln!(
        "BENCH latency DesiredBlocks->BIRD table: median {:?} max {:?} (n=20, includes birdc polls)",
        lat[lat.len() / 2],
        lat[lat.len() - 1]
    );
    let s = h.stats()[0].clone();
    eprintln!(
        "BENCH speaker apply latency (watch -> UPDATEs written): last {} us, mean {} us (n={})",
        s.apply_latency_us.unwrap_or(0),
        s.apply_latency_sum_us / s.applies.max(1),
        s.applies
    );

    // 2. 10,000 rules in one go (198.18.0.0/15, RFC 2544 benchmarking space; routes only).
    let many: Vec<_> = (0..10_000u32)
        .map(|i| {
            let a = std::net::Ipv4Addr::from(0xc612_0000u32 + i);
            block(
                &format!("{a}/32"),
                &[Announce::Flowspec],
                Some(FlowspecScope {
                    proto: Some(6),
                    dports: vec![25],
                    rate_bytes_per_sec: 0,
                }),
            )
        })
        .collect();
    let start = Instant::now();
    tx.send(blocks(100, many)).unwrap();
    wait_for("10000 routes", Duration::from_secs(30), || {
        b.birdc("show route table flowtab4 count")
            .contains("10000 of 10000")
            .then_some(())
    });
    let took = start.elapsed();
    let s = &h.stats()[0];
    eprintln!(
        "BENCH 10000 flowspec rules DesiredBlocks->all in BIRD: {took:?} ({} UPDATEs sent in total; speaker apply latency {} us)",
        s.updates_sent,
        s.apply_latency_us.unwrap_or(0)
    );
    rt.block_on(h.shutdown());
}

#[test]
fn bgp_bird_session_over_ipv6_carries_both_families() {
    if !require_root("bgp_bird_session_over_ipv6_carries_both_families") {
        return;
    }
    let l = link();
    let b = bird_at(&l.upstream, 65001, "", "2001:db8:b::2", "2001:db8:b::1");
    // iBGP this time (remote AS = local AS): LOCAL_PREF sent, empty AS_PATH.
    let (rt, tx, h) = speaker(
        &l,
        policy_at("2001:db8:b::2", 65001, 179, ""),
        Arc::new(DesiredBlocks::default()),
    );
    wait_for("IPv6 session with BIRD", Duration::from_secs(20), || {
        established(&h).then_some(())
    });
    tx.send(standard_blocks()).unwrap();
    wait_for(
        "v4 flowspec over the v6 session",
        Duration::from_secs(10),
        || {
            bird_flow4(&b)
                .contains("flow4 { src 203.0.113.8/32; }")
                .then_some(())
        },
    );
    let o = wait_for(
        "v6 flowspec over the v6 session",
        Duration::from_secs(10),
        || {
            let o = b.birdc("show route table flowtab6 all");
            o.contains("flow6 { src 2001:db8:c:1::/64; next header 17; }")
                .then_some(o)
        },
    );
    assert!(o.contains("BGP.local_pref: 100"), "{o}");
    rt.block_on(h.shutdown());
}

// ---------------------------------------------------------------------------------------------
// TCP MD5, passive sessions and connection collisions
// ---------------------------------------------------------------------------------------------

const MD5_PASSWORD: &str = "egress-md5-Secret";

/// A password file holding `password` and a newline, as `echo` writes it.
fn password_file(dir: &Path, name: &str, password: &str) -> String {
    let f = dir.join(name);
    std::fs::write(&f, format!("{password}\n")).expect("write password file");
    f.display().to_string()
}

fn flowspec_only_block() -> Arc<DesiredBlocks> {
    blocks(
        1,
        vec![block("203.0.113.8/32", &[Announce::Flowspec], None)],
    )
}

/// Polls for `window` and fails as soon as the speaker's session is Established.
fn never_established(h: &SpeakerHandle, window: Duration) {
    let deadline = Instant::now() + window;
    while Instant::now() < deadline {
        assert!(!established(h), "session established: {:?}", h.stats());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bgp_bird_tcp_md5_right_and_wrong_password() {
    if !require_root("bgp_bird_tcp_md5_right_and_wrong_password") {
        return;
    }
    let l = link();
    let b = bird_conf(
        &l.upstream,
        65002,
        "",
        PEER_V4,
        AGENT_V4,
        &format!("passive on; password \"{MD5_PASSWORD}\";"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let right = password_file(dir.path(), "right", MD5_PASSWORD);
    let (rt, tx, h) = speaker(
        &l,
        policy(65002, 179, &format!("      md5_password_file: {right}\n")),
        flowspec_only_block(),
    );
    wait_for(
        "MD5-signed session with BIRD",
        Duration::from_secs(20),
        || established(&h).then_some(()),
    );
    wait_for(
        "flowspec route over the signed session",
        Duration::from_secs(10),
        || {
            bird_flow4(&b)
                .contains("flow4 { src 203.0.113.8/32; }")
                .then_some(())
        },
    );
    drop(tx);

    // A wrong password: the peer's kernel drops our SYNs, the session never comes up and
    // `status` says why.
    let wrong = password_file(dir.path(), "wrong", "not-the-password");
    rt.block_on(h.update_policy(policy(
        65002,
        179,
        &format!("      md5_password_file: {wrong}\n"),
    )));
    wait_for("old session down", Duration::from_secs(10), || {
        (!established(&h)).then_some(())
    });
    never_established(&h, Duration::from_secs(12));
    let s = h.stats()[0].clone();
    let e = s.last_error.clone().unwrap_or_default();
    assert!(e.contains("TCP MD5"), "status does not say why: {s:?}");
    assert!(s.connect_failures >= 1, "{s:?}");
    assert!(
        !b.birdc("show protocols agent").contains("Established"),
        "BIRD must not be up either"
    );

    // An unusable password file: named in `status`, no connection attempt.
    rt.block_on(h.update_policy(policy(
        65002,
        179,
        "      md5_password_file: /nonexistent/egressguard-md5\n",
    )));
    wait_for(
        "Idle, the file named in status",
        Duration::from_secs(10),
        || {
            let s = h.stats()[0].clone();
            (s.state == SessionState::Idle
                && s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("/nonexistent/egressguard-md5")))
            .then_some(())
        },
    );
    rt.block_on(h.shutdown());
}

#[test]
fn bgp_gobgp_tcp_md5() {
    if !require_root("bgp_gobgp_tcp_md5") {
        return;
    }
    let l = link();
    let dir = tempfile::tempdir().expect("tempdir");
    let _g = gobgpd_with(
        &l.upstream,
        dir.path(),
        &format!("auth-password = \"{MD5_PASSWORD}\""),
    );
    let right = password_file(dir.path(), "right", MD5_PASSWORD);
    let (rt, _tx, h) = speaker(
        &l,
        policy(65002, 179, &format!("      md5_password_file: {right}\n")),
        flowspec_only_block(),
    );
    wait_for(
        "MD5-signed session with GoBGP",
        Duration::from_secs(30),
        || established(&h).then_some(()),
    );
    wait_for("flowspec in GoBGP", Duration::from_secs(10), || {
        gobgp_rib(&l.upstream, "ipv4-flowspec")
            .contains("203.0.113.8/32")
            .then_some(())
    });
    rt.block_on(h.shutdown());
}

/// The agent's policy with `bgp.listen` on its veth address.
fn listening(mut p: Bgp, passive: bool) -> Bgp {
    p.listen = Some(format!("{AGENT_V4}:179").parse().unwrap());
    p.peers[0].passive = passive;
    p
}

/// BIRD that connects (not passive), quickly.
const BIRD_ACTIVE: &str = "connect delay time 1; connect retry time 2; error wait time 1, 4;";

#[test]
fn bgp_bird_connects_to_a_passive_agent() {
    if !require_root("bgp_bird_connects_to_a_passive_agent") {
        return;
    }
    let l = link();
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = password_file(dir.path(), "pw", MD5_PASSWORD);
    let b = bird_conf(
        &l.upstream,
        65002,
        "",
        PEER_V4,
        AGENT_V4,
        &format!("{BIRD_ACTIVE} password \"{MD5_PASSWORD}\";"),
    );
    // Passive, with TCP MD5 on the listening socket for BIRD's address. The socket is the
    // dual-stack `[::]:179`, so the key is installed for the IPv4-mapped address.
    let mut p = listening(
        policy(65002, 179, &format!("      md5_password_file: {pw}\n")),
        true,
    );
    p.listen = Some("[::]:179".parse().unwrap());
    let (rt, _tx, h) = speaker(&l, p, flowspec_only_block());
    wait_for(
        "BIRD's session to the agent",
        Duration::from_secs(30),
        || established(&h).then_some(()),
    );
    let s = h.stats()[0].clone();
    assert!(s.inbound, "a passive agent only accepts: {s:?}");
    assert_eq!(
        s.connect_failures, 0,
        "a passive agent never connects: {s:?}"
    );
    assert!(h.listener_stats().accepted >= 1);
    wait_for("flowspec route in BIRD", Duration::from_secs(10), || {
        bird_flow4(&b)
            .contains("flow4 { src 203.0.113.8/32; }")
            .then_some(())
    });
    rt.block_on(h.shutdown());
}

#[test]
fn bgp_bird_both_active_collisions_resolve() {
    if !require_root("bgp_bird_both_active_collisions_resolve") {
        return;
    }
    let l = link();
    let b = bird_conf(&l.upstream, 65002, "", PEER_V4, AGENT_V4, BIRD_ACTIVE);
    let (rt, _tx, h) = speaker(
        &l,
        listening(policy(65002, 179, ""), false),
        flowspec_only_block(),
    );
    // Both sides connect; restarting BIRD's protocol makes them race again. Each round the
    // session must come up and stay up (no endless collision loop), and when a collision
    // was resolved the survivor is BIRD's connection: its BGP Identifier (192.0.2.2) is the
    // higher one (RFC 4271 section 6.8).
    for round in 0..3 {
        wait_for("session up", Duration::from_secs(40), || {
            (established(&h) && b.birdc("show protocols agent").contains("Established"))
                .then_some(())
        });
        let before = h.stats()[0].clone();
        std::thread::sleep(Duration::from_secs(3));
        let after = h.stats()[0].clone();
        assert!(established(&h), "round {round}: session fell: {after:?}");
        assert_eq!(
            before.resets, after.resets,
            "round {round}: flapping: {after:?}"
        );
        eprintln!(
            "round {round}: {} collisions so far, survivor inbound={}",
            after.collisions, after.inbound
        );
        wait_for("flowspec route in BIRD", Duration::from_secs(10), || {
            bird_flow4(&b)
                .contains("flow4 { src 203.0.113.8/32; }")
                .then_some(())
        });
        b.birdc("restart agent");
        wait_for(
            "session down after restart",
            Duration::from_secs(10),
            || (!established(&h)).then_some(()),
        );
    }
    rt.block_on(h.shutdown());
}

/// A real collision, made deterministic: the agent's own connection is held in TCP connect
/// (BIRD's replies to it dropped) while BIRD connects to the agent and the session comes up;
/// then the held connection gets through, completes its OPEN exchange and collides with the
/// Established session: it is closed with CEASE 6/7 and the session stays.
#[test]
fn bgp_bird_collision_with_an_established_session() {
    if !require_root("bgp_bird_collision_with_an_established_session") {
        return;
    }
    let l = link();
    // Replies from BIRD's port 179 (only the agent-initiated connection has them) dropped.
    l.agent
        .run(&["nft", "add table inet colltest"])
        .expect("nft table");
    l.agent
        .run(&[
            "nft",
            "add chain inet colltest in { type filter hook input priority 0; }",
        ])
        .expect("nft chain");
    l.agent
        .run(&["nft", "add rule inet colltest in tcp sport 179 drop"])
        .expect("nft rule");
    // Without graceful restart: with it, BIRD takes a new OPEN from the agent while the
    // session is Established for the agent's restart (RFC 4724 section 4.2) and ends the old
    // session itself, so the RFC 4271 collision rule is not what decides.
    let mut p = listening(policy(65002, 179, ""), false);
    p.graceful_restart.restart_time = 0;
    let (rt, _tx, h) = speaker(&l, p, flowspec_only_block());
    wait_for(
        "the agent's connect in flight",
        Duration::from_secs(5),
        || {
            h.stats()
                .first()
                .is_some_and(|s| s.state == SessionState::Connect)
                .then_some(())
        },
    );
    let b = bird_conf(&l.upstream, 65002, "", PEER_V4, AGENT_V4, BIRD_ACTIVE);
    wait_for(
        "BIRD's session to the agent",
        Duration::from_secs(20),
        || established(&h).then_some(()),
    );
    assert!(h.stats()[0].inbound);
    l.agent
        .run(&["nft", "delete table inet colltest"])
        .expect("nft delete");
    // The agent's SYN is retransmitted within its 5 s connect timeout and now answered.
    let s = wait_for("the collision", Duration::from_secs(15), || {
        let s = h.stats()[0].clone();
        let bird_closed_it = s
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("received NOTIFICATION 6/7"));
        (s.collisions >= 1 || bird_closed_it).then_some(s)
    });
    eprintln!("collision resolved: {s:?}");
    std::thread::sleep(Duration::from_secs(1));
    let s = h.stats()[0].clone();
    assert_eq!(s.state, SessionState::Established, "{s:?}");
    assert!(s.inbound, "BIRD's connection stays: {s:?}");
    assert_eq!(s.resets, 0, "the session was never reset: {s:?}");
    assert!(b.birdc("show protocols agent").contains("Established"));
    wait_for("flowspec route in BIRD", Duration::from_secs(10), || {
        bird_flow4(&b)
            .contains("flow4 { src 203.0.113.8/32; }")
            .then_some(())
    });
    // The agent's attempt that lost ended inside the session; once the session ends the
    // agent dials again (BIRD, disabled, turns it away).
    b.birdc("disable agent");
    let s = wait_for("the agent dials again", Duration::from_secs(15), || {
        let s = h.stats()[0].clone();
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("connect:") || e.contains("OPEN exchange"))
            .then_some(s)
    });
    assert_eq!(s.resets, 1, "{s:?}");
    rt.block_on(h.shutdown());
}

// ---------------------------------------------------------------------------------------------
// Flowspec validation at the receiving router (README, "Flowspec validation")
// ---------------------------------------------------------------------------------------------

/// BIRD as a route reflector/upstream would run it: `validate` on the flowspec channels as
/// `validation` says, the import filter of README's example when `filtered`.
fn bird_validating(validation: &str, filtered: bool) -> String {
    let filter = if filtered {
        r#"
filter egressguard_flow4 {
  if net.src ~ [ 203.0.113.0/24{32,32} ] then accept;
  reject;
}
filter egressguard_flow6 {
  if net.src ~ [ 2001:db8:c::/48{64,128} ] then accept;
  reject;
}
"#
    } else {
        "filter egressguard_flow4 { accept; }\nfilter egressguard_flow6 { accept; }\n"
    };
    format!(
        r#"
router id {PEER_V4};
log "{{log}}" all;
flow4 table flowtab4;
flow6 table flowtab6;
ipv4 table master4 {{ trie on; }};
ipv6 table master6 {{ trie on; }};
protocol device {{ }}
{filter}
protocol static base4 {{ ipv4; route 203.0.113.0/24 unreachable; }}
protocol static base6 {{ ipv6; route 2001:db8:c::/48 unreachable; }}
protocol bgp agent {{
  local {PEER_V4} as 65002;
  neighbor {AGENT_V4} as 65001;
  passive on;
  hold time 9;
  ipv4 {{ import all; export none; }};
  ipv6 {{ import all; export none; }};
  flow4 {{ table flowtab4; base table master4; {validation} import filter egressguard_flow4; import keep filtered on; export none; }};
  flow6 {{ table flowtab6; base table master6; {validation} import filter egressguard_flow6; import keep filtered on; export none; }};
}}
"#
    )
}

#[test]
fn bgp_bird_flowspec_validation_as_documented() {
    if !require_root("bgp_bird_flowspec_validation_as_documented") {
        return;
    }
    let l = link();
    // RFC 8955 section 6 validation on (what a careful upstream may run by default): our
    // source-only rules have no destination prefix, so they are invalid there.
    let b = Bird::start_with(&l.upstream, &bird_validating("validate on;", false));
    let (rt, tx, h) = speaker(
        &l,
        policy(65002, 179, ""),
        Arc::new(DesiredBlocks::default()),
    );
    wait_for("session with BIRD", Duration::from_secs(20), || {
        established(&h).then_some(())
    });
    let outside = block("198.51.100.9/32", &[Announce::Flowspec], None);
    let mut set = (*standard_blocks()).clone();
    set.blocks.insert(outside.0, outside.1);
    tx.send(Arc::new(set)).unwrap();
    let v4 = "flow4 { src 203.0.113.8/32; }";
    let out = wait_for("flowspec route in BIRD", Duration::from_secs(10), || {
        let o = b.birdc("show route table flowtab4 all");
        if std::env::var_os("BGP_DEBUG").is_some() {
            eprintln!("{o}\n{}", b.log());
        }
        o.contains(v4).then_some(o)
    });
    // BIRD marks a flowspec route that fails validation "unreachable": it is neither used
    // nor exported further. Every one of ours fails (no destination prefix).
    let flow_lines = |o: &str| -> Vec<String> {
        o.lines()
            .filter(|l| l.starts_with("flow4 ") || l.starts_with("flow6 "))
            .map(str::to_owned)
            .collect()
    };
    let v6 = "flow6 { src 2001:db8:c:1::/64; next header 17; }";
    let out6 = wait_for(
        "IPv6 flowspec route in BIRD",
        Duration::from_secs(10),
        || {
            let o = b.birdc("show route table flowtab6 all");
            o.contains(v6).then_some(o)
        },
    );
    let invalid: Vec<String> = flow_lines(&out)
        .into_iter()
        .chain(flow_lines(&out6))
        .collect();
    assert_eq!(invalid.len(), 4, "{out}{out6}");
    for l in &invalid {
        assert!(
            l.contains("unreachable"),
            "validated rule not marked invalid: {l}"
        );
    }

    // As README prescribes: validation off for this session, an import filter that takes
    // only rules whose source lies in the customer aggregates behind this router.
    b.reconfigure(&bird_validating("validate off;", true));
    let (out, out6) = wait_for(
        "rules valid under the prescribed configuration",
        Duration::from_secs(20),
        || {
            let o = b.birdc("show route table flowtab4 all");
            let o6 = b.birdc("show route table flowtab6 all");
            let lines: Vec<String> = flow_lines(&o).into_iter().chain(flow_lines(&o6)).collect();
            (lines.len() == 3 && lines.iter().all(|l| !l.contains("unreachable")))
                .then_some((o, o6))
        },
    );
    for want in [v4, "flow4 { src 203.0.113.7/32; proto 6; dport 25,587; }"] {
        assert!(out.contains(want), "{want} missing:\n{out}");
    }
    assert!(out6.contains(v6), "{out6}");
    // The import filter is what stands in for validation: a rule for an address that is not
    // this customer's is refused (shown as filtered, never used).
    assert!(
        !out.contains("198.51.100.9"),
        "rule outside the aggregate accepted:\n{out}"
    );
    let filtered = b.birdc("show route table flowtab4 filtered");
    assert!(filtered.contains("src 198.51.100.9/32"), "{filtered}");
    rt.block_on(h.shutdown());
}
