//! Cold backup and restore of a whole table, coordinated from a client (`tern shell` runs it): the
//! servers do the copying (`tern_server::backup`), this code says which partition goes where, follows
//! leaders, retries, reports progress and writes or checks the backup's own manifest
//! (`tern_core::backup` holds the layout).
//!
//! Consistency: each partition is backed up as a checkpoint at one applied index, taken after a
//! linearizable read on it, so it holds every write acknowledged before the backup started and a
//! prefix of the partition's log. Partitions are taken one after another, not at one instant: a
//! write acknowledged during the backup may be in it or not, independently per partition.
//!
//! A backup is complete once `backup.json` exists; a failed or cancelled backup removes what it
//! wrote. A restore checks the manifests and every file's presence and size before it creates the
//! table (created "restoring": clients refuse it), the servers check every checksum as they read,
//! and the table is dropped again if any partition fails, so it is seen whole or not at all.

use crate::client::Client;
use futures::{StreamExt, TryStreamExt};
use std::future::Future;
use std::time::{Duration, Instant};
use tern_backup::Target;
use tern_core::backup::{self as layout, BackupManifest, PartitionEntry};
use tern_core::{NodeId, TernError, TernResult};
use tern_proto::{BackupPartitionRequest, CreateTableRequest, DropTableRequest, PartitionRef, RestorePartitionRequest, TableInfo};

/// How long one partition may keep failing (no leader, a busy server) before the whole operation
/// gives up.
const PARTITION_RETRY_DEADLINE: Duration = Duration::from_secs(120);
/// Partitions copied at once (each server also runs at most `OPERATIONS_MAX` of them itself).
const PARTITIONS_AT_ONCE: usize = 4;

/// What a running backup or restore has done so far.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub partitions: u32,
    pub partitions_done: u32,
    /// Bytes copied, of the partitions done and the one under way.
    pub bytes: u64,
    /// Records written (restore only).
    pub records: u64,
    pub elapsed: Duration,
}

impl Progress {
    pub fn bytes_per_second(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-3)
    }
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} partitions, {:.1} MiB at {:.1} MiB/s",
            self.partitions_done,
            self.partitions,
            self.bytes as f64 / (1 << 20) as f64,
            self.bytes_per_second() / (1 << 20) as f64
        )?;
        if self.records > 0 {
            write!(f, ", {} records", self.records)?;
        }
        Ok(())
    }
}

/// What a finished restore did.
#[derive(Clone, Debug)]
pub struct Restored {
    pub table: String,
    pub partitions: u32,
    pub records: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

use tern_core::time::unix_now_ms as now_unix_ms;

/// Runs `work` unless `cancel` resolves first.
async fn cancellable<T>(work: impl Future<Output = TernResult<T>>, cancel: impl Future<Output = ()>) -> TernResult<T> {
    tokio::select! {
        r = work => r,
        () = cancel => Err(TernError::Unavailable("cancelled".into())),
    }
}

/// The node to try next for a partition: its leader as meta last saw it, else any replica.
fn leader_of(info: &TableInfo, partition: u32) -> Option<NodeId> {
    let p = info.partitions.get(partition as usize)?;
    if p.leader_node != 0 {
        return Some(p.leader_node);
    }
    p.peers.first().map(|p| p.node_id)
}

/// One attempt's outcome, as the retry loop sees it.
enum Attempt<T> {
    Done(T),
    /// Try again at this node (a NotLeader hint) or at meta's leader. `progressed`: the attempt got
    /// somewhere before it failed (the partition is not stuck).
    Retry {
        node: Option<NodeId>,
        error: TernError,
        progressed: bool,
    },
}

fn classify<T>(e: TernError, progressed: bool) -> TernResult<Attempt<T>> {
    match e {
        TernError::NotLeader { leader } => Ok(Attempt::Retry { node: leader, error: TernError::NotLeader { leader }, progressed }),
        e if e.is_retryable() || matches!(e, TernError::PartitionNotFound(_)) => Ok(Attempt::Retry { node: None, error: e, progressed }),
        e => Err(e),
    }
}

/// Follows one attempt's stream of progress reports until `step` says a report is the last (its
/// answer is the attempt's result) or something fails (classified for the retry loop).
async fn follow<M, T>(
    call: Result<tonic::Response<tonic::Streaming<M>>, tonic::Status>,
    error: impl Fn(&M) -> &Option<tern_proto::Error>,
    mut step: impl FnMut(M) -> Option<T>,
) -> TernResult<Attempt<T>> {
    let mut stream = match call {
        Ok(s) => s.into_inner(),
        Err(s) => return classify(tern_proto::from_status(&s), false),
    };
    let mut progressed = false;
    loop {
        let m = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return classify(TernError::Unavailable("the server ended its progress stream early".into()), progressed),
            Err(s) => return classify(tern_proto::from_status(&s), progressed),
        };
        if let Err(e) = tern_proto::check(error(&m)) {
            return classify(e, progressed);
        }
        progressed = true;
        if let Some(done) = step(m) {
            return Ok(Attempt::Done(done));
        }
    }
}

