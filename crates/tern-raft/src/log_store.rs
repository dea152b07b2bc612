//! Raft log storage: the `LogStore` interface (one instance per node, shared by all its replicas),
//! its raft-engine implementation, an in-memory one, and `PeerStorage`, the raft-rs `Storage` view of
//! one group's log.
//!
//! Writes are collected into a `LogWriteBatch` by every replica in a store round and written with one
//! synced write: group commit across partitions.

use parking_lot::Mutex;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use raft_engine::{Command, Config as RaftEngineConfig, Engine, LogBatch, MessageExt};
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use tern_core::TernError;

/// One change to one group's log.
#[derive(Clone, Debug)]
pub enum LogOp {
    Append(Vec<Entry>),
    HardState(HardState),
    /// Everything up to and including `index` (of `term`) is covered by the state machine.
    Truncated {
        index: u64,
        term: u64,
    },
    /// Deletes entries with an index below this one.
    CompactBelow(u64),
    /// Deletes the group's whole log and state.
    Clean,
}

#[derive(Default, Debug, Clone)]
pub struct LogWriteBatch {
    pub ops: Vec<(u64, LogOp)>,
}

impl LogWriteBatch {
    pub fn push(&mut self, group: u64, op: LogOp) {
        self.ops.push((group, op));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

pub trait LogStore: Send + Sync {
    /// Applies the batch in order; with `sync`, it is durable when this returns.
    fn write(&self, batch: LogWriteBatch, sync: bool) -> Result<(), TernError>;
    /// Entries in [low, high), at most `max_bytes` of them but at least one.
    fn entries(&self, group: u64, low: u64, high: u64, max_bytes: Option<u64>) -> Result<Vec<Entry>, TernError>;
    fn entry(&self, group: u64, index: u64) -> Result<Option<Entry>, TernError>;
    fn last_index(&self, group: u64) -> Option<u64>;
    /// The group's first entry, if it has any.
    fn first_index(&self, group: u64) -> Option<u64>;
    fn hard_state(&self, group: u64) -> Result<Option<HardState>, TernError>;
    fn truncated(&self, group: u64) -> Result<Option<(u64, u64)>, TernError>;
    /// Groups that have any state in the log.
    fn groups(&self) -> Vec<u64>;
    /// Reclaims space of files that hold only deleted entries.
    fn purge(&self) -> Result<(), TernError>;
}

const HARD_STATE_KEY: &[u8] = b"hs";
const TRUNCATED_KEY: &[u8] = b"tr";

#[derive(Clone)]
struct EntryExt;
impl MessageExt for EntryExt {
    type Entry = Entry;
    fn index(e: &Entry) -> u64 {
        e.index
    }
}

fn log_error(e: raft_engine::Error) -> TernError {
    TernError::Internal(format!("raft log: {e}"))
}

/// The production log store: raft-engine.
pub struct RaftEngineLogStore {
    engine: Engine,
}

impl RaftEngineLogStore {
    pub fn open(dir: &std::path::Path) -> Result<RaftEngineLogStore, TernError> {
        Self::open_sized(dir, 64 << 20, 256 << 20)
    }

    /// `open` with raft-engine's file size and purge threshold given (tests use tiny ones).
    fn open_sized(dir: &std::path::Path, file_bytes: u64, purge_threshold_bytes: u64) -> Result<RaftEngineLogStore, TernError> {
        let cfg = RaftEngineConfig {
            dir: dir.to_string_lossy().into_owned(),
            target_file_size: raft_engine::ReadableSize(file_bytes),
            purge_threshold: raft_engine::ReadableSize(purge_threshold_bytes),
            ..Default::default()
        };
        let engine = Engine::open(cfg).map_err(log_error)?;
        Ok(RaftEngineLogStore { engine })
    }
}

impl LogStore for RaftEngineLogStore {
    fn write(&self, batch: LogWriteBatch, sync: bool) -> Result<(), TernError> {
        let mut lb = LogBatch::default();
        for (group, op) in batch.ops {
            match op {
                LogOp::Append(entries) => lb.add_entries::<EntryExt>(group, &entries).map_err(log_error)?,
                LogOp::HardState(hs) => lb.put_message(group, HARD_STATE_KEY.to_vec(), &hs).map_err(log_error)?,
                LogOp::Truncated { index, term } => {
                    let mut v = index.to_be_bytes().to_vec();
                    v.extend_from_slice(&term.to_be_bytes());
                    lb.put(group, TRUNCATED_KEY.to_vec(), v).map_err(log_error)?;
                }
                LogOp::CompactBelow(index) => lb.add_command(group, Command::Compact { index }),
                LogOp::Clean => lb.add_command(group, Command::Clean),
            }
        }
        if lb.is_empty() {
            return Ok(());
        }
        self.engine.write(&mut lb, sync).map_err(log_error)?;
        Ok(())
    }

    fn entries(&self, group: u64, low: u64, high: u64, max_bytes: Option<u64>) -> Result<Vec<Entry>, TernError> {
        let mut out = Vec::with_capacity((high - low) as usize);
        self.engine.fetch_entries_to::<EntryExt>(group, low, high, max_bytes.map(|b| b as usize), &mut out).map_err(log_error)?;
        Ok(out)
    }

    fn entry(&self, group: u64, index: u64) -> Result<Option<Entry>, TernError> {
        self.engine.get_entry::<EntryExt>(group, index).map_err(log_error)
    }

    fn last_index(&self, group: u64) -> Option<u64> {
        self.engine.last_index(group)
    }

    fn first_index(&self, group: u64) -> Option<u64> {
        self.engine.first_index(group)
    }

    fn hard_state(&self, group: u64) -> Result<Option<HardState>, TernError> {
        self.engine.get_message::<HardState>(group, HARD_STATE_KEY).map_err(log_error)
    }

    fn truncated(&self, group: u64) -> Result<Option<(u64, u64)>, TernError> {
        Ok(self.engine.get(group, TRUNCATED_KEY).and_then(|v| {
            (v.len() == 16).then(|| (u64::from_be_bytes(v[..8].try_into().expect("8")), u64::from_be_bytes(v[8..].try_into().expect("8"))))
        }))
    }

    fn groups(&self) -> Vec<u64> {
        self.engine.raft_groups()
    }

    fn purge(&self) -> Result<(), TernError> {
        self.engine.purge_expired_files().map_err(log_error)?;
        Ok(())
    }
}

/// Removes, before anyone appends, entries a log store brought back at recovery from at or below a
/// group's truncated index. raft-engine does this: a purge rewrites a group's entries that are still
/// live, a later compaction removes them, and once the file holding that compaction is purged too,
/// recovery finds the rewritten copies again (when the group had no newer entries, as an idle group
/// whose log was compacted whole). Raft never reads there, but its next append would leave a hole
/// after them, which raft-engine refuses (it panics). Called by `Store::open` on every log store.
pub fn drop_entries_below_truncated(log: &dyn LogStore) -> Result<(), TernError> {
    let mut batch = LogWriteBatch::default();
    for group in log.groups() {
        let (Some(first), Some((truncated, _))) = (log.first_index(group), log.truncated(group)?) else { continue };
        if first <= truncated {
            tracing::info!(group, first, truncated, "raft log: compacting entries recovered from at or below the truncated index");
            batch.push(group, LogOp::CompactBelow(truncated + 1));
        }
    }
    if batch.is_empty() {
        return Ok(());
    }
    log.write(batch, true)
}

#[derive(Default, Clone)]
struct MemGroup {
    entries: BTreeMap<u64, Entry>,
    hard_state: Option<HardState>,
    truncated: Option<(u64, u64)>,
}

/// An in-memory log store for tests and the simulator. It models a disk: writes without `sync` are
/// visible but lost by `crash()` until a later synced write makes them durable, and writes can be
/// made to fail. It also models two things raft-engine does: an append that would leave a hole
/// after a group's last entry is refused, and recovery may bring back the entries a group compacted
/// away last when it has none left (see `drop_entries_below_truncated`).
#[derive(Default)]
pub struct MemoryLogStore {
    groups: Mutex<HashMap<u64, MemGroup>>,
    durable: Mutex<HashMap<u64, MemGroup>>,
    /// Per group, the entries its first durable compaction (since it was last cleaned) removed: what
    /// a crash may bring back, as raft-engine brings back entries a purge rewrote long before.
    compacted: Mutex<HashMap<u64, BTreeMap<u64, Entry>>>,
    unsynced: Mutex<Vec<LogWriteBatch>>,
    failing_writes: std::sync::atomic::AtomicU32,
    failing_reads: std::sync::atomic::AtomicU32,
}

fn apply_log_batch(groups: &mut HashMap<u64, MemGroup>, batch: LogWriteBatch) {
    for (group, op) in batch.ops {
        let g = groups.entry(group).or_default();
        match op {
            LogOp::Append(entries) => {
                if let Some(first) = entries.first() {
                    let _ = g.entries.split_off(&first.index);
                }
                for e in entries {
                    g.entries.insert(e.index, e);
                }
            }
            LogOp::HardState(hs) => g.hard_state = Some(hs),
            LogOp::Truncated { index, term } => g.truncated = Some((index, term)),
            LogOp::CompactBelow(index) => g.entries = g.entries.split_off(&index),
            LogOp::Clean => *g = MemGroup::default(),
        }
    }
}

impl MemoryLogStore {
    /// Loses every write not yet covered by a synced write, as a power failure would.
    pub fn crash(&self) {
        self.unsynced.lock().clear();
        let mut durable = self.durable.lock();
        for (group, entries) in self.compacted.lock().drain() {
            if let Some(g) = durable.get_mut(&group) {
                if g.entries.is_empty() {
                    g.entries = entries;
                }
            }
        }
        *self.groups.lock() = durable.clone();
    }

    /// The next `count` writes fail with an I/O error.
    pub fn fail_writes(&self, count: u32) {
        self.failing_writes.store(count, std::sync::atomic::Ordering::SeqCst);
    }

    /// The next `count` entry reads fail with an I/O error.
    pub fn fail_reads(&self, count: u32) {
        self.failing_reads.store(count, std::sync::atomic::Ordering::SeqCst);
    }

    /// Reads an entry without fault injection (for the simulator's invariant checks).
    pub fn peek_entry(&self, group: u64, index: u64) -> Option<Entry> {
        self.groups.lock().get(&group).and_then(|g| g.entries.get(&index).cloned())
    }

    fn injected_read_error(&self) -> Result<(), TernError> {
        use std::sync::atomic::Ordering;
        if self.failing_reads.load(Ordering::SeqCst) > 0 {
            self.failing_reads.fetch_sub(1, Ordering::SeqCst);
            return Err(TernError::Internal("raft log: injected read error".into()));
        }
        Ok(())
    }
}

impl LogStore for MemoryLogStore {
    fn write(&self, batch: LogWriteBatch, sync: bool) -> Result<(), TernError> {
        use std::sync::atomic::Ordering;
        if self.failing_writes.load(Ordering::SeqCst) > 0 {
            self.failing_writes.fetch_sub(1, Ordering::SeqCst);
            return Err(TernError::Internal("raft log: injected write error".into()));
        }
        {
            // Each group's last entry as the batch's operations go, in order.
            let groups = self.groups.lock();
            let mut last: HashMap<u64, Option<u64>> = HashMap::new();
            for (group, op) in &batch.ops {
                let l = last.entry(*group).or_insert_with(|| groups.get(group).and_then(|g| g.entries.keys().next_back().copied()));
                match op {
                    LogOp::Append(entries) => {
                        if let (Some(first), Some(prev)) = (entries.first(), *l) {
                            if first.index > prev + 1 {
                                return Err(TernError::Internal(format!("raft log: group {group} would have a hole after entry {prev}")));
                            }
                        }
                        if let Some(e) = entries.last() {
                            *l = Some(e.index);
                        }
                    }
                    LogOp::CompactBelow(below) if l.is_some_and(|prev| prev < *below) => *l = None,
                    LogOp::Clean => *l = None,
                    _ => {}
                }
            }
        }
        apply_log_batch(&mut self.groups.lock(), batch.clone());
        let mut unsynced = self.unsynced.lock();
        unsynced.push(batch);
        if sync {
            let mut durable = self.durable.lock();
            let mut compacted = self.compacted.lock();
            for b in unsynced.drain(..) {
                for (group, op) in &b.ops {
                    if let (LogOp::CompactBelow(below), Some(g)) = (op, durable.get(group)) {
                        let removed: BTreeMap<u64, Entry> = g.entries.range(..*below).map(|(i, e)| (*i, e.clone())).collect();
                        if !removed.is_empty() {
                            compacted.entry(*group).or_insert(removed);
                        }
                    }
                    if matches!(op, LogOp::Clean) {
                        compacted.remove(group);
                    }
                }
                apply_log_batch(&mut durable, b);
            }
        }
        Ok(())
    }

    fn entries(&self, group: u64, low: u64, high: u64, max_bytes: Option<u64>) -> Result<Vec<Entry>, TernError> {
        self.injected_read_error()?;
        if high <= low {
            return Ok(Vec::new());
        }
        // As raft-engine: the whole range must be there (a missing entry is an error, not a short
        // answer), then the answer is cut to the size limit.
        let groups = self.groups.lock();
        let mut out: Vec<Entry> = groups.get(&group).map(|g| g.entries.range(low..high).map(|(_, e)| e.clone()).collect()).unwrap_or_default();
        if out.len() as u64 != high - low {
            return Err(TernError::Internal(format!("raft log: Entry Not Found (group {group}, entries {low}..{high})")));
        }
        raft::util::limit_size(&mut out, max_bytes);
        Ok(out)
    }

    fn entry(&self, group: u64, index: u64) -> Result<Option<Entry>, TernError> {
        self.injected_read_error()?;
        Ok(self.groups.lock().get(&group).and_then(|g| g.entries.get(&index).cloned()))
    }

    fn last_index(&self, group: u64) -> Option<u64> {
        self.groups.lock().get(&group).and_then(|g| g.entries.keys().next_back().copied())
    }

    fn first_index(&self, group: u64) -> Option<u64> {
        self.groups.lock().get(&group).and_then(|g| g.entries.keys().next().copied())
    }

    fn hard_state(&self, group: u64) -> Result<Option<HardState>, TernError> {
        Ok(self.groups.lock().get(&group).and_then(|g| g.hard_state.clone()))
    }

    fn truncated(&self, group: u64) -> Result<Option<(u64, u64)>, TernError> {
        Ok(self.groups.lock().get(&group).and_then(|g| g.truncated))
    }

    fn groups(&self) -> Vec<u64> {
        self.groups.lock().keys().copied().collect()
    }

    fn purge(&self) -> Result<(), TernError> {
        Ok(())
    }
}

/// Recently appended entries, so that sending appends to followers and term look-ups rarely read the
/// log files. Bounded by count and bytes.
#[derive(Default)]
struct EntryCache {
    entries: VecDeque<Entry>,
    bytes: usize,
    /// Entries above this index may not be in the log store yet (their write is still in flight):
    /// never evicted, or raft would ask the log store for entries it does not have.
    durable: u64,
}

const ENTRY_CACHE_COUNT_MAX: usize = 4096;
const ENTRY_CACHE_BYTES_MAX: usize = 16 * 1024 * 1024;

impl EntryCache {
    fn append(&mut self, new: &[Entry]) {
        let Some(first) = new.first() else { return };
        // Entries from `first` on replace what the log store holds at those indexes (a conflicting
        // append): they are not durable until their own write lands, whatever was before.
        self.durable = self.durable.min(first.index - 1);
        while self.entries.back().is_some_and(|e| e.index >= first.index) {
            let e = self.entries.pop_back().expect("back exists");
            self.bytes -= e.data.len();
        }
        if self.entries.back().is_some_and(|e| e.index + 1 != first.index) {
            self.entries.clear();
            self.bytes = 0;
        }
        for e in new {
            self.bytes += e.data.len();
            self.entries.push_back(e.clone());
        }
        self.evict();
    }

    /// Drops the oldest durable entries while the cache is over its bounds.
    fn evict(&mut self) {
        while (self.entries.len() > ENTRY_CACHE_COUNT_MAX || (self.bytes > ENTRY_CACHE_BYTES_MAX && self.entries.len() > 1))
            && self.entries.front().is_some_and(|e| e.index <= self.durable)
        {
            let e = self.entries.pop_front().expect("front exists");
            self.bytes -= e.data.len();
        }
    }

    fn set_durable(&mut self, index: u64) {
        self.durable = index;
        self.evict();
    }

    fn compact_below(&mut self, index: u64) {
        while self.entries.front().is_some_and(|e| e.index < index) {
            let e = self.entries.pop_front().expect("front exists");
            self.bytes -= e.data.len();
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.index)
    }

    fn get(&self, index: u64) -> Option<&Entry> {
        let first = self.first_index()?;
        if index < first {
            return None;
        }
        self.entries.get((index - first) as usize)
    }
}

/// raft-rs's view of one group's persisted log. Mutated only by its replica, inside the store round.
pub struct PeerStorage {
    group: u64,
    log: Arc<dyn LogStore>,
    hard_state: HardState,
    conf_state: ConfState,
    truncated: (u64, u64),
    last_index: u64,
    cache: EntryCache,
    /// The latest snapshot generated from the state machine (metadata only; data names it).
    generated_snapshot: Option<Snapshot>,
    /// Set when raft asked for a snapshot we do not have yet; the replica generates one.
    snapshot_wanted: Cell<bool>,
}

impl PeerStorage {
    /// Opens the storage of a group from the log; `conf_state` comes from the state machine's apply
    /// state. A group with no log state starts at `initial` (index, term).
    pub fn open(group: u64, log: Arc<dyn LogStore>, conf_state: ConfState, initial: (u64, u64)) -> Result<PeerStorage, TernError> {
        let hard_state = log.hard_state(group)?.unwrap_or_else(|| {
            let mut hs = HardState::default();
            hs.term = initial.1;
            hs.commit = initial.0;
            hs
        });
        let truncated = log.truncated(group)?.unwrap_or(initial);
        let last_index = log.last_index(group).unwrap_or(truncated.0).max(truncated.0);
        Ok(PeerStorage {
            group,
            log,
            hard_state,
            conf_state,
            truncated,
            last_index,
            cache: EntryCache { durable: last_index, ..Default::default() },
            generated_snapshot: None,
            snapshot_wanted: Cell::new(false),
        })
    }

    /// Records state that must be written for a fresh group so a restart finds it.
    pub fn initial_writes(&self, batch: &mut LogWriteBatch) {
        batch.push(self.group, LogOp::HardState(self.hard_state.clone()));
        batch.push(self.group, LogOp::Truncated { index: self.truncated.0, term: self.truncated.1 });
    }

    pub fn truncated_index(&self) -> u64 {
        self.truncated.0
    }

    pub fn first_log_index(&self) -> u64 {
        self.truncated.0 + 1
    }

    pub fn last_log_index(&self) -> u64 {
        self.last_index
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.conf_state = cs;
    }

    /// Entries up to `index` are in the log store (raft counts them persisted): the cache may let
    /// them go.
    pub fn set_durable(&mut self, index: u64) {
        self.cache.set_durable(index);
    }

    /// Queues new entries (and a changed hard state) for the round's log write.
    pub fn append(&mut self, entries: &[Entry], batch: &mut LogWriteBatch) {
        if let Some(last) = entries.last() {
            assert!(entries[0].index > self.truncated.0, "append below the truncated index");
            self.last_index = last.index;
            self.cache.append(entries);
            batch.push(self.group, LogOp::Append(entries.to_vec()));
        }
    }

    pub fn set_hard_state(&mut self, hs: HardState, batch: &mut LogWriteBatch) {
        self.hard_state = hs.clone();
        batch.push(self.group, LogOp::HardState(hs));
    }

    pub fn set_commit(&mut self, commit: u64, batch: &mut LogWriteBatch) {
        if commit != self.hard_state.commit {
            let mut hs = self.hard_state.clone();
            hs.commit = commit;
            self.set_hard_state(hs, batch);
        }
    }

    /// Discards entries up to and including `index` (which must be applied and synced to the engine).
    pub fn compact_to(&mut self, index: u64, batch: &mut LogWriteBatch) -> Result<(), TernError> {
        if index <= self.truncated.0 {
            return Ok(());
        }
        assert!(index <= self.last_index, "compact beyond the log");
        let term = self.term_of(index)?;
        self.truncated = (index, term);
        self.cache.compact_below(index + 1);
        batch.push(self.group, LogOp::Truncated { index, term });
        batch.push(self.group, LogOp::CompactBelow(index + 1));
        Ok(())
    }

    /// Replaces the log with a received snapshot's position.
    pub fn apply_snapshot(&mut self, snapshot: &Snapshot, batch: &mut LogWriteBatch) {
        let meta = snapshot.get_metadata();
        self.truncated = (meta.index, meta.term);
        self.last_index = meta.index;
        self.conf_state = meta.get_conf_state().clone();
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.cache.clear();
        self.generated_snapshot = None;
        batch.push(self.group, LogOp::Clean);
        batch.push(self.group, LogOp::HardState(self.hard_state.clone()));
        batch.push(self.group, LogOp::Truncated { index: meta.index, term: meta.term });
    }

    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }

    pub fn set_generated_snapshot(&mut self, snapshot: Snapshot) {
        self.generated_snapshot = Some(snapshot);
    }

    pub fn generated_snapshot(&self) -> Option<&Snapshot> {
        self.generated_snapshot.as_ref()
    }

    pub(crate) fn term_of(&self, index: u64) -> Result<u64, TernError> {
        if index == self.truncated.0 {
            return Ok(self.truncated.1);
        }
        if let Some(e) = self.cache.get(index) {
            return Ok(e.term);
        }
        match self.log.entry(self.group, index)? {
            Some(e) => Ok(e.term),
            None => Err(TernError::Internal(format!("group {} has no log entry {index}", self.group))),
        }
    }
}

fn storage_error(e: TernError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

impl raft::Storage for PeerStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState { hard_state: self.hard_state.clone(), conf_state: self.conf_state.clone() })
    }

    fn entries(&self, low: u64, high: u64, max_size: impl Into<Option<u64>>, _ctx: GetEntriesContext) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        if low <= self.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        // The cache holds the log's tail from its first index on, including entries whose write is
        // still in flight; the log store holds everything below it. A range across both is read from
        // both: asking the log store for the cached tail too failed ("Entry Not Found") whenever that
        // tail was not written yet, as when a restarted leader catches up a lagging follower.
        let cache_first = self.cache.first_index().unwrap_or(high).max(low);
        let mut out = Vec::new();
        if low < cache_first {
            let stored_high = high.min(cache_first);
            out = self.log.entries(self.group, low, stored_high, max_size).map_err(storage_error)?;
            if out.is_empty() {
                return Err(raft::Error::Store(StorageError::Unavailable));
            }
            if (out.len() as u64) < stored_high - low {
                return Ok(out); // cut by the size limit
            }
        }
        if cache_first < high {
            let first = self.cache.first_index().expect("cache_first < high: the cache is not empty");
            out.extend(self.cache.entries.range((cache_first - first) as usize..(high - first) as usize).cloned());
        }
        raft::util::limit_size(&mut out, max_size);
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx < self.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        self.term_of(idx).map_err(storage_error)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.truncated.0 + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    /// The generated snapshot, if it is recent enough and its configuration names `to`: raft-rs
    /// refuses a snapshot whose configuration does not contain the receiver, so one generated
    /// before a peer was added would be sent to it, refused, and sent again for as long as the log
    /// is not compacted (found by the simulator: a replica replaced on its own node, the group
    /// idle, never caught up). Otherwise the replica is asked to generate a new one.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        if let Some(s) = &self.generated_snapshot {
            let meta = s.get_metadata();
            if meta.index >= request_index && meta.index >= self.truncated.0 && names(meta.get_conf_state(), to) {
                return Ok(s.clone());
            }
        }
        self.snapshot_wanted.set(true);
        Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
    }
}

