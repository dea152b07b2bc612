//! The client's decisions, without I/O: which replica to send a partition's request to, how to react
//! to each answer, and whether to retry. The async client and the simulator's clients both use these,
//! so the simulator exercises the real retry logic.

use crate::retry::RetryPolicy;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tern_core::time::RandomSource;
use tern_core::{NodeId, TernError};

/// One client identity's exactly-once bookkeeping: the sequence numbers it hands out and those of
/// its writes still in flight. Every write carries (client id, sequence) and a floor below which
/// every sequence has been answered (the server then forgets those results); the floor must never
/// pass a write still in flight, or that write would be refused as a late duplicate.
#[derive(Clone, Debug)]
pub struct Sequencer {
    next: u64,
    in_flight: std::collections::BTreeSet<u64>,
}

impl Sequencer {
    /// Starts handing out sequence numbers at `first`.
    pub fn new(first: u64) -> Sequencer {
        Sequencer { next: first, in_flight: Default::default() }
    }

    /// Takes the next sequence number and registers it as in flight, in one step (a floor read in
    /// between would otherwise pass it).
    pub fn begin(&mut self) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.in_flight.insert(seq);
        seq
    }

    /// The floor a write of `seq` (in flight) sends: the lowest sequence number still in flight.
    pub fn floor(&self, seq: u64) -> u64 {
        self.in_flight.first().copied().unwrap_or(seq).min(seq)
    }

    /// The write of `seq` is answered (or abandoned: its outcome is unknown, but it will not be sent
    /// again).
    pub fn finish(&mut self, seq: u64) {
        self.in_flight.remove(&seq);
    }
}

/// The leader the client believes in for each partition of one table, and each partition's replicas.
pub struct LeaderTable {
    replicas: Vec<Vec<NodeId>>,
    leaders: Vec<AtomicU64>,
}

/// A table as the client holds it (`before`) brought up to date by meta's answer `fresh` that
/// lists only the partitions whose routing changed (`partitions_delta`): the whole table and the
/// indexes that changed. None when the answer does not fit what the client holds (another table
/// of the same name, a partition missing): ask for the whole table then.
pub fn merge_table(before: &tern_proto::TableInfo, fresh: &tern_proto::TableInfo) -> Option<(tern_proto::TableInfo, Vec<u32>)> {
    if before.table_id != fresh.table_id || !fresh.partitions_delta {
        return None;
    }
    let mut partitions = before.partitions.clone();
    for p in &fresh.partitions {
        match (p.index as usize).cmp(&partitions.len()) {
            std::cmp::Ordering::Less => partitions[p.index as usize] = p.clone(),
            std::cmp::Ordering::Equal => partitions.push(p.clone()),
            std::cmp::Ordering::Greater => return None,
        }
    }
    if partitions.len() != fresh.partitions_total as usize {
        return None;
    }
    let mut changed: Vec<u32> = fresh.partitions.iter().map(|p| p.index).collect();
    changed.sort_unstable();
    Some((tern_proto::TableInfo { partitions, partitions_delta: false, ..fresh.clone() }, changed))
}

/// A table's routing and leaders after meta answered a refresh with `fresh`, for a caller that
/// held `held` (the table and its leaders) when it asked: `fresh` itself when whole, else merged
/// into what was held (`merge_table`). None when a delta does not fit what was held: ask for the
/// whole table. The client and the simulator's clients both decide with this.
pub fn refreshed(held: Option<(&tern_proto::TableInfo, &LeaderTable)>, fresh: tern_proto::TableInfo) -> Option<(tern_proto::TableInfo, LeaderTable)> {
    if !fresh.partitions_delta {
        let leaders = LeaderTable::from_table(&fresh);
        return Some((fresh, leaders));
    }
    let (table, leaders) = held?;
    let (merged, changed) = merge_table(table, &fresh)?;
    let leaders = LeaderTable::keeping(&merged, leaders, &changed);
    Some((merged, leaders))
}

/// What the caller must do besides retrying, after an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reaction {
    None,
    /// The routing table is stale: fetch it again from meta.
    RefreshRoute,
    /// A server could not be reached: re-read node addresses from meta.
    RefreshNodes,
}

