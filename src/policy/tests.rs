//! One test per validation rule, each with a small broken file and the exact position the
//! error must point at.

use std::path::Path;

use super::*;

const BASE: &str = "\
version: 1
mode: enforce
networks:
  - prefix: 203.0.113.0/24
  - prefix: 2001:db8:c::/64
";

fn check(text: &str) -> (Option<Policy>, Vec<Diagnostic>) {
    Policy::check_text(text, Path::new("p.yaml"))
}

/// The errors as `line:col: path: message`.
fn errors(text: &str) -> Vec<String> {
    let (p, diags) = check(text);
    let errs: Vec<String> = diags
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| format!("{}:{}: {}: {}", d.line, d.column, d.path, d.message))
        .collect();
    assert_eq!(
        p.is_none(),
        !errs.is_empty(),
        "policy returned despite errors: {errs:?}"
    );
    errs
}

fn warnings(text: &str) -> Vec<String> {
    check(text)
        .1
        .iter()
        .filter(|d| d.severity == Severity::Warning)
        .map(|d| format!("{}:{}: {}: {}", d.line, d.column, d.path, d.message))
        .collect()
}

fn one_error(text: &str, expect_at: &str, expect_msg: &str) {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    assert!(
        errs[0].starts_with(expect_at),
        "wrong position: {} (expected {expect_at})",
        errs[0]
    );
    assert!(
        errs[0].contains(expect_msg),
        "wrong message: {} (expected …{expect_msg}…)",
        errs[0]
    );
}

#[test]
fn base_is_valid_and_defaults_apply() {
    let (p, diags) = check(BASE);
    assert!(diags.is_empty(), "{diags:#?}");
    let p = p.unwrap();
    assert!(p.enforcing());
    assert_eq!(
        p.profiles["default"].port_scan.distinct_ports,
        defaults::PORTSCAN_DISTINCT_PORTS
    );
    assert_eq!(p.escalation.ladder.len(), 3);
    assert_eq!(p.enforcement.table, "egressguard");
    assert_eq!(p.reconnect_requires.len(), 3);
}

#[test]
fn every_shipped_policy_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let mut files = vec![dir.join("default.yaml")];
    for e in std::fs::read_dir(dir.join("examples")).unwrap() {
        files.push(e.unwrap().path());
    }
    assert!(files.len() >= 4);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let (p, diags) = Policy::check_text(&text, &f);
        assert!(
            p.is_some() && diags.is_empty(),
            "{}: {diags:#?}",
            f.display()
        );
    }
}

#[test]
fn default_yaml_matches_the_built_in_defaults() {
    // The shipped file documents the defaults; it must agree with defaults.rs.
    let shipped =
        Policy::from_text(crate::demo::DEFAULT_POLICY, Path::new("default.yaml")).unwrap();
    let (builtin, _) = check(BASE);
    let builtin = builtin.unwrap();
    assert_eq!(shipped.profiles["default"], builtin.profiles["default"]);
    assert_eq!(shipped.escalation, builtin.escalation);
    assert_eq!(shipped.enforcement, builtin.enforcement);
    assert_eq!(shipped.circuit_breaker, builtin.circuit_breaker);
    assert_eq!(shipped.anti_spoofing, builtin.anti_spoofing);
    assert_eq!(shipped.detection, builtin.detection);
    assert_eq!(shipped.notify, builtin.notify);
    assert_eq!(shipped.reconnect_requires, builtin.reconnect_requires);
    assert_eq!(
        shipped.mode,
        Mode::DryRun,
        "the shipped default must be dry-run"
    );
}

#[test]
fn syntax_error_has_position() {
    one_error("version: 1\nnetworks:\n  - prefix: [1.2.3.0/24\n", "", "");
    let errs = errors("version: 1\nnetworks:\n  - prefix: [1.2.3.0/24\n");
    assert!(
        errs[0].starts_with("4:") || errs[0].starts_with("3:"),
        "{errs:?}"
    );
}

#[test]
fn a_tab_in_the_indentation_gets_a_help_line_naming_it() {
    let (p, diags) = check("version: 1\nnetworks:\n\t- prefix: 203.0.113.0/24\n");
    assert!(p.is_none());
    assert_eq!(diags.len(), 1, "{diags:?}");
    let d = &diags[0];
    assert_eq!((d.line, d.column), (3, 1), "{d:?}");
    assert!(
        !d.message.contains("at line"),
        "position said twice: {}",
        d.message
    );
    assert_eq!(
        d.help.as_deref(),
        Some("line 3 is indented with a tab; YAML allows only spaces for indentation")
    );
    // A syntax error without a tab keeps its own help (none here).
    let (_, diags) = check("version: 1\nnetworks:\n  - prefix: [1.2.3.0/24\n");
    assert!(
        diags
            .iter()
            .all(|d| !d.help.as_deref().unwrap_or("").contains("tab"))
    );
}

#[test]
fn unknown_field_names_line_and_the_allowed_names() {
    one_error(
        &format!("{BASE}  - prefx: 10.0.0.0/8\n"),
        "6:5",
        "unknown field `prefx`, expected one of `prefix`",
    );
}

#[test]
fn unknown_mode_lists_values() {
    one_error(
        "version: 1\nmode: enforcing\n",
        "2:7",
        "unknown variant `enforcing`",
    );
}

