//! The server's half of cross-cluster duplication (design: docs/design/duplication.md; the
//! replicated state and the change log are `tern_raft::apply`; administration is
//! `tern_client::dup`).
//!
//! The leader of each partition of a duplicated table runs a shipper task. It keeps the partition's
//! replicated duplication set equal to meta's (`DupSync`), and for each duplication that is not
//! paused either ships the change log after the delivered position to the same partition of the
//! remote table through the client library (`DupApply`, applied there if newer), then records the
//! new position through raft (`DupConfirm`); or, when the duplication is new or fell further behind
//! than the change log may hold, ships a full copy of the partition's own records from a
//! checkpoint and confirms the copy's index. A new leader resumes from the replicated position;
//! batches delivered twice change nothing (the remote skips a batch at or below the last one it
//! applied from this partition, and last-writer-wins makes the records themselves idempotent).
//!
//! What to do next is decided by `plan`, a pure function of the replicated state and meta's
//! duplications; the task only carries it out.

use crate::backup::{flush, WorkDir};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_client::{Client, ClientConfig};
use tern_core::{codec, GroupId, TernError};
use tern_engine::{EngineFactory, KvEngine};
use tern_proto::*;
use tern_raft::keys;
use tern_raft::store::{DupLogRead, StoreHandle, StoreMsg};
use tokio::sync::{mpsc, oneshot};

/// Change-log entries, and bytes of them, one read takes (one read is shipped as one or more
/// batches, then confirmed).
const READ_ENTRIES_MAX: usize = 1024;
const READ_BYTES_MAX: usize = 2 << 20;
/// One shipped batch holds at most this many records and about this many bytes (one entry more
/// if it alone is larger: a single write is within the write limits the remote checks).
const BATCH_RECORDS_MAX: usize = 5000;
const BATCH_BYTES_MAX: usize = 1 << 20;
/// How often an idle task looks for new entries.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// After a failure, how long a task waits before trying that duplication again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// An idle partition tells the remote its clock (that everything of its own up to it is
/// delivered) at most this often, so the remote can collect tombstones.
const WATERMARK_INTERVAL: Duration = Duration::from_secs(5);

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What a partition's shipper does next.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Bring the replicated duplication set in line with meta's.
    Sync(DupSync),
    /// Nothing is duplicated here any more: the task ends.
    Stop,
    /// Work on each of these duplications (not paused), in order.
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
    let work = wanted.iter().filter(|d| !d.paused).filter_map(|d| state.dups.iter().find(|p| p.dup_id == d.id).map(|p| (d.clone(), *p))).collect();
    Step::Ship(work)
}

/// Splits change-log entries into batches for the remote: whole entries, each batch within
/// BATCH_RECORDS_MAX and BATCH_BYTES_MAX unless one entry alone is larger; each batch carries the
/// index and clock of its last entry. Batches with no records (every record superseded here) are
/// kept only if last, so the position still moves.
pub fn batches(entries: &[(u64, DupLogEntry)], origin_tag: u32) -> Vec<DupApply> {
    let mut out: Vec<DupApply> = Vec::new();
    let mut current = DupApply { origin_tag, ..Default::default() };
    let mut bytes = 0usize;
    for (index, entry) in entries {
        let entry_bytes: usize = entry.records.iter().map(|r| r.hashkey.len() + r.sortkey.len() + r.value.len() + 32).sum();
        let full =
            !current.records.is_empty() && (current.records.len() + entry.records.len() > BATCH_RECORDS_MAX || bytes + entry_bytes > BATCH_BYTES_MAX);
        if full {
            out.push(std::mem::replace(&mut current, DupApply { origin_tag, ..Default::default() }));
            bytes = 0;
        }
        current.records.extend(entry.records.iter().cloned());
        current.origin_index = *index;
        current.watermark = entry.hlc;
        bytes += entry_bytes;
    }
    if current.origin_index != 0 {
        out.push(current);
    }
    out
}

