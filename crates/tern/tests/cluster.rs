//! Integration tests on a real cluster in this process: one meta server and three replica servers on
//! loopback with random ports, RocksDB and raft-engine in temporary directories, gRPC between them.

mod common;

use std::net::SocketAddr;
use std::time::Duration;
use tern_client::{Client, ClientConfig, FullScanCursor, ScanOptions, TernError};
use tern_meta::{MetaConfig, MetaNode};
use tern_proto::CheckType;
use tern_server::{ServerConfig, ServerNode};

struct Cluster {
    _dir: tempfile::TempDir,
    meta: MetaNode,
    servers: Vec<ServerNode>,
    client: Client,
}

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

impl Cluster {
    async fn start(table: &str, partitions: u32) -> Cluster {
        Cluster::start_with(table, partitions, 3, Duration::from_secs(10)).await
    }

    async fn start_with(table: &str, partitions: u32, server_count: usize, node_grace: Duration) -> Cluster {
        Cluster::start_configured(table, partitions, server_count, node_grace, |_| {}).await
    }

    async fn start_configured(
        table: &str,
        partitions: u32,
        server_count: usize,
        node_grace: Duration,
        adjust: impl Fn(&mut ServerConfig),
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut meta_cfg = MetaConfig::new(dir.path().join("meta"), any_port());
        meta_cfg.node_grace = node_grace;
        let meta = MetaNode::start(meta_cfg).await.unwrap();
        let mut servers = Vec::new();
        for i in 0..server_count {
            let mut cfg = ServerConfig::new(dir.path().join(format!("s{i}")), any_port(), vec![meta.address.clone()]);
            adjust(&mut cfg);
            servers.push(ServerNode::start(cfg).await.unwrap());
        }
        let client = Client::new(ClientConfig::new(vec![meta.address.clone()])).unwrap();
        let cluster = Cluster { _dir: dir, meta, servers, client };
        cluster.create_table(table, partitions).await;
        cluster
    }

    async fn create_table(&self, name: &str, partitions: u32) {
        common::create_table_once_servers_are_live(&self.client, name, partitions).await;
    }

    async fn shutdown(self) {
        for s in self.servers {
            s.shutdown().await;
        }
        self.meta.shutdown().await;
    }
}

/// Point operations, multi-record operations and scans behave as documented: values round-trip,
/// deletes report whether a record existed, scans honour start/stop/prefix/limit and resume tokens,
/// full scans visit every partition exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crud_and_scan_semantics() {
    let c = Cluster::start("t", 4).await;
    let t = c.client.table("t");

    t.set(b"user:1", b"name", b"Ada", 0).await.unwrap();
    assert_eq!(t.get(b"user:1", b"name").await.unwrap(), Some(b"Ada".to_vec()));
    assert_eq!(t.get(b"user:1", b"missing").await.unwrap(), None);
    assert!(t.exists(b"user:1", b"name").await.unwrap());
    t.set(b"user:1", b"name", b"Grace", 0).await.unwrap();
    assert_eq!(t.get(b"user:1", b"name").await.unwrap(), Some(b"Grace".to_vec()));
    assert!(t.del(b"user:1", b"name").await.unwrap());
    assert!(!t.del(b"user:1", b"name").await.unwrap());
    assert!(!t.exists(b"user:1", b"name").await.unwrap());

    // Binary and empty keys and values.
    t.set(b"", b"", b"", 0).await.unwrap();
    assert_eq!(t.get(b"", b"").await.unwrap(), Some(vec![]));
    t.set(&[0, 255], &[1, 0], &[0, 0, 7], 0).await.unwrap();
    assert_eq!(t.get(&[0, 255], &[1, 0]).await.unwrap(), Some(vec![0, 0, 7]));

    // multi_set / multi_get / multi_del on one hashkey.
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..20).map(|i| (format!("s{i:02}").into_bytes(), format!("v{i}").into_bytes())).collect();
    t.multi_set(b"h", &pairs, 0).await.unwrap();
    assert_eq!(t.count(b"h").await.unwrap(), 20);
    let all = t.multi_get(b"h", &[]).await.unwrap();
    assert_eq!(all.len(), 20);
    assert!(all.windows(2).all(|w| w[0].sortkey < w[1].sortkey), "sorted by sortkey");
    let some = t.multi_get(b"h", &[b"s03".to_vec(), b"nope".to_vec(), b"s07".to_vec()]).await.unwrap();
    assert_eq!(some.iter().map(|r| r.value.to_vec()).collect::<Vec<_>>(), vec![b"v3".to_vec(), b"v7".to_vec()]);

    // Scans: range, prefix, limit with resume.
    let (r, resume) = t.scan(b"h", &ScanOptions { start: b"s05".to_vec(), stop: b"s08".to_vec(), ..Default::default() }).await.unwrap();
    assert_eq!(r.iter().map(|r| r.sortkey.to_vec()).collect::<Vec<_>>(), vec![b"s05".to_vec(), b"s06".to_vec(), b"s07".to_vec()]);
    assert!(resume.is_empty());
    let (r, _) = t.scan(b"h", &ScanOptions { prefix: b"s1".to_vec(), ..Default::default() }).await.unwrap();
    assert_eq!(r.len(), 10);
    let mut seen = Vec::new();
    let mut opts = ScanOptions { limit: 7, ..Default::default() };
    loop {
        let (r, resume) = t.scan(b"h", &opts).await.unwrap();
        seen.extend(r.into_iter().map(|r| r.sortkey.to_vec()));
        if resume.is_empty() {
            break;
        }
        opts.start = resume;
    }
    assert_eq!(seen.len(), 20, "paging visits every record once");

    assert_eq!(t.multi_del(b"h", &[b"s00".to_vec(), b"s01".to_vec(), b"zz".to_vec()]).await.unwrap(), 2);
    assert_eq!(t.count(b"h").await.unwrap(), 18);

    // incr and check_and_set.
    assert_eq!(t.incr(b"c", b"n", 5, 0).await.unwrap(), 5);
    assert_eq!(t.incr(b"c", b"n", -7, 0).await.unwrap(), -2);
    assert_eq!(t.get(b"c", b"n").await.unwrap(), Some(b"-2".to_vec()));
    t.set(b"c", b"text", b"abc", 0).await.unwrap();
    assert!(matches!(t.incr(b"c", b"text", 1, 0).await, Err(TernError::WrongType(_))));
    let r = t.check_and_set(b"c", b"lock", CheckType::ValueNotExist, b"", b"lock", b"me", 0).await.unwrap();
    assert!(r.set_done && r.check_value.is_none());
    let r = t.check_and_set(b"c", b"lock", CheckType::ValueNotExist, b"", b"lock", b"you", 0).await.unwrap();
    assert!(!r.set_done);
    assert_eq!(r.check_value, Some(b"me".to_vec()));
    let r = t.check_and_set(b"c", b"lock", CheckType::ValueEqual, b"me", b"lock", b"you", 0).await.unwrap();
    assert!(r.set_done);
    assert_eq!(t.get(b"c", b"lock").await.unwrap(), Some(b"you".to_vec()));
    // check_and_mutate: several sets and deletes of one hashkey, all or none.
    let mutations = vec![
        tern_proto::Mutation { sortkey: b"lock".to_vec().into(), value: b"them".to_vec().into(), ..Default::default() },
        tern_proto::Mutation { sortkey: b"owner".to_vec().into(), value: b"them".to_vec().into(), ..Default::default() },
        tern_proto::Mutation { sortkey: b"text".to_vec().into(), delete: true, ..Default::default() },
    ];
    let r = t.check_and_mutate(b"c", b"lock", CheckType::ValueEqual, b"me", mutations.clone()).await.unwrap();
    assert!(!r.set_done);
    assert_eq!(t.get(b"c", b"text").await.unwrap(), Some(b"abc".to_vec()), "a failed check mutates nothing");
    let r = t.check_and_mutate(b"c", b"lock", CheckType::ValueEqual, b"you", mutations).await.unwrap();
    assert!(r.set_done);
    assert_eq!(t.get(b"c", b"owner").await.unwrap(), Some(b"them".to_vec()));
    assert_eq!(t.get(b"c", b"text").await.unwrap(), None);
    assert!(matches!(t.check_and_mutate(b"c", b"lock", CheckType::NoCheck, b"", vec![]).await, Err(TernError::InvalidArgument(_))));

    // Full-table scan across partitions, paged.
    for i in 0..50 {
        t.set(format!("fs{i}").as_bytes(), b"", b"x", 0).await.unwrap();
    }
    let mut cursor = FullScanCursor::default();
    let mut total = 0;
    while !cursor.done {
        let (records, next) = t.full_scan(&cursor, 13, false).await.unwrap();
        total += records.len();
        cursor = next;
    }
    let expected = 50 + 18 + 3 /* c: n, text, lock */ + 2 /* empty and binary */;
    assert_eq!(total, expected);
    c.shutdown().await;
}

