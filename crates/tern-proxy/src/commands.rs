//! Redis commands over one Tern table.
//!
//! Every command on keys runs where the keys live: tern-redis executes it inside one raft entry
//! (writes) or on the partition leader (reads), atomically. The proxy routes it by its keys (a key
//! is a hashkey; `{tag}` hash tags choose the partition), refuses with CROSSSLOT a command or
//! transaction whose keys live in different partitions, and runs what spans the table itself:
//! SCAN, KEYS, DBSIZE, RANDOMKEY and FLUSHDB walk every partition; MGET, MSET, DEL, UNLINK,
//! EXISTS and TOUCH over several partitions run one command per partition (each atomic, not the
//! whole), as a Redis Cluster proxy does.

use crate::{Cursor, Session, Shard};
use bytes::Bytes;
use futures::future::join_all;
use std::sync::atomic::Ordering;
use tern_client::FullScanCursor;
use tern_core::codec::partition_of;
use tern_core::TernError;
use tern_redis::glob::glob_match;
use tern_redis::{Reply, Spec};

/// Largest reply one command may build at the proxy (KEYS, SCAN pages, merged MGET).
pub const REPLY_BYTES_MAX: usize = 64 * 1024 * 1024;

type R = Result<Reply, Reply>;

const SYNTAX: &str = "ERR syntax error";
const CROSSSLOT: &str = "CROSSSLOT Keys in request don't hash to the same slot (on Tern: the keys of one command or transaction must live in one partition; give them one hash tag, as in {user1}:a and {user1}:b)";

fn err(msg: impl Into<String>) -> Reply {
    Reply::Error(msg.into())
}

/// A store error as a Redis error reply.
pub fn store_error(e: TernError) -> Reply {
    match e {
        TernError::InvalidArgument(m) if m.starts_with("CROSSSLOT") => err(m),
        TernError::InvalidArgument(m) => err(format!("ERR {m}")),
        TernError::WrongType(m) => err(format!("ERR {m}")),
        TernError::TableNotFound(t) => err(format!("ERR table {t} does not exist")),
        e if e.is_retryable() => err(format!("TRYAGAIN {e}")),
        e => err(format!("ERR {e}")),
    }
}

fn upper(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_uppercase()
}

fn int_arg(b: &[u8]) -> Result<i64, Reply> {
    std::str::from_utf8(b).ok().and_then(|s| s.parse::<i64>().ok()).ok_or_else(|| err("ERR value is not an integer or out of range"))
}

/// Whether a command only reads one key and answers with at most one value: a pipeline's
/// consecutive small reads run concurrently (see `serve` in lib.rs). Everything else (writes,
/// multi-value reads, connection commands) runs alone, after every earlier command of its
/// connection has answered.
pub fn is_small_read(args: &[Bytes]) -> bool {
    const READS: [&[u8]; 17] = [
        b"GET",
        b"STRLEN",
        b"TTL",
        b"PTTL",
        b"TYPE",
        b"EXISTS",
        b"HGET",
        b"HEXISTS",
        b"HLEN",
        b"HSTRLEN",
        b"LLEN",
        b"LINDEX",
        b"SCARD",
        b"SISMEMBER",
        b"ZCARD",
        b"ZSCORE",
        b"PING",
    ];
    let name = &args[0];
    READS.iter().any(|r| r.eq_ignore_ascii_case(name)) && args.len() <= 3 && !(name.eq_ignore_ascii_case(b"EXISTS") && args.len() > 2)
}

/// A small read (see `is_small_read`).
pub async fn execute_read(shared: &Shard, args: &[Bytes]) -> Reply {
    if args[0].eq_ignore_ascii_case(b"PING") {
        return ping(args).unwrap_or_else(|e| e);
    }
    keyed(shared, args).await.unwrap_or_else(|e| e)
}

