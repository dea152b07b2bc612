//! The RocksDB engine: one RocksDB instance per replica, with one block cache and one write-buffer
//! budget shared by every replica of the server.

use crate::{EngineError, EngineFactory, EngineResult, ExpiryFilter, Horizon, KvEngine, SharedHorizon, WriteBatch, WriteOp};
use rocksdb::compaction_filter::Decision;
use rocksdb::{BlockBasedOptions, Cache, Options, WriteBufferManager, WriteOptions, DB};
use std::path::Path;
use std::sync::Arc;

fn io(e: rocksdb::Error) -> EngineError {
    EngineError::Io(e.into_string())
}

/// Hands `visit` each record from where `it` stands, moving it with `step`, until `visit` says stop,
/// the range ends, or the iterator fails (that failure is the answer).
fn visit_each<D: rocksdb::DBAccess>(
    mut it: rocksdb::DBRawIteratorWithThreadMode<'_, D>,
    step: impl Fn(&mut rocksdb::DBRawIteratorWithThreadMode<'_, D>),
    visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
) -> EngineResult<()> {
    while it.valid() {
        let (Some(k), Some(v)) = (it.key(), it.value()) else { break };
        if !visit(k, v) {
            return Ok(());
        }
        step(&mut it);
    }
    it.status().map_err(io)
}

/// Resources shared by every replica on one server.
pub struct RocksSharedResources {
    cache: Cache,
    write_buffers: WriteBufferManager,
}

impl RocksSharedResources {
    pub fn new(block_cache_bytes: usize, write_buffer_bytes: usize) -> RocksSharedResources {
        let cache = Cache::new_lru_cache(block_cache_bytes);
        let write_buffers = WriteBufferManager::new_write_buffer_manager_with_cache(write_buffer_bytes, false, cache.clone());
        RocksSharedResources { cache, write_buffers }
    }
}

pub struct RocksEngineFactory {
    shared: RocksSharedResources,
    expiry: Option<ExpiryFilter>,
}

impl RocksEngineFactory {
    pub fn new(shared: RocksSharedResources, expiry: Option<ExpiryFilter>) -> RocksEngineFactory {
        RocksEngineFactory { shared, expiry }
    }

    fn options(&self, horizon: &Arc<SharedHorizon>) -> Options {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_write_buffer_manager(&self.shared.write_buffers);
        opts.set_write_buffer_size(16 * 1024 * 1024);
        opts.set_max_background_jobs(2);
        opts.set_keep_log_file_num(2);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&self.shared.cache);
        table.set_bloom_filter(10.0, false);
        opts.set_block_based_table_factory(&table);
        if let Some(expired) = self.expiry {
            let horizon = horizon.clone();
            opts.set_compaction_filter(
                "tern-ttl",
                move |_level: u32, key: &[u8], value: &[u8]| {
                    if expired(key, value, horizon.load()) {
                        Decision::Remove
                    } else {
                        Decision::Keep
                    }
                },
            );
        }
        opts
    }
}

impl EngineFactory for RocksEngineFactory {
    fn open(&self, dir: &Path) -> EngineResult<Box<dyn KvEngine>> {
        let horizon = Arc::new(SharedHorizon::default());
        let db = DB::open(&self.options(&horizon), dir).map_err(io)?;
        Ok(Box::new(RocksEngine { db, horizon }))
    }

    fn destroy(&self, dir: &Path) -> EngineResult<()> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| EngineError::Io(format!("remove {}: {e}", dir.display())))?;
        }
        Ok(())
    }
}

pub struct RocksEngine {
    db: DB,
    /// Read by the compaction filter (on RocksDB's background threads).
    horizon: Arc<SharedHorizon>,
}

impl KvEngine for RocksEngine {
    fn get(&self, key: &[u8]) -> EngineResult<Option<Vec<u8>>> {
        self.db.get(key).map_err(io)
    }

    fn write(&self, batch: WriteBatch) -> EngineResult<()> {
        let mut wb = rocksdb::WriteBatch::default();
        for op in batch.ops {
            match op {
                WriteOp::Put { key, value } => wb.put(key, value),
                WriteOp::Delete { key } => wb.delete(key),
                WriteOp::DeleteRange { start, end } if start < end => wb.delete_range(start, end),
                WriteOp::DeleteRange { .. } => {} // empty range: RocksDB would refuse the batch
            }
        }
        // No engine WAL: the raft log already holds every applied entry. What a crash loses since
        // the last flush is applied again from the log, which is never collected past a `sync`.
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(wb, &wo).map_err(io)
    }

    fn scan(&self, start: &[u8], end: Option<&[u8]>, visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> EngineResult<()> {
        let mut ro = rocksdb::ReadOptions::default();
        if let Some(end) = end {
            ro.set_iterate_upper_bound(end.to_vec());
        }
        let mut it = self.db.raw_iterator_opt(ro);
        it.seek(start);
        visit_each(it, |it| it.next(), visit)
    }

    fn scan_reverse(&self, start: &[u8], end: &[u8], visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> EngineResult<()> {
        if end <= start {
            return Ok(());
        }
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_lower_bound(start.to_vec());
        ro.set_iterate_upper_bound(end.to_vec());
        let mut it = self.db.raw_iterator_opt(ro);
        it.seek_to_last();
        visit_each(it, |it| it.prev(), visit)
    }

    fn sync(&self) -> EngineResult<()> {
        // Without a WAL, durable means flushed into table files.
        self.db.flush().map_err(io)
    }

    fn begin_sync(&self) -> EngineResult<bool> {
        // Switches the memtable now (everything written so far goes into the flush) and leaves
        // the flush to RocksDB's background threads. While writes are stopped (compaction behind),
        // RocksDB refuses a flush it would have to wait for: not an error, just not now.
        let mut o = rocksdb::FlushOptions::default();
        o.set_wait(false);
        match self.db.flush_opt(&o) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == rocksdb::ErrorKind::TryAgain => Ok(false),
            Err(e) => Err(io(e)),
        }
    }

    fn sync_finished(&self) -> EngineResult<bool> {
        let property = |name: &str| self.db.property_int_value(name).map_err(io);
        if property("rocksdb.background-errors")?.unwrap_or(0) > 0 {
            return Err(EngineError::Io("a background flush or compaction failed".into()));
        }
        // Flushed when no immutable memtable waits (also those of flushes RocksDB started itself).
        Ok(property("rocksdb.num-immutable-mem-table")? == Some(0))
    }

    fn checkpoint(&self, dir: &Path) -> EngineResult<()> {
        let cp = rocksdb::checkpoint::Checkpoint::new(&self.db).map_err(io)?;
        cp.create_checkpoint(dir).map_err(io)
    }

    fn compact_all(&self) -> EngineResult<()> {
        self.db.compact_range::<&[u8], &[u8]>(None, None);
        Ok(())
    }

    fn set_expiry_horizon(&self, horizon: Horizon) {
        self.horizon.raise(horizon);
    }
}
