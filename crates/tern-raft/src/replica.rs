//! One partition replica: a raft-rs `RawNode` over `PeerStorage`, the `StateMachine`, and the
//! bookkeeping that ties client requests to log entries. It is changed only by its `Store`, one event
//! at a time; it does no network I/O itself (messages go to the store's outbox) and writes the raft
//! log only through the round's shared `LogWriteBatch`.

use crate::apply::{error_response, ApplyState, StateMachine, StorageFailure};
use crate::log_store::{LogStore, LogWriteBatch, PeerStorage};
use crate::read::{checksum, execute_read};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfChangeV2, ConfState, EntryType, Message, MessageType, Snapshot};
use raft::{RawNode, Ready, SnapshotStatus, StateRole};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tern_core::{GroupId, NodeId, PeerId, TernError};
use tern_engine::EngineFactory;
use tern_proto::{RaftCommand, ReadRequest, ReadResponse, ReplicaStatus, WriteRequest, WriteResponse};

pub type WriteCallback = Box<dyn FnOnce(WriteResponse) + Send>;
pub type ReadCallback = Box<dyn FnOnce(ReadResponse) + Send>;

/// Raft log position every initial replica of a partition starts from (as TiKV does), so that all
/// initial members agree on the state below it without exchanging a snapshot.
pub const INITIAL_INDEX: u64 = 5;
pub const INITIAL_TERM: u64 = 5;
/// Bugs planted on purpose by the tests that prove the simulator catches them. They travel in the
/// configuration of the thing under test (never a process-wide switch that tests sharing a process
/// could race on); production leaves every one off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlantedBugs {
    /// A leader answers linearizable reads from local state without confirming leadership.
    pub read_without_read_index: bool,
    /// The read lease is 40 times longer than followers refuse votes for.
    pub lease_too_long: bool,
    /// A leader keeps using its lease after it started a leadership transfer.
    pub lease_through_transfer: bool,
    /// Compaction expires records by the node's wall clock instead of the applied log's clock.
    pub expiry_by_local_clock: bool,
    /// A storage failure at apply is answered as an error and the entry counts as applied.
    pub storage_failure_as_answer: bool,
    /// A received snapshot is handed to raft without checking it against its manifest.
    pub unverified_snapshot: bool,
    /// A restarted replica votes at once, forgetting it may have heard from a leader just before.
    pub vote_right_after_restart: bool,
}

/// Ticks between two attempts to hand leadership to the preferred peer.
const LEADER_TRANSFER_COOLDOWN_TICKS: u64 = 30;

/// A learner is promoted once it is within this many entries of the leader's log.
const LEARNER_CATCH_UP_ENTRIES: u64 = 100;

/// Received snapshot directories kept while waiting for raft to install one.
const RECEIVED_SNAPSHOTS_MAX: usize = 4;

#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// Ticks without a leader before an election; the real value is drawn per replica from
    /// [election_tick, 2 * election_tick) by the store's seeded generator.
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    /// Compact the log once this many applied entries sit in it.
    pub log_gc_count_threshold: u64,
    /// A leader keeps entries a follower still needs unless the follower lags by more than this.
    pub log_gc_lag_max: u64,
    /// Check for log compaction every this many ticks.
    pub log_gc_interval_ticks: u64,
    /// Sync the engine every this many ticks (when it applied something meanwhile), so compaction
    /// may expire records up to the durable applied clock (see `StateMachine::sync`).
    pub expiry_sync_interval_ticks: u64,
    /// Client writes proposed but not yet applied, per replica.
    pub pending_proposals_max: usize,
    /// Client reads waiting for a read index, per replica.
    pub pending_reads_max: usize,
    /// Give up on a read index after this many ticks (the client retries).
    pub read_timeout_ticks: u64,
    /// How long after a read-index round a leader may answer reads without another one (a lease).
    /// The store sets it below the time followers refuse to vote after hearing from a leader
    /// (election_tick ticks); zero turns lease reads off.
    pub read_lease: std::time::Duration,
    /// Bugs put back on purpose by simulator tests (all off in production).
    pub planted: PlantedBugs,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            election_tick: 10,
            heartbeat_tick: 2,
            log_gc_count_threshold: 10_000,
            log_gc_lag_max: 50_000,
            log_gc_interval_ticks: 10,
            expiry_sync_interval_ticks: 100,
            pending_proposals_max: 20_000,
            pending_reads_max: 20_000,
            read_timeout_ticks: 50,
            read_lease: std::time::Duration::ZERO,
            planted: PlantedBugs::default(),
        }
    }
}

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

