//! Connections, routing and the request loop.

use crate::batch::BatchConn;
use crate::retry::RetryPolicy;
use crate::routing::{next_step, LeaderTable, NextStep, Reaction, Sequencer};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tern_core::limits::GRPC_MESSAGE_BYTES_MAX;
use tern_core::time::SeededRandom;
use tern_core::{NodeId, TernError, TernResult};
use tern_proto::backup_client::BackupClient;
use tern_proto::kv_client::KvClient;
use tern_proto::meta_client::MetaClient;
use tern_proto::*;
use tokio::time::Instant;
use tonic::transport::Channel;

#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub meta: Vec<String>,
    /// Total time one operation may take, retries included.
    pub timeout: Duration,
    /// Longest one attempt waits for a server before trying another replica (within `timeout`).
    pub attempt_timeout: Duration,
    pub retry: RetryPolicy,
}

impl ClientConfig {
    pub fn new(meta: Vec<String>) -> ClientConfig {
        ClientConfig { meta, timeout: Duration::from_secs(10), attempt_timeout: Duration::from_secs(3), retry: RetryPolicy::default() }
    }
}

/// A table's routing: partitions with their replicas and the leader we currently believe in.
struct Route {
    table: TableInfo,
    leaders: LeaderTable,
    /// An error said the routing is out of date: the next request asks meta what changed.
    stale: std::sync::atomic::AtomicBool,
}

impl Route {
    fn new(table: TableInfo, leaders: LeaderTable) -> Route {
        Route { table, leaders, stale: Default::default() }
    }
}

struct Inner {
    cfg: ClientConfig,
    meta: Mutex<Option<MetaClient<Channel>>>,
    channels: Mutex<HashMap<String, Channel>>,
    /// One batch stream per server address (reads and writes go through these).
    batches: Mutex<HashMap<String, Arc<BatchConn>>>,
    addresses: RwLock<HashMap<NodeId, String>>,
    routes: RwLock<HashMap<String, Arc<Route>>>,
    client_id: u64,
    sequencer: Mutex<Sequencer>,
    rng: Mutex<SeededRandom>,
    /// When node addresses were last re-read from meta after a connection failure.
    nodes_refreshed_at: Mutex<Option<Instant>>,
}

/// Connection failures re-read node addresses from meta at most this often (servers may have moved).
const NODE_REFRESH_INTERVAL: Duration = Duration::from_millis(500);

/// A connection to a Tern cluster; cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// A handle on one table.
#[derive(Clone)]
pub struct Table {
    client: Client,
    name: String,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScanOptions {
    pub start: Vec<u8>,
    pub stop: Vec<u8>,
    pub prefix: Vec<u8>,
    pub limit: u32,
    pub no_value: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CasResult {
    pub set_done: bool,
    pub check_value: Option<Vec<u8>>,
}

impl CasResult {
    fn of(r: WriteResponse) -> CasResult {
        CasResult { set_done: r.set_done, check_value: r.check_value_exists.then(|| r.check_value.to_vec()) }
    }
}

/// Where a full-table scan continues: a partition and a resume token inside it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FullScanCursor {
    pub partition: u32,
    pub token: Vec<u8>,
    pub done: bool,
    /// The partition count the scan walks (0: not started).
    pub partition_count: u32,
}

fn status_error(s: tonic::Status) -> TernError {
    tern_proto::from_status(&s)
}

enum Routed<'a> {
    Hashkey(&'a [u8]),
    Partition(u32),
    /// A partition as a scan walking `partition_count` partitions knows it: a split since is an
    /// error, not a silent half of the partition.
    Walk {
        partition: u32,
        partition_count: u32,
    },
}

impl Client {
    pub fn new(cfg: ClientConfig) -> TernResult<Client> {
        if cfg.meta.is_empty() {
            return Err(TernError::invalid("the client needs at least one meta address"));
        }
        Ok(Client {
            inner: Arc::new(Inner {
                cfg,
                meta: Mutex::new(None),
                channels: Mutex::new(HashMap::new()),
                batches: Mutex::new(HashMap::new()),
                addresses: RwLock::new(HashMap::new()),
                routes: RwLock::new(HashMap::new()),
                client_id: rand::random::<u64>() | 1,
                sequencer: Mutex::new(Sequencer::new(1)),
                rng: Mutex::new(SeededRandom::from_entropy()),
                nodes_refreshed_at: Mutex::new(None),
            }),
        })
    }

