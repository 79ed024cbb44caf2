//! Helpers shared by the `decide_*` integration tests: a policy builder and detections.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use egressguard::messages::{
    Category, Counted, Crossed, Detection, Evidence, FlowSample, Time, proto,
};
use egressguard::policy::Policy;
use ipnet::IpNet;

/// 2026-11-25T00:00:00Z: the tests' epoch.
pub const T0: u64 = 1_795_564_800;

/// `T0 + secs`.
pub fn at(secs: u64) -> Time {
    Time::from_secs(T0 + secs)
}

pub const HOUR: u64 = 3_600;
pub const DAY: u64 = 86_400;

/// The customer networks, allowlist, ladder (quarantine 1h, block until reconnect,
/// terminate; forget after 30 days) and a BGP peer that takes flowspec and RTBH.
pub const BASE: &str = r#"version: 1
mode: enforce
networks:
  - prefix: 203.0.113.0/24
    name: cust-a
  - prefix: 198.51.100.0/24
    name: cust-b
  - prefix: 2001:db8::/48
    name: cust-v6
  - prefix: 100.64.0.0/10
    name: burst
allow:
  - 203.0.113.250
escalation:
  forget_after: 30d
  ladder:
    - action: quarantine
      for: 1h
    - action: block
      until: reconnect
    - action: terminate
enforcement:
  walled_garden: [192.0.2.53]
bgp:
  local_as: 64512
  router_id: 192.0.2.1
  peers:
    - name: rr
      address: 192.0.2.2
      remote_as: 64512
      families: [ipv4-unicast, ipv4-flowspec]
      announce: [flowspec, rtbh]
      rtbh_next_hop_v4: 192.0.2.1
actions:
  spam:
    announce: [flowspec]
    flowspec_match: service
  flood:
    announce: [rtbh, flowspec]
    rate_limit: 1000
  network_scan:
    start_at: 2
"#;

/// The base policy plus `extra` YAML at the top level (e.g. a `circuit_breaker:` or
/// `reconnect:` section).
pub fn policy(extra: &str) -> Arc<Policy> {
    let text = format!("{BASE}{extra}");
    match Policy::from_text(&text, Path::new("test.yaml")) {
        Ok(p) => Arc::new(p),
        Err(e) => panic!("test policy invalid: {e}\n{text}"),
    }
}

/// One reconnect entry as YAML (under `reconnect:`).
pub fn reconnect_entry(
    addr: &str,
    ticket: &str,
    conditions: &str,
    expires: &str,
    ovr: bool,
) -> String {
    format!(
        "  - address: {addr}\n    ticket: {ticket}\n    authorised_by: desk@example\n    conditions: [{conditions}]\n    expires: {expires}\n    override_termination: {ovr}\n"
    )
}

pub const ALL_CONDITIONS: &str = "fee_paid, reinstalled, acknowledged";
pub const FAR: &str = "2027-12-31T23:59:59Z";

pub fn net(s: &str) -> IpNet {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .unwrap()
}

/// A detection of `addr` for `category` at `time`, its evidence window the 60 s before.
pub fn detection(addr: &str, category: Category, time: Time) -> Detection {
    let start = time.saturating_sub(std::time::Duration::from_secs(60));
    Detection {
        time,
        source: net(addr),
        category,
        profile: "default".into(),
        evidence: Evidence {
            window_start: start,
            window_end: time,
            crossed: vec![Crossed {
                signal: "distinct_ports".into(),
                value: 150.0,
                threshold: 100.0,
            }],
            counts: BTreeMap::from([("flows".to_owned(), 300.0)]),
            top_destinations: vec![Counted {
                key: "192.0.2.200".parse().unwrap(),
                count: 300,
            }],
            top_ports: vec![
                Counted { key: 80, count: 10 },
                Counted { key: 443, count: 5 },
            ],
            first_seen: start,
            last_seen: time,
            sample: vec![FlowSample {
                time,
                dst: "192.0.2.200".parse().unwrap(),
                proto: proto::UDP,
                sport: 5000,
                dport: 80,
                answered: false,
            }],
            spoofing: None,
            pattern: None,
        },
    }
}
