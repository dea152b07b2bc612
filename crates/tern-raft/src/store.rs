//! The store: every replica on one node, driven in rounds by one thread (or by the simulator).
//!
//! A round: handle a bounded batch of mailbox messages, tick if due, then run each touched replica's
//! Ready in two halves around ONE synced raft-log write for all of them (group commit). The store is
//! the replicas' single owner: the mailbox is the only way in.

use crate::log_store::{LogStore, LogWriteBatch};
use crate::log_writer::{LogWriter, SyncLogWriter};
use crate::replica::{OutMessage, ReadCallback, Replica, ReplicaConfig, ReplicaMeta, WriteCallback};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use raft::eraftpb::Message;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_core::files::SharedFileSystem;
use tern_core::time::{Clock, RandomSource, SeededRandom};
use tern_core::{GroupId, NodeId, PeerId, TableId, TernError};
use tern_engine::EngineFactory;
use tern_proto::{ReadRequest, ReadResponse, ReplicaStatus, WriteRequest};

/// Suffix of a replica directory being destroyed (`<group>.<peer>.destroyed`): renamed so, durably,
/// before anything else is removed, so that a crash part way never brings back half a replica.
const TOMBSTONE_SUFFIX: &str = ".destroyed";

/// Sends raft messages to other nodes. Must not block: implementations queue and batch.
pub trait Transport: Send {
    fn send(&mut self, messages: Vec<OutMessage>);
    /// Tells each of `nodes` that this node is up (delivered there as `StoreMsg::NodePing`).
    fn ping(&mut self, nodes: &[NodeId]);
}

/// What a replica should look like, as meta assigns it.
#[derive(Clone, Debug)]
pub struct ReplicaSpec {
    pub group: GroupId,
    pub peer_id: PeerId,
    /// The voters meta wants.
    pub peers: Vec<(PeerId, NodeId)>,
    /// The learners meta wants (being filled before they become voters).
    pub learners: Vec<(PeerId, NodeId)>,
    /// Peers meta dropped that raft may still count (where they are, to answer them).
    pub removing: Vec<(PeerId, NodeId)>,
    pub initial: bool,
    /// The voters an initial replica bootstraps with: the partition's first (empty: `peers`).
    pub initial_voters: Vec<PeerId>,
    /// The partition count meta wants (a leader below it proposes a split).
    pub partition_count: u32,
    /// The count an initial replica bootstraps with (0: `partition_count`).
    pub initial_partition_count: u32,
    pub preferred_leader: bool,
    /// The peer meta prefers as leader (0: none).
    pub preferred_leader_peer: PeerId,
}

/// What a server does with meta's answer to its heartbeat: the store messages that bring its
/// replicas in line with the catalog (host every assigned replica, destroy replicas of live tables
/// that are no longer assigned here, destroy replicas of dropped tables). Pure: the server's
/// heartbeat loop and the simulator both act through it. An answer carrying an error changes
/// nothing but what it names explicitly (no replica is destroyed on an error).
pub fn reconcile_with_meta(answer: &tern_proto::HeartbeatResponse) -> Vec<StoreMsg> {
    let specs: Vec<ReplicaSpec> = answer.assignments.iter().map(ReplicaSpec::from_proto).collect();
    let keep: Vec<GroupId> = specs.iter().map(|s| s.group).chain(answer.kept_groups.iter().map(|g| GroupId(*g))).collect();
    let mut out = Vec::new();
    if !specs.is_empty() {
        out.push(StoreMsg::EnsureReplicas(specs));
    }
    if answer.error.is_none() && !answer.live_tables.is_empty() {
        let listed = |i: usize| answer.live_table_partitions.get(i).copied().unwrap_or(u32::MAX);
        let tables = answer.live_tables.iter().enumerate().map(|(i, t)| (*t, listed(i))).collect();
        out.push(StoreMsg::RetainReplicas { tables, keep });
    }
    if !answer.dropped_tables.is_empty() {
        out.push(StoreMsg::DropTables(answer.dropped_tables.clone()));
    }
    out
}

/// A node's storage, as the store reaches it: the raft log (shared by all replicas), the engine
/// factory, and the file system every other file goes through. Production passes raft-engine,
/// RocksDB and the real file system; the simulator passes its own, with crash semantics.
#[derive(Clone)]
pub struct NodeDisks {
    pub log: Arc<dyn LogStore>,
    pub engines: Arc<dyn EngineFactory>,
    pub files: SharedFileSystem,
}

impl ReplicaSpec {
    /// As meta sends it in a heartbeat answer.
    pub fn to_proto(&self) -> tern_proto::ReplicaAssignment {
        let peers = |list: &[(PeerId, NodeId)]| list.iter().map(|(p, n)| tern_proto::PeerInfo { peer_id: *p, node_id: *n }).collect();
        tern_proto::ReplicaAssignment {
            group_id: self.group.0,
            peer_id: self.peer_id,
            peers: peers(&self.peers),
            learners: peers(&self.learners),
            removing: peers(&self.removing),
            initial: self.initial,
            initial_voters: self.initial_voters.clone(),
            partition_count: self.partition_count,
            preferred_leader: self.preferred_leader,
            preferred_leader_peer: self.preferred_leader_peer,
            initial_partition_count: self.initial_partition_count,
        }
    }

    pub fn from_proto(a: &tern_proto::ReplicaAssignment) -> ReplicaSpec {
        let peers = |list: &[tern_proto::PeerInfo]| list.iter().map(|p| (p.peer_id, p.node_id)).collect();
        ReplicaSpec {
            group: GroupId(a.group_id),
            peer_id: a.peer_id,
            peers: peers(&a.peers),
            learners: peers(&a.learners),
            removing: peers(&a.removing),
            initial: a.initial,
            initial_voters: a.initial_voters.clone(),
            partition_count: a.partition_count,
            initial_partition_count: a.initial_partition_count,
            preferred_leader: a.preferred_leader,
            preferred_leader_peer: a.preferred_leader_peer,
        }
    }
}

pub type ChecksumCallback = Box<dyn FnOnce(Result<(u64, u64, u64), TernError>) + Send>;

/// A replica's engine checkpointed for a backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpointed {
    /// The raft index the checkpoint holds every entry up to.
    pub applied_index: u64,
}

pub type CheckpointCallback = Box<dyn FnOnce(Result<Checkpointed, TernError>) + Send>;

/// What a partition leader's duplication shipper reads: the replicated duplication state, and the
/// change log after the position it asked for.
#[derive(Clone, Debug, Default)]
pub struct DupLogRead {
    pub applied_index: u64,
    /// The state machine's clock and the log's (for lag in milliseconds).
    pub hlc: u64,
    pub stamp_ms: u64,
    pub partition_count: u32,
    pub state: tern_proto::PartitionDupState,
    pub entries: Vec<(u64, tern_proto::DupLogEntry)>,
}

pub type DupLogCallback = Box<dyn FnOnce(Result<DupLogRead, TernError>) + Send>;