    pub fn table(&self, name: &str) -> Table {
        Table { client: self.clone(), name: name.to_string() }
    }

    /// The configuration this client was made with (to make another client like it).
    pub fn config(&self) -> &ClientConfig {
        &self.inner.cfg
    }

    fn channel(&self, address: &str) -> TernResult<Channel> {
        let mut channels = self.inner.channels.lock();
        if let Some(c) = channels.get(address) {
            return Ok(c.clone());
        }
        let c = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| TernError::invalid(format!("address {address:?}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            // A connection to a server that stopped (paused, gone without a FIN) is found dead and
            // replaced instead of holding every request sent on it.
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true)
            .connect_lazy();
        channels.insert(address.to_string(), c.clone());
        Ok(c)
    }

    /// A meta client (the first meta address that answers).
    pub async fn meta(&self) -> TernResult<MetaClient<Channel>> {
        if let Some(m) = self.inner.meta.lock().clone() {
            return Ok(m);
        }
        let mut last = TernError::Unavailable("no meta address".into());
        for a in &self.inner.cfg.meta {
            let mut m = MetaClient::new(self.channel(a)?);
            match m.list_nodes(ListNodesRequest {}).await {
                Ok(r) => {
                    self.learn_nodes(&r.into_inner().nodes);
                    *self.inner.meta.lock() = Some(m.clone());
                    return Ok(m);
                }
                Err(s) => last = status_error(s),
            }
        }
        Err(last)
    }

    fn forget_meta(&self) {
        *self.inner.meta.lock() = None;
    }

    fn learn_nodes(&self, nodes: &[NodeInfo]) {
        let mut a = self.inner.addresses.write();
        for n in nodes {
            a.insert(n.node_id, n.address.clone());
        }
    }

    /// Runs a meta call with retries on transport failures, inside the client timeout.
    pub async fn meta_call<T, F, Fut>(&self, f: F) -> TernResult<T>
    where
        F: Fn(MetaClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + self.inner.cfg.timeout;
        let mut attempt = 0;
        loop {
            let r = match self.meta().await {
                Ok(m) => f(m).await.map_err(status_error),
                Err(e) => Err(e),
            };
            match r {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    self.forget_meta();
                    let d = self.inner.cfg.retry.delay(attempt, &mut *self.inner.rng.lock());
                    tokio::time::sleep(d).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts doubling a table's partitions (`cancel`: cancels a split still preparing); meta's
    /// answer says what it did. Progress is in `table_info(..).split` (None once done).
    pub async fn split_table(&self, table: &str, cancel: bool) -> TernResult<String> {
        let action = if cancel { tern_proto::SplitAction::SplitCancel } else { tern_proto::SplitAction::SplitStart } as i32;
        let request = tern_proto::SplitTableRequest { table: table.to_string(), action };
        let r = self.meta_call(|mut m| {
            let request = request.clone();
            async move { m.split_table(request).await.map(|r| r.into_inner()) }
        });
        let r = r.await?;
        tern_proto::check(&r.error)?;
        Ok(r.message)
    }

    /// A table's layout from meta: partitions, their replicas and leader hints.
    pub async fn table_info(&self, table: &str) -> TernResult<TableInfo> {
        self.table_info_since(table, 0).await
    }

    /// `table_info` for a caller holding the table as of routing version `known`: meta may list
    /// only the partitions that changed since (`routing::merge_table`).
    async fn table_info_since(&self, table: &str, known: u64) -> TernResult<TableInfo> {
        let name = table.to_string();
        let r = self
            .meta_call(|mut m| {
                let name = name.clone();
                async move { m.get_table(TableRequest { name, known_routing_version: known }).await.map(|r| r.into_inner()) }
            })
            .await?;
        tern_proto::check(&r.error)?;
        r.table.ok_or_else(|| TernError::Internal("meta returned no table".into()))
    }

    /// The table's routing from meta: only what changed since the route held, when one is.
    async fn refresh_route(&self, table: &str) -> TernResult<Arc<Route>> {
        let before = self.inner.routes.read().get(table).cloned();
        let fresh = self.table_info_since(table, before.as_ref().map_or(0, |r| r.table.routing_version)).await?;
        let (info, leaders) = match crate::routing::refreshed(before.as_ref().map(|b| (&b.table, &b.leaders)), fresh) {
            Some(refreshed) => refreshed,
            // A delta that does not fit what is held: the whole table.
            None => {
                let info = self.table_info(table).await?;
                let leaders = LeaderTable::from_table(&info);
                (info, leaders)
            }
        };
        let needs_nodes = {
            let a = self.inner.addresses.read();
            info.partitions.iter().flat_map(|p| &p.peers).any(|p| !a.contains_key(&p.node_id))
        };
        if needs_nodes {
            let nodes = self.meta_call(|mut m| async move { m.list_nodes(ListNodesRequest {}).await.map(|r| r.into_inner()) }).await?;
            self.learn_nodes(&nodes.nodes);
        }
        let route = Arc::new(Route::new(info, leaders));
        self.inner.routes.write().insert(table.to_string(), route.clone());
        Ok(route)
    }

    async fn route(&self, table: &str) -> TernResult<Arc<Route>> {
        let cached = self.inner.routes.read().get(table).cloned();
        let route = match cached {
            Some(r) if !r.table.restoring && !r.stale.load(std::sync::atomic::Ordering::Relaxed) => return Ok(r),
            // Asked again: the restore may have finished since.
            _ => self.refresh_route(table).await?,
        };
        if route.table.restoring {
            return Err(TernError::Unavailable(format!(
                "table {table:?} is being restored from a backup; it takes requests once the restore is done"
            )));
        }
        Ok(route)
    }

    /// Marks the table's route out of date (kept, so that the refresh asks only for what changed).
    fn forget_route(&self, table: &str) {
        if let Some(r) = self.inner.routes.read().get(table) {
            r.stale.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The cluster's settings: raft timing, id and the tag its record versions carry.
    pub async fn cluster_settings(&self) -> TernResult<ClusterSettingsResponse> {
        let r = self.meta_call(|mut m| async move { m.get_cluster_settings(ClusterSettingsRequest {}).await.map(|r| r.into_inner()) }).await?;
        tern_proto::check(&r.error)?;
        Ok(r)
    }

    /// Applies records another cluster's duplication ships to one partition of `table`, where
    /// each applies only if its version is newer. `partition_count` is the sender's: partition i
    /// ships to partition i, so a table with another count is refused.
    pub async fn apply_duplicated(&self, table: &str, partition: u32, partition_count: u32, apply: DupApply) -> TernResult<WriteResponse> {
        let count = self.partition_count(table).await?;
        if count != partition_count {
            return Err(TernError::invalid(format!(
                "table {table} has {count} partitions; duplication needs as many as its source, {partition_count}"
            )));
        }
        self.execute(
            table,
            Routed::Partition(partition),
            |pref| {
                batch_item::Op::Write(WriteRequest {
                    partition: Some(pref),
                    op: Some(write_request::Op::DupApply(apply.clone())),
                    ..Default::default()
                })
            },
            |reply| match reply {
                batch_reply::Result::Write(r) => Some((r.error.clone(), r)),
                _ => None,
            },
        )
        .await
    }

    /// The partition count of a table (fetching its route if needed).
    pub async fn partition_count(&self, table: &str) -> TernResult<u32> {
        Ok(self.route(table).await?.table.partition_count)
    }

    fn address(&self, node: NodeId) -> TernResult<String> {
        self.inner.addresses.read().get(&node).cloned().ok_or_else(|| TernError::StaleConfig(format!("no address known for node {node}")))
    }

    /// The batch stream to a node's server, opened anew when the last one failed.
    fn batch_conn(&self, node: NodeId) -> TernResult<Arc<BatchConn>> {
        let address = self.address(node)?;
        let mut batches = self.inner.batches.lock();
        if let Some(b) = batches.get(&address).filter(|b| b.is_alive()) {
            return Ok(b.clone());
        }
        let b = Arc::new(BatchConn::open(self.channel(&address)?));
        batches.insert(address, b.clone());
        Ok(b)
    }

    fn kv(&self, node: NodeId) -> TernResult<KvClient<Channel>> {
        let address = self.address(node)?;
        Ok(KvClient::new(self.channel(&address)?)
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX.max(64 << 20))
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX))
    }

    /// The backup service of a server (the backup coordinator's way to its servers).
    pub(crate) fn backup_service(&self, node: NodeId) -> TernResult<BackupClient<Channel>> {
        Ok(BackupClient::new(self.channel(&self.address(node)?)?))
    }

    /// Sends one request to the partition leader with the retry loop. `build` makes the request for
    /// a partition ref; `extract` takes the response's error and value out of the reply.
    async fn execute<T, B, X>(&self, table: &str, routed: Routed<'_>, build: B, extract: X) -> TernResult<T>
    where
        B: Fn(PartitionRef) -> batch_item::Op,
        X: Fn(batch_reply::Result) -> Option<(Option<Error>, T)>,
    {
        let deadline = Instant::now() + self.inner.cfg.timeout;
        let mut attempt: u32 = 0;
        loop {
            let result: TernResult<T> = async {
                let route = self.route(table).await?;
                let (partition, count) = match routed {
                    Routed::Hashkey(h) => crate::routing::locate(&route.table, h),
                    Routed::Partition(p) => match crate::routing::partition_count_of(&route.table, p) {
                        Some(count) => (p, count),
                        None => {
                            let count = route.table.partition_count;
                            return Err(TernError::invalid(format!("partition {p} out of range ({count})")));
                        }
                    },
                    Routed::Walk { partition, partition_count } => match crate::routing::partition_count_of(&route.table, partition) {
                        Some(count) if count == partition_count => (partition, count),
                        _ => return Err(TernError::invalid(format!("table {table} split during this scan: start it again"))),
                    },
                };
                let node = route.leaders.leader(partition);
                // One attempt never takes the whole deadline: a server that stopped answering (paused,
                // cut off) is left for another replica while time remains.
                let attempt_time = deadline.saturating_duration_since(Instant::now()).min(self.inner.cfg.attempt_timeout);
                let pref = PartitionRef { table_id: route.table.table_id, partition, partition_count: count };
                let outcome = tokio::time::timeout(attempt_time, self.batch_conn(node)?.call(build(pref))).await;
                let r = match outcome {
                    Err(_) => Err(TernError::Timeout(format!("node {node} did not answer within {attempt_time:?}"))),
                    Ok(Err(e)) => Err(e),
                    Ok(Ok(reply)) => match extract(reply) {
                        Some((error, value)) => tern_proto::check(&error).map(|_| value),
                        None => Err(TernError::Internal("the server answered with the wrong kind of reply".into())),
                    },
                };
                if let Err(e) = &r {
                    if let TernError::PartitionSplit { partition_count, .. } = e {
                        // Route by the split at once (meta hears of it a heartbeat later).
                        if let Some((learned, child)) = crate::routing::learn_split(&route.table, partition, *partition_count, node) {
                            let leaders = LeaderTable::learned(&learned, &route.leaders, child, node);
                            let mut routes = self.inner.routes.write();
                            // Unless another request has put a newer route there meanwhile.
                            if routes.get(table).is_some_and(|cached| Arc::ptr_eq(cached, &route)) {
                                routes.insert(table.to_string(), Arc::new(Route::new(learned, leaders)));
                            }
                            return r;
                        }
                    }
                    match route.leaders.observe(partition, node, e) {
                        Reaction::RefreshRoute => self.forget_route(table),
                        Reaction::RefreshNodes => self.maybe_refresh_nodes().await,
                        Reaction::None => {}
                    }
                }
                r
            }
            .await;
            let error = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let step = next_step(error, attempt, remaining, &self.inner.cfg.retry, &mut *self.inner.rng.lock());
            match step {
                NextStep::GiveUp(e) => return Err(e),
                NextStep::Retry(pause) => {
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            }
            attempt += 1;
        }
    }

    /// Every write carries (client id, sequence): a retry after a lost answer, or a late duplicate,
    /// is applied at most once.
    async fn write(&self, table: &str, hashkey: &[u8], op: write_request::Op) -> TernResult<WriteResponse> {
        self.write_routed(table, Routed::Hashkey(hashkey), op).await
    }

    async fn write_routed(&self, table: &str, routed: Routed<'_>, op: write_request::Op) -> TernResult<WriteResponse> {
        let in_flight = InFlight::register(&self.inner);
        let seq = in_flight.seq;
        let client_id = self.inner.client_id;
        let r = self
            .execute(
                table,
                routed,
                |partition| {
                    let first_incomplete_seq = self.inner.sequencer.lock().floor(seq);
                    batch_item::Op::Write(WriteRequest { partition: Some(partition), client_id, seq, first_incomplete_seq, op: Some(op.clone()) })
                },
                |reply| match reply {
                    batch_reply::Result::Write(r) => Some((r.error.clone(), r)),
                    _ => None,
                },
            )
            .await;
        drop(in_flight);
        r
    }

    async fn read(&self, table: &str, routed: Routed<'_>, op: read_request::Op) -> TernResult<ReadResponse> {
        self.execute(
            table,
            routed,
            |partition| batch_item::Op::Read(ReadRequest { partition: Some(partition), allow_stale: false, op: Some(op.clone()) }),
            |reply| match reply {
                batch_reply::Result::Read(r) => Some((r.error.clone(), r)),
                _ => None,
            },
        )
        .await
    }

    /// Checksum of one replica (by node), for consistency checks and tests.
    pub async fn replica_checksum(&self, node: NodeId, group_id: u64) -> TernResult<ChecksumResponse> {
        self.checksum_of(node, ChecksumRequest { group_id, at_unix_ms: 0, data_only: false }).await
    }

    /// A checksum of one replica (by node) as the request asks for it.
    pub async fn checksum_of(&self, node: NodeId, request: ChecksumRequest) -> TernResult<ChecksumResponse> {
        let mut kv = self.kv(node)?;
        let r = kv.checksum(request).await.map_err(status_error)?.into_inner();
        tern_proto::check(&r.error)?;
        Ok(r)
    }

    /// Re-reads node addresses from meta after a connection failure, at most every
    /// NODE_REFRESH_INTERVAL (a server may have restarted on another address).
    async fn maybe_refresh_nodes(&self) {
        {
            let mut at = self.inner.nodes_refreshed_at.lock();
            if at.is_some_and(|t| t.elapsed() < NODE_REFRESH_INTERVAL) {
                return;
            }
            *at = Some(Instant::now());
        }
        if let Ok(m) = self.meta().await {
            if let Ok(r) = m.clone().list_nodes(ListNodesRequest {}).await {
                self.learn_nodes(&r.into_inner().nodes);
            }
        }
    }

    /// Refreshes node addresses from meta (after servers moved).
    pub async fn refresh_nodes(&self) -> TernResult<Vec<NodeInfo>> {
        let nodes = self.meta_call(|mut m| async move { m.list_nodes(ListNodesRequest {}).await.map(|r| r.into_inner()) }).await?;
        self.learn_nodes(&nodes.nodes);
        Ok(nodes.nodes)
    }
}

/// A write's sequence number, registered as in flight for as long as this lives (also when the
/// caller drops the write's future half way): the floor sent with other writes never passes it.
struct InFlight<'a> {
    inner: &'a Inner,
    seq: u64,
}

impl<'a> InFlight<'a> {
    fn register(inner: &'a Inner) -> InFlight<'a> {
        let seq = inner.sequencer.lock().begin();
        InFlight { inner, seq }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.inner.sequencer.lock().finish(self.seq);
    }
}

fn bytes(b: &[u8]) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(b)
}

impl Table {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub async fn set(&self, hashkey: &[u8], sortkey: &[u8], value: &[u8], ttl_seconds: u32) -> TernResult<()> {
        self.multi_set(hashkey, &[(sortkey.to_vec(), value.to_vec())], ttl_seconds).await
    }

    /// Sets several sortkeys of one hashkey atomically.
    pub async fn multi_set(&self, hashkey: &[u8], values: &[(Vec<u8>, Vec<u8>)], ttl_seconds: u32) -> TernResult<()> {
        let op = write_request::Op::Set(MultiSet {
            hashkey: bytes(hashkey),
            values: values.iter().map(|(s, v)| SortkeyValue { sortkey: bytes(s), value: bytes(v), ttl_seconds, expire_at_ms: 0 }).collect(),
        });
        self.client.write(&self.name, hashkey, op).await.map(|_| ())
    }

    /// Deletes one record; true if it existed.
    pub async fn del(&self, hashkey: &[u8], sortkey: &[u8]) -> TernResult<bool> {
        Ok(self.multi_del(hashkey, &[sortkey.to_vec()]).await? > 0)
    }

    /// Deletes several sortkeys of one hashkey atomically; returns how many existed.
    pub async fn multi_del(&self, hashkey: &[u8], sortkeys: &[Vec<u8>]) -> TernResult<u64> {
        let op = write_request::Op::Del(MultiDel { hashkey: bytes(hashkey), sortkeys: sortkeys.iter().map(|s| bytes(s)).collect() });
        Ok(self.client.write(&self.name, hashkey, op).await?.count)
    }

    /// Adds `delta` to an integer record (absent = 0) exactly once, even when retried.
    pub async fn incr(&self, hashkey: &[u8], sortkey: &[u8], delta: i64, ttl_seconds: u32) -> TernResult<i64> {
        let op = write_request::Op::Incr(Incr { hashkey: bytes(hashkey), sortkey: bytes(sortkey), delta, ttl_seconds });
        Ok(self.client.write(&self.name, hashkey, op).await?.new_value)
    }

    /// If (hashkey, check_sortkey) passes the check, sets (hashkey, set_sortkey) = value, atomically and
    /// exactly once.
    #[allow(clippy::too_many_arguments)]
    pub async fn check_and_set(
        &self,
        hashkey: &[u8],
        check_sortkey: &[u8],
        check: CheckType,
        operand: &[u8],
        set_sortkey: &[u8],
        value: &[u8],
        ttl_seconds: u32,
    ) -> TernResult<CasResult> {
        let op = write_request::Op::CheckAndSet(CheckAndSet {
            hashkey: bytes(hashkey),
            check_sortkey: bytes(check_sortkey),
            check_type: check as i32,
            check_operand: bytes(operand),
            set_sortkey: bytes(set_sortkey),
            set_value: bytes(value),
            set_ttl_seconds: ttl_seconds,
            return_check_value: true,
            ..Default::default()
        });
        Ok(CasResult::of(self.client.write(&self.name, hashkey, op).await?))
    }

    /// If (hashkey, check_sortkey) passes the check, applies every mutation (sets and deletes of sortkeys
    /// of the same hashkey) atomically and exactly once.
    pub async fn check_and_mutate(
        &self,
        hashkey: &[u8],
        check_sortkey: &[u8],
        check: CheckType,
        operand: &[u8],
        mutations: Vec<Mutation>,
    ) -> TernResult<CasResult> {
        let op = write_request::Op::CheckAndMutate(CheckAndMutate {
            hashkey: bytes(hashkey),
            check_sortkey: bytes(check_sortkey),
            check_type: check as i32,
            check_operand: bytes(operand),
            mutations,
            return_check_value: true,
        });
        Ok(CasResult::of(self.client.write(&self.name, hashkey, op).await?))
    }

    /// Sends any write operation on `hashkey` (built by the caller, e.g. a protocol proxy) with the same
    /// routing, retries and exactly-once guarantee as the typed methods above.
    pub async fn write_op(&self, hashkey: &[u8], op: write_request::Op) -> TernResult<WriteResponse> {
        self.client.write(&self.name, hashkey, op).await
    }

    pub async fn get(&self, hashkey: &[u8], sortkey: &[u8]) -> TernResult<Option<Vec<u8>>> {
        Ok(self.get_record(hashkey, sortkey).await?.map(|r| r.value.to_vec()))
    }

    /// The record with its expiry, if it exists.
    pub async fn get_record(&self, hashkey: &[u8], sortkey: &[u8]) -> TernResult<Option<Record>> {
        Ok(self.multi_get(hashkey, &[sortkey.to_vec()]).await?.into_iter().next())
    }

    /// The named sortkeys of a hashkey (all of them, up to the read limit, when `sortkeys` is empty).
    pub async fn multi_get(&self, hashkey: &[u8], sortkeys: &[Vec<u8>]) -> TernResult<Vec<Record>> {
        let op = read_request::Op::Get(MultiGet {
            hashkey: bytes(hashkey),
            sortkeys: sortkeys.iter().map(|s| bytes(s)).collect(),
            limit: 0,
            no_value: false,
        });
        Ok(self.client.read(&self.name, Routed::Hashkey(hashkey), op).await?.records)
    }

    pub async fn exists(&self, hashkey: &[u8], sortkey: &[u8]) -> TernResult<bool> {
        let op = read_request::Op::Get(MultiGet { hashkey: bytes(hashkey), sortkeys: vec![bytes(sortkey)], limit: 0, no_value: true });
        Ok(!self.client.read(&self.name, Routed::Hashkey(hashkey), op).await?.records.is_empty())
    }

    /// Remaining time to live: None if the record does not exist, Some(None) if it never expires.
    pub async fn ttl(&self, hashkey: &[u8], sortkey: &[u8]) -> TernResult<Option<Option<Duration>>> {
        let op = read_request::Op::Get(MultiGet { hashkey: bytes(hashkey), sortkeys: vec![bytes(sortkey)], limit: 0, no_value: true });
        let records = self.client.read(&self.name, Routed::Hashkey(hashkey), op).await?.records;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        Ok(records.first().map(|r| (r.expire_at_ms != 0).then(|| Duration::from_millis(r.expire_at_ms.saturating_sub(now)))))
    }

    /// Sortkeys of a hashkey in [start, stop) with an optional prefix; returns the records and a resume
    /// sortkey (empty when done).
    pub async fn scan(&self, hashkey: &[u8], opts: &ScanOptions) -> TernResult<(Vec<Record>, Vec<u8>)> {
        let op = read_request::Op::Scan(Scan {
            hashkey: bytes(hashkey),
            full_table: false,
            start: bytes(&opts.start),
            stop: bytes(&opts.stop),
            prefix: bytes(&opts.prefix),
            limit: opts.limit,
            no_value: opts.no_value,
        });
        let r = self.client.read(&self.name, Routed::Hashkey(hashkey), op).await?;
        Ok((r.records, r.resume.to_vec()))
    }

    /// Up to `limit` records of the hashkey's partition in storage order, starting at the hashkey
    /// (a short range scan, as YCSB's workload E does; hash partitioning orders keys only within a
    /// partition).
    pub async fn scan_partition_from(&self, hashkey: &[u8], limit: u32, no_value: bool) -> TernResult<Vec<Record>> {
        let op = read_request::Op::Scan(Scan { hashkey: bytes(hashkey), full_table: true, limit, no_value, ..Default::default() });
        Ok(self.client.read(&self.name, Routed::Hashkey(hashkey), op).await?.records)
    }

    /// The table as meta describes it now.
    pub async fn info(&self) -> TernResult<TableInfo> {
        self.client.table_info(&self.name).await
    }

    /// The table's partition count as this client knows it (fetched when it knows none).
    pub async fn partition_count(&self) -> TernResult<u32> {
        self.client.partition_count(&self.name).await
    }

    /// A Redis command that writes (or a MULTI/EXEC transaction of them) on keys of `key`'s
    /// partition, run atomically in one raft entry with exactly-once retries; the reply as
    /// `tern_redis::Reply::to_wire` bytes.
    pub async fn redis_write(&self, key: &[u8], commands: Vec<Vec<bytes::Bytes>>, transaction: bool) -> TernResult<bytes::Bytes> {
        let op = write_request::Op::Redis(RedisWrite { commands: commands.into_iter().map(|args| RedisCommand { args }).collect(), transaction });
        Ok(self.client.write(&self.name, key, op).await?.redis_reply)
    }

    /// A Redis command that only reads, on keys of `key`'s partition (linearizable).
    pub async fn redis_read(&self, key: &[u8], args: Vec<bytes::Bytes>) -> TernResult<bytes::Bytes> {
        let op = read_request::Op::Redis(RedisCommand { args });
        Ok(self.client.read(&self.name, Routed::Hashkey(key), op).await?.redis_reply)
    }

    /// Deletes every record of the table, each partition atomically (not the table as a whole:
    /// a write to one partition may land before another is flushed).
    pub async fn flush(&self) -> TernResult<()> {
        let route = self.client.refresh_route(&self.name).await?;
        let count = route.table.partition_count;
        if route.table.split.is_some() {
            return Err(TernError::Unavailable(format!("table {} is splitting: flush it once the split is done", self.name)));
        }
        for partition in 0..count {
            let op = write_request::Op::Flush(Flush { partition_count: count });
            self.client.write_routed(&self.name, Routed::Walk { partition, partition_count: count }, op).await?;
        }
        Ok(())
    }

    /// Number of live records under a hashkey.
    pub async fn count(&self, hashkey: &[u8]) -> TernResult<u64> {
        let op = read_request::Op::Count(Count { hashkey: bytes(hashkey) });
        Ok(self.client.read(&self.name, Routed::Hashkey(hashkey), op).await?.count)
    }

    /// One page of a full-table scan (partition by partition); pass the returned cursor back in.
    /// `no_value` leaves values out (keys and expiry only).
    /// A scan walks the partitions of one partition count: it cannot go on across a split (it
    /// would miss or repeat records) and must start again.
    pub async fn full_scan(&self, cursor: &FullScanCursor, limit: u32, no_value: bool) -> TernResult<(Vec<Record>, FullScanCursor)> {
        let mut route = self.client.route(&self.name).await?;
        if route.table.split.is_some() {
            route = self.client.refresh_route(&self.name).await?; // the split may be done since
        }
        let count = route.table.partition_count;
        if let Some(split) = route.table.split.as_ref().filter(|s| s.switching) {
            return Err(TernError::Unavailable(format!(
                "table {} is splitting into {} partitions ({} of {count} split): a full scan can start once it is done",
                self.name, split.partition_count, split.partitions_split
            )));
        }
        if cursor.partition_count != 0 && cursor.partition_count != count {
            return Err(TernError::invalid(format!(
                "table {} split from {} to {count} partitions during this scan: start it again",
                self.name, cursor.partition_count
            )));
        }
        let mut cursor = FullScanCursor { partition_count: count, ..cursor.clone() };
        let mut records = Vec::new();
        while !cursor.done && (records.len() as u32) < limit.max(1) {
            let want = limit.max(1) - records.len() as u32;
            let op = read_request::Op::Scan(Scan { full_table: true, start: bytes(&cursor.token), limit: want, no_value, ..Default::default() });
            let r = self.client.read(&self.name, Routed::Walk { partition: cursor.partition, partition_count: count }, op).await?;
            records.extend(r.records);
            if r.resume.is_empty() {
                cursor.partition += 1;
                cursor.token.clear();
                cursor.done = cursor.partition >= count;
            } else {
                cursor.token = r.resume.to_vec();
            }
        }
        Ok((records, cursor))
    }
}
