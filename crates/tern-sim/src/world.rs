//! The simulated world: virtual time, an event queue, nodes running the production `Store` over
//! simulated disks (`MemoryLogStore`, `MemoryEngineFactory`: unsynced writes lost on crash), a
//! simulated network (delay, reordering, drops, duplicates, partitions), crashes and restarts, clock
//! jumps, and clients that use the real client's routing and retry decisions. Everything random comes
//! from one seed, so a run replays bit for bit.

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
use tern_core::codec::partition_of;
use tern_core::time::{Clock, RandomSource, SeededRandom};
use tern_core::{GroupId, NodeId, TernError};
use tern_engine::MemoryEngineFactory;
use tern_proto::{read_request, write_request, ReadRequest, ReadResponse, WriteRequest, WriteResponse};
use tern_raft::log_store::MemoryLogStore;
use tern_raft::replica::OutMessage;
use tern_raft::replica::PlantedBugs;
use tern_raft::store::{ReplicaSpec, Store, StoreConfig, StoreMsg, Transport};

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
    /// Run meta's scheduler (tern_meta::catalog) on a fourth node: lost replicas are replaced,
    /// replicas balanced, leaders preferred, all under the same faults (plus longer outages and
    /// meta outages).
    pub scheduler: bool,
    /// Bugs put back on purpose, to prove the simulator catches them (none by default).
    pub planted: PlantedBugs,
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
        }
    }

    /// Four nodes with meta's scheduler moving replicas among them.
    pub fn with_scheduler(seed: u64) -> SimConfig {
        SimConfig { nodes: 4, scheduler: true, fault_phase_ms: 15_000, ..SimConfig::new(seed) }
    }
}

#[derive(Debug)]
pub struct SimReport {
    pub seed: u64,
    pub trace_hash: u64,
    pub events: u64,
    pub virtual_ms: u64,
    pub operations: usize,
    /// Writes whose outcome the client could not learn (they may or may not have happened).
    pub unknown_outcomes: usize,
    pub verdict: Verdict,
    /// Invariant and liveness failures, in the order found.
    pub failures: Vec<String>,
    pub faults: Vec<String>,
    /// The last events before the end (or the first failure).
    pub trace_tail: Vec<String>,
}

impl SimReport {
    pub fn ok(&self) -> bool {
        self.failures.is_empty() && !matches!(self.verdict, Verdict::Violation { .. })
    }

    pub fn describe(&self) -> String {
        let mut out = format!(
            "seed {}: {} operations, {} events, {:.1} s simulated, verdict {:?}, trace hash {:#x}\n",
            self.seed,
            self.operations,
            self.events,
            self.virtual_ms as f64 / 1000.0,
            self.verdict,
            self.trace_hash
        );
        for f in &self.failures {
            out.push_str(&format!("  failure: {f}\n"));
        }
        if !self.ok() {
            out.push_str("  fault schedule:\n");
            for f in &self.faults {
                out.push_str(&format!("    {f}\n"));
            }
            out.push_str("  last events:\n");
            for e in &self.trace_tail {
                out.push_str(&format!("    {e}\n"));
            }
        }
        out
    }
}

enum Request {
    Write(GroupId, WriteRequest),
    Read(GroupId, ReadRequest),
}

enum Answer {
    Write(WriteResponse),
    Read(ReadResponse),
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
}

#[derive(Clone, Copy, Debug)]
enum DiskFault {
    LogWrite,
    LogRead,
    EngineWrite,
    /// A point read of the engine fails (at apply: the replica stops).
    EngineRead,
    /// A point read of the engine returns a value with a flipped byte (its checksum must catch it).
    EngineCorruptRead,
}

#[derive(Clone, Debug)]
enum Fault {
    Crash(NodeId),
    Restart(NodeId),
    Isolate(NodeId),
    /// Cut links one way only: `from` cannot reach `to`.
    CutOneWay(NodeId, NodeId),
    Heal,
    ClockJump(NodeId, i64),
    Noise(bool),
    /// The node stops processing (as under SIGSTOP or a long pause) for this many milliseconds.
    Pause(NodeId, u64),
    /// The node's next raft-log write, raft-log read or engine write fails: the store treats it as
    /// fatal and the node restarts.
    DiskFailure(NodeId, DiskFault),
    /// Meta is unreachable for this many milliseconds (no scheduling, no heartbeat answers).
    MetaDown(u64),
    /// The node's engines run a compaction now (RocksDB compacts in the background at any moment):
    /// records the expiry filter allows to drop are dropped.
    Compact(NodeId),
    /// While on, snapshot transfers may arrive cut short (the sender died half way, its checkpoint
    /// went away under it): the receiver must refuse them.
    CutSnapshots(bool),
    HealAll,
}

impl Event {
    fn describe(&self) -> String {
        match self {
            Event::Raft { to, group, message, .. } => format!("raft {:?} {}->{} group {group}", message.get_msg_type(), message.from, to),
            Event::SnapshotReport { node, group, ok, .. } => format!("snapshot report node {node} group {group} ok={ok}"),
            Event::Tick { node, .. } => format!("tick node {node}"),
            Event::Request { node, client, attempt, .. } => format!("request client {client} attempt {attempt} -> node {node}"),
            Event::Answer { client, attempt, .. } => format!("answer client {client} attempt {attempt}"),
            Event::AttemptTimeout { client, attempt } => format!("attempt timeout client {client} attempt {attempt}"),
            Event::ClientNext { client } => format!("client {client} next"),
            Event::ClientRetry { client, attempt } => format!("client {client} retry after attempt {attempt}"),
            Event::Fault(f) => format!("fault {f:?}"),
            Event::MetaTick => "meta tick".to_string(),
        }
    }