/// Bad input is refused with typed errors that name the limit, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_rejected() {
    let c = Cluster::start("t", 2).await;
    let t = c.client.table("t");
    let big = vec![0u8; tern_core::limits::VALUE_BYTES_MAX + 1];
    match t.set(b"k", b"s", &big, 0).await {
        Err(TernError::InvalidArgument(m)) => assert!(m.contains("1048576"), "{m}"),
        other => panic!("want InvalidArgument, got {other:?}"),
    }
    assert_eq!(t.get(b"k", b"s").await.unwrap(), None);
    let long_key = vec![b'k'; tern_core::limits::HASHKEY_BYTES_MAX + 1];
    assert!(matches!(t.get(&long_key, b"").await, Err(TernError::InvalidArgument(_))));
    let missing = c.client.table("no_such_table");
    assert!(matches!(missing.get(b"k", b"").await, Err(TernError::TableNotFound(_))));
    c.shutdown().await;
}

/// TTL: the leader stamps an absolute expiry; the record reports its remaining TTL, then disappears
/// from reads and counts once it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ttl_expiry() {
    let c = Cluster::start("t", 2).await;
    let t = c.client.table("t");
    t.set(b"session", b"a", b"short", 1).await.unwrap();
    t.set(b"session", b"b", b"forever", 0).await.unwrap();
    let ttl = t.ttl(b"session", b"a").await.unwrap().unwrap().unwrap();
    assert!(ttl <= Duration::from_secs(1), "{ttl:?}");
    assert_eq!(t.ttl(b"session", b"b").await.unwrap(), Some(None));
    assert_eq!(t.ttl(b"session", b"zzz").await.unwrap(), None);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(t.get(b"session", b"a").await.unwrap(), None);
    assert_eq!(t.count(b"session").await.unwrap(), 1);
    assert_eq!(t.get(b"session", b"b").await.unwrap(), Some(b"forever".to_vec()));
    // An incr on an expired counter starts from zero.
    t.set(b"session", b"n", b"41", 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(t.incr(b"session", b"n", 1, 0).await.unwrap(), 1);
    c.shutdown().await;
}

/// A retried incr (same client id and sequence, as the client sends after a lost answer) returns the
/// first result and increments once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incr_is_exactly_once_under_retry() {
    use tern_proto::kv_client::KvClient;
    use tern_proto::{write_request::Op, Incr, PartitionRef, WriteRequest};
    let c = Cluster::start("t", 2).await;
    let t = c.client.table("t");
    t.set(b"ctr", b"n", b"10", 0).await.unwrap(); // also warms up leaders
    let partition = tern_core::codec::partition_of(b"ctr", 2);
    let info = c.client.table_info("t").await.unwrap();
    let request = WriteRequest {
        partition: Some(PartitionRef { table_id: info.table_id, partition, partition_count: 2 }),
        client_id: 4242,
        seq: 1,
        first_incomplete_seq: 1,
        op: Some(Op::Incr(Incr { hashkey: "ctr".into(), sortkey: "n".into(), delta: 5, ttl_seconds: 0 })),
    };
    // Send the same request to whichever server leads, twice.
    let mut answers = Vec::new();
    for _ in 0..2 {
        let mut answered = false;
        for _ in 0..50 {
            for s in &c.servers {
                let mut kv = KvClient::connect(format!("http://{}", s.address)).await.unwrap();
                let r = kv.write(request.clone()).await.unwrap().into_inner();
                if r.error.is_none() {
                    answers.push(r.new_value);
                    answered = true;
                    break;
                }
            }
            if answered {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(answered, "some server leads the partition");
    }
    assert_eq!(answers, vec![15, 15], "the retry returns the first result");
    assert_eq!(t.get(b"ctr", b"n").await.unwrap(), Some(b"15".to_vec()), "applied once");
    c.shutdown().await;
}

/// With the raft log synced on a thread of its own (`server --log-writer-thread`), concurrent writes
/// are acknowledged, read back, applied exactly once, and survive a restart of every server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raft_log_on_its_own_thread() {
    let mut c = Cluster::start_configured("t", 4, 3, Duration::from_secs(10), |cfg| cfg.store.log_writer_thread = true).await;
    let t = c.client.table("t");
    t.set(b"warm", b"up", b"1", 0).await.unwrap();
    let writers = (0..16).map(|w| {
        let t = c.client.table("t");
        tokio::spawn(async move {
            for i in 0..20 {
                t.set(format!("h{w}").as_bytes(), format!("s{i}").as_bytes(), format!("v{w}-{i}").as_bytes(), 0).await.unwrap();
                t.incr(b"counter", b"n", 1, 0).await.unwrap();
            }
        })
    });
    for w in writers.collect::<Vec<_>>() {
        w.await.unwrap();
    }
    assert_eq!(t.get(b"counter", b"n").await.unwrap(), Some(b"320".to_vec()));
    // Every server restarts on its data: what was acknowledged is there.
    let configs: Vec<ServerConfig> = (0..3)
        .map(|i| {
            let mut cfg = ServerConfig::new(c._dir.path().join(format!("s{i}")), any_port(), vec![c.meta.address.clone()]);
            cfg.store.log_writer_thread = true;
            cfg
        })
        .collect();
    for s in std::mem::take(&mut c.servers) {
        s.shutdown().await;
    }
    for cfg in configs {
        c.servers.push(ServerNode::start(cfg).await.unwrap());
    }
    for w in 0..16 {
        assert_eq!(t.get(format!("h{w}").as_bytes(), b"s19").await.unwrap(), Some(format!("v{w}-19").into_bytes()));
    }
    assert_eq!(t.get(b"counter", b"n").await.unwrap(), Some(b"320".to_vec()));
    c.shutdown().await;
}

