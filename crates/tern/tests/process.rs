//! Fault tests on a real multi-process cluster: `tern meta` and three `tern server` processes on
//! loopback, killed with SIGKILL and restarted, driven through the Rust client.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_proto::PartitionStatusRequest;

/// Writes continue while one of three servers is SIGKILLed: raft elects new leaders by itself, every
/// acknowledged write is readable afterwards, and the restarted server catches up to identical
/// replica contents.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_one_server_loses_no_acknowledged_write() {
    let mut c = ProcCluster::start(&[]);
    c.create_table("f", 4).await;
    let acked: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (t, acked, stop) = (c.client.table("f"), acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if t.set(format!("k{i}").as_bytes(), b"", format!("v{i}").as_bytes(), 0).await.is_ok() {
                    acked.lock().unwrap().push((i, Instant::now()));
                }
                i += 4;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.servers[1].kill();
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let after_kill = acked.iter().filter(|(_, at)| *at > killed_at + Duration::from_secs(4)).count();
    assert!(after_kill > 0, "writes resumed after the kill ({} acked in total)", acked.len());
    // Per partition: how long after the kill its first write was acknowledged (the partitions the
    // killed server led wait for an election; the others barely notice).
    let mut first_after: BTreeMap<u32, Duration> = BTreeMap::new();
    for (i, at) in &acked {
        if *at > killed_at {
            let p = tern_core::codec::partition_of(format!("k{i}").as_bytes(), 4);
            let gap = *at - killed_at;
            first_after.entry(p).and_modify(|g| *g = (*g).min(gap)).or_insert(gap);
        }
    }
    eprintln!("acked {} writes; first ack per partition after the kill: {first_after:?}", acked.len());
    assert_eq!(first_after.len(), 4, "every partition took writes with one server down");

    c.servers[1].start();
    let t = c.client.table("f");
    for (i, _) in &acked {
        assert_eq!(t.get(format!("k{i}").as_bytes(), b"").await.unwrap(), Some(format!("v{i}").into_bytes()), "acknowledged write k{i} lost");
    }
    c.wait_replicas_identical("f", Duration::from_secs(60)).await;
}

/// A server that is down while its peers compact their logs comes back, receives a snapshot (RocksDB
/// checkpoint streamed in chunks), and converges to contents identical to its peers'.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_replica_catches_up_by_snapshot() {
    let mut c = ProcCluster::start(&["--log-gc-threshold", "20", "--log-gc-lag-max", "50"]);
    c.create_table("s", 2).await;
    let t = c.client.table("s");
    for i in 0..20 {
        t.set(format!("before{i}").as_bytes(), b"", b"x", 0).await.unwrap();
    }
    c.servers[2].kill();
    for i in 0..400 {
        t.set(format!("during{i}").as_bytes(), b"sk", format!("{i}").as_bytes(), 0).await.unwrap();
    }
    // Give leaders a log-GC interval (1 s) to compact past the dead replica.
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.servers[2].start();
    c.wait_replicas_identical("s", Duration::from_secs(60)).await;

    // Every replica of the restarted server was refilled from a snapshot (meta learns of it at the
    // next heartbeat).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = c
            .client
            .meta_call(|mut m| async move { m.get_partition_status(PartitionStatusRequest { table: "s".into() }).await.map(|r| r.into_inner()) })
            .await
            .unwrap();
        let snapshots: u64 = status.partitions.iter().flat_map(|p| p.replicas.iter()).map(|r| r.snapshots_applied).sum();
        if snapshots >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "expected snapshot installs on the restarted server, saw {snapshots}: {status:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for i in (0..400).step_by(37) {
        assert_eq!(t.get(format!("during{i}").as_bytes(), b"sk").await.unwrap(), Some(format!("{i}").into_bytes()));
    }
    let _ = &c.meta_address;
}

fn shell(meta: &str, script: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tern")).args(["shell", "--meta", meta, "-e", script]).output().expect("run tern shell")
}