/// Runs `attempt` on the partition's leader until it succeeds, fails for good, or has failed
/// without getting anywhere for `PARTITION_RETRY_DEADLINE` (a Busy server, or an attempt that made
/// progress before it failed, starts that time over).
async fn on_leader<T, F, Fut>(client: &Client, table: &str, partition: u32, attempt: F) -> TernResult<T>
where
    F: Fn(NodeId) -> Fut,
    Fut: Future<Output = TernResult<Attempt<T>>>,
{
    let mut failing_since = Instant::now();
    let mut hint = None;
    let mut tries = 0u32;
    loop {
        let node = match hint {
            Some(n) => n,
            None => {
                let info = client.table_info(table).await?;
                leader_of(&info, partition).ok_or_else(|| TernError::Unavailable(format!("partition {partition} has no replicas")))?
            }
        };
        let last = match attempt(node).await? {
            Attempt::Done(v) => return Ok(v),
            Attempt::Retry { node, error, progressed } => {
                hint = node;
                if progressed || matches!(error, TernError::Busy(_)) {
                    failing_since = Instant::now();
                    tries = 0;
                }
                error
            }
        };
        if failing_since.elapsed() >= PARTITION_RETRY_DEADLINE {
            return Err(TernError::Unavailable(format!("partition {partition} of {table}: gave up after {tries} attempts: {last}")));
        }
        tries += 1;
        tokio::time::sleep(Duration::from_millis(100 * u64::from(tries.min(20)))).await;
        if tries.is_multiple_of(3) {
            let _ = client.refresh_nodes().await;
        }
    }
}

/// Backs up `table` into a new directory under `root` (a path or `file://` URI every server can
/// reach), at most `rate_bytes_per_second` per partition (0: each server's default), calling
/// `progress` as it goes. Returns the backup's directory and manifest. If `cancel` resolves first,
/// or anything fails, the partial backup is removed.
pub async fn backup_table(
    client: &Client,
    table: &str,
    root: &str,
    rate_bytes_per_second: u64,
    progress: &mut (dyn FnMut(&Progress) + Send),
    cancel: impl Future<Output = ()>,
) -> TernResult<(String, BackupManifest)> {
    let root = Target::create(root)?;
    let info = client.table_info(table).await?;
    if let Some(split) = &info.split {
        // Each partition's checkpoint must be of the count the manifest records (a partition
        // that splits during the backup is refused by its server, and the backup fails).
        return Err(TernError::Unavailable(format!(
            "table {table} is splitting into {} partitions: back it up once the split is done",
            split.partition_count
        )));
    }
    let started = now_unix_ms();
    // The suffix keeps two backups started in one millisecond (a shell and a policy) apart.
    let backup = root.child(&format!("{table}-{started}-{:04x}", rand::random::<u16>()));
    let r = cancellable(backup_into(client, &info, &backup, started, rate_bytes_per_second, progress), cancel).await;
    match r {
        Ok(m) => Ok((backup.to_string(), m)),
        Err(e) => {
            let _ = backup.remove_all().await;
            Err(e)
        }
    }
}

