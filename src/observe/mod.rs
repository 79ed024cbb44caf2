//! Observation: conntrack events over ctnetlink and per-address nft counters.
//!
//! Not built yet (issue "Observe").
