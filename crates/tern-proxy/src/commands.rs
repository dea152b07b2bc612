//! Redis commands over one Tern table.
//!
//! Data model: a Redis string is the record (key, sortkey ""); a Redis hash is the records (key,
//! field) with non-empty fields. A key's type is read from which records exist. Single-record
//! read-modify-writes (APPEND, GETDEL, SET ... GET, EXPIRE on a string, INCRBYFLOAT) are
//! compare-and-set loops on the store's atomic check_and_set; INCR/HINCRBY are the store's own
//! exactly-once incr.

use crate::glob::glob_match;
use crate::resp::{format_double, Reply};
use crate::{Session, Shard};
use bytes::Bytes;
use futures::future::join_all;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use tern_client::{FullScanCursor, ScanOptions, Table};
use tern_core::TernError;
use tern_proto::{write_request::Op, CheckAndSet, CheckType, MultiSet, Record, SortkeyValue};

/// The sortkey of a Redis string.
const STRING: &[u8] = b"";
/// Hashes with more fields than this must be read with HSCAN.
pub const HASH_FIELDS_MAX: usize = 100_000;
/// Largest reply one command may build.
pub const REPLY_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Compare-and-set attempts before a contended read-modify-write gives up.
const CAS_ATTEMPTS: usize = 64;

type R = Result<Reply, Reply>;

pub const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";
const NOT_INTEGER: &str = "ERR value is not an integer or out of range";
const NOT_FLOAT: &str = "ERR value is not a valid float";
const SYNTAX: &str = "ERR syntax error";

fn err(msg: impl Into<String>) -> Reply {
    Reply::Error(msg.into())
}

/// A store error as a Redis error reply.
pub fn store_error(e: TernError) -> Reply {
    match e {
        TernError::InvalidArgument(m) => err(format!("ERR {m}")),
        TernError::WrongType(m) => err(format!("ERR {m}")),
        TernError::TableNotFound(t) => err(format!("ERR table {t} does not exist")),
        e if e.is_retryable() => err(format!("TRYAGAIN {e}")),
        e => err(format!("ERR {e}")),
    }
}

fn wrong_args(name: &str) -> Reply {
    err(format!("ERR wrong number of arguments for '{}' command", name.to_ascii_lowercase()))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn int_arg(b: &[u8]) -> Result<i64, Reply> {
    std::str::from_utf8(b)
        .ok()
        .filter(|s| !s.starts_with('+') && (s.len() <= 1 || !s.starts_with('0')) && !s.starts_with("-0"))
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| err(NOT_INTEGER))
}

fn float_arg(b: &[u8]) -> Result<f64, Reply> {
    std::str::from_utf8(b)
        .ok()
        .filter(|s| !s.is_empty() && !s.starts_with(char::is_whitespace) && !s.ends_with(char::is_whitespace))
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|f| !f.is_nan())
        .ok_or_else(|| err(NOT_FLOAT))
}

fn upper(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_uppercase()
}

fn field(f: &Bytes) -> Result<Vec<u8>, Reply> {
    if f.is_empty() {
        return Err(err(
            "ERR empty hash field names are not supported (a hash field is a Tern sortkey, and the empty sortkey holds the string value)",
        ));
    }
    Ok(f.to_vec())
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum KeyType {
    None,
    String,
    Hash,
}

impl KeyType {
    fn name(self) -> &'static str {
        match self {
            KeyType::None => "none",
            KeyType::String => "string",
            KeyType::Hash => "hash",
        }
    }
}

async fn key_type(t: &Table, key: &[u8]) -> Result<KeyType, Reply> {
    let (records, _) = t.scan(key, &ScanOptions { limit: 1, no_value: true, ..Default::default() }).await.map_err(store_error)?;
    Ok(match records.first() {
        None => KeyType::None,
        Some(r) if r.sortkey.is_empty() => KeyType::String,
        Some(_) => KeyType::Hash,
    })
}

/// The string at `key`; WRONGTYPE if the key holds a hash.
async fn get_string(t: &Table, key: &[u8]) -> Result<Option<Record>, Reply> {
    match t.get_record(key, STRING).await.map_err(store_error)? {
        Some(r) => Ok(Some(r)),
        None if key_type(t, key).await? == KeyType::Hash => Err(err(WRONGTYPE)),
        None => Ok(None),
    }
}

/// Fails with WRONGTYPE if the key holds a string (before a hash command).
async fn ensure_hash(t: &Table, key: &[u8]) -> Result<(), Reply> {
    if t.exists(key, STRING).await.map_err(store_error)? {
        return Err(err(WRONGTYPE));
    }
    Ok(())
}

enum Change {
    Keep,
    Set { value: Vec<u8>, expire_at_ms: u64 },
    Delete,
}

