//! tern-proxy: a Redis endpoint (RESP2 and RESP3) over one Tern table.
//!
//! Owns: the RESP framing (`resp`), routing each command to the partition of its keys and what
//! spans partitions or connections (`commands`: CROSSSLOT, MULTI/EXEC/WATCH queues, SCAN, KEYS,
//! FLUSHDB, per-partition MGET/MSET/DEL), INFO/COMMAND/CONFIG introspection (`info`), and
//! connection handling with its limits and its threads (this file: an acceptor hands each
//! connection to one thread, which serves it to the end). What each command does to a key is
//! tern-redis's, run inside the partition. The proxy is stateless apart from SCAN cursors and
//! transactions being queued: start as many as you like in front of a cluster. It talks to the
//! cluster only through `tern-client`; it must not depend on server-side crates (raft, engine,
//! meta).

mod commands;
mod info;
pub mod resp;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use resp::{parse_command, Reply};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_client::{Client, FullScanCursor, Table};
use tern_core::{TernError, TernResult};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Most threads one proxy runs.
pub const THREADS_MAX: usize = 256;

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// The Tern table this proxy serves.
    pub table: String,
    /// When set, clients must AUTH (or HELLO ... AUTH) before other commands.
    pub password: Option<String>,
    /// Connections beyond this are refused with an error.
    pub max_clients: usize,
    /// Threads serving connections. Each runs its connections and its own connections to the
    /// cluster on one thread (no hand-off between threads on a request's path); a connection
    /// stays on the thread that got it.
    pub threads: usize,
}

impl ProxyConfig {
    pub fn new(listen: SocketAddr, table: &str) -> ProxyConfig {
        ProxyConfig { listen, table: table.to_string(), password: None, max_clients: 10_000, threads: 1 }
    }

    pub fn validate(&self) -> TernResult<()> {
        tern_core::limits::check_table_name(&self.table)?;
        if self.max_clients == 0 || self.max_clients > 100_000 {
            return Err(TernError::invalid(format!("max clients must be between 1 and 100000, not {}", self.max_clients)));
        }
        if self.threads == 0 || self.threads > THREADS_MAX {
            return Err(TernError::invalid(format!("proxy threads must be between 1 and {THREADS_MAX}, not {}", self.threads)));
        }
        if self.password.as_ref().is_some_and(|p| p.is_empty() || p.len() > 512) {
            return Err(TernError::invalid("the password must be 1 to 512 bytes"));
        }
        Ok(())
    }
}

#[derive(Default)]
pub struct Stats {
    pub connections_received: AtomicU64,
    pub connected: AtomicUsize,
    pub rejected: AtomicU64,
    pub commands: AtomicU64,
    pub errors: AtomicU64,
    pub keyspace_hits: AtomicU64,
    pub keyspace_misses: AtomicU64,
}

/// Where a SCAN or HSCAN continues.
pub(crate) enum Cursor {
    Scan(FullScanCursor),
    /// HSCAN, SSCAN, ZSCAN: the key and the sortkey to resume at.
    Elements {
        key: Bytes,
        resume: Bytes,
    },
}

/// SCAN cursors handed out as integers (clients parse them as numbers); the newest are kept.
pub(crate) struct Cursors {
    inner: Mutex<(u64, HashMap<u64, Cursor>, VecDeque<u64>)>,
}

const CURSORS_MAX: usize = 10_000;

impl Cursors {
    fn new() -> Cursors {
        Cursors { inner: Mutex::new((rand_start(), HashMap::new(), VecDeque::new())) }
    }

