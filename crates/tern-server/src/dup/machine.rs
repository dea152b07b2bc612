//! One partition's duplication shipper without I/O: told what happened, it answers what to do
//! next (`Action`). The server runs it on tokio (`super::DupShipper`), the simulator in virtual
//! time over its simulated network; both drive this same code.
//!
//! A round: read the replicated duplication state; bring it in line with meta's duplications
//! (`DupSync`) or, for each duplication, either ship the change log after its delivered position
//! (`DupApply` batches, then `DupConfirm` through raft) or, when it needs one, a full copy of the
//! partition's own records from a checkpoint (then a `DupConfirm` of the checkpoint's index). A
//! failure pauses that duplication for RETRY_PAUSE_MS; losing leadership ends the shipper.

use std::collections::{BTreeMap, HashMap, VecDeque};
use tern_core::{codec, GroupId, TernError};
use tern_engine::KvEngine;
use tern_proto::*;
use tern_raft::keys;
use tern_raft::store::DupLogRead;

/// Change-log entries, and bytes of them, one read takes (one read is shipped as one or more
/// batches, then confirmed).
pub const READ_ENTRIES_MAX: usize = 1024;
pub const READ_BYTES_MAX: usize = 2 << 20;
/// One shipped batch holds at most this many records and about this many bytes (one entry more
/// if it alone is larger: a single write is within the write limits the remote checks).
const BATCH_RECORDS_MAX: usize = 5000;
const BATCH_BYTES_MAX: usize = 1 << 20;
/// How long an idle shipper waits before it looks for new entries.
pub const IDLE_POLL_MS: u64 = 100;
/// After a failure, how long a shipper waits before trying that duplication again.
pub const RETRY_PAUSE_MS: u64 = 1000;
/// An idle partition tells the remote its clock (that everything of its own up to it is
/// delivered) at most this often, so the remote can collect tombstones.
const WATERMARK_INTERVAL_MS: u64 = 5000;

/// What a partition's shipper does next.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Bring the replicated duplication set in line with meta's.
    Sync(DupSync),
    /// Nothing is duplicated here any more: the task ends.
    Stop,
    /// Work on each of these duplications in order (a paused one only reports its progress).
    Ship(Vec<(Duplication, DupProgress)>),
}

/// Decides the next step from the partition's replicated duplication state and meta's
/// duplications of its table.
pub fn plan(state: &PartitionDupState, wanted: &[Duplication]) -> Step {
    let mut ids: Vec<u64> = wanted.iter().map(|d| d.id).collect();
    ids.sort_unstable();
    let have: Vec<u64> = state.dups.iter().map(|d| d.dup_id).collect();
    let log_entries_max = wanted.iter().map(|d| d.log_entries_max).max().unwrap_or(0);
    if ids != have || (!ids.is_empty() && state.log_entries_max != log_entries_max) {
        return Step::Sync(DupSync { dup_ids: ids, log_entries_max });
    }
    if ids.is_empty() {
        return Step::Stop;
    }
    let work = wanted.iter().filter_map(|d| state.dups.iter().find(|p| p.dup_id == d.id).map(|p| (d.clone(), *p))).collect();
    Step::Ship(work)
}

fn record_bytes(r: &DupRecord) -> usize {
    r.hashkey.len() + r.sortkey.len() + r.value.len() + 32
}

/// Splits change-log entries into batches for the remote, each within BATCH_RECORDS_MAX and
/// BATCH_BYTES_MAX (an entry larger than that is split over several). A batch carries the index
/// and clock of the last entry it holds whole (none: 0, and the remote takes no watermark from
/// it): once applied, the remote skips this partition's records at or below that clock when they
/// come again (a read after a lost answer or a new leader may cut batches differently).
pub fn batches(entries: &[(u64, DupLogEntry)], origin_tag: u32, source_table: u32) -> Vec<DupApply> {
    let new = || DupApply { origin_tag, source_table, ..Default::default() };
    let mut out: Vec<DupApply> = Vec::new();
    let mut current = new();
    let mut bytes = 0usize;
    for (index, entry) in entries {
        for r in &entry.records {
            let size = record_bytes(r);
            if !current.records.is_empty() && (current.records.len() >= BATCH_RECORDS_MAX || bytes + size > BATCH_BYTES_MAX) {
                out.push(std::mem::replace(&mut current, new()));
                bytes = 0;
            }
            current.records.push(r.clone());
            bytes += size;
        }
        current.origin_index = *index;
        current.watermark = entry.hlc;
    }
    if current.origin_index != 0 || !current.records.is_empty() {
        out.push(current);
    }
    out
}