#[test]
fn empty_file() {
    one_error("  \n", "1:1", "empty");
}

#[test]
fn missing_or_wrong_version() {
    one_error(
        "mode: enforce\nnetworks:\n  - prefix: 10.0.0.0/8\n",
        "1:1",
        "schema version",
    );
    one_error(
        &BASE.replace("version: 1", "version: 2"),
        "1:10",
        "schema version 2 is not supported",
    );
}

#[test]
fn no_networks() {
    one_error("version: 1\n", "1:1", "no customer networks");
}

#[test]
fn bad_prefix_and_host_bits() {
    one_error(
        &BASE.replace("203.0.113.0/24", "203.0.113.0/33"),
        "4:13",
        "is not an IP address or prefix",
    );
    let errs = errors(&BASE.replace("203.0.113.0/24", "203.0.113.7/24"));
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("4:13") && errs[0].contains("host bits"),
        "{errs:?}"
    );
    let (_, diags) = check(&BASE.replace("203.0.113.0/24", "203.0.113.7/24"));
    assert_eq!(diags[0].help.as_deref(), Some("write `203.0.113.0/24`"));
}

#[test]
fn duplicate_network() {
    one_error(
        &format!("{BASE}  - prefix: 203.0.113.0/24\n"),
        "6:13",
        "listed twice",
    );
}

#[test]
fn unknown_profile() {
    one_error(
        &format!("{BASE}    profile: mailrelay\n"),
        "6:14",
        "profile `mailrelay` is not defined",
    );
}

#[test]
fn every_error_is_reported_not_just_the_first() {
    let text = "\
version: 1
networks:
  - prefix: 10.0.0.0/33
  - prefix: 10.1.0.0/16
    profile: nope
profiles:
  default:
    port_scan:
      window: 10
      distinct_ports: 0
      min_unanswered_ratio: 1.5
";
    let errs = errors(text);
    assert_eq!(errs.len(), 5, "{errs:#?}");
    let at: Vec<&str> = errs.iter().map(|e| e.split(": ").next().unwrap()).collect();
    assert_eq!(
        at,
        ["3:13", "5:14", "9:15", "10:23", "11:29"],
        "in file order"
    );
}

#[test]
fn durations_need_units_and_parse() {
    let p = |w: &str| format!("{BASE}profiles:\n  default:\n    flood:\n      window: {w}\n");
    one_error(&p("10"), "9:15", "has no unit");
    one_error(&p("ten seconds"), "9:15", "is not a duration");
    one_error(&p("0s"), "9:15", "longer than zero");
    assert!(errors(&p("1m 30s")).is_empty());
}

#[test]
fn thresholds_must_be_positive_numbers() {
    let p = |v: &str| format!("{BASE}profiles:\n  default:\n    flood:\n      pps: {v}\n");
    one_error(&p("0"), "9:12", "0 is not allowed");
    one_error(&p("lots"), "9:12", "is not a whole number");
    let ok = check(&p("150k")).0.unwrap();
    assert_eq!(ok.profiles["default"].flood.pps, 150_000);
    let ok = check(&p("1.5M")).0.unwrap();
    assert_eq!(ok.profiles["default"].flood.pps, 1_500_000);
}

#[test]
fn per_protocol_flood_rates_parse_inherit_and_refuse_zero() {
    let p = |k: &str, v: &str| {
        format!(
            "{BASE}profiles:\n  default:\n    flood:\n      {k}: {v}\n  relay:\n    spam:\n      enabled: false\n"
        )
    };
    one_error(&p("udp_pps", "0"), "9:16", "0 is not allowed");
    one_error(&p("icmp_pps", "many"), "9:17", "is not a whole number");
    let ok = check(&p("udp_pps", "30k")).0.unwrap();
    assert_eq!(ok.profiles["default"].flood.udp_pps, 30_000);
    assert_eq!(ok.profiles["default"].flood.icmp_pps, 5_000, "built-in");
    // Another profile inherits `default`'s.
    assert_eq!(ok.profiles["relay"].flood.udp_pps, 30_000);
}

#[test]
fn ratios_between_zero_and_one() {
    let t =
        format!("{BASE}profiles:\n  default:\n    network_scan:\n      min_unanswered_ratio: 2\n");
    one_error(&t, "9:29", "not a ratio");
}

#[test]
fn ports_nonzero_and_nonempty() {
    let t = format!("{BASE}profiles:\n  default:\n    spam:\n      ports: [25, 0]\n");
    one_error(&t, "9:19", "port 0");
    let t = format!("{BASE}profiles:\n  default:\n    spam:\n      ports: []\n");
    one_error(&t, "9:14", "empty");
}

