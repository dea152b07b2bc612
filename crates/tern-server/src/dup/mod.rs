//! The server's half of cross-cluster duplication (design: docs/design/duplication.md; the
//! replicated state and the change log are `tern_raft::apply`; administration is
//! `tern_client::dup`).
//!
//! The leader of each partition of a duplicated table runs a shipper: `machine::PartitionShipper`
//! decides, and the task here carries its actions out on this server (store mailbox, checkpoints)
//! and on the remote cluster (through the client library, as any client would reach it). It keeps
//! the partition's replicated duplication set equal to meta's (`DupSync`), and for each
//! duplication that is not paused either ships the change log after the delivered position to the
//! same partition of the remote table (`DupApply`, applied there if newer), then records the new
//! position through raft (`DupConfirm`); or, when the duplication is new or fell further behind
//! than the change log may hold, ships a full copy of the partition's own records from a checkpoint
//! and confirms the copy's index. A new leader resumes from the replicated position; batches
//! delivered twice change nothing (the remote skips a batch at or below the last one it applied
//! from this partition, and last-writer-wins makes the records themselves idempotent).

mod machine;

pub use machine::{batches, copy_records, engine_records, plan, Action, PartitionShipper, Step, READ_BYTES_MAX, READ_ENTRIES_MAX};

use crate::backup::{flush, WorkDir};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tern_client::{Client, ClientConfig};
use tern_core::{codec, GroupId, TernError};
use tern_engine::EngineFactory;
use tern_proto::*;
use tern_raft::store::{DupLogRead, StoreHandle, StoreMsg};
use tokio::sync::{mpsc, oneshot};

use tern_core::time::unix_now_ms as now_unix_ms;

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
    /// Bytes per second a full copy reads from its checkpoint (the server's backup rate): a copy
    /// must not take the disk and cores from foreground requests.
    copy_rate: u64,
    /// Meta's duplications by table id, as of the last heartbeat.
    wanted: Mutex<HashMap<u32, Vec<Duplication>>>,
    /// Each running task's progress per duplication: reported to meta with every heartbeat.
    statuses: Mutex<HashMap<(GroupId, u64), DupPartitionStatus>>,
    running: Mutex<HashMap<GroupId, tokio::task::JoinHandle<()>>>,
    /// Clients of remote clusters, by their meta addresses.
    remotes: Mutex<HashMap<Vec<String>, Client>>,
}

/// A full copy under way: batches from a checkpoint scanned on a blocking thread.
struct FullCopy {
    batches: mpsc::Receiver<Vec<DupRecord>>,
    scan: tokio::task::JoinHandle<Result<u64, TernError>>,
    _work: WorkDir,
}

impl FullCopy {
    async fn next(&mut self) -> Result<Option<Vec<DupRecord>>, TernError> {
        if let Some(batch) = self.batches.recv().await {
            return Ok(Some(batch));
        }
        (&mut self.scan).await.map_err(|e| TernError::Internal(format!("full copy scan: {e}")))??;
        Ok(None)
    }
}