pub enum StoreMsg {
    Write {
        group: GroupId,
        request: WriteRequest,
        callback: WriteCallback,
    },
    Read {
        group: GroupId,
        request: ReadRequest,
        callback: ReadCallback,
    },
    Raft {
        group: GroupId,
        message: Message,
        snapshot_dir: Option<PathBuf>,
    },
    /// A node's liveness ping (see `Transport::ping`).
    NodePing {
        from: NodeId,
    },
    SnapshotReport {
        group: GroupId,
        to_peer: PeerId,
        ok: bool,
    },
    Unreachable {
        group: GroupId,
        to_peer: PeerId,
    },
    EnsureReplicas(Vec<ReplicaSpec>),
    /// Destroys replicas of `tables` (each with the partitions meta listed) that are not in `keep`
    /// (they were removed from their group). A partition past those listed is left alone: a
    /// split's child this node made after meta answered.
    RetainReplicas {
        tables: Vec<(TableId, u32)>,
        keep: Vec<GroupId>,
    },
    DropTables(Vec<TableId>),
    Status(Box<dyn FnOnce(Vec<ReplicaStatus>) + Send>),
    /// (applied index, checksum, record count) of a replica's records live at `at_unix_ms` (0: now).
    Checksum {
        group: GroupId,
        at_unix_ms: u64,
        /// User records only (`read::data_checksum`).
        data_only: bool,
        callback: ChecksumCallback,
    },
    /// Starts flushing a replica's engine in the background (`begin`), or asks whether that flush
    /// has finished. A checkpoint taken after it only flushes what came since: the store thread
    /// does not wait for a whole memtable to be written.
    Flush {
        group: GroupId,
        begin: bool,
        callback: Box<dyn FnOnce(Result<bool, TernError>) + Send>,
    },
    /// Checkpoints a replica's engine into `dir` (which must not exist yet), for a backup, if it
    /// has applied at least `min_applied_index`.
    Checkpoint {
        group: GroupId,
        dir: PathBuf,
        min_applied_index: u64,
        /// The partition count the caller addresses the partition by (0: any): a partition that
        /// has split since holds another half's records too, frozen at the split.
        partition_count: u32,
        callback: CheckpointCallback,
    },
    /// Reads a leader's duplication state and change log after `after` (bounded).
    DupLog {
        group: GroupId,
        after: u64,
        max_entries: usize,
        max_bytes: usize,
        callback: DupLogCallback,
    },
    /// A log write became durable (the log writer's wake-up; the round finishes in `process_ready`).
    LogWritten,
    Shutdown,
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub tick_interval: Duration,
    pub replica: ReplicaConfig,
    /// Messages handled per round before Ready processing (bounds latency of a round).
    pub round_messages_max: usize,
    /// Bytes of client writes taken into one round: a leader sends a round's new entries to each
    /// follower as one message (raft-rs `batch_append`), which must stay well inside what a
    /// receiver accepts (`RAFT_BATCH_BYTES_MAX`), with one largest write on top.
    pub round_write_bytes_max: usize,
    /// Mailbox capacity; senders get Busy beyond it.
    pub mailbox_capacity: usize,
    /// Purge obsolete raft-log files every this many ticks.
    pub log_purge_interval_ticks: u64,
    /// A replica stopped by a storage failure is closed and opened again from disk after this many
    /// ticks (a transient error heals; a persistent one stops it again, and meta replaces it).
    pub failed_replica_reopen_ticks: u64,
    /// Replicas' engines kept open (each a RocksDB instance: files and memory); past it the store
    /// closes those unused longest, once nothing needs them (each opened again when it is next
    /// needed), so open files and memory follow the busy replicas, from start-up on. Zero closes
    /// every engine as soon as nothing needs it.
    pub engines_open_max: usize,
    /// Sync the raft log on a thread of its own (`Store::write_log_on_thread`) instead of the
    /// store's. Off by default: on a 2-core machine the hand-offs cost more than the overlap gains
    /// (BENCHMARKS.md, history).
    pub log_writer_thread: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            tick_interval: Duration::from_millis(100),
            replica: ReplicaConfig::default(),
            round_messages_max: 4096,
            round_write_bytes_max: 1024 * 1024,
            mailbox_capacity: 100_000,
            log_purge_interval_ticks: 100,
            failed_replica_reopen_ticks: 300,
            engines_open_max: ENGINES_OPEN_DEFAULT,
            log_writer_thread: false,
        }
    }
}

pub struct Store {
    node_id: NodeId,
    data_dir: PathBuf,
    log: Arc<dyn LogStore>,
    engines: Arc<dyn EngineFactory>,
    files: SharedFileSystem,
    clock: Arc<dyn Clock>,
    rng: SeededRandom,
    cfg: StoreConfig,
    replicas: BTreeMap<GroupId, Replica>,
    dirty: BTreeSet<GroupId>,
    transport: Box<dyn Transport>,
    ticks: u64,
    /// Since when (store ticks) each stopped replica has been stopped.
    failed_since: BTreeMap<GroupId, u64>,
    /// Replicas whose directory is here but that could not be opened (a storage failure at open):
    /// reported to meta as failed, and tried again every `failed_replica_reopen_ticks`.
    unopened: BTreeMap<GroupId, Unopened>,
    /// Peers meta assigned here that can never be created (retired peer ids), with why: reported to
    /// meta as failed, so it replaces them instead of waiting for them forever.
    refused: BTreeMap<GroupId, (PeerId, String)>,
    /// Makes the rounds' raft-log writes durable (at once, or on its own thread).
    log_writer: Box<dyn LogWriter>,
    /// Log writes started so far.
    writes_started: u64,
    /// Rounds whose log write is not known durable yet, oldest first: what to finish then.
    unpersisted: VecDeque<UnpersistedRound>,
    /// Each open replica's incarnation (a replica reopened or created again is a new one, whose
    /// Ready numbers start over).
    incarnations: BTreeMap<GroupId, u64>,
    next_incarnation: u64,
    /// The highest peer id of each group ever destroyed on this node (kept in `RETIRED_FILE`). A
    /// destroyed peer forgot its votes and log; created again it could vote twice in a term or
    /// deny entries it acknowledged, so no peer id at or below it is ever created here again (meta
    /// hands out ever larger ids, so a real new peer is always above it).
    retired: BTreeMap<GroupId, PeerId>,
    /// Liveness of the nodes this node's replicas have peers on, for hibernating groups.
    peer_nodes: PeerNodes,
    /// Replicas with an open engine: the tick it was last seen used, and its use count then.
    engines_used: BTreeMap<GroupId, (u64, u64)>,
    /// Raft messages without entries for groups with no replica here, kept a short while (oldest
    /// dropped first): a split's child elsewhere can be ahead of this node's, and its first votes
    /// would otherwise be lost, costing an election timeout.
    parked: VecDeque<(GroupId, Message, u64)>,
}

/// Raft messages kept for groups not hosted here (see `Store::parked`); each is small (no entries).
const PARKED_MESSAGES_MAX: usize = 256;

/// Every node a replica here has a peer on, pinged each tick, and when each was last heard from
/// (store ticks). A node silent for an election timeout wakes the hibernating followers whose
/// leader lives there (see `replica::hibernation`).
#[derive(Default)]
struct PeerNodes {
    heard: BTreeMap<NodeId, u64>,
    silent: BTreeSet<NodeId>,
    list: Vec<NodeId>,
}

/// Engines a store keeps open by default: about 8,500 open files and 300 MiB. Reopening an
/// engine takes milliseconds of the store thread (BENCHMARKS.md, replicas per server), so only a
/// server with more replicas than this closes any.
pub const ENGINES_OPEN_DEFAULT: usize = 1024;

/// How often (ticks) the store recomputes which nodes its replicas have peers on.
const PEER_NODES_REFRESH_TICKS: u64 = 10;

/// Where a store keeps its retired peer ids.
const RETIRED_FILE: &str = "retired-peers.json";

struct Unopened {
    meta: ReplicaMeta,
    dir: PathBuf,
    failure: String,
    since: u64,
}

/// The replica of `group` with its engine open (opened again if it was closed while the replica
/// hibernated).
fn with_engine(replicas: &mut BTreeMap<GroupId, Replica>, group: GroupId) -> Option<&mut Replica> {
    let replica = replicas.get_mut(&group)?;
    replica.ensure_engine();
    Some(replica)
}

fn not_hosted(group: GroupId) -> TernError {
    TernError::PartitionNotFound(format!("partition {group} has no replica on this server"))
}

/// The client addressed the partition with a different partition count than the replica has.
fn stale(replica: &Replica, partition: &Option<tern_proto::PartitionRef>) -> bool {
    partition.as_ref().is_some_and(|p| p.partition_count != replica.partition_count())
}

fn addressed_count(partition: &Option<tern_proto::PartitionRef>) -> u32 {
    partition.as_ref().map_or(0, |p| p.partition_count)
}

