//! The meta gRPC service. The catalog is replicated: every meta node runs a one-group raft store
//! (the same `tern_raft::store::Store` partitions use, over raft-engine and RocksDB) whose state
//! machine holds the catalog; the raft leader is the meta leader. Only the leader answers (others
//! answer UNAVAILABLE so callers try the next address); it keeps the catalog in memory, writes every
//! change through raft before acknowledging it, tracks heartbeats and runs the scheduler.

use crate::catalog::{Catalog, TableRecord};
use crate::records::{self, Change, Loaded, CATALOG_HASHKEY, VERSION};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_core::{GroupId, NodeId, TernError};
use tern_proto::meta_server::{Meta, MetaServer};
use tern_proto::*;
use tern_raft::store::{self, ReplicaSpec, Store, StoreConfig, StoreHandle, StoreMsg};
use tokio::sync::{oneshot, watch};
use tonic::{Request, Response, Status};

#[derive(Clone, Debug)]
pub struct MetaConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// A server silent for this long is reported as down.
    pub node_grace: Duration,
    /// This meta node's id among `peers` (1-based).
    pub id: u64,
    /// Every meta node (id, address), this one included. Empty: a single meta node at `listen`.
    pub peers: Vec<(u64, String)>,
    /// The cluster's raft timing, which every server adopts (servers configured otherwise are
    /// refused): one raft tick, and ticks without a leader before an election.
    pub raft_tick: Duration,
    pub election_ticks: u32,
}

/// Raft timing limits (a tick between 1 ms and 10 s; 5 to 100 ticks to an election).
pub const RAFT_TICK_MS_MAX: u64 = 10_000;
pub const ELECTION_TICKS_MIN: u32 = 5;
pub const ELECTION_TICKS_MAX: u32 = 100;

impl MetaConfig {
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> MetaConfig {
        MetaConfig {
            data_dir,
            listen,
            node_grace: Duration::from_secs(10),
            id: 1,
            peers: vec![],
            raft_tick: StoreConfig::default().tick_interval,
            election_ticks: StoreConfig::default().replica.election_tick as u32,
        }
    }

    pub fn validate(&self) -> Result<(), TernError> {
        if self.node_grace.is_zero() {
            return Err(TernError::invalid("node grace period must be positive"));
        }
        if self.raft_tick.is_zero()
            || self.raft_tick > Duration::from_millis(RAFT_TICK_MS_MAX)
            || !self.raft_tick.subsec_micros().is_multiple_of(1000)
        {
            return Err(TernError::invalid(format!(
                "raft tick must be a whole number of milliseconds from 1 to {RAFT_TICK_MS_MAX}, not {:?}",
                self.raft_tick
            )));
        }
        if !(ELECTION_TICKS_MIN..=ELECTION_TICKS_MAX).contains(&self.election_ticks) {
            return Err(TernError::invalid(format!(
                "election ticks must be from {ELECTION_TICKS_MIN} to {ELECTION_TICKS_MAX}, not {}",
                self.election_ticks
            )));
        }
        if !self.peers.is_empty() {
            if ![1, 3, 5].contains(&self.peers.len()) {
                return Err(TernError::invalid(format!("meta needs 1, 3 or 5 nodes, not {}", self.peers.len())));
            }
            if !self.peers.iter().any(|(id, _)| *id == self.id) {
                return Err(TernError::invalid(format!("meta id {} is not among the meta peers", self.id)));
            }
            let mut ids: Vec<u64> = self.peers.iter().map(|(id, _)| *id).collect();
            ids.sort();
            ids.dedup();
            if ids.len() != self.peers.len() || ids[0] == 0 {
                return Err(TernError::invalid("meta peer ids must be distinct and positive"));
            }
        }
        Ok(())
    }
}

struct NodeLiveness {
    last_seen: Instant,
    replicas: Vec<ReplicaStatus>,
    disk_used_bytes: u64,
    requests_per_second: f64,
}

struct State {
    catalog: Catalog,
    /// The version of the catalog records `catalog` was read from or last written as; every write
    /// is conditional on it.
    version: u64,
    liveness: HashMap<NodeId, NodeLiveness>,
    /// When this node last became meta leader (liveness is judged only a grace period after it).
    leader_since: Instant,
    /// The raft term in which the catalog in memory was loaded (the leader's term).
    leader_term: u64,
}

