//! The daemon. Not built yet.
