//! The simulated world: virtual time, an event queue, nodes running the production `Store` over
//! simulated disks (`MemoryLogStore`, `MemoryEngineFactory`: unsynced writes lost on crash), a
//! simulated network (delay, reordering, drops, duplicates, partitions), crashes and restarts, clock
//! jumps, and clients that use the real client's routing and retry decisions. Everything random comes
//! from one seed, so a run replays bit for bit.
//!
//! Rooms: this file holds the world itself (configuration, events, nodes running the production
//! store, the event loop); `network` the simulated network, clocks and snapshot transfer; `disk`
//! when raft-log writes become durable; `faults`
//! the fault planner and how each fault is applied; `meta` meta's part (meta nodes running the production
//! catalog keeper, heartbeats, the keeper's tasks polled after every event); `clients` the workload and the clients' request loop; `invariants` what is checked
//! as the run goes and at its end; `report` the report, the trace and dumps.

mod clients;
mod disk;
mod dup;
mod faults;
mod invariants;
mod meta;
mod network;
mod report;

use clients::*;
pub use faults::{DiskFault, Fault};
use meta::{MetaWorld, SimKeeper, META_NODES, META_TICK_MS};
use network::*;
pub use report::{Election, SimReport};

use crate::checker::{self, Input, Operation, Output, Verdict};
use parking_lot::Mutex;
use raft::eraftpb::Message;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tern_client::retry::RetryPolicy;
use tern_client::routing::{next_step, LeaderTable, NextStep};
use tern_core::files::{FileSystem, MemoryFileSystem};
use tern_core::time::{Clock, RandomSource, SeededRandom};
use tern_core::{GroupId, NodeId, TernError};
use tern_engine::MemoryEngineFactory;
use tern_proto::{read_request, write_request, ReadRequest, ReadResponse, WriteRequest, WriteResponse};
use tern_raft::log_store::MemoryLogStore;
use tern_raft::replica::OutMessage;
use tern_raft::replica::PlantedBugs;
use tern_raft::store::{NodeDisks, ReplicaSpec, Store, StoreConfig, StoreMsg, Transport};

/// Virtual unix time at the start of every run.
const EPOCH_UNIX_MS: u64 = 1_700_000_000_000;
const TABLE_ID: u32 = 1;
const TICK_MS: u64 = 100;
/// A client gives up on one attempt after this long and retries.
const ATTEMPT_TIMEOUT_MS: u64 = 1_000;
/// A client gives up on an operation after this long (outcome unknown for writes).
const OPERATION_DEADLINE_MS: u64 = 5_000;
/// Sessions sharing one client identity (several writes of one client id in flight at once).
const SESSIONS_PER_CLIENT: usize = 2;
/// (node, applied index, checksum) of one replica.
type ReplicaSum = (NodeId, u64, u64);
/// Settling rounds (5 s of virtual time each) replicas get to agree after the run.
const SETTLE_ROUNDS_MAX: u32 = 4;
/// Every node's clocks and timers run up to this fast or slow (5%: far beyond real quartz, and
/// within the margin the read lease keeps below followers' vote refusal).
const CLOCK_DRIFT_PPM_MAX: u64 = 50_000;

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: usize,
    pub partitions: u32,
    pub clients: usize,
    /// Client operations to run (the final verification reads come on top).
    pub operations: usize,
    pub faults: bool,
    /// Faults are injected during this much virtual time, then everything heals.
    pub fault_phase_ms: u64,
    /// After healing, every pending operation must finish within this much virtual time.
    pub liveness_ms: u64,
    /// Run meta (three meta nodes keeping the catalog in their raft group, the production keeper
    /// and scheduler): lost replicas are replaced, replicas balanced, leaders preferred, all under
    /// the same faults (plus longer outages and meta leader crashes).
    pub scheduler: bool,
    /// Bugs put back on purpose, to prove the simulator catches them (none by default).
    pub planted: PlantedBugs,
    /// A directed scenario: these faults at these times (virtual ms) instead of the seed's random
    /// schedule (the seed still drives everything else).
    pub script: Option<Vec<(u64, Fault)>>,
    /// Clients only read during this window of virtual time (ms): some bugs need a quiet log.
    pub reads_only: Option<(u64, u64)>,
    /// Clients start nothing new during this window of virtual time (ms), while faults go on: the
    /// groups go idle and hibernate, and a leader may die asleep (`quiet_window` draws it).
    pub quiet: Option<(u64, u64)>,
    /// 2: a second cluster of `nodes` servers (ids after the first's) with its own table, the two
    /// duplicating into each other through the production shipper (`tern_server::dup`); the link
    /// between them is cut now and then, and at the end both must hold the same records.
    pub clusters: usize,
    /// Scheduler runs: meta is asked to split table "t" (double its partitions) at this virtual
    /// time (ms), and must have finished by the end.
    pub split_at_ms: Option<u64>,
    /// A tenth of the clients' operations are Redis list commands (RPUSH, LPOP, LRANGE) on a list
    /// key of their own, run by tern-redis inside raft apply and on the leader like any write and
    /// read: the checker models the list.
    pub redis: bool,
}

