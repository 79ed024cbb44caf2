//! From [`RawPolicy`] to [`Policy`]: parse every value, check every rule, collect every error.
//!
//! Each rule below has its own unit test in `tests.rs` with a broken file that triggers it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::defaults as d;
use super::error::{Diagnostic, Severity};
use super::locate::{self, Index, Pos};
use super::raw::*;
use super::*;
use crate::messages::{Announce, BlockKind, Category, Time};

struct Cx<'a> {
    file: &'a Path,
    /// The addresses of the host the policy is checked on (interfaces, resolvers), for the
    /// warnings about held widths that include them; empty when not checked on the router.
    host: &'a [IpAddr],
    ix: Index,
    diags: Vec<Diagnostic>,
}

impl Cx<'_> {
    fn push(&mut self, severity: Severity, at: Pos, path: &str, msg: String, help: Option<String>) {
        self.diags.push(Diagnostic {
            severity,
            file: self.file.to_owned(),
            line: at.line,
            column: at.column,
            path: path.to_owned(),
            message: msg,
            help,
        });
    }

    fn err(&mut self, path: &str, msg: impl Into<String>, help: impl Into<Option<String>>) {
        let at = self.ix.value(path);
        self.push(Severity::Error, at, path, msg.into(), help.into());
    }

    fn warn(&mut self, path: &str, msg: impl Into<String>, help: impl Into<Option<String>>) {
        let at = self.ix.value(path);
        self.push(Severity::Warning, at, path, msg.into(), help.into());
    }
}

/// Validates `text`; returns the policy when it has no error, and every diagnostic. `host`:
/// see [`Cx::host`].
pub(super) fn validate(
    text: &str,
    file: &Path,
    host: &[IpAddr],
) -> (Option<Policy>, Vec<Diagnostic>) {
    let mut cx = Cx {
        file,
        host,
        ix: Index::default(),
        diags: Vec::new(),
    };
    if text.len() > super::locate::MAX_POLICY_BYTES {
        cx.err(
            "",
            format!(
                "the policy is {} bytes; the policy reader accepts at most {} MiB",
                text.len(),
                super::locate::MAX_POLICY_BYTES >> 20
            ),
            Some("is this the policy file? split out what the agent does not need".into()),
        );
        return (None, cx.diags);
    }
    // The limits (depth, alias expansion, key length) and the syntax are checked before
    // serde reads anything.
    match Index::read(text) {
        Ok(ix) => cx.ix = ix,
        Err(refused) => {
            let r = refused.1;
            // For a syntax error, libyaml's message (serde_yaml's, as for every other
            // syntax error) is the better one when it finds the error too: reading into
            // `IgnoredAny` walks its events without following aliases, iteratively.
            let libyaml = r
                .message
                .starts_with(locate::SYNTAX)
                .then(|| serde_yaml::from_str::<serde::de::IgnoredAny>(text).err())
                .flatten();
            let (at, msg, help) = match libyaml {
                Some(e) => serde_diagnostic(&e),
                None => (r.at, r.message, r.help),
            };
            let help = tab_help(text, at).or(help);
            cx.push(Severity::Error, at, "", msg, help);
            return (None, cx.diags);
        }
    }
    if text.trim().is_empty() {
        cx.err(
            "",
            "the policy file is empty",
            Some("start from /usr/share/doc/egressguard/examples/ or policies/default.yaml".into()),
        );
        return (None, cx.diags);
    }
    let raw: RawPolicy = match serde_yaml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let (at, msg, help) = serde_diagnostic(&e);
            cx.push(Severity::Error, at, "", msg, help);
            return (None, cx.diags);
        }
    };
    let policy = build(&mut cx, raw, text);
    // Report in file order, as a reader goes through the file.
    cx.diags.sort_by_key(|d| (d.line, d.column));
    let failed = cx.diags.iter().any(|d| d.severity == Severity::Error);
    (if failed { None } else { Some(policy) }, cx.diags)
}

/// serde_yaml's error as a position, a message and a hint.
fn serde_diagnostic(e: &serde_yaml::Error) -> (Pos, String, Option<String>) {
    let at = e
        .location()
        .map(|l| Pos {
            line: l.line(),
            column: l.column(),
        })
        .unwrap_or(Pos::START);
    let suffix = format!(" at line {} column {}", at.line, at.column);
    let full = e.to_string();
    let (msg, help) = explain_serde(&full.replacen(&suffix, "", 1));
    (at, msg, help)
}

/// The hint for a syntax error on a line indented with a tab (YAML allows only spaces; the
/// YAML library's own message does not say so).
fn tab_help(text: &str, at: Pos) -> Option<String> {
    let line = text.lines().nth(at.line.checked_sub(1)?)?;
    let indent = &line[..line.len() - line.trim_start().len()];
    indent.contains('\t').then(|| {
        format!(
            "line {} is indented with a tab; YAML allows only spaces for indentation",
            at.line
        )
    })
}

/// Turns serde_yaml's message into ours: the position goes in front, a hint comes after.
fn explain_serde(msg: &str) -> (String, Option<String>) {
    let help = if msg.contains("unknown field") {
        Some(
            "remove the setting or correct its spelling; the names allowed here are listed above"
                .into(),
        )
    } else if msg.contains("unknown variant") {
        Some("use one of the values listed above".into())
    } else if msg.contains("missing field") {
        Some("add the setting; see policies/default.yaml for its meaning".into())
    } else if msg.contains("invalid type") {
        Some("check the indentation and whether this should be a list (`- item`) or a mapping (`key: value`)".into())
    } else {
        None
    };
    (msg.to_owned(), help)
}

fn build(cx: &mut Cx, raw: RawPolicy, text: &str) -> Policy {
    match raw.version {
        Some(d::SCHEMA_VERSION) => {}
        Some(v) => cx.err(
            "version",
            format!("schema version {v} is not supported by this build"),
            Some(format!("write `version: {}`", d::SCHEMA_VERSION)),
        ),
        None => cx.err(
            "",
            "the policy does not say its schema version",
            Some(format!("add `version: {}` at the top", d::SCHEMA_VERSION)),
        ),
    }

    let allow = raw
        .allow
        .iter()
        .enumerate()
        .filter_map(|(i, s)| prefix(cx, &format!("allow[{i}]"), s))
        .collect::<Vec<_>>();

    let escalation = escalation(cx, raw.escalation.as_ref());
    let enforcement = enforcement(cx, raw.enforcement.as_ref());
    let profiles = profiles(cx, &raw.profiles);
    let networks = networks(cx, &raw.networks, &profiles, &allow, &enforcement);
    let learn = LearnBounds {
        networks: networks.iter().map(|n| n.prefix).collect(),
        ipv4_width: 32,
        ipv6_width: enforcement.ipv6_block_prefix,
    };
    let bgp = raw.bgp.as_ref().and_then(|b| bgp(cx, b, learn));
    let anti_spoofing = anti_spoofing(cx, raw.anti_spoofing.as_ref(), &networks);
    let actions = actions(cx, &raw.actions, &escalation, bgp.as_ref());
    let operator_blocks = operator_blocks(cx, raw.operator_blocks.as_ref(), &actions, bgp.as_ref());
    let reconnect_requires = reconnect_requires(cx, raw.reconnect_requires.as_deref());
    let reconnect = reconnects(
        cx,
        &raw.reconnect,
        &reconnect_requires,
        &networks,
        &allow,
        &enforcement,
    );

    Policy {
        source: PolicySource {
            path: cx.file.to_owned(),
            digest: digest(text),
        },
        mode: raw.mode.unwrap_or(Mode::DryRun),
        networks,
        profiles,
        allow,
        protect_infrastructure: raw.protect_infrastructure.unwrap_or(true),
        actions,
        operator_blocks,
        escalation,
        reconnect_requires,
        reconnect,
        enforcement,
        circuit_breaker: breaker(cx, raw.circuit_breaker.as_ref()),
        anti_spoofing,
        bgp,
        notify: notify(cx, raw.notify.as_ref()),
        metrics: metrics(cx, raw.metrics.as_ref()),
        detection: detection(cx, raw.detection.as_ref()),
    }
}

/// FNV-1a over the text, as 16 hex digits: the policy version `status` shows.
fn digest(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

// ---------------------------------------------------------------------------------------------
// value parsers: each reports its own error and returns None on failure
// ---------------------------------------------------------------------------------------------

fn prefix(cx: &mut Cx, path: &str, s: &Scalar) -> Option<IpNet> {
    let t = s.0.trim();
    if let Ok(net) = t.parse::<IpNet>() {
        if net.trunc() != net {
            cx.err(
                path,
                format!("`{t}` has host bits set below its prefix length"),
                Some(format!("write `{}`", net.trunc())),
            );
            return None;
        }
        return Some(net);
    }
    if let Ok(addr) = t.parse::<IpAddr>() {
        return Some(IpNet::from(addr));
    }
    cx.err(
        path,
        format!("`{t}` is not an IP address or prefix"),
        Some("write an address such as 203.0.113.7 or 2001:db8::7, or a prefix such as 203.0.113.0/24".into()),
    );
    None
}

fn address(cx: &mut Cx, path: &str, s: &Scalar) -> Option<IpAddr> {
    let t = s.0.trim();
    match t.parse::<IpAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            cx.err(
                path,
                format!("`{t}` is not an IP address"),
                Some("write a single address such as 192.0.2.1 or 2001:db8::1".into()),
            );
            None
        }
    }
}