impl Store {
    /// Opens the store and every replica found under `data_dir/replicas`.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        node_id: NodeId,
        data_dir: PathBuf,
        disks: NodeDisks,
        clock: Arc<dyn Clock>,
        seed: u64,
        cfg: StoreConfig,
        transport: Box<dyn Transport>,
    ) -> Result<Store, TernError> {
        let io = |e: std::io::Error| TernError::Internal(format!("store directory {}: {e}", data_dir.display()));
        let mut cfg = cfg;
        // Followers refuse votes for election_tick ticks after hearing from the leader; the lease
        // stays well inside that (a follower's first tick may come right after a message).
        cfg.replica.read_lease = cfg.tick_interval * (cfg.replica.election_tick.saturating_sub(2) as u32) * 7 / 8;
        if cfg.replica.planted.lease_too_long {
            cfg.replica.read_lease *= 40;
        }
        let NodeDisks { log, engines, files } = disks;
        if !cfg.replica.planted.keep_resurrected_log_entries {
            crate::log_store::drop_entries_below_truncated(log.as_ref())?;
        }
        let log_writer = Box::new(SyncLogWriter::new(log.clone()));
        files.create_dir_all_durably(&data_dir.join("replicas")).map_err(io)?;
        let mut store = Store {
            node_id,
            data_dir: data_dir.clone(),
            log,
            engines,
            files: files.clone(),
            clock,
            rng: SeededRandom::new(seed),
            cfg,
            replicas: BTreeMap::new(),
            dirty: BTreeSet::new(),
            transport,
            ticks: 0,
            failed_since: BTreeMap::new(),
            unopened: BTreeMap::new(),
            refused: BTreeMap::new(),
            log_writer,
            writes_started: 0,
            unpersisted: VecDeque::new(),
            incarnations: BTreeMap::new(),
            next_incarnation: 0,
            retired: BTreeMap::new(),
            peer_nodes: PeerNodes::default(),
            engines_used: BTreeMap::new(),
            parked: VecDeque::new(),
        };
        let retired_file = data_dir.join(RETIRED_FILE);
        if files.exists(&retired_file) {
            let bytes = files.read(&retired_file).map_err(io)?;
            let retired: Vec<(u64, PeerId)> =
                serde_json::from_slice(&bytes).map_err(|e| TernError::Corruption(format!("{}: {e}", retired_file.display())))?;
            store.retired = retired.into_iter().map(|(g, p)| (GroupId(g), p)).collect();
        }
        let entries: Vec<PathBuf> = files.read_dir(&data_dir.join("replicas")).map_err(io)?;
        // Destroys a crash interrupted are finished first.
        let tombstones: Vec<PathBuf> = entries.iter().filter(|p| is_tombstone(p)).cloned().collect();
        store.finish_destroying(tombstones)?;
        let dirs: Vec<PathBuf> = entries.into_iter().filter(|p| !is_tombstone(p) && files.exists(&p.join("replica.json"))).collect();
        for dir in dirs {
            let meta = ReplicaMeta::load(&*files, &dir)?;
            // One replica that cannot open must not keep the node's others from serving.
            store.open_or_report(meta, dir);
        }
        store.open_staged_children()?;
        Ok(store)
    }

    /// Adds a replica just opened or created. Past `engines_open_max`, its engine closes again at
    /// once (its state was read and is durable): a server starts, or creates thousands of
    /// replicas, within its open-file limit.
    fn insert_replica(&mut self, group: GroupId, mut replica: Replica) {
        if self.engines_open() >= self.cfg.engines_open_max {
            replica.close_engine_if_unused();
        }
        self.next_incarnation += 1;
        self.incarnations.insert(group, self.next_incarnation);
        self.replicas.insert(group, replica);
    }

    /// Runs the rounds' raft-log writes with `writer` from now on (production: a thread of its
    /// own; by default they are written at once, on the store's thread).
    pub fn set_log_writer(&mut self, writer: Box<dyn LogWriter>) {
        self.wait_for_log_writes();
        self.log_writer = writer;
        self.writes_started = 0;
    }

    /// Moves the rounds' raft-log writes to a thread of their own, which wakes the store through
    /// `handle` after each durable write (production).
    pub fn write_log_on_thread(&mut self, handle: StoreHandle) -> Result<(), TernError> {
        let name = format!("tern-log-{}", self.node_id);
        let writer = crate::log_writer::ThreadLogWriter::start(name, self.log.clone(), move || handle.send(StoreMsg::LogWritten))
            .map_err(|e| TernError::Internal(format!("start the raft-log writer thread: {e}")))?;
        self.set_log_writer(Box::new(writer));
        Ok(())
    }

    /// Waits until every started log write is durable and finishes those rounds: a write made
    /// directly (a replica's log cleaned) must come after them.
    fn wait_for_log_writes(&mut self) {
        if let Err(e) = self.log_writer.wait_all() {
            panic!("raft log write failed: {e}");
        }
        let mut outbox = Vec::new();
        self.finish_durable_rounds(&mut outbox);
        if !outbox.is_empty() {
            self.transport.send(outbox);
        }
    }

    /// Opens an existing replica; one that fails is kept as unopened (reported failed, retried).
    fn open_or_report(&mut self, meta: ReplicaMeta, dir: PathBuf) {
        let group = GroupId(meta.group);
        match self.open_replica(meta.clone(), dir.clone(), None) {
            Ok(replica) => {
                self.unopened.remove(&group);
                self.failed_since.remove(&group);
                self.dirty.insert(group);
                self.insert_replica(group, replica);
            }
            Err(e) => {
                tracing::error!(node = self.node_id, group = %group, "cannot open replica: {e}");
                // If it led, its sleeping followers must wake to elect another leader.
                let me = meta.peer_id;
                let wakes = meta.peers.iter().filter(|(p, n)| *p != me && *n != self.node_id);
                let wakes = wakes.map(|(p, n)| OutMessage { group, to_node: *n, message: crate::replica::wake_notice(me, *p), snapshot_dir: None });
                self.transport.send(wakes.collect());
                self.unopened.insert(group, Unopened { meta, dir, failure: format!("cannot open: {e}"), since: self.ticks });
            }
        }
    }

    /// Closes stopped replicas that have been stopped long enough and opens them again from disk,
    /// and retries replicas that could not be opened.
    fn reopen_failed_replicas(&mut self) {
        let wait = self.cfg.failed_replica_reopen_ticks;
        let now = self.ticks;
        for (group, replica) in &self.replicas {
            if replica.failure().is_some() {
                self.failed_since.entry(*group).or_insert(now);
            }
        }
        let due: Vec<GroupId> = self.failed_since.iter().filter(|(_, since)| now >= **since + wait).map(|(g, _)| *g).collect();
        let retry: Vec<GroupId> = self.unopened.iter().filter(|(_, u)| now >= u.since + wait).map(|(g, _)| *g).collect();
        if !due.is_empty() || !retry.is_empty() {
            // A replica opens from what its log store holds: every write started for it goes first.
            self.wait_for_log_writes();
        }
        for group in due {
            self.failed_since.remove(&group);
            let Some(replica) = self.replicas.remove(&group) else { continue };
            let (meta, dir) = (replica.meta().clone(), replica.dir().to_path_buf());
            tracing::info!(node = self.node_id, group = %group, "reopening a replica stopped by a storage failure");
            drop(replica); // closes its engine
            self.open_or_report(meta, dir);
        }
        for group in retry {
            let u = self.unopened.remove(&group).expect("listed above");
            self.open_or_report(u.meta, u.dir);
        }
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    fn open_replica(&mut self, meta: ReplicaMeta, dir: PathBuf, bootstrap: Option<Vec<PeerId>>) -> Result<Replica, TernError> {
        let election = self.cfg.replica.election_tick;
        let election_tick = self.rng.range(election as u64, 2 * election as u64) as usize;
        let snapshot_dir = self.data_dir.join("snapshots").join(meta.group.to_string());
        let disks = NodeDisks { log: self.log.clone(), engines: self.engines.clone(), files: self.files.clone() };
        Replica::open(meta, dir, snapshot_dir, bootstrap, &disks, self.cfg.replica.clone(), election_tick)
    }

    /// (group, term) of every read lease held now: what a checker of lease safety looks at.
    pub fn leases(&self) -> Vec<(GroupId, u64)> {
        let now = self.clock.monotonic();
        self.replicas.values().filter_map(|r| r.lease_term(now).map(|term| (r.group, term))).collect()
    }

    /// Replicas stopped after a storage failure, or that could not be opened, with the reason.
    pub fn failed_replicas(&self) -> Vec<(GroupId, String)> {
        let stopped = self.replicas.values().filter_map(|r| r.failure().map(|f| (r.group, f.to_string())));
        stopped.chain(self.unopened.iter().map(|(g, u)| (*g, u.failure.clone()))).collect()
    }

    pub fn replica_count(&self) -> usize {
        self.replicas.len()
    }

    /// Replicas whose engine is open now (at most `engines_open_max`, past which the store closes
    /// those unused longest once nothing needs them).
    pub fn engines_open(&self) -> usize {
        self.replicas.values().filter(|r| r.engine_is_open()).count()
    }

    /// Replicas hibernating now (see `replica::hibernation`).
    pub fn hibernating_count(&self) -> usize {
        self.replicas.values().filter(|r| r.is_hibernating()).count()
    }

    /// Handles one mailbox message. Returns false on shutdown.
    pub fn handle(&mut self, msg: StoreMsg) -> bool {
        let now = self.clock.now_unix_ms();
        match msg {
            StoreMsg::Write { group, request, callback } => match with_engine(&mut self.replicas, group) {
                Some(r) if stale(r, &request.partition) => {
                    callback(crate::apply::error_response(r.addressed_by_another_count(addressed_count(&request.partition))))
                }
                Some(r) => {
                    r.propose(request, now, callback);
                    self.dirty.insert(group);
                }
                None => callback(crate::apply::error_response(not_hosted(group))),
            },
            StoreMsg::Read { group, request, callback } => match with_engine(&mut self.replicas, group) {
                Some(r) if stale(r, &request.partition) => callback(ReadResponse {
                    error: Some(r.addressed_by_another_count(addressed_count(&request.partition)).into()),
                    ..Default::default()
                }),
                Some(r) => {
                    r.read(request, now, self.clock.monotonic(), callback);
                    self.dirty.insert(group);
                }
                None => callback(ReadResponse { error: Some(not_hosted(group).into()), ..Default::default() }),
            },
            StoreMsg::Raft { group, message, snapshot_dir } => {
                // A message for another peer of the group (one this node no longer or not yet hosts)
                // must not reach the replica that is here.
                if let Some(r) = self.replicas.get_mut(&group).filter(|r| r.peer_id == message.to) {
                    r.step(message, snapshot_dir);
                    self.dirty.insert(group);
                } else if let Some(dir) = snapshot_dir {
                    let _ = self.files.remove_all(&dir);
                } else if !self.replicas.contains_key(&group) && message.entries.is_empty() {
                    // Votes, heartbeats and empty appends only: entries are sent again anyway.
                    if self.parked.len() >= PARKED_MESSAGES_MAX {
                        self.parked.pop_front();
                    }
                    self.parked.push_back((group, message, self.ticks));
                }
            }
            StoreMsg::NodePing { from } => {
                if let Some(heard) = self.peer_nodes.heard.get_mut(&from) {
                    *heard = self.ticks;
                }
            }
            StoreMsg::SnapshotReport { group, to_peer, ok } => {
                if let Some(r) = self.replicas.get_mut(&group) {
                    r.report_snapshot(to_peer, ok);
                    self.dirty.insert(group);
                }
            }
            StoreMsg::Unreachable { group, to_peer } => {
                if let Some(r) = self.replicas.get_mut(&group) {
                    r.report_unreachable(to_peer);
                }
            }
            StoreMsg::EnsureReplicas(specs) => {
                for spec in specs {
                    let (group, peer) = (spec.group, spec.peer_id);
                    if let Some(why) = self.retired_refusal(&spec) {
                        tracing::error!("cannot create replica: {why}");
                        self.refused.insert(group, (peer, why));
                        continue;
                    }
                    self.refused.remove(&group);
                    if let Err(e) = self.ensure_replica(spec) {
                        tracing::error!("cannot create replica: {e}");
                    }
                }
            }
            StoreMsg::DropTables(tables) => {
                let doomed: Vec<GroupId> = self.hosted().filter(|g| tables.contains(&g.table_id())).collect();
                self.destroy_replicas(doomed, "its table was dropped");
                self.refused.retain(|g, _| !tables.contains(&g.table_id()));
            }
            StoreMsg::RetainReplicas { tables, keep } => {
                let listed = |g: &GroupId| tables.iter().any(|(t, count)| *t == g.table_id() && g.partition() < *count);
                let doomed: Vec<GroupId> = self.hosted().filter(|g| listed(g) && !keep.contains(g)).collect();
                self.destroy_replicas(doomed, "it was removed from its group");
                self.refused.retain(|g, _| !listed(g) || keep.contains(g));
            }
            StoreMsg::Status(callback) => {
                let mut statuses: Vec<ReplicaStatus> = self.replicas.values().map(|r| r.status()).collect();
                statuses.extend(self.unopened.values().map(|u| ReplicaStatus {
                    group_id: u.meta.group,
                    peer_id: u.meta.peer_id,
                    failure: u.failure.clone(),
                    ..Default::default()
                }));
                // Also when a newer peer of the group is here (one meta cancelled and forgot): meta
                // must see that the peer it counts on cannot come back.
                statuses.extend(self.refused.iter().map(|(g, (peer, why))| ReplicaStatus {
                    group_id: g.0,
                    peer_id: *peer,
                    failure: why.clone(),
                    ..Default::default()
                }));
                callback(statuses)
            }
            StoreMsg::Checksum { group, at_unix_ms, data_only, callback } => match with_engine(&mut self.replicas, group) {
                Some(r) => callback(r.checksum(if at_unix_ms == 0 { now } else { at_unix_ms }, data_only)),
                None => callback(Err(not_hosted(group))),
            },
            StoreMsg::Flush { group, begin, callback } => match with_engine(&mut self.replicas, group) {
                Some(r) => callback(r.flush_engine(begin)),
                None => callback(Err(not_hosted(group))),
            },
            StoreMsg::Checkpoint { group, dir, min_applied_index, partition_count, callback } => match with_engine(&mut self.replicas, group) {
                Some(r) if partition_count != 0 && r.partition_count() != partition_count => {
                    callback(Err(r.addressed_by_another_count(partition_count)))
                }
                Some(r) => callback(r.checkpoint_into(&dir, min_applied_index)),
                None => callback(Err(not_hosted(group))),
            },
            StoreMsg::DupLog { group, after, max_entries, max_bytes, callback } => match with_engine(&mut self.replicas, group) {
                Some(r) => callback(r.dup_log(after, max_entries, max_bytes)),
                None => callback(Err(not_hosted(group))),
            },
            StoreMsg::LogWritten => {}
            StoreMsg::Shutdown => return false,
        }
        true
    }

    /// Every group with a replica directory here, open or not.
    fn hosted(&self) -> impl Iterator<Item = GroupId> + '_ {
        self.replicas.keys().chain(self.unopened.keys()).copied()
    }

    /// Why a peer cannot be hosted here, if it was destroyed on this node (or an older peer than
    /// one that was).
    fn retired_refusal(&self, spec: &ReplicaSpec) -> Option<String> {
        let retired = self.retired.get(&spec.group).filter(|r| spec.peer_id <= **r)?;
        Some(format!(
            "peer {} of {} is not created again: peer {retired} of the group was destroyed on this node, and a destroyed peer has forgotten its votes",
            spec.peer_id, spec.group
        ))
    }

    fn ensure_replica(&mut self, spec: ReplicaSpec) -> Result<(), TernError> {
        if let Some(why) = self.retired_refusal(&spec) {
            return Err(TernError::invalid(why));
        }
        if let Some(u) = self.unopened.get(&spec.group) {
            if u.meta.peer_id == spec.peer_id {
                return Ok(()); // retried on its own schedule; meta replaces it meanwhile
            }
            self.destroy_replicas(vec![spec.group], "a newer peer of its group replaces it on this node");
        }
        if self.replicas.get(&spec.group).is_some_and(|r| r.peer_id != spec.peer_id) {
            // Meta removed this node's old peer of the group and now wants a new one here: the old
            // replica is stale. Found by the simulator (scheduler sweep): a replica moved back to a
            // node that still hosted its predecessor received the new peer's messages.
            self.destroy_replicas(vec![spec.group], "a newer peer of its group replaces it on this node");
        }
        let everyone: Vec<(PeerId, NodeId)> = spec.peers.iter().chain(&spec.learners).chain(&spec.removing).copied().collect();
        if let Some(r) = self.replicas.get_mut(&spec.group) {
            r.set_peers(everyone)?;
            r.reconcile_membership(&spec.peers, &spec.learners, spec.preferred_leader_peer);
            r.want_partition_count(spec.partition_count, self.clock.now_unix_ms(), self.ticks);
            self.dirty.insert(spec.group);
            return Ok(());
        }
        if let Some(parent) = self.unsplit_parent(&spec) {
            // This node's replica of the parent has not applied the split yet: applying it makes
            // the child here from its own state, without a snapshot.
            tracing::debug!(node = self.node_id, group = %spec.group, "waiting for {parent} to split");
            return Ok(());
        }
        self.clean_log(spec.group)?;
        let dir = self.data_dir.join("replicas").join(spec.group.0.to_string());
        // Durably: a replica whose directory a crash could lose would come back as a fresh one,
        // having forgotten votes and entries its raft log still holds.
        let created =
            if self.cfg.replica.planted.replica_dir_not_durable { self.files.create_dir_all(&dir) } else { self.files.create_dir_all_durably(&dir) };
        created.map_err(|e| TernError::Internal(format!("create {}: {e}", dir.display())))?;
        let meta = ReplicaMeta {
            group: spec.group.0,
            peer_id: spec.peer_id,
            peers: everyone,
            // An initial replica's log begins at the table's first partition count (a split may
            // be under way); any other starts empty and takes its state from a snapshot.
            partition_count: if spec.initial && spec.initial_partition_count > 0 { spec.initial_partition_count } else { spec.partition_count },
            engine_dir: "engine".into(),
        };
        meta.save(&*self.files, &dir)?;
        // The engine creates its directory if it is missing; made here and durably, so a crash
        // cannot leave replica.json naming an engine directory that is gone.
        self.files.create_dir_all_durably(&dir.join(&meta.engine_dir)).map_err(|e| TernError::Internal(format!("create engine directory: {e}")))?;
        // The same first configuration as every other initial replica of the partition, whatever
        // meta has changed since (a replica created late, after a move, must not start from the
        // new one: found by the simulator, split seeds 11055 and 11172).
        let first = if spec.initial_voters.is_empty() { spec.peers.iter().map(|(p, _)| *p).collect() } else { spec.initial_voters.clone() };
        let voters = spec.initial.then_some(first);
        let mut replica = self.open_replica(meta, dir, voters)?;
        if spec.preferred_leader {
            replica.campaign();
        }
        tracing::info!(node = self.node_id, group = %spec.group, peer = spec.peer_id, "created replica");
        self.dirty.insert(spec.group);
        self.insert_replica(spec.group, replica);
        Ok(())
    }

    /// The parent this node hosts of a split child meta assigns here, if it has not split yet.
    fn unsplit_parent(&self, spec: &ReplicaSpec) -> Option<GroupId> {
        let half = spec.partition_count / 2;
        let index = spec.group.partition().checked_sub(half).filter(|_| half > 0)?;
        let parent = GroupId::new(spec.group.table_id(), index);
        self.replicas.get(&parent).filter(|r| r.applied_partition_count() < spec.partition_count && r.failure().is_none()).map(|_| parent)
    }

    /// A new replica starts from an empty log, whatever an earlier replica of the group left.
    /// (After every started write: one still in flight for an earlier replica of the group would
    /// otherwise land after the check.)
    fn clean_log(&mut self, group: GroupId) -> Result<(), TernError> {
        self.wait_for_log_writes();
        if self.log.hard_state(group.0)?.is_some() || self.log.last_index(group.0).is_some() {
            let mut clean = LogWriteBatch::default();
            clean.push(group.0, crate::log_store::LogOp::Clean);
            self.log.write(clean, true)?;
        }
        Ok(())
    }

    /// Children a crash caught after their checkpoint (its `replica.json`, written last, says it is
    /// whole) but before they were moved into place are moved now: their parent, flushed past the
    /// split by the checkpoint, does not apply it again. The rest of `splits/` is removed.
    fn open_staged_children(&mut self) -> Result<(), TernError> {
        let splits = self.data_dir.join(crate::replica::SPLITS_DIR);
        if !self.files.exists(&splits) {
            return Ok(());
        }
        let io = |e: std::io::Error| TernError::Internal(format!("split children in {}: {e}", splits.display()));
        for staging in self.files.read_dir(&splits).map_err(io)? {
            if let Ok(meta) = ReplicaMeta::load(&*self.files, &staging) {
                tracing::info!(node = self.node_id, group = %GroupId(meta.group), "opening a split child a restart interrupted");
                self.open_split_child(crate::replica::SplitChild { staging, meta, leader: false });
            }
        }
        self.files.remove_all(&splits).map_err(io)
    }

    /// Opens the child a replica here checkpointed at a split entry: moved into place durably, it
    /// starts from the parent's state at that entry (its log begins there). Not when this node
    /// has a replica of the child already (the split entry applied again after a restart, or meta
    /// had it filled from a snapshot), or destroyed one that is at least as new.
    fn open_split_child(&mut self, child: crate::replica::SplitChild) {
        let group = GroupId(child.meta.group);
        let retired = self.retired.get(&group).is_some_and(|r| child.meta.peer_id <= *r);
        if self.hosted().any(|g| g == group) || retired {
            let _ = self.files.remove_all(&child.staging);
            return;
        }
        let dir = self.data_dir.join("replicas").join(group.0.to_string());
        let moved = self.clean_log(group).and_then(|()| {
            self.files.rename_durably(&child.staging, &dir).map_err(|e| TernError::Internal(format!("move split child into place: {e}")))
        });
        if let Err(e) = moved {
            // Meta fills this child from a snapshot instead.
            tracing::error!(node = self.node_id, group = %group, "cannot open split child: {e}");
            let _ = self.files.remove_all(&child.staging);
            return;
        }
        self.open_or_report(child.meta, dir);
        let Some(replica) = self.replicas.get_mut(&group) else { return };
        if child.leader {
            replica.campaign();
        }
        tracing::info!(node = self.node_id, group = %group, "opened split child");
        let ticks = self.ticks;
        let expired_before = ticks.saturating_sub(self.cfg.replica.election_tick as u64);
        for (g, message, at) in std::mem::take(&mut self.parked) {
            if g != group {
                self.parked.push_back((g, message, at));
            } else if at >= expired_before && message.to == replica.peer_id {
                replica.step(message, None);
            }
        }
    }

    /// Destroys replicas, crash-safely: each directory is first renamed to a tombstone (durably), so
    /// from then on a restart never opens the replica again, its vote and data gone as one; then the
    /// raft logs are cleaned (one synced write) and the files removed. A restart finishes any
    /// tombstone it finds. (Cleaning the log first, then removing files, could bring back a replica
    /// with its vote erased, or a half-deleted engine, after a crash in between.)
    fn destroy_replicas(&mut self, doomed: Vec<GroupId>, why: &str) {
        if doomed.is_empty() {
            return;
        }
        // Retire the peer ids first (durably), so none of them is ever created here again.
        for group in &doomed {
            let peer = self.replicas.get(group).map(|r| r.peer_id).or_else(|| self.unopened.get(group).map(|u| u.meta.peer_id));
            if let Some(peer) = peer {
                let entry = self.retired.entry(*group).or_default();
                *entry = (*entry).max(peer);
            }
        }
        let retired: Vec<(u64, PeerId)> = self.retired.iter().map(|(g, p)| (g.0, *p)).collect();
        let bytes = serde_json::to_vec(&retired).expect("serialize retired peers");
        if let Err(e) = self.files.write_file_atomically(&self.data_dir.join(RETIRED_FILE), &bytes) {
            panic!("cannot record retired replicas: {e}");
        }
        let mut tombstones = Vec::new();
        for group in doomed {
            self.failed_since.remove(&group);
            let (dir, peer) = match self.replicas.remove(&group) {
                Some(mut replica) => {
                    replica.fail_all(TernError::PartitionNotFound(format!("replica of {group} was destroyed: {why}")));
                    let found = (replica.dir().to_path_buf(), replica.peer_id);
                    drop(replica); // closes its engine
                    found
                }
                None => {
                    let u = self.unopened.remove(&group).expect("listed by the caller");
                    (u.dir, u.meta.peer_id)
                }
            };
            let name = format!("{}.{}{TOMBSTONE_SUFFIX}", group.0, peer);
            let tombstone = self.data_dir.join("replicas").join(name);
            if let Err(e) = self.files.rename_durably(&dir, &tombstone) {
                panic!("cannot retire replica directory {}: {e}", dir.display());
            }
            self.dirty.remove(&group);
            tracing::info!(node = self.node_id, group = %group, "destroying replica: {why}");
            tombstones.push(tombstone);
        }
        if let Err(e) = self.finish_destroying(tombstones) {
            panic!("destroying replicas failed: {e}");
        }
    }

    /// Cleans the raft logs of retired replica directories and removes their files.
    fn finish_destroying(&mut self, tombstones: Vec<PathBuf>) -> Result<(), TernError> {
        let mut retired = Vec::new();
        let mut clean = LogWriteBatch::default();
        for tombstone in tombstones {
            // The group is in the name: a tombstone's replica.json may be gone if removal was cut short.
            let name = tombstone.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            let Some(group) = name.split('.').next().and_then(|g| g.parse::<u64>().ok()) else {
                return Err(TernError::Corruption(format!("unrecognised replica tombstone {}", tombstone.display())));
            };
            // The group's log and engine path belong to no one once the directory is retired, unless
            // a newer replica of the group already lives here (it started from a clean log).
            let live = self.data_dir.join("replicas").join(group.to_string());
            let newer = self.files.exists(&live.join("replica.json"));
            if !newer {
                clean.push(group, crate::log_store::LogOp::Clean);
            }
            retired.push((group, tombstone, live, newer));
        }
        if !clean.is_empty() {
            self.wait_for_log_writes();
            self.log.write(clean, true)?;
        }
        for (group, tombstone, live, newer) in retired {
            if !newer {
                // Through the factory, under the path the engine lived at: it owns what an engine
                // directory means (the memory engine keys its contents by it).
                // Every engine directory it held (its metadata may be gone if removal was cut short).
                let mut engine_dirs: Vec<String> = ReplicaMeta::load(&*self.files, &tombstone).map(|m| vec![m.engine_dir]).unwrap_or_default();
                if let Ok(entries) = self.files.read_dir(&tombstone) {
                    engine_dirs
                        .extend(entries.iter().filter_map(|p| p.file_name()?.to_str().map(str::to_string)).filter(|n| n.starts_with("engine")));
                }
                engine_dirs.sort();
                engine_dirs.dedup();
                for name in engine_dirs {
                    if let Err(e) = self.engines.destroy(&live.join(name)) {
                        tracing::warn!(group, "destroy engine: {e}");
                    }
                }
                let _ = self.files.remove_all(&self.data_dir.join("snapshots").join(group.to_string()));
            }
            let io = |e: std::io::Error| TernError::Internal(format!("remove {}: {e}", tombstone.display()));
            self.files.remove_all(&tombstone).map_err(io)?;
            self.files.sync_directory(&self.data_dir.join("replicas")).map_err(io)?;
        }
        Ok(())
    }

    pub fn tick(&mut self) {
        self.ticks += 1;
        let now = self.clock.monotonic();
        for (group, replica) in self.replicas.iter_mut() {
            if replica.is_hibernating() {
                continue;
            }
            replica.tick(now);
            // Also when it just went to sleep: its notices to peers go out with the round.
            self.dirty.insert(*group);
        }
        self.watch_peer_nodes();
        self.close_unused_engines();
        self.reopen_failed_replicas();
        if self.ticks.is_multiple_of(self.cfg.log_purge_interval_ticks) {
            if let Err(e) = self.log.purge() {
                tracing::warn!("raft log purge: {e}");
            }
        }
    }

    /// Keeps at most `engines_open_max` engines open: past it, closes those unused longest
    /// (hibernating replicas' first), each once nothing needs it. One whose applied state is not
    /// durable yet starts syncing and closes on a later tick; only as many are tried per tick as
    /// there are engines too many, so that busy replicas' engines do not all flush at once.
    fn close_unused_engines(&mut self) {
        let ticks = self.ticks;
        let used = &mut self.engines_used;
        let mut open = Vec::new();
        for (group, r) in &self.replicas {
            if !r.engine_is_open() {
                used.remove(group);
                continue;
            }
            // Last seen used: when its use count last changed.
            let last = used.entry(*group).or_insert((ticks, r.engine_uses()));
            if last.1 != r.engine_uses() {
                *last = (ticks, r.engine_uses());
            }
            open.push((!r.is_hibernating(), last.0, *group));
        }
        let excess = open.len().saturating_sub(self.cfg.engines_open_max);
        if excess == 0 {
            return;
        }
        open.sort_unstable();
        let mut tried = 0;
        for (_, _, group) in open {
            if tried == excess {
                break;
            }
            let replica = self.replicas.get_mut(&group).expect("listed above");
            if replica.close_engine_if_unused() {
                self.engines_used.remove(&group);
                tried += 1;
            } else if replica.engine_sync_in_flight() {
                tried += 1; // closes once durable
            }
        }
    }

    /// Pings the nodes this node's replicas have peers on, and wakes the hibernating followers of
    /// a leader whose node has fallen silent for an election timeout.
    fn watch_peer_nodes(&mut self) {
        let ticks = self.ticks;
        if ticks % PEER_NODES_REFRESH_TICKS == 1 || self.peer_nodes.list.is_empty() {
            let mut nodes = BTreeSet::new();
            for replica in self.replicas.values() {
                nodes.extend(replica.meta().peers.iter().map(|(_, n)| *n).filter(|n| *n != self.node_id));
            }
            let pn = &mut self.peer_nodes;
            pn.heard.retain(|n, _| nodes.contains(n));
            pn.silent.retain(|n| nodes.contains(n));
            for n in &nodes {
                pn.heard.entry(*n).or_insert(ticks);
            }
            pn.list = nodes.into_iter().collect();
        }
        if self.peer_nodes.list.is_empty() {
            return;
        }
        self.transport.ping(&self.peer_nodes.list);
        let timeout = self.cfg.replica.election_tick as u64;
        let pn = &mut self.peer_nodes;
        for (node, heard) in &pn.heard {
            if ticks.saturating_sub(*heard) > timeout {
                if pn.silent.insert(*node) {
                    tracing::info!(node = self.node_id, "node {node} has gone silent");
                }
            } else {
                pn.silent.remove(node);
            }
        }
        if pn.silent.is_empty() {
            return;
        }
        // Every tick while a node is silent (a follower may go to sleep on a notice that arrived
        // late, after its leader's node was already counted silent).
        for (group, replica) in self.replicas.iter_mut() {
            if replica.hibernating_leader_node().is_some_and(|n| pn.silent.contains(&n)) {
                tracing::info!(node = self.node_id, group = %group, "waking: the leader's node is silent");
                replica.wake();
                self.dirty.insert(*group);
            }
        }
    }

    /// Runs Ready for every touched replica, with one synced log write for all of them, started
    /// and not waited for: raft goes on (async ready), and each round is finished once its write is
    /// durable (`finish_durable_rounds`). With a writer that writes at once, that is within this
    /// call, as many rounds as persistence makes ready.
    pub fn process_ready(&mut self) {
        for _ in 0..ROUNDS_PER_CALL_MAX {
            if !self.round() {
                return;
            }
        }
    }

    /// One round; true if finishing durable rounds left replicas with more to do.
    fn round(&mut self) -> bool {
        let mut outbox = Vec::new();
        let now = self.clock.now_unix_ms();
        let monotonic = self.clock.monotonic();
        let mut batch = LogWriteBatch::default();
        let mut readies = Vec::new();
        let mut children = Vec::new();
        for group in std::mem::take(&mut self.dirty) {
            let Some(replica) = self.replicas.get_mut(&group) else { continue };
            replica.flush_reads(monotonic);
            replica.maybe_generate_snapshot();
            if let Some((number, messages)) = replica.collect_ready(&mut outbox, &mut batch, now) {
                readies.push((group, self.incarnations[&group], number, messages));
            }
            children.extend(replica.take_split_children());
            replica.maybe_generate_snapshot();
            if replica.has_ready() {
                self.dirty.insert(group);
            }
        }
        if !outbox.is_empty() {
            self.transport.send(std::mem::take(&mut outbox));
        }
        if !batch.is_empty() {
            self.log_writer.start(batch);
            self.writes_started += 1;
        }
        if !readies.is_empty() {
            // Finished when this round's write (or, with nothing to write, the last one) is durable.
            self.unpersisted.push_back(UnpersistedRound { write: self.writes_started, readies });
        }
        for child in children {
            let group = GroupId(child.meta.group);
            self.open_split_child(child);
            self.dirty.insert(group);
        }
        let finished = self.finish_durable_rounds(&mut outbox);
        if !outbox.is_empty() {
            self.transport.send(outbox);
        }
        finished
    }

    /// Finishes every round whose log write is durable: raft counts its entries as persisted and the
    /// messages that waited for them go out. True if any round was finished.
    fn finish_durable_rounds(&mut self, outbox: &mut Vec<OutMessage>) -> bool {
        let durable = match self.log_writer.durable() {
            Ok(d) => d,
            Err(e) => panic!("raft log write failed: {e}"),
        };
        let mut finished = false;
        while self.unpersisted.front().is_some_and(|r| r.write <= durable) {
            let round = self.unpersisted.pop_front().expect("checked");
            for (group, incarnation, number, messages) in round.readies {
                // A replica destroyed or reopened since is another raft node: not this Ready's.
                let Some(replica) = self.replicas.get_mut(&group).filter(|_| self.incarnations.get(&group) == Some(&incarnation)) else { continue };
                replica.on_persisted(number, messages, outbox);
                self.dirty.insert(group);
            }
            finished = true;
        }
        finished
    }

    pub fn has_work(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Fails every waiting client; called when the node stops.
    pub fn shutdown(&mut self) {
        for r in self.replicas.values_mut() {
            r.fail_all(TernError::Unavailable("server is shutting down".into()));
        }
    }
}

