//! Meta's part, in scheduler runs: three meta nodes, each a production `Store` hosting the catalog
//! group and running the production `tern_meta::keeper::Keeper` (leadership following, reload and
//! barrier, conditional catalog writes, heartbeats, liveness, scheduling passes), under the same
//! faults as every node (crashes, pauses, partitions, clock jumps) plus crashes of whichever meta
//! node leads. The keeper is async code: its tasks are polled here after every event, and its
//! store requests are handed to the meta node's store as messages, so a run stays deterministic.

use super::*;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tern_meta::keeper::{IoFuture, Keeper, KeeperIo, CATALOG_GROUP, CATALOG_IO_TIMEOUT};
use tern_proto::{HeartbeatRequest, HeartbeatResponse, ReplicaStatus};

/// Meta declares a node dead after this long without hearing from it (scheduler runs only).
pub(super) const SIM_NODE_GRACE_MS: u64 = 3_000;
/// The keeper looks at the catalog group's leadership this often (as the service does).
pub(super) const META_TICK_MS: u64 = 100;
/// Every this many meta ticks, servers heartbeat and meta runs a scheduling pass (once a second).
const META_ROUND_TICKS: u64 = 10;
/// Meta nodes in scheduler runs (after the data nodes: ids nodes+1 ..= nodes+3).
pub(super) const META_NODES: usize = 3;
/// Once everything has healed and settled, a split must be done within this long (virtual ms).
const SPLIT_FINISH_MS: u64 = 30_000;
/// The table created and dropped over and over in scheduler runs.
pub(super) const CHURN_TABLE: &str = "churn";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Task {
    Follow,
    Schedule,
    /// A heartbeat of the data node at this index.
    Heartbeat(usize),
    Bootstrap,
    Churn,
    Split,
}

type TaskFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A meta node's keeper (one per process incarnation: a crash loses it) and its tasks in flight.
pub(super) struct SimKeeper {
    keeper: Keeper,
    /// Whether it served when last looked at (changes go into the run's log).
    was_serving: bool,
    io: Arc<SimKeeperIo>,
    tasks: Vec<(Task, TaskFuture)>,
}

/// What finished keeper tasks leave for the world to act on.
enum Outcome {
    /// Meta's answer to a heartbeat of the data node at `index` (incarnation `epoch`).
    Heartbeat {
        index: usize,
        epoch: u64,
        /// The heartbeat's number (`MetaLink::prepare`).
        number: u64,
        answer: Box<HeartbeatResponse>,
    },
    Bootstrapped,
    /// Meta has recorded the split of table "t".
    SplitStarted(String),
    Log(String),
}

/// Meta's part of the world.
pub(super) struct MetaWorld {
    /// Indices of the meta nodes in `World::nodes`.
    pub(super) indices: Vec<usize>,
    /// The cluster's nodes are registered and table "t" created.
    bootstrapped: bool,
    /// Meta has recorded the split `SimConfig::split_at_ms` asks for.
    pub(super) split_requested: bool,
    /// What the split waited for when last looked at.
    split_waiting_for: String,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    ticks: u64,
}

impl MetaWorld {
    pub(super) fn new(first_index: usize) -> MetaWorld {
        MetaWorld {
            indices: (first_index..first_index + META_NODES).collect(),
            bootstrapped: false,
            split_requested: false,
            split_waiting_for: String::new(),
            outcomes: Default::default(),
            ticks: 0,
        }
    }
}

/// The keeper's way to its meta node's store: each request is queued as a store message (the world
/// delivers it), and resolves when the store's callback answers, with `Unavailable` if the store
/// dropped it (the node crashed), or `Timeout` after `CATALOG_IO_TIMEOUT` by the node's clock.
struct SimKeeperIo {
    outbox: Mutex<Vec<StoreMsg>>,
    clock: SimClock,
}

struct Answered<T> {
    slot: Arc<Mutex<Option<T>>>,
    deadline: Duration,
    clock: SimClock,
}

impl<T> Future for Answered<T> {
    type Output = Result<T, TernError>;
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(answer) = self.slot.lock().take() {
            return Poll::Ready(Ok(answer));
        }
        if Arc::strong_count(&self.slot) == 1 {
            return Poll::Ready(Err(TernError::Unavailable("meta store stopped".into())));
        }
        if self.clock.monotonic() >= self.deadline {
            return Poll::Ready(Err(TernError::Timeout(format!("catalog request did not finish within {CATALOG_IO_TIMEOUT:?}"))));
        }
        Poll::Pending
    }
}