/// Half of the seeds get a quiet window of 3 to 7 s starting 2 to 6 s in, inside the fault phase.
fn quiet_window(seed: u64) -> Option<(u64, u64)> {
    let mut rng = SeededRandom::new(seed ^ 0x9_1E7);
    if rng.range(0, 2) == 0 {
        return None;
    }
    let start = rng.range(2_000, 6_000);
    Some((start, start + rng.range(3_000, 7_000)))
}

impl SimConfig {
    pub fn new(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            nodes: 3,
            partitions: 2,
            clients: 4,
            operations: 500,
            faults: true,
            fault_phase_ms: 10_000,
            liveness_ms: 60_000,
            scheduler: false,
            planted: PlantedBugs::default(),
            script: None,
            reads_only: None,
            quiet: quiet_window(seed),
            clusters: 1,
            split_at_ms: None,
            redis: false,
        }
    }

    /// The scheduler's run, with table "t" split early in the fault phase (at a time the seed
    /// draws), and twice the workload, so the split happens while clients and faults go on.
    pub fn with_split(seed: u64) -> SimConfig {
        let cfg = SimConfig::with_scheduler(seed);
        let at = SeededRandom::new(seed ^ 0x5_917).range(1_000, 5_000);
        SimConfig { split_at_ms: Some(at), operations: 2 * cfg.operations, ..cfg }
    }

    /// The default run with Redis list commands among the clients' operations.
    pub fn with_redis(seed: u64) -> SimConfig {
        SimConfig { redis: true, ..SimConfig::new(seed) }
    }

    /// Two clusters duplicating into each other.
    pub fn with_two_clusters(seed: u64) -> SimConfig {
        SimConfig { clusters: 2, ..SimConfig::new(seed) }
    }

    /// Four nodes with meta's scheduler moving replicas among them.
    pub fn with_scheduler(seed: u64) -> SimConfig {
        SimConfig { nodes: 4, scheduler: true, fault_phase_ms: 15_000, ..SimConfig::new(seed) }
    }
}

enum Event {
    Raft {
        to: NodeId,
        group: GroupId,
        message: Message,
        snapshot_dir: Option<PathBuf>,
    },
    SnapshotReport {
        node: NodeId,
        group: GroupId,
        to_peer: u64,
        ok: bool,
    },
    /// A store's liveness ping to another node.
    NodePing {
        from: NodeId,
        to: NodeId,
    },
    Tick {
        node: NodeId,
        epoch: u64,
    },
    Request {
        node: NodeId,
        client: usize,
        attempt: u64,
        request: Request,
    },
    Answer {
        client: usize,
        attempt: u64,
        answer: Answer,
    },
    AttemptTimeout {
        client: usize,
        attempt: u64,
    },
    ClientNext {
        client: usize,
    },
    ClientRetry {
        client: usize,
        attempt: u64,
    },
    Fault(Fault),
    /// Meta's scheduling pass and heartbeat answers.
    MetaTick,
    /// A node looks for partitions it leads that need a duplication shipper.
    ShipTick {
        node: NodeId,
        epoch: u64,
    },
    /// What a shipper waited for happened.
    Shipper {
        node: NodeId,
        group: GroupId,
        token: u64,
        outcome: dup::ShipOutcome,
    },
    /// A batch of duplicated records arrives at a node of the other cluster.
    DupRequest {
        to: NodeId,
        group: GroupId,
        apply: tern_proto::DupApply,
        from: NodeId,
        from_group: GroupId,
        token: u64,
    },
    /// The node's oldest raft-log write in progress becomes durable.
    LogSynced {
        node: NodeId,
        epoch: u64,
    },
}

