//! A replica server's lifecycle: open storage, register with meta, run the store thread, serve gRPC,
//! heartbeat, and stop cleanly.

use crate::backup::BackupService;
use crate::dup::DupShipper;
use crate::service::KvService;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tern_core::limits::GRPC_MESSAGE_BYTES_MAX;
use tern_core::time::SystemClock;
use tern_core::{NodeId, TernError};
use tern_engine::{RocksEngineFactory, RocksSharedResources};
use tern_proto::backup_server::BackupServer;
use tern_proto::kv_server::KvServer;
use tern_proto::meta_client::MetaClient;
use tern_proto::raft_server::RaftServer;
use tern_proto::{ClusterSettingsRequest, HeartbeatRequest, RegisterRequest};
use tern_raft::log_store::RaftEngineLogStore;
use tern_raft::store::{self, Store, StoreConfig, StoreHandle, StoreMsg};
use tern_transport::{AddressBook, GrpcTransport, RaftService};
use tokio::sync::{oneshot, watch};

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Address other nodes and clients use to reach this server (default: the bound address).
    pub advertise: Option<String>,
    /// Meta server addresses.
    pub meta: Vec<String>,
    pub store: StoreConfig,
    pub heartbeat_interval: Duration,
    /// Snapshot transfer rate limit per transfer, bytes per second (0 = unlimited).
    pub snapshot_bytes_per_second: u64,
    /// Rate of a backup or restore of one partition when the request names none, bytes per second.
    pub backup_bytes_per_second: u64,
    pub block_cache_bytes: usize,
    pub write_buffer_bytes: usize,
    /// Failure domain; replicas of a partition go to distinct zones when possible.
    pub zone: String,
    /// Higher wins leadership of the partitions this server holds.
    pub leader_priority: i32,
    /// The raft tick this server expects; None adopts the cluster's (from meta). Raft timing is a
    /// cluster setting: a server whose value differs is refused at start.
    pub raft_tick: Option<Duration>,
}

impl ServerConfig {
    pub fn new(data_dir: PathBuf, listen: SocketAddr, meta: Vec<String>) -> ServerConfig {
        ServerConfig {
            data_dir,
            listen,
            advertise: None,
            meta,
            store: StoreConfig::default(),
            heartbeat_interval: Duration::from_secs(1),
            snapshot_bytes_per_second: 100 * 1024 * 1024,
            backup_bytes_per_second: 16 * 1024 * 1024,
            block_cache_bytes: 128 * 1024 * 1024,
            write_buffer_bytes: 64 * 1024 * 1024,
            zone: String::new(),
            leader_priority: 0,
            raft_tick: None,
        }
    }