async fn backup_into(
    client: &Client,
    info: &TableInfo,
    backup: &Target,
    started: u64,
    rate: u64,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> TernResult<BackupManifest> {
    let tracker = Tracker::new(info.partition_count, progress);
    let tracker = &tracker;
    let mut entries: Vec<PartitionEntry> = futures::stream::iter(0..info.partition_count)
        .map(|partition| async move {
            let entry = on_leader(client, &info.name, partition, |node| async move {
                let request = BackupPartitionRequest {
                    partition: Some(PartitionRef { table_id: info.table_id, partition, partition_count: info.partition_count }),
                    backup: backup.to_string(),
                    rate_bytes_per_second: rate,
                };
                let mut service = match client.backup_service(node) {
                    Ok(service) => service,
                    Err(e) => return classify(e, false),
                };
                follow(
                    service.backup_partition(request).await,
                    |m| &m.error,
                    |m| {
                        tracker.update(partition, m.bytes_done, 0);
                        let entry = PartitionEntry {
                            partition,
                            dir: m.dir,
                            applied_index: m.applied_index,
                            bytes: m.bytes_done,
                            manifest_crc32: m.manifest_crc32,
                        };
                        m.done.then_some(entry)
                    },
                )
                .await
            })
            .await?;
            tracker.finish(partition, entry.bytes, 0);
            Ok::<_, TernError>(entry)
        })
        .buffer_unordered(PARTITIONS_AT_ONCE)
        .try_collect()
        .await?;
    entries.sort_by_key(|e| e.partition);
    // Every partition is there as its entry describes, before the backup is declared complete.
    for e in &entries {
        tern_backup::verify_partition(backup, e).await?;
    }
    let manifest = BackupManifest {
        format: layout::FORMAT,
        table: info.name.clone(),
        table_id: info.table_id,
        partition_count: info.partition_count,
        replica_count: info.replica_count,
        started_unix_ms: started,
        finished_unix_ms: now_unix_ms(),
        partitions: entries,
    };
    backup.put_json(layout::BACKUP_MANIFEST, &manifest).await?;
    Ok(manifest)
}

/// Restores the backup at `backup` (its directory, as `backup_table` returned it) into a new table
/// `table` with the backup's partition and replica counts. Every byte of the backup is checked
/// before the table is created; a backup that fails a check is refused with the name of the bad
/// file, and nothing is created. If a partition then fails, or `cancel` resolves, the new table is
/// dropped.
pub async fn restore_table(
    client: &Client,
    backup: &str,
    table: &str,
    rate_bytes_per_second: u64,
    progress: &mut (dyn FnMut(&Progress) + Send),
    cancel: impl Future<Output = ()>,
) -> TernResult<Restored> {
    tern_core::limits::check_table_name(table)?;
    let backup = Target::open(backup)?;
    let manifest = tern_backup::verify_backup(&backup).await?;
    let name = table.to_string();
    let created = client
        .meta_call(|mut m| {
            let name = name.clone();
            let (partition_count, replica_count) = (manifest.partition_count, manifest.replica_count);
            async move { m.create_table(CreateTableRequest { name, partition_count, replica_count, restoring: true }).await.map(|r| r.into_inner()) }
        })
        .await?;
    tern_proto::check(&created.error)?;
    let info = created.table.ok_or_else(|| TernError::Internal("meta returned no table".into()))?;
    let r = cancellable(
        async {
            let restored = restore_into(client, &info, &backup, &manifest, rate_bytes_per_second, progress).await?;
            let name = table.to_string();
            let r = client
                .meta_call(|mut m| {
                    let name = name.clone();
                    async move { m.finish_restore(tern_proto::TableRequest { name, ..Default::default() }).await.map(|r| r.into_inner()) }
                })
                .await?;
            tern_proto::check(&r.error)?;
            Ok(restored)
        },
        cancel,
    )
    .await;
    if r.is_err() {
        // By id too: never another table created under this name since.
        let (name, table_id) = (table.to_string(), info.table_id);
        let _ = client
            .meta_call(|mut m| {
                let name = name.clone();
                async move { m.drop_table(DropTableRequest { name, table_id }).await.map(|r| r.into_inner()) }
            })
            .await;
    }
    r
}

async fn restore_into(
    client: &Client,
    info: &TableInfo,
    backup: &Target,
    manifest: &BackupManifest,
    rate: u64,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> TernResult<Restored> {
    let tracker = Tracker::new(info.partition_count, progress);
    let tracker = &tracker;
    futures::stream::iter(&manifest.partitions)
        .map(|entry| async move {
            let partition = entry.partition;
            let records = on_leader(client, &info.name, partition, |node| async move {
                let request = RestorePartitionRequest {
                    partition: Some(PartitionRef { table_id: info.table_id, partition, partition_count: info.partition_count }),
                    backup: backup.to_string(),
                    rate_bytes_per_second: rate,
                };
                let mut service = match client.backup_service(node) {
                    Ok(service) => service,
                    Err(e) => return classify(e, false),
                };
                // Reports carry either bytes copied or records written.
                let (mut bytes, mut records) = (0, 0);
                follow(
                    service.restore_partition(request).await,
                    |m| &m.error,
                    |m| {
                        if m.done {
                            return Some(m.record_count);
                        }
                        (bytes, records) = (bytes.max(m.bytes_done), records.max(m.records_done));
                        tracker.update(partition, bytes, records);
                        None
                    },
                )
                .await
            })
            .await?;
            tracker.finish(partition, entry.bytes, records);
            Ok::<_, TernError>(())
        })
        .buffer_unordered(PARTITIONS_AT_ONCE)
        .try_collect::<Vec<()>>()
        .await?;
    let done = tracker.done();
    Ok(Restored { table: info.name.clone(), partitions: info.partition_count, records: done.records, bytes: done.bytes, elapsed: done.elapsed })
}

/// Adds up the progress of the partitions under way and done, and passes it on.
struct Tracker<'a> {
    clock: Instant,
    state: std::sync::Mutex<TrackerState<'a>>,
}

struct TrackerState<'a> {
    done: Progress,
    /// (bytes, records) of each partition under way.
    running: std::collections::HashMap<u32, (u64, u64)>,
    callback: &'a mut (dyn FnMut(&Progress) + Send),
}

