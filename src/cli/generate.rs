//! The man pages and shell completions, written by the hidden verbs `generate-man` and
//! `generate-completions` for packaging.
//!
//! `egressguard(8)` is rendered here from the clap definitions, so that its synopsis, verbs
//! and options can never disagree with the binary; the sections clap knows nothing about
//! (exit status, environment, files, signals) are written here too and name the same
//! constants the program uses. `egressguard-policy(5)`, the policy file format, is the roff
//! source `docs/egressguard-policy.5` compiled into the binary; `tests/man_pages.rs` fails
//! when a policy setting is missing from it or it describes one that does not exist.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use clap::{Arg, ArgAction, CommandFactory};

use super::{Cli, DEFAULT_POLICY, DEFAULT_SOCKET, DEFAULT_STATE_DIR, Exit};

/// The roff source of `egressguard-policy(5)`; its `.TH` line is replaced on output.
const POLICY_PAGE: &str = include_str!("../../docs/egressguard-policy.5");

/// The pages `generate-man` writes, by file name.
pub const PAGES: [&str; 2] = ["egressguard.8", "egressguard-policy.5"];

/// Writes `egressguard.8` and `egressguard-policy.5` into `dir`.
pub fn man(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(PAGES[0]), command_page())?;
    std::fs::write(dir.join(PAGES[1]), policy_page())
}

/// Writes bash (`egressguard`) and zsh (`_egressguard`) completions into `dir`.
pub fn completions(dir: &Path) -> io::Result<()> {
    use clap_complete::{Shell, generate_to};
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command();
    generate_to(Shell::Bash, &mut cmd, "egressguard", dir)?;
    generate_to(Shell::Zsh, &mut cmd, "egressguard", dir)?;
    Ok(())
}

/// The `.TH` line: page name, section, date, source and manual.
fn title(name: &str, section: &str, manual: &str) -> String {
    format!(
        ".TH {} {section} \"{}\" \"egressguard {}\" \"{manual}\"\n",
        escape(&name.to_uppercase()),
        page_date(),
        env!("CARGO_PKG_VERSION"),
    )
}

/// The date on the pages: `SOURCE_DATE_EPOCH` (set by `packaging/deb/build.sh` to the last
/// commit, for reproducible packages) as YYYY-MM-DD, else none.
fn page_date() -> String {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|secs| {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            humantime::format_rfc3339_seconds(t).to_string()[..10].to_owned()
        })
        .unwrap_or_default()
}

/// `egressguard-policy(5)`: the source with its `.TH` line made by [`title`].
fn policy_page() -> String {
    let body = POLICY_PAGE
        .split_once('\n')
        .filter(|(first, _)| first.starts_with(".TH "))
        .map_or(POLICY_PAGE, |(_, rest)| rest);
    title("egressguard-policy", "5", "File Formats Manual") + body
}

/// `egressguard(8)`.
fn command_page() -> String {
    let mut cmd = Cli::command();
    cmd.build();
    let name = cmd.get_name().to_owned();
    // No hyphenation (HY: the man macros' own setting, which .SY and .YS restore), ragged
    // right: the page is full of options and paths.
    let mut r = title(&name, "8", "System Administration") + ".nr HY 0\n.nh\n.ad l\n";

    // The one-line summary is clap's `about` without the "egressguard: " in front.
    let about = cmd.get_about().map(|a| a.to_string()).unwrap_or_default();
    let summary = about
        .strip_prefix(&format!("{name}: "))
        .unwrap_or(&about)
        .trim_end_matches('.');
    let _ = writeln!(r, ".SH NAME\n{name} \\- {}", escape(summary));

    let verbs = leaf_verbs(&cmd);
    r.push_str(".SH SYNOPSIS\n");
    let globals: Vec<&Arg> = cmd.get_arguments().filter(|a| shown(a)).collect();
    let _ = writeln!(
        r,
        ".SY {name}\n{} \\fICOMMAND\\fR [\\fIOPTIONS\\fR]\n.YS",
        globals
            .iter()
            .map(|a| usage(a))
            .collect::<Vec<_>>()
            .join(" ")
    );
    for (path, verb) in &verbs {
        let args: Vec<String> = own_args(verb).map(usage).collect();
        let _ = writeln!(
            r,
            ".SY {name}\n\\fB{}\\fR {}\n.YS",
            escape(&path.join(" ")),
            args.join(" ")
        );
    }

    r.push_str(".SH DESCRIPTION\n");
    let long = cmd
        .get_long_about()
        .map(|a| a.to_string())
        .unwrap_or_default();
    for para in long.split("\n\n").skip(1) {
        let _ = writeln!(r, "{}\n.PP", text(para));
    }
    r.push_str(DESCRIPTION);

    r.push_str(".SH OPTIONS\nThese options apply to every command.\n");
    for a in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        option_item(&mut r, a);
    }

    r.push_str(".SH COMMANDS\n");
    for (path, verb) in &verbs {
        let _ = writeln!(r, ".SS \"{name} {}\"", escape(&path.join(" ")));
        let about = verb
            .get_long_about()
            .or_else(|| verb.get_about())
            .map(|a| a.to_string())
            .unwrap_or_default();
        let paras: Vec<String> = about.split("\n\n").map(text).collect();
        let _ = writeln!(r, "{}", sentence(paras.join("\n.PP\n")));
        for a in own_args(verb) {
            option_item(&mut r, a);
        }
    }

    r.push_str(&exit_status());
    r.push_str(ENVIRONMENT);
    r.push_str(&files());
    r.push_str(SIGNALS);
    r.push_str(SEE_ALSO);
    r
}