/// Whether a raft configuration names a peer (as a voter or learner, incoming or outgoing).
pub fn names(cs: &ConfState, peer: u64) -> bool {
    [&cs.voters, &cs.learners, &cs.voters_outgoing, &cs.learners_next].iter().any(|ids| ids.contains(&peer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.data = vec![index as u8; 10].into();
        e
    }

    fn check_log_store(log: Arc<dyn LogStore>) {
        let mut b = LogWriteBatch::default();
        b.push(1, LogOp::Append((1..=10).map(|i| entry(i, 1)).collect()));
        let mut hs = HardState::default();
        hs.term = 1;
        hs.commit = 5;
        b.push(1, LogOp::HardState(hs.clone()));
        log.write(b, true).unwrap();
        assert_eq!(log.last_index(1), Some(10));
        assert_eq!(log.hard_state(1).unwrap(), Some(hs));
        assert_eq!(log.entries(1, 3, 6, None).unwrap().len(), 3);
        assert!(log.entries(1, 8, 12, None).is_err(), "a range past the last entry is an error, not a short answer");

        // A conflicting append replaces the tail.
        let mut b = LogWriteBatch::default();
        b.push(1, LogOp::Append(vec![entry(8, 2)]));
        log.write(b, true).unwrap();
        assert_eq!(log.last_index(1), Some(8));
        assert_eq!(log.entry(1, 8).unwrap().unwrap().term, 2);

        let mut b = LogWriteBatch::default();
        b.push(1, LogOp::CompactBelow(5));
        b.push(1, LogOp::Truncated { index: 4, term: 1 });
        log.write(b, true).unwrap();
        assert!(log.entry(1, 4).unwrap().is_none());
        assert!(log.entry(1, 5).unwrap().is_some());
        assert_eq!(log.truncated(1).unwrap(), Some((4, 1)));

        let mut b = LogWriteBatch::default();
        b.push(1, LogOp::Clean);
        log.write(b, true).unwrap();
        assert_eq!(log.last_index(1), None);
    }

    /// Both log stores append, overwrite conflicting tails, compact and clean the same way.
    #[test]
    fn log_store_conformance() {
        check_log_store(Arc::new(MemoryLogStore::default()));
        let dir = tempfile::tempdir().unwrap();
        check_log_store(Arc::new(RaftEngineLogStore::open(dir.path()).unwrap()));
    }

    /// The raft-engine log survives reopening, including hard state and truncation.
    #[test]
    fn raft_engine_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = RaftEngineLogStore::open(dir.path()).unwrap();
            let mut b = LogWriteBatch::default();
            b.push(7, LogOp::Append((6..=9).map(|i| entry(i, 3)).collect()));
            b.push(7, LogOp::Truncated { index: 5, term: 5 });
            log.write(b, true).unwrap();
        }
        let log = RaftEngineLogStore::open(dir.path()).unwrap();
        assert_eq!(log.last_index(7), Some(9));
        assert_eq!(log.truncated(7).unwrap(), Some((5, 5)));
        assert_eq!(log.groups(), vec![7]);
    }

    /// PeerStorage answers raft's queries from cache and log, and reports compaction correctly.
    /// Entries whose write is still in flight stay in the cache whatever its bounds: raft reads
    /// them from storage, and the log store does not have them yet.
    #[test]
    fn cache_keeps_entries_not_yet_durable() {
        let mut cache = EntryCache::default();
        let n = ENTRY_CACHE_COUNT_MAX as u64 + 1000;
        cache.append(&(1..=n).map(|i| entry(i, 1)).collect::<Vec<_>>());
        assert_eq!(cache.first_index(), Some(1), "nothing durable yet: nothing evicted");
        cache.set_durable(500);
        assert_eq!(cache.first_index(), Some(501), "only durable entries go");
        cache.set_durable(n);
        assert_eq!(cache.entries.len(), ENTRY_CACHE_COUNT_MAX);

        // A new leader's entries replace durable ones: the replacements stay until their own write
        // is durable (before, they could be evicted at once, and raft read the log store for entries
        // still on their way to it: "Entry Not Found" with the log written on its own thread).
        let mut cache = EntryCache::default();
        cache.append(&(1..=10).map(|i| entry(i, 1)).collect::<Vec<_>>());
        cache.set_durable(10);
        cache.append(&(5..=n).map(|i| entry(i, 2)).collect::<Vec<_>>());
        assert_eq!(cache.first_index(), Some(5), "only the durable entries the new ones did not replace go");
        cache.set_durable(n);
        assert_eq!(cache.entries.len(), ENTRY_CACHE_COUNT_MAX);
    }

    #[test]
    fn peer_storage_queries() {
        let log: Arc<dyn LogStore> = Arc::new(MemoryLogStore::default());
        let mut s = PeerStorage::open(3, log.clone(), ConfState::default(), (5, 5)).unwrap();
        let mut b = LogWriteBatch::default();
        s.append(&(6..=20).map(|i| entry(i, 6)).collect::<Vec<_>>(), &mut b);
        log.write(b, true).unwrap();
        assert_eq!(s.first_index().unwrap(), 6);
        assert_eq!(s.last_index().unwrap(), 20);
        assert_eq!(s.term(5).unwrap(), 5);
        assert_eq!(s.term(12).unwrap(), 6);
        assert!(matches!(s.term(4), Err(raft::Error::Store(StorageError::Compacted))));
        assert!(matches!(s.term(21), Err(raft::Error::Store(StorageError::Unavailable))));
        assert_eq!(s.entries(6, 9, None, GetEntriesContext::empty(false)).unwrap().len(), 3);
        assert_eq!(s.entries(6, 9, Some(0), GetEntriesContext::empty(false)).unwrap().len(), 1, "at least one");

        let mut b = LogWriteBatch::default();
        s.compact_to(10, &mut b).unwrap();
        log.write(b, true).unwrap();
        assert_eq!(s.first_index().unwrap(), 11);
        assert_eq!(s.term(10).unwrap(), 6);
        assert!(s.entries(9, 12, None, GetEntriesContext::empty(false)).is_err());

        // Reopened (a restart: the cache starts empty) and appended to, with the write still in
        // flight: a lagging follower's range is read from the log store up to the cache and from the
        // cache after (the log store alone has no entry 21 yet).
        let mut reopened = PeerStorage::open(3, log.clone(), ConfState::default(), (5, 5)).unwrap();
        let mut unwritten = LogWriteBatch::default();
        reopened.append(&(21..=25).map(|i| entry(i, 7)).collect::<Vec<_>>(), &mut unwritten);
        let got = reopened.entries(11, 26, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), (11..=25).collect::<Vec<_>>());
        assert_eq!((got[9].term, got[10].term), (6, 7));
        let size_of_three = 3 * u64::from(protobuf::Message::compute_size(&entry(8, 6)));
        assert_eq!(reopened.entries(11, 26, Some(size_of_three), GetEntriesContext::empty(false)).unwrap().len(), 3, "cut by size in the log store");
        assert_eq!(reopened.entries(22, 24, None, GetEntriesContext::empty(false)).unwrap().len(), 2, "from the cache alone");

        // Cold read path (cache cleared) goes to the log store.
        s.cache.clear();
        assert_eq!(s.entries(11, 15, None, GetEntriesContext::empty(false)).unwrap().len(), 4);
        assert_eq!(s.term(15).unwrap(), 6);

        // A snapshot request without a generated snapshot asks the replica to make one.
        assert!(s.snapshot(10, 2).is_err());
        assert!(s.take_snapshot_wanted());

        // A generated snapshot is sent only to peers its configuration names; for a peer added
        // since, a new one is asked for.
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 12;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        snap.mut_metadata().mut_conf_state().learners = vec![7];
        s.set_generated_snapshot(snap);
        assert!(s.snapshot(0, 7).is_ok());
        assert!(s.snapshot(0, 2).is_ok());
        assert!(!s.take_snapshot_wanted());
        assert!(s.snapshot(0, 14).is_err(), "peer 14 was added after this snapshot");
        assert!(s.take_snapshot_wanted());
    }

    /// A group whose log was compacted whole while raft-engine's purges moved its old entries
    /// around (here: a busy neighbour fills and purges many small files) opens with no entry at or
    /// below its truncated index, so raft can append after it. raft-engine alone brings some of
    /// them back at recovery.
    #[test]
    fn compacted_entries_stay_compacted_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let big = |i: u64| {
            // Incompressible, so that files fill up.
            let mut e = entry(i, 1);
            let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            e.data = (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect::<Vec<u8>>()
                .into();
            e
        };
        let (quiet, busy) = (1u64, 2u64);
        let mut busy_next = 1u64;
        let mut churn = |log: &RaftEngineLogStore, rounds: u64| {
            for _ in 0..rounds {
                let mut b = LogWriteBatch::default();
                b.push(busy, LogOp::Append((busy_next..busy_next + 8).map(big).collect()));
                busy_next += 8;
                b.push(busy, LogOp::Truncated { index: busy_next - 2, term: 1 });
                b.push(busy, LogOp::CompactBelow(busy_next - 1));
                log.write(b, false).unwrap();
                log.purge().unwrap();
            }
        };
        {
            let log = RaftEngineLogStore::open_sized(dir.path(), 16 << 10, 64 << 10).unwrap();
            let mut b = LogWriteBatch::default();
            b.push(quiet, LogOp::Append((1..=6).map(|i| entry(i, 1)).collect()));
            log.write(b, true).unwrap();
            churn(&log, 200);
            let mut b = LogWriteBatch::default();
            b.push(quiet, LogOp::Append((7..=20).map(|i| entry(i, 1)).collect()));
            b.push(quiet, LogOp::Truncated { index: 20, term: 1 });
            b.push(quiet, LogOp::CompactBelow(21));
            log.write(b, true).unwrap();
            churn(&log, 200);
            log.write(LogWriteBatch::default(), true).unwrap();
        }
        let log = RaftEngineLogStore::open_sized(dir.path(), 16 << 10, 64 << 10).unwrap();
        assert!(log.first_index(quiet).is_some_and(|f| f <= 20), "raft-engine brings compacted entries back (else this test tests nothing)");
        drop_entries_below_truncated(&log).unwrap();
        assert_eq!(log.truncated(quiet).unwrap(), Some((20, 1)));
        assert_eq!(log.engine.first_index(quiet), None, "entries at or below the truncated index came back");
        let mut b = LogWriteBatch::default();
        b.push(quiet, LogOp::Append(vec![entry(21, 2)]));
        log.write(b, true).unwrap();
        assert_eq!(log.last_index(quiet), Some(21));
    }

    /// The memory store brings back, at a crash, entries a group compacted away long ago when it has
    /// none left (as raft-engine can), and refuses an append that would leave a hole after them;
    /// `drop_entries_below_truncated` (run by every store at open) removes them first.
    #[test]
    fn memory_store_models_resurrected_entries() {
        let log = MemoryLogStore::default();
        let write = |ops: Vec<LogOp>| {
            let mut b = LogWriteBatch::default();
            for op in ops {
                b.push(1, op);
            }
            log.write(b, true)
        };
        write(vec![LogOp::Append((1..=5).map(|i| entry(i, 1)).collect())]).unwrap();
        write(vec![LogOp::Truncated { index: 5, term: 1 }, LogOp::CompactBelow(6)]).unwrap();
        write(vec![LogOp::Append((6..=20).map(|i| entry(i, 1)).collect())]).unwrap();
        write(vec![LogOp::Truncated { index: 20, term: 1 }, LogOp::CompactBelow(21)]).unwrap();
        assert_eq!(log.first_index(1), None);
        log.crash();
        assert_eq!((log.first_index(1), log.last_index(1)), (Some(1), Some(5)), "the first compaction's entries came back");
        assert!(write(vec![LogOp::Append(vec![entry(21, 2)])]).unwrap_err().to_string().contains("hole"));
        drop_entries_below_truncated(&log).unwrap();
        assert_eq!(log.first_index(1), None);
        write(vec![LogOp::Append(vec![entry(21, 2)])]).unwrap();
        assert_eq!(log.last_index(1), Some(21));
        // A snapshot's Clean followed by an append far ahead in one batch is no hole.
        write(vec![LogOp::Clean, LogOp::Truncated { index: 100, term: 3 }, LogOp::Append(vec![entry(101, 3)])]).unwrap();
    }
}