fn duration(cx: &mut Cx, path: &str, s: Option<&Scalar>, default: Duration) -> Duration {
    let Some(s) = s else { return default };
    let t = s.0.trim();
    if t.chars().all(|c| c.is_ascii_digit()) {
        cx.err(
            path,
            format!("`{t}` has no unit"),
            Some(format!("write `{t}s` for seconds (or ms, m, h, d)")),
        );
        return default;
    }
    match humantime::parse_duration(t) {
        Ok(v) if v.is_zero() => {
            cx.err(
                path,
                "the duration must be longer than zero",
                Some("write for example `10s`".into()),
            );
            default
        }
        Ok(v) => v,
        Err(_) => {
            cx.err(
                path,
                format!("`{t}` is not a duration"),
                Some("write a number with a unit: 250ms, 10s, 5m, 1h, 30d".into()),
            );
            default
        }
    }
}

/// A positive whole number; `k`, `M`, `G` multiply by 1000; `_` separates digits.
fn count(cx: &mut Cx, path: &str, s: Option<&Scalar>, default: u64) -> u64 {
    let Some(s) = s else { return default };
    let t = s.0.trim().replace('_', "");
    let (digits, mult) = match t.chars().last() {
        Some('k') | Some('K') => (&t[..t.len() - 1], 1_000u64),
        Some('M') => (&t[..t.len() - 1], 1_000_000),
        Some('G') => (&t[..t.len() - 1], 1_000_000_000),
        _ => (t.as_str(), 1),
    };
    let value = if mult == 1 {
        digits.parse::<u64>().ok()
    } else {
        digits
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .map(|v| (v * mult as f64).round() as u64)
    };
    match value {
        Some(0) => {
            cx.err(
                path,
                "0 is not allowed here",
                Some("write a number greater than 0".into()),
            );
            default
        }
        Some(v) => v,
        None => {
            cx.err(
                path,
                format!("`{}` is not a whole number", s.0.trim()),
                Some("write a number such as 500, 150k or 5G".into()),
            );
            default
        }
    }
}

fn count32(cx: &mut Cx, path: &str, s: Option<&Scalar>, default: u32) -> u32 {
    let v = count(cx, path, s, u64::from(default));
    match u32::try_from(v) {
        Ok(v) => v,
        Err(_) => {
            cx.err(
                path,
                format!("{v} is too large"),
                Some(format!("write at most {}", u32::MAX)),
            );
            default
        }
    }
}

/// A count where 0 means "off" (the patterns a profile may switch off by their threshold).
fn count32_or_off(cx: &mut Cx, path: &str, s: Option<&Scalar>, default: u32) -> u32 {
    if s.is_some_and(|s| s.0.trim() == "0") {
        return 0;
    }
    count32(cx, path, s, default)
}

fn ratio(cx: &mut Cx, path: &str, s: Option<&Scalar>, default: f64) -> f64 {
    let Some(s) = s else { return default };
    match s.0.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => v,
        _ => {
            cx.err(
                path,
                format!("`{}` is not a ratio between 0 and 1", s.0.trim()),
                Some("write for example 0.5 for half".into()),
            );
            default
        }
    }
}

fn ports(cx: &mut Cx, path: &str, p: Option<&Vec<u16>>, default: &[u16]) -> Vec<u16> {
    let Some(p) = p else { return default.to_vec() };
    if p.is_empty() {
        cx.err(
            path,
            "the port list is empty",
            Some("list at least one port, or set `enabled: false`".into()),
        );
        return default.to_vec();
    }
    for (i, port) in p.iter().enumerate() {
        if *port == 0 {
            cx.err(
                &format!("{path}[{i}]"),
                "port 0 is not a port",
                Some("write a port from 1 to 65535".into()),
            );
        }
    }
    let mut v = p.clone();
    v.sort_unstable();
    v.dedup();
    v
}

// ---------------------------------------------------------------------------------------------
// sections
// ---------------------------------------------------------------------------------------------

fn builtin_profile() -> Profile {
    Profile {
        flood: Flood {
            enabled: true,
            window: d::FLOOD_WINDOW,
            pps: d::FLOOD_PPS,
            bps: d::FLOOD_BPS,
            udp_pps: d::FLOOD_UDP_PPS,
            icmp_pps: d::FLOOD_ICMP_PPS,
            new_flows_per_sec: d::FLOOD_NEW_FLOWS_PER_SEC,
            unreplied_syn_per_sec: d::FLOOD_UNREPLIED_SYN_PER_SEC,
            amplification_ports: d::FLOOD_AMPLIFICATION_PORTS.to_vec(),
            amplification_flows_per_sec: d::FLOOD_AMPLIFICATION_FLOWS_PER_SEC,
            max_targets: d::FLOOD_MAX_TARGETS,
        },
        brute_force: BruteForce {
            enabled: true,
            window: d::BRUTE_WINDOW,
            attempts: d::BRUTE_ATTEMPTS,
            max_flow_duration: d::BRUTE_MAX_FLOW_DURATION,
            ports: d::BRUTE_PORTS.to_vec(),
            spread: Spread {
                enabled: true,
                attempts: d::BRUTE_SPREAD_ATTEMPTS,
                distinct_targets: d::BRUTE_SPREAD_DISTINCT_TARGETS,
            },
        },
        port_scan: PortScan {
            enabled: true,
            window: d::PORTSCAN_WINDOW,
            distinct_ports: d::PORTSCAN_DISTINCT_PORTS,
            min_unanswered_ratio: d::PORTSCAN_MIN_UNANSWERED_RATIO,
            udp_distinct_ports: d::PORTSCAN_UDP_DISTINCT_PORTS,
        },
        network_scan: NetworkScan {
            enabled: true,
            window: d::NETSCAN_WINDOW,
            distinct_destinations: d::NETSCAN_DISTINCT_DESTINATIONS,
            min_unanswered_ratio: d::NETSCAN_MIN_UNANSWERED_RATIO,
            answered_distinct_destinations: d::NETSCAN_ANSWERED_DISTINCT_DESTINATIONS,
            min_incomplete_ratio: d::NETSCAN_MIN_INCOMPLETE_RATIO,
            slow: SlowScan {
                enabled: true,
                window: d::NETSCAN_SLOW_WINDOW,
                distinct_destinations: d::NETSCAN_SLOW_DISTINCT_DESTINATIONS,
            },
        },
        spam: Spam {
            enabled: true,
            window: d::SPAM_WINDOW,
            distinct_destinations: d::SPAM_DISTINCT_DESTINATIONS,
            ports: d::SPAM_PORTS.to_vec(),
        },
    }
}

