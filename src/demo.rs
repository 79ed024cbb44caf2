//! `egressguard demo`. Not built yet.