/// A round whose log write is not known durable yet.
struct UnpersistedRound {
    /// The write that makes it durable (counted from 1).
    write: u64,
    /// (group, replica incarnation, Ready number, messages to send once durable)
    readies: Vec<(GroupId, u64, u64, Vec<raft::eraftpb::Message>)>,
}

/// Rounds one `process_ready` call runs at most while persistence makes replicas ready again.
const ROUNDS_PER_CALL_MAX: usize = 4;

fn is_tombstone(path: &std::path::Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(TOMBSTONE_SUFFIX))
}

/// The mailbox's sending side, cloned by every service that talks to the store.
#[derive(Clone)]
pub struct StoreHandle {
    sender: Sender<StoreMsg>,
}

impl StoreMsg {
    /// Answers whoever waits on this message with an error (the message could not be delivered).
    pub fn fail(self, e: TernError) {
        match self {
            StoreMsg::Write { callback, .. } => callback(crate::apply::error_response(e)),
            StoreMsg::Read { callback, .. } => callback(ReadResponse { error: Some(e.into()), ..Default::default() }),
            StoreMsg::Checksum { callback, .. } => callback(Err(e)),
            StoreMsg::Checkpoint { callback, .. } => callback(Err(e)),
            StoreMsg::DupLog { callback, .. } => callback(Err(e)),
            StoreMsg::Flush { callback, .. } => callback(Err(e)),
            // Dropped unanswered: "no replicas" would be a lie a heartbeat could pass on to meta.
            StoreMsg::Status(_) => {}
            // A received snapshot nobody will install. (This runs on the production mailbox's
            // sending side, where the transport wrote it to the real file system.)
            StoreMsg::Raft { snapshot_dir: Some(dir), .. } => {
                let _ = std::fs::remove_dir_all(dir);
            }
            _ => {}
        }
    }
}

