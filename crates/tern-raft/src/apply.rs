//! The partition state machine: applies committed writes to the engine deterministically.
//!
//! Everything here depends only on the entry (including the leader's timestamp) and the engine's
//! contents, so every replica computes identical bytes and identical results.

use crate::keys;
use prost::Message as _;
use raft::eraftpb::ConfState;
use std::collections::{BTreeMap, HashMap};
use tern_core::{codec, TernError};
use tern_engine::{KvEngine, WriteBatch};
use tern_proto::{
    write_request::Op, CheckAndMutate, CheckType, DupApply, DupConfirm, DupLogEntry, DupProgress, DupRecord, DupSync, Mutation, OriginProgress,
    PartitionDupState, RaftCommand, WriteRequest, WriteResponse,
};

/// How long a deduplicated write's result is remembered (retries must finish well within it).
pub const DEDUP_RESULT_TTL_MS: u64 = 10 * 60 * 1000;
/// The most one entry may move the log's clock forward (a partition idle for longer catches up over
/// a few entries).
pub const STAMP_STEP_MS_MAX: u64 = 60 * 60 * 1000;
/// Results below a client's floor are deleted once the floor crosses a multiple of this.
pub const DEDUP_GC_CHUNK: u64 = 1024;
/// Tombstones are kept at least this long (by the partition's clock) after the delete, whatever
/// duplication has confirmed: a batch delayed in flight still meets the delete it lost to.
pub const TOMBSTONE_RETAIN_MS: u64 = 10 * 60 * 1000;
/// Tombstones one entry collects at most (the rest go with later ones), or as many as it made.
const TOMBSTONES_COLLECTED_PER_ENTRY: usize = 1024;
/// The change log is let go of in chunks of this many indexes.
const CHANGE_LOG_GC_CHUNK: u64 = 256;

/// What the engine records about how far the state machine has got.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApplyState {
    pub applied_index: u64,
    pub applied_term: u64,
    pub conf_state: ConfState,
    /// The state machine's clock: the newest leader timestamp applied so far (unix ms). Each entry is
    /// applied at max(its stamp, this), so time as the log sees it never goes backwards, whatever
    /// the clocks of successive leaders say, and every replica computes it identically.
    pub stamp_ms: u64,
    /// The hybrid logical clock records are versioned by (the newest version issued or received,
    /// without its cluster tag): at least the log's clock, and past every version seen.
    pub hlc: u64,
    /// The table's partition count as this partition's log has it: the partition owns the hashkeys
    /// that hash to its index under this count. Doubled by a split entry; 0 in states written
    /// before splits existed (the replica then takes meta's count, which never changed before).
    pub partition_count: u32,
}

/// Bytes of the fixed part of an encoded apply state (format byte, index, term, stamp, hlc,
/// partition count) before the conf state; a crc32 of everything before it ends the encoding.
const APPLY_STATE_FIXED_BYTES: usize = 37;
/// The first byte of the apply state's encoding with a partition count. The second encoding
/// (`APPLY_STATE_V2_FORMAT`) has no partition count; the first (no format byte, no clock) starts
/// with the applied index's high byte, which is zero.
const APPLY_STATE_FORMAT: u8 = 0xa3;
const APPLY_STATE_V2_FORMAT: u8 = 0xa2;
const APPLY_STATE_V2_FIXED_BYTES: usize = 33;
const APPLY_STATE_V1_FIXED_BYTES: usize = 24;

