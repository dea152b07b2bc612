//! The meta gRPC service: persists the catalog (atomically, to one file), tracks heartbeats, answers
//! routing queries.

use crate::catalog::{Catalog, GroupProgress, TableRecord};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_core::{NodeId, TernError};
use tern_proto::meta_server::{Meta, MetaServer};
use tern_proto::*;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

#[derive(Clone, Debug)]
pub struct MetaConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// A server silent for this long is reported as down.
    pub node_grace: Duration,
}

impl MetaConfig {
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> MetaConfig {
        MetaConfig { data_dir, listen, node_grace: Duration::from_secs(10) }
    }
}

struct NodeLiveness {
    last_seen: Instant,
    replicas: Vec<ReplicaStatus>,
}

struct State {
    catalog: Catalog,
    liveness: HashMap<NodeId, NodeLiveness>,
}

#[derive(Clone)]
pub struct MetaService {
    state: Arc<Mutex<State>>,
    path: PathBuf,
    grace: Duration,
    started: Instant,
}

/// Replicas filled on one node at the same time by re-replication (each is a snapshot transfer).
const REPAIRS_PER_NODE_MAX: usize = 2;

fn io_error(e: std::io::Error) -> TernError {
    TernError::Internal(format!("meta catalog file: {e}"))
}

impl MetaService {
    pub fn open(data_dir: PathBuf, grace: Duration) -> Result<MetaService, TernError> {
        std::fs::create_dir_all(&data_dir).map_err(io_error)?;
        let path = data_dir.join("catalog.json");
        let catalog = if path.exists() {
            let bytes = std::fs::read(&path).map_err(io_error)?;
            serde_json::from_slice(&bytes).map_err(|e| TernError::Corruption(format!("{}: {e}", path.display())))?
        } else {
            Catalog::default()
        };
        Ok(MetaService {
            state: Arc::new(Mutex::new(State { catalog, liveness: HashMap::new() })),
            path,
            grace,
            started: Instant::now(),
        })
    }

    /// Writes the catalog durably (temp file, fsync, rename) before a change is acknowledged.
    fn persist(&self, catalog: &Catalog) -> Result<(), TernError> {
        use std::io::Write;
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(catalog).expect("serialize catalog");
        let mut f = std::fs::File::create(&tmp).map_err(io_error)?;
        f.write_all(&bytes).map_err(io_error)?;
        f.sync_all().map_err(io_error)?;
        std::fs::rename(&tmp, &self.path).map_err(io_error)
    }

    /// Applies a change to a copy of the catalog, persists it, then installs it.
    fn change<T>(&self, f: impl FnOnce(&mut Catalog, &[NodeId]) -> Result<T, TernError>) -> Result<T, TernError> {
        let mut state = self.state.lock();
        let alive = alive_nodes(&state, self.grace);
        let mut next = state.catalog.clone();
        let out = f(&mut next, &alive)?;
        self.persist(&next)?;
        state.catalog = next;
        Ok(out)
    }

    /// One pass of the scheduler: repair partitions that lost replicas to down nodes. Waits one grace
    /// period after meta starts, so that servers are not mistaken for dead before their first heartbeat.
    pub fn schedule_once(&self) {
        if self.started.elapsed() < self.grace {
            return;
        }
        let mut state = self.state.lock();
        let alive = alive_nodes(&state, self.grace);
        let mut progress: HashMap<u64, GroupProgress> = HashMap::new();
        let mut leader_terms: HashMap<u64, u64> = HashMap::new();
        for (node, l) in &state.liveness {
            if !alive.contains(node) {
                continue;
            }
            for r in &l.replicas {
                let g = progress.entry(r.group_id).or_default();
                g.applied.insert(r.peer_id, r.applied_index);
                if r.is_leader && r.term >= leader_terms.get(&r.group_id).copied().unwrap_or(0) {
                    leader_terms.insert(r.group_id, r.term);
                    g.leader_commit = r.commit_index;
                }
            }
        }
        let mut next = state.catalog.clone();
        let changes = next.schedule(&alive, &progress, REPAIRS_PER_NODE_MAX);
        if changes.is_empty() {
            return;
        }
        match self.persist(&next) {
            Ok(()) => {
                state.catalog = next;
                for c in changes {
                    tracing::info!("re-replication: {c}");
                }
            }
            Err(e) => tracing::error!("cannot persist scheduling decisions: {e}"),
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
                    leader_node: leaders
                        .get(&tern_core::GroupId::new(t.id, i as u32).0)
                        .map(|(_, n)| *n)
                        .unwrap_or(p.preferred_leader),
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
                }
            })
            .collect()
    }
}

