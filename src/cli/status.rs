//! `egressguard status`.

use super::{ClientArgs, Exit, ask, escape, print_json};
use crate::control::Request;
use crate::control::protocol::{Body, LearntView, PeerView};

/// Prints the agent's state.
pub fn run(args: &ClientArgs) -> Exit {
    let body = match ask(args, Request::Status) {
        Ok(b) => b,
        Err(e) => return e,
    };
    let Body::Status(s) = body else {
        eprintln!("egressguard: unexpected reply to status");
        return Exit::Failure;
    };
    if args.json {
        print_json(&s);
        return Exit::Ok;
    }
    outln!(
        "egressguard {}  mode {}  up since {}",
        s.version,
        s.mode,
        s.started
    );
    outln!(
        "policy      {} (version {})",
        s.policy_file,
        s.policy_version
    );
    let last = s
        .last_event
        .map(|t| t.to_string())
        .unwrap_or_else(|| "never".into());
    outln!(
        "observing   {} sources tracked, {} events seen, {} lost, last event {last}",
        s.sources_tracked,
        s.events_seen,
        s.events_lost
    );
    outln!(
        "detector    cap {} sources, {} evicted, {:.1} MiB; {} flood meter reports, {} sampled flows",
        s.max_sources,
        s.source_evictions,
        s.detector_memory_bytes as f64 / (1024.0 * 1024.0),
        s.meter_reports,
        s.sampled_flows
    );
    outln!(
        "holding     {} quarantined, {} blocked, {} terminated{}",
        s.quarantined,
        s.blocked,
        s.terminated,
        if s.suspended > 0 {
            format!(", {} suspended by protection", s.suspended)
        } else {
            String::new()
        }
    );
    if s.breaker.tripped {
        outln!(
            "breaker     TRIPPED since {}: {} ({} blocks held back)",
            s.breaker.since.map(|t| t.to_string()).unwrap_or_default(),
            escape(s.breaker.reason.as_deref().unwrap_or("")),
            s.breaker.held_back
        );
    } else {
        outln!("breaker     closed");
    }
    if s.anti_spoofing.enabled {
        outln!(
            "spoofing    {} bindings, {} forged packets {}, {} senders detected",
            s.anti_spoofing.bindings,
            s.anti_spoofing.forged_packets,
            if s.mode == "enforce" {
                "dropped"
            } else {
                "counted (dry-run)"
            },
            s.anti_spoofing.detections
        );
    } else {
        outln!("spoofing    off (anti_spoofing.enabled: false)");
    }
    for p in &s.bgp {
        for line in peer_lines(p, &s.learnt) {
            outln!("{line}");
        }
    }
    if let Some(l) = &s.bgp_listener {
        outln!(
            "bgp listen  {}: {} accepted, {} refused{}",
            l.address
                .map(|a| a.to_string())
                .unwrap_or_else(|| "not bound".into()),
            l.accepted,
            l.refused,
            l.last_error
                .as_deref()
                .map(|e| format!("; {}", escape(e)))
                .unwrap_or_default()
        );
    }
    for r in &s.reconnects {
        outln!(
            "reconnect   {} {}: {}",
            escape(&r.ticket),
            r.address,
            escape(&r.outcome)
        );
    }
    for w in &s.warnings {
        outln!("WARNING     {}", escape(w));
    }
    Exit::Ok
}

/// The lines `status` prints for one BGP session: state, malformed UPDATEs and disabled
/// families, learnt and refused flowspec rules.
fn peer_lines(p: &PeerView, learnt: &[LearntView]) -> Vec<String> {
    let mut lines = Vec::new();
    lines.push(format!(
        "bgp         {} {} {}{} ({} routes announced){}",
        p.name,
        p.address,
        p.state,
        if p.inbound { " (inbound)" } else { "" },
        p.announced,
        p.last_error
            .as_deref()
            .map(|e| format!("; last error: {}", escape(e)))
            .unwrap_or_default()
    ));
    // RFC 7606 / RFC 4760 section 7: what malformed UPDATEs cost, and the families they
    // disabled on the current session.
    for d in &p.disabled_families {
        let (family, reason) = (escape(&d.family), escape(&d.reason));
        lines.push(format!(
            "  disabled  {family}: {reason} (its UPDATEs ignored until the session restarts)"
        ));
    }
    let malformed = [
        p.treat_as_withdraw,
        p.attributes_discarded,
        p.nlri_treat_as_withdraw,
        p.families_disabled,
    ];
    if malformed.iter().any(|n| *n > 0) {
        let [updates, attributes, nlri, families] = malformed;
        lines.push(format!(
            "  malformed {updates} UPDATEs treat-as-withdraw, {attributes} attributes discarded, \
             {nlri} NLRI treat-as-withdraw, {families} families disabled"
        ));
    }
    if p.learned > 0 || p.learned_refused > 0 {
        let enforced = learnt
            .iter()
            .filter(|l| l.peer == p.name && l.enforced)
            .count();
        let by: Vec<String> = p
            .learned_refused_by
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        lines.push(format!(
            "  flowspec  {} learnt, {enforced} enforced; {} refused{}",
            p.learned,
            p.learned_refused,
            if by.is_empty() {
                String::new()
            } else {
                format!(" ({})", by.join(", "))
            }
        ));
        if let Some(r) = p.recent_refusals.last() {
            lines.push(format!(
                "            last refused: {} ({})",
                r.source
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into()),
                escape(&r.reason)
            ));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::DisabledFamilyView;

    #[test]
    fn a_disabled_family_and_the_malformed_counts_are_shown() {
        let mut p = PeerView {
            name: "rr1".into(),
            address: "192.0.2.1".parse().unwrap(),
            state: "established".into(),
            since: None,
            announced: 3,
            inbound: false,
            last_error: None,
            learned: 0,
            learned_refused: 0,
            learned_refused_by: Default::default(),
            recent_refusals: vec![],
            treat_as_withdraw: 0,
            attributes_discarded: 0,
            nlri_treat_as_withdraw: 0,
            families_disabled: 0,
            disabled_families: vec![],
        };
        assert_eq!(peer_lines(&p, &[]).len(), 1, "a clean session is one line");
        p.treat_as_withdraw = 1;
        p.nlri_treat_as_withdraw = 2;
        p.families_disabled = 1;
        p.disabled_families = vec![DisabledFamilyView {
            family: "ipv4-flowspec".into(),
            reason: "a flowspec NLRI length overruns the attribute".into(),
        }];
        let lines = peer_lines(&p, &[]);
        assert_eq!(
            lines[1..],
            [
                "  disabled  ipv4-flowspec: a flowspec NLRI length overruns the attribute (its \
                 UPDATEs ignored until the session restarts)",
                "  malformed 1 UPDATEs treat-as-withdraw, 0 attributes discarded, 2 NLRI \
                 treat-as-withdraw, 1 families disabled",
            ]
        );
    }
}