impl ApplyState {
    pub(crate) fn encode(&self) -> Vec<u8> {
        use protobuf::Message as _;
        let mut out = Vec::with_capacity(80);
        out.push(APPLY_STATE_FORMAT);
        out.extend_from_slice(&self.applied_index.to_be_bytes());
        out.extend_from_slice(&self.applied_term.to_be_bytes());
        out.extend_from_slice(&self.stamp_ms.to_be_bytes());
        out.extend_from_slice(&self.hlc.to_be_bytes());
        out.extend_from_slice(&self.partition_count.to_be_bytes());
        out.extend_from_slice(&self.conf_state.write_to_bytes().expect("encode conf state"));
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<ApplyState, TernError> {
        use protobuf::Message as _;
        let (fixed, start) = match bytes.first() {
            Some(&APPLY_STATE_FORMAT) => (APPLY_STATE_FIXED_BYTES, 1),
            Some(&APPLY_STATE_V2_FORMAT) => (APPLY_STATE_V2_FIXED_BYTES, 1),
            _ => (APPLY_STATE_V1_FIXED_BYTES, 0),
        };
        if bytes.len() < fixed + 4 {
            return Err(TernError::Corruption(format!("apply state of {} bytes", bytes.len())));
        }
        let (bytes, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(bytes).to_be_bytes() != crc {
            return Err(TernError::Corruption("apply state failed its checksum".into()));
        }
        let conf_state = ConfState::parse_from_bytes(&bytes[fixed..]).map_err(|e| TernError::Corruption(format!("apply state conf state: {e}")))?;
        let word = |i: usize| u64::from_be_bytes(bytes[start + i * 8..start + i * 8 + 8].try_into().expect("8 bytes"));
        let hlc = if start == 1 { word(3) } else { 0 };
        let partition_count = if fixed == APPLY_STATE_FIXED_BYTES { u32::from_be_bytes(bytes[33..37].try_into().expect("4 bytes")) } else { 0 };
        Ok(ApplyState { applied_index: word(0), applied_term: word(1), stamp_ms: word(2), hlc, partition_count, conf_state })
    }
}

/// An engine sync under way: the applied index, log clock, version horizon and owner it makes
/// durable.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingSync {
    pub applied_index: u64,
    pub stamp_ms: u64,
    pub version_horizon: u64,
    pub owner: u64,
}

/// Whether the partition takes part in duplication (ships to another cluster, or has received
/// from one).
fn participating(dup: &PartitionDupState) -> bool {
    !dup.dups.is_empty() || !dup.origins.is_empty()
}

/// TOMBSTONE_RETAIN_MS behind the log's clock, as a version.
fn retained_horizon(state: &ApplyState) -> u64 {
    state.stamp_ms.saturating_sub(TOMBSTONE_RETAIN_MS) << codec::VERSION_MS_SHIFT
}

/// The version horizon: an expired record or a tombstone below it decides nothing any more, so it
/// counts as absent and may go (compaction drops such expired records; apply collects such
/// tombstones). It only grows, so whatever one replica's compaction dropped (by the horizon of a
/// state it synced earlier) every replica counts as absent now. Without duplication either way it
/// runs TOMBSTONE_RETAIN_MS behind the log's clock; with duplication it is kept in the replicated
/// state (`PartitionDupState.horizon`, see `ApplyBatch::raise_horizon`).
pub fn version_horizon(dup: &PartitionDupState, state: &ApplyState) -> u64 {
    if participating(dup) {
        dup.horizon
    } else {
        retained_horizon(state)
    }
}

/// Whether a stored record counts as absent at `now_ms`: expired, and below the version horizon.
pub fn counts_as_absent(expire_at_ms: u64, version: u64, now_ms: u64, horizon: u64) -> bool {
    codec::is_expired(expire_at_ms, now_ms) && version < horizon
}

/// The apply state and duplication state an engine holds (a checkpoint's, for a full copy).
pub fn replicated_state(engine: &dyn KvEngine) -> Result<(ApplyState, PartitionDupState), TernError> {
    let state = match engine.get(keys::APPLY_STATE_KEY).map_err(engine_error)? {
        Some(bytes) => ApplyState::decode(&bytes)?,
        None => ApplyState::default(),
    };
    let dup = match engine.get(keys::DUP_STATE_KEY).map_err(engine_error)? {
        Some(bytes) => {
            PartitionDupState::decode(codec::decode_value(&bytes)?.1).map_err(|e| TernError::Corruption(format!("duplication state: {e}")))?
        }
        None => PartitionDupState::default(),
    };
    Ok((state, dup))
}

/// The state machine could not read or decode what it needs to apply an entry (an engine I/O error,
/// a checksum mismatch, an undecodable command). Never an answer to a client: the replica stops,
/// because answering and moving on would leave it with different contents than its peers.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("storage failure at apply: {0}")]
pub struct StorageFailure(pub TernError);

impl From<TernError> for StorageFailure {
    fn from(e: TernError) -> Self {
        StorageFailure(e)
    }
}

pub fn engine_error(e: tern_engine::EngineError) -> TernError {
    match e {
        tern_engine::EngineError::Corruption(m) => TernError::Corruption(m),
        tern_engine::EngineError::Io(m) => TernError::Internal(m),
    }
}

/// What a replica knows about one client's exactly-once records without reading the engine.
#[derive(Clone, Copy, Debug, PartialEq)]
struct ClientSession {
    /// Once `bounded`: no remembered result of this client has a higher sequence number (None: it
    /// has none). New requests carry new, higher numbers: they learn they were never applied
    /// without an engine read. Results only go (expiry, collection below the floor), which keeps
    /// this a bound. Before: the highest result written since the session began.
    max_seq: Option<u64>,
    /// Whether `max_seq` bounds every result. A client is bounded (a reverse scan of its results)
    /// when it comes back: one seen once (many short-lived clients) costs point reads, not a scan.
    bounded: bool,
    /// The client's floor record: (floor, expire_at_ms).
    floor: Option<(u64, u64)>,
}

/// Clients a replica keeps sessions of; past it they are all forgotten (at the start of a batch) and
/// read from the engine again as they come.
const SESSIONS_MAX: usize = 4096;

pub struct StateMachine {
    /// None while closed (`close_engine`).
    engine: Option<Box<dyn KvEngine>>,
    state: ApplyState,
    /// Sessions of recent clients, true to the engine's contents (floors exactly, the highest
    /// result as a bound): `apply_command` writes every exactly-once record and keeps its client's
    /// session up to date. A batch takes them and gives them back when it is written; a batch that
    /// fails takes them with it (read again later). One batch at a time.
    sessions: HashMap<u64, ClientSession>,
    /// The partition's duplication state, as the engine holds it.
    dup: PartitionDupState,
    /// Test-only: let compaction expire records by the node's own clock (see `PlantedBugs`).
    expiry_by_local_clock: bool,
    /// Test-only: duplicated writes see expired records as absent (see `PlantedBugs`).
    lww_ignores_expired: bool,
    /// The partition's index in its table: with the applied partition count, which hashkeys it owns.
    partition: u32,
    /// The applied position the engine holds, when raft's empty entries were applied past it while
    /// it was closed (`apply_empty_while_closed`); it is told when it opens again.
    engine_behind: Option<(u64, u64)>,
}

/// Where a closed engine was (see `StateMachine::close_engine`): every call fails.
struct ClosedEngine;

impl ClosedEngine {
    fn error<T>() -> tern_engine::EngineResult<T> {
        Err(tern_engine::EngineError::Io("the engine is closed (its replica hibernates)".into()))
    }
}

impl KvEngine for ClosedEngine {
    fn get(&self, _: &[u8]) -> tern_engine::EngineResult<Option<Vec<u8>>> {
        Self::error()
    }
    fn write(&self, _: WriteBatch) -> tern_engine::EngineResult<()> {
        Self::error()
    }
    fn scan(&self, _: &[u8], _: Option<&[u8]>, _: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> tern_engine::EngineResult<()> {
        Self::error()
    }
    fn scan_reverse(&self, _: &[u8], _: &[u8], _: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> tern_engine::EngineResult<()> {
        Self::error()
    }
    fn sync(&self) -> tern_engine::EngineResult<()> {
        Self::error()
    }
    fn begin_sync(&self) -> tern_engine::EngineResult<bool> {
        Self::error()
    }
    fn sync_finished(&self) -> tern_engine::EngineResult<bool> {
        Self::error()
    }
    fn checkpoint(&self, _: &std::path::Path) -> tern_engine::EngineResult<()> {
        Self::error()
    }
    fn compact_all(&self) -> tern_engine::EngineResult<()> {
        Self::error()
    }
    fn set_expiry_horizon(&self, _: tern_engine::Horizon) {}
}

impl StateMachine {
    /// Opens the state machine on an engine; a fresh engine starts from `initial` (and records it).
    pub fn open(engine: Box<dyn KvEngine>, initial: ApplyState) -> Result<StateMachine, TernError> {
        let state = match engine.get(keys::APPLY_STATE_KEY).map_err(engine_error)? {
            Some(bytes) => ApplyState::decode(&bytes)?,
            None => {
                // Synced: the initial conf state exists nowhere else, and a replica that lost it
                // (power failure before the engine's first sync) could never vote or campaign again.
                // Found by the simulator (regression seeds in tern-sim/tests/sim.rs).
                let mut wb = WriteBatch::default();
                wb.put(keys::APPLY_STATE_KEY.to_vec(), initial.encode());
                engine.write(wb).map_err(engine_error)?;
                engine.sync().map_err(engine_error)?;
                initial
            }
        };
        // What was read may not be durable yet (an engine reopened without a crash): sync before
        // letting compaction expire by it.
        engine.sync().map_err(engine_error)?;
        let (_, dup) = replicated_state(engine.as_ref())?;
        // The owner comes with `set_owner` (the partition is not known here).
        engine.set_expiry_horizon(tern_engine::Horizon { unix_ms: state.stamp_ms, version: version_horizon(&dup, &state), owner: 0 });
        Ok(StateMachine {
            engine: Some(engine),
            state,
            sessions: HashMap::new(),
            dup,
            expiry_by_local_clock: false,
            lww_ignores_expired: false,
            partition: 0,
            engine_behind: None,
        })
    }

    /// Says which partition this is. A state written before splits existed has no partition count:
    /// it takes `meta_count` (what meta assigned the replica, which could not have changed then),
    /// written at once so that a checkpoint of this engine carries it. A new, empty replica keeps
    /// none until a snapshot brings one (meta's count may be a split's, ahead of the log).
    pub fn set_owner(&mut self, partition: u32, meta_count: u32) -> Result<(), TernError> {
        self.partition = partition;
        // The state read at open is durable (`open` synced it): compaction may drop the other
        // half's records by it. (A count taken from meta below is the table's only count so far:
        // the partition owned all it holds.)
        let durable = self.owner().word();
        self.engine().set_expiry_horizon(tern_engine::Horizon { owner: durable, ..Default::default() });
        if self.state.partition_count == 0 && self.state.applied_index > 0 && meta_count > 0 {
            self.state.partition_count = meta_count;
            let mut wb = WriteBatch::default();
            wb.put(keys::APPLY_STATE_KEY.to_vec(), self.state.encode());
            self.engine().write(wb).map_err(engine_error)?;
        }
        Ok(())
    }

    /// The hashkeys this partition owns now (its index and applied partition count).
    pub fn owner(&self) -> Owner {
        Owner { partition: self.partition, count: self.state.partition_count }
    }

    /// Plants the bug the simulator must catch: compaction drops records that expired by this node's
    /// wall clock instead of by the applied log's clock.
    pub fn plant_expiry_by_local_clock(&mut self) {
        self.expiry_by_local_clock = true;
    }

    /// Plants the bug the simulator's two-cluster mode must catch: duplicated writes compare with
    /// an expired record as if it were absent.
    pub fn plant_lww_ignores_expired(&mut self) {
        self.lww_ignores_expired = true;
    }

    /// Starts making everything applied so far durable without waiting; what it covers is durable
    /// once `sync_finished` says so. None: the engine cannot start one now.
    pub fn begin_sync(&self) -> Result<Option<PendingSync>, TernError> {
        let started = self.engine().begin_sync().map_err(engine_error)?;
        Ok(started.then_some(PendingSync {
            applied_index: self.state.applied_index,
            stamp_ms: self.state.stamp_ms,
            version_horizon: version_horizon(&self.dup, &self.state),
            owner: self.owner().word(),
        }))
    }

    /// Whether the sync `pending` started is durable; once it is, compaction may expire records up
    /// to the applied log's clock as of its start. Every later entry applies at that time or after
    /// it, so what expired by then stays expired; and it is bounded by what is durable, because
    /// compaction output survives a crash that loses unsynced applies: a record compacted away by a
    /// clock the recovered state has not reached yet would be missing when those entries are applied
    /// again (found by the simulator: seeds 1004 and 1111 diverged with the horizon at the applied
    /// clock).
    pub fn sync_finished(&self, pending: &PendingSync) -> Result<bool, TernError> {
        if !self.engine().sync_finished().map_err(engine_error)? {
            return Ok(false);
        }
        self.engine().set_expiry_horizon(tern_engine::Horizon { unix_ms: pending.stamp_ms, version: pending.version_horizon, owner: pending.owner });
        Ok(true)
    }

    /// The planted bug's horizon: the node's own clock, whatever is durable.
    pub fn planted_expiry_horizon(&self, local_now_ms: u64) {
        if self.expiry_by_local_clock {
            self.engine().set_expiry_horizon(tern_engine::Horizon { unix_ms: local_now_ms, version: u64::MAX, owner: 0 });
        }
    }

    pub fn state(&self) -> &ApplyState {
        &self.state
    }

    pub fn engine(&self) -> &dyn KvEngine {
        self.engine.as_deref().unwrap_or(&ClosedEngine)
    }

    /// Closes the engine: its files and memory are released, the state stays known. Only for an
    /// engine that holds everything applied durably (the caller's sync finished); until
    /// `reopen_engine`, every engine call fails (a replica that used it would stop, never serve
    /// wrong data).
    pub fn close_engine(&mut self) {
        self.engine = None;
    }

    pub fn engine_is_open(&self) -> bool {
        self.engine.is_some()
    }

    /// Applies raft's empty entries up to `index` (of `term`) while the engine is closed: they
    /// change nothing but the applied position, which the engine learns when it opens again. Until
    /// then no sync covers them, so the raft log keeps them (its GC stops at the synced index) and
    /// a restart applies them again.
    pub fn apply_empty_while_closed(&mut self, index: u64, term: u64) {
        debug_assert!(self.engine.is_none() && index > self.state.applied_index);
        self.engine_behind.get_or_insert((self.state.applied_index, self.state.applied_term));
        self.state.applied_index = index;
        self.state.applied_term = term;
    }

    /// Puts back an engine closed by `close_engine`, opened again from its directory. It must be
    /// where the state machine left it (the same applied position, or the one before the empty
    /// entries applied without it, which it is then told): anything else is a storage failure.
    pub fn reopen_engine(&mut self, engine: Box<dyn KvEngine>) -> Result<(), TernError> {
        let state = match engine.get(keys::APPLY_STATE_KEY).map_err(engine_error)? {
            Some(bytes) => ApplyState::decode(&bytes)?,
            None => return Err(TernError::Corruption("a reopened engine has no apply state".into())),
        };
        let (index, term) = self.engine_behind.unwrap_or((self.state.applied_index, self.state.applied_term));
        if (state.applied_index, state.applied_term) != (index, term) {
            return Err(TernError::Corruption(format!(
                "a reopened engine holds applied index {} (term {}), the replica expected {index} (term {term})",
                state.applied_index, state.applied_term
            )));
        }
        if self.engine_behind.is_some() {
            let mut wb = WriteBatch::default();
            wb.put(keys::APPLY_STATE_KEY.to_vec(), self.state.encode());
            engine.write(wb).map_err(engine_error)?;
            self.engine_behind = None;
        }
        let owner = Owner { partition: self.partition, count: state.partition_count }.word();
        engine.set_expiry_horizon(tern_engine::Horizon { unix_ms: state.stamp_ms, version: version_horizon(&self.dup, &state), owner });
        self.engine = Some(engine);
        Ok(())
    }

    /// The partition's duplication state (empty when the table has no duplication).
    pub fn dup_state(&self) -> &PartitionDupState {
        &self.dup
    }

    /// Change-log entries after `after`, at most `max_entries` and about `max_bytes` (one entry at
    /// least), without the records a newer write of the same key has superseded here (that write
    /// ships too, or came from the cluster the batch goes to).
    pub fn read_change_log(&self, after: u64, max_entries: usize, max_bytes: usize) -> Result<Vec<(u64, DupLogEntry)>, TernError> {
        let mut entries = Vec::new();
        let mut bytes = 0;
        let mut failure = None;
        if after.saturating_add(1) < self.dup.log_start {
            return Err(TernError::Unavailable(format!(
                "the change log no longer holds the entries after {after} (it starts at {}): the duplication has moved on",
                self.dup.log_start
            )));
        }
        let start = keys::change_log_key(after.saturating_add(1).max(self.dup.log_start));
        self.engine()
            .scan(&start, Some(&keys::change_log_end()), &mut |k, v| {
                if entries.len() >= max_entries || (bytes >= max_bytes && !entries.is_empty()) {
                    return false;
                }
                let entry = codec::decode_value(v).ok().and_then(|(_, bytes)| DupLogEntry::decode(bytes).ok());
                match (keys::change_log_index(k), entry) {
                    (Some(index), Some(entry)) => {
                        bytes += v.len();
                        entries.push((index, entry));
                        true
                    }
                    _ => {
                        failure = Some(TernError::Corruption(format!("undecodable change-log entry under {k:?}")));
                        false
                    }
                }
            })
            .map_err(engine_error)?;
        if let Some(e) = failure {
            return Err(e);
        }
        for (_, entry) in &mut entries {
            let mut kept = Vec::with_capacity(entry.records.len());
            for r in entry.records.drain(..) {
                let key = keys::data_key(&r.hashkey, &r.sortkey);
                if stored_version(|k| self.engine().get(k).map_err(engine_error), &key)? <= r.version {
                    kept.push(r);
                }
            }
            entry.records = kept;
        }
        Ok(entries)
    }

    /// Starts a batch of applies; nothing is visible until `finish`.
    pub fn begin(&mut self) -> ApplyBatch {
        let mut sessions = std::mem::take(&mut self.sessions);
        if sessions.len() > SESSIONS_MAX {
            sessions = HashMap::new(); // and its memory goes
        }
        ApplyBatch {
            wb: WriteBatch::default(),
            overlay: BTreeMap::new(),
            deleted_ranges: Vec::new(),
            state: self.state.clone(),
            sessions,
            dup: self.dup.clone(),
            dup_changed: false,
            entry: EntryContext::default(),
            lww_ignores_expired: self.lww_ignores_expired,
            partition: self.partition,
            split: None,
        }
    }

    /// Writes the batch and the new apply state atomically.
    pub fn finish(&mut self, mut batch: ApplyBatch) -> Result<(), TernError> {
        if batch.state == self.state && batch.wb.is_empty() {
            self.sessions = batch.sessions;
            return Ok(());
        }
        debug_assert!(batch.state.stamp_ms >= self.state.stamp_ms, "the log's clock never goes backwards");
        if batch.dup_changed {
            batch.wb.put(keys::DUP_STATE_KEY.to_vec(), codec::encode_value(0, &batch.dup.encode_to_vec()));
        }
        batch.wb.put(keys::APPLY_STATE_KEY.to_vec(), batch.state.encode());
        self.engine().write(batch.wb).map_err(engine_error)?;
        self.state = batch.state;
        self.sessions = batch.sessions;
        if batch.dup_changed {
            self.dup = batch.dup;
        }
        Ok(())
    }
}

/// Writes pending in one apply round, with a read-your-writes overlay so that later entries in the
/// same round (an incr after a set) see earlier ones.
pub struct ApplyBatch {
    wb: WriteBatch,
    /// Ordered, so that a scan takes only its range of it.
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Ranges deleted earlier in the batch (keys written after a delete are in `overlay`): what an
    /// entry sees must not depend on how entries were grouped into batches.
    deleted_ranges: Vec<(Vec<u8>, Vec<u8>)>,
    state: ApplyState,
    /// The state machine's sessions, kept exact for the engine plus this batch (see `StateMachine`).
    sessions: HashMap<u64, ClientSession>,
    dup: PartitionDupState,
    dup_changed: bool,
    /// The entry being applied.
    entry: EntryContext,
    /// The planted bug (see `StateMachine`).
    lww_ignores_expired: bool,
    partition: u32,
    /// The partition count the last applied entry split the partition to (taken by the replica,
    /// which checkpoints the child there).
    split: Option<u32>,
}

/// Which hashkeys a partition owns: those that hash to `partition` under `count` (0: not known,
/// every hashkey, as before splits existed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub partition: u32,
    pub count: u32,
}

impl Owner {
    pub fn owns(&self, hashkey: &[u8]) -> bool {
        self.count == 0 || codec::partition_of(hashkey, self.count) == self.partition
    }

