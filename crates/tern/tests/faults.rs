//! Linearizability of a real cluster under process faults. `tern meta`, three `tern server` processes
//! and a `tern proxy` run on loopback; clients speaking RESP to the proxy and clients using the Rust
//! client do SET, GET and INCR on a few shared keys (the RESP clients also RPUSH, LPOP and LRANGE a
//! few lists) while a nemesis pauses servers (SIGSTOP/SIGCONT)
//! and kills and restarts them (SIGKILL). Every operation is recorded with its call and return time;
//! an operation whose outcome the client cannot know (timeout, lost connection, error) is recorded as
//! unknown: it may or may not have happened. The history is then checked for linearizability per key
//! (tern-sim's checker), and afterwards every server must be alive, heartbeating and holding replicas
//! identical to its peers' (no half-dead node).
//!
//! `faults_short_window` runs in the test suite (about half a minute of faults);
//! `faults_soak` is the long version: `TERN_FAULT_SECONDS=600 cargo nextest run -p tern --test faults
//! --run-ignored only --no-capture` (`TERN_FAULT_SERVER_ARGS="--log-writer-thread"` adds server
//! options; `TERN_FAULT_SPLIT=1` also splits the table while the faults run).

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_client::{Client, ClientConfig};
use tern_core::time::{RandomSource, SeededRandom};
use tern_sim::checker::{check, Input, Operation, Output, Verdict};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Keys written with SET (unique values) and keys counted with INCR; few, so clients collide.
const REGISTERS: u64 = 5;
const COUNTERS: u64 = 5;
const LISTS: u64 = 3;
/// Longest a client waits for one answer before it counts the outcome as unknown.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(12);
/// Search budget per key for the checker.
const CHECK_STEPS_PER_KEY_MAX: u64 = 20_000_000;

/// The history every client appends to; times are nanoseconds since the run started.
struct Recorder {
    started: Instant,
    operations: Mutex<Vec<Operation>>,
    unknown: AtomicU64,
}

impl Recorder {
    fn now(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn record(&self, client: u64, key: &[u8], input: Input, output: Option<Output>, call: u64) {
        if output.is_none() {
            self.unknown.fetch_add(1, Ordering::Relaxed);
        }
        let ret = self.now();
        self.operations.lock().unwrap().push(Operation { client, hashkey: key.to_vec(), input, output, call, ret });
    }
}

/// What a client does next: (key, operation).
fn next_operation(rng: &mut SeededRandom, client: u64, n: u64) -> (Vec<u8>, Input) {
    let sortkey = Vec::new();
    match rng.range(0, 10) {
        0..=3 => {
            let key = format!("reg{}", rng.range(0, REGISTERS)).into_bytes();
            (key, Input::Set { sortkey, value: format!("c{client}-{n}").into_bytes() })
        }
        4..=5 => (format!("cnt{}", rng.range(0, COUNTERS)).into_bytes(), Input::Incr { sortkey, delta: 1 }),
        6..=7 => (format!("reg{}", rng.range(0, REGISTERS)).into_bytes(), Input::Get { sortkey }),
        _ => (format!("cnt{}", rng.range(0, COUNTERS)).into_bytes(), Input::Get { sortkey }),
    }
}

/// A client on the Rust client library (its own connection pool, client id and retry loop).
async fn rust_worker(meta: String, client_number: u64, recorder: Arc<Recorder>, stop: Arc<AtomicBool>, seed: u64) {
    let mut cfg = ClientConfig::new(vec![meta]);
    cfg.timeout = Duration::from_secs(10);
    let table = Client::new(cfg).unwrap().table("f");
    let mut rng = SeededRandom::new(seed);
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let (key, input) = next_operation(&mut rng, client_number, n);
        let call = recorder.now();
        let output = match &input {
            Input::Set { value, .. } => table.set(&key, b"", value, 0).await.ok().map(|_| Output::Done),
            Input::Incr { delta, .. } => table.incr(&key, b"", *delta, 0).await.ok().map(Output::Integer),
            Input::Get { .. } => match table.get(&key, b"").await {
                Ok(v) => Some(Output::Value(v)),
                Err(_) => continue, // a failed read changed nothing
            },
            _ => unreachable!("not generated"),
        };
        recorder.record(client_number, &key, input, output, call);
    }
}

/// A reply of the Redis protocol, as much of it as these commands use.
#[derive(Debug)]
enum Reply {
    Status,
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    /// An array of bulk strings (LRANGE).
    Array(Vec<Vec<u8>>),
    Error(#[allow(dead_code)] String),
}

/// A minimal RESP2 client connection.
struct Resp {
    stream: BufReader<TcpStream>,
}

impl Resp {
    async fn connect(address: &str) -> std::io::Result<Resp> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        Ok(Resp { stream: BufReader::new(stream) })
    }