impl<'a> Tracker<'a> {
    fn new(partitions: u32, callback: &'a mut (dyn FnMut(&Progress) + Send)) -> Tracker<'a> {
        let done = Progress { partitions, ..Default::default() };
        Tracker { clock: Instant::now(), state: std::sync::Mutex::new(TrackerState { done, running: Default::default(), callback }) }
    }

    fn report(&self, s: &mut TrackerState<'a>) {
        let mut now = s.done.clone();
        for (bytes, records) in s.running.values() {
            now.bytes = now.bytes.saturating_add(*bytes);
            now.records += records;
        }
        now.elapsed = self.clock.elapsed();
        (s.callback)(&now);
    }

    fn update(&self, partition: u32, bytes: u64, records: u64) {
        let mut s = self.state.lock().expect("progress");
        s.running.insert(partition, (bytes, records));
        self.report(&mut s);
    }

    fn finish(&self, partition: u32, bytes: u64, records: u64) {
        let mut s = self.state.lock().expect("progress");
        s.running.remove(&partition);
        s.done.partitions_done += 1;
        s.done.bytes = s.done.bytes.saturating_add(bytes);
        s.done.records += records;
        self.report(&mut s);
    }

    fn done(&self) -> Progress {
        let mut done = self.state.lock().expect("progress").done.clone();
        done.elapsed = self.clock.elapsed();
        done
    }
}

/// The backups under `root`, newest first: each one's name with its manifest, or why it is not a
/// usable backup (unfinished, or not a backup at all). Reads manifests only.
pub async fn list_backups(root: &str) -> TernResult<Vec<(String, TernResult<BackupManifest>)>> {
    let root = Target::open(root)?;
    let mut out = Vec::new();
    for name in root.children().await? {
        let m = tern_backup::read_backup_manifest(&root.child(&name)).await;
        out.push((name, m));
    }
    let started = |m: &TernResult<BackupManifest>| m.as_ref().map(|m| m.started_unix_ms).unwrap_or(0);
    out.sort_by(|a, b| started(&b.1).cmp(&started(&a.1)).then_with(|| a.0.cmp(&b.0)));
    Ok(out)
}

/// How often a meta leader's process looks for tables whose periodic backup is due.
pub const POLICY_CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// An unfinished backup directory of a policy's table is removed once it is this old (a backup
/// cut short by a crash leaves one; a running backup never lasts this long).
const UNFINISHED_BACKUP_AGE_MAX_MS: u64 = 86_400_000;

/// What a policy pass should do for one table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PolicyPlan {
    /// No complete backup newer than the interval: take one now.
    pub due: bool,
    /// Backup directories (names under the root) to remove: complete ones beyond the newest
    /// `keep`, unfinished ones older than a day.
    pub remove: Vec<String>,
}

