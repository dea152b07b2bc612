//! The server's half of cold backup and restore (the coordinator is `tern_client::backup`; the
//! layout is `tern_core::backup`; locations, local or S3, are `tern_backup`).
//!
//! Backup of a partition: a linearizable read on it (so the checkpoint holds every write
//! acknowledged before the request), a background flush, a RocksDB checkpoint of the replica taken
//! on the store thread (hard links: cheap) at or past the read's index, then a paced upload of its
//! files into a place of this attempt's own under the backup, with a crc32 of each, and
//! `partition.json` written last.
//!
//! Restore of a partition into a new table: the files are downloaded into this server's data
//! directory, each checked against the manifest (size and crc32) as it is read; the copy is opened
//! as an engine and every live user record is written through raft with its version, in batches
//! of many records as duplication delivers them (so every replica gets it, and a restore started
//! again after a failure or a leader change simply writes the same records again); then
//! the replica's checksum is compared with the backup's. Nothing here decides anything raft or
//! apply would: writes go through the same mailbox and validation as a client's.
//!
//! Both answer with a stream of progress reports; dropping the stream cancels the work.

use crate::dup::engine_records;
use crate::validate;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_backup::{Pacer, Target};
use tern_core::backup::{self as layout, BackupFile, PartitionManifest};
use tern_core::codec;
use tern_core::{GroupId, TernError};
use tern_engine::{EngineFactory, KvEngine};
use tern_proto::backup_server::Backup;
use tern_proto::*;
use tern_raft::store::{Checkpointed, StoreHandle, StoreMsg};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Backups and restores one server runs at once; more are answered Busy.
pub const OPERATIONS_MAX: usize = 4;
/// Slowest rate a backup or restore may ask for (bytes per second): a copy checks for cancellation
/// between chunks, so a slower one could hold a slot for hours after its caller left.
pub const RATE_MIN: u64 = 1 << 20;
/// Fastest default rate a server may be configured with (bytes per second).
pub const RATE_MAX: u64 = 100_000 << 20;
/// Longest wait for a background flush before a checkpoint.
const FLUSH_WAIT_MAX: Duration = Duration::from_secs(10);
/// How often a running operation reports progress.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// Restore writes (batches of records, bounded as duplication's) in flight at once on one partition.
const RESTORE_WRITES_IN_FLIGHT_MAX: usize = 8;
/// How long one restore write may take before the restore gives up (the coordinator retries).
const RESTORE_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct BackupService {
    store: StoreHandle,
    engines: Arc<dyn EngineFactory>,
    /// Checkpoints and restore copies live here while they are worked on (emptied at start).
    work_dir: PathBuf,
    permits: Arc<Semaphore>,
    /// Bytes per second when a request names no rate.
    default_rate: u64,
}

use tern_core::time::unix_now_ms as now_unix_ms;

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> TernError {
    move |e| TernError::Internal(format!("{what}: {e}"))
}

/// A work directory removed when the operation ends, however it ends (on a blocking thread when
/// dropped inside the runtime: a checkpoint holds many files).
pub(crate) struct WorkDir(pub(crate) PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let dir = std::mem::take(&mut self.0);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || std::fs::remove_dir_all(dir))),
            Err(_) => drop(std::fs::remove_dir_all(dir)),
        }
    }
}

impl BackupService {
    pub fn new(store: StoreHandle, engines: Arc<dyn EngineFactory>, work_dir: PathBuf, default_rate: u64) -> Result<BackupService, TernError> {
        let _ = std::fs::remove_dir_all(&work_dir);
        std::fs::create_dir_all(&work_dir).map_err(io(format!("create {}", work_dir.display())))?;
        Ok(BackupService { store, engines, work_dir, permits: Arc::new(Semaphore::new(OPERATIONS_MAX)), default_rate })
    }

    fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, TernError> {
        self.permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| TernError::Busy(format!("this server already runs {OPERATIONS_MAX} backups or restores, its limit")))
    }

    fn work_path(&self, what: &str, group: GroupId) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.work_dir.join(format!("{what}-{}-{n}", group.0))
    }

    fn rate(&self, requested: u64) -> Result<u64, TernError> {
        match requested {
            0 => Ok(self.default_rate),
            r if r < RATE_MIN => Err(TernError::invalid(format!("a backup or restore rate of {r} bytes/s is under the minimum of {RATE_MIN}"))),
            r => Ok(r),
        }
    }

    async fn backup(&self, req: BackupPartitionRequest, tx: &mpsc::Sender<Result<BackupProgress, Status>>) -> Result<BackupProgress, TernError> {
        let _permit = self.permit()?;
        let rate = self.rate(req.rate_bytes_per_second)?;
        let backup = Target::create(&req.backup)?;
        // A linearizable read first: whatever was acknowledged before it is applied here before the
        // checkpoint below (the store applies in order; a deposed leader fails the read).
        let barrier = ReadRequest {
            partition: req.partition,
            allow_stale: false,
            op: Some(read_request::Op::Scan(Scan { full_table: true, limit: 1, no_value: true, ..Default::default() })),
        };
        let group = validate::read(&barrier)?;
        let partition = barrier.partition.as_ref().map_or(0, |p| p.partition);
        let (rtx, rrx) = oneshot::channel();
        self.store.send(StoreMsg::Read { group, request: barrier, callback: Box::new(move |r| drop(rtx.send(r))) });
        let read = rrx.await.map_err(|_| TernError::Unavailable("the store stopped".into()))?;
        tern_proto::check(&read.error)?;

        flush(&self.store, group, &|| tx.is_closed()).await?;
        let work = WorkDir(self.work_path("backup", group));
        let (ctx, crx) = oneshot::channel();
        let (dir, min_applied_index) = (work.0.clone(), read.applied_index);
        let partition_count = req.partition.as_ref().map_or(0, |p| p.partition_count);
        self.store.send(StoreMsg::Checkpoint { group, dir, min_applied_index, partition_count, callback: Box::new(move |r| drop(ctx.send(r))) });
        let asked = Instant::now();
        let checkpoint = crx.await.map_err(|_| TernError::Unavailable("the store stopped".into()))??;
        let checkpoint_ms = asked.elapsed().as_millis() as u64;

        // A place of this attempt's own: a late attempt never writes into another one's.
        let place = layout::partition_dir(partition, &format!("{:016x}", rand::random::<u64>()));
        let target = backup.child(&place);
        let copying = Instant::now();
        let r = copy_out(&work.0, &target, partition, checkpoint, rate, tx).await;
        match &r {
            Ok(done) => tracing::info!(
                %group, applied_index = done.applied_index, checkpoint_ms, bytes = done.bytes_done, copy_ms = copying.elapsed().as_millis() as u64,
                "partition backed up to {target}"
            ),
            Err(e) => {
                tracing::warn!(%group, "partition backup failed: {e}");
                let _ = target.remove_all().await;
            }
        }
        r.map(|done| BackupProgress { dir: place, ..done })
    }

    async fn restore(&self, req: RestorePartitionRequest, tx: &mpsc::Sender<Result<RestoreProgress, Status>>) -> Result<RestoreProgress, TernError> {
        let _permit = self.permit()?;
        let group = validate::partition_group(&req.partition)?;
        let p = req.partition.expect("validated");
        let backup = Target::open(&req.backup)?;
        let manifest = tern_backup::read_backup_manifest(&backup).await?;
        if manifest.partition_count != p.partition_count {
            return Err(TernError::invalid(format!(
                "the backup holds {} partitions; a table restored from it must have as many, not {}",
                manifest.partition_count, p.partition_count
            )));
        }
        let entry = manifest.partitions[p.partition as usize].clone();
        let files = tern_backup::verify_partition(&backup, &entry).await?;
        let work = WorkDir(self.work_path("restore", group));
        let mut pacer = Pacer::new(self.rate(req.rate_bytes_per_second)?);
        let total: u64 = files.files.iter().map(|f| f.size).sum();
        let mut reporter = Reporter::new(tx);
        let mut done = 0u64;
        let cancelled = || tx.is_closed();
        let mut progress = |n: u64| {
            done += n;
            reporter.report(|| RestoreProgress { bytes_done: done, bytes_total: total, ..Default::default() });
        };
        tern_backup::download_partition(&backup, &entry, &files, &work.0, &mut pacer, &cancelled, &mut progress).await?;
        let (engines, store, tx) = (self.engines.clone(), self.store.clone(), tx.clone());
        tokio::task::spawn_blocking(move || {
            let engine = engines.open(&work.0).map_err(tern_raft::apply::engine_error)?;
            let restored = ingest(engine.as_ref(), &store, group, &p, &mut pacer, &tx)?;
            let done = verify_restored(engine.as_ref(), &store, group, p.partition, p.partition_count)?;
            drop(engine);
            Ok(RestoreProgress { done: true, records_done: restored, record_count: done.1, checksum: done.0, ..Default::default() })
        })
        .await
        .map_err(|e| TernError::Internal(format!("restore task: {e}")))?
    }
}