/// What a full copy ships from a checkpoint to the cluster tagged `dest_tag`: every record and
/// tombstone but those that cluster wrote itself (it holds them, or what replaced them), and but
/// expired records that count as absent here (below the checkpoint's version horizon); in batches
/// as `batches` bounds them. Returns the records read.
pub fn copy_records(engine: &dyn KvEngine, dest_tag: u32, emit: &mut dyn FnMut(Vec<DupRecord>) -> Result<(), TernError>) -> Result<u64, TernError> {
    let (state, dup) = tern_raft::apply::replicated_state(engine)?;
    let horizon = tern_raft::apply::version_horizon(&dup, &state);
    let keep = |r: &DupRecord| {
        let absent = !r.delete && tern_raft::apply::counts_as_absent(r.expire_at_ms, r.version, state.stamp_ms, horizon);
        codec::version_tag(r.version) != dest_tag && !absent
    };
    engine_records(engine, &keep, true, emit)
}

/// Reads the user records (and, with `tombstones`, the tombstones) of an engine as duplicated
/// records whose version `keep` accepts, in batches as `batches` bounds them; `emit` takes each
/// (an error stops the scan). Records of format 1 (no version) get the smallest version there is
/// with cluster tag 0, so any write with a version wins over them. Returns the records read.
pub fn engine_records(
    engine: &dyn KvEngine,
    keep: &dyn Fn(&DupRecord) -> bool,
    tombstones: bool,
    emit: &mut dyn FnMut(Vec<DupRecord>) -> Result<(), TernError>,
) -> Result<u64, TernError> {
    let mut batch: Vec<DupRecord> = Vec::new();
    let mut bytes = 0usize;
    let mut count = 0u64;
    let mut failure = None;
    let mut take = |r: DupRecord, batch: &mut Vec<DupRecord>, bytes: &mut usize| -> Result<(), TernError> {
        if !keep(&r) {
            return Ok(());
        }
        let size = record_bytes(&r);
        if !batch.is_empty() && (batch.len() >= BATCH_RECORDS_MAX || *bytes + size > BATCH_BYTES_MAX) {
            emit(std::mem::take(batch))?;
            *bytes = 0;
        }
        *bytes += size;
        batch.push(r);
        count += 1;
        Ok(())
    };
    let mut visit = |k: &[u8], v: &[u8], batch: &mut Vec<DupRecord>, bytes: &mut usize| -> Result<(), TernError> {
        let record = if k.first() == Some(&keys::DATA_PREFIX) {
            let (hashkey, sortkey) = codec::decode_key(&k[1..])?;
            let s = codec::decode_stored(v)?;
            DupRecord {
                hashkey: hashkey.to_vec().into(),
                sortkey: sortkey.to_vec().into(),
                value: s.value.to_vec().into(),
                expire_at_ms: s.expire_at_ms,
                version: if s.version == 0 { 1 << codec::VERSION_TAG_BITS } else { s.version },
                delete: false,
            }
        } else {
            let data_key = keys::data_key_of_tombstone(k).ok_or_else(|| TernError::Corruption("malformed tombstone key".into()))?;
            let (hashkey, sortkey) = codec::decode_key(&data_key[1..])?;
            let version = tern_raft::apply::decode_tombstone(v.to_vec())?;
            DupRecord { hashkey: hashkey.to_vec().into(), sortkey: sortkey.to_vec().into(), version, delete: true, ..Default::default() }
        };
        take(record, batch, bytes)
    };
    let mut ranges = vec![(vec![keys::DATA_PREFIX], keys::data_end())];
    if tombstones {
        ranges.push(keys::tombstone_range());
    }
    for (start, end) in ranges {
        engine
            .scan(&start, Some(&end), &mut |k, v| match visit(k, v, &mut batch, &mut bytes) {
                Ok(()) => true,
                Err(e) => {
                    failure = Some(e);
                    false
                }
            })
            .map_err(tern_raft::apply::engine_error)?;
        if let Some(e) = failure.take() {
            return Err(e);
        }
    }
    if !batch.is_empty() {
        emit(batch)?;
    }
    Ok(count)
}

