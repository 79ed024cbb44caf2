//! `egressguard unblock ADDR --ticket T`.

use super::{Exit, UnblockArgs, ask};
use crate::control::Request;

/// Lifts a block by hand.
pub fn run(args: &UnblockArgs) -> Exit {
    let req = Request::Unblock {
        addr: args.addr,
        ticket: args.ticket.clone(),
    };
    super::block::done(ask(&args.client, req), args.client.json)
}