/// Read-modify-write of one record with compare-and-set, retried on contention. `f` sees the
/// current record and decides. Returns the record as it was when the change applied.
async fn update<F>(t: &Table, key: &[u8], sortkey: &[u8], f: F) -> Result<Option<Record>, Reply>
where
    F: Fn(Option<&Record>) -> Result<Change, Reply>,
{
    for _ in 0..CAS_ATTEMPTS {
        let current = if sortkey.is_empty() { get_string(t, key).await? } else { t.get_record(key, sortkey).await.map_err(store_error)? };
        let (set_value, set_expire_at_ms, set_delete) = match f(current.as_ref())? {
            Change::Keep => return Ok(current),
            Change::Set { value, expire_at_ms } => (value, expire_at_ms, false),
            Change::Delete if current.is_none() => return Ok(None),
            Change::Delete => (Vec::new(), 0, true),
        };
        let (check_type, check_operand) = match &current {
            Some(r) => (CheckType::ValueEqual, r.value.clone()),
            None => (CheckType::ValueNotExist, Bytes::new()),
        };
        let op = Op::CheckAndSet(CheckAndSet {
            hashkey: Bytes::copy_from_slice(key),
            check_sortkey: Bytes::copy_from_slice(sortkey),
            check_type: check_type as i32,
            check_operand,
            set_sortkey: Bytes::copy_from_slice(sortkey),
            set_value: set_value.into(),
            set_expire_at_ms,
            set_delete,
            ..Default::default()
        });
        if t.write_op(key, op).await.map_err(store_error)?.set_done {
            return Ok(current);
        }
    }
    Err(err("TRYAGAIN the key changed concurrently on every attempt; try again"))
}

/// Every record of a key (string and hash fields), at most `max`, paging through the store.
async fn all_records(t: &Table, key: &[u8], no_value: bool, max: usize) -> Result<Vec<Record>, Reply> {
    let mut out = Vec::new();
    let mut start = Vec::new();
    loop {
        let opts = ScanOptions { start: start.clone(), limit: 1000, no_value, ..Default::default() };
        let (records, resume) = t.scan(key, &opts).await.map_err(store_error)?;
        out.extend(records);
        if out.len() > max {
            return Err(err(format!("ERR the hash has more than {max} fields; read it with HSCAN")));
        }
        if resume.is_empty() {
            return Ok(out);
        }
        start = resume;
    }
}

/// Deletes a key of any type; true if it existed.
async fn delete_key(t: &Table, key: &[u8]) -> Result<bool, Reply> {
    let mut existed = false;
    loop {
        let (records, resume) = t.scan(key, &ScanOptions { limit: 1000, no_value: true, ..Default::default() }).await.map_err(store_error)?;
        if records.is_empty() {
            return Ok(existed);
        }
        let sortkeys: Vec<Vec<u8>> = records.iter().map(|r| r.sortkey.to_vec()).collect();
        existed |= t.multi_del(key, &sortkeys).await.map_err(store_error)? > 0;
        if resume.is_empty() {
            return Ok(existed);
        }
    }
}

fn set_op(key: &[u8], values: Vec<(Vec<u8>, Vec<u8>)>, expire_at_ms: u64) -> Op {
    Op::Set(MultiSet {
        hashkey: Bytes::copy_from_slice(key),
        values: values.into_iter().map(|(s, v)| SortkeyValue { sortkey: s.into(), value: v.into(), ttl_seconds: 0, expire_at_ms }).collect(),
    })
}

/// Parses an expiry option value into an absolute unix-ms time.
fn expiry_arg(option: &str, value: &[u8], command: &str) -> Result<u64, Reply> {
    let n = int_arg(value)?;
    let invalid = || err(format!("ERR invalid expire time in '{command}' command"));
    if n <= 0 {
        return Err(invalid());
    }
    let n = n as u64;
    let at = match option {
        "EX" => n.checked_mul(1000).and_then(|ms| ms.checked_add(now_ms())),
        "PX" => n.checked_add(now_ms()),
        "EXAT" => n.checked_mul(1000),
        "PXAT" => Some(n),
        _ => None,
    };
    at.filter(|&t| t < i64::MAX as u64).ok_or_else(invalid)
}

/// Whether a command only reads the table, leaves the connection's state alone, and answers with at
/// most one value: a pipeline's consecutive small reads run concurrently (see `serve` in lib.rs).
/// Everything else (writes, multi-value reads such as MGET or HGETALL, connection commands) runs
/// alone, after every earlier command of its connection has answered.
pub fn is_small_read(args: &[Bytes]) -> bool {
    const READS: [&[u8]; 10] = [b"GET", b"STRLEN", b"TTL", b"PTTL", b"TYPE", b"EXISTS", b"HGET", b"HEXISTS", b"HLEN", b"PING"];
    // EXISTS of several keys reads each: alone, like MGET.
    let name = &args[0];
    READS.iter().any(|r| r.eq_ignore_ascii_case(name)) && !(name.eq_ignore_ascii_case(b"EXISTS") && args.len() > 2)
}

