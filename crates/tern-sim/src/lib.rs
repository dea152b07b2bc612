//! Deterministic simulation of a Tern cluster, after FoundationDB's and TigerBeetle's simulators.
//!
//! Owns: the simulated world (`world`: virtual time, simulated network, disks and clocks, fault
//! injection, clients driven by tern-client's routing and retry decisions) and the linearizability
//! checker (`checker`). The production code under test is reached only through its seams:
//! `tern_raft::store::{Store, Transport, NodeDisks}`, `tern_raft::log_store::MemoryLogStore`,
//! `tern_engine::MemoryEngineFactory`, `tern_core::files::MemoryFileSystem`, `tern_core::time::Clock`;
//! meta runs as the production `tern_meta::keeper::Keeper` (through `KeeperIo`) on meta nodes whose
//! stores host the catalog group, and a node acts on its answers through
//! `tern_raft::store::reconcile_with_meta`, as servers do. The `tern-sim` binary runs sweeps and
//! replays seeds. `scale` runs meta's real scheduler over a hundred simulated servers and 100,000
//! partitions (servers reduced to what they report). Must not be depended on by production crates (the tern binary's fault tests use the
//! checker as a dev-dependency).

pub mod checker;
pub mod scale;
pub mod world;

pub use world::{run, DiskFault, Election, Fault, SimConfig, SimReport};

/// A sweep fails if the checker could not decide (its search budget ran out) for more than this
/// share of its histories: a checker that gives up often proves nothing.
pub const UNDECIDED_SHARE_MAX: f64 = 0.01;

/// Whether a sweep's undecided histories stay within `UNDECIDED_SHARE_MAX`.
pub fn undecided_within_limit(undecided: usize, histories: usize) -> bool {
    undecided as f64 <= UNDECIDED_SHARE_MAX * histories as f64
}