/// What to do after an attempt failed.
#[derive(Clone, Debug, PartialEq)]
pub enum NextStep {
    /// Try again after this pause (zero: at once).
    Retry(Duration),
    /// Stop and report this error.
    GiveUp(TernError),
}

impl LeaderTable {
    /// `partitions[i]` is (replica nodes, believed leader) of partition i.
    pub fn new(partitions: Vec<(Vec<NodeId>, NodeId)>) -> LeaderTable {
        let leaders = partitions.iter().map(|(_, l)| AtomicU64::new(*l)).collect();
        LeaderTable { replicas: partitions.into_iter().map(|(r, _)| r).collect(), leaders }
    }

    /// The replicas and leader hints of a table as meta describes it.
    pub fn from_table(table: &tern_proto::TableInfo) -> LeaderTable {
        LeaderTable::new(table.partitions.iter().map(|p| (p.peers.iter().map(|x| x.node_id).collect(), p.leader_node)).collect())
    }

    /// The same for `table` as a split learned from a server changed it (the child of a split
    /// parent serving): the leaders learned so far are kept, and `child` is led by `leader`.
    pub fn learned(table: &tern_proto::TableInfo, before: &LeaderTable, child: u32, leader: NodeId) -> LeaderTable {
        let leader_of = |i: usize| if i == child as usize || i >= before.leaders.len() { leader } else { before.leader(i as u32) };
        LeaderTable::new(table.partitions.iter().enumerate().map(|(i, p)| (p.peers.iter().map(|x| x.node_id).collect(), leader_of(i))).collect())
    }

    /// The same for `table` after a routing refresh that listed only the partitions `changed`
    /// (`merge_table`, ascending): those take meta's leader hints, the others keep the leaders
    /// learned so far.
    pub fn keeping(table: &tern_proto::TableInfo, before: &LeaderTable, changed: &[u32]) -> LeaderTable {
        let leader_of = |i: usize, p: &tern_proto::PartitionInfo| {
            if i >= before.leaders.len() || changed.binary_search(&(i as u32)).is_ok() {
                p.leader_node
            } else {
                before.leader(i as u32)
            }
        };
        LeaderTable::new(table.partitions.iter().enumerate().map(|(i, p)| (p.peers.iter().map(|x| x.node_id).collect(), leader_of(i, p))).collect())
    }

    pub fn partition_count(&self) -> usize {
        self.replicas.len()
    }

    pub fn leader(&self, partition: u32) -> NodeId {
        self.leaders[partition as usize].load(Ordering::Relaxed)
    }

    /// Moves the guess to the partition's next replica (after a failure without a hint).
    fn rotate(&self, partition: u32) {
        let replicas = &self.replicas[partition as usize];
        if replicas.is_empty() {
            return;
        }
        let current = self.leader(partition);
        let pos = replicas.iter().position(|n| *n == current).map(|i| i + 1).unwrap_or(0);
        self.leaders[partition as usize].store(replicas[pos % replicas.len()], Ordering::Relaxed);
    }

    /// Learns from an error answered by (or about) `node` for `partition`.
    pub fn observe(&self, partition: u32, node: NodeId, error: &TernError) -> Reaction {
        match error {
            TernError::NotLeader { leader: Some(l) } if *l != node => {
                self.leaders[partition as usize].store(*l, Ordering::Relaxed);
                Reaction::None
            }
            // A replica that does not have the partition (or not as addressed) is not its leader:
            // try the next one too, as a refresh that lists only changed partitions keeps the
            // guesses of the others.
            TernError::StaleConfig(_) | TernError::PartitionNotFound(_) => {
                self.rotate(partition);
                Reaction::RefreshRoute
            }
            TernError::TableNotFound(_) | TernError::PartitionSplit { .. } => Reaction::RefreshRoute,
            TernError::Unavailable(_) => {
                self.rotate(partition);
                Reaction::RefreshNodes
            }
            e if e.is_retryable() => {
                self.rotate(partition);
                Reaction::None
            }
            _ => Reaction::None,
        }
    }
}