#[test]
fn spread_brute_force_defaults_and_bounds() {
    let p = check(BASE).0.unwrap();
    let s = &p.profiles["default"].brute_force.spread;
    assert!(s.enabled);
    assert_eq!((s.attempts, s.distinct_targets), (60, 20));
    assert_eq!(p.profiles["default"].spam.ports, vec![25, 465, 587]);
    let t = format!(
        "{BASE}profiles:\n  default:\n    brute_force:\n      spread:\n        distinct_targets: 100\n"
    );
    one_error(&t, "10:27", "cannot be told apart");
    let t = format!(
        "{BASE}profiles:\n  default:\n    brute_force:\n      spread: {{attempts: 1000}}\n"
    );
    one_error(&t, "9:26", "out of range");
    let t =
        format!("{BASE}profiles:\n  default:\n    brute_force:\n      spread: {{targets: 10}}\n");
    assert!(!errors(&t).is_empty());
    // A profile inherits the default profile's spread and changes what it says.
    let t = format!(
        "{BASE}    profile: deploy\nprofiles:\n  default:\n    brute_force:\n      spread: {{attempts: 90}}\n  deploy:\n    brute_force:\n      spread: {{distinct_targets: 30}}\n"
    );
    let p = check(&t).0.unwrap();
    let s = &p.profiles["deploy"].brute_force.spread;
    assert_eq!((s.attempts, s.distinct_targets), (90, 30));
}

#[test]
fn profiles_inherit_from_default() {
    let t = format!(
        "{BASE}    profile: relay\nprofiles:\n  default:\n    spam: {{distinct_destinations: 10}}\n  relay:\n    spam: {{enabled: false}}\n"
    );
    let p = check(&t).0.unwrap();
    let relay = &p.profiles["relay"];
    assert!(!relay.spam.enabled);
    assert_eq!(
        relay.spam.distinct_destinations, 10,
        "inherited from default"
    );
    assert_eq!(
        p.profile_of("2001:db8:c::5".parse().unwrap()).unwrap().0,
        "relay"
    );
}

#[test]
fn unused_profile_is_a_warning() {
    let t = format!("{BASE}profiles:\n  spare: {{}}\n");
    assert!(errors(&t).is_empty());
    let w = warnings(&t);
    assert_eq!(w.len(), 1);
    assert!(
        w[0].starts_with("7:10") && w[0].contains("not used"),
        "{w:?}"
    );
}

#[test]
fn overlapping_networks_resolve_by_longest_prefix() {
    let t = "version: 1\nnetworks:\n  - prefix: 10.0.0.0/8\n  - prefix: 10.1.0.0/16\n    profile: small\nprofiles:\n  small: {}\n";
    let p = check(t).0.unwrap();
    assert_eq!(
        p.network_of("10.1.2.3".parse().unwrap()).unwrap().profile,
        "small"
    );
    assert_eq!(
        p.network_of("10.2.2.3".parse().unwrap()).unwrap().profile,
        "default"
    );
    assert!(p.network_of("11.0.0.1".parse().unwrap()).is_none());
}

#[test]
fn bad_allow_entry() {
    one_error(
        &format!("{BASE}allow:\n  - router\n"),
        "7:5",
        "is not an IP address or prefix",
    );
}

#[test]
fn an_allow_entry_covering_a_customer_network_is_an_error() {
    one_error(
        &format!("{BASE}allow:\n  - 203.0.0.0/16\n"),
        "7:5: allow[0]",
        "covers the whole customer network 203.0.113.0/24",
    );
    // Part of it, wider than one held address: customers exempted by the block.
    one_error(
        &format!("{BASE}allow:\n  - 203.0.113.0/30\n"),
        "7:5: allow[0]",
        "covers part of the customer network 203.0.113.0/24",
    );
    // IPv6: wider than one held target.
    one_error(
        &format!("{BASE}allow:\n  - 2001:db8:c::/120\nenforcement:\n  ipv6_block_prefix: 128\n"),
        "7:5: allow[0]",
        "wider than one held target (/128)",
    );
    // The router's own address, one by one, is what an allow entry in customer space is for.
    assert!(errors(&format!("{BASE}allow:\n  - 203.0.113.1\n")).is_empty());
    assert!(errors(&format!("{BASE}allow:\n  - 198.51.100.0/24\n")).is_empty());
}

#[test]
fn a_walled_garden_inside_customer_space_is_an_error() {
    let t = |g: &str| format!("{BASE}enforcement:\n  walled_garden:\n    - {g}\n");
    one_error(
        &t("0.0.0.0/0"),
        "8:7: enforcement.walled_garden[0]",
        "overlaps the customer network 203.0.113.0/24",
    );
    one_error(
        &t("203.0.113.80"),
        "8:7: enforcement.walled_garden[0]",
        "overlaps the customer network 203.0.113.0/24",
    );
    assert!(errors(&t("192.0.2.80")).is_empty());
}

#[test]
fn an_allowlisted_host_in_a_held_v6_block_is_a_warning() {
    let t = format!("{BASE}allow:\n  - 2001:db8:c::1\nenforcement:\n  ipv6_block_prefix: 64\n");
    let w = warnings(&t);
    assert!(
        w.iter()
            .any(|w| w.starts_with("7:5: allow[0]") && w.contains("enforced on this router only")),
        "{w:?}"
    );
    let p = check(&t).0.unwrap();
    let target = p.block_target("2001:db8:c::77".parse().unwrap());
    assert_eq!(target.to_string(), "2001:db8:c::/64");
    assert!(p.allow_overlaps(&target));
    assert!(!p.allow_covers(&target));
    let inside: Vec<IpNet> = p.allow_inside(&target).collect();
    assert_eq!(inside, vec!["2001:db8:c::1/128".parse::<IpNet>().unwrap()]);
}