impl DupShipper {
    pub fn new(
        store: StoreHandle,
        engines: Arc<dyn EngineFactory>,
        work_dir: PathBuf,
        cluster_id: Arc<AtomicU64>,
        copy_rate: u64,
    ) -> Result<DupShipper, TernError> {
        let _ = std::fs::remove_dir_all(&work_dir);
        std::fs::create_dir_all(&work_dir).map_err(|e| TernError::Internal(format!("create {}: {e}", work_dir.display())))?;
        Ok(DupShipper {
            inner: Arc::new(Inner {
                store,
                engines,
                work_dir,
                cluster_id,
                copy_rate,
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
        let tables: Vec<u32> = wanted.keys().copied().collect();
        // Stored before any task starts: a task must never plan with meta's duplications unknown.
        *self.inner.wanted.lock() = wanted;
        let mut running = self.inner.running.lock();
        running.retain(|_, task| !task.is_finished());
        for r in replicas.iter().filter(|r| r.is_leader && r.failure.is_empty()) {
            let group = GroupId(r.group_id);
            if running.contains_key(&group) || !(r.duplicating || tables.contains(&group.table_id())) {
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
        let max_bytes = machine::READ_BYTES_MAX;
        self.inner.store.send(StoreMsg::DupLog { group, after, max_entries, max_bytes, callback: Box::new(move |r| drop(tx.send(r))) });
        rx.await.map_err(|_| TernError::Unavailable("the store stopped".into()))?
    }

    /// Proposes a duplication op on the partition and waits for it to apply.
    async fn propose(&self, group: GroupId, partition_count: u32, op: write_request::Op) -> Result<(), TernError> {
        let partition = PartitionRef { table_id: group.table_id(), partition: group.partition(), partition_count };
        let request = WriteRequest { partition: Some(partition), op: Some(op), ..Default::default() };
        let (tx, rx) = oneshot::channel();
        self.inner.store.send(StoreMsg::Write { group, request, callback: Box::new(move |r| drop(tx.send(r))) });
        let r = rx.await.map_err(|_| TernError::Unavailable("the store stopped".into()))?;
        tern_proto::check(&r.error)
    }

    /// Checkpoints the partition for a full copy and starts scanning it.
    async fn begin_copy(
        &self,
        group: GroupId,
        dup: &Duplication,
        min_applied_index: u64,
        partition_count: u32,
    ) -> Result<(u64, FullCopy), TernError> {
        let remote_count = self.remote(&dup.remote_meta)?.partition_count(&dup.remote_table).await?;
        if remote_count != partition_count {
            return Err(TernError::invalid(format!(
                "remote table {} has {remote_count} partitions, this one {partition_count}: they must match",
                dup.remote_table
            )));
        }
        flush(&self.inner.store, group, &|| false).await?;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let work = WorkDir(self.inner.work_dir.join(format!("copy-{}-{}", group.0, NEXT.fetch_add(1, Ordering::Relaxed))));
        let (tx, rx) = oneshot::channel();
        self.inner.store.send(StoreMsg::Checkpoint {
            group,
            dir: work.0.clone(),
            min_applied_index,
            partition_count: 0,
            callback: Box::new(move |r| drop(tx.send(r))),
        });
        let checkpoint = rx.await.map_err(|_| TernError::Unavailable("the store stopped".into()))??;
        let (batch_tx, batches) = mpsc::channel::<Vec<DupRecord>>(2);
        let (engines, dir, dest_tag) = (self.inner.engines.clone(), work.0.clone(), dup.remote_tag);
        let mut pacer = tern_backup::Pacer::new(self.inner.copy_rate);
        let scan = tokio::task::spawn_blocking(move || {
            let engine = engines.open(&dir).map_err(tern_raft::apply::engine_error)?;
            copy_records(engine.as_ref(), dest_tag, &mut |batch| {
                pacer.pace_blocking(batch.iter().map(|r| (r.hashkey.len() + r.sortkey.len() + r.value.len()) as u64).sum());
                batch_tx.blocking_send(batch).map_err(|_| TernError::Unavailable("the full copy was abandoned".into()))
            })
        });
        Ok((checkpoint.applied_index, FullCopy { batches, scan, _work: work }))
    }

    fn tag(&self) -> u32 {
        codec::cluster_tag(self.inner.cluster_id.load(Ordering::Relaxed))
    }

    /// A partition's shipper: runs while this replica leads and the partition has duplications.
    async fn run(self, group: GroupId) {
        let mut shipper = PartitionShipper::new(group, self.tag());
        let mut copy: Option<FullCopy> = None;
        let mut action = shipper.start();
        loop {
            action = match action {
                Action::Stop => break,
                Action::ReadState => {
                    let read = self.dup_log(group, 0, 0).await;
                    let wanted = self.inner.wanted.lock().get(&group.table_id()).cloned().unwrap_or_default();
                    shipper.on_state(now_unix_ms(), read, &wanted)
                }
                Action::ReadLog { after } => {
                    let read = self.dup_log(group, after, machine::READ_ENTRIES_MAX).await;
                    shipper.on_log(now_unix_ms(), read)
                }
                Action::Propose(op) => {
                    let r = self.propose(group, shipper.partition_count(), op).await;
                    shipper.on_proposed(now_unix_ms(), r)
                }
                Action::Send { dup, apply } => {
                    let sent = match self.remote(&dup.remote_meta) {
                        Ok(remote) => {
                            remote.apply_duplicated(&dup.remote_table, group.partition(), shipper.partition_count(), apply).await.map(|_| ())
                        }
                        Err(e) => Err(e),
                    };
                    shipper.on_sent(now_unix_ms(), sent)
                }
                Action::BeginCopy { dup, min_applied_index } => {
                    copy = None;
                    let begun = self.begin_copy(group, &dup, min_applied_index, shipper.partition_count()).await.map(|(index, c)| {
                        copy = Some(c);
                        index
                    });
                    shipper.on_copy_begun(now_unix_ms(), begun)
                }
                Action::CopyNext => {
                    // A copy runs for as long as this replica leads and the duplication is wanted
                    // as it was (a deposed leader, a paused or removed duplication stops it).
                    let still = self.dup_log(group, 0, 0).await.map(|_| ()).and_then(|()| {
                        let wanted = self.inner.wanted.lock().get(&group.table_id()).cloned().unwrap_or_default();
                        match (shipper.copying(), wanted) {
                            (Some(id), w) if w.iter().any(|d| d.id == id && !d.paused) => Ok(()),
                            _ => Err(TernError::Unavailable("the duplication was paused or removed during its full copy".into())),
                        }
                    });
                    let batch = match (still, copy.as_mut()) {
                        (Err(e), _) => Err(e),
                        (Ok(()), Some(c)) => c.next().await,
                        (Ok(()), None) => Err(TernError::Internal("no full copy under way".into())),
                    };
                    if !matches!(batch, Ok(Some(_))) {
                        copy = None;
                    }
                    shipper.on_copy_batch(now_unix_ms(), batch)
                }
                Action::Wait { ms } => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    shipper.on_wake()
                }
            };
            let mut statuses = self.inner.statuses.lock();
            statuses.retain(|(g, _), _| *g != group);
            statuses.extend(shipper.statuses().map(|s| ((group, s.dup_id), s.clone())));
        }
        self.inner.statuses.lock().retain(|(g, _), _| *g != group);
    }
}