/// Where a hashkey of a table is served: (partition, the partition count to address it with).
/// While a split switches, a child's hashkeys go to its parent, with the old count, until the
/// parent has split (then to the child, with the new count).
pub fn locate(table: &tern_proto::TableInfo, hashkey: &[u8]) -> (u32, u32) {
    let n = table.partition_count;
    match switching_count(table) {
        Some(m) => {
            let p = tern_core::codec::partition_of(hashkey, m);
            let parent = p % n;
            if table.partitions[(parent + n) as usize].split_pending {
                (parent, n)
            } else {
                (p, m)
            }
        }
        None => (tern_core::codec::partition_of(hashkey, n), n),
    }
}

/// What a client learns when partition `parent` answers (from `node`) that it has split to
/// `partition_count` partitions, before meta says so: the table with the parent's child serving
/// (on the parent's nodes, the answering node first: its replica of the parent led, and its child
/// campaigned at once). None if the table does not list that split (ask meta instead).
pub fn learn_split(table: &tern_proto::TableInfo, parent: u32, partition_count: u32, node: NodeId) -> Option<(tern_proto::TableInfo, u32)> {
    let m = switching_count(table).filter(|m| *m == partition_count)?;
    let child = (parent < m / 2).then_some(parent + m / 2)?;
    if !table.partitions[child as usize].split_pending {
        return None;
    }
    let mut learned = table.clone();
    let c = &mut learned.partitions[child as usize];
    c.split_pending = false;
    c.leader_node = node;
    Some((learned, child))
}

/// The partition count to address partition `p` with (None: no such partition, or a split's
/// child that does not exist yet).
pub fn partition_count_of(table: &tern_proto::TableInfo, p: u32) -> Option<u32> {
    let n = table.partition_count;
    match switching_count(table) {
        Some(m) if p < n => Some(if table.partitions[(p + n) as usize].split_pending { n } else { m }),
        Some(m) if p < m => (!table.partitions[p as usize].split_pending).then_some(m),
        None if p < n => Some(n),
        _ => None,
    }
}

/// The count a switching split goes to, when the table lists its children.
fn switching_count(table: &tern_proto::TableInfo) -> Option<u32> {
    let split = table.split.as_ref().filter(|s| s.switching)?;
    let m = split.partition_count;
    (table.partition_count > 0 && m == table.partition_count * 2 && table.partitions.len() == m as usize).then_some(m)
}