impl SimKeeperIo {
    fn ask<T: Send + 'static>(&self, message: impl FnOnce(Box<dyn FnOnce(T) + Send>) -> StoreMsg) -> IoFuture<T> {
        let slot = Arc::new(Mutex::new(None));
        let filled = slot.clone();
        self.outbox.lock().push(message(Box::new(move |answer| *filled.lock() = Some(answer))));
        Box::pin(Answered { slot, deadline: self.clock.monotonic() + CATALOG_IO_TIMEOUT, clock: self.clock.clone() })
    }
}

impl KeeperIo for SimKeeperIo {
    fn read(&self, request: ReadRequest) -> IoFuture<ReadResponse> {
        self.ask(|callback| StoreMsg::Read { group: CATALOG_GROUP, request, callback })
    }

    fn write(&self, request: WriteRequest) -> IoFuture<WriteResponse> {
        self.ask(|callback| StoreMsg::Write { group: CATALOG_GROUP, request, callback })
    }

    fn statuses(&self) -> IoFuture<Vec<ReplicaStatus>> {
        self.ask(StoreMsg::Status)
    }

    fn clock(&self) -> &dyn Clock {
        &self.clock
    }
}

impl World {
    /// Without the scheduler: every node hosts every partition of the table from the start.
    pub(super) fn create_partitions(&mut self) {
        let n = self.cfg.nodes as u64;
        for index in 0..self.cfg.nodes * self.cfg.clusters {
            let node = self.nodes[index].id;
            let cluster = self.cluster_of(node);
            let first = cluster as u64 * n; // the cluster's nodes are first + 1 ..= first + n
            let specs = (0..self.cfg.partitions)
                .map(|p| ReplicaSpec {
                    group: GroupId::new(Self::table_of(cluster), p),
                    peer_id: p as u64 * n + node - first,
                    peers: (1..=n).map(|m| (p as u64 * n + m, first + m)).collect(),
                    learners: vec![],
                    removing: vec![],
                    initial_voters: vec![],
                    initial: true,
                    partition_count: self.cfg.partitions,
                    initial_partition_count: 0,
                    preferred_leader: first + 1 + (p as u64 % n) == node,
                    preferred_leader_peer: 0,
                })
                .collect();
            self.with_store(index, |s| {
                s.handle(StoreMsg::EnsureReplicas(specs));
            });
        }
    }

    pub(super) fn is_meta(&self, index: usize) -> bool {
        self.meta.as_ref().is_some_and(|m| m.indices.contains(&index))
    }

    /// A meta node (re)started: its store hosts the catalog group (as `MetaNode::start` asks), and
    /// a fresh keeper starts, knowing nothing.
    pub(super) fn start_keeper(&mut self, index: usize) {
        let Some(meta) = self.meta.as_ref() else { return };
        let ids: Vec<NodeId> = meta.indices.iter().map(|i| self.nodes[*i].id).collect();
        let node = self.nodes[index].id;
        let spec = ReplicaSpec {
            group: CATALOG_GROUP,
            peer_id: node,
            peers: ids.iter().map(|i| (*i, *i)).collect(),
            learners: vec![],
            removing: vec![],
            initial_voters: vec![],
            initial: true,
            partition_count: 1,
            initial_partition_count: 0,
            preferred_leader: node == ids[0],
            preferred_leader_peer: 0,
        };
        self.with_store(index, |s| {
            s.handle(StoreMsg::EnsureReplicas(vec![spec]));
        });
        if self.nodes[index].store.is_none() {
            return;
        }
        let io = Arc::new(SimKeeperIo { outbox: Mutex::new(Vec::new()), clock: self.nodes[index].clock(&self.now) });
        let keeper = Keeper::new(io.clone(), Duration::from_millis(SIM_NODE_GRACE_MS));
        self.nodes[index].keeper = Some(SimKeeper { keeper, was_serving: false, io, tasks: Vec::new() });
    }

    /// Whether a process at `from` (a node; None: a client, which no fault touches) can reach the
    /// node at `to` now: both up and running, no cut between them.
    fn reaches(&self, from: Option<usize>, to: usize) -> bool {
        let now = self.now.load(Ordering::SeqCst);
        let up = |i: usize| self.nodes[i].store.is_some() && now >= self.nodes[i].paused_until;
        let Some(from) = from else { return up(to) };
        let cut = &self.shared.lock().network.cut;
        let (a, b) = (self.nodes[from].id, self.nodes[to].id);
        up(from) && up(to) && !cut.contains(&(a, b)) && !cut.contains(&(b, a))
    }

