//! The command table: every keyed command this crate executes, its arity, whether it writes, which
//! arguments are keys, and which module runs it.

use crate::{args, fail, hash, keyspace, list, set, strings, zset, Fail, Records, Reply, Res};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::OnceLock;
use tern_core::TernError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Module {
    Keyspace,
    Strings,
    Hash,
    List,
    Set,
    ZSet,
}

/// Which arguments are keys: `first..=last` (negative `last` counts from the end) every `step`,
/// or `numkeys` forms (the argument at `first` counts the keys after it; `dest`: argument 1 is a
/// key as well).
#[derive(Clone, Copy, Debug)]
pub enum Keys {
    None,
    Range { first: usize, last: i32, step: usize },
    NumKeys { at: usize, dest: bool },
}

#[derive(Debug)]
pub struct Spec {
    pub name: &'static str,
    /// Redis's convention: n means exactly n arguments (the name included), -n at least n.
    pub arity: i32,
    pub write: bool,
    pub keys: Keys,
    pub module: Module,
}

const fn k(first: usize, last: i32, step: usize) -> Keys {
    Keys::Range { first, last, step }
}

const ONE: Keys = k(1, 1, 1);
const TWO: Keys = k(1, 2, 1);
const ALL: Keys = k(1, -1, 1);

macro_rules! table {
    ($($name:literal $arity:literal $rw:ident $keys:expr, $module:ident;)*) => {
        &[$(Spec { name: $name, arity: $arity, write: table!(@rw $rw), keys: $keys, module: Module::$module }),*]
    };
    (@rw w) => { true };
    (@rw r) => { false };
}