/// Every visible verb that runs something (`breaker reset`, not `breaker`), with its path
/// of names.
fn leaf_verbs(cmd: &clap::Command) -> Vec<(Vec<String>, &clap::Command)> {
    fn walk<'a>(
        cmd: &'a clap::Command,
        path: &[String],
        out: &mut Vec<(Vec<String>, &'a clap::Command)>,
    ) {
        for sub in cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            let mut p = path.to_vec();
            p.push(sub.get_name().to_owned());
            if sub.has_subcommands() {
                walk(sub, &p, out);
            } else {
                out.push((p, sub));
            }
        }
    }
    let mut out = Vec::new();
    walk(cmd, &[], &mut out);
    out
}

/// Whether an argument belongs in a synopsis or an option list: not hidden, and not
/// `--help`/`--version`, which every command takes (said once under OPTIONS).
fn shown(a: &Arg) -> bool {
    !a.is_hide_set() && !matches!(a.get_action(), ArgAction::Help | ArgAction::Version)
}

/// A verb's own arguments: without the global ones, which OPTIONS lists.
fn own_args(verb: &clap::Command) -> impl Iterator<Item = &Arg> {
    verb.get_arguments()
        .filter(|a| shown(a) && !a.is_global_set())
}

/// The value placeholder of an argument (`FILE`, `ADDR`).
fn value_name(a: &Arg) -> String {
    a.get_value_names()
        .and_then(|v| v.first())
        .map(|v| v.to_string())
        .unwrap_or_else(|| a.get_id().as_str().to_uppercase())
}

/// An argument as the synopsis shows it: `[\-\-socket PATH]`, `ADDR`.
fn usage(a: &Arg) -> String {
    let mut s = if a.is_positional() {
        format!("\\fI{}\\fR", escape(&value_name(a)))
    } else {
        let flag = match (a.get_short(), a.get_long()) {
            (Some(c), _) => format!("-{c}"),
            (None, Some(l)) => format!("--{l}"),
            (None, None) => String::new(),
        };
        let mut s = format!("\\fB{}\\fR", escape(&flag));
        if a.get_action().takes_values() {
            let _ = write!(s, " \\fI{}\\fR", escape(&value_name(a)));
        }
        s
    };
    if !a.is_required_set() {
        s = format!("[{s}]");
    }
    s
}