fn resolve_profile(cx: &mut Cx, base: &Profile, raw: &RawProfile, at: &str) -> Profile {
    let mut p = base.clone();
    if let Some(f) = &raw.flood {
        let at = format!("{at}.flood");
        let b = &base.flood;
        p.flood = Flood {
            enabled: f.enabled.unwrap_or(b.enabled),
            window: duration(cx, &format!("{at}.window"), f.window.as_ref(), b.window),
            pps: count(cx, &format!("{at}.pps"), f.pps.as_ref(), b.pps),
            bps: count(cx, &format!("{at}.bps"), f.bps.as_ref(), b.bps),
            udp_pps: count(cx, &format!("{at}.udp_pps"), f.udp_pps.as_ref(), b.udp_pps),
            icmp_pps: count(
                cx,
                &format!("{at}.icmp_pps"),
                f.icmp_pps.as_ref(),
                b.icmp_pps,
            ),
            new_flows_per_sec: count(
                cx,
                &format!("{at}.new_flows_per_sec"),
                f.new_flows_per_sec.as_ref(),
                b.new_flows_per_sec,
            ),
            unreplied_syn_per_sec: count(
                cx,
                &format!("{at}.unreplied_syn_per_sec"),
                f.unreplied_syn_per_sec.as_ref(),
                b.unreplied_syn_per_sec,
            ),
            amplification_ports: ports(
                cx,
                &format!("{at}.amplification_ports"),
                f.amplification_ports.as_ref(),
                &b.amplification_ports,
            ),
            amplification_flows_per_sec: count(
                cx,
                &format!("{at}.amplification_flows_per_sec"),
                f.amplification_flows_per_sec.as_ref(),
                b.amplification_flows_per_sec,
            ),
            max_targets: count32(
                cx,
                &format!("{at}.max_targets"),
                f.max_targets.as_ref(),
                b.max_targets,
            ),
        };
    }
    if let Some(f) = &raw.brute_force {
        let at = format!("{at}.brute_force");
        let b = &base.brute_force;
        p.brute_force = BruteForce {
            enabled: f.enabled.unwrap_or(b.enabled),
            window: duration(cx, &format!("{at}.window"), f.window.as_ref(), b.window),
            attempts: count32(
                cx,
                &format!("{at}.attempts"),
                f.attempts.as_ref(),
                b.attempts,
            ),
            max_flow_duration: duration(
                cx,
                &format!("{at}.max_flow_duration"),
                f.max_flow_duration.as_ref(),
                b.max_flow_duration,
            ),
            ports: ports(cx, &format!("{at}.ports"), f.ports.as_ref(), &b.ports),
            spread: match &f.spread {
                Some(r) => spread(cx, &format!("{at}.spread"), r, &b.spread),
                None => b.spread.clone(),
            },
        };
    }
    if let Some(f) = &raw.port_scan {
        let at = format!("{at}.port_scan");
        let b = &base.port_scan;
        p.port_scan = PortScan {
            enabled: f.enabled.unwrap_or(b.enabled),
            window: duration(cx, &format!("{at}.window"), f.window.as_ref(), b.window),
            distinct_ports: count32(
                cx,
                &format!("{at}.distinct_ports"),
                f.distinct_ports.as_ref(),
                b.distinct_ports,
            ),
            min_unanswered_ratio: ratio(
                cx,
                &format!("{at}.min_unanswered_ratio"),
                f.min_unanswered_ratio.as_ref(),
                b.min_unanswered_ratio,
            ),
            udp_distinct_ports: count32_or_off(
                cx,
                &format!("{at}.udp_distinct_ports"),
                f.udp_distinct_ports.as_ref(),
                b.udp_distinct_ports,
            ),
        };
    }
    if let Some(f) = &raw.network_scan {
        let at = format!("{at}.network_scan");
        let b = &base.network_scan;
        p.network_scan = NetworkScan {
            enabled: f.enabled.unwrap_or(b.enabled),
            window: duration(cx, &format!("{at}.window"), f.window.as_ref(), b.window),
            distinct_destinations: count32(
                cx,
                &format!("{at}.distinct_destinations"),
                f.distinct_destinations.as_ref(),
                b.distinct_destinations,
            ),
            min_unanswered_ratio: ratio(
                cx,
                &format!("{at}.min_unanswered_ratio"),
                f.min_unanswered_ratio.as_ref(),
                b.min_unanswered_ratio,
            ),
            answered_distinct_destinations: count32_or_off(
                cx,
                &format!("{at}.answered_distinct_destinations"),
                f.answered_distinct_destinations.as_ref(),
                b.answered_distinct_destinations,
            ),
            min_incomplete_ratio: ratio(
                cx,
                &format!("{at}.min_incomplete_ratio"),
                f.min_incomplete_ratio.as_ref(),
                b.min_incomplete_ratio,
            ),
            slow: slow_scan(cx, &format!("{at}.slow"), f.slow.as_ref(), &b.slow),
        };
        let window = p.network_scan.window;
        let slow = &p.network_scan.slow;
        if slow.enabled && slow.window <= window {
            cx.err(
                &format!("{at}.slow.window"),
                format!(
                    "the slow-scan window ({}s) is not longer than the network-scan window ({}s)",
                    slow.window.as_secs(),
                    window.as_secs()
                ),
                Some(
                    "write a longer window, for example 1h, or set `slow: {enabled: false}`".into(),
                ),
            );
        }
        if slow.window > MAX_SLOW_WINDOW {
            cx.err(
                &format!("{at}.slow.window"),
                format!(
                    "the slow-scan window ({}s) is longer than 9h",
                    slow.window.as_secs()
                ),
                Some(
                    "write at most 9h (a detection holds its category down for one window)".into(),
                ),
            );
        }
    }
    if let Some(f) = &raw.spam {
        let at = format!("{at}.spam");
        let b = &base.spam;
        p.spam = Spam {
            enabled: f.enabled.unwrap_or(b.enabled),
            window: duration(cx, &format!("{at}.window"), f.window.as_ref(), b.window),
            distinct_destinations: count32(
                cx,
                &format!("{at}.distinct_destinations"),
                f.distinct_destinations.as_ref(),
                b.distinct_destinations,
            ),
            ports: ports(cx, &format!("{at}.ports"), f.ports.as_ref(), &b.ports),
        };
    }
    p
}

/// `brute_force.spread`: the per-source counters hold at most
/// [`d::BRUTE_SPREAD_MAX_ATTEMPTS`] sessions an epoch and tell at most
/// [`d::BRUTE_SPREAD_MAX_DISTINCT_TARGETS`] targets apart; a spread over one target is the
/// per-target rule's business.
fn spread(cx: &mut Cx, at: &str, r: &RawSpread, b: &Spread) -> Spread {
    let apath = format!("{at}.attempts");
    let mut attempts = count32(cx, &apath, r.attempts.as_ref(), b.attempts);
    let amax = d::BRUTE_SPREAD_MAX_ATTEMPTS;
    if !(1..=amax).contains(&attempts) {
        cx.err(
            &apath,
            format!("{attempts} sessions across targets is out of range"),
            Some(format!(
                "write 1 to {amax}: the per-source counters hold {amax} sessions a window; \
                 `enabled: false` turns the spread rule off"
            )),
        );
        attempts = b.attempts;
    }
    let path = format!("{at}.distinct_targets");
    let mut targets = count32(cx, &path, r.distinct_targets.as_ref(), b.distinct_targets);
    let max = d::BRUTE_SPREAD_MAX_DISTINCT_TARGETS;
    if !(2..=max).contains(&targets) {
        cx.err(
            &path,
            format!("{targets} distinct targets cannot be told apart"),
            Some(format!(
                "write 2 to {max}: the per-source sketch counts at most {max} targets \
                 reliably; more attempts at fewer targets is the per-target `attempts` rule"
            )),
        );
        targets = b.distinct_targets;
    }
    Spread {
        enabled: r.enabled.unwrap_or(b.enabled),
        attempts,
        distinct_targets: targets,
    }
}

/// The longest slow-scan window: a detection holds the category down for one window, and
/// hold-downs are kept in 16-bit seconds.
const MAX_SLOW_WINDOW: Duration = Duration::from_secs(9 * 3_600);

fn slow_scan(cx: &mut Cx, at: &str, raw: Option<&RawSlowScan>, b: &SlowScan) -> SlowScan {
    let Some(f) = raw else { return b.clone() };
    SlowScan {
        enabled: f.enabled.unwrap_or(b.enabled),
        window: duration(cx, &format!("{at}.window"), f.window.as_ref(), b.window),
        distinct_destinations: count32(
            cx,
            &format!("{at}.distinct_destinations"),
            f.distinct_destinations.as_ref(),
            b.distinct_destinations,
        ),
    }
}