/// What the driver does next for a partition's shipper, and which `on_*` it reports to.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Read the partition's duplication state (a change-log read of no entries): `on_state`.
    ReadState,
    /// Read the change log after `after` (READ_ENTRIES_MAX, READ_BYTES_MAX): `on_log`.
    ReadLog { after: u64 },
    /// Propose on the partition and wait for it to apply: `on_proposed`.
    Propose(write_request::Op),
    /// Apply a batch on the same partition of the duplication's remote table: `on_sent`.
    Send { dup: Duplication, apply: DupApply },
    /// Checkpoint the partition at or after `min_applied_index` and check that the remote table
    /// has as many partitions: `on_copy_begun` with the checkpoint's index.
    BeginCopy { dup: Duplication, min_applied_index: u64 },
    /// The checkpoint's next batch of the partition's own records and tombstones (those whose
    /// version carries this cluster's tag, or none), or its end: `on_copy_batch`.
    CopyNext,
    /// Wait this long, then `on_wake`.
    Wait { ms: u64 },
    /// Not the leader any more, or nothing left to duplicate.
    Stop,
}

struct Current {
    dup: Duplication,
    progress: DupProgress,
    work: Work,
}

enum Work {
    /// Batches left to send, then the confirmation (none for a watermark alone).
    Log {
        batches: VecDeque<DupApply>,
        confirm: Option<DupConfirm>,
        watermark: u64,
    },
    Copy {
        checkpoint_index: u64,
    },
}

pub struct PartitionShipper {
    group: GroupId,
    tag: u32,
    partition_count: u32,
    applied_index: u64,
    hlc: u64,
    round: VecDeque<(Duplication, DupProgress)>,
    current: Option<Current>,
    /// Shipped or confirmed something this round (another round follows at once).
    busy: bool,
    retry_at: HashMap<u64, u64>,
    /// The watermark last sent to each duplication, and when.
    watermark_sent: HashMap<u64, (u64, u64)>,
    statuses: BTreeMap<u64, DupPartitionStatus>,
}

impl PartitionShipper {
    pub fn new(group: GroupId, tag: u32) -> PartitionShipper {
        PartitionShipper {
            group,
            tag,
            partition_count: 0,
            applied_index: 0,
            hlc: 0,
            round: VecDeque::new(),
            current: None,
            busy: false,
            retry_at: HashMap::new(),
            watermark_sent: HashMap::new(),
            statuses: BTreeMap::new(),
        }
    }

    pub fn start(&self) -> Action {
        Action::ReadState
    }

    /// The duplication a full copy is under way for, if one is.
    pub fn copying(&self) -> Option<u64> {
        self.current.as_ref().filter(|c| matches!(c.work, Work::Copy { .. })).map(|c| c.dup.id)
    }

    /// The partition count of the table, as of the last read (what a remote table must have).
    pub fn partition_count(&self) -> u32 {
        self.partition_count
    }

    /// Progress of each duplication of this partition, for meta.
    pub fn statuses(&self) -> impl Iterator<Item = &DupPartitionStatus> {
        self.statuses.values()
    }

    fn status(&mut self, dup_id: u64) -> &mut DupPartitionStatus {
        let (table_id, partition) = (self.group.table_id(), self.group.partition());
        self.statuses.entry(dup_id).or_insert_with(|| DupPartitionStatus { dup_id, table_id, partition, ..Default::default() })
    }

    /// The duplication worked on failed: it waits RETRY_PAUSE_MS; the round goes on.
    fn fail(&mut self, now_ms: u64, e: TernError) -> Action {
        if let Some(c) = self.current.take() {
            self.retry_at.insert(c.dup.id, now_ms + RETRY_PAUSE_MS);
            self.status(c.dup.id).error = e.to_string();
        }
        self.next(now_ms)
    }

