//! The meta gRPC service. The catalog is replicated: every meta node runs a one-group raft store
//! (the same `tern_raft::store::Store` partitions use, over raft-engine and RocksDB) whose state
//! machine holds the catalog; the raft leader is the meta leader. Only the leader answers (others
//! answer UNAVAILABLE so callers try the next address). What it decides is the `keeper`'s; this file
//! is its runtime: the store thread, the gRPC handlers, and the loops that follow leadership and run
//! the scheduler.

use crate::keeper::{IoFuture, Keeper, KeeperIo, CATALOG_GROUP, CATALOG_IO_TIMEOUT};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tern_core::time::{Clock, SystemClock};
use tern_core::TernError;
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
    /// Whether `raft_tick` and `election_ticks` were given by the operator. The timing a meta node
    /// first ran with is kept in its data directory; later starts adopt it, and refuse timing given
    /// explicitly that differs (servers that registered earlier hold the old timing, and a lease
    /// on one of them is only safe against followers that refuse votes as long as it expects).
    pub timing_given: bool,
}

/// Raft timing of meta data directories from before it was recorded (the defaults of the time).
const LEGACY_TIMING: (u64, u32) = (100, 10);
const TIMING_FILE: &str = "cluster-timing.json";

/// The cluster's raft timing: recorded in the data directory at the first start, adopted after.
fn settle_cluster_timing(cfg: &mut MetaConfig) -> Result<(), TernError> {
    let path = cfg.data_dir.join(TIMING_FILE);
    let wanted = (cfg.raft_tick.as_millis() as u64, cfg.election_ticks);
    let stored: Option<(u64, u32)> = match std::fs::read(&path) {
        Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| TernError::Corruption(format!("{}: {e}", path.display())))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(TernError::Internal(format!("read {}: {e}", path.display()))),
    };
    let timing = match stored {
        Some(stored) if cfg.timing_given && stored != wanted => {
            return Err(TernError::invalid(format!(
                "this meta's cluster runs a raft tick of {} ms and {} election ticks (recorded in {}), not {} ms and {}: every server holds the cluster's timing, so it cannot change (leave --raft-tick-ms and --election-ticks out to adopt it)",
                stored.0,
                stored.1,
                path.display(),
                wanted.0,
                wanted.1
            )));
        }
        Some(stored) => stored,
        // A data directory from before the timing was recorded ran the defaults of the time.
        None if !cfg.timing_given && cfg.data_dir.join("raft-log").exists() => LEGACY_TIMING,
        None => wanted,
    };
    if stored.is_none() {
        tern_core::files::write_file_atomically(&path, &serde_json::to_vec(&timing).expect("serialize"))
            .map_err(|e| TernError::Internal(format!("write {}: {e}", path.display())))?;
    }
    (cfg.raft_tick, cfg.election_ticks) = (Duration::from_millis(timing.0), timing.1);
    Ok(())
}

/// Raft timing limits (a tick between 1 ms and 10 s; 5 to 100 ticks to an election).
pub const RAFT_TICK_MS_MAX: u64 = 10_000;
pub const ELECTION_TICKS_MIN: u32 = 5;
pub const ELECTION_TICKS_MAX: u32 = 100;
/// A new cluster's election timeout in ticks (see `tern_raft::replica::ELECTION_TICK_DEFAULT`).
pub const ELECTION_TICKS_DEFAULT: u32 = tern_raft::replica::ELECTION_TICK_DEFAULT as u32;

impl MetaConfig {
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> MetaConfig {
        MetaConfig {
            data_dir,
            listen,
            node_grace: Duration::from_secs(10),
            id: 1,
            peers: vec![],
            raft_tick: StoreConfig::default().tick_interval,
            election_ticks: ELECTION_TICKS_DEFAULT,
            timing_given: false,
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

/// The keeper's way to the catalog group's store on this meta node: messages to the store thread,
/// each answer awaited at most `CATALOG_IO_TIMEOUT`.
struct StoreIo {
    store: StoreHandle,
    clock: SystemClock,
}

impl StoreIo {
    fn ask<T: Send + 'static>(&self, message: impl FnOnce(oneshot::Sender<T>) -> StoreMsg, what: &'static str) -> IoFuture<T> {
        let (tx, rx) = oneshot::channel();
        self.store.send(message(tx));
        Box::pin(async move {
            match tokio::time::timeout(CATALOG_IO_TIMEOUT, rx).await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(_)) => Err(TernError::Unavailable("meta store stopped".into())),
                Err(_) => Err(TernError::Timeout(format!("catalog {what} did not finish within {CATALOG_IO_TIMEOUT:?}"))),
            }
        })
    }
}