fn profiles(cx: &mut Cx, raw: &BTreeMap<String, RawProfile>) -> BTreeMap<String, Profile> {
    let empty = RawProfile::default();
    let base = resolve_profile(
        cx,
        &builtin_profile(),
        raw.get(d::DEFAULT_PROFILE).unwrap_or(&empty),
        &format!("profiles.{}", d::DEFAULT_PROFILE),
    );
    let mut out = BTreeMap::new();
    for (name, rp) in raw {
        if name == d::DEFAULT_PROFILE {
            continue;
        }
        if !valid_name(name) {
            cx.err(
                &format!("profiles.{name}"),
                format!("`{name}` is not a usable profile name"),
                Some("use letters, digits, `-` and `_`".into()),
            );
        }
        let p = resolve_profile(cx, &base, rp, &format!("profiles.{name}"));
        out.insert(name.clone(), p);
    }
    out.insert(d::DEFAULT_PROFILE.to_owned(), base);
    out
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn networks(
    cx: &mut Cx,
    raw: &[RawNetwork],
    profiles: &BTreeMap<String, Profile>,
    allow: &[IpNet],
    enf: &Enforcement,
) -> Vec<Network> {
    if raw.is_empty() {
        cx.err(
            "networks",
            "no customer networks are listed, so there is nothing to watch",
            Some("add `networks:` with entries such as `- prefix: 203.0.113.0/24`".into()),
        );
    }
    let mut out: Vec<Network> = Vec::new();
    let mut used = BTreeSet::new();
    for (i, n) in raw.iter().enumerate() {
        let at = format!("networks[{i}]");
        let Some(prefix) = prefix(cx, &format!("{at}.prefix"), &n.prefix) else {
            continue;
        };
        if let Some(j) = out.iter().position(|o| o.prefix == prefix) {
            cx.err(
                &format!("{at}.prefix"),
                format!("{prefix} is listed twice (also networks[{j}])"),
                Some("remove one of the two entries".into()),
            );
            continue;
        }
        let profile = n
            .profile
            .clone()
            .unwrap_or_else(|| d::DEFAULT_PROFILE.to_owned());
        if !profiles.contains_key(&profile) {
            let known: Vec<&str> = profiles.keys().map(String::as_str).collect();
            cx.err(
                &format!("{at}.profile"),
                format!("profile `{profile}` is not defined"),
                Some(format!(
                    "use one of: {}, or define it under `profiles:`",
                    known.join(", ")
                )),
            );
        }
        used.insert(profile.clone());
        protection_inside(cx, &at, prefix, allow, enf);
        let customer_prefix = customer_prefix(cx, &at, prefix, n.customer_prefix.as_ref());
        out.push(Network {
            prefix,
            profile,
            name: n.name.clone(),
            customer_prefix,
        });
    }
    for name in profiles.keys() {
        if name != d::DEFAULT_PROFILE && !used.contains(name) {
            cx.warn(
                &format!("profiles.{name}"),
                format!("profile `{name}` is not used by any network"),
                Some("reference it with `profile:` in a `networks:` entry, or remove it".into()),
            );
        }
    }
    // Longest prefix first, so the first match is the most specific network.
    out.sort_by(|a, b| {
        b.prefix
            .prefix_len()
            .cmp(&a.prefix.prefix_len())
            .then(a.prefix.cmp(&b.prefix))
    });
    out
}

/// The widest allow entry that may lie inside a customer network: one held target there (an
/// IPv4 address; an IPv6 prefix of `ipv6_block_prefix`). Anything wider exempts customers by
/// the block, and a later edit of it would silently protect (so suspend) their holds.
fn allow_width_ok(a: &IpNet, enf: &Enforcement) -> bool {
    match a {
        IpNet::V4(n) => n.prefix_len() == 32,
        IpNet::V6(n) => n.prefix_len() >= enf.ipv6_block_prefix,
    }
}

/// Rules for protected space against one customer network entry (`at` is its path):
/// a walled-garden entry must not overlap it at all (quarantined servers would reach their
/// neighbours through the garden, and the garden is infrastructure, so it would protect
/// them); an allow entry must not contain it or overlap it wider than one held target.
fn protection_inside(cx: &mut Cx, at: &str, prefix: IpNet, allow: &[IpNet], enf: &Enforcement) {
    for (i, g) in enf.walled_garden.iter().enumerate() {
        if g.contains(&prefix) || prefix.contains(g) {
            cx.err(
                &format!("enforcement.walled_garden[{i}]"),
                format!(
                    "walled-garden entry {g} overlaps the customer network {prefix} ({at}): \
                     quarantined servers could reach their neighbours, and garden addresses \
                     are never blocked"
                ),
                Some(
                    "list only the abuse portal's and resolvers' own addresses, outside `networks:`"
                        .into(),
                ),
            );
        }
    }
    for (i, a) in allow.iter().enumerate() {
        if a.contains(&prefix) {
            cx.err(
                &format!("allow[{i}]"),
                format!(
                    "allow entry {a} covers the whole customer network {prefix} ({at}): \
                     nothing in it could ever be held"
                ),
                Some(format!(
                    "remove {prefix} from `networks:` if it is not customer space, or list only \
                     the provider's own hosts in it one by one"
                )),
            );
        } else if prefix.contains(a) && !allow_width_ok(a, enf) {
            let width = match a {
                IpNet::V4(_) => 32,
                IpNet::V6(_) => enf.ipv6_block_prefix,
            };
            cx.err(
                &format!("allow[{i}]"),
                format!(
                    "allow entry {a} covers part of the customer network {prefix} ({at}) wider \
                     than one held target (/{width}): it exempts customers by the block"
                ),
                Some(format!(
                    "list the provider's own hosts in {a} one by one (/{width} each), or take \
                     the range out of `networks:` by splitting the network entry"
                )),
            );
        } else if prefix.contains(a) {
            excepted_inside_held(cx, &format!("allow[{i}]"), prefix, *a, "allowlisted", enf);
        }
    }
    let host: Vec<IpNet> = cx
        .host
        .iter()
        .filter(|h| prefix.contains(*h))
        .map(|h| IpNet::from(*h))
        .filter(|h| !allow.iter().any(|a| a.contains(h)))
        .collect();
    for h in host {
        excepted_inside_held(
            cx,
            &format!("{at}.prefix"),
            prefix,
            h,
            "this router's own",
            enf,
        );
    }
}

/// Warns when the protected `inner` (an allow entry, or an address of this router) lies
/// inside a width that is held as one target in `prefix`: such holds except it (the allow
/// guard precedes every drop), so they stay on this router, neither announced by BGP nor
/// blackholed, and the operator should know.
fn excepted_inside_held(
    cx: &mut Cx,
    path: &str,
    prefix: IpNet,
    inner: IpNet,
    what: &str,
    enf: &Enforcement,
) {
    let IpNet::V6(_) = prefix else { return };
    let held = enf.ipv6_block_prefix;
    if inner.prefix_len() <= held {
        return;
    }
    let Ok(width) = IpNet::new(inner.addr(), held).map(|n| n.trunc()) else {
        return;
    };
    cx.warn(
        path,
        format!(
            "{what} {inner} lies in {prefix}, whose offenders are held per /{held}: a hold of \
             {width} keeps {inner} reachable (excepted by the allow guard) and is not announced \
             by BGP or blackholed, so it is enforced on this router only"
        ),
        Some(format!(
            "number the provider's own hosts and router interfaces in /{held}s of their own \
             (and allow those), or set `enforcement.ipv6_block_prefix: 128`"
        )),
    );
}

/// `networks[i].customer_prefix`: the prefix length of one customer's allocation, from the
/// entry's own length (the whole entry is one customer) to a single address. The default
/// (32 for IPv4, 64 for IPv6) is narrowed to the entry when the entry is smaller.
fn customer_prefix(cx: &mut Cx, at: &str, net: IpNet, raw: Option<&Scalar>) -> u8 {
    let (default, max) = match net {
        IpNet::V4(_) => (d::CUSTOMER_PREFIX_V4, 32),
        IpNet::V6(_) => (d::CUSTOMER_PREFIX_V6, 128),
    };
    let default = default.max(net.prefix_len());
    let Some(s) = raw else { return default };
    let t = s.0.trim();
    match t.trim_start_matches('/').parse::<u8>() {
        Ok(v) if (net.prefix_len()..=max).contains(&v) => v,
        _ => {
            cx.err(
                &format!("{at}.customer_prefix"),
                format!(
                    "`{t}` is not a prefix length from {} (the whole of {net}) to {max} (one address)",
                    net.prefix_len()
                ),
                Some(format!(
                    "write the length of one customer's allocation, e.g. {default}"
                )),
            );
            default
        }
    }
}

fn escalation(cx: &mut Cx, raw: Option<&RawEscalation>) -> Escalation {
    let default_ladder = [
        (BlockKind::Quarantine, Hold::For(d::FIRST_QUARANTINE)),
        (BlockKind::Block, Hold::UntilReconnect),
        (BlockKind::Terminate, Hold::Forever),
    ]
    .map(|(kind, hold)| Rung {
        kind,
        hold,
        announce: d::rung_announce(kind),
    })
    .to_vec();
    let Some(raw) = raw else {
        return Escalation {
            forget_after: d::FORGET_AFTER,
            ladder: default_ladder,
        };
    };
    let forget_after = duration(
        cx,
        "escalation.forget_after",
        raw.forget_after.as_ref(),
        d::FORGET_AFTER,
    );
    let Some(rungs) = &raw.ladder else {
        return Escalation {
            forget_after,
            ladder: default_ladder,
        };
    };
    if rungs.is_empty() {
        cx.err(
            "escalation.ladder",
            "the escalation ladder is empty",
            Some("list at least one rung, e.g. `- action: quarantine` with `for: 1h`".into()),
        );
        return Escalation {
            forget_after,
            ladder: default_ladder,
        };
    }
    let mut ladder = Vec::new();
    for (i, r) in rungs.iter().enumerate() {
        let at = format!("escalation.ladder[{i}]");
        let kind = match r.action {
            RungAction::Quarantine => BlockKind::Quarantine,
            RungAction::Block => BlockKind::Block,
            RungAction::Terminate => BlockKind::Terminate,
        };
        let hold = match (kind, &r.for_, &r.until) {
            (BlockKind::Terminate, None, None) => Hold::Forever,
            (BlockKind::Terminate, ..) => {
                cx.err(
                    &at,
                    "a termination has no duration and no `until`",
                    Some("remove `for:` / `until:` from this rung".into()),
                );
                Hold::Forever
            }
            (_, Some(f), None) => Hold::For(duration(
                cx,
                &format!("{at}.for"),
                Some(f),
                d::FIRST_QUARANTINE,
            )),
            (_, None, Some(u)) if u == "reconnect" => Hold::UntilReconnect,
            (_, None, Some(u)) => {
                cx.err(
                    &format!("{at}.until"),
                    format!("`until: {u}` is not understood"),
                    Some("write `until: reconnect`".into()),
                );
                Hold::UntilReconnect
            }
            (_, Some(_), Some(_)) => {
                cx.err(
                    &at,
                    "a rung has either `for:` or `until:`, not both",
                    Some("remove one of them".into()),
                );
                Hold::UntilReconnect
            }
            (_, None, None) => {
                cx.err(
                    &at,
                    format!("the {kind} rung does not say how long it holds"),
                    Some("add `for: 1h` (any duration) or `until: reconnect`".into()),
                );
                Hold::UntilReconnect
            }
        };
        if i + 1 < rungs.len() && kind == BlockKind::Terminate {
            cx.err(
                &format!("{at}.action"),
                "a termination must be the last rung: the rungs after it can never be reached",
                Some("move `action: terminate` to the end of the ladder".into()),
            );
        }
        ladder.push(Rung {
            kind,
            hold,
            announce: r.announce.unwrap_or(d::rung_announce(kind)),
        });
    }
    Escalation {
        forget_after,
        ladder,
    }
}

fn actions(
    cx: &mut Cx,
    raw: &BTreeMap<Category, RawAction>,
    esc: &Escalation,
    bgp: Option<&Bgp>,
) -> BTreeMap<Category, CategoryAction> {
    let mut out = BTreeMap::new();
    for c in Category::ALL {
        let mut a = CategoryAction {
            start_at: 1,
            announce: Vec::new(),
            flowspec_match: if c == Category::Spam || c == Category::BruteForce {
                FlowspecMatch::Service
            } else {
                FlowspecMatch::Source
            },
            rate_limit: 0,
        };
        if let Some(r) = raw.get(&c) {
            let at = format!("actions.{}", c.as_str());
            if let Some(s) = &r.start_at {
                let n = count(cx, &format!("{at}.start_at"), Some(s), 1) as usize;
                if n > esc.ladder.len() {
                    cx.err(
                        &format!("{at}.start_at"),
                        format!(
                            "the ladder has {} rungs, so it cannot start at rung {n}",
                            esc.ladder.len()
                        ),
                        Some(format!("write a rung from 1 to {}", esc.ladder.len())),
                    );
                } else {
                    a.start_at = n;
                }
            }
            if let Some(ann) = &r.announce {
                a.announce = announce_list(cx, &at, ann, bgp);
            }
            if let Some(m) = r.flowspec_match {
                a.flowspec_match = m;
            }
            if let Some(rl) = &r.rate_limit {
                a.rate_limit = rate_limit(cx, &at, rl);
            }
        }
        out.insert(c, a);
    }
    out
}

/// An `announce:` list at `at`, sorted and deduplicated; a kind no BGP peer takes is an
/// error at its entry.
fn announce_list(cx: &mut Cx, at: &str, ann: &[Announce], bgp: Option<&Bgp>) -> Vec<Announce> {
    let mut v = ann.to_vec();
    v.sort();
    v.dedup();
    for kind in &v {
        let wants: &[Family] = match kind {
            Announce::Flowspec => &[Family::Ipv4Flowspec, Family::Ipv6Flowspec],
            Announce::Rtbh => &[Family::Ipv4Unicast, Family::Ipv6Unicast],
        };
        let served = bgp.is_some_and(|b| {
            b.peers
                .iter()
                .any(|p| p.announce.contains(kind) && p.families.iter().any(|f| wants.contains(f)))
        });
        if !served {
            let name = if *kind == Announce::Flowspec {
                "flowspec"
            } else {
                "rtbh"
            };
            let i = ann.iter().position(|k| k == kind).unwrap_or(0);
            cx.err(
                &format!("{at}.announce[{i}]"),
                format!("{name} announcements are asked for, but no BGP peer takes them"),
                Some(format!(
                    "add a peer under `bgp.peers` with `announce: [{name}]` and a matching family, or remove `{name}` here"
                )),
            );
        }
    }
    v
}

/// A flowspec `rate_limit:` in bytes per second at `at`.
fn rate_limit(cx: &mut Cx, at: &str, rl: &Scalar) -> u32 {
    if rl.0.trim() == "0" {
        0
    } else {
        count32(cx, &format!("{at}.rate_limit"), Some(rl), 0)
    }
}

/// `operator_blocks:`. Without `announce:`, an operator block announces every kind that any
/// category announces (the strictest category), with a whole-source discard.
fn operator_blocks(
    cx: &mut Cx,
    raw: Option<&RawOperatorBlocks>,
    actions: &BTreeMap<Category, CategoryAction>,
    bgp: Option<&Bgp>,
) -> OperatorBlocks {
    let strictest: BTreeSet<Announce> = actions
        .values()
        .flat_map(|a| a.announce.iter().copied())
        .collect();
    let mut o = OperatorBlocks {
        announce: strictest.into_iter().collect(),
        rate_limit: 0,
    };
    if let Some(r) = raw {
        if let Some(ann) = &r.announce {
            o.announce = announce_list(cx, "operator_blocks", ann, bgp);
        }
        if let Some(rl) = &r.rate_limit {
            o.rate_limit = rate_limit(cx, "operator_blocks", rl);
        }
    }
    o
}

fn reconnect_requires(cx: &mut Cx, raw: Option<&[String]>) -> BTreeSet<String> {
    let Some(raw) = raw else {
        return d::RECONNECT_REQUIRES
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
    };
    let mut out = BTreeSet::new();
    for (i, c) in raw.iter().enumerate() {
        if !valid_name(c) {
            cx.err(
                &format!("reconnect_requires[{i}]"),
                format!("`{c}` is not a usable condition name"),
                Some("use letters, digits, `-` and `_`, e.g. fee_paid".into()),
            );
        } else if !out.insert(c.clone()) {
            cx.warn(
                &format!("reconnect_requires[{i}]"),
                format!("`{c}` is listed twice"),
                None,
            );
        }
    }
    if out.is_empty() {
        cx.warn(
            "reconnect_requires",
            "no conditions are required: any authorisation lifts a block",
            Some(
                "list what the abuse desk must confirm, e.g. [fee_paid, reinstalled, acknowledged]"
                    .into(),
            ),
        );
    }
    out
}

fn reconnects(
    cx: &mut Cx,
    raw: &[RawReconnect],
    required: &BTreeSet<String>,
    networks: &[Network],
    allow: &[IpNet],
    enf: &Enforcement,
) -> Vec<Reconnect> {
    let mut out: Vec<Reconnect> = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let at = format!("reconnect[{i}]");
        let ticket = r.ticket.0.trim().to_owned();
        if ticket.is_empty() {
            cx.err(
                &format!("{at}.ticket"),
                "the ticket is empty",
                Some("write the abuse desk's ticket id".into()),
            );
        } else if let Some(j) = out.iter().position(|o| o.ticket == ticket) {
            cx.err(
                &format!("{at}.ticket"),
                format!("ticket `{ticket}` is used twice (also reconnect[{j}])"),
                Some("each authorisation needs its own ticket".into()),
            );
        }
        if r.authorised_by.trim().is_empty() {
            cx.err(
                &format!("{at}.authorised_by"),
                "nobody is named as authorising this reconnect",
                Some("write who authorised it, e.g. `authorised_by: j.doe@abuse-desk`".into()),
            );
        }
        let conditions: BTreeSet<String> = r.conditions.iter().cloned().collect();
        let missing: Vec<&str> = required
            .difference(&conditions)
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            cx.err(
                &format!("{at}.conditions"),
                format!(
                    "required condition{} not attested: {}",
                    if missing.len() == 1 { "" } else { "s" },
                    missing.join(", ")
                ),
                Some(format!(
                    "add {} to `conditions:` once confirmed; the policy requires {}",
                    missing.join(", "),
                    required.iter().cloned().collect::<Vec<_>>().join(", ")
                )),
            );
        }
        for (j, c) in r.conditions.iter().enumerate() {
            if !required.contains(c) {
                cx.warn(
                    &format!("{at}.conditions[{j}]"),
                    format!("condition `{c}` is not one the policy requires"),
                    Some("check the spelling against `reconnect_requires`".into()),
                );
            }
        }
        let expires = match Time::parse_rfc3339(r.expires.0.trim()) {
            Ok(t) => t,
            Err(_) => {
                cx.err(
                    &format!("{at}.expires"),
                    format!("`{}` is not a date and time", r.expires.0.trim()),
                    Some("write RFC 3339 in UTC, e.g. 2026-12-31T23:59:59Z".into()),
                );
                Time::EPOCH
            }
        };
        let Some(target) = prefix(cx, &format!("{at}.address"), &r.address) else {
            continue;
        };
        if allow
            .iter()
            .any(|a| a.contains(&target) || target.contains(&a.addr()))
        {
            cx.err(
                &format!("{at}.address"),
                format!("{target} is allowlisted and is never blocked, so a reconnect for it is a mistake"),
                Some("check the address against the abuse ticket; probably a typo".into()),
            );
            continue;
        }
        if !networks.iter().any(|n| n.prefix.contains(&target)) {
            cx.err(
                &format!("{at}.address"),
                format!("{target} is not in any customer network, so the agent never blocks it"),
                Some("check the address against the abuse ticket, or add its network under `networks:`".into()),
            );
            continue;
        }
        let width = match target {
            IpNet::V4(_) => 32,
            IpNet::V6(_) => enf.ipv6_block_prefix,
        };
        let target =
            if target.prefix_len() == width || target.prefix_len() == target.max_prefix_len() {
                IpNet::new(target.addr(), width)
                    .map(|n| n.trunc())
                    .unwrap_or(target)
            } else {
                cx.err(
                    &format!("{at}.address"),
                    format!("{target} is a prefix, but blocks are per /{width}"),
                    Some("write the single blocked address, as `egressguard list` shows it".into()),
                );
                continue;
            };
        out.push(Reconnect {
            address: target,
            ticket,
            authorised_by: r.authorised_by.trim().to_owned(),
            conditions,
            expires,
            override_termination: r.override_termination.unwrap_or(false),
        });
    }
    out
}