fn alive_nodes(state: &State, grace: Duration) -> Vec<NodeId> {
    state
        .catalog
        .nodes
        .keys()
        .filter(|id| state.liveness.get(id).is_some_and(|l| l.last_seen.elapsed() < grace))
        .copied()
        .collect()
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
        let address = request.into_inner().address;
        let r = self.change(|c, _| c.register(&address));
        Ok(Response::new(match r {
            Ok(node_id) => {
                self.state.lock().liveness.insert(node_id, NodeLiveness { last_seen: Instant::now(), replicas: vec![] });
                tracing::info!(node_id, %address, "registered server");
                RegisterResponse { error: None, node_id }
            }
            Err(e) => err(e, |r: &mut RegisterResponse, e| r.error = e),
        }))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let hb = request.into_inner();
        let known = self.state.lock().catalog.nodes.get(&hb.node_id).cloned();
        let Some(record) = known else {
            let e = TernError::invalid(format!("node {} is not registered with this meta server", hb.node_id));
            return Ok(Response::new(err(e, |r: &mut HeartbeatResponse, e| r.error = e)));
        };
        if record.address != hb.address {
            // A server restarted on a new address: remember it so peers and clients can find it.
            let (id, address) = (hb.node_id, hb.address.clone());
            if let Err(e) = self.change(|c, _| {
                c.nodes.insert(id, crate::catalog::NodeRecord { address });
                Ok(())
            }) {
                return Ok(Response::new(err(e, |r: &mut HeartbeatResponse, e| r.error = e)));
            }
        }
        let mut state = self.state.lock();
        state.liveness.insert(hb.node_id, NodeLiveness { last_seen: Instant::now(), replicas: hb.replicas });
        let assignments = state
            .catalog
            .assignments(hb.node_id)
            .into_iter()
            .map(|a| ReplicaAssignment {
                group_id: a.group.0,
                peer_id: a.peer_id,
                peers: a.peers.iter().map(|(p, n)| PeerInfo { peer_id: *p, node_id: *n }).collect(),
                learners: a.learners.iter().map(|(p, n)| PeerInfo { peer_id: *p, node_id: *n }).collect(),
                initial: a.initial,
                partition_count: a.partition_count,
                preferred_leader: a.preferred_leader,
                preferred_leader_peer: a.preferred_leader_peer,
            })
            .collect();
        Ok(Response::new(HeartbeatResponse {
            error: None,
            assignments,
            nodes: Self::node_infos(&state, self.grace),
            dropped_tables: state.catalog.dropped_tables.clone(),
            live_tables: state.catalog.tables.values().map(|t| t.id).collect(),
        }))
    }

    async fn create_table(&self, request: Request<CreateTableRequest>) -> Result<Response<TableResponse>, Status> {
        let r = request.into_inner();
        let created = self.change(|c, alive| c.create_table(&r.name, r.partition_count, r.replica_count, alive).cloned());
        Ok(Response::new(match created {
            Ok(t) => {
                tracing::info!(table = %t.name, id = t.id, partitions = t.partition_count, "created table");
                TableResponse { error: None, table: Some(Self::table_info(&self.state.lock(), &t)) }
            }
            Err(e) => err(e, |r: &mut TableResponse, e| r.error = e),
        }))
    }

    async fn drop_table(&self, request: Request<DropTableRequest>) -> Result<Response<TableResponse>, Status> {
        let name = request.into_inner().name;
        Ok(Response::new(match self.change(|c, _| c.drop_table(&name)) {
            Ok(_) => TableResponse::default(),
            Err(e) => err(e, |r: &mut TableResponse, e| r.error = e),
        }))
    }

    async fn get_table(&self, request: Request<TableRequest>) -> Result<Response<TableResponse>, Status> {
        let name = request.into_inner().name;
        let state = self.state.lock();
        Ok(Response::new(match state.catalog.table(&name) {
            Ok(t) => TableResponse { error: None, table: Some(Self::table_info(&state, t)) },
            Err(e) => err(e, |r: &mut TableResponse, e| r.error = e),
        }))
    }

    async fn list_tables(&self, _: Request<ListTablesRequest>) -> Result<Response<ListTablesResponse>, Status> {
        let state = self.state.lock();
        let tables = state.catalog.tables.values().map(|t| Self::table_info(&state, t)).collect();
        Ok(Response::new(ListTablesResponse { error: None, tables }))
    }

    async fn list_nodes(&self, _: Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
        let state = self.state.lock();
        Ok(Response::new(ListNodesResponse { error: None, nodes: Self::node_infos(&state, self.grace) }))
    }

    async fn get_partition_status(&self, request: Request<PartitionStatusRequest>) -> Result<Response<PartitionStatusResponse>, Status> {
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
                        state.liveness.get(&peer.node_id).filter(|l| l.last_seen.elapsed() < self.grace).and_then(|l| {
                            l.replicas.iter().find(|r| r.group_id == group).cloned()
                        })
                    })
                    .collect();
                PartitionStatus { index: p.index, leader_node: p.leader_node, peers: p.peers.clone(), replicas }
            })
            .collect();
        Ok(Response::new(PartitionStatusResponse { error: None, partitions }))
    }

    async fn decommission(&self, request: Request<NodeRequest>) -> Result<Response<AdminResponse>, Status> {
        let node = request.into_inner().node_id;
        Ok(Response::new(admin(self.change(|c, alive| c.decommission(node, alive)))))
    }

    async fn recommission(&self, request: Request<NodeRequest>) -> Result<Response<AdminResponse>, Status> {
        let node = request.into_inner().node_id;
        Ok(Response::new(admin(self.change(|c, _| c.recommission(node)))))
    }

    async fn balance(&self, request: Request<BalanceRequest>) -> Result<Response<BalanceResponse>, Status> {
        let action = BalanceAction::try_from(request.into_inner().action);
        let pause = match action {
            Ok(BalanceAction::BalanceStatus) => None,
            Ok(BalanceAction::BalancePause) => Some(true),
            Ok(BalanceAction::BalanceResume) => Some(false),
            Err(_) => {
                return Ok(Response::new(err(TernError::invalid("unknown balance action"), |r: &mut BalanceResponse, e| r.error = e)));
            }
        };
        if let Some(paused) = pause {
            if let Err(e) = self.change(|c, _| {
                c.balancer_paused = paused;
                Ok(())
            }) {
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
        let r = request.into_inner();
        Ok(Response::new(admin(self.change(|c, _| c.transfer_leader(&r.table, r.partition, r.node_id)))))
    }

    async fn move_replica(&self, request: Request<MoveReplicaRequest>) -> Result<Response<AdminResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(admin(self.change(|c, alive| c.move_replica(&r.table, r.partition, r.from_node, r.to_node, alive)))))
    }
}

