//! Deterministic simulation of a Tern cluster, after FoundationDB's and TigerBeetle's simulators.
//!
//! Owns: the simulated world (`world`: virtual time, simulated network, disks and clocks, fault
//! injection, clients driven by tern-client's routing and retry decisions) and the linearizability
//! checker (`checker`). The production code under test is reached only through its seams:
//! `tern_raft::store::{Store, Transport}`, `tern_raft::log_store::MemoryLogStore`,
//! `tern_engine::MemoryEngineFactory`, `tern_core::time::Clock`. Must not be depended on by production
//! crates.

pub mod checker;
pub mod world;

pub use world::{run, SimConfig, SimReport};
