//! Abuse reports in X-ARF style (version 0.2, "PLAIN"): a MIME message with a human-readable
//! part, the machine-readable report (YAML) and the evidence, ready for an abuse desk to
//! forward to the customer or to the network the attack came from.

use std::fmt::Write;

use crate::messages::{Category, Decision, Evidence};

use super::Notification;

fn report_type(c: Option<Category>) -> &'static str {
    match c {
        Some(Category::Flood) => "ddos",
        Some(Category::BruteForce) => "login-attack",
        Some(Category::PortScan) | Some(Category::NetworkScan) => "portscan",
        Some(Category::Spam) => "spam",
        // X-ARF has no spoofing schema: the report's text says what was forged.
        Some(Category::Spoofing) | None => "info",
    }
}

fn category(d: &Decision) -> Option<Category> {
    match &d.cause {
        crate::messages::Cause::Detection { category } => Some(*category),
        _ => None,
    }
}

/// Renders the report for one notification.
pub fn xarf_report(n: &Notification, reporter: Option<&str>) -> String {
    let d = &n.decision;
    let cat = category(d);
    let from = reporter
        .map(str::to_owned)
        .unwrap_or_else(|| format!("egressguard@{}", n.router));
    let boundary = format!("xarf-{}-{}", d.time.as_nanos(), n.policy_version);
    let addr = d.target.addr();
    let mut m = String::new();
    let _ = writeln!(m, "From: {from}");
    let _ = writeln!(
        m,
        "Subject: abuse report about {} ({})",
        d.target,
        cat.map(|c| c.as_str()).unwrap_or("operator action")
    );
    let _ = writeln!(m, "Date: {}", rfc2822(d.time));
    let _ = writeln!(m, "MIME-Version: 1.0");
    let _ = writeln!(m, "Auto-Submitted: auto-generated");
    let _ = writeln!(m, "X-XARF: PLAIN");
    let _ = writeln!(
        m,
        "Content-Type: multipart/mixed; boundary=\"{boundary}\"\n"
    );

    let _ = writeln!(m, "--{boundary}\nContent-Type: text/plain; charset=utf-8\n");
    let _ = writeln!(
        m,
        "Our router {} detected {} from {} at {}.",
        n.router,
        cat.map(|c| c.as_str().replace('_', " "))
            .unwrap_or_else(|| "abuse".into()),
        d.target,
        d.time
    );
    match d.kind {
        Some(k) => {
            let _ = writeln!(
                m,
                "The address has been put on {k} (offense {}){}.",
                d.offense,
                d.expires
                    .map(|t| format!(" until {t}"))
                    .unwrap_or_else(|| " until the abuse desk authorises its reconnection".into())
            );
        }
        None => {
            let _ = writeln!(m, "The address has been let back on the network.");
        }
    }
    if let Some(ev) = &n.evidence {
        let _ = writeln!(m, "\n{}", summary(ev));
    }

    let _ = writeln!(
        m,
        "\n--{boundary}\nContent-Type: text/plain; charset=utf-8; name=\"report.txt\"\n"
    );
    let _ = writeln!(m, "---");
    let _ = writeln!(m, "Reported-From: {from}");
    let _ = writeln!(m, "Category: abuse");
    let _ = writeln!(m, "Report-Type: {}", report_type(cat));
    let _ = writeln!(m, "User-Agent: egressguard {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(m, "Date: {}", d.time);
    let _ = writeln!(
        m,
        "Source-Type: {}",
        if addr.is_ipv4() { "ipv4" } else { "ipv6" }
    );
    let _ = writeln!(m, "Source: {}", d.target);
    if let Some(ev) = &n.evidence {
        if let Some(p) = ev.top_ports.first() {
            let _ = writeln!(m, "Destination-Port: {}", p.key);
        }
        let _ = writeln!(m, "First-Seen: {}", ev.first_seen);
        let _ = writeln!(m, "Last-Seen: {}", ev.last_seen);
    }
    let _ = writeln!(m, "Attachment: application/json");

    let _ = writeln!(
        m,
        "\n--{boundary}\nContent-Type: application/json; name=\"evidence.json\"\n"
    );
    let _ = writeln!(
        m,
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({ "decision": d, "evidence": n.evidence }))
            .unwrap_or_default()
    );
    let _ = writeln!(m, "--{boundary}--");
    m
}

/// A short plain-text summary of the evidence.
fn summary(ev: &Evidence) -> String {
    let mut s = format!(
        "Observed between {} and {}:\n",
        ev.window_start, ev.window_end
    );
    for c in &ev.crossed {
        let _ = writeln!(s, "  {}: {} (threshold {})", c.signal, c.value, c.threshold);
    }
    if !ev.top_destinations.is_empty() {
        let _ = writeln!(s, "Most contacted destinations:");
        for d in &ev.top_destinations {
            let _ = writeln!(s, "  {} ({} flows)", d.key, d.count);
        }
    }
    if !ev.top_ports.is_empty() {
        let _ = writeln!(s, "Most contacted ports:");
        for p in &ev.top_ports {
            let _ = writeln!(s, "  {} ({} flows)", p.key, p.count);
        }
    }
    s
}

/// `Wed, 25 Nov 2026 04:00:43 +0000` (RFC 5322 date, UTC).
fn rfc2822(t: crate::messages::Time) -> String {
    let secs = t.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MON: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        WD[days.rem_euclid(7) as usize],
        day,
        MON[(month - 1) as usize],
        year,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc2822_dates() {
        use crate::messages::Time;
        assert_eq!(
            super::rfc2822(Time::from_secs(0)),
            "Thu, 01 Jan 1970 00:00:00 +0000"
        );
        let t = Time::parse_rfc3339("2026-11-25T04:00:43Z").unwrap();
        assert_eq!(super::rfc2822(t), "Wed, 25 Nov 2026 04:00:43 +0000");
        let t = Time::parse_rfc3339("2024-02-29T23:59:59Z").unwrap();
        assert_eq!(super::rfc2822(t), "Thu, 29 Feb 2024 23:59:59 +0000");
    }
}
