//! One partition replica: a raft-rs `RawNode` over `PeerStorage`, the `StateMachine`, and the
//! bookkeeping that ties client requests to log entries. It is changed only by its `Store`, one event
//! at a time; it does no network I/O itself (messages go to the store's outbox) and writes the raft
//! log only through the round's shared `LogWriteBatch`.
//!
//! Rooms: this file is the raft glue (opening, proposals, ticks, Ready handling in raft-rs's order,
//! apply, status); `reads` holds linearizable reads and the leader lease; `hibernation` how an idle
//! group stops ticking and what wakes it; `membership` the replica
//! set (conf changes, learners, leadership transfer to the preferred peer); `snapshots` snapshot
//! files (generation, received checkpoints, installation) and the replica's metadata file; `split`
//! a partition split (proposing it, checkpointing the child); `config` its configuration and the
//! bugs tests plant.

mod config;
mod hibernation;
mod membership;
mod reads;
mod snapshots;
mod split;

pub use config::{PlantedBugs, ReplicaConfig, ELECTION_TICK_DEFAULT, HIBERNATE_AFTER_TICKS_DEFAULT};
pub use hibernation::wake_notice;
use reads::{fail_reads, Lease, ReadBatch};
pub use snapshots::ReplicaMeta;
use snapshots::RECEIVED_SNAPSHOTS_MAX;
pub use split::{SplitChild, SPLITS_DIR};

use crate::apply::{error_response, ApplyState, StateMachine, StorageFailure};
use crate::log_store::{LogWriteBatch, PeerStorage};
use crate::read::{checksum, execute_read};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfChangeV2, ConfState, EntryType, Message, MessageType, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tern_core::files::{FileSystem, SharedFileSystem};
use tern_core::{GroupId, NodeId, PeerId, TernError};
use tern_engine::EngineFactory;
use tern_proto::{RaftCommand, ReadRequest, ReadResponse, ReplicaStatus, WriteRequest, WriteResponse};

pub type WriteCallback = Box<dyn FnOnce(WriteResponse) + Send>;
pub type ReadCallback = Box<dyn FnOnce(ReadResponse) + Send>;

/// Raft log position every initial replica of a partition starts from (as TiKV does), so that all
/// initial members agree on the state below it without exchanging a snapshot.
pub const INITIAL_INDEX: u64 = 5;
pub const INITIAL_TERM: u64 = 5;

/// A raft message leaving this node; snapshots carry the directory of the checkpoint to stream.
#[derive(Debug)]
pub struct OutMessage {
    pub group: GroupId,
    pub to_node: NodeId,
    pub message: Message,
    pub snapshot_dir: Option<PathBuf>,
}

struct Proposal {
    index: u64,
    term: u64,
    callback: WriteCallback,
}

pub struct Replica {
    pub group: GroupId,
    pub peer_id: PeerId,
    meta: ReplicaMeta,
    dir: PathBuf,
    snapshot_dir: PathBuf,
    raw: RawNode<PeerStorage>,
    sm: StateMachine,
    engines: Arc<dyn EngineFactory>,
    /// Every file the replica touches, through the node's file system (simulated in the simulator).
    files: SharedFileSystem,
    cfg: ReplicaConfig,
    proposals: VecDeque<Proposal>,
    waiting_reads: Vec<(ReadRequest, ReadCallback)>,
    read_batches: VecDeque<ReadBatch>,
    next_read_id: u64,
    lease: Lease,
    ticks: u64,
    snapshots_applied: u64,
    received_snapshots: HashMap<(u64, u64), PathBuf>,
    /// Log changes made outside a Ready (compaction); drained into the round's batch.
    pending_log: LogWriteBatch,
    was_leader: bool,
    last_transfer_tick: u64,
    /// Applied a configuration without itself: ignores raft messages and ticks from then on.
    removed: bool,
    /// Stopped after a storage failure (the reason): takes no further part and answers nothing but
    /// errors, until meta replaces it or the server restarts.
    failure: Option<String>,
    /// Vote requests are ignored until this tick: a replica opened from disk may have heard from a
    /// leader just before it went down, and must not help elect a candidate cut off from that leader
    /// before a follower that stayed up would (check_quorum's vote refusal, which a restart forgets).
    votes_refused_until_tick: u64,
    /// Applied index the engine holds durably (as of the last finished engine sync).
    synced_index: u64,
    /// An engine sync started and not yet finished. Syncs run in the engine's background: a
    /// RocksDB flush of a memtable takes tens of milliseconds, which every replica of the node
    /// would otherwise wait for on the store thread (at each log GC and periodic sync).
    sync_in_flight: Option<crate::apply::PendingSync>,
    /// Not ticking: the group is idle (see `hibernation`).
    hibernating: bool,
    /// Consecutive quiescent ticks of a leader.
    idle_ticks: u64,
    /// Messages of Tern's own to peers (hibernate and wake notices), sent with the next Ready.
    outgoing: Vec<Message>,
    /// Times something made sure the engine was open to use it (`ensure_engine`): the store
    /// closes the engines unused longest.
    engine_uses: u64,
    /// Children checkpointed by split entries applied, for the store to open (see `split`).
    split_children: Vec<SplitChild>,
    /// The tick a split was last proposed at (a leader proposes again only after a while).
    split_proposed_tick: Option<u64>,
}