impl KeeperIo for StoreIo {
    fn read(&self, request: ReadRequest) -> IoFuture<ReadResponse> {
        self.ask(|tx| StoreMsg::Read { group: CATALOG_GROUP, request, callback: Box::new(move |r| drop(tx.send(r))) }, "read")
    }

    fn write(&self, request: WriteRequest) -> IoFuture<WriteResponse> {
        self.ask(|tx| StoreMsg::Write { group: CATALOG_GROUP, request, callback: Box::new(move |r| drop(tx.send(r))) }, "write")
    }

    fn statuses(&self) -> IoFuture<Vec<ReplicaStatus>> {
        self.ask(|tx| StoreMsg::Status(Box::new(move |s| drop(tx.send(s)))), "status")
    }

    fn clock(&self) -> &dyn Clock {
        &self.clock
    }
}

#[derive(Clone)]
pub struct MetaService {
    settings: ClusterSettingsResponse,
    keeper: Keeper,
}

fn unavailable(e: TernError) -> Status {
    Status::unavailable(format!("{e}; try another meta address"))
}

fn err<T: Default>(e: TernError, set: impl FnOnce(&mut T, Option<Error>)) -> T {
    let mut t = T::default();
    set(&mut t, Some(e.into()));
    t
}

#[tonic::async_trait]
impl Meta for MetaService {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        self.keeper.check_serving().map_err(unavailable)?;
        let RegisterRequest { address, zone, leader_priority } = request.into_inner();
        let r = self.keeper.register(&address, &zone, leader_priority, rand::random::<u64>() | 1).await;
        Ok(Response::new(match r {
            Ok((node_id, cluster_id)) => {
                tracing::info!(node_id, %address, "registered server");
                RegisterResponse { error: None, node_id, cluster_id }
            }
            Err(e) => err(e, |r: &mut RegisterResponse, e| r.error = e),
        }))
    }

    async fn get_cluster_settings(&self, _: Request<ClusterSettingsRequest>) -> Result<Response<ClusterSettingsResponse>, Status> {
        let cluster_id = self.keeper.cluster_id();
        Ok(Response::new(ClusterSettingsResponse { cluster_id, cluster_tag: tern_core::codec::cluster_tag(cluster_id), ..self.settings.clone() }))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        self.keeper.heartbeat(request.into_inner()).await.map(Response::new).map_err(unavailable)
    }

    async fn create_table(&self, request: Request<CreateTableRequest>) -> Result<Response<TableResponse>, Status> {
        self.keeper.check_serving().map_err(unavailable)?;
        let r = request.into_inner();
        let created = self
            .keeper
            .change(|c, alive| {
                c.create_table(&r.name, r.partition_count, r.replica_count, alive)?;
                let t = c.tables.get_mut(&r.name).expect("just created");
                t.restoring = r.restoring;
                Ok(t.clone())
            })
            .await;
        Ok(Response::new(match created.map(|t| self.keeper.describe(&t)) {
            Ok(t) => {
                tracing::info!(table = %t.name, id = t.table_id, partitions = t.partition_count, "created table");
                TableResponse { error: None, table: Some(t) }
            }
            Err(e) => err(e, |r: &mut TableResponse, e| r.error = e),
        }))
    }

    async fn drop_table(&self, request: Request<DropTableRequest>) -> Result<Response<TableResponse>, Status> {
        self.keeper.check_serving().map_err(unavailable)?;
        let r = request.into_inner();
        let dropped = self
            .keeper
            .change(|c, _| {
                let id = c.tables.get(&r.name).map(|t| t.id);
                if r.table_id != 0 && id.is_some_and(|id| id != r.table_id) {
                    return Err(TernError::TableNotFound(format!(
                        "{} with id {} (the table of that name now has id {})",
                        r.name,
                        r.table_id,
                        id.unwrap_or(0)
                    )));
                }
                c.drop_table(&r.name)
            })
            .await;
        Ok(Response::new(match dropped {
            Ok(_) => TableResponse::default(),
            Err(e) => err(e, |r: &mut TableResponse, e| r.error = e),
        }))
    }

    async fn get_table(&self, request: Request<TableRequest>) -> Result<Response<TableResponse>, Status> {
        self.keeper.check_serving().map_err(unavailable)?;
        let request = request.into_inner();
        Ok(Response::new(match self.keeper.table_since(&request.name, request.known_routing_version) {
            Ok(t) => TableResponse { error: None, table: Some(t) },
            Err(e) => err(e, |r: &mut TableResponse, e| r.error = e),
        }))
    }

    async fn list_tables(&self, _: Request<ListTablesRequest>) -> Result<Response<ListTablesResponse>, Status> {
        self.keeper.check_serving().map_err(unavailable)?;
        Ok(Response::new(ListTablesResponse { error: None, tables: self.keeper.tables() }))
    }

    async fn list_nodes(&self, _: Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
        self.keeper.check_serving().map_err(unavailable)?;
        Ok(Response::new(ListNodesResponse { error: None, nodes: self.keeper.nodes() }))
    }

    async fn get_partition_status(&self, request: Request<PartitionStatusRequest>) -> Result<Response<PartitionStatusResponse>, Status> {
        self.keeper.check_serving().map_err(unavailable)?;
        Ok(Response::new(match self.keeper.partition_status(&request.into_inner().table) {
            Ok(partitions) => PartitionStatusResponse { error: None, partitions },
            Err(e) => err(e, |r: &mut PartitionStatusResponse, e| r.error = e),
        }))
    }

    async fn decommission(&self, request: Request<NodeRequest>) -> Result<Response<AdminResponse>, Status> {
        self.keeper.check_serving().map_err(unavailable)?;
        let node = request.into_inner().node_id;
        Ok(Response::new(admin(self.keeper.change(|c, alive| c.decommission(node, alive)).await)))
    }

    async fn recommission(&self, request: Request<NodeRequest>) -> Result<Response<AdminResponse>, Status> {
        self.keeper.check_serving().map_err(unavailable)?;
        let node = request.into_inner().node_id;
        Ok(Response::new(admin(self.keeper.change(|c, _| c.recommission(node)).await)))
    }

    async fn balance(&self, request: Request<BalanceRequest>) -> Result<Response<BalanceResponse>, Status> {
        self.keeper.check_serving().map_err(unavailable)?;
        let action = BalanceAction::try_from(request.into_inner().action);
        let done = match action {
            Ok(BalanceAction::BalanceStatus) => Ok(()),
            Ok(BalanceAction::BalancePause) | Ok(BalanceAction::BalanceResume) => {
                let paused = action == Ok(BalanceAction::BalancePause);
                self.keeper
                    .change(|c, _| {
                        c.balancer_paused = paused;
                        Ok(())
                    })
                    .await
            }
            Ok(BalanceAction::BalanceStep) => self.keeper.schedule_pass(true).await.map(drop),
            Err(_) => Err(TernError::invalid("unknown balance action")),
        };
        Ok(Response::new(match done {
            Ok(()) => self.keeper.balance_summary(),
            Err(e) => err(e, |r: &mut BalanceResponse, e| r.error = e),
        }))
    }

    async fn transfer_leader(&self, request: Request<TransferLeaderRequest>) -> Result<Response<AdminResponse>, Status> {
        self.keeper.check_serving().map_err(unavailable)?;
        let r = request.into_inner();
        Ok(Response::new(admin(self.keeper.change(|c, _| c.transfer_leader(&r.table, r.partition, r.node_id)).await)))
    }

    async fn set_replica_count(&self, request: Request<SetReplicaCountRequest>) -> Result<Response<AdminResponse>, Status> {
        self.keeper.check_serving().map_err(unavailable)?;
        let r = request.into_inner();
        Ok(Response::new(admin(self.keeper.change(|c, alive| c.set_replica_count(&r.table, r.replica_count, alive)).await)))
    }

    async fn split_table(&self, request: Request<SplitTableRequest>) -> Result<Response<AdminResponse>, Status> {
        self.keeper.check_serving().map_err(unavailable)?;
        let r = request.into_inner();
        let now = tern_core::time::unix_now_ms();
        let result = match SplitAction::try_from(r.action) {
            Ok(SplitAction::SplitStart) => self.keeper.change(|c, _| c.start_split(&r.table, now)).await,
            Ok(SplitAction::SplitCancel) => self.keeper.change(|c, _| c.cancel_split(&r.table)).await,
            Err(_) => Err(TernError::invalid(format!("unknown split action {}", r.action))),
        };
        Ok(Response::new(admin(result)))
    }

    async fn finish_restore(&self, request: Request<TableRequest>) -> Result<Response<AdminResponse>, Status> {
        self.keeper.check_serving().map_err(unavailable)?;
        let r = request.into_inner();
        Ok(Response::new(admin(self.keeper.change(|c, _| c.finish_restore(&r.name)).await)))
    }

    async fn set_backup_policy(&self, request: Request<SetBackupPolicyRequest>) -> Result<Response<AdminResponse>, Status> {
        self.keeper.check_serving().map_err(unavailable)?;
        let r = request.into_inner();
        let policy = match r.policy.as_ref().map(crate::catalog::BackupPolicy::from_proto).transpose() {
            Ok(p) => p,
            Err(e) => return Ok(Response::new(admin(Err(e)))),
        };
        Ok(Response::new(admin(self.keeper.change(|c, _| c.set_backup_policy(&r.table, policy)).await)))
    }

    async fn add_duplication(&self, request: Request<AddDuplicationRequest>) -> Result<Response<AddDuplicationResponse>, Status> {
        self.keeper.check_serving().map_err(unavailable)?;
        let r = request.into_inner();
        let dup = crate::catalog::Duplication {
            id: rand::random::<u64>() >> 1 | 1,
            remote_meta: r.remote_meta,
            remote_table: r.remote_table,
            remote_tag: r.remote_tag,
            paused: false,
            log_entries_max: if r.log_entries_max == 0 { crate::catalog::DUP_LOG_ENTRIES_DEFAULT } else { r.log_entries_max },
        };
        let id = dup.id;
        let added = self.keeper.change(|c, _| c.add_duplication(&r.table, dup)).await;
        Ok(Response::new(match added {
            Ok(said) => {
                tracing::info!("added {said}");
                AddDuplicationResponse { error: None, id }
            }
            Err(e) => AddDuplicationResponse { error: Some(e.into()), id: 0 },
        }))
    }

    async fn change_duplication(&self, request: Request<ChangeDuplicationRequest>) -> Result<Response<AdminResponse>, Status> {
        self.keeper.check_serving().map_err(unavailable)?;
        let r = request.into_inner();
        let Ok(action) = DuplicationAction::try_from(r.action) else {
            return Ok(Response::new(admin(Err(TernError::invalid(format!("unknown duplication action {}", r.action))))));
        };
        Ok(Response::new(admin(self.keeper.change(|c, _| c.change_duplication(r.id, action)).await)))
    }

    async fn list_duplications(&self, request: Request<ListDuplicationsRequest>) -> Result<Response<ListDuplicationsResponse>, Status> {
        self.keeper.check_serving().map_err(unavailable)?;
        Ok(Response::new(match self.keeper.duplications(&request.into_inner().table) {
            Ok(duplications) => ListDuplicationsResponse { error: None, duplications },
            Err(e) => ListDuplicationsResponse { error: Some(e.into()), duplications: vec![] },
        }))
    }

    async fn move_replica(&self, request: Request<MoveReplicaRequest>) -> Result<Response<AdminResponse>, Status> {
        self.keeper.check_serving().map_err(unavailable)?;
        let r = request.into_inner();
        Ok(Response::new(admin(self.keeper.change(|c, alive| c.move_replica(&r.table, r.partition, r.from_node, r.to_node, alive)).await)))
    }
}

