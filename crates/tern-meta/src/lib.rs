//! The meta server: the cluster catalog (nodes, tables, partitions and their replica sets), initial
//! placement, routing tables for clients, and node liveness from heartbeats.
//!
//! Owns: `catalog` (pure state and decisions: register, create/drop table, placement, assignments,
//! the scheduler; no I/O, no clock), `records` (the catalog as records in meta's raft group, with
//! versioned conditional writes; pure), `keeper` (what a meta node decides about the catalog it
//! keeps: following leadership, reload and barrier, conditional changes, heartbeats (only what
//! changed, through `tern_raft::meta_link`), liveness, scheduling passes, routing answers with only
//! the partitions changed since the caller's version; all I/O through `KeeperIo`, so the simulator runs it too) and `service` (the
//! keeper's runtime: gRPC, the catalog's raft group of 1, 3 or 5 meta nodes on tern-raft's store,
//! the loops); `split` (online partition split: meta's resumable state machine, pure).
//! Must not depend on tern-server or tern-client.

pub mod catalog;
pub mod keeper;
pub mod records;
pub mod service;
pub mod split;

pub use service::{MetaConfig, MetaNode};