    pub(crate) fn put(&self, c: Cursor) -> Bytes {
        let mut g = self.inner.lock();
        let (next, map, order) = &mut *g;
        *next += 1;
        let id = *next;
        map.insert(id, c);
        order.push_back(id);
        while order.len() > CURSORS_MAX {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
        Bytes::from(id.to_string())
    }

    /// The cursor for `text`: None for "0" (start), an error for an unknown or forgotten one.
    pub(crate) fn take(&self, text: &[u8]) -> Result<Option<Cursor>, Reply> {
        let id: u64 = std::str::from_utf8(text).ok().and_then(|s| s.parse().ok()).ok_or_else(|| Reply::err("ERR invalid cursor"))?;
        if id == 0 {
            return Ok(None);
        }
        let mut g = self.inner.lock();
        g.1.remove(&id).map(Some).ok_or_else(|| Reply::err("ERR invalid cursor (unknown, already used, or expired: start again from 0)"))
    }
}

fn rand_start() -> u64 {
    // Distinct proxies hand out distinct cursor numbers, so a cursor sent to the wrong proxy fails.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    ((std::process::id() as u64 & 0x7fff_ffff) << 24) | (nanos as u64 & 0xff_ffff)
}

/// State shared by all connections of one proxy, on every thread.
pub struct Shared {
    pub config: ProxyConfig,
    pub stats: Stats,
    pub(crate) cursors: Cursors,
    pub started: Instant,
    pub address: SocketAddr,
    /// Last counted (keys, keys with an expiry) and when, for INFO keyspace.
    key_count_cache: Mutex<Option<(u64, u64, Instant)>>,
    /// What CONFIG SET was given (see `info::config`).
    pub(crate) settings: Mutex<std::collections::BTreeMap<String, String>>,
}

/// What the connections of one proxy thread share: the proxy's state and a client of their own.
pub struct Shard {
    pub table: Table,
    shared: Arc<Shared>,
    /// Connections this thread serves now.
    connections: AtomicUsize,
}

impl std::ops::Deref for Shard {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl Shard {
    /// Keys in the table, counted by a full scan (exact at the time of each page, O(records)).
    /// INFO reuses a count up to 10 s old; DBSIZE always counts (`fresh`).
    pub(crate) async fn key_count(&self, fresh: bool) -> Result<(u64, u64), Reply> {
        if !fresh {
            if let Some((k, e, at)) = *self.key_count_cache.lock() {
                if at.elapsed() < Duration::from_secs(10) {
                    return Ok((k, e));
                }
            }
        }
        let mut cursor = FullScanCursor::default();
        let (mut keys, mut expiring) = (0u64, 0u64);
        let mut last: Option<Bytes> = None;
        while !cursor.done {
            let (records, next) = self.table.full_scan(&cursor, 5000, true).await.map_err(commands::store_error)?;
            for r in records {
                if last.as_ref() != Some(&r.hashkey) {
                    keys += 1;
                    expiring += (r.expire_at_ms != 0) as u64;
                    last = Some(r.hashkey);
                }
            }
            cursor = next;
        }
        *self.key_count_cache.lock() = Some((keys, expiring, Instant::now()));
        Ok((keys, expiring))
    }
}

/// One client connection's state.
pub struct Session {
    pub id: u64,
    pub resp3: bool,
    pub authenticated: bool,
    pub name: Option<Bytes>,
    pub quit: bool,
    /// Commands queued since MULTI (None: not in a transaction).
    pub multi: Option<Vec<Vec<Bytes>>>,
    /// A command failed to queue: EXEC answers EXECABORT.
    pub multi_failed: bool,
    /// Bytes of the commands queued (a transaction must fit one write).
    pub multi_bytes: usize,
    /// WATCHed keys and their digests when watched.
    pub watched: Vec<(Bytes, Bytes)>,
}

/// A running proxy.
pub struct Proxy {
    pub address: SocketAddr,
    pub shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Starts the proxy: `config.threads` threads serving connections, each with a client made
    /// like `client` (its own connections to the cluster), and an acceptor on the caller's runtime
    /// that hands each new connection to the thread serving the fewest.
    pub async fn start(client: Client, config: ProxyConfig) -> TernResult<Proxy> {
        config.validate()?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| TernError::Unavailable(format!("redis endpoint cannot listen on {}: {e}", config.listen)))?;
        let address = listener.local_addr().map_err(|e| TernError::Internal(e.to_string()))?;
        let shared = Arc::new(Shared {
            config,
            stats: Stats::default(),
            cursors: Cursors::new(),
            started: Instant::now(),
            address,
            key_count_cache: Mutex::new(None),
            settings: Mutex::new(Default::default()),
        });
        let (stop, stopped) = watch::channel(false);
        let mut shards = Vec::new();
        let mut threads = Vec::new();
        for i in 0..shared.config.threads {
            let shard = Arc::new(Shard {
                table: Client::new(client.config().clone())?.table(&shared.config.table),
                shared: shared.clone(),
                connections: AtomicUsize::new(0),
            });
            // Unbounded, yet bounded by max_clients: the acceptor counts a connection before sending it.
            let (handoff, arrivals) = tokio::sync::mpsc::unbounded_channel();
            let (serving, stopped) = (shard.clone(), stopped.clone());
            // The runtime is built and dropped on its own thread (never inside the caller's).
            let (started, start) = tokio::sync::oneshot::channel();
            let thread = std::thread::Builder::new()
                .name(format!("tern-proxy-{i}"))
                .spawn(move || match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => {
                        let _ = started.send(Ok(()));
                        runtime.block_on(shard_loop(serving, arrivals, stopped));
                    }
                    Err(e) => drop(started.send(Err(e))),
                })
                .map_err(|e| TernError::Internal(format!("cannot start a proxy thread: {e}")))?;
            match start.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(TernError::Internal(format!("cannot start a proxy thread's runtime: {e}"))),
                Err(_) => return Err(TernError::Internal("a proxy thread stopped while starting".into())),
            }
            shards.push((shard, handoff));
            threads.push(thread);
        }
        let task = tokio::spawn(accept_loop(listener, shared.clone(), shards, stopped));
        Ok(Proxy { address, shared, stop, task, threads })
    }

    /// Stops accepting and closes every connection.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join()))).await;
    }
}