struct ReadBatch {
    id: u64,
    issued_tick: u64,
    first_tick: u64,
    index: Option<u64>,
    reads: Vec<(ReadRequest, ReadCallback)>,
    /// Monotonic time of the first read-index request, its term and lease epoch: a quorum confirmed
    /// this leader at or after that time, which starts a lease.
    issued_at: Duration,
    term: u64,
    lease_epoch: u64,
}

/// A leader's read lease. Followers with check_quorum refuse votes for election_tick ticks after they
/// last heard from the leader, so no other leader can exist until `until` (monotonic) when the lease
/// was started by a confirmed read-index round. Leadership transfers and membership changes end it.
#[derive(Default)]
struct Lease {
    until: Duration,
    term: u64,
    /// Bumped whenever the lease is revoked: rounds issued before cannot renew it.
    epoch: u64,
    /// When a read last used the lease (renewals are only worth it while reads come).
    used_at: Duration,
    /// A term in which a leadership transfer was started: no lease for the rest of it. raft-rs may
    /// abort the transfer, but a late MsgTimeoutNow can still elect the transferee, which never waits
    /// out followers' vote refusal.
    forbidden_term: u64,
}

/// What a replica remembers about itself across restarts (besides the raft log and its engine).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ReplicaMeta {
    pub group: u64,
    pub peer_id: PeerId,
    /// (peer id, node id) of every member.
    pub peers: Vec<(PeerId, NodeId)>,
    pub partition_count: u32,
    /// The engine directory under the replica's directory (changes when a snapshot is installed).
    pub engine_dir: String,
}

impl ReplicaMeta {
    pub fn load(dir: &Path) -> Result<ReplicaMeta, TernError> {
        let path = dir.join("replica.json");
        let bytes = std::fs::read(&path).map_err(|e| TernError::Internal(format!("read {}: {e}", path.display())))?;
        serde_json::from_slice(&bytes).map_err(|e| TernError::Corruption(format!("{}: {e}", path.display())))
    }

    /// Atomic, durable replace (temporary file synced, renamed, directory synced).
    pub fn save(&self, dir: &Path) -> Result<(), TernError> {
        let bytes = serde_json::to_vec_pretty(self).expect("serialize replica meta");
        tern_core::files::write_file_atomically(&dir.join("replica.json"), &bytes)
            .map_err(|e| TernError::Internal(format!("save replica meta in {}: {e}", dir.display())))
    }
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
    /// Applied index at the last periodic engine sync.
    synced_index: u64,
}