    /// The next duplication of the round, or the next round.
    fn next(&mut self, now_ms: u64) -> Action {
        while let Some((dup, progress)) = self.round.pop_front() {
            if dup.paused {
                let applied = self.applied_index;
                let s = self.status(dup.id);
                s.confirmed_index = progress.confirmed_index;
                s.full_copy = progress.full_copy;
                s.lag_entries = applied.saturating_sub(if progress.full_copy { progress.full_copy_since } else { progress.confirmed_index });
                s.error.clear();
                continue;
            }
            if self.retry_at.get(&dup.id).is_some_and(|t| now_ms < *t) {
                continue;
            }
            if progress.full_copy {
                let min_applied_index = self.applied_index.max(progress.full_copy_since);
                let applied = self.applied_index;
                let s = self.status(dup.id);
                s.full_copy = true;
                s.confirmed_index = progress.confirmed_index;
                s.lag_entries = applied.saturating_sub(progress.full_copy_since);
                self.current = Some(Current { dup: dup.clone(), progress, work: Work::Copy { checkpoint_index: 0 } });
                return Action::BeginCopy { dup, min_applied_index };
            }
            let after = progress.confirmed_index;
            self.current = Some(Current { dup, progress, work: Work::Log { batches: VecDeque::new(), confirm: None, watermark: 0 } });
            return Action::ReadLog { after };
        }
        if std::mem::take(&mut self.busy) {
            Action::ReadState
        } else {
            Action::Wait { ms: IDLE_POLL_MS }
        }
    }

    /// The partition's duplication state, and meta's duplications of its table.
    pub fn on_state(&mut self, now_ms: u64, read: Result<DupLogRead, TernError>, wanted: &[Duplication]) -> Action {
        let Ok(read) = read else { return Action::Stop }; // not the leader any more
        self.partition_count = read.partition_count;
        self.applied_index = read.applied_index;
        self.hlc = read.hlc;
        self.current = None;
        match plan(&read.state, wanted) {
            Step::Stop => Action::Stop,
            Step::Sync(sync) => Action::Propose(write_request::Op::DupSync(sync)),
            Step::Ship(work) => {
                self.statuses.retain(|id, _| wanted.iter().any(|d| d.id == *id));
                self.round = work.into();
                self.next(now_ms)
            }
        }
    }

    pub fn on_wake(&mut self) -> Action {
        Action::ReadState
    }

    /// The change log after the delivered position.
    pub fn on_log(&mut self, now_ms: u64, read: Result<DupLogRead, TernError>) -> Action {
        let read = match read {
            Ok(r) => r,
            Err(e) => return self.fail(now_ms, e),
        };
        let Some(current) = self.current.as_mut() else { return self.next(now_ms) };
        let (dup_id, confirmed) = (current.dup.id, current.progress.confirmed_index);
        // The duplication moved on since the round read its state (another duplication's work
        // came first): a full copy now, or a position confirmed meanwhile. Plan again.
        let moved = read.state.dups.iter().find(|d| d.dup_id == dup_id).is_none_or(|d| d.full_copy || d.confirmed_index != confirmed);
        if moved {
            self.current = None;
            self.round.clear();
            return Action::ReadState;
        }
        let first_version = read.entries.iter().flat_map(|(_, e)| e.records.first()).map(|r| r.version).next();
        let s = self.status(dup_id);
        s.confirmed_index = confirmed;
        // Writes not delivered yet (counted exactly up to one read's worth; past it, every raft
        // entry since the delivered position, an upper bound).
        s.lag_entries = if read.entries.len() < READ_ENTRIES_MAX { read.entries.len() as u64 } else { read.applied_index.saturating_sub(confirmed) };
        s.lag_ms = first_version.map_or(0, |v| now_ms.saturating_sub(codec::version_ms(v)));
        s.full_copy = false;
        let tag = self.tag;
        let current = self.current.as_mut().expect("checked");
        if read.entries.is_empty() {
            // Everything of this partition's own is delivered: its clock is the remote's watermark.
            let due = self.watermark_sent.get(&dup_id).is_none_or(|(w, at)| read.hlc > *w && now_ms >= at + WATERMARK_INTERVAL_MS);
            if !due {
                self.current = None;
                return self.next(now_ms);
            }
            let apply = DupApply { origin_tag: tag, origin_index: 0, records: vec![], watermark: read.hlc, source_table: self.group.table_id() };
            current.work = Work::Log { batches: VecDeque::new(), confirm: None, watermark: read.hlc };
            return Action::Send { dup: current.dup.clone(), apply };
        }
        let (last_index, last_hlc) = read.entries.last().map(|(i, e)| (*i, e.hlc)).expect("not empty");
        let mut queue: VecDeque<DupApply> = batches(&read.entries, tag, self.group.table_id()).into();
        let first = queue.pop_front().expect("entries make one batch at least");
        let confirm = DupConfirm { dup_id, index: last_index, version: last_hlc, full_copy_done: false };
        current.work = Work::Log { batches: queue, confirm: Some(confirm), watermark: 0 };
        Action::Send { dup: current.dup.clone(), apply: first }
    }