type Handoff = tokio::sync::mpsc::UnboundedSender<Arrival>;

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut shards: Vec<(Arc<Shard>, Handoff)>, mut stopped: watch::Receiver<bool>) {
    let mut next_id = 1u64;
    loop {
        let accepted = tokio::select! {
            _ = stopped.changed() => break,
            a = listener.accept() => a,
        };
        let Ok((mut stream, _)) = accepted else { continue };
        shared.stats.connections_received.fetch_add(1, Ordering::Relaxed);
        if shared.stats.connected.load(Ordering::Relaxed) >= shared.config.max_clients {
            shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
            let _ = stream.write_all(b"-ERR max number of clients reached\r\n").await;
            continue;
        }
        let _ = stream.set_nodelay(true);
        let Ok(mut stream) = stream.into_std() else { continue };
        // A thread that stopped (it cannot, short of a bug) leaves the rotation; none left: stop.
        loop {
            let Some(index) = (0..shards.len()).min_by_key(|&i| shards[i].0.connections.load(Ordering::Relaxed)) else {
                tracing::error!("every proxy thread has stopped; the redis endpoint stops accepting");
                return;
            };
            let (shard, handoff) = &shards[index];
            match handoff.send(Arrival { stream, id: next_id, served: Served::new(shard) }) {
                Ok(()) => break,
                Err(tokio::sync::mpsc::error::SendError(returned)) => {
                    shards.swap_remove(index);
                    stream = returned.stream;
                }
            }
        }
        next_id += 1;
    }
}

/// A connection on its way from the acceptor to a thread.
struct Arrival {
    stream: std::net::TcpStream,
    id: u64,
    served: Served,
}

/// Counts a connection (in the proxy's and its thread's counts) from when the acceptor hands it
/// over until dropped: when its task ends, panics or is cancelled at shutdown, or when it never
/// reached a thread.
struct Served(Arc<Shard>);