    async fn call(&mut self, args: &[&[u8]]) -> std::io::Result<Reply> {
        let mut frame = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            frame.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            frame.extend_from_slice(a);
            frame.extend_from_slice(b"\r\n");
        }
        self.stream.get_mut().write_all(&frame).await?;
        self.reply().await
    }

    async fn reply(&mut self) -> std::io::Result<Reply> {
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let bad = || std::io::Error::other(format!("unexpected reply line {line:?}"));
        let body = line.get(1..line.len().saturating_sub(2)).ok_or_else(bad)?;
        match line.as_bytes().first() {
            Some(b'+') => Ok(Reply::Status),
            Some(b'-') => Ok(Reply::Error(body.to_string())),
            Some(b':') => Ok(Reply::Integer(body.parse().map_err(|_| bad())?)),
            Some(b'$') => {
                let len: i64 = body.parse().map_err(|_| bad())?;
                if len < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let mut data = vec![0; len as usize + 2];
                self.stream.read_exact(&mut data).await?;
                data.truncate(len as usize);
                Ok(Reply::Bulk(Some(data)))
            }
            Some(b'*') => {
                let n: usize = body.parse().map_err(|_| bad())?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    match Box::pin(self.reply()).await? {
                        Reply::Bulk(Some(v)) => items.push(v),
                        _ => return Err(bad()),
                    }
                }
                Ok(Reply::Array(items))
            }
            _ => Err(bad()),
        }
    }
}

/// A client speaking RESP to the proxy; after a timeout or a lost connection it reconnects.
async fn redis_worker(address: String, client_number: u64, recorder: Arc<Recorder>, stop: Arc<AtomicBool>, seed: u64) {
    let mut rng = SeededRandom::new(seed);
    let mut connection: Option<Resp> = None;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        if connection.is_none() {
            match Resp::connect(&address).await {
                Ok(c) => connection = Some(c),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let resp = connection.as_mut().expect("connected above");
        n += 1;
        // A fifth of the Redis clients' operations are on lists, run inside raft apply by tern-redis.
        let (key, input) = if rng.range(0, 5) == 0 {
            let key = format!("list{}", rng.range(0, LISTS)).into_bytes();
            let input = match rng.range(0, 10) {
                0..=4 => Input::ListPush { value: format!("c{client_number}-{n}").into_bytes() },
                5..=7 => Input::ListPop,
                _ => Input::ListRange,
            };
            (key, input)
        } else {
            next_operation(&mut rng, client_number, n)
        };
        let call = recorder.now();
        let args: Vec<&[u8]> = match &input {
            Input::Set { value, .. } => vec![b"SET", &key, value],
            Input::Incr { .. } => vec![b"INCR", &key],
            Input::Get { .. } => vec![b"GET", &key],
            Input::ListPush { value } => vec![b"RPUSH", &key, value],
            Input::ListPop => vec![b"LPOP", &key],
            Input::ListRange => vec![b"LRANGE", &key, b"0", b"-1"],
            _ => unreachable!("not generated"),
        };
        let reply = match tokio::time::timeout(OPERATION_TIMEOUT, resp.call(&args)).await {
            Ok(Ok(reply)) => Some(reply),
            _ => {
                connection = None; // the answer may still come: never read it as another's
                None
            }
        };
        let output = match (&input, reply) {
            (Input::Set { .. }, Some(Reply::Status)) => Some(Output::Done),
            (Input::Incr { .. }, Some(Reply::Integer(v))) => Some(Output::Integer(v)),
            (Input::Get { .. }, Some(Reply::Bulk(v))) => Some(Output::Value(v)),
            (Input::ListPush { .. }, Some(Reply::Integer(v))) => Some(Output::Integer(v)),
            (Input::ListPop, Some(Reply::Bulk(v))) => Some(Output::Value(v)),
            (Input::ListRange, Some(Reply::Array(items))) => Some(Output::Values(items.into_iter().map(Some).collect())),
            (Input::Get { .. } | Input::ListRange, _) => continue, // a failed read changed nothing
            (_, Some(Reply::Error(_)) | None) => None,
            (_, Some(other)) => panic!("{input:?} answered with {other:?}"),
        };
        recorder.record(client_number, &key, input, output, call);
    }
}

/// Counts of what the nemesis did.
#[derive(Debug, Default)]
struct Faults {
    pauses: u32,
    kills: u32,
}

/// Pauses or kills one server at a time (a majority stays up) for `duration`.
async fn nemesis(cluster: &mut ProcCluster, duration: Duration, rng: &mut SeededRandom) -> Faults {
    let mut faults = Faults::default();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(rng.range(500, 2500))).await;
        let victim = rng.range(0, cluster.servers.len() as u64) as usize;
        if rng.range(0, 10) < 6 {
            cluster.servers[victim].pause();
            tokio::time::sleep(Duration::from_millis(rng.range(1500, 3500))).await;
            cluster.servers[victim].resume();
            faults.pauses += 1;
        } else {
            cluster.servers[victim].kill();
            tokio::time::sleep(Duration::from_millis(rng.range(200, 2000))).await;
            cluster.servers[victim].start();
            faults.kills += 1;
        }
    }
    faults
}

