//! `egressguard breaker reset [NETWORK]`: re-arm tripped circuit breakers by hand.

use super::{BreakerResetArgs, Exit, ask, print_json};
use crate::control::Request;
use crate::control::protocol::Body;

/// Asks the agent to re-arm the breaker of one network entry, or of every entry.
pub fn reset(args: &BreakerResetArgs) -> Exit {
    let req = Request::BreakerReset {
        network: args.network.clone(),
    };
    match ask(&args.client, req) {
        Ok(body) => {
            if args.client.json {
                print_json(&body);
            } else if let Body::BreakerReset { message, .. } = body {
                outln!("{}", super::escape(&message));
            }
            Exit::Ok
        }
        Err(e) => e,
    }
}
