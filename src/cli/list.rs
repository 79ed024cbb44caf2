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
    if blocks.is_empty() {
        println!("no active blocks");
        return Exit::Ok;
    }
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
    print!(
        "{}",
        table::render(
            &["ADDRESS", "HOLD", "OFFENSE", "SINCE", "UNTIL", "REASON"],
            &rows
        )
    );
    Exit::Ok
}
