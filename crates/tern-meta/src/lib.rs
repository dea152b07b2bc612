//! The meta server: the cluster catalog (nodes, tables, partitions and their replica sets), initial
//! placement, routing tables for clients, and node liveness from heartbeats.
//!
//! Owns: `catalog` (pure state and decisions: register, create/drop table, placement, assignments,
//! the scheduler; no I/O, no clock), `records` (the catalog as records in meta's raft group, with
//! versioned conditional writes; pure) and `service` (gRPC, the catalog replicated through a raft group
//! of 1, 3 or 5 meta nodes on tern-raft's store, heartbeats, the scheduling loop).
//! Must not depend on tern-server or tern-client.

pub mod catalog;
pub mod records;
pub mod service;

pub use service::{MetaConfig, MetaNode};
