//! The spoofed-source conntrack storm (and the agent CPU measurement), in a test binary of
//! their own: `cargo test` runs test binaries one after the other, so the storm never shares
//! the 2 cores with another namespace test (what it asserts — a scan detected while millions
//! of events pour in, memory under the cap — would otherwise measure its neighbour).
//! Root-only like `tests/netns/`, with the same rules (`common::require_root`).

#[path = "../netns/common.rs"]
mod common;
#[path = "../../benches/support/ctmsg.rs"]
mod ctmsg;
#[path = "../netns/flowgen.rs"]
mod flowgen;
mod storm;
