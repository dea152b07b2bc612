//! The Redis endpoint, driven by real Redis clients (redis-cli, redis-benchmark, redis-py: the test
//! command installs them) and by raw sockets for protocol abuse, against a playground cluster in this
//! process (one meta, three replica servers, the proxy; all on loopback).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;
use tern::playground::{Playground, PlaygroundConfig};
use tern_client::{Client, ClientConfig};
use tern_proxy::{Proxy, ProxyConfig};

struct Pg {
    playground: Playground,
    port: u16,
    _dir: tempfile::TempDir,
}

async fn playground() -> Pg {
    let dir = tempfile::tempdir().unwrap();
    let cfg = PlaygroundConfig { data_dir: dir.path().join("data"), meta_port: 0, first_server_port: 0, redis_port: Some(0), ..Default::default() };
    let playground = Playground::start(cfg).await.unwrap();
    let port = playground.proxy.as_ref().unwrap().address.port();
    Pg { playground, port, _dir: dir }
}

impl Pg {
    fn client(&self) -> Client {
        Client::new(ClientConfig::new(self.playground.metas.iter().map(|m| m.address.clone()).collect())).unwrap()
    }
}

fn tool(name: &str) -> Command {
    let found = Command::new("sh").args(["-c", &format!("command -v {name}")]).output().map(|o| o.status.success()).unwrap_or(false);
    assert!(found, "{name} is not installed: run ./scripts/install-deps --with-test-tools (the test command does)");
    Command::new(name)
}

/// Runs a blocking client program off the runtime's threads; returns (success, stdout, stderr).
async fn run(mut cmd: Command, stdin: Option<String>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        use std::process::Stdio;
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() }).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn client tool");
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    })
    .await
    .unwrap()
}

async fn cli(port: u16, script: &str) -> Vec<String> {
    let mut cmd = tool("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    let (ok, out, err) = run(cmd, Some(script.to_string())).await;
    assert!(ok, "redis-cli failed: {err}");
    out.lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
}

/// redis-cli, as a person would use it: strings, hashes, TTLs, counters and Redis's own error texts;
/// the native client sees the same data (strings at sortkey "", hash fields as sortkeys).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_commands() {
    let pg = playground().await;
    let out = cli(
        pg.port,
        "PING\nSET user:1 Ada\nGET user:1\nAPPEND user:1 ' Lovelace'\nGET user:1\nSTRLEN user:1\n\
         SET visits 10\nINCRBY visits 5\nDECR visits\nINCRBYFLOAT visits 0.25\nINCR user:1\n\
         HSET profile:1 name Ada lang en\nHGET profile:1 name\nHLEN profile:1\nGET profile:1\nTYPE profile:1\nTYPE nothing\n\
         SET session:1 tok EX 100\nTTL session:1\nPERSIST session:1\nTTL session:1\nTTL nothing\n\
         SET lock:1 me NX\nSET lock:1 you NX\nSET lock:1 you XX GET\nGET lock:1\n\
         EXISTS user:1 profile:1 nothing\nDEL user:1 profile:1 nothing\nEXISTS user:1 profile:1\n\
         SET k v BOGUS\nFROBNICATE x\nGET\nSELECT 0\nSELECT 3\nECHO hello\n",
    )
    .await;
    let expected = [
        "PONG",
        "OK",
        "Ada",
        "12",
        "Ada Lovelace",
        "12",
        "OK",
        "15",
        "14",
        "14.25",
        "ERR value is not an integer or out of range",
        "2",
        "Ada",
        "2",
        "WRONGTYPE Operation against a key holding the wrong kind of value",
        "hash",
        "none",
        "OK",
        "100",
        "1",
        "-1",
        "-2",
        "OK",
        "me",
        "you",
        "2",
        "2",
        "0",
        "ERR syntax error",
        "ERR unknown command 'FROBNICATE', with args beginning with: 'x'",
        "ERR wrong number of arguments for 'get' command",
        "OK",
        "ERR DB index is out of range",
        "hello",
    ];
    // SET lock:1 you NX answers nil, which redis-cli prints as an empty line (filtered out above).
    assert_eq!(out, expected, "\n{}", out.join("\n"));

    let native = pg.client().table("demo");
    native.set(b"shared", b"", b"from-native", 0).await.unwrap();
    native.set(b"h2", b"field", b"value", 0).await.unwrap();
    let out = cli(pg.port, "GET shared\nHGET h2 field\nSET fromredis yes\nDBSIZE\nINFO keyspace\nCOMMAND COUNT\n").await;
    assert_eq!(&out[..3], ["from-native", "value", "OK"]);
    assert_eq!(native.get(b"fromredis", b"").await.unwrap().as_deref(), Some(&b"yes"[..]));
    let keys: i64 = out[3].parse().unwrap();
    assert!(keys >= 6, "DBSIZE counts every key: {out:?}");
    assert!(out[4] == "# Keyspace" && out[5].starts_with("db0:keys="), "{out:?}");
    assert!(out[6].parse::<i64>().unwrap() > 40, "{out:?}");

    let mut info = tool("redis-cli");
    info.args(["-p", &pg.port.to_string(), "INFO"]);
    let (_, text, _) = run(info, None).await;
    for field in ["# Server", "redis_version:", "tcp_port:", "# Clients", "connected_clients:", "# Stats", "total_commands_processed:", "# Keyspace"]
    {
        assert!(text.contains(field), "INFO lacks {field}: {text}");
    }
    pg.playground.shutdown().await;
}