impl StoreHandle {
    /// Delivers a message without blocking; a full or stopped mailbox answers its callback with
    /// Busy or Unavailable instead.
    pub fn send(&self, msg: StoreMsg) {
        match self.sender.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(msg)) => msg.fail(TernError::Busy("store mailbox is full".into())),
            Err(TrySendError::Disconnected(msg)) => msg.fail(TernError::Unavailable("store has stopped".into())),
        }
    }
}

impl StoreHandle {
    /// Asks the store to stop, waiting up to `wait` for room in a full mailbox (blocks the caller).
    /// False if the request could not be delivered (the store is gone or stayed full).
    pub fn request_shutdown(&self, wait: Duration) -> bool {
        self.sender.send_timeout(StoreMsg::Shutdown, wait).is_ok()
    }
}

/// Creates a mailbox.
pub fn mailbox(capacity: usize) -> (StoreHandle, Receiver<StoreMsg>) {
    let (sender, receiver) = crossbeam_channel::bounded(capacity);
    (StoreHandle { sender }, receiver)
}

/// What one round of the production driver takes from the mailbox, and how often it ticks.
#[derive(Clone, Copy, Debug)]
pub struct RoundLimits {
    pub tick_interval: Duration,
    pub messages_max: usize,
    pub write_bytes_max: usize,
}