fn enforcement(cx: &mut Cx, raw: Option<&RawEnforcement>) -> Enforcement {
    let empty = RawEnforcement::default();
    let raw = raw.unwrap_or(&empty);
    let table = raw.table.clone().unwrap_or_else(|| d::NFT_TABLE.to_owned());
    if table.is_empty()
        || table.len() > 64
        || !table.starts_with(|c: char| c.is_ascii_alphabetic())
        || !table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        cx.err(
            "enforcement.table",
            format!("`{table}` is not a usable nft table name"),
            Some(
                "use a letter followed by letters, digits or `_` (at most 64), e.g. egressguard"
                    .into(),
            ),
        );
    }
    let walled_garden = raw
        .walled_garden
        .iter()
        .enumerate()
        .filter_map(|(i, s)| prefix(cx, &format!("enforcement.walled_garden[{i}]"), s))
        .collect();
    let bh = raw.blackhole.as_ref();
    let bh_table = match bh.and_then(|b| b.table.as_ref()) {
        None => d::BLACKHOLE_TABLE,
        Some(s) => match s.0.trim() {
            "main" => 254,
            t => match t.parse::<u32>() {
                Ok(v) if v != 0 && v != 255 => v,
                _ => {
                    cx.err(
                        "enforcement.blackhole.table",
                        format!("`{t}` is not a usable routing table"),
                        Some("write `main` or a table id from 1 to 4294967295 other than 255 (local)".into()),
                    );
                    d::BLACKHOLE_TABLE
                }
            },
        },
    };
    let bh_proto = match bh.and_then(|b| b.protocol.as_ref()) {
        None => d::BLACKHOLE_PROTOCOL,
        Some(s) => match s.0.trim().parse::<u8>() {
            Ok(v) if v > 4 => v,
            _ => {
                cx.err(
                    "enforcement.blackhole.protocol",
                    format!("`{}` is not a usable route protocol number", s.0.trim()),
                    Some("write a number from 5 to 255 that no other routing daemon uses (0-4 belong to the kernel)".into()),
                );
                d::BLACKHOLE_PROTOCOL
            }
        },
    };
    let ipv6_block_prefix = match &raw.ipv6_block_prefix {
        None => d::IPV6_BLOCK_PREFIX,
        Some(s) => match s.0.trim().trim_start_matches('/').parse::<u8>() {
            Ok(v) if (32..=128).contains(&v) => v,
            _ => {
                cx.err(
                    "enforcement.ipv6_block_prefix",
                    format!(
                        "`{}` is not an IPv6 prefix length from 32 to 128",
                        s.0.trim()
                    ),
                    Some(
                        "write 128 to block single addresses or 64 to block the offender's /64"
                            .into(),
                    ),
                );
                d::IPV6_BLOCK_PREFIX
            }
        },
    };
    Enforcement {
        table,
        walled_garden,
        blackhole: Blackhole {
            enabled: bh.and_then(|b| b.enabled).unwrap_or(false),
            table: bh_table,
            protocol: bh_proto,
        },
        ipv6_block_prefix,
        reconcile_interval: duration(
            cx,
            "enforcement.reconcile_interval",
            raw.reconcile_interval.as_ref(),
            d::RECONCILE_INTERVAL,
        ),
    }
}

