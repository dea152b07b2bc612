//! Tern's shared vocabulary: identifiers, size limits, the on-disk key codec, the partition hash, the
//! value header (TTL + checksum), the error type, the clock and randomness interfaces, and the file
//! system interface (`files`: real, and in memory with crash semantics for the simulator), and the
//! layout of cold backups (`backup`: names, manifests, locations and their checks).
//!
//! Owns: everything every other crate agrees on. Must not depend on any other Tern crate, on RocksDB,
//! raft, tonic or tokio. Put new shared types here only when two or more crates need them.

pub mod backup;
pub mod codec;
pub mod error;
pub mod files;
pub mod ids;
pub mod limits;
pub mod time;

pub use error::{ErrorCode, TernError, TernResult};
pub use ids::{GroupId, NodeId, PeerId, TableId};
