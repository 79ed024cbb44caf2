//! Decisions: escalation ladder, reconnect authorisations, allowlists, circuit breaker.
//!
//! Not built yet (issue "Decide and remember"). Nothing here decides anything.
