//! The replica set: membership reconciled with meta's assignment (learners first, promoted once
//! caught up), configuration changes as they apply, and leadership handed to the preferred peer.

use super::*;

/// Ticks between two attempts to hand leadership to the preferred peer.
pub(super) const LEADER_TRANSFER_COOLDOWN_TICKS: u64 = 30;

/// A learner is promoted once it is within this many entries of the leader's log.
pub(super) const LEARNER_CATCH_UP_ENTRIES: u64 = 100;

impl Replica {
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
            self.meta.save(&*self.files, &self.dir)?;
        }
        Ok(())
    }

    /// Moves the group one step toward the membership meta wants: add missing learners; when they
    /// have caught up, promote them and remove voters meta dropped (one joint-consensus change);
    /// never more than one change in flight. Only the leader acts; others just learn the addresses.
    pub fn reconcile_membership(&mut self, voters: &[(PeerId, NodeId)], learners: &[(PeerId, NodeId)], preferred_leader: PeerId) {
        if self.hibernating && self.membership_differs(voters, learners, preferred_leader) {
            self.wake();
        }
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
                // Hand leadership to a voter that stays (the most caught up of those heard from
                // lately, never one that is gone: found by the simulator, a transfer to a destroyed
                // peer retried forever), then let it finish the change.
                let prs = self.raw.raft.prs();
                let next = voters
                    .iter()
                    .map(|(p, _)| *p)
                    .filter(|p| *p != self.peer_id && cs.voters.contains(p))
                    .filter_map(|p| prs.get(p).filter(|pr| pr.recent_active).map(|pr| (pr.matched, p)))
                    .max();
                if let Some((_, next)) = next {
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
    pub(super) fn maybe_transfer_leadership(&mut self, preferred: PeerId) {
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
    pub(super) fn transfer_leadership(&mut self, to: PeerId) {
        self.revoke_lease();
        if !self.cfg.planted.lease_through_transfer {
            self.lease.forbidden_term = self.raw.raft.term;
        }
        self.raw.transfer_leader(to);
    }

    /// Records the peer -> node pairs a membership change carries, so messages to new peers route.
    pub(super) fn learn_peer_nodes(&mut self, context: &[u8]) {
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

    pub(super) fn apply_conf_change(&mut self, cc: &impl raft_proto::ConfChangeI, batch: &mut crate::apply::ApplyBatch) {
        // New voters may not have heard from this leader when its lease started.
        self.revoke_lease();
        match self.raw.apply_conf_change(cc) {
            Ok(cs) => {
                if !crate::log_store::names(&cs, self.peer_id) {
                    // Removed from its group (perhaps proposed by an earlier leader while this one was
                    // elected): it must take no further part, or raft-rs, leading a group it is not
                    // in, panics. Found by the simulator (scheduler soak seed 21186). Meta destroys it.
                    self.removed = true;
                    tracing::info!(group = %self.group, peer = self.peer_id, "removed from the group; going quiet");
                }
                tracing::info!(group = %self.group, voters = ?cs.voters, learners = ?cs.learners, outgoing = ?cs.voters_outgoing, "membership changed");
                batch.set_conf_state(cs.clone());
                self.raw.mut_store().set_conf_state(cs);
            }
            Err(e) => tracing::warn!(group = %self.group, "conf change rejected: {e}"),
        }
    }
}