impl Event {
    fn describe(&self) -> String {
        match self {
            Event::Raft { to, group, message, .. } => format!("raft {:?} {}->{} group {group}", message.get_msg_type(), message.from, to),
            Event::SnapshotReport { node, group, ok, .. } => format!("snapshot report node {node} group {group} ok={ok}"),
            Event::NodePing { from, to } => format!("ping {from}->{to}"),
            Event::Tick { node, .. } => format!("tick node {node}"),
            Event::Request { node, client, attempt, .. } => format!("request client {client} attempt {attempt} -> node {node}"),
            Event::Answer { client, attempt, .. } => format!("answer client {client} attempt {attempt}"),
            Event::AttemptTimeout { client, attempt } => format!("attempt timeout client {client} attempt {attempt}"),
            Event::ClientNext { client } => format!("client {client} next"),
            Event::ClientRetry { client, attempt } => format!("client {client} retry after attempt {attempt}"),
            Event::Fault(f) => format!("fault {f:?}"),
            Event::MetaTick => "meta tick".to_string(),
            Event::ShipTick { node, .. } => format!("ship tick node {node}"),
            Event::Shipper { node, group, outcome, .. } => format!("shipper node {node} group {group}: {outcome:?}"),
            Event::DupRequest { to, group, from, apply, .. } => {
                format!("dup batch {}->{to} group {group} origin index {} ({} records)", from, apply.origin_index, apply.records.len())
            }
            Event::LogSynced { node, .. } => format!("log synced node {node}"),
        }
    }

    fn trace_key(&self) -> u64 {
        match self {
            Event::Raft { to, group, message, .. } => {
                1 + (*to << 8) + (group.0 << 16) + ((message.get_msg_type() as u64) << 40) + (message.index << 48)
            }
            Event::SnapshotReport { node, .. } => 2 + (*node << 8),
            Event::NodePing { from, to } => 15 + (*to << 8) + (*from << 16),
            Event::Tick { node, .. } => 3 + (*node << 8),
            Event::Request { node, client, attempt, .. } => 4 + (*node << 8) + ((*client as u64) << 16) + (attempt << 24),
            Event::Answer { client, attempt, .. } => 5 + ((*client as u64) << 16) + (attempt << 24),
            Event::AttemptTimeout { client, attempt } => 6 + ((*client as u64) << 16) + (attempt << 24),
            Event::ClientNext { client } => 7 + ((*client as u64) << 16),
            Event::ClientRetry { client, attempt } => 8 + ((*client as u64) << 16) + (attempt << 24),
            Event::Fault(_) => 9,
            Event::MetaTick => 10,
            Event::ShipTick { node, .. } => 12 + (*node << 8),
            Event::Shipper { node, group, token, .. } => 13 + (*node << 8) + (group.0 << 16) + (token << 40),
            Event::DupRequest { to, group, token, .. } => 14 + (*to << 8) + (group.0 << 16) + (token << 40),
            Event::LogSynced { node, .. } => 11 + (*node << 8),
        }
    }
}

struct Node {
    id: NodeId,
    dir: PathBuf,
    log: Arc<MemoryLogStore>,
    engines: Arc<MemoryEngineFactory>,
    /// The node's file system: what a crash keeps of it is what was made durable.
    files: Arc<MemoryFileSystem>,
    clock_offset: Arc<AtomicI64>,
    /// How fast this node's clocks (wall and monotonic) and timers run, in parts per million off
    /// true time.
    drift_ppm: i64,
    store: Option<Store>,
    epoch: u64,
    paused_until: u64,
    /// Drawn per pause: how the connections' bursts interleave when it ends.
    pause_salt: u64,
    /// Disk faults injected and not yet seen to fire: the panics and stopped replicas they cause
    /// are expected.
    disk_faults_armed: u32,
    /// Groups whose replica here is stopped by a storage failure (as last seen).
    failed_groups: BTreeSet<GroupId>,
    /// On a meta node: its keeper (lost with the process).
    keeper: Option<SimKeeper>,
    /// Raft-log writes started and not yet durable (lost with the process).
    log_writes: disk::PendingLogWritesRef,
    /// The server's side of its heartbeats to meta (lost with the process).
    meta_link: tern_raft::meta_link::MetaLink,
}

