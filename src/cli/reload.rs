//! `egressguard reload`: like SIGHUP, but waits for the outcome and prints it.

use super::{ClientArgs, Exit, ask};
use crate::control::Request;

/// Asks the agent to re-read its policy. A refused policy exits 1 with every error.
pub fn run(args: &ClientArgs) -> Exit {
    match super::block::done(ask(args, Request::Reload), args.json) {
        Exit::Refused => Exit::InvalidPolicy,
        other => other,
    }
}