/// Runs any command but AUTH, HELLO and QUIT (lib.rs answers those).
pub async fn execute(shared: &Shard, session: &mut Session, name: String, args: &[Bytes]) -> Reply {
    if session.multi.is_some() && !matches!(name.as_str(), "EXEC" | "DISCARD" | "MULTI" | "WATCH" | "RESET") {
        return queue(session, args);
    }
    let result = match name.as_str() {
        "PING" => ping(args),
        "ECHO" if args.len() == 2 => Ok(Reply::Bulk(args[1].clone())),
        "SELECT" if args.len() == 2 => match int_arg(&args[1]) {
            Ok(0) => Ok(Reply::Ok),
            Ok(_) => Err(err("ERR DB index is out of range")),
            Err(e) => Err(e),
        },
        "CLIENT" if args.len() >= 2 => client_command(session, args),
        "INFO" => crate::info::info(shared, &args[1..]).await,
        "COMMAND" => crate::info::command(&args[1..]),
        "CONFIG" if args.len() >= 2 => crate::info::config(shared, &args[1..]),
        "DBSIZE" if args.len() == 1 => shared.key_count(true).await.map(|(keys, _)| Reply::Int(keys as i64)),
        "TIME" if args.len() == 1 => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            Ok(Reply::Array(vec![Reply::bulk(now.as_secs().to_string()), Reply::bulk(now.subsec_micros().to_string())]))
        }
        "WAIT" if args.len() == 3 => wait(shared, args).await,
        // No functions or scripts exist here: flushing them is done already.
        "FUNCTION" if args.len() >= 2 && matches!(upper(&args[1]).as_str(), "FLUSH") => Ok(Reply::Ok),
        "FUNCTION" if args.len() == 2 && upper(&args[1]) == "LIST" => Ok(Reply::Array(Vec::new())),
        "FLUSHDB" | "FLUSHALL" if args.len() <= 2 => {
            if args.len() == 2 && !matches!(upper(&args[1]).as_str(), "ASYNC" | "SYNC") {
                return err(SYNTAX);
            }
            shared.table.flush().await.map(|_| Reply::Ok).map_err(store_error)
        }
        "SCAN" if args.len() >= 2 => cmd_scan(shared, &args[1], &args[2..]).await,
        "KEYS" if args.len() == 2 => cmd_keys(shared, &args[1]).await,
        "RANDOMKEY" if args.len() == 1 => randomkey(shared).await,
        "HSCAN" | "SSCAN" | "ZSCAN" if args.len() >= 3 => cmd_element_scan(shared, &name, &args[1], &args[2], &args[3..]).await,
        "MULTI" if args.len() == 1 => {
            if session.multi.is_some() {
                return err("ERR MULTI calls can not be nested");
            }
            session.multi = Some(Vec::new());
            session.multi_failed = false;
            session.multi_bytes = 0;
            Ok(Reply::Ok)
        }
        "EXEC" if args.len() == 1 => exec(shared, session).await,
        "DISCARD" if args.len() == 1 => {
            if session.multi.take().is_none() {
                return err("ERR DISCARD without MULTI");
            }
            session.watched.clear();
            Ok(Reply::Ok)
        }
        "WATCH" if args.len() >= 2 => {
            if session.multi.is_some() {
                return err("ERR WATCH inside MULTI is not allowed");
            }
            if session.watched.len() + args.len() - 1 > tern_core::limits::MULTI_RECORDS_MAX {
                return err(format!("ERR a connection watches at most {} keys", tern_core::limits::MULTI_RECORDS_MAX));
            }
            watch(shared, session, &args[1..]).await
        }
        "UNWATCH" if args.len() == 1 => {
            session.watched.clear();
            Ok(Reply::Ok)
        }
        "RESET" if args.len() == 1 => {
            session.multi = None;
            session.watched.clear();
            session.resp3 = false;
            session.name = None;
            // As Redis: back to a new connection's state, password included.
            session.authenticated = shared.config.password.is_none();
            Ok(Reply::Simple("RESET".into()))
        }
        "MGET" | "DEL" | "UNLINK" | "EXISTS" | "TOUCH" if args.len() >= 2 => per_partition(shared, &name, args).await,
        "MSET" if args.len() >= 3 && args.len() % 2 == 1 => per_partition(shared, &name, args).await,
        _ if tern_redis::spec(&args[0]).is_some() => keyed(shared, args).await,
        "ECHO" | "SELECT" | "CLIENT" | "CONFIG" | "DBSIZE" | "TIME" | "WAIT" | "FLUSHDB" | "FLUSHALL" | "SCAN" | "KEYS" | "RANDOMKEY" | "HSCAN"
        | "SSCAN" | "ZSCAN" | "MULTI" | "EXEC" | "DISCARD" | "WATCH" | "UNWATCH" | "RESET" | "MGET" | "DEL" | "UNLINK" | "EXISTS" | "TOUCH"
        | "MSET" => Err(err(format!("ERR wrong number of arguments for '{}' command", name.to_ascii_lowercase()))),
        _ => Err(unknown_command(args)),
    };
    result.unwrap_or_else(|e| e)
}