pub struct World {
    cfg: SimConfig,
    identities: Vec<ClientIdentity>,
    shared: SharedRef,
    now: Arc<AtomicU64>,
    nodes: Vec<Node>,
    clients: Vec<SimClient>,
    history: Vec<Operation>,
    issued: usize,
    next_attempt: u64,
    policy: RetryPolicy,
    failures: Vec<String>,
    faults: Vec<String>,
    trace_hash: u64,
    /// A hash of every replica's state (node, group, applied index, checksum of its records) when
    /// they were last compared.
    state_hash: u64,
    events: u64,
    trace_tail: std::collections::VecDeque<String>,
    /// (group, term) -> leader peer seen, for the one-leader-per-term invariant.
    leaders_seen: BTreeMap<(u64, u64), u64>,
    /// A lease violation was reported (once is enough).
    lease_violation_reported: bool,
    /// When meta creates and drops the churn table (scheduler runs).
    churn_rng: SeededRandom,
    /// (group, index) -> (term, data hash) of every committed entry seen: committed entries never change.
    committed: BTreeMap<(u64, u64), (u64, u64)>,
    /// (node, group) -> highest committed index already compared.
    committed_checked: BTreeMap<(NodeId, u64), u64>,
    healed_at: Option<u64>,
    /// Replicas found hibernating, summed over every node's ticks.
    hibernating_ticks: u64,
    /// Every leader seen, when first seen.
    elections: Vec<Election>,
    /// Print every event as it happens (`TERN_SIM_TRACE=1`, for a seed being debugged).
    print_trace: bool,
    /// Meta's nodes, when the scheduler runs.
    meta: Option<MetaWorld>,
    /// Duplication between two clusters, when there are two.
    dup: dup::DupWorld,
}

impl Node {
    /// The node's clocks.
    fn clock(&self, now: &Arc<AtomicU64>) -> SimClock {
        SimClock { now: now.clone(), offset_ms: self.clock_offset.clone(), drift_ppm: self.drift_ppm }
    }
}

/// Where a node keeps its data, on its own (simulated) file system.
fn node_dir(id: NodeId) -> PathBuf {
    PathBuf::from(format!("/sim/n{id}"))
}

fn node_seed(seed: u64, node: NodeId, epoch: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (node << 32) ^ epoch
}

thread_local! {
    /// Set while production code runs under `with_store`, where injected faults may panic.
    static IN_STORE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Panics caused by injected faults inside production code are expected; keep them out of the output.
fn quiet_injected_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info.payload().downcast_ref::<String>().map(|s| s.as_str()).or_else(|| info.payload().downcast_ref::<&str>().copied());
            if !(IN_STORE.with(|f| f.get()) && msg.is_some_and(|m| m.contains("injected"))) {
                default(info);
            }
        }));
    });
}

