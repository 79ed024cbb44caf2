//! `egressguard status`.

use super::{ClientArgs, Exit, ask, print_json};
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
    println!(
        "egressguard {}  mode {}  up since {}",
        s.version, s.mode, s.started
    );
    println!(
        "policy      {} (version {})",
        s.policy_file, s.policy_version
    );
    let last = s
        .last_event
        .map(|t| t.to_string())
        .unwrap_or_else(|| "never".into());
    println!(
        "observing   {} sources tracked, {} events seen, {} lost, last event {last}",
        s.sources_tracked, s.events_seen, s.events_lost
    );
    println!(
        "holding     {} quarantined, {} blocked, {} terminated",
        s.quarantined, s.blocked, s.terminated
    );
    if s.breaker.tripped {
        println!(
            "breaker     TRIPPED since {}: {} ({} blocks held back)",
            s.breaker.since.map(|t| t.to_string()).unwrap_or_default(),
            s.breaker.reason.as_deref().unwrap_or(""),
            s.breaker.held_back
        );
    } else {
        println!("breaker     closed");
    }
    for p in &s.bgp {
        println!(
            "bgp         {} {} {} ({} routes announced)",
            p.name, p.address, p.state, p.announced
        );
    }
    for r in &s.reconnects {
        println!("reconnect   {} {}: {}", r.ticket, r.address, r.outcome);
    }
    for w in &s.warnings {
        println!("WARNING     {w}");
    }
    Exit::Ok
}