#[test]
fn a_held_width_holding_the_routers_own_address_is_a_warning() {
    let host: Vec<std::net::IpAddr> = vec![
        "2001:db8:c::1".parse().unwrap(),
        "203.0.113.1".parse().unwrap(),
    ];
    let (p, diags) = Policy::check_text_on(BASE, Path::new("p.yaml"), &host);
    assert!(p.is_some());
    let w: Vec<String> = diags
        .iter()
        .map(|d| format!("{}:{}: {}: {}", d.line, d.column, d.path, d.message))
        .collect();
    assert_eq!(w.len(), 1, "{w:#?}");
    assert!(
        w[0].starts_with("5:13: networks[1].prefix: this router's own 2001:db8:c::1/128")
            && w[0].contains("a hold of 2001:db8:c::/64 keeps"),
        "{w:?}"
    );
    // Not when the router's /64 is allowlisted as a whole, nor per address (/128 holds).
    let t = BASE.replace("2001:db8:c::/64", "2001:db8:c::/48") + "allow:\n  - 2001:db8:c::/64\n";
    let (p, diags) = Policy::check_text_on(&t, Path::new("p.yaml"), &host);
    assert!(p.is_some() && diags.is_empty(), "{diags:#?}");
    let t = format!("{BASE}enforcement:\n  ipv6_block_prefix: 128\n");
    assert!(
        Policy::check_text_on(&t, Path::new("p.yaml"), &host)
            .1
            .is_empty()
    );
}

#[test]
fn ipv6_offenders_are_held_per_64_by_default() {
    let p = check(BASE).0.unwrap();
    assert_eq!(p.enforcement.ipv6_block_prefix, 64);
    assert_eq!(
        p.block_target("2001:db8:c::77".parse().unwrap())
            .to_string(),
        "2001:db8:c::/64"
    );
}

#[test]
fn ladder_rules() {
    let l = |rungs: &str| format!("{BASE}escalation:\n  ladder:\n{rungs}");
    one_error(
        &l("    - action: quarantine\n"),
        "8:7",
        "does not say how long",
    );
    one_error(
        &l("    - action: block\n      until: payday\n"),
        "9:14",
        "`until: payday` is not understood",
    );
    one_error(
        &l("    - action: block\n      for: 1h\n      until: reconnect\n"),
        "8:7",
        "either `for:` or `until:`",
    );
    one_error(
        &l("    - action: terminate\n      for: 1d\n"),
        "8:7",
        "no duration",
    );
    one_error(
        &l("    - action: terminate\n    - action: block\n      for: 1h\n"),
        "8:15",
        "must be the last rung",
    );
    one_error(
        &format!("{BASE}escalation:\n  ladder: []\n"),
        "7:11",
        "ladder is empty",
    );
    let p = check(&l(
        "    - action: quarantine\n      for: 30m\n    - action: block\n      until: reconnect\n",
    ))
    .0
    .unwrap();
    assert_eq!(p.escalation.rung(1, 1).kind, BlockKind::Quarantine);
    assert_eq!(p.escalation.rung(2, 1).hold, Hold::UntilReconnect);
    assert_eq!(
        p.escalation.rung(9, 1).kind,
        BlockKind::Block,
        "the last rung repeats"
    );
    assert_eq!(
        p.escalation.rung(1, 2).kind,
        BlockKind::Block,
        "start_at skips rungs"
    );
}

#[test]
fn action_start_at_within_ladder() {
    one_error(
        &format!("{BASE}actions:\n  flood:\n    start_at: 4\n"),
        "8:15",
        "cannot start at rung 4",
    );
}

#[test]
fn announce_needs_a_bgp_peer() {
    one_error(
        &format!("{BASE}actions:\n  flood:\n    announce: [flowspec]\n"),
        "8:16",
        "no BGP peer takes them",
    );
}

const RECONNECT_OK: &str = "\
reconnect:
  - address: 203.0.113.45
    ticket: T-1
    authorised_by: jd
    conditions: [fee_paid, reinstalled, acknowledged]
    expires: 2026-12-31T23:59:59Z
";

#[test]
fn valid_reconnect() {
    let p = check(&format!("{BASE}{RECONNECT_OK}")).0.unwrap();
    assert_eq!(p.reconnect[0].address.to_string(), "203.0.113.45/32");
    assert_eq!(p.reconnect[0].expires.to_string(), "2026-12-31T23:59:59Z");
}

#[test]
fn reconnect_outside_customer_networks() {
    let t = format!(
        "{BASE}{}",
        RECONNECT_OK.replace("203.0.113.45", "192.0.2.45")
    );
    one_error(&t, "7:14", "not in any customer network");
}

#[test]
fn reconnect_missing_condition() {
    let t = format!("{BASE}{}", RECONNECT_OK.replace("fee_paid, ", ""));
    one_error(&t, "10:17", "required condition not attested: fee_paid");
}

#[test]
fn reconnect_required_conditions_are_policy() {
    let t = format!(
        "{BASE}reconnect_requires: [fee_paid, reinstalled, acknowledged, contract_signed]\n{RECONNECT_OK}"
    );
    one_error(&t, "11:17", "not attested: contract_signed");
}

#[test]
fn reconnect_for_allowlisted_address_is_a_mistake() {
    let t = format!("{BASE}allow:\n  - 203.0.113.45\n{RECONNECT_OK}");
    one_error(&t, "9:14", "allowlisted and is never blocked");
}