/// Where in `[0, period)` this group's periodic work falls: Fibonacci hashing of the group id, so
/// the partitions of a table (consecutive ids) spread evenly over the period, the same on every
/// node and every run.
fn group_phase(group: GroupId, period: u64) -> u64 {
    let fraction = group.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    ((fraction as u128 * period as u128) >> 32) as u64
}

/// Opens a replica's state machine, with the planted bug that concerns it when a test asks for it.
fn open_state_machine(
    engine: Box<dyn tern_engine::KvEngine>,
    initial: ApplyState,
    meta: &ReplicaMeta,
    planted: &PlantedBugs,
) -> Result<StateMachine, TernError> {
    let mut sm = StateMachine::open(engine, initial)?;
    sm.set_owner(GroupId(meta.group).partition(), meta.partition_count)?;
    if planted.expiry_by_local_clock {
        sm.plant_expiry_by_local_clock();
    }
    if planted.lww_ignores_expired {
        sm.plant_lww_ignores_expired();
    }
    Ok(sm)
}

/// Mends an append raft-rs's `batch_append` merged wrongly. raft-rs 0.7 (`Raft::try_batching`)
/// appends a round's new entries to a MsgAppend already queued for the same peer when the queued
/// one carries no entries, whatever its index: an empty append after index 147 merged with entries
/// 146 and 147 (the peer's next index had moved back after a rejection) says "146 and 147 follow
/// 147", and the follower answers that it holds up to 149, past the leader's own log; the leader
/// then counts entries as replicated that the follower never had (found by the simulator, scheduler
/// seed 2411: raft-rs panicked on a heartbeat committing past the follower's log). The entries are
/// what the leader means to send, so the append is restated as following the entry before the
/// first of them. False: that entry's term is gone (compacted): drop the message, raft sends again.
fn repair_batched_append(m: &mut Message, term_of: impl Fn(u64) -> Option<u64>) -> bool {
    let Some(first) = m.entries.first().map(|e| e.index) else { return true };
    if m.get_msg_type() != MessageType::MsgAppend || first == m.index + 1 {
        return true;
    }
    match term_of(first - 1) {
        Some(term) => {
            m.index = first - 1;
            m.log_term = term;
            true
        }
        None => false,
    }
}

fn fatal(group: GroupId, what: &str, e: impl std::fmt::Display) -> ! {
    // Storage failures leave raft state unknowable: stop rather than risk serving wrong data.
    panic!("replica {group}: {what}: {e}");
}