/// The raft group that holds the catalog (its records are laid out by `records`).
const CATALOG_GROUP: GroupId = GroupId(0);
/// Times a load starts over because the catalog changed while it was read page by page.
const LOAD_ATTEMPTS_MAX: usize = 5;
/// A record never written: reading it confirms leadership without moving the catalog.
const LEADER_PROBE_KEY: &[u8] = b"leader-probe";
/// How long a catalog write or read through raft may take.
const CATALOG_IO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct MetaService {
    settings: ClusterSettingsResponse,
    state: Arc<Mutex<State>>,
    /// Serialises catalog changes: each is computed on the current catalog, written through raft,
    /// then installed.
    changes: Arc<tokio::sync::Mutex<()>>,
    store: StoreHandle,
    leader: Arc<AtomicBool>,
    grace: Duration,
}

fn not_leader() -> Status {
    Status::unavailable("this meta node is not the leader; try another meta address")
}

fn catalog_ref() -> Option<PartitionRef> {
    Some(PartitionRef { table_id: 0, partition: 0, partition_count: 1 })
}

impl MetaService {
    fn new(store: StoreHandle, grace: Duration, settings: ClusterSettingsResponse) -> MetaService {
        MetaService {
            settings,
            state: Arc::new(Mutex::new(State {
                catalog: Catalog::default(),
                version: 0,
                liveness: HashMap::new(),
                leader_since: Instant::now(),
                leader_term: 0,
            })),
            changes: Arc::new(tokio::sync::Mutex::new(())),
            store,
            leader: Arc::new(AtomicBool::new(false)),
            grace,
        }
    }

