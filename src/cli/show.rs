//! `egressguard show ADDR`: one page of the history (the newest `--limit` offenses and audit
//! entries after `--offset`), or with `--all` every page, asked for one after the other so
//! that no single reply of the agent is large.

use super::{Exit, ShowArgs, ask, escape, print_json};
use crate::control::Request;
use crate::control::protocol::{Body, HistoryView, MAX_PAGE};

/// Pages `--all` asks for at most (100 000 offenses): a loop that cannot end is a bug.
const MAX_PAGES: usize = 1000;

/// Prints the offense history of an address with its evidence.
pub fn run(args: &ShowArgs) -> Exit {
    let (limit, offset) = if args.all {
        (MAX_PAGE, 0)
    } else {
        (args.limit, args.offset)
    };
    let mut h = match page(args, limit, offset) {
        Ok(h) => h,
        Err(e) => return e,
    };
    if args.all {
        // Later pages come first in the output: they are older. An offense recorded while
        // paging shifts the pages by one, so an entry may show twice; none goes missing.
        let mut offset = limit;
        for _ in 1..MAX_PAGES {
            if h.offenses_omitted == 0 && h.audit_omitted == 0 {
                break;
            }
            let older = match page(args, limit, offset) {
                Ok(p) => p,
                Err(e) => return e,
            };
            if older.offenses.is_empty() && older.audit.is_empty() {
                break;
            }
            let shown = |o: u64, len: usize| o.saturating_sub(len as u64);
            h.offenses_omitted = shown(h.offenses_omitted, older.offenses.len());
            h.audit_omitted = shown(h.audit_omitted, older.audit.len());
            let mut offenses = older.offenses;
            offenses.append(&mut h.offenses);
            h.offenses = offenses;
            let mut audit = older.audit;
            audit.append(&mut h.audit);
            h.audit = audit;
            offset += limit;
        }
    }
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
    if h.offenses.is_empty() && h.offenses_omitted == 0 {
        outln!("  no offenses on record");
    }
    let older = |omitted: u64, what: &str| {
        let older = omitted.saturating_sub(offset as u64);
        if older > 0 {
            outln!(
                "\n  ... {older} earlier {what} not shown: --offset {} for the next page, --all for every one",
                offset + limit
            );
        }
        if offset > 0 {
            outln!("  ({offset} newer {what} skipped by --offset)");
        }
    };
    if !args.all {
        older(h.offenses_omitted, "offenses");
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
    if !h.audit.is_empty() || h.audit_omitted > 0 {
        outln!("\n  audit trail:");
        if !args.all {
            older(h.audit_omitted, "audit entries");
        }
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

/// One page of the history.
fn page(args: &ShowArgs, limit: usize, offset: usize) -> Result<HistoryView, Exit> {
    let body = ask(
        &args.client,
        Request::Show {
            addr: args.addr,
            limit: Some(limit),
            offset,
        },
    )?;
    match body {
        Body::Show(h) => Ok(*h),
        _ => {
            eprintln!("egressguard: unexpected reply to show");
            Err(Exit::Failure)
        }
    }
}

fn indent(s: &str, pad: &str) -> String {
    s.lines()
        .map(|l| format!("{pad}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