impl Replica {
    /// Opens (or, for a new initial replica, bootstraps) a replica from its directory.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        meta: ReplicaMeta,
        dir: PathBuf,
        snapshot_dir: PathBuf,
        bootstrap_voters: Option<Vec<PeerId>>,
        disks: &crate::store::NodeDisks,
        cfg: ReplicaConfig,
        election_tick: usize,
    ) -> Result<Replica, TernError> {
        let (log, engines, files) = (disks.log.clone(), disks.engines.clone(), disks.files.clone());
        let group = GroupId(meta.group);
        let engine = engines.open(&dir.join(&meta.engine_dir)).map_err(crate::apply::engine_error)?;
        let initial_state = match &bootstrap_voters {
            Some(voters) => {
                let mut cs = ConfState::default();
                cs.voters = voters.clone();
                ApplyState {
                    applied_index: INITIAL_INDEX,
                    applied_term: INITIAL_TERM,
                    conf_state: cs,
                    partition_count: meta.partition_count,
                    ..Default::default()
                }
            }
            None => ApplyState::default(),
        };
        let sm = open_state_machine(engine, initial_state, &meta, &cfg.planted)?;
        let applied = sm.state().clone();
        let initial_pos = (applied.applied_index, applied.applied_term);
        let mut storage = PeerStorage::open(group.0, log.clone(), applied.conf_state.clone(), initial_pos)?;
        let mut pending_log = LogWriteBatch::default();
        let fresh_log = log.hard_state(group.0)?.is_none();
        // The log's entry at the applied index is from another term than the one the engine applied:
        // the engine holds a snapshot whose log reset a crash lost, over an older, divergent log.
        let diverged = storage.last_log_index() >= applied.applied_index
            && storage.term_of(applied.applied_index).is_ok_and(|term| term != applied.applied_term);
        if storage.last_log_index() < applied.applied_index || diverged {
            // The engine is ahead of the log (or of its own history): a snapshot was installed but
            // the log reset was not written before a crash. The engine is the truth; restart the
            // log from it.
            let mut snap = Snapshot::default();
            snap.mut_metadata().index = applied.applied_index;
            snap.mut_metadata().term = applied.applied_term;
            snap.mut_metadata().set_conf_state(applied.conf_state.clone());
            storage.apply_snapshot(&snap, &mut pending_log);
        } else if storage.hard_state().commit < applied.applied_index {
            // Entries were applied (so they were committed) but the commit index written after them
            // was lost in a crash. Keep the log: entries past the applied index may have been
            // acknowledged to a leader.
            storage.set_commit(applied.applied_index, &mut pending_log);
        } else if fresh_log {
            storage.initial_writes(&mut pending_log);
        }
        let config = raft::Config {
            id: meta.peer_id,
            election_tick: cfg.election_tick,
            min_election_tick: election_tick,
            max_election_tick: election_tick + 1,
            heartbeat_tick: cfg.heartbeat_tick,
            applied: applied.applied_index,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            max_uncommitted_size: 128 * 1024 * 1024,
            // A round's new entries go to each follower as one message, not one per proposal
            // (measured: +12% replicated writes). Its size is bounded by the round's write bytes
            // (`StoreConfig::round_write_bytes_max`), as raft-rs does not bound a merged message.
            batch_append: true,
            ..Default::default()
        };
        config.validate().map_err(|e| TernError::Internal(format!("raft config: {e}")))?;
        let restarted = bootstrap_voters.is_none() && !fresh_log;
        let votes_refused_until_tick = if restarted && !cfg.planted.vote_right_after_restart { cfg.election_tick as u64 } else { 0 };
        let logger = crate::raft_log::logger(group);
        let raw = RawNode::new(&config, storage, &logger).map_err(|e| TernError::Internal(format!("raft: {e}")))?;
        files.create_dir_all(&snapshot_dir).map_err(|e| TernError::Internal(format!("create {}: {e}", snapshot_dir.display())))?;
        Ok(Replica {
            group,
            peer_id: meta.peer_id,
            meta,
            dir,
            snapshot_dir,
            raw,
            sm,
            engines,
            files,
            cfg,
            proposals: VecDeque::new(),
            waiting_reads: Vec::new(),
            read_batches: VecDeque::new(),
            next_read_id: 1,
            lease: Lease::default(),
            ticks: 0,
            snapshots_applied: 0,
            received_snapshots: HashMap::new(),
            pending_log,
            was_leader: false,
            last_transfer_tick: 0,
            removed: false,
            failure: None,
            votes_refused_until_tick,
            // `StateMachine::open` synced what it read.
            synced_index: applied.applied_index,
            sync_in_flight: None,
            hibernating: false,
            idle_ticks: 0,
            outgoing: Vec::new(),
            engine_uses: 0,
            split_children: Vec::new(),
            split_proposed_tick: None,
        })
    }

    pub fn meta(&self) -> &ReplicaMeta {
        &self.meta
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// Neither removed from its group nor stopped by a storage failure.
    fn active(&self) -> bool {
        !self.removed && self.failure.is_none()
    }

    /// The error a stopped replica answers with (retryable: the client tries another replica).
    fn unavailable(&self) -> TernError {
        TernError::Unavailable(format!(
            "replica of partition {} stopped: {}",
            self.group,
            self.failure.as_deref().unwrap_or("removed from its group")
        ))
    }

    /// Stops this replica after a storage failure: it takes no further part in raft (its peers carry
    /// on and elect another leader if it led), waiting clients learn the outcome is unknown, and its
    /// status tells meta, which replaces it from a healthy peer. The node's other replicas go on.
    fn fail(&mut self, failure: StorageFailure) {
        tracing::error!(group = %self.group, peer = self.peer_id, "replica stopped: {failure}");
        self.failure = Some(failure.to_string());
        // Awake, so the store runs its Ready and the notices go out.
        self.wake();
        self.wake_peers();
        self.fail_all(TernError::Timeout(format!("replica of partition {} stopped ({failure}); outcome unknown", self.group)));
    }

    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    fn node_of(&self, peer: PeerId) -> Option<NodeId> {
        self.meta.peers.iter().find(|(p, _)| *p == peer).map(|(_, n)| *n)
    }

    fn not_leader(&self) -> TernError {
        TernError::NotLeader { leader: self.node_of(self.raw.raft.leader_id) }
    }

    /// Starts an election, if this replica is a voter of its configuration. raft-rs campaigns on
    /// request even when it is not, and a replica created empty (a learner waiting for its first
    /// snapshot) would then win an election of nobody and crash raft. Found by the simulator with
    /// three nodes: a stopped replica replaced on its own node, which was the preferred leader.
    pub fn campaign(&mut self) {
        if self.raw.raft.promotable() {
            let _ = self.raw.campaign();
        }
    }

    /// The table's partition count as this partition's applied log has it (see `apply::Owner`),
    /// or, for an empty replica that has none yet, the one meta assigned.
    pub fn partition_count(&self) -> u32 {
        match self.sm.state().partition_count {
            0 => self.meta.partition_count,
            count => count,
        }
    }

    /// The partition count this replica has applied (0: none yet, an empty replica): what says
    /// whether it has split.
    pub fn applied_partition_count(&self) -> u32 {
        self.sm.state().partition_count
    }

    /// Children this replica's partition split off since last asked (see `split`).
    pub fn take_split_children(&mut self) -> Vec<SplitChild> {
        std::mem::take(&mut self.split_children)
    }

    /// Proposes a client write stamped with the leader's wall clock.
    pub fn propose(&mut self, write: WriteRequest, now_unix_ms: u64, callback: WriteCallback) {
        if self.failure.is_some() {
            return callback(error_response(self.unavailable()));
        }
        self.client_activity();
        if !self.is_leader() || self.removed {
            return callback(error_response(self.not_leader()));
        }
        if self.proposals.len() >= self.cfg.pending_proposals_max {
            return callback(error_response(TernError::Busy(format!(
                "partition {} has {} writes in flight (limit {})",
                self.group,
                self.proposals.len(),
                self.cfg.pending_proposals_max
            ))));
        }
        let cluster_tag = tern_core::codec::cluster_tag(self.cfg.cluster_id.load(std::sync::atomic::Ordering::Relaxed));
        let data = RaftCommand { now_unix_ms, write: Some(write), cluster_tag }.encode_to_vec();
        let before = self.raw.raft.raft_log.last_index();
        match self.raw.propose(vec![], data) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                if index == before {
                    return callback(error_response(TernError::ProposalDropped("proposal was not appended".into())));
                }
                self.proposals.push_back(Proposal { index, term: self.raw.raft.term, callback });
            }
            Err(e) => callback(error_response(TernError::ProposalDropped(format!("raft refused the proposal: {e}")))),
        }
    }

    /// Steps a raft message from a peer. A snapshot message comes with the directory it was received into.
    pub fn step(&mut self, message: Message, snapshot_dir: Option<PathBuf>) {
        if !self.active() {
            if let Some(dir) = snapshot_dir {
                let _ = self.files.remove_all(&dir);
            }
            return;
        }
        if Self::is_hibernate_notice(&message) {
            return self.on_hibernate_notice(&message);
        }
        if Self::is_wake_notice(&message) {
            return self.wake();
        }
        if self.wakes_up_on(&message) {
            self.wake();
        }
        let vote = matches!(message.get_msg_type(), MessageType::MsgRequestVote | MessageType::MsgRequestPreVote);
        if vote && self.ticks < self.votes_refused_until_tick && message.get_context() != raft::CAMPAIGN_TRANSFER {
            return; // as a follower that heard from its leader would (a leader transfer is exempt)
        }
        if message.get_msg_type() == MessageType::MsgSnapshot {
            let meta = message.get_snapshot().get_metadata();
            match snapshot_dir {
                Some(dir) => {
                    // Only a whole snapshot reaches raft: one cut short is dropped here (the leader
                    // sends it again), never installed.
                    if !self.cfg.planted.unverified_snapshot {
                        if let Err(e) = crate::snapshot::verify(&*self.files, &dir, crate::snapshot::Check::Sizes) {
                            tracing::warn!(group = %self.group, "refused a received snapshot: {e}");
                            let _ = self.files.remove_all(&dir);
                            return;
                        }
                    }
                    // A snapshot delivered twice (a retried stream) replaces the earlier copy.
                    if let Some(earlier) = self.received_snapshots.insert((meta.index, meta.term), dir) {
                        let _ = self.files.remove_all(&earlier);
                    }
                    // Snapshots raft rejected (stale or duplicate) are never installed: keep a few.
                    while self.received_snapshots.len() > RECEIVED_SNAPSHOTS_MAX {
                        let oldest = *self.received_snapshots.keys().min().expect("not empty");
                        if let Some(stale) = self.received_snapshots.remove(&oldest) {
                            let _ = self.files.remove_all(&stale);
                        }
                    }
                }
                None => return, // a snapshot without its data cannot be installed
            }
        }
        let _ = self.raw.step(message);
    }

    pub fn report_snapshot(&mut self, to_peer: PeerId, ok: bool) {
        if !self.active() {
            return;
        }
        self.wake();
        let status = if ok { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
        self.raw.report_snapshot(to_peer, status);
    }

    pub fn report_unreachable(&mut self, to_peer: PeerId) {
        if !self.active() {
            return;
        }
        self.wake();
        self.raw.report_unreachable(to_peer);
    }

    pub fn tick(&mut self, now: Duration) {
        if !self.active() {
            return;
        }
        self.ticks += 1;
        self.raw.tick();
        // Renew a lease that reads are using before it runs out, so they never wait for a round.
        let lease = self.cfg.read_lease;
        let renewing = self.read_batches.iter().any(|b| b.index.is_none());
        if self.is_leader() && !lease.is_zero() && !renewing && now < self.lease.used_at + 2 * lease && self.lease.until < now + lease / 2 {
            self.issue_read_index(Vec::new(), now);
        }
        // Read indexes are dropped by raft while a new leader has not committed in its term: re-ask,
        // and give up after a while so clients retry elsewhere.
        let now = self.ticks;
        let timeout = self.cfg.read_timeout_ticks;
        let mut expired = Vec::new();
        for batch in self.read_batches.iter_mut() {
            if batch.index.is_none() {
                if now - batch.first_tick >= timeout {
                    expired.push(batch.id);
                } else if now - batch.issued_tick >= 5 {
                    batch.issued_tick = now;
                    self.raw.read_index(batch.id.to_be_bytes().to_vec());
                }
            }
        }
        for id in expired {
            if let Some(pos) = self.read_batches.iter().position(|b| b.id == id) {
                let batch = self.read_batches.remove(pos).expect("position is valid");
                fail_reads(batch.reads, TernError::Timeout("no read index from raft in time".into()));
            }
        }
        self.poll_engine_sync();
        if self.ticks.is_multiple_of(self.cfg.log_gc_interval_ticks) {
            self.maybe_compact_log();
        }
        // Staggered by group, so a node's replicas do not all sync (flush a memtable) in the same
        // second: a burst of flushes delays every raft-log fsync on the disk.
        let interval = self.cfg.expiry_sync_interval_ticks;
        let due = (self.ticks + group_phase(self.group, interval)).is_multiple_of(interval);
        if due {
            self.start_engine_sync();
        }
        self.maybe_hibernate();
    }

    /// Starts an engine sync (see `StateMachine::begin_sync`) unless one is under way or nothing
    /// was applied since the last; a failure stops the replica, an engine that cannot start one now
    /// (RocksDB with writes stopped) is asked again later.
    fn start_engine_sync(&mut self) {
        let idle = self.sync_in_flight.is_some() || self.failure.is_some() || self.sm.state().applied_index <= self.synced_index;
        // A closed engine was synced before it closed; what was applied since without it (empty
        // entries) reaches it when it opens again.
        if idle || !self.sm.engine_is_open() {
            return;
        }
        match self.sm.begin_sync() {
            Ok(pending) => self.sync_in_flight = pending,
            Err(e) => self.fail(StorageFailure(e)),
        }
    }

    /// Notes a finished engine sync; a failure stops the replica.
    fn poll_engine_sync(&mut self) {
        let Some(pending) = &self.sync_in_flight else { return };
        match self.sm.sync_finished(pending) {
            Ok(false) => {}
            Ok(true) => {
                self.synced_index = self.synced_index.max(pending.applied_index);
                self.sync_in_flight = None;
            }
            Err(e) => {
                self.sync_in_flight = None;
                self.fail(StorageFailure(e));
            }
        }
    }

    fn maybe_compact_log(&mut self) {
        let applied = self.sm.state().applied_index;
        let first = self.raw.store().first_log_index();
        if applied < first + self.cfg.log_gc_count_threshold {
            return;
        }
        let mut target = applied;
        if self.is_leader() {
            let min_matched = self.raw.raft.prs().iter().map(|(_, p)| p.matched).min().unwrap_or(applied);
            if applied.saturating_sub(min_matched) <= self.cfg.log_gc_lag_max {
                target = min_matched.min(applied);
            }
        }
        // The engine must hold everything below the new log start durably before the log goes:
        // collect what the last finished sync covers. The periodic syncs (staggered by group) move
        // that along; a sync of the log's own only once it holds two to three times the threshold
        // (where in that range depends on the group), so replicas under the same load do not all
        // flush their memtables in the same second (a burst of flushes delays every raft-log fsync
        // on the disk).
        if target > self.synced_index {
            let threshold = self.cfg.log_gc_count_threshold;
            if applied >= first + 2 * threshold + group_phase(self.group, threshold) {
                self.start_engine_sync();
            }
            target = self.synced_index;
        }
        if target < first {
            return;
        }
        if let Err(e) = self.raw.mut_store().compact_to(target, &mut self.pending_log) {
            fatal(self.group, "compact log", e);
        }
    }

    pub fn has_ready(&self) -> bool {
        (self.failure.is_none() && self.raw.has_ready()) || !self.pending_log.is_empty() || !self.outgoing.is_empty()
    }

    /// Handles a Ready in raft-rs's documented order: send leader messages, install a snapshot,
    /// apply committed entries (raft-rs hands over only entries this replica has persisted), queue
    /// new entries and hard state into the round's log batch. Raft goes on at once (async ready):
    /// returns the Ready's number and the messages that must wait until the batch is durable, for
    /// `on_persisted`.
    pub fn collect_ready(&mut self, outbox: &mut Vec<OutMessage>, log_batch: &mut LogWriteBatch, now_unix_ms: u64) -> Option<(u64, Vec<Message>)> {
        log_batch.ops.append(&mut self.pending_log.ops);
        if self.failure.is_some() || !self.raw.has_ready() {
            let own = std::mem::take(&mut self.outgoing);
            self.route(own, outbox);
            return None;
        }
        let mut rd = self.raw.ready();
        // The engine (closed while the replica slept) only when this Ready installs a snapshot or
        // applies something (`apply_entries` opens it for entries that need it).
        if !rd.snapshot().is_empty() {
            self.ensure_engine();
            if self.failure.is_some() {
                return None;
            }
        }
        if let Some(ss) = rd.ss() {
            self.on_role_change(ss.raft_state);
        }
        self.route(rd.take_messages(), outbox);
        // After raft's: a hibernate notice follows the heartbeats of the tick it was sent in.
        let own = std::mem::take(&mut self.outgoing);
        self.route(own, outbox);
        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot().clone(), log_batch);
        }
        for rs in rd.take_read_states() {
            let id = u64::from_be_bytes(rs.request_ctx.as_slice().try_into().unwrap_or([0; 8]));
            if let Some(batch) = self.read_batches.iter_mut().find(|b| b.id == id) {
                batch.index.get_or_insert(rs.index);
                // A quorum confirmed this leader after the round was first issued: a lease from then.
                let allowed = batch.term == self.raw.raft.term && batch.term != self.lease.forbidden_term;
                if allowed && batch.lease_epoch == self.lease.epoch && !self.cfg.read_lease.is_zero() {
                    let until = batch.issued_at + self.cfg.read_lease;
                    if self.lease.term != batch.term || until > self.lease.until {
                        self.lease.until = until;
                        self.lease.term = batch.term;
                    }
                }
            }
        }
        let committed = rd.take_committed_entries();
        self.apply_entries(committed, now_unix_ms);
        if self.failure.is_some() {
            return None; // stopped: this Ready is never finished
        }
        if !rd.entries().is_empty() {
            let entries = rd.take_entries();
            self.raw.mut_store().append(&entries, log_batch);
        }
        if let Some(hs) = rd.hs() {
            self.raw.mut_store().set_hard_state(hs.clone(), log_batch);
        }
        let number = rd.number();
        let persisted = rd.take_persisted_messages();
        self.raw.advance_append_async(rd);
        self.report_applied();
        Some((number, persisted))
    }

    /// Tells raft how far the state machine has applied, once raft counts that far as persisted
    /// here: an installed snapshot is applied before its Ready is durable.
    fn report_applied(&mut self) {
        let applied = self.sm.state().applied_index;
        let log = &self.raw.raft.raft_log;
        if applied > log.applied && applied <= log.persisted.min(log.committed) {
            self.raw.advance_apply_to(applied);
        }
    }

    /// The log write holding Ready `number` (and every earlier one) is durable: raft counts its
    /// entries as persisted, and the messages that waited for it go out.
    pub fn on_persisted(&mut self, number: u64, messages: Vec<Message>, outbox: &mut Vec<OutMessage>) {
        if self.removed {
            // Out of its group, it takes no further part (see `apply_conf_change`): raft-rs counts a
            // leader's persisted entries in the leader's own progress, which a removed leader no
            // longer has (it panicked: found by the simulator, scheduler seed 5217).
            return;
        }
        self.raw.on_persist_ready(number);
        let durable = self.raw.raft.raft_log.persisted;
        self.raw.mut_store().set_durable(durable);
        if self.failure.is_none() {
            self.report_applied();
            self.route(messages, outbox);
        }
    }

    fn on_role_change(&mut self, role: StateRole) {
        let leader = role == StateRole::Leader;
        if self.was_leader && !leader {
            // Pending proposals stay: they are answered when their index is applied (committed in
            // our term, or replaced by the new leader's entry). Reads must go to the new leader.
            let batches: Vec<ReadBatch> = self.read_batches.drain(..).collect();
            for b in batches {
                fail_reads(b.reads, self.not_leader());
            }
            fail_reads(std::mem::take(&mut self.waiting_reads), self.not_leader());
        }
        if leader != self.was_leader {
            tracing::info!(group = %self.group, term = self.raw.raft.term, "{}", if leader { "leads" } else { "no longer leads" });
        }
        if leader && !self.was_leader {
            // Proposals of an earlier term of ours were either committed by the leaders in between or
            // overwritten: unknown. Left queued they would sit ahead of this term's (their indexes
            // can be higher, from a log since truncated) and hold up its answers.
            let term = self.raw.raft.term;
            let (old, current): (VecDeque<Proposal>, VecDeque<Proposal>) = self.proposals.drain(..).partition(|p| p.term < term);
            self.proposals = current;
            for p in old {
                (p.callback)(error_response(TernError::Timeout(format!(
                    "entry {} of term {} was proposed before this leader's term {term}; outcome unknown",
                    p.index, p.term
                ))));
            }
        }
        self.was_leader = leader;
    }

    fn route(&self, messages: Vec<Message>, outbox: &mut Vec<OutMessage>) {
        for mut message in messages {
            let Some(to_node) = self.node_of(message.to) else { continue };
            // raft-rs answers 0 for a term below its log (compacted) or past it: none there.
            let log = &self.raw.raft.raft_log;
            let term_of = |index: u64| (index + 1 >= log.first_index()).then(|| log.term(index).ok()).flatten().filter(|t| *t > 0);
            if !repair_batched_append(&mut message, term_of) {
                continue;
            }
            let snapshot_dir = (message.get_msg_type() == MessageType::MsgSnapshot).then(|| {
                let name = String::from_utf8_lossy(message.get_snapshot().get_data()).into_owned();
                self.snapshot_dir.join(name)
            });
            outbox.push(OutMessage { group: self.group, to_node, message, snapshot_dir });
        }
    }

    fn apply_entries(&mut self, entries: Vec<raft::eraftpb::Entry>, now_unix_ms: u64) {
        if entries.is_empty() {
            self.serve_reads(now_unix_ms);
            return;
        }
        // Raft's empty entries (a new leader's first) change nothing but the applied position: a
        // closed engine stays closed for them, so the elections that follow a server's restart or
        // a peer's death do not open every replica's engine (see `hibernation`).
        let empty = |e: &raft::eraftpb::Entry| e.get_entry_type() == EntryType::EntryNormal && e.data.is_empty();
        if !self.sm.engine_is_open() && entries.iter().all(empty) {
            let last = entries.last().expect("not empty");
            if last.index > self.sm.state().applied_index {
                self.sm.apply_empty_while_closed(last.index, last.term);
            }
            self.serve_reads(now_unix_ms);
            return;
        }
        self.ensure_engine();
        if self.failure.is_some() {
            return;
        }
        let mut batch = self.sm.begin();
        let mut results: Vec<(u64, u64, WriteResponse)> = Vec::new();
        for entry in &entries {
            if entry.index <= self.sm.state().applied_index {
                continue; // already applied before a restart
            }
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    if !entry.data.is_empty() {
                        let response = match batch.apply_command(self.sm.engine(), entry.index, &entry.data) {
                            Ok(response) => response,
                            Err(StorageFailure(e)) if self.cfg.planted.storage_failure_as_answer => error_response(e),
                            // Nothing of this round is written: the replica stops where it was.
                            Err(failure) => return self.fail(failure),
                        };
                        results.push((entry.index, entry.term, response));
                        if let Some(count) = batch.take_split() {
                            // The child starts from the state at exactly this entry: written, and
                            // checkpointed, before any later entry applies.
                            batch.set_applied(entry.index, entry.term);
                            if let Err(e) = self.sm.finish(batch) {
                                return self.fail(StorageFailure(e));
                            }
                            if let Err(e) = self.checkpoint_child(count, entry.index) {
                                return self.fail(StorageFailure(e));
                            }
                            batch = self.sm.begin();
                            continue;
                        }
                    }
                }
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    if let Err(e) = cc.merge_from_bytes(&entry.data) {
                        return self.fail(StorageFailure(TernError::Corruption(format!("undecodable conf change: {e}"))));
                    }
                    self.apply_conf_change(&cc, &mut batch);
                }
                EntryType::EntryConfChangeV2 => {
                    let mut cc = ConfChangeV2::default();
                    if let Err(e) = cc.merge_from_bytes(&entry.data) {
                        return self.fail(StorageFailure(TernError::Corruption(format!("undecodable conf change: {e}"))));
                    }
                    self.learn_peer_nodes(&entry.context);
                    if self.failure.is_some() {
                        return;
                    }
                    self.apply_conf_change(&cc, &mut batch);
                }
            }
            batch.set_applied(entry.index, entry.term);
        }
        if let Err(e) = self.sm.finish(batch) {
            return self.fail(StorageFailure(e));
        }
        self.sm.planted_expiry_horizon(now_unix_ms);
        for (index, term, response) in results {
            self.answer_proposal(index, term, response);
        }
        self.serve_reads(now_unix_ms);
    }

    fn answer_proposal(&mut self, index: u64, term: u64, response: WriteResponse) {
        while let Some(p) = self.proposals.front() {
            if p.index > index {
                return;
            }
            let p = self.proposals.pop_front().expect("front exists");
            if p.index == index && p.term == term {
                (p.callback)(response);
                return;
            }
            // Our entry at that index was replaced by another leader's: it was never committed.
            (p.callback)(error_response(TernError::ProposalDropped(format!(
                "entry {} of term {} was overwritten; the write did not happen",
                p.index, p.term
            ))));
        }
    }

    pub fn status(&self) -> ReplicaStatus {
        let leader_peer = self.raw.raft.leader_id;
        ReplicaStatus {
            group_id: self.group.0,
            peer_id: self.peer_id,
            // A stopped leader leads nothing (meta and clients must not count on it).
            is_leader: self.is_leader() && self.active(),
            term: self.raw.raft.term,
            applied_index: self.sm.state().applied_index,
            // A stopped replica's raft may know of commits past what it persisted (the Ready it
            // stopped in was never written): it reports what its storage holds.
            commit_index: if self.active() { self.raw.raft.raft_log.committed } else { self.raw.store().hard_state().commit },
            first_log_index: self.raw.store().first_log_index(),
            snapshots_applied: self.snapshots_applied,
            leader_peer,
            // Outgoing voters of a joint configuration still count.
            failure: self.failure.clone().unwrap_or_default(),
            voters: {
                let cs = &self.sm.state().conf_state;
                let mut v = cs.voters.clone();
                v.extend(cs.voters_outgoing.iter().filter(|p| !cs.voters.contains(p)));
                v
            },
            learners: self.sm.state().conf_state.learners.clone(),
            matched: if self.is_leader() && self.active() {
                self.raw.raft.prs().iter().filter(|(id, _)| **id != self.peer_id).map(|(id, pr)| (*id, pr.matched)).collect()
            } else {
                Default::default()
            },
            duplicating: !self.sm.dup_state().dups.is_empty(),
            hibernating: self.hibernating,
            // As applied (0: none yet): meta counts a parent as split by it.
            partition_count: self.applied_partition_count(),
        }
    }

    /// Answers every waiting client (the replica is being destroyed or the node is stopping).
    pub fn fail_all(&mut self, e: TernError) {
        for p in self.proposals.drain(..) {
            (p.callback)(error_response(e.clone()));
        }
        let batches: Vec<ReadBatch> = self.read_batches.drain(..).collect();
        for b in batches {
            fail_reads(b.reads, e.clone());
        }
        fail_reads(std::mem::take(&mut self.waiting_reads), e);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn snapshot_dir(&self) -> &Path {
        &self.snapshot_dir
    }
}

