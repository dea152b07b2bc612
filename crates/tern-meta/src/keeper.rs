//! The catalog keeper: everything a meta node decides about the catalog it keeps in memory and in
//! its raft group. It follows the group's leadership (a new term of leadership reloads the catalog
//! through raft and writes a barrier before answering), writes every change as conditional writes
//! on the catalog's version, confirms it still leads before answering a heartbeat, tracks liveness
//! and runs the scheduler.
//!
//! It talks to the world only through `KeeperIo` (reads, writes and statuses of the catalog group,
//! a clock), so the service runs it over a real store and the simulator runs the same code over its
//! simulated meta nodes, with their crashes, pauses, partitions and leader changes.

use crate::catalog::{Catalog, NodeRecord, RoutingChange, TableRecord};
use crate::records::{self, Change, Loaded, CATALOG_HASHKEY, VERSION};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tern_core::time::Clock;
use tern_core::{GroupId, NodeId, TableId, TernError};
use tern_proto::*;
use tern_raft::meta_link::ServerReport;

/// The raft group that holds the catalog (its records are laid out by `records`).
pub const CATALOG_GROUP: GroupId = GroupId(0);
/// How long a catalog write or read through raft may take (a write that times out may still
/// commit later).
pub const CATALOG_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Times a load starts over because the catalog changed while it was read page by page.
const LOAD_ATTEMPTS_MAX: usize = 5;
/// A record never written: reading it confirms leadership without moving the catalog.
const LEADER_PROBE_KEY: &[u8] = b"leader-probe";

pub type IoFuture<T> = Pin<Box<dyn Future<Output = Result<T, TernError>> + Send>>;

/// How the keeper reaches the catalog group's store on its own meta node, and its clock. Every call
/// resolves within `CATALOG_IO_TIMEOUT` (a timeout is `TernError::Timeout`; a stopped store
/// `Unavailable`).
pub trait KeeperIo: Send + Sync + 'static {
    /// A linearizable read in the catalog group.
    fn read(&self, request: ReadRequest) -> IoFuture<ReadResponse>;
    /// A write through the catalog group's raft log, answered once applied.
    fn write(&self, request: WriteRequest) -> IoFuture<WriteResponse>;
    /// The statuses of this node's replicas (the catalog group's among them).
    fn statuses(&self) -> IoFuture<Vec<ReplicaStatus>>;
    /// This meta node's clock (monotonic time judges liveness).
    fn clock(&self) -> &dyn Clock;
}

struct NodeLiveness {
    /// Monotonic time of the last heartbeat.
    last_seen: Duration,
    /// The server's replica statuses and what this meta node last answered it (heartbeats carry
    /// only what changed: `tern_raft::meta_link`).
    report: ServerReport,
    disk_used_bytes: u64,
    requests_per_second: f64,
    /// Duplication progress of the partitions the node leads.
    duplication_status: Vec<tern_proto::DupPartitionStatus>,
}

struct State {
    catalog: Catalog,
    /// The version of the catalog records `catalog` was read from or last written as; every write
    /// is conditional on it.
    version: u64,
    liveness: HashMap<NodeId, NodeLiveness>,
    /// Monotonic time this node last became meta leader (liveness is judged only a grace period
    /// after it).
    leader_since: Duration,
    /// The raft term in which the catalog in memory was loaded (the leader's term).
    leader_term: u64,
    /// Heartbeat answers this process has given: with the leader's term, each answer's token,
    /// never given twice (not after a reload in the same term either, nor by another meta leader,
    /// which leads another term).
    answers_given: u64,
    /// Every node's assignments in `catalog`, made at the first heartbeat after it changed and
    /// shared by the answers until it changes again.
    assignments: Option<HashMap<NodeId, Arc<Vec<ReplicaAssignment>>>>,
    /// How routing changed in each catalog version after `routing_base` (the last
    /// `ROUTING_LOG_MAX` that changed any), so that a client holding a table as of one of them is
    /// sent only the partitions that changed since.
    routing_log: VecDeque<(u64, BTreeMap<TableId, RoutingChange>)>,
    routing_base: u64,
}

/// Catalog versions with routing changes remembered (`State::routing_log`).
const ROUTING_LOG_MAX: usize = 1024;