pub fn unknown_command(args: &[Bytes]) -> Reply {
    let shown: Vec<String> = args[1..].iter().take(8).map(|a| format!("'{}'", String::from_utf8_lossy(a))).collect();
    err(format!("ERR unknown command '{}', with args beginning with: {}", String::from_utf8_lossy(&args[0]), shown.join(" ")))
}

fn ping(args: &[Bytes]) -> R {
    match args.len() {
        1 => Ok(Reply::Simple("PONG".into())),
        2 => Ok(Reply::Bulk(args[1].clone())),
        _ => Err(err("ERR wrong number of arguments for 'ping' command")),
    }
}

fn client_command(session: &mut Session, args: &[Bytes]) -> R {
    match (upper(&args[1]).as_str(), args.len()) {
        ("SETNAME", 3) => {
            if args[2].iter().any(|&b| b <= b' ' || b > b'~') {
                return Err(err("ERR Client names cannot contain spaces, newlines or special characters."));
            }
            session.name = (!args[2].is_empty()).then(|| args[2].clone());
            Ok(Reply::Ok)
        }
        ("GETNAME", 2) => Ok(Reply::opt(session.name.clone())),
        ("ID", 2) => Ok(Reply::Int(session.id as i64)),
        ("SETINFO", 4) => Ok(Reply::Ok),
        ("INFO", 2) => Ok(Reply::Text(format!(
            "id={} addr=? name={} db=0 multi={} resp={}\n",
            session.id,
            session.name.as_ref().map(|n| String::from_utf8_lossy(n).into_owned()).unwrap_or_default(),
            session.multi.as_ref().map_or(-1, |m| m.len() as i64),
            if session.resp3 { 3 } else { 2 }
        ))),
        _ => Err(err(format!("ERR unknown subcommand '{}'. Try CLIENT HELP.", String::from_utf8_lossy(&args[1])))),
    }
}

/// The key a command (or transaction) is routed by: the first of `keys`; CROSSSLOT when they
/// live in different partitions.
async fn route_key<'a>(shared: &Shard, keys: impl Iterator<Item = &'a Bytes>) -> Result<Option<&'a Bytes>, Reply> {
    let count = shared.table.partition_count().await.map_err(store_error)?;
    let mut first: Option<(&Bytes, u32)> = None;
    for k in keys {
        let p = partition_of(k, count);
        match first {
            None => first = Some((k, p)),
            Some((_, q)) if q != p => return Err(err(CROSSSLOT)),
            Some(_) => {}
        }
    }
    Ok(first.map(|(k, _)| k))
}

fn decode(wire: Result<Bytes, TernError>) -> R {
    let wire = wire.map_err(store_error)?;
    Reply::from_wire(&wire).ok_or_else(|| err("ERR the server's reply could not be decoded"))
}

/// A command tern-redis executes, sent to the partition of its keys.
async fn keyed(shared: &Shard, args: &[Bytes]) -> R {
    let spec = tern_redis::spec(&args[0]).ok_or_else(|| unknown_command(args))?;
    if !spec.arity_ok(args.len()) {
        return Err(tern_redis::commands::wrong_args(spec.name));
    }
    let keys = tern_redis::command_keys(spec, args);
    let key = route_key(shared, keys.iter().map(|&i| &args[i])).await?.cloned().unwrap_or_default();
    let reply = if spec.write {
        decode(shared.table.redis_write(&key, vec![args.to_vec()], false).await)?
    } else {
        decode(shared.table.redis_read(&key, args.to_vec()).await)?
    };
    if let Reply::Error(_) = reply {
        return Err(reply);
    }
    if matches!(spec.name, "GET" | "HGET" | "MGET" | "HMGET") {
        let values = match &reply {
            Reply::Array(items) => items.as_slice(),
            one => std::slice::from_ref(one),
        };
        let hits = values.iter().filter(|v| matches!(v, Reply::Bulk(_))).count() as u64;
        shared.stats.keyspace_hits.fetch_add(hits, Ordering::Relaxed);
        shared.stats.keyspace_misses.fetch_add(values.len() as u64 - hits, Ordering::Relaxed);
    }
    Ok(reply)
}