async fn run_faults(duration: Duration, seed: u64) {
    // TERN_FAULT_SERVER_ARGS adds server options (for example --log-writer-thread) to the soak.
    let extra = std::env::var("TERN_FAULT_SERVER_ARGS").unwrap_or_default();
    let extra: Vec<&str> = extra.split_whitespace().collect();
    let mut cluster = ProcCluster::start_with(3, 4, &extra);
    cluster.create_table("f", 4).await;
    let (mut proxy, proxy_address) = cluster.start_proxy("f");
    let recorder = Arc::new(Recorder { started: Instant::now(), operations: Mutex::default(), unknown: AtomicU64::new(0) });
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for c in 0..3u64 {
        let (r, s) = (recorder.clone(), stop.clone());
        workers.push(tokio::spawn(redis_worker(proxy_address.clone(), c, r, s, seed ^ (c + 1))));
        let (r, s) = (recorder.clone(), stop.clone());
        workers.push(tokio::spawn(rust_worker(cluster.meta_address.clone(), 100 + c, r, s, seed ^ (c + 101))));
    }
    // Faults start once every client is under way.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // TERN_FAULT_SPLIT=1: the table also splits (4 into 8 partitions) a few seconds into the faults.
    let split = std::env::var("TERN_FAULT_SPLIT").is_ok_and(|v| v == "1").then(|| {
        let meta = cluster.meta_address.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let client = Client::new(ClientConfig::new(vec![meta])).unwrap();
            while let Err(e) = client.split_table("f", false).await {
                eprintln!("split not started yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            eprintln!("split of f started");
            client
        })
    });
    let mut rng = SeededRandom::new(seed);
    let faults = nemesis(&mut cluster, duration, &mut rng).await;
    if let Some(split) = split {
        // It finishes once the faults have stopped, whatever they did to it.
        let client = split.await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while client.table_info("f").await.map_or(true, |t| t.split.is_some() || t.partition_count != 8) {
            assert!(Instant::now() < deadline, "the split of f did not finish after the faults");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        eprintln!("split of f done: 8 partitions");
    }
    // Healing: a few seconds of fault-free traffic, then the clients stop.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let history = recorder.operations.lock().unwrap().clone();
    let unknown = recorder.unknown.load(Ordering::Relaxed);
    let completed = history.len() as u64 - unknown;
    eprintln!(
        "fault run (seed {seed}): {} operations ({completed} completed, {unknown} outcome unknown), {} pauses, {} kills",
        history.len(),
        faults.pauses,
        faults.kills
    );
    let mut per_client: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
    for o in &history {
        let e = per_client.entry(o.client).or_default();
        if o.output.is_some() {
            e.0 += 1
        } else {
            e.1 += 1
        }
    }
    eprintln!("per client (completed, unknown); 0-2 speak RESP to the proxy, 100-102 use the Rust client: {per_client:?}");
    let verdict = check(&history, CHECK_STEPS_PER_KEY_MAX);
    if let Verdict::Violation { hashkey } = &verdict {
        let mut ops: Vec<&Operation> = history.iter().filter(|o| &o.hashkey == hashkey).collect();
        ops.sort_by_key(|o| o.call);
        for o in ops {
            eprintln!("  client {:>3} [{:>12} .. {:>12}] {:?} -> {:?}", o.client, o.call / 1000, o.ret / 1000, o.input, o.output);
        }
        panic!("history of key {:?} is not linearizable (logs in {})", String::from_utf8_lossy(hashkey), cluster.dir.path().display());
    }
    eprintln!("checker: {verdict:?}");
    assert!(completed > 100, "too few operations completed to say anything: {completed}");

    // No half-dead node: every server process still runs, heartbeats, and serves replicas that
    // converge to identical contents.
    for (i, s) in cluster.servers.iter_mut().enumerate() {
        assert!(s.is_running(), "server {i} exited during the run (log: {})", s.log.display());
    }
    assert!(proxy.is_running(), "the proxy exited during the run");
    cluster.wait_all_servers_alive(Duration::from_secs(30)).await;
    cluster.wait_replicas_identical("f", Duration::from_secs(60)).await;
    assert!(completed > 0 && matches!(verdict, Verdict::Linearizable | Verdict::Unknown { .. }));
    proxy.kill();
}

/// The suite's short window: about 25 seconds of pauses and kills under six clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_short_window() {
    let seed = std::env::var("TERN_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    run_faults(Duration::from_secs(25), seed).await;
}

/// The soak: TERN_FAULT_SECONDS of faults (default 600), seed from TERN_FAULT_SEED or the clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn faults_soak() {
    let seconds = std::env::var("TERN_FAULT_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    let seed = std::env::var("TERN_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs());
    run_faults(Duration::from_secs(seconds), seed).await;
}
