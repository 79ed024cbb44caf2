//! Root-only end-to-end tests in network namespaces.
//!
//! Every test starts with [`common::require_root`]: in CI (`CI` set) a missing privilege is
//! a failure, never a silent pass; elsewhere the test says loudly that it skipped.
//! Each test builds its own namespaces (names carry the test process id) and tears them down
//! on drop, also when it fails.

mod abuse;
mod benign;
mod bgp;
mod bgp_agent;
mod bird;
mod blindspots;
mod blindspots_auth;
mod common;
mod control;
#[path = "../../benches/support/ctmsg.rs"]
mod ctmsg;
mod demo;
mod enforce;
mod faults;
mod floods;
mod flowgen;
mod hostile;
mod observe;
mod scenarios;
mod topology;