    fn trace_key(&self) -> u64 {
        match self {
            Event::Raft { to, group, message, .. } => {
                1 + (*to << 8) + (group.0 << 16) + ((message.get_msg_type() as u64) << 40) + (message.index << 48)
            }
            Event::SnapshotReport { node, .. } => 2 + (*node << 8),
            Event::Tick { node, .. } => 3 + (*node << 8),
            Event::Request { node, client, attempt, .. } => 4 + (*node << 8) + ((*client as u64) << 16) + (attempt << 24),
            Event::Answer { client, attempt, .. } => 5 + ((*client as u64) << 16) + (attempt << 24),
            Event::AttemptTimeout { client, attempt } => 6 + ((*client as u64) << 16) + (attempt << 24),
            Event::ClientNext { client } => 7 + ((*client as u64) << 16),
            Event::ClientRetry { client, attempt } => 8 + ((*client as u64) << 16) + (attempt << 24),
            Event::Fault(_) => 9,
            Event::MetaTick => 10,
        }
    }
}

/// Network conditions, changed by faults.
#[derive(Default)]
struct Network {
    /// (from, to) pairs whose messages are dropped.
    cut: BTreeSet<(NodeId, NodeId)>,
    noisy: bool,
    /// Snapshot transfers may arrive cut short.
    cut_snapshots: bool,
}

/// State shared with the transports and callbacks that production code calls into.
struct Shared {
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    rng: SeededRandom,
    network: Network,
}

impl Shared {
    fn schedule(&mut self, delay_ms: u64, event: Event) {
        self.seq += 1;
        let at = self.now + delay_ms;
        self.queue.push(Reverse((at, self.seq)));
        self.events.insert(self.seq, event);
    }

    /// One-way network latency; with noise, longer and more varied (so messages reorder).
    fn latency(&mut self) -> u64 {
        if self.network.noisy {
            self.rng.range(1, 40)
        } else {
            self.rng.range(1, 4)
        }
    }

    /// Whether a message from `from` to `to` is lost.
    fn lost(&mut self, from: NodeId, to: NodeId) -> bool {
        self.network.cut.contains(&(from, to)) || (self.network.noisy && self.rng.range(0, 100) < 5)
    }
}

type SharedRef = Arc<Mutex<Shared>>;

struct SimClock {
    now: Arc<AtomicU64>,
    offset_ms: Arc<AtomicI64>,
}

impl Clock for SimClock {
    fn now_unix_ms(&self) -> u64 {
        (EPOCH_UNIX_MS as i64 + self.now.load(Ordering::SeqCst) as i64 + self.offset_ms.load(Ordering::SeqCst)) as u64
    }
    fn monotonic(&self) -> Duration {
        Duration::from_millis(self.now.load(Ordering::SeqCst))
    }
}