/// The start time a backup's name carries, if it is one of `table`'s (`TABLE-UNIXMS-XXXX`).
fn started_from_name(table: &str, name: &str) -> Option<u64> {
    let rest = name.strip_prefix(table)?.strip_prefix('-')?;
    let (ms, suffix) = rest.split_once('-')?;
    let digits = |s: &str, hex: bool| !s.is_empty() && s.bytes().all(|b| if hex { b.is_ascii_hexdigit() } else { b.is_ascii_digit() });
    if !digits(ms, false) || suffix.len() != 4 || !digits(suffix, true) {
        return None;
    }
    ms.parse().ok()
}

/// Decides a policy pass for `table` from the directories under its root: `found` holds each name
/// with whether it is a complete backup of `table`. Pure, so that it is tested on its own.
pub fn plan_policy(table: &str, interval_seconds: u64, keep: u32, now_unix_ms: u64, found: &[(String, bool)]) -> PolicyPlan {
    let mut complete: Vec<(u64, &str)> = Vec::new();
    let mut plan = PolicyPlan::default();
    for (name, is_complete) in found {
        let Some(started) = started_from_name(table, name) else { continue };
        if *is_complete {
            complete.push((started, name));
        } else if now_unix_ms.saturating_sub(started) > UNFINISHED_BACKUP_AGE_MAX_MS {
            plan.remove.push(name.clone());
        }
    }
    complete.sort_unstable_by(|a, b| b.cmp(a));
    plan.due = complete.first().is_none_or(|(newest, _)| now_unix_ms.saturating_sub(*newest) >= interval_seconds.saturating_mul(1000));
    // A backup about to be taken counts against `keep` (removals happen only once it succeeded).
    let kept = (keep as usize).saturating_sub(usize::from(plan.due));
    plan.remove.extend(complete.iter().skip(kept).map(|(_, n)| n.to_string()));
    plan
}