impl Served {
    fn new(shard: &Arc<Shard>) -> Served {
        shard.connections.fetch_add(1, Ordering::Relaxed);
        shard.stats.connected.fetch_add(1, Ordering::Relaxed);
        Served(shard.clone())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
        self.0.stats.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One proxy thread: serves the connections the acceptor hands it until the proxy stops.
async fn shard_loop(shard: Arc<Shard>, mut arrivals: tokio::sync::mpsc::UnboundedReceiver<Arrival>, mut stopped: watch::Receiver<bool>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Arrival { stream, id, served } = tokio::select! {
            _ = stopped.changed() => break,
            arrival = arrivals.recv() => match arrival {
                Some(a) => a,
                None => break,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let shard = shard.clone();
        connections.spawn(async move {
            let _served = served;
            match TcpStream::from_std(stream) {
                Ok(stream) => {
                    if let Err(e) = serve(stream, &shard, id).await {
                        tracing::debug!("redis connection {id}: {e}");
                    }
                }
                Err(e) => tracing::debug!("redis connection {id}: {e}"),
            }
        });
    }
    // Connections handed over that this thread never started are closed (dropping them uncounts them).
    arrivals.close();
    while arrivals.try_recv().is_ok() {}
    connections.shutdown().await;
}

/// Replies are flushed when the input has no further complete command or this much is pending.
const FLUSH_BYTES: usize = 64 * 1024;
/// Most reads of one pipeline that run at the same time on one connection. Each answers with at
/// most one value of at most 1 MiB, and replies go out once FLUSH_BYTES are pending, so a
/// connection holds at most this many values beyond FLUSH_BYTES.
const CONCURRENT_READS_MAX: usize = 64;

/// Serves one connection. Commands answer in the order they came. A pipeline's consecutive small
/// reads (GET, HGET, EXISTS, TTL, ...: `commands::is_small_read`) run concurrently, so they travel
/// to the servers together; any other command (a write, AUTH, SELECT, ...) waits until everything before it has
/// answered, and nothing after it starts until it has. Writes of one connection therefore apply
/// in the order sent, and a read sees every write sent before it on its connection. Reads of one
/// pipeline are each linearizable but not one snapshot (as with a Redis Cluster client's
/// pipeline across nodes).
async fn serve(mut stream: TcpStream, shared: &Shard, id: u64) -> std::io::Result<()> {
    let mut session = Session {
        id,
        resp3: false,
        authenticated: shared.config.password.is_none(),
        name: None,
        quit: false,
        multi: None,
        multi_failed: false,
        multi_bytes: 0,
        watched: Vec::new(),
    };
    let mut input = BytesMut::with_capacity(16 * 1024);
    let mut out = Vec::with_capacity(16 * 1024);
    let mut reads: Vec<Vec<Bytes>> = Vec::new();
    loop {
        loop {
            let args = match parse_command(&mut input) {
                Ok(Some(args)) if args.is_empty() => continue,
                Ok(Some(args)) => args,
                Ok(None) => break,
                Err(resp::ProtocolError(m)) => {
                    run_reads(shared, &session, &mut reads, &mut out).await;
                    Reply::err(format!("ERR Protocol error: {m}")).encode(session.resp3, &mut out);
                    stream.write_all(&out).await?;
                    return Ok(());
                }
            };
            shared.stats.commands.fetch_add(1, Ordering::Relaxed);
            if session.authenticated && session.multi.is_none() && commands::is_small_read(&args) {
                if reads.len() == CONCURRENT_READS_MAX {
                    run_reads(shared, &session, &mut reads, &mut out).await;
                    if out.len() >= FLUSH_BYTES {
                        stream.write_all(&out).await?;
                        out.clear();
                    }
                }
                reads.push(args);
                continue;
            }
            run_reads(shared, &session, &mut reads, &mut out).await;
            let reply = dispatch(shared, &mut session, &args).await;
            count_error(shared, &reply);
            reply.encode(session.resp3, &mut out);
            if session.quit {
                stream.write_all(&out).await?;
                return Ok(());
            }
            if out.len() >= FLUSH_BYTES {
                stream.write_all(&out).await?;
                out.clear();
            }
        }
        run_reads(shared, &session, &mut reads, &mut out).await;
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
            if out.capacity() > 1 << 20 {
                out = Vec::with_capacity(16 * 1024);
            }
        }
        input.reserve(16 * 1024);
        if stream.read_buf(&mut input).await? == 0 {
            return Ok(());
        }
    }
}

/// Runs the queued small reads concurrently and appends their replies in order.
async fn run_reads(shared: &Shard, session: &Session, reads: &mut Vec<Vec<Bytes>>, out: &mut Vec<u8>) {
    let replies = match reads.len() {
        0 => return,
        1 => vec![commands::execute_read(shared, &reads[0]).await],
        _ => futures::future::join_all(reads.iter().map(|args| commands::execute_read(shared, args))).await,
    };
    for reply in replies {
        count_error(shared, &reply);
        reply.encode(session.resp3, out);
    }
    reads.clear();
}

fn count_error(shared: &Shared, reply: &Reply) {
    if reply.is_error() {
        shared.stats.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Connection-level commands (AUTH, HELLO) and the authentication gate, then the data commands.
async fn dispatch(shared: &Shard, session: &mut Session, args: &[Bytes]) -> Reply {
    let name = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
    match name.as_str() {
        "AUTH" => auth(shared, session, &args[1..]),
        "HELLO" => hello(shared, session, &args[1..]),
        "QUIT" => {
            session.quit = true;
            Reply::Ok
        }
        _ if !session.authenticated => Reply::err("NOAUTH Authentication required."),
        _ => commands::execute(shared, session, name, args).await,
    }
}

fn check_password(shared: &Shared, session: &mut Session, user: Option<&[u8]>, password: &[u8]) -> Result<(), Reply> {
    let Some(expected) = &shared.config.password else {
        return Err(Reply::err(
            "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
        ));
    };
    if user.is_some_and(|u| u != b"default") || password != expected.as_bytes() {
        return Err(Reply::err("WRONGPASS invalid username-password pair or user is disabled."));
    }
    session.authenticated = true;
    Ok(())
}

fn auth(shared: &Shared, session: &mut Session, args: &[Bytes]) -> Reply {
    let r = match args {
        [password] => check_password(shared, session, None, password),
        [user, password] => check_password(shared, session, Some(user), password),
        _ => return Reply::err("ERR wrong number of arguments for 'auth' command"),
    };
    r.map_or_else(|e| e, |_| Reply::Ok)
}

fn hello(shared: &Shared, session: &mut Session, args: &[Bytes]) -> Reply {
    let mut version = if session.resp3 { 3 } else { 2 };
    let mut i = 0;
    if let Some(v) = args.first() {
        match std::str::from_utf8(v).ok().and_then(|s| s.parse::<i64>().ok()) {
            Some(v @ (2 | 3)) => version = v,
            Some(_) => return Reply::err("NOPROTO unsupported protocol version"),
            None => return Reply::err("ERR Protocol version is not an integer or out of range"),
        }
        i = 1;
    }
    while i < args.len() {
        let option = String::from_utf8_lossy(&args[i]).to_ascii_uppercase();
        match option.as_str() {
            "AUTH" if i + 2 < args.len() => {
                if let Err(e) = check_password(shared, session, Some(&args[i + 1]), &args[i + 2]) {
                    return e;
                }
                i += 3;
            }
            "SETNAME" if i + 1 < args.len() => {
                session.name = Some(args[i + 1].clone());
                i += 2;
            }
            _ => return Reply::err(format!("ERR Syntax error in HELLO option '{option}'")),
        }
    }
    if !session.authenticated {
        return Reply::err("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time");
    }
    session.resp3 = version == 3;
    let s = |v: &str| Reply::bulk(v.to_string());
    Reply::Map(vec![
        (s("server"), s("tern")),
        (s("version"), s(info::REDIS_VERSION)),
        (s("proto"), Reply::Int(version)),
        (s("id"), Reply::Int(session.id as i64)),
        (s("mode"), s("standalone")),
        (s("role"), s("master")),
        (s("modules"), Reply::Array(vec![])),
    ])
}