    /// The owner as one word for the engine's compaction filter (`Horizon::owner`): it only grows
    /// as the count doubles. 0: not known.
    pub fn word(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            (self.partition as u64) << 32 | self.count as u64
        }
    }

    /// Whether a storage key is a user record of another partition (left behind by a split).
    pub fn foreign_data_key(&self, key: &[u8]) -> bool {
        self.count != 0 && key.first() == Some(&keys::DATA_PREFIX) && codec::decode_key(&key[1..]).is_ok_and(|(hashkey, _)| !self.owns(hashkey))
    }

    /// The answer to a request for a hashkey this partition no longer owns: a client routed it by
    /// an older partition count.
    pub fn check(&self, hashkey: &[u8]) -> Result<(), TernError> {
        if self.owns(hashkey) {
            return Ok(());
        }
        Err(TernError::PartitionSplit {
            partition_count: self.count,
            message: format!(
                "the hashkey belongs to partition {} of {}: partition {} has split",
                codec::partition_of(hashkey, self.count),
                self.count,
                self.partition
            ),
        })
    }
}

/// What one entry's writes share: its index, time and cluster tag, its version (drawn from the
/// clock at its first write), and its effects when the change log records them.
#[derive(Default)]
struct EntryContext {
    index: u64,
    now: u64,
    tag: u32,
    version: Option<u64>,
    effects: Vec<DupRecord>,
}

impl ApplyBatch {
    pub fn set_applied(&mut self, index: u64, term: u64) {
        debug_assert!(index > self.state.applied_index, "applied index must grow");
        self.state.applied_index = index;
        self.state.applied_term = term;
    }

    pub fn set_conf_state(&mut self, conf_state: ConfState) {
        self.state.conf_state = conf_state;
    }

    /// The partition count an entry just applied split the partition to, once.
    pub fn take_split(&mut self) -> Option<u32> {
        self.split.take()
    }

    fn owner(&self) -> Owner {
        Owner { partition: self.partition, count: self.state.partition_count }
    }

    /// Splits the partition in two (see `tern_proto::Split`). Refused, the same way on every
    /// replica, while raft changes membership (a child must not start in a joint configuration no
    /// leader of its own would leave). Not refused for duplication state: meta refuses to split a
    /// table with duplications, and a refusal here (say for the state of a removed duplication
    /// no shipper will ever clear) would hold the split up for good.
    fn split(&mut self, split: &tern_proto::Split) -> WriteResponse {
        let (current, target) = (self.state.partition_count, split.partition_count);
        if target == current {
            return WriteResponse::default(); // split already (a proposal repeated)
        }
        if current == 0 || Some(target) != current.checked_mul(2) {
            return error_response(TernError::invalid(format!("a partition of a table with {current} partitions cannot split to {target}")));
        }
        if let Err(e) = tern_core::limits::check_partition_count(target) {
            return error_response(e);
        }
        let cs = &self.state.conf_state;
        if !cs.voters_outgoing.is_empty() || !cs.learners_next.is_empty() {
            return error_response(TernError::Busy("the partition's membership is changing; it splits after".into()));
        }
        self.state.partition_count = target;
        self.split = Some(target);
        WriteResponse::default()
    }

    fn get(&self, engine: &dyn KvEngine, key: &[u8]) -> Result<Option<Vec<u8>>, StorageFailure> {
        match self.overlay.get(key) {
            Some(v) => Ok(v.clone()),
            None if self.deleted_ranges.iter().any(|(start, end)| start.as_slice() <= key && key < end.as_slice()) => Ok(None),
            None => engine.get(key).map_err(|e| StorageFailure(engine_error(e))),
        }
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.overlay.insert(key.clone(), Some(value.clone()));
        self.wb.put(key, value);
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.overlay.insert(key.clone(), None);
        self.wb.delete(key);
    }

    fn delete_range(&mut self, start: Vec<u8>, end: Vec<u8>) {
        self.overlay.retain(|k, _| !(start.as_slice() <= k.as_slice() && k.as_slice() < end.as_slice()));
        self.deleted_ranges.push((start.clone(), end.clone()));
        self.wb.delete_range(start, end);
    }

    /// The writes of this round not yet in the engine: keys written (None: deleted) and ranges
    /// deleted.
    pub(crate) fn pending(&self) -> crate::redis::Pending<'_> {
        (&self.overlay, &self.deleted_ranges)
    }

