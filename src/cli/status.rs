//! `egressguard status`.

use super::{ClientArgs, Exit, ask, escape, print_json};
use crate::control::Request;
use crate::control::protocol::Body;

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
        "detector    cap {} sources, {} evicted, {:.1} MiB",
        s.max_sources,
        s.source_evictions,
        s.detector_memory_bytes as f64 / (1024.0 * 1024.0)
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
        outln!(
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
        );
        if p.learned > 0 || p.learned_refused > 0 {
            let enforced = s
                .learnt
                .iter()
                .filter(|l| l.peer == p.name && l.enforced)
                .count();
            let by: Vec<String> = p
                .learned_refused_by
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            outln!(
                "  flowspec  {} learnt, {enforced} enforced; {} refused{}",
                p.learned,
                p.learned_refused,
                if by.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", by.join(", "))
                }
            );
            if let Some(r) = p.recent_refusals.last() {
                outln!(
                    "            last refused: {} ({})",
                    r.source
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "-".into()),
                    escape(&r.reason)
                );
            }
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