/// One `.TP` item: the option's names and value, its help, its default and its values.
fn option_item(r: &mut String, a: &Arg) {
    let mut head = Vec::new();
    if let Some(c) = a.get_short() {
        head.push(format!("\\fB{}\\fR", escape(&format!("-{c}"))));
    }
    if let Some(l) = a.get_long() {
        head.push(format!("\\fB{}\\fR", escape(&format!("--{l}"))));
    }
    let mut head = head.join(", ");
    if a.is_positional() {
        head = format!("\\fI{}\\fR", escape(&value_name(a)));
    } else if a.get_action().takes_values() {
        let _ = write!(head, " \\fI{}\\fR", escape(&value_name(a)));
    }
    let _ = writeln!(r, ".TP\n{head}");
    let help = a
        .get_long_help()
        .or_else(|| a.get_help())
        .map(|h| h.to_string())
        .unwrap_or_default();
    let paras: Vec<String> = help.split("\n\n").map(text).collect();
    let mut body = sentence(paras.join("\n.IP\n"));
    let values: Vec<String> = if a.is_hide_possible_values_set() {
        Vec::new()
    } else {
        a.get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| match v.get_help() {
                Some(h) => format!(
                    "\\fB{}\\fR ({})",
                    escape(v.get_name()),
                    lowercase_first(&text(h.to_string().trim_end_matches('.')))
                ),
                None => format!("\\fB{}\\fR", escape(v.get_name())),
            })
            .collect()
    };
    if a.get_action().takes_values() && !values.is_empty() {
        let _ = write!(body, "\nOne of: {}.", values.join(", "));
    }
    let defaults: Vec<String> = a
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    if a.get_action().takes_values() && !defaults.is_empty() && !a.is_hide_default_value_set() {
        let _ = write!(body, "\nDefault: \\fB{}\\fR.", escape(&defaults.join(" ")));
    }
    let _ = writeln!(r, "{body}");
}

/// Help text as a sentence: clap drops the full stop of a one-line doc comment.
fn sentence(mut s: String) -> String {
    if !s.is_empty() && !s.ends_with(['.', '?', '!']) {
        s.push('.');
    }
    s
}

/// "One line per event" as "one line per event", for a value's help in parentheses; an
/// acronym ("JSON object") stays as it is.
fn lowercase_first(s: &str) -> String {
    let mut c = s.chars();
    match (c.next(), c.next()) {
        (Some(a), Some(b)) if a.is_uppercase() && !b.is_uppercase() => {
            a.to_lowercase().chain(s.chars().skip(1)).collect()
        }
        _ => s.to_owned(),
    }
}

/// Escapes text for a roff text line: backslashes, hyphen-minus (kept an ASCII hyphen, so
/// options can be copied and searched), apostrophes and grave accents (kept ASCII too), and
/// a control character at the start of the line.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\e"),
            '-' => out.push_str("\\-"),
            '\'' => out.push_str("\\(aq"),
            '`' => out.push_str("\\(ga"),
            '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    if out.starts_with('.') {
        out.insert_str(0, "\\&");
    }
    out
}

/// A paragraph of help text as roff: escaped, `code` in bold.
fn text(s: &str) -> String {
    let s = s.trim();
    let mut out = String::new();
    let mut parts = s.split('`');
    let mut code = false;
    if let Some(first) = parts.next() {
        out.push_str(&escape(first));
    }
    for part in parts {
        code = !code;
        if code {
            let _ = write!(out, "\\fB{}\\fR", escape(part));
        } else {
            out.push_str(&escape(part));
        }
    }
    out
}

/// What DESCRIPTION says after clap's long description.
const DESCRIPTION: &str = r#"The agent is \fBegressguard run\fR, started by systemd from the unit
\fBegressguard.service\fR. What it watches and what it does is set by the policy file,
described in
.BR egressguard\-policy (5);
the shipped policy runs in dry\-run mode: it detects and logs what it would do and blocks
nothing until \fBmode: enforce\fR is set.
.PP
\fBegressguard check\fR validates a policy before it is installed or reloaded.
The other commands talk to the running agent over its control socket, which is open to
root and to the members of the group \fBegressguard\fR; \fB\-\-json\fR gives their output
in stable field names for scripts, and an error (the agent unreachable included) as a JSON
object \fB{"result": "error", "error": "..."}\fR with the same exit status.
\fBblock\fR, \fBunblock\fR and \fBbreaker reset\fR are recorded in the audit trail with the
calling user.
.PP
The agent owns one nftables table (\fBtable inet egressguard\fR by default) and, when
configured, blackhole routes tagged with its own route protocol number and BGP
announcements; it touches nothing else. It leaves its blocks in place when it stops or
restarts, so that a restart never opens a gap; purging the package removes them.
"#;

