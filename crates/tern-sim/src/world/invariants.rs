//! Invariants: at most one leader per term, committed entries never change, and replicas that
//! settle to identical state after the run.

use super::*;

impl World {
    /// At most one leader per term per group.
    pub(super) fn check_leaders(&mut self, index: usize) {
        let mut statuses = Vec::new();
        if let Some(store) = self.nodes[index].store.as_mut() {
            let (tx, rx) = std::sync::mpsc::channel();
            store.handle(StoreMsg::Status(Box::new(move |s| drop(tx.send(s)))));
            statuses = rx.try_recv().unwrap_or_default();
        }
        self.check_committed_entries(index, &statuses);
        for s in statuses.iter().filter(|s| s.is_leader) {
            match self.leaders_seen.get(&(s.group_id, s.term)) {
                Some(&peer) if peer != s.peer_id => {
                    self.failures.push(format!("two leaders in term {} of group {}: peers {peer} and {}", s.term, GroupId(s.group_id), s.peer_id));
                }
                Some(_) => {}
                None => {
                    self.leaders_seen.insert((s.group_id, s.term), s.peer_id);
                    let now = self.now.load(Ordering::SeqCst);
                    self.elections.push(Election { at_ms: now, group: GroupId(s.group_id), term: s.term, node: self.nodes[index].id });
                }
            }
        }
    }

    /// Lease safety: while a replica holds a read lease in term T (by its own clock, as it would
    /// answer reads), no leader of a later term has been elected anywhere (seen now or at any
    /// earlier check: one elected and gone between two checks counts too). Checked directly, so a
    /// lease that outlives followers' vote refusal is caught whether or not a client read happens
    /// to land in the gap.
    pub(super) fn check_leases(&mut self) {
        if self.lease_violation_reported {
            return;
        }
        for i in 0..self.nodes.len() {
            let Some(store) = self.nodes[i].store.as_ref() else { continue };
            for (group, term) in store.leases() {
                let later = self.leaders_seen.range((group.0, term + 1)..(group.0 + 1, 0)).next_back().map(|((_, t), peer)| (*t, *peer));
                if let Some((later, peer)) = later {
                    let now = self.now.load(Ordering::SeqCst);
                    let holder = self.nodes[i].id;
                    self.failures.push(format!(
                        "at {now} ms node {holder} holds a read lease of group {group} in term {term} after peer {peer} was elected in term {later}"
                    ));
                    self.lease_violation_reported = true;
                    return;
                }
            }
        }
    }

    /// Committed entries never change: every committed entry a replica holds must equal what any
    /// replica held at that index before. Checked up to the applied index: raft may count entries
    /// as committed before this replica's own write of them is durable (its log still holds what
    /// they replace), but it applies only entries it has persisted.
    pub(super) fn check_committed_entries(&mut self, index: usize, statuses: &[tern_proto::ReplicaStatus]) {
        let node = self.nodes[index].id;
        for s in statuses {
            let checked = self.committed_checked.get(&(node, s.group_id)).copied().unwrap_or(0);
            let from = checked.max(s.first_log_index.saturating_sub(1)) + 1;
            for i in from..=s.applied_index {
                let Some(entry) = self.nodes[index].log.peek_entry(s.group_id, i) else { continue };
                let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
                for b in entry.data.iter() {
                    hash ^= *b as u64;
                    hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
                }
                match self.committed.get(&(s.group_id, i)) {
                    Some(&(term, h)) if (term, h) != (entry.term, hash) => self.failures.push(format!(
                        "committed entry {i} of group {} changed: term {term} before, term {} on node {node} now",
                        GroupId(s.group_id),
                        entry.term
                    )),
                    Some(_) => {}
                    None => {
                        self.committed.insert((s.group_id, i), (entry.term, hash));
                    }
                }
            }
            self.committed_checked.insert((node, s.group_id), s.applied_index.max(checked));
        }
    }

    /// Lets the healed cluster run idle for a while, then checks that every replica of a group has
    /// the same applied index and the same contents. Meta's scheduler may still be moving a replica
    /// when a settling round ends (a replica one entry behind, mid-change): the check is repeated after
    /// further rounds, and only a difference that outlasts them all is a failure.
    pub(super) fn settle_and_compare_replicas(&mut self) {
        self.history.retain(|o| o.client != u64::MAX);
        for round in 1..=SETTLE_ROUNDS_MAX {
            self.settle(5_000);
            if !self.failures.is_empty() || self.nodes.iter().any(|n| n.store.is_none()) {
                return;
            }
            let differences = self.replica_differences();
            if differences.is_empty() {
                return self.check_dropped_tables_are_gone();
            }
            if round == SETTLE_ROUNDS_MAX {
                let statuses = self.replica_statuses();
                for (group, replicas) in differences {
                    if self.cfg.clusters == 2 {
                        for i in 0..self.cfg.nodes * 2 {
                            if Self::table_of(self.cluster_of(self.nodes[i].id)) == GroupId(group).table_id() {
                                self.dump_records(i, GroupId(group).partition());
                            }
                        }
                    }
                    self.failures.push(format!("replicas of group {} differ after settling: {replicas:?}{statuses}", GroupId(group)));
                    self.dump_replicas(group);
                }
            }
        }
    }

