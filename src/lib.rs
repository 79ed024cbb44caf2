//! egressguard: cuts compromised customer servers off the network.
//!
//! The library holds every stage of the agent; `main.rs` only parses the command line and
//! calls in here. The data flow (see README's architecture section):
//!
//! ```text
//! observe ──Observation──▶ detect ──Detection──▶ decide ──desired blocks──▶ enforce (nft, routes, BGP)
//! ```
//!
//! Every message between stages lives in [`messages`] and derives `Serialize`, so a stream
//! can be recorded and replayed through the pure stages in tests.

pub mod accept;
pub mod antispoof;
pub mod bgp;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod decide;
pub mod demo;
pub mod detect;
pub mod enforce;
pub mod logging;
pub mod messages;
pub mod meter;
pub mod metrics;
pub mod netns;
pub mod notify;
pub mod observe;
pub mod policy;
pub mod state;
pub mod time;
