//! tern-redis: Redis's data types on Tern's records, and every Redis command that reads or writes
//! keys, executed where a partition applies its log (writes) or serves a read.
//!
//! Owns: the layout of strings, hashes, lists, sets and sorted sets in the records of one hashkey
//! (`layout`, documented in docs/design/redis.md), the command table (arity, read or write, which
//! arguments are keys: `commands`), and each command's semantics (`strings`, `hash`, `list`, `set`,
//! `zset`, `keyspace`). A Redis key is a hashkey, so every record of one key lives in one
//! partition, and a command (or a MULTI/EXEC of commands) whose keys share a partition is atomic:
//! it runs inside one raft entry's apply.
//!
//! Execution is deterministic: time and randomness come from the `Records` the caller hands in
//! (the entry's time and a seed drawn from it when applying), never from this machine. A storage
//! error is returned as `Err` (the caller stops the replica); anything wrong with the request is an
//! error reply, with nothing written.
//!
//! Must not depend on any Tern crate but tern-core (no raft, engine, client or network).

mod args;
pub mod commands;
pub mod glob;
mod hash;
mod keyspace;
mod layout;
mod list;
mod reply;
mod set;
mod strings;
mod zset;

pub use commands::{command_keys, execute, execute_all, spec, Spec};
pub use layout::{hash_field_of_sortkey, hash_sortkey, KeyType};
pub use reply::{format_double, format_score, Reply};

use tern_core::{TernError, TernResult};

/// What a scan calls for each record: (sortkey, expire_at_ms, value); false stops the scan.
pub type Visit<'a> = dyn FnMut(&[u8], u64, &[u8]) -> bool + 'a;

/// The records of a partition as a command sees them: live records only (expired ones are absent),
/// with the command's own writes visible to its later reads.
pub trait Records {
    /// The time expiry is judged by, in unix ms: the entry's time when applying, the serving
    /// replica's clock when reading.
    fn now_ms(&self) -> u64;
    /// A random number for SPOP, SRANDMEMBER and the like: drawn from the entry when applying, so
    /// that every replica draws the same.
    fn random(&mut self) -> u64;
    /// Whether writes are allowed (false when serving a read).
    fn writable(&self) -> bool;
    /// The live record (expire_at_ms, value) at (hashkey, sortkey).
    fn get(&mut self, hashkey: &[u8], sortkey: &[u8]) -> TernResult<Option<(u64, Vec<u8>)>>;
    /// Visits the live records of `hashkey` with sortkeys in [from, to) (`to` None: to the
    /// hashkey's end), ascending, or descending when `reverse`, until `visit` returns false.
    fn scan(&mut self, hashkey: &[u8], from: &[u8], to: Option<&[u8]>, reverse: bool, visit: &mut Visit) -> TernResult<()>;
    fn put(&mut self, hashkey: &[u8], sortkey: &[u8], expire_at_ms: u64, value: &[u8]) -> TernResult<()>;
    fn delete(&mut self, hashkey: &[u8], sortkey: &[u8]) -> TernResult<()>;
}

/// Why a command stopped early: an answer for the client (nothing more is written), or a storage
/// failure (the caller stops).
pub(crate) enum Fail {
    Reply(Reply),
    Storage(TernError),
}

impl From<TernError> for Fail {
    fn from(e: TernError) -> Fail {
        Fail::Storage(e)
    }
}

impl From<Reply> for Fail {
    fn from(r: Reply) -> Fail {
        Fail::Reply(r)
    }
}

pub(crate) type Res<T> = Result<T, Fail>;

pub(crate) fn fail<T>(msg: impl Into<String>) -> Res<T> {
    Err(Fail::Reply(Reply::Error(msg.into())))
}

/// A key whose records do not follow the layout (written through Tern's own API, or delivered by
/// duplication from a cluster writing the same key): an answer, the same on every replica, never a
/// reason to stop the replica.
pub(crate) fn malformed<T>(what: impl std::fmt::Display) -> Res<T> {
    Err(malformed_key(what))
}

pub(crate) fn malformed_key(what: impl std::fmt::Display) -> Fail {
    Fail::Reply(Reply::Error(format!(
        "ERR the key's records are not a Redis value this endpoint recognises ({what}); were they written through Tern's own API?"
    )))
}

pub const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";
pub(crate) const NOT_INTEGER: &str = "ERR value is not an integer or out of range";
pub(crate) const NOT_FLOAT: &str = "ERR value is not a valid float";
pub(crate) const SYNTAX: &str = "ERR syntax error";

/// Largest answer one command builds: a partition's reply travels in one message. Reads of whole
/// collections past it are refused (read them with the SCAN forms or ranges); pops with a count
/// stop early at it.
pub const REPLY_BYTES_MAX: usize = 4 * 1024 * 1024 - 64 * 1024;

