//! The catalog and the decisions made on it. Pure: every function takes the state and its inputs
//! (including the time) and returns results, so it can be tested and simulated.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use tern_core::limits::{check_partition_count, check_replica_count, check_table_name};
use tern_core::{GroupId, NodeId, PeerId, TableId, TernError};
use tern_raft::store::ReplicaSpec;

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeRecord {
    pub address: String,
    #[serde(default)]
    pub zone: String,
    /// Higher wins leadership of the partitions it holds (X-Paxos style priority).
    #[serde(default)]
    pub leader_priority: i32,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PartitionRecord {
    /// (peer id, node id) of each voting replica.
    pub peers: Vec<(PeerId, NodeId)>,
    /// The node whose replica campaigns first, to spread leaders evenly.
    pub preferred_leader: NodeId,
    /// Replicas being filled (raft learners) before they replace a lost voter.
    #[serde(default)]
    pub learners: Vec<(PeerId, NodeId)>,
    /// Peers of the first replica set: they bootstrap raft; later ones start empty.
    #[serde(default)]
    pub initial_peers: Vec<PeerId>,
    /// The voter the learner in `learners` will replace once it has caught up.
    #[serde(default)]
    pub replacing: Option<PeerId>,
    /// Peers meta has dropped that raft may still count as members: they keep running (and no new
    /// peer of the partition goes to their node) until the leader reports a configuration without
    /// them. Destroying them earlier could cost the group its quorum.
    #[serde(default)]
    pub removing: Vec<(PeerId, NodeId)>,
    /// A split's child whose parent has not split yet: not assigned to any server, not scheduled;
    /// its hashkeys are its parent's (see `crate::split`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub split_pending: bool,
    /// Made by a split: its replicas start from their parent's checkpoint or a snapshot, none
    /// bootstraps raft.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_split: bool,
}

/// What meta knows of one partition's replicas from heartbeats.
#[derive(Clone, Debug, Default)]
pub struct GroupProgress {
    /// Commit index reported by the current leader (0 if no leader reported).
    pub leader_commit: u64,
    /// Applied index reported by each peer.
    pub applied: HashMap<PeerId, u64>,
    /// Every member of the raft configuration the leader has applied (voters, outgoing voters and
    /// learners); None if no leader reported.
    pub leader_members: Option<Vec<PeerId>>,
    /// The voters (incoming and outgoing) of the configuration the leader has applied.
    pub leader_voters: Option<Vec<PeerId>>,
    /// Peers that stopped after a storage failure: replaced like peers on a down node.
    pub failed: Vec<PeerId>,
    /// The leader's view of each other member's log (raft's matched index), taken at the same
    /// instant as `leader_commit`; empty if no leader reported.
    pub leader_matched: HashMap<PeerId, u64>,
    /// The largest partition count any replica has applied (a replica that applied a split entry
    /// proves it committed).
    pub partition_count: u32,
}

/// Summarises replica statuses (from heartbeats of live nodes) per group: each peer's applied index,
/// and the commit index and configuration of the leader with the highest term.
pub fn group_progress<'a>(statuses: impl IntoIterator<Item = &'a tern_proto::ReplicaStatus>) -> HashMap<u64, GroupProgress> {
    let mut progress: HashMap<u64, GroupProgress> = HashMap::new();
    let mut leader_terms: HashMap<u64, u64> = HashMap::new();
    for r in statuses {
        let g = progress.entry(r.group_id).or_default();
        g.applied.insert(r.peer_id, r.applied_index);
        g.partition_count = g.partition_count.max(r.partition_count);
        if !r.failure.is_empty() {
            g.failed.push(r.peer_id);
        }
        if r.is_leader && r.term >= leader_terms.get(&r.group_id).copied().unwrap_or(0) {
            leader_terms.insert(r.group_id, r.term);
            g.leader_commit = r.commit_index;
            g.leader_members = Some(r.voters.iter().chain(r.learners.iter()).copied().collect());
            g.leader_voters = Some(r.voters.clone());
            g.leader_matched = r.matched.iter().map(|(p, m)| (*p, *m)).collect();
        }
    }
    progress
}

/// Meta's failure detector: the registered nodes heard from less than `grace` ago (`heard_ago` says
/// how long ago each was last heard from, None if never since this meta leader started). Production
/// and the simulator both decide liveness here.
pub fn alive_nodes(catalog: &Catalog, heard_ago: impl Fn(NodeId) -> Option<std::time::Duration>, grace: std::time::Duration) -> Vec<NodeId> {
    catalog.nodes.keys().filter(|id| heard_ago(**id).is_some_and(|ago| ago < grace)).copied().collect()
}

/// Whether a meta leader may schedule yet: only once it has led (and so heard heartbeats) for a
/// grace period; before that, servers that have not reached the new leader yet would look dead.
/// Production and the simulator both ask here.
pub fn may_schedule(leading_for: std::time::Duration, grace: std::time::Duration) -> bool {
    leading_for >= grace
}

/// Replicas filled on one node at the same time by re-replication (each is a snapshot transfer).
pub const REPAIRS_PER_NODE_MAX: usize = 2;

/// A learner is promoted once it has applied to within this many entries of the leader's commit.
pub const LEARNER_CATCH_UP_ENTRIES: u64 = 100;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TableRecord {
    pub id: TableId,
    pub name: String,
    pub partition_count: u32,
    pub replica_count: u32,
    pub partitions: Vec<PartitionRecord>,
    /// Periodic cold backups (run by the meta leader's process: `tern_client::backup`).
    #[serde(default)]
    pub backup_policy: Option<BackupPolicy>,
    /// Created for a restore that has not finished: clients refuse it.
    #[serde(default)]
    pub restoring: bool,
    /// Cross-cluster duplications of the table (its partitions' leaders ship to each).
    #[serde(default)]
    pub duplications: Vec<Duplication>,
    /// A partition split under way (see `crate::split`).
    #[serde(default)]
    pub split: Option<crate::split::TableSplit>,
    /// The partition count the table was created with: its first partitions' logs begin there
    /// (an initial replica created late bootstraps with it). 0: never split (it is
    /// `partition_count`); set when the first split starts.
    #[serde(default)]
    pub created_partition_count: u32,
}

/// A table's writes shipped to a table of another cluster (see docs/design/duplication.md).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Duplication {
    /// Random, never reused: a removed duplication's progress in the replicas is never mistaken
    /// for a new one's.
    pub id: u64,
    pub remote_meta: Vec<String>,
    pub remote_table: String,
    pub remote_tag: u32,
    pub paused: bool,
    pub log_entries_max: u64,
}

/// Most duplications one table may have.
pub const DUPLICATIONS_PER_TABLE_MAX: usize = 8;
/// Change-log entries a partition keeps for a duplication by default before it falls back to a
/// full copy.
pub const DUP_LOG_ENTRIES_DEFAULT: u64 = 1_000_000;
/// Bounds of the change-log entries an operator may set.
pub const DUP_LOG_ENTRIES_MIN: u64 = 1_000;
pub const DUP_LOG_ENTRIES_MAX: u64 = 100_000_000;