    fn running(&self, index: usize) -> bool {
        self.reaches(None, index)
    }

    /// The meta node a process at `from` would get answers from: the first serving one it reaches
    /// (servers and clients try meta addresses in turn until one answers).
    fn serving_meta_for(&self, from: Option<usize>) -> Option<usize> {
        let meta = self.meta.as_ref()?;
        meta.indices.iter().copied().find(|&m| self.nodes[m].keeper.as_ref().is_some_and(|k| k.keeper.serving()) && self.reaches(from, m))
    }

    /// A serving meta node's catalog (what the meta leader answers from), if one is serving.
    pub(super) fn meta_catalog(&self) -> Option<tern_meta::catalog::Catalog> {
        let meta = self.meta.as_ref()?;
        meta.indices.iter().filter_map(|&m| self.nodes[m].keeper.as_ref()).find(|k| k.keeper.serving()).map(|k| k.keeper.catalog())
    }

    /// The route the real client gets when it asks meta for table "t" holding `held` (None if no
    /// meta answers): the table, and its leaders as the client tracks them. As the real client
    /// does, it asks for what changed since the routing it holds and merges that in.
    pub(super) fn route_from_meta(&self, held: Option<(&tern_proto::TableInfo, &LeaderTable)>) -> Option<(LeaderTable, tern_proto::TableInfo)> {
        let m = self.serving_meta_for(None)?;
        let keeper = &self.nodes[m].keeper.as_ref()?.keeper;
        let fresh = keeper.table_since("t", held.map_or(0, |(t, _)| t.routing_version)).ok()?;
        let (table, leaders) = match tern_client::routing::refreshed(held, fresh) {
            Some(refreshed) => refreshed,
            None => {
                let t = keeper.table("t").ok()?;
                (t.clone(), LeaderTable::from_table(&t))
            }
        };
        Some((leaders, table))
    }

    /// Says in the run's log what a split waits for, when that changes.
    fn note_split_progress(&mut self) {
        if !self.meta.as_ref().is_some_and(|m| m.split_requested) {
            return;
        }
        let Some(m) = self.serving_meta_for(None) else { return };
        let Some(t) = self.nodes[m].keeper.as_ref().and_then(|k| k.keeper.table("t").ok()) else { return };
        let waiting = t.split.map(|s| s.waiting_for).unwrap_or_default();
        let meta = self.meta.as_mut().expect("meta runs");
        if waiting != meta.split_waiting_for {
            let now = self.now.load(Ordering::SeqCst);
            if !waiting.is_empty() {
                self.faults.push(format!("{now:>6} ms  split waits for {waiting}"));
            }
            meta.split_waiting_for = waiting;
        }
    }

    /// Once healed, a split asked for must finish within `SPLIT_FINISH_MS` (it never hangs); its
    /// children's replicas must then agree like every other group's.
    pub(super) fn check_split_finished(&mut self) {
        let requested = self.meta.as_ref().is_some_and(|m| m.split_requested);
        if !requested || !self.failures.is_empty() {
            return;
        }
        let done = |w: &Self| w.meta_catalog().is_some_and(|c| c.tables["t"].split.is_none());
        let mut waited = 0;
        while !done(self) && waited < SPLIT_FINISH_MS {
            self.settle(1_000);
            waited += 1_000;
        }
        let Some(catalog) = self.meta_catalog() else { return }; // reported by the replica comparison
        let t = &catalog.tables["t"];
        if t.split.is_some() || t.partition_count != self.cfg.partitions * 2 {
            let alive: Vec<NodeId> = catalog.nodes.keys().copied().collect();
            let waiting = t.split_waiting_for(&alive, &Default::default());
            self.failures.push(format!("the split of table t did not finish: {:?}, {} partitions, {waiting}", t.split, t.partition_count));
            return;
        }
        self.faults.push(format!("{:>6} ms  split of table t done (waited {waited} ms after settling)", self.now.load(Ordering::SeqCst)));
        if waited > 0 {
            self.settle_and_compare_replicas();
        }
    }

    fn spawn(&mut self, index: usize, task: Task, make: impl FnOnce(Keeper, Arc<Mutex<Vec<Outcome>>>) -> TaskFuture) {
        let outcomes = self.meta.as_ref().expect("meta runs").outcomes.clone();
        let Some(k) = self.nodes[index].keeper.as_mut() else { return };
        if k.tasks.iter().any(|(t, _)| *t == task) {
            return; // one of each at a time, as the service's loops
        }
        let future = make(k.keeper.clone(), outcomes);
        k.tasks.push((task, future));
    }