/// Decides whether attempt number `attempt` (0-based), which failed with `error`, is retried, given
/// the time left before the caller's deadline.
pub fn next_step(error: TernError, attempt: u32, remaining: Duration, policy: &RetryPolicy, rng: &mut dyn RandomSource) -> NextStep {
    let retryable = error.is_retryable() || (matches!(error, TernError::TableNotFound(_)) && attempt == 0);
    if !retryable {
        return NextStep::GiveUp(error);
    }
    if remaining.is_zero() {
        return NextStep::GiveUp(match error {
            TernError::Timeout(m) => TernError::Timeout(m),
            other => TernError::Timeout(format!("gave up after {} attempts; last error: {other}", attempt + 1)),
        });
    }
    // Following a fresh leader hint (or a split's new routing) needs no pause, the first few times.
    if matches!(error, TernError::NotLeader { leader: Some(_) } | TernError::PartitionSplit { .. }) && attempt <= 3 {
        return NextStep::Retry(Duration::ZERO);
    }
    let pause = match error {
        TernError::NotLeader { .. } | TernError::Unavailable(_) => policy.delay_up_to(attempt, policy.leader_wait_max, rng),
        _ => policy.delay(attempt, rng),
    };
    NextStep::Retry(pause.min(remaining))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Floors never pass a write still in flight, whatever order writes finish in.
    #[test]
    fn sequencer_floors_stay_below_writes_in_flight() {
        let mut s = Sequencer::new(10);
        let (a, b, c) = (s.begin(), s.begin(), s.begin());
        assert_eq!((a, b, c), (10, 11, 12));
        assert_eq!(s.floor(c), 10);
        s.finish(b);
        assert_eq!(s.floor(c), 10, "a is still in flight");
        s.finish(a);
        assert_eq!(s.floor(c), 12);
        let d = s.begin();
        assert_eq!(s.floor(d), 12);
        s.finish(c);
        assert_eq!(s.floor(d), 13);
    }
    use tern_core::time::SeededRandom;

    fn table() -> LeaderTable {
        LeaderTable::new(vec![(vec![1, 2, 3], 1), (vec![2, 3, 4], 3)])
    }

    fn partition(index: u32, nodes: &[NodeId], leader: NodeId) -> tern_proto::PartitionInfo {
        let peers = nodes.iter().map(|n| tern_proto::PeerInfo { peer_id: 10 * n, node_id: *n }).collect();
        tern_proto::PartitionInfo { index, peers, leader_node: leader, split_pending: false }
    }

    /// A refresh that lists only the partitions whose routing changed replaces those, keeps the
    /// rest with the leaders learned meanwhile, and takes new partitions at the end; an answer
    /// that does not fit (another table of the same name, a partition missing) is refused, so the
    /// client asks for the whole table.
    #[test]
    fn routing_deltas_merge_into_the_table_held() {
        let held = tern_proto::TableInfo {
            table_id: 7,
            partition_count: 2,
            partitions: vec![partition(0, &[1, 2, 3], 1), partition(1, &[1, 2, 3], 2)],
            routing_version: 5,
            partitions_total: 2,
            ..Default::default()
        };
        let leaders = LeaderTable::from_table(&held);
        leaders.observe(0, 1, &TernError::NotLeader { leader: Some(3) });
        let fresh = tern_proto::TableInfo {
            partitions: vec![partition(1, &[1, 2, 4], 4), partition(2, &[1, 2, 3], 2)],
            routing_version: 9,
            partitions_delta: true,
            partitions_total: 3,
            ..held.clone()
        };
        let (merged, changed) = merge_table(&held, &fresh).expect("fits");
        assert_eq!(changed, vec![1, 2]);
        assert_eq!(merged.partitions, vec![partition(0, &[1, 2, 3], 1), partition(1, &[1, 2, 4], 4), partition(2, &[1, 2, 3], 2)]);
        assert!(!merged.partitions_delta && merged.routing_version == 9);
        let now = LeaderTable::keeping(&merged, &leaders, &changed);
        assert_eq!((now.leader(0), now.leader(1), now.leader(2)), (3, 4, 2), "partition 0 keeps the leader learned");

        assert!(merge_table(&held, &tern_proto::TableInfo { table_id: 8, ..fresh.clone() }).is_none(), "another table");
        let gap = tern_proto::TableInfo { partitions: vec![partition(3, &[1, 2, 3], 1)], partitions_total: 4, ..fresh.clone() };
        assert!(merge_table(&held, &gap).is_none(), "partition 2 missing");
        assert!(merge_table(&held, &tern_proto::TableInfo { partitions_total: 5, ..fresh.clone() }).is_none());
        assert!(merge_table(&held, &tern_proto::TableInfo { partitions_delta: false, ..fresh }).is_none(), "not a delta");
    }

    /// Leader hints are followed; failures without a hint rotate through the replicas.
    #[test]
    fn leader_following() {
        let t = table();
        assert_eq!(t.observe(0, 1, &TernError::NotLeader { leader: Some(3) }), Reaction::None);
        assert_eq!(t.leader(0), 3);
        t.observe(0, 3, &TernError::Timeout("x".into()));
        assert_eq!(t.leader(0), 1, "wraps around");
        assert_eq!(t.observe(1, 3, &TernError::Unavailable("down".into())), Reaction::RefreshNodes);
        assert_eq!(t.leader(1), 4);
        assert_eq!(t.observe(1, 4, &TernError::StaleConfig("x".into())), Reaction::RefreshRoute);
        assert_eq!(t.leader(1), 2, "a replica without the partition as addressed is not its leader");
        assert_eq!(t.observe(1, 2, &TernError::PartitionNotFound("x".into())), Reaction::RefreshRoute);
        assert_eq!(t.leader(1), 3);
        assert_eq!(t.observe(1, 3, &TernError::invalid("bad")), Reaction::None);
        assert_eq!(t.leader(1), 3, "a request error says nothing about leadership");
    }

    /// While a split switches, a child's hashkeys go to the parent until it has split.
    #[test]
    fn locating_hashkeys_through_a_split() {
        use tern_proto::{PartitionInfo, SplitStatus, TableInfo};
        let partition = |index, split_pending| PartitionInfo { index, split_pending, ..Default::default() };
        let mut t = TableInfo { partition_count: 2, partitions: vec![partition(0, false), partition(1, false)], ..Default::default() };
        let keys: Vec<Vec<u8>> = (0..64u32).map(|i| i.to_be_bytes().to_vec()).collect();
        for k in &keys {
            assert_eq!(locate(&t, k), (tern_core::codec::partition_of(k, 2), 2));
        }
        t.split = Some(SplitStatus { partition_count: 4, switching: true, ..Default::default() });
        t.partitions.extend([partition(2, false), partition(3, true)]);
        let mut seen = std::collections::BTreeSet::new();
        for k in &keys {
            let (p, count) = locate(&t, k);
            let in4 = tern_core::codec::partition_of(k, 4);
            match in4 {
                0 | 2 => assert_eq!((p, count), (in4, 4), "partition 0 has split"),
                _ => assert_eq!((p, count), (1, 2), "partition 1 has not"),
            }
            seen.insert(in4);
        }
        assert_eq!(seen.len(), 4, "the keys cover every partition");
        assert_eq!([0, 1, 2, 3, 4].map(|p| partition_count_of(&t, p)), [Some(4), Some(2), Some(4), None, None]);
        // Partition 1 answers that it has split: its child serves from then on, led from there.
        assert!(learn_split(&t, 1, 8, 7).is_none(), "not the split the table lists");
        assert!(learn_split(&t, 0, 4, 7).is_none(), "partition 0 is known to have split");
        let (learned, child) = learn_split(&t, 1, 4, 7).unwrap();
        assert_eq!((child, learned.partitions[3].split_pending, learned.partitions[3].leader_node), (3, false, 7));
        for k in &keys {
            assert_eq!(locate(&learned, k), (tern_core::codec::partition_of(k, 4), 4));
        }
        // Preparing: the old routing, whatever the record says.
        t.split = Some(SplitStatus { partition_count: 4, switching: false, ..Default::default() });
        t.partitions.truncate(2);
        assert_eq!(locate(&t, &keys[0]), (tern_core::codec::partition_of(&keys[0], 2), 2));
    }

    /// Non-retryable errors end at once; retryable ones retry with backoff until the deadline.
    #[test]
    fn retry_decisions() {
        let p = RetryPolicy::default();
        let mut rng = SeededRandom::new(3);
        let left = Duration::from_secs(5);
        assert!(matches!(next_step(TernError::invalid("x"), 0, left, &p, &mut rng), NextStep::GiveUp(TernError::InvalidArgument(_))));
        assert_eq!(next_step(TernError::NotLeader { leader: Some(2) }, 0, left, &p, &mut rng), NextStep::Retry(Duration::ZERO));
        assert!(matches!(next_step(TernError::Busy("x".into()), 2, left, &p, &mut rng), NextStep::Retry(d) if d > Duration::ZERO));
        assert!(matches!(next_step(TernError::Busy("x".into()), 2, Duration::ZERO, &p, &mut rng), NextStep::GiveUp(TernError::Timeout(_))));
        assert!(matches!(next_step(TernError::TableNotFound("t".into()), 0, left, &p, &mut rng), NextStep::Retry(_)));
        // While a leader is being replaced, pauses stay short whatever the attempt number.
        for attempt in 0..20 {
            for e in [TernError::NotLeader { leader: None }, TernError::NotLeader { leader: Some(2) }, TernError::Unavailable("down".into())] {
                assert!(matches!(next_step(e, attempt, left, &p, &mut rng), NextStep::Retry(d) if d <= p.leader_wait_max));
                if attempt >= 4 {
                    let d = p.delay_up_to(attempt, p.leader_wait_max, &mut rng);
                    assert!(d >= p.leader_wait_max / 2 - Duration::from_millis(1), "still jittered: {d:?}");
                }
            }
        }
        assert!(matches!(next_step(TernError::Busy("x".into()), 10, left, &p, &mut rng), NextStep::Retry(d) if d > p.leader_wait_max));
        assert!(matches!(next_step(TernError::TableNotFound("t".into()), 1, left, &p, &mut rng), NextStep::GiveUp(_)));
    }
}
