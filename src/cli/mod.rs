//! The command line: argument definitions (shared with the man page and completion
//! generators, see [`generate`]) and one small module per verb. `main.rs` only parses and
//! dispatches here.

/// `print!` for the control verbs: a closed stdout (`egressguard status | head -1`) ends the
/// program quietly instead of panicking.
macro_rules! out {
    ($($t:tt)*) => { $crate::cli::write_out(format_args!($($t)*)) };
}

/// `println!` likewise.
macro_rules! outln {
    () => { $crate::cli::write_out(format_args!("\n")) };
    ($($t:tt)*) => { $crate::cli::write_out(format_args!("{}\n", format_args!($($t)*))) };
}

pub mod block;
pub mod breaker;
pub mod check;
pub mod generate;
pub mod list;
pub mod reload;
pub mod show;
pub mod status;
mod table;
pub mod unblock;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::logging::LogFormat;

/// Installed location of the policy (a conffile; the agent never writes it).
pub const DEFAULT_POLICY: &str = "/etc/egressguard/policy.yaml";
/// Installed location of the state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/egressguard";
/// Installed location of the control socket.
pub const DEFAULT_SOCKET: &str = "/run/egressguard/control.sock";

/// Process exit codes. Scripts and systemd rely on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Success.
    Ok = 0,
    /// The policy is invalid (`check`, or `run` refusing to start).
    InvalidPolicy = 1,
    /// Bad command-line usage (clap's own code).
    Usage = 2,
    /// Anything else failed at run time (kernel, permissions, I/O, agent unreachable).
    Failure = 3,
    /// The agent refused the request (unknown address, missing ticket, ...).
    Refused = 4,
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e as u8)
    }
}

/// egressguard: cuts compromised customer servers off the network.
///
/// The agent watches conntrack events and nftables counters on an edge router, detects outgoing
/// abuse (floods, brute force, port and network scans, spam) by the thresholds of a YAML
/// policy, and enforces with nftables sets, blackhole routes and BGP announcements until the
/// abuse desk authorises the reconnect.
#[derive(Debug, Parser)]
#[command(
    name = "egressguard",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "FORMAT",
        default_value_t = LogFormat::Plain
    )]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (normally started by systemd).
    Run(RunArgs),
    /// Validate a policy file like `nginx -t`: exit 0, or list every error with file:line:column.
    Check(CheckArgs),
    /// Show the agent at work in network namespaces built for the purpose (needs root).
    Demo(DemoArgs),
    /// The agent's state: mode, policy version, sources, blocks, breaker, BGP sessions.
    ///
    /// Each BGP session shows what its malformed UPDATEs cost (RFC 7606): UPDATEs treated as
    /// withdrawn, attributes discarded, single flowspec NLRI treated as withdrawn, and the
    /// families disabled on the current session with the reason.
    Status(ClientArgs),
    /// Active blocks with reason, since and until.
    List(ClientArgs),
    /// Offense history of an address, with the evidence.
    Show(ShowArgs),
    /// Block an address by hand (audited).
    Block(BlockArgs),
    /// Lift a block by hand, citing the abuse ticket (audited).
    Unblock(UnblockArgs),
    /// Re-read the policy file; a policy that fails validation is refused and the old one stays.
    Reload(ClientArgs),
    /// Circuit breakers: `breaker reset [NETWORK]` re-arms a tripped one (audited).
    #[command(subcommand)]
    Breaker(BreakerCommand),
    /// Write the man pages egressguard(8) and egressguard-policy(5) into a directory (used by
    /// packaging).
    #[command(hide = true)]
    GenerateMan {
        /// Output directory.
        dir: PathBuf,
    },
    /// Write bash and zsh completions into a directory (used by packaging).
    #[command(hide = true)]
    GenerateCompletions {
        /// Output directory.
        dir: PathBuf,
    },
}

/// `egressguard run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The policy file.
    #[arg(long, short = 'p', value_name = "FILE", default_value = DEFAULT_POLICY)]
    pub policy: PathBuf,
    /// Directory of the state database.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Path of the control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Group whose members may use the control socket besides root (the socket file gets
    /// this group; without such a group only root gets in).
    #[arg(long, value_name = "GROUP", default_value = crate::control::server::GROUP)]
    pub socket_group: String,
    /// Start although the state database is empty or missing while the agent's nft table
    /// still holds blocked or quarantined addresses: those holds are dropped (audited as
    /// `fresh_state`). Without it the agent refuses to start, so that losing the database
    /// never lifts every block by accident.
    #[arg(long)]
    pub fresh_state: bool,
}

/// `egressguard check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// The policy file.
    #[arg(long, short = 'p', value_name = "FILE", default_value = DEFAULT_POLICY)]
    pub policy: PathBuf,
    /// Also print the effective policy: every setting with defaults and inheritance applied.
    #[arg(long)]
    pub print_effective: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// The running agent's control socket: the reconnect authorisations are checked against
    /// its state (blocked? terminated? ticket used?) when it answers.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// `egressguard demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Seconds to pause between the steps, to read along.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    pub pause: f64,
}