    fn check_leader(&self) -> Result<(), Status> {
        if self.leader.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(not_leader())
        }
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
                self.leader.store(false, Ordering::SeqCst);
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
        let r =
            self.ask_store(|tx| StoreMsg::Write { group: CATALOG_GROUP, request, callback: Box::new(move |r| drop(tx.send(r))) }, "write").await?;
        tern_proto::check(&r.error)?;
        if !r.set_done {
            return Err(TernError::Unavailable(format!("the catalog changed after version {version} was read; this meta node reloads it")));
        }
        Ok(())
    }

    /// The term in which this node leads the catalog group, if it does.
    async fn leading_term(&self) -> Option<u64> {
        let (tx, rx) = oneshot::channel();
        self.store.send(StoreMsg::Status(Box::new(move |s| drop(tx.send(s)))));
        let statuses = tokio::time::timeout(CATALOG_IO_TIMEOUT, rx).await.ok()?.ok()?;
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
    async fn read_catalog_group(&self, op: read_request::Op) -> Result<tern_proto::ReadResponse, TernError> {
        let request = ReadRequest { partition: catalog_ref(), allow_stale: false, op: Some(op) };
        let r = self.ask_store(|tx| StoreMsg::Read { group: CATALOG_GROUP, request, callback: Box::new(move |r| drop(tx.send(r))) }, "read").await?;
        tern_proto::check(&r.error)?;
        Ok(r)
    }

    /// Sends the catalog group's store a request and waits for its answer, at most
    /// `CATALOG_IO_TIMEOUT` (a write that times out may still commit later).
    async fn ask_store<T>(&self, message: impl FnOnce(oneshot::Sender<T>) -> StoreMsg, what: &str) -> Result<T, TernError> {
        let (tx, rx) = oneshot::channel();
        self.store.send(message(tx));
        match tokio::time::timeout(CATALOG_IO_TIMEOUT, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(TernError::Unavailable("meta store stopped".into())),
            Err(_) => Err(TernError::Timeout(format!("catalog {what} did not finish within {CATALOG_IO_TIMEOUT:?}"))),
        }
    }

    /// Follows the catalog group's raft leadership: on becoming leader, reads the catalog and starts
    /// answering; on losing it, stops.
    async fn follow_leadership(self, mut stopped: watch::Receiver<bool>) {
        loop {
            let term = self.leading_term().await;
            let was = self.leader.load(Ordering::SeqCst);
            // A new term of leadership (also one regained between two looks) starts from the
            // catalog as raft has it: a leader in between may have changed it.
            let fresh = term.is_some_and(|t| !was || t != self.state.lock().leader_term);
            let leads = term.is_some();
            if fresh {
                self.leader.store(false, Ordering::SeqCst);
                // No change of this node's is in flight while the catalog is reloaded and installed.
                let _serial = self.changes.lock().await;
                match self.load_and_clean_up().await {
                    Ok((catalog, version)) => {
                        let mut state = self.state.lock();
                        state.catalog = catalog;
                        state.version = version;
                        state.liveness.clear();
                        state.leader_since = Instant::now();
                        state.leader_term = term.expect("leads");
                        self.leader.store(true, Ordering::SeqCst);
                        tracing::info!("this meta node is now the leader");
                    }
                    Err(e) => tracing::warn!("became meta leader but cannot read the catalog yet: {e}"),
                }
            } else if !leads && was {
                self.leader.store(false, Ordering::SeqCst);
                tracing::info!("this meta node is no longer the leader");
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stopped.wait_for(|s| *s) => return,
            }
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
        state.catalog = catalog;
        state.version = version;
    }

    /// Applies a change to a copy of the catalog, writes it through raft, then installs it.
    async fn change<T>(&self, f: impl FnOnce(&mut Catalog, &[NodeId]) -> Result<T, TernError>) -> Result<T, TernError> {
        let _serial = self.changes.lock().await;
        if !self.leader.load(Ordering::SeqCst) {
            return Err(TernError::Unavailable("this meta node is not the leader".into()));
        }
        self.confirm_leader().await?;
        let (next, out, base, changes) = {
            let state = self.state.lock();
            let alive = alive_nodes(&state, self.grace);
            let mut next = state.catalog.clone();
            let out = f(&mut next, &alive)?;
            let changes = records::diff(&state.catalog, &next);
            (next, out, state.version, changes)
        };
        let version = self.persist(base, changes).await?;
        self.install(next, version);
        Ok(out)
    }

    /// One pass of the scheduler (leader only, and only a grace period after becoming leader, so
    /// that servers are not mistaken for dead before their first heartbeat to this leader).
    pub async fn schedule_once(&self) {
        self.schedule_pass(false).await
    }

    /// A scheduling pass; `step` runs balancing even while the balancer is paused (an operator's
    /// manual step).
    async fn schedule_pass(&self, step: bool) {
        let _serial = self.changes.lock().await;
        let (next, changes, base, records) = {
            let state = self.state.lock();
            if !self.leader.load(Ordering::SeqCst) || !crate::catalog::may_schedule(state.leader_since.elapsed(), self.grace) {
                return;
            }
            let alive = alive_nodes(&state, self.grace);
            let statuses = state.liveness.iter().filter(|(node, _)| alive.contains(node)).flat_map(|(_, l)| l.replicas.iter());
            let mut next = state.catalog.clone();
            let changes = next.scheduling_pass(&alive, statuses, step);
            let records = records::diff(&state.catalog, &next);
            (next, changes, state.version, records)
        };
        if changes.is_empty() {
            return;
        }
        match self.persist(base, records).await {
            Ok(version) => {
                self.install(next, version);
                for c in changes {
                    tracing::info!("scheduler: {c}");
                }
            }
            Err(e) => tracing::warn!("cannot persist scheduling decisions: {e}"),
        }
    }

    fn table_info(state: &State, t: &TableRecord) -> TableInfo {
        let leaders = leader_nodes(state);
        TableInfo {
            table_id: t.id,
            name: t.name.clone(),
            partition_count: t.partition_count,
            replica_count: t.replica_count,
            partitions: t
                .partitions
                .iter()
                .enumerate()
                .map(|(i, p)| PartitionInfo {
                    index: i as u32,
                    peers: p.peers.iter().map(|(peer_id, node_id)| PeerInfo { peer_id: *peer_id, node_id: *node_id }).collect(),
                    leader_node: leaders.get(&tern_core::GroupId::new(t.id, i as u32).0).map(|(_, n)| *n).unwrap_or(p.preferred_leader),
                })
                .collect(),
        }
    }

    fn node_infos(state: &State, grace: Duration) -> Vec<NodeInfo> {
        state
            .catalog
            .nodes
            .iter()
            .map(|(id, n)| {
                let live = state.liveness.get(id);
                let ago = live.map(|l| l.last_seen.elapsed()).unwrap_or(Duration::MAX);
                NodeInfo {
                    node_id: *id,
                    address: n.address.clone(),
                    alive: ago < grace,
                    last_heartbeat_ms_ago: ago.as_millis().min(u64::MAX as u128) as u64,
                    replica_count: live.map(|l| l.replicas.len() as u32).unwrap_or(0),
                    leader_count: live.map(|l| l.replicas.iter().filter(|r| r.is_leader).count() as u32).unwrap_or(0),
                    draining: state.catalog.draining.contains(id),
                    zone: n.zone.clone(),
                    disk_used_bytes: live.map(|l| l.disk_used_bytes).unwrap_or(0),
                    requests_per_second: live.map(|l| l.requests_per_second).unwrap_or(0.0),
                }
            })
            .collect()
    }
}

fn alive_nodes(state: &State, grace: Duration) -> Vec<NodeId> {
    crate::catalog::alive_nodes(&state.catalog, |id| state.liveness.get(&id).map(|l| l.last_seen.elapsed()), grace)
}

/// group -> (term, node) of the replica that most recently reported leadership (highest term).
fn leader_nodes(state: &State) -> HashMap<u64, (u64, NodeId)> {
    let mut out: HashMap<u64, (u64, NodeId)> = HashMap::new();
    for (node, l) in &state.liveness {
        for r in l.replicas.iter().filter(|r| r.is_leader) {
            let e = out.entry(r.group_id).or_insert((r.term, *node));
            if r.term > e.0 {
                *e = (r.term, *node);
            }
        }
    }
    out
}

fn err<T: Default>(e: TernError, set: impl FnOnce(&mut T, Option<Error>)) -> T {
    let mut t = T::default();
    set(&mut t, Some(e.into()));
    t
}

#[tonic::async_trait]
impl Meta for MetaService {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        self.check_leader()?;
        let RegisterRequest { address, zone, leader_priority } = request.into_inner();
        let fresh_cluster_id = rand::random::<u64>() | 1;
        let r = self
            .change(|c, _| {
                if c.cluster_id == 0 {
                    c.cluster_id = fresh_cluster_id;
                }
                c.register_with_priority(&address, &zone, leader_priority).map(|id| (id, c.cluster_id))
            })
            .await;
        Ok(Response::new(match r {
            Ok((node_id, cluster_id)) => {
                self.state
                    .lock()
                    .liveness
                    .insert(node_id, NodeLiveness { last_seen: Instant::now(), replicas: vec![], disk_used_bytes: 0, requests_per_second: 0.0 });
                tracing::info!(node_id, %address, "registered server");
                RegisterResponse { error: None, node_id, cluster_id }
            }
            Err(e) => err(e, |r: &mut RegisterResponse, e| r.error = e),
        }))
    }

    async fn get_cluster_settings(&self, _: Request<ClusterSettingsRequest>) -> Result<Response<ClusterSettingsResponse>, Status> {
        Ok(Response::new(self.settings.clone()))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        self.check_leader()?;
        if let Err(e) = self.confirm_leader().await {
            return Err(Status::unavailable(format!("this meta node cannot confirm it still leads ({e}); try another meta address")));
        }
        let hb = request.into_inner();
        let known = self.state.lock().catalog.nodes.get(&hb.node_id).cloned();
        let Some(record) = known else {
            let e = TernError::invalid(format!("node {} is not registered with this meta server", hb.node_id));
            return Ok(Response::new(err(e, |r: &mut HeartbeatResponse, e| r.error = e)));
        };
        if record.address != hb.address || record.zone != hb.zone || record.leader_priority != hb.leader_priority {
            // A server restarted on a new address (or zone): remember it so peers and clients find it.
            let (id, address, zone, leader_priority) = (hb.node_id, hb.address.clone(), hb.zone.clone(), hb.leader_priority);
            if let Err(e) = self
                .change(|c, _| {
                    c.nodes.insert(id, crate::catalog::NodeRecord { address, zone, leader_priority });
                    Ok(())
                })
                .await
            {
                return Ok(Response::new(err(e, |r: &mut HeartbeatResponse, e| r.error = e)));
            }
        }
        let mut state = self.state.lock();
        let requests_per_second = if hb.requests_interval_ms > 0 { hb.requests as f64 * 1000.0 / hb.requests_interval_ms as f64 } else { 0.0 };
        state.liveness.insert(
            hb.node_id,
            NodeLiveness { last_seen: Instant::now(), replicas: hb.replicas, disk_used_bytes: hb.disk_used_bytes, requests_per_second },
        );
        let mut answer = state.catalog.heartbeat_answer(hb.node_id);
        answer.nodes = Self::node_infos(&state, self.grace);
        Ok(Response::new(answer))
    }

    async fn create_table(&self, request: Request<CreateTableRequest>) -> Result<Response<TableResponse>, Status> {
        self.check_leader()?;
        let r = request.into_inner();
        let created = self.change(|c, alive| c.create_table(&r.name, r.partition_count, r.replica_count, alive).cloned()).await;
        Ok(Response::new(match created {
            Ok(t) => {
                tracing::info!(table = %t.name, id = t.id, partitions = t.partition_count, "created table");
                TableResponse { error: None, table: Some(Self::table_info(&self.state.lock(), &t)) }
            }
            Err(e) => err(e, |r: &mut TableResponse, e| r.error = e),
        }))
    }

    async fn drop_table(&self, request: Request<DropTableRequest>) -> Result<Response<TableResponse>, Status> {
        self.check_leader()?;
        let name = request.into_inner().name;
        Ok(Response::new(match self.change(|c, _| c.drop_table(&name)).await {
            Ok(_) => TableResponse::default(),
            Err(e) => err(e, |r: &mut TableResponse, e| r.error = e),
        }))
    }

    async fn get_table(&self, request: Request<TableRequest>) -> Result<Response<TableResponse>, Status> {
        self.check_leader()?;
        let name = request.into_inner().name;
        let state = self.state.lock();
        Ok(Response::new(match state.catalog.table(&name) {
            Ok(t) => TableResponse { error: None, table: Some(Self::table_info(&state, t)) },
            Err(e) => err(e, |r: &mut TableResponse, e| r.error = e),
        }))
    }

    async fn list_tables(&self, _: Request<ListTablesRequest>) -> Result<Response<ListTablesResponse>, Status> {
        self.check_leader()?;
        let state = self.state.lock();
        let tables = state.catalog.tables.values().map(|t| Self::table_info(&state, t)).collect();
        Ok(Response::new(ListTablesResponse { error: None, tables }))
    }

    async fn list_nodes(&self, _: Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
        self.check_leader()?;
        let state = self.state.lock();
        Ok(Response::new(ListNodesResponse { error: None, nodes: Self::node_infos(&state, self.grace) }))
    }

    async fn get_partition_status(&self, request: Request<PartitionStatusRequest>) -> Result<Response<PartitionStatusResponse>, Status> {
        self.check_leader()?;
        let name = request.into_inner().table;
        let state = self.state.lock();
        let table = match state.catalog.table(&name) {
            Ok(t) => Self::table_info(&state, t),
            Err(e) => return Ok(Response::new(err(e, |r: &mut PartitionStatusResponse, e| r.error = e))),
        };
        let partitions = table
            .partitions
            .iter()
            .map(|p| {
                let group = tern_core::GroupId::new(table.table_id, p.index).0;
                let replicas = p
                    .peers
                    .iter()
                    .filter_map(|peer| {
                        state
                            .liveness
                            .get(&peer.node_id)
                            .filter(|l| l.last_seen.elapsed() < self.grace)
                            .and_then(|l| l.replicas.iter().find(|r| r.group_id == group).cloned())
                    })
                    .collect();
                PartitionStatus { index: p.index, leader_node: p.leader_node, peers: p.peers.clone(), replicas }
            })
            .collect();
        Ok(Response::new(PartitionStatusResponse { error: None, partitions }))
    }

    async fn decommission(&self, request: Request<NodeRequest>) -> Result<Response<AdminResponse>, Status> {
        self.check_leader()?;
        let node = request.into_inner().node_id;
        Ok(Response::new(admin(self.change(|c, alive| c.decommission(node, alive)).await)))
    }

    async fn recommission(&self, request: Request<NodeRequest>) -> Result<Response<AdminResponse>, Status> {
        self.check_leader()?;
        let node = request.into_inner().node_id;
        Ok(Response::new(admin(self.change(|c, _| c.recommission(node)).await)))
    }

    async fn balance(&self, request: Request<BalanceRequest>) -> Result<Response<BalanceResponse>, Status> {
        self.check_leader()?;
        let action = BalanceAction::try_from(request.into_inner().action);
        let pause = match action {
            Ok(BalanceAction::BalanceStatus) => None,
            Ok(BalanceAction::BalancePause) => Some(true),
            Ok(BalanceAction::BalanceResume) => Some(false),
            Ok(BalanceAction::BalanceStep) => {
                self.schedule_pass(true).await;
                None
            }
            Err(_) => {
                return Ok(Response::new(err(TernError::invalid("unknown balance action"), |r: &mut BalanceResponse, e| r.error = e)));
            }
        };
        if let Some(paused) = pause {
            if let Err(e) = self
                .change(|c, _| {
                    c.balancer_paused = paused;
                    Ok(())
                })
                .await
            {
                return Ok(Response::new(err(e, |r: &mut BalanceResponse, e| r.error = e)));
            }
        }
        let state = self.state.lock();
        let alive = alive_nodes(&state, self.grace);
        let partitions = state.catalog.tables.values().flat_map(|t| t.partitions.iter());
        let (mut moves, mut under) = (0, 0);
        for p in partitions {
            moves += p.learners.len() as u32;
            under += p.peers.iter().any(|(_, n)| !alive.contains(n)) as u32;
        }
        Ok(Response::new(BalanceResponse { error: None, paused: state.catalog.balancer_paused, moves_in_flight: moves, under_replicated: under }))
    }

    async fn transfer_leader(&self, request: Request<TransferLeaderRequest>) -> Result<Response<AdminResponse>, Status> {
        self.check_leader()?;
        let r = request.into_inner();
        Ok(Response::new(admin(self.change(|c, _| c.transfer_leader(&r.table, r.partition, r.node_id)).await)))
    }

    async fn set_replica_count(&self, request: Request<SetReplicaCountRequest>) -> Result<Response<AdminResponse>, Status> {
        self.check_leader()?;
        Ok(Response::new(self.set_replica_count_impl(request.into_inner()).await))
    }

    async fn move_replica(&self, request: Request<MoveReplicaRequest>) -> Result<Response<AdminResponse>, Status> {
        self.check_leader()?;
        let r = request.into_inner();
        Ok(Response::new(admin(self.change(|c, alive| c.move_replica(&r.table, r.partition, r.from_node, r.to_node, alive)).await)))
    }
}