#[test]
fn reconnect_bad_expiry_and_duplicate_ticket() {
    let t = format!(
        "{BASE}{}",
        RECONNECT_OK.replace("2026-12-31T23:59:59Z", "next week")
    );
    one_error(&t, "11:14", "is not a date and time");
    let second = RECONNECT_OK
        .replace("reconnect:\n", "")
        .replace("203.0.113.45", "203.0.113.46");
    let t = format!("{BASE}{RECONNECT_OK}{second}");
    one_error(&t, "13:13", "ticket `T-1` is used twice");
}

#[test]
fn reconnect_v6_address_maps_to_the_block_target() {
    let t = format!(
        "{BASE}enforcement:\n  ipv6_block_prefix: 64\n{}",
        RECONNECT_OK.replace("203.0.113.45", "2001:db8:c::45")
    );
    let p = check(&t).0.unwrap();
    assert_eq!(p.reconnect[0].address.to_string(), "2001:db8:c::/64");
}

#[test]
fn enforcement_rules() {
    one_error(
        &format!("{BASE}enforcement:\n  table: 1bad-name\n"),
        "7:10",
        "not a usable nft table name",
    );
    one_error(
        &format!("{BASE}enforcement:\n  ipv6_block_prefix: 129\n"),
        "7:22",
        "prefix length",
    );
    one_error(
        &format!("{BASE}enforcement:\n  blackhole:\n    protocol: 2\n"),
        "8:15",
        "route protocol",
    );
    one_error(
        &format!("{BASE}enforcement:\n  blackhole:\n    table: local\n"),
        "8:12",
        "routing table",
    );
    one_error(
        &format!("{BASE}enforcement:\n  walled_garden: [portal]\n"),
        "7:19",
        "not an IP address",
    );
}

#[test]
fn breaker_limits_positive() {
    one_error(
        &format!("{BASE}circuit_breaker:\n  max_new_blocks_per_minute: 0\n"),
        "7:30",
        "0 is not allowed",
    );
}

const BGP: &str = "\
bgp:
  local_as: 64500
  router_id: 192.0.2.1
  peers:
    - address: 192.0.2.250
      remote_as: 64500
";

#[test]
fn learnt_flowspec_bounds_follow_networks_and_block_width() {
    let (p, _) = check(&format!(
        "{BASE}enforcement:\n  ipv6_block_prefix: 56\n{BGP}      accept_flowspec: true\n      max_learned: 25\n"
    ));
    let b = p.expect("valid").bgp.expect("bgp");
    assert_eq!(b.peers[0].max_learned, 25);
    assert_eq!(
        b.learn,
        LearnBounds {
            networks: vec![
                "2001:db8:c::/64".parse().unwrap(),
                "203.0.113.0/24".parse().unwrap()
            ],
            ipv4_width: 32,
            ipv6_width: 56,
        }
    );
    let (p, _) = check(&format!("{BASE}{BGP}"));
    assert_eq!(p.unwrap().bgp.unwrap().peers[0].max_learned, 1000);
    one_error(
        &format!("{BASE}{BGP}      max_learned: 0\n"),
        "12:20",
        "0 is not allowed",
    );
}

#[test]
fn bgp_rules() {
    assert!(errors(&format!("{BASE}{BGP}")).is_empty());
    one_error(
        &format!("{BASE}{}", BGP.replace("64500\n  router", "0\n  router")),
        "7:13",
        "AS number",
    );
    one_error(
        &format!("{BASE}{}", BGP.replace("192.0.2.1", "r1")),
        "8:14",
        "router id",
    );
    one_error(
        &format!("{BASE}{BGP}      hold_time: 2\n"),
        "12:18",
        "hold time",
    );
    one_error(
        &format!("{BASE}{BGP}      families: [ipv4-multicast, ipv4-flowspec]\n"),
        "12:18",
        "not an address family",
    );
    one_error(
        &format!("{BASE}{BGP}      families: [ipv4-unicast]\n"),
        "10:7",
        "no flowspec family",
    );
    one_error(
        &format!("{BASE}{BGP}      families: [ipv4-unicast]\n      announce: [rtbh]\n"),
        "10:7",
        "need a next hop",
    );
    one_error(
        &format!(
            "{BASE}{BGP}      families: [ipv4-unicast]\n      announce: [rtbh]\n      rtbh_next_hop_v4: 192.0.2.66\n      rtbh_communities: [\"65536:1\"]\n"
        ),
        "15:26",
        "not a BGP community",
    );
    let t = format!("{BASE}{BGP}actions:\n  flood:\n    announce: [flowspec]\n");
    assert!(
        errors(&t).is_empty(),
        "a flowspec peer takes flowspec announcements"
    );
}

