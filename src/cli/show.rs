//! `egressguard show ADDR`.

use super::{Exit, ShowArgs, ask, escape, print_json};
use crate::control::Request;
use crate::control::protocol::Body;

/// Prints the offense history of an address with its evidence.
pub fn run(args: &ShowArgs) -> Exit {
    let body = match ask(&args.client, Request::Show { addr: args.addr }) {
        Ok(b) => b,
        Err(e) => return e,
    };
    let Body::Show(h) = body else {
        eprintln!("egressguard: unexpected reply to show");
        return Exit::Failure;
    };
    if args.client.json {
        print_json(&h);
        return Exit::Ok;
    }
    outln!("{}", h.target);
    match &h.current {
        Some(b) => outln!(
            "  now: {} since {} until {} ({})",
            b.kind,
            b.since,
            b.until
                .map(|t| t.to_string())
                .unwrap_or_else(|| "reconnect".into()),
            escape(&b.reason)
        ),
        None => outln!("  now: not held"),
    }
    if h.offenses.is_empty() {
        outln!("  no offenses on record");
    }
    for o in &h.offenses {
        outln!(
            "\n  offense {} at {}: {} -> {}",
            o.number,
            o.time,
            o.category,
            o.decision
        );
        if let Some(ev) = &o.evidence {
            outln!("{}", indent(&ev.to_string(), "    "));
        }
    }
    if !h.audit.is_empty() {
        outln!("\n  audit trail:");
        for a in &h.audit {
            outln!(
                "    {}  {:<10} {:<10} {}",
                a.time,
                escape(&a.actor),
                a.action,
                escape(&a.detail)
            );
        }
    }
    Exit::Ok
}

fn indent(s: &str, pad: &str) -> String {
    s.lines()
        .map(|l| format!("{pad}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
