//! The human-readable form of a detection, as the abuse desk forwards it to the customer.
//! (The JSON form is serde's, from `messages`.)

use std::fmt;

use crate::messages::{Category, Detection, Evidence, Time, proto};

/// What a category means, in words a customer understands.
fn describe(c: Category) -> &'static str {
    match c {
        Category::Flood => "an outgoing flood (denial-of-service traffic)",
        Category::BruteForce => "repeated login attempts (brute force) against one server",
        Category::PortScan => "a port scan of one server",
        Category::NetworkScan => "a network scan (one service probed across many addresses)",
        Category::Spam => "mail sent directly to many mail servers (spam)",
        Category::Spoofing => {
            "packets with forged source addresses: addresses of other servers on the same segment"
        }
    }
}

/// What a signal name means.
fn signal_text(s: &str) -> &str {
    match s {
        "new_flows_per_sec" => "new connections per second",
        "unreplied_syn_per_sec" => "unanswered TCP connection attempts per second",
        "amplification_flows_per_sec" => {
            "unanswered UDP requests per second to amplification-prone ports"
        }
        "pps" => "packets per second",
        "bps" => "bits per second",
        "udp_pps" => "UDP packets per second that were never answered",
        "icmp_pps" => "ping (ICMP echo) requests per second",
        "attempts" => "connections to login services of one server",
        "distinct_ports" => "distinct ports contacted on one server",
        "distinct_destinations" => "distinct destination addresses",
        "unanswered_ratio" => "share of connections not answered",
        "incomplete_ratio" => "share of connections never completed (no handshake, no answer)",
        "distinct_udp_ports" => "distinct UDP ports contacted on one server",
        "spoofed_packets" => "packets with a forged source address",
        "distinct_targets" => "distinct servers with login sessions",
        other => other,
    }
}

/// What a signal name means under a category's `pattern` (where it differs).
fn pattern_signal_text<'a>(pattern: Option<&str>, s: &'a str) -> &'a str {
    match (pattern, s) {
        (Some("spread"), "attempts") => "short login sessions across servers",
        _ => signal_text(s),
    }
}

/// What a detection means, with its pattern.
fn describe_pattern(c: Category, pattern: Option<&str>) -> &'static str {
    match (c, pattern) {
        (Category::BruteForce, Some("spread")) => {
            "login attempts (brute force) spread over many servers, a few at each"
        }
        _ => describe(c),
    }
}

fn proto_name(p: u8) -> String {
    match p {
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::ICMP => "icmp".into(),
        proto::ICMPV6 => "icmpv6".into(),
        proto::SCTP => "sctp".into(),
        other => format!("proto {other}"),
    }
}

fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.abs() < 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

/// A pattern's name in a sentence.
fn pattern_text(p: &str) -> &'static str {
    match p {
        "answered_sweep" => "a sweep whose targets answered, its handshakes never completed",
        "slow_scan" => "a slow sweep over a long window",
        "udp_scan" => "a scan of UDP ports, answered by ICMP port-unreachable or not at all",
        "udp_flood" => "a UDP flood, its packets never answered",
        "icmp_flood" => "a ping flood",
        "spread" => "a few login attempts at each of many servers",
        _ => "a pattern",
    }
}

struct Ms(Time);

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            humantime::format_rfc3339_millis(self.0.to_system())
        )
    }
}

impl fmt::Display for Evidence {
    /// Multi-line, indented by two spaces, for inclusion in a report.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.window_end.since(self.window_start).as_secs_f64();
        writeln!(
            f,
            "  Observed from {} to {} ({} s window)",
            Ms(self.window_start),
            Ms(self.window_end),
            num(secs)
        )?;
        writeln!(
            f,
            "  First seen in the window: {}; last seen: {}",
            Ms(self.first_seen),
            Ms(self.last_seen)
        )?;
        if let Some(p) = &self.pattern {
            writeln!(f, "  Pattern: {} ({p})", pattern_text(p))?;
        }
        writeln!(f, "  Limits exceeded:")?;
        for c in &self.crossed {
            writeln!(
                f,
                "    {} ({}): {} (limit {})",
                pattern_signal_text(self.pattern.as_deref(), &c.signal),
                c.signal,
                num(c.value),
                num(c.threshold)
            )?;
        }
        if !self.counts.is_empty() {
            writeln!(f, "  Measured in the window:")?;
            for (k, v) in &self.counts {
                writeln!(f, "    {k}: {}", num(*v))?;
            }
        }
        if let Some(sp) = &self.spoofing {
            writeln!(
                f,
                "  Sent from MAC address {}; forged source addresses (packets dropped):",
                sp.mac
            )?;
            for s in &sp.spoofed_sources {
                writeln!(f, "    {:<39} {}", s.key.to_string(), s.count)?;
            }
        }
        if !self.top_destinations.is_empty() {
            writeln!(f, "  Most contacted destinations (connections):")?;
            for d in &self.top_destinations {
                writeln!(f, "    {:<39} {}", d.key.to_string(), d.count)?;
            }
        }
        if !self.top_ports.is_empty() {
            writeln!(f, "  Most contacted destination ports (connections):")?;
            for p in &self.top_ports {
                writeln!(f, "    {:<39} {}", p.key, p.count)?;
            }
        }
        if !self.sample.is_empty() {
            writeln!(
                f,
                "  Sample of connections (UTC time, protocol, source port -> destination):"
            )?;
            for s in &self.sample {
                let dst = match s.dst {
                    std::net::IpAddr::V6(a) => format!("[{a}]:{}", s.dport),
                    std::net::IpAddr::V4(a) => format!("{a}:{}", s.dport),
                };
                writeln!(
                    f,
                    "    {} {} {} -> {} {}",
                    Ms(s.time),
                    proto_name(s.proto),
                    s.sport,
                    dst,
                    if s.answered {
                        "answered"
                    } else {
                        "not answered"
                    }
                )?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Detection {
    /// A short report: what was seen from which address, then the evidence.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let src = if self.source.prefix_len() == self.source.max_prefix_len() {
            self.source.addr().to_string()
        } else {
            self.source.to_string()
        };
        writeln!(
            f,
            "Abuse detected from {src}: {} [{}]",
            describe_pattern(self.category, self.evidence.pattern.as_deref()),
            self.category
        )?;
        writeln!(
            f,
            "  Detected at {} under profile \"{}\"",
            Ms(self.time),
            self.profile
        )?;
        write!(f, "{}", self.evidence)
    }
}