fn breaker(cx: &mut Cx, raw: Option<&RawBreaker>) -> CircuitBreaker {
    let empty = RawBreaker::default();
    let raw = raw.unwrap_or(&empty);
    CircuitBreaker {
        max_new_blocks_per_minute: count32(
            cx,
            "circuit_breaker.max_new_blocks_per_minute",
            raw.max_new_blocks_per_minute.as_ref(),
            d::BREAKER_MAX_NEW_BLOCKS_PER_MINUTE,
        ),
        max_blocks_per_network: count32(
            cx,
            "circuit_breaker.max_blocks_per_network",
            raw.max_blocks_per_network.as_ref(),
            d::BREAKER_MAX_BLOCKS_PER_NETWORK,
        ),
        cool_down: duration(
            cx,
            "circuit_breaker.cool_down",
            raw.cool_down.as_ref(),
            d::BREAKER_COOL_DOWN,
        ),
    }
}

fn anti_spoofing(cx: &mut Cx, raw: Option<&RawAntiSpoofing>, networks: &[Network]) -> AntiSpoofing {
    let empty = RawAntiSpoofing::default();
    let raw = raw.unwrap_or(&empty);
    let inside = |a: &IpNet| networks.iter().any(|n| n.prefix.contains(a));
    let mut bindings: Vec<Binding> = Vec::new();
    for (i, b) in raw.bindings.iter().enumerate() {
        let at = format!("anti_spoofing.bindings[{i}]");
        let address = match b.address.0.trim().parse::<IpAddr>() {
            Ok(a) => a,
            Err(_) => {
                cx.err(
                    &format!("{at}.address"),
                    format!("`{}` is not an IP address", b.address.0.trim()),
                    Some("a binding names one address, such as 203.0.113.7 or 2001:db8::7".into()),
                );
                continue;
            }
        };
        if !inside(&IpNet::from(address)) {
            cx.err(
                &format!("{at}.address"),
                format!("{address} is outside every customer network"),
                Some("bind addresses of your customers only (`networks:`)".into()),
            );
            continue;
        }
        let Some(mac) = crate::antispoof::parse_mac(b.mac.0.trim()) else {
            cx.err(
                &format!("{at}.mac"),
                format!("`{}` is not a MAC address", b.mac.0.trim()),
                Some("write six hexadecimal bytes with colons: 02:00:5e:10:00:0a".into()),
            );
            continue;
        };
        let mac = crate::antispoof::format_mac(mac);
        if let Some(prev) = bindings.iter().find(|p| p.address == address) {
            if prev.mac != mac {
                cx.err(
                    &format!("{at}.address"),
                    format!("{address} is bound twice, to {} and to {mac}", prev.mac),
                    Some(
                        "an address has one binding; list a floating address under `exempt:`"
                            .into(),
                    ),
                );
            }
            continue;
        }
        bindings.push(Binding { address, mac });
    }
    let exempt: Vec<IpNet> = raw
        .exempt
        .iter()
        .enumerate()
        .filter_map(|(i, s)| prefix(cx, &format!("anti_spoofing.exempt[{i}]"), s))
        .collect();
    for b in &bindings {
        if exempt.iter().any(|e| e.contains(&b.address)) {
            cx.err(
                "anti_spoofing.exempt",
                format!("{} has a static binding and is exempt", b.address),
                Some("remove one of the two".into()),
            );
        }
    }
    let rebind_after = duration(
        cx,
        "anti_spoofing.rebind_after",
        raw.rebind_after.as_ref(),
        d::ANTI_SPOOFING_REBIND_AFTER,
    );
    let window = duration(
        cx,
        "anti_spoofing.window",
        raw.window.as_ref(),
        d::ANTI_SPOOFING_WINDOW,
    );
    if window.is_zero() {
        cx.err(
            "anti_spoofing.window",
            "the window must be longer than zero",
            Some("e.g. `window: 60s`".into()),
        );
    }
    AntiSpoofing {
        enabled: raw.enabled.unwrap_or(d::ANTI_SPOOFING_ENABLED),
        learn: raw.learn.unwrap_or(d::ANTI_SPOOFING_LEARN),
        bindings,
        exempt,
        rebind_after,
        packets: count(
            cx,
            "anti_spoofing.packets",
            raw.packets.as_ref(),
            d::ANTI_SPOOFING_PACKETS,
        )
        .max(1),
        window,
        max_bindings: count32(
            cx,
            "anti_spoofing.max_bindings",
            raw.max_bindings.as_ref(),
            d::ANTI_SPOOFING_MAX_BINDINGS,
        ),
    }
}