#[test]
fn bgp_listen_and_passive_peers() {
    let listen = |a: &str| BGP.replace("  peers:", &format!("  listen: {a}\n  peers:"));
    let bgp = |t: &str| check(t).0.expect("valid").bgp.expect("bgp");
    assert_eq!(
        bgp(&format!("{BASE}{BGP}")).listen,
        None,
        "listening is off by default"
    );
    assert!(!bgp(&format!("{BASE}{BGP}")).peers[0].passive);
    assert_eq!(
        bgp(&format!("{BASE}{}", listen("192.0.2.1"))).listen,
        Some("192.0.2.1:179".parse().unwrap()),
        "the port defaults to 179"
    );
    assert_eq!(
        bgp(&format!("{BASE}{}", listen("\"[::]:1179\""))).listen,
        Some("[::]:1179".parse().unwrap())
    );
    one_error(
        &format!("{BASE}{}", listen("everywhere")),
        "9:11",
        "not a listen address",
    );
    one_error(
        &format!("{BASE}{BGP}      passive: true\n"),
        "12:16",
        "nothing listens",
    );
    let p = bgp(&format!("{BASE}{}      passive: true\n", listen("0.0.0.0")));
    assert!(p.peers[0].passive);
}

#[test]
fn notify_and_metrics_rules() {
    one_error(
        &format!("{BASE}notify:\n  command: [notify-abuse]\n"),
        "7:13",
        "not an absolute path",
    );
    one_error(
        &format!("{BASE}notify:\n  command: []\n"),
        "7:12",
        "command is empty",
    );
    one_error(
        &format!("{BASE}metrics:\n  listen: 0.0.0.0:9474\n"),
        "7:11",
        "not a loopback address",
    );
    one_error(
        &format!("{BASE}metrics:\n  listen: localhost\n"),
        "7:11",
        "not an address and port",
    );
}

#[test]
fn detection_rules() {
    one_error(
        &format!("{BASE}detection:\n  max_sources: 10\n"),
        "7:16",
        "too few",
    );
    let w = warnings(&format!("{BASE}detection:\n  evaluation_interval: 10s\n"));
    assert_eq!(w.len(), 1, "{w:?}");
}

#[test]
fn diagnostics_render_as_file_line_column() {
    let (_, diags) = check(&BASE.replace("203.0.113.0/24", "203.0.113.0/33"));
    let s = diags[0].to_string();
    assert!(
        s.starts_with("p.yaml:4:13: error: networks[0].prefix: `203.0.113.0/33`"),
        "{s}"
    );
    assert!(s.contains("\n  help: write an address"), "{s}");
}

// ---------------------------------------------------------------------------------------------
// The reader's limits: hostile files are refused at the place the limit is crossed, before
// serde reads them, without deep recursion or large allocations.
// ---------------------------------------------------------------------------------------------

#[test]
fn deep_block_nesting_is_refused_at_the_level_that_crosses_the_limit() {
    // 20,000 levels of `- ` on one line: before the limit, this overflowed the stack.
    let text = format!("version: 1\nreconnect:\n  {}x\n", "- ".repeat(20_000));
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("nested 33 levels deep"), "{errs:?}");
    // Level 33 starts at the 32nd `- ` of line 3: column 2 + 2 × 31 + 1.
    assert!(errs[0].starts_with("3:65:"), "{errs:?}");
}

#[test]
fn deep_flow_nesting_is_refused() {
    let text = format!(
        "version: 1\nallow: {}{}\n",
        "[".repeat(200),
        "]".repeat(200)
    );
    let errs = errors(&text);
    assert!(errs[0].contains("levels deep"), "{errs:?}");
    assert!(errs[0].starts_with("2:"), "{errs:?}");
}

#[test]
fn nesting_at_the_limit_is_read() {
    // 32 levels (the mapping at the top is level 1) reach serde, which refuses the shape.
    let text = format!("version: 1\nallow: {}1{}\n", "[".repeat(31), "]".repeat(31));
    let errs = errors(&text);
    assert!(!errs[0].contains("levels deep"), "{errs:?}");
}