    /// Meta's timer: every meta node's keeper looks at leadership; once a second, servers send
    /// heartbeats, the leader runs a scheduling pass, and (during the fault phase) creates or drops
    /// the churn table; until the cluster exists, the leader creates it.
    pub(super) fn meta_tick(&mut self) {
        self.shared.lock().schedule(META_TICK_MS, Event::MetaTick);
        let now = self.now.load(Ordering::SeqCst);
        let meta = self.meta.as_mut().expect("meta runs");
        meta.ticks += 1;
        let round = meta.ticks.is_multiple_of(META_ROUND_TICKS);
        let bootstrapped = meta.bootstrapped;
        let split_due = !meta.split_requested && self.cfg.split_at_ms.is_some_and(|at| now >= at);
        let indices = meta.indices.clone();
        for &m in &indices {
            if !self.running(m) {
                continue; // down or paused: its timers do not fire
            }
            self.spawn(m, Task::Follow, |k, _| Box::pin(async move { k.follow_leadership().await }));
            if !self.nodes[m].keeper.as_ref().is_some_and(|k| k.keeper.serving()) {
                continue;
            }
            if !bootstrapped {
                let (n, partitions) = (self.cfg.nodes, self.cfg.partitions);
                self.spawn(m, Task::Bootstrap, move |k, out| {
                    Box::pin(async move {
                        let created = k
                            .change(|c, _| {
                                if c.tables.is_empty() {
                                    for i in 1..=n {
                                        c.register(&format!("n{i}"), "")?;
                                    }
                                    c.create_table("t", partitions, 3, &[1, 2, 3])?;
                                }
                                Ok(())
                            })
                            .await;
                        out.lock().push(match created {
                            Ok(()) => Outcome::Bootstrapped,
                            Err(e) => Outcome::Log(format!("meta: cannot create the cluster yet: {e}")),
                        });
                    })
                });
            } else if round {
                if split_due {
                    let (now_unix_ms, partitions) = (EPOCH_UNIX_MS + now, self.cfg.partitions);
                    self.spawn(m, Task::Split, move |k, out| {
                        Box::pin(async move {
                            // Once: an earlier request may have been written though its answer was
                            // lost (a meta leader that crashed right after).
                            let split = |c: &mut tern_meta::catalog::Catalog| match &c.tables["t"] {
                                t if t.split.is_some() || t.partition_count != partitions => Ok("table t: split already asked for".to_string()),
                                _ => c.start_split("t", now_unix_ms),
                            };
                            let outcome = match k.change(|c, _| split(c)).await {
                                Ok(what) => Outcome::SplitStarted(what),
                                Err(e) => Outcome::Log(format!("meta: cannot split yet: {e}")),
                            };
                            out.lock().push(outcome);
                        })
                    });
                }
                self.spawn(m, Task::Schedule, |k, out| {
                    Box::pin(async move {
                        if let Ok(changes) = k.schedule_pass(false).await {
                            out.lock().extend(changes.into_iter().map(|c| Outcome::Log(format!("scheduler: {c}"))));
                        }
                    })
                });
                // Table churn during the fault phase: a second table created and dropped again and
                // again, so replicas are created and destroyed on every node under the same faults.
                if now < self.cfg.fault_phase_ms && self.churn_rng.range(0, 3) == 0 {
                    self.spawn(m, Task::Churn, |k, out| {
                        Box::pin(async move {
                            let r = k
                                .change(|c, alive| {
                                    if c.tables.contains_key(CHURN_TABLE) {
                                        c.drop_table(CHURN_TABLE).map(|_| format!("dropped table {CHURN_TABLE}"))
                                    } else {
                                        c.create_table(CHURN_TABLE, 2, 3, alive).map(|t| format!("created table {CHURN_TABLE} (id {})", t.id))
                                    }
                                })
                                .await;
                            if let Ok(what) = r {
                                out.lock().push(Outcome::Log(format!("meta: {what}")));
                            }
                        })
                    });
                }
            }
        }
        if round && bootstrapped {
            for i in 0..self.cfg.nodes {
                self.send_heartbeat(i);
            }
            self.note_split_progress();
        }
    }

