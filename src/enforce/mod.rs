//! Enforcement on the router: the nft table, blackhole routes, reconcile loop.
//!
//! Not built yet (issue "Enforce"). Nothing here enforces anything.
