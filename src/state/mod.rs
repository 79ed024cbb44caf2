//! Durable state in SQLite: offenses, active blocks, evidence, audit trail.
//!
//! Not built yet (issue "Decide and remember").
