//! Deterministic simulation of a Tern cluster.
//!
//! Owns: the linearizability checker (`checker`). Must not be depended on by production crates.

pub mod checker;
