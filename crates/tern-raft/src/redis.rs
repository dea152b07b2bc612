//! Redis commands on a replica's records (tern-redis's `Records`): in a write's apply, over the
//! engine plus the apply round's pending writes and at the entry's time, with randomness drawn
//! from the entry; in a read, over the engine alone at the serving replica's time.

use crate::apply::{engine_error, ApplyBatch, Owner, StorageFailure};
use crate::keys;
use bytes::Bytes;
use std::collections::BTreeMap;
use tern_core::{codec, TernError, TernResult};
use tern_engine::KvEngine;
use tern_proto::RedisWrite;
use tern_redis::Records;

/// Every key the commands name, checked against what the partition owns, the same way on every
/// replica. The first key is the one the request was routed by: when the partition no longer owns
/// it (it split since), the answer sends the client to the partition that does; when it owns the
/// first but not another, the keys now live in different partitions, which no retry mends.
pub fn check_keys<'a>(owner: Owner, commands: impl Iterator<Item = &'a [Bytes]>) -> TernResult<()> {
    let mut first = true;
    let mut check = |key: &[u8]| -> TernResult<()> {
        let owned = owner.check(key);
        if owned.is_err() && !first {
            return Err(TernError::invalid(
                "CROSSSLOT Keys in request don't hash to the same slot (the partition split: its keys now live in different partitions)",
            ));
        }
        first = false;
        owned
    };
    for args in commands {
        if args.len() == 3 && args[0].eq_ignore_ascii_case(b"TERN.WATCHED") {
            check(&args[1])?;
            continue;
        }
        let Some(spec) = args.first().and_then(|name| tern_redis::spec(name)) else { continue };
        if !spec.arity_ok(args.len()) {
            continue; // the executor answers it
        }
        for i in tern_redis::command_keys(spec, args) {
            check(&args[i])?;
        }
    }
    Ok(())
}

/// Runs a Redis write in an apply round. Err: the replica must stop.
pub fn apply_write(batch: &mut ApplyBatch, engine: &dyn KvEngine, write: &RedisWrite, now: u64, seed: u64) -> Result<Vec<u8>, StorageFailure> {
    let commands: Vec<Vec<Bytes>> = write.commands.iter().map(|c| c.args.clone()).collect();
    let mut records = ApplyRecords { batch, engine, now, seed };
    let reply = if write.transaction {
        tern_redis::execute_all(&mut records, &commands)
    } else if let [one] = &commands[..] {
        tern_redis::execute(&mut records, one)
    } else {
        Ok(tern_redis::Reply::err("ERR a Redis write holds one command unless it is a transaction"))
    };
    Ok(reply.map_err(StorageFailure)?.to_wire())
}

/// Runs a Redis read on the engine.
pub fn read(engine: &dyn KvEngine, args: &[Bytes], now: u64, owner: Owner) -> TernResult<Vec<u8>> {
    check_keys(owner, std::iter::once(args))?;
    // Reads need no agreement: any randomness will do, as long as successive reads differ.
    static READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seed = now ^ READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed).wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut records = ReadRecords { engine, now, seed };
    Ok(tern_redis::execute(&mut records, args)?.to_wire())
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct ApplyRecords<'a> {
    batch: &'a mut ApplyBatch,
    engine: &'a dyn KvEngine,
    now: u64,
    seed: u64,
}

impl Records for ApplyRecords<'_> {
    fn now_ms(&self) -> u64 {
        self.now
    }

    fn random(&mut self) -> u64 {
        splitmix(&mut self.seed)
    }

    fn writable(&self) -> bool {
        true
    }

    fn get(&mut self, hashkey: &[u8], sortkey: &[u8]) -> TernResult<Option<(u64, Vec<u8>)>> {
        self.batch.live_record(self.engine, &keys::data_key(hashkey, sortkey), self.now).map_err(|f| f.0)
    }

    fn scan(&mut self, hashkey: &[u8], from: &[u8], to: Option<&[u8]>, reverse: bool, visit: &mut tern_redis::Visit) -> TernResult<()> {
        let (overlay, deleted) = self.batch.pending();
        walk(self.engine, Some((overlay, deleted)), hashkey, from, to, reverse, self.now, visit)
    }

    fn put(&mut self, hashkey: &[u8], sortkey: &[u8], expire_at_ms: u64, value: &[u8]) -> TernResult<()> {
        self.batch.put_record(hashkey, sortkey, expire_at_ms, value);
        Ok(())
    }

    fn delete(&mut self, hashkey: &[u8], sortkey: &[u8]) -> TernResult<()> {
        self.batch.delete_record(self.engine, hashkey, sortkey).map_err(|f| f.0)
    }
}

struct ReadRecords<'a> {
    engine: &'a dyn KvEngine,
    now: u64,
    seed: u64,
}

