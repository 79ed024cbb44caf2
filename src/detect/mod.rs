//! Detection: per-source sliding windows, one detector per abuse category, evidence.
//!
//! Not built yet (issue "Detect"). Nothing here detects anything.
