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
            TernError::StaleConfig(_) | TernError::TableNotFound(_) | TernError::PartitionNotFound(_) => Reaction::RefreshRoute,
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
    // Following a fresh leader hint needs no pause, the first few times.
    if matches!(error, TernError::NotLeader { leader: Some(_) }) && attempt <= 3 {
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
        assert_eq!(t.observe(1, 4, &TernError::invalid("bad")), Reaction::None);
        assert_eq!(t.leader(1), 4, "a request error says nothing about leadership");
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