static TABLE: &[Spec] = table! {
    // keyspace
    "DEL" -2 w ALL, Keyspace;
    "UNLINK" -2 w ALL, Keyspace;
    "EXISTS" -2 r ALL, Keyspace;
    "TOUCH" -2 r ALL, Keyspace;
    "TYPE" 2 r ONE, Keyspace;
    "EXPIRE" -3 w ONE, Keyspace;
    "PEXPIRE" -3 w ONE, Keyspace;
    "EXPIREAT" -3 w ONE, Keyspace;
    "PEXPIREAT" -3 w ONE, Keyspace;
    "PERSIST" 2 w ONE, Keyspace;
    "TTL" 2 r ONE, Keyspace;
    "PTTL" 2 r ONE, Keyspace;
    "EXPIRETIME" 2 r ONE, Keyspace;
    "PEXPIRETIME" 2 r ONE, Keyspace;
    "RENAME" 3 w TWO, Keyspace;
    "RENAMENX" 3 w TWO, Keyspace;
    "COPY" -3 w TWO, Keyspace;
    "OBJECT" -2 r k(2, 2, 1), Keyspace;
    "MEMORY" -2 r k(2, 2, 1), Keyspace;
    "DUMP" 2 r ONE, Keyspace;
    "RESTORE" -4 w ONE, Keyspace;
    "TERN.DIGEST" 2 r ONE, Keyspace;
    "TERN.SCAN" -5 r ONE, Keyspace;
    // strings
    "GET" 2 r ONE, Strings;
    "SET" -3 w ONE, Strings;
    "SETNX" 3 w ONE, Strings;
    "SETEX" 4 w ONE, Strings;
    "PSETEX" 4 w ONE, Strings;
    "GETSET" 3 w ONE, Strings;
    "GETDEL" 2 w ONE, Strings;
    "GETEX" -2 w ONE, Strings;
    "MGET" -2 r ALL, Strings;
    "MSET" -3 w k(1, -1, 2), Strings;
    "MSETNX" -3 w k(1, -1, 2), Strings;
    "STRLEN" 2 r ONE, Strings;
    "APPEND" 3 w ONE, Strings;
    "INCR" 2 w ONE, Strings;
    "DECR" 2 w ONE, Strings;
    "INCRBY" 3 w ONE, Strings;
    "DECRBY" 3 w ONE, Strings;
    "INCRBYFLOAT" 3 w ONE, Strings;
    "GETRANGE" 4 r ONE, Strings;
    "SUBSTR" 4 r ONE, Strings;
    "SETRANGE" 4 w ONE, Strings;
    "LCS" -3 r TWO, Strings;
    "SETBIT" 4 w ONE, Strings;
    "GETBIT" 3 r ONE, Strings;
    "BITCOUNT" -2 r ONE, Strings;
    "BITPOS" -3 r ONE, Strings;
    // hashes
    "HSET" -4 w ONE, Hash;
    "HMSET" -4 w ONE, Hash;
    "HSETNX" 4 w ONE, Hash;
    "HGET" 3 r ONE, Hash;
    "HMGET" -3 r ONE, Hash;
    "HDEL" -3 w ONE, Hash;
    "HLEN" 2 r ONE, Hash;
    "HSTRLEN" 3 r ONE, Hash;
    "HEXISTS" 3 r ONE, Hash;
    "HKEYS" 2 r ONE, Hash;
    "HVALS" 2 r ONE, Hash;
    "HGETALL" 2 r ONE, Hash;
    "HINCRBY" 4 w ONE, Hash;
    "HINCRBYFLOAT" 4 w ONE, Hash;
    "HRANDFIELD" -2 r ONE, Hash;
    // lists
    "LPUSH" -3 w ONE, List;
    "RPUSH" -3 w ONE, List;
    "LPUSHX" -3 w ONE, List;
    "RPUSHX" -3 w ONE, List;
    "LPOP" -2 w ONE, List;
    "RPOP" -2 w ONE, List;
    "LLEN" 2 r ONE, List;
    "LRANGE" 4 r ONE, List;
    "LINDEX" 3 r ONE, List;
    "LSET" 4 w ONE, List;
    "LREM" 4 w ONE, List;
    "LTRIM" 4 w ONE, List;
    "LINSERT" 5 w ONE, List;
    "LPOS" -3 r ONE, List;
    "LMOVE" 5 w TWO, List;
    "LMPOP" -4 w Keys::NumKeys { at: 1, dest: false }, List;
    "RPOPLPUSH" 3 w TWO, List;
    // sets
    "SADD" -3 w ONE, Set;
    "SREM" -3 w ONE, Set;
    "SISMEMBER" 3 r ONE, Set;
    "SMISMEMBER" -3 r ONE, Set;
    "SCARD" 2 r ONE, Set;
    "SMEMBERS" 2 r ONE, Set;
    "SRANDMEMBER" -2 r ONE, Set;
    "SPOP" -2 w ONE, Set;
    "SMOVE" 4 w TWO, Set;
    "SINTER" -2 r ALL, Set;
    "SUNION" -2 r ALL, Set;
    "SDIFF" -2 r ALL, Set;
    "SINTERSTORE" -3 w ALL, Set;
    "SUNIONSTORE" -3 w ALL, Set;
    "SDIFFSTORE" -3 w ALL, Set;
    "SINTERCARD" -3 r Keys::NumKeys { at: 1, dest: false }, Set;
    // sorted sets
    "ZADD" -4 w ONE, ZSet;
    "ZINCRBY" 4 w ONE, ZSet;
    "ZSCORE" 3 r ONE, ZSet;
    "ZMSCORE" -3 r ONE, ZSet;
    "ZCARD" 2 r ONE, ZSet;
    "ZCOUNT" 4 r ONE, ZSet;
    "ZLEXCOUNT" 4 r ONE, ZSet;
    "ZRANK" -3 r ONE, ZSet;
    "ZREVRANK" -3 r ONE, ZSet;
    "ZRANGE" -4 r ONE, ZSet;
    "ZREVRANGE" -4 r ONE, ZSet;
    "ZRANGEBYSCORE" -4 r ONE, ZSet;
    "ZREVRANGEBYSCORE" -4 r ONE, ZSet;
    "ZRANGEBYLEX" -4 r ONE, ZSet;
    "ZREVRANGEBYLEX" -4 r ONE, ZSet;
    "ZRANGESTORE" -5 w TWO, ZSet;
    "ZREM" -3 w ONE, ZSet;
    "ZREMRANGEBYSCORE" 4 w ONE, ZSet;
    "ZREMRANGEBYRANK" 4 w ONE, ZSet;
    "ZREMRANGEBYLEX" 4 w ONE, ZSet;
    "ZPOPMIN" -2 w ONE, ZSet;
    "ZPOPMAX" -2 w ONE, ZSet;
    "ZMPOP" -4 w Keys::NumKeys { at: 1, dest: false }, ZSet;
    "ZRANDMEMBER" -2 r ONE, ZSet;
    "ZUNIONSTORE" -4 w Keys::NumKeys { at: 2, dest: true }, ZSet;
    "ZINTERSTORE" -4 w Keys::NumKeys { at: 2, dest: true }, ZSet;
    "ZDIFFSTORE" -4 w Keys::NumKeys { at: 2, dest: true }, ZSet;
    "ZUNION" -3 r Keys::NumKeys { at: 1, dest: false }, ZSet;
    "ZINTER" -3 r Keys::NumKeys { at: 1, dest: false }, ZSet;
    "ZDIFF" -3 r Keys::NumKeys { at: 1, dest: false }, ZSet;
    "ZINTERCARD" -3 r Keys::NumKeys { at: 1, dest: false }, ZSet;
};