fn asn(cx: &mut Cx, path: &str, s: &Scalar) -> Option<u32> {
    let t = s.0.trim();
    let t = t
        .strip_prefix("AS")
        .or_else(|| t.strip_prefix("as"))
        .unwrap_or(t);
    match t.parse::<u32>() {
        Ok(v) if v != 0 && v != 23456 => Some(v),
        _ => {
            cx.err(
                path,
                format!("`{}` is not a usable AS number", s.0.trim()),
                Some("write a number from 1 to 4294967295 (not 23456, AS_TRANS)".into()),
            );
            None
        }
    }
}

fn community(cx: &mut Cx, path: &str, s: &Scalar) -> Option<Community> {
    let t = s.0.trim();
    let parts: Vec<&str> = t.split(':').collect();
    let c = match parts.as_slice() {
        [a, b] => match (a.parse::<u16>(), b.parse::<u16>()) {
            (Ok(a), Ok(b)) => Some(Community::Standard(a, b)),
            _ => None,
        },
        [a, b, c] => match (a.parse::<u32>(), b.parse::<u32>(), c.parse::<u32>()) {
            (Ok(a), Ok(b), Ok(c)) => Some(Community::Large(a, b, c)),
            _ => None,
        },
        _ => None,
    };
    if c.is_none() {
        cx.err(
            path,
            format!("`{t}` is not a BGP community"),
            Some("write `ASN:VALUE` (each 0-65535), or `GLOBAL:LOCAL1:LOCAL2` for a large community; quote it".into()),
        );
    }
    c
}

/// A peer's community list `name` (at `at`), at most [`d::MAX_COMMUNITIES`] of them.
fn communities(cx: &mut Cx, at: &str, name: &str, raw: &[Scalar]) -> Vec<Community> {
    if raw.len() > d::MAX_COMMUNITIES {
        cx.err(
            &format!("{at}.{name}"),
            format!(
                "{} communities are listed, more than the {} one route may carry here",
                raw.len(),
                d::MAX_COMMUNITIES
            ),
            Some(format!(
                "list at most {} (more would not fit one UPDATE message)",
                d::MAX_COMMUNITIES
            )),
        );
    }
    let mut v: Vec<Community> = raw
        .iter()
        .enumerate()
        .filter_map(|(j, s)| community(cx, &format!("{at}.{name}[{j}]"), s))
        .take(d::MAX_COMMUNITIES)
        .collect();
    v.sort();
    v.dedup();
    v
}

fn bgp(cx: &mut Cx, raw: &RawBgp, learn: LearnBounds) -> Option<Bgp> {
    let local_as = asn(cx, "bgp.local_as", &raw.local_as);
    let router_id = match raw.router_id.0.trim().parse::<Ipv4Addr>() {
        Ok(r) if !r.is_unspecified() => Some(r),
        _ => {
            cx.err(
                "bgp.router_id",
                format!("`{}` is not a router id", raw.router_id.0.trim()),
                Some("write an IPv4 address, usually the router's loopback, e.g. 192.0.2.1".into()),
            );
            None
        }
    };
    if raw.peers.is_empty() {
        cx.warn(
            "bgp.peers",
            "a `bgp:` section without peers announces nothing",
            None,
        );
    }
    let mut peers: Vec<Peer> = Vec::new();
    for (i, p) in raw.peers.iter().enumerate() {
        let at = format!("bgp.peers[{i}]");
        let Some(peer_addr) = address(cx, &format!("{at}.address"), &p.address) else {
            continue;
        };
        if peers.iter().any(|q| q.address == peer_addr) {
            cx.err(
                &format!("{at}.address"),
                format!("peer {peer_addr} is listed twice"),
                Some("remove one entry".into()),
            );
        }
        let remote_as = asn(cx, &format!("{at}.remote_as"), &p.remote_as).unwrap_or(0);
        let port = match &p.port {
            None => d::BGP_PORT,
            Some(s) => match s.0.trim().parse::<u16>() {
                Ok(v) if v != 0 => v,
                _ => {
                    cx.err(
                        &format!("{at}.port"),
                        format!("`{}` is not a TCP port", s.0.trim()),
                        Some("write 179, or the port the peer listens on".into()),
                    );
                    d::BGP_PORT
                }
            },
        };
        let hold_time = match &p.hold_time {
            None => d::BGP_HOLD_TIME,
            Some(s) => {
                let t = s.0.trim().trim_end_matches('s');
                match t.parse::<u16>() {
                    Ok(v) if v == 0 || v >= 3 => v,
                    _ => {
                        cx.err(
                            &format!("{at}.hold_time"),
                            format!("`{}` is not a valid hold time", s.0.trim()),
                            Some(
                                "write 0 (no keepalives) or 3 to 65535 seconds (RFC 4271 4.2)"
                                    .into(),
                            ),
                        );
                        d::BGP_HOLD_TIME
                    }
                }
            }
        };
        let mut families = Vec::new();
        for (j, f) in p
            .families
            .clone()
            .unwrap_or_else(|| vec!["ipv4-flowspec".into(), "ipv6-flowspec".into()])
            .iter()
            .enumerate()
        {
            match Family::ALL.iter().find(|(_, n)| n == f) {
                Some((fam, _)) => families.push(*fam),
                None => cx.err(
                    &format!("{at}.families[{j}]"),
                    format!("`{f}` is not an address family"),
                    Some("use ipv4-unicast, ipv6-unicast, ipv4-flowspec or ipv6-flowspec".into()),
                ),
            }
        }
        families.sort();
        families.dedup();
        let announce = p
            .announce
            .clone()
            .unwrap_or_else(|| vec![Announce::Flowspec]);
        if announce.contains(&Announce::Flowspec)
            && !families
                .iter()
                .any(|f| matches!(f, Family::Ipv4Flowspec | Family::Ipv6Flowspec))
        {
            cx.err(
                &format!("{at}.announce"),
                "flowspec is to be announced, but no flowspec family is negotiated",
                Some("add ipv4-flowspec and/or ipv6-flowspec to `families:`".into()),
            );
        }
        let mut v4_nh = None;
        let mut v6_nh = None;
        if let Some(s) = &p.rtbh_next_hop_v4 {
            match s.0.trim().parse::<Ipv4Addr>() {
                Ok(a) => v4_nh = Some(a),
                Err(_) => cx.err(
                    &format!("{at}.rtbh_next_hop_v4"),
                    format!("`{}` is not an IPv4 address", s.0.trim()),
                    None,
                ),
            }
        }
        if let Some(s) = &p.rtbh_next_hop_v6 {
            match s.0.trim().parse::<Ipv6Addr>() {
                Ok(a) => v6_nh = Some(a),
                Err(_) => cx.err(
                    &format!("{at}.rtbh_next_hop_v6"),
                    format!("`{}` is not an IPv6 address", s.0.trim()),
                    None,
                ),
            }
        }
        if announce.contains(&Announce::Rtbh) {
            if !families
                .iter()
                .any(|f| matches!(f, Family::Ipv4Unicast | Family::Ipv6Unicast))
            {
                cx.err(
                    &format!("{at}.announce"),
                    "rtbh is to be announced, but no unicast family is negotiated",
                    Some("add ipv4-unicast and/or ipv6-unicast to `families:`".into()),
                );
            }
            if families.contains(&Family::Ipv4Unicast) && v4_nh.is_none() {
                cx.err(
                    &at,
                    "IPv4 RTBH routes need a next hop",
                    Some("set `rtbh_next_hop_v4:` to the discard next hop your routers null-route, e.g. 192.0.2.1".into()),
                );
            }
            if families.contains(&Family::Ipv6Unicast) && v6_nh.is_none() {
                cx.err(
                    &at,
                    "IPv6 RTBH routes need a next hop",
                    Some("set `rtbh_next_hop_v6:` to the discard next hop your routers null-route, e.g. 100::1".into()),
                );
            }
        }
        let rtbh_communities = communities(cx, &at, "rtbh_communities", &p.rtbh_communities);
        let flowspec_communities =
            communities(cx, &at, "flowspec_communities", &p.flowspec_communities);
        let local_address = p
            .local_address
            .as_ref()
            .and_then(|s| address(cx, &format!("{at}.local_address"), s));
        let md5_password_file = p.md5_password_file.as_ref().map(PathBuf::from);
        if let Some(f) = &md5_password_file
            && !f.is_absolute()
        {
            cx.err(
                &format!("{at}.md5_password_file"),
                "the password file must be an absolute path",
                None,
            );
        }
        peers.push(Peer {
            name: p.name.clone().unwrap_or_else(|| peer_addr.to_string()),
            address: peer_addr,
            port,
            remote_as,
            local_address,
            hold_time,
            families,
            announce,
            rtbh_communities,
            flowspec_communities,
            rtbh_next_hop_v4: v4_nh,
            rtbh_next_hop_v6: v6_nh,
            accept_flowspec: p.accept_flowspec.unwrap_or(false),
            max_learned: count32(
                cx,
                &format!("{at}.max_learned"),
                p.max_learned.as_ref(),
                d::MAX_LEARNED,
            ),
            md5_password_file,
            passive: p.passive.unwrap_or(false),
        });
    }
    let listen = raw.listen.as_ref().and_then(|s| {
        let t = s.0.trim();
        let parsed = t
            .parse::<SocketAddr>()
            .ok()
            .or_else(|| t.parse::<IpAddr>().ok().map(|a| SocketAddr::new(a, d::BGP_PORT)));
        if parsed.is_none() {
            cx.err(
                "bgp.listen",
                format!("`{t}` is not a listen address"),
                Some("write the address to accept peers on, e.g. 192.0.2.1 (port 179), 192.0.2.1:179 or \"[::]:179\"".into()),
            );
        }
        parsed
    });
    if listen.is_none() {
        for (i, p) in peers.iter().enumerate() {
            if p.passive {
                cx.err(
                    &format!("bgp.peers[{i}].passive"),
                    format!("peer {} is passive, but nothing listens for it", p.name),
                    Some("set `bgp.listen:` (e.g. 0.0.0.0:179), or remove `passive: true`".into()),
                );
            }
        }
    }
    let graceful_restart = graceful_restart(cx, raw.graceful_restart.as_ref());
    Some(Bgp {
        local_as: local_as?,
        router_id: router_id?,
        peers,
        listen,
        learn,
        graceful_restart,
    })
}