/// One meta node's keeper of the catalog. Clones share it.
#[derive(Clone)]
pub struct Keeper {
    state: Arc<Mutex<State>>,
    /// Serialises catalog changes: each is computed on the current catalog, written through raft,
    /// then installed.
    changes: Arc<tokio::sync::Mutex<()>>,
    io: Arc<dyn KeeperIo>,
    /// Whether this node answers: it leads the catalog group and holds the catalog raft has.
    serving: Arc<AtomicBool>,
    /// A server silent for this long is reported as down.
    grace: Duration,
}

fn catalog_ref() -> Option<PartitionRef> {
    Some(PartitionRef { table_id: 0, partition: 0, partition_count: 1 })
}

impl Keeper {
    pub fn new(io: Arc<dyn KeeperIo>, grace: Duration) -> Keeper {
        Keeper {
            state: Arc::new(Mutex::new(State {
                catalog: Catalog::default(),
                version: 0,
                liveness: HashMap::new(),
                leader_since: Duration::ZERO,
                leader_term: 0,
                answers_given: 1,
                assignments: None,
                routing_log: VecDeque::new(),
                routing_base: u64::MAX,
            })),
            changes: Arc::new(tokio::sync::Mutex::new(())),
            io,
            serving: Arc::new(AtomicBool::new(false)),
            grace,
        }
    }

