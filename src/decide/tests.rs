use std::path::Path;

use super::*;
use crate::messages::{Counted, Crossed, Evidence};

const POLICY: &str = r#"version: 1
mode: enforce
networks:
  - prefix: 203.0.113.0/24
  - prefix: 2001:db8::/48
enforcement:
  ipv6_block_prefix: 64
circuit_breaker:
  max_new_blocks_per_minute: 2
"#;

fn policy() -> Arc<Policy> {
    Arc::new(Policy::from_text(POLICY, Path::new("t.yaml")).unwrap())
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn t(secs: u64) -> Time {
    Time::from_secs(1_795_564_800 + secs)
}

fn detection(src: &str, secs: u64) -> Detection {
    Detection {
        time: t(secs),
        source: net(src),
        category: Category::PortScan,
        profile: "default".into(),
        evidence: Evidence {
            window_start: t(secs.saturating_sub(10)),
            window_end: t(secs),
            crossed: vec![Crossed {
                signal: "distinct_ports".into(),
                value: 120.0,
                threshold: 100.0,
            }],
            counts: BTreeMap::new(),
            top_destinations: vec![],
            top_ports: vec![Counted { key: 22, count: 3 }],
            first_seen: t(secs),
            last_seen: t(secs),
            sample: vec![],
            spoofing: None,
            pattern: None,
        },
    }
}

fn decider() -> Decider {
    Decider::new(
        policy(),
        Store::open_in_memory().unwrap(),
        InfraSet::default(),
        t(0),
    )
    .unwrap()
}

#[test]
fn infra_set_overlaps_both_ways() {
    let i = InfraSet::new([net("192.0.2.0/28"), net("198.51.100.1/32")]);
    assert!(i.overlaps(&net("192.0.2.5/32")));
    assert!(i.overlaps(&net("198.51.100.0/24")));
    assert!(!i.overlaps(&net("192.0.2.16/32")));
}

#[test]
fn ipv6_sources_are_held_per_configured_prefix() {
    let mut d = decider();
    let out = d
        .on_detection(&detection("2001:db8:0:7::1234/128", 5))
        .unwrap();
    assert_eq!(out[0].target, net("2001:db8:0:7::/64"));
    assert!(d.hold(&net("2001:db8:0:7::99/128")).is_some());
}

#[test]
fn a_batch_that_cannot_be_recorded_is_not_decided() {
    let mut d = decider();
    d.store
        .execute_batch_for_test(
            "CREATE TRIGGER fail BEFORE INSERT ON blocks BEGIN SELECT RAISE(ABORT, 'disk gone'); END;",
        )
        .unwrap();
    let err = d.on_detection(&detection("203.0.113.5/32", 5)).unwrap_err();
    assert!(matches!(err, DecideError::State(_)), "{err:?}");
    assert!(d.desired().blocks.is_empty());
    assert!(d.list().is_empty());
    assert_eq!(d.generation(), 1);
    d.store
        .execute_batch_for_test("DROP TRIGGER fail;")
        .unwrap();
    // The failed attempt left no offense behind: this is the first.
    let out = d.on_detection(&detection("203.0.113.5/32", 6)).unwrap();
    assert_eq!(out[0].offense, 1);
    assert_eq!(d.store.offense_count().unwrap(), 1);
    // Nor a breaker count: a second new block still fits in the minute.
    assert_eq!(
        d.on_detection(&detection("203.0.113.6/32", 7))
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn breaker_window_slides_with_event_time() {
    let mut d = decider();
    assert_eq!(
        d.on_detection(&detection("203.0.113.1/32", 0))
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        d.on_detection(&detection("203.0.113.2/32", 30))
            .unwrap()
            .len(),
        1
    );
    // 61 s after the first, only one block is in the window: no trip.
    assert_eq!(
        d.on_detection(&detection("203.0.113.3/32", 61))
            .unwrap()
            .len(),
        1
    );
    assert!(!d.breaker_tripped());
    assert!(
        d.on_detection(&detection("203.0.113.4/32", 62))
            .unwrap()
            .is_empty()
    );
    assert!(d.breaker_tripped());
    let s = d.status().breaker;
    assert_eq!(s.new_blocks_last_minute, 2);
    assert!(s.reason.unwrap().contains("limit of 2"));
}

#[test]
fn breaker_state_survives_a_restart_within_the_minute() {
    let mut d = decider();
    d.on_detection(&detection("203.0.113.1/32", 0)).unwrap();
    d.on_detection(&detection("203.0.113.2/32", 1)).unwrap();
    let store = d.into_store();
    let mut d = Decider::new(policy(), store, InfraSet::default(), t(2)).unwrap();
    assert!(
        d.on_detection(&detection("203.0.113.3/32", 3))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn refusals_read_well() {
    let r = Refusal::Expired { expires: t(0) };
    assert_eq!(
        r.to_string(),
        "the authorisation expired at 2026-11-25T00:00:00Z"
    );
    let o = ReconnectOutcome {
        ticket: "A-1".into(),
        address: net("203.0.113.5/32"),
        result: ReconnectResult::Refused(Refusal::NotBlocked),
    };
    assert_eq!(
        o.to_string(),
        "reconnect A-1 for 203.0.113.5/32: refused: the address is not blocked"
    );
    let json = serde_json::to_value(&o).unwrap();
    assert_eq!(json["result"]["result"], "refused");
    assert_eq!(json["result"]["reason"]["refusal"], "not_blocked");
}

/// A policy whose port scans announce flowspec and RTBH to one peer; `extra` is appended.
fn bgp_decider(extra: &str) -> Decider {
    let text = format!(
        "{POLICY}actions:\n  port_scan:\n    announce: [flowspec, rtbh]\nbgp:\n  local_as: 65001\n  router_id: 192.0.2.1\n  peers:\n    - address: 192.0.2.2\n      remote_as: 65002\n      families: [ipv4-flowspec, ipv6-flowspec, ipv4-unicast, ipv6-unicast]\n      announce: [flowspec, rtbh]\n      rtbh_next_hop_v4: 192.0.2.66\n      rtbh_next_hop_v6: 100::1\n{extra}"
    );
    let p = Arc::new(Policy::from_text(&text, Path::new("t.yaml")).unwrap());
    Decider::new(
        p,
        Store::open_in_memory().unwrap(),
        InfraSet::default(),
        t(0),
    )
    .unwrap()
}

#[test]
fn operator_blocks_announce_like_the_strictest_category_v4_and_v6() {
    let mut d = bgp_decider("");
    let both = vec![Announce::Flowspec, Announce::Rtbh];
    d.on_operator_block(net("203.0.113.9/32"), "ticket 1", None, "op", t(1))
        .unwrap();
    d.on_operator_block(net("2001:db8:0:5::7/128"), "ticket 2", None, "op", t(1))
        .unwrap();
    let want = d.desired();
    for target in ["203.0.113.9/32", "2001:db8:0:5::/64"] {
        let b = &want.blocks[&net(target)];
        assert_eq!(b.announce, both, "{target}");
        assert_eq!(
            b.flowspec,
            Some(FlowspecScope {
                proto: None,
                dports: vec![],
                rate_bytes_per_sec: 0
            }),
            "{target}: a whole-source discard"
        );
    }
    // `operator_blocks:` narrows it.
    let mut d = bgp_decider("operator_blocks:\n  announce: [flowspec]\n  rate_limit: 1000\n");
    d.on_operator_block(net("203.0.113.9/32"), "ticket 1", None, "op", t(1))
        .unwrap();
    let b = &d.desired().blocks[&net("203.0.113.9/32")];
    assert_eq!(b.announce, vec![Announce::Flowspec]);
    assert_eq!(b.flowspec.as_ref().unwrap().rate_bytes_per_sec, 1000);
}

#[test]
fn an_operator_block_with_the_routers_address_inside_is_not_announced() {
    let mut d = bgp_decider("");
    d.set_infra(InfraSet::new([net("2001:db8:0:5::1/128")]), t(0))
        .unwrap();
    d.on_operator_block(net("2001:db8:0:5::7/128"), "ticket", None, "op", t(1))
        .unwrap();
    let b = &d.desired().blocks[&net("2001:db8:0:5::/64")];
    assert!(!b.except.is_empty());
    assert!(b.announce.is_empty() && b.flowspec.is_none(), "{b:?}");
}

#[test]
fn a_quarantine_is_not_announced_by_default_and_its_escalation_is() {
    let mut d = bgp_decider("");
    d.on_detection(&detection("203.0.113.7/32", 5)).unwrap();
    let b = &d.desired().blocks[&net("203.0.113.7/32")];
    assert_eq!(b.kind, BlockKind::Quarantine);
    assert!(b.announce.is_empty() && b.flowspec.is_none(), "{b:?}");
    // The second offense (after the quarantine) climbs to a block: announced.
    d.on_detection(&detection("203.0.113.7/32", 4000)).unwrap();
    let b = &d.desired().blocks[&net("203.0.113.7/32")];
    assert_eq!(b.kind, BlockKind::Block);
    assert_eq!(b.announce, vec![Announce::Flowspec, Announce::Rtbh]);
    // A rung may ask for its quarantines to be announced.
    let mut d = bgp_decider(
        "escalation:\n  ladder:\n    - action: quarantine\n      for: 1h\n      announce: true\n    - action: block\n      until: reconnect\n      announce: false\n",
    );
    d.on_detection(&detection("203.0.113.7/32", 5)).unwrap();
    assert_eq!(
        d.desired().blocks[&net("203.0.113.7/32")].announce,
        vec![Announce::Flowspec, Announce::Rtbh]
    );
    d.on_detection(&detection("203.0.113.7/32", 4000)).unwrap();
    assert!(
        d.desired().blocks[&net("203.0.113.7/32")]
            .announce
            .is_empty()
    );
}