impl MetaService {
    async fn set_replica_count_impl(&self, r: SetReplicaCountRequest) -> AdminResponse {
        admin(self.change(|c, alive| c.set_replica_count(&r.table, r.replica_count, alive)).await)
    }
}

fn admin(r: Result<String, TernError>) -> AdminResponse {
    match r {
        Ok(message) => AdminResponse { error: None, message },
        Err(e) => AdminResponse { error: Some(e.into()), message: String::new() },
    }
}

/// A running meta node.
pub struct MetaNode {
    pub address: String,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    store: StoreHandle,
    store_thread: Option<std::thread::JoinHandle<()>>,
    failed: watch::Receiver<bool>,
    #[cfg(test)]
    service: MetaService,
}

fn internal(what: &'static str) -> impl Fn(std::io::Error) -> TernError {
    move |e| TernError::Internal(format!("{what}: {e}"))
}

/// The id meta nodes' raft envelopes carry: the same on every member, never 0. Drawn from the member
/// ids only, so members that list each other's addresses differently (a name here, an IP there)
/// still agree.
fn meta_group_cluster_id(peers: &[(u64, String)]) -> u64 {
    let mut ids: Vec<u64> = peers.iter().map(|(id, _)| *id).collect();
    ids.sort();
    let members: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    tern_core::codec::partition_hash(format!("tern-meta:{}", members.join(",")).as_bytes()) | 1
}