    /// Whether this node leads and answers (else callers try another meta node).
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }

    pub fn check_serving(&self) -> Result<(), TernError> {
        if self.serving() {
            Ok(())
        } else {
            Err(TernError::Unavailable("this meta node is not the leader".into()))
        }
    }

    fn now(&self) -> Duration {
        self.io.clock().monotonic()
    }

    /// Writes changes to the catalog through raft, as conditional writes starting at `version` (see
    /// `records`); returns the version after them, once a majority has them and they are applied.
    /// A failed write, or one whose outcome is unknown (it timed out, but may still commit), leaves
    /// the catalog in memory untrustworthy: this node stops answering until it has read the catalog
    /// back through raft (`follow_leadership` reloads it). Were a later change computed on the stale
    /// copy anyway, its version check would refuse it.
    async fn persist(&self, version: u64, changes: Vec<Change>) -> Result<u64, TernError> {
        let mut at = version;
        for write in records::writes(changes) {
            if let Err(e) = self.write_records(at, write).await {
                self.serving.store(false, Ordering::SeqCst);
                return Err(e);
            }
            at += 1;
        }
        Ok(at)
    }

    /// One atomic write of catalog records, applied only if the catalog is still at `version`.
    async fn write_records(&self, version: u64, changes: Vec<Change>) -> Result<(), TernError> {
        let (check_type, check_operand) =
            if version == 0 { (CheckType::ValueNotExist, Vec::new()) } else { (CheckType::ValueEqual, version.to_be_bytes().to_vec()) };
        let bump = Mutation { sortkey: VERSION.to_vec().into(), value: (version + 1).to_be_bytes().to_vec().into(), ..Default::default() };
        let mutations = std::iter::once(bump)
            .chain(changes.into_iter().map(|c| match c {
                Change::Set(k, v) => Mutation { sortkey: k.into(), value: v.into(), ..Default::default() },
                Change::Delete(k) => Mutation { sortkey: k.into(), delete: true, ..Default::default() },
            }))
            .collect();
        let request = WriteRequest {
            partition: catalog_ref(),
            op: Some(write_request::Op::CheckAndMutate(CheckAndMutate {
                hashkey: CATALOG_HASHKEY.to_vec().into(),
                check_sortkey: VERSION.to_vec().into(),
                check_type: check_type as i32,
                check_operand: check_operand.into(),
                mutations,
                return_check_value: false,
            })),
            ..Default::default()
        };
        let r = self.io.write(request).await?;
        tern_proto::check(&r.error)?;
        if !r.set_done {
            return Err(TernError::Unavailable(format!("the catalog changed after version {version} was read; this meta node reloads it")));
        }
        Ok(())
    }

    /// The term in which this node leads the catalog group, if it does.
    async fn leading_term(&self) -> Option<u64> {
        let statuses = self.io.statuses().await.ok()?;
        statuses.iter().find(|r| r.group_id == CATALOG_GROUP.0 && r.is_leader).map(|r| r.term)
    }

    /// Confirms this node still leads the catalog group, through raft's linearizable read path (a
    /// lease while one is held, else a read-index round), in the same term it loaded its catalog in,
    /// before it answers from memory: a deposed leader, or one that lost and regained leadership
    /// since, must not hand out assignments a newer leader has changed.
    async fn confirm_leader(&self) -> Result<(), TernError> {
        let probe = read_request::Op::Get(MultiGet {
            hashkey: LEADER_PROBE_KEY.to_vec().into(),
            sortkeys: vec![Default::default()],
            limit: 0,
            no_value: false,
        });
        self.read_catalog_group(probe).await?;
        let loaded = self.state.lock().leader_term;
        match self.leading_term().await {
            Some(term) if term == loaded => Ok(()),
            _ => Err(TernError::Unavailable(format!("leadership changed since the catalog was loaded in term {loaded}"))),
        }
    }

    /// Reads the catalog through raft (linearizable: sees every change a previous leader committed),
    /// page by page; starts over if its version moved meanwhile (a write of this node's whose
    /// outcome was unknown may commit during the read).
    async fn load(&self) -> Result<Loaded, TernError> {
        for _ in 0..LOAD_ATTEMPTS_MAX {
            let version_op = read_request::Op::Get(MultiGet {
                hashkey: CATALOG_HASHKEY.to_vec().into(),
                sortkeys: vec![VERSION.to_vec().into()],
                limit: 0,
                no_value: false,
            });
            let before = match self.read_catalog_group(version_op).await?.records.first() {
                Some(r) => u64::from_be_bytes(r.value[..].try_into().map_err(|_| TernError::Corruption("catalog version is not 8 bytes".into()))?),
                None => 0,
            };
            let mut records = Vec::new();
            let mut start = Vec::new();
            loop {
                let page = read_request::Op::Scan(Scan {
                    hashkey: CATALOG_HASHKEY.to_vec().into(),
                    start: start.into(),
                    limit: tern_core::limits::READ_RECORDS_MAX,
                    ..Default::default()
                });
                let r = self.read_catalog_group(page).await?;
                records.extend(r.records.into_iter().map(|r| (r.sortkey.to_vec(), r.value.to_vec())));
                if r.resume.is_empty() {
                    break;
                }
                start = r.resume.to_vec();
            }
            // A write between two pages may tear the records: compare versions before decoding.
            if records::version_of(&records)? == before {
                return records::decode(records);
            }
        }
        Err(TernError::Unavailable(format!("the catalog changed during each of {LOAD_ATTEMPTS_MAX} reads")))
    }

    /// A linearizable read in the catalog group.
    async fn read_catalog_group(&self, op: read_request::Op) -> Result<ReadResponse, TernError> {
        let r = self.io.read(ReadRequest { partition: catalog_ref(), allow_stale: false, op: Some(op) }).await?;
        tern_proto::check(&r.error)?;
        Ok(r)
    }

    /// One look at the catalog group's raft leadership (the service looks every 100 ms): on a new
    /// term of leadership, reads the catalog and starts answering; on losing it, stops.
    pub async fn follow_leadership(&self) {
        let term = self.leading_term().await;
        let was = self.serving();
        // A new term of leadership (also one regained between two looks) starts from the catalog as
        // raft has it: a leader in between may have changed it.
        let fresh = term.is_some_and(|t| !was || t != self.state.lock().leader_term);
        if fresh {
            self.serving.store(false, Ordering::SeqCst);
            // No change of this node's is in flight while the catalog is reloaded and installed.
            let _serial = self.changes.lock().await;
            match self.load_and_clean_up().await {
                Ok((catalog, version)) => {
                    let now = self.now();
                    let mut state = self.state.lock();
                    state.catalog = catalog;
                    state.version = version;
                    state.assignments = None;
                    state.routing_log.clear();
                    state.routing_base = version;
                    state.liveness.clear();
                    state.leader_since = now;
                    state.leader_term = term.expect("leads");
                    self.serving.store(true, Ordering::SeqCst);
                    tracing::info!(term = state.leader_term, "this meta node is now the leader");
                }
                Err(e) => tracing::warn!("became meta leader but cannot read the catalog yet: {e}"),
            }
        } else if term.is_none() && was {
            self.serving.store(false, Ordering::SeqCst);
            tracing::info!("this meta node is no longer the leader");
        }
    }

    /// Loads the catalog, writes what its records still owe (see `Loaded::cleanup`), then writes a
    /// barrier: a conditional write that only bumps the version. It commits after every entry
    /// already in the log (a write of this node's that timed out but is still pending, or one left
    /// by an earlier leader), so if it succeeds none of them changed the catalog after it was read;
    /// if one did, the barrier is refused and the catalog is read again.
    async fn load_and_clean_up(&self) -> Result<(Catalog, u64), TernError> {
        let loaded = self.load().await?;
        let version = self.persist(loaded.version, loaded.cleanup).await?;
        self.write_records(version, Vec::new()).await?;
        Ok((loaded.catalog, version + 1))
    }

    /// Installs a catalog written as `version` (under the `changes` lock, so no reload is in between).
    fn install(&self, catalog: Catalog, version: u64) {
        let mut state = self.state.lock();
        let changes = crate::catalog::routing_changes(&state.catalog, &catalog);
        if !changes.is_empty() {
            state.routing_log.push_back((version, changes));
            while state.routing_log.len() > ROUTING_LOG_MAX {
                let (dropped, _) = state.routing_log.pop_front().expect("not empty");
                state.routing_base = dropped;
            }
        }
        state.catalog = catalog;
        state.version = version;
        state.assignments = None;
    }

    /// Applies a change to a copy of the catalog, writes it through raft, then installs it.
    pub async fn change<T>(&self, f: impl FnOnce(&mut Catalog, &[NodeId]) -> Result<T, TernError>) -> Result<T, TernError> {
        let _serial = self.changes.lock().await;
        self.check_serving()?;
        self.confirm_leader().await?;
        let (next, out, base, changes) = {
            let state = self.state.lock();
            let alive = self.alive_nodes(&state);
            let mut next = state.catalog.clone();
            let out = f(&mut next, &alive)?;
            let changes = records::diff(&state.catalog, &next);
            (next, out, state.version, changes)
        };
        let version = self.persist(base, changes).await?;
        self.install(next, version);
        Ok(out)
    }

    /// A scheduling pass (leader only, and only a grace period after becoming leader, so that
    /// servers are not mistaken for dead before their first heartbeat to this leader); `step` runs
    /// balancing even while the balancer is paused (an operator's manual step). Returns what it
    /// decided, once written.
    pub async fn schedule_pass(&self, step: bool) -> Result<Vec<String>, TernError> {
        let _serial = self.changes.lock().await;
        let (next, changes, base, records) = {
            let state = self.state.lock();
            if !self.serving() || !crate::catalog::may_schedule(self.now().saturating_sub(state.leader_since), self.grace) {
                return Ok(Vec::new());
            }
            let alive = self.alive_nodes(&state);
            let statuses = state.liveness.iter().filter(|(node, _)| alive.contains(node)).flat_map(|(_, l)| l.report.statuses.values());
            let mut next = state.catalog.clone();
            let changes = next.scheduling_pass(&alive, statuses, step);
            let records = records::diff(&state.catalog, &next);
            (next, changes, state.version, records)
        };
        if changes.is_empty() {
            return Ok(changes);
        }
        let version = self.persist(base, records).await?;
        self.install(next, version);
        for c in &changes {
            tracing::info!("scheduler: {c}");
        }
        Ok(changes)
    }

    /// Registers a server (a fresh cluster gets `fresh_cluster_id`): its node id and the cluster id.
    pub async fn register(&self, address: &str, zone: &str, leader_priority: i32, fresh_cluster_id: u64) -> Result<(NodeId, u64), TernError> {
        let (node_id, cluster_id) = self
            .change(|c, _| {
                if c.cluster_id == 0 {
                    c.cluster_id = fresh_cluster_id;
                }
                c.register_with_priority(address, zone, leader_priority).map(|id| (id, c.cluster_id))
            })
            .await?;
        let now = self.now();
        self.state.lock().liveness.insert(
            node_id,
            NodeLiveness {
                last_seen: now,
                report: ServerReport::default(),
                disk_used_bytes: 0,
                requests_per_second: 0.0,
                duplication_status: vec![],
            },
        );
        Ok((node_id, cluster_id))
    }

    /// Takes a server's heartbeat and answers with its assignments. `Err` means this node cannot
    /// answer (it does not lead, or cannot confirm it still does): the server tries another meta
    /// node. A server meta does not know is answered with an error in the response.
    pub async fn heartbeat(&self, hb: HeartbeatRequest) -> Result<HeartbeatResponse, TernError> {
        self.check_serving()?;
        self.confirm_leader().await.map_err(|e| TernError::Unavailable(format!("this meta node cannot confirm it still leads ({e})")))?;
        let known = self.state.lock().catalog.nodes.get(&hb.node_id).cloned();
        let Some(record) = known else {
            let e = TernError::invalid(format!("node {} is not registered with this meta server", hb.node_id));
            return Ok(HeartbeatResponse { error: Some(e.into()), ..Default::default() });
        };
        if record.address != hb.address || record.zone != hb.zone || record.leader_priority != hb.leader_priority {
            // A server restarted on a new address (or zone): remember it so peers and clients find it.
            let (id, address, zone, leader_priority) = (hb.node_id, hb.address.clone(), hb.zone.clone(), hb.leader_priority);
            if let Err(e) = self
                .change(|c, _| {
                    c.nodes.insert(id, NodeRecord { address, zone, leader_priority });
                    Ok(())
                })
                .await
            {
                return Ok(HeartbeatResponse { error: Some(e.into()), ..Default::default() });
            }
        }
        let now = self.now();
        let mut state = self.state.lock();
        // A failed write while this answer was prepared leaves the catalog in memory untrustworthy.
        self.check_serving()?;
        let requests_per_second = if hb.requests_interval_ms > 0 { hb.requests as f64 * 1000.0 / hb.requests_interval_ms as f64 } else { 0.0 };
        let mut hb = hb;
        let token = (state.leader_term << 40) | state.answers_given;
        state.answers_given += 1;
        let mut answer = state.catalog.heartbeat_answer_without_assignments(hb.node_id);
        let State { catalog, assignments, .. } = &mut *state;
        let by_node = assignments.get_or_insert_with(|| catalog.assignments_by_node());
        let assigned = by_node.get(&hb.node_id).cloned().unwrap_or_default();
        let live = state.liveness.entry(hb.node_id).or_insert_with(|| NodeLiveness {
            last_seen: now,
            report: ServerReport::default(),
            disk_used_bytes: 0,
            requests_per_second: 0.0,
            duplication_status: vec![],
        });
        live.last_seen = now;
        live.disk_used_bytes = hb.disk_used_bytes;
        live.requests_per_second = requests_per_second;
        live.duplication_status = std::mem::take(&mut hb.duplication_status);
        live.report.answer(&mut hb, &mut answer, assigned, token);
        answer.nodes = self.node_infos(&state);
        Ok(answer)
    }

    /// The cluster's id (0 until the first server registers).
    pub fn cluster_id(&self) -> u64 {
        self.state.lock().catalog.cluster_id
    }

    /// A copy of the catalog in memory (what this node answers from).
    pub fn catalog(&self) -> Catalog {
        self.state.lock().catalog.clone()
    }

    pub fn table(&self, name: &str) -> Result<TableInfo, TernError> {
        self.table_since(name, 0)
    }

    /// A table as clients route by it, for a client that holds it as of routing version `known`
    /// (0: none): only the partitions whose routing changed since, when this node remembers every
    /// change since then (`ROUTING_LOG_MAX` versions, all of its own leadership); else all of them.
    pub fn table_since(&self, name: &str, known: u64) -> Result<TableInfo, TernError> {
        let state = self.state.lock();
        let alive = self.alive_nodes(&state);
        let t = state.catalog.table(name)?;
        let mut info = table_info(&state, t, &alive);
        if known != 0 && known >= state.routing_base && known <= state.version {
            let mut changed = BTreeSet::new();
            let mut whole = false;
            for (_, changes) in state.routing_log.iter().filter(|(v, _)| *v > known) {
                match changes.get(&t.id) {
                    Some(RoutingChange::Whole) => whole = true,
                    Some(RoutingChange::Partitions(p)) => changed.extend(p.iter().copied()),
                    None => {}
                }
            }
            if !whole {
                info.partitions.retain(|p| changed.contains(&p.index));
                info.partitions_delta = true;
            }
        }
        Ok(info)
    }

    /// A table as clients see it (with the leaders last reported).
    pub fn describe(&self, t: &TableRecord) -> TableInfo {
        let state = self.state.lock();
        let alive = self.alive_nodes(&state);
        table_info(&state, t, &alive)
    }

    pub fn tables(&self) -> Vec<TableInfo> {
        let state = self.state.lock();
        let alive = self.alive_nodes(&state);
        state.catalog.tables.values().map(|t| table_info(&state, t, &alive)).collect()
    }

    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.node_infos(&self.state.lock())
    }

    /// Duplications (of one table, or all), each with every partition's progress as its leader
    /// last reported it (the freshest report wins when leadership moved).
    pub fn duplications(&self, table: &str) -> Result<Vec<tern_proto::Duplication>, TernError> {
        let state = self.state.lock();
        let now = self.now();
        let tables: Vec<&TableRecord> = if table.is_empty() { state.catalog.tables.values().collect() } else { vec![state.catalog.table(table)?] };
        // (duplication, partition) -> the freshest report, in one pass over every node's reports.
        let mut freshest: HashMap<(u64, u32), (Duration, NodeId, &tern_proto::DupPartitionStatus)> = HashMap::new();
        for (node, l) in &state.liveness {
            for s in &l.duplication_status {
                let e = freshest.entry((s.dup_id, s.partition)).or_insert((l.last_seen, *node, s));
                if l.last_seen > e.0 {
                    *e = (l.last_seen, *node, s);
                }
            }
        }
        let mut out = Vec::new();
        for t in tables {
            for d in &t.duplications {
                let mut info = d.to_proto(t);
                for p in 0..t.partition_count {
                    info.partitions.push(match freshest.get(&(d.id, p)).copied() {
                        Some((seen, node, s)) => tern_proto::DupPartitionStatus {
                            leader_node: node,
                            reported_ms_ago: now.saturating_sub(seen).as_millis() as u64,
                            ..s.clone()
                        },
                        None => tern_proto::DupPartitionStatus {
                            dup_id: d.id,
                            table_id: t.id,
                            partition: p,
                            error: "no report from a leader yet".into(),
                            ..Default::default()
                        },
                    });
                }
                out.push(info);
            }
        }
        Ok(out)
    }

    /// Every partition of a table with the statuses its live replicas last reported.
    pub fn partition_status(&self, name: &str) -> Result<Vec<PartitionStatus>, TernError> {
        let state = self.state.lock();
        let alive = self.alive_nodes(&state);
        let table = table_info(&state, state.catalog.table(name)?, &alive);
        let now = self.now();
        Ok(table
            .partitions
            .iter()
            .map(|p| {
                let group = GroupId::new(table.table_id, p.index).0;
                let replicas = p
                    .peers
                    .iter()
                    .filter_map(|peer| {
                        state
                            .liveness
                            .get(&peer.node_id)
                            .filter(|l| now.saturating_sub(l.last_seen) < self.grace)
                            .and_then(|l| l.report.statuses.get(&group).cloned())
                    })
                    .collect();
                PartitionStatus { index: p.index, leader_node: p.leader_node, peers: p.peers.clone(), replicas }
            })
            .collect())
    }

    /// The balancer's state: whether it is paused, replicas on their way (learners), and partitions
    /// with a replica on a node that is down.
    pub fn balance_summary(&self) -> BalanceResponse {
        let state = self.state.lock();
        let alive = self.alive_nodes(&state);
        let (mut moves, mut under) = (0, 0);
        for p in state.catalog.tables.values().flat_map(|t| t.partitions.iter()) {
            moves += p.learners.len() as u32;
            under += p.peers.iter().any(|(_, n)| !alive.contains(n)) as u32;
        }
        BalanceResponse { error: None, paused: state.catalog.balancer_paused, moves_in_flight: moves, under_replicated: under }
    }

    fn alive_nodes(&self, state: &State) -> Vec<NodeId> {
        let now = self.now();
        crate::catalog::alive_nodes(&state.catalog, |id| state.liveness.get(&id).map(|l| now.saturating_sub(l.last_seen)), self.grace)
    }

    fn node_infos(&self, state: &State) -> Vec<NodeInfo> {
        let now = self.now();
        state
            .catalog
            .nodes
            .iter()
            .map(|(id, n)| {
                let live = state.liveness.get(id);
                let ago = live.map(|l| now.saturating_sub(l.last_seen)).unwrap_or(Duration::MAX);
                NodeInfo {
                    node_id: *id,
                    address: n.address.clone(),
                    alive: ago < self.grace,
                    last_heartbeat_ms_ago: ago.as_millis().min(u64::MAX as u128) as u64,
                    replica_count: live.map(|l| l.report.statuses.len() as u32).unwrap_or(0),
                    leader_count: live.map(|l| l.report.statuses.values().filter(|r| r.is_leader).count() as u32).unwrap_or(0),
                    hibernating_count: live.map(|l| l.report.statuses.values().filter(|r| r.hibernating).count() as u32).unwrap_or(0),
                    draining: state.catalog.draining.contains(id),
                    zone: n.zone.clone(),
                    disk_used_bytes: live.map(|l| l.disk_used_bytes).unwrap_or(0),
                    requests_per_second: live.map(|l| l.requests_per_second).unwrap_or(0.0),
                }
            })
            .collect()
    }

    #[cfg(test)]
    pub(crate) async fn persist_for_test(&self, version: u64, changes: Vec<Change>) -> Result<u64, TernError> {
        self.persist(version, changes).await
    }

    #[cfg(test)]
    pub(crate) fn snapshot_for_test(&self) -> (Catalog, u64) {
        let state = self.state.lock();
        (state.catalog.clone(), state.version)
    }
}

