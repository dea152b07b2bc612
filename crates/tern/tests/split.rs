//! Online partition split on a real cluster in this process (one meta server, three replica servers,
//! RocksDB and raft-engine in temporary directories, gRPC on loopback): writes keep succeeding while
//! a table doubles its partitions twice, every acknowledged write is there afterwards, replicas agree,
//! and reads, scans and counts see each record exactly once.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_client::{Client, ClientConfig, FullScanCursor, TernError};
use tern_meta::{MetaConfig, MetaNode};
use tern_server::{ServerConfig, ServerNode};

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Keys each writer owns (so the last acknowledged value of each is known).
const KEYS_PER_WRITER: u64 = 40;
const WRITERS: u64 = 4;

/// Sets its own keys round and round and increments its own counter, until stopped; returns the
/// last value acknowledged for each key and the counter's acknowledged total. Every write must
/// succeed: a split is not an outage.
async fn writer(client: Client, w: u64, stop: Arc<AtomicBool>) -> (BTreeMap<Vec<u8>, Vec<u8>>, i64) {
    let t = client.table("t");
    let mut last = BTreeMap::new();
    let mut counted = 0;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = format!("w{w}-k{}", n % KEYS_PER_WRITER).into_bytes();
        let value = format!("{n}").into_bytes();
        t.set(&key, b"s", &value, 0).await.unwrap_or_else(|e| panic!("writer {w}: set {n} failed during a split: {e}"));
        last.insert(key, value);
        if n.is_multiple_of(5) {
            counted = t.incr(format!("counter{w}").as_bytes(), b"", 1, 0).await.unwrap_or_else(|e| panic!("writer {w}: incr failed: {e}"));
        }
    }
    (last, counted)
}

async fn wait_split_done(client: &Client, table: &str, timeout: Duration) -> u32 {
    let deadline = Instant::now() + timeout;
    loop {
        let info = client.table_info(table).await.unwrap();
        if info.split.is_none() {
            return info.partition_count;
        }
        assert!(Instant::now() < deadline, "split did not finish: {:?}", info.split);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every replica of every partition holds the same state (same applied index and checksum), once
/// writes have stopped.
async fn wait_replicas_identical(client: &Client, table: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = client.table_info(table).await.unwrap();
        let mut agree = true;
        for p in &info.partitions {
            let group = tern_core::GroupId::new(info.table_id, p.index).0;
            let mut sums = Vec::new();
            for peer in &p.peers {
                match client.replica_checksum(peer.node_id, group).await {
                    Ok(r) => sums.push((r.applied_index, r.checksum)),
                    Err(_) => agree = false,
                }
            }
            agree &= sums.len() == 3 && sums.windows(2).all(|w| w[0] == w[1]);
        }
        if agree {
            return;
        }
        assert!(Instant::now() < deadline, "replicas of {table} did not converge");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_splits_twice_under_writes_without_losing_one() {
    let dir = tempfile::tempdir().unwrap();
    let meta = MetaNode::start(MetaConfig::new(dir.path().join("meta"), any_port())).await.unwrap();
    let mut servers = Vec::new();
    for i in 0..3 {
        servers.push(ServerNode::start(ServerConfig::new(dir.path().join(format!("s{i}")), any_port(), vec![meta.address.clone()])).await.unwrap());
    }
    let client = Client::new(ClientConfig::new(vec![meta.address.clone()])).unwrap();
    common::create_table_once_servers_are_live(&client, "t", 2).await;
    let t = client.table("t");
    // Records written before: a hashkey with many sortkeys, and plain ones.
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..30).map(|i| (format!("s{i:02}").into_bytes(), b"v".to_vec())).collect();
    t.multi_set(b"wide", &pairs, 0).await.unwrap();
    for i in 0..100 {
        t.set(format!("before{i}").as_bytes(), b"", b"x", 0).await.unwrap();
    }

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS).map(|w| tokio::spawn(writer(client.clone(), w, stop.clone()))).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Bad requests are refused with what is wrong.
    assert!(matches!(client.split_table("nope", false).await, Err(TernError::TableNotFound(_))));
    let unknown = tern_proto::SplitTableRequest { table: "t".into(), action: 7 };
    let r = client.meta_call(|mut m| {
        let request = unknown.clone();
        async move { m.split_table(request).await.map(|r| r.into_inner()) }
    });
    assert!(matches!(tern_proto::check(&r.await.unwrap().error), Err(TernError::InvalidArgument(m)) if m.contains("unknown split action 7")));
    let split = tern_proto::write_request::Op::Split(tern_proto::Split { partition_count: 4 });
    let refused = t.write_op(b"k", split).await;
    assert!(matches!(refused, Err(TernError::InvalidArgument(m)) if m.contains("proposed by servers")), "a client cannot propose a split");
    assert!(matches!(client.split_table("t", true).await, Err(TernError::InvalidArgument(m)) if m.contains("not splitting")));

    let started = Instant::now();
    let said = client.split_table("t", false).await.unwrap();
    assert!(said.contains("2 partitions into 4"), "{said}");
    assert!(matches!(client.split_table("t", false).await, Err(TernError::InvalidArgument(m)) if m.contains("already splitting")));
    assert_eq!(wait_split_done(&client, "t", Duration::from_secs(60)).await, 4);
    eprintln!("2 -> 4 partitions in {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    client.split_table("t", false).await.unwrap();
    assert_eq!(wait_split_done(&client, "t", Duration::from_secs(60)).await, 8);
    eprintln!("4 -> 8 partitions in {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut expected = BTreeMap::new();
    let mut counters = Vec::new();
    for w in writers {
        let (last, counted) = w.await.unwrap();
        expected.extend(last);
        counters.push(counted);
    }
    eprintln!("{} keys written, counters at {counters:?}", expected.len());
    for (key, value) in &expected {
        assert_eq!(t.get(key, b"s").await.unwrap().as_ref(), Some(value), "key {}", String::from_utf8_lossy(key));
    }
    for (w, counted) in counters.iter().enumerate() {
        let stored = t.get(format!("counter{w}").as_bytes(), b"").await.unwrap().unwrap_or_default();
        assert_eq!(String::from_utf8_lossy(&stored), counted.to_string(), "every increment applied exactly once");
    }
    assert_eq!(t.count(b"wide").await.unwrap(), 30);
    for i in 0..100 {
        assert_eq!(t.get(format!("before{i}").as_bytes(), b"").await.unwrap(), Some(b"x".to_vec()));
    }
    // A full scan sees each record once: the records a split left behind in the sibling's engine
    // are not the sibling's to show.
    let mut cursor = FullScanCursor::default();
    let mut seen = BTreeMap::new();
    while !cursor.done {
        let (records, next) = t.full_scan(&cursor, 50, true).await.unwrap();
        for r in records {
            *seen.entry((r.hashkey.to_vec(), r.sortkey.to_vec())).or_insert(0) += 1;
        }
        cursor = next;
    }
    assert!(seen.values().all(|n| *n == 1), "a record was scanned twice");
    assert_eq!(seen.len(), 30 + 100 + expected.len() + counters.iter().filter(|c| **c > 0).count());
    wait_replicas_identical(&client, "t").await;

    for s in servers {
        s.shutdown().await;
    }
    meta.shutdown().await;
}