/// Opens a replica's state machine, with the planted bug that concerns it when a test asks for it.
fn open_state_machine(engine: Box<dyn tern_engine::KvEngine>, initial: ApplyState, planted: &PlantedBugs) -> Result<StateMachine, TernError> {
    let mut sm = StateMachine::open(engine, initial)?;
    if planted.expiry_by_local_clock {
        sm.plant_expiry_by_local_clock();
    }
    Ok(sm)
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
        log: Arc<dyn LogStore>,
        engines: Arc<dyn EngineFactory>,
        cfg: ReplicaConfig,
        election_tick: usize,
    ) -> Result<Replica, TernError> {
        let group = GroupId(meta.group);
        let engine = engines.open(&dir.join(&meta.engine_dir)).map_err(crate::apply::engine_error)?;
        let initial_state = match &bootstrap_voters {
            Some(voters) => {
                let mut cs = ConfState::default();
                cs.voters = voters.clone();
                ApplyState { applied_index: INITIAL_INDEX, applied_term: INITIAL_TERM, conf_state: cs, stamp_ms: 0 }
            }
            None => ApplyState::default(),
        };
        let sm = open_state_machine(engine, initial_state, &cfg.planted)?;
        let applied = sm.state().clone();
        let initial_pos = (applied.applied_index, applied.applied_term);
        let mut storage = PeerStorage::open(group.0, log.clone(), applied.conf_state.clone(), initial_pos)?;
        let mut pending_log = LogWriteBatch::default();
        let fresh_log = log.hard_state(group.0)?.is_none();
        if storage.last_log_index() < applied.applied_index {
            // The engine is ahead of the whole log: a snapshot was installed but the log reset was
            // not written before a crash. The engine is the truth; restart the log from it.
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
            ..Default::default()
        };
        config.validate().map_err(|e| TernError::Internal(format!("raft config: {e}")))?;
        let restarted = bootstrap_voters.is_none() && !fresh_log;
        let votes_refused_until_tick = if restarted && !cfg.planted.vote_right_after_restart { cfg.election_tick as u64 } else { 0 };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&config, storage, &logger).map_err(|e| TernError::Internal(format!("raft: {e}")))?;
        std::fs::create_dir_all(&snapshot_dir).map_err(|e| TernError::Internal(e.to_string()))?;
        Ok(Replica {
            group,
            peer_id: meta.peer_id,
            meta,
            dir,
            snapshot_dir,
            raw,
            sm,
            engines,
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
            synced_index: 0,
        })
    }

    pub fn meta(&self) -> &ReplicaMeta {
        &self.meta
    }

    /// Sets where each peer lives (from meta). Peers raft still counts as members keep their
    /// address even if meta has moved on, so a membership change in flight can finish.
    pub fn set_peers(&mut self, mut peers: Vec<(PeerId, NodeId)>) -> Result<(), TernError> {
        let cs = &self.sm.state().conf_state;
        for (peer, node) in &self.meta.peers {
            let member = cs.voters.contains(peer) || cs.learners.contains(peer) || cs.voters_outgoing.contains(peer);
            if member && !peers.iter().any(|(p, _)| p == peer) {
                peers.push((*peer, *node));
            }
        }
        peers.sort();
        if peers != self.meta.peers {
            self.meta.peers = peers;
            self.meta.save(&self.dir)?;
        }
        Ok(())
    }

    /// Moves the group one step toward the membership meta wants: add missing learners; when they
    /// have caught up, promote them and remove voters meta dropped (one joint-consensus change);
    /// never more than one change in flight. Only the leader acts; others just learn the addresses.
    pub fn reconcile_membership(&mut self, voters: &[(PeerId, NodeId)], learners: &[(PeerId, NodeId)], preferred_leader: PeerId) {
        if !self.active() || !self.is_leader() || self.raw.raft.has_pending_conf() {
            return;
        }
        self.maybe_transfer_leadership(preferred_leader);
        let cs = self.sm.state().conf_state.clone();
        if !cs.voters_outgoing.is_empty() || voters.is_empty() {
            return; // leaving a joint configuration is already under way
        }
        let present: Vec<PeerId> = cs.voters.iter().chain(cs.learners.iter()).copied().collect();
        let all_targets: Vec<(PeerId, NodeId)> = voters.iter().chain(learners.iter()).copied().collect();
        let mut changes = Vec::new();
        for (peer, _) in &all_targets {
            if !present.contains(peer) {
                changes.push(raft_proto::new_conf_change_single(*peer, ConfChangeType::AddLearnerNode));
            }
        }
        if changes.is_empty() {
            let last = self.raw.raft.raft_log.last_index();
            // matched stays 0 until the learner has the data (its snapshot): an empty learner of a
            // short log must not count as caught up.
            let caught_up =
                |peer: PeerId| self.raw.raft.prs().get(peer).is_some_and(|p| p.matched > 0 && p.matched + LEARNER_CATCH_UP_ENTRIES >= last);
            let promote: Vec<PeerId> = voters.iter().map(|(p, _)| *p).filter(|p| cs.learners.contains(p)).collect();
            if !promote.iter().all(|p| caught_up(*p)) {
                return;
            }
            let targets: Vec<PeerId> = all_targets.iter().map(|(p, _)| *p).collect();
            let remove: Vec<PeerId> = present.iter().copied().filter(|p| !targets.contains(p)).collect();
            if remove.contains(&self.peer_id) {
                // Hand leadership to a voter that stays, then let it finish the change.
                if let Some((next, _)) = voters.iter().find(|(p, _)| *p != self.peer_id && cs.voters.contains(p)) {
                    let next = *next;
                    self.transfer_leadership(next);
                }
                return;
            }
            for p in promote {
                changes.push(raft_proto::new_conf_change_single(p, ConfChangeType::AddNode));
            }
            for p in remove {
                changes.push(raft_proto::new_conf_change_single(p, ConfChangeType::RemoveNode));
            }
        }
        if changes.is_empty() {
            return;
        }
        let mut cc = ConfChangeV2::default();
        cc.set_changes(changes.into());
        // The context tells every replica which node each peer lives on.
        let mut context = Vec::with_capacity(all_targets.len() * 16);
        for (peer, node) in &all_targets {
            context.extend_from_slice(&peer.to_be_bytes());
            context.extend_from_slice(&node.to_be_bytes());
        }
        if let Err(e) = self.raw.propose_conf_change(context, cc) {
            tracing::warn!(group = %self.group, "membership change refused: {e}");
        }
    }

    /// Hands leadership to the preferred voter once it is fully caught up (leader priority: a
    /// preferred node gets leadership back when it is healthy). At most one attempt per cooldown.
    fn maybe_transfer_leadership(&mut self, preferred: PeerId) {
        if preferred == 0 || preferred == self.peer_id || self.ticks < self.last_transfer_tick + LEADER_TRANSFER_COOLDOWN_TICKS {
            return;
        }
        let cs = &self.sm.state().conf_state;
        let last = self.raw.raft.raft_log.last_index();
        let ready = cs.voters.contains(&preferred) && self.raw.raft.prs().get(preferred).is_some_and(|p| p.matched == last);
        if ready {
            self.last_transfer_tick = self.ticks;
            self.transfer_leadership(preferred);
        }
    }

    /// Starts a leadership transfer. The lease ends, and no new one is granted for the rest of the
    /// term: raft-rs may abort the transfer, but a late MsgTimeoutNow can still elect the target,
    /// which campaigns without waiting out followers' vote refusal.
    fn transfer_leadership(&mut self, to: PeerId) {
        self.revoke_lease();
        if !self.cfg.planted.lease_through_transfer {
            self.lease.forbidden_term = self.raw.raft.term;
        }
        self.raw.transfer_leader(to);
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// Ends the read lease (a transfer lets the target campaign at once, ignoring follower leases).
    fn revoke_lease(&mut self) {
        self.lease.until = Duration::ZERO;
        self.lease.epoch += 1;
    }

    /// Whether reads may skip the read-index round: leader with a live lease in this term and no
    /// transfer under way. Its commit index then covers every acknowledged write.
    fn lease_covers(&self, now: Duration) -> bool {
        self.is_leader()
            && self.active()
            && now < self.lease.until
            && self.lease.term == self.raw.raft.term
            && self.lease.forbidden_term != self.raw.raft.term
            && self.raw.raft.lead_transferee.is_none()
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

    pub fn campaign(&mut self) {
        let _ = self.raw.campaign();
    }

    pub fn partition_count(&self) -> u32 {
        self.meta.partition_count
    }

    /// Proposes a client write stamped with the leader's wall clock.
    pub fn propose(&mut self, write: WriteRequest, now_unix_ms: u64, callback: WriteCallback) {
        if self.failure.is_some() {
            return callback(error_response(self.unavailable()));
        }
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
        let data = RaftCommand { now_unix_ms, write: Some(write) }.encode_to_vec();
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

    /// Queues a read. Stale reads are answered at once from local state; linearizable reads wait for
    /// a read index (one per batch of reads) and for apply to reach it.
    pub fn read(&mut self, request: ReadRequest, now_unix_ms: u64, now: Duration, callback: ReadCallback) {
        let now_unix_ms = self.read_time(now_unix_ms);
        if self.failure.is_some() {
            return callback(ReadResponse { error: Some(self.unavailable().into()), ..Default::default() });
        }
        if request.allow_stale {
            return callback(execute_read(self.sm.engine(), &request, now_unix_ms));
        }
        if !self.is_leader() || self.removed {
            return callback(ReadResponse { error: Some(self.not_leader().into()), ..Default::default() });
        }
        if self.cfg.planted.read_without_read_index {
            return callback(execute_read(self.sm.engine(), &request, now_unix_ms));
        }
        if self.lease_covers(now) {
            self.lease.used_at = now;
            let committed = self.raw.raft.raft_log.committed;
            if self.read_batches.is_empty() && self.sm.state().applied_index >= committed {
                return callback(execute_read(self.sm.engine(), &request, now_unix_ms));
            }
            // Answered once apply reaches today's commit index, in order with earlier reads (id 0:
            // no read-index request behind it).
            let batch = self.new_read_batch(0, Some(committed), vec![(request, callback)], now);
            self.read_batches.push_back(batch);
            return;
        }
        let queued: usize = self.waiting_reads.len() + self.read_batches.iter().map(|b| b.reads.len()).sum::<usize>();
        if queued >= self.cfg.pending_reads_max {
            let e = TernError::Busy(format!("partition {} has {queued} reads queued (limit {})", self.group, self.cfg.pending_reads_max));
            return callback(ReadResponse { error: Some(e.into()), ..Default::default() });
        }
        self.waiting_reads.push((request, callback));
    }

    /// Turns the reads that arrived since the last round into one read-index request.
    pub fn flush_reads(&mut self, now: Duration) {
        if self.waiting_reads.is_empty() {
            return;
        }
        let reads = std::mem::take(&mut self.waiting_reads);
        self.issue_read_index(reads, now);
    }

    fn issue_read_index(&mut self, reads: Vec<(ReadRequest, ReadCallback)>, now: Duration) {
        let id = self.next_read_id;
        self.next_read_id += 1;
        self.raw.read_index(id.to_be_bytes().to_vec());
        let batch = self.new_read_batch(id, None, reads, now);
        self.read_batches.push_back(batch);
    }

    fn new_read_batch(&self, id: u64, index: Option<u64>, reads: Vec<(ReadRequest, ReadCallback)>, now: Duration) -> ReadBatch {
        let (term, lease_epoch, ticks) = (self.raw.raft.term, self.lease.epoch, self.ticks);
        ReadBatch { id, issued_tick: ticks, first_tick: ticks, index, reads, issued_at: now, term, lease_epoch }
    }

    /// Steps a raft message from a peer. A snapshot message comes with the directory it was received into.
    pub fn step(&mut self, message: Message, snapshot_dir: Option<PathBuf>) {
        if !self.active() {
            if let Some(dir) = snapshot_dir {
                let _ = std::fs::remove_dir_all(dir);
            }
            return;
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
                        if let Err(e) = crate::snapshot::verify(&dir, crate::snapshot::Check::Sizes) {
                            tracing::warn!(group = %self.group, "refused a received snapshot: {e}");
                            let _ = std::fs::remove_dir_all(dir);
                            return;
                        }
                    }
                    self.received_snapshots.insert((meta.index, meta.term), dir);
                    // Snapshots raft rejected (stale or duplicate) are never installed: keep a few.
                    while self.received_snapshots.len() > RECEIVED_SNAPSHOTS_MAX {
                        let oldest = *self.received_snapshots.keys().min().expect("not empty");
                        if let Some(stale) = self.received_snapshots.remove(&oldest) {
                            let _ = std::fs::remove_dir_all(stale);
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
        let status = if ok { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
        self.raw.report_snapshot(to_peer, status);
    }

    pub fn report_unreachable(&mut self, to_peer: PeerId) {
        if !self.active() {
            return;
        }
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
        if self.ticks.is_multiple_of(self.cfg.log_gc_interval_ticks) {
            self.maybe_compact_log();
        }
        // Staggered by group, so a node's replicas do not all sync in the same round.
        let due = (self.ticks + self.group.0).is_multiple_of(self.cfg.expiry_sync_interval_ticks);
        if due && self.sm.state().applied_index > self.synced_index {
            self.sync_engine();
        }
    }

    /// Syncs the engine (see `StateMachine::sync`); a failure stops the replica. Returns whether it
    /// synced.
    fn sync_engine(&mut self) -> bool {
        match self.sm.sync() {
            Ok(()) => {
                self.synced_index = self.sm.state().applied_index;
                true
            }
            Err(e) => {
                self.fail(StorageFailure(e));
                false
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
        if target < first {
            return;
        }
        // The engine must hold everything below the new log start durably before the log goes.
        if !self.sync_engine() {
            return;
        }
        if let Err(e) = self.raw.mut_store().compact_to(target, &mut self.pending_log) {
            fatal(self.group, "compact log", e);
        }
    }

    /// Generates a snapshot if raft asked for one (called after every event that may step raft).
    pub fn maybe_generate_snapshot(&mut self) {
        if !self.raw.store().take_snapshot_wanted() {
            return;
        }
        let state = self.sm.state().clone();
        if self.raw.store().generated_snapshot().is_some_and(|s| s.get_metadata().index == state.applied_index) {
            return;
        }
        let name = format!("{}_{}", state.applied_index, state.applied_term);
        let dir = self.snapshot_dir.join(&name);
        if dir.exists() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        if let Err(e) = self.sm.engine().checkpoint(&dir) {
            tracing::warn!(group = %self.group, "snapshot checkpoint failed: {e}");
            return;
        }
        let mut snap = Snapshot::default();
        snap.set_data(name.clone().into_bytes().into());
        let meta = snap.mut_metadata();
        meta.index = state.applied_index;
        meta.term = state.applied_term;
        meta.set_conf_state(state.conf_state);
        self.raw.mut_store().set_generated_snapshot(snap);
        self.remove_old_snapshots(&name);
    }

    /// Keeps the newest generated checkpoint and one before it (a transfer may still be reading it).
    fn remove_old_snapshots(&self, keep: &str) {
        let Ok(dir) = std::fs::read_dir(&self.snapshot_dir) else { return };
        let mut names: Vec<(u64, String)> = dir
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n != keep)
            .filter_map(|n| n.split('_').next().and_then(|i| i.parse().ok()).map(|i| (i, n)))
            .collect();
        names.sort();
        names.pop();
        for (_, n) in names {
            let _ = std::fs::remove_dir_all(self.snapshot_dir.join(n));
        }
    }

    pub fn has_ready(&self) -> bool {
        (self.failure.is_none() && self.raw.has_ready()) || !self.pending_log.is_empty()
    }

    /// First half of Ready handling (raft-rs's documented order): send leader messages, install a
    /// snapshot, apply committed entries, queue new entries and hard state into the round's log batch.
    /// Returns the Ready to finish once the batch is durable.
    pub fn ready_before_persist(&mut self, outbox: &mut Vec<OutMessage>, log_batch: &mut LogWriteBatch, now_unix_ms: u64) -> Option<Ready> {
        log_batch.ops.append(&mut self.pending_log.ops);
        if self.failure.is_some() || !self.raw.has_ready() {
            return None;
        }
        let mut rd = self.raw.ready();
        if let Some(ss) = rd.ss() {
            self.on_role_change(ss.raft_state);
        }
        self.route(rd.take_messages(), outbox);
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
        Some(rd)
    }

    /// Second half, after the round's log batch is durable: send messages that had to wait for
    /// persistence, advance, and apply what the light ready committed.
    pub fn ready_after_persist(&mut self, mut rd: Ready, outbox: &mut Vec<OutMessage>, log_batch: &mut LogWriteBatch, now_unix_ms: u64) {
        debug_assert!(self.failure.is_none(), "a stopped replica's Ready is never finished");
        self.route(rd.take_persisted_messages(), outbox);
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit, log_batch);
        }
        self.route(light.take_messages(), outbox);
        self.apply_entries(light.take_committed_entries(), now_unix_ms);
        if self.failure.is_none() {
            self.raw.advance_apply();
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
        for message in messages {
            let Some(to_node) = self.node_of(message.to) else { continue };
            let snapshot_dir = (message.get_msg_type() == MessageType::MsgSnapshot).then(|| {
                let name = String::from_utf8_lossy(message.get_snapshot().get_data()).into_owned();
                self.snapshot_dir.join(name)
            });
            outbox.push(OutMessage { group: self.group, to_node, message, snapshot_dir });
        }
    }

    fn install_snapshot(&mut self, snapshot: Snapshot, log_batch: &mut LogWriteBatch) {
        let meta = snapshot.get_metadata();
        let key = (meta.index, meta.term);
        let Some(received) = self.received_snapshots.remove(&key) else {
            return self.fail(StorageFailure(TernError::Internal(format!("no received data for snapshot {key:?}"))));
        };
        for (_, stale) in self.received_snapshots.drain() {
            let _ = std::fs::remove_dir_all(stale);
        }
        let engine_dir = format!("engine-{}-{}", meta.index, meta.term);
        let target = self.dir.join(&engine_dir);
        // Through the factory: it owns what an engine directory means (the memory engine keeps
        // contents by path, and would otherwise hand back an earlier install's).
        if let Err(e) = self.engines.destroy(&target) {
            return self.fail(StorageFailure(crate::apply::engine_error(e)));
        }
        if let Err(e) = tern_core::files::rename_durably(&received, &target) {
            return self.fail(StorageFailure(TernError::Internal(format!("move received snapshot into place: {e}"))));
        }
        // A snapshot that passed its manifest yet does not open, or is not at the index raft says,
        // stops this replica (meta replaces it); it never takes the node down.
        let engine = match self.engines.open(&target) {
            Ok(e) => e,
            Err(e) => return self.fail(StorageFailure(crate::apply::engine_error(e))),
        };
        let sm = match open_state_machine(engine, ApplyState::default(), &self.cfg.planted) {
            Ok(sm) => sm,
            Err(e) => return self.fail(StorageFailure(e)),
        };
        if sm.state().applied_index != meta.index {
            let found = sm.state().applied_index;
            return self.fail(StorageFailure(TernError::Corruption(format!("snapshot {key:?} holds a state machine at index {found}"))));
        }
        // Our proposals the snapshot covers may or may not be in it (committed by another leader,
        // or overwritten): their outcome is unknown, not "did not happen".
        while self.proposals.front().is_some_and(|p| p.index <= meta.index) {
            let p = self.proposals.pop_front().expect("front exists");
            (p.callback)(error_response(TernError::Timeout(format!(
                "entry {} was replaced by a snapshot at index {}; outcome unknown",
                p.index, meta.index
            ))));
        }
        let old_dir = self.dir.join(&self.meta.engine_dir);
        self.sm = sm; // drops (closes) the old engine
        self.meta.engine_dir = engine_dir;
        if let Err(e) = self.meta.save(&self.dir) {
            return self.fail(StorageFailure(e));
        }
        let _ = self.engines.destroy(&old_dir);
        self.raw.mut_store().apply_snapshot(&snapshot, log_batch);
        self.snapshots_applied += 1;
        tracing::info!(group = %self.group, index = meta.index, "installed snapshot");
    }

    fn apply_entries(&mut self, entries: Vec<raft::eraftpb::Entry>, now_unix_ms: u64) {
        if entries.is_empty() {
            self.serve_reads(now_unix_ms);
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
                        let response = match batch.apply_command(self.sm.engine(), &entry.data) {
                            Ok(response) => response,
                            Err(StorageFailure(e)) if self.cfg.planted.storage_failure_as_answer => error_response(e),
                            // Nothing of this round is written: the replica stops where it was.
                            Err(failure) => return self.fail(failure),
                        };
                        results.push((entry.index, entry.term, response));
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

    /// Records the peer -> node pairs a membership change carries, so messages to new peers route.
    fn learn_peer_nodes(&mut self, context: &[u8]) {
        let mut peers = self.meta.peers.clone();
        for pair in context.chunks_exact(16) {
            let peer = u64::from_be_bytes(pair[..8].try_into().expect("8 bytes"));
            let node = u64::from_be_bytes(pair[8..].try_into().expect("8 bytes"));
            if !peers.iter().any(|(p, _)| *p == peer) {
                peers.push((peer, node));
            }
        }
        if let Err(e) = self.set_peers(peers) {
            self.fail(StorageFailure(e));
        }
    }

    fn apply_conf_change(&mut self, cc: &impl raft_proto::ConfChangeI, batch: &mut crate::apply::ApplyBatch) {
        // New voters may not have heard from this leader when its lease started.
        self.revoke_lease();
        match self.raw.apply_conf_change(cc) {
            Ok(cs) => {
                let member = [&cs.voters, &cs.learners, &cs.voters_outgoing, &cs.learners_next].iter().any(|set| set.contains(&self.peer_id));
                if !member {
                    // Removed from its group (perhaps proposed by an earlier leader while this one was
                    // elected): it must take no further part, or raft-rs, leading a group it is not
                    // in, panics. Found by the simulator (scheduler soak seed 21186). Meta destroys it.
                    self.removed = true;
                    tracing::info!(group = %self.group, peer = self.peer_id, "removed from the group; going quiet");
                }
                batch.set_conf_state(cs.clone());
                self.raw.mut_store().set_conf_state(cs);
            }
            Err(e) => tracing::warn!(group = %self.group, "conf change rejected: {e}"),
        }
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

    fn serve_reads(&mut self, now_unix_ms: u64) {
        let applied = self.sm.state().applied_index;
        let now_unix_ms = self.read_time(now_unix_ms);
        while self.read_batches.front().is_some_and(|b| b.index.is_some_and(|i| i <= applied)) {
            let batch = self.read_batches.pop_front().expect("front exists");
            for (request, callback) in batch.reads {
                callback(execute_read(self.sm.engine(), &request, now_unix_ms));
            }
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
        }
    }

    /// The time reads (and checksums) look at: never before the log's clock. What the state machine
    /// already treats as expired may or may not have been compacted away yet; it must read as expired
    /// either way, whatever this node's clock says.
    fn read_time(&self, now_unix_ms: u64) -> u64 {
        now_unix_ms.max(self.sm.state().stamp_ms)
    }

    /// (applied index, checksum, record count) of the replica's contents.
    pub fn checksum(&self, now_unix_ms: u64) -> Result<(u64, u64, u64), TernError> {
        let (sum, count) = checksum(self.sm.engine(), self.read_time(now_unix_ms))?;
        Ok((self.sm.state().applied_index, sum, count))
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

fn fail_reads(reads: Vec<(ReadRequest, ReadCallback)>, e: TernError) {
    for (_, callback) in reads {
        callback(ReadResponse { error: Some(e.clone().into()), ..Default::default() });
    }
}