/// Options every control verb takes.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Path of the agent's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print the reply as JSON (stable field names, for scripts).
    #[arg(long)]
    pub json: bool,
}

/// `egressguard show`.
#[derive(Debug, Clone, Args)]
pub struct ShowArgs {
    /// The address, or the prefix `list` shows for an aggregated IPv6 block (2001:db8:c:1::/64).
    #[arg(value_parser = parse_target)]
    pub addr: ipnet::IpNet,
    /// Offenses and audit entries to show, the newest ones (at most 100 a page).
    #[arg(long, value_name = "N", default_value_t = crate::control::protocol::DEFAULT_PAGE,
          value_parser = parse_page, conflicts_with = "all")]
    pub limit: usize,
    /// Skip the N newest offenses and audit entries (the next page is `--offset` plus
    /// `--limit`).
    #[arg(long, value_name = "N", default_value_t = 0, conflicts_with = "all")]
    pub offset: usize,
    /// Every offense and audit entry on record (asked for page after page).
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// A page size: 1 to [`crate::control::protocol::MAX_PAGE`].
fn parse_page(s: &str) -> Result<usize, String> {
    let max = crate::control::protocol::MAX_PAGE;
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "`{s}` is not a page size: give 1 to {max} (--all shows every entry)"
        )),
    }
}

/// `egressguard block`.
#[derive(Debug, Clone, Args)]
pub struct BlockArgs {
    /// The address, or a prefix inside a customer network (203.0.113.0/28).
    #[arg(value_parser = parse_target)]
    pub addr: ipnet::IpNet,
    /// Why: goes to the audit trail and the notification.
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
    /// How long, e.g. 30m, 12h, 7d.
    #[arg(long = "for", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub duration: std::time::Duration,
    /// Also accept a target outside every customer network (an attacker's address, say).
    /// Loopback, link-local, multicast, unspecified, broadcast, the router's next hops and
    /// the router's own addresses are refused whatever this says.
    #[arg(long)]
    pub outside_networks: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `egressguard breaker ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum BreakerCommand {
    /// Re-arm the tripped circuit breaker of one network entry (its prefix, an address in it
    /// or its name), or of every entry; audited and sent to the notify hook.
    Reset(BreakerResetArgs),
}

/// `egressguard breaker reset`.
#[derive(Debug, Clone, Args)]
pub struct BreakerResetArgs {
    /// The network entry; every tripped entry when absent.
    pub network: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `egressguard unblock`.
#[derive(Debug, Clone, Args)]
pub struct UnblockArgs {
    /// The address, or the prefix `list` shows for an aggregated IPv6 block (2001:db8:c:1::/64).
    #[arg(value_parser = parse_target)]
    pub addr: ipnet::IpNet,
    /// The abuse desk's ticket that justifies lifting the block.
    #[arg(long)]
    pub ticket: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// An address (as a host prefix) or a prefix, as `list` prints targets.
fn parse_target(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("`{s}` is neither an address nor a prefix"))
}

/// Sends one request and returns the reply body, or prints the error and returns the exit code.
pub(crate) fn ask(
    args: &ClientArgs,
    req: crate::control::Request,
) -> Result<crate::control::protocol::Body, Exit> {
    use crate::control::{Reply, client};
    match client::call(&args.socket, &req, std::time::Duration::from_secs(35)) {
        Ok(Reply::Ok { body }) => Ok(body),
        Ok(Reply::Error { error }) => {
            if args.json {
                json_error(&error);
            } else {
                eprintln!("egressguard: {}", escape(&error));
            }
            Err(Exit::Refused)
        }
        Err(e) => {
            let error = crate::logging::error_chain(&e);
            if args.json {
                json_error(&error);
            }
            eprintln!("egressguard: {error}");
            Err(Exit::Failure)
        }
    }
}

/// Prints an error as the JSON object scripts read with `--json`:
/// `{"result": "error", "error": "..."}`.
pub(crate) fn json_error(error: &str) {
    outln!(
        "{}",
        serde_json::json!({ "result": "error", "error": error })
    );
}

/// Prints a body as JSON.
pub(crate) fn print_json<T: serde::Serialize>(v: &T) {
    outln!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Writes to stdout; a reader that went away (EPIPE) ends the program with status 0, any
/// other write error with a message and status 3.
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|()| o.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("egressguard: cannot write to stdout: {e}");
        std::process::exit(Exit::Failure as i32);
    }
}

/// Text from the agent that someone else wrote (a reason, a ticket, a peer's error, a user
/// name) with its control characters escaped (`\n`, `\u{1b}`), so it cannot forge lines or
/// drive the terminal.
pub(crate) fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        s.into()
    }
}