/// redis-py over RESP2 and RESP3: typed replies, options, expiry, pipelining, SCAN/HSCAN cursors,
/// INFO, and ResponseError texts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_client() {
    let pg = playground().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/redis/redis_py_check.py");
    let mut cmd = tool("python3");
    cmd.args([script, &pg.port.to_string(), "py"]);
    let (ok, out, err) = run(cmd, None).await;
    assert!(
        ok && out.contains("redis-py ok"),
        "redis-py check failed:\n{out}\n{err}\n(redis-py is installed by ./scripts/install-deps --with-test-tools)"
    );
    pg.playground.shutdown().await;
}

/// A proxy serving connections on three threads: connections on different threads see each other's
/// writes, a SCAN cursor from one continues on another, INFO counts every thread's clients, and a
/// connection open at shutdown is closed and uncounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_threads_share_cursors_and_counters() {
    let pg = playground().await;
    let mut cfg = ProxyConfig::new("127.0.0.1:0".parse().unwrap(), "demo");
    cfg.threads = 3;
    let proxy = Proxy::start(pg.client(), cfg).await.unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/redis/threads_check.py");
    let mut cmd = tool("python3");
    cmd.args([script, &proxy.address.port().to_string()]);
    let (ok, out, err) = run(cmd, None).await;
    assert!(ok && out.contains("threads ok"), "threaded proxy check failed:\n{out}\n{err}");
    // Connections still open when the proxy stops are closed and uncounted.
    let port = proxy.address.port();
    let open = tokio::task::spawn_blocking(move || {
        let mut s = connect(port);
        assert_eq!(exchange(&mut s, b"PING\r\n", 1), "+PONG\r\n");
        s
    })
    .await
    .unwrap();
    let shared = proxy.shared.clone();
    let connected = || shared.stats.connected.load(std::sync::atomic::Ordering::Relaxed);
    // The script's connections are closed; the proxy notices each at its next read.
    for _ in 0..100 {
        if connected() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(connected(), 1);
    proxy.shutdown().await;
    assert_eq!(connected(), 0);
    drop(open);
    pg.playground.shutdown().await;
}

