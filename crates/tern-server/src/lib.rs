//! The replica server process: hosts partition replicas (a `tern_raft::store::Store` on its own
//! thread), serves the client KV API and the raft transport over gRPC, streams snapshots, and
//! heartbeats to meta to learn which replicas it should host.
//!
//! Owns: request validation at the service edge (`validate`), the KV service (`service`), the
//! server's half of backup and restore (`backup`), the shippers of cross-cluster duplication
//! (`dup`) and process lifecycle (`node`); the raft transport comes from tern-transport. Must not
//! contain consensus or apply logic: that lives in tern-raft. Must not depend on tern-meta; only
//! `dup` uses tern-client (to reach the remote cluster as any client would).

pub mod backup;
pub mod dup;
pub mod node;
pub mod service;
pub mod validate;

pub use node::{ServerConfig, ServerNode};