    /// A data node's heartbeat to the meta node it reaches, carrying its replicas' statuses now.
    fn send_heartbeat(&mut self, index: usize) {
        let Some(m) = self.serving_meta_for(Some(index)) else { return };
        if self.nodes[m].keeper.as_ref().is_some_and(|k| k.tasks.iter().any(|(t, _)| *t == Task::Heartbeat(index))) {
            return;
        }
        let replicas = self.statuses(index);
        let (node_id, epoch) = (self.nodes[index].id, self.nodes[index].epoch);
        let mut hb = HeartbeatRequest { node_id, address: format!("n{node_id}"), ..Default::default() };
        let number = self.nodes[index].meta_link.prepare(&mut hb, replicas);
        self.spawn(m, Task::Heartbeat(index), move |k, out| {
            Box::pin(async move {
                if let Ok(answer) = k.heartbeat(hb).await {
                    out.lock().push(Outcome::Heartbeat { index, epoch, number, answer: Box::new(answer) });
                }
            })
        });
    }

    /// Runs the meta nodes' keepers as far as they can go now: polls their tasks, hands their store
    /// requests to their stores, and acts on what finished. Called after every event.
    pub(super) fn drive_meta(&mut self) {
        let Some(indices) = self.meta.as_ref().map(|m| m.indices.clone()) else { return };
        loop {
            let mut progress = false;
            for &m in &indices {
                if !self.running(m) {
                    continue; // down, or paused: nothing runs
                }
                let (now, id) = (self.now.load(Ordering::SeqCst), self.nodes[m].id);
                let Some(k) = self.nodes[m].keeper.as_mut() else { continue };
                let mut cx = Context::from_waker(Waker::noop());
                let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    k.tasks.retain_mut(|(_, f)| f.as_mut().poll(&mut cx).is_pending());
                }));
                if polled.is_err() {
                    self.failures.push(format!("meta node {id}: the keeper panicked"));
                    self.crash(m);
                    continue;
                }
                if k.keeper.serving() != k.was_serving {
                    k.was_serving = !k.was_serving;
                    let what = if k.was_serving { "serves as meta leader" } else { "stops serving" };
                    self.faults.push(format!("{now:>6} ms  meta node {id} {what}"));
                }
                let Some(k) = self.nodes[m].keeper.as_mut() else { continue };
                let messages = std::mem::take(&mut *k.io.outbox.lock());
                if !messages.is_empty() {
                    progress = true;
                    self.with_store(m, |s| {
                        for message in messages {
                            s.handle(message);
                        }
                        s.process_ready();
                    });
                    self.check_leaders(m);
                    self.check_leases();
                }
            }
            let outcomes = std::mem::take(&mut *self.meta.as_ref().expect("meta runs").outcomes.lock());
            for outcome in outcomes {
                progress = true;
                self.on_meta_outcome(outcome);
            }
            if !progress {
                return;
            }
        }
    }

    fn on_meta_outcome(&mut self, outcome: Outcome) {
        let now = self.now.load(Ordering::SeqCst);
        match outcome {
            Outcome::Heartbeat { index, epoch, number, answer } => {
                // The answer reaches the server if it is still the process that asked.
                if self.nodes[index].epoch != epoch || !self.running(index) {
                    return;
                }
                let Some(answer) = self.nodes[index].meta_link.answered(*answer, number) else { return };
                self.with_store(index, |s| {
                    for msg in tern_raft::store::reconcile_with_meta(&answer) {
                        s.handle(msg);
                    }
                    s.process_ready();
                });
            }
            Outcome::Bootstrapped => {
                let meta = self.meta.as_mut().expect("meta runs");
                if !meta.bootstrapped {
                    meta.bootstrapped = true;
                    self.faults.push(format!("{now:>6} ms  meta: nodes registered, table t created"));
                    // Clients start once the table exists and its replicas had a heartbeat round to
                    // be created in.
                    let mut s = self.shared.lock();
                    for c in 0..self.clients.len() {
                        s.schedule(1_500 + c as u64, Event::ClientNext { client: c });
                    }
                }
            }
            Outcome::SplitStarted(what) => {
                self.meta.as_mut().expect("meta runs").split_requested = true;
                self.faults.push(format!("{now:>6} ms  meta: {what}"));
            }
            Outcome::Log(line) => self.faults.push(format!("{now:>6} ms  {line}")),
        }
    }

    /// The meta node that leads the catalog group now, if any.
    pub(super) fn meta_leader(&mut self) -> Option<usize> {
        let indices = self.meta.as_ref()?.indices.clone();
        indices.into_iter().find(|&m| {
            let statuses: Vec<ReplicaStatus> = self.statuses(m);
            statuses.iter().any(|s| s.group_id == CATALOG_GROUP.0 && s.is_leader)
        })
    }
}
