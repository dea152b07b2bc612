//! Hibernation: a group with nothing to do stops ticking, so a server's idle cost does not grow
//! with the number of replicas it hosts (TiKV's hibernate regions, simplified).
//!
//! - A leader that has been quiescent (`quiescent`) for `hibernate_after_ticks` ticks sends each
//!   peer a hibernate notice (a heartbeat-typed message with `HIBERNATE_CONTEXT`, which the replica
//!   consumes and raft never sees) and stops ticking: no more heartbeats.
//! - A follower or learner stops ticking when it receives that notice from its leader of the
//!   current term and its own log agrees (same last index, everything committed and applied).
//!   Without the notice it keeps ticking, and a leader that falls silent is voted out as usual.
//! - Anything that needs raft wakes a replica: a raft message from a peer, a client write or
//!   linearizable read, a snapshot report, or meta asking for a different membership. A leader
//!   that wakes resumes heartbeats; followers woken by them resume ticking.
//! - A dead leader of a hibernating group is still replaced: every store pings the nodes its
//!   replicas' peers live on each tick (one message per peer node, not per replica), and when a
//!   node has been silent for an election timeout, the store wakes each hibernating follower whose
//!   leader lives there (`Store`). They tick, time out and elect, as after any leader failure.
//!
//! - A replica's engine may be closed while nothing needs it (`close_engine_if_unused`: no read
//!   waiting, everything applied durable there), asleep or awake: the store keeps at most
//!   `StoreConfig::engines_open_max` engines open, closing those unused longest, so a server's
//!   open files and memory follow its busy replicas, not all of them, from the moment it starts.
//!   Whatever needs the engine opens it again first (`ensure_engine`): applying an entry that
//!   writes, serving a read, a snapshot, a checkpoint. Raft's empty entries (a new leader's first)
//!   apply without it (`StateMachine::apply_empty_while_closed`), so the elections that follow a
//!   restart or a dead peer do not open every engine on the server.
//!
//! Safety: a hibernating replica does not tick, so a follower's vote refusal after hearing from its
//! leader (check_quorum) only lasts longer in real time, and a leader's lease is a span of its own
//! monotonic clock started by a confirmed read-index round: neither depends on ticks continuing.

use super::*;

/// The context that marks a heartbeat-typed message as a hibernate notice (raft-rs's own
/// heartbeats carry Tern's 8-byte read-index ids or nothing).
pub(super) const HIBERNATE_CONTEXT: &[u8] = b"tern-hibernate";
/// The context of a wake notice: a replica that stopped (a storage failure) tells its peers, so
/// sleeping followers of a leader that can no longer lead wake up and elect another.
pub(super) const WAKE_CONTEXT: &[u8] = b"tern-wake";

impl Replica {
    pub fn is_hibernating(&self) -> bool {
        self.hibernating
    }

    /// The peer this replica follows, when it hibernates as a follower (None for a leader).
    pub fn hibernating_leader_node(&self) -> Option<NodeId> {
        if !self.hibernating || self.is_leader() {
            return None;
        }
        self.node_of(self.raw.raft.leader_id)
    }

    /// Resumes ticking.
    pub fn wake(&mut self) {
        if self.hibernating {
            self.hibernating = false;
            self.idle_ticks = 0;
        }
    }

    /// A client asked for something: wakes the replica, and a leader starts counting its quiet
    /// ticks again (reads a lease answers leave no other trace).
    pub(super) fn client_activity(&mut self) {
        self.wake();
        self.idle_ticks = 0;
    }

    /// Nothing in flight and nothing to do: every peer holds the whole log, all of it committed
    /// and applied, no membership change or leadership transfer, no client waiting.
    fn quiescent(&self) -> bool {
        let raft = &self.raw.raft;
        let log = &raft.raft_log;
        let last = log.last_index();
        self.active()
            && self.proposals.is_empty()
            && self.waiting_reads.is_empty()
            && self.read_batches.is_empty()
            && self.pending_log.is_empty()
            && self.outgoing.is_empty()
            && self.sync_in_flight.is_none()
            && log.committed == last
            && log.persisted == last
            && self.sm.state().applied_index == last
            && !raft.has_pending_conf()
            && raft.lead_transferee.is_none()
            && self.sm.state().conf_state.voters_outgoing.is_empty()
            && raft.prs().iter().all(|(_, p)| p.matched == last)
    }

    /// A leader's part of a tick: counts quiescent ticks, and past the limit tells its peers and
    /// goes to sleep.
    pub(super) fn maybe_hibernate(&mut self) {
        let after = self.cfg.hibernate_after_ticks;
        if after == 0 || !self.is_leader() {
            self.idle_ticks = 0;
            return;
        }
        if !self.quiescent() {
            self.idle_ticks = 0;
            return;
        }
        self.idle_ticks += 1;
        if self.idle_ticks < after {
            return;
        }
        let raft = &self.raw.raft;
        let (term, last, me) = (raft.term, raft.raft_log.last_index(), self.peer_id);
        for (peer, _) in raft.prs().iter().filter(|(id, _)| **id != me) {
            let mut m = notice(me, *peer, HIBERNATE_CONTEXT);
            m.term = term;
            m.index = last;
            m.commit = last;
            self.outgoing.push(m);
        }
        self.hibernating = true;
    }

    pub fn engine_is_open(&self) -> bool {
        self.sm.engine_is_open()
    }

