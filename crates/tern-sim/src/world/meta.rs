//! Meta's part: the catalog, assignments delivered to nodes, and the scheduler's passes.

use super::*;

/// Meta declares a node dead after this long without hearing from it (scheduler runs only).
pub(super) const SIM_NODE_GRACE_MS: u64 = 3_000;
pub(super) const META_TICK_MS: u64 = 1_000;

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
        let per_node: Vec<Vec<ReplicaSpec>> = (1..=self.cfg.nodes as u64)
            .map(|node| {
                catalog
                    .assignments(node)
                    .into_iter()
                    .map(|a| ReplicaSpec {
                        group: a.group,
                        peer_id: a.peer_id,
                        peers: a.peers,
                        learners: a.learners,
                        initial: a.initial,
                        partition_count: a.partition_count,
                        preferred_leader: a.preferred_leader,
                        preferred_leader_peer: a.preferred_leader_peer,
                    })
                    .collect()
            })
            .collect();
        for (index, specs) in per_node.into_iter().enumerate() {
            if !self.meta_hears(index) {
                continue;
            }
            let keep: Vec<GroupId> = specs.iter().map(|s| s.group).collect();
            self.with_store(index, |s| {
                s.handle(StoreMsg::EnsureReplicas(specs));
                s.handle(StoreMsg::RetainReplicas { tables: vec![TABLE_ID], keep });
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
        let mut alive = Vec::new();
        let mut statuses = Vec::new();
        for i in 0..self.nodes.len() {
            if self.meta_hears(i) {
                self.unheard_since[i] = None;
                let (tx, rx) = std::sync::mpsc::channel();
                self.with_store(i, |s| {
                    s.handle(StoreMsg::Status(Box::new(move |st| drop(tx.send(st)))));
                });
                statuses.extend(rx.try_recv().unwrap_or_default());
            } else {
                self.unheard_since[i].get_or_insert(now);
            }
            if self.unheard_since[i].is_none_or(|since| now - since < SIM_NODE_GRACE_MS) {
                alive.push(self.nodes[i].id);
            }
        }
        let progress = tern_meta::catalog::group_progress(&statuses);
        let changes = self.catalog.as_mut().expect("checked").schedule(&alive, &progress, 2);
        for c in changes {
            self.faults.push(format!("{now:>6} ms  scheduler: {c}"));
        }
        self.deliver_assignments();
    }
}