/// MGET, MSET, DEL, UNLINK, EXISTS and TOUCH over keys in several partitions: one command per
/// partition, concurrently, answers merged (each partition's part is atomic; the whole is not).
async fn per_partition(shared: &Shard, name: &str, args: &[Bytes]) -> R {
    let step = if name == "MSET" { 2 } else { 1 };
    let count = shared.table.partition_count().await.map_err(store_error)?;
    // Group the keys (with their values) by partition, remembering each key's place.
    let mut groups: Vec<(u32, Vec<Bytes>, Vec<usize>)> = Vec::new();
    for (place, chunk) in args[1..].chunks(step).enumerate() {
        let p = partition_of(&chunk[0], count);
        let g = match groups.iter().position(|(q, _, _)| *q == p) {
            Some(i) => i,
            None => {
                groups.push((p, vec![args[0].clone()], Vec::new()));
                groups.len() - 1
            }
        };
        groups[g].1.extend(chunk.iter().cloned());
        groups[g].2.push(place);
    }
    if groups.len() == 1 {
        return keyed(shared, args).await;
    }
    let replies = join_all(groups.iter().map(|(_, command, _)| keyed(shared, command))).await;
    let mut merged: Vec<Reply> = vec![Reply::Nil; (args.len() - 1) / step];
    let mut total = 0i64;
    for ((_, _, places), reply) in groups.iter().zip(replies) {
        match reply? {
            Reply::Int(n) => total += n,
            Reply::Array(values) => {
                for (place, v) in places.iter().zip(values) {
                    merged[*place] = v;
                }
            }
            _ => {}
        }
    }
    Ok(match name {
        "MSET" => Reply::Ok,
        "MGET" => Reply::Array(merged),
        _ => Reply::Int(total),
    })
}

async fn wait(shared: &Shard, args: &[Bytes]) -> R {
    let wanted = int_arg(&args[1])?;
    int_arg(&args[2])?;
    if wanted < 0 {
        return Err(err("ERR numreplicas can't be negative"));
    }
    // Every acknowledged write is already on a majority of the partition's replicas: that many
    // besides the leader have it.
    let info = shared.table.info().await.map_err(store_error)?;
    Ok(Reply::Int((info.replica_count / 2) as i64))
}

/// A command a transaction may hold that the proxy answers itself (at EXEC, in its place).
fn local_in_multi(args: &[Bytes]) -> Option<Reply> {
    let name = upper(&args[0]);
    match name.as_str() {
        "PING" => Some(ping(args).unwrap_or_else(|e| e)),
        "ECHO" if args.len() == 2 => Some(Reply::Bulk(args[1].clone())),
        _ => None,
    }
}

/// Queues a command in MULTI: checked now (a bad one fails the whole EXEC), run at EXEC.
fn queue(session: &mut Session, args: &[Bytes]) -> Reply {
    if local_in_multi(args).is_some() {
        session.multi.as_mut().expect("in MULTI").push(args.to_vec());
        return Reply::Simple("QUEUED".into());
    }
    let Some(spec) = tern_redis::spec(&args[0]) else {
        session.multi_failed = true;
        let name = upper(&args[0]);
        return if is_connection_command(&name) {
            err(format!("ERR {name} cannot run inside MULTI on Tern: a transaction runs on one partition, and only commands on its keys"))
        } else {
            unknown_command(args)
        };
    };
    if !spec.arity_ok(args.len()) {
        session.multi_failed = true;
        return tern_redis::commands::wrong_args(spec.name);
    }
    let multi = session.multi.as_mut().expect("in MULTI");
    // A transaction travels as one write: it must fit one.
    session.multi_bytes += args.iter().map(|a| a.len() + 8).sum::<usize>();
    let max = tern_core::limits::WRITE_REQUEST_BYTES_MAX;
    if multi.len() >= tern_core::limits::MULTI_RECORDS_MAX || session.multi_bytes > max {
        session.multi_failed = true;
        return err(format!("ERR a transaction holds at most {} commands and {max} bytes", tern_core::limits::MULTI_RECORDS_MAX));
    }
    multi.push(args.to_vec());
    Reply::Simple("QUEUED".into())
}

fn is_connection_command(name: &str) -> bool {
    matches!(
        name,
        "PING"
            | "ECHO"
            | "SELECT"
            | "CLIENT"
            | "INFO"
            | "COMMAND"
            | "CONFIG"
            | "DBSIZE"
            | "TIME"
            | "WAIT"
            | "FLUSHDB"
            | "FLUSHALL"
            | "SCAN"
            | "KEYS"
            | "RANDOMKEY"
            | "HSCAN"
            | "SSCAN"
            | "ZSCAN"
            | "UNWATCH"
    )
}

