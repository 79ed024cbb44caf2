//! `egressguard list`.

use super::{ClientArgs, Exit, ask, print_json, table};
use crate::control::Request;
use crate::control::protocol::Body;

/// Prints the active blocks.
pub fn run(args: &ClientArgs) -> Exit {
    let body = match ask(args, Request::List) {
        Ok(b) => b,
        Err(e) => return e,
    };
    let Body::List(blocks) = body else {
        eprintln!("egressguard: unexpected reply to list");
        return Exit::Failure;
    };
    if args.json {
        print_json(&blocks);
        return Exit::Ok;
    }
    // Learnt flowspec rules are drops too: shown after the holds (`status --json` has them
    // for scripts).
    let learnt = match ask(args, Request::Status) {
        Ok(Body::Status(s)) => s.learnt,
        _ => Vec::new(),
    };
    if blocks.is_empty() {
        outln!("no active blocks");
    } else {
        print_holds(&blocks);
    }
    if !learnt.is_empty() {
        let rows: Vec<Vec<String>> = learnt
            .iter()
            .map(|l| {
                vec![
                    l.source.to_string(),
                    l.peer.clone(),
                    match &l.refused {
                        None => "drop from (source only)".into(),
                        Some(why) => format!("not enforced: {why}"),
                    },
                ]
            })
            .collect();
        outln!("\nlearnt flowspec rules:");
        out!("{}", table::render(&["SOURCE", "PEER", "ENFORCED"], &rows));
    }
    Exit::Ok
}

fn print_holds(blocks: &[crate::control::protocol::BlockView]) {
    let rows: Vec<Vec<String>> = blocks
        .iter()
        .map(|b| {
            vec![
                b.target.to_string(),
                format!(
                    "{}{}{}",
                    b.kind,
                    if b.dry_run { " (dry-run)" } else { "" },
                    b.suspended
                        .as_deref()
                        .map(|p| format!(" (suspended: {p})"))
                        .unwrap_or_default()
                ),
                b.offense.to_string(),
                b.since.to_string(),
                b.until
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "reconnect".into()),
                b.reason.clone(),
            ]
        })
        .collect();
    out!(
        "{}",
        table::render(
            &["ADDRESS", "HOLD", "OFFENSE", "SINCE", "UNTIL", "REASON"],
            &rows
        )
    );
}