fn index() -> &'static HashMap<&'static str, &'static Spec> {
    static INDEX: OnceLock<HashMap<&'static str, &'static Spec>> = OnceLock::new();
    INDEX.get_or_init(|| TABLE.iter().map(|s| (s.name, s)).collect())
}

/// The command named `name` (any case), if this crate executes it.
pub fn spec(name: &[u8]) -> Option<&'static Spec> {
    // Upper-cased on the stack: every command of every request comes through here.
    let mut upper = [0u8; 32];
    let upper = upper.get_mut(..name.len())?;
    upper.copy_from_slice(name);
    upper.make_ascii_uppercase();
    index().get(std::str::from_utf8(upper).ok()?).copied()
}

/// Every command this crate executes.
pub fn all() -> &'static [Spec] {
    TABLE
}

impl Spec {
    pub fn arity_ok(&self, n: usize) -> bool {
        if self.arity >= 0 {
            n == self.arity as usize
        } else {
            n >= (-self.arity) as usize
        }
    }
}

pub fn wrong_args(name: &str) -> Reply {
    Reply::Error(format!("ERR wrong number of arguments for '{}' command", name.to_ascii_lowercase()))
}

/// The positions of the keys of a command (checked for arity first).
pub fn command_keys(spec: &Spec, a: &[Bytes]) -> Vec<usize> {
    match spec.keys {
        Keys::None => Vec::new(),
        Keys::Range { first, last, step } => {
            let last = if last < 0 { a.len() as i64 + last as i64 } else { last as i64 };
            (first..).step_by(step).take_while(|&i| (i as i64) <= last && i < a.len()).collect()
        }
        Keys::NumKeys { at, dest } => {
            // A malformed count names no keys past the destination: the command itself answers
            // with its own message before it touches anything.
            let n = args::parse_int(&a[at]).filter(|&n| n > 0).unwrap_or(0) as usize;
            let mut keys: Vec<usize> = if dest { vec![1] } else { Vec::new() };
            keys.extend((at + 1..a.len()).take(n));
            keys
        }
    }
}

/// Executes one command. Err is a storage failure: the caller stops.
pub fn execute(r: &mut dyn Records, a: &[Bytes]) -> Result<Reply, TernError> {
    let reply = match run(r, a) {
        Ok(reply) => reply,
        Err(Fail::Reply(reply)) => reply,
        Err(Fail::Storage(e)) => return Err(e),
    };
    // Commands that write bound their own replies (pops stop at POP_BYTES_MAX) and must answer
    // for what they did; this is for reads of whole collections.
    let size = reply.size();
    let writes = a.first().and_then(|name| spec(name)).is_some_and(|s| s.write);
    if !writes && size > crate::REPLY_BYTES_MAX {
        return Ok(Reply::Error(format!(
            "ERR the reply would be {size} bytes; the limit is {} (read big collections with the SCAN forms or ranges)",
            crate::REPLY_BYTES_MAX
        )));
    }
    Ok(reply)
}