async fn exec(shared: &Shard, session: &mut Session) -> R {
    let Some(commands) = session.multi.take() else { return Err(err("ERR EXEC without MULTI")) };
    let watched = std::mem::take(&mut session.watched);
    if std::mem::take(&mut session.multi_failed) {
        return Err(err("EXECABORT Transaction discarded because of previous errors."));
    }
    let remote: Vec<&Vec<Bytes>> = commands.iter().filter(|c| local_in_multi(c).is_none()).collect();
    let mut keys: Vec<&Bytes> = watched.iter().map(|(k, _)| k).collect();
    for c in &remote {
        let spec: &Spec = tern_redis::spec(&c[0]).expect("checked when queued");
        keys.extend(tern_redis::command_keys(spec, c).into_iter().map(|i| &c[i]));
    }
    let key = route_key(shared, keys.into_iter()).await?.cloned();
    let mut remote_replies = if remote.is_empty() && watched.is_empty() {
        Vec::new()
    } else {
        let mut all: Vec<Vec<Bytes>> = watched.iter().map(|(k, d)| vec![Bytes::from_static(b"TERN.WATCHED"), k.clone(), d.clone()]).collect();
        all.extend(remote.into_iter().cloned());
        match decode(shared.table.redis_write(&key.unwrap_or_default(), all, true).await)? {
            Reply::Array(replies) => replies,
            other => return Ok(other), // a watched key changed: nil
        }
    }
    .into_iter();
    Ok(Reply::Array(commands.iter().map(|c| local_in_multi(c).unwrap_or_else(|| remote_replies.next().unwrap_or(Reply::Nil))).collect()))
}

async fn watch(shared: &Shard, session: &mut Session, keys: &[Bytes]) -> R {
    for k in keys {
        let digest = match decode(shared.table.redis_read(k, vec![Bytes::from_static(b"TERN.DIGEST"), k.clone()]).await)? {
            Reply::Bulk(d) => d,
            other => return Err(other),
        };
        session.watched.push((k.clone(), digest));
    }
    Ok(Reply::Ok)
}

struct ScanArgs {
    pattern: Option<Bytes>,
    count: i64,
    type_filter: Option<String>,
}

fn scan_args(args: &[Bytes], with_type: bool) -> Result<ScanArgs, Reply> {
    let mut out = ScanArgs { pattern: None, count: 10, type_filter: None };
    let mut i = 0;
    while i < args.len() {
        let Some(v) = args.get(i + 1) else { return Err(err(SYNTAX)) };
        match upper(&args[i]).as_str() {
            "MATCH" => out.pattern = Some(v.clone()),
            "COUNT" => {
                out.count = int_arg(v)?;
                if out.count < 1 {
                    return Err(err(SYNTAX));
                }
                out.count = out.count.min(10_000);
            }
            "TYPE" if with_type => out.type_filter = Some(String::from_utf8_lossy(v).to_ascii_lowercase()),
            _ => return Err(err(SYNTAX)),
        }
        i += 2;
    }
    Ok(out)
}

/// The distinct keys among a page of a full scan's records, in order.
fn distinct_keys(records: &[tern_proto::Record]) -> Vec<Bytes> {
    let mut keys: Vec<Bytes> = Vec::new();
    for r in records {
        if keys.last() != Some(&r.hashkey) {
            keys.push(r.hashkey.clone());
        }
    }
    keys
}

async fn key_type(shared: &Shard, key: &Bytes) -> Result<String, Reply> {
    match decode(shared.table.redis_read(key, vec![Bytes::from_static(b"TYPE"), key.clone()]).await)? {
        Reply::Simple(t) => Ok(t),
        other => Err(other),
    }
}

