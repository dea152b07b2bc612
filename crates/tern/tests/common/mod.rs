//! Shared by the process tests: free ports, child processes that can be killed, paused and restarted,
//! and a cluster of `tern meta` + `tern server` processes on loopback.
#![allow(dead_code)] // each test file uses a different part

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tern_client::{Client, ClientConfig, TernError};
use tern_proto::CreateTableRequest;

/// A free port below the kernel's ephemeral range (32768 and up on Linux). Killed servers restart on
/// their port, and raft peers keep dialling a dead server's port: a port the kernel could hand to
/// another test's listener (bind to port 0) would let this cluster's raft messages reach that one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = 20_000 + (std::process::id() % 1000) as u16 * 12;
    let _ = NEXT.compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(port < 32_000, "no free port below the ephemeral range");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub struct Proc {
    pub args: Vec<String>,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(args: Vec<String>, log: PathBuf) -> Proc {
        let mut p = Proc { args, child: None, log };
        p.start();
        p
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(&self.args)
            .env("RUST_LOG", "warn,tern_meta=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tern");
        self.child = Some(child);
    }

    /// SIGKILL: no shutdown code runs, unsynced state is whatever the OS kept.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            c.wait().unwrap();
        }
    }

    /// SIGSTOP / SIGCONT: the process keeps its sockets and state but runs nothing meanwhile (a long
    /// GC pause, a VM freeze); its clocks keep going, so timers fire late and together on resume.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(c) = &self.child {
            Command::new("kill").args([signal, &c.id().to_string()]).status().expect("run kill");
        }
    }

    /// Whether the process is still running (it did not exit or crash).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct ProcCluster {
    pub dir: tempfile::TempDir,
    pub meta_address: String,
    pub meta: Proc,
    pub servers: Vec<Proc>,
    pub client: Client,
}

impl ProcCluster {
    pub fn start(extra_server_args: &[&str]) -> ProcCluster {
        ProcCluster::start_with(3, 10, extra_server_args)
    }

    pub fn start_with(server_count: usize, node_grace_seconds: u64, extra_server_args: &[&str]) -> ProcCluster {
        let dir = tempfile::tempdir().unwrap();
        let meta_address = format!("127.0.0.1:{}", free_port());
        let meta = Proc::spawn(
            vec![
                "meta".into(),
                "--data-dir".into(),
                path(dir.path(), "meta"),
                "--listen".into(),
                meta_address.clone(),
                "--node-grace-seconds".into(),
                node_grace_seconds.to_string(),
            ],
            dir.path().join("meta.log"),
        );
        let servers = (0..server_count)
            .map(|i| {
                let mut args = vec![
                    "server".to_string(),
                    "--data-dir".into(),
                    path(dir.path(), &format!("s{i}")),
                    "--listen".into(),
                    SocketAddr::from(([127, 0, 0, 1], free_port())).to_string(),
                    "--meta".into(),
                    meta_address.clone(),
                ];
                args.extend(extra_server_args.iter().map(|s| s.to_string()));
                Proc::spawn(args, dir.path().join(format!("s{i}.log")))
            })
            .collect();
        let mut cfg = ClientConfig::new(vec![meta_address.clone()]);
        cfg.timeout = Duration::from_secs(10);
        let client = Client::new(cfg).unwrap();
        ProcCluster { dir, meta_address, meta, servers, client }
    }