fn run(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let Some(name) = a.first() else { return fail("ERR empty command") };
    let Some(spec) = spec(name) else {
        return fail(format!("ERR unknown command '{}'", String::from_utf8_lossy(name)));
    };
    if !spec.arity_ok(a.len()) {
        return Err(wrong_args(spec.name).into());
    }
    if spec.write && !r.writable() {
        return fail(format!("ERR {} writes and cannot be served as a read", spec.name));
    }
    match spec.module {
        Module::Keyspace => keyspace::run(spec.name, r, a),
        Module::Strings => strings::run(spec.name, r, a),
        Module::Hash => hash::run(spec.name, r, a),
        Module::List => list::run(spec.name, r, a),
        Module::Set => set::run(spec.name, r, a),
        Module::ZSet => zset::run(spec.name, r, a),
    }
}

/// Executes a transaction (MULTI/EXEC) in order, each command's answer in the array. Leading
/// `TERN.WATCHED key digest` commands are WATCH's checks: when a watched key's digest differs, no
/// command runs and the answer is a nil array. Every command runs (a transaction is all or
/// nothing); a reply that would take the array past `REPLY_BYTES_MAX` is replaced by an error
/// saying so, and LCS (a CPU-heavy read that would stall the partition's apply) is refused.
pub fn execute_all(r: &mut dyn Records, commands: &[Vec<Bytes>]) -> Result<Reply, TernError> {
    let watched = commands.iter().take_while(|c| c.len() == 3 && c[0].eq_ignore_ascii_case(b"TERN.WATCHED")).count();
    for c in &commands[..watched] {
        let now = match keyspace::digest(r, &c[1]) {
            Ok(d) => d,
            Err(Fail::Storage(e)) => return Err(e),
            Err(Fail::Reply(reply)) => return Ok(reply),
        };
        if now.to_string().as_bytes() != &c[2][..] {
            return Ok(Reply::NilArray);
        }
    }
    let mut replies = Vec::with_capacity(commands.len() - watched);
    let mut size = 0;
    // Room kept for the error replies that may stand in for the commands still to run.
    const ERROR_REPLY_BYTES: usize = 128;
    for (i, c) in commands[watched..].iter().enumerate() {
        let remaining = commands.len() - watched - i - 1;
        if c.first().is_some_and(|n| n.eq_ignore_ascii_case(b"LCS")) {
            replies.push(Reply::err("ERR LCS cannot run inside a transaction on Tern (it would hold up the partition's writes)"));
            continue;
        }
        let reply = execute(r, c)?;
        let over = size + reply.size() + remaining * ERROR_REPLY_BYTES > crate::REPLY_BYTES_MAX;
        if !over {
            size += reply.size();
        }
        replies.push(if over {
            Reply::err(format!("ERR this command ran, but the transaction's replies passed {} bytes: its reply is dropped", crate::REPLY_BYTES_MAX))
        } else {
            reply
        });
    }
    Ok(Reply::Array(replies))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_commands() {
        let b = |s: &str| s.split(' ').map(|w| Bytes::copy_from_slice(w.as_bytes())).collect::<Vec<_>>();
        let keys = |s: &str| {
            let a = b(s);
            command_keys(spec(&a[0]).unwrap(), &a)
        };
        assert_eq!(keys("MSET a 1 b 2"), vec![1, 3]);
        assert_eq!(keys("DEL a b c"), vec![1, 2, 3]);
        assert_eq!(keys("ZUNIONSTORE d 2 a b WEIGHTS 1 2"), vec![1, 3, 4]);
        assert_eq!(keys("ZUNION 2 a b"), vec![2, 3]);
        assert_eq!(keys("ZUNION 3 a b"), vec![2, 3]);
        assert_eq!(keys("ZUNIONSTORE d x a b"), vec![1]);
        assert_eq!(keys("OBJECT ENCODING k"), vec![2]);
        assert_eq!(keys("LMOVE a b LEFT RIGHT"), vec![1, 2]);
        for s in all() {
            assert_eq!(spec(s.name.to_lowercase().as_bytes()).map(|x| x.name), Some(s.name));
        }
    }
}