/// The embedded default: `tern playground` starts a cluster with table demo, the one-shot shell
/// talks to it and reports failures through its exit status, and after a clean stop (SIGTERM) and a
/// restart every record is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playground_shell_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let meta_port = free_port();
    let meta = format!("127.0.0.1:{meta_port}");
    let args = vec![
        "playground".to_string(),
        "--data-dir".into(),
        path(dir.path(), "data"),
        "--meta-port".into(),
        meta_port.to_string(),
        "--server-port".into(),
        "0".into(),
        "--redis-port".into(),
        "0".into(),
    ];
    let mut pg = Proc::spawn(args, dir.path().join("playground.log"));
    let deadline = Instant::now() + Duration::from_secs(60);
    // Wait with an idempotent command (each shell is a new client, so a retried incr would count twice).
    loop {
        let out = shell(&meta, "set user:1 name Ada");
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "playground never answered: {}", String::from_utf8_lossy(&out.stderr));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let out = shell(&meta, "multi_set user:1 age 36 lang en; incr user:1 visits 2");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = shell(&meta, "get user:1 name; count user:1; ls");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("\"Ada\"") && stdout.contains("\n4\n") && stdout.contains("demo"), "{stdout}");

    let out = shell(&meta, "get user:1; frobnicate");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("usage: get") && stderr.contains("unknown command"), "{stderr}");

    // Clean stop (SIGTERM, as Ctrl-C) and restart.
    let pid = pg.child.as_ref().unwrap().id();
    Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    let status = pg.child.take().unwrap().wait().unwrap();
    assert!(status.success(), "playground exits cleanly on SIGTERM: {status:?}");
    pg.start();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = shell(&meta, "get user:1 name; get user:1 visits");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            assert!(stdout.contains("\"Ada\"") && stdout.contains("\"2\""), "{stdout}");
            break;
        }
        if Instant::now() >= deadline {
            let log = std::fs::read_to_string(dir.path().join("playground.log")).unwrap_or_default();
            let tail: String = log.lines().take(12).collect::<Vec<_>>().join("\n");
            panic!("restarted playground never answered: {}\n--- playground log ---\n{tail}", String::from_utf8_lossy(&out.stderr));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Self-healing on real processes: SIGKILL one of four servers under write load; meta replaces its
/// replicas on the others (learner, snapshot, joint consensus), every partition is back to three
/// identical replicas on live servers, and every acknowledged write is readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_heals_to_three_replicas() {
    let mut c = ProcCluster::start_with(4, 2, &[]);
    c.create_table("h", 4).await;
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (t, acked, stop) = (c.client.table("h"), acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if t.set(format!("k{i}").as_bytes(), b"", format!("v{i}").as_bytes(), 0).await.is_ok() {
                    acked.lock().unwrap().push(i);
                }
                i += 4;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Kill a server that holds replicas (all four do with 12 replicas on 4 servers, but be sure).
    let nodes = c.client.refresh_nodes().await.unwrap();
    let victim_address = nodes.iter().find(|n| n.replica_count > 0).unwrap().address.clone();
    let victim = c.servers.iter().position(|p| p.args.contains(&victim_address)).unwrap();
    let dead_node = nodes.iter().find(|n| n.address == victim_address).unwrap().node_id;
    c.servers[victim].kill();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let info = c.client.table_info("h").await.unwrap();
        if info.partitions.iter().all(|p| p.peers.len() == 3 && p.peers.iter().all(|x| x.node_id != dead_node)) {
            break;
        }
        assert!(Instant::now() < deadline, "replicas of the killed server were not replaced: {info:?}{}", c.log_summary());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    c.wait_replicas_identical("h", Duration::from_secs(60)).await;
    let t = c.client.table("h");
    let acked = acked.lock().unwrap().clone();
    for i in &acked {
        assert_eq!(t.get(format!("k{i}").as_bytes(), b"").await.unwrap(), Some(format!("v{i}").into_bytes()), "acknowledged write k{i} lost");
    }
    eprintln!("{} acknowledged writes all readable after healing", acked.len());
}

/// Two-way duplication between two clusters of real processes survives SIGKILL: while both take
/// writes (their own keys and shared ones), one server of the first cluster is killed and
/// restarted, then every process of the second cluster is killed (the link is gone, the first
/// keeps taking writes) and started again. Afterwards both clusters hold the same records in every
/// partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplication_survives_a_killed_cluster() {
    let mut a = ProcCluster::start(&[]);
    let mut b = ProcCluster::start(&[]);
    a.create_table("t", 4).await;
    b.create_table("t", 4).await;
    // The table must start empty for the first direction: the probes written above go first.
    for c in [&a, &b] {
        let t = c.client.table("t");
        for p in 0..4 {
            t.del(key_in_partition(p, 4).as_bytes(), b"probe").await.unwrap();
        }
    }
    let add = |remote: &ProcCluster| tern_client::dup::AddDuplication {
        table: "t".into(),
        remote_meta: vec![remote.meta_address.clone()],
        remote_table: String::new(),
        log_entries_max: 0,
    };
    tern_client::dup::add(&a.client, &add(&b)).await.unwrap();
    tern_client::dup::add(&b.client, &add(&a)).await.unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let wa = tokio::spawn(duplication_writer(a.client.clone(), "a", stop.clone()));
    let wb = tokio::spawn(duplication_writer(b.client.clone(), "b", stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.servers[0].kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.servers[0].start();
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.meta.kill();
    for s in &mut b.servers {
        s.kill();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    b.meta.start();
    for s in &mut b.servers {
        s.start();
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (na, nb) = (wa.await.unwrap(), wb.await.unwrap());
    assert!(na > 100 && nb > 50, "both clusters took writes: {na} and {nb}");
    let sums = wait_clusters_identical(&a.client, &b.client, "t", Duration::from_secs(90)).await;
    eprintln!("converged: {sums:?}");
    assert!(sums.iter().map(|(_, n)| n).sum::<u64>() > 100, "{sums:?}");
}

/// A server refuses hibernation and idle-engine settings out of range at start, naming the flag
/// and the allowed range, before it opens or binds anything.
#[test]
fn server_refuses_bad_hibernation_settings() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value) in [("--hibernate-after-ticks", "2000000"), ("--engines-open-max", "2000000"), ("--hibernate-after-ticks", "soon")] {
        let out = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["server", "--data-dir", dir.path().to_str().unwrap(), "--listen", "127.0.0.1:0", "--meta", "127.0.0.1:1", flag, value])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag} {value} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
    }
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "nothing was created");
}

/// Logs written to a file carry no terminal colour codes; `--log-format json` writes one JSON
/// object per line (level, fields, target), for log shippers.
#[test]
fn logs_are_plain_in_files_and_json_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tern")).args(["--log-format", "yaml", "meta", "--data-dir", "unused"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--log-format") && stderr.contains("text, json"), "{stderr}");
    for format in ["text", "json"] {
        let log = dir.path().join(format!("{format}.log"));
        let data = dir.path().join(format!("meta-{format}"));
        let args = ["--log-format", format, "meta", "--data-dir", data.to_str().unwrap(), "--listen", &format!("127.0.0.1:{}", free_port())];
        let mut meta = Proc::spawn(args.iter().map(|a| a.to_string()).collect(), log.clone());
        let started = Instant::now();
        while std::fs::read_to_string(&log).unwrap_or_default().lines().count() < 2 && started.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(100));
        }
        meta.kill();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.lines().count() >= 2, "{format}: the meta node logged: {text}");
        assert!(!text.contains('\u{1b}'), "{format}: no colour codes in a file: {text}");
        if format == "json" {
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(v.get("level").is_some() && v.get("fields").is_some(), "{line}");
            }
        }
    }
}