/// What pops with a count (LPOP, SPOP, ZPOPMIN, ...) take at most before their last element: with
/// that element (at most a value's size) the reply still fits `REPLY_BYTES_MAX`, so a write never
/// removes what its answer cannot carry.
pub const POP_BYTES_MAX: usize = REPLY_BYTES_MAX - tern_core::limits::VALUE_BYTES_MAX - 4096;

/// Largest collection a command loads whole into memory (sources of the STORE forms, random picks,
/// SMEMBERS before its reply is checked): past it the command is refused, with nothing written.
pub const LOAD_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Most picks a random-members command with a negative count (repeats allowed) makes.
pub const PICKS_MAX: u64 = 1 << 22;

pub(crate) fn too_large_to_load<T>() -> Res<T> {
    fail(format!("ERR the key holds more than {LOAD_BYTES_MAX} bytes, more than one command loads; read it with the SCAN forms or ranges"))
}

/// Positions to pick among `n` for a random-members command's count: distinct ones (all of them
/// when the count reaches `n`) for a positive count, `-count` picks with repeats for a negative one
/// (at most PICKS_MAX).
pub(crate) fn random_picks(r: &mut dyn Records, n: usize, count: i64) -> Res<Vec<usize>> {
    if n == 0 || count == 0 {
        return Ok(Vec::new());
    }
    if count < 0 {
        if count.unsigned_abs() > PICKS_MAX {
            return fail(format!("ERR count {count} is too large; at most {PICKS_MAX} picks are made with repeats"));
        }
        return Ok((0..count.unsigned_abs()).map(|_| (r.random() % n as u64) as usize).collect());
    }
    let mut all: Vec<usize> = (0..n).collect();
    let want = (count as u64).min(n as u64) as usize;
    for i in 0..want {
        let j = i + (r.random() % (n - i) as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(want);
    Ok(all)
}

/// Records in memory for the crate's tests: a writable partition with a fixed clock and a
/// deterministic random.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Records, Reply, Visit};
    use bytes::Bytes;
    use std::collections::BTreeMap;
    use tern_core::TernResult;

    /// (hashkey, sortkey) → (expire_at_ms, value).
    type Map = BTreeMap<(Vec<u8>, Vec<u8>), (u64, Vec<u8>)>;

    pub struct Mem {
        pub map: Map,
        pub now: u64,
        seed: u64,
    }

    impl Default for Mem {
        fn default() -> Mem {
            Mem { map: BTreeMap::new(), now: 1_000, seed: 0x9e37_79b9_7f4a_7c15 }
        }
    }

    impl Mem {
        /// How many records `key` has.
        pub fn records_of(&self, key: &str) -> usize {
            self.map.keys().filter(|(h, _)| h.as_slice() == key.as_bytes()).count()
        }
    }

    impl Records for Mem {
        fn now_ms(&self) -> u64 {
            self.now
        }

        fn random(&mut self) -> u64 {
            let mut x = self.seed;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.seed = x;
            x
        }

        fn writable(&self) -> bool {
            true
        }

        fn get(&mut self, hashkey: &[u8], sortkey: &[u8]) -> TernResult<Option<(u64, Vec<u8>)>> {
            let now = self.now;
            Ok(self.map.get(&(hashkey.to_vec(), sortkey.to_vec())).filter(|(e, _)| *e == 0 || *e > now).cloned())
        }

        fn scan(&mut self, hashkey: &[u8], from: &[u8], to: Option<&[u8]>, reverse: bool, visit: &mut Visit) -> TernResult<()> {
            let now = self.now;
            let mut rows: Vec<(Vec<u8>, u64, Vec<u8>)> = self
                .map
                .range((hashkey.to_vec(), from.to_vec())..)
                .take_while(|((h, s), _)| h.as_slice() == hashkey && to.is_none_or(|t| s.as_slice() < t))
                .filter(|(_, (e, _))| *e == 0 || *e > now)
                .map(|((_, s), (e, v))| (s.clone(), *e, v.clone()))
                .collect();
            if reverse {
                rows.reverse();
            }
            for (s, e, v) in &rows {
                if !visit(s, *e, v) {
                    break;
                }
            }
            Ok(())
        }

        fn put(&mut self, hashkey: &[u8], sortkey: &[u8], expire_at_ms: u64, value: &[u8]) -> TernResult<()> {
            self.map.insert((hashkey.to_vec(), sortkey.to_vec()), (expire_at_ms, value.to_vec()));
            Ok(())
        }

        fn delete(&mut self, hashkey: &[u8], sortkey: &[u8]) -> TernResult<()> {
            self.map.remove(&(hashkey.to_vec(), sortkey.to_vec()));
            Ok(())
        }
    }

    /// Runs one command line (words split on spaces) as the executor would.
    pub fn cmd(r: &mut Mem, line: &str) -> Reply {
        let a: Vec<Bytes> = line.split_whitespace().map(|w| Bytes::copy_from_slice(w.as_bytes())).collect();
        crate::commands::execute(r, &a).expect("no storage error")
    }
}