    /// Whether an engine sync is under way (a replica closing its engine waits for it).
    pub fn engine_sync_in_flight(&self) -> bool {
        self.sync_in_flight.is_some()
    }

    /// How many times the engine was made sure of before a use (see `Store`'s engine bound).
    pub fn engine_uses(&self) -> u64 {
        self.engine_uses
    }

    /// Closes the engine (its files and memory go) if no read waits to be served and once
    /// everything applied is durable there, starting that sync if needed. True once closed.
    pub fn close_engine_if_unused(&mut self) -> bool {
        if !self.sm.engine_is_open() || self.failure.is_some() || !self.waiting_reads.is_empty() || !self.read_batches.is_empty() {
            return false;
        }
        self.poll_engine_sync();
        if self.failure.is_some() || self.sync_in_flight.is_some() {
            return false;
        }
        if self.sm.state().applied_index > self.synced_index {
            self.start_engine_sync();
            return false;
        }
        self.sm.close_engine();
        true
    }

    /// Opens a closed engine again from its directory, before anything may use it; a failure
    /// stops the replica (as any storage failure does).
    pub fn ensure_engine(&mut self) {
        self.engine_uses += 1;
        if self.sm.engine_is_open() || self.failure.is_some() {
            return;
        }
        let dir = self.dir.join(&self.meta.engine_dir);
        let reopened = self.engines.open(&dir).map_err(crate::apply::engine_error).and_then(|engine| self.sm.reopen_engine(engine));
        if let Err(e) = reopened {
            self.fail(StorageFailure(e));
        }
    }

    /// Whether a message from a peer wakes this replica. Heartbeats of the current term between a
    /// sleeping group's leader and followers do not: a leader's last heartbeats and their answers
    /// may arrive after its notice, and a follower answers a heartbeat (a read-index round of a
    /// woken leader) without ticking. Anything else does: entries, snapshots, votes, a new term.
    pub(super) fn wakes_up_on(&self, message: &Message) -> bool {
        let raft = &self.raw.raft;
        let heartbeat = match message.get_msg_type() {
            MessageType::MsgHeartbeat => !self.is_leader() && message.from == raft.leader_id,
            MessageType::MsgHeartbeatResponse => self.is_leader(),
            _ => false,
        };
        !(heartbeat && message.term == raft.term)
    }

    /// Whether a message from a peer is a hibernate notice.
    pub(super) fn is_hibernate_notice(message: &Message) -> bool {
        message.get_msg_type() == MessageType::MsgHeartbeat && message.get_context() == HIBERNATE_CONTEXT
    }

    /// Whether a message from a peer is a wake notice (handled here, never given to raft).
    pub(super) fn is_wake_notice(message: &Message) -> bool {
        message.get_msg_type() == MessageType::MsgHeartbeat && message.get_context() == WAKE_CONTEXT
    }

    /// Tells every peer to wake (this replica stopped: if it led, its group needs a new leader,
    /// and sleeping followers would otherwise wait for a client to wake them).
    pub(super) fn wake_peers(&mut self) {
        let peers: Vec<PeerId> = self.meta.peers.iter().map(|(p, _)| *p).filter(|p| *p != self.peer_id).collect();
        for peer in peers {
            self.outgoing.push(wake_notice(self.peer_id, peer));
        }
    }

    /// A hibernate notice from a peer: sleep too if it comes from this replica's leader in its
    /// term and this replica holds, has committed and has applied the leader's whole log.
    pub(super) fn on_hibernate_notice(&mut self, notice: &Message) {
        let raft = &self.raw.raft;
        let log = &raft.raft_log;
        let agrees = raft.state == StateRole::Follower
            && notice.term == raft.term
            && notice.from == raft.leader_id
            && log.last_index() == notice.index
            && log.persisted == notice.index
            && log.committed == notice.commit
            && self.sm.state().applied_index == notice.commit;
        if agrees && self.active() && self.proposals.is_empty() && self.waiting_reads.is_empty() && self.read_batches.is_empty() {
            self.hibernating = true;
        }
    }

    /// Whether meta's assignment asks for something this replica's group does not have yet (a
    /// replica to add, promote or remove, or, for a leader, another leader): the group must wake
    /// to act on it.
    pub(super) fn membership_differs(&self, voters: &[(PeerId, NodeId)], learners: &[(PeerId, NodeId)], preferred_leader: PeerId) -> bool {
        let cs = &self.sm.state().conf_state;
        let same = |want: &[(PeerId, NodeId)], have: &[PeerId]| want.len() == have.len() && want.iter().all(|(p, _)| have.contains(p));
        let leader_moves = self.is_leader() && preferred_leader != 0 && preferred_leader != self.peer_id;
        !same(voters, &cs.voters) || !same(learners, &cs.learners) || !cs.voters_outgoing.is_empty() || leader_moves
    }
}

/// A wake notice from `from` to `to` (see `WAKE_CONTEXT`).
pub fn wake_notice(from: PeerId, to: PeerId) -> Message {
    notice(from, to, WAKE_CONTEXT)
}

/// A notice of Tern's own: heartbeat-typed, told apart by its context, consumed by the replica.
fn notice(from: PeerId, to: PeerId, context: &[u8]) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgHeartbeat);
    m.from = from;
    m.to = to;
    m.context = context.to_vec().into();
    m
}