    /// The first `limit` keys in [start, end) as the engine plus this batch hold them.
    fn scan_keys(&self, engine: &dyn KvEngine, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Vec<u8>>, StorageFailure> {
        let mut found = Vec::new();
        engine
            .scan(start, Some(end), &mut |k, _| {
                let shadowed = self.overlay.contains_key(k) || self.deleted_ranges.iter().any(|(s, e)| s.as_slice() <= k && k < e.as_slice());
                if !shadowed {
                    found.push(k.to_vec());
                }
                found.len() < limit
            })
            .map_err(|e| StorageFailure(engine_error(e)))?;
        found.extend(self.overlay.range(start.to_vec()..end.to_vec()).filter(|(_, v)| v.is_some()).map(|(k, _)| k.clone()));
        found.sort();
        found.truncate(limit);
        Ok(found)
    }

    /// Whether the change log records this partition's writes (the table has duplications).
    fn recording(&self) -> bool {
        !self.dup.dups.is_empty()
    }

    /// The version of the entry's writes: drawn once per entry from the clock, which moves to the
    /// entry's time, or one logical step past its last version when that is not behind it.
    fn entry_version(&mut self) -> u64 {
        if let Some(v) = self.entry.version {
            return v;
        }
        let at_now = self.entry.now << codec::VERSION_MS_SHIFT;
        // Saturating: versions are checked where they enter (no more than a day ahead of the
        // receiving server's clock), so the clock is nowhere near its end.
        self.state.hlc = if at_now > self.state.hlc { at_now } else { self.state.hlc.saturating_add(1 << codec::VERSION_TAG_BITS) };
        let version = self.state.hlc | self.entry.tag as u64;
        self.entry.version = Some(version);
        version
    }

    /// Writes a user record of this entry (versioned, and into the change log when recording).
    pub(crate) fn put_record(&mut self, hashkey: &[u8], sortkey: &[u8], expire_at_ms: u64, value: &[u8]) {
        let version = self.entry_version();
        self.put(keys::data_key(hashkey, sortkey), codec::encode_versioned(expire_at_ms, version, value));
        if self.recording() {
            self.entry.effects.push(DupRecord {
                hashkey: hashkey.to_vec().into(),
                sortkey: sortkey.to_vec().into(),
                value: value.to_vec().into(),
                expire_at_ms,
                version,
                delete: false,
            });
        }
    }

    /// Deletes a user record in this entry; while recording, it leaves a tombstone and goes into
    /// the change log.
    pub(crate) fn delete_record(&mut self, engine: &dyn KvEngine, hashkey: &[u8], sortkey: &[u8]) -> Result<(), StorageFailure> {
        let key = keys::data_key(hashkey, sortkey);
        self.delete(key.clone());
        if self.recording() {
            let version = self.entry_version();
            self.put_tombstone(engine, &key, version)?;
            self.entry.effects.push(DupRecord {
                hashkey: hashkey.to_vec().into(),
                sortkey: sortkey.to_vec().into(),
                version,
                delete: true,
                ..Default::default()
            });
        }
        Ok(())
    }

    /// The version of the tombstone at a data key, if any.
    fn tombstone_version(&self, engine: &dyn KvEngine, data_key: &[u8]) -> Result<Option<u64>, StorageFailure> {
        self.get(engine, &keys::tombstone_key(data_key))?.map(decode_tombstone).transpose().map_err(StorageFailure)
    }

    fn put_tombstone(&mut self, engine: &dyn KvEngine, data_key: &[u8], version: u64) -> Result<(), StorageFailure> {
        if let Some(old) = self.tombstone_version(engine, data_key)? {
            self.delete(keys::tombstone_by_version_key(old, data_key));
        }
        self.put(keys::tombstone_key(data_key), encode_tombstone(version));
        self.put(keys::tombstone_by_version_key(version, data_key), Vec::new());
        Ok(())
    }

    /// The version a record at `data_key` must beat: its stored value's, expired or not (the
    /// later write wins even if it has expired: the other cluster drops an older write on it
    /// too), or its tombstone's. Expired records stay until compaction may drop them, which is
    /// not before `version_horizon` passes them: every replica sees the same versions.
    fn current_version(&self, engine: &dyn KvEngine, data_key: &[u8], now: u64, horizon: u64) -> Result<u64, StorageFailure> {
        let horizon = if self.lww_ignores_expired { u64::MAX } else { horizon };
        let value = match self.get(engine, data_key)? {
            Some(stored) => {
                let s = codec::decode_stored(&stored)?;
                if counts_as_absent(s.expire_at_ms, s.version, now, horizon) {
                    0
                } else {
                    s.version
                }
            }
            None => 0,
        };
        Ok(value.max(self.tombstone_version(engine, data_key)?.unwrap_or(0)))
    }

    /// Moves the version horizon after a duplication op: to the lowest of what every duplication
    /// has delivered of this partition's own writes, what every origin has delivered of its own,
    /// and TOMBSTONE_RETAIN_MS behind the log's clock; never back (a new duplication or origin
    /// starts where the horizon already is: what it ships older than that meets records that may
    /// be gone, and counts as they do).
    fn raise_horizon(&mut self, was_participating: bool) {
        let floor = if was_participating { self.dup.horizon } else { retained_horizon(&self.state) };
        let computed = self
            .dup
            .dups
            .iter()
            .map(|d| d.confirmed_version)
            .chain(self.dup.origins.iter().map(|o| o.watermark))
            .chain([retained_horizon(&self.state)])
            .min()
            .expect("one at least");
        let horizon = floor.max(computed);
        if horizon != self.dup.horizon {
            let mut dup = self.dup.clone();
            dup.horizon = horizon;
            self.set_dup(dup);
        }
    }

    fn set_dup(&mut self, dup: PartitionDupState) {
        self.dup = dup;
        self.dup_changed = true;
    }

    /// Another cluster's records (or a restore's): each applies only if its version is newer than
    /// what the partition holds, and none goes into the change log (duplication does not echo).
    fn dup_apply(&mut self, engine: &dyn KvEngine, apply: &DupApply, now: u64) -> Result<WriteResponse, StorageFailure> {
        let was_participating = participating(&self.dup);
        // The horizon as it stands before this batch (a first origin makes the partition take part
        // in duplication, whose stored horizon is not raised until after it): what compaction may
        // have dropped is below it.
        let horizon = version_horizon(&self.dup, &self.state);
        // What the origin had said it delivered of its own before this batch.
        let mut delivered = 0;
        if apply.origin_tag != 0 {
            let mut dup = self.dup.clone();
            let key = |o: &OriginProgress| (o.tag, o.source_table) == (apply.origin_tag, apply.source_table);
            let origin = match dup.origins.iter().position(key) {
                Some(i) => &mut dup.origins[i],
                None => {
                    dup.origins.push(OriginProgress { tag: apply.origin_tag, source_table: apply.source_table, ..Default::default() });
                    dup.origins.last_mut().expect("pushed")
                }
            };
            // A batch delivered again (a lost answer, a new leader) is not skipped whole: a new
            // read of the change log may cut it differently. Its records are: what the origin
            // already said it delivered, below.
            origin.applied_index = origin.applied_index.max(apply.origin_index);
            delivered = origin.watermark;
            origin.watermark = origin.watermark.max(apply.watermark);
            self.set_dup(dup);
        }
        let own_tag = self.entry.tag;
        let mut applied = 0;
        for r in &apply.records {
            let clock = r.version & !(codec::CLUSTER_TAG_MAX as u64);
            self.state.hlc = self.state.hlc.max(clock);
            if apply.origin_tag != 0 {
                let tag = codec::version_tag(r.version);
                // This cluster's own writes come back only stale (it holds them, or what replaced
                // them); the origin's own writes it said were delivered come again only stale too
                // (an old checkpoint's copy, a deposed leader's batch).
                if (tag == own_tag && own_tag != 0) || (tag == apply.origin_tag && r.version <= delivered) {
                    continue;
                }
            }
            let key = keys::data_key(&r.hashkey, &r.sortkey);
            if r.version <= self.current_version(engine, &key, now, horizon)? {
                continue;
            }
            if r.delete {
                self.delete(key.clone());
                self.put_tombstone(engine, &key, r.version)?;
            } else {
                self.put(key, codec::encode_versioned(r.expire_at_ms, r.version, &r.value));
            }
            applied += 1;
        }
        self.raise_horizon(was_participating);
        self.collect_tombstones(engine, apply.records.len())?;
        Ok(WriteResponse { count: applied, ..Default::default() })
    }

    /// The table's duplications as meta has them: new ones start with a full copy (the change log
    /// holds nothing from before them), removed ones are forgotten.
    fn dup_sync(&mut self, engine: &dyn KvEngine, sync: &DupSync) -> Result<WriteResponse, StorageFailure> {
        let was_participating = participating(&self.dup);
        let index = self.entry.index;
        let mut dup = self.dup.clone();
        if dup.dups.is_empty() {
            dup.log_start = index + 1; // recording starts after this entry
        }
        dup.dups.retain(|d| sync.dup_ids.contains(&d.dup_id));
        for &id in &sync.dup_ids {
            if !dup.dups.iter().any(|d| d.dup_id == id) {
                dup.dups.push(DupProgress { dup_id: id, confirmed_index: index, confirmed_version: 0, full_copy: true, full_copy_since: index });
            }
        }
        dup.dups.sort_by_key(|d| d.dup_id);
        dup.log_entries_max = sync.log_entries_max;
        self.set_dup(dup);
        self.collect_change_log();
        self.raise_horizon(was_participating);
        self.collect_tombstones(engine, 0)?;
        Ok(WriteResponse::default())
    }

    /// A duplication delivered the change log up to an index (or a full copy as of it). Stale
    /// confirmations (a full copy that began before the duplication last fell behind) change nothing.
    fn dup_confirm(&mut self, engine: &dyn KvEngine, confirm: &DupConfirm) -> Result<WriteResponse, StorageFailure> {
        let mut dup = self.dup.clone();
        let Some(d) = dup.dups.iter_mut().find(|d| d.dup_id == confirm.dup_id) else {
            return Ok(WriteResponse::default());
        };
        if confirm.index >= self.entry.index {
            return Ok(error_response(TernError::invalid(format!("confirmation of entry {} from entry {}", confirm.index, self.entry.index))));
        }
        if confirm.full_copy_done {
            if !d.full_copy || confirm.index < d.full_copy_since {
                return Ok(WriteResponse::default());
            }
            d.full_copy = false;
        } else if d.full_copy {
            return Ok(WriteResponse::default());
        }
        d.confirmed_index = d.confirmed_index.max(confirm.index);
        d.confirmed_version = d.confirmed_version.max(confirm.version);
        self.set_dup(dup);
        self.collect_change_log();
        self.raise_horizon(true);
        self.collect_tombstones(engine, 0)?;
        Ok(WriteResponse { set_done: true, ..Default::default() })
    }

    /// Records this entry's effects in the change log; a duplication left further behind than the
    /// log may hold switches to a full copy, and the log lets go of what it no longer needs. While
    /// the partition takes part in duplication, every entry also collects tombstones (at least as
    /// many as it left), so they never pile up faster than they go.
    fn record_effects(&mut self, engine: &dyn KvEngine) -> Result<(), StorageFailure> {
        let effects = std::mem::take(&mut self.entry.effects);
        if participating(&self.dup) {
            self.collect_tombstones(engine, effects.len())?;
        }
        if effects.is_empty() || !self.recording() {
            return Ok(());
        }
        // An entry that writes one key twice (a multi-set naming a sortkey twice, a
        // check-and-mutate setting and deleting it) ships only the last write: both share the
        // entry's version, and the other cluster would keep the first.
        let effects = if effects.len() < 2 {
            effects
        } else {
            let mut seen = std::collections::HashSet::new();
            let mut last: Vec<DupRecord> = effects.into_iter().rev().filter(|e| seen.insert((e.hashkey.clone(), e.sortkey.clone()))).collect();
            last.reverse();
            last
        };
        let index = self.entry.index;
        let entry = DupLogEntry { records: effects, hlc: self.state.hlc };
        self.put(keys::change_log_key(index), codec::encode_value(0, &entry.encode_to_vec()));
        // Behind by more than the log may hold: from a delivered position, or from where a full
        // copy it still waits for begins (one that never finishes, a remote down for days, must
        // not hold the log either; a copy under way from before `full_copy_since` no longer counts).
        let max = self.dup.log_entries_max;
        let behind = |d: &DupProgress| index - if d.full_copy { d.full_copy_since } else { d.confirmed_index } > max;
        if max > 0 && self.dup.dups.iter().any(behind) {
            let mut dup = self.dup.clone();
            for d in dup.dups.iter_mut().filter(|d| behind(d)) {
                d.full_copy = true;
                d.full_copy_since = index;
            }
            self.set_dup(dup);
            self.collect_change_log();
        }
        Ok(())
    }

    /// Removes change-log entries every duplication is past (delivered, or covered by the full copy
    /// it waits for).
    /// Removed in chunks of CHANGE_LOG_GC_CHUNK indexes (one range delete each), not at every
    /// confirmation: range tombstones are costly to every later read of the engine.
    fn collect_change_log(&mut self) {
        let keep_from = self.dup.dups.iter().map(|d| if d.full_copy { d.full_copy_since } else { d.confirmed_index } + 1).min();
        let start = self.dup.log_start;
        let end = match keep_from {
            None => u64::MAX, // no duplication: nothing is kept
            Some(k) => k - k % CHANGE_LOG_GC_CHUNK,
        };
        if end > start {
            let to = if end == u64::MAX { keys::change_log_end() } else { keys::change_log_key(end) };
            self.delete_range(keys::change_log_key(start), to);
            let mut dup = self.dup.clone();
            dup.log_start = end;
            self.set_dup(dup);
        }
    }

    /// Removes tombstones no duplication needs: delivered by every duplication of this partition,
    /// older than what every cluster that duplicates into it has delivered, and older than
    /// TOMBSTONE_RETAIN_MS by the partition's clock. At most TOMBSTONES_COLLECTED_PER_ENTRY.
    fn collect_tombstones(&mut self, engine: &dyn KvEngine, at_least: usize) -> Result<(), StorageFailure> {
        let horizon = version_horizon(&self.dup, &self.state);
        if horizon == 0 {
            return Ok(());
        }
        let (start, end) = keys::tombstones_below(horizon);
        for k in self.scan_keys(engine, &start, &end, TOMBSTONES_COLLECTED_PER_ENTRY.max(at_least))? {
            let Some((version, data_key)) = keys::parse_tombstone_by_version(&k) else {
                return Err(StorageFailure(TernError::Corruption("malformed tombstone index key".into())));
            };
            self.delete(k);
            if self.tombstone_version(engine, &data_key)? == Some(version) {
                self.delete(keys::tombstone_key(&data_key));
            }
        }
        Ok(())
    }

    /// The live (unexpired, checksum-verified) record at `key`: (expire_at_ms, value).
    pub(crate) fn live_record(&self, engine: &dyn KvEngine, key: &[u8], now_ms: u64) -> Result<Option<(u64, Vec<u8>)>, StorageFailure> {
        let Some(stored) = self.get(engine, key)? else { return Ok(None) };
        let (expire, value) = codec::decode_value(&stored).map_err(StorageFailure)?;
        if codec::is_expired(expire, now_ms) {
            return Ok(None);
        }
        Ok(Some((expire, value.to_vec())))
    }

    /// Applies one committed command and returns the client's answer. Errors that come from the
    /// request (wrong type, overflow) are answers: deterministic, no state change. A storage failure
    /// is not: the caller must stop the replica.
    pub fn apply_command(&mut self, engine: &dyn KvEngine, index: u64, data: &[u8]) -> Result<WriteResponse, StorageFailure> {
        let command = RaftCommand::decode(data).map_err(|e| StorageFailure(TernError::Corruption(format!("undecodable raft command: {e}"))))?;
        let response = self.apply_decoded(engine, index, command)?;
        self.record_effects(engine)?;
        Ok(response)
    }

    fn apply_decoded(&mut self, engine: &dyn KvEngine, index: u64, command: RaftCommand) -> Result<WriteResponse, StorageFailure> {
        // The log's clock: never behind an entry applied before (a new leader's clock may be), and
        // never more than STAMP_STEP_MS_MAX ahead of it in one entry (a leader whose clock runs far
        // ahead would otherwise expire every TTL'd record and remembered result at once, for good).
        let previous = self.state.stamp_ms;
        let now = if previous == 0 { command.now_unix_ms } else { command.now_unix_ms.clamp(previous, previous + STAMP_STEP_MS_MAX) };
        self.state.stamp_ms = now;
        self.entry = EntryContext { index, now, tag: command.cluster_tag & codec::CLUSTER_TAG_MAX, ..Default::default() };
        let Some(write) = command.write else {
            return Ok(error_response(TernError::invalid("raft command without a write")));
        };
        if write.client_id == 0 {
            return self.execute(engine, &write, now);
        }
        let mut session = self.session(engine, write.client_id)?;
        let key = keys::dedup_key(write.client_id, write.seq);
        if !session.bounded || session.max_seq.is_some_and(|max| write.seq <= max) {
            if let Some((_, remembered)) = self.live_record(engine, &key, now)? {
                return WriteResponse::decode(&remembered[..]).map_err(|e| StorageFailure(TernError::Corruption(format!("remembered result: {e}"))));
            }
        }
        // Results below the client's floor were forgotten: a request that old is a late duplicate of
        // one the client has finished with, and must not apply again.
        let floor = session.floor.filter(|(_, expire)| !codec::is_expired(*expire, now)).map_or(0, |(floor, _)| floor);
        if write.seq < floor {
            return Ok(error_response(TernError::ProposalDropped(format!(
                "request {} of client {} is older than its acknowledged sequence {floor}; ignored",
                write.seq, write.client_id
            ))));
        }
        let response = self.execute(engine, &write, now)?;
        let new_floor = write.first_incomplete_seq.min(write.seq).max(floor);
        // The floor moves, and forgotten results are removed, in chunks: one range tombstone and
        // one floor record per DEDUP_GC_CHUNK sequence numbers, not per write (thousands of
        // memtable range tombstones made every engine read re-fragment them: most of a server's
        // CPU under write load). Results at or above the stored floor are never removed, so a
        // request above it either has its result here or never applied.
        let (old_chunk, new_chunk) = (floor / DEDUP_GC_CHUNK, new_floor / DEDUP_GC_CHUNK);
        if new_chunk > old_chunk {
            let from = keys::dedup_key(write.client_id, old_chunk * DEDUP_GC_CHUNK);
            self.delete_range(from, keys::dedup_key(write.client_id, new_chunk * DEDUP_GC_CHUNK));
            let expire = now + DEDUP_RESULT_TTL_MS;
            self.put(keys::dedup_floor_key(write.client_id), codec::encode_value(expire, &new_floor.to_be_bytes()));
            session.floor = Some((new_floor, expire));
        }
        self.put(key, codec::encode_value(now + DEDUP_RESULT_TTL_MS, &response.encode_to_vec()));
        session.max_seq = session.max_seq.max(Some(write.seq));
        self.sessions.insert(write.client_id, session);
        Ok(response)
    }

    /// The client's session: begun with its floor read from the engine the first time (and after
    /// the sessions were forgotten), bounded the next time. Nothing of this client is in the batch
    /// when it begins (`apply_command` reads the session before it writes any of the client's
    /// records, and keeps it up to date after); results written since are in `max_seq`, the others
    /// in the engine when the bounding scan reads it.
    fn session(&mut self, engine: &dyn KvEngine, client_id: u64) -> Result<ClientSession, StorageFailure> {
        if let Some(session) = self.sessions.get_mut(&client_id) {
            if !session.bounded {
                let (start, end) = keys::dedup_range(client_id);
                let mut stored = None;
                engine
                    .scan_reverse(&start, &end, &mut |k, _| {
                        stored = keys::dedup_seq(k);
                        false
                    })
                    .map_err(|e| StorageFailure(engine_error(e)))?;
                session.max_seq = session.max_seq.max(stored);
                session.bounded = true;
            }
            return Ok(*session);
        }
        let floor = match self.get(engine, &keys::dedup_floor_key(client_id))? {
            None => None,
            Some(stored) => {
                let (expire, v) = codec::decode_value(&stored).map_err(StorageFailure)?;
                let floor = v.try_into().map_err(|_| StorageFailure(TernError::Corruption(format!("exactly-once floor of {} bytes", v.len()))))?;
                Some((u64::from_be_bytes(floor), expire))
            }
        };
        let session = ClientSession { max_seq: None, bounded: false, floor };
        self.sessions.insert(client_id, session);
        Ok(session)
    }

    /// If (hashkey, check_sortkey) passes the check, applies every mutation; answers whether it
    /// passed (and the checked value when asked). check_and_set is the one-mutation case.
    fn check_and_mutate(&mut self, engine: &dyn KvEngine, cam: &CheckAndMutate, now: u64) -> Result<WriteResponse, StorageFailure> {
        let current = self.live_record(engine, &keys::data_key(&cam.hashkey, &cam.check_sortkey), now)?;
        let passed = match CheckType::try_from(cam.check_type) {
            Ok(CheckType::NoCheck) => true,
            Ok(CheckType::ValueNotExist) => current.is_none(),
            Ok(CheckType::ValueExist) => current.is_some(),
            Ok(CheckType::ValueEqual) => current.as_ref().is_some_and(|(_, v)| v[..] == cam.check_operand[..]),
            Err(_) => return Ok(error_response(TernError::invalid(format!("unknown check type {}", cam.check_type)))),
        };
        let mut response = WriteResponse { set_done: passed, ..Default::default() };
        if cam.return_check_value {
            response.check_value_exists = current.is_some();
            response.check_value = current.map(|(_, v)| v.into()).unwrap_or_default();
        }
        if passed {
            for m in &cam.mutations {
                if m.delete {
                    self.delete_record(engine, &cam.hashkey, &m.sortkey)?;
                } else {
                    self.put_record(&cam.hashkey, &m.sortkey, codec::expiry(now, m.ttl_seconds, m.expire_at_ms), &m.value);
                }
            }
        }
        Ok(response)
    }

    /// Executes a write: request errors come back as error responses, storage failures as `Err`.
    fn execute(&mut self, engine: &dyn KvEngine, write: &WriteRequest, now: u64) -> Result<WriteResponse, StorageFailure> {
        let mut response = WriteResponse::default();
        // A write routed before the partition split, for a hashkey it no longer owns: the same
        // answer on every replica, and nothing written (the child has the hashkey now).
        let hashkey = match &write.op {
            Some(Op::Set(o)) => Some(&o.hashkey),
            Some(Op::Del(o)) => Some(&o.hashkey),
            Some(Op::Incr(o)) => Some(&o.hashkey),
            Some(Op::CheckAndSet(o)) => Some(&o.hashkey),
            Some(Op::CheckAndMutate(o)) => Some(&o.hashkey),
            Some(Op::DupApply(o)) => o.records.iter().map(|r| &r.hashkey).find(|h| !self.owner().owns(h)),
            _ => None,
        };
        if let Some(Err(e)) = hashkey.map(|h| self.owner().check(h)) {
            return Ok(error_response(e));
        }
        if let Some(Op::Redis(redis)) = &write.op {
            if let Err(e) = crate::redis::check_keys(self.owner(), redis.commands.iter().map(|c| &c.args[..])) {
                return Ok(error_response(e));
            }
        }
        match &write.op {
            None => return Ok(error_response(TernError::invalid("write request without an operation"))),
            Some(Op::Set(set)) => {
                for v in &set.values {
                    self.put_record(&set.hashkey, &v.sortkey, codec::expiry(now, v.ttl_seconds, v.expire_at_ms), &v.value);
                }
            }
            Some(Op::Del(del)) => {
                for sortkey in &del.sortkeys {
                    let key = keys::data_key(&del.hashkey, sortkey);
                    if self.live_record(engine, &key, now)?.is_some() {
                        response.count += 1;
                    }
                    self.delete_record(engine, &del.hashkey, sortkey)?;
                }
            }
            Some(Op::Incr(incr)) => {
                let key = keys::data_key(&incr.hashkey, &incr.sortkey);
                let (old, old_expire) = match self.live_record(engine, &key, now)? {
                    None => (0, 0),
                    Some((expire, v)) => match parse_integer(&v) {
                        Ok(i) => (i, expire),
                        Err(e) => return Ok(error_response(e)),
                    },
                };
                let Some(new) = old.checked_add(incr.delta) else {
                    return Ok(error_response(TernError::invalid(format!("incr of {old} by {} overflows a signed 64-bit integer", incr.delta))));
                };
                let expire = if incr.ttl_seconds > 0 { codec::expiry_from_ttl(now, incr.ttl_seconds) } else { old_expire };
                self.put_record(&incr.hashkey, &incr.sortkey, expire, new.to_string().as_bytes());
                response.new_value = new;
            }
            Some(Op::CheckAndSet(cas)) => {
                let cam = CheckAndMutate {
                    hashkey: cas.hashkey.clone(),
                    check_sortkey: cas.check_sortkey.clone(),
                    check_type: cas.check_type,
                    check_operand: cas.check_operand.clone(),
                    mutations: vec![Mutation {
                        sortkey: cas.set_sortkey.clone(),
                        delete: cas.set_delete,
                        value: cas.set_value.clone(),
                        ttl_seconds: cas.set_ttl_seconds,
                        expire_at_ms: cas.set_expire_at_ms,
                    }],
                    return_check_value: cas.return_check_value,
                };
                return self.check_and_mutate(engine, &cam, now);
            }
            Some(Op::CheckAndMutate(cam)) => return self.check_and_mutate(engine, cam, now),
            Some(Op::DupApply(apply)) => return self.dup_apply(engine, apply, now),
            Some(Op::DupSync(sync)) => return self.dup_sync(engine, sync),
            Some(Op::DupConfirm(confirm)) => return self.dup_confirm(engine, confirm),
            Some(Op::Split(split)) => return Ok(self.split(split)),
            Some(Op::Redis(redis)) => {
                // Randomness (SPOP and the like) drawn from the entry: the same on every replica.
                let seed = self.entry.index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ now;
                response.redis_reply = crate::redis::apply_write(self, engine, redis, now, seed)?.into();
            }
            Some(Op::Flush(flush)) => {
                let count = self.state.partition_count;
                if count != 0 && flush.partition_count != count {
                    return Ok(error_response(TernError::PartitionSplit {
                        partition_count: count,
                        message: format!("the flush was addressed to a table of {} partitions; it has {count} now", flush.partition_count),
                    }));
                }
                if self.recording() {
                    return Ok(error_response(TernError::invalid(
                        "a table with duplications cannot be flushed (a range delete leaves nothing for duplication to ship); remove its duplications first",
                    )));
                }
                self.delete_range(vec![keys::DATA_PREFIX], keys::data_end());
            }
        }
        Ok(response)
    }
}

/// The highest version stored for a data key, expired or not: its value's or its tombstone's.
fn stored_version<E: From<TernError>>(get: impl Fn(&[u8]) -> Result<Option<Vec<u8>>, E>, data_key: &[u8]) -> Result<u64, E> {
    let value = match get(data_key)? {
        Some(stored) => codec::decode_stored(&stored)?.version,
        None => 0,
    };
    let tombstone = match get(&keys::tombstone_key(data_key))? {
        Some(v) => decode_tombstone(v)?,
        None => 0,
    };
    Ok(value.max(tombstone))
}

/// A tombstone's stored value: a stored value with no data, only its version (checksummed like
/// every stored value: a damaged one is a storage failure, never a wrong version).
pub fn encode_tombstone(version: u64) -> Vec<u8> {
    codec::encode_versioned(0, version, &[])
}

pub fn decode_tombstone(v: Vec<u8>) -> Result<u64, TernError> {
    Ok(codec::decode_stored(&v)?.version)
}

/// Integers are stored as decimal text (like Redis and Pegasus), so `get` shows them readably.
pub fn parse_integer(value: &[u8]) -> Result<i64, TernError> {
    if value.is_empty() {
        return Ok(0);
    }
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| TernError::WrongType("value is not an integer or out of range".into()))
}