    /// A batch was applied on the remote (or failed to be).
    pub fn on_sent(&mut self, now_ms: u64, sent: Result<(), TernError>) -> Action {
        if let Err(e) = sent {
            return self.fail(now_ms, e);
        }
        let Some(current) = self.current.as_mut() else { return self.next(now_ms) };
        match &mut current.work {
            Work::Copy { .. } => Action::CopyNext,
            Work::Log { batches, confirm, watermark } => {
                if let Some(apply) = batches.pop_front() {
                    return Action::Send { dup: current.dup.clone(), apply };
                }
                match *confirm {
                    Some(confirm) => Action::Propose(write_request::Op::DupConfirm(confirm)),
                    None => {
                        let (dup_id, w) = (current.dup.id, *watermark);
                        self.watermark_sent.insert(dup_id, (w, now_ms));
                        self.current = None;
                        self.next(now_ms)
                    }
                }
            }
        }
    }

    /// A proposal (a sync, or the confirmation of what was shipped) applied (or failed).
    pub fn on_proposed(&mut self, now_ms: u64, proposed: Result<(), TernError>) -> Action {
        let Some(current) = self.current.take() else {
            // A sync: read the state it made (or try again in a while).
            return if proposed.is_ok() { Action::ReadState } else { Action::Wait { ms: RETRY_PAUSE_MS } };
        };
        let dup_id = current.dup.id;
        self.current = Some(current);
        if let Err(e) = proposed {
            return self.fail(now_ms, e);
        }
        let current = self.current.take().expect("set above");
        let confirmed = match current.work {
            Work::Log { confirm, .. } => confirm.map_or(current.progress.confirmed_index, |c| c.index),
            Work::Copy { checkpoint_index } => checkpoint_index,
        };
        let s = self.status(dup_id);
        s.confirmed_index = confirmed;
        s.full_copy = false;
        s.error.clear();
        s.lag_entries = 0; // what was read is delivered; the next read says what came since
        self.retry_at.remove(&dup_id);
        self.busy = true;
        self.next(now_ms)
    }

    /// The checkpoint of a full copy is taken (at this index), or could not be.
    pub fn on_copy_begun(&mut self, now_ms: u64, begun: Result<u64, TernError>) -> Action {
        match begun {
            Err(e) => self.fail(now_ms, e),
            Ok(index) => match self.current.as_mut() {
                Some(Current { work: Work::Copy { checkpoint_index }, .. }) => {
                    *checkpoint_index = index;
                    Action::CopyNext
                }
                _ => self.next(now_ms),
            },
        }
    }