#[cfg(test)]
mod tests {
    use super::group_phase;
    use tern_core::GroupId;

    /// An append raft-rs merged wrongly (entries 146 and 147 said to follow 147) is restated as
    /// following 145, with 145's term; a correct one is left alone; one whose restated position
    /// has no term any more is dropped.
    #[test]
    fn a_wrongly_batched_append_is_mended() {
        use raft::eraftpb::{Entry, Message, MessageType};
        let append = |index: u64, log_term: u64, entries: &[u64]| {
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgAppend);
            m.index = index;
            m.log_term = log_term;
            m.entries = entries.iter().map(|&i| Entry { index: i, term: 8, ..Default::default() }).collect::<Vec<_>>().into();
            m
        };
        let terms = |i: u64| (i >= 140).then_some(if i >= 146 { 8 } else { 7 });
        let mut m = append(147, 8, &[146, 147]);
        assert!(super::repair_batched_append(&mut m, terms));
        assert_eq!((m.index, m.log_term), (145, 7));
        let mut ok = append(145, 7, &[146, 147]);
        assert!(super::repair_batched_append(&mut ok, |_| panic!("not asked")));
        assert_eq!((ok.index, ok.log_term), (145, 7));
        let mut probe = append(149, 8, &[]);
        assert!(super::repair_batched_append(&mut probe, terms));
        assert_eq!(probe.index, 149);
        let mut gone = append(147, 8, &[120, 121]);
        assert!(!super::repair_batched_append(&mut gone, terms));
    }

    /// The partitions of a table get periodic-work phases spread over the whole period (no two of
    /// eight within a twentieth of it), for any table, and every phase is inside the period.
    #[test]
    fn group_phases_spread_a_tables_partitions() {
        for table in [1u32, 2, 7, 1000] {
            let mut phases: Vec<u64> = (0..8).map(|p| group_phase(GroupId::new(table, p), 100)).collect();
            phases.sort_unstable();
            assert!(phases.windows(2).all(|w| w[1] - w[0] >= 5), "table {table}: {phases:?}");
            assert!(phases.iter().all(|&p| p < 100), "{phases:?}");
        }
        assert_eq!(group_phase(GroupId::new(3, 3), 1), 0);
        assert!(group_phase(GroupId(u64::MAX), u64::MAX) < u64::MAX);
    }
}