impl MetaNode {
    pub async fn start(cfg: MetaConfig) -> Result<MetaNode, TernError> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.data_dir).map_err(internal("create meta data directory"))?;
        let listener =
            tokio::net::TcpListener::bind(cfg.listen).await.map_err(|e| TernError::Internal(format!("bind meta address {}: {e}", cfg.listen)))?;
        let address = listener.local_addr().map_err(internal("meta address"))?.to_string();
        let peers = if cfg.peers.is_empty() { vec![(cfg.id, address.clone())] } else { cfg.peers.clone() };

        // The catalog's raft group, on the same machinery as partitions.
        let log = Arc::new(tern_raft::log_store::RaftEngineLogStore::open(&cfg.data_dir.join("raft-log"))?);
        let engines = Arc::new(tern_engine::RocksEngineFactory::new(tern_engine::RocksSharedResources::new(16 << 20, 16 << 20), None));
        let (handle, mailbox) = store::mailbox(10_000);
        let addresses: tern_transport::AddressBook = Default::default();
        addresses.write().extend(peers.iter().cloned());
        // Meta's own raft traffic carries an id of its group, drawn from the member list every meta
        // node is given, so raft services refuse envelopes without one.
        let meta_group_id = Arc::new(std::sync::atomic::AtomicU64::new(meta_group_cluster_id(&peers)));
        let transport =
            tern_transport::GrpcTransport::new(cfg.id, meta_group_id.clone(), tokio::runtime::Handle::current(), addresses, handle.clone(), 0);
        let (id, data_dir) = (cfg.id, cfg.data_dir.clone());
        let store_cfg = StoreConfig::default();
        let (tick, round_max) = (store_cfg.tick_interval, store_cfg.round_messages_max);
        let meta_store = tokio::task::spawn_blocking(move || {
            let disks = store::NodeDisks { log, engines, files: Arc::new(tern_core::files::RealFileSystem) };
            Store::open(id, data_dir, disks, Arc::new(tern_core::time::SystemClock::default()), rand::random(), store_cfg, Box::new(transport))
        })
        .await
        .map_err(|e| TernError::Internal(format!("open meta store: {e}")))??;
        let (stop, stopped) = watch::channel(false);
        let (store_thread, failed) =
            tern_transport::spawn_store_thread(format!("tern-meta-store-{id}"), move || store::run(meta_store, mailbox, tick, round_max), &stop)
                .map_err(internal("start meta store thread"))?;
        let lowest = peers.iter().map(|(i, _)| *i).min().expect("at least one meta peer");
        handle.send(StoreMsg::EnsureReplicas(vec![ReplicaSpec {
            group: CATALOG_GROUP,
            peer_id: cfg.id,
            peers: peers.iter().map(|(i, _)| (*i, *i)).collect(),
            learners: vec![],
            initial: true,
            partition_count: 1,
            preferred_leader: cfg.id == lowest,
            preferred_leader_peer: 0,
        }]));

        let settings = ClusterSettingsResponse { error: None, raft_tick_ms: cfg.raft_tick.as_millis() as u64, election_ticks: cfg.election_ticks };
        let service = MetaService::new(handle.clone(), cfg.node_grace, settings);
        #[cfg(test)]
        let kept = service.clone();
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(service.clone().follow_leadership(stopped.clone())));
        let scheduler = service.clone();
        let mut scheduler_stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = scheduler_stopped.wait_for(|s| *s) => return,
                }
                scheduler.schedule_once().await;
            }
        }));
        let raft = tern_proto::raft_server::RaftServer::new(tern_transport::RaftService::new(
            cfg.id,
            meta_group_id,
            handle.clone(),
            cfg.data_dir.join("snapshots-received"),
        ))
        .max_decoding_message_size(tern_core::limits::RAFT_BATCH_BYTES_MAX);
        let mut server_stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let r = tonic::transport::Server::builder()
                .add_service(MetaServer::new(service))
                .add_service(raft)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = server_stopped.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!("meta server stopped: {e}");
            }
        }));
        tracing::info!(%address, id = cfg.id, peers = peers.len(), "meta node started");
        Ok(MetaNode {
            address,
            stop,
            tasks,
            store: handle,
            store_thread: Some(store_thread),
            failed,
            #[cfg(test)]
            service: kept,
        })
    }

    /// Resolves if the node failed on its own (its store thread died); the process should exit.
    pub async fn failed(&self) {
        let mut failed = self.failed.clone();
        let _ = failed.wait_for(|f| *f).await;
    }

    pub async fn shutdown(mut self) {
        tern_transport::stop_node(&self.stop, std::mem::take(&mut self.tasks), &self.store, self.store_thread.take()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Meta configurations that cannot form a group are refused with a message naming the problem.
    #[test]
    fn config_validation() {
        let ok = MetaConfig::new("d".into(), "127.0.0.1:0".parse().unwrap());
        assert!(ok.validate().is_ok());
        let peers = |ids: &[u64]| ids.iter().map(|i| (*i, format!("127.0.0.1:{}", 1000 + i))).collect::<Vec<_>>();
        let mut c = ok.clone();
        c.peers = peers(&[1, 2]);
        assert!(c.validate().unwrap_err().to_string().contains("1, 3 or 5"));
        let mut c = ok.clone();
        c.peers = peers(&[1, 2, 3]);
        c.id = 4;
        assert!(c.validate().unwrap_err().to_string().contains("not among"));
        let mut c = ok.clone();
        c.peers = peers(&[1, 1, 3]);
        assert!(c.validate().unwrap_err().to_string().contains("distinct"));
        let mut c = ok;
        c.node_grace = Duration::ZERO;
        assert!(c.validate().is_err());
    }

    async fn leading_meta(dir: &std::path::Path) -> MetaNode {
        let node = MetaNode::start(MetaConfig::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap())).await.unwrap();
        wait_for_leadership(&node.service).await;
        node
    }

    async fn wait_for_leadership(service: &MetaService) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !service.leader.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "meta never became leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A catalog change computed on a catalog that is no longer current (as after a write that
    /// timed out and committed later) is refused, not written over the change it never saw; the
    /// leader reloads and serves the catalog raft has.
    #[tokio::test]
    async fn a_change_on_a_stale_catalog_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let node = leading_meta(dir.path()).await;
        let service = &node.service;
        let (base, version) = {
            let state = service.state.lock();
            (state.catalog.clone(), state.version)
        };
        let mut first = base.clone();
        first.register("first:1", "").unwrap();
        let written = service.persist(version, records::diff(&base, &first)).await.unwrap();
        assert_eq!(written, version + 1);
        let mut second = base.clone();
        second.register("second:1", "").unwrap();
        let e = service.persist(version, records::diff(&base, &second)).await.unwrap_err();
        assert!(matches!(e, TernError::Unavailable(_)), "{e}");
        assert!(!service.leader.load(Ordering::SeqCst), "a refused write stops the leader answering until it reloads");
        wait_for_leadership(service).await;
        let (catalog, version) = {
            let state = service.state.lock();
            (state.catalog.clone(), state.version)
        };
        assert_eq!((catalog, version), (first, written + 1), "reloaded, then a barrier write");
        node.shutdown().await;
    }

    /// A table of the most partitions allowed is written as bounded raft entries and reads back
    /// whole after a restart.
    #[tokio::test]
    async fn the_largest_table_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let node = leading_meta(dir.path()).await;
        let nodes: Vec<NodeId> = {
            let (base, version) = {
                let state = node.service.state.lock();
                (state.catalog.clone(), state.version)
            };
            let mut next = base.clone();
            let nodes: Vec<NodeId> = (0..3).map(|i| next.register(&format!("n{i}:1"), "").unwrap()).collect();
            let version = node.service.persist(version, records::diff(&base, &next)).await.unwrap();
            node.service.install(next, version);
            nodes
        };
        node.service.change(|c, _| c.create_table("huge", tern_core::limits::PARTITION_COUNT_MAX, 3, &nodes).map(|_| ())).await.unwrap();
        let expected = node.service.state.lock().catalog.clone();
        assert_eq!(expected.tables["huge"].partitions.len(), tern_core::limits::PARTITION_COUNT_MAX as usize);
        node.shutdown().await;
        let node = leading_meta(dir.path()).await;
        assert_eq!(node.service.state.lock().catalog, expected);
        node.shutdown().await;
    }
}