impl StoreConfig {
    pub fn round_limits(&self) -> RoundLimits {
        RoundLimits { tick_interval: self.tick_interval, messages_max: self.round_messages_max, write_bytes_max: self.round_write_bytes_max }
    }
}

/// Bytes a message adds to its round's client writes.
fn write_bytes(msg: &StoreMsg) -> usize {
    match msg {
        StoreMsg::Write { request, .. } => prost::Message::encoded_len(request),
        _ => 0,
    }
}

/// The production driver: one thread runs rounds until shutdown or until every handle is dropped.
pub fn run(mut store: Store, mailbox: Receiver<StoreMsg>, limits: RoundLimits) {
    let tick_interval = limits.tick_interval;
    let mut next_tick = Instant::now() + tick_interval;
    'rounds: loop {
        let wait = if store.has_work() { Duration::ZERO } else { next_tick.saturating_duration_since(Instant::now()) };
        match mailbox.recv_timeout(wait) {
            Ok(msg) => {
                let mut bytes = write_bytes(&msg);
                if !store.handle(msg) {
                    break 'rounds;
                }
                for _ in 1..limits.messages_max {
                    if bytes >= limits.write_bytes_max {
                        break;
                    }
                    match mailbox.try_recv() {
                        Ok(msg) => {
                            bytes += write_bytes(&msg);
                            if !store.handle(msg) {
                                break 'rounds;
                            }
                        }
                        Err(_) => break,
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        if now >= next_tick {
            store.tick();
            next_tick += tick_interval;
            if next_tick < now {
                next_tick = now + tick_interval;
            }
        }
        store.process_ready();
    }
    store.shutdown();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_store::MemoryLogStore;
    use std::path::Path;
    use tern_core::files::{FileSystem, MemoryFileSystem};
    use tern_core::time::ManualClock;
    use tern_engine::MemoryEngineFactory;

    struct NoNetwork;
    impl Transport for NoNetwork {
        fn send(&mut self, _: Vec<OutMessage>) {}
        fn ping(&mut self, _: &[NodeId]) {}
    }

    /// One simulated node's disks: everything in memory, with crash semantics.
    struct Disks {
        log: Arc<MemoryLogStore>,
        engines: Arc<MemoryEngineFactory>,
        files: Arc<MemoryFileSystem>,
    }

    impl Disks {
        fn new() -> Disks {
            let files = Arc::new(MemoryFileSystem::new());
            let engines = Arc::new(MemoryEngineFactory::with_file_system(None, files.clone()));
            Disks { log: Arc::new(MemoryLogStore::default()), engines, files }
        }

        fn open(&self) -> Store {
            let disks = NodeDisks { log: self.log.clone(), engines: self.engines.clone(), files: self.files.clone() };
            Store::open(1, "/node".into(), disks, ManualClock::new(1_000), 7, StoreConfig::default(), Box::new(NoNetwork)).unwrap()
        }

        /// A store with one single-voter replica of `group` (peer 11), after `run_a_while`.
        fn open_with_voter(&self, group: GroupId) -> Store {
            let mut store = self.open();
            store.handle(StoreMsg::EnsureReplicas(vec![single_voter(group, 11)]));
            run_a_while(&mut store);
            store
        }

        /// A power failure: each disk keeps only what was made durable.
        fn crash(&self) {
            self.log.crash();
            self.engines.crash();
            self.files.crash();
        }
    }

    fn single_voter(group: GroupId, peer: PeerId) -> ReplicaSpec {
        ReplicaSpec {
            group,
            peer_id: peer,
            peers: vec![(peer, 1)],
            learners: vec![],
            removing: vec![],
            initial_voters: vec![],
            initial: true,
            partition_count: 1,
            initial_partition_count: 0,
            preferred_leader: true,
            preferred_leader_peer: 0,
        }
    }

    fn run_a_while(store: &mut Store) {
        for _ in 0..30 {
            store.tick();
            store.process_ready();
        }
    }

    /// Destroying a replica is crash-safe: its directory is first renamed to a tombstone, so a crash
    /// right after that never brings the replica back (with its vote erased or half its engine
    /// gone); the restart finishes the job (log cleaned, files removed) and a new replica of the
    /// group starts clean.
    #[test]
    fn destroy_interrupted_by_a_crash_is_finished_on_restart() {
        let disks = Disks::new();
        let group = GroupId::new(1, 0);
        let store = disks.open_with_voter(group);
        assert!(disks.log.hard_state(group.0).unwrap().is_some(), "the replica wrote its raft log");
        drop(store);

        // The first step of a destroy, then a crash.
        let replicas = Path::new("/node/replicas");
        disks.files.rename_durably(&replicas.join(group.0.to_string()), &replicas.join(format!("{}.11{TOMBSTONE_SUFFIX}", group.0))).unwrap();
        disks.crash();
        let mut store = disks.open();
        assert_eq!(store.replica_count(), 0, "a retired replica is never reopened");
        assert!(disks.log.hard_state(group.0).unwrap().is_none() && disks.log.last_index(group.0).is_none(), "its raft log was cleaned");
        assert!(disks.files.read_dir(replicas).unwrap().is_empty(), "the tombstone was removed");
        disks.crash();
        assert!(disks.files.read_dir(replicas).unwrap().is_empty(), "durably");

        // A destroy that runs to the end leaves nothing behind either, across a crash too.
        store.handle(StoreMsg::EnsureReplicas(vec![single_voter(group, 12)]));
        store.process_ready();
        store.handle(StoreMsg::DropTables(vec![group.table_id()]));
        assert_eq!(store.replica_count(), 0);
        disks.crash();
        assert!(disks.files.read_dir(replicas).unwrap().is_empty());
        assert!(disks.log.hard_state(group.0).unwrap().is_none());
        assert_eq!(disks.open().replica_count(), 0);
    }

    /// Writes `value` under `hashkey` through the store; the answer's error, if any.
    fn write(store: &mut Store, group: GroupId, count: u32, hashkey: &[u8], value: &[u8]) -> Option<TernError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let op = tern_proto::write_request::Op::Set(tern_proto::MultiSet {
            hashkey: hashkey.to_vec().into(),
            values: vec![tern_proto::SortkeyValue { sortkey: Default::default(), value: value.to_vec().into(), ttl_seconds: 0, expire_at_ms: 0 }],
        });
        let partition = Some(tern_proto::PartitionRef { table_id: group.table_id(), partition: group.partition(), partition_count: count });
        let request = WriteRequest { partition, op: Some(op), ..Default::default() };
        store.handle(StoreMsg::Write { group, request, callback: Box::new(move |r| drop(tx.send(r))) });
        run_a_while(store);
        rx.try_recv().expect("answered").error.map(|e| TernError::from(&e))
    }

    /// Reads `hashkey` linearizably through the store: the value, or the error.
    fn read(store: &mut Store, group: GroupId, hashkey: &[u8]) -> Result<Vec<u8>, TernError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let op = tern_proto::read_request::Op::Get(tern_proto::MultiGet { hashkey: hashkey.to_vec().into(), ..Default::default() });
        let partition = Some(tern_proto::PartitionRef { table_id: group.table_id(), partition: group.partition(), partition_count: 1 });
        let request = ReadRequest { partition, op: Some(op), ..Default::default() };
        store.handle(StoreMsg::Read { group, request, callback: Box::new(move |r| drop(tx.send(r))) });
        run_a_while(store);
        let r = rx.try_recv().expect("answered");
        match r.error {
            Some(e) => Err(TernError::from(&e)),
            None => Ok(r.records.first().map(|rec| rec.value.to_vec()).unwrap_or_default()),
        }
    }

    /// A store keeps at most `engines_open_max` engines open, from the moment it opens: past it,
    /// an engine closes as soon as its replica has read its state, and again once unused. The
    /// elections after a restart apply their empty entries without opening any engine; the engine
    /// learns the applied position when it next opens (a write or a read), and the same holds
    /// after a crash (the raft log still holds those entries).
    #[test]
    fn engines_open_stay_bounded_from_start_up() {
        let disks = Disks::new();
        let groups: Vec<GroupId> = (1..=4).map(|t| GroupId::new(t, 0)).collect();
        let cfg = StoreConfig { engines_open_max: 1, ..Default::default() };
        let open = |cfg: &StoreConfig| {
            let nd = NodeDisks { log: disks.log.clone(), engines: disks.engines.clone(), files: disks.files.clone() };
            Store::open(1, "/node".into(), nd, ManualClock::new(1_000), 7, cfg.clone(), Box::new(NoNetwork)).unwrap()
        };
        let mut store = open(&cfg);
        store.handle(StoreMsg::EnsureReplicas(groups.iter().enumerate().map(|(i, g)| single_voter(*g, 11 + i as u64)).collect()));
        run_a_while(&mut store);
        for g in &groups {
            assert_eq!(write(&mut store, *g, 1, b"k", format!("v{}", g.table_id()).as_bytes()), None);
        }
        run_a_while(&mut store);
        assert!(store.engines_open() <= 1, "{} engines open", store.engines_open());
        drop(store);
        for restart in 0..2 {
            if restart == 1 {
                disks.crash();
            }
            let mut store = open(&cfg);
            assert!(store.engines_open() <= 1, "{} engines open after start", store.engines_open());
            run_a_while(&mut store);
            assert_eq!(store.leases().len(), groups.len(), "every group elected its leader");
            assert!(store.engines_open() <= 1, "{} engines open after the elections", store.engines_open());
            for g in &groups {
                assert_eq!(read(&mut store, *g, b"k").unwrap(), format!("v{}", g.table_id()).into_bytes());
            }
            assert_eq!(write(&mut store, groups[0], 1, b"k", b"v1"), None);
            run_a_while(&mut store);
            assert!(store.engines_open() <= 1, "{} engines open", store.engines_open());
            assert!(store.failed_replicas().is_empty(), "{:?}", store.failed_replicas());
        }
    }

    /// Meta asks for twice the partitions: the leader proposes the split, and its store opens the
    /// child from the checkpoint taken at the split entry, holding the parent's records of its
    /// half and serving them; the parent refuses the old count. A child a crash caught after its
    /// checkpoint but before it was moved into place is moved and opened when the store restarts.
    #[test]
    fn a_split_opens_the_child_from_the_parent_checkpoint() {
        let disks = Disks::new();
        let (parent, child) = (GroupId::new(1, 0), GroupId::new(1, 1));
        let mut store = disks.open_with_voter(parent);
        let moving = (0..).map(|i| format!("k{i}")).find(|k| tern_core::codec::partition_of(k.as_bytes(), 2) == 1).unwrap();
        assert_eq!(write(&mut store, parent, 1, moving.as_bytes(), b"v1"), None);
        store.handle(StoreMsg::EnsureReplicas(vec![ReplicaSpec { partition_count: 2, ..single_voter(parent, 11) }]));
        run_a_while(&mut store);
        assert_eq!(store.replica_count(), 2, "the child is open beside its parent");
        assert!(matches!(write(&mut store, parent, 1, moving.as_bytes(), b"v2"), Some(TernError::PartitionSplit { partition_count: 2, .. })));
        assert!(matches!(
            write(&mut store, parent, 2, moving.as_bytes(), b"v2"),
            Some(TernError::InvalidArgument(_)) | Some(TernError::PartitionSplit { .. })
        ));
        assert_eq!(write(&mut store, child, 2, moving.as_bytes(), b"v2"), None, "the child leads its half");
        let statuses = {
            let (tx, rx) = std::sync::mpsc::channel();
            store.handle(StoreMsg::Status(Box::new(move |s| drop(tx.send(s)))));
            rx.try_recv().unwrap()
        };
        assert!(statuses.iter().all(|s| s.partition_count == 2 && s.is_leader), "{statuses:?}");
        drop(store);

        // A crash between the checkpoint and the move into place.
        disks.files.create_dir_all(Path::new("/node/splits")).unwrap();
        disks.files.rename_durably(Path::new(&format!("/node/replicas/{}", child.0)), Path::new(&format!("/node/splits/{}", child.0))).unwrap();
        disks.crash();
        let mut store = disks.open();
        run_a_while(&mut store);
        assert_eq!(store.replica_count(), 2, "the staged child was moved into place and opened");
        assert!(disks.files.read_dir(Path::new("/node/splits")).is_err(), "nothing is left staged");
        assert_eq!(write(&mut store, child, 2, moving.as_bytes(), b"v3"), None);
    }

    /// A new replica that is not yet a voter (a learner waiting for its first snapshot) does not
    /// campaign even when its node is the preferred leader: raft-rs would elect it by an empty
    /// quorum and crash. Found by the simulator (three nodes, a replica replaced in place).
    #[test]
    fn a_new_learner_never_campaigns() {
        let disks = Disks::new();
        let group = GroupId::new(1, 0);
        let mut store = disks.open();
        let spec = ReplicaSpec { initial: false, peers: vec![(21, 2), (22, 3)], learners: vec![(23, 1)], ..single_voter(group, 23) };
        store.handle(StoreMsg::EnsureReplicas(vec![spec]));
        run_a_while(&mut store);
        assert_eq!(store.replica_count(), 1);
        assert!(store.leases().is_empty());
    }

    /// A destroyed peer is never created again on the node: it has forgotten its votes and log. An
    /// assignment of it is reported to meta as a failed peer.
    #[test]
    fn a_destroyed_peer_is_never_created_again() {
        let disks = Disks::new();
        let group = GroupId::new(1, 0);
        let mut store = disks.open_with_voter(group);
        store.handle(StoreMsg::DropTables(vec![group.table_id()]));
        drop(store);
        disks.crash();
        let mut store = disks.open();
        store.handle(StoreMsg::EnsureReplicas(vec![single_voter(group, 11)]));
        assert_eq!(store.replica_count(), 0, "peer 11 stays retired across a restart");
        // Meta hears that the peer it assigned cannot be hosted here, so it replaces it.
        let failed = |store: &mut Store| {
            let (tx, rx) = std::sync::mpsc::channel();
            store.handle(StoreMsg::Status(Box::new(move |s| drop(tx.send(s)))));
            rx.recv().unwrap().into_iter().filter(|r| !r.failure.is_empty()).map(|r| r.peer_id).collect::<Vec<_>>()
        };
        assert_eq!(failed(&mut store), vec![11]);
        store.handle(StoreMsg::EnsureReplicas(vec![single_voter(group, 12)]));
        assert_eq!(store.replica_count(), 1, "a newer peer is created");
        assert!(failed(&mut store).is_empty(), "and the refusal is forgotten");
    }

    /// A replica that has voted and written its log survives a crash right after: its directory
    /// and metadata were made durable when it was created, so it is not recreated from nothing
    /// (which would forget its vote and the entries it acknowledged).
    #[test]
    fn a_new_replica_survives_a_crash() {
        let disks = Disks::new();
        let group = GroupId::new(1, 0);
        let store = disks.open_with_voter(group);
        let term = disks.log.hard_state(group.0).unwrap().expect("voted").term;
        drop(store);
        disks.crash();
        let store = disks.open();
        assert_eq!(store.replica_count(), 1, "the replica came back from its directory");
        assert_eq!(disks.log.hard_state(group.0).unwrap().map(|h| h.term), Some(term));
    }

    /// A crash after a snapshot's engine was installed, but before the log reset that goes with it
    /// was durable, leaves an older log whose entry at the applied index is from another term. The
    /// replica restarts its log from the engine instead of keeping the divergent entries.
    #[test]
    fn a_log_that_diverges_from_the_engine_is_reset() {
        let disks = Disks::new();
        let group = GroupId::new(1, 0);
        let store = disks.open_with_voter(group);
        let last = disks.log.last_index(group.0).expect("the replica wrote its log");
        let term = disks.log.hard_state(group.0).unwrap().expect("voted").term;
        drop(store);
        // The engine as a snapshot from a later term at the same index left it.
        let engine = disks.engines.open(Path::new("/node/replicas").join(group.0.to_string()).join("engine").as_path()).unwrap();
        let mut state = crate::apply::StateMachine::open(engine, crate::apply::ApplyState::default()).unwrap().state().clone();
        state.applied_index = last;
        state.applied_term = term + 5;
        let engine = disks.engines.open(Path::new("/node/replicas").join(group.0.to_string()).join("engine").as_path()).unwrap();
        let mut wb = tern_engine::WriteBatch::default();
        wb.put(crate::keys::APPLY_STATE_KEY.to_vec(), state.encode());
        engine.write(wb).unwrap();
        engine.sync().unwrap();
        drop(engine);
        let mut store = disks.open();
        store.process_ready();
        assert_eq!(disks.log.truncated(group.0).unwrap(), Some((last, term + 5)), "the log restarts at the engine's position");
    }
}