/// Dropping a table removes it from the catalog and its data from the servers; a new table of the
/// same name starts empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drop_and_recreate_table() {
    let c = Cluster::start("t", 2).await;
    let t = c.client.table("t");
    t.set(b"k", b"", b"old", 0).await.unwrap();
    let r = c
        .client
        .meta_call(|mut m| async move { m.drop_table(tern_proto::DropTableRequest { name: "t".into(), table_id: 0 }).await.map(|r| r.into_inner()) })
        .await
        .unwrap();
    tern_proto::check(&r.error).unwrap();
    // Servers destroy the replicas at their next heartbeat; until then a client with a cached route
    // may still reach them. Soon every read reports the table as gone.
    let mut gone = false;
    for _ in 0..50 {
        if matches!(t.get(b"k", b"").await, Err(TernError::TableNotFound(_))) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "dropped table still readable");
    c.create_table("t", 2).await;
    assert_eq!(t.get(b"k", b"").await.unwrap(), None);
    // A drop naming the old table's id leaves the new table of that name alone.
    let old_id = 1;
    let r = c
        .client
        .meta_call(
            |mut m| async move { m.drop_table(tern_proto::DropTableRequest { name: "t".into(), table_id: old_id }).await.map(|r| r.into_inner()) },
        )
        .await
        .unwrap();
    assert!(matches!(tern_proto::check(&r.error), Err(TernError::TableNotFound(_))), "{r:?}");
    assert!(c.client.table_info("t").await.unwrap().table_id != old_id);
    c.shutdown().await;
}

/// Self-healing: when a server dies, meta notices after the grace period, adds a learner for each
/// partition that lost a replica on a spare server, the learner catches up (by snapshot), becomes a
/// voter in place of the lost one (joint consensus), and every partition is back to three identical
/// replicas on live servers with no acknowledged write lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_server_is_replaced_by_re_replication() {
    let mut c = Cluster::start_with("t", 4, 4, Duration::from_secs(2)).await;
    let t = c.client.table("t");
    for i in 0..200 {
        t.set(format!("k{i}").as_bytes(), b"", format!("v{i}").as_bytes(), 0).await.unwrap();
    }
    let victim = c.servers.remove(1);
    let dead_node = victim.node_id;
    victim.shutdown().await;
    let started = std::time::Instant::now();
    // Writes keep working while the cluster heals.
    for i in 200..300 {
        t.set(format!("k{i}").as_bytes(), b"", format!("v{i}").as_bytes(), 0).await.unwrap();
    }
    let deadline = started + Duration::from_secs(60);
    loop {
        let info = c.client.table_info("t").await.unwrap();
        let placed_on_live = info.partitions.iter().all(|p| p.peers.len() == 3 && p.peers.iter().all(|x| x.node_id != dead_node));
        let mut identical = placed_on_live;
        if placed_on_live {
            c.client.refresh_nodes().await.unwrap();
            for p in &info.partitions {
                let group = tern_core::GroupId::new(info.table_id, p.index).0;
                let mut sums = Vec::new();
                for peer in &p.peers {
                    match c.client.replica_checksum(peer.node_id, group).await {
                        Ok(r) => sums.push((r.applied_index, r.checksum)),
                        Err(_) => identical = false,
                    }
                }
                identical &= sums.len() == 3 && sums.windows(2).all(|w| w[0] == w[1]);
            }
        }
        if identical {
            // Raft itself agrees: the leader's applied configuration is exactly the new replica set.
            let status = c
                .client
                .meta_call(|mut m| async move {
                    m.get_partition_status(tern_proto::PartitionStatusRequest { table: "t".into() }).await.map(|r| r.into_inner())
                })
                .await
                .unwrap();
            let configured = status.partitions.iter().all(|p| {
                let mut want: Vec<u64> = p.peers.iter().map(|x| x.peer_id).collect();
                want.sort();
                p.replicas.iter().filter(|r| r.is_leader).any(|r| {
                    let mut voters = r.voters.clone();
                    voters.sort();
                    voters == want && r.learners.is_empty()
                })
            });
            if configured {
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "not healed in time: {info:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!("full replication restored {:?} after the server stopped (grace 2 s)", started.elapsed());
    for i in 0..300 {
        assert_eq!(t.get(format!("k{i}").as_bytes(), b"").await.unwrap(), Some(format!("v{i}").into_bytes()), "k{i}");
    }
    c.shutdown().await;
}

async fn node_counts(c: &Cluster) -> Vec<tern_proto::NodeInfo> {
    c.client.refresh_nodes().await.unwrap()
}

/// Membership operations while clients keep working: a new server receives replicas (and then
/// leaders) by balancing; a decommissioned server ends with no replicas; every write stays readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_server_gets_replicas_and_decommission_drains() {
    let mut c = Cluster::start_with("t", 4, 3, Duration::from_secs(3)).await;
    let t = c.client.table("t");
    for i in 0..100 {
        t.set(format!("k{i}").as_bytes(), b"", format!("v{i}").as_bytes(), 0).await.unwrap();
    }
    let cfg = ServerConfig::new(c._dir.path().join("s-new"), any_port(), vec![c.meta.address.clone()]);
    let newcomer = ServerNode::start(cfg).await.unwrap();
    let new_id = newcomer.node_id;
    c.servers.push(newcomer);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let nodes = node_counts(&c).await;
        let counts: Vec<u32> = nodes.iter().map(|n| n.replica_count).collect();
        let newcomer = nodes.iter().find(|n| n.node_id == new_id).unwrap();
        if newcomer.replica_count >= 3 && newcomer.leader_count >= 1 && counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "replicas did not spread to the new server: {nodes:?}");
        t.set(b"during-balance", b"", b"x", 0).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let victim = c.servers[0].node_id;
    let r = c
        .client
        .meta_call(|mut m| async move { m.decommission(tern_proto::NodeRequest { node_id: victim }).await.map(|r| r.into_inner()) })
        .await
        .unwrap();
    tern_proto::check(&r.error).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let nodes = node_counts(&c).await;
        let v = nodes.iter().find(|n| n.node_id == victim).unwrap();
        assert!(v.draining);
        if v.replica_count == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "decommissioned server still holds replicas: {nodes:?}");
        t.set(b"during-drain", b"", b"y", 0).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for i in 0..100 {
        assert_eq!(t.get(format!("k{i}").as_bytes(), b"").await.unwrap(), Some(format!("v{i}").into_bytes()), "k{i}");
    }
    // Too few servers would remain for three replicas: refused with a typed error.
    let other = c.servers[1].node_id;
    let r = c
        .client
        .meta_call(|mut m| async move { m.decommission(tern_proto::NodeRequest { node_id: other }).await.map(|r| r.into_inner()) })
        .await
        .unwrap();
    assert!(matches!(tern_proto::check(&r.error), Err(TernError::NotEnoughNodes(_))), "{r:?}");
    c.shutdown().await;
}