/// redis-benchmark with pipelining across many connections: every command answers, and INCR is
/// exactly once (the counter ends at precisely the number of INCRs sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_pipelined() {
    let pg = playground().await;
    let mut cmd = tool("redis-benchmark");
    cmd.args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-t", "set,get,incr,hset,mset", "-n", "3000", "-c", "12", "-P", "8", "--csv"]);
    let (ok, out, err) = run(cmd, None).await;
    assert!(ok, "redis-benchmark failed: {out}\n{err}");
    for test in ["\"SET\"", "\"GET\"", "\"INCR\"", "\"HSET\"", "\"MSET (10 keys)\""] {
        assert!(out.contains(test), "no result for {test}: {out}");
    }
    assert!(!err.contains("ERR") && !out.contains("ERR"), "{out}\n{err}");
    let out = cli(pg.port, "GET counter:__rand_int__\nHGET myhash element:__rand_int__\nGET key:__rand_int__\n").await;
    assert_eq!(out[0], "3000", "every INCR applied exactly once");
    assert_eq!(out[1].len(), 3, "{out:?}");
    pg.playground.shutdown().await;
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

/// Sends bytes and reads until `replies` complete lines starting with a RESP type byte arrived
/// (good enough for simple, integer, error and short bulk replies), or EOF.
fn exchange(s: &mut TcpStream, input: &[u8], lines: usize) -> String {
    s.write_all(input).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while got.iter().filter(|&&b| b == b'\n').count() < lines {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read: {e} after {:?}", String::from_utf8_lossy(&got)),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 16];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

/// Malformed and oversized frames get a protocol error and a closed connection; values over the
/// store's limit get a typed error and the connection stays usable; pipelined and inline commands
/// answer in order; AUTH and the client limit are enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_abuse_and_limits() {
    let pg = playground().await;
    let port = pg.port;
    tokio::task::spawn_blocking(move || {
        let mut s = connect(port);
        let pipelined = b"*3\r\n$3\r\nSET\r\n$1\r\np\r\n$2\r\nv1\r\nGET p\r\n*2\r\n$4\r\nECHO\r\n$4\r\na\r\nb\r\nPING\r\n";
        assert_eq!(exchange(&mut s, pipelined, 6), "+OK\r\n$2\r\nv1\r\n$4\r\na\r\nb\r\n+PONG\r\n");
        // Reads of a pipeline run together, writes alone: every reply in order, and every read sees
        // the writes sent before it on the connection.
        let mixed = b"SET q 1\r\nGET q\r\nGET q\r\nSET q 2\r\nGET q\r\nGET nothing\r\nEXISTS q\r\nINCR q\r\nGET q\r\nSTRLEN q\r\n";
        assert_eq!(exchange(&mut s, mixed, 12), "+OK\r\n$1\r\n1\r\n$1\r\n1\r\n+OK\r\n$1\r\n2\r\n$-1\r\n:1\r\n:3\r\n$1\r\n3\r\n:1\r\n");
        let many: String = (0..200).map(|i| format!("SET m{i} {i}\r\nGET m{i}\r\n")).collect::<String>() + &"GET m7\r\n".repeat(150);
        let expected: String =
            (0..200).map(|i| format!("+OK\r\n${}\r\n{i}\r\n", i.to_string().len())).collect::<String>() + &"$1\r\n7\r\n".repeat(150);
        assert_eq!(exchange(&mut s, many.as_bytes(), 200 * 3 + 300), expected);

        let big = vec![b'x'; tern_core::limits::VALUE_BYTES_MAX + 1];
        let mut frame = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${}\r\n", big.len()).into_bytes();
        frame.extend_from_slice(&big);
        frame.extend_from_slice(b"\r\n");
        let reply = exchange(&mut s, &frame, 1);
        assert!(reply.starts_with("-ERR value is 1048577 bytes; the limit is 1048576 bytes"), "{reply}");
        assert_eq!(exchange(&mut s, b"GET big\r\nPING\r\n", 2), "$-1\r\n+PONG\r\n", "nothing stored, connection usable");

        for bad in [&b"*1\r\n$99999999999\r\n"[..], b"*2\r\n+OK\r\n", b"*x\r\n", b"*1\r\n$3\r\nabcdef\r\n", b"*99999999\r\n"] {
            let mut s = connect(port);
            let reply = exchange(&mut s, bad, 1);
            assert!(reply.starts_with("-ERR Protocol error"), "{:?} -> {reply}", String::from_utf8_lossy(bad));
            assert!(closed(&mut s), "connection closed after a protocol error");
        }
        // Commands before a malformed frame are answered first.
        let mut s = connect(port);
        let reply = exchange(&mut s, b"GET q\r\nGET q\r\n*x\r\n", 5);
        assert!(reply.starts_with("$1\r\n3\r\n$1\r\n3\r\n-ERR Protocol error"), "{reply}");
        // A frame that claims a huge bulk is refused before it is buffered.
        let mut s = connect(port);
        let reply = exchange(&mut s, format!("*2\r\n$3\r\nGET\r\n${}\r\n", 64 << 20).as_bytes(), 1);
        assert!(reply.contains("invalid bulk length"), "{reply}");

        let mut s = connect(port);
        assert_eq!(exchange(&mut s, b"QUIT\r\n", 1), "+OK\r\n");
        assert!(closed(&mut s));
    })
    .await
    .unwrap();

    // A proxy with a password and a client limit, on the same cluster.
    let mut cfg = ProxyConfig::new("127.0.0.1:0".parse().unwrap(), "demo");
    cfg.password = Some("s3cret".into());
    cfg.max_clients = 2;
    cfg.threads = 2;
    let guarded = Proxy::start(pg.client(), cfg).await.unwrap();
    let port = guarded.address.port();
    tokio::task::spawn_blocking(move || {
        let mut a = connect(port);
        assert_eq!(exchange(&mut a, b"GET p\r\n", 1), "-NOAUTH Authentication required.\r\n");
        assert!(exchange(&mut a, b"AUTH wrong\r\n", 1).starts_with("-WRONGPASS"));
        assert_eq!(exchange(&mut a, b"GET p\r\nAUTH s3cret\r\nGET p\r\n", 4), "-NOAUTH Authentication required.\r\n+OK\r\n$2\r\nv1\r\n");
        let mut b = connect(port);
        let hello = exchange(&mut b, b"HELLO 3 AUTH default s3cret\r\n", 26);
        assert!(hello.starts_with("%7\r\n") && hello.contains("proto\r\n:3\r\n"), "{hello}");
        assert_eq!(exchange(&mut b, b"GET nothing\r\n", 1), "_\r\n", "RESP3 null");
        let mut c = connect(port);
        assert_eq!(exchange(&mut c, b"PING\r\n", 1), "-ERR max number of clients reached\r\n");
        drop(a);
        std::thread::sleep(Duration::from_millis(300));
        let mut d = connect(port);
        assert_eq!(exchange(&mut d, b"AUTH default s3cret\r\n", 1), "+OK\r\n", "a freed slot is reusable");
    })
    .await
    .unwrap();
    guarded.shutdown().await;
    assert!(ProxyConfig { max_clients: 0, ..ProxyConfig::new("127.0.0.1:0".parse().unwrap(), "demo") }.validate().is_err());
    assert!(ProxyConfig::new("127.0.0.1:0".parse().unwrap(), "bad name").validate().is_err());
    for threads in [0, tern_proxy::THREADS_MAX + 1] {
        let e = ProxyConfig { threads, ..ProxyConfig::new("127.0.0.1:0".parse().unwrap(), "demo") }.validate().unwrap_err();
        assert!(e.to_string().contains(&format!("between 1 and {}", tern_proxy::THREADS_MAX)), "{e}");
    }
    pg.playground.shutdown().await;
}

/// Redis's own Tcl test suite (7.0.15's units for every family the endpoint claims: list, set,
/// zset, string, incr, hash, expire, keyspace, protocol, multi) against a playground of the `tern`
/// binary: every test not skipped by tag or by name (tests/redis-suite/skips.txt, each with its
/// reason) passes. scripts/redis-suite downloads the suite and installs tclsh when missing.
#[test]
fn redis_own_test_suite() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out =
        Command::new(format!("{root}/scripts/redis-suite")).args(["--tern", env!("CARGO_BIN_EXE_tern")]).output().expect("run scripts/redis-suite");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "Redis's test suite failed against Tern:\n{text}");
}