/// What a malformed or hostile request must not do: panic, allocate without bound, write part of
/// itself, or stop the replica.
#[cfg(test)]
mod bounds {
    use crate::testing::{cmd, Mem};
    use crate::Reply;
    use bytes::Bytes;

    fn is_err(r: &Reply) -> bool {
        matches!(r, Reply::Error(_))
    }

    #[test]
    fn huge_counts_are_refused_not_allocated() {
        let r = &mut Mem::default();
        cmd(r, "HSET h f v");
        cmd(r, "SADD s m");
        cmd(r, "ZADD z 1 m");
        for c in ["HRANDFIELD h -4611686018427387903", "SRANDMEMBER s -9223372036854775807", "ZRANDMEMBER z -4611686018427387903"] {
            assert!(is_err(&cmd(r, c)), "{c}");
        }
        assert_eq!(cmd(r, "HRANDFIELD h -3"), Reply::Array(vec![Reply::bulk("f"); 3]));
    }

    #[test]
    fn a_refused_value_writes_nothing() {
        let r = &mut Mem::default();
        let big = Bytes::from(vec![b'x'; tern_core::limits::VALUE_BYTES_MAX + 1]);
        let a = vec![Bytes::from("MSET"), Bytes::from("a"), Bytes::from("1"), Bytes::from("b"), big];
        assert!(is_err(&crate::execute(r, &a).unwrap()));
        assert_eq!(cmd(r, "EXISTS a"), Reply::Int(0), "nothing of the MSET was written");
    }

    #[test]
    fn rotating_a_list_keeps_its_expiry() {
        let r = &mut Mem::default();
        cmd(r, "RPUSH l a");
        cmd(r, "PEXPIRE l 100000");
        assert_eq!(cmd(r, "LMOVE l l LEFT RIGHT"), Reply::bulk("a"));
        assert_eq!(cmd(r, "PTTL l"), Reply::Int(100_000));
        assert_eq!(cmd(r, "LRANGE l 0 -1"), Reply::Array(vec![Reply::bulk("a")]));
    }

    #[test]
    fn far_expiries_do_not_overflow() {
        let r = &mut Mem::default();
        cmd(r, "SET k v");
        assert_eq!(cmd(r, "PEXPIREAT k 9223372036854775807"), Reply::Int(1));
        assert_eq!(cmd(r, "EXPIRETIME k"), Reply::Int(i64::MAX / 1000));
        assert!(matches!(cmd(r, "TTL k"), Reply::Int(n) if n > 0));
        // Written through Tern's own API, past what Redis can say.
        r.map.insert((b"n".to_vec(), b"".to_vec()), (u64::MAX, b"v".to_vec()));
        assert_eq!(cmd(r, "PEXPIRETIME n"), Reply::Int(i64::MAX));
    }

    #[test]
    fn records_outside_the_layout_are_an_answer_not_a_failure() {
        let r = &mut Mem::default();
        // A native write of a sortkey in the collections' range, and metadata of the wrong size.
        r.map.insert((b"k".to_vec(), vec![0, 5]), (0, b"v".to_vec()));
        r.map.insert((b"m".to_vec(), vec![0, 1]), (0, b"xyz".to_vec()));
        for c in ["TYPE k", "LPUSH k a", "SADD m a", "GET m"] {
            assert!(is_err(&cmd(r, c)), "{c}");
        }
        assert_eq!(cmd(r, "DEL k m"), Reply::Int(2), "whatever a key holds, DEL removes it");
    }

