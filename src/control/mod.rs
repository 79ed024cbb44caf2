//! Control socket: the daemon's side (server) and the CLI's side (client).
//!
//! Not built yet (issue "Decide and remember").