#[test]
fn billion_laughs_is_refused_at_the_alias_that_crosses_the_limit() {
    let mut text =
        String::from("version: 1\nx0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..9 {
        let p = i - 1;
        text.push_str(&format!(
            "x{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    text.push_str("allow: *a8\n");
    assert!(text.len() < 1000);
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("expands to more than 250000 values"),
        "{errs:?}"
    );
    // a5 is 111,111 values; the third alias to it (line 7) crosses 250,000.
    assert!(errs[0].starts_with("7:"), "{errs:?}");
}

#[test]
fn a_long_value_repeated_by_aliases_is_refused() {
    let long = "x".repeat(100_000);
    let mut text = format!("version: 1\nv: &v {long}\nallow:\n");
    for _ in 0..100 {
        text.push_str("  - *v\n");
    }
    let errs = errors(&text);
    assert!(errs[0].contains("MiB of text"), "{errs:?}");
}

#[test]
fn aliases_of_ordinary_size_are_fine() {
    let text = format!(
        "{BASE}profiles:\n  default:\n    port_scan: &scan {{distinct_ports: 50}}\n  web:\n    port_scan: *scan\n"
    );
    assert_eq!(errors(&text), Vec::<String>::new());
    let (p, _) = check(&text);
    assert_eq!(p.unwrap().profiles["web"].port_scan.distinct_ports, 50);
}

#[test]
fn a_very_long_key_is_refused() {
    // An explicit key (`? `): YAML itself limits implicit keys to 1024 characters.
    let text = format!(
        "version: 1\nprofiles:\n  ? {}\n  : {{}}\n",
        "k".repeat(5000)
    );
    let errs = errors(&text);
    assert!(errs[0].starts_with("3:5:"), "{errs:?}");
    assert!(errs[0].contains("mapping key of 5000 bytes"), "{errs:?}");
}

#[test]
fn an_oversized_text_is_refused_before_it_is_parsed() {
    let text = format!("{BASE}# {}\n", "x".repeat(locate::MAX_POLICY_BYTES));
    let errs = errors(&text);
    assert_eq!(errs.len(), 1);
    assert!(errs[0].contains("accepts at most 2 MiB"), "{errs:?}");
}

#[test]
fn an_oversized_file_is_refused_without_reading_it_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.yaml");
    let f = std::fs::File::create(&path).unwrap();
    // Sparse: 1 GiB that takes no disk; reading it whole would take 1 GiB of memory.
    f.set_len(1 << 30).unwrap();
    let e = Policy::load(&path).unwrap_err();
    let text = crate::logging::error_chain(&e);
    assert!(text.contains("larger than 2 MiB"), "{text}");
}

#[test]
fn anti_spoofing_bindings_are_checked_each_at_its_line() {
    let text = "version: 1
networks:
  - prefix: 203.0.113.0/24
anti_spoofing:
  bindings:
    - {address: 203.0.113.7, mac: \"02:00:5E:10:00:07\"}
    - {address: 198.51.100.7, mac: \"02:00:5e:10:00:08\"}
    - {address: 203.0.113.8, mac: \"02:00:5e:10:00\"}
    - {address: 203.0.113.7, mac: \"02:00:5e:10:00:09\"}
    - {address: 203.0.113.900, mac: \"02:00:5e:10:00:0a\"}
  exempt: [203.0.113.7]
";
    let errs = errors(text);
    let at = |line: &str, what: &str| {
        assert!(
            errs.iter().any(|e| e.starts_with(line) && e.contains(what)),
            "no error at {line} saying {what}: {errs:?}"
        );
    };
    at("7:", "outside every customer network");
    at("8:", "is not a MAC address");
    at("9:", "bound twice");
    at("10:", "is not an IP address");
    at("11:", "has a static binding and is exempt");
    let (p, _) = check(
        &text
            .replace(
                "    - {address: 198.51.100.7",
                "    # - {address: 198.51.100.7",
            )
            .lines()
            .take(6)
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let p = p.expect("the first binding alone is valid");
    assert_eq!(
        p.anti_spoofing.bindings[0].mac, "02:00:5e:10:00:07",
        "normalised"
    );
    assert!(
        p.anti_spoofing.enabled && p.anti_spoofing.learn,
        "on by default"
    );
}

#[test]
fn bgp_graceful_restart_settings() {
    let base = "version: 1\nnetworks:\n  - prefix: 203.0.113.0/24\nbgp:\n  local_as: 65001\n  router_id: 192.0.2.1\n  peers: []\n";
    let gr = |extra: &str| {
        Policy::from_text(&format!("{base}{extra}"), Path::new("p.yaml"))
            .map(|p| p.bgp.unwrap().graceful_restart)
    };
    assert_eq!(gr("").unwrap(), GracefulRestart::default());
    assert_eq!(GracefulRestart::default().restart_time, 120);
    let g =
        gr("  graceful_restart:\n    restart_time: 30s\n    long_lived_stale_time: 2h\n").unwrap();
    assert_eq!((g.restart_time, g.long_lived_stale_time), (30, 7200));
    let off = gr("  graceful_restart:\n    restart_time: false\n").unwrap();
    assert_eq!((off.restart_time, off.long_lived_stale_time), (0, 0));
    let no_ll = gr("  graceful_restart:\n    long_lived_stale_time: 0\n").unwrap();
    assert_eq!((no_ll.restart_time, no_ll.long_lived_stale_time), (120, 0));
    let e = gr("  graceful_restart:\n    restart_time: 2h\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("p.yaml:9:") && e.contains("4095"), "{e}");
}

#[test]
fn operator_blocks_default_to_the_strictest_category_and_are_validated() {
    let (p, _) = check(&format!("{BASE}{BGP}"));
    let p = p.unwrap();
    assert!(
        p.operator_blocks.announce.is_empty(),
        "no category announces"
    );
    assert_eq!(p.operator_blocks.rate_limit, 0);
    let (p, _) = check(&format!(
        "{BASE}{BGP}actions:\n  spam:\n    announce: [flowspec]\n"
    ));
    assert_eq!(
        p.unwrap().operator_blocks.announce,
        vec![Announce::Flowspec]
    );
    let (p, _) = check(&format!(
        "{BASE}{BGP}operator_blocks:\n  announce: [flowspec]\n  rate_limit: 10k\n"
    ));
    let o = p.unwrap().operator_blocks;
    assert_eq!(
        (o.announce, o.rate_limit),
        (vec![Announce::Flowspec], 10_000)
    );
    // A kind no peer takes is an error at its entry (the peer announces flowspec only).
    one_error(
        &format!("{BASE}{BGP}operator_blocks:\n  announce: [flowspec, rtbh]\n"),
        "13:",
        "rtbh announcements are asked for, but no BGP peer takes them",
    );
    one_error(
        &format!("{BASE}operator_blocks:\n  announce: [flowspec]\n"),
        "7:",
        "flowspec announcements are asked for, but no BGP peer takes them",
    );
}

#[test]
fn rungs_announce_by_their_action_unless_told() {
    let (p, _) = check(BASE);
    let l = p.unwrap().escalation.ladder;
    assert_eq!(
        l.iter().map(|r| r.announce).collect::<Vec<_>>(),
        vec![false, true, true]
    );
    let (p, _) = check(&format!(
        "{BASE}escalation:\n  ladder:\n    - action: quarantine\n      for: 1h\n      announce: true\n    - action: block\n      until: reconnect\n"
    ));
    let l = p.unwrap().escalation.ladder;
    assert_eq!(
        l.iter().map(|r| r.announce).collect::<Vec<_>>(),
        vec![true, true]
    );
}

#[test]
fn flowspec_communities_are_read_and_bounded() {
    let (p, _) = check(&format!(
        "{BASE}{BGP}      flowspec_communities: [\"64500:100\", \"64500:1:2\"]\n"
    ));
    assert_eq!(
        p.unwrap().bgp.unwrap().peers[0].flowspec_communities,
        vec![
            Community::Standard(64500, 100),
            Community::Large(64500, 1, 2)
        ]
    );
    one_error(
        &format!("{BASE}{BGP}      flowspec_communities: [\"64500:100\", \"1:2:3:4\"]\n"),
        "12:",
        "`1:2:3:4` is not a BGP community",
    );
    let many: Vec<String> = (0..65).map(|i| format!("\"64500:{i}\"")).collect();
    one_error(
        &format!(
            "{BASE}{BGP}      flowspec_communities: [{}]\n",
            many.join(", ")
        ),
        "12:",
        "65 communities are listed, more than the 64",
    );
}

#[test]
fn scan_blind_spot_keys_have_their_defaults_and_parse() {
    let p = check(BASE).0.unwrap();
    let d = &p.profiles["default"];
    assert_eq!(d.port_scan.udp_distinct_ports, 50);
    assert_eq!(d.network_scan.answered_distinct_destinations, 200);
    assert_eq!(d.network_scan.min_incomplete_ratio, 0.5);
    assert!(d.network_scan.slow.enabled);
    assert_eq!(d.network_scan.slow.window, Duration::from_secs(3_600));
    assert_eq!(d.network_scan.slow.distinct_destinations, 300);
    let t = format!(
        "{BASE}profiles:\n  default:\n    port_scan:\n      udp_distinct_ports: 0\n    network_scan:\n      answered_distinct_destinations: 500\n      min_incomplete_ratio: 0.8\n      slow: {{window: 2h, distinct_destinations: 1k}}\n"
    );
    let p = check(&t).0.unwrap();
    let d = &p.profiles["default"];
    assert_eq!(d.port_scan.udp_distinct_ports, 0);
    assert_eq!(d.network_scan.answered_distinct_destinations, 500);
    assert_eq!(d.network_scan.min_incomplete_ratio, 0.8);
    assert_eq!(d.network_scan.slow.window, Duration::from_secs(7_200));
    assert_eq!(d.network_scan.slow.distinct_destinations, 1_000);
    let t = format!(
        "{BASE}profiles:\n  default:\n    network_scan:\n      min_incomplete_ratio: 1.5\n"
    );
    one_error(&t, "9:29", "not a ratio");
    let t = format!("{BASE}profiles:\n  default:\n    network_scan:\n      slow: {{windw: 1h}}\n");
    assert_eq!(errors(&t).len(), 1, "{:?}", errors(&t));
}

#[test]
fn slow_scan_window_must_be_longer_than_the_network_scan_window() {
    let t = format!(
        "{BASE}profiles:\n  default:\n    network_scan:\n      slow:\n        window: 60s\n"
    );
    let errs = errors(&t);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("not longer than the network-scan window"),
        "{errs:?}"
    );
    assert!(errs[0].contains("network_scan.slow.window"), "{errs:?}");
    // Switched off, the window does not matter.
    let t = format!(
        "{BASE}profiles:\n  default:\n    network_scan:\n      slow: {{enabled: false, window: 60s}}\n"
    );
    assert!(errors(&t).is_empty());
}

#[test]
fn slow_scan_window_is_at_most_nine_hours() {
    let t = format!(
        "{BASE}profiles:\n  default:\n    network_scan:\n      slow:\n        window: 10h\n"
    );
    let errs = errors(&t);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("longer than 9h"), "{errs:?}");
}

#[test]
fn flood_meter_settings() {
    let p =
        |body: &str| format!("version: 1\nnetworks:\n  - prefix: 192.0.2.0/24\ndetection:\n{body}");
    let ok = Policy::from_text(
        &p("  flood_tolerance: 500ms\n  sample_flows_above: 0\n"),
        Path::new("t.yaml"),
    )
    .expect("valid");
    assert_eq!(ok.detection.flood_tolerance, Duration::from_millis(500));
    assert_eq!(ok.detection.sample_flows_above, 0);
    one_error(&p("  flood_tolerance: 5ms\n"), "5:20", "outside 10ms..10s");
    one_error(
        &p("  sample_flows_above: 100\n"),
        "5:23",
        "would sample ordinary clients",
    );
    let d = Policy::from_text(&p("  max_sources: 4096\n"), Path::new("t.yaml")).expect("valid");
    assert_eq!(
        d.detection.flood_tolerance,
        Duration::from_millis(200),
        "built-in"
    );
    assert_eq!(d.detection.sample_flows_above, 5_000, "built-in");
}
