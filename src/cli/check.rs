//! `egressguard check`: validate a policy like `nginx -t`.

use std::io::Write;

use serde::Serialize;

use super::{CheckArgs, Exit};
use crate::policy::{Diagnostic, Policy, Severity};

#[derive(Serialize)]
struct Report<'a> {
    ok: bool,
    file: String,
    diagnostics: &'a [Diagnostic],
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<&'a Policy>,
}

/// Runs the check and prints the result; returns the exit code.
pub fn run(args: &CheckArgs) -> Exit {
    let text = match std::fs::read_to_string(&args.policy) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: cannot read the policy: {e}", args.policy.display());
            return Exit::InvalidPolicy;
        }
    };
    let (policy, diags) = Policy::check_text(&text, &args.policy);
    let ok = policy.is_some();
    let mut out = std::io::stdout().lock();
    if args.json {
        let report = Report {
            ok,
            file: args.policy.display().to_string(),
            diagnostics: &diags,
            policy: if args.print_effective {
                policy.as_ref()
            } else {
                None
            },
        };
        let _ = serde_json::to_writer_pretty(&mut out, &report);
        let _ = writeln!(out);
    } else {
        for d in &diags {
            let _ = writeln!(out, "{d}");
        }
        let errors = diags
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count();
        let warnings = diags.len() - errors;
        match &policy {
            Some(p) => {
                let _ = writeln!(
                    out,
                    "{}: policy OK ({} network{}, {} profile{}, mode {}, version {}){}",
                    args.policy.display(),
                    p.networks.len(),
                    plural(p.networks.len()),
                    p.profiles.len(),
                    plural(p.profiles.len()),
                    if p.enforcing() { "enforce" } else { "dry-run" },
                    p.source.digest,
                    if warnings > 0 {
                        format!(", {warnings} warning{}", plural(warnings))
                    } else {
                        String::new()
                    }
                );
                if args.print_effective {
                    let _ = writeln!(out, "# effective policy (defaults and inheritance applied)");
                    let _ = write!(out, "{}", serde_yaml::to_string(p).unwrap_or_default());
                }
            }
            None => {
                let _ = writeln!(
                    out,
                    "{}: policy refused: {errors} error{}{}",
                    args.policy.display(),
                    plural(errors),
                    if warnings > 0 {
                        format!(", {warnings} warning{}", plural(warnings))
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
    if ok { Exit::Ok } else { Exit::InvalidPolicy }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
