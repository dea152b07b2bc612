//! Partition replicas and the per-node store that drives them.
//!
//! Owns: the raft-rs glue (`replica`: RawNode, Ready handling in raft-rs's documented order, proposals,
//! ReadIndex reads, snapshots, log compaction, hibernation of idle groups, partition split: the
//! split entry and the child's checkpoint), raft log storage (`log_store`: the `LogStore` trait,
//! raft-engine and in-memory implementations, `PeerStorage`), who makes log writes durable and when
//! (`log_writer`: at once, or on a thread of its own), the deterministic state machine
//! (`apply`, `read`, `keys`), snapshot manifests and their checks (`snapshot`), and the store (`store`:
//! mailbox, rounds, group commit, `Transport` trait, replica lifecycle: crash-safe destroy, reopening
//! replicas stopped by storage failures, the bound on open engines), and both sides of the
//! heartbeat exchange with meta that sends only what changed (`meta_link`).
//!
//! Must not depend on tonic, tokio or any network code: the world is reached through `Transport`,
//! `LogStore`, `tern_engine::EngineFactory`, `tern_core::files::FileSystem` (every file: replica
//! metadata, snapshots, tombstones; the store and replicas never use `std::fs`) and `tern_core::time::Clock`, so the simulator
//! can drive the same code. New request types go in `apply`/`read`; new replica events in `replica` + `store`.

// raft-rs's protobuf types are built field by field in the style of its own examples.
#![allow(clippy::field_reassign_with_default)]

pub mod apply;
pub mod keys;
pub mod log_store;
pub mod log_writer;
pub mod meta_link;
pub mod raft_log;
pub mod read;
pub mod redis;
pub mod replica;
pub mod snapshot;
pub mod store;