    /// Once settled, no node keeps a replica of a dropped table.
    fn check_dropped_tables_are_gone(&mut self) {
        let Some(dropped) = self.meta_catalog().map(|c| c.dropped_tables) else { return };
        for i in 0..self.nodes.len() {
            let left: Vec<GroupId> = self.statuses(i).iter().map(|r| GroupId(r.group_id)).filter(|g| dropped.contains(&g.table_id())).collect();
            if !left.is_empty() {
                self.failures.push(format!("node {} still hosts replicas of dropped tables: {left:?}", self.nodes[i].id));
            }
        }
    }

    /// Runs everything but new client operations and faults (restarts excepted) for `ms`.
    pub(super) fn settle(&mut self, ms: u64) {
        let settle_until = self.now.load(Ordering::SeqCst) + ms;
        loop {
            let next = {
                let mut s = self.shared.lock();
                match s.queue.peek() {
                    Some(Reverse((at, _))) if *at <= settle_until => {
                        let Reverse((at, seq)) = s.queue.pop().expect("peeked");
                        s.now = at;
                        Some((at, s.events.remove(&seq).expect("scheduled event")))
                    }
                    _ => None,
                }
            };
            let Some((at, event)) = next else { break };
            self.now.store(at, Ordering::SeqCst);
            if matches!(event, Event::ClientNext { .. } | Event::ClientRetry { .. } | Event::Fault(_))
                && !matches!(event, Event::Fault(Fault::Restart(_)))
            {
                continue;
            }
            self.trace(at, &event);
            self.handle(event);
        }
    }

    /// Groups whose replicas (the voters meta lists, or every node without meta) differ in applied
    /// index or contents, with (node, applied index, checksum) of each replica.
    pub(super) fn replica_differences(&mut self) -> Vec<(u64, Vec<ReplicaSum>)> {
        let mut by_group: BTreeMap<u64, Vec<ReplicaSum>> = BTreeMap::new();
        // One time for every replica, whatever its node's clock says: the log's own clock (each
        // replica reads no earlier than it, and replicas at one applied index share it), which
        // hides the fewest records from the comparison.
        let at_unix_ms = 1;
        let catalog = self.meta_catalog();
        // With meta, the partitions it lists (a split adds some); a split's children still
        // pending are compared once they are partitions of their own.
        let partitions: Vec<u32> = match catalog.as_ref().map(|c| &c.tables["t"]) {
            Some(t) => (0..t.partitions.len() as u32).filter(|p| !t.partitions[*p as usize].split_pending).collect(),
            None => (0..self.cfg.partitions).collect(),
        };
        let mut groups: Vec<GroupId> =
            (0..self.cfg.clusters).flat_map(|c| partitions.iter().map(move |p| GroupId::new(Self::table_of(c), *p))).collect();
        if self.meta.is_some() {
            groups.push(tern_meta::keeper::CATALOG_GROUP);
        }
        for i in 0..self.nodes.len() {
            for &group in &groups {
                let (tx, rx) = std::sync::mpsc::channel();
                self.with_store(i, |s| {
                    s.handle(StoreMsg::Checksum { group, at_unix_ms, data_only: false, callback: Box::new(move |r| drop(tx.send(r))) });
                });
                if let Ok(Ok((applied, sum, _))) = rx.try_recv() {
                    by_group.entry(group.0).or_default().push((self.nodes[i].id, applied, sum));
                }
            }
        }
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for (group, replicas) in &by_group {
            for (node, applied, sum) in replicas {
                for word in [*group, *node, *applied, *sum] {
                    hash = (hash ^ word).wrapping_mul(0x0000_0100_0000_01b3);
                }
            }
        }
        self.state_hash = hash;
        let mut differences = Vec::new();
        if self.meta.is_some() && catalog.is_none() {
            // Meta must be serving again once everything has healed.
            differences.push((tern_meta::keeper::CATALOG_GROUP.0, Vec::new()));
        }
        for (group, mut replicas) in by_group {
            let expected = match &catalog {
                None if self.meta.is_none() => self.cfg.nodes, // each cluster's nodes host its table
                None => replicas.len(),                        // meta is not serving: reported above
                Some(_) if group == tern_meta::keeper::CATALOG_GROUP.0 => META_NODES,
                Some(c) => {
                    // Only the voters meta lists must agree; a replica being destroyed may lag.
                    let voters: Vec<NodeId> = c.tables["t"].partitions[GroupId(group).partition() as usize].peers.iter().map(|(_, n)| *n).collect();
                    replicas.retain(|r| voters.contains(&r.0));
                    voters.len()
                }
            };
            let Some(&first) = replicas.first() else {
                differences.push((group, replicas));
                continue;
            };
            if replicas.len() != expected || replicas.iter().any(|r| (r.1, r.2) != (first.1, first.2)) {
                differences.push((group, replicas));
            }
        }
        differences
    }
}