fn table_info(state: &State, t: &TableRecord, alive: &[NodeId]) -> TableInfo {
    let leaders = leader_nodes(state);
    let split = t.split.as_ref().map(|s| {
        let progress = crate::catalog::group_progress(
            state.liveness.iter().filter(|(node, _)| alive.contains(node)).flat_map(|(_, l)| l.report.statuses.values()),
        );
        SplitStatus {
            partition_count: s.partition_count,
            switching: s.switching,
            started_unix_ms: s.started_unix_ms,
            partitions_split: t.partitions_split(),
            waiting_for: t.split_waiting_for(alive, &progress),
        }
    });
    let half = t.partition_count as usize;
    TableInfo {
        table_id: t.id,
        name: t.name.clone(),
        partition_count: t.partition_count,
        replica_count: t.replica_count,
        backup_policy: t.backup_policy.as_ref().map(|p| p.to_proto()),
        restoring: t.restoring,
        partitions: t
            .partitions
            .iter()
            .enumerate()
            .map(|(i, p)| {
                // A pending child's hashkeys go to its parent, and it will start on the parent's
                // replicas: the parent's peers and leader now (repairs go on while it splits).
                let serving = if p.split_pending { i - half } else { i };
                let peers = &t.partitions[serving].peers;
                PartitionInfo {
                    index: i as u32,
                    peers: peers.iter().map(|(peer_id, node_id)| PeerInfo { peer_id: *peer_id, node_id: *node_id }).collect(),
                    leader_node: leaders.get(&GroupId::new(t.id, serving as u32).0).map(|(_, n)| *n).unwrap_or(p.preferred_leader),
                    split_pending: p.split_pending,
                }
            })
            .collect(),
        split,
        routing_version: state.version,
        partitions_delta: false,
        partitions_total: t.partitions.len() as u32,
    }
}

/// group -> (term, node) of the replica that most recently reported leadership (highest term).
fn leader_nodes(state: &State) -> HashMap<u64, (u64, NodeId)> {
    let mut out: HashMap<u64, (u64, NodeId)> = HashMap::new();
    for (node, l) in &state.liveness {
        for r in l.report.statuses.values().filter(|r| r.is_leader) {
            let e = out.entry(r.group_id).or_insert((r.term, *node));
            if r.term > e.0 {
                *e = (r.term, *node);
            }
        }
    }
    out
}
