//! An in-memory engine with the same semantics as the RocksDB one, for unit tests and the simulator.
//! Checkpoints are written as one file, through the node's `FileSystem`, so snapshot transfer works
//! unchanged (and, in the simulator, crashes treat them as they treat every other file).

use crate::{EngineError, EngineFactory, EngineResult, ExpiryFilter, Horizon, KvEngine, SharedHorizon, WriteBatch, WriteOp};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tern_core::files::{RealFileSystem, SharedFileSystem};

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

const CHECKPOINT_FILE: &str = "memory-engine.dat";

/// A store's contents as the engine sees them, and as they would survive a power failure.
#[derive(Default)]
struct Slot {
    current: Arc<RwLock<Map>>,
    durable: Arc<Mutex<Map>>,
    horizon: Arc<SharedHorizon>,
}

/// Engines live in the factory keyed by directory, so "reopening" after a simulated restart finds the
/// contents that survived. Writes are durable only after `sync` (or a checkpoint); `crash` forgets the
/// rest, as a power failure would.
#[derive(Default)]
pub struct MemoryEngineFactory {
    stores: Mutex<HashMap<PathBuf, Slot>>,
    expiry: Option<ExpiryFilter>,
    faults: Arc<Faults>,
    files: Option<SharedFileSystem>,
}

/// Injected disk faults, shared by every engine of a factory: each counter says how many of the next
/// operations of its kind fail.
#[derive(Default)]
struct Faults {
    failing_writes: std::sync::atomic::AtomicU32,
    failing_reads: std::sync::atomic::AtomicU32,
    corrupt_reads: std::sync::atomic::AtomicU32,
}

/// Takes one from a fault counter; true if the operation is to fail.
fn take(counter: &std::sync::atomic::AtomicU32) -> bool {
    counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

impl MemoryEngineFactory {
    /// Engines whose checkpoints are files on the real file system.
    pub fn new(expiry: Option<ExpiryFilter>) -> MemoryEngineFactory {
        MemoryEngineFactory { stores: Default::default(), expiry, faults: Default::default(), files: None }
    }

    /// Engines whose checkpoints are files on `files` (a simulated node's file system).
    pub fn with_file_system(expiry: Option<ExpiryFilter>, files: SharedFileSystem) -> MemoryEngineFactory {
        MemoryEngineFactory { files: Some(files), ..MemoryEngineFactory::new(expiry) }
    }

    fn files(&self) -> SharedFileSystem {
        self.files.clone().unwrap_or_else(|| Arc::new(RealFileSystem))
    }

    /// The next `count` write batches (to any store of this factory) fail with an I/O error.
    pub fn fail_writes(&self, count: u32) {
        self.faults.failing_writes.store(count, Ordering::SeqCst);
    }

    /// The next `count` point reads that find a record fail with an I/O error.
    pub fn fail_reads(&self, count: u32) {
        self.faults.failing_reads.store(count, Ordering::SeqCst);
    }

    /// The next `count` point reads that find a record return it with one byte flipped (what a
    /// checksum must catch).
    pub fn corrupt_reads(&self, count: u32) {
        self.faults.corrupt_reads.store(count, Ordering::SeqCst);
    }

    /// Every store loses what was written since its last sync; horizons start again from 0 (the
    /// owner sets them again when it reopens).
    pub fn crash(&self) {
        for slot in self.stores.lock().values() {
            *slot.current.write() = slot.durable.lock().clone();
            slot.horizon.reset();
        }
    }

    /// Runs the expiry filter over every store, as RocksDB's background compactions would at any
    /// moment (the simulator calls it at random times). Like a compaction, what it drops is gone from
    /// the durable contents too.
    pub fn compact_everything(&self) {
        let Some(expired) = self.expiry else { return };
        for slot in self.stores.lock().values() {
            let horizon = slot.horizon.load();
            slot.current.write().retain(|k, v| !expired(k, v, horizon));
            slot.durable.lock().retain(|k, v| !expired(k, v, horizon));
        }
    }
}

impl EngineFactory for MemoryEngineFactory {
    fn open(&self, dir: &Path) -> EngineResult<Box<dyn KvEngine>> {
        let mut stores = self.stores.lock();
        let slot = stores.entry(dir.to_path_buf()).or_default();
        // A checkpoint directory received from a peer is loaded on first open.
        let file = dir.join(CHECKPOINT_FILE);
        let files = self.files();
        if slot.current.read().is_empty() && files.exists(&file) {
            let bytes = files.read(&file).map_err(|e| EngineError::Io(e.to_string()))?;
            let map = decode(&bytes)?;
            *slot.durable.lock() = map.clone();
            *slot.current.write() = map;
        }
        Ok(Box::new(MemoryEngine {
            map: slot.current.clone(),
            durable: slot.durable.clone(),
            syncing: Default::default(),
            horizon: slot.horizon.clone(),
            expiry: self.expiry,
            faults: self.faults.clone(),
            files,
        }))
    }

    fn destroy(&self, dir: &Path) -> EngineResult<()> {
        self.stores.lock().remove(dir);
        let files = self.files();
        if files.exists(dir) {
            files.remove_all(dir).map_err(|e| EngineError::Io(e.to_string()))?;
        }
        Ok(())
    }
}

pub struct MemoryEngine {
    map: Arc<RwLock<Map>>,
    durable: Arc<Mutex<Map>>,
    /// What `begin_sync` captured, and how many more times `sync_finished` says no: durable once
    /// it says yes (a crash before loses it). Each sync takes two polls, as a flush spans ticks.
    syncing: Mutex<Option<(Map, u32)>>,
    horizon: Arc<SharedHorizon>,
    expiry: Option<ExpiryFilter>,
    faults: Arc<Faults>,
    files: SharedFileSystem,
}

impl MemoryEngine {
    pub fn new() -> MemoryEngine {
        MemoryEngine {
            map: Default::default(),
            durable: Default::default(),
            syncing: Default::default(),
            horizon: Default::default(),
            expiry: None,
            faults: Default::default(),
            files: Arc::new(RealFileSystem),
        }
    }
}

impl Default for MemoryEngine {
    fn default() -> Self {
        Self::new()
    }
}

fn encode(map: &Map) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in map {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v);
    }
    out
}