/// EXIT STATUS, from [`Exit`].
fn exit_status() -> String {
    let meaning = |e: Exit| match e {
        Exit::Ok => "Success; for \\fBcheck\\fR, the policy is valid.",
        Exit::InvalidPolicy => {
            "The policy is invalid: \\fBcheck\\fR found an error, \\fBrun\\fR refused to start \
             on it, or \\fBreload\\fR was refused (the previous policy stays in force)."
        }
        Exit::Usage => "Bad command\\-line usage.",
        Exit::Failure => {
            "A failure at run time: the agent is unreachable, a kernel request failed, \
             permission was denied, or reading or writing a file failed."
        }
        Exit::Refused => {
            "The agent refused the request (an unknown address, a missing ticket, an \
             address outside the customer networks, ...)."
        }
    };
    let mut r = String::from(".SH \"EXIT STATUS\"\n");
    for e in [
        Exit::Ok,
        Exit::InvalidPolicy,
        Exit::Usage,
        Exit::Failure,
        Exit::Refused,
    ] {
        let _ = writeln!(r, ".TP\n.B {}\n{}", e as u8, meaning(e));
    }
    r
}

/// ENVIRONMENT (`logging.rs`, `daemon::sd_notify`).
const ENVIRONMENT: &str = r#".SH ENVIRONMENT
.TP
.B EGRESSGUARD_LOG
The log level and filter, in the syntax of \fBRUST_LOG\fR: \fBdebug\fR,
\fBwarn\fR, \fBinfo,egressguard::bgp=debug\fR. Default: \fBinfo\fR. Logs go to
standard error, one line per event (see \fB\-\-log\-format\fR).
.TP
.B NOTIFY_SOCKET
Set by systemd for a \fBType=notify\fR service: \fBrun\fR reports \fBREADY=1\fR once its
blocks are back in the kernel and it observes, \fBRELOADING=1\fR during a reload and
\fBSTOPPING=1\fR when it stops.
.TP
.B JOURNAL_STREAM
Set by systemd when standard error goes to the journal: the plain log lines then carry no
timestamp of their own.
"#;

/// FILES, from the default paths.
fn files() -> String {
    let items = [
        (
            DEFAULT_POLICY.to_owned(),
            "The policy (\\fB\\-\\-policy\\fR), a configuration file of the package, which \
             the agent only reads; its format is described in\n\
             .BR egressguard\\-policy (5).",
        ),
        (
            DEFAULT_STATE_DIR.to_owned(),
            "The state directory (\\fB\\-\\-state\\-dir\\fR), owned by the user \
             \\fBegressguard\\fR.",
        ),
        (
            format!("{DEFAULT_STATE_DIR}/{}", crate::daemon::STATE_DB),
            "The state database (SQLite): every hold, the offense history with its \
             evidence, the used reconnect tickets and the audit trail. Losing it must not \
             lift the blocks: \\fBrun\\fR refuses to start on a missing or empty database \
             while its nft table still holds addresses, unless given \
             \\fB\\-\\-fresh\\-state\\fR.",
        ),
        (
            DEFAULT_SOCKET.to_owned(),
            "The control socket (\\fB\\-\\-socket\\fR), mode 0660, owner root and group \
             \\fBegressguard\\fR.",
        ),
        (
            "/usr/lib/systemd/system/egressguard.service".to_owned(),
            "The systemd unit: runs \\fBcheck\\fR before \\fBrun\\fR and before a reload, \
             as the user \\fBegressguard\\fR with the capability CAP_NET_ADMIN only. Change \
             it with \\fBsystemctl edit egressguard\\fR.",
        ),
        (
            "/usr/share/doc/egressguard/examples/".to_owned(),
            "Example policies: a VPS host, an ISP edge with BGP, a host with mail relays.",
        ),
    ];
    let mut r = String::from(".SH FILES\n");
    for (path, what) in items {
        let _ = writeln!(r, ".TP\n.I {}\n{what}", escape(&path));
    }
    r
}

/// SIGNALS (the signal thread of `daemon.rs`).
const SIGNALS: &str = r#".SH SIGNALS
.TP
.B SIGHUP
\fBrun\fR re\-reads the policy file, like \fBegressguard reload\fR and
\fBsystemctl reload egressguard\fR. A policy that fails validation, or one that changes a
setting read only at start, is refused and logged, and the previous policy stays in force.
.TP
.BR SIGTERM ", " SIGINT
\fBrun\fR stops in a fixed order: no more control requests, the observers and detection
stop, the decision in hand and the enforcement batch in hand are finished, BGP sessions
are closed. The blocks stay in the kernel.
"#;

/// SEE ALSO: only pages that exist where the package is installed (its own, and those of
/// the packages it depends on or recommends, and of systemd).
const SEE_ALSO: &str = r#".SH "SEE ALSO"
.BR egressguard\-policy (5),
.BR nft (8),
.BR conntrack (8),
.BR systemctl (1),
.BR journalctl (1)
"#;
