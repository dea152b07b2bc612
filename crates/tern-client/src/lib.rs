//! The Tern client: fetches a table's routing table from meta, hashes each hashkey to its partition,
//! sends to the partition's leader, follows NotLeader hints, refreshes stale routes, and retries
//! retryable failures with exponential backoff and jitter inside a caller-given deadline.
//! Every write carries (client id, sequence) so that a retry, or a late duplicate of a request, is
//! applied at most once.
//!
//! Owns: `retry` (the pure backoff policy), `routing` (pure leader tracking, retry decisions,
//! where a hashkey goes while its table splits, and merging a routing refresh that lists only what
//! changed; shared with the simulator), `client` (connections, routing, the request loop) and the
//! typed operations on `Table`, `batch` (one multiplexed request stream per server), `backup` (the
//! coordinator of table backups and restores; the servers copy the data), `dup` (administering
//! cross-cluster duplication; the servers ship). Must not depend on tern-raft, tern-server or tern-meta: it speaks only
//! the wire protocol in tern-proto.

pub mod backup;
mod batch;
mod client;
pub mod dup;
pub mod retry;
pub mod routing;

pub use client::{CasResult, Client, ClientConfig, FullScanCursor, ScanOptions, Table};
pub use tern_core::TernError;
pub use tern_proto::Record;