    pub fn validate(&self) -> Result<(), TernError> {
        if self.meta.is_empty() {
            return Err(TernError::invalid("a server needs at least one meta address (--meta)"));
        }
        if self.heartbeat_interval.is_zero() {
            return Err(TernError::invalid("heartbeat interval must be positive"));
        }
        if self.store.tick_interval.is_zero() {
            return Err(TernError::invalid("raft tick interval must be positive"));
        }
        let (min, max) = (crate::backup::RATE_MIN, crate::backup::RATE_MAX);
        if !(min..=max).contains(&self.backup_bytes_per_second) {
            return Err(TernError::invalid(format!(
                "the default backup rate is {} bytes/s; it must be {min} (1 MiB/s) to {max} (100000 MiB/s)",
                self.backup_bytes_per_second
            )));
        }
        if self.block_cache_bytes < 1024 * 1024 {
            return Err(TernError::invalid("block cache must be at least 1 MiB"));
        }
        Ok(())
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct NodeIdentity {
    node_id: NodeId,
    /// 0 in files written before clusters had ids: learned from meta's heartbeat answers.
    #[serde(default)]
    cluster_id: u64,
    /// The cluster's raft timing, adopted from meta when the node joined (0: not known yet). Kept
    /// here so that a restart never waits for meta: partitions fail over without it.
    #[serde(default)]
    raft_tick_ms: u64,
    #[serde(default)]
    election_ticks: u32,
}

pub struct ServerNode {
    pub node_id: NodeId,
    pub address: String,
    store: StoreHandle,
    stop: watch::Sender<bool>,
    store_thread: Option<std::thread::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    failed: watch::Receiver<bool>,
    shipper: DupShipper,
}

fn internal(what: &str) -> impl Fn(std::io::Error) -> TernError + '_ {
    move |e| TernError::Internal(format!("{what}: {e}"))
}

/// Connects to a meta node, trying the addresses from `start` on (callers move `start` along after
/// a failure: the node that answered may not be the leader).
async fn meta_client(addresses: &[String], start: usize) -> Result<MetaClient<tonic::transport::Channel>, TernError> {
    let mut last = String::new();
    for i in 0..addresses.len() {
        let a = &addresses[(start + i) % addresses.len()];
        match tonic::transport::Endpoint::from_shared(format!("http://{a}"))
            .map_err(|e| TernError::invalid(format!("meta address {a:?}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true)
            .connect()
            .await
        {
            Ok(ch) => return Ok(MetaClient::new(ch)),
            Err(e) => last = format!("{a}: {e}"),
        }
    }
    Err(TernError::Unavailable(format!("no meta server reachable ({last})")))
}

/// Calls meta until it answers (meta may be electing its leader or starting), for about five minutes.
async fn ask_meta<T, F, Fut>(cfg: &ServerConfig, what: &str, call: F) -> Result<T, TernError>
where
    F: Fn(MetaClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<T, TernError>>,
{
    let mut attempt = 0u32;
    loop {
        let r = match meta_client(&cfg.meta, attempt as usize).await {
            Ok(meta) => call(meta).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() && attempt < 600 => {
                attempt += 1;
                if attempt % 10 == 5 {
                    tracing::warn!("waiting for meta to {what}: {e}");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The cluster's raft timing as meta tells it.
async fn cluster_raft_timing(cfg: &ServerConfig) -> Result<(u64, u32), TernError> {
    let settings = ask_meta(cfg, "tell the cluster's settings", |mut meta| async move {
        let r = meta.get_cluster_settings(ClusterSettingsRequest {}).await.map_err(|s| tern_proto::from_status(&s))?.into_inner();
        tern_proto::check(&r.error)?;
        Ok(r)
    })
    .await?;
    if settings.raft_tick_ms == 0 || settings.election_ticks == 0 {
        return Err(TernError::Internal(format!("meta sent unusable raft timing {settings:?}")));
    }
    Ok((settings.raft_tick_ms, settings.election_ticks))
}

/// Adopts the cluster's raft timing (from the node's identity); a server configured with other
/// timing is refused (its read lease would not match its peers' vote refusal).
fn adopt_raft_timing(cfg: &mut ServerConfig, identity: &NodeIdentity) -> Result<(), TernError> {
    let tick = Duration::from_millis(identity.raft_tick_ms);
    if let Some(mine) = cfg.raft_tick {
        if mine != tick {
            return Err(TernError::invalid(format!(
                "this server is configured with a raft tick of {} ms but its cluster runs {} ms: every server of a cluster shares the meta's --raft-tick-ms (leave --raft-tick-ms out to adopt it)",
                mine.as_millis(),
                identity.raft_tick_ms
            )));
        }
    }
    cfg.store.tick_interval = tick;
    cfg.store.replica.set_election_tick(identity.election_ticks as usize);
    Ok(())
}

/// Loads this server's identity (node id, cluster id, the cluster's raft timing), or registers with
/// meta for a new one. Meta is asked only for what the file does not hold yet.
async fn node_identity(cfg: &ServerConfig, address: &str) -> Result<NodeIdentity, TernError> {
    let path = cfg.data_dir.join("node.json");
    // Durably (file and directory synced), at once after registering: a node that forgot its
    // identity would register again as a new node while its replicas' peers still count on the old one.
    let save = |identity: &NodeIdentity| {
        tern_core::files::write_file_atomically(&path, &serde_json::to_vec(identity).expect("serialize")).map_err(internal("write node.json"))
    };
    let mut identity = if path.exists() {
        let bytes = std::fs::read(&path).map_err(internal("read node.json"))?;
        serde_json::from_slice(&bytes).map_err(|e| TernError::Corruption(format!("{}: {e}", path.display())))?
    } else {
        let identity = register(cfg, address).await?;
        save(&identity)?;
        identity
    };
    if identity.raft_tick_ms == 0 || identity.election_ticks == 0 {
        (identity.raft_tick_ms, identity.election_ticks) = cluster_raft_timing(cfg).await?;
        save(&identity)?;
    }
    Ok(identity)
}

/// Registers this server with meta for a new node id.
async fn register(cfg: &ServerConfig, address: &str) -> Result<NodeIdentity, TernError> {
    let request = RegisterRequest { address: address.to_string(), zone: cfg.zone.clone(), leader_priority: cfg.leader_priority };
    ask_meta(cfg, "register this server", |mut meta| {
        let request = request.clone();
        async move {
            let r = meta.register(request).await.map_err(|s| tern_proto::from_status(&s))?.into_inner();
            tern_proto::check(&r.error)?;
            Ok(NodeIdentity { node_id: r.node_id, cluster_id: r.cluster_id, raft_tick_ms: 0, election_ticks: 0 })
        }
    })
    .await
}

impl ServerNode {
    pub async fn start(mut cfg: ServerConfig) -> Result<ServerNode, TernError> {
        cfg.validate()?;
        tern_core::files::FileSystem::create_dir_all_durably(&tern_core::files::RealFileSystem, &cfg.data_dir)
            .map_err(internal("create data directory"))?;
        let listener = tokio::net::TcpListener::bind(cfg.listen).await.map_err(internal("bind server address"))?;
        let bound = listener.local_addr().map_err(internal("server address"))?;
        let address = cfg.advertise.clone().unwrap_or_else(|| bound.to_string());
        let identity = node_identity(&cfg, &address).await?;
        adopt_raft_timing(&mut cfg, &identity)?;
        let node_id = identity.node_id;
        let cluster_id = Arc::new(std::sync::atomic::AtomicU64::new(identity.cluster_id));

        let log = Arc::new(RaftEngineLogStore::open(&cfg.data_dir.join("raft-log"))?);
        let engines: Arc<RocksEngineFactory> = Arc::new(RocksEngineFactory::new(
            RocksSharedResources::new(cfg.block_cache_bytes, cfg.write_buffer_bytes),
            Some(tern_raft::keys::is_expired_record),
        ));
        let receive_dir = cfg.data_dir.join("snapshots-received");
        let _ = std::fs::remove_dir_all(&receive_dir);
        std::fs::create_dir_all(&receive_dir).map_err(internal("create snapshot directory"))?;

        let (handle, mailbox) = store::mailbox(cfg.store.mailbox_capacity);
        let addresses: AddressBook = Default::default();
        let transport = GrpcTransport::new(
            node_id,
            cluster_id.clone(),
            tokio::runtime::Handle::current(),
            addresses.clone(),
            handle.clone(),
            cfg.snapshot_bytes_per_second,
        );
        let data_dir = cfg.data_dir.clone();
        let mut store_cfg = cfg.store.clone();
        store_cfg.replica.cluster_id = cluster_id.clone();
        let (writer_wakes, log_writer_thread) = (handle.clone(), cfg.store.log_writer_thread);
        let backup =
            BackupServer::new(BackupService::new(handle.clone(), engines.clone(), cfg.data_dir.join("backup-work"), cfg.backup_bytes_per_second)?);
        let shipper =
            DupShipper::new(handle.clone(), engines.clone(), cfg.data_dir.join("dup-work"), cluster_id.clone(), cfg.backup_bytes_per_second)?;
        let store = tokio::task::spawn_blocking(move || {
            let disks = store::NodeDisks { log, engines, files: Arc::new(tern_core::files::RealFileSystem) };
            let mut store = Store::open(node_id, data_dir, disks, Arc::new(SystemClock::default()), rand::random(), store_cfg, Box::new(transport))?;
            if log_writer_thread {
                store.write_log_on_thread(writer_wakes)?;
            }
            Ok::<_, TernError>(store)
        })
        .await
        .map_err(|e| TernError::Internal(format!("open store: {e}")))??;
        let limits = cfg.store.round_limits();
        let (stop, stopped) = watch::channel(false);
        let (store_thread, failed) =
            tern_transport::spawn_store_thread(format!("tern-store-{node_id}"), move || store::run(store, mailbox, limits), &stop)
                .map_err(internal("start store thread"))?;

        let mut tasks = Vec::new();
        let requests: Arc<std::sync::atomic::AtomicU64> = Default::default();
        let kv = KvServer::new(KvService::new(handle.clone(), requests.clone()))
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(usize::MAX);
        let raft = RaftServer::new(RaftService::new(node_id, cluster_id.clone(), handle.clone(), receive_dir))
            .max_decoding_message_size(tern_core::limits::RAFT_BATCH_BYTES_MAX)
            .max_encoding_message_size(usize::MAX);
        let mut server_stop = stopped.clone();
        tasks.push(tokio::spawn(async move {
            let incoming = tern_transport::incoming(listener);
            let r = tonic::transport::Server::builder()
                .add_service(kv)
                .add_service(raft)
                .add_service(backup)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = server_stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!("server stopped: {e}");
            }
        }));
        tasks.push(tokio::spawn(heartbeat_loop(
            (node_id, address.clone(), cfg.zone.clone(), cfg.leader_priority),
            (cfg.data_dir.clone(), requests, cluster_id),
            cfg.meta.clone(),
            cfg.heartbeat_interval,
            (handle.clone(), shipper.clone()),
            addresses,
            stopped,
        )));
        tracing::info!(node_id, %address, "replica server started");
        Ok(ServerNode { node_id, address, store: handle, stop, store_thread: Some(store_thread), tasks, failed, shipper })
    }

    /// Resolves if the node failed on its own (its store thread died): it has stopped serving and
    /// heartbeating, and the process should exit so a supervisor restarts it.
    pub async fn failed(&self) {
        let mut failed = self.failed.clone();
        let _ = failed.wait_for(|f| *f).await;
    }

    /// Stops serving, answers waiting clients, and waits for the store thread to finish.
    pub async fn shutdown(mut self) {
        self.shipper.stop();
        tern_transport::stop_node(&self.stop, std::mem::take(&mut self.tasks), &self.store, self.store_thread.take()).await;
    }

    pub fn data_dir_of(cfg: &ServerConfig) -> &Path {
        &cfg.data_dir
    }
}

/// How long a heartbeat waits for the store's replica statuses. A store that does not answer in time
/// is stalled: the beat is skipped, so meta sees the node go quiet rather than a node with no replicas.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one heartbeat call to meta may take before the connection is dropped and another meta
/// address is tried (a half-open connection must not silence the node for good).
const HEARTBEAT_CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// The store's replica statuses; an error if the store is stalled, full or gone.
async fn replica_statuses(store: &StoreHandle) -> Result<Vec<tern_proto::ReplicaStatus>, TernError> {
    let (tx, rx) = oneshot::channel();
    store.send(StoreMsg::Status(Box::new(move |s| drop(tx.send(s)))));
    match tokio::time::timeout(STATUS_TIMEOUT, rx).await {
        Ok(Ok(statuses)) => Ok(statuses),
        Ok(Err(_)) => Err(TernError::Unavailable("the store did not take the status request (full or stopped)".into())),
        Err(_) => Err(TernError::Timeout(format!("the store did not answer a status request within {STATUS_TIMEOUT:?}"))),
    }
}

/// Bytes under a directory (best effort: unreadable entries count as empty).
fn directory_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => directory_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// How often (in heartbeats) the data directory is measured.
const DISK_MEASURE_EVERY: u64 = 10;

async fn heartbeat_loop(
    (node_id, address, zone, leader_priority): (NodeId, String, String, i32),
    (data_dir, requests, cluster_id): (PathBuf, Arc<std::sync::atomic::AtomicU64>, Arc<std::sync::atomic::AtomicU64>),
    meta: Vec<String>,
    interval: Duration,
    (store, shipper): (StoreHandle, DupShipper),
    addresses: AddressBook,
    mut stopped: watch::Receiver<bool>,
) {
    let mut client = None;
    let mut next_meta = 0usize;
    let (mut beats, mut disk_used_bytes, mut last_beat) = (0u64, 0u64, tokio::time::Instant::now());
    let mut warned_at: Option<tokio::time::Instant> = None;
    let mut link = tern_raft::meta_link::MetaLink::default();
    loop {
        if beats % DISK_MEASURE_EVERY == 0 {
            let dir = data_dir.clone();
            disk_used_bytes = tokio::task::spawn_blocking(move || directory_bytes(&dir)).await.unwrap_or(disk_used_bytes);
        }
        beats += 1;
        if client.is_none() {
            match meta_client(&meta, next_meta).await {
                Ok(c) => client = Some(c),
                Err(e) => warn_every(&mut warned_at, format!("heartbeat: {e}")),
            }
        }
        let replicas = match replica_statuses(&store).await {
            Ok(r) => Some(r),
            Err(e) => {
                warn_every(&mut warned_at, format!("heartbeat skipped: {e}"));
                None
            }
        };
        if let (Some(c), Some(replicas)) = (client.as_mut(), replicas) {
            let served = requests.swap(0, std::sync::atomic::Ordering::Relaxed);
            let requests_interval_ms = last_beat.elapsed().as_millis() as u64;
            last_beat = tokio::time::Instant::now();
            let mut beat = HeartbeatRequest {
                node_id,
                address: address.clone(),
                zone: zone.clone(),
                disk_used_bytes,
                requests: served,
                requests_interval_ms,
                leader_priority,
                duplication_status: shipper.statuses(),
                ..Default::default()
            };
            let number = link.prepare(&mut beat, replicas.clone());
            let answer = match tokio::time::timeout(HEARTBEAT_CALL_TIMEOUT, c.heartbeat(beat)).await {
                Ok(r) => r,
                Err(_) => Err(tonic::Status::deadline_exceeded(format!("no answer within {HEARTBEAT_CALL_TIMEOUT:?}"))),
            };
            // One heartbeat at a time: an answer is always to the last one.
            match answer.map(|r| link.answered(r.into_inner(), number)) {
                Ok(None) => {}
                Ok(Some(r)) => {
                    if let Err(e) = tern_proto::check(&r.error) {
                        tracing::warn!("meta refused heartbeat: {e}");
                    }
                    if r.cluster_id != 0 {
                        cluster_id.store(r.cluster_id, std::sync::atomic::Ordering::Relaxed);
                    }
                    {
                        let mut book = addresses.write();
                        for n in &r.nodes {
                            book.insert(n.node_id, n.address.clone());
                        }
                    }
                    for msg in tern_raft::store::reconcile_with_meta(&r) {
                        store.send(msg);
                    }
                    if r.error.is_none() {
                        shipper.on_heartbeat(&r.duplications, &replicas);
                    }
                }
                Err(status) => {
                    link.failed();
                    warn_every(&mut warned_at, format!("heartbeat to meta failed: {}", status.message()));
                    client = None;
                    next_meta += 1;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
    }
}

/// Logs a heartbeat problem at warn level, at most every few seconds (meta being elected or away for a
/// while should not flood the log, but a node that cannot heartbeat must say so).
fn warn_every(last: &mut Option<tokio::time::Instant>, message: String) {
    const EVERY: Duration = Duration::from_secs(5);
    if last.is_none_or(|t| t.elapsed() >= EVERY) {
        *last = Some(tokio::time::Instant::now());
        tracing::warn!("{message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Configuration values that cannot work are refused with a message naming the setting.
    #[test]
    fn config_validation() {
        let ok = ServerConfig::new("d".into(), "127.0.0.1:0".parse().unwrap(), vec!["127.0.0.1:1".into()]);
        assert!(ok.validate().is_ok());
        let mut c = ok.clone();
        c.meta.clear();
        assert!(c.validate().unwrap_err().to_string().contains("--meta"));
        let mut c = ok.clone();
        c.heartbeat_interval = Duration::ZERO;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.store.tick_interval = Duration::ZERO;
        assert!(c.validate().is_err());
        let mut c = ok;
        c.block_cache_bytes = 1;
        assert!(c.validate().unwrap_err().to_string().contains("block cache"));
    }
}