    /// For a failure message: each process's panics and the last lines of its log (the logs are in
    /// the temporary directory, gone once the test ends).
    pub fn log_summary(&self) -> String {
        let mut out = String::new();
        for p in std::iter::once(&self.meta).chain(&self.servers) {
            let log = std::fs::read_to_string(&p.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let panics = lines.iter().filter(|l| l.contains("panicked")).take(5);
            let tail = &lines[lines.len().saturating_sub(15)..];
            out += &format!("\n--- {} ---\n", p.log.display());
            for l in panics.chain(tail) {
                out += l;
                out.push('\n');
            }
        }
        out
    }

    pub async fn create_table(&self, name: &str, partitions: u32) {
        create_table_once_servers_are_live(&self.client, name, partitions).await;
        // Wait until every partition accepts a write.
        let t = self.client.table(name);
        for p in 0..partitions {
            let key = key_in_partition(p, partitions);
            let deadline = Instant::now() + Duration::from_secs(30);
            while t.set(key.as_bytes(), b"probe", b"1", 0).await.is_err() {
                assert!(Instant::now() < deadline, "partition {p} never became writable");
            }
        }
    }

    /// Waits until, for every partition, all replicas report the same applied index and checksum.
    pub async fn wait_replicas_identical(&self, table: &str, timeout: Duration) -> BTreeMap<u32, (u64, u64)> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.replica_checksums(table).await {
                Ok(sums) if sums.values().all(|v| v.windows(2).all(|w| w[0] == w[1]) && v.len() == 3) => {
                    return sums.into_iter().map(|(p, v)| (p, v[0])).collect();
                }
                other => {
                    assert!(Instant::now() < deadline, "replicas did not converge: {other:?}{}", self.log_summary());
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    }

    pub async fn replica_checksums(&self, table: &str) -> Result<BTreeMap<u32, Vec<(u64, u64)>>, TernError> {
        self.client.refresh_nodes().await?;
        let info = self.client.table_info(table).await?;
        let mut out = BTreeMap::new();
        for p in &info.partitions {
            let group = tern_core::GroupId::new(info.table_id, p.index).0;
            let mut sums = Vec::new();
            for peer in &p.peers {
                let r = self.client.replica_checksum(peer.node_id, group).await?;
                sums.push((r.applied_index, r.checksum));
            }
            out.insert(p.index, sums);
        }
        Ok(out)
    }
}

/// Creates a table with three replicas, retrying while meta is starting or not enough servers have
/// heartbeated yet (up to a minute).
pub async fn create_table_once_servers_are_live(client: &Client, name: &str, partitions: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = name.to_string();
        let r = client
            .meta_call(|mut m| {
                let name = n.clone();
                async move {
                    m.create_table(CreateTableRequest { name, partition_count: partitions, replica_count: 3, restoring: false })
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await;
        match r.map(|r| tern_proto::check(&r.error)) {
            Ok(Ok(())) => return,
            Ok(Err(TernError::NotEnoughNodes(_))) | Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            other => panic!("create table: {other:?}"),
        }
    }
}

pub fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

pub fn key_in_partition(partition: u32, count: u32) -> String {
    (0..).map(|i| format!("probe{i}")).find(|k| tern_core::codec::partition_of(k.as_bytes(), count) == partition).unwrap()
}

impl ProcCluster {
    /// A `tern proxy` process (Redis endpoint) for `table`; returns it and its address.
    pub fn start_proxy(&self, table: &str) -> (Proc, String) {
        let address = format!("127.0.0.1:{}", free_port());
        let args =
            vec!["proxy".to_string(), "--listen".into(), address.clone(), "--meta".into(), self.meta_address.clone(), "--table".into(), table.into()];
        (Proc::spawn(args, self.dir.path().join("proxy.log")), address)
    }

    /// Waits until meta reports every server alive (heartbeating); fails after `timeout`.
    pub async fn wait_all_servers_alive(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            match self.client.refresh_nodes().await {
                Ok(nodes) if nodes.len() >= self.servers.len() && nodes.iter().all(|n| n.alive) => return,
                other => {
                    assert!(Instant::now() < deadline, "servers not all alive after {timeout:?}: {other:?}\nlogs in {}", self.dir.path().display());
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    }
}

/// Writes random records, deletes and increments into one cluster until told to stop; keys are
/// its own (`own`) or shared with the other cluster (conflicting writes: last writer wins).
pub async fn duplication_writer(client: Client, own: &'static str, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> u64 {
    let t = client.table("t");
    let mut acknowledged = 0;
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        let (hk, sk) = if i.is_multiple_of(3) {
            (format!("shared{}", i % 40), format!("s{}", i % 5))
        } else {
            (format!("{own}{}", i % 200), format!("s{}", i % 7))
        };
        let r = match i % 10 {
            0..=5 => t.set(hk.as_bytes(), sk.as_bytes(), format!("{own}-{i}").as_bytes(), 0).await.map(|_| ()),
            6 => t.set(hk.as_bytes(), sk.as_bytes(), b"short-lived", 1).await.map(|_| ()),
            7 | 8 => t.del(hk.as_bytes(), sk.as_bytes()).await.map(|_| ()),
            _ => t.incr(format!("{own}-counter").as_bytes(), b"n", 1, 0).await.map(|_| ()),
        };
        if r.is_ok() {
            acknowledged += 1;
        }
        if i.is_multiple_of(50) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    acknowledged
}

/// Each partition's (checksum, record count) of user records live at `at`, from its leader.
pub async fn data_checksums(client: &Client, table: &str, at: u64) -> Result<Vec<(u64, u64)>, TernError> {
    let info = client.table_info(table).await?;
    let mut out = Vec::new();
    for p in &info.partitions {
        let group_id = tern_core::GroupId::new(info.table_id, p.index).0;
        let r = client.checksum_of(p.leader_node, tern_proto::ChecksumRequest { group_id, at_unix_ms: at, data_only: true }).await?;
        out.push((r.checksum, r.record_count));
    }
    Ok(out)
}

/// Waits until two clusters hold the same records in every partition (compared a few seconds
/// ahead, past every short TTL written); returns the per-partition (checksum, records).
pub async fn wait_clusters_identical(a: &Client, b: &Client, table: &str, timeout: Duration) -> Vec<(u64, u64)> {
    let deadline = Instant::now() + timeout;
    loop {
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64 + 5_000;
        let (sa, sb) = (data_checksums(a, table, at).await, data_checksums(b, table, at).await);
        if let (Ok(sa), Ok(sb)) = (&sa, &sb) {
            if sa == sb {
                return sa.clone();
            }
        }
        assert!(Instant::now() < deadline, "the clusters did not converge: {sa:?} vs {sb:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