impl Duplication {
    pub fn to_proto(&self, table: &TableRecord) -> tern_proto::Duplication {
        tern_proto::Duplication {
            id: self.id,
            table: table.name.clone(),
            table_id: table.id,
            remote_meta: self.remote_meta.clone(),
            remote_table: self.remote_table.clone(),
            remote_tag: self.remote_tag,
            paused: self.paused,
            log_entries_max: self.log_entries_max,
            partitions: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackupPolicy {
    pub root: String,
    pub interval_seconds: u64,
    pub keep: u32,
    pub rate_mb: u32,
}

/// Shortest interval between periodic backups.
pub const BACKUP_INTERVAL_MIN_SECONDS: u64 = 60;
/// Longest interval between periodic backups (a year).
pub const BACKUP_INTERVAL_MAX_SECONDS: u64 = 366 * 86_400;
/// Most backups a policy keeps.
pub const BACKUP_KEEP_MAX: u32 = 1000;
/// Fastest rate a policy may ask for, MiB per second per partition.
pub const BACKUP_RATE_MB_MAX: u32 = 100_000;

impl BackupPolicy {
    pub fn from_proto(p: &tern_proto::BackupPolicy) -> Result<BackupPolicy, TernError> {
        tern_core::backup::parse_location(&p.root)?;
        if !(BACKUP_INTERVAL_MIN_SECONDS..=BACKUP_INTERVAL_MAX_SECONDS).contains(&p.interval_seconds) {
            return Err(TernError::invalid(format!(
                "backup interval {} s is out of range: {BACKUP_INTERVAL_MIN_SECONDS} s to {BACKUP_INTERVAL_MAX_SECONDS} s",
                p.interval_seconds
            )));
        }
        if !(1..=BACKUP_KEEP_MAX).contains(&p.keep) {
            return Err(TernError::invalid(format!("a policy keeps 1 to {BACKUP_KEEP_MAX} backups, not {}", p.keep)));
        }
        if p.rate_mb > BACKUP_RATE_MB_MAX {
            return Err(TernError::invalid(format!("backup rate {} MiB/s is over the limit of {BACKUP_RATE_MB_MAX}", p.rate_mb)));
        }
        Ok(BackupPolicy { root: p.root.clone(), interval_seconds: p.interval_seconds, keep: p.keep, rate_mb: p.rate_mb })
    }

    pub fn to_proto(&self) -> tern_proto::BackupPolicy {
        tern_proto::BackupPolicy { root: self.root.clone(), interval_seconds: self.interval_seconds, keep: self.keep, rate_mb: self.rate_mb }
    }
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Catalog {
    pub next_node_id: NodeId,
    pub next_table_id: TableId,
    pub next_peer_id: PeerId,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub tables: BTreeMap<String, TableRecord>,
    pub dropped_tables: Vec<TableId>,
    /// Servers being decommissioned: their replicas move elsewhere, and they get no new ones.
    #[serde(default)]
    pub draining: std::collections::BTreeSet<NodeId>,
    /// Balancing (replica moves and leader preferences) paused by an operator; repairs still run.
    #[serde(default)]
    pub balancer_paused: bool,
    /// Drawn by the meta service when the first server registers (0 until then).
    #[serde(default)]
    pub cluster_id: u64,
}

/// Keeps each partition's preferred leader on a usable voter and evens preferred leaders out over
/// the table's nodes: each pass, a node gives away and takes on at most one of the table's
/// preferences (each move a leadership transfer), to a voter holding at least two fewer, and
/// from a node within its share (the mean of its priority) only to one below it: every move makes
/// the spread strictly more even, so balancing ends, and nodes within their share do not pass
/// preferences around among themselves.
/// Leader priority (X-Paxos style): a partition prefers its usable voters with the highest priority
/// (a preferred region), so leadership goes back there when it is healthy; ties are evened out.
fn balance_preferred_leaders(t: &mut TableRecord, usable: &[NodeId], priority: &HashMap<NodeId, i32>, paused: bool) -> Vec<String> {
    let prio = |n: &NodeId| priority.get(n).copied().unwrap_or(0);
    let mut changes = Vec::new();
    let mut counts: HashMap<NodeId, usize> = usable.iter().map(|n| (*n, 0)).collect();
    for p in t.partitions.iter().filter(|p| !p.split_pending) {
        if let Some(c) = counts.get_mut(&p.preferred_leader) {
            *c += 1;
        }
    }
    for (i, p) in t.partitions.iter_mut().enumerate().filter(|(_, p)| !p.split_pending) {
        let voters: Vec<NodeId> = p.peers.iter().map(|(_, n)| *n).filter(|n| usable.contains(n)).collect();
        let top = voters.iter().map(prio).max().unwrap_or(0);
        if !voters.contains(&p.preferred_leader) || prio(&p.preferred_leader) < top {
            if let Some(best) = voters.iter().filter(|n| prio(n) == top).min_by_key(|n| (counts[n], **n)).copied() {
                if let Some(c) = counts.get_mut(&p.preferred_leader) {
                    *c -= 1;
                }
                *counts.get_mut(&best).expect("usable") += 1;
                changes.push(format!("partition {}.{i}: preferred leader node {} -> {best}", t.id, p.preferred_leader));
                p.preferred_leader = best;
            }
        }
    }
    if paused {
        return changes;
    }
    // The share of preferences a node of each priority should hold: the mean over its nodes,
    // rounded down and up. A node above it gives to any voter holding two fewer; one within it
    // only to a voter below it (nodes within their share do not pass preferences around).
    let mut by_priority: HashMap<i32, (usize, usize)> = HashMap::new();
    for (n, c) in &counts {
        let e = by_priority.entry(prio(n)).or_default();
        e.0 += c;
        e.1 += 1;
    }
    let ceiling = |n: &NodeId| by_priority.get(&prio(n)).map_or(0, |(held, nodes)| held.div_ceil(*nodes));
    let floor = |n: &NodeId| by_priority.get(&prio(n)).map_or(0, |(held, nodes)| held / nodes);
    let (mut gave, mut took) = (HashSet::new(), HashSet::new());
    for (i, p) in t.partitions.iter_mut().enumerate().filter(|(_, p)| !p.split_pending) {
        let from = p.preferred_leader;
        let Some(&have) = counts.get(&from).filter(|_| !gave.contains(&from)) else { continue };
        // A node within its share gives only to one below it (so that a node over its share
        // whose voters are all at their share can still be relieved, through them).
        let over = have > ceiling(&from);
        let better = p
            .peers
            .iter()
            .map(|(_, n)| *n)
            .filter(|n| usable.contains(n) && !took.contains(n) && prio(n) == prio(&from) && counts[n] + 1 < have && (over || counts[n] < floor(n)))
            .min_by_key(|n| (counts[n], *n));
        if let Some(better) = better {
            changes.push(format!("partition {}.{i}: preferred leader node {from} -> {better} (balance)", t.id));
            p.preferred_leader = better;
            *counts.get_mut(&from).expect("counted") -= 1;
            *counts.get_mut(&better).expect("usable") += 1;
            gave.insert(from);
            took.insert(better);
        }
    }
    changes
}

/// What a client routes partition `i` of `t` by: the replicas serving its hashkeys (a pending
/// split child's are its parent's) and whether it is a pending child.
fn routing_of(t: &TableRecord, i: usize) -> (&[(PeerId, NodeId)], bool) {
    let p = &t.partitions[i];
    let serving = if p.split_pending { i.saturating_sub(t.partition_count as usize) } else { i };
    (&t.partitions.get(serving).unwrap_or(p).peers, p.split_pending)
}

/// How a table's routing changed from one catalog to the next.
#[derive(Clone, Debug, PartialEq)]
pub enum RoutingChange {
    /// The table is new (or was dropped and created again): every partition.
    Whole,
    /// These partitions' routing changed (or they are new).
    Partitions(BTreeSet<u32>),
}

/// The tables whose routing differs between `old` and `new` (by table id; dropped tables are left
/// out: clients learn that from the error).
pub fn routing_changes(old: &Catalog, new: &Catalog) -> BTreeMap<TableId, RoutingChange> {
    let mut out = BTreeMap::new();
    for (name, t) in &new.tables {
        let Some(before) = old.tables.get(name).filter(|o| o.id == t.id) else {
            out.insert(t.id, RoutingChange::Whole);
            continue;
        };
        let changed: BTreeSet<u32> = (0..t.partitions.len())
            .filter(|&i| i >= before.partitions.len() || routing_of(before, i) != routing_of(t, i))
            .map(|i| i as u32)
            .collect();
        if !changed.is_empty() {
            out.insert(t.id, RoutingChange::Partitions(changed));
        }
    }
    out
}

/// What `node` hosts of partition `i` of `t`, if anything: its newest peer of the group there (a
/// replacement on the same node gets a new peer while the old one is still listed).
fn assignment(t: &TableRecord, i: usize, p: &PartitionRecord, node: NodeId) -> Option<ReplicaSpec> {
    let (peer_id, _) = p.peers.iter().chain(p.learners.iter()).chain(p.removing.iter()).filter(|(_, n)| *n == node).max_by_key(|(x, _)| *x)?;
    Some(ReplicaSpec {
        group: GroupId::new(t.id, i as u32),
        peer_id: *peer_id,
        preferred_leader_peer: p.peers.iter().find(|(_, n)| *n == p.preferred_leader).map(|(x, _)| *x).unwrap_or(0),
        peers: p.peers.clone(),
        learners: p.learners.clone(),
        removing: p.removing.clone(),
        initial_voters: p.initial_peers.clone(),
        initial: !p.from_split && (p.initial_peers.is_empty() || p.initial_peers.contains(peer_id)),
        partition_count: t.assigned_partition_count(),
        initial_partition_count: t.created_partition_count,
        preferred_leader: p.preferred_leader == node,
    })
}

impl Catalog {
    /// Registers a server at an address and returns its new id (ids are never reused).
    pub fn register(&mut self, address: &str, zone: &str) -> Result<NodeId, TernError> {
        self.register_with_priority(address, zone, 0)
    }

    pub fn register_with_priority(&mut self, address: &str, zone: &str, leader_priority: i32) -> Result<NodeId, TernError> {
        if address.is_empty() || address.len() > 256 {
            return Err(TernError::invalid("node address must be 1 to 256 characters"));
        }
        if zone.len() > 128 {
            return Err(TernError::invalid("zone names are at most 128 characters"));
        }
        self.next_node_id += 1;
        let id = self.next_node_id;
        self.nodes.insert(id, NodeRecord { address: address.to_string(), zone: zone.to_string(), leader_priority });
        Ok(id)
    }

    fn zone(&self, node: NodeId) -> &str {
        self.nodes.get(&node).map(|n| n.zone.as_str()).unwrap_or("")
    }

    /// Orders candidate nodes for a new replica: nodes in zones the partition does not use yet
    /// first, then by load, then by id.
    fn rank(&self, candidates: &mut [NodeId], used_zones: &[&str], load: &HashMap<NodeId, usize>) {
        candidates.sort_by_key(|n| (used_zones.contains(&self.zone(*n)), load.get(n).copied().unwrap_or(0), *n));
    }

    /// A table created for a restore takes requests from now on.
    pub fn finish_restore(&mut self, table: &str) -> Result<String, TernError> {
        let t = self.tables.get_mut(table).ok_or_else(|| TernError::TableNotFound(table.to_string()))?;
        t.restoring = false;
        Ok(format!("table {table} is restored and takes requests"))
    }

    /// Adds a duplication of `table` (its id drawn by the caller). The remote side was checked by
    /// the caller (its tag differs from this cluster's, its table has as many partitions).
    pub fn add_duplication(&mut self, table: &str, dup: Duplication) -> Result<String, TernError> {
        let cluster_tag = tern_core::codec::cluster_tag(self.cluster_id);
        let t = self.tables.get_mut(table).ok_or_else(|| TernError::TableNotFound(table.to_string()))?;
        if t.split.is_some() {
            return Err(TernError::invalid(format!("table {table} is splitting; add the duplication once the split is done")));
        }
        if dup.remote_meta.is_empty() || dup.remote_meta.iter().any(|a| a.trim().is_empty()) {
            return Err(TernError::invalid("a duplication needs the remote cluster's meta addresses"));
        }
        if dup.remote_meta.len() > 16 || dup.remote_meta.iter().any(|a| a.len() > 256) {
            return Err(TernError::invalid("at most 16 remote meta addresses of at most 256 bytes each"));
        }
        check_table_name(&dup.remote_table)?;
        if dup.remote_tag == 0 || dup.remote_tag > tern_core::codec::CLUSTER_TAG_MAX {
            return Err(TernError::invalid(format!(
                "remote cluster tag {} is out of range (1 to {})",
                dup.remote_tag,
                tern_core::codec::CLUSTER_TAG_MAX
            )));
        }
        if dup.remote_tag == cluster_tag {
            return Err(TernError::invalid(format!(
                "the remote cluster has this cluster's tag {cluster_tag}: versions could not tell their writes apart (is it this cluster?)"
            )));
        }
        if !(DUP_LOG_ENTRIES_MIN..=DUP_LOG_ENTRIES_MAX).contains(&dup.log_entries_max) {
            return Err(TernError::invalid(format!(
                "a duplication's change log holds {DUP_LOG_ENTRIES_MIN} to {DUP_LOG_ENTRIES_MAX} entries, not {}",
                dup.log_entries_max
            )));
        }
        if t.restoring {
            return Err(TernError::invalid(format!("table {table} is being restored")));
        }
        if t.duplications.len() >= DUPLICATIONS_PER_TABLE_MAX {
            return Err(TernError::invalid(format!("table {table} already has {DUPLICATIONS_PER_TABLE_MAX} duplications, the limit")));
        }
        if t.duplications.iter().any(|d| d.remote_table == dup.remote_table && d.remote_tag == dup.remote_tag) {
            return Err(TernError::invalid(format!("table {table} is already duplicated to {} of that cluster", dup.remote_table)));
        }
        let said = format!("duplication {} of table {table} to {} at {}", dup.id, dup.remote_table, dup.remote_meta.join(","));
        t.duplications.push(dup);
        Ok(said)
    }

    /// Pauses, resumes or removes a duplication.
    pub fn change_duplication(&mut self, id: u64, action: tern_proto::DuplicationAction) -> Result<String, TernError> {
        use tern_proto::DuplicationAction as A;
        let t = self
            .tables
            .values_mut()
            .find(|t| t.duplications.iter().any(|d| d.id == id))
            .ok_or_else(|| TernError::invalid(format!("no duplication {id}")))?;
        let i = t.duplications.iter().position(|d| d.id == id).expect("found");
        Ok(match action {
            A::DupPause => {
                t.duplications[i].paused = true;
                format!("duplication {id} of table {} paused", t.name)
            }
            A::DupResume => {
                t.duplications[i].paused = false;
                format!("duplication {id} of table {} resumed", t.name)
            }
            A::DupRemove => {
                t.duplications.remove(i);
                format!("duplication {id} of table {} removed", t.name)
            }
        })
    }

    /// Sets (or with None removes) a table's periodic backup policy.
    pub fn set_backup_policy(&mut self, table: &str, policy: Option<BackupPolicy>) -> Result<String, TernError> {
        let t = self.tables.get_mut(table).ok_or_else(|| TernError::TableNotFound(table.to_string()))?;
        let said = match &policy {
            Some(p) => format!("table {table}: a backup every {} s into {}, keeping {}", p.interval_seconds, p.root, p.keep),
            None => format!("table {table}: no periodic backups"),
        };
        t.backup_policy = policy;
        Ok(said)
    }

    /// Changes a table's replica count; the scheduler adds or removes replicas to match.
    pub fn set_replica_count(&mut self, table: &str, count: u32, alive: &[NodeId]) -> Result<String, TernError> {
        check_replica_count(count)?;
        let usable = alive.iter().filter(|n| !self.draining.contains(n)).count() as u32;
        if count > usable {
            return Err(TernError::NotEnoughNodes(format!("{count} replicas need {count} servers in use; {usable} are")));
        }
        let t = self.tables.get_mut(table).ok_or_else(|| TernError::TableNotFound(table.to_string()))?;
        let old = t.replica_count;
        t.replica_count = count;
        Ok(format!("table {table}: replica count {old} -> {count}"))
    }

    /// Creates a table, placing `replica_count` replicas of each partition on distinct nodes among
    /// `alive` so that replica counts and preferred leaders are as even as possible.
    pub fn create_table(&mut self, name: &str, partition_count: u32, replica_count: u32, alive: &[NodeId]) -> Result<&TableRecord, TernError> {
        check_table_name(name)?;
        check_partition_count(partition_count)?;
        check_replica_count(replica_count)?;
        if self.tables.contains_key(name) {
            return Err(TernError::TableExists(name.to_string()));
        }
        if (alive.len() as u32) < replica_count {
            return Err(TernError::NotEnoughNodes(format!("{replica_count} replicas need {replica_count} live servers; {} are live", alive.len())));
        }
        let mut replicas: HashMap<NodeId, u64> = alive.iter().map(|n| (*n, 0)).collect();
        let mut leaders: HashMap<NodeId, u64> = alive.iter().map(|n| (*n, 0)).collect();
        for t in self.tables.values() {
            for p in &t.partitions {
                for (_, n) in &p.peers {
                    if let Some(c) = replicas.get_mut(n) {
                        *c += 1;
                    }
                }
                if let Some(c) = leaders.get_mut(&p.preferred_leader) {
                    *c += 1;
                }
            }
        }
        let mut partitions = Vec::with_capacity(partition_count as usize);
        for _ in 0..partition_count {
            // Greedy: each next replica on the least-loaded node of a zone not used yet, if any.
            let mut candidates: Vec<NodeId> = Vec::new();
            for _ in 0..replica_count {
                let used: Vec<&str> = candidates.iter().map(|n| self.zone(*n)).collect();
                let mut rest: Vec<NodeId> = alive.iter().copied().filter(|n| !candidates.contains(n)).collect();
                let load: HashMap<NodeId, usize> = replicas.iter().map(|(n, c)| (*n, *c as usize)).collect();
                self.rank(&mut rest, &used, &load);
                candidates.push(rest[0]);
            }
            let leader = *candidates.iter().min_by_key(|n| (leaders[n], **n)).expect("replica_count >= 1");
            *leaders.get_mut(&leader).expect("alive") += 1;
            let peers: Vec<(PeerId, NodeId)> = candidates
                .iter()
                .map(|n| {
                    *replicas.get_mut(n).expect("alive") += 1;
                    self.next_peer_id += 1;
                    (self.next_peer_id, *n)
                })
                .collect();
            let initial_peers = peers.iter().map(|(p, _)| *p).collect();
            partitions.push(PartitionRecord { peers, preferred_leader: leader, initial_peers, ..Default::default() });
        }
        self.next_table_id += 1;
        let table = TableRecord {
            id: self.next_table_id,
            name: name.to_string(),
            partition_count,
            replica_count,
            partitions,
            backup_policy: None,
            restoring: false,
            duplications: Vec::new(),
            split: None,
            created_partition_count: partition_count,
        };
        self.tables.insert(name.to_string(), table);
        Ok(&self.tables[name])
    }

    pub fn drop_table(&mut self, name: &str) -> Result<TableRecord, TernError> {
        let table = self.tables.remove(name).ok_or_else(|| TernError::TableNotFound(name.to_string()))?;
        // Kept in id order, as the catalog's records list them.
        let at = self.dropped_tables.partition_point(|id| *id < table.id);
        self.dropped_tables.insert(at, table.id);
        Ok(table)
    }

    /// Starts moving every replica off `node`.
    pub fn decommission(&mut self, node: NodeId, alive: &[NodeId]) -> Result<String, TernError> {
        if !self.nodes.contains_key(&node) {
            return Err(TernError::invalid(format!("no server with id {node}")));
        }
        let usable_after = alive.iter().filter(|n| **n != node && !self.draining.contains(n)).count() as u32;
        let needed = self.tables.values().map(|t| t.replica_count).max().unwrap_or(0);
        if usable_after < needed {
            return Err(TernError::NotEnoughNodes(format!("tables need {needed} servers; only {usable_after} would remain in use")));
        }
        self.draining.insert(node);
        Ok(format!("decommissioning node {node}: its replicas will move to other servers"))
    }

    pub fn recommission(&mut self, node: NodeId) -> Result<String, TernError> {
        if !self.draining.remove(&node) {
            return Err(TernError::invalid(format!("node {node} is not being decommissioned")));
        }
        Ok(format!("node {node} is back in use"))
    }

    fn partition_mut(&mut self, table: &str, partition: u32) -> Result<&mut PartitionRecord, TernError> {
        let t = self.tables.get_mut(table).ok_or_else(|| TernError::TableNotFound(table.to_string()))?;
        let count = t.partition_count;
        match t.partitions.get_mut(partition as usize) {
            Some(p) if p.split_pending => {
                Err(TernError::invalid(format!("partition {partition} of table {table} is a split's child that does not exist yet")))
            }
            Some(p) => Ok(p),
            None => Err(TernError::invalid(format!("table {table} has {count} partitions; there is no partition {partition}"))),
        }
    }

    /// Prefers `node` (which must hold a voter) as the partition's leader.
    pub fn transfer_leader(&mut self, table: &str, partition: u32, node: NodeId) -> Result<String, TernError> {
        let p = self.partition_mut(table, partition)?;
        if !p.peers.iter().any(|(_, n)| *n == node) {
            return Err(TernError::invalid(format!("node {node} holds no voter of {table}.{partition}")));
        }
        p.preferred_leader = node;
        Ok(format!("leadership of {table}.{partition} will move to node {node}"))
    }

    /// Moves the partition's replica on `from` to `to` (learner first, then swapped in).
    pub fn move_replica(&mut self, table: &str, partition: u32, from: NodeId, to: NodeId, alive: &[NodeId]) -> Result<String, TernError> {
        if !alive.contains(&to) || self.draining.contains(&to) {
            return Err(TernError::invalid(format!("node {to} is not a live server in use")));
        }
        let mut next_peer_id = self.next_peer_id;
        let p = self.partition_mut(table, partition)?;
        let Some(&(victim, _)) = p.peers.iter().find(|(_, n)| *n == from) else {
            return Err(TernError::invalid(format!("node {from} holds no voter of {table}.{partition}")));
        };
        if p.peers.iter().any(|(_, n)| *n == to) {
            return Err(TernError::invalid(format!("node {to} already holds a replica of {table}.{partition}")));
        }
        if !p.learners.is_empty() || !p.removing.is_empty() {
            return Err(TernError::Busy(format!("{table}.{partition} already has a move in progress")));
        }
        next_peer_id += 1;
        p.learners.push((next_peer_id, to));
        p.replacing = Some(victim);
        self.next_peer_id = next_peer_id;
        Ok(format!("moving {table}.{partition} from node {from} to node {to}"))
    }

    pub fn table(&self, name: &str) -> Result<&TableRecord, TernError> {
        self.tables.get(name).ok_or_else(|| TernError::TableNotFound(name.to_string()))
    }

    /// One pass of the scheduler, pure: cluster state in, catalog changes out (returned as log lines;
    /// empty if nothing changed). In order of urgency, for each partition without a move in flight:
    /// 1. repair: a voter on a down node, or one that stopped after a storage failure, is replaced;
    /// 2. drain: a voter on a decommissioned node is moved off;
    /// 3. balance (unless paused): a voter on the table's most loaded node moves to its least loaded
    ///    one when they differ by more than one. Balancing moves run side by side (at most one per
    ///    usable node in the cluster, and `per_target_max` filling per node): one at a time took
    ///    hours to even out ten new servers among 100 (`tern_sim::scale`). A voter being moved
    ///    counts on its target already, not on its source, so moves in flight do not overshoot.
    ///
    /// A move adds a learner on the least-loaded usable node (live, not draining, no replica of the
    /// partition yet), at most `per_target_max` filling per node; once the learner has caught up it
    /// replaces the moved voter. Then preferred leaders are kept on live voters and evened out per
    /// table (unless paused); leaders follow their preference.
    pub fn schedule(&mut self, alive: &[NodeId], progress: &HashMap<u64, GroupProgress>, per_target_max: usize) -> Vec<String> {
        let usable: Vec<NodeId> = alive.iter().copied().filter(|n| !self.draining.contains(n)).collect();
        let mut changes = Vec::new();
        let mut load: HashMap<NodeId, usize> = usable.iter().map(|n| (*n, 0)).collect();
        let mut filling: HashMap<NodeId, usize> = HashMap::new();
        let mut balancing = 0usize;
        let balancing_max = usable.len().max(1);
        for t in self.tables.values() {
            for p in t.partitions.iter().filter(|p| !p.split_pending) {
                for (_, n) in p.peers.iter().chain(p.learners.iter()) {
                    if let Some(c) = load.get_mut(n) {
                        *c += 1;
                    }
                }
                for (_, n) in &p.learners {
                    *filling.entry(*n).or_default() += 1;
                }
                let moved_node = p.replacing.and_then(|r| p.peers.iter().find(|(x, _)| *x == r)).map(|(_, n)| *n);
                if moved_node.is_some_and(|n| usable.contains(&n)) {
                    balancing += 1;
                }
            }
        }
        let mut next_peer_id = self.next_peer_id;
        let paused = self.balancer_paused;
        let zone_of: HashMap<NodeId, String> = self.nodes.iter().map(|(id, n)| (*id, n.zone.clone())).collect();
        let priority: HashMap<NodeId, i32> = self.nodes.iter().map(|(id, n)| (*id, n.leader_priority)).collect();
        for t in self.tables.values_mut() {
            let mut table_load: HashMap<NodeId, usize> = usable.iter().map(|n| (*n, 0)).collect();
            // A splitting table's replicas stay where they are (repairs aside) until it is done.
            let splitting = t.split.is_some();
            for p in t.partitions.iter().filter(|p| !p.split_pending) {
                // A voter being replaced counts where it is going (its learner), not where it is.
                let leaving = p.replacing.filter(|_| !p.learners.is_empty());
                for (_, n) in p.peers.iter().filter(|(x, _)| Some(*x) != leaving).chain(p.learners.iter()) {
                    if let Some(c) = table_load.get_mut(n) {
                        *c += 1;
                    }
                }
            }
            // The least load of any usable node (a lower bound for every move's target).
            let mut table_min = table_load.values().copied().min().unwrap_or(0);
            for (i, p) in t.partitions.iter_mut().enumerate() {
                let group = GroupId::new(t.id, i as u32);
                if p.split_pending {
                    continue;
                }
                if !p.removing.is_empty() {
                    // Wait until raft has applied a configuration without the dropped peers.
                    let members = progress.get(&group.0).and_then(|g| g.leader_members.as_ref());
                    match members {
                        Some(m) if p.removing.iter().all(|(x, _)| !m.contains(x)) => {
                            let gone: Vec<PeerId> = p.removing.drain(..).map(|(x, _)| x).collect();
                            changes.push(format!("partition {group}: raft no longer counts peers {gone:?}"));
                        }
                        _ => continue,
                    }
                }
                if let Some(&(learner, node)) = p.learners.first() {
                    let replacing = p.replacing.filter(|r| p.peers.iter().any(|(x, _)| x == r));
                    let growing = replacing.is_none() && (p.peers.len() as u32) < t.replica_count;
                    // A replacement on the replaced peer's own node has destroyed that peer already:
                    // cancelling it would leave the catalog counting on a peer that is gone, so while
                    // no other node could take the replica it waits for the node to come back.
                    // (Cancelled, the old peer counts as lost on a down node and is replaced the
                    // usual way; if the node comes back, it reports that peer as gone.)
                    let in_place = replacing.is_some_and(|r| p.peers.iter().any(|(x, n)| *x == r && *n == node));
                    let spare = usable.iter().any(|n| !p.peers.iter().chain(p.removing.iter()).any(|(_, m)| m == n));
                    if (!alive.contains(&node) && (!in_place || spare)) || (replacing.is_none() && !growing) {
                        p.learners.clear();
                        p.replacing = None;
                        changes.push(format!("partition {group}: cancelled learner {learner} on node {node}"));
                        continue;
                    }
                    let g = progress.get(&group.0);
                    // A learner starts empty at index 0: it counts as caught up only once it holds
                    // data (a snapshot) and is close to the leader. Found by the simulator (seed 5000
                    // of the scheduler sweep): an empty learner of a short log was promoted.
                    // Near the leader's commit as the leader sees it (one instant: the learner's own
                    // report comes from another heartbeat, and under steady writes the two can stay
                    // apart by more than the margin for good; a flaky process test found it).
                    let caught_up = g.is_some_and(|g| {
                        let has_data = g.applied.get(&learner).is_some_and(|a| *a > 0);
                        let close = match g.leader_matched.get(&learner) {
                            Some(m) => m + LEARNER_CATCH_UP_ENTRIES >= g.leader_commit,
                            None => g.applied.get(&learner).is_some_and(|a| a + LEARNER_CATCH_UP_ENTRIES >= g.leader_commit),
                        };
                        g.leader_commit > 0 && has_data && close
                    });
                    if caught_up && growing {
                        p.peers.push((learner, node));
                        p.learners.clear();
                        changes.push(format!("partition {group}: peer {learner} on node {node} added as a voter"));
                    } else if caught_up {
                        let old = replacing.expect("checked above");
                        let old_node = p.peers.iter().find(|(x, _)| *x == old).map(|(_, n)| *n).expect("checked above");
                        p.peers.retain(|(x, _)| *x != old);
                        p.peers.push((learner, node));
                        p.removing.push((old, old_node));
                        p.learners.clear();
                        p.replacing = None;
                        if p.preferred_leader == old_node {
                            p.preferred_leader = node;
                        }
                        changes.push(format!("partition {group}: peer {learner} on node {node} replaced peer {old} on node {old_node}"));
                    }
                    continue;
                }
                if p.peers.len() as u32 > t.replica_count {
                    // Shrink: drop the voter on the most loaded node (never the only one left).
                    if let Some(&(peer, node)) = p.peers.iter().max_by_key(|(_, n)| (table_load.get(n).copied().unwrap_or(usize::MAX), *n)) {
                        p.peers.retain(|(x, _)| *x != peer);
                        p.removing.push((peer, node));
                        if let Some(c) = table_load.get_mut(&node) {
                            *c -= 1;
                        }
                        table_min = table_min.min(table_load.get(&node).copied().unwrap_or(table_min));
                        if p.preferred_leader == node {
                            p.preferred_leader = p.peers[0].1;
                        }
                        changes.push(format!("partition {group}: removed peer {peer} on node {node} (replica count {})", t.replica_count));
                    }
                    continue;
                }
                let hosting: Vec<NodeId> = p.peers.iter().chain(p.removing.iter()).map(|(_, n)| *n).collect();
                let zones = &zone_of;
                let candidates = |load: &HashMap<NodeId, usize>, filling: &HashMap<NodeId, usize>, leaving: NodeId| {
                    let used: Vec<&str> = hosting.iter().filter(|n| **n != leaving).map(|n| zones.get(n).map(|z| z.as_str()).unwrap_or("")).collect();
                    usable
                        .iter()
                        .filter(|n| !hosting.contains(n) && filling.get(n).copied().unwrap_or(0) < per_target_max)
                        .min_by_key(|n| (used.contains(&zones.get(n).map(|z| z.as_str()).unwrap_or("")), load[n], **n))
                        .copied()
                };
                if (p.peers.len() as u32) < t.replica_count {
                    // Grow: a new learner that becomes an extra voter.
                    if let Some(target) = candidates(&load, &filling, 0) {
                        next_peer_id += 1;
                        p.learners.push((next_peer_id, target));
                        p.replacing = None;
                        *load.get_mut(&target).expect("usable") += 1;
                        *table_load.get_mut(&target).expect("usable") += 1;
                        *filling.entry(target).or_default() += 1;
                        changes
                            .push(format!("partition {group}: adding learner {next_peer_id} on node {target} (replica count {})", t.replica_count));
                    }
                    continue;
                }
                let failed = progress.get(&group.0).map(|g| g.failed.as_slice()).unwrap_or_default();
                let lost = p.peers.iter().find(|(x, n)| !alive.contains(n) || failed.contains(x)).copied();
                let drained = p.peers.iter().find(|(_, n)| self.draining.contains(n) && alive.contains(n)).copied();
                let (victim, target, why) = if let Some(v) = lost.or(drained) {
                    let why = if lost.is_some() { "lost" } else { "draining" };
                    // A peer lost on a live node (its storage failed, or the node can no longer host
                    // it) is replaced on that same node when no node outside the group exists: a new
                    // peer there, from a healthy peer's snapshot (three replicas on three nodes). Its
                    // old replica is destroyed first, so only while raft's voters are exactly the
                    // catalog's (no change under way) and every other voter is seen running (reported
                    // by a live node, without a failure): otherwise the group could be left without a
                    // quorum for good.
                    let spare = usable.iter().any(|n| !hosting.contains(n));
                    let g = progress.get(&group.0);
                    let settled = g
                        .and_then(|g| g.leader_voters.as_ref())
                        .is_some_and(|voters| voters.len() == p.peers.len() && p.peers.iter().all(|(x, _)| voters.contains(x)));
                    let others_healthy = p
                        .peers
                        .iter()
                        .filter(|x| **x != v)
                        .all(|(x, n)| alive.contains(n) && g.is_some_and(|g| g.applied.contains_key(x)) && !failed.contains(x));
                    let in_place = lost.is_some() && !spare && usable.contains(&v.1) && settled && others_healthy;
                    let target = if in_place { Some(v.1) } else { candidates(&load, &filling, v.1) };
                    (v, target, why)
                } else if !paused && !splitting && balancing < balancing_max {
                    let heaviest = p.peers.iter().filter(|(_, n)| table_load.contains_key(n)).max_by_key(|(_, n)| (table_load[n], *n)).copied();
                    // No node of the table is light enough to take one: skip the search over every
                    // node (with 100,000 partitions it made a pass take seconds).
                    if heaviest.is_none_or(|h| table_load[&h.1] <= table_min + 1) {
                        continue;
                    }
                    let lightest = heaviest.and_then(|h| candidates(&table_load, &filling, h.1));
                    match (heaviest, lightest) {
                        (Some(v), Some(target)) if table_load[&v.1] > table_load[&target] + 1 => (v, Some(target), "balance"),
                        _ => continue,
                    }
                } else {
                    continue;
                };
                let Some(target) = target else { continue };
                next_peer_id += 1;
                p.learners.push((next_peer_id, target));
                p.replacing = Some(victim.0);
                *load.get_mut(&target).expect("usable") += 1;
                *table_load.get_mut(&target).expect("usable") += 1;
                if let Some(c) = table_load.get_mut(&victim.1) {
                    *c -= 1;
                }
                *filling.entry(target).or_default() += 1;
                balancing += usize::from(why == "balance");
                table_min = table_load.values().copied().min().unwrap_or(0);
                changes.push(format!(
                    "partition {group}: moving peer {} off node {} ({why}): learner {next_peer_id} on node {target}",
                    victim.0, victim.1
                ));
            }
            changes.extend(balance_preferred_leaders(t, &usable, &priority, paused));
        }
        self.next_peer_id = next_peer_id;
        changes
    }

    /// One pass of meta's scheduler over what the live nodes report (`statuses`: their replicas);
    /// `operator_step` balances even while the balancer is paused (an operator's manual step).
    /// Returns the changes made, described.
    pub fn scheduling_pass<'a>(
        &mut self,
        alive: &[NodeId],
        statuses: impl IntoIterator<Item = &'a tern_proto::ReplicaStatus>,
        operator_step: bool,
    ) -> Vec<String> {
        let progress = group_progress(statuses);
        let paused = self.balancer_paused;
        if operator_step {
            self.balancer_paused = false;
        }
        let mut changes = self.advance_splits(alive, &progress);
        changes.extend(self.schedule(alive, &progress, REPAIRS_PER_NODE_MAX));
        self.balancer_paused = paused;
        changes
    }

    /// The catalog's part of meta's answer to a heartbeat from `node`: the replicas it should host,
    /// the tables whose other replicas it must destroy, and the dropped tables. The service adds
    /// what liveness knows (other servers' addresses); a server acts on it with
    /// `tern_raft::store::reconcile_with_meta`.
    pub fn heartbeat_answer(&self, node: NodeId) -> tern_proto::HeartbeatResponse {
        let assignments = self.assignments(node).iter().map(ReplicaSpec::to_proto).collect();
        tern_proto::HeartbeatResponse { assignments, ..self.heartbeat_answer_without_assignments(node) }
    }

    /// `heartbeat_answer` but for the assignments, which the keeper makes for every node at once
    /// (`assignments_by_node`) and shares between answers while the catalog does not change.
    pub fn heartbeat_answer_without_assignments(&self, node: NodeId) -> tern_proto::HeartbeatResponse {
        tern_proto::HeartbeatResponse {
            error: None,
            assignments: vec![],
            nodes: vec![],
            dropped_tables: self.dropped_tables.clone(),
            live_tables: self.tables.values().map(|t| t.id).collect(),
            live_table_partitions: self.tables.values().map(|t| t.partitions.len() as u32).collect(),
            kept_groups: self.pending_children(node),
            cluster_id: self.cluster_id,
            duplications: self.tables.values().flat_map(|t| t.duplications.iter().map(|d| d.to_proto(t))).collect(),
            ..Default::default()
        }
    }

    /// Split children not yet split whose parent has a replica on `node`: the replica of the child
    /// the parent makes there is kept, though meta assigns it only once the parent has split.
    fn pending_children(&self, node: NodeId) -> Vec<u64> {
        let mut out = Vec::new();
        for t in self.tables.values().filter(|t| t.split.is_some()) {
            for (i, _) in t.partitions.iter().enumerate().filter(|(_, p)| p.split_pending) {
                let parent = &t.partitions[i - t.partition_count as usize];
                if parent.peers.iter().chain(&parent.learners).chain(&parent.removing).any(|(_, n)| *n == node) {
                    out.push(GroupId::new(t.id, i as u32).0);
                }
            }
        }
        out
    }

    /// Every replica `node` should host.
    pub fn assignments(&self, node: NodeId) -> Vec<ReplicaSpec> {
        let mut out = Vec::new();
        for t in self.tables.values() {
            for (i, p) in t.partitions.iter().enumerate().filter(|(_, p)| !p.split_pending) {
                if let Some(spec) = assignment(t, i, p, node) {
                    out.push(spec);
                }
            }
        }
        out
    }

    /// Every node's assignments (`assignments`), as heartbeat answers carry them, by group id:
    /// one pass over the catalog for all nodes, each list shared by the answers that carry it.
    pub fn assignments_by_node(&self) -> HashMap<NodeId, std::sync::Arc<Vec<tern_proto::ReplicaAssignment>>> {
        let mut out: HashMap<NodeId, Vec<tern_proto::ReplicaAssignment>> = HashMap::new();
        for t in self.tables.values() {
            for (i, p) in t.partitions.iter().enumerate().filter(|(_, p)| !p.split_pending) {
                let members: Vec<&(PeerId, NodeId)> = p.peers.iter().chain(&p.learners).chain(&p.removing).collect();
                for (k, (_, node)) in members.iter().enumerate() {
                    // Each node once (it may be listed twice while a replacement on it is made).
                    if members[..k].iter().any(|(_, n)| n == node) {
                        continue;
                    }
                    if let Some(spec) = assignment(t, i, p, *node) {
                        out.entry(*node).or_default().push(spec.to_proto());
                    }
                }
            }
        }
        out.into_iter()
            .map(|(node, mut list)| {
                list.sort_unstable_by_key(|a| a.group_id);
                (node, std::sync::Arc::new(list))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Progress as if every learner had caught up and raft had applied meta's configuration.
    fn everyone_caught_up(c: &Catalog) -> HashMap<u64, GroupProgress> {
        let mut progress = HashMap::new();
        for t in c.tables.values() {
            for (i, p) in t.partitions.iter().enumerate() {
                let mut g = GroupProgress { leader_commit: 10, ..Default::default() };
                for (peer, _) in p.peers.iter().chain(p.learners.iter()) {
                    g.applied.insert(*peer, 10);
                }
                g.leader_members = Some(p.peers.iter().chain(p.learners.iter()).map(|(x, _)| *x).collect());
                progress.insert(GroupId::new(t.id, i as u32).0, g);
            }
        }
        progress
    }

    fn catalog_with_nodes(n: usize) -> (Catalog, Vec<NodeId>) {
        let mut c = Catalog::default();
        let ids = (0..n).map(|i| c.register(&format!("127.0.0.1:{}", 1000 + i), "").unwrap()).collect();
        (c, ids)
    }

    /// A node over its share whose voters all hold their share is still relieved: a node within
    /// its share passes one to a node below it first (found in review: moving only off nodes
    /// over their share left A and B at 3 for good here).
    #[test]
    fn leader_preferences_even_out_through_nodes_within_their_share() {
        let (mut c, n) = catalog_with_nodes(5);
        c.create_table("t", 8, 3, &n[..3]).unwrap();
        let t = c.tables.get_mut("t").unwrap();
        for (i, p) in t.partitions.iter_mut().enumerate() {
            let (voters, preferred) = match i {
                0..3 => ([n[0], n[1], n[2]], n[0]),
                3..6 => ([n[0], n[1], n[2]], n[1]),
                _ => ([n[2], n[3], n[4]], n[2]),
            };
            p.peers = voters.iter().enumerate().map(|(k, node)| (100 * i as u64 + k as u64, *node)).collect();
            p.preferred_leader = preferred;
        }
        for _ in 0..10 {
            balance_preferred_leaders(t, &n, &HashMap::new(), false);
        }
        let mut counts: Vec<usize> = n.iter().map(|node| t.partitions.iter().filter(|p| p.preferred_leader == *node).count()).collect();
        counts.sort_unstable();
        assert_eq!(counts, vec![1, 1, 2, 2, 2]);
    }

    /// Routing changes between catalogs: a new table whole, a replica move in the partition it
    /// moved, a leader preference in none (clients learn leaders from servers). (A split's
    /// children: `split::tests`.)
    #[test]
    fn routing_changes_name_what_clients_route_by() {
        let (mut c, nodes) = catalog_with_nodes(4);
        let before = c.clone();
        let id = c.create_table("t", 2, 3, &nodes[..3]).unwrap().id;
        assert_eq!(routing_changes(&before, &c), BTreeMap::from([(id, RoutingChange::Whole)]));
        let before = c.clone();
        c.tables.get_mut("t").unwrap().partitions[0].preferred_leader = nodes[2];
        assert!(routing_changes(&before, &c).is_empty(), "a leader preference is not routing");
        c.tables.get_mut("t").unwrap().partitions[1].peers[0].1 = nodes[3];
        assert_eq!(routing_changes(&before, &c), BTreeMap::from([(id, RoutingChange::Partitions(BTreeSet::from([1])))]));
        let again = c.clone();
        c.tables.get_mut("t").unwrap().id += 100;
        assert_eq!(routing_changes(&again, &c).get(&(id + 100)), Some(&RoutingChange::Whole), "dropped and created again");
    }

    /// A duplication is checked before it is recorded: remote addresses, table name, tag (never
    /// this cluster's), change-log bound, the per-table limit and duplicates; pause, resume and
    /// remove find it by id, and an unknown id is an error.
    #[test]
    fn duplications_are_checked_and_changed_by_id() {
        let (mut c, nodes) = catalog_with_nodes(3);
        c.cluster_id = 77;
        c.create_table("t", 4, 3, &nodes).unwrap();
        let dup = |id: u64, tag: u32| Duplication {
            id,
            remote_meta: vec!["10.0.0.1:7000".into()],
            remote_table: "t".into(),
            remote_tag: tag,
            paused: false,
            log_entries_max: DUP_LOG_ENTRIES_DEFAULT,
        };
        let refused = |c: &mut Catalog, d: Duplication| c.add_duplication("t", d).unwrap_err().to_string();
        assert!(refused(&mut c, Duplication { remote_meta: vec![], ..dup(1, 5) }).contains("meta addresses"));
        assert!(refused(&mut c, Duplication { remote_meta: vec![" ".into()], ..dup(1, 5) }).contains("meta addresses"));
        assert!(refused(&mut c, Duplication { remote_table: "".into(), ..dup(1, 5) }).contains("table name"));
        assert!(refused(&mut c, dup(1, 0)).contains("out of range"));
        assert!(refused(&mut c, dup(1, 4096)).contains("out of range"));
        assert!(refused(&mut c, dup(1, tern_core::codec::cluster_tag(77))).contains("this cluster's tag"));
        assert!(refused(&mut c, Duplication { log_entries_max: 10, ..dup(1, 5) }).contains("1000 to 100000000"));
        assert!(matches!(c.add_duplication("nope", dup(1, 5)), Err(TernError::TableNotFound(_))));
        c.add_duplication("t", dup(1, 5)).unwrap();
        assert!(refused(&mut c, dup(2, 5)).contains("already duplicated"));
        for i in 2..=DUPLICATIONS_PER_TABLE_MAX as u64 {
            c.add_duplication("t", Duplication { remote_table: format!("t{i}"), ..dup(i, 5) }).unwrap();
        }
        assert!(refused(&mut c, Duplication { remote_table: "more".into(), ..dup(99, 5) }).contains("the limit"));
        use tern_proto::DuplicationAction as A;
        c.change_duplication(1, A::DupPause).unwrap();
        assert!(c.tables["t"].duplications[0].paused);
        c.change_duplication(1, A::DupResume).unwrap();
        assert!(!c.tables["t"].duplications[0].paused);
        c.change_duplication(1, A::DupRemove).unwrap();
        assert!(c.tables["t"].duplications.iter().all(|d| d.id != 1));
        assert!(c.change_duplication(1, A::DupPause).unwrap_err().to_string().contains("no duplication 1"));
        assert_eq!(c.heartbeat_answer(nodes[0]).duplications.len(), DUPLICATIONS_PER_TABLE_MAX - 1, "servers learn them by heartbeat");
    }

    /// Replicas of a partition land on distinct nodes, spread evenly, with preferred leaders even.
    #[test]
    fn placement_is_even_and_distinct() {
        let (mut c, nodes) = catalog_with_nodes(4);
        let t = c.create_table("t", 16, 3, &nodes).unwrap().clone();
        let mut replicas: HashMap<NodeId, usize> = HashMap::new();
        let mut leaders: HashMap<NodeId, usize> = HashMap::new();
        for p in &t.partitions {
            let mut ns: Vec<NodeId> = p.peers.iter().map(|(_, n)| *n).collect();
            ns.sort();
            ns.dedup();
            assert_eq!(ns.len(), 3, "distinct nodes");
            assert!(ns.contains(&p.preferred_leader));
            for n in ns {
                *replicas.entry(n).or_default() += 1;
            }
            *leaders.entry(p.preferred_leader).or_default() += 1;
        }
        assert_eq!(replicas.values().copied().collect::<std::collections::BTreeSet<_>>(), [12].into(), "{replicas:?}");
        assert!(leaders.values().all(|&l| l == 4), "{leaders:?}");
        // Peer ids are unique across the table.
        let mut peers: Vec<PeerId> = t.partitions.iter().flat_map(|p| p.peers.iter().map(|(p, _)| *p)).collect();
        peers.sort();
        peers.dedup();
        assert_eq!(peers.len(), 48);
    }

    /// Bad table parameters and too few nodes are refused with typed errors; names are unique.
    #[test]
    fn create_table_checks() {
        let (mut c, nodes) = catalog_with_nodes(3);
        assert!(matches!(c.create_table("t", 3, 3, &nodes), Err(TernError::InvalidArgument(_))));
        assert!(matches!(c.create_table("t", 4, 6, &nodes), Err(TernError::InvalidArgument(_))));
        assert!(matches!(c.create_table("t", 4, 3, &nodes[..2]), Err(TernError::NotEnoughNodes(_))));
        assert!(matches!(c.create_table("bad name", 4, 3, &nodes), Err(TernError::InvalidArgument(_))));
        c.create_table("t", 4, 3, &nodes).unwrap();
        assert!(matches!(c.create_table("t", 4, 3, &nodes), Err(TernError::TableExists(_))));
    }

    /// Dropping a table removes it, records its id for servers, and never reuses the id.
    #[test]
    fn drop_and_recreate() {
        let (mut c, nodes) = catalog_with_nodes(3);
        let first = c.create_table("t", 2, 3, &nodes).unwrap().id;
        c.drop_table("t").unwrap();
        assert_eq!(c.dropped_tables, vec![first]);
        assert!(c.assignments(nodes[0]).is_empty());
        let second = c.create_table("t", 2, 3, &nodes).unwrap().id;
        assert_ne!(first, second);
        assert!(matches!(c.drop_table("nope"), Err(TernError::TableNotFound(_))));
    }

    /// A replica that stopped after a storage failure is replaced from a healthy peer although its
    /// node is alive (the node's other replicas stay where they are).
    #[test]
    fn repairs_failed_replicas() {
        let (mut c, nodes) = catalog_with_nodes(4);
        c.create_table("t", 2, 3, &nodes[..3]).unwrap();
        let table = c.tables["t"].clone();
        let group = GroupId::new(table.id, 0).0;
        let failed_peer = table.partitions[0].peers[0];
        let statuses =
            vec![tern_proto::ReplicaStatus { group_id: group, peer_id: failed_peer.0, failure: "checksum mismatch".into(), ..Default::default() }];
        let progress = group_progress(&statuses);
        let changes = c.schedule(&nodes, &progress, 8);
        assert_eq!(changes.len(), 1, "{changes:?}");
        let p = &c.tables["t"].partitions[0];
        assert_eq!(p.replacing, Some(failed_peer.0));
        assert_eq!(p.learners.len(), 1);
        assert!(c.tables["t"].partitions[1].learners.is_empty(), "the healthy partition is left alone");
    }

    /// On three nodes a failed replica has nowhere else to go: it is replaced on its own node (a
    /// new peer), but only while the other voters are seen healthy, and that replacement is not
    /// cancelled when the node goes down (its old peer is gone already).
    #[test]
    fn replaces_a_failed_replica_on_its_own_node() {
        let (mut c, nodes) = catalog_with_nodes(3);
        c.create_table("t", 1, 3, &nodes).unwrap();
        let p = c.tables["t"].partitions[0].clone();
        let group = GroupId::new(c.tables["t"].id, 0).0;
        let (victim, victim_node) = p.peers[0];
        let status =
            |peer: u64, failure: &str| tern_proto::ReplicaStatus { group_id: group, peer_id: peer, failure: failure.into(), ..Default::default() };
        let leader = |voters: Vec<u64>| tern_proto::ReplicaStatus { is_leader: true, term: 2, voters, ..status(p.peers[1].0, "") };
        let all: Vec<u64> = p.peers.iter().map(|(x, _)| *x).collect();
        // Another voter not seen yet (its node just came back): nothing is destroyed.
        let statuses = vec![status(victim, "checksum mismatch"), leader(all.clone())];
        assert!(c.clone().schedule(&nodes, &group_progress(&statuses), 8).is_empty());
        // Raft's voters are not (yet) the catalog's: nothing is destroyed either.
        let statuses = vec![status(victim, "checksum mismatch"), leader(all[..2].to_vec()), status(p.peers[2].0, "")];
        assert!(c.clone().schedule(&nodes, &group_progress(&statuses), 8).is_empty());
        // Both others seen running, raft agreeing with the catalog: a new peer on the same node.
        let statuses = vec![status(victim, "checksum mismatch"), leader(all.clone()), status(p.peers[2].0, "")];
        let changes = c.schedule(&nodes, &group_progress(&statuses), 8);
        assert_eq!(changes.len(), 1, "{changes:?}");
        let q = &c.tables["t"].partitions[0];
        assert_eq!(q.replacing, Some(victim));
        let (learner, learner_node) = q.learners[0];
        assert_eq!(learner_node, victim_node);
        // The node gets only the new peer, never both.
        let mine: Vec<u64> = c.assignments(victim_node).iter().map(|a| a.peer_id).collect();
        assert_eq!(mine, vec![learner]);
        // The node goes down: the replacement waits for it instead of being cancelled.
        let others: Vec<NodeId> = nodes.iter().copied().filter(|n| *n != victim_node).collect();
        c.schedule(&others, &group_progress(&statuses[1..]), 8);
        assert_eq!(c.tables["t"].partitions[0].learners, vec![(learner, learner_node)]);
    }

    /// A partition that lost a node gets a learner on a spare live node, which replaces the lost
    /// voter once it has caught up; placement stays on distinct nodes and peer ids stay unique.
    #[test]
    fn repairs_lost_replicas() {
        let (mut c, nodes) = catalog_with_nodes(4);
        c.create_table("t", 4, 3, &nodes[..3]).unwrap();
        let alive = vec![nodes[0], nodes[1], nodes[3]]; // nodes[2] died
        let changes = c.schedule(&alive, &HashMap::new(), 8);
        assert_eq!(changes.iter().filter(|c| c.contains("moving")).count(), 4, "{changes:?}");
        for p in &c.tables["t"].partitions {
            assert_eq!(p.learners.len(), 1);
            assert_eq!(p.learners[0].1, nodes[3], "the only spare node");
        }
        // Not caught up yet: nothing changes.
        assert!(c.schedule(&alive, &HashMap::new(), 8).is_empty());

        // The learner's own report (another heartbeat, another instant) says 200 of 500; the
        // leader's view at the instant of its commit decides.
        let progress_with = |c: &Catalog, leader_matched: u64| {
            let mut progress = HashMap::new();
            for (i, p) in c.tables["t"].partitions.iter().enumerate() {
                let group = GroupId::new(c.tables["t"].id, i as u32).0;
                let mut g = GroupProgress { leader_commit: 500, ..Default::default() };
                g.applied.insert(p.learners[0].0, 200);
                g.leader_matched.insert(p.learners[0].0, leader_matched);
                progress.insert(group, g);
            }
            progress
        };
        let progress = progress_with(&c, 300);
        assert!(c.schedule(&alive, &progress, 8).iter().all(|c| !c.contains("replaced")), "300 of 500 is not caught up");
        let progress = progress_with(&c, 450);
        assert_eq!(c.schedule(&alive, &progress, 8).iter().filter(|c| c.contains("replaced")).count(), 4);
        for p in &c.tables["t"].partitions {
            assert!(p.learners.is_empty());
            let ns: Vec<NodeId> = p.peers.iter().map(|(_, n)| *n).collect();
            assert_eq!(ns.len(), 3);
            assert!(!ns.contains(&nodes[2]) && ns.contains(&nodes[3]), "{ns:?}");
        }
        let a = c.assignments(nodes[3]);
        assert_eq!(a.len(), 4);
        assert!(a.iter().all(|a| !a.initial), "a replacement replica starts empty");
    }

    /// The cap on concurrent fills per node holds, and nothing is scheduled without a spare node.
    #[test]
    fn repairs_respect_limits() {
        let (mut c, nodes) = catalog_with_nodes(4);
        c.create_table("t", 8, 3, &nodes[..3]).unwrap();
        let alive = vec![nodes[0], nodes[1], nodes[3]];
        assert_eq!(c.schedule(&alive, &HashMap::new(), 2).iter().filter(|c| c.contains("moving")).count(), 2);
        let (mut c, nodes) = catalog_with_nodes(3);
        c.create_table("t", 2, 3, &nodes).unwrap();
        let changes = c.schedule(&nodes[..2], &HashMap::new(), 2);
        assert!(changes.iter().all(|c| c.contains("preferred leader")), "no spare node for replicas: {changes:?}");
        assert!(c.tables["t"].partitions.iter().all(|p| p.learners.is_empty()));
    }

    /// A draining node's replicas move to other nodes one fill at a time; a new empty node receives
    /// replicas by balancing; preferred leaders stay on usable voters and even out.
    #[test]
    fn drain_and_balance() {
        let (mut c, nodes) = catalog_with_nodes(4);
        c.create_table("t", 8, 3, &nodes[..3]).unwrap();
        let done = |c: &mut Catalog, alive: &[NodeId]| {
            // Pretend every learner catches up at once, and run passes until nothing changes.
            for _ in 0..100 {
                let progress = everyone_caught_up(c);
                if c.schedule(alive, &progress, 2).is_empty() {
                    return;
                }
            }
            panic!("scheduler never settled");
        };
        // The fourth node joins: balancing moves replicas onto it until counts differ by at most one.
        done(&mut c, &nodes);
        let count = |c: &Catalog, n: NodeId| c.tables["t"].partitions.iter().filter(|p| p.peers.iter().any(|(_, x)| *x == n)).count();
        let counts: Vec<usize> = nodes.iter().map(|n| count(&c, *n)).collect();
        assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1, "{counts:?}");
        assert_eq!(counts.iter().sum::<usize>(), 24);
        let leaders: Vec<usize> = nodes.iter().map(|n| c.tables["t"].partitions.iter().filter(|p| p.preferred_leader == *n).count()).collect();
        assert!(leaders.iter().max().unwrap() - leaders.iter().min().unwrap() <= 1, "{leaders:?}");
        // Decommission node 1: it ends with no replicas and no leaders.
        c.draining.insert(nodes[0]);
        done(&mut c, &nodes);
        assert_eq!(count(&c, nodes[0]), 0);
        assert!(c.tables["t"].partitions.iter().all(|p| p.preferred_leader != nodes[0]));
        for p in &c.tables["t"].partitions {
            let mut ns: Vec<NodeId> = p.peers.iter().map(|(_, n)| *n).collect();
            ns.sort();
            ns.dedup();
            assert_eq!(ns.len(), 3, "distinct nodes");
        }
    }

    /// With zones, the replicas of a partition land in distinct zones even when that is not the
    /// least-loaded choice, and a repair keeps them distinct.
    #[test]
    fn zones_are_respected() {
        let mut c = Catalog::default();
        let a1 = c.register("a1", "a").unwrap();
        let a2 = c.register("a2", "a").unwrap();
        let b1 = c.register("b1", "b").unwrap();
        let c1 = c.register("c1", "c").unwrap();
        let c2 = c.register("c2", "c").unwrap();
        let all = vec![a1, a2, b1, c1, c2];
        c.create_table("t", 8, 3, &all).unwrap();
        let zones = |c: &Catalog, p: &PartitionRecord| {
            let mut z: Vec<String> = p.peers.iter().map(|(_, n)| c.nodes[n].zone.clone()).collect();
            z.sort();
            z
        };
        for p in &c.tables["t"].partitions {
            assert_eq!(zones(&c, p), vec!["a", "b", "c"]);
        }
        // a1 dies: its partitions are repaired onto a2 (zone a), not onto a second node in b or c.
        c.balancer_paused = true;
        let alive = vec![a2, b1, c1, c2];
        c.schedule(&alive, &HashMap::new(), 8);
        let repaired: Vec<&PartitionRecord> = c.tables["t"].partitions.iter().filter(|p| !p.learners.is_empty()).collect();
        assert!(!repaired.is_empty());
        for p in repaired {
            assert_eq!(p.learners[0].1, a2);
        }
    }

    /// A node with a higher leader priority becomes the preferred leader of every partition it holds a
    /// voter of, and takes it back after it was down.
    #[test]
    fn leader_priority() {
        let (mut c, nodes) = catalog_with_nodes(3);
        c.create_table("t", 4, 3, &nodes).unwrap();
        c.nodes.get_mut(&nodes[2]).unwrap().leader_priority = 10;
        c.schedule(&nodes, &HashMap::new(), 2);
        assert!(c.tables["t"].partitions.iter().all(|p| p.preferred_leader == nodes[2]));
        c.schedule(&nodes[..2], &HashMap::new(), 2);
        assert!(c.tables["t"].partitions.iter().all(|p| p.preferred_leader != nodes[2]), "a down node leads nothing");
        c.schedule(&nodes, &HashMap::new(), 2);
        assert!(c.tables["t"].partitions.iter().all(|p| p.preferred_leader == nodes[2]), "leadership goes back");
    }

    /// Raising a table's replica count adds voters (learner first); lowering it removes voters.
    #[test]
    fn replica_count_changes() {
        let (mut c, nodes) = catalog_with_nodes(4);
        c.create_table("t", 2, 2, &nodes).unwrap();
        c.set_replica_count("t", 3, &nodes).unwrap();
        assert!(c.set_replica_count("t", 5, &nodes).is_err(), "only 4 servers");
        c.balancer_paused = true;
        for _ in 0..3 {
            let progress = everyone_caught_up(&c);
            c.schedule(&nodes, &progress, 8);
        }
        assert!(c.tables["t"].partitions.iter().all(|p| p.peers.len() == 3 && p.learners.is_empty()));
        c.set_replica_count("t", 1, &nodes).unwrap();
        for _ in 0..3 {
            let progress = everyone_caught_up(&c);
            c.schedule(&nodes, &progress, 8);
        }
        assert!(c.tables["t"].partitions.iter().all(|p| p.peers.len() == 1));
    }

    /// Operator requests naming unknown nodes, tables or partitions, or impossible moves, are refused
    /// with typed errors and change nothing.
    #[test]
    fn operations_reject_bad_input() {
        let (mut c, nodes) = catalog_with_nodes(4);
        c.create_table("t", 2, 3, &nodes[..3]).unwrap();
        let before = c.clone();
        assert!(matches!(c.decommission(99, &nodes), Err(TernError::InvalidArgument(_))));
        assert!(matches!(c.recommission(nodes[0]), Err(TernError::InvalidArgument(_))));
        assert!(matches!(c.transfer_leader("nope", 0, nodes[0]), Err(TernError::TableNotFound(_))));
        assert!(matches!(c.transfer_leader("t", 7, nodes[0]), Err(TernError::InvalidArgument(_))));
        assert!(matches!(c.transfer_leader("t", 0, nodes[3]), Err(TernError::InvalidArgument(_))), "node 4 holds no voter");
        assert!(matches!(c.move_replica("t", 0, nodes[3], nodes[0], &nodes), Err(TernError::InvalidArgument(_))));
        assert!(matches!(c.move_replica("t", 0, nodes[0], nodes[1], &nodes), Err(TernError::InvalidArgument(_))), "target already hosts it");
        assert!(matches!(c.move_replica("t", 0, nodes[0], nodes[3], &nodes[..3]), Err(TernError::InvalidArgument(_))), "target down");
        assert!(matches!(c.set_replica_count("t", 0, &nodes), Err(TernError::InvalidArgument(_))));
        assert_eq!(c, before);
        c.move_replica("t", 0, nodes[0], nodes[3], &nodes).unwrap();
        assert!(matches!(c.move_replica("t", 0, nodes[1], nodes[3], &nodes), Err(TernError::Busy(_))), "one move at a time");
    }

    /// Each node is assigned exactly the replicas placed on it.
    #[test]
    fn assignments_match_placement() {
        let (mut c, nodes) = catalog_with_nodes(3);
        c.create_table("t", 8, 3, &nodes).unwrap();
        for n in &nodes {
            let a = c.assignments(*n);
            assert_eq!(a.len(), 8);
            assert!(a.iter().all(|a| a.peers.iter().any(|(p, node)| *p == a.peer_id && node == n)));
        }
        let preferred: usize = nodes.iter().map(|n| c.assignments(*n).iter().filter(|a| a.preferred_leader).count()).sum();
        assert_eq!(preferred, 8);
    }
}