pub fn error_response(e: TernError) -> WriteResponse {
    WriteResponse { error: Some(e.into()), ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_engine::MemoryEngine;
    use tern_proto::{Incr, MultiDel, MultiSet, SortkeyValue};

    fn command(now: u64, client_id: u64, seq: u64, op: Op) -> Vec<u8> {
        RaftCommand {
            now_unix_ms: now,
            write: Some(WriteRequest { client_id, seq, first_incomplete_seq: seq, op: Some(op), ..Default::default() }),
            cluster_tag: 1,
        }
        .encode_to_vec()
    }

    fn set(hk: &str, sk: &str, v: &str, ttl: u32) -> Op {
        Op::Set(MultiSet {
            hashkey: hk.as_bytes().to_vec().into(),
            values: vec![SortkeyValue {
                sortkey: sk.as_bytes().to_vec().into(),
                value: v.as_bytes().to_vec().into(),
                ttl_seconds: ttl,
                expire_at_ms: 0,
            }],
        })
    }

    fn incr(delta: i64) -> Op {
        Op::Incr(Incr { hashkey: "h".into(), sortkey: "n".into(), delta, ttl_seconds: 0 })
    }

    fn apply(sm: &mut StateMachine, index: u64, data: Vec<u8>) -> WriteResponse {
        let mut batch = sm.begin();
        let r = batch.apply_command(sm.engine(), index, &data).unwrap();
        batch.set_applied(index, 1);
        sm.finish(batch).unwrap();
        r
    }

    /// An engine sync, started and waited for as the replica does over its ticks.
    fn sync(sm: &StateMachine) {
        let pending = sm.begin_sync().unwrap().expect("the memory engine always starts one");
        while !sm.sync_finished(&pending).unwrap() {}
    }

    fn open() -> StateMachine {
        StateMachine::open(Box::new(MemoryEngine::new()), ApplyState::default()).unwrap()
    }

    /// A hashkey of partition `want` of `count` (and its index of 2 * count is `want + count`).
    fn hashkey_moving_to(want: u32, count: u32) -> String {
        (0..).map(|i| format!("k{i}")).find(|k| codec::partition_of(k.as_bytes(), 2 * count) == want + count).expect("some key moves")
    }

    /// A split entry: from it on, the partition owns half its hashkeys, on every replica alike;
    /// writes routed by the old count for the other half are refused and change nothing; a
    /// repeated split is a no-op, a wrong one refused, one in a joint configuration refused until
    /// it ends; a retry of a write applied before the split still gets its first answer.
    #[test]
    fn a_split_entry_halves_what_the_partition_owns() {
        let mut sm = open();
        sm.set_owner(0, 2).unwrap();
        assert_eq!(sm.owner(), Owner { partition: 0, count: 0 }, "an empty replica takes no count from meta");
        let mut legacy = StateMachine::open(Box::new(MemoryEngine::new()), ApplyState { applied_index: 5, ..Default::default() }).unwrap();
        legacy.set_owner(1, 2).unwrap();
        assert_eq!(legacy.owner(), Owner { partition: 1, count: 2 }, "a state from before splits takes meta's");
        let mut sm =
            StateMachine::open(Box::new(MemoryEngine::new()), ApplyState { applied_index: 5, partition_count: 2, ..Default::default() }).unwrap();
        sm.set_owner(0, 8).unwrap();
        assert_eq!(sm.owner(), Owner { partition: 0, count: 2 });
        let moving = hashkey_moving_to(0, 2);
        let split = |count| Op::Split(tern_proto::Split { partition_count: count });
        // Applied before the split, remembered for its retry.
        assert!(apply(&mut sm, 6, command(1000, 7, 1, set(&moving, "s", "before", 0))).error.is_none());
        assert!(apply(&mut sm, 7, command(1000, 0, 0, split(8))).error.is_some(), "only doubling");
        let mut batch = sm.begin();
        assert!(batch.apply_command(sm.engine(), 8, &command(1000, 0, 0, split(4))).unwrap().error.is_none());
        assert_eq!(batch.take_split(), Some(4));
        batch.set_applied(8, 1);
        sm.finish(batch).unwrap();
        assert_eq!(sm.owner(), Owner { partition: 0, count: 4 });
        let mut batch = sm.begin();
        assert!(batch.apply_command(sm.engine(), 9, &command(1000, 0, 0, split(4))).unwrap().error.is_none(), "a repeat");
        assert_eq!(batch.take_split(), None, "a repeat splits nothing");
        batch.set_applied(9, 1);
        sm.finish(batch).unwrap();
        let r = apply(&mut sm, 10, command(1000, 7, 2, set(&moving, "s", "after", 0)));
        assert!(matches!(tern_proto::check(&r.error), Err(TernError::PartitionSplit { partition_count: 4, .. })), "{r:?}");
        let stored = sm.engine().get(&keys::data_key(moving.as_bytes(), b"s")).unwrap().unwrap();
        assert_eq!(codec::decode_value(&stored).unwrap().1, b"before", "the refused write changed nothing");
        let r = apply(&mut sm, 11, command(1000, 7, 1, set(&moving, "s", "before", 0)));
        assert!(r.error.is_none(), "a retry of a write applied before the split gets its first answer");
        // A joint configuration refuses a split, the same way everywhere.
        let mut joint =
            StateMachine::open(Box::new(MemoryEngine::new()), ApplyState { applied_index: 5, partition_count: 2, ..Default::default() }).unwrap();
        let mut batch = joint.begin();
        let mut cs = ConfState::default();
        cs.voters = vec![1, 2, 3];
        cs.voters_outgoing = vec![1, 2, 4];
        batch.set_conf_state(cs);
        let r = batch.apply_command(joint.engine(), 6, &command(1000, 0, 0, split(4))).unwrap();
        assert!(matches!(tern_proto::check(&r.error), Err(TernError::Busy(_))));
        assert_eq!(batch.take_split(), None);
    }

    fn redis(args: &[&str]) -> Op {
        let args = args.iter().map(|a| bytes::Bytes::copy_from_slice(a.as_bytes())).collect();
        Op::Redis(tern_proto::RedisWrite { commands: vec![tern_proto::RedisCommand { args }], transaction: false })
    }

    /// Redis commands apply as one entry (exactly once when retried), see the batch's own earlier
    /// writes, and are refused whole after a split: sent where their first key no longer lives,
    /// with PartitionSplit (the client goes on to the child); with a first key still here but
    /// another gone, with CROSSSLOT (no retry mends it). A flush addressed before the split is
    /// refused too.
    #[test]
    fn redis_commands_apply_once_and_respect_a_split() {
        let reply = |r: &WriteResponse| tern_redis::Reply::from_wire(&r.redis_reply).unwrap_or_else(|| panic!("a reply: {r:?}"));
        // A key partition 0 owns before and after the split.
        let l = (0..).map(|i| format!("l{i}")).find(|k| codec::partition_of(k.as_bytes(), 4) == 0).unwrap();
        let l = l.as_str();
        let mut sm =
            StateMachine::open(Box::new(MemoryEngine::new()), ApplyState { applied_index: 5, partition_count: 2, ..Default::default() }).unwrap();
        let mut batch = sm.begin();
        let first = batch.apply_command(sm.engine(), 6, &command(1000, 7, 1, redis(&["RPUSH", l, "a", "b"]))).unwrap();
        let second = batch.apply_command(sm.engine(), 7, &command(1000, 7, 2, redis(&["LPOP", l]))).unwrap();
        batch.set_applied(7, 1);
        sm.finish(batch).unwrap();
        assert_eq!(reply(&first), tern_redis::Reply::Int(2));
        assert_eq!(reply(&second), tern_redis::Reply::bulk("a"), "the second entry saw the first in the same batch");
        let retried = apply(&mut sm, 8, command(1000, 7, 1, redis(&["RPUSH", l, "a", "b"])));
        assert_eq!(reply(&retried), tern_redis::Reply::Int(2), "a retry gets its first answer");
        let r = apply(&mut sm, 9, command(1000, 7, 3, redis(&["LLEN", l])));
        assert_eq!(reply(&r), tern_redis::Reply::Int(1), "and applied once");

        assert!(apply(&mut sm, 10, command(1000, 0, 0, Op::Split(tern_proto::Split { partition_count: 4 }))).error.is_none());
        let (moving, staying) =
            (hashkey_moving_to(0, 2), (0..).map(|i| format!("s{i}")).find(|k| codec::partition_of(k.as_bytes(), 4) == 0).unwrap());
        let r = apply(&mut sm, 11, command(1000, 7, 4, redis(&["RENAME", &moving, &staying])));
        assert!(matches!(tern_proto::check(&r.error), Err(TernError::PartitionSplit { partition_count: 4, .. })), "{r:?}");
        let r = apply(&mut sm, 12, command(1000, 7, 5, redis(&["RENAME", &staying, &moving])));
        assert!(matches!(tern_proto::check(&r.error), Err(TernError::InvalidArgument(m)) if m.starts_with("CROSSSLOT")), "{r:?}");
        let r = apply(&mut sm, 13, command(1000, 0, 0, Op::Flush(tern_proto::Flush { partition_count: 2 })));
        assert!(matches!(tern_proto::check(&r.error), Err(TernError::PartitionSplit { .. })), "{r:?}");
        let r = apply(&mut sm, 14, command(1000, 0, 0, Op::Flush(tern_proto::Flush { partition_count: 4 })));
        assert!(r.error.is_none());
        let r = apply(&mut sm, 15, command(1000, 7, 6, redis(&["EXISTS", l])));
        assert_eq!(reply(&r), tern_redis::Reply::Int(0), "flushed");
    }

    /// A retried write with the same (client, seq) returns the first result and applies once.
    #[test]
    fn dedup_makes_incr_exactly_once() {
        let mut sm = open();
        assert_eq!(apply(&mut sm, 1, command(1000, 7, 1, incr(5))).new_value, 5);
        assert_eq!(apply(&mut sm, 2, command(1000, 7, 1, incr(5))).new_value, 5, "retry answered from memory");
        assert_eq!(apply(&mut sm, 3, command(1000, 7, 2, incr(5))).new_value, 10, "next seq applies");
        assert_eq!(apply(&mut sm, 4, command(1000, 0, 0, incr(1))).new_value, 11, "client 0 opts out");
        assert_eq!(apply(&mut sm, 5, command(1000, 0, 0, incr(1))).new_value, 12);
    }

    /// Sessions are a cache of the engine: a retry is answered alike whether its client's session
    /// is known or read again, a new request numbered below one applied still applies, a floor read
    /// back refuses late duplicates, and clients past SESSIONS_MAX are forgotten, not lost.
    #[test]
    fn sessions_agree_with_the_engine() {
        let mut sm = open();
        assert_eq!(apply(&mut sm, 1, command(1000, 7, 10, incr(1))).new_value, 1);
        assert_eq!(apply(&mut sm, 2, command(1000, 7, 7, incr(1))).new_value, 2, "a lower new seq applies");
        sm.sessions.clear();
        assert_eq!(apply(&mut sm, 3, command(1000, 7, 7, incr(1))).new_value, 2, "a retry, the session read from the engine");
        assert_eq!(apply(&mut sm, 4, command(1000, 7, 10, incr(1))).new_value, 1);
        assert_eq!(apply(&mut sm, 5, command(1000, 7, 11, incr(1))).new_value, 3);

        apply(&mut sm, 6, command(1000, 9, DEDUP_GC_CHUNK + 1, incr(1)));
        sm.sessions.clear();
        let late = apply(&mut sm, 7, command(1000, 9, 1, incr(1)));
        assert_eq!(late.error.unwrap().code, tern_proto::ErrorCode::ProposalDropped as i32, "the floor read back from the engine");

        // Begun, written, bounded and retried within one batch: the bound counts the batch's write.
        let mut batch = sm.begin();
        let in_batch =
            |batch: &mut ApplyBatch, sm: &StateMachine, seq| batch.apply_command(sm.engine(), 0, &command(1000, 5, seq, incr(1))).unwrap().new_value;
        let first = in_batch(&mut batch, &sm, 3);
        assert_eq!(in_batch(&mut batch, &sm, 2), first + 1, "a lower new seq applies");
        assert_eq!(in_batch(&mut batch, &sm, 3), first, "a retry of the batch's write is answered");
        batch.set_applied(8, 1);
        sm.finish(batch).unwrap();
        assert_eq!(apply(&mut sm, 9, command(1000, 5, 3, incr(1))).new_value, first);

        let clients = SESSIONS_MAX as u64 + 2;
        let mut batch = sm.begin();
        for c in 0..clients {
            batch.apply_command(sm.engine(), 0, &command(1000, 100 + c, 1, incr(1))).unwrap();
        }
        batch.set_applied(10, 1);
        sm.finish(batch).unwrap();
        assert_eq!(sm.sessions.len(), clients as usize + 2);
        assert_eq!(apply(&mut sm, 11, command(1000, 100, 1, incr(1))).new_value, 7, "answered from the engine");
        assert_eq!(sm.sessions.len(), 1, "the others were forgotten");
        assert_eq!(apply(&mut sm, 12, command(1000, 0, 0, incr(0))).new_value, 6 + clients as i64);
    }

    /// check_and_mutate applies all of its sets and deletes when the check passes, none when it
    /// fails, and answers with the checked value either way.
    #[test]
    fn check_and_mutate_is_all_or_nothing() {
        use tern_proto::{CheckAndMutate, Mutation};
        let mut sm = open();
        apply(&mut sm, 1, command(1000, 0, 0, set("h", "old", "x", 0)));
        let cam = |operand: &str| {
            Op::CheckAndMutate(CheckAndMutate {
                hashkey: "h".into(),
                check_sortkey: "v".into(),
                check_type: CheckType::ValueEqual as i32,
                check_operand: operand.as_bytes().to_vec().into(),
                mutations: vec![
                    Mutation { sortkey: "v".into(), value: "2".into(), ..Default::default() },
                    Mutation { sortkey: "t".into(), value: "ttl".into(), ttl_seconds: 10, ..Default::default() },
                    Mutation { sortkey: "old".into(), delete: true, ..Default::default() },
                ],
                return_check_value: true,
            })
        };
        let r = apply(&mut sm, 2, command(1000, 0, 0, cam("1")));
        assert!(!r.set_done && !r.check_value_exists);
        assert_eq!((sm_get(&sm, "v"), sm_get(&sm, "old")), (None, Some(b"x".to_vec())), "a failed check changes nothing");
        apply(&mut sm, 3, command(1000, 0, 0, set("h", "v", "1", 0)));
        let r = apply(&mut sm, 4, command(1000, 0, 0, cam("1")));
        assert!(r.set_done && r.check_value_exists);
        assert_eq!(r.check_value, b"1".to_vec());
        assert_eq!((sm_get(&sm, "v"), sm_get(&sm, "t"), sm_get(&sm, "old")), (Some(b"2".to_vec()), Some(b"ttl".to_vec()), None));
        let (expire, _) = codec::decode_value(&sm.engine().get(&keys::data_key(b"h", b"t")).unwrap().unwrap()).unwrap();
        assert_eq!(expire, 11_000, "a mutation's TTL counts from the entry's stamp");
    }

    /// The value stored at ("h", sortkey), expired or not.
    fn sm_get(sm: &StateMachine, sortkey: &str) -> Option<Vec<u8>> {
        let stored = sm.engine().get(&keys::data_key(b"h", sortkey.as_bytes())).unwrap()?;
        Some(codec::decode_value(&stored).unwrap().1.to_vec())
    }

    /// Remembered results below the client's first incomplete seq are forgotten, and a late duplicate
    /// of a forgotten request is refused instead of applied again.
    #[test]
    fn dedup_results_are_garbage_collected() {
        let mut sm = open();
        apply(&mut sm, 1, command(1000, 7, 1, incr(1)));
        apply(&mut sm, 2, command(1000, 7, 2, incr(1)));
        let late = apply(&mut sm, 3, command(1000, 7, 1, incr(1)));
        assert_eq!(late.new_value, 1, "a remembered result still answers a duplicate below the floor until its chunk is collected");
        apply(&mut sm, 4, command(1000, 7, DEDUP_GC_CHUNK + 1, incr(1)));
        assert!(sm.engine().get(&keys::dedup_key(7, 2)).unwrap().is_none(), "seqs below the floor's chunk are forgotten");
        assert!(sm.engine().get(&keys::dedup_key(7, DEDUP_GC_CHUNK + 1)).unwrap().is_some());
        let late = apply(&mut sm, 5, command(1000, 7, 1, incr(1)));
        assert_eq!(late.error.unwrap().code, tern_proto::ErrorCode::ProposalDropped as i32);
        assert_eq!(apply(&mut sm, 6, command(1000, 0, 0, incr(0))).new_value, 3, "the late duplicate did not apply");
    }

    /// Remembered results expire by the leader's clock, deterministically.
    #[test]
    fn dedup_results_expire() {
        let mut sm = open();
        apply(&mut sm, 1, command(1000, 7, 1, incr(1)));
        let later = 1000 + DEDUP_RESULT_TTL_MS + 1;
        assert_eq!(apply(&mut sm, 2, command(later, 7, 1, incr(1))).new_value, 2);
    }

    /// incr on a non-integer is a typed error and changes nothing; overflow is rejected.
    #[test]
    fn incr_type_errors() {
        let mut sm = open();
        apply(&mut sm, 1, command(1000, 0, 0, set("h", "n", "abc", 0)));
        let r = apply(&mut sm, 2, command(1000, 0, 0, incr(1)));
        assert_eq!(r.error.unwrap().code, tern_proto::ErrorCode::WrongType as i32);
        apply(&mut sm, 3, command(1000, 0, 0, set("h", "n", &i64::MAX.to_string(), 0)));
        let r = apply(&mut sm, 4, command(1000, 0, 0, incr(1)));
        assert_eq!(r.error.unwrap().code, tern_proto::ErrorCode::InvalidArgument as i32);
    }

    /// Expired records count as absent at apply time (incr restarts from 0, delete counts 0).
    #[test]
    fn ttl_at_apply_time() {
        let mut sm = open();
        apply(&mut sm, 1, command(1000, 0, 0, set("h", "n", "41", 1)));
        assert_eq!(apply(&mut sm, 2, command(1500, 0, 0, incr(1))).new_value, 42, "live at 1.5s, TTL kept");
        assert_eq!(apply(&mut sm, 3, command(2500, 0, 0, incr(1))).new_value, 1, "expired at 2.5s");
        apply(&mut sm, 4, command(3000, 0, 0, set("h", "x", "v", 1)));
        let del = Op::Del(MultiDel { hashkey: "h".into(), sortkeys: vec!["x".into()] });
        assert_eq!(apply(&mut sm, 5, command(9000, 0, 0, del)).count, 0);
    }

    /// Later commands in one batch see the writes of earlier ones.
    #[test]
    fn batch_reads_its_own_writes() {
        let mut sm = open();
        let mut batch = sm.begin();
        batch.apply_command(sm.engine(), 0, &command(1000, 0, 0, incr(2))).unwrap();
        let r = batch.apply_command(sm.engine(), 0, &command(1000, 0, 0, incr(3))).unwrap();
        assert_eq!(r.new_value, 5);
        batch.set_applied(1, 1);
        sm.finish(batch).unwrap();
        assert_eq!(sm.state().applied_index, 1);
    }

    /// Time as the log sees it never goes backwards: an entry stamped by a leader whose clock is
    /// behind its predecessor's applies at the newest time already applied, so a record that expired
    /// stays expired (without the clamp, the incr below would find 41 alive again and answer 42).
    #[test]
    fn log_clock_never_goes_backwards() {
        let mut sm = open();
        apply(&mut sm, 1, command(1000, 0, 0, set("h", "n", "41", 1)));
        let del = Op::Del(MultiDel { hashkey: "h".into(), sortkeys: vec!["other".into()] });
        apply(&mut sm, 2, command(2500, 0, 0, del));
        assert_eq!(sm.state().stamp_ms, 2500);
        assert_eq!(apply(&mut sm, 3, command(1500, 0, 0, incr(1))).new_value, 1, "expired at 2500 stays expired");
        assert_eq!(sm.state().stamp_ms, 2500, "the older stamp did not move the clock back");
        let ten_years = 10 * 365 * 24 * STAMP_STEP_MS_MAX;
        apply(&mut sm, 4, command(ten_years, 0, 0, incr(1)));
        assert_eq!(sm.state().stamp_ms, 2500 + STAMP_STEP_MS_MAX, "a clock far ahead moves the log's clock one step only");
    }

    /// Compaction expires records only up to the applied log's clock, never by the machine's: a
    /// replica replaying old entries keeps what those entries still need.
    #[test]
    fn compaction_expires_by_the_applied_log() {
        let factory = tern_engine::MemoryEngineFactory::new(Some(keys::is_expired_record));
        let dir = tempfile::tempdir().unwrap();
        use tern_engine::EngineFactory as _;
        let mut sm = StateMachine::open(factory.open(dir.path()).unwrap(), ApplyState::default()).unwrap();
        apply(&mut sm, 1, command(1000, 0, 0, set("h", "n", "41", 1)));
        sync(&sm);
        sm.engine().compact_all().unwrap();
        assert!(sm.engine().get(&keys::data_key(b"h", b"n")).unwrap().is_some(), "alive at the log's time 1000");
        assert_eq!(apply(&mut sm, 2, command(1500, 0, 0, incr(1))).new_value, 42);
        // Expired records stay TOMBSTONE_RETAIN_MS past their version's time (the version horizon).
        let elsewhere = Op::Del(MultiDel { hashkey: "other".into(), sortkeys: vec!["x".into()] });
        apply(&mut sm, 3, command(9000, 0, 0, elsewhere.clone()));
        sync(&sm);
        sm.engine().compact_all().unwrap();
        assert!(sm.engine().get(&keys::data_key(b"h", b"n")).unwrap().is_some(), "expired, but its version is not below the horizon");
        let later = 9000 + TOMBSTONE_RETAIN_MS;
        apply(&mut sm, 4, command(later, 0, 0, elsewhere));
        sm.engine().compact_all().unwrap();
        assert!(sm.engine().get(&keys::data_key(b"h", b"n")).is_ok_and(|v| v.is_some()), "not before the log's later time is durable");
        sync(&sm);
        sm.engine().compact_all().unwrap();
        assert!(sm.engine().get(&keys::data_key(b"h", b"n")).unwrap().is_none(), "expired by the log's time, below the horizon, synced");
    }

    /// After a split, compaction drops the other half's records, but only once the split is
    /// durable: a crash before would replay entries before the split that may still read them.
    #[test]
    fn compaction_drops_the_other_half_once_the_split_is_durable() {
        let factory = tern_engine::MemoryEngineFactory::new(Some(keys::is_expired_record));
        let dir = tempfile::tempdir().unwrap();
        use tern_engine::EngineFactory as _;
        let initial = ApplyState { applied_index: 5, partition_count: 2, ..Default::default() };
        let mut sm = StateMachine::open(factory.open(dir.path()).unwrap(), initial).unwrap();
        sm.set_owner(0, 2).unwrap();
        let moving = hashkey_moving_to(0, 2);
        let staying = (0..).map(|i| format!("s{i}")).find(|k| codec::partition_of(k.as_bytes(), 4) == 0).unwrap();
        apply(&mut sm, 6, command(1000, 0, 0, set(&moving, "s", "v", 0)));
        apply(&mut sm, 7, command(1000, 0, 0, set(&staying, "s", "v", 0)));
        sync(&sm);
        sm.engine().compact_all().unwrap();
        let stored = |sm: &StateMachine, hk: &str| sm.engine().get(&keys::data_key(hk.as_bytes(), b"s")).unwrap().is_some();
        assert!(stored(&sm, &moving) && stored(&sm, &staying));
        apply(&mut sm, 8, command(1000, 0, 0, Op::Split(tern_proto::Split { partition_count: 4 })));
        sm.engine().compact_all().unwrap();
        assert!(stored(&sm, &moving), "not before the split is durable");
        sync(&sm);
        sm.engine().compact_all().unwrap();
        assert!(!stored(&sm, &moving), "the other half's record is gone");
        assert!(stored(&sm, &staying), "its own stays");
    }

    /// A storage failure while applying (here a stored value whose checksum does not match) is not
    /// an answer: apply reports it so the replica stops, instead of answering an error and moving on
    /// without the write its peers applied.
    #[test]
    fn storage_failure_is_not_an_answer() {
        let mut sm = open();
        apply(&mut sm, 1, command(1000, 0, 0, set("h", "n", "41", 0)));
        let mut stored = sm.engine().get(&keys::data_key(b"h", b"n")).unwrap().unwrap();
        *stored.last_mut().unwrap() ^= 0xff;
        let mut wb = WriteBatch::default();
        wb.put(keys::data_key(b"h", b"n"), stored);
        sm.engine().write(wb).unwrap();
        let mut batch = sm.begin();
        let r = batch.apply_command(sm.engine(), 0, &command(1000, 0, 0, incr(1)));
        assert!(matches!(r, Err(StorageFailure(TernError::Corruption(_)))), "{r:?}");
        let r = batch.apply_command(sm.engine(), 0, &[0x12, 0x05, 0x01]); // a field cut short
        assert!(matches!(r, Err(StorageFailure(TernError::Corruption(_)))), "{r:?}");
    }

    /// Sequence number u64::MAX is a request like any other: its result does not collide with the
    /// client's floor record.
    #[test]
    fn largest_sequence_number_has_its_own_result() {
        let mut sm = open();
        apply(&mut sm, 1, command(1000, 7, 1, incr(1)));
        apply(&mut sm, 2, command(1000, 7, DEDUP_GC_CHUNK + 1, incr(1)));
        assert!(sm.engine().get(&keys::dedup_floor_key(7)).unwrap().is_some(), "a floor is stored");
        assert_eq!(apply(&mut sm, 3, command(1000, 7, u64::MAX, incr(1))).new_value, 3);
        assert_eq!(apply(&mut sm, 4, command(1000, 7, u64::MAX, incr(1))).new_value, 3, "its retry is answered from memory");
        assert_eq!(apply(&mut sm, 5, command(1000, 0, 0, incr(0))).new_value, 3);
    }

    /// A batch sees its own range deletes: a late duplicate whose remembered result a floor move
    /// earlier in the batch removed is refused, exactly as when the two land in separate batches.
    #[test]
    fn batch_sees_its_own_range_deletes() {
        let answers = |one_batch: bool| {
            let mut sm = open();
            apply(&mut sm, 1, command(1000, 7, 1, incr(1)));
            let moves_floor = command(1000, 7, DEDUP_GC_CHUNK + 1, incr(1));
            let late = command(1000, 7, 1, incr(1));
            if one_batch {
                let mut batch = sm.begin();
                batch.apply_command(sm.engine(), 0, &moves_floor).unwrap();
                let r = batch.apply_command(sm.engine(), 0, &late).unwrap();
                batch.set_applied(2, 1);
                sm.finish(batch).unwrap();
                r
            } else {
                apply(&mut sm, 2, moves_floor);
                apply(&mut sm, 3, late)
            }
        };
        assert_eq!(answers(true), answers(false));
        assert!(answers(true).error.is_some(), "refused as older than the floor");
    }

    /// The apply state survives reopening.
    #[test]
    fn apply_state_round_trip() {
        let mut cs = ConfState::default();
        cs.voters = vec![1, 2, 3];
        let s = ApplyState { applied_index: 9, applied_term: 4, conf_state: cs, stamp_ms: 77, hlc: 88 << 20, partition_count: 16 };
        assert_eq!(ApplyState::decode(&s.encode()).unwrap(), s);
        assert!(ApplyState::decode(&[1, 2]).is_err());
        let mut damaged = s.encode();
        damaged[20] ^= 1;
        assert!(ApplyState::decode(&damaged).is_err(), "a flipped bit is caught by the checksum");
        // The first encoding (no format byte, no clock) still reads, with the clock at zero.
        let mut v1 = Vec::new();
        for w in [s.applied_index, s.applied_term, s.stamp_ms] {
            v1.extend_from_slice(&w.to_be_bytes());
        }
        v1.extend_from_slice(&protobuf::Message::write_to_bytes(&s.conf_state).unwrap());
        v1.extend_from_slice(&crc32fast::hash(&v1).to_be_bytes());
        assert_eq!(ApplyState::decode(&v1).unwrap(), ApplyState { hlc: 0, partition_count: 0, ..s.clone() });
        // The second (a clock, no partition count) reads with the count at zero.
        let mut v2 = vec![APPLY_STATE_V2_FORMAT];
        for w in [s.applied_index, s.applied_term, s.stamp_ms, s.hlc] {
            v2.extend_from_slice(&w.to_be_bytes());
        }
        v2.extend_from_slice(&protobuf::Message::write_to_bytes(&s.conf_state).unwrap());
        v2.extend_from_slice(&crc32fast::hash(&v2).to_be_bytes());
        assert_eq!(ApplyState::decode(&v2).unwrap(), ApplyState { partition_count: 0, ..s });
    }

    fn stored(sm: &StateMachine, hk: &str, sk: &str) -> Option<(u64, Vec<u8>)> {
        let v = sm.engine().get(&keys::data_key(hk.as_bytes(), sk.as_bytes())).unwrap()?;
        let s = codec::decode_stored(&v).unwrap();
        Some((s.version, s.value.to_vec()))
    }

    fn dup_record(hk: &str, sk: &str, value: Option<&str>, version: u64) -> DupRecord {
        DupRecord {
            hashkey: hk.as_bytes().to_vec().into(),
            sortkey: sk.as_bytes().to_vec().into(),
            value: value.unwrap_or_default().as_bytes().to_vec().into(),
            expire_at_ms: 0,
            version,
            delete: value.is_none(),
        }
    }

    fn dup_apply(origin_index: u64, records: Vec<DupRecord>, watermark: u64) -> Op {
        Op::DupApply(DupApply { origin_tag: 2, origin_index, records, watermark, source_table: 9 })
    }

    fn version(ms: u64, logical: u64, tag: u64) -> u64 {
        (ms << codec::VERSION_MS_SHIFT) | (logical << codec::VERSION_TAG_BITS) | tag
    }

    /// The change-log entries some duplication still needs (those below go in chunks).
    fn change_log(sm: &StateMachine) -> Vec<(u64, DupLogEntry)> {
        let keep_from = sm.dup_state().dups.iter().map(|d| if d.full_copy { d.full_copy_since } else { d.confirmed_index } + 1).min();
        let mut out = Vec::new();
        sm.engine()
            .scan(&keys::change_log_key(keep_from.unwrap_or(0)), Some(&keys::change_log_end()), &mut |k, v| {
                out.push((keys::change_log_index(k).unwrap(), DupLogEntry::decode(codec::decode_value(v).unwrap().1).unwrap()));
                true
            })
            .unwrap();
        out
    }

    /// Every write carries a version from the partition's hybrid logical clock: the entry's time,
    /// one logical step per entry within a millisecond, the leader's cluster tag, and past every
    /// version received from another cluster.
    #[test]
    fn versions_follow_the_hybrid_logical_clock() {
        let mut sm = open();
        apply(&mut sm, 1, command(1000, 0, 0, set("h", "a", "1", 0)));
        apply(&mut sm, 2, command(1000, 0, 0, set("h", "b", "1", 0)));
        apply(&mut sm, 3, command(900, 0, 0, incr(1)));
        assert_eq!(stored(&sm, "h", "a").unwrap().0, version(1000, 0, 1));
        assert_eq!(stored(&sm, "h", "b").unwrap().0, version(1000, 1, 1), "a logical step within one millisecond");
        assert_eq!(stored(&sm, "h", "n").unwrap().0, version(1000, 2, 1), "a stamp behind the clock still moves it forward");
        apply(&mut sm, 4, command(1001, 0, 0, dup_apply(0, vec![dup_record("h", "r", Some("x"), version(5000, 7, 2))], 0)));
        apply(&mut sm, 5, command(1002, 0, 0, set("h", "c", "1", 0)));
        assert_eq!(stored(&sm, "h", "c").unwrap().0, version(5000, 8, 1), "past the version received");
    }

    /// Duplicated records apply only if newer than what is stored (a live value or a tombstone),
    /// ties going to the higher cluster tag, and a redelivered batch changes nothing.
    #[test]
    fn duplicated_records_last_writer_wins() {
        let mut sm = open();
        apply(&mut sm, 1, command(2000, 0, 0, set("h", "a", "local", 0)));
        let local = stored(&sm, "h", "a").unwrap().0;
        let r = apply(&mut sm, 2, command(2001, 0, 0, dup_apply(1, vec![dup_record("h", "a", Some("older"), version(1999, 0, 2))], 0)));
        assert_eq!((r.count, stored(&sm, "h", "a").unwrap().1), (0, b"local".to_vec()), "older loses");
        let tie = local - 1 + 2; // same time, higher tag
        apply(&mut sm, 3, command(2001, 0, 0, dup_apply(2, vec![dup_record("h", "a", Some("tie"), tie)], 0)));
        assert_eq!(stored(&sm, "h", "a").unwrap(), (tie, b"tie".to_vec()), "a tie goes to the higher tag");
        apply(&mut sm, 4, command(2001, 0, 0, dup_apply(3, vec![dup_record("h", "a", None, version(3000, 0, 2))], 0)));
        assert_eq!(stored(&sm, "h", "a"), None, "a newer delete removes it");
        let r = apply(&mut sm, 5, command(2001, 0, 0, dup_apply(4, vec![dup_record("h", "a", Some("between"), version(2500, 0, 2))], 0)));
        assert_eq!((r.count, stored(&sm, "h", "a")), (0, None), "its tombstone beats an older write");
        // The origin says it delivered everything of its own up to 3000 ms: its records at or below
        // that are stale copies, skipped; a record of this cluster's own coming back too.
        apply(&mut sm, 6, command(2001, 0, 0, dup_apply(5, vec![], version(3000, 0, 2))));
        let stale = vec![dup_record("h", "z", Some("stale"), version(2800, 0, 2)), dup_record("h", "y", Some("mine"), version(9000, 0, 1))];
        let r = apply(&mut sm, 7, command(2001, 0, 0, dup_apply(4, stale, 0)));
        assert_eq!((r.count, stored(&sm, "h", "z"), stored(&sm, "h", "y")), (0, None, None));
        let r = apply(&mut sm, 8, command(2001, 0, 0, dup_apply(4, vec![dup_record("h", "z", Some("new"), version(3001, 0, 2))], 0)));
        assert_eq!(r.count, 1, "a batch numbered below the last is not skipped whole: its new records apply");
        assert_eq!(sm.dup_state().origins, vec![OriginProgress { tag: 2, applied_index: 5, watermark: version(3000, 0, 2), source_table: 9 }]);
        assert!(change_log(&sm).is_empty(), "nothing is recorded without duplications");
    }

    /// With duplications, every write's effects (incr as its result, deletes as tombstones) go into
    /// the change log and duplicated records do not; confirmations collect the log, and a
    /// duplication further behind than the log holds switches to a full copy.
    #[test]
    fn change_log_records_effects_until_confirmed() {
        let mut sm = open();
        apply(&mut sm, 1, command(1000, 0, 0, set("h", "before", "x", 0)));
        let sync = |ids: Vec<u64>| Op::DupSync(DupSync { dup_ids: ids, log_entries_max: 5 });
        apply(&mut sm, 2, command(1000, 0, 0, sync(vec![7])));
        let d = &sm.dup_state().dups[0];
        assert!(d.full_copy && d.full_copy_since == 2 && d.confirmed_index == 2, "a new duplication starts with a full copy: {d:?}");
        apply(&mut sm, 3, command(1000, 0, 0, incr(5)));
        apply(&mut sm, 4, command(1000, 0, 0, Op::Del(MultiDel { hashkey: "h".into(), sortkeys: vec!["before".into()] })));
        apply(&mut sm, 5, command(1000, 0, 0, dup_apply(1, vec![dup_record("h", "remote", Some("r"), version(900, 0, 2))], 0)));
        let log = change_log(&sm);
        assert_eq!(log.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![3, 4], "duplicated records are not recorded");
        assert_eq!(log[0].1.records[0].value, b"5".to_vec(), "incr travels as its result");
        assert!(log[1].1.records[0].delete);
        let tombstone = log[1].1.records[0].version;
        assert!(sm.engine().get(&keys::tombstone_key(&keys::data_key(b"h", b"before"))).unwrap().is_some());

        let confirm = |index, full_copy_done| Op::DupConfirm(DupConfirm { dup_id: 7, index, version: 0, full_copy_done });
        apply(&mut sm, 6, command(1000, 0, 0, confirm(4, false)));
        assert!(sm.dup_state().dups[0].full_copy, "a change-log confirmation does not end a full copy");
        apply(&mut sm, 7, command(1000, 0, 0, confirm(1, true)));
        assert!(sm.dup_state().dups[0].full_copy, "a full copy from before the duplication began does not count");
        apply(&mut sm, 8, command(1000, 0, 0, confirm(3, true)));
        assert_eq!(sm.dup_state().dups[0].confirmed_index, 3);
        assert_eq!(change_log(&sm).iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![4], "entries up to the copy are collected");
        let r = apply(&mut sm, 9, command(1000, 0, 0, Op::DupConfirm(DupConfirm { dup_id: 7, index: 4, version: tombstone, full_copy_done: false })));
        assert!(r.set_done);
        assert!(change_log(&sm).is_empty());

        for i in 10..20 {
            apply(&mut sm, i, command(1000, 0, 0, incr(1)));
        }
        let d = &sm.dup_state().dups[0];
        // More than 5 entries past its confirmed 4 at entry 10: a full copy from 10 on; more than 5
        // past that at 16, with no copy delivered: from 16 on (a copy never delivered does not hold
        // the log either).
        assert!(d.full_copy && d.full_copy_since == 16, "{d:?}");
        assert_eq!(change_log(&sm).first().map(|(i, _)| *i), Some(17), "the log no longer holds what the copy covers");
        apply(&mut sm, 20, command(1000, 0, 0, sync(vec![])));
        assert!(change_log(&sm).is_empty() && sm.dup_state().dups.is_empty(), "no duplication: no change log");
        apply(&mut sm, 21, command(1000, 0, 0, incr(1)));
        assert!(change_log(&sm).is_empty());
    }

    /// Tombstones go once every duplication has delivered them, every origin has delivered its
    /// writes up to them, and TOMBSTONE_RETAIN_MS has passed, never earlier; replicas agree on it.
    #[test]
    fn tombstones_are_collected_by_the_log() {
        let mut sm = open();
        apply(&mut sm, 1, command(1000, 0, 0, Op::DupSync(DupSync { dup_ids: vec![7], log_entries_max: 0 })));
        apply(&mut sm, 2, command(1000, 0, 0, set("h", "a", "x", 0)));
        apply(&mut sm, 3, command(1000, 0, 0, Op::Del(MultiDel { hashkey: "h".into(), sortkeys: vec!["a".into()] })));
        let tombstone_key = keys::tombstone_key(&keys::data_key(b"h", b"a"));
        let tombstone = decode_tombstone(sm.engine().get(&tombstone_key).unwrap().unwrap()).unwrap();
        apply(&mut sm, 4, command(1000, 0, 0, Op::DupConfirm(DupConfirm { dup_id: 7, index: 3, version: tombstone, full_copy_done: true })));
        apply(&mut sm, 5, command(1000, 0, 0, dup_apply(1, vec![], tombstone)));
        let later = 1000 + TOMBSTONE_RETAIN_MS;
        apply(&mut sm, 6, command(later, 0, 0, dup_apply(2, vec![], tombstone + 1)));
        assert!(sm.engine().get(&tombstone_key).unwrap().is_some(), "its version must be below the horizon, which it equals");
        apply(&mut sm, 7, command(later, 0, 0, Op::DupConfirm(DupConfirm { dup_id: 7, index: 6, version: tombstone + 1, full_copy_done: false })));
        assert!(sm.engine().get(&tombstone_key).unwrap().is_some(), "kept for TOMBSTONE_RETAIN_MS");
        apply(&mut sm, 8, command(later + 1, 0, 0, dup_apply(3, vec![], tombstone + 1)));
        assert!(sm.engine().get(&tombstone_key).unwrap().is_none(), "delivered both ways and old enough: collected");
        let (start, end) = keys::tombstones_below(u64::MAX);
        let mut left = 0;
        sm.engine()
            .scan(&start, Some(&end), &mut |_, _| {
                left += 1;
                true
            })
            .unwrap();
        assert_eq!(left, 0, "and its entry in version order");
    }
}
