//! Online partition split, meta's part: a resumable state machine kept in the catalog (so it goes on
//! through meta failover) and advanced by each scheduling pass from what servers report. See
//! docs/design/split.md for the whole protocol.
//!
//! 1. Preparing (`split TABLE`): waits until every partition has a leader that reports the
//!    catalog's voters, a quorum of them live; balancing moves of the table stop. Cancellable.
//! 2. Switching: the children join the catalog as pending copies of their parents (assigned to no
//!    one, kept where they appear) and every assignment of the table carries the doubled count;
//!    each parent's leader proposes a split entry. No way back from here.
//! 3. A parent reported at the doubled count has split (its replicas opened the child): the child
//!    becomes a real partition with the parent's replica set. When every child is real, the table
//!    has the doubled count and the split record goes.
//!
//! Pure: no I/O, no clock (the start time comes in).

use crate::catalog::{Catalog, GroupProgress, TableRecord};
use std::collections::HashMap;
use tern_core::limits::check_partition_count;
use tern_core::{GroupId, NodeId, TernError};

/// A table's split under way.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableSplit {
    /// The partition count after the split (twice the table's).
    pub partition_count: u32,
    /// Past the point of no return: the children are in the table's partitions.
    pub switching: bool,
    pub started_unix_ms: u64,
}

impl TableRecord {
    /// The partition count servers are asked to reach: the split's while it switches.
    pub fn assigned_partition_count(&self) -> u32 {
        match &self.split {
            Some(s) if s.switching => s.partition_count,
            _ => self.partition_count,
        }
    }

    /// Why partition `i` is not ready for the split to switch, if it is not: it needs a leader
    /// whose voters are the catalog's (the split entry is refused in a joint configuration anyway)
    /// and a quorum of them on live nodes. A replica move under way or a replica down does not
    /// hold it up: the child gets a copy of the parent's record, moves and all, and the scheduler
    /// carries on with both.
    fn not_ready(&self, i: usize, alive: &[NodeId], progress: &HashMap<u64, GroupProgress>) -> Option<String> {
        let p = &self.partitions[i];
        let group = GroupId::new(self.id, i as u32);
        let live = p.peers.iter().filter(|(_, n)| alive.contains(n)).count();
        if live <= p.peers.len() / 2 {
            return Some(format!("partition {i}: {live} of {} voters on live nodes", p.peers.len()));
        }
        let g = progress.get(&group.0);
        let settled = g
            .and_then(|g| g.leader_voters.as_ref())
            .is_some_and(|voters| voters.len() == p.peers.len() && p.peers.iter().all(|(x, _)| voters.contains(x)));
        if !settled {
            return Some(format!("partition {i}: no leader has reported the catalog's voters"));
        }
        None
    }

    /// What the split waits for now (empty: nothing, or no split).
    pub fn split_waiting_for(&self, alive: &[NodeId], progress: &HashMap<u64, GroupProgress>) -> String {
        let Some(split) = &self.split else { return String::new() };
        let half = (split.partition_count / 2) as usize;
        if !split.switching {
            return (0..half).find_map(|i| self.not_ready(i, alive, progress)).unwrap_or_default();
        }
        let pending: Vec<usize> = (half..self.partitions.len()).filter(|c| self.partitions[*c].split_pending).map(|c| c - half).collect();
        match pending.first() {
            Some(first) => format!("{} partitions to split, partition {first} first", pending.len()),
            None => String::new(),
        }
    }

    /// Partitions that have split so far.
    pub fn partitions_split(&self) -> u32 {
        match &self.split {
            Some(s) if s.switching => self.partitions.iter().skip((s.partition_count / 2) as usize).filter(|p| !p.split_pending).count() as u32,
            _ => 0,
        }
    }
}

impl Catalog {
    /// Starts doubling a table's partitions.
    pub fn start_split(&mut self, table: &str, now_unix_ms: u64) -> Result<String, TernError> {
        let t = self.tables.get_mut(table).ok_or_else(|| TernError::TableNotFound(table.to_string()))?;
        if let Some(s) = &t.split {
            return Err(TernError::invalid(format!("table {table} is already splitting to {} partitions", s.partition_count)));
        }
        if t.restoring {
            return Err(TernError::invalid(format!("table {table} is being restored; split it once the restore is done")));
        }
        if !t.duplications.is_empty() {
            return Err(TernError::invalid(format!(
                "table {table} is duplicated to another cluster, partition i to partition i: remove its duplications before splitting it"
            )));
        }
        let target = t.partition_count.saturating_mul(2);
        check_partition_count(target).map_err(|e| TernError::invalid(format!("table {table} cannot split to {target} partitions: {e}")))?;
        if t.created_partition_count == 0 {
            t.created_partition_count = t.partition_count; // a table from before splits: never split
        }
        t.split = Some(TableSplit { partition_count: target, switching: false, started_unix_ms: now_unix_ms });
        Ok(format!("table {table}: splitting {} partitions into {target}", t.partition_count))
    }