/// Runs one read-only command (those of `is_small_read` and the multi-value reads); `name` is `args[0]` in upper case.
pub async fn execute_read(shared: &Shard, name: &str, args: &[Bytes]) -> Reply {
    let t = &shared.table;
    let r = match name {
        "GET" => cmd_get(shared, args).await,
        "MGET" if args.len() >= 2 => cmd_mget(t, &args[1..]).await,
        "EXISTS" if args.len() >= 2 => {
            let types = join_all(args[1..].iter().map(|k| key_type(t, k))).await;
            types.into_iter().try_fold(0, |n, r| r.map(|k| n + (k != KeyType::None) as i64)).map(Reply::Int)
        }
        "STRLEN" if args.len() == 2 => get_string(t, &args[1]).await.map(|r| Reply::Int(r.map_or(0, |r| r.value.len() as i64))),
        "TTL" | "PTTL" if args.len() == 2 => cmd_ttl(t, &args[1], name == "PTTL").await,
        "TYPE" if args.len() == 2 => key_type(t, &args[1]).await.map(|k| Reply::Simple(k.name().into())),
        "HGET" if args.len() == 3 => hmget(t, &args[1], &args[2..3]).await.map(|mut v| v.pop().unwrap_or(Reply::Nil)),
        "HMGET" if args.len() >= 3 => hmget(t, &args[1], &args[2..]).await.map(Reply::Array),
        "HEXISTS" if args.len() == 3 => hmget(t, &args[1], &args[2..3]).await.map(|v| Reply::Int(v.first().is_some_and(|r| *r != Reply::Nil) as i64)),
        "HLEN" if args.len() == 2 => cmd_hlen(t, &args[1]).await,
        "HKEYS" | "HVALS" | "HGETALL" if args.len() == 2 => cmd_hgetall(t, name, &args[1]).await,
        "PING" if args.len() <= 2 => Ok(args.get(1).map_or(Reply::Simple("PONG".into()), |m| Reply::Bulk(m.clone()))),
        _ if crate::info::is_known(name) => Err(wrong_args(name)),
        _ => Err(unknown_command(args)),
    };
    let reply = r.unwrap_or_else(|e| e);
    if name == "GET" {
        let hit = !matches!(reply, Reply::Nil | Reply::Error(_));
        let counter = if hit { &shared.stats.keyspace_hits } else { &shared.stats.keyspace_misses };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    reply
}

/// Runs one command. `name` is `args[0]` in upper case (the connection has computed it already).
pub async fn execute(shared: &Shard, session: &mut Session, name: String, args: &[Bytes]) -> Reply {
    if is_small_read(args) || matches!(name.as_str(), "EXISTS" | "MGET" | "HMGET" | "HKEYS" | "HVALS" | "HGETALL") {
        return execute_read(shared, &name, args).await;
    }
    let t = &shared.table;
    let r = match name.as_str() {
        "SET" => cmd_set(t, args).await,
        "SETNX" if args.len() == 3 => set_if(t, &args[1], &args[2], CheckType::ValueNotExist).await.map(|done| Reply::Int(done as i64)),
        "SETEX" | "PSETEX" if args.len() == 4 => {
            let unit = if name == "SETEX" { "EX" } else { "PX" };
            let cmd = [args[0].clone(), args[1].clone(), args[3].clone(), Bytes::from(unit), args[2].clone()];
            cmd_set(t, &cmd).await
        }
        "GETSET" if args.len() == 3 => {
            let cmd = [args[0].clone(), args[1].clone(), args[2].clone(), Bytes::from("GET")];
            cmd_set(t, &cmd).await
        }
        "GETDEL" if args.len() == 2 => update(t, &args[1], STRING, |_| Ok(Change::Delete)).await.map(|r| Reply::opt(r.map(|r| r.value))),
        "GETEX" if args.len() >= 2 => cmd_getex(t, args).await,
        "MSET" if args.len() >= 3 && args.len() % 2 == 1 => cmd_mset(t, &args[1..]).await,
        "MSETNX" if args.len() >= 3 && args.len() % 2 == 1 => cmd_msetnx(t, &args[1..]).await,
        "DEL" | "UNLINK" if args.len() >= 2 => {
            let done = join_all(args[1..].iter().map(|k| delete_key(t, k))).await;
            done.into_iter().try_fold(0, |n, r| r.map(|d| n + d as i64)).map(Reply::Int)
        }
        "INCR" | "DECR" if args.len() == 2 => incr(t, &args[1], STRING, if name == "INCR" { 1 } else { -1 }).await,
        "INCRBY" | "DECRBY" if args.len() == 3 => match int_arg(&args[2]) {
            Ok(d) if name == "INCRBY" => incr(t, &args[1], STRING, d).await,
            Ok(d) => match d.checked_neg() {
                Some(d) => incr(t, &args[1], STRING, d).await,
                None => Err(err("ERR decrement would overflow")),
            },
            Err(e) => Err(e),
        },
        "INCRBYFLOAT" if args.len() == 3 => incr_float(t, &args[1], STRING, &args[2], NOT_FLOAT).await,
        "APPEND" if args.len() == 3 => cmd_append(t, &args[1], &args[2]).await,
        "EXPIRE" | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT" if args.len() >= 3 => cmd_expire(t, &name, args).await,
        "PERSIST" if args.len() == 2 => set_expiry(t, &args[1], |current| (current != 0).then_some(0)).await.map(|d| Reply::Int(d as i64)),
        "HSET" | "HMSET" if args.len() >= 4 && args.len().is_multiple_of(2) => cmd_hset(t, &args[1], &args[2..], name == "HMSET").await,
        "HSETNX" if args.len() == 4 => cmd_hsetnx(t, &args[1], &args[2], &args[3]).await,
        "HDEL" if args.len() >= 3 => cmd_hdel(t, &args[1], &args[2..]).await,
        "HINCRBY" if args.len() == 4 => match (field(&args[2]), int_arg(&args[3])) {
            (Ok(f), Ok(d)) => match ensure_hash(t, &args[1]).await {
                Ok(()) => incr(t, &args[1], &f, d).await,
                Err(e) => Err(e),
            },
            (Err(e), _) | (_, Err(e)) => Err(e),
        },
        "HINCRBYFLOAT" if args.len() == 4 => match field(&args[2]) {
            Ok(f) => match ensure_hash(t, &args[1]).await {
                Ok(()) => incr_float(t, &args[1], &f, &args[3], "ERR hash value is not a float").await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        },
        "HSCAN" if args.len() >= 3 => cmd_hscan(shared, &args[1], &args[2], &args[3..]).await,
        "SCAN" if args.len() >= 2 => cmd_scan(shared, &args[1], &args[2..]).await,
        "DBSIZE" if args.len() == 1 => shared.key_count(true).await.map(|(keys, _)| Reply::Int(keys as i64)),
        "INFO" => crate::info::info(shared, &args[1..]).await,
        "ECHO" if args.len() == 2 => Ok(Reply::Bulk(args[1].clone())),
        "SELECT" if args.len() == 2 => match int_arg(&args[1]) {
            Ok(0) => Ok(Reply::Ok),
            Ok(_) => Err(err("ERR DB index is out of range")),
            Err(e) => Err(e),
        },
        "COMMAND" => crate::info::command(&args[1..]),
        "CONFIG" => crate::info::config(shared, &args[1..]),
        "CLIENT" => client_command(session, &args[1..]),
        "QUIT" => {
            session.quit = true;
            Ok(Reply::Ok)
        }
        "AUTH" | "HELLO" => unreachable_session_command(),
        _ if crate::info::is_known(&name) => Err(wrong_args(&name)),
        _ => Err(unknown_command(args)),
    };
    r.unwrap_or_else(|e| e)
}

fn unreachable_session_command() -> R {
    Err(err("ERR AUTH and HELLO are handled by the connection"))
}

pub fn unknown_command(args: &[Bytes]) -> Reply {
    let shown: Vec<String> = args[1..].iter().take(8).map(|a| format!("'{}'", String::from_utf8_lossy(&a[..a.len().min(128)]))).collect();
    err(format!(
        "ERR unknown command '{}', with args beginning with: {}",
        String::from_utf8_lossy(&args[0][..args[0].len().min(128)]),
        shown.join(" ")
    ))
}

fn client_command(session: &mut Session, args: &[Bytes]) -> R {
    let sub = args.first().map(|a| upper(a)).unwrap_or_default();
    match sub.as_str() {
        "SETNAME" if args.len() == 2 => {
            if args[1].iter().any(|&b| b <= b' ' || b > b'~') {
                return Err(err("ERR Client names cannot contain spaces, newlines or special characters."));
            }
            session.name = Some(args[1].clone());
            Ok(Reply::Ok)
        }
        "GETNAME" if args.len() == 1 => Ok(Reply::opt(session.name.clone())),
        "ID" if args.len() == 1 => Ok(Reply::Int(session.id as i64)),
        "SETINFO" if args.len() == 3 => Ok(Reply::Ok),
        "INFO" if args.len() == 1 => Ok(Reply::bulk(format!(
            "id={} name={} db=0 resp={}\n",
            session.id,
            session.name.as_ref().map(|n| String::from_utf8_lossy(n).into_owned()).unwrap_or_default(),
            if session.resp3 { 3 } else { 2 }
        ))),
        _ => Err(err(format!("ERR unknown subcommand or wrong number of arguments for 'CLIENT|{sub}'"))),
    }
}

async fn cmd_get(shared: &Shard, args: &[Bytes]) -> R {
    if args.len() != 2 {
        return Err(wrong_args("get"));
    }
    Ok(Reply::opt(get_string(&shared.table, &args[1]).await?.map(|r| r.value)))
}

/// One check_and_set on the string of `key`; true if it was set.
async fn set_if(t: &Table, key: &Bytes, value: &Bytes, check: CheckType) -> Result<bool, Reply> {
    set_if_expiring(t, key, value, check, 0).await
}

async fn set_if_expiring(t: &Table, key: &Bytes, value: &Bytes, check: CheckType, expire_at_ms: u64) -> Result<bool, Reply> {
    let op = Op::CheckAndSet(CheckAndSet {
        hashkey: key.clone(),
        check_type: check as i32,
        set_value: value.clone(),
        set_expire_at_ms: expire_at_ms,
        ..Default::default()
    });
    Ok(t.write_op(key, op).await.map_err(store_error)?.set_done)
}

async fn cmd_set(t: &Table, args: &[Bytes]) -> R {
    if args.len() < 3 {
        return Err(wrong_args("set"));
    }
    let (key, value) = (&args[1], &args[2]);
    let (mut nx, mut xx, mut get, mut keepttl) = (false, false, false, false);
    let mut expire_at: Option<u64> = None;
    let mut i = 3;
    while i < args.len() {
        let option = upper(&args[i]);
        match option.as_str() {
            "NX" if !xx => nx = true,
            "XX" if !nx => xx = true,
            "GET" => get = true,
            "KEEPTTL" if expire_at.is_none() => keepttl = true,
            "EX" | "PX" | "EXAT" | "PXAT" if expire_at.is_none() && !keepttl && i + 1 < args.len() => {
                expire_at = Some(expiry_arg(&option, &args[i + 1], "set")?);
                i += 1;
            }
            _ => return Err(err(SYNTAX)),
        }
        i += 1;
    }
    let expire_at_ms = expire_at.unwrap_or(0);
    if !get && !keepttl {
        if nx || xx {
            let check = if nx { CheckType::ValueNotExist } else { CheckType::ValueExist };
            return Ok(if set_if_expiring(t, key, value, check, expire_at_ms).await? { Reply::Ok } else { Reply::Nil });
        }
        t.write_op(key, set_op(key, vec![(STRING.to_vec(), value.to_vec())], expire_at_ms)).await.map_err(store_error)?;
        return Ok(Reply::Ok);
    }
    let done = std::sync::atomic::AtomicBool::new(false);
    let old = update(t, key, STRING, |current| {
        if (nx && current.is_some()) || (xx && current.is_none()) {
            done.store(false, Ordering::Relaxed);
            return Ok(Change::Keep);
        }
        done.store(true, Ordering::Relaxed);
        let expire_at_ms = if keepttl { current.map_or(0, |r| r.expire_at_ms) } else { expire_at_ms };
        Ok(Change::Set { value: value.to_vec(), expire_at_ms })
    })
    .await?;
    Ok(match (get, done.load(Ordering::Relaxed)) {
        (true, _) => Reply::opt(old.map(|r| r.value)),
        (false, true) => Reply::Ok,
        (false, false) => Reply::Nil,
    })
}

async fn cmd_getex(t: &Table, args: &[Bytes]) -> R {
    let mut expire: Option<u64> = None; // Some(0) = persist
    match &args[2..] {
        [] => {}
        [p] if upper(p) == "PERSIST" => expire = Some(0),
        [o, v] if matches!(upper(o).as_str(), "EX" | "PX" | "EXAT" | "PXAT") => expire = Some(expiry_arg(&upper(o), v, "getex")?),
        _ => return Err(err(SYNTAX)),
    }
    let Some(expire) = expire else {
        return Ok(Reply::opt(get_string(t, &args[1]).await?.map(|r| r.value)));
    };
    let old = update(t, &args[1], STRING, |current| match current {
        None => Ok(Change::Keep),
        Some(_) if expire != 0 && expire <= now_ms() => Ok(Change::Delete),
        Some(r) => Ok(Change::Set { value: r.value.to_vec(), expire_at_ms: expire }),
    })
    .await?;
    Ok(Reply::opt(old.map(|r| r.value)))
}

async fn cmd_mget(t: &Table, keys: &[Bytes]) -> R {
    if keys.len() > tern_core::limits::MULTI_RECORDS_MAX {
        return Err(err(format!("ERR MGET names {} keys; the limit is {}", keys.len(), tern_core::limits::MULTI_RECORDS_MAX)));
    }
    let values = join_all(keys.iter().map(|k| t.get(k, STRING))).await;
    let mut out = Vec::with_capacity(keys.len());
    let mut size = 0;
    for v in values {
        let v = v.map_err(store_error)?;
        size += v.as_ref().map_or(8, |v| v.len() + 16);
        if size > REPLY_BYTES_MAX {
            return Err(err(format!("ERR the reply would exceed {REPLY_BYTES_MAX} bytes; ask for fewer keys")));
        }
        out.push(v.map_or(Reply::Nil, |v| Reply::Bulk(v.into())));
    }
    Ok(Reply::Array(out))
}

async fn cmd_mset(t: &Table, pairs: &[Bytes]) -> R {
    if pairs.len() / 2 > tern_core::limits::MULTI_RECORDS_MAX {
        return Err(err(format!("ERR MSET names {} keys; the limit is {}", pairs.len() / 2, tern_core::limits::MULTI_RECORDS_MAX)));
    }
    let writes = pairs.chunks(2).map(|kv| t.write_op(&kv[0], set_op(&kv[0], vec![(STRING.to_vec(), kv[1].to_vec())], 0)));
    for r in join_all(writes).await {
        r.map_err(store_error)?;
    }
    Ok(Reply::Ok)
}

async fn cmd_msetnx(t: &Table, pairs: &[Bytes]) -> R {
    let keys: HashSet<&Bytes> = pairs.iter().step_by(2).collect();
    if keys.len() > 1 {
        return Err(err("ERR MSETNX of several keys is not supported: Tern sets one key atomically, not several (use one key, or MSET)"));
    }
    let (key, value) = (&pairs[pairs.len() - 2], &pairs[pairs.len() - 1]);
    Ok(Reply::Int(set_if(t, key, value, CheckType::ValueNotExist).await? as i64))
}

async fn incr(t: &Table, key: &[u8], sortkey: &[u8], delta: i64) -> R {
    match t.incr(key, sortkey, delta, 0).await {
        Ok(v) => Ok(Reply::Int(v)),
        Err(TernError::WrongType(_)) if sortkey.is_empty() => Err(err(NOT_INTEGER)),
        Err(TernError::WrongType(_)) => Err(err("ERR hash value is not an integer")),
        Err(TernError::InvalidArgument(m)) if m.contains("overflow") => Err(err("ERR increment or decrement would overflow")),
        Err(e) => Err(store_error(e)),
    }
}

async fn incr_float(t: &Table, key: &[u8], sortkey: &[u8], delta: &[u8], not_float: &'static str) -> R {
    let delta = float_arg(delta)?;
    let result = std::sync::Mutex::new(String::new());
    update(t, key, sortkey, |current| {
        let old = match current {
            None => 0.0,
            Some(r) => std::str::from_utf8(&r.value).ok().and_then(|s| s.parse::<f64>().ok()).ok_or_else(|| err(not_float))?,
        };
        let new = old + delta;
        if !new.is_finite() {
            return Err(err("ERR increment would produce NaN or Infinity"));
        }
        let text = format_double(new);
        *result.lock().expect("result") = text.clone();
        Ok(Change::Set { value: text.into_bytes(), expire_at_ms: current.map_or(0, |r| r.expire_at_ms) })
    })
    .await?;
    let text = result.into_inner().expect("result");
    Ok(Reply::bulk(text))
}

async fn cmd_append(t: &Table, key: &[u8], suffix: &[u8]) -> R {
    let len = std::sync::atomic::AtomicUsize::new(0);
    update(t, key, STRING, |current| {
        let mut value = current.map(|r| r.value.to_vec()).unwrap_or_default();
        value.extend_from_slice(suffix);
        tern_core::limits::check_value(&value).map_err(store_error)?;
        len.store(value.len(), Ordering::Relaxed);
        Ok(Change::Set { value, expire_at_ms: current.map_or(0, |r| r.expire_at_ms) })
    })
    .await?;
    Ok(Reply::Int(len.load(Ordering::Relaxed) as i64))
}

/// Sets a new expiry (0 = none) on every record of a key, if `decide(current expiry)` says so.
/// Expiry in the past deletes the key. True if the key exists and was changed.
async fn set_expiry(t: &Table, key: &[u8], decide: impl Fn(u64) -> Option<u64>) -> Result<bool, Reply> {
    match key_type(t, key).await? {
        KeyType::None => Ok(false),
        KeyType::String => {
            let changed = std::sync::atomic::AtomicBool::new(false);
            update(t, key, STRING, |current| {
                let Some(r) = current else { return Ok(Change::Keep) };
                let Some(at) = decide(r.expire_at_ms) else { return Ok(Change::Keep) };
                changed.store(true, Ordering::Relaxed);
                if at != 0 && at <= now_ms() {
                    return Ok(Change::Delete);
                }
                Ok(Change::Set { value: r.value.to_vec(), expire_at_ms: at })
            })
            .await?;
            Ok(changed.load(Ordering::Relaxed))
        }
        KeyType::Hash => {
            // A hash's expiry is that of its fields, rewritten together in one atomic write.
            let records = all_records(t, key, false, HASH_FIELDS_MAX).await?;
            let Some(first) = records.first() else { return Ok(false) };
            let Some(at) = decide(first.expire_at_ms) else { return Ok(false) };
            if at != 0 && at <= now_ms() {
                return delete_key(t, key).await;
            }
            for chunk in records.chunks(tern_core::limits::MULTI_RECORDS_MAX) {
                let values = chunk.iter().map(|r| (r.sortkey.to_vec(), r.value.to_vec())).collect();
                t.write_op(key, set_op(key, values, at)).await.map_err(store_error)?;
            }
            Ok(true)
        }
    }
}

async fn cmd_expire(t: &Table, name: &str, args: &[Bytes]) -> R {
    let n = int_arg(&args[2])?;
    let now = now_ms() as i64;
    let at = match name {
        "EXPIRE" => n.checked_mul(1000).and_then(|v| v.checked_add(now)),
        "PEXPIRE" => n.checked_add(now),
        "EXPIREAT" => n.checked_mul(1000),
        _ => Some(n),
    }
    .ok_or_else(|| err(format!("ERR invalid expire time in '{}' command", name.to_ascii_lowercase())))?;
    // A time in the past deletes the key (1 ms is "already expired" for set_expiry).
    let at = at.max(1) as u64;
    let mut condition: Option<String> = None;
    for o in &args[3..] {
        let o = upper(o);
        if !matches!(o.as_str(), "NX" | "XX" | "GT" | "LT") || condition.is_some() {
            return Err(err(if condition.is_some() { "ERR NX and XX, GT or LT options at the same time are not compatible" } else { SYNTAX }));
        }
        condition = Some(o);
    }
    let changed = set_expiry(t, &args[1], |current| {
        let ok = match condition.as_deref() {
            None => true,
            Some("NX") => current == 0,
            Some("XX") => current != 0,
            Some("GT") => current != 0 && at > current,
            Some(_) => current == 0 || at < current,
        };
        ok.then_some(at)
    })
    .await?;
    Ok(Reply::Int(changed as i64))
}

async fn cmd_ttl(t: &Table, key: &[u8], millis: bool) -> R {
    let (records, _) = t.scan(key, &ScanOptions { limit: 1, no_value: true, ..Default::default() }).await.map_err(store_error)?;
    Ok(Reply::Int(match records.first() {
        None => -2,
        Some(r) if r.expire_at_ms == 0 => -1,
        Some(r) => {
            let left = r.expire_at_ms.saturating_sub(now_ms()) as i64;
            if millis {
                left
            } else {
                (left + 500) / 1000
            }
        }
    }))
}

async fn cmd_hset(t: &Table, key: &[u8], pairs: &[Bytes], hmset: bool) -> R {
    let mut values = Vec::with_capacity(pairs.len() / 2);
    for kv in pairs.chunks(2) {
        values.push((field(&kv[0])?, kv[1].to_vec()));
    }
    let mut probe: Vec<Vec<u8>> = vec![STRING.to_vec()];
    probe.extend(values.iter().map(|(f, _)| f.clone()));
    let existing = t.multi_get(key, &probe).await.map_err(store_error)?;
    if existing.iter().any(|r| r.sortkey.is_empty()) {
        return Err(err(WRONGTYPE));
    }
    let existed: HashSet<&[u8]> = existing.iter().map(|r| &r.sortkey[..]).collect();
    let added = values.iter().map(|(f, _)| &f[..]).filter(|f| !existed.contains(f)).collect::<HashSet<_>>().len();
    t.write_op(key, set_op(key, values, 0)).await.map_err(store_error)?;
    Ok(if hmset { Reply::Ok } else { Reply::Int(added as i64) })
}

async fn cmd_hsetnx(t: &Table, key: &Bytes, f: &Bytes, value: &Bytes) -> R {
    let f = field(f)?;
    ensure_hash(t, key).await?;
    let op = Op::CheckAndSet(CheckAndSet {
        hashkey: key.clone(),
        check_sortkey: f.clone().into(),
        check_type: CheckType::ValueNotExist as i32,
        set_sortkey: f.into(),
        set_value: value.clone(),
        ..Default::default()
    });
    Ok(Reply::Int(t.write_op(key, op).await.map_err(store_error)?.set_done as i64))
}

/// Values of hash fields (Nil where absent); WRONGTYPE if the key is a string.
async fn hmget(t: &Table, key: &[u8], fields: &[Bytes]) -> Result<Vec<Reply>, Reply> {
    let mut probe: Vec<Vec<u8>> = vec![STRING.to_vec()];
    for f in fields {
        probe.push(field(f)?);
    }
    let records = t.multi_get(key, &probe).await.map_err(store_error)?;
    if records.iter().any(|r| r.sortkey.is_empty()) {
        return Err(err(WRONGTYPE));
    }
    let mut size = 0;
    let mut out = Vec::with_capacity(fields.len());
    for f in fields {
        let v = records.iter().find(|r| r.sortkey[..] == f[..]).map(|r| r.value.clone());
        size += v.as_ref().map_or(8, |v| v.len() + 16);
        if size > REPLY_BYTES_MAX {
            return Err(err(format!("ERR the reply would exceed {REPLY_BYTES_MAX} bytes; ask for fewer fields")));
        }
        out.push(Reply::opt(v));
    }
    Ok(out)
}

async fn cmd_hdel(t: &Table, key: &[u8], fields: &[Bytes]) -> R {
    let fields = fields.iter().map(field).collect::<Result<Vec<_>, _>>()?;
    ensure_hash(t, key).await?;
    Ok(Reply::Int(t.multi_del(key, &fields).await.map_err(store_error)? as i64))
}

async fn cmd_hlen(t: &Table, key: &[u8]) -> R {
    let (count, string) = futures::join!(t.count(key), t.exists(key, STRING));
    let (count, string) = (count.map_err(store_error)?, string.map_err(store_error)?);
    if string {
        return Err(err(WRONGTYPE));
    }
    Ok(Reply::Int(count as i64))
}

async fn cmd_hgetall(t: &Table, name: &str, key: &[u8]) -> R {
    let records = all_records(t, key, name == "HKEYS", HASH_FIELDS_MAX).await?;
    if records.first().is_some_and(|r| r.sortkey.is_empty()) {
        return Err(err(WRONGTYPE));
    }
    let size: usize = records.iter().map(|r| r.sortkey.len() + r.value.len() + 32).sum();
    if size > REPLY_BYTES_MAX {
        return Err(err(format!("ERR the reply would exceed {REPLY_BYTES_MAX} bytes; read the hash with HSCAN")));
    }
    Ok(match name {
        "HKEYS" => Reply::Array(records.into_iter().map(|r| Reply::Bulk(r.sortkey)).collect()),
        "HVALS" => Reply::Array(records.into_iter().map(|r| Reply::Bulk(r.value)).collect()),
        _ => Reply::Map(records.into_iter().map(|r| (Reply::Bulk(r.sortkey), Reply::Bulk(r.value))).collect()),
    })
}

/// SCAN-family options: MATCH pattern, COUNT n, TYPE t (SCAN) / NOVALUES (HSCAN).
struct ScanArgs {
    pattern: Option<Bytes>,
    count: usize,
    type_filter: Option<String>,
    no_values: bool,
}

fn scan_args(args: &[Bytes], hscan: bool) -> Result<ScanArgs, Reply> {
    let mut out = ScanArgs { pattern: None, count: 10, type_filter: None, no_values: false };
    let mut i = 0;
    while i < args.len() {
        let o = upper(&args[i]);
        match (o.as_str(), args.get(i + 1)) {
            ("MATCH", Some(p)) => out.pattern = Some(p.clone()),
            ("COUNT", Some(n)) => {
                let n = int_arg(n)?;
                if n < 1 {
                    return Err(err(SYNTAX));
                }
                out.count = (n as usize).min(tern_core::limits::READ_RECORDS_MAX as usize);
            }
            ("TYPE", Some(ty)) if !hscan => out.type_filter = Some(String::from_utf8_lossy(ty).to_ascii_lowercase()),
            ("NOVALUES", _) if hscan => {
                out.no_values = true;
                i += 1;
                continue;
            }
            _ => return Err(err(SYNTAX)),
        }
        i += 2;
    }
    Ok(out)
}

fn matches(pattern: &Option<Bytes>, key: &[u8]) -> bool {
    pattern.as_ref().is_none_or(|p| glob_match(p, key))
}

async fn cmd_scan(shared: &Shard, cursor: &Bytes, options: &[Bytes]) -> R {
    let opts = scan_args(options, false)?;
    let position = match shared.cursors.take(cursor)? {
        None => FullScanCursor::default(),
        Some(crate::Cursor::Scan(c)) => c,
        Some(_) => return Err(err("ERR invalid cursor")),
    };
    let (records, next) = shared.table.full_scan(&position, opts.count as u32, true).await.map_err(store_error)?;
    let mut keys: Vec<Reply> = Vec::new();
    let mut last: Option<(&[u8], KeyType)> = None;
    let emit = |key: &[u8], ty: KeyType, keys: &mut Vec<Reply>| {
        let type_ok = opts.type_filter.as_deref().is_none_or(|f| f == ty.name());
        if type_ok && matches(&opts.pattern, key) {
            keys.push(Reply::Bulk(Bytes::copy_from_slice(key)));
        }
    };
    for r in &records {
        let ty = if r.sortkey.is_empty() { KeyType::String } else { KeyType::Hash };
        match last {
            Some((k, _)) if k == &r.hashkey[..] => {}
            Some((k, t)) => {
                emit(k, t, &mut keys);
                last = Some((&r.hashkey[..], ty));
            }
            None => last = Some((&r.hashkey[..], ty)),
        }
    }
    if let Some((k, t)) = last {
        emit(k, t, &mut keys);
    }
    let next_id = if next.done { Bytes::from_static(b"0") } else { shared.cursors.put(crate::Cursor::Scan(next)) };
    Ok(Reply::Array(vec![Reply::Bulk(next_id), Reply::Array(keys)]))
}

async fn cmd_hscan(shared: &Shard, key: &Bytes, cursor: &Bytes, options: &[Bytes]) -> R {
    let opts = scan_args(options, true)?;
    let t = &shared.table;
    let start = match shared.cursors.take(cursor)? {
        None => {
            ensure_hash(t, key).await?;
            vec![0u8] // the first non-empty sortkey
        }
        Some(crate::Cursor::HScan { key: k, resume }) if k == *key => resume,
        Some(_) => return Err(err("ERR invalid cursor")),
    };
    let scan = ScanOptions { start, limit: opts.count as u32, no_value: opts.no_values, ..Default::default() };
    let (records, resume) = t.scan(key, &scan).await.map_err(store_error)?;
    let mut items = Vec::new();
    for r in records.into_iter().filter(|r| !r.sortkey.is_empty() && matches(&opts.pattern, &r.sortkey)) {
        items.push(Reply::Bulk(r.sortkey));
        if !opts.no_values {
            items.push(Reply::Bulk(r.value));
        }
    }
    let next = if resume.is_empty() { Bytes::from_static(b"0") } else { shared.cursors.put(crate::Cursor::HScan { key: key.clone(), resume }) };
    Ok(Reply::Array(vec![Reply::Bulk(next), Reply::Array(items)]))
}