/// One pass over every table's backup policy at `now_unix_ms`: takes the backups that are due and
/// removes what the policies no longer keep. `leading` is asked before each step and cancels a
/// running backup when it turns false (another meta node leads and runs the policies now).
pub async fn policy_pass(client: &Client, now_unix_ms: u64, leading: &(dyn Fn() -> bool + Send + Sync)) -> TernResult<()> {
    let tables = client.meta_call(|mut m| async move { m.list_tables(tern_proto::ListTablesRequest {}).await.map(|r| r.into_inner()) }).await?;
    tern_proto::check(&tables.error)?;
    for t in tables.tables {
        let Some(policy) = t.backup_policy else { continue };
        if !leading() {
            return Ok(());
        }
        let root = match Target::create(&policy.root) {
            Ok(root) => root,
            Err(e) => {
                tracing::warn!(table = %t.name, "periodic backup: {e}");
                continue;
            }
        };
        let mut found = Vec::new();
        match root.children().await {
            Ok(names) => {
                // Only this table's names are read (a root may hold many tables' backups).
                for name in names.into_iter().filter(|n| started_from_name(&t.name, n).is_some()) {
                    if let Some(state) = classify_backup(&root.child(&name), &t.name, t.table_id).await {
                        found.push((name, state));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(table = %t.name, "periodic backup: list {root}: {e}");
                continue;
            }
        }
        let plan = plan_policy(&t.name, policy.interval_seconds, policy.keep, now_unix_ms, &found);
        if plan.due {
            let lost = async {
                while leading() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            };
            match backup_table(client, &t.name, &policy.root, u64::from(policy.rate_mb) << 20, &mut |_| {}, lost).await {
                Ok((dir, m)) => tracing::info!(table = %t.name, bytes = m.bytes(), "periodic backup taken: {dir}"),
                Err(e) => {
                    // Nothing is removed after a failed backup: the older ones are all there is.
                    tracing::warn!(table = %t.name, "periodic backup failed: {e}");
                    continue;
                }
            }
        }
        for name in plan.remove {
            // The manifest goes first: a removal cut short leaves an unfinished backup, never one
            // that looks complete.
            let old = root.child(&name);
            let removed = match old.remove(layout::BACKUP_MANIFEST).await {
                Ok(()) => old.remove_all().await,
                Err(e) => Err(e),
            };
            match removed {
                Ok(()) => tracing::info!(table = %t.name, "removed backup {name} (policy keeps {})", policy.keep),
                Err(e) => tracing::warn!(table = %t.name, "remove backup {name}: {e}"),
            }
        }
    }
    Ok(())
}

/// A place under a policy's root as the pass sees it: whether it is a complete backup of `table`
/// (Some(true)) or unfinished (Some(false): no `backup.json`). None for what is neither (another
/// table's backup, a manifest that cannot be read now): never removed.
async fn classify_backup(place: &Target, table: &str, table_id: u32) -> Option<bool> {
    match place.get_json::<BackupManifest>(layout::BACKUP_MANIFEST).await {
        // The id too: a table dropped and created again under its name is another table.
        Ok(Some((m, _))) => (m.table == table && m.table_id == table_id).then_some(true),
        Ok(None) => Some(false),
        Err(_) => None,
    }
}

/// Runs policy passes every `POLICY_CHECK_INTERVAL` for as long as it lives, while `leading` says
/// this process's meta node leads. Every meta process runs one; only the leader's acts.
pub async fn run_policies(client: Client, leading: std::sync::Arc<dyn Fn() -> bool + Send + Sync>) {
    loop {
        tokio::time::sleep(POLICY_CHECK_INTERVAL).await;
        if leading() {
            if let Err(e) = policy_pass(&client, now_unix_ms(), leading.as_ref()).await {
                tracing::warn!("backup policy pass: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(names: &[(&str, bool)]) -> Vec<(String, bool)> {
        names.iter().map(|(n, c)| (n.to_string(), *c)).collect()
    }

    /// Due when no complete backup is newer than the interval; keeps the newest `keep` complete
    /// ones counting the one about to be taken; removes unfinished ones only once a day old; never
    /// touches other tables' directories (a table whose name extends this one's included).
    #[test]
    fn policy_plans() {
        let hour = 3_600_000;
        let now = 100 * 86_400_000;
        assert_eq!(plan_policy("t", 3600, 2, now, &[]), PolicyPlan { due: true, remove: vec![] });
        let dirs = found(&[
            (&format!("t-{}-00ab", now - hour / 2), true),
            (&format!("t-{}-00ab", now - 2 * hour), true),
            (&format!("t-{}-00ab", now - 3 * hour), true),
            (&format!("t-{}-00ab", now - 10 * hour), false),
            (&format!("t-{}-00ab", now - 30 * hour), false),
            (&format!("t-x-{}-00ab", now - 50 * hour), true),
            (&format!("tt-{}-00ab", now - 50 * hour), true),
            ("notes", false),
            (&format!("t-{}", now - 50 * hour), false),
            (&format!("t-{}-zzzz", now - 50 * hour), false),
        ]);
        let p = plan_policy("t", 3600, 2, now, &dirs);
        assert!(!p.due);
        assert_eq!(p.remove, vec![format!("t-{}-00ab", now - 30 * hour), format!("t-{}-00ab", now - 3 * hour)]);
        let p = plan_policy("t", 1800, 2, now, &dirs);
        assert!(p.due, "the newest is exactly one interval old");
        assert_eq!(p.remove, vec![format!("t-{}-00ab", now - 30 * hour), format!("t-{}-00ab", now - 2 * hour), format!("t-{}-00ab", now - 3 * hour)]);
        let p = plan_policy("t", 1800, 1, now, &dirs);
        assert!(p.due);
        assert_eq!(p.remove.len(), 4, "keep 1 with one due: the new one replaces every older one: {:?}", p.remove);
    }
}