/// `bgp.graceful_restart:`: each time a duration, or `0` / `false` for off.
fn graceful_restart(cx: &mut Cx, raw: Option<&RawGracefulRestart>) -> GracefulRestart {
    let empty = RawGracefulRestart::default();
    let raw = raw.unwrap_or(&empty);
    let restart_time = gr_seconds(
        cx,
        "bgp.graceful_restart.restart_time",
        raw.restart_time.as_ref(),
        d::GR_RESTART_TIME,
        d::GR_RESTART_TIME_MAX,
    ) as u16;
    let long_lived_stale_time = gr_seconds(
        cx,
        "bgp.graceful_restart.long_lived_stale_time",
        raw.long_lived_stale_time.as_ref(),
        d::GR_LONG_LIVED_STALE_TIME,
        d::GR_LONG_LIVED_STALE_TIME_MAX,
    ) as u32;
    if restart_time == 0 && long_lived_stale_time > 0 && raw.long_lived_stale_time.is_some() {
        cx.warn(
            "bgp.graceful_restart.long_lived_stale_time",
            "long-lived graceful restart needs graceful restart, which `restart_time` turns off; it is not advertised either",
            Some("set `restart_time:` (e.g. 120s), or `long_lived_stale_time: 0`".into()),
        );
    }
    GracefulRestart {
        restart_time,
        long_lived_stale_time: if restart_time == 0 {
            0
        } else {
            long_lived_stale_time
        },
    }
}

/// Whole seconds of a graceful-restart time: a duration up to `max` seconds, `0` or `false`
/// for off.
fn gr_seconds(cx: &mut Cx, path: &str, s: Option<&Scalar>, default: Duration, max: u64) -> u64 {
    let Some(s) = s else {
        return default.as_secs();
    };
    let t = s.0.trim();
    if t == "0" || t == "false" {
        return 0;
    }
    if t == "true" {
        return default.as_secs();
    }
    let v = duration(cx, path, Some(s), default);
    if v.subsec_nanos() != 0 || v.as_secs() > max {
        cx.err(
            path,
            format!("`{t}` is not a whole number of seconds up to {max}s"),
            Some(format!(
                "write whole seconds up to {max}s (the capability's field), or 0 to turn it off"
            )),
        );
        return default.as_secs();
    }
    v.as_secs()
}

fn notify(cx: &mut Cx, raw: Option<&RawNotify>) -> Notify {
    let empty = RawNotify::default();
    let raw = raw.unwrap_or(&empty);
    if let Some(cmd) = &raw.command {
        match cmd.first() {
            None => cx.err(
                "notify.command",
                "the notify command is empty",
                Some("write the program and its arguments as a list, e.g. [/usr/local/bin/abuse-notify, --queue, abuse]".into()),
            ),
            Some(p) if !Path::new(p).is_absolute() => cx.err(
                "notify.command[0]",
                format!("`{p}` is not an absolute path"),
                Some("the service runs with an empty PATH: write the full path to the program".into()),
            ),
            Some(_) => {}
        }
    }
    let report_dir = raw.report_dir.as_ref().map(PathBuf::from);
    if let Some(dir) = &report_dir
        && !dir.is_absolute()
    {
        cx.err(
            "notify.report_dir",
            "the report directory must be an absolute path",
            Some("e.g. /var/lib/egressguard/reports".into()),
        );
    }
    Notify {
        command: raw.command.clone().filter(|c| !c.is_empty()),
        timeout: duration(
            cx,
            "notify.timeout",
            raw.timeout.as_ref(),
            d::NOTIFY_TIMEOUT,
        ),
        retries: match &raw.retries {
            None => d::NOTIFY_RETRIES,
            Some(s) => s.0.trim().parse::<u32>().unwrap_or_else(|_| {
                cx.err(
                    "notify.retries",
                    format!("`{}` is not a whole number", s.0.trim()),
                    None,
                );
                d::NOTIFY_RETRIES
            }),
        },
        report_dir,
        reporter: raw.reporter.clone(),
    }
}

fn metrics(cx: &mut Cx, raw: Option<&RawMetrics>) -> Option<SocketAddr> {
    let s = raw?.listen.as_ref()?;
    match s.0.trim().parse::<SocketAddr>() {
        Ok(a) if a.ip().is_loopback() => Some(a),
        Ok(a) => {
            cx.err(
                "metrics.listen",
                format!(
                    "{a} is not a loopback address; metrics must not be exposed to the network"
                ),
                Some(format!(
                    "write 127.0.0.1:{} and scrape through a reverse proxy or SSH tunnel",
                    a.port()
                )),
            );
            None
        }
        Err(_) => {
            cx.err(
                "metrics.listen",
                format!("`{}` is not an address and port", s.0.trim()),
                Some("write e.g. 127.0.0.1:9474 or [::1]:9474".into()),
            );
            None
        }
    }
}

fn detection(cx: &mut Cx, raw: Option<&RawDetection>) -> DetectionSettings {
    let empty = RawDetection::default();
    let raw = raw.unwrap_or(&empty);
    let evaluation_interval = duration(
        cx,
        "detection.evaluation_interval",
        raw.evaluation_interval.as_ref(),
        d::EVALUATION_INTERVAL,
    );
    if evaluation_interval > Duration::from_secs(5) {
        cx.warn(
            "detection.evaluation_interval",
            "detections will wait up to this long after a threshold is crossed",
            Some("keep it at 1s or less; the default is 250ms".into()),
        );
    }
    let max_sources = count32(
        cx,
        "detection.max_sources",
        raw.max_sources.as_ref(),
        d::MAX_SOURCES,
    );
    if max_sources < 1024 {
        cx.err(
            "detection.max_sources",
            format!("{max_sources} tracked sources is too few for a router"),
            Some("write at least 1024; each source costs at most 512 bytes".into()),
        );
    }
    let flood_tolerance = duration(
        cx,
        "detection.flood_tolerance",
        raw.flood_tolerance.as_ref(),
        d::FLOOD_TOLERANCE,
    );
    if flood_tolerance < Duration::from_millis(10) || flood_tolerance > Duration::from_secs(10) {
        cx.err(
            "detection.flood_tolerance",
            format!(
                "{} is outside 10ms..10s",
                humantime::format_duration(flood_tolerance)
            ),
            Some(
                "the default is 200ms: a source at twice a threshold is reported after 200 ms"
                    .into(),
            ),
        );
    }
    let sample_flows_above = if raw
        .sample_flows_above
        .as_ref()
        .is_some_and(|s| s.0.trim() == "0")
    {
        0
    } else {
        count(
            cx,
            "detection.sample_flows_above",
            raw.sample_flows_above.as_ref(),
            d::SAMPLE_FLOWS_ABOVE,
        )
    };
    if sample_flows_above != 0 && sample_flows_above < 1000 {
        cx.err(
            "detection.sample_flows_above",
            format!("{sample_flows_above} new flows/s would sample ordinary clients"),
            Some("write at least 1000, or 0 to report every flow; the default is 5000".into()),
        );
    }
    DetectionSettings {
        evaluation_interval,
        counter_interval: duration(
            cx,
            "detection.counter_interval",
            raw.counter_interval.as_ref(),
            d::COUNTER_INTERVAL,
        ),
        max_sources,
        flood_tolerance,
        sample_flows_above,
    }
}
