//! `egressguard block ADDR --reason TEXT --for DURATION`.

use super::{BlockArgs, Exit, ask, print_json};
use crate::control::Request;

/// Blocks an address by hand.
pub fn run(args: &BlockArgs) -> Exit {
    let req = Request::Block {
        addr: args.addr,
        reason: args.reason.clone(),
        for_secs: args.duration.as_secs().max(1),
        outside_networks: args.outside_networks,
    };
    done(ask(&args.client, req), args.client.json)
}

/// Prints a `Done` reply.
pub(crate) fn done(r: Result<crate::control::protocol::Body, Exit>, json: bool) -> Exit {
    match r {
        Ok(body) => {
            if json {
                print_json(&body);
            } else if let crate::control::protocol::Body::Done { message } = body {
                outln!("{}", super::escape(&message));
            }
            Exit::Ok
        }
        Err(e) => e,
    }
}
