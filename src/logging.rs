//! Logging setup: `tracing` to stderr, plain by default (journald adds its own timestamps),
//! JSON on request. The level comes from `EGRESSGUARD_LOG` (same syntax as `RUST_LOG`),
//! default `info`.

use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("EGRESSGUARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Under systemd, journald timestamps every line already.
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match (format, under_journald) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).try_init(),
        (LogFormat::Plain, true) => builder.without_time().with_ansi(false).try_init(),
        (LogFormat::Plain, false) => builder.with_ansi(false).try_init(),
    };
}

/// Renders an error with all its causes on one line, `a: b: c`, for logs, `status` and the
/// CLI.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_chain_renders_every_cause() {
        let inner = std::io::Error::other("connection refused");
        let outer = std::io::Error::other(crate::observe::ObserveError::Socket(inner));
        assert_eq!(
            super::error_chain(&crate::observe::ObserveError::Receive(outer)),
            "cannot read from the ctnetlink socket: cannot open the ctnetlink socket: connection refused"
        );
    }
}