impl World {
    pub fn new(cfg: SimConfig) -> World {
        quiet_injected_panics();
        let now = Arc::new(AtomicU64::new(0));
        let shared = Arc::new(Mutex::new(Shared {
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            rng: SeededRandom::new(cfg.seed),
            network: Network::default(),
            files: BTreeMap::new(),
        }));
        // Drawn from its own stream so that the rest of a run's randomness does not shift with it.
        let mut drift_rng = SeededRandom::new(cfg.seed ^ 0xD21F7);
        assert!(cfg.clusters == 1 || (cfg.clusters == 2 && !cfg.scheduler), "two clusters run without meta's scheduler");
        let meta_nodes = if cfg.scheduler { META_NODES } else { 0 };
        let nodes: Vec<Node> = (1..=(cfg.nodes * cfg.clusters + meta_nodes) as u64)
            .map(|id| {
                let files = Arc::new(MemoryFileSystem::new());
                let engines = Arc::new(MemoryEngineFactory::with_file_system(Some(tern_raft::keys::is_expired_record), files.clone()));
                (id, files, engines)
            })
            .map(|(id, files, engines)| Node {
                id,
                dir: node_dir(id),
                log: Arc::new(MemoryLogStore::default()),
                engines,
                files,
                clock_offset: Arc::new(AtomicI64::new(0)),
                drift_ppm: drift_rng.range(0, 2 * CLOCK_DRIFT_PPM_MAX + 1) as i64 - CLOCK_DRIFT_PPM_MAX as i64,
                store: None,
                epoch: 0,
                paused_until: 0,
                pause_salt: 0,
                disk_faults_armed: 0,
                failed_groups: BTreeSet::new(),
                keeper: None,
                log_writes: Default::default(),
                meta_link: Default::default(),
            })
            .collect();
        shared.lock().files = nodes.iter().map(|n| (n.id, n.files.clone())).collect();
        // Clients know every node of their cluster: a partition's replicas may move (the client
        // follows hints). With two clusters, clients alternate between them.
        let clients = (0..cfg.clients)
            .map(|i| SimClient {
                identity: i / SESSIONS_PER_CLIENT,
                cluster: i % cfg.clusters,
                rng: SeededRandom::new(cfg.seed ^ (0xC11E47 + i as u64)),
                leaders: {
                    let first = (i % cfg.clusters * cfg.nodes) as u64;
                    let replicas: Vec<NodeId> = (first + 1..=first + cfg.nodes as u64).collect();
                    LeaderTable::new((0..cfg.partitions).map(|p| (replicas.clone(), first + 1 + (p as u64 % cfg.nodes as u64))).collect())
                },
                route: None,
                pending: None,
                verification: Vec::new(),
                finished: false,
            })
            .collect();
        // Sequence numbers start a little below a multiple of the exactly-once GC chunk, so every run
        // moves client floors (and removes remembered results) while other writes are in flight.
        let churn_seed = cfg.seed ^ 0xC4124;
        let mut seq_rng = SeededRandom::new(cfg.seed ^ 0x5E0);
        let identities = (0..cfg.clients.div_ceil(SESSIONS_PER_CLIENT))
            .map(|i| ClientIdentity {
                client_id: 1000 + i as u64,
                sequencer: tern_client::routing::Sequencer::new(tern_raft::apply::DEDUP_GC_CHUNK * (1 + i as u64) - seq_rng.range(10, 200)),
            })
            .collect();
        let mut world = World {
            identities,
            cfg,
            shared,
            now,
            nodes,
            clients,
            history: Vec::new(),
            issued: 0,
            next_attempt: 0,
            policy: RetryPolicy { base: Duration::from_millis(20), max: Duration::from_millis(500), leader_wait_max: Duration::from_millis(100) },
            failures: Vec::new(),
            faults: Vec::new(),
            trace_hash: 0xcbf2_9ce4_8422_2325,
            state_hash: 0,
            events: 0,
            trace_tail: Default::default(),
            leaders_seen: BTreeMap::new(),
            lease_violation_reported: false,
            churn_rng: SeededRandom::new(churn_seed),
            committed: BTreeMap::new(),
            committed_checked: BTreeMap::new(),
            healed_at: None,
            hibernating_ticks: 0,
            elections: Vec::new(),
            print_trace: std::env::var("TERN_SIM_TRACE").is_ok_and(|v| v == "1"),
            meta: None,
            dup: Default::default(),
        };
        if world.cfg.scheduler {
            // Meta creates the table; clients start once it has (see `meta`).
            world.meta = Some(MetaWorld::new(world.cfg.nodes));
            world.shared.lock().schedule(META_TICK_MS, Event::MetaTick);
        }
        for i in 0..world.nodes.len() {
            world.start_node(i);
        }
        if !world.cfg.scheduler {
            world.create_partitions();
            for c in 0..world.clients.len() {
                world.shared.lock().schedule(200 + c as u64, Event::ClientNext { client: c });
            }
        }
        world.plan_faults();
        world
    }

    /// The cluster a server node belongs to (0, or 1 for the second of two).
    fn cluster_of(&self, node: NodeId) -> usize {
        ((node - 1) as usize / self.cfg.nodes).min(self.cfg.clusters - 1)
    }

    /// The table each cluster's clients use (the two clusters' tables get different ids, as two
    /// real clusters' tables may).
    fn table_of(cluster: usize) -> u32 {
        TABLE_ID + cluster as u32
    }

    fn store_config(planted: PlantedBugs) -> StoreConfig {
        // Small log thresholds so that compaction and snapshot transfer happen in every run.
        let mut cfg = StoreConfig { tick_interval: Duration::from_millis(TICK_MS), ..Default::default() };
        cfg.replica.log_gc_count_threshold = 50;
        cfg.replica.log_gc_lag_max = 100;
        cfg.replica.log_gc_interval_ticks = 5;
        cfg.replica.expiry_sync_interval_ticks = 20;
        cfg.failed_replica_reopen_ticks = 30;
        // Every engine closes as soon as nothing needs it, and opens again when something does.
        cfg.engines_open_max = 0;
        cfg.replica.planted = planted;
        cfg
    }