fn admin(r: Result<String, TernError>) -> AdminResponse {
    match r {
        Ok(message) => AdminResponse { error: None, message },
        Err(e) => AdminResponse { error: Some(e.into()), message: String::new() },
    }
}

/// Runs `f` every `period` until stopped.
async fn every<F: std::future::Future<Output = ()>>(period: Duration, mut stopped: watch::Receiver<bool>, f: impl Fn() -> F) {
    loop {
        f().await;
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
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
    keeper: Keeper,
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
    pub async fn start(mut cfg: MetaConfig) -> Result<MetaNode, TernError> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.data_dir).map_err(internal("create meta data directory"))?;
        settle_cluster_timing(&mut cfg)?;
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
        let mut store_cfg = StoreConfig::default();
        // The catalog group keeps the timing meta nodes always ran: a rolling upgrade mixes old and
        // new members, and a lease is only safe against followers that refuse votes as long.
        store_cfg.replica.set_election_tick(LEGACY_TIMING.1 as usize);
        let limits = store_cfg.round_limits();
        let meta_store = tokio::task::spawn_blocking(move || {
            let disks = store::NodeDisks { log, engines, files: Arc::new(tern_core::files::RealFileSystem) };
            Store::open(id, data_dir, disks, Arc::new(tern_core::time::SystemClock::default()), rand::random(), store_cfg, Box::new(transport))
        })
        .await
        .map_err(|e| TernError::Internal(format!("open meta store: {e}")))??;
        let (stop, stopped) = watch::channel(false);
        let (store_thread, failed) =
            tern_transport::spawn_store_thread(format!("tern-meta-store-{id}"), move || store::run(meta_store, mailbox, limits), &stop)
                .map_err(internal("start meta store thread"))?;
        let lowest = peers.iter().map(|(i, _)| *i).min().expect("at least one meta peer");
        handle.send(StoreMsg::EnsureReplicas(vec![ReplicaSpec {
            group: CATALOG_GROUP,
            peer_id: cfg.id,
            peers: peers.iter().map(|(i, _)| (*i, *i)).collect(),
            learners: vec![],
            removing: vec![],
            initial_voters: vec![],
            initial: true,
            partition_count: 1,
            initial_partition_count: 0,
            preferred_leader: cfg.id == lowest,
            preferred_leader_peer: 0,
        }]));

        let settings =
            ClusterSettingsResponse { raft_tick_ms: cfg.raft_tick.as_millis() as u64, election_ticks: cfg.election_ticks, ..Default::default() };
        let keeper = Keeper::new(Arc::new(StoreIo { store: handle.clone(), clock: SystemClock::default() }), cfg.node_grace);
        let service = MetaService { settings, keeper: keeper.clone() };
        let mut tasks = Vec::new();
        // The keeper's loops: it looks at the catalog group's leadership every 100 ms and runs the
        // scheduler every second.
        let k = keeper.clone();
        tasks.push(tokio::spawn(every(Duration::from_millis(100), stopped.clone(), move || {
            let k = k.clone();
            async move { k.follow_leadership().await }
        })));
        let k = keeper.clone();
        tasks.push(tokio::spawn(every(Duration::from_secs(1), stopped.clone(), move || {
            let k = k.clone();
            async move {
                if let Err(e) = k.schedule_pass(false).await {
                    tracing::warn!("cannot persist scheduling decisions: {e}");
                }
            }
        })));
        let raft = tern_proto::raft_server::RaftServer::new(tern_transport::RaftService::new(
            cfg.id,
            meta_group_id,
            handle.clone(),
            cfg.data_dir.join("snapshots-received"),
        ))
        .max_decoding_message_size(tern_core::limits::RAFT_BATCH_BYTES_MAX);
        let mut server_stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            let incoming = tern_transport::incoming(listener);
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
        Ok(MetaNode { address, stop, tasks, store: handle, store_thread: Some(store_thread), failed, keeper })
    }

    /// Whether this node leads the meta group now (asked by work only the leader does, such as the
    /// periodic backups its process runs).
    pub fn leadership(&self) -> std::sync::Arc<dyn Fn() -> bool + Send + Sync> {
        let keeper = self.keeper.clone();
        std::sync::Arc::new(move || keeper.serving())
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
        wait_for_leadership(&node.keeper).await;
        node
    }

    async fn wait_for_leadership(keeper: &Keeper) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !keeper.serving() {
            assert!(std::time::Instant::now() < deadline, "meta never became leader");
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
        let keeper = &node.keeper;
        let (base, version) = keeper.snapshot_for_test();
        let mut first = base.clone();
        first.register("first:1", "").unwrap();
        let written = keeper.persist_for_test(version, crate::records::diff(&base, &first)).await.unwrap();
        assert_eq!(written, version + 1);
        let mut second = base.clone();
        second.register("second:1", "").unwrap();
        let e = keeper.persist_for_test(version, crate::records::diff(&base, &second)).await.unwrap_err();
        assert!(matches!(e, TernError::Unavailable(_)), "{e}");
        assert!(!keeper.serving(), "a refused write stops the leader answering until it reloads");
        wait_for_leadership(keeper).await;
        assert_eq!(keeper.snapshot_for_test(), (first, written + 1), "reloaded, then a barrier write");
        node.shutdown().await;
    }

    /// A table of the most partitions allowed is written as bounded raft entries and reads back
    /// whole after a restart.
    #[tokio::test]
    async fn the_largest_table_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let node = leading_meta(dir.path()).await;
        let mut nodes = Vec::new();
        for i in 0..3 {
            nodes.push(node.keeper.register(&format!("n{i}:1"), "", 0, 7).await.unwrap().0);
        }
        node.keeper.change(|c, _| c.create_table("huge", tern_core::limits::PARTITION_COUNT_MAX, 3, &nodes).map(|_| ())).await.unwrap();
        let expected = node.keeper.catalog();
        assert_eq!(expected.tables["huge"].partitions.len(), tern_core::limits::PARTITION_COUNT_MAX as usize);
        node.shutdown().await;
        let node = leading_meta(dir.path()).await;
        assert_eq!(node.keeper.catalog(), expected);
        node.shutdown().await;
    }
}