    /// Cancels a split that has not switched yet.
    pub fn cancel_split(&mut self, table: &str) -> Result<String, TernError> {
        let t = self.tables.get_mut(table).ok_or_else(|| TernError::TableNotFound(table.to_string()))?;
        match &t.split {
            None => Err(TernError::invalid(format!("table {table} is not splitting"))),
            Some(s) if s.switching => Err(TernError::invalid(format!(
                "table {table} has started switching to {} partitions: a split cannot be cancelled past that point, and finishes",
                s.partition_count
            ))),
            Some(_) => {
                t.split = None;
                Ok(format!("table {table}: split cancelled"))
            }
        }
    }

    /// Moves every table's split on as far as what servers report allows (part of each scheduling
    /// pass). Returns the changes made, described.
    pub fn advance_splits(&mut self, alive: &[NodeId], progress: &HashMap<u64, GroupProgress>) -> Vec<String> {
        let mut changes = Vec::new();
        for t in self.tables.values_mut() {
            let Some(split) = t.split.clone() else { continue };
            let half = (split.partition_count / 2) as usize;
            if !split.switching {
                if (0..half).any(|i| t.not_ready(i, alive, progress).is_some()) {
                    continue;
                }
                for i in 0..half {
                    let parent = &t.partitions[i];
                    let child = crate::catalog::PartitionRecord {
                        peers: parent.peers.clone(),
                        preferred_leader: parent.preferred_leader,
                        split_pending: true,
                        from_split: true,
                        ..Default::default()
                    };
                    t.partitions.push(child);
                }
                t.split = Some(TableSplit { switching: true, ..split });
                changes.push(format!("table {}: switching to {} partitions", t.name, split.partition_count));
                continue;
            }
            for i in 0..half {
                let group = GroupId::new(t.id, i as u32);
                let split_here = progress.get(&group.0).is_some_and(|g| g.partition_count >= split.partition_count);
                if !t.partitions[half + i].split_pending || !split_here {
                    continue;
                }
                // The child's raft members are its parent's at the split entry; meta's view of the
                // parent now is the best start, and the scheduler mends any difference as usual.
                let child =
                    crate::catalog::PartitionRecord { split_pending: false, from_split: true, initial_peers: Vec::new(), ..t.partitions[i].clone() };
                t.partitions[half + i] = child;
                changes.push(format!("partition {group}: split, partition {} of table {} is its own", half + i, t.name));
            }
            if t.partitions.iter().all(|p| !p.split_pending) {
                t.partition_count = split.partition_count;
                t.split = None;
                changes.push(format!("table {}: split done, {} partitions", t.name, t.partition_count));
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every partition of `c` led, with the catalog's voters, at `count` partitions applied.
    fn reported(c: &Catalog, count: impl Fn(u32) -> u32) -> HashMap<u64, GroupProgress> {
        let mut progress = HashMap::new();
        for t in c.tables.values() {
            for (i, p) in t.partitions.iter().enumerate().filter(|(_, p)| !p.split_pending) {
                let voters: Vec<u64> = p.peers.iter().map(|(x, _)| *x).collect();
                let g = GroupProgress {
                    leader_commit: 10,
                    leader_voters: Some(voters.clone()),
                    leader_members: Some(voters),
                    partition_count: count(i as u32),
                    ..Default::default()
                };
                progress.insert(GroupId::new(t.id, i as u32).0, g);
            }
        }
        progress
    }

    fn cluster() -> (Catalog, Vec<NodeId>) {
        let mut c = Catalog::default();
        let nodes: Vec<NodeId> = (0..3).map(|i| c.register(&format!("127.0.0.1:{}", 1000 + i), "").unwrap()).collect();
        c.create_table("t", 2, 3, &nodes).unwrap();
        (c, nodes)
    }

    /// Start, cancel and their refusals; a split is cancellable only until it switches.
    #[test]
    fn a_split_is_checked_and_cancellable_until_it_switches() {
        let (mut c, nodes) = cluster();
        assert!(matches!(c.start_split("nope", 1), Err(TernError::TableNotFound(_))));
        assert!(c.cancel_split("t").unwrap_err().to_string().contains("not splitting"));
        c.start_split("t", 1).unwrap();
        assert!(c.start_split("t", 2).unwrap_err().to_string().contains("already splitting"));
        c.cancel_split("t").unwrap();
        assert_eq!(c.tables["t"].split, None);
        c.start_split("t", 3).unwrap();
        // No leader has reported: it waits, and says for what.
        assert!(c.advance_splits(&nodes, &HashMap::new()).is_empty());
        assert!(c.tables["t"].split_waiting_for(&nodes, &HashMap::new()).contains("no leader"));
        let progress = reported(&c, |_| 2);
        let before = c.clone();
        assert!(c.advance_splits(&nodes, &progress)[0].contains("switching to 4"));
        // Clients holding the table before the switch are sent the children.
        let id = c.tables["t"].id;
        let changes = crate::catalog::routing_changes(&before, &c);
        assert_eq!(changes.get(&id), Some(&crate::catalog::RoutingChange::Partitions([2, 3].into())));
        assert!(c.cancel_split("t").unwrap_err().to_string().contains("cannot be cancelled"));
        // Too many partitions, a restore, duplications: refused before anything starts.
        let mut big = Catalog::default();
        let ids: Vec<NodeId> = (0..3).map(|i| big.register(&format!("n{i}"), "").unwrap()).collect();
        big.create_table("b", tern_core::limits::PARTITION_COUNT_MAX, 3, &ids).unwrap();
        assert!(big.start_split("b", 1).unwrap_err().to_string().contains("cannot split"));
        big.create_table("r", 2, 3, &ids).unwrap();
        big.tables.get_mut("r").unwrap().restoring = true;
        assert!(big.start_split("r", 1).unwrap_err().to_string().contains("restored"));
    }

    /// A split goes from preparing to switching to done on what servers report, children getting
    /// their parent's replicas once the parent has split; servers meanwhile get the doubled count,
    /// keep (not create) pending children, and late initial replicas bootstrap with the first count.
    #[test]
    fn a_split_advances_on_reports_until_done() {
        let (mut c, nodes) = cluster();
        c.start_split("t", 7).unwrap();
        assert_eq!(c.assignments(nodes[0]).iter().map(|a| a.partition_count).collect::<Vec<_>>(), vec![2, 2], "preparing");
        c.advance_splits(&nodes, &reported(&c, |_| 2));
        let t = &c.tables["t"];
        assert_eq!((t.partition_count, t.partitions.len(), t.partitions_split()), (2, 4, 0));
        assert!(t.partitions[2].split_pending && t.partitions[3].split_pending);
        let a = c.assignments(nodes[0]);
        assert_eq!(
            a.iter().map(|a| (a.group.partition(), a.partition_count, a.initial_partition_count)).collect::<Vec<_>>(),
            vec![(0, 4, 2), (1, 4, 2)]
        );
        assert_eq!(c.heartbeat_answer(nodes[0]).kept_groups, vec![GroupId::new(t.id, 2).0, GroupId::new(t.id, 3).0]);
        // Partition 0 has split (a replica reports 4), partition 1 not yet.
        let changes = c.advance_splits(&nodes, &reported(&c, |i| if i == 0 { 4 } else { 2 }));
        assert_eq!(changes.len(), 1, "{changes:?}");
        let t = &c.tables["t"];
        assert!(!t.partitions[2].split_pending && t.partitions[3].split_pending);
        assert_eq!(t.partitions[2].peers, t.partitions[0].peers);
        assert_eq!(t.split_waiting_for(&nodes, &HashMap::new()), "1 partitions to split, partition 1 first");
        let child = c.assignments(nodes[0]).into_iter().find(|a| a.group.partition() == 2).unwrap();
        assert!(!child.initial, "a child's replicas start from a checkpoint or a snapshot");
        c.advance_splits(&nodes, &reported(&c, |_| 4));
        let t = &c.tables["t"];
        assert_eq!((t.partition_count, t.partitions.len(), t.split.is_none()), (4, 4, true));
        assert!(c.heartbeat_answer(nodes[0]).kept_groups.is_empty());
        // Meta refuses to act on a partition that does not exist yet.
        c.start_split("t", 8).unwrap();
        c.advance_splits(&nodes, &reported(&c, |_| 4));
        assert!(c.transfer_leader("t", 5, nodes[1]).unwrap_err().to_string().contains("does not exist yet"));
    }

    fn sets(changes: Vec<crate::records::Change>) -> Vec<(Vec<u8>, Vec<u8>)> {
        changes
            .into_iter()
            .filter_map(|ch| match ch {
                crate::records::Change::Set(k, v) => Some((k, v)),
                crate::records::Change::Delete(_) => None,
            })
            .collect()
    }

    /// A switching split is read back from the catalog's records as it was; the switch's writes
    /// cut short after the children's records (before the table's) read back as still preparing,
    /// the children's records cleaned up.
    #[test]
    fn a_split_survives_the_catalog_records() {
        let (mut c, nodes) = cluster();
        c.start_split("t", 7).unwrap();
        let preparing = c.clone();
        c.advance_splits(&nodes, &reported(&c, |_| 2));
        let loaded = crate::records::decode(sets(crate::records::diff(&Catalog::default(), &c))).unwrap();
        assert_eq!(loaded.catalog.tables["t"], c.tables["t"]);
        let mut records = sets(crate::records::diff(&Catalog::default(), &preparing));
        let switch = crate::records::diff(&preparing, &c);
        let children = switch.len() - 1;
        assert!(matches!(&switch[children], crate::records::Change::Set(k, _) if k.starts_with(b"table/")), "the table's record goes last");
        records.extend(sets(switch.into_iter().take(children).collect()));
        let loaded = crate::records::decode(records).unwrap();
        assert_eq!(loaded.catalog.tables["t"], preparing.tables["t"]);
        assert_eq!(loaded.cleanup.len(), 2, "the children's records are removed");
    }
}
