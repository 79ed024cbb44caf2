//! `egressguard check`: validate a policy like `nginx -t`.

use std::io::Write;

use serde::Serialize;

use super::{CheckArgs, Exit};
use crate::control::protocol::{Body, ReconnectView};
use crate::control::{Reply, Request, client};
use crate::policy::{Diagnostic, Policy, Severity};

#[derive(Serialize)]
struct Report<'a> {
    ok: bool,
    file: String,
    diagnostics: &'a [Diagnostic],
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<&'a Policy>,
    /// Each reconnect authorisation's outcome against the running agent's state.
    #[serde(skip_serializing_if = "Option::is_none")]
    reconnects: Option<Vec<ReconnectView>>,
    /// Why the reconnects could not be checked against the state.
    #[serde(skip_serializing_if = "Option::is_none")]
    reconnects_unchecked: Option<String>,
}

/// Asks the running agent what the policy's reconnect list would do now. `Err` says why it
/// could not be asked (no agent, no permission) or what it answered instead.
fn preview(args: &CheckArgs, text: &str) -> Result<Vec<ReconnectView>, String> {
    let req = Request::PreviewReconnects {
        policy: text.to_owned(),
        path: args.policy.display().to_string(),
    };
    match client::call(&args.socket, &req, std::time::Duration::from_secs(10)) {
        Ok(Reply::Ok {
            body: Body::Reconnects { reconnects },
        }) => Ok(reconnects),
        Ok(Reply::Ok { .. }) => Err("the agent gave an unexpected answer".into()),
        Ok(Reply::Error { error }) => Err(format!("the agent refused: {error}")),
        Err(e) => Err(format!(
            "no agent answers at {}: {}",
            args.socket.display(),
            crate::logging::error_chain(&e)
        )),
    }
}

/// Runs the check and prints the result; returns the exit code.
pub fn run(args: &CheckArgs) -> Exit {
    let text = match crate::policy::read_text(&args.policy) {
        Ok(t) => t,
        Err(e) => {
            let why = match &e {
                crate::policy::PolicyError::Read { source, .. } => source.to_string(),
                other => other.to_string(),
            };
            let error = format!("{}: cannot read the policy: {why}", args.policy.display());
            if args.json {
                super::json_error(&error);
            }
            eprintln!("{error}");
            return Exit::InvalidPolicy;
        }
    };
    // Checked on the router it is for: held widths that would include this host's own
    // addresses are warned about.
    let (policy, diags) =
        Policy::check_text_on(&text, &args.policy, &crate::daemon::host_addresses());
    let ok = policy.is_some();
    // Reconnects are checked against the state, which only the running agent holds (its
    // database is locked while it runs).
    let (reconnects, unchecked) = match &policy {
        Some(p) if !p.reconnect.is_empty() => match preview(args, &text) {
            Ok(r) => (Some(r), None),
            Err(why) => (None, Some(why)),
        },
        _ => (None, None),
    };
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
            reconnects,
            reconnects_unchecked: unchecked,
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
                for r in reconnects.iter().flatten() {
                    let _ = writeln!(
                        out,
                        "reconnect {} for {}: {}",
                        r.ticket,
                        r.address,
                        if r.outcome == "applied" {
                            "would be applied now"
                        } else {
                            r.outcome.as_str()
                        }
                    );
                }
                if let Some(why) = &unchecked {
                    let _ = writeln!(
                        out,
                        "note: the reconnect authorisations were not checked against the agent's state ({why}); `egressguard reload` and `status` report each one"
                    );
                }
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
