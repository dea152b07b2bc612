//! Meta's part: the catalog, assignments delivered to nodes, and the scheduler's passes.

use super::*;

/// Meta declares a node dead after this long without hearing from it (scheduler runs only).
pub(super) const SIM_NODE_GRACE_MS: u64 = 3_000;
pub(super) const META_TICK_MS: u64 = 1_000;
/// The table created and dropped over and over in scheduler runs.
pub(super) const CHURN_TABLE: &str = "churn";

impl World {
    pub(super) fn create_partitions(&mut self) {
        if self.catalog.is_some() {
            return self.deliver_assignments();
        }
        let n = self.cfg.nodes as u64;
        for index in 0..self.nodes.len() {
            let node = self.nodes[index].id;
            let specs = (0..self.cfg.partitions)
                .map(|p| ReplicaSpec {
                    group: GroupId::new(TABLE_ID, p),
                    peer_id: p as u64 * n + node,
                    peers: (1..=n).map(|m| (p as u64 * n + m, m)).collect(),
                    learners: vec![],
                    initial: true,
                    partition_count: self.cfg.partitions,
                    preferred_leader: 1 + (p as u64 % n) == node,
                    preferred_leader_peer: 0,
                })
                .collect();
            self.with_store(index, |s| {
                s.handle(StoreMsg::EnsureReplicas(specs));
            });
        }
    }

    /// What meta tells every node it can reach: the replicas it should host (creating learners,
    /// changing membership, preferring leaders) and that others of the table are to be destroyed.
    pub(super) fn deliver_assignments(&mut self) {
        let Some(catalog) = self.catalog.as_ref() else { return };
        let answers: Vec<tern_proto::HeartbeatResponse> = self.nodes.iter().map(|n| catalog.heartbeat_answer(n.id)).collect();
        for (index, answer) in answers.into_iter().enumerate() {
            if !self.meta_hears(index) {
                continue;
            }
            self.with_store(index, |s| {
                for msg in tern_raft::store::reconcile_with_meta(&answer) {
                    s.handle(msg);
                }
                s.process_ready();
            });
        }
    }

    /// Whether meta can exchange heartbeats with the node now (up, not paused, not isolated).
    pub(super) fn meta_hears(&self, index: usize) -> bool {
        let node = &self.nodes[index];
        let now = self.now.load(Ordering::SeqCst);
        let s = self.shared.lock();
        let isolated = (1..=self.cfg.nodes as u64).filter(|o| *o != node.id).all(|o| s.network.cut.contains(&(node.id, o)));
        node.store.is_some() && now >= node.paused_until && !isolated
    }

    /// One pass of meta: liveness with a grace period, progress from replica statuses, the real
    /// scheduler, then assignments to every reachable node.
    pub(super) fn meta_tick(&mut self) {
        let now = self.now.load(Ordering::SeqCst);
        self.shared.lock().schedule(META_TICK_MS, Event::MetaTick);
        if now < self.meta_down_until || self.catalog.is_none() {
            return;
        }
        if self.meta_back_at.is_none() {
            // Meta is back (as a new leader would be): it has heard from nobody yet.
            self.meta_back_at = Some(now);
            self.last_heard.iter_mut().for_each(|h| *h = None);
        }
        let mut statuses = Vec::new();
        for i in 0..self.nodes.len() {
            if self.meta_hears(i) {
                self.last_heard[i] = Some(now);
                statuses.extend(self.statuses(i));
            }
        }
        let catalog = self.catalog.as_mut().expect("checked");
        let index_of: BTreeMap<NodeId, usize> = self.nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
        let heard_ago = |id: NodeId| self.last_heard[index_of[&id]].map(|t| Duration::from_millis(now - t));
        let alive = tern_meta::catalog::alive_nodes(catalog, heard_ago, Duration::from_millis(SIM_NODE_GRACE_MS));
        // Every status came from a node heard just now, so from a live one (as the service filters).
        let leading_for = Duration::from_millis(now - self.meta_back_at.expect("set above"));
        let mut changes = if tern_meta::catalog::may_schedule(leading_for, Duration::from_millis(SIM_NODE_GRACE_MS)) {
            catalog.scheduling_pass(&alive, &statuses, false)
        } else {
            Vec::new()
        };
        // Table churn during the fault phase: a second table created and dropped again and again,
        // so replicas are created and destroyed on every node under the same faults.
        if now < self.cfg.fault_phase_ms && self.churn_rng.range(0, 3) == 0 {
            if catalog.tables.contains_key(CHURN_TABLE) {
                catalog.drop_table(CHURN_TABLE).expect("exists");
                changes.push(format!("dropped table {CHURN_TABLE}"));
            } else if let Ok(t) = catalog.create_table(CHURN_TABLE, 2, 3, &alive) {
                changes.push(format!("created table {CHURN_TABLE} (id {})", t.id));
            }
        }
        for c in changes {
            self.faults.push(format!("{now:>6} ms  scheduler: {c}"));
        }
        self.deliver_assignments();
    }
}