impl Records for ReadRecords<'_> {
    fn now_ms(&self) -> u64 {
        self.now
    }

    fn random(&mut self) -> u64 {
        splitmix(&mut self.seed)
    }

    fn writable(&self) -> bool {
        false
    }

    fn get(&mut self, hashkey: &[u8], sortkey: &[u8]) -> TernResult<Option<(u64, Vec<u8>)>> {
        let Some(stored) = self.engine.get(&keys::data_key(hashkey, sortkey)).map_err(engine_error)? else { return Ok(None) };
        let (expire, value) = codec::decode_value(&stored)?;
        Ok((!codec::is_expired(expire, self.now)).then(|| (expire, value.to_vec())))
    }

    fn scan(&mut self, hashkey: &[u8], from: &[u8], to: Option<&[u8]>, reverse: bool, visit: &mut tern_redis::Visit) -> TernResult<()> {
        walk(self.engine, None, hashkey, from, to, reverse, self.now, visit)
    }

    fn put(&mut self, _: &[u8], _: &[u8], _: u64, _: &[u8]) -> TernResult<()> {
        Err(TernError::invalid("a read cannot write"))
    }

    fn delete(&mut self, _: &[u8], _: &[u8]) -> TernResult<()> {
        Err(TernError::invalid("a read cannot write"))
    }
}

/// A pending write: the key and its value (None: deleted).
type PendingWrite<'a> = (&'a Vec<u8>, &'a Option<Vec<u8>>);

pub(crate) type Pending<'a> = (&'a BTreeMap<Vec<u8>, Option<Vec<u8>>>, &'a [(Vec<u8>, Vec<u8>)]);

/// Visits the live records of `hashkey` in [from, to) as the engine plus the pending writes hold
/// them, in order (descending when `reverse`), until `visit` returns false.
#[allow(clippy::too_many_arguments)]
fn walk(
    engine: &dyn KvEngine,
    pending: Option<Pending>,
    hashkey: &[u8],
    from: &[u8],
    to: Option<&[u8]>,
    reverse: bool,
    now: u64,
    visit: &mut tern_redis::Visit,
) -> TernResult<()> {
    let prefix = keys::hashkey_prefix(hashkey);
    let start = keys::data_key(hashkey, from);
    let end = match to {
        Some(to) => keys::data_key(hashkey, to),
        None => codec::prefix_successor(&prefix).expect("data keys start with 0x01"),
    };
    if start >= end {
        return Ok(());
    }
    // The pending writes in range, taken lazily in scan order (a scan that stops early reads
    // only as far as it went); deletes among them only hide the engine's keys.
    let in_range = pending.map(|(overlay, _)| overlay.range(start.clone()..end.clone()));
    let ordered: Box<dyn Iterator<Item = PendingWrite>> = match in_range {
        Some(r) if reverse => Box::new(r.rev()),
        Some(r) => Box::new(r),
        None => Box::new(std::iter::empty()),
    };
    let mut extra = ordered.filter_map(|(k, v)| Some((k.as_slice(), v.as_deref()?))).peekable();
    let mut walker = Walker { visit, now, skip: prefix.len(), failed: None, stopped: false };
    let mut on_engine = |k: &[u8], v: &[u8]| -> bool {
        while let Some(&(key, value)) = extra.peek() {
            if if reverse { key <= k } else { key >= k } {
                break;
            }
            if !walker.emit(key, value) {
                return false;
            }
            extra.next();
        }
        if let Some((overlay, deleted)) = pending {
            if overlay.contains_key(k) || deleted.iter().any(|(s, e)| s.as_slice() <= k && k < e.as_slice()) {
                return true;
            }
        }
        walker.emit(k, v)
    };
    if reverse { engine.scan_reverse(&start, &end, &mut on_engine) } else { engine.scan(&start, Some(&end), &mut on_engine) }
        .map_err(engine_error)?;
    if let Some(e) = walker.failed.take() {
        return Err(e);
    }
    for (key, value) in extra {
        if walker.stopped {
            break;
        }
        walker.emit(key, value);
    }
    walker.failed.map_or(Ok(()), Err)
}

struct Walker<'v> {
    visit: &'v mut tern_redis::Visit<'v>,
    now: u64,
    skip: usize,
    failed: Option<TernError>,
    stopped: bool,
}

impl Walker<'_> {
    /// Visits one stored record (skipping it when expired); false once the walk must stop.
    fn emit(&mut self, key: &[u8], stored: &[u8]) -> bool {
        match codec::decode_value(stored) {
            Err(e) => {
                self.failed = Some(e);
                self.stopped = true;
            }
            Ok((expire, _)) if codec::is_expired(expire, self.now) => {}
            Ok((expire, value)) => self.stopped = !(self.visit)(&key[self.skip..], expire, value),
        }
        !self.stopped
    }
}
