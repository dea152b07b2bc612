//! The meta server: the cluster catalog (nodes, tables, partitions and their replica sets), initial
//! placement, routing tables for clients, and node liveness from heartbeats.
//!
//! Owns: `catalog` (pure state and decisions: register, create/drop table, placement, assignments; no
//! I/O, no clock — time is passed in) and `service` (gRPC, persistence of the catalog, heartbeats).
//! Must not depend on tern-raft, tern-server or tern-client. Today the catalog is persisted by one meta
//! node to a file; making it a raft group belongs in a later change and should reuse tern-raft.

pub mod catalog;
pub mod service;

pub use service::{MetaConfig, MetaNode};