/// Reads the user records (and, with `tombstones`, the tombstones) of an engine as duplicated
/// records whose version `keep` accepts, in batches as `batches` bounds them; `emit` takes each
/// (an error stops the scan). Records of format 1 (no version) get the smallest version there is
/// with cluster tag 0, so any write with a version wins over them. Returns the records read.
pub(crate) fn engine_records(
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
        let size = r.hashkey.len() + r.sortkey.len() + r.value.len() + 32;
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
            let version = u64::from_be_bytes(v.try_into().map_err(|_| TernError::Corruption(format!("tombstone of {} bytes", v.len())))?);
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

/// Runs the shipper tasks of the partitions this server leads.
#[derive(Clone)]
pub struct DupShipper {
    inner: Arc<Inner>,
}

struct Inner {
    store: StoreHandle,
    engines: Arc<dyn EngineFactory>,
    work_dir: PathBuf,
    cluster_id: Arc<AtomicU64>,
    /// Meta's duplications by table id, as of the last heartbeat.
    wanted: Mutex<HashMap<u32, Vec<Duplication>>>,
    /// Each running task's progress per duplication: reported to meta with every heartbeat.
    statuses: Mutex<HashMap<(GroupId, u64), DupPartitionStatus>>,
    running: Mutex<HashMap<GroupId, tokio::task::JoinHandle<()>>>,
    /// Clients of remote clusters, by their meta addresses.
    remotes: Mutex<HashMap<Vec<String>, Client>>,
}

impl DupShipper {
    pub fn new(store: StoreHandle, engines: Arc<dyn EngineFactory>, work_dir: PathBuf, cluster_id: Arc<AtomicU64>) -> Result<DupShipper, TernError> {
        let _ = std::fs::remove_dir_all(&work_dir);
        std::fs::create_dir_all(&work_dir).map_err(|e| TernError::Internal(format!("create {}: {e}", work_dir.display())))?;
        Ok(DupShipper {
            inner: Arc::new(Inner {
                store,
                engines,
                work_dir,
                cluster_id,
                wanted: Mutex::new(HashMap::new()),
                statuses: Mutex::new(HashMap::new()),
                running: Mutex::new(HashMap::new()),
                remotes: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Takes meta's duplications and the replicas' statuses from a heartbeat, and starts a task for
    /// every partition this server leads whose table is duplicated (or whose replica still records
    /// for a duplication that was removed).
    pub fn on_heartbeat(&self, duplications: &[Duplication], replicas: &[ReplicaStatus]) {
        let mut wanted: HashMap<u32, Vec<Duplication>> = HashMap::new();
        for d in duplications {
            wanted.entry(d.table_id).or_default().push(d.clone());
        }
        *self.inner.wanted.lock() = wanted;
        let mut running = self.inner.running.lock();
        running.retain(|_, task| !task.is_finished());
        for r in replicas.iter().filter(|r| r.is_leader && r.failure.is_empty()) {
            let group = GroupId(r.group_id);
            if running.contains_key(&group) || !(r.duplicating || self.inner.wanted.lock().contains_key(&group.table_id())) {
                continue;
            }
            let this = self.clone();
            running.insert(group, tokio::spawn(async move { this.run(group).await }));
        }
    }

    /// Progress of every duplication of the partitions this server leads.
    pub fn statuses(&self) -> Vec<DupPartitionStatus> {
        self.inner.statuses.lock().values().cloned().collect()
    }

    /// Stops every task (the server is stopping).
    pub fn stop(&self) {
        for (_, task) in self.inner.running.lock().drain() {
            task.abort();
        }
    }

    fn tag(&self) -> u32 {
        codec::cluster_tag(self.inner.cluster_id.load(Ordering::Relaxed))
    }

    fn remote(&self, meta: &[String]) -> Result<Client, TernError> {
        let mut remotes = self.inner.remotes.lock();
        if let Some(c) = remotes.get(meta) {
            return Ok(c.clone());
        }
        let mut cfg = ClientConfig::new(meta.to_vec());
        cfg.timeout = Duration::from_secs(10);
        let client = Client::new(cfg)?;
        remotes.insert(meta.to_vec(), client.clone());
        Ok(client)
    }

    async fn dup_log(&self, group: GroupId, after: u64, max_entries: usize) -> Result<DupLogRead, TernError> {
        let (tx, rx) = oneshot::channel();
        self.inner.store.send(StoreMsg::DupLog {
            group,
            after,
            max_entries,
            max_bytes: READ_BYTES_MAX,
            callback: Box::new(move |r| drop(tx.send(r))),
        });
        rx.await.map_err(|_| TernError::Unavailable("the store stopped".into()))?
    }

    /// Proposes a duplication op on the partition and waits for it to apply.
    async fn propose(&self, group: GroupId, partition_count: u32, op: write_request::Op) -> Result<WriteResponse, TernError> {
        let partition = PartitionRef { table_id: group.table_id(), partition: group.partition(), partition_count };
        let request = WriteRequest { partition: Some(partition), op: Some(op), ..Default::default() };
        let (tx, rx) = oneshot::channel();
        self.inner.store.send(StoreMsg::Write { group, request, callback: Box::new(move |r| drop(tx.send(r))) });
        let r = rx.await.map_err(|_| TernError::Unavailable("the store stopped".into()))?;
        tern_proto::check(&r.error)?;
        Ok(r)
    }

    fn set_status(&self, group: GroupId, dup_id: u64, update: impl FnOnce(&mut DupPartitionStatus)) {
        let mut statuses = self.inner.statuses.lock();
        let s = statuses.entry((group, dup_id)).or_insert_with(|| DupPartitionStatus {
            dup_id,
            table_id: group.table_id(),
            partition: group.partition(),
            ..Default::default()
        });
        update(s);
    }

    /// A partition's shipper: runs while this replica leads and the partition has duplications.
    async fn run(self, group: GroupId) {
        let mut retry_at: HashMap<u64, Instant> = HashMap::new();
        let mut watermark_sent: HashMap<u64, (u64, Instant)> = HashMap::new();
        loop {
            let read = match self.dup_log(group, 0, 0).await {
                Ok(r) => r,
                Err(_) => break, // not the leader (or not hosted) any more
            };
            let wanted = self.inner.wanted.lock().get(&group.table_id()).cloned().unwrap_or_default();
            let mut busy = false;
            match plan(&read.state, &wanted) {
                Step::Stop => break,
                Step::Sync(sync) => {
                    if let Err(e) = self.propose(group, read.partition_count, write_request::Op::DupSync(sync)).await {
                        tracing::debug!(%group, "duplication sync: {e}");
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                    continue;
                }
                Step::Ship(work) => {
                    self.inner.statuses.lock().retain(|(g, id), _| *g != group || wanted.iter().any(|d| d.id == *id && !d.paused));
                    for (dup, progress) in work {
                        if retry_at.get(&dup.id).is_some_and(|t| Instant::now() < *t) {
                            continue;
                        }
                        let r = if progress.full_copy {
                            self.full_copy(group, &read, &dup, &progress).await.map(|()| true)
                        } else {
                            self.ship_log(group, &dup, &progress, &mut watermark_sent).await
                        };
                        match r {
                            Ok(did) => {
                                busy |= did;
                                retry_at.remove(&dup.id);
                                self.set_status(group, dup.id, |s| s.error.clear());
                            }
                            Err(e) => {
                                tracing::debug!(%group, dup = dup.id, "duplication: {e}");
                                retry_at.insert(dup.id, Instant::now() + RETRY_PAUSE);
                                self.set_status(group, dup.id, |s| s.error = e.to_string());
                            }
                        }
                    }
                }
            }
            if !busy {
                tokio::time::sleep(IDLE_POLL).await;
            }
        }
        self.inner.statuses.lock().retain(|(g, _), _| *g != group);
    }

    /// Ships the change log after the delivered position and confirms it; false if there was
    /// nothing to ship.
    async fn ship_log(
        &self,
        group: GroupId,
        dup: &Duplication,
        progress: &DupProgress,
        watermark_sent: &mut HashMap<u64, (u64, Instant)>,
    ) -> Result<bool, TernError> {
        let read = self.dup_log(group, progress.confirmed_index, READ_ENTRIES_MAX).await?;
        let first_version = read.entries.iter().flat_map(|(_, e)| e.records.first()).map(|r| r.version).next();
        self.set_status(group, dup.id, |s| {
            s.confirmed_index = progress.confirmed_index;
            s.lag_entries = read.applied_index.saturating_sub(progress.confirmed_index);
            s.lag_ms = first_version.map_or(0, |v| now_unix_ms().saturating_sub(codec::version_ms(v)));
            s.full_copy = false;
        });
        let remote = self.remote(&dup.remote_meta)?;
        let tag = self.tag();
        if read.entries.is_empty() {
            // Everything of this partition's own is delivered: its clock is the remote's watermark.
            let sent = watermark_sent.get(&dup.id);
            if sent.is_none_or(|(w, at)| read.hlc > *w && at.elapsed() >= WATERMARK_INTERVAL) {
                let apply = DupApply { origin_tag: tag, origin_index: 0, records: vec![], watermark: read.hlc };
                remote.apply_duplicated(&dup.remote_table, group.partition(), read.partition_count, apply).await?;
                watermark_sent.insert(dup.id, (read.hlc, Instant::now()));
            }
            return Ok(false);
        }
        let (last_index, last_hlc) = read.entries.last().map(|(i, e)| (*i, e.hlc)).expect("not empty");
        let all = batches(&read.entries, tag);
        let count = all.len();
        for (i, apply) in all.into_iter().enumerate() {
            if apply.records.is_empty() && i + 1 < count {
                continue;
            }
            remote.apply_duplicated(&dup.remote_table, group.partition(), read.partition_count, apply).await?;
        }
        let confirm = DupConfirm { dup_id: dup.id, index: last_index, version: last_hlc, full_copy_done: false };
        self.propose(group, read.partition_count, write_request::Op::DupConfirm(confirm)).await?;
        self.set_status(group, dup.id, |s| {
            s.confirmed_index = last_index;
            s.lag_entries = read.applied_index.saturating_sub(last_index);
        });
        Ok(true)
    }

    /// Ships every record of the partition's own (and its tombstones) from a checkpoint, then
    /// confirms the checkpoint's index: the change log holds everything after it.
    async fn full_copy(&self, group: GroupId, read: &DupLogRead, dup: &Duplication, progress: &DupProgress) -> Result<(), TernError> {
        self.set_status(group, dup.id, |s| {
            s.full_copy = true;
            s.confirmed_index = progress.confirmed_index;
            s.lag_entries = read.applied_index.saturating_sub(progress.full_copy_since);
        });
        let remote = self.remote(&dup.remote_meta)?;
        let remote_count = remote.partition_count(&dup.remote_table).await?;
        if remote_count != read.partition_count {
            return Err(TernError::invalid(format!(
                "remote table {} has {remote_count} partitions, this one {}: they must match",
                dup.remote_table, read.partition_count
            )));
        }
        flush(&self.inner.store, group, &|| false).await?;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let work = WorkDir(self.inner.work_dir.join(format!("copy-{}-{}", group.0, NEXT.fetch_add(1, Ordering::Relaxed))));
        let (tx, rx) = oneshot::channel();
        let min_applied_index = read.applied_index.max(progress.full_copy_since);
        self.inner.store.send(StoreMsg::Checkpoint { group, dir: work.0.clone(), min_applied_index, callback: Box::new(move |r| drop(tx.send(r))) });
        let checkpoint = rx.await.map_err(|_| TernError::Unavailable("the store stopped".into()))??;

        // The scan runs on a blocking thread and hands batches over; the sends run here.
        let tag = self.tag();
        let (batch_tx, mut batch_rx) = mpsc::channel::<Vec<DupRecord>>(2);
        let (engines, dir) = (self.inner.engines.clone(), work.0.clone());
        let scan = tokio::task::spawn_blocking(move || {
            let engine = engines.open(&dir).map_err(tern_raft::apply::engine_error)?;
            let own = |r: &DupRecord| matches!(codec::version_tag(r.version), 0) || codec::version_tag(r.version) == tag;
            engine_records(engine.as_ref(), &own, true, &mut |batch| {
                batch_tx.blocking_send(batch).map_err(|_| TernError::Unavailable("the full copy was abandoned".into()))
            })
        });
        let mut sent = 0u64;
        while let Some(records) = batch_rx.recv().await {
            sent += records.len() as u64;
            let apply = DupApply { origin_tag: tag, origin_index: 0, records, watermark: 0 };
            remote.apply_duplicated(&dup.remote_table, group.partition(), read.partition_count, apply).await?;
        }
        scan.await.map_err(|e| TernError::Internal(format!("full copy scan: {e}")))??;
        drop(work);
        let confirm = DupConfirm { dup_id: dup.id, index: checkpoint.applied_index, version: read.hlc, full_copy_done: true };
        self.propose(group, read.partition_count, write_request::Op::DupConfirm(confirm)).await?;
        tracing::info!(%group, dup = dup.id, records = sent, index = checkpoint.applied_index, "full copy delivered to {}", dup.remote_table);
        self.set_status(group, dup.id, |s| {
            s.full_copy = false;
            s.confirmed_index = checkpoint.applied_index;
        });
        Ok(())
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
        assert_eq!(plan(&state, &[dup(1, false), dup(2, true)]), Step::Ship(vec![(dup(1, false), progress(1))]));
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
        let b = batches(&entries, 7);
        assert_eq!(
            b.iter().map(|a| (a.records.len(), a.origin_index, a.watermark)).collect::<Vec<_>>(),
            vec![(3000, 5, 50), (3000, 9, 90), (12000, 12, 120)]
        );
        assert!(b.iter().all(|a| a.origin_tag == 7));
        assert!(batches(&[], 7).is_empty());
        assert_eq!(batches(&[(3, entry(0, 30))], 7).len(), 1, "an entry whose records were all superseded still moves the position");
    }
}