struct SimTransport {
    node: NodeId,
    shared: SharedRef,
    root: PathBuf,
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    let mut entries: Vec<_> = std::fs::read_dir(from)?.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

/// Damages a received snapshot copy the way a transfer cut short would: a file truncated or missing.
/// The sender believes it finished (as when the stream just ended early). Returns true.
fn cut_snapshot_short(dir: &Path, rng: &mut SeededRandom) -> bool {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    files.sort();
    if files.is_empty() {
        return true;
    }
    let victim = &files[rng.range(0, files.len() as u64) as usize];
    if rng.range(0, 2) == 0 {
        let _ = std::fs::remove_file(victim);
    } else if let Ok(bytes) = std::fs::read(victim) {
        let _ = std::fs::write(victim, &bytes[..bytes.len() / 2]);
    }
    true
}

impl Transport for SimTransport {
    fn send(&mut self, messages: Vec<OutMessage>) {
        let mut s = self.shared.lock();
        for out in messages {
            let to = out.to_node;
            let lost = s.lost(self.node, to);
            let delay = s.latency();
            if let Some(dir) = out.snapshot_dir {
                // The checkpoint is streamed: the receiver gets its own copy of the files.
                let seq = s.seq;
                let target = self.root.join(format!("n{to}")).join("snapshots-received").join(format!("sim-{seq}"));
                let cut_short = s.network.cut_snapshots && s.rng.range(0, 2) == 0;
                // As the real transport: the sender's manifest travels with the files.
                let manifest = tern_raft::snapshot::Manifest::of_dir(&dir);
                let ok = !lost
                    && copy_dir(&dir, &target).is_ok()
                    && manifest.and_then(|m| m.write_into(&target)).is_ok()
                    && (!cut_short || cut_snapshot_short(&target, &mut s.rng));
                if ok {
                    s.schedule(delay, Event::Raft { to, group: out.group, message: out.message.clone(), snapshot_dir: Some(target) });
                }
                s.schedule(delay, Event::SnapshotReport { node: self.node, group: out.group, to_peer: out.message.to, ok });
                continue;
            }
            if lost {
                continue;
            }
            let duplicate = s.network.noisy && s.rng.range(0, 100) < 2;
            if duplicate {
                let d2 = s.latency();
                s.schedule(d2, Event::Raft { to, group: out.group, message: out.message.clone(), snapshot_dir: None });
            }
            s.schedule(delay, Event::Raft { to, group: out.group, message: out.message, snapshot_dir: None });
        }
    }
}

struct Node {
    id: NodeId,
    dir: PathBuf,
    log: Arc<MemoryLogStore>,
    engines: Arc<MemoryEngineFactory>,
    clock_offset: Arc<AtomicI64>,
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
}

/// One operation a client is working on.
struct Pending {
    hashkey: Vec<u8>,
    input: Input,
    started: u64,
    attempts: u32,
    attempt: u64,
    seq: u64,
    node: NodeId,
}

/// A client identity (client id and sequence numbers) shared by several sessions, as one proxy's
/// or one application's client is shared by its connections: several of its writes are in flight at
/// once, and the floor each carries must never pass another's sequence number.
struct ClientIdentity {
    client_id: u64,
    next_seq: u64,
    /// Sequence numbers of this identity's writes still in flight.
    inflight: BTreeSet<u64>,
}

/// One session of a client: one operation at a time.
struct SimClient {
    /// Index into the world's identities.
    identity: usize,
    rng: SeededRandom,
    leaders: LeaderTable,
    pending: Option<Pending>,
    /// Final verification reads still to issue (after all workload operations).
    verification: Vec<(Vec<u8>, Input)>,
    finished: bool,
}

pub struct World {
    cfg: SimConfig,
    identities: Vec<ClientIdentity>,
    shared: SharedRef,
    now: Arc<AtomicU64>,
    _root: tempfile::TempDir,
    root: PathBuf,
    nodes: Vec<Node>,
    clients: Vec<SimClient>,
    history: Vec<Operation>,
    issued: usize,
    next_attempt: u64,
    policy: RetryPolicy,
    failures: Vec<String>,
    faults: Vec<String>,
    trace_hash: u64,
    events: u64,
    trace_tail: std::collections::VecDeque<String>,
    /// (group, term) -> leader peer seen, for the one-leader-per-term invariant.
    leaders_seen: BTreeMap<(u64, u64), u64>,
    /// (group, index) -> (term, data hash) of every committed entry seen: committed entries never change.
    committed: BTreeMap<(u64, u64), (u64, u64)>,
    /// (node, group) -> highest committed index already compared.
    committed_checked: BTreeMap<(NodeId, u64), u64>,
    healed_at: Option<u64>,
    /// Meta's catalog, when the scheduler runs.
    catalog: Option<tern_meta::catalog::Catalog>,
    /// Since when meta has not heard from each node (None: it hears from it).
    unheard_since: Vec<Option<u64>>,
    meta_down_until: u64,
}

/// Meta declares a node dead after this long without hearing from it (scheduler runs only).
const SIM_NODE_GRACE_MS: u64 = 3_000;
const META_TICK_MS: u64 = 1_000;

const HASHKEYS: [&[u8]; 3] = [b"h0", b"h1", b"h2"];
const SORTKEYS: [&[u8]; 2] = [b"a", b"b"];
const COUNTER: &[u8] = b"n";
/// Records written with a TTL live under this hashkey. The checker has no model of time, so these
/// operations stay out of the history: what checks them is that every replica ends identical (the
/// state machine must expire records by the log's clock, never a node's).
const TTL_HASHKEY: &[u8] = b"ttl";

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
        let root_dir = tempfile::tempdir().expect("temporary directory");
        let root = root_dir.path().to_path_buf();
        let now = Arc::new(AtomicU64::new(0));
        let shared = Arc::new(Mutex::new(Shared {
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            rng: SeededRandom::new(cfg.seed),
            network: Network::default(),
        }));
        let nodes = (1..=cfg.nodes as u64)
            .map(|id| Node {
                id,
                dir: root.join(format!("n{id}")),
                log: Arc::new(MemoryLogStore::default()),
                engines: Arc::new(MemoryEngineFactory::new(Some(tern_raft::keys::is_expired_record))),
                clock_offset: Arc::new(AtomicI64::new(0)),
                store: None,
                epoch: 0,
                paused_until: 0,
                pause_salt: 0,
                disk_faults_armed: 0,
                failed_groups: BTreeSet::new(),
            })
            .collect();
        // Clients know every node: a partition's replicas may move (the client follows hints).
        let replicas: Vec<NodeId> = (1..=cfg.nodes as u64).collect();
        let clients = (0..cfg.clients)
            .map(|i| SimClient {
                identity: i / SESSIONS_PER_CLIENT,
                rng: SeededRandom::new(cfg.seed ^ (0xC11E47 + i as u64)),
                leaders: LeaderTable::new((0..cfg.partitions).map(|p| (replicas.clone(), 1 + (p as u64 % cfg.nodes as u64))).collect()),
                pending: None,
                verification: Vec::new(),
                finished: false,
            })
            .collect();
        // Sequence numbers start a little below a multiple of the exactly-once GC chunk, so every run
        // moves client floors (and removes remembered results) while other writes are in flight.
        let mut seq_rng = SeededRandom::new(cfg.seed ^ 0x5E0);
        let identities = (0..cfg.clients.div_ceil(SESSIONS_PER_CLIENT))
            .map(|i| ClientIdentity {
                client_id: 1000 + i as u64,
                next_seq: tern_raft::apply::DEDUP_GC_CHUNK * (1 + i as u64) - seq_rng.range(10, 200),
                inflight: BTreeSet::new(),
            })
            .collect();
        let mut world = World {
            identities,
            cfg,
            shared,
            now,
            _root: root_dir,
            root,
            nodes,
            clients,
            history: Vec::new(),
            issued: 0,
            next_attempt: 0,
            policy: RetryPolicy { base: Duration::from_millis(20), max: Duration::from_millis(500) },
            failures: Vec::new(),
            faults: Vec::new(),
            trace_hash: 0xcbf2_9ce4_8422_2325,
            events: 0,
            trace_tail: Default::default(),
            leaders_seen: BTreeMap::new(),
            committed: BTreeMap::new(),
            committed_checked: BTreeMap::new(),
            healed_at: None,
            catalog: None,
            unheard_since: Vec::new(),
            meta_down_until: 0,
        };
        if world.cfg.scheduler {
            let mut catalog = tern_meta::catalog::Catalog::default();
            for i in 1..=world.cfg.nodes {
                catalog.register(&format!("n{i}"), "").expect("valid address");
            }
            let first_three: Vec<NodeId> = (1..=3).collect();
            catalog.create_table("t", world.cfg.partitions, 3, &first_three).expect("valid table");
            world.catalog = Some(catalog);
            world.unheard_since = vec![None; world.cfg.nodes];
            world.shared.lock().schedule(META_TICK_MS, Event::MetaTick);
        }
        for i in 0..world.nodes.len() {
            world.start_node(i);
        }
        world.create_partitions();
        world.plan_faults();
        for c in 0..world.clients.len() {
            world.shared.lock().schedule(200 + c as u64, Event::ClientNext { client: c });
        }
        world
    }

    fn store_config(planted: PlantedBugs) -> StoreConfig {
        // Small log thresholds so that compaction and snapshot transfer happen in every run.
        let mut cfg = StoreConfig { tick_interval: Duration::from_millis(TICK_MS), ..Default::default() };
        cfg.replica.log_gc_count_threshold = 50;
        cfg.replica.log_gc_lag_max = 100;
        cfg.replica.log_gc_interval_ticks = 5;
        cfg.replica.expiry_sync_interval_ticks = 20;
        cfg.failed_replica_reopen_ticks = 30;
        cfg.replica.planted = planted;
        cfg
    }

    fn start_node(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        node.epoch += 1;
        let transport = SimTransport { node: node.id, shared: self.shared.clone(), root: self.root.clone() };
        let clock = Arc::new(SimClock { now: self.now.clone(), offset_ms: node.clock_offset.clone() });
        let seed = node_seed(self.cfg.seed, node.id, node.epoch);
        let (log, engines) = (node.log.clone(), node.engines.clone());
        let store = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Store::open(node.id, node.dir.clone(), log, engines, clock, seed, Self::store_config(self.cfg.planted), Box::new(transport))
        }));
        match store {
            Ok(Ok(s)) => node.store = Some(s),
            Ok(Err(e)) => self.failures.push(format!("node {} failed to open its store: {e}", node.id)),
            Err(_) => self.failures.push(format!("node {} panicked while opening its store", node.id)),
        }
        let (id, epoch) = (node.id, node.epoch);
        let offset = self.shared.lock().rng.range(1, TICK_MS);
        self.shared.lock().schedule(offset, Event::Tick { node: id, epoch });
    }

    fn create_partitions(&mut self) {
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
    fn deliver_assignments(&mut self) {
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
    fn meta_hears(&self, index: usize) -> bool {
        let node = &self.nodes[index];
        let now = self.now.load(Ordering::SeqCst);
        let s = self.shared.lock();
        let isolated = (1..=self.cfg.nodes as u64).filter(|o| *o != node.id).all(|o| s.network.cut.contains(&(node.id, o)));
        node.store.is_some() && now >= node.paused_until && !isolated
    }

    /// One pass of meta: liveness with a grace period, progress from replica statuses, the real
    /// scheduler, then assignments to every reachable node.
    fn meta_tick(&mut self) {
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

    /// The fault schedule is drawn up front from the seed, so it can be printed.
    fn plan_faults(&mut self) {
        if !self.cfg.faults {
            return;
        }
        let mut rng = SeededRandom::new(self.cfg.seed ^ 0xFA17);
        let mut t = rng.range(500, 1500);
        let n = self.cfg.nodes as u64;
        let mut planned = Vec::new();
        while t < self.cfg.fault_phase_ms {
            let node = rng.range(1, n + 1);
            let length = rng.range(300, 3000);
            match rng.range(0, 8) {
                0 => {
                    planned.push((t, Fault::Crash(node)));
                    planned.push((t + length, Fault::Restart(node)));
                }
                1 => {
                    planned.push((t, Fault::Isolate(node)));
                    planned.push((t + length, Fault::Heal));
                }
                2 => {
                    let other = 1 + (node % n);
                    planned.push((t, Fault::CutOneWay(node, other)));
                    planned.push((t + length, Fault::Heal));
                }
                3 => planned.push((t, Fault::ClockJump(node, rng.range(0, 20_000) as i64 - 10_000))),
                4 => planned.push((t, Fault::Pause(node, length))),
                5 => {
                    let kind = [DiskFault::LogWrite, DiskFault::LogRead, DiskFault::EngineWrite][rng.range(0, 3) as usize];
                    planned.push((t, Fault::DiskFailure(node, kind)));
                }
                _ => {
                    planned.push((t, Fault::Noise(true)));
                    planned.push((t + length, Fault::Noise(false)));
                }
            }
            t += rng.range(500, 2500);
        }
        if self.cfg.scheduler {
            // Outages long enough for meta to replace replicas, and meta outages, from their own
            // generator so the schedules above stay as they were.
            let mut rng = SeededRandom::new(self.cfg.seed ^ 0x5C4ED);
            let mut t = rng.range(1_000, 3_000);
            while t < self.cfg.fault_phase_ms {
                let node = rng.range(1, n + 1);
                let length = rng.range(4_000, 8_000);
                if rng.range(0, 3) == 0 {
                    planned.push((t, Fault::MetaDown(length / 2)));
                } else {
                    planned.push((t, Fault::Crash(node)));
                    planned.push((t + length, Fault::Restart(node)));
                }
                t += rng.range(3_000, 6_000);
            }
        }
        // Faults added later come from their own generator, so the schedules above stay as they were.
        let mut rng = SeededRandom::new(self.cfg.seed ^ 0xD15C);
        let mut t = rng.range(500, 1500);
        while t < self.cfg.fault_phase_ms {
            let node = rng.range(1, n + 1);
            match rng.range(0, 6) {
                0 => planned.push((t, Fault::DiskFailure(node, DiskFault::EngineRead))),
                1 => planned.push((t, Fault::DiskFailure(node, DiskFault::EngineCorruptRead))),
                2 => {
                    planned.push((t, Fault::CutSnapshots(true)));
                    planned.push((t + rng.range(1_000, 4_000), Fault::CutSnapshots(false)));
                }
                _ => planned.push((t, Fault::Compact(node))),
            }
            t += rng.range(500, 2500);
        }
        // Compactions go on after healing too: what they drop must never matter.
        let mut t = self.cfg.fault_phase_ms;
        while t < self.cfg.fault_phase_ms + 20_000 {
            t += rng.range(1_000, 4_000);
            planned.push((t, Fault::Compact(rng.range(1, n + 1))));
        }
        planned.push((self.cfg.fault_phase_ms, Fault::HealAll));
        let mut s = self.shared.lock();
        for (at, f) in planned {
            self.faults.push(format!("{:>6} ms  {f:?}", at));
            s.schedule(at, Event::Fault(f));
        }
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
        let node = &mut self.nodes[index];
        node.store = None; // pending client callbacks are dropped unanswered
        node.log.crash();
        node.engines.crash();
        node.epoch += 1;
        // An injected disk fault is a one-off: it does not outlive the process it hit.
        node.disk_faults_armed = 0;
        node.log.fail_writes(0);
        node.log.fail_reads(0);
        node.engines.fail_writes(0);
        node.engines.fail_reads(0);
        node.engines.corrupt_reads(0);
    }

    fn trace(&mut self, at: u64, event: &Event) {
        self.events += 1;
        for b in at.to_be_bytes().iter().chain(event.trace_key().to_be_bytes().iter()) {
            self.trace_hash ^= *b as u64;
            self.trace_hash = self.trace_hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        if self.trace_tail.len() == 40 {
            self.trace_tail.pop_front();
        }
        self.trace_tail.push_back(format!("{at:>7} ms  {}", event.describe()));
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
        let verdict = checker::check(&self.history, 2_000_000);
        SimReport {
            seed: self.cfg.seed,
            trace_hash: self.trace_hash,
            events: self.events,
            virtual_ms: end,
            operations: self.history.len(),
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
            _ => 0x7133,
        }
    }

    fn target(event: &Event) -> Option<NodeId> {
        match event {
            Event::Raft { to, .. } => Some(*to),
            Event::SnapshotReport { node, .. } | Event::Tick { node, .. } | Event::Request { node, .. } => Some(*node),
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
                self.with_store(i, |s| {
                    s.tick();
                    s.process_ready();
                });
                self.check_leaders(i);
                self.shared.lock().schedule(TICK_MS, Event::Tick { node, epoch });
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
        }
    }

    fn apply_fault(&mut self, fault: Fault) {
        let shared = self.shared.clone();
        let net = |f: &dyn Fn(&mut Network)| f(&mut shared.lock().network);
        match fault {
            Fault::Crash(node) => {
                let i = self.node_index(node);
                if self.nodes[i].store.is_some() {
                    self.crash(i);
                }
            }
            Fault::Restart(node) => {
                let i = self.node_index(node);
                if self.nodes[i].store.is_none() {
                    self.start_node(i);
                }
            }
            Fault::Isolate(node) => {
                let n = self.cfg.nodes as u64;
                net(&|w: &mut Network| {
                    for other in 1..=n {
                        if other != node {
                            w.cut.insert((node, other));
                            w.cut.insert((other, node));
                        }
                    }
                });
            }
            Fault::CutOneWay(from, to) => net(&|w: &mut Network| {
                w.cut.insert((from, to));
            }),
            Fault::Heal => net(&|w: &mut Network| w.cut.clear()),
            Fault::Noise(on) => net(&|w: &mut Network| w.noisy = on),
            Fault::ClockJump(node, delta) => {
                self.nodes[self.node_index(node)].clock_offset.fetch_add(delta, Ordering::SeqCst);
            }
            Fault::MetaDown(length) => {
                self.meta_down_until = self.now.load(Ordering::SeqCst) + length;
            }
            Fault::Compact(node) => {
                self.nodes[self.node_index(node)].engines.compact_everything();
            }
            Fault::CutSnapshots(on) => net(&|w: &mut Network| w.cut_snapshots = on),
            Fault::Pause(node, length) => {
                let i = self.node_index(node);
                self.nodes[i].paused_until = self.now.load(Ordering::SeqCst) + length;
                self.nodes[i].pause_salt = self.shared.lock().rng.next_u64();
            }
            Fault::DiskFailure(node, kind) => {
                let i = self.node_index(node);
                if self.nodes[i].store.is_some() {
                    self.nodes[i].disk_faults_armed += 1;
                    match kind {
                        DiskFault::LogWrite => self.nodes[i].log.fail_writes(1),
                        DiskFault::LogRead => self.nodes[i].log.fail_reads(1),
                        DiskFault::EngineWrite => self.nodes[i].engines.fail_writes(1),
                        DiskFault::EngineRead => self.nodes[i].engines.fail_reads(1),
                        DiskFault::EngineCorruptRead => self.nodes[i].engines.corrupt_reads(1),
                    }
                }
            }
            Fault::HealAll => {
                net(&|w: &mut Network| {
                    w.cut.clear();
                    w.noisy = false;
                    w.cut_snapshots = false;
                });
                self.meta_down_until = 0;
                for i in 0..self.nodes.len() {
                    self.nodes[i].log.fail_writes(0);
                    self.nodes[i].log.fail_reads(0);
                    self.nodes[i].engines.fail_writes(0);
                    self.nodes[i].engines.fail_reads(0);
                    self.nodes[i].engines.corrupt_reads(0);
                    self.nodes[i].disk_faults_armed = 0;
                    self.nodes[i].paused_until = 0;
                    if self.nodes[i].store.is_none() {
                        self.start_node(i);
                    }
                    self.nodes[i].clock_offset.store(0, Ordering::SeqCst);
                }
                self.healed_at = Some(self.now.load(Ordering::SeqCst));
            }
        }
    }

    fn replica_statuses(&mut self) -> String {
        let mut out = String::new();
        for i in 0..self.nodes.len() {
            let Some(store) = self.nodes[i].store.as_mut() else {
                out.push_str(&format!("\n    node {} down", i + 1));
                continue;
            };
            let (tx, rx) = std::sync::mpsc::channel();
            store.handle(StoreMsg::Status(Box::new(move |s| drop(tx.send(s)))));
            for r in rx.try_recv().unwrap_or_default() {
                out.push_str(&format!(
                    "\n    node {} group {} peer {} leader={} term {} leader_peer {} commit {} applied {} first_log {} voters {:?} learners {:?} {}",
                    i + 1,
                    GroupId(r.group_id),
                    r.peer_id,
                    r.is_leader,
                    r.term,
                    r.leader_peer,
                    r.commit_index,
                    r.applied_index,
                    r.first_log_index,
                    r.voters,
                    r.learners,
                    r.failure
                ));
            }
        }
        out
    }

    /// At most one leader per term per group.
    fn check_leaders(&mut self, index: usize) {
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
                _ => {
                    self.leaders_seen.insert((s.group_id, s.term), s.peer_id);
                }
            }
        }
    }

    /// Committed entries never change: every committed entry a replica holds must equal what any
    /// replica held at that index before.
    fn check_committed_entries(&mut self, index: usize, statuses: &[tern_proto::ReplicaStatus]) {
        let node = self.nodes[index].id;
        for s in statuses {
            let checked = self.committed_checked.get(&(node, s.group_id)).copied().unwrap_or(0);
            let from = checked.max(s.first_log_index.saturating_sub(1)) + 1;
            for i in from..=s.commit_index {
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
            self.committed_checked.insert((node, s.group_id), s.commit_index.max(checked));
        }
    }

    fn serve(&mut self, node: NodeId, client: usize, attempt: u64, request: Request) {
        let i = self.node_index(node);
        let shared = self.shared.clone();
        let reply = move |answer: Answer| {
            let mut s = shared.lock();
            let delay = s.latency();
            s.schedule(delay, Event::Answer { client, attempt, answer });
        };
        self.with_store(i, move |s| {
            match request {
                Request::Write(group, request) => {
                    s.handle(StoreMsg::Write { group, request, callback: Box::new(move |r| reply(Answer::Write(r))) });
                }
                Request::Read(group, request) => {
                    s.handle(StoreMsg::Read { group, request, callback: Box::new(move |r| reply(Answer::Read(r))) });
                }
            }
            s.process_ready();
        });
    }

    fn plan_operation(&mut self, client: usize) -> (Vec<u8>, Input) {
        let c = &mut self.clients[client];
        let rng = &mut c.rng;
        let hashkey = HASHKEYS[rng.range(0, HASHKEYS.len() as u64) as usize].to_vec();
        let sortkey = SORTKEYS[rng.range(0, SORTKEYS.len() as u64) as usize].to_vec();
        let value = format!("c{client}-{}", self.issued).into_bytes();
        if rng.range(0, 100) < 8 {
            // Sets expire within seconds; incrs find the record alive or gone depending on the time
            // the log says it is.
            let input = if rng.range(0, 2) == 0 {
                Input::Set { sortkey: COUNTER.to_vec(), value: b"100".to_vec() }
            } else {
                Input::Incr { sortkey: COUNTER.to_vec(), delta: 1 }
            };
            return (TTL_HASHKEY.to_vec(), input);
        }
        let input = match rng.range(0, 100) {
            0..=29 => Input::Get { sortkey },
            30..=49 => Input::Set { sortkey, value },
            50..=54 => Input::Del { sortkey },
            55..=69 => Input::Incr { sortkey: COUNTER.to_vec(), delta: rng.range(1, 10) as i64 },
            70..=79 => {
                let expected = if rng.range(0, 2) == 0 {
                    None
                } else {
                    Some(format!("c{}-{}", rng.range(0, 4), rng.range(0, self.issued as u64 + 1)).into_bytes())
                };
                Input::CheckAndSet { check_sortkey: SORTKEYS[0].to_vec(), expected, set_sortkey: SORTKEYS[1].to_vec(), value }
            }
            80..=89 => Input::MultiSet { pairs: SORTKEYS.iter().map(|s| (s.to_vec(), value.clone())).collect() },
            _ => Input::MultiGet { sortkeys: SORTKEYS.iter().map(|s| s.to_vec()).chain([COUNTER.to_vec()]).collect() },
        };
        (hashkey, input)
    }

    fn next_operation(&mut self, client: usize) {
        if self.clients[client].pending.is_some() || self.clients[client].finished {
            return;
        }
        let planned = if self.issued < self.cfg.operations {
            self.issued += 1;
            Some(self.plan_operation(client))
        } else if client == 0 && self.healed_at.is_some() {
            // After the workload, one client reads everything back: no acknowledged write may be lost.
            if self.clients[0].verification.is_empty() && !self.history.iter().any(|o| o.client == u64::MAX) {
                let mut v = Vec::new();
                for h in HASHKEYS {
                    v.push((h.to_vec(), Input::MultiGet { sortkeys: SORTKEYS.iter().map(|s| s.to_vec()).chain([COUNTER.to_vec()]).collect() }));
                }
                self.clients[0].verification = v;
                self.history.push(Operation {
                    client: u64::MAX,
                    hashkey: vec![],
                    input: Input::Get { sortkey: vec![] },
                    output: None,
                    call: 0,
                    ret: 0,
                });
            }
            self.clients[0].verification.pop()
        } else if client == 0 && self.issued >= self.cfg.operations {
            // Wait for healing before verifying.
            self.shared.lock().schedule(500, Event::ClientNext { client });
            return;
        } else {
            None
        };
        let Some((hashkey, input)) = planned else {
            self.clients[client].finished = true;
            return;
        };
        let now = self.now.load(Ordering::SeqCst);
        let c = &mut self.clients[client];
        let identity = &mut self.identities[c.identity];
        let seq = identity.next_seq;
        identity.next_seq += 1;
        identity.inflight.insert(seq);
        c.pending = Some(Pending { hashkey, input, started: now, attempts: 0, attempt: 0, seq, node: 0 });
        self.send_attempt(client);
    }

    fn send_attempt(&mut self, client: usize) {
        self.next_attempt += 1;
        let attempt = self.next_attempt;
        let partitions = self.cfg.partitions;
        let c = &mut self.clients[client];
        let identity = &self.identities[c.identity];
        let client_id = identity.client_id;
        // As the real client: the lowest sequence number still in flight for this identity.
        let first_incomplete_seq = identity.inflight.first().copied().unwrap_or(0);
        let p = c.pending.as_mut().expect("pending operation");
        let partition = partition_of(&p.hashkey, partitions);
        let node = c.leaders.leader(partition);
        p.attempt = attempt;
        p.node = node;
        let group = GroupId::new(TABLE_ID, partition);
        let pref = Some(tern_proto::PartitionRef { table_id: TABLE_ID, partition, partition_count: partitions });
        let bytes = |b: &[u8]| bytes::Bytes::copy_from_slice(b);
        let hk = bytes(&p.hashkey);
        let ttl_seconds = if p.hashkey == TTL_HASHKEY { 1 + (p.seq % 3) as u32 } else { 0 };
        let write = |op| Request::Write(group, WriteRequest { partition: pref, client_id, seq: p.seq, first_incomplete_seq, op: Some(op) });
        let read = |op| Request::Read(group, ReadRequest { partition: pref, allow_stale: false, op: Some(op) });
        let request = match &p.input {
            Input::Get { sortkey } => {
                read(read_request::Op::Get(tern_proto::MultiGet { hashkey: hk, sortkeys: vec![bytes(sortkey)], limit: 0, no_value: false }))
            }
            Input::MultiGet { sortkeys } => read(read_request::Op::Get(tern_proto::MultiGet {
                hashkey: hk,
                sortkeys: sortkeys.iter().map(|s| bytes(s)).collect(),
                limit: 0,
                no_value: false,
            })),
            Input::Set { sortkey, value } => write(write_request::Op::Set(tern_proto::MultiSet {
                hashkey: hk,
                values: vec![tern_proto::SortkeyValue { sortkey: bytes(sortkey), value: bytes(value), ttl_seconds, expire_at_ms: 0 }],
            })),
            Input::MultiSet { pairs } => write(write_request::Op::Set(tern_proto::MultiSet {
                hashkey: hk,
                values: pairs
                    .iter()
                    .map(|(s, v)| tern_proto::SortkeyValue { sortkey: bytes(s), value: bytes(v), ttl_seconds: 0, expire_at_ms: 0 })
                    .collect(),
            })),
            Input::Del { sortkey } => write(write_request::Op::Del(tern_proto::MultiDel { hashkey: hk, sortkeys: vec![bytes(sortkey)] })),
            Input::Incr { sortkey, delta } => {
                write(write_request::Op::Incr(tern_proto::Incr { hashkey: hk, sortkey: bytes(sortkey), delta: *delta, ttl_seconds: 0 }))
            }
            Input::CheckAndSet { check_sortkey, expected, set_sortkey, value } => write(write_request::Op::CheckAndSet(tern_proto::CheckAndSet {
                hashkey: hk,
                check_sortkey: bytes(check_sortkey),
                check_type: if expected.is_some() { tern_proto::CheckType::ValueEqual } else { tern_proto::CheckType::ValueNotExist } as i32,
                check_operand: expected.as_deref().map(bytes).unwrap_or_default(),
                set_sortkey: bytes(set_sortkey),
                set_value: bytes(value),
                ..Default::default()
            })),
        };
        let mut s = self.shared.lock();
        // The client-server link shares the nodes' fate: a crashed or unreachable node never answers.
        let delay = s.latency();
        s.schedule(delay, Event::Request { node, client, attempt, request });
        s.schedule(ATTEMPT_TIMEOUT_MS, Event::AttemptTimeout { client, attempt });
    }

    fn on_answer(&mut self, client: usize, attempt: u64, answer: Answer) {
        let Some(p) = self.clients[client].pending.as_ref() else { return };
        if p.attempt != attempt {
            return; // an answer to an attempt the client already gave up on
        }
        let error = match &answer {
            Answer::Write(w) => tern_proto::check(&w.error),
            Answer::Read(r) => tern_proto::check(&r.error),
        };
        match error {
            Err(e) => self.on_error(client, e),
            Ok(()) => {
                let output = match (&p.input, answer) {
                    (Input::Get { .. }, Answer::Read(r)) => Output::Value(r.records.first().map(|r| r.value.to_vec())),
                    (Input::MultiGet { sortkeys }, Answer::Read(r)) => {
                        Output::Values(sortkeys.iter().map(|s| r.records.iter().find(|x| x.sortkey[..] == s[..]).map(|x| x.value.to_vec())).collect())
                    }
                    (Input::Set { .. } | Input::MultiSet { .. }, Answer::Write(_)) => Output::Done,
                    (Input::Del { .. }, Answer::Write(w)) => Output::Existed(w.count > 0),
                    (Input::Incr { .. }, Answer::Write(w)) => Output::Integer(w.new_value),
                    (Input::CheckAndSet { .. }, Answer::Write(w)) => Output::Applied(w.set_done),
                    _ => unreachable!("answer kind matches request kind"),
                };
                self.complete(client, Some(output));
            }
        }
    }

    fn on_error(&mut self, client: usize, error: TernError) {
        let now = self.now.load(Ordering::SeqCst);
        let partitions = self.cfg.partitions;
        let now_meta_up = now >= self.meta_down_until;
        let fresh_route = self.catalog.as_ref().filter(|_| now_meta_up).map(|catalog| {
            // What the real client gets when it refreshes its route from meta.
            let t = &catalog.tables["t"];
            LeaderTable::new(t.partitions.iter().map(|p| (p.peers.iter().map(|(_, n)| *n).collect(), p.preferred_leader)).collect())
        });
        let c = &mut self.clients[client];
        let p = c.pending.as_mut().expect("pending operation");
        let partition = partition_of(&p.hashkey, partitions);
        let reaction = c.leaders.observe(partition, p.node, &error);
        if reaction == tern_client::routing::Reaction::RefreshRoute {
            if let Some(route) = fresh_route {
                c.leaders = route;
            }
        }
        let remaining = Duration::from_millis((p.started + OPERATION_DEADLINE_MS).saturating_sub(now));
        let attempts = p.attempts;
        p.attempts += 1;
        let attempt = p.attempt;
        match next_step(error, attempts, remaining, &self.policy, &mut c.rng) {
            NextStep::Retry(pause) => {
                let mut s = self.shared.lock();
                s.schedule(pause.as_millis() as u64, Event::ClientRetry { client, attempt });
            }
            NextStep::GiveUp(_) => self.complete(client, None),
        }
    }

    /// Records the operation (writes that failed have an unknown outcome; failed reads are dropped).
    fn complete(&mut self, client: usize, output: Option<Output>) {
        let now = self.now.load(Ordering::SeqCst);
        let c = &mut self.clients[client];
        let p = c.pending.take().expect("pending operation");
        self.identities[c.identity].inflight.remove(&p.seq);
        let is_read = matches!(p.input, Input::Get { .. } | Input::MultiGet { .. });
        if (output.is_some() || !is_read) && p.hashkey != TTL_HASHKEY {
            self.history.push(Operation { client: client as u64, hashkey: p.hashkey, input: p.input, output, call: p.started, ret: now });
        }
        let think = c.rng.range(0, 80);
        self.shared.lock().schedule(think, Event::ClientNext { client });
    }

    /// Lets the healed cluster run idle for a while, then checks that every replica of a group has
    /// the same applied index and the same contents. Meta's scheduler may still be moving a replica
    /// when a settling round ends (a replica one entry behind, mid-change): the check is repeated after
    /// further rounds, and only a difference that outlasts them all is a failure.
    fn settle_and_compare_replicas(&mut self) {
        self.history.retain(|o| o.client != u64::MAX);
        for round in 1..=SETTLE_ROUNDS_MAX {
            self.settle(5_000);
            if !self.failures.is_empty() || self.nodes.iter().any(|n| n.store.is_none()) {
                return;
            }
            let differences = self.replica_differences();
            if differences.is_empty() {
                return;
            }
            if round == SETTLE_ROUNDS_MAX {
                let statuses = self.replica_statuses();
                for (group, replicas) in differences {
                    self.failures.push(format!("replicas of group {} differ after settling: {replicas:?}{statuses}", GroupId(group)));
                    self.dump_replicas(group);
                }
            }
        }
    }

    /// Runs everything but new client operations and faults (restarts excepted) for `ms`.
    fn settle(&mut self, ms: u64) {
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
    fn replica_differences(&mut self) -> Vec<(u64, Vec<ReplicaSum>)> {
        let mut by_group: BTreeMap<u64, Vec<ReplicaSum>> = BTreeMap::new();
        for i in 0..self.nodes.len() {
            for p in 0..self.cfg.partitions {
                let group = GroupId::new(TABLE_ID, p);
                let (tx, rx) = std::sync::mpsc::channel();
                self.with_store(i, |s| {
                    s.handle(StoreMsg::Checksum { group, callback: Box::new(move |r| drop(tx.send(r))) });
                });
                if let Ok(Ok((applied, sum, _))) = rx.try_recv() {
                    by_group.entry(group.0).or_default().push((self.nodes[i].id, applied, sum));
                }
            }
        }
        let mut differences = Vec::new();
        for (group, mut replicas) in by_group {
            let expected = match &self.catalog {
                None => self.nodes.len(),
                Some(c) => {
                    // Only the voters meta lists must agree; a replica being destroyed may lag.
                    let voters: Vec<NodeId> = c.tables["t"].partitions[GroupId(group).partition() as usize].peers.iter().map(|(_, n)| *n).collect();
                    replicas.retain(|r| voters.contains(&r.0));
                    voters.len()
                }
            };
            let first = replicas[0];
            if replicas.len() != expected || replicas.iter().any(|r| (r.1, r.2) != (first.1, first.2)) {
                differences.push((group, replicas));
            }
        }
        differences
    }

    /// With TERN_SIM_DUMP=1, prints every replica's records of a group, to see what differs.
    fn dump_replicas(&self, group: u64) {
        if std::env::var("TERN_SIM_DUMP").is_err() {
            return;
        }
        for node in &self.nodes {
            let dir = node.dir.join("replicas").join(group.to_string());
            let Ok(meta) = tern_raft::replica::ReplicaMeta::load(&dir) else { continue };
            use tern_engine::EngineFactory as _;
            let Ok(engine) = node.engines.open(&dir.join(&meta.engine_dir)) else { continue };
            eprintln!("--- node {} engine {}", node.id, meta.engine_dir);
            let _ = engine.scan(b"", None, &mut |k, v| {
                eprintln!("  {:?} = {:?}", String::from_utf8_lossy(k), String::from_utf8_lossy(v));
                true
            });
        }
    }
}

/// Runs one seed.
pub fn run(cfg: SimConfig) -> SimReport {
    World::new(cfg).run()
}