async fn cmd_scan(shared: &Shard, cursor: &Bytes, options: &[Bytes]) -> R {
    let opts = scan_args(options, true)?;
    let position = match shared.cursors.take(cursor)? {
        None => FullScanCursor::default(),
        Some(Cursor::Scan(c)) => c,
        Some(_) => return Err(err("ERR invalid cursor")),
    };
    let (records, next) = shared.table.full_scan(&position, opts.count as u32, true).await.map_err(store_error)?;
    let mut keys = Vec::new();
    for k in distinct_keys(&records) {
        if !opts.pattern.as_ref().is_none_or(|p| glob_match(p, &k)) {
            continue;
        }
        if let Some(t) = &opts.type_filter {
            if key_type(shared, &k).await? != *t {
                continue;
            }
        }
        keys.push(Reply::Bulk(k));
    }
    let next_id = if next.done { Bytes::from_static(b"0") } else { shared.cursors.put(Cursor::Scan(next)) };
    Ok(Reply::Array(vec![Reply::Bulk(next_id), Reply::Array(keys)]))
}

async fn cmd_keys(shared: &Shard, pattern: &Bytes) -> R {
    let mut cursor = FullScanCursor::default();
    let mut keys = Vec::new();
    let mut size = 0;
    let mut last: Option<Bytes> = None;
    while !cursor.done {
        let (records, next) = shared.table.full_scan(&cursor, 5000, true).await.map_err(store_error)?;
        for k in distinct_keys(&records) {
            // A key's records may straddle two pages.
            if last.as_ref() == Some(&k) || !glob_match(pattern, &k) {
                continue;
            }
            size += k.len() + 16;
            if size > REPLY_BYTES_MAX {
                return Err(err(format!("ERR KEYS would answer more than {REPLY_BYTES_MAX} bytes; use SCAN")));
            }
            last = Some(k.clone());
            keys.push(Reply::Bulk(k));
        }
        cursor = next;
    }
    Ok(Reply::Array(keys))
}

async fn randomkey(shared: &Shard) -> R {
    let count = shared.table.partition_count().await.map_err(store_error)?;
    let start = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos()) % count.max(1);
    for i in 0..count {
        let cursor = FullScanCursor { partition: (start + i) % count, partition_count: count, ..Default::default() };
        let (records, _) = shared.table.full_scan(&cursor, 64, true).await.map_err(store_error)?;
        let keys = distinct_keys(&records);
        if !keys.is_empty() {
            let pick = (start as usize + keys.len() / 2) % keys.len();
            return Ok(Reply::Bulk(keys[pick].clone()));
        }
    }
    Ok(Reply::Nil)
}

/// HSCAN, SSCAN and ZSCAN: pages of one key's elements (tern-redis's TERN.SCAN), with cursors
/// the proxy hands out as integers.
async fn cmd_element_scan(shared: &Shard, name: &str, key: &Bytes, cursor: &Bytes, options: &[Bytes]) -> R {
    let mut opts = ScanArgs { pattern: None, count: 10, type_filter: None };
    let mut no_values = false;
    let mut i = 0;
    while i < options.len() {
        if name == "HSCAN" && upper(&options[i]) == "NOVALUES" {
            no_values = true;
            i += 1;
            continue;
        }
        let parsed = scan_args(&options[i..(i + 2).min(options.len())], false)?;
        opts.pattern = parsed.pattern.or(opts.pattern);
        if options[i].eq_ignore_ascii_case(b"COUNT") {
            opts.count = parsed.count;
        }
        i += 2;
    }
    let resume = match shared.cursors.take(cursor)? {
        None => Bytes::new(),
        Some(Cursor::Elements { key: k, resume }) if k == *key => resume,
        Some(_) => return Err(err("ERR invalid cursor")),
    };
    let kind = match name {
        "HSCAN" => "hash",
        "SSCAN" => "set",
        _ => "zset",
    };
    let count = Bytes::from(opts.count.to_string());
    let mut command = vec![Bytes::from_static(b"TERN.SCAN"), key.clone(), resume, count, Bytes::from_static(kind.as_bytes())];
    if let Some(p) = opts.pattern {
        command.extend([Bytes::from_static(b"MATCH"), p]);
    }
    let reply = decode(shared.table.redis_read(key, command).await)?;
    let Reply::Array(mut parts) = reply else { return Err(reply) };
    let (Some(Reply::Array(items)), Some(next)) = (parts.pop(), parts.pop()) else { return Err(err("ERR malformed scan reply")) };
    let items = if no_values { items.into_iter().step_by(2).collect() } else { items };
    let next = match next {
        Reply::Bulk(resume) => shared.cursors.put(Cursor::Elements { key: key.clone(), resume }),
        _ => Bytes::from_static(b"0"),
    };
    Ok(Reply::Array(vec![Reply::Bulk(next), Reply::Array(items)]))
}