/// Meta is a raft group: with three meta nodes, killing the meta leader does not interrupt reads and
/// writes, and table changes work again once a new meta leader is elected, with nothing forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn meta_leader_failure_is_survived() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).collect();
    let peers: Vec<(u64, String)> = ports.iter().enumerate().map(|(i, p)| (i as u64 + 1, format!("127.0.0.1:{p}"))).collect();
    let mut metas = Vec::new();
    for (id, address) in &peers {
        let mut cfg = MetaConfig::new(dir.path().join(format!("meta{id}")), address.parse().unwrap());
        cfg.id = *id;
        cfg.peers = peers.clone();
        metas.push(Some(MetaNode::start(cfg).await.unwrap()));
    }
    let meta_addresses: Vec<String> = peers.iter().map(|(_, a)| a.clone()).collect();
    let mut servers = Vec::new();
    for i in 0..3 {
        let cfg = ServerConfig::new(dir.path().join(format!("s{i}")), any_port(), meta_addresses.clone());
        servers.push(ServerNode::start(cfg).await.unwrap());
    }
    let client = Client::new(ClientConfig::new(meta_addresses.clone())).unwrap();
    let c = Cluster { _dir: dir, meta: metas[0].take().unwrap(), servers, client };
    c.create_table("before", 2).await;
    let t = c.client.table("before");
    t.set(b"k", b"", b"v1", 0).await.unwrap();

    // Find and stop the meta leader: the only meta node that answers.
    let mut leader = None;
    for (i, a) in meta_addresses.iter().enumerate() {
        let mut m = tern_proto::meta_client::MetaClient::connect(format!("http://{a}")).await.unwrap();
        if m.list_nodes(tern_proto::ListNodesRequest {}).await.is_ok() {
            leader = Some(i);
        }
    }
    let leader = leader.expect("one meta node leads");
    let Cluster { _dir, meta, servers, client } = c;
    metas[0] = Some(meta);
    metas[leader].take().unwrap().shutdown().await;

    // The data path does not need meta.
    t.set(b"k", b"", b"v2", 0).await.unwrap();
    assert_eq!(t.get(b"k", b"").await.unwrap(), Some(b"v2".to_vec()));
    // DDL resumes under the new leader, which remembers the old table.
    let c = Cluster { _dir, meta: metas.iter_mut().find_map(|m| m.take()).unwrap(), servers, client };
    c.create_table("after", 2).await;
    let after = c.client.table("after");
    after.set(b"x", b"", b"y", 0).await.unwrap();
    assert_eq!(after.get(b"x", b"").await.unwrap(), Some(b"y".to_vec()));
    assert_eq!(c.client.table("before").get(b"k", b"").await.unwrap(), Some(b"v2".to_vec()));
    for m in metas.into_iter().flatten() {
        m.shutdown().await;
    }
    c.shutdown().await;
}

/// Raft timing is a cluster setting: a server configured with another raft tick than its meta's is
/// refused with an error naming both values (its read lease would outlast its peers' vote refusal);
/// one that leaves it out adopts the cluster's and joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_share_the_cluster_raft_timing() {
    let dir = tempfile::tempdir().unwrap();
    let mut meta_cfg = MetaConfig::new(dir.path().join("meta"), any_port());
    meta_cfg.raft_tick = Duration::from_millis(50);
    let meta = MetaNode::start(meta_cfg.clone()).await.unwrap();
    let mut cfg = ServerConfig::new(dir.path().join("s0"), any_port(), vec![meta.address.clone()]);
    cfg.raft_tick = Some(Duration::from_millis(100));
    let refused = ServerNode::start(cfg.clone()).await.err().expect("a server with other raft timing is refused");
    assert!(matches!(refused, TernError::InvalidArgument(_)), "{refused}");
    assert!(refused.to_string().contains("100 ms") && refused.to_string().contains("50 ms"), "{refused}");
    cfg.raft_tick = None;
    let server = ServerNode::start(cfg).await.unwrap();
    server.shutdown().await;
    meta.shutdown().await;

    // Meta keeps the timing it first ran with: a restart with other explicit timing is refused, one
    // without adopts it (servers that registered earlier hold it).
    let mut other = MetaConfig { raft_tick: Duration::from_millis(100), timing_given: true, ..meta_cfg.clone() };
    let e = MetaNode::start(other.clone()).await.err().expect("other timing is refused");
    assert!(matches!(e, TernError::InvalidArgument(_)) && e.to_string().contains("50 ms"), "{e}");
    other.timing_given = false;
    let meta = MetaNode::start(other).await.unwrap();
    let mut cfg = ServerConfig::new(dir.path().join("s1"), any_port(), vec![meta.address.clone()]);
    cfg.raft_tick = Some(Duration::from_millis(50));
    let server = ServerNode::start(cfg).await.expect("the recorded 50 ms tick is the cluster's");
    server.shutdown().await;
    let mut bad = MetaConfig::new(dir.path().join("meta2"), any_port());
    bad.election_ticks = 2;
    assert!(MetaNode::start(bad).await.err().unwrap().to_string().contains("election ticks"));
    for tick in [Duration::ZERO, Duration::from_secs(11), Duration::from_micros(1500)] {
        let mut bad = MetaConfig::new(dir.path().join("meta3"), any_port());
        bad.raft_tick = tick;
        let e = MetaNode::start(bad).await.err().expect("refused");
        assert!(matches!(e, TernError::InvalidArgument(_)) && e.to_string().contains("raft tick"), "{tick:?}: {e}");
    }
    meta.shutdown().await;

    // A damaged record is a corruption, named by its path: never silently replaced by defaults.
    std::fs::write(dir.path().join("meta").join("cluster-timing.json"), b"[50,").unwrap();
    let e = MetaNode::start(meta_cfg).await.err().expect("a damaged timing record is refused");
    assert!(matches!(e, TernError::Corruption(_)) && e.to_string().contains("cluster-timing.json"), "{e}");
}

/// A server restarting while meta is away starts at once, from the identity and raft timing it keeps
/// in node.json (partitions fail over without meta, and a restart must not wait for it either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_does_not_wait_for_meta() {
    let Cluster { _dir: dir, meta, servers, client: _ } = Cluster::start_with("t", 2, 3, Duration::from_secs(10)).await;
    let node = servers[0].node_id;
    for s in servers {
        s.shutdown().await;
    }
    meta.shutdown().await;
    let cfg = ServerConfig::new(dir.path().join("s0"), any_port(), vec!["127.0.0.1:1".into()]);
    let restarted = tokio::time::timeout(Duration::from_secs(10), ServerNode::start(cfg)).await.expect("started without meta").unwrap();
    assert_eq!(restarted.node_id, node, "same identity");
    restarted.shutdown().await;
}

/// Every live record of a table: (hashkey, sortkey) -> value.
async fn table_contents(t: &tern_client::Table) -> std::collections::BTreeMap<(Vec<u8>, Vec<u8>), Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut cursor = FullScanCursor::default();
    while !cursor.done {
        let (records, next) = t.full_scan(&cursor, 500, false).await.unwrap();
        for r in records {
            out.insert((r.hashkey.to_vec(), r.sortkey.to_vec()), r.value.to_vec());
        }
        cursor = next;
    }
    out
}