/// Flushes a replica's engine in the background and waits (a bounded time) for it, so that a
/// checkpoint that follows has little left to flush on the store thread.
pub(crate) async fn flush(store: &StoreHandle, group: GroupId, cancelled: &(dyn Fn() -> bool + Sync)) -> Result<(), TernError> {
    let deadline = Instant::now() + FLUSH_WAIT_MAX;
    let mut begin = true;
    while Instant::now() < deadline {
        if cancelled() {
            return Err(TernError::Unavailable("cancelled".into()));
        }
        let (tx, rx) = oneshot::channel();
        store.send(StoreMsg::Flush { group, begin, callback: Box::new(move |r| drop(tx.send(r))) });
        let r = rx.await.map_err(|_| TernError::Unavailable("the store stopped".into()))??;
        match (begin, r) {
            (true, true) => begin = false,
            (false, true) => return Ok(()),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Not flushed in time (writes stopped behind compaction): a checkpoint now would flush on
    // the store thread and stall every partition of this server. Later.
    Err(TernError::Busy(format!("the engine of {group} did not flush within {FLUSH_WAIT_MAX:?}; try again later")))
}

/// Sends a progress report if the last one is old enough (never blocks: a slow reader misses some).
struct Reporter<T> {
    tx: mpsc::Sender<Result<T, Status>>,
    last: Instant,
}

impl<T> Reporter<T> {
    fn new(tx: &mpsc::Sender<Result<T, Status>>) -> Reporter<T> {
        Reporter { tx: tx.clone(), last: Instant::now() }
    }
    fn report(&mut self, progress: impl FnOnce() -> T) {
        if self.last.elapsed() >= PROGRESS_INTERVAL {
            self.last = Instant::now();
            let _ = self.tx.try_send(Ok(progress()));
        }
    }
    /// The caller dropped the stream: stop.
    fn cancelled(&self) -> bool {
        self.tx.is_closed()
    }
}

fn sorted_files(dir: &Path) -> Result<Vec<(String, u64)>, TernError> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io(format!("list {}", dir.display())))? {
        let e = e.map_err(io(format!("list {}", dir.display())))?;
        let len = e.metadata().map_err(io(format!("stat {}", e.path().display())))?.len();
        files.push((e.file_name().to_string_lossy().into_owned(), len));
    }
    files.sort();
    Ok(files)
}

async fn copy_out(
    checkpoint_dir: &Path,
    target: &Target,
    partition: u32,
    checkpoint: Checkpointed,
    rate: u64,
    tx: &mpsc::Sender<Result<BackupProgress, Status>>,
) -> Result<BackupProgress, TernError> {
    let listed_dir = checkpoint_dir.to_path_buf();
    let files =
        tokio::task::spawn_blocking(move || sorted_files(&listed_dir)).await.map_err(|e| TernError::Internal(format!("list checkpoint: {e}")))??;
    let total: u64 = files.iter().map(|f| f.1).sum();
    let mut reporter = Reporter::new(tx);
    let mut pacer = Pacer::new(rate);
    let mut done = 0u64;
    let mut listed = Vec::new();
    let cancelled = || tx.is_closed();
    for (name, _) in files {
        let mut progress = |n: u64| {
            done += n;
            reporter.report(|| BackupProgress { bytes_done: done, bytes_total: total, ..Default::default() });
        };
        let (size, crc32) = target.upload(&name, &checkpoint_dir.join(&name), &mut pacer, &cancelled, &mut progress).await?;
        listed.push(BackupFile { name, size, crc32 });
    }
    let manifest = PartitionManifest { partition, applied_index: checkpoint.applied_index, files: listed };
    let manifest_crc32 = target.put_json(layout::PARTITION_MANIFEST, &manifest).await?;
    Ok(BackupProgress {
        bytes_done: done,
        bytes_total: total,
        done: true,
        applied_index: checkpoint.applied_index,
        manifest_crc32,
        ..Default::default()
    })
}