    fn start_node(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        node.epoch += 1;
        let transport = SimTransport { node: node.id, shared: self.shared.clone() };
        let clock = Arc::new(node.clock(&self.now));
        let seed = node_seed(self.cfg.seed, node.id, node.epoch);
        let disks = NodeDisks { log: node.log.clone(), engines: node.engines.clone(), files: node.files.clone() };
        let mut store_cfg = Self::store_config(self.cfg.planted);
        // Each cluster has its id, whose tag versions its writes.
        store_cfg.replica.cluster_id = Arc::new(AtomicU64::new(1 + ((node.id - 1) as usize / self.cfg.nodes).min(self.cfg.clusters - 1) as u64));
        let store = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Store::open(node.id, node.dir.clone(), disks, clock, seed, store_cfg, Box::new(transport))
        }));
        match store {
            Ok(Ok(mut s)) => {
                node.log_writes = Default::default();
                node.meta_link = Default::default();
                s.set_log_writer(Box::new(disk::SimLogWriter {
                    node: node.id,
                    epoch: node.epoch,
                    log: node.log.clone(),
                    pending: node.log_writes.clone(),
                    shared: self.shared.clone(),
                }));
                node.store = Some(s);
            }
            Ok(Err(e)) => self.failures.push(format!("node {} failed to open its store: {e}", node.id)),
            Err(_) => self.failures.push(format!("node {} panicked while opening its store", node.id)),
        }
        let (id, epoch) = (node.id, node.epoch);
        let offset = self.shared.lock().rng.range(1, TICK_MS);
        self.shared.lock().schedule(offset, Event::Tick { node: id, epoch });
        if self.is_meta(index) {
            self.start_keeper(index);
        }
        if self.cfg.clusters == 2 {
            self.shared.lock().schedule(offset, Event::ShipTick { node: id, epoch });
        }
    }

    /// The statuses of a node's replicas (none if it is down).
    fn statuses(&mut self, index: usize) -> Vec<tern_proto::ReplicaStatus> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.with_store(index, |s| {
            s.handle(StoreMsg::Status(Box::new(move |st| drop(tx.send(st)))));
        });
        rx.try_recv().unwrap_or_default()
    }

    /// Runs a store operation; a panic inside production code is a failure of the run.
    fn with_store(&mut self, index: usize, f: impl FnOnce(&mut Store)) {
        let Some(store) = self.nodes[index].store.as_mut() else { return };
        IN_STORE.with(|flag| flag.set(true));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(store)));
        IN_STORE.with(|flag| flag.set(false));
        if let Err(panic) = result {
            let msg = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            let node = self.nodes[index].id;
            if self.nodes[index].disk_faults_armed > 0 && msg.contains("injected") {
                // The injected disk failure did what it should: the node stops; it restarts later.
                self.nodes[index].disk_faults_armed = 0;
                let delay = self.shared.lock().rng.range(200, 2000);
                self.shared.lock().schedule(delay, Event::Fault(Fault::Restart(node)));
            } else {
                self.failures.push(format!("node {node} panicked: {msg}"));
            }
            self.crash(index);
            return;
        }
        // A replica stops after a storage failure at apply, and the store opens it again a while
        // later. Only an injected fault may cause one.
        let failed = self.nodes[index].store.as_ref().map(|s| s.failed_replicas()).unwrap_or_default();
        let node = &mut self.nodes[index];
        let fresh: Vec<(GroupId, String)> = failed.iter().filter(|(g, _)| !node.failed_groups.contains(g)).cloned().collect();
        node.failed_groups = failed.iter().map(|(g, _)| *g).collect();
        if !fresh.is_empty() {
            let excused = fresh.len() as u32 <= node.disk_faults_armed;
            if excused && fresh.iter().all(|(_, why)| why.contains("injected") || why.contains("checksum")) {
                node.disk_faults_armed -= fresh.len() as u32;
            } else {
                let id = node.id;
                self.failures.push(format!("node {id}: replicas stopped without an injected fault: {fresh:?}"));
            }
        }
    }

    fn crash(&mut self, index: usize) {
        // Some writes in flight may have reached the disk before the process died, unobserved.
        let seed = node_seed(self.cfg.seed, self.nodes[index].id, self.nodes[index].epoch) ^ 0xD15C_C4A5;
        disk::sync_some(&self.nodes[index].log, &self.nodes[index].log_writes, &mut SeededRandom::new(seed));
        let node = &mut self.nodes[index];
        node.store = None; // pending client callbacks are dropped unanswered
        node.keeper = None;
        node.log_writes = Default::default(); // writes not yet durable are lost
        node.log.crash();
        node.engines.crash();
        node.files.crash();
        node.epoch += 1;
        // An injected disk fault is a one-off: it does not outlive the process it hit.
        node.disk_faults_armed = 0;
        node.log.fail_writes(0);
        node.log.fail_reads(0);
        node.engines.fail_writes(0);
        node.engines.fail_reads(0);
        node.engines.corrupt_reads(0);
    }

    /// Runs the simulation to the end and checks the history.
    pub fn run(mut self) -> SimReport {
        let hard_stop = self.cfg.fault_phase_ms + self.cfg.liveness_ms + 60_000;
        loop {
            let next = {
                let mut s = self.shared.lock();
                match s.queue.pop() {
                    None => None,
                    Some(Reverse((at, seq))) => {
                        s.now = at;
                        let e = s.events.remove(&seq).expect("scheduled event");
                        Some((at, e))
                    }
                }
            };
            let Some((at, event)) = next else { break };
            self.now.store(at, Ordering::SeqCst);
            self.trace(at, &event);
            self.handle(event);
            if self.clients.iter().all(|c| c.finished) {
                break;
            }
            if let Some(healed) = self.healed_at {
                if at > healed + self.cfg.liveness_ms {
                    let pending: Vec<String> = self
                        .clients
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| !c.finished)
                        .map(|(i, c)| match &c.pending {
                            Some(p) => format!(
                                "client {i}: {:?} on {:?} since {} ms, {} attempts, last to node {}",
                                p.input,
                                String::from_utf8_lossy(&p.hashkey),
                                p.started,
                                p.attempts,
                                p.node
                            ),
                            None => format!("client {i}: idle"),
                        })
                        .collect();
                    self.failures.push(format!("liveness: operations still pending {} ms after healing: {pending:?}", self.cfg.liveness_ms));
                    let replicas = self.replica_statuses();
                    self.failures.push(format!("replica states: {replicas}"));
                    break;
                }
            }
            if at > hard_stop {
                self.failures.push("simulation did not finish".into());
                break;
            }
        }
        let end = self.now.load(Ordering::SeqCst);
        self.settle_and_compare_replicas();
        if self.cfg.clusters == 2 && self.failures.is_empty() {
            self.settle_and_compare_clusters();
        }
        self.check_split_finished();
        let verdict = checker::check(&self.history, 2_000_000);
        SimReport {
            seed: self.cfg.seed,
            trace_hash: self.trace_hash,
            state_hash: self.state_hash,
            events: self.events,
            virtual_ms: end,
            operations: self.history.len(),
            hibernating_ticks: self.hibernating_ticks,
            elections: self.elections,
            unknown_outcomes: self.history.iter().filter(|o| o.output.is_none()).count(),
            verdict,
            failures: self.failures,
            faults: self.faults,
            trace_tail: self.trace_tail.into_iter().collect(),
        }
    }

    fn node_index(&self, id: NodeId) -> usize {
        (id - 1) as usize
    }

    /// The node an event is delivered to, if any.
    /// Which connection an event comes over (its order within one survives a pause).
    fn connection(event: &Event) -> u64 {
        match event {
            Event::Raft { group, message, .. } => (group.0 << 20) ^ message.from,
            Event::Request { client, .. } => 0xC11E_0000 + *client as u64,
            Event::DupRequest { from, .. } => 0xD0B0_0000 + *from,
            Event::NodePing { from, .. } => 0x9196_0000 + *from,
            _ => 0x7133,
        }
    }

    fn target(event: &Event) -> Option<NodeId> {
        match event {
            Event::Raft { to, .. } => Some(*to),
            Event::SnapshotReport { node, .. }
            | Event::Tick { node, .. }
            | Event::Request { node, .. }
            | Event::LogSynced { node, .. }
            | Event::ShipTick { node, .. }
            | Event::Shipper { node, .. } => Some(*node),
            Event::DupRequest { to, .. } | Event::NodePing { to, .. } => Some(*to),
            _ => None,
        }
    }

    fn handle(&mut self, event: Event) {
        if let Some(node) = Self::target(&event) {
            let until = self.nodes[self.node_index(node)].paused_until;
            let now = self.now.load(Ordering::SeqCst);
            if now < until {
                // As under SIGSTOP: everything that arrived meanwhile is taken in a burst on resume,
                // timers late. Each connection keeps its order (one raft stream per peer, one per
                // client) while connections interleave in no particular order.
                let salt = self.nodes[self.node_index(node)].pause_salt;
                let jitter = SeededRandom::new(salt ^ Self::connection(&event)).range(0, 20);
                self.shared.lock().schedule(until - now + jitter, event);
                return;
            }
        }
        match event {
            Event::Raft { to, group, message, snapshot_dir } => {
                let i = self.node_index(to);
                self.with_store(i, |s| {
                    s.handle(StoreMsg::Raft { group, message, snapshot_dir });
                    s.process_ready();
                });
                // Elections finish on a message: record the new leader at once, so a lease still
                // held elsewhere at this moment is seen.
                self.check_leaders(i);
                self.check_leases();
            }
            Event::NodePing { from, to } => {
                let i = self.node_index(to);
                self.with_store(i, |s| {
                    s.handle(StoreMsg::NodePing { from });
                });
            }
            Event::SnapshotReport { node, group, to_peer, ok } => {
                let i = self.node_index(node);
                self.with_store(i, |s| {
                    s.handle(StoreMsg::SnapshotReport { group, to_peer, ok });
                    s.process_ready();
                });
            }
            Event::Tick { node, epoch } => {
                let i = self.node_index(node);
                if self.nodes[i].epoch != epoch || self.nodes[i].store.is_none() {
                    return; // a tick of a crashed incarnation
                }
                let mut asleep = 0;
                self.with_store(i, |s| {
                    s.tick();
                    s.process_ready();
                    asleep = s.hibernating_count();
                });
                self.hibernating_ticks += asleep as u64;
                self.check_leaders(i);
                self.check_leases();
                // The node's tick timer runs on its own (drifting) clock.
                let denominator = 1_000_000 + self.nodes[i].drift_ppm;
                let interval = ((TICK_MS as i64 * 2_000_000 + denominator) / (2 * denominator)) as u64; // rounded to the nearest ms
                self.shared.lock().schedule(interval, Event::Tick { node, epoch });
            }
            Event::Request { node, client, attempt, request } => self.serve(node, client, attempt, request),
            Event::Answer { client, attempt, answer } => self.on_answer(client, attempt, answer),
            Event::AttemptTimeout { client, attempt } => {
                if self.clients[client].pending.as_ref().is_some_and(|p| p.attempt == attempt) {
                    self.on_error(client, TernError::Timeout("attempt timed out".into()));
                }
            }
            Event::ClientNext { client } => self.next_operation(client),
            Event::ClientRetry { client, attempt } => {
                if self.clients[client].pending.as_ref().is_some_and(|p| p.attempt == attempt) {
                    self.send_attempt(client);
                }
            }
            Event::Fault(f) => self.apply_fault(f),
            Event::MetaTick => self.meta_tick(),
            Event::ShipTick { node, epoch } => self.ship_tick(node, epoch),
            Event::Shipper { node, group, token, outcome } => self.on_ship_outcome(node, group, token, outcome),
            Event::DupRequest { to, group, apply, from, from_group, token } => self.serve_dup_request(to, group, apply, from, from_group, token),
            Event::LogSynced { node, epoch } => {
                let i = self.node_index(node);
                if self.nodes[i].epoch != epoch || self.nodes[i].store.is_none() {
                    return; // the write died with the process
                }
                disk::sync_one(&self.nodes[i].log, &self.nodes[i].log_writes);
                self.with_store(i, |s| s.process_ready());
                self.check_leaders(i);
                self.check_leases();
            }
        }
        self.drive_meta();
    }
}

/// Runs one seed.
pub fn run(cfg: SimConfig) -> SimReport {
    World::new(cfg).run()
}