/// Cold backup under write load, and restore: the backup holds every write acknowledged before it
/// started; the restored table holds exactly the backup's records (each written to the source,
/// with its TTL), the servers' checksums of every restored partition match the backup's, and
/// writes after the backup are not in it. Bad backups are refused before anything is created:
/// a changed file (named in the error), a backup without its manifest; so are an existing table
/// name, an unknown table and an unsupported location. A cancelled backup leaves nothing behind; a
/// cancelled restore drops the table it created.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_under_load_restores_whole_and_bad_backups_are_refused() {
    use tern_client::backup::{backup_table, list_backups, restore_table};
    let c = Cluster::start("src", 4).await;
    let t = c.client.table("src");
    for i in 0..300 {
        let v = format!("value-{i}").into_bytes();
        t.multi_set(format!("h{i}").as_bytes(), &[(b"a".to_vec(), v.clone()), (b"b".to_vec(), v)], 0).await.unwrap();
    }
    for i in 0..50 {
        t.set(format!("ttl{i}").as_bytes(), b"", b"lives an hour", 3600).await.unwrap();
        t.del(format!("h{i}").as_bytes(), b"b").await.unwrap();
    }
    let before = table_contents(&t).await;
    assert_eq!(before.len(), 600);

    // A writer keeps going through the backup; what it wrote is remembered.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (t, stop) = (c.client.table("src"), stop.clone());
        tokio::spawn(async move {
            let mut written = Vec::new();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (hk, v) = (format!("w{n}").into_bytes(), format!("during-{n}").into_bytes());
                if t.set(&hk, b"", &v, 0).await.is_ok() {
                    written.push((hk, v));
                }
                n += 1;
            }
            written
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let root = tempfile::tempdir().unwrap();
    let root_s = root.path().to_string_lossy().into_owned();
    let mut reports = 0;
    let (dir, m) = backup_table(&c.client, "src", &root_s, 0, &mut |_| reports += 1, std::future::pending()).await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let during = writer.await.unwrap();
    assert!(!during.is_empty() && reports >= 4, "{} writes during the backup, {reports} progress reports", during.len());
    assert_eq!((m.table.as_str(), m.partition_count, m.partitions.len()), ("src", 4, 4));
    t.set(b"after-the-backup", b"", b"x", 0).await.unwrap();

    let dir_s = dir.clone();
    let r = restore_table(&c.client, &dir_s, "copy", 0, &mut |_| {}, std::future::pending()).await.unwrap();
    assert_eq!(r.partitions, 4);
    let copy = c.client.table("copy");
    let restored = table_contents(&copy).await;
    for (k, v) in &before {
        assert_eq!(restored.get(k), Some(v), "record {k:?} acknowledged before the backup is missing or changed");
    }
    let during: std::collections::HashMap<Vec<u8>, Vec<u8>> = during.into_iter().collect();
    for (k, v) in &restored {
        if !before.contains_key(k) {
            assert_eq!(during.get(&k.0), Some(v), "restored record {k:?} was never written");
        }
    }
    assert_eq!(restored.len() as u64, r.records);
    assert!(!restored.contains_key(&(b"after-the-backup".to_vec(), vec![])));
    let ttl = copy.ttl(b"ttl7", b"").await.unwrap().expect("exists").expect("has a TTL");
    assert!(ttl > Duration::from_secs(3000) && ttl <= Duration::from_secs(3600), "{ttl:?}");
    let listed = list_backups(&root_s).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].1.as_ref().unwrap().table, "src");

    // A changed byte in one file: refused, naming the file, and the table created for it dropped.
    let bad = root.path().join("bad");
    copy_dir(std::path::Path::new(&dir), &bad);
    let p1 = bad.join(&m.partitions[1].dir);
    let largest = std::fs::read_dir(&p1).unwrap().map(|e| e.unwrap().path()).max_by_key(|p| std::fs::metadata(p).unwrap().len()).unwrap();
    let mut bytes = std::fs::read(&largest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&largest, bytes).unwrap();
    let bad_s = bad.to_string_lossy().into_owned();
    let e = restore_table(&c.client, &bad_s, "copy2", 0, &mut |_| {}, std::future::pending()).await.unwrap_err();
    let name = largest.file_name().unwrap().to_string_lossy().into_owned();
    assert!(matches!(e, TernError::Corruption(_)) && e.to_string().contains(&name), "{e}");
    assert!(matches!(c.client.table_info("copy2").await, Err(TernError::TableNotFound(_))));
    // No manifest: an unfinished backup.
    std::fs::remove_file(bad.join(tern_core::backup::BACKUP_MANIFEST)).unwrap();
    let e = restore_table(&c.client, &bad_s, "copy2", 0, &mut |_| {}, std::future::pending()).await.unwrap_err();
    assert!(e.to_string().contains("not a finished backup"), "{e}");
    assert!(matches!(c.client.table_info("copy2").await, Err(TernError::TableNotFound(_))));
    // An existing table is never restored into.
    let e = restore_table(&c.client, &dir_s, "src", 0, &mut |_| {}, std::future::pending()).await.unwrap_err();
    assert!(matches!(e, TernError::TableExists(_)), "{e}");
    assert_eq!(t.get(b"after-the-backup", b"").await.unwrap(), Some(b"x".to_vec()));

    // A restore cancelled half way drops the table it created.
    let e = restore_table(&c.client, &dir_s, "copy3", 0, &mut |_| {}, tokio::time::sleep(Duration::from_millis(50))).await.unwrap_err();
    assert!(e.to_string().contains("cancelled"), "{e}");
    assert!(matches!(c.client.table_info("copy3").await, Err(TernError::TableNotFound(_))));

    let e = backup_table(&c.client, "nope", &root_s, 0, &mut |_| {}, std::future::pending()).await.unwrap_err();
    assert!(matches!(e, TernError::TableNotFound(_)), "{e}");
    let e = backup_table(&c.client, "src", "gs://bucket/x", 0, &mut |_| {}, std::future::pending()).await.unwrap_err();
    assert!(matches!(e, TernError::InvalidArgument(_)), "{e}");
    let e = backup_table(&c.client, "src", "relative/dir", 0, &mut |_| {}, std::future::pending()).await.unwrap_err();
    assert!(e.to_string().contains("absolute"), "{e}");
    // A partition backup into a directory that holds other files adds a place of its own there and
    // leaves the rest alone.
    let precious = root.path().join("precious");
    std::fs::create_dir(&precious).unwrap();
    std::fs::write(precious.join("keep.txt"), b"mine").unwrap();
    let mut done = 0;
    let info = c.client.table_info("src").await.unwrap();
    let request = |rate_bytes_per_second| tern_proto::BackupPartitionRequest {
        partition: Some(tern_proto::PartitionRef { table_id: info.table_id, partition: 0, partition_count: 4 }),
        backup: precious.to_string_lossy().into_owned(),
        rate_bytes_per_second,
    };
    for s in &c.servers {
        let mut b = tern_proto::backup_client::BackupClient::connect(format!("http://{}", s.address)).await.unwrap();
        let mut stream = b.backup_partition(request(0)).await.unwrap().into_inner();
        let mut last = None;
        while let Some(m) = stream.message().await.unwrap() {
            last = Some(m);
        }
        let last = last.unwrap();
        if last.done {
            done += 1;
            assert!(precious.join(&last.dir).join("partition.json").exists(), "{last:?}");
        } else {
            assert!(matches!(tern_proto::check(&last.error), Err(TernError::NotLeader { .. })), "{last:?}");
        }
    }
    assert_eq!(done, 1, "the leader backs the partition up, in a place of its own");
    // A rate too slow to notice a cancellation for hours is refused, naming the minimum.
    for s in &c.servers {
        let mut b = tern_proto::backup_client::BackupClient::connect(format!("http://{}", s.address)).await.unwrap();
        let mut stream = b.backup_partition(request(1)).await.unwrap().into_inner();
        let last = stream.message().await.unwrap().unwrap();
        let e = tern_proto::check(&last.error).unwrap_err();
        assert!(matches!(e, TernError::InvalidArgument(_)) && e.to_string().contains("minimum"), "{e}");
    }
    // So is a server configured with a default rate out of range.
    for rate in [0, 1000, u64::MAX] {
        let mut cfg = ServerConfig::new(root.path().join("bad-server"), any_port(), vec![c.meta.address.clone()]);
        cfg.backup_bytes_per_second = rate;
        let e = ServerNode::start(cfg).await.err().expect("refused");
        assert!(e.to_string().contains("backup rate"), "{e}");
    }
    assert_eq!(std::fs::read(precious.join("keep.txt")).unwrap(), b"mine");
    std::fs::remove_dir_all(&precious).unwrap();
    // Cancelled at once: the partial backup is removed.
    let e = backup_table(&c.client, "src", &root_s, 1 << 20, &mut |_| {}, async {}).await.unwrap_err();
    assert!(e.to_string().contains("cancelled"), "{e}");
    let names: Vec<String> = list_backups(&root_s).await.unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 2, "the backup and the bad copy, nothing else: {names:?}");
    c.shutdown().await;
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Periodic backups: a policy set through meta is listed with the table, a pass takes a backup
/// when one is due and not before, and keeps only the newest `keep`; bad policies are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_policies_take_and_prune_backups() {
    use tern_client::backup::{list_backups, policy_pass};
    let c = Cluster::start("t", 2).await;
    c.client.table("t").set(b"k", b"", b"v", 0).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let root_s = root.path().to_string_lossy().into_owned();
    let set = |policy: Option<tern_proto::BackupPolicy>| {
        let client = c.client.clone();
        async move {
            let r = client
                .meta_call(|mut m| {
                    let request = tern_proto::SetBackupPolicyRequest { table: "t".into(), policy: policy.clone() };
                    async move { m.set_backup_policy(request).await.map(|r| r.into_inner()) }
                })
                .await
                .unwrap();
            tern_proto::check(&r.error)
        }
    };
    let policy = |interval_seconds, keep| Some(tern_proto::BackupPolicy { root: root_s.clone(), interval_seconds, keep, rate_mb: 0 });
    assert!(matches!(set(policy(10, 1)).await, Err(TernError::InvalidArgument(_))), "an interval under a minute");
    assert!(matches!(set(policy(60, 0)).await, Err(TernError::InvalidArgument(_))), "keeping none");
    let gs = Some(tern_proto::BackupPolicy { root: "gs://b/x".into(), interval_seconds: 60, keep: 1, rate_mb: 0 });
    assert!(matches!(set(gs).await, Err(TernError::InvalidArgument(_))));
    let relative = Some(tern_proto::BackupPolicy { root: "backups".into(), interval_seconds: 60, keep: 1, rate_mb: 0 });
    assert!(matches!(set(relative).await, Err(TernError::InvalidArgument(_))));
    set(policy(60, 1)).await.unwrap();
    assert_eq!(c.client.table_info("t").await.unwrap().backup_policy.unwrap().keep, 1);

    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let complete = || async { list_backups(&root_s).await.unwrap().into_iter().filter(|(_, m)| m.is_ok()).map(|(n, _)| n).collect::<Vec<_>>() };
    policy_pass(&c.client, now(), &|| true).await.unwrap();
    let first = complete().await;
    assert_eq!(first.len(), 1);
    policy_pass(&c.client, now(), &|| true).await.unwrap();
    assert_eq!(complete().await, first, "not due again within the interval");
    policy_pass(&c.client, now() + 61_000, &|| false).await.unwrap();
    assert_eq!(complete().await, first, "a meta node that does not lead does nothing");
    policy_pass(&c.client, now() + 61_000, &|| true).await.unwrap();
    let second = complete().await;
    assert_eq!(second.len(), 1, "keep 1: {second:?}");
    assert_ne!(second, first);
    set(None).await.unwrap();
    assert!(c.client.table_info("t").await.unwrap().backup_policy.is_none());
    policy_pass(&c.client, now() + 200_000, &|| true).await.unwrap();
    assert_eq!(complete().await, second, "no policy, no backups");
    c.shutdown().await;
}

