//! State-machine storage for one replica.
//!
//! Owns: the `KvEngine` trait (point reads, ordered scans, atomic write batches, checkpoints for
//! snapshots), the RocksDB implementation used in production, an in-memory implementation for tests and
//! the simulator, and a conformance suite both must pass (`conformance`).
//!
//! Must not depend on raft, networking or any Tern crate but tern-core. The key layout (what the bytes
//! mean) belongs to tern-raft; this crate only stores bytes.

mod memory;
mod rocks;

pub mod conformance;

pub use memory::{MemoryEngine, MemoryEngineFactory};
pub use rocks::{RocksEngine, RocksEngineFactory, RocksSharedResources};

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("storage engine I/O error: {0}")]
    Io(String),
    #[error("storage engine corruption: {0}")]
    Corruption(String),
}

pub type EngineResult<T> = Result<T, EngineError>;

/// One operation in an atomic batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    /// Deletes every key in [start, end).
    DeleteRange {
        start: Vec<u8>,
        end: Vec<u8>,
    },
}

/// An atomic group of writes: all or nothing, visible together.
#[derive(Clone, Debug, Default)]
pub struct WriteBatch {
    pub ops: Vec<WriteOp>,
}

impl WriteBatch {
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(WriteOp::Put { key, value });
    }
    pub fn delete(&mut self, key: Vec<u8>) {
        self.ops.push(WriteOp::Delete { key });
    }
    pub fn delete_range(&mut self, start: Vec<u8>, end: Vec<u8>) {
        self.ops.push(WriteOp::DeleteRange { start, end });
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Decides at compaction time whether a stored record may be dropped (TTL expiry). Given the key, the
/// stored value and the engine's horizons (see `set_expiry_horizon`).
pub type ExpiryFilter = fn(key: &[u8], value: &[u8], horizon: Horizon) -> bool;

/// How far compaction may go: records expired by `unix_ms` may be dropped, those that carry a
/// version only if it is below `version`, and `owner` says which records the engine's owner keeps
/// at all (the owner's rules; an engine only passes them on).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Horizon {
    pub unix_ms: u64,
    pub version: u64,
    /// Opaque to the engine, only grows (0: nothing said).
    pub owner: u64,
}

/// A horizon shared with compaction threads; each part only moves forward.
#[derive(Debug, Default)]
pub struct SharedHorizon {
    unix_ms: std::sync::atomic::AtomicU64,
    version: std::sync::atomic::AtomicU64,
    owner: std::sync::atomic::AtomicU64,
}

impl SharedHorizon {
    pub fn load(&self) -> Horizon {
        use std::sync::atomic::Ordering::Acquire;
        Horizon { unix_ms: self.unix_ms.load(Acquire), version: self.version.load(Acquire), owner: self.owner.load(Acquire) }
    }
    pub fn raise(&self, to: Horizon) {
        use std::sync::atomic::Ordering::AcqRel;
        self.unix_ms.fetch_max(to.unix_ms, AcqRel);
        self.version.fetch_max(to.version, AcqRel);
        self.owner.fetch_max(to.owner, AcqRel);
    }
    pub fn reset(&self) {
        use std::sync::atomic::Ordering::Release;
        self.unix_ms.store(0, Release);
        self.version.store(0, Release);
        self.owner.store(0, Release);
    }
}

/// A replica's key-value store.
pub trait KvEngine: Send + Sync {
    fn get(&self, key: &[u8]) -> EngineResult<Option<Vec<u8>>>;
    /// Applies the batch atomically. Durability comes from the raft log, so this need not sync.
    fn write(&self, batch: WriteBatch) -> EngineResult<()>;
    /// Visits keys in [start, end) in order (end None = unbounded) until `visit` returns false.
    fn scan(&self, start: &[u8], end: Option<&[u8]>, visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> EngineResult<()>;
    /// Visits keys in [start, end) from the last down until `visit` returns false.
    fn scan_reverse(&self, start: &[u8], end: &[u8], visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> EngineResult<()>;
    /// Makes every write so far durable (before the raft log below it is discarded).
    fn sync(&self) -> EngineResult<()>;
    /// Starts making every write so far durable, without waiting; `sync_finished` says when it is.
    /// False: the engine cannot start one now (RocksDB while its writes are stopped); try later.
    fn begin_sync(&self) -> EngineResult<bool>;
    /// Whether every write made before the last `begin_sync` is durable now.
    fn sync_finished(&self) -> EngineResult<bool>;
    /// Writes a consistent copy of the whole store into `dir` (which must not exist).
    fn checkpoint(&self, dir: &Path) -> EngineResult<()>;
    /// Runs a full compaction (drops records expired by the horizon now); mainly for tests and operators.
    fn compact_all(&self) -> EngineResult<()>;
    /// How far compaction may expire records: the expiry filter is asked about this horizon, never
    /// the machine's clock (the owner's state machine decides what time it is; it starts at 0:
    /// nothing expires). Neither part moves backwards.
    fn set_expiry_horizon(&self, horizon: Horizon);
}

/// Opens, destroys and restores engines in directories; one factory per server, sharing its resources
/// (block cache, write buffer budget) among all replicas.
pub trait EngineFactory: Send + Sync {
    fn open(&self, dir: &Path) -> EngineResult<Box<dyn KvEngine>>;
    fn destroy(&self, dir: &Path) -> EngineResult<()>;
}