/// Writes every live user record of `engine` into the replica of `group` through raft, with the
/// versions they were written with (as duplication delivers them: a restore started again writes
/// the same records again, and changes nothing), a bounded number of batches in flight. Returns
/// the number of records written.
fn ingest(
    engine: &dyn KvEngine,
    store: &StoreHandle,
    group: GroupId,
    partition: &PartitionRef,
    pacer: &mut Pacer,
    tx: &mpsc::Sender<Result<RestoreProgress, Status>>,
) -> Result<u64, TernError> {
    let now = now_unix_ms();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<WriteResponse>();
    let mut in_flight = 0usize;
    let mut reporter = Reporter::new(tx);

    // Waits for one write to finish; an error stops the restore.
    let wait_one = |in_flight: &mut usize| -> Result<(), TernError> {
        let r = done_rx.recv_timeout(RESTORE_WRITE_TIMEOUT).map_err(|_| TernError::Timeout("a restore write did not finish in time".into()))?;
        *in_flight -= 1;
        tern_proto::check(&r.error)
    };
    let mut written = 0u64;
    // A backup of a partition that split holds its sibling's records too: left out.
    let owner = tern_raft::apply::Owner { partition: partition.partition, count: partition.partition_count };
    let live = |r: &DupRecord| !codec::is_expired(r.expire_at_ms, now) && owner.owns(&r.hashkey);
    engine_records(engine, &live, false, &mut |records| {
        while in_flight >= RESTORE_WRITES_IN_FLIGHT_MAX {
            wait_one(&mut in_flight)?;
        }
        let bytes: usize = records.iter().map(|r| r.hashkey.len() + r.sortkey.len() + r.value.len()).sum();
        written += records.len() as u64;
        let apply = DupApply { origin_tag: 0, origin_index: 0, records, watermark: 0, source_table: 0 };
        let request = WriteRequest { partition: Some(*partition), op: Some(write_request::Op::DupApply(apply)), ..Default::default() };
        let group_checked = validate::write(&request)?;
        debug_assert_eq!(group_checked, group);
        let done = done_tx.clone();
        store.send(StoreMsg::Write { group, request, callback: Box::new(move |r| drop(done.send(r))) });
        in_flight += 1;
        pacer.pace_blocking(bytes as u64);
        reporter.report(|| RestoreProgress { records_done: written, ..Default::default() });
        if reporter.cancelled() {
            return Err(TernError::Unavailable("cancelled".into()));
        }
        Ok(())
    })?;
    while in_flight > 0 {
        wait_one(&mut in_flight)?;
    }
    Ok(written)
}

/// Compares the restored replica with the backup: (checksum, record count) of both at one time.
/// The time is a minute ahead, past the log clock of a replica just written, so both sides leave
/// out exactly the records expired by then.
fn verify_restored(
    engine: &dyn KvEngine,
    store: &StoreHandle,
    group: GroupId,
    partition: u32,
    partition_count: u32,
) -> Result<(u64, u64), TernError> {
    let at = now_unix_ms() + 60_000;
    let owner = tern_raft::apply::Owner { partition: group.partition(), count: partition_count };
    let (sum, count) = tern_raft::read::data_checksum(engine, at, owner)?;
    let (tx, rx) = std::sync::mpsc::channel();
    store.send(StoreMsg::Checksum { group, at_unix_ms: at, data_only: true, callback: Box::new(move |r| drop(tx.send(r))) });
    let (_, replica_sum, replica_count) = rx.recv().map_err(|_| TernError::Unavailable("the store stopped".into()))??;
    if (replica_sum, replica_count) != (sum, count) {
        return Err(TernError::Corruption(format!(
            "restored partition {partition} holds {replica_count} records (checksum {replica_sum:016x}); the backup holds {count} ({sum:016x}): \
             was the table written during the restore?"
        )));
    }
    Ok((sum, count))
}

type ProgressStream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl Backup for BackupService {
    type BackupPartitionStream = ProgressStream<BackupProgress>;
    type RestorePartitionStream = ProgressStream<RestoreProgress>;

    async fn backup_partition(&self, request: Request<BackupPartitionRequest>) -> Result<Response<Self::BackupPartitionStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            let last =
                this.backup(request.into_inner(), &tx).await.unwrap_or_else(|e| BackupProgress { error: Some(e.into()), ..Default::default() });
            let _ = tx.send(Ok(last)).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn restore_partition(&self, request: Request<RestorePartitionRequest>) -> Result<Response<Self::RestorePartitionStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            let last =
                this.restore(request.into_inner(), &tx).await.unwrap_or_else(|e| RestoreProgress { error: Some(e.into()), ..Default::default() });
            let _ = tx.send(Ok(last)).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