fn admin(r: Result<String, TernError>) -> AdminResponse {
    match r {
        Ok(message) => AdminResponse { error: None, message },
        Err(e) => AdminResponse { error: Some(e.into()), message: String::new() },
    }
}

/// A running meta server.
pub struct MetaNode {
    pub address: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl MetaNode {
    pub async fn start(cfg: MetaConfig) -> Result<MetaNode, TernError> {
        let service = MetaService::open(cfg.data_dir.clone(), cfg.node_grace)?;
        let listener = tokio::net::TcpListener::bind(cfg.listen).await.map_err(|e| TernError::Internal(format!("bind meta address {}: {e}", cfg.listen)))?;
        let address = listener.local_addr().map_err(|e| TernError::Internal(e.to_string()))?.to_string();
        let (stop, mut stopped) = watch::channel(false);
        let scheduler = service.clone();
        let mut scheduler_stopped = stopped.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => scheduler.schedule_once(),
                    _ = scheduler_stopped.wait_for(|s| *s) => return,
                }
            }
        });
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let r = tonic::transport::Server::builder()
                .add_service(MetaServer::new(service))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!("meta server stopped: {e}");
            }
        });
        tracing::info!(%address, "meta server started");
        Ok(MetaNode { address, stop, task })
    }

    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_millis(500), &mut task).await.is_err() {
            task.abort();
        }
    }
}