    #[test]
    fn a_transaction_runs_whole_and_bounds_its_replies() {
        let r = &mut Mem::default();
        let big = Bytes::from(vec![b'x'; tern_core::limits::VALUE_BYTES_MAX]);
        crate::execute(r, &[Bytes::from("SET"), Bytes::from("k"), big]).unwrap();
        let mut commands: Vec<Vec<Bytes>> = (0..8).map(|_| vec![Bytes::from("GET"), Bytes::from("k")]).collect();
        commands.push(vec![Bytes::from("INCR"), Bytes::from("n")]);
        let Reply::Array(replies) = crate::execute_all(r, &commands).unwrap() else { panic!("an array") };
        assert_eq!(replies.len(), 9);
        assert!(replies[..3].iter().all(|x| matches!(x, Reply::Bulk(_))));
        assert!(replies[4..8].iter().all(is_err), "replies past the budget are dropped");
        assert_eq!(replies[8], Reply::Int(1), "the write after them ran, and its small reply fits");
        // WATCH's check only leads a transaction.
        let late = vec![vec![Bytes::from("INCR"), Bytes::from("n")], vec![Bytes::from("TERN.WATCHED"), Bytes::from("n"), Bytes::from("0")]];
        let Reply::Array(replies) = crate::execute_all(r, &late).unwrap() else { panic!("an array") };
        assert_eq!(replies[0], Reply::Int(2));
        assert!(is_err(&replies[1]));
    }

    #[test]
    fn key_wide_commands_cover_keys_larger_than_a_chunk() {
        let r = &mut Mem::default();
        let members: Vec<String> = (0..2500).map(|i| format!("m{i}")).collect();
        cmd(r, &format!("SADD s {}", members.join(" ")));
        cmd(r, "EXPIRE s 100");
        assert!(r.map.iter().filter(|((h, _), _)| h == b"s").all(|(_, (e, _))| *e == 101_000), "every record took the expiry");
        assert_eq!(cmd(r, "RENAME s t"), Reply::Ok);
        assert_eq!(cmd(r, "SCARD t"), Reply::Int(2500));
        assert_eq!(r.records_of("s"), 0);
        assert_eq!(cmd(r, "DEL t"), Reply::Int(1));
        assert!(r.map.is_empty());
    }
}

/// Pops with a count answer for everything they removed: they stop before the reply outgrows
/// what a reply may carry, never remove and then refuse.
#[cfg(test)]
mod pops {
    use crate::testing::{cmd, Mem};
    use crate::Reply;
    use bytes::Bytes;

    #[test]
    fn pops_of_big_elements_answer_what_they_removed() {
        let r = &mut Mem::default();
        let big = Bytes::from(vec![b'x'; 1_000_000]);
        for _ in 0..6 {
            crate::execute(r, &[Bytes::from("RPUSH"), Bytes::from("l"), big.clone()]).unwrap();
        }
        let Reply::Array(popped) = cmd(r, "LPOP l 6") else { panic!("an array") };
        let left = match cmd(r, "LLEN l") {
            Reply::Int(n) => n as usize,
            other => panic!("{other:?}"),
        };
        assert!(!popped.is_empty() && popped.len() < 6, "stopped early: {}", popped.len());
        assert_eq!(popped.len() + left, 6, "nothing removed without being answered");
        let members: Vec<String> = (0..100_000).map(|i| format!("{i:06}")).collect();
        for chunk in members.chunks(10_000) {
            cmd(r, &format!("SADD s {}", chunk.join(" ")));
            let pairs: Vec<String> = chunk.iter().map(|m| format!("1 {m}")).collect();
            cmd(r, &format!("ZADD z {}", pairs.join(" ")));
        }
        for (pop, card) in [("SPOP s 100000", "SCARD s"), ("ZPOPMIN z 100000", "ZCARD z")] {
            let reply = cmd(r, pop);
            let answered = match &reply {
                Reply::Set(items) | Reply::Array(items) => items.len(),
                Reply::Pairs(pairs) => pairs.len(),
                other => panic!("{pop}: {other:?}"),
            };
            assert!(reply.size() <= crate::REPLY_BYTES_MAX, "{pop}");
            let Reply::Int(left) = cmd(r, card) else { panic!("a count") };
            assert_eq!(answered + left as usize, 100_000, "{pop}: nothing removed without being answered");
        }
    }

    #[test]
    fn a_pop_over_records_outside_the_layout_does_not_underflow() {
        let r = &mut Mem::default();
        cmd(r, "SADD s a");
        r.map.insert((b"s".to_vec(), [&[0u8, 2][..], b"x"].concat()), (0, Vec::new()));
        assert!(matches!(cmd(r, "SPOP s 10"), Reply::Set(items) if items.len() == 2));
        assert_eq!(cmd(r, "EXISTS s"), Reply::Int(0));
    }
}