    /// The full copy's next batch, or its end.
    pub fn on_copy_batch(&mut self, now_ms: u64, batch: Result<Option<Vec<DupRecord>>, TernError>) -> Action {
        let batch = match batch {
            Ok(b) => b,
            Err(e) => return self.fail(now_ms, e),
        };
        let (tag, hlc, source_table) = (self.tag, self.hlc, self.group.table_id());
        let Some(current) = self.current.as_mut() else { return self.next(now_ms) };
        let Work::Copy { checkpoint_index } = current.work else { return self.next(now_ms) };
        match batch {
            Some(records) => {
                Action::Send { dup: current.dup.clone(), apply: DupApply { origin_tag: tag, origin_index: 0, records, watermark: 0, source_table } }
            }
            // Everything up to the checkpoint is delivered; the change log holds what came after.
            // The clock read before the checkpoint bounds the versions of what the copy held of
            // this partition's own writes from below: a safe (low) confirmed version.
            None => Action::Propose(write_request::Op::DupConfirm(DupConfirm {
                dup_id: current.dup.id,
                index: checkpoint_index,
                version: hlc,
                full_copy_done: true,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dup(id: u64, paused: bool) -> Duplication {
        Duplication { id, log_entries_max: 1000, paused, ..Default::default() }
    }

    fn progress(id: u64) -> DupProgress {
        DupProgress { dup_id: id, ..Default::default() }
    }

    /// The replicated set follows meta's; once it does, every duplication not paused is worked on,
    /// and a partition with none left stops.
    #[test]
    fn plan_follows_meta() {
        let empty = PartitionDupState::default();
        assert_eq!(plan(&empty, &[]), Step::Stop);
        assert_eq!(plan(&empty, &[dup(2, false), dup(1, false)]), Step::Sync(DupSync { dup_ids: vec![1, 2], log_entries_max: 1000 }));
        let state = PartitionDupState { dups: vec![progress(1), progress(2)], log_entries_max: 1000, ..Default::default() };
        assert_eq!(plan(&state, &[dup(1, false), dup(2, true)]), Step::Ship(vec![(dup(1, false), progress(1)), (dup(2, true), progress(2))]));
        assert_eq!(plan(&state, &[dup(1, false)]), Step::Sync(DupSync { dup_ids: vec![1], log_entries_max: 1000 }));
        assert_eq!(plan(&state, &[]), Step::Sync(DupSync { dup_ids: vec![], log_entries_max: 0 }));
        let mut bigger = dup(1, false);
        bigger.log_entries_max = 5000;
        assert_eq!(plan(&state, &[bigger, dup(2, false)]), Step::Sync(DupSync { dup_ids: vec![1, 2], log_entries_max: 5000 }));
    }

    fn entry(records: usize, hlc: u64) -> DupLogEntry {
        let r = DupRecord { hashkey: "h".into(), sortkey: "s".into(), value: vec![0u8; 100].into(), version: 1, ..Default::default() };
        DupLogEntry { records: vec![r; records], hlc }
    }

    /// Batches hold whole entries within the bounds (a larger entry alone), and carry the index and
    /// clock of their last entry.
    #[test]
    fn batches_are_bounded_and_ordered() {
        let entries = vec![(5, entry(3000, 50)), (6, entry(3000, 60)), (9, entry(0, 90)), (12, entry(12000, 120))];
        let b = batches(&entries, 7, 3);
        // Full batches of 5000: each names the last entry it holds whole (none: 0).
        assert_eq!(
            b.iter().map(|a| (a.records.len(), a.origin_index, a.watermark)).collect::<Vec<_>>(),
            vec![(5000, 5, 50), (5000, 9, 90), (5000, 0, 0), (3000, 12, 120)]
        );
        assert!(b.iter().all(|a| a.origin_tag == 7 && a.source_table == 3));
        assert!(batches(&[], 7, 3).is_empty());
        assert_eq!(batches(&[(3, entry(0, 30))], 7, 3).len(), 1, "an entry whose records were all superseded still moves the position");
        let big = DupRecord { hashkey: "h".into(), sortkey: "s".into(), value: vec![0u8; 700_000].into(), version: 1, ..Default::default() };
        let b = batches(&[(4, DupLogEntry { records: vec![big; 3], hlc: 40 })], 7, 3);
        assert_eq!(b.iter().map(|a| (a.records.len(), a.origin_index)).collect::<Vec<_>>(), vec![(1, 0), (1, 0), (1, 4)], "bytes bound a batch too");
    }

    fn read(state: PartitionDupState, applied_index: u64, entries: Vec<(u64, DupLogEntry)>) -> Result<DupLogRead, TernError> {
        Ok(DupLogRead { applied_index, hlc: 500, stamp_ms: 0, partition_count: 4, state, entries })
    }

    /// A shipper's whole life on one partition: sync, a full copy, change-log batches confirmed,
    /// a watermark when idle, a failed send paused and retried, and the end of its leadership.
    #[test]
    fn shipper_walks_through_copy_log_and_failures() {
        let group = GroupId::new(1, 2);
        let mut m = PartitionShipper::new(group, 7);
        assert_eq!(m.start(), Action::ReadState);
        let wanted = [dup(9, false)];
        let sync = m.on_state(0, read(PartitionDupState::default(), 10, vec![]), &wanted);
        assert_eq!(sync, Action::Propose(write_request::Op::DupSync(DupSync { dup_ids: vec![9], log_entries_max: 1000 })));
        assert_eq!(m.on_proposed(0, Ok(())), Action::ReadState);

        let copying = DupProgress { dup_id: 9, confirmed_index: 11, full_copy: true, full_copy_since: 11, ..Default::default() };
        let state = PartitionDupState { dups: vec![copying], log_entries_max: 1000, ..Default::default() };
        assert_eq!(m.on_state(0, read(state, 12, vec![]), &wanted), Action::BeginCopy { dup: dup(9, false), min_applied_index: 12 });
        assert!(m.statuses().next().unwrap().full_copy);
        assert_eq!(m.on_copy_begun(0, Ok(13)), Action::CopyNext);
        let records = entry(2, 0).records;
        let send = m.on_copy_batch(0, Ok(Some(records.clone())));
        assert_eq!(
            send,
            Action::Send { dup: dup(9, false), apply: DupApply { origin_tag: 7, origin_index: 0, records, watermark: 0, source_table: 1 } }
        );
        assert_eq!(m.on_sent(0, Ok(())), Action::CopyNext);
        let confirm = DupConfirm { dup_id: 9, index: 13, version: 500, full_copy_done: true };
        assert_eq!(m.on_copy_batch(0, Ok(None)), Action::Propose(write_request::Op::DupConfirm(confirm)));
        assert_eq!(m.on_proposed(0, Ok(())), Action::ReadState, "busy: another round at once");
        assert_eq!(m.statuses().next().unwrap().confirmed_index, 13);

        let shipping = DupProgress { dup_id: 9, confirmed_index: 13, ..Default::default() };
        let state = PartitionDupState { dups: vec![shipping], log_entries_max: 1000, ..Default::default() };
        assert_eq!(m.on_state(1000, read(state.clone(), 20, vec![]), &wanted), Action::ReadLog { after: 13 });
        let Action::Send { apply, .. } = m.on_log(1000, read(state.clone(), 20, vec![(15, entry(1, 150)), (17, entry(1, 170))])) else { panic!() };
        assert_eq!((apply.origin_index, apply.watermark, apply.records.len()), (17, 170, 2));
        let confirm = DupConfirm { dup_id: 9, index: 17, version: 170, full_copy_done: false };
        assert_eq!(m.on_sent(1000, Ok(())), Action::Propose(write_request::Op::DupConfirm(confirm)));
        assert_eq!(m.on_proposed(1000, Ok(())), Action::ReadState);

        // Idle: the clock goes to the remote as a watermark, then not again until it moves and
        // WATERMARK_INTERVAL_MS has passed.
        assert_eq!(m.on_state(2000, read(state.clone(), 20, vec![]), &wanted), Action::ReadLog { after: 13 });
        let Action::Send { apply, .. } = m.on_log(2000, read(state.clone(), 20, vec![])) else { panic!() };
        assert_eq!((apply.origin_index, apply.watermark, apply.records.len()), (0, 500, 0));
        assert_eq!(m.on_sent(2000, Ok(())), Action::Wait { ms: IDLE_POLL_MS });
        assert_eq!(m.on_wake(), Action::ReadState);
        m.on_state(2100, read(state.clone(), 20, vec![]), &wanted);
        assert_eq!(m.on_log(2100, read(state.clone(), 20, vec![])), Action::Wait { ms: IDLE_POLL_MS }, "no news for the remote");

        // A failed send: that duplication waits RETRY_PAUSE_MS, with the error in its status.
        m.on_state(3000, read(state.clone(), 20, vec![]), &wanted);
        m.on_log(3000, read(state.clone(), 20, vec![(18, entry(1, 180))]));
        assert_eq!(m.on_sent(3000, Err(TernError::Unavailable("remote down".into()))), Action::Wait { ms: IDLE_POLL_MS });
        assert!(m.statuses().next().unwrap().error.contains("remote down"));
        assert_eq!(m.on_state(3500, read(state.clone(), 20, vec![]), &wanted), Action::Wait { ms: IDLE_POLL_MS }, "still pausing");
        assert_eq!(m.on_state(3000 + RETRY_PAUSE_MS, read(state.clone(), 20, vec![]), &wanted), Action::ReadLog { after: 13 });

        assert_eq!(m.on_state(5000, Err(TernError::NotLeader { leader: None }), &wanted), Action::Stop, "no longer the leader");
    }
}