/// Keys with one hash tag share a partition, so commands and transactions over them are atomic;
/// over keys in different partitions they are refused with CROSSSLOT (nothing written), except the
/// per-key commands the proxy splits by partition. WATCH fails an EXEC after another connection
/// changed the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_tags_and_transactions_across_partitions() {
    let pg = playground().await;
    let count = pg.client().partition_count("demo").await.unwrap();
    let p = |k: &str| tern_core::codec::partition_of(k.as_bytes(), count);
    let other = (0..).map(|i| format!("k{i}")).find(|k| p(k) != p("k")).unwrap();
    assert_eq!(p("{user:1}:feed"), p("{user:1}:likes"), "one tag, one partition");
    let out = cli(
        pg.port,
        &format!(
            "RPUSH {{user:1}}:feed a b c\nLMOVE {{user:1}}:feed {{user:1}}:likes LEFT RIGHT\nLRANGE {{user:1}}:likes 0 -1\n\
             SET k 1\nRENAME k {other}\nGET k\nMULTI\nSET k 2\nSET {other} 2\nEXEC\nGET k\n\
             MULTI\nINCR {{user:1}}:n\nRPUSH {{user:1}}:feed d\nPING\nEXEC\n\
             MSET k 3 {other} 4\nMGET {other} k nothing\nDEL k {other}\n"
        ),
    )
    .await;
    let crossslot = |l: &String| l.starts_with("CROSSSLOT");
    assert_eq!(out[..3], ["3", "a", "a"], "{out:?}");
    assert_eq!(out[3], "OK");
    assert!(crossslot(&out[4]), "RENAME across partitions: {out:?}");
    assert_eq!(out[5], "1", "nothing renamed");
    assert_eq!(out[6..9], ["OK", "QUEUED", "QUEUED"]);
    assert!(crossslot(&out[9]), "EXEC across partitions: {out:?}");
    assert_eq!(out[10], "1", "nothing of the transaction ran");
    assert_eq!(out[11..15], ["OK", "QUEUED", "QUEUED", "QUEUED"], "{out:?}");
    assert_eq!(out[15..18], ["1", "3", "PONG"], "EXEC answers every command in order: {out:?}");
    assert_eq!(out[18..], ["OK", "4", "3", "2"], "per-key commands split by partition: {out:?}");

    // WATCH: another connection's write fails the EXEC; without one, it runs.
    let mut a = connect(pg.port);
    let mut b = connect(pg.port);
    assert_eq!(exchange(&mut a, b"SET w 1\r\nWATCH w\r\nMULTI\r\nINCR w\r\n", 4), "+OK\r\n+OK\r\n+OK\r\n+QUEUED\r\n");
    assert_eq!(exchange(&mut b, b"SET w 5\r\n", 1), "+OK\r\n");
    assert_eq!(exchange(&mut a, b"EXEC\r\nGET w\r\n", 3), "*-1\r\n$1\r\n5\r\n", "a watched key changed: nothing ran");
    assert_eq!(exchange(&mut a, b"WATCH w\r\nMULTI\r\nINCR w\r\nEXEC\r\n", 5), "+OK\r\n+OK\r\n+QUEUED\r\n*1\r\n:6\r\n");
    pg.playground.shutdown().await;
}