fn decode(mut bytes: &[u8]) -> EngineResult<Map> {
    let mut map = Map::new();
    let take = |bytes: &mut &[u8]| -> EngineResult<Vec<u8>> {
        if bytes.len() < 4 {
            return Err(EngineError::Corruption("truncated checkpoint".into()));
        }
        let n = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
        if bytes.len() < 4 + n {
            return Err(EngineError::Corruption("truncated checkpoint".into()));
        }
        let item = bytes[4..4 + n].to_vec();
        *bytes = &bytes[4 + n..];
        Ok(item)
    };
    while !bytes.is_empty() {
        let k = take(&mut bytes)?;
        let v = take(&mut bytes)?;
        map.insert(k, v);
    }
    Ok(map)
}

impl KvEngine for MemoryEngine {
    fn get(&self, key: &[u8]) -> EngineResult<Option<Vec<u8>>> {
        let Some(mut value) = self.map.read().get(key).cloned() else { return Ok(None) };
        if take(&self.faults.failing_reads) {
            return Err(EngineError::Io("injected read error".into()));
        }
        if !value.is_empty() && take(&self.faults.corrupt_reads) {
            let last = value.len() - 1;
            value[last] ^= 0x5a; // injected corruption
        }
        Ok(Some(value))
    }

    fn write(&self, batch: WriteBatch) -> EngineResult<()> {
        if take(&self.faults.failing_writes) {
            return Err(EngineError::Io("injected write error".into()));
        }
        let mut map = self.map.write();
        for op in batch.ops {
            match op {
                WriteOp::Put { key, value } => {
                    map.insert(key, value);
                }
                WriteOp::Delete { key } => {
                    map.remove(&key);
                }
                WriteOp::DeleteRange { start, end } if start < end => {
                    let doomed: Vec<Vec<u8>> =
                        map.range::<[u8], _>((Bound::Included(&start[..]), Bound::Excluded(&end[..]))).map(|(k, _)| k.clone()).collect();
                    for k in doomed {
                        map.remove(&k);
                    }
                }
                WriteOp::DeleteRange { .. } => {} // empty range, as RocksDB treats it
            }
        }
        Ok(())
    }

    fn scan(&self, start: &[u8], end: Option<&[u8]>, visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> EngineResult<()> {
        if end.is_some_and(|e| e <= start) {
            return Ok(()); // empty range (RocksDB yields nothing too)
        }
        let map = self.map.read();
        let upper = match end {
            Some(e) => Bound::Excluded(e),
            None => Bound::Unbounded,
        };
        for (k, v) in map.range::<[u8], _>((Bound::Included(start), upper)) {
            if !visit(k, v) {
                break;
            }
        }
        Ok(())
    }

    fn scan_reverse(&self, start: &[u8], end: &[u8], visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> EngineResult<()> {
        if end <= start {
            return Ok(());
        }
        if take(&self.faults.failing_reads) {
            return Err(EngineError::Io("injected read error".into()));
        }
        let map = self.map.read();
        for (k, v) in map.range::<[u8], _>((Bound::Included(start), Bound::Excluded(end))).rev() {
            if !visit(k, v) {
                break;
            }
        }
        Ok(())
    }

    fn sync(&self) -> EngineResult<()> {
        *self.durable.lock() = self.map.read().clone();
        Ok(())
    }

    fn begin_sync(&self) -> EngineResult<bool> {
        *self.syncing.lock() = Some((self.map.read().clone(), 1));
        Ok(true)
    }

    fn sync_finished(&self) -> EngineResult<bool> {
        let mut syncing = self.syncing.lock();
        match syncing.take() {
            Some((map, 0)) => *self.durable.lock() = map,
            Some((map, polls)) => {
                *syncing = Some((map, polls - 1));
                return Ok(false);
            }
            None => {}
        }
        Ok(true)
    }

    /// A durable checkpoint, as RocksDB's: the file synced, and its directory.
    fn checkpoint(&self, dir: &Path) -> EngineResult<()> {
        let io = |e: std::io::Error| EngineError::Io(e.to_string());
        let file = dir.join(CHECKPOINT_FILE);
        self.files.create_dir_all(dir).map_err(io)?;
        self.files.write(&file, &encode(&self.map.read())).map_err(io)?;
        self.files.sync_file(&file).map_err(io)?;
        self.files.sync_directory(dir).map_err(io)
    }

    fn compact_all(&self) -> EngineResult<()> {
        if let Some(expired) = self.expiry {
            let horizon = self.horizon.load();
            self.map.write().retain(|k, v| !expired(k, v, horizon));
        }
        Ok(())
    }

    fn set_expiry_horizon(&self, horizon: Horizon) {
        self.horizon.raise(horizon);
    }
}