/// An S3-compatible object store on 127.0.0.1 (moto's server, installed by scripts/install-deps),
/// stopped when dropped.
struct S3Server {
    child: std::process::Child,
}

impl S3Server {
    fn start(bucket: &str) -> S3Server {
        let port = common::free_port();
        let child = std::process::Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start python3 -m moto.server (scripts/install-deps --with-test-tools installs moto)");
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        // Creates the bucket (moto takes unsigned requests) once the server answers.
        loop {
            use std::io::{Read, Write};
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let request = format!("PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                s.write_all(request.as_bytes()).unwrap();
                let mut answer = String::new();
                let _ = s.read_to_string(&mut answer);
                assert!(answer.starts_with("HTTP/1.1 200"), "create bucket: {answer}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "moto's server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        // The servers and the coordinator all run in this process and read these.
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_ENDPOINT", &endpoint);
        std::env::set_var("AWS_ALLOW_HTTP", "true");
        S3Server { child }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Backups to an S3-compatible object store: a backup, its listing, a restore equal to the source,
/// a corrupted object refused by its checksum with its name (and the new table dropped), and a
/// policy pass that prunes on S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_and_restore_through_s3() {
    use tern_client::backup::{backup_table, list_backups, policy_pass, restore_table};
    let s3 = S3Server::start("tern-backups");
    let c = Cluster::start("src", 4).await;
    let t = c.client.table("src");
    for i in 0..200 {
        t.set(format!("k{i}").as_bytes(), b"s", format!("v{i}").as_bytes(), if i % 10 == 0 { 3600 } else { 0 }).await.unwrap();
    }
    let before = table_contents(&t).await;
    let root = "s3://tern-backups/cluster-a";
    let (uri, m) = backup_table(&c.client, "src", root, 0, &mut |_| {}, std::future::pending()).await.unwrap();
    assert!(uri.starts_with("s3://tern-backups/cluster-a/src-"), "{uri}");
    assert_eq!(m.partitions.len(), 4);
    let listed = list_backups(root).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let r = restore_table(&c.client, &uri, "copy", 0, &mut |_| {}, std::future::pending()).await.unwrap();
    assert_eq!(r.records, 200);
    assert_eq!(table_contents(&c.client.table("copy")).await, before);

    // One object changed in place (same size): the restore fails on its checksum, naming it.
    let entry = &m.partitions[2];
    let target = tern_backup::Target::open(&uri).unwrap().child(&entry.dir);
    let (name, size) = target.files().await.unwrap().into_iter().find(|(n, _)| n.ends_with(".sst")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("x");
    target.download(&name, &local, &mut tern_backup::Pacer::new(0), &|| false, &mut |_| {}).await.unwrap();
    let mut bytes = std::fs::read(&local).unwrap();
    bytes[size as usize / 2] ^= 1;
    std::fs::write(&local, bytes).unwrap();
    target.upload(&name, &local, &mut tern_backup::Pacer::new(0), &|| false, &mut |_| {}).await.unwrap();
    let e = restore_table(&c.client, &uri, "copy2", 0, &mut |_| {}, std::future::pending()).await.unwrap_err();
    assert!(matches!(e, TernError::Corruption(_)) && e.to_string().contains(&name), "{e}");
    assert!(matches!(c.client.table_info("copy2").await, Err(TernError::TableNotFound(_))));

    // A policy on S3 keeps the newest backup only.
    let policy = tern_proto::BackupPolicy { root: root.into(), interval_seconds: 60, keep: 1, rate_mb: 0 };
    let r = c
        .client
        .meta_call(|mut meta| {
            let request = tern_proto::SetBackupPolicyRequest { table: "src".into(), policy: Some(policy.clone()) };
            async move { meta.set_backup_policy(request).await.map(|r| r.into_inner()) }
        })
        .await
        .unwrap();
    tern_proto::check(&r.error).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    policy_pass(&c.client, now + 61_000, &|| true).await.unwrap();
    let listed: Vec<String> = list_backups(root).await.unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(!uri.ends_with(&listed[0]), "the older backup was removed: {listed:?}");
    drop(s3);
    c.shutdown().await;
}

/// A table created for a restore is refused to clients, with the reason, until the restore says it
/// is done; a client that cached its route before sees the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_being_restored_takes_no_requests() {
    let c = Cluster::start("t", 2).await;
    let r = c
        .client
        .meta_call(|mut m| async move {
            let request = tern_proto::CreateTableRequest { name: "r".into(), partition_count: 2, replica_count: 3, restoring: true };
            m.create_table(request).await.map(|r| r.into_inner())
        })
        .await
        .unwrap();
    tern_proto::check(&r.error).unwrap();
    assert!(c.client.table_info("r").await.unwrap().restoring);
    let mut client = ClientConfig::new(vec![c.meta.address.clone()]);
    client.timeout = Duration::from_millis(500);
    let client = Client::new(client).unwrap();
    let e = client.table("r").get(b"k", b"").await.unwrap_err();
    assert!(e.to_string().contains("being restored"), "{e}");
    let e = client.table("r").set(b"k", b"", b"v", 0).await.unwrap_err();
    assert!(e.to_string().contains("being restored"), "{e}");
    let r = c
        .client
        .meta_call(|mut m| async move {
            m.finish_restore(tern_proto::TableRequest { name: "r".into(), ..Default::default() }).await.map(|r| r.into_inner())
        })
        .await
        .unwrap();
    tern_proto::check(&r.error).unwrap();
    let mut done = false;
    for _ in 0..100 {
        if client.table("r").set(b"k", b"", b"v", 0).await.is_ok() {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(done, "the restored table never took a write");
    assert_eq!(client.table("r").get(b"k", b"").await.unwrap(), Some(b"v".to_vec()));
    c.shutdown().await;
}

/// A backup survives the death of a server leading some of its partitions: the attempts there fail,
/// the coordinator takes those partitions again at their new leaders, and the backup completes and
/// restores to every record written before it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_survives_a_leader_dying() {
    use tern_client::backup::{backup_table, restore_table};
    let mut c = Cluster::start_with("src", 4, 4, Duration::from_secs(10)).await;
    let t = c.client.table("src");
    // Incompressible values, so that the checkpoint's files are as large as the data.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..1000 {
        let value: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        t.set(format!("k{i}").as_bytes(), b"", &value, 0).await.unwrap();
    }
    let before = table_contents(&t).await;
    // The server leading the most partitions dies shortly after the backup starts; at 1 MiB/s per
    // partition each partition's copy takes about a second, so some are under way.
    let info = c.client.table_info("src").await.unwrap();
    let mut led = std::collections::HashMap::new();
    for p in &info.partitions {
        *led.entry(p.leader_node).or_insert(0) += 1;
    }
    let (victim_node, _) = led.into_iter().max_by_key(|(_, n)| *n).unwrap();
    let victim = c.servers.iter().position(|s| s.node_id == victim_node).unwrap();
    let victim = c.servers.remove(victim);
    let root = tempfile::tempdir().unwrap();
    let root_s = root.path().to_string_lossy().into_owned();
    let mut quiet = |_: &tern_client::backup::Progress| {};
    let backup = backup_table(&c.client, "src", &root_s, 1 << 20, &mut quiet, std::future::pending());
    let kill = async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        victim.shutdown().await;
    };
    let started = std::time::Instant::now();
    let ((uri, m), ()) = tokio::join!(async { backup.await.unwrap() }, kill);
    assert!(started.elapsed() > Duration::from_millis(800), "the server died while the backup ran: {:?}", started.elapsed());
    assert_eq!(m.partitions.len(), 4);
    let r = restore_table(&c.client, &uri, "copy", 0, &mut |_| {}, std::future::pending()).await.unwrap();
    assert_eq!(r.records as usize, before.len());
    assert_eq!(table_contents(&c.client.table("copy")).await, before);
    c.shutdown().await;
}

/// A cluster whose meta keeps its port across restarts (a duplication names it), and whose
/// processes can be stopped and started again on their data directories.
struct RestartableCluster {
    dir: tempfile::TempDir,
    meta_address: String,
    meta: Option<MetaNode>,
    servers: Vec<Option<ServerNode>>,
    client: Client,
}

impl RestartableCluster {
    async fn start(table: &str, partitions: u32) -> RestartableCluster {
        let dir = tempfile::tempdir().unwrap();
        let meta_address = format!("127.0.0.1:{}", common::free_port());
        let client = Client::new(ClientConfig::new(vec![meta_address.clone()])).unwrap();
        let mut c = RestartableCluster { dir, meta_address, meta: None, servers: vec![None, None, None], client };
        c.start_meta().await;
        for i in 0..3 {
            c.start_server(i).await;
        }
        c.create_table(table, partitions).await;
        c
    }

    async fn create_table(&self, name: &str, partitions: u32) {
        common::create_table_once_servers_are_live(&self.client, name, partitions).await;
    }

    async fn start_meta(&mut self) {
        let mut cfg = MetaConfig::new(self.dir.path().join("meta"), self.meta_address.parse().unwrap());
        cfg.node_grace = Duration::from_secs(5);
        // The port was just released by a stopped meta: binding may need a moment.
        for attempt in 0.. {
            match MetaNode::start(cfg.clone()).await {
                Ok(m) => {
                    self.meta = Some(m);
                    return;
                }
                Err(e) if attempt < 50 => {
                    eprintln!("meta start: {e}; again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("meta start: {e}"),
            }
        }
    }

    async fn start_server(&mut self, i: usize) {
        let cfg = ServerConfig::new(self.dir.path().join(format!("s{i}")), any_port(), vec![self.meta_address.clone()]);
        self.servers[i] = Some(ServerNode::start(cfg).await.unwrap());
    }

    async fn stop_server(&mut self, i: usize) {
        if let Some(s) = self.servers[i].take() {
            s.shutdown().await;
        }
    }

    /// Every process stopped: to the other cluster, the link is cut.
    async fn stop_all(&mut self) {
        for i in 0..self.servers.len() {
            self.stop_server(i).await;
        }
        if let Some(m) = self.meta.take() {
            m.shutdown().await;
        }
    }

    async fn start_all(&mut self) {
        self.start_meta().await;
        for i in 0..self.servers.len() {
            self.start_server(i).await;
        }
    }

    async fn shutdown(mut self) {
        self.stop_all().await;
    }
}

/// Two-way duplication between two real clusters converges: a table with data before the
/// duplication is copied whole, then writes to both clusters (their own keys and shared ones,
/// sets, TTLs, deletes and increments) are shipped both ways while a server of one cluster is
/// stopped and started again, and while the other cluster is entirely down (the link cut) and
/// comes back. Afterwards every partition holds the same records on both sides (checksums of the
/// user records compared at one time), `dup list` shows no lag and no error, and pause, resume
/// and remove work.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplication_converges_both_ways_through_kills_and_a_cut_link() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut a = RestartableCluster::start("t", 4).await;
    let mut b = RestartableCluster::start("t", 4).await;
    let ta = a.client.table("t");
    for i in 0..300 {
        ta.set(format!("before{i}").as_bytes(), b"s", format!("v{i}").as_bytes(), 0).await.unwrap();
    }
    let add = |remote: &RestartableCluster| tern_client::dup::AddDuplication {
        table: "t".into(),
        remote_meta: vec![remote.meta_address.clone()],
        remote_table: String::new(),
        log_entries_max: 0,
    };
    let a_to_b = tern_client::dup::add(&a.client, &add(&b)).await.unwrap();
    let b_to_a = tern_client::dup::add(&b.client, &add(&a)).await.unwrap();
    // Bad requests are refused before anything is recorded.
    let mut to_self = add(&a);
    to_self.table = "t".into();
    assert!(tern_client::dup::add(&a.client, &to_self).await.unwrap_err().to_string().contains("this cluster's own"));
    b.create_table("other", 8).await;
    let mut wrong_count = add(&b);
    wrong_count.remote_table = "other".into();
    assert!(tern_client::dup::add(&a.client, &wrong_count).await.unwrap_err().to_string().contains("must match"));
    b.create_table("full", 4).await;
    b.client.table("full").set(b"k", b"s", b"v", 0).await.unwrap();
    let mut not_empty = add(&b);
    not_empty.remote_table = "full".into();
    assert!(tern_client::dup::add(&a.client, &not_empty).await.unwrap_err().to_string().contains("not empty"));
    let mut missing = add(&b);
    missing.remote_table = "nope".into();
    assert!(tern_client::dup::add(&a.client, &missing).await.unwrap_err().to_string().contains("create it there first"));

    let stop = Arc::new(AtomicBool::new(false));
    let wa = tokio::spawn(common::duplication_writer(a.client.clone(), "a", stop.clone()));
    let wb = tokio::spawn(common::duplication_writer(b.client.clone(), "b", stop.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.stop_server(1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.start_server(1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.stop_all().await; // the link is cut: A keeps taking writes, B's writer fails meanwhile
    tokio::time::sleep(Duration::from_secs(3)).await;
    b.start_all().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let (na, nb) = (wa.await.unwrap(), wb.await.unwrap());
    assert!(na > 100 && nb > 100, "both clusters took writes: {na} and {nb}");

    // Converged: the same records in every partition on both sides, compared at one time (past
    // every 1-second TTL written, so expiry timing does not matter).
    let sums = common::wait_clusters_identical(&a.client, &b.client, "t", Duration::from_secs(90)).await;
    assert!(sums.iter().map(|(_, n)| n).sum::<u64>() > 300, "{sums:?}");
    let tb = b.client.table("t");
    assert_eq!(tb.get(b"before7", b"s").await.unwrap(), Some(b"v7".to_vec()), "the full copy carried data from before the duplication");

    // Every partition reports itself caught up, without errors.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let dups = tern_client::dup::list(&a.client, "t").await.unwrap();
        assert_eq!(dups.len(), 1);
        assert_eq!(dups[0].id, a_to_b);
        let settled = dups[0].partitions.iter().all(|p| p.error.is_empty() && !p.full_copy && p.lag_ms == 0 && p.confirmed_index > 0);
        if settled {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "duplication did not settle: {:?}", dups[0].partitions);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Paused: writes stay here; resumed: they arrive; removed: gone from the list.
    tern_client::dup::change(&a.client, a_to_b, tern_proto::DuplicationAction::DupPause).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await; // heartbeats carry the pause to the shippers
    ta.set(b"paused", b"s", b"x", 0).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(tb.get(b"paused", b"s").await.unwrap(), None, "nothing is shipped while paused");
    tern_client::dup::change(&a.client, a_to_b, tern_proto::DuplicationAction::DupResume).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while tb.get(b"paused", b"s").await.unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "resumed duplication did not deliver");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tern_client::dup::change(&b.client, b_to_a, tern_proto::DuplicationAction::DupRemove).await.unwrap();
    assert!(tern_client::dup::list(&b.client, "").await.unwrap().is_empty());
    assert!(tern_client::dup::change(&b.client, b_to_a, tern_proto::DuplicationAction::DupPause).await.is_err(), "no such duplication any more");
    a.shutdown().await;
    b.shutdown().await;
}

/// The change log is bounded: a duplication paused while more writes than its log holds arrive
/// falls back to a full copy (and `dup list` says so), then, resumed, delivers everything,
/// deletes included, and the clusters match again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplication_too_far_behind_falls_back_to_a_full_copy() {
    let a = RestartableCluster::start("t", 1).await;
    let b = RestartableCluster::start("t", 1).await;
    let request = tern_client::dup::AddDuplication {
        table: "t".into(),
        remote_meta: vec![b.meta_address.clone()],
        remote_table: String::new(),
        log_entries_max: 1000,
    };
    let id = tern_client::dup::add(&a.client, &request).await.unwrap();
    let (ta, tb) = (a.client.table("t"), b.client.table("t"));
    ta.set(b"early", b"s", b"1", 0).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tb.get(b"early", b"s").await.unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "the first write was not delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tern_client::dup::change(&a.client, id, tern_proto::DuplicationAction::DupPause).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    ta.del(b"early", b"s").await.unwrap();
    for i in 0..1200 {
        ta.set(format!("k{i}").as_bytes(), b"s", b"v", 0).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let p = tern_client::dup::list(&a.client, "t").await.unwrap()[0].partitions[0].clone();
        if p.full_copy && p.error.is_empty() {
            break; // reported by the leader's next heartbeat
        }
        assert!(std::time::Instant::now() < deadline, "not reported as needing a full copy: {p:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tern_client::dup::change(&a.client, id, tern_proto::DuplicationAction::DupResume).await.unwrap();
    let sums = common::wait_clusters_identical(&a.client, &b.client, "t", Duration::from_secs(60)).await;
    assert_eq!(sums[0].1, 1200);
    assert_eq!(tb.get(b"early", b"s").await.unwrap(), None, "the delete reached the remote through the full copy's tombstones");
    a.shutdown().await;
    b.shutdown().await;
}
